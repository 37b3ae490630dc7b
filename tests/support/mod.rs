//! Real `meshbridge` processes for end-to-end tests: a one-node registry, the roles' config
//! files built as typed values (rendered to TOML by `testkit::process::write_config`), and
//! the addresses processes print when they listen.

#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use meshbridge_testkit::pki::TestPki;
use meshbridge_testkit::process::Proc;

pub mod configs;
pub use configs::*;

pub const READY: Duration = Duration::from_secs(30);

/// `meshbridge <role> --config <cfg> [extra…]`, logging at info.
pub fn spawn(name: &str, cfg: &Path, role: &str, extra: &[&str]) -> Result<Proc> {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshbridge"));
    cmd.args([role, "--config", &cfg.to_string_lossy()])
        .args(extra)
        .env("MESHBRIDGE_LOG", "info,openraft=warn,hickory_server=warn");
    Proc::spawn(name, cmd)
}

/// A one-node registry of `pki`'s trust domain (minting join tokens with its CA), listening;
/// with its URL.
pub async fn registry(pki: &TestPki, td: &str) -> Result<(Proc, String)> {
    let url = format!("https://{}", meshbridge_testkit::ports::free_addr());
    let mut cfg = registry_node(pki, td, 1, std::slice::from_ref(&url))?;
    cfg.ca_dir = Some(pki.ca_dir().to_path_buf());
    let path = write_config(&pki.dir().join("registry.toml"), &cfg)?;
    let mut p = spawn("registry", &path, "registry", &[])?;
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
