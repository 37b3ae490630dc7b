#![allow(dead_code)] // shared by tests/kube*.rs; each uses part of it
//! Two Kubernetes clusters (`east`, `west`: real kube-apiservers on one real etcd), a
//! one-node registry, a gateway per site and the adapters, all real processes on
//! 127.0.0.1. The gateways' addresses in the clusters' object model are
//! `10.244.<site>.10`: nothing sends traffic to them in these tests (the data path is
//! tested in network namespaces).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, CustomResourceExt};
use meshbridge_core::client::RegistryClient;
use meshbridge_core::model::Catalog;
use meshbridge_federation::dns;
use meshbridge_federation::files::{DnsFile, GatewayFile};
use meshbridge_federation::kube::config::Config as KubeConfig;
use meshbridge_federation::kube::crd::{ServiceExport, ServiceImport};
use meshbridge_federation::site::Registration;
use meshbridge_federation::source::CatalogSource;
use meshbridge_gateway::config::ImportPorts;
use meshbridge_testkit::kube::{ApiServer, ApiServerOptions, Etcd, User};
use meshbridge_testkit::pki::TestPki;
use meshbridge_testkit::process::{Proc, addr_after};
use tokio::sync::watch;

#[path = "../support/configs.rs"]
mod configs;
use configs::{registry_node, write_config};

pub const TD: &str = "kube.example";
pub const READY: Duration = Duration::from_secs(60);
pub const IMPORT_PORTS: &str = "20000-20999";

/// The binary under test: the one cargo built for this test (or `MESHBRIDGE_BIN`, or the
/// release build, for the benchmark example, which cargo gives no such path).
pub fn exe() -> String {
    option_env!("CARGO_BIN_EXE_meshbridge")
        .map(String::from)
        .or_else(|| std::env::var("MESHBRIDGE_BIN").ok())
        .unwrap_or_else(|| "target/release/meshbridge".into())
}

pub fn free_port() -> u16 {
    meshbridge_testkit::kube::free_port().unwrap()
}

/// The meshbridge binary with `args` and the tests' log filter.
pub fn command(args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(exe());
    cmd.args(args).env(
        "MESHBRIDGE_LOG",
        "info,openraft=warn,hickory_server=warn,hickory_proto=warn,kube=warn,tower=warn,hyper=warn",
    );
    cmd
}

pub fn spawn(name: &str, args: &[&str]) -> Proc {
    Proc::spawn(name, command(args)).unwrap()
}

/// The adapter's RBAC user in each cluster.
pub fn adapter_user(site: &str) -> User {
    User {
        name: "system:serviceaccount:meshbridge:meshbridge-kube-adapter".into(),
        token: format!("adapter-{site}-token-{}", rand::random::<u32>()),
        groups: vec!["system:serviceaccounts".into()],
    }
}

pub struct Cluster {
    pub api: ApiServer,
    pub admin: Client,
}

pub struct Env {
    pub pki: TestPki,
    #[allow(dead_code)] // the 410 test compacts it
    pub etcd: Etcd,
    pub clusters: BTreeMap<&'static str, Cluster>,
    pub registry_url: String,
    pub catalog: watch::Receiver<Arc<Catalog>>,
    registry: Vec<Proc>,
    /// Every node's URL.
    pub registry_urls: Vec<String>,
    gateways: Vec<Proc>,
    pub root: PathBuf,
}

/// A gateway process of `site`, registered as gateway instance `instance`; its import
/// listener binds `bind`. `registry`: the registry's URLs.
pub async fn start_gateway(
    pki: &TestPki,
    registry: &[String],
    site: &str,
    instance: &str,
    bind: &str,
) -> Result<Proc> {
    start_gateway_env(pki, registry, site, instance, bind, &[]).await
}

/// [`start_gateway`] with environment variables (`MESHBRIDGE_*` overrides, say).
pub async fn start_gateway_env(
    pki: &TestPki,
    registry: &[String],
    site: &str,
    instance: &str,
    bind: &str,
    vars: &[(String, String)],
) -> Result<Proc> {
    let files = pki.issue(
        &format!("gw-{instance}"),
        &format!("spiffe://{TD}/site/{site}/gateway"),
    );
    let mut gw =
        meshbridge_gateway::Config::new(site, pki.dir().join(format!("gw-{instance}-data")));
    gw.drain_deadline_ms = 1000;
    gw.tunnel.listen = "127.0.0.1:0".into();
    gw.listeners.import_ports = Some(ImportPorts {
        address: bind
            .parse()
            .with_context(|| format!("gateway address {bind}"))?,
        ports: IMPORT_PORTS
            .parse()
            .map_err(|e| anyhow::anyhow!("{IMPORT_PORTS}: {e}"))?,
    });
    let mut file = GatewayFile::new(gw, files, CatalogSource::registry(registry));
    file.register = Some(Registration {
        region: format!("r-{site}"),
        lease_ttl_ms: 3000,
        instance: Some(instance.into()),
        ..Registration::default()
    });
    let cfg = write_config(&pki.dir().join(format!("gw-{instance}.toml")), &file)?;
    let mut cmd = command(&["gateway", "--config", cfg.to_str().unwrap_or_default()]);
    cmd.envs(vars.iter().map(|(k, v)| (k, v)));
    let mut p = Proc::spawn(&format!("gateway {instance}"), cmd)?;
    p.wait_for("listening on", READY).await?;
    Ok(p)
}

/// The gateway address of `site` in its cluster's object model.
pub fn gateway_ip(site: &str) -> String {
    match site {
        "east" => "10.244.1.10".into(),
        _ => "10.244.2.10".into(),
    }
}

impl Env {
    pub async fn start(sites: &[&'static str], opts: ApiServerOptions) -> Result<Self> {
        Self::start_with(sites, opts, &[]).await
    }

    /// `gateway_addrs`: (site, address) for sites whose gateway is reached at a real
    /// address (its import listener binds it, and the cluster's gateway EndpointSlice names
    /// it); other sites' gateways listen on 127.0.0.1 and appear as `gateway_ip(site)`.
    pub async fn start_with(
        sites: &[&'static str],
        opts: ApiServerOptions,
        gateway_addrs: &[(&str, &str)],
    ) -> Result<Self> {
        let addr_of = |site: &str| {
            gateway_addrs
                .iter()
                .find(|(s, _)| *s == site)
                .map(|(_, a)| a.to_string())
        };
        let etcd = Etcd::start().await?;
        let mut clusters = BTreeMap::new();
        for site in sites {
            let mut o = opts.clone();
            o.users.push(adapter_user(site));
            let api = ApiServer::start(site, &etcd, o).await?;
            let admin = api.client("admin").await?;
            install_crds(&admin).await?;
            for ns in ["meshbridge", "shop"] {
                create_namespace(&admin, ns).await?;
            }
            gateway_service(&admin, &addr_of(site).unwrap_or_else(|| gateway_ip(site))).await?;
            clusters.insert(*site, Cluster { api, admin });
        }
        let pki = TestPki::new(TD);
        let root = pki.dir().to_path_buf();
        // A 3-node registry, as a deployment runs it.
        // Three distinct ports: the test's port window hands them out in turn.
        let urls: Vec<String> = (0..3)
            .map(|_| format!("https://{}", meshbridge_testkit::ports::free_addr()))
            .collect();
        let url = urls[0].clone();
        let mut registry = Vec::new();
        for id in 1..=3 {
            let node = registry_node(&pki, TD, id, &urls)?;
            let cfg = write_config(&root.join(format!("registry-{id}.toml")), &node)?;
            registry.push(spawn(
                &format!("registry {id}"),
                &["registry", "--config", cfg.to_str().unwrap_or_default()],
            ));
        }
        for r in &mut registry {
            r.wait_for("listening on", READY).await?;
        }
        let mut gateways = Vec::new();
        for site in sites {
            let bind = addr_of(site).unwrap_or_else(|| "127.0.0.1".into());
            let p = start_gateway(&pki, &urls, site, &format!("gw-{site}-0"), &bind).await?;
            gateways.push(p);
        }
        let ctl = pki.identity("ctl", &format!("spiffe://{TD}/ctl/test"));
        let client = RegistryClient::connect(&urls, ctl).await?;
        let catalog = client.watch_catalog();
        Ok(Self {
            pki,
            etcd,
            clusters,
            registry_url: url,
            registry_urls: urls,
            catalog,
            registry,
            gateways,
            root,
        })
    }

    pub fn admin(&self, site: &str) -> &Client {
        &self.clusters[site].admin
    }

    /// The adapter's config for `site`: replica `name`, quick leader election and debounce,
    /// admin HTTP on any free loopback port.
    pub fn adapter_config(
        &self,
        site: &str,
        name: &str,
        kubeconfig: &std::path::Path,
    ) -> Result<PathBuf> {
        let files = self.pki.issue(
            &format!("adapter-{name}"),
            &format!("spiffe://{TD}/site/{site}/adapter"),
        );
        let mut cfg = KubeConfig::new(site, TD, &self.registry_urls, files);
        cfg.kubeconfig = Some(kubeconfig.to_path_buf());
        cfg.admin_listen = Some("127.0.0.1:0".into());
        cfg.debounce_ms = 50;
        cfg.import.gateway_service = "meshbridge/meshbridge-gateway".into();
        cfg.import.ports = IMPORT_PORTS
            .parse()
            .map_err(|e| anyhow::anyhow!("{IMPORT_PORTS}: {e}"))?;
        cfg.leader_election.identity = Some(name.into());
        cfg.leader_election.lease_duration_ms = 3000;
        cfg.leader_election.renew_deadline_ms = 2000;
        cfg.leader_election.retry_period_ms = 300;
        write_config(&self.root.join(format!("adapter-{name}.toml")), &cfg)
    }

    /// Start an adapter for `site` as the admin user (RBAC tests use their own user).
    pub async fn adapter(&self, site: &str, name: &str) -> Result<Proc> {
        let kubeconfig = self.clusters[site].api.kubeconfig("admin")?;
        Ok(self.adapter_with(site, name, &kubeconfig).await?.0)
    }

    /// Start an adapter with its own kubeconfig; also returns its admin address.
    pub async fn adapter_with(
        &self,
        site: &str,
        name: &str,
        kubeconfig: &std::path::Path,
    ) -> Result<(Proc, std::net::SocketAddr)> {
        let cfg = self.adapter_config(site, name, kubeconfig)?;
        let mut p = spawn(
            &format!("adapter {name}"),
            &["kube", "--config", cfg.to_str().unwrap_or_default()],
        );
        let line = p.wait_for("kube adapter", READY).await?;
        let admin = addr_after(&line, "admin ")?;
        Ok((p, admin))
    }

    /// Wait (event-driven, on the registry's watch stream) until `pred` holds.
    pub async fn until_catalog(
        &self,
        what: &str,
        within: Duration,
        pred: impl Fn(&Catalog) -> bool,
    ) -> Result<Duration> {
        let start = Instant::now();
        let mut rx = self.catalog.clone();
        let r = tokio::time::timeout(within, rx.wait_for(|c| pred(c)))
            .await
            .map(|r| r.is_ok());
        match r {
            Ok(true) => Ok(start.elapsed()),
            Ok(false) => bail!("{what}: catalog watch ended"),
            Err(_) => bail!(
                "{what}: not within {within:?}; catalog: {:?}",
                self.catalog.borrow().exports.keys().collect::<Vec<_>>()
            ),
        }
    }

    /// Start `meshbridge dns` for `site` (from the registry), on a free loopback port.
    pub async fn start_dns(&self, site: &str) -> Result<(Proc, std::net::SocketAddr)> {
        let files = self.pki.issue(
            &format!("dns-{site}"),
            &format!("spiffe://{TD}/site/{site}/dns"),
        );
        let mut file = DnsFile::new(
            dns::Config::for_test(site),
            CatalogSource::registry(&self.registry_urls),
        );
        file.tls = Some(files);
        let cfg = write_config(&self.root.join(format!("dns-{site}.toml")), &file)?;
        let mut p = spawn(
            "dns",
            &["dns", "--config", cfg.to_str().unwrap_or_default()],
        );
        let line = p.wait_for("listening on", READY).await?;
        let addr = addr_after(&line, "listening on ")?;
        Ok((p, addr))
    }

    pub async fn stop(mut self) {
        for g in &mut self.gateways {
            g.terminate(Duration::from_secs(5)).await;
        }
        for r in &mut self.registry {
            r.terminate(Duration::from_secs(5)).await;
        }
    }
}

pub async fn install_crds(client: &Client) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in [ServiceExport::crd(), ServiceImport::crd()] {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.create(&PostParams::default(), &crd)
            .await
            .with_context(|| format!("CRD {name}"))?;
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(api.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .with_context(|| format!("CRD {name} not established"))??;
    }
    Ok(())
}

pub async fn create_namespace(client: &Client, name: &str) -> Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    api.create(&PostParams::default(), &ns).await?;
    Ok(())
}

/// The gateways' Service and the EndpointSlice a controller would have written for it.
async fn gateway_service(client: &Client, ip: &str) -> Result<()> {
    let svc = service("meshbridge-gateway", false, &[("tunnel", 15443, 15443)]);
    Api::<Service>::namespaced(client.clone(), "meshbridge")
        .create(&PostParams::default(), &svc)
        .await?;
    let slice = endpoint_slice(
        "meshbridge-gateway",
        "meshbridge-gateway-1",
        &[(ip, Some(true), None, None, None)],
        &[("tunnel", 15443)],
    );
    Api::<EndpointSlice>::namespaced(client.clone(), "meshbridge")
        .create(&PostParams::default(), &slice)
        .await?;
    Ok(())
}

/// A Service with `ports` = (name, port, targetPort).
pub fn service(name: &str, headless: bool, ports: &[(&str, i32, i32)]) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: headless.then(|| "None".into()),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p, t)| ServicePort {
                        name: Some((*n).into()),
                        port: *p,
                        target_port: Some(
                            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(*t),
                        ),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An endpoint: (address, ready, serving, terminating, hostname).
pub type Ep<'a> = (
    &'a str,
    Option<bool>,
    Option<bool>,
    Option<bool>,
    Option<&'a str>,
);

pub fn endpoint_slice(
    service: &str,
    name: &str,
    endpoints: &[Ep<'_>],
    ports: &[(&str, i32)],
) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_string(),
                service.to_string(),
            )])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(
            endpoints
                .iter()
                .map(|(a, ready, serving, terminating, host)| Endpoint {
                    addresses: vec![(*a).into()],
                    conditions: Some(EndpointConditions {
                        ready: *ready,
                        serving: *serving,
                        terminating: *terminating,
                    }),
                    hostname: host.map(String::from),
                    ..Default::default()
                })
                .collect(),
        ),
        ports: Some(
            ports
                .iter()
                .map(|(n, p)| EndpointPort {
                    name: Some((*n).into()),
                    port: Some(*p),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}

pub fn service_export(name: &str) -> ServiceExport {
    ServiceExport {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Default::default(),
        status: None,
    }
}

/// Create Service `name` (port http 80 → 8080), one EndpointSlice with `ips` ready, and
/// its ServiceExport, in `shop`.
pub async fn export_service(client: &Client, name: &str, ips: &[&str]) -> Result<()> {
    Api::<Service>::namespaced(client.clone(), "shop")
        .create(
            &PostParams::default(),
            &service(name, false, &[("http", 80, 8080)]),
        )
        .await?;
    let eps: Vec<Ep<'_>> = ips
        .iter()
        .map(|ip| (*ip, Some(true), None, None, None))
        .collect();
    Api::<EndpointSlice>::namespaced(client.clone(), "shop")
        .create(
            &PostParams::default(),
            &endpoint_slice(name, &format!("{name}-1"), &eps, &[("http", 8080)]),
        )
        .await?;
    Api::<ServiceExport>::namespaced(client.clone(), "shop")
        .create(&PostParams::default(), &service_export(name))
        .await?;
    Ok(())
}

/// The addresses `site` exports for shop/`name`, sorted, or None when it exports nothing.
pub fn exported(c: &Catalog, site: &str, name: &str) -> Option<Vec<String>> {
    let e = c.exports.get(&(
        meshbridge_core::model::ServiceKey::new("shop", name),
        site.to_string(),
    ))?;
    let mut v: Vec<String> = e.endpoints.iter().map(|e| e.address.to_string()).collect();
    v.sort();
    Some(v)
}

/// Create EndpointSlice `name` of `service` in `shop`.
pub async fn add_slice(
    client: &Client,
    service: &str,
    name: &str,
    endpoints: &[Ep<'_>],
    ports: &[(&str, i32)],
) -> Result<()> {
    Api::<EndpointSlice>::namespaced(client.clone(), "shop")
        .create(
            &PostParams::default(),
            &endpoint_slice(service, name, endpoints, ports),
        )
        .await?;
    Ok(())
}

// (Not every test binary that includes this file uses both.)
#[allow(unused_imports)]
pub use meshbridge_testkit::probe::{dig_a, eventually};
