//! Ports for processes started by another (the demo's, the tests'): chosen outside the
//! kernel's ephemeral range, because a port asked of the kernel (`bind(0)`) and released
//! until the child binds it can be handed to any other process's `bind(0)` or `connect()`
//! in between.

use std::net::{SocketAddr, TcpListener, UdpSocket};

/// Where the kernel's ephemeral range is read from.
pub const EPHEMERAL_RANGE_FILE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// The kernel's ephemeral port range, `net.ipv4.ip_local_port_range`.
pub fn ephemeral_range() -> Result<(u16, u16), String> {
    let text = std::fs::read_to_string(EPHEMERAL_RANGE_FILE)
        .map_err(|e| format!("reading {EPHEMERAL_RANGE_FILE}: {e}"))?;
    let mut parts = text.split_whitespace().map(str::parse::<u16>);
    match (parts.next(), parts.next()) {
        (Some(Ok(low)), Some(Ok(high))) if low <= high => Ok((low, high)),
        _ => Err(format!(
            "{EPHEMERAL_RANGE_FILE}: expected two port numbers, found {:?}",
            text.trim()
        )),
    }
}

/// Whether `port` on 127.0.0.1 is free for both TCP and UDP now.
pub fn free_on_loopback(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpListener::bind(addr).is_ok() && UdpSocket::bind(addr).is_ok()
}
