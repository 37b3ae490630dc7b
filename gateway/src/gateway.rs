//! Starting a gateway and its handle: bound addresses, admin routes, drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshbridge_core::admin::Readiness;
use meshbridge_core::drain;
use meshbridge_core::model::{Catalog, Link, MAX_XDS_REJECTIONS, Report, ServiceKey};
use meshbridge_core::tls::Identity;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, addr};
use crate::metrics::Metrics;
use crate::outbound::{self, Kind};
use crate::pool::{PeerStatus, Pool};
use crate::services::{self, ServiceAddrs};
use crate::shared::Shared;
use crate::transport::Dialer;
use crate::{Error, admin, quic, server, snapshot};

/// Entry point of the data plane.
pub struct Gateway;

/// A running gateway. Dropping it stops everything at once; [`GatewayHandle::drain`] stops
/// it gracefully.
pub struct GatewayHandle {
    shared: Arc<Shared>,
    trigger: Option<drain::Trigger>,
    endpoint: quinn::Endpoint,
    tunnel_addr: SocketAddr,
    sni_addr: Option<SocketAddr>,
    connect_addr: Option<SocketAddr>,
    fixed_addrs: Vec<SocketAddr>,
    xds_addr: Option<SocketAddr>,
    xds_stats: Arc<crate::xds::Stats>,
    admin_addr: Option<SocketAddr>,
    readiness: Readiness,
    registry: Arc<Registry>,
    services: watch::Receiver<ServiceAddrs>,
    config_dump: String,
}

/// Bind QUIC (UDP) and the TCP fallback on the same port; with port 0, find one free for both.
fn bind_tunnel(
    cfg: &Config,
    identity: &Arc<Identity>,
) -> Result<(quinn::Endpoint, TcpListener), Error> {
    let want = addr("tunnel.listen", &cfg.tunnel.listen)?;
    let tries = if want.port() == 0 { 20 } else { 1 };
    let mut last = None;
    for _ in 0..tries {
        let server = identity.server_config(cfg.tunnel.allow_list(identity), &[quic::ALPN]);
        let client = identity.client_config(cfg.tunnel.allow_list(identity), &[quic::ALPN]);
        let endpoint = quic::endpoint(want, &cfg.tunnel, Some(server), client)?;
        let udp = endpoint.local_addr().map_err(|source| Error::Bind {
            what: "tunnel (udp)",
            addr: want,
            source,
        })?;
        let tcp = std::net::TcpListener::bind(udp)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(TcpListener::from_std);
        match tcp {
            Ok(l) => return Ok((endpoint, l)),
            Err(source) => {
                endpoint.close(quinn::VarInt::from_u32(0), b"");
                last = Some(Error::Bind {
                    what: "tunnel (tcp)",
                    addr: udp,
                    source,
                });
            }
        }
    }
    Err(last.unwrap_or(Error::Config {
        field: "tunnel.listen",
        reason: "no port free for both UDP and TCP".into(),
    }))
}

async fn bind_tcp(field: &'static str, what: &'static str, s: &str) -> Result<TcpListener, Error> {
    let a = addr(field, s)?;
    TcpListener::bind(a).await.map_err(|source| Error::Bind {
        what,
        addr: a,
        source,
    })
}

fn local(l: &TcpListener, what: &'static str) -> Result<SocketAddr, Error> {
    l.local_addr().map_err(|source| Error::Bind {
        what,
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })
}

impl Gateway {
    /// Bind every listener and start serving. `catalog` is the registry's (or a test's) feed;
    /// while it holds only an empty placeholder, the gateway serves its persisted snapshot.
    pub async fn start(
        config: Config,
        identity: Arc<Identity>,
        catalog: watch::Receiver<Arc<Catalog>>,
    ) -> Result<GatewayHandle, Error> {
        meshbridge_core::install_crypto_provider();
        let config_dump = meshbridge_core::config::effective(&config);
        let (endpoint, tunnel_tcp) = bind_tunnel(&config, &identity)?;
        let tunnel_addr = local(&tunnel_tcp, "tunnel")?;
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry, &config.site);
        let xds_stats = Arc::new(crate::xds::Stats::default());
        if config.xds.is_some() {
            xds_stats.register(&mut registry, &config.site);
        }
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();

        let effective_rx = snapshot::statically_stable(&config.data_dir, catalog, &stop, &tasks);

        let dialer = Dialer::new(
            endpoint.clone(),
            &identity,
            &config.tunnel,
            tasks.clone(),
            stop.clone(),
        );
        let pool = Arc::new(Pool::new(
            dialer,
            metrics.clone(),
            tasks.clone(),
            stop.clone(),
        ));
        tasks.spawn(pool.clone().maintain());
        let (trigger, drain_watch) = drain::channel();
        let sh = Arc::new(Shared::new(
            config.clone(),
            identity,
            effective_rx,
            metrics,
            pool,
            drain_watch,
            tasks.clone(),
            stop,
        ));
        tasks.spawn(track_revision(sh.clone()));
        tasks.spawn(server::quic_loop(sh.clone(), endpoint.clone()));
        tasks.spawn(server::tcp_loop(sh.clone(), tunnel_tcp));

        let (services_tx, services_rx) = watch::channel(ServiceAddrs::new());
        if let Some(range) = config.listeners.vip_range {
            tasks.spawn(services::reconcile(
                sh.clone(),
                services::Addressing::Vips(range),
                services_tx,
            ));
        } else if let Some(p) = &config.listeners.import_ports {
            tasks.spawn(services::reconcile(
                sh.clone(),
                services::Addressing::Ports {
                    address: p.address,
                    range: p.ports,
                },
                services_tx,
            ));
        }
        let mut xds_addr = None;
        if let Some(x) = &config.xds {
            let l = bind_tcp("xds.listen", "xDS listener", &x.listen).await?;
            xds_addr = Some(local(&l, "xDS listener")?);
            crate::xds::spawn(sh.clone(), x, l, services_rx.clone(), xds_stats.clone());
        }
        let mut fixed_addrs = Vec::new();
        for f in &config.listeners.fixed {
            let Some((namespace, name)) = f.service_key() else {
                return Err(Error::Config {
                    field: "listeners.fixed.service",
                    reason: format!("{:?} is not namespace/name", f.service),
                });
            };
            let l = bind_tcp(
                "listeners.fixed.listen",
                "fixed service listener",
                &f.listen,
            )
            .await?;
            let addr = local(&l, "fixed service listener")?;
            fixed_addrs.push(addr);
            tracing::info!(%addr, service = %f.service, port = f.port, "fixed service listener up");
            let target = crate::preamble::Target::Service {
                namespace,
                name,
                port: f.port,
            };
            let stop = sh.accept_stop.child_token();
            tasks.spawn(outbound::accept_loop(
                sh.clone(),
                l,
                Kind::Service(target),
                stop,
            ));
        }
        let mut sni_addr = None;
        if let Some(a) = &config.listeners.sni {
            let l = bind_tcp("listeners.sni", "SNI listener", a).await?;
            sni_addr = Some(local(&l, "SNI listener")?);
            let stop = sh.accept_stop.child_token();
            tasks.spawn(outbound::accept_loop(sh.clone(), l, Kind::Sni, stop));
        }
        let mut connect_addr = None;
        if let Some(a) = &config.listeners.connect {
            let l = bind_tcp("listeners.connect", "CONNECT listener", a).await?;
            connect_addr = Some(local(&l, "CONNECT listener")?);
            let stop = sh.accept_stop.child_token();
            tasks.spawn(outbound::accept_loop(sh.clone(), l, Kind::Connect, stop));
        }

        let readiness = Readiness::new();
        let registry = Arc::new(registry);
        let mut handle = GatewayHandle {
            shared: sh.clone(),
            trigger: Some(trigger),
            endpoint,
            tunnel_addr,
            sni_addr,
            connect_addr,
            fixed_addrs,
            xds_addr,
            xds_stats,
            admin_addr: None,
            readiness: readiness.clone(),
            registry,
            services: services_rx,
            config_dump,
        };
        if let Some(a) = &config.admin_listen {
            let l = bind_tcp("admin_listen", "admin listener", a).await?;
            handle.admin_addr = Some(local(&l, "admin listener")?);
            let router = handle.admin_router();
            let stop = sh.stop.clone();
            tasks.spawn(async move {
                let stopped = async move { stop.cancelled().await };
                if let Err(e) = meshbridge_core::admin::serve(l, router, stopped).await {
                    tracing::warn!(error = %e, "admin server failed");
                }
            });
        }
        readiness.set(true);
        tracing::info!(
            site = %sh.site, id = %sh.identity.id(), tunnel = %tunnel_addr,
            sni = ?sni_addr, connect = ?connect_addr, "gateway started"
        );
        Ok(handle)
    }
}

/// Follow the catalog in use: revision gauge, and peers that left it are dropped.
async fn track_revision(sh: Arc<Shared>) {
    let mut rx = sh.catalog.clone();
    loop {
        let catalog = rx.borrow_and_update().clone();
        sh.metrics.catalog_revision.set(catalog.revision as i64);
        sh.pool.retain(|site, addr| {
            catalog
                .site(site)
                .is_some_and(|s| s.gateways.iter().any(|g| g == addr))
        });
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = sh.stop.cancelled() => return,
        }
    }
}

impl GatewayHandle {
    /// Where peers reach this gateway (UDP for QUIC and TCP for the fallback, same port).
    pub fn tunnel_addr(&self) -> SocketAddr {
        self.tunnel_addr
    }
    pub fn sni_addr(&self) -> Option<SocketAddr> {
        self.sni_addr
    }
    pub fn connect_addr(&self) -> Option<SocketAddr> {
        self.connect_addr
    }
    /// The fixed service listeners' addresses, in the order of `listeners.fixed`.
    pub fn fixed_addrs(&self) -> &[SocketAddr] {
        &self.fixed_addrs
    }
    /// Where xDS clients connect, when `xds` is configured.
    pub fn xds_addr(&self) -> Option<SocketAddr> {
        self.xds_addr
    }

    /// xDS counters and the last NACK.
    pub fn xds_stats(&self) -> Arc<crate::xds::Stats> {
        self.xds_stats.clone()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }
    /// Service listeners bound now.
    pub fn service_addrs(&self) -> ServiceAddrs {
        self.services.borrow().clone()
    }

    /// The listener of `key`'s `port`, waiting up to `within` for it to be bound.
    pub async fn service_addr(
        &self,
        key: &ServiceKey,
        port: u16,
        within: Duration,
    ) -> Option<SocketAddr> {
        let mut rx = self.services.clone();
        let k = (key.clone(), port);
        let found = tokio::time::timeout(within, rx.wait_for(|m| m.contains_key(&k))).await;
        found.ok()?.ok()?.get(&k).copied()
    }

    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }
    /// The catalog in use.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.shared.catalog()
    }
    /// The catalog in use, as it changes: the persisted snapshot until the source's first
    /// catalog (what an embedded DNS server should answer from).
    pub fn catalog_watch(&self) -> watch::Receiver<Arc<Catalog>> {
        self.shared.catalog.clone()
    }
    /// Wait up to `within` until the catalog in use reaches `revision`; false on timeout.
    pub async fn wait_for_revision(&self, revision: u64, within: Duration) -> bool {
        let mut rx = self.shared.catalog.clone();
        let reached = rx.wait_for(|c| c.revision >= revision);
        matches!(tokio::time::timeout(within, reached).await, Ok(Ok(_)))
    }

    pub fn peers(&self) -> Vec<PeerStatus> {
        self.shared.pool.status()
    }
    /// A function returning what this gateway reports with its heartbeats (its tunnel links
    /// and its xDS clients' standing rejections), usable after the handle moves.
    pub fn reporter(&self) -> impl Fn() -> Report + Send + Sync + 'static {
        let shared = self.shared.clone();
        let xds = self.xds_stats.clone();
        move || Report {
            links: shared
                .pool
                .status()
                .into_iter()
                .map(|p| Link {
                    peer_site: p.site,
                    connected: p.connected,
                    transport: p.transport.map(str::to_string),
                    rtt_us: p.rtt_ms.map(|ms| (ms * 1000.0) as u64),
                    failures: p.failures,
                    last_error: p.last_error,
                })
                .collect(),
            xds_rejections: xds.rejections(MAX_XDS_REJECTIONS),
        }
    }
    /// Streams and client connections in flight.
    pub fn inflight(&self) -> usize {
        self.shared.drain.inflight()
    }

    /// The admin routes: the foundation's `/healthz`, `/readyz`, `/metrics`, `/config_dump`,
    /// plus `/debug/catalog` and `/debug/peers`.
    pub fn admin_router(&self) -> axum::Router {
        let base = meshbridge_core::admin::router(
            &self.readiness,
            self.registry.clone(),
            self.config_dump.clone(),
        );
        base.merge(admin::debug_routes(self.shared.clone()))
    }

    /// Drain: not ready → stop accepting (new tunnel streams are answered `draining`, so
    /// peers fail over) → wait up to `deadline` for work in flight → close everything.
    pub async fn drain(mut self, deadline: Duration) -> drain::Outcome {
        // Draining first, then not ready: whoever sees "not ready" finds new streams
        // refused ("draining"), never still accepted.
        if let Some(t) = &self.trigger {
            t.announce();
        }
        self.readiness.set(false);
        self.shared.accept_stop.cancel();
        let outcome = match self.trigger.take() {
            Some(t) => t.drain(deadline).await,
            None => drain::Outcome::Graceful,
        };
        tracing::info!(?outcome, "gateway drained");
        self.close().await;
        outcome
    }

    /// Stop at once, closing links and streams.
    pub async fn shutdown(mut self) {
        self.readiness.set(false);
        self.close().await;
    }

    async fn close(&mut self) {
        let sh = &self.shared;
        sh.stop.cancel();
        sh.pool.close_all();
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"gateway closing");
        sh.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), sh.tasks.wait()).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

impl Drop for GatewayHandle {
    fn drop(&mut self) {
        self.shared.stop.cancel();
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"gateway closing");
    }
}
