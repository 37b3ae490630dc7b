//! Watch streams: every revision in order, across a leader change and a reconnect to
//! another node; a watcher far behind compaction gets a reset and then the right state;
//! the client's replica follows all of it and never goes backwards.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use meshbridge_core::client::{Consistency, apply_changes};
use meshbridge_core::model::{Catalog, Change};
use meshbridge_core::proto::{self, watch_event::Event};
use meshbridge_registry::types::NodeId;
use support::{Cluster, export, spec, visible};
use tokio::sync::watch;
use tonic::Streaming;

const T: Duration = Duration::from_secs(20);

/// A watcher that checks the stream contract while it applies it.
struct Recorder {
    catalog: Catalog,
    resets: Vec<u64>,
    deltas: usize,
}

impl Recorder {
    fn new() -> Self {
        Self {
            catalog: Catalog::default(),
            resets: Vec::new(),
            deltas: 0,
        }
    }

    fn apply(&mut self, event: Event) {
        match event {
            Event::Reset(r) => {
                assert!(r.revision >= self.catalog.revision, "reset went backwards");
                self.catalog = serde_json::from_slice(&r.catalog_json).unwrap();
                assert_eq!(self.catalog.revision, r.revision);
                self.resets.push(r.revision);
            }
            Event::Delta(d) => {
                assert_eq!(
                    d.revision,
                    self.catalog.revision + 1,
                    "gap or reorder in the stream"
                );
                let changes: Vec<Change> = serde_json::from_slice(&d.changes_json).unwrap();
                assert!(!changes.is_empty());
                apply_changes(&mut self.catalog, d.revision, &changes);
                self.deltas += 1;
            }
        }
    }

    /// Applies events until the stream breaks or `until` says stop.
    async fn follow(
        &mut self,
        stream: &mut Streaming<proto::WatchEvent>,
        until: impl Fn(&Catalog) -> bool,
    ) -> bool {
        while !until(&self.catalog) {
            match stream.message().await {
                Ok(Some(proto::WatchEvent { event: Some(e) })) => self.apply(e),
                Ok(_) | Err(_) => return false,
            }
        }
        true
    }
}

async fn open(cluster: &Cluster, node: NodeId, from: u64) -> Streaming<proto::WatchEvent> {
    cluster.admin_of(node).await.watch(from).await.unwrap()
}

/// Records every revision the replica publishes (it must never go backwards) until `stop`.
fn record_replica(
    mut rx: watch::Receiver<Arc<Catalog>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<u64>> {
    tokio::spawn(async move {
        let mut seen = vec![rx.borrow().revision];
        while !stop.load(Ordering::Relaxed) {
            if tokio::time::timeout(Duration::from_millis(100), rx.changed())
                .await
                .is_err()
            {
                continue;
            }
            let r = rx.borrow_and_update().revision;
            assert!(
                r >= *seen.last().unwrap(),
                "replica went backwards: {seen:?} then {r}"
            );
            seen.push(r);
        }
        seen
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watcher_sees_every_revision_in_order_across_a_leader_change_and_a_reconnect() {
    let mut cluster = Cluster::start(3, |_| {}).await;
    let admin = cluster.admin().await;
    admin
        .register_site(&spec("east", "eu", "eu-1a"))
        .await
        .unwrap();
    let replica = admin.clone().watch_catalog();
    let stop = Arc::new(AtomicBool::new(false));
    let replica_log = record_replica(replica.clone(), stop.clone());

    let writer = {
        let (admin, stop) = (admin.clone(), stop.clone());
        tokio::spawn(async move {
            let mut g = 0;
            while !stop.load(Ordering::Relaxed) {
                g += 1;
                admin
                    .put_export(&export("east", &format!("s{}", g % 5), g, &["10.0.0.1"]))
                    .await
                    .unwrap();
            }
        })
    };

    let leader = cluster.wait_leader(T).await;
    let watched = (1..=3).find(|id| *id != leader).unwrap();
    let mut rec = Recorder::new();
    let mut stream = open(&cluster, watched, 0).await;
    let r0 = admin.catalog(Consistency::Stale).await.unwrap().revision;
    assert!(rec.follow(&mut stream, |c| c.revision >= r0 + 5).await);

    // The leader goes: the stream from a follower carries on through the election.
    cluster.kill(leader).await;
    cluster.wait_leader(T).await;
    let r1 = admin
        .catalog(Consistency::Linearizable)
        .await
        .unwrap()
        .revision;
    assert!(rec.follow(&mut stream, |c| c.revision >= r1 + 5).await);
    cluster.restart(leader).await;

    // The watched node goes: resume from the last revision on another node, no reset.
    let before = rec.catalog.revision;
    cluster.kill(watched).await;
    assert!(
        !rec.follow(&mut stream, |_| false).await,
        "stream outlived its node"
    );
    let other = (1..=3).find(|id| *id != watched).unwrap();
    let mut stream = open(&cluster, other, rec.catalog.revision).await;
    let r2 = admin
        .catalog(Consistency::Linearizable)
        .await
        .unwrap()
        .revision;
    assert!(rec.follow(&mut stream, |c| c.revision >= r2 + 5).await);
    assert_eq!(
        rec.resets,
        [rec.resets[0]],
        "a resumable watcher got a reset"
    );
    assert!(rec.catalog.revision > before);

    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    cluster.restart(watched).await;
    let last = admin.catalog(Consistency::Linearizable).await.unwrap();
    assert!(
        rec.follow(&mut stream, |c| c.revision >= last.revision)
            .await
    );
    assert_eq!(visible(&rec.catalog), visible(&last));

    // The client replica went through the same node losses and lands on the same state.
    let mut rx = replica;
    tokio::time::timeout(T, rx.wait_for(|c| c.revision >= last.revision))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(visible(&rx.borrow()), visible(&last));
    let seen = replica_log.await.unwrap();
    assert!(seen.len() > 2);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watcher_far_behind_compaction_gets_a_reset_and_then_the_right_state() {
    let cluster = Cluster::start(3, |c| c.raft.watch_history = 20).await;
    let admin = cluster.admin().await;
    admin
        .register_site(&spec("east", "eu", "eu-1a"))
        .await
        .unwrap();
    for g in 1..=5 {
        admin
            .put_export(&export("east", "cart", g, &["10.0.0.1"]))
            .await
            .unwrap();
    }
    let leader = cluster.wait_leader(T).await;
    let mut rec = Recorder::new();
    let mut stream = open(&cluster, leader, 0).await;
    let behind = admin.catalog(Consistency::Linearizable).await.unwrap();
    assert!(
        rec.follow(&mut stream, |c| c.revision >= behind.revision)
            .await
    );
    drop(stream);
    let stale_copy = Arc::new(rec.catalog.clone());

    // Far more revisions than the nodes keep, including removals the watcher must learn.
    for g in 6..=60 {
        admin
            .put_export(&export("east", &format!("svc-{}", g % 9), g, &["10.0.0.2"]))
            .await
            .unwrap();
    }
    admin
        .delete_export("east", &support::key("cart"), 100)
        .await
        .unwrap();
    let now = admin.catalog(Consistency::Linearizable).await.unwrap();
    cluster.wait_revision(now.revision, T).await;

    for id in 1..=3 {
        let mut rec = Recorder {
            catalog: (*stale_copy).clone(),
            resets: vec![],
            deltas: 0,
        };
        let mut stream = open(&cluster, id, stale_copy.revision).await;
        assert!(
            rec.follow(&mut stream, |c| c.revision >= now.revision)
                .await
        );
        assert_eq!(
            rec.resets.len(),
            1,
            "node {id}: expected one reset, got {:?}",
            rec.resets
        );
        assert!(rec.resets[0] > stale_copy.revision + 20);
        assert_eq!(visible(&rec.catalog), visible(&now), "node {id}");
    }

    // The client replica started from the stale copy (as after a restart) catches up too.
    let mut rx = admin.clone().watch_catalog_from(stale_copy);
    tokio::time::timeout(T, rx.wait_for(|c| c.revision >= now.revision))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(visible(&rx.borrow()), visible(&now));
    assert!(rx.borrow().export(&support::key("cart"), "east").is_none());
    cluster.shutdown().await;
}
