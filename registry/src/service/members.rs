//! Status and membership changes.

use std::collections::BTreeSet;

use meshbridge_core::client::endpoint_uri;
use meshbridge_core::model::Rejection;
use meshbridge_core::proto::{self, rejection_to_status};
use openraft::{ChangeMembers, ServerState};
use tonic::{Request, Response, Status};

use crate::error::{ApiError, Attempt, write_error};
use crate::shared::Shared;
use crate::types::{Membership, Node, RaftMetrics};

fn state_name(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "Leader",
        ServerState::Follower => "Follower",
        ServerState::Candidate => "Candidate",
        ServerState::Learner => "Learner",
        ServerState::Shutdown => "Shutdown",
    }
}

/// Every member with its matched index and lag. Only a leader knows the others' matched
/// indexes; elsewhere they are unset, with a lag of 0.
fn members_of(m: &RaftMetrics, membership: &Membership) -> Vec<proto::MemberStatus> {
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let last = m.last_log_index.unwrap_or(0);
    membership
        .nodes()
        .map(|(id, node)| {
            let (matched, lag) = if *id == m.id {
                (m.last_log_index, 0)
            } else {
                match &m.replication {
                    // The leader's view: nothing matched yet means all of it is missing.
                    Some(r) => {
                        let matched = r.get(id).cloned().flatten().map(|l| l.index);
                        (matched, matched.map_or(last, |i| last.saturating_sub(i)))
                    }
                    None => (None, 0),
                }
            };
            proto::MemberStatus {
                node_id: *id,
                url: node.addr.clone(),
                voter: voters.contains(id),
                matched_index: matched,
                lag,
            }
        })
        .collect()
}

/// This node's view of the cluster.
pub async fn status(s: &Shared) -> proto::StatusReply {
    let m = s.raft.metrics().borrow().clone();
    let committed = s
        .raft
        .with_raft_state(|st| st.committed)
        .await
        .ok()
        .flatten();
    let membership = m.membership_config.membership().clone();
    let leader_url = m
        .current_leader
        .and_then(|l| membership.get_node(&l).map(|n| n.addr.clone()))
        .unwrap_or_default();
    proto::StatusReply {
        node_id: m.id,
        leader_id: m.current_leader,
        leader_url,
        term: m.current_term,
        commit_index: committed.map_or(0, |l| l.index),
        last_log_index: m.last_log_index.unwrap_or(0),
        applied_index: m.last_applied.map_or(0, |l| l.index),
        revision: s.feed.revision(),
        state: state_name(m.state).into(),
        members: members_of(&m, &membership),
        snapshot_index: m.snapshot.map_or(0, |l| l.index),
        purged_index: m.purged.map_or(0, |l| l.index),
        millis_since_quorum_ack: m.millis_since_quorum_ack,
        certificates: s.seen.report(&s.identity),
    }
}

fn membership_reply(
    s: &Shared,
    log_index: u64,
    membership: Option<Membership>,
) -> proto::MembershipReply {
    let m = s.raft.metrics().borrow().clone();
    let membership = membership.unwrap_or_else(|| m.membership_config.membership().clone());
    proto::MembershipReply {
        log_index,
        members: members_of(&m, &membership),
    }
}

/// The membership this node knows now.
fn current_membership(s: &Shared) -> Membership {
    s.raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .clone()
}

fn invalid(field: &str, reason: impl Into<String>) -> Status {
    rejection_to_status(&Rejection::Invalid {
        field: field.into(),
        reason: reason.into(),
    })
}

pub async fn add_learner(
    s: &Shared,
    req: Request<proto::AddLearnerRequest>,
) -> Result<Response<proto::MembershipReply>, Status> {
    let r = req.get_ref();
    let (id, url, wait) = (r.node_id, r.url.clone(), r.wait);
    endpoint_uri(&url).map_err(|e| invalid("url", e.reason))?;
    let local = || async {
        let membership = current_membership(s);
        let voter = membership.voter_ids().any(|v| v == id);
        // The same learner at the same URL again is a no-op (a retried call, say).
        if let Some(node) = membership.get_node(&id)
            && (voter || node.addr != url)
        {
            let role = if voter { "a voter" } else { "a learner" };
            return Err(Attempt::Failed(ApiError::Precondition(format!(
                "node {id} is already {role} at {}: remove it first (`ctl members remove {id}`) \
                 to add it again under another URL",
                node.addr
            ))));
        }
        let resp = s
            .raft
            .add_learner(id, Node::new(url.clone()), wait)
            .await
            .map_err(write_error)?;
        tracing::info!(node = id, url = %url, "added learner");
        // openraft's wait returns at once for a learner that never answers: wait here until
        // it has answered the leader, or say that it has not.
        if wait {
            let answered = s
                .raft
                .wait(Some(LEARNER_ANSWER_WAIT))
                .metrics(|m| replicated(m, id).is_some(), "learner answered")
                .await;
            if answered.is_err() {
                return Err(Attempt::Failed(ApiError::Precondition(format!(
                    "node {id} was added as a learner (log index {}), but has not answered the \
                     leader within {} s: check that it runs at {url} and trusts this \
                     registry. It stays a learner until removed (`ctl members remove {id}`)",
                    resp.log_id.index,
                    LEARNER_ANSWER_WAIT.as_secs()
                ))));
            }
        }
        Ok(membership_reply(s, resp.log_id.index, resp.membership))
    };
    s.on_leader("AddLearner", req, local, |mut c, r| async move {
        c.add_learner(r).await
    })
    .await
}

pub async fn promote(
    s: &Shared,
    req: Request<proto::PromoteRequest>,
) -> Result<Response<proto::MembershipReply>, Status> {
    let id = req.get_ref().node_id;
    let local = || async {
        promotable(&s.raft.metrics().borrow(), id)
            .map_err(|e| Attempt::Failed(ApiError::Precondition(e)))?;
        let change = ChangeMembers::AddVoterIds(BTreeSet::from([id]));
        let resp = s
            .raft
            .change_membership(change, false)
            .await
            .map_err(write_error)?;
        tracing::info!(node = id, "promoted to voter");
        Ok(membership_reply(s, resp.log_id.index, resp.membership))
    };
    s.on_leader("Promote", req, local, |mut c, r| async move {
        c.promote(r).await
    })
    .await
}

/// How long `members add` waits for a new learner's first answer.
const LEARNER_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The log index node `id` has replicated, as the leader knows it (`None`: never answered,
/// or this node is not the leader).
fn replicated(m: &RaftMetrics, id: u64) -> Option<u64> {
    m.replication
        .as_ref()
        .and_then(|r| r.get(&id).cloned().flatten())
        .map(|l| l.index)
}

/// A learner lagging more than this many entries is not promoted: writes would wait for
/// it to catch up.
const MAX_PROMOTE_LAG: u64 = 1_000;

/// Why `id` may not become a voter now, if so: not a member, or a learner that has not
/// replicated the log (a voter that never answers makes every write wait for it, and in a
/// one- or two-node registry stops writes for good). Only the leader knows; this runs there.
fn promotable(m: &RaftMetrics, id: u64) -> Result<(), String> {
    let membership = m.membership_config.membership();
    let Some(node) = membership.get_node(&id) else {
        return Err(format!(
            "node {id} is not a member: add it as a learner first (`ctl members add {id} URL`)"
        ));
    };
    if membership.voter_ids().any(|v| v == id) {
        return Ok(());
    }
    let url = &node.addr;
    let matched = replicated(m, id);
    let last = m.last_log_index.unwrap_or(0);
    match matched {
        None => Err(format!(
            "node {id} ({url}) never answered the leader: promoting it would make every write \
             wait for a node that is not there. Start it, wait until `ctl status` shows it \
             caught up, then promote it (or remove it: `ctl members remove {id}`)"
        )),
        Some(i) if last.saturating_sub(i) > MAX_PROMOTE_LAG => Err(format!(
            "node {id} ({url}) is {} entries behind the leader: promote it once it caught up \
             (at most {MAX_PROMOTE_LAG} behind)",
            last.saturating_sub(i)
        )),
        Some(_) => Ok(()),
    }
}

pub async fn remove(
    s: &Shared,
    req: Request<proto::RemoveMemberRequest>,
) -> Result<Response<proto::MembershipReply>, Status> {
    let id = req.get_ref().node_id;
    let local = || async {
        let membership = current_membership(s);
        let change = if membership.voter_ids().any(|v| v == id) {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else if membership.get_node(&id).is_some() {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        } else {
            return Err(Attempt::Failed(ApiError::Rejected(Rejection::NotFound {
                what: "member".into(),
                name: id.to_string(),
            })));
        };
        let resp = s
            .raft
            .change_membership(change, false)
            .await
            .map_err(write_error)?;
        tracing::info!(node = id, "removed from the cluster");
        Ok(membership_reply(s, resp.log_id.index, resp.membership))
    };
    s.on_leader("RemoveMember", req, local, |mut c, r| async move {
        c.remove_member(r).await
    })
    .await
}
