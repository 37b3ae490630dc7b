//! The answer index: every name of the zone with its record sets, precomputed from one
//! catalog, so that answering is two hash lookups (the service, then the name).
//!
//! Plain data, no I/O. [`Index::update`] recomputes only the services whose exports changed
//! since the catalog the index was built from (found by walking both catalogs' export maps,
//! which share the `Arc` of every unchanged export), and shares every other service's names,
//! a namespace's map included when nothing in it changed. When a site's lease state or
//! locality changed, or (in VIP mode) the set of services did, it falls back to
//! [`Index::rebuild`], which walks every service but still reuses the names of those whose
//! exports, sites, VIP and import address did not change. A service this site imports under
//! an address of its own (a Kubernetes site's ClusterSetIP, in [`Catalog::imports`])
//! answers that address.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use hickory_proto::rr::rdata::{NS, SOA, TXT};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use meshbridge_core::model::{
    Catalog, Export, Import, Locality, ServiceKey, SiteState, merge_exports,
};
use meshbridge_core::vip::assign_catalog;
use tracing::warn;

use super::DnsError;
use super::build::{FxBuild, Node, Nodes, Sets, address, wire_len};
use super::config::Config;
use super::service::{self, Inputs, View};

/// The version of the MCS DNS schema served in `dns-version.<zone>`.
/// The MCS DNS specification's (KEP-1645 `specification.md`, §2.2): its schema is 1.0.0
/// (the cluster-local specification has moved on to 1.1.0; this zone follows the
/// multicluster one).
pub const DNS_SCHEMA_VERSION: &str = "1.0.0";

type Namespace = HashMap<String, Arc<ServiceZone>, FxBuild>;
type Services = HashMap<String, Arc<Namespace>, FxBuild>;

/// Every name of the zone, as seen from one site, at one catalog revision.
pub struct Index {
    zone: Name,
    zone_labels: usize,
    /// The apex, `dns-version`, the name server: names outside `svc.<zone>`.
    apex: Nodes,
    /// Namespace, then service name.
    services: Services,
    /// PTR records under `in-addr.arpa` / `ip6.arpa` of every service's addresses.
    ptr: PtrIndex,
    from: Locality,
    /// The apex SOA, for the authority section of negative answers.
    soa: [Record; 1],
    soa_len: usize,
    names: usize,
    /// Names under `svc.<zone>` that belong to a service (the sum over `services`).
    service_names: usize,
    revision: u64,
    /// Unique per index built in this process (answer caches are valid for one index).
    generation: u64,
    forwarding: bool,
}

/// The next [`Index::generation`].
static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The names of one service, with what they were computed from.
pub(crate) struct ServiceZone {
    inputs: Inputs,
    nodes: Nodes,
    /// PTR records of its addresses (ClusterSetIP or headless endpoints).
    ptrs: service::Ptrs,
}

/// Reverse lookups: an address → the service zone holding its PTR record, and where.
type PtrIndex = HashMap<IpAddr, (Arc<ServiceZone>, usize), FxBuild>;

/// What the index holds for a question.
#[derive(Debug)]
pub(crate) enum Lookup<'a> {
    Found(Found<'a>),
    /// The name exists without records of this type.
    NoData {
        soa: &'a [Record],
        soa_len: usize,
    },
    /// No such name in the zone.
    NxDomain {
        soa: &'a [Record],
        soa_len: usize,
    },
    /// The name is not in the zone.
    OutOfZone,
}

#[derive(Debug)]
pub(crate) struct Found<'a> {
    pub answers: &'a [Record],
    pub additionals: &'a [Record],
    pub answers_len: usize,
    pub additionals_len: usize,
}

impl Index {
    /// Index `catalog` as seen from `config.site`.
    pub fn build(config: &Config, catalog: &Catalog) -> Result<Index, DnsError> {
        Self::make(config, catalog, None)
    }

    /// Index `catalog` like [`Index::build`], reusing this index's names of services that
    /// did not change. `config` must be the one this index was built with.
    pub fn rebuild(&self, config: &Config, catalog: &Catalog) -> Result<Index, DnsError> {
        Self::make(config, catalog, Some(self))
    }

    fn make(config: &Config, catalog: &Catalog, prev: Option<&Index>) -> Result<Index, DnsError> {
        let zone = config.zone_name().map_err(|reason| DnsError::Zone {
            zone: config.zone.clone(),
            reason,
        })?;
        let ttl = config.ttl_secs;
        let from = catalog
            .site(&config.site)
            .map(|s| s.locality.clone())
            .unwrap_or_default();
        // A new point of view changes every headless service.
        let prev = prev.filter(|p| p.from == from && p.zone == zone);
        let vips = config.vip_range.map(|r| assign_catalog(r, catalog));
        let imports = site_imports(catalog, &config.site);
        let view = View {
            site: &config.site,
            from: &from,
            ttl,
            vips: vips.is_some(),
        };
        let mut services: HashMap<String, Namespace, FxBuild> = HashMap::default();
        let mut names = 0;
        let mut group: Vec<&Arc<Export>> = Vec::new();
        let mut exports = catalog.exports.iter().peekable();
        while let Some(((key, _), export)) = exports.next() {
            group.push(export);
            if exports.peek().is_some_and(|((next, _), _)| next == key) {
                continue;
            }
            let vip = vips.as_ref().and_then(|v| v.get(key).copied());
            let import = imports.get(key).copied();
            let reused = prev
                .and_then(|p| p.service_zone(key))
                .filter(|z| z.inputs.same(catalog, &group, vip, import));
            let zone_of_service = match reused {
                Some(z) => Some(z.clone()),
                None => service_zone(&view, &zone, catalog, key, &group, vip, import),
            };
            group.clear();
            if let Some(z) = zone_of_service.filter(|z| !z.nodes.is_empty()) {
                names += z.nodes.len();
                match services.get_mut(&key.namespace) {
                    Some(ns) => ns.insert(key.name.clone(), z),
                    None => services
                        .entry(key.namespace.clone())
                        .or_default()
                        .insert(key.name.clone(), z),
                };
            }
        }
        let services = services
            .into_iter()
            .map(|(ns, m)| (ns, Arc::new(m)))
            .collect();
        Self::assemble(config, catalog, zone, from, services, names)
    }

    /// The index of `catalog`, the successor of `previous` (the catalog this index was built
    /// from, with the same `config`, or a later one that [`diff`] finds the same): recomputes
    /// the services whose exports differ, shares the rest.
    pub fn update(
        &self,
        config: &Config,
        previous: &Catalog,
        catalog: &Catalog,
    ) -> Result<Index, DnsError> {
        self.apply(config, catalog, diff(previous, catalog))
    }

    /// [`Index::update`] with the difference already known. Falls back to
    /// [`Index::rebuild`] when more than the changed services can have changed: a site's
    /// lease state or locality, or in VIP mode the assignment (an export added or removed,
    /// its creation revision changed, or a changed service had no names to take its VIP
    /// from).
    pub(crate) fn apply(
        &self,
        config: &Config,
        catalog: &Catalog,
        diff: CatalogDiff,
    ) -> Result<Index, DnsError> {
        let changed = match diff {
            CatalogDiff::Same => Vec::new(),
            CatalogDiff::Sites => return self.rebuild(config, catalog),
            CatalogDiff::Exports {
                services,
                vips_may_move,
            } => {
                if config.vip_range.is_some()
                    && (vips_may_move || services.iter().any(|k| self.service_zone(k).is_none()))
                {
                    return self.rebuild(config, catalog);
                }
                services
            }
        };
        self.patch(config, catalog, &changed)
    }

    /// This index with the names of `changed` services recomputed from `catalog`.
    fn patch(
        &self,
        config: &Config,
        catalog: &Catalog,
        changed: &[ServiceKey],
    ) -> Result<Index, DnsError> {
        let zone = self.zone.clone();
        let view = View {
            site: &config.site,
            from: &self.from,
            ttl: config.ttl_secs,
            vips: config.vip_range.is_some(),
        };
        let mut services = self.services.clone();
        let mut names = self.service_names;
        for key in changed {
            let exports: Vec<&Arc<Export>> = catalog
                .exports
                .range((key.clone(), String::new())..)
                .take_while(|((k, _), _)| k == key)
                .map(|(_, e)| e)
                .collect();
            let old = self.service_zone(key);
            // VIP mode: the assignment did not move (see `apply`).
            let vip = old.and_then(|z| z.inputs.vip());
            let import = catalog.imports.get(&(key.clone(), config.site.clone()));
            let new = if exports.is_empty() {
                None
            } else {
                service_zone(&view, &zone, catalog, key, &exports, vip, import)
            }
            .filter(|z| !z.nodes.is_empty());
            names -= old.map_or(0, |z| z.nodes.len());
            names += new.as_ref().map_or(0, |z| z.nodes.len());
            match new {
                Some(z) => {
                    let ns = services.entry(key.namespace.clone()).or_default();
                    Arc::make_mut(ns).insert(key.name.clone(), z);
                }
                None => {
                    if let Some(ns) = services.get_mut(&key.namespace) {
                        Arc::make_mut(ns).remove(&key.name);
                        if ns.is_empty() {
                            services.remove(&key.namespace);
                        }
                    }
                }
            }
        }
        Self::assemble(config, catalog, zone, self.from.clone(), services, names)
    }

    /// The apex and SOA of `catalog`'s revision around `services`.
    fn assemble(
        config: &Config,
        catalog: &Catalog,
        zone: Name,
        from: Locality,
        services: Services,
        service_names: usize,
    ) -> Result<Index, DnsError> {
        let ttl = config.ttl_secs;
        let apex = apex(config, &zone, catalog.revision)?;
        // One PTR per address (DNS allows no more): where two names claim one, the smaller
        // name wins, whatever order the services are walked in.
        let mut ptr = PtrIndex::default();
        for z in services.values().flat_map(|ns| ns.values()) {
            for (i, (ip, record)) in z.ptrs.iter().enumerate() {
                let keep = ptr.get(ip).is_some_and(|(other, j)| {
                    other.ptrs[*j].1.data.to_string() <= record.data.to_string()
                });
                if !keep {
                    ptr.insert(*ip, (z.clone(), i));
                }
            }
        }
        let soa = Record::from_rdata(zone.clone(), ttl, soa(&zone, catalog.revision, ttl)?);
        Ok(Index {
            zone_labels: usize::from(zone.num_labels()),
            names: service_names + apex.len() + services.len() + usize::from(!services.is_empty()),
            service_names,
            soa_len: wire_len(&soa),
            soa: [soa],
            zone,
            apex,
            services,
            ptr,
            from,
            revision: catalog.revision,
            generation: GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            forwarding: config.upstream.is_some(),
        })
    }

    /// Every name with its records and the name count, in a canonical order: two indexes
    /// answer alike exactly when their dumps are equal.
    #[cfg(test)]
    pub(crate) fn dump(&self) -> (usize, Vec<String>) {
        let nodes = self
            .services
            .values()
            .flat_map(|ns| ns.values())
            .flat_map(|z| z.nodes.iter())
            .chain(self.apex.iter());
        let mut out: Vec<String> = nodes
            .map(|(name, node)| format!("{name} {node:?}"))
            .chain(
                self.ptr
                    .iter()
                    .map(|(ip, (z, i))| format!("PTR {ip} {}", z.ptrs[*i].1)),
            )
            .collect();
        out.sort();
        (self.names, out)
    }

    /// Whether this index shares the map of namespace `ns` with `other` (not copied).
    #[cfg(test)]
    pub(crate) fn shares_namespace(&self, other: &Index, ns: &str) -> bool {
        matches!(
            (self.services.get(ns), other.services.get(ns)),
            (Some(a), Some(b)) if Arc::ptr_eq(a, b)
        )
    }

    pub(crate) fn service_zone(&self, key: &ServiceKey) -> Option<&Arc<ServiceZone>> {
        self.services.get(&key.namespace)?.get(&key.name)
    }

    /// The catalog revision this index was built from (also the SOA serial, mod 2^32).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// A number no other index of this process has: what answer caches are keyed by.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// How many names the zone holds (including names that only have names below them).
    pub fn len(&self) -> usize {
        self.names
    }

    pub fn is_empty(&self) -> bool {
        self.names == 0
    }

    /// Whether queries outside the zone go to an upstream resolver.
    pub(crate) fn forwarding(&self) -> bool {
        self.forwarding
    }

    pub(crate) fn lookup(&self, name: &LowerName, rtype: RecordType) -> Lookup<'_> {
        let name: &Name = name;
        let (soa, soa_len) = (&self.soa[..], self.soa_len);
        if !self.zone.zone_of(name) {
            return self.reverse(name, rtype);
        }
        // Labels right to left below the apex: `svc`, namespace, service, ...
        let mut labels = name.iter().rev().skip(self.zone_labels);
        let node = if labels.next() == Some(b"svc".as_slice()) {
            match (labels.next(), labels.next()) {
                (None, _) if !self.services.is_empty() => return Lookup::NoData { soa, soa_len },
                (None, _) => None,
                (Some(ns), None) => match std::str::from_utf8(ns) {
                    Ok(ns) if self.services.contains_key(ns) => {
                        return Lookup::NoData { soa, soa_len };
                    }
                    _ => None,
                },
                (Some(ns), Some(svc)) => {
                    match (std::str::from_utf8(ns), std::str::from_utf8(svc)) {
                        (Ok(ns), Ok(svc)) => self
                            .services
                            .get(ns)
                            .and_then(|m| m.get(svc))
                            .and_then(|z| z.nodes.get(name)),
                        _ => None,
                    }
                }
            }
        } else {
            self.apex.get(name)
        };
        let Some(node) = node else {
            return Lookup::NxDomain { soa, soa_len };
        };
        found(node, rtype).unwrap_or(Lookup::NoData { soa, soa_len })
    }
}

impl Index {
    /// A PTR question for one of the services' addresses; anything else outside the zone
    /// is not ours (forwarded or refused).
    fn reverse(&self, name: &Name, rtype: RecordType) -> Lookup<'_> {
        if self.ptr.is_empty() || !matches!(rtype, RecordType::PTR | RecordType::ANY) {
            return Lookup::OutOfZone;
        }
        let ip = match name.parse_arpa_name() {
            Ok(net) if net.prefix_len() == net.max_prefix_len() => net.addr(),
            _ => return Lookup::OutOfZone,
        };
        match self.ptr.get(&ip) {
            Some((z, i)) => {
                let record = &z.ptrs[*i].1;
                Lookup::Found(Found {
                    answers: std::slice::from_ref(record),
                    additionals: &[],
                    answers_len: wire_len(record),
                    additionals_len: 0,
                })
            }
            None => Lookup::OutOfZone,
        }
    }
}

fn found(node: &Node, rtype: RecordType) -> Option<Lookup<'_>> {
    if rtype == RecordType::ANY {
        return (!node.records.is_empty()).then_some(Lookup::Found(Found {
            answers: &node.records,
            additionals: &[],
            answers_len: node.len,
            additionals_len: 0,
        }));
    }
    let set = node.sets.iter().find(|s| s.rtype == rtype)?;
    let answers = node.records.get(set.start..set.end)?;
    (!answers.is_empty()).then_some(Lookup::Found(Found {
        answers,
        additionals: &set.additionals,
        answers_len: set.len,
        additionals_len: set.additionals_len,
    }))
}

/// What changed between two catalogs, as far as DNS answers can tell.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CatalogDiff {
    /// Nothing DNS answers from (a heartbeat only moves a lease time).
    Same,
    /// A site came or went, or changed lease state or locality: any service may change.
    Sites,
    /// Only exports changed: the services they belong to, in order, and whether the VIP
    /// assignment may have moved (an export added or removed, or its creation revision
    /// changed).
    Exports {
        services: Vec<ServiceKey>,
        vips_may_move: bool,
    },
}

/// Compare two catalogs by what DNS answers from. Exports are walked in key order and
/// compared by pointer first: the catalog keeps an unchanged export's `Arc` (always under
/// the export's own key), so the walk costs a pointer compare per unchanged export.
pub(crate) fn diff(previous: &Catalog, catalog: &Catalog) -> CatalogDiff {
    let state = |s: &SiteState| std::mem::discriminant(s);
    let sites_same = previous.sites.len() == catalog.sites.len()
        && previous
            .sites
            .iter()
            .zip(&catalog.sites)
            .all(|((na, a), (nb, b))| {
                na == nb && state(&a.state) == state(&b.state) && a.locality == b.locality
            });
    if !sites_same {
        return CatalogDiff::Sites;
    }
    let mut services: Vec<ServiceKey> = Vec::new();
    let mut vips_may_move = false;
    let (mut a, mut b) = (
        previous.exports.iter().peekable(),
        catalog.exports.iter().peekable(),
    );
    loop {
        let step = match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some((_, ea)), Some((_, eb))) if Arc::ptr_eq(ea, eb) => Ordering::Equal,
            (Some((ka, _)), Some((kb, _))) => ka.cmp(kb),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
        };
        let key = match step {
            Ordering::Equal => {
                let (Some((key, ea)), Some((_, eb))) = (a.next(), b.next()) else {
                    break;
                };
                if Arc::ptr_eq(ea, eb) || ea == eb {
                    continue;
                }
                vips_may_move |= ea.created_revision != eb.created_revision;
                key
            }
            // An export removed (Less) or added (Greater).
            Ordering::Less | Ordering::Greater => {
                vips_may_move = true;
                let side = if step == Ordering::Less {
                    &mut a
                } else {
                    &mut b
                };
                match side.next() {
                    Some((key, _)) => key,
                    None => break,
                }
            }
        };
        if services.last() != Some(&key.0) {
            services.push(key.0.clone());
        }
    }
    // Import addresses changed (any site's: cheap, and only this site's change answers).
    let before = services.len();
    for (service, _) in changed_records(&previous.imports, &catalog.imports) {
        services.push(service.clone());
    }
    if services.len() > before {
        services.sort();
        services.dedup();
    }
    if services.is_empty() {
        CatalogDiff::Same
    } else {
        CatalogDiff::Exports {
            services,
            vips_may_move,
        }
    }
}

/// Keys whose records differ between two maps that share the `Arc` of every unchanged
/// record (compared by pointer first), in key order.
fn changed_records<'a, K: Ord, T: PartialEq>(
    a: &'a BTreeMap<K, Arc<T>>,
    b: &'a BTreeMap<K, Arc<T>>,
) -> Vec<&'a K> {
    let mut out = Vec::new();
    let (mut a, mut b) = (a.iter().peekable(), b.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some((ka, va)), Some((kb, vb))) if ka == kb => {
                if !Arc::ptr_eq(va, vb) && va != vb {
                    out.push(*ka);
                }
                a.next();
                b.next();
            }
            (Some((ka, _)), Some((kb, _))) if ka < kb => {
                out.push(*ka);
                a.next();
            }
            (Some((ka, _)), None) => {
                out.push(*ka);
                a.next();
            }
            (_, Some((kb, _))) => {
                out.push(*kb);
                b.next();
            }
        }
    }
    out
}

/// This site's import address records, by service.
fn site_imports<'a>(catalog: &'a Catalog, site: &str) -> HashMap<&'a ServiceKey, &'a Arc<Import>> {
    catalog
        .imports
        .iter()
        .filter(|((_, s), _)| s == site)
        .map(|((k, _), i)| (k, i))
        .collect()
}

/// Merge `exports` (all of service `key`) and build its names.
fn service_zone(
    view: &View<'_>,
    zone: &Name,
    catalog: &Catalog,
    key: &ServiceKey,
    exports: &[&Arc<Export>],
    vip: Option<Ipv4Addr>,
    import: Option<&Arc<Import>>,
) -> Option<Arc<ServiceZone>> {
    let Some(base) = service::service_name(zone, key) else {
        warn!(service = %key, "service name does not fit in a DNS name; not served");
        return None;
    };
    let merged = merge_exports(key, exports.iter().map(|e| &***e), &catalog.sites);
    let (nodes, ptrs) = service::nodes(view, &merged, base, vip, import.map(|i| &**i));
    Some(Arc::new(ServiceZone {
        inputs: Inputs::new(catalog, exports, vip, import),
        nodes,
        ptrs,
    }))
}

fn zone_error(zone: &Name) -> impl Fn(hickory_proto::ProtoError) -> DnsError + '_ {
    move |e| DnsError::Zone {
        zone: zone.to_string(),
        reason: e.to_string(),
    }
}

/// `ns.dns.<zone>`: the name server of the zone.
fn ns_name(zone: &Name) -> Result<Name, DnsError> {
    Name::from_labels(["ns", "dns"])
        .and_then(|n| n.append_domain(zone))
        .map_err(zone_error(zone))
}

fn soa(zone: &Name, revision: u64, ttl: u32) -> Result<RData, DnsError> {
    let mname = ns_name(zone)?;
    let rname = Name::from_labels(["hostmaster"])
        .and_then(|n| n.append_domain(zone))
        .map_err(zone_error(zone))?;
    // Serial arithmetic (RFC 1982) wraps: the low 32 bits of the revision.
    let serial = (revision & u64::from(u32::MAX)) as u32;
    Ok(RData::SOA(SOA::new(
        mname, rname, serial, 7200, 1800, 86_400, ttl,
    )))
}

/// SOA, NS (with the server's address when it listens on one), and `dns-version`.
fn apex(config: &Config, zone: &Name, revision: u64) -> Result<Nodes, DnsError> {
    let mut sets = Sets::new(zone.clone(), config.ttl_secs);
    let ns = ns_name(zone)?;
    sets.add(zone, soa(zone, revision, config.ttl_secs)?);
    let ip = config
        .listen_addr()
        .ok()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_unspecified());
    let glue: Vec<Record> = ip.iter().map(|ip| sets.address(&ns, *ip)).collect();
    if let Some(ip) = ip {
        sets.add(&ns, address(ip));
    }
    sets.touch(&ns);
    sets.add_with_additionals(zone, RData::NS(NS(ns)), &glue);
    let version = Name::from_labels(["dns-version"])
        .and_then(|n| n.append_domain(zone))
        .map_err(zone_error(zone))?;
    let text = TXT::new(vec![DNS_SCHEMA_VERSION.to_owned()]);
    sets.add(&version, RData::TXT(text));
    Ok(sets.finish())
}
