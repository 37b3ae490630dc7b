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
use std::future::Future;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use futures::Stream;
use meshbridge_core::model::cut_report_text;
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
        Ok(Response::new(self.open(request, |client, tx| Session {
            client,
            subscriptions: HashMap::new(),
            nonces: 0,
            tx,
        })))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        Ok(Response::new(self.open(request, |client, tx| {
            DeltaSession {
                client,
                subscriptions: HashMap::new(),
                nonces: 0,
                tx,
            }
        })))
    }
}

impl Ads {
    /// Serve one stream of either kind on its own task; the responses it sends.
    fn open<P: Protocol, R: Send + 'static>(
        &self,
        request: Request<Streaming<P::Request>>,
        session: impl FnOnce(Client, mpsc::Sender<Result<R, Status>>) -> P,
    ) -> std::pin::Pin<Box<dyn Stream<Item = Result<R, Status>> + Send>> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "-".to_string(), |a| a.to_string());
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(QUEUE);
        let client = Client {
            snapshot: self.snapshot.clone(),
            id: self.stats.stream_id(),
            stats: self.stats.clone(),
            node: String::new(),
            peer,
        };
        tokio::spawn(run(session(client, tx), inbound, self.stop.clone()));
        Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }))
    }
}

/// What both stream kinds share: the resources, the counters, who the client is.
struct Client {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    stats: Arc<Stats>,
    /// This stream's number (keys its standing NACKs).
    id: u64,
    /// The client's node id (sent in its first request).
    node: String,
    peer: String,
}

impl Client {
    /// Note the node id from the first request that carries one.
    fn hello(&mut self, node: Option<&envoy_types::pb::envoy::config::core::v3::Node>) {
        if let Some(node) = node
            && self.node.is_empty()
        {
            // The client's own words, cut: they go into every log line of the stream.
            self.node = cut_report_text(&node.id).to_string();
            let cluster = cut_report_text(&node.cluster);
            info!(node = %self.node, %cluster, peer = %self.peer, "xds client connected");
        }
    }

    /// Count and log what a request says of the last response: a NACK when it carries an
    /// error, else an ACK when it carries a nonce.
    fn verdict(&self, type_url: &str, nonce: &str, error: Option<&str>, kept_version: &str) {
        if let Some(error) = error {
            let error = cut_report_text(error);
            let (nonce, kept_version) = (cut_report_text(nonce), cut_report_text(kept_version));
            self.stats.nack(type_url);
            warn!(
                node = %self.node, peer = %self.peer, %type_url, %nonce, %kept_version, %error,
                "xds client rejected a response (NACK)"
            );
            self.stats.rejected(self.id, &self.node, type_url, error);
        } else if !nonce.is_empty() {
            self.stats.ack(type_url);
            self.stats.accepted(self.id, type_url);
        }
    }
}

/// One kind of ADS stream (state of the world, or incremental).
trait Protocol: Send + 'static {
    type Request: Send + 'static;
    fn client(&mut self) -> &mut Client;
    fn request(&mut self, req: Self::Request) -> impl Future<Output = Result<(), Closed>> + Send;
    /// The resources changed: send each subscribed type what moved.
    fn push_changes(&mut self) -> impl Future<Output = Result<(), Closed>> + Send;
}

/// Serve one stream until the client or the server goes.
async fn run<P: Protocol>(mut p: P, mut inbound: Streaming<P::Request>, stop: CancellationToken) {
    p.client().stats.clients.inc();
    loop {
        tokio::select! {
            req = inbound.message() => match req {
                Ok(Some(req)) => {
                    if p.request(req).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    let c = p.client();
                    debug!(node = %c.node, peer = %c.peer, error = %status, "xds stream ended");
                    break;
                }
            },
            changed = p.client().snapshot.changed() => {
                if changed.is_err() || p.push_changes().await.is_err() {
                    break;
                }
            }
            _ = stop.cancelled() => break,
        }
    }
    let c = p.client();
    c.stats.clients.dec();
    c.stats.ended(c.id);
    info!(node = %c.node, peer = %c.peer, "xds client gone");
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
    client: Client,
    subscriptions: HashMap<String, Subscription>,
    nonces: u64,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
}

impl Session {
    async fn request(&mut self, req: DiscoveryRequest) -> Result<(), Closed> {
        self.client.hello(req.node.as_ref());
        let type_url = req.type_url.clone();
        if !Snapshot::serves(&type_url) {
            debug!(node = %self.client.node, %type_url, "xds: type not served; ignored");
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
        let error = req.error_detail.as_ref().map(|e| e.message.as_str());
        self.client
            .verdict(&type_url, &req.response_nonce, error, &req.version_info);
        if error.is_some() {
            return Ok(());
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
        let snapshot = self.client.snapshot.borrow_and_update().clone();
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
        debug!(node = %self.client.node, %type_url, %version, resources = resources.len(), "xds push");
        self.client.stats.push(type_url);
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

impl Protocol for Session {
    type Request = DiscoveryRequest;
    fn client(&mut self) -> &mut Client {
        &mut self.client
    }
    fn request(
        &mut self,
        req: DiscoveryRequest,
    ) -> impl Future<Output = Result<(), Closed>> + Send {
        Session::request(self, req)
    }
    fn push_changes(&mut self) -> impl Future<Output = Result<(), Closed>> + Send {
        Session::push_changes(self)
    }
}

impl Protocol for DeltaSession {
    type Request = DeltaDiscoveryRequest;
    fn client(&mut self) -> &mut Client {
        &mut self.client
    }
    fn request(
        &mut self,
        req: DeltaDiscoveryRequest,
    ) -> impl Future<Output = Result<(), Closed>> + Send {
        DeltaSession::request(self, req)
    }
    fn push_changes(&mut self) -> impl Future<Output = Result<(), Closed>> + Send {
        DeltaSession::push_changes(self)
    }
}

/// Most resource names one delta stream may subscribe to per type (far more than a gateway
/// serves: a name per service port).
pub const MAX_DELTA_NAMES: usize = 65_536;

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
    client: Client,
    subscriptions: HashMap<String, DeltaSubscription>,
    nonces: u64,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
}

impl DeltaSession {
    async fn request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), Closed> {
        self.client.hello(req.node.as_ref());
        let type_url = req.type_url.clone();
        if !Snapshot::serves(&type_url) {
            debug!(node = %self.client.node, %type_url, "xds: type not served; ignored");
            return Ok(());
        }
        let error = req.error_detail.as_ref().map(|e| e.message.as_str());
        self.client
            .verdict(&type_url, &req.response_nonce, error, "");
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
        if sub.names.len() > MAX_DELTA_NAMES {
            // Subscriptions add up over a stream's life: without a bound, one client could
            // make the gateway hold (and match every change against) any number of names.
            let count = sub.names.len();
            warn!(
                node = %self.client.node, peer = %self.client.peer, %type_url, count,
                limit = MAX_DELTA_NAMES, "xds client subscribed to too many names; stream closed"
            );
            let status = Status::resource_exhausted(format!(
                "subscribed to {count} names of {type_url}; at most {MAX_DELTA_NAMES} per type \
                 and stream"
            ));
            let _ = self.tx.send(Err(status)).await;
            return Err(Closed);
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

    /// Send every subscribed type what moved.
    async fn push_changes(&mut self) -> Result<(), Closed> {
        let types: Vec<String> = self.subscriptions.keys().cloned().collect();
        for t in types {
            self.send(&t).await?;
        }
        Ok(())
    }

    /// Send what changed for `type_url` since the client's versions, if anything.
    async fn send(&mut self, type_url: &str) -> Result<(), Closed> {
        let snapshot = self.client.snapshot.borrow_and_update().clone();
        let Some(sub) = self.subscriptions.get_mut(type_url) else {
            return Ok(());
        };
        let current = snapshot.each(type_url, sub.wildcard, &sub.names);
        let mut resources = Vec::new();
        for (name, r) in &current {
            if sub.held.get(*name) != Some(&r.version) {
                resources.push(Resource {
                    name: (*name).to_string(),
                    version: r.version.clone(),
                    resource: Some(r.any.clone()),
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
        debug!(node = %self.client.node, %type_url, changed = resources.len(), removed = removed.len(), "delta xds push");
        self.client.stats.push(type_url);
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
