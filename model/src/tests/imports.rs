//! Import addresses: a site's own address for a service exported elsewhere.

use super::*;

fn import(site: &str, generation: u64, ips: &[&str]) -> Import {
    Import {
        site: site.into(),
        service: key(),
        generation,
        ips: ips.iter().map(|a| ip(a)).collect(),
    }
}

fn put_import(c: &mut Catalog, import: Import) -> Result<Applied, Rejection> {
    c.apply(&Command::PutImport { import })
}

/// The change kinds a command made, or its rejection.
type Outcome = Result<Vec<&'static str>, Rejection>;

fn stale(got: u64, stored: u64) -> Outcome {
    Err(Rejection::StaleGeneration {
        site: "b".into(),
        service: "default/echo".into(),
        got,
        stored,
    })
}

#[test]
fn import_addresses_are_fenced_by_generation_and_removed_by_an_empty_list() {
    let mut c = populated();
    let kinds_of = |r: Result<Applied, Rejection>| r.map(|a| kinds(&a));
    // (step, import, outcome, addresses stored after it)
    let steps: Vec<(&str, Import, Outcome, Option<&str>)> = vec![
        (
            "first",
            import("b", 5, &["10.96.0.7"]),
            Ok(vec!["import+"]),
            Some("10.96.0.7"),
        ),
        (
            "same again",
            import("b", 5, &["10.96.0.7"]),
            Ok(vec![]),
            Some("10.96.0.7"),
        ),
        (
            "same generation, other address",
            import("b", 5, &["10.96.0.8"]),
            stale(5, 5),
            Some("10.96.0.7"),
        ),
        (
            "older",
            import("b", 4, &["10.96.0.8"]),
            stale(4, 5),
            Some("10.96.0.7"),
        ),
        (
            "newer",
            import("b", 6, &["10.96.0.8", "fd00::8"]),
            Ok(vec!["import+"]),
            Some("10.96.0.8"),
        ),
        (
            "removal, older",
            import("b", 5, &[]),
            stale(5, 6),
            Some("10.96.0.8"),
        ),
        ("removal", import("b", 7, &[]), Ok(vec!["import-"]), None),
        ("removal of nothing", import("b", 8, &[]), Ok(vec![]), None),
        // No record: any generation starts one (the writer reconciles with the catalog).
        (
            "again",
            import("b", 2, &["10.96.0.9"]),
            Ok(vec!["import+"]),
            Some("10.96.0.9"),
        ),
    ];
    for (step, i, want, stored) in steps {
        let before = c.revision;
        let got = kinds_of(put_import(&mut c, i));
        assert_eq!(got, want, "{step}");
        let moved = matches!(&got, Ok(k) if !k.is_empty());
        assert_eq!(c.revision, before + u64::from(moved), "{step}: revision");
        assert_eq!(
            c.import(&key(), "b").map(|i| i.ips[0]),
            stored.map(ip),
            "{step}: stored"
        );
    }
    // Another site's record is its own.
    put_import(&mut c, import("a", 1, &["10.97.0.1"])).unwrap();
    assert_eq!(
        c.import(&key(), "b").map(|i| i.ips.clone()),
        Some(vec![ip("10.96.0.9")])
    );
}

#[test]
fn import_addresses_need_a_live_site_and_go_with_it() {
    let mut c = Catalog::default();
    assert_eq!(
        put_import(&mut c, import("a", 1, &["10.96.0.7"])),
        Err(Rejection::NotFound {
            what: "site".into(),
            name: "a".into()
        })
    );
    register(&mut c, "a", "eu", "eu-1a", 0);
    register(&mut c, "b", "eu", "eu-1b", 0);
    put_import(&mut c, import("a", 1, &["10.96.0.7"])).unwrap();
    put_import(&mut c, import("b", 1, &["10.97.0.7"])).unwrap();

    // b keeps its lease, a does not: a's withdrawal takes its import address with it.
    c.apply(&Command::Heartbeat {
        site: "b".into(),
        at_ms: TTL + GRACE - 1,
        links: None,
        instance: String::new(),
        xds_rejections: None,
    })
    .unwrap();
    let applied = tick(&mut c, TTL + GRACE);
    assert_eq!(kinds(&applied), vec!["import-", "site+"]);
    assert!(c.import(&key(), "a").is_none());
    assert!(c.import(&key(), "b").is_some());
    assert!(matches!(
        put_import(&mut c, import("a", 2, &["10.96.0.7"])),
        Err(Rejection::Withdrawn { .. })
    ));

    // Removing a site removes its import addresses.
    let applied = c.apply(&Command::RemoveSite { site: "b".into() }).unwrap();
    assert_eq!(kinds(&applied), vec!["import-", "site-", "revoked"]);
    assert!(c.imports.is_empty());
}

#[test]
fn bad_import_addresses_are_refused_naming_the_field() {
    let cases: Vec<(&str, Import, &str)> = vec![
        ("bad site", import("B_", 1, &["10.96.0.7"]), "import.site"),
        (
            "three addresses",
            import("a", 1, &["10.96.0.7", "fd00::7", "10.96.0.8"]),
            "import.ips",
        ),
        (
            "two of a family",
            import("a", 1, &["10.96.0.7", "10.96.0.8"]),
            "import.ips[1]",
        ),
        ("unspecified", import("a", 1, &["0.0.0.0"]), "import.ips[0]"),
        (
            "multicast",
            import("a", 1, &["fd00::1", "ff02::1"]),
            "import.ips[1]",
        ),
    ];
    for (what, i, field) in cases {
        let mut c = populated();
        let before = c.clone();
        assert_eq!(field_of(put_import(&mut c, i)), field, "{what}");
        assert_eq!(c, before, "{what}: unchanged");
    }
}
