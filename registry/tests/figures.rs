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
    admin
        .put_export(&export("east", "seq", 10_000, &["10.0.0.1"]))
        .await
        .unwrap();
    println!(
        "leader kill to first acknowledged write: {:?} (of which stopping the node in-process: {killed:?})",
        t.elapsed()
    );
    cluster.shutdown().await;
}
