//! A process's identity: its SVID (certificate chain and key) and trust bundles, read from
//! files and reloaded when they change. New handshakes use the new material; established
//! connections are untouched.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::files::{CertInfo, TlsError, check_svid, load_key, parse_certs, read};
use super::trust::{BundleSource, TrustStore};
use super::verify::{AllowList, SpiffeVerifier};
use crate::id::SpiffeId;

/// Where a process's TLS material lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityFiles {
    /// PEM chain: the SVID first, then intermediates.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// PEM CA certificates of this process's own trust domain (several during rotation).
    pub bundle: PathBuf,
    /// Bundles of other, federated trust domains.
    #[serde(default)]
    pub federated: Vec<BundleSource>,
}

impl IdentityFiles {
    /// The usual file names in one directory: `cert.pem`, `key.pem`, `bundle.pem`.
    pub fn in_dir(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        Self {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            bundle: dir.join("bundle.pem"),
            federated: Vec::new(),
        }
    }

    fn all_paths(&self) -> Vec<PathBuf> {
        let mut v = vec![self.cert.clone(), self.key.clone(), self.bundle.clone()];
        v.extend(self.federated.iter().map(|b| b.path.clone()));
        v
    }
}

struct Loaded {
    key: Arc<CertifiedKey>,
    id: SpiffeId,
    info: CertInfo,
    trust: TrustStore,
    fingerprint: Vec<u8>,
}

fn load(files: &IdentityFiles) -> Result<Loaded, TlsError> {
    // Read every file first, so a fingerprint covers exactly what was parsed.
    let mut fingerprint = Vec::new();
    for p in files.all_paths() {
        let bytes = read(&p)?;
        fingerprint.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        fingerprint.extend_from_slice(&bytes);
    }
    let chain = parse_certs(&files.cert, &read(&files.cert)?)?;
    let leaf = chain.first().ok_or_else(|| TlsError::NoPem {
        path: files.cert.clone(),
        what: "CERTIFICATE block",
    })?;
    let (id, info) = check_svid(&files.cert, leaf)?;
    let key_der = load_key(&files.key)?;
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| TlsError::BadKey {
            path: files.key.clone(),
            reason: e.to_string(),
        })?;
    let key = CertifiedKey::new(chain, signing);
    match key.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(TlsError::KeyMismatch {
                key: files.key.clone(),
                cert: files.cert.clone(),
            });
        }
    }
    let mut sources = vec![BundleSource {
        path: files.bundle.clone(),
        trust_domain: None,
    }];
    sources.extend(files.federated.iter().cloned());
    let trust = TrustStore::load(&sources, id.trust_domain())?;
    Ok(Loaded {
        key: Arc::new(key),
        id,
        info,
        trust,
        fingerprint,
    })
}

/// A reloadable identity. Share it as `Arc<Identity>`.
pub struct Identity {
    files: IdentityFiles,
    key: ArcSwap<CertifiedKey>,
    id: ArcSwap<SpiffeId>,
    info: ArcSwap<CertInfo>,
    trust: Arc<ArcSwap<TrustStore>>,
    fingerprint: Mutex<Vec<u8>>,
    generation: watch::Sender<u64>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id())
            .field("files", &self.files)
            .finish()
    }
}

impl Identity {
    /// Load every file; any problem is an error naming the file.
    pub fn load(files: IdentityFiles) -> Result<Arc<Self>, TlsError> {
        let l = load(&files)?;
        Ok(Arc::new(Self {
            files,
            key: ArcSwap::new(l.key),
            id: ArcSwap::from_pointee(l.id),
            info: ArcSwap::from_pointee(l.info),
            trust: Arc::new(ArcSwap::from_pointee(l.trust)),
            fingerprint: Mutex::new(l.fingerprint),
            generation: watch::channel(0).0,
        }))
    }

    /// Re-read the files. Returns `Ok(true)` when something changed and was swapped in;
    /// on error the previous material stays in use.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let l = load(&self.files)?;
        let mut fp = self.fingerprint.lock().unwrap_or_else(|p| p.into_inner());
        if *fp == l.fingerprint {
            return Ok(false);
        }
        self.key.store(l.key);
        self.id.store(Arc::new(l.id));
        self.info.store(Arc::new(l.info));
        self.trust.store(Arc::new(l.trust));
        *fp = l.fingerprint;
        self.generation.send_modify(|g| *g += 1);
        Ok(true)
    }

    /// Poll the files every `interval` and reload on change, until `stop` resolves.
    /// Polling (rather than inotify) also catches Kubernetes' symlink swaps of secrets.
    pub async fn watch_files(self: Arc<Self>, interval: Duration, stop: impl Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tick.tick() => {}
            }
            match self.reload() {
                Ok(true) => {
                    tracing::info!(id = %self.id(), "reloaded certificates and trust bundles")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "certificate reload failed; keeping the previous ones")
                }
            }
        }
    }

    /// Bumped on every successful reload that changed something.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// This process's SPIFFE id (from the current SVID).
    pub fn id(&self) -> SpiffeId {
        (**self.id.load()).clone()
    }

    /// The current SVID leaf, described.
    pub fn cert_info(&self) -> CertInfo {
        (**self.info.load()).clone()
    }

    pub fn files(&self) -> &IdentityFiles {
        &self.files
    }

    /// When the first CA certificate of the trust bundles expires (unix seconds).
    pub fn bundle_not_after(&self) -> Option<i64> {
        self.trust.load().earliest_not_after()
    }

    /// Trust domains currently trusted.
    pub fn trust_domains(&self) -> Vec<String> {
        self.trust.load().trust_domains()
    }

    pub fn verifier(&self, allow: AllowList) -> Arc<SpiffeVerifier> {
        Arc::new(SpiffeVerifier::new(self.trust.clone(), allow))
    }

    /// TLS 1.3 server config requiring a client SVID accepted by `allow`.
    pub fn server_config(self: &Arc<Self>, allow: AllowList, alpn: &[&[u8]]) -> ServerConfig {
        self.server_config_with(self.verifier(allow), alpn)
    }

    /// Like [`Identity::server_config`], but clients without a certificate may connect
    /// (those with one are checked all the same). See [`peer_id`] to tell them apart.
    pub fn server_config_optional_client(
        self: &Arc<Self>,
        allow: AllowList,
        alpn: &[&[u8]],
    ) -> ServerConfig {
        let verifier =
            Arc::new(SpiffeVerifier::new(self.trust.clone(), allow).with_optional_client_auth());
        self.server_config_with(verifier, alpn)
    }

    fn server_config_with(
        self: &Arc<Self>,
        verifier: Arc<SpiffeVerifier>,
        alpn: &[&[u8]],
    ) -> ServerConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // The ring provider supports TLS 1.3, so this cannot fail; fall back to a fresh
        // builder call that panics only on a broken rustls build.
        let builder = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap_or_else(|_| {
                ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
            });
        let mut cfg = builder
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        cfg
    }

    /// TLS 1.3 client config presenting our SVID and accepting servers allowed by `allow`.
    pub fn client_config(self: &Arc<Self>, allow: AllowList, alpn: &[&[u8]]) -> ClientConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap_or_else(|_| {
                ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
            });
        let mut cfg = builder
            .dangerous()
            .with_custom_certificate_verifier(self.verifier(allow))
            .with_client_cert_resolver(Arc::new(Resolver(self.clone())));
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        cfg
    }
}

#[derive(Debug)]
struct Resolver(Arc<Identity>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.key.load_full())
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.key.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The SPIFFE id in a peer's leaf certificate (after a verified handshake).
pub fn peer_id(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    let leaf = certs?.first()?;
    super::files::cert_info(leaf).ok()?.spiffe_id()
}
