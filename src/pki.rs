//! `meshbridge pki`: make a development CA, issue SVIDs, inspect certificates.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args as ClapArgs, Subcommand};
use meshbridge_core::id::SpiffeId;
use meshbridge_core::pki::{Ca, parse_duration};
use meshbridge_core::tls::{cert_info, load_certs, rfc3339};

#[derive(ClapArgs)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a CA for a trust domain: DIR/ca.pem, DIR/ca.key (0600).
    Init {
        #[arg(long)]
        trust_domain: String,
        #[arg(long)]
        out: PathBuf,
        /// CA lifetime.
        #[arg(long, default_value = "365d", value_parser = parse_duration)]
        ttl: std::time::Duration,
        /// Overwrite an existing CA in DIR.
        #[arg(long)]
        force: bool,
    },
    /// Issue an SVID from a CA: DIR/cert.pem, DIR/key.pem (0600), DIR/bundle.pem.
    Issue {
        /// The SPIFFE id, e.g. spiffe://corp.example/site/east/gateway.
        #[arg(long)]
        id: String,
        /// Directory of the CA (made by `pki init`).
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: std::time::Duration,
        /// Extra DNS names (repeatable).
        #[arg(long = "dns")]
        dns: Vec<String>,
    },
    /// Show what a PEM certificate file holds: ids, issuer, validity, days left.
    Inspect {
        file: PathBuf,
        /// Output format: table or json.
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
    },
}

pub fn run(args: Args) -> Result<ExitCode> {
    match args.cmd {
        Cmd::Init {
            trust_domain,
            out,
            ttl,
            force,
        } => {
            if out.join(meshbridge_core::pki::CA_KEY).exists() && !force {
                bail!(
                    "{} already holds a CA key; refusing to overwrite it (use --force)",
                    out.display()
                );
            }
            let ca = Ca::generate(&trust_domain, ttl)?;
            ca.write_to(&out)?;
            println!(
                "CA for trust domain {trust_domain} written to {}",
                out.display()
            );
            println!(
                "  {}/ca.pem (certificate, share it as the trust bundle)",
                out.display()
            );
            println!("  {}/ca.key (private key, mode 0600)", out.display());
        }
        Cmd::Issue {
            id,
            ca,
            out,
            ttl,
            dns,
        } => {
            let id = SpiffeId::parse(&id).context("--id")?;
            if id.path().is_empty() || id.path() == "/" {
                anyhow::bail!(
                    "--id {id}: names a trust domain, not a workload: an SVID needs a path \
                     (spiffe://{}/site/<site>/gateway, .../registry/<n>, .../ctl/<name>)",
                    id.trust_domain()
                );
            }
            let ca = Ca::load(&ca)?;
            let svid = ca.issue(&id, ttl, &dns)?;
            svid.write_to(&out)?;
            println!("SVID {id} written to {}", out.display());
            let ca_end = ca.not_after()?;
            let asked = meshbridge_core::clock::unix_secs()
                .saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
            if asked > ca_end {
                eprintln!(
                    "warning: --ttl goes past the CA's own end: the SVID is valid until {} only \
                     (a certificate cannot outlive its CA)",
                    meshbridge_core::tls::rfc3339(ca_end)
                );
            }
            println!("  cert.pem, key.pem (0600), bundle.pem");
        }
        Cmd::Inspect { file, output } => {
            let certs = load_certs(&file)?;
            let now = meshbridge_core::clock::unix_secs();
            let infos = certs
                .iter()
                .enumerate()
                .map(|(i, der)| {
                    cert_info(der).map_err(|e| {
                        anyhow::anyhow!("{}: certificate #{}: {e}", file.display(), i + 1)
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            match output.as_str() {
                "json" => {
                    let v: Vec<_> = infos
                        .iter()
                        .map(|c| {
                            serde_json::json!({
                                "subject": c.subject, "issuer": c.issuer, "spiffe_ids": c.spiffe_ids,
                                "dns_names": c.dns_names, "is_ca": c.is_ca, "serial": c.serial,
                                "not_before": rfc3339(c.not_before), "not_after": rfc3339(c.not_after),
                                "days_left": c.seconds_left(now) / 86400,
                            })
                        })
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&v)?);
                }
                "table" => {
                    for (i, c) in infos.iter().enumerate() {
                        println!(
                            "certificate #{}{}",
                            i + 1,
                            if c.is_ca { " (CA)" } else { "" }
                        );
                        println!("  spiffe id   {}", c.spiffe_ids.join(", "));
                        if !c.dns_names.is_empty() {
                            println!("  dns names   {}", c.dns_names.join(", "));
                        }
                        println!("  subject     {}", c.subject);
                        println!("  issuer      {}", c.issuer);
                        println!("  serial      {}", c.serial);
                        println!("  not before  {}", rfc3339(c.not_before));
                        println!("  not after   {}", rfc3339(c.not_after));
                        let left = c.seconds_left(now);
                        if left < 0 {
                            println!("  days left   EXPIRED {} days ago", -left / 86400);
                        } else {
                            println!("  days left   {} ({} h)", left / 86400, left / 3600);
                        }
                    }
                }
                other => bail!("-o {other:?}: use table or json"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
