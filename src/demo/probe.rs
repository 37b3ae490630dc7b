//! What the demo's "client in west" does: ask DNS, send a line through the mesh.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// A record query over UDP; the first A record's address.
pub async fn resolve_a(server: SocketAddr, name: &str) -> Result<Ipv4Addr> {
    let mut msg = Message::new(rand_id(), MessageType::Query, OpCode::Query);
    msg.add_query(Query::query(
        Name::from_ascii(name).context("query name")?,
        RecordType::A,
    ));
    let bytes = msg.to_vec().context("encoding the query")?;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    sock.connect(server).await?;
    sock.send(&bytes).await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
        .await
        .context("DNS timed out")??;
    let answer = Message::from_vec(&buf[..n]).context("DNS answer does not parse")?;
    for rec in &answer.answers {
        if let RData::A(a) = &rec.data {
            return Ok(a.0);
        }
    }
    bail!(
        "no A record for {name} (rcode {:?})",
        answer.metadata.response_code
    )
}

fn rand_id() -> u16 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(7)
        & 0xffff) as u16
}

/// Connect, send one line, return the reply line (the echo prefixes its site's name).
pub async fn echo(addr: SocketAddr, line: &str) -> Result<String> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        s.write_all(format!("{line}\n").as_bytes()).await?;
        let mut reply = String::new();
        BufReader::new(&mut s).read_line(&mut reply).await?;
        if reply.is_empty() {
            bail!("connection to {addr} closed without a reply");
        }
        Ok(reply.trim_end().to_string())
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .context("no reply in 10 s")?
}

/// GET a JSON document over plain HTTP/1.1 (the admin ports).
pub async fn http_get_json(addr: SocketAddr, path: &str) -> Result<serde_json::Value> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut body = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut body).await?;
        let text = String::from_utf8_lossy(&body);
        let json = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .context("no HTTP body")?;
        Ok::<_, anyhow::Error>(serde_json::from_str(json)?)
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .context("admin HTTP timed out")?
}
