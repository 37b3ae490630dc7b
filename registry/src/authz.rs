//! Who may call what, by SPIFFE id (the TLS handshake verified the id and its chain against
//! the roots of the id's own trust domain already).
//!
//! - `spiffe://<our td>/registry/<node>`: another registry node — admin, and Raft peer;
//! - `spiffe://<our td>/ctl/...`: an operator — admin (every write, membership, tokens);
//! - `spiffe://<our td>/site/<site>/...` (gateway, agent, adapter): reads, and writes of its
//!   own site's registration, heartbeats and exports;
//! - `spiffe://<federated td>/site/<site>/...` or `.../ctl/...`: a partner — reads only.
//!   Sites are keyed by (trust domain, site): a partner's `site/east` is not our `east`,
//!   and a partner's `/ctl/` id is no admin here;
//! - anything else (workloads, other paths) is refused.

use meshbridge_core::id::SpiffeId;
use tonic::Request;

use crate::error::ApiError;
use crate::listener::Peer;

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A registry node of our trust domain.
    Node(SpiffeId),
    /// An operator.
    Admin(SpiffeId),
    /// A site's gateway, agent or adapter, of our trust domain.
    Site { id: SpiffeId, site: String },
    /// A site or operator of a federated trust domain: reads only.
    Federated(SpiffeId),
}

impl Caller {
    /// Classifies the peer of `req`; `trust_domain` is the registry's own.
    pub fn of<T>(req: &Request<T>, trust_domain: &str) -> Result<Self, ApiError> {
        let id = req
            .extensions()
            .get::<Peer>()
            .and_then(|p| p.id.clone())
            .ok_or(ApiError::NoClientSvid { called: None })?;
        Self::classify(id, trust_domain)
    }

    pub fn classify(id: SpiffeId, trust_domain: &str) -> Result<Self, ApiError> {
        let ours = id.trust_domain() == trust_domain;
        let ctl = id.path().starts_with("/ctl/") || id.path() == "/ctl";
        if id.is_registry() && ours {
            return Ok(Caller::Node(id));
        }
        if ctl && ours {
            return Ok(Caller::Admin(id));
        }
        if let Some(site) = id.site() {
            if !ours {
                return Ok(Caller::Federated(id));
            }
            let site = site.to_owned();
            return Ok(Caller::Site { id, site });
        }
        if ctl {
            return Ok(Caller::Federated(id));
        }
        Err(ApiError::forbidden(format!(
            "{id} may not use the registry (allowed: spiffe://<td>/site/<site>/..., spiffe://<td>/ctl/..., registry nodes)"
        )))
    }

    pub fn id(&self) -> &SpiffeId {
        match self {
            Caller::Node(id)
            | Caller::Admin(id)
            | Caller::Site { id, .. }
            | Caller::Federated(id) => id,
        }
    }

    /// Admins and registry nodes only.
    pub fn require_admin(&self, what: &str) -> Result<(), ApiError> {
        match self {
            Caller::Node(_) | Caller::Admin(_) => Ok(()),
            Caller::Site { id, .. } => Err(ApiError::forbidden(format!(
                "{id} may not {what}: admins only (spiffe://<td>/ctl/...)"
            ))),
            Caller::Federated(id) => Err(federated(id, what)),
        }
    }

    /// Admins, registry nodes, and the site `site` itself.
    pub fn require_site(&self, site: &str, what: &str) -> Result<(), ApiError> {
        match self {
            Caller::Site { site: own, id } if own != site => Err(ApiError::forbidden(format!(
                "{id} belongs to site {own:?} and may not {what} for site {site:?}"
            ))),
            Caller::Federated(id) => Err(federated(id, what)),
            _ => Ok(()),
        }
    }

    /// Registry nodes only (Raft traffic).
    pub fn require_node(&self) -> Result<(), ApiError> {
        match self {
            Caller::Node(_) => Ok(()),
            other => Err(ApiError::forbidden(format!(
                "{} is not a registry node of this trust domain",
                other.id()
            ))),
        }
    }
}

/// A partner's identity asked to write.
fn federated(id: &SpiffeId, what: &str) -> ApiError {
    ApiError::forbidden(format!(
        "{id} may not {what}: it is of the federated trust domain {:?}, which may read this \
         registry but not write it (sites are keyed by trust domain and site)",
        id.trust_domain()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(s: &str) -> Result<Caller, ApiError> {
        Caller::classify(SpiffeId::parse(s).unwrap(), "corp.example")
    }

    #[test]
    fn sites_write_only_their_own_site() {
        let gw = caller("spiffe://corp.example/site/east/gateway").unwrap();
        assert!(gw.require_site("east", "export").is_ok());
        let err = gw.require_site("west", "export").unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.to_string().contains("\"west\""), "{}", err.to_string());
        assert!(gw.require_admin("write policies").is_err());
        assert!(gw.require_node().is_err());
    }

    #[test]
    fn operators_and_nodes_are_admins() {
        let ctl = caller("spiffe://corp.example/ctl/alice").unwrap();
        assert!(ctl.require_site("west", "export").is_ok());
        assert!(ctl.require_admin("x").is_ok());
        assert!(ctl.require_node().is_err());
        let node = caller("spiffe://corp.example/registry/2").unwrap();
        assert!(node.require_node().is_ok());
        // A registry id of another trust domain is not one of ours.
        assert!(caller("spiffe://other.example/registry/2").is_err());
    }

    #[test]
    fn workloads_are_refused() {
        let err = caller("spiffe://corp.example/ns/shop/sa/cart").unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn a_federated_partner_is_neither_admin_nor_one_of_our_sites() {
        // A partner.example id that says /ctl/: no admin here (no join tokens, no writes).
        let ctl = caller("spiffe://partner.example/ctl/alice").unwrap();
        assert!(matches!(ctl, Caller::Federated(_)));
        let err = ctl.require_admin("create join tokens").unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(
            err.to_string().contains("partner.example"),
            "{}",
            err.to_string()
        );
        assert!(ctl.require_site("east", "export services").is_err());
        // A partner.example gateway of "east" does not write our east.
        let gw = caller("spiffe://partner.example/site/east/gateway").unwrap();
        assert!(gw.require_site("east", "export services").is_err());
        assert!(gw.require_admin("x").is_err());
        assert!(gw.require_node().is_err());
        // Our own east still does.
        let ours = caller("spiffe://corp.example/site/east/gateway").unwrap();
        assert!(ours.require_site("east", "export services").is_ok());
    }
}
