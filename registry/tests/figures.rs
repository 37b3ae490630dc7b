//! Rough figures of an in-process 3-node cluster on loopback (fsync on): sequential write
//! latency, concurrent write throughput, linearizable read throughput, leader kill to first
//! write. Ignored by default; run with
//! `cargo test -p meshbridge-registry --release --test figures -- --ignored --nocapture`.
//! The benchmark against etcd lives in `bench/`; these are for a quick look.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use meshbridge_core::client::Consistency;
use support::{Cluster, export, spec};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a check"]
async fn figures() {
    let mut cluster = Cluster::start(3, |_| {}).await;
    let admin = cluster.admin().await;
    admin
        .register_site(&spec("east", "eu", "eu-1a"))
        .await
        .unwrap();

    let mut lat = Vec::new();
    for g in 1..=300 {
        let t = Instant::now();
        admin
            .put_export(&export("east", "seq", g, &["10.0.0.1"]))
            .await
            .unwrap();
        lat.push(t.elapsed());
    }
    lat.sort();
    println!(
        "sequential put, 1 client: p50 {:?} p99 {:?}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );

    for clients in [16, 64usize] {
        let t = Instant::now();
        let per = 2_000 / clients;
        let mut tasks = Vec::new();
        for c in 0..clients {
            let admin = admin.clone();
            tasks.push(tokio::spawn(async move {
                for g in 1..=per {
                    admin
                        .put_export(&export(
                            "east",
                            &format!("c{clients}-{c}"),
                            g as u64,
                            &["10.0.0.1"],
                        ))
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let n = per * clients;
        println!(
            "{clients} clients: {:.0} puts/s",
            n as f64 / t.elapsed().as_secs_f64()
        );
    }

    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let admin = admin.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..100 {
                admin
                    .get_service(&support::key("seq"), Consistency::Linearizable)
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    println!(
        "linearizable get, 16 clients: {:.0}/s",
        1600.0 / t.elapsed().as_secs_f64()
    );

    let leader = cluster.wait_leader(Duration::from_secs(5)).await;
    // Warm the client onto the leader, as a steady writer would be.
    admin
        .put_export(&export("east", "seq", 9_999, &["10.0.0.1"]))
        .await
        .unwrap();
    let t = Instant::now();
    cluster.kill(leader).await;
    let killed = t.elapsed();
    let write = {
        let admin = admin.clone();
        tokio::spawn(async move {
            admin
                .put_export(&export("east", "seq", 10_000, &["10.0.0.1"]))
                .await
                .unwrap();
            t.elapsed()
        })
    };
    cluster.wait_leader(Duration::from_secs(10)).await;
    let elected = t.elapsed();
    let written = write.await.unwrap();
    println!(
        "leader kill to first acknowledged write: {written:?} (new leader after {elected:?}; \
         stopping the node in-process took {killed:?})"
    );
    cluster.shutdown().await;
}

/// The cost of a catalog at the scale (100 sites × 1,000 services × 10 endpoints):
/// a copy (what an apply batch pays while watchers hold the previous catalog), a watch
/// reset's JSON, and the memory of the JSON.
#[test]
#[ignore = "measurement, not a check"]
fn catalog_scale() {
    use meshbridge_core::model::{Catalog, Command};

    let mut catalog = Catalog::default();
    for s in 0..100 {
        let site = format!("site-{s}");
        let register = Command::RegisterSite {
            spec: spec(&site, "eu", "eu-1a"),
            at_ms: 1,
        };
        catalog.apply(&register).unwrap();
        for svc in 0..1_000 {
            let addrs: Vec<String> = (0..10)
                .map(|e| format!("10.{}.{}.{}", s, svc % 250, e + 1 + (svc / 250) * 10))
                .collect();
            let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
            let put = Command::PutExport {
                export: export(&site, &format!("svc-{svc}"), 1, &addrs),
            };
            catalog.apply(&put).unwrap();
        }
    }
    let t = Instant::now();
    let copy = catalog.clone();
    println!("100k exports, 1M endpoints: clone {:?}", t.elapsed());
    drop(copy);
    let t = Instant::now();
    let json = serde_json::to_vec(&catalog).unwrap();
    println!(
        "reset JSON: {} MiB in {:?}",
        json.len() / (1024 * 1024),
        t.elapsed()
    );
    let t = Instant::now();
    let back: Catalog = serde_json::from_slice(&json).unwrap();
    println!("reset decode: {:?}", t.elapsed());
    assert_eq!(back.exports.len(), 100_000);
}

/// Applying single-command batches to the state machine at the scale: the cost a
/// write pays in `apply` (it should not grow with the catalog).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a check"]
async fn apply_at_scale() {
    use meshbridge_core::model::Command;
    use meshbridge_registry::types::{Entry, EntryPayload};
    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, LogId};

    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = meshbridge_registry::store::open(dir.path()).unwrap();
    let mut index = 0;
    let mut entry = |command: Command| {
        index += 1;
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(command.into()),
        }
    };
    for s in 0..100 {
        let site = format!("site-{s}");
        let mut batch = vec![entry(Command::RegisterSite {
            spec: spec(&site, "eu", "eu-1a"),
            at_ms: 1,
        })];
        for svc in 0..1_000 {
            let addrs: Vec<String> = (0..10)
                .map(|e| format!("10.{}.{}.{}", s, svc % 250, e + 1 + (svc / 250) * 10))
                .collect();
            let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
            batch.push(entry(Command::PutExport {
                export: export(&site, &format!("svc-{svc}"), 1, &addrs),
            }));
        }
        sm.apply(batch).await.unwrap();
    }
    let t = Instant::now();
    for g in 2..=201 {
        let put = Command::PutExport {
            export: export("site-1", "svc-1", g, &["10.99.0.1"]),
        };
        sm.apply([entry(put)]).await.unwrap();
    }
    println!(
        "1M endpoints: one-write apply batch {:?} on average",
        t.elapsed() / 200
    );
}
