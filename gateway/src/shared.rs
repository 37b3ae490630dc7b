//! State shared by every task of one gateway.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use meshbridge_core::drain;
use meshbridge_core::model::{Catalog, EndpointGroup, ServiceKey, SiteRank};
use meshbridge_core::sync::lock;
use meshbridge_core::tls::Identity;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::choice::{Candidate, Chooser};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::pool::Pool;

pub struct Shared {
    pub cfg: Config,
    pub site: String,
    pub identity: Arc<Identity>,
    pub catalog: watch::Receiver<Arc<Catalog>>,
    pub metrics: Metrics,
    pub pool: Arc<Pool>,
    /// Every choice of a site or local endpoint, and their ejections.
    chooser: Mutex<Chooser>,
    pub drain: drain::Watch,
    pub tasks: TaskTracker,
    /// Stops accept loops (first step of a drain).
    pub accept_stop: CancellationToken,
    /// Stops everything (last step).
    pub stop: CancellationToken,
    /// One permit per open local client connection.
    pub client_slots: Arc<tokio::sync::Semaphore>,
    /// One permit per stream served from a peer (`tunnel.max_inbound_streams`).
    pub inbound_streams: Arc<tokio::sync::Semaphore>,
    /// Open links per peer identity (`tunnel.max_links_per_peer`).
    peer_links: Arc<Mutex<HashMap<String, usize>>>,
}

/// One open link of a peer identity; given back on drop.
pub struct PeerLink {
    links: Arc<Mutex<HashMap<String, usize>>>,
    peer: String,
}

impl Drop for PeerLink {
    fn drop(&mut self) {
        let mut links = lock(&self.links);
        if let Some(n) = links.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                links.remove(&self.peer);
            }
        }
    }
}

impl Shared {
    /// A place for one more link of `peer`, or `None` at `tunnel.max_links_per_peer`.
    pub fn peer_link(&self, peer: &str) -> Option<PeerLink> {
        let mut links = lock(&self.peer_links);
        let n = links.entry(peer.to_owned()).or_default();
        if *n >= self.cfg.tunnel.max_links_per_peer {
            return None;
        }
        *n += 1;
        Some(PeerLink {
            links: self.peer_links.clone(),
            peer: peer.to_owned(),
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Config,
        identity: Arc<Identity>,
        catalog: watch::Receiver<Arc<Catalog>>,
        metrics: Metrics,
        pool: Arc<Pool>,
        drain: drain::Watch,
        tasks: TaskTracker,
        stop: CancellationToken,
    ) -> Self {
        let f = &cfg.failover;
        let chooser = Chooser::new(
            f.eject_after,
            std::time::Duration::from_millis(f.eject_base_ms),
            std::time::Duration::from_millis(f.eject_max_ms),
            rand::random(),
        );
        Self {
            client_slots: Arc::new(tokio::sync::Semaphore::new(cfg.listeners.max_connections)),
            inbound_streams: Arc::new(tokio::sync::Semaphore::new(cfg.tunnel.max_inbound_streams)),
            peer_links: Arc::default(),
            site: cfg.site.clone(),
            cfg,
            identity,
            catalog,
            metrics,
            pool,
            chooser: Mutex::new(chooser),
            drain,
            tasks,
            accept_stop: stop.child_token(),
            stop,
        }
    }

    /// The catalog in use now.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.borrow().clone()
    }

    /// The sites to try for a connection to service port `port`, in order (see
    /// [`Chooser::sites`]); sites without a working link go last.
    pub fn candidates(&self, ranked: &[(SiteRank, EndpointGroup)], port: u16) -> Vec<Candidate> {
        let unhealthy = |s: &str| self.pool.unhealthy(s);
        lock(&self.chooser).sites(ranked, port, &self.site, unhealthy, Instant::now())
    }

    pub fn site_failed(&self, site: &str) {
        if let Some(d) = lock(&self.chooser).site_failed(site, Instant::now()) {
            tracing::warn!(
                peer.site = site,
                backoff_ms = d.as_millis() as u64,
                "site ejected after consecutive failures"
            );
            self.metrics.failure(site, "site_ejected");
        }
    }

    pub fn site_ok(&self, site: &str) {
        lock(&self.chooser).site_ok(site);
    }

    /// The order in which to try local endpoints `addrs` of (`key`, `port`).
    pub fn order_endpoints(
        &self,
        key: &ServiceKey,
        port: u16,
        addrs: &[std::net::SocketAddr],
    ) -> Vec<std::net::SocketAddr> {
        lock(&self.chooser).endpoints(key, port, addrs, Instant::now())
    }

    pub fn endpoint_failed(&self, addr: std::net::SocketAddr) {
        if let Some(d) = lock(&self.chooser).endpoint_failed(addr, Instant::now()) {
            tracing::warn!(endpoint = %addr, backoff_ms = d.as_millis() as u64, "endpoint ejected after consecutive connect failures");
        }
    }

    pub fn endpoint_ok(&self, addr: std::net::SocketAddr) {
        lock(&self.chooser).endpoint_ok(addr);
    }

    pub fn ejected_sites(&self) -> Vec<(String, std::time::Duration)> {
        lock(&self.chooser).ejected_sites(Instant::now())
    }
}
