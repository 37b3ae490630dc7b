//! `meshbridge echo`: a tiny TCP echo service for the demo and for trying the mesh by hand.
//! Every reply line is prefixed with the server's name, so a client sees which site served it.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[derive(ClapArgs)]
pub struct Args {
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// Prefix of every reply line.
    #[arg(long, default_value = "echo")]
    name: String,
}

pub async fn run(args: Args) -> Result<ExitCode> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}: cannot bind", args.listen))?;
    let stop = meshbridge_core::drain::shutdown_signal();
    tokio::pin!(stop);
    println!("echo {} listening on {}", args.name, listener.local_addr()?);
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(ExitCode::SUCCESS),
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let name = args.name.clone();
                tasks.spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut lines = BufReader::new(r).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        if w.write_all(format!("{name}: {line}\n").as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        }
        while tasks.try_join_next().is_some() {}
    }
}
