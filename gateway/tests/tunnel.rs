//! Two gateways, "east" and "west", on loopback with an echo server behind east: a client at
//! west reaches it through a service listener, SNI passthrough and HTTP CONNECT, over QUIC
//! and over the TCP fallback.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use common::*;
use meshbridge_core::id::SpiffeId;
use meshbridge_core::tls::{AllowList, Identity};
use meshbridge_gateway::TransportKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ECHO_PORT: u16 = 7001;

/// east with an echo server exporting demo/echo:7001, and west.
async fn east_west(
    t: TransportKind,
) -> Result<(
    Mesh,
    meshbridge_gateway::GatewayHandle,
    meshbridge_gateway::GatewayHandle,
    Echo,
)> {
    let mesh = Mesh::new(t);
    let echo = Echo::start(None).await?;
    let east = mesh.gateway(&site("east", "r1", "a")).await?;
    let west = mesh.gateway(&site("west", "r2", "b")).await?;
    mesh.feed
        .export("east", &key("echo"), ECHO_PORT, &[echo.addr]);
    mesh.feed.synced(&[&east, &west]).await;
    Ok((mesh, east, west, echo))
}

async fn service_listener_reaches_echo(t: TransportKind) -> Result<()> {
    let (_mesh, _east, west, _echo) = east_west(t).await?;
    let vip = west
        .service_addr(&key("echo"), ECHO_PORT, WAIT)
        .await
        .context("no service listener")?;
    assert!(vip.ip().to_string().starts_with("127.241."), "{vip}");
    ping(vip, "", b"hello through the tunnel").await?;
    ping(vip, "", b"second connection, same link").await?;
    let peers = west.peers();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert!(peers[0].connected && peers[0].site == "east");
    let want = match t {
        TransportKind::Tcp => "tcp",
        _ => "quic",
    };
    assert_eq!(peers[0].transport, Some(want));
    Ok(())
}
both_transports!(service_listener_reaches_echo);

async fn http_connect_reaches_echo_and_reports_errors(t: TransportKind) -> Result<()> {
    let (_mesh, _east, west, _echo) = east_west(t).await?;
    let proxy = west.connect_addr().context("no CONNECT listener")?;
    let (status, mut s) = http_connect(proxy, "echo.demo.svc.clusterset.local:7001").await?;
    assert_eq!(status, "HTTP/1.1 200 OK");
    s.write_all(b"via connect").await?;
    let mut buf = [0u8; 11];
    s.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"via connect");
    let (status, _) = http_connect(proxy, "nothere.demo.svc.clusterset.local:7001").await?;
    assert!(status.starts_with("HTTP/1.1 503"), "{status}");
    let (status, _) = http_connect(proxy, "example.com:443").await?;
    assert!(status.starts_with("HTTP/1.1 400"), "{status}");
    Ok(())
}
both_transports!(http_connect_reaches_echo_and_reports_errors);

/// A TLS echo server requiring client certificates; remembers each client's SPIFFE id.
async fn tls_echo(identity: Arc<Identity>) -> Result<(SocketAddr, Arc<Mutex<Vec<String>>>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let acceptor =
        tokio_rustls::TlsAcceptor::from(Arc::new(identity.server_config(AllowList::any(), &[])));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let seen = seen2.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let id = meshbridge_core::tls::peer_id(tls.get_ref().1.peer_certificates());
                seen.lock()
                    .unwrap()
                    .push(id.map(|i| i.to_string()).unwrap_or_default());
                let (mut r, mut w) = tokio::io::split(tls);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok((addr, seen))
}

async fn sni_passthrough_keeps_end_to_end_mtls(t: TransportKind) -> Result<()> {
    let (mesh, _east, west, _echo) = east_west(t).await?;
    let server_id = mesh
        .pki
        .identity("ledger", &format!("spiffe://{TD}/ns/demo/sa/ledger"));
    let client_id = mesh
        .pki
        .identity("web", &format!("spiffe://{TD}/ns/shop/sa/web"));
    let (tls_addr, seen) = tls_echo(server_id).await?;
    mesh.feed.export("east", &key("ledger"), 8443, &[tls_addr]);
    let sni = west.sni_addr().context("no SNI listener")?;
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(client_id.client_config(AllowList::any(), &[])));
    // The MCS names, and what an Istio sidecar sends with no meshbridge configuration:
    // `cluster.local`, with or without a subset (which is ignored).
    let names = [
        "ledger.demo.svc.clusterset.local",
        "outbound_.8443_._.ledger.demo.svc.clusterset.local",
        "outbound_.8443_._.ledger.demo.svc.cluster.local",
        "outbound_.8443_.v2_.ledger.demo.svc.cluster.local",
    ];
    for name in names {
        let tcp = TcpStream::connect(sni).await?;
        let server_name = rustls_pki_types::ServerName::try_from(name.to_string())?;
        let mut tls = connector.connect(server_name, tcp).await.context(name)?;
        let server = meshbridge_core::tls::peer_id(tls.get_ref().1.peer_certificates());
        assert_eq!(
            server,
            Some(SpiffeId::parse(&format!(
                "spiffe://{TD}/ns/demo/sa/ledger"
            ))?),
            "the client talks TLS with the server itself, not with a gateway"
        );
        tls.write_all(b"secret").await?;
        let mut buf = [0u8; 6];
        tls.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"secret");
    }
    let seen = seen.lock().unwrap().clone();
    let web = format!("spiffe://{TD}/ns/shop/sa/web");
    assert_eq!(
        seen,
        vec![web; names.len()],
        "server saw the client's own certificate"
    );
    Ok(())
}
both_transports!(sni_passthrough_keeps_end_to_end_mtls);

/// A server that reads everything until the client's FIN, then answers `reply` bytes and
/// closes; how many bytes it read.
async fn sink(reply: usize) -> Result<(SocketAddr, tokio::sync::oneshot::Receiver<usize>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let mut got = Vec::new();
        if s.read_to_end(&mut got).await.is_ok() {
            let _ = s.write_all(&vec![b'r'; reply]).await;
            let _ = s.shutdown().await;
            let _ = tx.send(got.len());
        }
    });
    Ok((addr, rx))
}

/// The ClientHello that the SNI listener reads before it knows where to go travels to the
/// receiving gateway with the preamble; both gateways must count it as what it is: bytes from
/// the client towards the server.
async fn sni_bytes_are_counted_in_the_direction_they_flow(t: TransportKind) -> Result<()> {
    let mesh = Mesh::new(t);
    let mut cfg = mesh.config("east");
    cfg.admin_listen = Some("127.0.0.1:0".into());
    let east = mesh
        .gateway_with(&site("east", "r1", "a"), cfg, mesh.identity("east"))
        .await?;
    let mut cfg = mesh.config("west");
    cfg.admin_listen = Some("127.0.0.1:0".into());
    let west = mesh
        .gateway_with(&site("west", "r2", "b"), cfg, mesh.identity("west"))
        .await?;
    let (server, read) = sink(1000).await?;
    mesh.feed.export("east", &key("ledger"), 8443, &[server]);
    mesh.feed.synced(&[&east, &west]).await;

    // A real ClientHello (rustls), then more bytes, then FIN.
    let client_id = mesh
        .pki
        .identity("web", &format!("spiffe://{TD}/ns/shop/sa/web"));
    let config = Arc::new(client_id.client_config(AllowList::any(), &[]));
    let name = rustls_pki_types::ServerName::try_from("ledger.demo.svc.clusterset.local")?;
    let mut hello = Vec::new();
    rustls::ClientConnection::new(config, name)?.write_tls(&mut hello)?;
    let tail = b"and then some application bytes";
    let mut s = TcpStream::connect(west.sni_addr().context("no SNI listener")?).await?;
    s.write_all(&hello).await?;
    s.write_all(tail).await?;
    s.shutdown().await?;
    let mut reply = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut reply))
        .await
        .context("no reply")??;
    let sent = hello.len() + tail.len();
    assert_eq!(
        read.await?,
        sent,
        "the server got every byte the client sent"
    );
    assert_eq!(reply.len(), 1000);
    idle(&west).await;
    idle(&east).await;
    for (g, me, peer, direction) in [
        (&west, "west", "east", "outgoing"),
        (&east, "east", "west", "incoming"),
    ] {
        let admin = g.admin_addr().context("no admin listener")?;
        let metrics = http_get(admin, "/metrics").await?;
        // Outgoing: "sent" is towards the peer (the client's bytes); incoming: "sent" is
        // back to the peer (the server's answer).
        let (sent_flow, received_flow) = match direction {
            "outgoing" => (sent, 1000),
            _ => (1000, sent),
        };
        for (flow, n) in [("sent", sent_flow), ("received", received_flow)] {
            let want = format!(
                "meshbridge_gateway_bytes_total{{site=\"{me}\",peer_site=\"{peer}\",direction=\"{direction}\",flow=\"{flow}\"}} {n}\n"
            );
            assert!(metrics.contains(&want), "{me}: {want} missing:\n{metrics}");
        }
    }
    Ok(())
}
both_transports!(sni_bytes_are_counted_in_the_direction_they_flow);

async fn large_transfers_arrive_intact_both_ways(t: TransportKind) -> Result<()> {
    let (_mesh, _east, west, _echo) = east_west(t).await?;
    let vip = west
        .service_addr(&key("echo"), ECHO_PORT, WAIT)
        .await
        .context("no service listener")?;
    let total = 100 << 20;
    let started = std::time::Instant::now();
    let s = TcpStream::connect(vip).await?;
    echo_transfer(s, total, 42).await?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{t:?}: 100 MiB each way in {secs:.2}s ({:.0} Mbit/s per direction, debug build)",
        (total as f64 * 8.0) / secs / 1e6
    );
    Ok(())
}
both_transports!(large_transfers_arrive_intact_both_ways);

/// A server that reads until the client's FIN, then answers with the count and closes.
async fn count_server() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut all = Vec::new();
                if s.read_to_end(&mut all).await.is_err() {
                    return;
                }
                let _ = s
                    .write_all(format!("got {} bytes", all.len()).as_bytes())
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(addr)
}

async fn half_close_is_carried_both_ways(t: TransportKind) -> Result<()> {
    let (mesh, _east, west, _echo) = east_west(t).await?;
    let counter = count_server().await?;
    mesh.feed.export("east", &key("count"), 7002, &[counter]);
    let vip = west
        .service_addr(&key("count"), 7002, WAIT)
        .await
        .context("no service listener")?;
    let mut s = TcpStream::connect(vip).await?;
    s.write_all(&pattern(1, 300_000)).await?;
    // Our FIN must reach the server, which only answers after it...
    s.shutdown().await?;
    let mut reply = String::new();
    // ...and the server's FIN must reach us, or this never ends.
    tokio::time::timeout(WAIT, s.read_to_string(&mut reply))
        .await
        .context("no reply after half-close")??;
    assert_eq!(reply, "got 300000 bytes");
    Ok(())
}
both_transports!(half_close_is_carried_both_ways);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_shows_metrics_peers_and_catalog() -> Result<()> {
    let mesh = Mesh::new(TransportKind::Quic);
    let echo = Echo::start(None).await?;
    let _east = mesh.gateway(&site("east", "r1", "a")).await?;
    let mut cfg = mesh.config("west");
    cfg.admin_listen = Some("127.0.0.1:0".into());
    let west = mesh
        .gateway_with(&site("west", "r2", "b"), cfg, mesh.identity("west"))
        .await?;
    mesh.feed
        .export("east", &key("echo"), ECHO_PORT, &[echo.addr]);
    let vip = west
        .service_addr(&key("echo"), ECHO_PORT, WAIT)
        .await
        .context("no service listener")?;
    ping(vip, "", b"count me").await?;
    idle(&west).await;
    let admin = west.admin_addr().context("no admin listener")?;
    let metrics = http_get(admin, "/metrics").await?;
    for want in [
        "meshbridge_gateway_streams_total{site=\"west\",peer_site=\"east\",direction=\"outgoing\"} 1",
        "meshbridge_gateway_connections_total{site=\"west\",peer_site=\"east\",transport=\"quic\"} 1",
        "meshbridge_gateway_handshake_seconds_count",
        "meshbridge_gateway_bytes_total{site=\"west\",peer_site=\"east\",direction=\"outgoing\",flow=\"sent\"} 8",
    ] {
        assert!(metrics.contains(want), "{want} missing:\n{metrics}");
    }
    let peers = http_get(admin, "/debug/peers").await?;
    assert!(
        peers.contains("\"site\":\"east\"") && peers.contains("\"connected\":true"),
        "{peers}"
    );
    let catalog = http_get(admin, "/debug/catalog").await?;
    assert!(catalog.contains("\"echo\""), "{catalog}");
    assert!(
        http_get(admin, "/readyz")
            .await?
            .starts_with("HTTP/1.1 200")
    );
    if !http_get(admin, "/config_dump")
        .await?
        .contains("site = \"west\"")
    {
        bail!("config dump lacks the site");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_transport_falls_back_to_tcp_when_udp_gets_no_answer() -> Result<()> {
    let mesh = Mesh::new(TransportKind::Auto);
    let echo = Echo::start(None).await?;
    let east_site = site("east", "r1", "a");
    let east = mesh.gateway(&east_site).await?;
    // East is reachable at an address where TCP is forwarded and UDP vanishes.
    let tcp_only = meshbridge_testkit::fault::TcpFault::start(east.tunnel_addr()).await?;
    let _udp_sink = std::net::UdpSocket::bind(tcp_only.addr())?;
    mesh.feed.set_site(&east_site, Some(tcp_only.addr()));
    let west = mesh.gateway(&site("west", "r1", "b")).await?;
    mesh.feed
        .export("east", &key("echo"), ECHO_PORT, &[echo.addr]);
    mesh.feed.synced(&[&east, &west]).await;
    let vip = west
        .service_addr(&key("echo"), ECHO_PORT, WAIT)
        .await
        .context("no service listener")?;
    ping(vip, "", b"over tcp after quic got no answer").await?;
    let peers = west.peers();
    assert_eq!(peers[0].transport, Some("tcp"), "{peers:?}");
    ping(vip, "", b"and it stays on tcp").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connection_limit_holds_new_clients_until_a_slot_frees() -> Result<()> {
    let mesh = Mesh::new(TransportKind::Quic);
    let echo = Echo::start(None).await?;
    let east = mesh.gateway(&site("east", "r1", "a")).await?;
    let mut cfg = mesh.config("west");
    cfg.listeners.max_connections = 1;
    let west = mesh
        .gateway_with(&site("west", "r1", "b"), cfg, mesh.identity("west"))
        .await?;
    mesh.feed
        .export("east", &key("echo"), ECHO_PORT, &[echo.addr]);
    mesh.feed.synced(&[&east, &west]).await;
    let vip = west
        .service_addr(&key("echo"), ECHO_PORT, WAIT)
        .await
        .context("no service listener")?;
    let mut first = TcpStream::connect(vip).await?;
    first.write_all(b"one").await?;
    let mut buf = [0u8; 3];
    tokio::time::timeout(WAIT, first.read_exact(&mut buf))
        .await
        .context("first client not served")??;
    let mut second = TcpStream::connect(vip).await?; // sits in the backlog
    second.write_all(b"two").await?;
    let early = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        second.read_exact(&mut buf),
    )
    .await;
    assert!(
        early.is_err(),
        "second client served while the limit is reached"
    );
    drop(first);
    tokio::time::timeout(WAIT, second.read_exact(&mut buf))
        .await
        .context("second client never served")??;
    assert_eq!(&buf, b"two");
    Ok(())
}

async fn fixed_listener_reaches_echo(t: TransportKind) -> Result<()> {
    let (mesh, _east, _west, _echo) = east_west(t).await?;
    // A third gateway in west's place with a fixed listener instead of VIPs.
    let mut cfg = mesh.config("west2");
    cfg.listeners.vip_range = None;
    cfg.listeners.fixed = vec![meshbridge_gateway::config::FixedListener {
        listen: "127.0.0.1:0".into(),
        service: "demo/echo".into(),
        port: ECHO_PORT,
    }];
    let site = site("west2", "r3", "c");
    let gw = mesh
        .gateway_with(&site, cfg, mesh.identity("west2"))
        .await?;
    mesh.feed.synced(&[&gw]).await;
    let addr = *gw.fixed_addrs().first().context("no fixed listener")?;
    ping(addr, "", b"through a fixed listener").await?;
    Ok(())
}
both_transports!(fixed_listener_reaches_echo);

/// A VIP:port held by another process is not given up on: the listener is retried with
/// backoff and comes up once the address is free, with no catalog change in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_listener_taken_by_another_process_is_retried_until_free() -> Result<()> {
    let mesh = Mesh::new(TransportKind::Quic);
    let echo = Echo::start(None).await?;
    let east = mesh.gateway(&site("east", "r1", "a")).await?;
    let mut cfg = mesh.config("west");
    cfg.admin_listen = Some("127.0.0.1:0".into());
    let range = cfg.listeners.vip_range.context("vip range")?;
    mesh.feed
        .export("east", &key("echo"), ECHO_PORT, &[echo.addr]);
    let vips = meshbridge_core::vip::assign_catalog(range, &mesh.feed.snapshot());
    let vip = SocketAddr::new((*vips.get(&key("echo")).context("vip")?).into(), ECHO_PORT);
    let squatter = TcpListener::bind(vip).await?;
    let west = mesh
        .gateway_with(&site("west", "r2", "b"), cfg, mesh.identity("west"))
        .await?;
    mesh.feed.synced(&[&east, &west]).await;
    // The catalog is in use but the address is taken: the failure is counted, no listener.
    let admin = west.admin_addr().context("no admin listener")?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let metrics = http_get(admin, "/metrics").await?;
        if metrics.contains("reason=\"listener_bind\"") {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("bind failure not counted:\n{metrics}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        !west.service_addrs().contains_key(&(key("echo"), ECHO_PORT)),
        "a listener on an address another process holds"
    );
    drop(squatter);
    let got = west
        .service_addr(&key("echo"), ECHO_PORT, WAIT)
        .await
        .context("listener not retried after the address was freed")?;
    assert_eq!(got, vip);
    ping(vip, "", b"after the retry").await?;
    Ok(())
}
