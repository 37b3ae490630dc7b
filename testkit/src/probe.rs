//! Probes for end-to-end tests: poll for state that has no event to await, and ask a DNS
//! server over real UDP.

use std::future::Future;
use std::time::Duration;

use anyhow::Result;
use tokio::time::Instant;

/// Poll `probe` every 100 ms until it gives `Some`, for at most `within` (for state that
/// has no event to await, such as a Lease holder or a DNS answer); panics with `what` and
/// the last thing seen.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = (Option<T>, String)>,
{
    let deadline = Instant::now() + within;
    loop {
        let (got, seen) = probe().await;
        if let Some(v) = got {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {within:?}; last: {seen}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The A records `server` (UDP) answers for `name`; empty on no answer.
pub async fn dig_a(server: std::net::SocketAddr, name: &str) -> Result<Vec<std::net::Ipv4Addr>> {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    let mut msg = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    sock.connect(server).await?;
    sock.send(&msg.to_vec()?).await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf)).await??;
    let answer = Message::from_vec(&buf[..n])?;
    Ok(answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect())
}
