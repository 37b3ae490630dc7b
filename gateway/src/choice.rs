//! All endpoint choice of a gateway, sans-IO ([`Chooser`]; the caller passes the clock):
//! which sites to try for a client connection and in which order, which local endpoint a
//! stream from a peer goes to, and which sites and endpoints are ejected after consecutive
//! failures.
//!
//! Sites: by locality rank (the catalog's `resolve`: own site, same zone, same region,
//! others, stale last), ejected or unhealthy sites after all others; within one rank, a
//! weighted random order by ready endpoint weight, so load spreads in proportion to
//! capacity. Local endpoints: round robin per service port, ejected ones last.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshbridge_core::model::{EndpointGroup, ServiceKey, SiteRank};

/// A gateway's choice state: site and endpoint ejections, round-robin positions and the
/// seed of the weighted site order. Every method that depends on time takes `now`.
#[derive(Debug)]
pub struct Chooser {
    sites: Ejections,
    endpoints: Ejections,
    rr: HashMap<(ServiceKey, u16), usize>,
    roll: u64,
}

impl Chooser {
    /// Ejection after `after` consecutive failures, for `base` doubling up to `max`, for
    /// sites and local endpoints alike; `seed` starts the weighted order.
    pub fn new(after: u32, base: Duration, max: Duration, seed: u64) -> Self {
        Self {
            sites: Ejections::new(after, base, max),
            endpoints: Ejections::new(after, base, max),
            rr: HashMap::new(),
            roll: seed,
        }
    }

    /// The sites to try for a connection to service port `port` of the ranked groups, in
    /// order; `unhealthy` sites (no working link) go last with the ejected ones.
    pub fn sites(
        &mut self,
        ranked: &[(SiteRank, EndpointGroup)],
        port: u16,
        own_site: &str,
        unhealthy: impl Fn(&str) -> bool,
        now: Instant,
    ) -> Vec<Candidate> {
        self.roll = self.roll.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let down = |s: &str| self.sites.is_ejected(s, now) || unhealthy(s);
        candidates(ranked, port, own_site, down, self.roll)
    }

    /// Record a failed attempt at `site`; the ejection time when it ejects the site.
    pub fn site_failed(&mut self, site: &str, now: Instant) -> Option<Duration> {
        self.sites.failure(site, now)
    }

    pub fn site_ok(&mut self, site: &str) {
        self.sites.success(site);
    }

    /// Sites ejected at `now`, with the time left.
    pub fn ejected_sites(&self, now: Instant) -> Vec<(String, Duration)> {
        self.sites.ejected(now)
    }

    /// The order in which to try the local endpoints `addrs` of service port
    /// (`key`, `port`): round robin (each call starts one further), ejected ones last.
    pub fn endpoints(
        &mut self,
        key: &ServiceKey,
        port: u16,
        addrs: &[SocketAddr],
        now: Instant,
    ) -> Vec<SocketAddr> {
        let n = self.rr.entry((key.clone(), port)).or_insert(0);
        let start = *n;
        *n = n.wrapping_add(1);
        let rotated = (0..addrs.len()).map(|i| addrs[(start + i) % addrs.len()]);
        if self.endpoints.is_empty() {
            // The common case: no local endpoint has failed lately; nothing to look up.
            return rotated.collect();
        }
        let (mut out, ejected): (Vec<_>, Vec<_>) =
            rotated.partition(|a| !self.endpoints.is_ejected(&a.to_string(), now));
        out.extend(ejected);
        out
    }

    /// Record a failed connect to local endpoint `addr`; the ejection time when it ejects.
    pub fn endpoint_failed(&mut self, addr: SocketAddr, now: Instant) -> Option<Duration> {
        self.endpoints.failure(&addr.to_string(), now)
    }

    pub fn endpoint_ok(&mut self, addr: SocketAddr) {
        self.endpoints.success(&addr.to_string());
    }
}

/// A site to try for one client connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub site: String,
    pub rank: SiteRank,
    /// Where the site's gateways listen (`host:port`).
    pub gateways: Vec<String>,
    pub weight: u64,
    pub ejected: bool,
}

/// SplitMix64: a small deterministic generator, enough for a weighted shuffle.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Order the ranked groups of a service for a connection to service port `port`.
/// `own_site` is kept even without gateways (it is reached directly); other sites need at
/// least one gateway address. `roll` seeds the weighted order.
pub fn candidates(
    ranked: &[(SiteRank, EndpointGroup)],
    port: u16,
    own_site: &str,
    is_ejected: impl Fn(&str) -> bool,
    roll: u64,
) -> Vec<Candidate> {
    let mut all: Vec<Candidate> = ranked
        .iter()
        .filter(|(_, g)| g.ports.iter().any(|p| p.port == port))
        .filter(|(_, g)| g.site == own_site || !g.gateways.is_empty())
        .filter(|(_, g)| g.weight > 0)
        .map(|(rank, g)| Candidate {
            site: g.site.clone(),
            rank: *rank,
            gateways: g.gateways.clone(),
            weight: g.weight,
            ejected: is_ejected(&g.site),
        })
        .collect();
    all.sort_by(|a, b| {
        (a.ejected, a.rank)
            .cmp(&(b.ejected, b.rank))
            .then_with(|| a.site.cmp(&b.site))
    });
    let mut rng = Mix(roll);
    let mut out = Vec::with_capacity(all.len());
    let mut rest = all.as_mut_slice();
    while !rest.is_empty() {
        let tier = rest
            .iter()
            .take_while(|c| (c.ejected, c.rank) == (rest[0].ejected, rest[0].rank))
            .count();
        let (head, tail) = rest.split_at_mut(tier);
        weighted_shuffle(head, &mut rng);
        out.extend(head.iter().cloned());
        rest = tail;
    }
    out
}

fn weighted_shuffle(items: &mut [Candidate], rng: &mut Mix) {
    for i in 0..items.len() {
        let total: u64 = items[i..].iter().map(|c| c.weight).sum();
        if total == 0 {
            return;
        }
        let mut pick = rng.next() % total;
        let mut j = i;
        for (k, c) in items[i..].iter().enumerate() {
            if pick < c.weight {
                j = i + k;
                break;
            }
            pick -= c.weight;
        }
        items.swap(i, j);
    }
}

#[derive(Clone, Debug, Default)]
struct Health {
    consecutive: u32,
    ejections: u32,
    until: Option<Instant>,
}

/// Consecutive-failure ejection of sites, with exponential backoff.
#[derive(Debug)]
struct Ejections {
    after: u32,
    base: Duration,
    max: Duration,
    sites: HashMap<String, Health>,
}

impl Ejections {
    fn new(after: u32, base: Duration, max: Duration) -> Self {
        Self {
            after: after.max(1),
            base,
            max,
            sites: HashMap::new(),
        }
    }

    /// No failures on record (none ejected, none on the way to it).
    fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }

    fn is_ejected(&self, site: &str, now: Instant) -> bool {
        self.sites
            .get(site)
            .and_then(|h| h.until)
            .is_some_and(|until| now < until)
    }

    /// Record a failure; returns the ejection time when this failure ejects the site.
    fn failure(&mut self, site: &str, now: Instant) -> Option<Duration> {
        let h = self.sites.entry(site.to_string()).or_default();
        h.consecutive += 1;
        if h.consecutive < self.after || h.until.is_some_and(|u| now < u) {
            return None;
        }
        let backoff = meshbridge_core::backoff::exponential(self.base, self.max, h.ejections);
        h.ejections += 1;
        h.consecutive = 0;
        h.until = Some(now + backoff);
        Some(backoff)
    }

    /// A success clears the site's record.
    fn success(&mut self, site: &str) {
        self.sites.remove(site);
    }

    /// Sites ejected at `now`, with the time left.
    fn ejected(&self, now: Instant) -> Vec<(String, Duration)> {
        self.sites
            .iter()
            .filter_map(|(s, h)| {
                let until = h.until?;
                (now < until).then(|| (s.clone(), until - now))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use meshbridge_core::model::{Locality, Port, Protocol, SiteState};

    use super::*;

    fn group(site: &str, weight: u64, gateways: &[&str]) -> EndpointGroup {
        EndpointGroup {
            site: site.into(),
            locality: Locality::default(),
            state: SiteState::Fresh,
            gateways: gateways.iter().map(|s| s.to_string()).collect(),
            generation: 1,
            ports: vec![Port {
                name: "tcp".into(),
                port: 80,
                protocol: Protocol::Tcp,
                target_port: 8080,
                app_protocol: None,
            }],
            endpoints: vec![],
            weight,
        }
    }

    fn sites(c: &[Candidate]) -> Vec<&str> {
        c.iter().map(|c| c.site.as_str()).collect()
    }

    #[test]
    fn rank_orders_first_and_ejected_sites_go_last() {
        let ranked = vec![
            (SiteRank::SameRegion, group("near", 1, &["n:1"])),
            (SiteRank::Other, group("far", 5, &["f:1"])),
            (SiteRank::Stale, group("stale", 9, &["s:1"])),
        ];
        let c = candidates(&ranked, 80, "here", |_| false, 7);
        assert_eq!(sites(&c), ["near", "far", "stale"]);
        let c = candidates(&ranked, 80, "here", |s| s == "near", 7);
        assert_eq!(sites(&c), ["far", "stale", "near"]);
        assert!(c[2].ejected);
    }

    #[test]
    fn sites_without_the_port_gateways_or_weight_are_left_out() {
        let ranked = vec![
            (SiteRank::SameSite, group("here", 1, &[])),
            (SiteRank::SameZone, group("nogw", 1, &[])),
            (SiteRank::SameZone, group("empty", 0, &["e:1"])),
        ];
        assert_eq!(
            sites(&candidates(&ranked, 80, "here", |_| false, 1)),
            ["here"]
        );
        assert!(candidates(&ranked, 81, "here", |_| false, 1).is_empty());
    }

    #[test]
    fn ties_are_weighted_by_ready_endpoints() {
        let ranked = vec![
            (SiteRank::Other, group("a", 3, &["a:1"])),
            (SiteRank::Other, group("b", 1, &["b:1"])),
        ];
        let firsts = (0..4000u64)
            .filter(|roll| candidates(&ranked, 80, "x", |_| false, *roll)[0].site == "a")
            .count();
        assert!((2700..3300).contains(&firsts), "a first {firsts} of 4000");
    }

    #[test]
    fn consecutive_failures_eject_with_growing_backoff() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut e = Ejections::new(2, s(1), s(3));
        assert_eq!(e.failure("a", t0), None);
        assert!(!e.is_ejected("a", t0));
        assert_eq!(e.failure("a", t0), Some(s(1)));
        assert!(e.is_ejected("a", t0));
        assert!(!e.is_ejected("a", t0 + s(1)));
        e.failure("a", t0 + s(1));
        assert_eq!(e.failure("a", t0 + s(1)), Some(s(2)));
        e.failure("a", t0 + s(4));
        assert_eq!(e.failure("a", t0 + s(4)), Some(s(3)), "capped");
        e.success("a");
        assert!(!e.is_ejected("a", t0 + s(4)));
        assert!(e.ejected(t0).is_empty());
    }

    #[test]
    fn the_chooser_rotates_local_endpoints_and_puts_ejected_ones_last() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut c = Chooser::new(1, s(10), s(60), 0);
        let key = ServiceKey::new("shop", "cart");
        let addrs: Vec<SocketAddr> = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(c.endpoints(&key, 80, &addrs, t0), addrs);
        assert_eq!(
            c.endpoints(&key, 80, &addrs, t0),
            [addrs[1], addrs[2], addrs[0]]
        );
        // Another port of the same service has its own position.
        assert_eq!(c.endpoints(&key, 81, &addrs, t0), addrs);
        assert_eq!(c.endpoint_failed(addrs[0], t0), Some(s(10)));
        assert_eq!(
            c.endpoints(&key, 80, &addrs, t0),
            [addrs[2], addrs[1], addrs[0]],
            "round robin from the third, the ejected first endpoint last"
        );
        // Past its ejection (the clock is the caller's) it takes its turn again.
        assert_eq!(
            c.endpoints(&key, 80, &addrs, t0 + s(10)),
            [addrs[0], addrs[1], addrs[2]]
        );
        c.endpoint_ok(addrs[0]);
    }

    #[test]
    fn the_chooser_puts_ejected_and_unhealthy_sites_last_until_the_ejection_ends() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut c = Chooser::new(2, s(5), s(60), 42);
        let ranked = vec![
            (SiteRank::SameZone, group("near", 1, &["n:1"])),
            (SiteRank::SameRegion, group("mid", 1, &["m:1"])),
            (SiteRank::Other, group("far", 1, &["f:1"])),
        ];
        let healthy = |_: &str| false;
        assert_eq!(
            sites(&c.sites(&ranked, 80, "x", healthy, t0)),
            ["near", "mid", "far"]
        );
        assert_eq!(c.site_failed("near", t0), None, "one failure is not enough");
        assert_eq!(c.site_failed("near", t0), Some(s(5)));
        assert_eq!(c.ejected_sites(t0), [("near".to_string(), s(5))]);
        let no_link = |s: &str| s == "mid";
        // Down sites (ejected or without a link) go last, among themselves by rank.
        assert_eq!(
            sites(&c.sites(&ranked, 80, "x", no_link, t0)),
            ["far", "near", "mid"]
        );
        assert_eq!(
            sites(&c.sites(&ranked, 80, "x", healthy, t0 + s(5))),
            ["near", "mid", "far"]
        );
        c.site_ok("near");
        assert!(c.ejected_sites(t0).is_empty());
    }
}
