//! Keeping the index current: rebuild it (off the async workers) whenever the catalog
//! replica changes in a way DNS can see, and swap it in atomically.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use meshbridge_core::model::Catalog;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::config::Config;
use super::index::{CatalogDiff, Index, diff};
use super::metrics::Metrics;

/// Follow `catalog` until `stop`; `served` is the catalog `index` was built from (or a later
/// one with the same DNS inputs). When the
/// catalog's sender is gone (the registry client stopped), the last index keeps serving.
pub(crate) async fn watch_catalog(
    config: Arc<Config>,
    mut catalog: watch::Receiver<Arc<Catalog>>,
    mut served: Arc<Catalog>,
    index: Arc<ArcSwap<Index>>,
    metrics: Metrics,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = catalog.changed() => {
                if changed.is_err() {
                    info!(
                        revision = served.revision,
                        "catalog source closed; answering from the last catalog"
                    );
                    stop.cancelled().await;
                    return;
                }
            }
        }
        let next = catalog.borrow_and_update().clone();
        let change = diff(&served, &next);
        if change == CatalogDiff::Same {
            // Hold the newest catalog, not the one the index was built from: the replica
            // reuses the catalog before the current one only when no one holds it.
            served = next;
            continue;
        }
        let started = Instant::now();
        let (cfg, cat, prev) = (config.clone(), next.clone(), index.load_full());
        match tokio::task::spawn_blocking(move || prev.apply(&cfg, &cat, change)).await {
            Ok(Ok(built)) => {
                metrics.observe_index(&built, started.elapsed());
                debug!(
                    revision = next.revision,
                    names = built.len(),
                    took = ?started.elapsed(),
                    "dns index rebuilt"
                );
                index.store(Arc::new(built));
                served = next;
            }
            Ok(Err(e)) => warn!(error = %e, "cannot index the catalog; serving the previous one"),
            Err(e) => warn!(error = %e, "dns index build failed; serving the previous one"),
        }
    }
}
