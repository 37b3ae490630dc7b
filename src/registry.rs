//! `meshbridge registry --config FILE`: one registry node.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use meshbridge_core::config;
use meshbridge_core::tls::Identity;

#[derive(ClapArgs)]
pub struct Args {
    /// The node's TOML configuration.
    #[arg(long, short = 'c', env = "MESHBRIDGE_CONFIG")]
    config: PathBuf,
    /// Print the effective configuration and exit.
    #[arg(long)]
    print_config: bool,
}

/// Reads the configuration, then runs the node on a runtime with `workers` threads.
pub fn main(args: Args) -> Result<ExitCode> {
    let cfg: meshbridge_registry::Config = config::load(Some(&args.config))?;
    if args.print_config {
        print!("{}", config::effective(&cfg));
        return Ok(ExitCode::SUCCESS);
    }
    meshbridge_core::runtime::build(cfg.workers)
        .context("starting the registry's runtime")?
        .block_on(run(cfg))
}

async fn run(cfg: meshbridge_registry::Config) -> Result<ExitCode> {
    tracing::info!(config = %config::effective(&cfg), "effective configuration");
    let identity = Identity::load(cfg.tls.clone()).context("loading the node's TLS files")?;
    let reload = tokio::spawn(
        identity
            .clone()
            .watch_files(Duration::from_secs(5), std::future::pending()),
    );
    let node = meshbridge_registry::Node::start(cfg, identity.clone())
        .await
        .context("starting the registry node")?;
    // Installed before the line below: a signal sent right after it is caught.
    let signal = meshbridge_core::drain::shutdown_signal();
    // Tests and the demo wait for this line.
    println!(
        "registry node {} listening on {} (admin {}) as {}",
        node.node_id(),
        node.addr(),
        node.admin_addr(),
        identity.id()
    );
    signal.await;
    tracing::info!("signal received; draining");
    node.shutdown().await;
    reload.abort();
    Ok(ExitCode::SUCCESS)
}
