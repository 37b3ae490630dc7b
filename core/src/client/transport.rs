//! gRPC channels over our own mTLS: TCP, then a rustls handshake with the process's SVID
//! and a SPIFFE verifier, then HTTP/2 (ALPN `h2`).
//!
//! tonic's built-in TLS takes PEM files and checks host names; ours checks SPIFFE ids
//! against an allow-list and picks up reloaded certificates for every new connection, so
//! the channel is built with [`Endpoint::connect_with_connector_lazy`] over
//! [`MtlsConnector`]. The endpoint URI then says `http://` (tonic refuses `https://` with a
//! custom connector); the bytes on the wire are TLS all the same.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint};

use crate::tls::{AllowList, Identity};

/// ALPN of gRPC over TLS.
pub const ALPN_H2: &[u8] = b"h2";

/// Largest gRPC message accepted or sent: a whole catalog in one reply.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// Connects TCP, then TLS with our SVID; the server must present an SVID in `allow`.
#[derive(Clone)]
pub struct MtlsConnector {
    tls: TlsConnector,
    connect_timeout: Duration,
}

impl MtlsConnector {
    pub fn new(identity: &Arc<Identity>, allow: AllowList, connect_timeout: Duration) -> Self {
        let config = identity.client_config(allow, &[ALPN_H2]);
        Self {
            tls: TlsConnector::from(Arc::new(config)),
            connect_timeout,
        }
    }

    /// A connector with a ready-made client config, e.g. one that presents no certificate
    /// (joining with a token). The config must offer ALPN `h2`.
    pub fn with_config(config: rustls::ClientConfig, connect_timeout: Duration) -> Self {
        Self {
            tls: TlsConnector::from(Arc::new(config)),
            connect_timeout,
        }
    }
}

impl tower_service::Service<Uri> for MtlsConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        let timeout = self.connect_timeout;
        Box::pin(async move {
            let host = uri
                .host()
                .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
                .ok_or_else(|| io::Error::other(format!("{uri}: no host")))?;
            let port = uri.port_u16().unwrap_or(443);
            let handshake = async {
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                // SPIFFE authenticates by id; the name only feeds SNI.
                let name = ServerName::try_from(host.clone())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                tls.connect(name, tcp).await
            };
            match tokio::time::timeout(timeout, handshake).await {
                Ok(Ok(stream)) => Ok(TokioIo::new(stream)),
                Ok(Err(e)) => Err(io::Error::new(
                    e.kind(),
                    format!("{host}:{port}: {}", crate::tls::describe(&e)),
                )),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{host}:{port}: connect and TLS handshake took over {timeout:?}"),
                )),
            }
        })
    }
}

/// Why a registry URL cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("registry URL {url:?}: {reason}")]
pub struct BadUrl {
    pub url: String,
    pub reason: String,
}

/// The `http://host:port` authority tonic dials for a node URL (`https://host:port`,
/// or a bare `host:port`).
pub fn endpoint_uri(url: &str) -> Result<Uri, BadUrl> {
    let bad = |reason: String| BadUrl {
        url: url.to_owned(),
        reason,
    };
    let rest = match url.split_once("://") {
        Some(("https" | "http", rest)) => rest,
        Some((scheme, _)) => return Err(bad(format!("scheme {scheme:?} is not https"))),
        None => url,
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        return Err(bad("expected https://host:port".into()));
    }
    let uri: Uri = format!("http://{authority}")
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(e.to_string()))?;
    // The digits after the last colon (outside an IPv6 address's brackets), as written.
    let written = authority
        .rsplit_once(':')
        .map(|(_, p)| p)
        .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    match (uri.port_u16(), written) {
        (Some(0), _) => Err(bad("port 0 cannot be dialed (1-65535)".into())),
        (Some(_), _) => Ok(uri),
        (None, Some(port)) => Err(bad(format!("port {port} is out of range (1-65535)"))),
        (None, None) => Err(bad("a port is required".into())),
    }
}

/// Channel settings.
#[derive(Clone, Debug)]
pub struct ChannelOptions {
    pub connect_timeout: Duration,
    /// HTTP/2 pings find a dead peer (or a black-holed path) on an idle connection.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Default for ChannelOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            keepalive_interval: Duration::from_secs(2),
            keepalive_timeout: Duration::from_secs(3),
        }
    }
}

/// A lazily connected channel to `url`; reconnects by itself after the connection drops.
/// Must be called inside a tokio runtime.
pub fn lazy_channel(
    url: &str,
    identity: &Arc<Identity>,
    allow: AllowList,
    opts: &ChannelOptions,
) -> Result<Channel, BadUrl> {
    let uri = endpoint_uri(url)?;
    let connector = MtlsConnector::new(identity, allow, opts.connect_timeout);
    let endpoint = Endpoint::from(uri)
        .http2_keep_alive_interval(opts.keepalive_interval)
        .keep_alive_timeout(opts.keepalive_timeout)
        .keep_alive_while_idle(true);
    Ok(endpoint.connect_with_connector_lazy(connector))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_urls_become_http_authorities() {
        let uri = endpoint_uri("https://127.0.0.1:7443").unwrap();
        assert_eq!(uri.to_string(), "http://127.0.0.1:7443/");
        assert_eq!(
            endpoint_uri("[::1]:7443").unwrap().to_string(),
            "http://[::1]:7443/"
        );
        assert!(endpoint_uri("https://host").is_err());
        assert!(endpoint_uri("ftp://host:1").is_err());
        assert!(endpoint_uri("https://host:1/path").is_err());
        let reason = |url: &str| endpoint_uri(url).unwrap_err().reason;
        assert_eq!(
            reason("https://127.0.0.1:70000"),
            "port 70000 is out of range (1-65535)"
        );
        assert_eq!(
            reason("https://127.0.0.1:0"),
            "port 0 cannot be dialed (1-65535)"
        );
        assert_eq!(reason("https://127.0.0.1"), "a port is required");
    }
}
