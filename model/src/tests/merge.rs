//! Merge rules (union, ports, headless) and locality ranking.

use std::collections::BTreeMap;

use super::*;

fn group(site: &str, region: &str, zone: &str, state: SiteState, ready: usize) -> EndpointGroup {
    let mut e = export(site, 1, &["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
    for (i, endpoint) in e.endpoints.iter_mut().enumerate() {
        endpoint.ready = i < ready;
    }
    let site = Site {
        name: site.into(),
        kind: SiteKind::Cluster,
        locality: Locality {
            region: region.into(),
            zone: zone.into(),
        },
        gateways: vec![],
        lease_ttl_ms: TTL,
        grace_ms: GRACE,
        last_heartbeat_ms: 0,
        state,
        created_revision: 1,
        links: Vec::new(),
        instances: Vec::new(),
        xds_rejections: Vec::new(),
    };
    EndpointGroup::from_export(&e, Some(&site))
}

#[test]
fn union_of_endpoints_across_sites() {
    let mut c = Catalog::default();
    for (name, addrs) in [
        ("c", &["10.2.0.1"][..]),
        ("a", &["10.0.0.1", "10.0.0.2"][..]),
        ("b", &[][..]),
    ] {
        register(&mut c, name, "eu", "eu-1a", 0);
        put(&mut c, export(name, 1, addrs)).unwrap();
    }
    let mut e = export("b", 2, &["10.1.0.1", "10.1.0.2"]);
    e.endpoints[0].weight = 5;
    e.endpoints[1].ready = false;
    put(&mut c, e).unwrap();
    let m = c.service(&key()).unwrap();
    let summary: Vec<(&str, usize, usize, u64)> = m
        .groups
        .iter()
        .map(|g| {
            (
                g.site.as_str(),
                g.endpoints.len(),
                g.ready_count(),
                g.weight,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![("a", 2, 2, 2), ("b", 2, 1, 5), ("c", 1, 1, 1)]
    );
    assert_eq!(m.total_weight(), 8);
    assert_eq!(
        m.groups[1]
            .ready_endpoints()
            .map(|e| e.address)
            .collect::<Vec<_>>(),
        vec![ip("10.1.0.1")]
    );
    assert_eq!(m.groups[0].gateways, vec!["a.gw.example:15443".to_string()]);
    assert!(m.conflicts.is_empty());
    assert!(c.service(&ServiceKey::new("default", "nope")).is_none());
}

#[test]
fn ports_union_by_name_oldest_wins() {
    let udp = |name: &str, p: u16| Port {
        protocol: Protocol::Udp,
        ..port(name, p)
    };
    // (case, older site's ports, newer site's ports, merged ports, conflicts as (name, winner, loser))
    type Case<'a> = (
        &'a str,
        Vec<Port>,
        Vec<Port>,
        Vec<Port>,
        Vec<(&'a str, &'a str, &'a str)>,
    );
    let cases: Vec<Case> = vec![
        (
            "same",
            vec![port("http", 80)],
            vec![port("http", 80)],
            vec![port("http", 80)],
            vec![],
        ),
        (
            "union",
            vec![port("http", 80)],
            vec![port("grpc", 9090), port("http", 80)],
            vec![port("http", 80), port("grpc", 9090)],
            vec![],
        ),
        (
            "other number",
            vec![port("http", 80)],
            vec![port("http", 8080)],
            vec![port("http", 80)],
            vec![("http", "z", "a")],
        ),
        (
            "other protocol",
            vec![port("dns", 53)],
            vec![udp("dns", 53)],
            vec![port("dns", 53)],
            vec![("dns", "z", "a")],
        ),
        (
            "target port is per site",
            vec![port("http", 80)],
            vec![Port {
                target_port: 8080,
                ..port("http", 80)
            }],
            vec![port("http", 80)],
            vec![],
        ),
    ];
    for (name, older, newer, ports, conflicts) in cases {
        // "z" exports first: oldest wins although "a" sorts first by name.
        let mut c = Catalog::default();
        register(&mut c, "z", "eu", "eu-1a", 0);
        register(&mut c, "a", "eu", "eu-1a", 0);
        put(
            &mut c,
            Export {
                ports: older.clone(),
                ..export("z", 1, &["10.0.0.1"])
            },
        )
        .unwrap();
        put(
            &mut c,
            Export {
                ports: newer.clone(),
                ..export("a", 1, &["10.1.0.1"])
            },
        )
        .unwrap();
        // The winner re-exporting later keeps its seniority.
        put(
            &mut c,
            Export {
                ports: older,
                ..export("z", 2, &["10.0.0.2"])
            },
        )
        .unwrap();
        let m = c.service(&key()).unwrap();
        assert_eq!(m.ports, ports, "{name}");
        let got: Vec<(&str, &str, &str)> = m
            .conflicts
            .iter()
            .map(|k| {
                (
                    k.port_name.as_str(),
                    k.winner_site.as_str(),
                    k.loser_site.as_str(),
                )
            })
            .collect();
        assert_eq!(got, conflicts, "{name}");
        for k in &m.conflicts {
            assert_eq!(Some(&k.winner), m.port(&k.port_name), "{name}");
            assert!(newer.contains(&k.loser), "{name}");
        }
        // Both sites' endpoints are still served, each with its own ports.
        assert_eq!(m.groups.len(), 2, "{name}");
        assert_eq!(m.groups[0].ports, newer, "{name}");
    }
}

#[test]
fn port_conflict_tie_breaks_by_site_name() {
    let mut a = export("b", 1, &["10.0.0.1"]);
    let mut b = export("a", 1, &["10.1.0.1"]);
    a.ports = vec![port("http", 80)];
    b.ports = vec![port("http", 81)];
    a.created_revision = 7;
    b.created_revision = 7;
    let m = merge_exports(&key(), [&a, &b], &BTreeMap::new());
    assert_eq!(m.ports, vec![port("http", 81)]);
    assert_eq!(m.conflicts.len(), 1);
    assert_eq!(
        (
            m.conflicts[0].winner_site.as_str(),
            m.conflicts[0].loser_site.as_str()
        ),
        ("a", "b")
    );
    // A site the catalog does not know counts as fresh, without locality.
    assert_eq!(m.groups[0].state, SiteState::Fresh);
}

#[test]
fn the_oldest_export_decides_the_type_and_the_other_type_is_a_conflict() {
    let mut c = populated();
    let m = c.service(&key()).unwrap();
    assert!(!m.headless && m.type_conflicts.is_empty());
    // b (exported after a) turns headless: a's ClusterSetIP wins, b's is a conflict.
    put(
        &mut c,
        Export {
            headless: true,
            ..export("b", 2, &["10.1.0.1"])
        },
    )
    .unwrap();
    let m = c.service(&key()).unwrap();
    assert!(!m.headless);
    assert_eq!(
        m.type_conflicts,
        vec![TypeConflict {
            winner_site: "a".into(),
            loser_site: "b".into(),
            headless: false,
        }]
    );
    // Both endpoints still serve.
    assert_eq!(m.groups.len(), 2);
    // a withdraws its export: b's is the oldest left, and the service is headless.
    c.apply(&Command::DeleteExport {
        site: "a".into(),
        service: key(),
        generation: 9,
    })
    .unwrap();
    let m = c.service(&key()).unwrap();
    assert!(m.headless && m.type_conflicts.is_empty());
}

#[test]
fn services_are_merged_and_ordered_by_key() {
    let mut c = populated();
    let other = ServiceKey::new("apps", "web");
    put(
        &mut c,
        Export {
            service: other.clone(),
            ..export("b", 1, &["10.1.0.5"])
        },
    )
    .unwrap();
    let all = c.services();
    let keys: Vec<&ServiceKey> = all.iter().map(|m| &m.key).collect();
    assert_eq!(keys, vec![&other, &key()]);
    assert_eq!(all[1], c.service(&key()).unwrap());
    assert_eq!(all[1].groups.len(), 2);
    assert!(Catalog::default().services().is_empty());
}

#[test]
fn ranking_order() {
    let here = Locality {
        region: "eu".into(),
        zone: "eu-1a".into(),
    };
    let stale = SiteState::Stale { since_ms: 1 };
    let gone = SiteState::Withdrawn { since_ms: 2 };
    let fresh = SiteState::Fresh;
    let groups = vec![
        group("z-other", "us", "us-1a", fresh, 1),
        group("m-other", "ap", "eu-1a", fresh, 2), // same zone name, other region
        group("region", "eu", "eu-1b", fresh, 1),
        group("stale-home", "eu", "eu-1a", stale, 3),
        group("zone", "eu", "eu-1a", fresh, 1),
        group("home", "eu", "eu-1a", fresh, 1),
        group("withdrawn", "eu", "eu-1a", gone, 3),
        group("none-ready", "eu", "eu-1a", fresh, 0),
        group("a-stale", "us", "us-1a", stale, 1),
    ];
    // (case, from locality, from site, expected order)
    type Case = (
        &'static str,
        Locality,
        &'static str,
        Vec<(SiteRank, &'static str)>,
    );
    let cases: Vec<Case> = vec![
        (
            "from home",
            here.clone(),
            "home",
            vec![
                (SiteRank::SameSite, "home"),
                (SiteRank::SameZone, "zone"),
                (SiteRank::SameRegion, "region"),
                (SiteRank::Other, "m-other"),
                (SiteRank::Other, "z-other"),
                (SiteRank::Stale, "a-stale"),
                (SiteRank::Stale, "stale-home"),
            ],
        ),
        (
            "no locality",
            Locality::default(),
            "elsewhere",
            vec![
                (SiteRank::Other, "home"),
                (SiteRank::Other, "m-other"),
                (SiteRank::Other, "region"),
                (SiteRank::Other, "z-other"),
                (SiteRank::Other, "zone"),
                (SiteRank::Stale, "a-stale"),
                (SiteRank::Stale, "stale-home"),
            ],
        ),
        (
            "region only",
            Locality {
                region: "us".into(),
                zone: String::new(),
            },
            "x",
            vec![
                (SiteRank::SameRegion, "z-other"),
                (SiteRank::Other, "home"),
                (SiteRank::Other, "m-other"),
                (SiteRank::Other, "region"),
                (SiteRank::Other, "zone"),
                (SiteRank::Stale, "a-stale"),
                (SiteRank::Stale, "stale-home"),
            ],
        ),
    ];
    for (name, from, from_site, want) in cases {
        let ranked = rank_sites(&from, from_site, &groups);
        let got: Vec<(SiteRank, &str)> =
            ranked.iter().map(|(r, g)| (*r, g.site.as_str())).collect();
        assert_eq!(got, want, "{name}");
    }
    assert!(SiteRank::SameSite < SiteRank::SameZone && SiteRank::Other < SiteRank::Stale);
}

#[test]
fn resolve_uses_the_from_sites_locality() {
    let mut c = Catalog::default();
    for (name, region, zone) in [
        ("a", "eu", "eu-1a"),
        ("b", "eu", "eu-1b"),
        ("c", "us", "us-1a"),
    ] {
        register(&mut c, name, region, zone, 0);
        put(&mut c, export(name, 1, &["10.0.0.1"])).unwrap();
    }
    register(&mut c, "d", "eu", "eu-1b", 0); // exports nothing
    let order = |from: &str| -> Vec<(SiteRank, String)> {
        c.resolve(&key(), from)
            .unwrap()
            .into_iter()
            .map(|(r, g)| (r, g.site))
            .collect()
    };
    let s = |r, n: &str| (r, n.to_string());
    assert_eq!(
        order("d"),
        vec![
            s(SiteRank::SameZone, "b"),
            s(SiteRank::SameRegion, "a"),
            s(SiteRank::Other, "c")
        ]
    );
    assert_eq!(
        order("c"),
        vec![
            s(SiteRank::SameSite, "c"),
            s(SiteRank::Other, "a"),
            s(SiteRank::Other, "b")
        ]
    );
    assert_eq!(
        order("unknown"),
        vec![
            s(SiteRank::Other, "a"),
            s(SiteRank::Other, "b"),
            s(SiteRank::Other, "c")
        ]
    );
    assert!(c.resolve(&ServiceKey::new("x", "y"), "a").is_none());
}
