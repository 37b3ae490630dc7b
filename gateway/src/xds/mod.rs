//! The xDS server: Envoy and proxyless gRPC clients of this site get the federated catalog
//! as clusters, endpoints and (optionally) listeners over ADS, from this gateway's catalog
//! in use — so they keep getting answers while the registry is unreachable, and after a
//! restart during an outage (the persisted snapshot).
//!
//! - [`resources`]: catalog → resources (pure);
//! - [`ads`]: the ADS stream protocol (versions, nonces, ACK/NACK, pushes);
//! - here: the listener (mutual TLS with SPIFFE ids, or plaintext on loopback), the task
//!   that rebuilds the resources on every catalog or service-listener change, metrics.

mod ads;
pub use ads::MAX_DELTA_NAMES;
pub mod resources;

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use futures::StreamExt;
use meshbridge_core::sync::lock;
use meshbridge_core::tls::{AcceptLimits, HandshakeError, handshakes};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::XdsConfig;
use crate::services::ServiceAddrs;
use crate::shared::Shared;
use resources::Snapshot;

/// Largest xDS message accepted from a client (requests are small; NACK details are text).
const MAX_REQUEST_BYTES: usize = 4 << 20;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    type_url: String,
}

/// The last NACK seen: which client rejected what, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Nack {
    pub node: String,
    pub type_url: String,
    pub error: String,
}

/// xDS metrics (`meshbridge_gateway_xds_*`), the last NACK, and the standing ones.
#[derive(Default)]
pub struct Stats {
    clients: Gauge,
    pushes: Family<TypeLabel, Counter>,
    acks: Family<TypeLabel, Counter>,
    nacks: Family<TypeLabel, Counter>,
    last_nack: Mutex<Option<Nack>>,
    /// Per stream and type, the NACK not yet followed by an ACK of that type: what a client
    /// runs without. Dropped when the stream ends.
    standing: Mutex<BTreeMap<(u64, String), Nack>>,
    streams: AtomicU64,
}

impl Stats {
    pub fn register(self: &Arc<Self>, registry: &mut Registry, site: &str) {
        let r = registry
            .sub_registry_with_prefix("meshbridge_gateway_xds")
            .sub_registry_with_label((
                std::borrow::Cow::Borrowed("site"),
                std::borrow::Cow::Owned(site.to_string()),
            ));
        r.register("clients", "Connected xDS streams", self.clients.clone());
        r.register(
            "pushes",
            "xDS responses sent, by resource type",
            self.pushes.clone(),
        );
        r.register(
            "acks",
            "xDS responses accepted by a client (applied), by resource type",
            self.acks.clone(),
        );
        r.register(
            "nacks",
            "xDS responses rejected by a client, by resource type",
            self.nacks.clone(),
        );
    }

    fn push(&self, type_url: &str) {
        self.pushes
            .get_or_create(&TypeLabel {
                type_url: type_url.to_string(),
            })
            .inc();
    }

    fn ack(&self, type_url: &str) {
        self.acks
            .get_or_create(&TypeLabel {
                type_url: type_url.to_string(),
            })
            .inc();
    }

    /// Responses of `type_url` accepted by clients so far.
    pub fn ack_count(&self, type_url: &str) -> u64 {
        self.acks
            .get_or_create(&TypeLabel {
                type_url: type_url.to_string(),
            })
            .get()
    }

    fn nack(&self, type_url: &str) {
        self.nacks
            .get_or_create(&TypeLabel {
                type_url: type_url.to_string(),
            })
            .inc();
    }

    /// A number for a new stream, to key its standing NACKs.
    fn stream_id(&self) -> u64 {
        self.streams.fetch_add(1, Ordering::Relaxed)
    }

    /// Stream `stream` (client `node`) rejected the last response of `type_url`. The
    /// client's texts are kept cut to what a report may carry.
    fn rejected(&self, stream: u64, node: &str, type_url: &str, error: &str) {
        use meshbridge_core::model::cut_report_text;
        let nack = Nack {
            node: cut_report_text(node).to_string(),
            type_url: cut_report_text(type_url).to_string(),
            error: cut_report_text(error).to_string(),
        };
        lock(&self.standing).insert((stream, type_url.to_string()), nack.clone());
        *lock(&self.last_nack) = Some(nack);
    }

    /// Stream `stream` accepted a response of `type_url`: its rejection of that type is over.
    fn accepted(&self, stream: u64, type_url: &str) {
        let mut standing = lock(&self.standing);
        if !standing.is_empty() {
            standing.remove(&(stream, type_url.to_string()));
        }
    }

    /// Stream `stream` ended: its rejections go with it.
    fn ended(&self, stream: u64) {
        lock(&self.standing).retain(|(s, _), _| *s != stream);
    }

    /// The rejections standing now (a client NACKed a type and has not ACKed it since), at
    /// most `max`, the newest streams' first kept; what the gateway reports to the registry.
    pub fn rejections(&self, max: usize) -> Vec<meshbridge_core::model::XdsRejection> {
        let standing = lock(&self.standing);
        let skip = standing.len().saturating_sub(max);
        standing
            .values()
            .skip(skip)
            .map(|n| meshbridge_core::model::XdsRejection {
                node: n.node.clone(),
                type_url: n.type_url.clone(),
                error: n.error.clone(),
            })
            .collect()
    }

    /// The most recent NACK, if any.
    pub fn latest_nack(&self) -> Option<Nack> {
        lock(&self.last_nack).clone()
    }

    /// NACKs seen in all.
    pub fn nack_count(&self) -> u64 {
        let mut total = 0;
        for t in [resources::CLUSTER, resources::ENDPOINT, resources::LISTENER] {
            total += self
                .nacks
                .get_or_create(&TypeLabel {
                    type_url: t.to_string(),
                })
                .get();
        }
        total
    }
}

/// Serve xDS on `listener` until `sh.stop`.
pub(crate) fn spawn(
    sh: Arc<Shared>,
    cfg: &XdsConfig,
    listener: TcpListener,
    services: watch::Receiver<ServiceAddrs>,
    stats: Arc<Stats>,
) {
    let first = Arc::new(resources::build(
        &sh.catalog.borrow(),
        &sh.site,
        &services.borrow(),
        cfg.listener_address,
    ));
    let (snapshot_tx, snapshot_rx) = watch::channel(first);
    sh.tasks.spawn(follow(
        sh.clone(),
        services,
        cfg.listener_address,
        snapshot_tx,
    ));
    let ads = ads::Ads {
        snapshot: snapshot_rx,
        stats,
        stop: sh.stop.clone(),
    };
    let service =
        AggregatedDiscoveryServiceServer::new(ads).max_decoding_message_size(MAX_REQUEST_BYTES);
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(service);
    let stop = sh.stop.clone();
    if cfg.plaintext {
        let incoming = tokio_stream_of(listener);
        sh.tasks.spawn(async move {
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
            {
                warn!(error = %e, "xds server failed");
            }
        });
    } else {
        let tls = sh
            .identity
            .server_config(cfg.allow_list(&sh.identity), &[b"h2"]);
        let incoming = tls_incoming(listener, Arc::new(tls), sh.stop.clone());
        sh.tasks.spawn(async move {
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
            {
                warn!(error = %e, "xds server failed");
            }
        });
    }
}

fn tokio_stream_of(
    listener: TcpListener,
) -> impl futures::Stream<Item = io::Result<tokio::net::TcpStream>> + Send + 'static {
    futures::stream::unfold(listener, |l| async move {
        let accepted = l.accept().await.map(|(s, _)| {
            let _ = s.set_nodelay(true);
            s
        });
        Some((accepted, l))
    })
}

/// TLS handshakes in progress at once; past that, new connections wait to be accepted.
const MAX_HANDSHAKES: usize = 64;
/// How long a client may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// TLS connections whose handshake succeeded (the client's certificate verified against the
/// allow list); failures are logged and dropped, never ending the stream. Handshakes run
/// side by side (up to [`MAX_HANDSHAKES`], the shared accept loop
/// [`meshbridge_core::tls::handshakes`]), so a client that never completes one holds up no
/// one else.
fn tls_incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    stop: CancellationToken,
) -> impl futures::Stream<Item = io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>>
+ Send
+ 'static {
    let limits = AcceptLimits {
        handshake_timeout: HANDSHAKE_TIMEOUT,
        max_handshakes: MAX_HANDSHAKES,
    };
    let admit = |tcp: &tokio::net::TcpStream, _| {
        let _ = tcp.set_nodelay(true);
        Some(())
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    handshakes(listener, acceptor, limits, stop, admit).filter_map(|h| {
        let stream = match h.result {
            Ok(s) => Some(Ok(s)),
            Err(e @ HandshakeError::TimedOut(_)) => {
                debug!(client.addr = %h.addr, error = %e, "xds TLS handshake did not complete");
                None
            }
            Err(e) => {
                warn!(client.addr = %h.addr, error = %e, "xds client refused in the TLS handshake");
                None
            }
        };
        std::future::ready(stream)
    })
}

/// Rebuild the resources on every change of the catalog in use or of the bound service
/// listeners.
async fn follow(
    sh: Arc<Shared>,
    mut services: watch::Receiver<ServiceAddrs>,
    listener_address: Option<std::net::IpAddr>,
    tx: watch::Sender<Arc<Snapshot>>,
) {
    let mut catalog = sh.catalog.clone();
    // A gateway without service listeners has no sender for them: only the catalog moves.
    let mut listeners_follow = true;
    loop {
        tokio::select! {
            r = catalog.changed() => if r.is_err() { return },
            r = services.changed(), if listeners_follow => if r.is_err() {
                listeners_follow = false;
                continue;
            },
            _ = sh.stop.cancelled() => return,
        }
        let snapshot = resources::build(
            &catalog.borrow_and_update(),
            &sh.site,
            &services.borrow_and_update(),
            listener_address,
        );
        // Unchanged resources (a heartbeat) wake no stream.
        tx.send_if_modified(|current| {
            if current.same_resources(&snapshot) {
                false
            } else {
                *current = Arc::new(snapshot);
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::{Stats, resources};
    use meshbridge_core::model::MAX_LINK_ERROR;

    /// A client's NACK may carry megabytes of error detail (and a node id as long): what is
    /// kept, and reported with every heartbeat, is cut, so one NACK can neither hold that
    /// memory nor make the heartbeat too large for the registry (which would cost the
    /// site its lease).
    #[test]
    fn a_huge_nack_is_kept_and_reported_cut() {
        let stats = Stats::default();
        let huge = "é".repeat(1 << 20);
        stats.rejected(7, &huge, resources::LISTENER, &huge);
        let reported = stats.rejections(32);
        assert_eq!(reported.len(), 1);
        let r = &reported[0];
        assert!(r.node.len() <= MAX_LINK_ERROR && r.node.len() > MAX_LINK_ERROR - 2);
        assert!(r.error.len() <= MAX_LINK_ERROR && r.error.len() > MAX_LINK_ERROR - 2);
        assert!(
            r.error.chars().all(|c| c == 'é'),
            "cut at a character boundary"
        );
        assert_eq!(r.type_url, resources::LISTENER);
        let last = stats.latest_nack().unwrap_or_default();
        assert!(last.error.len() <= MAX_LINK_ERROR && last.node.len() <= MAX_LINK_ERROR);
    }
}
