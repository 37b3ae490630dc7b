//! `meshbridge ctl owners list|put|delete`: export ownership, which sites may export the
//! services of a namespace (`ns`) or of one service (`ns/name`). Without a rule any site may
//! export a service, so a compromised site could capture its traffic: `ctl status` warns
//! while no rule is set.

use anyhow::{Result, bail};
use clap::Subcommand;
use meshbridge_core::client::{Consistency, RegistryClient};
use serde_json::json;

#[derive(Subcommand)]
pub enum OwnersCmd {
    /// Every rule: scope and the sites that may export in it.
    List,
    /// Only these sites may export services of SCOPE (`ns` or `ns/name`; the service's own
    /// rule wins over its namespace's). Replaces the scope's rule.
    Put {
        scope: String,
        /// A site allowed to export (repeat for several).
        #[arg(long = "site", required = true)]
        sites: Vec<String>,
    },
    /// Remove SCOPE's rule (its services are open to every site again).
    Delete { scope: String },
}

pub async fn run(
    client: &RegistryClient,
    cmd: OwnersCmd,
    consistency: Consistency,
    json_out: bool,
) -> Result<()> {
    match cmd {
        OwnersCmd::List => {
            let catalog = client.catalog(consistency).await?;
            if json_out {
                let rules: Vec<_> = catalog
                    .owners
                    .iter()
                    .map(|(scope, sites)| json!({"scope": scope, "sites": sites}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rules)?);
            } else if catalog.owners.is_empty() {
                println!("no export ownership rules: any site may export any service");
            } else {
                println!("{:<40} SITES", "SCOPE");
                for (scope, sites) in &catalog.owners {
                    println!("{scope:<40} {}", sites.join(", "));
                }
            }
        }
        OwnersCmd::Put { scope, sites } => {
            if sites.is_empty() {
                bail!("--site: name at least one site");
            }
            let r = client.put_ownership(&scope, &sites).await?;
            print_write(json_out, &scope, Some(&sites), r.changed, r.revision)?;
        }
        OwnersCmd::Delete { scope } => {
            let r = client.delete_ownership(&scope).await?;
            print_write(json_out, &scope, None, r.changed, r.revision)?;
        }
    }
    Ok(())
}

fn print_write(
    json_out: bool,
    scope: &str,
    sites: Option<&[String]>,
    changed: bool,
    revision: u64,
) -> Result<()> {
    if json_out {
        let v = json!({"scope": scope, "sites": sites, "changed": changed, "revision": revision});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    match (sites, changed) {
        (Some(sites), true) => println!(
            "services of {scope} may now be exported by {} only (catalog revision {revision})",
            sites.join(", ")
        ),
        (Some(_), false) => {
            println!("{scope}: the rule was already so (catalog revision {revision})")
        }
        (None, _) => println!(
            "{scope}: rule removed, its services may be exported by any site (catalog revision {revision})"
        ),
    }
    Ok(())
}
