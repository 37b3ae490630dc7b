//! The catalog model: sites, exports, policies, join tokens, and the merged view.
//!
//! Everything here is plain data and pure functions: no I/O, no clocks, no tokio.
//! The registry's Raft state machine is [`Catalog::apply`]; the same code runs on every
//! replica, so every input that depends on time (`at_ms`) is carried inside the command,
//! stamped by the leader.

mod apply;
mod merge;
mod types;

pub use apply::{Applied, Change, Command, Rejection};
pub use merge::{EndpointGroup, MergedService, PortConflict, SiteRank, rank_sites};
pub use types::*;
