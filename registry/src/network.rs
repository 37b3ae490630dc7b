//! openraft's network over tonic with mTLS: one cached HTTP/2 channel per peer (reused by
//! every RPC and every replication stream to it), a timeout per RPC, and openraft's own
//! serde types carried as JSON.
//!
//! Peers must present a registry SVID of our trust domain (`spiffe://<td>/registry/*`).
//!
//! **Early appends.** openraft 0.9 replicates a leader's new entries only after its own
//! fsync. [`Peers`] is the log store's [`EarlyAppend`]: when the leader's store begins an
//! append of its own entries, the same AppendEntries request openraft would send is put
//! on each follower's stream at once, marked `early`, so the follower's fsync runs while
//! the leader's does. The leader keeps the reply: when openraft then asks to send the
//! very same request (same vote, previous entry and entries) and the follower had answered
//! it with success, that reply is openraft's answer and nothing is sent again — a reply to
//! an identical request, only earlier than usual, as a slow network could deliver it
//! anyway. Any other request, or an early reply other than success, goes to the follower
//! as usual. This is what Raft allows any leader to do
//! (a leader counts itself towards a quorum only once its own fsync is done, which
//! openraft still decides); it only goes to followers whose stream answered the
//! [`EARLY_APPEND_HEADER`], so a node of an older version never sees one.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Display;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshbridge_core::client::{
    ChannelOptions, MAX_MESSAGE_BYTES, lazy_channel, registry_allow_list,
};
use meshbridge_core::proto::{self, raft_client::RaftClient};
use meshbridge_core::sync::lock;
use meshbridge_core::tls::Identity;
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

use crate::error::ApiError;
use crate::metrics::{EarlyMetrics, PeerLabel};
use crate::raft_api::EARLY_APPEND_HEADER;
use crate::store::EarlyAppend;
use crate::types::{
    AppendEntriesRequest, AppendEntriesResponse, Entry, InstallSnapshotError,
    InstallSnapshotRequest, InstallSnapshotResponse, LogId, Node, NodeId, RaftError, TypeConfig,
    Vote, VoteRequest, VoteResponse,
};

/// The sending end of an AppendEntries stream.
type LaneSender = mpsc::Sender<proto::RaftMessage>;

/// Which request an early append was: openraft's request for the same entries has the same
/// vote, previous and last entry (a leader's entries never change within its term).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct EarlyKey {
    vote: Vote,
    prev: Option<LogId>,
    last: LogId,
    /// The commit index it carried.
    commit: Option<LogId>,
}

/// An AppendEntries stream that takes early appends: its sender, and the early appends
/// sent on it whose replies have not been read yet, in order.
#[derive(Clone)]
struct EarlyLane {
    requests: LaneSender,
    unanswered: Arc<Mutex<VecDeque<EarlyKey>>>,
}

/// Early replies kept for openraft's matching requests; older ones are dropped.
const EARLY_ANSWERS: usize = 16;

/// Requests queued on an AppendEntries stream before the HTTP/2 stream takes them; early
/// appends that find it full are not sent.
const LANE_QUEUE: usize = 4;

/// Channels to the other nodes, shared by Raft replication and request forwarding.
pub struct Peers {
    node_id: NodeId,
    identity: Arc<Identity>,
    opts: ChannelOptions,
    overrides: BTreeMap<NodeId, String>,
    channels: Mutex<HashMap<NodeId, (String, Channel)>>,
    /// The AppendEntries streams that take early appends, by follower, oldest first.
    /// openraft makes a client per replication stream and also short-lived ones (for a
    /// linearizable read's heartbeat round); early appends go on the oldest open one, the
    /// replication stream's, so that they travel in order before openraft's own requests.
    early_lanes: Mutex<HashMap<NodeId, Vec<EarlyLane>>>,
    early: EarlyMetrics,
}

/// An early append: the JSON of openraft's `AppendEntriesRequest`, from borrowed parts.
#[derive(Serialize)]
struct EarlyRequest<'a> {
    vote: &'a Vote,
    prev_log_id: Option<LogId>,
    entries: &'a [Entry],
    /// The entry before them, committed: the follower learns the commit index from the
    /// early append, as it would from openraft's request that the early reply stands for
    /// (otherwise only from the next heartbeat, up to 100 ms later).
    leader_commit: Option<LogId>,
}

impl Peers {
    pub fn new(
        node_id: NodeId,
        identity: Arc<Identity>,
        overrides: BTreeMap<NodeId, String>,
        early: EarlyMetrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            node_id,
            identity,
            opts: ChannelOptions {
                connect_timeout: Duration::from_millis(500),
                keepalive_interval: Duration::from_secs(1),
                keepalive_timeout: Duration::from_secs(2),
            },
            overrides,
            channels: Mutex::new(HashMap::new()),
            early_lanes: Mutex::new(HashMap::new()),
            early,
        })
    }

    fn add_early_lane(&self, target: NodeId, lane: EarlyLane) {
        lock(&self.early_lanes)
            .entry(target)
            .or_default()
            .push(lane);
    }

    /// Forgets `lane`, one of `target`'s early lanes.
    fn drop_early_lane(&self, target: NodeId, lane: &LaneSender) {
        let mut lanes = lock(&self.early_lanes);
        if let Some(of_target) = lanes.get_mut(&target) {
            of_target.retain(|l| !l.requests.same_channel(lane));
            if of_target.is_empty() {
                lanes.remove(&target);
            }
        }
    }

    /// The channel to node `id` whose membership URL is `url` (made on first use; remade
    /// when the URL changes).
    pub fn channel(&self, id: NodeId, url: &str) -> Result<Channel, ApiError> {
        let url = self.overrides.get(&id).map_or(url, String::as_str);
        let mut channels = lock(&self.channels);
        if let Some((known, ch)) = channels.get(&id)
            && known == url
        {
            return Ok(ch.clone());
        }
        let allow = registry_allow_list(&self.identity);
        let ch = lazy_channel(url, &self.identity, allow, &self.opts)
            .map_err(|e| ApiError::Precondition(format!("node {id}: {e}")))?;
        channels.insert(id, (url.to_owned(), ch.clone()));
        Ok(ch)
    }
}

impl EarlyAppend for Peers {
    fn send(&self, vote: &Vote, prev_log_id: Option<LogId>, entries: &[Entry]) {
        let lanes: Vec<_> = lock(&self.early_lanes)
            .iter()
            .filter_map(|(id, lanes)| {
                let open = lanes.iter().find(|l| !l.requests.is_closed())?;
                Some((*id, open.clone()))
            })
            .collect();
        let Some(last) = entries.last() else { return };
        if lanes.is_empty() {
            return;
        }
        let key = EarlyKey {
            vote: *vote,
            prev: prev_log_id,
            last: last.log_id,
            commit: prev_log_id,
        };
        let request = EarlyRequest {
            vote,
            prev_log_id,
            entries,
            leader_commit: prev_log_id,
        };
        let json = match serde_json::to_vec(&request) {
            Ok(json) => json,
            Err(e) => {
                debug!(error = %e, "early append not encoded");
                return;
            }
        };
        for (peer, lane) in lanes {
            let message = proto::RaftMessage {
                json: json.clone(),
                early: true,
            };
            // A full queue means the stream is busy: openraft's own request will do. The
            // key goes in under the same lock as the message, so keys keep the order of
            // the replies.
            let mut unanswered = lock(&lane.unanswered);
            if lane.requests.try_send(message).is_ok() {
                unanswered.push_back(key);
                self.early.sent.get_or_create(&PeerLabel { peer }).inc();
            }
        }
    }
}

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
            answered: VecDeque::new(),
            append_time: self
                .append_time
                .get_or_create(&PeerLabel { peer: target })
                .clone(),
        }
    }
}

/// Raft RPCs to one peer.
pub struct PeerClient {
    target: NodeId,
    node: Node,
    peers: Arc<Peers>,
    /// The snapshot whose sending was last logged (a peer that is down gets the first
    /// chunk again and again; the log says so once).
    announced: Option<String>,
    lane: Lane,
    /// Early appends the follower answered with success, oldest first, not yet asked for.
    answered: VecDeque<EarlyKey>,
    append_time: Histogram,
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
            if self.answered.len() == EARLY_ANSWERS {
                self.answered.pop_front();
            }
            self.answered.push_back(key);
        }
        Ok(Reply::Early)
    }

    /// Whether the follower answered early appends of exactly `rpc`'s entries with
    /// success: one early append with the same vote, previous entry and last entry, or a
    /// chain of them (openraft may send in one request what was appended, and sent early,
    /// in several). Reads the replies still to come for the next link. `false`: send it.
    async fn early_answer(
        &mut self,
        rpc: &AppendEntriesRequest,
    ) -> Result<bool, RPCError<NodeId, Node, RaftError<Infallible>>> {
        let Some(last) = rpc.entries.last().map(|e| e.log_id) else {
            return Ok(false);
        };
        let link = |k: &EarlyKey, at: Option<LogId>| k.vote == rpc.vote && k.prev == at;
        let mut at = rpc.prev_log_id;
        loop {
            while let Some(k) = self.answered.iter().find(|k| link(k, at)) {
                if k.last == last {
                    // The request also carries the commit index; if it is newer than the
                    // follower got early (the entries were committed meanwhile, on
                    // another follower's reply), it must go, or this follower would learn
                    // it only at the next heartbeat.
                    let index = |c: Option<LogId>| c.map(|c| c.index);
                    if index(rpc.leader_commit) > index(k.commit) {
                        return Ok(false);
                    }
                    // Older ones will not be asked for: openraft moves forward.
                    self.answered.retain(|k| k.last.index > last.index);
                    return Ok(true);
                }
                if k.last.index > last.index {
                    return Ok(false);
                }
                at = Some(k.last);
            }
            let Lane::Open {
                unanswered: Some(unanswered),
                ..
            } = &self.lane
            else {
                return Ok(false);
            };
            if !lock(unanswered).iter().any(|k| link(k, at)) {
                return Ok(false);
            }
            // Its reply is still to come; no request of ours is outstanding, so every
            // reply until then is an early one.
            if let Reply::Ours(_) = self.next_reply().await? {
                return Err(lane_closed("a reply to no request"));
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
enum Lane {
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

/// Progress of a snapshot transfer, for the logs.
pub struct Progress<'a> {
    pub id: &'a str,
    pub offset: u64,
    pub len: usize,
    pub done: bool,
}

impl Display for Progress<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let end = self.offset + self.len as u64;
        write!(f, "{} bytes {}..{end}", self.id, self.offset)?;
        if self.done {
            write!(f, " (last chunk, {end} bytes in all)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The AppendEntries stream against stand-in peers over real gRPC and mTLS: a peer of
    //! an older version (no stream: the leader must fall back to unary calls) and one that
    //! ends its streams (the leader must open a new one).
    use std::sync::atomic::{AtomicUsize, Ordering};

    use meshbridge_core::id::SpiffeId;
    use meshbridge_core::pki::Ca;
    use meshbridge_core::proto::raft_server::{Raft, RaftServer};
    use meshbridge_core::tls::IdentityFiles;
    use openraft::{CommittedLeaderId, LogId, Vote};
    use tokio_util::sync::CancellationToken;
    use tonic::{Request, Response, Streaming};

    use super::*;
    use crate::raft_api::AppendStream;

    const TD: &str = "test.example";
    const DAY: Duration = Duration::from_secs(86_400);

    /// Answers every AppendEntries with `PartialSuccess(leader_commit)`, so a reply shows
    /// which request it answers, except early appends with entries: `Success`. Streams end after `per_stream` requests; `None`: no
    /// stream (UNIMPLEMENTED), as a node of an older version answers. `early_header`: its
    /// streams announce that they take early appends (answered like any other request).
    struct Peer {
        per_stream: Option<usize>,
        early_header: bool,
        /// Marks every stream reply early, as a broken peer might.
        marks_all_early: bool,
        unary: Arc<AtomicUsize>,
        streams: Arc<AtomicUsize>,
        /// Entries received in early appends.
        early_entries: Arc<AtomicUsize>,
        /// Requests received on streams, early appends not counted.
        stream_requests: Arc<AtomicUsize>,
    }

    fn answer(
        m: &proto::RaftMessage,
        early_entries: &AtomicUsize,
    ) -> Result<proto::RaftReply, Status> {
        let req: AppendEntriesRequest =
            serde_json::from_slice(&m.json).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let resp = if m.early {
            early_entries.fetch_add(req.entries.len(), Ordering::SeqCst);
            if req.entries.is_empty() {
                AppendEntriesResponse::PartialSuccess(req.leader_commit)
            } else {
                AppendEntriesResponse::Success
            }
        } else {
            AppendEntriesResponse::PartialSuccess(req.leader_commit)
        };
        let ok = serde_json::to_vec(&resp).map_err(|e| Status::internal(e.to_string()))?;
        Ok(proto::RaftReply {
            result: Some(proto::raft_reply::Result::Ok(ok)),
            early: m.early,
        })
    }

    #[tonic::async_trait]
    impl Raft for Peer {
        async fn append_entries(
            &self,
            req: Request<proto::RaftMessage>,
        ) -> Result<Response<proto::RaftReply>, Status> {
            self.unary.fetch_add(1, Ordering::SeqCst);
            answer(req.get_ref(), &self.early_entries).map(Response::new)
        }

        type AppendStreamStream = AppendStream;

        async fn append_stream(
            &self,
            req: Request<Streaming<proto::RaftMessage>>,
        ) -> Result<Response<AppendStream>, Status> {
            let Some(per_stream) = self.per_stream else {
                return Err(Status::unimplemented("no AppendStream here"));
            };
            self.streams.fetch_add(1, Ordering::SeqCst);
            let counters = (self.early_entries.clone(), self.stream_requests.clone());
            let marks_all_early = self.marks_all_early;
            let replies = futures::stream::unfold(
                (req.into_inner(), per_stream, counters),
                move |(mut inbound, left, counters)| async move {
                    if left == 0 {
                        return None;
                    }
                    let m = inbound.message().await.ok()??;
                    if !m.early {
                        counters.1.fetch_add(1, Ordering::SeqCst);
                    }
                    let reply = answer(&m, &counters.0).map(|mut r| {
                        r.early |= marks_all_early;
                        r
                    });
                    Some((reply, (inbound, left - 1, counters)))
                },
            );
            let mut response = Response::new(Box::pin(replies) as AppendStream);
            if self.early_header {
                response.metadata_mut().insert(
                    EARLY_APPEND_HEADER,
                    tonic::metadata::MetadataValue::from_static("1"),
                );
            }
            Ok(response)
        }

        async fn vote(
            &self,
            _: Request<proto::RaftMessage>,
        ) -> Result<Response<proto::RaftReply>, Status> {
            Err(Status::unimplemented("vote"))
        }

        async fn install_snapshot(
            &self,
            _: Request<proto::RaftMessage>,
        ) -> Result<Response<proto::RaftReply>, Status> {
            Err(Status::unimplemented("install_snapshot"))
        }
    }

    struct Setup {
        client: PeerClient,
        unary: Arc<AtomicUsize>,
        streams: Arc<AtomicUsize>,
        early_entries: Arc<AtomicUsize>,
        stream_requests: Arc<AtomicUsize>,
        early: EarlyMetrics,
        network: Network,
        node: Node,
        _stop: tokio_util::sync::DropGuard,
        _dir: tempfile::TempDir,
    }

    async fn setup(per_stream: Option<usize>) -> Setup {
        setup_with(per_stream, false).await
    }

    async fn setup_with(per_stream: Option<usize>, early_header: bool) -> Setup {
        setup_peer(per_stream, early_header, false).await
    }

    async fn setup_peer(
        per_stream: Option<usize>,
        early_header: bool,
        marks_all_early: bool,
    ) -> Setup {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = Ca::generate(TD, DAY).expect("CA");
        let identity = |n: u64| {
            let id = SpiffeId::parse(&format!("spiffe://{TD}/registry/{n}")).expect("id");
            let path = dir.path().join(n.to_string());
            ca.issue(&id, DAY, &[])
                .expect("issue")
                .write_to(&path)
                .expect("write");
            Identity::load(IdentityFiles::in_dir(path)).expect("identity")
        };
        let (leader, peer) = (identity(1), identity(2));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let incoming = crate::listener::incoming(
            listener,
            &peer,
            registry_allow_list(&peer),
            stop.clone(),
            CancellationToken::new(),
        );
        let (unary, streams) = (Arc::default(), Arc::default());
        let (early_entries, stream_requests) = (Arc::default(), Arc::default());
        let service = RaftServer::new(Peer {
            per_stream,
            early_header,
            marks_all_early,
            unary: Arc::clone(&unary),
            streams: Arc::clone(&streams),
            early_entries: Arc::clone(&early_entries),
            stream_requests: Arc::clone(&stream_requests),
        });
        let shutdown = stop.clone().cancelled_owned();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, shutdown),
        );
        let early = EarlyMetrics::default();
        let peers = Peers::new(1, leader, BTreeMap::new(), early.clone());
        let times: Family<PeerLabel, Histogram> = Family::new_with_constructor(|| {
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.001, 2.0, 4,
            ))
        });
        let mut network = Network::new(peers, times);
        let node = Node {
            addr: format!("https://{addr}"),
        };
        Setup {
            client: network.new_client(2, &node).await,
            network,
            node,
            unary,
            streams,
            early_entries,
            stream_requests,
            early,
            _stop: stop.drop_guard(),
            _dir: dir,
        }
    }

    /// Sends AppendEntries with `leader_commit` index `i`; the reply's index, or the error.
    async fn append(client: &mut PeerClient, i: u64) -> Result<u64, String> {
        let log_id = LogId::new(CommittedLeaderId::new(1, 1), i);
        let rpc = AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            entries: vec![],
            leader_commit: Some(log_id),
        };
        match client
            .append_entries(rpc, RPCOption::new(Duration::from_secs(5)))
            .await
        {
            Ok(AppendEntriesResponse::PartialSuccess(Some(got))) => Ok(got.index),
            Ok(other) => Err(format!("unexpected reply {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    #[tokio::test]
    async fn a_peer_without_the_stream_gets_unary_calls() {
        let mut s = setup(None).await;
        for i in 1..=4 {
            assert_eq!(append(&mut s.client, i).await, Ok(i));
        }
        // The stream was tried once; every request went as a unary call.
        assert!(matches!(s.client.lane, Lane::Unsupported));
        assert_eq!(s.unary.load(Ordering::SeqCst), 4);
        assert_eq!(s.streams.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn replies_follow_requests_and_an_ended_stream_is_reopened() {
        let mut s = setup(Some(3)).await;
        let mut results = Vec::new();
        for i in 1..=8 {
            results.push(append(&mut s.client, i).await.map_err(|_| ()));
        }
        // Three answered per stream, then the fourth request finds the stream ended (an
        // error openraft retries) and the next one opens a new stream.
        let ok = |i| Ok::<u64, ()>(i);
        assert_eq!(
            results,
            vec![ok(1), ok(2), ok(3), Err(()), ok(5), ok(6), ok(7), Err(())]
        );
        assert_eq!(s.streams.load(Ordering::SeqCst), 2);
        assert_eq!(s.unary.load(Ordering::SeqCst), 0);
    }

    /// Three blank entries of node 1's term 1 from index `from`.
    fn blanks(from: u64) -> Vec<Entry> {
        (from..from + 3)
            .map(|i| Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), i),
                payload: openraft::EntryPayload::Blank,
            })
            .collect()
    }

    #[tokio::test]
    async fn early_appends_ride_the_stream_and_their_replies_are_not_taken_for_others() {
        let mut s = setup_with(Some(100), true).await;
        let vote = Vote::new_committed(1, 1);
        // No stream yet: nothing to put them on.
        s.client.peers.send(&vote, None, &blanks(1));
        assert_eq!(append(&mut s.client, 1).await, Ok(1));
        // The stream is open: early appends go on it, in openraft's request format (the
        // stand-in decodes them), and their replies (which would read as "nothing
        // matched") do not answer the next request.
        for round in 0..3 {
            s.client.peers.send(&vote, None, &blanks(round * 3 + 1));
        }
        assert_eq!(append(&mut s.client, 2).await, Ok(2));
        assert_eq!(append(&mut s.client, 3).await, Ok(3));
        assert_eq!(s.early_entries.load(Ordering::SeqCst), 9);
        assert_eq!(s.early.sent.get_or_create(&PeerLabel { peer: 2 }).get(), 3);
        assert_eq!(s.streams.load(Ordering::SeqCst), 1);

        // openraft also makes short-lived clients to the same peer (a linearizable read's
        // heartbeat round): one coming and going leaves the first stream taking them.
        let mut passing = s.network.new_client(2, &s.node).await;
        assert_eq!(append(&mut passing, 20).await, Ok(20));
        assert_eq!(s.streams.load(Ordering::SeqCst), 2);
        drop(passing);
        s.client.peers.send(&vote, None, &blanks(20));
        assert_eq!(append(&mut s.client, 4).await, Ok(4));
        assert_eq!(s.early_entries.load(Ordering::SeqCst), 12);
        assert_eq!(s.early.sent.get_or_create(&PeerLabel { peer: 2 }).get(), 4);

        // Once the replication client is gone, its stream takes no more.
        let peers = Arc::clone(&s.client.peers);
        drop(s.client);
        peers.send(&vote, None, &blanks(10));
        assert_eq!(s.early.sent.get_or_create(&PeerLabel { peer: 2 }).get(), 4);
    }

    #[tokio::test]
    async fn a_stream_that_does_not_announce_early_appends_gets_none() {
        let mut s = setup_with(Some(100), false).await;
        let vote = Vote::new_committed(1, 1);
        assert_eq!(append(&mut s.client, 1).await, Ok(1));
        s.client.peers.send(&vote, None, &blanks(1));
        assert_eq!(append(&mut s.client, 2).await, Ok(2));
        assert_eq!(s.early_entries.load(Ordering::SeqCst), 0);
        assert_eq!(s.early.sent.get_or_create(&PeerLabel { peer: 2 }).get(), 0);
    }

    /// Sends AppendEntries of `entries` after `prev` (no commit index); the reply, or the
    /// error.
    async fn replicate(
        client: &mut PeerClient,
        prev: Option<u64>,
        entries: Vec<Entry>,
    ) -> Result<AppendEntriesResponse, String> {
        replicate_committed(client, prev, entries, None).await
    }

    /// As [`replicate`], with commit index `commit`.
    async fn replicate_committed(
        client: &mut PeerClient,
        prev: Option<u64>,
        entries: Vec<Entry>,
        commit: Option<u64>,
    ) -> Result<AppendEntriesResponse, String> {
        let id = |i| LogId::new(CommittedLeaderId::new(1, 1), i);
        let rpc = AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: prev.map(id),
            entries,
            leader_commit: commit.map(id),
        };
        client
            .append_entries(rpc, RPCOption::new(Duration::from_secs(5)))
            .await
            .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn the_same_request_answered_early_with_success_is_not_sent_again() {
        let mut s = setup_with(Some(100), true).await;
        let vote = Vote::new_committed(1, 1);
        let answered = |s: &Setup| s.early.answered.get_or_create(&PeerLabel { peer: 2 }).get();
        assert_eq!(append(&mut s.client, 1).await, Ok(1));
        assert_eq!(s.stream_requests.load(Ordering::SeqCst), 1);

        // Entries 1..=3 after nothing, then 4..=6 after 3, sent early; the stand-in
        // answers both with success.
        s.client.peers.send(&vote, None, &blanks(1));
        let prev = Some(LogId::new(CommittedLeaderId::new(1, 1), 3));
        s.client.peers.send(&vote, prev, &blanks(4));

        // openraft's request for the first: answered by the early reply, not sent.
        let got = replicate(&mut s.client, None, blanks(1)).await;
        assert!(matches!(got, Ok(AppendEntriesResponse::Success)), "{got:?}");
        assert_eq!(s.stream_requests.load(Ordering::SeqCst), 1);
        assert_eq!(answered(&s), 1);

        // A request for the second that differs (another previous entry): sent, and
        // answered by the stand-in; the early answer does not stand in for it.
        let got = replicate(&mut s.client, Some(2), blanks(4)).await;
        assert!(
            matches!(got, Ok(AppendEntriesResponse::PartialSuccess(None))),
            "{got:?}"
        );
        assert_eq!(s.stream_requests.load(Ordering::SeqCst), 2);

        // The matching one for the second is still answered from the early reply.
        let got = replicate(&mut s.client, Some(3), blanks(4)).await;
        assert!(matches!(got, Ok(AppendEntriesResponse::Success)), "{got:?}");
        assert_eq!(s.stream_requests.load(Ordering::SeqCst), 2);
        assert_eq!(answered(&s), 2);

        // Two early appends, and openraft's one request for both: answered by the chain.
        let prev = Some(LogId::new(CommittedLeaderId::new(1, 1), 6));
        s.client.peers.send(&vote, prev, &blanks(7));
        let prev = Some(LogId::new(CommittedLeaderId::new(1, 1), 9));
        s.client.peers.send(&vote, prev, &blanks(10));
        let both = [blanks(7), blanks(10)].concat();
        let got = replicate(&mut s.client, Some(6), both).await;
        assert!(matches!(got, Ok(AppendEntriesResponse::Success)), "{got:?}");
        assert_eq!(s.stream_requests.load(Ordering::SeqCst), 2);
        assert_eq!(answered(&s), 3);

        // Early appends that do not cover the request's entries exactly: sent.
        let prev = Some(LogId::new(CommittedLeaderId::new(1, 1), 12));
        s.client.peers.send(&vote, prev, &blanks(13));
        let got = replicate(&mut s.client, Some(12), blanks(13)[..2].to_vec()).await;
        assert!(
            matches!(got, Ok(AppendEntriesResponse::PartialSuccess(None))),
            "{got:?}"
        );
        assert_eq!(s.stream_requests.load(Ordering::SeqCst), 3);

        // The same entries sent early, but the request carries a newer commit index than
        // the early one did (committed meanwhile): sent, so that the follower learns it.
        let prev = Some(LogId::new(CommittedLeaderId::new(1, 1), 16));
        s.client.peers.send(&vote, prev, &blanks(17));
        let got = replicate_committed(&mut s.client, Some(16), blanks(17), Some(19)).await;
        assert!(
            matches!(got, Ok(AppendEntriesResponse::PartialSuccess(Some(_)))),
            "{got:?}"
        );
        assert_eq!(s.stream_requests.load(Ordering::SeqCst), 4);

        // Nothing sent early for these: sent.
        let got = replicate(&mut s.client, Some(19), blanks(20)).await;
        assert!(
            matches!(got, Ok(AppendEntriesResponse::PartialSuccess(None))),
            "{got:?}"
        );
        assert_eq!(s.stream_requests.load(Ordering::SeqCst), 5);
        assert_eq!(answered(&s), 3);
    }

    #[tokio::test]
    async fn an_early_reply_to_nothing_sent_early_is_an_error_and_the_stream_is_reopened() {
        let mut s = setup_peer(Some(100), true, true).await;
        for _ in 0..2 {
            let got = append(&mut s.client, 1).await;
            assert!(
                got.as_ref()
                    .is_err_and(|e| e.contains("a reply to an early append that was not sent")),
                "{got:?}"
            );
            assert!(matches!(s.client.lane, Lane::Closed));
        }
        // Each call opened a new stream: the broken one was not reused.
        assert_eq!(s.streams.load(Ordering::SeqCst), 2);
    }
}
