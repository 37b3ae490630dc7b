//! Reads, status and membership calls of [`RegistryClient`].

use std::sync::Arc;
use std::time::Duration;

use tonic::Code;

use super::{
    ClientError, Consistency, Ranked, RegistryClient, SiteList, Versioned, decode, status_error,
};
use crate::model::{Catalog, MergedService, Policy, Rejection, ServiceKey};
use crate::proto;

impl RegistryClient {
    /// Every exported service, merged.
    pub async fn list_services(
        &self,
        consistency: Consistency,
    ) -> Result<Versioned<Vec<MergedService>>, ClientError> {
        let req = proto::ReadRequest {
            stale: consistency.stale(),
        };
        let r = self
            .call(
                "ListServices",
                |mut c| async move { c.list_services(req).await },
            )
            .await?;
        Ok(Versioned {
            revision: r.revision,
            value: decode("ListServices", &r.services_json)?,
        })
    }

    /// The merged view of one service; `None` when no site exports it.
    pub async fn get_service(
        &self,
        key: &ServiceKey,
        consistency: Consistency,
    ) -> Result<Versioned<Option<MergedService>>, ClientError> {
        let req = proto::GetServiceRequest {
            service: Some(proto::ServiceKey::from(key)),
            stale: consistency.stale(),
        };
        let reply = self
            .call("GetService", |mut c| {
                let req = req.clone();
                async move { c.get_service(req).await }
            })
            .await;
        match reply {
            Ok(r) => Ok(Versioned {
                revision: r.revision,
                value: Some(decode("GetService", &r.service_json)?),
            }),
            Err(ClientError::Rejected(Rejection::NotFound { what, .. })) if what == "service" => {
                Ok(Versioned {
                    revision: 0,
                    value: None,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// The endpoint groups of `key` ranked from `from_site`'s point of view, best first
    /// (same site, same zone, same region, others; stale sites last). Empty when no site
    /// exports the service.
    pub async fn resolve(
        &self,
        key: &ServiceKey,
        from_site: &str,
        consistency: Consistency,
    ) -> Result<Versioned<Ranked>, ClientError> {
        let req = proto::ResolveRequest {
            service: Some(proto::ServiceKey::from(key)),
            from_site: from_site.into(),
            stale: consistency.stale(),
        };
        let r = self
            .call("Resolve", |mut c| {
                let req = req.clone();
                async move { c.resolve(req).await }
            })
            .await?;
        Ok(Versioned {
            revision: r.revision,
            value: decode("Resolve", &r.ranked_json)?,
        })
    }

    pub async fn list_sites(&self, consistency: Consistency) -> Result<SiteList, ClientError> {
        let req = proto::ReadRequest {
            stale: consistency.stale(),
        };
        let r = self
            .call("ListSites", |mut c| async move { c.list_sites(req).await })
            .await?;
        Ok(SiteList {
            revision: r.revision,
            now_ms: r.now_ms,
            sites: decode("ListSites", &r.sites_json)?,
        })
    }

    pub async fn list_policies(
        &self,
        consistency: Consistency,
    ) -> Result<Versioned<Vec<Policy>>, ClientError> {
        let req = proto::ReadRequest {
            stale: consistency.stale(),
        };
        let r = self
            .call(
                "ListPolicies",
                |mut c| async move { c.list_policies(req).await },
            )
            .await?;
        Ok(Versioned {
            revision: r.revision,
            value: decode("ListPolicies", &r.policies_json)?,
        })
    }

    /// The whole catalog at one revision.
    pub async fn catalog(&self, consistency: Consistency) -> Result<Arc<Catalog>, ClientError> {
        let req = proto::ReadRequest {
            stale: consistency.stale(),
        };
        let r = self
            .call(
                "GetCatalog",
                |mut c| async move { c.get_catalog(req).await },
            )
            .await?;
        Ok(Arc::new(decode("GetCatalog", &r.catalog_json)?))
    }

    /// Cluster status as the leader sees it (forwarded there by whichever node answers):
    /// leader, term, commit index, and every member's matched index and lag.
    pub async fn status(&self) -> Result<proto::StatusReply, ClientError> {
        let req = proto::StatusRequest { local: false };
        self.call("Status", |mut c| async move { c.status(req).await })
            .await
    }

    /// Status of each node as that node sees itself, in the order of the URLs; a node
    /// that does not answer within the attempt timeout is an error in its slot.
    pub async fn status_of_each(&self) -> Vec<(String, Result<proto::StatusReply, ClientError>)> {
        let timeout = self.inner.opts.attempt_timeout;
        let calls = (0..self.inner.nodes.len()).map(|i| {
            let mut c = self.grpc(i);
            let url = self.inner.nodes[i].url.clone();
            async move {
                let req = proto::StatusRequest { local: true };
                let r = match tokio::time::timeout(timeout, c.status(req)).await {
                    Ok(Ok(r)) => Ok(r.into_inner()),
                    Ok(Err(status)) => Err(status_error("Status", status)),
                    Err(_) => Err(ClientError::Status {
                        method: "Status",
                        code: Code::DeadlineExceeded,
                        message: format!("no answer in {timeout:?}"),
                    }),
                };
                (url, r)
            }
        });
        futures::future::join_all(calls).await
    }

    /// Adds a node as a learner (it replicates but does not vote). With `wait`, returns
    /// once it has caught up (each attempt may then take up to ten minutes).
    pub async fn add_learner(
        &self,
        node_id: u64,
        url: &str,
        wait: bool,
    ) -> Result<proto::MembershipReply, ClientError> {
        let req = proto::AddLearnerRequest {
            node_id,
            url: url.into(),
            wait,
        };
        let timeout = if wait {
            Duration::from_secs(600)
        } else {
            self.inner.opts.attempt_timeout
        };
        self.call_timed("AddLearner", timeout, |mut c| {
            let req = req.clone();
            async move { c.add_learner(req).await }
        })
        .await
    }

    /// Makes a learner a voter.
    pub async fn promote(&self, node_id: u64) -> Result<proto::MembershipReply, ClientError> {
        let req = proto::PromoteRequest { node_id };
        self.call("Promote", |mut c| async move { c.promote(req).await })
            .await
    }

    /// Removes a voter or learner from the cluster.
    pub async fn remove_member(&self, node_id: u64) -> Result<proto::MembershipReply, ClientError> {
        let req = proto::RemoveMemberRequest { node_id };
        self.call(
            "RemoveMember",
            |mut c| async move { c.remove_member(req).await },
        )
        .await
    }
}
