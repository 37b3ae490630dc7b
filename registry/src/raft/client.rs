//! Raft RPCs to one peer ([`PeerClient`], made by the node's [`Network`]): unary calls
//! with a timeout each, and AppendEntries on one stream per peer that also carries the
//! early appends ([`super::peers`]) and answers openraft's requests from their replies
//! ([`super::ledger`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshbridge_core::client::MAX_MESSAGE_BYTES;
use meshbridge_core::proto::{self, raft_client::RaftClient};
use meshbridge_core::sync::lock;
use openraft::error::{Infallible, NetworkError, RPCError, RemoteError, Timeout, Unreachable};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::{debug, info};

use super::ledger::{EarlyKey, Ledger, Verdict};
use super::peers::{EarlyLane, LANE_QUEUE, LaneSender, Peers};
use super::wire::{EARLY_APPEND_HEADER, Progress};
use crate::error::ApiError;
use crate::metrics::PeerLabel;
use crate::types::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotError, InstallSnapshotRequest,
    InstallSnapshotResponse, Node, NodeId, RaftError, TypeConfig, VoteRequest, VoteResponse,
};

/// The [`RaftNetworkFactory`] of a node.
#[derive(Clone)]
pub struct Network {
    peers: Arc<Peers>,
    append_time: Family<PeerLabel, Histogram>,
}

impl Network {
    /// `append_time` observes every successful AppendEntries round trip, by peer.
    pub fn new(peers: Arc<Peers>, append_time: Family<PeerLabel, Histogram>) -> Self {
        Self { peers, append_time }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerClient {
        PeerClient {
            target,
            node: node.clone(),
            peers: self.peers.clone(),
            announced: None,
            lane: Lane::Closed,
            answered: Ledger::default(),
            append_time: self
                .append_time
                .get_or_create(&PeerLabel { peer: target })
                .clone(),
        }
    }
}

/// Raft RPCs to one peer.
pub struct PeerClient {
    pub(super) target: NodeId,
    pub(super) node: Node,
    pub(super) peers: Arc<Peers>,
    /// The snapshot whose sending was last logged (a peer that is down gets the first
    /// chunk again and again; the log says so once).
    pub(super) announced: Option<String>,
    pub(super) lane: Lane,
    /// Early appends the follower answered with success.
    pub(super) answered: Ledger,
    pub(super) append_time: Histogram,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, Node, RaftError<E>>>;

impl Drop for PeerClient {
    fn drop(&mut self) {
        self.close_lane();
    }
}

impl PeerClient {
    /// Ends the AppendEntries stream (the next request opens a new one).
    fn close_lane(&mut self) {
        if let Lane::Open { requests, .. } = &self.lane {
            self.peers.drop_early_lane(self.target, requests);
        }
        self.answered.clear();
        if !matches!(self.lane, Lane::Unsupported) {
            self.lane = Lane::Closed;
        }
    }

    async fn call<Req, Resp, E, F, Fut>(
        &self,
        action: RPCTypes,
        req: &Req,
        timeout: Duration,
        send: F,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
        F: FnOnce(RaftClient<Channel>, proto::RaftMessage) -> Fut,
        Fut: Future<Output = Result<tonic::Response<proto::RaftReply>, Status>>,
    {
        let json = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let client = self.client()?;
        let sent = tokio::time::timeout(
            timeout,
            send(client, proto::RaftMessage { json, early: false }),
        )
        .await;
        let reply = match sent {
            Err(_) => {
                return Err(RPCError::Timeout(Timeout {
                    action,
                    id: self.peers.node_id,
                    target: self.target,
                    timeout,
                }));
            }
            Ok(Err(status)) => return Err(transport_error(&status)),
            Ok(Ok(reply)) => reply.into_inner(),
        };
        self.decode_reply(reply)
    }

    // The error type is openraft's, as its `RaftNetwork` methods return it.
    #[allow(clippy::result_large_err)]
    fn decode_reply<Resp, E>(&self, reply: proto::RaftReply) -> RpcResult<Resp, E>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        match reply.result {
            Some(proto::raft_reply::Result::Ok(bytes)) => {
                serde_json::from_slice(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))
            }
            Some(proto::raft_reply::Result::Err(bytes)) => {
                let err: RaftError<E> = serde_json::from_slice(&bytes)
                    .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
                Err(RPCError::RemoteError(RemoteError::new_with_node(
                    self.target,
                    self.node.clone(),
                    err,
                )))
            }
            None => Err(RPCError::Network(NetworkError::new(&ApiError::Internal(
                "empty raft reply".into(),
            )))),
        }
    }

    #[allow(clippy::result_large_err)]
    fn client<E: std::error::Error>(
        &self,
    ) -> Result<RaftClient<Channel>, RPCError<NodeId, Node, RaftError<E>>> {
        let channel = self
            .peers
            .channel(self.target, &self.node.addr)
            .map_err(|s| RPCError::Unreachable(Unreachable::new(&s)))?;
        Ok(RaftClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// AppendEntries on the stream to the peer, opened on first use (and after any
    /// failure). `None`: the peer does not know the stream; use the unary call.
    async fn append_on_stream(
        &mut self,
        json: Vec<u8>,
    ) -> Option<RpcResult<AppendEntriesResponse, Infallible>> {
        let message = proto::RaftMessage { json, early: false };
        match &self.lane {
            Lane::Unsupported => return None,
            Lane::Closed => match self.open_lane(message).await {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) => return Some(Err(e)),
            },
            Lane::Open { requests, .. } => {
                if requests.send(message).await.is_err() {
                    return Some(Err(lane_closed("the request stream ended")));
                }
            }
        }
        // Replies come in the order of the requests; those to early appends sent before
        // this request are kept for openraft's matching requests.
        let reply = loop {
            match self.next_reply().await {
                Ok(Reply::Early) => {}
                Ok(Reply::Ours(reply)) => break reply,
                Err(e) => return Some(Err(e)),
            }
        };
        Some(self.decode_reply(reply))
    }

    /// The next reply on the open stream; an early one is filed under its key.
    async fn next_reply(&mut self) -> Result<Reply, RPCError<NodeId, Node, RaftError<Infallible>>> {
        let Lane::Open {
            replies,
            unanswered,
            ..
        } = &mut self.lane
        else {
            return Err(lane_closed("the stream is not open"));
        };
        let reply = match replies.message().await {
            Ok(Some(reply)) => reply,
            Ok(None) => return Err(lane_closed("the peer ended the stream")),
            Err(status) => return Err(transport_error(&status)),
        };
        if !reply.early {
            return Ok(Reply::Ours(reply));
        }
        let Some(key) = unanswered.as_ref().and_then(|u| lock(u).pop_front()) else {
            return Err(lane_closed("a reply to an early append that was not sent"));
        };
        if let Ok(AppendEntriesResponse::Success) = self.decode_reply::<_, Infallible>(reply) {
            self.answered.answered(key);
        }
        Ok(Reply::Early)
    }

    /// Whether the follower answered early appends of exactly `rpc`'s entries with
    /// success (see [`Ledger::verdict`]), reading the replies still to come for the next
    /// link of a chain. `false`: send it.
    async fn early_answer(
        &mut self,
        rpc: &AppendEntriesRequest,
    ) -> Result<bool, RPCError<NodeId, Node, RaftError<Infallible>>> {
        loop {
            let verdict = match &self.lane {
                Lane::Open {
                    unanswered: Some(unanswered),
                    ..
                } => self.answered.verdict(rpc, lock(unanswered).iter()),
                _ => self.answered.verdict(rpc, []),
            };
            match verdict {
                Verdict::Answered => return Ok(true),
                Verdict::Send => return Ok(false),
                // No request of ours is outstanding, so every reply until then is an early
                // one.
                Verdict::AwaitReply => {
                    if let Reply::Ours(_) = self.next_reply().await? {
                        return Err(lane_closed("a reply to no request"));
                    }
                }
            }
        }
    }

    /// Opens the stream with `first` queued on it (so it is carried whether or not the
    /// server answers headers before it reads). `false`: the peer answered UNIMPLEMENTED.
    async fn open_lane(
        &mut self,
        first: proto::RaftMessage,
    ) -> Result<bool, RPCError<NodeId, Node, RaftError<Infallible>>> {
        let mut client = self.client()?;
        let (requests, rx) = mpsc::channel(LANE_QUEUE);
        if requests.send(first).await.is_err() {
            return Err(lane_closed("the request stream ended"));
        }
        let outgoing =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        match client.append_stream(outgoing).await {
            Ok(response) => {
                let early = response.metadata().contains_key(EARLY_APPEND_HEADER);
                info!(peer = self.target, early, "AppendEntries stream open");
                let unanswered = early.then(|| {
                    let lane = EarlyLane {
                        requests: requests.clone(),
                        unanswered: Arc::default(),
                    };
                    let unanswered = lane.unanswered.clone();
                    self.peers.add_early_lane(self.target, lane);
                    unanswered
                });
                self.lane = Lane::Open {
                    requests,
                    replies: Box::new(response.into_inner()),
                    unanswered,
                };
                Ok(true)
            }
            Err(status) if status.code() == Code::Unimplemented => {
                info!(
                    peer = self.target,
                    "peer has no AppendEntries stream; unary calls"
                );
                self.lane = Lane::Unsupported;
                Ok(false)
            }
            Err(status) => Err(transport_error(&status)),
        }
    }
}

/// A reply read from an AppendEntries stream.
enum Reply {
    /// To an early append (filed by [`PeerClient::next_reply`]).
    Early,
    /// To the request this client sent.
    Ours(proto::RaftReply),
}

/// The AppendEntries stream of a [`PeerClient`].
pub(super) enum Lane {
    /// Not open (yet, or since a failure).
    Closed,
    Open {
        requests: LaneSender,
        replies: Box<tonic::Streaming<proto::RaftReply>>,
        /// Early appends sent on it and not answered yet (if it takes them).
        unanswered: Option<Arc<Mutex<VecDeque<EarlyKey>>>>,
    },
    /// The peer answered UNIMPLEMENTED (an older version): unary calls from now on.
    Unsupported,
}

fn lane_closed(why: &str) -> RPCError<NodeId, Node, RaftError<Infallible>> {
    RPCError::Network(NetworkError::new(&ApiError::PeerUnavailable(format!(
        "AppendEntries stream: {why}"
    ))))
}

/// Connection failures make openraft back off ("unreachable"); other failures are retried
/// at its normal pace.
fn transport_error<E: std::error::Error>(status: &Status) -> RPCError<NodeId, Node, RaftError<E>> {
    match status.code() {
        Code::Unavailable | Code::PermissionDenied | Code::Unauthenticated => {
            RPCError::Unreachable(Unreachable::new(status))
        }
        _ => RPCError::Network(NetworkError::new(status)),
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse, Infallible> {
        let started = std::time::Instant::now();
        let timeout = option.hard_ttl();
        let mut streamed = None;
        if !matches!(self.lane, Lane::Unsupported) {
            let attempt = async {
                // The same entries sent early and answered with success: that is the
                // answer.
                if !rpc.entries.is_empty() {
                    match self.early_answer(&rpc).await {
                        Ok(true) => {
                            let peer = PeerLabel { peer: self.target };
                            self.peers.early.answered.get_or_create(&peer).inc();
                            return Some(Ok(AppendEntriesResponse::Success));
                        }
                        Ok(false) => {}
                        Err(e) => return Some(Err(e)),
                    }
                }
                let json = match serde_json::to_vec(&rpc) {
                    Ok(json) => json,
                    Err(e) => return Some(Err(RPCError::Network(NetworkError::new(&e)))),
                };
                self.append_on_stream(json).await
            };
            streamed = match tokio::time::timeout(timeout, attempt).await {
                Ok(r) => r,
                Err(_) => Some(Err(RPCError::Timeout(Timeout {
                    action: RPCTypes::AppendEntries,
                    id: self.peers.node_id,
                    target: self.target,
                    timeout,
                }))),
            };
        }
        let reply = match streamed {
            Some(reply) => {
                // After any failure the stream may be out of step: the next call opens a
                // new one.
                if reply.is_err() {
                    self.close_lane();
                }
                reply
            }
            None => {
                self.call(
                    RPCTypes::AppendEntries,
                    &rpc,
                    timeout,
                    |mut c, m| async move { c.append_entries(m).await },
                )
                .await
            }
        };
        if reply.is_ok() {
            self.append_time.observe(started.elapsed().as_secs_f64());
        }
        reply
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse, InstallSnapshotError> {
        let progress = Progress {
            id: &rpc.meta.snapshot_id,
            offset: rpc.offset,
            len: rpc.data.len(),
            done: rpc.done,
        };
        let new = self.announced.as_deref() != Some(rpc.meta.snapshot_id.as_str());
        if (rpc.offset == 0 && new) || rpc.done {
            info!(peer = self.target, snapshot = %progress, "sending snapshot");
            self.announced = Some(rpc.meta.snapshot_id.clone());
        } else {
            debug!(peer = self.target, snapshot = %progress, "sending snapshot chunk");
        }
        self.call(
            RPCTypes::InstallSnapshot,
            &rpc,
            option.hard_ttl(),
            |mut c, m| async move { c.install_snapshot(m).await },
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest,
        option: RPCOption,
    ) -> RpcResult<VoteResponse, Infallible> {
        self.call(
            RPCTypes::Vote,
            &rpc,
            option.hard_ttl(),
            |mut c, m| async move { c.vote(m).await },
        )
        .await
    }
}
