//! `bench/kube.sh`: the kube adapter's figures, against real kube-apiservers (built by
//! tools/build.sh) and the release binary's registry, gateways, adapters and DNS, all on
//! 127.0.0.1 (object-model addresses only; nothing is sent to them):
//! 1. change latency: an EndpointSlice change in east → the registry holds it → west's
//!    imported EndpointSlice shows it → `meshbridge dns` (site west) answers it; a headless
//!    service, so that every stage carries the endpoint address; N changes (default 200);
//! 2. initial sync: S Services (default 10,000) with ServiceExports created while east's
//!    adapter is stopped; then the time from its start to all S in the registry;
//! 3. adapter RSS: idle (nothing exported), and with 1,000 Services × 10 endpoints.
//!
//! Environment: CHANGES, SERVICES, RSS_SERVICES; PHASES (default `latency,rss,sync`) picks
//! the parts. During the sync phase west's adapter is stopped, so the figure is east's
//! export path alone (2 cores shared by everything here). Prints one line per figure.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

#[path = "../tests/kube/env.rs"]
mod env;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::Result;
use env::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use meshbridge_federation::kube::crd::ServiceExport;
use meshbridge_testkit::kube::ApiServerOptions;

fn var(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn change_latency(env: &Env, changes: usize) -> Result<()> {
    let east = env.admin("east").clone();
    let west = env.admin("west").clone();
    let (mut dns, dns_addr) = env.start_dns("west").await?;
    Api::<Service>::namespaced(east.clone(), "shop")
        .create(
            &PostParams::default(),
            &service("lat", true, &[("tcp", 9000, 9000)]),
        )
        .await?;
    let slices = Api::<EndpointSlice>::namespaced(east.clone(), "shop");
    let ip = |i: usize| format!("10.2.{}.{}", (i / 250) % 250, i % 250 + 1);
    slices
        .create(
            &PostParams::default(),
            &endpoint_slice(
                "lat",
                "lat-1",
                &[(&ip(0), Some(true), None, None, None)],
                &[("tcp", 9000)],
            ),
        )
        .await?;
    Api::<ServiceExport>::namespaced(east.clone(), "shop")
        .create(&PostParams::default(), &service_export("lat"))
        .await?;
    // West's imported slices, watched (event-driven): the address each now carries.
    let (seen_tx, seen_rx) = tokio::sync::watch::channel(String::new());
    let wapi = Api::<EndpointSlice>::namespaced(west.clone(), "shop");
    let cfg = watcher::Config::default().labels("multicluster.kubernetes.io/service-name=lat");
    tokio::spawn(async move {
        let mut s = std::pin::pin!(watcher(wapi, cfg).applied_objects());
        while let Some(Ok(slice)) = s.next().await {
            if let Some(a) = slice
                .endpoints
                .as_ref()
                .and_then(|e| e.first())
                .and_then(|e| e.addresses.first())
            {
                seen_tx.send_replace(a.clone());
            }
        }
    });
    let mut reg = Vec::new();
    let mut imp = Vec::new();
    let mut dns_lat = Vec::new();
    for i in 1..=changes {
        let want = ip(i);
        let patch = serde_json::json!({"endpoints": [{"addresses": [want], "conditions": {"ready": true}}]});
        let t0 = Instant::now();
        slices
            .patch("lat-1", &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        let w = want.clone();
        env.until_catalog("change in the registry", Duration::from_secs(10), |c| {
            exported(c, "east", "lat").is_some_and(|v| v == [w.clone()])
        })
        .await?;
        reg.push(t0.elapsed());
        let mut rx = seen_rx.clone();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|a| *a == want)).await??;
        imp.push(t0.elapsed());
        let want_ip: Ipv4Addr = want.parse()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dig_a(dns_addr, "lat.shop.svc.clusterset.local")
            .await
            .unwrap_or_default()
            .contains(&want_ip)
        {
            anyhow::ensure!(Instant::now() < deadline, "dns never answered {want}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        dns_lat.push(t0.elapsed());
    }
    for (what, v) in [
        ("registry", &mut reg),
        ("west imported EndpointSlice", &mut imp),
        ("meshbridge dns", &mut dns_lat),
    ] {
        println!(
            "change latency east EndpointSlice -> {what}: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({changes} changes)",
            pct(v, 0.5).as_secs_f64() * 1e3,
            pct(v, 0.99).as_secs_f64() * 1e3,
            pct(v, 1.0).as_secs_f64() * 1e3
        );
    }
    dns.terminate(Duration::from_secs(5)).await;
    Ok(())
}

/// Create `n` Services with `eps` endpoints each and their ServiceExports, `prefix`-named.
async fn create_services(client: &kube::Client, prefix: &str, n: usize, eps: usize) -> Result<()> {
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let client = client.clone();
            async move {
                let name = format!("{prefix}{i}");
                let ips: Vec<String> = (0..eps)
                    .map(|e| format!("10.{}.{}.{}", 3 + (i / 250) % 200, i % 250, e + 1))
                    .collect();
                let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
                export_service(&client, &name, &refs).await
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    eprintln!(
        "created {n} services ({eps} endpoints each) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    meshbridge_core::install_crypto_provider();
    let changes = var("CHANGES", 200);
    let services = var("SERVICES", 10_000);
    let rss_services = var("RSS_SERVICES", 1_000);
    let phases = std::env::var("PHASES").unwrap_or_else(|_| "latency,rss,sync".into());
    let env = Env::start(&["east", "west"], ApiServerOptions::default()).await?;

    // RSS idle: both adapters up, nothing exported.
    let mut a_east = env.adapter("east", "east-0").await?;
    let mut a_west = env.adapter("west", "west-0").await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle = rss_kib(a_east.pid().unwrap_or(0));
    println!("adapter RSS idle: {:.1} MiB", idle as f64 / 1024.0);

    if phases.contains("latency") {
        change_latency(&env, changes).await?;
    }

    // RSS with RSS_SERVICES × 10 endpoints exported.
    if phases.contains("rss") {
        create_services(env.admin("east"), "r", rss_services, 10).await?;
        env.until_catalog("rss services exported", Duration::from_secs(300), |c| {
            c.exports
                .keys()
                .filter(|(k, s)| s == "east" && k.name.starts_with('r'))
                .count()
                >= rss_services
        })
        .await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        println!(
            "adapter RSS with {rss_services} services x 10 endpoints: {:.1} MiB (west, importing them: {:.1} MiB)",
            rss_kib(a_east.pid().unwrap_or(0)) as f64 / 1024.0,
            rss_kib(a_west.pid().unwrap_or(0)) as f64 / 1024.0
        );
    }
    if !phases.contains("sync") {
        a_east.terminate(Duration::from_secs(5)).await;
        a_west.terminate(Duration::from_secs(5)).await;
        env.stop().await;
        return Ok(());
    }

    // Initial sync: stop east's adapter, create SERVICES more, start it, time to all of them.
    a_east.terminate(Duration::from_secs(5)).await;
    a_west.terminate(Duration::from_secs(5)).await;
    create_services(env.admin("east"), "s", services, 1).await?;
    let t0 = Instant::now();
    let mut a_east = env.adapter("east", "east-1").await?;
    env.until_catalog("initial sync", Duration::from_secs(600), |c| {
        c.exports
            .keys()
            .filter(|(k, s)| s == "east" && k.name.starts_with('s'))
            .count()
            >= services
    })
    .await?;
    println!(
        "initial sync of {services} exported services (adapter start -> all in the registry): {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    a_east.terminate(Duration::from_secs(5)).await;
    env.stop().await;
    Ok(())
}
