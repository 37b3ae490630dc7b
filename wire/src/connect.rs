//! HTTP/1.1 CONNECT for clients that can speak it (explicit proxy, HBONE style): parse the
//! request head `CONNECT host:port HTTP/1.1\r\n<headers>\r\n\r\n`, then answer with
//! [`response`]; after a 2xx the connection carries the tunnelled bytes.
//!
//! The target is a service host `<svc>.<ns>.svc.<zone>:<port>` or an endpoint `ip:port`
//! (`[v6]:port`). Parsing is strict: CRLF line ends only, no obsolete line folding, one space
//! between request-line parts. The whole head must fit in [`MAX_HEAD_LEN`] bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::preamble::{ReplyStatus, Target};
use crate::sni::service_host;

/// Largest request head, the blank line included.
pub const MAX_HEAD_LEN: usize = 8 * 1024;
/// Longest method name the parser waits for before giving up.
const MAX_METHOD_LEN: usize = 32;

/// Where a CONNECT request asks to go: the same [`Target`] a tunnel preamble carries.
pub type ConnectTarget = Target;

/// Why bytes are not an acceptable CONNECT request head.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("method {0:?} is not CONNECT")]
    NotConnect(String),
    #[error("request head is over {max} bytes")]
    HeadTooLarge { max: usize },
    #[error("unsupported HTTP version {0:?}")]
    Version(String),
    #[error("bad CONNECT target {target:?}: {reason}")]
    BadTarget {
        target: String,
        reason: &'static str,
    },
    #[error("malformed request head: {0}")]
    Malformed(&'static str),
}

impl ConnectError {
    /// The HTTP status to answer with.
    pub fn status(&self) -> u16 {
        match self {
            Self::NotConnect(_) => 405,
            Self::HeadTooLarge { .. } => 431,
            Self::Version(_) => 505,
            Self::BadTarget { .. } | Self::Malformed(_) => 400,
        }
    }
}

/// Parse a CONNECT request head at the start of `buf`: `Ok(None)` while more bytes are
/// needed, otherwise the target and the length of the head (later bytes are tunnel payload).
/// Service hosts must be in one of `zones` (e.g. `clusterset.local`).
pub fn parse_connect(
    buf: &[u8],
    zones: &[impl AsRef<str>],
) -> Result<Option<(ConnectTarget, usize)>, ConnectError> {
    check_method(buf)?;
    let head = &buf[..buf.len().min(MAX_HEAD_LEN)];
    let mut target = None;
    let mut line_start = 0;
    for (i, &b) in head.iter().enumerate() {
        match b {
            b'\n' if i == 0 || head[i - 1] != b'\r' => {
                return Err(ConnectError::Malformed("bare LF"));
            }
            b'\r' => match head.get(i + 1) {
                None => break,
                Some(b'\n') => {}
                Some(_) => return Err(ConnectError::Malformed("CR without LF")),
            },
            _ => continue,
        }
        let line = &head[line_start..i];
        line_start = i + 2;
        match (&target, line.is_empty()) {
            (None, _) => target = Some(request_line(line, zones)?),
            (Some(_), false) => header_line(line)?,
            (Some(t), true) => return Ok(Some((t.clone(), i + 2))),
        }
    }
    if buf.len() >= MAX_HEAD_LEN {
        return Err(ConnectError::HeadTooLarge { max: MAX_HEAD_LEN });
    }
    Ok(None)
}

/// A response head: `HTTP/1.1 <status> <reason>`. Control characters are dropped from the
/// reason; a status outside 100..=999 becomes 500. Anything but 2xx also says
/// `Content-Length: 0` and `Connection: close`, since no tunnel follows.
pub fn response(status: u16, reason: &str) -> Vec<u8> {
    let status = if (100..=999).contains(&status) {
        status
    } else {
        500
    };
    let reason: String = reason
        .chars()
        .filter(|c| *c == '\t' || !c.is_control())
        .collect();
    let extra = if (200..300).contains(&status) {
        ""
    } else {
        "Content-Length: 0\r\nConnection: close\r\n"
    };
    format!("HTTP/1.1 {status} {reason}\r\n{extra}\r\n").into_bytes()
}

/// The HTTP status and reason that report a tunnel reply to a CONNECT client.
pub fn status_for(reply: ReplyStatus) -> (u16, &'static str) {
    match reply {
        ReplyStatus::Ok => (200, "OK"),
        ReplyStatus::NoEndpoint | ReplyStatus::Draining => (503, "Service Unavailable"),
        ReplyStatus::Denied => (403, "Forbidden"),
        ReplyStatus::ConnectFailed => (502, "Bad Gateway"),
        ReplyStatus::BadRequest => (400, "Bad Request"),
    }
}

/// Fail as soon as the method is known not to be CONNECT (or the bytes are not HTTP at all).
fn check_method(buf: &[u8]) -> Result<(), ConnectError> {
    let Some(end) = buf
        .iter()
        .take(MAX_METHOD_LEN + 1)
        .position(|b| !is_tchar(*b))
    else {
        if buf.len() > MAX_METHOD_LEN {
            return Err(ConnectError::Malformed("method longer than 32 bytes"));
        }
        return Ok(());
    };
    let method = &buf[..end];
    if method.is_empty() || buf.get(end) != Some(&b' ') {
        return Err(ConnectError::Malformed(
            "request does not start with `<method> `",
        ));
    }
    if method != b"CONNECT" {
        return Err(ConnectError::NotConnect(
            String::from_utf8_lossy(method).into_owned(),
        ));
    }
    Ok(())
}

fn request_line(line: &[u8], zones: &[impl AsRef<str>]) -> Result<ConnectTarget, ConnectError> {
    let line = std::str::from_utf8(line)
        .map_err(|_| ConnectError::Malformed("request line is not UTF-8"))?;
    let mut parts = line.split(' ');
    let (Some(_method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ConnectError::Malformed(
            "request line is not `CONNECT <host:port> <version>`",
        ));
    };
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(ConnectError::Version(version.chars().take(32).collect()));
    }
    parse_target(target, zones).map_err(|reason| ConnectError::BadTarget {
        target: target.chars().take(300).collect(),
        reason,
    })
}

fn parse_target(target: &str, zones: &[impl AsRef<str>]) -> Result<ConnectTarget, &'static str> {
    let (host, port) = if let Some(rest) = target.strip_prefix('[') {
        rest.split_once("]:")
            .ok_or("IPv6 address without `]:port`")?
    } else {
        target.rsplit_once(':').ok_or("missing :port")?
    };
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err("port is not a number");
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|&p| p != 0)
        .ok_or("port out of range")?;
    if target.starts_with('[') {
        let ip: Ipv6Addr = host.parse().map_err(|_| "bad IPv6 address")?;
        return Ok(Target::Endpoint {
            addr: SocketAddr::new(IpAddr::V6(ip), port),
        });
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(Target::Endpoint {
            addr: SocketAddr::new(IpAddr::V4(ip), port),
        });
    }
    if host.contains(':') {
        return Err("IPv6 address must be in brackets");
    }
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let (namespace, name) =
        service_host(&host, zones).ok_or("not <svc>.<ns>.svc.<zone> or an IP address")?;
    Ok(Target::Service {
        namespace,
        name,
        port,
    })
}

fn header_line(line: &[u8]) -> Result<(), ConnectError> {
    if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
        return Err(ConnectError::Malformed("obsolete line folding"));
    }
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or(ConnectError::Malformed("header without `:`"))?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(ConnectError::Malformed("bad header name"));
    }
    if value.iter().any(|&b| b != b'\t' && (b < 0x20 || b == 0x7f)) {
        return Err(ConnectError::Malformed("control character in header value"));
    }
    Ok(())
}

/// RFC 9110 `tchar`: the characters of a method or header name.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZONE: &str = "clusterset.local";

    fn service(ns: &str, name: &str, port: u16) -> ConnectTarget {
        Target::Service {
            namespace: ns.into(),
            name: name.into(),
            port,
        }
    }

    fn endpoint(addr: &str) -> ConnectTarget {
        Target::Endpoint {
            addr: addr.parse().unwrap(),
        }
    }

    fn heads() -> Vec<(&'static str, ConnectTarget)> {
        vec![
            (
                "CONNECT reviews.default.svc.clusterset.local:9080 HTTP/1.1\r\nHost: reviews.default.svc.clusterset.local:9080\r\n\r\n",
                service("default", "reviews", 9080),
            ),
            (
                "CONNECT Reviews.Default.svc.clusterset.local.:443 HTTP/1.0\r\n\r\n",
                service("default", "reviews", 443),
            ),
            (
                "CONNECT 10.0.0.7:8080 HTTP/1.1\r\nUser-Agent: curl/8.5\r\nProxy-Authorization: Basic eDp5\r\nX-Empty:\r\n\r\n",
                endpoint("10.0.0.7:8080"),
            ),
            (
                "CONNECT [fd00::7]:65535 HTTP/1.1\r\ntraceparent:\t00-ab-cd-01 \r\n\r\n",
                endpoint("[fd00::7]:65535"),
            ),
        ]
    }

    #[test]
    fn connect_heads_parse_and_leave_the_payload() {
        for (head, want) in heads() {
            let bytes = [head.as_bytes(), b"\x16\x03\x01payload"].concat();
            assert_eq!(
                parse_connect(&bytes, &[ZONE]),
                Ok(Some((want, head.len()))),
                "{head:?}"
            );
        }
    }

    #[test]
    fn every_prefix_of_a_head_waits() {
        for (head, _) in heads() {
            for cut in 0..head.len() {
                assert_eq!(
                    parse_connect(&head.as_bytes()[..cut], &[ZONE]),
                    Ok(None),
                    "{:?}",
                    &head[..cut]
                );
            }
        }
    }

    #[test]
    fn bad_requests_fail_as_soon_as_they_are_known_bad() {
        use ConnectError::*;
        let bad_target = |target: &str, reason| BadTarget {
            target: target.into(),
            reason,
        };
        let cases: Vec<(&[u8], ConnectError)> = vec![
            (b"GET ", NotConnect("GET".into())),
            (b"GET http://x/ HTTP/1.1\r\n\r\n", NotConnect("GET".into())),
            (
                b"connect a:1 HTTP/1.1\r\n\r\n",
                NotConnect("connect".into()),
            ),
            (
                b"\x16\x03\x01\x02\x00",
                Malformed("request does not start with `<method> `"),
            ),
            (
                b"CONNECT\tx",
                Malformed("request does not start with `<method> `"),
            ),
            (&[b'X'; 33], Malformed("method longer than 32 bytes")),
            (
                b"CONNECT  a:1 HTTP/1.1\r\n",
                Malformed("request line is not `CONNECT <host:port> <version>`"),
            ),
            (
                b"CONNECT a:1\r\n",
                Malformed("request line is not `CONNECT <host:port> <version>`"),
            ),
            (
                b"CONNECT a:1 HTTP/1.1 x\r\n",
                Malformed("request line is not `CONNECT <host:port> <version>`"),
            ),
            (
                b"CONNECT \xff:1 HTTP/1.1\r\n",
                Malformed("request line is not UTF-8"),
            ),
            (
                b"CONNECT 1.2.3.4:80 HTTP/2.0\r\n",
                Version("HTTP/2.0".into()),
            ),
            (
                b"CONNECT 1.2.3.4 HTTP/1.1\r\n",
                bad_target("1.2.3.4", "missing :port"),
            ),
            (
                b"CONNECT 1.2.3.4:0 HTTP/1.1\r\n",
                bad_target("1.2.3.4:0", "port out of range"),
            ),
            (
                b"CONNECT 1.2.3.4:65536 HTTP/1.1\r\n",
                bad_target("1.2.3.4:65536", "port out of range"),
            ),
            (
                b"CONNECT 1.2.3.4:+80 HTTP/1.1\r\n",
                bad_target("1.2.3.4:+80", "port is not a number"),
            ),
            (
                b"CONNECT ::1:80 HTTP/1.1\r\n",
                bad_target("::1:80", "IPv6 address must be in brackets"),
            ),
            (
                b"CONNECT [::1] HTTP/1.1\r\n",
                bad_target("[::1]", "IPv6 address without `]:port`"),
            ),
            (
                b"CONNECT [1.2.3.4]:80 HTTP/1.1\r\n",
                bad_target("[1.2.3.4]:80", "bad IPv6 address"),
            ),
            (
                b"CONNECT example.com:443 HTTP/1.1\r\n",
                bad_target(
                    "example.com:443",
                    "not <svc>.<ns>.svc.<zone> or an IP address",
                ),
            ),
            (
                b"CONNECT a.b.svc.cluster.local:80 HTTP/1.1\r\n",
                bad_target(
                    "a.b.svc.cluster.local:80",
                    "not <svc>.<ns>.svc.<zone> or an IP address",
                ),
            ),
            (b"CONNECT a:1 HTTP/1.1\n", Malformed("bare LF")),
            (b"CONNECT a:1 HTTP/1.1\r\r", Malformed("CR without LF")),
            (
                b"CONNECT 1.2.3.4:80 HTTP/1.1\r\nHost\r\n",
                Malformed("header without `:`"),
            ),
            (
                b"CONNECT 1.2.3.4:80 HTTP/1.1\r\nA: b\r\n folded\r\n",
                Malformed("obsolete line folding"),
            ),
            (
                b"CONNECT 1.2.3.4:80 HTTP/1.1\r\nBad Name: x\r\n",
                Malformed("bad header name"),
            ),
            (
                b"CONNECT 1.2.3.4:80 HTTP/1.1\r\nA: \x00\r\n",
                Malformed("control character in header value"),
            ),
        ];
        for (bytes, want) in cases {
            let status = want.status();
            assert_eq!(
                parse_connect(bytes, &[ZONE]),
                Err(want),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
            assert!((400..=505).contains(&status));
        }
    }

    #[test]
    fn head_size_is_capped() {
        let line = "CONNECT 1.2.3.4:80 HTTP/1.1\r\n";
        let padded = |total: usize| {
            let pad = total - line.len() - "X: \r\n\r\n".len();
            format!("{line}X: {}\r\n\r\n", "a".repeat(pad))
        };
        let exact = padded(MAX_HEAD_LEN);
        assert_eq!(
            parse_connect(exact.as_bytes(), &[ZONE]),
            Ok(Some((endpoint("1.2.3.4:80"), MAX_HEAD_LEN)))
        );
        let over = padded(MAX_HEAD_LEN + 1);
        let max = MAX_HEAD_LEN;
        assert_eq!(
            parse_connect(over.as_bytes(), &[ZONE]),
            Err(ConnectError::HeadTooLarge { max })
        );
        assert_eq!(
            parse_connect(&over.as_bytes()[..max], &[ZONE]),
            Err(ConnectError::HeadTooLarge { max })
        );
        assert_eq!(
            parse_connect(&over.as_bytes()[..max - 1], &[ZONE]),
            Ok(None)
        );
    }

    #[test]
    fn responses_are_well_formed_and_injection_free() {
        let cases: [(u16, &str, &str); 4] = [
            (
                200,
                "Connection Established",
                "HTTP/1.1 200 Connection Established\r\n\r\n",
            ),
            (
                503,
                "no endpoint\r\nSet-Cookie: x",
                "HTTP/1.1 503 no endpointSet-Cookie: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            ),
            (
                42,
                "odd",
                "HTTP/1.1 500 odd\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            ),
            (
                403,
                "",
                "HTTP/1.1 403 \r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            ),
        ];
        for (status, reason, want) in cases {
            assert_eq!(String::from_utf8(response(status, reason)).unwrap(), want);
        }
    }

    #[test]
    fn tunnel_replies_map_to_http_statuses() {
        use ReplyStatus::*;
        let cases = [
            (Ok, 200),
            (NoEndpoint, 503),
            (Denied, 403),
            (ConnectFailed, 502),
            (BadRequest, 400),
            (Draining, 503),
        ];
        for (reply, status) in cases {
            assert_eq!(status_for(reply).0, status, "{reply:?}");
        }
        assert_eq!(ConnectError::NotConnect("GET".into()).status(), 405);
        assert_eq!(ConnectError::HeadTooLarge { max: 1 }.status(), 431);
        assert_eq!(ConnectError::Version("HTTP/2".into()).status(), 505);
    }
}
