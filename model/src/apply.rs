//! The state machine: commands in, changes out. Deterministic; no clocks.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::types::*;

/// Gateway instances one site may register (a Deployment's replicas, say).
pub const MAX_INSTANCES: usize = 64;

/// A write to the catalog, as replicated through the Raft log.
/// Time-dependent commands carry `at_ms`, the leader's wall clock when it proposed them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Command {
    /// Register (or re-register) a site; also renews its lease.
    RegisterSite {
        spec: SiteSpec,
        at_ms: u64,
    },
    /// Renew a site's lease. A stale site becomes fresh again; a withdrawn one must re-register.
    Heartbeat {
        site: String,
        at_ms: u64,
        /// The site's view of its tunnel links; `None` keeps the last report.
        #[serde(default)]
        links: Option<Vec<Link>>,
        /// The reporting gateway, for a site registered by instance (else empty).
        #[serde(default)]
        instance: String,
        /// Its xDS clients' standing rejections; `None` keeps the last report.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        xds_rejections: Option<Vec<XdsRejection>>,
    },
    /// Remove a site and all its exports, and revoke it: it cannot register again (nor its
    /// agents renew their SVIDs) until it is reinstated or re-enrolled with a join token.
    RemoveSite {
        site: String,
    },
    /// Revoke a site, registered or not: as [`Command::RemoveSite`], and also for a site
    /// that never registered (an agent that joined and was found compromised).
    RevokeSite {
        site: String,
    },
    /// Lift a site's revocation (an admin's decision; a join token for the site does too).
    ReinstateSite {
        site: String,
    },
    /// Export ownership: only `sites` may export services in `scope` (a namespace `ns`, or
    /// one service `ns/name`, which is more specific and decides alone). Existing exports of
    /// other sites stay until they are written again.
    PutOwnership {
        scope: String,
        sites: Vec<String>,
    },
    DeleteOwnership {
        scope: String,
    },
    /// Replace a site's export of a service whole (generation fencing applies).
    PutExport {
        export: Export,
    },
    /// Delete a site's export. `generation` must be >= the stored one.
    DeleteExport {
        site: String,
        service: ServiceKey,
        generation: u64,
    },
    /// Set a site's import addresses of a service (generation fencing applies); an import
    /// with no addresses removes the site's record.
    PutImport {
        import: Import,
    },
    PutPolicy {
        policy: Policy,
    },
    DeletePolicy {
        name: String,
    },
    /// Mark a join token used (rejected if already used or expired at `at_ms`).
    UseToken {
        id: String,
        site: String,
        expires_ms: u64,
        at_ms: u64,
    },
    /// Revoke a join token before it is used (an admin's decision): a join with it is then
    /// refused. Remembered as long as a token can live ([`MAX_TOKEN_TTL_MS`] from `at_ms`).
    RevokeToken {
        id: String,
        at_ms: u64,
    },
    /// Forget sites withdrawn for at least `keep_ms` by `at_ms` (their records go; a site
    /// that comes back registers afresh). Proposed by the leader when one is due.
    ForgetWithdrawn {
        at_ms: u64,
        keep_ms: u64,
    },
    /// Leader clock tick: lapse leases, withdraw sites past their grace, forget expired tokens.
    Tick {
        at_ms: u64,
    },
}

/// One visible change, as carried by watch deltas.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "change")]
pub enum Change {
    SiteUpserted { site: Site },
    SiteRemoved { name: String },
    ExportUpserted { export: Export },
    ExportRemoved { service: ServiceKey, site: String },
    ImportUpserted { import: Import },
    ImportRemoved { service: ServiceKey, site: String },
    PolicyUpserted { policy: Policy },
    PolicyRemoved { name: String },
    TokenUsed { token: TokenUse },
    TokenForgotten { id: String },
    SiteRevoked { site: String, revision: u64 },
    SiteReinstated { site: String },
    OwnershipSet { scope: String, sites: Vec<String> },
    OwnershipRemoved { scope: String },
}

/// What an accepted command did. `changes` may be empty (e.g. a tick with nothing to do);
/// then the revision does not move.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    pub revision: u64,
    pub changes: Vec<Change>,
}

/// Why a command was refused. Deterministic, so every replica refuses the same way;
/// the catalog is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Rejection {
    /// A field is malformed; `field` names it (`export.endpoints[3].address`).
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    /// Something the command refers to does not exist.
    #[error("{what} not found: {name}")]
    NotFound { what: String, name: String },
    /// Fencing: an older generation than the stored one.
    #[error("stale generation {got} for {service} from site {site}: stored generation is {stored}")]
    StaleGeneration {
        site: String,
        service: String,
        got: u64,
        stored: u64,
    },
    /// A join token that was used already or has expired.
    #[error("join token {id} refused: {reason}")]
    Token { id: String, reason: String },
    /// The site's lease ran out and it was withdrawn at `since_ms`: it must register again
    /// (a heartbeat or an export is not enough).
    #[error("site {site} was withdrawn at {since_ms} ms: register it again")]
    Withdrawn { site: String, since_ms: u64 },
    /// The site was removed or revoked by an admin.
    #[error(
        "site {site} was revoked at revision {revision}: an admin must reinstate it (`ctl site reinstate`) or enrol it again with a join token"
    )]
    Revoked { site: String, revision: u64 },
    /// A quota of the catalog is reached.
    #[error("quota reached: at most {limit} {what}")]
    Quota { what: String, limit: u64 },
    /// Export ownership: the site may not export this service.
    #[error(
        "site {site} may not export {service}: services of {scope} are exported by {allowed:?} only (export ownership, `ctl owners`)"
    )]
    NotOwner {
        site: String,
        service: String,
        scope: String,
        allowed: Vec<String>,
    },
}

/// Sites a catalog holds at most (a registration of a new site beyond it is refused).
pub const MAX_SITES: usize = 10_000;

/// The longest a join token can be valid (the registry mints none longer).
pub const MAX_TOKEN_TTL_MS: u64 = 7 * 86_400_000;

/// How long a used join token is remembered after its expiry: a margin for leaders' clocks
/// that disagree (a token is refused once expired by the highest time seen anyway).
pub const USED_TOKEN_KEEP_MS: u64 = 3_600_000;

impl Command {
    /// The leader's clock reading the command carries, if any.
    pub fn at_ms(&self) -> Option<u64> {
        match self {
            Command::RegisterSite { at_ms, .. }
            | Command::Heartbeat { at_ms, .. }
            | Command::UseToken { at_ms, .. }
            | Command::RevokeToken { at_ms, .. }
            | Command::ForgetWithdrawn { at_ms, .. }
            | Command::Tick { at_ms } => Some(*at_ms),
            Command::RemoveSite { .. }
            | Command::RevokeSite { .. }
            | Command::ReinstateSite { .. }
            | Command::PutOwnership { .. }
            | Command::DeleteOwnership { .. }
            | Command::PutExport { .. }
            | Command::DeleteExport { .. }
            | Command::PutImport { .. }
            | Command::PutPolicy { .. }
            | Command::DeletePolicy { .. } => None,
        }
    }
}

impl Catalog {
    /// Apply one command: the deterministic Raft state machine.
    ///
    /// Validation and every check run before anything is written, so a rejected command
    /// leaves the catalog exactly as it was. The revision moves by one when the command
    /// produced at least one change; `Applied::revision` is the revision after the command.
    pub fn apply(&mut self, cmd: &Command) -> Result<Applied, Rejection> {
        cmd.validate()?;
        let next = self.revision.saturating_add(1);
        let changes = match cmd {
            Command::RegisterSite { spec, at_ms } => match self.revoked_sites.get(&spec.name) {
                Some(revision) => Err(Rejection::Revoked {
                    site: spec.name.clone(),
                    revision: *revision,
                }),
                None if !self.sites.contains_key(&spec.name) && self.sites.len() >= MAX_SITES => {
                    Err(Rejection::Quota {
                        what: "sites".into(),
                        limit: MAX_SITES as u64,
                    })
                }
                None if !spec.instance.is_empty()
                    && self.sites.get(&spec.name).is_some_and(|s| {
                        s.instances.len() >= MAX_INSTANCES
                            && !s.instances.iter().any(|i| i.name == spec.instance)
                    }) =>
                {
                    Err(Rejection::Quota {
                        what: "gateway instances per site".into(),
                        limit: MAX_INSTANCES as u64,
                    })
                }
                None => Ok(self.register_site(spec, *at_ms, next)),
            },
            Command::Heartbeat {
                site,
                at_ms,
                links,
                instance,
                xds_rejections,
            } => self.heartbeat(
                site,
                instance,
                *at_ms,
                links.as_deref(),
                xds_rejections.as_deref(),
            ),
            Command::RemoveSite { site } => self.remove_site(site, next),
            Command::RevokeSite { site } => Ok(self.revoke_site(site, next)),
            Command::ReinstateSite { site } => self.reinstate_site(site),
            Command::PutExport { export } => self.put_export(export, next),
            Command::DeleteExport {
                site,
                service,
                generation,
            } => self.delete_export(site, service, *generation),
            Command::PutImport { import } => self.put_import(import),
            Command::PutPolicy { policy } => Ok(self.put_policy(policy)),
            Command::DeletePolicy { name } => self.delete_policy(name),
            Command::PutOwnership { scope, sites } => Ok(self.put_ownership(scope, sites)),
            Command::DeleteOwnership { scope } => self.delete_ownership(scope),
            Command::UseToken {
                id,
                site,
                expires_ms,
                at_ms,
            } => self.use_token(id, site, *expires_ms, *at_ms),
            Command::RevokeToken { id, at_ms } => self.revoke_token(id, *at_ms),
            Command::ForgetWithdrawn { at_ms, keep_ms } => {
                Ok(self.forget_withdrawn(*at_ms, *keep_ms))
            }
            Command::Tick { at_ms } => Ok(self.tick(*at_ms)),
        }?;
        if let Some(at_ms) = cmd.at_ms() {
            self.clock_ms = self.clock_ms.max(at_ms);
        }
        if !changes.is_empty() {
            self.revision = next;
        }
        Ok(Applied {
            revision: self.revision,
            changes,
        })
    }

    /// Store `site` unless it is already stored as is.
    fn upsert_site(&mut self, site: Site) -> Vec<Change> {
        if self.sites.get(&site.name).is_some_and(|s| **s == site) {
            return Vec::new();
        }
        self.sites.insert(site.name.clone(), Arc::new(site.clone()));
        vec![Change::SiteUpserted { site }]
    }

    /// A lease never moves backwards, even if a new leader's clock is behind.
    fn renewed(old: Option<&Site>, at_ms: u64) -> u64 {
        old.map_or(at_ms, |s| s.last_heartbeat_ms.max(at_ms))
    }

    fn register_site(&mut self, spec: &SiteSpec, at_ms: u64, next: u64) -> Vec<Change> {
        let old = self.sites.get(&spec.name).map(|s| &**s);
        let mut site = Site {
            name: spec.name.clone(),
            kind: spec.kind,
            locality: spec.locality.clone(),
            gateways: spec.gateways.clone(),
            lease_ttl_ms: spec.lease_ttl_ms,
            grace_ms: spec.grace_ms,
            last_heartbeat_ms: Self::renewed(old, at_ms),
            state: SiteState::Fresh,
            created_revision: old.map_or(next, |s| s.created_revision),
            links: old.map_or_else(Vec::new, |s| s.links.clone()),
            instances: Vec::new(),
            xds_rejections: old.map_or_else(Vec::new, |s| s.xds_rejections.clone()),
        };
        if !spec.instance.is_empty() {
            // One gateway of several: it replaces its own entry, the others stay.
            let mut instances = old.map_or_else(Vec::new, |s| s.instances.clone());
            let (links, xds_rejections) = instances
                .iter()
                .find(|i| i.name == spec.instance)
                .map(|i| (i.links.clone(), i.xds_rejections.clone()))
                .unwrap_or_default();
            instances.retain(|i| i.name != spec.instance);
            instances.push(GatewayInstance {
                name: spec.instance.clone(),
                gateways: spec.gateways.clone(),
                links,
                xds_rejections,
                last_heartbeat_ms: at_ms,
            });
            instances.sort_by(|a, b| a.name.cmp(&b.name));
            site.instances = instances;
            site.derive_from_instances();
        }
        self.upsert_site(site)
    }

    fn heartbeat(
        &mut self,
        name: &str,
        instance: &str,
        at_ms: u64,
        links: Option<&[Link]>,
        xds_rejections: Option<&[XdsRejection]>,
    ) -> Result<Vec<Change>, Rejection> {
        let old = self
            .sites
            .get(name)
            .ok_or_else(|| not_found("site", name))?;
        if let SiteState::Withdrawn { since_ms } = old.state {
            return Err(Rejection::Withdrawn {
                site: name.to_owned(),
                since_ms,
            });
        }
        let mut site = (**old).clone();
        site.last_heartbeat_ms = Self::renewed(Some(old), at_ms);
        site.state = SiteState::Fresh;
        if instance.is_empty() {
            if let Some(links) = links {
                site.links = links.to_vec();
            }
            if let Some(r) = xds_rejections {
                site.xds_rejections = r.to_vec();
            }
        } else {
            // An instance the registry does not know (dropped after missing its lease, or
            // never registered) must register again: NotFound tells it to.
            let Some(i) = site.instances.iter_mut().find(|i| i.name == instance) else {
                return Err(not_found("gateway instance", &format!("{name}/{instance}")));
            };
            i.last_heartbeat_ms = i.last_heartbeat_ms.max(at_ms);
            if let Some(links) = links {
                i.links = links.to_vec();
            }
            if let Some(r) = xds_rejections {
                i.xds_rejections = r.to_vec();
            }
            site.derive_from_instances();
        }
        Ok(self.upsert_site(site))
    }

    /// Remove every export and import of `site`, each in key order.
    fn remove_exports_of(&mut self, site: &str) -> Vec<Change> {
        let of_site = |k: &&(ServiceKey, String)| k.1 == site;
        let exports: Vec<(ServiceKey, String)> =
            self.exports.keys().filter(of_site).cloned().collect();
        let imports: Vec<(ServiceKey, String)> =
            self.imports.keys().filter(of_site).cloned().collect();
        let mut changes = Vec::with_capacity(exports.len() + imports.len());
        for key in exports {
            self.exports.remove(&key);
            let (service, site) = key;
            changes.push(Change::ExportRemoved { service, site });
        }
        for key in imports {
            self.imports.remove(&key);
            let (service, site) = key;
            changes.push(Change::ImportRemoved { service, site });
        }
        changes
    }

    fn remove_site(&mut self, name: &str, next: u64) -> Result<Vec<Change>, Rejection> {
        if !self.sites.contains_key(name) {
            return Err(not_found("site", name));
        }
        Ok(self.revoke_site(name, next))
    }

    /// Removes the site (if registered) with its exports, and marks it revoked.
    fn revoke_site(&mut self, name: &str, next: u64) -> Vec<Change> {
        let mut changes = Vec::new();
        if self.sites.contains_key(name) {
            changes = self.remove_exports_of(name);
            self.export_tombstones.retain(|(_, site), _| site != name);
            self.sites.remove(name);
            changes.push(Change::SiteRemoved {
                name: name.to_owned(),
            });
        }
        if !self.revoked_sites.contains_key(name) {
            self.revoked_sites.insert(name.to_owned(), next);
            changes.push(Change::SiteRevoked {
                site: name.to_owned(),
                revision: next,
            });
        }
        changes
    }

    fn reinstate_site(&mut self, name: &str) -> Result<Vec<Change>, Rejection> {
        if self.revoked_sites.remove(name).is_none() {
            return Err(not_found("revoked site", name));
        }
        Ok(vec![Change::SiteReinstated {
            site: name.to_owned(),
        }])
    }

    /// The ownership rule that decides who may export `service`: the service's own, else
    /// its namespace's.
    pub fn owners_of(&self, service: &ServiceKey) -> Option<(String, &[String])> {
        let exact = format!("{}/{}", service.namespace, service.name);
        if let Some(sites) = self.owners.get(&exact) {
            return Some((exact, sites));
        }
        self.owners
            .get(&service.namespace)
            .map(|sites| (service.namespace.clone(), sites.as_slice()))
    }

    fn put_ownership(&mut self, scope: &str, sites: &[String]) -> Vec<Change> {
        let mut sites = sites.to_vec();
        sites.sort();
        sites.dedup();
        if self.owners.get(scope) == Some(&sites) {
            return Vec::new();
        }
        self.owners.insert(scope.to_owned(), sites.clone());
        vec![Change::OwnershipSet {
            scope: scope.to_owned(),
            sites,
        }]
    }

    fn delete_ownership(&mut self, scope: &str) -> Result<Vec<Change>, Rejection> {
        if self.owners.remove(scope).is_none() {
            return Err(not_found("ownership rule", scope));
        }
        Ok(vec![Change::OwnershipRemoved {
            scope: scope.to_owned(),
        }])
    }

    fn put_export(&mut self, export: &Export, next: u64) -> Result<Vec<Change>, Rejection> {
        if let Some((scope, allowed)) = self.owners_of(&export.service)
            && !allowed.contains(&export.site)
        {
            return Err(Rejection::NotOwner {
                site: export.site.clone(),
                service: export.service.to_string(),
                scope,
                allowed: allowed.to_vec(),
            });
        }
        let site = self
            .sites
            .get(&export.site)
            .ok_or_else(|| not_found("site", &export.site))?;
        if let SiteState::Withdrawn { since_ms } = site.state {
            return Err(Rejection::Withdrawn {
                site: export.site.clone(),
                since_ms,
            });
        }
        let key = export.key();
        let old = self.exports.get(&key);
        if old.is_none()
            && let Some(&deleted_at) = self.export_tombstones.get(&key)
            && export.generation <= deleted_at
        {
            return Err(Rejection::StaleGeneration {
                site: export.site.clone(),
                service: export.service.to_string(),
                got: export.generation,
                stored: deleted_at,
            });
        }
        if let Some(old) = old {
            let stale = export.generation < old.generation
                || (export.generation == old.generation && !export.same_content(old));
            if stale {
                return Err(Rejection::StaleGeneration {
                    site: export.site.clone(),
                    service: export.service.to_string(),
                    got: export.generation,
                    stored: old.generation,
                });
            }
            if export.generation == old.generation {
                return Ok(Vec::new());
            }
        }
        let mut stored = export.clone();
        stored.created_revision = old.map_or(next, |o| o.created_revision);
        stored.updated_revision = next;
        self.exports.insert(key, Arc::new(stored.clone()));
        Ok(vec![Change::ExportUpserted { export: stored }])
    }

    fn delete_export(
        &mut self,
        site: &str,
        service: &ServiceKey,
        generation: u64,
    ) -> Result<Vec<Change>, Rejection> {
        let key = (service.clone(), site.to_owned());
        let old = self
            .exports
            .get(&key)
            .ok_or_else(|| not_found("export", &format!("{service} from site {site}")))?;
        if generation < old.generation {
            return Err(Rejection::StaleGeneration {
                site: site.to_owned(),
                service: service.to_string(),
                got: generation,
                stored: old.generation,
            });
        }
        let deleted_at = generation.max(old.generation);
        self.exports.remove(&key);
        self.export_tombstones.insert(key, deleted_at);
        Ok(vec![Change::ExportRemoved {
            service: service.clone(),
            site: site.to_owned(),
        }])
    }

    fn put_import(&mut self, import: &Import) -> Result<Vec<Change>, Rejection> {
        let site = self
            .sites
            .get(&import.site)
            .ok_or_else(|| not_found("site", &import.site))?;
        if let SiteState::Withdrawn { since_ms } = site.state {
            return Err(Rejection::Withdrawn {
                site: import.site.clone(),
                since_ms,
            });
        }
        let key = import.key();
        if let Some(old) = self.imports.get(&key) {
            let stale = import.generation < old.generation
                || (import.generation == old.generation && **old != *import);
            if stale {
                return Err(Rejection::StaleGeneration {
                    site: import.site.clone(),
                    service: import.service.to_string(),
                    got: import.generation,
                    stored: old.generation,
                });
            }
            if import.generation == old.generation {
                return Ok(Vec::new());
            }
        }
        if import.ips.is_empty() {
            return Ok(match self.imports.remove(&key) {
                Some(_) => vec![Change::ImportRemoved {
                    service: key.0,
                    site: key.1,
                }],
                None => Vec::new(),
            });
        }
        self.imports.insert(key, Arc::new(import.clone()));
        Ok(vec![Change::ImportUpserted {
            import: import.clone(),
        }])
    }

    fn put_policy(&mut self, policy: &Policy) -> Vec<Change> {
        if self
            .policies
            .get(&policy.name)
            .is_some_and(|p| **p == *policy)
        {
            return Vec::new();
        }
        self.policies
            .insert(policy.name.clone(), Arc::new(policy.clone()));
        vec![Change::PolicyUpserted {
            policy: policy.clone(),
        }]
    }

    fn delete_policy(&mut self, name: &str) -> Result<Vec<Change>, Rejection> {
        if self.policies.remove(name).is_none() {
            return Err(not_found("policy", name));
        }
        Ok(vec![Change::PolicyRemoved {
            name: name.to_owned(),
        }])
    }

    fn use_token(
        &mut self,
        id: &str,
        site: &str,
        expires_ms: u64,
        at_ms: u64,
    ) -> Result<Vec<Change>, Rejection> {
        if let Some(used) = self.tokens.get(id) {
            return Err(Rejection::Token {
                id: id.to_owned(),
                reason: if used.revoked {
                    format!("revoked by an admin at {} ms", used.used_at_ms)
                } else {
                    format!(
                        "already used by site {} at {} ms",
                        used.site, used.used_at_ms
                    )
                },
            });
        }
        // Time never goes back here, whatever the current leader's clock says.
        let now = at_ms.max(self.clock_ms);
        if expires_ms <= now {
            return Err(Rejection::Token {
                id: id.to_owned(),
                reason: format!("expired at {expires_ms} ms (now {now} ms)"),
            });
        }
        let token = TokenUse {
            id: id.to_owned(),
            site: site.to_owned(),
            used_at_ms: at_ms,
            expires_ms,
            revoked: false,
        };
        self.tokens.insert(id.to_owned(), token.clone());
        let mut changes = vec![Change::TokenUsed { token }];
        // A join token for the site is an admin's fresh enrolment: it lifts a revocation.
        if self.revoked_sites.remove(site).is_some() {
            changes.push(Change::SiteReinstated {
                site: site.to_owned(),
            });
        }
        Ok(changes)
    }

    fn revoke_token(&mut self, id: &str, at_ms: u64) -> Result<Vec<Change>, Rejection> {
        match self.tokens.get(id) {
            Some(t) if t.revoked => Ok(Vec::new()),
            Some(t) => Err(Rejection::Token {
                id: id.to_owned(),
                reason: format!(
                    "already used by site {} at {} ms: revoking it changes nothing (take the site out with `ctl site revoke {}`)",
                    t.site, t.used_at_ms, t.site
                ),
            }),
            None => {
                let token = TokenUse {
                    id: id.to_owned(),
                    site: String::new(),
                    used_at_ms: at_ms,
                    expires_ms: at_ms.max(self.clock_ms).saturating_add(MAX_TOKEN_TTL_MS),
                    revoked: true,
                };
                self.tokens.insert(id.to_owned(), token.clone());
                Ok(vec![Change::TokenUsed { token }])
            }
        }
    }

    /// The sites whose gateways report a live tunnel to `site` and whose own lease holds at
    /// `at_ms`, in name order: while there is one, a stale `site` is not withdrawn.
    pub fn vouchers(&self, site: &str, at_ms: u64) -> Vec<&str> {
        self.sites
            .values()
            .filter(|s| {
                s.name != site
                    && s.state == SiteState::Fresh
                    && s.lease_expires_ms() > at_ms
                    && s.links.iter().any(|l| l.peer_site == site && l.connected)
            })
            .map(|s| s.name.as_str())
            .collect()
    }

    /// Sites withdrawn for at least `keep_ms` at `at_ms`, in name order.
    pub fn forgettable(&self, at_ms: u64, keep_ms: u64) -> Vec<&str> {
        self.sites
            .values()
            .filter(|s| {
                matches!(s.state, SiteState::Withdrawn { since_ms }
                    if since_ms.saturating_add(keep_ms) <= at_ms)
            })
            .map(|s| s.name.as_str())
            .collect()
    }

    fn forget_withdrawn(&mut self, at_ms: u64, keep_ms: u64) -> Vec<Change> {
        let names: Vec<String> = self
            .forgettable(at_ms, keep_ms)
            .into_iter()
            .map(str::to_owned)
            .collect();
        let mut changes = Vec::new();
        for name in names {
            // (A withdrawn site holds no exports or imports; this clears any left anyway.)
            changes.extend(self.remove_exports_of(&name));
            self.export_tombstones.retain(|(_, s), _| *s != name);
            self.sites.remove(&name);
            changes.push(Change::SiteRemoved { name });
        }
        changes
    }

    /// What a tick at `at_ms` does to `site`'s lease, if anything: the one lease
    /// transition, used by the state machine's tick and by the leader deciding whether a
    /// tick is due (`registry/src/leases.rs`).
    pub fn lease_step(&self, site: &Site, at_ms: u64) -> Option<LeaseStep> {
        let mut state = site.state;
        if state == SiteState::Fresh && site.lease_expires_ms() <= at_ms {
            state = SiteState::Stale {
                since_ms: site.lease_expires_ms(),
            };
        }
        // A partial partition: the registry lost the site, but a live site's gateway
        // still reaches it. It stays stale (demoted), not withdrawn, while that lasts.
        if let SiteState::Stale { since_ms } = state
            && since_ms.saturating_add(site.grace_ms) <= at_ms
            && self.vouchers(&site.name, at_ms).is_empty()
        {
            state = SiteState::Withdrawn { since_ms: at_ms };
        }
        // A gateway instance that missed its lease leaves the site (its addresses with
        // it) while another instance keeps the site fresh; the last one stays, so a
        // stale site keeps an address to be reached at.
        let live = |i: &GatewayInstance| instance_live(site, i, at_ms);
        let drop_instances = state == SiteState::Fresh
            && site.instances.iter().any(live)
            && !site.instances.iter().all(live);
        (state != site.state || drop_instances).then_some(LeaseStep {
            state,
            drop_instances,
        })
    }

    /// Used tokens a tick at `at_ms` forgets: kept well past their expiry (and by the
    /// highest time seen), so a leader whose clock is behind still finds them used.
    pub fn expired_tokens(&self, at_ms: u64) -> impl Iterator<Item = &TokenUse> {
        let now = at_ms.max(self.clock_ms);
        self.tokens
            .values()
            .filter(move |t| t.expires_ms.saturating_add(USED_TOKEN_KEEP_MS) < now)
    }

    /// Lapse leases, withdraw sites past their grace (a late tick may do both at once),
    /// forget used tokens [`USED_TOKEN_KEEP_MS`] after they expired.
    fn tick(&mut self, at_ms: u64) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut updated: Vec<Site> = Vec::new();
        for site in self.sites.values() {
            let Some(step) = self.lease_step(site, at_ms) else {
                continue;
            };
            let mut s = Site {
                state: step.state,
                ..(**site).clone()
            };
            if step.drop_instances {
                s.instances.retain(|i| instance_live(site, i, at_ms));
                s.derive_from_instances();
            }
            updated.push(s);
        }
        for site in updated {
            if matches!(site.state, SiteState::Withdrawn { .. }) {
                changes.extend(self.remove_exports_of(&site.name));
                // The site starts afresh when it registers again.
                self.export_tombstones.retain(|(_, s), _| *s != site.name);
            }
            changes.extend(self.upsert_site(site));
        }
        let expired: Vec<String> = self.expired_tokens(at_ms).map(|t| t.id.clone()).collect();
        for id in expired {
            self.tokens.remove(&id);
            changes.push(Change::TokenForgotten { id });
        }
        changes
    }
}

/// One site's lease transition at a tick (see [`Catalog::lease_step`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseStep {
    /// The site's state after the tick.
    pub state: SiteState,
    /// Gateway instances that missed their lease leave (others keep the site fresh).
    pub drop_instances: bool,
}

/// Whether gateway instance `i` of `site` still holds its lease at `at_ms`.
fn instance_live(site: &Site, i: &GatewayInstance, at_ms: u64) -> bool {
    i.last_heartbeat_ms.saturating_add(site.lease_ttl_ms) > at_ms
}

fn not_found(what: &str, name: &str) -> Rejection {
    Rejection::NotFound {
        what: what.to_owned(),
        name: name.to_owned(),
    }
}
