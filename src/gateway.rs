//! `meshbridge gateway --config FILE`: a site's east-west gateway, optionally with the
//! site's registration (lease), static exports and an embedded federated DNS server.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use meshbridge_core::config;
use meshbridge_core::tls::Identity;
use meshbridge_federation::files::GatewayFile as File;
use meshbridge_federation::site;
use meshbridge_federation::site_gateway::{Keeper, SiteGateway};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(ClapArgs)]
pub struct Args {
    #[arg(long, short = 'c', env = "MESHBRIDGE_CONFIG")]
    config: PathBuf,
}

/// A gateway's SVID must be of its own site: peers and the registry authorize a gateway by
/// the site in its id. Another site's SVID would be refused at every registration; a
/// registry node's would pass (nodes are admins) and register any site.
fn check_site_id(cfg: &File, identity: &Identity) -> Result<()> {
    let id = identity.id();
    let site = &cfg.gateway.site;
    if id.site() == Some(site.as_str()) {
        return Ok(());
    }
    anyhow::bail!(
        "{} holds the SVID {id}, but gateway.site is {site:?}: a gateway's SVID must be \
         spiffe://{}/site/{site}/... (issue one with `meshbridge pki issue --id \
         spiffe://{}/site/{site}/gateway`)",
        cfg.tls.cert.display(),
        id.trust_domain(),
        id.trust_domain()
    )
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
    check_site_id(&cfg, &identity)?;
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
