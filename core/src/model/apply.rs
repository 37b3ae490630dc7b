//! The state machine: commands in, changes out. Deterministic; no clocks.

use serde::{Deserialize, Serialize};

use super::types::*;

/// A write to the catalog, as replicated through the Raft log.
/// Time-dependent commands carry `at_ms`, the leader's wall clock when it proposed them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Command {
    /// Register (or re-register) a site; also renews its lease.
    RegisterSite { spec: SiteSpec, at_ms: u64 },
    /// Renew a site's lease. A stale site becomes fresh again; a withdrawn one must re-register.
    Heartbeat { site: String, at_ms: u64 },
    /// Remove a site and all its exports.
    RemoveSite { site: String },
    /// Replace a site's export of a service whole (generation fencing applies).
    PutExport { export: Export },
    /// Delete a site's export. `generation` must be >= the stored one.
    DeleteExport { site: String, service: ServiceKey, generation: u64 },
    PutPolicy { policy: Policy },
    DeletePolicy { name: String },
    /// Mark a join token used (rejected if already used or expired at `at_ms`).
    UseToken { id: String, site: String, expires_ms: u64, at_ms: u64 },
    /// Leader clock tick: lapse leases, withdraw sites past their grace, forget expired tokens.
    Tick { at_ms: u64 },
}

/// One visible change, as carried by watch deltas.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "change")]
pub enum Change {
    SiteUpserted { site: Site },
    SiteRemoved { name: String },
    ExportUpserted { export: Export },
    ExportRemoved { service: ServiceKey, site: String },
    PolicyUpserted { policy: Policy },
    PolicyRemoved { name: String },
    TokenUsed { token: TokenUse },
    TokenForgotten { id: String },
}

/// What an accepted command did. `changes` may be empty (e.g. a tick with nothing to do);
/// then the revision does not move.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    pub revision: u64,
    pub changes: Vec<Change>,
}

/// Why a command was refused. Deterministic, so every replica refuses the same way;
/// the catalog is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Rejection {
    /// A field is malformed; `field` names it (`export.endpoints[3].address`).
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    /// Something the command refers to does not exist.
    #[error("{what} not found: {name}")]
    NotFound { what: String, name: String },
    /// Fencing: an older generation than the stored one.
    #[error("stale generation {got} for {service} from site {site}: stored generation is {stored}")]
    StaleGeneration { site: String, service: String, got: u64, stored: u64 },
    /// A join token that was used already or has expired.
    #[error("join token {id} refused: {reason}")]
    Token { id: String, reason: String },
}
