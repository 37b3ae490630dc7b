//! Join tokens and SVIDs from the registry: minting a token (admins), joining with one
//! (no certificate yet: the registry is verified against a trust bundle file, and the
//! client presents none), and renewing an SVID over mTLS with the current one.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rustls::ClientConfig;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use super::{
    ALPN_H2, ChannelOptions, ClientError, ClientOptions, MAX_MESSAGE_BYTES, MtlsConnector,
    RegistryClient, endpoint_uri, retryable, status_error,
};
use crate::id::SpiffeId;
use crate::join::{Claims, TokenError, peek};
use crate::pki::{PkiError, Svid, new_csr};
use crate::proto::{self, registry_client::RegistryClient as Grpc};
use crate::tls::{AllowList, AllowRule, BundleSource, SpiffeVerifier, TlsError, TrustStore};

/// A join token as minted by the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinToken {
    pub token: String,
    pub id: String,
    /// The id the token grants: `spiffe://<td>/site/<site>/<role>`.
    pub spiffe_id: String,
    /// Unix seconds.
    pub expires_unix: u64,
}

/// A certificate issued by the registry for a key the caller holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    pub id: SpiffeId,
    pub cert_pem: String,
    pub bundle_pem: String,
    /// Unix seconds.
    pub not_after: i64,
}

/// Why joining failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("join token grants no valid SPIFFE id: {0}")]
    TokenId(String),
    #[error("trust bundle: {error}")]
    Bundle { error: TlsError },
    #[error("cannot make a key and CSR: {0}")]
    Csr(PkiError),
    #[error(transparent)]
    Registry(#[from] ClientError),
    #[error("the registry issued a certificate for {got}, the token grants {want}")]
    WrongId { got: String, want: String },
}

fn issued(method: &'static str, r: proto::SvidReply) -> Result<Issued, ClientError> {
    let id = SpiffeId::parse(&r.spiffe_id).map_err(|e| ClientError::Status {
        method,
        code: Code::Internal,
        message: format!("the registry answered an invalid id: {e}"),
    })?;
    Ok(Issued {
        id,
        cert_pem: r.cert_chain_pem,
        bundle_pem: r.bundle_pem,
        not_after: r.not_after_unix,
    })
}

impl RegistryClient {
    /// Mint a single-use join token for `site` (`role`: `agent` or `gateway`). Admins only;
    /// the registry needs its `ca_dir`.
    pub async fn create_join_token(
        &self,
        site: &str,
        role: &str,
        ttl: Duration,
    ) -> Result<JoinToken, ClientError> {
        let req = proto::CreateJoinTokenRequest {
            site: site.into(),
            role: role.into(),
            ttl_secs: ttl.as_secs().max(1),
        };
        let r = self
            .call("CreateJoinToken", |mut c| {
                let req = req.clone();
                async move { c.create_join_token(req).await }
            })
            .await?;
        Ok(JoinToken {
            token: r.token,
            id: r.id,
            spiffe_id: r.spiffe_id,
            expires_unix: r.expires_unix,
        })
    }

    /// A new certificate for this client's own id, for the key behind `csr_pem`.
    pub async fn renew(&self, csr_pem: &str) -> Result<Issued, ClientError> {
        let req = proto::RenewRequest {
            csr_pem: csr_pem.into(),
        };
        let r = self
            .call("Renew", |mut c| {
                let req = req.clone();
                async move { c.renew(req).await }
            })
            .await?;
        issued("Renew", r)
    }
}

/// A TLS client config that verifies registry nodes of `claims`' trust domain against the
/// bundle file, and presents no certificate.
fn server_only_config(bundle: &Path, trust_domain: &str) -> Result<ClientConfig, JoinError> {
    let source = BundleSource {
        path: bundle.to_path_buf(),
        trust_domain: None,
    };
    let store =
        TrustStore::load(&[source], trust_domain).map_err(|error| JoinError::Bundle { error })?;
    let allow = AllowList(vec![AllowRule::Prefix(format!(
        "spiffe://{trust_domain}/registry/"
    ))]);
    let verifier = SpiffeVerifier::new(Arc::new(ArcSwap::from_pointee(store)), allow);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap_or_else(|_| {
            ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        });
    let mut cfg = builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(cfg)
}

/// A channel to the registry node at `url` that verifies it against `bundle` (a registry
/// id of `trust_domain`) and presents no client certificate: all a joiner can use, and
/// the registry serves it `Join` only.
pub fn anonymous_channel(
    url: &str,
    bundle: &Path,
    trust_domain: &str,
    opts: &ChannelOptions,
) -> Result<Channel, JoinError> {
    let tls = server_only_config(bundle, trust_domain)?;
    Ok(channel(url, &tls, opts)?)
}

fn channel(url: &str, tls: &ClientConfig, opts: &ChannelOptions) -> Result<Channel, ClientError> {
    let uri = endpoint_uri(url)?;
    let connector = MtlsConnector::with_config(tls.clone(), opts.connect_timeout);
    Ok(Endpoint::from(uri)
        .http2_keep_alive_interval(opts.keepalive_interval)
        .keep_alive_timeout(opts.keepalive_timeout)
        .keep_alive_while_idle(true)
        .connect_with_connector_lazy(connector))
}

/// Join the mesh: generate a key, send `token` with a CSR for it to a registry node in
/// `urls` (verified against the CA certificates in `bundle`), and return the SVID with the
/// registry's trust bundle. Nodes that cannot serve the call are tried in turn until
/// `opts.retry_deadline`; a refused token is final.
pub async fn join(
    urls: &[String],
    bundle: &Path,
    token: &str,
    opts: &ClientOptions,
) -> Result<Svid, JoinError> {
    if urls.is_empty() {
        return Err(ClientError::NoUrls.into());
    }
    let claims: Claims = peek(token)?;
    let want = SpiffeId::from_parts(&claims.trust_domain, &["site", &claims.site, &claims.role])
        .map_err(|e| JoinError::TokenId(e.to_string()))?;
    let tls = server_only_config(bundle, &claims.trust_domain)?;
    let (key_pem, csr_pem) = new_csr().map_err(JoinError::Csr)?;
    let req = proto::JoinRequest {
        token: token.trim().into(),
        csr_pem,
    };
    let start = Instant::now();
    let mut attempts = 0u32;
    let mut node = 0usize;
    loop {
        attempts += 1;
        let url = &urls[node % urls.len()];
        let mut grpc = Grpc::new(channel(url, &tls, &opts.channel)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let last = match tokio::time::timeout(opts.attempt_timeout, grpc.join(req.clone())).await {
            Ok(Ok(reply)) => {
                let got = issued("Join", reply.into_inner())?;
                if got.id != want {
                    return Err(JoinError::WrongId {
                        got: got.id.to_string(),
                        want: want.to_string(),
                    });
                }
                return Ok(Svid {
                    id: got.id,
                    cert_pem: got.cert_pem,
                    key_pem,
                    bundle_pem: got.bundle_pem,
                });
            }
            Ok(Err(status)) if !retryable(status.code()) => {
                return Err(status_error("Join", status).into());
            }
            Ok(Err(status)) => format!("{url}: {:?}: {}", status.code(), status.message()),
            Err(_) => format!("{url}: no answer in {:?}", opts.attempt_timeout),
        };
        tracing::debug!(attempt = attempts, error = %last, "join attempt failed; trying the next node");
        let elapsed = start.elapsed();
        let pause =
            crate::backoff::exponential(opts.backoff_initial, opts.backoff_max, attempts.min(6));
        if elapsed + pause >= opts.retry_deadline {
            return Err(ClientError::Unavailable {
                method: "Join",
                attempts,
                elapsed,
                last,
            }
            .into());
        }
        node += 1;
        tokio::time::sleep(pause).await;
    }
}
