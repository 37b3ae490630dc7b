//! The gRPC listener: TCP accept, a TLS 1.3 handshake, and the verified peer identity
//! attached to every request ([`Peer`] in the request extensions).
//!
//! A client certificate is optional at the TLS layer, so that a joining agent (which has no
//! SVID yet) can call `Join` with a token; a client that presents one is fully verified in
//! the handshake. Every other call requires a verified SVID: [`crate::authz::Caller::of`]
//! answers `Unauthenticated` when [`Peer::id`] is `None`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use futures::StreamExt;
use meshbridge_core::client::ALPN_H2;
use meshbridge_core::id::SpiffeId;
use meshbridge_core::tls::{AcceptLimits, AllowList, Identity, handshakes, peer_id};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;
use tracing::debug;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once; beyond it, new connections wait to be accepted.
pub const MAX_HANDSHAKES: usize = 256;
/// Open connections at once; beyond it, new ones are closed at accept.
pub const MAX_CONNECTIONS: usize = 4096;
/// Connections without a client certificate (joining agents) open at once.
pub const MAX_ANONYMOUS: usize = 128;
/// A connection without a client certificate is for one `Join`: it is closed this long
/// after its handshake, whatever it does.
pub const ANONYMOUS_LIFETIME: Duration = Duration::from_secs(30);

/// Who is calling: in every request's extensions.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The SPIFFE id of the verified client SVID; `None` when the client sent none.
    pub id: Option<SpiffeId>,
    /// When that SVID's validity starts and ends (unix seconds).
    pub validity: Option<(i64, i64)>,
}

/// A TLS connection with its peer. It fails every read and write once the node is killed
/// (or its drain deadline passed), which makes the HTTP/2 connection task close it.
pub struct TlsIo {
    stream: TlsStream<TcpStream>,
    peer: Peer,
    kill: Pin<Box<WaitForCancellationFutureOwned>>,
    /// For a connection without a client certificate: when it is closed.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Its places under [`MAX_CONNECTIONS`] (and [`MAX_ANONYMOUS`]), given back on close.
    _permits: Vec<OwnedSemaphorePermit>,
}

impl TlsIo {
    fn killed(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if self.kill.as_mut().poll(cx).is_ready() {
            return Some(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "registry node stopped",
            ));
        }
        let expired = self
            .deadline
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready());
        expired.then(|| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "connection without a client certificate past its lifetime",
            )
        })
    }
}

impl Connected for TlsIo {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.killed(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.killed(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.killed(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts connections on `listener` until `stop` is cancelled and yields the ones whose
/// handshake succeeded; `kill` fails every connection accepted. Handshakes run
/// concurrently (the shared accept loop, [`meshbridge_core::tls::handshakes`]), so a slow
/// client cannot hold up the accept loop; failed handshakes are logged with the reason.
pub fn incoming(
    listener: TcpListener,
    identity: &Arc<Identity>,
    allow: AllowList,
    stop: CancellationToken,
    kill: CancellationToken,
) -> impl Stream<Item = io::Result<TlsIo>> + Send + 'static {
    let acceptor = TlsAcceptor::from(Arc::new(
        identity.server_config_optional_client(allow, &[ALPN_H2]),
    ));
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let anonymous = Arc::new(Semaphore::new(MAX_ANONYMOUS));
    // Limits before anything is read: a flood of connections cannot take every descriptor
    // or task (closing the socket is the answer).
    let admit = move |tcp: &TcpStream, addr| {
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            warn_limit(addr, "connections", MAX_CONNECTIONS);
            return None;
        };
        let _ = tcp.set_nodelay(true);
        Some(permit)
    };
    let limits = AcceptLimits {
        handshake_timeout: HANDSHAKE_TIMEOUT,
        max_handshakes: MAX_HANDSHAKES,
    };
    handshakes(listener, acceptor, limits, stop, admit).filter_map(move |h| {
        let addr = h.addr;
        let connection = match h.result {
            Ok(stream) => admitted(stream, addr, h.admitted, &anonymous, &kill),
            Err(e) => {
                debug!(client.addr = %addr, error = %e, "TLS handshake refused");
                None
            }
        };
        std::future::ready(connection.map(Ok))
    })
}

/// A connection whose handshake succeeded, with its peer; `None` when it has no
/// certificate and the connections without one are at their limit.
fn admitted(
    stream: TlsStream<TcpStream>,
    addr: SocketAddr,
    permit: OwnedSemaphorePermit,
    anonymous: &Arc<Semaphore>,
    kill: &CancellationToken,
) -> Option<TlsIo> {
    let certs = stream.get_ref().1.peer_certificates();
    let id = peer_id(certs);
    let validity = certs
        .and_then(|c| c.first())
        .and_then(|leaf| meshbridge_core::tls::cert_info(leaf).ok())
        .map(|i| (i.not_before, i.not_after));
    let mut permits = vec![permit];
    let mut deadline = None;
    if id.is_none() {
        let Ok(anon) = anonymous.clone().try_acquire_owned() else {
            warn_limit(addr, "connections without a certificate", MAX_ANONYMOUS);
            return None;
        };
        permits.push(anon);
        deadline = Some(Box::pin(tokio::time::sleep(ANONYMOUS_LIFETIME)));
    }
    Some(TlsIo {
        stream,
        peer: Peer { addr, id, validity },
        kill: Box::pin(kill.clone().cancelled_owned()),
        deadline,
        _permits: permits,
    })
}

/// A connection closed because a limit was reached (rate-limited in the log by the limit
/// itself: at most one line per refused connection, at debug beyond the first).
fn warn_limit(addr: SocketAddr, what: &str, limit: usize) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        debug!(client.addr = %addr, limit, "{what} at their limit; connection closed");
    } else {
        tracing::warn!(client.addr = %addr, limit, "{what} at their limit; connection closed (further ones are logged at debug)");
    }
}
