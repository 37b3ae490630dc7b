//! Run the real binary as a child process and wait for what it prints; write the
//! configuration files it reads.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// Write `cfg` (a role's typed configuration) as the TOML file `path`; returns `path`.
pub fn write_config<T: serde::Serialize>(path: &Path, cfg: &T) -> anyhow::Result<PathBuf> {
    meshbridge_core::config::write(path, cfg)?;
    Ok(path.to_path_buf())
}

/// The address after `label` in a line a process printed (`listening on 127.0.0.1:7443
/// (tunnel), dns 127.0.0.1:5353, admin …`): the first word after it, up to a space or comma.
pub fn addr_after(line: &str, label: &str) -> anyhow::Result<std::net::SocketAddr> {
    line.split(label)
        .nth(1)
        .and_then(|r| r.trim_start().split([' ', ',']).next())
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("no address after {label:?} in {line:?}"))
}

/// A child process whose stdout and stderr lines are collected; killed on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    /// Every line seen so far (for failure messages).
    pub log: Vec<String>,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> anyhow::Result<Self> {
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let (tx, lines) = mpsc::unbounded_channel();
        if let Some(out) = child.stdout.take() {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(out).lines();
                while let Ok(Some(l)) = r.next_line().await {
                    let _ = tx.send(l);
                }
            });
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(async move {
                let mut r = BufReader::new(err).lines();
                while let Ok(Some(l)) = r.next_line().await {
                    let _ = tx.send(l);
                }
            });
        }
        Ok(Self {
            name: name.to_string(),
            child,
            lines,
            log: Vec::new(),
        })
    }

    /// Wait for a line containing `needle`; returns it. Fails with the log on timeout/exit.
    pub async fn wait_for(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return Ok(line);
                    }
                }
                Ok(None) => anyhow::bail!(
                    "{} exited before printing {needle:?}; log:\n{}",
                    self.name,
                    self.log.join("\n")
                ),
                Err(_) => anyhow::bail!(
                    "{} did not print {needle:?} in {timeout:?}; log:\n{}",
                    self.name,
                    self.log.join("\n")
                ),
            }
        }
    }

    /// Whether the process has ended.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL and reap.
    pub async fn kill9(&mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, then wait up to `grace` for exit (SIGKILL after). Returns the exit status
    /// code if it exited by itself.
    pub async fn terminate(&mut self, grace: Duration) -> Option<i32> {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(status)) => status.code(),
            _ => {
                self.kill9().await;
                None
            }
        }
    }

    /// Drain lines printed so far into `log` without waiting.
    pub fn collect(&mut self) -> &[String] {
        while let Ok(l) = self.lines.try_recv() {
            self.log.push(l);
        }
        &self.log
    }
}
