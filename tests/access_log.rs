//! Logs as an operator reads them: one connection through two gateways (real processes)
//! carries one trace id, logged on the sending gateway's and the receiving gateway's access
//! lines; output to a pipe has no ANSI colour codes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use anyhow::Result;
use meshbridge_federation::site::ExportSpec;
use meshbridge_gateway::config::FixedListener;
use meshbridge_testkit::pki::TestPki;
use meshbridge_testkit::probe::eventually;
use serde_json::Value;
use support::{LOOPBACK, READY, registered_gateway, registry, spawn, write};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TD: &str = "logs.example";

/// The JSON access line a gateway logged with `needle` in it.
async fn access_line(p: &mut meshbridge_testkit::process::Proc, needle: &str) -> Value {
    let line = p.wait_for(needle, READY).await.unwrap();
    let start = line.find('{').unwrap_or(0);
    serde_json::from_str(&line[start..]).unwrap_or_else(|e| panic!("{e}: {line}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_has_one_trace_id_on_both_gateways_and_piped_logs_have_no_colour()
-> Result<()> {
    let pki = TestPki::new(TD);
    let (mut registry, url) = registry(&pki, TD).await?;

    // An echo server behind east (one connection at a time is all this test makes).
    let echo = TcpListener::bind("127.0.0.1:0").await?;
    let echo_port = echo.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let fixed = meshbridge_testkit::kube::free_port()?;
    let mut east = registered_gateway(&pki, TD, "east", &url);
    east.gateway.drain_deadline_ms = 500;
    east.exports = vec![ExportSpec::tcp("shop", "web", (80, echo_port), &[LOOPBACK])];
    let east_cfg = write(&pki, "gw-east", &east)?;
    let mut west = registered_gateway(&pki, TD, "west", &url);
    west.gateway.drain_deadline_ms = 500;
    west.gateway.listeners.fixed = vec![FixedListener {
        listen: format!("127.0.0.1:{fixed}"),
        service: "shop/web".into(),
        port: 80,
    }];
    let west_cfg = write(&pki, "gw-west", &west)?;
    let json = ["--log-format", "json"];
    let mut east = spawn("gateway east", &east_cfg, "gateway", &json)?;
    let mut west = spawn("gateway west", &west_cfg, "gateway", &json)?;
    east.wait_for("listening on", READY).await?;
    west.wait_for("listening on", READY).await?;

    // Through west's fixed listener to east's echo, once the catalog has reached west.
    let msg = b"one connection, two gateways";
    eventually("an echo through west and east", READY, || async {
        let r: Result<Vec<u8>> = async {
            let mut s = TcpStream::connect(("127.0.0.1", fixed)).await?;
            s.write_all(msg).await?;
            let mut back = vec![0; msg.len()];
            tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut back)).await??;
            Ok(back)
        }
        .await;
        let seen = format!("{r:?}");
        (r.ok().filter(|b| b == msg).map(|_| ()), seen)
    })
    .await;

    // The sending side's line for the proxied connection, then the receiving side's.
    let sent = access_line(&mut west, "\"proxied\"").await;
    let trace = sent["trace_id"].as_str().unwrap_or_default().to_string();
    assert!(
        trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_hexdigit()),
        "west's access line: {sent}"
    );
    assert_eq!(sent["direction"], "outgoing", "{sent}");
    assert_eq!(sent["dest"], "shop/web:80", "{sent}");
    let received = access_line(&mut east, &trace).await;
    assert_eq!(received["direction"], "incoming", "{received}");
    assert_eq!(received["status"], "ok", "{received}");
    assert_eq!(received["dest"], "shop/web:80", "{received}");
    println!("trace {trace}: west {sent}\neast {received}");

    // Plain logs into a pipe: no colour codes.
    for p in [&mut registry, &mut east, &mut west] {
        let lines = p.collect().to_vec();
        assert!(!lines.is_empty());
        assert!(
            lines.iter().all(|l| !l.contains('\u{1b}')),
            "ANSI escape in a piped log: {:?}",
            lines.iter().find(|l| l.contains('\u{1b}'))
        );
    }
    east.terminate(Duration::from_secs(5)).await;
    west.terminate(Duration::from_secs(5)).await;
    Ok(())
}
