//! Following the catalog, surviving its source, metrics, shutdown.

use std::sync::Arc;
use std::time::Duration;

use hickory_proto::rr::RecordType;
use meshbridge_core::drain::Outcome;
use meshbridge_core::model::{Site, SiteState};
use meshbridge_federation::dns::{Config, Transport};
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use crate::fixture::*;

/// Poll until `name` has addresses `want` (bounded: a few seconds), and how long it took.
async fn until_resolves(addr: std::net::SocketAddr, name: &str, want: &[&str]) -> Duration {
    let started = Instant::now();
    let want = ips(want);
    loop {
        let msg = ask(addr, Transport::Udp, name, RecordType::A).await;
        if addresses(&msg) == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{name} never resolved to {want:?}; last {msg:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn a_new_export_is_answered_promptly() {
    let (mut world, rx) = World::new();
    world.site("east", SiteState::Fresh);
    world.publish();
    let dns = start(Config::for_test("east"), rx).await;
    let before = ask(dns.local_addr(), Transport::Udp, &svc("web"), RecordType::A).await;
    assert_eq!(
        before.metadata.response_code,
        hickory_proto::op::ResponseCode::NXDomain
    );

    world.export(export(
        "east",
        "web",
        vec![port("http", 80, 80)],
        vec![ep("10.1.0.1", None)],
    ));
    world.publish();
    let took = until_resolves(dns.local_addr(), &svc("web"), &["10.1.0.1"]).await;
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_eq!(dns.revision(), world.catalog.revision);
}

#[tokio::test]
async fn keeps_answering_after_the_catalog_source_is_gone() {
    let (mut world, rx) = World::new();
    world.site("east", SiteState::Fresh);
    world.export(export(
        "east",
        "web",
        vec![port("http", 80, 80)],
        vec![ep("10.1.0.1", None)],
    ));
    world.publish();
    let dns = start(Config::for_test("east"), rx).await;
    let revision = world.catalog.revision;
    drop(world); // the registry client and its watch sender are gone
    tokio::time::sleep(Duration::from_millis(50)).await;
    for t in BOTH {
        for _ in 0..3 {
            let msg = ask(dns.local_addr(), t, &svc("web"), RecordType::A).await;
            assert_eq!(addresses(&msg), ips(&["10.1.0.1"]), "{t:?}");
        }
    }
    assert_eq!(dns.revision(), revision);
    assert_eq!(
        dns.shutdown(Duration::from_secs(2)).await,
        Outcome::Graceful
    );
}

/// A repeated UDP query is answered from the answering thread's cache: each copy must carry
/// its own id and question (case included), answer exactly what the first got, and follow
/// a catalog change at once.
#[tokio::test]
async fn repeated_queries_get_their_own_id_and_case_and_follow_changes() {
    let (mut world, rx) = World::new();
    world.site("east", SiteState::Fresh);
    world.export(export(
        "east",
        "web",
        vec![port("http", 80, 80)],
        vec![ep("10.1.0.1", None)],
    ));
    world.publish();
    let dns = start(Config::for_test("east"), rx).await;
    let addr = dns.local_addr();
    let name = svc("web");
    let upper = name.to_uppercase();
    let first = raw_udp(addr, &query_bytes(1, &name, RecordType::A, Some(1232)))
        .await
        .expect("no reply");
    // Enough repeats that every UDP thread has answered (and cached) it several times.
    for id in 2..64u16 {
        let again = raw_udp(addr, &query_bytes(id, &name, RecordType::A, Some(1232)))
            .await
            .expect("no reply");
        assert_eq!(
            again[..2],
            id.to_be_bytes(),
            "id of the answer to query {id}"
        );
        assert_eq!(again[2..], first[2..], "answer to query {id}");
        let shouted = ask_raw(
            addr,
            Transport::Udp,
            &query_bytes(id, &upper, RecordType::A, Some(1232)),
        )
        .await;
        assert_eq!(shouted.metadata.id, id);
        assert_eq!(shouted.queries[0].name().to_string(), upper);
        assert_eq!(addresses(&shouted), ips(&["10.1.0.1"]));
    }

    world.export(export(
        "east",
        "web",
        vec![port("http", 80, 80)],
        vec![ep("10.1.0.2", None)],
    ));
    world.publish();
    let revision = world.catalog.revision;
    let started = Instant::now();
    while dns.revision() != revision {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "index never followed"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // The index in use changed: no thread may answer from the old one's cache.
    for id in 100..164u16 {
        let msg = ask_raw(
            addr,
            Transport::Udp,
            &query_bytes(id, &name, RecordType::A, Some(1232)),
        )
        .await;
        assert_eq!(msg.metadata.id, id);
        assert_eq!(addresses(&msg), ips(&["10.1.0.2"]), "query {id}");
    }
}

#[tokio::test]
async fn heartbeats_alone_do_not_rebuild_the_index() {
    let (mut world, rx) = World::new();
    world.site("east", SiteState::Fresh);
    world.publish();
    let dns = start(Config::for_test("east"), rx).await;
    let builds = || dns.metrics().index_builds.get();
    assert_eq!(builds(), 1);
    for at in 1..20 {
        let site = world.catalog.sites["east"].clone();
        world.catalog.sites.insert(
            "east".into(),
            Arc::new(Site {
                last_heartbeat_ms: at * 1000,
                ..(*site).clone()
            }),
        );
        world.publish();
    }
    // A real change after the heartbeats: once it is visible, the heartbeats were seen too.
    world.export(export(
        "east",
        "web",
        vec![port("http", 80, 80)],
        vec![ep("10.1.0.1", None)],
    ));
    world.publish();
    until_resolves(dns.local_addr(), &svc("web"), &["10.1.0.1"]).await;
    assert_eq!(builds(), 2);
}

#[tokio::test]
async fn metrics_count_queries_by_rcode_and_transport() {
    let (mut world, rx) = World::new();
    world.publish();
    let dns = start(Config::for_test("east"), rx).await;
    let mut registry = Registry::default();
    dns.metrics().register(&mut registry);
    ask(
        dns.local_addr(),
        Transport::Udp,
        "nope.clusterset.local.",
        RecordType::A,
    )
    .await;
    ask(
        dns.local_addr(),
        Transport::Tcp,
        "example.com.",
        RecordType::A,
    )
    .await;
    let lines = [
        "meshbridge_dns_queries_total{rcode=\"NXDOMAIN\",transport=\"udp\"} 1",
        "meshbridge_dns_queries_total{rcode=\"REFUSED\",transport=\"tcp\"} 1",
        "meshbridge_dns_query_duration_seconds_count 2",
        "meshbridge_dns_index_builds_total 1",
    ];
    // A query is counted once its answer has been sent, so the client may read the answer
    // before the count moves: poll (bounded) rather than read once.
    let mut text = String::new();
    for _ in 0..300 {
        text.clear();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        if lines.iter().all(|l| text.contains(l)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    for line in lines {
        assert!(text.contains(line), "{line} not in\n{text}");
    }
}

#[tokio::test]
async fn shutdown_stops_answering_and_frees_the_port() {
    let (mut world, rx) = World::new();
    world.publish();
    let dns = start(Config::for_test("east"), rx).await;
    let addr = dns.local_addr();
    ask(addr, Transport::Tcp, "clusterset.local.", RecordType::SOA).await;
    assert_eq!(
        dns.shutdown(Duration::from_secs(2)).await,
        Outcome::Graceful
    );
    let q = query_bytes(1, "clusterset.local.", RecordType::SOA, None);
    assert!(raw_udp(addr, &q).await.is_none());
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    // The same port can be served again.
    let (_world, rx) = World::new();
    let again = start(
        Config {
            listen: addr.to_string(),
            ..Config::for_test("east")
        },
        rx,
    )
    .await;
    assert_eq!(again.local_addr(), addr);
}

#[tokio::test]
async fn bad_config_is_refused_with_every_problem() {
    let (_world, rx) = World::new();
    let config = Config {
        site: "Not A Label".into(),
        listen: "nowhere".into(),
        ..Config::default()
    };
    let err = meshbridge_federation::dns::DnsServer::start(config, rx)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("listen") && err.contains("site"), "{err}");
}
