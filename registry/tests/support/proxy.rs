//! A TCP fault proxy: forwards bytes to a target until it is black-holed. A black hole
//! behaves like a partition, not like a crash: connections stay open and simply stop
//! carrying bytes (so only timeouts and keepalives notice), new connections are accepted
//! and then hang. Healing closes the stalled connections, as their peers' keepalives
//! would have, and new connections pass again.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use meshbridge_registry::types::NodeId;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// One forwarder: `addr` → `target`.
pub struct Proxy {
    pub addr: SocketAddr,
    pub target: SocketAddr,
    blackholed: watch::Sender<bool>,
    _tasks: JoinSet<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (blackholed, rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        tasks.spawn(accept(listener, target, rx));
        Self {
            addr,
            target,
            blackholed,
            _tasks: tasks,
        }
    }

    pub fn blackhole(&self) {
        self.blackholed.send_replace(true);
    }

    pub fn heal(&self) {
        self.blackholed.send_replace(false);
    }
}

async fn accept(listener: TcpListener, target: SocketAddr, mode: watch::Receiver<bool>) {
    // Connection tasks live in this set: dropping the proxy aborts them all.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((inbound, _)) = accepted else { return };
                conns.spawn(forward(inbound, target, mode.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn forward(inbound: TcpStream, target: SocketAddr, mut mode: watch::Receiver<bool>) {
    if *mode.borrow_and_update() {
        // Accepted into the void: hold it until healed, then close it.
        let _ = mode.wait_for(|b| !*b).await;
        return;
    }
    let Ok(outbound) = TcpStream::connect(target).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (mut ri, mut wi) = inbound.into_split();
    let (mut ro, mut wo) = outbound.into_split();
    let pump = async {
        tokio::select! {
            _ = tokio::io::copy(&mut ri, &mut wo) => {}
            _ = tokio::io::copy(&mut ro, &mut wi) => {}
        }
    };
    let partitioned = tokio::select! {
        _ = pump => false,
        _ = mode.wait_for(|b| *b) => true,
    };
    if partitioned {
        // Keep both sockets open, move nothing, until healed; then close them.
        let _ = mode.wait_for(|b| !*b).await;
    }
    drop((ri, wi, ro, wo));
}

/// A proxy on every directed link between registry nodes, so that any node can be cut off
/// from the others in both directions. Node `from` dials node `to` through
/// `links[(from, to)]` (its `raft.dial_overrides`).
pub struct Links {
    pub links: BTreeMap<(NodeId, NodeId), Proxy>,
}

impl Links {
    pub async fn new(addrs: &BTreeMap<NodeId, SocketAddr>) -> Self {
        let mut links = BTreeMap::new();
        for &from in addrs.keys() {
            for (&to, &target) in addrs {
                if from != to {
                    links.insert((from, to), Proxy::start(target).await);
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
            .map(|((_, to), p)| (to.to_string(), format!("https://{}", p.addr)))
            .collect()
    }

    /// Cuts `node` off from every other node, both ways.
    pub fn isolate(&self, node: NodeId) {
        for ((from, to), p) in &self.links {
            if *from == node || *to == node {
                p.blackhole();
            }
        }
    }

    pub fn heal(&self) {
        for p in self.links.values() {
            p.heal();
        }
    }
}
