//! Failover between sites: the service runs in a nearer site (same region) and a farther
//! one. When the nearer site's endpoints stop, or its gateway dies, new connections go to
//! the farther site without the client seeing an error.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::*;
use meshbridge_gateway::TransportKind;
use meshbridge_testkit::fault::{Mode, TcpFault, UdpFault};

const PORT: u16 = 7101;

async fn endpoints_stopping_in_the_nearer_site_fails_over(t: TransportKind) -> Result<()> {
    let mesh = Mesh::new(t);
    let mut near_echo = Echo::start(Some("near")).await?;
    let far_echo = Echo::start(Some("far_")).await?;
    let west = mesh.gateway(&site("west", "r1", "a")).await?;
    let near = mesh.gateway(&site("near", "r1", "b")).await?;
    let far = mesh.gateway(&site("far", "r2", "c")).await?;
    let vip = export_near_and_far(
        &mesh,
        PORT,
        (near_echo.addr, far_echo.addr),
        &west,
        &[&west, &near, &far],
    )
    .await?;
    for _ in 0..3 {
        assert_eq!(which_server(vip, 4).await?, "near", "nearer site first");
    }
    // The endpoint dies but the catalog still calls it ready: near answers connect-failed.
    near_echo.stop().await;
    for i in 0..5 {
        let tag = which_server(vip, 4)
            .await
            .with_context(|| format!("attempt {i}"))?;
        assert_eq!(tag, "far_", "attempt {i}");
    }
    // Once the catalog says so, near is not even asked.
    mesh.feed.set_ready("near", &key("echo"), false);
    mesh.feed.synced(&[&west]).await;
    assert_eq!(which_server(vip, 4).await?, "far_");
    ping(vip, "far_", b"payload after failover").await?;
    Ok(())
}
both_transports!(endpoints_stopping_in_the_nearer_site_fails_over);

enum Fault {
    Udp(UdpFault),
    Tcp(TcpFault),
}

impl Fault {
    fn set(&self, mode: Mode) {
        match self {
            Self::Udp(f) => f.set(mode),
            Self::Tcp(f) => f.set(mode),
        }
    }
}

async fn nearer_gateway_dying_fails_over_within_seconds(t: TransportKind) -> Result<()> {
    let mesh = Mesh::new(t);
    let near_echo = Echo::start(Some("near")).await?;
    let far_echo = Echo::start(Some("far_")).await?;
    let west = mesh.gateway(&site("west", "r1", "a")).await?;
    let near_site = site("near", "r1", "b");
    let near = mesh.gateway(&near_site).await?;
    let far = mesh.gateway(&site("far", "r2", "c")).await?;
    // Peers reach near only through a proxy that can silently drop everything.
    let fault = match t {
        TransportKind::Tcp => Fault::Tcp(TcpFault::start(near.tunnel_addr()).await?),
        _ => Fault::Udp(UdpFault::start(near.tunnel_addr(), 1).await?),
    };
    let via = match &fault {
        Fault::Udp(f) => f.addr(),
        Fault::Tcp(f) => f.addr(),
    };
    mesh.feed.set_site(&near_site, Some(via));
    let vip = export_near_and_far(
        &mesh,
        PORT,
        (near_echo.addr, far_echo.addr),
        &west,
        &[&west, &near, &far],
    )
    .await?;
    assert_eq!(which_server(vip, 4).await?, "near");

    fault.set(Mode::Blackhole);
    let cut = Instant::now();
    // The first connection waits for the dead link to be noticed (keepalive / idle
    // timeout with default settings), then fails over; the client sees no error.
    assert_eq!(which_server(vip, 4).await?, "far_");
    let detected = cut.elapsed();
    assert!(
        detected < Duration::from_secs(8),
        "site loss took {detected:?} to notice"
    );
    // Later connections do not wait: the dead peer is in backoff.
    for _ in 0..3 {
        let began = Instant::now();
        assert_eq!(which_server(vip, 4).await?, "far_");
        assert!(
            began.elapsed() < Duration::from_secs(2),
            "{:?}",
            began.elapsed()
        );
    }
    eprintln!("{t:?}: loss of the nearer gateway handled after {detected:?}");
    let peers = west.peers();
    let near_peer = peers
        .iter()
        .find(|p| p.site == "near")
        .context("near peer")?;
    assert!(!near_peer.connected, "{near_peer:?}");
    assert!(near_peer.last_error.is_some(), "{near_peer:?}");
    Ok(())
}
both_transports!(nearer_gateway_dying_fails_over_within_seconds);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_endpoint_is_skipped_then_ejected() -> Result<()> {
    let mesh = Mesh::new(TransportKind::Quic);
    let live = Echo::start(Some("live")).await?;
    let east = mesh.gateway(&site("east", "r1", "a")).await?;
    let west = mesh.gateway(&site("west", "r1", "b")).await?;
    // Endpoints of one export share the target port: 127.0.0.1 listens, 127.0.0.2 does not.
    let dead_ip = std::net::SocketAddr::new([127, 0, 0, 2].into(), live.addr.port());
    mesh.feed
        .export("east", &key("echo"), PORT, &[live.addr, dead_ip]);
    mesh.feed.synced(&[&east, &west]).await;
    let vip = west
        .service_addr(&key("echo"), PORT, WAIT)
        .await
        .context("vip")?;
    for i in 0..12 {
        let tag = which_server(vip, 4)
            .await
            .with_context(|| format!("connection {i}"))?;
        assert_eq!(tag, "live", "connection {i}");
    }
    let mut m = String::new();
    prometheus_client::encoding::text::encode(&mut m, &east.registry())?;
    let line = m
        .lines()
        .find(|l| {
            l.starts_with("meshbridge_gateway_failures_total") && l.contains("endpoint_connect")
        })
        .context("no endpoint_connect failures counted")?;
    assert!(
        line.ends_with(" 3"),
        "ejected after 3 failures, then skipped: {line}"
    );
    Ok(())
}

/// A peer at its `tunnel.max_streams_per_link` does not hang new connections: once the
/// reply timeout passes without a free stream, the next site serves them, and the
/// sending gateway counts why.
async fn a_peer_at_its_stream_limit_sends_new_connections_elsewhere(
    t: TransportKind,
) -> Result<()> {
    use tokio::io::AsyncReadExt;
    let mesh = Mesh::new(t);
    let near_echo = Echo::start(Some("near")).await?;
    let far_echo = Echo::start(Some("far_")).await?;
    let mut cfg = mesh.config("west");
    cfg.tunnel.reply_timeout_ms = 400;
    cfg.admin_listen = Some("127.0.0.1:0".into());
    let west = mesh
        .gateway_with(&site("west", "r1", "a"), cfg, mesh.identity("west"))
        .await?;
    let mut cfg = mesh.config("near");
    cfg.tunnel.max_streams_per_link = 1;
    let near = mesh
        .gateway_with(&site("near", "r1", "b"), cfg, mesh.identity("near"))
        .await?;
    let far = mesh.gateway(&site("far", "r2", "c")).await?;
    let vip = export_near_and_far(
        &mesh,
        PORT,
        (near_echo.addr, far_echo.addr),
        &west,
        &[&west, &near, &far],
    )
    .await?;

    // The one stream near allows west, held open.
    let mut held = tokio::net::TcpStream::connect(vip).await?;
    let mut tag = [0u8; 4];
    tokio::time::timeout(WAIT, held.read_exact(&mut tag))
        .await
        .context("first client not served")??;
    assert_eq!(&tag, b"near");

    let began = Instant::now();
    assert_eq!(
        which_server(vip, 4).await?,
        "far_",
        "full near link routed around"
    );
    assert!(
        began.elapsed() < WAIT,
        "took {:?}: the full link was not given up on",
        began.elapsed()
    );
    let admin = west.admin_addr().context("no admin listener")?;
    let metrics = http_get(admin, "/metrics").await?;
    let want = "meshbridge_gateway_failures_total{site=\"west\",peer_site=\"near\",reason=\"streams_exhausted\"} 1";
    assert!(metrics.contains(want), "{want} missing:\n{metrics}");
    // The held connection was not disturbed (on either transport the link stays up).
    use tokio::io::AsyncWriteExt;
    held.write_all(b"still").await?;
    let mut back = [0u8; 5];
    tokio::time::timeout(WAIT, held.read_exact(&mut back))
        .await
        .context("held connection stalled")??;
    assert_eq!(&back, b"still");
    Ok(())
}
both_transports!(a_peer_at_its_stream_limit_sends_new_connections_elsewhere);
