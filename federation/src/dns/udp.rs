//! The UDP side of the server: one OS thread per socket (the sockets share the port with
//! `SO_REUSEPORT`, so the kernel spreads queries over them), each receiving, answering and
//! sending in a blocking loop, as authoritative servers built for speed do. No task per
//! query, no wake-ups between threads: queries are taken from the socket up to
//! [`BATCH`] at a time (`recvmmsg`), and each answer is one `sendto`.
//!
//! Each thread keeps a response cache for the index it answers from: the same query bytes
//! (the id aside) against the same index always get the same response bytes (the id
//! aside), so a repeated question is answered by copying. The cache is emptied when the
//! index is swapped, and whenever the thread has been idle for a second. Only forwarding
//! (I/O, on the async runtime) and rate limiting (per client, checked before the cache)
//! leave this path.

use std::collections::HashMap;
use std::io;
use std::io::IoSliceMut;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_proto::op::ResponseCode;
use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg};
use prometheus_client::metrics::counter::Counter;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::answer::{
    Encoded, Served, Transport, encode_reply, serve, serve_rate_limited, upstream_reply,
};
use super::build::FxBuild;
use super::forward::Forwarder;
use super::index::Index;
use super::metrics::{Metrics, rcode_label};
use super::ratelimit::RateLimiter;

/// Datagrams taken from the socket per receive call.
const BATCH: usize = 32;
/// The largest query read; a longer one is cut here (and answered as what is left of it:
/// FORMERR, as a rule). Queries are a few dozen bytes.
const SLOT: usize = 4096;
/// How long a receive waits before the thread looks at its stop flag and drops its cache
/// (stopping also wakes it at once: see [`UdpWorkers::stop`]).
const IDLE: Duration = Duration::from_secs(1);
/// Most cached responses per thread; a full cache is cleared (random names cannot grow it).
const CACHE_ENTRIES: usize = 16_384;
/// Queries longer than this are answered but not cached.
const CACHE_QUERY_MAX: usize = 512;

/// What every UDP thread (and the TCP handler) answers with.
pub(crate) struct Shared {
    pub index: Arc<ArcSwap<Index>>,
    pub limiter: Option<RateLimiter>,
    pub forwarder: Option<Forwarder>,
    pub metrics: Metrics,
}

/// The running UDP threads.
pub(crate) struct UdpWorkers {
    /// A handle on each socket, to wake its thread when stopping.
    wake: Vec<socket2::Socket>,
    stop: Arc<AtomicBool>,
    /// Closed when every thread has ended.
    done: mpsc::Receiver<()>,
}

impl UdpWorkers {
    /// Serve each socket from its own thread. Forwarded queries run on `runtime`.
    pub(crate) fn start(
        sockets: Vec<socket2::Socket>,
        shared: Arc<Shared>,
        runtime: Handle,
    ) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (done_tx, done) = mpsc::channel(1);
        let mut wake = Vec::with_capacity(sockets.len());
        for (i, socket) in sockets.into_iter().enumerate() {
            socket.set_nonblocking(false)?;
            socket.set_read_timeout(Some(IDLE))?;
            wake.push(socket.try_clone()?);
            let worker = Worker {
                socket: Arc::new(UdpSocket::from(socket)),
                shared: shared.clone(),
                stop: stop.clone(),
                runtime: runtime.clone(),
                counters: Counters::new(&shared.metrics),
                cache: Cache::default(),
                _done: done_tx.clone(),
            };
            std::thread::Builder::new()
                .name(format!("dns-udp-{i}"))
                .spawn(move || worker.run())?;
        }
        Ok(Self { wake, stop, done })
    }

    /// Tell every thread to stop, and wake those waiting for a datagram (`shutdown(SHUT_RD)`
    /// wakes a blocked receive on Linux, even on an unconnected UDP socket; the receive
    /// timeout bounds the wait elsewhere).
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for socket in &self.wake {
            // ENOTCONN is expected on an unconnected socket; the wake-up happens anyway.
            let _ = socket.shutdown(std::net::Shutdown::Read);
        }
    }

    /// Stop, and wait until every thread has ended.
    pub(crate) async fn join(&mut self) {
        self.stop();
        while self.done.recv().await.is_some() {}
    }
}

impl Drop for UdpWorkers {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Worker {
    socket: Arc<UdpSocket>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    runtime: Handle,
    counters: Counters,
    cache: Cache,
    /// Dropped when the thread ends.
    _done: mpsc::Sender<()>,
}

impl Worker {
    fn run(mut self) {
        let fd = self.socket.as_raw_fd();
        let mut slots = vec![vec![0u8; SLOT]; BATCH];
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
        let mut received: Vec<(usize, Option<SocketAddr>)> = Vec::with_capacity(BATCH);
        let mut out = Vec::with_capacity(512);
        let mut failures = 0u32;
        while !self.stop.load(Ordering::SeqCst) {
            received.clear();
            let got = {
                let mut iovs: Vec<[IoSliceMut<'_>; 1]> = slots
                    .iter_mut()
                    .map(|s| [IoSliceMut::new(s.as_mut_slice())])
                    .collect();
                // Blocks for the first datagram (up to the receive timeout), then takes what
                // else is queued, up to BATCH.
                recvmmsg(
                    fd,
                    &mut headers,
                    iovs.iter_mut(),
                    MsgFlags::MSG_WAITFORONE,
                    None,
                )
                .map(|results| {
                    received.extend(
                        results.map(|r| (r.bytes, r.address.as_ref().and_then(socket_addr))),
                    );
                })
            };
            match got {
                Ok(()) => failures = 0,
                Err(Errno::EAGAIN) => {
                    // Idle: let go of the old index and its answers.
                    self.cache.clear();
                    continue;
                }
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    if self.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    failures += 1;
                    if failures == 1 {
                        warn!(error = %e, "dns: receiving udp queries failed");
                    }
                    // Never a busy loop on an error that repeats.
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            }
            for (slot, &(n, src)) in slots.iter().zip(&received) {
                // No source address: nothing to answer (and a zero-length read after a
                // shutdown of the socket).
                let (Some(src), Some(query)) = (src, slot.get(..n)) else {
                    continue;
                };
                if self.answer(query, src, &mut out) {
                    self.send(&out, src);
                }
            }
        }
    }

    /// Answer `query` into `out`: true when `out` holds the response to send to `src`.
    fn answer(&mut self, query: &[u8], src: SocketAddr, out: &mut Vec<u8>) -> bool {
        let started = Instant::now();
        // Too short for a header, or a response: silence (as for anything unparseable).
        if query.len() < 12 || query[2] & 0x80 != 0 {
            return false;
        }
        let shared = &*self.shared;
        if let Some(limiter) = &shared.limiter
            && !limiter.allow(src.ip(), started)
        {
            shared.metrics.rate_limited.inc();
            let Some(encoded) = serve_rate_limited(query, src, Transport::Udp) else {
                return false;
            };
            self.counters.count("RATELIMITED");
            *out = encoded.bytes;
            return true;
        }
        let index = shared.index.load();
        let key = &query[2..];
        if let Some(cached) = self.cache.get(&index, key) {
            out.clear();
            out.extend_from_slice(&cached.bytes);
            out[..2].copy_from_slice(&query[..2]);
            let label = cached.label;
            let truncated = cached.truncated;
            self.finish(label, truncated, started);
            return true;
        }
        match serve(&index, query, src, Transport::Udp) {
            None => false,
            Some(Served::Respond(encoded)) => {
                out.clear();
                out.extend_from_slice(&encoded.bytes);
                let label = rcode_label(encoded.rcode);
                self.finish(label, encoded.truncated, started);
                if key.len() <= CACHE_QUERY_MAX {
                    self.cache.insert(key, encoded, label);
                }
                true
            }
            Some(Served::Forward(req)) => {
                drop(index);
                let socket = self.socket.clone();
                let shared = self.shared.clone();
                self.runtime.spawn(async move {
                    let encoded = forward(&shared, &req, Transport::Udp).await;
                    if let Err(e) = socket.send_to(&encoded.bytes, src) {
                        debug!(error = %e, %src, "sending a dns response failed");
                    }
                    shared
                        .metrics
                        .answered(encoded.rcode, Transport::Udp, started.elapsed());
                });
                false
            }
        }
    }

    fn send(&self, bytes: &[u8], src: SocketAddr) {
        if let Err(e) = self.socket.send_to(bytes, src) {
            debug!(error = %e, %src, "sending a dns response failed");
        }
    }

    fn finish(&self, label: &'static str, truncated: bool, started: Instant) {
        if truncated {
            self.shared.metrics.truncated.inc();
        }
        self.counters.count(label);
        self.shared
            .metrics
            .query_seconds
            .observe(started.elapsed().as_secs_f64());
    }
}

fn socket_addr(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    addr.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

/// Ask the upstream; the response for the client over `transport` (SERVFAIL when the
/// upstream failed).
pub(crate) async fn forward(
    shared: &Shared,
    req: &hickory_server::server::Request,
    transport: Transport,
) -> Encoded {
    let query = match (&shared.forwarder, req.queries.queries()) {
        (Some(forwarder), [query]) => forwarder
            .forward(query.original(), req.metadata.recursion_desired)
            .await
            .map_err(|e| (e, query.original().clone())),
        _ => {
            let refused = super::answer::Reply::error(ResponseCode::Refused, false);
            return encode_reply(req, refused, transport);
        }
    };
    match query {
        Ok(answer) => {
            shared.metrics.forwarded("ok");
            encode_reply(req, upstream_reply(&answer), transport)
        }
        Err((e, query)) => {
            shared.metrics.forwarded(e.label());
            debug!(error = %e, %query, "forwarding failed");
            let failed = super::answer::Reply::error(ResponseCode::ServFail, true);
            encode_reply(req, failed, transport)
        }
    }
}

/// The UDP query counters by rcode label, looked up once instead of per query.
struct Counters(Vec<(&'static str, Counter)>);

impl Counters {
    fn new(metrics: &Metrics) -> Self {
        let labels = [
            "NOERROR",
            "NXDOMAIN",
            "REFUSED",
            "SERVFAIL",
            "FORMERR",
            "NOTIMP",
            "BADVERS",
            "OTHER",
            "RATELIMITED",
        ];
        Self(
            labels
                .into_iter()
                .map(|l| (l, metrics.counter(l, Transport::Udp)))
                .collect(),
        )
    }

    fn count(&self, label: &'static str) {
        if let Some((_, counter)) = self.0.iter().find(|(l, _)| *l == label) {
            counter.inc();
        }
    }
}

struct Cached {
    bytes: Box<[u8]>,
    label: &'static str,
    truncated: bool,
}

/// Responses by query bytes (the id left out), valid for one index (by its generation, a
/// number no other index of the process has). The cache never holds the index itself: the
/// last reference to an old index, and the work of freeing it, stays with the task that
/// swapped it out, off the answer path.
#[derive(Default)]
struct Cache {
    generation: u64,
    entries: HashMap<Box<[u8]>, Cached, FxBuild>,
}

impl Cache {
    fn get(&mut self, index: &Index, key: &[u8]) -> Option<&Cached> {
        if self.generation != index.generation() {
            self.entries.clear();
            self.generation = index.generation();
            return None;
        }
        self.entries.get(key)
    }

    fn insert(&mut self, key: &[u8], encoded: Encoded, label: &'static str) {
        if self.entries.len() >= CACHE_ENTRIES {
            self.entries.clear();
        }
        self.entries.insert(
            key.into(),
            Cached {
                bytes: encoded.bytes.into_boxed_slice(),
                label,
                truncated: encoded.truncated,
            },
        );
    }

    fn clear(&mut self) {
        self.generation = 0;
        self.entries.clear();
    }
}
