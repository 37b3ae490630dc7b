//! One link per peer gateway: established on first use, kept alive (QUIC keepalive or HTTP/2
//! pings), replaced when it dies, re-dialed with exponential backoff after failures. With the
//! `auto` transport a QUIC handshake that gets no answer switches the peer to TCP for a while.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshbridge_core::id::SpiffeId;
use meshbridge_core::sync::lock;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{TransportKind, TunnelConfig};
use crate::metrics::{Metrics, PeerLabels, SiteLabel};
use crate::transport::{Carrier, Dialer, Link, LinkError};

mod status;
pub use status::PeerStatus;

const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long a peer stays on TCP after QUIC got no answer (`auto`).
const TCP_STICKY: Duration = Duration::from_secs(300);

/// Why no link to a peer is available now.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("peer {site} at {addr}: cannot resolve: {reason}")]
    Resolve {
        site: String,
        addr: String,
        reason: String,
    },
    #[error("peer {site} at {addr}: {source}")]
    Link {
        site: String,
        addr: String,
        source: LinkError,
    },
    #[error(
        "peer {site} at {addr} is {found}, not the gateway (or agent) of site {site} of this trust domain"
    )]
    WrongPeer {
        site: String,
        addr: String,
        found: String,
    },
    #[error("peer {site} at {addr} is down (re-dialing in the background) after: {last}")]
    Unhealthy {
        site: String,
        addr: String,
        last: String,
    },
    #[error("peer {site} at {addr}: backing off for {left:?} after: {last}")]
    Backoff {
        site: String,
        addr: String,
        left: Duration,
        last: String,
    },
}

#[derive(Default)]
struct State {
    link: Option<(Link, SpiffeId)>,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<String>,
    tcp_until: Option<Instant>,
}

#[derive(Default)]
struct Entry {
    dialing: Arc<tokio::sync::Mutex<()>>,
    state: Mutex<State>,
}

/// The peer link pool.
pub struct Pool {
    dialer: Dialer,
    cfg: TunnelConfig,
    metrics: Metrics,
    tasks: TaskTracker,
    stop: CancellationToken,
    entries: Mutex<HashMap<(String, String), Arc<Entry>>>,
}

impl Pool {
    pub fn new(
        dialer: Dialer,
        metrics: Metrics,
        tasks: TaskTracker,
        stop: CancellationToken,
    ) -> Self {
        Self {
            cfg: dialer.tunnel_config().clone(),
            dialer,
            metrics,
            tasks,
            stop,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn entry(&self, site: &str, addr: &str) -> Arc<Entry> {
        lock(&self.entries)
            .entry((site.to_string(), addr.to_string()))
            .or_default()
            .clone()
    }

    /// The live link to `site`'s gateway at `addr`. A peer that failed recently is not dialed
    /// inline (the maintenance task re-dials it in the background) unless it is the
    /// client's `last_resort`; a never-failed peer is dialed at once.
    pub async fn get(&self, site: &str, addr: &str, last_resort: bool) -> Result<Link, PoolError> {
        let entry = self.entry(site, addr);
        if let Some(link) = self.ready(&entry, site, addr, last_resort)? {
            return Ok(link);
        }
        let _dialing = entry.dialing.lock().await;
        if let Some(link) = self.ready(&entry, site, addr, last_resort)? {
            return Ok(link);
        }
        self.dial_and_record(&entry, site, addr).await
    }

    async fn dial_and_record(
        &self,
        entry: &Entry,
        site: &str,
        addr: &str,
    ) -> Result<Link, PoolError> {
        match self.dial(entry, site, addr).await {
            Ok(link) => Ok(link),
            Err(e) => {
                let reason = match &e {
                    PoolError::Link {
                        source: LinkError::Timeout { .. },
                        ..
                    } => "link_timeout",
                    PoolError::WrongPeer { .. } => "wrong_peer",
                    _ => "link_failed",
                };
                self.metrics.failure(site, reason);
                mark_failed(&mut lock(&entry.state), e.to_string());
                Err(e)
            }
        }
    }

    /// Re-dial, in the background, peers that failed and whose backoff is over.
    pub async fn maintain(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.stop.cancelled() => return,
            }
            let now = Instant::now();
            let due: Vec<((String, String), Arc<Entry>)> = lock(&self.entries)
                .iter()
                .filter(|(_, e)| {
                    let st = lock(&e.state);
                    st.link.is_none() && st.failures > 0 && st.retry_at.is_none_or(|at| at <= now)
                })
                .map(|(k, e)| (k.clone(), e.clone()))
                .collect();
            for ((site, addr), entry) in due {
                let Ok(guard) = entry.dialing.clone().try_lock_owned() else {
                    continue;
                };
                let pool = self.clone();
                self.tasks.spawn(async move {
                    let _guard = guard;
                    if pool.dial_and_record(&entry, &site, &addr).await.is_ok() {
                        tracing::info!(peer.site = %site, peer.addr = %addr, "peer reachable again");
                    }
                });
            }
        }
    }

    /// A live link, or an error while backing off, or `None` (dial now).
    fn ready(
        &self,
        entry: &Entry,
        site: &str,
        addr: &str,
        last_resort: bool,
    ) -> Result<Option<Link>, PoolError> {
        let mut st = lock(&entry.state);
        if let Some((link, _)) = &st.link {
            if !link.is_closed() {
                return Ok(Some(link.clone()));
            }
            st.link = None;
            mark_failed(&mut st, "link closed".into());
        }
        if st.failures > 0 && !last_resort {
            return Err(PoolError::Unhealthy {
                site: site.to_string(),
                addr: addr.to_string(),
                last: st.last_error.clone().unwrap_or_default(),
            });
        }
        let now = Instant::now();
        match st.retry_at {
            Some(at) if now < at => Err(PoolError::Backoff {
                site: site.to_string(),
                addr: addr.to_string(),
                left: at - now,
                last: st.last_error.clone().unwrap_or_default(),
            }),
            _ => Ok(None),
        }
    }

    fn carrier(&self, entry: &Entry, site: &str) -> Carrier {
        match self.cfg.transport_for(site) {
            TransportKind::Quic => Carrier::Quic,
            TransportKind::Tcp => Carrier::Tcp,
            TransportKind::Auto => match lock(&entry.state).tcp_until {
                Some(until) if Instant::now() < until => Carrier::Tcp,
                _ => Carrier::Quic,
            },
        }
    }

    async fn dial(&self, entry: &Entry, site: &str, addr: &str) -> Result<Link, PoolError> {
        let sock = resolve(addr).await.map_err(|reason| PoolError::Resolve {
            site: site.to_string(),
            addr: addr.to_string(),
            reason,
        })?;
        let carrier = self.carrier(entry, site);
        let link_err = |source| PoolError::Link {
            site: site.to_string(),
            addr: addr.to_string(),
            source,
        };
        let (link, id, took) = match self.dialer.connect(sock, carrier).await {
            Err(LinkError::Timeout { .. })
                if carrier == Carrier::Quic
                    && self.cfg.transport_for(site) == TransportKind::Auto =>
            {
                tracing::warn!(
                    peer.site = site,
                    peer.addr = addr,
                    "no QUIC answer; trying TCP"
                );
                let r = self
                    .dialer
                    .connect(sock, Carrier::Tcp)
                    .await
                    .map_err(link_err)?;
                lock(&entry.state).tcp_until = Some(Instant::now() + TCP_STICKY);
                r
            }
            r => r.map_err(link_err)?,
        };
        if !self.dialer.is_expected_peer(site, &id) {
            link.close("unexpected peer identity");
            return Err(PoolError::WrongPeer {
                site: site.to_string(),
                addr: addr.to_string(),
                found: id.to_string(),
            });
        }
        let labels = PeerLabels {
            peer_site: site.to_string(),
            transport: link.carrier().name(),
        };
        self.metrics.connections.get_or_create(&labels).inc();
        self.metrics
            .handshake_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        tracing::info!(
            peer.site = site, peer.addr = addr, peer.id = %id,
            transport = labels.transport, handshake_ms = took.as_millis() as u64,
            "tunnel link up"
        );
        {
            let mut st = lock(&entry.state);
            st.link = Some((link.clone(), id));
            st.failures = 0;
            st.retry_at = None;
            st.last_error = None;
        }
        self.monitor(self.entry(site, addr), link.clone(), labels);
        Ok(link)
    }

    /// Track the link's gauge and RTT until it closes.
    fn monitor(&self, entry: Arc<Entry>, link: Link, labels: PeerLabels) {
        let metrics = self.metrics.clone();
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            let active = metrics.connections_active.get_or_create(&labels).clone();
            active.inc();
            let rtt = metrics
                .rtt_seconds
                .get_or_create(&SiteLabel {
                    peer_site: labels.peer_site.clone(),
                })
                .clone();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = link.closed() => break,
                    _ = stop.cancelled() => {
                        link.close("gateway closing");
                        break;
                    }
                    _ = tick.tick() => {
                        if let Some(d) = link.rtt() {
                            rtt.set(d.as_secs_f64());
                        }
                    }
                }
            }
            active.dec();
            {
                // Still the entry's link: it died under us (not discarded), so re-dial later.
                let mut st = lock(&entry.state);
                if st.link.as_ref().is_some_and(|(l, _)| l.is_closed()) {
                    st.link = None;
                    mark_failed(&mut st, "link closed".into());
                }
            }
            tracing::info!(peer.site = %labels.peer_site, transport = labels.transport, "tunnel link down");
        });
    }

    /// A link failed a request (dead or unresponsive): close it and count a failure.
    pub fn link_failed(&self, site: &str, addr: &str, reason: String) {
        let entry = self.entry(site, addr);
        let mut st = lock(&entry.state);
        if let Some((link, _)) = st.link.take() {
            link.close("failed a request");
        }
        mark_failed(&mut st, reason);
    }

    /// Close every link.
    pub fn close_all(&self) {
        for e in lock(&self.entries).values() {
            if let Some((link, _)) = lock(&e.state).link.take() {
                link.close("gateway closing");
            }
        }
    }
}

fn mark_failed(st: &mut State, reason: String) {
    st.failures += 1;
    let backoff =
        meshbridge_core::backoff::exponential(BACKOFF_BASE, BACKOFF_MAX, st.failures.min(8));
    st.retry_at = Some(Instant::now() + backoff);
    st.last_error = Some(reason);
}

async fn resolve(addr: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = addr.parse() {
        return Ok(a);
    }
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| e.to_string())?
        .next()
        .ok_or_else(|| "no address".to_string())
}
