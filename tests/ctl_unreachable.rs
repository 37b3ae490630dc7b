//! `ctl` against a registry that is not there: it gives up within its `--timeout` (default
//! 10 s; it used to wait 30 s per call, and `ctl status` three times that), naming the URL
//! and the cause; `status` does not wait again for catalog reads once no node answered.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use meshbridge_testkit::pki::TestPki;

/// Runs `ctl` against a loopback port nothing listens on; (exit code, its output, how long).
fn ctl_against_nothing(pki: &TestPki, args: &[&str]) -> (Option<i32>, String, Duration) {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", closed.local_addr().unwrap());
    drop(closed);
    let files = pki.issue("ops", "spiffe://unreach.example/ctl/ops");
    let dir = files.cert.parent().unwrap().to_path_buf();
    let started = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshbridge"))
        .args(["ctl", "--registry", &url, "--tls-dir"])
        .arg(&dir)
        .args(args)
        .env("MESHBRIDGE_LOG", "warn")
        .output()
        .unwrap();
    let took = started.elapsed();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&url), "{text}");
    (out.status.code(), text, took)
}

#[test]
fn ctl_gives_up_within_its_timeout_naming_the_node() {
    let pki = TestPki::new("unreach.example");
    let (code, stderr, took) = ctl_against_nothing(&pki, &["--timeout", "2s", "sites"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("Connection refused"), "{stderr}");
    assert!(took < Duration::from_secs(8), "took {took:?}: {stderr}");

    let (code, out, took) = ctl_against_nothing(&pki, &["--timeout", "2s", "status"]);
    assert_eq!(code, Some(3), "{out}");
    assert!(took < Duration::from_secs(8), "took {took:?}");
}
