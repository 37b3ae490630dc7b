//! A 3-node registry on loopback: replication, forwarding, leader loss, restart from disk,
//! snapshots for a node that was away, membership changes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use meshbridge_core::client::{Consistency, RegistryClient};
use support::{Cluster, export, key, metric, metrics, spec, visible};

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_via_any_node_read_back_on_every_node() {
    let cluster = Cluster::start(3, |_| {}).await;
    let leader = cluster.wait_leader(T).await;
    let mut last = 0;
    for id in 1..=3u64 {
        // Each write goes to one node only: followers forward it to the leader.
        let site = format!("site-{id}");
        let client = cluster.admin_of(id).await;
        let w = client
            .register_site(&spec(&site, "eu", "eu-1a"))
            .await
            .unwrap();
        assert!(w.changed);
        let w = client
            .put_export(&export(&site, "cart", 1, &["10.0.0.1"]))
            .await
            .unwrap();
        last = w.revision;
    }
    cluster.wait_revision(last, T).await;
    for id in 1..=3u64 {
        let client = cluster.admin_of(id).await;
        for consistency in [Consistency::Linearizable, Consistency::Stale] {
            let cart = client.get_service(&key("cart"), consistency).await.unwrap();
            let sites: Vec<&str> = cart
                .value
                .as_ref()
                .unwrap()
                .groups
                .iter()
                .map(|g| g.site.as_str())
                .collect();
            assert_eq!(
                sites,
                ["site-1", "site-2", "site-3"],
                "node {id} {consistency:?}"
            );
        }
        let status = client.status().await.unwrap();
        assert_eq!(status.leader_id, Some(leader));
        assert_eq!(status.members.len(), 3);
    }
    let catalogs: Vec<_> = cluster
        .nodes
        .values()
        .map(|n| visible(&n.catalog()))
        .collect();
    assert!(catalogs.windows(2).all(|w| w[0] == w[1]));

    // Replication is visible: the leader times its AppendEntries to each peer and counts
    // its early appends, followers time handling them, and every node times its log
    // commits.
    for (id, node) in &cluster.nodes {
        let text = metrics(node.admin_addr()).await;
        let count = |series: &str| metric(&text, series).unwrap_or(0.0);
        assert!(
            count("meshbridge_registry_log_flush_seconds_count") > 0.0,
            "node {id}: {text}"
        );
        if *id == leader {
            // Sequential writes: a follower that acknowledged the previous entry matches an
            // early append of the next one exactly, so its success reply answers openraft's
            // own request for it.
            let answered: f64 = cluster
                .nodes
                .keys()
                .filter(|p| **p != leader)
                .map(|peer| {
                    count(&format!(
                        "meshbridge_registry_early_appends_answered_total{{peer=\"{peer}\"}}"
                    ))
                })
                .sum();
            assert!(answered > 0.0, "leader {id}: {text}");
            for peer in cluster.nodes.keys().filter(|p| **p != leader) {
                let series = format!(
                    "meshbridge_registry_peer_append_entries_seconds_count{{peer=\"{peer}\"}}"
                );
                assert!(count(&series) > 0.0, "leader {id}, peer {peer}: {text}");
                // Its own new entries also went to each follower as its fsync began.
                let early = format!("meshbridge_registry_early_appends_total{{peer=\"{peer}\"}}");
                assert!(count(&early) > 0.0, "leader {id}, peer {peer}: {text}");
            }
        } else {
            assert!(
                count("meshbridge_registry_append_entries_handling_seconds_count") > 0.0,
                "follower {id}: {text}"
            );
        }
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill_under_write_load_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start(3, |_| {}).await;
    let admin = cluster.admin().await;
    admin
        .register_site(&spec("east", "eu", "eu-1a"))
        .await
        .unwrap();

    // Writers: each puts exports with increasing generations and records what was
    // acknowledged. None of them ever retries by hand.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let client = cluster.site("east").await;
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut generation = 0;
            while !stop.load(Ordering::Relaxed) {
                generation += 1;
                let service = format!("svc-{w}");
                let e = export("east", &service, generation, &["10.0.0.1"]);
                client.put_export(&e).await.expect("write failed");
                acked.push((service, generation));
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let old = cluster.wait_leader(T).await;
    let killed_at = Instant::now();
    cluster.kill(old).await;
    let new = cluster.wait_leader(T).await;
    assert_ne!(new, old);
    tracing::warn!(took = ?killed_at.elapsed(), "new leader elected");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert!(acked.len() > 20, "only {} writes", acked.len());

    // Every acknowledged generation is in the catalog (or a newer one is).
    let catalog = admin.catalog(Consistency::Linearizable).await.unwrap();
    for (service, generation) in &acked {
        let stored = catalog
            .export(&key(service), "east")
            .expect("export lost")
            .generation;
        assert!(
            stored >= *generation,
            "{service}: stored {stored} < acked {generation}"
        );
    }

    // The killed node comes back from its data directory and catches up.
    cluster.restart(old).await;
    cluster.wait_revision(catalog.revision, T).await;
    assert_eq!(visible(&cluster.node(old).catalog()), visible(&catalog));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_away_past_a_log_purge_installs_a_snapshot() {
    let mut cluster = Cluster::start(3, |c| {
        c.raft.snapshot_every_logs = 50;
        c.raft.keep_logs_after_snapshot = 5;
        // Several chunks per snapshot, to exercise the chunked transfer.
        c.raft.snapshot_chunk_bytes = 1024;
    })
    .await;
    let admin = cluster.admin().await;
    admin
        .register_site(&spec("east", "eu", "eu-1a"))
        .await
        .unwrap();
    let leader = cluster.wait_leader(T).await;
    let away = (1..=3).find(|id| *id != leader).unwrap();
    cluster.kill(away).await;

    let mut last = 0;
    for g in 1..=200 {
        last = admin
            .put_export(&export("east", &format!("svc-{}", g % 7), g, &["10.0.0.1"]))
            .await
            .unwrap()
            .revision;
    }
    let purged = cluster.node(leader).raft_metrics().purged;
    assert!(
        purged.is_some_and(|p| p.index > 100),
        "leader did not purge: {purged:?}"
    );
    // Status shows who is behind, and by how much.
    let status = admin.status().await.unwrap();
    assert_eq!(status.leader_id, Some(leader));
    assert!(status.commit_index >= 200, "{status:?}");
    let member = |id| status.members.iter().find(|m| m.node_id == id).unwrap();
    assert!(member(away).lag > 150, "{status:?}");
    let present = (1..=3).find(|id| *id != leader && *id != away).unwrap();
    assert!(member(present).lag < 10, "{status:?}");

    cluster.restart(away).await;
    cluster.wait_revision(last, T).await;
    let m = cluster.node(away).raft_metrics();
    assert!(
        m.snapshot.is_some_and(|s| s.index > 100),
        "no snapshot installed: {:?}",
        m.snapshot
    );
    assert_eq!(
        visible(&cluster.node(away).catalog()),
        visible(&cluster.node(leader).catalog())
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_are_added_promoted_and_removed() {
    let mut cluster = Cluster::start(3, |_| {}).await;
    let admin = cluster.admin().await;
    let w = admin
        .register_site(&spec("east", "eu", "eu-1a"))
        .await
        .unwrap();

    // A fourth node, not among the initial members: it must not initialize anything.
    let addr = support::free_addrs(1)[0];
    let tls = cluster
        .pki
        .issue(&format!("spiffe://{}/registry/4", support::TD), "node-4");
    let members = cluster.configs[&1].members();
    let config = meshbridge_registry::Config::for_test(
        4,
        addr,
        cluster.data.path().join("node-4"),
        tls,
        &members,
    );
    cluster.configs.insert(4, config);
    cluster.restart(4).await;

    let url = cluster.url(4);
    let reply = admin.add_learner(4, &url, true).await.unwrap();
    let learner = reply.members.iter().find(|m| m.node_id == 4).unwrap();
    assert!(!learner.voter);
    cluster.wait_revision(w.revision, T).await;
    assert_eq!(
        cluster.node(4).catalog().sites.len(),
        1,
        "learner replicated the catalog"
    );

    let reply = admin.promote(4).await.unwrap();
    let voters: BTreeSet<u64> = reply
        .members
        .iter()
        .filter(|m| m.voter)
        .map(|m| m.node_id)
        .collect();
    assert_eq!(voters, BTreeSet::from([1, 2, 3, 4]));

    let reply = admin.remove_member(2).await.unwrap();
    let ids: BTreeSet<u64> = reply.members.iter().map(|m| m.node_id).collect();
    assert_eq!(ids, BTreeSet::from([1, 3, 4]));
    let status = admin.status().await.unwrap();
    assert_eq!(status.members.len(), 3);

    // Promoting a node that is not a learner is refused, not hung.
    let err = admin.promote(9).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition), "{err}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_cluster_restarts_from_its_data_dirs() {
    let mut cluster = Cluster::start(3, |_| {}).await;
    let admin = cluster.admin().await;
    east_with_cart(&cluster, &admin).await;
    let before = visible(&cluster.node(1).catalog());
    for id in 1..=3 {
        let node = cluster.nodes.remove(&id).unwrap();
        node.shutdown().await;
    }
    // Initialization is not repeated: the nodes come back with their logs and elect.
    for id in [3, 2, 1] {
        cluster.restart(id).await;
    }
    cluster.wait_leader(T).await;
    let after = admin.catalog(Consistency::Linearizable).await.unwrap();
    assert_eq!(visible(&after), before);
    admin
        .put_export(&export("east", "cart", 2, &["10.0.0.2"]))
        .await
        .unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lowest_node_with_a_wiped_disk_rejoins_instead_of_forming_a_second_cluster() {
    let mut cluster = Cluster::start(3, |_| {}).await;
    let admin = cluster.admin().await;
    let w = admin
        .register_site(&spec("east", "eu", "eu-1a"))
        .await
        .unwrap();
    cluster.wait_revision(w.revision, T).await;
    cluster.kill(1).await;
    std::fs::remove_dir_all(&cluster.configs[&1].data_dir).unwrap();
    cluster.restart(1).await;
    // Node 1 finds the others in a cluster and does not initialize; the leader, which
    // still counts it as a member, brings it back up to date.
    cluster.wait_revision(w.revision, T).await;
    let leader = cluster.wait_leader(T).await;
    let terms: BTreeSet<u64> = cluster
        .nodes
        .values()
        .map(|n| n.raft_metrics().current_term)
        .collect();
    assert_eq!(terms.len(), 1, "nodes in different terms: {terms:?}");
    assert_eq!(
        visible(&cluster.node(1).catalog()),
        visible(&cluster.node(leader).catalog())
    );
    cluster.shutdown().await;
}

/// A follower's graceful stop ends the leader's AppendEntries stream to it instead of
/// waiting for it: the drain finishes well before a long deadline, and the other two carry
/// on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_drains_without_waiting_for_the_replication_stream() {
    let mut cluster = Cluster::start(3, |c| c.drain_deadline_ms = 60_000).await;
    let admin = cluster.admin().await;
    // Replicated everywhere: the leader's streams to both followers are open.
    east_with_cart(&cluster, &admin).await;
    let leader = cluster.wait_leader(T).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let node = cluster.nodes.remove(&follower).unwrap();
    let started = Instant::now();
    assert_eq!(
        node.shutdown().await,
        meshbridge_core::drain::Outcome::Graceful,
        "follower {follower} hit the 60 s drain deadline after {:?}",
        started.elapsed()
    );
    admin
        .put_export(&export("east", "cart", 2, &["10.0.0.2"]))
        .await
        .unwrap();
    cluster.shutdown().await;
}

/// Registers site "east" with one export, `cart` at 10.0.0.1, and waits until every node
/// has applied it.
async fn east_with_cart(cluster: &Cluster, admin: &RegistryClient) {
    admin
        .register_site(&spec("east", "eu", "eu-1a"))
        .await
        .unwrap();
    let w = admin
        .put_export(&export("east", "cart", 1, &["10.0.0.1"]))
        .await
        .unwrap();
    cluster.wait_revision(w.revision, T).await;
}

/// A learner that never answered the leader is not promoted: in a one-node registry the
/// promotion would have made writes wait for it for good (a joint configuration that needs
/// a node nobody runs). The refusal names the node and its URL, and writes go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_learner_that_never_answered_is_not_promoted() {
    let cluster = Cluster::start(1, |_| {}).await;
    let admin = cluster.admin().await;
    // Nothing listens at this address.
    let nowhere = format!("https://{}", support::free_addrs(1)[0]);
    // Waiting for it says that it never answered (it is a learner all the same).
    let err = admin.add_learner(5, &nowhere, true).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition), "{err}");
    assert!(
        err.to_string().contains("has not answered the leader"),
        "{err}"
    );
    assert!(admin.add_learner(6, &nowhere, false).await.is_ok());
    // Again at the same URL (a retried call): a no-op, not an error; elsewhere: refused.
    assert!(admin.add_learner(6, &nowhere, false).await.is_ok());
    let err = admin
        .add_learner(6, "https://127.0.0.1:9", false)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("node 6 is already a learner at"),
        "{err}"
    );

    let err = admin.promote(5).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("node 5") && text.contains(&nowhere) && text.contains("never answered"),
        "{text}"
    );
    // Writes go on, and the learner can be removed.
    let w = tokio::time::timeout(T, admin.register_site(&spec("east", "eu", "eu-1a")))
        .await
        .expect("writes stopped")
        .unwrap();
    assert!(w.changed);
    for id in [5, 6] {
        let reply = admin.remove_member(id).await.unwrap();
        assert!(reply.members.iter().all(|m| m.node_id != id));
    }

    // Adding a node id that is already a voter is refused, naming it.
    let err = admin.add_learner(1, &nowhere, true).await.unwrap_err();
    assert!(
        err.to_string().contains("node 1 is already a voter"),
        "{err}"
    );
    cluster.shutdown().await;
}
