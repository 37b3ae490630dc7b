//! A real Envoy configured over mutual TLS by a real gateway process, and its rejection seen
//! where an operator looks: the gateway reports its xDS clients' standing NACKs with its
//! heartbeats, and `ctl status` names the client, the site, the resource type and Envoy's
//! error, until that client goes. The report survives SIGKILL of the gateway and of the
//! registry (restarted at once from its data directory).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use meshbridge_core::client::{Consistency, RegistryClient};
use meshbridge_federation::site::{ExportSpec, Registration};
use meshbridge_gateway::config::XdsConfig;
use meshbridge_testkit::envoy::{Envoy, ads_bootstrap};
use meshbridge_testkit::pki::TestPki;
use meshbridge_testkit::probe::eventually;
use serde_json::Value;
use support::{LOOPBACK, READY, ctl_status_json, registered_gateway, registry, spawn, write};

const TD: &str = "xds.example";

fn ctl_status(url: &str, tls_dir: &std::path::Path) -> Value {
    let mut ctl = std::process::Command::new(env!("CARGO_BIN_EXE_meshbridge"));
    ctl.args(["ctl", "--registry", url, "--tls-dir"])
        .arg(tls_dir);
    ctl_status_json(ctl)
}

fn nack_problems(status: &Value) -> Vec<String> {
    status["problems"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str())
        .filter(|p| p.starts_with("xDS client"))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envoy_over_mtls_that_rejects_a_listener_shows_in_ctl_status_until_it_goes() -> Result<()>
{
    let pki = TestPki::new(TD);
    let root = pki.dir().to_path_buf();
    let (mut registry, url) = registry(&pki, TD).await?;
    let ctl_dir = pki
        .issue("ctl", &format!("spiffe://{TD}/ctl/ops"))
        .cert
        .parent()
        .unwrap()
        .to_path_buf();

    // A service whose port is taken on the address Envoy's listeners bind: Envoy cannot
    // bind its listener and rejects the listener response.
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.port();
    let backend = std::net::TcpListener::bind("127.0.0.1:0")?;
    let backend_port = backend.local_addr()?.port();
    let xds_port = meshbridge_testkit::kube::free_port()?;
    let mut west = registered_gateway(&pki, TD, "west", &url);
    west.gateway.xds = Some(XdsConfig {
        listen: format!("127.0.0.1:{xds_port}"),
        listener_address: Some(LOOPBACK),
        ..XdsConfig::default()
    });
    west.register = Some(Registration {
        lease_ttl_ms: 3000,
        ..Registration::default()
    });
    west.exports = vec![ExportSpec::tcp(
        "demo",
        "busy",
        (port, backend_port),
        &[LOOPBACK],
    )];
    let cfg = write(&pki, "gw-west", &west)?;
    let mut gateway = spawn("gateway west", &cfg, "gateway", &[])?;
    gateway.wait_for("listening on", READY).await?;

    // Envoy connects over mutual TLS with an SVID of the trust domain, and takes only the
    // gateway's id as the server.
    let envoy_files = pki.issue("envoy", &format!("spiffe://{TD}/ns/demo/sa/web"));
    let server_id = format!("spiffe://{TD}/site/west/gateway");
    let xds: SocketAddr = ([127, 0, 0, 1], xds_port).into();
    let mut envoy = Envoy::start(ads_bootstrap(
        "sidecar-nack",
        xds,
        "GRPC",
        Some((&envoy_files, &server_id)),
    ))
    .await?;
    // It got its configuration over mTLS: the service's cluster and endpoint.
    let cluster = format!("busy.demo.svc.clusterset.local:{port}");
    envoy
        .until_endpoints(&cluster, &[([127, 0, 0, 1], backend_port).into()])
        .await?;

    // The rejection reaches ctl status with the next heartbeat.
    let problems = eventually("the NACK in ctl status", READY, || async {
        let p = nack_problems(&ctl_status(&url, &ctl_dir));
        let seen = format!("{p:?}");
        ((!p.is_empty()).then_some(p), seen)
    })
    .await;
    assert_eq!(problems.len(), 1, "{problems:?}");
    let p = &problems[0];
    assert!(
        p.starts_with(
            "xDS client sidecar-nack of site west rejected its Listener configuration (NACK)"
        ),
        "{p}"
    );
    assert!(p.contains(&format!("127.0.0.1:{port}")), "{p}");
    let status = ctl_status(&url, &ctl_dir);
    let row = &status["xds_rejections"][0];
    assert_eq!(row["node"], "sidecar-nack", "{status:#}");
    assert_eq!(
        row["type_url"], "type.googleapis.com/envoy.config.listener.v3.Listener",
        "{status:#}"
    );
    assert_eq!(status["ok"], false);

    // The report is a Raft write like any other: with the gateway SIGKILLed (no heartbeat
    // can write it again) and the registry SIGKILLed and restarted at once from its data
    // directory, the last report is still there.
    gateway.kill9().await;
    registry.kill9().await;
    let registry_cfg = root.join("registry.toml");
    let mut registry = spawn("registry", &registry_cfg, "registry", &[])?;
    registry.wait_for("listening on", READY).await?;
    let admin = RegistryClient::connect(
        std::slice::from_ref(&url),
        pki.identity("ops", &format!("spiffe://{TD}/ctl/ops2")),
    )
    .await?;
    let west = eventually("west in the restarted registry", READY, || async {
        let sites = admin.list_sites(Consistency::Linearizable).await;
        let seen = format!("{sites:?}");
        let west = sites
            .ok()
            .and_then(|l| l.sites.into_iter().find(|s| s.name == "west"));
        (west, seen)
    })
    .await;
    assert_eq!(west.xds_rejections.len(), 1, "{west:?}");
    assert_eq!(west.xds_rejections[0].node, "sidecar-nack");

    // The gateway comes back on the same addresses; Envoy reconnects and rejects again.
    let mut gateway = spawn("gateway west", &cfg, "gateway", &[])?;
    gateway.wait_for("listening on", READY).await?;
    eventually("the NACK in ctl status again", READY, || async {
        let p = nack_problems(&ctl_status(&url, &ctl_dir));
        let seen = format!("{p:?}");
        ((p.len() == 1).then_some(()), seen)
    })
    .await;

    // The client goes: its rejection stops standing, and the problem goes too.
    envoy.kill().await;
    eventually("the NACK gone from ctl status", READY, || async {
        let p = nack_problems(&ctl_status(&url, &ctl_dir));
        let seen = format!("{p:?}");
        (p.is_empty().then_some(()), seen)
    })
    .await;
    drop((taken, backend));
    gateway.terminate(Duration::from_secs(5)).await;
    registry.terminate(Duration::from_secs(5)).await;
    Ok(())
}
