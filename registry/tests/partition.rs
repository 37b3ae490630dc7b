//! Partitions through fault proxies between nodes: the majority side elects and serves,
//! the isolated old leader refuses linearizable reads and writes (and what it was asked to
//! write is lost, never acknowledged), and after healing every node converges.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use meshbridge_core::client::{ClientOptions, Consistency, RegistryClient};
use meshbridge_registry::types::NodeId;
use support::{Cluster, export, key, spec, visible};
use tonic::Code;

const T: Duration = Duration::from_secs(20);

async fn majority_leader(cluster: &Cluster, without: NodeId) -> NodeId {
    let deadline = Instant::now() + T;
    loop {
        let views: Vec<Option<NodeId>> = cluster
            .nodes
            .iter()
            .filter(|(id, _)| **id != without)
            .map(|(_, n)| n.raft_metrics().current_leader)
            .collect();
        if let Some(Some(l)) = views.first()
            && *l != without
            && views.iter().all(|v| *v == Some(*l))
        {
            return *l;
        }
        assert!(
            Instant::now() < deadline,
            "majority elected nobody: {views:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn client_of(cluster: &Cluster, nodes: &[NodeId], deadline: Duration) -> RegistryClient {
    let urls: Vec<String> = nodes.iter().map(|id| cluster.url(*id)).collect();
    let opts = ClientOptions {
        attempt_timeout: Duration::from_secs(1),
        retry_deadline: deadline,
        ..ClientOptions::default()
    };
    RegistryClient::with_options(&urls, cluster.pki.ctl(), opts)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn isolated_leader_refuses_while_the_majority_serves_and_heal_converges() {
    let cluster = Cluster::start_with_links(3, |_| {}).await;
    let admin = cluster.admin().await;
    admin
        .register_site(&spec("east", "eu", "eu-1a"))
        .await
        .unwrap();
    admin
        .put_export(&export("east", "before", 1, &["10.0.0.1"]))
        .await
        .unwrap();

    let old = cluster.wait_leader(T).await;
    let others: Vec<NodeId> = (1..=3).filter(|id| *id != old).collect();

    // A watcher on the leader-to-be-isolated (a write teaches the client the leader).
    let watcher = client_of(&cluster, &[old, others[0], others[1]], T).await;
    let w0 = watcher
        .put_export(&export("east", "watched", 1, &["10.0.0.5"]))
        .await
        .unwrap();
    let mut replica = watcher.clone().watch_catalog();
    tokio::time::timeout(T, replica.wait_for(|c| c.revision >= w0.revision))
        .await
        .unwrap()
        .unwrap();

    let links = cluster.links.as_ref().unwrap();
    links.isolate(old);
    let new = majority_leader(&cluster, old).await;
    assert_ne!(new, old);

    // The majority serves writes and linearizable reads.
    let majority = client_of(&cluster, &others, T).await;
    let w = majority
        .put_export(&export("east", "during", 1, &["10.0.0.2"]))
        .await
        .unwrap();
    let seen = majority
        .get_service(&key("during"), Consistency::Linearizable)
        .await
        .unwrap();
    assert!(seen.value.is_some());

    // The isolated node ends its watch streams once it knows it is out of touch: the
    // watcher moves to the majority and sees the new write, instead of stalling silently.
    let moved = tokio::time::timeout(T, replica.wait_for(|c| c.revision >= w.revision)).await;
    assert!(moved.is_ok(), "the watcher stayed on the isolated node");

    // The isolated node refuses both: it cannot reach a quorum.
    let minority = client_of(&cluster, &[old], Duration::from_secs(3)).await;
    let err = minority
        .put_export(&export("east", "lost", 1, &["10.0.0.3"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    let err = minority
        .get_service(&key("before"), Consistency::Linearizable)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    // A stale read is answered, from what the isolated node has.
    let stale = minority
        .get_service(&key("during"), Consistency::Stale)
        .await
        .unwrap();
    assert!(
        stale.value.is_none(),
        "the isolated node saw a write it cannot have"
    );

    // Heal: everyone converges on the majority's history; the refused write is gone.
    links.heal();
    cluster.wait_revision(w.revision, T).await;
    let leader = cluster.wait_leader(T).await;
    let truth = admin.catalog(Consistency::Linearizable).await.unwrap();
    cluster.wait_revision(truth.revision, T).await;
    for (id, node) in &cluster.nodes {
        assert_eq!(
            visible(&node.catalog()),
            visible(&truth),
            "node {id} (leader {leader})"
        );
    }
    assert!(truth.export(&key("lost"), "east").is_none());
    assert!(truth.export(&key("during"), "east").is_some());
    let healed = client_of(&cluster, &[old], T).await;
    healed
        .put_export(&export("east", "after", 1, &["10.0.0.4"]))
        .await
        .unwrap();
    cluster.shutdown().await;
}
