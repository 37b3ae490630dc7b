//! Join-token claims: what a token grants. The token format, its signature and its checks
//! are `meshbridge_core::join`'s; single use is the catalog's (`Command::UseToken`).

use serde::{Deserialize, Serialize};

/// What a token grants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Random id; recorded when used.
    pub id: String,
    pub trust_domain: String,
    /// The site the joiner becomes; its SVID will be `spiffe://<td>/site/<site>/<role>`.
    pub site: String,
    /// `agent` or `gateway`.
    pub role: String,
    /// Unix seconds.
    pub expires: u64,
}
