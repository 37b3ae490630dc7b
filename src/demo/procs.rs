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

/// A free TCP+UDP port on 127.0.0.1 (asked of the kernel, then released).
pub fn free_port() -> Result<u16> {
    for _ in 0..50 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port on 127.0.0.1")
}
