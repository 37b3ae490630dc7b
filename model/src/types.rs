//! Data types of the catalog.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// `namespace/name` of an exported service (MCS "namespace sameness").
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Where a site is: the units of locality-aware failover.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Locality {
    pub region: String,
    pub zone: String,
}

/// What kind of place a site is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteKind {
    #[default]
    Cluster,
    Zone,
    Vm,
}

/// Lease state of a site. Transitions are written to the log by the leader.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum SiteState {
    /// The lease is held.
    #[default]
    Fresh,
    /// The lease lapsed at `since_ms`; endpoints stay but rank last.
    Stale { since_ms: u64 },
    /// The grace ran out at `since_ms`; the site's exports were withdrawn.
    Withdrawn { since_ms: u64 },
}

impl SiteState {
    /// `fresh`, `stale` or `withdrawn`, as every view and metric names it.
    pub fn name(&self) -> &'static str {
        match self {
            SiteState::Fresh => "fresh",
            SiteState::Stale { .. } => "stale",
            SiteState::Withdrawn { .. } => "withdrawn",
        }
    }
}

/// A site as registered, with its lease. (`Default`: a fresh cluster site with no name,
/// for tests and benchmarks that set what they need.)
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Site {
    pub name: String,
    pub kind: SiteKind,
    pub locality: Locality,
    /// Gateway addresses (`host:port`) where peers reach this site's tunnel endpoint.
    pub gateways: Vec<String>,
    /// Lease time-to-live in milliseconds.
    pub lease_ttl_ms: u64,
    /// Grace after the lease lapses before the site's exports are withdrawn.
    pub grace_ms: u64,
    /// Leader time of the last register or heartbeat.
    pub last_heartbeat_ms: u64,
    pub state: SiteState,
    /// Revision at which the site was first registered.
    pub created_revision: u64,
    /// The site's tunnel links to peer sites, as its gateway last reported them (with
    /// several gateways: every gateway's links, in the order of `instances`).
    #[serde(default)]
    pub links: Vec<Link>,
    /// The gateways (or agents) that registered themselves by name, each with its own
    /// addresses, links and heartbeat, sorted by name. `gateways` and `links` are then the
    /// union of theirs. Empty for a site registered whole (no instance name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<GatewayInstance>,
    /// xDS responses this site's clients (Envoys, proxyless gRPC) reject now, as its
    /// gateways last reported them (with several gateways: every gateway's, in the order of
    /// `instances`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xds_rejections: Vec<XdsRejection>,
}

/// One of several gateways of a site.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayInstance {
    /// Its name within the site (a pod name, a host name).
    pub name: String,
    /// Where peers reach it (`host:port`).
    pub gateways: Vec<String>,
    #[serde(default)]
    pub links: Vec<Link>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xds_rejections: Vec<XdsRejection>,
    /// Leader time of its last register or heartbeat.
    pub last_heartbeat_ms: u64,
}

/// One tunnel link as seen from a site's gateway, reported with its heartbeats.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub peer_site: String,
    pub connected: bool,
    /// `quic` or `tcp` while connected.
    #[serde(default)]
    pub transport: Option<String>,
    #[serde(default)]
    pub rtt_us: Option<u64>,
    /// Consecutive failures to reach the peer.
    #[serde(default)]
    pub failures: u32,
    /// The last error (TLS refusals name their reason), at most 512 bytes.
    #[serde(default)]
    pub last_error: Option<String>,
}

/// A response an xDS client of the site's gateway rejected (a NACK) and has not accepted a
/// newer one of the same type since: a configuration that is not in effect there.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct XdsRejection {
    /// The client's node id.
    pub node: String,
    /// The resource type (`type.googleapis.com/envoy.config.listener.v3.Listener`).
    pub type_url: String,
    /// The client's error detail, at most [`MAX_LINK_ERROR`] bytes.
    pub error: String,
}

/// What a gateway reports with each heartbeat: its tunnel links and its xDS clients'
/// rejections. Each report replaces the last one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub links: Vec<Link>,
    pub xds_rejections: Vec<XdsRejection>,
}

/// Most xDS rejections one gateway may report (the newest are kept).
pub const MAX_XDS_REJECTIONS: usize = 32;

/// Most links one site may report.
pub const MAX_LINKS: usize = 256;
/// Longest link error kept.
pub const MAX_LINK_ERROR: usize = 512;

/// `text` cut to at most [`MAX_LINK_ERROR`] bytes at a character boundary: how the texts of
/// a gateway's report (link errors, xDS clients' node ids and errors) are bounded where they
/// are kept, sent and received.
pub fn cut_report_text(text: &str) -> &str {
    let mut cut = text.len().min(MAX_LINK_ERROR);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    &text[..cut]
}

impl Site {
    /// With instances: `gateways` and `links` become the union of theirs (addresses once,
    /// in instance order).
    pub fn derive_from_instances(&mut self) {
        if self.instances.is_empty() {
            return;
        }
        let mut gateways: Vec<String> = Vec::new();
        for g in self.instances.iter().flat_map(|i| &i.gateways) {
            if !gateways.contains(g) {
                gateways.push(g.clone());
            }
        }
        self.gateways = gateways;
        self.links = self
            .instances
            .iter()
            .flat_map(|i| i.links.clone())
            .collect();
        self.xds_rejections = self
            .instances
            .iter()
            .flat_map(|i| i.xds_rejections.clone())
            .collect();
    }

    /// When the lease lapses if no heartbeat arrives.
    pub fn lease_expires_ms(&self) -> u64 {
        self.last_heartbeat_ms.saturating_add(self.lease_ttl_ms)
    }

    /// Seconds the site has been stale at `now_ms` (0 when fresh).
    pub fn staleness_seconds(&self, now_ms: u64) -> u64 {
        match self.state {
            SiteState::Fresh => 0,
            SiteState::Stale { since_ms } | SiteState::Withdrawn { since_ms } => {
                now_ms.saturating_sub(since_ms) / 1000
            }
        }
    }

    pub fn is_fresh(&self) -> bool {
        matches!(self.state, SiteState::Fresh)
    }
}

/// What a site asks for when it registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteSpec {
    pub name: String,
    pub kind: SiteKind,
    pub locality: Locality,
    pub gateways: Vec<String>,
    pub lease_ttl_ms: u64,
    pub grace_ms: u64,
    /// This gateway's name within the site, when a site has several: each registers and
    /// reports itself, and the site's addresses are the union of theirs. Empty: the
    /// registration is the whole site's (it replaces the address list).
    #[serde(default)]
    pub instance: String,
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Sctp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        })
    }
}

/// A service port. Endpoints are reached at `endpoint.address:target_port`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Port {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    pub target_port: u16,
    /// The application protocol (Kubernetes `appProtocol`: `http`, `kubernetes.io/h2c`…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

/// One endpoint of an export.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub address: IpAddr,
    /// Stable hostname, for headless services.
    pub hostname: Option<String>,
    pub ready: bool,
    /// Relative weight (default 1).
    pub weight: u32,
    /// SPIFFE id the endpoint's workload runs as, when known.
    pub identity: Option<String>,
    /// The endpoint's zone within its site (Kubernetes EndpointSlice `zone`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

/// A site's statement "here are my endpoints of service S, ports P, generation G".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Export {
    pub site: String,
    pub service: ServiceKey,
    /// Monotonic per (site, service); an older generation is rejected (fencing).
    pub generation: u64,
    pub ports: Vec<Port>,
    pub endpoints: Vec<Endpoint>,
    /// Headless: DNS returns endpoint addresses, not a VIP.
    pub headless: bool,
    /// Revision of the first export of this (site, service); used for "oldest wins".
    pub created_revision: u64,
    pub updated_revision: u64,
}

impl Export {
    /// The `(service, site)` key of this export in [`Catalog::exports`].
    pub fn key(&self) -> (ServiceKey, String) {
        (self.service.clone(), self.site.clone())
    }

    /// Same statement, ignoring the revisions the catalog stamps on it.
    pub fn same_content(&self, other: &Export) -> bool {
        self.site == other.site
            && self.service == other.service
            && self.generation == other.generation
            && self.ports == other.ports
            && self.endpoints == other.endpoints
            && self.headless == other.headless
    }
}

/// A site's statement "my clients reach service S at these addresses": the ClusterSetIP
/// that a Kubernetes site's API server allocated to the ServiceImport of a service exported
/// elsewhere. At most one address per family; no addresses is not stored (the record is
/// removed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Import {
    pub site: String,
    pub service: ServiceKey,
    /// Monotonic per (site, service); an older generation is rejected (fencing).
    pub generation: u64,
    pub ips: Vec<IpAddr>,
}

impl Import {
    /// The `(service, site)` key of this import in [`Catalog::imports`].
    pub fn key(&self) -> (ServiceKey, String) {
        (self.service.clone(), self.site.clone())
    }
}

/// A principal allowed by a policy.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum Principal {
    /// An exact SPIFFE id.
    Id(String),
    /// A SPIFFE id prefix, e.g. `spiffe://corp.example/ns/billing/`.
    IdPrefix(String),
    /// Any identity of a trust domain.
    TrustDomain(String),
    /// Any identity whose traffic enters from this site: `east` is the site of the local
    /// trust domain (the deciding gateway's), `partner.example/east` a federated one's.
    Site(String),
}

/// "Allow service S from these principals".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub name: String,
    pub service: ServiceKey,
    pub allow: Vec<Principal>,
}

/// A join token that has been used (single use is enforced by the state machine).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUse {
    pub id: String,
    /// The site that used it; empty for a token revoked before use.
    pub site: String,
    pub used_at_ms: u64,
    pub expires_ms: u64,
    /// Revoked by an admin before anyone used it (`used_at_ms` is then when).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revoked: bool,
}

/// The replicated catalog at a revision. Cloning is cheap-ish: values are behind `Arc`.
///
/// In JSON, `exports` is a list of exports (JSON object keys must be strings); the map key
/// is rebuilt from each export's `service` and `site`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    pub revision: u64,
    pub sites: BTreeMap<String, Arc<Site>>,
    /// Keyed by (service, site).
    #[serde(with = "records_as_list")]
    pub exports: BTreeMap<(ServiceKey, String), Arc<Export>>,
    /// Import addresses, keyed by (service, site): where a site's clients reach a service
    /// exported elsewhere (a Kubernetes site's ServiceImport ClusterSetIP). Each site's DNS
    /// answers them for that site.
    #[serde(default, with = "records_as_list")]
    pub imports: BTreeMap<(ServiceKey, String), Arc<Import>>,
    pub policies: BTreeMap<String, Arc<Policy>>,
    pub tokens: BTreeMap<String, TokenUse>,
    /// Generation at which each (service, site) export was deleted: a later put must carry a
    /// higher generation, so a restarted exporter cannot resurrect deleted endpoints.
    /// Cleared when the site is removed or withdrawn. Registry-side fencing state: watch
    /// deltas do not carry it.
    #[serde(default, with = "tombstones_as_list")]
    pub export_tombstones: BTreeMap<(ServiceKey, String), u64>,
    /// The latest leader clock reading an applied command carried (registrations,
    /// heartbeats, token uses, ticks). Join-token expiry is judged against it, so a new
    /// leader whose clock is behind cannot accept a token that already expired. Registry-
    /// side state: watch deltas do not carry it.
    #[serde(default)]
    pub clock_ms: u64,
    /// Sites an admin removed or revoked, with the revision of that: they may not register
    /// again, and their agents may not renew SVIDs, until reinstated or enrolled again with
    /// a join token.
    #[serde(default)]
    pub revoked_sites: BTreeMap<String, u64>,
    /// Export ownership: scope (`ns` or `ns/name`) → the sites that may export services in
    /// it (sorted). A service with no rule may be exported by any site.
    #[serde(default)]
    pub owners: BTreeMap<String, Vec<String>>,
}

impl Catalog {
    pub fn site(&self, name: &str) -> Option<&Site> {
        self.sites.get(name).map(|s| &**s)
    }

    /// The export of `service` by `site`.
    pub fn export(&self, service: &ServiceKey, site: &str) -> Option<&Export> {
        self.exports
            .get(&(service.clone(), site.to_owned()))
            .map(|e| &**e)
    }

    /// Every site's export of `service`, ordered by site name.
    pub fn exports_of<'a>(&'a self, service: &'a ServiceKey) -> impl Iterator<Item = &'a Export> {
        self.exports
            .range((service.clone(), String::new())..)
            .take_while(move |((key, _), _)| key == service)
            .map(|(_, e)| &**e)
    }

    /// The addresses `site` reaches `service` at, if it imports it under its own address.
    pub fn import(&self, service: &ServiceKey, site: &str) -> Option<&Import> {
        self.imports
            .get(&(service.clone(), site.to_owned()))
            .map(|i| &**i)
    }

    /// Every export of `site`, ordered by service key.
    pub fn exports_of_site<'a>(&'a self, site: &'a str) -> impl Iterator<Item = &'a Export> {
        self.exports
            .iter()
            .filter(move |((_, s), _)| s == site)
            .map(|(_, e)| &**e)
    }
}

/// A record keyed by `(service, site)` in the catalog.
pub trait SiteRecord {
    const WHAT: &'static str;
    fn key(&self) -> (ServiceKey, String);
}

impl SiteRecord for Export {
    const WHAT: &'static str = "export";
    fn key(&self) -> (ServiceKey, String) {
        Export::key(self)
    }
}

impl SiteRecord for Import {
    const WHAT: &'static str = "import";
    fn key(&self) -> (ServiceKey, String) {
        Import::key(self)
    }
}

/// Serde for a map of [`SiteRecord`]s as a list (tuple keys cannot be JSON object keys).
mod records_as_list {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{ServiceKey, SiteRecord};

    type Map<T> = BTreeMap<(ServiceKey, String), Arc<T>>;

    pub fn serialize<T: Serialize, S: Serializer>(map: &Map<T>, ser: S) -> Result<S::Ok, S::Error> {
        ser.collect_seq(map.values())
    }

    pub fn deserialize<'de, T, D>(de: D) -> Result<Map<T>, D::Error>
    where
        T: SiteRecord + Deserialize<'de>,
        D: Deserializer<'de>,
    {
        let list = Vec::<Arc<T>>::deserialize(de)?;
        let mut map = Map::new();
        for record in list {
            let (service, site) = record.key();
            if map
                .insert((service.clone(), site.clone()), record)
                .is_some()
            {
                return Err(D::Error::custom(format!(
                    "duplicate {} of {service} by site {site}",
                    T::WHAT
                )));
            }
        }
        Ok(map)
    }
}

/// Serde for the tombstone map as a list of `[service, site, generation]`.
mod tombstones_as_list {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer};

    use super::ServiceKey;

    type Map = BTreeMap<(ServiceKey, String), u64>;

    pub fn serialize<S: Serializer>(map: &Map, ser: S) -> Result<S::Ok, S::Error> {
        ser.collect_seq(map.iter().map(|((k, s), g)| (k, s, g)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<Map, D::Error> {
        let list = Vec::<(ServiceKey, String, u64)>::deserialize(de)?;
        Ok(list.into_iter().map(|(k, s, g)| ((k, s), g)).collect())
    }
}
