//! The registry API and Raft transport: prost messages and tonic clients/servers generated
//! from `proto/registry.proto`, and conversions between its typed requests and the model.

mod convert;

pub use convert::{
    rejection_code, rejection_from_status, rejection_to_status, required, to_site_spec,
    to_xds_rejections,
};
pub use generated::*;

#[allow(missing_docs, clippy::all, clippy::pedantic, unreachable_pub)]
mod generated {
    tonic::include_proto!("meshbridge.registry.v1");
}
