//! The MCS DNS specification (KEP-1645 `specification.md`, schema 1.0.0), record by
//! record, against the real server over UDP and TCP: the version record, a ClusterSetIP
//! service's A/AAAA, SRV and PTR records (and no per-cluster name), a headless service's
//! A/AAAA per ready endpoint, per-host names, SRV per endpoint and named port, PTR per
//! endpoint, and NXDOMAIN when a headless service has no ready endpoint.

use std::sync::Arc;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{Name, RData, RecordType};
use meshbridge_core::model::{Import, ServiceKey, SiteState};
use meshbridge_federation::dns::{Config, DNS_SCHEMA_VERSION};

use crate::fixture::*;

fn rdata(msg: &hickory_proto::op::Message) -> Vec<String> {
    let mut v: Vec<String> = msg.answers.iter().map(|r| r.data.to_string()).collect();
    v.sort();
    v
}

/// (port, target) of each SRV answer, sorted.
fn srv_targets(msg: &hickory_proto::op::Message) -> Vec<(u16, String)> {
    let mut v: Vec<(u16, String)> = msg
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some((s.port, s.target.to_ascii())),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

fn reverse(ip: &str) -> String {
    Name::from(ip.parse::<std::net::IpAddr>().unwrap()).to_ascii()
}

#[tokio::test]
async fn every_record_of_the_mcs_dns_specification() {
    let (mut world, rx) = World::new();
    world
        .site("east", SiteState::Fresh)
        .site("west", SiteState::Fresh);
    // ClusterSetIP: `web` (named port http, unnamed second port), exported by east; west
    // reaches it at its dual-stack ClusterSetIP (its adapter's import address).
    let mut unnamed = port("", 9090, 9090);
    unnamed.name = String::new();
    world.export(export(
        "east",
        "web",
        vec![port("http", 80, 8080)],
        vec![ep("10.1.0.1", None)],
    ));
    world.export(export(
        "east",
        "metrics",
        vec![unnamed],
        vec![ep("10.1.0.2", None)],
    ));
    let import = Import {
        site: "west".into(),
        service: ServiceKey::new(NS, "web"),
        generation: 1,
        ips: vec!["10.96.0.10".parse().unwrap(), "fd00::10".parse().unwrap()],
    };
    world.catalog.imports.insert(import.key(), Arc::new(import));
    // Headless: `db` with hosts in both clusters (one IPv6), one not ready.
    let mut not_ready = ep("10.1.1.3", Some("db-2"));
    not_ready.ready = false;
    world.export(headless(
        "east",
        "db",
        vec![port("pg", 5432, 5432)],
        vec![ep("10.1.1.1", Some("db-0")), not_ready],
    ));
    world.export(headless(
        "west",
        "db",
        vec![port("pg", 5432, 5432)],
        vec![ep("fd00::2:1", Some("db-1"))],
    ));
    let mut down = ep("10.1.1.9", Some("x-0"));
    down.ready = false;
    world.export(headless(
        "east",
        "empty",
        vec![port("pg", 5432, 5432)],
        vec![down],
    ));
    world.publish();
    let dns = start(Config::for_test("west"), rx).await;
    let zone = "svc.clusterset.local.";
    for t in BOTH {
        let q = |name: String, rtype| {
            let addr = dns.local_addr();
            async move { ask(addr, t, &name, rtype).await }
        };
        // §2.2 the schema version.
        let m = q("dns-version.clusterset.local.".into(), RecordType::TXT).await;
        assert_eq!(rdata(&m), vec![DNS_SCHEMA_VERSION.to_string()], "{t:?}");
        assert_eq!(DNS_SCHEMA_VERSION, "1.0.0");

        // §2.3.1 A and AAAA: the ClusterSetIP, both families.
        let m = q(format!("web.{NS}.{zone}"), RecordType::A).await;
        assert_eq!(addresses(&m), ips(&["10.96.0.10"]), "{t:?}");
        let m = q(format!("web.{NS}.{zone}"), RecordType::AAAA).await;
        assert_eq!(addresses(&m), ips(&["fd00::10"]), "{t:?}");
        // §2.3.2 SRV per named port, pointing at the service name.
        let m = q(format!("_http._tcp.web.{NS}.{zone}"), RecordType::SRV).await;
        let srv = srv_targets(&m);
        assert_eq!(srv, vec![(80, format!("web.{NS}.{zone}"))], "{t:?}");
        // §2.3.3 PTR of the ClusterSetIP, IPv4 and IPv6 (nibbles).
        for ip in ["10.96.0.10", "fd00::10"] {
            let m = q(reverse(ip), RecordType::PTR).await;
            assert_eq!(
                m.metadata.response_code,
                ResponseCode::NoError,
                "{t:?} {ip}"
            );
            assert_eq!(rdata(&m), vec![format!("web.{NS}.{zone}")], "{t:?} {ip}");
        }
        // §2.3.4 no name for one cluster's backends of a ClusterSetIP service.
        let m = q(format!("east.web.{NS}.{zone}"), RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{t:?}");

        // §2.4.1 A/AAAA: every ready endpoint across the clusterset, per family; a host
        // name per endpoint under its cluster.
        let m = q(format!("db.{NS}.{zone}"), RecordType::A).await;
        assert_eq!(addresses(&m), ips(&["10.1.1.1"]), "{t:?}");
        let m = q(format!("db.{NS}.{zone}"), RecordType::AAAA).await;
        assert_eq!(addresses(&m), ips(&["fd00::2:1"]), "{t:?}");
        let m = q(format!("db-0.east.db.{NS}.{zone}"), RecordType::A).await;
        assert_eq!(addresses(&m), ips(&["10.1.1.1"]), "{t:?}");
        let m = q(format!("db-1.west.db.{NS}.{zone}"), RecordType::AAAA).await;
        assert_eq!(addresses(&m), ips(&["fd00::2:1"]), "{t:?}");
        let m = q(format!("db-2.east.db.{NS}.{zone}"), RecordType::A).await;
        assert_eq!(
            m.metadata.response_code,
            ResponseCode::NXDomain,
            "not ready: {t:?}"
        );
        // §2.4.2 SRV: one per ready endpoint and named port, to its host name.
        let m = q(format!("_pg._tcp.db.{NS}.{zone}"), RecordType::SRV).await;
        let targets = srv_targets(&m);
        assert_eq!(
            targets,
            vec![
                (5432, format!("db-0.east.db.{NS}.{zone}")),
                (5432, format!("db-1.west.db.{NS}.{zone}")),
            ],
            "{t:?}"
        );
        // §2.4.3 PTR of each ready endpoint, to its host name.
        for (ip, host) in [("10.1.1.1", "db-0.east"), ("fd00::2:1", "db-1.west")] {
            let m = q(reverse(ip), RecordType::PTR).await;
            assert_eq!(
                rdata(&m),
                vec![format!("{host}.db.{NS}.{zone}")],
                "{t:?} {ip}"
            );
        }
        // A headless service without a ready endpoint: NXDOMAIN.
        let m = q(format!("empty.{NS}.{zone}"), RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{t:?}");
        // Addresses that are none of ours are not answered from here (refused: no upstream).
        let m = q(reverse("10.1.1.3"), RecordType::PTR).await;
        assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{t:?}");
    }
}
