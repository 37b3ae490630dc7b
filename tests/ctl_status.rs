//! `ctl status` against a running demo: the JSON carries every part of the diagnosis; a
//! killed gateway's site turns stale after its lease; a gateway whose certificate comes
//! from a CA the mesh does not trust shows up as a broken link with the TLS reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_meshbridge");

fn ctl_status(ctl: &[String]) -> Value {
    let mut cmd = Command::new(BIN);
    cmd.args(&ctl[1..]);
    support::ctl_status_json(cmd)
}

/// Poll `ctl status` (bounded) until `pred` holds; returns the last status.
async fn until(ctl: &[String], what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..150 {
        last = ctl_status(ctl);
        if pred(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{what} never showed in ctl status:\n{last:#}");
}

fn site_state<'a>(s: &'a Value, site: &str) -> &'a str {
    s["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == site)
        .map(|x| x["state"].as_str().unwrap())
        .unwrap_or("")
}

#[tokio::test]
async fn ctl_status_diagnoses_stale_sites_and_broken_trust() {
    let mut demo = tokio::process::Command::new(BIN)
        .arg("demo")
        .env("MESHBRIDGE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let (mut dir, mut ctl) = (PathBuf::new(), Vec::new());
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.split("files and logs in ").nth(1) {
                dir = PathBuf::from(rest.trim_end_matches(')'));
            }
            if line.trim().ends_with(" status") && line.contains(" ctl --registry ") {
                ctl = line.split_whitespace().map(str::to_string).collect();
                ctl.pop(); // "status"
            }
            if line.contains("# gateway-west") {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the demo came up");
    assert!(dir.is_dir() && ctl.len() > 3, "{dir:?} {ctl:?}");

    // Every part of the diagnosis is there, and true to the demo.
    let west_east_up = |s: &Value| {
        s["links"].as_array().is_some_and(|l| {
            l.iter()
                .any(|l| l["from"] == "west" && l["to"] == "east" && l["connected"] == true)
        })
    };
    let s = until(&ctl, "three fresh sites and west's link to east", |s| {
        ["east", "west", "vm"]
            .iter()
            .all(|n| site_state(s, n) == "fresh")
            && west_east_up(s)
    })
    .await;
    assert!(s["registry"]["leader_id"].is_u64(), "{s:#}");
    assert_eq!(s["registry"]["nodes"].as_array().unwrap().len(), 3);
    assert!(s["services"][0]["key"]["name"] == "echo", "{s:#}");
    assert!(s["certificates"][0]["days_left"].as_i64().unwrap() >= 29);
    // The demo killed the leader: that node is reported unreachable, first.
    assert!(
        s["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().contains("unreachable")),
        "{s:#}"
    );

    // No export ownership yet: a warning, not a problem.
    assert!(
        s["warnings"]
            .to_string()
            .contains("no export ownership rules"),
        "{s:#}"
    );
    // Set one with the real ctl: it prints what changed, the warning goes, `list` shows it;
    // a bad scope is refused naming the field.
    let owners = |args: &[&str]| {
        Command::new(BIN)
            .args(&ctl[1..])
            .arg("owners")
            .args(args)
            .output()
            .unwrap()
    };
    let put = owners(&["put", "demo", "--site", "east", "--site", "vm"]);
    assert!(put.status.success(), "{put:?}");
    let text = String::from_utf8_lossy(&put.stdout);
    assert!(
        text.contains("services of demo may now be exported by east, vm only"),
        "{text}"
    );
    let list = owners(&["list", "-o", "json"]);
    let rules: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(rules[0]["scope"], "demo", "{rules:#}");
    assert_eq!(rules[0]["sites"], serde_json::json!(["east", "vm"]));
    let bad = owners(&["put", "Demo", "--site", "east"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("invalid scope"), "{err}");
    let s = ctl_status(&ctl);
    assert_eq!(s["warnings"], serde_json::json!([]), "{s:#}");
    // `ctl site revoke` of a site that never registered, then reinstated.
    let site = |args: &[&str]| {
        Command::new(BIN)
            .args(&ctl[1..])
            .arg("site")
            .args(args)
            .output()
            .unwrap()
    };
    let revoked = site(&["revoke", "ghost"]);
    assert!(
        String::from_utf8_lossy(&revoked.stdout).contains("site ghost revoked"),
        "{revoked:?}"
    );
    let again = site(&["revoke", "ghost", "-o", "json"]);
    let v: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(v["changed"], false, "{v:#}");
    let back = site(&["reinstate", "ghost"]);
    assert!(back.status.success(), "{back:?}");
    let missing = site(&["reinstate", "ghost"]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("revoked site not found: ghost"),
        "{missing:?}"
    );

    // Kill east's gateway: after its 3 s lease, east is stale, and west's link is down.
    let east_cfg = dir.join("gateway-east.toml");
    assert!(
        Command::new("pkill")
            .args([
                "-9",
                "-f",
                &format!("gateway --config {}", east_cfg.display())
            ])
            .status()
            .unwrap()
            .success()
    );
    let s = until(&ctl, "east stale", |s| site_state(s, "east") == "stale").await;
    let problems = s["problems"].to_string();
    assert!(problems.contains("site east is stale"), "{s:#}");

    // Break trust: east comes back with a certificate from a CA nobody trusts.
    let rogue = dir.join("rogue-ca");
    let east_certs = dir.join("certs/gateway-east");
    assert!(
        Command::new(BIN)
            .args(["pki", "init", "--trust-domain", "demo.local", "--out"])
            .arg(&rogue)
            .status()
            .unwrap()
            .success()
    );
    assert!(
        Command::new(BIN)
            .args([
                "pki",
                "issue",
                "--id",
                "spiffe://demo.local/site/east/gateway",
                "--ca"
            ])
            .arg(&rogue)
            .arg("--out")
            .arg(dir.join("rogue-east"))
            .status()
            .unwrap()
            .success()
    );
    for f in ["cert.pem", "key.pem"] {
        std::fs::copy(dir.join("rogue-east").join(f), east_certs.join(f)).unwrap();
    }
    let mut east = tokio::process::Command::new(BIN)
        .args(["gateway", "--config"])
        .arg(&east_cfg)
        .env("MESHBRIDGE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let s = until(&ctl, "west's link to east failing on trust", |s| {
        s["links"].as_array().unwrap().iter().any(|l| {
            l["from"] == "west"
                && l["to"] == "east"
                && l["connected"] == false
                && l["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("not signed by a trusted root"))
        })
    })
    .await;
    assert!(
        s["problems"]
            .to_string()
            .contains("link west → east is down"),
        "{s:#}"
    );
    let _ = east.kill().await;
    let _ = Command::new("kill")
        .args(["-TERM", &demo.id().unwrap().to_string()])
        .status();
    let _ = tokio::time::timeout(Duration::from_secs(20), demo.wait()).await;
}
