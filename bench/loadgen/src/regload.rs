//! regload: the registry workloads of `bench/registry.sh`, matching `../shared/bench/etcd.sh`
//! (sequential puts, concurrent puts, failover) plus linearizable reads, watch propagation
//! scale, and export write -> federated DNS answer. Every subcommand prints one JSON line.
//!
//! A "put" is a `PutExport` of one service with one endpoint, about 256 bytes of JSON, to a
//! distinct key each time, acknowledged only after the leader's quorum fsynced it.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use meshbridge_core::client::{Consistency, RegistryClient};
use meshbridge_core::model::{
    Endpoint, Export, Locality, Port, Protocol, ServiceKey, SiteKind, SiteSpec,
};
use meshbridge_core::tls::{Identity, IdentityFiles};
use serde_json::json;

#[derive(Parser)]
struct Cli {
    /// Registry URLs.
    #[arg(long, value_delimiter = ',')]
    registry: Vec<String>,
    /// An admin SVID directory (spiffe://<td>/ctl/...).
    #[arg(long)]
    tls_dir: std::path::PathBuf,
    /// Client threads (1: tokio's current-thread scheduler, as a gateway runs; 0: one per
    /// CPU).
    #[arg(long, env = "REGLOAD_THREADS", default_value_t = 0)]
    threads: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Sequential puts on one connection to the first URL.
    Seq {
        #[arg(long, default_value_t = 2000)]
        n: usize,
    },
    /// `clients` concurrent writers for `duration` seconds, spread over the URLs.
    Conc {
        #[arg(long, default_value_t = 16)]
        clients: usize,
        #[arg(long, default_value_t = 10)]
        duration: u64,
    },
    /// Linearizable reads (GetService) by `clients` readers.
    Reads {
        #[arg(long, default_value_t = 16)]
        clients: usize,
        #[arg(long, default_value_t = 10)]
        duration: u64,
    },
    /// Time from a write (first URL) to a watcher on another node (second URL) seeing it.
    Watch {
        #[arg(long, default_value_t = 500)]
        n: usize,
    },
    /// SIGKILL the leader (pids as URL=PID,...), then time the first successful write.
    Failover {
        #[arg(long, value_delimiter = ',')]
        pids: Vec<String>,
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Time from an export write (first URL) to `meshbridge dns` (at `server`, following
    /// another node as site "bench") answering the new endpoint address. `background`
    /// services are loaded first, so each change rebuilds an index of realistic size.
    Dns {
        #[arg(long)]
        server: std::net::SocketAddr,
        #[arg(long, default_value_t = 200)]
        n: usize,
        #[arg(long, default_value_t = 10_000)]
        background: usize,
        #[arg(long, default_value_t = "clusterset.local".to_string())]
        zone: String,
    },
    /// Load `sites` × `services` × `endpoints` and report how long it took.
    Scale {
        #[arg(long, default_value_t = 100)]
        sites: usize,
        #[arg(long, default_value_t = 100)]
        services: usize,
        #[arg(long, default_value_t = 10)]
        endpoints: usize,
        #[arg(long, default_value_t = 32)]
        clients: usize,
    },
}

const SITE: &str = "bench";

fn export(site: &str, ns: &str, name: &str, generation: u64, endpoints: usize) -> Export {
    Export {
        site: site.into(),
        service: ServiceKey::new(ns, name),
        generation,
        ports: vec![Port {
            name: "http".into(),
            port: 8080,
            protocol: Protocol::Tcp,
            target_port: 8080,
            app_protocol: None,
        }],
        endpoints: (0..endpoints)
            .map(|i| Endpoint {
                address: std::net::IpAddr::from([10, 1, (i >> 8) as u8, i as u8]),
                hostname: None,
                ready: true,
                weight: 1,
                identity: None,
                zone: None,
            })
            .collect(),
        headless: false,
        created_revision: 0,
        updated_revision: 0,
    }
}

fn spec(name: &str) -> SiteSpec {
    SiteSpec {
        name: name.into(),
        kind: SiteKind::Cluster,
        locality: Locality {
            region: "bench".into(),
            zone: "bench-a".into(),
        },
        gateways: vec!["127.0.0.1:1".into()],
        // Long lease: the benchmark must not see its sites lapse.
        lease_ttl_ms: 3_600_000,
        grace_ms: 3_600_000,
        instance: String::new(),
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let k = ((p / 100.0 * v.len() as f64 + 0.5).round() as usize).clamp(1, v.len()) - 1;
    v[k]
}

fn summary(mut ms: Vec<f64>) -> serde_json::Value {
    let n = ms.len();
    let mean = ms.iter().sum::<f64>() / n.max(1) as f64;
    json!({"n": n, "mean_ms": round(mean), "p50_ms": round(pct(&mut ms, 50.0)), "p90_ms": round(pct(&mut ms, 90.0)),
           "p99_ms": round(pct(&mut ms, 99.0)), "max_ms": round(ms.last().copied().unwrap_or(f64::NAN))})
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn run_id() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn client(urls: &[String], identity: &Arc<Identity>) -> Result<RegistryClient> {
    Ok(RegistryClient::connect(urls, identity.clone()).await?)
}

fn main() -> Result<()> {
    meshbridge_core::install_crypto_provider();
    let cli = Cli::parse();
    meshbridge_core::runtime::build(cli.threads)?.block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    let identity = Identity::load(IdentityFiles::in_dir(&cli.tls_dir))?;
    if cli.registry.is_empty() {
        bail!("--registry: at least one URL");
    }
    let first = client(&cli.registry[..1], &identity).await?;
    first
        .register_site(&spec(SITE))
        .await
        .context("registering the bench site")?;
    let run = run_id();
    let out = match cli.cmd {
        Cmd::Seq { n } => {
            for i in 0..50 {
                first
                    .put_export(&export(SITE, "warm", &format!("w{i}"), run + i as u64, 1))
                    .await?;
            }
            let mut lat = Vec::with_capacity(n);
            let t0 = Instant::now();
            for i in 0..n {
                let s = Instant::now();
                first
                    .put_export(&export(SITE, "seq", &format!("s{run}-{i}"), 1, 1))
                    .await?;
                lat.push(s.elapsed().as_secs_f64() * 1000.0);
            }
            let el = t0.elapsed().as_secs_f64();
            let mut v = summary(lat);
            v["puts_per_s"] = json!(round(n as f64 / el));
            v
        }
        Cmd::Conc { clients, duration } => {
            let pool = clients_for(&cli.registry, clients, &identity).await?;
            let (lat, errs, el) = closed_loop(pool, duration, move |cl, c, i| async move {
                cl.put_export(&export(SITE, "conc", &format!("c{run}-{c}-{i}"), 1, 1))
                    .await
                    .is_ok()
            })
            .await?;
            let n = lat.len();
            let mut v = summary(lat);
            v["puts_per_s"] = json!(round(n as f64 / el));
            v["errors"] = json!(errs);
            v["clients"] = json!(clients);
            v
        }
        Cmd::Reads { clients, duration } => {
            first
                .put_export(&export(SITE, "read", "target", run, 1))
                .await?;
            let pool = clients_for(&cli.registry, clients, &identity).await?;
            let (lat, errs, el) = closed_loop(pool, duration, |cl, _, _| async move {
                let key = ServiceKey::new("read", "target");
                matches!(cl.get_service(&key, Consistency::Linearizable).await, Ok(r) if r.value.is_some())
            })
            .await?;
            let n = lat.len();
            let mut v = summary(lat);
            v["reads_per_s"] = json!(round(n as f64 / el));
            v["errors"] = json!(errs);
            v
        }
        Cmd::Watch { n } => {
            let other = cli
                .registry
                .get(1)
                .context("watch needs two URLs: writer, watcher")?
                .clone();
            let watcher = client(&[other], &identity).await?;
            let mut rx = watcher.watch_catalog();
            // Wait for the replica to be live.
            tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|c| c.revision > 0))
                .await??;
            let mut lat = Vec::with_capacity(n);
            for i in 0..n {
                let key = ServiceKey::new("watch", format!("w{run}-{i}"));
                let s = Instant::now();
                first
                    .put_export(&export(SITE, "watch", &key.name, 1, 1))
                    .await?;
                tokio::time::timeout(
                    Duration::from_secs(10),
                    rx.wait_for(|c| c.export(&key, SITE).is_some()),
                )
                .await??;
                lat.push(s.elapsed().as_secs_f64() * 1000.0);
            }
            summary(lat)
        }
        Cmd::Dns {
            server,
            n,
            background,
            zone,
        } => {
            dns_freshness(
                &first,
                &cli.registry,
                &identity,
                server,
                n,
                background,
                &zone,
                run,
            )
            .await?
        }
        Cmd::Failover { pids, timeout } => {
            let status = first.status().await?;
            let leader_url = status.leader_url.clone();
            let pid = pids
                .iter()
                .find_map(|p| {
                    p.split_once('=')
                        .filter(|(u, _)| *u == leader_url)
                        .map(|(_, pid)| pid.to_string())
                })
                .with_context(|| format!("no pid given for the leader {leader_url}"))?;
            let survivors: Vec<String> = cli
                .registry
                .iter()
                .filter(|u| **u != leader_url)
                .cloned()
                .collect();
            let t0 = Instant::now();
            std::process::Command::new("kill")
                .args(["-9", &pid])
                .status()?;
            // A fresh put every 20 ms (own client, alternating survivors) until one succeeds.
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let mut n = 0u64;
            let deadline = t0 + Duration::from_secs(timeout);
            let first_ok = loop {
                if let Ok(t) = rx.try_recv() {
                    break Some(t);
                }
                if Instant::now() > deadline {
                    break None;
                }
                let url = survivors[n as usize % survivors.len()].clone();
                let (tx, identity) = (tx.clone(), identity.clone());
                tokio::spawn(async move {
                    let Ok(c) = RegistryClient::connect(&[url], identity).await else {
                        return;
                    };
                    if c.put_export(&export(SITE, "failover", "f", run + n + 1, 1))
                        .await
                        .is_ok()
                    {
                        let _ = tx.send(t0.elapsed().as_secs_f64());
                    }
                });
                n += 1;
                tokio::select! {
                    t = rx.recv() => break t,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            };
            json!({"killed": leader_url, "first_write_ok_s": first_ok.map(round)})
        }
        Cmd::Scale {
            sites,
            services,
            endpoints,
            clients,
        } => {
            let t0 = Instant::now();
            let mut tasks = Vec::new();
            let urls = cli.registry.clone();
            let per = sites.div_ceil(clients);
            for c in 0..clients {
                let cl = client(&[urls[c % urls.len()].clone()], &identity).await?;
                tasks.push(tokio::spawn(async move {
                    for s in (c * per)..((c + 1) * per).min(sites) {
                        let site = format!("scale-{s}");
                        cl.register_site(&spec(&site)).await?;
                        for v in 0..services {
                            cl.put_export(&export(
                                &site,
                                "scale",
                                &format!("svc{v}"),
                                run,
                                endpoints,
                            ))
                            .await?;
                        }
                    }
                    Ok::<_, anyhow::Error>(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            let el = t0.elapsed().as_secs_f64();
            let total = sites * services * endpoints;
            json!({"sites": sites, "services": services, "endpoints_total": total, "load_s": round(el),
                   "exports_per_s": round((sites * services) as f64 / el)})
        }
    };
    println!("{out}");
    Ok(())
}

/// Load the background services, then `n` times: change the address of the one endpoint of
/// `dnsfresh/probe`, and query the DNS server every millisecond until it answers the new one.
#[allow(clippy::too_many_arguments)]
async fn dns_freshness(
    writer: &RegistryClient,
    urls: &[String],
    identity: &Arc<Identity>,
    server: std::net::SocketAddr,
    n: usize,
    background: usize,
    zone: &str,
    run: u64,
) -> Result<serde_json::Value> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RData, RecordType};

    let t0 = Instant::now();
    let pool = clients_for(urls, 16, identity).await?;
    let mut tasks = Vec::new();
    for (c, cl) in pool.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            for i in (c..background).step_by(16) {
                cl.put_export(&export(SITE, "dnsbg", &format!("svc{i:05}"), run, 1))
                    .await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let load_s = t0.elapsed().as_secs_f64();

    let name = Name::from_ascii(format!("probe.dnsfresh.svc.{zone}."))?;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    socket.connect(server).await?;
    let mut buf = vec![0u8; 4096];
    let mut id = 0u16;
    // The current answer of the DNS server for the probe name (its A addresses).
    let mut ask = async || -> Result<Vec<std::net::IpAddr>> {
        id = id.wrapping_add(1);
        let mut q = Message::query();
        q.metadata.id = id;
        q.add_query(Query::query(name.clone(), RecordType::A));
        socket.send(&q.to_vec()?).await?;
        loop {
            let got = tokio::time::timeout(Duration::from_secs(1), socket.recv(&mut buf))
                .await
                .context("no DNS answer within 1 s")??;
            let m = Message::from_vec(&buf[..got])?;
            if m.metadata.id != id {
                continue; // a late answer to an earlier query
            }
            return Ok(m
                .answers
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(std::net::IpAddr::V4(a.0)),
                    _ => None,
                })
                .collect());
        }
    };
    let (mut from_write, mut from_ack) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for round in 0..=n {
        let want = std::net::IpAddr::from([10, 252, (round >> 8) as u8, round as u8]);
        let mut e = export(SITE, "dnsfresh", "probe", run + round as u64, 1);
        e.endpoints[0].address = want;
        let s = Instant::now();
        writer.put_export(&e).await?;
        let acked = s.elapsed();
        let deadline = s + Duration::from_secs(10);
        loop {
            if ask().await?.contains(&want) {
                break;
            }
            if Instant::now() > deadline {
                bail!("round {round}: DNS did not answer {want} within 10 s of the write");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let seen = s.elapsed();
        // Round 0 only waits for the server to know the probe service at all.
        if round > 0 {
            from_write.push(seen.as_secs_f64() * 1000.0);
            from_ack.push(seen.saturating_sub(acked).as_secs_f64() * 1000.0);
        }
    }
    let mut v = summary(from_write);
    v["after_ack"] = summary(from_ack);
    v["background_services"] = json!(background);
    v["background_load_s"] = json!(round(load_s));
    Ok(v)
}

/// One client per worker, spread over the URLs (separate connections, as etcd's bench does).
async fn clients_for(
    urls: &[String],
    n: usize,
    identity: &Arc<Identity>,
) -> Result<Vec<RegistryClient>> {
    let mut out = Vec::with_capacity(n);
    for c in 0..n {
        out.push(client(&[urls[c % urls.len()].clone()], identity).await?);
    }
    Ok(out)
}

/// Every client runs `op` back to back for `duration` seconds. Returns the latencies (ms) of
/// the operations that succeeded, the failure count, and the elapsed seconds.
async fn closed_loop<F, Fut>(
    clients: Vec<RegistryClient>,
    duration: u64,
    op: F,
) -> Result<(Vec<f64>, u64, f64)>
where
    F: Fn(RegistryClient, usize, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let stop = Instant::now() + Duration::from_secs(duration);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (c, cl) in clients.into_iter().enumerate() {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errs, mut i) = (Vec::new(), 0u64, 0u64);
            while Instant::now() < stop {
                let s = Instant::now();
                if op(cl.clone(), c, i).await {
                    lat.push(s.elapsed().as_secs_f64() * 1000.0);
                } else {
                    errs += 1;
                }
                i += 1;
            }
            (lat, errs)
        }));
    }
    let (mut all, mut errs) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await?;
        all.extend(l);
        errs += e;
    }
    Ok((all, errs, t0.elapsed().as_secs_f64()))
}
