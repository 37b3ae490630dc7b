//! Table-driven tests of the catalog model: validation, the state machine, leases, merge
//! rules and locality ranking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod apply;
mod imports;
mod lease;
mod merge;
mod sites;
mod validate;

use std::net::IpAddr;

use crate::*;

pub(super) const TTL: u64 = 10_000;
pub(super) const GRACE: u64 = 60_000;

pub(super) fn spec(name: &str, region: &str, zone: &str) -> SiteSpec {
    SiteSpec {
        name: name.into(),
        kind: SiteKind::Cluster,
        locality: Locality {
            region: region.into(),
            zone: zone.into(),
        },
        gateways: vec![format!("{name}.gw.example:15443")],
        lease_ttl_ms: TTL,
        grace_ms: GRACE,
        instance: String::new(),
    }
}

pub(super) fn key() -> ServiceKey {
    ServiceKey::new("default", "echo")
}

pub(super) fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub(super) fn ep(addr: &str) -> Endpoint {
    Endpoint {
        address: ip(addr),
        hostname: None,
        ready: true,
        weight: 1,
        identity: None,
        zone: None,
    }
}

pub(super) fn port(name: &str, port: u16) -> Port {
    Port {
        name: name.into(),
        port,
        protocol: Protocol::Tcp,
        target_port: port,
        app_protocol: None,
    }
}

/// An export of `default/echo` with one `http` port 80.
pub(super) fn export(site: &str, generation: u64, addrs: &[&str]) -> Export {
    Export {
        site: site.into(),
        service: key(),
        generation,
        ports: vec![port("http", 80)],
        endpoints: addrs.iter().map(|a| ep(a)).collect(),
        headless: false,
        created_revision: 0,
        updated_revision: 0,
    }
}

pub(super) fn register(c: &mut Catalog, name: &str, region: &str, zone: &str, at_ms: u64) {
    c.apply(&Command::RegisterSite {
        spec: spec(name, region, zone),
        at_ms,
    })
    .unwrap();
}

pub(super) fn put(c: &mut Catalog, export: Export) -> Result<Applied, Rejection> {
    c.apply(&Command::PutExport { export })
}

pub(super) fn tick(c: &mut Catalog, at_ms: u64) -> Applied {
    c.apply(&Command::Tick { at_ms }).unwrap()
}

/// Two sites in one region, one export each, a policy and a used token.
pub(super) fn populated() -> Catalog {
    let mut c = Catalog::default();
    register(&mut c, "a", "eu", "eu-1a", 0);
    register(&mut c, "b", "eu", "eu-1b", 0);
    put(&mut c, export("a", 1, &["10.0.0.1", "10.0.0.2"])).unwrap();
    put(&mut c, export("b", 1, &["10.1.0.1"])).unwrap();
    let policy = Policy {
        name: "echo-from-eu".into(),
        service: key(),
        allow: vec![
            Principal::Site("a".into()),
            Principal::TrustDomain("corp.example".into()),
        ],
    };
    c.apply(&Command::PutPolicy { policy }).unwrap();
    let token = Command::UseToken {
        id: "t1".into(),
        site: "a".into(),
        expires_ms: 50_000,
        at_ms: 0,
    };
    c.apply(&token).unwrap();
    c
}

/// The field a rejection names, or a description of a non-`Invalid` outcome.
pub(super) fn field_of(r: Result<Applied, Rejection>) -> String {
    match r {
        Err(Rejection::Invalid { field, .. }) => field,
        other => format!("not Invalid: {other:?}"),
    }
}

/// Short names of the changes, in order.
pub(super) fn kinds(a: &Applied) -> Vec<&'static str> {
    a.changes
        .iter()
        .map(|c| match c {
            Change::SiteUpserted { .. } => "site+",
            Change::SiteRemoved { .. } => "site-",
            Change::ExportUpserted { .. } => "export+",
            Change::ExportRemoved { .. } => "export-",
            Change::ImportUpserted { .. } => "import+",
            Change::ImportRemoved { .. } => "import-",
            Change::PolicyUpserted { .. } => "policy+",
            Change::PolicyRemoved { .. } => "policy-",
            Change::TokenUsed { .. } => "token+",
            Change::TokenForgotten { .. } => "token-",
            Change::SiteRevoked { .. } => "revoked",
            Change::SiteReinstated { .. } => "reinstated",
            Change::OwnershipSet { .. } => "owners+",
            Change::OwnershipRemoved { .. } => "owners-",
        })
        .collect()
}

pub(super) fn site_with(f: impl FnOnce(&mut SiteSpec)) -> Command {
    let mut s = spec("a", "eu", "eu-1a");
    f(&mut s);
    Command::RegisterSite { spec: s, at_ms: 0 }
}

pub(super) fn export_with(f: impl FnOnce(&mut Export)) -> Command {
    let mut e = export("a", 1, &["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
    f(&mut e);
    Command::PutExport { export: e }
}

pub(super) fn policy_with(f: impl FnOnce(&mut Policy)) -> Command {
    let mut p = Policy {
        name: "p".into(),
        service: key(),
        allow: vec![],
    };
    f(&mut p);
    Command::PutPolicy { policy: p }
}
