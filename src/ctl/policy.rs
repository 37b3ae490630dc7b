//! `meshbridge ctl policy list|put|delete`: which principals may reach a service. A policy
//! comes from flags or from a file (TOML or JSON: `name`, `service = "ns/name"`,
//! `allow = ["site:east", "td:partner.example", "id:spiffe://…", "prefix:spiffe://…/ns/"]`).
//! Each write prints what it changed; bad input is refused naming the field.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use meshbridge_core::client::{Consistency, RegistryClient};
use meshbridge_core::model::{Policy, Principal, ServiceKey};
use serde::Deserialize;
use serde_json::json;

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// Every policy: name, service, allowed principals.
    List,
    /// Create or replace a policy, from flags or `--file`.
    Put {
        /// The policy's name (a DNS subdomain).
        #[arg(long, required_unless_present = "file")]
        name: Option<String>,
        /// The service it guards, `NAMESPACE/NAME`.
        #[arg(long, required_unless_present = "file")]
        service: Option<String>,
        /// An allowed principal (repeat): `site:S` (`site:TD/S` for a partner's),
        /// `td:DOMAIN`, `id:SPIFFE-ID`, `prefix:SPIFFE-ID-PREFIX`. At least one, unless
        /// `--deny-all`.
        #[arg(long = "allow", required_unless_present_any = ["file", "deny_all"])]
        allow: Vec<String>,
        /// A policy that lets nobody reach the service (instead of `--allow`).
        #[arg(long, conflicts_with = "allow")]
        deny_all: bool,
        /// A TOML or JSON file with `name`, `service` and `allow` (not with the other flags;
        /// `allow = []` lets nobody in).
        #[arg(long, conflicts_with_all = ["name", "service", "allow", "deny_all"])]
        file: Option<PathBuf>,
    },
    /// Remove a policy by name.
    Delete { name: String },
}

/// A policy as written by hand.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    name: String,
    service: String,
    allow: Vec<String>,
}

/// Who a policy lets in, for a line of text ("nobody" for no one).
fn principals_text(allow: &[Principal]) -> String {
    if allow.is_empty() {
        return "nobody".into();
    }
    allow
        .iter()
        .map(principal_text)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `kind:value` → a principal; the error names the flag value.
pub fn parse_principal(s: &str) -> Result<Principal> {
    let (kind, value) = s.split_once(':').with_context(|| {
        format!("{s:?}: expected site:S, td:DOMAIN, id:SPIFFE-ID or prefix:SPIFFE-ID-PREFIX")
    })?;
    let value = value.to_string();
    Ok(match kind {
        "site" => Principal::Site(value),
        "td" | "trust-domain" => Principal::TrustDomain(value),
        "id" => Principal::Id(value),
        "prefix" => Principal::IdPrefix(value),
        other => bail!("{s:?}: unknown principal kind {other:?} (site, td, id, prefix)"),
    })
}

/// A principal as `parse_principal` reads it.
pub fn principal_text(p: &Principal) -> String {
    match p {
        Principal::Site(s) => format!("site:{s}"),
        Principal::TrustDomain(s) => format!("td:{s}"),
        Principal::Id(s) => format!("id:{s}"),
        Principal::IdPrefix(s) => format!("prefix:{s}"),
    }
}

fn service_key(s: &str) -> Result<ServiceKey> {
    let (ns, name) = s
        .split_once('/')
        .with_context(|| format!("service {s:?}: expected NAMESPACE/NAME"))?;
    Ok(ServiceKey::new(ns, name))
}

fn read_file(path: &PathBuf) -> Result<PolicyFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("policy file {}: cannot read it", path.display()))?;
    let parsed = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!(e))
    } else {
        toml::from_str(&text).map_err(|e| anyhow::anyhow!(e))
    };
    parsed.with_context(|| format!("policy file {}", path.display()))
}

fn policy_json(p: &Policy) -> serde_json::Value {
    json!({
        "name": p.name,
        "service": p.service.to_string(),
        "allow": p.allow.iter().map(principal_text).collect::<Vec<_>>(),
    })
}

pub async fn run(
    client: &RegistryClient,
    cmd: PolicyCmd,
    consistency: Consistency,
    json_out: bool,
) -> Result<()> {
    match cmd {
        PolicyCmd::List => {
            let catalog = client.catalog(consistency).await?;
            if json_out {
                let list: Vec<_> = catalog.policies.values().map(|p| policy_json(p)).collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if catalog.policies.is_empty() {
                println!("no policies: every service takes the gateways' default action");
            } else {
                println!("{:<32} {:<32} ALLOW", "NAME", "SERVICE");
                for p in catalog.policies.values() {
                    let allow: Vec<String> = p.allow.iter().map(principal_text).collect();
                    println!(
                        "{:<32} {:<32} {}",
                        p.name,
                        p.service.to_string(),
                        allow.join(", ")
                    );
                }
            }
        }
        PolicyCmd::Put {
            name,
            service,
            allow,
            deny_all: _,
            file,
        } => {
            let (name, service, allow) = match file {
                Some(path) => {
                    let f = read_file(&path)?;
                    (f.name, f.service, f.allow)
                }
                None => (
                    name.context("--name is required")?,
                    service.context("--service is required")?,
                    allow,
                ),
            };
            let policy = Policy {
                name,
                service: service_key(&service)?,
                allow: allow
                    .iter()
                    .map(|a| parse_principal(a))
                    .collect::<Result<_>>()?,
            };
            let before = client
                .catalog(Consistency::Linearizable)
                .await?
                .policies
                .get(&policy.name)
                .map(|p| (**p).clone());
            let r = client.put_policy(&policy).await?;
            if json_out {
                let v = json!({
                    "policy": policy_json(&policy),
                    "before": before.as_ref().map(policy_json),
                    "changed": r.changed,
                    "revision": r.revision,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let what = match (&before, r.changed) {
                    (_, false) => "unchanged".to_string(),
                    (None, true) => "created".to_string(),
                    (Some(b), true) => format!(
                        "replaced (was {} from {})",
                        b.service,
                        principals_text(&b.allow)
                    ),
                };
                println!(
                    "policy {} {what}: {} from {} (catalog revision {})",
                    policy.name,
                    policy.service,
                    principals_text(&policy.allow),
                    r.revision
                );
            }
        }
        PolicyCmd::Delete { name } => {
            let r = client.delete_policy(&name).await?;
            if json_out {
                let v = json!({"name": name, "deleted": r.changed, "revision": r.revision});
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "policy {name} deleted: its service takes the gateways' default action (catalog revision {})",
                    r.revision
                );
            }
        }
    }
    Ok(())
}
