//! Network namespaces joined by veth pairs: sites as hosts with their own addresses, and
//! partitions by taking links down. Needs root and `ip` (iproute2).
//!
//! Addresses live only inside namespaces the test creates (10.77.x.y by default), so test
//! traffic never leaves the machine. Everything is removed on drop.

use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) -> anyhow::Result<Output> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        anyhow::bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Whether namespaced tests can run here: root and a working `ip netns`.
/// In CI (`CI=true`) they must: this panics instead of returning false.
pub fn available() -> bool {
    let probe = (|| -> anyhow::Result<()> {
        let name = format!("mb-probe-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        ip(&["netns", "del", &name])?;
        Ok(())
    })();
    match probe {
        Ok(()) => true,
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("network namespace tests must run in CI, but ip netns does not work: {e}")
        }
        Err(e) => {
            eprintln!("skipping: network namespaces unavailable here ({e}); they run in CI");
            false
        }
    }
}

/// One namespace, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(label: &str) -> anyhow::Result<Self> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("mb{}-{}-{label}", std::process::id() % 100_000, n);
        ip(&["netns", "add", &name])?;
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        Ok(Self { name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// The same, for tokio.
    pub fn tokio_command(&self, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A veth pair between two namespaces, with an address on each end (/24).
pub struct Link {
    a: (String, String),
    b: (String, String),
}

impl Link {
    /// Join `a` and `b`; `a_addr`/`b_addr` like `10.77.1.1` and `10.77.1.2` (same /24).
    pub fn new(a: &Netns, a_addr: &str, b: &Netns, b_addr: &str) -> anyhow::Result<Self> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let (ia, ib) = (format!("mbv{n}a"), format!("mbv{n}b"));
        ip(&[
            "link",
            "add",
            &ia,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            &ib,
            "netns",
            b.name(),
        ])?;
        ip(&[
            "-n",
            a.name(),
            "addr",
            "add",
            &format!("{a_addr}/24"),
            "dev",
            &ia,
        ])?;
        ip(&[
            "-n",
            b.name(),
            "addr",
            "add",
            &format!("{b_addr}/24"),
            "dev",
            &ib,
        ])?;
        let link = Self {
            a: (a.name().into(), ia),
            b: (b.name().into(), ib),
        };
        link.set_up(true)?;
        Ok(link)
    }

    /// Take both ends down (a partition) or up (heal).
    pub fn set_up(&self, up: bool) -> anyhow::Result<()> {
        let state = if up { "up" } else { "down" };
        for (ns, dev) in [&self.a, &self.b] {
            ip(&["-n", ns, "link", "set", dev, state])?;
        }
        Ok(())
    }
}

/// A veth pair between this (the test's) network namespace and `ns`, with an address on
/// each end (/24): a "pod" namespace that reaches processes of the test host, and that
/// they reach. Take the /24 from [`crate::slots`] so parallel tests never share one.
/// The host end is deleted on drop (which deletes both ends).
pub struct HostLink {
    host_dev: String,
}

impl HostLink {
    pub fn new(ns: &Netns, host_addr: &str, ns_addr: &str) -> anyhow::Result<Self> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let (host_dev, ns_dev) = (
            format!("mbh{}x{n}", std::process::id() % 100_000),
            format!("mbh{n}n"),
        );
        ip(&[
            "link",
            "add",
            &host_dev,
            "type",
            "veth",
            "peer",
            "name",
            &ns_dev,
            "netns",
            ns.name(),
        ])?;
        let link = Self {
            host_dev: host_dev.clone(),
        };
        ip(&["addr", "add", &format!("{host_addr}/24"), "dev", &host_dev])?;
        ip(&[
            "-n",
            ns.name(),
            "addr",
            "add",
            &format!("{ns_addr}/24"),
            "dev",
            &ns_dev,
        ])?;
        ip(&["link", "set", &host_dev, "up"])?;
        ip(&["-n", ns.name(), "link", "set", &ns_dev, "up"])?;
        Ok(link)
    }
}

impl Drop for HostLink {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_dev])
            .output();
    }
}
