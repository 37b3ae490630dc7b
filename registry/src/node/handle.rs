//! [`NodeHandle`]: a running node's addresses, its Raft and catalog, and its shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use meshbridge_core::admin::Readiness;
use meshbridge_core::drain::{self, Outcome};
use meshbridge_core::model::Catalog;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::shared::{Shared, now_ms};
use crate::store::{Feed, WriterFault};
use crate::types::{NodeId, Raft, RaftMetrics};

/// A running registry node.
pub struct NodeHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    admin_addr: SocketAddr,
    stop: CancellationToken,
    kill: CancellationToken,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    tasks: JoinSet<()>,
    readiness: Readiness,
    drain: Duration,
    log_fault: Arc<WriterFault>,
}

impl NodeHandle {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        shared: Arc<Shared>,
        addr: SocketAddr,
        admin_addr: SocketAddr,
        stop: CancellationToken,
        kill: CancellationToken,
        server: JoinHandle<Result<(), tonic::transport::Error>>,
        tasks: JoinSet<()>,
        readiness: Readiness,
        drain: Duration,
        log_fault: Arc<WriterFault>,
    ) -> Self {
        Self {
            shared,
            addr,
            admin_addr,
            stop,
            kill,
            server,
            tasks,
            readiness,
            drain,
            log_fault,
        }
    }

    pub fn node_id(&self) -> NodeId {
        self.shared.node_id
    }

    /// The bound gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://<addr>`: the URL clients and peers use when `addr` is reachable as is.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn raft(&self) -> &Raft {
        &self.shared.raft
    }

    /// The catalog as applied on this node.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.shared.catalog()
    }

    pub fn feed(&self) -> Arc<Feed> {
        self.shared.feed.clone()
    }

    pub fn raft_metrics(&self) -> RaftMetrics {
        self.shared.raft.metrics().borrow().clone()
    }

    pub fn is_leader(&self) -> bool {
        self.shared.raft.metrics().borrow().current_leader == Some(self.shared.node_id)
    }

    /// Graceful stop: not ready, stop accepting, end watch and AppendEntries streams, let
    /// calls in flight finish up to the drain deadline, then stop Raft and close the store.
    pub async fn shutdown(mut self) -> Outcome {
        info!(node = self.node_id(), "registry node shutting down");
        self.readiness.set(false);
        self.stop.cancel();
        let server = &mut self.server;
        let calls = async {
            if let Ok(Err(e)) = server.await {
                warn!(error = %e, "gRPC server ended with an error");
            }
        };
        // tonic does not count its calls in flight: a forced drain reports "some" (1).
        let outcome = drain::within(self.drain, calls, || 1).await;
        if outcome != Outcome::Graceful {
            warn!(deadline = ?self.drain, ?outcome, "calls still in flight at the drain deadline; closing them");
        }
        self.finish(outcome == Outcome::Graceful).await;
        outcome
    }

    /// Abrupt stop: every connection fails at once and Raft stops where it is. What was
    /// acknowledged is on disk already; writes queued for the log still reach the disk
    /// (for a crash that loses them, [`NodeHandle::crash`]).
    pub async fn kill(self) {
        info!(node = self.node_id(), "registry node killed");
        self.readiness.set(false);
        self.stop.cancel();
        self.finish(false).await;
    }

    /// Crash tests: the Raft log writer stops before its next commit and waits (a disk
    /// that stalls) until [`NodeHandle::crash`] or [`NodeHandle::release_log_writes`].
    /// openraft appends stay readable (and the leader's go out early) meanwhile.
    pub fn hold_log_writes(&self) {
        self.log_fault.hold();
    }

    /// Lets held log writes go on.
    pub fn release_log_writes(&self) {
        self.log_fault.release();
    }

    /// Whether a log write is waiting at the hold ([`NodeHandle::hold_log_writes`]).
    pub fn log_write_held(&self) -> bool {
        self.log_fault.holding()
    }

    /// A crash, not a shutdown: the log writer drops every write not yet committed (held or
    /// queued) and calls nobody back, so what was not fsynced is lost as in `kill -9`; then
    /// every connection fails at once and the node stops where it is.
    pub async fn crash(self) {
        info!(node = self.node_id(), "registry node crashed (fault hook)");
        self.log_fault.crash();
        self.kill().await;
    }

    async fn finish(mut self, server_ended: bool) {
        self.kill.cancel();
        if !server_ended {
            self.server.abort();
            let _ = (&mut self.server).await;
        }
        if let Err(e) = self.shared.raft.shutdown().await {
            warn!(error = %e, "raft shutdown failed");
        }
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        info!(node = self.node_id(), "registry node stopped");
    }
}

/// Keeps the metrics and `/readyz` (ready: a leader is known) current, twice a second
/// (not on every apply: a write burst would rebuild the per-site gauges each time).
pub(super) async fn refresh(s: Arc<Shared>, readiness: Readiness, stop: CancellationToken) {
    let raft = s.raft.metrics();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let m = raft.borrow().clone();
        readiness.set(m.current_leader.is_some());
        s.metrics.refresh(&m, &s.catalog(), now_ms());
    }
}

/// `/debug/catalog` (the catalog on this node, JSON) and `/debug/raft` (Raft metrics).
pub(super) fn debug_routes(s: Arc<Shared>) -> Router {
    Router::new()
        .route("/debug/catalog", get(debug_catalog))
        .route("/debug/raft", get(debug_raft))
        .with_state(s)
}

fn json_response<T: serde::Serialize>(v: &T) -> Response {
    match serde_json::to_string_pretty(v) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encode: {e}\n")).into_response(),
    }
}

async fn debug_catalog(State(s): State<Arc<Shared>>) -> Response {
    json_response(&*s.catalog())
}

async fn debug_raft(State(s): State<Arc<Shared>>) -> Response {
    let m = s.raft.metrics().borrow().clone();
    json_response(&m)
}
