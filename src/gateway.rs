//! `meshbridge gateway --config FILE`: a site's east-west gateway, optionally with the
//! site's registration (lease), static exports and an embedded federated DNS server.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use meshbridge_core::config::{self, Problems, RoleConfig};
use meshbridge_core::tls::{Identity, IdentityFiles};
use meshbridge_federation::dns;
use meshbridge_federation::site::{self, ExportSpec, Registration};
use meshbridge_federation::site_gateway::{Keeper, SiteGateway};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::source::CatalogSource;

#[derive(ClapArgs)]
pub struct Args {
    #[arg(long, short = 'c', env = "MESHBRIDGE_CONFIG")]
    config: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct File {
    pub gateway: meshbridge_gateway::Config,
    pub tls: IdentityFiles,
    pub source: CatalogSource,
    /// Register this site and keep its lease (needs a registry source).
    #[serde(default)]
    pub register: Option<Registration>,
    /// Services of this site to export (sites without a Kubernetes adapter).
    #[serde(default)]
    pub exports: Vec<ExportSpec>,
    /// An embedded federated DNS server (its `site` defaults to the gateway's).
    #[serde(default)]
    pub dns: Option<dns::Config>,
    /// Threads that run the gateway. 1 (the default, as linkerd2-proxy's) runs everything
    /// on one thread: no hand-offs between threads on a request's path, the lowest latency
    /// and CPU per request. More spread a busy gateway over cores; 0 = one per CPU.
    #[serde(default = "default_workers")]
    pub workers: usize,
}

fn default_workers() -> usize {
    1
}

impl File {
    /// The embedded DNS server's settings, its `site` defaulting to the gateway's.
    fn dns_config(&self) -> Option<dns::Config> {
        let mut d = self.dns.clone()?;
        if d.site.is_empty() {
            d.site.clone_from(&self.gateway.site);
        }
        Some(d)
    }
}

impl RoleConfig for File {
    fn validate(&self, p: &mut Problems) {
        let mut inner = Problems::default();
        self.gateway.validate(&mut inner);
        for pr in inner.0 {
            p.push(format!("gateway.{}", pr.field), pr.message);
        }
        self.source.validate("source", p);
        if self.register.is_some() && self.source.registry.is_empty() {
            p.push("register", "needs source.registry");
        }
        if !self.exports.is_empty() && self.register.is_none() {
            p.push(
                "exports",
                "exports need [register] (the site must hold a lease)",
            );
        }
        for (i, e) in self.exports.iter().enumerate() {
            e.validate(&format!("exports[{i}]"), p);
        }
        meshbridge_core::runtime::check_workers(p, "workers", self.workers);
        if let Some(d) = self.dns_config() {
            let mut inner = Problems::default();
            d.validate(&mut inner);
            for pr in inner.0 {
                p.push(format!("dns.{}", pr.field), pr.message);
            }
        }
    }
}

/// Reads the configuration, then runs the gateway on a runtime with `workers` threads.
pub fn main(args: Args) -> Result<ExitCode> {
    let cfg: File = config::load(Some(&args.config))?;
    meshbridge_core::runtime::build(cfg.workers)
        .context("starting the gateway's runtime")?
        .block_on(run(cfg))
}

async fn run(cfg: File) -> Result<ExitCode> {
    tracing::info!(config = %config::effective(&cfg), "effective configuration");
    let identity = Identity::load(cfg.tls.clone()).context("loading TLS files")?;
    let stop = CancellationToken::new();
    let reload = tokio::spawn(
        identity
            .clone()
            .watch_files(Duration::from_secs(5), stop.clone().cancelled_owned()),
    );
    let (catalog, client) = cfg.source.open(&identity, None).await?;
    let keeper = match (&cfg.register, client) {
        (Some(reg), Some(client)) => {
            let exports: Vec<site::LocalExport> =
                cfg.exports.iter().map(|e| e.to_local(true)).collect();
            let (reg, name) = (reg.clone(), cfg.gateway.site.clone());
            Some(Keeper {
                client,
                spec: Box::new(move |tunnel| reg.spec(&name, &tunnel.to_string())),
                exports: watch::channel(exports).1,
                status: site::status_channel().0,
            })
        }
        _ => None,
    };
    // DNS answers from the gateway's catalog: its persisted snapshot while the registry
    // has not answered since a restart (static stability), then the registry's.
    let site = SiteGateway::start(
        cfg.gateway.clone(),
        identity.clone(),
        catalog,
        cfg.dns_config(),
        keeper,
    )
    .await
    .context("starting the gateway")?;
    let gw = site.gateway();
    let admin = match gw.admin_addr() {
        Some(a) => format!(", admin {a}"),
        None => String::new(),
    };
    // Installed before the line below: a signal sent right after it is caught.
    let signal = meshbridge_core::drain::shutdown_signal();
    println!(
        "gateway {} listening on {} (tunnel){}{}{}",
        cfg.gateway.site,
        gw.tunnel_addr(),
        gw.sni_addr()
            .map(|a| format!(", sni {a}"))
            .unwrap_or_default(),
        site.dns()
            .map(|d| format!(", dns {}", d.local_addr()))
            .unwrap_or_default(),
        admin
    );
    signal.await;
    tracing::info!("signal received; draining");
    let outcome = site
        .drain(Duration::from_millis(cfg.gateway.drain_deadline_ms))
        .await;
    tracing::info!(?outcome, "gateway stopped");
    stop.cancel();
    let _ = reload.await;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use meshbridge_core::config::parse_with_env;

    use super::File;

    /// The chart passes a Node's topology labels as `MESHBRIDGE_REGISTER__REGION`/`__ZONE`;
    /// a label that reads as a number (zone `1`) is still the site's zone.
    #[test]
    fn register_region_and_zone_come_from_the_environment_numbers_included_and_dns_site_defaults() {
        let text = "[gateway]\nsite = \"east\"\ndata_dir = \"/d\"\n\
                    [tls]\ncert = \"c\"\nkey = \"k\"\nbundle = \"b\"\n\
                    [source]\nregistry = [\"https://127.0.0.1:7443\"]\n\
                    [register]\nregion = \"r-file\"\n";
        let vars = |region: &str, zone: &str| {
            vec![
                (
                    "MESHBRIDGE_REGISTER__REGION".to_string(),
                    region.to_string(),
                ),
                ("MESHBRIDGE_REGISTER__ZONE".to_string(), zone.to_string()),
            ]
        };
        for (region, zone) in [("eu-west", "eu-west-1b"), ("7", "1"), ("", "")] {
            let cfg: File = parse_with_env("gw.toml", text, &vars(region, zone))
                .unwrap_or_else(|e| panic!("{region}/{zone}: {e}"));
            let reg = cfg.register.unwrap_or_else(|| panic!("no [register]"));
            assert_eq!((reg.region.as_str(), reg.zone.as_str()), (region, zone));
        }
        // An embedded [dns] answers as the gateway's site unless told otherwise.
        let with_dns = format!("{text}[dns]\nlisten = \"127.0.0.1:0\"\n");
        let cfg: File = parse_with_env("gw.toml", &with_dns, &[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.dns_config().map(|d| d.site), Some("east".to_string()));
        let err = parse_with_env::<File>("gw.toml", text, &vars("eu", "[1]"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("register.zone"), "{err}");
    }
}
