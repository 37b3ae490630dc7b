//! Join tokens: short-lived, single-use, signed credentials that let a new VM agent (or
//! gateway) obtain its first SVID from the registry by CSR.
//!
//! Format: `mbjt1.<claims>.<signature>`, both parts base64url without padding. The claims
//! are JSON ([`Claims`]); the signature is ECDSA P-256 / SHA-256 (ASN.1 DER) by the trust
//! domain's CA key over the bytes `mbjt1.<claims>`. Anyone with the CA certificate can check
//! a token; only the registry, which holds the CA key, can mint one. Single use is enforced
//! by the replicated state machine (`Command::UseToken`), expiry by the claims.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use rcgen::{KeyPair, PublicKeyData, SigningKey};

const PREFIX: &str = "mbjt1";

pub use meshbridge_model::token::Claims;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("join token is malformed: {0}")]
    Malformed(&'static str),
    #[error(
        "join token signature does not verify against the CA of trust domain {0:?} (forged, or minted by another CA)"
    )]
    BadSignature(String),
    #[error("join token {id} expired at unix time {expires}")]
    Expired { id: String, expires: u64 },
    #[error("join token is for trust domain {got:?}, this registry serves {want:?}")]
    WrongTrustDomain { got: String, want: String },
    #[error("cannot sign join token: {0}")]
    Sign(String),
}

/// Mint a token signed by `ca_key`.
pub fn mint(claims: &Claims, ca_key: &KeyPair) -> Result<String, TokenError> {
    let json = serde_json::to_vec(claims).map_err(|e| TokenError::Sign(e.to_string()))?;
    let signed = format!("{PREFIX}.{}", B64.encode(json));
    let sig = ca_key
        .sign(signed.as_bytes())
        .map_err(|e| TokenError::Sign(e.to_string()))?;
    Ok(format!("{signed}.{}", B64.encode(sig)))
}

/// Read the claims without checking anything (for messages about a refused token).
pub fn peek(token: &str) -> Result<Claims, TokenError> {
    let mut parts = token.trim().split('.');
    let (Some(prefix), Some(claims), Some(_sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed("expected three dot-separated parts"));
    };
    if prefix != PREFIX {
        return Err(TokenError::Malformed("unknown version prefix (want mbjt1)"));
    }
    let json = B64
        .decode(claims)
        .map_err(|_| TokenError::Malformed("claims are not base64url"))?;
    serde_json::from_slice(&json)
        .map_err(|_| TokenError::Malformed("claims are not the expected JSON"))
}

/// Check the signature (against the CA's public key, SubjectPublicKeyInfo DER) and expiry.
pub fn verify(
    token: &str,
    ca_spki_der: &[u8],
    trust_domain: &str,
    now_unix: u64,
) -> Result<Claims, TokenError> {
    let token = token.trim();
    let claims = peek(token)?;
    let (signed, sig_b64) = token
        .rsplit_once('.')
        .ok_or(TokenError::Malformed("expected three dot-separated parts"))?;
    let sig = B64
        .decode(sig_b64)
        .map_err(|_| TokenError::Malformed("signature is not base64url"))?;
    let public_key =
        spki_to_point(ca_spki_der).ok_or(TokenError::BadSignature(trust_domain.to_string()))?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, public_key)
        .verify(signed.as_bytes(), &sig)
        .map_err(|_| TokenError::BadSignature(trust_domain.to_string()))?;
    if claims.trust_domain != trust_domain {
        return Err(TokenError::WrongTrustDomain {
            got: claims.trust_domain,
            want: trust_domain.into(),
        });
    }
    if claims.expires <= now_unix {
        return Err(TokenError::Expired {
            id: claims.id,
            expires: claims.expires,
        });
    }
    Ok(claims)
}

/// The public key bytes (uncompressed EC point) inside a P-256 SubjectPublicKeyInfo.
fn spki_to_point(spki: &[u8]) -> Option<&[u8]> {
    // An uncompressed P-256 point is 65 bytes starting with 0x04 and ends the SPKI.
    (spki.len() > 65 && spki[spki.len() - 65] == 0x04).then(|| &spki[spki.len() - 65..])
}

/// The CA key's SubjectPublicKeyInfo, for [`verify`].
pub fn public_spki(key: &KeyPair) -> Vec<u8> {
    key.subject_public_key_info()
}

/// A fresh random token id.
pub fn new_id() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(expires: u64) -> Claims {
        Claims {
            id: new_id(),
            trust_domain: "corp.example".into(),
            site: "vm-billing-01".into(),
            role: "agent".into(),
            expires,
        }
    }

    #[test]
    fn minted_tokens_verify_and_bad_ones_say_why() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let spki = public_spki(&key);
        let c = claims(1_000);
        let t = mint(&c, &key).unwrap();
        assert_eq!(verify(&t, &spki, "corp.example", 999), Ok(c.clone()));
        assert!(matches!(
            verify(&t, &spki, "corp.example", 1_000),
            Err(TokenError::Expired { .. })
        ));
        assert!(matches!(
            verify(&t, &spki, "other.example", 5),
            Err(TokenError::WrongTrustDomain { .. })
        ));
        // Forged: signed by another key.
        let rogue = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let forged = mint(&c, &rogue).unwrap();
        assert!(matches!(
            verify(&forged, &spki, "corp.example", 5),
            Err(TokenError::BadSignature(_))
        ));
        // Tampered claims keep the old signature.
        let mut other = c.clone();
        other.site = "vm-admin".into();
        let (_, sig) = t.rsplit_once('.').unwrap();
        let tampered = format!(
            "{PREFIX}.{}.{sig}",
            B64.encode(serde_json::to_vec(&other).unwrap())
        );
        assert!(matches!(
            verify(&tampered, &spki, "corp.example", 5),
            Err(TokenError::BadSignature(_))
        ));
        for junk in ["", "mbjt1", "x.y.z", "mbjt1.!!.x", "mbjt1.e30.x.y"] {
            assert!(
                matches!(
                    verify(junk, &spki, "corp.example", 5),
                    Err(TokenError::Malformed(_))
                ),
                "{junk}"
            );
        }
    }
}
