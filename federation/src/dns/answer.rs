//! The message path without I/O: a parsed request and the index in, the sections of the
//! response out, sized to what the transport and the client's EDNS0 buffer allow.
//!
//! The server and [`answer`] (bytes in, bytes out; for fuzzing and tests) share it.

use std::net::SocketAddr;

use hickory_proto::op::{
    Edns, Header, HeaderCounts, Message, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_proto::rr::{DNSClass, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder};
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;
use hickory_server::zone_handler::{MessageRequest, MessageResponse, MessageResponseBuilder};

use super::index::{Index, Lookup};

/// The largest UDP response, whatever the client offers (the DNS flag day 2020 value: no IP
/// fragmentation on common paths). Larger answers are truncated, and clients retry over TCP.
pub const MAX_UDP_PAYLOAD: u16 = 1232;

/// Size of a message header, and of an OPT record without options.
const HEADER_LEN: usize = 12;
const OPT_LEN: usize = 11;

/// How the request came, which bounds the size of the response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl From<Protocol> for Transport {
    fn from(p: Protocol) -> Self {
        match p {
            Protocol::Udp => Transport::Udp,
            _ => Transport::Tcp,
        }
    }
}

/// What to send back, borrowing records from the index (or from an upstream answer).
#[derive(Clone, Debug)]
pub(crate) struct Reply<'a> {
    pub rcode: ResponseCode,
    pub authoritative: bool,
    pub recursion_available: bool,
    pub truncated: bool,
    pub answers: &'a [Record],
    pub authority: &'a [Record],
    pub additionals: &'a [Record],
    /// Upper bound of the encoded size of the three sections (`usize::MAX`: unknown).
    pub size: usize,
}

impl Reply<'_> {
    pub(crate) fn error(rcode: ResponseCode, recursion_available: bool) -> Self {
        Self {
            rcode,
            authoritative: false,
            recursion_available,
            truncated: false,
            answers: &[],
            authority: &[],
            additionals: &[],
            size: 0,
        }
    }
}

/// What to do with a request.
pub(crate) enum Plan<'a> {
    Reply(Reply<'a>),
    /// Outside the zone, with an upstream configured.
    Forward,
}

/// Answer `req` from `index`.
pub(crate) fn plan<'a>(index: &'a Index, req: &MessageRequest) -> Plan<'a> {
    let ra = index.forwarding();
    let error = |rcode| Plan::Reply(Reply::error(rcode, ra));
    if req.edns.as_ref().is_some_and(|e| e.version() > 0) {
        return error(ResponseCode::BADVERS);
    }
    if req.metadata.op_code != OpCode::Query {
        return error(ResponseCode::NotImp);
    }
    let [query] = req.queries.queries() else {
        return error(ResponseCode::FormErr);
    };
    let qtype = query.query_type();
    let lookup = index.lookup(query.name(), qtype);
    if matches!(lookup, Lookup::OutOfZone) {
        return if ra {
            Plan::Forward
        } else {
            error(ResponseCode::Refused)
        };
    }
    let class_ok = matches!(query.query_class(), DNSClass::IN | DNSClass::ANY);
    if !class_ok || matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
        return error(ResponseCode::Refused);
    }
    let authoritative = |rcode, answers, authority, additionals, size| {
        Plan::Reply(Reply {
            rcode,
            authoritative: true,
            recursion_available: ra,
            truncated: false,
            answers,
            authority,
            additionals,
            size,
        })
    };
    match lookup {
        Lookup::Found(f) => authoritative(
            ResponseCode::NoError,
            f.answers,
            &[],
            f.additionals,
            f.answers_len.saturating_add(f.additionals_len),
        ),
        Lookup::NoData { soa, soa_len } => {
            authoritative(ResponseCode::NoError, &[], soa, &[], soa_len)
        }
        Lookup::NxDomain { soa, soa_len } => {
            authoritative(ResponseCode::NXDomain, &[], soa, &[], soa_len)
        }
        Lookup::OutOfZone => error(ResponseCode::Refused),
    }
}

/// The largest response `req` may get over `transport`.
fn limit(req: &MessageRequest, transport: Transport) -> u16 {
    match transport {
        Transport::Tcp => u16::MAX,
        Transport::Udp => req
            .edns
            .as_ref()
            .map_or(512, |e| e.max_payload().clamp(512, MAX_UDP_PAYLOAD)),
    }
}

/// The OPT record of the response: present when the request had one. Its payload size is
/// the response limit, which is also what hickory's encoder bounds the message to.
pub(crate) fn response_edns(req: &MessageRequest, transport: Transport) -> Option<Edns> {
    req.edns.as_ref().map(|_| {
        let mut edns = Edns::new();
        edns.set_max_payload(limit(req, transport).min(MAX_UDP_PAYLOAD))
            .set_version(0);
        edns
    })
}

/// Shrink `reply` to fit the transport: drop the additional section first (that needs no
/// TC bit, RFC 2181 §9); if the answer still does not fit, send none with TC set, so the
/// client asks again over TCP. Over TCP the encoder truncates at 64 KiB.
pub(crate) fn fit<'a>(
    req: &MessageRequest,
    reply: Reply<'a>,
    edns: Option<&Edns>,
    transport: Transport,
) -> Reply<'a> {
    if transport == Transport::Tcp {
        return reply;
    }
    let max = limit(req, transport);
    let overhead = HEADER_LEN + req.queries.as_bytes().len() + edns.map_or(0, |_| OPT_LEN);
    if overhead.saturating_add(reply.size) <= usize::from(max) {
        return reply;
    }
    if encode(req, &reply, edns, max).is_some_and(|(_, truncated)| !truncated) {
        return reply;
    }
    let lean = Reply {
        additionals: &[],
        ..reply.clone()
    };
    if encode(req, &lean, edns, max).is_some_and(|(_, truncated)| !truncated) {
        return lean;
    }
    Reply {
        truncated: true,
        answers: &[],
        authority: &[],
        additionals: &[],
        size: 0,
        ..reply
    }
}

type Records<'a> = std::slice::Iter<'a, Record>;

/// The response message for `reply`.
pub(crate) fn response<'q, 'a>(
    req: &'q MessageRequest,
    reply: &Reply<'a>,
    edns: Option<&'q Edns>,
) -> MessageResponse<'q, 'a, Records<'a>, Records<'a>, Records<'a>, Records<'a>> {
    let mut metadata = Metadata::response_from_request(&req.metadata);
    metadata.response_code = reply.rcode;
    metadata.authoritative = reply.authoritative;
    metadata.recursion_available = reply.recursion_available;
    metadata.truncation = reply.truncated;
    MessageResponseBuilder::new(&req.queries, edns).build(
        metadata,
        reply.answers.iter(),
        reply.authority.iter(),
        [].iter(),
        reply.additionals.iter(),
    )
}

/// Encode `reply` within `max` bytes: the bytes and whether anything was left out.
fn encode(
    req: &MessageRequest,
    reply: &Reply<'_>,
    edns: Option<&Edns>,
    max: u16,
) -> Option<(Vec<u8>, bool)> {
    let mut buf = Vec::with_capacity(512);
    let mut encoder = BinEncoder::new(&mut buf);
    encoder.set_max_size(max);
    let info = response(req, reply, edns)
        .destructive_emit(&mut encoder)
        .ok()?;
    let truncated = info.truncation;
    Some((buf, truncated))
}

/// A response ready to send.
pub(crate) struct Encoded {
    pub bytes: Vec<u8>,
    pub rcode: ResponseCode,
    pub truncated: bool,
}

/// What the server does with one request's bytes.
pub(crate) enum Served {
    Respond(Encoded),
    /// Outside the zone, with an upstream configured: the parsed request.
    Forward(Box<Request>),
}

/// Serve one request's bytes from `index` over `transport`. `None` where the server stays
/// silent: fewer than 12 bytes, or a response rather than a query.
pub(crate) fn serve(
    index: &Index,
    request: &[u8],
    src: SocketAddr,
    transport: Transport,
) -> Option<Served> {
    let req = match parse(request, src, transport)? {
        Ok(req) => req,
        Err(formerr) => return Some(Served::Respond(formerr)),
    };
    Some(match plan(index, &req) {
        Plan::Reply(reply) => Served::Respond(encode_reply(&req, reply, transport)),
        Plan::Forward => Served::Forward(Box::new(req)),
    })
}

/// The request in `bytes`; `None` where the server stays silent, `Err` with a FORMERR
/// response where the header parsed but the rest did not.
fn parse(bytes: &[u8], src: SocketAddr, transport: Transport) -> Option<Result<Request, Encoded>> {
    let header = Header::read(&mut BinDecoder::new(bytes)).ok()?;
    if header.metadata.message_type == MessageType::Response {
        return None;
    }
    let protocol = match transport {
        Transport::Udp => Protocol::Udp,
        Transport::Tcp => Protocol::Tcp,
    };
    Some(
        Request::from_bytes(bytes.to_vec(), src, protocol).map_err(|_| Encoded {
            bytes: format_error(&header.metadata),
            rcode: ResponseCode::FormErr,
            truncated: false,
        }),
    )
}

/// What a client over its rate limit gets. UDP: an empty truncated answer, no larger than
/// the query (no amplification, and a real client retries over TCP). TCP: refused.
pub(crate) fn rate_limited(transport: Transport) -> Reply<'static> {
    match transport {
        Transport::Udp => Reply {
            truncated: true,
            ..Reply::error(ResponseCode::NoError, false)
        },
        Transport::Tcp => Reply::error(ResponseCode::Refused, false),
    }
}

/// The rate-limited response to one request's bytes (see [`rate_limited`]); `None` where
/// the server stays silent.
pub(crate) fn serve_rate_limited(
    request: &[u8],
    src: SocketAddr,
    transport: Transport,
) -> Option<Encoded> {
    Some(match parse(request, src, transport)? {
        Ok(req) => encode_reply(&req, rate_limited(transport), transport),
        Err(formerr) => formerr,
    })
}

/// The reply carrying an upstream's `answer` to a forwarded query.
pub(crate) fn upstream_reply(answer: &Message) -> Reply<'_> {
    Reply {
        rcode: answer.metadata.response_code,
        authoritative: false,
        recursion_available: true,
        truncated: false,
        answers: &answer.answers,
        authority: &answer.authorities,
        additionals: &answer.additionals,
        size: usize::MAX,
    }
}

/// `reply` to `req`, sized to `transport` and encoded (SERVFAIL if it cannot be).
pub(crate) fn encode_reply(
    req: &MessageRequest,
    reply: Reply<'_>,
    transport: Transport,
) -> Encoded {
    let edns = response_edns(req, transport);
    let reply = fit(req, reply, edns.as_ref(), transport);
    let max = limit(req, transport);
    match encode(req, &reply, edns.as_ref(), max) {
        Some((bytes, truncated)) => Encoded {
            bytes,
            rcode: reply.rcode,
            truncated,
        },
        None => Encoded {
            bytes: server_failure(&req.metadata),
            rcode: ResponseCode::ServFail,
            truncated: false,
        },
    }
}

/// Answer one request from `index`, as the server would over `transport`, except that
/// queries outside the zone are refused (forwarding is I/O). `None` where the server stays
/// silent: fewer than 12 bytes, or a response rather than a query.
pub fn answer(index: &Index, request: &[u8], transport: Transport) -> Option<Vec<u8>> {
    let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
    Some(match serve(index, request, unspecified, transport)? {
        Served::Respond(encoded) => encoded.bytes,
        Served::Forward(req) => {
            let refused = Reply::error(ResponseCode::Refused, index.forwarding());
            encode_reply(&req, refused, transport).bytes
        }
    })
}

fn header_only(request: &Metadata, rcode: ResponseCode) -> Vec<u8> {
    let mut metadata = Metadata::response_from_request(request);
    metadata.response_code = rcode;
    let header = Header {
        metadata,
        counts: HeaderCounts::default(),
    };
    let mut buf = Vec::with_capacity(HEADER_LEN);
    // A bare header always encodes.
    let _ = header.emit(&mut BinEncoder::new(&mut buf));
    buf
}

/// FORMERR for a message whose header parsed but whose body did not.
fn format_error(request: &Metadata) -> Vec<u8> {
    header_only(request, ResponseCode::FormErr)
}

fn server_failure(request: &Metadata) -> Vec<u8> {
    header_only(request, ResponseCode::ServFail)
}
