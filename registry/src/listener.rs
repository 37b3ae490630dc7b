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
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;
use tracing::debug;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is calling: in every request's extensions.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The SPIFFE id of the verified client SVID; `None` when the client sent none.
    pub id: Option<SpiffeId>,
}

/// A TLS connection with its peer. It fails every read and write once the node is killed
/// (or its drain deadline passed), which makes the HTTP/2 connection task close it.
pub struct TlsIo {
    stream: TlsStream<TcpStream>,
    peer: Peer,
    kill: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl TlsIo {
    fn killed(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.kill
            .as_mut()
            .poll(cx)
            .is_ready()
            .then(|| io::Error::new(io::ErrorKind::ConnectionAborted, "registry node stopped"))
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
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let kill = Box::pin(kill.clone().cancelled_owned());
            handshakes.spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let id = peer_id(stream.get_ref().1.peer_certificates());
                        let _ = tx
                            .send(Ok(TlsIo {
                                stream,
                                peer: Peer { addr, id },
                                kill,
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
