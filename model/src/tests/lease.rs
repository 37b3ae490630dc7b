//! Leases: expiry → stale → withdrawn (exports gone), heartbeat revival, quiet ticks.

use super::*;

/// Site `a` registered at 0 exporting one service; site `b` registered at 0 with no export.
fn two_sites() -> Catalog {
    let mut c = Catalog::default();
    register(&mut c, "a", "eu", "eu-1a", 0);
    register(&mut c, "b", "eu", "eu-1a", 0);
    put(&mut c, export("a", 1, &["10.0.0.1"])).unwrap();
    c
}

#[test]
fn lease_timeline() {
    let stale = SiteState::Stale { since_ms: TTL };
    let withdrawn = SiteState::Withdrawn {
        since_ms: TTL + GRACE,
    };
    // (tick at, state of a after, changes, export still there)
    let steps: Vec<(u64, SiteState, usize, bool)> = vec![
        (TTL - 1, SiteState::Fresh, 0, true),
        (TTL, stale, 2, true), // a and b lapse
        (TTL + 1, stale, 0, true),
        (TTL + GRACE - 1, stale, 0, true),
        (TTL + GRACE, withdrawn, 3, false), // a, b withdrawn, a's export removed
        (TTL + GRACE + 1, withdrawn, 0, false),
    ];
    let mut c = two_sites();
    for (at, state, n, exported) in steps {
        let revision = c.revision;
        let a = tick(&mut c, at);
        assert_eq!(c.site("a").unwrap().state, state, "at {at}");
        assert_eq!(a.changes.len(), n, "at {at}: {:?}", a.changes);
        assert_eq!(c.revision, revision + u64::from(n > 0), "at {at}");
        assert_eq!(c.service(&key()).is_some(), exported, "at {at}");
    }
}

#[test]
fn withdrawal_removes_exports_then_updates_the_site() {
    let mut c = two_sites();
    tick(&mut c, TTL);
    let a = tick(&mut c, TTL + GRACE);
    let withdrawn = |name: &str| Site {
        state: SiteState::Withdrawn {
            since_ms: TTL + GRACE,
        },
        ..c.site(name).unwrap().clone()
    };
    assert_eq!(
        a.changes,
        vec![
            Change::ExportRemoved {
                service: key(),
                site: "a".into()
            },
            Change::SiteUpserted {
                site: withdrawn("a")
            },
            Change::SiteUpserted {
                site: withdrawn("b")
            },
        ]
    );
    assert_eq!(c.exports_of_site("a").count(), 0);
    assert_eq!(
        c.site("a").unwrap().staleness_seconds(TTL + GRACE + 5_000),
        5
    );
}

#[test]
fn a_late_tick_withdraws_at_once() {
    let mut c = two_sites();
    let a = tick(&mut c, 1_000_000);
    assert_eq!(
        c.site("a").unwrap().state,
        SiteState::Withdrawn {
            since_ms: 1_000_000
        }
    );
    assert_eq!(a.changes.len(), 3);
    assert_eq!(a.revision, 4);
}

#[test]
fn stale_then_heartbeat_is_fresh_again() {
    let mut c = two_sites();
    tick(&mut c, TTL + 5);
    assert_eq!(
        c.site("a").unwrap().state,
        SiteState::Stale { since_ms: TTL }
    );
    let a = c
        .apply(&Command::Heartbeat {
            site: "a".into(),
            at_ms: TTL + 10,
            links: None,
            instance: String::new(),
            xds_rejections: None,
        })
        .unwrap();
    let site = c.site("a").unwrap();
    assert_eq!(
        (site.state, site.last_heartbeat_ms),
        (SiteState::Fresh, TTL + 10)
    );
    assert_eq!(a.changes, vec![Change::SiteUpserted { site: site.clone() }]);
    // Renewed: the next tick past the grace of the old lapse keeps it; b (silent) goes.
    tick(&mut c, TTL + GRACE);
    assert_eq!(
        c.site("a").unwrap().state,
        SiteState::Stale {
            since_ms: 2 * TTL + 10
        }
    );
    assert_eq!(
        c.site("b").unwrap().state,
        SiteState::Withdrawn {
            since_ms: TTL + GRACE
        }
    );
    assert!(c.service(&key()).is_some());
}

#[test]
fn register_renews_a_stale_site() {
    let mut c = two_sites();
    tick(&mut c, TTL);
    register(&mut c, "a", "eu", "eu-1a", TTL + 1);
    assert_eq!(c.site("a").unwrap().state, SiteState::Fresh);
    assert_eq!(c.site("a").unwrap().lease_expires_ms(), 2 * TTL + 1);
}

#[test]
fn stale_exports_stay_but_rank_last() {
    let mut c = two_sites();
    register(&mut c, "c", "us", "us-1a", TTL - 1);
    put(&mut c, export("c", 1, &["10.2.0.1"])).unwrap();
    tick(&mut c, TTL);
    let ranked = c.resolve(&key(), "b").unwrap();
    let order: Vec<(SiteRank, &str)> = ranked.iter().map(|(r, g)| (*r, g.site.as_str())).collect();
    // a is in b's zone, but stale.
    assert_eq!(order, vec![(SiteRank::Other, "c"), (SiteRank::Stale, "a")]);
}

#[test]
fn quiet_tick_changes_nothing() {
    let mut c = two_sites();
    let before = c.clone();
    let a = tick(&mut c, 1);
    assert_eq!(
        a,
        Applied {
            revision: before.revision,
            changes: vec![]
        }
    );
    // Nothing visible; only the clock the catalog has seen moved.
    assert_eq!(c.clock_ms, 1);
    assert_eq!(
        Catalog {
            clock_ms: before.clock_ms,
            ..c
        },
        before
    );
    let mut empty = Catalog::default();
    assert_eq!(tick(&mut empty, u64::MAX), Applied::default());
}
