//! The store against openraft's storage conformance suite, and across restarts.

use std::collections::BTreeSet;

use meshbridge_core::model::{Command, Locality, Rejection, SiteKind, SiteSpec};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, RaftLogReader, RaftSnapshotBuilder};
use tempfile::TempDir;

use super::*;
use crate::types::{
    Entry, EntryPayload, LogId, Membership, Replies, StorageError, TypeConfig, Vote,
};

struct TempStore;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for TempStore {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, sm) = open(dir.path()).expect("open store");
        Ok((dir, log, sm))
    }
}

#[test]
fn passes_openraft_storage_suite() -> anyhow::Result<()> {
    Suite::test_all(TempStore)?;
    Ok(())
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn register(name: &str, at_ms: u64) -> Command {
    Command::RegisterSite {
        spec: SiteSpec {
            name: name.into(),
            kind: SiteKind::Cluster,
            locality: Locality {
                region: "eu".into(),
                zone: "eu-1a".into(),
            },
            gateways: vec!["10.0.0.1:15443".into()],
            lease_ttl_ms: 30_000,
            grace_ms: 600_000,
            instance: String::new(),
        },
        at_ms,
    }
}

/// Index 1 blank, 2 membership {1}, 3..=5 site registrations.
fn entries() -> Vec<Entry> {
    let membership = Membership::new(vec![BTreeSet::from([1])], None);
    let mut entries = vec![
        Entry {
            log_id: log_id(1, 1),
            payload: EntryPayload::Blank,
        },
        Entry {
            log_id: log_id(1, 2),
            payload: EntryPayload::Membership(membership),
        },
    ];
    for (i, site) in ["east", "west", "north"].into_iter().enumerate() {
        let index = 3 + i as u64;
        let payload = EntryPayload::Normal(register(site, 1_000 * index).into());
        entries.push(Entry {
            log_id: log_id(1, index),
            payload,
        });
    }
    entries
}

#[tokio::test]
async fn log_vote_and_state_machine_survive_reopen() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let vote = Vote::new_committed(1, 1);
    let (catalog_at_snapshot, catalog_at_end, snapshot_id) = {
        let (mut log, mut sm) = open(dir.path())?;
        log.blocking_append(entries()).await?;
        log.save_vote(&vote).await?;
        log.save_committed(Some(log_id(1, 5))).await?;

        let replies = sm.apply(entries()[..4].to_vec()).await?;
        assert!(replies.iter().flatten().all(|r| r.is_ok()), "{replies:?}");
        let snapshot = sm.get_snapshot_builder().await.build_snapshot().await?;
        assert_eq!(snapshot.meta.last_log_id, Some(log_id(1, 4)));
        let at_snapshot = sm.catalog();
        sm.apply(entries()[4..].to_vec()).await?;
        (at_snapshot, sm.catalog(), snapshot.meta.snapshot_id)
    };
    assert_eq!(catalog_at_end.sites.len(), 3);

    let (mut log, mut sm) = open(dir.path())?;
    assert_eq!(log.read_vote().await?, Some(vote));
    assert_eq!(log.read_committed().await?, Some(log_id(1, 5)));
    let state = log.get_log_state().await?;
    assert_eq!(state.last_log_id, Some(log_id(1, 5)));
    assert_eq!(state.last_purged_log_id, None);
    assert_eq!(log.try_get_log_entries(1..=5).await?, entries());

    // The state machine restarts from the snapshot and reports exactly that as applied.
    let (applied, membership) = sm.applied_state().await?;
    assert_eq!(applied, Some(log_id(1, 4)));
    assert_eq!(membership.log_id(), &Some(log_id(1, 2)));
    assert_eq!(sm.catalog(), catalog_at_snapshot);
    let current = sm.get_current_snapshot().await?.expect("snapshot");
    assert_eq!(current.meta.snapshot_id, snapshot_id);

    // Re-applying the log after the snapshot (as openraft does) gets back to where it was.
    let after = log.try_get_log_entries(5..).await?;
    sm.apply(after).await?;
    assert_eq!(sm.catalog(), catalog_at_end);
    Ok(())
}

#[tokio::test]
async fn apply_publishes_catalog_and_resumable_deltas() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (_log, mut sm) = open(dir.path())?;
    let feed = sm.feed();
    let mut rx = feed.subscribe();

    sm.apply(entries()).await?;
    assert!(rx.has_changed()?);
    let latest = rx.borrow_and_update().clone();
    assert_eq!(latest, sm.catalog());
    assert_eq!(latest.sites.len(), 3);

    let deltas = feed.deltas_since(0)?;
    let revisions: Vec<u64> = deltas.iter().map(|d| d.revision).collect();
    assert_eq!(revisions.len(), 3, "{deltas:?}");
    assert!(revisions.windows(2).all(|w| w[0] < w[1]), "{revisions:?}");
    assert_eq!(revisions.last(), Some(&latest.revision));
    assert_eq!(feed.deltas_since(revisions[1])?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn rejected_command_is_a_reply_not_a_storage_error() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (_log, mut sm) = open(dir.path())?;
    let heartbeat = Command::Heartbeat {
        site: "nowhere".into(),
        at_ms: 1,
        links: None,
        instance: String::new(),
        xds_rejections: None,
    };
    let entry = Entry {
        log_id: log_id(1, 1),
        payload: EntryPayload::Normal(heartbeat.into()),
    };
    let replies = sm.apply([entry]).await?;
    assert!(
        matches!(replies.as_slice(), [r] if matches!(r.as_slice(), [Err(_)])),
        "{replies:?}"
    );
    assert_eq!(sm.applied_state().await?.0, Some(log_id(1, 1)));
    assert_eq!(sm.feed().deltas_since(0)?, vec![]);
    Ok(())
}

#[tokio::test]
async fn installed_snapshot_replaces_catalog_and_survives_reopen() -> anyhow::Result<()> {
    let (leader_dir, follower_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (_leader_log, mut leader) = open(leader_dir.path())?;
    leader.apply(entries()).await?;
    let snapshot = leader.get_snapshot_builder().await.build_snapshot().await?;

    {
        let (_log, mut follower) = open(follower_dir.path())?;
        let feed = follower.feed();
        let mut target = follower.begin_receiving_snapshot().await?;
        *target = *snapshot.snapshot;
        follower.install_snapshot(&snapshot.meta, target).await?;
        assert_eq!(follower.catalog(), leader.catalog());
        assert_eq!(feed.latest(), leader.catalog());
        assert!(
            feed.deltas_since(0).is_err(),
            "watchers before the snapshot must reset"
        );
    }

    let (_log, mut follower) = open(follower_dir.path())?;
    assert_eq!(follower.catalog(), leader.catalog());
    assert_eq!(follower.applied_state().await?.0, Some(log_id(1, 5)));
    Ok(())
}

#[tokio::test]
async fn truncate_and_purge_leave_no_holes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut log, _sm) = open(dir.path())?;
    log.blocking_append(entries()).await?;
    log.truncate(log_id(1, 4)).await?;
    log.purge(log_id(1, 2)).await?;
    drop(log);
    drop(_sm);

    let (mut log, _sm) = open(dir.path())?;
    let state = log.get_log_state().await?;
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 2)));
    assert_eq!(state.last_log_id, Some(log_id(1, 3)));
    let indexes: Vec<u64> = log
        .try_get_log_entries(0..100)
        .await?
        .iter()
        .map(|e| e.log_id.index)
        .collect();
    assert_eq!(indexes, [3]);
    assert_eq!(
        log.try_get_log_entries(std::ops::Range { start: 5, end: 3 })
            .await?,
        vec![]
    );
    Ok(())
}

/// Batches applied on the replayed spare (and, while a reader holds the published catalog,
/// on a copy) give exactly the catalog a plain replay of the commands gives.
#[tokio::test]
async fn batches_on_the_spare_match_a_plain_replay() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (_log, mut sm) = open(dir.path())?;
    let mut reference = meshbridge_core::model::Catalog::default();
    let mut held = Vec::new();
    let mut index = 0;
    for batch in 0..30u64 {
        let mut entries = Vec::new();
        for i in 0..(batch % 4 + 1) {
            index += 1;
            let command = match i % 3 {
                0 => register(&format!("s{batch}"), index),
                1 => Command::Heartbeat {
                    site: format!("s{}", batch / 2),
                    at_ms: index * 10,
                    links: None,
                    instance: String::new(),
                    xds_rejections: None,
                },
                // Refused: changes nothing, and is not replayed.
                _ => Command::RemoveSite {
                    site: "nowhere".into(),
                },
            };
            let _ = reference.apply(&command);
            entries.push(Entry {
                log_id: log_id(1, index),
                payload: EntryPayload::Normal(command.into()),
            });
        }
        sm.apply(entries).await?;
        if batch % 7 == 0 {
            // A reader still holding a published catalog: the next batches cannot reuse it.
            held.push(sm.feed().latest());
        }
        assert_eq!(*sm.catalog(), reference, "after batch {batch}");
        assert_eq!(sm.feed().latest().revision, reference.revision);
    }
    assert!(held.iter().all(|c| c.revision <= reference.revision));
    Ok(())
}

/// Writes batched into one entry by the leader are applied in order, each with its own
/// reply; a refused one changes nothing; a retry of a write in the same entry is answered
/// from the session, not applied twice.
#[tokio::test]
async fn a_proposal_of_several_writes_applies_each_in_order_with_its_own_reply()
-> anyhow::Result<()> {
    use crate::types::{Proposal, Request, RequestId};
    let dir = tempfile::tempdir()?;
    let (_log, mut sm) = open(dir.path())?;
    let id = |seq| Some(RequestId { client: 7, seq });
    let refused = Command::Heartbeat {
        site: "nowhere".into(),
        at_ms: 1,
        links: None,
        instance: String::new(),
        xds_rejections: None,
    };
    let proposal = Proposal(vec![
        Request {
            id: id(1),
            command: register("a", 1_000),
        },
        Request {
            id: id(2),
            command: refused,
        },
        Request {
            id: id(1),
            command: register("a", 1_000),
        },
        Request {
            id: None,
            command: register("b", 2_000),
        },
    ]);
    let entry = Entry {
        log_id: log_id(1, 1),
        payload: EntryPayload::Normal(proposal),
    };
    let replies = sm.apply([entry]).await?;
    let [r] = replies.as_slice() else {
        anyhow::bail!("one entry, one list of replies: {replies:?}");
    };
    assert_eq!(r.len(), 4, "{r:?}");
    assert_eq!(r[0].as_ref().map(|a| a.revision), Ok(1));
    assert!(r[1].is_err(), "{r:?}");
    // The session keeps the revision of the first, not its changes.
    assert_eq!(r[2].as_ref().map(|a| a.revision), Ok(1), "{r:?}");
    assert_eq!(r[3].as_ref().map(|a| a.revision), Ok(2));
    let revisions: Vec<u64> = sm
        .feed()
        .deltas_since(0)?
        .iter()
        .map(|d| d.revision)
        .collect();
    assert_eq!(revisions, vec![1, 2]);
    Ok(())
}

fn blanks(term: u64, indexes: std::ops::RangeInclusive<u64>) -> Vec<Entry> {
    indexes
        .map(|i| Entry {
            log_id: log_id(term, i),
            payload: EntryPayload::Blank,
        })
        .collect()
}

fn ids(entries: &[Entry]) -> Vec<(u64, u64)> {
    entries
        .iter()
        .map(|e| (e.log_id.leader_id.term, e.log_id.index))
        .collect()
}

/// More entries than the in-memory tail keeps: reads that span the disk and the tail come
/// back whole and in order, and truncation and purge show in them at once.
#[tokio::test]
async fn reads_across_disk_and_memory_are_contiguous_and_follow_truncation() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut log, _sm) = open(dir.path())?;
    for chunk in blanks(1, 1..=3000).chunks(100) {
        log.blocking_append(chunk.to_vec()).await?;
    }
    let all = log.try_get_log_entries(1..=3000).await?;
    assert_eq!(ids(&all), ids(&blanks(1, 1..=3000)));
    let middle = log.try_get_log_entries(1500..2500).await?;
    assert_eq!(ids(&middle), ids(&blanks(1, 1500..=2499)));

    // A new leader's entries replace the old ones from 2500 on.
    log.truncate(log_id(1, 2500)).await?;
    assert_eq!(
        ids(&log.try_get_log_entries(2400..).await?),
        ids(&blanks(1, 2400..=2499))
    );
    log.blocking_append(blanks(2, 2500..=2600)).await?;
    let mut want = blanks(1, 2400..=2499);
    want.extend(blanks(2, 2500..=2600));
    assert_eq!(
        ids(&log.try_get_log_entries(2400..=3000).await?),
        ids(&want)
    );
    assert_eq!(
        log.get_log_state().await?.last_log_id,
        Some(log_id(2, 2600))
    );

    // Purged entries are gone from reads; the rest is still whole.
    log.purge(log_id(1, 1000)).await?;
    let after_purge = log.try_get_log_entries(1..=1200).await?;
    assert_eq!(ids(&after_purge), ids(&blanks(1, 1001..=1200)));

    // And all of it from the disk alone after a restart.
    drop(log);
    drop(_sm);
    let (mut log, _sm) = open(dir.path())?;
    assert_eq!(
        ids(&log.try_get_log_entries(2400..=3000).await?),
        ids(&want)
    );
    Ok(())
}

/// What the store handed to its [`EarlyAppend`]: vote, previous index, indexes.
type EarlySend = (Vote, Option<u64>, Vec<u64>);

/// Records what the store hands to its [`EarlyAppend`].
#[derive(Default)]
struct EarlyRecord(std::sync::Mutex<Vec<EarlySend>>);

impl EarlyAppend for EarlyRecord {
    fn send(&self, vote: &Vote, prev_log_id: Option<LogId>, entries: &[Entry]) {
        let indexes = entries.iter().map(|e| e.log_id.index).collect();
        self.0
            .lock()
            .expect("record")
            .push((*vote, prev_log_id.map(|p| p.index), indexes));
    }
}

impl EarlyRecord {
    fn take(&self) -> Vec<EarlySend> {
        std::mem::take(&mut *self.0.lock().expect("record"))
    }
}

/// A proposal of `writes` site registrations at `index` of term `term` (node 1's).
fn proposal(term: u64, index: u64, writes: usize) -> Entry {
    let requests = (0..writes)
        .map(|i| crate::types::Request::from(register(&format!("s{i}"), 1_000)))
        .collect();
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(crate::types::Proposal(requests)),
    }
}

/// Only node 1's own appends while its committed vote says it leads, of few enough writes,
/// right after an entry the store holds (so the follower can match it) and with everything
/// before them committed (a lone write) go early.
#[tokio::test]
async fn only_a_leaders_own_lone_small_appends_after_a_known_entry_go_early() -> anyhow::Result<()>
{
    let committed = |i: u64| Some(log_id(if i < 4 { 1 } else { 2 }, i));
    let dir = tempfile::tempdir()?;
    let record = Arc::new(EarlyRecord::default());
    let (log, sm) = open(dir.path())?;
    let mut log = log.with_early_append(1, record.clone());

    // No vote yet; then a vote not granted; then another node's leadership; then node 1
    // leading term 2 while the entries are term 1's: none of these goes early.
    log.blocking_append(blanks(1, 0..=0)).await?;
    log.save_vote(&Vote::new(1, 1)).await?;
    log.blocking_append(blanks(1, 1..=1)).await?;
    log.save_vote(&Vote::new_committed(1, 2)).await?;
    log.blocking_append(blanks(1, 2..=2)).await?;
    log.save_vote(&Vote::new_committed(2, 1)).await?;
    log.blocking_append(blanks(1, 3..=3)).await?;
    assert_eq!(record.take(), vec![]);

    // Node 1 leads term 2 and appends its own entries: not sent while entry 3 is not
    // committed (the pipeline is busy); sent once it is, with the entry before them.
    log.save_committed(committed(2)).await?;
    log.blocking_append(blanks(2, 4..=5)).await?;
    assert_eq!(record.take(), vec![]);
    log.truncate(log_id(2, 4)).await?;
    log.save_committed(committed(3)).await?;
    log.blocking_append(blanks(2, 4..=5)).await?;
    let leading = Vote::new_committed(2, 1);
    assert_eq!(record.take(), vec![(leading, Some(3), vec![4, 5])]);

    // Too many writes in one append: not sent; up to the limit: sent.
    log.save_committed(committed(5)).await?;
    log.blocking_append(vec![proposal(2, 6, EARLY_MAX_WRITES + 1)])
        .await?;
    log.save_committed(committed(6)).await?;
    log.blocking_append(vec![proposal(2, 7, EARLY_MAX_WRITES)])
        .await?;
    assert_eq!(record.take(), vec![(leading, Some(6), vec![7])]);
    log.save_committed(committed(7)).await?;
    drop((log, sm));

    // Reopened (the vote is read back): the first append follows an entry held only on
    // disk, so it is not sent; the next one is.
    let (log, _sm) = open(dir.path())?;
    let mut log = log.with_early_append(1, record.clone());
    assert_eq!(log.read_vote().await?, Some(leading));
    assert_eq!(log.read_committed().await?, committed(7));
    log.blocking_append(blanks(2, 8..=8)).await?;
    log.save_committed(committed(8)).await?;
    log.blocking_append(blanks(2, 9..=9)).await?;
    assert_eq!(record.take(), vec![(leading, Some(8), vec![9])]);
    Ok(())
}

/// The committed index costs no transaction of its own: it is written with the next
/// durable write (and at shutdown, as `log_vote_and_state_machine_survive_reopen` shows).
#[tokio::test]
async fn the_committed_index_is_written_with_the_next_durable_write() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut log, _sm) = open(dir.path())?;
    log.blocking_append(blanks(1, 1..=3)).await?;
    log.save_committed(Some(log_id(1, 2))).await?;
    assert_eq!(log.read_committed().await?, None);
    log.save_committed(Some(log_id(1, 3))).await?;
    log.blocking_append(blanks(1, 4..=4)).await?;
    assert_eq!(log.read_committed().await?, Some(log_id(1, 3)));
    Ok(())
}

/// A restarted leader must win a new election: its own committed vote comes back
/// uncommitted, and is saved so; another node's committed vote is left alone.
#[tokio::test]
async fn a_restarted_leaders_own_committed_vote_comes_back_uncommitted() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let (mut log, _sm) = open(dir.path())?;
        log.save_vote(&Vote::new_committed(2, 1)).await?;
    }
    // Node 2 reading node 1's leadership: unchanged.
    {
        let (log, _sm) = open(dir.path())?;
        let mut log = log.for_node(2);
        assert_eq!(log.read_vote().await?, Some(Vote::new_committed(2, 1)));
    }
    // Node 1 reading its own leadership: same term, uncommitted.
    {
        let (log, _sm) = open(dir.path())?;
        let mut log = log.for_node(1);
        assert_eq!(log.read_vote().await?, Some(Vote::new(2, 1)));
    }
    // Saved so before openraft saw it.
    let (mut log, _sm) = open(dir.path())?;
    assert_eq!(log.read_vote().await?, Some(Vote::new(2, 1)));
    Ok(())
}

/// The writer's fault hook: held writes wait; a crash drops them and everything queued
/// behind them, tells nobody they are done, and commits nothing more; what was committed
/// before stays.
#[tokio::test]
async fn a_crash_loses_held_and_queued_writes_and_calls_nobody_back() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let (mut log, _sm) = open(dir.path())?;
        let fault = log.fault();
        log.blocking_append(blanks(1, 1..=2)).await?;
        log.save_vote(&Vote::new_committed(1, 1)).await?;
        fault.hold();
        let mut held = log.clone();
        let append = tokio::spawn(async move { held.blocking_append(blanks(1, 3..=3)).await });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !fault.holding() {
            assert!(
                std::time::Instant::now() < deadline,
                "the append never reached the hold"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        // Readable (it is in the tail) while not durable.
        assert_eq!(ids(&log.try_get_log_entries(3..=3).await?), vec![(1, 3)]);
        let mut queued = log.clone();
        let vote = tokio::spawn(async move { queued.save_vote(&Vote::new(2, 2)).await });
        fault.crash();
        assert!(
            append.await?.is_err(),
            "the held append is never acknowledged"
        );
        assert!(
            vote.await?.is_err(),
            "the queued vote is never acknowledged"
        );
        assert!(log.save_vote(&Vote::new(3, 3)).await.is_err());
    }
    let (mut log, _sm) = open(dir.path())?;
    assert_eq!(log.read_vote().await?, Some(Vote::new_committed(1, 1)));
    let state = log.get_log_state().await?;
    assert_eq!(state.last_log_id, Some(log_id(1, 2)));
    Ok(())
}

fn put_export(site: &str, ns: &str, name: &str) -> Command {
    use meshbridge_core::model::{Endpoint, Export, Port, Protocol, ServiceKey};
    Command::PutExport {
        export: Export {
            site: site.into(),
            service: ServiceKey::new(ns, name),
            generation: 1,
            ports: vec![Port {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
                target_port: 80,
                app_protocol: None,
            }],
            endpoints: vec![Endpoint {
                address: [10, 0, 0, 1].into(),
                hostname: None,
                ready: true,
                weight: 1,
                identity: None,
                zone: None,
            }],
            headless: false,
            created_revision: 0,
            updated_revision: 0,
        },
    }
}

/// Quota: a site may have `max_exports_per_site` exports; a new one beyond it is refused
/// as part of applying the log (every node the same), while updates, other sites and
/// exports after a deletion still go through; the count survives a restart (rebuilt from
/// the snapshot and the replayed log).
#[tokio::test]
async fn exports_per_site_are_bounded_by_the_state_machine() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let options = || Options {
        max_exports_per_site: 2,
        ..Options::default()
    };
    let entry = |index: u64, command: Command| Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Normal(crate::types::Proposal(vec![command.into()])),
    };
    let refused = |replies: &[Replies]| {
        matches!(
            replies.first().and_then(|r| r.first()),
            Some(Err(Rejection::Quota { what, limit: 2 })) if what == "exports of site a"
        )
    };
    {
        let (_log, mut sm) = open_with(dir.path(), options())?;
        let first = sm
            .apply(vec![
                entry(1, register("a", 1)),
                entry(2, register("b", 1)),
                entry(3, put_export("a", "shop", "one")),
                entry(4, put_export("a", "shop", "two")),
            ])
            .await?;
        assert!(first.iter().flatten().all(Result::is_ok), "{first:?}");
        assert!(refused(
            &sm.apply(vec![entry(5, put_export("a", "shop", "three"))])
                .await?
        ));
        // Another site, and an update of a counted export: fine.
        let other = sm
            .apply(vec![entry(6, put_export("b", "shop", "three"))])
            .await?;
        assert!(other[0][0].is_ok(), "{other:?}");
        let mut update = put_export("a", "shop", "one");
        if let Command::PutExport { export } = &mut update {
            export.generation = 2;
        }
        let updated = sm.apply(vec![entry(7, update)]).await?;
        assert!(updated[0][0].is_ok(), "{updated:?}");
        sm.get_snapshot_builder().await.build_snapshot().await?;
    }
    // After a restart the count is rebuilt: still full, until one export goes.
    let (_log, mut sm) = open_with(dir.path(), options())?;
    assert!(refused(
        &sm.apply(vec![entry(8, put_export("a", "shop", "three"))])
            .await?
    ));
    let delete = Command::DeleteExport {
        site: "a".into(),
        service: meshbridge_core::model::ServiceKey::new("shop", "two"),
        generation: 1,
    };
    sm.apply(vec![entry(9, delete)]).await?;
    let again = sm
        .apply(vec![entry(10, put_export("a", "shop", "three"))])
        .await?;
    assert!(again[0][0].is_ok(), "{again:?}");
    Ok(())
}
