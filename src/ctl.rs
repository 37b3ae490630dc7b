//! `meshbridge ctl`: the operator's view of the mesh, as tables or JSON.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args as ClapArgs, Subcommand};
use meshbridge_core::client::{ClientOptions, Consistency, RegistryClient};
use meshbridge_core::model::{MergedService, ServiceKey, Site, SiteState};
use meshbridge_core::proto;
use meshbridge_core::tls::{Identity, IdentityFiles};
use serde_json::{Value, json};

mod export;
mod owners;
mod policy;
mod site;
mod status;
mod token;

#[derive(ClapArgs)]
pub struct Args {
    /// Registry URLs (comma-separated or repeated), e.g. https://127.0.0.1:7443.
    #[arg(
        long,
        env = "MESHBRIDGE_REGISTRY",
        value_delimiter = ',',
        required = true
    )]
    registry: Vec<String>,
    /// Directory with this operator's SVID (cert.pem, key.pem, bundle.pem); the id should be
    /// spiffe://<td>/ctl/<name> for admin commands.
    #[arg(long, env = "MESHBRIDGE_TLS_DIR")]
    tls_dir: PathBuf,
    /// Output: table or json.
    #[arg(short = 'o', long, default_value = "table", global = true)]
    output: Output,
    /// Read from whichever node answers, without a round trip to the leader.
    #[arg(long, global = true)]
    stale: bool,
    /// How long a command keeps trying the registry's nodes before it gives up, like 10s,
    /// 1m (each attempt on one node: at most 5 s). `members add` waits longer by nature.
    #[arg(long, global = true, default_value = "10s", value_parser = meshbridge_core::pki::parse_duration)]
    timeout: std::time::Duration,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// One-screen diagnosis: registry members and lag, sites and staleness, conflicts, certs.
    Status,
    /// Sites with kind, locality, lease age and staleness.
    Sites,
    /// Services with ports and endpoints per site.
    Services,
    /// One service in detail: `NAMESPACE/NAME`.
    Service { key: String },
    /// Registry membership changes.
    Members {
        #[command(subcommand)]
        cmd: MembersCmd,
    },
    /// Export ownership: which sites may export the services of a namespace or service.
    Owners {
        #[command(subcommand)]
        cmd: owners::OwnersCmd,
    },
    /// Policies: which principals may reach a service.
    Policy {
        #[command(subcommand)]
        cmd: policy::PolicyCmd,
    },
    /// Exports as the registry holds them, per site.
    Export {
        #[command(subcommand)]
        cmd: export::ExportCmd,
    },
    /// Take a site out of the mesh (remove, revoke) or let it back (reinstate).
    Site {
        #[command(subcommand)]
        cmd: site::SiteCmd,
    },
    /// Join tokens for new VM agents and gateways (the registry needs its ca_dir).
    Token {
        #[command(subcommand)]
        cmd: token::TokenCmd,
    },
}

#[derive(Subcommand)]
enum MembersCmd {
    /// Add a node as a learner (it then catches up from the log or a snapshot).
    Add {
        node_id: u64,
        url: String,
        /// Return at once instead of waiting for it to catch up.
        #[arg(long)]
        no_wait: bool,
    },
    /// Make a learner a voter.
    Promote { node_id: u64 },
    /// Remove a node from the cluster.
    Remove { node_id: u64 },
}

pub async fn run(args: Args) -> Result<ExitCode> {
    let identity = Identity::load(IdentityFiles::in_dir(&args.tls_dir)).context("--tls-dir")?;
    let defaults = ClientOptions::default();
    let options = ClientOptions {
        retry_deadline: args.timeout,
        attempt_timeout: defaults.attempt_timeout.min(args.timeout),
        ..defaults
    };
    let client = RegistryClient::with_options(&args.registry, identity.clone(), options).await?;
    let consistency = if args.stale {
        Consistency::Stale
    } else {
        Consistency::Linearizable
    };
    let json_out = args.output == Output::Json;
    let out = Printer {
        color: !json_out && std::io::stdout().is_terminal(),
    };
    match args.cmd {
        Cmd::Status => {
            return status::status(&client, &identity, consistency, json_out, &out).await;
        }
        Cmd::Sites => {
            let list = client.list_sites(consistency).await?;
            if json_out {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&sites_json(&list.sites, list.now_ms))?
                );
            } else {
                print_sites(&list.sites, list.now_ms, &out);
            }
        }
        Cmd::Services => {
            let list = client.list_services(consistency).await?;
            if json_out {
                println!("{}", serde_json::to_string_pretty(&list.value)?);
            } else {
                print_services(&list.value);
            }
        }
        Cmd::Service { key } => {
            let (ns, name) = key
                .split_once('/')
                .with_context(|| format!("{key:?}: expected NAMESPACE/NAME"))?;
            let key = ServiceKey::new(ns, name);
            let got = client.get_service(&key, consistency).await?;
            let Some(svc) = got.value else {
                bail!("service {key} is not exported by any site")
            };
            if json_out {
                println!("{}", serde_json::to_string_pretty(&svc)?);
            } else {
                print_service_detail(&svc, &out);
            }
        }
        Cmd::Token { cmd } => token::run(&client, cmd, consistency, json_out).await?,
        Cmd::Policy { cmd } => policy::run(&client, cmd, consistency, json_out).await?,
        Cmd::Export { cmd } => export::run(&client, cmd, consistency, json_out).await?,
        Cmd::Site { cmd } => site::run(&client, cmd, json_out).await?,
        Cmd::Owners { cmd } => owners::run(&client, cmd, consistency, json_out).await?,
        Cmd::Members { cmd } => {
            let reply = match cmd {
                MembersCmd::Add {
                    node_id,
                    url,
                    no_wait,
                } => client.add_learner(node_id, &url, !no_wait).await?,
                MembersCmd::Promote { node_id } => client.promote(node_id).await?,
                MembersCmd::Remove { node_id } => client.remove_member(node_id).await?,
            };
            let members: Vec<Value> = reply.members.iter().map(member_json).collect();
            if json_out {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({"log_index": reply.log_index, "members": members})
                    )?
                );
            } else {
                println!("membership changed at log index {}", reply.log_index);
                for m in &reply.members {
                    println!(
                        "  node {:<4} {:<8} {}",
                        m.node_id,
                        if m.voter { "voter" } else { "learner" },
                        m.url
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn member_json(m: &proto::MemberStatus) -> Value {
    json!({"node_id": m.node_id, "url": m.url, "voter": m.voter, "matched_index": m.matched_index, "lag": m.lag})
}

pub(crate) fn sites_json(sites: &[Site], now_ms: u64) -> Value {
    Value::Array(
        sites
            .iter()
            .map(|s| {
                json!({
                    "name": s.name, "kind": s.kind, "region": s.locality.region, "zone": s.locality.zone,
                    "state": s.state.name(), "staleness_seconds": s.staleness_seconds(now_ms),
                    "lease_age_ms": now_ms.saturating_sub(s.last_heartbeat_ms), "lease_ttl_ms": s.lease_ttl_ms,
                    "grace_ms": s.grace_ms, "gateways": s.gateways,
                    "instances": s.instances.iter().map(|i| json!({
                        "name": i.name, "gateways": i.gateways,
                        "heartbeat_age_ms": now_ms.saturating_sub(i.last_heartbeat_ms),
                        "links": i.links.len(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

pub(crate) struct Printer {
    pub(crate) color: bool,
}

impl Printer {
    pub(crate) fn red(&self, s: &str) -> String {
        if self.color {
            format!("\x1b[31m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
    pub(crate) fn green(&self, s: &str) -> String {
        if self.color {
            format!("\x1b[32m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
    pub(crate) fn yellow(&self, s: &str) -> String {
        if self.color {
            format!("\x1b[33m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
}

pub(crate) fn print_sites(sites: &[Site], now_ms: u64, out: &Printer) {
    println!(
        "{:<18} {:<8} {:<22} {:<10} {:>9} {:>10}  GATEWAYS",
        "SITE", "KIND", "LOCALITY", "STATE", "LEASE AGE", "STALE FOR"
    );
    for s in sites {
        let name = s.state.name();
        let state = match s.state {
            SiteState::Fresh => out.green(name),
            SiteState::Stale { .. } => out.yellow(name),
            SiteState::Withdrawn { .. } => out.red(name),
        };
        let pad = 10 + state.len() - s.state.name().len();
        println!(
            "{:<18} {:<8} {:<22} {:<pad$} {:>8.1}s {:>9}s  {}",
            s.name,
            format!("{:?}", s.kind).to_lowercase(),
            format!("{}/{}", s.locality.region, s.locality.zone),
            state,
            now_ms.saturating_sub(s.last_heartbeat_ms) as f64 / 1000.0,
            s.staleness_seconds(now_ms),
            s.gateways.join(","),
        );
        // A site with several gateways: each on a line of its own.
        for i in &s.instances {
            println!(
                "  gateway {:<40} {:>8.1}s  {}",
                i.name,
                now_ms.saturating_sub(i.last_heartbeat_ms) as f64 / 1000.0,
                i.gateways.join(","),
            );
        }
    }
}

pub(crate) fn print_services(services: &[MergedService]) {
    println!(
        "{:<32} {:<24} {:<9} SITES (ready endpoints)",
        "SERVICE", "PORTS", "CONFLICTS"
    );
    for s in services {
        let ports: Vec<String> = s
            .ports
            .iter()
            .map(|p| format!("{}:{}", p.name, p.port))
            .collect();
        let sites: Vec<String> = s
            .groups
            .iter()
            .map(|g| format!("{}({})", g.site, g.ready_count()))
            .collect();
        println!(
            "{:<32} {:<24} {:<9} {}",
            s.key.to_string(),
            ports.join(","),
            s.conflicts.len() + s.type_conflicts.len(),
            sites.join(" ")
        );
    }
}

fn print_service_detail(s: &MergedService, out: &Printer) {
    println!(
        "service {}{}",
        s.key,
        if s.headless { " (headless)" } else { "" }
    );
    for p in &s.ports {
        println!("  port {} {}/{}", p.name, p.port, p.protocol);
    }
    for c in &s.type_conflicts {
        println!(
            "  {}",
            out.red(&format!(
                "type conflict: site {} exports it as {}, site {} (older) wins as {}",
                c.loser_site,
                meshbridge_core::model::TypeConflict::type_name(!c.headless),
                c.winner_site,
                meshbridge_core::model::TypeConflict::type_name(c.headless)
            ))
        );
    }
    for c in &s.conflicts {
        println!(
            "  {}",
            out.red(&format!(
                "port conflict on {:?}: site {} defines {}/{}, site {} (older) wins with {}/{}",
                c.port_name,
                c.loser_site,
                c.loser.port,
                c.loser.protocol,
                c.winner_site,
                c.winner.port,
                c.winner.protocol
            ))
        );
    }
    for g in &s.groups {
        println!(
            "  site {} ({}/{}) {} generation {}",
            g.site,
            g.locality.region,
            g.locality.zone,
            g.state.name(),
            g.generation
        );
        for e in &g.endpoints {
            println!(
                "    {} {}{}",
                e.address,
                if e.ready {
                    out.green("ready")
                } else {
                    out.yellow("not ready")
                },
                e.hostname
                    .as_deref()
                    .map(|h| format!(" hostname={h}"))
                    .unwrap_or_default()
            );
        }
    }
}
