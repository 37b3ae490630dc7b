//! Linearizability of the registry: a concurrent put/get/delete history on a few keys,
//! recorded while the leader is killed and restarted and while it is partitioned away,
//! checked with the Wing–Gong/Lowe checker in `support::history`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use meshbridge_core::client::{ClientError, ClientOptions, Consistency, RegistryClient};
use rand::Rng;
use support::Cluster;
use support::history::{Event, Op, Out, Recorder, check, policies};

const KEYS: [&str; 3] = ["k0", "k1", "k2"];
const T: Duration = Duration::from_secs(20);

async fn run_client(id: usize, client: RegistryClient, rec: Arc<Recorder>, stop: Arc<AtomicBool>) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let (key, roll, pause) = {
            let mut rng = rand::rng();
            (
                KEYS[rng.random_range(0..KEYS.len())],
                rng.random_range(0..10),
                rng.random_range(0..6),
            )
        };
        let call = rec.now();
        match roll {
            0..4 => {
                n += 1;
                let value = format!("c{id}-{n}");
                let r = client
                    .put_policy(&policies::put(key, &value))
                    .await
                    .map(|_| ());
                let op = Op::Put(value);
                let out = policies::write_outcome(r, &op);
                rec.record(id, key, op, call, out);
            }
            4..8 => {
                let out = match client.list_policies(Consistency::Linearizable).await {
                    Ok(v) => Out::Value(policies::value_of(&v.value, key)),
                    Err(ClientError::Unavailable { .. }) => Out::Unknown,
                    Err(e) => panic!("get: {e}"),
                };
                rec.record(id, key, Op::Get, call, out);
            }
            _ => {
                let r = client.delete_policy(key).await.map(|_| ());
                let out = policies::write_outcome(r, &Op::Delete);
                rec.record(id, key, Op::Delete, call, out);
            }
        }
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn put_get_delete_history_is_linearizable_under_leader_kills_and_partitions() {
    let mut cluster = Cluster::start_with_links(3, |_| {}).await;
    let rec = Arc::new(Recorder::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for id in 0..5 {
        let opts = ClientOptions {
            attempt_timeout: Duration::from_secs(1),
            retry_deadline: Duration::from_secs(4),
            ..ClientOptions::default()
        };
        let client = RegistryClient::with_options(&cluster.urls(), cluster.pki.ctl(), opts)
            .await
            .unwrap();
        clients.push(tokio::spawn(run_client(
            id,
            client,
            rec.clone(),
            stop.clone(),
        )));
    }

    for round in 0..2 {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let leader = cluster.wait_leader(T).await;
        tracing::warn!(round, leader, "nemesis: kill the leader");
        cluster.kill(leader).await;
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        cluster.restart(leader).await;
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let leader = cluster.wait_leader(T).await;
        tracing::warn!(round, leader, "nemesis: partition the leader away");
        let links = cluster.links.as_ref().unwrap();
        links.isolate(leader);
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        links.heal();
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }

    let events: Vec<Event> = rec.events();
    let done = events.iter().filter(|e| e.out != Out::Unknown).count();
    let unknown = events.len() - done;
    println!(
        "history: {} operations, {done} answered, {unknown} unknown",
        events.len()
    );
    assert!(done > 200, "too few operations completed: {done}");
    if let Err(e) = check(&events) {
        panic!("{e}");
    }
    cluster.shutdown().await;
}
