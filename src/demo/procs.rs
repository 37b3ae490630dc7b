//! Child processes of the demo: the same binary in another role, output kept in log files,
//! readiness from the line each role prints once it listens.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

pub struct Proc {
    pub name: String,
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    pub log: PathBuf,
}

impl Proc {
    /// Start `meshbridge <args>`; stdout lines are readable with [`Proc::wait_for`], stderr
    /// (the logs) goes to `<dir>/<name>.log`.
    pub fn spawn(dir: &Path, name: &str, args: &[&str]) -> Result<Self> {
        let exe = std::env::current_exe().context("locating the meshbridge binary")?;
        let log = dir.join(format!("{name}.log"));
        let err =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = Command::new(exe)
            .args(args)
            .env(
                "MESHBRIDGE_LOG",
                "info,openraft=warn,hickory_server=warn,hickory_proto=warn",
            )
            .env("MESHBRIDGE_EXIT_WITH_PARENT", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let (tx, lines) = mpsc::unbounded_channel();
        if let Some(out) = child.stdout.take() {
            tokio::spawn(async move {
                let mut r = BufReader::new(out).lines();
                while let Ok(Some(l)) = r.next_line().await {
                    let _ = tx.send(l);
                }
            });
        }
        Ok(Self {
            name: name.into(),
            child,
            lines,
            log,
        })
    }

    pub async fn wait_for(&mut self, needle: &str, within: Duration) -> Result<String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(l)) if l.contains(needle) => return Ok(l),
                Ok(Some(_)) => {}
                Ok(None) => bail!(
                    "{} exited; see {}:\n{}",
                    self.name,
                    self.log.display(),
                    tail(&self.log)
                ),
                Err(_) => bail!(
                    "{} did not become ready in {within:?}; see {}:\n{}",
                    self.name,
                    self.log.display(),
                    tail(&self.log)
                ),
            }
        }
    }

    pub async fn kill9(&mut self) {
        let _ = self.child.kill().await;
    }

    pub async fn terminate(&mut self, grace: Duration) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            self.kill9().await;
        }
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// How many demos can run on one machine at once: one per pair of VIP blocks.
pub const MAX_DEMOS: u16 = 72;
/// Ports each demo may use (it needs about 15).
const PORTS_PER_DEMO: u16 = 48;

/// The ports of one demo's processes. They come from a window that belongs to this demo
/// alone (indexed by its VIP claim, which is machine-wide exclusive) and that lies outside
/// the kernel's ephemeral range. A port asked of the kernel (`bind(0)`) and released until
/// the child process binds it could be handed to any other process's `bind(0)` or
/// `connect()` in between; under a parallel test run that happened (`bind admin HTTP on
/// 127.0.0.1:41261: Address already in use`).
pub struct Ports {
    next: u16,
    end: u16,
}

impl Ports {
    /// The window of demo number `index` (0..[`MAX_DEMOS`]).
    pub fn for_demo(index: u16) -> Result<Self> {
        let ephemeral = meshbridge_core::ports::ephemeral_range().map_err(anyhow::Error::msg)?;
        let window = window(index, ephemeral)?;
        Ok(Self {
            next: window.start,
            end: window.end,
        })
    }

    /// The next port of the window that is free for TCP and UDP on 127.0.0.1 (something
    /// else on the machine may hold one; it is skipped).
    pub fn take(&mut self) -> Result<u16> {
        while self.next < self.end {
            let port = self.next;
            self.next += 1;
            if meshbridge_core::ports::free_on_loopback(port) {
                return Ok(port);
            }
        }
        bail!(
            "no free port left in the demo's window (it ends at {}): other programs hold them",
            self.end
        )
    }
}

/// Demo `index`'s window: above the ephemeral range if there is room (the tests' own
/// process windows are below it), else below it.
fn window(index: u16, (low, high): (u16, u16)) -> Result<std::ops::Range<u16>> {
    if index >= MAX_DEMOS {
        bail!("demo index {index} is past the last of {MAX_DEMOS}");
    }
    let span = u32::from(MAX_DEMOS) * u32::from(PORTS_PER_DEMO);
    let base = if u32::from(high) + 1 + span <= 65536 {
        u32::from(high) + 1
    } else if u32::from(low) >= 1024 + span {
        u32::from(low) - span
    } else {
        bail!(
            "the kernel's ephemeral port range {low}-{high} leaves no room for the demo's \
             {span} ports (net.ipv4.ip_local_port_range)"
        );
    };
    let start = base + u32::from(index) * u32::from(PORTS_PER_DEMO);
    let end = start + u32::from(PORTS_PER_DEMO);
    // end <= base + span <= 65536; the last window above the range loses port 65535.
    let start = u16::try_from(start).context("demo port window")?;
    let end = u16::try_from(end.min(65535)).context("demo port window")?;
    Ok(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_demos_window_is_its_own_and_outside_the_ephemeral_range() {
        for ephemeral in [
            (32768, 60999),
            (1024, 40000),
            (50000, 65535),
            (32768, 65535),
        ] {
            let windows: Vec<_> = (0..MAX_DEMOS)
                .map(|i| window(i, ephemeral).unwrap())
                .collect();
            for (i, w) in windows.iter().enumerate() {
                assert!(w.len() >= 40, "{w:?}");
                assert!(w.start >= 1024, "{w:?}");
                assert!(
                    w.end <= ephemeral.0 || w.start > ephemeral.1,
                    "{w:?} overlaps the ephemeral range {ephemeral:?}"
                );
                for other in &windows[i + 1..] {
                    assert!(
                        w.end <= other.start || other.end <= w.start,
                        "{w:?} {other:?}"
                    );
                }
            }
        }
        assert!(window(MAX_DEMOS, (32768, 60999)).is_err());
        let err = window(0, (1024, 65000)).unwrap_err().to_string();
        assert!(err.contains("ip_local_port_range"), "{err}");
    }

    #[test]
    fn a_port_something_else_holds_is_skipped() {
        let ephemeral = meshbridge_core::ports::ephemeral_range().unwrap();
        let w = window(MAX_DEMOS - 1, ephemeral).unwrap();
        let mut ports = Ports {
            next: w.start,
            end: w.end,
        };
        // Hold the first free port of the window, then ask: the next one comes back.
        let mut probe = Ports {
            next: w.start,
            end: w.end,
        };
        let held_port = probe.take().unwrap();
        let _held = std::net::TcpListener::bind(("127.0.0.1", held_port)).unwrap();
        let got = ports.take().unwrap();
        assert!(got > held_port, "{got} vs held {held_port}");
    }
}
