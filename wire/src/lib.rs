//! meshbridge's wire formats, as pure parsers and encoders over bytes: no I/O, no async,
//! no TLS stack (as `quinn-proto` and hickory's `proto` are to their crates). The gateway
//! drives them; the fuzz targets call them directly.
//!
//! - [`preamble`]: the versioned preamble that opens every tunnel stream, and its reply;
//! - [`sni`]: the server name of a TLS ClientHello (SNI passthrough), and service hosts;
//! - [`connect`]: HTTP/1.1 `CONNECT` requests and their answers.
#![forbid(unsafe_code)]

pub mod connect;
pub mod preamble;
pub mod sni;
