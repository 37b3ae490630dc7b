//! The Kubernetes adapter (`meshbridge kube`): a cluster becomes a site. Each cluster's
//! adapter pushes its own exports (MCS `ServiceExport`s) to the registry and imports every
//! other site's services as `ServiceImport`s with derived Services and EndpointSlices that
//! send local pods to this cluster's gateways. It holds credentials for its own cluster
//! only. Contract: DESIGN §8 and the MCS API (KEP-1645).

pub mod config;
pub mod crd;
pub mod export;
pub mod import;
pub mod leader;
pub mod run;
pub mod status;

pub use config::Config;
