//! A small mesh of real processes on 127.0.0.1 for the agent tests: a one-node registry
//! that can issue SVIDs (`ca_dir`, short `svid_ttl_ms`), a gateway site `east` with an
//! embedded DNS server and a service of its own, and helpers to run agents, ask DNS and
//! talk through the tunnel.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use meshbridge_core::client::RegistryClient;
use meshbridge_core::tls::{Identity, IdentityFiles, cert_info, load_certs};
use meshbridge_core::vip::VipRange;
use meshbridge_federation::agent::config::{Config as AgentConfig, LocalityConfig, ServiceConfig};
use meshbridge_federation::agent::health::{CheckSpec, Probe};
use meshbridge_federation::dns;
use meshbridge_federation::site::{ExportSpec, PortSpec, Registration};
use meshbridge_testkit::pki::TestPki;
use meshbridge_testkit::process::Proc;
use meshbridge_testkit::process::write_config;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::support::{LOOPBACK, registered_gateway, registry_node, write};

pub const TD: &str = "test.example";
pub const READY: Duration = Duration::from_secs(30);
/// The SVIDs the registry issues live this long, so renewals come every few seconds.
pub const SVID_TTL_MS: u64 = 10_000;
pub const CHECK_INTERVAL_MS: u64 = 300;

pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_meshbridge")
}

pub use meshbridge_testkit::ports::free_addr;

fn vip_range(text: &str) -> VipRange {
    text.parse()
        .unwrap_or_else(|e| panic!("VIP range {text}: {e}"))
}

pub fn spawn(name: &str, args: &[&str]) -> Proc {
    let mut cmd = tokio::process::Command::new(exe());
    cmd.args(args).env(
        "MESHBRIDGE_LOG",
        "info,openraft=warn,hickory_server=warn,hickory_proto=warn",
    );
    Proc::spawn(name, cmd).unwrap()
}

/// The address after `label ` in a "listening on" line.
pub fn addr_in(line: &str, label: &str) -> SocketAddr {
    meshbridge_testkit::process::addr_after(line, label).unwrap_or_else(|e| panic!("{e}"))
}

/// A line-echo server (`<name>: <line>`) and an HTTP health endpoint whose answer the
/// test switches between 200 and 503.
pub struct Service {
    pub port: u16,
    pub health_port: u16,
    pub healthy: Arc<AtomicBool>,
}

impl Service {
    pub async fn start(name: &'static str) -> Self {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let health = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (port, health_port) = (
            echo.local_addr().unwrap().port(),
            health.local_addr().unwrap().port(),
        );
        tokio::spawn(async move {
            while let Ok((s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut lines = BufReader::new(r).lines();
                    while let Ok(Some(l)) = lines.next_line().await {
                        if w.write_all(format!("{name}: {l}\n").as_bytes())
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                });
            }
        });
        let healthy = Arc::new(AtomicBool::new(true));
        let flag = healthy.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = health.accept().await {
                let code = if flag.load(Ordering::SeqCst) {
                    200
                } else {
                    503
                };
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let reply = format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n");
                    let _ = s.write_all(reply.as_bytes()).await;
                });
            }
        });
        Self {
            port,
            health_port,
            healthy,
        }
    }
}

pub struct Mesh {
    pub pki: TestPki,
    pub registry_url: String,
    pub ctl_dir: PathBuf,
    pub east_dns: SocketAddr,
    pub east_service: Service,
    registry: Proc,
    east: Proc,
}

impl Mesh {
    pub async fn start() -> Self {
        let pki = TestPki::new(TD);
        let url = format!("https://{}", free_addr());
        let mut node = registry_node(&pki, TD, 1, std::slice::from_ref(&url)).unwrap();
        node.ca_dir = Some(pki.ca_dir().to_path_buf());
        node.svid_ttl_ms = SVID_TTL_MS;
        let cfg = write(&pki, "registry", &node).unwrap();
        let mut registry = spawn("registry", &["registry", "--config", cfg.to_str().unwrap()]);
        registry.wait_for("listening on", READY).await.unwrap();

        let ctl = pki.issue("ctl", &format!("spiffe://{TD}/ctl/test"));
        let east_service = Service::start("east").await;
        let mut gw = registered_gateway(&pki, TD, "east", &url);
        gw.gateway.listeners.vip_range = Some(vip_range("127.244.0.0/16"));
        gw.register = Some(Registration {
            region: "us-east".into(),
            zone: "us-east-1a".into(),
            lease_ttl_ms: 3000,
            ..Registration::default()
        });
        let p = east_service.port;
        gw.exports = vec![ExportSpec::tcp("shop", "front", (p, p), &[LOOPBACK])];
        gw.dns = Some(dns::Config {
            site: "east".into(),
            vip_range: Some(vip_range("127.244.0.0/16")),
            ..dns::Config::for_test("east")
        });
        let cfg = write(&pki, "east", &gw).unwrap();
        let mut east = spawn("east", &["gateway", "--config", cfg.to_str().unwrap()]);
        let line = east.wait_for("listening on", READY).await.unwrap();
        Self {
            east_dns: addr_in(&line, "dns"),
            registry_url: url,
            ctl_dir: ctl.cert.parent().unwrap().to_path_buf(),
            east_service,
            pki,
            registry,
            east,
        }
    }

    /// `meshbridge ctl token create`, as an operator would: the token is stdout.
    pub async fn token(&self, site: &str) -> String {
        let out = tokio::process::Command::new(exe())
            .args(["ctl", "--registry", &self.registry_url, "--tls-dir"])
            .arg(&self.ctl_dir)
            .args(["token", "create", "--site", site, "--ttl", "10m"])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "ctl token create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(token.starts_with("mbjt1."), "{token}");
        token
    }

    /// An agent config for site `site` exporting `svc` (shop/<svc_name>) with an HTTP check.
    pub fn agent_config(
        &self,
        site: &str,
        data_dir: &Path,
        token: &str,
        svc: &Service,
        svc_name: &str,
    ) -> PathBuf {
        let mut cfg = AgentConfig::new(site, TD, [&self.registry_url], data_dir);
        cfg.join_token = Some(token.into());
        cfg.bundle = Some(self.pki.ca_dir().join("ca.pem"));
        cfg.vip_range = vip_range("127.245.0.0/16");
        cfg.lease_ttl_ms = 3000;
        cfg.drain_deadline_ms = 1000;
        cfg.locality = LocalityConfig {
            region: "us-east".into(),
            zone: "us-east-1b".into(),
        };
        cfg.tunnel.listen = "127.0.0.1:0".into();
        cfg.dns = Some(dns::Config::for_test(""));
        let health = SocketAddr::from((Ipv4Addr::LOCALHOST, svc.health_port));
        cfg.services = vec![ServiceConfig {
            namespace: "shop".into(),
            name: svc_name.into(),
            address: LOOPBACK,
            ports: vec![PortSpec::tcp(svc.port, svc.port)],
            hostname: None,
            weight: None,
            check: Some(CheckSpec {
                probe: Probe::Http {
                    address: health,
                    path: "/healthz".into(),
                    expect_status: 200,
                },
                interval_ms: CHECK_INTERVAL_MS,
                timeout_ms: 250,
                healthy_threshold: 1,
                unhealthy_threshold: 1,
            }),
        }];
        let path = data_dir.with_extension("toml");
        write_config(&path, &cfg).unwrap();
        path
    }

    /// A registry client with the operator's identity.
    pub async fn ctl_client(&self) -> RegistryClient {
        let identity = Identity::load(IdentityFiles::in_dir(&self.ctl_dir)).unwrap();
        RegistryClient::connect(std::slice::from_ref(&self.registry_url), identity)
            .await
            .unwrap()
    }

    pub async fn stop(mut self) {
        self.east.terminate(Duration::from_secs(5)).await;
        self.registry.terminate(Duration::from_secs(5)).await;
    }
}

/// The A records for `name`, or the response code when there are none.
pub async fn resolve(server: SocketAddr, name: &str) -> Result<Vec<Ipv4Addr>> {
    let mut msg = Message::new(query_id(), MessageType::Query, OpCode::Query);
    msg.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    sock.connect(server).await?;
    sock.send(&msg.to_vec()?).await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
        .await
        .context("DNS timed out")??;
    let answer = Message::from_vec(&buf[..n])?;
    let ips: Vec<Ipv4Addr> = answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    if ips.is_empty() {
        bail!(
            "no A record for {name}: {:?}",
            answer.metadata.response_code
        );
    }
    Ok(ips)
}

fn query_id() -> u16 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(7, |d| (d.subsec_nanos() & 0xffff) as u16)
}

/// Send one line, return the reply line.
pub async fn echo(addr: SocketAddr, line: &str) -> Result<String> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("{line}\n").as_bytes()).await?;
        let mut reply = String::new();
        BufReader::new(&mut s).read_line(&mut reply).await?;
        if reply.is_empty() {
            bail!("{addr} closed the connection without a reply");
        }
        Ok(reply.trim_end().to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .context("no reply in 5 s")?
}

/// Poll `probe` every 100 ms until it returns `Some`, for at most `within`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < within {
        match probe().await {
            Ok(v) => return (v, start.elapsed()),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not within {within:?}; last: {last}")
}

/// The serial of the certificate in a PEM file (the agent's `svid.pem`).
pub fn serial(path: &Path) -> String {
    let certs = load_certs(path).unwrap();
    cert_info(&certs[0]).unwrap().serial
}
