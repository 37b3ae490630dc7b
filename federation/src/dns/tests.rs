//! Unit tests of the pure parts: index reuse, change detection, size bounds.

use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::rr::{LowerName, Name, RecordType};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};
use meshbridge_core::model::{
    Catalog, Endpoint, Export, Import, Locality, Port, Protocol, ServiceKey, Site, SiteKind,
    SiteState,
};

use meshbridge_core::vip::assign_catalog;

use super::build::wire_len;
use super::index::{CatalogDiff, Index, Lookup, diff};
use super::{Config, service};

fn site(name: &str, state: SiteState) -> Arc<Site> {
    Arc::new(Site {
        name: name.into(),
        kind: SiteKind::Cluster,
        locality: Locality::default(),
        gateways: vec![],
        lease_ttl_ms: 1000,
        grace_ms: 1000,
        last_heartbeat_ms: 0,
        state,
        created_revision: 1,
        links: Vec::new(),
        instances: Vec::new(),
        xds_rejections: Vec::new(),
    })
}

fn export(site: &str, name: &str, ip: &str, headless: bool, rev: u64) -> Arc<Export> {
    Arc::new(Export {
        site: site.into(),
        service: ServiceKey::new("ns", name),
        generation: 1,
        ports: vec![Port {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Tcp,
            target_port: 8080,
            app_protocol: None,
        }],
        endpoints: vec![Endpoint {
            address: ip.parse().unwrap(),
            hostname: Some("h".into()),
            ready: true,
            weight: 1,
            identity: None,
            zone: None,
        }],
        headless,
        created_revision: rev,
        updated_revision: rev,
    })
}

fn import(site: &str, service: ServiceKey, ip: &str) -> Arc<Import> {
    Arc::new(Import {
        site: site.into(),
        service,
        generation: 1,
        ips: vec![ip.parse().unwrap()],
    })
}

fn catalog() -> Catalog {
    let mut c = Catalog {
        revision: 10,
        ..Catalog::default()
    };
    c.sites
        .insert("east".into(), site("east", SiteState::Fresh));
    c.sites
        .insert("west".into(), site("west", SiteState::Fresh));
    for (s, n, ip, headless, rev) in [
        ("east", "a", "10.0.0.1", false, 2),
        ("east", "b", "10.0.0.2", false, 3),
        ("west", "db", "10.1.0.1", true, 4),
    ] {
        let e = export(s, n, ip, headless, rev);
        c.exports.insert(e.key(), e);
    }
    c
}

fn answers(index: &Index, name: &str, rtype: RecordType) -> usize {
    let name = LowerName::new(&Name::from_ascii(name).unwrap());
    match index.lookup(&name, rtype) {
        Lookup::Found(f) => f.answers.len(),
        _ => 0,
    }
}

#[test]
fn rebuild_reuses_the_names_of_unchanged_services_only() {
    let config = Config::for_test("east");
    let mut cat = catalog();
    let first = Index::build(&config, &cat).unwrap();
    let changed = export("east", "b", "10.0.0.9", false, 3);
    cat.exports.insert(changed.key(), changed);
    cat.revision += 1;
    let second = first.rebuild(&config, &cat).unwrap();
    let same = |k: &str| {
        let key = ServiceKey::new("ns", k);
        Arc::ptr_eq(
            first.service_zone(&key).unwrap(),
            second.service_zone(&key).unwrap(),
        )
    };
    assert!(same("a") && same("db"));
    assert!(!same("b"));
    assert_eq!(
        answers(&second, "b.ns.svc.clusterset.local.", RecordType::A),
        1
    );
    assert_eq!(second.revision(), 11);

    // West goes stale: its headless service is recomputed, the others are not.
    cat.sites.insert(
        "west".into(),
        site("west", SiteState::Stale { since_ms: 5 }),
    );
    let third = second.rebuild(&config, &cat).unwrap();
    let key = ServiceKey::new("ns", "db");
    assert!(!Arc::ptr_eq(
        second.service_zone(&key).unwrap(),
        third.service_zone(&key).unwrap()
    ));
    // A stale site's endpoints still answer when no fresh site has any.
    assert_eq!(
        answers(&third, "db.ns.svc.clusterset.local.", RecordType::A),
        1
    );
}

#[test]
fn rebuild_follows_vip_changes() {
    let range = "127.0.0.0/30".parse().unwrap();
    let config = Config {
        vip_range: Some(range),
        ..Config::for_test("north")
    };
    let mut cat = catalog();
    cat.exports
        .remove(&(ServiceKey::new("ns", "db"), "west".to_string()));
    let c = export("east", "c", "10.0.0.3", false, 5);
    cat.exports.insert(c.key(), c);
    // Seen from a site exporting none of them (a service only the asking site exports
    // resolves to its endpoints). A /30 holds two VIPs: the oldest services, "a" and "b", get them; "c" gets none.
    let first = Index::build(&config, &cat).unwrap();
    assert_eq!(address(&first, "c"), None);
    // Without "a", "c" (whose export did not change) gets a VIP.
    cat.exports
        .remove(&(ServiceKey::new("ns", "a"), "east".to_string()));
    let second = first.rebuild(&config, &cat).unwrap();
    let vips = assign_catalog(range, &cat);
    for name in ["b", "c"] {
        let want = vips
            .get(&ServiceKey::new("ns", name))
            .map(|ip| IpAddr::V4(*ip));
        assert_eq!(address(&second, name), want, "{name}");
        assert!(want.is_some());
    }
    assert_eq!(address(&second, "a"), None);
}

fn address(index: &Index, service: &str) -> Option<IpAddr> {
    let name = Name::from_ascii(format!("{service}.ns.svc.clusterset.local.")).unwrap();
    match index.lookup(&LowerName::new(&name), RecordType::A) {
        Lookup::Found(f) => f.answers.first().and_then(|r| r.data.ip_addr()),
        _ => None,
    }
}

#[test]
fn a_site_that_imports_a_service_under_its_own_address_answers_it() {
    let mut cat = catalog();
    let a = ServiceKey::new("ns", "a");
    let west = Config::for_test("west");
    let vip_west = Config {
        vip_range: Some("127.240.0.0/16".parse().unwrap()),
        ..Config::for_test("west")
    };
    let east = Config::for_test("east");
    // West has no endpoint of `a` and no address for it yet: no answer.
    let west_before = Index::build(&west, &cat).unwrap();
    assert_eq!(address(&west_before, "a"), None);
    let previous = cat.clone();
    let i = import("west", a.clone(), "10.96.0.7");
    cat.imports.insert(i.key(), i);
    cat.revision += 1;
    assert!(!same_dns_inputs(&previous, &cat));
    // West answers its ClusterSetIP, in VIP mode too (the site said where its clients reach
    // it); east, which exports `a`, still answers its endpoint.
    for (config, want) in [
        (&west, "10.96.0.7"),
        (&vip_west, "10.96.0.7"),
        (&east, "10.0.0.1"),
    ] {
        let built = Index::build(config, &cat).unwrap();
        assert_eq!(
            address(&built, "a"),
            Some(want.parse().unwrap()),
            "{}",
            config.site
        );
        let before = Index::build(config, &previous).unwrap();
        let updated = before.update(config, &previous, &cat).unwrap();
        assert_eq!(updated.dump(), built.dump(), "{}: update", config.site);
    }
    // Removed: back to what west answered before.
    let previous = cat.clone();
    cat.imports.clear();
    cat.revision += 1;
    let index = Index::build(&west, &previous).unwrap();
    let updated = index.update(&west, &previous, &cat).unwrap();
    assert_eq!(address(&updated, "a"), None);
}

/// Whether DNS answers from `a` and `b` are the same.
fn same_dns_inputs(a: &Catalog, b: &Catalog) -> bool {
    diff(a, b) == CatalogDiff::Same
}

#[test]
fn heartbeats_are_not_dns_changes_but_lease_states_are() {
    let a = catalog();
    let mut b = a.clone();
    let mut east = (*b.sites["east"]).clone();
    east.last_heartbeat_ms = 99;
    b.sites.insert("east".into(), Arc::new(east.clone()));
    b.revision += 1;
    assert!(same_dns_inputs(&a, &b));
    east.state = SiteState::Stale { since_ms: 99 };
    b.sites.insert("east".into(), Arc::new(east));
    assert!(!same_dns_inputs(&a, &b));
    let mut c = a.clone();
    let e = export("east", "a", "10.0.0.1", false, 2);
    c.exports.insert(e.key(), e);
    assert!(same_dns_inputs(&a, &c), "same content in a new Arc");
    let e = export("east", "a", "10.0.0.7", false, 2);
    c.exports.insert(e.key(), e);
    assert!(!same_dns_inputs(&a, &c));
}

#[test]
fn size_bounds_are_never_below_the_encoded_size() {
    let config = Config::for_test("east");
    let index = Index::build(&config, &catalog()).unwrap();
    let zone = Name::from_ascii("clusterset.local.").unwrap();
    let base = service::service_name(&zone, &ServiceKey::new("ns", "db")).unwrap();
    let mut checked = 0;
    for name in [
        base.to_ascii(),
        "clusterset.local.".into(),
        "dns-version.clusterset.local.".into(),
    ] {
        let lower = LowerName::new(&Name::from_ascii(&name).unwrap());
        for rtype in [
            RecordType::A,
            RecordType::SRV,
            RecordType::SOA,
            RecordType::NS,
            RecordType::TXT,
        ] {
            if let Lookup::Found(f) = index.lookup(&lower, rtype) {
                for r in f.answers.iter().chain(f.additionals) {
                    let mut buf = Vec::new();
                    r.emit(&mut BinEncoder::new(&mut buf)).unwrap();
                    assert!(wire_len(r) >= buf.len(), "{r}");
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 6, "{checked}");
}

/// A small deterministic generator (xorshift), so a failing sequence can be replayed.
struct Steps(u64);

impl Steps {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// One random change to `cat`, of the kinds a registry makes: an export put (new endpoint
/// address, readiness, headless flag, a new service or namespace), an export deleted, a
/// site's lease state changed, a heartbeat (a new `Site` with the same DNS inputs), a site's
/// import address set or removed.
fn random_change(cat: &mut Catalog, steps: &mut Steps, rev: u64) {
    let sites = ["east", "west", "north"];
    let site_name = sites[steps.below(3) as usize];
    match steps.below(12) {
        0..=4 => {
            let ns = format!("ns{}", steps.below(3));
            let name = format!("s{}", steps.below(6));
            let ip = format!("10.{}.0.{}", steps.below(3), 1 + steps.below(200));
            let mut e = (*export(site_name, &name, &ip, steps.below(4) == 0, rev)).clone();
            e.service = ServiceKey::new(ns, name);
            e.endpoints[0].ready = steps.below(5) != 0;
            e.endpoints[0].hostname = None;
            // A re-put keeps the export's creation revision, as the registry does.
            if let Some(old) = cat.exports.get(&e.key()) {
                e.created_revision = old.created_revision;
            }
            let e = Arc::new(e);
            cat.exports.insert(e.key(), e);
        }
        5 | 6 => {
            let n = cat.exports.len() as u64;
            if n > 0 {
                let k = cat.exports.keys().nth(steps.below(n) as usize).cloned();
                if let Some(k) = k {
                    cat.exports.remove(&k);
                }
            }
        }
        7 => {
            let state = match steps.below(3) {
                0 => SiteState::Fresh,
                1 => SiteState::Stale { since_ms: rev },
                _ => SiteState::Fresh,
            };
            cat.sites.insert(site_name.into(), site(site_name, state));
        }
        10 => {
            let service = ServiceKey::new(
                format!("ns{}", steps.below(3)),
                format!("s{}", steps.below(6)),
            );
            let ip = format!("10.96.0.{}", 1 + steps.below(200));
            let i = import(site_name, service, &ip);
            cat.imports.insert(i.key(), i);
        }
        11 => {
            let n = cat.imports.len() as u64;
            if n > 0 {
                let k = cat.imports.keys().nth(steps.below(n) as usize).cloned();
                if let Some(k) = k {
                    cat.imports.remove(&k);
                }
            }
        }
        _ => {
            // A heartbeat: a new `Site` value, same state and locality.
            if let Some(s) = cat.sites.get(site_name) {
                let mut beat = (**s).clone();
                beat.last_heartbeat_ms += 1000;
                cat.sites.insert(site_name.into(), Arc::new(beat));
            }
        }
    }
    cat.revision = rev;
}

#[test]
fn update_answers_exactly_like_a_full_build_after_every_change() {
    for (config, seed) in [
        (Config::for_test("east"), 0x9e37_79b9_7f4a_7c15_u64),
        (Config::for_test("north"), 0x2545_f491_4f6c_dd1d),
        (
            Config {
                // A small range: services collide and some get none, so adding or removing one
                // moves others.
                vip_range: Some("127.240.0.0/28".parse().unwrap()),
                ..Config::for_test("west")
            },
            0x1234_5678_9abc_def1,
        ),
    ] {
        let mut steps = Steps(seed);
        let mut cat = catalog();
        let mut index = Index::build(&config, &cat).unwrap();
        for rev in 11..250 {
            let previous = cat.clone();
            random_change(&mut cat, &mut steps, rev);
            let updated = index.update(&config, &previous, &cat).unwrap();
            let built = Index::build(&config, &cat).unwrap();
            assert_eq!(
                updated.dump(),
                built.dump(),
                "site {} revision {rev}",
                config.site
            );
            assert_eq!(updated.revision(), rev);
            index = updated;
        }
    }
}

#[test]
fn update_after_one_export_change_recomputes_only_that_service() {
    let config = Config::for_test("east");
    let mut cat = catalog();
    let other = {
        let mut e = (*export("east", "c", "10.0.0.3", false, 5)).clone();
        e.service = ServiceKey::new("other", "c");
        Arc::new(e)
    };
    cat.exports.insert(other.key(), other);
    let first = Index::build(&config, &cat).unwrap();
    let previous = cat.clone();
    let changed = export("east", "b", "10.0.0.9", false, 3);
    cat.exports.insert(changed.key(), changed);
    cat.revision += 1;
    let second = first.update(&config, &previous, &cat).unwrap();
    let same = |ns: &str, k: &str| {
        let key = ServiceKey::new(ns, k);
        Arc::ptr_eq(
            first.service_zone(&key).unwrap(),
            second.service_zone(&key).unwrap(),
        )
    };
    assert!(same("ns", "a") && same("ns", "db") && same("other", "c"));
    assert!(!same("ns", "b"));
    // The untouched namespace's map is shared, not copied.
    assert!(second.shares_namespace(&first, "other"));
    assert!(!second.shares_namespace(&first, "ns"));
    assert_eq!(
        answers(&second, "b.ns.svc.clusterset.local.", RecordType::A),
        1
    );
    assert_eq!(second.dump(), Index::build(&config, &cat).unwrap().dump());
}
