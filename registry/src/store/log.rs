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

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Condvar, Mutex};

use meshbridge_core::sync::lock;
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use prometheus_client::metrics::histogram::Histogram;
use redb::{Database, Durability, ReadableDatabase, ReadableTable};
use tokio::sync::oneshot;

use super::{
    KEY_COMMITTED, KEY_LAST_PURGED, KEY_VOTE, LOGS, META, StoreError, blocking, decode, encode,
    read_json,
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

/// A fault hook in the log writer, for crash tests: [`WriterFault::hold`] stalls every
/// commit before it starts (a disk that does not answer); [`WriterFault::crash`] then makes
/// the writer drop what it holds and whatever is queued behind it, commit nothing more and
/// call nobody back, as if the process died before those fsyncs. What was committed before
/// stays: that is exactly what a real crash keeps. Unarmed, it costs the writer one atomic
/// load per commit.
#[derive(Default)]
pub struct WriterFault {
    /// Set by `hold` and `crash`: only then does the writer take the lock.
    armed: AtomicBool,
    /// The writer is between [`WriterFault::may_commit`] and the end of its commit.
    committing: AtomicBool,
    state: Mutex<FaultState>,
    changed: Condvar,
}

#[derive(Default)]
struct FaultState {
    hold: bool,
    crashed: bool,
    /// A commit is waiting at the hold.
    waiting: bool,
    /// The writer saw the crash and stopped.
    writer_stopped: bool,
}

impl WriterFault {
    /// Commits from now on wait before they start, until [`release`](Self::release) or
    /// [`crash`](Self::crash).
    pub fn hold(&self) {
        self.armed.store(true, Ordering::SeqCst);
        lock(&self.state).hold = true;
        self.changed.notify_all();
    }

    /// Lets held commits go on.
    pub fn release(&self) {
        lock(&self.state).hold = false;
        self.changed.notify_all();
    }

    /// Whether a commit is waiting at the hold.
    pub fn holding(&self) -> bool {
        lock(&self.state).waiting
    }

    /// The writer drops every job not yet committed and stops. Returns once no commit
    /// can happen any more: a commit already under way (a started fsync) finishes first.
    pub fn crash(&self) {
        // SeqCst on both sides: either the writer sees `armed` before it commits, or this
        // sees `committing` and waits for the commit to end.
        self.armed.store(true, Ordering::SeqCst);
        let mut state = lock(&self.state);
        state.crashed = true;
        self.changed.notify_all();
        while self.committing.load(Ordering::SeqCst) && !state.writer_stopped {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Writer side, before a commit: whether to go on (`false`: crashed, drop everything).
    fn may_commit(&self) -> bool {
        self.committing.store(true, Ordering::SeqCst);
        if !self.armed.load(Ordering::SeqCst) {
            return true;
        }
        let mut state = lock(&self.state);
        state.waiting = true;
        while state.hold && !state.crashed {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        state.waiting = false;
        if state.crashed {
            state.writer_stopped = true;
            self.committing.store(false, Ordering::SeqCst);
            self.changed.notify_all();
            return false;
        }
        true
    }

    /// Writer side, after a commit.
    fn committed(&self) {
        self.committing.store(false, Ordering::SeqCst);
        if self.armed.load(Ordering::SeqCst) {
            let _state = lock(&self.state);
            self.changed.notify_all();
        }
    }

    fn crashed(&self) -> bool {
        self.armed.load(Ordering::SeqCst) && lock(&self.state).crashed
    }
}

/// Durable entries kept in memory past these bounds leave the tail, oldest first.
const TAIL_ENTRIES: usize = 1024;
const TAIL_BYTES: usize = 8 * 1024 * 1024;

/// The end of the log in memory, by index: every entry not yet durable and the most recent
/// durable ones. A contiguous run that ends at the last entry appended; an entry leaves it
/// only once it is on disk, so every entry is in the tail or on disk (or both).
#[derive(Default)]
struct Tail {
    entries: BTreeMap<u64, Cached>,
    /// Encoded bytes of the durable entries held.
    durable_bytes: usize,
    /// Number of the next append.
    next_append: u64,
    /// Index after the log's last entry, once this process appended or truncated (the
    /// disk may still hold truncated entries at or after it until the writer gets there).
    end: Option<u64>,
    /// Truncations and purges so far: a reader that went to the disk checks that none
    /// happened meanwhile.
    removals: u64,
}

struct Cached {
    /// Shared, so that a reader copies pointers under the lock, not entries.
    entry: Arc<Entry>,
    /// Which append put it here: only that append's write makes it durable (the same log
    /// id can be truncated and appended again while the first write is queued).
    append: u64,
    /// Its encoded size once it is on disk; `None` while it is only here.
    durable: Option<usize>,
}

impl Tail {
    /// Appended entries, replacing any at or after the first one's index; returns the
    /// append's number for [`Tail::durable`].
    fn append(&mut self, entries: &[Entry]) -> u64 {
        let append = self.next_append;
        self.next_append += 1;
        if let Some(first) = entries.first() {
            self.remove_from(first.log_id.index);
        }
        if let Some(last) = entries.last() {
            self.end = Some(last.log_id.index + 1);
        }
        for e in entries {
            let cached = Cached {
                entry: Arc::new(e.clone()),
                append,
                durable: None,
            };
            self.entries.insert(e.log_id.index, cached);
        }
        append
    }

    /// Truncation: everything at or after `index` goes.
    fn remove_from(&mut self, index: u64) {
        if self.end.is_none_or(|end| index < end) {
            // The log gets shorter (or may: its end is not known yet).
            self.removals += 1;
        }
        self.end = Some(self.end.map_or(index, |end| end.min(index)));
        let removed = self.entries.split_off(&index);
        self.forget(&removed);
    }

    /// Purge: everything up to and including `index` goes.
    fn remove_through(&mut self, index: u64) {
        self.removals += 1;
        let Some(keep_from) = index.checked_add(1) else {
            self.entries.clear();
            self.durable_bytes = 0;
            return;
        };
        let kept = self.entries.split_off(&keep_from);
        let removed = std::mem::replace(&mut self.entries, kept);
        self.forget(&removed);
    }

    /// Takes entries that were removed out of the durable byte count.
    fn forget(&mut self, removed: &BTreeMap<u64, Cached>) {
        self.durable_bytes -= removed.values().filter_map(|c| c.durable).sum::<usize>();
    }

    /// Entries reached the disk, as (append number, index, encoded bytes); those still
    /// held from that append (not truncated since) are durable. Then the oldest durable
    /// entries past the bounds leave.
    fn durable(&mut self, written: &[(u64, u64, usize)]) {
        for (append, index, bytes) in written {
            if let Some(c) = self.entries.get_mut(index)
                && c.append == *append
                && c.durable.is_none()
            {
                c.durable = Some(*bytes);
                self.durable_bytes += bytes;
            }
        }
        while self.entries.len() > TAIL_ENTRIES || self.durable_bytes > TAIL_BYTES {
            let Some(first) = self.entries.first_entry() else {
                break;
            };
            let Some(bytes) = first.get().durable else {
                break;
            };
            first.remove();
            self.durable_bytes -= bytes;
        }
    }

    /// What a reader of `start..end` (`end` `None`: to the end) needs: the entries held
    /// in that range, and where the log ends and how many removals happened, as of now.
    fn view(&self, start: u64, end: Option<u64>) -> TailView {
        // Nothing at or after the log's end exists, whatever the disk still holds.
        let end = match (end, self.end) {
            (Some(e), Some(log_end)) => Some(e.min(log_end)),
            (e, log_end) => e.or(log_end),
        };
        let entries = match end {
            Some(end) if end <= start => Vec::new(),
            Some(end) => self
                .entries
                .range(start..end)
                .map(|(_, c)| c.entry.clone())
                .collect(),
            None => self
                .entries
                .range(start..)
                .map(|(_, c)| c.entry.clone())
                .collect(),
        };
        TailView {
            entries,
            end,
            removals: self.removals,
        }
    }

    /// The entries held in `start..end` (`end` `None`: to the end).
    #[cfg(test)]
    fn range(&self, start: u64, end: Option<u64>) -> Vec<Entry> {
        self.view(start, end)
            .entries
            .iter()
            .map(|e| (**e).clone())
            .collect()
    }

    fn last_log_id(&self) -> Option<LogId> {
        self.entries.last_key_value().map(|(_, c)| c.entry.log_id)
    }
}

/// A reader's look at the tail ([`Tail::view`]).
struct TailView {
    entries: Vec<Arc<Entry>>,
    /// The read's end, cut at the log's end when that is known.
    end: Option<u64>,
    removals: u64,
}

/// A read that had to go to the disk gives up after this many tries if the log is
/// truncated or purged during every one (it never is: each truncation needs a new leader).
const READ_TRIES: usize = 100;

type SharedTail = Arc<Mutex<Tail>>;

type Done = oneshot::Sender<Result<(), StoreError>>;

/// One write, queued for the writer thread.
enum Job {
    Append {
        /// Its number in the tail ([`Tail::append`]).
        append: u64,
        entries: Vec<Entry>,
        callback: LogFlushed<TypeConfig>,
    },
    Vote(Vote, Done),
    Truncate(u64, Done),
    Purge(LogId, Done),
    /// The committed index is a restart hint (Raft re-learns it from the leader): it rides
    /// along with the next durable write (or the writer's last one, at shutdown) and costs
    /// no transaction of its own.
    Committed(Option<LogId>),
}

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

/// The thread that makes queued writes durable, in order, a batch per fsync.
struct Writer {
    db: Arc<Database>,
    tail: SharedTail,
    flush_time: Option<Histogram>,
    fault: Arc<WriterFault>,
}

impl Writer {
    fn run(self, rx: &std_mpsc::Receiver<Job>) {
        // The newest committed index not yet written.
        let mut committed = None;
        while let Ok(job) = rx.recv() {
            let mut batch = vec![job];
            batch.extend(rx.try_iter());
            for job in &batch {
                if let Job::Committed(c) = job {
                    committed = Some(*c);
                }
            }
            if batch.iter().all(|j| matches!(j, Job::Committed(_))) {
                continue;
            }
            if !self.fault.may_commit() {
                // Crashed: this batch and everything queued are lost, nobody is told.
                tracing::warn!("raft log writer crashed (fault hook): uncommitted writes dropped");
                return;
            }
            let started = std::time::Instant::now();
            let result = self.commit(&batch, committed.take());
            self.fault.committed();
            if let Some(h) = &self.flush_time {
                h.observe(started.elapsed().as_secs_f64());
            }
            self.finish(batch, result);
        }
        if let Some(c) = committed
            && !self.fault.crashed()
            && let Err(e) = self.commit(&[], Some(c))
        {
            tracing::warn!(error = %e, "committed index not saved at shutdown");
        }
        tracing::debug!("raft log writer stopped");
    }

    /// Everything in `batch`, in order, and the committed index if given, in one durable
    /// transaction; then its entries are durable in the tail.
    fn commit(&self, batch: &[Job], committed: Option<Option<LogId>>) -> Result<(), StoreError> {
        let mut written = Vec::new();
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut logs = txn.open_table(LOGS)?;
            let mut meta = txn.open_table(META)?;
            for job in batch {
                match job {
                    Job::Append {
                        append, entries, ..
                    } => {
                        for entry in entries {
                            let bytes = encode("log entry", entry)?;
                            logs.insert(entry.log_id.index, bytes.as_slice())?;
                            written.push((*append, entry.log_id.index, bytes.len()));
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
                    Job::Committed(_) => {}
                }
            }
            if let Some(committed) = committed {
                let bytes = encode(KEY_COMMITTED, &committed)?;
                meta.insert(KEY_COMMITTED, bytes.as_slice())?;
            }
        }
        txn.commit()?;
        lock(&self.tail).durable(&written);
        Ok(())
    }

    /// Tell every writer of `batch` how it went.
    fn finish(&self, batch: Vec<Job>, result: Result<(), StoreError>) {
        let failed = result.as_ref().err().map(ToString::to_string);
        if let Some(e) = &failed {
            tracing::error!(error = %e, "raft log write failed");
        }
        let error = || StoreError::Write(failed.clone().unwrap_or_default());
        for job in batch {
            match job {
                Job::Append { callback, .. } => {
                    if failed.is_none() {
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

#[cfg(test)]
mod tail_tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn run(term: u64, indexes: std::ops::Range<u64>) -> Vec<Entry> {
        indexes.map(|i| entry(term, i)).collect()
    }

    fn indexes(tail: &Tail) -> Vec<u64> {
        tail.range(0, None).iter().map(|e| e.log_id.index).collect()
    }

    fn written(append: u64, entries: &[Entry], bytes: usize) -> Vec<(u64, u64, usize)> {
        entries
            .iter()
            .map(|e| (append, e.log_id.index, bytes))
            .collect()
    }

    #[test]
    fn durable_entries_stay_readable_up_to_the_bound_then_leave_oldest_first() {
        let mut tail = Tail::default();
        let first = run(1, 1..1001);
        let a = tail.append(&first);
        tail.durable(&written(a, &first, 10));
        // Within the bounds, what was just written is still read from memory.
        assert_eq!(indexes(&tail), (1..1001).collect::<Vec<_>>());
        assert_eq!(tail.durable_bytes, 10_000);

        let second = run(1, 1001..1101);
        let b = tail.append(&second);
        // Past the bound: old durable entries leave, the new ones (not durable yet) stay.
        tail.durable(&[]);
        assert_eq!(tail.entries.len(), TAIL_ENTRIES);
        let oldest = 1101 - TAIL_ENTRIES as u64;
        assert_eq!(indexes(&tail).first(), Some(&oldest));
        assert_eq!(tail.durable_bytes, (1001 - oldest as usize) * 10);
        tail.durable(&written(b, &second, 10));
        assert_eq!(tail.entries.len(), TAIL_ENTRIES);
        assert_eq!(tail.durable_bytes, TAIL_ENTRIES * 10);
    }

    #[test]
    fn the_byte_bound_evicts_durable_entries_but_never_unwritten_ones() {
        let mut tail = Tail::default();
        let big = run(1, 1..4);
        let a = tail.append(&big);
        let unwritten = run(1, 4..6);
        tail.append(&unwritten);
        tail.durable(&written(a, &big, TAIL_BYTES / 2));
        // 1.5 × the bound in durable bytes: the oldest durable entries go until within it.
        assert_eq!(indexes(&tail), vec![2, 3, 4, 5]);
        assert_eq!(tail.durable_bytes, TAIL_BYTES);
        // Past the bound in count but with only unwritten entries left: they stay.
        let mut tail = Tail::default();
        let many = run(1, 1..(TAIL_ENTRIES as u64 + 10));
        tail.append(&many);
        tail.durable(&[]);
        assert_eq!(tail.entries.len(), many.len());
    }

    #[test]
    fn a_write_of_an_entry_truncated_and_appended_again_does_not_make_the_new_one_durable() {
        let mut tail = Tail::default();
        let old = run(1, 1..3);
        let a = tail.append(&old);
        // Truncated from 2 and the same log id appended again before `a` reached the disk.
        tail.remove_from(2);
        let again = run(1, 2..3);
        tail.append(&again);
        tail.durable(&written(a, &old, 10));
        assert!(tail.entries.get(&1).is_some_and(|c| c.durable == Some(10)));
        assert!(tail.entries.get(&2).is_some_and(|c| c.durable.is_none()));
        assert_eq!(tail.durable_bytes, 10);
    }

    #[test]
    fn a_read_stops_at_the_end_of_the_log_even_with_nothing_held() {
        let mut tail = Tail::default();
        // Before anything happened here, the end is unknown: the disk decides.
        assert_eq!(tail.view(1, None).end, None);
        let all = run(1, 1..11);
        let a = tail.append(&all);
        tail.durable(&written(a, &all, 7));
        assert_eq!(tail.view(1, Some(100)).end, Some(11));
        // Appending at the end removes nothing: readers on the disk need not retry.
        let before = tail.removals;
        tail.append(&run(1, 11..12));
        assert_eq!(tail.removals, before);
        // Truncated at 4 and every entry evicted (as if beyond the bounds): whatever the
        // disk still holds at 4 or after, a read does not go there.
        tail.remove_from(4);
        tail.remove_through(3);
        assert!(tail.entries.is_empty());
        let view = tail.view(1, None);
        assert_eq!(view.end, Some(4));
        assert_eq!(view.removals, before + 2);
        assert!(tail.view(4, Some(10)).end.is_some_and(|end| end <= 4));
    }

    #[test]
    fn truncation_and_purge_keep_the_byte_count() {
        let mut tail = Tail::default();
        let all = run(1, 1..11);
        let a = tail.append(&all);
        tail.durable(&written(a, &all, 7));
        tail.remove_from(9);
        assert_eq!(indexes(&tail), (1..9).collect::<Vec<_>>());
        assert_eq!(tail.durable_bytes, 56);
        tail.remove_through(3);
        assert_eq!(indexes(&tail), (4..9).collect::<Vec<_>>());
        assert_eq!(tail.durable_bytes, 35);
        tail.remove_through(u64::MAX);
        assert!(tail.entries.is_empty());
        assert_eq!(tail.durable_bytes, 0);
        // A later append replaces from its first index on.
        let b = tail.append(&run(2, 1..3));
        assert_eq!(b, a + 1);
        assert_eq!(tail.last_log_id().map(|l| l.index), Some(2));
    }
}
