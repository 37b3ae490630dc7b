//! Routing on a TLS ClientHello without terminating TLS (SNI passthrough, like Istio's
//! AUTO_PASSTHROUGH): read the server name and ALPN from the first bytes of a connection,
//! then forward those same bytes, so the client's end-to-end mTLS stays intact.
//!
//! [`parse_client_hello`] reassembles a ClientHello split over several handshake records.
//! The records that carry it, headers included, must fit in [`MAX_CLIENT_HELLO_LEN`] bytes, so
//! a caller never buffers more than that before it can route or refuse the connection.

use crate::preamble::Target;

/// Most bytes of TLS records the ClientHello may span, record headers included.
pub const MAX_CLIENT_HELLO_LEN: usize = 16 * 1024;

const RECORD_HEADER_LEN: usize = 5;
const MAX_RECORD_LEN: usize = 1 << 14;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;

/// What the gateway learns from a ClientHello.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The `server_name` host name, ASCII-lowercased; `None` without the extension (clients
    /// send none when they connect to an IP address).
    pub sni: Option<String>,
    /// ALPN protocol ids in the client's order (non-UTF-8 bytes replaced by U+FFFD).
    pub alpn: Vec<String>,
}

/// Why the first bytes of a connection are not a usable ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniError {
    #[error("not TLS: first byte {0:#04x} does not start a handshake record")]
    NotTls(u8),
    #[error("unsupported TLS record version {0:#06x}")]
    RecordVersion(u16),
    #[error("first handshake message is type {0}, not a ClientHello")]
    NotClientHello(u8),
    #[error("ClientHello needs at least {len} bytes of records, over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
}

/// The service a server name routes to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SniRoute {
    pub namespace: String,
    pub name: String,
    /// The port named in Istio's `outbound_.<port>_._.<host>` form; `None` for a plain
    /// service host name, whose port is the listener's.
    pub port: Option<u16>,
    /// An Istio subset (`outbound_.<port>_.<subset>_.<host>`): not ours to pick by (the
    /// service's endpoints are reached as a whole); kept to be logged.
    pub subset: Option<String>,
}

impl SniRoute {
    /// The tunnel target, taking the port from the listener unless the name carried one.
    pub fn target(&self, listener_port: u16) -> Target {
        Target::Service {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            port: self.port.unwrap_or(listener_port),
        }
    }
}

/// Parse the ClientHello at the start of `buf`: `Ok(None)` while more bytes are needed. Every
/// header is checked as soon as it has arrived, so plain-text clients fail on the first byte.
pub fn parse_client_hello(buf: &[u8]) -> Result<Option<ClientHelloInfo>, SniError> {
    let mut handshake = Vec::new();
    let mut pos = 0;
    loop {
        if let Some(info) = complete_hello(&handshake)? {
            return Ok(Some(info));
        }
        // The next record header and at least one byte of it must still fit.
        let need = pos + RECORD_HEADER_LEN + 1;
        if need > MAX_CLIENT_HELLO_LEN {
            return Err(SniError::TooLarge {
                len: need,
                max: MAX_CLIENT_HELLO_LEN,
            });
        }
        let Some(&content_type) = buf.get(pos) else {
            return Ok(None);
        };
        if content_type != CONTENT_HANDSHAKE {
            return Err(match pos {
                0 => SniError::NotTls(content_type),
                _ => SniError::Malformed("non-handshake record inside the ClientHello"),
            });
        }
        let Some(&[major, minor]) = buf.get(pos + 1..pos + 3) else {
            return Ok(None);
        };
        if major != 3 || minor > 4 {
            return Err(SniError::RecordVersion(u16::from_be_bytes([major, minor])));
        }
        let Some(&[hi, lo]) = buf.get(pos + 3..pos + 5) else {
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        if len == 0 || len > MAX_RECORD_LEN {
            return Err(SniError::Malformed("handshake record length out of range"));
        }
        let start = pos + RECORD_HEADER_LEN;
        let available = buf.get(start..).unwrap_or_default();
        handshake.extend_from_slice(&available[..len.min(available.len())]);
        if available.len() < len {
            // The record is still arriving, but the hello may already be complete in it.
            return complete_hello(&handshake);
        }
        pos = start + len;
    }
}

/// The ClientHello if `handshake` holds all of it; checks the message header meanwhile.
fn complete_hello(handshake: &[u8]) -> Result<Option<ClientHelloInfo>, SniError> {
    match handshake.first() {
        Some(&kind) if kind != HANDSHAKE_CLIENT_HELLO => {
            return Err(SniError::NotClientHello(kind));
        }
        _ => {}
    }
    let Some(&[_, a, b, c]) = handshake.get(..4) else {
        return Ok(None);
    };
    let end = 4 + (usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c));
    // Carried in at least one record, so the smallest possible size has one record header.
    if end + RECORD_HEADER_LEN > MAX_CLIENT_HELLO_LEN {
        let len = end + RECORD_HEADER_LEN;
        return Err(SniError::TooLarge {
            len,
            max: MAX_CLIENT_HELLO_LEN,
        });
    }
    handshake.get(4..end).map(parse_body).transpose()
}

/// `<svc>.<ns>.svc.<zone>` or Istio's `outbound_.<port>_.<subset>_.<svc>.<ns>.svc.<zone>`
/// (subset empty or a label), in any of `zones`; case and a trailing dot ignored.
pub fn route_from_sni<Z: AsRef<str>>(sni: &str, zones: &[Z]) -> Option<SniRoute> {
    let sni = sni.strip_suffix('.').unwrap_or(sni).to_ascii_lowercase();
    if let Some((namespace, name)) = service_host(&sni, zones) {
        return Some(SniRoute {
            namespace,
            name,
            port: None,
            subset: None,
        });
    }
    let rest = sni.strip_prefix("outbound_.")?;
    let (port, rest) = rest.split_once("_.")?;
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port = port.parse::<u16>().ok().filter(|&p| p != 0)?;
    let (subset, host) = rest.split_once("_.")?;
    if !subset.is_empty() && !is_dns_label(subset) {
        return None;
    }
    let (namespace, name) = service_host(host, zones)?;
    Some(SniRoute {
        namespace,
        name,
        port: Some(port),
        subset: (!subset.is_empty()).then(|| subset.to_string()),
    })
}

/// `(namespace, name)` from a lowercase `<svc>.<ns>.svc.<zone>` host name, `zone` one of
/// `zones`.
pub(crate) fn service_host<Z: AsRef<str>>(host: &str, zones: &[Z]) -> Option<(String, String)> {
    zones.iter().find_map(|zone| {
        let zone = zone.as_ref();
        let zone = zone.strip_suffix('.').unwrap_or(zone).to_ascii_lowercase();
        if zone.is_empty() {
            return None;
        }
        let service = host.strip_suffix(zone.as_str())?.strip_suffix(".svc.")?;
        let (name, namespace) = service.split_once('.')?;
        (is_dns_label(name) && is_dns_label(namespace))
            .then(|| (namespace.to_string(), name.to_string()))
    })
}

/// An RFC 1123 label as Kubernetes uses them: 1–63 of a-z 0-9 -, alphanumeric at both ends.
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    (1..=63).contains(&b.len())
        && b.iter().all(|c| alnum(c) || *c == b'-')
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
}

fn parse_body(body: &[u8]) -> Result<ClientHelloInfo, SniError> {
    let mut r = Cursor(body);
    let [major, _] = r.array::<2>()?;
    if major != 3 {
        return Err(SniError::Malformed("legacy_version is not 3.x"));
    }
    r.take(32)?; // random
    if r.vec8()?.len() > 32 {
        return Err(SniError::Malformed("session id longer than 32 bytes"));
    }
    let suites = r.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(SniError::Malformed("bad cipher suite list"));
    }
    if r.vec8()?.is_empty() {
        return Err(SniError::Malformed("no compression methods"));
    }
    let mut info = ClientHelloInfo::default();
    if r.0.is_empty() {
        return Ok(info); // TLS 1.2 and older may omit extensions
    }
    let mut extensions = Cursor(r.vec16()?);
    if !r.0.is_empty() {
        return Err(SniError::Malformed("bytes after the extensions"));
    }
    let (mut seen_sni, mut seen_alpn) = (false, false);
    while !extensions.0.is_empty() {
        let ty = u16::from_be_bytes(extensions.array()?);
        let mut data = Cursor(extensions.vec16()?);
        let seen = match ty {
            EXT_SERVER_NAME => &mut seen_sni,
            EXT_ALPN => &mut seen_alpn,
            _ => continue,
        };
        if std::mem::replace(seen, true) {
            return Err(SniError::Malformed("duplicate extension"));
        }
        let mut list = Cursor(data.vec16()?);
        if !data.0.is_empty() || list.0.is_empty() {
            return Err(SniError::Malformed("bad extension list length"));
        }
        while !list.0.is_empty() {
            if ty == EXT_ALPN {
                let id = list.vec8()?;
                if id.is_empty() {
                    return Err(SniError::Malformed("empty ALPN protocol id"));
                }
                info.alpn.push(String::from_utf8_lossy(id).into_owned());
                continue;
            }
            let [name_type] = list.array()?;
            let name = list.vec16()?;
            if name_type != 0 {
                continue; // only host_name (0) is defined
            }
            if info.sni.is_some() {
                return Err(SniError::Malformed("two host names"));
            }
            let valid = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_');
            if name.is_empty() || name.len() > 253 || !name.iter().all(valid) {
                return Err(SniError::Malformed("server name is not a host name"));
            }
            info.sni = Some(String::from_utf8_lossy(name).to_ascii_lowercase());
        }
    }
    Ok(info)
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SniError> {
        if self.0.len() < n {
            return Err(SniError::Malformed(
                "length runs past the end of its container",
            ));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], SniError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn vec8(&mut self) -> Result<&'a [u8], SniError> {
        let [len] = self.array()?;
        self.take(usize::from(len))
    }

    fn vec16(&mut self) -> Result<&'a [u8], SniError> {
        let len = u16::from_be_bytes(self.array()?);
        self.take(usize::from(len))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore};

    use super::*;

    /// The exact bytes rustls sends first for `server_name`: one record with a ClientHello.
    fn client_hello(server_name: &str, alpn: &[&str]) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let name = ServerName::try_from(server_name.to_string()).unwrap();
        let mut conn = ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        assert_eq!(
            out.len(),
            5 + usize::from(u16::from_be_bytes([out[3], out[4]]))
        );
        out
    }

    /// The same handshake bytes, re-sent in records of at most `size` bytes.
    fn refragment(record: &[u8], size: usize) -> Vec<u8> {
        let chunks = record[5..].chunks(size);
        chunks
            .flat_map(|c| [&[22, 3, 1][..], &(c.len() as u16).to_be_bytes(), c].concat())
            .collect()
    }

    /// A ClientHello record with the given extensions (`None`: no extensions block at all).
    fn handmade(extensions: Option<&[(u16, &[u8])]>) -> Vec<u8> {
        let mut body = [&[3, 3][..], &[0; 32], &[0, 0, 2, 0x13, 0x01, 1, 0]].concat();
        if let Some(extensions) = extensions {
            let block: Vec<u8> = extensions
                .iter()
                .flat_map(|(ty, data)| {
                    [
                        &ty.to_be_bytes()[..],
                        &(data.len() as u16).to_be_bytes(),
                        data,
                    ]
                    .concat()
                })
                .collect();
            body.extend_from_slice(&(block.len() as u16).to_be_bytes());
            body.extend_from_slice(&block);
        }
        let handshake = [&[1][..], &(body.len() as u32).to_be_bytes()[1..], &body].concat();
        [
            &[22, 3, 1][..],
            &(handshake.len() as u16).to_be_bytes(),
            &handshake,
        ]
        .concat()
    }

    fn info(sni: Option<&str>, alpn: &[&str]) -> ClientHelloInfo {
        ClientHelloInfo {
            sni: sni.map(String::from),
            alpn: alpn.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn real_client_hellos_yield_sni_and_alpn() {
        let cases: &[(&str, &[&str], Option<&str>)] = &[
            (
                "reviews.default.svc.clusterset.local",
                &["h2", "http/1.1"],
                Some("reviews.default.svc.clusterset.local"),
            ),
            (
                "outbound_.9080_._.Reviews.Default.svc.cluster.local",
                &[],
                Some("outbound_.9080_._.reviews.default.svc.cluster.local"),
            ),
            ("10.0.0.1", &["istio-peer-exchange", "istio"], None),
            ("fd00::1", &[], None),
        ];
        for &(server_name, alpn, sni) in cases {
            let hello = client_hello(server_name, alpn);
            assert_eq!(
                parse_client_hello(&hello),
                Ok(Some(info(sni, alpn))),
                "{server_name}"
            );
            let mut with_early_data = hello.clone();
            with_early_data.extend_from_slice(&[23, 3, 3, 0, 1, 0]);
            assert_eq!(
                parse_client_hello(&with_early_data),
                Ok(Some(info(sni, alpn)))
            );
        }
    }

    #[test]
    fn hellos_split_over_records_reassemble_and_every_prefix_waits() {
        let hello = client_hello("ratings.shop.svc.clusterset.local", &["h2"]);
        let want = info(Some("ratings.shop.svc.clusterset.local"), &["h2"]);
        for size in [usize::MAX, 200, 37, 1] {
            let bytes = if size == usize::MAX {
                hello.clone()
            } else {
                refragment(&hello, size)
            };
            for cut in 0..bytes.len() {
                assert_eq!(
                    parse_client_hello(&bytes[..cut]),
                    Ok(None),
                    "size {size}, cut {cut}"
                );
            }
            assert_eq!(
                parse_client_hello(&bytes),
                Ok(Some(want.clone())),
                "size {size}"
            );
        }
    }

    #[test]
    fn not_a_client_hello_is_an_error_early() {
        let hello = handmade(None);
        let with_record =
            |prefix: &[u8], next: &[u8]| [&refragment(prefix, 20)[..20 + 5], next].concat();
        let cases: Vec<(Vec<u8>, SniError)> = vec![
            (b"GET / HTTP/1.1\r\n".to_vec(), SniError::NotTls(b'G')),
            (b"MB\x01\x01".to_vec(), SniError::NotTls(b'M')),
            (vec![0x80, 0x2e, 0x01], SniError::NotTls(0x80)),
            (vec![22, 2, 0], SniError::RecordVersion(0x0200)),
            (vec![22, 3, 9], SniError::RecordVersion(0x0309)),
            (
                vec![22, 3, 1, 0, 0],
                SniError::Malformed("handshake record length out of range"),
            ),
            (
                vec![22, 3, 1, 0x40, 0x01],
                SniError::Malformed("handshake record length out of range"),
            ),
            (vec![22, 3, 3, 0, 4, 2], SniError::NotClientHello(2)),
            (
                with_record(&hello, &[21, 3, 3]),
                SniError::Malformed("non-handshake record inside the ClientHello"),
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(parse_client_hello(&bytes), Err(want), "{bytes:x?}");
        }
    }

    #[test]
    fn malformed_extensions_are_rejected() {
        let sni = |name: &[u8]| {
            [
                &((name.len() + 3) as u16).to_be_bytes()[..],
                &[0],
                &(name.len() as u16).to_be_bytes(),
                name,
            ]
            .concat()
        };
        let good = sni(b"a.b.svc.z");
        let malformed = |reason| Err(SniError::Malformed(reason));
        type Outcome = Result<Option<ClientHelloInfo>, SniError>;
        let cases: Vec<(Vec<u8>, Outcome)> = vec![
            (handmade(None), Ok(Some(info(None, &[])))),
            (
                handmade(Some(&[(0x1234, b"x"), (0, &good)])),
                Ok(Some(info(Some("a.b.svc.z"), &[]))),
            ),
            (
                handmade(Some(&[(0, &good), (0, &good)])),
                malformed("duplicate extension"),
            ),
            (
                handmade(Some(&[(0, &sni(b"bad name"))])),
                malformed("server name is not a host name"),
            ),
            (
                handmade(Some(&[(0, &sni(b""))])),
                malformed("server name is not a host name"),
            ),
            (
                handmade(Some(&[(0, &[0, 0])])),
                malformed("bad extension list length"),
            ),
            (
                handmade(Some(&[(16, &[0, 3, 5, b'h', b'2'])])),
                malformed("length runs past the end of its container"),
            ),
            (
                handmade(Some(&[(16, &[0, 1, 0])])),
                malformed("empty ALPN protocol id"),
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(parse_client_hello(&bytes), want, "{bytes:x?}");
        }
    }

    #[test]
    fn oversize_hellos_are_refused() {
        let max = MAX_CLIENT_HELLO_LEN;
        let huge = [22, 3, 1, 0x40, 0x00, 1, 0, 0x40, 0x00];
        assert_eq!(
            parse_client_hello(&huge),
            Err(SniError::TooLarge { len: 0x4009, max })
        );
        let protocols: Vec<String> = (0..90).map(|i| format!("{i:0>100}")).collect();
        let protocols: Vec<&str> = protocols.iter().map(String::as_str).collect();
        let big = client_hello("big.ns.svc.clusterset.local", &protocols);
        assert!(big.len() > 9000, "{}", big.len());
        assert_eq!(parse_client_hello(&big).unwrap().unwrap().alpn.len(), 90);
        let err = parse_client_hello(&refragment(&big, 1)).unwrap_err();
        assert!(
            matches!(err, SniError::TooLarge { len, .. } if len > max),
            "{err:?}"
        );
    }

    #[test]
    fn service_names_route() {
        let zone = ["clusterset.local"];
        let route = |ns: &str, name: &str, port| {
            Some(SniRoute {
                namespace: ns.into(),
                name: name.into(),
                port,
                subset: None,
            })
        };
        let cases = [
            (
                "reviews.default.svc.clusterset.local",
                route("default", "reviews", None),
            ),
            (
                "Reviews.Default.SVC.clusterset.local.",
                route("default", "reviews", None),
            ),
            (
                "outbound_.9080_._.reviews.default.svc.clusterset.local",
                route("default", "reviews", Some(9080)),
            ),
            (
                "outbound_.65535_._.a-1.b-2.svc.clusterset.local",
                route("b-2", "a-1", Some(65535)),
            ),
            ("outbound_.0_._.reviews.default.svc.clusterset.local", None),
            (
                "outbound_.+80_._.reviews.default.svc.clusterset.local",
                None,
            ),
            (
                "outbound_.65536_._.reviews.default.svc.clusterset.local",
                None,
            ),
            (
                "outbound_.9080_.v1_.reviews.default.svc.clusterset.local",
                Some(SniRoute {
                    subset: Some("v1".into()),
                    ..route("default", "reviews", Some(9080)).unwrap()
                }),
            ),
            (
                "outbound_.9080_.v1.x_.reviews.default.svc.clusterset.local",
                None,
            ),
            (
                "inbound_.9080_._.reviews.default.svc.clusterset.local",
                None,
            ),
            ("reviews.default.svc.cluster.local", None),
            ("reviews.default.svc.xclusterset.local", None),
            ("reviews.default.clusterset.local", None),
            ("a.reviews.default.svc.clusterset.local", None),
            ("-reviews.default.svc.clusterset.local", None),
            ("reviews..svc.clusterset.local", None),
            ("svc.clusterset.local", None),
            ("", None),
        ];
        for (sni, want) in cases {
            assert_eq!(route_from_sni(sni, &zone), want, "{sni}");
        }
        // Several zones at once (the gateway's default: MCS's and Istio's).
        let both = ["clusterset.local", "cluster.local."];
        for sni in [
            "a.b.svc.cluster.local",
            "a.b.svc.clusterset.local",
            "outbound_.80_._.a.b.svc.cluster.local",
        ] {
            assert_eq!(
                route_from_sni(sni, &both).map(|r| (r.namespace, r.name)),
                Some(("b".to_string(), "a".to_string())),
                "{sni}"
            );
        }
        assert_eq!(route_from_sni("a.b.svc.example.com", &both), None);
        assert_eq!(route_from_sni("a.b.svc.", &[""]), None);
        let target = route("b", "a", None).unwrap().target(15443);
        assert_eq!(
            target,
            Target::Service {
                namespace: "b".into(),
                name: "a".into(),
                port: 15443
            }
        );
    }
}
