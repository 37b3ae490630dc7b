//! Crash safety of the registry with the real binaries: three `meshbridge registry`
//! processes with fsync'd storage, SIGKILL at random moments while clients write, restart
//! at once from the same data directory. Every history must be linearizable, no
//! acknowledged write may be missing, and in the end every node's applied catalog must be
//! the same (compared by digest, then in full).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshbridge_core::client::{ClientError, ClientOptions, Consistency, RegistryClient};
use meshbridge_registry::Config;
use meshbridge_testkit::http::get_json;
use meshbridge_testkit::linearizability::{Event, Op, Out, Recorder, check, policies};
use meshbridge_testkit::pki::TestPki;
use meshbridge_testkit::process::Proc;
use rand::Rng;
use serde_json::Value;

const TD: &str = "crash.example";
const KEYS: [&str; 3] = ["k0", "k1", "k2"];
const T: Duration = Duration::from_secs(30);

use meshbridge_testkit::ports::free_addr;

struct Member {
    config: PathBuf,
    admin: SocketAddr,
    proc: Option<Proc>,
}

struct Registry {
    pki: TestPki,
    _data: tempfile::TempDir,
    members: BTreeMap<u64, Member>,
    urls: Vec<String>,
}

impl Registry {
    async fn start() -> Self {
        let pki = TestPki::new(TD);
        let data = tempfile::tempdir().unwrap();
        let listen: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
        let initial: BTreeMap<u64, String> = (1..=3u64)
            .zip(&listen)
            .map(|(id, a)| (id, format!("https://{a}")))
            .collect();
        let mut members = BTreeMap::new();
        for (id, addr) in (1..=3u64).zip(&listen) {
            let tls = pki.issue(
                &format!("node-{id}"),
                &format!("spiffe://{TD}/registry/{id}"),
            );
            let mut config = Config::for_test(
                id,
                *addr,
                data.path().join(format!("node-{id}")),
                "unused",
                &initial,
            );
            config.tls = tls;
            // A killed leader restarts well within the election timeout, as a supervised
            // process does: the window in which a restarted leader could resume its old
            // term (and reuse an early-appended log id) is open on every kill.
            config.raft.election_timeout_min_ms = 800;
            config.raft.election_timeout_max_ms = 1_000;
            let admin = free_addr();
            config.admin_listen = admin.to_string();
            let path = data.path().join(format!("node-{id}.toml"));
            meshbridge_testkit::process::write_config(&path, &config).unwrap();
            members.insert(
                id,
                Member {
                    config: path,
                    admin,
                    proc: None,
                },
            );
        }
        let mut registry = Self {
            pki,
            _data: data,
            members,
            urls: initial.into_values().collect(),
        };
        for id in 1..=3 {
            registry.spawn(id).await;
        }
        registry
    }

    /// Starts node `id` and waits until it listens (retrying while its ports are still
    /// being released by the process just killed).
    async fn spawn(&mut self, id: u64) {
        let m = self.members.get_mut(&id).unwrap();
        assert!(m.proc.is_none(), "node {id} is running");
        let mut last = String::new();
        for _ in 0..20 {
            let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshbridge"));
            cmd.args(["registry", "--config"]).arg(&m.config);
            cmd.env("RUST_LOG", "warn");
            let mut p = Proc::spawn(&format!("registry-{id}"), cmd).unwrap();
            match p.wait_for("listening on", Duration::from_secs(20)).await {
                Ok(_) => {
                    m.proc = Some(p);
                    return;
                }
                Err(e) => {
                    last = e.to_string();
                    p.kill9().await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        panic!("node {id} did not start: {last}");
    }

    /// SIGKILL, reaped.
    async fn kill9(&mut self, id: u64) {
        let m = self.members.get_mut(&id).unwrap();
        let mut p = m.proc.take().expect("running");
        p.kill9().await;
    }

    async fn raft(&self, id: u64) -> Option<Value> {
        get_json(self.members[&id].admin, "/debug/raft").await
    }

    /// The leader every running node agrees on.
    async fn leader(&self) -> u64 {
        let deadline = Instant::now() + T;
        loop {
            let mut seen = BTreeSet::new();
            for (id, m) in &self.members {
                if m.proc.is_some() {
                    let l = self
                        .raft(*id)
                        .await
                        .and_then(|r| r["current_leader"].as_u64());
                    seen.insert(l);
                }
            }
            if seen.len() == 1
                && let Some(Some(l)) = seen.first()
                && self.members[l].proc.is_some()
            {
                return *l;
            }
            assert!(Instant::now() < deadline, "no agreed leader: {seen:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn client(&self) -> RegistryClient {
        let opts = ClientOptions {
            attempt_timeout: Duration::from_secs(1),
            retry_deadline: Duration::from_secs(4),
            ..ClientOptions::default()
        };
        let ctl = self.pki.identity("ctl", &format!("spiffe://{TD}/ctl/test"));
        RegistryClient::with_options(&self.urls, ctl, opts)
            .await
            .unwrap()
    }
}

/// What the clients did: the register history, and the unique policies whose puts were
/// acknowledged (never deleted, so each must be in every node's catalog at the end).
struct Work {
    rec: Recorder,
    acked_unique: Mutex<Vec<String>>,
    stop: AtomicBool,
}

/// One client: puts, linearizable reads and deletes of the shared keys, and puts of
/// policies of its own, one after another, until told to stop.
async fn client_loop(id: usize, client: RegistryClient, work: Arc<Work>) {
    let mut n = 0;
    while !work.stop.load(Ordering::Relaxed) {
        n += 1;
        let (key, roll) = {
            let mut rng = rand::rng();
            (
                KEYS[rng.random_range(0..KEYS.len())],
                rng.random_range(0..10),
            )
        };
        let call = work.rec.now();
        match roll {
            0..3 => {
                let value = format!("c{id}-{n}");
                let op = Op::Put(value.clone());
                let r = client
                    .put_policy(&policies::put(key, &value))
                    .await
                    .map(|_| ());
                work.rec
                    .record(id, key, op.clone(), call, policies::write_outcome(r, &op));
            }
            3..6 => {
                let out = match client.list_policies(Consistency::Linearizable).await {
                    Ok(v) => Out::Value(policies::value_of(&v.value, key)),
                    Err(ClientError::Unavailable { .. }) => Out::Unknown,
                    Err(e) => panic!("get: {e}"),
                };
                work.rec.record(id, key, Op::Get, call, out);
            }
            6 => {
                let r = client.delete_policy(key).await.map(|_| ());
                work.rec.record(
                    id,
                    key,
                    Op::Delete,
                    call,
                    policies::write_outcome(r, &Op::Delete),
                );
            }
            _ => {
                let name = format!("u{id}-{n}");
                let r = client.put_policy(&policies::put(&name, "unique")).await;
                if r.is_ok() {
                    work.acked_unique.lock().unwrap().push(name);
                }
            }
        }
    }
}

/// Starts `n` clients with ids from `first_id`.
async fn start_clients(
    registry: &Registry,
    work: &Arc<Work>,
    first_id: usize,
    n: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    work.stop.store(false, Ordering::Relaxed);
    let mut tasks = Vec::new();
    for i in 0..n {
        let c = registry.client().await;
        tasks.push(tokio::spawn(client_loop(first_id + i, c, work.clone())));
    }
    tasks
}

async fn stop_clients(work: &Work, tasks: Vec<tokio::task::JoinHandle<()>>) {
    work.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
}

/// Waits until `at_least` more writes than `before` were acknowledged (progress after a
/// fault), bounded.
async fn progress(work: &Work, what: &str) {
    let before = work
        .rec
        .events()
        .iter()
        .filter(|e| e.out == Out::Done)
        .count();
    let deadline = Instant::now() + T;
    loop {
        let now = work
            .rec
            .events()
            .iter()
            .filter(|e| e.out == Out::Done)
            .count();
        if now >= before + 5 {
            return;
        }
        assert!(Instant::now() < deadline, "no progress after {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGKILLs the leader `rounds` times at a random moment of the writes, restarting it at
/// once each time.
async fn kill_leaders(registry: &mut Registry, work: &Work, rounds: usize, what: &str) {
    for round in 0..rounds {
        let pause = rand::rng().random_range(20..400);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let leader = registry.leader().await;
        registry.kill9(leader).await;
        let killed = Instant::now();
        registry.spawn(leader).await;
        println!(
            "{what}: round {round}: leader {leader} killed after {pause} ms, listening again in {} ms",
            killed.elapsed().as_millis()
        );
        progress(work, &format!("{what} round {round}")).await;
    }
}

fn digest(v: &Value) -> u64 {
    let mut h = DefaultHasher::new();
    v.to_string().hash(&mut h);
    h.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_random_moments_loses_no_acknowledged_write_and_nodes_agree() {
    let mut registry = Registry::start().await;
    registry.leader().await;
    let work = Arc::new(Work {
        rec: Recorder::new(),
        acked_unique: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
    });

    // A lone sequential writer: each write alone in its log entry, sent early.
    let tasks = start_clients(&registry, &work, 0, 1).await;
    progress(&work, "start").await;
    kill_leaders(&mut registry, &work, 10, "lone writer").await;
    stop_clients(&work, tasks).await;

    // 16 concurrent writers.
    let tasks = start_clients(&registry, &work, 100, 16).await;
    progress(&work, "start of 16 writers").await;
    kill_leaders(&mut registry, &work, 6, "16 writers").await;

    // A follower, then two nodes at once: quorum lost, then regained.
    let leader = registry.leader().await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    registry.kill9(follower).await;
    registry.spawn(follower).await;
    println!("follower {follower} killed and restarted");
    progress(&work, "follower kill").await;
    let leader = registry.leader().await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    registry.kill9(leader).await;
    registry.kill9(follower).await;
    println!("leader {leader} and follower {follower} killed: no quorum");
    tokio::time::sleep(Duration::from_millis(500)).await;
    registry.spawn(follower).await;
    registry.spawn(leader).await;
    println!("both restarted");
    progress(&work, "quorum regained").await;
    stop_clients(&work, tasks).await;

    // A final linearizable read of every key closes each register's history, so a lost
    // acknowledged write shows up in the check.
    let client = registry.client().await;
    let final_read = client
        .list_policies(Consistency::Linearizable)
        .await
        .unwrap();
    for key in KEYS {
        let call = work.rec.now();
        work.rec.record(
            999,
            key,
            Op::Get,
            call,
            Out::Value(policies::value_of(&final_read.value, key)),
        );
    }
    let events: Vec<Event> = work.rec.events();
    let done = events.iter().filter(|e| e.out == Out::Done).count();
    println!(
        "history: {} operations, {done} writes acknowledged, {} unknown",
        events.len(),
        events.iter().filter(|e| e.out == Out::Unknown).count()
    );
    assert!(done > 100, "too few operations completed: {done}");
    if let Err(e) = check(&events) {
        panic!("{e}");
    }

    // Every node applied the same catalog: wait until their revisions meet, then compare.
    let deadline = Instant::now() + T;
    let catalogs = loop {
        let mut catalogs = BTreeMap::new();
        for (id, m) in &registry.members {
            catalogs.insert(*id, get_json(m.admin, "/debug/catalog").await);
        }
        let revisions: BTreeSet<Option<u64>> = catalogs
            .values()
            .map(|c| c.as_ref().and_then(|c| c["revision"].as_u64()))
            .collect();
        if revisions.len() == 1 && revisions.first().is_some_and(Option::is_some) {
            break catalogs;
        }
        assert!(
            Instant::now() < deadline,
            "revisions never met: {revisions:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let digests: BTreeMap<u64, u64> = catalogs
        .iter()
        .map(|(id, c)| (*id, digest(c.as_ref().unwrap())))
        .collect();
    println!("catalog digests: {digests:x?}");
    let one = catalogs[&1].as_ref().unwrap();
    for (id, c) in &catalogs {
        assert_eq!(
            c.as_ref().unwrap(),
            one,
            "node {id}'s catalog differs from node 1's"
        );
    }
    let names: BTreeSet<&str> = one["policies"]
        .as_object()
        .map(|m| m.keys().map(String::as_str).collect())
        .unwrap_or_default();
    let acked = work.acked_unique.lock().unwrap().clone();
    let missing: Vec<&String> = acked
        .iter()
        .filter(|n| !names.contains(n.as_str()))
        .collect();
    println!(
        "{} acknowledged unique writes, {} missing",
        acked.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "acknowledged writes missing: {missing:?}"
    );
    assert!(
        acked.len() > 10,
        "too few unique writes acknowledged: {}",
        acked.len()
    );
}
