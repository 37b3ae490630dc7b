//! Fault-injecting proxies on loopback.
//!
//! A [`TcpFault`] forwards connections from its own listener to a target; a [`UdpFault`]
//! forwards datagrams (for QUIC). Both can be switched at run time between passing traffic,
//! adding latency, dropping a fraction of packets (UDP), and blackholing — everything is
//! silently dropped, as when a link dies, so peers only notice by their own timeouts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// What the proxy does to traffic now.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Pass,
    /// Delay every chunk / datagram by this much.
    Latency(Duration),
    /// Drop each datagram with this probability (UDP only; TCP treats it as Pass).
    Loss(f64),
    /// Drop everything; existing TCP connections stall, new ones are accepted and stall.
    Blackhole,
    /// TCP: close every connection now, and each new one as soon as it is accepted (a peer
    /// that went away). UDP treats it as Blackhole.
    Reset,
}

/// A TCP forwarder with faults.
pub struct TcpFault {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Bumped by [`TcpFault::heal_closing`].
    heals: watch::Sender<u64>,
    tasks: JoinSet<()>,
}

impl TcpFault {
    /// Listen on 127.0.0.1:0 and forward to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, rx) = watch::channel(Mode::Pass);
        let (heals, heals_rx) = watch::channel(0u64);
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                if *rx.borrow() == Mode::Reset {
                    drop(client);
                    continue;
                }
                let (rx, mut heals) = (rx.clone(), heals_rx.clone());
                conns.spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    // A connection that lived through a blackhole ends at a closing heal.
                    let mut blackholed = rx.clone();
                    heals.borrow_and_update();
                    let (h1, h2) = (heals.clone(), heals.clone());
                    let pipes =
                        async { tokio::join!(pipe(cr, sw, rx.clone(), h1), pipe(sr, cw, rx, h2)) };
                    let closed_by_heal = async move {
                        let _ = blackholed.wait_for(|m| *m == Mode::Blackhole).await;
                        heals.borrow_and_update();
                        let _ = heals.changed().await;
                    };
                    tokio::select! {
                        _ = pipes => {}
                        _ = closed_by_heal => {}
                    }
                });
            }
        });
        Ok(Self {
            addr,
            mode,
            heals,
            tasks,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Back to [`Mode::Pass`], closing every connection that lived through a blackhole (as
    /// the keepalives of its two ends would have by the time a real partition heals);
    /// connections made from now on pass.
    pub fn heal_closing(&self) {
        self.heals.send_modify(|n| *n += 1);
        self.mode.send_replace(Mode::Pass);
    }
}

impl Drop for TcpFault {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    mut heals: watch::Receiver<u64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::select! {
            r = from.read(&mut buf) => r,
            _ = mode.wait_for(|m| *m == Mode::Reset) => return,
        };
        let n = match read {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        loop {
            let current = *mode.borrow_and_update();
            match current {
                Mode::Reset => return,
                Mode::Blackhole => {
                    // Hold the bytes until the link heals (or the test ends); a closing
                    // heal drops them with the connection. It is announced before the
                    // mode changes, so it is seen first.
                    tokio::select! {
                        biased;
                        _ = heals.changed() => return,
                        changed = mode.changed() => if changed.is_err() { return },
                    }
                    continue;
                }
                Mode::Latency(d) => tokio::time::sleep(d).await,
                Mode::Pass | Mode::Loss(_) => {}
            }
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A UDP forwarder with faults. Each client address gets its own upstream socket.
pub struct UdpFault {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    tasks: JoinSet<()>,
}

impl UdpFault {
    /// Listen on 127.0.0.1:0 and forward datagrams to `target`. `seed` makes loss
    /// reproducible.
    pub async fn start(target: SocketAddr, seed: u64) -> std::io::Result<Self> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let (mode, rx) = watch::channel(Mode::Pass);
        let rng = Arc::new(Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)));
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut backs: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut returns = JoinSet::new();
            let mut buf = vec![0u8; 65535];
            while let Ok((n, client)) = front.recv_from(&mut buf).await {
                let back = match backs.get(&client) {
                    Some(b) => b.clone(),
                    None => {
                        let Ok(b) = UdpSocket::bind("127.0.0.1:0").await else {
                            continue;
                        };
                        if b.connect(target).await.is_err() {
                            continue;
                        }
                        let b = Arc::new(b);
                        backs.insert(client, b.clone());
                        let (front, b2, rx, rng) =
                            (front.clone(), b.clone(), rx.clone(), rng.clone());
                        returns.spawn(async move {
                            let mut buf = vec![0u8; 65535];
                            while let Ok(n) = b2.recv(&mut buf).await {
                                if let Some(delay) = verdict(&rx, &rng) {
                                    if !delay.is_zero() {
                                        tokio::time::sleep(delay).await;
                                    }
                                    let _ = front.send_to(&buf[..n], client).await;
                                }
                            }
                        });
                        b
                    }
                };
                if let Some(delay) = verdict(&rx, &rng) {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let _ = back.send(&buf[..n]).await;
                }
            }
        });
        Ok(Self { addr, mode, tasks })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for UdpFault {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// `None` to drop the datagram, else the delay before sending it.
fn verdict(mode: &watch::Receiver<Mode>, rng: &Mutex<rand::rngs::StdRng>) -> Option<Duration> {
    match *mode.borrow() {
        Mode::Pass => Some(Duration::ZERO),
        Mode::Latency(d) => Some(d),
        Mode::Blackhole | Mode::Reset => None,
        Mode::Loss(p) => {
            let roll: f64 = rng.lock().map(|mut r| r.random()).unwrap_or(1.0);
            (roll >= p).then_some(Duration::ZERO)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP echo server on loopback.
    async fn echo() -> SocketAddr {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        target
    }

    #[tokio::test]
    async fn tcp_blackhole_stalls_and_heals() {
        let proxy = TcpFault::start(echo().await).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        c.write_all(b"a").await.unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await.unwrap();
        proxy.set(Mode::Blackhole);
        c.write_all(b"b").await.unwrap();
        let stalled = tokio::time::timeout(Duration::from_millis(200), c.read_exact(&mut b)).await;
        assert!(stalled.is_err(), "a blackholed link must not deliver");
        proxy.set(Mode::Pass);
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"b");
    }

    #[tokio::test]
    async fn a_closing_heal_ends_the_connections_that_lived_through_the_blackhole() {
        let proxy = TcpFault::start(echo().await).await.unwrap();
        let mut idle = TcpStream::connect(proxy.addr()).await.unwrap();
        let mut b = [0u8; 1];
        idle.write_all(b"a").await.unwrap();
        idle.read_exact(&mut b).await.unwrap();
        proxy.set(Mode::Blackhole);
        // The byte is held: the connection lives through the blackhole.
        idle.write_all(b"b").await.unwrap();
        let stalled = tokio::time::timeout(Duration::from_millis(200), idle.read(&mut b)).await;
        assert!(stalled.is_err(), "a blackholed link must not deliver");
        proxy.heal_closing();
        let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut b))
            .await
            .expect("closed at the heal, not left hanging")
            .unwrap_or(0);
        assert_eq!(n, 0, "closed without delivering what the blackhole held");
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        fresh.write_all(b"c").await.unwrap();
        fresh.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"c", "a new connection passes after the heal");
    }

    #[tokio::test]
    async fn udp_loss_drops_some_and_blackhole_drops_all() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let target = server.local_addr().unwrap();
        let proxy = UdpFault::start(target, 7).await.unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(proxy.addr()).await.unwrap();
        proxy.set(Mode::Loss(0.5));
        for i in 0..200u8 {
            client.send(&[i]).await.unwrap();
        }
        client.send(&[255]).await.unwrap();
        let mut got = 0;
        let mut buf = [0u8; 8];
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(300), server.recv(&mut buf)).await
        {
            got += 1;
        }
        assert!(
            (40..=160).contains(&got),
            "about half of 201 should pass, got {got}"
        );
        proxy.set(Mode::Blackhole);
        client.send(&[1]).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(200), server.recv(&mut buf))
                .await
                .is_err()
        );
    }
}
