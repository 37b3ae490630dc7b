//! xDS push latency against a real Envoy: a gateway whose catalog holds N services of its own
//! site serves them over ADS to one Envoy; each round changes one service's endpoint count
//! and measures until Envoy ACKs the endpoint response carrying it (counted by the server,
//! polled every 0.2 ms), then checks Envoy's `membership_total` stat for that cluster. Also: time until Envoy holds all N
//! clusters, and both processes' resident memory.
//!
//! `cargo run --release -p meshbridge-gateway --example xds_bench -- 1000 200`
//! (services, rounds; `DELTA=1` for incremental xDS; `ENVOYS=k` for k Envoys, a change
//! then counting as applied when all have ACKed it);
//! Envoy from MESHBRIDGE_ENVOY or `tools/envoy.sh`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use meshbridge_core::model::{
    Catalog, Endpoint, Export, Locality, Port, Protocol, ServiceKey, Site,
};
use meshbridge_gateway::Gateway;
use meshbridge_gateway::config::{Config, XdsConfig};
use meshbridge_gateway::xds::resources::ENDPOINT;
use meshbridge_testkit::pki::TestPki;

const WAIT: Duration = Duration::from_secs(20);

fn endpoint(ip: Ipv4Addr) -> Endpoint {
    Endpoint {
        address: IpAddr::V4(ip),
        hostname: None,
        ready: true,
        weight: 1,
        identity: None,
        zone: None,
    }
}

fn export(i: u32, endpoints: Vec<Endpoint>, generation: u64) -> Export {
    Export {
        site: "west".into(),
        service: key(i),
        generation,
        ports: vec![Port {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Tcp,
            target_port: 8080,
            app_protocol: None,
        }],
        endpoints,
        headless: false,
        created_revision: 2,
        updated_revision: 2 + generation,
    }
}

fn key(i: u32) -> ServiceKey {
    ServiceKey::new(format!("ns{:02}", i % 100), format!("svc{i:05}"))
}

fn catalog(n: u32) -> Catalog {
    let mut c = Catalog::default();
    let site = Site {
        name: "west".into(),
        locality: Locality {
            region: "r1".into(),
            zone: "a".into(),
        },
        lease_ttl_ms: 10_000,
        grace_ms: 10_000,
        created_revision: 1,
        ..Site::default()
    };
    c.sites.insert("west".into(), Arc::new(site));
    for i in 0..n {
        let ip = Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8);
        c.exports.insert(
            (key(i), "west".into()),
            Arc::new(export(i, vec![endpoint(ip)], 1)),
        );
    }
    c.revision = 2;
    c
}

fn envoy_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MESHBRIDGE_ENVOY") {
        return Ok(PathBuf::from(p));
    }
    let installed = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/tools/envoy/1.40.0-grpcio-1.85.4/envoy");
    if installed.exists() {
        return Ok(installed);
    }
    bail!("no Envoy: run tools/envoy.sh or set MESHBRIDGE_ENVOY")
}

fn rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The value of the first stat matching `filter` (a regex), from Envoy's admin.
async fn stat(admin: SocketAddr, filter: &str) -> Option<u64> {
    let text = meshbridge_testkit::http::get(admin, &format!("/stats?filter={filter}")).await?;
    text.lines()
        .filter_map(|l| l.split_once(": "))
        .find_map(|(_, v)| v.trim().parse().ok())
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let n: u32 = args.next().map_or(Ok(1000), |s| s.parse())?;
    let rounds: u32 = args.next().map_or(Ok(200), |s| s.parse())?;
    let pki = TestPki::new("corp.example");
    let identity = pki.identity("gw", "spiffe://corp.example/site/west/gateway");
    let data = tempfile::tempdir()?;
    let mut cfg = Config::for_test("west", data.path());
    cfg.xds = Some(XdsConfig {
        listen: "127.0.0.1:0".into(),
        plaintext: true,
        ..XdsConfig::default()
    });
    let mut cat = catalog(n);
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(cat.clone()));
    let gateway = Gateway::start(cfg, identity, rx).await?;
    let xds = gateway.xds_addr().context("no xds listener")?;

    // DELTA=1: incremental xDS (only what changed is sent); else state of the world.
    let api_type = if std::env::var("DELTA").is_ok_and(|v| v == "1") {
        "DELTA_GRPC"
    } else {
        "GRPC"
    };
    let dir = tempfile::tempdir()?;
    let bootstrap = serde_json::json!({
        "node": { "id": "bench", "cluster": "west" },
        "admin": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } } },
        "dynamic_resources": {
            "ads_config": { "api_type": api_type, "transport_api_version": "V3",
                "grpc_services": [{ "envoy_grpc": { "cluster_name": "xds" } }] },
            "cds_config": { "ads": {}, "resource_api_version": "V3" }
        },
        "static_resources": { "clusters": [{
            "name": "xds", "type": "STATIC", "connect_timeout": "1s",
            "typed_extension_protocol_options": { "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": { "http2_protocol_options": {} } } },
            "load_assignment": { "cluster_name": "xds", "endpoints": [{ "lb_endpoints": [{ "endpoint": {
                "address": { "socket_address": { "address": "127.0.0.1", "port_value": xds.port() } } } }] }] }
        }] }
    });
    let config = dir.path().join("envoy.json");
    std::fs::write(&config, serde_json::to_vec(&bootstrap)?)?;
    // ENVOYS=k: k Envoys (node ids bench-0..k-1); a change counts as applied when every one
    // has ACKed it.
    let k: u32 = std::env::var("ENVOYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let rss_before = rss_kib("self");
    let started = Instant::now();
    let mut envoys = Vec::new();
    for i in 0..k {
        let admin_path = dir.path().join(format!("admin-{i}.txt"));
        let child = tokio::process::Command::new(envoy_bin()?)
            .arg("-c")
            .arg(&config)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(["--service-node", &format!("bench-{i}")])
            .args(["--disable-hot-restart", "--concurrency", "1", "-l", "error"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        envoys.push((child, admin_path));
    }
    let mut admins = Vec::new();
    for (_, admin_path) in &envoys {
        let admin = loop {
            if let Some(a) = std::fs::read_to_string(admin_path)
                .ok()
                .and_then(|t| t.trim().parse::<SocketAddr>().ok())
            {
                break a;
            }
            if started.elapsed() > WAIT * 3 {
                bail!("envoy did not start");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        admins.push(admin);
    }
    // All clusters warm in every Envoy (the static xds cluster is one more).
    for admin in &admins {
        loop {
            let active = stat(*admin, "^cluster_manager.active_clusters$").await;
            if active.is_some_and(|a| a > u64::from(n)) {
                break;
            }
            if started.elapsed() > WAIT * 3 {
                bail!("envoy has {active:?} active clusters, want {}", n + 1);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let initial = started.elapsed();
    let rss_connected = rss_kib("self");
    let admin = admins[0];
    let envoy_pid = envoys[0].0.id().context("envoy has no pid")?.to_string();

    // Rounds: svc00000 alternates between 2 and 1 endpoints.
    let filter = "^cluster\\.svc00000\\.ns00\\.svc\\.clusterset\\.local.*\\.membership_total$";
    let poll = Duration::from_micros(200);
    let stats = gateway.xds_stats();
    let mut took = Vec::new();
    for round in 0..rounds {
        let count = if round % 2 == 0 { 2 } else { 1 };
        let endpoints = (0..count)
            .map(|e| endpoint(Ipv4Addr::new(10, 200, (round >> 8) as u8, e)))
            .collect();
        cat.exports.insert(
            (key(0), "west".into()),
            Arc::new(export(0, endpoints, u64::from(round) + 2)),
        );
        cat.revision += 1;
        // Applied = every Envoy's ACK of the endpoint response that carries the change (the
        // server counts ACKs in process; polling Envoy's stats costs O(clusters) per poll,
        // about 0.1 ms per cluster here, which would be measured too).
        let acks = stats.ack_count(ENDPOINT);
        let t = Instant::now();
        tx.send_replace(Arc::new(cat.clone()));
        while stats.ack_count(ENDPOINT) < acks + u64::from(k) {
            if t.elapsed() > WAIT {
                bail!("round {round}: no ACK of the endpoint change");
            }
            tokio::time::sleep(poll).await;
        }
        let applied = t.elapsed();
        // And Envoy does hold it.
        if stat(admin, filter).await != Some(count.into()) {
            let seen = meshbridge_testkit::http::get(admin, "/stats?filter=svc00000")
                .await
                .unwrap_or_default();
            bail!("round {round}: ACKed, but envoy does not show {count} endpoints:\n{seen}");
        }
        took.push(applied);
    }
    took.sort();
    let p = |q: f64| took[((took.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "xds ({api_type}): {n} services, {k} envoys; every envoy had every cluster \
         {initial:?} after start; catalog change -> every envoy's ACK over {rounds} rounds: \
         p50 {:?}, p99 {:?}, max {:?}; RSS: bench process (gateway + catalog + this loop) \
         {rss_before} KiB before the envoys, {rss_connected} KiB with all connected, {} KiB \
         at the end; one envoy {} KiB",
        p(0.5),
        p(0.99),
        took[took.len() - 1],
        rss_kib("self"),
        rss_kib(&envoy_pid),
    );
    drop(envoys);
    gateway.shutdown().await;
    Ok(())
}
