//! State shared by every task of one gateway.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use meshbridge_core::drain;
use meshbridge_core::model::{Catalog, ServiceKey};
use meshbridge_core::sync::lock;
use meshbridge_core::tls::Identity;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::choice::Ejections;
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
    pub ejections: Mutex<Ejections>,
    /// Local endpoints with consecutive connect failures (receiving side).
    pub endpoint_ejections: Mutex<Ejections>,
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
    rr: Mutex<HashMap<(ServiceKey, u16), usize>>,
    roll: AtomicU64,
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
        let ejections = Ejections::new(
            f.eject_after,
            std::time::Duration::from_millis(f.eject_base_ms),
            std::time::Duration::from_millis(f.eject_max_ms),
        );
        let endpoint_ejections = Ejections::new(
            f.eject_after,
            std::time::Duration::from_millis(f.eject_base_ms),
            std::time::Duration::from_millis(f.eject_max_ms),
        );
        Self {
            client_slots: Arc::new(tokio::sync::Semaphore::new(cfg.listeners.max_connections)),
            inbound_streams: Arc::new(tokio::sync::Semaphore::new(cfg.tunnel.max_inbound_streams)),
            peer_links: Arc::default(),
            endpoint_ejections: Mutex::new(endpoint_ejections),
            site: cfg.site.clone(),
            cfg,
            identity,
            catalog,
            metrics,
            pool,
            ejections: Mutex::new(ejections),
            drain,
            tasks,
            accept_stop: stop.child_token(),
            stop,
            rr: Mutex::new(HashMap::new()),
            roll: AtomicU64::new(rand::random()),
        }
    }

    /// The catalog in use now.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.borrow().clone()
    }

    /// The next round-robin start index for a service port.
    pub fn next_rr(&self, key: &ServiceKey, port: u16) -> usize {
        let mut rr = lock(&self.rr);
        let n = rr.entry((key.clone(), port)).or_insert(0);
        let v = *n;
        *n = n.wrapping_add(1);
        v
    }

    /// A fresh seed for the weighted site order.
    pub fn roll(&self) -> u64 {
        self.roll
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
    }

    pub fn is_ejected(&self, site: &str) -> bool {
        lock(&self.ejections).is_ejected(site, Instant::now())
    }

    pub fn site_failed(&self, site: &str) {
        if let Some(d) = lock(&self.ejections).failure(site, Instant::now()) {
            tracing::warn!(
                peer.site = site,
                backoff_ms = d.as_millis() as u64,
                "site ejected after consecutive failures"
            );
            self.metrics.failure(site, "site_ejected");
        }
    }

    pub fn site_ok(&self, site: &str) {
        lock(&self.ejections).success(site);
    }

    /// Order `addrs` for a connection: healthy endpoints first (round-robin from `start`),
    /// ejected ones after them.
    pub fn order_endpoints(
        &self,
        addrs: &[std::net::SocketAddr],
        start: usize,
    ) -> Vec<std::net::SocketAddr> {
        let now = Instant::now();
        let ej = lock(&self.endpoint_ejections);
        let mut out: Vec<_> = (0..addrs.len())
            .map(|i| addrs[(start + i) % addrs.len()])
            .collect();
        out.sort_by_key(|a| ej.is_ejected(&a.to_string(), now));
        out
    }

    pub fn endpoint_failed(&self, addr: std::net::SocketAddr) {
        if let Some(d) = lock(&self.endpoint_ejections).failure(&addr.to_string(), Instant::now()) {
            tracing::warn!(endpoint = %addr, backoff_ms = d.as_millis() as u64, "endpoint ejected after consecutive connect failures");
        }
    }

    pub fn endpoint_ok(&self, addr: std::net::SocketAddr) {
        lock(&self.endpoint_ejections).success(&addr.to_string());
    }

    pub fn ejected_sites(&self) -> Vec<(String, std::time::Duration)> {
        lock(&self.ejections).ejected(Instant::now())
    }
}
