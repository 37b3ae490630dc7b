//! The log writer thread: queued writes made durable in order, a batch per fsync, then
//! the callers told; and its fault hook for crash tests ([`WriterFault`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Condvar, Mutex};

use meshbridge_core::sync::lock;
use openraft::storage::LogFlushed;
use prometheus_client::metrics::histogram::Histogram;
use redb::{Database, Durability};
use tokio::sync::oneshot;

use super::tail::SharedTail;
use crate::store::{KEY_COMMITTED, KEY_LAST_PURGED, KEY_VOTE, LOGS, META, StoreError, encode};
use crate::types::{Entry, LogId, TypeConfig, Vote};

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
    pub(super) fn may_commit(&self) -> bool {
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
    pub(super) fn committed(&self) {
        self.committing.store(false, Ordering::SeqCst);
        if self.armed.load(Ordering::SeqCst) {
            let _state = lock(&self.state);
            self.changed.notify_all();
        }
    }

    pub(super) fn crashed(&self) -> bool {
        self.armed.load(Ordering::SeqCst) && lock(&self.state).crashed
    }
}

pub(super) type Done = oneshot::Sender<Result<(), StoreError>>;

/// One write, queued for the writer thread.
pub(super) enum Job {
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

/// The writer thread's queue; dropped with the last clone of the store, which closes the
/// queue and waits for the thread, so the file is closed when the store is gone.
pub(super) struct WriterHandle {
    pub(super) jobs: Option<std_mpsc::Sender<Job>>,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
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

/// The thread that makes queued writes durable, in order, a batch per fsync.
pub(super) struct Writer {
    pub(super) db: Arc<Database>,
    pub(super) tail: SharedTail,
    pub(super) flush_time: Option<Histogram>,
    pub(super) fault: Arc<WriterFault>,
}

impl Writer {
    pub(super) fn run(self, rx: &std_mpsc::Receiver<Job>) {
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
