//! The aggregated discovery service (ADS, state of the world): one gRPC stream per client
//! carrying every resource type, per the xDS protocol:
//!
//! - a request names a type and (for EDS) the resources it wants; CDS and LDS are wildcard;
//! - each response has a version (of its content) and a nonce (new per response);
//! - a request carrying the last nonce of its type is an ACK, or a NACK when it carries an
//!   `error_detail` (logged with the client's node id, counted); one with an older nonce is
//!   stale and ignored;
//! - a change of the snapshot pushes every subscribed type whose content changed;
//! - a client that reconnects gets the current state: nothing is kept per client between
//!   streams.
//!
//! Incremental (delta) ADS is served too: per type, the subscribed names (or wildcard) and
//! the version of each resource the client holds (its `initial_resource_versions` after a
//! reconnect); a change sends only the resources whose version moved and the names of those
//! that are gone. With many services this is what keeps a push small: state of the world
//! re-sends every endpoint set on every change.

use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use super::Stats;
use super::resources::{CLUSTER, LISTENER, Snapshot};

/// Responses queued per stream before the stream task waits for the client.
const QUEUE: usize = 16;

pub struct Ads {
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub stats: Arc<Stats>,
    pub stop: CancellationToken,
}

type ResponseStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = ResponseStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "-".to_string(), |a| a.to_string());
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(QUEUE);
        let stream = Session {
            snapshot: self.snapshot.clone(),
            stats: self.stats.clone(),
            subscriptions: HashMap::new(),
            node: String::new(),
            peer,
            nonces: 0,
            tx,
        };
        tokio::spawn(stream.run(inbound, self.stop.clone()));
        let out = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "-".to_string(), |a| a.to_string());
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(QUEUE);
        let session = DeltaSession {
            snapshot: self.snapshot.clone(),
            stats: self.stats.clone(),
            subscriptions: HashMap::new(),
            node: String::new(),
            peer,
            nonces: 0,
            tx,
        };
        tokio::spawn(session.run(inbound, self.stop.clone()));
        let out = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(Response::new(Box::pin(out)))
    }
}

/// What one stream has asked for and been sent, per type.
#[derive(Default)]
struct Subscription {
    /// `None`: every resource of the type (wildcard).
    names: Option<Vec<String>>,
    /// Version and nonce of the last response sent.
    sent: Option<(String, String)>,
}

struct Session {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    stats: Arc<Stats>,
    subscriptions: HashMap<String, Subscription>,
    /// The client's node id (sent in its first request).
    node: String,
    peer: String,
    nonces: u64,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
}

impl Session {
    async fn run(mut self, mut inbound: Streaming<DiscoveryRequest>, stop: CancellationToken) {
        self.stats.clients.inc();
        loop {
            tokio::select! {
                req = inbound.message() => match req {
                    Ok(Some(req)) => {
                        if self.request(req).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        debug!(node = %self.node, peer = %self.peer, error = %status, "xds stream ended");
                        break;
                    }
                },
                changed = self.snapshot.changed() => {
                    if changed.is_err() || self.push_changes().await.is_err() {
                        break;
                    }
                }
                _ = stop.cancelled() => break,
            }
        }
        self.stats.clients.dec();
        info!(node = %self.node, peer = %self.peer, "xds client gone");
    }

    async fn request(&mut self, req: DiscoveryRequest) -> Result<(), Closed> {
        if let Some(node) = &req.node
            && self.node.is_empty()
        {
            self.node = node.id.clone();
            info!(node = %self.node, cluster = %node.cluster, peer = %self.peer, "xds client connected");
        }
        let type_url = req.type_url.clone();
        if !Snapshot::serves(&type_url) {
            debug!(node = %self.node, %type_url, "xds: type not served; ignored");
            return Ok(());
        }
        let sub = self.subscriptions.entry(type_url.clone()).or_default();
        if let Some((_, nonce)) = &sub.sent
            && !req.response_nonce.is_empty()
            && &req.response_nonce != nonce
        {
            // Answers an older response: superseded by one already sent.
            return Ok(());
        }
        if let Some(error) = &req.error_detail {
            self.stats.nack(&type_url);
            warn!(
                node = %self.node, peer = %self.peer, %type_url,
                rejected_version = sub.sent.as_ref().map_or("", |(v, _)| v.as_str()),
                kept_version = %req.version_info,
                error = %error.message,
                "xds client rejected a response (NACK)"
            );
            self.stats.last_nack(&self.node, &type_url, &error.message);
            return Ok(());
        }
        if !req.response_nonce.is_empty() {
            self.stats.ack(&type_url);
        }
        let wildcard = type_url == CLUSTER || type_url == LISTENER;
        let names = (!wildcard || !req.resource_names.is_empty()).then(|| {
            let mut n = req.resource_names.clone();
            n.sort();
            n.dedup();
            n
        });
        let renamed = sub.names != names;
        sub.names = names;
        if sub.sent.is_none() || renamed {
            return self.send(&type_url, true).await;
        }
        // An ACK of the current response: nothing new unless the content moved on since.
        self.send(&type_url, false).await
    }

    /// Push every subscribed type whose content changed.
    async fn push_changes(&mut self) -> Result<(), Closed> {
        let types: Vec<String> = self.subscriptions.keys().cloned().collect();
        for type_url in types {
            self.send(&type_url, false).await?;
        }
        Ok(())
    }

    /// Send the current resources of `type_url` if they differ from the last sent (or
    /// always, with `force`).
    async fn send(&mut self, type_url: &str, force: bool) -> Result<(), Closed> {
        let snapshot = self.snapshot.borrow_and_update().clone();
        let Some(sub) = self.subscriptions.get_mut(type_url) else {
            return Ok(());
        };
        let (version, resources) = snapshot.select(type_url, sub.names.as_deref());
        if !force && sub.sent.as_ref().is_some_and(|(v, _)| *v == version) {
            return Ok(());
        }
        self.nonces += 1;
        let nonce = self.nonces.to_string();
        sub.sent = Some((version.clone(), nonce.clone()));
        debug!(node = %self.node, %type_url, %version, resources = resources.len(), "xds push");
        self.stats.push(type_url);
        let response = DiscoveryResponse {
            version_info: version,
            resources,
            type_url: type_url.to_string(),
            nonce,
            ..Default::default()
        };
        self.tx.send(Ok(response)).await.map_err(|_| Closed)
    }
}

/// The client's side of the stream is gone.
struct Closed;

/// Incremental (delta) xDS, per type: what the client subscribed to and which version of
/// each resource it holds, so a change sends only the resources that changed and the names
/// of those that are gone.
#[derive(Default)]
struct DeltaSubscription {
    wildcard: bool,
    names: std::collections::BTreeSet<String>,
    /// Resource name → the version the client holds.
    held: HashMap<String, String>,
}

struct DeltaSession {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    stats: Arc<Stats>,
    subscriptions: HashMap<String, DeltaSubscription>,
    node: String,
    peer: String,
    nonces: u64,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
}

impl DeltaSession {
    async fn run(mut self, mut inbound: Streaming<DeltaDiscoveryRequest>, stop: CancellationToken) {
        self.stats.clients.inc();
        loop {
            tokio::select! {
                req = inbound.message() => match req {
                    Ok(Some(req)) => {
                        if self.request(req).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        debug!(node = %self.node, peer = %self.peer, error = %status, "delta xds stream ended");
                        break;
                    }
                },
                changed = self.snapshot.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let types: Vec<String> = self.subscriptions.keys().cloned().collect();
                    let mut closed = false;
                    for t in types {
                        if self.send(&t).await.is_err() {
                            closed = true;
                            break;
                        }
                    }
                    if closed {
                        break;
                    }
                }
                _ = stop.cancelled() => break,
            }
        }
        self.stats.clients.dec();
        info!(node = %self.node, peer = %self.peer, "delta xds client gone");
    }

    async fn request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), Closed> {
        if let Some(node) = &req.node
            && self.node.is_empty()
        {
            self.node = node.id.clone();
            info!(node = %self.node, cluster = %node.cluster, peer = %self.peer, "delta xds client connected");
        }
        let type_url = req.type_url.clone();
        if !Snapshot::serves(&type_url) {
            debug!(node = %self.node, %type_url, "xds: type not served; ignored");
            return Ok(());
        }
        if let Some(error) = &req.error_detail {
            self.stats.nack(&type_url);
            warn!(
                node = %self.node, peer = %self.peer, %type_url, nonce = %req.response_nonce,
                error = %error.message,
                "xds client rejected a response (NACK)"
            );
            self.stats.last_nack(&self.node, &type_url, &error.message);
        } else if !req.response_nonce.is_empty() {
            self.stats.ack(&type_url);
        }
        let first = !self.subscriptions.contains_key(&type_url);
        let sub = self.subscriptions.entry(type_url.clone()).or_default();
        if first {
            // What the client already holds (after a reconnect): not sent again if current.
            sub.held = req.initial_resource_versions.clone();
            // CDS and LDS: an empty first subscription is the legacy wildcard.
            sub.wildcard = (type_url == CLUSTER || type_url == LISTENER)
                && req.resource_names_subscribe.is_empty();
        }
        for name in &req.resource_names_subscribe {
            if name == "*" {
                sub.wildcard = true;
            } else {
                sub.names.insert(name.clone());
            }
        }
        for name in &req.resource_names_unsubscribe {
            if name == "*" {
                sub.wildcard = false;
            } else {
                sub.names.remove(name);
            }
            sub.held.remove(name);
        }
        if req.response_nonce.is_empty()
            || !req.resource_names_subscribe.is_empty()
            || !req.resource_names_unsubscribe.is_empty()
        {
            return self.send(&type_url).await;
        }
        // A plain ACK or NACK.
        Ok(())
    }

    /// Send what changed for `type_url` since the client's versions, if anything.
    async fn send(&mut self, type_url: &str) -> Result<(), Closed> {
        let snapshot = self.snapshot.borrow_and_update().clone();
        let Some(sub) = self.subscriptions.get_mut(type_url) else {
            return Ok(());
        };
        let current = snapshot.each(type_url, sub.wildcard, &sub.names);
        let mut resources = Vec::new();
        for (name, (version, any)) in &current {
            if sub.held.get(*name) != Some(version) {
                resources.push(Resource {
                    name: (*name).to_string(),
                    version: version.clone(),
                    resource: Some((*any).clone()),
                    ..Default::default()
                });
            }
        }
        let removed: Vec<String> = sub
            .held
            .keys()
            .filter(|n| !current.contains_key(n.as_str()))
            .cloned()
            .collect();
        if resources.is_empty() && removed.is_empty() {
            return Ok(());
        }
        for r in &resources {
            sub.held.insert(r.name.clone(), r.version.clone());
        }
        for n in &removed {
            sub.held.remove(n);
        }
        self.nonces += 1;
        debug!(node = %self.node, %type_url, changed = resources.len(), removed = removed.len(), "delta xds push");
        self.stats.push(type_url);
        let response = DeltaDiscoveryResponse {
            system_version_info: snapshot.revision.to_string(),
            resources,
            type_url: type_url.to_string(),
            removed_resources: removed,
            nonce: self.nonces.to_string(),
            ..Default::default()
        };
        self.tx.send(Ok(response)).await.map_err(|_| Closed)
    }
}
