//! meshbridge-model: the catalog model (sites, exports, policies, join tokens, and the
//! merged view), SPIFFE ids ([`id`]), the service → VIP map ([`vip`]) and join-token
//! claims ([`token`]).
//!
//! Everything here is plain data and pure functions: no I/O, no clocks, no tokio; the
//! crate depends on serde and thiserror only, so its purity is the compiler's to keep.
//! `meshbridge_core` re-exports it as `meshbridge_core::model` (with `id` and `vip` at
//! their old paths).
//!
//! The registry's Raft state machine is [`Catalog::apply`]; the same code runs on every
//! replica, so every input that depends on time (`at_ms`) is carried inside the command,
//! stamped by the leader.

#![forbid(unsafe_code)]

pub mod id;
pub mod token;
pub mod vip;

mod apply;
mod merge;
mod types;
mod validate;

#[cfg(test)]
mod tests;

pub use apply::{
    Applied, Change, Command, LeaseStep, MAX_SITES, MAX_TOKEN_TTL_MS, Rejection, USED_TOKEN_KEEP_MS,
};
pub use merge::{
    EndpointGroup, MergedService, PortConflict, SiteRank, TypeConflict, merge_exports, rank_of,
    rank_sites,
};
pub use types::*;
pub use validate::{
    MAX_ENDPOINTS, MAX_GATEWAYS, MAX_LABEL_LEN, MAX_LOCALITY_LEN, MAX_PORTS, MAX_PRINCIPALS,
    MAX_SPIFFE_ID_LEN, MAX_SUBDOMAIN_LEN, MAX_TOKEN_ID_LEN, is_dns_label,
};
