//! The VM agent end to end, with real processes on 127.0.0.1: a registry that issues SVIDs,
//! a gateway site `east` with DNS, and `meshbridge agent` joining with a token made by
//! `meshbridge ctl token create`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "agent/mesh.rs"]
mod mesh;
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use mesh::{
    CHECK_INTERVAL_MS, Mesh, READY, SVID_TTL_MS, Service, TD, addr_in, echo, eventually, resolve,
    serial, spawn,
};
use meshbridge_core::client::Consistency;
use meshbridge_core::model::{ServiceKey, SiteKind};
use meshbridge_core::tls::{AllowList, Identity, cert_info};
use rustls_pki_types::ServerName;

const VM_NAME: &str = "billing.shop.svc.clusterset.local";
const EAST_NAME: &str = "front.shop.svc.clusterset.local";

/// The certificate the agent's tunnel listener presents to a new handshake (TCP fallback).
async fn presented_serial(
    identity: &Arc<Identity>,
    tunnel: SocketAddr,
) -> anyhow::Result<(String, i64)> {
    let cfg = identity.client_config(AllowList::any(), &[b"h2"]);
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(tunnel).await?;
    let stream = tls
        .connect(ServerName::try_from("vm").unwrap(), tcp)
        .await
        .context("TLS handshake with the agent's tunnel")?;
    let certs = stream
        .get_ref()
        .1
        .peer_certificates()
        .context("no certificate")?;
    let info = cert_info(&certs[0]).map_err(anyhow::Error::msg)?;
    Ok((info.serial, info.not_after))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_joins_is_reachable_by_name_follows_its_health_and_renews_in_place() {
    meshbridge_core::install_crypto_provider();
    let mesh = Mesh::start().await;
    let vm_service = Service::start("vm").await;
    let data = mesh.pki.dir().join("vm");
    let token = mesh.token("vm").await;
    let cfg = mesh.agent_config("vm", &data, &token, &vm_service, "billing");

    // Join with the token: an SVID for spiffe://<td>/site/vm/agent, key and chain 0600.
    let mut agent = spawn("agent-vm", &["agent", "--config", cfg.to_str().unwrap()]);
    let line = agent
        .wait_for("agent vm listening on", READY)
        .await
        .unwrap();
    assert!(
        line.contains(&format!("as spiffe://{TD}/site/vm/agent")),
        "{line}"
    );
    let tunnel = addr_in(&line, "listening on");
    let vm_dns = addr_in(&line, "dns");
    let svid = data.join("svid.pem");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&svid).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "svid.pem holds the private key");
    }
    let first_serial = serial(&svid);

    // East resolves the VM's service by its clusterset name, to a VIP of east's range,
    // and reaches it through the tunnel.
    let (vip, _) = eventually("east's DNS answers for the VM's service", READY, || async {
        resolve(mesh.east_dns, VM_NAME).await
    })
    .await;
    assert!(vip[0].octets()[..2] == [127, 244], "{vip:?}");
    let through_east = SocketAddr::new(vip[0].into(), vm_service.port);
    let (reply, _) = eventually("east reaches the VM through the tunnel", READY, || async {
        echo(through_east, "hello from east").await
    })
    .await;
    assert_eq!(reply, "vm: hello from east");

    // The other way: the VM's own DNS stub and VIP listener reach east's service.
    let (vip, _) = eventually(
        "the VM's DNS stub answers for east's service",
        READY,
        || async { resolve(vm_dns, EAST_NAME).await },
    )
    .await;
    assert!(vip[0].octets()[..2] == [127, 245], "{vip:?}");
    let from_vm = SocketAddr::new(vip[0].into(), mesh.east_service.port);
    let (reply, _) = eventually("the VM reaches east through its VIP", READY, || async {
        echo(from_vm, "hello from the vm").await
    })
    .await;
    assert_eq!(reply, "east: hello from the vm");

    // In the registry: a VM site with its locality, and (with its heartbeats) its link to east.
    let ctl = mesh.ctl_client().await;
    eventually("the VM reports its link to east", READY, || async {
        let sites = ctl.list_sites(Consistency::Linearizable).await?;
        let vm = sites
            .sites
            .iter()
            .find(|s| s.name == "vm")
            .context("no site vm")?;
        anyhow::ensure!(vm.kind == SiteKind::Vm && vm.locality.zone == "us-east-1b");
        anyhow::ensure!(
            vm.links
                .iter()
                .any(|l| l.peer_site == "east" && l.connected),
            "links: {:?}",
            vm.links
        );
        Ok(())
    })
    .await;

    // The health check fails: the endpoint leaves routing within about one interval
    // (plus the registry write and the watch to east).
    vm_service.healthy.store(false, Ordering::SeqCst);
    let (_, took) = eventually("the unhealthy endpoint leaves routing", READY, || async {
        match echo(through_east, "still there?").await {
            Ok(reply) => bail!("still routed: {reply}"),
            Err(_) => Ok(()),
        }
    })
    .await;
    let bound = Duration::from_millis(3 * CHECK_INTERVAL_MS + 2_000);
    eprintln!("unhealthy endpoint left routing in {took:?}");
    assert!(took < bound, "took {took:?}, bound {bound:?}");
    // The registry holds the endpoint as not ready; the name keeps its clusterset VIP (MCS:
    // like a ClusterIP without endpoints).
    let key = ServiceKey::new("shop", "billing");
    let svc = ctl
        .get_service(&key, Consistency::Linearizable)
        .await
        .unwrap()
        .value
        .unwrap();
    assert!(
        svc.groups
            .iter()
            .all(|g| g.endpoints.iter().all(|e| !e.ready)),
        "{svc:?}"
    );
    assert!(resolve(mesh.east_dns, VM_NAME).await.is_ok());

    // Healthy again: back in routing.
    vm_service.healthy.store(true, Ordering::SeqCst);
    let (reply, took) = eventually("the recovered endpoint is routed again", READY, || async {
        echo(through_east, "welcome back").await
    })
    .await;
    assert_eq!(reply, "vm: welcome back");
    eprintln!("recovered endpoint routed again in {took:?}");
    assert!(took < bound, "took {took:?}, bound {bound:?}");

    // Renewal in place: a new certificate in the data dir, presented to new handshakes
    // after the first one expired, and the same process still serving.
    let pid = agent.pid();
    let (renewed, _) = eventually(
        "the agent renews its SVID",
        Duration::from_millis(2 * SVID_TTL_MS),
        || async {
            let now = serial(&svid);
            if now == first_serial {
                bail!("still {now}");
            }
            Ok(now)
        },
    )
    .await;
    assert_ne!(renewed, first_serial);
    let probe = mesh
        .pki
        .identity("probe", &format!("spiffe://{TD}/site/probe/gateway"));
    let first_expiry = cert_info(&meshbridge_core::tls::load_certs(&svid).unwrap()[0])
        .unwrap()
        .not_after;
    let (_, _) = eventually(
        "the first SVID's lifetime passes with the agent still serving",
        Duration::from_millis(3 * SVID_TTL_MS),
        || async {
            let (presented, not_after) = presented_serial(&probe, tunnel).await?;
            if presented == first_serial {
                bail!("still presenting the joined certificate");
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs() as i64;
            if now <= first_expiry + 1 {
                bail!("the first renewed SVID has not expired yet");
            }
            anyhow::ensure!(not_after > now, "presented an expired certificate");
            Ok(())
        },
    )
    .await;
    let (reply, _) = eventually("still reachable after renewals", READY, || async {
        echo(through_east, "renewed").await
    })
    .await;
    assert_eq!(reply, "vm: renewed");
    assert_eq!(agent.pid(), pid, "renewed without a restart");
    let log = agent.collect().join("\n");
    assert!(log.contains("SVID renewed"), "{log}");

    // SIGTERM drains and exits cleanly.
    assert_eq!(agent.terminate(Duration::from_secs(10)).await, Some(0));
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_token_is_refused_with_the_reason_and_a_restart_needs_no_token() {
    meshbridge_core::install_crypto_provider();
    let mesh = Mesh::start().await;
    let svc = Service::start("vm").await;
    let token = mesh.token("vm").await;
    let data = mesh.pki.dir().join("vm");
    let cfg = mesh.agent_config("vm", &data, &token, &svc, "billing");
    let mut agent = spawn("agent-vm", &["agent", "--config", cfg.to_str().unwrap()]);
    agent
        .wait_for("agent vm listening on", READY)
        .await
        .unwrap();
    let code = agent.terminate(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "{}", agent.collect().join("\n"));

    // A restart uses the stored SVID: the (used) token in the file plays no part.
    let mut again = spawn(
        "agent-vm-again",
        &["agent", "--config", cfg.to_str().unwrap()],
    );
    again
        .wait_for("agent vm listening on", READY)
        .await
        .unwrap();
    let log = again.collect().join("\n");
    assert!(log.contains("using the SVID in data_dir"), "{log}");
    assert!(!log.contains("joined the mesh"), "{log}");
    assert_eq!(again.terminate(Duration::from_secs(10)).await, Some(0));

    // A fresh data dir with the same token: refused, non-zero exit, the reason named.
    let fresh = mesh.pki.dir().join("vm-copy");
    let cfg = mesh.agent_config("vm", &fresh, &token, &svc, "billing");
    let out = tokio::time::timeout(
        READY,
        tokio::process::Command::new(mesh::exe())
            .args(["agent", "--config", cfg.to_str().unwrap()])
            .env("MESHBRIDGE_LOG", "warn")
            .output(),
    )
    .await
    .expect("the agent exits")
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("second use of the token:\n{text}");
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("join_token"), "{text}");
    assert!(text.contains("join token"), "{text}");
    assert!(text.contains("already used by site vm"), "{text}");
    assert!(!fresh.join("svid.pem").exists());
    mesh.stop().await;
}
