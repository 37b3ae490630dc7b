//! The answer index: every name of the zone with its record sets, precomputed from one
//! catalog, so that answering is two hash lookups (the service, then the name).
//!
//! Plain data, no I/O. [`Index::rebuild`] reuses the names of every service whose exports,
//! sites and VIP did not change, so a change costs about the changed services.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use hickory_proto::rr::rdata::{NS, SOA, TXT};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use meshbridge_core::model::{Catalog, Export, Locality, ServiceKey, merge_exports};
use meshbridge_core::vip::assign_catalog;
use tracing::warn;

use super::DnsError;
use super::build::{FxBuild, Node, Nodes, Sets, address, wire_len};
use super::config::Config;
use super::service::{self, Inputs, View};

/// The version of the MCS DNS schema served in `dns-version.<zone>`.
pub const DNS_SCHEMA_VERSION: &str = "1.1.0";

type Services = HashMap<String, HashMap<String, Arc<ServiceZone>, FxBuild>, FxBuild>;

/// Every name of the zone, as seen from one site, at one catalog revision.
pub struct Index {
    zone: Name,
    zone_labels: usize,
    /// The apex, `dns-version`, the name server: names outside `svc.<zone>`.
    apex: Nodes,
    /// Namespace, then service name.
    services: Services,
    from: Locality,
    /// The apex SOA, for the authority section of negative answers.
    soa: [Record; 1],
    soa_len: usize,
    names: usize,
    revision: u64,
    forwarding: bool,
}

/// The names of one service, with what they were computed from.
pub(crate) struct ServiceZone {
    inputs: Inputs,
    nodes: Nodes,
}

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
        let view = View {
            site: &config.site,
            from: &from,
            ttl,
            vips: vips.is_some(),
        };
        let mut services = Services::default();
        let mut names = 0;
        let mut group: Vec<&Arc<Export>> = Vec::new();
        let mut exports = catalog.exports.iter().peekable();
        while let Some(((key, _), export)) = exports.next() {
            group.push(export);
            if exports.peek().is_some_and(|((next, _), _)| next == key) {
                continue;
            }
            let vip = vips.as_ref().and_then(|v| v.get(key).copied());
            let reused = prev
                .and_then(|p| p.service_zone(key))
                .filter(|z| z.inputs.same(catalog, &group, vip));
            let zone_of_service = match reused {
                Some(z) => Some(z.clone()),
                None => service_zone(&view, &zone, catalog, key, &group, vip),
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
        let apex = apex(config, &zone, catalog.revision)?;
        let soa = Record::from_rdata(zone.clone(), ttl, soa(&zone, catalog.revision, ttl)?);
        Ok(Index {
            zone_labels: usize::from(zone.num_labels()),
            names: names + apex.len() + services.len() + usize::from(!services.is_empty()),
            soa_len: wire_len(&soa),
            soa: [soa],
            zone,
            apex,
            services,
            from,
            revision: catalog.revision,
            forwarding: config.upstream.is_some(),
        })
    }

    pub(crate) fn service_zone(&self, key: &ServiceKey) -> Option<&Arc<ServiceZone>> {
        self.services.get(&key.namespace)?.get(&key.name)
    }

    /// The catalog revision this index was built from (also the SOA serial, mod 2^32).
    pub fn revision(&self) -> u64 {
        self.revision
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
            return Lookup::OutOfZone;
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

/// Merge `exports` (all of service `key`) and build its names.
fn service_zone(
    view: &View<'_>,
    zone: &Name,
    catalog: &Catalog,
    key: &ServiceKey,
    exports: &[&Arc<Export>],
    vip: Option<Ipv4Addr>,
) -> Option<Arc<ServiceZone>> {
    let Some(base) = service::service_name(zone, key) else {
        warn!(service = %key, "service name does not fit in a DNS name; not served");
        return None;
    };
    let merged = merge_exports(key, exports.iter().map(|e| &***e), &catalog.sites);
    Some(Arc::new(ServiceZone {
        inputs: Inputs::new(catalog, exports, vip),
        nodes: service::nodes(view, &merged, base, vip),
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
