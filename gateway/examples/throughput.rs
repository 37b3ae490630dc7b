//! Throughput through a gateway pair on loopback (measurement, not a pass/fail test):
//! `cargo run --release -p meshbridge-gateway --example throughput`.
//! `MESHBRIDGE_THROUGHPUT_MIB` sets the size (default 1024).
#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{Context, Result};
use common::*;
use meshbridge_gateway::TransportKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A server that counts bytes until EOF, then answers with the count.
async fn sink() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = s.write_all(&total.to_be_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// Send `bytes` one way to `addr`; Gbit/s.
async fn one_way(addr: SocketAddr, bytes: u64) -> Result<f64> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let block = vec![0x5au8; 256 * 1024];
    let began = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = (block.len() as u64).min(bytes - sent) as usize;
        s.write_all(&block[..n]).await?;
        sent += n as u64;
    }
    s.shutdown().await?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count).await?;
    let secs = began.elapsed().as_secs_f64();
    assert_eq!(u64::from_be_bytes(count), bytes, "bytes lost");
    Ok(bytes as f64 * 8.0 / secs / 1e9)
}

async fn through_pair(
    t: TransportKind,
    tune: impl Fn(&mut meshbridge_gateway::config::TunnelConfig),
    bytes: u64,
) -> Result<f64> {
    let mesh = Mesh::new(t);
    let target = sink().await?;
    let mut east_cfg = mesh.config("east");
    tune(&mut east_cfg.tunnel);
    let east = mesh
        .gateway_with(&site("east", "r1", "a"), east_cfg, mesh.identity("east"))
        .await?;
    let mut west_cfg = mesh.config("west");
    tune(&mut west_cfg.tunnel);
    let west = mesh
        .gateway_with(&site("west", "r1", "b"), west_cfg, mesh.identity("west"))
        .await?;
    mesh.feed.export("east", &key("sink"), 5201, &[target]);
    mesh.feed.synced(&[&east, &west]).await;
    let vip = west
        .service_addr(&key("sink"), 5201, WAIT)
        .await
        .context("vip")?;
    one_way(vip, 64 << 20).await?; // warm up: link, MTU discovery, windows
    one_way(vip, bytes).await
}

async fn throughput_one_way() -> Result<()> {
    init();
    let mib: u64 = std::env::var("MESHBRIDGE_THROUGHPUT_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let bytes = mib << 20;
    let direct = one_way(sink().await?, bytes).await?;
    println!("direct TCP              {direct:6.2} Gbit/s");
    type Tune = fn(&mut meshbridge_gateway::config::TunnelConfig);
    let cases: [(&str, TransportKind, Tune); 6] = [
        ("QUIC all defaults", TransportKind::Quic, |t| {
            *t = meshbridge_gateway::config::TunnelConfig {
                listen: t.listen.clone(),
                ..Default::default()
            };
            t.transport = TransportKind::Quic;
        }),
        ("QUIC 208 KiB sockbuf", TransportKind::Quic, |t| {
            t.socket_buffer_bytes = 212_992
        }),
        ("QUIC max_mtu 1452", TransportKind::Quic, |t| {
            t.max_mtu = 1452
        }),
        ("QUIC max_mtu 8952", TransportKind::Quic, |t| {
            t.max_mtu = 8952
        }),
        ("QUIC max_mtu 16384", TransportKind::Quic, |t| {
            t.max_mtu = 16384
        }),
        ("TCP+TLS+HTTP/2", TransportKind::Tcp, |_| {}),
    ];
    for (name, t, tune) in cases {
        let g = through_pair(t, tune, bytes).await?;
        println!("{name:<23} {g:6.2} Gbit/s  ({mib} MiB one way)");
    }
    Ok(())
}

/// Keep-alive round-trip latency (p50/p99 of 1-byte echoes) and new connections per second,
/// direct and through the pair.
async fn latency_and_connection_rate() -> Result<()> {
    init();
    let echo = Echo::start(None).await?;
    println!(
        "{:<16} {:>9} {:>9} {:>12}",
        "path", "p50 µs", "p99 µs", "conn/s"
    );
    let (p50, p99, rate) = measure(echo.addr).await?;
    println!("{:<16} {p50:>9.0} {p99:>9.0} {rate:>12.0}", "direct TCP");
    for (name, t) in [
        ("QUIC pair", TransportKind::Quic),
        ("TCP pair", TransportKind::Tcp),
    ] {
        let mesh = Mesh::new(t);
        let east = mesh.gateway(&site("east", "r1", "a")).await?;
        let west = mesh.gateway(&site("west", "r1", "b")).await?;
        mesh.feed.export("east", &key("echo"), 7, &[echo.addr]);
        mesh.feed.synced(&[&east, &west]).await;
        let vip = west
            .service_addr(&key("echo"), 7, WAIT)
            .await
            .context("vip")?;
        let (p50, p99, rate) = measure(vip).await?;
        println!("{name:<16} {p50:>9.0} {p99:>9.0} {rate:>12.0}");
    }
    Ok(())
}

async fn measure(addr: SocketAddr) -> Result<(f64, f64, f64)> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut samples = Vec::with_capacity(5000);
    let mut b = [0u8; 1];
    for i in 0..5200 {
        let t0 = Instant::now();
        s.write_all(&[i as u8]).await?;
        s.read_exact(&mut b).await?;
        if i >= 200 {
            samples.push(t0.elapsed().as_secs_f64() * 1e6);
        }
    }
    samples.sort_by(f64::total_cmp);
    let p50 = samples[samples.len() / 2];
    let p99 = samples[samples.len() * 99 / 100];
    // New connections: 16 clients in parallel, 250 sequential connections each.
    let (clients, each) = (16, 250);
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..clients {
        set.spawn(async move {
            let mut b = [0u8; 1];
            for _ in 0..each {
                let mut c = TcpStream::connect(addr).await?;
                c.write_all(b"x").await?;
                c.read_exact(&mut b).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let rate = (clients * each) as f64 / t0.elapsed().as_secs_f64();
    Ok((p50, p99, rate))
}

/// `cargo run --release -p meshbridge-gateway --example throughput`
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    throughput_one_way().await?;
    latency_and_connection_rate().await
}
