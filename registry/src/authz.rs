//! Who may call what, by SPIFFE id (the TLS handshake verified the id already).
//!
//! - `spiffe://<our td>/registry/<node>`: another registry node — admin, and Raft peer;
//! - `spiffe://<td>/ctl/...`: an operator — admin (every write, membership);
//! - `spiffe://<td>/site/<site>/...` (gateway, agent, adapter): reads, and writes of its own
//!   site's registration, heartbeats and exports;
//! - anything else (workloads) is refused.

use meshbridge_core::id::SpiffeId;
use tonic::{Request, Status};

use crate::listener::Peer;

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A registry node of our trust domain.
    Node(SpiffeId),
    /// An operator.
    Admin(SpiffeId),
    /// A site's gateway, agent or adapter.
    Site { id: SpiffeId, site: String },
}

impl Caller {
    /// Classifies the peer of `req`; `trust_domain` is the registry's own.
    pub fn of<T>(req: &Request<T>, trust_domain: &str) -> Result<Self, Status> {
        let id = req
            .extensions()
            .get::<Peer>()
            .and_then(|p| p.id.clone())
            .ok_or_else(|| Status::unauthenticated("no verified client SVID"))?;
        Self::classify(id, trust_domain)
    }

    pub fn classify(id: SpiffeId, trust_domain: &str) -> Result<Self, Status> {
        if id.is_registry() && id.trust_domain() == trust_domain {
            return Ok(Caller::Node(id));
        }
        if id.path().starts_with("/ctl/") || id.path() == "/ctl" {
            return Ok(Caller::Admin(id));
        }
        if let Some(site) = id.site() {
            let site = site.to_owned();
            return Ok(Caller::Site { id, site });
        }
        Err(Status::permission_denied(format!(
            "{id} may not use the registry (allowed: spiffe://<td>/site/<site>/..., spiffe://<td>/ctl/..., registry nodes)"
        )))
    }

    pub fn id(&self) -> &SpiffeId {
        match self {
            Caller::Node(id) | Caller::Admin(id) | Caller::Site { id, .. } => id,
        }
    }

    /// Admins and registry nodes only.
    pub fn require_admin(&self, what: &str) -> Result<(), Status> {
        match self {
            Caller::Node(_) | Caller::Admin(_) => Ok(()),
            Caller::Site { id, .. } => Err(Status::permission_denied(format!(
                "{id} may not {what}: admins only (spiffe://<td>/ctl/...)"
            ))),
        }
    }

    /// Admins, registry nodes, and the site `site` itself.
    pub fn require_site(&self, site: &str, what: &str) -> Result<(), Status> {
        match self {
            Caller::Site { site: own, id } if own != site => Err(Status::permission_denied(
                format!("{id} belongs to site {own:?} and may not {what} of site {site:?}"),
            )),
            _ => Ok(()),
        }
    }

    /// Registry nodes only (Raft traffic).
    pub fn require_node(&self) -> Result<(), Status> {
        match self {
            Caller::Node(_) => Ok(()),
            other => Err(Status::permission_denied(format!(
                "{} is not a registry node of this trust domain",
                other.id()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(s: &str) -> Result<Caller, Status> {
        Caller::classify(SpiffeId::parse(s).unwrap(), "corp.example")
    }

    #[test]
    fn sites_write_only_their_own_site() {
        let gw = caller("spiffe://corp.example/site/east/gateway").unwrap();
        assert!(gw.require_site("east", "export").is_ok());
        let err = gw.require_site("west", "export").unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.message().contains("\"west\""), "{}", err.message());
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
}
