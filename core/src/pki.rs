//! Development PKI: a CA per trust domain and SVIDs issued from it (ECDSA P-256).
//!
//! Used by `meshbridge pki`, by `meshbridge demo`, by the registry to sign CSRs of joining
//! agents, and by tests.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

use crate::id::{SpiffeId, validate_trust_domain_name};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    BadFile { path: PathBuf, reason: String },
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// File names inside a CA directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";

/// An SVID in PEM form.
#[derive(Clone, Debug)]
pub struct Svid {
    pub id: SpiffeId,
    pub cert_pem: String,
    pub key_pem: String,
    pub bundle_pem: String,
}

impl Svid {
    /// Write `cert.pem`, `key.pem` (0600) and `bundle.pem` into `dir`, each atomically.
    pub fn write_to(&self, dir: &Path) -> Result<(), PkiError> {
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            path: dir.into(),
            source,
        })?;
        write_atomic(&dir.join("key.pem"), self.key_pem.as_bytes(), 0o600)?;
        write_atomic(&dir.join("cert.pem"), self.cert_pem.as_bytes(), 0o644)?;
        write_atomic(&dir.join("bundle.pem"), self.bundle_pem.as_bytes(), 0o644)?;
        Ok(())
    }
}

/// A certificate authority for one trust domain.
pub struct Ca {
    trust_domain: String,
    cert_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// The longest lifetime of anything this CA issues (itself included): 100 years, far
/// beyond any sane certificate or token, and far enough from X.509's year 9999 that "now +
/// lifetime" always has a date.
pub const MAX_TTL: Duration = Duration::from_secs(36_500 * 86_400);

/// `ttl` checked: more than zero, at most [`MAX_TTL`].
fn check_ttl(ttl: Duration) -> Result<(), PkiError> {
    let reason = if ttl.is_zero() {
        "must be more than zero".to_string()
    } else if ttl > MAX_TTL {
        format!(
            "{} days is too long: at most {} days",
            ttl.as_secs() / 86_400,
            MAX_TTL.as_secs() / 86_400
        )
    } else {
        return Ok(());
    };
    Err(PkiError::Invalid {
        field: "ttl",
        reason,
    })
}

/// `now + ttl` for a certificate's end of validity, `ttl` checked.
fn not_after(now: OffsetDateTime, ttl: Duration) -> Result<OffsetDateTime, PkiError> {
    check_ttl(ttl)?;
    time::Duration::try_from(ttl)
        .ok()
        .and_then(|ttl| now.checked_add(ttl))
        .ok_or_else(|| PkiError::Invalid {
            field: "ttl",
            reason: format!("{ttl:?} from now has no date"),
        })
}

impl Ca {
    /// A new self-signed CA whose URI SAN `spiffe://<td>` names its trust domain.
    pub fn generate(trust_domain: &str, ttl: Duration) -> Result<Self, PkiError> {
        let now = OffsetDateTime::now_utc();
        Self::generate_between(
            trust_domain,
            now - time::Duration::minutes(5),
            not_after(now, ttl)?,
        )
    }

    /// [`Ca::generate`] with an explicit validity window (tests use it for expired CAs).
    pub fn generate_between(
        trust_domain: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Self, PkiError> {
        validate_trust_domain_name(trust_domain).map_err(|reason| PkiError::Invalid {
            field: "trust-domain",
            reason,
        })?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        // A distinct name per CA, so that two roots of one trust domain (during a rotation)
        // are told apart by name.
        let tag: u32 = rand::random();
        dn.push(
            DnType::CommonName,
            format!("meshbridge CA {trust_domain} {tag:08x}"),
        );
        dn.push(DnType::OrganizationName, "meshbridge");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{trust_domain}").as_str().try_into()?,
        )];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            cert_pem: cert.pem(),
            key,
        })
    }

    /// Load `ca.pem` and `ca.key` from a directory made by [`Ca::write_to`].
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(|source| PkiError::Io {
            path: cert_path.clone(),
            source,
        })?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(|source| PkiError::Io {
            path: key_path.clone(),
            source,
        })?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::BadFile {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        let certs = crate::tls::parse_certs(&cert_path, cert_pem.as_bytes()).map_err(|e| {
            PkiError::BadFile {
                path: cert_path.clone(),
                reason: e.to_string(),
            }
        })?;
        let info = certs
            .first()
            .and_then(|c| crate::tls::cert_info(c).ok())
            .ok_or_else(|| PkiError::BadFile {
                path: cert_path.clone(),
                reason: "no certificate".into(),
            })?;
        let trust_domain = info
            .spiffe_ids
            .first()
            .and_then(|u| u.strip_prefix("spiffe://"))
            .map(|s| s.trim_end_matches('/').to_string())
            .ok_or_else(|| PkiError::BadFile {
                path: cert_path.clone(),
                reason: "CA certificate has no spiffe://<trust-domain> URI SAN".into(),
            })?;
        // Check that the key is the CA's own.
        Issuer::from_ca_cert_pem(&cert_pem, &key).map_err(|e| PkiError::BadFile {
            path: cert_path.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            trust_domain,
            cert_pem,
            key,
        })
    }

    /// Write `ca.pem` and `ca.key` (0600).
    pub fn write_to(&self, dir: &Path) -> Result<(), PkiError> {
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            path: dir.into(),
            source,
        })?;
        write_atomic(
            &dir.join(CA_KEY),
            self.key.serialize_pem().as_bytes(),
            0o600,
        )?;
        write_atomic(&dir.join(CA_CERT), self.cert_pem.as_bytes(), 0o644)?;
        Ok(())
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn leaf_params(
        &self,
        id: &SpiffeId,
        dns: &[String],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<CertificateParams, PkiError> {
        if id.trust_domain() != self.trust_domain {
            return Err(PkiError::Invalid {
                field: "id",
                reason: format!(
                    "{id} is not in this CA's trust domain {:?}",
                    self.trust_domain
                ),
            });
        }
        let mut params = CertificateParams::new(dns.to_vec())?;
        params
            .subject_alt_names
            .push(SanType::URI(id.to_string().as_str().try_into()?));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "meshbridge");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }

    /// The end of this CA's own validity (unix seconds).
    pub fn not_after(&self) -> Result<i64, PkiError> {
        let invalid = |reason: String| PkiError::Invalid {
            field: "ca",
            reason,
        };
        let der = crate::tls::parse_certs(Path::new(CA_CERT), self.cert_pem.as_bytes())
            .map_err(|e| invalid(e.to_string()))?;
        let first = der
            .first()
            .ok_or_else(|| invalid("holds no certificate".into()))?;
        crate::tls::cert_info(first)
            .map(|i| i.not_after)
            .map_err(invalid)
    }

    /// The CA's end, or why it signs nothing any more.
    fn valid_until(&self, now: OffsetDateTime) -> Result<OffsetDateTime, PkiError> {
        let end = self.not_after()?;
        let at = OffsetDateTime::from_unix_timestamp(end).map_err(|e| PkiError::Invalid {
            field: "ca",
            reason: e.to_string(),
        })?;
        if at <= now {
            return Err(PkiError::Invalid {
                field: "ca",
                reason: format!(
                    "the CA expired at {}: make a new one (`meshbridge pki init`)",
                    crate::tls::rfc3339(end)
                ),
            });
        }
        Ok(at)
    }

    /// Issue an SVID valid from five minutes ago for `ttl`, but never past the CA's own end
    /// (it would fail validation from there on); refused when the CA has expired.
    pub fn issue(&self, id: &SpiffeId, ttl: Duration, dns: &[String]) -> Result<Svid, PkiError> {
        let now = OffsetDateTime::now_utc();
        let end = not_after(now, ttl)?.min(self.valid_until(now)?);
        self.issue_between(id, dns, now - time::Duration::minutes(5), end)
    }

    /// Issue an SVID with an explicit validity window (tests use it for expired certs).
    pub fn issue_between(
        &self,
        id: &SpiffeId,
        dns: &[String],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Svid, PkiError> {
        let params = self.leaf_params(id, dns, not_before, not_after)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Svid {
            id: id.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            bundle_pem: self.cert_pem.clone(),
        })
    }

    /// Sign a PEM CSR for `id` (the id is ours to choose: the CSR's own SANs are ignored).
    /// Returns the certificate PEM.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<String, PkiError> {
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| PkiError::Invalid {
                field: "csr",
                reason: e.to_string(),
            })?;
        let now = OffsetDateTime::now_utc();
        // Never past the CA's own end: the certificate would fail validation from there on.
        let end = not_after(now, ttl)?.min(self.valid_until(now)?);
        let params = self.leaf_params(id, &[], now - time::Duration::minutes(5), end)?;
        let csr = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        };
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        Ok(csr.signed_by(&issuer)?.pem())
    }
}

impl Ca {
    /// Mint a single-use join token for `site` (role `agent` or `gateway`), valid for `ttl`.
    pub fn mint_join_token(
        &self,
        site: &str,
        role: &str,
        ttl: Duration,
    ) -> Result<(crate::join::Claims, String), PkiError> {
        if !matches!(role, "agent" | "gateway") {
            return Err(PkiError::Invalid {
                field: "role",
                reason: format!("{role:?}: use agent or gateway"),
            });
        }
        SpiffeId::from_parts(&self.trust_domain, &["site", site, role]).map_err(|e| {
            PkiError::Invalid {
                field: "site",
                reason: e.to_string(),
            }
        })?;
        check_ttl(ttl)?;
        let now = OffsetDateTime::now_utc().unix_timestamp().max(0) as u64;
        let claims = crate::join::Claims {
            id: crate::join::new_id(),
            trust_domain: self.trust_domain.clone(),
            site: site.to_string(),
            role: role.to_string(),
            expires: now.saturating_add(ttl.as_secs().max(1)),
        };
        let token = crate::join::mint(&claims, &self.key).map_err(|e| PkiError::Invalid {
            field: "token",
            reason: e.to_string(),
        })?;
        Ok((claims, token))
    }

    /// Check a join token's signature (by this CA), trust domain and expiry.
    pub fn verify_join_token(
        &self,
        token: &str,
    ) -> Result<crate::join::Claims, crate::join::TokenError> {
        let now = OffsetDateTime::now_utc().unix_timestamp().max(0) as u64;
        crate::join::verify(
            token,
            &crate::join::public_spki(&self.key),
            &self.trust_domain,
            now,
        )
    }
}

/// A fresh P-256 key and a CSR for it, for joining agents. Returns (key PEM, CSR PEM).
pub fn new_csr() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let params = CertificateParams::new(Vec::<String>::new())?;
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// Write a file atomically (temp file + rename) with the given mode.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)
}

/// Parse durations like `90s`, `15m`, `24h`, `30d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 15m, 24h, 30d"))?;
    let per_unit = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
            ));
        }
    };
    n.checked_mul(per_unit)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("1y").is_err_and(|e| e.contains("unknown unit")));
        assert!(parse_duration("h").is_err());
    }

    /// Durations and lifetimes from the command line or a config: too long is an error
    /// naming the limit, never an overflow (a panic, or a silent wrap to a short TTL).
    #[test]
    fn lifetimes_too_long_are_refused_by_name() {
        let err = parse_duration("213503982334602d").unwrap_err();
        assert!(err.contains("too long"), "{err}");
        assert!(parse_duration("99999999999999999999s").is_err());
        assert_eq!(
            parse_duration("36500d"),
            Ok(Duration::from_secs(36_500 * 86_400))
        );
        let far = Duration::from_secs(3_000_000 * 86_400);
        let named = |e: PkiError| match e {
            PkiError::Invalid { field, reason } => {
                assert!(reason.contains("at most 36500 days"), "{reason}");
                field
            }
            other => panic!("{other}"),
        };
        assert_eq!(named(Ca::generate("a.example", far).unwrap_err()), "ttl");
        let ca = Ca::generate("a.example", MAX_TTL).unwrap();
        let id = SpiffeId::parse("spiffe://a.example/x").unwrap();
        assert_eq!(named(ca.issue(&id, far, &[]).unwrap_err()), "ttl");
        assert_eq!(
            named(ca.mint_join_token("east", "agent", far).unwrap_err()),
            "ttl"
        );
    }

    /// A certificate cannot outlive the CA that signed it (it fails validation from the
    /// CA's end on): issued or signed for a join or renewal, it is cut to the CA's end. An
    /// expired CA signs nothing.
    #[test]
    fn nothing_outlives_its_ca() {
        let ca = Ca::generate("a.example", Duration::from_secs(3600)).unwrap();
        let id = SpiffeId::parse("spiffe://a.example/site/x/agent").unwrap();
        let svid = ca.issue(&id, Duration::from_secs(7200), &[]).unwrap();
        let der = crate::tls::parse_certs(std::path::Path::new("svid"), svid.cert_pem.as_bytes())
            .unwrap();
        assert_eq!(
            crate::tls::cert_info(&der[0]).unwrap().not_after,
            ca.not_after().unwrap()
        );

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let pem = ca.sign_csr(&csr, &id, Duration::from_secs(86_400)).unwrap();
        let der = crate::tls::parse_certs(std::path::Path::new("leaf"), pem.as_bytes()).unwrap();
        let leaf = crate::tls::cert_info(&der[0]).unwrap();
        assert!(leaf.not_after <= ca.not_after().unwrap(), "{leaf:?}");

        let now = OffsetDateTime::now_utc();
        let expired = Ca::generate_between(
            "a.example",
            now - time::Duration::hours(2),
            now - time::Duration::hours(1),
        )
        .unwrap();
        let err = expired.issue(&id, Duration::from_secs(1), &[]).unwrap_err();
        assert!(err.to_string().contains("the CA expired at"), "{err}");
        let err = expired
            .sign_csr(&csr, &id, Duration::from_secs(60))
            .unwrap_err();
        assert!(err.to_string().contains("the CA expired at"), "{err}");
    }

    #[test]
    fn issuing_outside_the_trust_domain_is_refused() {
        let ca = Ca::generate("a.example", Duration::from_secs(3600)).unwrap();
        let other = SpiffeId::parse("spiffe://b.example/x").unwrap();
        let err = ca.issue(&other, Duration::from_secs(60), &[]).unwrap_err();
        assert!(
            err.to_string().contains("not in this CA's trust domain"),
            "{err}"
        );
    }
}
