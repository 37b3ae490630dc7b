//! The configuration files of `meshbridge gateway` and `meshbridge dns` (the other roles'
//! files are their crates' `Config`s). They live here rather than in the binary so that the
//! demo and the tests build them as typed values and render them with
//! [`meshbridge_core::config::render`], instead of formatting TOML by hand.

use std::path::PathBuf;

use meshbridge_core::config::{Problems, RoleConfig};
use meshbridge_core::tls::IdentityFiles;
use serde::{Deserialize, Serialize};

use crate::dns;
use crate::site::{ExportSpec, Registration};
use crate::source::CatalogSource;

/// `meshbridge gateway --config FILE`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GatewayFile {
    pub gateway: meshbridge_gateway::Config,
    pub tls: IdentityFiles,
    pub source: CatalogSource,
    /// Register this site and keep its lease (needs a registry source).
    #[serde(default)]
    pub register: Option<Registration>,
    /// Services of this site to export (sites without a Kubernetes adapter).
    #[serde(default)]
    pub exports: Vec<ExportSpec>,
    /// An embedded federated DNS server (its `site` defaults to the gateway's).
    #[serde(default)]
    pub dns: Option<dns::Config>,
    /// Threads that run the gateway. 1 (the default, as linkerd2-proxy's) runs everything
    /// on one thread: no hand-offs between threads on a request's path, the lowest latency
    /// and CPU per request. More spread a busy gateway over cores; 0 = one per CPU.
    #[serde(default = "default_gateway_workers")]
    pub workers: usize,
}

fn default_gateway_workers() -> usize {
    1
}

impl GatewayFile {
    /// A gateway following `source`, with no registration, exports or DNS, on one thread.
    pub fn new(
        gateway: meshbridge_gateway::Config,
        tls: IdentityFiles,
        source: CatalogSource,
    ) -> Self {
        Self {
            gateway,
            tls,
            source,
            register: None,
            exports: Vec::new(),
            dns: None,
            workers: default_gateway_workers(),
        }
    }

    /// The embedded DNS server's settings, its `site` defaulting to the gateway's.
    pub fn dns_config(&self) -> Option<dns::Config> {
        let mut d = self.dns.clone()?;
        if d.site.is_empty() {
            d.site.clone_from(&self.gateway.site);
        }
        Some(d)
    }
}

impl RoleConfig for GatewayFile {
    fn validate(&self, p: &mut Problems) {
        let mut inner = Problems::default();
        self.gateway.validate(&mut inner);
        p.nest("gateway", inner);
        self.source.validate("source", p);
        if self.register.is_some() && self.source.registry.is_empty() {
            p.push("register", "needs source.registry");
        }
        if !self.exports.is_empty() && self.register.is_none() {
            p.push(
                "exports",
                "exports need [register] (the site must hold a lease)",
            );
        }
        for (i, e) in self.exports.iter().enumerate() {
            e.validate(&format!("exports[{i}]"), p);
        }
        meshbridge_core::runtime::check_workers(p, "workers", self.workers);
        if let Some(d) = self.dns_config() {
            let mut inner = Problems::default();
            d.validate(&mut inner);
            p.nest("dns", inner);
        }
    }
}

/// `meshbridge dns --config FILE`: the federated DNS server on its own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DnsFile {
    pub dns: dns::Config,
    pub source: CatalogSource,
    /// This server's SVID, to follow the registry (not needed with a catalog file).
    #[serde(default)]
    pub tls: Option<IdentityFiles>,
    /// `/healthz`, `/readyz`, `/metrics`, `/config_dump`.
    #[serde(default)]
    pub admin_listen: Option<String>,
    /// Where the catalog in use is kept (`catalog.json`), so that a restart while the
    /// registry is unreachable answers as before instead of NXDOMAIN (static stability).
    /// Without it, a restarted server has nothing to answer until the registry does.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
}

impl DnsFile {
    /// A server following `source`, without TLS files, admin listener or data directory.
    pub fn new(dns: dns::Config, source: CatalogSource) -> Self {
        Self {
            dns,
            source,
            tls: None,
            admin_listen: None,
            data_dir: None,
        }
    }
}

impl RoleConfig for DnsFile {
    fn validate(&self, p: &mut Problems) {
        let mut inner = Problems::default();
        self.dns.validate(&mut inner);
        p.nest("dns", inner);
        self.source.validate("source", p);
        if !self.source.registry.is_empty() && self.tls.is_none() {
            p.push("tls", "needed to follow a registry");
        }
        if let Some(a) = &self.admin_listen {
            p.socket_addr("admin_listen", a);
        }
    }
}

#[cfg(test)]
mod tests {
    use meshbridge_core::config::parse_with_env;

    use super::GatewayFile as File;

    /// The chart passes a Node's topology labels as `MESHBRIDGE_REGISTER__REGION`/`__ZONE`;
    /// a label that reads as a number (zone `1`) is still the site's zone.
    #[test]
    fn register_region_and_zone_come_from_the_environment_numbers_included_and_dns_site_defaults() {
        let text = "[gateway]\nsite = \"east\"\ndata_dir = \"/d\"\n\
                    [tls]\ncert = \"c\"\nkey = \"k\"\nbundle = \"b\"\n\
                    [source]\nregistry = [\"https://127.0.0.1:7443\"]\n\
                    [register]\nregion = \"r-file\"\n";
        let vars = |region: &str, zone: &str| {
            vec![
                (
                    "MESHBRIDGE_REGISTER__REGION".to_string(),
                    region.to_string(),
                ),
                ("MESHBRIDGE_REGISTER__ZONE".to_string(), zone.to_string()),
            ]
        };
        for (region, zone) in [("eu-west", "eu-west-1b"), ("7", "1"), ("", "")] {
            let cfg: File = parse_with_env("gw.toml", text, &vars(region, zone))
                .unwrap_or_else(|e| panic!("{region}/{zone}: {e}"));
            let reg = cfg.register.unwrap_or_else(|| panic!("no [register]"));
            assert_eq!((reg.region.as_str(), reg.zone.as_str()), (region, zone));
        }
        // An embedded [dns] answers as the gateway's site unless told otherwise.
        let with_dns = format!("{text}[dns]\nlisten = \"127.0.0.1:0\"\n");
        let cfg: File = parse_with_env("gw.toml", &with_dns, &[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.dns_config().map(|d| d.site), Some("east".to_string()));
        let err = parse_with_env::<File>("gw.toml", text, &vars("eu", "[1]"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("register.zone"), "{err}");
    }
}

/// The demo and the tests write these files from typed values: what
/// [`meshbridge_core::config::render`] writes must read back as the same value, for every
/// section and every kind of field (maps, lists of tables, inline enums, flattened probes).
#[cfg(test)]
mod render_tests {
    use std::collections::BTreeMap;

    use meshbridge_core::config::{RoleConfig, parse_with_env, render};
    use meshbridge_core::tls::IdentityFiles;
    use meshbridge_gateway::config::{FixedListener, ImportPorts, TransportKind, XdsConfig};

    use super::{DnsFile, GatewayFile};
    use crate::agent::config::{Config as AgentConfig, LocalityConfig, ServiceConfig};
    use crate::agent::health::{CheckSpec, Probe};
    use crate::dns;
    use crate::kube::config::Config as KubeConfig;
    use crate::site::{EndpointSpec, ExportSpec, PortSpec, Registration};
    use crate::source::CatalogSource;

    fn tls() -> IdentityFiles {
        IdentityFiles::in_dir(std::path::Path::new("/etc/meshbridge/tls"))
    }

    fn read_back<T: RoleConfig + std::fmt::Debug + PartialEq>(cfg: &T) {
        let text = render(cfg).unwrap_or_else(|e| panic!("render: {e}"));
        let back: T = parse_with_env("rendered.toml", &text, &[])
            .unwrap_or_else(|e| panic!("{e}\n--- rendered ---\n{text}"));
        assert_eq!(&back, cfg, "--- rendered ---\n{text}");
    }

    fn dns_config() -> dns::Config {
        dns::Config {
            vip_range: "127.244.0.0/16".parse().ok(),
            upstream: Some("127.0.0.53:53".into()),
            ttl_secs: 30,
            ..dns::Config::for_test("east")
        }
    }

    fn port(name: &str, port: u16, target: Option<u16>) -> PortSpec {
        PortSpec {
            name: name.into(),
            port,
            protocol: Default::default(),
            target_port: target,
        }
    }

    #[test]
    fn a_gateway_file_with_every_section_reads_back_as_written() {
        let mut gw = meshbridge_gateway::Config::new("east", "/var/lib/meshbridge");
        gw.admin_listen = Some("127.0.0.1:9901".into());
        gw.zones = vec!["clusterset.local".into()];
        gw.tunnel.listen = "127.0.0.1:0".into();
        gw.tunnel.peer_transport = BTreeMap::from([("west".into(), TransportKind::Tcp)]);
        gw.listeners.import_ports = Some(ImportPorts {
            address: "127.0.0.1".parse().unwrap_or_else(|_| unreachable!()),
            ports: "20000-20099".parse().unwrap_or_else(|e| panic!("{e}")),
        });
        gw.listeners.fixed = vec![FixedListener {
            listen: "127.0.0.1:8080".into(),
            service: "shop/front".into(),
            port: 80,
        }];
        gw.xds = Some(XdsConfig {
            plaintext: true,
            listener_address: "127.0.0.1".parse().ok(),
            ..XdsConfig::default()
        });
        let mut gw_tls = tls();
        gw_tls.federated = vec![meshbridge_core::tls::BundleSource {
            path: "/etc/meshbridge/partner.pem".into(),
            trust_domain: Some("partner.example".into()),
        }];
        let mut file = GatewayFile::new(
            gw,
            gw_tls,
            CatalogSource::registry(["https://127.0.0.1:7443"]),
        );
        file.register = Some(Registration {
            region: "us-east".into(),
            zone: "1".into(),
            lease_ttl_ms: 3_000,
            instance: Some("gw-0".into()),
            ..Registration::default()
        });
        file.exports = vec![ExportSpec {
            namespace: "shop".into(),
            name: "front".into(),
            headless: false,
            ports: vec![port("http", 80, Some(8080))],
            endpoints: vec![EndpointSpec {
                address: "127.0.0.1".parse().unwrap_or_else(|_| unreachable!()),
                hostname: Some("front-0".into()),
                weight: Some(3),
                identity: None,
            }],
        }];
        file.dns = Some(dns_config());
        file.workers = 2;
        read_back(&file);
        // A catalog file instead of a registry (and nothing optional).
        read_back(&GatewayFile::new(
            meshbridge_gateway::Config::new("west", "/d"),
            tls(),
            CatalogSource::file("/etc/meshbridge/catalog.json"),
        ));
    }

    #[test]
    fn a_dns_file_reads_back_as_written() {
        let mut file = DnsFile::new(
            dns_config(),
            CatalogSource::registry(["https://127.0.0.1:7443"]),
        );
        file.tls = Some(tls());
        file.admin_listen = Some("127.0.0.1:9903".into());
        file.data_dir = Some("/var/lib/meshbridge-dns".into());
        read_back(&file);
    }

    #[test]
    fn an_agent_config_with_services_and_checks_reads_back_as_written() {
        let mut cfg = AgentConfig::new(
            "vm-1",
            "example.org",
            ["https://127.0.0.1:7443"],
            "/var/lib/mb",
        );
        cfg.join_token_file = Some("/run/meshbridge/join-token".into());
        cfg.bundle = Some("/etc/meshbridge/ca.pem".into());
        cfg.locality = LocalityConfig {
            region: "us-east".into(),
            zone: "us-east-1b".into(),
        };
        cfg.tunnel.listen = "127.0.0.1:0".into();
        cfg.dns = Some(dns::Config {
            site: String::new(),
            ..dns::Config::for_test("")
        });
        cfg.lease_ttl_ms = 3_000;
        let check = |probe| CheckSpec {
            probe,
            interval_ms: 200,
            timeout_ms: 150,
            healthy_threshold: 1,
            unhealthy_threshold: 2,
        };
        let loopback = "127.0.0.1:8081".parse().unwrap_or_else(|_| unreachable!());
        cfg.services = vec![
            ServiceConfig {
                namespace: "shop".into(),
                name: "legacy".into(),
                address: "127.0.0.1".parse().unwrap_or_else(|_| unreachable!()),
                ports: vec![port("tcp", 8080, None)],
                hostname: None,
                weight: Some(2),
                check: Some(check(Probe::Http {
                    address: loopback,
                    path: "/healthz".into(),
                    expect_status: 204,
                })),
            },
            ServiceConfig {
                namespace: "shop".into(),
                name: "batch".into(),
                address: "127.0.0.1".parse().unwrap_or_else(|_| unreachable!()),
                ports: vec![port("tcp", 9090, None)],
                hostname: Some("vm-1".into()),
                weight: None,
                check: Some(check(Probe::Command {
                    argv: vec!["true".into()],
                })),
            },
        ];
        read_back(&cfg);
    }

    #[test]
    fn a_kube_adapter_config_reads_back_as_written() {
        let mut cfg = KubeConfig::new("east", "example.org", ["https://127.0.0.1:7443"], tls());
        cfg.kubeconfig = Some("/etc/kube/config".into());
        cfg.namespaces = vec!["shop".into()];
        cfg.import.ports = "21000-21999".parse().unwrap_or_else(|e| panic!("{e}"));
        cfg.leader_election.identity = Some("pod-0".into());
        cfg.admin_listen = Some("127.0.0.1:9904".into());
        read_back(&cfg);
    }

    /// `new` is what a file with only the required fields means: the constructors and
    /// serde's defaults agree.
    #[test]
    fn new_is_what_a_file_with_only_the_required_fields_means() {
        let tls_toml =
            "[tls]\ncert = \"/t/cert.pem\"\nkey = \"/t/key.pem\"\nbundle = \"/t/bundle.pem\"\n";
        let files = IdentityFiles::in_dir("/t");
        let gw: GatewayFile = parse_with_env(
            "gw.toml",
            &format!("[gateway]\nsite = \"east\"\ndata_dir = \"/d\"\n{tls_toml}[source]\ncatalog_file = \"/c.json\"\n"),
            &[],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let want = GatewayFile::new(
            meshbridge_gateway::Config::new("east", "/d"),
            files.clone(),
            CatalogSource::file("/c.json"),
        );
        assert_eq!(gw, want);
        let dns: DnsFile = parse_with_env(
            "dns.toml",
            "[dns]\nsite = \"east\"\n[source]\ncatalog_file = \"/c.json\"\n",
            &[],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let want = dns::Config {
            site: "east".into(),
            ..dns::Config::default()
        };
        assert_eq!(dns, DnsFile::new(want, CatalogSource::file("/c.json")));
        let agent: AgentConfig = parse_with_env(
            "agent.toml",
            &format!(
                "site = \"vm\"\ntrust_domain = \"td\"\nregistry = [\"https://127.0.0.1:1\"]\n\
                 data_dir = \"/d\"\nadvertise = [\"vm.example:15008\"]\n{tls_toml}"
            ),
            &[],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut want = AgentConfig::new("vm", "td", ["https://127.0.0.1:1"], "/d");
        want.advertise = vec!["vm.example:15008".into()];
        want.tls = Some(files.clone());
        assert_eq!(agent, want);
        let kube: KubeConfig = parse_with_env(
            "kube.toml",
            &format!("site = \"east\"\ntrust_domain = \"td\"\nregistry = [\"https://127.0.0.1:1\"]\n{tls_toml}"),
            &[],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            kube,
            KubeConfig::new("east", "td", ["https://127.0.0.1:1"], files)
        );
    }

    /// `meshbridge dns` names a bad field of its `[dns]` section with the section, as the
    /// gateway's embedded `[dns]` does.
    #[test]
    fn a_dns_file_names_bad_fields_with_their_section() {
        let err = parse_with_env::<DnsFile>(
            "dns.toml",
            "[dns]\nsite = \"Not_A_Label\"\nlisten = \"nowhere\"\n[source]\ncatalog_file = \"/c.json\"\n",
            &[],
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("dns.site"), "{err}");
        assert!(err.contains("dns.listen"), "{err}");
    }
}
