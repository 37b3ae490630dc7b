//! A registry node: the Raft store, the Raft instance, the gRPC server (registry API and
//! Raft transport on one mTLS port), the leader's lease ticker, metrics and admin HTTP.
//!
//! Shutdown order: not ready → stop accepting and end watch streams → wait for calls in
//! flight up to the drain deadline → stop Raft (last) → close the store.

mod bootstrap;
mod handle;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshbridge_core::admin::{self, Readiness};
use meshbridge_core::client::MAX_MESSAGE_BYTES;
use meshbridge_core::config::effective;
use meshbridge_core::proto::{raft_server::RaftServer, registry_server::RegistryServer};
use meshbridge_core::tls::{AllowList, Identity};
use openraft::SnapshotPolicy;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::raft::{Network, Peers, RaftApi};
use crate::service::RegistryApi;
use crate::shared::Shared;
use crate::store::{self, Options, StoreError};
use crate::types::Raft;

pub use handle::NodeHandle;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{field}: {value:?} is not a socket address")]
    Address { field: &'static str, value: String },
    #[error("bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("identity {id} is not a registry node identity (spiffe://<td>/registry/<node>)")]
    NotRegistryIdentity { id: String },
    #[error("raft store in {dir}: {source}")]
    Store { dir: String, source: StoreError },
    #[error("raft config: {0}")]
    RaftConfig(String),
    #[error("start raft: {0}")]
    Raft(String),
    #[error("ca_dir: {0}")]
    Ca(#[source] meshbridge_core::pki::PkiError),
}

/// The largest request the registry API decodes (an export of `MAX_ENDPOINTS` endpoints is
/// well under it); only the Raft service, open to registry nodes alone, takes larger ones.
/// A larger request is refused with `ResourceExhausted` from its length prefix, unread.
pub const MAX_API_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// HTTP/2 streams one client connection may have open at once (watches included).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// Calls one connection may have in flight (a call counts until its response starts).
pub const MAX_CALLS_PER_CONNECTION: usize = 64;

/// Entry point: [`Node::start`].
pub struct Node;

fn parse_addr(field: &'static str, value: &str) -> Result<SocketAddr, StartError> {
    value.parse().map_err(|_| StartError::Address {
        field,
        value: value.to_owned(),
    })
}

fn raft_config(c: &Config) -> Result<Arc<openraft::Config>, StartError> {
    let r = &c.raft;
    let config = openraft::Config {
        cluster_name: "meshbridge-registry".into(),
        heartbeat_interval: r.heartbeat_interval_ms,
        election_timeout_min: r.election_timeout_min_ms,
        election_timeout_max: r.election_timeout_max_ms,
        install_snapshot_timeout: r.snapshot_chunk_timeout_ms,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(r.snapshot_every_logs),
        snapshot_max_chunk_size: r.snapshot_chunk_bytes,
        max_in_snapshot_log_to_keep: r.keep_logs_after_snapshot,
        ..openraft::Config::default()
    };
    let config = config
        .validate()
        .map_err(|e| StartError::RaftConfig(e.to_string()))?;
    Ok(Arc::new(config))
}

impl Node {
    /// Starts a node and returns once it listens. The cluster forms in the background:
    /// the lowest initial member initializes it when its log is empty (and no other member
    /// reports an existing cluster); restarts find their state in `data_dir`.
    pub async fn start(config: Config, identity: Arc<Identity>) -> Result<NodeHandle, StartError> {
        let me = identity.id();
        if !me.is_registry() {
            return Err(StartError::NotRegistryIdentity { id: me.to_string() });
        }
        let trust_domain: Arc<str> = me.trust_domain().into();
        let listen = parse_addr("listen", &config.listen)?;
        let admin_listen = parse_addr("admin_listen", &config.admin_listen)?;
        let grpc_listener = TcpListener::bind(listen)
            .await
            .map_err(|source| StartError::Bind {
                what: "gRPC",
                addr: listen,
                source,
            })?;
        let admin_listener =
            admin::bind(admin_listen)
                .await
                .map_err(|source| StartError::Bind {
                    what: "admin HTTP",
                    addr: admin_listen,
                    source,
                })?;
        let addr = local_addr(&grpc_listener, listen)?;
        let admin_addr = local_addr(&admin_listener, admin_listen)?;

        let issuer = crate::service::Issuer::load(
            config.ca_dir.as_deref(),
            Duration::from_millis(config.svid_ttl_ms),
            &identity,
        )
        .map_err(StartError::Ca)?;
        let dir = config.data_dir.clone();
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let options = Options {
            delta_capacity: config.raft.watch_history,
            log_flush: Some(metrics.log_flush.clone()),
            ..Options::default()
        };
        let opened = tokio::task::spawn_blocking(move || store::open_with(&dir, options)).await;
        let store_err = |source| StartError::Store {
            dir: config.data_dir.display().to_string(),
            source,
        };
        let (log_store, sm_store) = opened
            .map_err(|e| store_err(StoreError::Task(e)))?
            .map_err(store_err)?;
        let feed = sm_store.feed();

        let peers = Peers::new(
            config.node_id,
            identity.clone(),
            config.dial_overrides(),
            metrics.early_appends.clone(),
        );
        let log_store = log_store
            .for_node(config.node_id)
            .with_early_append(config.node_id, peers.clone());
        let log_fault = log_store.fault();
        let raft = Raft::new(
            config.node_id,
            raft_config(&config)?,
            Network::new(peers.clone(), metrics.peer_append.clone()),
            log_store,
            sm_store,
        )
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;

        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            node_id: config.node_id,
            raft: raft.clone(),
            feed,
            peers,
            trust_domain: trust_domain.clone(),
            leases: config.leases.clone(),
            metrics,
            leader_wait: Duration::from_millis(
                config.raft.election_timeout_max_ms.saturating_mul(6),
            ),
            detach_after: Duration::from_millis(
                config.raft.election_timeout_max_ms.saturating_mul(4),
            )
            .max(Duration::from_secs(3)),
            stop: stop.clone(),
            reset_cache: std::sync::Mutex::new(None),
            proposer: crate::propose::Proposer::start(raft.clone()),
            watches: Default::default(),
            identity: identity.clone(),
            seen: Default::default(),
        });

        let mut tasks = JoinSet::new();
        // The server stops accepting on `stop`; connections then drain (see the handle).
        let kill = CancellationToken::new();
        let incoming = crate::listener::incoming(
            grpc_listener,
            &identity,
            AllowList::any(),
            stop.clone(),
            kill.clone(),
        );
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(5)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .concurrency_limit_per_connection(MAX_CALLS_PER_CONNECTION)
            .layer(crate::gate::GateLayer::new(trust_domain.clone()))
            .add_service(
                RegistryServer::new(RegistryApi::new(shared.clone()).with_issuer(issuer))
                    .max_decoding_message_size(MAX_API_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                RaftServer::new(RaftApi::new(
                    raft.clone(),
                    trust_domain,
                    shared.metrics.append_handling.clone(),
                    stop.clone(),
                ))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
        let server = tokio::spawn(server);

        let readiness = Readiness::new();
        let router = admin::router(&readiness, Arc::new(registry), effective(&config))
            .merge(handle::debug_routes(shared.clone()))
            .merge(crate::ui::routes(shared.clone()));
        tasks.spawn(serve_admin(admin_listener, router, stop.clone()));
        tasks.spawn(crate::leases::run(
            shared.clone(),
            Duration::from_millis(config.leases.tick_interval_ms),
            config.leases.forget_withdrawn_after_ms,
            stop.clone(),
        ));
        tasks.spawn(handle::refresh(
            shared.clone(),
            readiness.clone(),
            stop.clone(),
        ));
        tasks.spawn(bootstrap::run(
            shared.clone(),
            config.members(),
            stop.clone(),
        ));

        info!(node = config.node_id, %addr, admin = %admin_addr, id = %me, "registry node started");
        Ok(NodeHandle::new(
            shared,
            addr,
            admin_addr,
            stop,
            kill,
            server,
            tasks,
            readiness,
            config.drain_deadline(),
            log_fault,
        ))
    }
}

fn local_addr(l: &TcpListener, asked: SocketAddr) -> Result<SocketAddr, StartError> {
    l.local_addr().map_err(|source| StartError::Bind {
        what: "listener",
        addr: asked,
        source,
    })
}

async fn serve_admin(listener: TcpListener, router: axum::Router, stop: CancellationToken) {
    if let Err(e) = admin::serve(listener, router, stop.cancelled_owned()).await {
        tracing::warn!(error = %e, "admin server failed");
    }
}
