//! The admin HTTP server every role embeds: `/healthz`, `/readyz`, `/metrics`
//! (Prometheus text), `/config_dump`, plus whatever routes a role adds.
//!
//! Plain HTTP without authentication: every role binds it to loopback by default (or not at
//! all), and it answers only requests whose `Host` is an IP address or `localhost`, so a web
//! page whose DNS name resolves to 127.0.0.1 (DNS rebinding) cannot read it from a browser.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Shared state of the standard admin routes.
#[derive(Clone)]
pub struct AdminState {
    ready: watch::Receiver<bool>,
    metrics: Arc<Registry>,
    config_dump: Arc<String>,
}

/// Flips `/readyz`.
#[derive(Clone)]
pub struct Readiness(Arc<watch::Sender<bool>>);

impl Readiness {
    pub fn new() -> Self {
        Self(Arc::new(watch::channel(false).0))
    }

    pub fn set(&self, ready: bool) {
        self.0.send_replace(ready);
    }

    pub fn is_ready(&self) -> bool {
        *self.0.borrow()
    }

    fn subscribe(&self) -> watch::Receiver<bool> {
        self.0.subscribe()
    }
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

/// The standard routes. `config_dump` is the effective config (TOML or JSON text).
pub fn router(ready: &Readiness, metrics: Arc<Registry>, config_dump: String) -> Router {
    let state = AdminState {
        ready: ready.subscribe(),
        metrics,
        config_dump: Arc::new(config_dump),
    };
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .route("/config_dump", get(config_dump_handler))
        .with_state(state)
}

async fn readyz(State(s): State<AdminState>) -> Response {
    if *s.ready.borrow() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics_handler(State(s): State<AdminState>) -> Response {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &s.metrics) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}\n"),
        )
            .into_response(),
    }
}

async fn config_dump_handler(State(s): State<AdminState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        s.config_dump.to_string(),
    )
        .into_response()
}

/// Bind the admin listener (so callers learn the port before serving).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serve until `stop` resolves. Every route, the role's own included, sits behind the
/// `Host` check.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router.layer(middleware::from_fn(host_check)))
        .with_graceful_shutdown(stop)
        .await
}

/// Refuses a request whose `Host` names a DNS name other than `localhost`.
async fn host_check(req: Request, next: Next) -> Response {
    let host = req.headers().get(header::HOST).map(|h| h.to_str());
    match host {
        // HTTP/1.0 without a Host header: no browser sends that.
        None => next.run(req).await,
        Some(Ok(h)) if host_allowed(h) => next.run(req).await,
        Some(h) => (
            StatusCode::FORBIDDEN,
            format!(
                "Host {:?} refused: the admin endpoints answer only an IP address or localhost\n",
                h.unwrap_or("<not text>")
            ),
        )
            .into_response(),
    }
}

/// `127.0.0.1`, `127.0.0.1:9902`, `[::1]:9902`, `localhost:9902`: yes; `evil.example`: no.
pub fn host_allowed(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((v6, port)) if port.is_empty() || port.starts_with(':') => v6,
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn admin_routes_answer() {
        let mut reg = Registry::default();
        let c = Counter::<u64>::default();
        reg.register("meshbridge_test_things", "things", c.clone());
        c.inc();
        let ready = Readiness::new();
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = router(&ready, Arc::new(reg), "site = \"east\"\n".into());
        let server = tokio::spawn(serve(listener, app, async move {
            let _ = rx.await;
        }));
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        ready.set(true);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        let m = get(addr, "/metrics").await;
        assert!(m.contains("meshbridge_test_things_total 1"), "{m}");
        assert!(get(addr, "/config_dump").await.contains("site = \"east\""));
        // DNS rebinding: a browser on a page of evil.example (resolving to 127.0.0.1)
        // sends that name as Host; refused on every route.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"GET /config_dump HTTP/1.1\r\nHost: evil.example:80\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 403"), "{out}");
        assert!(!out.contains("site = "), "{out}");
        let _ = tx.send(());
        server.await.unwrap().unwrap();
    }

    #[test]
    fn hosts_allowed_are_ip_addresses_and_localhost() {
        for ok in [
            "127.0.0.1",
            "127.0.0.1:9902",
            "[::1]:9902",
            "[::1]",
            "localhost",
            "LOCALHOST:1",
            "10.1.2.3:15021",
        ] {
            assert!(host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:9902",
            "x",
            "127.0.0.1.nip.io",
            "[::1]x",
            "localhost.evil.example",
        ] {
            assert!(!host_allowed(bad), "{bad}");
        }
    }
}
