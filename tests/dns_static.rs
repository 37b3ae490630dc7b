//! Static stability of DNS: a gateway with embedded DNS and a standalone `meshbridge dns`,
//! both restarted (SIGKILL) while the registry is down (SIGKILL too), answer from the
//! catalog they persisted — not NXDOMAIN until the registry comes back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use meshbridge_federation::dns;
use meshbridge_federation::files::DnsFile;
use meshbridge_federation::site::ExportSpec;
use meshbridge_federation::source::CatalogSource;
use meshbridge_testkit::pki::TestPki;
use meshbridge_testkit::probe::{dig_a, eventually};
use meshbridge_testkit::process::Proc;
use meshbridge_testkit::process::addr_after;
use support::{READY, registered_gateway, registry, spawn, write};

const TD: &str = "static.example";
const NAME: &str = "web.shop.svc.clusterset.local";

/// Start (or restart) a process and the DNS address it prints.
async fn start(name: &str, cfg: &Path, role: &str, label: &str) -> Result<(Proc, SocketAddr)> {
    let mut p = spawn(name, cfg, role, &[])?;
    let line = p.wait_for("listening on", READY).await?;
    Ok((p, addr_after(&line, label)?))
}

async fn until_persisted(dir: &Path) {
    let file = dir.join("catalog.json");
    eventually(
        &format!("{} holds the export", file.display()),
        READY,
        || async {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            (
                text.contains("\"web\"").then_some(()),
                format!("{} bytes", text.len()),
            )
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_answers_from_its_persisted_catalog_after_a_restart_while_the_registry_is_down()
-> Result<()> {
    let pki = TestPki::new(TD);
    let root = pki.dir().to_path_buf();
    let (mut registry, url) = registry(&pki, TD).await?;

    // East's gateway exports shop/web (an object-model address: DNS only, never dialled)
    // and embeds east's DNS.
    let mut gw = registered_gateway(&pki, TD, "east", &url);
    gw.gateway.drain_deadline_ms = 500;
    let object_model = IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1));
    gw.exports = vec![ExportSpec::tcp("shop", "web", (80, 80), &[object_model])];
    gw.dns = Some(dns::Config::for_test(""));
    let gw_dir = gw.gateway.data_dir.clone();
    let gw_cfg = write(&pki, "gw-east", &gw)?;
    // A standalone DNS server of east, keeping its catalog in its own data_dir.
    let dns_dir = root.join("dns-east-data");
    let mut dns = DnsFile::new(
        dns::Config::for_test("east"),
        CatalogSource::registry([&url]),
    );
    dns.tls = Some(pki.issue("dns-east", &format!("spiffe://{TD}/site/east/dns")));
    dns.data_dir = Some(dns_dir.clone());
    let dns_cfg = write(&pki, "dns-east", &dns)?;
    let (mut gateway, gw_dns) = start("gateway", &gw_cfg, "gateway", "dns ").await?;
    let (mut standalone, dns_addr) = start("dns", &dns_cfg, "dns", "listening on ").await?;
    let want = vec![Ipv4Addr::new(10, 1, 0, 1)];
    for (who, server) in [("embedded", gw_dns), ("standalone", dns_addr)] {
        eventually(&format!("{who} DNS answers {NAME}"), READY, || async {
            let got = dig_a(server, NAME).await;
            let seen = format!("{got:?}");
            (got.is_ok_and(|ips| ips == want).then_some(()), seen)
        })
        .await;
    }
    until_persisted(&gw_dir).await;
    until_persisted(&dns_dir).await;

    // The registry dies, then both DNS servers are killed and started again.
    registry.kill9().await;
    gateway.kill9().await;
    standalone.kill9().await;
    let (mut gateway, gw_dns) = start("gateway (restarted)", &gw_cfg, "gateway", "dns ").await?;
    let (mut standalone, dns_addr) =
        start("dns (restarted)", &dns_cfg, "dns", "listening on ").await?;
    // Their first answer, with the registry still down, is the persisted one.
    for (who, server, p) in [
        ("embedded", gw_dns, &mut gateway),
        ("standalone", dns_addr, &mut standalone),
    ] {
        let got = dig_a(server, NAME).await?;
        assert_eq!(
            got,
            want,
            "{who} DNS after a restart with the registry down; log:\n{}",
            p.collect().join("\n")
        );
    }
    gateway.terminate(Duration::from_secs(5)).await;
    standalone.terminate(Duration::from_secs(5)).await;
    Ok(())
}
