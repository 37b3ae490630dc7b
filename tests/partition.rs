//! A network partition between two sites' gateways, for real: east and west are network
//! namespaces joined by a veth pair (the only path between them); each runs its gateway
//! process, east also an echo server. Taking the link down cuts the tunnel: west's gateway
//! sees its link to east go down and a client gets an error, not a hang; bringing it back
//! heals the link with no restart. (Root and `ip netns`; under CI=true they must run.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use meshbridge_federation::files::GatewayFile;
use meshbridge_federation::source::CatalogSource;
use meshbridge_gateway::config::FixedListener;
use meshbridge_testkit::netns::{self, HostLink, Link, Netns};
use meshbridge_testkit::pki::TestPki;
use meshbridge_testkit::process::Proc;
use serde_json::json;
use support::{READY, gateway_file, write};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const TD: &str = "partition.example";
const WITHIN: Duration = Duration::from_secs(30);

fn site(name: &str, rev: u64, gateway: &str) -> serde_json::Value {
    json!({
        "name": name, "kind": "cluster", "locality": { "region": "r", "zone": name },
        "gateways": [gateway], "lease_ttl_ms": 3_600_000u64, "grace_ms": 3_600_000u64,
        "last_heartbeat_ms": 0, "state": { "state": "fresh" }, "created_revision": rev
    })
}

/// `meshbridge <args>` inside `ns`, once it printed `ready`.
async fn spawn_in(ns: &Netns, name: &str, args: &[&str], ready: &str) -> Result<Proc> {
    let mut cmd = ns.tokio_command(env!("CARGO_BIN_EXE_meshbridge"));
    cmd.args(args)
        .env("MESHBRIDGE_LOG", "info,openraft=warn,hickory_server=warn");
    let mut p = Proc::spawn(name, cmd)?;
    p.wait_for(ready, READY).await?;
    Ok(p)
}

/// One line through `addr`: the reply line, or the error (a closed or reset connection).
async fn line_through(addr: SocketAddr, line: &str) -> Result<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    s.write_all(format!("{line}\n").as_bytes()).await?;
    let mut reply = String::new();
    let n = BufReader::new(s).read_line(&mut reply).await?;
    anyhow::ensure!(n > 0, "closed without a reply");
    Ok(reply.trim().to_string())
}

/// Whether west's gateway reports a connected link to east (`/debug/peers`).
async fn east_link_up(admin: SocketAddr) -> Option<bool> {
    let peers = meshbridge_testkit::http::get_json(admin, "/debug/peers").await?;
    peers["links"]
        .as_array()?
        .iter()
        .find(|l| l["site"] == "east")
        .and_then(|l| l["connected"].as_bool())
}

/// The gateway of `site`, its tunnel on `tunnel` with a 2 s idle timeout (the bound on
/// noticing a lost peer), reading the catalog from `catalog`.
fn gateway_config(pki: &TestPki, site: &str, tunnel: &str, catalog: &Path) -> GatewayFile {
    let mut file = gateway_file(pki, TD, site, CatalogSource::file(catalog));
    file.gateway.tunnel.listen = tunnel.into();
    file.gateway.tunnel.keepalive_ms = 500;
    file.gateway.tunnel.idle_timeout_ms = 2_000;
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_between_two_sites_gateways_fails_fast_and_heals_without_a_restart()
-> Result<()> {
    if !netns::available() {
        return Ok(());
    }
    let slot = meshbridge_testkit::slots::take("partition-nets", 200);
    let east = Netns::new("east")?;
    let west = Netns::new("west")?;
    let (east_ip, west_ip) = (format!("10.81.{slot}.1"), format!("10.81.{slot}.2"));
    let between = Link::new(&east, &east_ip, &west, &west_ip)?;
    // The test reaches west's listeners over a link of its own.
    let west_host_ip = format!("10.82.{slot}.2");
    let _host = HostLink::new(&west, &format!("10.82.{slot}.1"), &west_host_ip)?;

    let pki = TestPki::new(TD);
    let dir = pki.dir().to_path_buf();
    let tunnel = format!("{east_ip}:15008");
    let catalog = json!({
        "revision": 3,
        "sites": { "east": site("east", 1, &tunnel), "west": site("west", 2, &format!("{west_ip}:15008")) },
        "exports": [{
            "site": "east", "service": { "namespace": "shop", "name": "web" }, "generation": 1,
            "ports": [{ "name": "http", "port": 80, "protocol": "TCP", "target_port": 8080 }],
            "endpoints": [{ "address": east_ip, "hostname": null, "ready": true, "weight": 1, "identity": null }],
            "headless": false, "created_revision": 3, "updated_revision": 3
        }],
        "policies": {}, "tokens": {}
    });
    let catalog_file = dir.join("catalog.json");
    std::fs::write(&catalog_file, serde_json::to_vec(&catalog)?)?;

    let _echo = spawn_in(
        &east,
        "echo east",
        &[
            "echo",
            "--listen",
            &format!("{east_ip}:8080"),
            "--name",
            "east",
        ],
        "listening on",
    )
    .await?;
    let east_cfg = write(
        &pki,
        "gw-east",
        &gateway_config(&pki, "east", &tunnel, &catalog_file),
    )?;
    let _east_gw = spawn_in(
        &east,
        "gateway east",
        &["gateway", "--config", &east_cfg.to_string_lossy()],
        "listening on",
    )
    .await?;
    let front: SocketAddr = format!("{west_host_ip}:7000").parse()?;
    let admin: SocketAddr = format!("{west_host_ip}:9901").parse()?;
    let mut west_file = gateway_config(&pki, "west", &format!("{west_ip}:15008"), &catalog_file);
    west_file.gateway.admin_listen = Some(admin.to_string());
    west_file.gateway.listeners.fixed = vec![FixedListener {
        listen: front.to_string(),
        service: "shop/web".into(),
        port: 80,
    }];
    let west_cfg = write(&pki, "gw-west", &west_file)?;
    let mut west_gw = spawn_in(
        &west,
        "gateway west",
        &["gateway", "--config", &west_cfg.to_string_lossy()],
        "listening on",
    )
    .await?;

    // Through west's gateway and the tunnel to east's echo.
    assert_eq!(line_through(front, "before").await?, "east: before");
    assert_eq!(east_link_up(admin).await, Some(true));

    // The partition: the only path between the sites goes down.
    between.set_up(false)?;
    let cut = Instant::now();
    // West's gateway sees its link to east go down (keepalive 500 ms, idle timeout 2 s).
    while east_link_up(admin).await != Some(false) {
        assert!(
            cut.elapsed() < WITHIN,
            "west still reports a live link to east; west's log:\n{}",
            west_gw.collect().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let detected = cut.elapsed();
    // A client now gets an error, not a hang: there is no other site to fail over to.
    let tried = Instant::now();
    let during = line_through(front, "during").await;
    assert!(during.is_err(), "a reply across the partition: {during:?}");
    let failed_after = tried.elapsed();
    assert!(
        failed_after < Duration::from_secs(15),
        "the client waited {failed_after:?} for its error"
    );

    // Heal: the link comes back and traffic flows again, with no restart.
    between.set_up(true)?;
    let healed = Instant::now();
    let reply = loop {
        match line_through(front, "after").await {
            Ok(r) => break r,
            Err(e) => assert!(
                healed.elapsed() < WITHIN,
                "no traffic after the heal: {e:#}; west's log:\n{}",
                west_gw.collect().join("\n")
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(reply, "east: after");
    println!(
        "partition: link down seen after {detected:?}, client error after {failed_after:?}, \
         traffic back {:?} after the heal",
        healed.elapsed()
    );
    Ok(())
}
