//! Watch streams served from the node's [`Feed`](crate::store::Feed).
//!
//! A stream starts with a reset (the whole catalog) when the watcher asks from revision 0,
//! or when the node no longer keeps the deltas after the asked revision (compaction, or a
//! snapshot installed on this node); otherwise it starts with the deltas after the asked
//! revision. Then every revision follows in order, without gaps: the stream reads the
//! feed's ring from the last revision it sent, so a burst of applies between two wake-ups
//! loses nothing. A watcher too slow for the ring gets a new reset.
//!
//! A node that loses touch with the cluster (partitioned away: see
//! [`Shared::in_touch`]) ends its streams with `Unavailable` after `detach_after`, so a
//! watcher is never left silently on a replica that stopped moving: it reconnects to
//! another node, from its last revision.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use meshbridge_core::proto::{self, watch_event::Event};
use tokio::sync::mpsc;
use tonic::Status;

use crate::error::ApiError;
use crate::shared::{Shared, WatchSlot};

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<proto::WatchEvent, Status>> + Send>>;

/// A watch stream from revision `from` (0: start with a reset). The stream ends when the
/// watcher goes away or the node shuts down; `slot` (the caller's quota) is held until then.
pub fn watch_stream(shared: Arc<Shared>, from: u64, slot: WatchSlot) -> WatchStream {
    let (tx, rx) = mpsc::channel(32);
    tokio::spawn(async move {
        let _slot = slot;
        serve(shared, from, tx).await;
    });
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (e, rx))
    }))
}

/// Counts an open stream in the `watchers` gauge.
struct Open(Arc<Shared>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.metrics.watchers.dec();
    }
}

type Tx = mpsc::Sender<Result<proto::WatchEvent, Status>>;

async fn send(tx: &Tx, event: Result<Event, Status>) -> bool {
    let item = event.map(|e| proto::WatchEvent { event: Some(e) });
    tx.send(item).await.is_ok()
}

async fn serve(s: Arc<Shared>, from: u64, tx: Tx) {
    s.metrics.watchers.inc();
    let _open = Open(s.clone());
    let mut changed = s.feed.subscribe();
    let mut sent = from;
    let mut reset = from == 0;
    let mut check = tokio::time::interval(Duration::from_millis(250));
    let mut out_of_touch: Option<Instant> = None;
    loop {
        // Marked seen before reading, so an apply after this point wakes us again.
        changed.borrow_and_update();
        if reset {
            let encoded = s.catalog_json();
            let revision = encoded.as_ref().map_or(sent, |(r, _)| *r);
            let event = encoded
                .map(|(revision, catalog_json)| {
                    Event::Reset(proto::Reset {
                        revision,
                        catalog_json,
                    })
                })
                .map_err(|e| ApiError::internal("encode catalog", e).into());
            if !send(&tx, event).await {
                return;
            }
            sent = revision;
            reset = false;
        }
        match s.feed.deltas_since(sent) {
            Ok(deltas) => {
                for d in deltas {
                    let event = serde_json::to_vec(&*d.changes)
                        .map(|changes_json| {
                            Event::Delta(proto::Delta {
                                revision: d.revision,
                                changes_json,
                            })
                        })
                        .map_err(|e| ApiError::internal("encode changes", e).into());
                    if !send(&tx, event).await {
                        return;
                    }
                    sent = d.revision;
                }
            }
            Err(compacted) => {
                tracing::debug!(%compacted, "watcher behind the kept deltas: sending a reset");
                reset = true;
                continue;
            }
        }
        tokio::select! {
            _ = s.stop.cancelled() => return,
            _ = tx.closed() => return,
            r = changed.changed() => if r.is_err() { return },
            _ = check.tick() => {
                if s.in_touch() {
                    out_of_touch = None;
                } else {
                    let since = *out_of_touch.get_or_insert_with(Instant::now);
                    if since.elapsed() >= s.detach_after {
                        let why = format!(
                            "node {} lost touch with the cluster {:?} ago; watch from another node",
                            s.node_id,
                            since.elapsed()
                        );
                        tracing::info!(node = s.node_id, "ending a watch stream: out of touch with the cluster");
                        let _ = send(&tx, Err(ApiError::OutOfTouch(why).into())).await;
                        return;
                    }
                }
            }
        }
    }
}
