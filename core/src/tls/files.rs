//! Reading PEM files: certificate chains, private keys, trust bundles. Every error names
//! the file and what is wrong with it.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::id::SpiffeId;

/// A problem with a TLS file. Always names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: no {what} found (is it a PEM file?)", path.display())]
    NoPem { path: PathBuf, what: &'static str },
    #[error("{}: bad PEM: {reason}", path.display())]
    BadPem { path: PathBuf, reason: String },
    #[error("{}: not a usable certificate: {reason}", path.display())]
    BadCert { path: PathBuf, reason: String },
    #[error("{}: unsupported private key: {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error("{}: private key does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("{}: certificate has no spiffe:// URI SAN", path.display())]
    NoSpiffeId { path: PathBuf },
    #[error("{}: certificate expired at {not_after}", path.display())]
    Expired { path: PathBuf, not_after: String },
    #[error("{}: certificate is not valid before {not_before}", path.display())]
    NotYetValid { path: PathBuf, not_before: String },
    #[error("{}: {reason}", path.display())]
    Bundle { path: PathBuf, reason: String },
}

/// What one certificate says, as shown by `pki inspect` and `ctl status`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CertInfo {
    pub subject: String,
    pub issuer: String,
    pub spiffe_ids: Vec<String>,
    pub dns_names: Vec<String>,
    pub is_ca: bool,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    pub serial: String,
}

/// Longest warning before a certificate's end.
const MAX_EXPIRY_WARNING_SECS: i64 = 7 * 86400;

/// How long before its end a certificate counts as expiring: a third of its lifetime, at
/// most 7 days (7 days when its start is unknown, `not_before` 0). A certificate renewed at
/// half of what is left (as agents renew their SVIDs) never gets there unless its renewal
/// failed, so short-lived SVIDs are not a standing alarm.
fn expiry_warning_secs(not_before: i64, not_after: i64) -> i64 {
    let lifetime = not_after.saturating_sub(not_before);
    if not_before <= 0 || lifetime <= 0 {
        return MAX_EXPIRY_WARNING_SECS;
    }
    (lifetime / 3).min(MAX_EXPIRY_WARNING_SECS)
}

/// Whether a certificate valid from `not_before` to `not_after` (unix seconds) is expired or
/// expiring at `now`: what `ctl status` and a node's `/ui` list as problems.
pub fn expiring(not_before: i64, not_after: i64, now: i64) -> bool {
    not_after.saturating_sub(now) < expiry_warning_secs(not_before, not_after)
}

/// `secs` of validity left, in words: days from two days on, else hours, else minutes.
pub fn time_left(secs: i64) -> String {
    match secs {
        s if s >= 2 * 86400 => format!("{} days", s / 86400),
        s if s >= 3600 => format!("{} h", s / 3600),
        s => format!("{} min", (s / 60).max(0)),
    }
}

impl CertInfo {
    /// Seconds of validity left at `now` (negative when expired).
    pub fn seconds_left(&self, now_unix: i64) -> i64 {
        self.not_after - now_unix
    }

    /// The single SPIFFE id of an SVID.
    pub fn spiffe_id(&self) -> Option<SpiffeId> {
        self.spiffe_ids.iter().find_map(|s| SpiffeId::parse(s).ok())
    }
}

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Parse every certificate in a PEM buffer; at least one is required.
pub fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let mut out = Vec::new();
    for item in CertificateDer::pem_slice_iter(pem) {
        let der = item.map_err(|e| TlsError::BadPem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        out.push(der);
    }
    if out.is_empty() {
        return Err(TlsError::NoPem {
            path: path.to_path_buf(),
            what: "CERTIFICATE block",
        });
    }
    for (i, der) in out.iter().enumerate() {
        X509Certificate::from_der(der).map_err(|e| TlsError::BadCert {
            path: path.to_path_buf(),
            reason: format!("certificate #{}: {e}", i + 1),
        })?;
    }
    Ok(out)
}

/// Read every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    parse_certs(path, &read(path)?)
}

/// Read a private key (PKCS#8, SEC1 or PKCS#1) from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoPem {
            path: path.to_path_buf(),
            what: "PRIVATE KEY block",
        },
        other => TlsError::BadPem {
            path: path.to_path_buf(),
            reason: other.to_string(),
        },
    })
}

/// Describe a DER certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let mut spiffe_ids = Vec::new();
    let mut dns_names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) if u.starts_with("spiffe://") => spiffe_ids.push(u.to_string()),
                GeneralName::DNSName(d) => dns_names.push(d.to_string()),
                _ => {}
            }
        }
    }
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        spiffe_ids,
        dns_names,
        is_ca: cert.is_ca(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        serial: cert.raw_serial_as_string(),
    })
}

/// Format unix seconds as RFC 3339 UTC.
pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

pub(crate) use crate::clock::unix_secs as now_unix;

/// Check an SVID leaf: it carries exactly one SPIFFE id and is valid now.
pub fn check_svid(
    path: &Path,
    leaf: &CertificateDer<'_>,
) -> Result<(SpiffeId, CertInfo), TlsError> {
    let info = cert_info(leaf).map_err(|reason| TlsError::BadCert {
        path: path.to_path_buf(),
        reason,
    })?;
    let id = match info.spiffe_ids.as_slice() {
        [] => {
            return Err(TlsError::NoSpiffeId {
                path: path.to_path_buf(),
            });
        }
        [one] => SpiffeId::parse(one).map_err(|e| TlsError::BadCert {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?,
        many => {
            return Err(TlsError::BadCert {
                path: path.to_path_buf(),
                reason: format!(
                    "an SVID carries exactly one SPIFFE id, found {}",
                    many.len()
                ),
            });
        }
    };
    let now = now_unix();
    if info.not_after < now {
        return Err(TlsError::Expired {
            path: path.to_path_buf(),
            not_after: rfc3339(info.not_after),
        });
    }
    if info.not_before > now + 300 {
        return Err(TlsError::NotYetValid {
            path: path.to_path_buf(),
            not_before: rfc3339(info.not_before),
        });
    }
    Ok((id, info))
}
