//! Policy and identity: allowed peers pass, others are refused with the reason, policy
//! changes apply to new streams; gateways with certificates from another CA or another
//! trust domain cannot connect; certificate rotation does not drop open streams.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use common::*;
use meshbridge_core::model::Principal;
use meshbridge_core::tls::{BundleSource, Identity, IdentityFiles};
use meshbridge_gateway::TransportKind;
use meshbridge_gateway::transport::{Carrier, Dialer};
use meshbridge_testkit::pki::TestPki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PORT: u16 = 7201;
const AUTHORITY: &str = "echo.demo.svc.clusterset.local:7201";

fn carrier(t: TransportKind) -> Carrier {
    match t {
        TransportKind::Tcp => Carrier::Tcp,
        _ => Carrier::Quic,
    }
}

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

fn metrics_text(g: &meshbridge_gateway::GatewayHandle) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &g.registry()).unwrap();
    out
}

/// The server counts a refused handshake after it has sent the alert, so the
/// client can see the refusal first: wait (bounded) for the counter instead of
/// reading it once.
async fn metrics_eventually(g: &meshbridge_gateway::GatewayHandle, line: &str) -> String {
    let mut m = metrics_text(g);
    for _ in 0..300 {
        if m.contains(line) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        m = metrics_text(g);
    }
    m
}

async fn policy_allows_denies_and_changes_apply_to_new_streams(t: TransportKind) -> Result<()> {
    let mesh = Mesh::new(t);
    let echo = Echo::start(None).await?;
    let east = mesh.gateway(&site("east", "r1", "a")).await?;
    let west = mesh.gateway(&site("west", "r1", "b")).await?;
    let north = mesh.gateway(&site("north", "r2", "c")).await?;
    mesh.feed.export("east", &key("echo"), PORT, &[echo.addr]);
    mesh.feed.policy(
        "echo-from-west",
        &key("echo"),
        vec![Principal::Site("west".into())],
    );
    mesh.feed.synced(&[&east, &west, &north]).await;

    let (status, mut from_west) = http_connect(west.connect_addr().unwrap(), AUTHORITY).await?;
    assert_eq!(status, "HTTP/1.1 200 OK");
    round_trip(&mut from_west, b"west is allowed").await?;
    let (status, _) = http_connect(north.connect_addr().unwrap(), AUTHORITY).await?;
    assert!(status.starts_with("HTTP/1.1 403 Forbidden"), "{status}");
    assert!(
        status.contains(&format!("spiffe://{TD}/site/north/gateway is not allowed")),
        "the reason names the identity: {status}"
    );
    let m = metrics_text(&east);
    assert!(
        m.contains("meshbridge_gateway_policy_denials_total{site=\"east\",peer_site=\"north\"} 1"),
        "{m}"
    );

    // Now only north may connect: new streams follow the new policy at once.
    mesh.feed.policy(
        "echo-from-west",
        &key("echo"),
        vec![Principal::Site("north".into())],
    );
    mesh.feed.synced(&[&east]).await;
    let (status, mut from_north) = http_connect(north.connect_addr().unwrap(), AUTHORITY).await?;
    assert_eq!(status, "HTTP/1.1 200 OK");
    round_trip(&mut from_north, b"north now").await?;
    let (status, _) = http_connect(west.connect_addr().unwrap(), AUTHORITY).await?;
    assert!(status.starts_with("HTTP/1.1 403"), "{status}");
    // A stream authorized when it opened is not cut.
    round_trip(&mut from_west, b"still open").await?;
    Ok(())
}
both_transports!(policy_allows_denies_and_changes_apply_to_new_streams);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_deny_refuses_services_without_policy() -> Result<()> {
    let mesh = Mesh::new(TransportKind::Quic);
    let echo = Echo::start(None).await?;
    let mut cfg = mesh.config("east");
    cfg.policy.default = meshbridge_gateway::DefaultAction::Deny;
    let east = mesh
        .gateway_with(&site("east", "r1", "a"), cfg, mesh.identity("east"))
        .await?;
    let west = mesh.gateway(&site("west", "r1", "b")).await?;
    mesh.feed.export("east", &key("echo"), PORT, &[echo.addr]);
    mesh.feed.synced(&[&east, &west]).await;
    let (status, _) = http_connect(west.connect_addr().unwrap(), AUTHORITY).await?;
    assert!(
        status.contains("403") && status.contains("default is deny"),
        "{status}"
    );
    mesh.feed.policy(
        "all-of-corp",
        &key("echo"),
        vec![Principal::TrustDomain(TD.into())],
    );
    mesh.feed.synced(&[&east]).await;
    let (status, _) = http_connect(west.connect_addr().unwrap(), AUTHORITY).await?;
    assert_eq!(status, "HTTP/1.1 200 OK");
    Ok(())
}

/// An identity of `id` from `pki` that trusts the mesh's CA too (so only the mesh side can
/// refuse the handshake).
fn rogue(pki: &TestPki, mesh: &Mesh, id: &str, federate: bool) -> Arc<Identity> {
    let mut files = pki.issue("rogue", id);
    let mesh_ca = mesh.pki.ca_dir().join("ca.pem");
    if federate {
        files.federated = vec![BundleSource {
            path: mesh_ca,
            trust_domain: Some(TD.into()),
        }];
    } else {
        let both = [
            std::fs::read_to_string(&files.bundle).unwrap(),
            std::fs::read_to_string(&mesh_ca).unwrap(),
        ]
        .concat();
        let path = pki.dir().join("both.pem");
        std::fs::write(&path, both).unwrap();
        files = IdentityFiles {
            bundle: path,
            ..files
        };
    }
    Identity::load(files).unwrap()
}

async fn foreign_certificates_cannot_connect(t: TransportKind) -> Result<()> {
    let mesh = Mesh::new(t);
    let echo = Echo::start(None).await?;
    let east = mesh.gateway(&site("east", "r1", "a")).await?;
    let west = mesh.gateway(&site("west", "r1", "b")).await?;
    mesh.feed.export("east", &key("echo"), PORT, &[echo.addr]);
    mesh.feed.synced(&[&east, &west]).await;

    let other_ca = TestPki::new(TD);
    let other_td = TestPki::new("evil.example");
    let cases = [
        (
            "another CA",
            rogue(
                &other_ca,
                &mesh,
                &format!("spiffe://{TD}/site/west/gateway"),
                false,
            ),
        ),
        (
            "another trust domain",
            rogue(
                &other_td,
                &mesh,
                "spiffe://evil.example/site/west/gateway",
                true,
            ),
        ),
    ];
    let cfg = mesh.config("probe").tunnel;
    let workload = mesh
        .pki
        .identity("workload", &format!("spiffe://{TD}/ns/shop/sa/web"));
    let cases = [
        cases[0].clone(),
        cases[1].clone(),
        ("a workload, not a site", workload),
    ];
    for (what, identity) in cases {
        let dialer = Dialer::standalone(&identity, &cfg, localhost(0))?;
        let r = dialer.connect(east.tunnel_addr(), carrier(t)).await;
        let Err(e) = r else {
            bail!("{what}: handshake succeeded");
        };
        eprintln!("{what}: refused: {e}");
        dialer.close();
    }
    let line =
        "meshbridge_gateway_failures_total{site=\"east\",peer_site=\"-\",reason=\"handshake\"} 3";
    let m = metrics_eventually(&east, line).await;
    assert!(m.contains(line), "{m}");
    // The mesh's own gateways are unaffected.
    let vip = west
        .service_addr(&key("echo"), PORT, WAIT)
        .await
        .context("vip")?;
    ping(vip, "", b"still fine").await?;
    Ok(())
}
both_transports!(foreign_certificates_cannot_connect);

/// A federated partner's gateway is verified against the partner's roots, but `*` (the
/// default `peers_allowed`) means our own trust domain's sites: a partner's `site/west`
/// is not our `west` and cannot open a tunnel unless the partner domain is named.
async fn a_partners_site_is_not_ours_unless_named(t: TransportKind) -> Result<()> {
    let mesh = Mesh::new(t);
    let partner = TestPki::new("partner.example");
    // East trusts the partner's CA for the partner's domain (correct federation).
    let mut files = mesh
        .pki
        .issue("gw-east-fed", &format!("spiffe://{TD}/site/east/gateway"));
    files.federated = vec![BundleSource {
        path: partner.ca_dir().join("ca.pem"),
        trust_domain: Some("partner.example".into()),
    }];
    let east_id = Identity::load(files)?;
    let east = mesh
        .gateway_with(
            &site("east", "r1", "a"),
            mesh.config("east"),
            east_id.clone(),
        )
        .await?;
    let mut named = mesh.config("east2");
    named.tunnel.peers_allowed = vec!["*".into(), "spiffe://partner.example".into()];
    let east2 = mesh
        .gateway_with(&site("east2", "r1", "a"), named, east_id)
        .await?;
    // The partner's west gateway trusts our CA for our domain.
    let partner_west = rogue(
        &partner,
        &mesh,
        "spiffe://partner.example/site/west/gateway",
        true,
    );
    let mut cfg = mesh.config("probe").tunnel;
    cfg.peers_allowed = vec![format!("spiffe://{TD}")];
    let dialer = Dialer::standalone(&partner_west, &cfg, localhost(0))?;
    let refused = dialer.connect(east.tunnel_addr(), carrier(t)).await;
    assert!(refused.is_err(), "a partner's site passed `*`");
    // Named explicitly: the same partner identity is accepted.
    let accepted = dialer.connect(east2.tunnel_addr(), carrier(t)).await;
    let Ok((link, id, _)) = accepted else {
        bail!("the named partner domain was refused");
    };
    assert_eq!(id.to_string(), format!("spiffe://{TD}/site/east/gateway"));
    link.close("done");
    dialer.close();
    Ok(())
}
both_transports!(a_partners_site_is_not_ours_unless_named);

/// Tunnel limits: one peer identity may hold `tunnel.max_links_per_peer` links to a
/// gateway (more are closed after the handshake, counted as `link_limit`), and a gateway
/// serves at most `tunnel.max_inbound_streams` streams at once (more are answered
/// "draining", counted as `stream_limit`, and the client's connection fails over or fails).
async fn links_per_peer_and_inbound_streams_are_bounded(t: TransportKind) -> Result<()> {
    let mesh = Mesh::new(t);
    let echo = Echo::start(None).await?;
    let mut cfg = mesh.config("east");
    cfg.tunnel.max_links_per_peer = 2;
    cfg.tunnel.max_inbound_streams = 1;
    let east = mesh
        .gateway_with(&site("east", "r1", "a"), cfg, mesh.identity("east"))
        .await?;
    let west = mesh.gateway(&site("west", "r1", "b")).await?;
    mesh.feed.export("east", &key("echo"), PORT, &[echo.addr]);
    mesh.feed.synced(&[&east, &west]).await;

    // Streams: one connection through west holds east's only stream...
    let vip = west
        .service_addr(&key("echo"), PORT, WAIT)
        .await
        .context("vip")?;
    let mut held = TcpStream::connect(vip).await?;
    round_trip(&mut held, b"holds the one stream").await?;
    // ...so a second one is refused by east, and the client sees its connection fail.
    assert!(ping(vip, "", b"one too many").await.is_err());
    let line = "meshbridge_gateway_failures_total{site=\"east\",peer_site=\"west\",reason=\"stream_limit\"}";
    let m = metrics_eventually(&east, line).await;
    assert!(m.contains(line), "{m}");
    drop(held);

    // Links: a third link of the same peer identity is closed after the handshake.
    let probe = mesh.identity("probe");
    let tunnel = mesh.config("probe").tunnel;
    let mut links = Vec::new();
    for _ in 0..3 {
        let dialer = Dialer::standalone(&probe, &tunnel, localhost(0))?;
        // The third may fail at once (TCP: the server closes before HTTP/2) or be closed
        // right after (QUIC): either way the server counts it.
        if let Ok((link, _, _)) = dialer.connect(east.tunnel_addr(), carrier(t)).await {
            links.push((dialer, link));
        }
    }
    let line = "meshbridge_gateway_failures_total{site=\"east\",peer_site=\"probe\",reason=\"link_limit\"} 1";
    let m = metrics_eventually(&east, line).await;
    assert!(m.contains(line), "{m}");
    for (dialer, link) in links {
        link.close("done");
        dialer.close();
    }
    Ok(())
}
both_transports!(links_per_peer_and_inbound_streams_are_bounded);

/// A proxied connection with no byte either way for `tunnel.stream_idle_timeout_ms` is
/// closed by the gateways; one that keeps talking is not.
async fn idle_proxied_connections_are_closed(t: TransportKind) -> Result<()> {
    let mesh = Mesh::new(t);
    let echo = Echo::start(None).await?;
    let idle_cfg = |name: &str| {
        let mut c = mesh.config(name);
        c.tunnel.stream_idle_timeout_ms = 400;
        c
    };
    let east = mesh
        .gateway_with(
            &site("east", "r1", "a"),
            idle_cfg("east"),
            mesh.identity("east"),
        )
        .await?;
    let west = mesh
        .gateway_with(
            &site("west", "r1", "b"),
            idle_cfg("west"),
            mesh.identity("west"),
        )
        .await?;
    mesh.feed.export("east", &key("echo"), PORT, &[echo.addr]);
    mesh.feed.synced(&[&east, &west]).await;
    let vip = west
        .service_addr(&key("echo"), PORT, WAIT)
        .await
        .context("vip")?;
    let mut busy = TcpStream::connect(vip).await?;
    let mut quiet = TcpStream::connect(vip).await?;
    round_trip(&mut quiet, b"then silence").await?;
    // The busy one talks every 100 ms for well past the idle timeout and stays open.
    for i in 0..12 {
        round_trip(&mut busy, format!("ping {i}").as_bytes()).await?;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The quiet one was closed by now: reading ends (EOF or reset), without waiting.
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(std::time::Duration::from_millis(10), quiet.read(&mut buf))
        .await
        .context("the idle connection is still open")?;
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    round_trip(&mut busy, b"still here").await?;
    Ok(())
}
both_transports!(idle_proxied_connections_are_closed);

/// Dialing site `east` must reach exactly `spiffe://<our td>/site/east/gateway` (or its
/// agent): a partner's `site/east`, another site, `east-evil` or a workload is the wrong peer.
#[tokio::test]
async fn a_dialed_site_must_present_exactly_its_own_id() {
    let mesh = Mesh::new(TransportKind::Quic);
    let dialer = Dialer::standalone(
        &mesh.identity("west"),
        &mesh.config("west").tunnel,
        localhost(0),
    )
    .unwrap();
    let id = |s: &str| meshbridge_core::id::SpiffeId::parse(s).unwrap();
    assert!(dialer.is_expected_peer("east", &id(&format!("spiffe://{TD}/site/east/gateway"))));
    assert!(dialer.is_expected_peer("east", &id(&format!("spiffe://{TD}/site/east/agent"))));
    for wrong in [
        "spiffe://partner.example/site/east/gateway".to_string(),
        format!("spiffe://{TD}/site/west/gateway"),
        format!("spiffe://{TD}/site/east-evil/gateway"),
        format!("spiffe://{TD}/site/east/gateway/extra"),
        format!("spiffe://{TD}/ns/shop/sa/east"),
    ] {
        assert!(!dialer.is_expected_peer("east", &id(&wrong)), "{wrong}");
    }
    dialer.close();
}

async fn certificate_rotation_keeps_open_streams(t: TransportKind) -> Result<()> {
    let mesh = Mesh::new(t);
    let echo = Echo::start(None).await?;
    let east_id = mesh.identity("east");
    let west_id = mesh.identity("west");
    let east = mesh
        .gateway_with(
            &site("east", "r1", "a"),
            mesh.config("east"),
            east_id.clone(),
        )
        .await?;
    let west = mesh
        .gateway_with(
            &site("west", "r1", "b"),
            mesh.config("west"),
            west_id.clone(),
        )
        .await?;
    mesh.feed.export("east", &key("echo"), PORT, &[echo.addr]);
    mesh.feed.synced(&[&east, &west]).await;
    let vip = west
        .service_addr(&key("echo"), PORT, WAIT)
        .await
        .context("vip")?;
    let mut open = TcpStream::connect(vip).await?;
    round_trip(&mut open, b"before rotation").await?;

    for (site_name, id) in [("east", &east_id), ("west", &west_id)] {
        let before = id.cert_info().serial;
        mesh.pki.issue(
            &format!("gw-{site_name}"),
            &format!("spiffe://{TD}/site/{site_name}/gateway"),
        );
        assert!(id.reload()?, "{site_name}: new certificate not picked up");
        assert_ne!(before, id.cert_info().serial);
    }
    round_trip(&mut open, b"after rotation, same stream").await?;
    ping(vip, "", b"new stream after rotation").await?;
    // A brand-new link handshakes with the new certificates.
    let south = mesh.gateway(&site("south", "r1", "c")).await?;
    mesh.feed.synced(&[&south]).await;
    let (status, mut s) = http_connect(south.connect_addr().unwrap(), AUTHORITY).await?;
    assert_eq!(status, "HTTP/1.1 200 OK");
    round_trip(&mut s, b"new link").await?;
    round_trip(&mut open, b"and the old stream still works").await?;
    Ok(())
}
both_transports!(certificate_rotation_keeps_open_streams);
