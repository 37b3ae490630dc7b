//! Test support: a development PKI, in-process registry clusters on loopback with real
//! sockets, real mTLS and real redb files, and model builders.

#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

pub mod proxy;

/// The one linearizability checker, shared with the process-level tests.
pub use meshbridge_testkit::linearizability as history;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshbridge_core::client::{ClientOptions, RegistryClient};
use meshbridge_core::model::{
    Endpoint, Export, Locality, Port, Protocol, ServiceKey, SiteKind, SiteSpec,
};
use meshbridge_core::tls::Identity;
use meshbridge_registry::types::NodeId;
use meshbridge_registry::{Config, Node, NodeHandle};
use meshbridge_testkit::pki::TestPki;
use tempfile::TempDir;

pub const TD: &str = "test.example";

/// Logs to the test's captured output; `RUST_LOG` picks the level (default `warn`).
pub fn init_tracing() {
    meshbridge_core::install_crypto_provider();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_test_writer()
        .try_init();
}

/// A CA and identities issued from it, as files in a temp dir (testkit's [`TestPki`] of
/// this suite's trust domain).
pub struct Pki(TestPki);

impl Pki {
    pub fn new() -> Self {
        init_tracing();
        Self(TestPki::new(TD))
    }

    /// Where the identities are issued.
    pub fn dir(&self) -> &std::path::Path {
        self.0.dir()
    }

    /// Issues `id` into `<dir>/<name>/` and returns the directory.
    pub fn issue(&self, id: &str, name: &str) -> PathBuf {
        self.0.issue(name, id);
        self.0.dir().join(name)
    }

    pub fn identity(&self, id: &str, name: &str) -> Arc<Identity> {
        self.0.identity(name, id)
    }

    pub fn ctl(&self) -> Arc<Identity> {
        self.identity(&format!("spiffe://{TD}/ctl/admin"), "ctl")
    }

    pub fn site(&self, site: &str) -> Arc<Identity> {
        self.identity(
            &format!("spiffe://{TD}/site/{site}/gateway"),
            &format!("site-{site}"),
        )
    }
}

/// Free loopback ports for nodes (see `meshbridge_testkit::ports`: never in the kernel's
/// ephemeral range, so no other process takes one while a killed node is down).
pub fn free_addrs(n: usize) -> Vec<SocketAddr> {
    (0..n)
        .map(|_| meshbridge_testkit::ports::free_addr())
        .collect()
}

/// A registry cluster in this process. Nodes can be killed and restarted from their data
/// directories.
pub struct Cluster {
    pub pki: Pki,
    pub data: TempDir,
    pub configs: BTreeMap<NodeId, Config>,
    pub nodes: BTreeMap<NodeId, NodeHandle>,
    /// Fault proxies between nodes (see [`Cluster::start_with_links`]).
    pub links: Option<proxy::Links>,
}

impl Cluster {
    /// Starts `n` nodes (ids 1..=n) with test configs adjusted by `tweak`, and waits for a
    /// leader.
    pub async fn start(n: usize, tweak: impl Fn(&mut Config)) -> Self {
        Self::build(n, tweak, false).await
    }

    /// Like [`Cluster::start`], with node-to-node traffic going through fault proxies
    /// ([`proxy::Links`]) so that nodes can be partitioned. Clients dial nodes directly.
    pub async fn start_with_links(n: usize, tweak: impl Fn(&mut Config)) -> Self {
        Self::build(n, tweak, true).await
    }

    async fn build(n: usize, tweak: impl Fn(&mut Config), with_links: bool) -> Self {
        let pki = Pki::new();
        let data = tempfile::tempdir().unwrap();
        let addrs = free_addrs(n);
        let members: BTreeMap<NodeId, String> = (1..=n as NodeId)
            .zip(&addrs)
            .map(|(id, a)| (id, format!("https://{a}")))
            .collect();
        let links = if with_links {
            let by_id = (1..=n as NodeId).zip(addrs.iter().copied()).collect();
            Some(proxy::Links::new(&by_id).await)
        } else {
            None
        };
        let mut configs = BTreeMap::new();
        for (id, addr) in (1..=n as NodeId).zip(&addrs) {
            let tls = pki.issue(
                &format!("spiffe://{TD}/registry/{id}"),
                &format!("node-{id}"),
            );
            let mut config = Config::for_test(
                id,
                *addr,
                data.path().join(format!("node-{id}")),
                tls,
                &members,
            );
            if let Some(links) = &links {
                config.raft.dial_overrides = links.overrides_for(id);
            }
            tweak(&mut config);
            configs.insert(id, config);
        }
        let mut cluster = Self {
            pki,
            data,
            configs,
            nodes: BTreeMap::new(),
            links,
        };
        for id in 1..=n as NodeId {
            cluster.restart(id).await;
        }
        cluster.wait_leader(Duration::from_secs(20)).await;
        cluster
    }

    pub fn urls(&self) -> Vec<String> {
        self.configs
            .values()
            .map(|c| format!("https://{}", c.listen))
            .collect()
    }

    pub fn url(&self, id: NodeId) -> String {
        format!("https://{}", self.configs[&id].listen)
    }

    pub fn node(&self, id: NodeId) -> &NodeHandle {
        &self.nodes[&id]
    }

    /// (Re)starts node `id` from its data directory.
    pub async fn restart(&mut self, id: NodeId) {
        assert!(!self.nodes.contains_key(&id), "node {id} is running");
        let config = self.configs[&id].clone();
        let identity = Identity::load(config.tls.clone()).unwrap();
        // The port was just released by the previous incarnation; retry briefly.
        let deadline = Instant::now() + Duration::from_secs(5);
        let handle = loop {
            match Node::start(config.clone(), identity.clone()).await {
                Ok(h) => break h,
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!(error = %e, "node start failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("node {id}: {e}"),
            }
        };
        self.nodes.insert(id, handle);
    }

    /// Kills node `id` as `kill -9` would: log writes not yet committed are lost (the
    /// writer's fault hook, [`NodeHandle::crash`]), connections fail, Raft stops where it
    /// is, the store closes.
    pub async fn kill(&mut self, id: NodeId) {
        let node = self.nodes.remove(&id).expect("running");
        node.crash().await;
    }

    /// The leader among running nodes, once every running node agrees on it.
    pub async fn wait_leader(&self, timeout: Duration) -> NodeId {
        let deadline = Instant::now() + timeout;
        loop {
            let leaders: Vec<Option<NodeId>> = self
                .nodes
                .values()
                .map(|n| n.raft_metrics().current_leader)
                .collect();
            if let Some(Some(l)) = leaders.first()
                && leaders.iter().all(|x| *x == Some(*l))
                && self.nodes.contains_key(l)
            {
                return *l;
            }
            assert!(Instant::now() < deadline, "no agreed leader: {leaders:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every running node has applied `revision`.
    pub async fn wait_revision(&self, revision: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let revs: Vec<(NodeId, u64)> = self
                .nodes
                .iter()
                .map(|(id, n)| (*id, n.catalog().revision))
                .collect();
            if revs.iter().all(|(_, r)| *r >= revision) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "revision {revision} not reached: {revs:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn client_as(&self, identity: Arc<Identity>) -> RegistryClient {
        let opts = ClientOptions {
            retry_deadline: Duration::from_secs(20),
            ..ClientOptions::default()
        };
        RegistryClient::with_options(&self.urls(), identity, opts)
            .await
            .unwrap()
    }

    /// A client with an operator identity, to every node.
    pub async fn admin(&self) -> RegistryClient {
        self.client_as(self.pki.ctl()).await
    }

    /// A client with the gateway identity of `site`, to every node.
    pub async fn site(&self, site: &str) -> RegistryClient {
        self.client_as(self.pki.site(site)).await
    }

    /// A client that talks to node `id` only.
    pub async fn admin_of(&self, id: NodeId) -> RegistryClient {
        RegistryClient::connect(&[self.url(id)], self.pki.ctl())
            .await
            .unwrap()
    }

    pub async fn shutdown(mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            if let Some(n) = self.nodes.remove(&id) {
                n.shutdown().await;
            }
        }
    }
}

pub fn spec(name: &str, region: &str, zone: &str) -> SiteSpec {
    SiteSpec {
        name: name.into(),
        kind: SiteKind::Cluster,
        locality: Locality {
            region: region.into(),
            zone: zone.into(),
        },
        gateways: vec![format!("{name}.gw.example:15443")],
        lease_ttl_ms: 60_000,
        grace_ms: 600_000,
        instance: String::new(),
    }
}

pub fn key(name: &str) -> ServiceKey {
    ServiceKey::new("shop", name)
}

pub fn export(site: &str, service: &str, generation: u64, addrs: &[&str]) -> Export {
    Export {
        site: site.into(),
        service: key(service),
        generation,
        ports: vec![Port {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Tcp,
            target_port: 8080,
            app_protocol: None,
        }],
        endpoints: addrs
            .iter()
            .map(|a| Endpoint {
                address: a.parse().unwrap(),
                hostname: None,
                ready: true,
                weight: 1,
                identity: None,
                zone: None,
            })
            .collect(),
        headless: false,
        created_revision: 0,
        updated_revision: 0,
    }
}

/// The catalog without registry-side fencing state (watch replicas do not carry it).
pub fn visible(c: &meshbridge_core::model::Catalog) -> meshbridge_core::model::Catalog {
    let mut c = c.clone();
    c.export_tombstones.clear();
    c.clock_ms = 0;
    c
}

/// The Prometheus text of a node's admin `/metrics`.
pub async fn metrics(addr: SocketAddr) -> String {
    meshbridge_testkit::http::get(addr, "/metrics")
        .await
        .expect("the admin port answers")
}

/// The value of a metric line that starts with `series` (name and labels), if present.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}
