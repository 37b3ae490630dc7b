//! Forwarding queries outside the zone to an upstream resolver: UDP from a fresh random
//! port with a random id, then TCP when the upstream's answer is truncated, all within one
//! deadline.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, Query};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::answer::MAX_UDP_PAYLOAD;

/// Forwarded queries in flight at once; beyond, queries fail at once (SERVFAIL).
const MAX_IN_FLIGHT: usize = 1024;

/// Why a query could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ForwardError {
    #[error("no answer from {upstream} within {timeout:?}")]
    Timeout {
        upstream: SocketAddr,
        timeout: Duration,
    },
    #[error("upstream {upstream}: {source}")]
    Io {
        upstream: SocketAddr,
        source: io::Error,
    },
    #[error("upstream {upstream}: {reason}")]
    Invalid {
        upstream: SocketAddr,
        reason: String,
    },
    #[error("too many queries forwarded at once")]
    Busy,
}

impl ForwardError {
    /// The `result` label of the forwarded-queries metric.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            ForwardError::Timeout { .. } => "timeout",
            ForwardError::Busy => "busy",
            ForwardError::Io { .. } | ForwardError::Invalid { .. } => "error",
        }
    }
}

pub(crate) struct Forwarder {
    upstream: SocketAddr,
    timeout: Duration,
    permits: Semaphore,
}

impl Forwarder {
    pub(crate) fn new(upstream: SocketAddr, timeout: Duration) -> Self {
        Self {
            upstream,
            timeout,
            permits: Semaphore::new(MAX_IN_FLIGHT),
        }
    }

    /// Ask the upstream `query`; its answer, checked to match.
    pub(crate) async fn forward(
        &self,
        query: &Query,
        recursion_desired: bool,
    ) -> Result<Message, ForwardError> {
        let _permit = self.permits.try_acquire().map_err(|_| ForwardError::Busy)?;
        let mut msg = Message::query();
        msg.metadata.id = rand::random();
        msg.metadata.recursion_desired = recursion_desired;
        msg.add_query(query.clone());
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP_PAYLOAD);
        msg.set_edns(edns);
        let bytes = msg.to_vec().map_err(|e| self.invalid(e.to_string()))?;

        let deadline = Instant::now() + self.timeout;
        let timeout = ForwardError::Timeout {
            upstream: self.upstream,
            timeout: self.timeout,
        };
        let exchange = async {
            let answer = self.udp(&bytes, &msg).await?;
            if answer.metadata.truncation {
                self.tcp(&bytes, &msg).await
            } else {
                Ok(answer)
            }
        };
        tokio::time::timeout_at(deadline, exchange)
            .await
            .map_err(|_| timeout)?
    }

    fn io(&self, source: io::Error) -> ForwardError {
        ForwardError::Io {
            upstream: self.upstream,
            source,
        }
    }

    fn invalid(&self, reason: String) -> ForwardError {
        ForwardError::Invalid {
            upstream: self.upstream,
            reason,
        }
    }

    /// Whether `answer` answers `query`: same id and question, and a response.
    fn matches(answer: &Message, query: &Message) -> bool {
        answer.metadata.id == query.metadata.id
            && answer.metadata.message_type == MessageType::Response
            && answer.queries == query.queries
    }

    async fn udp(&self, bytes: &[u8], query: &Message) -> Result<Message, ForwardError> {
        let local: SocketAddr = match self.upstream {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(local).await.map_err(|e| self.io(e))?;
        socket
            .connect(self.upstream)
            .await
            .map_err(|e| self.io(e))?;
        socket.send(bytes).await.map_err(|e| self.io(e))?;
        let mut buf = vec![0u8; usize::from(u16::MAX)];
        loop {
            let n = socket.recv(&mut buf).await.map_err(|e| self.io(e))?;
            // Anything else on this port (late, forged, garbage) is ignored; the deadline
            // bounds the wait.
            if let Ok(answer) = Message::from_vec(&buf[..n])
                && Self::matches(&answer, query)
            {
                return Ok(answer);
            }
        }
    }

    async fn tcp(&self, bytes: &[u8], query: &Message) -> Result<Message, ForwardError> {
        let mut stream = TcpStream::connect(self.upstream)
            .await
            .map_err(|e| self.io(e))?;
        let len = u16::try_from(bytes.len()).map_err(|_| self.invalid("query too long".into()))?;
        let mut framed = Vec::with_capacity(bytes.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(bytes);
        stream.write_all(&framed).await.map_err(|e| self.io(e))?;
        let len = stream.read_u16().await.map_err(|e| self.io(e))?;
        let mut buf = vec![0u8; usize::from(len)];
        stream.read_exact(&mut buf).await.map_err(|e| self.io(e))?;
        let answer = Message::from_vec(&buf).map_err(|e| self.invalid(e.to_string()))?;
        if Self::matches(&answer, query) {
            Ok(answer)
        } else {
            Err(self.invalid("answer over TCP does not match the query".into()))
        }
    }
}
