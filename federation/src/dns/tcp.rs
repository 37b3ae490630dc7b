//! DNS over TCP: an accept loop of our own, answering from the same state as the UDP
//! threads. hickory-server's TCP side took every connection (each may stay open while it
//! keeps asking) and retried a failed `accept` at once, so a client holding thousands of
//! connections ran the process out of file descriptors (the gateway's tunnels and the
//! agent's checks with it) and then spun a core. Here: at most [`MAX_CONNECTIONS`] at once
//! (the next is closed at once and counted), and a pause after a failed `accept`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::answer::{Served, Transport, serve, serve_rate_limited};
use super::udp::{Shared, forward};

/// Most TCP connections served at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Pause after a failed `accept` (out of file descriptors, say) before the next.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Serve `listener` until `stop`; a connection idle for `idle` is closed.
pub(crate) async fn serve_tcp(
    listener: TcpListener,
    shared: Arc<Shared>,
    idle: Duration,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => match permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    connections.spawn(connection(stream, peer, shared.clone(), idle, permit));
                }
                Err(_) => {
                    shared.metrics.tcp_refused.inc();
                    debug!(%peer, limit = MAX_CONNECTIONS, "dns: too many TCP connections; closed");
                }
            },
            Err(e) => {
                warn!(error = %e, "dns: accepting a TCP connection failed; pausing");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                }
            }
        }
    }
    // Queries in flight take microseconds (forwarded ones, the upstream's timeout at most).
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

/// One connection: length-prefixed queries, each answered in turn, until the client
/// closes, stays idle for `idle`, or sends something that is not a query.
async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    idle: Duration,
    _permit: OwnedSemaphorePermit,
) {
    let mut query = Vec::new();
    loop {
        let mut len = [0u8; 2];
        if !matches!(
            tokio::time::timeout(idle, stream.read_exact(&mut len)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        query.resize(usize::from(u16::from_be_bytes(len)), 0);
        if !matches!(
            tokio::time::timeout(idle, stream.read_exact(&mut query)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let Some(response) = answer(&shared, &query, peer).await else {
            return;
        };
        let Ok(size) = u16::try_from(response.len()) else {
            return;
        };
        let mut out = Vec::with_capacity(response.len() + 2);
        out.extend_from_slice(&size.to_be_bytes());
        out.extend_from_slice(&response);
        if !matches!(
            tokio::time::timeout(idle, stream.write_all(&out)).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
}

/// The response to `query` from `peer`, counted; `None` where the server stays silent (not
/// a query), which ends the connection.
async fn answer(shared: &Shared, query: &[u8], peer: SocketAddr) -> Option<Vec<u8>> {
    let started = Instant::now();
    if query.len() < 12 {
        return None;
    }
    if let Some(limiter) = &shared.limiter
        && !limiter.allow(peer.ip(), started)
    {
        shared.metrics.rate_limited.inc();
        let encoded = serve_rate_limited(query, peer, Transport::Tcp)?;
        shared.metrics.count("RATELIMITED", Transport::Tcp);
        return Some(encoded.bytes);
    }
    let served = {
        let index = shared.index.load();
        serve(&index, query, peer, Transport::Tcp)?
    };
    let encoded = match served {
        Served::Respond(encoded) => encoded,
        Served::Forward(req) => forward(shared, &req, Transport::Tcp).await,
    };
    if encoded.truncated {
        shared.metrics.truncated.inc();
    }
    shared
        .metrics
        .answered(encoded.rcode, Transport::Tcp, started.elapsed());
    Some(encoded.bytes)
}
