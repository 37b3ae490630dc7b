//! Setting up the demo mesh: PKI, configuration files, processes.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use std::time::Duration;

use anyhow::{Context, Result, bail};
use meshbridge_core::client::RegistryClient;
use meshbridge_core::id::SpiffeId;
use meshbridge_core::model::SiteKind;
use meshbridge_core::pki::Ca;
use meshbridge_core::tls::{Identity, IdentityFiles};
use meshbridge_core::vip::VipRange;
use meshbridge_federation::agent::config::{Config as AgentConfig, LocalityConfig, ServiceConfig};
use meshbridge_federation::agent::health::{CheckSpec, Probe};
use meshbridge_federation::dns;
use meshbridge_federation::files::GatewayFile;
use meshbridge_federation::site::{ExportSpec, PortSpec, Registration};
use meshbridge_federation::source::CatalogSource;

use super::probe;
use super::procs::{MAX_DEMOS, Ports, Proc};

const TD: &str = "demo.local";
const READY: Duration = Duration::from_secs(30);
const SERVICE_PORT: u16 = 7000;

pub struct Mesh {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    registry: Vec<(u64, Proc)>,
    urls: Vec<String>,
    others: Vec<Proc>,
    east_echo: Option<Proc>,
    west_dns: SocketAddr,
    client: RegistryClient,
    ctl_dir: PathBuf,
    admin: Vec<(String, SocketAddr)>,
    /// Held while the demo runs: its claim on its VIP blocks (see [`claim_vip_blocks`]).
    _vip_claim: std::net::TcpListener,
}

/// Two /16 blocks of loopback VIPs no other demo on this machine is using (west's gateway
/// and the VM agent bind the service's port on them; two demos on the same blocks would
/// answer each other's clients). The claim is a listener on the first block's network
/// address, which is never a VIP: a second demo cannot bind it and takes the next blocks.
fn claim_vip_blocks() -> Result<(u8, std::net::TcpListener)> {
    for octet in (100..=242u8).rev().step_by(2) {
        if let Ok(l) =
            std::net::TcpListener::bind(SocketAddr::from(([127, octet, 0, 0], SERVICE_PORT)))
        {
            return Ok((octet, l));
        }
    }
    const _: () = assert!((242 - 100) / 2 + 1 == MAX_DEMOS);
    bail!("every loopback VIP block of the demo (127.100.0.0 to 127.243.255.255) is in use")
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

impl Mesh {
    pub async fn start() -> Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("meshbridge-demo-")
            .tempdir()?;
        let root = tmp.path().to_path_buf();
        let (octet, vip_claim) = claim_vip_blocks()?;
        let mut window = Ports::for_demo(u16::from((242 - octet) / 2))?;
        let mut free_port = || window.take();
        let block =
            |o: u8| VipRange::new(Ipv4Addr::new(127, o, 0, 0), 16).map_err(anyhow::Error::msg);
        let (west_vips, vm_vips) = (block(octet)?, block(octet + 1)?);
        let ca = Ca::generate(TD, Duration::from_secs(30 * 86400))?;
        ca.write_to(&root.join("ca"))?;
        let issue = |name: &str, id: &str| -> Result<PathBuf> {
            let dir = root.join("certs").join(name);
            ca.issue(&SpiffeId::parse(id)?, Duration::from_secs(30 * 86400), &[])?
                .write_to(&dir)?;
            Ok(dir)
        };

        // Registry: three nodes.
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_>>()?;
        let urls: Vec<String> = ports
            .iter()
            .map(|p| format!("https://127.0.0.1:{p}"))
            .collect();
        let mut registry = Vec::new();
        let mut admin = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let id = i as u64 + 1;
            let certs = issue(
                &format!("registry-{id}"),
                &format!("spiffe://{TD}/registry/{id}"),
            )?;
            let admin_port = free_port()?;
            let mut node = meshbridge_registry::Config::new(
                id,
                loopback(*port).to_string(),
                root.join(format!("registry-{id}-data")),
                IdentityFiles::in_dir(&certs),
            );
            node.admin_listen = loopback(admin_port).to_string();
            node.ca_dir = Some(root.join("ca"));
            node.leases.tick_interval_ms = 200;
            node.initial_members = (1..)
                .zip(&urls)
                .map(|(i, u): (u64, _)| (i.to_string(), u.clone()))
                .collect();
            let cfg = root.join(format!("registry-{id}.toml"));
            meshbridge_core::config::write(&cfg, &node)?;
            let p = Proc::spawn(
                &root,
                &format!("registry-{id}"),
                &["registry", "--config", path_str(&cfg)?],
            )?;
            registry.push((id, p));
            admin.push((
                format!("registry-{id}"),
                SocketAddr::from(([127, 0, 0, 1], admin_port)),
            ));
        }
        for (_, p) in &mut registry {
            p.wait_for("listening on", READY).await?;
        }

        let ctl_dir = issue("ctl", &format!("spiffe://{TD}/ctl/demo"))?;
        let identity = Identity::load(IdentityFiles::in_dir(&ctl_dir))?;
        let client = RegistryClient::connect(&urls, identity).await?;

        // Echo services: one in east, one on the VM.
        let east_echo_port = free_port()?;
        let vm_echo_port = free_port()?;
        let mut east_echo = Proc::spawn(
            &root,
            "echo-east",
            &[
                "echo",
                "--listen",
                &format!("127.0.0.1:{east_echo_port}"),
                "--name",
                "east",
            ],
        )?;
        east_echo.wait_for("listening on", READY).await?;
        let mut vm_echo = Proc::spawn(
            &root,
            "echo-vm",
            &[
                "echo",
                "--listen",
                &format!("127.0.0.1:{vm_echo_port}"),
                "--name",
                "vm",
            ],
        )?;
        vm_echo.wait_for("listening on", READY).await?;

        let mut others = vec![vm_echo];
        let west_dns = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        // The VM: a real agent that joins with a single-use token, exports its echo service
        // with a TCP health check, and keeps its own lease.
        let token = client
            .create_join_token("vm", "agent", Duration::from_secs(600))
            .await
            .context("minting the VM's join token")?;
        let agent_admin = free_port()?;
        let mut vm = AgentConfig::new("vm", TD, &urls, root.join("agent-vm-data"));
        vm.join_token = Some(token.token);
        vm.bundle = Some(root.join("ca").join("ca.pem"));
        vm.vip_range = vm_vips;
        vm.lease_ttl_ms = 3000;
        vm.admin_listen = Some(loopback(agent_admin).to_string());
        vm.locality = LocalityConfig {
            region: "onprem".into(),
            zone: "dc1".into(),
        };
        vm.tunnel.listen = loopback(free_port()?).to_string();
        vm.services = vec![ServiceConfig {
            namespace: "demo".into(),
            name: "echo".into(),
            address: Ipv4Addr::LOCALHOST.into(),
            ports: vec![PortSpec::tcp(SERVICE_PORT, vm_echo_port)],
            hostname: None,
            weight: None,
            check: Some(CheckSpec {
                probe: Probe::Tcp {
                    address: loopback(vm_echo_port),
                },
                interval_ms: 500,
                timeout_ms: 400,
                healthy_threshold: 1,
                unhealthy_threshold: 1,
            }),
        }];
        let agent_cfg = root.join("agent-vm.toml");
        meshbridge_core::config::write(&agent_cfg, &vm)?;
        let mut agent = Proc::spawn(
            &root,
            "agent-vm",
            &["agent", "--config", path_str(&agent_cfg)?],
        )?;
        agent.wait_for("listening on", READY).await?;
        others.push(agent);
        admin.push((
            "agent-vm".into(),
            SocketAddr::from(([127, 0, 0, 1], agent_admin)),
        ));
        // east and west share a region and the VM is on premises: from west, east ranks
        // first (same region), the VM second (another region) and takes over on failure.
        for (site, region, zone, echo_port_of_site, vip, dns) in [
            ("east", "us", "us-east-1a", Some(east_echo_port), None, None),
            (
                "west",
                "us",
                "us-west-1a",
                None,
                Some(west_vips),
                Some(west_dns),
            ),
        ] {
            let certs = issue(
                &format!("gateway-{site}"),
                &format!("spiffe://{TD}/site/{site}/gateway"),
            )?;
            let admin_port = free_port()?;
            let mut gw =
                meshbridge_gateway::Config::new(site, root.join(format!("gateway-{site}-data")));
            gw.admin_listen = Some(loopback(admin_port).to_string());
            gw.drain_deadline_ms = 2000;
            gw.tunnel.listen = loopback(free_port()?).to_string();
            gw.listeners.vip_range = vip;
            let mut file = GatewayFile::new(
                gw,
                IdentityFiles::in_dir(&certs),
                CatalogSource::registry(&urls),
            );
            file.register = Some(Registration {
                kind: SiteKind::Cluster,
                region: region.into(),
                zone: zone.into(),
                lease_ttl_ms: 3000,
                grace_ms: 60_000,
                ..Registration::default()
            });
            if let Some(port) = echo_port_of_site {
                file.exports = vec![ExportSpec::tcp(
                    "demo",
                    "echo",
                    (SERVICE_PORT, port),
                    &[Ipv4Addr::LOCALHOST.into()],
                )];
            }
            if let (Some(dns), Some(range)) = (dns, vip) {
                file.dns = Some(dns::Config {
                    listen: dns.to_string(),
                    site: site.into(),
                    vip_range: Some(range),
                    rate_limit: dns::RateLimit {
                        per_client_qps: 0,
                        ..dns::RateLimit::default()
                    },
                    ..dns::Config::default()
                });
            }
            let path = root.join(format!("gateway-{site}.toml"));
            meshbridge_core::config::write(&path, &file)?;
            let mut p = Proc::spawn(
                &root,
                &format!("gateway-{site}"),
                &["gateway", "--config", path_str(&path)?],
            )?;
            p.wait_for("listening on", READY).await?;
            others.push(p);
            admin.push((
                format!("gateway-{site}"),
                SocketAddr::from(([127, 0, 0, 1], admin_port)),
            ));
        }
        let mesh = Self {
            path: root,
            dir: Some(tmp),
            registry,
            urls,
            others,
            east_echo: Some(east_echo),
            west_dns,
            client,
            ctl_dir,
            admin,
            _vip_claim: vip_claim,
        };
        mesh.wait_until_west_sees_both().await?;
        Ok(mesh)
    }

    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// The echo service is exported by east and the VM, west's gateway has both exports in
    /// its own catalog replica, and west's DNS answers for it.
    async fn wait_until_west_sees_both(&self) -> Result<()> {
        let west_admin = self
            .admin
            .iter()
            .find(|(name, _)| name == "gateway-west")
            .map(|(_, a)| *a)
            .context("west's admin address")?;
        for _ in 0..150 {
            let exports = probe::http_get_json(west_admin, "/debug/catalog")
                .await
                .ok()
                .and_then(|c| c["exports"].as_array().cloned())
                .unwrap_or_default();
            let both = ["east", "vm"].iter().all(|site| {
                exports
                    .iter()
                    .any(|e| e["site"] == *site && e["service"]["name"] == "echo")
            });
            if both
                && probe::resolve_a(self.west_dns, "echo.demo.svc.clusterset.local")
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the echo service did not reach west's gateway within 15 s")
    }

    pub async fn resolve_from_west(&self, name: &str) -> Result<std::net::Ipv4Addr> {
        probe::resolve_a(self.west_dns, name).await
    }

    pub async fn request_from_west(&self, line: &str) -> Result<String> {
        let vip = self
            .resolve_from_west("echo.demo.svc.clusterset.local")
            .await?;
        probe::echo(SocketAddr::from((vip, SERVICE_PORT)), line).await
    }

    pub async fn stop_east_echo(&mut self) {
        if let Some(mut p) = self.east_echo.take() {
            p.kill9().await;
        }
    }

    /// SIGKILL the current leader; returns its node id.
    pub async fn kill_registry_leader(&mut self) -> Result<u64> {
        let leader = self.client.status().await?.leader_id.context("no leader")?;
        let (_, p) = self
            .registry
            .iter_mut()
            .find(|(id, _)| *id == leader)
            .context("leader process")?;
        p.kill9().await;
        Ok(leader)
    }

    pub async fn wait_new_leader(&self, killed: u64, within: Duration) -> Result<u64> {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            for (_, r) in self.client.status_of_each().await {
                if let Ok(s) = r
                    && let Some(l) = s.leader_id
                    && l != killed
                {
                    return Ok(l);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("no new leader within {within:?}")
    }

    pub fn try_next(&self) -> Vec<String> {
        let exe = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or("meshbridge".into());
        let ctl = format!(
            "{exe} ctl --registry {} --tls-dir {}",
            self.urls.join(","),
            self.ctl_dir.display()
        );
        let mut v = vec![
            format!("{ctl} status"),
            format!("{ctl} services"),
            format!("{ctl} service demo/echo"),
            format!(
                "dig @{} -p {} echo.demo.svc.clusterset.local",
                self.west_dns.ip(),
                self.west_dns.port()
            ),
            format!(
                "echo hi | nc -q1 $(dig +short @{} -p {} echo.demo.svc.clusterset.local) {SERVICE_PORT}",
                self.west_dns.ip(),
                self.west_dns.port()
            ),
        ];
        for (name, addr) in &self.admin {
            v.push(format!("curl http://{addr}/metrics   # {name}"));
        }
        v
    }

    pub async fn stop(mut self, keep: bool) {
        for p in self.others.iter_mut().chain(self.east_echo.iter_mut()) {
            p.terminate(Duration::from_secs(3)).await;
        }
        for (_, p) in &mut self.registry {
            p.terminate(Duration::from_secs(3)).await;
        }
        if keep && let Some(d) = self.dir.take() {
            let kept = d.keep();
            println!("kept {}", kept.display());
        }
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 path")
}
