//! A stub resolver library (hickory-resolver) against the server: what applications see.

use std::net::SocketAddr;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use meshbridge_core::model::SiteState;
use meshbridge_federation::dns::Config;

use crate::fixture::*;

fn resolver(addr: SocketAddr) -> TokioResolver {
    let connections = [ConnectionConfig::udp(), ConnectionConfig::tcp()]
        .into_iter()
        .map(|mut c| {
            c.port = addr.port();
            c
        })
        .collect();
    let ns = NameServerConfig::new(addr.ip(), true, connections);
    let mut builder = TokioResolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![ns]),
        TokioRuntimeProvider::default(),
    );
    builder.options_mut().cache_size = 0;
    builder.build().unwrap()
}

#[tokio::test]
async fn a_stub_resolver_follows_tc_to_tcp_and_gets_every_endpoint() {
    let (mut world, rx) = World::new();
    world.site("east", SiteState::Fresh);
    let eps: Vec<_> = (0..200)
        .map(|i| ep(&format!("10.7.{}.{}", i / 100, i % 100 + 1), None))
        .collect();
    world.export(headless("east", "big", vec![port("http", 80, 80)], eps));
    world.export(export(
        "east",
        "web",
        vec![port("http", 80, 8080)],
        vec![ep("10.1.0.1", None)],
    ));
    world.publish();
    let dns = start(Config::for_test("east"), rx).await;
    let resolver = resolver(dns.local_addr());

    let big = resolver.lookup_ip(svc("big")).await.unwrap();
    assert_eq!(big.iter().count(), 200);

    let web = resolver.lookup_ip(svc("web")).await.unwrap();
    assert_eq!(web.iter().collect::<Vec<_>>(), ips(&["10.1.0.1"]));

    let srv = resolver
        .srv_lookup(format!("_http._tcp.{}", svc("web")))
        .await
        .unwrap();
    let records: Vec<_> = srv.answers().iter().collect();
    assert_eq!(records.len(), 1);

    let missing = resolver.lookup_ip(svc("nope")).await.unwrap_err();
    assert!(missing.is_nx_domain(), "{missing:?}");
}
