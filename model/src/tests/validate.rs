//! Validation names the offending field precisely; valid edge cases pass.

use super::*;

#[test]
fn invalid_commands_name_the_field() {
    let cases: Vec<(&str, Command, &str)> = vec![
        (
            "uppercase site",
            site_with(|s| s.name = "Site-A".into()),
            "spec.name",
        ),
        ("empty site", site_with(|s| s.name.clear()), "spec.name"),
        (
            "long site",
            site_with(|s| s.name = "a".repeat(64)),
            "spec.name",
        ),
        (
            "trailing dash",
            site_with(|s| s.name = "a-".into()),
            "spec.name",
        ),
        (
            "zone with space",
            site_with(|s| s.locality.zone = "eu 1".into()),
            "spec.locality.zone",
        ),
        (
            "region too long",
            site_with(|s| s.locality.region = "r".repeat(64)),
            "spec.locality.region",
        ),
        (
            "gateway not host:port",
            site_with(|s| s.gateways.push("nope".into())),
            "spec.gateways[1]",
        ),
        (
            "gateway port 0",
            site_with(|s| s.gateways = vec!["gw:0".into()]),
            "spec.gateways[0]",
        ),
        (
            "gateway port big",
            site_with(|s| s.gateways = vec!["gw:70000".into()]),
            "spec.gateways[0]",
        ),
        (
            "gateway bare ipv6",
            site_with(|s| s.gateways = vec!["::1:443".into()]),
            "spec.gateways[0]",
        ),
        (
            "gateway unspecified",
            site_with(|s| s.gateways = vec!["0.0.0.0:443".into()]),
            "spec.gateways[0]",
        ),
        (
            "gateway bad host",
            site_with(|s| s.gateways = vec!["g_w:443".into()]),
            "spec.gateways[0]",
        ),
        (
            "gateway dup",
            site_with(|s| s.gateways.push(s.gateways[0].clone())),
            "spec.gateways[1]",
        ),
        (
            "too many gateways",
            site_with(|s| s.gateways = (0..65).map(|i| format!("10.0.0.{i}:443")).collect()),
            "spec.gateways",
        ),
        (
            "zero ttl",
            site_with(|s| s.lease_ttl_ms = 0),
            "spec.lease_ttl_ms",
        ),
        (
            "export site",
            export_with(|e| e.site = "A".into()),
            "export.site",
        ),
        (
            "namespace empty",
            export_with(|e| e.service.namespace.clear()),
            "export.service.namespace",
        ),
        (
            "service name dash",
            export_with(|e| e.service.name = "-echo".into()),
            "export.service.name",
        ),
        (
            "port name case",
            export_with(|e| e.ports[0].name = "HTTP".into()),
            "export.ports[0].name",
        ),
        (
            "port name dup",
            export_with(|e| e.ports.push(port("http", 81))),
            "export.ports[1].name",
        ),
        (
            "unnamed of two",
            export_with(|e| e.ports.push(port("", 81))),
            "export.ports[1].name",
        ),
        (
            "port 0",
            export_with(|e| e.ports[0].port = 0),
            "export.ports[0].port",
        ),
        (
            "target 0",
            export_with(|e| e.ports[0].target_port = 0),
            "export.ports[0].target_port",
        ),
        (
            "port number dup",
            export_with(|e| e.ports.push(port("web", 80))),
            "export.ports[1].port",
        ),
        ("no ports", export_with(|e| e.ports.clear()), "export.ports"),
        (
            "too many ports",
            export_with(|e| e.ports = (1..=257).map(|i| port(&format!("p{i}"), i)).collect()),
            "export.ports",
        ),
        (
            "unspecified",
            export_with(|e| e.endpoints[2].address = ip("0.0.0.0")),
            "export.endpoints[2].address",
        ),
        (
            "multicast",
            export_with(|e| e.endpoints[1].address = ip("ff02::1")),
            "export.endpoints[1].address",
        ),
        (
            "broadcast",
            export_with(|e| e.endpoints[0].address = ip("255.255.255.255")),
            "export.endpoints[0].address",
        ),
        (
            "dup address",
            export_with(|e| e.endpoints[2].address = ip("10.0.0.1")),
            "export.endpoints[2].address",
        ),
        (
            "ready weight 0",
            export_with(|e| e.endpoints[1].weight = 0),
            "export.endpoints[1].weight",
        ),
        (
            "bad hostname",
            export_with(|e| e.endpoints[0].hostname = Some("Web_0".into())),
            "export.endpoints[0].hostname",
        ),
        (
            "dup hostname",
            export_with(|e| {
                e.endpoints[0].hostname = Some("web-0".into());
                e.endpoints[2].hostname = Some("web-0".into());
            }),
            "export.endpoints[2].hostname",
        ),
        (
            "identity not spiffe",
            export_with(|e| e.endpoints[1].identity = Some("https://corp.example/x".into())),
            "export.endpoints[1].identity",
        ),
        (
            "too many endpoints",
            export_with(|e| {
                e.endpoints = (0..=MAX_ENDPOINTS as u32)
                    .map(|i| Endpoint {
                        address: IpAddr::from((0x0a00_0001 + i).to_be_bytes()),
                        ..ep("10.0.0.1")
                    })
                    .collect();
            }),
            "export.endpoints",
        ),
        (
            "heartbeat site",
            Command::Heartbeat {
                site: "B".into(),
                at_ms: 0,
                links: None,
                instance: String::new(),
                xds_rejections: None,
            },
            "site",
        ),
        (
            "remove site",
            Command::RemoveSite {
                site: String::new(),
            },
            "site",
        ),
        (
            "delete export service",
            Command::DeleteExport {
                site: "a".into(),
                service: ServiceKey::new("default", "Echo"),
                generation: 1,
            },
            "service.name",
        ),
        (
            "delete export site",
            Command::DeleteExport {
                site: "a.b".into(),
                service: key(),
                generation: 1,
            },
            "site",
        ),
        (
            "policy name",
            policy_with(|p| p.name = "Allow".into()),
            "policy.name",
        ),
        (
            "policy service",
            policy_with(|p| p.service.namespace = "x_y".into()),
            "policy.service.namespace",
        ),
        (
            "policy principal",
            policy_with(|p| {
                p.allow = vec![Principal::Site("a".into()), Principal::Id("bob".into())]
            }),
            "policy.allow[1]",
        ),
        (
            "policy td",
            policy_with(|p| p.allow = vec![Principal::TrustDomain("".into())]),
            "policy.allow[0]",
        ),
        (
            "too many principals",
            policy_with(|p| p.allow = vec![Principal::Site("a".into()); MAX_PRINCIPALS + 1]),
            "policy.allow",
        ),
        (
            "delete policy",
            Command::DeletePolicy {
                name: "a..b".into(),
            },
            "name",
        ),
        (
            "token id empty",
            Command::UseToken {
                id: "".into(),
                site: "a".into(),
                expires_ms: 9,
                at_ms: 0,
            },
            "id",
        ),
        (
            "token id space",
            Command::UseToken {
                id: "a b".into(),
                site: "a".into(),
                expires_ms: 9,
                at_ms: 0,
            },
            "id",
        ),
        (
            "token site",
            Command::UseToken {
                id: "t".into(),
                site: "A".into(),
                expires_ms: 9,
                at_ms: 0,
            },
            "site",
        ),
    ];
    for (name, cmd, field) in cases {
        match cmd.validate() {
            Err(Rejection::Invalid { field: got, reason }) => {
                assert_eq!(got, field, "{name}: {reason}");
                assert!(!reason.is_empty(), "{name}: empty reason");
            }
            other => panic!("{name}: expected Invalid {field}, got {other:?}"),
        }
        // apply runs the same validation, against any catalog.
        let mut c = populated();
        assert_eq!(field_of(c.apply(&cmd)), field, "{name} (apply)");
    }
}

#[test]
fn valid_edge_cases_pass() {
    let max_eps: Vec<Endpoint> = (0..MAX_ENDPOINTS as u32)
        .map(|i| Endpoint {
            address: IpAddr::from((0x0a00_0001 + i).to_be_bytes()),
            ..ep("10.0.0.1")
        })
        .collect();
    let cases: Vec<(&str, Command)> = vec![
        (
            "ipv6 gateway",
            site_with(|s| s.gateways = vec!["[2001:db8::1]:15443".into()]),
        ),
        (
            "ipv4 gateway",
            site_with(|s| s.gateways = vec!["192.0.2.1:443".into()]),
        ),
        (
            "host gateway",
            site_with(|s| s.gateways = vec!["GW-1.Example.com:443".into()]),
        ),
        ("no gateways", site_with(|s| s.gateways.clear())),
        (
            "empty locality",
            site_with(|s| s.locality = Locality::default()),
        ),
        ("63-char name", site_with(|s| s.name = "a".repeat(63))),
        ("zero grace", site_with(|s| s.grace_ms = 0)),
        (
            "single unnamed port",
            export_with(|e| e.ports[0].name.clear()),
        ),
        (
            "headless without ports",
            export_with(|e| {
                e.ports.clear();
                e.headless = true;
            }),
        ),
        (
            "same port other protocol",
            export_with(|e| {
                e.ports.push(Port {
                    name: "dns".into(),
                    port: 80,
                    protocol: Protocol::Udp,
                    target_port: 53,
                    app_protocol: None,
                })
            }),
        ),
        (
            "not ready weight 0",
            export_with(|e| {
                e.endpoints[0].ready = false;
                e.endpoints[0].weight = 0;
            }),
        ),
        (
            "spiffe identity",
            export_with(|e| {
                e.endpoints[0].identity = Some("spiffe://corp.example/ns/a/sa/b".into())
            }),
        ),
        (
            "loopback endpoint",
            export_with(|e| e.endpoints[0].address = ip("127.0.0.1")),
        ),
        (
            "max endpoints",
            export_with(|e| e.endpoints = max_eps.clone()),
        ),
        (
            "policy",
            policy_with(|p| {
                p.name = "allow.echo-from-eu".into();
                p.allow = vec![
                    Principal::IdPrefix("spiffe://corp.example/ns/billing/".into()),
                    Principal::TrustDomain("partner.example".into()),
                ];
            }),
        ),
        ("tick", Command::Tick { at_ms: 0 }),
    ];
    for (name, cmd) in cases {
        assert_eq!(cmd.validate(), Ok(()), "{name}");
    }
    assert!(is_dns_label("k8s-east-1"));
    assert!(!is_dns_label("k8s.east"));
}
