//! Links to peer gateways, whichever transport carries them: open a tunnel stream, send the
//! preamble and read the reply. [`Dialer`] establishes links (QUIC or TCP+TLS+HTTP/2).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use meshbridge_core::id::SpiffeId;
use meshbridge_core::tls::{Identity, describe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::TunnelConfig;
use crate::preamble::{MAX_PREAMBLE_LEN, Preamble, PreambleError, Reply};
use crate::quic::{self, QuicSetupError};
use crate::stream::{RecvHalf, SendHalf};
use crate::tcp::{self, H2Link};

/// A concrete transport (what `auto` resolves to for one attempt).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Carrier {
    Quic,
    Tcp,
}

impl Carrier {
    pub fn name(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::Tcp => "tcp",
        }
    }
}

/// An established link to one peer gateway. Cheap to clone.
#[derive(Clone)]
pub enum Link {
    Quic(quinn::Connection),
    H2(H2Link),
}

impl Link {
    pub fn carrier(&self) -> Carrier {
        match self {
            Self::Quic(_) => Carrier::Quic,
            Self::H2(_) => Carrier::Tcp,
        }
    }

    /// Open one bidirectional tunnel stream.
    pub async fn open(&self) -> io::Result<(SendHalf, RecvHalf)> {
        match self {
            Self::Quic(c) => {
                let (s, r) = c.open_bi().await.map_err(io::Error::other)?;
                Ok((SendHalf::Quic(s), RecvHalf::Quic(r)))
            }
            Self::H2(l) => {
                let (s, r) = l.open().await?;
                Ok((SendHalf::H2(s), RecvHalf::H2(Box::new(r))))
            }
        }
    }

    pub fn is_closed(&self) -> bool {
        match self {
            Self::Quic(c) => c.close_reason().is_some(),
            Self::H2(l) => l.is_closed(),
        }
    }

    /// Resolves when the link is gone.
    pub async fn closed(&self) {
        match self {
            Self::Quic(c) => {
                c.closed().await;
            }
            Self::H2(l) => l.closed().await,
        }
    }

    /// Smoothed round-trip time (QUIC only).
    pub fn rtt(&self) -> Option<Duration> {
        match self {
            Self::Quic(c) => Some(c.rtt()),
            Self::H2(_) => None,
        }
    }

    pub fn close(&self, reason: &str) {
        match self {
            Self::Quic(c) => c.close(quinn::VarInt::from_u32(0), reason.as_bytes()),
            Self::H2(l) => l.close(),
        }
    }
}

/// Why a link to a peer could not be established.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("peer {addr} over {carrier}: no handshake answer within {after:?}")]
    Timeout {
        addr: SocketAddr,
        carrier: &'static str,
        after: Duration,
    },
    #[error("peer {addr} over {carrier}: {reason}")]
    Handshake {
        addr: SocketAddr,
        carrier: &'static str,
        reason: String,
    },
    #[error("peer {addr} presented no SPIFFE id")]
    NoPeerId { addr: SocketAddr },
}

/// Why a tunnel request did not get a reply.

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("cannot open a stream: {0}")]
    Open(io::Error),
    #[error(
        "no stream free on the link within {0:?}: the peer's limit of concurrent streams \
         (its tunnel.max_streams_per_link) is reached"
    )]
    StreamsExhausted(Duration),
    #[error("cannot encode the preamble: {0}")]
    Encode(PreambleError),
    #[error("stream failed: {0}")]
    Io(io::Error),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("stream ended before the reply")]
    Truncated,
    #[error("bad reply: {0}")]
    BadReply(PreambleError),
}

/// A tunnel stream after its reply.
pub struct Opened {
    pub reply: Reply,
    pub send: SendHalf,
    pub recv: RecvHalf,
    /// Payload bytes that arrived with the reply.
    pub leftover: Bytes,
}

/// Send `preamble` (plus `early` payload bytes, if any) on a new stream and wait for the reply.
pub async fn request(
    link: &Link,
    preamble: &Preamble,
    early: &[u8],
    timeout: Duration,
) -> Result<Opened, RequestError> {
    let mut head = BytesMut::with_capacity(256 + early.len());
    preamble.encode(&mut head).map_err(RequestError::Encode)?;
    head.extend_from_slice(early);
    // A link at its peer's stream limit makes `open` wait for a free stream: bounded by
    // the same timeout, so a full link is an error the dialer can route around.
    let (mut send, mut recv) = match tokio::time::timeout(timeout, link.open()).await {
        Ok(opened) => opened.map_err(RequestError::Open)?,
        Err(_) => return Err(RequestError::StreamsExhausted(timeout)),
    };
    let exchange = async {
        send.write_all(&head).await.map_err(RequestError::Io)?;
        read_reply(&mut recv).await
    };
    let result = match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(RequestError::Timeout(timeout)),
    };
    match result {
        Ok((reply, leftover)) => Ok(Opened {
            reply,
            send,
            recv,
            leftover,
        }),
        Err(e) => {
            send.reset();
            Err(e)
        }
    }
}

async fn read_reply(recv: &mut RecvHalf) -> Result<(Reply, Bytes), RequestError> {
    let mut buf = BytesMut::with_capacity(256);
    loop {
        match Reply::decode(&buf).map_err(RequestError::BadReply)? {
            Some((reply, used)) => {
                let rest = buf.split_off(used).freeze();
                return Ok((reply, rest));
            }
            None if buf.len() >= MAX_PREAMBLE_LEN => {
                return Err(RequestError::BadReply(PreambleError::TooLong {
                    len: buf.len(),
                    max: MAX_PREAMBLE_LEN,
                }));
            }
            None => {}
        }
        if recv.read_buf(&mut buf).await.map_err(RequestError::Io)? == 0 {
            return Err(RequestError::Truncated);
        }
    }
}

/// Establishes links to peer gateways.
pub struct Dialer {
    endpoint: quinn::Endpoint,
    tls: Arc<rustls::ClientConfig>,
    /// The local trust domain: a dialed site's gateway must be of it.
    trust_domain: Arc<str>,
    cfg: TunnelConfig,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Dialer {
    /// A dialer sharing `endpoint` (whose default client config presents `identity`).
    pub fn new(
        endpoint: quinn::Endpoint,
        identity: &Arc<Identity>,
        cfg: &TunnelConfig,
        tasks: TaskTracker,
        stop: CancellationToken,
    ) -> Self {
        let tls = identity.client_config(cfg.allow_list(identity), &[tcp::ALPN_H2]);
        Self {
            endpoint,
            tls: Arc::new(tls),
            trust_domain: identity.id().trust_domain().into(),
            cfg: cfg.clone(),
            tasks,
            stop,
        }
    }

    /// Whether `id` is what dialing `site` must reach: exactly
    /// `spiffe://<local td>/site/<site>/gateway` or `.../agent` (a VM site's agent). A
    /// partner's `site/<site>` of another trust domain is not our `site`.
    pub fn is_expected_peer(&self, site: &str, id: &SpiffeId) -> bool {
        id.trust_domain() == &*self.trust_domain
            && [
                format!("/site/{site}/gateway"),
                format!("/site/{site}/agent"),
            ]
            .iter()
            .any(|p| p == id.path())
    }

    /// A dial-only dialer with its own QUIC endpoint (tools and tests).
    pub fn standalone(
        identity: &Arc<Identity>,
        cfg: &TunnelConfig,
        bind: SocketAddr,
    ) -> Result<Self, QuicSetupError> {
        let client = identity.client_config(cfg.allow_list(identity), &[quic::ALPN]);
        let endpoint = quic::endpoint(bind, cfg, None, client)?;
        Ok(Self::new(
            endpoint,
            identity,
            cfg,
            TaskTracker::new(),
            CancellationToken::new(),
        ))
    }

    /// Connect to the gateway at `addr`; returns the link, the peer's id and the handshake time.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        carrier: Carrier,
    ) -> Result<(Link, SpiffeId, Duration), LinkError> {
        let started = Instant::now();
        let after = self.cfg.handshake_timeout();
        let name = carrier.name();
        let fail = |reason: String| LinkError::Handshake {
            addr,
            carrier: name,
            reason,
        };
        let attempt = async {
            match carrier {
                Carrier::Quic => {
                    let connecting = self
                        .endpoint
                        .connect(addr, "gateway.meshbridge.invalid")
                        .map_err(|e| fail(e.to_string()))?;
                    let conn = connecting.await.map_err(|e| fail(describe(&e)))?;
                    quic::confirmed(&conn).await.map_err(fail)?;
                    let id = quic::peer_id(&conn).ok_or(LinkError::NoPeerId { addr })?;
                    Ok((Link::Quic(conn), id))
                }
                Carrier::Tcp => self.connect_tcp(addr).await,
            }
        };
        match tokio::time::timeout(after, attempt).await {
            Ok(Ok((link, id))) => Ok((link, id, started.elapsed())),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(LinkError::Timeout {
                addr,
                carrier: name,
                after,
            }),
        }
    }

    async fn connect_tcp(&self, addr: SocketAddr) -> Result<(Link, SpiffeId), LinkError> {
        let fail = |reason: String| LinkError::Handshake {
            addr,
            carrier: "tcp",
            reason,
        };
        let sock = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| fail(e.to_string()))?;
        tcp::tune_socket(&sock, self.cfg.keepalive());
        let server_name = rustls_pki_types::ServerName::try_from("gateway.meshbridge.invalid")
            .map_err(|e| fail(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(server_name, sock)
            .await
            .map_err(|e| fail(describe(&e)))?;
        let id = meshbridge_core::tls::peer_id(tls.get_ref().1.peer_certificates())
            .ok_or(LinkError::NoPeerId { addr })?;
        let (link, driver, confirmed) =
            tcp::client(tls, self.cfg.keepalive(), self.cfg.idle_timeout())
                .await
                .map_err(|e| fail(format!("HTTP/2 handshake: {e}")))?;
        let stop = self.stop.clone();
        let closer = link.clone();
        let (ended_tx, ended) = tokio::sync::oneshot::channel();
        self.tasks.spawn(async move {
            tokio::select! {
                why = driver => {
                    tracing::debug!(peer = %addr, %why, "tunnel link (tcp) ended");
                    let _ = ended_tx.send(why);
                }
                _ = stop.cancelled() => closer.close(),
            }
        });
        let refused = match confirmed.await {
            Ok(Ok(())) => None,
            Ok(Err(reason)) => Some(reason),
            Err(_) => Some(ended.await.unwrap_or_else(|_| "link closed".into())),
        };
        if let Some(reason) = refused {
            link.close();
            return Err(fail(format!("peer refused the link: {reason}")));
        }
        Ok((Link::H2(link), id))
    }

    pub fn tunnel_config(&self) -> &TunnelConfig {
        &self.cfg
    }

    /// Close the dialer's own endpoint (standalone dialers).
    pub fn close(&self) {
        self.stop.cancel();
        self.endpoint.close(quinn::VarInt::from_u32(0), b"closing");
    }
}
