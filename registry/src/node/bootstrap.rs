//! Forming the cluster: the lowest initial member initializes Raft with the initial
//! members, once, when its log is empty.
//!
//! Restarts are harmless (an initialized log is left alone). A lowest member that lost its
//! data directory must not initialize a second cluster next to the first: before
//! initializing, it asks the other initial members, and stays out when any of them already
//! belongs to a cluster (an operator then adds it back as a member).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use meshbridge_core::proto::{self, registry_client::RegistryClient};
use openraft::error::InitializeError;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::shared::Shared;
use crate::types::{Node, NodeId, RaftError};

const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether node `id` at `url` says it belongs to a cluster (None: no answer).
async fn member_of_cluster(s: &Shared, id: NodeId, url: &str) -> Option<bool> {
    let channel = s.peers.channel(id, url).ok()?;
    let mut client = RegistryClient::new(channel);
    let req = proto::StatusRequest { local: true };
    match tokio::time::timeout(PROBE_TIMEOUT, client.status(req)).await {
        Ok(Ok(reply)) => Some(!reply.into_inner().members.is_empty()),
        _ => None,
    }
}

pub async fn run(s: Arc<Shared>, members: BTreeMap<NodeId, String>, stop: CancellationToken) {
    if members.keys().next() != Some(&s.node_id) {
        return;
    }
    match s.raft.is_initialized().await {
        Ok(false) => {}
        Ok(true) | Err(_) => return,
    }
    for (&id, url) in &members {
        if id == s.node_id {
            continue;
        }
        let answer = tokio::select! {
            _ = stop.cancelled() => return,
            a = member_of_cluster(&s, id, url) => a,
        };
        if answer == Some(true) {
            warn!(
                peer = id,
                "this node's log is empty but node {id} already belongs to a cluster: not \
                 initializing a new one (add this node back with `members add`)"
            );
            return;
        }
    }
    let nodes: BTreeMap<NodeId, Node> = members
        .iter()
        .map(|(&id, url)| (id, Node::new(url.clone())))
        .collect();
    match s.raft.initialize(nodes).await {
        Ok(()) => info!(members = ?members, "initialized the cluster"),
        Err(RaftError::APIError(InitializeError::NotAllowed(e))) => {
            debug!(reason = %e, "cluster already initialized")
        }
        Err(e) => warn!(error = %e, "cluster initialization failed"),
    }
}
