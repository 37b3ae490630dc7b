//! `meshbridge kube --config FILE`: the Kubernetes adapter of one cluster (MCS
//! ServiceExport → registry; registry → ServiceImport, derived Service, EndpointSlices).
//! `meshbridge kube crds [--out DIR]`: the MCS CRDs it uses, as YAML.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args as ClapArgs, Subcommand};
use meshbridge_core::admin;
use meshbridge_core::config;
use meshbridge_federation::kube::{Config, crd, run};
use tokio_util::sync::CancellationToken;

#[derive(ClapArgs)]
pub struct Args {
    /// The adapter's TOML configuration.
    #[arg(long, short = 'c', env = "MESHBRIDGE_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective configuration and exit.
    #[arg(long)]
    print_config: bool,
    #[command(subcommand)]
    command: Option<KubeCommand>,
}

#[derive(Subcommand)]
enum KubeCommand {
    /// Print the ServiceExport and ServiceImport CRDs (or write them into --out).
    Crds {
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub async fn run(args: Args) -> Result<ExitCode> {
    if let Some(KubeCommand::Crds { out }) = args.command {
        let crds = crd::crds_yaml().context("rendering the CRDs")?;
        match out {
            Some(dir) => {
                for (name, text) in crds {
                    let path = dir.join(name);
                    std::fs::write(&path, text)
                        .with_context(|| format!("writing {}", path.display()))?;
                    println!("wrote {}", path.display());
                }
            }
            None => {
                for (_, text) in crds {
                    print!("---\n{text}");
                }
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let Some(path) = args.config else {
        anyhow::bail!("--config FILE is needed (or `meshbridge kube crds`)");
    };
    let cfg: Config = config::load(Some(&path))?;
    if args.print_config {
        print!("{}", config::effective(&cfg));
        return Ok(ExitCode::SUCCESS);
    }
    tracing::info!(config = %config::effective(&cfg), "effective configuration");
    let client = run::kube_client(&cfg).await?;
    let registry = run::registry_client(&cfg).await?;
    let metrics = run::Metrics::default();
    let mut reg = prometheus_client::registry::Registry::default();
    metrics.register(&mut reg);
    let ready = admin::Readiness::new();
    let stop = CancellationToken::new();
    let mut admin_addr = None;
    if let Some(a) = &cfg.admin_listen {
        let addr = a
            .parse()
            .with_context(|| format!("admin_listen {a:?} is not ip:port"))?;
        let l = admin::bind(addr)
            .await
            .with_context(|| format!("admin_listen {a}: cannot bind"))?;
        admin_addr = Some(l.local_addr()?);
        let router = admin::router(&ready, Arc::new(reg), config::effective(&cfg));
        let s = stop.clone();
        tokio::spawn(async move { admin::serve(l, router, s.cancelled_owned()).await });
    }
    let signal = meshbridge_core::drain::shutdown_signal();
    // Tests wait for this line.
    println!(
        "kube adapter {} started{} (identity {})",
        cfg.site,
        admin_addr
            .map(|a| format!(", admin {a}"))
            .unwrap_or_default(),
        cfg.holder_identity()
    );
    let mut work = tokio::spawn(run::run(
        cfg.clone(),
        client,
        registry,
        metrics,
        ready,
        stop.clone(),
    ));
    tokio::select! {
        _ = signal => {
            tracing::info!("signal received; releasing the lease");
            stop.cancel();
        }
        r = &mut work => {
            r.context("adapter task")??;
            return Ok(ExitCode::SUCCESS);
        }
    }
    work.await.context("adapter task")??;
    Ok(ExitCode::SUCCESS)
}
