//! `meshbridge`: one binary, one subcommand per role. Wiring only: the logic lives in the
//! library crates.
#![forbid(unsafe_code)]

mod agent;
mod ctl;
mod demo;
mod dns;
mod echo;
mod gateway;
mod kube;
mod malloc;
mod pki;
mod registry;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meshbridge_core::telemetry::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "meshbridge",
    version,
    about = "Multi-cluster federation and hybrid mesh bridge"
)]
struct Cli {
    /// Log format: plain or json.
    #[arg(
        long,
        global = true,
        default_value = "plain",
        env = "MESHBRIDGE_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the VM agent of a legacy host (joins with a token, exports health-checked
    /// services, DNS stub, VIP listeners for imports, inbound tunnels).
    Agent(agent::Args),
    /// Development PKI: a CA per trust domain, SVIDs, inspection.
    Pki(pki::Args),
    /// The operator's view: status, sites, services, membership.
    Ctl(ctl::Args),
    /// Run the federated DNS server on its own.
    Dns(dns::Args),
    /// A tiny TCP echo service (replies prefixed with --name), for the demo and trials.
    #[command(hide = true)]
    Echo(echo::Args),
    /// Run a site's east-west gateway.
    Gateway(gateway::Args),
    /// Run a cluster's Kubernetes adapter (MCS ServiceExport/ServiceImport), or print its CRDs.
    Kube(kube::Args),
    /// Run a registry node (Raft-replicated catalog, registry API).
    Registry(registry::Args),
    /// Run the whole mesh on this machine and show it working.
    Demo(demo::Args),
}

fn main() -> ExitCode {
    quiet_on_broken_pipe();
    meshbridge_core::install_crypto_provider();
    let cli = Cli::parse();
    // The data plane's roles, before any thread exists (see `malloc`).
    let malloc = match cli.command {
        Command::Gateway(_) | Command::Agent(_) => malloc::reexec_tuned(),
        _ => None,
    };
    exit_with_parent();
    let log_warning = telemetry::init(
        cli.log_format,
        "info,openraft=warn,hickory_server=warn,hickory_proto=warn",
    );
    if let Some(why) = log_warning {
        tracing::warn!("{why}");
    }
    if let Some(why) = malloc {
        tracing::warn!("{why}");
    }
    if let Err(why) = malloc::opted_out(std::env::var(malloc::OPT_OUT).ok().as_deref()) {
        tracing::warn!("{why}");
    }
    let result = match cli.command {
        Command::Agent(args) => agent::runtime().and_then(|rt| rt.block_on(agent::run(args))),
        Command::Pki(args) => pki::run(args),
        Command::Ctl(args) => runtime().and_then(|rt| rt.block_on(ctl::run(args))),
        Command::Dns(args) => runtime().and_then(|rt| rt.block_on(dns::run(args))),
        Command::Echo(args) => runtime().and_then(|rt| rt.block_on(echo::run(args))),
        Command::Gateway(args) => gateway::main(args),
        Command::Registry(args) => registry::main(args),
        Command::Kube(args) => runtime().and_then(|rt| rt.block_on(kube::run(args))),
        Command::Demo(args) => runtime().and_then(|rt| rt.block_on(demo::run(args))),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// Exit status of a process that wrote into a closed pipe: what a shell reports for one
/// ended by SIGPIPE (128 + 13).
const BROKEN_PIPE_EXIT: i32 = 141;

/// Output into a closed pipe (`ctl status | head -3`) ends the process quietly, as SIGPIPE
/// ends other tools. Rust ignores SIGPIPE, so `println!` panics on EPIPE instead; restoring
/// the signal needs `unsafe` (forbidden here), so the panic is caught by its message.
fn quiet_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to std") && is_broken_pipe(message) {
            std::process::exit(BROKEN_PIPE_EXIT);
        }
        default(info);
    }));
}

/// Whether a failed print's message is about a closed pipe.
fn is_broken_pipe(message: &str) -> bool {
    let epipe = std::io::Error::from(std::io::ErrorKind::BrokenPipe).to_string();
    message.contains("Broken pipe") || message.contains(&epipe)
}

/// The error and its causes, outermost first, as `{:#}` prints them, but without a cause
/// that the message before it already ends with: many errors quote their source in their
/// own message (`bind admin HTTP on …: Address already in use`), and saying it twice reads
/// as two failures.
fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out == text || out.ends_with(&format!(": {text}")) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// One worker per CPU, for the commands without a `workers` setting.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(meshbridge_core::runtime::build(0)?)
}

/// Processes started by `meshbridge demo` (and tests) carry MESHBRIDGE_EXIT_WITH_PARENT=1:
/// they exit when their parent goes away, even if it was killed with SIGKILL and could not
/// clean up, so no orphan keeps ports and addresses bound.
fn exit_with_parent() {
    if std::env::var_os("MESHBRIDGE_EXIT_WITH_PARENT").is_none() {
        return;
    }
    let parent = std::os::unix::process::parent_id();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(std::time::Duration::from_millis(250));
            if std::os::unix::process::parent_id() != parent {
                std::process::exit(1);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::report;

    #[derive(Debug, thiserror::Error)]
    #[error("bind admin HTTP on 127.0.0.1:9902: {source}")]
    struct Quoting {
        source: std::io::Error,
    }

    #[test]
    fn a_cause_the_message_already_quotes_is_said_once_and_others_are_kept() {
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use");
        let e = anyhow::Error::new(Quoting { source: io }).context("starting the registry node");
        assert_eq!(
            report(&e),
            "starting the registry node: bind admin HTTP on 127.0.0.1:9902: Address already in use"
        );
        let plain = anyhow::anyhow!("no such file").context("reading r.toml");
        assert_eq!(report(&plain), "reading r.toml: no such file");
        // Only a whole quoted cause is dropped, not one that happens to end the message.
        let port = anyhow::anyhow!("0").context("no listener on port 0");
        assert_eq!(report(&port), "no listener on port 0: 0");
    }
}
