//! `meshbridge ctl export list [--site S]`: what each site exports, as the registry holds it:
//! generation, ports, endpoints ready of total, the revision of the last change.

use anyhow::{Result, bail};
use clap::Subcommand;
use meshbridge_core::client::{Consistency, RegistryClient};
use meshbridge_core::model::is_dns_label;
use serde_json::json;

#[derive(Subcommand)]
pub enum ExportCmd {
    /// Every export, or one site's.
    List {
        /// Only this site's exports.
        #[arg(long)]
        site: Option<String>,
    },
}

pub async fn run(
    client: &RegistryClient,
    cmd: ExportCmd,
    consistency: Consistency,
    json_out: bool,
) -> Result<()> {
    let ExportCmd::List { site } = cmd;
    if let Some(s) = &site
        && !is_dns_label(s)
    {
        bail!("--site {s:?}: not a site name (a DNS label: a-z 0-9 -)");
    }
    let catalog = client.catalog(consistency).await?;
    if let Some(s) = &site
        && !catalog.sites.contains_key(s)
    {
        bail!(
            "--site {s}: no such site in the catalog (sites: {})",
            catalog.sites.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    let exports: Vec<_> = catalog
        .exports
        .values()
        .filter(|e| site.as_ref().is_none_or(|s| &e.site == s))
        .collect();
    if json_out {
        let list: Vec<_> = exports
            .iter()
            .map(|e| {
                json!({
                    "site": e.site,
                    "service": e.service.to_string(),
                    "generation": e.generation,
                    "headless": e.headless,
                    "ports": e.ports,
                    "endpoints": e.endpoints,
                    "ready": e.endpoints.iter().filter(|x| x.ready).count(),
                    "updated_revision": e.updated_revision,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if exports.is_empty() {
        println!("no exports");
        return Ok(());
    }
    println!(
        "{:<16} {:<32} {:>14} {:<24} {:>11} {:>9}",
        "SITE", "SERVICE", "GENERATION", "PORTS", "READY/ALL", "REVISION"
    );
    for e in exports {
        let ports: Vec<String> = e
            .ports
            .iter()
            .map(|p| match p.name.as_str() {
                "" => p.port.to_string(),
                n => format!("{n}:{}", p.port),
            })
            .collect();
        let ready = e.endpoints.iter().filter(|x| x.ready).count();
        println!(
            "{:<16} {:<32} {:>14} {:<24} {:>11} {:>9}",
            e.site,
            e.service.to_string(),
            e.generation,
            if e.headless {
                format!("headless {}", ports.join(","))
            } else {
                ports.join(",")
            },
            format!("{ready}/{}", e.endpoints.len()),
            e.updated_revision
        );
    }
    Ok(())
}
