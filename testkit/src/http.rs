//! Plain HTTP/1.1 GET against the roles' admin ports (loopback), for tests.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path` on `addr` with `Host: 127.0.0.1` (the admin ports refuse DNS names): the
/// whole response, status line and headers included; `None` if nothing answered within 2 s.
pub async fn get(addr: SocketAddr, path: &str) -> Option<String> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        Some(out)
    };
    tokio::time::timeout(Duration::from_secs(2), io)
        .await
        .ok()?
}

/// The body of [`get`], parsed as JSON.
pub async fn get_json(addr: SocketAddr, path: &str) -> Option<serde_json::Value> {
    let out = get(addr, path).await?;
    serde_json::from_str(out.split_once("\r\n\r\n")?.1).ok()
}
