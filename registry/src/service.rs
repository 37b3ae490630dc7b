//! The `Registry` gRPC service: authorization, typed requests to commands, the leader
//! routing of [`Shared::on_leader`], and catalog views for reads.
//!
//! Writes are validated here first (a bad field is refused without a trip through the log
//! or to the leader), then proposed on the leader with the leader's wall clock as `at_ms`.
//! Reads are linearizable unless `stale` is set, in which case this node answers from its
//! own replica.

mod join;
mod members;
mod route;

use std::sync::Arc;

use meshbridge_core::model::{self, Catalog, Command, Rejection};
use meshbridge_core::proto::{self, registry_server::Registry};
use serde::Serialize;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::authz::Caller;
use crate::error::ApiError;
use crate::shared::{Shared, now_ms};
use crate::watch::{WatchStream, watch_stream};

pub use join::Issuer;

type Grpc = proto::registry_client::RegistryClient<Channel>;

/// The registry API of one node.
pub struct RegistryApi {
    shared: Arc<Shared>,
    issuer: Option<Arc<Issuer>>,
}

impl RegistryApi {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            issuer: None,
        }
    }

    /// Serve join tokens, joins and renewals with `issuer` (the node's `ca_dir`).
    pub fn with_issuer(mut self, issuer: Option<Issuer>) -> Self {
        self.issuer = issuer.map(Arc::new);
        self
    }

    fn caller<T>(&self, req: &Request<T>) -> Result<Caller, ApiError> {
        if let Some(p) = req.extensions().get::<crate::listener::Peer>()
            && let (Some(id), Some((not_before, not_after))) = (&p.id, p.validity)
        {
            self.shared.seen.note(id, not_before, not_after);
        }
        Caller::of(req, &self.shared.trust_domain)
    }
}

fn json<T: Serialize + ?Sized>(v: &T) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(v).map_err(|e| ApiError::internal("encode reply", e))
}

fn refused(r: Rejection) -> ApiError {
    ApiError::Rejected(r)
}

#[tonic::async_trait]
impl Registry for RegistryApi {
    async fn register_site(
        &self,
        req: Request<proto::RegisterSiteRequest>,
    ) -> Result<Response<proto::WriteReply>, Status> {
        let caller = self.caller(&req)?;
        let l = &self.shared.leases;
        let spec = proto::required(req.get_ref().spec.as_ref(), "spec")
            .and_then(|spec| proto::to_site_spec(spec, l.default_ttl_ms, l.default_grace_ms))
            .map_err(refused)?;
        caller.require_site(&spec.name, "register")?;
        let cmd = |at_ms| Command::RegisterSite {
            spec: spec.clone(),
            at_ms,
        };
        self.write("RegisterSite", req, cmd, |mut c, r| async move {
            c.register_site(r).await
        })
        .await
    }

    async fn heartbeat(
        &self,
        req: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::WriteReply>, Status> {
        let caller = self.caller(&req)?;
        let site = req.get_ref().site.clone();
        caller.require_site(&site, "renew the lease")?;
        let report = req.get_ref().report_links;
        let links = report.then(|| req.get_ref().links.iter().map(Into::into).collect());
        let xds_rejections =
            report.then(|| proto::to_xds_rejections(&req.get_ref().xds_rejections));
        let instance = req.get_ref().instance.clone();
        let cmd = |at_ms| Command::Heartbeat {
            site: site.clone(),
            at_ms,
            links: links.clone(),
            instance: instance.clone(),
            xds_rejections: xds_rejections.clone(),
        };
        self.write("Heartbeat", req, cmd, |mut c, r| async move {
            c.heartbeat(r).await
        })
        .await
    }

    async fn remove_site(
        &self,
        req: Request<proto::RemoveSiteRequest>,
    ) -> Result<Response<proto::WriteReply>, Status> {
        self.caller(&req)?.require_admin("remove sites")?;
        let site = req.get_ref().site.clone();
        let cmd = |_| Command::RemoveSite { site: site.clone() };
        self.write("RemoveSite", req, cmd, |mut c, r| async move {
            c.remove_site(r).await
        })
        .await
    }

    async fn revoke_site(
        &self,
        req: Request<proto::RemoveSiteRequest>,
    ) -> Result<Response<proto::WriteReply>, Status> {
        self.caller(&req)?.require_admin("revoke sites")?;
        let site = req.get_ref().site.clone();
        let cmd = |_| Command::RevokeSite { site: site.clone() };
        self.write("RevokeSite", req, cmd, |mut c, r| async move {
            c.revoke_site(r).await
        })
        .await
    }

    async fn reinstate_site(
        &self,
        req: Request<proto::RemoveSiteRequest>,
    ) -> Result<Response<proto::WriteReply>, Status> {
        self.caller(&req)?.require_admin("reinstate sites")?;
        let site = req.get_ref().site.clone();
        let cmd = |_| Command::ReinstateSite { site: site.clone() };
        self.write("ReinstateSite", req, cmd, |mut c, r| async move {
            c.reinstate_site(r).await
        })
        .await
    }

    async fn put_ownership(
        &self,
        req: Request<proto::OwnershipRequest>,
    ) -> Result<Response<proto::WriteReply>, Status> {
        self.caller(&req)?.require_admin("set export ownership")?;
        let (scope, sites) = (req.get_ref().scope.clone(), req.get_ref().sites.clone());
        let cmd = |_| Command::PutOwnership {
            scope: scope.clone(),
            sites: sites.clone(),
        };
        self.write("PutOwnership", req, cmd, |mut c, r| async move {
            c.put_ownership(r).await
        })
        .await
    }

    async fn delete_ownership(
        &self,
        req: Request<proto::OwnershipRequest>,
    ) -> Result<Response<proto::WriteReply>, Status> {
        self.caller(&req)?
            .require_admin("delete export ownership")?;
        let scope = req.get_ref().scope.clone();
        let cmd = |_| Command::DeleteOwnership {
            scope: scope.clone(),
        };
        self.write("DeleteOwnership", req, cmd, |mut c, r| async move {
            c.delete_ownership(r).await
        })
        .await
    }

    async fn put_export(
        &self,
        req: Request<proto::PutExportRequest>,
    ) -> Result<Response<proto::WriteReply>, Status> {
        let caller = self.caller(&req)?;
        let export = proto::required(req.get_ref().export.as_ref(), "export")
            .and_then(model::Export::try_from)
            .map_err(refused)?;
        caller.require_site(&export.site, "export services")?;
        let cmd = |_| Command::PutExport {
            export: export.clone(),
        };
        self.write("PutExport", req, cmd, |mut c, r| async move {
            c.put_export(r).await
        })
        .await
    }

    async fn put_import(
        &self,
        req: Request<proto::PutImportRequest>,
    ) -> Result<Response<proto::WriteReply>, Status> {
        let caller = self.caller(&req)?;
        let import = model::Import::try_from(req.get_ref()).map_err(refused)?;
        caller.require_site(&import.site, "write import addresses")?;
        let cmd = |_| Command::PutImport {
            import: import.clone(),
        };
        self.write("PutImport", req, cmd, |mut c, r| async move {
            c.put_import(r).await
        })
        .await
    }

    async fn delete_export(
        &self,
        req: Request<proto::DeleteExportRequest>,
    ) -> Result<Response<proto::WriteReply>, Status> {
        let caller = self.caller(&req)?;
        let r = req.get_ref();
        let (site, generation) = (r.site.clone(), r.generation);
        let service = model::ServiceKey::from(
            proto::required(r.service.as_ref(), "service").map_err(refused)?,
        );
        caller.require_site(&site, "delete exports")?;
        let cmd = |_| Command::DeleteExport {
            site: site.clone(),
            service: service.clone(),
            generation,
        };
        self.write("DeleteExport", req, cmd, |mut c, r| async move {
            c.delete_export(r).await
        })
        .await
    }

    async fn put_policy(
        &self,
        req: Request<proto::PutPolicyRequest>,
    ) -> Result<Response<proto::WriteReply>, Status> {
        self.caller(&req)?.require_admin("write policies")?;
        let policy = proto::required(req.get_ref().policy.as_ref(), "policy")
            .and_then(model::Policy::try_from)
            .map_err(refused)?;
        let cmd = |_| Command::PutPolicy {
            policy: policy.clone(),
        };
        self.write("PutPolicy", req, cmd, |mut c, r| async move {
            c.put_policy(r).await
        })
        .await
    }

    async fn delete_policy(
        &self,
        req: Request<proto::DeletePolicyRequest>,
    ) -> Result<Response<proto::WriteReply>, Status> {
        self.caller(&req)?.require_admin("delete policies")?;
        let name = req.get_ref().name.clone();
        let cmd = |_| Command::DeletePolicy { name: name.clone() };
        self.write("DeletePolicy", req, cmd, |mut c, r| async move {
            c.delete_policy(r).await
        })
        .await
    }

    async fn revoke_token(
        &self,
        req: Request<proto::RevokeTokenRequest>,
    ) -> Result<Response<proto::WriteReply>, Status> {
        self.caller(&req)?.require_admin("revoke join tokens")?;
        let id = req.get_ref().id.clone();
        let cmd = |at_ms| Command::RevokeToken {
            id: id.clone(),
            at_ms,
        };
        self.write("RevokeToken", req, cmd, |mut c, r| async move {
            c.revoke_token(r).await
        })
        .await
    }

    async fn list_services(
        &self,
        req: Request<proto::ReadRequest>,
    ) -> Result<Response<proto::ServicesReply>, Status> {
        let stale = req.get_ref().stale;
        let view = |c: &Catalog| {
            Ok(proto::ServicesReply {
                revision: c.revision,
                services_json: json(&c.services())?,
            })
        };
        self.read("ListServices", req, stale, view, |mut c, r| async move {
            c.list_services(r).await
        })
        .await
    }

    async fn get_service(
        &self,
        req: Request<proto::GetServiceRequest>,
    ) -> Result<Response<proto::ServiceReply>, Status> {
        let r = req.get_ref();
        let stale = r.stale;
        let key = model::ServiceKey::from(
            proto::required(r.service.as_ref(), "service").map_err(refused)?,
        );
        key.validate().map_err(refused)?;
        let view = |c: &Catalog| {
            let merged = c.service(&key).ok_or_else(|| {
                refused(Rejection::NotFound {
                    what: "service".into(),
                    name: key.to_string(),
                })
            })?;
            Ok(proto::ServiceReply {
                revision: c.revision,
                service_json: json(&merged)?,
            })
        };
        self.read("GetService", req, stale, view, |mut c, r| async move {
            c.get_service(r).await
        })
        .await
    }

    async fn resolve(
        &self,
        req: Request<proto::ResolveRequest>,
    ) -> Result<Response<proto::ResolveReply>, Status> {
        let r = req.get_ref();
        let (stale, from_site) = (r.stale, r.from_site.clone());
        let key = model::ServiceKey::from(
            proto::required(r.service.as_ref(), "service").map_err(refused)?,
        );
        key.validate().map_err(refused)?;
        let view = |c: &Catalog| {
            let ranked = c.resolve(&key, &from_site).unwrap_or_default();
            Ok(proto::ResolveReply {
                revision: c.revision,
                ranked_json: json(&ranked)?,
            })
        };
        self.read("Resolve", req, stale, view, |mut c, r| async move {
            c.resolve(r).await
        })
        .await
    }

    async fn list_sites(
        &self,
        req: Request<proto::ReadRequest>,
    ) -> Result<Response<proto::SitesReply>, Status> {
        let stale = req.get_ref().stale;
        let view = |c: &Catalog| {
            let sites: Vec<_> = c.sites.values().map(|s| &**s).collect();
            Ok(proto::SitesReply {
                revision: c.revision,
                sites_json: json(&sites)?,
                now_ms: now_ms(),
            })
        };
        self.read("ListSites", req, stale, view, |mut c, r| async move {
            c.list_sites(r).await
        })
        .await
    }

    async fn list_policies(
        &self,
        req: Request<proto::ReadRequest>,
    ) -> Result<Response<proto::PoliciesReply>, Status> {
        let stale = req.get_ref().stale;
        let view = |c: &Catalog| {
            let policies: Vec<_> = c.policies.values().map(|p| &**p).collect();
            Ok(proto::PoliciesReply {
                revision: c.revision,
                policies_json: json(&policies)?,
            })
        };
        self.read("ListPolicies", req, stale, view, |mut c, r| async move {
            c.list_policies(r).await
        })
        .await
    }

    async fn get_catalog(
        &self,
        req: Request<proto::ReadRequest>,
    ) -> Result<Response<proto::CatalogReply>, Status> {
        let stale = req.get_ref().stale;
        let view = |c: &Catalog| {
            Ok(proto::CatalogReply {
                revision: c.revision,
                catalog_json: json(c)?,
            })
        };
        self.read("GetCatalog", req, stale, view, |mut c, r| async move {
            c.get_catalog(r).await
        })
        .await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<proto::WatchRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let caller = self.caller(&req)?;
        let from = req.get_ref().from_revision;
        let addr = req
            .extensions()
            .get::<crate::listener::Peer>()
            .map(|p| p.addr);
        let slot = self.shared.watch_slot(&caller.id().to_string())?;
        tracing::debug!(caller = %caller.id(), client.addr = ?addr, from, "watch opened");
        Ok(Response::new(watch_stream(self.shared.clone(), from, slot)))
    }

    async fn status(
        &self,
        req: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusReply>, Status> {
        self.caller(&req)?;
        if req.get_ref().local {
            return Ok(Response::new(members::status(&self.shared).await));
        }
        let s = &self.shared;
        s.on_leader(
            "Status",
            req,
            || async { Ok(members::status(s).await) },
            |mut c, r| async move { c.status(r).await },
        )
        .await
    }

    async fn add_learner(
        &self,
        req: Request<proto::AddLearnerRequest>,
    ) -> Result<Response<proto::MembershipReply>, Status> {
        self.caller(&req)?.require_admin("change the membership")?;
        members::add_learner(&self.shared, req).await
    }

    async fn promote(
        &self,
        req: Request<proto::PromoteRequest>,
    ) -> Result<Response<proto::MembershipReply>, Status> {
        self.caller(&req)?.require_admin("change the membership")?;
        members::promote(&self.shared, req).await
    }

    async fn remove_member(
        &self,
        req: Request<proto::RemoveMemberRequest>,
    ) -> Result<Response<proto::MembershipReply>, Status> {
        self.caller(&req)?.require_admin("change the membership")?;
        members::remove(&self.shared, req).await
    }

    async fn create_join_token(
        &self,
        req: Request<proto::CreateJoinTokenRequest>,
    ) -> Result<Response<proto::CreateJoinTokenReply>, Status> {
        self.caller(&req)?.require_admin("create join tokens")?;
        let issuer = join::need(self.issuer.as_ref())?;
        Ok(Response::new(issuer.create_token(req.get_ref())?))
    }

    /// The one call open to clients without a certificate: the token authenticates.
    async fn join(
        &self,
        req: Request<proto::JoinRequest>,
    ) -> Result<Response<proto::SvidReply>, Status> {
        join::need(self.issuer.as_ref())?
            .join(&self.shared, req)
            .await
    }

    async fn renew(
        &self,
        req: Request<proto::RenewRequest>,
    ) -> Result<Response<proto::SvidReply>, Status> {
        let caller = self.caller(&req)?;
        let issuer = join::need(self.issuer.as_ref())?;
        if let Caller::Site { site, id } = &caller {
            join::may_renew(&self.shared.catalog(), site, id)?;
        }
        Ok(Response::new(issuer.renew(&caller, req.get_ref())?))
    }
}
