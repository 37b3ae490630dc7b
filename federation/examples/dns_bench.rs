//! Serve the benchmark zone of `../shared/bench/dns.sh` from a catalog: NREC services
//! `svcNNNNN.nsMM` (MM = NNNNN mod 100), each with one ready endpoint 10.x.y.z in this site,
//! so `svcNNNNN.nsMM.svc.clusterset.local A` gets the same answer as from the zone file.
//!
//! `cargo run --release -p meshbridge-federation --example dns_bench -- 127.0.0.1:5353 10000`

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use meshbridge_core::model::{
    Catalog, Endpoint, Export, Locality, Port, Protocol, ServiceKey, Site,
};
use meshbridge_federation::dns::{Config, DnsServer, Index, RateLimit};

fn catalog(n: u32) -> Catalog {
    let mut c = Catalog::default();
    let site = Site {
        name: "bench".into(),
        locality: Locality::default(),
        lease_ttl_ms: 10_000,
        grace_ms: 10_000,
        created_revision: 1,
        ..Site::default()
    };
    c.sites.insert("bench".into(), Arc::new(site));
    for i in 0..n {
        let key = ServiceKey::new(format!("ns{:02}", i % 100), format!("svc{i:05}"));
        let ip = Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8);
        let export = Export {
            site: "bench".into(),
            service: key.clone(),
            generation: 1,
            ports: vec![Port {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
                target_port: 80,
                app_protocol: None,
            }],
            endpoints: vec![Endpoint {
                address: IpAddr::V4(ip),
                hostname: None,
                ready: true,
                weight: 1,
                identity: None,
                zone: None,
            }],
            headless: false,
            created_revision: u64::from(i) + 2,
            updated_revision: u64::from(i) + 2,
        };
        c.exports.insert((key, "bench".into()), Arc::new(export));
    }
    c.revision = u64::from(n) + 2;
    c
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:5353".into());
    let n: u32 = args.next().map_or(Ok(10_000), |s| s.parse())?;
    let started = std::time::Instant::now();
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(catalog(n)));
    let config = Config {
        listen,
        site: "bench".into(),
        rate_limit: RateLimit {
            per_client_qps: 0,
            burst: 0,
        },
        ..Config::default()
    };
    // How long indexing takes: in full, and again after one export changed (a full walk
    // that reuses unchanged services, and the incremental update the server uses).
    let mut cat = catalog(n);
    let t = std::time::Instant::now();
    let full = Index::build(&config, &cat)?;
    let full_took = t.elapsed();
    let previous = cat.clone();
    if let Some(e) = cat.exports.values_mut().nth(n as usize / 2) {
        let mut changed = (**e).clone();
        changed.generation += 1;
        changed.endpoints[0].address = IpAddr::V4(Ipv4Addr::new(10, 250, 0, 1));
        *e = Arc::new(changed);
    }
    cat.revision += 1;
    let time = |f: &dyn Fn() -> Result<Index, meshbridge_federation::dns::DnsError>| {
        let mut took = Vec::new();
        for _ in 0..21 {
            let t = std::time::Instant::now();
            drop(f()?);
            took.push(t.elapsed());
        }
        took.sort();
        Ok::<_, anyhow::Error>(took[took.len() / 2])
    };
    let rebuild = time(&|| full.rebuild(&config, &cat))?;
    let update = time(&|| full.update(&config, &previous, &cat))?;
    let again = full.update(&config, &previous, &cat)?;
    // What a catalog replica pays per delta while the previous catalog is still shared (the
    // registry client's copy-on-write of the whole catalog).
    let clone = {
        let mut took = Vec::new();
        for _ in 0..21 {
            let t = std::time::Instant::now();
            drop(std::hint::black_box(cat.clone()));
            took.push(t.elapsed());
        }
        took.sort();
        took[took.len() / 2]
    };
    eprintln!(
        "index: {} names, full build {full_took:?}; after one change (median of 21): \
         rebuild {rebuild:?}, update {update:?}; catalog clone {clone:?}",
        again.len(),
    );
    let dns = DnsServer::start(config, rx).await?;
    eprintln!(
        "serving {n} services on {} (indexed in {:?})",
        dns.local_addr(),
        started.elapsed()
    );
    // Churn: a new catalog every CHURN_MS whose site moved zone, so the server rebuilds its
    // whole index each time (the slow path: every service's names are recomputed), while
    // the load generator measures answers/s. Bounded: at most ten minutes.
    if let Some(ms) = std::env::var("CHURN_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
    {
        let tx = tx.clone();
        let mut churned = cat.clone();
        tokio::spawn(async move {
            for i in 0..(600_000 / ms) {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                if let Some(site) = churned.sites.get_mut("bench") {
                    let mut moved = (**site).clone();
                    moved.locality.zone = format!("zone-{}", i % 2);
                    *site = Arc::new(moved);
                }
                churned.revision += 1;
                if tx.send(Arc::new(churned.clone())).is_err() {
                    return;
                }
            }
        });
        eprintln!("churn: the whole index is rebuilt every {ms} ms");
    }
    if let Some(rounds) = std::env::var("CHANGE_LATENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|r: &u32| *r > 0)
    {
        change_latency(&tx, cat, dns.local_addr(), rounds).await?;
    }
    meshbridge_core::drain::shutdown_signal().await;
    dns.shutdown(Duration::from_secs(2)).await;
    Ok(())
}

/// Change one export `rounds` times; each time, how long until the DNS answer shows it.
async fn change_latency(
    tx: &tokio::sync::watch::Sender<Arc<Catalog>>,
    mut cat: Catalog,
    addr: std::net::SocketAddr,
    rounds: u32,
) -> anyhow::Result<()> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    let key = (ServiceKey::new("ns42", "svc00042"), "bench".to_string());
    let name = Name::from_ascii("svc00042.ns42.svc.clusterset.local.")?;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    socket.connect(addr).await?;
    let mut took = Vec::new();
    let mut buf = vec![0u8; 1500];
    for round in 0..rounds {
        let want = Ipv4Addr::new(10, 251, (round >> 8) as u8, round as u8);
        if let Some(e) = cat.exports.get_mut(&key) {
            let mut changed = (**e).clone();
            changed.generation += 1;
            changed.endpoints[0].address = IpAddr::V4(want);
            *e = Arc::new(changed);
        }
        cat.revision += 1;
        let started = std::time::Instant::now();
        tx.send_replace(Arc::new(cat.clone()));
        loop {
            let mut q = Message::query();
            q.metadata.id = round as u16;
            q.add_query(Query::query(name.clone(), RecordType::A));
            socket.send(&q.to_vec()?).await?;
            let n = socket.recv(&mut buf).await?;
            let answer = Message::from_vec(&buf[..n])?;
            if answer
                .answers
                .iter()
                .any(|r| r.data == RData::A(want.into()))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        took.push(started.elapsed());
    }
    took.sort();
    let pct = |p: usize| took[(took.len() * p / 100).min(took.len() - 1)];
    eprintln!(
        "export change -> answer, {rounds} rounds: p50 {:?}, p99 {:?}, max {:?}",
        pct(50),
        pct(99),
        took[took.len() - 1]
    );
    Ok(())
}
