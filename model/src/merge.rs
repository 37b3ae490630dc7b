//! Merged views of the catalog (MCS rules) and locality ranking.
//!
//! Rules (Kubernetes MCS API, KEP-1645):
//! - a service's endpoint set is the union of all sites' exports, one [`EndpointGroup`] per site;
//! - ports are a union by name; when two exports define the same name differently (other
//!   `port` or `protocol`), the export with the oldest `created_revision` wins (ties by site
//!   name) and a [`PortConflict`] is recorded. `target_port` is per site (each site's
//!   endpoints listen where they listen), so it never conflicts; it is kept per group;
//! - the service's type (headless or ClusterSetIP) is the oldest export's; an export of the
//!   other type is recorded as a [`TypeConflict`] (its endpoints still serve, in the
//!   winner's type).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::types::*;

/// The merged view of one service key across all sites.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergedService {
    pub key: ServiceKey,
    /// Union by name, in order of first appearance, oldest export first.
    pub ports: Vec<Port>,
    /// Conflicting port definitions that lost to an older export.
    pub conflicts: Vec<PortConflict>,
    /// Exports of the other type (headless or not) than the oldest export's.
    #[serde(default)]
    pub type_conflicts: Vec<TypeConflict>,
    /// The oldest export's type: headless (DNS answers endpoints) or not (one address).
    pub headless: bool,
    /// One group per exporting site, ordered by site name.
    pub groups: Vec<EndpointGroup>,
}

impl MergedService {
    /// Sum of the groups' weights (ready endpoints only).
    pub fn total_weight(&self) -> u64 {
        self.groups.iter().map(|g| g.weight).sum()
    }

    /// The merged port called `name`.
    pub fn port(&self, name: &str) -> Option<&Port> {
        self.ports.iter().find(|p| p.name == name)
    }
}

/// Two exports define the same port name differently; the older export's definition wins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortConflict {
    pub port_name: String,
    pub winner_site: String,
    pub loser_site: String,
    pub winner: Port,
    pub loser: Port,
}

/// Two exports disagree on the service's type; the older export's wins (MCS: "the oldest
/// export wins").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeConflict {
    pub winner_site: String,
    pub loser_site: String,
    /// The type in effect: headless or not (ClusterSetIP).
    pub headless: bool,
}

impl TypeConflict {
    /// `Headless` or `ClusterSetIP`, as the MCS API names them.
    pub fn type_name(headless: bool) -> &'static str {
        if headless { "Headless" } else { "ClusterSetIP" }
    }
}

/// One site's endpoints of a service, with what a caller needs to reach them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointGroup {
    pub site: String,
    pub locality: Locality,
    pub state: SiteState,
    /// The site's gateway addresses (`host:port`), where tunnels to this group go.
    pub gateways: Vec<String>,
    /// Generation of the site's export.
    pub generation: u64,
    /// The site's own port definitions (its `target_port`s).
    pub ports: Vec<Port>,
    /// All endpoints of the export, ready or not; see [`EndpointGroup::ready_endpoints`].
    pub endpoints: Vec<Endpoint>,
    /// Sum of the weights of the ready endpoints (0 when none is ready).
    pub weight: u64,
}

impl EndpointGroup {
    /// Build the group of `export`, as seen with `site` (None: the site is unknown, which
    /// the state machine never allows; it then counts as fresh, with no locality).
    pub fn from_export(export: &Export, site: Option<&Site>) -> Self {
        let weight = export
            .endpoints
            .iter()
            .filter(|e| e.ready)
            .map(|e| u64::from(e.weight))
            .sum();
        Self {
            site: export.site.clone(),
            locality: site.map(|s| s.locality.clone()).unwrap_or_default(),
            state: site.map(|s| s.state).unwrap_or_default(),
            gateways: site.map(|s| s.gateways.clone()).unwrap_or_default(),
            generation: export.generation,
            ports: export.ports.clone(),
            endpoints: export.endpoints.clone(),
            weight,
        }
    }

    /// The endpoints that are ready to take traffic.
    pub fn ready_endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.iter().filter(|e| e.ready)
    }

    pub fn ready_count(&self) -> usize {
        self.ready_endpoints().count()
    }

    /// This site's definition of the port called `name`.
    pub fn port(&self, name: &str) -> Option<&Port> {
        self.ports.iter().find(|p| p.name == name)
    }
}

/// How close a site is to the caller. Ordered best first: `SameSite < SameZone < ... < Stale`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteRank {
    SameSite,
    SameZone,
    SameRegion,
    Other,
    /// The site's lease lapsed: last priority, whatever its locality.
    Stale,
}

/// The rank of a group as seen from `from_site` at `from`.
pub fn rank_of(from: &Locality, from_site: &str, group: &EndpointGroup) -> SiteRank {
    let to = &group.locality;
    if matches!(group.state, SiteState::Stale { .. }) {
        SiteRank::Stale
    } else if group.site == from_site {
        SiteRank::SameSite
    } else if !from.zone.is_empty() && from.zone == to.zone && from.region == to.region {
        SiteRank::SameZone
    } else if !from.region.is_empty() && from.region == to.region {
        SiteRank::SameRegion
    } else {
        SiteRank::Other
    }
}

/// Rank the groups as seen from `from_site` at `from`, best first; ties by site name.
/// Withdrawn sites and groups without a ready endpoint are left out.
pub fn rank_sites(
    from: &Locality,
    from_site: &str,
    groups: &[EndpointGroup],
) -> Vec<(SiteRank, EndpointGroup)> {
    let mut ranked: Vec<(SiteRank, EndpointGroup)> = groups
        .iter()
        .filter(|g| !matches!(g.state, SiteState::Withdrawn { .. }))
        .filter(|g| g.ready_endpoints().next().is_some())
        .map(|g| (rank_of(from, from_site, g), g.clone()))
        .collect();
    ranked.sort_by(|(ra, a), (rb, b)| ra.cmp(rb).then_with(|| a.site.cmp(&b.site)));
    ranked
}

/// Merge the exports of one service (all with the same key, any order).
pub fn merge_exports<'a>(
    key: &ServiceKey,
    exports: impl IntoIterator<Item = &'a Export>,
    sites: &BTreeMap<String, Arc<Site>>,
) -> MergedService {
    let mut exports: Vec<&Export> = exports.into_iter().collect();
    // Oldest first for the port rule; ties by site name.
    exports.sort_by(|a, b| {
        a.created_revision
            .cmp(&b.created_revision)
            .then_with(|| a.site.cmp(&b.site))
    });
    let mut ports: Vec<Port> = Vec::new();
    let mut owners: Vec<&str> = Vec::new();
    let mut conflicts = Vec::new();
    for export in &exports {
        for port in &export.ports {
            match ports.iter().position(|p| p.name == port.name) {
                None => {
                    ports.push(port.clone());
                    owners.push(&export.site);
                }
                Some(i) => {
                    let winner = &ports[i];
                    if winner.port != port.port || winner.protocol != port.protocol {
                        conflicts.push(PortConflict {
                            port_name: port.name.clone(),
                            winner_site: owners[i].to_owned(),
                            loser_site: export.site.clone(),
                            winner: winner.clone(),
                            loser: port.clone(),
                        });
                    }
                }
            }
        }
    }
    let headless = exports.first().is_some_and(|e| e.headless);
    let type_conflicts = exports
        .iter()
        .filter(|e| e.headless != headless)
        .map(|e| TypeConflict {
            winner_site: exports.first().map(|w| w.site.clone()).unwrap_or_default(),
            loser_site: e.site.clone(),
            headless,
        })
        .collect();
    let mut groups: Vec<EndpointGroup> = exports
        .iter()
        .map(|e| EndpointGroup::from_export(e, sites.get(&e.site).map(|s| &**s)))
        .collect();
    groups.sort_by(|a, b| a.site.cmp(&b.site));
    MergedService {
        key: key.clone(),
        ports,
        conflicts,
        type_conflicts,
        headless,
        groups,
    }
}

impl Catalog {
    /// The merged view of `key`, or None when no site exports it.
    pub fn service(&self, key: &ServiceKey) -> Option<MergedService> {
        let exports: Vec<&Export> = self.exports_of(key).collect();
        if exports.is_empty() {
            return None;
        }
        Some(merge_exports(key, exports, &self.sites))
    }

    /// Every exported service, merged, ordered by key.
    pub fn services(&self) -> Vec<MergedService> {
        let mut out = Vec::new();
        let mut current: Option<(&ServiceKey, Vec<&Export>)> = None;
        for ((key, _), export) in &self.exports {
            match &mut current {
                Some((k, list)) if *k == key => list.push(export),
                _ => {
                    if let Some((k, list)) = current.take() {
                        out.push(merge_exports(k, list, &self.sites));
                    }
                    current = Some((key, vec![export]));
                }
            }
        }
        if let Some((k, list)) = current {
            out.push(merge_exports(k, list, &self.sites));
        }
        out
    }

    /// The ranked groups of `key` as seen from `from_site` (best first), or None when no
    /// site exports it. An unknown `from_site` has no locality: every other site ranks
    /// `Other` (stale ones `Stale`).
    pub fn resolve(
        &self,
        key: &ServiceKey,
        from_site: &str,
    ) -> Option<Vec<(SiteRank, EndpointGroup)>> {
        let merged = self.service(key)?;
        let from = self
            .sites
            .get(from_site)
            .map(|s| s.locality.clone())
            .unwrap_or_default();
        Some(rank_sites(&from, from_site, &merged.groups))
    }
}
