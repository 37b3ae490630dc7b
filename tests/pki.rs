//! The real `meshbridge pki` binary: init → issue → inspect, and the chain verifies.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

fn meshbridge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshbridge"))
        .args(args)
        .output()
        .expect("run meshbridge")
}

/// `meshbridge pki init` of a CA for corp.example into `out`, with `extra` arguments.
fn pki_init(out: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "pki",
        "init",
        "--trust-domain",
        "corp.example",
        "--out",
        out,
    ];
    args.extend_from_slice(extra);
    meshbridge(&args)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_issue_inspect_round_trip_and_the_chain_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    let svid = tmp.path().join("east");
    let ca_s = ca.to_str().unwrap();
    let svid_s = svid.to_str().unwrap();

    let o = pki_init(ca_s, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(mode(&ca.join("ca.key")), 0o600);

    let id = "spiffe://corp.example/site/east/gateway";
    let o = meshbridge(&[
        "pki",
        "issue",
        "--id",
        id,
        "--ca",
        ca_s,
        "--out",
        svid_s,
        "--ttl",
        "2h",
        "--dns",
        "east.local",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(mode(&svid.join("key.pem")), 0o600);

    let o = meshbridge(&[
        "pki",
        "inspect",
        svid.join("cert.pem").to_str().unwrap(),
        "-o",
        "json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["spiffe_ids"][0], id);
    assert_eq!(v[0]["dns_names"][0], "east.local");
    assert_eq!(v[0]["is_ca"], false);
    assert_eq!(
        v[0]["days_left"], 0,
        "a 2h certificate has 0 whole days left"
    );
    let table = meshbridge(&["pki", "inspect", svid.join("cert.pem").to_str().unwrap()]);
    assert!(
        text(&table).contains(id) && text(&table).contains("not after"),
        "{}",
        text(&table)
    );

    // rustls (webpki) accepts the chain, through the same loader the roles use.
    meshbridge_core::install_crypto_provider();
    let identity =
        meshbridge_core::tls::Identity::load(meshbridge_core::tls::IdentityFiles::in_dir(&svid))
            .unwrap();
    assert_eq!(identity.id().to_string(), id);
    let chain = meshbridge_core::tls::load_certs(&svid.join("cert.pem")).unwrap();
    let verifier = identity.verifier(meshbridge_core::tls::AllowList::any());
    let now = rustls_pki_types::UnixTime::now();
    assert_eq!(
        verifier
            .verify(&chain[0], &chain[1..], now, true)
            .unwrap()
            .to_string(),
        id
    );

    // And openssl agrees, when it is installed.
    if let Ok(o) = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(svid.join("bundle.pem"))
        .arg(svid.join("cert.pem"))
        .output()
    {
        assert!(o.status.success(), "openssl verify: {}", text(&o));
    }
}

#[test]
fn bad_arguments_exit_non_zero_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    let ca_s = ca.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["pki", "init", "--trust-domain", "Bad_TD!", "--out", ca_s],
            "invalid character",
        ),
        (
            vec![
                "pki",
                "init",
                "--trust-domain",
                "td",
                "--out",
                ca_s,
                "--ttl",
                "5y",
            ],
            "unknown unit",
        ),
        (
            vec![
                "pki",
                "issue",
                "--id",
                "http://x/y",
                "--ca",
                ca_s,
                "--out",
                ca_s,
            ],
            "must start with spiffe://",
        ),
        (
            vec![
                "pki",
                "issue",
                "--id",
                "spiffe://td/x",
                "--ca",
                "/nonexistent",
                "--out",
                ca_s,
            ],
            "/nonexistent/ca.pem",
        ),
        (
            vec!["pki", "inspect", "/nonexistent.pem"],
            "/nonexistent.pem: cannot read",
        ),
        (vec!["pki", "bogus"], "unrecognized subcommand"),
    ];
    for (args, want) in cases {
        let o = meshbridge(&args);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(
            text(&o).contains(want),
            "{args:?}: {:?} should contain {want:?}",
            text(&o)
        );
    }
    // Issuing for another trust domain than the CA's is refused.
    assert!(
        meshbridge(&[
            "pki",
            "init",
            "--trust-domain",
            "corp.example",
            "--out",
            ca_s
        ])
        .status
        .success()
    );
    let o = meshbridge(&[
        "pki",
        "issue",
        "--id",
        "spiffe://other.example/x",
        "--ca",
        ca_s,
        "--out",
        ca_s,
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("not in this CA's trust domain"),
        "{}",
        text(&o)
    );
    // And a second init does not overwrite the CA.
    let o = pki_init(ca_s, &[]);
    assert!(
        !o.status.success() && text(&o).contains("refusing to overwrite"),
        "{}",
        text(&o)
    );
}

/// `pki issue` does not hand out certificates that cannot work: one past its CA's end is
/// cut to it, with a warning (it would fail validation from there on); a bare trust-domain
/// id is refused; a --ttl too long to have a date is refused by name, not a panic.
#[test]
fn issue_refuses_or_warns_about_certificates_that_cannot_work() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    let ca_s = ca.to_str().unwrap();
    let out = tmp.path().join("leaf");
    let out_s = out.to_str().unwrap();
    let o = pki_init(ca_s, &["--ttl", "30d"]);
    assert!(o.status.success(), "{}", text(&o));
    let issue = |id: &str, ttl: &str| {
        meshbridge(&[
            "pki", "issue", "--id", id, "--ca", ca_s, "--out", out_s, "--ttl", ttl,
        ])
    };

    let o = issue("spiffe://corp.example/site/east/gateway", "3650d");
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("warning: --ttl goes past the CA's own end"),
        "{}",
        text(&o)
    );
    let o = meshbridge(&[
        "pki",
        "inspect",
        out.join("cert.pem").to_str().unwrap(),
        "-o",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let days = v[0]["days_left"].as_i64().unwrap();
    assert!((29..=30).contains(&days), "{v}");

    let o = issue("spiffe://corp.example", "1h");
    assert!(!o.status.success());
    assert!(
        text(&o).contains("names a trust domain, not a workload"),
        "{}",
        text(&o)
    );

    let o = issue("spiffe://corp.example/site/east/gateway", "100000000d");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("at most 36500 days"), "{}", text(&o));
}
