//! The early-append ledger, pure: which early appends a follower answered with success,
//! and whether openraft's AppendEntries request is answered by them (no I/O; the client
//! reads the stream and asks again when the ledger says a reply is still to come).

use std::collections::VecDeque;

use crate::types::{AppendEntriesRequest, LogId, Vote};

/// Which request an early append was: openraft's request for the same entries has the same
/// vote, previous and last entry (a leader's entries never change within its term).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EarlyKey {
    pub vote: Vote,
    pub prev: Option<LogId>,
    pub last: LogId,
    /// The commit index it carried.
    pub commit: Option<LogId>,
}

/// Early replies kept for openraft's matching requests; older ones are dropped.
pub const EARLY_ANSWERS: usize = 16;

/// What to do with one of openraft's AppendEntries requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The follower answered early appends of exactly these entries with success (and the
    /// commit index it learnt is not older): that is the answer, nothing is sent.
    Answered,
    /// The chain goes on with an early append whose reply has not been read yet: read the
    /// next reply, then ask again.
    AwaitReply,
    /// Send the request.
    Send,
}

/// The early appends a follower answered with success, oldest first, not yet asked for.
#[derive(Debug, Default)]
pub struct Ledger {
    answered: VecDeque<EarlyKey>,
}

impl Ledger {
    /// The follower answered the early append `key` with success.
    pub fn answered(&mut self, key: EarlyKey) {
        if self.answered.len() == EARLY_ANSWERS {
            self.answered.pop_front();
        }
        self.answered.push_back(key);
    }

    /// Forget everything (the stream closed).
    pub fn clear(&mut self) {
        self.answered.clear();
    }

    /// Whether `rpc` (with entries) is answered: one early append with the same vote,
    /// previous entry and last entry, or a chain of them (openraft may send in one request
    /// what was appended, and sent early, in several). `pending` are early appends sent
    /// whose replies are still to come, in order.
    pub fn verdict<'a>(
        &mut self,
        rpc: &AppendEntriesRequest,
        pending: impl IntoIterator<Item = &'a EarlyKey>,
    ) -> Verdict {
        let Some(last) = rpc.entries.last().map(|e| e.log_id) else {
            return Verdict::Send;
        };
        let link = |k: &EarlyKey, at: Option<LogId>| k.vote == rpc.vote && k.prev == at;
        let mut at = rpc.prev_log_id;
        while let Some(k) = self.answered.iter().find(|k| link(k, at)) {
            if k.last == last {
                // The request also carries the commit index; if it is newer than the
                // follower got early (the entries were committed meanwhile, on another
                // follower's reply), it must go, or this follower would learn it only at
                // the next heartbeat.
                let index = |c: Option<LogId>| c.map(|c| c.index);
                if index(rpc.leader_commit) > index(k.commit) {
                    return Verdict::Send;
                }
                // Older ones will not be asked for: openraft moves forward.
                self.answered.retain(|k| k.last.index > last.index);
                return Verdict::Answered;
            }
            if k.last.index > last.index {
                return Verdict::Send;
            }
            at = Some(k.last);
        }
        if pending.into_iter().any(|k| link(k, at)) {
            Verdict::AwaitReply
        } else {
            Verdict::Send
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::types::Entry;

    fn id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn vote(term: u64) -> Vote {
        Vote::new_committed(term, 1)
    }

    /// An early append of entries `prev+1..=last` in `term`, carrying commit `commit`.
    fn key(term: u64, prev: u64, last: u64, commit: u64) -> EarlyKey {
        let at = |i: u64| (i > 0).then(|| id(term, i));
        EarlyKey {
            vote: vote(term),
            prev: at(prev),
            last: id(term, last),
            commit: at(commit),
        }
    }

    /// openraft's request for entries `prev+1..=last` with commit `commit`.
    fn rpc(term: u64, prev: u64, last: u64, commit: u64) -> AppendEntriesRequest {
        let at = |i: u64| (i > 0).then(|| id(term, i));
        AppendEntriesRequest {
            vote: vote(term),
            prev_log_id: at(prev),
            entries: (prev + 1..=last)
                .map(|i| Entry {
                    log_id: id(term, i),
                    payload: EntryPayload::Blank,
                })
                .collect(),
            leader_commit: at(commit),
        }
    }

    #[test]
    fn verdicts() {
        use Verdict::*;
        // (answered early, pending, openraft's request, verdict, answered keys left)
        type Case = (
            &'static str,
            Vec<EarlyKey>,
            Vec<EarlyKey>,
            AppendEntriesRequest,
            Verdict,
            usize,
        );
        let cases: Vec<Case> = vec![
            (
                "nothing sent early",
                vec![],
                vec![],
                rpc(2, 4, 5, 4),
                Send,
                0,
            ),
            (
                "the same entries, answered",
                vec![key(2, 4, 5, 4)],
                vec![],
                rpc(2, 4, 5, 4),
                Answered,
                0,
            ),
            (
                "a chain of two early appends covers one request",
                vec![key(2, 4, 5, 4), key(2, 5, 7, 4)],
                vec![],
                rpc(2, 4, 7, 4),
                Answered,
                0,
            ),
            (
                "the request's commit index is newer than the early append's",
                vec![key(2, 4, 5, 3)],
                vec![],
                rpc(2, 4, 5, 5),
                Send,
                1,
            ),
            (
                "another term's vote",
                vec![key(3, 4, 5, 4)],
                vec![],
                rpc(2, 4, 5, 4),
                Send,
                1,
            ),
            (
                "another previous entry",
                vec![key(2, 3, 5, 3)],
                vec![],
                rpc(2, 4, 5, 4),
                Send,
                1,
            ),
            (
                "the early append went further than the request",
                vec![key(2, 4, 8, 4)],
                vec![],
                rpc(2, 4, 5, 4),
                Send,
                1,
            ),
            (
                "the chain goes on in an append whose reply is still to come",
                vec![key(2, 4, 5, 4)],
                vec![key(2, 5, 7, 4)],
                rpc(2, 4, 7, 4),
                AwaitReply,
                1,
            ),
            (
                "the reply to come is for the very request",
                vec![],
                vec![key(2, 4, 5, 4)],
                rpc(2, 4, 5, 4),
                AwaitReply,
                0,
            ),
            (
                "a reply to come that does not link",
                vec![],
                vec![key(2, 6, 7, 4)],
                rpc(2, 4, 5, 4),
                Send,
                0,
            ),
            (
                "answering drops the older keys and keeps the newer",
                vec![key(2, 2, 3, 2), key(2, 4, 5, 4), key(2, 5, 6, 4)],
                vec![],
                rpc(2, 4, 5, 4),
                Answered,
                1,
            ),
            (
                "a heartbeat (no entries) is always sent",
                vec![key(2, 4, 5, 4)],
                vec![],
                rpc(2, 5, 5, 5),
                Send,
                1,
            ),
        ];
        for (what, answered, pending, request, want, left) in cases {
            let mut ledger = Ledger::default();
            for k in answered {
                ledger.answered(k);
            }
            assert_eq!(ledger.verdict(&request, &pending), want, "{what}");
            assert_eq!(ledger.answered.len(), left, "{what}: keys left");
        }
    }

    #[test]
    fn only_the_newest_answers_are_kept() {
        let mut ledger = Ledger::default();
        for i in 0..EARLY_ANSWERS as u64 + 4 {
            ledger.answered(key(2, i, i + 1, i));
        }
        assert_eq!(ledger.answered.len(), EARLY_ANSWERS);
        assert_eq!(
            ledger.verdict(&rpc(2, 0, 1, 0), &[]),
            Verdict::Send,
            "dropped"
        );
        assert_eq!(ledger.verdict(&rpc(2, 19, 20, 19), &[]), Verdict::Answered);
        ledger.clear();
        assert_eq!(ledger.verdict(&rpc(2, 18, 19, 18), &[]), Verdict::Send);
    }
}
