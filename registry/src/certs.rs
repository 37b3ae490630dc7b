//! The certificates a node can vouch for, for the mesh-wide expiry view of `ctl status`:
//! its own SVID, the earliest expiry in its trust bundles, and the SVIDs of the clients
//! that called it (every gateway, agent, DNS server and adapter talks to the registry with
//! its SVID), each with when it was last seen.

use std::collections::HashMap;
use std::sync::Mutex;

use meshbridge_core::id::SpiffeId;
use meshbridge_core::proto;
use meshbridge_core::tls::Identity;

use crate::shared::now_ms;

/// Client certificates remembered per node; beyond it, the longest unseen one is dropped.
const MAX_SEEN: usize = 10_000;

/// Client SVIDs by id: (not before and not after, unix s; last seen, unix ms).
#[derive(Default)]
pub struct Seen {
    map: Mutex<HashMap<SpiffeId, (i64, i64, u64)>>,
}

impl Seen {
    /// `id` called with a certificate valid from `not_before` until `not_after` (unix
    /// seconds).
    pub fn note(&self, id: &SpiffeId, not_before: i64, not_after: i64) {
        let now = now_ms();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = map.get_mut(id) {
            *entry = (not_before, not_after, now);
            return;
        }
        if map.len() >= MAX_SEEN
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, (_, _, seen))| *seen)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(id.clone(), (not_before, not_after, now));
    }

    /// This node's own SVID and bundle, and every client seen.
    pub fn report(&self, identity: &Identity) -> Vec<proto::SeenCertificate> {
        let now = now_ms();
        let own = identity.cert_info();
        let mut out = vec![proto::SeenCertificate {
            id: identity.id().to_string(),
            kind: "svid".into(),
            not_before_unix: own.not_before,
            not_after_unix: own.not_after,
            last_seen_unix_ms: now,
        }];
        if let Some(earliest) = identity.bundle_not_after() {
            out.push(proto::SeenCertificate {
                id: format!("{} (trust bundle)", identity.id()),
                kind: "bundle".into(),
                not_before_unix: 0,
                not_after_unix: earliest,
                last_seen_unix_ms: now,
            });
        }
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        out.extend(map.iter().map(
            |(id, (not_before, not_after, seen))| proto::SeenCertificate {
                id: id.to_string(),
                kind: "client".into(),
                not_before_unix: *not_before,
                not_after_unix: *not_after,
                last_seen_unix_ms: *seen,
            },
        ));
        out
    }
}
