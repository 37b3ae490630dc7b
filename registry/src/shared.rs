//! What the gRPC services of a node share: its Raft, catalog feed, peers and metrics, and
//! the one place that decides whether a call runs here (on the leader) or is forwarded to
//! the leader ([`Shared::on_leader`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshbridge_core::client::{LEADER_HINT, MAX_MESSAGE_BYTES, REQUEST_ID};
use meshbridge_core::model::{Catalog, Command};
use meshbridge_core::proto::{self, registry_client::RegistryClient as Grpc, rejection_to_status};
use openraft::error::{CheckIsLeaderError, ClientWriteError};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::config::LeaseConfig;
use crate::metrics::{MethodLabel, Metrics};
use crate::network::Peers;
use crate::store::Feed;
use crate::types::{NodeId, Raft, RaftError, Request as Write, RequestId};

/// Metadata key set on requests a node forwards to the leader: the leader must serve them
/// itself (never forward again), so two nodes with different ideas of the leader cannot
/// bounce a request between them.
pub const FORWARDED: &str = "x-meshbridge-forwarded";

/// The client's request id of a write, read from the request metadata
/// ([`REQUEST_ID`](meshbridge_core::client::REQUEST_ID)); `None` when absent. A malformed
/// id is refused.
pub fn request_id<T>(req: &Request<T>) -> Result<Option<RequestId>, Status> {
    let Some(value) = req.metadata().get(REQUEST_ID) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| Status::invalid_argument(format!("{REQUEST_ID}: not ASCII")))?;
    text.parse()
        .map(Some)
        .map_err(|e| Status::invalid_argument(format!("{REQUEST_ID}: {e}")))
}

/// How one attempt on the leader went.
#[derive(Clone, Debug)]
pub enum Attempt {
    /// This node is not (or no longer) the leader: route again.
    NotLeader,
    /// A final answer for the caller.
    Failed(Status),
}

impl From<Status> for Attempt {
    fn from(s: Status) -> Self {
        Attempt::Failed(s)
    }
}

/// Errors of Raft writes (commands and membership changes) as attempts.
pub fn write_error(e: RaftError<crate::types::ClientWriteError>) -> Attempt {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => Attempt::NotLeader,
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            Attempt::Failed(Status::failed_precondition(e.to_string()))
        }
        RaftError::Fatal(f) => Attempt::Failed(Status::unavailable(format!("raft stopped: {f}"))),
    }
}

pub struct Shared {
    pub node_id: NodeId,
    pub raft: Raft,
    pub feed: Arc<Feed>,
    pub peers: Arc<Peers>,
    pub trust_domain: Arc<str>,
    pub leases: LeaseConfig,
    pub metrics: Metrics,
    /// How long a call waits for a leader to be elected before answering `Unavailable`.
    pub leader_wait: Duration,
    /// A node out of touch with the cluster for this long ends its watch streams, so that
    /// watchers move to a node that still learns of new revisions (see
    /// [`Shared::in_touch`]).
    pub detach_after: Duration,
    /// Cancelled at shutdown: ends watch streams.
    pub stop: CancellationToken,
    /// The last catalog encoded for a watch reset (see [`Shared::catalog_json`]).
    pub reset_cache: std::sync::Mutex<Option<(u64, bytes::Bytes)>>,
    /// Batches concurrent writes into Raft entries (group commit).
    pub proposer: crate::propose::Proposer,
    /// This node's identity (its SVID and bundles, for the certificate report).
    pub identity: Arc<meshbridge_core::tls::Identity>,
    /// Client SVIDs this node has seen.
    pub seen: crate::certs::Seen,
    /// Watch streams open on this node, by caller id (quota: [`MAX_WATCHES_PER_CALLER`]).
    pub watches: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

/// Watch streams one caller (SPIFFE id) may have open on one node. A gateway, agent or DNS
/// server needs one; the rest is headroom for restarts whose old streams are still closing.
pub const MAX_WATCHES_PER_CALLER: usize = 16;

/// One open watch stream of a caller; given back on drop.
pub struct WatchSlot {
    counts: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    caller: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut counts = meshbridge_core::sync::lock(&self.counts);
        if let Some(n) = counts.get_mut(&self.caller) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.caller);
            }
        }
    }
}

impl Shared {
    /// A slot for one more watch stream of `caller`, or the refusal at the quota.
    pub fn watch_slot(&self, caller: &str) -> Result<WatchSlot, tonic::Status> {
        let mut counts = meshbridge_core::sync::lock(&self.watches);
        let n = counts.entry(caller.to_owned()).or_default();
        if *n >= MAX_WATCHES_PER_CALLER {
            return Err(tonic::Status::resource_exhausted(format!(
                "{caller} has {MAX_WATCHES_PER_CALLER} watch streams open on this node already (the limit per caller)"
            )));
        }
        *n += 1;
        Ok(WatchSlot {
            counts: self.watches.clone(),
            caller: caller.to_owned(),
        })
    }
}

/// The wall clock in milliseconds since the epoch.
pub use meshbridge_core::clock::unix_ms as now_ms;

enum Route {
    Local,
    /// To the leader, node `.1`.
    Forward(Grpc<Channel>, NodeId),
}

impl Shared {
    /// The catalog as applied on this node.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.feed.latest()
    }

    /// The catalog as JSON for watch resets, encoded once per revision and shared by every
    /// watcher that needs it (after a node loss, many reconnect at once).
    pub fn catalog_json(&self) -> Result<(u64, bytes::Bytes), serde_json::Error> {
        let catalog = self.catalog();
        let mut cached = meshbridge_core::sync::lock(&self.reset_cache);
        if let Some((revision, json)) = &*cached
            && *revision == catalog.revision
        {
            return Ok((*revision, json.clone()));
        }
        let json = bytes::Bytes::from(serde_json::to_vec(&*catalog)?);
        *cached = Some((catalog.revision, json.clone()));
        Ok((catalog.revision, json))
    }

    /// Whether this node is in touch with a working cluster: it follows a known leader, or
    /// it leads and a quorum acknowledged it recently. A node cut off from the majority is
    /// not (a follower loses its leader at its next election timeout; a leader stops being
    /// acknowledged), and its replica stops moving without it being able to tell a quiet
    /// catalog from a partition.
    pub fn in_touch(&self) -> bool {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        match m.current_leader {
            None => false,
            Some(l) if l == self.node_id => {
                let alone = m.membership_config.membership().voter_ids().count() == 1;
                let limit = u64::try_from(self.detach_after.as_millis()).unwrap_or(u64::MAX) / 2;
                alone || m.millis_since_quorum_ack.is_some_and(|ms| ms < limit)
            }
            Some(_) => true,
        }
    }

    /// Where calls go now; waits for a leader until `deadline`.
    async fn route(&self, forwarded: bool, deadline: Instant) -> Result<Route, Status> {
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
                    return Err(Status::unavailable(format!(
                        "node {} is not the leader any more (node {l} is)",
                        self.node_id
                    )));
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
                Ok(Err(_)) => return Err(Status::unavailable("raft is shutting down")),
                Err(_) => {
                    return Err(Status::unavailable(format!(
                        "no leader elected in {:?}",
                        self.leader_wait
                    )));
                }
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
                    Err(Attempt::Failed(status)) => return Err(status),
                    Err(Attempt::NotLeader) => {
                        if forwarded || Instant::now() >= deadline {
                            return Err(Status::unavailable(format!(
                                "node {} lost the leadership",
                                self.node_id
                            )));
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
        req.command
            .validate()
            .map_err(|r| rejection_to_status(&r))?;
        let start = Instant::now();
        let (data, log_index) = self.proposer.propose(req).await?;
        self.metrics.observe_apply(start.elapsed());
        match data {
            Ok(applied) => Ok(proto::WriteReply {
                revision: applied.revision,
                changed: !applied.changes.is_empty(),
                log_index,
            }),
            Err(rejection) => Err(Attempt::Failed(rejection_to_status(&rejection))),
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
                Err(Attempt::Failed(Status::unavailable(format!(
                    "the leader cannot reach a quorum: {e}"
                ))))
            }
            Err(RaftError::Fatal(f)) => Err(Attempt::Failed(Status::unavailable(format!(
                "raft stopped: {f}"
            )))),
        }
    }
}
