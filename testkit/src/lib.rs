//! Test support shared by the crates' integration tests. Never linked into the binary.
//!
//! - [`envoy`]: real Envoy and grpcio processes, bootstraps and Envoy's admin views;
//! - [`fault`]: TCP and UDP proxies that inject latency, loss and blackholes (this kernel
//!   has no `tc netem`);
//! - [`http`]: GET on an admin port;
//! - [`kube`]: a real etcd and kube-apiservers (built from their Go modules) for the kube
//!   adapter's tests;
//! - [`netns`]: network namespaces joined by veth pairs, for tests that cross a network;
//! - [`pki`]: a throw-away CA and SVIDs on disk;
//! - [`ports`]: ports for the processes a test starts, outside the kernel's ephemeral range;
//! - [`process`]: run the real binary and wait for the lines it prints;
//! - [`linearizability`]: a recorder of concurrent keyed-register histories and a
//!   Wing–Gong/Lowe checker for them (the registry's fault tests use it);
//! - [`slots`]: machine-wide exclusive slots (e.g. a VIP block per test process).
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used)]

pub mod envoy;
pub mod fault;
pub mod http;
pub mod kube;
pub mod linearizability;
pub mod netns;
pub mod pki;
pub mod ports;
pub mod probe;
pub mod process;
pub mod slots;
