//! The per-stream tunnel header: the origin gateway opens a stream, writes a [`Preamble`]
//! naming what to connect to, and waits for a [`Reply`] before any payload flows, so it can
//! fail over to another site without the client seeing an error.
//!
//! # Wire format, version 1
//!
//! All integers are big-endian. Every frame starts with a 6-byte header:
//!
//! ```text
//! 'M' 'B' | version u8 (=1) | kind u8 (1 = request, 2 = reply) | body length u16 | body
//! ```
//!
//! Header plus body is at most [`MAX_PREAMBLE_LEN`] bytes; a decoder rejects a frame as soon as
//! the length prefix says it is bigger. The request body is a target, then extensions:
//!
//! ```text
//! target: 0x01 service   ns_len u8, namespace, name_len u8, name, port u16
//!         0x04 ipv4      addr [4], port u16
//!         0x06 ipv6      addr [16], port u16   (flow info and scope id are not sent)
//! extensions, until the end of the body: type u8, length u16, value
//!         0x01 source identity  UTF-8, 1..=2048 bytes (normally a SPIFFE id)
//!         0x02 source site      1..=253 bytes of a-z A-Z 0-9 - . _
//!         0x03 trace id         16 bytes (W3C trace-id)
//! ```
//!
//! The reply body is `status u8, reason_len u16, reason (UTF-8, <= 1024 bytes)` followed by
//! extensions (none defined yet). Unknown extension types below 0x80 are skipped, so new
//! optional fields need no version bump; unknown types from 0x80 up are must-understand and
//! fail the decode. Each known extension appears at most once. Ports are never 0; namespace
//! and name are 1..=253 bytes of a-z 0-9 - . (Kubernetes names).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{BufMut, BytesMut};

/// Largest frame, header included.
pub const MAX_PREAMBLE_LEN: usize = 4096;
/// Longest namespace, service name or site name.
pub const MAX_NAME_LEN: usize = 253;
/// Longest source identity.
pub const MAX_IDENTITY_LEN: usize = 2048;
/// Longest reply reason; [`Reply::encode`] truncates longer ones.
pub const MAX_REASON_LEN: usize = 1024;
/// The protocol version this module writes and reads.
pub const VERSION: u8 = 1;

const MAGIC: [u8; 2] = *b"MB";
const HEADER_LEN: usize = 6;
const KIND_REQUEST: u8 = 1;
const KIND_REPLY: u8 = 2;
const TARGET_SERVICE: u8 = 0x01;
const TARGET_V4: u8 = 0x04;
const TARGET_V6: u8 = 0x06;
const EXT_IDENTITY: u8 = 0x01;
const EXT_SITE: u8 = 0x02;
const EXT_TRACE: u8 = 0x03;
const EXT_CRITICAL: u8 = 0x80;

/// Why bytes are not a valid preamble or reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreambleError {
    #[error("bad magic: not a meshbridge tunnel header")]
    BadMagic,
    #[error("unsupported preamble version {0} (this gateway speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("wrong frame kind {found} (expected {expected})")]
    WrongKind { expected: u8, found: u8 },
    #[error("preamble of {len} bytes exceeds the limit of {max}")]
    TooLong { len: usize, max: usize },
    #[error("bad {field}: {reason}")]
    BadField {
        field: &'static str,
        reason: &'static str,
    },
    #[error("unknown target type {0:#04x}")]
    UnknownTarget(u8),
    #[error("unknown reply status {0}")]
    UnknownStatus(u8),
    #[error("unknown must-understand extension {0:#04x}")]
    UnknownCriticalExtension(u8),
}

/// What the receiving gateway should connect to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// Any ready endpoint of a service, on a service port.
    Service {
        namespace: String,
        name: String,
        port: u16,
    },
    /// One specific endpoint.
    Endpoint { addr: SocketAddr },
}

/// The request header of a tunnel stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preamble {
    pub target: Target,
    pub source_identity: Option<String>,
    pub source_site: Option<String>,
    pub trace_id: Option<[u8; 16]>,
}

/// A trace id as W3C Trace Context writes it: 32 lowercase hex digits, `-` when absent. Both
/// gateways log it on their access lines, so one connection can be followed across sites.
pub struct TraceHex<'a>(pub Option<&'a [u8; 16]>);

impl std::fmt::Display for TraceHex<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(id) => id.iter().try_for_each(|b| write!(f, "{b:02x}")),
            None => f.write_str("-"),
        }
    }
}

/// Outcome of a tunnel request, sent back by the receiving gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplyStatus {
    Ok = 0,
    NoEndpoint = 1,
    Denied = 2,
    ConnectFailed = 3,
    BadRequest = 4,
    Draining = 5,
}

/// The reply header of a tunnel stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: ReplyStatus,
    pub reason: String,
}

impl Preamble {
    /// A preamble with only a target.
    pub fn new(target: Target) -> Self {
        Self {
            target,
            source_identity: None,
            source_site: None,
            trace_id: None,
        }
    }

    /// Check every field against the limits the decoder enforces.
    pub fn validate(&self) -> Result<(), PreambleError> {
        match &self.target {
            Target::Service {
                namespace,
                name,
                port,
            } => {
                check_text(
                    "namespace",
                    namespace,
                    MAX_NAME_LEN,
                    NAME_RULE,
                    is_name_char,
                )?;
                check_text("name", name, MAX_NAME_LEN, NAME_RULE, is_name_char)?;
                check_port("port", *port)?;
            }
            Target::Endpoint { addr } => check_port("endpoint port", addr.port())?,
        }
        if let Some(id) = &self.source_identity {
            let rule = "contains control characters";
            check_text("source identity", id, MAX_IDENTITY_LEN, rule, |c| {
                !c.is_control()
            })?;
        }
        if let Some(site) = &self.source_site {
            check_text("source site", site, MAX_NAME_LEN, SITE_RULE, is_site_char)?;
        }
        Ok(())
    }

    /// Append the encoded frame to `dst`; on error (see [`Preamble::validate`]) nothing is written.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), PreambleError> {
        self.validate()?;
        let mut body = Vec::with_capacity(64);
        match &self.target {
            Target::Service {
                namespace,
                name,
                port,
            } => {
                body.push(TARGET_SERVICE);
                put_short(&mut body, namespace);
                put_short(&mut body, name);
                body.put_u16(*port);
            }
            Target::Endpoint {
                addr: SocketAddr::V4(a),
            } => {
                body.push(TARGET_V4);
                body.extend_from_slice(&a.ip().octets());
                body.put_u16(a.port());
            }
            Target::Endpoint {
                addr: SocketAddr::V6(a),
            } => {
                body.push(TARGET_V6);
                body.extend_from_slice(&a.ip().octets());
                body.put_u16(a.port());
            }
        }
        if let Some(id) = &self.source_identity {
            put_ext(&mut body, EXT_IDENTITY, id.as_bytes());
        }
        if let Some(site) = &self.source_site {
            put_ext(&mut body, EXT_SITE, site.as_bytes());
        }
        if let Some(trace) = &self.trace_id {
            put_ext(&mut body, EXT_TRACE, trace);
        }
        put_frame(dst, KIND_REQUEST, &body)
    }

    /// Decode a preamble from the start of `buf`: `Ok(None)` while more bytes are needed,
    /// otherwise the preamble and how many bytes it took (the rest is payload).
    pub fn decode(buf: &[u8]) -> Result<Option<(Preamble, usize)>, PreambleError> {
        let Some((body, used)) = frame(buf, KIND_REQUEST)? else {
            return Ok(None);
        };
        let mut r = Reader(body);
        let target = match r.u8("target")? {
            TARGET_SERVICE => {
                let namespace = r.short_str("namespace")?;
                let name = r.short_str("name")?;
                let port = r.u16("port")?;
                Target::Service {
                    namespace,
                    name,
                    port,
                }
            }
            TARGET_V4 => {
                let ip = Ipv4Addr::from(r.array::<4>("endpoint")?);
                Target::Endpoint {
                    addr: SocketAddr::new(IpAddr::V4(ip), r.u16("endpoint")?),
                }
            }
            TARGET_V6 => {
                let ip = Ipv6Addr::from(r.array::<16>("endpoint")?);
                Target::Endpoint {
                    addr: SocketAddr::new(IpAddr::V6(ip), r.u16("endpoint")?),
                }
            }
            other => return Err(PreambleError::UnknownTarget(other)),
        };
        let mut p = Preamble::new(target);
        while let Some((ty, value)) = r.ext()? {
            match ty {
                EXT_IDENTITY => set_once(
                    &mut p.source_identity,
                    "source identity",
                    utf8("source identity", value)?,
                )?,
                EXT_SITE => set_once(
                    &mut p.source_site,
                    "source site",
                    utf8("source site", value)?,
                )?,
                EXT_TRACE => {
                    let id = value
                        .try_into()
                        .map_err(|_| bad("trace id", "must be 16 bytes"))?;
                    set_once(&mut p.trace_id, "trace id", id)?
                }
                other => skip_unknown(other)?,
            }
        }
        p.validate()?;
        Ok(Some((p, used)))
    }
}

impl ReplyStatus {
    /// The wire code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The status with this wire code.
    pub fn from_code(code: u8) -> Result<Self, PreambleError> {
        Ok(match code {
            0 => Self::Ok,
            1 => Self::NoEndpoint,
            2 => Self::Denied,
            3 => Self::ConnectFailed,
            4 => Self::BadRequest,
            5 => Self::Draining,
            other => return Err(PreambleError::UnknownStatus(other)),
        })
    }

    /// Whether the origin may retry the request at another site: the receiving site could not
    /// serve it, but another might. `Denied` and `BadRequest` would fail the same way anywhere.
    pub fn allows_failover(self) -> bool {
        matches!(
            self,
            Self::NoEndpoint | Self::ConnectFailed | Self::Draining
        )
    }
}

impl Reply {
    pub fn new(status: ReplyStatus, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
        }
    }

    /// A success reply with no reason.
    pub fn ok() -> Self {
        Self::new(ReplyStatus::Ok, "")
    }

    /// Append the encoded frame to `dst`. A reason over [`MAX_REASON_LEN`] bytes is cut at a
    /// character boundary.
    pub fn encode(&self, dst: &mut BytesMut) {
        let mut end = self.reason.len().min(MAX_REASON_LEN);
        while !self.reason.is_char_boundary(end) {
            end -= 1;
        }
        let reason = &self.reason.as_bytes()[..end];
        let mut body = Vec::with_capacity(3 + reason.len());
        body.push(self.status.code());
        body.put_u16(reason.len() as u16);
        body.extend_from_slice(reason);
        // Bounded by the truncation above, so the frame always fits.
        let _ = put_frame(dst, KIND_REPLY, &body);
    }

    /// Decode a reply from the start of `buf`, like [`Preamble::decode`].
    pub fn decode(buf: &[u8]) -> Result<Option<(Reply, usize)>, PreambleError> {
        let Some((body, used)) = frame(buf, KIND_REPLY)? else {
            return Ok(None);
        };
        let mut r = Reader(body);
        let status = ReplyStatus::from_code(r.u8("status")?)?;
        let len = usize::from(r.u16("reason")?);
        if len > MAX_REASON_LEN {
            return Err(bad("reason", "longer than 1024 bytes"));
        }
        let reason = utf8("reason", r.take(len, "reason")?)?;
        while let Some((ty, _)) = r.ext()? {
            skip_unknown(ty)?;
        }
        Ok(Some((Reply { status, reason }, used)))
    }
}

/// Split off one frame of `kind`: checks each header byte as soon as it has arrived.
fn frame(buf: &[u8], kind: u8) -> Result<Option<(&[u8], usize)>, PreambleError> {
    for (i, m) in MAGIC.iter().enumerate() {
        match buf.get(i) {
            None => return Ok(None),
            Some(b) if b != m => return Err(PreambleError::BadMagic),
            Some(_) => {}
        }
    }
    let Some(&version) = buf.get(2) else {
        return Ok(None);
    };
    if version != VERSION {
        return Err(PreambleError::UnsupportedVersion(version));
    }
    let Some(&found) = buf.get(3) else {
        return Ok(None);
    };
    if found != kind {
        return Err(PreambleError::WrongKind {
            expected: kind,
            found,
        });
    }
    let Some(&[hi, lo]) = buf.get(4..HEADER_LEN) else {
        return Ok(None);
    };
    let len = HEADER_LEN + usize::from(u16::from_be_bytes([hi, lo]));
    if len > MAX_PREAMBLE_LEN {
        return Err(PreambleError::TooLong {
            len,
            max: MAX_PREAMBLE_LEN,
        });
    }
    Ok(buf.get(HEADER_LEN..len).map(|body| (body, len)))
}

fn put_frame(dst: &mut BytesMut, kind: u8, body: &[u8]) -> Result<(), PreambleError> {
    let len = HEADER_LEN + body.len();
    if len > MAX_PREAMBLE_LEN {
        return Err(PreambleError::TooLong {
            len,
            max: MAX_PREAMBLE_LEN,
        });
    }
    dst.reserve(len);
    dst.put_slice(&MAGIC);
    dst.put_u8(VERSION);
    dst.put_u8(kind);
    dst.put_u16(body.len() as u16);
    dst.put_slice(body);
    Ok(())
}

/// Callers have validated `s` to at most 253 bytes.
fn put_short(body: &mut Vec<u8>, s: &str) {
    body.push(s.len() as u8);
    body.extend_from_slice(s.as_bytes());
}

/// Callers have validated `value` to at most 2048 bytes.
fn put_ext(body: &mut Vec<u8>, ty: u8, value: &[u8]) {
    body.push(ty);
    body.put_u16(value.len() as u16);
    body.extend_from_slice(value);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], PreambleError> {
        if self.0.len() < n {
            return Err(bad(field, "truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], PreambleError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, PreambleError> {
        Ok(u8::from_be_bytes(self.array(field)?))
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, PreambleError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    fn short_str(&mut self, field: &'static str) -> Result<String, PreambleError> {
        let len = usize::from(self.u8(field)?);
        utf8(field, self.take(len, field)?)
    }

    /// The next extension, or `None` at the end of the body.
    fn ext(&mut self) -> Result<Option<(u8, &'a [u8])>, PreambleError> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let ty = self.u8("extension")?;
        let len = usize::from(self.u16("extension")?);
        Ok(Some((ty, self.take(len, "extension")?)))
    }
}

fn bad(field: &'static str, reason: &'static str) -> PreambleError {
    PreambleError::BadField { field, reason }
}

fn utf8(field: &'static str, b: &[u8]) -> Result<String, PreambleError> {
    String::from_utf8(b.to_vec()).map_err(|_| bad(field, "not UTF-8"))
}

fn set_once<T>(slot: &mut Option<T>, field: &'static str, value: T) -> Result<(), PreambleError> {
    if slot.is_some() {
        return Err(bad(field, "appears twice"));
    }
    *slot = Some(value);
    Ok(())
}

fn skip_unknown(ty: u8) -> Result<(), PreambleError> {
    if ty >= EXT_CRITICAL {
        return Err(PreambleError::UnknownCriticalExtension(ty));
    }
    Ok(())
}

const NAME_RULE: &str = "only a-z 0-9 - . are allowed";
const SITE_RULE: &str = "only a-z A-Z 0-9 - . _ are allowed";

fn is_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'
}

fn is_site_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')
}

fn check_text(
    field: &'static str,
    s: &str,
    max: usize,
    rule: &'static str,
    allowed: fn(char) -> bool,
) -> Result<(), PreambleError> {
    if s.is_empty() || s.len() > max {
        return Err(bad(field, "empty or over the length limit"));
    }
    if !s.chars().all(allowed) {
        return Err(bad(field, rule));
    }
    Ok(())
}

fn check_port(field: &'static str, port: u16) -> Result<(), PreambleError> {
    if port == 0 {
        return Err(bad(field, "port 0"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(ns: &str, name: &str, port: u16) -> Target {
        Target::Service {
            namespace: ns.into(),
            name: name.into(),
            port,
        }
    }

    fn samples() -> Vec<Preamble> {
        let full = Preamble {
            target: service("payments", "ledger", 8443),
            source_identity: Some("spiffe://corp.example/ns/shop/sa/web".into()),
            source_site: Some("eu-west_1".into()),
            trace_id: Some([7; 16]),
        };
        let largest = Preamble {
            target: service(&"n".repeat(253), &"s".repeat(253), 65535),
            source_identity: Some("i".repeat(MAX_IDENTITY_LEN)),
            source_site: Some("s".repeat(MAX_NAME_LEN)),
            trace_id: Some([0xff; 16]),
        };
        vec![
            Preamble::new(service("default", "reviews", 9080)),
            full,
            largest,
            Preamble::new(Target::Endpoint {
                addr: "10.1.2.3:8080".parse().unwrap(),
            }),
            Preamble {
                trace_id: Some([1; 16]),
                ..Preamble::new(Target::Endpoint {
                    addr: "[fd00::1:2]:443".parse().unwrap(),
                })
            },
        ]
    }

    fn encoded(p: &Preamble) -> Vec<u8> {
        let mut buf = BytesMut::new();
        p.encode(&mut buf).unwrap();
        buf.to_vec()
    }

    /// A request frame around a hand-written body.
    fn request(body: &[u8]) -> Vec<u8> {
        let mut buf = BytesMut::new();
        put_frame(&mut buf, KIND_REQUEST, body).unwrap();
        buf.to_vec()
    }

    #[test]
    fn preambles_round_trip_and_leave_payload_alone() {
        for p in samples() {
            let mut bytes = encoded(&p);
            let len = bytes.len();
            assert!(len <= MAX_PREAMBLE_LEN);
            bytes.extend_from_slice(b"payload");
            assert_eq!(Preamble::decode(&bytes).unwrap(), Some((p, len)));
        }
    }

    #[test]
    fn every_truncation_asks_for_more_bytes() {
        for p in samples() {
            let bytes = encoded(&p);
            for cut in 0..bytes.len() {
                assert_eq!(Preamble::decode(&bytes[..cut]), Ok(None), "cut at {cut}");
            }
        }
        for status in [ReplyStatus::Ok, ReplyStatus::Denied] {
            let mut buf = BytesMut::new();
            Reply::new(status, "policy says no").encode(&mut buf);
            for cut in 0..buf.len() {
                assert_eq!(Reply::decode(&buf[..cut]), Ok(None), "cut at {cut}");
            }
        }
    }

    #[test]
    fn replies_round_trip_for_every_status() {
        for code in 0..=5 {
            let status = ReplyStatus::from_code(code).unwrap();
            assert_eq!(status.code(), code);
            let reply = Reply::new(status, format!("reason {code} ✓"));
            let mut buf = BytesMut::new();
            reply.encode(&mut buf);
            assert_eq!(Reply::decode(&buf).unwrap(), Some((reply, buf.len())));
        }
    }

    #[test]
    fn long_reason_is_cut_at_a_char_boundary() {
        let mut buf = BytesMut::new();
        Reply::new(ReplyStatus::ConnectFailed, "é".repeat(1000)).encode(&mut buf);
        let (reply, _) = Reply::decode(&buf).unwrap().unwrap();
        assert_eq!(reply.reason, "é".repeat(MAX_REASON_LEN / 2));
    }

    #[test]
    fn oversize_is_rejected_from_the_length_prefix_alone() {
        let max = MAX_PREAMBLE_LEN;
        for (header, len) in [
            (&b"MB\x01\x01\xff\xff"[..], 6 + 0xffff),
            (b"MB\x01\x01\x0f\xfb", 4097),
        ] {
            assert_eq!(
                Preamble::decode(header),
                Err(PreambleError::TooLong { len, max })
            );
        }
        assert_eq!(
            Reply::decode(b"MB\x01\x02\x10\x00"),
            Err(PreambleError::TooLong { len: 4102, max })
        );
        assert_eq!(
            Preamble::decode(b"MB\x01\x01\x0f\xfa"),
            Ok(None),
            "exactly the limit"
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_wait() {
        use PreambleError::*;
        let svc = |ns: &[u8]| [&[TARGET_SERVICE, ns.len() as u8], ns, b"\x01a\x00\x50"].concat();
        let ok = svc(b"ns");
        let cases: Vec<(Vec<u8>, PreambleError)> = vec![
            (b"GET / HTTP/1.1\r\n".to_vec(), BadMagic),
            (b"\x16\x03\x01".to_vec(), BadMagic),
            (b"Mx".to_vec(), BadMagic),
            (b"MB\x00".to_vec(), UnsupportedVersion(0)),
            (b"MB\x02\x01\x00\x00".to_vec(), UnsupportedVersion(2)),
            (
                b"MB\x01\x02".to_vec(),
                WrongKind {
                    expected: KIND_REQUEST,
                    found: KIND_REPLY,
                },
            ),
            (request(b""), bad("target", "truncated")),
            (request(b"\x09"), UnknownTarget(9)),
            (
                request(&svc(b"Caps")),
                bad("namespace", "only a-z 0-9 - . are allowed"),
            ),
            (
                request(&svc(b"")),
                bad("namespace", "empty or over the length limit"),
            ),
            (request(&svc(b"\xff")), bad("namespace", "not UTF-8")),
            (request(b"\x01\x05ab"), bad("namespace", "truncated")),
            (
                request(b"\x04\x0a\x00\x00\x01\x00\x00"),
                bad("endpoint port", "port 0"),
            ),
            (
                request(&[&ok[..], b"\x03\x00\x02ab"].concat()),
                bad("trace id", "must be 16 bytes"),
            ),
            (
                request(&[&ok[..], b"\x02\x00\x01a\x02\x00\x01b"].concat()),
                bad("source site", "appears twice"),
            ),
            (
                request(&[&ok[..], b"\x01\x00\x01\x07"].concat()),
                bad("source identity", "contains control characters"),
            ),
            (
                request(&[&ok[..], b"\x01\x00\x09"].concat()),
                bad("extension", "truncated"),
            ),
            (
                request(&[&ok[..], b"\x01"].concat()),
                bad("extension", "truncated"),
            ),
            (
                request(&[&ok[..], b"\x80\x00\x00"].concat()),
                UnknownCriticalExtension(0x80),
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(Preamble::decode(&bytes), Err(want), "{bytes:x?}");
        }
        assert_eq!(
            Reply::decode(b"MB\x01\x02\x00\x03\x09\x00\x00"),
            Err(UnknownStatus(9))
        );
        assert_eq!(
            Reply::decode(b"MB\x01\x01"),
            Err(WrongKind {
                expected: 2,
                found: 1
            })
        );
    }

    #[test]
    fn unknown_optional_extensions_are_skipped() {
        let p = &samples()[1];
        let mut bytes = encoded(p);
        bytes.extend_from_slice(b"\x7f\x00\x03xyz\x10\x00\x00");
        bytes[5] += 9;
        assert_eq!(
            Preamble::decode(&bytes).unwrap(),
            Some((p.clone(), bytes.len()))
        );
        let reply = [&b"MB\x01\x02\x00\x09\x00\x00\x02ok\x42\x00\x01z"[..]].concat();
        assert_eq!(
            Reply::decode(&reply).unwrap(),
            Some((Reply::new(ReplyStatus::Ok, "ok"), 15))
        );
    }

    #[test]
    fn encode_refuses_what_decode_would_reject() {
        let cases = [
            Preamble::new(service("default", "web", 0)),
            Preamble::new(service("", "web", 80)),
            Preamble::new(service("default", &"a".repeat(254), 80)),
            Preamble::new(Target::Endpoint {
                addr: "1.2.3.4:0".parse().unwrap(),
            }),
            Preamble {
                source_identity: Some("x".repeat(2049)),
                ..samples()[0].clone()
            },
            Preamble {
                source_identity: Some(String::new()),
                ..samples()[0].clone()
            },
            Preamble {
                source_site: Some("a b".into()),
                ..samples()[0].clone()
            },
        ];
        for p in cases {
            let mut buf = BytesMut::new();
            assert!(
                matches!(p.encode(&mut buf), Err(PreambleError::BadField { .. })),
                "{p:?}"
            );
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn only_site_local_failures_allow_failover() {
        use ReplyStatus::*;
        for (status, failover) in [
            (Ok, false),
            (NoEndpoint, true),
            (Denied, false),
            (ConnectFailed, true),
            (BadRequest, false),
            (Draining, true),
        ] {
            assert_eq!(status.allows_failover(), failover, "{status:?}");
        }
        assert_eq!(
            ReplyStatus::from_code(6),
            Err(PreambleError::UnknownStatus(6))
        );
    }
}
