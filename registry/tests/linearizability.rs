//! Linearizability of the registry: a concurrent put/get/delete history on a few keys,
//! recorded while the leader is killed and restarted and while it is partitioned away,
//! checked with the Wing–Gong/Lowe checker in `support::history`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use meshbridge_core::client::{ClientError, ClientOptions, Consistency, RegistryClient};
use meshbridge_core::model::{Policy, Principal, Rejection};
use rand::Rng;
use support::history::{Event, Op, Out, Recorder, check};
use support::{Cluster, key};

const KEYS: [&str; 3] = ["k0", "k1", "k2"];
const T: Duration = Duration::from_secs(20);

fn policy(name: &str, value: &str) -> Policy {
    Policy {
        name: name.into(),
        service: key("cart"),
        allow: vec![Principal::Site(value.into())],
    }
}

fn value_of(policies: &[Policy], name: &str) -> Option<String> {
    let p = policies.iter().find(|p| p.name == name)?;
    match p.allow.first() {
        Some(Principal::Site(v)) => Some(v.clone()),
        other => panic!("unexpected policy content {other:?}"),
    }
}

/// A write's outcome: acknowledged, or unknown when no node answered in time. A refusal
/// other than "not found" (for a delete) is a bug in the test or the registry.
fn write_outcome(r: Result<(), ClientError>, op: &Op) -> Out {
    match r {
        Ok(()) => Out::Done,
        Err(ClientError::Rejected(Rejection::NotFound { .. })) if *op == Op::Delete => Out::Done,
        Err(ClientError::Unavailable { .. }) => Out::Unknown,
        Err(e) => panic!("{op:?}: {e}"),
    }
}

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
                let r = client.put_policy(&policy(key, &value)).await.map(|_| ());
                let op = Op::Put(value);
                let out = write_outcome(r, &op);
                rec.record(id, key, op, call, out);
            }
            4..8 => {
                let out = match client.list_policies(Consistency::Linearizable).await {
                    Ok(v) => Out::Value(value_of(&v.value, key)),
                    Err(ClientError::Unavailable { .. }) => Out::Unknown,
                    Err(e) => panic!("get: {e}"),
                };
                rec.record(id, key, Op::Get, call, out);
            }
            _ => {
                let r = client.delete_policy(key).await.map(|_| ());
                let out = write_outcome(r, &Op::Delete);
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

mod checker {
    use super::*;

    fn ev(client: usize, op: Op, out: Out, call: u64, ret: Option<u64>) -> Event {
        Event {
            client,
            key: "k".into(),
            op,
            out,
            call,
            ret,
        }
    }

    fn put(v: &str) -> Op {
        Op::Put(v.into())
    }

    fn got(v: Option<&str>) -> Out {
        Out::Value(v.map(str::to_owned))
    }

    #[test]
    fn checker_accepts_overlapping_writes_in_either_order() {
        let h = vec![
            ev(0, put("a"), Out::Done, 0, Some(10)),
            ev(1, put("b"), Out::Done, 1, Some(11)),
            ev(2, Op::Get, got(Some("a")), 12, Some(13)),
            ev(2, Op::Get, got(Some("a")), 14, Some(15)),
        ];
        assert!(check(&h).is_ok());
    }

    #[test]
    fn checker_refuses_a_stale_read_after_a_completed_write() {
        let h = vec![
            ev(0, put("a"), Out::Done, 0, Some(1)),
            ev(0, put("b"), Out::Done, 2, Some(3)),
            ev(1, Op::Get, got(Some("a")), 4, Some(5)),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn checker_refuses_a_value_that_comes_back() {
        let h = vec![
            ev(0, put("a"), Out::Done, 0, Some(100)),
            ev(1, put("b"), Out::Done, 1, Some(2)),
            ev(2, Op::Get, got(Some("a")), 3, Some(4)),
            ev(2, Op::Get, got(Some("b")), 5, Some(6)),
            ev(2, Op::Get, got(Some("a")), 7, Some(8)),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn checker_unknown_writes_may_or_may_not_have_happened() {
        let happened = vec![
            ev(0, put("a"), Out::Unknown, 0, None),
            ev(1, Op::Get, got(Some("a")), 5, Some(6)),
        ];
        assert!(check(&happened).is_ok());
        let never = vec![
            ev(0, put("a"), Out::Unknown, 0, None),
            ev(1, Op::Get, got(None), 5, Some(6)),
        ];
        assert!(check(&never).is_ok());
        let before_call = vec![
            ev(1, Op::Get, got(Some("a")), 0, Some(1)),
            ev(0, put("a"), Out::Unknown, 5, None),
        ];
        assert!(check(&before_call).is_err());
    }

    #[test]
    fn checker_deletes_and_absent_reads() {
        let h = vec![
            ev(0, put("a"), Out::Done, 0, Some(1)),
            ev(0, Op::Delete, Out::Done, 2, Some(3)),
            ev(1, Op::Get, got(None), 4, Some(5)),
            ev(1, Op::Delete, Out::Done, 6, Some(7)),
        ];
        assert!(check(&h).is_ok());
        let resurrected = vec![
            ev(0, put("a"), Out::Done, 0, Some(1)),
            ev(0, Op::Delete, Out::Done, 2, Some(3)),
            ev(1, Op::Get, got(Some("a")), 4, Some(5)),
        ];
        assert!(check(&resurrected).is_err());
    }
}
