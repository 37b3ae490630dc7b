//! meshbridge-federation: what a site runs beside the gateway to join the federation —
//! the federated DNS server (`dns`), the VM agent (`agent`), and later the Kubernetes
//! adapter.
#![forbid(unsafe_code)]

pub mod agent;
pub mod dns;
pub mod files;
pub mod kube;
pub mod site;
pub mod site_gateway;
pub mod source;
