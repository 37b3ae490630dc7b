//! The Raft log and vote: [`RaftLogStorage`] and [`RaftLogReader`] over redb.
//!
//! Appends return as soon as the entries are readable (held in memory, in the [`Tail`]),
//! and one writer thread makes them durable: it takes every queued write (appends, votes,
//! truncations, purges) in order and commits them in one redb transaction, one fsync, then
//! tells openraft through the flush callbacks. Writes that arrive together share an fsync
//! (group commit), while every write still reaches the disk in the order it was made.
//! (openraft 0.9 waits for the flush callback before it replicates, so the leader's fsync
//! would not overlap replication; the leader therefore hands its own new entries to an
//! [`EarlyAppend`] as their append begins, which sends them to the followers at once.)
//!
//! The tail also keeps the most recent durable entries: replication to the followers and
//! applying to the state machine read what was just written, and find it in memory instead
//! of going to the disk through a blocking-pool thread.
//!
//! - [`tail`]: the entries in memory;
//! - [`writer`]: the writer thread and its fault hook;
//! - here: [`LogStore`], openraft's traits over both.

mod tail;
mod writer;

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;

use meshbridge_core::sync::lock;
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use prometheus_client::metrics::histogram::Histogram;
use redb::{Database, ReadableDatabase, ReadableTable};
use tokio::sync::oneshot;

use self::tail::{SharedTail, Tail};
pub use self::writer::WriterFault;
use self::writer::{Done, Job, Writer, WriterHandle};
use super::{
    KEY_COMMITTED, KEY_LAST_PURGED, KEY_VOTE, LOGS, META, StoreError, blocking, decode, read_json,
};
use crate::types::{
    Entry, EntryPayload, LogId, LogState, NodeId, StorageError, StorageIOError, TypeConfig, Vote,
};

/// Appends of more writes than this are not sent early: serializing them would hold up
/// openraft's core.
pub const EARLY_MAX_WRITES: usize = 8;

/// Sends a leader's own new entries to its followers as their append begins, before
/// openraft replicates them (after the leader's flush). A follower that takes them starts
/// its fsync while the leader's runs; its reply can then stand for openraft's own
/// AppendEntries of the same entries (see `network`). Best effort: anything not sent or not
/// answered early is replicated as usual.
pub trait EarlyAppend: Send + Sync + 'static {
    /// `vote`: the leader's committed vote, whose leader appended `entries` right after
    /// `prev_log_id`, which is committed (early appends are for lone writes).
    fn send(&self, vote: &Vote, prev_log_id: Option<LogId>, entries: &[Entry]);
}

/// A read that had to go to the disk gives up after this many tries if the log is
/// truncated or purged during every one (it never is: each truncation needs a new leader).
const READ_TRIES: usize = 100;

/// The log half of the store. Cloning is cheap; clones are the log readers that openraft
/// hands to replication tasks.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    tail: SharedTail,
    writer: Arc<WriterHandle>,
    /// The vote last saved or read (openraft saves a leader's committed vote before the
    /// leader appends anything).
    vote: Option<Vote>,
    /// The committed index last saved or read.
    committed: Option<LogId>,
    /// This node's id, and where its early appends go.
    early: Option<(NodeId, Arc<dyn EarlyAppend>)>,
    /// This node's id, once known ([`LogStore::for_node`]): a committed vote of its own
    /// read at start is demoted (see [`RaftLogStorage::read_vote`] below).
    node_id: Option<NodeId>,
    fault: Arc<WriterFault>,
}

impl LogStore {
    pub(super) fn new(
        db: Arc<Database>,
        flush_time: Option<Histogram>,
    ) -> Result<Self, StoreError> {
        let tail = SharedTail::default();
        let fault = Arc::new(WriterFault::default());
        let (jobs, rx) = std_mpsc::channel();
        let writer = Writer {
            db: db.clone(),
            tail: tail.clone(),
            flush_time,
            fault: fault.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || writer.run(&rx))
            .map_err(|e| StoreError::Write(format!("start the log writer thread: {e}")))?;
        Ok(Self {
            db,
            tail,
            writer: Arc::new(WriterHandle {
                jobs: Some(jobs),
                thread: Some(thread),
            }),
            vote: None,
            committed: None,
            early: None,
            node_id: None,
            fault,
        })
    }

    /// The store of node `node_id`: a committed vote naming this node, read when openraft
    /// starts, is demoted to the same vote uncommitted (and saved so), so that a restarted
    /// leader must win a new election instead of resuming its old term. Without it,
    /// openraft 0.9 restores such a node as leader of that term at once and numbers its
    /// next entries from its own durable log, which may reuse a log id that it sent early
    /// and the followers hold with other contents (docs/ARCHITECTURE.md, "Early appends").
    pub fn for_node(mut self, node_id: NodeId) -> Self {
        self.node_id = Some(node_id);
        self
    }

    /// The writer's fault hook (crash tests).
    pub fn fault(&self) -> Arc<WriterFault> {
        self.fault.clone()
    }

    /// Send node `node_id`'s own appends early while it leads ([`EarlyAppend`]).
    pub fn with_early_append(mut self, node_id: NodeId, early: Arc<dyn EarlyAppend>) -> Self {
        self.early = Some((node_id, early));
        self
    }

    /// The leader's vote if this node leads, `entries` are its own new entries and few
    /// enough to send early.
    fn early_vote(&self, node_id: NodeId, entries: &[Entry]) -> Option<Vote> {
        let vote = self
            .vote
            .filter(|v| v.is_committed() && v.leader_id().node_id == node_id)?;
        let first = entries.first()?;
        let writes: usize = entries
            .iter()
            .map(|e| match &e.payload {
                EntryPayload::Normal(p) => p.0.len(),
                _ => 1,
            })
            .sum();
        (first.log_id.leader_id == *vote.leader_id() && writes <= EARLY_MAX_WRITES).then_some(vote)
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, Tail> {
        lock(&self.tail)
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
        for _ in 0..READ_TRIES {
            // Taken before the disk is read: an entry leaves the tail only once it is on
            // disk, so every entry is in one or the other.
            let view = self.tail().view(start, end);
            let owned = |v: Vec<Arc<Entry>>| v.iter().map(|e| (**e).clone()).collect::<Vec<_>>();
            // The common case, replication or applying of what was just appended: all in
            // memory.
            if view
                .entries
                .first()
                .is_some_and(|e| e.log_id.index == start)
                || view.end.is_some_and(|end| end <= start)
            {
                return Ok(owned(view.entries));
            }
            // The disk only below what the tail holds; above the log's end it may still
            // hold entries already truncated.
            let disk_end = view.entries.first().map(|e| e.log_id.index).or(view.end);
            let mut entries = blocking(&self.db, move |db| read_entries(db, start, disk_end))
                .await
                .map_err(|e| StorageIOError::read_logs(&e))?;
            if self.tail().removals != view.removals {
                // Truncated or purged while the disk was read: what was read may be gone.
                continue;
            }
            // Only a contiguous run: if what the disk holds does not reach the tail, the
            // disk's part alone. (Entries before the first one held anywhere do not exist,
            // or were purged: "not found" is allowed.)
            let next = entries.last().map(|e| e.log_id.index + 1);
            if let Some(first) = view.entries.first()
                && next.is_none_or(|n| n == first.log_id.index)
            {
                entries.extend(owned(view.entries));
            }
            return Ok(entries);
        }
        Err(StorageIOError::read_logs(&StoreError::Write(
            "the log was truncated during every read".into(),
        ))
        .into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState, StorageError> {
        let newest_pending = self.tail().last_log_id();
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
            .map_err(|e| StorageIOError::write_vote(&e))?;
        self.vote = Some(vote);
        Ok(())
    }

    /// openraft reads the vote once, when it starts. A committed vote of this node's own
    /// is a leadership it held before the restart: it comes back uncommitted (see
    /// [`LogStore::for_node`]), saved before openraft sees it, so the node starts as a
    /// follower and leads again only after an election in a higher term
    /// (`Engine::startup` restores leadership only for a committed vote; `Engine::elect`
    /// campaigns in the vote's term + 1).
    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        let mut vote: Option<Vote> = blocking(&self.db, |db| read_json(db, META, KEY_VOTE))
            .await
            .map_err(|e| StorageIOError::read_vote(&e))?;
        if let (Some(me), Some(v)) = (self.node_id, vote)
            && let Some(demoted) = demoted_vote(me, &v)
        {
            self.write(|done| Job::Vote(demoted, done))
                .await
                .map_err(|e| StorageIOError::write_vote(&e))?;
            tracing::info!(
                vote = %v,
                now = %demoted,
                "restarted as the leader of its last term: leadership must be won again in a new term"
            );
            vote = Some(demoted);
        }
        self.vote = vote;
        Ok(vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.committed = committed;
        self.send(Job::Committed(committed))
            .map_err(|e| StorageIOError::write(&e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let committed = blocking(&self.db, |db| {
            Ok(read_json::<Option<LogId>>(db, META, KEY_COMMITTED)?.flatten())
        })
        .await
        .map_err(|e| StorageIOError::read(&e))?;
        self.committed = committed;
        Ok(committed)
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
        // Readable from now on; anything at or after these indexes was truncated.
        let (prev, append) = {
            let mut tail = self.tail();
            (tail.last_log_id(), tail.append(&entries))
        };
        // Early only when everything before is committed: a lone write, whose fsync would
        // otherwise come before all of its replication. Under load, entries are in flight
        // behind each other and replication of one overlaps the fsync of the next anyway
        // (and early appends there cost the followers more than they save).
        if prev == self.committed
            && let Some((node_id, early)) = &self.early
            && let Some(vote) = self.early_vote(*node_id, &entries)
            && let Some(first) = entries.first()
            && prev.map_or(0, |p| p.index + 1) == first.log_id.index
        {
            early.send(&vote, prev, &entries);
        }
        self.send(Job::Append {
            append,
            entries,
            callback,
        })
        .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "truncating raft log from");
        self.tail().remove_from(log_id.index);
        self.write(|done| Job::Truncate(log_id.index, done))
            .await
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "purging raft log up to");
        self.tail().remove_through(log_id.index);
        self.write(|done| Job::Purge(log_id, done))
            .await
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}

/// The vote to start with instead of `vote`, when `vote` is a committed leadership of node
/// `me`: the same leader id, uncommitted.
fn demoted_vote(me: NodeId, vote: &Vote) -> Option<Vote> {
    (vote.is_committed() && vote.leader_id().node_id == me)
        .then(|| Vote::new(vote.leader_id().term, me))
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
