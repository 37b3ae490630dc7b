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

/// Whether `principal` covers `peer`. A site is a (trust domain, site) pair: `east` is the
/// site `east` of `local_td`, `partner.example/east` the one of `partner.example`.
pub fn matches(principal: &Principal, peer: &SpiffeId, local_td: &str) -> bool {
    match principal {
        Principal::Id(id) => peer.to_string() == *id,
        Principal::IdPrefix(prefix) => peer.has_prefix(prefix),
        Principal::TrustDomain(td) => peer.trust_domain() == td,
        Principal::Site(site) => {
            let (td, site) = site.split_once('/').unwrap_or((local_td, site));
            peer.trust_domain() == td && peer.site() == Some(site)
        }
    }
}

/// May `peer` reach `service`? When policies name the service, one of their principals must
/// match; otherwise `default` decides.
pub fn authorize(
    catalog: &Catalog,
    service: &ServiceKey,
    peer: &SpiffeId,
    local_td: &str,
    default: DefaultAction,
) -> Decision {
    let mut named = false;
    for policy in catalog.policies.values().filter(|p| p.service == *service) {
        named = true;
        if policy.allow.iter().any(|p| matches(p, peer, local_td)) {
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

    const TD: &str = "corp.example";

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
            assert_eq!(matches(&p, &west, "corp.example"), want, "{p:?}");
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
            authorize(&c, &svc, &west, TD, DefaultAction::Deny),
            Decision::Allow(Some("b".into()))
        );
        let d = authorize(&c, &svc, &south, TD, DefaultAction::Allow);
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
        assert!(authorize(&c, &svc, &peer, TD, DefaultAction::Allow).is_allowed());
        assert!(!authorize(&c, &svc, &peer, TD, DefaultAction::Deny).is_allowed());
    }

    #[test]
    fn sites_are_trust_domain_and_site_and_prefixes_whole_segments() {
        let ours = id("spiffe://corp.example/site/east/gateway");
        let partner = id("spiffe://partner.example/site/east/gateway");
        let evil = id("spiffe://corp.example/site/east-evil/gateway");
        let east = Principal::Site("east".into());
        assert!(matches(&east, &ours, TD));
        assert!(
            !matches(&east, &partner, TD),
            "a partner's east is not our east"
        );
        let partner_east = Principal::Site("partner.example/east".into());
        assert!(matches(&partner_east, &partner, TD));
        assert!(!matches(&partner_east, &ours, TD));
        let prefix = Principal::IdPrefix("spiffe://corp.example/site/east".into());
        assert!(matches(&prefix, &ours, TD));
        assert!(
            !matches(&prefix, &evil, TD),
            "east-evil is not under site/east"
        );
    }
}
