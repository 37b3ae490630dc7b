//! `meshbridge agent --config FILE`: the VM agent of a legacy host.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use meshbridge_core::config;
use meshbridge_federation::agent::{Agent, Config};

#[derive(ClapArgs)]
pub struct Args {
    /// The agent's TOML configuration.
    #[arg(long, short = 'c', env = "MESHBRIDGE_CONFIG")]
    config: PathBuf,
    /// Print the effective configuration (join token redacted) and exit.
    #[arg(long)]
    print_config: bool,
}

/// The agent's runtime: two worker threads whatever the host's size (the agent is a
/// guest on the host; its load is a few connections, checks and heartbeats).
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("meshbridge-agent")
        .enable_all()
        .build()?)
}

/// The effective configuration without secrets.
fn shown(cfg: &Config) -> String {
    let mut c = cfg.clone();
    if c.join_token.is_some() {
        c.join_token = Some("<redacted>".into());
    }
    config::effective(&c)
}

pub async fn run(args: Args) -> Result<ExitCode> {
    let cfg: Config = config::load(Some(&args.config))?;
    if args.print_config {
        print!("{}", shown(&cfg));
        return Ok(ExitCode::SUCCESS);
    }
    tracing::info!(config = %shown(&cfg), "effective configuration");
    let agent = Agent::start(cfg.clone())
        .await
        .with_context(|| format!("agent {}", cfg.site))?;
    // Installed before the line below: a signal sent right after it is caught.
    let signal = meshbridge_core::drain::shutdown_signal();
    // Tests and the demo wait for this line.
    println!(
        "agent {} listening on {} (tunnel){}{} as {}",
        cfg.site,
        agent.tunnel_addr(),
        agent
            .dns_addr()
            .map(|a| format!(", dns {a}"))
            .unwrap_or_default(),
        agent
            .admin_addr()
            .map(|a| format!(", admin {a}"))
            .unwrap_or_default(),
        agent.identity().id(),
    );
    signal.await;
    tracing::info!("signal received; draining");
    agent
        .drain(Duration::from_millis(cfg.drain_deadline_ms))
        .await;
    Ok(ExitCode::SUCCESS)
}
