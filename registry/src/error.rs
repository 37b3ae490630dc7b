//! Every way a registry call can fail, and the one place that turns each into a gRPC
//! status ([`From<ApiError> for Status`]). Handlers return [`ApiError`]; the code a client
//! sees (and so whether it retries: `Unavailable` is retried elsewhere, the rest is final)
//! is decided here, not at each call site.

use std::time::Duration;

use meshbridge_core::model::Rejection;
use meshbridge_core::proto::{rejection_code, rejection_to_status};
use tonic::{Code, Status};

use crate::types::NodeId;

#[derive(Clone, Debug, thiserror::Error)]
pub enum ApiError {
    /// The connection carries no verified client certificate; `called` is the method when
    /// the refusal comes before the request is read.
    #[error("no verified client SVID{}", match called {
        Some(path) => format!(": without a certificate only Join is served (called {path})"),
        None => String::new(),
    })]
    NoClientSvid { called: Option<String> },
    /// The caller's identity may not do this; the text names the identity and the rule.
    #[error("{0}")]
    Forbidden(String),
    /// The request itself is malformed (outside the catalog's own validation, which is a
    /// [`ApiError::Rejected`]).
    #[error("{what}: {reason}")]
    BadRequest { what: String, reason: String },
    /// The state machine or a validation refused the write.
    #[error("{0}")]
    Rejected(Rejection),
    /// The request is well formed but this registry cannot serve it as configured or as
    /// its membership stands.
    #[error("{0}")]
    Precondition(String),
    /// The caller holds too many of a per-caller resource.
    #[error("{0}")]
    Quota(String),

    /// No leader was elected within the node's leader wait.
    #[error("no leader elected in {0:?}")]
    NoLeader(Duration),
    /// A forwarded call reached a node that no longer leads (it is never forwarded again).
    #[error("node {node} is not the leader any more (node {leader} is)")]
    NotLeaderAnyMore { node: NodeId, leader: NodeId },
    /// The node led when the call started and lost the leadership before it was done.
    #[error("node {0} lost the leadership")]
    LostLeadership(NodeId),
    /// The leader cannot confirm it still leads.
    #[error("the leader cannot reach a quorum: {0}")]
    NoQuorum(String),
    /// Raft stopped with a fatal error on this node.
    #[error("raft stopped: {0}")]
    RaftStopped(String),
    /// The node is shutting down.
    #[error("the registry is stopping")]
    Stopping,
    /// This node cannot tell whether its replica is current; the caller should use another.
    #[error("{0}")]
    OutOfTouch(String),
    /// A peer node's transport failed.
    #[error("{0}")]
    PeerUnavailable(String),

    /// A bug or a local resource failure (encoding, a file this node needs).
    #[error("{0}")]
    Internal(String),
    /// The method is not served by this implementation.
    #[error("{0} is not served here")]
    Unimplemented(&'static str),
}

impl ApiError {
    pub fn forbidden(text: impl Into<String>) -> Self {
        Self::Forbidden(text.into())
    }

    pub fn bad_request(what: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self::BadRequest {
            what: what.into(),
            reason: reason.to_string(),
        }
    }

    pub fn internal(context: &str, e: impl std::fmt::Display) -> Self {
        Self::Internal(format!("{context}: {e}"))
    }
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> Self {
        Self::Rejected(r)
    }
}

impl ApiError {
    /// The gRPC code a client sees for this error.
    pub fn code(&self) -> Code {
        match self {
            ApiError::NoClientSvid { .. } => Code::Unauthenticated,
            ApiError::Forbidden(_) => Code::PermissionDenied,
            ApiError::BadRequest { .. } => Code::InvalidArgument,
            ApiError::Rejected(r) => rejection_code(r),
            ApiError::Precondition(_) => Code::FailedPrecondition,
            ApiError::Quota(_) => Code::ResourceExhausted,
            ApiError::NoLeader(_)
            | ApiError::NotLeaderAnyMore { .. }
            | ApiError::LostLeadership(_)
            | ApiError::NoQuorum(_)
            | ApiError::RaftStopped(_)
            | ApiError::Stopping
            | ApiError::OutOfTouch(_)
            | ApiError::PeerUnavailable(_) => Code::Unavailable,
            ApiError::Internal(_) => Code::Internal,
            ApiError::Unimplemented(_) => Code::Unimplemented,
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        match e {
            // With the rejection as details, for clients that act on its kind.
            ApiError::Rejected(r) => rejection_to_status(&r),
            other => Status::new(other.code(), other.to_string()),
        }
    }
}

/// How one attempt on the leader went (see [`crate::leader`]).
#[derive(Clone, Debug)]
pub enum Attempt {
    /// This node is not (or no longer) the leader: route again.
    NotLeader,
    /// A final answer for the caller.
    Failed(ApiError),
}

impl<E: Into<ApiError>> From<E> for Attempt {
    fn from(e: E) -> Self {
        Attempt::Failed(e.into())
    }
}

/// A refused membership change in words (openraft's own text shows its log ids' `Debug`).
fn membership_error(e: &openraft::error::ChangeMembershipError<u64>) -> String {
    use openraft::error::ChangeMembershipError;
    match e {
        ChangeMembershipError::InProgress(p) => format!(
            "another membership change is still in progress (its entry at log index {}, \
             committed up to {}): it completes once a quorum of both the old and the new \
             voters has it; `ctl status` shows which members have not answered",
            p.membership_log_id.map_or(0, |l| l.index),
            p.committed.map_or(0, |l| l.index)
        ),
        other => other.to_string(),
    }
}

/// Errors of Raft writes (commands and membership changes) as attempts.
pub fn write_error(e: crate::types::RaftError<crate::types::ClientWriteError>) -> Attempt {
    use openraft::error::ClientWriteError;
    match e {
        crate::types::RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
            Attempt::NotLeader
        }
        crate::types::RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            Attempt::Failed(ApiError::Precondition(membership_error(&e)))
        }
        crate::types::RaftError::Fatal(f) => Attempt::Failed(ApiError::RaftStopped(f.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_membership_change_in_progress_is_said_in_words() {
        let at = |index| {
            Some(openraft::LogId::new(
                openraft::CommittedLeaderId::new(1, 1),
                index,
            ))
        };
        let e = openraft::error::ChangeMembershipError::InProgress(openraft::error::InProgress {
            committed: at(44),
            membership_log_id: at(45),
        });
        let text = membership_error(&e);
        assert!(
            text.contains("log index 45, committed up to 44") && !text.contains("LogId"),
            "{text}"
        );
    }

    #[test]
    fn each_error_has_its_code_and_keeps_its_text() {
        let cases = [
            (
                ApiError::NoClientSvid { called: None },
                Code::Unauthenticated,
                "no verified client SVID",
            ),
            (
                ApiError::NoClientSvid {
                    called: Some("/x/Y".into()),
                },
                Code::Unauthenticated,
                "no verified client SVID: without a certificate only Join is served (called /x/Y)",
            ),
            (
                ApiError::forbidden("spiffe://a/b may not"),
                Code::PermissionDenied,
                "spiffe://a/b may not",
            ),
            (
                ApiError::bad_request("x-request-id", "not ASCII"),
                Code::InvalidArgument,
                "x-request-id: not ASCII",
            ),
            (
                ApiError::Precondition("no ca_dir".into()),
                Code::FailedPrecondition,
                "no ca_dir",
            ),
            (
                ApiError::Quota("16 watches".into()),
                Code::ResourceExhausted,
                "16 watches",
            ),
            (
                ApiError::NoLeader(Duration::from_secs(5)),
                Code::Unavailable,
                "no leader elected in 5s",
            ),
            (
                ApiError::NotLeaderAnyMore { node: 1, leader: 2 },
                Code::Unavailable,
                "node 1 is not the leader any more (node 2 is)",
            ),
            (
                ApiError::LostLeadership(3),
                Code::Unavailable,
                "node 3 lost the leadership",
            ),
            (
                ApiError::RaftStopped("panic".into()),
                Code::Unavailable,
                "raft stopped: panic",
            ),
            (
                ApiError::Stopping,
                Code::Unavailable,
                "the registry is stopping",
            ),
            (
                ApiError::internal("encode reply", "eof"),
                Code::Internal,
                "encode reply: eof",
            ),
            (
                ApiError::Unimplemented("vote"),
                Code::Unimplemented,
                "vote is not served here",
            ),
        ];
        for (error, code, text) in cases {
            let status = Status::from(error);
            assert_eq!((status.code(), status.message()), (code, text));
        }
    }

    #[test]
    fn a_rejection_keeps_its_details_for_the_client() {
        let r = Rejection::NotFound {
            what: "site".into(),
            name: "east".into(),
        };
        let status = Status::from(ApiError::from(r.clone()));
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(
            meshbridge_core::proto::rejection_from_status(&status),
            Some(r)
        );
    }
}
