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
    rr: Mutex<HashMap<(ServiceKey, u16), usize>>,
    roll: AtomicU64,
}

impl Shared {
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
