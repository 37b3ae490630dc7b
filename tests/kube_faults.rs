//! The kube adapter under faults, against a real kube-apiserver: two replicas and a
//! SIGKILLed leader, an API server SIGKILLed and restarted, and a watch that must re-list
//! after `410 Gone`.

#![allow(clippy::unwrap_used)]

#[path = "kube/env.rs"]
mod env;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use env::*;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams};
use meshbridge_federation::kube::crd::ServiceExport;
use meshbridge_testkit::fault::{Mode, TcpFault};
use meshbridge_testkit::kube::ApiServerOptions;

const WITHIN: Duration = Duration::from_secs(30);

async fn holder(client: &kube::Client) -> Option<String> {
    let lease = Api::<Lease>::namespaced(client.clone(), "meshbridge")
        .get_opt("meshbridge-kube-adapter")
        .await
        .ok()??;
    lease.spec?.holder_identity
}

async fn leader_gauge(admin: std::net::SocketAddr) -> Option<i64> {
    let text = meshbridge_testkit::http::get(admin, "/metrics").await?;
    text.lines()
        .find(|l| l.starts_with("meshbridge_kube_leader "))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_writer_and_the_standby_takes_over_when_the_leader_is_killed() -> Result<()>
{
    let env = Env::start(&["east"], ApiServerOptions::default()).await?;
    let east = env.admin("east").clone();
    let kc = env.clusters["east"].api.kubeconfig("admin")?;
    let (mut a, a_admin) = env.adapter_with("east", "east-a", &kc).await?;
    // `a` holds the Lease before `b` starts, so the roles are known.
    let deadline = Instant::now() + WITHIN;
    while holder(&east).await.as_deref() != Some("east-a") {
        assert!(Instant::now() < deadline, "east-a never took the lease");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut b, b_admin) = env.adapter_with("east", "east-b", &kc).await?;
    export_service(&east, "web", &["10.1.0.1"]).await?;
    env.until_catalog("web exported", WITHIN, |c| {
        exported(c, "east", "web").is_some()
    })
    .await?;
    assert_eq!(leader_gauge(a_admin).await, Some(1));
    assert_eq!(leader_gauge(b_admin).await, Some(0));
    let b_log = b.collect().join("\n");
    assert!(
        !b_log.contains("adopted the site's exports") && !b_log.contains("export updated"),
        "the standby wrote:\n{b_log}"
    );

    // SIGKILL the leader: no release; the standby must wait the lease out, then lead.
    let killed = Instant::now();
    a.kill9().await;
    let deadline = Instant::now() + WITHIN;
    while holder(&east).await.as_deref() != Some("east-b") {
        assert!(
            Instant::now() < deadline,
            "east-b did not take over; log:\n{}",
            b.collect().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = killed.elapsed();
    println!("standby took over {took:?} after the leader was killed (lease 3 s)");
    assert!(
        took >= Duration::from_millis(2_500),
        "took over before the lease ran out: {took:?}"
    );
    // The new leader writes: a change made after the kill reaches the registry.
    add_slice(
        &east.clone(),
        "web",
        "web-2",
        &[("10.1.0.2", Some(true), None, None, None)],
        &[("http", 8080)],
    )
    .await?;
    env.until_catalog("web scaled by the new leader", WITHIN, |c| {
        exported(c, "east", "web").is_some_and(|v| v.len() == 2)
    })
    .await?;
    assert_eq!(leader_gauge(b_admin).await, Some(1));
    b.terminate(Duration::from_secs(5)).await;
    env.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adapter_recovers_when_the_api_server_is_killed_and_restarted() -> Result<()> {
    let mut env = Env::start(&["east"], ApiServerOptions::default()).await?;
    let mut a = env.adapter("east", "east-0").await?;
    export_service(env.admin("east"), "web", &["10.1.0.1"]).await?;
    env.until_catalog("web exported", WITHIN, |c| {
        exported(c, "east", "web").is_some()
    })
    .await?;

    let cluster = env.clusters.get_mut("east").context("east")?;
    cluster.api.kill().await;
    cluster.api.restart().await?;
    cluster.admin = cluster.api.client("admin").await?;
    let east = cluster.admin.clone();
    // Changes made after the restart reach the registry: the watches came back.
    export_service(&east, "api", &["10.1.0.7"]).await?;
    Api::<ServiceExport>::namespaced(east.clone(), "shop")
        .delete("web", &DeleteParams::default())
        .await?;
    env.until_catalog(
        "api exported and web withdrawn after the restart",
        WITHIN,
        |c| exported(c, "east", "api").is_some() && exported(c, "east", "web").is_none(),
    )
    .await
    .with_context(|| a.collect().join("\n"))?;
    a.terminate(Duration::from_secs(5)).await;
    env.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_that_gets_410_gone_relists_without_losing_or_duplicating() -> Result<()> {
    // Watch cache off: watches are served from etcd, so a compaction shows as 410 Gone.
    let opts = ApiServerOptions {
        no_watch_cache: true,
        ..Default::default()
    };
    let env = Env::start(&["east"], opts).await?;
    let east = env.admin("east").clone();
    let api = &env.clusters["east"].api;
    let proxy = TcpFault::start(format!("127.0.0.1:{}", api.port).parse()?).await?;
    let kc = api.kubeconfig_at(
        "admin",
        &format!("https://{}", proxy.addr()),
        "kubeconfig-proxied",
    )?;
    let (mut a, a_admin) = env.adapter_with("east", "east-0", &kc).await?;
    export_service(&east, "web", &["10.1.0.1"]).await?;
    export_service(&east, "old", &["10.1.0.5"]).await?;
    env.until_catalog("web and old exported", WITHIN, |c| {
        exported(c, "east", "web").is_some() && exported(c, "east", "old").is_some()
    })
    .await?;

    // Cut the adapter off, change things behind its back, compact etcd past them.
    proxy.set(Mode::Reset);
    add_slice(
        &east,
        "web",
        "web-2",
        &[("10.1.0.2", Some(true), None, None, None)],
        &[("http", 8080)],
    )
    .await?;
    Api::<ServiceExport>::namespaced(east.clone(), "shop")
        .delete("old", &DeleteParams::default())
        .await?;
    export_service(&east, "new", &["10.1.0.9"]).await?;
    let rev = env.etcd.compact().await?;
    println!("etcd compacted at revision {rev}");
    proxy.set(Mode::Pass);

    env.until_catalog("the changes made while cut off", WITHIN, |c| {
        exported(c, "east", "web").as_deref()
            == Some(&["10.1.0.1".to_string(), "10.1.0.2".to_string()][..])
            && exported(c, "east", "old").is_none()
            && exported(c, "east", "new").as_deref() == Some(&["10.1.0.9".to_string()][..])
    })
    .await
    .with_context(|| a.collect().join("\n"))?;
    let log = a.collect().join("\n");
    assert!(
        log.contains("watch expired (410 Gone); listing again"),
        "the adapter never saw 410 Gone; log:\n{log}"
    );
    let relists = meshbridge_testkit::http::get(a_admin, "/metrics")
        .await
        .unwrap_or_default();
    assert!(
        relists
            .lines()
            .any(|l| l.starts_with("meshbridge_kube_relists_total ") && !l.ends_with(" 0")),
        "{relists}"
    );
    a.terminate(Duration::from_secs(5)).await;
    env.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_of_one_site_both_register_and_a_killed_one_leaves_after_its_lease()
-> Result<()> {
    let env = Env::start(&["east"], ApiServerOptions::default()).await?;
    let mut second = start_gateway(
        &env.pki,
        &env.registry_urls,
        "east",
        "gw-east-1",
        "127.0.0.1",
    )
    .await?;
    env.until_catalog("both gateways of east registered", WITHIN, |c| {
        c.sites
            .get("east")
            .is_some_and(|s| s.instances.len() == 2 && s.gateways.len() == 2)
    })
    .await?;
    // `ctl status` shows each gateway of the site.
    let out = tokio::process::Command::new(exe())
        .args(["ctl", "--registry", &env.registry_url, "--tls-dir"])
        .arg(env.root.join("ctl"))
        .args(["status", "-o", "json"])
        .output()
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stderr).to_string())?;
    let east = v["sites"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "east"))
        .cloned()
        .unwrap_or_default();
    let names: Vec<&str> = east["instances"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, vec!["gw-east-0", "gw-east-1"], "{east:#}");

    // SIGKILL one: after one lease (3 s) its address leaves; the site stays fresh.
    let gone = env.catalog.borrow().sites["east"].instances[1]
        .gateways
        .clone();
    second.kill9().await;
    let took = env
        .until_catalog("the killed gateway dropped from east", WITHIN, |c| {
            c.sites.get("east").is_some_and(|s| {
                s.instances.len() == 1
                    && !s.gateways.iter().any(|g| gone.contains(g))
                    && s.state == meshbridge_core::model::SiteState::Fresh
            })
        })
        .await?;
    println!("killed gateway left the site {took:?} after SIGKILL (lease 3 s)");
    env.stop().await;
    Ok(())
}
