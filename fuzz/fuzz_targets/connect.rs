//! Any bytes: CONNECT parsing never panics and never claims more than the head cap, and
//! `response` never lets a reason phrase break out of its status line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshbridge_wire::connect::{MAX_HEAD_LEN, parse_connect, response};

fuzz_target!(|data: &[u8]| {
    match parse_connect(data, &["clusterset.local", "cluster.local"]) {
        Ok(Some((_, used))) => {
            assert!(used <= data.len() && used <= MAX_HEAD_LEN);
            assert!(data[..used].ends_with(b"\r\n\r\n"));
        }
        Ok(None) => assert!(data.len() < MAX_HEAD_LEN),
        Err(_) => {}
    }
    if let [hi, lo, reason @ ..] = data {
        let head = response(u16::from_be_bytes([*hi, *lo]), &String::from_utf8_lossy(reason));
        let first_crlf = head.windows(2).position(|w| w == b"\r\n");
        let status_line = &head[..first_crlf.expect("status line ends")];
        assert!(!status_line.contains(&b'\n') && !status_line.contains(&b'\r'));
        assert!(head.ends_with(b"\r\n\r\n"));
    }
});
