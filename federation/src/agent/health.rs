//! Health checks for the services on a VM: TCP connect, HTTP GET with an expected status,
//! or a command's exit status; with an interval, a timeout, and rise/fall thresholds.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// What to probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Probe {
    /// Healthy when a TCP connection to `address` opens.
    Tcp { address: SocketAddr },
    /// Healthy when `GET http://<address><path>` answers `expect_status`.
    Http {
        address: SocketAddr,
        #[serde(default = "default_path")]
        path: String,
        #[serde(default = "default_status")]
        expect_status: u16,
    },
    /// Healthy when the command exits 0.
    Command { argv: Vec<String> },
}

fn default_path() -> String {
    "/".into()
}
fn default_status() -> u16 {
    200
}

/// A probe and its timing. Thresholds default to 1: one failure removes the endpoint within
/// one interval, one success brings it back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSpec {
    #[serde(flatten)]
    pub probe: Probe,
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "one")]
    pub healthy_threshold: u32,
    #[serde(default = "one")]
    pub unhealthy_threshold: u32,
}

fn default_interval_ms() -> u64 {
    2000
}
fn default_timeout_ms() -> u64 {
    1000
}
fn one() -> u32 {
    1
}

impl CheckSpec {
    /// Problems, each naming the field under `prefix`.
    pub fn validate(&self, prefix: &str, p: &mut meshbridge_core::config::Problems) {
        p.check(
            self.interval_ms >= 100,
            format!("{prefix}.interval_ms"),
            "must be at least 100",
        );
        p.check(
            self.timeout_ms > 0 && self.timeout_ms <= self.interval_ms,
            format!("{prefix}.timeout_ms"),
            "must be more than 0 and at most interval_ms",
        );
        p.check(
            self.healthy_threshold >= 1,
            format!("{prefix}.healthy_threshold"),
            "must be at least 1",
        );
        p.check(
            self.unhealthy_threshold >= 1,
            format!("{prefix}.unhealthy_threshold"),
            "must be at least 1",
        );
        match &self.probe {
            Probe::Http {
                path,
                expect_status,
                ..
            } => {
                p.check(
                    path.starts_with('/'),
                    format!("{prefix}.path"),
                    "must start with /",
                );
                p.check(
                    (100..600).contains(expect_status),
                    format!("{prefix}.expect_status"),
                    "must be 100..599",
                );
            }
            Probe::Command { argv } => {
                p.check(
                    !argv.is_empty(),
                    format!("{prefix}.argv"),
                    "must name a program",
                );
            }
            Probe::Tcp { .. } => {}
        }
    }
}

/// Run the probe once.
pub async fn probe_once(probe: &Probe, timeout: Duration) -> Result<(), String> {
    let fut = async {
        match probe {
            Probe::Tcp { address } => tokio::net::TcpStream::connect(address)
                .await
                .map(|_| ())
                .map_err(|e| format!("connect {address}: {e}")),
            Probe::Http {
                address,
                path,
                expect_status,
            } => http_status(*address, path).await.and_then(|got| {
                if got == *expect_status {
                    Ok(())
                } else {
                    Err(format!(
                        "GET {path} answered {got}, expected {expect_status}"
                    ))
                }
            }),
            Probe::Command { argv } => {
                let (prog, args) = argv.split_first().ok_or("empty command")?;
                let status = tokio::process::Command::new(prog)
                    .args(args)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .status()
                    .await
                    .map_err(|e| format!("{prog}: {e}"))?;
                if status.success() {
                    Ok(())
                } else {
                    Err(format!("{prog} exited with {status}"))
                }
            }
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {timeout:?}")),
    }
}

async fn http_status(address: SocketAddr, path: &str) -> Result<u16, String> {
    let mut s = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| format!("connect {address}: {e}"))?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: meshbridge-agent\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 1024 {
        let n = s.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    match (
        parts.next(),
        parts.next().and_then(|c| c.parse::<u16>().ok()),
    ) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => Ok(code),
        _ => Err(format!(
            "not an HTTP response: {:?}",
            line.lines().next().unwrap_or("")
        )),
    }
}

/// Rise/fall bookkeeping, kept apart from I/O so it can be tested on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthState {
    pub healthy: bool,
    ok_streak: u32,
    fail_streak: u32,
    pub last_error: Option<String>,
}

impl HealthState {
    /// Services start unhealthy until the first passing probe (no traffic to a host that
    /// has not shown it is up).
    pub fn new() -> Self {
        Self {
            healthy: false,
            ok_streak: 0,
            fail_streak: 0,
            last_error: None,
        }
    }

    /// Record one probe result; returns true when `healthy` flipped.
    pub fn observe(&mut self, result: Result<(), String>, rise: u32, fall: u32) -> bool {
        let before = self.healthy;
        match result {
            Ok(()) => {
                self.ok_streak += 1;
                self.fail_streak = 0;
                self.last_error = None;
                if self.ok_streak >= rise {
                    self.healthy = true;
                }
            }
            Err(e) => {
                self.fail_streak += 1;
                self.ok_streak = 0;
                self.last_error = Some(e);
                if self.fail_streak >= fall {
                    self.healthy = false;
                }
            }
        }
        before != self.healthy
    }
}

impl Default for HealthState {
    fn default() -> Self {
        Self::new()
    }
}

/// Probe forever (until `stop`), publishing the state on every change.
pub async fn run(spec: CheckSpec, tx: watch::Sender<HealthState>, stop: impl Future<Output = ()>) {
    let mut stop = std::pin::pin!(stop);
    let mut tick = tokio::time::interval(Duration::from_millis(spec.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut state = HealthState::new();
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {}
        }
        let result = probe_once(&spec.probe, Duration::from_millis(spec.timeout_ms)).await;
        if let Err(e) = &result {
            tracing::debug!(error = %e, "health probe failed");
        }
        if state.observe(result, spec.healthy_threshold, spec.unhealthy_threshold) {
            tracing::info!(healthy = state.healthy, error = ?state.last_error, "health changed");
            tx.send_replace(state.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_rise_and_fall() {
        let mut s = HealthState::new();
        assert!(!s.observe(Ok(()), 2, 3));
        assert!(s.observe(Ok(()), 2, 3) && s.healthy);
        assert!(!s.observe(Err("x".into()), 2, 3));
        assert!(!s.observe(Err("x".into()), 2, 3));
        assert!(s.observe(Err("y".into()), 2, 3) && !s.healthy);
        assert_eq!(s.last_error.as_deref(), Some("y"));
    }

    #[tokio::test]
    async fn probes_see_real_sockets_and_commands() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let code = if String::from_utf8_lossy(&buf[..n]).starts_with("GET /ok ") {
                    200
                } else {
                    503
                };
                let _ = s
                    .write_all(format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let t = Duration::from_secs(2);
        assert_eq!(probe_once(&Probe::Tcp { address: addr }, t).await, Ok(()));
        let ok = Probe::Http {
            address: addr,
            path: "/ok".into(),
            expect_status: 200,
        };
        assert_eq!(probe_once(&ok, t).await, Ok(()));
        let bad = Probe::Http {
            address: addr,
            path: "/down".into(),
            expect_status: 200,
        };
        assert!(
            probe_once(&bad, t)
                .await
                .unwrap_err()
                .contains("answered 503")
        );
        assert_eq!(
            probe_once(
                &Probe::Command {
                    argv: vec!["true".into()]
                },
                t
            )
            .await,
            Ok(())
        );
        assert!(
            probe_once(
                &Probe::Command {
                    argv: vec!["false".into()]
                },
                t
            )
            .await
            .is_err()
        );
        // A closed port fails.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(
            probe_once(&Probe::Tcp { address: closed }, t)
                .await
                .is_err()
        );
    }
}
