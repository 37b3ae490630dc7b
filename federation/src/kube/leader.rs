//! Leader election with a `coordination.k8s.io/v1` Lease, as client-go does it: the holder
//! renews `renewTime` every retry period; a standby takes the Lease (an update that names
//! the resourceVersion it read, so two standbys cannot both win) once it has seen no change
//! of the record for a whole lease duration, measured on its own clock (never by comparing
//! clocks across machines). A leader that could not renew for `renew_deadline` stops
//! leading before anyone may take over, so two replicas never both write.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::config::LeaderElectionConfig;

/// What a standby last saw of the Lease, and when (on its own clock).
struct Observed {
    record: (Option<String>, Option<MicroTime>, Option<String>),
    at: Instant,
}

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    renew_deadline: Duration,
    retry: Duration,
}

impl Elector {
    pub fn new(client: kube::Client, cfg: &LeaderElectionConfig, identity: String) -> Self {
        Self {
            api: Api::namespaced(client, &cfg.namespace),
            name: cfg.name.clone(),
            identity,
            duration: Duration::from_millis(cfg.lease_duration_ms),
            renew_deadline: Duration::from_millis(cfg.renew_deadline_ms),
            retry: Duration::from_millis(cfg.retry_period_ms),
        }
    }

    /// Campaign and hold the Lease until `stop`; `leading` tells the rest of the adapter.
    /// On `stop` a leader releases the Lease so a standby need not wait it out.
    pub async fn run(self, leading: watch::Sender<bool>, stop: CancellationToken) {
        let mut observed: Option<Observed> = None;
        let mut last_renew: Option<Instant> = None;
        loop {
            let result = self.try_acquire_or_renew(&mut observed).await;
            let now = Instant::now();
            match result {
                Ok(true) => {
                    if !*leading.borrow() {
                        tracing::info!(lease = %self.name, identity = %self.identity, "became the leader");
                    }
                    last_renew = Some(now);
                    leading.send_if_modified(|l| !std::mem::replace(l, true));
                }
                Ok(false) => {
                    if *leading.borrow() {
                        tracing::warn!(lease = %self.name, "lost the lease to another replica; standing by");
                    }
                    last_renew = None;
                    leading.send_if_modified(|l| std::mem::replace(l, false));
                }
                Err(e) => {
                    let expired =
                        last_renew.is_none_or(|t| now.duration_since(t) >= self.renew_deadline);
                    tracing::warn!(lease = %self.name, error = %e, "lease update failed");
                    if expired && *leading.borrow() {
                        tracing::warn!(lease = %self.name, "could not renew within the renew deadline; no longer leading");
                        leading.send_replace(false);
                        last_renew = None;
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(self.retry) => {}
            }
        }
        if *leading.borrow() {
            leading.send_replace(false);
            if let Err(e) = self.release().await {
                tracing::warn!(lease = %self.name, error = %e, "could not release the lease");
            } else {
                tracing::info!(lease = %self.name, "lease released");
            }
        }
    }

    fn now() -> MicroTime {
        MicroTime(Timestamp::now())
    }

    fn seconds(&self) -> i32 {
        i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX)
    }

    async fn try_acquire_or_renew(
        &self,
        observed: &mut Option<Observed>,
    ) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(self.seconds()),
                    acquire_time: Some(Self::now()),
                    renew_time: Some(Self::now()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(self.identity.as_str());
        if !mine && holder.is_some() {
            let record = (
                holder.clone(),
                spec.renew_time.clone(),
                lease.metadata.resource_version.clone(),
            );
            let now = Instant::now();
            match observed {
                Some(o) if o.record == record => {}
                _ => {
                    *observed = Some(Observed { record, at: now });
                }
            }
            let seen = observed.as_ref().map_or(now, |o| o.at);
            // The holder's own duration, when it says one, else ours.
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.duration, Duration::from_secs);
            if now.duration_since(seen) < duration {
                return Ok(false);
            }
            tracing::info!(lease = %self.name, previous = ?holder, "lease expired; taking over");
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        let new_spec = LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.seconds()),
            acquire_time: if mine {
                spec.acquire_time.clone()
            } else {
                Some(Self::now())
            },
            renew_time: Some(Self::now()),
            lease_transitions: Some(if mine {
                transitions
            } else {
                transitions.saturating_add(1)
            }),
            ..spec
        };
        lease.spec = Some(new_spec);
        // `replace` sends the resourceVersion read above: a concurrent change makes it fail.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(Self::now());
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    }
}
