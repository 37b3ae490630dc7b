//! The data plane's processes run with glibc's malloc tuned (`src/malloc.rs`): a gateway
//! re-executes itself, keeping its pid, with `GLIBC_TUNABLES` set, and still serves; an
//! operator's own malloc tunables and the opt-out are respected; other roles are left alone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use anyhow::Result;
use meshbridge_core::model::Catalog;
use meshbridge_federation::source::CatalogSource;
use meshbridge_testkit::pki::TestPki;
use meshbridge_testkit::process::Proc;
use support::{READY, gateway_file, write};

const TD: &str = "malloc.example";
/// The first of the tunables the binary sets. glibc parses `GLIBC_TUNABLES` in place at
/// start, ending the string after the first tunable's value (every one is applied), so
/// that is what `/proc/<pid>/environ` shows of it; the whole value, and how an operator's
/// other tunables are kept, are unit-tested in `src/malloc.rs`.
const FIRST_TUNABLE: &str = "glibc.malloc.trim_threshold=67108864";

/// `GLIBC_TUNABLES` in the environment the process `pid` runs with now.
fn tunables_of(pid: u32) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    environ
        .split(|b| *b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix("GLIBC_TUNABLES=").map(String::from))
}

/// The process name (`/proc/<pid>/comm`) that `ps`, `top` and `pgrep` show.
fn comm_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap()
        .trim_end()
        .to_string()
}

/// The name the kernel gives a process started from the test binary's file (at most 15
/// bytes of its file name).
fn binary_name() -> String {
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_meshbridge"));
    let name = path.file_name().unwrap().to_string_lossy();
    name.chars().take(15).collect()
}

/// A gateway reading an empty catalog file, started with `env`; its pid once it listens.
async fn gateway(pki: &TestPki, name: &str, env: &[(&str, &str)]) -> Result<(Proc, u32)> {
    let catalog = pki.dir().join("catalog.json");
    std::fs::write(&catalog, serde_json::to_vec(&Catalog::default())?)?;
    let cfg = write(
        pki,
        name,
        &gateway_file(pki, TD, name, CatalogSource::file(&catalog)),
    )?;
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshbridge"));
    cmd.args(["gateway", "--config"])
        .arg(&cfg)
        .env_remove("GLIBC_TUNABLES")
        .env_remove("MESHBRIDGE_MALLOC_TUNING")
        .envs(env.iter().copied());
    let mut p = Proc::spawn(name, cmd)?;
    let pid = p.pid().expect("a pid");
    p.wait_for("listening on", READY).await?;
    Ok((p, pid))
}

#[tokio::test]
async fn a_gateway_runs_with_tuned_malloc_unless_told_otherwise() -> Result<()> {
    let pki = TestPki::new(TD);

    // By default: the same process (pid), now with the tunables, serving.
    let (mut tuned, pid) = gateway(&pki, "tuned", &[]).await?;
    assert!(!tuned.exited(), "the re-executed gateway runs");
    assert_eq!(tunables_of(pid).as_deref(), Some(FIRST_TUNABLE));
    // ... and still named after its binary: `ps`, `top`, `pgrep meshbridge` and
    // `pkill meshbridge` find it by this name (an exec of /proc/self/exe would make it "exe").
    assert_eq!(comm_of(pid), binary_name());

    // The operator's own malloc tunables stand; so does the opt-out.
    let own = "glibc.malloc.arena_max=2";
    let (_own, pid) = gateway(&pki, "own", &[("GLIBC_TUNABLES", own)]).await?;
    assert_eq!(tunables_of(pid).as_deref(), Some(own));
    let (_off, pid) = gateway(&pki, "off", &[("MESHBRIDGE_MALLOC_TUNING", "off")]).await?;
    assert_eq!(tunables_of(pid), None);

    // Roles off the data path are not re-executed (here the echo service).
    let mut echo = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshbridge"));
    echo.args(["echo", "--listen", "127.0.0.1:0", "--name", "x"])
        .env_remove("GLIBC_TUNABLES");
    let mut echo = Proc::spawn("echo", echo)?;
    let pid = echo.pid().expect("a pid");
    echo.wait_for("listening on", READY).await?;
    assert_eq!(tunables_of(pid), None);
    tuned.terminate(std::time::Duration::from_secs(10)).await;
    Ok(())
}
