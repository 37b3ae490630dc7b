//! Static stability (the catalog source goes away; a restart serves the persisted catalog)
//! and drain (streams in flight complete, new ones go elsewhere, no byte lost).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use anyhow::{Context, Result, bail};
use common::*;
use meshbridge_core::drain::Outcome;
use meshbridge_gateway::{Gateway, TransportKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PORT: u16 = 7301;

async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Result<()> {
    s.write_all(msg).await?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .context("no echo")??;
    if buf != msg {
        bail!("echo differs");
    }
    Ok(())
}

async fn serves_without_catalog_source_and_after_restart(t: TransportKind) -> Result<()> {
    let mesh = Mesh::new(t);
    let echo = Echo::start(None).await?;
    let east = mesh.gateway(&site("east", "r1", "a")).await?;
    let west_site = site("west", "r1", "b");
    let west = mesh.gateway(&west_site).await?;
    mesh.feed.export("east", &key("echo"), PORT, &[echo.addr]);
    mesh.feed.synced(&[&east, &west]).await;
    let revision = mesh.feed.revision();
    let vip = west
        .service_addr(&key("echo"), PORT, WAIT)
        .await
        .context("vip")?;
    let mut open = TcpStream::connect(vip).await?;
    round_trip(&mut open, b"before the registry goes").await?;

    mesh.feed.close();
    round_trip(&mut open, b"existing connection")
        .await
        .context("existing")?;
    ping(vip, "", b"new connection").await.context("new")?;
    assert_eq!(west.catalog().revision, revision);

    // Restart west with the source still down: it starts from its persisted catalog.
    west.shutdown().await;
    let west = Gateway::start(mesh.config("west"), mesh.identity("west"), mesh.feed.rx()).await?;
    assert_eq!(
        west.catalog().revision,
        revision,
        "catalog from the data dir"
    );
    let vip = west
        .service_addr(&key("echo"), PORT, WAIT)
        .await
        .context("vip after restart")?;
    ping(vip, "", b"after restart, registry still down").await?;
    Ok(())
}
both_transports!(serves_without_catalog_source_and_after_restart);

async fn drain_completes_streams_in_flight_and_sends_new_ones_elsewhere(
    t: TransportKind,
) -> Result<()> {
    let mesh = Mesh::new(t);
    let near_echo = Echo::start(Some("near")).await?;
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

    let mut in_flight = TcpStream::connect(vip).await?;
    let mut tag = [0u8; 4];
    in_flight.read_exact(&mut tag).await?;
    assert_eq!(&tag, b"near");
    round_trip(&mut in_flight, b"stream established").await?;

    let ready = near.readiness();
    let drain = tokio::spawn(near.drain(Duration::from_secs(20)));
    for _ in 0..1000 {
        if !ready.is_ready() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Not ready at once; new connections are refused by near and go to far.
    for _ in 0..3 {
        assert_eq!(which_server(vip, 4).await?, "far_");
    }
    assert!(!ready.is_ready());
    assert!(
        !drain.is_finished(),
        "drain must wait for the stream in flight"
    );
    // The stream in flight carries 20 MiB more, both ways, intact.
    echo_transfer(in_flight, 20 << 20, 7).await?;
    let outcome = tokio::time::timeout(WAIT, drain)
        .await
        .context("drain hung")??;
    assert_eq!(outcome, Outcome::Graceful);
    assert_eq!(which_server(vip, 4).await?, "far_");
    Ok(())
}
both_transports!(drain_completes_streams_in_flight_and_sends_new_ones_elsewhere);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_forces_stuck_streams() -> Result<()> {
    let mesh = Mesh::new(TransportKind::Quic);
    let echo = Echo::start(None).await?;
    let east = mesh.gateway(&site("east", "r1", "a")).await?;
    let west = mesh.gateway(&site("west", "r1", "b")).await?;
    mesh.feed.export("east", &key("echo"), PORT, &[echo.addr]);
    mesh.feed.synced(&[&east, &west]).await;
    let vip = west
        .service_addr(&key("echo"), PORT, WAIT)
        .await
        .context("vip")?;
    let mut stuck = TcpStream::connect(vip).await?;
    round_trip(&mut stuck, b"idle client").await?;
    let outcome = east.drain(Duration::from_millis(300)).await;
    assert_eq!(outcome, Outcome::Forced { remaining: 1 });
    // The forced stream is closed: the client sees its end, not a hang.
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(WAIT, stuck.read(&mut buf))
        .await
        .context("client hangs")?;
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    Ok(())
}
