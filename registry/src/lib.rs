//! meshbridge registry: the replicated catalog behind every site.
//!
//! The catalog ([`meshbridge_core::model::Catalog`]) is replicated with openraft; its log,
//! vote and snapshots live in one redb file ([`store`]). [`types`] holds the Raft type
//! configuration shared by the storage, network and node layers. [`Node::start`] runs a
//! node: Raft, the gRPC server (registry API and Raft transport on one mTLS port), leases,
//! metrics and admin HTTP.

mod authz;
mod certs;
pub mod config;
mod error;
mod gate;
mod leader;
mod leases;
mod listener;
mod metrics;
mod node;
mod propose;
mod raft;
mod service;
mod shared;
pub mod store;
pub mod types;
mod ui;
mod watch;

pub use config::Config;
pub use node::{Node, NodeHandle, StartError};
