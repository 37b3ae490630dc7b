//! The TCP fallback transport: HTTP/2 CONNECT over TLS 1.3 (as Istio's HBONE), one HTTP/2
//! connection per peer gateway and one CONNECT stream per proxied connection. The stream
//! then carries the same preamble and reply as a QUIC stream, so both transports behave alike.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h2::Reason;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

/// ALPN of the TCP fallback.
pub const ALPN_H2: &[u8] = b"h2";
/// Authority of every CONNECT request: the real target is in the stream's preamble.
const TUNNEL_AUTHORITY: &str = "tunnel.meshbridge.invalid:15008";
const STREAM_WINDOW: u32 = 8 << 20;
const CONNECTION_WINDOW: u32 = 32 << 20;
const MAX_FRAME: u32 = 256 << 10;
const SEND_BUFFER: usize = 1 << 20;

/// The sending half of an HTTP/2 CONNECT stream (and, on the client side, its share of
/// the stream's place under the peer's concurrency limit).
pub struct H2Send(
    h2::SendStream<Bytes>,
    #[expect(dead_code, reason = "held only to give the slot back on drop")] Option<Arc<Slot>>,
);

enum RecvState {
    /// Client side: the response headers have not arrived yet.
    Pending(h2::client::ResponseFuture),
    Open(h2::RecvStream),
}

/// The receiving half of an HTTP/2 CONNECT stream.
pub struct H2Recv {
    state: RecvState,
    buf: Bytes,
    _slot: Option<Arc<Slot>>,
}

/// Client-side streams open on one link, against the peer's `SETTINGS_MAX_CONCURRENT_STREAMS`.
/// h2 queues a request past that limit instead of failing it, and a queued CONNECT would
/// look like a peer that does not answer; counting lets `open` wait for a free stream
/// (bounded by the caller) exactly as a QUIC link does.
#[derive(Default)]
struct Streams {
    open: std::sync::atomic::AtomicUsize,
    freed: tokio::sync::Notify,
}

/// One stream's place in [`Streams`], given back when both halves are dropped.
pub struct Slot(Arc<Streams>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.0.freed.notify_waiters();
    }
}

/// The largest header block a peer's request may carry on the HTTP/2 fallback.
const MAX_HEADER_LIST: u32 = 16 * 1024;

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

impl H2Send {
    pub fn reset(&mut self) {
        self.0.send_reset(Reason::CANCEL);
    }

    /// Send all of `data` as flow control allows; h2 takes the buffer itself (no copy).
    pub async fn write_chunk(&mut self, mut data: Bytes) -> io::Result<()> {
        while !data.is_empty() {
            self.0.reserve_capacity(data.len());
            let cap = std::future::poll_fn(|cx| self.poll_send_capacity(cx)).await?;
            let chunk = data.split_to(cap.min(data.len()));
            if self.0.send_data(chunk, false).is_err() {
                return Err(std::future::poll_fn(|cx| self.reset_error(cx)).await);
            }
        }
        Ok(())
    }

    /// Ready with the capacity h2 assigned the stream (more than zero bytes).
    fn poll_send_capacity(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            let cap = self.0.capacity();
            if cap > 0 {
                return Poll::Ready(Ok(cap));
            }
            // Ready once per capacity increase; Pending (waker set) until the next one.
            match ready!(self.0.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(_)) => return self.reset_error(cx).map(Err),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn reset_error(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        Poll::Ready(match ready!(self.0.poll_reset(cx)) {
            Ok(Reason::NO_ERROR | Reason::CANCEL | Reason::STREAM_CLOSED) => {
                io::ErrorKind::BrokenPipe.into()
            }
            Ok(reason) => io::Error::other(format!("stream reset by peer: {reason}")),
            Err(e) => h2_io(e),
        })
    }
}

impl AsyncWrite for H2Send {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        this.0.reserve_capacity(buf.len());
        let cap = ready!(this.poll_send_capacity(cx))?;
        let n = cap.min(buf.len());
        if this
            .0
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .is_ok()
        {
            return Poll::Ready(Ok(n));
        }
        this.reset_error(cx).map(Err)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.0.send_data(Bytes::new(), true).is_ok() {
            return Poll::Ready(Ok(()));
        }
        this.reset_error(cx).map(Err)
    }
}

impl H2Recv {
    fn open(stream: h2::RecvStream) -> Self {
        Self {
            state: RecvState::Open(stream),
            buf: Bytes::new(),
            _slot: None,
        }
    }
}

impl AsyncRead for H2Recv {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.buf.is_empty() {
            let stream = match &mut this.state {
                RecvState::Pending(fut) => {
                    let resp = ready!(Pin::new(fut).poll(cx)).map_err(h2_io)?;
                    if resp.status() != http::StatusCode::OK {
                        return Poll::Ready(Err(io::Error::other(format!(
                            "peer answered CONNECT with {}",
                            resp.status()
                        ))));
                    }
                    this.state = RecvState::Open(resp.into_body());
                    continue;
                }
                RecvState::Open(s) => s,
            };
            match ready!(stream.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => {
                    let _ = stream.flow_control().release_capacity(data.len());
                    this.buf = data;
                }
                Some(Err(e)) => {
                    return Poll::Ready(match e.reason() {
                        Some(Reason::NO_ERROR) => Ok(()),
                        Some(reason) if e.is_reset() => Err(io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            format!("stream reset: {reason}"),
                        )),
                        _ => Err(h2_io(e)),
                    });
                }
            }
        }
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

use std::future::Future;

/// The client end of an HTTP/2 tunnel connection. Cheap to clone.
#[derive(Clone)]
pub struct H2Link {
    send: h2::client::SendRequest<Bytes>,
    closed: CancellationToken,
    streams: Arc<Streams>,
}

impl H2Link {
    /// Open a CONNECT stream. The response is awaited by the first read of the receiving
    /// half, so a preamble can be written at once (one round trip for both).
    pub async fn open(&self) -> io::Result<(H2Send, H2Recv)> {
        if self.closed.is_cancelled() {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "tunnel connection closed",
            ));
        }
        let slot = self.take_slot().await;
        let mut send = self.send.clone().ready().await.map_err(h2_io)?;
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(TUNNEL_AUTHORITY)
            .body(())
            .map_err(io::Error::other)?;
        let (resp, stream) = send.send_request(req, false).map_err(h2_io)?;
        Ok((
            H2Send(stream, Some(slot.clone())),
            H2Recv {
                state: RecvState::Pending(resp),
                buf: Bytes::new(),
                _slot: Some(slot),
            },
        ))
    }

    /// Waits until fewer streams are open than the peer allows, and takes a place.
    async fn take_slot(&self) -> Arc<Slot> {
        use std::sync::atomic::Ordering;
        let streams = &self.streams;
        loop {
            let freed = streams.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let limit = self.send.current_max_send_streams();
            let open = streams.open.load(Ordering::Acquire);
            if open < limit
                && streams
                    .open
                    .compare_exchange(open, open + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return Arc::new(Slot(streams.clone()));
            }
            if open >= limit {
                freed.await;
            }
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Resolves when the connection is gone.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }

    /// Close the connection (its driver stops; streams fail).
    pub fn close(&self) {
        self.closed.cancel();
    }
}

/// Ping every `interval`; returns when a pong does not come back within `timeout`. With
/// `first`, pings at once and reports whether the peer answered (it did not refuse us).
async fn ping_until_dead(
    mut ping: h2::PingPong,
    interval: Duration,
    timeout: Duration,
    mut first: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
) -> String {
    loop {
        if first.is_none() {
            tokio::time::sleep(interval).await;
        }
        let r = match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("ping failed: {e}")),
            Err(_) => Err(format!("no ping answer within {timeout:?}")),
        };
        if let Some(tx) = first.take() {
            let _ = tx.send(r.clone());
        }
        if let Err(why) = r {
            return why;
        }
    }
}

/// Resolves when the peer has answered a first ping, i.e. accepted our certificate.
pub type Confirmed = tokio::sync::oneshot::Receiver<Result<(), String>>;

/// HTTP/2 client handshake over an established TLS stream. The returned future drives the
/// connection (and its keepalive pings) and must be spawned; it ends when the link dies.
/// [`Confirmed`] resolves once the peer answered a first ping: in TLS 1.3 the client's
/// handshake completes before the server has checked the client certificate.
pub async fn client<IO>(
    io: IO,
    keepalive: Duration,
    idle_timeout: Duration,
) -> io::Result<(
    H2Link,
    impl Future<Output = String> + Send + 'static,
    Confirmed,
)>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, mut conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(h2_io)?;
    let ping = conn.ping_pong();
    let closed = CancellationToken::new();
    let link = H2Link {
        send,
        closed: closed.clone(),
        streams: Arc::default(),
    };
    let (confirm_tx, confirmed) = tokio::sync::oneshot::channel();
    let driver = async move {
        let pinger = async {
            match ping {
                Some(p) => ping_until_dead(p, keepalive, idle_timeout, Some(confirm_tx)).await,
                None => std::future::pending().await,
            }
        };
        let why = tokio::select! {
            r = conn => match r {
                Ok(()) => "connection closed".to_string(),
                Err(e) => format!("connection failed: {e}"),
            },
            why = pinger => why,
            _ = closed.cancelled() => "closed locally".to_string(),
        };
        closed.cancel();
        why
    };
    Ok((link, driver, confirmed))
}

/// HTTP/2 server side over an established TLS stream: calls `on_stream` for each CONNECT
/// stream (already answered 200) until the connection ends, `stop` fires, or pings fail.
pub async fn serve<IO, F>(
    io: IO,
    keepalive: Duration,
    idle_timeout: Duration,
    max_streams: u32,
    stop: CancellationToken,
    mut on_stream: F,
) -> String
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut(H2Send, H2Recv),
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        .max_concurrent_streams(max_streams)
        // Tunnel requests carry a few short headers; a peer cannot make us buffer more.
        .max_header_list_size(MAX_HEADER_LIST)
        .handshake::<_, Bytes>(io);
    let mut conn = match tokio::time::timeout(idle_timeout, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return format!("HTTP/2 handshake failed: {e}"),
        Err(_) => return "HTTP/2 handshake timed out".into(),
    };
    let ping = conn.ping_pong();
    let pinger = async {
        match ping {
            Some(p) => ping_until_dead(p, keepalive, idle_timeout, None).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(pinger);
    loop {
        let next = tokio::select! {
            n = conn.accept() => n,
            why = &mut pinger => return why,
            _ = stop.cancelled() => {
                // GOAWAY, then keep driving the connection so buffered data is flushed.
                conn.graceful_shutdown();
                let flush = async { while let Some(Ok(_)) = conn.accept().await {} };
                let _ = tokio::time::timeout(Duration::from_secs(2), flush).await;
                return "gateway closing".into();
            }
        };
        let (req, mut respond) = match next {
            None => return "connection closed".into(),
            Some(Err(e)) => return format!("connection failed: {e}"),
            Some(Ok(x)) => x,
        };
        if req.method() != http::Method::CONNECT {
            let resp = http::Response::builder()
                .status(http::StatusCode::METHOD_NOT_ALLOWED)
                .body(());
            if let Ok(resp) = resp {
                let _ = respond.send_response(resp, true);
            }
            continue;
        }
        let Ok(resp) = http::Response::builder()
            .status(http::StatusCode::OK)
            .body(())
        else {
            continue;
        };
        match respond.send_response(resp, false) {
            Ok(send) => on_stream(H2Send(send, None), H2Recv::open(req.into_body())),
            Err(e) => tracing::debug!(error = %e, "could not answer a CONNECT stream"),
        }
    }
}

/// TCP keepalive and no-delay on a tunnel socket.
pub fn tune_socket(s: &tokio::net::TcpStream, keepalive: Duration) {
    let _ = s.set_nodelay(true);
    let sock = socket2::SockRef::from(s);
    let ka = socket2::TcpKeepalive::new()
        .with_time(keepalive)
        .with_interval(keepalive);
    let _ = sock.set_tcp_keepalive(&ka);
}

/// `Arc` wrapper so callers need not name tokio-rustls types.
pub type ClientTls = Arc<rustls::ClientConfig>;
