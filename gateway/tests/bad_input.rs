//! Bad input on the tunnel and on the local listeners: every stream or connection is
//! refused with a reason, and the gateway goes on serving.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use common::*;
use meshbridge_core::tls::AllowList;
use meshbridge_gateway::TransportKind;
use meshbridge_gateway::preamble::{Preamble, Reply, ReplyStatus, Target};
use meshbridge_gateway::transport::{self, Carrier, Dialer, Link};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PORT: u16 = 7401;

/// Open a raw stream, write `bytes` (then end the stream when `finish`), read the reply.
async fn raw(link: &Link, bytes: &[u8], finish: bool) -> Result<Reply> {
    let (mut send, mut recv) = link.open().await?;
    send.write_all(bytes).await?;
    if finish {
        send.shutdown().await?;
    }
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, recv.read_to_end(&mut buf))
        .await
        .context("no reply")??;
    match Reply::decode(&buf)? {
        Some((reply, _)) => Ok(reply),
        None => bail!("incomplete reply {buf:?}"),
    }
}

fn encoded(p: &Preamble) -> Vec<u8> {
    let mut b = BytesMut::new();
    p.encode(&mut b).unwrap();
    b.to_vec()
}

fn echo_target(port: u16) -> Target {
    Target::Service {
        namespace: "demo".into(),
        name: "echo".into(),
        port,
    }
}

async fn bad_tunnel_streams_are_refused_with_a_reason(t: TransportKind) -> Result<()> {
    let mesh = Mesh::new(t);
    let echo = Echo::start(None).await?;
    let mut cfg = mesh.config("east");
    cfg.tunnel.preamble_timeout_ms = 300;
    let east = mesh
        .gateway_with(&site("east", "r1", "a"), cfg, mesh.identity("east"))
        .await?;
    mesh.feed.export("east", &key("echo"), PORT, &[echo.addr]);
    mesh.feed.synced(&[&east]).await;

    let probe = mesh.identity("probe");
    let dialer = Dialer::standalone(&probe, &mesh.config("probe").tunnel, localhost(0))?;
    let carrier = match t {
        TransportKind::Tcp => Carrier::Tcp,
        _ => Carrier::Quic,
    };
    let (link, peer, _) = dialer.connect(east.tunnel_addr(), carrier).await?;
    assert_eq!(peer.site(), Some("east"));

    let good = encoded(&Preamble::new(echo_target(PORT)));
    let cases: Vec<(&str, Vec<u8>, bool, ReplyStatus, &str)> = vec![
        (
            "garbage",
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            false,
            ReplyStatus::BadRequest,
            "bad magic",
        ),
        (
            "oversize",
            b"MB\x01\x01\xff\xff".to_vec(),
            false,
            ReplyStatus::BadRequest,
            "exceeds the limit",
        ),
        (
            "truncated",
            good[..good.len() / 2].to_vec(),
            true,
            ReplyStatus::BadRequest,
            "ended inside the preamble",
        ),
        (
            "slow loris",
            good[..3].to_vec(),
            false,
            ReplyStatus::BadRequest,
            "not complete within",
        ),
        (
            "empty",
            Vec::new(),
            true,
            ReplyStatus::BadRequest,
            "ended inside the preamble after 0 bytes",
        ),
        (
            "unknown service",
            encoded(&Preamble::new(Target::Service {
                namespace: "demo".into(),
                name: "nothere".into(),
                port: PORT,
            })),
            false,
            ReplyStatus::NoEndpoint,
            "not exported by site east",
        ),
        (
            "endpoint not exported",
            encoded(&Preamble::new(Target::Endpoint {
                addr: localhost(22),
            })),
            false,
            ReplyStatus::Denied,
            "not an endpoint exported",
        ),
        (
            "wrong port",
            encoded(&Preamble::new(echo_target(9))),
            false,
            ReplyStatus::NoEndpoint,
            "has no port 9",
        ),
    ];
    for (what, bytes, finish, status, reason) in cases {
        let reply = raw(&link, &bytes, finish).await.context(what)?;
        assert_eq!(reply.status, status, "{what}: {reply:?}");
        assert!(reply.reason.contains(reason), "{what}: {:?}", reply.reason);
    }
    // The same link still carries good streams.
    let opened = transport::request(&link, &Preamble::new(echo_target(PORT)), b"hi", WAIT).await?;
    assert_eq!(opened.reply.status, ReplyStatus::Ok);
    let (mut send, mut recv) = (opened.send, opened.recv);
    let mut buf = opened.leftover.to_vec();
    send.shutdown().await?;
    recv.read_to_end(&mut buf).await?;
    assert_eq!(buf, b"hi");
    // An endpoint the site exports may be named directly.
    let opened = transport::request(
        &link,
        &Preamble::new(Target::Endpoint { addr: echo.addr }),
        b"",
        WAIT,
    )
    .await?;
    assert_eq!(opened.reply.status, ReplyStatus::Ok, "{:?}", opened.reply);
    dialer.close();
    Ok(())
}
both_transports!(bad_tunnel_streams_are_refused_with_a_reason);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_input_is_refused_and_the_gateway_goes_on() -> Result<()> {
    let mesh = Mesh::new(TransportKind::Quic);
    let echo = Echo::start(None).await?;
    let east = mesh.gateway(&site("east", "r1", "a")).await?;
    let mut cfg = mesh.config("west");
    cfg.tunnel.preamble_timeout_ms = 300;
    let west = mesh
        .gateway_with(&site("west", "r1", "b"), cfg, mesh.identity("west"))
        .await?;
    mesh.feed.export("east", &key("echo"), PORT, &[echo.addr]);
    mesh.feed.synced(&[&east, &west]).await;
    let sni = west.sni_addr().unwrap();

    // A ClientHello without SNI (a client connecting by IP address): alert unrecognized_name.
    let client = mesh
        .pki
        .identity("web", &format!("spiffe://{TD}/ns/shop/sa/web"));
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(client.client_config(AllowList::any(), &[])));
    let by_ip = rustls_pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let err = connector
        .connect(by_ip, TcpStream::connect(sni).await?)
        .await
        .err()
        .context("handshake without SNI succeeded")?;
    assert!(err.to_string().contains("UnrecognisedName"), "{err}");
    // An unknown name: same.
    let name = rustls_pki_types::ServerName::try_from("nothere.demo.svc.clusterset.local")?;
    let err = connector
        .connect(name, TcpStream::connect(sni).await?)
        .await
        .err()
        .context("handshake for an unknown service succeeded")?;
    assert!(err.to_string().contains("UnrecognisedName"), "{err}");

    // Not TLS at all, and a silent client: closed, with an alert, in bounded time.
    for bytes in [&b"hello, plain text\r\n"[..], &b""[..]] {
        let mut s = TcpStream::connect(sni).await?;
        s.write_all(bytes).await?;
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .context("SNI listener never closed")??;
        assert_eq!(out, [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112]);
    }
    // CONNECT listener: not CONNECT, and garbage.
    let connect = west.connect_addr().unwrap();
    for (bytes, want) in [
        (&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], "HTTP/1.1 405"),
        (&b"\x00\x01\x02 junk\r\n\r\n"[..], "HTTP/1.1 400"),
        (
            &b"CONNECT echo.demo.svc.clusterset.local:7401 HTTP/1.1\r\n"[..],
            "HTTP/1.1 400",
        ),
    ] {
        let mut s = TcpStream::connect(connect).await?;
        s.write_all(bytes).await?;
        let mut out = String::new();
        tokio::time::timeout(WAIT, s.read_to_string(&mut out)).await??;
        assert!(out.starts_with(want), "{out:?}");
    }
    // Unaffected.
    let vip = west
        .service_addr(&key("echo"), PORT, WAIT)
        .await
        .context("vip")?;
    ping(vip, "", b"still serving").await?;
    Ok(())
}
