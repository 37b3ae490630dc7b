//! Ports for processes a test starts. Asking the kernel for a free port (`bind(0)`) and
//! releasing it until a child binds it races with every other process on the machine: the
//! kernel may hand the same port to another test's `bind(0)` or use it as the source port
//! of any outgoing connection in between, and a node restarted on its old port meets the
//! same race. So each test process takes a window of ports of its own (a [`slots`] slot)
//! outside the kernel's ephemeral range, which `bind(0)` and `connect()` never use.
//!
//! The demo (`meshbridge demo`) keeps its own windows above the ephemeral range; these are
//! below it.
//!
//! [`slots`]: crate::slots

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Mutex;

/// Test processes that can hold a window at once.
const WINDOWS: u32 = 96;
/// Ports in one window; a test cycles through its window when it needs more.
const PER_WINDOW: u32 = 64;

struct Window {
    range: Range<u16>,
    next: u16,
}

static WINDOW: Mutex<Option<Window>> = Mutex::new(None);

/// A port on 127.0.0.1 free for both TCP and UDP now, from this process's window. Ports
/// are handed out in turn; after the last one the window starts again from its first
/// (a port still held, by this test or anything else, is skipped).
pub fn free_port() -> u16 {
    let mut guard = WINDOW.lock().unwrap_or_else(|e| e.into_inner());
    let window = guard.get_or_insert_with(|| {
        let range = window(crate::slots::take("ports", WINDOWS), ephemeral_range());
        Window {
            next: range.start,
            range,
        }
    });
    for _ in 0..window.range.len() {
        let port = window.next;
        window.next = if port + 1 >= window.range.end {
            window.range.start
        } else {
            port + 1
        };
        if meshbridge_core::ports::free_on_loopback(port) {
            return port;
        }
    }
    panic!(
        "every port of this test's window {:?} is in use",
        window.range
    )
}

/// [`free_port`] as an address on 127.0.0.1.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// `net.ipv4.ip_local_port_range`; Linux's default when it cannot be read.
fn ephemeral_range() -> (u16, u16) {
    meshbridge_core::ports::ephemeral_range().unwrap_or((32768, 60999))
}

/// Window `slot`, just below the ephemeral range.
fn window(slot: u32, (low, _): (u16, u16)) -> Range<u16> {
    let span = WINDOWS * PER_WINDOW;
    let base = u32::from(low)
        .checked_sub(span)
        .filter(|b| *b >= 1024)
        .unwrap_or_else(|| {
            panic!(
                "the ephemeral port range starts at {low}: no room below it for {span} test ports"
            )
        });
    let start = base + slot * PER_WINDOW;
    (start as u16)..((start + PER_WINDOW) as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_disjoint_and_below_the_ephemeral_range() {
        let ephemeral = (32768, 60999);
        let all: Vec<_> = (0..WINDOWS).map(|s| window(s, ephemeral)).collect();
        for (i, w) in all.iter().enumerate() {
            assert!(w.start >= 1024 && w.end <= ephemeral.0, "{w:?}");
            assert_eq!(w.len(), PER_WINDOW as usize);
            for other in &all[i + 1..] {
                assert!(w.end <= other.start, "{w:?} {other:?}");
            }
        }
    }

    #[test]
    fn ports_come_from_the_window_and_a_held_one_is_skipped() {
        let a = free_port();
        let held = std::net::TcpListener::bind(("127.0.0.1", a)).unwrap();
        let range = WINDOW.lock().unwrap().as_ref().unwrap().range.clone();
        assert!(range.contains(&a), "{a} outside {range:?}");
        // Go once round the window: the held port never comes back.
        for _ in 0..PER_WINDOW + 3 {
            let p = free_port();
            assert!(range.contains(&p));
            assert_ne!(p, a, "a port in use was handed out");
        }
        drop(held);
    }
}
