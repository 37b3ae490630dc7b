//! The DNS handler's whole message path (parse, look up, build, size for UDP or TCP) on
//! arbitrary bytes, over a small catalog with a regular, a headless and a VIP'd service.
//! The answer, when there is one, must parse as a DNS message.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use meshbridge_model::{Catalog, Command, Endpoint, Export, Locality, Port, Protocol, ServiceKey, SiteKind, SiteSpec};
use meshbridge_federation::dns::{Config, Index, Transport, answer};

fn index() -> &'static Index {
    static INDEX: OnceLock<Index> = OnceLock::new();
    INDEX.get_or_init(|| {
        let mut c = Catalog::default();
        let site = SiteSpec {
            name: "east".into(),
            kind: SiteKind::Cluster,
            locality: Locality::default(),
            gateways: vec!["127.0.0.1:15008".into()],
            lease_ttl_ms: 10_000,
            grace_ms: 10_000,
            instance: String::new(),
        };
        let _ = c.apply(&Command::RegisterSite { spec: site, at_ms: 1 });
        for (name, headless) in [("web", false), ("db", true)] {
            let export = Export {
                site: "east".into(),
                service: ServiceKey::new("shop", name),
                generation: 1,
                ports: vec![Port { name: "tcp".into(), port: 80, protocol: Protocol::Tcp, target_port: 8080, app_protocol: None }],
                endpoints: (1..=40u8)
                    .map(|i| Endpoint {
                        address: std::net::IpAddr::from([10, 0, 0, i]),
                        hostname: Some(format!("h{i}")),
                        ready: true,
                        weight: 1,
                        identity: None,
                        zone: None,
                    })
                    .collect(),
                headless,
                created_revision: 0,
                updated_revision: 0,
            };
            let _ = c.apply(&Command::PutExport { export });
        }
        let mut cfg = Config::for_test("east");
        cfg.vip_range = "127.240.0.0/16".parse().ok();
        Index::build(&cfg, &Arc::new(c)).expect("index")
    })
}

fuzz_target!(|data: &[u8]| {
    for transport in [Transport::Udp, Transport::Tcp] {
        if let Some(out) = answer(index(), data, transport) {
            assert!(hickory_proto::op::Message::from_vec(&out).is_ok(), "unparsable answer");
        }
    }
});
