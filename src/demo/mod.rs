//! `meshbridge demo`: the whole mesh on this machine, as real processes on loopback.
//!
//! A throw-away PKI, a 3-node registry, two sites ("east", "west") with a gateway each, a
//! VM site, echo services in east and on the VM, and federated DNS in west. Then the story,
//! step by step with timings: DNS from west, a request from west through the tunnel, a
//! failover to the VM when east's endpoints stop, the registry leader killed and the mesh
//! still serving. `--smoke` runs it unattended and exits 0 only if every step passed.

mod mesh;
mod probe;
mod procs;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args as ClapArgs;

use mesh::Mesh;

#[derive(ClapArgs)]
pub struct Args {
    /// Run the story unattended, print a summary, exit 0 only if every step succeeded.
    #[arg(long)]
    smoke: bool,
    /// Keep the demo's directory (configs, certificates, logs) after it stops.
    #[arg(long)]
    keep: bool,
}

struct Step {
    name: &'static str,
    result: Result<String>,
    took: Duration,
}

pub async fn run(args: Args) -> Result<ExitCode> {
    let started = Instant::now();
    println!(
        "meshbridge demo: starting a 3-node registry, gateways for east and west, a VM agent (joining with a token) and echo services, all on 127.0.0.1"
    );
    let mut mesh = Mesh::start().await.context("starting the demo mesh")?;
    println!(
        "  everything is up in {:.1} s (files and logs in {})\n",
        started.elapsed().as_secs_f64(),
        mesh.dir().display()
    );
    let mut steps = Vec::new();
    let name = "echo.demo.svc.clusterset.local";

    let step = timed("DNS in west answers the service name", async {
        let ip = mesh.resolve_from_west(name).await?;
        Ok(format!("{name} A {ip} (a VIP of west's gateway)"))
    })
    .await;
    report(&step);
    steps.push(step);

    let step = timed(
        "a client in west reaches the service in east through the tunnel",
        async {
            let reply = mesh.request_from_west("hello from west").await?;
            anyhow::ensure!(
                reply.starts_with("east:"),
                "expected east to answer, got {reply:?}"
            );
            Ok(format!("reply {reply:?}"))
        },
    )
    .await;
    report(&step);
    steps.push(step);

    let step = timed(
        "east's endpoints stop: the next request fails over to the VM",
        async {
            mesh.stop_east_echo().await;
            let reply = mesh.request_from_west("hello again").await?;
            anyhow::ensure!(
                reply.starts_with("vm:"),
                "expected the VM to answer, got {reply:?}"
            );
            Ok(format!("reply {reply:?}, with no error seen by the client"))
        },
    )
    .await;
    report(&step);
    steps.push(step);

    let step = timed("the registry leader is killed (SIGKILL): the mesh keeps serving", async {
        let killed = mesh.kill_registry_leader().await?;
        let ip = mesh.resolve_from_west(name).await?;
        let reply = mesh.request_from_west("still there?").await?;
        let leader = mesh.wait_new_leader(killed, Duration::from_secs(15)).await?;
        Ok(format!("killed node {killed}; DNS still answers {ip}, reply {reply:?}; node {leader} leads now"))
    })
    .await;
    report(&step);
    steps.push(step);

    let failed = steps.iter().filter(|s| s.result.is_err()).count();
    println!();
    if failed == 0 {
        println!(
            "all {} steps passed in {:.1} s",
            steps.len(),
            started.elapsed().as_secs_f64()
        );
    } else {
        println!(
            "{failed} of {} steps FAILED; logs are in {}",
            steps.len(),
            mesh.dir().display()
        );
    }
    if args.smoke || failed > 0 {
        mesh.stop(args.keep || failed > 0).await;
        return Ok(if failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let signal = meshbridge_core::drain::shutdown_signal();
    println!("\nThe mesh stays up until Ctrl-C. Try:");
    for line in mesh.try_next() {
        println!("  {line}");
    }
    signal.await;
    println!(
        "\nstopping every process and removing {}",
        mesh.dir().display()
    );
    mesh.stop(args.keep).await;
    Ok(ExitCode::SUCCESS)
}

async fn timed(name: &'static str, f: impl Future<Output = Result<String>>) -> Step {
    let t = Instant::now();
    let result = f.await;
    Step {
        name,
        result,
        took: t.elapsed(),
    }
}

fn report(s: &Step) {
    match &s.result {
        Ok(detail) => println!(
            "[ok]   {} ({} ms)\n       {detail}",
            s.name,
            s.took.as_millis()
        ),
        Err(e) => println!(
            "[FAIL] {} ({} ms)\n       {e:#}",
            s.name,
            s.took.as_millis()
        ),
    }
}
