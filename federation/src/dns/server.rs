//! The shell: sockets (UDP: a thread per socket, see [`super::udp`]; TCP: tasks, see
//! [`super::tcp`]),
//! the index kept current from the catalog replica, rate limiting, forwarding, metrics,
//! shutdown.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use meshbridge_core::config::{ConfigError, Problems, RoleConfig};
use meshbridge_core::drain::{self, Outcome};
use meshbridge_core::model::Catalog;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::DnsError;
use super::config::Config;
use super::forward::Forwarder;
use super::index::Index;
use super::metrics::Metrics;
use super::ratelimit::RateLimiter;
use super::tcp::serve_tcp;
use super::udp::{Shared, UdpWorkers};
use super::watch::watch_catalog;

/// Attempts at finding a port free for both UDP and TCP when asked for port 0.
const BIND_ATTEMPTS: usize = 16;
/// Most UDP sockets (receive loops) on the port.
const MAX_UDP_SOCKETS: usize = 4;

/// Starts the federated DNS server.
pub struct DnsServer;

/// A running DNS server. Dropping it stops it at once; [`DnsHandle::shutdown`] stops it
/// in order.
pub struct DnsHandle {
    local_addr: SocketAddr,
    udp: UdpWorkers,
    tasks: JoinSet<()>,
    stop: CancellationToken,
    metrics: Metrics,
    index: Arc<ArcSwap<Index>>,
}

impl DnsServer {
    /// Validate `config`, index the current catalog, bind UDP and TCP on the same port, and
    /// serve; the index follows `catalog` until it closes, then the last catalog is served.
    pub async fn start(
        config: Config,
        catalog: watch::Receiver<Arc<Catalog>>,
    ) -> Result<DnsHandle, DnsError> {
        let mut problems = Problems::default();
        config.validate(&mut problems);
        if !problems.is_empty() {
            return Err(DnsError::Config(ConfigError {
                source_name: "dns config".into(),
                problems: problems.0,
            }));
        }
        let listen = config.listen_addr().map_err(DnsError::Listen)?;
        let upstream = config.upstream_addr().map_err(DnsError::Listen)?;
        let metrics = Metrics::default();
        let first = catalog.borrow().clone();
        let started = Instant::now();
        let index = Index::build(&config, &first)?;
        metrics.observe_index(&index, started.elapsed());
        let index = Arc::new(ArcSwap::from_pointee(index));

        let (udp, tcp) = bind(listen).await?;
        let local_addr = tcp.local_addr().map_err(|source| DnsError::BindTcp {
            addr: listen,
            source,
        })?;
        let shared = Arc::new(Shared {
            index: index.clone(),
            limiter: RateLimiter::new(&config.rate_limit),
            forwarder: upstream
                .map(|up| Forwarder::new(up, Duration::from_millis(config.upstream_timeout_ms))),
            metrics: metrics.clone(),
        });
        let udp = UdpWorkers::start(udp, shared.clone(), tokio::runtime::Handle::current())
            .map_err(|source| DnsError::BindUdp {
                addr: local_addr,
                source,
            })?;
        let idle = Duration::from_secs(config.tcp_idle_timeout_secs);
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        tasks.spawn(serve_tcp(tcp, shared, idle, stop.clone()));
        info!(
            %local_addr,
            zone = %config.zone,
            site = %config.site,
            revision = first.revision,
            "dns listening"
        );
        tasks.spawn(watch_catalog(
            Arc::new(config),
            catalog,
            first,
            index.clone(),
            metrics.clone(),
            stop.clone(),
        ));
        Ok(DnsHandle {
            local_addr,
            udp,
            tasks,
            stop,
            metrics,
            index,
        })
    }
}

/// Bind UDP sockets (one per core, up to [`MAX_UDP_SOCKETS`], sharing the port with
/// `SO_REUSEPORT` so the kernel spreads queries over their receive loops), then TCP on the
/// same port, retrying other ports when the port was 0. TCP does not share: a second server
/// on the port fails here rather than splitting the traffic.
async fn bind(listen: SocketAddr) -> Result<(Vec<socket2::Socket>, TcpListener), DnsError> {
    let count = std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_UDP_SOCKETS));
    let mut last = None;
    for _ in 0..BIND_ATTEMPTS {
        let first = udp_socket(listen).map_err(|source| DnsError::BindUdp {
            addr: listen,
            source,
        })?;
        let addr = first
            .local_addr()
            .and_then(|a| {
                a.as_socket()
                    .ok_or_else(|| io::Error::other("not an internet address"))
            })
            .map_err(|source| DnsError::BindUdp {
                addr: listen,
                source,
            })?;
        let mut udp = vec![first];
        for _ in 1..count {
            udp.push(udp_socket(addr).map_err(|source| DnsError::BindUdp { addr, source })?);
        }
        match TcpListener::bind(addr).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if listen.port() == 0 && e.kind() == io::ErrorKind::AddrInUse => {
                last = Some(e);
            }
            Err(source) => return Err(DnsError::BindTcp { addr, source }),
        }
    }
    Err(DnsError::BindTcp {
        addr: listen,
        source: last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse)),
    })
}

fn udp_socket(addr: SocketAddr) -> io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

impl DnsHandle {
    /// The UDP and TCP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The server's metrics, to register in the role's registry.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The catalog revision of the answers being served.
    pub fn revision(&self) -> u64 {
        self.index.load().revision()
    }

    /// Stop: no new queries or connections, then wait up to `deadline` for the sockets'
    /// tasks to end (queries in flight are answered or dropped: they take microseconds).
    pub async fn shutdown(mut self, deadline: Duration) -> Outcome {
        self.stop.cancel();
        self.udp.stop();
        let tasks = &mut self.tasks;
        let udp = &mut self.udp;
        // Atomic, not a Cell: the drain's future stays `Send` (callers may spawn it).
        let left = AtomicUsize::new(tasks.len());
        let wait = async {
            udp.join().await;
            while tasks.join_next().await.is_some() {
                left.store(tasks.len(), Ordering::Relaxed);
            }
        };
        let outcome = drain::within(deadline, wait, || left.load(Ordering::Relaxed)).await;
        info!(addr = %self.local_addr, ?outcome, "dns stopped");
        outcome
    }
}

impl Drop for DnsHandle {
    fn drop(&mut self) {
        self.stop.cancel();
        self.udp.stop();
    }
}
