//! Starting the agent and stopping it in order.
//!
//! Start: identity (load, or join once) → registry client → catalog replica (the persisted
//! catalog until the registry answers) → the embedded gateway (VIP listeners for imports,
//! inbound tunnels for this host's services) → DNS stub → health checks → exports → the
//! site keeper (register, heartbeat, reconcile exports) → SVID renewal.
//!
//! Stop: not ready, stop accepting, drain tunnels and client connections up to the
//! deadline, then DNS, the keeper and the rest.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshbridge_core::client::{ClientError, ClientOptions, RegistryClient};
use meshbridge_core::drain::Outcome;
use meshbridge_core::tls::Identity;
use meshbridge_gateway::GatewayHandle;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::config::Config;
use super::exports;
use super::identity::{self, IdentityError};
use crate::dns::DnsHandle;
use crate::site::KeeperStatus;
use crate::site_gateway::{Keeper, SiteGateway, SiteGatewayError};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("registry client: {0}")]
    Registry(ClientError),
    #[error(transparent)]
    Gateway(#[from] SiteGatewayError),
}

/// Entry point: [`Agent::start`].
pub struct Agent;

/// A running agent.
pub struct AgentHandle {
    /// The embedded gateway with its DNS stub and site keeper (as `meshbridge gateway`
    /// runs them).
    site: SiteGateway,
    identity: Arc<Identity>,
    keeper: watch::Receiver<KeeperStatus>,
    tasks: JoinSet<()>,
    stop: CancellationToken,
}

impl Agent {
    /// Start everything; returns once every listener is bound. A refused join token, an
    /// unusable certificate or a port in use is an error naming the cause.
    pub async fn start(cfg: Config) -> Result<AgentHandle, AgentError> {
        meshbridge_core::install_crypto_provider();
        let opts = ClientOptions::default();
        let id = identity::obtain(&cfg, &opts).await?;
        let identity = id.identity.clone();
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();

        let client = RegistryClient::with_options(&cfg.registry, identity.clone(), opts)
            .await
            .map_err(AgentError::Registry)?;
        // The gateway serves the persisted catalog until the registry's first answer, and
        // the DNS stub answers from the gateway's catalog (static stability for both).
        // Like a gateway, the agent reports its tunnel links with each heartbeat.
        let replica = client.clone().watch_catalog();
        let exports = exports::follow(&cfg.services, &mut tasks, &stop);
        let site_cfg = cfg.clone();
        let (status, keeper) = crate::site::status_channel();
        let site_keeper = Keeper {
            client: client.clone(),
            spec: Box::new(move |tunnel| site_cfg.site_spec(tunnel)),
            exports,
            status,
        };
        let site = SiteGateway::start(
            cfg.gateway(),
            identity.clone(),
            replica,
            cfg.dns(),
            Some(site_keeper),
        )
        .await?;

        let stopped = stop.clone();
        if id.self_managed {
            tasks.spawn(identity::renew_loop(
                cfg.clone(),
                identity.clone(),
                client,
                async move { stopped.cancelled().await },
            ));
        } else {
            tasks.spawn(
                identity
                    .clone()
                    .watch_files(
                        Duration::from_secs(5),
                        async move { stopped.cancelled().await },
                    ),
            );
        }
        info!(site = %cfg.site, id = %identity.id(), tunnel = %site.gateway().tunnel_addr(), dns = ?site.dns().map(DnsHandle::local_addr), services = cfg.services.len(), "agent started");
        Ok(AgentHandle {
            site,
            identity,
            keeper,
            tasks,
            stop,
        })
    }
}

impl AgentHandle {
    /// Where peers' tunnels arrive (UDP for QUIC, TCP for the fallback).
    pub fn tunnel_addr(&self) -> SocketAddr {
        self.site.gateway().tunnel_addr()
    }

    pub fn dns_addr(&self) -> Option<SocketAddr> {
        self.site.dns().map(DnsHandle::local_addr)
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.site.gateway().admin_addr()
    }

    pub fn identity(&self) -> &Arc<Identity> {
        &self.identity
    }

    /// Registration and export status.
    pub fn keeper(&self) -> watch::Receiver<KeeperStatus> {
        self.keeper.clone()
    }

    pub fn gateway(&self) -> &GatewayHandle {
        self.site.gateway()
    }

    /// Stop in order: drain the data plane (peers fail over) up to `deadline`, then DNS,
    /// the keeper, health checks and renewal.
    pub async fn drain(mut self, deadline: Duration) -> Outcome {
        let outcome = self.site.drain(deadline).await;
        self.stop.cancel();
        let tasks = &mut self.tasks;
        let wait = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(2), wait)
            .await
            .is_err()
        {
            self.tasks.abort_all();
        }
        info!(?outcome, "agent stopped");
        outcome
    }
}
