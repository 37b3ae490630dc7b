//! Client sessions: the replies of recent writes by request id, so that a retried write is
//! answered from here instead of being applied a second time (Raft dissertation §6.3).
//!
//! Part of the replicated state (in snapshots) and changed only by applying log entries:
//! every replica holds the same sessions. Bounded: a client keeps the replies of its last
//! [`WINDOW`] writes, and a client that wrote nothing for [`IDLE_ENTRIES`] log entries is
//! forgotten (by log index, so every replica forgets it at the same entry). A retry older
//! than that is applied again; the registry's commands tolerate it (puts of the same
//! generation change nothing), which is why the bounds can be small.

use std::collections::BTreeMap;

use meshbridge_core::model::{Applied, Rejection};
use serde::{Deserialize, Serialize};

use crate::types::{RequestId, Response};

/// Replies kept per client.
pub const WINDOW: usize = 256;
/// Log entries after which an idle client's session is dropped.
pub const IDLE_ENTRIES: u64 = 200_000;
/// How often (in log entries) idle sessions are swept.
const SWEEP_EVERY: u64 = 1_024;

/// What a write answered: the revision after it, or its refusal.
pub type Reply = Result<u64, Rejection>;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// Log index of the client's last write.
    pub last_index: u64,
    pub replies: BTreeMap<u64, Reply>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sessions {
    pub clients: BTreeMap<u64, Session>,
}

impl Sessions {
    /// The reply to `id` if it was applied already. A repeated write answers the revision it
    /// produced then, with no changes (it changes nothing now).
    pub fn replay(&self, id: &RequestId) -> Option<Response> {
        let reply = self.clients.get(&id.client)?.replies.get(&id.seq)?;
        Some(reply.clone().map(|revision| Applied {
            revision,
            changes: Vec::new(),
        }))
    }

    /// Records the reply to `id`, applied at log `index`.
    pub fn record(&mut self, id: &RequestId, index: u64, response: &Response) {
        let session = self.clients.entry(id.client).or_default();
        session.last_index = index;
        let reply = match response {
            Ok(applied) => Ok(applied.revision),
            Err(rejection) => Err(rejection.clone()),
        };
        session.replies.insert(id.seq, reply);
        while session.replies.len() > WINDOW {
            session.replies.pop_first();
        }
    }

    /// Forgets idle clients, every [`SWEEP_EVERY`] entries; `index` is the entry applied.
    pub fn sweep(&mut self, index: u64) {
        if index.is_multiple_of(SWEEP_EVERY) {
            let horizon = index.saturating_sub(IDLE_ENTRIES);
            self.clients.retain(|_, s| s.last_index >= horizon);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(client: u64, seq: u64) -> RequestId {
        RequestId { client, seq }
    }

    #[test]
    fn replays_recent_replies_and_forgets_old_ones() {
        let mut s = Sessions::default();
        let ok: Response = Ok(Applied {
            revision: 7,
            changes: vec![],
        });
        s.record(&id(1, 1), 10, &ok);
        let refused: Response = Err(Rejection::NotFound {
            what: "site".into(),
            name: "x".into(),
        });
        s.record(&id(1, 2), 11, &refused);
        assert_eq!(s.replay(&id(1, 1)), Some(ok));
        assert_eq!(s.replay(&id(1, 2)), Some(refused));
        assert_eq!(s.replay(&id(1, 3)), None);
        assert_eq!(s.replay(&id(2, 1)), None);

        for seq in 3..(3 + WINDOW as u64) {
            s.record(&id(1, seq), 12, &Ok(Applied::default()));
        }
        assert_eq!(s.replay(&id(1, 1)), None, "beyond the window");
        s.sweep(SWEEP_EVERY * 1_000);
        const { assert!(SWEEP_EVERY * 1_000 > IDLE_ENTRIES + 12) };
        assert!(s.clients.is_empty());
    }
}
