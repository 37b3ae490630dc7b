//! From health checks to exports: each service's endpoint is ready only while its check
//! passes (services without a check are always ready). The result feeds the site keeper,
//! which writes each change to the registry.

use std::sync::Arc;

use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::config::ServiceConfig;
use super::health::{self, HealthState};
use crate::site::LocalExport;

/// The exports of `services` as their health changes; health probes run in `tasks` until
/// `stop`.
pub fn follow(
    services: &[ServiceConfig],
    tasks: &mut JoinSet<()>,
    stop: &CancellationToken,
) -> watch::Receiver<Vec<LocalExport>> {
    let changed = Arc::new(Notify::new());
    let mut states: Vec<Option<watch::Receiver<HealthState>>> = Vec::new();
    for svc in services {
        let Some(check) = &svc.check else {
            states.push(None);
            continue;
        };
        let (tx, mut rx) = watch::channel(HealthState::new());
        states.push(Some(rx.clone()));
        let span =
            tracing::info_span!("health", service = %format!("{}/{}", svc.namespace, svc.name));
        let stopped = stop.clone();
        tasks.spawn(tracing::Instrument::instrument(
            health::run(check.clone(), tx, async move { stopped.cancelled().await }),
            span,
        ));
        let notify = changed.clone();
        tasks.spawn(async move {
            while rx.changed().await.is_ok() {
                notify.notify_one();
            }
        });
    }
    let (tx, rx) = watch::channel(exports(services, &states));
    let services = services.to_vec();
    let stop = stop.clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = changed.notified() => {}
            }
            let now = exports(&services, &states);
            tx.send_if_modified(|old| {
                let modified = *old != now;
                *old = now;
                modified
            });
        }
    });
    rx
}

/// Each service's export, its endpoint ready while its check passes.
fn exports(
    services: &[ServiceConfig],
    states: &[Option<watch::Receiver<HealthState>>],
) -> Vec<LocalExport> {
    services
        .iter()
        .zip(states)
        .map(|(svc, state)| {
            let ready = state.as_ref().is_none_or(|s| s.borrow().healthy);
            svc.export_spec().to_local(ready)
        })
        .collect()
}
