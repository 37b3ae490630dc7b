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
            Change::ImportUpserted { import } => {
                catalog
                    .imports
                    .insert(import.key(), Arc::new(import.clone()));
            }
            Change::ImportRemoved { service, site } => {
                catalog.imports.remove(&(service.clone(), site.clone()));
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
            Change::SiteRevoked { site, revision } => {
                catalog.revoked_sites.insert(site.clone(), *revision);
            }
            Change::SiteReinstated { site } => {
                catalog.revoked_sites.remove(site);
            }
            Change::OwnershipSet { scope, sites } => {
                catalog.owners.insert(scope.clone(), sites.clone());
            }
            Change::OwnershipRemoved { scope } => {
                catalog.owners.remove(scope);
            }
        }
    }
    catalog.revision = revision;
}

/// The catalog before the current one, and the changes that lead from it to the current one.
///
/// A delta must not be applied to the current catalog in place while receivers hold it, and
/// copying a catalog of 10,000 services costs milliseconds, on every delta (heartbeats
/// included) and in every process that follows the registry. Receivers move on to each new
/// catalog and drop the one before, so by the next delta the previous catalog is usually
/// unshared: it is brought up to date with the changes it missed and reused (the registry's
/// state machine does the same). The whole catalog is copied only when some receiver still
/// holds the previous one.
#[derive(Default)]
pub(crate) struct Spare(Option<(Arc<Catalog>, u64, Vec<Change>)>);

impl Spare {
    /// Publish the catalog at `revision`: the current one with `changes` applied. Returns
    /// whether the spare was reused (no copy of the catalog).
    pub(crate) fn advance(
        &mut self,
        tx: &watch::Sender<Arc<Catalog>>,
        revision: u64,
        changes: Vec<Change>,
    ) -> bool {
        let current = tx.borrow().clone();
        let reused = self.0.take().and_then(|(old, rev, missed)| {
            let mut c = Arc::try_unwrap(old).ok()?;
            apply_changes(&mut c, rev, &missed);
            (c.revision == current.revision).then_some(c)
        });
        let was_reused = reused.is_some();
        let mut next = reused.unwrap_or_else(|| (*current).clone());
        drop(current);
        apply_changes(&mut next, revision, &changes);
        let previous = tx.send_replace(Arc::new(next));
        self.0 = Some((previous, revision, changes));
        was_reused
    }
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
    let spare = &mut Spare::default();
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
                        *spare = Spare::default();
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
                spare.advance(tx, delta.revision, changes);
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
            instance: String::new(),
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
                app_protocol: None,
            }],
            endpoints: vec![Endpoint {
                address: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                hostname: None,
                ready: true,
                weight: 1,
                identity: None,
                zone: None,
            }],
            headless: false,
            created_revision: 0,
            updated_revision: 0,
        }
    }

    fn site(name: &str, beat: u64) -> Change {
        let s = spec(name);
        Change::SiteUpserted {
            site: crate::model::Site {
                name: s.name,
                kind: s.kind,
                locality: s.locality,
                gateways: s.gateways,
                lease_ttl_ms: s.lease_ttl_ms,
                grace_ms: s.grace_ms,
                last_heartbeat_ms: beat,
                state: crate::model::SiteState::Fresh,
                created_revision: 1,
                links: Vec::new(),
                instances: Vec::new(),
                xds_rejections: Vec::new(),
            },
        }
    }

    #[test]
    fn spare_is_reused_unless_a_receiver_still_holds_it_and_the_result_is_the_same() {
        let (tx, mut rx) = watch::channel(Arc::new(Catalog::default()));
        let mut spare = Spare::default();
        let mut reference = Catalog::default();
        let mut reused = Vec::new();
        let mut held = Vec::new();
        for rev in 1..=40u64 {
            let mut e = export(
                if rev.is_multiple_of(3) {
                    "east"
                } else {
                    "west"
                },
                rev,
            );
            e.service = ServiceKey::new("ns", format!("s{}", rev % 7));
            let changes = vec![
                site(&e.site.clone(), rev),
                Change::ExportUpserted { export: e },
            ];
            apply_changes(&mut reference, rev, &changes);
            reused.push(spare.advance(&tx, rev, changes));
            // A receiver moves on to each catalog; every tenth one it also keeps.
            let current = rx.borrow_and_update().clone();
            assert_eq!(*current, reference, "revision {rev}");
            if rev.is_multiple_of(10) {
                held.push(current);
            }
        }
        // The first delta has no spare. The spare is the catalog before the current one, so
        // a receiver holding the current catalog costs nothing; the delta after next, whose
        // spare the receiver kept, must copy.
        assert!(!reused[0]);
        for (i, r) in reused.iter().enumerate().skip(1) {
            let rev = i as u64 + 1;
            let spare_kept = rev > 10 && (rev - 2).is_multiple_of(10);
            assert_eq!(*r, !spare_kept, "revision {rev}");
        }
        assert_eq!(held.len(), 4);
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
                instance: String::new(),
                xds_rejections: None,
            },
            // West lapses, then is withdrawn (its export goes).
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
            // The used token is forgotten an hour after its expiry.
            Command::Tick {
                at_ms: 51 + crate::model::USED_TOKEN_KEEP_MS,
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
            // Registry-side state that watch deltas do not carry.
            let mut expected = catalog.clone();
            expected.export_tombstones.clear();
            expected.clock_ms = 0;
            assert_eq!(replica, expected, "after {cmd:?}");
        }
        assert!(catalog.tokens.is_empty() && catalog.site("west").is_none());
    }
}
