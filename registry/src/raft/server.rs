//! The receiving side of Raft traffic: decodes openraft's requests, hands them to the local
//! Raft, and answers its reply or its error (both as JSON). Registry nodes only.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;

use meshbridge_core::proto::{self, raft_server};
use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::info;

use super::wire::{EARLY_APPEND_HEADER, Progress};
use crate::authz::Caller;
use crate::error::ApiError;
use crate::types::{AppendEntriesRequest, InstallSnapshotRequest, Raft, VoteRequest};

pub struct RaftApi {
    raft: Raft,
    trust_domain: Arc<str>,
    append_time: Histogram,
    /// The node is stopping: AppendEntries streams end (between requests), so that they do
    /// not hold up the drain.
    stop: CancellationToken,
}

impl RaftApi {
    /// `append_time` observes the handling of every AppendEntries request.
    pub fn new(
        raft: Raft,
        trust_domain: Arc<str>,
        append_time: Histogram,
        stop: CancellationToken,
    ) -> Self {
        Self {
            raft,
            trust_domain,
            append_time,
            stop,
        }
    }

    fn decode<T: DeserializeOwned>(&self, req: Request<proto::RaftMessage>) -> Result<T, Status> {
        Caller::of(&req, &self.trust_domain)?.require_node()?;
        decode(&req.into_inner())
    }
}

fn decode<T: DeserializeOwned>(m: &proto::RaftMessage) -> Result<T, Status> {
    serde_json::from_slice(&m.json).map_err(|e| ApiError::bad_request("raft message", e).into())
}

/// Replies of an AppendEntries stream, one per request, in order.
///
/// The stream's response carries [`EARLY_APPEND_HEADER`]: this node answers early appends
/// (requests marked `early`) with replies marked the same way.
pub type AppendStream = Pin<Box<dyn Stream<Item = Result<proto::RaftReply, Status>> + Send>>;

fn reply<T: Serialize, E: Serialize>(
    result: Result<T, E>,
) -> Result<Response<proto::RaftReply>, Status> {
    encode(result).map(Response::new)
}

fn encode<T: Serialize, E: Serialize>(result: Result<T, E>) -> Result<proto::RaftReply, Status> {
    let encoded = match &result {
        Ok(v) => serde_json::to_vec(v).map(proto::raft_reply::Result::Ok),
        Err(e) => serde_json::to_vec(e).map(proto::raft_reply::Result::Err),
    }
    .map_err(|e| Status::from(ApiError::internal("encode raft reply", e)))?;
    Ok(proto::RaftReply {
        result: Some(encoded),
        early: false,
    })
}

#[tonic::async_trait]
impl raft_server::Raft for RaftApi {
    async fn append_entries(
        &self,
        req: Request<proto::RaftMessage>,
    ) -> Result<Response<proto::RaftReply>, Status> {
        let started = std::time::Instant::now();
        let rpc: AppendEntriesRequest = self.decode(req)?;
        let result = self.raft.append_entries(rpc).await;
        self.append_time.observe(started.elapsed().as_secs_f64());
        reply(result)
    }

    type AppendStreamStream = AppendStream;

    /// Each request is handled and answered before the next is read: replies keep the
    /// order of the requests, and a bad message ends the stream with its error.
    async fn append_stream(
        &self,
        req: Request<Streaming<proto::RaftMessage>>,
    ) -> Result<Response<AppendStream>, Status> {
        Caller::of(&req, &self.trust_domain)?.require_node()?;
        let state = (
            req.into_inner(),
            self.raft.clone(),
            self.append_time.clone(),
            self.stop.clone(),
        );
        let replies = futures::stream::unfold(Some(state), |state| async move {
            let (mut requests, raft, append_time, stop) = state?;
            let message = tokio::select! {
                m = requests.message() => match m {
                    Ok(Some(m)) => m,
                    Ok(None) => return None,
                    Err(status) => return Some((Err(status), None)),
                },
                _ = stop.cancelled() => return None,
            };
            let started = std::time::Instant::now();
            let rpc: AppendEntriesRequest = match decode(&message) {
                Ok(rpc) => rpc,
                Err(status) => return Some((Err(status), None)),
            };
            let result = raft.append_entries(rpc).await;
            append_time.observe(started.elapsed().as_secs_f64());
            match encode(result) {
                Ok(mut r) => {
                    r.early = message.early;
                    Some((Ok(r), Some((requests, raft, append_time, stop))))
                }
                Err(status) => Some((Err(status), None)),
            }
        });
        let mut response = Response::new(Box::pin(replies) as AppendStream);
        response.metadata_mut().insert(
            EARLY_APPEND_HEADER,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        Ok(response)
    }

    async fn vote(
        &self,
        req: Request<proto::RaftMessage>,
    ) -> Result<Response<proto::RaftReply>, Status> {
        let rpc: VoteRequest = self.decode(req)?;
        reply(self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<proto::RaftMessage>,
    ) -> Result<Response<proto::RaftReply>, Status> {
        let rpc: InstallSnapshotRequest = self.decode(req)?;
        let progress = Progress {
            id: &rpc.meta.snapshot_id,
            offset: rpc.offset,
            len: rpc.data.len(),
            done: rpc.done,
        };
        info!(leader = rpc.vote.leader_id().voted_for().unwrap_or_default(), snapshot = %progress, "receiving snapshot");
        reply(self.raft.install_snapshot(rpc).await)
    }
}
