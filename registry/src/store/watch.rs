//! What the state machine tells the node layer after each apply: the latest catalog, and a
//! bounded ring of recent deltas so a watcher can resume from a revision without a reset.
//!
//! A watcher starts from a full state (`latest()`, at `catalog.revision`), then loops:
//! wait on its [`Feed::subscribe`] receiver, call [`Feed::deltas_since`] with the last
//! revision it delivered, deliver those deltas in order. [`Compacted`] means it fell behind
//! the ring (or a snapshot replaced the catalog): it starts over from `latest()`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use meshbridge_core::model::{Catalog, Change};
use tokio::sync::watch;

/// Revisions of deltas kept by default.
pub const DEFAULT_DELTA_CAPACITY: usize = 10_000;

/// The changes of one revision, in the order the state machine made them.
#[derive(Clone, Debug, PartialEq)]
pub struct Delta {
    pub revision: u64,
    pub changes: Arc<[Change]>,
}

/// The deltas after the asked revision are no longer kept: resume from a full state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("revision {requested} is compacted: deltas are kept only after revision {oldest}")]
pub struct Compacted {
    pub requested: u64,
    /// Deltas are available for revisions strictly greater than this one.
    pub oldest: u64,
}

/// The state machine's output for watchers. Shared as `Arc<Feed>`; see the module docs.
#[derive(Debug)]
pub struct Feed {
    latest: watch::Sender<Arc<Catalog>>,
    ring: Mutex<Ring>,
}

#[derive(Debug)]
struct Ring {
    /// Ordered by revision; holds every revision in `(floor, last]`.
    deltas: VecDeque<Delta>,
    floor: u64,
    capacity: usize,
}

impl Feed {
    /// A feed at `catalog`, with no deltas kept yet.
    pub fn new(catalog: Arc<Catalog>, capacity: usize) -> Self {
        let floor = catalog.revision;
        Self {
            latest: watch::Sender::new(catalog),
            ring: Mutex::new(Ring {
                deltas: VecDeque::new(),
                floor,
                capacity: capacity.max(1),
            }),
        }
    }

    /// The catalog after the last apply.
    pub fn latest(&self) -> Arc<Catalog> {
        self.latest.borrow().clone()
    }

    /// The revision of [`Feed::latest`].
    pub fn revision(&self) -> u64 {
        self.latest.borrow().revision
    }

    /// A receiver that is marked changed whenever the catalog moves to a new revision or is
    /// replaced by a snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Catalog>> {
        self.latest.subscribe()
    }

    /// Every delta with a revision greater than `revision`, in order. Empty when `revision`
    /// is current (or ahead of this replica, which has not caught up yet).
    pub fn deltas_since(&self, revision: u64) -> Result<Vec<Delta>, Compacted> {
        let ring = self.ring();
        if revision < ring.floor {
            return Err(Compacted {
                requested: revision,
                oldest: ring.floor,
            });
        }
        let first = ring.deltas.partition_point(|d| d.revision <= revision);
        Ok(ring.deltas.range(first..).cloned().collect())
    }

    /// Records the deltas of one apply batch, then announces `catalog`. Deltas go into the
    /// ring first, so anyone who sees the new catalog can also read its deltas.
    pub(super) fn publish(&self, catalog: Arc<Catalog>, deltas: Vec<Delta>) {
        let mut ring = self.ring();
        for delta in deltas {
            if ring.deltas.len() == ring.capacity
                && let Some(old) = ring.deltas.pop_front()
            {
                ring.floor = old.revision;
            }
            ring.deltas.push_back(delta);
        }
        self.latest.send_replace(catalog);
    }

    /// Replaces the catalog wholesale (snapshot installed): every watcher must reset.
    pub(super) fn reset(&self, catalog: Arc<Catalog>) {
        let mut ring = self.ring();
        ring.deltas.clear();
        ring.floor = catalog.revision;
        self.latest.send_replace(catalog);
    }

    fn ring(&self) -> MutexGuard<'_, Ring> {
        // The ring is consistent after every statement that mutates it: a panic elsewhere
        // while the lock was held does not leave it half-written.
        meshbridge_core::sync::lock(&self.ring)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(revision: u64) -> Delta {
        Delta {
            revision,
            changes: Arc::from(vec![Change::SiteRemoved {
                name: format!("s{revision}"),
            }]),
        }
    }

    fn catalog(revision: u64) -> Arc<Catalog> {
        Arc::new(Catalog {
            revision,
            ..Catalog::default()
        })
    }

    #[test]
    fn resumes_from_any_kept_revision() {
        let feed = Feed::new(catalog(10), 100);
        feed.publish(catalog(13), vec![delta(11), delta(12), delta(13)]);
        let revs = |from| -> Vec<u64> {
            feed.deltas_since(from)
                .expect("kept")
                .iter()
                .map(|d| d.revision)
                .collect()
        };
        assert_eq!(revs(10), [11, 12, 13]);
        assert_eq!(revs(12), [13]);
        assert_eq!(revs(13), Vec::<u64>::new());
        assert_eq!(revs(20), Vec::<u64>::new());
        assert_eq!(
            feed.deltas_since(9),
            Err(Compacted {
                requested: 9,
                oldest: 10
            })
        );
        assert_eq!(feed.revision(), 13);
    }

    #[test]
    fn watcher_behind_the_ring_is_told_to_reset() {
        let feed = Feed::new(catalog(0), 2);
        feed.publish(catalog(3), vec![delta(1), delta(2), delta(3)]);
        assert_eq!(
            feed.deltas_since(0),
            Err(Compacted {
                requested: 0,
                oldest: 1
            })
        );
        let kept: Vec<u64> = feed
            .deltas_since(1)
            .expect("kept")
            .iter()
            .map(|d| d.revision)
            .collect();
        assert_eq!(kept, [2, 3]);
    }

    #[test]
    fn snapshot_install_compacts_everything_before_it() {
        let feed = Feed::new(catalog(0), 100);
        let mut rx = feed.subscribe();
        feed.publish(catalog(1), vec![delta(1)]);
        assert!(rx.has_changed().expect("sender alive"));
        rx.mark_unchanged();
        feed.reset(catalog(50));
        assert!(rx.has_changed().expect("sender alive"));
        assert_eq!(
            feed.deltas_since(1),
            Err(Compacted {
                requested: 1,
                oldest: 50
            })
        );
        assert_eq!(feed.deltas_since(50), Ok(vec![]));
        assert_eq!(feed.latest().revision, 50);
    }
}
