//! `meshbridge registry` configuration: one serde struct, every problem reported at once by
//! [`RoleConfig::validate`]. Load it with [`meshbridge_core::config::load`], which rejects
//! unknown fields and reports them together with invalid values (so the structs do not
//! use `deny_unknown_fields`, which would stop at the first one).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use meshbridge_core::client::endpoint_uri;
use meshbridge_core::config::{Problems, RoleConfig};
use meshbridge_core::tls::IdentityFiles;
use serde::{Deserialize, Serialize};

use crate::types::NodeId;

/// A registry node's configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// This node's Raft id; its SVID must be `spiffe://<td>/registry/<node_id>`.
    pub node_id: NodeId,
    /// gRPC listen address (registry API and Raft between nodes), e.g. `0.0.0.0:7443`.
    pub listen: String,
    /// Admin HTTP (`/healthz`, `/readyz`, `/metrics`, `/config_dump`, `/debug/catalog`).
    #[serde(default = "default_admin_listen")]
    pub admin_listen: String,
    /// Raft log, vote and snapshots (`raft.redb`).
    pub data_dir: PathBuf,
    /// This node's SVID and trust bundles.
    pub tls: IdentityFiles,
    /// The cluster's first members, node id → gRPC URL (`https://10.0.0.1:7443`), this
    /// node included. The lowest id initializes the cluster when its log is empty (and no
    /// other member already belongs to one). A node added later (`members add`, then
    /// `members promote`) leaves this map empty. Changing it after the first start has no
    /// effect: the membership lives in the Raft log.
    #[serde(default)]
    pub initial_members: BTreeMap<String, String>,
    /// How long a drain waits for calls in flight before closing them.
    #[serde(default = "default_drain_ms")]
    pub drain_deadline_ms: u64,
    #[serde(default)]
    pub leases: LeaseConfig,
    #[serde(default)]
    pub raft: RaftConfig,
    /// The trust domain's CA (`ca.pem`, `ca.key`), to mint join tokens and sign the SVIDs
    /// of joining sites. Without it, `CreateJoinToken`, `Join` and `Renew` are refused.
    #[serde(default)]
    pub ca_dir: Option<PathBuf>,
    /// Validity of SVIDs issued by `Join` and `Renew` (holders renew at about half of it).
    #[serde(default = "default_svid_ttl_ms")]
    pub svid_ttl_ms: u64,
    /// Threads of `meshbridge registry` (1: one thread for everything; 0: one per CPU).
    /// The log's fsyncs run on a thread of their own either way.
    #[serde(default = "default_workers")]
    pub workers: usize,
}

fn default_workers() -> usize {
    0
}

impl Config {
    /// Node `node_id` listening on `listen`, every optional setting at its default (no
    /// initial members, no CA).
    pub fn new(
        node_id: NodeId,
        listen: impl Into<String>,
        data_dir: impl Into<PathBuf>,
        tls: IdentityFiles,
    ) -> Self {
        Self {
            node_id,
            listen: listen.into(),
            admin_listen: default_admin_listen(),
            data_dir: data_dir.into(),
            tls,
            initial_members: BTreeMap::new(),
            drain_deadline_ms: default_drain_ms(),
            leases: LeaseConfig::default(),
            raft: RaftConfig::default(),
            ca_dir: None,
            svid_ttl_ms: default_svid_ttl_ms(),
            workers: default_workers(),
        }
    }
}

/// Site leases.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LeaseConfig {
    /// Lease of a site that registers without asking for one.
    pub default_ttl_ms: u64,
    /// Grace after a lease lapses before the site's endpoints are withdrawn.
    pub default_grace_ms: u64,
    /// How often the leader checks leases (and writes a tick when one lapsed).
    pub tick_interval_ms: u64,
    /// A withdrawn site is listed (`ctl status`, `ctl sites`, `/ui`) for this long, then
    /// forgotten (it registers afresh if it comes back); 0 keeps withdrawn sites forever.
    pub forget_withdrawn_after_ms: u64,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            default_ttl_ms: 15_000,
            default_grace_ms: 600_000,
            tick_interval_ms: 1_000,
            forget_withdrawn_after_ms: 86_400_000,
        }
    }
}

/// Raft tuning.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RaftConfig {
    /// Also the timeout of one append-entries RPC (openraft's rule).
    pub heartbeat_interval_ms: u64,
    /// A follower that has not heard from the leader for the leader lease (openraft: the
    /// maximum election timeout) plus a random election timeout in `[min, max)` starts an
    /// election: a lost leader is replaced after max + [min, max) — 600–700 ms with the
    /// defaults, which still ride out 6 missed heartbeats. (Wider windows cost failover
    /// time twice: openraft 0.9 ties the lease to max.)
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot every this many log entries (the catalog reaches disk only in
    /// snapshots; the log is replayed on top at start).
    pub snapshot_every_logs: u64,
    /// Log entries kept behind the snapshot, so a briefly lagging node needs no snapshot.
    pub keep_logs_after_snapshot: u64,
    /// Timeout of sending and installing one snapshot chunk.
    pub snapshot_chunk_timeout_ms: u64,
    /// Bytes per snapshot chunk.
    pub snapshot_chunk_bytes: u64,
    /// Revisions of deltas kept in memory for watchers that resume.
    pub watch_history: usize,
    /// Dial these addresses instead of the membership URLs (node id → URL), e.g. through
    /// a NAT or a test's fault proxy. Empty normally.
    pub dial_overrides: BTreeMap<String, String>,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 250,
            election_timeout_max_ms: 350,
            snapshot_every_logs: 5_000,
            keep_logs_after_snapshot: 1_000,
            snapshot_chunk_timeout_ms: 10_000,
            snapshot_chunk_bytes: 4 * 1024 * 1024,
            watch_history: crate::store::DEFAULT_DELTA_CAPACITY,
            dial_overrides: BTreeMap::new(),
        }
    }
}

fn default_admin_listen() -> String {
    "127.0.0.1:9902".into()
}

fn default_drain_ms() -> u64 {
    5_000
}

fn default_svid_ttl_ms() -> u64 {
    24 * 3_600_000
}

/// Parses an id → URL map whose keys are decimal node ids.
fn parse_members(
    map: &BTreeMap<String, String>,
    field: &str,
    problems: &mut Problems,
) -> BTreeMap<NodeId, String> {
    let mut out = BTreeMap::new();
    for (key, url) in map {
        match key.parse::<NodeId>() {
            Ok(id) => {
                if let Err(e) = endpoint_uri(url) {
                    problems.push(format!("{field}.{key}"), e.reason);
                }
                out.insert(id, url.clone());
            }
            Err(_) => problems.push(format!("{field}.{key}"), "node ids are numbers"),
        }
    }
    out
}

impl Config {
    /// The initial members as node id → URL (ids that do not parse are left out; see
    /// [`RoleConfig::validate`]).
    pub fn members(&self) -> BTreeMap<NodeId, String> {
        parse_members(&self.initial_members, "", &mut Problems::default())
    }

    /// The dial overrides as node id → URL.
    pub fn dial_overrides(&self) -> BTreeMap<NodeId, String> {
        parse_members(&self.raft.dial_overrides, "", &mut Problems::default())
    }

    pub fn drain_deadline(&self) -> Duration {
        Duration::from_millis(self.drain_deadline_ms)
    }

    /// A config for tests: node `node_id` listening on `listen`, data in `data_dir`,
    /// TLS files in `tls_dir`, default Raft timing and a fast lease tick.
    pub fn for_test(
        node_id: NodeId,
        listen: SocketAddr,
        data_dir: impl Into<PathBuf>,
        tls_dir: impl Into<PathBuf>,
        members: &BTreeMap<NodeId, String>,
    ) -> Self {
        let mut cfg = Self::new(
            node_id,
            listen.to_string(),
            data_dir,
            IdentityFiles::in_dir(tls_dir),
        );
        cfg.admin_listen = "127.0.0.1:0".into();
        cfg.initial_members = members
            .iter()
            .map(|(id, url)| (id.to_string(), url.clone()))
            .collect();
        cfg.drain_deadline_ms = 1_000;
        cfg.leases.tick_interval_ms = 100;
        cfg
    }
}

impl RoleConfig for Config {
    fn validate(&self, p: &mut Problems) {
        p.socket_addr("listen", &self.listen);
        p.socket_addr("admin_listen", &self.admin_listen);
        meshbridge_core::runtime::check_workers(p, "workers", self.workers);
        p.check(
            !self.data_dir.as_os_str().is_empty(),
            "data_dir",
            "must not be empty",
        );
        let members = parse_members(&self.initial_members, "initial_members", p);
        p.check(
            members.is_empty() || members.contains_key(&self.node_id),
            "initial_members",
            format!("must include this node ({})", self.node_id),
        );
        parse_members(&self.raft.dial_overrides, "raft.dial_overrides", p);
        let l = &self.leases;
        p.check(
            l.default_ttl_ms > 0,
            "leases.default_ttl_ms",
            "must be more than 0",
        );
        p.check(
            l.tick_interval_ms > 0,
            "leases.tick_interval_ms",
            "must be more than 0",
        );
        let r = &self.raft;
        p.check(
            r.heartbeat_interval_ms > 0,
            "raft.heartbeat_interval_ms",
            "must be more than 0",
        );
        p.check(
            r.election_timeout_min_ms > r.heartbeat_interval_ms,
            "raft.election_timeout_min_ms",
            "must be more than raft.heartbeat_interval_ms",
        );
        p.check(
            r.election_timeout_max_ms > r.election_timeout_min_ms,
            "raft.election_timeout_max_ms",
            "must be more than raft.election_timeout_min_ms",
        );
        p.check(
            r.snapshot_every_logs > 0,
            "raft.snapshot_every_logs",
            "must be more than 0",
        );
        p.check(
            r.snapshot_chunk_bytes >= 1024,
            "raft.snapshot_chunk_bytes",
            "must be at least 1024",
        );
        p.check(
            r.watch_history > 0,
            "raft.watch_history",
            "must be more than 0",
        );
        let max_svid_ttl_ms = meshbridge_core::pki::MAX_TTL.as_millis();
        p.check(
            (1_000..=max_svid_ttl_ms).contains(&u128::from(self.svid_ttl_ms)),
            "svid_ttl_ms",
            format!("must be within 1000 (one second) ..= {max_svid_ttl_ms} (100 years)"),
        );
        if let Some(dir) = &self.ca_dir {
            p.check(
                !dir.as_os_str().is_empty(),
                "ca_dir",
                "must not be empty (leave it out to disable joining)",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use meshbridge_core::config::parse_with_env;

    use super::*;

    const EXAMPLE: &str = r#"
node_id = 1
listen = "0.0.0.0:7443"
admin_listen = "127.0.0.1:9902"
data_dir = "/var/lib/meshbridge/registry"

[tls]
cert = "/etc/meshbridge/tls/cert.pem"
key = "/etc/meshbridge/tls/key.pem"
bundle = "/etc/meshbridge/tls/bundle.pem"

[initial_members]
1 = "https://10.0.0.1:7443"
2 = "https://10.0.0.2:7443"
3 = "https://10.0.0.3:7443"

[leases]
default_ttl_ms = 15000
default_grace_ms = 600000
"#;

    /// The admin port is plain HTTP: unless the file says otherwise, loopback only.
    #[test]
    fn the_admin_port_is_on_loopback_by_default() {
        let text = EXAMPLE.replace("admin_listen = \"127.0.0.1:9902\"\n", "");
        let cfg: Config = parse_with_env("registry.toml", &text, &[]).unwrap();
        let addr: std::net::SocketAddr = cfg.admin_listen.parse().unwrap();
        assert!(addr.ip().is_loopback(), "{addr}");
    }

    /// The demo and the tests write node files from typed values; what `render` writes
    /// reads back as the same value, and `new` is what a file with only the required
    /// fields means.
    #[test]
    fn a_rendered_config_reads_back_as_written_and_new_means_the_defaults() {
        let tls = IdentityFiles::in_dir(std::path::Path::new("/etc/meshbridge/tls"));
        let mut cfg = Config::new(2, "127.0.0.1:7443", "/var/lib/mb", tls.clone());
        cfg.initial_members = BTreeMap::from([
            ("1".into(), "https://127.0.0.1:7442".into()),
            ("2".into(), "https://127.0.0.1:7443".into()),
        ]);
        cfg.ca_dir = Some("/etc/meshbridge/ca".into());
        cfg.leases.tick_interval_ms = 200;
        cfg.raft.dial_overrides = BTreeMap::from([("1".into(), "https://127.0.0.1:9000".into())]);
        let text = meshbridge_core::config::render(&cfg).unwrap();
        let back: Config = parse_with_env("registry.toml", &text, &[]).unwrap();
        assert_eq!(back, cfg, "{text}");

        let minimal = format!(
            "node_id = 2\nlisten = \"127.0.0.1:7443\"\ndata_dir = \"/var/lib/mb\"\n\
             [tls]\ncert = {:?}\nkey = {:?}\nbundle = {:?}\n",
            tls.cert, tls.key, tls.bundle
        );
        let parsed: Config = parse_with_env("registry.toml", &minimal, &[]).unwrap();
        assert_eq!(parsed, Config::new(2, "127.0.0.1:7443", "/var/lib/mb", tls));
    }

    #[test]
    fn example_parses_with_defaults() {
        let cfg: Config = parse_with_env("registry.toml", EXAMPLE, &[]).unwrap();
        assert_eq!(cfg.members().len(), 3);
        assert_eq!(cfg.members()[&2], "https://10.0.0.2:7443");
        assert_eq!(cfg.leases.tick_interval_ms, 1_000);
        assert_eq!(cfg.raft, RaftConfig::default());
    }

    #[test]
    fn every_problem_is_named() {
        let text = EXAMPLE
            .replace("listen = \"0.0.0.0:7443\"", "listen = \"nowhere\"")
            .replace(
                "2 = \"https://10.0.0.2:7443\"",
                "two = \"https://10.0.0.2\"",
            )
            .replace("default_ttl_ms = 15000", "default_ttl_ms = 0\ncolour = 1");
        // An SVID lifetime with no date at its end (each Join and Renew panicked on it).
        let text = format!("svid_ttl_ms = 250000000000000\n{text}");
        let err = parse_with_env::<Config>("r.toml", &text, &[]).unwrap_err();
        let fields: Vec<&str> = err.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "leases.colour",
                "listen",
                "initial_members.two",
                "leases.default_ttl_ms",
                "svid_ttl_ms"
            ],
            "{err}"
        );
    }
}
