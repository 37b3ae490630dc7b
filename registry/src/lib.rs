//! meshbridge registry: the replicated catalog behind every site.
//!
//! The catalog ([`meshbridge_core::model::Catalog`]) is replicated with openraft; its log,
//! vote and snapshots live in one redb file ([`store`]). [`types`] holds the Raft type
//! configuration shared by the storage, network and node layers.

pub mod store;
pub mod types;
