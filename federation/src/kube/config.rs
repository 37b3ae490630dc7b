//! `meshbridge kube` configuration: one TOML file, every bad field named at once.

use std::path::PathBuf;

use meshbridge_core::client::endpoint_uri;
use meshbridge_core::config::{Problems, RoleConfig};
use meshbridge_core::id::validate_trust_domain_name;
use meshbridge_core::model::is_dns_label;
use meshbridge_core::tls::IdentityFiles;
use meshbridge_core::vip::PortRange;
use serde::{Deserialize, Serialize};

/// The Kubernetes adapter's configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This cluster's site (a DNS label). The adapter's SVID is
    /// `spiffe://<td>/site/<site>/adapter` (any id under the site will do).
    pub site: String,
    pub trust_domain: String,
    /// Registry node URLs (`https://host:port`); any node will do.
    pub registry: Vec<String>,
    /// The adapter's certificate files (a Secret mounted by the chart, or cert-manager's).
    pub tls: IdentityFiles,
    /// A kubeconfig file; without it, `KUBECONFIG`, `~/.kube/config`, then the in-cluster
    /// service account are tried, in that order.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// Namespaces to export from and import into; empty: all.
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub import: ImportConfig,
    #[serde(default)]
    pub leader_election: LeaderElectionConfig,
    /// Changes are gathered for this long before one write (like Istio's 100 ms push
    /// debounce).
    #[serde(default = "default_debounce_ms")]
    pub debounce_ms: u64,
    /// Admin HTTP (`/healthz`, `/readyz`, `/metrics`, `/debug/kube`).
    #[serde(default)]
    pub admin_listen: Option<String>,
}

/// How imported services reach this cluster's gateways.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImportConfig {
    /// Write ServiceImports and derived Services for services other sites export.
    pub enabled: bool,
    /// The gateways' Service (`namespace/name`): the ready addresses of its EndpointSlices
    /// become the endpoints of every imported service.
    pub gateway_service: String,
    /// The gateways' `listeners.import_ports.ports`: the port each imported (service, port)
    /// is reached at on a gateway.
    pub ports: PortRange,
}

impl Default for ImportConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            gateway_service: "meshbridge/meshbridge-gateway".into(),
            ports: PortRange {
                first: 20_000,
                last: 29_999,
            },
        }
    }
}

impl ImportConfig {
    /// (namespace, name) of the gateway Service.
    pub fn gateway_service_key(&self) -> Option<(String, String)> {
        let (ns, name) = self.gateway_service.split_once('/')?;
        (is_dns_label(ns) && is_dns_label(name)).then(|| (ns.to_string(), name.to_string()))
    }
}

/// A `coordination.k8s.io/v1` Lease decides which replica writes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaderElectionConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's name in the Lease; default: `$POD_NAME`, else the host name and pid.
    pub identity: Option<String>,
    /// A standby takes over this long after the leader's last renewal.
    pub lease_duration_ms: u64,
    /// A leader that could not renew for this long stops writing (less than the lease
    /// duration, so it has stopped before anyone can take over).
    pub renew_deadline_ms: u64,
    /// How often the leader renews and a standby looks.
    pub retry_period_ms: u64,
}

impl Default for LeaderElectionConfig {
    fn default() -> Self {
        Self {
            namespace: "meshbridge".into(),
            name: "meshbridge-kube-adapter".into(),
            identity: None,
            lease_duration_ms: 15_000,
            renew_deadline_ms: 10_000,
            retry_period_ms: 2_000,
        }
    }
}

fn default_debounce_ms() -> u64 {
    100
}

impl Config {
    /// The adapter of `site` in `trust_domain`, following `registry`, every optional
    /// setting at its default.
    pub fn new<S: Into<String>>(
        site: impl Into<String>,
        trust_domain: impl Into<String>,
        registry: impl IntoIterator<Item = S>,
        tls: IdentityFiles,
    ) -> Self {
        Self {
            site: site.into(),
            trust_domain: trust_domain.into(),
            registry: registry.into_iter().map(Into::into).collect(),
            tls,
            kubeconfig: None,
            namespaces: Vec::new(),
            import: ImportConfig::default(),
            leader_election: LeaderElectionConfig::default(),
            debounce_ms: default_debounce_ms(),
            admin_listen: None,
        }
    }

    /// This replica's identity in the Lease.
    pub fn holder_identity(&self) -> String {
        if let Some(id) = &self.leader_election.identity {
            return id.clone();
        }
        if let Ok(pod) = std::env::var("POD_NAME")
            && !pod.is_empty()
        {
            return pod;
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "adapter".into());
        format!("{host}-{}", std::process::id())
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
        for (i, ns) in self.namespaces.iter().enumerate() {
            p.check(
                is_dns_label(ns),
                format!("namespaces[{i}]"),
                format!("{ns:?} is not a namespace name"),
            );
        }
        if self.import.enabled {
            p.check(
                self.import.gateway_service_key().is_some(),
                "import.gateway_service",
                format!(
                    "{:?} is not namespace/name (DNS labels)",
                    self.import.gateway_service
                ),
            );
        }
        let le = &self.leader_election;
        p.check(
            is_dns_label(&le.namespace),
            "leader_election.namespace",
            format!("{:?} is not a namespace name", le.namespace),
        );
        p.check(
            !le.name.is_empty() && le.name.len() <= 253,
            "leader_election.name",
            "must be a Lease name",
        );
        p.check(
            le.retry_period_ms > 0 && le.retry_period_ms < le.renew_deadline_ms,
            "leader_election.retry_period_ms",
            "must be more than 0 and less than renew_deadline_ms",
        );
        p.check(
            le.renew_deadline_ms < le.lease_duration_ms,
            "leader_election.renew_deadline_ms",
            "must be less than lease_duration_ms (a leader must stop before it can be replaced)",
        );
        p.check(
            le.lease_duration_ms >= 1_000 && le.lease_duration_ms.is_multiple_of(1_000),
            "leader_election.lease_duration_ms",
            "whole seconds, at least 1000 (a Lease counts in seconds)",
        );
        p.check(self.debounce_ms <= 10_000, "debounce_ms", "at most 10000");
        if let Some(a) = &self.admin_listen {
            p.socket_addr("admin_listen", a);
        }
    }
}
