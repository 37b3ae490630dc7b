//! Replication: openraft's network over tonic with mTLS: one cached HTTP/2 channel per peer (reused by
//! every RPC and every replication stream to it), a timeout per RPC, and openraft's own
//! serde types carried as JSON.
//!
//! Peers must present a registry SVID of our trust domain (`spiffe://<td>/registry/*`).
//!
//! **Early appends.** openraft 0.9 replicates a leader's new entries only after its own
//! fsync. [`Peers`] is the log store's [`EarlyAppend`]: when the leader's store begins an
//! append of its own entries, the same AppendEntries request openraft would send is put
//! on each follower's stream at once, marked `early`, so the follower's fsync runs while
//! the leader's does. The leader keeps the reply: when openraft then asks to send the
//! very same request (same vote, previous entry and entries) and the follower had answered
//! it with success, that reply is openraft's answer and nothing is sent again — a reply to
//! an identical request, only earlier than usual, as a slow network could deliver it
//! anyway. Any other request, or an early reply other than success, goes to the follower
//! as usual. This is what Raft allows any leader to do
//! (a leader counts itself towards a quorum only once its own fsync is done, which
//! openraft still decides); it only goes to followers whose stream answered the
//! [`EARLY_APPEND_HEADER`], so a node of an older version never sees one.

//!
//! - [`peers`]: the channel cache and the early appends' sending side;
//! - [`client`]: the RPCs to one peer, its AppendEntries stream;
//! - [`ledger`]: the pure matching of openraft's requests against early replies;
//! - [`server`]: the receiving side;
//! - [`wire`]: what both sides share.

mod client;
mod ledger;
mod peers;
mod server;
mod wire;

#[cfg(test)]
mod tests;

pub use client::Network;
pub use peers::Peers;
pub use server::RaftApi;
