//! Any bytes: decoding never panics, and whatever decodes re-encodes to bytes that decode
//! to the same value (decode → encode → decode), for both the request and the reply.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use meshbridge_wire::preamble::{MAX_PREAMBLE_LEN, Preamble, Reply};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((preamble, used))) = Preamble::decode(data) {
        assert!(used <= data.len() && used <= MAX_PREAMBLE_LEN);
        assert_eq!(Preamble::decode(&data[..used - 1]), Ok(None));
        let mut buf = BytesMut::new();
        preamble.encode(&mut buf).expect("a decoded preamble encodes");
        let again = Preamble::decode(&buf).expect("re-encoded preamble decodes");
        assert_eq!(again, Some((preamble, buf.len())));
    }
    if let Ok(Some((reply, used))) = Reply::decode(data) {
        assert!(used <= data.len() && used <= MAX_PREAMBLE_LEN);
        let mut buf = BytesMut::new();
        reply.encode(&mut buf);
        let again = Reply::decode(&buf).expect("re-encoded reply decodes");
        assert_eq!(again, Some((reply, buf.len())));
    }
});
