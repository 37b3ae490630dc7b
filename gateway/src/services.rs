//! Service listeners: each imported service gets a VIP from the configured range (the same
//! deterministic assignment the DNS stub uses) and a listener per TCP port; or, in a
//! Kubernetes site, a port per (service, port) on one address (the same assignment the kube
//! adapter writes into the imported EndpointSlices). Reconciled on every catalog change; a
//! listener that goes away leaves its open connections alone.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use meshbridge_core::backoff::Backoff;
use meshbridge_core::model::{Catalog, Protocol, ServiceKey};
use meshbridge_core::vip::{PortRange, VipRange, assign_catalog, assign_ports};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::outbound::{self, Kind};
use crate::preamble::Target;
use crate::shared::Shared;

const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Bound service listeners: (service, port) → address.
pub type ServiceAddrs = BTreeMap<(ServiceKey, u16), SocketAddr>;

/// How imported services get their listener addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addressing {
    /// A VIP per service from the range, the service's own port numbers.
    Vips(VipRange),
    /// One address, a port per (service, port) from the range.
    Ports { address: IpAddr, range: PortRange },
}

/// The listeners the catalog asks for: services exported by at least one other site.
pub fn desired(
    catalog: &Catalog,
    own_site: &str,
    addressing: Addressing,
) -> BTreeMap<SocketAddr, (ServiceKey, u16)> {
    let (vips, ports) = match addressing {
        Addressing::Vips(range) => (assign_catalog(range, catalog), BTreeMap::new()),
        Addressing::Ports { range, .. } => (BTreeMap::new(), assign_ports(range, catalog)),
    };
    let mut out = BTreeMap::new();
    for svc in catalog.services() {
        if svc.headless || svc.groups.iter().all(|g| g.site == own_site) {
            continue;
        }
        for p in svc.ports.iter().filter(|p| p.protocol == Protocol::Tcp) {
            let addr = match addressing {
                Addressing::Vips(_) => vips
                    .get(&svc.key)
                    .map(|vip| SocketAddr::new(IpAddr::V4(*vip), p.port)),
                Addressing::Ports { address, .. } => ports
                    .get(&(svc.key.clone(), p.port))
                    .map(|port| SocketAddr::new(address, *port)),
            };
            if let Some(addr) = addr {
                out.insert(addr, (svc.key.clone(), p.port));
            }
        }
    }
    out
}

/// Keep the listeners in line with the catalog until the gateway stops accepting.
pub async fn reconcile(
    sh: Arc<Shared>,
    addressing: Addressing,
    published: watch::Sender<ServiceAddrs>,
) {
    let mut catalog = sh.catalog.clone();
    let mut bound: HashMap<SocketAddr, ((ServiceKey, u16), CancellationToken)> = HashMap::new();
    // A listener that could not be bound (address taken by another process) is retried
    // with backoff, not only at the next catalog change, which may never come.
    let mut retry = Backoff::new(RETRY_MIN, RETRY_MAX);
    loop {
        let mut failed = 0usize;
        let want = desired(&catalog.borrow_and_update().clone(), &sh.site, addressing);
        bound.retain(|addr, (key, stop)| {
            let keep = want.get(addr) == Some(key);
            if !keep {
                tracing::info!(%addr, service = %key.0, "service listener removed");
                stop.cancel();
            }
            keep
        });
        for (addr, key) in want {
            if bound.contains_key(&addr) {
                continue;
            }
            match TcpListener::bind(addr).await {
                Ok(listener) => {
                    tracing::info!(%addr, service = %key.0, port = key.1, "service listener up");
                    let stop = sh.accept_stop.child_token();
                    let target = Target::Service {
                        namespace: key.0.namespace.clone(),
                        name: key.0.name.clone(),
                        port: key.1,
                    };
                    sh.tasks.spawn(outbound::accept_loop(
                        sh.clone(),
                        listener,
                        Kind::Service(target),
                        stop.clone(),
                    ));
                    bound.insert(addr, (key, stop));
                }
                Err(e) => {
                    failed += 1;
                    sh.metrics.failure("-", "listener_bind");
                    tracing::warn!(%addr, service = %key.0, error = %e, "cannot bind service listener");
                }
            }
        }
        published.send_replace(bound.iter().map(|(a, (k, _))| (k.clone(), *a)).collect());
        let wait = if failed > 0 {
            retry.next_delay()
        } else {
            retry.reset();
            Duration::MAX
        };
        tokio::select! {
            r = catalog.changed() => if r.is_err() { break },
            _ = tokio::time::sleep(wait), if failed > 0 => {
                tracing::info!(failed, "retrying service listeners that could not be bound");
            }
            _ = sh.accept_stop.cancelled() => break,
        }
    }
    for (_, (_, stop)) in bound {
        stop.cancel();
    }
    published.send_replace(ServiceAddrs::new());
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use meshbridge_core::model::{Endpoint, Export, Port};

    use super::*;

    fn export(site: &str, name: &str, headless: bool) -> Export {
        Export {
            site: site.into(),
            service: ServiceKey::new("ns", name),
            generation: 1,
            ports: vec![
                Port {
                    name: "web".into(),
                    port: 80,
                    protocol: Protocol::Tcp,
                    target_port: 8080,
                    app_protocol: None,
                },
                Port {
                    name: "dns".into(),
                    port: 53,
                    protocol: Protocol::Udp,
                    target_port: 53,
                    app_protocol: None,
                },
            ],
            endpoints: vec![Endpoint {
                address: "10.0.0.1".parse().unwrap(),
                hostname: None,
                ready: true,
                weight: 1,
                identity: None,
                zone: None,
            }],
            headless,
            created_revision: 1,
            updated_revision: 1,
        }
    }

    #[test]
    fn only_remote_non_headless_tcp_ports_get_listeners() {
        let mut c = Catalog::default();
        for e in [
            export("east", "remote", false),
            export("west", "mine", false),
            export("east", "headless", true),
        ] {
            c.exports.insert(e.key(), Arc::new(e));
        }
        let range: VipRange = "127.240.0.0/16".parse().unwrap();
        let d = desired(&c, "west", Addressing::Vips(range));
        let keys: Vec<_> = d.values().cloned().collect();
        assert_eq!(keys, vec![(ServiceKey::new("ns", "remote"), 80)]);
        let addr = d.keys().next().unwrap();
        assert_eq!(addr.port(), 80);
        assert!(matches!(addr.ip(), IpAddr::V4(ip) if range.contains(ip)));
        // Port addressing: one address, the port the kube adapter computes from the catalog.
        let ports: PortRange = "20000-20099".parse().unwrap();
        let address: IpAddr = "10.1.0.2".parse().unwrap();
        let d = desired(
            &c,
            "west",
            Addressing::Ports {
                address,
                range: ports,
            },
        );
        let want = assign_ports(ports, &c)[&(ServiceKey::new("ns", "remote"), 80)];
        assert_eq!(
            d.into_iter().collect::<Vec<_>>(),
            vec![(
                SocketAddr::new(address, want),
                (ServiceKey::new("ns", "remote"), 80)
            )]
        );
    }
}
