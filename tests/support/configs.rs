//! The roles' config files for end-to-end tests, built as typed values and written by
//! [`write_config`] (TOML rendered from them), never formatted by hand. Shared by every test
//! binary (and `examples/kube_bench.rs`): nothing here names the binary under test.

#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use anyhow::{Context, Result};
use meshbridge_federation::files::GatewayFile;
use meshbridge_federation::site::Registration;
use meshbridge_federation::source::CatalogSource;
use meshbridge_testkit::pki::TestPki;

pub use meshbridge_testkit::process::write_config;

/// Node `id` of a test registry of `pki`'s trust domain: its SVID from `pki`, data under
/// `pki`'s directory, admin HTTP on any free loopback port, leases checked every 200 ms,
/// `members` (node 1 first) as its initial members.
pub fn registry_node(
    pki: &TestPki,
    td: &str,
    id: u64,
    members: &[String],
) -> Result<meshbridge_registry::Config> {
    let url = members
        .get(usize::try_from(id)?.saturating_sub(1))
        .with_context(|| format!("node {id} is not among {members:?}"))?;
    let listen = url.trim_start_matches("https://");
    let files = pki.issue(
        &format!("registry-{id}"),
        &format!("spiffe://{td}/registry/{id}"),
    );
    let data = pki.dir().join(format!("registry-{id}-data"));
    let mut cfg = meshbridge_registry::Config::new(id, listen, data, files);
    cfg.admin_listen = "127.0.0.1:0".into();
    cfg.leases.tick_interval_ms = 200;
    cfg.initial_members = members
        .iter()
        .enumerate()
        .map(|(i, u)| ((i + 1).to_string(), u.clone()))
        .collect();
    Ok(cfg)
}

/// The gateway of `site` for a test: its SVID from `pki`, data under `pki`'s directory,
/// tunnel on any free loopback port, a 1 s drain, following `source`.
pub fn gateway_file(pki: &TestPki, td: &str, site: &str, source: CatalogSource) -> GatewayFile {
    let files = pki.issue(
        &format!("gw-{site}"),
        &format!("spiffe://{td}/site/{site}/gateway"),
    );
    let mut gw = meshbridge_gateway::Config::new(site, pki.dir().join(format!("gw-{site}-data")));
    gw.drain_deadline_ms = 1_000;
    gw.tunnel.listen = "127.0.0.1:0".into();
    GatewayFile::new(gw, files, source)
}

/// [`gateway_file`] following the registry at `url` and registering the site (the
/// registry's default lease unless `lease_ttl_ms` is set).
pub fn registered_gateway(pki: &TestPki, td: &str, site: &str, url: &str) -> GatewayFile {
    let mut file = gateway_file(pki, td, site, CatalogSource::registry([url]));
    file.register = Some(Registration::default());
    file
}

/// 127.0.0.1, the address of every test endpoint.
pub const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Write `cfg` as `<pki dir>/<name>.toml`.
pub fn write(pki: &TestPki, name: &str, cfg: &impl serde::Serialize) -> Result<PathBuf> {
    write_config(&pki.dir().join(format!("{name}.toml")), cfg)
}
