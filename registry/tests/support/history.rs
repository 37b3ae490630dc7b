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
