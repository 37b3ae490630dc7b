//! Where a call runs: on this node when it leads, else forwarded to the leader
//! ([`Shared::on_leader`]), following leader changes until the node's leader wait runs
//! out; and the leader's own operations, proposing writes and confirming reads.

use std::time::{Duration, Instant};

use meshbridge_core::client::{LEADER_HINT, MAX_MESSAGE_BYTES, REQUEST_ID};
use meshbridge_core::model::Command;
use meshbridge_core::proto::{self, registry_client::RegistryClient as Grpc};
use openraft::error::CheckIsLeaderError;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::error::{ApiError, Attempt};
use crate::metrics::MethodLabel;
use crate::shared::Shared;
use crate::types::{NodeId, RaftError, Request as Write, RequestId};

/// Metadata key set on requests a node forwards to the leader: the leader must serve them
/// itself (never forward again), so two nodes with different ideas of the leader cannot
/// bounce a request between them.
pub const FORWARDED: &str = "x-meshbridge-forwarded";

/// The client's request id of a write, read from the request metadata
/// ([`REQUEST_ID`](meshbridge_core::client::REQUEST_ID)); `None` when absent. A malformed
/// id is refused.
pub fn request_id<T>(req: &Request<T>) -> Result<Option<RequestId>, ApiError> {
    let Some(value) = req.metadata().get(REQUEST_ID) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::bad_request(REQUEST_ID, "not ASCII"))?;
    text.parse()
        .map(Some)
        .map_err(|e| ApiError::bad_request(REQUEST_ID, e))
}

enum Route {
    Local,
    /// To the leader, node `.1`.
    Forward(Grpc<Channel>, NodeId),
}

impl Shared {
    /// Where calls go now; waits for a leader until `deadline`.
    async fn route(&self, forwarded: bool, deadline: Instant) -> Result<Route, ApiError> {
        let mut metrics = self.raft.metrics();
        loop {
            let (leader, addr) = {
                let m = metrics.borrow_and_update();
                let leader = m.current_leader;
                let addr = leader.and_then(|l| {
                    m.membership_config
                        .membership()
                        .get_node(&l)
                        .map(|n| n.addr.clone())
                });
                (leader, addr)
            };
            match (leader, addr) {
                (Some(l), _) if l == self.node_id => return Ok(Route::Local),
                (Some(l), Some(_)) if forwarded => {
                    return Err(ApiError::NotLeaderAnyMore {
                        node: self.node_id,
                        leader: l,
                    });
                }
                (Some(l), Some(addr)) => {
                    let channel = self.peers.channel(l, &addr)?;
                    return Ok(Route::Forward(
                        Grpc::new(channel)
                            .max_decoding_message_size(MAX_MESSAGE_BYTES)
                            .max_encoding_message_size(MAX_MESSAGE_BYTES),
                        l,
                    ));
                }
                _ => {}
            }
            match tokio::time::timeout_at(deadline.into(), metrics.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(ApiError::Stopping),
                Err(_) => return Err(ApiError::NoLeader(self.leader_wait)),
            }
        }
    }

    /// Runs `local` on the leader: here when this node leads, else by calling `forward`
    /// on the leader's gRPC client with the request marked as forwarded. The caller sees no
    /// difference. Leader changes in between are followed until `leader_wait` runs out:
    /// a leader that cannot be reached (it just died, and this node has not noticed yet) is
    /// asked again once the metrics name another leader. Writes carry the client's request
    /// id, so asking again cannot apply one twice.
    pub async fn on_leader<R, T, L, LFut, F, FFut>(
        &self,
        method: &'static str,
        req: Request<R>,
        local: L,
        forward: F,
    ) -> Result<Response<T>, Status>
    where
        R: Clone,
        L: Fn() -> LFut,
        LFut: Future<Output = Result<T, Attempt>>,
        F: Fn(Grpc<Channel>, Request<R>) -> FFut,
        FFut: Future<Output = Result<Response<T>, Status>>,
    {
        let forwarded = req.metadata().contains_key(FORWARDED);
        let request_id = req.metadata().get(REQUEST_ID).cloned();
        let body = req.into_inner();
        let deadline = Instant::now() + self.leader_wait;
        loop {
            match self.route(forwarded, deadline).await? {
                Route::Local => match local().await {
                    Ok(v) => return Ok(self.with_leader_hint(Response::new(v))),
                    Err(Attempt::Failed(e)) => return Err(e.into()),
                    Err(Attempt::NotLeader) => {
                        if forwarded || Instant::now() >= deadline {
                            return Err(ApiError::LostLeadership(self.node_id).into());
                        }
                        // Let the metrics catch up with the new leader.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                },
                Route::Forward(client, leader) => {
                    self.metrics
                        .forwarded
                        .get_or_create(&MethodLabel { method })
                        .inc();
                    let mut req = Request::new(body.clone());
                    let meta = req.metadata_mut();
                    meta.insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
                    if let Some(id) = &request_id {
                        meta.insert(REQUEST_ID, id.clone());
                    }
                    // No deadline of our own: the caller's (its attempt timeout) bounds
                    // the call, and cancelling it cancels the forwarded call too. Calls
                    // may legitimately be long (adding a learner waits for it to catch up).
                    match forward(client, req).await {
                        Err(status)
                            if status.code() == Code::Unavailable && Instant::now() < deadline =>
                        {
                            tracing::debug!(leader, method, error = %status.message(), "leader unavailable; waiting for a new one");
                            self.leader_changed_from(leader, deadline).await;
                        }
                        answer => return answer,
                    }
                }
            }
        }
    }

    /// Adds this node's membership URL as the leader hint, so clients send their next
    /// leader-bound call here directly instead of through a follower.
    fn with_leader_hint<T>(&self, mut resp: Response<T>) -> Response<T> {
        let url = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&self.node_id)
            .map(|n| n.addr.clone());
        if let Some(v) = url.and_then(|u| tonic::metadata::MetadataValue::try_from(u).ok()) {
            resp.metadata_mut().insert(LEADER_HINT, v);
        }
        resp
    }

    /// Waits (briefly, at most until `deadline`) for the metrics to name a leader other
    /// than `old`.
    async fn leader_changed_from(&self, old: NodeId, deadline: Instant) {
        let until = deadline.min(Instant::now() + Duration::from_millis(200));
        let mut metrics = self.raft.metrics();
        let _ = tokio::time::timeout_at(
            until.into(),
            metrics.wait_for(|m| m.current_leader.is_some_and(|l| l != old)),
        )
        .await;
    }

    /// Proposes the node's own `cmd` (this node must lead) and answers its applied result.
    pub async fn propose(&self, cmd: Command) -> Result<proto::WriteReply, Attempt> {
        self.propose_request(Write::from(cmd)).await
    }

    /// Proposes a client's write; a repeated request id is answered, not applied again.
    pub async fn propose_request(&self, req: Write) -> Result<proto::WriteReply, Attempt> {
        req.command.validate().map_err(ApiError::Rejected)?;
        let start = Instant::now();
        let (data, log_index) = self.proposer.propose(req).await?;
        self.metrics.observe_apply(start.elapsed());
        match data {
            Ok(applied) => Ok(proto::WriteReply {
                revision: applied.revision,
                changed: !applied.changes.is_empty(),
                log_index,
            }),
            Err(rejection) => Err(ApiError::Rejected(rejection).into()),
        }
    }

    /// Confirms this node's leadership with a quorum and waits until everything committed
    /// before now is applied here: a read of [`Shared::catalog`] after it is linearizable.
    pub async fn linearize(&self) -> Result<(), Attempt> {
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => {
                Err(Attempt::NotLeader)
            }
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e))) => {
                Err(ApiError::NoQuorum(e.to_string()).into())
            }
            Err(RaftError::Fatal(f)) => Err(ApiError::RaftStopped(f.to_string()).into()),
        }
    }
}
