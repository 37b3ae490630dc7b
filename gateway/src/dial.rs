//! The sending side: reach a target for a local client, trying sites in locality order and
//! failing over — on a peer's no-endpoint, connect-failed or draining reply, or on a dead
//! link — to the next site without the client noticing.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use meshbridge_core::model::{Catalog, ServiceKey, SiteRank};
use tokio::net::TcpStream;

use crate::choice::Candidate;
use crate::inbound::{self, describe_target};
use crate::metrics::{Direction, SiteLabel, StreamLabels};
use crate::preamble::{Preamble, ReplyStatus, Target};
use crate::shared::Shared;
use crate::stream::{RecvHalf, SendHalf};
use crate::transport;

/// Where a client connection ended up.
pub enum Dialed {
    /// Through a tunnel stream to a peer site; `leftover` is payload that came with the reply.
    Tunnel {
        site: String,
        send: SendHalf,
        recv: RecvHalf,
        leftover: Bytes,
    },
    /// Straight to an endpoint of our own site (the early bytes are already written).
    Local {
        site: String,
        stream: TcpStream,
        endpoint: SocketAddr,
    },
}

impl Dialed {
    pub fn site(&self) -> &str {
        match self {
            Self::Tunnel { site, .. } | Self::Local { site, .. } => site,
        }
    }
}

/// Why no site could take a client connection.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{target}: {reason}")]
pub struct DialError {
    pub target: String,
    pub status: ReplyStatus,
    pub reason: String,
}

/// The sites that can serve `target`, best first.
fn plan(sh: &Shared, catalog: &Catalog, target: &Target) -> Vec<Candidate> {
    match target {
        Target::Service {
            namespace,
            name,
            port,
        } => {
            let key = ServiceKey::new(namespace.clone(), name.clone());
            let ranked = catalog.resolve(&key, &sh.site).unwrap_or_default();
            sh.candidates(&ranked, *port)
        }
        Target::Endpoint { addr } => catalog
            .exports
            .values()
            .filter(|e| {
                e.endpoints
                    .iter()
                    .any(|ep| ep.address == addr.ip() && ep.ready)
                    && e.ports.iter().any(|p| p.target_port == addr.port())
            })
            .filter_map(|e| {
                let site = catalog.site(&e.site)?;
                Some(Candidate {
                    site: e.site.clone(),
                    rank: SiteRank::Other,
                    gateways: site.gateways.clone(),
                    weight: 1,
                    ejected: false,
                })
            })
            .take(1)
            .collect(),
    }
}

/// Reach `target`, sending `early` bytes (already read from the client) ahead of the payload;
/// the preamble carries `trace_id` to the receiving gateway.
pub async fn dial(
    sh: &Shared,
    target: &Target,
    source: Option<&str>,
    early: &[u8],
    trace_id: [u8; 16],
) -> Result<Dialed, DialError> {
    let catalog = sh.catalog();
    let candidates = plan(sh, &catalog, target);
    let err = |status, reason: String| DialError {
        target: describe_target(target),
        status,
        reason,
    };
    if candidates.is_empty() {
        return Err(err(
            ReplyStatus::NoEndpoint,
            "no site has a ready endpoint".into(),
        ));
    }
    let preamble = Preamble {
        target: target.clone(),
        source_identity: source.map(str::to_string),
        source_site: Some(sh.site.clone()),
        trace_id: Some(trace_id),
    };
    let mut tried = Vec::new();
    let n = candidates.len().min(sh.cfg.failover.max_attempts);
    for (i, cand) in candidates.iter().take(n).enumerate() {
        match attempt(sh, &catalog, cand, &preamble, early, i + 1 == n).await {
            Ok(d) => {
                if !tried.is_empty() {
                    tracing::info!(target = %describe_target(target), site = %cand.site, failed = ?tried, "failed over");
                }
                return Ok(d);
            }
            Err(Attempt::Final(status, reason)) => return Err(err(status, reason)),
            Err(Attempt::Next(reason)) => {
                sh.site_failed(&cand.site);
                tracing::debug!(site = %cand.site, %reason, "site could not serve; trying the next");
                tried.push(format!("{}: {reason}", cand.site));
            }
        }
    }
    Err(err(ReplyStatus::NoEndpoint, tried.join("; ")))
}

enum Attempt {
    /// Another site may do better.
    Next(String),
    /// Any site would answer the same (denied, bad request).
    Final(ReplyStatus, String),
}

async fn attempt(
    sh: &Shared,
    catalog: &Catalog,
    cand: &Candidate,
    preamble: &Preamble,
    early: &[u8],
    last_resort: bool,
) -> Result<Dialed, Attempt> {
    if cand.site == sh.site {
        return local(sh, catalog, &preamble.target, early).await;
    }
    let mut last = String::from("no gateway address");
    for addr in &cand.gateways {
        let link = match sh.pool.get(&cand.site, addr, last_resort).await {
            Ok(l) => l,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        let began = Instant::now();
        let timeout = sh.cfg.tunnel.reply_timeout();
        let opened = match transport::request(&link, preamble, early, timeout).await {
            Ok(o) => o,
            Err(e) => {
                sh.metrics.failure(
                    &cand.site,
                    if matches!(e, transport::RequestError::StreamsExhausted(_)) {
                        "streams_exhausted"
                    } else {
                        "request_failed"
                    },
                );
                last = format!("gateway {addr}: {e}");
                if link.is_closed() || matches!(e, transport::RequestError::Timeout(_)) {
                    sh.pool.link_failed(&cand.site, addr, last.clone());
                }
                continue;
            }
        };
        sh.metrics
            .connect_seconds
            .get_or_create(&SiteLabel {
                peer_site: cand.site.clone(),
            })
            .observe(began.elapsed().as_secs_f64());
        let status = opened.reply.status;
        if status == ReplyStatus::Ok {
            sh.site_ok(&cand.site);
            sh.metrics
                .streams
                .get_or_create(&StreamLabels {
                    peer_site: cand.site.clone(),
                    direction: Direction::Outgoing,
                })
                .inc();
            return Ok(Dialed::Tunnel {
                site: cand.site.clone(),
                send: opened.send,
                recv: opened.recv,
                leftover: opened.leftover,
            });
        }
        sh.metrics.failure(&cand.site, reply_metric(status));
        let reason = format!(
            "site {} answered {status:?}: {}",
            cand.site, opened.reply.reason
        );
        if status.allows_failover() {
            return Err(Attempt::Next(reason));
        }
        return Err(Attempt::Final(status, reason));
    }
    Err(Attempt::Next(last))
}

async fn local(
    sh: &Shared,
    catalog: &Catalog,
    target: &Target,
    early: &[u8],
) -> Result<Dialed, Attempt> {
    use tokio::io::AsyncWriteExt;
    match inbound::connect_local(sh, catalog, target, &sh.site).await {
        Ok((mut stream, endpoint)) => {
            if !early.is_empty() {
                stream
                    .write_all(early)
                    .await
                    .map_err(|e| Attempt::Next(format!("{endpoint}: {e}")))?;
            }
            sh.site_ok(&sh.site);
            Ok(Dialed::Local {
                site: sh.site.clone(),
                stream,
                endpoint,
            })
        }
        Err(r) if r.status.allows_failover() => Err(Attempt::Next(r.reason)),
        Err(r) => Err(Attempt::Final(r.status, r.reason)),
    }
}

fn reply_metric(status: ReplyStatus) -> &'static str {
    match status {
        ReplyStatus::Ok => "ok",
        ReplyStatus::NoEndpoint => "peer_no_endpoint",
        ReplyStatus::Denied => "peer_denied",
        ReplyStatus::ConnectFailed => "peer_connect_failed",
        ReplyStatus::BadRequest => "peer_bad_request",
        ReplyStatus::Draining => "peer_draining",
    }
}
