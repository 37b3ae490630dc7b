//! Building the names of one service, or of the apex, into lookup-ready nodes.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;

use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// FxHash: names are hashed byte by byte (case-insensitively), where SipHash is slow.
/// Tables are filled from the catalog, not from queries, so flooding is not a concern.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher(u64);

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(c);
            self.add(u64::from_le_bytes(word));
        }
        for &b in chunks.remainder() {
            self.add(u64::from(b));
        }
    }
    fn write_u8(&mut self, b: u8) {
        self.add(u64::from(b));
    }
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

pub(crate) type FxBuild = BuildHasherDefault<FxHasher>;
pub(crate) type Nodes = HashMap<Name, Node, FxBuild>;

/// The records of one name, grouped by type.
#[derive(Debug, Default)]
pub(crate) struct Node {
    pub records: Box<[Record]>,
    pub sets: Box<[Set]>,
    /// Upper bound of the encoded size of all records (for `ANY`).
    pub len: usize,
}

/// One record set of a node: `records[start..end]`, with what answers add to the additional
/// section, and upper bounds of their encoded sizes.
#[derive(Debug)]
pub(crate) struct Set {
    pub rtype: RecordType,
    pub start: usize,
    pub end: usize,
    pub additionals: Box<[Record]>,
    pub len: usize,
    pub additionals_len: usize,
}

/// A record set while building: type, records, additionals.
type Building = (RecordType, Vec<Record>, Vec<Record>);

/// Owner names and their record sets, at and below `top`, while building.
pub(crate) struct Sets {
    top: Name,
    ttl: u32,
    nodes: HashMap<Name, Vec<Building>, FxBuild>,
}

impl Sets {
    pub(crate) fn new(top: Name, ttl: u32) -> Self {
        Self {
            top,
            ttl,
            nodes: HashMap::default(),
        }
    }

    pub(crate) fn top(&self) -> &Name {
        &self.top
    }

    /// Make `name` and every name between it and `top` exist (empty non-terminals answer
    /// NODATA, not NXDOMAIN: RFC 8020).
    pub(crate) fn touch(&mut self, name: &Name) {
        let mut name = name.clone();
        while self.top.zone_of(&name) && !self.nodes.contains_key(&name) {
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
    pub(crate) fn add_with_additionals(&mut self, name: &Name, data: RData, add: &[Record]) {
        let record = Record::from_rdata(name.clone(), self.ttl, data);
        let set = self.set(name, record.record_type());
        set.1.push(record);
        if set.2.is_empty() {
            set.2 = add.to_vec();
        }
    }

    /// The address record of `name` for `ip`.
    pub(crate) fn address(&self, name: &Name, ip: IpAddr) -> Record {
        Record::from_rdata(name.clone(), self.ttl, address(ip))
    }

    /// Lookup-ready nodes.
    pub(crate) fn finish(self) -> Nodes {
        let mut nodes = Nodes::with_capacity_and_hasher(self.nodes.len(), FxBuild::default());
        for (name, list) in self.nodes {
            let mut records = Vec::with_capacity(list.iter().map(|(_, r, _)| r.len()).sum());
            let mut sets = Vec::with_capacity(list.len());
            let mut total = 0;
            for (rtype, set, additionals) in list {
                let start = records.len();
                let len = set.iter().map(wire_len).sum();
                total += len;
                records.extend(set);
                sets.push(Set {
                    rtype,
                    start,
                    end: records.len(),
                    additionals_len: additionals.iter().map(wire_len).sum(),
                    additionals: additionals.into(),
                    len,
                });
            }
            let node = Node {
                records: records.into(),
                sets: sets.into(),
                len: total,
            };
            nodes.insert(name, node);
        }
        nodes
    }
}

pub(crate) fn address(ip: IpAddr) -> RData {
    match ip {
        IpAddr::V4(ip) => RData::A(A(ip)),
        IpAddr::V6(ip) => RData::AAAA(AAAA(ip)),
    }
}

/// Encoded size of a name, without compression.
fn name_len(name: &Name) -> usize {
    name.len() + 1
}

/// An upper bound of the size of `record` in a message (nothing compressed).
pub(crate) fn wire_len(record: &Record) -> usize {
    // Owner, type, class, TTL, RDLENGTH.
    let fixed = name_len(&record.name) + 10;
    let data = match &record.data {
        RData::A(_) => 4,
        RData::AAAA(_) => 16,
        RData::SRV(srv) => 6 + name_len(&srv.target),
        RData::NS(ns) => name_len(&ns.0),
        RData::SOA(soa) => name_len(&soa.mname) + name_len(&soa.rname) + 20,
        RData::TXT(txt) => txt.txt_data.iter().map(|s| 1 + s.len()).sum(),
        // Not produced by the index; never claim it fits.
        _ => usize::from(u16::MAX),
    };
    fixed + data
}
