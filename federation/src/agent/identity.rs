//! The agent's SVID.
//!
//! With `tls`, certificate files are someone else's business: they are loaded, checked
//! against the agent's site, and watched for changes. Otherwise the agent owns its SVID:
//! the first start (no `svid.pem` in `data_dir`) joins with the token (a key made here, a
//! CSR, the registry signs it), later starts load what is stored, and a running agent
//! renews at about half of the remaining validity over mTLS with its current SVID. The
//! token plays no part after the join; only an SVID that expired while the agent was
//! stopped needs a new one.
//!
//! Key and certificate chain share one file (`svid.pem`, 0600) replaced atomically, so a
//! crash can never leave a key beside a certificate it does not match.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use meshbridge_core::client::{ClientOptions, JoinError, RegistryClient, join};
use meshbridge_core::clock::unix_secs as now_unix;
use meshbridge_core::id::SpiffeId;
use meshbridge_core::pki::{PkiError, Svid, new_csr, write_atomic};
use meshbridge_core::tls::{Identity, TlsError, rfc3339};
use tracing::{info, warn};

use super::config::Config;

/// Why the agent has no usable identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("join_token_file {}: {error}", path.display())]
    TokenFile {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "no SVID in {} yet and no join_token to get one: create a token with `meshbridge ctl token create --site {site}` and set join_token (and bundle)",
        dir.display()
    )]
    NoToken { dir: PathBuf, site: String },
    #[error("bundle is needed to verify the registry when joining")]
    NoBundle,
    #[error("joining the mesh with join_token failed: {0}")]
    Join(JoinError),
    #[error("cannot store the SVID in {}: {error}", dir.display())]
    Store { dir: PathBuf, error: PkiError },
    #[error("{}: the certificate is for {got}, this agent is site {site:?} of trust domain {trust_domain:?}", path.display())]
    WrongId {
        path: PathBuf,
        got: String,
        site: String,
        trust_domain: String,
    },
    #[error("renewal: {0}")]
    Renew(String),
}

/// The agent's identity, and whether the agent renews it itself.
pub struct AgentIdentity {
    pub identity: Arc<Identity>,
    /// Joined (the agent renews) rather than files managed by someone else.
    pub self_managed: bool,
}

fn check_id(cfg: &Config, identity: &Identity, path: &Path) -> Result<(), IdentityError> {
    let id = identity.id();
    if id.site() == Some(cfg.site.as_str()) && id.trust_domain() == cfg.trust_domain {
        return Ok(());
    }
    Err(IdentityError::WrongId {
        path: path.to_path_buf(),
        got: id.to_string(),
        site: cfg.site.clone(),
        trust_domain: cfg.trust_domain.clone(),
    })
}

fn token(cfg: &Config) -> Result<Option<String>, IdentityError> {
    if let Some(t) = &cfg.join_token {
        return Ok(Some(t.trim().to_string()));
    }
    match &cfg.join_token_file {
        Some(path) => std::fs::read_to_string(path)
            .map(|t| Some(t.trim().to_string()))
            .map_err(|error| IdentityError::TokenFile {
                path: path.clone(),
                error,
            }),
        None => Ok(None),
    }
}

/// Write the registry's bundle, then key and chain together, each atomically.
fn store(
    cfg: &Config,
    key_pem: &str,
    cert_pem: &str,
    bundle_pem: &str,
) -> Result<(), IdentityError> {
    let files = cfg.joined_files();
    let err = |error| IdentityError::Store {
        dir: cfg.data_dir.clone(),
        error,
    };
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| {
        err(PkiError::Io {
            path: cfg.data_dir.clone(),
            source,
        })
    })?;
    write_atomic(&files.bundle, bundle_pem.as_bytes(), 0o644).map_err(err)?;
    let svid = format!("{}\n{}", key_pem.trim_end(), cert_pem);
    write_atomic(&files.cert, svid.as_bytes(), 0o600).map_err(err)
}

/// Load or obtain the agent's SVID (see the module docs).
pub async fn obtain(cfg: &Config, opts: &ClientOptions) -> Result<AgentIdentity, IdentityError> {
    if let Some(files) = &cfg.tls {
        let identity = Identity::load(files.clone())?;
        check_id(cfg, &identity, &files.cert)?;
        return Ok(AgentIdentity {
            identity,
            self_managed: false,
        });
    }
    let files = cfg.joined_files();
    let token = token(cfg)?;
    if files.cert.exists() {
        match Identity::load(files.clone()) {
            Ok(identity) => {
                check_id(cfg, &identity, &files.cert)?;
                info!(id = %identity.id(), not_after = %rfc3339(identity.cert_info().not_after), "using the SVID in data_dir");
                return Ok(AgentIdentity {
                    identity,
                    self_managed: true,
                });
            }
            Err(e @ TlsError::Expired { .. }) if token.is_some() => {
                warn!(error = %e, "the stored SVID expired; joining again with join_token");
            }
            Err(e) => return Err(e.into()),
        }
    }
    let token = token.ok_or_else(|| IdentityError::NoToken {
        dir: cfg.data_dir.clone(),
        site: cfg.site.clone(),
    })?;
    let bundle = cfg.bundle.as_ref().ok_or(IdentityError::NoBundle)?;
    let svid: Svid = join(&cfg.registry, bundle, &token, opts)
        .await
        .map_err(IdentityError::Join)?;
    store(cfg, &svid.key_pem, &svid.cert_pem, &svid.bundle_pem)?;
    let identity = Identity::load(files.clone())?;
    check_id(cfg, &identity, &files.cert)?;
    info!(id = %identity.id(), not_after = %rfc3339(identity.cert_info().not_after), dir = %cfg.data_dir.display(), "joined the mesh; SVID stored (the join token is not needed again)");
    Ok(AgentIdentity {
        identity,
        self_managed: true,
    })
}

/// When to renew: half of the validity left, but not sooner than in a second.
pub fn renew_in(not_after: i64, now: i64) -> Duration {
    let left = (not_after - now).max(0) as u64;
    Duration::from_secs((left / 2).max(1))
}

/// When to try again after a failed renewal: a tenth of what is left, 1 to 30 s.
fn retry_in(not_after: i64, now: i64) -> Duration {
    let left = (not_after - now).max(0) as u64;
    Duration::from_secs((left / 10).clamp(1, 30))
}

/// One renewal: a new key, a CSR, the registry's certificate, stored and loaded.
pub async fn renew_once(
    cfg: &Config,
    identity: &Identity,
    client: &RegistryClient,
) -> Result<(), IdentityError> {
    let (key_pem, csr_pem) =
        new_csr().map_err(|e| IdentityError::Renew(format!("cannot make a key: {e}")))?;
    let issued = client
        .renew(&csr_pem)
        .await
        .map_err(|e| IdentityError::Renew(e.to_string()))?;
    let me: SpiffeId = identity.id();
    if issued.id != me {
        return Err(IdentityError::Renew(format!(
            "the registry issued a certificate for {}, not {me}",
            issued.id
        )));
    }
    store(cfg, &key_pem, &issued.cert_pem, &issued.bundle_pem)?;
    identity.reload()?;
    Ok(())
}

/// Renew before expiry until `stop`. New handshakes use the new certificate at once;
/// established connections keep theirs.
pub async fn renew_loop(
    cfg: Config,
    identity: Arc<Identity>,
    client: RegistryClient,
    stop: impl Future<Output = ()>,
) {
    let mut stop = std::pin::pin!(stop);
    let mut wait = renew_in(identity.cert_info().not_after, now_unix());
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match renew_once(&cfg, &identity, &client).await {
            Ok(()) => {
                let info = identity.cert_info();
                info!(serial = %info.serial, not_after = %rfc3339(info.not_after), "SVID renewed");
                wait = renew_in(info.not_after, now_unix());
            }
            Err(e) => {
                let not_after = identity.cert_info().not_after;
                wait = retry_in(not_after, now_unix());
                warn!(error = %e, expires = %rfc3339(not_after), retry_in = ?wait, "SVID renewal failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_comes_at_half_of_what_is_left_and_retries_stay_bounded() {
        assert_eq!(renew_in(1_000 + 86_400, 1_000), Duration::from_secs(43_200));
        assert_eq!(renew_in(1_000 + 6, 1_000), Duration::from_secs(3));
        assert_eq!(renew_in(900, 1_000), Duration::from_secs(1));
        assert_eq!(retry_in(1_000 + 86_400, 1_000), Duration::from_secs(30));
        assert_eq!(retry_in(1_000 + 50, 1_000), Duration::from_secs(5));
        assert_eq!(retry_in(0, 1_000), Duration::from_secs(1));
    }
}
