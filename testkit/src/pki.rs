//! A throw-away PKI on disk.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use meshbridge_core::id::SpiffeId;
use meshbridge_core::pki::Ca;
use meshbridge_core::tls::{Identity, IdentityFiles};

/// A CA for one trust domain in a temp dir, issuing SVIDs into sub-directories.
pub struct TestPki {
    pub ca: Ca,
    dir: tempfile::TempDir,
}

impl TestPki {
    pub fn new(trust_domain: &str) -> Self {
        meshbridge_core::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate(trust_domain, Duration::from_secs(86400)).unwrap();
        ca.write_to(&dir.path().join("ca")).unwrap();
        Self { ca, dir }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Directory holding the CA (`ca.pem`, `ca.key`).
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// Issue `id` into `<dir>/<name>/` and return its files.
    pub fn issue(&self, name: &str, id: &str) -> IdentityFiles {
        let id = SpiffeId::parse(id).unwrap();
        let out = self.dir.path().join(name);
        self.ca
            .issue(&id, Duration::from_secs(86400), &[])
            .unwrap()
            .write_to(&out)
            .unwrap();
        IdentityFiles::in_dir(out)
    }

    /// Issue and load.
    pub fn identity(&self, name: &str, id: &str) -> Arc<Identity> {
        Identity::load(self.issue(name, id)).unwrap()
    }
}
