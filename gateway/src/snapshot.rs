//! Static stability: the catalog in use is persisted to the data dir, atomically, and read
//! back at start, so a gateway restarted while the registry is down serves what it served.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use meshbridge_core::model::Catalog;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// File name of the snapshot inside the data dir.
pub const FILE: &str = "catalog.json";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("catalog snapshot {path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("catalog snapshot {path} is not a catalog: {reason}")]
    Parse { path: PathBuf, reason: String },
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

/// Write `catalog` to `<data_dir>/catalog.json` (temp file, fsync, rename).
pub fn save(data_dir: &Path, catalog: &Catalog) -> Result<(), SnapshotError> {
    let p = path(data_dir);
    let io = |reason: String| SnapshotError::Io {
        path: p.clone(),
        reason,
    };
    std::fs::create_dir_all(data_dir).map_err(|e| io(e.to_string()))?;
    let json = serde_json::to_vec(catalog).map_err(|e| io(e.to_string()))?;
    meshbridge_core::pki::write_atomic(&p, &json, 0o644).map_err(|e| io(e.to_string()))
}

/// Read the snapshot: `Ok(None)` when there is none.
pub fn load(data_dir: &Path) -> Result<Option<Catalog>, SnapshotError> {
    let p = path(data_dir);
    let bytes = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(SnapshotError::Io {
                path: p,
                reason: e.to_string(),
            });
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| SnapshotError::Parse {
            path: p,
            reason: e.to_string(),
        })
}

/// Whether a catalog from the source is only the placeholder a watch channel starts with.
fn is_placeholder(c: &Catalog) -> bool {
    c.revision == 0 && c.sites.is_empty() && c.exports.is_empty() && c.policies.is_empty()
}

/// The catalog to start from: the source's, unless it is still the empty placeholder and a
/// snapshot exists.
pub fn initial(data_dir: &Path, source: &watch::Receiver<Arc<Catalog>>) -> Arc<Catalog> {
    let current = source.borrow().clone();
    if !is_placeholder(&current) {
        return current;
    }
    match load(data_dir) {
        Ok(Some(c)) => {
            tracing::info!(
                revision = c.revision,
                path = %path(data_dir).display(),
                "starting from the persisted catalog"
            );
            Arc::new(c)
        }
        Ok(None) => current,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring the persisted catalog");
            current
        }
    }
}

/// The catalog to serve from, kept on disk: the persisted snapshot in `data_dir` while
/// `source` holds only its placeholder (a restart while the registry is unreachable), then
/// the source's; each catalog put in use is saved (at most once a second, always the latest
/// and once more at `stop`). The two tasks run on `tasks` until `stop`.
pub fn statically_stable(
    data_dir: &Path,
    source: watch::Receiver<Arc<Catalog>>,
    stop: &CancellationToken,
    tasks: &TaskTracker,
) -> watch::Receiver<Arc<Catalog>> {
    let start = initial(data_dir, &source);
    let from_source = Arc::ptr_eq(&start, &source.borrow());
    // The revision the data dir holds: the snapshot started from, or the source's first
    // catalog once saved here (0 makes the persistence task save it).
    let mut on_disk = start.revision;
    if start.revision > 0
        && from_source
        && let Err(e) = save(data_dir, &start)
    {
        tracing::warn!(error = %e, "cannot persist the catalog");
        on_disk = 0;
    }
    let (effective_tx, effective_rx) = watch::channel(start);
    tasks.spawn(persist(
        data_dir.to_path_buf(),
        effective_rx.clone(),
        on_disk,
        std::time::Duration::from_secs(1),
        stop.clone(),
    ));
    tasks.spawn(follow(source, effective_tx, stop.clone()));
    effective_rx
}

/// Follow the source into `effective` until the source is dropped (then keep serving the
/// last catalog) or `stop` fires.
pub async fn follow(
    mut source: watch::Receiver<Arc<Catalog>>,
    effective: watch::Sender<Arc<Catalog>>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            r = source.changed() => if r.is_err() {
                tracing::warn!(
                    revision = effective.borrow().revision,
                    "catalog source closed; serving from the last catalog"
                );
                // Keep `effective` open: its receivers treat a closed channel as shutdown.
                stop.cancelled().await;
                return;
            },
            _ = stop.cancelled() => return,
        }
        let next = source.borrow_and_update().clone();
        if !is_placeholder(&next) {
            effective.send_replace(next);
        }
    }
}

/// Persist each catalog put in use, at most once per `min_interval` (always the latest).
/// `on_disk` is the revision the data dir already holds. The current value is checked before
/// every wait, so a catalog that arrived before this task first ran, or while it slept, is
/// saved too, and stopping always ends with the latest catalog on disk.
pub async fn persist(
    data_dir: PathBuf,
    mut catalog: watch::Receiver<Arc<Catalog>>,
    on_disk: u64,
    min_interval: std::time::Duration,
    stop: CancellationToken,
) {
    let mut saved = on_disk;
    loop {
        let next = catalog.borrow_and_update().clone();
        if next.revision != saved {
            let dir = data_dir.clone();
            let rev = next.revision;
            match tokio::task::spawn_blocking(move || save(&dir, &next)).await {
                Ok(Ok(())) => saved = rev,
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot persist the catalog"),
                Err(e) => tracing::warn!(error = %e, "catalog persistence task failed"),
            }
        }
        if stop.is_cancelled() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(min_interval) => {}
            // Stopping: one last save of whatever came in meanwhile.
            _ = stop.cancelled() => continue,
        }
        tokio::select! {
            // An error means the sender is gone and every value was seen (and saved above).
            r = catalog.changed() => if r.is_err() { return },
            _ = stop.cancelled() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_round_trips_and_missing_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        let c = Catalog {
            revision: 42,
            ..Catalog::default()
        };
        save(dir.path(), &c).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(c));
        std::fs::write(path(dir.path()), b"{not json").unwrap();
        assert!(matches!(load(dir.path()), Err(SnapshotError::Parse { .. })));
    }

    #[test]
    fn placeholder_source_falls_back_to_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        save(
            dir.path(),
            &Catalog {
                revision: 7,
                ..Catalog::default()
            },
        )
        .unwrap();
        let (_tx, rx) = watch::channel(Arc::new(Catalog::default()));
        assert_eq!(initial(dir.path(), &rx).revision, 7);
        let (_tx, rx) = watch::channel(Arc::new(Catalog {
            revision: 9,
            ..Catalog::default()
        }));
        assert_eq!(initial(dir.path(), &rx).revision, 9);
    }

    #[tokio::test]
    async fn a_catalog_sent_before_the_task_runs_and_the_last_one_at_stop_are_saved() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = watch::channel(Arc::new(Catalog {
            revision: 1,
            ..Catalog::default()
        }));
        save(dir.path(), &rx.borrow()).unwrap();
        // Revision 2 is already current (and would count as seen) when the task starts.
        tx.send_replace(Arc::new(Catalog {
            revision: 2,
            ..Catalog::default()
        }));
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(persist(
            dir.path().to_path_buf(),
            rx,
            1,
            std::time::Duration::from_secs(3600),
            stop.clone(),
        ));
        // Revision 3 arrives while the task waits out its interval; stopping saves it.
        tx.send_replace(Arc::new(Catalog {
            revision: 3,
            ..Catalog::default()
        }));
        stop.cancel();
        task.await.unwrap();
        assert_eq!(load(dir.path()).unwrap().map(|c| c.revision), Some(3));
    }
}
