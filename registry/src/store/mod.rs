//! Durable Raft storage on one redb file: the log store and the catalog state machine.
//!
//! Layout of `<dir>/raft.redb`:
//!
//! | table       | key                                   | value                     |
//! |-------------|---------------------------------------|---------------------------|
//! | `raft_log`  | log index (`u64`)                     | JSON [`Entry`]            |
//! | `raft_meta` | `vote`, `committed`, `last_purged`    | JSON of the value         |
//! | `snapshot`  | `meta`, `data`                        | JSON meta, catalog image  |
//!
//! Log writes (appends, vote, truncation, purge) go through one writer thread that commits
//! whatever is queued in one redb transaction with [`Durability::Immediate`] (one fsync);
//! openraft hears of an append only after that commit, but can read (and replicate) the
//! entries at once. See [`LogStore`].
//!
//! The state machine keeps the catalog in memory and persists it as the current snapshot:
//! when openraft builds one (its `SnapshotPolicy` is the "how often") and when one is
//! installed. After a restart the state machine is the last snapshot and reports that
//! snapshot's last log id as applied; openraft re-applies the committed log after it.
//! Watchers follow the state machine through [`Feed`].
//!
//! [`Entry`]: crate::types::Entry

mod image;
mod log;
mod sessions;
mod state_machine;
mod watch;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, Durability, ReadableDatabase, TableDefinition, WriteTransaction};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use self::log::{EARLY_MAX_WRITES, EarlyAppend, LogStore, WriterFault};
pub use self::sessions::{Session, Sessions};
pub use self::state_machine::{MAX_EXPORTS_PER_SITE, SnapshotBuilder, StateMachineStore};
pub use self::watch::{Compacted, DEFAULT_DELTA_CAPACITY, Delta, Feed};

/// File name of the store inside its data directory.
pub const FILE_NAME: &str = "raft.redb";

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_LAST_PURGED: &str = "last_purged";
const KEY_SNAPSHOT_META: &str = "meta";
const KEY_SNAPSHOT_DATA: &str = "data";

/// Tuning of the store.
#[derive(Clone, Debug)]
pub struct Options {
    /// How many revisions of deltas [`Feed`] keeps for watchers that resume.
    pub delta_capacity: usize,
    /// Observes the duration of every log writer commit (fsync included).
    pub log_flush: Option<prometheus_client::metrics::histogram::Histogram>,
    /// Exports one site may have ([`MAX_EXPORTS_PER_SITE`]). Part of applying the log, so
    /// every node of a cluster must use the same value: nodes use the default; tests lower it.
    pub max_exports_per_site: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            delta_capacity: DEFAULT_DELTA_CAPACITY,
            log_flush: None,
            max_exports_per_site: MAX_EXPORTS_PER_SITE,
        }
    }
}

/// Why the store could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("create data directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("open raft store {path}: {source}")]
    Open {
        path: PathBuf,
        source: redb::DatabaseError,
    },
    #[error("raft store: {0}")]
    Db(#[from] redb::Error),
    #[error("encode {what}: {source}")]
    Encode {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("decode {what}: {source}")]
    Decode {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("unsupported {what} format {found} (this build reads {supported})")]
    Format {
        what: &'static str,
        found: u32,
        supported: u32,
    },
    #[error("{what} is missing from the raft store")]
    Missing { what: &'static str },
    #[error("raft log write: {0}")]
    Write(String),
    #[error("storage task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// Opens (or creates) the store in `dir` with default [`Options`].
pub fn open(dir: impl AsRef<Path>) -> Result<(LogStore, StateMachineStore), StoreError> {
    open_with(dir, Options::default())
}

/// Opens (or creates) the store in `dir`. Blocking: call it at startup, before the
/// runtime is busy, or from `spawn_blocking`. The two halves share the file; it is closed
/// when both (and every log reader) are dropped.
pub fn open_with(
    dir: impl AsRef<Path>,
    options: Options,
) -> Result<(LogStore, StateMachineStore), StoreError> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
        path: dir.to_owned(),
        source,
    })?;
    let path = dir.join(FILE_NAME);
    let db = Database::create(&path).map_err(|source| StoreError::Open {
        path: path.clone(),
        source,
    })?;

    // Read transactions fail on tables that do not exist yet: create them all up front.
    let txn = begin_write(&db)?;
    txn.open_table(LOGS)?;
    txn.open_table(META)?;
    txn.open_table(SNAPSHOT)?;
    txn.commit()?;

    let db = Arc::new(db);
    let log = LogStore::new(db.clone(), options.log_flush)?;
    let sm = StateMachineStore::load(db, options.delta_capacity, options.max_exports_per_site)?;
    tracing::info!(path = %path.display(), "opened raft store");
    Ok((log, sm))
}

/// A write transaction that commits with an fsync.
fn begin_write(db: &Database) -> Result<WriteTransaction, StoreError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    Ok(txn)
}

/// Reads a JSON value from a `&str`-keyed table.
fn read_json<T: DeserializeOwned>(
    db: &Database,
    table: TableDefinition<&str, &[u8]>,
    key: &'static str,
) -> Result<Option<T>, StoreError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(table)?;
    match table.get(key)? {
        Some(bytes) => decode(key, bytes.value()).map(Some),
        None => Ok(None),
    }
}

fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Encode { what, source })
}

fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Decode { what, source })
}

/// Runs blocking database work (reads, commits and their fsyncs) off the async workers.
async fn blocking<T, F>(db: &Arc<Database>, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
{
    let db = db.clone();
    tokio::task::spawn_blocking(move || f(&db)).await?
}
