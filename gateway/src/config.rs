//! The gateway's configuration: one serde struct, every problem reported at once. Unknown
//! fields are rejected by [`meshbridge_core::config::load`], which collects them with the
//! other problems (a serde `deny_unknown_fields` would stop at the first).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use meshbridge_core::config::{Problems, RoleConfig};
use meshbridge_core::tls::{AllowList, AllowRule, Identity};
use meshbridge_core::vip::VipRange;
use serde::{Deserialize, Serialize};

/// Which transport carries tunnels to a peer gateway.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportKind {
    /// QUIC (ALPN `meshbridge/1`).
    Quic,
    /// HTTP/2 CONNECT over TLS 1.3 over TCP, for networks that drop UDP.
    Tcp,
    /// QUIC, falling back to TCP for a while when the QUIC handshake gets no answer.
    #[default]
    Auto,
}

/// What happens to a stream for a service that no policy names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DefaultAction {
    #[default]
    Allow,
    Deny,
}

/// `meshbridge gateway` configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// This gateway's site (as registered in the catalog).
    pub site: String,
    /// Where the last catalog is persisted (`catalog.json`), for restarts without a registry.
    pub data_dir: PathBuf,
    /// DNS zones of service names in SNI and CONNECT targets: `<svc>.<ns>.svc.<zone>` in any
    /// of them names the federated service. Default: `clusterset.local` (the MCS zone) and
    /// `cluster.local` (what Istio sidecars put in SNI, `outbound_.<port>_._.<svc>.<ns>.svc.
    /// cluster.local`). `zone = "…"` (one zone) is read as a list of one.
    #[serde(
        default = "default_zones",
        alias = "zone",
        deserialize_with = "one_or_more"
    )]
    pub zones: Vec<String>,
    /// Admin HTTP (`/healthz`, `/readyz`, `/metrics`, `/config_dump`, `/debug/*`); off when unset.
    #[serde(default)]
    pub admin_listen: Option<String>,
    /// How long a drain waits for streams in flight before closing them.
    #[serde(default = "default_drain_ms")]
    pub drain_deadline_ms: u64,
    #[serde(default)]
    pub tunnel: TunnelConfig,
    #[serde(default)]
    pub listeners: ListenersConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub failover: FailoverConfig,
    /// An xDS server (ADS, xDS v3) for this site's Envoys and proxyless gRPC clients; off
    /// when unset.
    #[serde(default)]
    pub xds: Option<XdsConfig>,
}

/// The xDS server: clusters and endpoints of every federated service, from this gateway's
/// catalog in use (so it keeps serving while the registry is unreachable).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct XdsConfig {
    /// Where xDS clients connect (gRPC).
    pub listen: String,
    /// Plain HTTP/2 instead of mutual TLS; only allowed on a loopback `listen` address.
    pub plaintext: bool,
    /// SPIFFE ids accepted as xDS clients over mutual TLS (same forms as
    /// `tunnel.peers_allowed`); empty: any id of this gateway's trust domain.
    pub clients_allowed: Vec<String>,
    /// When set, a listener per federated service port is served too (LDS), bound by Envoy
    /// at this address and the service's port, proxying TCP to the service's cluster.
    pub listener_address: Option<std::net::IpAddr>,
}

impl Default for XdsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:15010".into(),
            plaintext: false,
            clients_allowed: Vec::new(),
            listener_address: None,
        }
    }
}

impl XdsConfig {
    /// Who may connect as an xDS client over mutual TLS.
    pub fn allow_list(&self, identity: &Identity) -> AllowList {
        if self.clients_allowed.is_empty() {
            return AllowList(vec![AllowRule::TrustDomain(
                identity.id().trust_domain().to_string(),
            )]);
        }
        AllowList::parse(&self.clients_allowed).unwrap_or_default()
    }

    fn validate(&self, p: &mut Problems) {
        p.socket_addr("xds.listen", &self.listen);
        if self.plaintext
            && let Ok(addr) = self.listen.parse::<SocketAddr>()
        {
            p.check(
                addr.ip().is_loopback(),
                "xds.plaintext",
                format!(
                    "plaintext xDS is only allowed on a loopback address, not {}",
                    addr.ip()
                ),
            );
        }
        if let Err(e) = AllowList::parse(&self.clients_allowed) {
            p.push("xds.clients_allowed", e.to_string());
        }
    }
}

/// The tunnel between gateways.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TunnelConfig {
    /// Where peers reach this gateway: QUIC on UDP and the TCP fallback on TCP, same port.
    pub listen: String,
    /// Transport used towards peers unless `peer_transport` names the peer's site.
    pub transport: TransportKind,
    pub peer_transport: BTreeMap<String, TransportKind>,
    /// Peer SPIFFE ids accepted, in either direction (`*`, `spiffe://td`, a prefix ending in
    /// `/` or `*`, or an exact id); `*` and `spiffe://td` only cover site identities
    /// (`/site/<site>/...`: gateways, agents). Trust bundles decide which domains are trusted.
    pub peers_allowed: Vec<String>,
    pub keepalive_ms: u64,
    /// A link silent for this long is dead: the bound on detecting a lost peer site.
    pub idle_timeout_ms: u64,
    pub handshake_timeout_ms: u64,
    /// Receiving side: the whole preamble must arrive within this time.
    pub preamble_timeout_ms: u64,
    /// Sending side: the peer's reply must arrive within this time.
    pub reply_timeout_ms: u64,
    /// Receiving side: TCP connect to a local endpoint.
    pub connect_timeout_ms: u64,
    /// UDP socket send and receive buffers (the kernel may cap them: `net.core.rmem_max`).
    pub socket_buffer_bytes: usize,
    /// QUIC flow-control windows.
    pub stream_window_bytes: u64,
    pub connection_window_bytes: u64,
    /// First QUIC packet size; must not exceed the real path MTU.
    pub initial_mtu: u16,
    /// Upper bound for path MTU discovery (and this endpoint's max UDP payload). Raise it
    /// where the path carries more (loopback, jumbo frames).
    pub max_mtu: u16,
    /// Concurrent streams (proxied connections) one peer may have open towards this
    /// gateway on one link. Past it, the peer's new connections wait up to
    /// `reply_timeout_ms` for a stream, then go to another gateway. QUIC reserves about
    /// 32 bytes per allowed stream on every accepted link up front (16,384: 0.5 MiB).
    pub max_streams_per_link: u32,
    /// Links (QUIC connections or TCP fallback connections) one peer identity may have open
    /// to this gateway at once; more are closed after the handshake.
    pub max_links_per_peer: usize,
    /// Streams from all peers this gateway serves at once (each may hold a local
    /// connection); past it a new stream is answered "draining" and its sender tries
    /// another gateway of the site.
    pub max_inbound_streams: usize,
    /// A proxied connection through the tunnel with no byte either way for this long is
    /// closed (both sides), so forgotten connections do not hold streams forever.
    pub stream_idle_timeout_ms: u64,
}

/// Listeners for local clients.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ListenersConfig {
    /// Local client connections open at once, over all listeners; more wait in the backlog.
    pub max_connections: usize,
    /// Service listeners: one VIP per imported service from this range, one listener per port.
    pub vip_range: Option<VipRange>,
    /// Kubernetes sites: one address, a port per imported (service, port) from a range; the
    /// kube adapter points imported EndpointSlices at these ports (its `import.ports` must
    /// be the same range).
    pub import_ports: Option<ImportPorts>,
    /// SNI passthrough listener (like Istio's 15443).
    pub sni: Option<String>,
    /// HTTP CONNECT listener.
    pub connect: Option<String>,
    /// Service listeners at fixed addresses (like a ServiceImport's IP in a cluster, or a
    /// port on a host that cannot use VIPs): bound at start, whatever the catalog says.
    pub fixed: Vec<FixedListener>,
}

/// Port-per-service listeners on one address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportPorts {
    /// The address to listen on (in a pod: `0.0.0.0`).
    pub address: std::net::IpAddr,
    /// `first-last`, e.g. `20000-29999`.
    pub ports: meshbridge_core::vip::PortRange,
}

/// One fixed service listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FixedListener {
    /// `ip:port` to listen on.
    pub listen: String,
    /// `namespace/name` of the service.
    pub service: String,
    /// The service port to reach.
    pub port: u16,
}

impl FixedListener {
    /// (namespace, name) of `service`, when it is `namespace/name`.
    pub fn service_key(&self) -> Option<(String, String)> {
        let (ns, name) = self.service.split_once('/')?;
        (meshbridge_core::model::is_dns_label(ns) && meshbridge_core::model::is_dns_label(name))
            .then(|| (ns.to_string(), name.to_string()))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyConfig {
    /// For services that no catalog policy names.
    pub default: DefaultAction,
}

/// Endpoint choice and failover at the sending side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FailoverConfig {
    /// Sites tried per client connection.
    pub max_attempts: usize,
    /// Consecutive failures that eject a site.
    pub eject_after: u32,
    pub eject_base_ms: u64,
    pub eject_max_ms: u64,
}

impl Config {
    /// The gateway of `site`, every optional setting at its default.
    pub fn new(site: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            site: site.into(),
            data_dir: data_dir.into(),
            zones: default_zones(),
            admin_listen: None,
            drain_deadline_ms: default_drain_ms(),
            tunnel: TunnelConfig::default(),
            listeners: ListenersConfig::default(),
            policy: PolicyConfig::default(),
            failover: FailoverConfig::default(),
            xds: None,
        }
    }
}

fn default_zones() -> Vec<String> {
    vec!["clusterset.local".into(), "cluster.local".into()]
}

/// A list of strings, or one string as a list of one.
fn one_or_more<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMore {
        One(String),
        More(Vec<String>),
    }
    Ok(match OneOrMore::deserialize(d)? {
        OneOrMore::One(s) => vec![s],
        OneOrMore::More(v) => v,
    })
}

fn default_drain_ms() -> u64 {
    30_000
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:15008".into(),
            transport: TransportKind::Auto,
            peer_transport: BTreeMap::new(),
            peers_allowed: vec!["*".into()],
            keepalive_ms: 1_000,
            idle_timeout_ms: 5_000,
            handshake_timeout_ms: 3_000,
            preamble_timeout_ms: 5_000,
            reply_timeout_ms: 10_000,
            connect_timeout_ms: 3_000,
            socket_buffer_bytes: 8 << 20,
            stream_window_bytes: 8 << 20,
            connection_window_bytes: 32 << 20,
            initial_mtu: 1_200,
            max_mtu: 1_452,
            max_streams_per_link: 16_384,
            max_links_per_peer: 8,
            max_inbound_streams: 65_536,
            stream_idle_timeout_ms: 3_600_000,
        }
    }
}

impl Default for ListenersConfig {
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            vip_range: None,
            import_ports: None,
            sni: None,
            connect: None,
            fixed: Vec::new(),
        }
    }
}

impl Default for FailoverConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            eject_after: 3,
            eject_base_ms: 5_000,
            eject_max_ms: 60_000,
        }
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl TunnelConfig {
    pub fn keepalive(&self) -> Duration {
        ms(self.keepalive_ms)
    }
    pub fn idle_timeout(&self) -> Duration {
        ms(self.idle_timeout_ms)
    }
    pub fn stream_idle_timeout(&self) -> Duration {
        ms(self.stream_idle_timeout_ms)
    }
    pub fn handshake_timeout(&self) -> Duration {
        ms(self.handshake_timeout_ms)
    }
    pub fn preamble_timeout(&self) -> Duration {
        ms(self.preamble_timeout_ms)
    }
    pub fn reply_timeout(&self) -> Duration {
        ms(self.reply_timeout_ms)
    }
    pub fn connect_timeout(&self) -> Duration {
        ms(self.connect_timeout_ms)
    }
    /// The transport to use towards `site`.
    pub fn transport_for(&self, site: &str) -> TransportKind {
        self.peer_transport
            .get(site)
            .copied()
            .unwrap_or(self.transport)
    }
    /// The peers a tunnel accepts, in either direction: `peers_allowed` (validated at load;
    /// an invalid list allows nobody), with `*` and whole trust domains narrowed to site
    /// identities (`spiffe://<td>/site/...`), so workloads and registry nodes fail the TLS
    /// handshake. `*` means the local trust domain (that of `identity`) only: a federated
    /// partner's sites are accepted only when `peers_allowed` names its trust domain (or
    /// ids under it).
    pub fn allow_list(&self, identity: &Identity) -> AllowList {
        let parsed = AllowList::parse(&self.peers_allowed).unwrap_or_default();
        let sites = |td: &str| AllowRule::Prefix(format!("spiffe://{td}/site/"));
        let rules = parsed
            .0
            .into_iter()
            .flat_map(|rule| match rule {
                AllowRule::Any => vec![sites(identity.id().trust_domain())],
                AllowRule::TrustDomain(td) => vec![sites(&td)],
                other => vec![other],
            })
            .collect();
        AllowList(rules)
    }
}

impl Config {
    /// A config for tests: everything on 127.0.0.1 port 0, short timeouts, no listeners.
    pub fn for_test(site: &str, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            site: site.into(),
            data_dir: data_dir.into(),
            zones: default_zones(),
            admin_listen: None,
            drain_deadline_ms: 5_000,
            tunnel: TunnelConfig {
                listen: "127.0.0.1:0".into(),
                transport: TransportKind::Quic,
                handshake_timeout_ms: 2_000,
                connect_timeout_ms: 1_000,
                max_mtu: 8_952,
                ..TunnelConfig::default()
            },
            listeners: ListenersConfig::default(),
            policy: PolicyConfig::default(),
            failover: FailoverConfig::default(),
            xds: None,
        }
    }

    pub fn drain_deadline(&self) -> Duration {
        ms(self.drain_deadline_ms)
    }
}

impl RoleConfig for Config {
    fn validate(&self, p: &mut Problems) {
        p.check(
            meshbridge_core::model::is_dns_label(&self.site),
            "site",
            format!("{:?} is not a DNS label (a-z 0-9 -)", self.site),
        );
        p.check(
            !self.data_dir.as_os_str().is_empty(),
            "data_dir",
            "must not be empty",
        );
        p.check(
            !self.zones.is_empty(),
            "zones",
            "must name at least one zone",
        );
        for (i, z) in self.zones.iter().enumerate() {
            let name = z.strip_suffix('.').unwrap_or(z);
            p.check(
                !name.is_empty()
                    && name.len() <= 200
                    && name.split('.').all(meshbridge_core::model::is_dns_label),
                format!("zones[{i}]"),
                format!("{z:?} is not a DNS name of lowercase labels"),
            );
        }
        if let Some(a) = &self.admin_listen {
            p.socket_addr("admin_listen", a);
        }
        if let Some(x) = &self.xds {
            x.validate(p);
        }
        let t = &self.tunnel;
        p.socket_addr("tunnel.listen", &t.listen);
        if let Err(e) = AllowList::parse(&t.peers_allowed) {
            p.push("tunnel.peers_allowed", e);
        }
        for (field, v) in [
            ("tunnel.keepalive_ms", t.keepalive_ms),
            ("tunnel.idle_timeout_ms", t.idle_timeout_ms),
            ("tunnel.handshake_timeout_ms", t.handshake_timeout_ms),
            ("tunnel.preamble_timeout_ms", t.preamble_timeout_ms),
            ("tunnel.reply_timeout_ms", t.reply_timeout_ms),
            ("tunnel.connect_timeout_ms", t.connect_timeout_ms),
        ] {
            p.check(v > 0, field, "must be more than 0");
        }
        p.check(
            t.keepalive_ms < t.idle_timeout_ms,
            "tunnel.keepalive_ms",
            "must be less than tunnel.idle_timeout_ms, or idle links die",
        );
        p.check(
            (1_200..=65_527).contains(&t.initial_mtu),
            "tunnel.initial_mtu",
            "must be within 1200..=65527",
        );
        p.check(
            (t.initial_mtu..=65_527).contains(&t.max_mtu),
            "tunnel.max_mtu",
            "must be within tunnel.initial_mtu..=65527",
        );
        p.check(
            (1..=1_000_000).contains(&t.max_streams_per_link),
            "tunnel.max_streams_per_link",
            "must be within 1..=1000000",
        );
        p.check(
            (1..=1_000).contains(&t.max_links_per_peer),
            "tunnel.max_links_per_peer",
            "must be within 1..=1000",
        );
        p.check(
            (1..=10_000_000).contains(&t.max_inbound_streams),
            "tunnel.max_inbound_streams",
            "must be within 1..=10000000",
        );
        p.check(
            t.stream_idle_timeout_ms >= 100,
            "tunnel.stream_idle_timeout_ms",
            "must be at least 100",
        );
        p.check(
            t.stream_window_bytes > 0 && t.connection_window_bytes >= t.stream_window_bytes,
            "tunnel.connection_window_bytes",
            "must be at least tunnel.stream_window_bytes (and both more than 0)",
        );
        for (field, addr) in [
            ("listeners.sni", &self.listeners.sni),
            ("listeners.connect", &self.listeners.connect),
        ] {
            if let Some(a) = addr {
                p.socket_addr(field, a);
            }
        }
        for (i, f) in self.listeners.fixed.iter().enumerate() {
            p.socket_addr(&format!("listeners.fixed[{i}].listen"), &f.listen);
            p.check(
                f.service_key().is_some(),
                format!("listeners.fixed[{i}].service"),
                format!("{:?} is not namespace/name (DNS labels)", f.service),
            );
            p.check(
                f.port > 0,
                format!("listeners.fixed[{i}].port"),
                "must be more than 0",
            );
        }
        p.check(
            self.listeners.vip_range.is_none() || self.listeners.import_ports.is_none(),
            "listeners.import_ports",
            "set either listeners.vip_range or listeners.import_ports, not both",
        );
        p.check(
            self.listeners.max_connections > 0,
            "listeners.max_connections",
            "must be more than 0",
        );
        let f = &self.failover;
        p.check(
            f.max_attempts > 0,
            "failover.max_attempts",
            "must be more than 0",
        );
        p.check(
            f.eject_after > 0,
            "failover.eject_after",
            "must be more than 0",
        );
        p.check(
            f.eject_base_ms <= f.eject_max_ms,
            "failover.eject_base_ms",
            "must not exceed failover.eject_max_ms",
        );
    }
}

/// Parse a validated address field (validation already reported a bad one).
pub(crate) fn addr(field: &'static str, s: &str) -> Result<SocketAddr, crate::Error> {
    s.parse().map_err(|_| crate::Error::Config {
        field,
        reason: format!("{s:?} is not an address like 127.0.0.1:8443"),
    })
}

#[cfg(test)]
mod tests {
    use meshbridge_core::config::parse_with_env;

    use super::*;

    /// The admin port is plain HTTP: none unless the file asks for one.
    #[test]
    fn no_admin_port_by_default() {
        let cfg: Config =
            parse_with_env("gw.toml", "site = \"east\"\ndata_dir = \"/d\"\n", &[]).unwrap();
        assert_eq!(cfg.admin_listen, None);
    }

    #[test]
    fn example_config_parses_with_defaults() {
        let text = r#"
site = "east"
data_dir = "/var/lib/meshbridge/gateway"
zone = "clusterset.local"
admin_listen = "0.0.0.0:15021"
drain_deadline_ms = 30000

[tunnel]
listen = "0.0.0.0:15008"
transport = "auto"
peer_transport = { legacy = "tcp" }
peers_allowed = ["spiffe://corp.example/site/"]
keepalive_ms = 1000
idle_timeout_ms = 5000
max_mtu = 1452

[listeners]
vip_range = "127.240.0.0/16"
sni = "0.0.0.0:15443"
connect = "127.0.0.1:15080"

[policy]
default = "deny"

[failover]
max_attempts = 3
eject_after = 3
eject_base_ms = 5000
eject_max_ms = 60000
"#;
        let cfg: Config = parse_with_env("gw.toml", text, &[]).unwrap();
        assert_eq!(cfg.tunnel.transport_for("legacy"), TransportKind::Tcp);
        assert_eq!(cfg.tunnel.transport_for("west"), TransportKind::Auto);
        assert_eq!(cfg.policy.default, DefaultAction::Deny);
        assert_eq!(cfg.tunnel.idle_timeout(), Duration::from_secs(5));
        // `zone = "…"`, the older one-zone form, is a list of one.
        assert_eq!(cfg.zones, vec!["clusterset.local".to_string()]);
        let cfg: Config =
            parse_with_env("gw.toml", "site = \"east\"\ndata_dir = \"/d\"\n", &[]).unwrap();
        assert_eq!(cfg.zones, vec!["clusterset.local", "cluster.local"]);
        let err = parse_with_env::<Config>(
            "gw.toml",
            "site = \"east\"\ndata_dir = \"/d\"\nzones = [\"cluster.local\", \"Bad_Zone\"]\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(err.problems[0].field, "zones[1]", "{err}");
    }

    #[test]
    fn plaintext_xds_is_refused_off_loopback_and_bad_client_ids_are_named() {
        let text = "site = \"east\"\ndata_dir = \"/d\"\n[xds]\nlisten = \"0.0.0.0:15010\"\nplaintext = true\nclients_allowed = [\"not an id\"]\n";
        let err = parse_with_env::<Config>("gw.toml", text, &[]).unwrap_err();
        let fields: Vec<&str> = err.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["xds.plaintext", "xds.clients_allowed"], "{err}");
        assert!(err.to_string().contains("0.0.0.0"), "{err}");
        let ok = "site = \"east\"\ndata_dir = \"/d\"\n[xds]\nlisten = \"127.0.0.1:15010\"\nplaintext = true\n";
        let cfg: Config = parse_with_env("gw.toml", ok, &[]).unwrap();
        assert!(
            cfg.xds
                .is_some_and(|x| x.plaintext && x.clients_allowed.is_empty())
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let text = r#"
site = "East Side"
data_dir = ""
colour = "red"
[tunnel]
listen = "nowhere"
keepalive_ms = 9000
peers_allowed = ["not an id"]
max_streams_per_link = 0
max_links_per_peer = 0
max_inbound_streams = 0
stream_idle_timeout_ms = 5
[listeners]
sni = "x"
"#;
        let err = parse_with_env::<Config>("gw.toml", text, &[]).unwrap_err();
        let fields: Vec<&str> = err.problems.iter().map(|p| p.field.as_str()).collect();
        for want in [
            "colour",
            "site",
            "data_dir",
            "tunnel.listen",
            "tunnel.peers_allowed",
            "tunnel.keepalive_ms",
            "tunnel.max_streams_per_link",
            "tunnel.max_links_per_peer",
            "tunnel.max_inbound_streams",
            "tunnel.stream_idle_timeout_ms",
            "listeners.sni",
        ] {
            assert!(fields.contains(&want), "{want} missing from {fields:?}");
        }
    }

    #[test]
    fn wildcards_only_allow_site_identities() {
        let pki = meshbridge_testkit::pki::TestPki::new("corp.example");
        let me = pki.identity("gw", "spiffe://corp.example/site/east/gateway");
        let id = |s: &str| meshbridge_core::id::SpiffeId::parse(s).unwrap();
        let t = TunnelConfig::default();
        let allow = t.allow_list(&me);
        assert!(allow.allows(&id("spiffe://corp.example/site/west/gateway")));
        assert!(allow.allows(&id("spiffe://corp.example/site/vm-1/agent")));
        assert!(!allow.allows(&id("spiffe://corp.example/ns/shop/sa/web")));
        assert!(!allow.allows(&id("spiffe://other.example/site/west/gateway")));
        let t = TunnelConfig {
            peers_allowed: vec![
                "spiffe://other.example".into(),
                "spiffe://corp.example/registry/r1".into(),
            ],
            ..TunnelConfig::default()
        };
        let allow = t.allow_list(&me);
        assert!(allow.allows(&id("spiffe://other.example/site/west/gateway")));
        assert!(!allow.allows(&id("spiffe://other.example/ns/a/sa/b")));
        assert!(
            allow.allows(&id("spiffe://corp.example/registry/r1")),
            "exact ids stay"
        );
    }

    #[test]
    fn for_test_config_is_valid() {
        let mut p = Problems::default();
        Config::for_test("east", "/tmp/x").validate(&mut p);
        assert!(p.is_empty(), "{p:?}");
    }
}
