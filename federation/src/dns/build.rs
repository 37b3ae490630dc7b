//! From the catalog to owner names and record sets, per the Kubernetes MCS DNS
//! specification (KEP-1645 `specification.md`), as seen from this site:
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
use std::net::IpAddr;

use hickory_proto::rr::rdata::{A, AAAA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use meshbridge_core::model::{
    Catalog, Endpoint, EndpointGroup, Locality, MergedService, ServiceKey, SiteRank, rank_sites,
};
use meshbridge_core::vip::assign_catalog;
use tracing::warn;

use super::config::Config;

/// One name's record sets: (type, records, additionals).
pub(crate) type NodeSets = Vec<(RecordType, Vec<Record>, Vec<Record>)>;

/// Owner names and their record sets, while building.
pub(crate) struct Sets {
    zone: Name,
    ttl: u32,
    nodes: HashMap<Name, NodeSets>,
}

impl Sets {
    pub(crate) fn new(zone: Name, ttl: u32) -> Self {
        Self {
            zone,
            ttl,
            nodes: HashMap::new(),
        }
    }

    pub(crate) fn zone(&self) -> &Name {
        &self.zone
    }

    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Make `name` and every name between it and the apex exist (empty non-terminals
    /// answer NODATA, not NXDOMAIN: RFC 8020).
    pub(crate) fn touch(&mut self, name: &Name) {
        let mut name = name.clone();
        while self.zone.zone_of(&name) {
            if self.nodes.contains_key(&name) {
                return;
            }
            let parent = name.base_name();
            self.nodes.insert(name, Vec::new());
            name = parent;
        }
    }

    fn set(
        &mut self,
        name: &Name,
        rtype: RecordType,
    ) -> &mut (RecordType, Vec<Record>, Vec<Record>) {
        self.touch(name);
        let sets = self.nodes.entry(name.clone()).or_default();
        let i = match sets.iter().position(|(t, _, _)| *t == rtype) {
            Some(i) => i,
            None => {
                sets.push((rtype, Vec::new(), Vec::new()));
                sets.len() - 1
            }
        };
        &mut sets[i]
    }

    /// Add a record. Callers do not add the same record twice.
    pub(crate) fn add(&mut self, name: &Name, data: RData) {
        let record = Record::from_rdata(name.clone(), self.ttl, data);
        self.set(name, record.record_type()).1.push(record);
    }

    /// Add a record, and records for the additional section of answers of its type.
    pub(crate) fn add_with_additionals(&mut self, name: &Name, data: RData, add: Vec<Record>) {
        let record = Record::from_rdata(name.clone(), self.ttl, data);
        let set = self.set(name, record.record_type());
        set.1.push(record);
        if set.2.is_empty() {
            set.2 = add;
        }
    }

    pub(crate) fn into_nodes(self) -> impl Iterator<Item = (Name, NodeSets)> {
        self.nodes.into_iter()
    }

    fn address(&self, name: &Name, ip: IpAddr) -> Record {
        Record::from_rdata(name.clone(), self.ttl, address(ip))
    }
}

fn address(ip: IpAddr) -> RData {
    match ip {
        IpAddr::V4(ip) => RData::A(A(ip)),
        IpAddr::V6(ip) => RData::AAAA(AAAA(ip)),
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

/// Add every exported service.
pub(crate) fn services(sets: &mut Sets, config: &Config, catalog: &Catalog) {
    let vips = config.vip_range.map(|r| assign_catalog(r, catalog));
    let from = catalog
        .site(&config.site)
        .map(|s| s.locality.clone())
        .unwrap_or_default();
    for svc in catalog.services() {
        let Some(base) = service_name(sets.zone(), &svc.key) else {
            warn!(service = %svc.key, "service name does not fit in a DNS name; not served");
            continue;
        };
        if svc.headless {
            headless(sets, config, &from, &svc, &base);
        } else {
            let addrs: Vec<IpAddr> = match &vips {
                Some(vips) => vips
                    .get(&svc.key)
                    .map(|ip| IpAddr::V4(*ip))
                    .into_iter()
                    .collect(),
                None => svc
                    .groups
                    .iter()
                    .filter(|g| g.site == config.site)
                    .flat_map(|g| g.ready_endpoints().map(|e| e.address))
                    .collect(),
            };
            cluster_ip(sets, &svc, &base, addrs);
        }
    }
}

/// A service with one address per family that reaches it from here.
fn cluster_ip(sets: &mut Sets, svc: &MergedService, base: &Name, addrs: Vec<IpAddr>) {
    sets.touch(base);
    let mut seen = HashSet::new();
    let mut glue = Vec::new();
    for ip in addrs {
        if seen.insert(ip) {
            sets.add(base, address(ip));
            glue.push(sets.address(base, ip));
        }
    }
    let mut numbers = HashSet::new();
    for port in &svc.ports {
        let srv = RData::SRV(SRV::new(0, 100, port.port, base.clone()));
        // The same number over two protocols is one SRV record at the service name.
        if numbers.insert(port.port) {
            sets.add_with_additionals(base, srv.clone(), glue.clone());
        }
        if port.name.is_empty() {
            continue;
        }
        let proto = format!("_{}", port.protocol);
        let label = format!("_{}", port.name);
        if let Some(name) = name_under(&[&label, &proto], base) {
            sets.add_with_additionals(&name, srv, glue.clone());
        }
    }
}

/// A headless service: endpoint addresses, per-host names, SRV to each host.
fn headless(sets: &mut Sets, config: &Config, from: &Locality, svc: &MergedService, base: &Name) {
    // Best first; withdrawn sites and sites without a ready endpoint are left out.
    let ranked = rank_sites(from, &config.site, &svc.groups);
    if ranked.is_empty() {
        return;
    }
    let (fresh, stale): (Vec<_>, Vec<_>) = ranked
        .iter()
        .partition(|(rank, _)| *rank != SiteRank::Stale);
    let fresh: Vec<&EndpointGroup> = fresh.into_iter().map(|(_, g)| g).collect();
    let stale: Vec<&EndpointGroup> = stale.into_iter().map(|(_, g)| g).collect();

    sets.touch(base);
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
            sets.add(base, address(ip));
        }
    }

    // Per-host names in every listed site, stale ones included: they name one site.
    let mut hosts: HashMap<(&str, String), Name> = HashMap::new();
    for (_, group) in &ranked {
        let mut added: HashSet<(String, IpAddr)> = HashSet::new();
        for ep in group.ready_endpoints() {
            let host = host_label(ep);
            let Some(name) = name_under(&[&host, &group.site], base) else {
                continue;
            };
            if added.insert((host.clone(), ep.address)) {
                sets.add(&name, address(ep.address));
            }
            hosts.insert((group.site.as_str(), host), name);
        }
    }

    let chosen = if fresh.is_empty() { &stale } else { &fresh };
    for port in &svc.ports {
        let named = (!port.name.is_empty())
            .then(|| {
                name_under(
                    &[&format!("_{}", port.name), &format!("_{}", port.protocol)],
                    base,
                )
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
                let srv = RData::SRV(SRV::new(0, weight, site_port.target_port, target.clone()));
                if let Some(named) = &named {
                    sets.add(named, srv.clone());
                }
                sets.add(base, srv);
            }
        }
    }
}
