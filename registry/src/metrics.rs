//! `meshbridge_registry_*` metrics.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use meshbridge_core::model::{Catalog, SiteState};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::types::RaftMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteLabel {
    pub site: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    pub peer: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub method: &'static str,
}

/// The registry's metrics; registered into the admin server's registry.
#[derive(Clone)]
pub struct Metrics {
    pub revision: Gauge,
    pub term: Gauge,
    pub is_leader: Gauge,
    pub last_log_index: Gauge,
    pub applied_index: Gauge,
    /// Proposal to applied reply, on the leader.
    pub apply_latency: Histogram,
    pub sites: Family<StateLabel, Gauge>,
    pub staleness: Family<SiteLabel, Gauge<f64, AtomicU64>>,
    pub watchers: Gauge,
    pub forwarded: Family<MethodLabel, Counter>,
    pub lease_ticks: Counter,
    /// One commit (and fsync) of the Raft log writer.
    pub log_flush: Histogram,
    /// An AppendEntries round trip to each peer, as the sender sees it.
    pub peer_append: Family<PeerLabel, Histogram>,
    /// Handling an AppendEntries request here, as a follower (until its entries are durable).
    pub append_handling: Histogram,
    /// Early appends, by peer (see `network`).
    pub early_appends: EarlyMetrics,
}

/// Counters of early appends, by follower.
#[derive(Clone, Default)]
pub struct EarlyMetrics {
    /// Put on the follower's stream.
    pub sent: Family<PeerLabel, Counter>,
    /// Whose reply answered openraft's own request, which was then not sent.
    pub answered: Family<PeerLabel, Counter>,
}

fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            revision: Gauge::default(),
            term: Gauge::default(),
            is_leader: Gauge::default(),
            last_log_index: Gauge::default(),
            applied_index: Gauge::default(),
            apply_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            sites: Family::default(),
            staleness: Family::default(),
            watchers: Gauge::default(),
            forwarded: Family::default(),
            lease_ticks: Counter::default(),
            log_flush: latency_buckets(),
            peer_append: Family::new_with_constructor(latency_buckets),
            append_handling: latency_buckets(),
            early_appends: EarlyMetrics::default(),
        };
        let r = registry.sub_registry_with_prefix("meshbridge_registry");
        r.register(
            "revision",
            "Catalog revision applied on this node",
            m.revision.clone(),
        );
        r.register("term", "Current Raft term", m.term.clone());
        r.register("is_leader", "1 on the Raft leader", m.is_leader.clone());
        r.register(
            "last_log_index",
            "Last Raft log index on this node",
            m.last_log_index.clone(),
        );
        r.register(
            "applied_index",
            "Last Raft log index applied on this node",
            m.applied_index.clone(),
        );
        r.register(
            "apply_latency_seconds",
            "Time from proposing a write to its applied result, on the leader",
            m.apply_latency.clone(),
        );
        r.register("sites", "Sites by lease state", m.sites.clone());
        r.register(
            "staleness_seconds",
            "Seconds since a site's lease lapsed (0 when fresh)",
            m.staleness.clone(),
        );
        r.register(
            "watchers",
            "Open watch streams on this node",
            m.watchers.clone(),
        );
        r.register(
            "forwarded",
            "Requests forwarded to the leader, by method",
            m.forwarded.clone(),
        );
        r.register(
            "log_flush_seconds",
            "One commit of queued Raft log writes (appends, votes), fsync included",
            m.log_flush.clone(),
        );
        r.register(
            "peer_append_entries_seconds",
            "AppendEntries round trip to a peer (network, its log append and fsync), by peer",
            m.peer_append.clone(),
        );
        r.register(
            "append_entries_handling_seconds",
            "Handling an AppendEntries request as a follower, until the entries are durable",
            m.append_handling.clone(),
        );
        r.register(
            "early_appends",
            "Leader's new entries sent to a peer as its own fsync began, by peer",
            m.early_appends.sent.clone(),
        );
        r.register(
            "early_appends_answered",
            "Early appends whose success reply answered openraft's own request (not sent again)",
            m.early_appends.answered.clone(),
        );
        r.register(
            "lease_ticks",
            "Lease ticks written by this node as leader",
            m.lease_ticks.clone(),
        );
        m
    }

    pub fn observe_apply(&self, took: Duration) {
        self.apply_latency.observe(took.as_secs_f64());
    }

    /// Refreshes the gauges from Raft and the catalog at wall-clock `now_ms`.
    pub fn refresh(&self, raft: &RaftMetrics, catalog: &Catalog, now_ms: u64) {
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.term.set(int(raft.current_term));
        self.is_leader
            .set(i64::from(raft.current_leader == Some(raft.id)));
        self.last_log_index
            .set(int(raft.last_log_index.unwrap_or(0)));
        self.applied_index
            .set(int(raft.last_applied.map_or(0, |l| l.index)));
        self.revision.set(int(catalog.revision));
        let (mut fresh, mut stale, mut withdrawn) = (0, 0, 0);
        self.staleness.clear();
        for site in catalog.sites.values() {
            match site.state {
                SiteState::Fresh => fresh += 1,
                SiteState::Stale { .. } => stale += 1,
                SiteState::Withdrawn { .. } => withdrawn += 1,
            }
            let staleness = match site.state {
                SiteState::Fresh => 0.0,
                SiteState::Stale { since_ms } | SiteState::Withdrawn { since_ms } => {
                    now_ms.saturating_sub(since_ms) as f64 / 1000.0
                }
            };
            self.staleness
                .get_or_create(&SiteLabel {
                    site: site.name.clone(),
                })
                .set(staleness);
        }
        for (state, n) in [("fresh", fresh), ("stale", stale), ("withdrawn", withdrawn)] {
            self.sites.get_or_create(&StateLabel { state }).set(n);
        }
    }
}
