//! The Raft log and vote: [`RaftLogStorage`] and [`RaftLogReader`] over redb.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use redb::{Database, ReadableDatabase, ReadableTable};

use super::{
    KEY_COMMITTED, KEY_LAST_PURGED, KEY_VOTE, LOGS, META, StoreError, begin_write, blocking,
    decode, encode, read_json, write_json,
};
use crate::types::{Entry, LogId, LogState, StorageError, StorageIOError, TypeConfig, Vote};

/// The log half of the store. Cloning is cheap; clones are the log readers that openraft
/// hands to replication tasks.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    pub(super) fn new(db: Arc<Database>) -> Self {
        Self { db }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let Some((start, end)) = half_open(&range) else {
            return Ok(Vec::new());
        };
        blocking(&self.db, move |db| read_entries(db, start, end))
            .await
            .map_err(|e| StorageIOError::read_logs(&e).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState, StorageError> {
        blocking(&self.db, |db| {
            let last_purged_log_id: Option<LogId> = read_json(db, META, KEY_LAST_PURGED)?;
            let txn = db.begin_read()?;
            let logs = txn.open_table(LOGS)?;
            let last_log_id = match logs.last()? {
                Some((_, bytes)) => Some(decode::<Entry>("log entry", bytes.value())?.log_id),
                None => last_purged_log_id,
            };
            Ok(LogState {
                last_purged_log_id,
                last_log_id,
            })
        })
        .await
        .map_err(|e| StorageIOError::read_logs(&e).into())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let vote = *vote;
        blocking(&self.db, move |db| write_json(db, META, KEY_VOTE, &vote))
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        blocking(&self.db, |db| read_json(db, META, KEY_VOTE))
            .await
            .map_err(|e| StorageIOError::read_vote(&e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // The committed index is a hint for restarts (Raft re-learns it from the leader), so
        // it is written without its own fsync: it reaches the disk with the next log append,
        // keeping one fsync per write on the path of every client call.
        blocking(&self.db, move |db| {
            let bytes = super::encode(KEY_COMMITTED, &committed)?;
            let mut txn = db.begin_write()?;
            txn.set_durability(redb::Durability::None)?;
            txn.open_table(META)?
                .insert(KEY_COMMITTED, bytes.as_slice())?;
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write(&e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        blocking(&self.db, |db| {
            Ok(read_json::<Option<LogId>>(db, META, KEY_COMMITTED)?.flatten())
        })
        .await
        .map_err(|e| StorageIOError::read(&e).into())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if entries.is_empty() {
            callback.log_io_completed(Ok(()));
            return Ok(());
        }
        blocking(&self.db, move |db| {
            // The whole batch is one transaction: one fsync, all or nothing.
            let txn = begin_write(db)?;
            {
                let mut logs = txn.open_table(LOGS)?;
                for entry in &entries {
                    let bytes = encode("log entry", entry)?;
                    logs.insert(entry.log_id.index, bytes.as_slice())?;
                }
            }
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(&e))?;
        // Only now is the batch on disk.
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "truncating raft log from");
        blocking(&self.db, move |db| {
            let txn = begin_write(db)?;
            txn.open_table(LOGS)?
                .retain_in(log_id.index.., |_, _| false)?;
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "purging raft log up to");
        blocking(&self.db, move |db| {
            let bytes = encode(KEY_LAST_PURGED, &log_id)?;
            let txn = begin_write(db)?;
            txn.open_table(META)?
                .insert(KEY_LAST_PURGED, bytes.as_slice())?;
            txn.open_table(LOGS)?
                .retain_in(..=log_id.index, |_, _| false)?;
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}

/// Turns any range of indexes into `start..end` (`end` `None` = unbounded), or `None` when
/// it is empty.
fn half_open(range: &impl RangeBounds<u64>) -> Option<(u64, Option<u64>)> {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.checked_add(1),
        Bound::Excluded(&e) => Some(e),
        Bound::Unbounded => None,
    };
    match end {
        Some(end) if end <= start => None,
        _ => Some((start, end)),
    }
}

fn read_entries(db: &Database, start: u64, end: Option<u64>) -> Result<Vec<Entry>, StoreError> {
    let txn = db.begin_read()?;
    let logs = txn.open_table(LOGS)?;
    let range = match end {
        Some(end) => logs.range(start..end)?,
        None => logs.range(start..)?,
    };
    let mut entries = Vec::new();
    for item in range {
        let (_, bytes) = item?;
        entries.push(decode("log entry", bytes.value())?);
    }
    Ok(entries)
}
