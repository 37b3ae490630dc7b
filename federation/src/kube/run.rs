//! The adapter at work: reflectors on Services, EndpointSlices, ServiceExports, the
//! gateways' EndpointSlices and its own ServiceImports; a catalog replica from the registry;
//! and, while this replica holds the Lease, one debounced reconcile that writes exports to
//! the registry, imports into the cluster and conditions onto the ServiceExports.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use meshbridge_core::backoff::Backoff;
use meshbridge_core::client::{Consistency, RegistryClient};
use meshbridge_core::model::{Catalog, Import, ServiceKey, TypeConflict};
use meshbridge_core::tls::Identity;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::config::Config;
use super::crd::{ServiceExport, ServiceImport, ServiceImportType};
use super::export::{self, Invalid, SERVICE_NAME_LABEL};
use super::import::{self, Desired, IMPORT_LABEL, MANAGED_BY, MANAGED_BY_LABEL};
use super::leader::Elector;
use super::status::{self, Cond};
use crate::site::{ExportWriter, LocalExport};

/// The field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "meshbridge-kube-adapter";
/// A full re-apply of every import this often (repairs objects someone changed by hand).
const REAPPLY_EVERY: Duration = Duration::from_secs(300);
const RESYNC: Duration = Duration::from_secs(30);
/// Export writes in flight at once.
const EXPORT_CONCURRENCY: usize = 32;
/// Imports applied at once (each is a few API calls in a row).
const IMPORT_CONCURRENCY: usize = 16;
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// A Kubernetes client from the config: its kubeconfig file (named in every error), or
/// `KUBECONFIG`, `~/.kube/config` and the in-cluster service account.
pub async fn kube_client(cfg: &Config) -> Result<Client> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("kubeconfig {}: cannot read it", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}: not usable", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no Kubernetes credentials: set `kubeconfig` in the config, KUBECONFIG, or run in a pod with a service account",
        )?,
    };
    let url = config.cluster_url.clone();
    Client::try_from(config).with_context(|| format!("API server {url}: cannot build a client"))
}

/// Adapter metrics.
#[derive(Clone, Default)]
pub struct Metrics {
    pub leader: Gauge,
    pub exports: Gauge,
    pub imports: Gauge,
    pub reconciles: Counter,
    /// Watches that expired (410 Gone) and listed again.
    pub relists: Counter,
    pub errors: Counter,
    /// Unix seconds of the last reconcile that wrote without an error.
    pub last_success: Gauge<i64, AtomicI64>,
}

impl Metrics {
    pub fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("meshbridge_kube");
        r.register(
            "leader",
            "1 while this replica holds the Lease",
            self.leader.clone(),
        );
        r.register(
            "exports",
            "Services exported to the registry",
            self.exports.clone(),
        );
        r.register(
            "imports",
            "ServiceImports held in this cluster",
            self.imports.clone(),
        );
        r.register("reconciles", "Reconcile passes", self.reconciles.clone());
        r.register(
            "relists",
            "Watches that expired (410 Gone) and listed again",
            self.relists.clone(),
        );
        r.register(
            "errors",
            "Kubernetes or registry writes that failed",
            self.errors.clone(),
        );
        r.register(
            "last_success_seconds",
            "Unix time of the last reconcile without an error",
            self.last_success.clone(),
        );
    }
}

fn spawn_reflector<K>(
    api: Api<K>,
    wc: watcher::Config,
    what: &'static str,
    notify: Arc<Notify>,
    relists: Counter,
    stop: CancellationToken,
) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, wc)).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                ev = stream.next() => match ev {
                    Some(Ok(ev)) => {
                        if failing {
                            tracing::info!(what, "watch recovered");
                            failing = false;
                        }
                        if let watcher::Event::InitDone = ev {
                            tracing::debug!(what, "listed");
                        }
                        notify.notify_one();
                    }
                    Some(Err(watcher::Error::WatchError(s))) if s.code == 410 => {
                        relists.inc();
                        tracing::info!(what, message = %s.message, "watch expired (410 Gone); listing again");
                    }
                    Some(Err(e)) => {
                        if !failing {
                            tracing::warn!(what, error = %e, "watch failed; retrying with backoff");
                        }
                        failing = true;
                    }
                    None => break,
                }
            }
        }
    });
    reader
}

/// Every Store of one kind, one per watched namespace (or one for all).
struct Stores<K: Resource<DynamicType = ()> + Clone + 'static>(Vec<Store<K>>);

impl<K> Stores<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
{
    fn spawn(
        client: &Client,
        namespaces: &[String],
        wc: &watcher::Config,
        what: &'static str,
        notify: &Arc<Notify>,
        relists: &Counter,
        stop: &CancellationToken,
    ) -> Self {
        let apis: Vec<Api<K>> = if namespaces.is_empty() {
            vec![Api::all(client.clone())]
        } else {
            namespaces
                .iter()
                .map(|ns| Api::namespaced(client.clone(), ns))
                .collect()
        };
        Self(
            apis.into_iter()
                .map(|api| {
                    spawn_reflector(
                        api,
                        wc.clone(),
                        what,
                        notify.clone(),
                        relists.clone(),
                        stop.clone(),
                    )
                })
                .collect(),
        )
    }

    fn all(&self) -> impl Iterator<Item = Arc<K>> + '_ {
        self.0.iter().flat_map(|s| s.state())
    }

    async fn ready(&self) -> bool {
        for s in &self.0 {
            if s.wait_until_ready().await.is_err() {
                return false;
            }
        }
        true
    }
}

fn key_of<K: ResourceExt>(o: &K) -> ServiceKey {
    ServiceKey::new(o.namespace().unwrap_or_default(), o.name_any())
}

fn managed<K: ResourceExt>(o: &K) -> bool {
    o.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY)
}

/// Run the adapter until `stop`. `ready` is set once the caches are filled.
pub async fn run(
    cfg: Config,
    client: Client,
    registry: RegistryClient,
    metrics: Metrics,
    ready: meshbridge_core::admin::Readiness,
    stop: CancellationToken,
) -> Result<()> {
    // An API server that is down at start: say so, and keep trying.
    let mut wait = Backoff::new(RETRY_MIN, RETRY_MAX);
    loop {
        match client.apiserver_version().await {
            Ok(v) => {
                tracing::info!(version = %v.git_version, "API server reachable");
                break;
            }
            Err(e) => {
                let delay = wait.next_delay();
                tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot reach the Kubernetes API server; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    let notify = Arc::new(Notify::new());
    let ns = &cfg.namespaces;
    let not_ours = watcher::Config::default().labels(&format!("!{IMPORT_LABEL}"));
    let services: Stores<Service> = Stores::spawn(
        &client,
        ns,
        &not_ours,
        "services",
        &notify,
        &metrics.relists,
        &stop,
    );
    let slices: Stores<EndpointSlice> = Stores::spawn(
        &client,
        ns,
        &watcher::Config::default().labels(&format!("{SERVICE_NAME_LABEL},!{IMPORT_LABEL}")),
        "endpointslices",
        &notify,
        &metrics.relists,
        &stop,
    );
    let exports: Stores<ServiceExport> = Stores::spawn(
        &client,
        ns,
        &watcher::Config::default(),
        "serviceexports",
        &notify,
        &metrics.relists,
        &stop,
    );
    let imports: Stores<ServiceImport> = Stores::spawn(
        &client,
        ns,
        &watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}")),
        "serviceimports",
        &notify,
        &metrics.relists,
        &stop,
    );
    let gateway = match cfg.import.gateway_service_key() {
        Some((gns, gname)) if cfg.import.enabled => Some(Stores::<EndpointSlice>::spawn(
            &client,
            std::slice::from_ref(&gns),
            &watcher::Config::default().labels(&format!("{SERVICE_NAME_LABEL}={gname}")),
            "gateway endpointslices",
            &notify,
            &metrics.relists,
            &stop,
        )),
        _ => None,
    };
    let (leading_tx, mut leading) = watch::channel(false);
    let elector = Elector::new(client.clone(), &cfg.leader_election, cfg.holder_identity());
    let elector_stop = stop.child_token();
    let elector_task = tokio::spawn(elector.run(leading_tx, elector_stop.clone()));
    let mut catalog = registry.clone().watch_catalog();

    tokio::select! {
        _ = stop.cancelled() => { elector_stop.cancel(); let _ = elector_task.await; return Ok(()) }
        ok = async {
            services.ready().await && slices.ready().await && exports.ready().await
                && imports.ready().await
                && match &gateway { Some(g) => g.ready().await, None => true }
        } => if !ok { return Err(anyhow!("a Kubernetes watch ended before its first list")) },
    }
    tracing::info!("caches filled");
    ready.set(true);

    let mut state = Reconciler {
        cfg: &cfg,
        client: &client,
        registry: &registry,
        metrics: &metrics,
        writer: None,
        applied: BTreeMap::new(),
        addresses: ImportAddresses::default(),
        namespaces: cfg.namespaces.iter().cloned().collect(),
    };
    let mut retry = Backoff::new(RETRY_MIN, RETRY_MAX);
    let mut failed = false;
    let mut last_full = tokio::time::Instant::now();
    loop {
        let wait = if failed { retry.peek() } else { RESYNC };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = notify.notified() => {}
            r = catalog.changed() => if r.is_err() { break },
            _ = leading.changed() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        let is_leader = *leading.borrow_and_update();
        metrics.leader.set(i64::from(is_leader));
        if !is_leader {
            state.writer = None;
            state.applied.clear();
            state.addresses = ImportAddresses::default();
            continue;
        }
        // Gather a burst of changes into one pass.
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(cfg.debounce_ms)) => {}
        }
        if last_full.elapsed() >= REAPPLY_EVERY {
            state.applied.clear();
            last_full = tokio::time::Instant::now();
        }
        let cat = catalog.borrow_and_update().clone();
        let gateways: Vec<IpAddr> = gateway
            .as_ref()
            .map(|g| ready_addresses(g.all()))
            .unwrap_or_default();
        let view = View {
            services: services.all().collect(),
            slices: slices.all().collect(),
            exports: exports.all().collect(),
            imports: imports.all().collect(),
            gateways,
        };
        metrics.reconciles.inc();
        let errors = state.pass(&view, &cat, &leading).await;
        if errors == 0 {
            failed = false;
            retry.reset();
            metrics
                .last_success
                .set(meshbridge_core::clock::unix_secs());
        } else {
            metrics.errors.inc_by(errors as u64);
            if failed {
                // Wait twice as long before the next pass.
                retry.next_delay();
            }
            failed = true;
        }
    }
    ready.set(false);
    elector_stop.cancel();
    let _ = elector_task.await;
    Ok(())
}

/// The ready addresses of the gateways' EndpointSlices.
fn ready_addresses(slices: impl Iterator<Item = Arc<EndpointSlice>>) -> Vec<IpAddr> {
    let mut out = BTreeSet::new();
    for s in slices {
        if !matches!(s.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        for e in s.endpoints.iter().flatten() {
            let c = e.conditions.clone().unwrap_or_default();
            if !c.ready.unwrap_or(true) || c.terminating.unwrap_or(false) {
                continue;
            }
            if let Some(a) = e.addresses.first().and_then(|a| a.parse().ok()) {
                out.insert(a);
            }
        }
    }
    out.into_iter().collect()
}

/// One consistent look at the caches.
struct View {
    services: Vec<Arc<Service>>,
    slices: Vec<Arc<EndpointSlice>>,
    exports: Vec<Arc<ServiceExport>>,
    imports: Vec<Arc<ServiceImport>>,
    gateways: Vec<IpAddr>,
}

struct Reconciler<'a> {
    cfg: &'a Config,
    client: &'a Client,
    registry: &'a RegistryClient,
    metrics: &'a Metrics,
    /// What the registry holds for this site; None until adopted after becoming leader.
    writer: Option<ExportWriter>,
    /// Imports applied, by the JSON of what was applied.
    applied: BTreeMap<ServiceKey, String>,
    /// This site's ClusterSetIPs as written to the registry.
    addresses: ImportAddresses,
    namespaces: BTreeSet<String>,
}

/// The ClusterSetIPs of this cluster's ServiceImports, kept in the registry as the site's
/// import addresses, so `meshbridge dns` (any replica of this site) answers what CoreDNS
/// answers here.
#[derive(Default)]
struct ImportAddresses {
    /// Written and not yet seen in the catalog replica: service → (addresses, revision of
    /// the write). A pass before the replica catches up does not write them again.
    pending: BTreeMap<ServiceKey, (Vec<IpAddr>, u64)>,
    generation: u64,
}

impl ImportAddresses {
    fn next_generation(&mut self, held: u64) -> u64 {
        let now = meshbridge_core::clock::unix_ms();
        self.generation = now
            .max(self.generation.saturating_add(1))
            .max(held.saturating_add(1));
        self.generation
    }

    /// Make the registry hold `want` (service → ClusterSetIPs) as `site`'s import
    /// addresses, and nothing else. Returns the number of failed writes.
    async fn reconcile(
        &mut self,
        registry: &RegistryClient,
        site: &str,
        want: &BTreeMap<ServiceKey, Vec<IpAddr>>,
        catalog: &Catalog,
    ) -> usize {
        self.pending.retain(|_, (_, rev)| *rev > catalog.revision);
        let held: BTreeMap<&ServiceKey, &Import> = catalog
            .imports
            .iter()
            .filter(|((_, s), _)| s == site)
            .map(|((k, _), i)| (k, &**i))
            .collect();
        let mut jobs: Vec<Import> = Vec::new();
        let keys: BTreeSet<&ServiceKey> = want.keys().chain(held.keys().copied()).collect();
        for key in keys {
            let ips = want.get(key).cloned().unwrap_or_default();
            let now = match self.pending.get(key) {
                Some((written, _)) => written,
                None => held.get(key).map_or(&[][..], |i| i.ips.as_slice()),
            };
            if now == ips.as_slice() {
                continue;
            }
            let top = held.get(key).map_or(0, |i| i.generation);
            jobs.push(Import {
                site: site.to_owned(),
                service: key.clone(),
                generation: self.next_generation(top),
                ips,
            });
        }
        let results: Vec<_> = futures::stream::iter(jobs.into_iter().map(|import| async move {
            let r = registry.put_import(&import).await;
            (import, r)
        }))
        .buffer_unordered(EXPORT_CONCURRENCY)
        .collect()
        .await;
        let mut errors = 0;
        for (import, r) in results {
            match r {
                Ok(w) => {
                    tracing::info!(service = %import.service, ips = ?import.ips, "import address written to the registry");
                    self.pending
                        .insert(import.service, (import.ips, w.revision));
                }
                Err(e) => {
                    errors += 1;
                    tracing::warn!(service = %import.service, error = %e, "import address not written; will retry");
                }
            }
        }
        errors
    }
}

impl Reconciler<'_> {
    /// One pass; returns the number of failed writes.
    async fn pass(
        &mut self,
        view: &View,
        catalog: &Catalog,
        leading: &watch::Receiver<bool>,
    ) -> usize {
        let mut errors = 0;
        let site = self.cfg.site.clone();
        if self.writer.is_none() {
            match self.registry.catalog(Consistency::Linearizable).await {
                Ok(c) => {
                    let w = ExportWriter::adopt(&site, &c);
                    tracing::info!(
                        exports = w.keys().len(),
                        "adopted the site's exports from the registry"
                    );
                    self.writer = Some(w);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the registry's catalog; will retry");
                    return 1;
                }
            }
        }
        // Exports.
        let services: BTreeMap<ServiceKey, &Service> = view
            .services
            .iter()
            .map(|s| (key_of(s.as_ref()), s.as_ref()))
            .collect();
        let mut slices: BTreeMap<ServiceKey, Vec<&EndpointSlice>> = BTreeMap::new();
        for s in &view.slices {
            if let Some(svc) = s.labels().get(SERVICE_NAME_LABEL) {
                slices
                    .entry(ServiceKey::new(s.namespace().unwrap_or_default(), svc))
                    .or_default()
                    .push(s.as_ref());
            }
        }
        let mut verdicts: BTreeMap<ServiceKey, (Arc<ServiceExport>, Result<LocalExport, Invalid>)> =
            BTreeMap::new();
        for se in &view.exports {
            let key = key_of(se.as_ref());
            if se.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let v = export::build(
                &key,
                services.get(&key).copied(),
                slices.get(&key).map(Vec::as_slice).unwrap_or(&[]),
            );
            verdicts.insert(key, (se.clone(), v));
        }
        let mut write_errors: BTreeMap<ServiceKey, (String, String)> = BTreeMap::new();
        let Some(writer) = self.writer.as_mut() else {
            return errors + 1;
        };
        if !*leading.borrow() {
            return errors;
        }
        let want: Vec<&LocalExport> = verdicts
            .values()
            .filter_map(|(_, v)| v.as_ref().ok())
            .collect();
        for (key, e) in writer
            .put_many(self.registry, &want, EXPORT_CONCURRENCY)
            .await
        {
            errors += 1;
            let reason = match e.code() {
                Some(
                    tonic::Code::InvalidArgument
                    | tonic::Code::PermissionDenied
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::OutOfRange,
                ) => "RegistryRejected",
                _ => "RegistryUnavailable",
            };
            tracing::warn!(service = %key, error = %e, "export not written");
            write_errors.insert(key, (reason.into(), e.to_string()));
        }
        let valid: BTreeSet<&ServiceKey> = verdicts
            .iter()
            .filter(|(_, (_, v))| v.is_ok())
            .map(|(k, _)| k)
            .collect();
        for key in writer.keys() {
            if valid.contains(&key) || !*leading.borrow() {
                continue;
            }
            if let Err(e) = writer.withdraw(self.registry, &key).await {
                errors += 1;
                tracing::warn!(service = %key, error = %e, "export not withdrawn; will retry");
            }
        }
        self.metrics.exports.set(writer.keys().len() as i64);

        // Conditions on the ServiceExports: only changed ones, several writes at once.
        let patches: Vec<(ServiceKey, serde_json::Value)> = verdicts
            .iter()
            .filter_map(|(key, (se, v))| {
                let want = conditions(&site, key, v, writer, write_errors.get(key), catalog);
                let current = se
                    .status
                    .as_ref()
                    .map(|s| s.conditions.as_slice())
                    .unwrap_or(&[]);
                let conds = status::merge(current, &want, se.metadata.generation)?;
                Some((
                    key.clone(),
                    serde_json::json!({ "status": { "conditions": conds } }),
                ))
            })
            .collect();
        let failures: Vec<(ServiceKey, kube::Error)> =
            futures::stream::iter(patches.into_iter().map(|(key, patch)| {
                let api: Api<ServiceExport> = Api::namespaced(self.client.clone(), &key.namespace);
                async move {
                    let r = api
                        .patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await;
                    // (Not found: deleted since the cache saw it; nothing to report on.)
                    ok_if_gone(r).err().map(|e| (key, e))
                }
            }))
            .buffer_unordered(IMPORT_CONCURRENCY)
            .filter_map(std::future::ready)
            .collect()
            .await;
        for (key, e) in failures {
            errors += 1;
            tracing::warn!(service = %key, error = %e, "cannot write the ServiceExport's status");
        }

        // Imports. Never from a catalog not yet received (revision 0): an adapter that
        // starts while the registry is down keeps the imports it finds (static stability).
        if self.cfg.import.enabled && catalog.revision > 0 {
            let desired = import::desired(
                catalog,
                &site,
                &view.gateways,
                self.cfg.import.ports,
                &self.namespaces,
            );
            if !*leading.borrow() {
                return errors;
            }
            let todo: Vec<(ServiceKey, Desired, String)> = desired
                .iter()
                .filter_map(|(key, d)| {
                    let fingerprint = serde_json::to_string(&(&d.import, &d.service, &d.slices))
                        .unwrap_or_default();
                    (self.applied.get(key) != Some(&fingerprint))
                        .then(|| (key.clone(), d.clone(), fingerprint))
                })
                .collect();
            // Each future owns its import and a client handle (no borrows across the stream).
            let results: Vec<_> =
                futures::stream::iter(todo.into_iter().map(|(key, d, fingerprint)| {
                    let client = self.client.clone();
                    async move {
                        let r = apply_import(&client, &d).await;
                        (key, fingerprint, r)
                    }
                }))
                .buffer_unordered(IMPORT_CONCURRENCY)
                .collect()
                .await;
            for (key, fingerprint, r) in results {
                match r {
                    Ok(()) => {
                        tracing::info!(service = %key, "import applied");
                        self.applied.insert(key, fingerprint);
                    }
                    Err(e) => {
                        errors += 1;
                        tracing::warn!(service = %key, error = %format!("{e:#}"), "import not applied; will retry");
                        self.applied.remove(&key);
                    }
                }
            }
            let mut stale: BTreeSet<ServiceKey> = view
                .imports
                .iter()
                .filter(|i| managed(i.as_ref()))
                .map(|i| key_of(i.as_ref()))
                .collect();
            stale.extend(self.applied.keys().cloned());
            for key in stale {
                if desired.contains_key(&key) || !*leading.borrow() {
                    continue;
                }
                match delete_import(self.client, &key).await {
                    Ok(()) => {
                        tracing::info!(service = %key, "import removed");
                        self.applied.remove(&key);
                    }
                    Err(e) => {
                        errors += 1;
                        tracing::warn!(service = %key, error = %format!("{e:#}"), "import not removed; will retry");
                    }
                }
            }
            self.metrics.imports.set(desired.len() as i64);

            // The ClusterSetIPs the API server allocated, for this site's DNS answers.
            let want: BTreeMap<ServiceKey, Vec<IpAddr>> = view
                .imports
                .iter()
                .filter(|i| managed(i.as_ref()) && i.metadata.deletion_timestamp.is_none())
                .filter(|i| desired.contains_key(&key_of(i.as_ref())))
                .filter_map(|i| {
                    let mut ips: Vec<IpAddr> =
                        i.spec.ips.iter().filter_map(|ip| ip.parse().ok()).collect();
                    ips.sort_by_key(|ip| !ip.is_ipv4());
                    ips.dedup_by_key(|ip| ip.is_ipv4());
                    (!ips.is_empty()).then(|| (key_of(i.as_ref()), ips))
                })
                .collect();
            if *leading.borrow() {
                errors += self
                    .addresses
                    .reconcile(self.registry, &site, &want, catalog)
                    .await;
            }
        }
        errors
    }
}

/// `Valid`, `Ready` and `Conflict` for one ServiceExport.
fn conditions(
    site: &str,
    key: &ServiceKey,
    verdict: &Result<LocalExport, Invalid>,
    writer: &ExportWriter,
    write_error: Option<&(String, String)>,
    catalog: &Catalog,
) -> Vec<Cond> {
    let local = match verdict {
        Err(inv) => {
            return vec![
                Cond::new("Valid", false, inv.reason, inv.message.clone()),
                Cond::new(
                    "Ready",
                    false,
                    "Invalid",
                    "not exported while the ServiceExport is not valid",
                ),
                Cond::new("Conflict", false, "NoConflict", ""),
            ];
        }
        Ok(l) => l,
    };
    let valid = Cond::new(
        "Valid",
        true,
        "Valid",
        format!("Service {key} can be exported"),
    );
    let ready = match write_error {
        Some((reason, message)) => {
            Cond::new("Ready", false, reason, format!("registry: {message}"))
        }
        None if writer.holds(local) => Cond::new(
            "Ready",
            true,
            "Exported",
            format!(
                "exported to the clusterset as site {site}, generation {}: {} endpoints, {} ready",
                writer.generation(key).unwrap_or(0),
                local.endpoints.len(),
                local.endpoints.iter().filter(|e| e.ready).count()
            ),
        ),
        None => Cond::new("Ready", false, "Pending", "not yet written to the registry"),
    };
    let mut conflict = Cond::new("Conflict", false, "NoConflict", "");
    if let Some(merged) = catalog.service(key) {
        let lost: Vec<String> = merged
            .conflicts
            .iter()
            .filter(|c| c.loser_site == site)
            .map(|c| {
                format!(
                    "port {:?}: site {}'s {}/{} wins over this cluster's {}/{} (exported first)",
                    c.port_name,
                    c.winner_site,
                    c.winner.port,
                    c.winner.protocol,
                    c.loser.port,
                    c.loser.protocol
                )
            })
            .collect();
        if !lost.is_empty() {
            conflict = Cond::new("Conflict", true, "PortConflict", lost.join("; "));
        } else if let Some(c) = merged.type_conflicts.iter().find(|c| c.loser_site == site) {
            // The registry's record: this cluster's export lost to an older one's type.
            conflict = Cond::new(
                "Conflict",
                true,
                "TypeConflict",
                format!(
                    "the clusterset has {key} as {} (site {} exported it first), this cluster's Service is {}",
                    TypeConflict::type_name(c.headless),
                    c.winner_site,
                    if local.headless {
                        "headless"
                    } else {
                        "not headless"
                    }
                ),
            );
        } else if merged.headless != local.headless && merged.groups.iter().any(|g| g.site != site)
        {
            // Not yet in the registry as written (the write is on its way).
            conflict = Cond::new(
                "Conflict",
                true,
                "TypeConflict",
                format!(
                    "the clusterset has {key} as {}, this cluster's Service is {}",
                    TypeConflict::type_name(merged.headless),
                    if local.headless {
                        "headless"
                    } else {
                        "not headless"
                    }
                ),
            );
        }
    }
    vec![valid, ready, conflict]
}

async fn apply_import(client: &Client, d: &Desired) -> Result<()> {
    let ns = &d.key.namespace;
    let name = &d.key.name;
    let derived = d.service.name_any();
    let imports: Api<ServiceImport> = Api::namespaced(client.clone(), ns);
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    // Never take over what someone else made.
    if let Some(o) = imports.get_opt(name).await?
        && !managed(&o)
    {
        return Err(anyhow!(
            "ServiceImport {ns}/{name} exists and was not created by meshbridge; left alone"
        ));
    }
    let existing_svc = services.get_opt(&derived).await?;
    if let Some(o) = &existing_svc
        && !managed(o)
    {
        return Err(anyhow!(
            "Service {ns}/{derived} exists and was not created by meshbridge; left alone"
        ));
    }
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let mut spec_import = d.import.clone();
    let status = spec_import.status.take();
    let clusterset = spec_import.spec.type_ == ServiceImportType::ClusterSetIP;
    // Keep the address the import has while its Service exists (a re-apply must not drop it).
    let known_ip = existing_svc
        .as_ref()
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.cluster_ip.clone())
        .filter(|ip| clusterset && ip != "None" && !ip.is_empty());
    spec_import.spec.ips = known_ip.iter().cloned().collect();
    let applied = imports
        .patch(name, &pp, &Patch::Apply(&spec_import))
        .await
        .with_context(|| format!("ServiceImport {ns}/{name}"))?;
    let owner = OwnerReference {
        api_version: "multicluster.x-k8s.io/v1alpha1".into(),
        kind: "ServiceImport".into(),
        name: name.clone(),
        uid: applied.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(false),
    };
    let mut svc = d.service.clone();
    svc.metadata.owner_references = Some(vec![owner.clone()]);
    let svc = services
        .patch(&derived, &pp, &Patch::Apply(&svc))
        .await
        .with_context(|| format!("Service {ns}/{derived}"))?;
    // The EndpointSlices and the status first: the import's address is published last
    // (and so answered by DNS only) once a connection to it has somewhere to go.
    let mut wanted = BTreeSet::new();
    for s in &d.slices {
        let mut s = s.clone();
        s.metadata.owner_references = Some(vec![owner.clone()]);
        let sname = s.name_any();
        slices
            .patch(&sname, &pp, &Patch::Apply(&s))
            .await
            .with_context(|| format!("EndpointSlice {ns}/{sname}"))?;
        wanted.insert(sname);
    }
    let ours = ListParams::default().labels(&format!(
        "{IMPORT_LABEL}={name},{MANAGED_BY_LABEL}={MANAGED_BY}"
    ));
    for s in slices.list(&ours).await? {
        let sname = s.name_any();
        if !wanted.contains(&sname) {
            ok_if_gone(slices.delete(&sname, &DeleteParams::default()).await)
                .with_context(|| format!("EndpointSlice {ns}/{sname}"))?;
        }
    }
    let status_patch = serde_json::json!({
        "apiVersion": "multicluster.x-k8s.io/v1alpha1",
        "kind": "ServiceImport",
        "status": status,
    });
    imports
        .patch_status(name, &pp, &Patch::Apply(&status_patch))
        .await
        .with_context(|| format!("ServiceImport {ns}/{name} status"))?;
    if clusterset {
        let ip = svc
            .spec
            .as_ref()
            .and_then(|s| s.cluster_ip.clone())
            .filter(|ip| ip != "None" && !ip.is_empty());
        if ip != known_ip {
            spec_import.spec.ips = ip.into_iter().collect();
            imports
                .patch(name, &pp, &Patch::Apply(&spec_import))
                .await
                .with_context(|| format!("ServiceImport {ns}/{name} (ips)"))?;
        }
    }
    Ok(())
}

/// Success, or the object is gone already (404): either way nothing is left to do.
fn ok_if_gone<T>(r: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Remove an import and what was derived from it (explicitly: a cluster without a garbage
/// collector keeps nothing behind either).
async fn delete_import(client: &Client, key: &ServiceKey) -> Result<()> {
    let ns = &key.namespace;
    let name = &key.name;
    let derived = import::derived_name(name);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let ours = ListParams::default().labels(&format!(
        "{IMPORT_LABEL}={name},{MANAGED_BY_LABEL}={MANAGED_BY}"
    ));
    for s in slices.list(&ours).await? {
        ok_if_gone(slices.delete(&s.name_any(), &DeleteParams::default()).await)?;
    }
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    if let Some(s) = services.get_opt(&derived).await?
        && managed(&s)
    {
        ok_if_gone(services.delete(&derived, &DeleteParams::default()).await)?;
    }
    let imports: Api<ServiceImport> = Api::namespaced(client.clone(), ns);
    if let Some(i) = imports.get_opt(name).await?
        && managed(&i)
    {
        ok_if_gone(imports.delete(name, &DeleteParams::default()).await)?;
    }
    Ok(())
}

/// Load the identity and build the registry client.
pub async fn registry_client(cfg: &Config) -> Result<RegistryClient> {
    let identity =
        Identity::load(cfg.tls.clone()).context("tls: cannot load the adapter's SVID")?;
    RegistryClient::connect(&cfg.registry, identity)
        .await
        .context("registry")
}
