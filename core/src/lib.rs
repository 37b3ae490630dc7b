//! meshbridge-core: identities, the catalog model and its merge rules, TLS, PKI and the
//! runtime pieces every role embeds (config, drain, telemetry, admin HTTP).
#![forbid(unsafe_code)]

pub mod admin;
pub mod backoff;
pub mod client;
pub mod clock;
pub mod config;
pub mod drain;
pub mod join;
pub mod pki;
pub mod ports;
pub mod proto;
pub mod runtime;
pub mod sync;
pub mod telemetry;
pub mod tls;

/// The catalog model, ids and VIPs live in their own pure crate ([`meshbridge_model`]).
pub use meshbridge_model as model;
pub use meshbridge_model::{id, vip};

/// Install the process-wide rustls crypto provider (ring). Call at the start of `main`
/// and of tests; calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
