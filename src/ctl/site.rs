//! `meshbridge ctl site remove|revoke|reinstate S`: take a site out of the mesh, for good
//! until an admin lets it back. Each prints what changed (or `-o json`).

use anyhow::Result;
use clap::Subcommand;
use meshbridge_core::client::{RegistryClient, WriteResult};
use serde_json::json;

#[derive(Subcommand)]
pub enum SiteCmd {
    /// Remove a registered site with all its exports, and revoke it: it cannot register
    /// again, nor its agents renew their SVIDs, until reinstated or enrolled again with a
    /// join token.
    Remove { site: String },
    /// Revoke a site, registered or not (e.g. an agent that joined and was compromised): as
    /// `remove`, and also for a site that never registered.
    Revoke { site: String },
    /// Lift a site's revocation: it may register and renew again.
    Reinstate { site: String },
}

pub async fn run(client: &RegistryClient, cmd: SiteCmd, json_out: bool) -> Result<()> {
    let (action, site, r): (&str, String, WriteResult) = match cmd {
        SiteCmd::Remove { site } => {
            let r = client.remove_site(&site).await?;
            ("removed and revoked", site, r)
        }
        SiteCmd::Revoke { site } => {
            let r = client.revoke_site(&site).await?;
            ("revoked", site, r)
        }
        SiteCmd::Reinstate { site } => {
            let r = client.reinstate_site(&site).await?;
            ("reinstated", site, r)
        }
    };
    if json_out {
        let v = json!({
            "site": site,
            "action": action,
            "changed": r.changed,
            "revision": r.revision,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if r.changed {
        println!("site {site} {action} (catalog revision {})", r.revision);
    } else {
        println!(
            "site {site}: nothing to change, already {action} (catalog revision {})",
            r.revision
        );
    }
    Ok(())
}
