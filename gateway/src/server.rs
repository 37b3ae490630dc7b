//! Accepting tunnels from peer gateways: QUIC connections on UDP and TLS+HTTP/2 connections
//! on TCP, same port. Every stream goes to [`inbound::serve_stream`]. Only site identities
//! (`spiffe://<td>/site/<site>/...`: gateways and VM agents) may open tunnels; workloads and
//! registry nodes of a trusted domain may not.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use meshbridge_core::id::SpiffeId;
use meshbridge_core::tls::{AcceptLimits, describe, handshakes};
use tokio::net::TcpListener;

use crate::inbound::{self, Peer};
use crate::metrics::PeerLabels;
use crate::quic;
use crate::shared::Shared;
use crate::stream::{RecvHalf, SendHalf};
use crate::tcp;
use crate::transport::Carrier;

/// Accept QUIC connections until the gateway stops accepting.
pub async fn quic_loop(sh: Arc<Shared>, endpoint: quinn::Endpoint) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = sh.accept_stop.cancelled() => break,
        };
        let Some(incoming) = incoming else { break };
        let sh2 = sh.clone();
        sh.tasks.spawn(async move {
            let addr = incoming.remote_address();
            let began = Instant::now();
            let conn = match tokio::time::timeout(sh2.cfg.tunnel.handshake_timeout(), incoming).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return handshake_failed(&sh2, addr, Carrier::Quic, describe(&e)),
                Err(_) => return handshake_failed(&sh2, addr, Carrier::Quic, "timed out".into()),
            };
            let Some(id) = quic::peer_id(&conn) else {
                conn.close(quinn::VarInt::from_u32(1), b"no SPIFFE id");
                return handshake_failed(&sh2, addr, Carrier::Quic, "no SPIFFE id".into());
            };
            if id.site().is_none() {
                conn.close(quinn::VarInt::from_u32(1), b"not a site identity");
                let reason = format!("{id} is not a site identity (spiffe://<td>/site/<site>/...)");
                return handshake_failed(&sh2, addr, Carrier::Quic, reason);
            }
            let Some(_link) = sh2.peer_link(&id.to_string()) else {
                conn.close(quinn::VarInt::from_u32(1), b"too many links from this peer");
                return link_limit(&sh2, addr, Carrier::Quic, &id);
            };
            let peer = Arc::new(Peer::new(id, Carrier::Quic, addr));
            let labels = link_up(&sh2, &peer, began.elapsed());
            loop {
                let next = tokio::select! {
                    s = conn.accept_bi() => s,
                    _ = sh2.stop.cancelled() => break,
                };
                match next {
                    Ok((send, recv)) => {
                        let sh3 = sh2.clone();
                        let peer = peer.clone();
                        sh2.tasks.spawn(inbound::serve_stream(
                            sh3,
                            peer,
                            SendHalf::Quic(send),
                            RecvHalf::Quic(recv),
                        ));
                    }
                    Err(e) => {
                        tracing::info!(peer.site = %peer.site, peer.addr = %addr, reason = %e, "peer link closed");
                        break;
                    }
                }
            }
            sh2.metrics.connections_active.get_or_create(&labels).dec();
        });
    }
    // Refuse new connections from now on; established ones keep their streams.
    endpoint.set_server_config(None);
}

/// TLS handshakes of TCP tunnels in progress at once (the shared accept loop waits past
/// it).
const MAX_TCP_HANDSHAKES: usize = 256;

/// Accept TCP fallback connections until the gateway stops accepting.
pub async fn tcp_loop(sh: Arc<Shared>, listener: TcpListener) {
    let tls = sh
        .identity
        .server_config(sh.cfg.tunnel.allow_list(&sh.identity), &[tcp::ALPN_H2]);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let limits = AcceptLimits {
        handshake_timeout: sh.cfg.tunnel.handshake_timeout(),
        max_handshakes: MAX_TCP_HANDSHAKES,
    };
    let keepalive = sh.cfg.tunnel.keepalive();
    let admit = move |sock: &tokio::net::TcpStream, _| {
        tcp::tune_socket(sock, keepalive);
        Some(())
    };
    let incoming = handshakes(listener, acceptor, limits, sh.accept_stop.clone(), admit);
    let mut incoming = std::pin::pin!(incoming);
    while let Some(h) = incoming.next().await {
        let addr = h.addr;
        let tls = match h.result {
            Ok(t) => t,
            Err(e) => {
                handshake_failed(&sh, addr, Carrier::Tcp, e.to_string());
                continue;
            }
        };
        let sh2 = sh.clone();
        sh.tasks.spawn(async move {
            let Some(id) = meshbridge_core::tls::peer_id(tls.get_ref().1.peer_certificates()) else {
                return handshake_failed(&sh2, addr, Carrier::Tcp, "no SPIFFE id".into());
            };
            if id.site().is_none() {
                let reason = format!("{id} is not a site identity (spiffe://<td>/site/<site>/...)");
                return handshake_failed(&sh2, addr, Carrier::Tcp, reason);
            }
            let Some(_link) = sh2.peer_link(&id.to_string()) else {
                return link_limit(&sh2, addr, Carrier::Tcp, &id);
            };
            let peer = Arc::new(Peer::new(id, Carrier::Tcp, addr));
            let labels = link_up(&sh2, &peer, h.took);
            let t = &sh2.cfg.tunnel;
            let why = tcp::serve(tls, t.keepalive(), t.idle_timeout(), t.max_streams_per_link, sh2.stop.clone(), |send, recv| {
                sh2.tasks.spawn(inbound::serve_stream(
                    sh2.clone(),
                    peer.clone(),
                    SendHalf::H2(send),
                    RecvHalf::H2(Box::new(recv)),
                ));
            })
            .await;
            tracing::info!(peer.site = %peer.site, peer.addr = %addr, reason = %why, "peer link closed");
            sh2.metrics.connections_active.get_or_create(&labels).dec();
        });
    }
}

fn link_up(sh: &Shared, peer: &Peer, took: Duration) -> PeerLabels {
    let labels = PeerLabels {
        peer_site: peer.site.clone(),
        transport: peer.carrier.name(),
    };
    sh.metrics.connections.get_or_create(&labels).inc();
    sh.metrics.connections_active.get_or_create(&labels).inc();
    sh.metrics
        .handshake_seconds
        .get_or_create(&labels)
        .observe(took.as_secs_f64());
    tracing::info!(peer.site = %peer.site, peer.id = %peer.id, peer.addr = %peer.addr, transport = peer.carrier.name(), "peer link accepted");
    labels
}

/// A peer at `tunnel.max_links_per_peer`: its new link is closed.
fn link_limit(sh: &Shared, addr: SocketAddr, carrier: Carrier, id: &SpiffeId) {
    sh.metrics.failure(id.site().unwrap_or("-"), "link_limit");
    tracing::warn!(
        peer.id = %id, peer.addr = %addr, transport = carrier.name(),
        limit = sh.cfg.tunnel.max_links_per_peer,
        "peer link refused: too many links from this peer (tunnel.max_links_per_peer)"
    );
}

fn handshake_failed(sh: &Shared, addr: SocketAddr, carrier: Carrier, reason: String) {
    sh.metrics.failure("-", "handshake");
    tracing::warn!(peer.addr = %addr, transport = carrier.name(), %reason, "tunnel handshake refused");
}
