//! The two shapes of a registry call: a write proposed on the leader, and a read of the
//! catalog (linearizable on the leader, or stale from this node).

use meshbridge_core::model::{Catalog, Command};
use meshbridge_core::proto;
use tonic::{Request, Response, Status};

use super::{Grpc, RegistryApi};
use crate::error::ApiError;
use crate::leader::request_id;
use crate::shared::now_ms;

impl RegistryApi {
    /// Validates `cmd` (stamped later with the leader's clock), then proposes it on the
    /// leader with the client's request id, so a retry is applied once.
    pub(super) async fn write<R, F, FFut>(
        &self,
        method: &'static str,
        req: Request<R>,
        cmd: impl Fn(u64) -> Command,
        forward: F,
    ) -> Result<Response<proto::WriteReply>, Status>
    where
        R: Clone,
        F: Fn(Grpc, Request<R>) -> FFut,
        FFut: Future<Output = Result<Response<proto::WriteReply>, Status>>,
    {
        cmd(0).validate().map_err(ApiError::Rejected)?;
        let id = request_id(&req)?;
        let s = &self.shared;
        let local = || {
            s.propose_request(crate::types::Request {
                id,
                command: cmd(now_ms()),
            })
        };
        s.on_leader(method, req, local, forward).await
    }

    /// A view of the catalog: from this node's replica when `stale`, else on the leader
    /// after confirming its leadership.
    pub(super) async fn read<R, T, F, FFut>(
        &self,
        method: &'static str,
        req: Request<R>,
        stale: bool,
        view: impl Fn(&Catalog) -> Result<T, ApiError>,
        forward: F,
    ) -> Result<Response<T>, Status>
    where
        R: Clone,
        F: Fn(Grpc, Request<R>) -> FFut,
        FFut: Future<Output = Result<Response<T>, Status>>,
    {
        self.caller(&req)?;
        if stale {
            return Ok(Response::new(view(&self.shared.catalog())?));
        }
        let s = &self.shared;
        let local = || async {
            s.linearize().await?;
            Ok(view(&s.catalog())?)
        };
        s.on_leader(method, req, local, forward).await
    }
}
