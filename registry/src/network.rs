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
use openraft::error::{NetworkError, RPCError, RemoteError, Timeout, Unreachable};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;
use serde::de::DeserializeOwned;
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
        let channel = self
            .peers
            .channel(self.target, &self.node.addr)
            .map_err(|s| RPCError::Unreachable(Unreachable::new(&s)))?;
        let client = RaftClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
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
    ) -> RpcResult<AppendEntriesResponse, openraft::error::Infallible> {
        let started = std::time::Instant::now();
        let reply = self
            .call(
                RPCTypes::AppendEntries,
                &rpc,
                option.hard_ttl(),
                |mut c, m| async move { c.append_entries(m).await },
            )
            .await;
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
    ) -> RpcResult<VoteResponse, openraft::error::Infallible> {
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
