//! Real `meshbridge` processes for end-to-end tests: a one-node registry, configs with TLS
//! sections, and the addresses processes print when they listen.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use meshbridge_core::tls::IdentityFiles;
use meshbridge_testkit::pki::TestPki;
use meshbridge_testkit::process::Proc;

pub const READY: Duration = Duration::from_secs(30);

/// `meshbridge <role> --config <cfg> [extra…]`, logging at info.
pub fn spawn(name: &str, cfg: &Path, role: &str, extra: &[&str]) -> Result<Proc> {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshbridge"));
    cmd.args([role, "--config", &cfg.to_string_lossy()])
        .args(extra)
        .env("MESHBRIDGE_LOG", "info,openraft=warn,hickory_server=warn");
    Proc::spawn(name, cmd)
}

/// The `[tls]` section for `files`.
pub fn tls(files: &IdentityFiles) -> String {
    format!(
        "[tls]\ncert = {:?}\nkey = {:?}\nbundle = {:?}\n",
        files.cert, files.key, files.bundle
    )
}

/// The address after `label` in a "listening on" line (`dns 127.0.0.1:5353, …`).
pub fn addr_after(line: &str, label: &str) -> Result<SocketAddr> {
    line.split(label)
        .nth(1)
        .and_then(|r| r.split([' ', ',']).next())
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("no address after {label:?} in {line:?}"))
}

/// A one-node registry of `pki`'s trust domain (minting join tokens with its CA), listening;
/// with its URL.
pub async fn registry(pki: &TestPki, td: &str) -> Result<(Proc, String)> {
    let root = pki.dir();
    let port = meshbridge_testkit::kube::free_port()?;
    let url = format!("https://127.0.0.1:{port}");
    let files = pki.issue("registry-1", &format!("spiffe://{td}/registry/1"));
    let cfg = root.join("registry.toml");
    std::fs::write(
        &cfg,
        format!(
            "node_id = 1\nlisten = \"127.0.0.1:{port}\"\ndata_dir = {:?}\nca_dir = {:?}\n{}[initial_members]\n1 = \"{url}\"\n",
            root.join("registry-data"),
            pki.ca_dir(),
            tls(&files),
        ),
    )?;
    let mut p = spawn("registry", &cfg, "registry", &[])?;
    p.wait_for("listening on", READY).await?;
    Ok((p, url))
}

/// Run `ctl` (a `meshbridge ctl …` command without the subcommand) with `status -o json`;
/// the JSON it printed.
pub fn ctl_status_json(mut ctl: std::process::Command) -> serde_json::Value {
    let out = ctl
        .args(["status", "-o", "json"])
        .env("MESHBRIDGE_LOG", "warn")
        .output()
        .expect("running ctl status");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "ctl status -o json: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}
