//! Typed writes of [`RegistryClient`].

use super::{ClientError, RegistryClient, WriteResult};
use crate::model::{Export, Import, Policy, Report, ServiceKey, SiteSpec};
use crate::proto;

impl RegistryClient {
    /// Registers (or re-registers) a site and renews its lease. A zero `lease_ttl_ms` takes
    /// the registry's default lease and grace.
    pub async fn register_site(&self, spec: &SiteSpec) -> Result<WriteResult, ClientError> {
        let req = proto::RegisterSiteRequest {
            spec: Some(proto::SiteSpec::from(spec)),
        };
        self.write("RegisterSite", req, |mut c, r| async move {
            c.register_site(r).await
        })
        .await
    }

    pub async fn heartbeat(&self, site: &str) -> Result<WriteResult, ClientError> {
        self.heartbeat_reporting(site, "", None).await
    }

    /// Renews the lease and, when `report` is given, replaces the reported links and xDS
    /// rejections: the site's, or with `instance`, that gateway instance's.
    pub async fn heartbeat_reporting(
        &self,
        site: &str,
        instance: &str,
        report: Option<&Report>,
    ) -> Result<WriteResult, ClientError> {
        let req = proto::HeartbeatRequest {
            site: site.into(),
            instance: instance.into(),
            report_links: report.is_some(),
            links: report
                .map(|r| r.links.iter().map(Into::into).collect())
                .unwrap_or_default(),
            xds_rejections: report
                .map(|r| r.xds_rejections.iter().map(Into::into).collect())
                .unwrap_or_default(),
        };
        self.write(
            "Heartbeat",
            req,
            |mut c, r| async move { c.heartbeat(r).await },
        )
        .await
    }

    pub async fn remove_site(&self, site: &str) -> Result<WriteResult, ClientError> {
        let req = proto::RemoveSiteRequest { site: site.into() };
        self.write("RemoveSite", req, |mut c, r| async move {
            c.remove_site(r).await
        })
        .await
    }

    /// Revoke `site` (registered or not): see [`Command::RevokeSite`](crate::model::Command).
    pub async fn revoke_site(&self, site: &str) -> Result<WriteResult, ClientError> {
        let req = proto::RemoveSiteRequest { site: site.into() };
        self.write("RevokeSite", req, |mut c, r| async move {
            c.revoke_site(r).await
        })
        .await
    }

    /// Lift `site`'s revocation.
    pub async fn reinstate_site(&self, site: &str) -> Result<WriteResult, ClientError> {
        let req = proto::RemoveSiteRequest { site: site.into() };
        self.write("ReinstateSite", req, |mut c, r| async move {
            c.reinstate_site(r).await
        })
        .await
    }

    /// Only `sites` may export services of `scope` (`ns` or `ns/name`).
    pub async fn put_ownership(
        &self,
        scope: &str,
        sites: &[String],
    ) -> Result<WriteResult, ClientError> {
        let req = proto::OwnershipRequest {
            scope: scope.into(),
            sites: sites.to_vec(),
        };
        self.write("PutOwnership", req, |mut c, r| async move {
            c.put_ownership(r).await
        })
        .await
    }

    pub async fn delete_ownership(&self, scope: &str) -> Result<WriteResult, ClientError> {
        let req = proto::OwnershipRequest {
            scope: scope.into(),
            sites: Vec::new(),
        };
        self.write("DeleteOwnership", req, |mut c, r| async move {
            c.delete_ownership(r).await
        })
        .await
    }

    pub async fn put_export(&self, export: &Export) -> Result<WriteResult, ClientError> {
        let req = proto::PutExportRequest {
            export: Some(proto::Export::from(export)),
        };
        self.write(
            "PutExport",
            req,
            |mut c, r| async move { c.put_export(r).await },
        )
        .await
    }

    pub async fn delete_export(
        &self,
        site: &str,
        service: &ServiceKey,
        generation: u64,
    ) -> Result<WriteResult, ClientError> {
        let req = proto::DeleteExportRequest {
            site: site.into(),
            service: Some(proto::ServiceKey::from(service)),
            generation,
        };
        self.write("DeleteExport", req, |mut c, r| async move {
            c.delete_export(r).await
        })
        .await
    }

    /// Set (or, with no addresses, remove) `import.site`'s import address of a service.
    pub async fn put_import(&self, import: &Import) -> Result<WriteResult, ClientError> {
        let req = proto::PutImportRequest::from(import);
        self.write(
            "PutImport",
            req,
            |mut c, r| async move { c.put_import(r).await },
        )
        .await
    }

    /// Revoke join token `id` before it is used (admins only).
    pub async fn revoke_token(&self, id: &str) -> Result<WriteResult, ClientError> {
        let req = proto::RevokeTokenRequest { id: id.into() };
        self.write("RevokeToken", req, |mut c, r| async move {
            c.revoke_token(r).await
        })
        .await
    }

    pub async fn put_policy(&self, policy: &Policy) -> Result<WriteResult, ClientError> {
        let req = proto::PutPolicyRequest {
            policy: Some(proto::Policy::from(policy)),
        };
        self.write(
            "PutPolicy",
            req,
            |mut c, r| async move { c.put_policy(r).await },
        )
        .await
    }

    pub async fn delete_policy(&self, name: &str) -> Result<WriteResult, ClientError> {
        let req = proto::DeletePolicyRequest { name: name.into() };
        self.write("DeletePolicy", req, |mut c, r| async move {
            c.delete_policy(r).await
        })
        .await
    }
}
