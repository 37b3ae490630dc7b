//! The catalog state machine and its snapshots: [`RaftStateMachine`] and
//! [`RaftSnapshotBuilder`] over redb.

use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use std::collections::HashMap;

use meshbridge_core::model::{Applied, Catalog, Change, Command, Rejection};
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use redb::{Database, ReadableDatabase, ReadableTable};
use tracing::info;

use super::sessions::Sessions;
use super::watch::{Delta, Feed};
use super::{
    KEY_SNAPSHOT_DATA, KEY_SNAPSHOT_META, SNAPSHOT, StoreError, begin_write, blocking, decode,
    encode, image,
};
use crate::types::{
    Entry, LogId, Replies, Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership,
    TypeConfig,
};

/// The state machine half of the store: the catalog in memory, persisted as snapshots.
pub struct StateMachineStore {
    db: Arc<Database>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    catalog: Arc<Catalog>,
    /// The previously published catalog and the commands that bring it to `catalog`: the
    /// next batch's working copy (see [`StateMachineStore::working_copy`]).
    spare: Option<(Arc<Catalog>, Vec<Command>)>,
    sessions: Arc<Sessions>,
    feed: Arc<Feed>,
    /// Exports per site in `catalog`, derived (rebuilt at load and snapshot install): the
    /// quota check needs it without walking every export.
    export_counts: HashMap<String, usize>,
    max_exports_per_site: usize,
}

/// Exports one site may have in the catalog (a new export beyond it is refused with
/// `ResourceExhausted`). The same on every node: the check is part of applying the log.
pub const MAX_EXPORTS_PER_SITE: usize = 10_000;

fn count_exports(catalog: &Catalog) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for (_, site) in catalog.exports.keys() {
        *counts.entry(site.clone()).or_default() += 1;
    }
    counts
}

/// A new export of a site at its quota: refused before the catalog sees it.
fn quota_refusal(
    catalog: &Catalog,
    counts: &HashMap<String, usize>,
    max: usize,
    command: &Command,
) -> Option<Rejection> {
    let Command::PutExport { export } = command else {
        return None;
    };
    let new = !catalog.exports.contains_key(&export.key());
    (new && counts.get(&export.site).copied().unwrap_or(0) >= max).then(|| Rejection::Quota {
        what: format!("exports of site {}", export.site),
        limit: max as u64,
    })
}

/// Keeps the per-site export counts in step with what a command changed (`catalog` is
/// after it: an upserted export that was already counted is not counted again).
fn count_changes(counts: &mut HashMap<String, usize>, changes: &[Change], catalog: &Catalog) {
    for change in changes {
        match change {
            Change::ExportUpserted { export } if export.created_revision == catalog.revision => {
                *counts.entry(export.site.clone()).or_default() += 1;
            }
            Change::ExportRemoved { site, .. } => {
                if let Some(n) = counts.get_mut(site) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        counts.remove(site);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Builds a snapshot of the state machine as it was when the builder was taken.
pub struct SnapshotBuilder {
    db: Arc<Database>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    catalog: Arc<Catalog>,
    sessions: Arc<Sessions>,
}

/// Makes snapshot ids unique within the process even for the same last log id.
static SNAPSHOT_SEQ: AtomicU64 = AtomicU64::new(0);

impl StateMachineStore {
    /// Starts from the current snapshot, or empty when there is none.
    pub(super) fn load(
        db: Arc<Database>,
        delta_capacity: usize,
        max_exports_per_site: usize,
    ) -> Result<Self, StoreError> {
        let (last_applied, membership, (catalog, sessions)) = match read_snapshot(&db)? {
            Some((meta, data)) => {
                let (catalog, sessions) = image::decode(&data)?;
                info!(
                    snapshot.id = %meta.snapshot_id,
                    last_log_id = ?meta.last_log_id,
                    revision = catalog.revision,
                    bytes = data.len(),
                    "state machine restored from snapshot"
                );
                (meta.last_log_id, meta.last_membership, (catalog, sessions))
            }
            None => (
                None,
                StoredMembership::default(),
                (Catalog::default(), Sessions::default()),
            ),
        };
        let export_counts = count_exports(&catalog);
        let catalog = Arc::new(catalog);
        let feed = Arc::new(Feed::new(catalog.clone(), delta_capacity));
        Ok(Self {
            db,
            last_applied,
            membership,
            catalog,
            spare: None,
            sessions: Arc::new(sessions),
            feed,
            export_counts,
            max_exports_per_site,
        })
    }

    /// The watch hook for the node layer; see [`Feed`].
    pub fn feed(&self) -> Arc<Feed> {
        self.feed.clone()
    }

    /// The catalog after the last applied entry.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.clone()
    }

    /// A catalog to apply a batch to, equal to `catalog`. Watchers and readers hold the
    /// published catalog, so it cannot change in place, and copying it costs O(catalog)
    /// (tens of milliseconds at a million endpoints). Instead the previously published
    /// catalog, which nobody holds any more once the batch after it is out, is brought up
    /// to date by applying the last batch's commands again (the state machine is
    /// deterministic): O(changes). A copy is made only when someone still holds the spare
    /// (a snapshot being built, a reset being encoded).
    fn working_copy(&mut self) -> Catalog {
        if let Some((spare, pending)) = self.spare.take()
            && let Ok(mut copy) = Arc::try_unwrap(spare)
        {
            for command in &pending {
                let _ = copy.apply(command);
            }
            debug_assert_eq!(copy, *self.catalog, "replayed spare diverged");
            if copy.revision == self.catalog.revision {
                return copy;
            }
        }
        tracing::debug!(
            revision = self.catalog.revision,
            "copying the catalog for a batch (the previous one is still in use)"
        );
        (*self.catalog).clone()
    }

    /// The reply to an entry that does not touch the catalog.
    fn unchanged(&self) -> Applied {
        Applied {
            revision: self.catalog.revision,
            changes: Vec::new(),
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Replies>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries = entries.into_iter();
        let mut replies = Vec::with_capacity(entries.size_hint().0);
        let mut deltas = Vec::new();
        let mut work: Option<Catalog> = None;
        let mut applied = Vec::new();
        for entry in entries {
            self.last_applied = Some(entry.log_id);
            let reply = match entry.payload {
                EntryPayload::Blank => vec![Ok(self.unchanged())],
                EntryPayload::Membership(membership) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), membership);
                    vec![Ok(self.unchanged())]
                }
                EntryPayload::Normal(proposal) => {
                    let index = entry.log_id.index;
                    Arc::make_mut(&mut self.sessions).sweep(index);
                    let mut out = Vec::with_capacity(proposal.0.len());
                    for request in proposal.0 {
                        if let Some(id) = &request.id
                            && let Some(reply) = self.sessions.replay(id)
                        {
                            // Applied already: a retry after an ambiguous failure.
                            out.push(reply);
                            continue;
                        }
                        let catalog = work.get_or_insert_with(|| self.working_copy());
                        let reply = match quota_refusal(
                            catalog,
                            &self.export_counts,
                            self.max_exports_per_site,
                            &request.command,
                        ) {
                            Some(refused) => Err(refused),
                            None => catalog.apply(&request.command),
                        };
                        if let Ok(applied) = &reply {
                            count_changes(&mut self.export_counts, &applied.changes, catalog);
                        }
                        if reply.is_ok() {
                            // Refused commands change nothing; the others are replayed on
                            // the spare.
                            applied.push(request.command);
                        }
                        if let Some(id) = &request.id {
                            Arc::make_mut(&mut self.sessions).record(id, index, &reply);
                        }
                        if let Ok(applied) = &reply
                            && !applied.changes.is_empty()
                        {
                            deltas.push(Delta {
                                revision: applied.revision,
                                changes: applied.changes.as_slice().into(),
                            });
                        }
                        out.push(reply);
                    }
                    out
                }
            };
            replies.push(reply);
        }
        if let Some(work) = work {
            let previous = std::mem::replace(&mut self.catalog, Arc::new(work));
            if deltas.is_empty() {
                // Nothing visible changed: the feed keeps the previous catalog, so it cannot
                // be the spare.
                self.spare = None;
            } else {
                self.feed.publish(self.catalog.clone(), deltas);
                self.spare = Some((previous, applied));
            }
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            catalog: self.catalog.clone(),
            sessions: self.sessions.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let bytes = data.len();
        let stored_meta = meta.clone();
        let (catalog, sessions) = blocking(&self.db, move |db| {
            let decoded = image::decode(&data)?;
            write_snapshot(db, &stored_meta, &data, false)?;
            Ok(decoded)
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;

        info!(
            snapshot.id = %meta.snapshot_id,
            last_log_id = ?meta.last_log_id,
            revision = catalog.revision,
            bytes,
            "installed snapshot"
        );
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.export_counts = count_exports(&catalog);
        self.catalog = Arc::new(catalog);
        self.spare = None;
        self.sessions = Arc::new(sessions);
        self.feed.reset(self.catalog.clone());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let current = blocking(&self.db, read_snapshot)
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(current.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let seq = SNAPSHOT_SEQ.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match self.last_applied {
            Some(id) => format!(
                "{}-{}-{}-{seq}",
                id.leader_id.term, id.leader_id.node_id, id.index
            ),
            None => format!("0-0-0-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        let catalog = self.catalog.clone();
        let sessions = self.sessions.clone();
        let stored_meta = meta.clone();
        let (data, stored) = blocking(&self.db, move |db| {
            let data = image::encode(&catalog, &sessions)?;
            let stored = write_snapshot(db, &stored_meta, &data, true)?;
            Ok((data, stored))
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;

        info!(
            snapshot.id = %meta.snapshot_id,
            last_log_id = ?meta.last_log_id,
            revision = self.catalog.revision,
            bytes = data.len(),
            stored,
            "built snapshot"
        );
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

fn read_snapshot(db: &Database) -> Result<Option<(SnapshotMeta, Vec<u8>)>, StoreError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(SNAPSHOT)?;
    let Some(meta) = table.get(KEY_SNAPSHOT_META)? else {
        return Ok(None);
    };
    let meta: SnapshotMeta = decode("snapshot meta", meta.value())?;
    let Some(data) = table.get(KEY_SNAPSHOT_DATA)? else {
        return Err(StoreError::Missing {
            what: "snapshot data",
        });
    };
    Ok(Some((meta, data.value().to_vec())))
}

/// Replaces the current snapshot: meta and data in one durable transaction. With
/// `only_if_newer`, a stored snapshot with a greater last log id (installed while this one
/// was being built) is kept instead; returns whether `meta` was stored.
fn write_snapshot(
    db: &Database,
    meta: &SnapshotMeta,
    data: &[u8],
    only_if_newer: bool,
) -> Result<bool, StoreError> {
    let meta_bytes = encode("snapshot meta", meta)?;
    let txn = begin_write(db)?;
    {
        let mut table = txn.open_table(SNAPSHOT)?;
        if only_if_newer && let Some(current) = table.get(KEY_SNAPSHOT_META)? {
            let current: SnapshotMeta = decode("snapshot meta", current.value())?;
            if current.last_log_id > meta.last_log_id {
                return Ok(false);
            }
        }
        table.insert(KEY_SNAPSHOT_META, meta_bytes.as_slice())?;
        table.insert(KEY_SNAPSHOT_DATA, data)?;
    }
    txn.commit()?;
    Ok(true)
}
