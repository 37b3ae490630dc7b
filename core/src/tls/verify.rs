//! rustls verifiers that check SPIFFE SVIDs against per-trust-domain roots and an
//! allow-list, during the handshake.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::trust::{PeerRejected, TrustStore};
use crate::id::SpiffeId;

/// One rule of an allow-list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowRule {
    /// Any identity of any trusted trust domain.
    Any,
    /// Exactly this id.
    Id(SpiffeId),
    /// Ids under this prefix by whole path segments (`spiffe://td/site/`, or
    /// `spiffe://td/site/east`, which does not cover `.../site/east-evil`).
    Prefix(String),
    /// Any id of this trust domain.
    TrustDomain(String),
}

impl AllowRule {
    /// `*` → any; `spiffe://td` → the trust domain; `spiffe://td/a/*` or ending in `/` → a
    /// prefix; anything else must be an exact SPIFFE id.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "*" {
            return Ok(Self::Any);
        }
        if let Some(prefix) = s
            .strip_suffix('*')
            .or_else(|| s.ends_with('/').then_some(s))
        {
            SpiffeId::parse(prefix.trim_end_matches('/'))
                .map_err(|e| format!("allow rule {s:?}: {e}"))?;
            return Ok(Self::Prefix(prefix.to_string()));
        }
        let id = SpiffeId::parse(s).map_err(|e| format!("allow rule {s:?}: {e}"))?;
        if id.path().is_empty() {
            Ok(Self::TrustDomain(id.trust_domain().to_string()))
        } else {
            Ok(Self::Id(id))
        }
    }

    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Any => true,
            Self::Id(want) => want == id,
            Self::Prefix(p) => id.has_prefix(p),
            Self::TrustDomain(td) => id.trust_domain() == td,
        }
    }
}

impl fmt::Display for AllowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Id(id) => write!(f, "{id}"),
            Self::Prefix(p) => write!(f, "{p}*"),
            Self::TrustDomain(td) => write!(f, "spiffe://{td}"),
        }
    }
}

/// Which peer identities a TLS endpoint accepts. Empty means nobody.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList(pub Vec<AllowRule>);

impl AllowList {
    pub fn any() -> Self {
        Self(vec![AllowRule::Any])
    }

    pub fn parse<S: AsRef<str>>(rules: &[S]) -> Result<Self, String> {
        rules
            .iter()
            .map(|r| AllowRule::parse(r.as_ref()))
            .collect::<Result<_, _>>()
            .map(Self)
    }

    pub fn allows(&self, id: &SpiffeId) -> bool {
        self.0.iter().any(|r| r.matches(id))
    }

    fn check(&self, id: SpiffeId) -> Result<SpiffeId, PeerRejected> {
        if self.allows(&id) {
            Ok(id)
        } else {
            let allowed = self
                .0
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            Err(PeerRejected::NotAllowed {
                id: id.to_string(),
                allowed,
            })
        }
    }
}

fn to_rustls(e: PeerRejected) -> rustls::Error {
    tracing::debug!(reason = %e, "peer certificate refused");
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Find the reason our verifier refused a peer inside an error chain (an `io::Error` from a
/// handshake, a quinn connection error...).
pub fn rejection(err: &(dyn std::error::Error + 'static)) -> Option<PeerRejected> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) =
            e.downcast_ref::<rustls::Error>()
            && let Some(p) = other.0.downcast_ref::<PeerRejected>()
        {
            return Some(p.clone());
        }
        if let Some(p) = e.downcast_ref::<PeerRejected>() {
            return Some(p.clone());
        }
        // io::Error hides its inner error from `source()`; look inside it explicitly.
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            && let Some(p) = rejection(inner)
        {
            return Some(p);
        }
        cur = e.source();
    }
    None
}

/// A readable description of a TLS failure: our verifier's reason when there is one.
pub fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    match rejection(err) {
        Some(p) => p.to_string(),
        None => err.to_string(),
    }
}

/// Verifies SVIDs of peers (either side of the handshake).
#[derive(Debug)]
pub struct SpiffeVerifier {
    trust: Arc<ArcSwap<TrustStore>>,
    allow: AllowList,
    algs: WebPkiSupportedAlgorithms,
    client_auth_mandatory: bool,
}

impl SpiffeVerifier {
    pub fn new(trust: Arc<ArcSwap<TrustStore>>, allow: AllowList) -> Self {
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        Self {
            trust,
            allow,
            algs,
            client_auth_mandatory: true,
        }
    }

    /// As a server verifier: let clients without a certificate finish the handshake (the
    /// application then allows them only what needs no identity, such as joining with a
    /// token). A client that does present one is still fully checked.
    pub fn with_optional_client_auth(mut self) -> Self {
        self.client_auth_mandatory = false;
        self
    }

    /// Full check, as done in the handshake; also usable on its own.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        client: bool,
    ) -> Result<SpiffeId, PeerRejected> {
        let id = self
            .trust
            .load()
            .verify_peer(end_entity, intermediates, now, client)?;
        self.allow.check(id)
    }
}

/// The handshake-signature half of both verifier traits: the same for clients and servers.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}

impl ClientCertVerifier for SpiffeVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.client_auth_mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now, true)
            .map_err(to_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures!();
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // SPIFFE authenticates by id, not by host name: the name is not checked.
        self.verify(end_entity, intermediates, now, false)
            .map_err(to_rustls)?;
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}
