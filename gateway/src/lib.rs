//! meshbridge-gateway: the data plane. Listeners for local clients (service addresses, SNI
//! passthrough, HTTP CONNECT), the tunnel protocol between gateways, its QUIC and TCP
//! transports, endpoint choice and policy.
#![forbid(unsafe_code)]

pub mod connect;
pub mod preamble;
pub mod sni;
