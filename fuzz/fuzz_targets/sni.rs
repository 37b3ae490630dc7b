//! Any bytes: ClientHello parsing never panics, never asks to buffer past the cap, and a
//! parsed server name goes through routing without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshbridge_wire::sni::{MAX_CLIENT_HELLO_LEN, parse_client_hello, route_from_sni};

fuzz_target!(|data: &[u8]| {
    match parse_client_hello(data) {
        Ok(Some(info)) => {
            if let Some(sni) = &info.sni {
                assert!(!sni.is_empty() && sni.len() <= 253);
                if let Some(route) = route_from_sni(sni, &["clusterset.local", "cluster.local"]) {
                    assert!(!route.namespace.is_empty() && !route.name.is_empty());
                    assert_ne!(route.port, Some(0));
                }
            }
        }
        Ok(None) => assert!(data.len() < MAX_CLIENT_HELLO_LEN),
        Err(_) => {}
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = route_from_sni(text, &["clusterset.local", "cluster.local"]);
    }
});
