//! A linearizability checker for histories of one register (one key): put, get, delete.
//!
//! Wing & Gong's search with Lowe's memoisation (the algorithm behind Knossos and
//! Porcupine): repeatedly pick an operation that may take effect next — one that was called
//! before every not-yet-linearized completed operation returned — apply it to the model,
//! and backtrack on a mismatch. Seen (linearized set, model state) pairs are cached.
//!
//! Operations whose outcome is unknown (the client timed out or the node died) may have
//! taken effect at any time after their call, or never: they get an infinite return time
//! and need not be linearized. Reads with unknown outcome carry no information and are
//! dropped. Check a multi-key history key by key (linearizability is compositional).

use std::collections::HashSet;

/// An operation on the register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Put(u64),
    Get,
    Delete,
}

/// What the client saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A write was acknowledged.
    Done,
    /// A read returned this value.
    Read(Option<u64>),
    /// No answer: may or may not have happened.
    Unknown,
}

/// One operation of a history; times are any monotonic clock (e.g. ns since start).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub client: usize,
    pub op: Op,
    pub call: u64,
    /// Return time; ignored for `Outcome::Unknown`.
    pub ret: u64,
    pub outcome: Outcome,
}

/// Check a single-register history that started from an absent value.
/// Returns `Err` with a description of the smallest stuck point when it is not linearizable.
pub fn check(history: &[Event]) -> Result<(), String> {
    let ops: Vec<Event> = history
        .iter()
        .copied()
        .filter(|e| !(e.op == Op::Get && e.outcome == Outcome::Unknown))
        .collect();
    let n = ops.len();
    let ret = |e: &Event| {
        if e.outcome == Outcome::Unknown {
            u64::MAX
        } else {
            e.ret
        }
    };
    let required: Vec<bool> = ops.iter().map(|e| e.outcome != Outcome::Unknown).collect();
    let words = n.div_ceil(64).max(1);
    let mut done = vec![0u64; words];
    let mut seen: HashSet<(Vec<u64>, Option<u64>)> = HashSet::new();
    // Explicit DFS stack: (op index chosen, previous state) to undo.
    let mut stack: Vec<(usize, Option<u64>)> = Vec::new();
    let mut state: Option<u64> = None;
    let mut cursor = 0usize; // next candidate index to try at this depth
    let mut deepest = 0usize;
    let is_done = |d: &Vec<u64>, i: usize| d[i / 64] & (1 << (i % 64)) != 0;
    loop {
        // Finished when every required op is linearized.
        if (0..n).all(|i| !required[i] || is_done(&done, i)) {
            return Ok(());
        }
        // The earliest return among pending required ops bounds who may go next.
        let min_ret = (0..n)
            .filter(|&i| !is_done(&done, i))
            .map(|i| ret(&ops[i]))
            .min()
            .unwrap_or(u64::MAX);
        let mut advanced = false;
        let mut i = cursor;
        while i < n {
            if !is_done(&done, i) && ops[i].call <= min_ret {
                let e = &ops[i];
                let next = match (e.op, e.outcome) {
                    (Op::Put(v), _) => Some(Some(v)),
                    (Op::Delete, _) => Some(None),
                    (Op::Get, Outcome::Read(v)) => (v == state).then_some(state),
                    (Op::Get, _) => None,
                };
                if let Some(new_state) = next {
                    let mut d2 = done.clone();
                    d2[i / 64] |= 1 << (i % 64);
                    if seen.insert((d2.clone(), new_state)) {
                        stack.push((i, state));
                        done = d2;
                        state = new_state;
                        cursor = 0;
                        advanced = true;
                        deepest = deepest.max(stack.len());
                        break;
                    }
                }
            }
            i += 1;
        }
        if advanced {
            continue;
        }
        // Backtrack.
        match stack.pop() {
            Some((i, prev)) => {
                done[i / 64] &= !(1 << (i % 64));
                state = prev;
                cursor = i + 1;
            }
            None => {
                return Err(format!(
                    "history of {n} operations is not linearizable (deepest consistent prefix: {deepest} operations)"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(client: usize, op: Op, call: u64, ret: u64, outcome: Outcome) -> Event {
        Event {
            client,
            op,
            call,
            ret,
            outcome,
        }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = [
            ev(0, Op::Put(1), 0, 1, Outcome::Done),
            ev(0, Op::Get, 2, 3, Outcome::Read(Some(1))),
            ev(0, Op::Delete, 4, 5, Outcome::Done),
            ev(0, Op::Get, 6, 7, Outcome::Read(None)),
        ];
        assert_eq!(check(&h), Ok(()));
    }

    #[test]
    fn stale_read_after_acknowledged_write_is_caught() {
        let h = [
            ev(0, Op::Put(1), 0, 1, Outcome::Done),
            ev(1, Op::Put(2), 2, 3, Outcome::Done),
            ev(2, Op::Get, 4, 5, Outcome::Read(Some(1))),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn concurrent_ops_may_order_either_way() {
        let h = [
            ev(0, Op::Put(1), 0, 10, Outcome::Done),
            ev(1, Op::Put(2), 1, 9, Outcome::Done),
            ev(2, Op::Get, 11, 12, Outcome::Read(Some(1))),
            ev(3, Op::Get, 13, 14, Outcome::Read(Some(1))),
        ];
        assert_eq!(check(&h), Ok(()));
        let flip = [
            h[0],
            h[1],
            ev(2, Op::Get, 11, 12, Outcome::Read(Some(1))),
            ev(3, Op::Get, 13, 14, Outcome::Read(Some(2))),
        ];
        assert!(
            check(&flip).is_err(),
            "value cannot go back after both writes completed"
        );
    }

    #[test]
    fn unknown_writes_may_or_may_not_take_effect() {
        let lost = [
            ev(0, Op::Put(7), 0, 0, Outcome::Unknown),
            ev(1, Op::Get, 5, 6, Outcome::Read(None)),
        ];
        assert_eq!(check(&lost), Ok(()));
        let late = [
            ev(0, Op::Put(7), 0, 0, Outcome::Unknown),
            ev(1, Op::Get, 5, 6, Outcome::Read(None)),
            ev(1, Op::Get, 7, 8, Outcome::Read(Some(7))),
        ];
        assert_eq!(check(&late), Ok(()));
        let phantom = [ev(1, Op::Get, 5, 6, Outcome::Read(Some(9)))];
        assert!(check(&phantom).is_err(), "a value nobody wrote");
    }
}
