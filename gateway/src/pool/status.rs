//! What the pool knows about its peers: health for endpoint choice, status for
//! `/debug/peers`, and pruning of peers that left the catalog.

use std::time::Instant;

use serde::Serialize;

use super::{Pool, lock};

/// What `/debug/peers` shows about one peer gateway.
#[derive(Clone, Debug, Serialize)]
pub struct PeerStatus {
    pub site: String,
    pub addr: String,
    pub connected: bool,
    pub transport: Option<&'static str>,
    pub peer_id: Option<String>,
    pub rtt_ms: Option<f64>,
    pub failures: u32,
    pub retry_in_ms: Option<u64>,
    pub last_error: Option<String>,
}

impl Pool {
    /// Whether every known gateway of `site` is down after failures (the site then ranks
    /// after healthy ones until a background re-dial succeeds).
    pub fn unhealthy(&self, site: &str) -> bool {
        let entries = lock(&self.entries);
        let mut any = false;
        for ((s, _), e) in entries.iter() {
            if s != site {
                continue;
            }
            any = true;
            let st = lock(&e.state);
            let live = st.link.as_ref().is_some_and(|(l, _)| !l.is_closed());
            if live || st.failures == 0 {
                return false;
            }
        }
        any
    }

    /// Every known peer, for `/debug/peers`.
    pub fn status(&self) -> Vec<PeerStatus> {
        let now = Instant::now();
        let entries: Vec<_> = lock(&self.entries)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut out: Vec<PeerStatus> = entries
            .into_iter()
            .map(|((site, addr), e)| {
                let st = lock(&e.state);
                let live = st.link.as_ref().filter(|(l, _)| !l.is_closed());
                PeerStatus {
                    site,
                    addr,
                    connected: live.is_some(),
                    transport: live.map(|(l, _)| l.carrier().name()),
                    peer_id: live.map(|(_, id)| id.to_string()),
                    rtt_ms: live
                        .and_then(|(l, _)| l.rtt())
                        .map(|d| d.as_secs_f64() * 1e3),
                    failures: st.failures,
                    retry_in_ms: st
                        .retry_at
                        .filter(|at| now < *at)
                        .map(|at| (at - now).as_millis() as u64),
                    last_error: st.last_error.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.site, &a.addr).cmp(&(&b.site, &b.addr)));
        out
    }

    /// Forget peers for which `keep(site, addr)` is false (gone from the catalog), closing
    /// their links.
    pub fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        let mut entries = lock(&self.entries);
        entries.retain(|(site, addr), e| {
            let k = keep(site, addr);
            if !k && let Some((link, _)) = lock(&e.state).link.take() {
                tracing::info!(peer.site = %site, peer.addr = %addr, "peer left the catalog");
                link.close("peer left the catalog");
            }
            k
        });
    }
}
