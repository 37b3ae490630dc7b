//! The data path of an import, for real: a client in west's "pod" network namespace
//! connects to the address and port of west's imported EndpointSlice (written by west's
//! adapter), lands on west's gateway, which tunnels (QUIC, mTLS) to east's gateway, which
//! connects to the echo server behind east's exported EndpointSlice in east's "pod"
//! namespace. The pod namespaces reach the host's gateways over veth pairs the test makes.

#![allow(clippy::unwrap_used)]

#[path = "kube/env.rs"]
mod env;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use env::*;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, PostParams};
use meshbridge_testkit::kube::ApiServerOptions;
use meshbridge_testkit::netns::{self, HostLink, Netns};

const WITHIN: Duration = Duration::from_secs(30);

/// One line through `addr` from inside `ns` (bash's /dev/tcp; no tool of ours in the pod).
async fn echo_from(ns: &Netns, addr: &str, port: i32, line: &str) -> Result<String> {
    let script = format!(
        "exec 3<>/dev/tcp/{addr}/{port} && echo {line} >&3 && read -t 5 reply <&3 && echo \"$reply\""
    );
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        ns.tokio_command("bash").args(["-c", &script]).output(),
    )
    .await
    .context("client timed out")??;
    anyhow::ensure!(
        out.status.success(),
        "client: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_in_west_reaches_easts_service_through_the_imported_endpoint_slice() -> Result<()> {
    if !netns::available() {
        return Ok(());
    }
    let slot = meshbridge_testkit::slots::take("kube-pod-nets", 200);
    let east_pod = Netns::new("east-pod")?;
    let west_pod = Netns::new("west-pod")?;
    let (east_host, east_ip) = (format!("10.78.{slot}.1"), format!("10.78.{slot}.2"));
    let (west_host, west_ip) = (format!("10.79.{slot}.1"), format!("10.79.{slot}.2"));
    let _l1 = HostLink::new(&east_pod, &east_host, &east_ip)?;
    let _l2 = HostLink::new(&west_pod, &west_host, &west_ip)?;

    // east's workload: an echo server in east's pod namespace.
    let mut cmd = east_pod.tokio_command(exe());
    cmd.args([
        "echo",
        "--listen",
        &format!("{east_ip}:8080"),
        "--name",
        "east",
    ]);
    let mut echo = meshbridge_testkit::process::Proc::spawn("echo", cmd)?;
    echo.wait_for("listening on", READY).await?;

    // west's gateway listens for imports on its host-side address, which west's cluster
    // knows as the gateway's pod address.
    let env = Env::start_with(
        &["east", "west"],
        ApiServerOptions::default(),
        &[("west", &west_host)],
    )
    .await?;
    let mut a_east = env.adapter("east", "east-0").await?;
    let mut a_west = env.adapter("west", "west-0").await?;
    let changed = Instant::now();
    export_service(env.admin("east"), "web", &[&east_ip]).await?;

    let slices: Api<EndpointSlice> = Api::namespaced(env.admin("west").clone(), "shop");
    let deadline = Instant::now() + WITHIN;
    let (addr, port) = loop {
        let list = slices
            .list(&ListParams::default().labels("multicluster.kubernetes.io/service-name=web"))
            .await?;
        let found = list.items.first().and_then(|s| {
            let addr = s.endpoints.as_ref()?.first()?.addresses.first()?.clone();
            let port = s.ports.as_ref()?.first()?.port?;
            Some((addr, port))
        });
        if let Some(f) = found {
            break f;
        }
        assert!(
            Instant::now() < deadline,
            "no imported EndpointSlice in west; adapter:\n{}",
            a_west.collect().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "west's imported EndpointSlice: {addr}:{port}, {:?} after east's export",
        changed.elapsed()
    );
    assert_eq!(addr, west_host);

    // The gateway binds the import port once its catalog has the service; retry until then.
    let deadline = Instant::now() + WITHIN;
    let reply = loop {
        match echo_from(&west_pod, &addr, port, "hello-from-west").await {
            Ok(r) if !r.is_empty() => break r,
            other => assert!(
                Instant::now() < deadline,
                "west pod never got through: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(reply, "east: hello-from-west");
    println!(
        "west pod -> {addr}:{port} -> west gateway -> tunnel -> east gateway -> {east_ip}:8080: {reply:?}"
    );

    // A draining endpoint (serving, terminating: exported not ready) with nothing behind
    // it is never chosen: every connection still reaches east's echo.
    slices_east(&env, &format!("10.78.{slot}.3")).await?;
    env.until_catalog("the draining endpoint in the registry", WITHIN, |c| {
        exported(c, "east", "web").is_some_and(|v| v.len() == 2)
    })
    .await?;
    for i in 0..5 {
        assert_eq!(
            echo_from(&west_pod, &addr, port, &format!("again-{i}")).await?,
            format!("east: again-{i}")
        );
    }
    a_east.terminate(Duration::from_secs(5)).await;
    a_west.terminate(Duration::from_secs(5)).await;
    echo.terminate(Duration::from_secs(5)).await;
    env.stop().await;
    Ok(())
}

async fn slices_east(env: &Env, draining: &str) -> Result<()> {
    Api::<EndpointSlice>::namespaced(env.admin("east").clone(), "shop")
        .create(
            &PostParams::default(),
            &endpoint_slice(
                "web",
                "web-2",
                &[(draining, Some(false), Some(true), Some(true), None)],
                &[("http", 8080)],
            ),
        )
        .await?;
    Ok(())
}
