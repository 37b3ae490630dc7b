//! meshbridge-federation: what a site runs beside the gateway to join the federation —
//! the federated DNS server (`dns`), and later the VM agent and the Kubernetes adapter.
#![forbid(unsafe_code)]

pub mod dns;
pub mod site;
