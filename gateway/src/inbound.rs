//! Inbound: tunnel streams arriving from peer gateways (access log `direction =
//! "incoming"`), the receiving side: read the preamble (size-capped, under a timeout),
//! authorize, pick a ready local endpoint round-robin, connect with a timeout, reply, then
//! copy both ways with half-close, counting bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use meshbridge_core::id::SpiffeId;
use meshbridge_core::model::{Catalog, ServiceKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::metrics::{Direction, SiteLabel, StreamLabels};
use crate::policy::{self, Decision};
use crate::preamble::{MAX_PREAMBLE_LEN, Preamble, Reply, ReplyStatus, Target, TraceHex};
use crate::shared::Shared;
use crate::stream::{Counts, RecvHalf, SendHalf, splice};
use crate::transport::Carrier;

/// Endpoints tried per stream before answering connect-failed.
const MAX_ENDPOINT_TRIES: usize = 3;

/// The authenticated peer gateway of a tunnel connection.
#[derive(Clone, Debug)]
pub struct Peer {
    pub id: SpiffeId,
    /// The site named in the peer's id (or its whole id when it names none).
    pub site: String,
    pub carrier: Carrier,
    pub addr: SocketAddr,
}

impl Peer {
    pub fn new(id: SpiffeId, carrier: Carrier, addr: SocketAddr) -> Self {
        let site = id
            .site()
            .map(str::to_string)
            .unwrap_or_else(|| id.to_string());
        Self {
            id,
            site,
            carrier,
            addr,
        }
    }
}

/// A refusal: the status for the peer, the reason, and the failure metric label.
pub struct Refusal {
    pub status: ReplyStatus,
    pub reason: String,
    pub metric: &'static str,
}

fn refuse(status: ReplyStatus, reason: impl Into<String>, metric: &'static str) -> Refusal {
    Refusal {
        status,
        reason: reason.into(),
        metric,
    }
}

/// Read a preamble: the preamble and any payload bytes that came with it.
async fn read_preamble(recv: &mut RecvHalf) -> Result<(Preamble, Bytes), Refusal> {
    let mut buf = BytesMut::with_capacity(512);
    loop {
        match Preamble::decode(&buf) {
            Err(e) => {
                return Err(refuse(
                    ReplyStatus::BadRequest,
                    format!("bad preamble: {e}"),
                    "bad_preamble",
                ));
            }
            Ok(Some((p, used))) => return Ok((p, buf.split_off(used).freeze())),
            Ok(None) if buf.len() >= MAX_PREAMBLE_LEN => {
                return Err(refuse(
                    ReplyStatus::BadRequest,
                    "preamble over the size limit",
                    "bad_preamble",
                ));
            }
            Ok(None) => {}
        }
        match recv.read_buf(&mut buf).await {
            Ok(0) => {
                return Err(refuse(
                    ReplyStatus::BadRequest,
                    format!("stream ended inside the preamble after {} bytes", buf.len()),
                    "truncated_preamble",
                ));
            }
            Ok(_) => {}
            Err(e) => {
                return Err(refuse(
                    ReplyStatus::BadRequest,
                    format!("stream failed inside the preamble: {e}"),
                    "stream_error",
                ));
            }
        }
    }
}

async fn send_reply(send: &mut SendHalf, reply: &Reply) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    reply.encode(&mut buf);
    send.write_all(&buf).await?;
    if reply.status != ReplyStatus::Ok {
        send.shutdown().await?;
    }
    Ok(())
}

/// The local export, endpoint addresses and service key a target resolves to in our site.
fn local_endpoints(
    catalog: &Catalog,
    site: &str,
    target: &Target,
) -> Result<(ServiceKey, u16, Vec<SocketAddr>), Refusal> {
    match target {
        Target::Service {
            namespace,
            name,
            port,
        } => {
            let key = ServiceKey::new(namespace.clone(), name.clone());
            let Some(export) = catalog.export(&key, site) else {
                return Err(refuse(
                    ReplyStatus::NoEndpoint,
                    format!("{key} is not exported by site {site}"),
                    "no_endpoint",
                ));
            };
            let Some(p) = export.ports.iter().find(|p| p.port == *port) else {
                return Err(refuse(
                    ReplyStatus::NoEndpoint,
                    format!("{key} has no port {port} in site {site}"),
                    "no_endpoint",
                ));
            };
            let addrs: Vec<SocketAddr> = export
                .endpoints
                .iter()
                .filter(|e| e.ready)
                .map(|e| SocketAddr::new(e.address, p.target_port))
                .collect();
            if addrs.is_empty() {
                return Err(refuse(
                    ReplyStatus::NoEndpoint,
                    format!("{key} has no ready endpoint in site {site}"),
                    "no_endpoint",
                ));
            }
            Ok((key, *port, addrs))
        }
        Target::Endpoint { addr } => {
            // Only endpoints this site exports may be named: peers cannot reach arbitrary hosts.
            let found = catalog.exports_of_site(site).find(|e| {
                e.endpoints.iter().any(|ep| ep.address == addr.ip())
                    && e.ports.iter().any(|p| p.target_port == addr.port())
            });
            match found {
                Some(e) => Ok((e.service.clone(), addr.port(), vec![*addr])),
                None => Err(refuse(
                    ReplyStatus::Denied,
                    format!("{addr} is not an endpoint exported by site {site}"),
                    "unknown_endpoint",
                )),
            }
        }
    }
}

/// Connect to a ready endpoint of `target` in this site, round-robin, trying a few.
pub async fn connect_local(
    sh: &Shared,
    catalog: &Catalog,
    target: &Target,
    peer_site: &str,
) -> Result<(TcpStream, SocketAddr), Refusal> {
    let (key, port, addrs) = local_endpoints(catalog, &sh.site, target)?;
    let order = sh.order_endpoints(&key, port, &addrs);
    let mut last = String::new();
    for addr in order.into_iter().take(MAX_ENDPOINT_TRIES) {
        let began = Instant::now();
        match tokio::time::timeout(sh.cfg.tunnel.connect_timeout(), TcpStream::connect(addr)).await
        {
            Ok(Ok(s)) => {
                sh.endpoint_ok(addr);
                let _ = s.set_nodelay(true);
                sh.metrics
                    .connect_seconds
                    .get_or_create(&SiteLabel {
                        peer_site: peer_site.to_string(),
                    })
                    .observe(began.elapsed().as_secs_f64());
                return Ok((s, addr));
            }
            Ok(Err(e)) => last = format!("{addr}: {e}"),
            Err(_) => {
                last = format!(
                    "{addr}: no answer within {:?}",
                    sh.cfg.tunnel.connect_timeout()
                )
            }
        }
        sh.metrics.failure(peer_site, "endpoint_connect");
        sh.endpoint_failed(addr);
    }
    Err(refuse(
        ReplyStatus::ConnectFailed,
        format!("cannot connect to {key}: {last}"),
        "connect_failed",
    ))
}

/// Serve one tunnel stream accepted from `peer`.
pub async fn serve_stream(
    sh: Arc<Shared>,
    peer: Arc<Peer>,
    mut send: SendHalf,
    mut recv: RecvHalf,
) {
    let _guard = sh.drain.guard();
    let labels = StreamLabels {
        peer_site: peer.site.clone(),
        direction: Direction::Incoming,
    };
    sh.metrics.streams.get_or_create(&labels).inc();
    let active = sh.metrics.streams_active.get_or_create(&labels).clone();
    active.inc();
    let began = Instant::now();
    // At `tunnel.max_inbound_streams`: "draining", so the sender tries another gateway.
    let Ok(_slot) = sh.inbound_streams.clone().try_acquire_owned() else {
        let r = refuse(
            ReplyStatus::Draining,
            format!(
                "gateway of site {} serves {} streams already (tunnel.max_inbound_streams)",
                sh.site, sh.cfg.tunnel.max_inbound_streams
            ),
            "stream_limit",
        );
        return finish_refused(&sh, &peer, &mut send, None, r, began, &active).await;
    };
    let read = tokio::time::timeout(sh.cfg.tunnel.preamble_timeout(), read_preamble(&mut recv));
    let (preamble, early) = match read.await {
        Ok(Ok(x)) => x,
        Ok(Err(r)) => return finish_refused(&sh, &peer, &mut send, None, r, began, &active).await,
        Err(_) => {
            let r = refuse(
                ReplyStatus::BadRequest,
                format!(
                    "preamble not complete within {:?}",
                    sh.cfg.tunnel.preamble_timeout()
                ),
                "preamble_timeout",
            );
            return finish_refused(&sh, &peer, &mut send, None, r, began, &active).await;
        }
    };
    let catalog = sh.catalog();
    let decided = decide(&sh, &catalog, &peer, &preamble);
    let (mut endpoint, addr) = match decided {
        Err(r) => {
            return finish_refused(&sh, &peer, &mut send, Some(&preamble), r, began, &active).await;
        }
        Ok(()) => match connect_local(&sh, &catalog, &preamble.target, &peer.site).await {
            Ok(x) => x,
            Err(r) => {
                return finish_refused(&sh, &peer, &mut send, Some(&preamble), r, began, &active)
                    .await;
            }
        },
    };
    let counts = Counts::default();
    let result = async {
        send_reply(&mut send, &Reply::ok()).await?;
        if !early.is_empty() {
            // Bytes the peer sent with its preamble (an SNI listener's ClientHello): from the
            // tunnel to the endpoint, like everything the peer sends after them.
            endpoint.write_all(&early).await?;
            counts
                .from_tunnel
                .fetch_add(early.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        let (mut er, mut ew) = endpoint.split();
        // Seen from the endpoint: "to tunnel" is what the endpoint sends back to the peer.
        let idle = sh.cfg.tunnel.stream_idle_timeout();
        splice(&mut er, &mut ew, &mut recv, &mut send, &counts, idle).await
    }
    .await;
    let (from_endpoint, from_peer) = counts.get();
    sh.metrics
        .add_bytes(&peer.site, Direction::Incoming, from_endpoint, from_peer);
    if let Err(e) = &result {
        sh.metrics.failure(&peer.site, "stream_error");
        tracing::debug!(error = %e, "tunnel stream failed");
    }
    active.dec();
    tracing::info!(
        target: "meshbridge::access",
        direction = "incoming",
        peer.site = %peer.site, peer.id = %peer.id, peer.addr = %peer.addr,
        transport = peer.carrier.name(),
        source.claimed = preamble.source_identity.as_deref().unwrap_or("-"),
        trace_id = %TraceHex(preamble.trace_id.as_ref()),
        dest = %describe_target(&preamble.target),
        endpoint = %addr,
        status = "ok",
        bytes.from_peer = from_peer, bytes.to_peer = from_endpoint,
        duration_ms = began.elapsed().as_millis() as u64,
        error = result.err().map(|e| e.to_string()).unwrap_or_default(),
        "proxied"
    );
}

/// Draining, then policy.
fn decide(sh: &Shared, catalog: &Catalog, peer: &Peer, p: &Preamble) -> Result<(), Refusal> {
    if sh.drain.is_draining() {
        return Err(refuse(
            ReplyStatus::Draining,
            format!("gateway of site {} is draining", sh.site),
            "draining",
        ));
    }
    let key = match &p.target {
        Target::Service {
            namespace, name, ..
        } => ServiceKey::new(namespace.clone(), name.clone()),
        Target::Endpoint { .. } => local_endpoints(catalog, &sh.site, &p.target)?.0,
    };
    let me = sh.identity.id();
    match policy::authorize(
        catalog,
        &key,
        &peer.id,
        me.trust_domain(),
        sh.cfg.policy.default,
    ) {
        Decision::Allow(_) => Ok(()),
        Decision::Deny(reason) => {
            sh.metrics
                .policy_denials
                .get_or_create(&SiteLabel {
                    peer_site: peer.site.clone(),
                })
                .inc();
            tracing::warn!(
                peer.id = %peer.id, local.id = %sh.identity.id(),
                source.claimed = p.source_identity.as_deref().unwrap_or("-"),
                service = %key, %reason, "stream denied by policy"
            );
            Err(refuse(ReplyStatus::Denied, reason, "denied"))
        }
    }
}

async fn finish_refused(
    sh: &Shared,
    peer: &Peer,
    send: &mut SendHalf,
    preamble: Option<&Preamble>,
    r: Refusal,
    began: Instant,
    active: &prometheus_client::metrics::gauge::Gauge,
) {
    sh.metrics.failure(&peer.site, r.metric);
    let _ = send_reply(send, &Reply::new(r.status, r.reason.clone())).await;
    active.dec();
    tracing::info!(
        target: "meshbridge::access",
        direction = "incoming",
        peer.site = %peer.site, peer.id = %peer.id, peer.addr = %peer.addr,
        transport = peer.carrier.name(),
        dest = %preamble.map(|p| describe_target(&p.target)).unwrap_or_else(|| "-".into()),
        trace_id = %TraceHex(preamble.and_then(|p| p.trace_id.as_ref())),
        status = ?r.status, reason = %r.reason,
        duration_ms = began.elapsed().as_millis() as u64,
        "refused"
    );
}

pub fn describe_target(t: &Target) -> String {
    match t {
        Target::Service {
            namespace,
            name,
            port,
        } => format!("{namespace}/{name}:{port}"),
        Target::Endpoint { addr } => addr.to_string(),
    }
}
