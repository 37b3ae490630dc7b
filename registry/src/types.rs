//! The openraft type configuration of the registry, and short aliases for its generic types.
//!
//! Log entries carry a [`Command`]; applying one yields a [`Response`]. Nodes are
//! [`openraft::BasicNode`]s whose `addr` is the node's gRPC URL (`https://10.0.0.1:7443`).

use std::io::Cursor;

use meshbridge_core::model::{Applied, Command, Rejection};

openraft::declare_raft_types!(
    /// The registry's Raft types: catalog commands in, apply results out.
    pub TypeConfig:
        D = Command,
        R = Response,
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
