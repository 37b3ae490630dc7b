//! Endpoint choice at the sending side, sans-IO: which sites to try, in which order, and
//! which sites are ejected after consecutive failures.
//!
//! Order: by locality rank (the catalog's `resolve`: own site, same zone, same region,
//! others, stale last), ejected sites after all others; within one rank, a weighted random
//! order by ready endpoint weight, so load spreads in proportion to capacity.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use meshbridge_core::model::{EndpointGroup, SiteRank};

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
pub struct Ejections {
    after: u32,
    base: Duration,
    max: Duration,
    sites: HashMap<String, Health>,
}

impl Ejections {
    pub fn new(after: u32, base: Duration, max: Duration) -> Self {
        Self {
            after: after.max(1),
            base,
            max,
            sites: HashMap::new(),
        }
    }

    pub fn is_ejected(&self, site: &str, now: Instant) -> bool {
        self.sites
            .get(site)
            .and_then(|h| h.until)
            .is_some_and(|until| now < until)
    }

    /// Record a failure; returns the ejection time when this failure ejects the site.
    pub fn failure(&mut self, site: &str, now: Instant) -> Option<Duration> {
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
    pub fn success(&mut self, site: &str) {
        self.sites.remove(site);
    }

    /// Sites ejected at `now`, with the time left.
    pub fn ejected(&self, now: Instant) -> Vec<(String, Duration)> {
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
}
