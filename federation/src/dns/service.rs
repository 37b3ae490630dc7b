//! The names of one service, per the Kubernetes MCS DNS specification (KEP-1645
//! `specification.md`), as seen from this site:
//!
//! - `<svc>.<ns>.svc.<zone>` A/AAAA: the VIP in VIP mode, else the service's ready
//!   endpoints in this site; headless: every ready endpoint, fresh sites only unless no fresh
//!   site has an address of that family;
//! - `<hostname>.<site>.<svc>.<ns>.svc.<zone>` A/AAAA for each ready endpoint of a headless
//!   service (an endpoint without a hostname is named by its address, `10-1-2-3`, the
//!   "system-assigned identifier" of the specification);
//! - `_<port>._<proto>.<svc>.<ns>.svc.<zone>` SRV per named port, and SRV at the service name
//!   for every port: to the service name at the service port, or for a headless service to
//!   each endpoint's host name at the site's target port (where the endpoint listens, as
//!   CoreDNS does with EndpointSlice ports).
//!
//! A headless service with no ready endpoint has no names at all (NXDOMAIN, as the
//! specification asks).

use std::collections::{HashMap, HashSet};
use std::mem::Discriminant;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use hickory_proto::rr::rdata::{PTR, SRV};
use hickory_proto::rr::{Name, RData, Record};
use meshbridge_core::model::{
    Catalog, Endpoint, EndpointGroup, Export, Import, Locality, MergedService, ServiceKey,
    SiteRank, SiteState, rank_sites,
};

use super::build::{Nodes, Sets, address};

/// Everything a service's names are computed from, to tell when they can be reused.
pub(crate) struct Inputs {
    exports: Vec<Arc<Export>>,
    sites: Vec<(Discriminant<SiteState>, Locality)>,
    vip: Option<Ipv4Addr>,
    import: Option<Arc<Import>>,
}

impl Inputs {
    pub(crate) fn new(
        catalog: &Catalog,
        exports: &[&Arc<Export>],
        vip: Option<Ipv4Addr>,
        import: Option<&Arc<Import>>,
    ) -> Self {
        Self {
            exports: exports.iter().map(|e| Arc::clone(e)).collect(),
            sites: exports
                .iter()
                .map(|e| site_inputs(catalog, &e.site))
                .collect(),
            vip,
            import: import.cloned(),
        }
    }

    /// The VIP the names were built with (VIP mode).
    pub(crate) fn vip(&self) -> Option<Ipv4Addr> {
        self.vip
    }

    /// Whether these are the inputs of `exports` in `catalog` (exports compared by identity:
    /// the catalog keeps an unchanged export's `Arc`).
    pub(crate) fn same(
        &self,
        catalog: &Catalog,
        exports: &[&Arc<Export>],
        vip: Option<Ipv4Addr>,
        import: Option<&Arc<Import>>,
    ) -> bool {
        self.vip == vip
            && match (&self.import, import) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
                _ => false,
            }
            && self.exports.len() == exports.len()
            && self
                .exports
                .iter()
                .zip(exports)
                .all(|(a, b)| Arc::ptr_eq(a, b))
            && self
                .sites
                .iter()
                .zip(exports)
                .all(|((state, locality), e)| match catalog.site(&e.site) {
                    Some(s) => {
                        *state == std::mem::discriminant(&s.state) && *locality == s.locality
                    }
                    None => {
                        *state == std::mem::discriminant(&SiteState::Fresh)
                            && *locality == Locality::default()
                    }
                })
    }
}

fn site_inputs(catalog: &Catalog, site: &str) -> (Discriminant<SiteState>, Locality) {
    match catalog.site(site) {
        Some(s) => (std::mem::discriminant(&s.state), s.locality.clone()),
        None => (
            std::mem::discriminant(&SiteState::Fresh),
            Locality::default(),
        ),
    }
}

fn name_under(labels: &[&str], base: &Name) -> Option<Name> {
    Name::from_labels(labels.iter().copied())
        .and_then(|n| n.append_domain(base))
        .ok()
}

/// `<svc>.<ns>.svc.<zone>`.
pub(crate) fn service_name(zone: &Name, key: &ServiceKey) -> Option<Name> {
    name_under(&[&key.name, &key.namespace, "svc"], zone)
}

/// The label naming an endpoint: its hostname, else its address with dashes.
fn host_label(ep: &Endpoint) -> String {
    match &ep.hostname {
        Some(h) => h.clone(),
        None => ep.address.to_string().replace(['.', ':'], "-"),
    }
}

/// What the names of a service depend on besides its own exports.
pub(crate) struct View<'a> {
    pub site: &'a str,
    pub from: &'a Locality,
    pub ttl: u32,
    /// VIP mode.
    pub vips: bool,
}

/// PTR records of a service's addresses: `(address, <reverse name> PTR <service name>)`.
pub(crate) type Ptrs = Box<[(IpAddr, Record)]>;

fn ptr(ip: IpAddr, target: &Name, ttl: u32) -> (IpAddr, Record) {
    (
        ip,
        Record::from_rdata(Name::from(ip), ttl, RData::PTR(PTR(target.clone()))),
    )
}

/// The names of `svc` (empty when it has none), and the PTR records of its addresses (MCS
/// DNS §2.3.3 and §2.4.3: a ClusterSetIP names the service, a headless endpoint its host
/// name). `import` is this site's import address record of the service, if any.
pub(crate) fn nodes(
    view: &View<'_>,
    svc: &MergedService,
    base: Name,
    vip: Option<Ipv4Addr>,
    import: Option<&Import>,
) -> (Nodes, Ptrs) {
    let mut sets = Sets::new(base.clone(), view.ttl);
    let mut ptrs = Vec::new();
    if svc.headless {
        ptrs = headless(&mut sets, view, svc);
    } else {
        // A service only this site exports gets no listener (the gateway and agent bind
        // VIPs for imports only): it resolves to its own endpoints, VIP mode or not.
        let local_only = svc.groups.iter().all(|g| g.site == view.site);
        let addrs: Vec<IpAddr> = if let Some(import) = import.filter(|i| !i.ips.is_empty()) {
            // Where this site's own clients reach it (a Kubernetes site's ClusterSetIP, as
            // its adapter reported it): the same answer the cluster's CoreDNS gives.
            ptrs.extend(import.ips.iter().map(|ip| ptr(*ip, &base, view.ttl)));
            import.ips.clone()
        } else if view.vips && !local_only {
            ptrs.extend(vip.map(|v| ptr(IpAddr::V4(v), &base, view.ttl)));
            vip.map(IpAddr::V4).into_iter().collect()
        } else {
            svc.groups
                .iter()
                .filter(|g| g.site == view.site)
                .flat_map(|g| g.ready_endpoints().map(|e| e.address))
                .collect()
        };
        cluster_ip(&mut sets, svc, addrs);
    }
    (sets.finish(), ptrs.into_boxed_slice())
}

/// A service with one address per family that reaches it from here.
fn cluster_ip(sets: &mut Sets, svc: &MergedService, addrs: Vec<IpAddr>) {
    let base = sets.top().clone();
    sets.touch(&base);
    let mut seen = HashSet::new();
    let mut glue = Vec::new();
    for ip in addrs {
        if seen.insert(ip) {
            sets.add(&base, address(ip));
            glue.push(sets.address(&base, ip));
        }
    }
    let mut numbers = HashSet::new();
    for port in &svc.ports {
        let srv = RData::SRV(SRV::new(0, 100, port.port, base.clone()));
        // The same number over two protocols is one SRV record at the service name.
        if numbers.insert(port.port) {
            sets.add_with_additionals(&base, srv.clone(), &glue);
        }
        if port.name.is_empty() {
            continue;
        }
        let proto = format!("_{}", port.protocol);
        let label = format!("_{}", port.name);
        if let Some(name) = name_under(&[&label, &proto], &base) {
            sets.add_with_additionals(&name, srv, &glue);
        }
    }
}

/// A headless service: endpoint addresses, per-host names, SRV to each host; the PTR
/// records of the ready endpoints.
fn headless(sets: &mut Sets, view: &View<'_>, svc: &MergedService) -> Vec<(IpAddr, Record)> {
    // Best first; withdrawn sites and sites without a ready endpoint are left out.
    let ranked = rank_sites(view.from, view.site, &svc.groups);
    let mut ptrs = Vec::new();
    if ranked.is_empty() {
        return ptrs;
    }
    let base = sets.top().clone();
    let (fresh, stale): (Vec<_>, Vec<_>) = ranked
        .iter()
        .partition(|(rank, _)| *rank != SiteRank::Stale);
    let fresh: Vec<&EndpointGroup> = fresh.into_iter().map(|(_, g)| g).collect();
    let stale: Vec<&EndpointGroup> = stale.into_iter().map(|(_, g)| g).collect();

    sets.touch(&base);
    for v4 in [true, false] {
        let pick = |groups: &[&EndpointGroup]| -> Vec<IpAddr> {
            let mut seen = HashSet::new();
            groups
                .iter()
                .flat_map(|g| g.ready_endpoints().map(|e| e.address))
                .filter(|ip| ip.is_ipv4() == v4 && seen.insert(*ip))
                .collect()
        };
        let mut addrs = pick(&fresh);
        if addrs.is_empty() {
            addrs = pick(&stale);
        }
        for ip in addrs {
            sets.add(&base, address(ip));
        }
    }

    // Per-host names in every listed site, stale ones included: they name one site.
    let mut hosts: HashMap<(&str, String), Name> = HashMap::new();
    for (_, group) in &ranked {
        let mut added: HashSet<(String, IpAddr)> = HashSet::new();
        for ep in group.ready_endpoints() {
            let host = host_label(ep);
            let Some(name) = name_under(&[&host, &group.site], &base) else {
                continue;
            };
            if added.insert((host.clone(), ep.address)) {
                sets.add(&name, address(ep.address));
                ptrs.push(ptr(ep.address, &name, view.ttl));
            }
            hosts.insert((group.site.as_str(), host), name);
        }
    }

    let chosen = if fresh.is_empty() { &stale } else { &fresh };
    for port in &svc.ports {
        let named = (!port.name.is_empty())
            .then(|| {
                let proto = format!("_{}", port.protocol);
                name_under(&[&format!("_{}", port.name), &proto], &base)
            })
            .flatten();
        let mut seen = HashSet::new();
        for group in chosen {
            let Some(site_port) = group.port(&port.name) else {
                continue;
            };
            for ep in group.ready_endpoints() {
                let Some(target) = hosts.get(&(group.site.as_str(), host_label(ep))) else {
                    continue;
                };
                if !seen.insert(target.clone()) {
                    continue;
                }
                let weight = u16::try_from(ep.weight).unwrap_or(u16::MAX);
                let srv = SRV::new(0, weight, site_port.target_port, target.clone());
                let srv = RData::SRV(srv);
                if let Some(named) = &named {
                    sets.add(named, srv.clone());
                }
                sets.add(&base, srv);
            }
        }
    }
    ptrs
}
