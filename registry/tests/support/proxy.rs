//! Fault proxies between registry nodes (testkit's [`TcpFault`]): a black hole behaves like
//! a partition, not like a crash: connections stay open and simply stop carrying bytes (so
//! only timeouts and keepalives notice), new connections are accepted and then hang.
//! Healing closes the stalled connections, as their peers' keepalives would have, and new
//! connections pass again.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use meshbridge_registry::types::NodeId;
use meshbridge_testkit::fault::{Mode, TcpFault};

/// A proxy on every directed link between registry nodes, so that any node can be cut off
/// from the others in both directions. Node `from` dials node `to` through
/// `links[(from, to)]` (its `raft.dial_overrides`).
pub struct Links {
    pub links: BTreeMap<(NodeId, NodeId), TcpFault>,
}

impl Links {
    pub async fn new(addrs: &BTreeMap<NodeId, SocketAddr>) -> Self {
        let mut links = BTreeMap::new();
        for &from in addrs.keys() {
            for (&to, &target) in addrs {
                if from != to {
                    links.insert((from, to), TcpFault::start(target).await.unwrap());
                }
            }
        }
        Self { links }
    }

    /// `raft.dial_overrides` for node `from`.
    pub fn overrides_for(&self, from: NodeId) -> BTreeMap<String, String> {
        self.links
            .iter()
            .filter(|((f, _), _)| *f == from)
            .map(|((_, to), p)| (to.to_string(), format!("https://{}", p.addr())))
            .collect()
    }

    /// Cuts `node` off from every other node, both ways.
    pub fn isolate(&self, node: NodeId) {
        for ((from, to), p) in &self.links {
            if *from == node || *to == node {
                p.set(Mode::Blackhole);
            }
        }
    }

    /// Ends the partition; connections that lived through it are closed, as the nodes'
    /// keepalives would have closed them ([`TcpFault::heal_closing`]).
    pub fn heal(&self) {
        for p in self.links.values() {
            p.heal_closing();
        }
    }
}
