//! From Kubernetes objects to what the site exports: a Service with a same-named
//! ServiceExport, its EndpointSlices and their conditions become one [`LocalExport`].
//!
//! Readiness follows the EndpointSlice API: an endpoint whose `ready` condition is true (or
//! unset, which consumers are told to read as ready) is exported ready; one that is
//! `serving` but `terminating` is exported not ready (kept visible while it drains, never
//! chosen while a ready endpoint exists); one that is not serving is left out. Only the
//! first address of an endpoint counts (the others are fungible, as the API says), and an
//! address seen in two slices (a slice being replaced) is exported once, ready if either
//! says so.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use meshbridge_core::model::{Endpoint, Port, Protocol, ServiceKey};

use crate::site::LocalExport;

/// Why a ServiceExport cannot be exported: the `Valid=False` condition's reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub reason: &'static str,
    pub message: String,
}

/// The label an EndpointSlice carries to name its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Build the export of `key`: `service` is the same-named Service (if any), `slices` the
/// EndpointSlices labelled with its name in its namespace.
pub fn build(
    key: &ServiceKey,
    service: Option<&Service>,
    slices: &[&EndpointSlice],
) -> Result<LocalExport, Invalid> {
    let Some(service) = service else {
        return Err(Invalid {
            reason: "NoService",
            message: format!("Service {key} does not exist"),
        });
    };
    let spec = service.spec.clone().unwrap_or_default();
    match spec.type_.as_deref() {
        None | Some("ClusterIP") | Some("NodePort") | Some("LoadBalancer") => {}
        Some(other) => {
            return Err(Invalid {
                reason: "UnsupportedServiceType",
                message: format!(
                    "Service {key} is of type {other}; only ClusterIP, NodePort and LoadBalancer Services can be exported"
                ),
            });
        }
    }
    let headless = spec.cluster_ip.as_deref() == Some("None");
    // Where endpoints listen, per port name, from the slices (a named targetPort is only
    // resolved there).
    let mut slice_ports: BTreeMap<(String, Protocol), u16> = BTreeMap::new();
    for s in slices {
        for p in s.ports.iter().flatten() {
            let (Some(port), proto) = (p.port, protocol(p.protocol.as_deref())) else {
                continue;
            };
            let (Ok(port), Ok(proto)) = (u16::try_from(port), proto) else {
                continue;
            };
            slice_ports
                .entry((p.name.clone().unwrap_or_default(), proto))
                .or_insert(port);
        }
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let name = p.name.clone().unwrap_or_default();
        let proto = protocol(p.protocol.as_deref()).map_err(|bad| Invalid {
            reason: "UnsupportedProtocol",
            message: format!("Service {key} port {i} ({name:?}): protocol {bad:?}"),
        })?;
        let port = u16::try_from(p.port).map_err(|_| Invalid {
            reason: "InvalidPort",
            message: format!(
                "Service {key} port {i} ({name:?}): {} is not a port",
                p.port
            ),
        })?;
        let target = slice_ports
            .get(&(name.clone(), proto))
            .copied()
            .or(match &p.target_port {
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(t)) => {
                    u16::try_from(*t).ok()
                }
                Some(_) => None,
                None => Some(port),
            })
            // A named targetPort with no slice to resolve it: no endpoint can be reached
            // yet; the Service port stands in until a slice names it.
            .unwrap_or(port);
        ports.push(Port {
            name,
            port,
            protocol: proto,
            target_port: target,
            app_protocol: p.app_protocol.clone().filter(|a| !a.is_empty()),
        });
    }
    if ports.is_empty() {
        return Err(Invalid {
            reason: "NoPorts",
            message: format!("Service {key} has no ports"),
        });
    }
    let mut endpoints: BTreeMap<IpAddr, Endpoint> = BTreeMap::new();
    for s in slices {
        if !matches!(s.address_type.as_str(), "IPv4" | "IPv6") {
            continue; // FQDN slices name hosts, not addresses.
        }
        for e in s.endpoints.iter().flatten() {
            let Some(address) = e.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                continue;
            };
            let c = e.conditions.clone().unwrap_or_default();
            let ready = c.ready.unwrap_or(true);
            let serving = c.serving.unwrap_or(ready);
            let terminating = c.terminating.unwrap_or(false);
            let exported_ready = ready && !terminating;
            if !(exported_ready || serving && terminating) {
                continue;
            }
            let ep = endpoints.entry(address).or_insert_with(|| Endpoint {
                address,
                hostname: e.hostname.clone().filter(|h| !h.is_empty()),
                ready: false,
                weight: 1,
                identity: None,
                zone: e.zone.clone().filter(|z| !z.is_empty()),
            });
            ep.ready |= exported_ready;
        }
    }
    Ok(LocalExport {
        service: key.clone(),
        ports,
        endpoints: endpoints.into_values().collect(),
        headless,
    })
}

fn protocol(p: Option<&str>) -> Result<Protocol, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => Err(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{
        Endpoint as SliceEndpoint, EndpointConditions, EndpointPort,
    };
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    use super::*;

    fn service(cluster_ip: Option<&str>, ports: Vec<ServicePort>) -> Service {
        Service {
            spec: Some(ServiceSpec {
                cluster_ip: cluster_ip.map(String::from),
                ports: Some(ports),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn port(name: &str, port: i32, target: Option<IntOrString>) -> ServicePort {
        ServicePort {
            name: Some(name.into()),
            port,
            target_port: target,
            ..Default::default()
        }
    }

    fn ep(
        addr: &str,
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> SliceEndpoint {
        SliceEndpoint {
            addresses: vec![addr.into()],
            conditions: Some(EndpointConditions {
                ready,
                serving,
                terminating,
            }),
            ..Default::default()
        }
    }

    fn slice(kind: &str, endpoints: Vec<SliceEndpoint>, ports: Vec<(&str, i32)>) -> EndpointSlice {
        EndpointSlice {
            address_type: kind.into(),
            endpoints: Some(endpoints),
            ports: Some(
                ports
                    .into_iter()
                    .map(|(n, p)| EndpointPort {
                        name: Some(n.into()),
                        port: Some(p),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn readiness_follows_the_endpoint_slice_conditions() {
        let key = ServiceKey::new("shop", "web");
        let svc = service(
            None,
            vec![port("http", 80, Some(IntOrString::String("web".into())))],
        );
        let mut zoned = ep("10.1.0.1", Some(true), Some(true), Some(false)); // ready
        zoned.zone = Some("eu-west-1a".into());
        let s1 = slice(
            "IPv4",
            vec![
                zoned,
                ep("10.1.0.2", None, None, None), // unknown: ready
                ep("10.1.0.3", Some(false), Some(true), Some(true)), // draining: listed, not ready
                ep("10.1.0.4", Some(false), Some(false), Some(true)), // gone: left out
                ep("10.1.0.5", Some(false), Some(false), None), // not ready: left out
                ep("not-an-ip", Some(true), None, None), // odd: skipped
            ],
            vec![("http", 8080)],
        );
        // The same address in a second slice (a slice being replaced) counts once.
        let s2 = slice(
            "IPv4",
            vec![ep("10.1.0.3", Some(true), None, None)],
            vec![("http", 8080)],
        );
        let fqdn = slice(
            "FQDN",
            vec![ep("db.example.com", Some(true), None, None)],
            vec![],
        );
        let got = build(&key, Some(&svc), &[&s1, &fqdn]).unwrap();
        let view: Vec<(String, bool)> = got
            .endpoints
            .iter()
            .map(|e| (e.address.to_string(), e.ready))
            .collect();
        assert_eq!(
            view,
            vec![
                ("10.1.0.1".into(), true),
                ("10.1.0.2".into(), true),
                ("10.1.0.3".into(), false)
            ]
        );
        assert_eq!(
            got.ports[0].target_port, 8080,
            "named targetPort resolved from the slice"
        );
        assert!(!got.headless);
        let both = build(&key, Some(&svc), &[&s1, &s2]).unwrap();
        assert!(
            both.endpoints
                .iter()
                .any(|e| e.address.to_string() == "10.1.0.3" && e.ready)
        );
        assert_eq!(both.endpoints.len(), 3);
    }

    #[test]
    fn headless_services_keep_hostnames_and_bad_services_say_why() {
        let key = ServiceKey::new("db", "pg");
        let svc = service(Some("None"), vec![port("pg", 5432, None)]);
        let mut e = ep("10.2.0.1", Some(true), None, None);
        e.hostname = Some("pg-0".into());
        let got = build(&key, Some(&svc), &[&slice("IPv4", vec![e], vec![])]).unwrap();
        assert!(got.headless);
        assert_eq!(got.endpoints[0].hostname.as_deref(), Some("pg-0"));
        assert_eq!(got.ports[0].target_port, 5432);

        assert_eq!(build(&key, None, &[]).unwrap_err().reason, "NoService");
        let mut ext = service(None, vec![port("x", 1, None)]);
        if let Some(s) = ext.spec.as_mut() {
            s.type_ = Some("ExternalName".into());
        }
        let err = build(&key, Some(&ext), &[]).unwrap_err();
        assert_eq!(err.reason, "UnsupportedServiceType");
        assert!(err.message.contains("ExternalName"), "{}", err.message);
        assert_eq!(
            build(&key, Some(&service(None, vec![])), &[])
                .unwrap_err()
                .reason,
            "NoPorts"
        );
    }
}
