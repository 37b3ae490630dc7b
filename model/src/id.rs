//! SPIFFE ids: `spiffe://<trust-domain>/<path>`.
//!
//! Validation follows the SPIFFE ID specification: the scheme is `spiffe`, the trust domain
//! is lowercase letters, digits, `-`, `.` and `_`, the path is made of non-empty segments of
//! letters, digits, `-`, `.`, `_`, none of them `.` or `..`; no query, fragment, port or
//! user info; at most 2048 bytes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not a SPIFFE id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE id {0:?}: must start with spiffe://")]
    Scheme(String),
    #[error("SPIFFE id {0:?}: trust domain is empty")]
    EmptyTrustDomain(String),
    #[error(
        "SPIFFE id {id:?}: trust domain has an invalid character {ch:?} (allowed: a-z 0-9 - . _)"
    )]
    TrustDomainChar { id: String, ch: char },
    #[error("SPIFFE id {id:?}: path segment {segment:?} is not allowed ({reason})")]
    Segment {
        id: String,
        segment: String,
        reason: &'static str,
    },
    #[error("SPIFFE id {0:?}: longer than 2048 bytes")]
    TooLong(String),
}

/// A validated SPIFFE id.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    /// Empty, or starting with `/`.
    path: String,
}

const MAX_LEN: usize = 2048;

impl SpiffeId {
    /// Parse and validate.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.len() > MAX_LEN {
            return Err(SpiffeIdError::TooLong(s.chars().take(64).collect()));
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeIdError::Scheme(s.to_string()))?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        validate_trust_domain(td).map_err(|e| match e {
            TdError::Empty => SpiffeIdError::EmptyTrustDomain(s.to_string()),
            TdError::Char(ch) => SpiffeIdError::TrustDomainChar {
                id: s.to_string(),
                ch,
            },
        })?;
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                let reason = if segment.is_empty() {
                    Some("empty segment")
                } else if segment == "." || segment == ".." {
                    Some("relative segment")
                } else if !segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
                {
                    Some("only a-z A-Z 0-9 - . _ are allowed")
                } else {
                    None
                };
                if let Some(reason) = reason {
                    return Err(SpiffeIdError::Segment {
                        id: s.to_string(),
                        segment: segment.to_string(),
                        reason,
                    });
                }
            }
        }
        Ok(Self {
            trust_domain: td.to_string(),
            path: path.to_string(),
        })
    }

    /// Build `spiffe://<td>/<segments joined by />`, validating the result.
    pub fn from_parts(trust_domain: &str, segments: &[&str]) -> Result<Self, SpiffeIdError> {
        let mut s = format!("spiffe://{trust_domain}");
        for seg in segments {
            s.push('/');
            s.push_str(seg);
        }
        Self::parse(&s)
    }

    /// The gateway identity of a site: `spiffe://<td>/site/<site>/gateway`.
    pub fn gateway(trust_domain: &str, site: &str) -> Result<Self, SpiffeIdError> {
        Self::from_parts(trust_domain, &["site", site, "gateway"])
    }

    /// The agent identity of a VM site: `spiffe://<td>/site/<site>/agent`.
    pub fn agent(trust_domain: &str, site: &str) -> Result<Self, SpiffeIdError> {
        Self::from_parts(trust_domain, &["site", site, "agent"])
    }

    /// A registry node identity: `spiffe://<td>/registry/<node>`.
    pub fn registry(trust_domain: &str, node: &str) -> Result<Self, SpiffeIdError> {
        Self::from_parts(trust_domain, &["registry", node])
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The site named in a `/site/<site>/...` path, if any.
    pub fn site(&self) -> Option<&str> {
        let mut it = self.path.strip_prefix("/site/")?.split('/');
        it.next().filter(|s| !s.is_empty())
    }

    /// Whether this is a registry node identity.
    pub fn is_registry(&self) -> bool {
        self.path.starts_with("/registry/")
    }

    /// Whether this id falls under `prefix` by whole path segments: `spiffe://td/site/east`
    /// covers `.../site/east` and `.../site/east/gateway`, never `.../site/east-evil`; a
    /// prefix ending in `/` covers what is below it.
    pub fn has_prefix(&self, prefix: &str) -> bool {
        id_has_prefix(&self.to_string(), prefix)
    }
}

/// [`SpiffeId::has_prefix`] on the string form of an id.
pub fn id_has_prefix(id: &str, prefix: &str) -> bool {
    match id.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

enum TdError {
    Empty,
    Char(char),
}

fn validate_trust_domain(td: &str) -> Result<(), TdError> {
    if td.is_empty() {
        return Err(TdError::Empty);
    }
    match td
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_')))
    {
        Some(ch) => Err(TdError::Char(ch)),
        None => Ok(()),
    }
}

/// Check a bare trust domain name (`corp.example`).
pub fn validate_trust_domain_name(td: &str) -> Result<(), String> {
    validate_trust_domain(td).map_err(|e| match e {
        TdError::Empty => "trust domain is empty".to_string(),
        TdError::Char(ch) => {
            format!("trust domain {td:?} has an invalid character {ch:?} (allowed: a-z 0-9 - . _)")
        }
    })
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({self})")
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_parse_and_print_back() {
        for s in [
            "spiffe://corp.example",
            "spiffe://corp.example/ns/billing/sa/api",
            "spiffe://td_1-x/site/eu-west-1a/gateway",
        ] {
            let id = SpiffeId::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(id.to_string(), s);
        }
        let id = SpiffeId::gateway("corp.example", "east").unwrap();
        assert_eq!(id.site(), Some("east"));
        assert_eq!(id.trust_domain(), "corp.example");
        assert!(SpiffeId::registry("td", "n1").unwrap().is_registry());
    }

    #[test]
    fn malformed_ids_are_rejected_with_a_reason() {
        let cases: &[(&str, &str)] = &[
            ("http://corp.example/x", "must start with spiffe://"),
            ("spiffe:///ns/x", "trust domain is empty"),
            ("spiffe://Corp.example/x", "invalid character 'C'"),
            ("spiffe://corp.example:8443/x", "invalid character ':'"),
            ("spiffe://corp.example/ns//x", "empty segment"),
            ("spiffe://corp.example/ns/../x", "relative segment"),
            ("spiffe://corp.example/ns/x?y=1", "only a-z"),
            ("spiffe://corp.example/", "empty segment"),
        ];
        for (input, want) in cases {
            let err = SpiffeId::parse(input).expect_err(input).to_string();
            assert!(
                err.contains(want),
                "{input}: {err:?} should contain {want:?}"
            );
        }
        let long = format!("spiffe://td/{}", "a".repeat(2100));
        assert!(matches!(
            SpiffeId::parse(&long),
            Err(SpiffeIdError::TooLong(_))
        ));
    }

    #[test]
    fn prefixes_match_whole_path_segments() {
        let east = SpiffeId::parse("spiffe://td.example/site/east/gateway").unwrap();
        let evil = SpiffeId::parse("spiffe://td.example/site/east-evil/gateway").unwrap();
        assert!(east.has_prefix("spiffe://td.example/site/east"));
        assert!(east.has_prefix("spiffe://td.example/site/east/"));
        assert!(east.has_prefix("spiffe://td.example/site/east/gateway"));
        assert!(!evil.has_prefix("spiffe://td.example/site/east"));
        assert!(!east.has_prefix("spiffe://td.example/site/ea"));
        assert!(evil.has_prefix("spiffe://td.example/site/"));
        // A trust domain is a whole segment too.
        let longer = SpiffeId::parse("spiffe://td.example.evil/site/east/gateway").unwrap();
        assert!(!longer.has_prefix("spiffe://td.example"));
    }
}
