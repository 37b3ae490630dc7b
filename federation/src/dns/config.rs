//! Configuration of the DNS server: one serde struct, validated all at once.

use std::net::SocketAddr;

use hickory_proto::rr::Name;
use meshbridge_core::config::{Problems, RoleConfig};
use meshbridge_core::model::is_dns_label;
use meshbridge_core::vip::VipRange;
use serde::{Deserialize, Serialize};

/// The zone of the Kubernetes MCS DNS specification.
pub const DEFAULT_ZONE: &str = "clusterset.local";

const MAX_ZONE_LEN: usize = 100;

/// Settings of the federated DNS server.
///
/// ```toml
/// listen = "127.0.0.1:53"
/// zone = "clusterset.local"
/// site = "east"
/// vip_range = "127.240.0.0/16"
/// ttl_secs = 5
/// upstream = "10.0.0.2:53"
/// upstream_timeout_ms = 2000
/// tcp_idle_timeout_secs = 10
///
/// [rate_limit]
/// per_client_qps = 2000
/// burst = 4000
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// UDP and TCP listen address (both on the same port; port 0 picks a free one).
    pub listen: String,
    /// The authoritative zone.
    pub zone: String,
    /// This site's name: answers are computed as seen from it.
    pub site: String,
    /// VIP mode: a service name resolves to its VIP from
    /// [`assign_catalog`](meshbridge_core::vip::assign_catalog), where the gateway or agent
    /// of this host listens. Without it, a service resolves to its ready endpoints in this
    /// site (and to nothing when it has none here).
    pub vip_range: Option<VipRange>,
    /// TTL of every record, and the SOA minimum (negative caching).
    pub ttl_secs: u32,
    /// A resolver (`ip:port`) to forward queries outside the zone to. Without it they are
    /// refused.
    pub upstream: Option<String>,
    /// How long to wait for the upstream (UDP, then TCP when its answer is truncated).
    pub upstream_timeout_ms: u64,
    /// A TCP connection that sends no query for this long is closed.
    pub tcp_idle_timeout_secs: u64,
    pub rate_limit: RateLimit,
}

/// Per-client-address token bucket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RateLimit {
    /// Sustained queries per second per client IP; 0 turns the limit off.
    pub per_client_qps: u32,
    /// Queries a client may send at once before the rate applies.
    pub burst: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            per_client_qps: 2000,
            burst: 4000,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:53".into(),
            zone: DEFAULT_ZONE.into(),
            site: String::new(),
            vip_range: None,
            ttl_secs: 5,
            upstream: None,
            upstream_timeout_ms: 2000,
            tcp_idle_timeout_secs: 10,
            rate_limit: RateLimit::default(),
        }
    }
}

impl Config {
    /// Listen on 127.0.0.1, any free port, as `site`, no VIPs, no rate limit.
    pub fn for_test(site: &str) -> Self {
        Self {
            listen: "127.0.0.1:0".into(),
            site: site.into(),
            rate_limit: RateLimit {
                per_client_qps: 0,
                ..RateLimit::default()
            },
            ..Self::default()
        }
    }

    /// The zone as a fully qualified, lowercase name.
    pub fn zone_name(&self) -> Result<Name, String> {
        let text = self.zone.trim_end_matches('.');
        if text.is_empty() {
            return Err("must not be empty".into());
        }
        if let Some(bad) = text.split('.').find(|l| !is_dns_label(l)) {
            return Err(format!(
                "{bad:?} is not a lowercase RFC 1123 label (zone {:?})",
                self.zone
            ));
        }
        // Leave room in a 253-character name for `<hostname>.<site>.<svc>.<ns>.svc.`.
        if text.len() > MAX_ZONE_LEN {
            return Err(format!(
                "must be at most {MAX_ZONE_LEN} characters (got {})",
                text.len()
            ));
        }
        let mut name = Name::from_ascii(text).map_err(|e| e.to_string())?;
        name.set_fqdn(true);
        Ok(name)
    }

    pub(crate) fn listen_addr(&self) -> Result<SocketAddr, String> {
        self.listen
            .parse()
            .map_err(|_| format!("{:?} is not an address like 127.0.0.1:53", self.listen))
    }

    pub(crate) fn upstream_addr(&self) -> Result<Option<SocketAddr>, String> {
        match &self.upstream {
            None => Ok(None),
            Some(s) => s
                .parse()
                .map(Some)
                .map_err(|_| format!("{s:?} is not an address like 10.0.0.2:53")),
        }
    }
}

impl RoleConfig for Config {
    fn validate(&self, p: &mut Problems) {
        let listen = self.listen_addr();
        if let Err(e) = &listen {
            p.push("listen", e.clone());
        }
        if let Err(e) = self.zone_name() {
            p.push("zone", e);
        }
        p.check(
            is_dns_label(&self.site),
            "site",
            format!("{:?} is not a lowercase RFC 1123 label", self.site),
        );
        p.check(
            self.ttl_secs <= 86_400,
            "ttl_secs",
            "must be at most 86400 (a day)",
        );
        match self.upstream_addr() {
            Err(e) => p.push("upstream", e),
            Ok(Some(up)) if listen.as_ref().is_ok_and(|l| *l == up) => {
                p.push("upstream", "must not be this server's own listen address")
            }
            Ok(_) => {}
        }
        p.check(
            (1..=60_000).contains(&self.upstream_timeout_ms),
            "upstream_timeout_ms",
            "must be in 1..=60000",
        );
        p.check(
            self.tcp_idle_timeout_secs > 0,
            "tcp_idle_timeout_secs",
            "must be more than 0",
        );
        let rl = &self.rate_limit;
        p.check(
            rl.per_client_qps == 0 || rl.burst >= 1,
            "rate_limit.burst",
            "must be at least 1 when the rate limit is on",
        );
    }
}

#[cfg(test)]
mod tests {
    use meshbridge_core::config::parse_with_env;

    use super::*;

    #[test]
    fn example_parses_and_defaults_fill_the_rest() {
        let text =
            "site = \"east\"\nvip_range = \"127.240.0.0/16\"\n[rate_limit]\nper_client_qps = 10\n";
        let cfg: Config = parse_with_env("dns.toml", text, &[]).unwrap();
        assert_eq!(cfg.zone, DEFAULT_ZONE);
        assert_eq!(cfg.ttl_secs, 5);
        assert_eq!(cfg.rate_limit.per_client_qps, 10);
        assert_eq!(cfg.rate_limit.burst, 4000);
        assert_eq!(cfg.vip_range.unwrap().to_string(), "127.240.0.0/16");
        assert_eq!(cfg.zone_name().unwrap().to_string(), "clusterset.local.");
    }

    #[test]
    fn every_bad_field_is_named() {
        let text = "listen = \"nowhere\"\nzone = \"Bad_Zone\"\nsite = \"\"\nttl_secs = 999999\n\
                    upstream = \"x\"\nupstream_timeout_ms = 0\ntcp_idle_timeout_secs = 0\ncolour = 1\n";
        let err = parse_with_env::<Config>("dns.toml", text, &[]).unwrap_err();
        let fields: Vec<&str> = err.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "colour",
                "listen",
                "zone",
                "site",
                "ttl_secs",
                "upstream",
                "upstream_timeout_ms",
                "tcp_idle_timeout_secs"
            ],
            "{err}"
        );
    }

    #[test]
    fn the_effective_config_parses_back() {
        let cfg = Config {
            vip_range: Some("127.240.0.0/16".parse().unwrap()),
            upstream: Some("10.0.0.2:53".into()),
            ..Config::for_test("east")
        };
        let text = meshbridge_core::config::effective(&cfg);
        let back: Config = parse_with_env("dump", &text, &[]).unwrap();
        assert_eq!(back, cfg, "{text}");
    }

    #[test]
    fn forwarding_to_itself_is_refused() {
        let text = "site = \"east\"\nlisten = \"127.0.0.1:53\"\nupstream = \"127.0.0.1:53\"\n";
        let err = parse_with_env::<Config>("dns.toml", text, &[]).unwrap_err();
        assert_eq!(err.problems[0].field, "upstream", "{err}");
    }
}
