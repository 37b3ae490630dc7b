//! Virtual IPs for imported services on a host: a deterministic map from service keys to
//! addresses in a range such as `127.240.0.0/16`, computed from the catalog alone, so the
//! DNS stub and the service listeners of one host always agree without talking.
//!
//! Each key hashes (FNV-1a) to a slot; on a collision the service exported first (lowest
//! creation revision, then key order) keeps the slot and later ones probe forward.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use crate::ServiceKey;

/// An IPv4 range in CIDR form, for VIPs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipRange {
    base: u32,
    prefix: u8,
}

impl VipRange {
    pub fn new(base: Ipv4Addr, prefix: u8) -> Result<Self, String> {
        if !(8..=30).contains(&prefix) {
            return Err(format!("prefix /{prefix}: use /8 to /30"));
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(Self {
            base: u32::from(base) & mask,
            prefix,
        })
    }

    /// Usable addresses (network and broadcast excluded).
    pub fn capacity(&self) -> u32 {
        (1u32 << (32 - self.prefix)) - 2
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix);
        u32::from(ip) & mask == self.base
    }

    fn nth(&self, slot: u32) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 1 + slot)
    }
}

impl FromStr for VipRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected CIDR like 127.240.0.0/16"))?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("{s:?}: {ip:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("{s:?}: bad prefix length"))?;
        Self::new(ip, prefix).map_err(|e| format!("{s:?}: {e}"))
    }
}

impl fmt::Display for VipRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }
}

impl serde::Serialize for VipRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for VipRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

fn fnv1a(key: &ServiceKey) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.namespace.bytes().chain([b'/']).chain(key.name.bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Assign a VIP to each service. `services` yields (key, creation revision). Services that
/// do not fit (more than the range holds) get none.
pub fn assign(
    range: VipRange,
    services: impl IntoIterator<Item = (ServiceKey, u64)>,
) -> BTreeMap<ServiceKey, Ipv4Addr> {
    let mut list: Vec<(u64, ServiceKey)> = services.into_iter().map(|(k, r)| (r, k)).collect();
    list.sort();
    list.dedup_by(|a, b| a.1 == b.1);
    let cap = range.capacity();
    let mut used = HashSet::new();
    let mut out = BTreeMap::new();
    for (_, key) in list {
        if used.len() as u32 >= cap {
            break;
        }
        let mut slot = fnv1a(&key) % cap;
        while !used.insert(slot) {
            slot = (slot + 1) % cap;
        }
        out.insert(key, range.nth(slot));
    }
    out
}

/// VIPs for every service in a catalog, by the creation revision of its oldest export.
pub fn assign_catalog(range: VipRange, catalog: &crate::Catalog) -> BTreeMap<ServiceKey, Ipv4Addr> {
    let mut oldest: BTreeMap<&ServiceKey, u64> = BTreeMap::new();
    for ((key, _site), export) in &catalog.exports {
        let e = oldest.entry(key).or_insert(u64::MAX);
        *e = (*e).min(export.created_revision);
    }
    assign(range, oldest.into_iter().map(|(k, r)| (k.clone(), r)))
}

/// A range of TCP ports (`first-last`, inclusive) for service listeners on one address: the
/// Kubernetes adapter points an imported service's EndpointSlice at `gateway:port`, and the
/// gateway listens there, both from [`assign_ports`] over the same catalog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn new(first: u16, last: u16) -> Result<Self, String> {
        if first == 0 || last < first {
            return Err(format!("{first}-{last}: need 1 <= first <= last"));
        }
        Ok(Self { first, last })
    }

    pub fn capacity(&self) -> u32 {
        u32::from(self.last - self.first) + 1
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?}: expected a port range like 20000-29999"))?;
        let parse = |x: &str| {
            x.trim()
                .parse::<u16>()
                .map_err(|_| format!("{s:?}: {x:?} is not a port"))
        };
        Self::new(parse(a)?, parse(b)?).map_err(|e| format!("{s:?}: {e}"))
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl serde::Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// One listener port per (service, service port) for every TCP port of every non-headless
/// service in the catalog, whichever site exports it: the same FNV-1a hash and probing as
/// VIPs, over `namespace/name:port`, oldest service first, so a port once given keeps its
/// slot while its service exists. Pairs that do not fit get none.
pub fn assign_ports(
    range: PortRange,
    catalog: &crate::Catalog,
) -> BTreeMap<(ServiceKey, u16), u16> {
    let mut oldest: BTreeMap<&ServiceKey, u64> = BTreeMap::new();
    for ((key, _site), export) in &catalog.exports {
        let e = oldest.entry(key).or_insert(u64::MAX);
        *e = (*e).min(export.created_revision);
    }
    let mut list: Vec<(u64, ServiceKey, u16)> = Vec::new();
    for svc in catalog.services() {
        if svc.headless {
            continue;
        }
        let rev = oldest.get(&svc.key).copied().unwrap_or(u64::MAX);
        for p in svc
            .ports
            .iter()
            .filter(|p| p.protocol == crate::Protocol::Tcp)
        {
            list.push((rev, svc.key.clone(), p.port));
        }
    }
    list.sort();
    list.dedup();
    let cap = range.capacity();
    let mut used = HashSet::new();
    let mut out = BTreeMap::new();
    for (_, key, port) in list {
        if used.len() as u32 >= cap {
            break;
        }
        let mut h = fnv1a(&key);
        for b in [b':'].into_iter().chain(port.to_string().bytes()) {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        let mut slot = h % cap;
        while !used.insert(slot) {
            slot = (slot + 1) % cap;
        }
        out.insert((key, port), range.first + slot as u16);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> ServiceKey {
        ServiceKey::new("ns", n)
    }

    #[test]
    fn assignment_is_stable_and_inside_the_range() {
        let range: VipRange = "127.240.0.0/16".parse().unwrap();
        let a = assign(range, [(key("a"), 1), (key("b"), 2)]);
        let b = assign(range, [(key("b"), 2), (key("a"), 1), (key("c"), 3)]);
        assert_eq!(a[&key("a")], b[&key("a")]);
        assert_eq!(a[&key("b")], b[&key("b")]);
        assert!(b.values().all(|ip| range.contains(*ip)));
        assert_ne!(b[&key("a")], b[&key("b")]);
    }

    #[test]
    fn collisions_probe_and_the_oldest_keeps_its_slot() {
        // A /30 has two usable addresses: three services cannot all fit.
        let range: VipRange = "127.0.0.0/30".parse().unwrap();
        let m = assign(range, [(key("x"), 5), (key("y"), 1), (key("z"), 9)]);
        assert_eq!(m.len(), 2);
        assert!(m.contains_key(&key("y")) && m.contains_key(&key("x")));
        let ips: HashSet<_> = m.values().collect();
        assert_eq!(ips.len(), 2);
    }

    #[test]
    fn bad_ranges_are_explained() {
        assert!(
            "127.240.0.0"
                .parse::<VipRange>()
                .unwrap_err()
                .contains("expected CIDR")
        );
        assert!(
            "127.240.0.0/31"
                .parse::<VipRange>()
                .unwrap_err()
                .contains("/8 to /30")
        );
        assert!(
            "x/16"
                .parse::<VipRange>()
                .unwrap_err()
                .contains("not an IPv4")
        );
    }

    fn catalog_with(services: &[(&str, u64, &[u16], bool)]) -> crate::Catalog {
        use crate::{Export, Port, Protocol};
        let mut c = crate::Catalog::default();
        for (name, rev, ports, headless) in services {
            let e = Export {
                site: "east".into(),
                service: key(name),
                generation: 1,
                ports: ports
                    .iter()
                    .map(|p| Port {
                        name: format!("p{p}"),
                        port: *p,
                        protocol: Protocol::Tcp,
                        target_port: *p,
                        app_protocol: None,
                    })
                    .collect(),
                endpoints: Vec::new(),
                headless: *headless,
                created_revision: *rev,
                updated_revision: *rev,
            };
            c.exports.insert(e.key(), std::sync::Arc::new(e));
        }
        c
    }

    #[test]
    fn ports_are_stable_distinct_and_skip_headless_services() {
        let range: PortRange = "20000-20009".parse().unwrap();
        let before = assign_ports(range, &catalog_with(&[("a", 1, &[80, 443], false)]));
        let after = assign_ports(
            range,
            &catalog_with(&[
                ("a", 1, &[80, 443], false),
                ("b", 2, &[80], false),
                ("h", 3, &[80], true),
            ]),
        );
        assert_eq!(before[&(key("a"), 80)], after[&(key("a"), 80)]);
        assert_eq!(before[&(key("a"), 443)], after[&(key("a"), 443)]);
        assert_eq!(after.len(), 3, "{after:?}");
        let ports: HashSet<u16> = after.values().copied().collect();
        assert_eq!(ports.len(), 3);
        assert!(ports.iter().all(|p| (20000..=20009).contains(p)));
        // A full range gives what fits, oldest first.
        let tiny = assign_ports(
            PortRange::new(1000, 1001).unwrap(),
            &catalog_with(&[("a", 1, &[80, 443], false), ("b", 2, &[80], false)]),
        );
        assert_eq!(tiny.len(), 2);
        assert!(!tiny.contains_key(&(key("b"), 80)));
    }

    #[test]
    fn bad_port_ranges_are_explained() {
        assert!(
            "20000"
                .parse::<PortRange>()
                .unwrap_err()
                .contains("expected a port range")
        );
        assert!(
            "3-2"
                .parse::<PortRange>()
                .unwrap_err()
                .contains("first <= last")
        );
        assert!(
            "1-x"
                .parse::<PortRange>()
                .unwrap_err()
                .contains("not a port")
        );
    }
}
