//! A recorded history of concurrent operations on keyed registers, and a linearizability
//! checker for it: Wing & Gong's search with Lowe's memoization, as in Knossos and
//! Porcupine.
//!
//! Linearizability is local (a history is linearizable iff each key's sub-history is), so
//! each key is checked alone. An operation whose outcome is unknown (the client gave up) is
//! taken to return at the end of time: the search may place its effect anywhere after its
//! call, or after everything else, which is the same as never. Reads with unknown outcome
//! say nothing and are dropped.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

/// An operation on one key's register.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Put(String),
    Get,
    /// Makes the key absent, whether it was present or not.
    Delete,
}

/// What the operation answered.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Out {
    /// A write was acknowledged.
    Done,
    /// A read returned this value (`None`: absent).
    Value(Option<String>),
    /// No answer: the operation may or may not have taken effect.
    Unknown,
}

#[derive(Clone, Debug)]
pub struct Event {
    pub client: usize,
    pub key: String,
    pub op: Op,
    pub out: Out,
    /// Nanoseconds since the recorder started.
    pub call: u64,
    /// `None` when the outcome is unknown.
    pub ret: Option<u64>,
}

/// Collects events from concurrent clients.
pub struct Recorder {
    start: Instant,
    events: Mutex<Vec<Event>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            events: Mutex::new(Vec::new()),
        }
    }

    pub fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Records an operation called at `call` (from [`Recorder::now`]) that answered `out`
    /// just now.
    pub fn record(&self, client: usize, key: &str, op: Op, call: u64, out: Out) {
        let ret = (out != Out::Unknown).then(|| self.now());
        self.events.lock().unwrap().push(Event {
            client,
            key: key.to_owned(),
            op,
            out,
            call,
            ret,
        });
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }
}

/// Checks every key's history; the error names the first key that is not linearizable.
pub fn check(events: &[Event]) -> Result<(), String> {
    let mut by_key: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in events {
        if e.op == Op::Get && e.out == Out::Unknown {
            continue;
        }
        by_key.entry(&e.key).or_default().push(e);
    }
    for (key, ops) in by_key {
        if !linearizable(&ops) {
            let mut ops = ops.clone();
            ops.sort_by_key(|e| e.call);
            let listing: Vec<String> = ops.iter().map(|e| format!("{e:?}")).collect();
            return Err(format!(
                "key {key}: not linearizable; {} ops:\n{}",
                ops.len(),
                listing.join("\n")
            ));
        }
    }
    Ok(())
}

/// The register's transition: whether `op` answering `out` is possible in `state`, and
/// the state after it.
fn step(state: &Option<String>, op: &Op, out: &Out) -> Option<Option<String>> {
    match op {
        Op::Put(v) => Some(Some(v.clone())),
        Op::Delete => Some(None),
        Op::Get => match out {
            Out::Value(v) if v == state => Some(state.clone()),
            _ => None,
        },
    }
}

/// One call or return in the time-ordered list.
#[derive(Clone, Copy)]
struct Node {
    op: usize,
    is_call: bool,
    /// For a call: the list index of its return.
    ret: usize,
    prev: usize,
    next: usize,
}

fn linearizable(ops: &[&Event]) -> bool {
    const END: u64 = u64::MAX;
    // Time-ordered entries; at equal times calls come first (the operations overlap).
    let mut points: Vec<(u64, bool, usize)> = Vec::new();
    for (i, e) in ops.iter().enumerate() {
        points.push((e.call, true, i));
        points.push((e.ret.unwrap_or(END), false, i));
    }
    points.sort_by_key(|&(t, is_call, i)| (t, !is_call, i));
    // List index 0 is the head sentinel; entries are 1..=2n.
    let n = points.len();
    let mut list = vec![
        Node {
            op: usize::MAX,
            is_call: false,
            ret: 0,
            prev: 0,
            next: 1,
        };
        n + 1
    ];
    let mut ret_of = vec![0; ops.len()];
    for (pos, &(_, is_call, op)) in points.iter().enumerate() {
        let idx = pos + 1;
        list[idx] = Node {
            op,
            is_call,
            ret: 0,
            prev: idx - 1,
            next: if idx == n { usize::MAX } else { idx + 1 },
        };
        if !is_call {
            ret_of[op] = idx;
        }
    }
    if n == 0 {
        return true;
    }
    for idx in 1..=n {
        if list[idx].is_call {
            list[idx].ret = ret_of[list[idx].op];
        }
    }

    let words = ops.len().div_ceil(64);
    let mut done = vec![0u64; words];
    let mut seen: HashSet<(Vec<u64>, Option<String>)> = HashSet::new();
    let mut stack: Vec<(usize, Option<String>)> = Vec::new();
    let mut state: Option<String> = None;
    let mut entry = list[0].next;

    // Unlinks a call and its return; `relink` undoes it (in reverse order of unlinking).
    fn unlink(list: &mut [Node], idx: usize) {
        let (p, nx) = (list[idx].prev, list[idx].next);
        list[p].next = nx;
        if nx != usize::MAX {
            list[nx].prev = p;
        }
    }
    fn relink(list: &mut [Node], idx: usize) {
        let (p, nx) = (list[idx].prev, list[idx].next);
        list[p].next = idx;
        if nx != usize::MAX {
            list[nx].prev = idx;
        }
    }

    while list[0].next != usize::MAX {
        if entry == usize::MAX {
            return false;
        }
        let node = list[entry];
        if node.is_call {
            let e = ops[node.op];
            if let Some(next_state) = step(&state, &e.op, &e.out) {
                let mut next_done = done.clone();
                next_done[node.op / 64] |= 1 << (node.op % 64);
                if seen.insert((next_done.clone(), next_state.clone())) {
                    stack.push((entry, state));
                    state = next_state;
                    done = next_done;
                    unlink(&mut list, entry);
                    unlink(&mut list, node.ret);
                    entry = list[0].next;
                    continue;
                }
            }
            entry = node.next;
        } else {
            // A return reached with its call not linearized: backtrack.
            let Some((call, prev_state)) = stack.pop() else {
                return false;
            };
            let op = list[call].op;
            let ret = list[call].ret;
            relink(&mut list, ret);
            relink(&mut list, call);
            done[op / 64] &= !(1 << (op % 64));
            state = prev_state;
            entry = list[call].next;
        }
    }
    true
}

/// The registry as a set of registers: register `name` is the policy of that name, its
/// value the one site it allows. (Policies are the registry's simplest keyed writes.)
pub mod policies {
    use meshbridge_core::client::ClientError;
    use meshbridge_core::model::{Policy, Principal, Rejection, ServiceKey};

    use super::{Op, Out};

    /// The policy that stores `value` in register `name`.
    pub fn put(name: &str, value: &str) -> Policy {
        Policy {
            name: name.into(),
            service: ServiceKey::new("registers", "svc"),
            allow: vec![Principal::Site(value.into())],
        }
    }

    /// Register `name`'s value in a list of policies (`None`: absent).
    pub fn value_of(policies: &[Policy], name: &str) -> Option<String> {
        let p = policies.iter().find(|p| p.name == name)?;
        match p.allow.first() {
            Some(Principal::Site(v)) => Some(v.clone()),
            other => panic!("policy {name} is not a register: {other:?}"),
        }
    }

    /// A write's outcome: acknowledged, or unknown when no node answered in time. A
    /// refusal other than "not found" for a delete is a bug in the test or the registry.
    pub fn write_outcome(r: Result<(), ClientError>, op: &Op) -> Out {
        match r {
            Ok(()) => Out::Done,
            Err(ClientError::Rejected(Rejection::NotFound { .. })) if *op == Op::Delete => {
                Out::Done
            }
            Err(ClientError::Unavailable { .. }) => Out::Unknown,
            Err(e) => panic!("{op:?}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(client: usize, op: Op, out: Out, call: u64, ret: Option<u64>) -> Event {
        Event {
            client,
            key: "k".into(),
            op,
            out,
            call,
            ret,
        }
    }

    fn put(v: &str) -> Op {
        Op::Put(v.into())
    }

    fn got(v: Option<&str>) -> Out {
        Out::Value(v.map(str::to_owned))
    }

    #[test]
    fn checker_accepts_overlapping_writes_in_either_order() {
        let h = vec![
            ev(0, put("a"), Out::Done, 0, Some(10)),
            ev(1, put("b"), Out::Done, 1, Some(11)),
            ev(2, Op::Get, got(Some("a")), 12, Some(13)),
            ev(2, Op::Get, got(Some("a")), 14, Some(15)),
        ];
        assert!(check(&h).is_ok());
    }

    #[test]
    fn checker_refuses_a_stale_read_after_a_completed_write() {
        let h = vec![
            ev(0, put("a"), Out::Done, 0, Some(1)),
            ev(0, put("b"), Out::Done, 2, Some(3)),
            ev(1, Op::Get, got(Some("a")), 4, Some(5)),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn checker_refuses_a_value_that_comes_back() {
        let h = vec![
            ev(0, put("a"), Out::Done, 0, Some(100)),
            ev(1, put("b"), Out::Done, 1, Some(2)),
            ev(2, Op::Get, got(Some("a")), 3, Some(4)),
            ev(2, Op::Get, got(Some("b")), 5, Some(6)),
            ev(2, Op::Get, got(Some("a")), 7, Some(8)),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn checker_unknown_writes_may_or_may_not_have_happened() {
        let happened = vec![
            ev(0, put("a"), Out::Unknown, 0, None),
            ev(1, Op::Get, got(Some("a")), 5, Some(6)),
        ];
        assert!(check(&happened).is_ok());
        let never = vec![
            ev(0, put("a"), Out::Unknown, 0, None),
            ev(1, Op::Get, got(None), 5, Some(6)),
        ];
        assert!(check(&never).is_ok());
        let before_call = vec![
            ev(1, Op::Get, got(Some("a")), 0, Some(1)),
            ev(0, put("a"), Out::Unknown, 5, None),
        ];
        assert!(check(&before_call).is_err());
    }

    #[test]
    fn checker_deletes_and_absent_reads() {
        let h = vec![
            ev(0, put("a"), Out::Done, 0, Some(1)),
            ev(0, Op::Delete, Out::Done, 2, Some(3)),
            ev(1, Op::Get, got(None), 4, Some(5)),
            ev(1, Op::Delete, Out::Done, 6, Some(7)),
        ];
        assert!(check(&h).is_ok());
        let resurrected = vec![
            ev(0, put("a"), Out::Done, 0, Some(1)),
            ev(0, Op::Delete, Out::Done, 2, Some(3)),
            ev(1, Op::Get, got(Some("a")), 4, Some(5)),
        ];
        assert!(check(&resurrected).is_err());
    }

    #[test]
    fn checker_refuses_a_lost_acknowledged_write_and_names_the_key() {
        // Key "k" is fine; key "j" lost an acknowledged put: a later read sees the value
        // before it, as after a crash that dropped a committed entry.
        let mut h = vec![
            ev(0, put("a"), Out::Done, 0, Some(1)),
            ev(1, Op::Get, got(Some("a")), 2, Some(3)),
        ];
        let mut lost = vec![
            ev(0, put("old"), Out::Done, 10, Some(11)),
            ev(0, put("new"), Out::Done, 12, Some(13)),
            ev(2, Op::Get, got(Some("old")), 20, Some(21)),
        ];
        for e in &mut lost {
            e.key = "j".into();
        }
        h.extend(lost);
        let err = check(&h).unwrap_err();
        assert!(err.starts_with("key j: not linearizable"), "{err}");
    }

    #[test]
    fn checker_refuses_two_nodes_answering_different_values_at_once() {
        // Two reads after both writes returned, each seeing a different write as the last:
        // what divergent replicas at the same revision would answer.
        let h = vec![
            ev(0, put("x"), Out::Done, 0, Some(5)),
            ev(1, put("y"), Out::Done, 1, Some(6)),
            ev(2, Op::Get, got(Some("x")), 10, Some(11)),
            ev(3, Op::Get, got(Some("y")), 12, Some(13)),
        ];
        assert!(check(&h).is_err());
    }
}
