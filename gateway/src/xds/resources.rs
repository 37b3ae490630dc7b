//! The xDS resources of one catalog, as seen from this site (pure: no I/O).
//!
//! - CDS: a cluster per federated service and TCP port, named
//!   `<svc>.<ns>.svc.clusterset.local:<port>`, of type EDS over ADS;
//! - EDS: its endpoints. Priority 0: this site's own ready endpoints (at their target port,
//!   in this site's locality), when it has any. Next priority: this gateway's service
//!   listener for the service and port, when another site has ready endpoints — the gateway
//!   then picks the site (locality order, failover) as it does for every client. So Envoy
//!   keeps local traffic local and fails over to the mesh only when the site has no ready
//!   endpoint left, which is meshbridge's own order;
//! - LDS (when `listener_address` is set): a listener per cluster at that address and the
//!   service port, proxying TCP to the cluster;
//! - LDS for proxyless gRPC: an API listener per service port, named `<svc>.<ns>:<port>`
//!   (and `<svc>.<ns>` when the service has one TCP port), the name a client dialing
//!   `xds:///<svc>.<ns>[:<port>]` asks for, with its routes inline (every path to the
//!   cluster). Served only to clients that name them: Envoy, which subscribes to every
//!   listener, would reject an API listener.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus, Locality,
    SocketAddress, address, config_source, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{
    ApiListener, Filter, FilterChain, Listener, filter,
};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action,
    route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::google::protobuf::{Any, Duration, UInt32Value};
use meshbridge_core::model::{Catalog, MergedService, Protocol, ServiceKey, SiteState};
use prost::{Message, Name};

use crate::services::ServiceAddrs;

/// The three resource types served.
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

/// How long Envoy waits for a TCP connection to an endpoint.
const CONNECT_TIMEOUT_SECS: i64 = 5;

/// One encoded resource and its version (a hash of its bytes, computed once per snapshot,
/// not per stream and push).
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned {
    pub version: String,
    pub any: Any,
}

type ByName = BTreeMap<String, Versioned>;

fn versioned(resources: BTreeMap<String, Any>) -> ByName {
    resources
        .into_iter()
        .map(|(name, any)| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            any.value.hash(&mut h);
            let version = format!("{:016x}", h.finish());
            (name, Versioned { version, any })
        })
        .collect()
}

/// Every resource by type URL, then by name, encoded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub revision: u64,
    types: BTreeMap<&'static str, ByName>,
    /// Listeners for proxyless gRPC clients, by the name they ask for.
    api_listeners: ByName,
}

impl Snapshot {
    /// The resource `name` of `type_url`: API listeners only by name.
    fn get(&self, type_url: &str, name: &str) -> Option<&Versioned> {
        self.types
            .get(type_url)
            .and_then(|all| all.get(name))
            .or_else(|| (type_url == LISTENER).then(|| self.api_listeners.get(name))?)
    }

    /// The resources of `type_url` named in `names` (all of them when `names` is `None`),
    /// with a version that changes exactly when they do.
    pub fn select(&self, type_url: &str, names: Option<&[String]>) -> (String, Vec<Any>) {
        let picked: Vec<&Versioned> = match names {
            None => self
                .types
                .get(type_url)
                .map(|all| all.values().collect())
                .unwrap_or_default(),
            Some(names) => names.iter().filter_map(|n| self.get(type_url, n)).collect(),
        };
        // Content, not time: an unchanged set keeps its version across catalog revisions,
        // so a change elsewhere pushes nothing.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for r in &picked {
            r.version.hash(&mut h);
        }
        let version = format!("{:016x}", h.finish());
        (version, picked.into_iter().map(|r| r.any.clone()).collect())
    }

    /// For incremental (delta) xDS: the resources of `type_url` a client subscribed to —
    /// every one when `wildcard` (never an API listener: those only by name), plus those in
    /// `names` — each with its own version.
    pub fn each<'a>(
        &'a self,
        type_url: &str,
        wildcard: bool,
        names: &'a std::collections::BTreeSet<String>,
    ) -> BTreeMap<&'a str, &'a Versioned> {
        let mut out = BTreeMap::new();
        if wildcard && let Some(all) = self.types.get(type_url) {
            out.extend(all.iter().map(|(name, r)| (name.as_str(), r)));
        }
        for name in names {
            if let Some(r) = self.get(type_url, name) {
                out.insert(name.as_str(), r);
            }
        }
        out
    }

    /// Whether both hold the same resources (whatever their catalog revisions).
    pub fn same_resources(&self, other: &Snapshot) -> bool {
        self.types == other.types && self.api_listeners == other.api_listeners
    }

    /// Whether `type_url` is served at all.
    pub fn serves(type_url: &str) -> bool {
        [CLUSTER, ENDPOINT, LISTENER].contains(&type_url)
    }
}

fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

/// The cluster (and listener) name of a service port.
pub fn cluster_name(key: &ServiceKey, port: u16) -> String {
    format!("{}.{}.svc.clusterset.local:{port}", key.name, key.namespace)
}

fn socket(addr: SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                addr.port(),
            ))),
            ..Default::default()
        })),
    }
}

fn lb_endpoint(addr: SocketAddr, weight: u32) -> LbEndpoint {
    LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(socket(addr)),
            ..Default::default()
        })),
        health_status: HealthStatus::Healthy as i32,
        load_balancing_weight: Some(UInt32Value {
            value: weight.max(1),
        }),
        ..Default::default()
    }
}

/// Build every resource of `catalog` for clients in `site`. `services` are this gateway's
/// bound service listeners (where remote sites are reached).
pub fn build(
    catalog: &Catalog,
    site: &str,
    services: &ServiceAddrs,
    listener_address: Option<IpAddr>,
) -> Snapshot {
    let mut clusters = BTreeMap::new();
    let mut endpoints = BTreeMap::new();
    let mut listeners = BTreeMap::new();
    let mut api_listeners = BTreeMap::new();
    let locality = catalog
        .site(site)
        .map(|s| s.locality.clone())
        .unwrap_or_default();
    for svc in catalog.services() {
        let tcp_ports = svc
            .ports
            .iter()
            .filter(|p| p.protocol == Protocol::Tcp)
            .count();
        for port in svc.ports.iter().filter(|p| p.protocol == Protocol::Tcp) {
            let name = cluster_name(&svc.key, port.port);
            let target = format!("{}.{}", svc.key.name, svc.key.namespace);
            let grpc = any(&api_listener(&format!("{target}:{}", port.port), &name));
            if tcp_ports == 1 {
                api_listeners.insert(target.clone(), any(&api_listener(&target, &name)));
            }
            api_listeners.insert(format!("{target}:{}", port.port), grpc);
            clusters.insert(name.clone(), any(&eds_cluster(&name)));
            let mut groups = Vec::new();
            let local = local_endpoints(&svc, site, &port.name);
            if !local.is_empty() {
                groups.push(LocalityLbEndpoints {
                    locality: Some(Locality {
                        region: locality.region.clone(),
                        zone: locality.zone.clone(),
                        ..Default::default()
                    }),
                    lb_endpoints: local,
                    // gRPC drops a locality without a weight (Envoy does not mind).
                    load_balancing_weight: Some(UInt32Value { value: 1 }),
                    priority: 0,
                    ..Default::default()
                });
            }
            let remote_ready = svc.groups.iter().any(|g| {
                g.site != site
                    && g.ready_endpoints().next().is_some()
                    && catalog
                        .site(&g.site)
                        .is_none_or(|s| !matches!(s.state, SiteState::Withdrawn { .. }))
            });
            if let Some(gateway) = services
                .get(&(svc.key.clone(), port.port))
                .filter(|_| remote_ready)
            {
                groups.push(LocalityLbEndpoints {
                    locality: Some(Locality {
                        sub_zone: "meshbridge-gateway".into(),
                        ..Default::default()
                    }),
                    lb_endpoints: vec![lb_endpoint(*gateway, 1)],
                    load_balancing_weight: Some(UInt32Value { value: 1 }),
                    priority: u32::try_from(groups.len()).unwrap_or(u32::MAX),
                    ..Default::default()
                });
            }
            let cla = ClusterLoadAssignment {
                cluster_name: name.clone(),
                endpoints: groups,
                ..Default::default()
            };
            endpoints.insert(name.clone(), any(&cla));
            if let Some(ip) = listener_address {
                let listener = tcp_listener(&name, SocketAddr::new(ip, port.port));
                listeners.insert(name, any(&listener));
            }
        }
    }
    let mut types = BTreeMap::new();
    types.insert(CLUSTER, versioned(clusters));
    types.insert(ENDPOINT, versioned(endpoints));
    types.insert(LISTENER, versioned(listeners));
    Snapshot {
        revision: catalog.revision,
        types,
        api_listeners: versioned(api_listeners),
    }
}

/// A proxyless gRPC client's listener `name`: an HTTP connection manager whose only route
/// sends every request to `cluster`.
fn api_listener(name: &str, cluster: &str) -> Listener {
    let routes = RouteConfiguration {
        name: name.to_string(),
        virtual_hosts: vec![VirtualHost {
            name: name.to_string(),
            domains: vec!["*".into()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix(String::new())),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                        cluster.to_string(),
                    )),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let manager = HttpConnectionManager {
        stat_prefix: name.replace([':', '.'], "_"),
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(routes)),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(
                any(&Router::default()),
            )),
            ..Default::default()
        }],
        ..Default::default()
    };
    Listener {
        name: name.to_string(),
        api_listener: Some(ApiListener {
            api_listener: Some(any(&manager)),
        }),
        ..Default::default()
    }
}

fn local_endpoints(svc: &MergedService, site: &str, port_name: &str) -> Vec<LbEndpoint> {
    svc.groups
        .iter()
        .filter(|g| g.site == site)
        .flat_map(|g| {
            let target = g.port(port_name).map(|p| p.target_port);
            g.ready_endpoints().filter_map(move |e| {
                target.map(|t| lb_endpoint(SocketAddr::new(e.address, t), e.weight))
            })
        })
        .collect()
}

fn eds_cluster(name: &str) -> Cluster {
    Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ConfigSource {
                config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
                    AggregatedConfigSource {},
                )),
                resource_api_version: ApiVersion::V3 as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        connect_timeout: Some(Duration {
            seconds: CONNECT_TIMEOUT_SECS,
            nanos: 0,
        }),
        ..Default::default()
    }
}

fn tcp_listener(name: &str, addr: SocketAddr) -> Listener {
    let proxy = TcpProxy {
        stat_prefix: name.replace([':', '.'], "_"),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(name.to_string())),
        ..Default::default()
    };
    Listener {
        name: name.to_string(),
        address: Some(socket(addr)),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.tcp_proxy".into(),
                config_type: Some(filter::ConfigType::TypedConfig(any(&proxy))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}
