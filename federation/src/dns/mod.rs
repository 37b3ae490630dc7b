//! Federated DNS: an authoritative server for the clusterset zone (default
//! `clusterset.local`), per the Kubernetes MCS DNS specification, answering from the local
//! catalog replica so that it keeps answering while the registry is unreachable.
//!
//! - [`Index`]: every name and record set of the zone, precomputed from one catalog as seen
//!   from this site (pure; rebuilt on each catalog change, swapped in atomically);
//! - [`answer`]: one request's bytes to the response's bytes from an index (pure; the same
//!   message path the server runs, for fuzzing and tests);
//! - [`DnsServer::start`]: UDP and TCP on one port (UDP: a blocking loop per socket on its
//!   own thread, with a response cache per index; TCP: hickory-server), with a per-client
//!   rate limit, forwarding outside the zone to an optional upstream, and metrics.

mod answer;
mod build;
mod config;
mod forward;
mod index;
mod metrics;
mod ratelimit;
mod server;
mod service;
mod tcp;
#[cfg(test)]
mod tests;
mod udp;
mod watch;

use std::net::SocketAddr;

pub use answer::{MAX_UDP_PAYLOAD, Transport, answer};
pub use config::{Config, DEFAULT_ZONE, RateLimit};
pub use index::{DNS_SCHEMA_VERSION, Index};
pub use metrics::Metrics;
pub use server::{DnsHandle, DnsServer};
pub use tcp::MAX_CONNECTIONS as MAX_TCP_CONNECTIONS;

/// Why the DNS server could not start.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error(transparent)]
    Config(#[from] meshbridge_core::config::ConfigError),
    #[error("zone {zone:?}: {reason}")]
    Zone { zone: String, reason: String },
    #[error("listen: {0}")]
    Listen(String),
    #[error("bind udp {addr}: {source}")]
    BindUdp {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("bind tcp {addr}: {source}")]
    BindTcp {
        addr: SocketAddr,
        source: std::io::Error,
    },
}
