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
use meshbridge_testkit::pki::TestPki;
use meshbridge_testkit::process::Proc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

pub const TD: &str = "test.example";
pub const READY: Duration = Duration::from_secs(30);
/// The SVIDs the registry issues live this long, so renewals come every few seconds.
pub const SVID_TTL_MS: u64 = 10_000;
pub const CHECK_INTERVAL_MS: u64 = 300;

pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_meshbridge")
}

pub use meshbridge_testkit::ports::free_port;

fn tls_section(files: &IdentityFiles) -> String {
    format!(
        "[tls]\ncert = {:?}\nkey = {:?}\nbundle = {:?}\n",
        files.cert, files.key, files.bundle
    )
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
    let rest = line
        .split(label)
        .nth(1)
        .unwrap_or_else(|| panic!("no {label:?} in {line:?}"));
    rest.trim_start()
        .split([' ', ','])
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address after {label:?} in {line:?}"))
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
        let root = pki.dir().to_path_buf();
        let port = free_port();
        let url = format!("https://127.0.0.1:{port}");
        let node = pki.issue("registry-1", &format!("spiffe://{TD}/registry/1"));
        let cfg = root.join("registry.toml");
        std::fs::write(
            &cfg,
            format!(
                "node_id = 1\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:0\"\n\
                 data_dir = {:?}\nca_dir = {:?}\nsvid_ttl_ms = {SVID_TTL_MS}\n{}\
                 [leases]\ntick_interval_ms = 200\n[initial_members]\n1 = \"{url}\"\n",
                root.join("registry-data"),
                pki.ca_dir(),
                tls_section(&node),
            ),
        )
        .unwrap();
        let mut registry = spawn("registry", &["registry", "--config", cfg.to_str().unwrap()]);
        registry.wait_for("listening on", READY).await.unwrap();

        let ctl = pki.issue("ctl", &format!("spiffe://{TD}/ctl/test"));
        let east_service = Service::start("east").await;
        let gw = pki.issue("east", &format!("spiffe://{TD}/site/east/gateway"));
        let p = east_service.port;
        let cfg = root.join("east.toml");
        std::fs::write(
            &cfg,
            format!(
                "[gateway]\nsite = \"east\"\ndata_dir = {:?}\ndrain_deadline_ms = 1000\n\
                 [gateway.tunnel]\nlisten = \"127.0.0.1:0\"\n\
                 [gateway.listeners]\nvip_range = \"127.244.0.0/16\"\n{}\
                 [source]\nregistry = [\"{url}\"]\n\
                 [register]\nregion = \"us-east\"\nzone = \"us-east-1a\"\nlease_ttl_ms = 3000\n\
                 [[exports]]\nnamespace = \"shop\"\nname = \"front\"\n\
                 ports = [{{ name = \"tcp\", port = {p}, target_port = {p} }}]\n\
                 endpoints = [{{ address = \"127.0.0.1\" }}]\n\
                 [dns]\nlisten = \"127.0.0.1:0\"\nsite = \"east\"\nvip_range = \"127.244.0.0/16\"\n\
                 [dns.rate_limit]\nper_client_qps = 0\n",
                root.join("east-data"),
                tls_section(&gw),
            ),
        )
        .unwrap();
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
        let p = svc.port;
        let text = format!(
            "site = \"{site}\"\ntrust_domain = \"{TD}\"\nregistry = [\"{}\"]\ndata_dir = {data_dir:?}\n\
             join_token = \"{token}\"\nbundle = {:?}\nvip_range = \"127.245.0.0/16\"\n\
             lease_ttl_ms = 3000\ndrain_deadline_ms = 1000\n\
             [locality]\nregion = \"us-east\"\nzone = \"us-east-1b\"\n\
             [tunnel]\nlisten = \"127.0.0.1:0\"\n\
             [dns]\nlisten = \"127.0.0.1:0\"\n[dns.rate_limit]\nper_client_qps = 0\n\
             [[services]]\nnamespace = \"shop\"\nname = \"{svc_name}\"\n\
             ports = [{{ name = \"tcp\", port = {p} }}]\n\
             [services.check]\nkind = \"http\"\naddress = \"127.0.0.1:{}\"\npath = \"/healthz\"\n\
             interval_ms = {CHECK_INTERVAL_MS}\ntimeout_ms = 250\n",
            self.registry_url,
            self.pki.ca_dir().join("ca.pem"),
            svc.health_port,
        );
        let path = data_dir.with_extension("toml");
        std::fs::write(&path, text).unwrap();
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
