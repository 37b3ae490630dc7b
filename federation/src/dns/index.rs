//! The answer index: every name of the zone with its record sets, precomputed from one
//! catalog, so that answering is one hash lookup.
//!
//! Plain data, no I/O: [`Index::build`] is a pure function of the catalog and the
//! configuration, rebuilt whenever the catalog changes.

use std::collections::HashMap;
use std::net::IpAddr;

use hickory_proto::rr::rdata::{A, AAAA, NS, SOA, TXT};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};
use meshbridge_core::model::Catalog;

use super::DnsError;
use super::build::{self, Sets};
use super::config::Config;

/// The version of the MCS DNS schema served in `dns-version.<zone>`.
pub const DNS_SCHEMA_VERSION: &str = "1.1.0";

/// Every name of the zone, as seen from one site, at one catalog revision.
pub struct Index {
    zone: LowerName,
    nodes: HashMap<LowerName, Node>,
    /// The apex SOA, for the authority section of negative answers.
    soa: Set,
    revision: u64,
    forwarding: bool,
}

/// The records of one name.
#[derive(Default)]
struct Node {
    sets: Vec<Set>,
    /// Every record of the name, for `ANY`.
    any: Set,
}

/// One record set, with the records an answer adds to the additional section.
#[derive(Default)]
struct Set {
    rtype: Option<RecordType>,
    records: Box<[Record]>,
    additionals: Box<[Record]>,
    /// Upper bound of the encoded size of `records`, then of `additionals`.
    records_len: usize,
    additionals_len: usize,
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
        let zone = config.zone_name().map_err(|reason| DnsError::Zone {
            zone: config.zone.clone(),
            reason,
        })?;
        let ttl = config.ttl_secs;
        let mut sets = Sets::new(zone.clone(), ttl);
        apex(&mut sets, config, catalog.revision)?;
        build::services(&mut sets, config, catalog);

        let soa_record = Record::from_rdata(zone.clone(), ttl, soa(&zone, catalog.revision, ttl)?);
        let mut scratch = Vec::with_capacity(512);
        let soa = Set::new(
            Some(RecordType::SOA),
            vec![soa_record],
            vec![],
            &mut scratch,
        );
        let mut nodes = HashMap::with_capacity(sets.len());
        for (name, list) in sets.into_nodes() {
            let mut node = Node::default();
            let mut any = Vec::new();
            for (rtype, records, additionals) in list {
                any.extend(records.iter().cloned());
                node.sets
                    .push(Set::new(Some(rtype), records, additionals, &mut scratch));
            }
            node.any = Set::new(None, any, vec![], &mut scratch);
            nodes.insert(LowerName::new(&name), node);
        }
        Ok(Index {
            zone: LowerName::new(&zone),
            nodes,
            soa,
            revision: catalog.revision,
            forwarding: config.upstream.is_some(),
        })
    }

    /// The catalog revision this index was built from (also the SOA serial, mod 2^32).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// How many names the zone holds (including names that only have names below them).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Whether queries outside the zone go to an upstream resolver.
    pub(crate) fn forwarding(&self) -> bool {
        self.forwarding
    }

    pub(crate) fn lookup(&self, name: &LowerName, rtype: RecordType) -> Lookup<'_> {
        let soa = &self.soa.records;
        let soa_len = self.soa.records_len;
        let Some(node) = self.nodes.get(name) else {
            return if self.zone.zone_of(name) {
                Lookup::NxDomain { soa, soa_len }
            } else {
                Lookup::OutOfZone
            };
        };
        let set = if rtype == RecordType::ANY {
            Some(&node.any)
        } else {
            node.sets.iter().find(|s| s.rtype == Some(rtype))
        };
        match set {
            Some(set) if !set.records.is_empty() => Lookup::Found(Found {
                answers: &set.records,
                additionals: &set.additionals,
                answers_len: set.records_len,
                additionals_len: set.additionals_len,
            }),
            _ => Lookup::NoData { soa, soa_len },
        }
    }
}

impl Set {
    fn new(
        rtype: Option<RecordType>,
        records: Vec<Record>,
        additionals: Vec<Record>,
        scratch: &mut Vec<u8>,
    ) -> Self {
        Self {
            rtype,
            records_len: wire_len(&records, scratch),
            additionals_len: wire_len(&additionals, scratch),
            records: records.into(),
            additionals: additionals.into(),
        }
    }
}

/// An upper bound of the size of `records` in a message: each is encoded on its own, so
/// nothing is compressed against the rest of the message.
fn wire_len(records: &[Record], scratch: &mut Vec<u8>) -> usize {
    records
        .iter()
        .map(|r| {
            scratch.clear();
            let mut enc = BinEncoder::new(scratch);
            match r.emit(&mut enc) {
                Ok(()) => scratch.len(),
                // Unencodable: never claim it fits.
                Err(_) => usize::from(u16::MAX),
            }
        })
        .sum()
}

/// `ns.dns.<zone>`: the name server of the zone.
fn ns_name(zone: &Name) -> Result<Name, DnsError> {
    Name::from_labels(["ns", "dns"])
        .and_then(|n| n.append_domain(zone))
        .map_err(|e| DnsError::Zone {
            zone: zone.to_string(),
            reason: e.to_string(),
        })
}

fn soa(zone: &Name, revision: u64, ttl: u32) -> Result<RData, DnsError> {
    let zone_err = |e: hickory_proto::ProtoError| DnsError::Zone {
        zone: zone.to_string(),
        reason: e.to_string(),
    };
    let mname = ns_name(zone)?;
    let rname = Name::from_labels(["hostmaster"])
        .and_then(|n| n.append_domain(zone))
        .map_err(zone_err)?;
    // Serial arithmetic (RFC 1982) wraps: the low 32 bits of the revision.
    let serial = (revision & u64::from(u32::MAX)) as u32;
    Ok(RData::SOA(SOA::new(
        mname, rname, serial, 7200, 1800, 86_400, ttl,
    )))
}

/// SOA, NS (with the server's address when it listens on one), and `dns-version`.
fn apex(sets: &mut Sets, config: &Config, revision: u64) -> Result<(), DnsError> {
    let zone = sets.zone().clone();
    let ttl = config.ttl_secs;
    let ns = ns_name(&zone)?;
    sets.add(&zone, soa(&zone, revision, ttl)?);
    let glue: Vec<Record> = match config.listen_addr().map(|a| a.ip()) {
        Ok(IpAddr::V4(ip)) if !ip.is_unspecified() => {
            vec![Record::from_rdata(ns.clone(), ttl, RData::A(A(ip)))]
        }
        Ok(IpAddr::V6(ip)) if !ip.is_unspecified() => {
            vec![Record::from_rdata(ns.clone(), ttl, RData::AAAA(AAAA(ip)))]
        }
        _ => vec![],
    };
    for g in &glue {
        sets.add(&ns, g.data.clone());
    }
    sets.touch(&ns);
    sets.add_with_additionals(&zone, RData::NS(NS(ns)), glue);
    let version = Name::from_labels(["dns-version"])
        .and_then(|n| n.append_domain(&zone))
        .map_err(|e| DnsError::Zone {
            zone: zone.to_string(),
            reason: e.to_string(),
        })?;
    sets.add(
        &version,
        RData::TXT(TXT::new(vec![DNS_SCHEMA_VERSION.to_owned()])),
    );
    Ok(())
}
