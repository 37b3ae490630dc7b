//! NXDOMAIN, NODATA, REFUSED, forwarding.

use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, RecordType};
use meshbridge_core::model::SiteState;
use meshbridge_federation::dns::{Config, DNS_SCHEMA_VERSION, Transport};

use crate::fixture::*;

async fn one_service() -> (World, meshbridge_federation::dns::DnsHandle) {
    let (mut world, rx) = World::new();
    world.site("east", SiteState::Fresh);
    world.export(export(
        "east",
        "web",
        vec![port("http", 80, 8080)],
        vec![ep("10.1.0.1", None)],
    ));
    world.publish();
    let dns = start(Config::for_test("east"), rx).await;
    (world, dns)
}

#[tokio::test]
async fn unknown_name_in_the_zone_is_nxdomain_with_the_soa_for_negative_caching() {
    let (world, dns) = one_service().await;
    for t in BOTH {
        for name in [
            svc("nope"),
            format!("x.{}", svc("web")),
            "nope.clusterset.local.".into(),
        ] {
            let msg = ask(dns.local_addr(), t, &name, RecordType::A).await;
            assert_eq!(
                msg.metadata.response_code,
                ResponseCode::NXDomain,
                "{t:?} {name}"
            );
            assert!(msg.metadata.authoritative);
            assert!(msg.answers.is_empty());
            let (serial, minimum) = soa_of(&msg).expect("SOA in authority");
            assert_eq!(u64::from(serial), world.catalog.revision);
            assert_eq!(minimum, 5);
        }
    }
}

#[tokio::test]
async fn known_name_without_the_type_is_nodata_with_the_soa() {
    let (_world, dns) = one_service().await;
    for t in BOTH {
        for (name, rtype) in [
            (svc("web"), RecordType::TXT),
            (svc("web"), RecordType::MX),
            // Empty non-terminals exist.
            (format!("{NS}.svc.clusterset.local."), RecordType::A),
            ("svc.clusterset.local.".into(), RecordType::A),
        ] {
            let msg = ask(dns.local_addr(), t, &name, rtype).await;
            assert_eq!(
                msg.metadata.response_code,
                ResponseCode::NoError,
                "{t:?} {name}"
            );
            assert!(msg.answers.is_empty(), "{t:?} {name}");
            assert!(soa_of(&msg).is_some(), "{t:?} {name}");
        }
    }
}

#[tokio::test]
async fn names_are_case_insensitive() {
    let (_world, dns) = one_service().await;
    let msg = ask(
        dns.local_addr(),
        Transport::Udp,
        "WEB.Shop.SVC.ClusterSet.Local.",
        RecordType::A,
    )
    .await;
    assert_eq!(addresses(&msg), ips(&["10.1.0.1"]));
}

#[tokio::test]
async fn outside_the_zone_is_refused_without_an_upstream() {
    let (_world, dns) = one_service().await;
    for t in BOTH {
        let msg = ask(dns.local_addr(), t, "example.com.", RecordType::A).await;
        assert_eq!(msg.metadata.response_code, ResponseCode::Refused, "{t:?}");
        assert!(!msg.metadata.authoritative);
        assert!(!msg.metadata.recursion_available);
    }
}

#[tokio::test]
async fn outside_the_zone_is_forwarded_to_the_upstream_and_its_answer_relayed() {
    // The upstream: another instance, authoritative for another zone.
    let (mut up_world, up_rx) = World::new();
    up_world.site("far", SiteState::Fresh);
    up_world.export(export(
        "far",
        "billing",
        vec![port("http", 80, 80)],
        vec![ep("10.9.0.1", None)],
    ));
    up_world.publish();
    let upstream = start(
        Config {
            zone: "upstream.test".into(),
            ..Config::for_test("far")
        },
        up_rx,
    )
    .await;

    let (mut world, rx) = World::new();
    world.site("east", SiteState::Fresh);
    world.publish();
    let config = Config {
        upstream: Some(upstream.local_addr().to_string()),
        ..Config::for_test("east")
    };
    let dns = start(config, rx).await;
    for t in BOTH {
        let msg = ask(
            dns.local_addr(),
            t,
            "billing.shop.svc.upstream.test.",
            RecordType::A,
        )
        .await;
        assert_eq!(msg.metadata.response_code, ResponseCode::NoError, "{t:?}");
        assert_eq!(addresses(&msg), ips(&["10.9.0.1"]), "{t:?}");
        assert!(!msg.metadata.authoritative && msg.metadata.recursion_available);

        let txt = ask(
            dns.local_addr(),
            t,
            "dns-version.upstream.test.",
            RecordType::TXT,
        )
        .await;
        assert!(
            matches!(&txt.answers[0].data, RData::TXT(v) if v.to_string() == DNS_SCHEMA_VERSION)
        );

        // The upstream's negative answer is relayed, with its SOA.
        let nx = ask(dns.local_addr(), t, "nope.upstream.test.", RecordType::A).await;
        assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain, "{t:?}");
        assert!(soa_of(&nx).is_some());
        // The upstream refuses what is outside its own zone; that is relayed too.
        let refused = ask(dns.local_addr(), t, "example.com.", RecordType::A).await;
        assert_eq!(
            refused.metadata.response_code,
            ResponseCode::Refused,
            "{t:?}"
        );
        // Its own zone is still answered locally.
        let local = ask(
            dns.local_addr(),
            t,
            "dns-version.clusterset.local.",
            RecordType::TXT,
        )
        .await;
        assert!(local.metadata.authoritative);
    }
}

#[tokio::test]
async fn an_unreachable_upstream_gives_servfail_within_the_timeout() {
    // A bound UDP socket that never answers.
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (mut world, rx) = World::new();
    world.publish();
    let config = Config {
        upstream: Some(silent.local_addr().unwrap().to_string()),
        upstream_timeout_ms: 200,
        ..Config::for_test("east")
    };
    let dns = start(config, rx).await;
    let started = tokio::time::Instant::now();
    let msg = ask(
        dns.local_addr(),
        Transport::Tcp,
        "example.com.",
        RecordType::A,
    )
    .await;
    assert_eq!(msg.metadata.response_code, ResponseCode::ServFail);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn other_opcodes_classes_and_zone_transfers_are_not_served() {
    use hickory_proto::op::{Message, OpCode, Query};
    use hickory_proto::rr::{DNSClass, Name};
    let (_world, dns) = one_service().await;
    let name = Name::from_ascii(svc("web")).unwrap();
    let mut notify = Message::query();
    notify.metadata.op_code = OpCode::Notify;
    notify.add_query(Query::query(name.clone(), RecordType::SOA));
    let mut chaos = Message::query();
    let mut q = Query::query(name.clone(), RecordType::TXT);
    q.set_query_class(DNSClass::CH);
    chaos.add_query(q);
    let mut axfr = Message::query();
    axfr.add_query(Query::query(
        Name::from_ascii("clusterset.local.").unwrap(),
        RecordType::AXFR,
    ));
    for (msg, want) in [
        (notify, ResponseCode::NotImp),
        (chaos, ResponseCode::Refused),
        (axfr, ResponseCode::Refused),
    ] {
        let reply = ask_raw(dns.local_addr(), Transport::Tcp, &msg.to_vec().unwrap()).await;
        assert_eq!(reply.metadata.response_code, want);
    }
}
