//! Channels to the other nodes (one cached HTTP/2 channel per peer, shared by replication
//! and request forwarding), and the sending of early appends on the followers' streams.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshbridge_core::client::{ChannelOptions, lazy_channel, registry_allow_list};
use meshbridge_core::proto;
use meshbridge_core::sync::lock;
use meshbridge_core::tls::Identity;
use serde::Serialize;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tracing::debug;

use super::ledger::EarlyKey;
use crate::error::ApiError;
use crate::metrics::{EarlyMetrics, PeerLabel};
use crate::store::EarlyAppend;
use crate::types::{Entry, LogId, NodeId, Vote};

/// The sending end of an AppendEntries stream.
pub(super) type LaneSender = mpsc::Sender<proto::RaftMessage>;

/// An AppendEntries stream that takes early appends: its sender, and the early appends
/// sent on it whose replies have not been read yet, in order.
#[derive(Clone)]
pub(super) struct EarlyLane {
    pub(super) requests: LaneSender,
    pub(super) unanswered: Arc<Mutex<VecDeque<EarlyKey>>>,
}

/// Requests queued on an AppendEntries stream before the HTTP/2 stream takes them; early
/// appends that find it full are not sent.
pub(super) const LANE_QUEUE: usize = 4;

/// Channels to the other nodes, shared by Raft replication and request forwarding.
pub struct Peers {
    pub(super) node_id: NodeId,
    identity: Arc<Identity>,
    opts: ChannelOptions,
    overrides: BTreeMap<NodeId, String>,
    channels: Mutex<HashMap<NodeId, (String, Channel)>>,
    /// The AppendEntries streams that take early appends, by follower, oldest first.
    /// openraft makes a client per replication stream and also short-lived ones (for a
    /// linearizable read's heartbeat round); early appends go on the oldest open one, the
    /// replication stream's, so that they travel in order before openraft's own requests.
    early_lanes: Mutex<HashMap<NodeId, Vec<EarlyLane>>>,
    pub(super) early: EarlyMetrics,
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

    pub(super) fn add_early_lane(&self, target: NodeId, lane: EarlyLane) {
        lock(&self.early_lanes)
            .entry(target)
            .or_default()
            .push(lane);
    }

    /// Forgets `lane`, one of `target`'s early lanes.
    pub(super) fn drop_early_lane(&self, target: NodeId, lane: &LaneSender) {
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
