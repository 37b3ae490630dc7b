//! A local catalog replica fed by a registry watch stream.
//!
//! The replica starts from a reset (the whole catalog), then applies each delta whose
//! revision is exactly one more than its own. It never goes backwards: a reset or delta at
//! or below the replica's revision (from a node that lags) is skipped, and the replica
//! waits for that node's stream to pass it. After a lost stream it reconnects, to the next
//! node, from its own revision; a node that no longer keeps deltas that far back answers
//! with a new reset.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic::Streaming;

use super::{RegistryClient, decode};
use crate::model::{Catalog, Change};
use crate::proto::{self, watch_event::Event};

/// Applies one revision's changes to `catalog` and moves it to `revision`.
pub fn apply_changes(catalog: &mut Catalog, revision: u64, changes: &[Change]) {
    for change in changes {
        match change {
            Change::SiteUpserted { site } => {
                catalog
                    .sites
                    .insert(site.name.clone(), Arc::new(site.clone()));
            }
            Change::SiteRemoved { name } => {
                catalog.sites.remove(name);
            }
            Change::ExportUpserted { export } => {
                catalog
                    .exports
                    .insert(export.key(), Arc::new(export.clone()));
            }
            Change::ExportRemoved { service, site } => {
                catalog.exports.remove(&(service.clone(), site.clone()));
            }
            Change::PolicyUpserted { policy } => {
                catalog
                    .policies
                    .insert(policy.name.clone(), Arc::new(policy.clone()));
            }
            Change::PolicyRemoved { name } => {
                catalog.policies.remove(name);
            }
            Change::TokenUsed { token } => {
                catalog.tokens.insert(token.id.clone(), token.clone());
            }
            Change::TokenForgotten { id } => {
                catalog.tokens.remove(id);
            }
        }
    }
    catalog.revision = revision;
}

/// Why a stream ended.
enum End {
    /// Every receiver is gone: stop.
    Closed,
    /// The stream broke (or skipped a revision): reconnect.
    Lost(String),
}

impl RegistryClient {
    /// A replica of the catalog kept up to date from watch streams, starting empty.
    /// The task behind it ends when every receiver is dropped.
    pub fn watch_catalog(self) -> watch::Receiver<Arc<Catalog>> {
        self.watch_catalog_from(Arc::new(Catalog::default()))
    }

    /// Like [`RegistryClient::watch_catalog`], starting from a catalog held already (the
    /// one persisted before a restart): the stream resumes from its revision.
    pub fn watch_catalog_from(self, initial: Arc<Catalog>) -> watch::Receiver<Arc<Catalog>> {
        let (tx, rx) = watch::channel(initial);
        tokio::spawn(self.run_replica(tx));
        rx
    }

    /// Opens a raw watch stream on one node (no failover); see the proto for its contract.
    pub async fn watch(
        &self,
        from_revision: u64,
    ) -> Result<Streaming<proto::WatchEvent>, tonic::Status> {
        let node = self
            .inner
            .preferred
            .load(std::sync::atomic::Ordering::Relaxed)
            % self.inner.nodes.len();
        let req = proto::WatchRequest { from_revision };
        Ok(self.grpc(node).watch(req).await?.into_inner())
    }

    async fn run_replica(self, tx: watch::Sender<Arc<Catalog>>) {
        let n = self.inner.nodes.len();
        let mut node = self
            .inner
            .preferred
            .load(std::sync::atomic::Ordering::Relaxed)
            % n;
        let mut failures = 0u32;
        loop {
            let from = tx.borrow().revision;
            let req = proto::WatchRequest {
                from_revision: from,
            };
            let url = self.inner.nodes[node].url.clone();
            let mut grpc = self.grpc(node);
            let opened = tokio::select! {
                _ = tx.closed() => return,
                r = tokio::time::timeout(self.inner.opts.attempt_timeout, grpc.watch(req)) => r,
            };
            let why = match opened {
                Ok(Ok(stream)) => {
                    tracing::debug!(node = %url, from, "catalog watch open");
                    match follow(stream.into_inner(), &tx, &mut failures).await {
                        End::Closed => return,
                        End::Lost(why) => why,
                    }
                }
                Ok(Err(status)) => format!("{:?}: {}", status.code(), status.message()),
                Err(_) => "no answer".to_owned(),
            };
            failures += 1;
            let pause = self.backoff(failures).max(Duration::from_millis(10));
            tracing::info!(node = %url, error = %why, retry_in = ?pause, "catalog watch lost; reconnecting to the next node");
            node = (node + 1) % n;
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// Applies a stream's events to the replica until the stream ends.
async fn follow(
    mut stream: Streaming<proto::WatchEvent>,
    tx: &watch::Sender<Arc<Catalog>>,
    failures: &mut u32,
) -> End {
    loop {
        let msg = tokio::select! {
            _ = tx.closed() => return End::Closed,
            m = stream.message() => m,
        };
        let event = match msg {
            Ok(Some(proto::WatchEvent { event: Some(e) })) => e,
            Ok(Some(_)) => continue,
            Ok(None) => return End::Lost("stream ended".into()),
            Err(status) => return End::Lost(format!("{:?}: {}", status.code(), status.message())),
        };
        *failures = 0;
        let current = tx.borrow().revision;
        match event {
            Event::Reset(reset) => {
                if reset.revision < current || (reset.revision == current && current > 0) {
                    // A lagging node: keep ours, skip its deltas up to our revision.
                    continue;
                }
                match decode::<Catalog>("Watch", &reset.catalog_json) {
                    Ok(catalog) => {
                        tx.send_replace(Arc::new(catalog));
                    }
                    Err(e) => return End::Lost(e.to_string()),
                }
            }
            Event::Delta(delta) => {
                if delta.revision <= current {
                    continue;
                }
                if delta.revision != current + 1 {
                    return End::Lost(format!(
                        "delta {} does not follow revision {current}",
                        delta.revision
                    ));
                }
                let changes: Vec<Change> = match decode("Watch", &delta.changes_json) {
                    Ok(c) => c,
                    Err(e) => return End::Lost(e.to_string()),
                };
                tx.send_modify(|catalog| {
                    apply_changes(Arc::make_mut(catalog), delta.revision, &changes);
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::model::{
        Command, Endpoint, Export, Locality, Policy, Port, Principal, Protocol, ServiceKey,
        SiteKind, SiteSpec,
    };

    fn spec(name: &str) -> SiteSpec {
        SiteSpec {
            name: name.into(),
            kind: SiteKind::Cluster,
            locality: Locality::default(),
            gateways: vec![],
            lease_ttl_ms: 1_000,
            grace_ms: 1_000,
        }
    }

    fn export(site: &str, generation: u64) -> Export {
        Export {
            site: site.into(),
            service: ServiceKey::new("shop", "cart"),
            generation,
            ports: vec![Port {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
                target_port: 80,
            }],
            endpoints: vec![Endpoint {
                address: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                hostname: None,
                ready: true,
                weight: 1,
                identity: None,
            }],
            headless: false,
            created_revision: 0,
            updated_revision: 0,
        }
    }

    /// Every kind of change, as the state machine makes them, rebuilds the same catalog.
    #[test]
    fn replica_built_from_changes_equals_the_catalog() {
        let policy = Policy {
            name: "p".into(),
            service: ServiceKey::new("shop", "cart"),
            allow: vec![Principal::Site("east".into())],
        };
        let commands = vec![
            Command::RegisterSite {
                spec: spec("east"),
                at_ms: 0,
            },
            Command::RegisterSite {
                spec: spec("west"),
                at_ms: 0,
            },
            Command::PutExport {
                export: export("east", 1),
            },
            Command::PutExport {
                export: export("west", 1),
            },
            Command::PutExport {
                export: export("east", 2),
            },
            Command::PutPolicy {
                policy: policy.clone(),
            },
            Command::UseToken {
                id: "t".into(),
                site: "east".into(),
                expires_ms: 50,
                at_ms: 10,
            },
            Command::Heartbeat {
                site: "east".into(),
                at_ms: 500,
                links: None,
            },
            // West lapses, then is withdrawn (its export goes); the token is forgotten.
            Command::Tick { at_ms: 1_200 },
            Command::Tick { at_ms: 2_300 },
            Command::DeletePolicy { name: "p".into() },
            Command::DeleteExport {
                site: "east".into(),
                service: ServiceKey::new("shop", "cart"),
                generation: 2,
            },
            Command::PutPolicy { policy },
            Command::RemoveSite {
                site: "west".into(),
            },
        ];
        let mut catalog = Catalog::default();
        let mut replica = Catalog::default();
        for cmd in &commands {
            let applied = catalog.apply(cmd).unwrap();
            if !applied.changes.is_empty() {
                assert_eq!(applied.revision, replica.revision + 1);
                apply_changes(&mut replica, applied.revision, &applied.changes);
            }
            let mut expected = catalog.clone();
            expected.export_tombstones.clear();
            assert_eq!(replica, expected, "after {cmd:?}");
        }
        assert!(catalog.tokens.is_empty() && catalog.site("west").is_none());
    }
}
