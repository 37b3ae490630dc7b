//! A token bucket per client address. No clock of its own: callers pass `now`.
//!
//! IPv6 clients are keyed by their /64 (one host commonly holds many addresses of one
//! prefix). The table is bounded: when a shard is full, clients whose bucket has refilled
//! are forgotten (they are indistinguishable from new ones); if that is not enough the shard
//! is cleared, which fails open rather than growing without bound under spoofed floods.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use meshbridge_core::sync::lock;

use super::config::RateLimit;

const SHARDS: usize = 16;
/// Most clients remembered at once, over all shards.
const MAX_CLIENTS: usize = 65_536;

pub(crate) struct RateLimiter {
    per_sec: f64,
    burst: f64,
    shards: Vec<Mutex<HashMap<u128, Bucket>>>,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant, per_sec: f64, burst: f64) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_sec).min(burst);
        self.last = now;
    }
}

fn client_key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        // The /64, tagged so it cannot equal an IPv4 key.
        IpAddr::V6(v6) => (u128::from(v6) & !u128::from(u64::MAX)) | 1,
    }
}

impl RateLimiter {
    /// `None` when the limit is off.
    pub(crate) fn new(cfg: &RateLimit) -> Option<Self> {
        if cfg.per_client_qps == 0 {
            return None;
        }
        Some(Self {
            per_sec: f64::from(cfg.per_client_qps),
            burst: f64::from(cfg.burst.max(1)),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        })
    }

    /// Take a token for `ip`; false when its bucket is empty.
    pub(crate) fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        let key = client_key(ip);
        let mixed = (key ^ (key >> 64)) as u64;
        let shard = (mixed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 60) as usize % SHARDS;
        let mut map = lock(&self.shards[shard]);
        if map.len() >= MAX_CLIENTS / SHARDS && !map.contains_key(&key) {
            let (per_sec, burst) = (self.per_sec, self.burst);
            map.retain(|_, b| {
                b.refill(now, per_sec, burst);
                b.tokens < burst
            });
            if map.len() >= MAX_CLIENTS / SHARDS {
                map.clear();
            }
        }
        let bucket = map.entry(key).or_insert(Bucket {
            tokens: self.burst,
            last: now,
        });
        bucket.refill(now, self.per_sec, self.burst);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    #[cfg(test)]
    fn clients(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Duration;

    use super::*;

    fn limiter(qps: u32, burst: u32) -> RateLimiter {
        RateLimiter::new(&RateLimit {
            per_client_qps: qps,
            burst,
        })
        .unwrap()
    }

    #[test]
    fn burst_then_the_rate_applies() {
        let rl = limiter(10, 5);
        let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let t0 = Instant::now();
        assert!((0..5).all(|_| rl.allow(ip, t0)));
        assert!(!rl.allow(ip, t0));
        // 10 per second: one token every 100 ms.
        assert!(!rl.allow(ip, t0 + Duration::from_millis(50)));
        assert!(rl.allow(ip, t0 + Duration::from_millis(150)));
        assert!(!rl.allow(ip, t0 + Duration::from_millis(150)));
        // Another client is not affected.
        assert!(rl.allow(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), t0));
    }

    #[test]
    fn ipv6_clients_share_their_slash_64() {
        let rl = limiter(1, 2);
        let t0 = Instant::now();
        let a: Ipv6Addr = "2001:db8:0:1::1".parse().unwrap();
        let b: Ipv6Addr = "2001:db8:0:1::2".parse().unwrap();
        let c: Ipv6Addr = "2001:db8:0:2::1".parse().unwrap();
        assert!(rl.allow(a.into(), t0));
        assert!(rl.allow(b.into(), t0));
        assert!(!rl.allow(a.into(), t0));
        assert!(rl.allow(c.into(), t0));
    }

    #[test]
    fn the_table_stays_bounded_under_many_sources() {
        let rl = limiter(1, 1);
        let t0 = Instant::now();
        for i in 0..(MAX_CLIENTS as u32 * 3) {
            rl.allow(IpAddr::V4(Ipv4Addr::from(i)), t0);
        }
        assert!(rl.clients() <= MAX_CLIENTS);
    }

    #[test]
    fn off_when_qps_is_zero() {
        assert!(
            RateLimiter::new(&RateLimit {
                per_client_qps: 0,
                burst: 5
            })
            .is_none()
        );
    }
}
