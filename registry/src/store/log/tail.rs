//! The end of the log in memory ([`Tail`]): every entry not yet durable and the most
//! recent durable ones, so replication and applying read what was just written without
//! going to the disk.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::types::{Entry, LogId};

/// Durable entries kept in memory past these bounds leave the tail, oldest first.
const TAIL_ENTRIES: usize = 1024;
const TAIL_BYTES: usize = 8 * 1024 * 1024;

/// The end of the log in memory, by index: every entry not yet durable and the most recent
/// durable ones. A contiguous run that ends at the last entry appended; an entry leaves it
/// only once it is on disk, so every entry is in the tail or on disk (or both).
#[derive(Default)]
pub(super) struct Tail {
    entries: BTreeMap<u64, Cached>,
    /// Encoded bytes of the durable entries held.
    durable_bytes: usize,
    /// Number of the next append.
    next_append: u64,
    /// Index after the log's last entry, once this process appended or truncated (the
    /// disk may still hold truncated entries at or after it until the writer gets there).
    end: Option<u64>,
    /// Truncations and purges so far: a reader that went to the disk checks that none
    /// happened meanwhile.
    pub(super) removals: u64,
}

struct Cached {
    /// Shared, so that a reader copies pointers under the lock, not entries.
    entry: Arc<Entry>,
    /// Which append put it here: only that append's write makes it durable (the same log
    /// id can be truncated and appended again while the first write is queued).
    append: u64,
    /// Its encoded size once it is on disk; `None` while it is only here.
    durable: Option<usize>,
}

impl Tail {
    /// Appended entries, replacing any at or after the first one's index; returns the
    /// append's number for [`Tail::durable`].
    pub(super) fn append(&mut self, entries: &[Entry]) -> u64 {
        let append = self.next_append;
        self.next_append += 1;
        if let Some(first) = entries.first() {
            self.remove_from(first.log_id.index);
        }
        if let Some(last) = entries.last() {
            self.end = Some(last.log_id.index + 1);
        }
        for e in entries {
            let cached = Cached {
                entry: Arc::new(e.clone()),
                append,
                durable: None,
            };
            self.entries.insert(e.log_id.index, cached);
        }
        append
    }

    /// Truncation: everything at or after `index` goes.
    pub(super) fn remove_from(&mut self, index: u64) {
        if self.end.is_none_or(|end| index < end) {
            // The log gets shorter (or may: its end is not known yet).
            self.removals += 1;
        }
        self.end = Some(self.end.map_or(index, |end| end.min(index)));
        let removed = self.entries.split_off(&index);
        self.forget(&removed);
    }

    /// Purge: everything up to and including `index` goes.
    pub(super) fn remove_through(&mut self, index: u64) {
        self.removals += 1;
        let Some(keep_from) = index.checked_add(1) else {
            self.entries.clear();
            self.durable_bytes = 0;
            return;
        };
        let kept = self.entries.split_off(&keep_from);
        let removed = std::mem::replace(&mut self.entries, kept);
        self.forget(&removed);
    }

    /// Takes entries that were removed out of the durable byte count.
    fn forget(&mut self, removed: &BTreeMap<u64, Cached>) {
        self.durable_bytes -= removed.values().filter_map(|c| c.durable).sum::<usize>();
    }

    /// Entries reached the disk, as (append number, index, encoded bytes); those still
    /// held from that append (not truncated since) are durable. Then the oldest durable
    /// entries past the bounds leave.
    pub(super) fn durable(&mut self, written: &[(u64, u64, usize)]) {
        for (append, index, bytes) in written {
            if let Some(c) = self.entries.get_mut(index)
                && c.append == *append
                && c.durable.is_none()
            {
                c.durable = Some(*bytes);
                self.durable_bytes += bytes;
            }
        }
        while self.entries.len() > TAIL_ENTRIES || self.durable_bytes > TAIL_BYTES {
            let Some(first) = self.entries.first_entry() else {
                break;
            };
            let Some(bytes) = first.get().durable else {
                break;
            };
            first.remove();
            self.durable_bytes -= bytes;
        }
    }

    /// What a reader of `start..end` (`end` `None`: to the end) needs: the entries held
    /// in that range, and where the log ends and how many removals happened, as of now.
    pub(super) fn view(&self, start: u64, end: Option<u64>) -> TailView {
        // Nothing at or after the log's end exists, whatever the disk still holds.
        let end = match (end, self.end) {
            (Some(e), Some(log_end)) => Some(e.min(log_end)),
            (e, log_end) => e.or(log_end),
        };
        let entries = match end {
            Some(end) if end <= start => Vec::new(),
            Some(end) => self
                .entries
                .range(start..end)
                .map(|(_, c)| c.entry.clone())
                .collect(),
            None => self
                .entries
                .range(start..)
                .map(|(_, c)| c.entry.clone())
                .collect(),
        };
        TailView {
            entries,
            end,
            removals: self.removals,
        }
    }

    /// The entries held in `start..end` (`end` `None`: to the end).
    #[cfg(test)]
    pub(super) fn range(&self, start: u64, end: Option<u64>) -> Vec<Entry> {
        self.view(start, end)
            .entries
            .iter()
            .map(|e| (**e).clone())
            .collect()
    }

    pub(super) fn last_log_id(&self) -> Option<LogId> {
        self.entries.last_key_value().map(|(_, c)| c.entry.log_id)
    }
}

/// A reader's look at the tail ([`Tail::view`]).
pub(super) struct TailView {
    pub(super) entries: Vec<Arc<Entry>>,
    /// The read's end, cut at the log's end when that is known.
    pub(super) end: Option<u64>,
    pub(super) removals: u64,
}

pub(super) type SharedTail = Arc<Mutex<Tail>>;

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn run(term: u64, indexes: std::ops::Range<u64>) -> Vec<Entry> {
        indexes.map(|i| entry(term, i)).collect()
    }

    fn indexes(tail: &Tail) -> Vec<u64> {
        tail.range(0, None).iter().map(|e| e.log_id.index).collect()
    }

    fn written(append: u64, entries: &[Entry], bytes: usize) -> Vec<(u64, u64, usize)> {
        entries
            .iter()
            .map(|e| (append, e.log_id.index, bytes))
            .collect()
    }

    #[test]
    fn durable_entries_stay_readable_up_to_the_bound_then_leave_oldest_first() {
        let mut tail = Tail::default();
        let first = run(1, 1..1001);
        let a = tail.append(&first);
        tail.durable(&written(a, &first, 10));
        // Within the bounds, what was just written is still read from memory.
        assert_eq!(indexes(&tail), (1..1001).collect::<Vec<_>>());
        assert_eq!(tail.durable_bytes, 10_000);

        let second = run(1, 1001..1101);
        let b = tail.append(&second);
        // Past the bound: old durable entries leave, the new ones (not durable yet) stay.
        tail.durable(&[]);
        assert_eq!(tail.entries.len(), TAIL_ENTRIES);
        let oldest = 1101 - TAIL_ENTRIES as u64;
        assert_eq!(indexes(&tail).first(), Some(&oldest));
        assert_eq!(tail.durable_bytes, (1001 - oldest as usize) * 10);
        tail.durable(&written(b, &second, 10));
        assert_eq!(tail.entries.len(), TAIL_ENTRIES);
        assert_eq!(tail.durable_bytes, TAIL_ENTRIES * 10);
    }

    #[test]
    fn the_byte_bound_evicts_durable_entries_but_never_unwritten_ones() {
        let mut tail = Tail::default();
        let big = run(1, 1..4);
        let a = tail.append(&big);
        let unwritten = run(1, 4..6);
        tail.append(&unwritten);
        tail.durable(&written(a, &big, TAIL_BYTES / 2));
        // 1.5 × the bound in durable bytes: the oldest durable entries go until within it.
        assert_eq!(indexes(&tail), vec![2, 3, 4, 5]);
        assert_eq!(tail.durable_bytes, TAIL_BYTES);
        // Past the bound in count but with only unwritten entries left: they stay.
        let mut tail = Tail::default();
        let many = run(1, 1..(TAIL_ENTRIES as u64 + 10));
        tail.append(&many);
        tail.durable(&[]);
        assert_eq!(tail.entries.len(), many.len());
    }

    #[test]
    fn a_write_of_an_entry_truncated_and_appended_again_does_not_make_the_new_one_durable() {
        let mut tail = Tail::default();
        let old = run(1, 1..3);
        let a = tail.append(&old);
        // Truncated from 2 and the same log id appended again before `a` reached the disk.
        tail.remove_from(2);
        let again = run(1, 2..3);
        tail.append(&again);
        tail.durable(&written(a, &old, 10));
        assert!(tail.entries.get(&1).is_some_and(|c| c.durable == Some(10)));
        assert!(tail.entries.get(&2).is_some_and(|c| c.durable.is_none()));
        assert_eq!(tail.durable_bytes, 10);
    }

    #[test]
    fn a_read_stops_at_the_end_of_the_log_even_with_nothing_held() {
        let mut tail = Tail::default();
        // Before anything happened here, the end is unknown: the disk decides.
        assert_eq!(tail.view(1, None).end, None);
        let all = run(1, 1..11);
        let a = tail.append(&all);
        tail.durable(&written(a, &all, 7));
        assert_eq!(tail.view(1, Some(100)).end, Some(11));
        // Appending at the end removes nothing: readers on the disk need not retry.
        let before = tail.removals;
        tail.append(&run(1, 11..12));
        assert_eq!(tail.removals, before);
        // Truncated at 4 and every entry evicted (as if beyond the bounds): whatever the
        // disk still holds at 4 or after, a read does not go there.
        tail.remove_from(4);
        tail.remove_through(3);
        assert!(tail.entries.is_empty());
        let view = tail.view(1, None);
        assert_eq!(view.end, Some(4));
        assert_eq!(view.removals, before + 2);
        assert!(tail.view(4, Some(10)).end.is_some_and(|end| end <= 4));
    }

    #[test]
    fn truncation_and_purge_keep_the_byte_count() {
        let mut tail = Tail::default();
        let all = run(1, 1..11);
        let a = tail.append(&all);
        tail.durable(&written(a, &all, 7));
        tail.remove_from(9);
        assert_eq!(indexes(&tail), (1..9).collect::<Vec<_>>());
        assert_eq!(tail.durable_bytes, 56);
        tail.remove_through(3);
        assert_eq!(indexes(&tail), (4..9).collect::<Vec<_>>());
        assert_eq!(tail.durable_bytes, 35);
        tail.remove_through(u64::MAX);
        assert!(tail.entries.is_empty());
        assert_eq!(tail.durable_bytes, 0);
        // A later append replaces from its first index on.
        let b = tail.append(&run(2, 1..3));
        assert_eq!(b, a + 1);
        assert_eq!(tail.last_log_id().map(|l| l.index), Some(2));
    }
}
