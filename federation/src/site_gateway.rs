//! A gateway serving its site, as `meshbridge gateway` and the VM agent both run one: the
//! gateway, a DNS server answering from the gateway's catalog (so from its persisted
//! snapshot while the registry has not answered since a restart), and the site keeper
//! that registers the site, renews its lease, keeps its exports and reports the gateway's
//! links and xDS rejections with every heartbeat. Stopped in one order
//! ([`SiteGateway::drain`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshbridge_core::client::RegistryClient;
use meshbridge_core::drain::Outcome;
use meshbridge_core::model::{Catalog, SiteSpec};
use meshbridge_core::tls::Identity;
use meshbridge_gateway::{Gateway, GatewayHandle};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::dns::{self, DnsError, DnsHandle, DnsServer};
use crate::site::{self, KeeperStatus, LocalExport};

/// How long DNS may take to finish the queries in flight once the data plane is drained.
const DNS_DRAIN: Duration = Duration::from_secs(1);

/// The site keeper of a [`SiteGateway`]: what it needs besides the gateway.
pub struct Keeper {
    pub client: RegistryClient,
    /// The site's spec, given the gateway's tunnel address (known once it is bound).
    pub spec: Box<dyn FnOnce(SocketAddr) -> SiteSpec + Send>,
    pub exports: watch::Receiver<Vec<LocalExport>>,
    /// Where the keeper reports registration and exports ([`site::status_channel`]).
    pub status: watch::Sender<KeeperStatus>,
}

/// Why a site's gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum SiteGatewayError {
    #[error("gateway: {0}")]
    Gateway(#[from] meshbridge_gateway::Error),
    #[error("dns: {0}")]
    Dns(#[from] DnsError),
}

/// A running gateway with its DNS server and site keeper.
pub struct SiteGateway {
    gateway: GatewayHandle,
    dns: Option<DnsHandle>,
    keeper: Option<JoinHandle<()>>,
    stop: CancellationToken,
}

impl SiteGateway {
    /// Start the gateway on `catalog`, then DNS on the gateway's catalog (when `dns` is
    /// given), then the keeper (when `keeper` is given); returns once every listener is
    /// bound.
    pub async fn start(
        config: meshbridge_gateway::Config,
        identity: Arc<Identity>,
        catalog: watch::Receiver<Arc<Catalog>>,
        dns: Option<dns::Config>,
        keeper: Option<Keeper>,
    ) -> Result<Self, SiteGatewayError> {
        let gateway = Gateway::start(config, identity, catalog).await?;
        let dns = match dns {
            Some(d) => Some(DnsServer::start(d, gateway.catalog_watch()).await?),
            None => None,
        };
        let stop = CancellationToken::new();
        let keeper = keeper.map(|k| {
            tokio::spawn(site::keep_reporting(
                k.client,
                (k.spec)(gateway.tunnel_addr()),
                k.exports,
                k.status,
                Some(gateway.reporter()),
                stop.clone().cancelled_owned(),
            ))
        });
        Ok(Self {
            gateway,
            dns,
            keeper,
            stop,
        })
    }

    pub fn gateway(&self) -> &GatewayHandle {
        &self.gateway
    }

    pub fn dns(&self) -> Option<&DnsHandle> {
        self.dns.as_ref()
    }

    /// Stop in order: drain the data plane up to `deadline` (not ready, new streams
    /// refused so peers fail over, work in flight finished), then DNS, then the keeper
    /// (its lease lapses on its own; the site is not withdrawn at once, so a restart is
    /// seamless).
    pub async fn drain(mut self, deadline: Duration) -> Outcome {
        let outcome = self.gateway.drain(deadline).await;
        if let Some(d) = self.dns.take() {
            d.shutdown(DNS_DRAIN).await;
        }
        self.stop.cancel();
        if let Some(task) = self.keeper.take() {
            let _ = task.await;
        }
        outcome
    }
}
