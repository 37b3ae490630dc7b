//! The catalog model: sites, exports, policies, join tokens, and the merged view.
//!
//! Everything here is plain data and pure functions: no I/O, no clocks, no tokio.
//! The registry's Raft state machine is [`Catalog::apply`]; the same code runs on every
//! replica, so every input that depends on time (`at_ms`) is carried inside the command,
//! stamped by the leader.

mod apply;
mod merge;
mod types;
mod validate;

#[cfg(test)]
mod tests;

pub use apply::{
    Applied, Change, Command, MAX_SITES, MAX_TOKEN_TTL_MS, Rejection, USED_TOKEN_KEEP_MS,
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
