//! Where a role gets its catalog replica: a registry watch (the normal case) or a JSON file
//! (static catalogs: benchmarks, air-gapped sites). The file is polled and re-read on change.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use meshbridge_core::client::RegistryClient;
use meshbridge_core::config::Problems;
use meshbridge_core::model::Catalog;
use meshbridge_core::tls::Identity;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CatalogSource {
    /// Registry URLs (`https://host:port`); any node will do.
    #[serde(default)]
    pub registry: Vec<String>,
    /// A catalog JSON file instead of a registry.
    #[serde(default)]
    pub catalog_file: Option<PathBuf>,
}

impl CatalogSource {
    /// Follow the registry at these URLs.
    pub fn registry<S: Into<String>>(urls: impl IntoIterator<Item = S>) -> Self {
        Self {
            registry: urls.into_iter().map(Into::into).collect(),
            catalog_file: None,
        }
    }

    /// Read the catalog from this JSON file.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self {
            registry: Vec::new(),
            catalog_file: Some(path.into()),
        }
    }

    pub fn validate(&self, field: &str, p: &mut Problems) {
        match (self.registry.is_empty(), &self.catalog_file) {
            (true, None) => p.push(field, "set registry (URLs) or catalog_file"),
            (false, Some(_)) => p.push(field, "set registry or catalog_file, not both"),
            _ => {}
        }
        for (i, url) in self.registry.iter().enumerate() {
            if let Err(e) = meshbridge_core::client::endpoint_uri(url) {
                p.push(format!("{field}.registry[{i}]"), e.reason);
            }
        }
    }

    /// Start following the catalog. With a registry, also returns the client (for writes).
    /// `initial` seeds the replica (e.g. a persisted snapshot) until the registry answers.
    pub async fn open(
        &self,
        identity: &Arc<Identity>,
        initial: Option<Arc<Catalog>>,
    ) -> Result<(watch::Receiver<Arc<Catalog>>, Option<RegistryClient>)> {
        if let Some(path) = &self.catalog_file {
            let first = read_catalog(path)?;
            let (tx, rx) = watch::channel(Arc::new(first));
            let path = path.clone();
            tokio::spawn(async move {
                let mut last = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if tx.is_closed() {
                        return;
                    }
                    let now = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
                    if now != last {
                        last = now;
                        match read_catalog(&path) {
                            Ok(c) => {
                                tx.send_replace(Arc::new(c));
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "catalog file unreadable; keeping the last one")
                            }
                        }
                    }
                }
            });
            return Ok((rx, None));
        }
        let client = RegistryClient::connect(&self.registry, identity.clone()).await?;
        let rx = match initial {
            Some(c) => client.clone().watch_catalog_from(c),
            None => client.clone().watch_catalog(),
        };
        Ok((rx, Some(client)))
    }
}

pub fn read_catalog(path: &std::path::Path) -> Result<Catalog> {
    let text = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_slice(&text)
        .with_context(|| format!("{}: not a catalog (JSON)", path.display()))
}
