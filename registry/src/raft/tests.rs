//! The AppendEntries stream against stand-in peers over real gRPC and mTLS: a peer of
//! an older version (no stream: the leader must fall back to unary calls) and one that
//! ends its streams (the leader must open a new one).
use std::sync::atomic::{AtomicUsize, Ordering};

use meshbridge_core::client::registry_allow_list;
use meshbridge_core::id::SpiffeId;
use meshbridge_core::pki::Ca;
use meshbridge_core::proto::raft_server::{Raft, RaftServer};
use meshbridge_core::tls::{Identity, IdentityFiles};
use openraft::{CommittedLeaderId, LogId, Vote};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Streaming};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use meshbridge_core::proto;
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use tonic::Status;

use super::client::PeerClient;
use super::server::AppendStream;
use super::wire::EARLY_APPEND_HEADER;
use super::{Network, Peers};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

use super::client::Lane;
use crate::metrics::{EarlyMetrics, PeerLabel};
use crate::store::EarlyAppend;
use crate::types::{AppendEntriesRequest, AppendEntriesResponse, Entry, Node};

const TD: &str = "test.example";
const DAY: Duration = Duration::from_secs(86_400);

/// Answers every AppendEntries with `PartialSuccess(leader_commit)`, so a reply shows
/// which request it answers, except early appends with entries: `Success`. Streams end after `per_stream` requests; `None`: no
/// stream (UNIMPLEMENTED), as a node of an older version answers. `early_header`: its
/// streams announce that they take early appends (answered like any other request).
struct Peer {
    per_stream: Option<usize>,
    early_header: bool,
    /// Marks every stream reply early, as a broken peer might.
    marks_all_early: bool,
    unary: Arc<AtomicUsize>,
    streams: Arc<AtomicUsize>,
    /// Entries received in early appends.
    early_entries: Arc<AtomicUsize>,
    /// Requests received on streams, early appends not counted.
    stream_requests: Arc<AtomicUsize>,
}

fn answer(m: &proto::RaftMessage, early_entries: &AtomicUsize) -> Result<proto::RaftReply, Status> {
    let req: AppendEntriesRequest =
        serde_json::from_slice(&m.json).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let resp = if m.early {
        early_entries.fetch_add(req.entries.len(), Ordering::SeqCst);
        if req.entries.is_empty() {
            AppendEntriesResponse::PartialSuccess(req.leader_commit)
        } else {
            AppendEntriesResponse::Success
        }
    } else {
        AppendEntriesResponse::PartialSuccess(req.leader_commit)
    };
    let ok = serde_json::to_vec(&resp).map_err(|e| Status::internal(e.to_string()))?;
    Ok(proto::RaftReply {
        result: Some(proto::raft_reply::Result::Ok(ok)),
        early: m.early,
    })
}

#[tonic::async_trait]
impl Raft for Peer {
    async fn append_entries(
        &self,
        req: Request<proto::RaftMessage>,
    ) -> Result<Response<proto::RaftReply>, Status> {
        self.unary.fetch_add(1, Ordering::SeqCst);
        answer(req.get_ref(), &self.early_entries).map(Response::new)
    }

    type AppendStreamStream = AppendStream;

    async fn append_stream(
        &self,
        req: Request<Streaming<proto::RaftMessage>>,
    ) -> Result<Response<AppendStream>, Status> {
        let Some(per_stream) = self.per_stream else {
            return Err(Status::unimplemented("no AppendStream here"));
        };
        self.streams.fetch_add(1, Ordering::SeqCst);
        let counters = (self.early_entries.clone(), self.stream_requests.clone());
        let marks_all_early = self.marks_all_early;
        let replies = futures::stream::unfold(
            (req.into_inner(), per_stream, counters),
            move |(mut inbound, left, counters)| async move {
                if left == 0 {
                    return None;
                }
                let m = inbound.message().await.ok()??;
                if !m.early {
                    counters.1.fetch_add(1, Ordering::SeqCst);
                }
                let reply = answer(&m, &counters.0).map(|mut r| {
                    r.early |= marks_all_early;
                    r
                });
                Some((reply, (inbound, left - 1, counters)))
            },
        );
        let mut response = Response::new(Box::pin(replies) as AppendStream);
        if self.early_header {
            response.metadata_mut().insert(
                EARLY_APPEND_HEADER,
                tonic::metadata::MetadataValue::from_static("1"),
            );
        }
        Ok(response)
    }

    async fn vote(
        &self,
        _: Request<proto::RaftMessage>,
    ) -> Result<Response<proto::RaftReply>, Status> {
        Err(Status::unimplemented("vote"))
    }

    async fn install_snapshot(
        &self,
        _: Request<proto::RaftMessage>,
    ) -> Result<Response<proto::RaftReply>, Status> {
        Err(Status::unimplemented("install_snapshot"))
    }
}

struct Setup {
    client: PeerClient,
    unary: Arc<AtomicUsize>,
    streams: Arc<AtomicUsize>,
    early_entries: Arc<AtomicUsize>,
    stream_requests: Arc<AtomicUsize>,
    early: EarlyMetrics,
    network: Network,
    node: Node,
    _stop: tokio_util::sync::DropGuard,
    _dir: tempfile::TempDir,
}

async fn setup(per_stream: Option<usize>) -> Setup {
    setup_with(per_stream, false).await
}

async fn setup_with(per_stream: Option<usize>, early_header: bool) -> Setup {
    setup_peer(per_stream, early_header, false).await
}

async fn setup_peer(per_stream: Option<usize>, early_header: bool, marks_all_early: bool) -> Setup {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = Ca::generate(TD, DAY).expect("CA");
    let identity = |n: u64| {
        let id = SpiffeId::parse(&format!("spiffe://{TD}/registry/{n}")).expect("id");
        let path = dir.path().join(n.to_string());
        ca.issue(&id, DAY, &[])
            .expect("issue")
            .write_to(&path)
            .expect("write");
        Identity::load(IdentityFiles::in_dir(path)).expect("identity")
    };
    let (leader, peer) = (identity(1), identity(2));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let incoming = crate::listener::incoming(
        listener,
        &peer,
        registry_allow_list(&peer),
        stop.clone(),
        CancellationToken::new(),
    );
    let (unary, streams) = (Arc::default(), Arc::default());
    let (early_entries, stream_requests) = (Arc::default(), Arc::default());
    let service = RaftServer::new(Peer {
        per_stream,
        early_header,
        marks_all_early,
        unary: Arc::clone(&unary),
        streams: Arc::clone(&streams),
        early_entries: Arc::clone(&early_entries),
        stream_requests: Arc::clone(&stream_requests),
    });
    let shutdown = stop.clone().cancelled_owned();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, shutdown),
    );
    let early = EarlyMetrics::default();
    let peers = Peers::new(1, leader, BTreeMap::new(), early.clone());
    let times: Family<PeerLabel, Histogram> = Family::new_with_constructor(|| {
        Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            0.001, 2.0, 4,
        ))
    });
    let mut network = Network::new(peers, times);
    let node = Node {
        addr: format!("https://{addr}"),
    };
    Setup {
        client: network.new_client(2, &node).await,
        network,
        node,
        unary,
        streams,
        early_entries,
        stream_requests,
        early,
        _stop: stop.drop_guard(),
        _dir: dir,
    }
}

/// Sends AppendEntries with `leader_commit` index `i`; the reply's index, or the error.
async fn append(client: &mut PeerClient, i: u64) -> Result<u64, String> {
    let log_id = LogId::new(CommittedLeaderId::new(1, 1), i);
    let rpc = AppendEntriesRequest {
        vote: Vote::new_committed(1, 1),
        prev_log_id: None,
        entries: vec![],
        leader_commit: Some(log_id),
    };
    match client
        .append_entries(rpc, RPCOption::new(Duration::from_secs(5)))
        .await
    {
        Ok(AppendEntriesResponse::PartialSuccess(Some(got))) => Ok(got.index),
        Ok(other) => Err(format!("unexpected reply {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::test]
async fn a_peer_without_the_stream_gets_unary_calls() {
    let mut s = setup(None).await;
    for i in 1..=4 {
        assert_eq!(append(&mut s.client, i).await, Ok(i));
    }
    // The stream was tried once; every request went as a unary call.
    assert!(matches!(s.client.lane, Lane::Unsupported));
    assert_eq!(s.unary.load(Ordering::SeqCst), 4);
    assert_eq!(s.streams.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn replies_follow_requests_and_an_ended_stream_is_reopened() {
    let mut s = setup(Some(3)).await;
    let mut results = Vec::new();
    for i in 1..=8 {
        results.push(append(&mut s.client, i).await.map_err(|_| ()));
    }
    // Three answered per stream, then the fourth request finds the stream ended (an
    // error openraft retries) and the next one opens a new stream.
    let ok = |i| Ok::<u64, ()>(i);
    assert_eq!(
        results,
        vec![ok(1), ok(2), ok(3), Err(()), ok(5), ok(6), ok(7), Err(())]
    );
    assert_eq!(s.streams.load(Ordering::SeqCst), 2);
    assert_eq!(s.unary.load(Ordering::SeqCst), 0);
}

/// Three blank entries of node 1's term 1 from index `from`.
fn blanks(from: u64) -> Vec<Entry> {
    (from..from + 3)
        .map(|i| Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), i),
            payload: openraft::EntryPayload::Blank,
        })
        .collect()
}

#[tokio::test]
async fn early_appends_ride_the_stream_and_their_replies_are_not_taken_for_others() {
    let mut s = setup_with(Some(100), true).await;
    let vote = Vote::new_committed(1, 1);
    // No stream yet: nothing to put them on.
    s.client.peers.send(&vote, None, &blanks(1));
    assert_eq!(append(&mut s.client, 1).await, Ok(1));
    // The stream is open: early appends go on it, in openraft's request format (the
    // stand-in decodes them), and their replies (which would read as "nothing
    // matched") do not answer the next request.
    for round in 0..3 {
        s.client.peers.send(&vote, None, &blanks(round * 3 + 1));
    }
    assert_eq!(append(&mut s.client, 2).await, Ok(2));
    assert_eq!(append(&mut s.client, 3).await, Ok(3));
    assert_eq!(s.early_entries.load(Ordering::SeqCst), 9);
    assert_eq!(s.early.sent.get_or_create(&PeerLabel { peer: 2 }).get(), 3);
    assert_eq!(s.streams.load(Ordering::SeqCst), 1);

    // openraft also makes short-lived clients to the same peer (a linearizable read's
    // heartbeat round): one coming and going leaves the first stream taking them.
    let mut passing = s.network.new_client(2, &s.node).await;
    assert_eq!(append(&mut passing, 20).await, Ok(20));
    assert_eq!(s.streams.load(Ordering::SeqCst), 2);
    drop(passing);
    s.client.peers.send(&vote, None, &blanks(20));
    assert_eq!(append(&mut s.client, 4).await, Ok(4));
    assert_eq!(s.early_entries.load(Ordering::SeqCst), 12);
    assert_eq!(s.early.sent.get_or_create(&PeerLabel { peer: 2 }).get(), 4);

    // Once the replication client is gone, its stream takes no more.
    let peers = Arc::clone(&s.client.peers);
    drop(s.client);
    peers.send(&vote, None, &blanks(10));
    assert_eq!(s.early.sent.get_or_create(&PeerLabel { peer: 2 }).get(), 4);
}

#[tokio::test]
async fn a_stream_that_does_not_announce_early_appends_gets_none() {
    let mut s = setup_with(Some(100), false).await;
    let vote = Vote::new_committed(1, 1);
    assert_eq!(append(&mut s.client, 1).await, Ok(1));
    s.client.peers.send(&vote, None, &blanks(1));
    assert_eq!(append(&mut s.client, 2).await, Ok(2));
    assert_eq!(s.early_entries.load(Ordering::SeqCst), 0);
    assert_eq!(s.early.sent.get_or_create(&PeerLabel { peer: 2 }).get(), 0);
}

/// Sends AppendEntries of `entries` after `prev` (no commit index); the reply, or the
/// error.
async fn replicate(
    client: &mut PeerClient,
    prev: Option<u64>,
    entries: Vec<Entry>,
) -> Result<AppendEntriesResponse, String> {
    replicate_committed(client, prev, entries, None).await
}

/// As [`replicate`], with commit index `commit`.
async fn replicate_committed(
    client: &mut PeerClient,
    prev: Option<u64>,
    entries: Vec<Entry>,
    commit: Option<u64>,
) -> Result<AppendEntriesResponse, String> {
    let id = |i| LogId::new(CommittedLeaderId::new(1, 1), i);
    let rpc = AppendEntriesRequest {
        vote: Vote::new_committed(1, 1),
        prev_log_id: prev.map(id),
        entries,
        leader_commit: commit.map(id),
    };
    client
        .append_entries(rpc, RPCOption::new(Duration::from_secs(5)))
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn the_same_request_answered_early_with_success_is_not_sent_again() {
    let mut s = setup_with(Some(100), true).await;
    let vote = Vote::new_committed(1, 1);
    let answered = |s: &Setup| s.early.answered.get_or_create(&PeerLabel { peer: 2 }).get();
    assert_eq!(append(&mut s.client, 1).await, Ok(1));
    assert_eq!(s.stream_requests.load(Ordering::SeqCst), 1);

    // Entries 1..=3 after nothing, then 4..=6 after 3, sent early; the stand-in
    // answers both with success.
    s.client.peers.send(&vote, None, &blanks(1));
    let prev = Some(LogId::new(CommittedLeaderId::new(1, 1), 3));
    s.client.peers.send(&vote, prev, &blanks(4));

    // openraft's request for the first: answered by the early reply, not sent.
    let got = replicate(&mut s.client, None, blanks(1)).await;
    assert!(matches!(got, Ok(AppendEntriesResponse::Success)), "{got:?}");
    assert_eq!(s.stream_requests.load(Ordering::SeqCst), 1);
    assert_eq!(answered(&s), 1);

    // A request for the second that differs (another previous entry): sent, and
    // answered by the stand-in; the early answer does not stand in for it.
    let got = replicate(&mut s.client, Some(2), blanks(4)).await;
    assert!(
        matches!(got, Ok(AppendEntriesResponse::PartialSuccess(None))),
        "{got:?}"
    );
    assert_eq!(s.stream_requests.load(Ordering::SeqCst), 2);

    // The matching one for the second is still answered from the early reply.
    let got = replicate(&mut s.client, Some(3), blanks(4)).await;
    assert!(matches!(got, Ok(AppendEntriesResponse::Success)), "{got:?}");
    assert_eq!(s.stream_requests.load(Ordering::SeqCst), 2);
    assert_eq!(answered(&s), 2);

    // Two early appends, and openraft's one request for both: answered by the chain.
    let prev = Some(LogId::new(CommittedLeaderId::new(1, 1), 6));
    s.client.peers.send(&vote, prev, &blanks(7));
    let prev = Some(LogId::new(CommittedLeaderId::new(1, 1), 9));
    s.client.peers.send(&vote, prev, &blanks(10));
    let both = [blanks(7), blanks(10)].concat();
    let got = replicate(&mut s.client, Some(6), both).await;
    assert!(matches!(got, Ok(AppendEntriesResponse::Success)), "{got:?}");
    assert_eq!(s.stream_requests.load(Ordering::SeqCst), 2);
    assert_eq!(answered(&s), 3);

    // Early appends that do not cover the request's entries exactly: sent.
    let prev = Some(LogId::new(CommittedLeaderId::new(1, 1), 12));
    s.client.peers.send(&vote, prev, &blanks(13));
    let got = replicate(&mut s.client, Some(12), blanks(13)[..2].to_vec()).await;
    assert!(
        matches!(got, Ok(AppendEntriesResponse::PartialSuccess(None))),
        "{got:?}"
    );
    assert_eq!(s.stream_requests.load(Ordering::SeqCst), 3);

    // The same entries sent early, but the request carries a newer commit index than
    // the early one did (committed meanwhile): sent, so that the follower learns it.
    let prev = Some(LogId::new(CommittedLeaderId::new(1, 1), 16));
    s.client.peers.send(&vote, prev, &blanks(17));
    let got = replicate_committed(&mut s.client, Some(16), blanks(17), Some(19)).await;
    assert!(
        matches!(got, Ok(AppendEntriesResponse::PartialSuccess(Some(_)))),
        "{got:?}"
    );
    assert_eq!(s.stream_requests.load(Ordering::SeqCst), 4);

    // Nothing sent early for these: sent.
    let got = replicate(&mut s.client, Some(19), blanks(20)).await;
    assert!(
        matches!(got, Ok(AppendEntriesResponse::PartialSuccess(None))),
        "{got:?}"
    );
    assert_eq!(s.stream_requests.load(Ordering::SeqCst), 5);
    assert_eq!(answered(&s), 3);
}

#[tokio::test]
async fn an_early_reply_to_nothing_sent_early_is_an_error_and_the_stream_is_reopened() {
    let mut s = setup_peer(Some(100), true, true).await;
    for _ in 0..2 {
        let got = append(&mut s.client, 1).await;
        assert!(
            got.as_ref()
                .is_err_and(|e| e.contains("a reply to an early append that was not sent")),
            "{got:?}"
        );
        assert!(matches!(s.client.lane, Lane::Closed));
    }
    // Each call opened a new stream: the broken one was not reused.
    assert_eq!(s.streams.load(Ordering::SeqCst), 2);
}
