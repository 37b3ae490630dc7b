//! The state machine: fencing, idempotence, revisions, sites, policies, tokens, atomicity.

use super::*;

#[test]
fn revision_moves_by_one_per_command_with_changes() {
    let mut c = Catalog::default();
    let policy = Policy {
        name: "p".into(),
        service: key(),
        allow: vec![],
    };
    let steps: Vec<(Command, u64, Vec<&str>)> = vec![
        (
            Command::RegisterSite {
                spec: spec("a", "eu", "eu-1a"),
                at_ms: 0,
            },
            1,
            vec!["site+"],
        ),
        (
            Command::RegisterSite {
                spec: spec("a", "eu", "eu-1a"),
                at_ms: 0,
            },
            1,
            vec![],
        ),
        (
            Command::PutExport {
                export: export("a", 1, &["10.0.0.1"]),
            },
            2,
            vec!["export+"],
        ),
        (
            Command::PutExport {
                export: export("a", 1, &["10.0.0.1"]),
            },
            2,
            vec![],
        ),
        (
            Command::PutExport {
                export: export("a", 2, &["10.0.0.2"]),
            },
            3,
            vec!["export+"],
        ),
        (
            Command::Heartbeat {
                site: "a".into(),
                at_ms: 1_000,
                links: None,
                instance: String::new(),
                xds_rejections: None,
            },
            4,
            vec!["site+"],
        ),
        (
            Command::Heartbeat {
                site: "a".into(),
                at_ms: 1_000,
                links: None,
                instance: String::new(),
                xds_rejections: None,
            },
            4,
            vec![],
        ),
        (Command::Tick { at_ms: 2_000 }, 4, vec![]),
        (
            Command::PutPolicy {
                policy: policy.clone(),
            },
            5,
            vec!["policy+"],
        ),
        (Command::PutPolicy { policy }, 5, vec![]),
        (
            Command::UseToken {
                id: "t".into(),
                site: "a".into(),
                expires_ms: 9_000,
                at_ms: 1_000,
            },
            6,
            vec!["token+"],
        ),
        (
            Command::DeleteExport {
                site: "a".into(),
                service: key(),
                generation: 2,
            },
            7,
            vec!["export-"],
        ),
        (
            Command::DeletePolicy { name: "p".into() },
            8,
            vec!["policy-"],
        ),
        (Command::Tick { at_ms: 9_500 }, 8, vec![]),
        (
            Command::Tick {
                at_ms: 9_001 + USED_TOKEN_KEEP_MS,
            },
            9,
            // The site's lease lapsed long ago too.
            vec!["site+", "token-"],
        ),
        (
            Command::RemoveSite { site: "a".into() },
            10,
            vec!["site-", "revoked"],
        ),
    ];
    for (i, (cmd, revision, changes)) in steps.into_iter().enumerate() {
        let applied = c.apply(&cmd).unwrap();
        assert_eq!(applied.revision, revision, "step {i}: {cmd:?}");
        assert_eq!(c.revision, revision, "step {i}");
        assert_eq!(kinds(&applied), changes, "step {i}: {cmd:?}");
    }
}

#[test]
fn put_export_generation_fencing() {
    let stored = export("a", 5, &["10.0.0.1"]);
    let other = export("a", 5, &["10.0.0.9"]);
    // Ok(number of changes) or Err((got, stored)) of a StaleGeneration.
    type Case = (&'static str, Export, Result<usize, (u64, u64)>);
    let cases: Vec<Case> = vec![
        (
            "older generation",
            export("a", 4, &["10.0.0.1"]),
            Err((4, 5)),
        ),
        ("same generation, same content", stored.clone(), Ok(0)),
        (
            "same generation, same content, other revisions",
            Export {
                created_revision: 77,
                ..stored.clone()
            },
            Ok(0),
        ),
        ("same generation, other content", other, Err((5, 5))),
        ("newer generation", export("a", 6, &["10.0.0.9"]), Ok(1)),
    ];
    for (name, attempt, want) in cases {
        let mut c = Catalog::default();
        register(&mut c, "a", "eu", "eu-1a", 0);
        put(&mut c, stored.clone()).unwrap();
        let before = c.clone();
        match (put(&mut c, attempt), want) {
            (Ok(a), Ok(n)) => assert_eq!(a.changes.len(), n, "{name}"),
            (
                Err(Rejection::StaleGeneration {
                    got,
                    stored,
                    site,
                    service,
                }),
                Err((g, s)),
            ) => {
                assert_eq!((got, stored), (g, s), "{name}");
                assert_eq!(
                    (site.as_str(), service.as_str()),
                    ("a", "default/echo"),
                    "{name}"
                );
                assert_eq!(c, before, "{name}: rejection changed the catalog");
            }
            (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn export_is_replaced_whole_and_keeps_created_revision() {
    let mut c = Catalog::default();
    register(&mut c, "a", "eu", "eu-1a", 0);
    put(&mut c, export("a", 1, &["10.0.0.1", "10.0.0.2"])).unwrap();
    register(&mut c, "b", "eu", "eu-1a", 0);
    let a = put(&mut c, export("a", 2, &["10.0.0.3"])).unwrap();
    let e = c.export(&key(), "a").unwrap();
    assert_eq!(e.endpoints, vec![ep("10.0.0.3")]);
    assert_eq!((e.created_revision, e.updated_revision), (2, 4));
    assert_eq!(
        a.changes,
        vec![Change::ExportUpserted { export: e.clone() }]
    );
    // Deleted then exported again (with a higher generation): a new first export.
    c.apply(&Command::DeleteExport {
        site: "a".into(),
        service: key(),
        generation: 3,
    })
    .unwrap();
    put(&mut c, export("a", 4, &["10.0.0.4"])).unwrap();
    let e = c.export(&key(), "a").unwrap();
    assert_eq!((e.created_revision, e.updated_revision), (6, 6));
}

#[test]
fn put_export_needs_a_live_site() {
    let mut c = Catalog::default();
    assert_eq!(
        put(&mut c, export("a", 1, &["10.0.0.1"])),
        Err(Rejection::NotFound {
            what: "site".into(),
            name: "a".into()
        })
    );
    register(&mut c, "a", "eu", "eu-1a", 0);
    tick(&mut c, TTL + GRACE);
    assert_eq!(
        put(&mut c, export("a", 1, &["10.0.0.1"])),
        Err(Rejection::Withdrawn {
            site: "a".into(),
            since_ms: TTL + GRACE
        })
    );
}

#[test]
fn delete_export_fencing() {
    let cases: Vec<(&str, &str, u64, Option<Rejection>)> = vec![
        (
            "older",
            "a",
            2,
            Some(Rejection::StaleGeneration {
                site: "a".into(),
                service: "default/echo".into(),
                got: 2,
                stored: 3,
            }),
        ),
        ("same", "a", 3, None),
        ("newer", "a", 9, None),
        (
            "missing",
            "b",
            3,
            Some(Rejection::NotFound {
                what: "export".into(),
                name: "default/echo from site b".into(),
            }),
        ),
    ];
    for (name, site, generation, want) in cases {
        let mut c = Catalog::default();
        register(&mut c, "a", "eu", "eu-1a", 0);
        register(&mut c, "b", "eu", "eu-1a", 0);
        put(&mut c, export("a", 3, &["10.0.0.1"])).unwrap();
        let cmd = Command::DeleteExport {
            site: site.into(),
            service: key(),
            generation,
        };
        match (c.apply(&cmd), want) {
            (Ok(a), None) => {
                assert_eq!(
                    a.changes,
                    vec![Change::ExportRemoved {
                        service: key(),
                        site: site.into()
                    }]
                );
                assert!(c.service(&key()).is_none(), "{name}");
            }
            (Err(got), Some(want)) => assert_eq!(got, want, "{name}"),
            (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn policies_upsert_and_delete() {
    let mut c = populated();
    let mut p = (**c.policies.get("echo-from-eu").unwrap()).clone();
    p.allow
        .push(Principal::Id("spiffe://corp.example/ns/x/sa/y".into()));
    let a = c.apply(&Command::PutPolicy { policy: p.clone() }).unwrap();
    assert_eq!(
        a.changes,
        vec![Change::PolicyUpserted { policy: p.clone() }]
    );
    assert_eq!(*c.policies["echo-from-eu"], p);
    c.apply(&Command::DeletePolicy {
        name: p.name.clone(),
    })
    .unwrap();
    assert!(c.policies.is_empty());
}

#[test]
fn deleted_export_cannot_be_resurrected_by_an_older_or_equal_generation() {
    let mut c = Catalog::default();
    register(&mut c, "a", "eu", "eu-1a", 0);
    put(&mut c, export("a", 3, &["10.0.0.1"])).unwrap();
    let del = Command::DeleteExport {
        site: "a".into(),
        service: key(),
        generation: 5,
    };
    c.apply(&del).unwrap();
    for generation in [3, 4, 5] {
        let before = c.clone();
        let got = c.apply(&Command::PutExport {
            export: export("a", generation, &["10.0.0.1"]),
        });
        assert_eq!(
            got,
            Err(Rejection::StaleGeneration {
                site: "a".into(),
                service: "default/echo".into(),
                got: generation,
                stored: 5,
            }),
            "generation {generation}"
        );
        assert_eq!(c, before);
    }
    put(&mut c, export("a", 6, &["10.0.0.2"])).unwrap();
    assert_eq!(
        c.service(&key()).unwrap().groups[0].endpoints[0]
            .address
            .to_string(),
        "10.0.0.2"
    );
    // The tombstone survives a JSON round trip (it is part of the replicated state).
    let json = serde_json::to_string(&c).unwrap();
    let back: Catalog = serde_json::from_str(&json).unwrap();
    assert_eq!(back, c);
}

#[test]
fn heartbeats_carry_link_reports_and_bad_ones_name_the_field() {
    let mut c = Catalog::default();
    register(&mut c, "a", "eu", "eu-1a", 0);
    let link = |peer: &str, up: bool| Link {
        peer_site: peer.into(),
        connected: up,
        transport: up.then(|| "quic".to_string()),
        rtt_us: up.then_some(250),
        failures: if up { 0 } else { 3 },
        last_error: (!up).then(|| "peer b: unknown issuer".to_string()),
    };
    let hb = |links: Option<Vec<Link>>, at_ms| Command::Heartbeat {
        site: "a".into(),
        at_ms,
        links,
        instance: String::new(),
        xds_rejections: None,
    };
    c.apply(&hb(Some(vec![link("b", true), link("c", false)]), 10))
        .unwrap();
    assert_eq!(
        c.site("a").unwrap().links,
        vec![link("b", true), link("c", false)]
    );
    // A heartbeat without a report keeps the last one.
    c.apply(&hb(None, 20)).unwrap();
    assert_eq!(c.site("a").unwrap().links.len(), 2);
    let before = c.clone();
    let too_many = (0..=MAX_LINKS)
        .map(|i| link(&format!("s{i}"), true))
        .collect();
    for (links, field) in [
        (too_many, "links"),
        (vec![link("Bad_Site", true)], "links[0].peer_site"),
        (
            vec![Link {
                last_error: Some("x".repeat(MAX_LINK_ERROR + 1)),
                ..link("b", false)
            }],
            "links[0].last_error",
        ),
    ] {
        match c.apply(&hb(Some(links), 30)) {
            Err(Rejection::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
        assert_eq!(c, before);
    }
}

#[test]
fn heartbeats_carry_xds_rejections_per_gateway_and_bad_ones_name_the_field() {
    let mut c = Catalog::default();
    let gw = |c: &mut Catalog, name: &str| {
        let mut s = spec("east", "eu", "eu-1a");
        s.instance = name.into();
        c.apply(&Command::RegisterSite { spec: s, at_ms: 1 })
            .unwrap();
    };
    gw(&mut c, "gw-a");
    gw(&mut c, "gw-b");
    let nack = |node: &str| XdsRejection {
        node: node.into(),
        type_url: "type.googleapis.com/envoy.config.listener.v3.Listener".into(),
        error: "cannot bind '127.0.0.1:80': Address already in use".into(),
    };
    let hb = |instance: &str, rejections: Option<Vec<XdsRejection>>, at_ms| Command::Heartbeat {
        site: "east".into(),
        at_ms,
        links: rejections.as_ref().map(|_| Vec::new()),
        instance: instance.into(),
        xds_rejections: rejections,
    };
    c.apply(&hb("gw-a", Some(vec![nack("sidecar-1")]), 10))
        .unwrap();
    c.apply(&hb("gw-b", Some(vec![nack("sidecar-2")]), 10))
        .unwrap();
    let nodes = |c: &Catalog| -> Vec<String> {
        let s = c.site("east").unwrap();
        s.xds_rejections.iter().map(|r| r.node.clone()).collect()
    };
    // The site shows every gateway's, in instance order.
    assert_eq!(nodes(&c), vec!["sidecar-1", "sidecar-2"]);
    // A heartbeat without a report keeps them; a report replaces that gateway's only.
    c.apply(&hb("gw-a", None, 20)).unwrap();
    assert_eq!(nodes(&c), vec!["sidecar-1", "sidecar-2"]);
    c.apply(&hb("gw-a", Some(vec![]), 30)).unwrap();
    assert_eq!(nodes(&c), vec!["sidecar-2"]);
    // Re-registering keeps what the gateway last reported.
    gw(&mut c, "gw-b");
    assert_eq!(nodes(&c), vec!["sidecar-2"]);
    // Too many, or too long, is refused naming the field, and changes nothing.
    let before = c.clone();
    for (rejections, field) in [
        (
            (0..=MAX_XDS_REJECTIONS)
                .map(|i| nack(&format!("n{i}")))
                .collect(),
            "xds_rejections",
        ),
        (
            vec![XdsRejection {
                error: "x".repeat(MAX_LINK_ERROR + 1),
                ..nack("n")
            }],
            "xds_rejections[0].error",
        ),
    ] {
        match c.apply(&hb("gw-a", Some(rejections), 40)) {
            Err(Rejection::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
        assert_eq!(c, before);
    }
}

/// Heartbeats written to the Raft log before xDS rejections existed replay unchanged: the
/// field is optional, and a command without a report keeps the last one.
#[test]
fn a_heartbeat_logged_before_xds_rejections_existed_still_applies() {
    let old: Command = serde_json::from_str(
        r#"{"op":"heartbeat","site":"a","at_ms":1000,"links":null,"instance":""}"#,
    )
    .unwrap();
    assert!(matches!(
        &old,
        Command::Heartbeat {
            xds_rejections: None,
            ..
        }
    ));
    let mut c = Catalog::default();
    register(&mut c, "a", "eu", "eu-1a", 0);
    c.apply(&old).unwrap();
    assert_eq!(c.site("a").unwrap().last_heartbeat_ms, 1000);
    // And a command without the field is written without it.
    let text = serde_json::to_string(&old).unwrap();
    assert!(!text.contains("xds_rejections"), "{text}");
}
