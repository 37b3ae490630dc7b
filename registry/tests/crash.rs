//! Crash safety of the write path with early appends: a leader that sent an entry early and
//! crashed before its own fsync must not come back and give the same log id to another
//! entry (Raft's Log Matching property).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meshbridge_core::model::{Command, Policy, Principal};
use meshbridge_registry::types::{Entry, NodeId};
use openraft::RaftLogReader;
use support::{Cluster, key, metric, metrics, visible};

const T: Duration = Duration::from_secs(30);

fn policy(name: &str) -> Policy {
    Policy {
        name: name.into(),
        service: key("cart"),
        allow: vec![Principal::Site(name.into())],
    }
}

/// Polls `f` every 10 ms until it is true; panics with `what` after `timeout`.
async fn until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every node's durable log entry at `index`, read from its data directory.
async fn entries_at(cluster: &Cluster, index: u64) -> BTreeMap<NodeId, Option<Entry>> {
    let mut out = BTreeMap::new();
    for (id, config) in &cluster.configs {
        // The stopped node's last references to the file may take a moment to go.
        let deadline = Instant::now() + Duration::from_secs(5);
        let (mut log, _sm) = loop {
            let dir = config.data_dir.clone();
            match tokio::task::spawn_blocking(move || meshbridge_registry::store::open(dir))
                .await
                .unwrap()
            {
                Ok(store) => break store,
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!(error = %e, "store still open; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("open node {id}'s store: {e}"),
            }
        };
        let entries = log.try_get_log_entries(index..=index).await.unwrap();
        out.insert(*id, entries.into_iter().next());
    }
    out
}

/// The leader holds its log writer (a stalled disk), proposes X, which goes to both
/// followers early and is persisted there; the leader crashes before its own fsync and
/// restarts at once. It must not resume leadership of the same term and give X's log id to
/// the next write Y: every node must end with the same entry at that index and the same
/// catalog.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarted_leader_does_not_reuse_an_early_appended_log_id() {
    // Slow elections: the crashed leader is back long before a follower would campaign, as
    // in a quick process restart. (While its writer is held, openraft's core waits for the
    // flush and sends no heartbeats.)
    let mut cluster = Cluster::start(3, |c| {
        c.raft.election_timeout_min_ms = 2_000;
        c.raft.election_timeout_max_ms = 3_000;
    })
    .await;
    let admin = cluster.admin().await;
    admin.put_policy(&policy("base")).await.unwrap();
    let leader = cluster.wait_leader(T).await;
    let rev = cluster.node(leader).catalog().revision;
    cluster.wait_revision(rev, T).await;
    // Everything committed everywhere: the next lone write goes early.
    let m = cluster.node(leader).raft_metrics();
    let term = m.current_term;
    let last = m.last_log_index.expect("a log");
    until("every node to hold the whole log", T, || {
        cluster
            .nodes
            .values()
            .all(|n| n.raft_metrics().last_log_index == Some(last))
    })
    .await;
    let followers: Vec<NodeId> = cluster
        .nodes
        .keys()
        .copied()
        .filter(|id| *id != leader)
        .collect();
    let early_before = {
        let text = metrics(cluster.node(leader).admin_addr()).await;
        followers
            .iter()
            .map(|p| {
                metric(
                    &text,
                    &format!("meshbridge_registry_early_appends_total{{peer=\"{p}\"}}"),
                )
                .unwrap_or(0.0)
            })
            .collect::<Vec<_>>()
    };

    // X: proposed on the leader while its disk stalls; nobody retries it.
    cluster.node(leader).hold_log_writes();
    let raft = cluster.node(leader).raft().clone();
    let x = tokio::spawn(async move {
        raft.client_write(
            Command::PutPolicy {
                policy: policy("x"),
            }
            .into(),
        )
        .await
    });
    until("both followers to hold X", T, || {
        followers
            .iter()
            .all(|f| cluster.node(*f).raft_metrics().last_log_index == Some(last + 1))
    })
    .await;
    assert!(
        cluster.node(leader).log_write_held(),
        "the leader's write of X is held"
    );
    let text = metrics(cluster.node(leader).admin_addr()).await;
    for (p, before) in followers.iter().zip(&early_before) {
        let now = metric(
            &text,
            &format!("meshbridge_registry_early_appends_total{{peer=\"{p}\"}}"),
        )
        .unwrap_or(0.0);
        assert!(
            now > *before,
            "X went to node {p} early ({before} -> {now})"
        );
    }

    // Crash before the leader's fsync, restart at once from the same data directory.
    cluster.kill(leader).await;
    assert!(
        x.await.unwrap().is_err(),
        "X was never acknowledged by the crashed leader"
    );
    cluster.restart(leader).await;
    // Whom the restarted node follows (or leads) first, and in which term.
    until("the restarted node to know a leader", T, || {
        cluster.node(leader).raft_metrics().current_leader.is_some()
    })
    .await;
    let back = cluster.node(leader).raft_metrics();
    let same_term_leader = back.current_leader == Some(leader) && back.current_term == term;
    println!(
        "restarted node {leader}: term {} (was {term}), leader {:?}, last index {:?} (followers hold {})",
        back.current_term,
        back.current_leader,
        back.last_log_index,
        last + 1
    );

    // Y: the next write, through whichever leader there is now.
    admin.put_policy(&policy("y")).await.unwrap();
    let now_leader = cluster.wait_leader(T).await;
    let rev = cluster.node(now_leader).catalog().revision;
    cluster.wait_revision(rev, T).await;
    let catalogs: BTreeMap<NodeId, _> = cluster
        .nodes
        .iter()
        .map(|(id, n)| (*id, visible(&n.catalog())))
        .collect();
    // Stop every node but keep the data directories, then read the logs from disk.
    for (_, node) in std::mem::take(&mut cluster.nodes) {
        node.shutdown().await;
    }
    let at = entries_at(&cluster, last + 1).await;
    // The whole entry, payload included (its Debug form does not show the payload).
    let describe = |e: &Option<Entry>| serde_json::to_string(e).unwrap();
    for (id, e) in &at {
        println!("node {id} at index {}: {}", last + 1, describe(e));
    }

    assert!(
        !same_term_leader,
        "node {leader} came back as leader of its old term {term} with last index {:?}, \
         one behind the followers' early-appended X",
        back.last_log_index
    );
    let first = describe(&at[&1]);
    assert!(
        at[&1].is_some(),
        "node 1 has an entry at index {}",
        last + 1
    );
    for (id, e) in &at {
        assert_eq!(
            describe(e),
            first,
            "node {id}'s entry at index {} differs from node 1's",
            last + 1
        );
    }
    let one = &catalogs[&1];
    for (id, c) in &catalogs {
        assert_eq!(c, one, "node {id}'s catalog differs from node 1's");
    }
    let policies: Vec<&str> = one.policies.keys().map(String::as_str).collect();
    assert!(policies.contains(&"y"), "Y applied: {policies:?}");
}
