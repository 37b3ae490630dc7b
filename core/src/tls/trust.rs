//! Trust bundles per trust domain, and verification of a peer's SVID chain.

use std::collections::BTreeMap;
use std::path::Path;

use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use webpki::{EndEntityCert, KeyUsage};

use super::files::{TlsError, cert_info, load_certs, rfc3339};
use crate::id::{SpiffeId, validate_trust_domain_name};

/// Why a peer's certificate was refused. Each case reads distinctly in logs.
// Debug prints the readable reason too: TLS stacks that only keep a string of the error
// (quinn's handshake failures) format it with `{:?}`, and that is what operators then see.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerRejected {
    #[error("peer certificate has no SPIFFE id (URI SAN spiffe://...)")]
    NoSpiffeId,
    #[error("peer certificate carries {count} SPIFFE ids ({ids}); an X.509-SVID has exactly one")]
    SeveralSpiffeIds { count: usize, ids: String },
    #[error("peer {id}: trust domain {trust_domain:?} is not trusted here (trusted: {trusted})")]
    UntrustedDomain {
        id: String,
        trust_domain: String,
        trusted: String,
    },
    #[error(
        "peer {id}: certificate is not signed by a trusted root of trust domain {trust_domain:?} (unknown issuer)"
    )]
    UnknownIssuer { id: String, trust_domain: String },
    #[error("peer {id}: certificate expired at {not_after}")]
    Expired { id: String, not_after: String },
    #[error("peer {id}: certificate not valid before {not_before}")]
    NotYetValid { id: String, not_before: String },
    #[error("peer {id}: SPIFFE id is not on the allow-list ({allowed})")]
    NotAllowed { id: String, allowed: String },
    #[error("peer {id}: invalid certificate: {reason}")]
    Invalid { id: String, reason: String },
}

impl std::fmt::Debug for PeerRejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// CA roots, grouped by the trust domain they vouch for.
#[derive(Debug, Default)]
pub struct TrustStore {
    domains: BTreeMap<String, Vec<TrustAnchor<'static>>>,
    /// The earliest `not_after` (unix seconds) among the CA certificates loaded.
    earliest_not_after: Option<i64>,
}

/// A bundle file and, where its CA certificates do not name their trust domain in a
/// `spiffe://<td>` URI SAN, the trust domain it stands for.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BundleSource {
    pub path: std::path::PathBuf,
    #[serde(default)]
    pub trust_domain: Option<String>,
}

impl TrustStore {
    /// Load bundles. Every CA certificate of a bundle belongs to the bundle's configured
    /// `trust_domain` (by default `default_td`, the process's own), and to no other: a CA
    /// whose own `spiffe://<td>` URI SAN names another trust domain is refused with the file
    /// named, so a partner's bundle can never yield roots for our domain (or a third one);
    /// so is a CA certificate with several SPIFFE URIs.
    pub fn load(sources: &[BundleSource], default_td: &str) -> Result<Self, TlsError> {
        let mut store = TrustStore::default();
        for src in sources {
            store.add_file(&src.path, src.trust_domain.as_deref().unwrap_or(default_td))?;
        }
        Ok(store)
    }

    fn add_file(&mut self, path: &Path, bundle_td: &str) -> Result<(), TlsError> {
        let certs = load_certs(path)?;
        for (i, der) in certs.into_iter().enumerate() {
            let info = cert_info(&der).map_err(|reason| TlsError::Bundle {
                path: path.to_path_buf(),
                reason: format!("certificate #{}: {reason}", i + 1),
            })?;
            if !info.is_ca {
                return Err(TlsError::Bundle {
                    path: path.to_path_buf(),
                    reason: format!(
                        "certificate #{} ({}) is not a CA certificate",
                        i + 1,
                        info.subject
                    ),
                });
            }
            let bad = |reason: String| TlsError::Bundle {
                path: path.to_path_buf(),
                reason: format!("certificate #{} ({}): {reason}", i + 1, info.subject),
            };
            match info.spiffe_ids.as_slice() {
                [] => {}
                [uri] => {
                    let named = uri
                        .strip_prefix("spiffe://")
                        .map(|rest| rest.split('/').next().unwrap_or_default())
                        .unwrap_or_default();
                    if named != bundle_td {
                        return Err(bad(format!(
                            "names trust domain {named:?} but the bundle is configured for \
                             {bundle_td:?}; a bundle's CAs vouch for its own trust domain only \
                             (set `trust_domain` on a federated bundle)"
                        )));
                    }
                }
                many => {
                    return Err(bad(format!(
                        "carries {} SPIFFE URIs ({}); a CA of a bundle names at most one",
                        many.len(),
                        many.join(", ")
                    )));
                }
            }
            let td = bundle_td.to_string();
            validate_trust_domain_name(&td).map_err(bad)?;
            let anchor = webpki::anchor_from_trusted_cert(&der)
                .map_err(|e| TlsError::Bundle {
                    path: path.to_path_buf(),
                    reason: format!("certificate #{}: not usable as a trust anchor: {e}", i + 1),
                })?
                .to_owned();
            self.domains.entry(td).or_default().push(anchor);
            self.earliest_not_after = Some(
                self.earliest_not_after
                    .map_or(info.not_after, |e| e.min(info.not_after)),
            );
        }
        Ok(())
    }

    /// When the first of the bundles' CA certificates expires (unix seconds).
    pub fn earliest_not_after(&self) -> Option<i64> {
        self.earliest_not_after
    }

    /// Trust domains with at least one root.
    pub fn trust_domains(&self) -> Vec<String> {
        self.domains.keys().cloned().collect()
    }

    /// Verify a peer's chain for the given usage and return its SPIFFE id.
    pub fn verify_peer(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        client: bool,
    ) -> Result<SpiffeId, PeerRejected> {
        let info = cert_info(end_entity).map_err(|reason| PeerRejected::Invalid {
            id: "<unparsable>".into(),
            reason,
        })?;
        let id = match info.spiffe_ids.as_slice() {
            [] => return Err(PeerRejected::NoSpiffeId),
            [one] => SpiffeId::parse(one).map_err(|e| PeerRejected::Invalid {
                id: one.clone(),
                reason: format!("malformed SPIFFE id: {e}"),
            })?,
            many => {
                return Err(PeerRejected::SeveralSpiffeIds {
                    count: many.len(),
                    ids: many.join(", "),
                });
            }
        };
        let td = id.trust_domain().to_string();
        let Some(anchors) = self.domains.get(&td) else {
            return Err(PeerRejected::UntrustedDomain {
                id: id.to_string(),
                trust_domain: td,
                trusted: self.trust_domains().join(", "),
            });
        };
        let cert = EndEntityCert::try_from(end_entity).map_err(|e| PeerRejected::Invalid {
            id: id.to_string(),
            reason: e.to_string(),
        })?;
        let usage = if client {
            KeyUsage::client_auth()
        } else {
            KeyUsage::server_auth()
        };
        let verify = |anchors: &[TrustAnchor<'_>]| {
            cert.verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                anchors,
                intermediates,
                now,
                usage,
                None,
                None,
            )
            .map(|_| ())
        };
        let mut result = verify(anchors);
        // During a rotation two roots may share a subject name; webpki stops at the first
        // root whose name matches, so try the roots one by one before giving up.
        if matches!(result, Err(webpki::Error::InvalidSignatureForPublicKey)) && anchors.len() > 1 {
            for one in anchors.chunks(1) {
                let r = verify(one);
                if r.is_ok() {
                    result = r;
                    break;
                }
            }
        }
        match result {
            Ok(_) => Ok(id),
            Err(webpki::Error::CertExpired { .. }) => Err(PeerRejected::Expired {
                id: id.to_string(),
                not_after: rfc3339(info.not_after),
            }),
            Err(webpki::Error::CertNotValidYet { .. }) => Err(PeerRejected::NotYetValid {
                id: id.to_string(),
                not_before: rfc3339(info.not_before),
            }),
            Err(webpki::Error::UnknownIssuer) => Err(PeerRejected::UnknownIssuer {
                id: id.to_string(),
                trust_domain: td,
            }),
            Err(e) => Err(PeerRejected::Invalid {
                id: id.to_string(),
                reason: format!("{e:?}"),
            }),
        }
    }
}
