//! Istio's shape with real Envoys (1.40, `MESHBRIDGE_ENVOY`): a "sidecar" Envoy in west
//! originates mutual TLS with its own SPIFFE certificate and Istio's SNI
//! (`outbound_.<port>_._.<svc>.<ns>.svc.cluster.local`) to west's gateway; the gateways carry
//! the TLS session untouched (SNI passthrough) to east, where another Envoy terminates it in
//! front of the echo server. The session is the Envoys' own: each checks the other's SPIFFE
//! id, and east's Envoy logs west's Envoy's certificate.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Instant;

use anyhow::{Context, Result, bail};
use common::*;
use meshbridge_core::tls::IdentityFiles;
use meshbridge_gateway::TransportKind;
use meshbridge_testkit::envoy::{ENVOY_WAIT, Envoy, static_cluster, tls_socket};
use serde_json::{Value, json};

const PORT: u16 = 7001; // the port in SNI and CLUSTER

/// A listener `name` on a free loopback port, `tcp_proxy` to `cluster`, optionally with a
/// downstream TLS socket and an access log of the peer's URI SAN to `log`.
fn tcp_listener(name: &str, cluster: &str, tls: Option<Value>, log: Option<&str>) -> Value {
    let mut proxy = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": name,
        "cluster": cluster
    });
    if let Some(path) = log {
        proxy["access_log"] = json!([{
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": path,
                "log_format": { "text_format_source": {
                    "inline_string": "peer=%DOWNSTREAM_PEER_URI_SAN% sni=%REQUESTED_SERVER_NAME%\n"
                } }
            }
        }]);
    }
    let mut chain = json!({ "filters": [{ "name": "envoy.filters.network.tcp_proxy", "typed_config": proxy }] });
    let mut listener = json!({
        "name": name,
        "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } },
    });
    if let Some(tls) = tls {
        chain["transport_socket"] = tls;
        // As Istio's inbound listeners: the SNI is read before the handshake.
        listener["listener_filters"] = json!([{
            "name": "envoy.filters.listener.tls_inspector",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
            }
        }]);
    }
    listener["filter_chains"] = json!([chain]);
    listener
}

/// Gateways east and west, an echo server in east, and SVIDs for the two sidecars.
struct Sites {
    mesh: Mesh,
    east: meshbridge_gateway::GatewayHandle,
    west: meshbridge_gateway::GatewayHandle,
    echo: Echo,
    client: IdentityFiles,
    server: IdentityFiles,
}

const CLIENT: &str = "ns/shop/sa/web";
const SERVER: &str = "ns/demo/sa/echo";

fn id(path: &str) -> String {
    format!("spiffe://{TD}/{path}")
}

async fn sites(t: TransportKind) -> Result<Sites> {
    let mesh = Mesh::new(t);
    let echo = Echo::start(Some("east:")).await?;
    let east = mesh.gateway(&site("east", "r1", "a")).await?;
    let west = mesh.gateway(&site("west", "r2", "b")).await?;
    let client = mesh.pki.issue("envoy-web", &id(CLIENT));
    let server = mesh.pki.issue("envoy-echo", &id(SERVER));
    Ok(Sites {
        mesh,
        east,
        west,
        echo,
        client,
        server,
    })
}

impl Sites {
    /// East's echo sidecar: terminates mTLS (taking only `client_id` when given, logging
    /// the peer to `log`), exported as the echo's endpoint, as Istio's endpoints are.
    async fn east_sidecar(&self, client_id: Option<&str>, log: Option<&str>) -> Result<Envoy> {
        let envoy = Envoy::start(json!({
            "node": { "id": "echo-sidecar", "cluster": "east" },
            "static_resources": {
                "listeners": [tcp_listener(
                    "inbound",
                    "echo",
                    Some(tls_socket(&self.server, false, None, client_id, &[])),
                    log,
                )],
                "clusters": [static_cluster("echo", &[self.echo.addr])]
            }
        }))
        .await?;
        let inbound = envoy.listener_addr("inbound").await?;
        self.mesh
            .feed
            .export("east", &key("echo"), PORT, &[inbound]);
        self.mesh.feed.synced(&[&self.east, &self.west]).await;
        Ok(envoy)
    }

    /// West's client sidecar: plaintext in on listener `outbound`, out to west's gateway's
    /// SNI listener with Istio's SNI and its own SVID, taking only `server_id` as the server.
    async fn west_sidecar(&self, server_id: &str) -> Result<Envoy> {
        let mut upstream =
            static_cluster(CLUSTER, &[self.west.sni_addr().context("no SNI listener")?]);
        upstream["transport_socket"] = tls_socket(
            &self.client,
            true,
            Some(SNI),
            Some(server_id),
            &["istio-peer-exchange", "istio"],
        );
        Envoy::start(json!({
            "node": { "id": "web-sidecar", "cluster": "west" },
            "static_resources": {
                "listeners": [tcp_listener("outbound", CLUSTER, None, None)],
                "clusters": [upstream]
            }
        }))
        .await
    }
}

const SNI: &str = "outbound_.7001_._.echo.demo.svc.cluster.local";
const CLUSTER: &str = "outbound|7001||echo.demo.svc.cluster.local";

async fn envoys_keep_their_own_mtls_session_through_both_gateways(t: TransportKind) -> Result<()> {
    let s = sites(t).await?;
    let log = tempfile::NamedTempFile::new()?;
    let east_envoy = s
        .east_sidecar(Some(&id(CLIENT)), Some(&log.path().to_string_lossy()))
        .await?;
    let west_envoy = s.west_sidecar(&id(SERVER)).await?;
    let outbound = west_envoy.listener_addr("outbound").await?;

    // A plaintext client at west reaches the echo in east.
    let msgs: [&[u8]; 3] = [b"first", b"second, same sidecars", b"third"];
    for msg in msgs {
        if let Err(e) = ping(outbound, "east:", msg).await {
            let stats = west_envoy.admin_get("/stats?filter=ssl|cx").await?;
            bail!("{e:#}\nwest envoy: {stats}");
        }
    }

    // The TLS sessions were the Envoys': west's sidecar verified east's (the SAN match),
    // and east's logged west's certificate and Istio's SNI, once per connection.
    let want = format!("peer={} sni={SNI}", id(CLIENT));
    let started = Instant::now();
    let lines = loop {
        let text = std::fs::read_to_string(log.path())?;
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= msgs.len() || started.elapsed() > ENVOY_WAIT {
            break lines;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(lines, vec![want; msgs.len()]);
    let handshakes = west_envoy
        .counter(&format!("cluster.{CLUSTER}.ssl.handshake"))
        .await?;
    assert_eq!(handshakes, msgs.len() as u64);
    // (Listener stats are named by the configured address, port 0.)
    let accepted = "listener.127.0.0.1_0.ssl.handshake";
    assert_eq!(
        east_envoy.counter(accepted).await?,
        msgs.len() as u64,
        "{}",
        east_envoy.admin_get("/stats?filter=handshake").await?
    );
    Ok(())
}
both_transports!(envoys_keep_their_own_mtls_session_through_both_gateways);

/// The gateway in the middle is no party to the session: a west sidecar that expects the
/// gateway's identity instead of east's sidecar's fails its handshake, though the gateways
/// carried the bytes.
async fn a_sidecar_expecting_another_server_id_is_refused_end_to_end(
    t: TransportKind,
) -> Result<()> {
    let s = sites(t).await?;
    let _east_envoy = s.east_sidecar(None, None).await?;
    let west_envoy = s.west_sidecar(&id("site/east/gateway")).await?;
    let outbound = west_envoy.listener_addr("outbound").await?;
    assert!(
        ping(outbound, "east:", b"must not arrive").await.is_err(),
        "the echo answered through a sidecar that expected the gateway's id"
    );
    let failed = west_envoy
        .counter(&format!("cluster.{CLUSTER}.ssl.fail_verify_san"))
        .await?;
    assert_eq!(failed, 1, "west's sidecar refused east's sidecar's SAN");
    Ok(())
}
both_transports!(a_sidecar_expecting_another_server_id_is_refused_end_to_end);
