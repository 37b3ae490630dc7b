//! The one TLS accept loop: TCP accept, an admission check before anything is read, the
//! TLS handshake with a deadline, handshakes side by side up to a bound. Used by the
//! registry's gRPC listener, the gateway's TCP tunnel listener and the xDS server; each
//! decides what a failed handshake means to it (a log line, a metric).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// Bounds of an accept loop.
#[derive(Clone, Copy, Debug)]
pub struct AcceptLimits {
    /// How long a client may take to complete its handshake.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once; past it, the loop accepts no more until one ends
    /// (new connections wait in the kernel's backlog), so a flood of clients that never
    /// finish a handshake costs a bounded number of tasks, and one of them holds up no one.
    pub max_handshakes: usize,
}

/// Why a handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
    /// The TLS layer's error, described with its verifier's reason
    /// ([`describe`](super::describe)).
    #[error("{}", super::describe(.0))]
    Tls(std::io::Error),
}

/// One accepted connection's handshake, successful or not.
pub struct Handshake<A> {
    pub addr: SocketAddr,
    /// From accept to the end of the handshake.
    pub took: Duration,
    /// What the admission check returned for this connection.
    pub admitted: A,
    pub result: Result<TlsStream<TcpStream>, HandshakeError>,
}

/// Accepts on `listener` until `stop` is cancelled and yields every handshake's outcome.
/// `admit` sees each TCP connection before anything is read from it (to tune the socket,
/// or to refuse it: `None` closes it); what it returns travels with the handshake (a
/// permit, say). Accept errors (out of descriptors and the like) are logged and retried
/// after a pause instead of spinning. The loop stops when the stream is dropped.
pub fn handshakes<A: Send + 'static>(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: AcceptLimits,
    stop: CancellationToken,
    mut admit: impl FnMut(&TcpStream, SocketAddr) -> Option<A> + Send + 'static,
) -> impl Stream<Item = Handshake<A>> + Send + 'static {
    let (tx, rx) = mpsc::channel::<Handshake<A>>(64);
    tokio::spawn(async move {
        let mut running = JoinSet::new();
        let max = limits.max_handshakes.max(1);
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                _ = tx.closed() => break,
                a = listener.accept(), if running.len() < max => a,
                Some(_) = running.join_next(), if !running.is_empty() => continue,
            };
            let (tcp, addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let began = Instant::now();
            let Some(admitted) = admit(&tcp, addr) else {
                continue;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            running.spawn(async move {
                let result = match tokio::time::timeout(
                    limits.handshake_timeout,
                    acceptor.accept(tcp),
                )
                .await
                {
                    Ok(Ok(stream)) => Ok(stream),
                    Ok(Err(e)) => Err(HandshakeError::Tls(e)),
                    Err(_) => Err(HandshakeError::TimedOut(limits.handshake_timeout)),
                };
                let _ = tx
                    .send(Handshake {
                        addr,
                        took: began.elapsed(),
                        admitted,
                        result,
                    })
                    .await;
            });
        }
        running.abort_all();
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|h| (h, rx)) })
}
