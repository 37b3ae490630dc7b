//! The QUIC endpoint (ALPN `meshbridge/1`) and its tuning for throughput.
//!
//! What each knob is for (see DESIGN §12, "QUIC traps"):
//! - UDP socket buffers of several MiB: the kernel default (~208 KiB) overflows at a few
//!   Gbit/s and the resulting loss halves throughput.
//! - larger stream and connection windows, so one stream can fill a fast link.
//! - `max_mtu` raises both the MTU discovery upper bound and the endpoint's maximum UDP
//!   payload (the path MTU stays at 1472 unless both ends raise the latter).
//! - with a large MTU, a GSO batch of 10 packets exceeds the kernel's 65,507-byte limit and
//!   the send fails silently; [`CappedSocket`] limits the batch to ⌊65507 / MTU⌋ packets.
//! - an MTU above 14,720 needs a larger initial congestion window or the link stalls.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, EndpointConfig, IdleTimeout, MtuDiscoveryConfig, UdpPoller, VarInt};

use crate::config::TunnelConfig;

/// ALPN of the QUIC tunnel.
pub const ALPN: &[u8] = b"meshbridge/1";
/// Largest UDP payload the kernel sends in one `sendmsg` (IPv4).
const MAX_SEND: usize = 65_507;

/// A UDP socket whose GSO batches never exceed what the kernel accepts.
#[derive(Debug)]
struct CappedSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    max_segments: usize,
}

impl AsyncUdpSocket for CappedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments().min(self.max_segments)
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// Why the QUIC endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum QuicSetupError {
    #[error("UDP socket for {addr}: {source}")]
    Socket { addr: SocketAddr, source: io::Error },
    #[error("QUIC setting {field}: {reason}")]
    Setting { field: &'static str, reason: String },
    #[error("TLS config not usable for QUIC: {0}")]
    Tls(String),
}

/// Packets per GSO batch for an MTU: at most ⌊65507 / MTU⌋, at least 1.
pub fn gso_segments(mtu: u16) -> usize {
    (MAX_SEND / usize::from(mtu.max(1))).max(1)
}

fn udp_socket(addr: SocketAddr, buffer: usize) -> Result<std::net::UdpSocket, QuicSetupError> {
    let err = |source| QuicSetupError::Socket { addr, source };
    let domain = socket2::Domain::for_address(addr);
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))
        .map_err(err)?;
    // The kernel caps these at net.core.{r,w}mem_max; a smaller buffer is not an error.
    if let Err(e) = sock.set_recv_buffer_size(buffer) {
        tracing::warn!(error = %e, buffer, "cannot set UDP receive buffer");
    }
    if let Err(e) = sock.set_send_buffer_size(buffer) {
        tracing::warn!(error = %e, buffer, "cannot set UDP send buffer");
    }
    let got = sock.recv_buffer_size().unwrap_or(0);
    // Linux caps the size at net.core.rmem_max and reports double what it kept.
    if got < buffer {
        tracing::warn!(
            asked = buffer,
            got,
            "UDP receive buffer capped by the kernel; raise net.core.rmem_max and wmem_max \
             for full QUIC throughput"
        );
    }
    sock.bind(&addr.into()).map_err(err)?;
    Ok(sock.into())
}

/// Transport parameters of tunnel connections; `accept_streams` is how many streams the
/// other end may have open at once (quinn reserves state for each up front, so the
/// dialing side, which never accepts streams, allows none).
pub fn transport_config(
    t: &TunnelConfig,
    accept_streams: u32,
) -> Result<quinn::TransportConfig, QuicSetupError> {
    let setting = |field: &'static str| {
        move |e: &dyn fmt::Display| QuicSetupError::Setting {
            field,
            reason: e.to_string(),
        }
    };
    let mut c = quinn::TransportConfig::default();
    c.keep_alive_interval(Some(t.keepalive()));
    c.max_idle_timeout(Some(
        IdleTimeout::try_from(t.idle_timeout()).map_err(|e| setting("idle_timeout_ms")(&e))?,
    ));
    c.stream_receive_window(
        VarInt::from_u64(t.stream_window_bytes).map_err(|e| setting("stream_window_bytes")(&e))?,
    );
    c.receive_window(
        VarInt::from_u64(t.connection_window_bytes)
            .map_err(|e| setting("connection_window_bytes")(&e))?,
    );
    c.send_window(t.connection_window_bytes);
    c.max_concurrent_bidi_streams(VarInt::from_u32(accept_streams));
    c.max_concurrent_uni_streams(VarInt::from_u32(0));
    c.initial_mtu(t.initial_mtu);
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(t.max_mtu);
    c.mtu_discovery_config(Some(mtu));
    if t.max_mtu > 14_720 {
        let mut cubic = quinn::congestion::CubicConfig::default();
        cubic.initial_window(u64::from(t.max_mtu) * 10);
        c.congestion_controller_factory(Arc::new(cubic));
    }
    Ok(c)
}

/// A QUIC endpoint bound at `addr`, accepting with `server` (none: dial only) and dialing
/// with `client`.
pub fn endpoint(
    addr: SocketAddr,
    t: &TunnelConfig,
    server: Option<rustls::ServerConfig>,
    client: rustls::ClientConfig,
) -> Result<quinn::Endpoint, QuicSetupError> {
    let server_config = match server {
        Some(server) => {
            let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(server)
                .map_err(|e| QuicSetupError::Tls(e.to_string()))?;
            let mut c = quinn::ServerConfig::with_crypto(Arc::new(crypto));
            c.transport_config(Arc::new(transport_config(t, t.max_streams_per_link)?));
            Some(c)
        }
        None => None,
    };
    let client_crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client)
        .map_err(|e| QuicSetupError::Tls(e.to_string()))?;
    let mut client_config = quinn::ClientConfig::new(Arc::new(client_crypto));
    client_config.transport_config(Arc::new(transport_config(t, 0)?));

    let mut endpoint_config = EndpointConfig::default();
    endpoint_config
        .max_udp_payload_size(t.max_mtu)
        .map_err(|e| QuicSetupError::Setting {
            field: "max_mtu",
            reason: e.to_string(),
        })?;
    let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
    let std_socket = udp_socket(addr, t.socket_buffer_bytes)?;
    let inner = runtime
        .wrap_udp_socket(std_socket)
        .map_err(|source| QuicSetupError::Socket { addr, source })?;
    let socket = Arc::new(CappedSocket {
        inner,
        max_segments: gso_segments(t.max_mtu),
    });
    let mut ep =
        quinn::Endpoint::new_with_abstract_socket(endpoint_config, server_config, socket, runtime)
            .map_err(|source| QuicSetupError::Socket { addr, source })?;
    ep.set_default_client_config(client_config);
    Ok(ep)
}

/// Wait until the server confirms the handshake (HANDSHAKE_DONE): in TLS 1.3 the client is
/// done before the server has checked the client certificate, so a refused client would
/// otherwise hold a link that fails on first use. Returns the close reason on refusal.
pub async fn confirmed(conn: &quinn::Connection) -> Result<(), String> {
    loop {
        if conn.stats().frame_rx.handshake_done > 0 {
            return Ok(());
        }
        tokio::select! {
            e = conn.closed() => return Err(format!("peer refused the link: {}", meshbridge_core::tls::describe(&e))),
            // HANDSHAKE_DONE comes one round trip after the handshake; no event tells us.
            _ = tokio::time::sleep(std::time::Duration::from_millis(1)) => {}
        }
    }
}

/// The SPIFFE id of a QUIC peer, from its verified certificate.
pub fn peer_id(conn: &quinn::Connection) -> Option<meshbridge_core::id::SpiffeId> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .ok()?;
    meshbridge_core::tls::peer_id(Some(&certs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gso_batches_stay_under_the_kernel_limit() {
        for mtu in [1200u16, 1452, 8952, 14_720, 65_527] {
            let n = gso_segments(mtu);
            assert!(n >= 1);
            assert!(n == 1 || n * usize::from(mtu) <= MAX_SEND, "mtu {mtu}: {n}");
        }
        assert_eq!(gso_segments(8952), 7);
        assert_eq!(gso_segments(1452), 45);
    }

    #[test]
    fn large_mtu_raises_the_initial_window() {
        let t = TunnelConfig {
            max_mtu: 16_000,
            ..TunnelConfig::default()
        };
        assert!(transport_config(&t, 16).is_ok());
        let t = TunnelConfig {
            idle_timeout_ms: u64::MAX,
            ..TunnelConfig::default()
        };
        assert!(matches!(
            transport_config(&t, 16),
            Err(QuicSetupError::Setting {
                field: "idle_timeout_ms",
                ..
            })
        ));
    }
}
