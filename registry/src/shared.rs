//! What the gRPC services of a node share: its Raft, catalog feed, peers and metrics. Where
//! a call runs (here on the leader, or forwarded to it) is [`crate::leader`]'s.

use std::sync::Arc;
use std::time::Duration;

use meshbridge_core::model::Catalog;
use tokio_util::sync::CancellationToken;

use crate::config::LeaseConfig;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::raft::Peers;
use crate::store::Feed;
use crate::types::{NodeId, Raft};

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
    pub fn watch_slot(&self, caller: &str) -> Result<WatchSlot, ApiError> {
        let mut counts = meshbridge_core::sync::lock(&self.watches);
        let n = counts.entry(caller.to_owned()).or_default();
        if *n >= MAX_WATCHES_PER_CALLER {
            return Err(ApiError::Quota(format!(
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
}
