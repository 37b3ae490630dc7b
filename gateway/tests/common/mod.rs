//! Harness for gateway component tests: a dev PKI, catalogs fed through a watch channel,
//! gateways on 127.0.0.1 port 0, echo servers, deterministic payloads.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use meshbridge_core::model::{
    Catalog, Endpoint, Export, Locality, Policy, Port, Principal, Protocol, ServiceKey, Site,
    SiteKind, SiteState,
};
use meshbridge_core::tls::Identity;
use meshbridge_gateway::{Config, Gateway, GatewayHandle, TransportKind};
use meshbridge_testkit::pki::TestPki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub const TD: &str = "corp.example";
pub const WAIT: Duration = Duration::from_secs(10);

/// Run `$body` (an async fn taking a `TransportKind`) once per transport.
#[macro_export]
macro_rules! both_transports {
    ($name:ident) => {
        mod $name {
            use meshbridge_gateway::TransportKind;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn quic() {
                super::$name(TransportKind::Quic).await.unwrap();
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tcp() {
                super::$name(TransportKind::Tcp).await.unwrap();
            }
        }
    };
}

/// A /24 of VIPs no other gateway on this machine uses, so tests running in parallel
/// processes never share a listener address.
pub fn vip_range() -> String {
    let n = meshbridge_testkit::slots::take("vip-127.241", 256);
    format!("127.241.{n}.0/24")
}

pub fn init() {
    meshbridge_core::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A site of the test mesh.
#[derive(Clone, Debug)]
pub struct SiteSpec {
    pub name: String,
    pub region: String,
    pub zone: String,
}

pub fn site(name: &str, region: &str, zone: &str) -> SiteSpec {
    SiteSpec {
        name: name.into(),
        region: region.into(),
        zone: zone.into(),
    }
}

/// The catalog a test edits, and the channel that feeds it to every gateway.
pub struct Feed {
    tx: Mutex<Option<watch::Sender<Arc<Catalog>>>>,
    catalog: Mutex<Catalog>,
}

impl Feed {
    pub fn new() -> Self {
        Self {
            tx: Mutex::new(Some(watch::channel(Arc::new(Catalog::default())).0)),
            catalog: Mutex::new(Catalog::default()),
        }
    }

    /// A receiver of the feed; once the feed is closed, one whose source is gone.
    pub fn rx(&self) -> watch::Receiver<Arc<Catalog>> {
        match &*self.tx.lock().unwrap() {
            Some(tx) => tx.subscribe(),
            None => watch::channel(Arc::new(Catalog::default())).1,
        }
    }

    /// The catalog source goes away (registry unreachable): every receiver sees it closed.
    pub fn close(&self) {
        self.tx.lock().unwrap().take();
    }

    /// Change the catalog and publish it at the next revision.
    pub fn edit(&self, f: impl FnOnce(&mut Catalog)) {
        let mut c = self.catalog.lock().unwrap();
        f(&mut c);
        c.revision += 1;
        if let Some(tx) = &*self.tx.lock().unwrap() {
            tx.send_replace(Arc::new(c.clone()));
        }
    }

    pub fn set_site(&self, s: &SiteSpec, gateway: Option<SocketAddr>) {
        let site = Site {
            name: s.name.clone(),
            kind: SiteKind::Cluster,
            locality: Locality {
                region: s.region.clone(),
                zone: s.zone.clone(),
            },
            gateways: gateway.map(|g| vec![g.to_string()]).unwrap_or_default(),
            lease_ttl_ms: 10_000,
            grace_ms: 600_000,
            last_heartbeat_ms: 1,
            state: SiteState::Fresh,
            created_revision: 1,
            links: Vec::new(),
            instances: Vec::new(),
            xds_rejections: Vec::new(),
        };
        self.edit(|c| {
            c.sites.insert(s.name.clone(), Arc::new(site));
        });
    }

    /// Export `ns/name` from `site`: service port `port` → each endpoint's port.
    pub fn export(&self, site: &str, key: &ServiceKey, port: u16, endpoints: &[SocketAddr]) {
        let target_port = endpoints.first().map(|e| e.port()).unwrap_or(1);
        let export = Export {
            site: site.into(),
            service: key.clone(),
            generation: 1,
            ports: vec![Port {
                name: "tcp".into(),
                port,
                protocol: Protocol::Tcp,
                target_port,
                app_protocol: None,
            }],
            endpoints: endpoints
                .iter()
                .map(|e| Endpoint {
                    address: e.ip(),
                    hostname: None,
                    ready: true,
                    weight: 1,
                    identity: None,
                    zone: None,
                })
                .collect(),
            headless: false,
            created_revision: 1,
            updated_revision: 1,
        };
        self.edit(|c| {
            c.exports.insert(export.key(), Arc::new(export));
        });
    }

    pub fn set_ready(&self, site: &str, key: &ServiceKey, ready: bool) {
        self.edit(|c| {
            let k = (key.clone(), site.to_string());
            let mut e = (**c.exports.get(&k).unwrap()).clone();
            for ep in &mut e.endpoints {
                ep.ready = ready;
            }
            e.generation += 1;
            c.exports.insert(k, Arc::new(e));
        });
    }

    pub fn policy(&self, name: &str, key: &ServiceKey, allow: Vec<Principal>) {
        let p = Policy {
            name: name.into(),
            service: key.clone(),
            allow,
        };
        self.edit(|c| {
            c.policies.insert(name.into(), Arc::new(p));
        });
    }

    pub fn revision(&self) -> u64 {
        self.catalog.lock().unwrap().revision
    }

    /// Wait until every gateway uses the current catalog.
    pub async fn synced(&self, gateways: &[&GatewayHandle]) {
        let rev = self.revision();
        for g in gateways {
            assert!(
                g.wait_for_revision(rev, WAIT).await,
                "catalog revision {rev} not reached"
            );
        }
    }

    pub fn snapshot(&self) -> Catalog {
        self.catalog.lock().unwrap().clone()
    }
}

/// A dev PKI, a catalog feed and the gateways of one test.
pub struct Mesh {
    pub pki: TestPki,
    pub feed: Feed,
    pub transport: TransportKind,
    pub data: tempfile::TempDir,
}

impl Mesh {
    pub fn new(transport: TransportKind) -> Self {
        init();
        Self {
            pki: TestPki::new(TD),
            feed: Feed::new(),
            transport,
            data: tempfile::tempdir().unwrap(),
        }
    }

    pub fn identity(&self, site: &str) -> Arc<Identity> {
        self.pki.identity(
            &format!("gw-{site}"),
            &format!("spiffe://{TD}/site/{site}/gateway"),
        )
    }

    pub fn data_dir(&self, site: &str) -> PathBuf {
        self.data.path().join(site)
    }

    /// A test config for `site` with the mesh's transport and every local listener on.
    pub fn config(&self, site: &str) -> Config {
        let mut c = Config::for_test(site, self.data_dir(site));
        c.tunnel.transport = self.transport;
        c.listeners.vip_range = Some(vip_range().parse().unwrap());
        c.listeners.sni = Some("127.0.0.1:0".into());
        c.listeners.connect = Some("127.0.0.1:0".into());
        c
    }

    /// Start a gateway for `s` and register the site with its tunnel address.
    pub async fn gateway(&self, s: &SiteSpec) -> Result<GatewayHandle> {
        self.gateway_with(s, self.config(&s.name), self.identity(&s.name))
            .await
    }

    pub async fn gateway_with(
        &self,
        s: &SiteSpec,
        cfg: Config,
        identity: Arc<Identity>,
    ) -> Result<GatewayHandle> {
        let gw = Gateway::start(cfg, identity, self.feed.rx()).await?;
        self.feed.set_site(s, Some(gw.tunnel_addr()));
        Ok(gw)
    }
}

/// A TCP echo server; replies are prefixed with nothing, so payloads come back as sent.
/// `tag` is written first on each connection when set (to tell servers apart).
pub struct Echo {
    pub addr: SocketAddr,
    tasks: JoinSet<()>,
}

impl Echo {
    pub async fn start(tag: Option<&'static str>) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((mut s, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Some(tag) = tag
                        && s.write_all(tag.as_bytes()).await.is_err()
                    {
                        return;
                    }
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Ok(Self { addr, tasks })
    }

    /// Stop listening and close every connection (later connects are refused).
    pub async fn stop(&mut self) {
        self.tasks.shutdown().await;
    }
}

/// Byte `i` of the test payload: a xorshift stream, so any corruption or reordering shows.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Write `total` bytes through `stream` while reading the echo back; checks every byte.
pub async fn echo_transfer(stream: TcpStream, total: usize, seed: u64) -> Result<()> {
    const CHUNK: usize = 1 << 20;
    let block = pattern(seed, CHUNK);
    let (mut r, mut w) = stream.into_split();
    let writer = async move {
        let mut sent = 0;
        while sent < total {
            let n = CHUNK.min(total - sent);
            w.write_all(&block[..n]).await?;
            sent += n;
        }
        w.shutdown().await?;
        anyhow::Ok(())
    };
    let check = pattern(seed, CHUNK);
    let reader = async move {
        let mut got = 0usize;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            for (i, b) in buf[..n].iter().enumerate() {
                let pos = got + i;
                if *b != check[pos % CHUNK] {
                    bail!("byte {pos} differs");
                }
            }
            got += n;
        }
        if got != total {
            bail!("received {got} of {total} bytes");
        }
        anyhow::Ok(())
    };
    tokio::try_join!(writer, reader)?;
    Ok(())
}

/// One round trip: send `msg`, expect it back (after `tag` when the server has one).
pub async fn ping(addr: SocketAddr, tag: &str, msg: &[u8]) -> Result<()> {
    let mut s = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    s.write_all(msg).await?;
    let mut buf = vec![0u8; tag.len() + msg.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .context("echo timed out")??;
    if buf != [tag.as_bytes(), msg].concat() {
        bail!("unexpected reply {:?}", String::from_utf8_lossy(&buf));
    }
    Ok(())
}

/// Connect and read the server's tag (the first `len` bytes).
pub async fn which_server(addr: SocketAddr, len: usize) -> Result<String> {
    let mut s = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    let mut buf = vec![0u8; len];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .context("no tag")??;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Send an HTTP CONNECT head and return the status line and the stream.
pub async fn http_connect(proxy: SocketAddr, authority: &str) -> Result<(String, TcpStream)> {
    let mut s = TcpStream::connect(proxy).await?;
    s.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut byte))
            .await
            .context("no CONNECT response")??;
        if n == 0 {
            break;
        }
        head.push(byte[0]);
        if head.len() > 8192 {
            bail!("response head too long");
        }
    }
    let text = String::from_utf8_lossy(&head);
    let status = text.lines().next().unwrap_or_default().to_string();
    Ok((status, s))
}

/// A plain HTTP GET on the admin listener.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    meshbridge_testkit::http::get(addr, path)
        .await
        .context("the admin listener did not answer")
}

/// Wait (bounded) until the gateway has no connection or stream in flight.
pub async fn idle(g: &GatewayHandle) {
    for _ in 0..500 {
        if g.inflight() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("gateway still has {} in flight", g.inflight());
}

pub fn key(name: &str) -> ServiceKey {
    ServiceKey::new("demo", name)
}

pub fn localhost(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::from([127, 0, 0, 1]), port)
}

pub type Tags = BTreeMap<String, usize>;

/// `demo/echo` on `port` exported by the sites "near" (endpoint `near_ep`) and "far"
/// (`far_ep`); waits until `gateways` have the catalog and returns west's service listener.
pub async fn export_near_and_far(
    mesh: &Mesh,
    port: u16,
    (near_ep, far_ep): (SocketAddr, SocketAddr),
    west: &GatewayHandle,
    gateways: &[&GatewayHandle],
) -> Result<SocketAddr> {
    mesh.feed.export("near", &key("echo"), port, &[near_ep]);
    mesh.feed.export("far", &key("echo"), port, &[far_ep]);
    mesh.feed.synced(gateways).await;
    west.service_addr(&key("echo"), port, WAIT)
        .await
        .context("no service listener")
}
