//! The openraft type configuration of the registry, and short aliases for its generic types.
//!
//! Log entries carry a [`Proposal`]: one or more [`Request`]s (a [`Command`] and the client's
//! request id); applying one yields a [`Response`] per request. Nodes are [`openraft::BasicNode`]s whose `addr` is the
//! node's gRPC URL (`https://10.0.0.1:7443`).

use std::fmt;
use std::io::Cursor;
use std::str::FromStr;

use meshbridge_core::model::{Applied, Command, Rejection};
use serde::{Deserialize, Serialize};

openraft::declare_raft_types!(
    /// The registry's Raft types: catalog commands in, apply results out.
    pub TypeConfig:
        D = Proposal,
        R = Replies,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// What applying one log entry returned. Blank and membership entries answer `Ok` with the
/// current revision and no changes; a command the catalog refused answers its [`Rejection`]
/// (the refusal is replicated and deterministic, not a storage failure).
pub type Response = Result<Applied, Rejection>;

/// The replies to one entry's writes, in order.
pub type Replies = Vec<Response>;

/// A log entry's application data: one write, or several that the leader proposed
/// together (see `propose.rs`), applied in order, each with its own reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Proposal(pub Vec<Request>);

impl From<Command> for Proposal {
    fn from(command: Command) -> Self {
        Self(vec![command.into()])
    }
}

impl From<Request> for Proposal {
    fn from(request: Request) -> Self {
        Self(vec![request])
    }
}

impl fmt::Display for Proposal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => one.fmt(f),
            many => write!(f, "{} writes", many.len()),
        }
    }
}

/// Identifies one write of one client across its retries, so that a write retried after an
/// ambiguous failure (the connection dropped after the leader took it) is applied once:
/// the state machine answers a repeated id from its sessions instead of applying it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestId {
    /// Random per client instance.
    pub client: u64,
    /// Increases with every write of that client.
    pub seq: u64,
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}-{}", self.client, self.seq)
    }
}

impl FromStr for RequestId {
    type Err = String;

    /// `<client as 16 hex digits>-<seq>`, as written by [`fmt::Display`].
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not <client hex>-<seq>");
        let (client, seq) = s.split_once('-').ok_or_else(bad)?;
        Ok(Self {
            client: u64::from_str_radix(client, 16).map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

/// One write: a command and, for client writes, the client's request id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Set for client writes; `None` for the leader's own commands (lease ticks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<RequestId>,
    pub command: Command,
}

impl From<Command> for Request {
    fn from(command: Command) -> Self {
        Self { id: None, command }
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.id {
            Some(id) => write!(f, "request {id}"),
            None => f.write_str("request"),
        }
    }
}

/// A Raft node id.
pub type NodeId = u64;
/// A Raft node as stored in the membership: `addr` is its gRPC URL.
pub type Node = openraft::BasicNode;

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type EntryPayload = openraft::EntryPayload<TypeConfig>;
pub type Vote = openraft::Vote<NodeId>;
pub type Membership = openraft::Membership<NodeId, Node>;
pub type StoredMembership = openraft::StoredMembership<NodeId, Node>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Node>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type LogState = openraft::LogState<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StorageIOError = openraft::StorageIOError<NodeId>;
pub type RaftMetrics = openraft::RaftMetrics<NodeId, Node>;

pub type AppendEntriesRequest = openraft::raft::AppendEntriesRequest<TypeConfig>;
pub type AppendEntriesResponse = openraft::raft::AppendEntriesResponse<NodeId>;
pub type VoteRequest = openraft::raft::VoteRequest<NodeId>;
pub type VoteResponse = openraft::raft::VoteResponse<NodeId>;
pub type InstallSnapshotRequest = openraft::raft::InstallSnapshotRequest<TypeConfig>;
pub type InstallSnapshotResponse = openraft::raft::InstallSnapshotResponse<NodeId>;
pub type ClientWriteResponse = openraft::raft::ClientWriteResponse<TypeConfig>;

/// Errors of the Raft API; `E` is the API-specific part (`Infallible` when there is none).
pub type RaftError<E = openraft::error::Infallible> = openraft::error::RaftError<NodeId, E>;
pub type ClientWriteError = openraft::error::ClientWriteError<NodeId, Node>;
pub type CheckIsLeaderError = openraft::error::CheckIsLeaderError<NodeId, Node>;
pub type InstallSnapshotError = openraft::error::InstallSnapshotError;
pub type RpcError<E = openraft::error::Infallible> =
    openraft::error::RPCError<NodeId, Node, RaftError<E>>;
