//! openraft's network over tonic with mTLS: one cached HTTP/2 channel per peer (reused by
//! every RPC and every replication stream to it), a timeout per RPC, and openraft's own
//! serde types carried as JSON.
//!
//! Peers must present a registry SVID of our trust domain (`spiffe://<td>/registry/*`).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Display;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use meshbridge_core::client::{
    ChannelOptions, MAX_MESSAGE_BYTES, lazy_channel, registry_allow_list,
};
use meshbridge_core::proto::{self, raft_client::RaftClient};
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

use crate::metrics::PeerLabel;
use crate::types::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotError, InstallSnapshotRequest,
    InstallSnapshotResponse, Node, NodeId, RaftError, TypeConfig, VoteRequest, VoteResponse,
};

/// Channels to the other nodes, shared by Raft replication and request forwarding.
pub struct Peers {
    node_id: NodeId,
    identity: Arc<Identity>,
    opts: ChannelOptions,
    overrides: BTreeMap<NodeId, String>,
    channels: Mutex<HashMap<NodeId, (String, Channel)>>,
}

impl Peers {
    pub fn new(
        node_id: NodeId,
        identity: Arc<Identity>,
        overrides: BTreeMap<NodeId, String>,
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
        })
    }

    /// The channel to node `id` whose membership URL is `url` (made on first use; remade
    /// when the URL changes).
    pub fn channel(&self, id: NodeId, url: &str) -> Result<Channel, Status> {
        let url = self.overrides.get(&id).map_or(url, String::as_str);
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((known, ch)) = channels.get(&id)
            && known == url
        {
            return Ok(ch.clone());
        }
        let allow = registry_allow_list(&self.identity);
        let ch = lazy_channel(url, &self.identity, allow, &self.opts)
            .map_err(|e| Status::failed_precondition(format!("node {id}: {e}")))?;
        channels.insert(id, (url.to_owned(), ch.clone()));
        Ok(ch)
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
    append_time: Histogram,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, Node, RaftError<E>>>;

impl PeerClient {
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
        let sent = tokio::time::timeout(timeout, send(client, proto::RaftMessage { json })).await;
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
            None => Err(RPCError::Network(NetworkError::new(&Status::internal(
                "empty raft reply",
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
        let message = proto::RaftMessage { json };
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
        let Lane::Open { replies, .. } = &mut self.lane else {
            return Some(Err(lane_closed("the stream did not open")));
        };
        let reply = match replies.message().await {
            Ok(Some(reply)) => reply,
            Ok(None) => return Some(Err(lane_closed("the peer ended the stream"))),
            Err(status) => return Some(Err(transport_error(&status))),
        };
        Some(self.decode_reply(reply))
    }

    /// Opens the stream with `first` queued on it (so it is carried whether or not the
    /// server answers headers before it reads). `false`: the peer answered UNIMPLEMENTED.
    async fn open_lane(
        &mut self,
        first: proto::RaftMessage,
    ) -> Result<bool, RPCError<NodeId, Node, RaftError<Infallible>>> {
        let mut client = self.client()?;
        let (requests, rx) = mpsc::channel(1);
        if requests.send(first).await.is_err() {
            return Err(lane_closed("the request stream ended"));
        }
        let outgoing =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        match client.append_stream(outgoing).await {
            Ok(response) => {
                info!(peer = self.target, "AppendEntries stream open");
                self.lane = Lane::Open {
                    requests,
                    replies: Box::new(response.into_inner()),
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

/// The AppendEntries stream of a [`PeerClient`].
enum Lane {
    /// Not open (yet, or since a failure).
    Closed,
    Open {
        requests: mpsc::Sender<proto::RaftMessage>,
        replies: Box<tonic::Streaming<proto::RaftReply>>,
    },
    /// The peer answered UNIMPLEMENTED (an older version): unary calls from now on.
    Unsupported,
}

fn lane_closed(why: &str) -> RPCError<NodeId, Node, RaftError<Infallible>> {
    RPCError::Network(NetworkError::new(&Status::unavailable(format!(
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
            let json =
                serde_json::to_vec(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
            streamed = match tokio::time::timeout(timeout, self.append_on_stream(json)).await {
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
                if reply.is_err() && !matches!(self.lane, Lane::Unsupported) {
                    self.lane = Lane::Closed;
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
    /// which request it answers. Streams end after `per_stream` requests; `None`: no
    /// stream (UNIMPLEMENTED), as a node of an older version answers.
    struct Peer {
        per_stream: Option<usize>,
        unary: Arc<AtomicUsize>,
        streams: Arc<AtomicUsize>,
    }

    fn answer(m: &proto::RaftMessage) -> Result<proto::RaftReply, Status> {
        let req: AppendEntriesRequest =
            serde_json::from_slice(&m.json).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let resp = AppendEntriesResponse::PartialSuccess(req.leader_commit);
        let ok = serde_json::to_vec(&resp).map_err(|e| Status::internal(e.to_string()))?;
        Ok(proto::RaftReply {
            result: Some(proto::raft_reply::Result::Ok(ok)),
        })
    }

    #[tonic::async_trait]
    impl Raft for Peer {
        async fn append_entries(
            &self,
            req: Request<proto::RaftMessage>,
        ) -> Result<Response<proto::RaftReply>, Status> {
            self.unary.fetch_add(1, Ordering::SeqCst);
            answer(req.get_ref()).map(Response::new)
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
            let replies = futures::stream::unfold(
                (req.into_inner(), per_stream),
                |(mut inbound, left)| async move {
                    if left == 0 {
                        return None;
                    }
                    let m = inbound.message().await.ok()??;
                    Some((answer(&m), (inbound, left - 1)))
                },
            );
            Ok(Response::new(Box::pin(replies)))
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
        _stop: tokio_util::sync::DropGuard,
        _dir: tempfile::TempDir,
    }

    async fn setup(per_stream: Option<usize>) -> Setup {
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
        let service = RaftServer::new(Peer {
            per_stream,
            unary: Arc::clone(&unary),
            streams: Arc::clone(&streams),
        });
        let shutdown = stop.clone().cancelled_owned();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, shutdown),
        );
        let peers = Peers::new(1, leader, BTreeMap::new());
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
            unary,
            streams,
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
}
