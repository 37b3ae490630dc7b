//! Group commit of client writes on the leader.
//!
//! openraft 0.9's core appends one client write at a time and waits for that append's
//! fsync before it takes the next, so concurrent writers would each pay a full fsync in
//! turn. Writes queue here instead: at most [`IN_FLIGHT`] Raft entries are proposed at
//! once, and each takes every write that queued meanwhile (up to [`MAX_BATCH`]) as one
//! [`Proposal`]. A lone write goes at once; under load, writes share entries and fsyncs.
//! Each write keeps its own request id, reply and place in the order.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::shared::{Attempt, write_error};
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
    jobs: mpsc::UnboundedSender<Job>,
}

impl Proposer {
    pub fn start(raft: Raft) -> Self {
        let (jobs, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(raft, rx));
        Self { jobs }
    }

    /// Propose `request` (with whatever else is queued) and wait until it is applied.
    pub async fn propose(&self, request: Request) -> Outcome {
        let (reply, rx) = oneshot::channel();
        let stopped = || Attempt::Failed(tonic::Status::unavailable("the registry is stopping"));
        self.jobs
            .send(Job { request, reply })
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

async fn run(raft: Raft, mut rx: mpsc::UnboundedReceiver<Job>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
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
        let raft = raft.clone();
        tokio::spawn(async move {
            let result = raft.client_write(Proposal(requests)).await;
            drop(slot);
            match result {
                Ok(resp) => {
                    let index = resp.log_id.index;
                    let mut data = resp.data.into_iter();
                    for reply in replies {
                        let outcome = match data.next() {
                            Some(r) => Ok((r, index)),
                            None => Err(Attempt::Failed(tonic::Status::internal(
                                "the state machine returned fewer replies than writes",
                            ))),
                        };
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
