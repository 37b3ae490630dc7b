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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::agent::health::{CheckSpec, Probe};
    use crate::site::PortSpec;

    fn service(name: &str, check: Option<CheckSpec>) -> ServiceConfig {
        ServiceConfig {
            namespace: "shop".into(),
            name: name.into(),
            address: "127.0.0.1".parse().unwrap(),
            ports: vec![PortSpec {
                name: "tcp".into(),
                port: 7000,
                protocol: Default::default(),
                target_port: None,
            }],
            hostname: None,
            weight: None,
            check,
        }
    }

    fn ready(exports: &[LocalExport], name: &str) -> bool {
        exports
            .iter()
            .find(|e| e.service.name == name)
            .is_some_and(|e| e.endpoints.iter().all(|ep| ep.ready))
    }

    #[tokio::test]
    async fn an_endpoint_is_ready_only_while_its_check_passes() {
        let flag = std::env::temp_dir().join(format!(
            "meshbridge-exports-test-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let check = CheckSpec {
            probe: Probe::Command {
                argv: vec!["test".into(), "-f".into(), flag.display().to_string()],
            },
            interval_ms: 100,
            timeout_ms: 100,
            healthy_threshold: 1,
            unhealthy_threshold: 1,
        };
        let services = [service("checked", Some(check)), service("unchecked", None)];
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let mut rx = follow(&services, &mut tasks, &stop);
        let within = Duration::from_secs(5);
        // Unhealthy until a probe passes; a service without a check is always ready.
        assert!(!ready(&rx.borrow(), "checked"));
        assert!(ready(&rx.borrow(), "unchecked"));

        std::fs::write(&flag, b"").unwrap();
        let up = rx.wait_for(|e| ready(e, "checked"));
        tokio::time::timeout(within, up).await.unwrap().unwrap();
        std::fs::remove_file(&flag).unwrap();
        let down = rx.wait_for(|e| !ready(e, "checked"));
        tokio::time::timeout(within, down).await.unwrap().unwrap();
        assert!(ready(&rx.borrow(), "unchecked"));

        stop.cancel();
        while tasks.join_next().await.is_some() {}
    }
}
