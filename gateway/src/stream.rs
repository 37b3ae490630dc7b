//! One tunnel stream, whatever carries it: the two halves as `AsyncRead`/`AsyncWrite`, and
//! the copy loop that joins a stream to a TCP connection with half-close and byte counts.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::tcp::{H2Recv, H2Send};

/// Copy buffer: starts small (idle connections stay cheap) and doubles while reads fill it,
/// up to the size that keeps per-write overhead low on fast links.
const COPY_BUF_MIN: usize = 16 * 1024;
const COPY_BUF_MAX: usize = 256 * 1024;
/// Into the tunnel, chunks are cut from blocks of this many (once a stream is busy), so
/// the tunnel takes them without a copy and a new block is rarely allocated.
const CHUNKS_PER_BLOCK: usize = 4;

/// The sending half of a tunnel stream.
pub enum SendHalf {
    Quic(quinn::SendStream),
    H2(H2Send),
}

/// The receiving half of a tunnel stream.
pub enum RecvHalf {
    Quic(quinn::RecvStream),
    H2(Box<H2Recv>),
}

/// How long a finished stream waits for the peer to acknowledge its last bytes.
const DELIVERY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl SendHalf {
    /// After the end of the stream was sent: wait until the peer has acknowledged every byte
    /// (QUIC), so that closing the connection right after (a drain) loses nothing. HTTP/2
    /// streams are flushed by the connection's graceful shutdown instead.
    pub async fn delivered(&self) {
        if let Self::Quic(s) = self {
            let _ = tokio::time::timeout(DELIVERY_WAIT, s.stopped()).await;
        }
    }

    /// Send all of `data`, handing the buffer itself to the transport (no copy).
    pub async fn write_chunk(&mut self, data: Bytes) -> io::Result<()> {
        match self {
            Self::Quic(s) => s.write_chunk(data).await.map_err(io::Error::from),
            Self::H2(s) => s.write_chunk(data).await,
        }
    }

    /// Abort the stream: the peer sees a reset, not a clean end.
    pub fn reset(&mut self) {
        match self {
            Self::Quic(s) => {
                let _ = s.reset(quinn::VarInt::from_u32(1));
            }
            Self::H2(s) => s.reset(),
        }
    }
}

impl AsyncWrite for SendHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Quic(s) => Pin::new(s).poll_write(cx, buf).map_err(io::Error::from),
            Self::H2(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Quic(s) => Pin::new(s).poll_flush(cx),
            Self::H2(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Quic(s) => Pin::new(s).poll_shutdown(cx),
            Self::H2(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for RecvHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Quic(s) => Pin::new(s).poll_read(cx, buf),
            Self::H2(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

/// Byte counts of one proxied connection, readable while it runs.
#[derive(Debug, Default)]
pub struct Counts {
    /// From the client side (local client or local endpoint) into the tunnel.
    pub to_tunnel: AtomicU64,
    /// From the tunnel to the client side.
    pub from_tunnel: AtomicU64,
}

impl Counts {
    pub fn get(&self) -> (u64, u64) {
        (
            self.to_tunnel.load(Ordering::Relaxed),
            self.from_tunnel.load(Ordering::Relaxed),
        )
    }
}

/// Copy `r` to `w` until `r` ends, then end `w` (half-close): the other direction goes on.
async fn pump<R, W>(r: &mut R, w: &mut W, count: &AtomicU64) -> io::Result<()>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    // Read into spare capacity: the buffer is never zeroed (a memset of every new
    // connection's buffers showed up under connection churn).
    let mut buf: Vec<u8> = Vec::with_capacity(COPY_BUF_MIN);
    loop {
        buf.clear();
        let n = r.read_buf(&mut buf).await?;
        if n == 0 {
            w.shutdown().await?;
            return Ok(());
        }
        w.write_all(&buf).await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        if n == buf.capacity() && n < COPY_BUF_MAX {
            // Twice the size: `n` more than the `n` bytes held.
            buf.reserve_exact(n);
        }
    }
}

/// Copy `r` into the tunnel until `r` ends, then end the stream (half-close). Reads land in
/// a block of memory that is cut into chunks handed to the transport as they are: QUIC and
/// HTTP/2 would otherwise copy every write into a buffer of their own, allocated per write.
/// A block is reused once the transport has let go of every chunk cut from it.
async fn pump_to_tunnel<R>(r: &mut R, w: &mut SendHalf, count: &AtomicU64) -> io::Result<()>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut want = COPY_BUF_MIN;
    let mut buf = BytesMut::new();
    loop {
        if buf.capacity() < want {
            // An idle connection keeps one small block; a busy one, blocks of several chunks.
            let block = if want == COPY_BUF_MIN {
                want
            } else {
                want * CHUNKS_PER_BLOCK
            };
            buf.reserve(block);
        }
        let n = r.read_buf(&mut (&mut buf).limit(want)).await?;
        if n == 0 {
            w.shutdown().await?;
            return Ok(());
        }
        w.write_chunk(buf.split().freeze()).await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        if n == want && want < COPY_BUF_MAX {
            want *= 2;
        }
    }
}

/// Resolves with an error once no byte moved either way for `idle` (checked every quarter
/// of it, so a stream is closed between `idle` and 1.25 × `idle` after its last byte).
async fn idle_watch(counts: &Counts, idle: Duration) -> io::Error {
    let step = (idle / 4).max(Duration::from_millis(10));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + step, step);
    let mut last = counts.get();
    let mut quiet_since = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let now = counts.get();
        if now != last {
            last = now;
            quiet_since = tokio::time::Instant::now();
        } else if quiet_since.elapsed() >= idle {
            return io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no bytes either way for {idle:?} (tunnel.stream_idle_timeout_ms)"),
            );
        }
    }
}

/// Join a local TCP side to a tunnel stream, both ways, until both directions have ended or
/// nothing moved for `idle`. On an error in either direction (or idleness) the tunnel stream
/// is reset and the error returned.
pub async fn splice<CR, CW>(
    client_r: &mut CR,
    client_w: &mut CW,
    tunnel_r: &mut RecvHalf,
    tunnel_w: &mut SendHalf,
    counts: &Counts,
    idle: Duration,
) -> io::Result<()>
where
    CR: AsyncRead + Unpin + ?Sized,
    CW: AsyncWrite + Unpin + ?Sized,
{
    let up = pump_to_tunnel(client_r, tunnel_w, &counts.to_tunnel);
    let down = pump(tunnel_r, client_w, &counts.from_tunnel);
    let result = tokio::select! {
        // The data first, without select's per-poll random draw: this runs on every wake.
        biased;
        r = futures::future::try_join(up, down) => r.map(|_| ()),
        e = idle_watch(counts, idle) => Err(e),
    };
    match result {
        Ok(()) => tunnel_w.delivered().await,
        Err(_) => tunnel_w.reset(),
    }
    result
}

/// Join two local TCP sides (the origin's own site: no tunnel).
pub async fn splice_local<AR, AW, BR, BW>(
    a_r: &mut AR,
    a_w: &mut AW,
    b_r: &mut BR,
    b_w: &mut BW,
    counts: &Counts,
) -> io::Result<()>
where
    AR: AsyncRead + Unpin + ?Sized,
    AW: AsyncWrite + Unpin + ?Sized,
    BR: AsyncRead + Unpin + ?Sized,
    BW: AsyncWrite + Unpin + ?Sized,
{
    let up = pump(a_r, b_w, &counts.to_tunnel);
    let down = pump(b_r, a_w, &counts.from_tunnel);
    futures::future::try_join(up, down).await.map(|_| ())
}
