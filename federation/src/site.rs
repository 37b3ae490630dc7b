//! Keeping a site alive in the registry: register it, renew its lease, and keep its exports
//! equal to what the host or cluster has now. Used by the gateway (static exports) and the
//! VM agent (health-checked exports).
//!
//! Generations are the wall clock in milliseconds, made strictly increasing: a restarted
//! process starts above anything it wrote before, so fencing accepts it, while a stale
//! writer (an older process still running somewhere) is refused.

use std::collections::BTreeMap;
use std::time::Duration;

use meshbridge_core::client::{ClientError, RegistryClient};
use meshbridge_core::clock::unix_ms as now_ms;
use meshbridge_core::model::{Endpoint, Export, Port, Report, ServiceKey, SiteSpec};
use serde::Serialize;
use tokio::sync::watch;
use tonic::Code;

/// What a site exports of one service, before generations and revisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalExport {
    pub service: ServiceKey,
    pub ports: Vec<Port>,
    pub endpoints: Vec<Endpoint>,
    pub headless: bool,
}

/// How the keeper is doing, for `/debug` pages, metrics and `ctl status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KeeperStatus {
    pub registered: bool,
    /// Unix ms of the last successful heartbeat or registration.
    pub last_renewal_ms: u64,
    pub exports: usize,
    pub last_error: Option<String>,
}

struct Generations(u64);

impl Generations {
    fn next(&mut self) -> u64 {
        self.0 = now_ms().max(self.0.saturating_add(1));
        self.0
    }
}

/// Register, heartbeat every third of the lease, and reconcile exports, until `stop`.
/// Errors are retried; the latest one is visible in the status.
pub async fn keep(
    client: RegistryClient,
    spec: SiteSpec,
    exports: watch::Receiver<Vec<LocalExport>>,
    status: watch::Sender<KeeperStatus>,
    stop: impl Future<Output = ()>,
) {
    keep_reporting(client, spec, exports, status, None::<fn() -> Report>, stop).await
}

/// Like [`keep`], and with every heartbeat also report the gateway's tunnel links and its
/// xDS clients' rejections (so `ctl status` and the registry's status page can show them).
pub async fn keep_reporting<L: Fn() -> Report>(
    client: RegistryClient,
    spec: SiteSpec,
    mut exports: watch::Receiver<Vec<LocalExport>>,
    status: watch::Sender<KeeperStatus>,
    report: Option<L>,
    stop: impl Future<Output = ()>,
) {
    let mut stop = std::pin::pin!(stop);
    let lease = if spec.lease_ttl_ms == 0 {
        15_000
    } else {
        spec.lease_ttl_ms
    };
    let period = Duration::from_millis((lease / 3).clamp(200, 5_000));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut gens = Generations(0);
    // What the registry holds, as far as we know: service → (generation, content).
    let mut put: BTreeMap<ServiceKey, (u64, LocalExport)> = BTreeMap::new();
    let mut registered = false;
    let mut source_open = true;
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {}
            changed = exports.changed(), if source_open => {
                // When the source is gone, keep the lease with what was last exported.
                source_open = changed.is_ok();
            }
        }
        let result = async {
            if !registered {
                client.register_site(&spec).await?;
                registered = true;
                put.clear();
                tracing::info!(site = %spec.name, "site registered");
            } else if let Err(e) = client
                .heartbeat_reporting(
                    &spec.name,
                    &spec.instance,
                    report.as_ref().map(|r| r()).as_ref(),
                )
                .await
            {
                // A withdrawn or forgotten site registers again, then re-exports everything.
                if matches!(e.code(), Some(Code::NotFound | Code::FailedPrecondition)) {
                    tracing::warn!(site = %spec.name, error = %e, "lease lost; registering again");
                    registered = false;
                }
                return Err(e);
            }
            let want: Vec<LocalExport> = exports.borrow_and_update().clone();
            reconcile(&client, &spec.name, &want, &mut put, &mut gens).await?;
            Ok::<_, ClientError>(())
        }
        .await;
        status.send_modify(|s| {
            s.registered = registered;
            s.exports = put.len();
            match &result {
                Ok(()) => {
                    s.last_renewal_ms = now_ms();
                    s.last_error = None;
                }
                Err(e) => s.last_error = Some(e.to_string()),
            }
        });
        if let Err(e) = result {
            tracing::warn!(site = %spec.name, error = %e, "registry update failed; will retry");
        }
    }
}

async fn reconcile(
    client: &RegistryClient,
    site: &str,
    want: &[LocalExport],
    put: &mut BTreeMap<ServiceKey, (u64, LocalExport)>,
    gens: &mut Generations,
) -> Result<(), ClientError> {
    let wanted: BTreeMap<&ServiceKey, &LocalExport> =
        want.iter().map(|e| (&e.service, e)).collect();
    for local in wanted.values() {
        put_one(client, site, local, put, gens).await?;
    }
    let gone: Vec<ServiceKey> = put
        .keys()
        .filter(|k| !wanted.contains_key(k))
        .cloned()
        .collect();
    for key in gone {
        withdraw_one(client, site, &key, put, gens).await?;
    }
    Ok(())
}

/// Write `local` unless the registry holds it already; true when written.
async fn put_one(
    client: &RegistryClient,
    site: &str,
    local: &LocalExport,
    put: &mut BTreeMap<ServiceKey, (u64, LocalExport)>,
    gens: &mut Generations,
) -> Result<bool, ClientError> {
    if put
        .get(&local.service)
        .is_some_and(|(_, have)| have == local)
    {
        return Ok(false);
    }
    let generation = gens.next();
    let export = Export {
        site: site.to_string(),
        service: local.service.clone(),
        generation,
        ports: local.ports.clone(),
        endpoints: local.endpoints.clone(),
        headless: local.headless,
        created_revision: 0,
        updated_revision: 0,
    };
    client.put_export(&export).await?;
    tracing::info!(%site, service = %local.service, generation, ready = local.endpoints.iter().filter(|e| e.ready).count(), "export updated");
    put.insert(local.service.clone(), (generation, local.clone()));
    Ok(true)
}

async fn withdraw_one(
    client: &RegistryClient,
    site: &str,
    key: &ServiceKey,
    put: &mut BTreeMap<ServiceKey, (u64, LocalExport)>,
    gens: &mut Generations,
) -> Result<(), ClientError> {
    let generation = gens.next();
    match client.delete_export(site, key, generation).await {
        Ok(_) => {}
        Err(e) if e.code() == Some(Code::NotFound) => {}
        Err(e) => return Err(e),
    }
    tracing::info!(%site, service = %key, "export withdrawn");
    put.remove(key);
    Ok(())
}

/// A site's exports as the registry holds them, kept equal to a wanted set one service at a
/// time (so one refused export does not hold up the others). Used by the Kubernetes
/// adapter, which reports per service.
pub struct ExportWriter {
    site: String,
    put: BTreeMap<ServiceKey, (u64, LocalExport)>,
    gens: Generations,
}

impl ExportWriter {
    /// Start from what `catalog` holds for `site` (a new leader adopts its predecessor's
    /// exports, and generations continue above theirs).
    pub fn adopt(site: &str, catalog: &meshbridge_core::model::Catalog) -> Self {
        let mut put = BTreeMap::new();
        let mut top = 0;
        for ((key, s), e) in &catalog.exports {
            if s != site {
                continue;
            }
            top = top.max(e.generation);
            put.insert(
                key.clone(),
                (
                    e.generation,
                    LocalExport {
                        service: key.clone(),
                        ports: e.ports.clone(),
                        endpoints: e.endpoints.clone(),
                        headless: e.headless,
                    },
                ),
            );
        }
        Self {
            site: site.to_string(),
            put,
            gens: Generations(top),
        }
    }

    /// Make the registry hold `local`; true when a new generation was written.
    pub async fn put(
        &mut self,
        client: &RegistryClient,
        local: &LocalExport,
    ) -> Result<bool, ClientError> {
        put_one(client, &self.site, local, &mut self.put, &mut self.gens).await
    }

    /// Make the registry hold every export of `want` it does not hold yet, up to
    /// `concurrency` writes in flight (an initial sync of thousands of services is bound
    /// by round trips, not by the registry). Returns the services whose write failed.
    pub async fn put_many(
        &mut self,
        client: &RegistryClient,
        want: &[&LocalExport],
        concurrency: usize,
    ) -> Vec<(ServiceKey, ClientError)> {
        use futures::StreamExt;
        let pending: Vec<LocalExport> = want
            .iter()
            .filter(|l| !self.holds(l))
            .map(|l| (*l).clone())
            .collect();
        let jobs: Vec<(Export, LocalExport)> = pending
            .into_iter()
            .map(|local| {
                let export = Export {
                    site: self.site.clone(),
                    service: local.service.clone(),
                    generation: self.gens.next(),
                    ports: local.ports.clone(),
                    endpoints: local.endpoints.clone(),
                    headless: local.headless,
                    created_revision: 0,
                    updated_revision: 0,
                };
                (export, local)
            })
            .collect();
        // Each future owns what it sends (no borrows held across the stream).
        let results: Vec<(u64, LocalExport, Result<(), ClientError>)> =
            futures::stream::iter(jobs.into_iter().map(|(export, local)| {
                let client = client.clone();
                async move {
                    let r = client.put_export(&export).await.map(|_| ());
                    (export.generation, local, r)
                }
            }))
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        let mut failed = Vec::new();
        for (generation, local, r) in results {
            match r {
                Ok(()) => {
                    tracing::info!(site = %self.site, service = %local.service, generation, ready = local.endpoints.iter().filter(|e| e.ready).count(), "export updated");
                    self.put.insert(local.service.clone(), (generation, local));
                }
                Err(e) => failed.push((local.service.clone(), e)),
            }
        }
        failed
    }

    /// Withdraw `key` (gone from the registry already is fine).
    pub async fn withdraw(
        &mut self,
        client: &RegistryClient,
        key: &ServiceKey,
    ) -> Result<(), ClientError> {
        withdraw_one(client, &self.site, key, &mut self.put, &mut self.gens).await
    }

    /// Whether the registry holds exactly `local` (as far as this writer knows).
    pub fn holds(&self, local: &LocalExport) -> bool {
        self.put
            .get(&local.service)
            .is_some_and(|(_, have)| have == local)
    }

    /// Services the registry holds for this site.
    pub fn keys(&self) -> Vec<ServiceKey> {
        self.put.keys().cloned().collect()
    }

    /// The generation last written for `key`.
    pub fn generation(&self, key: &ServiceKey) -> Option<u64> {
        self.put.get(key).map(|(g, _)| *g)
    }
}

/// Shared handle on a keeper's status.
pub type StatusRx = watch::Receiver<KeeperStatus>;

/// Convenience: a status channel.
pub fn status_channel() -> (watch::Sender<KeeperStatus>, StatusRx) {
    watch::channel(KeeperStatus::default())
}

/// A service this host or cluster exports, as written in a config file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ExportSpec {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub headless: bool,
    pub ports: Vec<PortSpec>,
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PortSpec {
    pub name: String,
    pub port: u16,
    #[serde(default)]
    pub protocol: meshbridge_core::model::Protocol,
    /// Where endpoints listen; defaults to `port`.
    #[serde(default)]
    pub target_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct EndpointSpec {
    pub address: std::net::IpAddr,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub identity: Option<String>,
}

impl PortSpec {
    /// Port `port` named `tcp`, its endpoints listening on `target_port`.
    pub fn tcp(port: u16, target_port: u16) -> Self {
        Self {
            name: "tcp".into(),
            port,
            protocol: Default::default(),
            target_port: (target_port != port).then_some(target_port),
        }
    }
}

impl ExportSpec {
    /// `namespace/name` with one TCP port ([`PortSpec::tcp`]) and an endpoint at each of
    /// `addresses` (no hostname, weight or identity).
    pub fn tcp(
        namespace: &str,
        name: &str,
        (port, target_port): (u16, u16),
        addresses: &[std::net::IpAddr],
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            headless: false,
            ports: vec![PortSpec::tcp(port, target_port)],
            endpoints: addresses
                .iter()
                .map(|&address| EndpointSpec {
                    address,
                    hostname: None,
                    weight: None,
                    identity: None,
                })
                .collect(),
        }
    }

    pub fn key(&self) -> ServiceKey {
        ServiceKey::new(&self.namespace, &self.name)
    }

    /// The export with every endpoint marked `ready` as given.
    pub fn to_local(&self, ready: bool) -> LocalExport {
        LocalExport {
            service: self.key(),
            ports: self
                .ports
                .iter()
                .map(|p| Port {
                    name: p.name.clone(),
                    port: p.port,
                    protocol: p.protocol,
                    target_port: p.target_port.unwrap_or(p.port),
                    app_protocol: None,
                })
                .collect(),
            endpoints: self
                .endpoints
                .iter()
                .map(|e| Endpoint {
                    address: e.address,
                    hostname: e.hostname.clone(),
                    ready,
                    weight: e.weight.unwrap_or(1),
                    identity: e.identity.clone(),
                    zone: None,
                })
                .collect(),
            headless: self.headless,
        }
    }

    /// Check it as the registry would (so a bad file fails at start, naming the field).
    pub fn validate(&self, field: &str, p: &mut meshbridge_core::config::Problems) {
        let export = Export {
            site: "local".into(),
            service: self.key(),
            generation: 1,
            ports: self.to_local(true).ports,
            endpoints: self.to_local(true).endpoints,
            headless: self.headless,
            created_revision: 0,
            updated_revision: 0,
        };
        if let Err(e) = export.validate() {
            p.push(field, e.to_string());
        }
    }
}

/// How a site registers itself, as written in a config file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Registration {
    #[serde(default)]
    pub kind: meshbridge_core::model::SiteKind,
    /// Where the site is. A number is taken as its text: a Node's zone label `1` passed as
    /// `MESHBRIDGE_REGISTER__ZONE=1` (the chart's default) reads as a TOML integer.
    #[serde(default, deserialize_with = "text")]
    pub region: String,
    #[serde(default, deserialize_with = "text")]
    pub zone: String,
    /// Where peers reach this site's tunnel (`host:port`); defaults to the tunnel listener.
    #[serde(default)]
    pub advertise: Vec<String>,
    /// Lease TTL; 0 takes the registry's default.
    #[serde(default)]
    pub lease_ttl_ms: u64,
    #[serde(default)]
    pub grace_ms: u64,
    /// This gateway's name within the site, for a site with several gateways (each then
    /// registers and reports itself). Default: `$POD_NAME` when set (the Helm chart sets
    /// it), else none (the gateway registers the whole site).
    #[serde(default)]
    pub instance: Option<String>,
}

/// A string, or a number or boolean as its text.
fn text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Text {
        Str(String),
        Int(i64),
        Float(f64),
        Bool(bool),
    }
    Ok(match <Text as serde::Deserialize>::deserialize(d)? {
        Text::Str(s) => s,
        Text::Int(i) => i.to_string(),
        Text::Float(f) => f.to_string(),
        Text::Bool(b) => b.to_string(),
    })
}

impl Registration {
    /// The instance name in effect.
    pub fn instance_name(&self) -> String {
        self.instance
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok())
            .unwrap_or_default()
    }

    pub fn spec(&self, site: &str, default_advertise: &str) -> SiteSpec {
        SiteSpec {
            name: site.to_string(),
            kind: self.kind,
            locality: meshbridge_core::model::Locality {
                region: self.region.clone(),
                zone: self.zone.clone(),
            },
            gateways: if self.advertise.is_empty() {
                vec![default_advertise.to_string()]
            } else {
                self.advertise.clone()
            },
            lease_ttl_ms: self.lease_ttl_ms,
            grace_ms: self.grace_ms,
            instance: self.instance_name(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Generations;

    /// A generation read back from the catalog may be anything a writer stored; the next
    /// one never overflows (a panic in debug builds, a wrap to a stale value in release).
    #[test]
    fn the_next_generation_never_overflows() {
        assert_eq!(Generations(u64::MAX).next(), u64::MAX);
        let mut g = Generations(0);
        let first = g.next();
        assert!(first > 0 && g.next() > first);
    }
}
