//! Prometheus metrics, `meshbridge_dns_*`.

use std::time::Duration;

use hickory_proto::op::ResponseCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::answer::Transport;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryLabels {
    /// `NOERROR`, `NXDOMAIN`, `REFUSED`, `SERVFAIL`, ... or `RATELIMITED`.
    pub rcode: &'static str,
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// Every DNS metric; cheap to clone (metrics are shared).
#[derive(Clone)]
pub struct Metrics {
    pub queries: Family<QueryLabels, Counter>,
    /// Time from a parsed request to its response handed to the socket.
    pub query_seconds: Histogram,
    pub rate_limited: Counter,
    /// UDP responses sent with TC set (the answer did not fit).
    pub truncated: Counter,
    /// TCP connections closed at once: the server holds its most already.
    pub tcp_refused: Counter,
    /// Forwarded queries by result: `ok`, `timeout`, `error`.
    pub forwarded: Family<ResultLabel, Counter>,
    /// Catalog revision of the index being served.
    pub revision: Gauge,
    /// Names in the index.
    pub names: Gauge,
    pub index_builds: Counter,
    pub index_build_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            queries: Family::default(),
            // 10 µs .. ~5 s
            query_seconds: Histogram::new(exponential_buckets(0.000_01, 2.0, 20)),
            rate_limited: Counter::default(),
            truncated: Counter::default(),
            tcp_refused: Counter::default(),
            forwarded: Family::default(),
            revision: Gauge::default(),
            names: Gauge::default(),
            index_builds: Counter::default(),
            // 100 µs .. ~3 s
            index_build_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
        }
    }
}

impl Metrics {
    /// Register every metric in `registry` (names get the `meshbridge_dns_` prefix).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("meshbridge_dns");
        r.register(
            "queries",
            "DNS queries answered, by rcode",
            self.queries.clone(),
        );
        r.register(
            "query_duration_seconds",
            "Time to answer a query",
            self.query_seconds.clone(),
        );
        r.register(
            "rate_limited",
            "Queries over the per-client rate limit",
            self.rate_limited.clone(),
        );
        r.register(
            "truncated",
            "UDP responses truncated (TC) for the client to retry over TCP",
            self.truncated.clone(),
        );
        r.register(
            "tcp_refused",
            "TCP connections closed at once because the server held its most already",
            self.tcp_refused.clone(),
        );
        r.register(
            "forwarded",
            "Queries forwarded upstream, by result",
            self.forwarded.clone(),
        );
        r.register(
            "catalog_revision",
            "Catalog revision being served",
            self.revision.clone(),
        );
        r.register("names", "Names in the zone", self.names.clone());
        r.register(
            "index_builds",
            "Answer index rebuilds",
            self.index_builds.clone(),
        );
        r.register(
            "index_build_duration_seconds",
            "Time to rebuild the answer index from the catalog",
            self.index_build_seconds.clone(),
        );
    }

    pub(crate) fn observe_index(&self, index: &super::Index, took: Duration) {
        self.index_builds.inc();
        self.index_build_seconds.observe(took.as_secs_f64());
        self.names
            .set(i64::try_from(index.len()).unwrap_or(i64::MAX));
        self.revision
            .set(i64::try_from(index.revision()).unwrap_or(i64::MAX));
    }

    pub(crate) fn answered(&self, rcode: ResponseCode, transport: Transport, took: Duration) {
        self.count(rcode_label(rcode), transport);
        self.query_seconds.observe(took.as_secs_f64());
    }

    pub(crate) fn count(&self, rcode: &'static str, transport: Transport) {
        self.counter(rcode, transport).inc();
    }

    /// The query counter of one rcode label and transport (a handle on the shared one).
    pub(crate) fn counter(&self, rcode: &'static str, transport: Transport) -> Counter {
        let transport = match transport {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        };
        self.queries
            .get_or_create(&QueryLabels { rcode, transport })
            .clone()
    }

    pub(crate) fn forwarded(&self, result: &'static str) {
        self.forwarded.get_or_create(&ResultLabel { result }).inc();
    }
}

pub(crate) fn rcode_label(rcode: ResponseCode) -> &'static str {
    match rcode {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::BADVERS => "BADVERS",
        _ => "OTHER",
    }
}
