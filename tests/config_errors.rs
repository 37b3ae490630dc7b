//! A bad setting stops a role before it starts, with the field named (real process).

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_meshbridge");

/// Runs `meshbridge <role> --config <file with text>`; returns (success, stderr).
fn run_with(role: &str, text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(format!("{role}.toml"));
    std::fs::write(&path, text).expect("write config");
    let out = Command::new(BIN)
        .args([role, "--config"])
        .arg(&path)
        .output()
        .expect("run meshbridge");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_gateway_asking_for_too_many_workers_is_refused_naming_the_field() {
    let (ok, err) = run_with(
        "gateway",
        r#"workers = 5000
[gateway]
site = "east"
data_dir = "/nonexistent/east"
[tls]
cert = "c.pem"
key = "k.pem"
bundle = "b.pem"
[source]
catalog_file = "catalog.json"
"#,
    );
    assert!(!ok, "gateway started with workers = 5000");
    assert!(err.contains("workers"), "stderr: {err}");
    assert!(err.contains("5000 is more than 1024"), "stderr: {err}");
}

#[test]
fn a_registry_node_asking_for_too_many_workers_is_refused_naming_the_field() {
    let (ok, err) = run_with(
        "registry",
        r#"node_id = 1
workers = 2048
listen = "127.0.0.1:0"
data_dir = "/nonexistent/n1"
[tls]
cert = "c.pem"
key = "k.pem"
bundle = "b.pem"
"#,
    );
    assert!(!ok, "registry started with workers = 2048");
    assert!(err.contains("workers"), "stderr: {err}");
    assert!(err.contains("2048 is more than 1024"), "stderr: {err}");
}

/// A bind failure names the setting and the address, not just "Address already in use".
#[test]
fn a_busy_address_is_named_with_its_setting() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = busy.local_addr().expect("addr").to_string();
    let out = Command::new(BIN)
        .args(["echo", "--listen", &addr])
        .output()
        .expect("run meshbridge");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("--listen {addr}: cannot bind")) && err.contains("in use"),
        "{err}"
    );
}
