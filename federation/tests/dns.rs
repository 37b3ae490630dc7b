//! The federated DNS server: real packets over real sockets (hickory's client and stub
//! resolver, and raw UDP and TCP for what a client would not send), and the pure message
//! path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "dns/conformance.rs"]
mod conformance;
#[path = "dns/fixture.rs"]
mod fixture;
#[path = "dns/lifecycle.rs"]
mod lifecycle;
#[path = "dns/negative.rs"]
mod negative;
#[path = "dns/pure.rs"]
mod pure;
#[path = "dns/records.rs"]
mod records;
#[path = "dns/resolver.rs"]
mod resolver;
#[path = "dns/transport.rs"]
mod transport;
