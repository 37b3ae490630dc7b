//! Outbound: connections of local clients, leaving this site (access log `direction =
//! "outgoing"`): service listeners, SNI passthrough and HTTP CONNECT. Each accepted
//! connection is routed to a target, dialed (with failover), and spliced. (Named by the
//! traffic's direction, as ztunnel's modules are; [`crate::inbound`] is the other end.)

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::connect::{self, MAX_HEAD_LEN};
use crate::dial::{DialError, Dialed, dial};
use crate::inbound::describe_target;
use crate::metrics::{Direction, KindLabel};
use crate::preamble::{ReplyStatus, Target, TraceHex};
use crate::shared::Shared;
use crate::sni::{self, MAX_CLIENT_HELLO_LEN};
use crate::stream::{Counts, splice, splice_local};

/// What a listener serves.
#[derive(Clone, Debug)]
pub enum Kind {
    /// A service listener: every connection goes to this target.
    Service(Target),
    Sni,
    Connect,
}

impl Kind {
    fn name(&self) -> &'static str {
        match self {
            Self::Service(_) => "service",
            Self::Sni => "sni",
            Self::Connect => "connect",
        }
    }
}

/// Accept on `listener` until `stop` (or the gateway's accept stop) fires.
pub async fn accept_loop(
    sh: Arc<Shared>,
    listener: TcpListener,
    kind: Kind,
    stop: CancellationToken,
) {
    let gauge = sh
        .metrics
        .listeners
        .get_or_create(&KindLabel { kind: kind.name() })
        .clone();
    gauge.inc();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => break,
            _ = sh.accept_stop.cancelled() => break,
        };
        match accepted {
            Ok((client, addr)) => {
                // At the connection limit, hold this client (unread) and accept no more:
                // later ones wait in the kernel's backlog.
                let slot = tokio::select! {
                    s = sh.client_slots.clone().acquire_owned() => s,
                    _ = stop.cancelled() => break,
                    _ = sh.accept_stop.cancelled() => break,
                };
                let Ok(slot) = slot else { break };
                sh.metrics
                    .client_connections
                    .get_or_create(&KindLabel { kind: kind.name() })
                    .inc();
                let sh2 = sh.clone();
                let kind = kind.clone();
                let guard = sh.drain.guard();
                sh.tasks.spawn(async move {
                    let _guard = guard;
                    let _slot = slot;
                    let stop = sh2.stop.clone();
                    tokio::select! {
                        _ = handle(&sh2, client, addr, kind) => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
            Err(e) => {
                // Out of descriptors and the like: back off briefly rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    gauge.dec();
}

/// Why a client's first bytes could not be routed.
struct Unroutable {
    reason: String,
    /// The HTTP status for a CONNECT client.
    status: u16,
}

impl Unroutable {
    fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            status: 400,
        }
    }
}

/// Read from `client` into `buf` until `parse` decides, within `timeout` and `max` bytes.
async fn read_head<T, E>(
    client: &mut TcpStream,
    buf: &mut BytesMut,
    max: usize,
    timeout: Duration,
    mut parse: impl FnMut(&[u8]) -> Result<Option<T>, E>,
    status: impl Fn(&E) -> u16,
) -> Result<T, Unroutable>
where
    E: std::fmt::Display,
{
    let work = async {
        loop {
            match parse(buf) {
                Ok(Some(t)) => return Ok(t),
                Ok(None) if buf.len() >= max => {
                    return Err(Unroutable::new(format!("over {max} bytes")));
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(Unroutable {
                        reason: e.to_string(),
                        status: status(&e),
                    });
                }
            }
            buf.reserve(4096);
            match read_some(client, buf).await {
                Ok(0) => {
                    let reason = format!("client closed after {} bytes", buf.len());
                    return Err(Unroutable::new(reason));
                }
                Ok(_) => {}
                Err(e) => return Err(Unroutable::new(e.to_string())),
            }
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err(Unroutable::new(format!("incomplete after {timeout:?}"))))
}

async fn read_some<R: AsyncRead + Unpin>(r: &mut R, buf: &mut BytesMut) -> std::io::Result<usize> {
    r.read_buf(buf).await
}

/// A fatal TLS alert record (TLS 1.2 framing, as every client accepts before a handshake).
fn tls_alert(description: u8) -> [u8; 7] {
    [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description]
}
const ALERT_HANDSHAKE_FAILURE: u8 = 40;
const ALERT_UNRECOGNIZED_NAME: u8 = 112;

async fn handle(sh: &Shared, mut client: TcpStream, addr: SocketAddr, kind: Kind) {
    let _ = client.set_nodelay(true);
    let began = Instant::now();
    let mut buf = BytesMut::new();
    let head_timeout = sh.cfg.tunnel.preamble_timeout();
    // Route: the target and the bytes already read that belong to the payload.
    let routed: Result<(Target, usize), Unroutable> = match &kind {
        Kind::Service(t) => Ok((t.clone(), 0)),
        Kind::Sni => read_head(
            &mut client,
            &mut buf,
            MAX_CLIENT_HELLO_LEN,
            head_timeout,
            sni::parse_client_hello,
            |_| 400,
        )
        .await
        .and_then(|info| {
            // Only SNI needs the listener's port (a system call per connection).
            let local_port = client.local_addr().map(|a| a.port()).unwrap_or(0);
            sni_target(sh, info.sni.as_deref(), local_port).map_err(Unroutable::new)
        })
        .map(|t| (t, 0)),
        Kind::Connect => {
            read_head(
                &mut client,
                &mut buf,
                MAX_HEAD_LEN,
                head_timeout,
                |b| connect::parse_connect(b, &sh.cfg.zones),
                connect::ConnectError::status,
            )
            .await
        }
    };
    let (target, head_len) = match routed {
        Ok(x) => x,
        Err(Unroutable { reason, status }) => {
            sh.metrics.failure("-", "bad_client_input");
            let answer = match kind {
                Kind::Sni => tls_alert(ALERT_UNRECOGNIZED_NAME).to_vec(),
                Kind::Connect => connect::response(status, &reason),
                Kind::Service(_) => Vec::new(),
            };
            let _ = client.write_all(&answer).await;
            let _ = client.shutdown().await;
            tracing::info!(
                target: "meshbridge::access", direction = "outgoing", listener = kind.name(),
                client.addr = %addr, status = "refused", %reason, "refused"
            );
            return;
        }
    };
    // SNI: the whole ClientHello goes through; CONNECT: only bytes after the request head.
    let early = buf.split_off(head_len).freeze();
    // Boxed: dialing is most of this future's size (6.5 of 7.6 KB), and the task's future
    // is copied when it is spawned and again when it ends.
    let trace: [u8; 16] = rand::random();
    let dialed = Box::pin(dial(sh, &target, None, &early, trace)).await;
    let dialed = match dialed {
        Ok(d) => d,
        Err(e) => return refused(sh, &mut client, addr, &kind, e, &trace).await,
    };
    if let Kind::Connect = kind {
        let (code, text) = connect::status_for(ReplyStatus::Ok);
        if client
            .write_all(&connect::response(code, text))
            .await
            .is_err()
        {
            return;
        }
    }
    let site = dialed.site().to_string();
    let via = match &dialed {
        Dialed::Tunnel { .. } => "tunnel".to_string(),
        Dialed::Local { endpoint, .. } => endpoint.to_string(),
    };
    let counts = Counts::default();
    let (mut cr, mut cw) = client.split();
    let result = match dialed {
        Dialed::Tunnel {
            mut send,
            mut recv,
            leftover,
            ..
        } => {
            let r = async {
                if !leftover.is_empty() {
                    cw.write_all(&leftover).await?;
                }
                let idle = sh.cfg.tunnel.stream_idle_timeout();
                splice(&mut cr, &mut cw, &mut recv, &mut send, &counts, idle).await
            };
            r.await
        }
        Dialed::Local { mut stream, .. } => {
            let (mut er, mut ew) = stream.split();
            splice_local(&mut cr, &mut cw, &mut er, &mut ew, &counts).await
        }
    };
    let (up, down) = counts.get();
    let (up, down) = (up + early.len() as u64, down);
    sh.metrics.add_bytes(&site, Direction::Outgoing, up, down);
    if result.is_err() {
        sh.metrics.failure(&site, "stream_error");
    }
    tracing::info!(
        target: "meshbridge::access", direction = "outgoing", listener = kind.name(),
        client.addr = %addr, dest = %describe_target(&target), peer.site = %site,
        via = %via, trace_id = %TraceHex(Some(&trace)), status = "ok",
        bytes.from_client = up, bytes.to_client = down,
        duration_ms = began.elapsed().as_millis() as u64,
        error = result.err().map(|e| e.to_string()).unwrap_or_default(),
        "proxied"
    );
}

async fn refused(
    sh: &Shared,
    client: &mut TcpStream,
    addr: SocketAddr,
    kind: &Kind,
    e: DialError,
    trace: &[u8; 16],
) {
    sh.metrics.failure("-", "no_site");
    match kind {
        Kind::Connect => {
            let (code, text) = connect::status_for(e.status);
            let body = connect::response(code, &format!("{text} ({})", e.reason));
            let _ = client.write_all(&body).await;
        }
        Kind::Sni => {
            let _ = client.write_all(&tls_alert(ALERT_HANDSHAKE_FAILURE)).await;
        }
        Kind::Service(_) => {}
    }
    let _ = client.shutdown().await;
    tracing::info!(
        target: "meshbridge::access", direction = "outgoing", listener = kind.name(),
        client.addr = %addr, dest = %e.target, trace_id = %TraceHex(Some(trace)),
        status = ?e.status, reason = %e.reason, "refused"
    );
}

/// The target of a server name: the port from Istio's form, else the service's only port,
/// else the listener's port when the service has it.
fn sni_target(sh: &Shared, name: Option<&str>, listener_port: u16) -> Result<Target, String> {
    let name = name.ok_or("ClientHello without SNI: cannot route")?;
    let route = sni::route_from_sni(name, &sh.cfg.zones).ok_or_else(|| {
        format!(
            "server name {name:?} is not a service in {}",
            sh.cfg.zones.join(" or ")
        )
    })?;
    if let Some(subset) = &route.subset {
        tracing::debug!(
            sni = name,
            subset,
            "Istio subset in the server name ignored: the service is reached as a whole"
        );
    }
    if route.port.is_some() {
        return Ok(route.target(listener_port));
    }
    let key = meshbridge_core::model::ServiceKey::new(route.namespace.clone(), route.name.clone());
    let service = sh
        .catalog()
        .service(&key)
        .ok_or_else(|| format!("{key} is not in the catalog"))?;
    let port = match service.ports.as_slice() {
        [only] => only.port,
        ports if ports.iter().any(|p| p.port == listener_port) => listener_port,
        _ => {
            return Err(format!(
                "{key} has several ports; name one with outbound_.<port>_._."
            ));
        }
    };
    Ok(route.target(port))
}
