//! A gate in front of every gRPC method, before its message is read or decoded: a client
//! without a certificate may call `Join` only, and only registry nodes of our trust domain
//! may use the Raft service (whose messages may be large). What passes is then authorized
//! per method by [`crate::authz::Caller`] as before; the gate only makes sure that nobody
//! unauthenticated gets a large message buffered and decoded first (and `Join`/`Renew`,
//! small by nature, are cut off at [`SMALL_CALL_BYTES`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use http::{Request, Response};
use http_body_util::Limited;
use tonic::Status;
use tonic::body::Body;

use crate::error::ApiError;
use crate::listener::Peer;

/// The one method served to a client without a certificate.
pub const JOIN_PATH: &str = "/meshbridge.registry.v1.Registry/Join";
/// `Join` and `Renew` carry a token and a CSR (a few KiB): their request bodies are cut
/// off past this, however large the API's decoding limit.
pub const SMALL_CALL_BYTES: usize = 64 * 1024;
const SMALL_CALLS: [&str; 2] = [JOIN_PATH, "/meshbridge.registry.v1.Registry/Renew"];
/// The node-to-node service.
pub const RAFT_PREFIX: &str = "/meshbridge.registry.v1.Raft/";

/// Why a call on `path` from `peer` is refused before its message is read, if it is.
pub fn refusal(path: &str, peer: Option<&Peer>, trust_domain: &str) -> Option<ApiError> {
    let peer = peer?;
    let Some(id) = &peer.id else {
        return (path != JOIN_PATH).then(|| ApiError::NoClientSvid {
            called: Some(path.to_owned()),
        });
    };
    (path.starts_with(RAFT_PREFIX) && !(id.is_registry() && id.trust_domain() == trust_domain))
        .then(|| {
            ApiError::forbidden(format!(
                "{id} is not a registry node of trust domain {trust_domain:?}: the Raft service is for nodes only"
            ))
        })
}

/// [`tower::Layer`] of [`Gate`].
#[derive(Clone)]
pub struct GateLayer {
    trust_domain: Arc<str>,
}

impl GateLayer {
    pub fn new(trust_domain: Arc<str>) -> Self {
        Self { trust_domain }
    }
}

impl<S> tower::Layer<S> for GateLayer {
    type Service = Gate<S>;

    fn layer(&self, inner: S) -> Gate<S> {
        Gate {
            inner,
            trust_domain: self.trust_domain.clone(),
        }
    }
}

/// Answers refused calls itself (a gRPC status, the request body unread); passes the rest.
#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    trust_domain: Arc<str>,
}

impl<S> tower::Service<Request<Body>> for Gate<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<S::Future, Ready<Result<Response<Body>, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        match refusal(
            req.uri().path(),
            req.extensions().get::<Peer>(),
            &self.trust_domain,
        ) {
            Some(refusal) => {
                tracing::debug!(path = req.uri().path(), error = %refusal, "refused at the gate");
                Either::Right(ready(Ok(Status::from(refusal).into_http())))
            }
            None if SMALL_CALLS.contains(&req.uri().path()) => {
                let req = req.map(|body| Body::new(Limited::new(body, SMALL_CALL_BYTES)));
                Either::Left(self.inner.call(req))
            }
            None => Either::Left(self.inner.call(req)),
        }
    }
}

#[cfg(test)]
mod tests {
    use meshbridge_core::id::SpiffeId;

    use super::*;

    fn peer(id: Option<&str>) -> Peer {
        Peer {
            addr: ([127, 0, 0, 1], 1).into(),
            id: id.map(|s| SpiffeId::parse(s).unwrap()),
            validity: None,
        }
    }

    #[test]
    fn certificate_less_clients_reach_join_only_and_only_our_nodes_reach_raft() {
        let td = "corp.example";
        let anon = peer(None);
        assert!(refusal(JOIN_PATH, Some(&anon), td).is_none());
        let r = refusal(
            "/meshbridge.registry.v1.Registry/ListSites",
            Some(&anon),
            td,
        )
        .unwrap();
        assert_eq!(r.code(), tonic::Code::Unauthenticated);
        let raft = "/meshbridge.registry.v1.Raft/AppendEntries";
        assert_eq!(
            refusal(raft, Some(&anon), td).unwrap().code(),
            tonic::Code::Unauthenticated
        );
        let site = peer(Some("spiffe://corp.example/site/east/gateway"));
        assert!(
            refusal(
                "/meshbridge.registry.v1.Registry/ListSites",
                Some(&site),
                td
            )
            .is_none()
        );
        assert_eq!(
            refusal(raft, Some(&site), td).unwrap().code(),
            tonic::Code::PermissionDenied
        );
        let partner_node = peer(Some("spiffe://partner.example/registry/1"));
        assert!(refusal(raft, Some(&partner_node), td).is_some());
        let node = peer(Some("spiffe://corp.example/registry/2"));
        assert!(refusal(raft, Some(&node), td).is_none());
    }
}
