//! From the catalog to Kubernetes objects: for each service another site exports, a
//! `ServiceImport`, a derived Service (no selector) and EndpointSlices whose endpoints are
//! this cluster's gateways, at the port the gateways listen on for that (service, port)
//! ([`meshbridge_core::vip::assign_ports`], the same function the gateway runs). A pod that
//! connects to the ClusterSetIP (the derived Service's ClusterIP, copied into the
//! ServiceImport's `ips`) is sent by kube-proxy to a gateway, which tunnels to the
//! exporting site.
//!
//! Headless imports carry the exporting sites' endpoint addresses and hostnames (one slice
//! per source cluster), which a pod can reach only where pod networks are routed between
//! clusters; the gateways carry ClusterSetIP services.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServicePort as KubeServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{
    Endpoint as SliceEndpoint, EndpointConditions, EndpointPort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use meshbridge_core::model::{Catalog, Protocol, ServiceKey, SiteState};
use meshbridge_core::vip::{PortRange, assign_ports};

use super::crd::{
    ClusterStatus, ServiceImport, ServiceImportSpec, ServiceImportStatus, ServiceImportType,
    ServicePort,
};

/// On everything the adapter creates; it never changes or deletes an object without it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "meshbridge";
/// On derived Services and EndpointSlices: the ServiceImport they belong to.
pub const IMPORT_LABEL: &str = "meshbridge.io/import";
/// The MCS labels CoreDNS's `multicluster` option (and other MCS consumers) read.
pub const MCS_SERVICE_NAME_LABEL: &str = "multicluster.kubernetes.io/service-name";
pub const MCS_SOURCE_CLUSTER_LABEL: &str = "multicluster.kubernetes.io/source-cluster";
pub const SLICE_MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const SLICE_MANAGER: &str = "kube-adapter.meshbridge.io";

/// Everything one imported service needs in this cluster. `service` and `slices` are
/// completed by the caller with owner references (they need the ServiceImport's uid).
#[derive(Clone, Debug)]
pub struct Desired {
    pub key: ServiceKey,
    pub import: ServiceImport,
    pub service: Service,
    pub slices: Vec<EndpointSlice>,
}

/// The derived Service's name: `derived-<name>`, shortened with a hash when too long.
pub fn derived_name(name: &str) -> String {
    let full = format!("derived-{name}");
    if full.len() <= 63 {
        return full;
    }
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let head = full[..44].trim_end_matches('-');
    format!("{head}-{h:08x}")
}

fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    }
}

/// The imports this cluster should hold. `gateways` are the ready addresses of this site's
/// gateways; `namespaces` (empty: all) limits where imports are written.
pub fn desired(
    catalog: &Catalog,
    own_site: &str,
    gateways: &[IpAddr],
    ports: PortRange,
    namespaces: &BTreeSet<String>,
) -> BTreeMap<ServiceKey, Desired> {
    let assigned = assign_ports(ports, catalog);
    let mut out = BTreeMap::new();
    for svc in catalog.services() {
        if !namespaces.is_empty() && !namespaces.contains(&svc.key.namespace) {
            continue;
        }
        let remote: Vec<_> = svc
            .groups
            .iter()
            .filter(|g| g.site != own_site && !matches!(g.state, SiteState::Withdrawn { .. }))
            .collect();
        if remote.is_empty() {
            continue;
        }
        let name = svc.key.name.clone();
        let ns = svc.key.namespace.clone();
        let derived = derived_name(&name);
        let mut clusters: Vec<String> = svc.groups.iter().map(|g| g.site.clone()).collect();
        clusters.sort();
        clusters.dedup();
        let import = ServiceImport {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                labels: labels(&[(MANAGED_BY_LABEL, MANAGED_BY)]),
                ..Default::default()
            },
            spec: ServiceImportSpec {
                ports: svc
                    .ports
                    .iter()
                    .map(|p| ServicePort {
                        name: (!p.name.is_empty()).then(|| p.name.clone()),
                        protocol: Some(protocol_name(p.protocol).into()),
                        app_protocol: p.app_protocol.clone(),
                        port: i32::from(p.port),
                    })
                    .collect(),
                ips: Vec::new(),
                type_: if svc.headless {
                    ServiceImportType::Headless
                } else {
                    ServiceImportType::ClusterSetIP
                },
                session_affinity: None,
                session_affinity_config: None,
            },
            status: Some(ServiceImportStatus {
                clusters: clusters
                    .into_iter()
                    .map(|cluster| ClusterStatus { cluster })
                    .collect(),
            }),
        };
        let meta = |slice_name: String, source: &str| ObjectMeta {
            name: Some(slice_name),
            namespace: Some(ns.clone()),
            labels: labels(&[
                (MANAGED_BY_LABEL, MANAGED_BY),
                (IMPORT_LABEL, &name),
                ("kubernetes.io/service-name", &derived),
                (MCS_SERVICE_NAME_LABEL, &name),
                (MCS_SOURCE_CLUSTER_LABEL, source),
                (SLICE_MANAGED_BY_LABEL, SLICE_MANAGER),
            ]),
            ..Default::default()
        };
        let (service_ports, slices) = if svc.headless {
            let service_ports: Vec<KubeServicePort> = svc
                .ports
                .iter()
                .map(|p| KubeServicePort {
                    name: (!p.name.is_empty()).then(|| p.name.clone()),
                    port: i32::from(p.port),
                    protocol: Some(protocol_name(p.protocol).into()),
                    target_port: Some(IntOrString::Int(i32::from(p.target_port))),
                    ..Default::default()
                })
                .collect();
            let slice_ports: Vec<EndpointPort> = svc
                .ports
                .iter()
                .map(|p| EndpointPort {
                    name: Some(p.name.clone()),
                    port: Some(i32::from(p.target_port)),
                    protocol: Some(protocol_name(p.protocol).into()),
                    ..Default::default()
                })
                .collect();
            let mut slices = Vec::new();
            for g in &remote {
                for (family, v4) in [("IPv4", true), ("IPv6", false)] {
                    let endpoints: Vec<SliceEndpoint> = g
                        .endpoints
                        .iter()
                        .filter(|e| e.address.is_ipv4() == v4)
                        .map(|e| SliceEndpoint {
                            addresses: vec![e.address.to_string()],
                            hostname: e.hostname.clone(),
                            zone: e.zone.clone(),
                            conditions: Some(EndpointConditions {
                                ready: Some(e.ready),
                                serving: Some(e.ready),
                                terminating: Some(false),
                            }),
                            ..Default::default()
                        })
                        .collect();
                    if endpoints.is_empty() {
                        continue;
                    }
                    let suffix = if v4 { "" } else { "-v6" };
                    slices.push(EndpointSlice {
                        metadata: meta(format!("{derived}-{}{suffix}", g.site), &g.site),
                        address_type: family.into(),
                        endpoints: Some(endpoints),
                        ports: Some(slice_ports.clone()),
                    });
                }
            }
            (service_ports, slices)
        } else {
            let mut service_ports = Vec::new();
            let mut slice_ports = Vec::new();
            for p in svc.ports.iter().filter(|p| p.protocol == Protocol::Tcp) {
                let Some(gw_port) = assigned.get(&(svc.key.clone(), p.port)) else {
                    tracing::warn!(service = %svc.key, port = p.port, range = %ports, "no gateway port left in import.ports for this service port; it is not imported");
                    continue;
                };
                let port_name = if p.name.is_empty() {
                    format!("port-{}", p.port)
                } else {
                    p.name.clone()
                };
                service_ports.push(KubeServicePort {
                    name: Some(port_name.clone()),
                    port: i32::from(p.port),
                    protocol: Some("TCP".into()),
                    target_port: Some(IntOrString::Int(i32::from(*gw_port))),
                    app_protocol: p.app_protocol.clone(),
                    ..Default::default()
                });
                slice_ports.push(EndpointPort {
                    name: Some(port_name),
                    port: Some(i32::from(*gw_port)),
                    protocol: Some("TCP".into()),
                    app_protocol: p.app_protocol.clone(),
                });
            }
            let mut slices = Vec::new();
            for (family, v4) in [("IPv4", true), ("IPv6", false)] {
                let endpoints: Vec<SliceEndpoint> = gateways
                    .iter()
                    .filter(|a| a.is_ipv4() == v4)
                    .map(|a| SliceEndpoint {
                        addresses: vec![a.to_string()],
                        conditions: Some(EndpointConditions {
                            ready: Some(true),
                            serving: Some(true),
                            terminating: Some(false),
                        }),
                        ..Default::default()
                    })
                    .collect();
                if endpoints.is_empty() || slice_ports.is_empty() {
                    continue;
                }
                let suffix = if v4 { "gw" } else { "gw-v6" };
                slices.push(EndpointSlice {
                    metadata: meta(format!("{derived}-{suffix}"), own_site),
                    address_type: family.into(),
                    endpoints: Some(endpoints),
                    ports: Some(slice_ports.clone()),
                });
            }
            (service_ports, slices)
        };
        let service = Service {
            metadata: ObjectMeta {
                name: Some(derived.clone()),
                namespace: Some(ns.clone()),
                labels: labels(&[(MANAGED_BY_LABEL, MANAGED_BY), (IMPORT_LABEL, &name)]),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".into()),
                cluster_ip: svc.headless.then(|| "None".to_string()),
                ports: Some(service_ports),
                ..Default::default()
            }),
            status: None,
        };
        out.insert(
            svc.key.clone(),
            Desired {
                key: svc.key.clone(),
                import,
                service,
                slices,
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use meshbridge_core::model::{Endpoint, Export, Port, Site};

    use super::*;

    fn export(site: &str, name: &str, headless: bool, rev: u64) -> Export {
        Export {
            site: site.into(),
            service: ServiceKey::new("shop", name),
            generation: 1,
            ports: vec![
                Port {
                    name: "http".into(),
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
                address: "10.8.0.7".parse().unwrap(),
                hostname: Some("web-0".into()),
                ready: true,
                weight: 1,
                identity: None,
                zone: None,
            }],
            headless,
            created_revision: rev,
            updated_revision: rev,
        }
    }

    fn catalog(exports: Vec<Export>) -> Catalog {
        let mut c = Catalog::default();
        for e in exports {
            c.sites.entry(e.site.clone()).or_insert_with(|| {
                Arc::new(Site {
                    name: e.site.clone(),
                    kind: Default::default(),
                    locality: Default::default(),
                    gateways: Vec::new(),
                    lease_ttl_ms: 15_000,
                    grace_ms: 600_000,
                    last_heartbeat_ms: 0,
                    state: SiteState::Fresh,
                    created_revision: 1,
                    links: Vec::new(),
                    instances: Vec::new(),
                    xds_rejections: Vec::new(),
                })
            });
            c.exports.insert(e.key(), Arc::new(e));
        }
        c
    }

    #[test]
    fn remote_services_become_imports_pointing_at_the_gateways() {
        let c = catalog(vec![
            export("east", "web", false, 1),
            export("west", "mine", false, 2),
            export("east", "pg", true, 3),
        ]);
        let range = PortRange::new(20_000, 20_999).unwrap();
        let gw: Vec<IpAddr> = vec!["10.9.0.2".parse().unwrap(), "10.9.0.3".parse().unwrap()];
        let d = desired(&c, "west", &gw, range, &BTreeSet::new());
        assert_eq!(
            d.keys().map(|k| k.name.as_str()).collect::<Vec<_>>(),
            vec!["pg", "web"],
            "only services another site exports"
        );
        let web = &d[&ServiceKey::new("shop", "web")];
        assert_eq!(web.import.spec.type_, ServiceImportType::ClusterSetIP);
        assert_eq!(web.import.spec.ports.len(), 2);
        assert_eq!(
            web.import.status.as_ref().unwrap().clusters,
            vec![ClusterStatus {
                cluster: "east".into()
            }]
        );
        let gw_port = assign_ports(range, &c)[&(ServiceKey::new("shop", "web"), 80)];
        let sp = web.service.spec.as_ref().unwrap().ports.as_ref().unwrap();
        assert_eq!(sp.len(), 1, "UDP is not carried by the gateways");
        assert_eq!(
            sp[0].target_port,
            Some(IntOrString::Int(i32::from(gw_port)))
        );
        assert_eq!(web.slices.len(), 1);
        let s = &web.slices[0];
        let l = s.metadata.labels.as_ref().unwrap();
        assert_eq!(l["kubernetes.io/service-name"], "derived-web");
        assert_eq!(l[MCS_SERVICE_NAME_LABEL], "web");
        assert_eq!(l[SLICE_MANAGED_BY_LABEL], SLICE_MANAGER);
        assert_eq!(s.endpoints.as_ref().unwrap().len(), 2);
        assert_eq!(s.ports.as_ref().unwrap()[0].port, Some(i32::from(gw_port)));

        let pg = &d[&ServiceKey::new("shop", "pg")];
        assert_eq!(pg.import.spec.type_, ServiceImportType::Headless);
        assert_eq!(
            pg.service.spec.as_ref().unwrap().cluster_ip.as_deref(),
            Some("None")
        );
        assert_eq!(
            pg.slices[0].endpoints.as_ref().unwrap()[0]
                .hostname
                .as_deref(),
            Some("web-0")
        );
        assert_eq!(
            pg.slices[0].metadata.labels.as_ref().unwrap()[MCS_SOURCE_CLUSTER_LABEL],
            "east"
        );

        let only = desired(
            &c,
            "west",
            &gw,
            range,
            &BTreeSet::from(["other".to_string()]),
        );
        assert!(
            only.is_empty(),
            "namespaces outside the list are left alone"
        );
    }

    #[test]
    fn derived_names_fit_a_dns_label() {
        assert_eq!(derived_name("web"), "derived-web");
        let long = "a".repeat(63);
        let d = derived_name(&long);
        assert!(d.len() <= 63, "{d}");
        assert_ne!(d, derived_name(&"a".repeat(62)));
    }
}
