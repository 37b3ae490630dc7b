//! Sites, tokens, atomicity of rejections and the JSON snapshot form.

use super::*;

#[test]
fn register_site_updates_and_heartbeat_rules() {
    let mut c = Catalog::default();
    register(&mut c, "a", "eu", "eu-1a", 100);
    let mut moved = spec("a", "us", "us-1a");
    moved.gateways = vec!["10.9.9.9:443".into()];
    c.apply(&Command::RegisterSite {
        spec: moved,
        at_ms: 200,
    })
    .unwrap();
    let s = c.site("a").unwrap();
    assert_eq!(
        (
            s.locality.region.as_str(),
            s.created_revision,
            s.last_heartbeat_ms
        ),
        ("us", 1, 200)
    );
    assert_eq!(s.gateways, vec!["10.9.9.9:443".to_string()]);

    let hb = |site: &str, at_ms| Command::Heartbeat {
        site: site.into(),
        at_ms,
        links: None,
        instance: String::new(),
        xds_rejections: None,
    };
    assert_eq!(
        c.apply(&hb("zz", 300)),
        Err(Rejection::NotFound {
            what: "site".into(),
            name: "zz".into()
        })
    );
    let a = c.apply(&hb("a", 300)).unwrap();
    assert_eq!(
        a.changes,
        vec![Change::SiteUpserted {
            site: c.site("a").unwrap().clone()
        }]
    );
    assert_eq!(c.site("a").unwrap().last_heartbeat_ms, 300);
    // A new leader whose clock is behind does not shorten the lease.
    c.apply(&hb("a", 250)).unwrap();
    assert_eq!(c.site("a").unwrap().last_heartbeat_ms, 300);
    tick(&mut c, 300 + TTL + GRACE);
    let before = c.clone();
    assert_eq!(
        c.apply(&hb("a", 400_000)),
        Err(Rejection::Withdrawn {
            site: "a".into(),
            since_ms: 300 + TTL + GRACE
        })
    );
    assert_eq!(c, before);
    // Registering again brings it back.
    register(&mut c, "a", "eu", "eu-1a", 400_000);
    assert_eq!(c.site("a").unwrap().state, SiteState::Fresh);
    assert_eq!(c.site("a").unwrap().created_revision, 1);
}

#[test]
fn remove_site_removes_its_exports() {
    let mut c = populated();
    let other = ServiceKey::new("default", "other");
    put(
        &mut c,
        Export {
            service: other.clone(),
            ..export("a", 1, &["10.0.0.7"])
        },
    )
    .unwrap();
    let a = c.apply(&Command::RemoveSite { site: "a".into() }).unwrap();
    assert_eq!(
        a.changes,
        vec![
            Change::ExportRemoved {
                service: key(),
                site: "a".into()
            },
            Change::ExportRemoved {
                service: other.clone(),
                site: "a".into()
            },
            Change::SiteRemoved { name: "a".into() },
            Change::SiteRevoked {
                site: "a".into(),
                revision: a.revision,
            },
        ]
    );
    assert!(c.site("a").is_none());
    assert!(c.service(&other).is_none());
    assert_eq!(c.service(&key()).unwrap().groups.len(), 1);
    assert_eq!(
        c.apply(&Command::RemoveSite { site: "a".into() }),
        Err(Rejection::NotFound {
            what: "site".into(),
            name: "a".into()
        })
    );
}

#[test]
fn tokens_are_single_use_and_expire() {
    let use_at = |id: &str, expires_ms, at_ms| Command::UseToken {
        id: id.into(),
        site: "a".into(),
        expires_ms,
        at_ms,
    };
    let cases: Vec<(&str, Command, bool)> = vec![
        ("fresh token", use_at("new", 10_000, 5_000), true),
        ("already used", use_at("t1", 60_000, 1_000), false),
        ("expires now", use_at("new", 5_000, 5_000), false),
        ("expired", use_at("new", 4_000, 5_000), false),
    ];
    for (name, cmd, ok) in cases {
        let mut c = populated();
        let before = c.clone();
        match c.apply(&cmd) {
            Ok(a) => {
                assert!(ok, "{name}: accepted");
                assert_eq!(kinds(&a), vec!["token+"], "{name}");
                let again = c.apply(&cmd);
                assert!(
                    matches!(&again, Err(Rejection::Token { reason, .. }) if reason.contains("already used")),
                    "{name}: {again:?}"
                );
            }
            Err(Rejection::Token { .. }) => {
                assert!(!ok, "{name}: refused");
                assert_eq!(c, before, "{name}");
            }
            Err(other) => panic!("{name}: {other:?}"),
        }
    }
    // Forgotten only once expired strictly before the tick by more than the keep margin.
    let mut c = populated();
    assert!(
        tick(&mut c, 50_000 + USED_TOKEN_KEEP_MS)
            .changes
            .iter()
            .all(|ch| !matches!(ch, Change::TokenForgotten { .. }))
    );
    assert!(c.tokens.contains_key("t1"));
    let a = tick(&mut c, 50_001 + USED_TOKEN_KEEP_MS);
    assert!(
        a.changes
            .contains(&Change::TokenForgotten { id: "t1".into() })
    );
    assert!(c.tokens.is_empty());
    // Once forgotten it cannot be replayed: it has expired.
    assert!(matches!(
        c.apply(&use_at("t1", 50_000, 50_001)),
        Err(Rejection::Token { .. })
    ));
}

#[test]
fn a_revoked_token_cannot_be_used_and_a_used_one_cannot_be_revoked() {
    let mut c = populated();
    let revoke = |id: &str, at_ms| Command::RevokeToken {
        id: id.into(),
        at_ms,
    };
    let a = c.apply(&revoke("t2", 2_000)).unwrap();
    assert_eq!(kinds(&a), vec!["token+"]);
    assert!(c.tokens["t2"].revoked && c.tokens["t2"].site.is_empty());
    assert_eq!(c.tokens["t2"].expires_ms, 2_000 + MAX_TOKEN_TTL_MS);
    // Again: nothing changes.
    assert!(c.apply(&revoke("t2", 3_000)).unwrap().changes.is_empty());
    // A join with it is refused, and says why.
    let used = c.apply(&Command::UseToken {
        id: "t2".into(),
        site: "a".into(),
        expires_ms: 60_000,
        at_ms: 4_000,
    });
    assert!(
        matches!(&used, Err(Rejection::Token { reason, .. }) if reason.contains("revoked")),
        "{used:?}"
    );
    // A used token: revoking it is refused, pointing at the site instead.
    let before = c.clone();
    let r = c.apply(&revoke("t1", 5_000));
    assert!(
        matches!(&r, Err(Rejection::Token { reason, .. }) if reason.contains("ctl site revoke a")),
        "{r:?}"
    );
    assert_eq!(c, before);
    // A bad id is named.
    assert_eq!(field_of(c.apply(&revoke("", 5_000))), "id");
    // Forgotten like a used token, after its longest life and the keep margin.
    let a = tick(&mut c, 2_001 + MAX_TOKEN_TTL_MS + USED_TOKEN_KEEP_MS);
    assert!(
        a.changes
            .contains(&Change::TokenForgotten { id: "t2".into() })
    );
}

/// A new leader whose clock is behind must not accept a used token again, nor an expired
/// one: used tokens are kept past expiry plus a margin, and expiry is judged by the highest
/// time the catalog has seen.
#[test]
fn a_leader_whose_clock_is_behind_cannot_replay_a_used_or_expired_token() {
    let use_at = |id: &str, expires_ms, at_ms| Command::UseToken {
        id: id.into(),
        site: "a".into(),
        expires_ms,
        at_ms,
    };
    let mut c = Catalog::default();
    c.apply(&use_at("t", 10_000, 1_000)).unwrap();
    // The old leader ticks past the expiry (its clock is right).
    tick(&mut c, 20_000);
    assert!(c.tokens.contains_key("t"), "kept past expiry");
    // A new leader 15 s behind: the token is still known as used.
    let again = c.apply(&use_at("t", 10_000, 5_000));
    assert!(
        matches!(&again, Err(Rejection::Token { reason, .. }) if reason.contains("already used")),
        "{again:?}"
    );
    // Long after, the id is forgotten; a leader far behind still sees it expired, by the
    // highest time seen.
    tick(&mut c, 10_001 + USED_TOKEN_KEEP_MS);
    assert!(c.tokens.is_empty());
    let replay = c.apply(&use_at("t", 10_000, 5_000));
    assert!(
        matches!(&replay, Err(Rejection::Token { reason, .. }) if reason.contains("expired")),
        "{replay:?}"
    );
    assert_eq!(c.clock_ms, 10_001 + USED_TOKEN_KEEP_MS);
}

#[test]
fn rejections_leave_the_catalog_unchanged() {
    let mut withdrawn = export("b", 9, &["10.1.0.9"]);
    withdrawn.site = "a".into();
    let cases: Vec<(&str, Command)> = vec![
        (
            "invalid",
            Command::PutExport {
                export: Export {
                    site: "A".into(),
                    ..export("a", 9, &[])
                },
            },
        ),
        (
            "stale generation",
            Command::PutExport {
                export: export("a", 0, &["10.0.0.1"]),
            },
        ),
        (
            "same generation other content",
            Command::PutExport {
                export: export("a", 1, &["10.0.0.9"]),
            },
        ),
        (
            "unknown site",
            Command::PutExport {
                export: export("zz", 1, &["10.0.0.1"]),
            },
        ),
        (
            "delete stale",
            Command::DeleteExport {
                site: "a".into(),
                service: key(),
                generation: 0,
            },
        ),
        (
            "delete missing",
            Command::DeleteExport {
                site: "a".into(),
                service: ServiceKey::new("x", "y"),
                generation: 1,
            },
        ),
        (
            "heartbeat unknown",
            Command::Heartbeat {
                site: "zz".into(),
                at_ms: 5,
                links: None,
                instance: String::new(),
                xds_rejections: None,
            },
        ),
        ("remove unknown", Command::RemoveSite { site: "zz".into() }),
        (
            "delete policy unknown",
            Command::DeletePolicy { name: "zz".into() },
        ),
        (
            "token reuse",
            Command::UseToken {
                id: "t1".into(),
                site: "b".into(),
                expires_ms: 90_000,
                at_ms: 5,
            },
        ),
        (
            "token expired",
            Command::UseToken {
                id: "t2".into(),
                site: "b".into(),
                expires_ms: 5,
                at_ms: 5,
            },
        ),
    ];
    for (name, cmd) in cases {
        let mut c = populated();
        let before = c.clone();
        let bytes = serde_json::to_vec(&c).unwrap();
        assert!(c.apply(&cmd).is_err(), "{name}: accepted");
        assert_eq!(c, before, "{name}");
        assert_eq!(serde_json::to_vec(&c).unwrap(), bytes, "{name}");
    }
}

#[test]
fn serde_json_round_trips() {
    let mut c = populated();
    tick(&mut c, TTL); // one site stale, to cover the tagged state
    let json = serde_json::to_string(&c).unwrap();
    let back: Catalog = serde_json::from_str(&json).unwrap();
    assert_eq!(back, c);
    assert_eq!(serde_json::to_string(&back).unwrap(), json);
    // The exports map is a list in JSON; a duplicate is refused.
    let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let exports = v["exports"].as_array_mut().unwrap();
    assert_eq!(exports.len(), 2);
    exports.push(exports[0].clone());
    assert!(serde_json::from_value::<Catalog>(v).is_err());
    // Log entries and their results round-trip too.
    let cmd = Command::PutExport {
        export: export("a", 2, &["10.0.0.1"]),
    };
    let back: Command = serde_json::from_str(&serde_json::to_string(&cmd).unwrap()).unwrap();
    assert_eq!(back, cmd);
    let r: Result<Applied, Rejection> = c.apply(&cmd);
    let back: Result<Applied, Rejection> =
        serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
    assert_eq!(back, r);
    let rej = Rejection::Withdrawn {
        site: "a".into(),
        since_ms: 1,
    };
    let back: Rejection = serde_json::from_str(&serde_json::to_string(&rej).unwrap()).unwrap();
    assert_eq!(back, rej);
}

/// Removing or revoking a site is sticky: it cannot register again until an admin
/// reinstates it or enrols it again with a join token; revoking works for a site that never
/// registered; every step is a visible change.
#[test]
fn removed_and_revoked_sites_stay_out_until_reinstated_or_enrolled() {
    let mut c = Catalog::default();
    register(&mut c, "a", "eu", "eu-1a", 100);
    let removed = c.apply(&Command::RemoveSite { site: "a".into() }).unwrap();
    assert_eq!(c.revoked_sites.get("a"), Some(&removed.revision));
    let again = Command::RegisterSite {
        spec: spec("a", "eu", "eu-1a"),
        at_ms: 200,
    };
    let before = c.clone();
    assert_eq!(
        c.apply(&again),
        Err(Rejection::Revoked {
            site: "a".into(),
            revision: removed.revision
        })
    );
    assert_eq!(c, before, "a refusal changes nothing");
    // An admin reinstates it: it may register again.
    let r = c
        .apply(&Command::ReinstateSite { site: "a".into() })
        .unwrap();
    assert_eq!(kinds(&r), vec!["reinstated"]);
    c.apply(&again).unwrap();
    assert!(
        c.apply(&Command::ReinstateSite { site: "a".into() })
            .is_err(),
        "not revoked any more"
    );

    // Revoking a site that never registered (an agent that joined, then was found out).
    let r = c.apply(&Command::RevokeSite { site: "vm".into() }).unwrap();
    assert_eq!(kinds(&r), vec!["revoked"]);
    let same = c.apply(&Command::RevokeSite { site: "vm".into() }).unwrap();
    assert!(same.changes.is_empty(), "revoking twice changes nothing");
    // A join token for it (an admin's fresh enrolment) lifts the revocation.
    let joined = c
        .apply(&Command::UseToken {
            id: "t".into(),
            site: "vm".into(),
            expires_ms: 10_000,
            at_ms: 300,
        })
        .unwrap();
    assert_eq!(kinds(&joined), vec!["token+", "reinstated"]);
    assert!(c.revoked_sites.is_empty());
}

/// Export ownership: once a namespace or service has owners, other sites' exports of it are
/// refused (naming the rule); the service rule is more specific than the namespace's; a
/// service without a rule stays open.
#[test]
fn export_ownership_decides_which_sites_may_export_a_service() {
    let mut c = Catalog::default();
    register(&mut c, "a", "eu", "eu-1a", 100);
    register(&mut c, "b", "eu", "eu-1a", 100);
    let set = c
        .apply(&Command::PutOwnership {
            scope: key().namespace.clone(),
            sites: vec!["b".into(), "a".into(), "a".into()],
        })
        .unwrap();
    assert_eq!(kinds(&set), vec!["owners+"]);
    assert_eq!(
        c.owners[&key().namespace],
        vec!["a".to_string(), "b".to_string()]
    );
    // Both owners may export in the namespace; a third may not.
    let mut stranger = export("b", 1, &["10.0.0.2"]);
    c.apply(&Command::PutExport {
        export: stranger.clone(),
    })
    .unwrap();
    register(&mut c, "evil", "eu", "eu-1a", 100);
    stranger.site = "evil".into();
    let before = c.clone();
    let err = c
        .apply(&Command::PutExport {
            export: stranger.clone(),
        })
        .unwrap_err();
    assert!(
        matches!(&err, Rejection::NotOwner { site, scope, .. } if site == "evil" && *scope == key().namespace),
        "{err:?}"
    );
    assert!(err.to_string().contains("ctl owners"), "{err}");
    assert_eq!(c, before, "a refusal changes nothing");
    // A rule for the service itself decides alone.
    c.apply(&Command::PutOwnership {
        scope: format!("{}/{}", key().namespace, key().name),
        sites: vec!["evil".into()],
    })
    .unwrap();
    c.apply(&Command::PutExport { export: stranger }).unwrap();
    assert!(
        c.apply(&Command::PutExport {
            export: export("a", 1, &["10.0.0.1"])
        })
        .is_err()
    );
    // Other namespaces stay open.
    let mut elsewhere = export("evil", 1, &["10.0.0.3"]);
    elsewhere.service = ServiceKey::new("blog", "web");
    c.apply(&Command::PutExport { export: elsewhere }).unwrap();
    // Bad rules name the field.
    let bad = c.apply(&Command::PutOwnership {
        scope: "Shop".into(),
        sites: vec!["a".into()],
    });
    assert!(matches!(bad, Err(Rejection::Invalid { field, .. }) if field == "scope"));
    let bad = c.apply(&Command::PutOwnership {
        scope: key().namespace.clone(),
        sites: vec![],
    });
    assert!(matches!(bad, Err(Rejection::Invalid { field, .. }) if field == "sites"));
    assert_eq!(
        kinds(
            &c.apply(&Command::DeleteOwnership {
                scope: key().namespace.clone()
            })
            .unwrap()
        ),
        vec!["owners-"]
    );
}

/// Quota: a catalog holds at most `MAX_SITES` sites; registering one more is refused with
/// the limit named, re-registering a known site still works.
#[test]
fn sites_beyond_the_quota_are_refused() {
    let mut c = Catalog::default();
    for i in 0..MAX_SITES {
        c.apply(&Command::RegisterSite {
            spec: spec(&format!("s{i}"), "eu", "eu-1a"),
            at_ms: 1,
        })
        .unwrap();
    }
    let before = c.clone();
    let err = c
        .apply(&Command::RegisterSite {
            spec: spec("one-more", "eu", "eu-1a"),
            at_ms: 2,
        })
        .unwrap_err();
    assert_eq!(
        err,
        Rejection::Quota {
            what: "sites".into(),
            limit: MAX_SITES as u64
        }
    );
    assert!(err.to_string().contains("at most 10000 sites"), "{err}");
    assert_eq!(c, before);
    c.apply(&Command::RegisterSite {
        spec: spec("s7", "eu", "eu-1a"),
        at_ms: 3,
    })
    .unwrap();
}

#[test]
fn several_gateways_of_one_site_register_and_report_each_for_itself() {
    let mut c = Catalog::default();
    let gw = |name: &str, addr: &str, at_ms| {
        let mut s = spec("east", "eu", "eu-1a");
        s.instance = name.into();
        s.gateways = vec![addr.into()];
        Command::RegisterSite { spec: s, at_ms }
    };
    let hb = |name: &str, peer: &str, at_ms| Command::Heartbeat {
        site: "east".into(),
        at_ms,
        links: Some(vec![Link {
            peer_site: peer.into(),
            connected: true,
            ..Default::default()
        }]),
        instance: name.into(),
        xds_rejections: None,
    };
    c.apply(&gw("gw-b", "10.0.0.2:15443", 100)).unwrap();
    c.apply(&gw("gw-a", "10.0.0.1:15443", 100)).unwrap();
    // The second registration did not replace the first: both addresses, in name order.
    let s = c.site("east").unwrap();
    assert_eq!(
        s.gateways,
        vec!["10.0.0.1:15443".to_string(), "10.0.0.2:15443".to_string()]
    );
    assert_eq!(
        s.instances
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>(),
        vec!["gw-a", "gw-b"]
    );
    // Each heartbeat replaces its own gateway's links only.
    c.apply(&hb("gw-a", "west", 200)).unwrap();
    c.apply(&hb("gw-b", "north", 200)).unwrap();
    let s = c.site("east").unwrap();
    let peers: Vec<&str> = s.links.iter().map(|l| l.peer_site.as_str()).collect();
    assert_eq!(peers, vec!["west", "north"]);
    assert_eq!(s.instances[0].links[0].peer_site, "west");
    assert_eq!(s.instances[1].links[0].peer_site, "north");
    // gw-b stops; gw-a keeps the site fresh. One lease later gw-b and its address leave.
    c.apply(&hb("gw-a", "west", 200 + TTL)).unwrap();
    tick(&mut c, 200 + TTL + 1);
    let s = c.site("east").unwrap();
    assert_eq!(s.state, SiteState::Fresh);
    assert_eq!(s.gateways, vec!["10.0.0.1:15443".to_string()]);
    assert_eq!(s.instances.len(), 1);
    // A dropped gateway's heartbeat is refused with NotFound, so it registers again.
    assert_eq!(
        c.apply(&hb("gw-b", "north", 200 + TTL + 2)),
        Err(Rejection::NotFound {
            what: "gateway instance".into(),
            name: "east/gw-b".into()
        })
    );
    // The last gateway is never dropped: a stale site keeps an address.
    tick(&mut c, 200 + 3 * TTL);
    let s = c.site("east").unwrap();
    assert!(matches!(s.state, SiteState::Stale { .. }));
    assert_eq!(s.gateways, vec!["10.0.0.1:15443".to_string()]);
    // A bad instance name is refused, naming the field.
    let mut bad = spec("east", "eu", "eu-1a");
    bad.instance = "Gw_1".into();
    assert!(matches!(
        c.apply(&Command::RegisterSite { spec: bad, at_ms: 1 }),
        Err(Rejection::Invalid { field, .. }) if field == "spec.instance"
    ));
}

#[test]
fn withdrawn_sites_are_forgotten_after_the_keep_time_only() {
    let mut c = Catalog::default();
    register(&mut c, "a", "eu", "eu-1a", 0);
    register(&mut c, "b", "eu", "eu-1b", 0);
    c.apply(&Command::Heartbeat {
        site: "b".into(),
        at_ms: TTL + GRACE,
        links: None,
        instance: String::new(),
        xds_rejections: None,
    })
    .unwrap();
    tick(&mut c, TTL + GRACE);
    assert!(
        matches!(c.sites["a"].state, SiteState::Withdrawn { since_ms } if since_ms == TTL + GRACE)
    );
    let forget = |c: &mut Catalog, at_ms| {
        c.apply(&Command::ForgetWithdrawn {
            at_ms,
            keep_ms: 1_000,
        })
        .unwrap()
    };
    assert!(forget(&mut c, TTL + GRACE + 999).changes.is_empty());
    assert_eq!(c.forgettable(TTL + GRACE + 999, 1_000), Vec::<&str>::new());
    assert_eq!(c.forgettable(TTL + GRACE + 1_000, 1_000), vec!["a"]);
    let a = forget(&mut c, TTL + GRACE + 1_000);
    assert_eq!(kinds(&a), vec!["site-"]);
    assert!(c.site("a").is_none() && c.site("b").is_some());
}

#[test]
fn a_stale_site_that_a_live_site_reaches_is_not_withdrawn() {
    let mut c = Catalog::default();
    register(&mut c, "a", "eu", "eu-1a", 0);
    register(&mut c, "b", "eu", "eu-1b", 0);
    let beat_b = |c: &mut Catalog, at_ms, connected| {
        c.apply(&Command::Heartbeat {
            site: "b".into(),
            at_ms,
            links: Some(vec![Link {
                peer_site: "a".into(),
                connected,
                transport: None,
                rtt_us: None,
                failures: 0,
                last_error: None,
            }]),
            instance: String::new(),
            xds_rejections: None,
        })
        .unwrap();
    };
    beat_b(&mut c, TTL + GRACE, true);
    assert_eq!(c.vouchers("a", TTL + GRACE), vec!["b"]);
    tick(&mut c, TTL + GRACE);
    assert!(
        matches!(c.sites["a"].state, SiteState::Stale { .. }),
        "{:?}",
        c.sites["a"].state
    );
    // b's own lease lapsing ends its word for a.
    assert!(c.vouchers("a", TTL + GRACE + TTL).is_empty());
    // b reports the link down: a is withdrawn.
    beat_b(&mut c, TTL + GRACE + 10, false);
    tick(&mut c, TTL + GRACE + 10);
    assert!(matches!(c.sites["a"].state, SiteState::Withdrawn { .. }));
}
