//! Lease expiry, decided on the leader from its own clock and written to the log as
//! [`Command::Tick`], so the state machine stays deterministic.
//!
//! Every `tick_interval` the leader looks at its catalog; when a lease lapsed, a grace ran
//! out or a join token expired by its clock, it proposes a tick stamped with that clock.
//! Followers never tick. A quiet catalog costs no log entries.

use std::sync::Arc;
use std::time::Duration;

use meshbridge_core::model::{Catalog, Command};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::Attempt;
use crate::shared::{Shared, now_ms};

/// What a tick at `now_ms` would change: `(site, new state)` for each site, and whether a
/// token expires. The state machine's own lease transition ([`Catalog::lease_step`]), for
/// the decision and the logs.
pub fn due(catalog: &Catalog, now_ms: u64) -> (Vec<(String, &'static str)>, bool) {
    let sites = catalog
        .sites
        .values()
        .filter_map(|site| {
            let step = catalog.lease_step(site, now_ms)?;
            let label = if step.state == site.state {
                "fresh (a gateway instance left)"
            } else {
                step.state.name()
            };
            Some((site.name.clone(), label))
        })
        .collect();
    // A token merely expired is not worth a log entry yet.
    let tokens = catalog.expired_tokens(now_ms).next().is_some();
    (sites, tokens)
}

/// Runs until `stop` is cancelled. Sites withdrawn for `forget_after_ms` are forgotten
/// (never when 0).
pub async fn run(
    s: Arc<Shared>,
    interval: Duration,
    forget_after_ms: u64,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut metrics = s.raft.metrics();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if metrics.borrow_and_update().current_leader != Some(s.node_id) {
            continue;
        }
        let now = now_ms();
        let catalog = s.catalog();
        let forget: Vec<String> = if forget_after_ms > 0 {
            catalog
                .forgettable(now, forget_after_ms)
                .into_iter()
                .map(str::to_owned)
                .collect()
        } else {
            Vec::new()
        };
        if !forget.is_empty() {
            let cmd = Command::ForgetWithdrawn {
                at_ms: now,
                keep_ms: forget_after_ms,
            };
            match s.propose(cmd).await {
                Ok(reply) => {
                    info!(sites = ?forget, revision = reply.revision, "withdrawn sites forgotten")
                }
                Err(Attempt::NotLeader) => {}
                Err(Attempt::Failed(e)) => {
                    warn!(error = %e, "forgetting withdrawn sites failed");
                }
            }
        }
        let (sites, tokens) = due(&catalog, now);
        if sites.is_empty() && !tokens {
            continue;
        }
        match s.propose(Command::Tick { at_ms: now }).await {
            Ok(reply) => {
                s.metrics.lease_ticks.inc();
                for (site, state) in &sites {
                    info!(site = %site, state, revision = reply.revision, "site lease state changed");
                }
            }
            Err(Attempt::NotLeader) => {}
            Err(Attempt::Failed(e)) => {
                warn!(error = %e, "lease tick failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use meshbridge_core::model::{Locality, Site, SiteKind, SiteState, USED_TOKEN_KEEP_MS};

    use super::*;

    fn site(name: &str, last: u64, state: SiteState) -> (String, Arc<Site>) {
        let site = Site {
            name: name.into(),
            kind: SiteKind::Cluster,
            locality: Locality::default(),
            gateways: vec![],
            lease_ttl_ms: 1_000,
            grace_ms: 5_000,
            last_heartbeat_ms: last,
            state,
            created_revision: 1,
            links: Vec::new(),
            instances: Vec::new(),
            xds_rejections: Vec::new(),
        };
        (name.into(), Arc::new(site))
    }

    #[test]
    fn due_mirrors_the_state_machine_tick() {
        let catalog = Catalog {
            sites: [
                site("fresh", 10_000, SiteState::Fresh),
                site("lapsing", 8_000, SiteState::Fresh),
                site("gone-long-ago", 1_000, SiteState::Fresh),
                site("graced", 0, SiteState::Stale { since_ms: 4_000 }),
                site("stale", 0, SiteState::Stale { since_ms: 9_000 }),
            ]
            .into(),
            ..Catalog::default()
        };
        let (sites, tokens) = due(&catalog, 10_500);
        assert_eq!(
            sites,
            [
                ("gone-long-ago".to_string(), "withdrawn"),
                ("graced".to_string(), "withdrawn"),
                ("lapsing".to_string(), "stale"),
            ]
        );
        assert!(!tokens);
        // A used token expired a moment ago is not worth a tick; past the keep margin it is.
        let mut with_token = catalog.clone();
        with_token.tokens.insert(
            "t".into(),
            meshbridge_core::model::TokenUse {
                id: "t".into(),
                site: "vm".into(),
                used_at_ms: 1_000,
                expires_ms: 10_000,
                revoked: false,
            },
        );
        assert!(!due(&with_token, 10_500).1);
        assert!(due(&with_token, 10_001 + USED_TOKEN_KEEP_MS).1);
        let mut after = catalog.clone();
        let applied = after.apply(&Command::Tick { at_ms: 10_500 }).unwrap();
        assert!(!applied.changes.is_empty());
        assert_eq!(due(&after, 10_500), (vec![], false));
    }
}
