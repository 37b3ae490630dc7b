//! Identity and TLS: SPIFFE SVIDs from files, per-trust-domain bundles, mutual TLS 1.3
//! configs for rustls (and so quinn and tonic), allow-lists, hot reload.

mod accept;
mod files;
mod identity;
mod trust;
mod verify;

pub use accept::{AcceptLimits, Handshake, HandshakeError, handshakes};
pub use files::{
    CertInfo, TlsError, cert_info, check_svid, expiring, load_certs, load_key, parse_certs,
    rfc3339, time_left,
};
pub use identity::{Identity, IdentityFiles, peer_id};
pub use trust::{BundleSource, PeerRejected, TrustStore};
pub use verify::{AllowList, AllowRule, SpiffeVerifier, describe, rejection};
