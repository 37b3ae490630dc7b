//! `meshbridge dns --config FILE`: the federated DNS server, standalone.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use meshbridge_core::config;
use meshbridge_core::tls::Identity;
use meshbridge_federation::dns;
use meshbridge_federation::files::DnsFile as File;

#[derive(ClapArgs)]
pub struct Args {
    #[arg(long, short = 'c', env = "MESHBRIDGE_CONFIG")]
    config: PathBuf,
}

pub async fn run(args: Args) -> Result<ExitCode> {
    let cfg: File = config::load(Some(&args.config))?;
    tracing::info!(config = %config::effective(&cfg), "effective configuration");
    let stop = tokio_util::sync::CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();
    let (catalog, _client) = match &cfg.tls {
        Some(files) => {
            let identity = Identity::load(files.clone()).context("loading TLS files")?;
            tokio::spawn(
                identity
                    .clone()
                    .watch_files(Duration::from_secs(5), std::future::pending()),
            );
            let (catalog, client) = cfg.source.open(&identity, None).await?;
            match &cfg.data_dir {
                Some(dir) => (
                    meshbridge_gateway::snapshot::statically_stable(dir, catalog, &stop, &tasks),
                    client,
                ),
                None => {
                    tracing::warn!(
                        "no data_dir: after a restart while the registry is unreachable this server has nothing to answer"
                    );
                    (catalog, client)
                }
            }
        }
        None => {
            let path = cfg
                .source
                .catalog_file
                .as_ref()
                .context("source.catalog_file")?;
            let c = meshbridge_federation::source::read_catalog(path)?;
            (tokio::sync::watch::channel(Arc::new(c)).1, None)
        }
    };
    let server = dns::DnsServer::start(cfg.dns.clone(), catalog).await?;
    let ready = meshbridge_core::admin::Readiness::new();
    let admin = match &cfg.admin_listen {
        Some(a) => {
            let mut reg = prometheus_client::registry::Registry::default();
            server.metrics().register(&mut reg);
            let router =
                meshbridge_core::admin::router(&ready, Arc::new(reg), config::effective(&cfg));
            let addr = a
                .parse()
                .with_context(|| format!("admin_listen {a:?} is not ip:port"))?;
            let listener = meshbridge_core::admin::bind(addr)
                .await
                .with_context(|| format!("admin_listen {a}: cannot bind"))?;
            let addr = listener.local_addr()?;
            Some((
                addr,
                tokio::spawn(meshbridge_core::admin::serve(
                    listener,
                    router,
                    std::future::pending(),
                )),
            ))
        }
        None => None,
    };
    // Installed before the line below: a signal sent right after it is caught.
    let signal = meshbridge_core::drain::shutdown_signal();
    ready.set(true);
    println!(
        "dns listening on {} (udp+tcp) for zone {}{}",
        server.local_addr(),
        cfg.dns.zone,
        admin
            .as_ref()
            .map(|(a, _)| format!(", admin {a}"))
            .unwrap_or_default()
    );
    signal.await;
    ready.set(false);
    server.shutdown(Duration::from_secs(2)).await;
    // The catalog's last save.
    stop.cancel();
    tasks.close();
    tasks.wait().await;
    Ok(ExitCode::SUCCESS)
}
