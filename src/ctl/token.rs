//! `meshbridge ctl token create --site S [--role agent] [--ttl 1h]`: mint a single-use join
//! token. The token alone goes to stdout (so `TOKEN=$(meshbridge ctl token create ...)`
//! works); what it grants and until when goes to stderr, or everything as JSON with `-o json`.

use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;
use meshbridge_core::client::{Consistency, RegistryClient};
use serde_json::json;

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Mint a single-use join token for a new VM agent (or gateway) of site S.
    Create {
        /// The site the joiner becomes (a DNS label).
        #[arg(long)]
        site: String,
        /// agent or gateway.
        #[arg(long, default_value = "agent")]
        role: String,
        /// Validity, like 15m, 1h, 2d (at most 7d).
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: Duration,
    },
    /// Join tokens that have been used or revoked: id, site, when, and until when the
    /// registry remembers them (a token is single use; the registry records each use).
    List,
    /// Revoke a token before it is used (by the id `create` printed: 32 hex digits): a join
    /// with it is then refused.
    Revoke {
        #[arg(value_parser = parse_token_id)]
        id: String,
    },
}

/// Validity of a token: more than zero (at most 7 days, which the registry checks).
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let ttl = meshbridge_core::pki::parse_duration(s)?;
    if ttl.is_zero() {
        return Err(format!("{s:?}: a token must be valid for more than zero"));
    }
    Ok(ttl)
}

/// A token id as `create` prints it: 32 lowercase hex digits. The registry keeps no
/// record of unused tokens, so a mistyped id would be "revoked" without protecting
/// anything: it is refused here instead.
fn parse_token_id(s: &str) -> Result<String, String> {
    let id = s.trim();
    if id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Ok(id.to_string());
    }
    Err(format!(
        "{s:?} is not a join token id: ids are the 32 hex digits `ctl token create` printed \
         (`id` in its -o json)"
    ))
}

pub async fn run(
    client: &RegistryClient,
    cmd: TokenCmd,
    consistency: Consistency,
    json_out: bool,
) -> Result<()> {
    match cmd {
        TokenCmd::List => {
            let catalog = client.catalog(consistency).await?;
            let when = |ms: u64| meshbridge_core::tls::rfc3339((ms / 1000) as i64);
            if json_out {
                let list: Vec<_> = catalog
                    .tokens
                    .values()
                    .map(|t| {
                        json!({
                            "id": t.id,
                            "site": t.site,
                            "state": if t.revoked { "revoked" } else { "used" },
                            "at": when(t.used_at_ms),
                            "expires": when(t.expires_ms),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if catalog.tokens.is_empty() {
                println!("no join token has been used or revoked");
            } else {
                println!(
                    "{:<24} {:<8} {:<20} {:<22} EXPIRES",
                    "ID", "STATE", "SITE", "AT"
                );
                for t in catalog.tokens.values() {
                    println!(
                        "{:<24} {:<8} {:<20} {:<22} {}",
                        t.id,
                        if t.revoked { "revoked" } else { "used" },
                        if t.site.is_empty() { "-" } else { &t.site },
                        when(t.used_at_ms),
                        when(t.expires_ms)
                    );
                }
            }
        }
        TokenCmd::Revoke { id } => {
            let r = client.revoke_token(&id).await?;
            if json_out {
                let v = json!({"id": id, "revoked": true, "changed": r.changed, "revision": r.revision});
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if r.changed {
                println!(
                    "join token {id} revoked: a join with it is refused (catalog revision {}; \
                     unused tokens are not stored, so this holds whether or not it was issued)",
                    r.revision
                );
            } else {
                println!(
                    "join token {id} was already revoked (catalog revision {})",
                    r.revision
                );
            }
        }
        TokenCmd::Create { site, role, ttl } => {
            let t = client.create_join_token(&site, &role, ttl).await?;
            if json_out {
                let v = json!({
                    "token": t.token,
                    "id": t.id,
                    "spiffe_id": t.spiffe_id,
                    "expires": meshbridge_core::tls::rfc3339(t.expires_unix as i64),
                    "expires_unix": t.expires_unix,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{}", t.token);
                eprintln!(
                    "join token {} for {}, single use, expires {}",
                    t.id,
                    t.spiffe_id,
                    meshbridge_core::tls::rfc3339(t.expires_unix as i64)
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{parse_token_id, parse_ttl};

    #[test]
    fn token_ids_and_ttls_are_checked_before_anything_is_sent() {
        let id = meshbridge_core::join::new_id();
        assert_eq!(parse_token_id(&id), Ok(id.clone()));
        for bad in ["nonexistent", "zzz;drop", "", &id[1..], &id.to_uppercase()] {
            let err = parse_token_id(bad).unwrap_err();
            assert!(err.contains("is not a join token id"), "{bad:?}: {err}");
        }
        assert!(parse_ttl("0s").unwrap_err().contains("more than zero"));
        assert!(parse_ttl("1h").is_ok());
    }
}
