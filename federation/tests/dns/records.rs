//! Every record kind, over UDP and TCP, with the hickory client.

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, RecordType};
use meshbridge_core::model::{ServiceKey, SiteState};
use meshbridge_core::vip::assign_catalog;
use meshbridge_federation::dns::{Config, DNS_SCHEMA_VERSION, Transport};

use crate::fixture::*;

fn vip_config() -> Config {
    Config {
        vip_range: Some("127.240.0.0/16".parse().unwrap()),
        ..Config::for_test("east")
    }
}

/// In VIP mode a service another site exports resolves to its VIP (the gateway or agent
/// listens there); a service only this site exports resolves to its own ready endpoints,
/// since no listener is bound for it (the gateway's rule).
#[tokio::test]
async fn vip_mode_remote_services_resolve_to_the_vip_and_local_only_ones_to_endpoints() {
    let (mut world, rx) = World::new();
    world
        .site("east", SiteState::Fresh)
        .site("west", SiteState::Fresh);
    world.export(export(
        "east",
        "web",
        vec![port("http", 80, 8080)],
        vec![ep("10.1.0.1", None)],
    ));
    world.export(export(
        "west",
        "api",
        vec![port("grpc", 9000, 9000)],
        vec![ep("10.2.0.1", None)],
    ));
    for site in ["east", "west"] {
        world.export(export(
            site,
            "both",
            vec![port("http", 80, 8080)],
            vec![ep(
                if site == "east" {
                    "10.1.0.9"
                } else {
                    "10.2.0.9"
                },
                None,
            )],
        ));
    }
    world.publish();
    let vips = assign_catalog("127.240.0.0/16".parse().unwrap(), &world.catalog);
    let dns = start(vip_config(), rx).await;
    for t in BOTH {
        for (name, want) in [
            ("api", vips[&ServiceKey::new(NS, "api")].into()),
            ("both", vips[&ServiceKey::new(NS, "both")].into()),
            ("web", "10.1.0.1".parse::<std::net::IpAddr>().unwrap()),
        ] {
            let msg = ask(dns.local_addr(), t, &svc(name), RecordType::A).await;
            assert_eq!(
                msg.metadata.response_code,
                ResponseCode::NoError,
                "{t:?} {name}"
            );
            assert!(msg.metadata.authoritative);
            assert_eq!(addresses(&msg), vec![want], "{t:?} {name}");
            assert_eq!(msg.answers[0].ttl, 5);
        }
        // VIPs are IPv4: AAAA is NODATA.
        let msg = ask(dns.local_addr(), t, &svc("api"), RecordType::AAAA).await;
        assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
        assert!(msg.answers.is_empty());
        assert_eq!(soa_of(&msg).map(|s| s.1), Some(5));
    }
}

#[tokio::test]
async fn without_vips_a_service_resolves_to_its_ready_endpoints_in_this_site() {
    let (mut world, rx) = World::new();
    world
        .site("east", SiteState::Fresh)
        .site("west", SiteState::Fresh);
    let mut down = ep("10.1.0.3", None);
    down.ready = false;
    let eps = vec![ep("10.1.0.1", None), ep("fd00::1", None), down];
    world.export(export("east", "web", vec![port("http", 80, 8080)], eps));
    world.export(export(
        "west",
        "web",
        vec![port("http", 80, 8080)],
        vec![ep("10.2.0.1", None)],
    ));
    world.export(export(
        "west",
        "api",
        vec![port("grpc", 9000, 9000)],
        vec![ep("10.2.0.2", None)],
    ));
    world.publish();
    let dns = start(Config::for_test("east"), rx).await;
    for t in BOTH {
        let a = ask(dns.local_addr(), t, &svc("web"), RecordType::A).await;
        assert_eq!(addresses(&a), ips(&["10.1.0.1"]), "{t:?}");
        let aaaa = ask(dns.local_addr(), t, &svc("web"), RecordType::AAAA).await;
        assert_eq!(addresses(&aaaa), ips(&["fd00::1"]), "{t:?}");
        // Exported only elsewhere, no VIP to reach it by: the name exists, without address.
        let api = ask(dns.local_addr(), t, &svc("api"), RecordType::A).await;
        assert_eq!(api.metadata.response_code, ResponseCode::NoError);
        assert!(api.answers.is_empty() && soa_of(&api).is_some(), "{t:?}");
    }
}

#[tokio::test]
async fn named_port_srv_targets_the_service_name_at_the_service_port() {
    let (mut world, rx) = World::new();
    world.site("east", SiteState::Fresh);
    let ports = vec![port("http", 80, 8080), port("metrics", 9090, 9091)];
    world.export(export("east", "web", ports, vec![ep("10.1.0.1", None)]));
    world.publish();
    let dns = start(vip_config(), rx).await;
    for t in BOTH {
        let name = format!("_http._tcp.{}", svc("web"));
        let msg = ask(dns.local_addr(), t, &name, RecordType::SRV).await;
        assert_eq!(msg.answers.len(), 1, "{t:?}");
        let RData::SRV(srv) = &msg.answers[0].data else {
            panic!("not SRV: {msg:?}")
        };
        assert_eq!(srv.port, 80);
        assert_eq!(srv.target.to_ascii(), svc("web"));
        // The target's address comes along in the additional section.
        assert!(
            msg.additionals
                .iter()
                .any(|r| matches!(r.data, RData::A(_))),
            "{t:?} {msg:?}"
        );

        let all = ask(dns.local_addr(), t, &svc("web"), RecordType::SRV).await;
        let mut ports: Vec<u16> = all
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(s) => Some(s.port),
                _ => None,
            })
            .collect();
        ports.sort();
        assert_eq!(ports, [80, 9090], "{t:?}");

        // `_tcp` alone is an empty non-terminal: NODATA, not NXDOMAIN.
        let ent = ask(
            dns.local_addr(),
            t,
            &format!("_tcp.{}", svc("web")),
            RecordType::SRV,
        )
        .await;
        assert_eq!(ent.metadata.response_code, ResponseCode::NoError);
        let udp = ask(
            dns.local_addr(),
            t,
            &format!("_http._udp.{}", svc("web")),
            RecordType::SRV,
        )
        .await;
        assert_eq!(udp.metadata.response_code, ResponseCode::NXDomain);
    }
}

#[tokio::test]
async fn headless_service_returns_fresh_endpoints_and_stale_ones_only_as_a_last_resort() {
    let (mut world, rx) = World::new();
    world
        .site("east", SiteState::Fresh)
        .site("west", SiteState::Stale { since_ms: 1 });
    let pg = || vec![port("pg", 5432, 5432)];
    world.export(headless(
        "east",
        "db",
        pg(),
        vec![ep("10.1.0.1", Some("db-0")), ep("10.1.0.2", Some("db-1"))],
    ));
    world.export(headless(
        "west",
        "db",
        pg(),
        vec![ep("10.2.0.1", Some("db-0"))],
    ));
    world.publish();
    let dns = start(vip_config(), rx).await;
    for t in BOTH {
        let msg = ask(dns.local_addr(), t, &svc("db"), RecordType::A).await;
        assert_eq!(addresses(&msg), ips(&["10.1.0.1", "10.1.0.2"]), "{t:?}");
    }
    // East's endpoints go down: west's (stale) are better than nothing.
    for e in world.catalog.exports.values_mut() {
        if e.site == "east" {
            let mut export = (**e).clone();
            export.endpoints.iter_mut().for_each(|ep| ep.ready = false);
            *e = export.into();
        }
    }
    world.publish();
    let want = ips(&["10.2.0.1"]);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let msg = ask(dns.local_addr(), Transport::Udp, &svc("db"), RecordType::A).await;
        if addresses(&msg) == want {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still {msg:?}");
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn headless_hostnames_resolve_per_site_and_srv_targets_them() {
    let (mut world, rx) = World::new();
    world
        .site("east", SiteState::Fresh)
        .site("west", SiteState::Fresh);
    let pg = || vec![port("pg", 5432, 6432)];
    world.export(headless(
        "east",
        "db",
        pg(),
        vec![ep("10.1.0.1", Some("db-0")), ep("10.1.0.2", None)],
    ));
    world.export(headless(
        "west",
        "db",
        pg(),
        vec![ep("fd00::7", Some("db-0"))],
    ));
    world.publish();
    let dns = start(vip_config(), rx).await;
    for t in BOTH {
        let east = ask(
            dns.local_addr(),
            t,
            &format!("db-0.east.{}", svc("db")),
            RecordType::A,
        )
        .await;
        assert_eq!(addresses(&east), ips(&["10.1.0.1"]), "{t:?}");
        let west = ask(
            dns.local_addr(),
            t,
            &format!("db-0.west.{}", svc("db")),
            RecordType::AAAA,
        )
        .await;
        assert_eq!(addresses(&west), ips(&["fd00::7"]), "{t:?}");
        // No hostname: named by its address.
        let anon = ask(
            dns.local_addr(),
            t,
            &format!("10-1-0-2.east.{}", svc("db")),
            RecordType::A,
        )
        .await;
        assert_eq!(addresses(&anon), ips(&["10.1.0.2"]), "{t:?}");

        let srv = ask(
            dns.local_addr(),
            t,
            &format!("_pg._tcp.{}", svc("db")),
            RecordType::SRV,
        )
        .await;
        let mut targets: Vec<(String, u16)> = srv
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(s) => Some((s.target.to_ascii(), s.port)),
                _ => None,
            })
            .collect();
        targets.sort();
        let want = |h: &str| (format!("{h}.{}", svc("db")), 6432);
        assert_eq!(
            targets,
            [want("10-1-0-2.east"), want("db-0.east"), want("db-0.west")],
            "{t:?}"
        );

        // The site label alone is an empty non-terminal: NODATA.
        let site = ask(
            dns.local_addr(),
            t,
            &format!("east.{}", svc("db")),
            RecordType::A,
        )
        .await;
        assert_eq!(site.metadata.response_code, ResponseCode::NoError);
        assert!(site.answers.is_empty());
    }
}

#[tokio::test]
async fn apex_has_soa_ns_and_the_schema_version() {
    let (mut world, rx) = World::new();
    world.site("east", SiteState::Fresh);
    world.publish();
    let config = Config {
        ttl_secs: 7,
        ..Config::for_test("east")
    };
    let dns = start(config, rx).await;
    for t in BOTH {
        let txt = ask(
            dns.local_addr(),
            t,
            "dns-version.clusterset.local.",
            RecordType::TXT,
        )
        .await;
        let RData::TXT(version) = &txt.answers[0].data else {
            panic!("{txt:?}")
        };
        assert_eq!(version.to_string(), DNS_SCHEMA_VERSION);
        assert_eq!(DNS_SCHEMA_VERSION, "1.0.0");

        let soa = ask(dns.local_addr(), t, "clusterset.local.", RecordType::SOA).await;
        let RData::SOA(s) = &soa.answers[0].data else {
            panic!("{soa:?}")
        };
        assert_eq!(s.minimum, 7);
        assert_eq!(u64::from(s.serial), world.catalog.revision);
        assert_eq!(s.mname.to_ascii(), "ns.dns.clusterset.local.");

        let ns = ask(dns.local_addr(), t, "clusterset.local.", RecordType::NS).await;
        let RData::NS(target) = &ns.answers[0].data else {
            panic!("{ns:?}")
        };
        assert_eq!(target.0.to_ascii(), "ns.dns.clusterset.local.");
        // The server listens on 127.0.0.1: that is the name server's address.
        assert_eq!(
            ns.additionals
                .iter()
                .filter(|r| matches!(r.data, RData::A(_)))
                .count(),
            1
        );
    }
}
