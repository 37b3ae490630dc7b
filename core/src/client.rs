//! The registry client: mTLS to any registry node, transparent failover between nodes,
//! typed calls, and a watch turned into a local catalog replica.
//!
//! Every node serves the whole API (followers forward writes and linearizable reads to the
//! leader), so the client never needs to know the leader. When a node is unreachable or
//! answers `Unavailable` (no leader yet, leader unreachable), the call moves to the next
//! node after a capped exponential backoff with jitter, until `retry_deadline`; the caller
//! sees an error only when no node could serve the call in that time, or when the registry
//! refused the request ([`ClientError::Rejected`]).
//!
//! Every write carries a request id ([`REQUEST_ID`]: a random client id and a sequence
//! number), the same on each retry: a write retried after an ambiguous failure (the
//! connection dropped after the leader took it) is applied once, and the retry gets the
//! first application's answer (with `changed: false`). The registry keeps the answers of
//! each client's recent writes only; a write retried much later is applied again, which
//! the registry's writes tolerate (the same generation again changes nothing).

mod join;
mod reads;
mod replica;
mod transport;
mod writes;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::model::{EndpointGroup, Rejection, Site, SiteRank};
use crate::proto::{self, registry_client::RegistryClient as Grpc};
use crate::tls::{AllowList, AllowRule, Identity};

pub use join::{Issued, JoinError, JoinToken, anonymous_channel, join};
pub use replica::apply_changes;
pub use transport::{
    ALPN_H2, BadUrl, ChannelOptions, MAX_MESSAGE_BYTES, MtlsConnector, endpoint_uri, lazy_channel,
};

/// Why a registry call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no registry URL given")]
    NoUrls,
    #[error(transparent)]
    BadUrl(#[from] BadUrl),
    /// The registry refused the request; nothing was applied.
    #[error("refused by the registry: {0}")]
    Rejected(Rejection),
    /// A non-retryable status (permission denied, ...).
    #[error("registry {method}: {code:?}: {message}")]
    Status {
        method: &'static str,
        code: Code,
        message: String,
    },
    /// No node could serve the call before the retry deadline.
    #[error(
        "registry {method}: no node answered in {:.1} s ({attempts} attempts); last error: {last}",
        .elapsed.as_secs_f64()
    )]
    Unavailable {
        method: &'static str,
        attempts: u32,
        elapsed: Duration,
        last: String,
    },
    #[error("registry {method}: cannot decode the reply: {source}")]
    Decode {
        method: &'static str,
        source: serde_json::Error,
    },
}

// By hand rather than `#[from]`: the message already carries the rejection, so it is not
// also a `source` (chains printed with `{:#}` would say it twice).
impl From<Rejection> for ClientError {
    fn from(r: Rejection) -> Self {
        ClientError::Rejected(r)
    }
}

impl ClientError {
    /// The gRPC code behind the error, when there is one.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Rejected(r) => Some(proto::rejection_to_status(r).code()),
            ClientError::Status { code, .. } => Some(*code),
            ClientError::Unavailable { .. } => Some(Code::Unavailable),
            _ => None,
        }
    }
}

/// Read consistency.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Consistency {
    /// Confirmed by the leader with a quorum (read index): sees every acknowledged write.
    #[default]
    Linearizable,
    /// Whatever the node that answers has applied; may lag.
    Stale,
}

impl Consistency {
    fn stale(self) -> bool {
        self == Consistency::Stale
    }
}

/// What a write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteResult {
    /// Catalog revision after the write.
    pub revision: u64,
    /// False when the write changed nothing (e.g. the same export again).
    pub changed: bool,
    pub log_index: u64,
}

/// A read answer at a catalog revision.
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned<T> {
    pub revision: u64,
    pub value: T,
}

/// Sites as listed by a node, with that node's clock for staleness.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteList {
    pub revision: u64,
    pub now_ms: u64,
    pub sites: Vec<Site>,
}

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub channel: ChannelOptions,
    /// Time allowed for one attempt on one node.
    pub attempt_timeout: Duration,
    /// Time allowed for a call across all attempts.
    pub retry_deadline: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Server identities accepted; default: `spiffe://<our trust domain>/registry/*`.
    pub registry_ids: Option<AllowList>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            channel: ChannelOptions::default(),
            attempt_timeout: Duration::from_secs(5),
            retry_deadline: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(25),
            backoff_max: Duration::from_secs(1),
            registry_ids: None,
        }
    }
}

struct Node {
    url: String,
    channel: Channel,
}

struct Inner {
    nodes: Vec<Node>,
    /// Random; with `seq`, names each write for exactly-once application.
    client_id: u64,
    seq: AtomicU64,
    /// The node that answered last: tried first.
    preferred: AtomicUsize,
    opts: ClientOptions,
}

/// A registry client. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<&str> = self.inner.nodes.iter().map(|n| n.url.as_str()).collect();
        f.debug_struct("RegistryClient")
            .field("nodes", &urls)
            .finish()
    }
}

/// The allow-list of registry nodes of `identity`'s trust domain.
pub fn registry_allow_list(identity: &Identity) -> AllowList {
    AllowList(vec![AllowRule::Prefix(format!(
        "spiffe://{}/registry/",
        identity.id().trust_domain()
    ))])
}

/// Request metadata identifying one write across its retries (`<client hex>-<seq>`): the
/// registry applies it once, and answers a retry of an applied write from its sessions.
pub const REQUEST_ID: &str = "x-meshbridge-request-id";

/// Response metadata with the leader's URL, set by the registry on calls the leader
/// served: the client sends its next calls there directly.
pub const LEADER_HINT: &str = "x-meshbridge-leader";

fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
    )
}

impl RegistryClient {
    /// A client for the registry nodes at `urls` (`https://host:port`) with default options.
    /// Connections are made on first use, so this succeeds while the registry is down.
    pub async fn connect(urls: &[String], identity: Arc<Identity>) -> Result<Self, ClientError> {
        Self::with_options(urls, identity, ClientOptions::default()).await
    }

    pub async fn with_options(
        urls: &[String],
        identity: Arc<Identity>,
        opts: ClientOptions,
    ) -> Result<Self, ClientError> {
        if urls.is_empty() {
            return Err(ClientError::NoUrls);
        }
        let allow = opts
            .registry_ids
            .clone()
            .unwrap_or_else(|| registry_allow_list(&identity));
        let nodes = urls
            .iter()
            .map(|url| {
                let channel = lazy_channel(url, &identity, allow.clone(), &opts.channel)?;
                Ok(Node {
                    url: url.clone(),
                    channel,
                })
            })
            .collect::<Result<Vec<_>, ClientError>>()?;
        let start = rand::random_range(0..nodes.len());
        Ok(Self {
            inner: Arc::new(Inner {
                nodes,
                client_id: rand::random(),
                seq: AtomicU64::new(0),
                preferred: AtomicUsize::new(start),
                opts,
            }),
        })
    }

    /// The node URLs, in the order given.
    pub fn urls(&self) -> Vec<String> {
        self.inner.nodes.iter().map(|n| n.url.clone()).collect()
    }

    fn grpc(&self, i: usize) -> Grpc<Channel> {
        Grpc::new(self.inner.nodes[i].channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Backoff before attempt `attempt` (1-based): exponential, capped, with full jitter
    /// over its upper half so that clients do not retry in step.
    fn backoff(&self, attempt: u32) -> Duration {
        let o = &self.inner.opts;
        let cap = crate::backoff::exponential(
            o.backoff_initial,
            o.backoff_max,
            attempt.saturating_sub(1),
        );
        let half = cap / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    /// Runs `call` on the preferred node, moving to the next node on retryable failures.
    async fn call<T, F, Fut>(&self, method: &'static str, call: F) -> Result<T, ClientError>
    where
        F: FnMut(Grpc<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_timed(method, self.inner.opts.attempt_timeout, call)
            .await
    }

    /// [`RegistryClient::call`] with its own attempt timeout, for calls that take long by
    /// nature (adding a learner that must catch up first).
    async fn call_timed<T, F, Fut>(
        &self,
        method: &'static str,
        attempt_timeout: Duration,
        mut call: F,
    ) -> Result<T, ClientError>
    where
        F: FnMut(Grpc<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let o = &self.inner.opts;
        let n = self.inner.nodes.len();
        let start = Instant::now();
        let mut node = self.inner.preferred.load(Ordering::Relaxed) % n;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let outcome = tokio::time::timeout(attempt_timeout, call(self.grpc(node))).await;
            let last = match outcome {
                Ok(Ok(reply)) => {
                    let leader = reply
                        .metadata()
                        .get(LEADER_HINT)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|url| self.inner.nodes.iter().position(|n| n.url == url));
                    self.inner
                        .preferred
                        .store(leader.unwrap_or(node), Ordering::Relaxed);
                    return Ok(reply.into_inner());
                }
                Ok(Err(status)) if !retryable(status.code()) => {
                    return Err(status_error(method, status));
                }
                Ok(Err(status)) => format!(
                    "{}: {:?}: {}",
                    self.inner.nodes[node].url,
                    status.code(),
                    status.message()
                ),
                Err(_) => format!(
                    "{}: no answer in {attempt_timeout:?}",
                    self.inner.nodes[node].url
                ),
            };
            tracing::debug!(method, attempt = attempts, error = %last, "registry call failed; trying the next node");
            let elapsed = start.elapsed();
            let pause = self.backoff(attempts);
            if elapsed + pause >= o.retry_deadline {
                return Err(ClientError::Unavailable {
                    method,
                    attempts,
                    elapsed,
                    last,
                });
            }
            node = (node + 1) % n;
            tokio::time::sleep(pause).await;
        }
    }

    /// Sends the write `msg` with a request id of its own, the same on every retry: the
    /// registry applies it once however often it arrives.
    async fn write<T, F, Fut>(
        &self,
        method: &'static str,
        msg: T,
        send: F,
    ) -> Result<WriteResult, ClientError>
    where
        T: Clone,
        F: Fn(Grpc<Channel>, tonic::Request<T>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<proto::WriteReply>, Status>>,
    {
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let id = format!("{:016x}-{seq}", self.inner.client_id);
        let id = tonic::metadata::MetadataValue::try_from(id.as_str()).map_err(|_| {
            ClientError::Status {
                method,
                code: Code::Internal,
                message: format!("request id {id:?} is not a header value"),
            }
        })?;
        let r = self
            .call(method, |c| {
                let mut req = tonic::Request::new(msg.clone());
                req.metadata_mut().insert(REQUEST_ID, id.clone());
                send(c, req)
            })
            .await?;
        Ok(WriteResult {
            revision: r.revision,
            changed: r.changed,
            log_index: r.log_index,
        })
    }
}

fn status_error(method: &'static str, status: Status) -> ClientError {
    match proto::rejection_from_status(&status) {
        Some(r) => ClientError::Rejected(r),
        None => ClientError::Status {
            method,
            code: status.code(),
            message: status.message().to_owned(),
        },
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    method: &'static str,
    bytes: &[u8],
) -> Result<T, ClientError> {
    serde_json::from_slice(bytes).map_err(|source| ClientError::Decode { method, source })
}

/// Ranked endpoint groups of a service, best first.
pub type Ranked = Vec<(SiteRank, EndpointGroup)>;
