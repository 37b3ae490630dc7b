//! Join tokens and SVIDs, signed with the trust domain's CA (`ca_dir`):
//!
//! - `CreateJoinToken` (admins): a signed, single-use, short-lived token for one site;
//! - `Join` (no client certificate needed): token + CSR → SVID `spiffe://<td>/site/<S>/<role>`;
//!   the token is recorded as used through Raft first, so a second use is refused on every
//!   node (followers forward the call to the leader);
//! - `Renew` (site identities, over mTLS): CSR → a new SVID for the caller's own id.
//!
//! A CSR's subject and SANs are ignored: the id is always the registry's choice.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use meshbridge_core::id::SpiffeId;
use meshbridge_core::join::TokenError;
use meshbridge_core::model::{Catalog, Command, Rejection};
use meshbridge_core::pki::{Ca, PkiError};
use meshbridge_core::proto;
use meshbridge_core::tls::{Identity, cert_info, parse_certs};
use tonic::{Request, Response, Status};
use tracing::info;

use super::refused;
use crate::authz::Caller;
use crate::error::{ApiError, Attempt};
use crate::listener::Peer;
use crate::shared::{Shared, now_ms};

/// The longest validity a join token may be given (they are meant to be short-lived).
pub const MAX_TOKEN_TTL_SECS: u64 = 7 * 86_400;

/// Signs SVIDs and join tokens with the trust domain's CA.
pub struct Issuer {
    ca: Ca,
    svid_ttl: Duration,
    identity: Arc<Identity>,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("trust_domain", &self.ca.trust_domain())
            .field("svid_ttl", &self.svid_ttl)
            .finish_non_exhaustive()
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> ApiError {
    refused(Rejection::Invalid {
        field: field.into(),
        reason: reason.into(),
    })
}

fn pki_refused(e: PkiError) -> ApiError {
    match e {
        PkiError::Invalid { field, reason } => invalid(field, reason),
        other => ApiError::internal("signing failed", other),
    }
}

fn token_refused(e: TokenError, token: &str) -> ApiError {
    match e {
        TokenError::Malformed(why) => invalid("token", why),
        TokenError::Expired { id, expires } => refused(Rejection::Token {
            id,
            reason: format!(
                "expired at {} (unix {expires})",
                meshbridge_core::tls::rfc3339(expires as i64)
            ),
        }),
        other => {
            let id = meshbridge_core::join::peek(token)
                .map(|c| c.id)
                .unwrap_or_else(|_| "?".into());
            refused(Rejection::Token {
                id,
                reason: other.to_string(),
            })
        }
    }
}

fn required(field: &str, value: &str) -> Result<(), ApiError> {
    if value.trim().is_empty() {
        return Err(invalid(field, "is required"));
    }
    Ok(())
}

impl Issuer {
    /// The issuer of a node whose config names `ca_dir`; `None` without one. The CA must
    /// belong to the node's own trust domain.
    pub fn load(
        ca_dir: Option<&Path>,
        svid_ttl: Duration,
        identity: &Arc<Identity>,
    ) -> Result<Option<Self>, PkiError> {
        let Some(dir) = ca_dir else {
            return Ok(None);
        };
        let ca = Ca::load(dir)?;
        let own = identity.id();
        if ca.trust_domain() != own.trust_domain() {
            return Err(PkiError::Invalid {
                field: "ca_dir",
                reason: format!(
                    "{}: the CA is for trust domain {:?}, this node ({own}) is in {:?}",
                    dir.display(),
                    ca.trust_domain(),
                    own.trust_domain()
                ),
            });
        }
        Ok(Some(Self {
            ca,
            svid_ttl,
            identity: identity.clone(),
        }))
    }

    /// The trust bundle handed to joiners: this node's own bundle file (read now, so a
    /// rotation shows), plus the CA if the file lacks it.
    fn bundle_pem(&self) -> Result<String, ApiError> {
        let path = &self.identity.files().bundle;
        let text = std::fs::read_to_string(path)
            .map_err(|e| ApiError::internal(&path.display().to_string(), e))?;
        let have = parse_certs(path, text.as_bytes()).unwrap_or_default();
        let ca = parse_certs(Path::new("ca_dir"), self.ca.cert_pem().as_bytes())
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let mut out = text;
        if !ca.iter().all(|c| have.contains(c)) {
            if !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(self.ca.cert_pem());
        }
        Ok(out)
    }

    fn svid(&self, id: &SpiffeId, csr_pem: &str) -> Result<proto::SvidReply, ApiError> {
        let cert_pem = self
            .ca
            .sign_csr(csr_pem, id, self.svid_ttl)
            .map_err(|e| match e {
                PkiError::Invalid { reason, .. } => invalid("csr_pem", reason),
                other => pki_refused(other),
            })?;
        let not_after = parse_certs(Path::new("issued"), cert_pem.as_bytes())
            .ok()
            .and_then(|c| c.first().and_then(|d| cert_info(d).ok()))
            .map_or(0, |i| i.not_after);
        Ok(proto::SvidReply {
            spiffe_id: id.to_string(),
            cert_chain_pem: cert_pem,
            bundle_pem: self.bundle_pem()?,
            not_after_unix: not_after,
        })
    }

    pub fn create_token(
        &self,
        req: &proto::CreateJoinTokenRequest,
    ) -> Result<proto::CreateJoinTokenReply, ApiError> {
        let role = if req.role.is_empty() {
            "agent"
        } else {
            &req.role
        };
        if !meshbridge_core::model::is_dns_label(&req.site) {
            return Err(invalid(
                "site",
                format!("{:?} is not a site name (a DNS label: a-z 0-9 -)", req.site),
            ));
        }
        if req.ttl_secs == 0 || req.ttl_secs > MAX_TOKEN_TTL_SECS {
            return Err(invalid(
                "ttl_secs",
                format!("{} is out of range 1..={MAX_TOKEN_TTL_SECS}", req.ttl_secs),
            ));
        }
        let (claims, token) = self
            .ca
            .mint_join_token(&req.site, role, Duration::from_secs(req.ttl_secs))
            .map_err(pki_refused)?;
        let id = SpiffeId::from_parts(&claims.trust_domain, &["site", &claims.site, role])
            .map_err(|e| invalid("site", e.to_string()))?;
        info!(token = %claims.id, %id, expires = claims.expires, "join token created");
        Ok(proto::CreateJoinTokenReply {
            token,
            id: claims.id,
            spiffe_id: id.to_string(),
            expires_unix: claims.expires,
        })
    }

    /// Token and CSR → SVID. The token's signature, trust domain and expiry are checked
    /// here (a bad token never reaches the leader); its single use is decided by Raft.
    pub async fn join(
        &self,
        shared: &Shared,
        req: Request<proto::JoinRequest>,
    ) -> Result<Response<proto::SvidReply>, Status> {
        let r = req.get_ref();
        required("token", &r.token)?;
        required("csr_pem", &r.csr_pem)?;
        let claims = self
            .ca
            .verify_join_token(&r.token)
            .map_err(|e| token_refused(e, &r.token))?;
        let id = SpiffeId::from_parts(
            self.ca.trust_domain(),
            &["site", &claims.site, &claims.role],
        )
        .map_err(|e| invalid("token", format!("grants no valid id: {e}")))?;
        let csr = r.csr_pem.clone();
        let addr = req.extensions().get::<Peer>().map(|p| p.addr);
        let local = || async {
            // Sign first: a bad CSR must not burn the token.
            let svid = self.svid(&id, &csr)?;
            shared
                .propose(Command::UseToken {
                    id: claims.id.clone(),
                    site: claims.site.clone(),
                    expires_ms: claims.expires.saturating_mul(1000),
                    at_ms: now_ms(),
                })
                .await?;
            info!(token = %claims.id, %id, client.addr = ?addr, "site joined with a token");
            Ok::<_, Attempt>(svid)
        };
        shared
            .on_leader(
                "Join",
                req,
                local,
                |mut c, r| async move { c.join(r).await },
            )
            .await
    }

    /// A new SVID for the caller's own id.
    pub fn renew(
        &self,
        caller: &Caller,
        req: &proto::RenewRequest,
    ) -> Result<proto::SvidReply, ApiError> {
        let Caller::Site { id, .. } = caller else {
            return Err(ApiError::forbidden(format!(
                "{} may not renew here: only site identities (spiffe://<td>/site/<site>/...) renew their own SVID",
                caller.id()
            )));
        };
        if id.trust_domain() != self.ca.trust_domain() {
            return Err(ApiError::forbidden(format!(
                "{id} is not in this registry's trust domain {:?}",
                self.ca.trust_domain()
            )));
        }
        required("csr_pem", &req.csr_pem)?;
        let svid = self.svid(id, &req.csr_pem)?;
        info!(%id, not_after = svid.not_after_unix, "SVID renewed");
        Ok(svid)
    }
}

/// Whether `site`'s identity `id` may renew its SVID, as this node's catalog says: only a
/// site that is registered and not revoked. (Renewal would otherwise never end: an agent of
/// a removed site would keep a valid SVID forever.)
pub fn may_renew(catalog: &Catalog, site: &str, id: &SpiffeId) -> Result<(), ApiError> {
    if let Some(revision) = catalog.revoked_sites.get(site) {
        return Err(refused(Rejection::Revoked {
            site: site.to_owned(),
            revision: *revision,
        }));
    }
    if catalog.site(site).is_none() {
        return Err(ApiError::forbidden(format!(
            "{id} may not renew: site {site:?} is not registered (removed, or never registered)"
        )));
    }
    Ok(())
}

/// The issuer, or why there is none.
pub fn need(issuer: Option<&Arc<Issuer>>) -> Result<&Issuer, ApiError> {
    issuer.map(|i| &**i).ok_or_else(|| {
        ApiError::Precondition(
            "this registry node has no ca_dir configured: it cannot mint join tokens or issue SVIDs"
                .into(),
        )
    })
}
