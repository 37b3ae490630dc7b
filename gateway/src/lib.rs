//! meshbridge-gateway: the data plane. Listeners for local clients (service addresses, SNI
//! passthrough, HTTP CONNECT), the tunnel protocol between gateways, its QUIC and TCP
//! transports, endpoint choice and policy.
//!
//! Start one with [`Gateway::start`]; the [`GatewayHandle`] it returns reports the bound
//! addresses, serves the admin routes and drains.
#![forbid(unsafe_code)]

/// The wire formats live in their own pure crate ([`meshbridge_wire`]).
pub use meshbridge_wire::{connect, preamble, sni};

mod admin;
pub mod choice;
pub mod config;
mod dial;
mod gateway;
mod inbound;
pub mod metrics;
mod outbound;
pub mod policy;
pub mod pool;
pub mod quic;
mod server;
mod services;
mod shared;
pub mod snapshot;
pub mod stream;
pub mod tcp;
pub mod transport;
pub mod xds;

pub use config::{Config, DefaultAction, TransportKind};
pub use gateway::{Gateway, GatewayHandle};
pub use services::ServiceAddrs;

use std::net::SocketAddr;

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config {field}: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("cannot bind the {what} at {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Quic(#[from] quic::QuicSetupError),
}
