//! Group commit of client writes on the leader.
//!
//! openraft 0.9's core appends one client write at a time and waits for that append's
//! fsync before it takes the next, so concurrent writers would each pay a full fsync in
//! turn. Writes queue here instead: at most [`IN_FLIGHT`] Raft entries are proposed at
//! once, and each takes every write that queued meanwhile (up to [`MAX_BATCH`]) as one
//! [`Proposal`]. A lone write goes at once, from the caller's own task (when nothing is
//! queued and an entry slot is free), without the two task hand-offs of the queue; under
//! load, writes share entries and fsyncs. Each write keeps its own request id and reply,
//! and writes that queue keep their order.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::error::{ApiError, Attempt, write_error};
use crate::types::{Proposal, Raft, Request, Response};

/// Raft entries of client writes proposed and not yet applied, at most.
pub const IN_FLIGHT: usize = 4;
/// Writes in one entry, at most.
pub const MAX_BATCH: usize = 512;

/// What a proposed write got: its reply and the index of the entry that carried it.
pub type Outcome = Result<(Response, u64), Attempt>;

struct Job {
    request: Request,
    reply: oneshot::Sender<Outcome>,
}

/// The queue in front of [`Raft::client_write`]; the batching task stops when it is dropped.
pub struct Proposer {
    raft: Raft,
    jobs: mpsc::UnboundedSender<Job>,
    /// Jobs sent and not yet taken by the batching task.
    queued: Arc<AtomicUsize>,
    slots: Arc<Semaphore>,
}

impl Proposer {
    pub fn start(raft: Raft) -> Self {
        let (jobs, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let slots = Arc::new(Semaphore::new(IN_FLIGHT));
        tokio::spawn(run(raft.clone(), rx, queued.clone(), slots.clone()));
        Self {
            raft,
            jobs,
            queued,
            slots,
        }
    }

    /// Propose `request` (with whatever else is queued) and wait until it is applied.
    pub async fn propose(&self, request: Request) -> Outcome {
        if self.queued.load(Ordering::Acquire) == 0
            && let Ok(slot) = self.slots.clone().try_acquire_owned()
        {
            let result = self.raft.client_write(Proposal(vec![request])).await;
            drop(slot);
            return match result {
                Ok(resp) => {
                    let index = resp.log_id.index;
                    resp.data
                        .into_iter()
                        .next()
                        .map(|r| (r, index))
                        .ok_or_else(too_few)
                }
                Err(e) => Err(write_error(e)),
            };
        }
        let (reply, rx) = oneshot::channel();
        let stopped = || Attempt::Failed(ApiError::Stopping);
        self.queued.fetch_add(1, Ordering::AcqRel);
        if self.jobs.send(Job { request, reply }).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(stopped());
        }
        rx.await.map_err(|_| stopped())?
    }
}

fn too_few() -> Attempt {
    Attempt::Failed(ApiError::Internal(
        "the state machine returned fewer replies than writes".into(),
    ))
}

async fn run(
    raft: Raft,
    mut rx: mpsc::UnboundedReceiver<Job>,
    queued: Arc<AtomicUsize>,
    slots: Arc<Semaphore>,
) {
    loop {
        let Some(first) = rx.recv().await else {
            return;
        };
        // Held while waiting for a slot: callers queue behind it instead of overtaking.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut requests = vec![first.request];
        let mut replies = vec![first.reply];
        while requests.len() < MAX_BATCH
            && let Ok(job) = rx.try_recv()
        {
            requests.push(job.request);
            replies.push(job.reply);
        }
        queued.fetch_sub(requests.len(), Ordering::AcqRel);
        let raft = raft.clone();
        tokio::spawn(async move {
            let result = raft.client_write(Proposal(requests)).await;
            drop(slot);
            match result {
                Ok(resp) => {
                    let index = resp.log_id.index;
                    let mut data = resp.data.into_iter();
                    for reply in replies {
                        let outcome = data.next().map(|r| (r, index)).ok_or_else(too_few);
                        let _ = reply.send(outcome);
                    }
                }
                Err(e) => {
                    let attempt = write_error(e);
                    for reply in replies {
                        let _ = reply.send(Err(attempt.clone()));
                    }
                }
            }
        });
    }
}
