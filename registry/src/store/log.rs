//! The Raft log and vote: [`RaftLogStorage`] and [`RaftLogReader`] over redb.
//!
//! Appends return as soon as the entries are readable (held in memory, in `pending`), and
//! one writer thread makes them durable: it takes every queued write (appends, votes,
//! truncations, purges) in order and commits them in one redb transaction, one fsync, then
//! tells openraft through the flush callbacks. So the leader's fsync overlaps replication
//! to the followers, and writes that arrive together share an fsync (group commit), while
//! every write still reaches the disk in the order it was made.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, PoisonError};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use prometheus_client::metrics::histogram::Histogram;
use redb::{Database, Durability, ReadableDatabase, ReadableTable};
use tokio::sync::oneshot;

use super::{
    KEY_COMMITTED, KEY_LAST_PURGED, KEY_VOTE, LOGS, META, StoreError, blocking, decode, encode,
    read_json,
};
use crate::types::{Entry, LogId, LogState, StorageError, StorageIOError, TypeConfig, Vote};

/// Entries appended but not yet durable, by index: a contiguous run at the end of the log.
type Pending = Arc<Mutex<BTreeMap<u64, Entry>>>;

type Done = oneshot::Sender<Result<(), StoreError>>;

/// One write, queued for the writer thread.
enum Job {
    Append {
        entries: Vec<Entry>,
        callback: LogFlushed<TypeConfig>,
    },
    Vote(Vote, Done),
    Truncate(u64, Done),
    Purge(LogId, Done),
    /// The committed index is a restart hint (Raft re-learns it from the leader): it rides
    /// along with the next durable write and asks for no fsync of its own.
    Committed(Option<LogId>),
}

/// The log half of the store. Cloning is cheap; clones are the log readers that openraft
/// hands to replication tasks.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    pending: Pending,
    writer: Arc<WriterHandle>,
}

/// The writer thread's queue; dropped with the last clone of the store, which closes the
/// queue and waits for the thread, so the file is closed when the store is gone.
struct WriterHandle {
    jobs: Option<std_mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the raft log writer thread panicked");
        }
    }
}

impl LogStore {
    pub(super) fn new(
        db: Arc<Database>,
        flush_time: Option<Histogram>,
    ) -> Result<Self, StoreError> {
        let pending = Pending::default();
        let (jobs, rx) = std_mpsc::channel();
        let writer = Writer {
            db: db.clone(),
            pending: pending.clone(),
            flush_time,
        };
        let thread = std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || writer.run(&rx))
            .map_err(|e| StoreError::Write(format!("start the log writer thread: {e}")))?;
        Ok(Self {
            db,
            pending,
            writer: Arc::new(WriterHandle {
                jobs: Some(jobs),
                thread: Some(thread),
            }),
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn send(&self, job: Job) -> Result<(), StoreError> {
        self.writer
            .jobs
            .as_ref()
            .and_then(|jobs| jobs.send(job).ok())
            .ok_or_else(|| StoreError::Write("the log writer thread has stopped".into()))
    }

    /// Queue `job` (made with its completion sender) and wait until it is on disk.
    async fn write(&self, job: impl FnOnce(Done) -> Job) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(job(tx))?;
        rx.await
            .map_err(|_| StoreError::Write("the log writer thread has stopped".into()))?
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
        // Taken before the disk is read: an entry leaves `pending` only once it is on
        // disk, so every entry is in one or the other.
        let cached: Vec<Entry> = {
            let pending = self.pending();
            match end {
                Some(end) => pending.range(start..end).map(|(_, e)| e.clone()).collect(),
                None => pending.range(start..).map(|(_, e)| e.clone()).collect(),
            }
        };
        // The common case, replication of what was just appended: all in memory.
        if cached.first().is_some_and(|e| e.log_id.index == start) {
            return Ok(cached);
        }
        let mut entries = blocking(&self.db, move |db| read_entries(db, start, end))
            .await
            .map_err(|e| StorageIOError::read_logs(&e))?;
        if let Some(first) = cached.first() {
            entries.retain(|e| e.log_id.index < first.log_id.index);
            entries.extend(cached);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState, StorageError> {
        let newest_pending = self.pending().last_key_value().map(|(_, e)| e.log_id);
        let state = blocking(&self.db, |db| {
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
        .map_err(|e| StorageIOError::read_logs(&e))?;
        Ok(LogState {
            last_log_id: newest_pending.or(state.last_log_id),
            ..state
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let vote = *vote;
        self.write(|done| Job::Vote(vote, done))
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        blocking(&self.db, |db| read_json(db, META, KEY_VOTE))
            .await
            .map_err(|e| StorageIOError::read_vote(&e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.send(Job::Committed(committed))
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
        let Some(first) = entries.first() else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        {
            // Readable from now on; anything at or after these indexes was truncated.
            let mut pending = self.pending();
            pending.split_off(&first.log_id.index);
            for e in &entries {
                pending.insert(e.log_id.index, e.clone());
            }
        }
        self.send(Job::Append { entries, callback })
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "truncating raft log from");
        self.pending().split_off(&log_id.index);
        self.write(|done| Job::Truncate(log_id.index, done))
            .await
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "purging raft log up to");
        self.pending().retain(|&i, _| i > log_id.index);
        self.write(|done| Job::Purge(log_id, done))
            .await
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}

/// The thread that makes queued writes durable, in order, a batch per fsync.
struct Writer {
    db: Arc<Database>,
    pending: Pending,
    flush_time: Option<Histogram>,
}

impl Writer {
    fn run(self, rx: &std_mpsc::Receiver<Job>) {
        while let Ok(job) = rx.recv() {
            let mut batch = vec![job];
            batch.extend(rx.try_iter());
            let started = std::time::Instant::now();
            let result = self.commit(&batch);
            if let Some(h) = &self.flush_time {
                h.observe(started.elapsed().as_secs_f64());
            }
            self.finish(batch, result);
        }
        tracing::debug!("raft log writer stopped");
    }

    /// Everything in `batch`, in order, in one transaction.
    fn commit(&self, batch: &[Job]) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write()?;
        let durable = batch.iter().any(|j| !matches!(j, Job::Committed(_)));
        txn.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })?;
        {
            let mut logs = txn.open_table(LOGS)?;
            let mut meta = txn.open_table(META)?;
            for job in batch {
                match job {
                    Job::Append { entries, .. } => {
                        for entry in entries {
                            let bytes = encode("log entry", entry)?;
                            logs.insert(entry.log_id.index, bytes.as_slice())?;
                        }
                    }
                    Job::Vote(vote, _) => {
                        meta.insert(KEY_VOTE, encode(KEY_VOTE, vote)?.as_slice())?;
                    }
                    Job::Truncate(index, _) => {
                        logs.retain_in(*index.., |_, _| false)?;
                    }
                    Job::Purge(log_id, _) => {
                        let bytes = encode(KEY_LAST_PURGED, log_id)?;
                        meta.insert(KEY_LAST_PURGED, bytes.as_slice())?;
                        logs.retain_in(..=log_id.index, |_, _| false)?;
                    }
                    Job::Committed(committed) => {
                        let bytes = encode(KEY_COMMITTED, committed)?;
                        meta.insert(KEY_COMMITTED, bytes.as_slice())?;
                    }
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Tell every writer of `batch` how it went; durable entries leave `pending`.
    fn finish(&self, batch: Vec<Job>, result: Result<(), StoreError>) {
        let failed = result.as_ref().err().map(ToString::to_string);
        if let Some(e) = &failed {
            tracing::error!(error = %e, "raft log write failed");
        }
        let error = || StoreError::Write(failed.clone().unwrap_or_default());
        for job in batch {
            match job {
                Job::Append { entries, callback } => {
                    if failed.is_none() {
                        let mut pending =
                            self.pending.lock().unwrap_or_else(PoisonError::into_inner);
                        for e in &entries {
                            // Unless truncated and appended again meanwhile.
                            if pending
                                .get(&e.log_id.index)
                                .is_some_and(|p| p.log_id == e.log_id)
                            {
                                pending.remove(&e.log_id.index);
                            }
                        }
                        drop(pending);
                        callback.log_io_completed(Ok(()));
                    } else {
                        callback.log_io_completed(Err(std::io::Error::other(error())));
                    }
                }
                Job::Vote(_, done) | Job::Truncate(_, done) | Job::Purge(_, done) => {
                    let _ = done.send(if failed.is_none() {
                        Ok(())
                    } else {
                        Err(error())
                    });
                }
                Job::Committed(_) => {}
            }
        }
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
