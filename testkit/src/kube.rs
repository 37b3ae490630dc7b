//! A real Kubernetes control plane for the kube adapter's tests: one `etcd` and one
//! `kube-apiserver` per cluster (shared etcd, each its own `--etcd-prefix`), built from
//! their Go modules by `tools/build.sh` (once, cached under `target/tools/<name>/<version>`),
//! all on 127.0.0.1. Self-made certificates (rcgen), static token users (an admin in
//! `system:masters` and more for RBAC tests), CRDs installed by the caller.
//!
//! Only the API server runs: no controllers, no garbage collector, no kubelet. Tests write
//! their own EndpointSlices and use fresh namespaces. Service IPs it allocates exist only
//! in the object model: nothing may send traffic to them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::Command;

use crate::process::Proc;

/// Versions `tools/build.sh` builds; keep in step with it.
pub const KUBE_VERSION: &str = "v1.37.2";
pub const ETCD_VERSION: &str = "v3.7.3";
pub const COREDNS_VERSION: &str = "v1.14.7";
pub const HELM_VERSION: &str = "v4.3.2";

fn repo_root() -> PathBuf {
    // testkit/ is one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The path of a Go tool, building it first when it is not there yet (under a file lock,
/// so parallel tests build it once). Fails with what to do when Go is missing.
pub fn tool(name: &str) -> Result<PathBuf> {
    let version = match name {
        "kube-apiserver" => KUBE_VERSION,
        "etcd" => ETCD_VERSION,
        "coredns" => COREDNS_VERSION,
        "helm" => HELM_VERSION,
        other => bail!("unknown tool {other}"),
    };
    let dir = std::env::var_os("MESHBRIDGE_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/tools"));
    let bin = dir.join(name).join(version).join(name);
    if bin.exists() {
        return Ok(bin);
    }
    std::fs::create_dir_all(&dir)?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!(".{name}.lock")))?;
    lock.lock()?;
    if !bin.exists() {
        let script = repo_root().join("tools/build.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .arg(name)
            .env("MESHBRIDGE_TOOLS_DIR", &dir)
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        if !out.status.success() || !bin.exists() {
            bail!(
                "{name} {version} is not built and `tools/build.sh {name}` failed (it needs Go 1.26 and the module proxy):\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(bin)
}

/// A free port on 127.0.0.1 for a process of the test (see [`crate::ports`]).
pub fn free_port() -> Result<u16> {
    Ok(crate::ports::free_port())
}

/// One etcd for every cluster of a test.
pub struct Etcd {
    pub url: String,
    proc: Proc,
    _dir: tempfile::TempDir,
}

impl Etcd {
    pub async fn start() -> Result<Self> {
        let bin = tool("etcd")?;
        let dir = tempfile::tempdir()?;
        let (client, peer) = (free_port()?, free_port()?);
        let url = format!("http://127.0.0.1:{client}");
        let mut cmd = Command::new(bin);
        cmd.args([
            "--name=test",
            &format!("--data-dir={}", dir.path().join("data").display()),
            &format!("--listen-client-urls={url}"),
            &format!("--advertise-client-urls={url}"),
            &format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
            &format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
            &format!("--initial-cluster=test=http://127.0.0.1:{peer}"),
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]);
        let mut proc = Proc::spawn("etcd", cmd)?;
        // etcd logs JSON; wait until its client port answers.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", client))
                .await
                .is_ok()
            {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "etcd did not listen on {url}; log:\n{}",
                    proc.collect().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            url,
            proc,
            _dir: dir,
        })
    }

    /// Compact etcd's history up to its current revision: watches that resume from before
    /// it get `410 Gone` (from etcd, when the API server's watch cache is off).
    pub async fn compact(&self) -> Result<i64> {
        let body = self
            .post("/v3/kv/range", r#"{"key":"AA==","limit":1}"#)
            .await?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let rev: i64 = v["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .context("no revision in etcd's answer")?;
        self.post(
            "/v3/kv/compaction",
            &format!(r#"{{"revision":"{rev}","physical":true}}"#),
        )
        .await?;
        Ok(rev)
    }

    async fn post(&self, path: &str, body: &str) -> Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let host = self.url.trim_start_matches("http://");
        let mut s = tokio::net::TcpStream::connect(host).await?;
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        let (head, rest) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        if !head.starts_with("HTTP/1.1 200") {
            bail!("etcd {path}: {head}");
        }
        Ok(rest.to_string())
    }

    pub fn log(&mut self) -> String {
        self.proc.collect().join("\n")
    }
}

/// A static-token user of a test cluster.
#[derive(Clone, Debug)]
pub struct User {
    pub name: String,
    pub token: String,
    pub groups: Vec<String>,
}

/// Options for one API server.
#[derive(Clone, Debug, Default)]
pub struct ApiServerOptions {
    /// Users besides `admin` (who is in `system:masters`).
    pub users: Vec<User>,
    /// Start with the watch cache off, so watches are served by etcd and a compaction
    /// shows as `410 Gone`.
    pub no_watch_cache: bool,
}

/// One cluster's API server.
pub struct ApiServer {
    pub name: String,
    pub port: u16,
    pub admin_token: String,
    dir: tempfile::TempDir,
    args: Vec<String>,
    proc: Option<Proc>,
    users: Vec<User>,
}

impl ApiServer {
    pub async fn start(name: &str, etcd: &Etcd, opts: ApiServerOptions) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        let port = free_port()?;
        write_certs(d)?;
        let admin_token = random_token();
        let mut users = vec![User {
            name: "admin".into(),
            token: admin_token.clone(),
            groups: vec!["system:masters".into()],
        }];
        users.extend(opts.users);
        let mut tokens = String::new();
        for (i, u) in users.iter().enumerate() {
            tokens.push_str(&format!(
                "{},{},{},\"{}\"\n",
                u.token,
                u.name,
                1000 + i,
                u.groups.join(",")
            ));
        }
        std::fs::write(d.join("tokens.csv"), tokens)?;
        let p = |f: &str| d.join(f).display().to_string();
        let mut args = vec![
            format!("--etcd-servers={}", etcd.url),
            format!("--etcd-prefix=/{name}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", p("certs")),
            format!("--tls-cert-file={}", p("serving.pem")),
            format!("--tls-private-key-file={}", p("serving.key")),
            format!("--client-ca-file={}", p("ca.pem")),
            format!("--token-auth-file={}", p("tokens.csv")),
            "--authorization-mode=RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--endpoint-reconciler-type=none".into(),
            "--disable-admission-plugins=ServiceAccount".into(),
            "--enable-priority-and-fairness=false".into(),
            "--profiling=false".into(),
            "-v=1".into(),
        ];
        if opts.no_watch_cache {
            args.push("--watch-cache=false".into());
        }
        let mut s = Self {
            name: name.to_string(),
            port,
            admin_token,
            dir,
            args,
            proc: None,
            users,
        };
        s.launch().await?;
        Ok(s)
    }

    async fn launch(&mut self) -> Result<()> {
        let mut cmd = Command::new(tool("kube-apiserver")?);
        cmd.args(&self.args);
        self.proc = Some(Proc::spawn(&format!("kube-apiserver {}", self.name), cmd)?);
        self.wait_ready(Duration::from_secs(90)).await
    }

    /// Wait until `/readyz` answers 200 to the admin.
    pub async fn wait_ready(&mut self, within: Duration) -> Result<()> {
        let client = self.client("admin").await?;
        let deadline = tokio::time::Instant::now() + within;
        let mut last;
        loop {
            let req = http::Request::get("/readyz").body(Vec::new())?;
            match client.request_text(req).await {
                Ok(t) if t.trim() == "ok" => return Ok(()),
                Ok(t) => last = t,
                Err(e) => last = e.to_string(),
            }
            let exited = self.proc.as_mut().is_some_and(|p| p.exited());
            if exited || tokio::time::Instant::now() > deadline {
                let log = self
                    .proc
                    .as_mut()
                    .map(|p| p.collect().join("\n"))
                    .unwrap_or_default();
                let how = if exited {
                    "exited".to_string()
                } else {
                    format!("not ready in {within:?}")
                };
                bail!(
                    "kube-apiserver {}: {how} (last answer: {last}); log:\n{log}",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGKILL the API server (etcd keeps the data).
    pub async fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9().await;
        }
    }

    /// Start it again with the same flags and port.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill().await;
        self.launch().await
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn token_of(&self, user: &str) -> Result<String> {
        self.users
            .iter()
            .find(|u| u.name == user)
            .map(|u| u.token.clone())
            .with_context(|| format!("no user {user} in cluster {}", self.name))
    }

    /// A kubeconfig file for `user`, in the cluster's temp dir.
    pub fn kubeconfig(&self, user: &str) -> Result<PathBuf> {
        self.kubeconfig_at(user, &self.url(), &format!("kubeconfig-{user}"))
    }

    /// A kubeconfig for `user` that reaches the API server at `server` (a fault proxy in
    /// front of it, say), written as `file` in the cluster's temp dir.
    pub fn kubeconfig_at(&self, user: &str, server: &str, file: &str) -> Result<PathBuf> {
        let token = self.token_of(user)?;
        let path = self.dir.path().join(file);
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: {c}\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\n\
                 users:\n- name: {user}\n  user:\n    token: {token}\n\
                 contexts:\n- name: {c}\n  context:\n    cluster: {c}\n    user: {user}\n    namespace: default\ncurrent-context: {c}\n",
                c = self.name,
                url = server,
                ca = self.ca_file().display(),
            ),
        )?;
        Ok(path)
    }

    pub async fn client(&self, user: &str) -> Result<kube::Client> {
        let kc = kube::config::Kubeconfig::read_from(self.kubeconfig(user)?)?;
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        Ok(kube::Client::try_from(cfg)?)
    }

    pub fn log(&mut self) -> String {
        self.proc
            .as_mut()
            .map(|p| p.collect().join("\n"))
            .unwrap_or_default()
    }
}

fn random_token() -> String {
    (0..32)
        .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rand::random_range(0..36)]))
        .collect()
}

/// A CA, a serving certificate (SANs: localhost, 127.0.0.1, the first service IP) and a
/// service-account signing key.
fn write_certs(d: &Path) -> Result<()> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "meshbridge test kube CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    p.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress("127.0.0.1".parse()?),
        SanType::IpAddress("10.96.0.1".parse()?),
    ];
    let cert = p.signed_by(&key, &issuer)?;
    std::fs::write(d.join("ca.pem"), ca_cert.pem())?;
    std::fs::write(d.join("serving.pem"), cert.pem())?;
    std::fs::write(d.join("serving.key"), key.serialize_pem())?;
    let sa = KeyPair::generate()?;
    std::fs::write(d.join("sa.key"), sa.serialize_pem())?;
    std::fs::write(d.join("sa.pub"), sa.public_key_pem())?;
    std::fs::create_dir_all(d.join("certs"))?;
    Ok(())
}
