//! Prometheus metrics, `meshbridge_gateway_*`, labelled by peer site.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Which side of a tunnel this gateway is on for a stream.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// Local client → peer gateway (this gateway opened the stream).
    Outgoing,
    /// Peer gateway → local endpoint (this gateway accepted the stream).
    Incoming,
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(match self {
            Self::Outgoing => "outgoing",
            Self::Incoming => "incoming",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer_site: String,
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    pub peer_site: String,
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub peer_site: String,
    pub direction: Direction,
    /// `sent` to or `received` from the peer site.
    pub flow: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub peer_site: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteLabel {
    pub peer_site: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

type Hist = Family<SiteLabel, Histogram, fn() -> Histogram>;
type PeerHist = Family<PeerLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs .. ~6.5 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

/// Every gateway metric; cheap to clone (families are shared).
#[derive(Clone)]
pub struct Metrics {
    /// Tunnel connections established, by peer site and transport.
    pub connections: Family<PeerLabels, Counter>,
    pub connections_active: Family<PeerLabels, Gauge>,
    pub streams: Family<StreamLabels, Counter>,
    pub streams_active: Family<StreamLabels, Gauge>,
    pub bytes: Family<BytesLabels, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    pub policy_denials: Family<SiteLabel, Counter>,
    pub handshake_seconds: PeerHist,
    /// Receiving side: TCP connect to a local endpoint. Sending side: stream open to reply.
    pub connect_seconds: Hist,
    pub rtt_seconds: Family<SiteLabel, Gauge<f64, AtomicU64>>,
    pub listeners: Family<KindLabel, Gauge>,
    pub catalog_revision: Gauge,
    pub client_connections: Family<KindLabel, Counter>,
}

impl Metrics {
    /// New metrics, registered in `registry` with a constant `site` label.
    pub fn new(registry: &mut Registry, site: &str) -> Self {
        let m = Self {
            connections: Family::default(),
            connections_active: Family::default(),
            streams: Family::default(),
            streams_active: Family::default(),
            bytes: Family::default(),
            failures: Family::default(),
            policy_denials: Family::default(),
            handshake_seconds: Family::new_with_constructor(latency_histogram),
            connect_seconds: Family::new_with_constructor(latency_histogram),
            rtt_seconds: Family::default(),
            listeners: Family::default(),
            catalog_revision: Gauge::default(),
            client_connections: Family::default(),
        };
        let r = registry
            .sub_registry_with_prefix("meshbridge_gateway")
            .sub_registry_with_label((
                std::borrow::Cow::Borrowed("site"),
                std::borrow::Cow::Owned(site.to_string()),
            ));
        r.register(
            "connections",
            "Tunnel connections established",
            m.connections.clone(),
        );
        r.register(
            "connections_active",
            "Tunnel connections open",
            m.connections_active.clone(),
        );
        r.register("streams", "Tunnel streams", m.streams.clone());
        r.register(
            "streams_active",
            "Tunnel streams in flight",
            m.streams_active.clone(),
        );
        r.register("bytes", "Payload bytes through tunnels", m.bytes.clone());
        r.register("failures", "Failures by reason", m.failures.clone());
        r.register(
            "policy_denials",
            "Streams refused by policy",
            m.policy_denials.clone(),
        );
        r.register(
            "handshake_seconds",
            "Tunnel handshake latency",
            m.handshake_seconds.clone(),
        );
        r.register(
            "connect_seconds",
            "Connect latency (endpoint connect, or stream open to reply)",
            m.connect_seconds.clone(),
        );
        r.register(
            "rtt_seconds",
            "Round-trip time of the QUIC link",
            m.rtt_seconds.clone(),
        );
        r.register(
            "listeners",
            "Listeners for local clients",
            m.listeners.clone(),
        );
        r.register(
            "catalog_revision",
            "Revision of the catalog in use",
            m.catalog_revision.clone(),
        );
        r.register(
            "client_connections",
            "Local client connections accepted, by listener kind",
            m.client_connections.clone(),
        );
        m
    }

    pub fn failure(&self, peer_site: &str, reason: &'static str) {
        self.failures
            .get_or_create(&FailureLabels {
                peer_site: peer_site.to_string(),
                reason,
            })
            .inc();
    }

    pub fn add_bytes(&self, peer_site: &str, direction: Direction, sent: u64, received: u64) {
        for (flow, n) in [("sent", sent), ("received", received)] {
            self.bytes
                .get_or_create(&BytesLabels {
                    peer_site: peer_site.to_string(),
                    direction,
                    flow,
                })
                .inc_by(n);
        }
    }
}
