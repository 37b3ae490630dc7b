//! Leases: a site that stops heartbeating turns stale after its TTL (visible in the catalog,
//! the watch stream, resolve and metrics) and is withdrawn after the grace; a site that
//! resumes in between is fresh again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshbridge_core::client::Consistency;
use meshbridge_core::model::{Catalog, SiteRank, SiteSpec, SiteState};
use support::{Cluster, export, key, metrics, spec};
use tokio::sync::watch;

const TTL_MS: u64 = 800;
const GRACE_MS: u64 = 1_500;

fn short(name: &str, zone: &str) -> SiteSpec {
    SiteSpec {
        lease_ttl_ms: TTL_MS,
        grace_ms: GRACE_MS,
        ..spec(name, "eu", zone)
    }
}

async fn wait_state(
    replica: &mut watch::Receiver<Arc<Catalog>>,
    site: &str,
    want: fn(&SiteState) -> bool,
    timeout: Duration,
) -> Instant {
    let found = tokio::time::timeout(
        timeout,
        replica.wait_for(|c| c.site(site).is_some_and(|s| want(&s.state))),
    )
    .await
    .map(|r| r.is_ok());
    let catalog = replica.borrow().clone();
    assert!(
        found == Ok(true),
        "site {site} never reached the state: {:?}",
        catalog.site(site)
    );
    Instant::now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_site_turns_stale_then_withdrawn_and_a_resumed_site_is_fresh() {
    let cluster = Cluster::start(3, |_| {}).await;
    let east = cluster.site("east").await;
    let west = cluster.site("west").await;
    let mut replica = cluster.admin().await.watch_catalog();

    let registered = Instant::now();
    east.register_site(&short("east", "eu-1a")).await.unwrap();
    west.register_site(&short("west", "eu-1b")).await.unwrap();
    east.put_export(&export("east", "cart", 1, &["10.0.0.1"]))
        .await
        .unwrap();
    west.put_export(&export("west", "cart", 1, &["10.0.1.1"]))
        .await
        .unwrap();

    // Neither heartbeats: both lapse after the TTL, not before.
    let stale_at = wait_state(
        &mut replica,
        "east",
        |s| matches!(s, SiteState::Stale { .. }),
        Duration::from_secs(10),
    )
    .await;
    let lapsed_after = stale_at - registered;
    assert!(
        lapsed_after >= Duration::from_millis(TTL_MS),
        "stale after {lapsed_after:?}, before the TTL"
    );
    wait_state(
        &mut replica,
        "west",
        |s| matches!(s, SiteState::Stale { .. }),
        Duration::from_secs(10),
    )
    .await;

    // Stale endpoints stay, ranked last, and the staleness is visible.
    let ranked = east
        .resolve(&key("cart"), "east", Consistency::Linearizable)
        .await
        .unwrap();
    assert!(
        ranked
            .value
            .iter()
            .all(|(rank, _)| *rank == SiteRank::Stale),
        "{ranked:?}"
    );
    assert_eq!(ranked.value.len(), 2, "stale endpoints were dropped");
    let leader = cluster.wait_leader(Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let text = metrics(cluster.node(leader).admin_addr()).await;
    assert!(
        text.contains("meshbridge_registry_sites{state=\"stale\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("meshbridge_registry_staleness_seconds{site=\"east\"}"),
        "{text}"
    );

    // West resumes inside the grace: fresh again, ranked by locality again.
    west.heartbeat("west").await.unwrap();
    wait_state(
        &mut replica,
        "west",
        |s| *s == SiteState::Fresh,
        Duration::from_secs(5),
    )
    .await;
    let ranked = west
        .resolve(&key("cart"), "west", Consistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(ranked.value[0].0, SiteRank::SameSite);
    assert_eq!(ranked.value[0].1.site, "west");

    // East stays silent: withdrawn after the grace; its exports are gone everywhere.
    let withdrawn_at = wait_state(
        &mut replica,
        "east",
        |s| matches!(s, SiteState::Withdrawn { .. }),
        Duration::from_secs(10),
    )
    .await;
    assert!(
        withdrawn_at - stale_at >= Duration::from_millis(GRACE_MS - 200),
        "withdrawn {:?} after turning stale",
        withdrawn_at - stale_at
    );
    let catalog = replica.borrow().clone();
    assert!(catalog.export(&key("cart"), "east").is_none());
    assert!(catalog.export(&key("cart"), "west").is_some());

    // A withdrawn site must register again; a heartbeat is not enough.
    let err = east.heartbeat("east").await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition), "{err}");
    east.register_site(&short("east", "eu-1a")).await.unwrap();
    wait_state(
        &mut replica,
        "east",
        |s| *s == SiteState::Fresh,
        Duration::from_secs(5),
    )
    .await;
    cluster.shutdown().await;
}

/// A partial partition: the registry no longer hears east, but west (fresh) reports a live
/// tunnel to east's gateway. East turns stale and stays stale past its grace while that
/// lasts; once west reports the link down, east is withdrawn.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_site_a_live_peer_still_reaches_stays_stale_instead_of_withdrawn() {
    let cluster = Cluster::start(3, |_| {}).await;
    let east = cluster.site("east").await;
    let west = cluster.site("west").await;
    let mut replica = cluster.admin().await.watch_catalog();
    east.register_site(&short("east", "eu-1a")).await.unwrap();
    west.register_site(&short("west", "eu-1b")).await.unwrap();
    // West heartbeats with its link to east up or down; east is silent.
    let beat = |connected| {
        let west = west.clone();
        let report = meshbridge_core::model::Report {
            links: vec![meshbridge_core::model::Link {
                peer_site: "east".into(),
                connected,
                transport: Some("quic".into()),
                rtt_us: Some(300),
                failures: 0,
                last_error: None,
            }],
            xds_rejections: Vec::new(),
        };
        async move {
            west.heartbeat_reporting("west", "", Some(&report))
                .await
                .unwrap();
        }
    };
    beat(true).await;
    let stale_at = wait_state(
        &mut replica,
        "east",
        |s| matches!(s, SiteState::Stale { .. }),
        Duration::from_secs(10),
    )
    .await;
    // Twice the grace, with west vouching all along: still stale.
    while stale_at.elapsed() < Duration::from_millis(2 * GRACE_MS) {
        beat(true).await;
        tokio::time::sleep(Duration::from_millis(TTL_MS / 4)).await;
    }
    let east_state = replica.borrow().site("east").map(|s| s.state);
    assert!(
        matches!(east_state, Some(SiteState::Stale { .. })),
        "east: {east_state:?}"
    );
    // West's tunnel to east goes down: east is withdrawn at the next tick.
    beat(false).await;
    wait_state(
        &mut replica,
        "east",
        |s| matches!(s, SiteState::Withdrawn { .. }),
        Duration::from_secs(5),
    )
    .await;
    cluster.shutdown().await;
}

/// A withdrawn site stays listed for `forget_withdrawn_after_ms`, then is gone from every
/// replica; a fresh site is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_withdrawn_site_is_listed_for_a_while_then_forgotten() {
    const FORGET_MS: u64 = 1_500;
    let cluster = Cluster::start(3, |c| c.leases.forget_withdrawn_after_ms = FORGET_MS).await;
    let east = cluster.site("east").await;
    let west = cluster.site("west").await;
    let mut replica = cluster.admin().await.watch_catalog();
    east.register_site(&short("east", "eu-1a")).await.unwrap();
    west.register_site(&spec("west", "eu", "eu-1b"))
        .await
        .unwrap();
    let withdrawn_at = wait_state(
        &mut replica,
        "east",
        |s| matches!(s, SiteState::Withdrawn { .. }),
        Duration::from_secs(10),
    )
    .await;
    let gone = tokio::time::timeout(
        Duration::from_secs(10),
        replica.wait_for(|c| c.site("east").is_none()),
    )
    .await
    .map(|r| r.is_ok());
    assert_eq!(
        gone,
        Ok(true),
        "east never forgotten: {:?}",
        replica.borrow().site("east")
    );
    let listed_for = withdrawn_at.elapsed();
    assert!(
        listed_for >= Duration::from_millis(FORGET_MS - 200),
        "forgotten {listed_for:?} after withdrawal"
    );
    assert!(
        replica.borrow().site("west").is_some(),
        "a fresh site was forgotten"
    );
    // It may come back: it registers afresh.
    east.register_site(&short("east", "eu-1a")).await.unwrap();
    wait_state(
        &mut replica,
        "east",
        |s| *s == SiteState::Fresh,
        Duration::from_secs(5),
    )
    .await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heartbeats_keep_a_site_fresh_across_a_leader_change() {
    let mut cluster = Cluster::start(3, |_| {}).await;
    let east = cluster.site("east").await;
    let spec = SiteSpec {
        lease_ttl_ms: 3_000,
        ..short("east", "eu-1a")
    };
    east.register_site(&spec).await.unwrap();
    let beating = {
        let east = east.clone();
        tokio::spawn(async move {
            loop {
                east.heartbeat("east").await.expect("heartbeat failed");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let leader = cluster.wait_leader(Duration::from_secs(5)).await;
    cluster.kill(leader).await;
    cluster.wait_leader(Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let sites = east.list_sites(Consistency::Linearizable).await.unwrap();
    assert_eq!(sites.sites[0].state, SiteState::Fresh, "{sites:?}");
    beating.abort();
    cluster.shutdown().await;
}
