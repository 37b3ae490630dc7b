//! Authorization at the receiving gateway: "allow service S from these principals", from the
//! catalog's policies. Sans-IO.
//!
//! The principal is the peer authenticated by mTLS (the sending gateway or agent): its
//! SPIFFE id, its trust domain, and the site named in its id (`.../site/<site>/...`). A
//! source identity claimed in the preamble is logged, never trusted.

use meshbridge_core::id::SpiffeId;
use meshbridge_core::model::{Catalog, Principal, ServiceKey};

use crate::config::DefaultAction;

/// The outcome of [`authorize`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed, by the named policy (or by the default when `None`).
    Allow(Option<String>),
    /// Refused, with a reason fit for the peer and the log.
    Deny(String),
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Self::Allow(_))
    }
}

/// Whether `principal` covers `peer`.
pub fn matches(principal: &Principal, peer: &SpiffeId) -> bool {
    match principal {
        Principal::Id(id) => peer.to_string() == *id,
        Principal::IdPrefix(prefix) => peer.to_string().starts_with(prefix.as_str()),
        Principal::TrustDomain(td) => peer.trust_domain() == td,
        Principal::Site(site) => peer.site() == Some(site.as_str()),
    }
}

/// May `peer` reach `service`? When policies name the service, one of their principals must
/// match; otherwise `default` decides.
pub fn authorize(
    catalog: &Catalog,
    service: &ServiceKey,
    peer: &SpiffeId,
    default: DefaultAction,
) -> Decision {
    let mut named = false;
    for policy in catalog.policies.values().filter(|p| p.service == *service) {
        named = true;
        if policy.allow.iter().any(|p| matches(p, peer)) {
            return Decision::Allow(Some(policy.name.clone()));
        }
    }
    if named {
        return Decision::Deny(format!(
            "{peer} is not allowed to reach {service} by any policy of the service"
        ));
    }
    match default {
        DefaultAction::Allow => Decision::Allow(None),
        DefaultAction::Deny => Decision::Deny(format!(
            "no policy allows {service} and the default is deny (peer {peer})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use meshbridge_core::model::Policy;

    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn catalog(policies: &[(&str, &str, Vec<Principal>)]) -> Catalog {
        let mut c = Catalog::default();
        for (name, svc, allow) in policies {
            let (ns, n) = svc.split_once('/').unwrap();
            c.policies.insert(
                name.to_string(),
                Arc::new(Policy {
                    name: name.to_string(),
                    service: ServiceKey::new(ns, n),
                    allow: allow.clone(),
                }),
            );
        }
        c
    }

    #[test]
    fn principals_match_ids_prefixes_domains_and_sites() {
        let west = id("spiffe://corp.example/site/west/gateway");
        let cases = [
            (Principal::Id(west.to_string()), true),
            (
                Principal::Id("spiffe://corp.example/site/x/gateway".into()),
                false,
            ),
            (
                Principal::IdPrefix("spiffe://corp.example/site/".into()),
                true,
            ),
            (
                Principal::IdPrefix("spiffe://corp.example/ns/".into()),
                false,
            ),
            (Principal::TrustDomain("corp.example".into()), true),
            (Principal::TrustDomain("other.example".into()), false),
            (Principal::Site("west".into()), true),
            (Principal::Site("east".into()), false),
        ];
        for (p, want) in cases {
            assert_eq!(matches(&p, &west), want, "{p:?}");
        }
    }

    #[test]
    fn named_service_needs_a_matching_principal_whatever_the_default() {
        let svc = ServiceKey::new("shop", "ledger");
        let c = catalog(&[
            ("a", "shop/ledger", vec![Principal::Site("north".into())]),
            ("b", "shop/ledger", vec![Principal::Site("west".into())]),
            ("c", "shop/other", vec![]),
        ]);
        let west = id("spiffe://corp.example/site/west/gateway");
        let south = id("spiffe://corp.example/site/south/gateway");
        assert_eq!(
            authorize(&c, &svc, &west, DefaultAction::Deny),
            Decision::Allow(Some("b".into()))
        );
        let d = authorize(&c, &svc, &south, DefaultAction::Allow);
        let Decision::Deny(reason) = d else {
            panic!("{d:?}")
        };
        assert!(reason.contains("site/south/gateway") && reason.contains("shop/ledger"));
    }

    #[test]
    fn unnamed_service_follows_the_default() {
        let c = catalog(&[]);
        let svc = ServiceKey::new("shop", "web");
        let peer = id("spiffe://corp.example/site/west/gateway");
        assert!(authorize(&c, &svc, &peer, DefaultAction::Allow).is_allowed());
        assert!(!authorize(&c, &svc, &peer, DefaultAction::Deny).is_allowed());
    }
}
