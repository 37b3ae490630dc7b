//! `meshbridge agent` configuration: one TOML file, one serde struct, and a
//! [`RoleConfig::validate`] that names every bad field at once. Load it with
//! [`meshbridge_core::config::load`], which also rejects unknown fields.
//!
//! The agent's identity comes either from certificate files someone else manages (`tls`,
//! watched and reloaded), or from a one-time join: `join_token` (or `join_token_file`) and
//! `bundle` (the CA certificates that verify the registry). After the join the SVID lives
//! in `data_dir` and the agent renews it itself; the token is not needed again.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use meshbridge_core::client::endpoint_uri;
use meshbridge_core::config::{Problems, RoleConfig};
use meshbridge_core::id::validate_trust_domain_name;
use meshbridge_core::model::{Locality, SiteKind, SiteSpec, is_dns_label};
use meshbridge_core::tls::IdentityFiles;
use meshbridge_core::vip::VipRange;
use meshbridge_gateway::config::{FailoverConfig, ListenersConfig, PolicyConfig, TunnelConfig};
use serde::{Deserialize, Serialize};

use super::health::CheckSpec;
use crate::dns;
use crate::site::{EndpointSpec, ExportSpec, PortSpec};

/// The VM agent's configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// This host's site (a DNS label); the agent's SVID is `spiffe://<td>/site/<site>/agent`.
    pub site: String,
    pub trust_domain: String,
    #[serde(default)]
    pub locality: LocalityConfig,
    /// Registry node URLs (`https://host:port`); any node will do.
    pub registry: Vec<String>,
    /// The agent's state: its SVID after a join (`svid.pem`, `bundle.pem`) and the last
    /// catalog (`catalog.json`, served when the registry is unreachable at start).
    pub data_dir: PathBuf,
    /// Certificate files managed by someone else (SPIRE, cert-manager, `meshbridge pki`).
    #[serde(default)]
    pub tls: Option<IdentityFiles>,
    /// A single-use join token (`meshbridge ctl token create --site <site>`), used once when
    /// `data_dir` holds no SVID yet.
    #[serde(default)]
    pub join_token: Option<String>,
    /// The join token in a file instead (e.g. one that provisioning drops and deletes).
    #[serde(default)]
    pub join_token_file: Option<PathBuf>,
    /// CA certificates (PEM) that verify the registry when joining.
    #[serde(default)]
    pub bundle: Option<PathBuf>,
    /// The services on this host, exported while their health checks pass.
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    /// The local DNS stub (its `site` and `vip_range` are the agent's).
    #[serde(default)]
    pub dns: Option<dns::Config>,
    /// Loopback addresses for imported services: one per service, a listener per port.
    #[serde(default = "default_vip_range")]
    pub vip_range: VipRange,
    /// Inbound tunnels from peer gateways (the gateway's `[tunnel]` settings).
    #[serde(default)]
    pub tunnel: TunnelConfig,
    /// Where peers reach this host's tunnel (`host:port`); defaults to the tunnel listener,
    /// which must then not be a wildcard address.
    #[serde(default)]
    pub advertise: Vec<String>,
    /// Site lease; 0 takes the registry's defaults.
    #[serde(default)]
    pub lease_ttl_ms: u64,
    #[serde(default)]
    pub grace_ms: u64,
    /// For services that no catalog policy names.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Admin HTTP (`/healthz`, `/readyz`, `/metrics`, `/config_dump`, `/debug/*`).
    #[serde(default)]
    pub admin_listen: Option<String>,
    #[serde(default = "default_drain_ms")]
    pub drain_deadline_ms: u64,
}

/// Where this host is, for locality-aware failover (both may be left out).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LocalityConfig {
    pub region: String,
    pub zone: String,
}

/// A service on this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceConfig {
    pub namespace: String,
    pub name: String,
    /// Where the service listens on this host; tunnels from peers are delivered there.
    #[serde(default = "localhost")]
    pub address: IpAddr,
    pub ports: Vec<PortSpec>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub weight: Option<u32>,
    /// Without a check the endpoint is always ready.
    #[serde(default)]
    pub check: Option<CheckSpec>,
}

impl Config {
    /// The agent of `site` in `trust_domain`, following `registry`, every optional setting
    /// at its default (it then needs a join token, or TLS files, to start).
    pub fn new<S: Into<String>>(
        site: impl Into<String>,
        trust_domain: impl Into<String>,
        registry: impl IntoIterator<Item = S>,
        data_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            site: site.into(),
            trust_domain: trust_domain.into(),
            locality: LocalityConfig::default(),
            registry: registry.into_iter().map(Into::into).collect(),
            data_dir: data_dir.into(),
            tls: None,
            join_token: None,
            join_token_file: None,
            bundle: None,
            services: Vec::new(),
            dns: None,
            vip_range: default_vip_range(),
            tunnel: TunnelConfig::default(),
            advertise: Vec::new(),
            lease_ttl_ms: 0,
            grace_ms: 0,
            policy: PolicyConfig::default(),
            admin_listen: None,
            drain_deadline_ms: default_drain_ms(),
        }
    }
}

fn default_vip_range() -> VipRange {
    VipRange::new(Ipv4Addr::new(127, 240, 0, 0), 16).unwrap_or_else(|_| unreachable!())
}

fn localhost() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

fn default_drain_ms() -> u64 {
    10_000
}

impl ServiceConfig {
    /// The export this service makes (with its one endpoint).
    pub fn export_spec(&self) -> ExportSpec {
        ExportSpec {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            headless: false,
            ports: self.ports.clone(),
            endpoints: vec![EndpointSpec {
                address: self.address,
                hostname: self.hostname.clone(),
                weight: self.weight,
                identity: None,
            }],
        }
    }
}

impl Config {
    /// The SVID files in `data_dir` after a join: key and chain in one file, written
    /// atomically (so they can never disagree), and the registry's trust bundle.
    pub fn joined_files(&self) -> IdentityFiles {
        let svid = self.data_dir.join("svid.pem");
        IdentityFiles {
            cert: svid.clone(),
            key: svid,
            bundle: self.data_dir.join("bundle.pem"),
            federated: Vec::new(),
        }
    }

    /// The embedded gateway's configuration.
    pub fn gateway(&self) -> meshbridge_gateway::Config {
        meshbridge_gateway::Config {
            site: self.site.clone(),
            data_dir: self.data_dir.clone(),
            // The DNS stub's zone, and Istio's `cluster.local` as every gateway accepts.
            zones: {
                let mut zones = vec![
                    self.dns
                        .as_ref()
                        .map_or_else(|| dns::DEFAULT_ZONE.to_string(), |d| d.zone.clone()),
                ];
                if !zones.iter().any(|z| z == "cluster.local") {
                    zones.push("cluster.local".into());
                }
                zones
            },
            admin_listen: self.admin_listen.clone(),
            drain_deadline_ms: self.drain_deadline_ms,
            tunnel: self.tunnel.clone(),
            listeners: ListenersConfig {
                vip_range: Some(self.vip_range),
                ..ListenersConfig::default()
            },
            policy: self.policy.clone(),
            failover: FailoverConfig::default(),
            xds: None,
        }
    }

    /// The DNS stub's configuration, seen from this site with this host's VIPs.
    pub fn dns(&self) -> Option<dns::Config> {
        self.dns.clone().map(|mut d| {
            d.site = self.site.clone();
            d.vip_range = Some(self.vip_range);
            d
        })
    }

    /// The site's registration; `tunnel` is the bound tunnel address.
    pub fn site_spec(&self, tunnel: SocketAddr) -> SiteSpec {
        SiteSpec {
            name: self.site.clone(),
            kind: SiteKind::Vm,
            locality: Locality {
                region: self.locality.region.clone(),
                zone: self.locality.zone.clone(),
            },
            gateways: if self.advertise.is_empty() {
                vec![tunnel.to_string()]
            } else {
                self.advertise.clone()
            },
            lease_ttl_ms: self.lease_ttl_ms,
            grace_ms: self.grace_ms,
            instance: String::new(),
        }
    }

    fn validate_identity(&self, p: &mut Problems) {
        let token = self.join_token.is_some() || self.join_token_file.is_some();
        if self.tls.is_some() && token {
            p.push("tls", "set tls (certificate files) or join_token, not both");
        }
        if self.join_token.is_some() && self.join_token_file.is_some() {
            p.push(
                "join_token_file",
                "set join_token or join_token_file, not both",
            );
        }
        if token && self.bundle.is_none() {
            p.push("bundle", "needed with a join token, to verify the registry");
        }
        if let Some(t) = &self.join_token {
            match meshbridge_core::join::peek(t) {
                Err(e) => p.push("join_token", e.to_string()),
                Ok(c) => {
                    p.check(
                        c.site == self.site,
                        "join_token",
                        format!("grants site {:?}, this agent is {:?}", c.site, self.site),
                    );
                    p.check(
                        c.trust_domain == self.trust_domain,
                        "join_token",
                        format!(
                            "is for trust domain {:?}, not {:?}",
                            c.trust_domain, self.trust_domain
                        ),
                    );
                    p.check(
                        c.role == "agent",
                        "join_token",
                        format!("grants role {:?}; an agent needs an agent token", c.role),
                    );
                }
            }
        }
    }
}

impl RoleConfig for Config {
    fn validate(&self, p: &mut Problems) {
        p.check(
            is_dns_label(&self.site),
            "site",
            format!("{:?} is not a DNS label (a-z 0-9 -)", self.site),
        );
        if let Err(e) = validate_trust_domain_name(&self.trust_domain) {
            p.push("trust_domain", e);
        }
        p.check(!self.registry.is_empty(), "registry", "at least one URL");
        for (i, url) in self.registry.iter().enumerate() {
            if let Err(e) = endpoint_uri(url) {
                p.push(format!("registry[{i}]"), e.reason);
            }
        }
        p.check(
            !self.data_dir.as_os_str().is_empty(),
            "data_dir",
            "must not be empty",
        );
        self.validate_identity(p);
        let mut keys = std::collections::BTreeSet::new();
        for (i, s) in self.services.iter().enumerate() {
            let field = format!("services[{i}]");
            s.export_spec().validate(&field, p);
            if let Some(check) = &s.check {
                check.validate(&format!("{field}.check"), p);
            }
            if !keys.insert((&s.namespace, &s.name)) {
                p.push(field, format!("{}/{} is listed twice", s.namespace, s.name));
            }
        }
        if let Some(d) = &self.dns {
            p.check(
                d.site.is_empty() || d.site == self.site,
                "dns.site",
                "leave it out: the DNS stub answers as this agent's site",
            );
            let mut inner = Problems::default();
            // The agent fills these in; validate what the stub will run with.
            self.dns().unwrap_or_else(|| d.clone()).validate(&mut inner);
            p.nest("dns", inner);
        }
        // The embedded gateway's own checks; its field names are this file's.
        let mut inner = Problems::default();
        self.gateway().validate(&mut inner);
        for pr in inner
            .0
            .into_iter()
            .filter(|pr| pr.field != "site" && pr.field != "data_dir")
        {
            p.0.push(pr);
        }
        for (i, a) in self.advertise.iter().enumerate() {
            let ok = a
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            p.check(
                ok,
                format!("advertise[{i}]"),
                format!("{a:?} is not host:port"),
            );
        }
        if self.advertise.is_empty()
            && let Ok(addr) = self.tunnel.listen.parse::<SocketAddr>()
        {
            p.check(
                !addr.ip().is_unspecified(),
                "advertise",
                format!(
                    "needed when tunnel.listen is the wildcard {addr}: where do peers reach this host?"
                ),
            );
        }
    }
}
