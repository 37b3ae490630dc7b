//! The registry API and Raft transport: prost messages and tonic clients/servers generated
//! from `proto/registry.proto`, and conversions between its typed requests and the model.

mod convert;

pub use convert::{
    from_export, from_import, from_link, from_policy, from_service_key, from_site_spec,
    from_xds_rejection, rejection_code, rejection_from_status, rejection_to_status, to_export,
    to_import, to_links, to_policy, to_service_key, to_site_spec, to_xds_rejections,
};
pub use generated::*;

#[allow(missing_docs, clippy::all, clippy::pedantic, unreachable_pub)]
mod generated {
    tonic::include_proto!("meshbridge.registry.v1");
}
