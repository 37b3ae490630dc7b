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
use meshbridge_core::client::ALPN_H2;
use meshbridge_core::id::SpiffeId;
use meshbridge_core::tls::{AllowList, Identity, describe, peer_id};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;
use tracing::debug;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once; a connection beyond it is closed at once.
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
    /// When that SVID expires (unix seconds).
    pub not_after: Option<i64>,
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
/// concurrently, so a slow client cannot hold up the accept loop; failed handshakes are
/// logged with the reason.
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
    let (tx, rx) = mpsc::channel::<io::Result<TlsIo>>(64);
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let anonymous = Arc::new(Semaphore::new(MAX_ANONYMOUS));
    tokio::spawn(async move {
        let mut handshakes = JoinSet::new();
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                a = listener.accept() => a,
                Some(_) = handshakes.join_next(), if !handshakes.is_empty() => continue,
            };
            let (tcp, addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Limits before anything is read: a flood of connections or slow handshakes
            // cannot take every descriptor or task (closing the socket is the answer).
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                warn_limit(addr, "connections", MAX_CONNECTIONS);
                continue;
            };
            if handshakes.len() >= MAX_HANDSHAKES {
                warn_limit(addr, "TLS handshakes in progress", MAX_HANDSHAKES);
                continue;
            }
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let kill = Box::pin(kill.clone().cancelled_owned());
            let anonymous = anonymous.clone();
            handshakes.spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let certs = stream.get_ref().1.peer_certificates();
                        let id = peer_id(certs);
                        let not_after = certs
                            .and_then(|c| c.first())
                            .and_then(|leaf| meshbridge_core::tls::cert_info(leaf).ok())
                            .map(|i| i.not_after);
                        let mut permits = vec![permit];
                        let mut deadline = None;
                        if id.is_none() {
                            let Ok(anon) = anonymous.try_acquire_owned() else {
                                warn_limit(
                                    addr,
                                    "connections without a certificate",
                                    MAX_ANONYMOUS,
                                );
                                return;
                            };
                            permits.push(anon);
                            deadline = Some(Box::pin(tokio::time::sleep(ANONYMOUS_LIFETIME)));
                        }
                        let _ = tx
                            .send(Ok(TlsIo {
                                stream,
                                peer: Peer {
                                    addr,
                                    id,
                                    not_after,
                                },
                                kill,
                                deadline,
                                _permits: permits,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => {
                        debug!(client.addr = %addr, error = %describe(&e), "TLS handshake refused");
                    }
                    Err(_) => debug!(client.addr = %addr, "TLS handshake timed out"),
                }
            });
        }
        handshakes.abort_all();
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
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
