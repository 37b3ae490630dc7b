//! The message path without sockets: `answer` on random, truncated and mutated bytes.

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::RecordType;
use meshbridge_core::model::SiteState;
use meshbridge_federation::dns::{Config, Index, MAX_UDP_PAYLOAD, Transport, answer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::fixture::*;

fn index() -> Index {
    let (mut world, _rx) = World::new();
    world
        .site("east", SiteState::Fresh)
        .site("west", SiteState::Stale { since_ms: 1 });
    world.export(export(
        "east",
        "web",
        vec![port("http", 80, 80), port("admin", 81, 81)],
        vec![ep("10.1.0.1", None)],
    ));
    let many = (0..300)
        .map(|i| {
            ep(
                &format!("10.2.{}.{}", i / 200, i % 200 + 1),
                Some(&format!("db-{i}")),
            )
        })
        .collect();
    world.export(headless("west", "db", vec![port("pg", 5432, 5432)], many));
    world.publish();
    let config = Config {
        vip_range: Some("127.240.0.0/16".parse().unwrap()),
        ..Config::for_test("east")
    };
    Index::build(&config, &world.catalog).unwrap()
}

fn queries() -> Vec<Vec<u8>> {
    let names = [
        svc("web"),
        svc("db"),
        format!("_http._tcp.{}", svc("web")),
        format!("_pg._tcp.{}", svc("db")),
        format!("db-7.west.{}", svc("db")),
        "clusterset.local.".into(),
        "dns-version.clusterset.local.".into(),
        "nope.clusterset.local.".into(),
        "example.com.".into(),
    ];
    let types = [
        RecordType::A,
        RecordType::AAAA,
        RecordType::SRV,
        RecordType::TXT,
        RecordType::ANY,
        RecordType::SOA,
    ];
    let mut out = Vec::new();
    for (i, name) in names.iter().enumerate() {
        for (j, t) in types.iter().enumerate() {
            let edns = [None, Some(512), Some(1232), Some(4096)][(i + j) % 4];
            out.push(query_bytes((i * 16 + j) as u16, name, *t, edns));
        }
    }
    out
}

/// Whatever comes back is a well-formed response to the request's id, within UDP limits.
fn check(index: &Index, request: &[u8]) {
    for transport in [Transport::Udp, Transport::Tcp] {
        let Some(reply) = answer(index, request, transport) else {
            continue;
        };
        assert!(
            request.len() >= 12,
            "answered a {}-byte request",
            request.len()
        );
        let msg =
            Message::from_vec(&reply).unwrap_or_else(|e| panic!("{e}: {reply:?} for {request:?}"));
        assert_eq!(msg.metadata.message_type, MessageType::Response);
        assert_eq!(
            msg.metadata.id,
            u16::from_be_bytes([request[0], request[1]])
        );
        if transport == Transport::Udp {
            assert!(
                reply.len() <= usize::from(MAX_UDP_PAYLOAD),
                "{} bytes",
                reply.len()
            );
        }
    }
}

#[test]
fn valid_queries_get_answers_that_fit_the_client_buffer() {
    let index = index();
    for q in queries() {
        check(&index, &q);
        let request = Message::from_vec(&q).unwrap();
        let reply = Message::from_vec(&answer(&index, &q, Transport::Udp).unwrap()).unwrap();
        let limit = request
            .edns
            .as_ref()
            .map_or(512, |e| e.max_payload().clamp(512, 1232));
        assert!(reply.to_vec().unwrap().len() <= usize::from(limit));
        assert_eq!(reply.queries, request.queries);
    }
    // The big headless answer: truncated over UDP, complete over TCP.
    let q = query_bytes(1, &svc("db"), RecordType::A, Some(1232));
    let udp = Message::from_vec(&answer(&index, &q, Transport::Udp).unwrap()).unwrap();
    assert!(udp.metadata.truncation && udp.answers.is_empty());
    let tcp = Message::from_vec(&answer(&index, &q, Transport::Tcp).unwrap()).unwrap();
    assert_eq!(tcp.answers.len(), 300);
    // Pure: outside the zone is refused even if forwarding would be configured.
    let q = query_bytes(2, "example.com.", RecordType::A, None);
    let r = Message::from_vec(&answer(&index, &q, Transport::Udp).unwrap()).unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
}

#[test]
fn every_prefix_and_every_bit_flip_of_valid_queries_is_handled() {
    let index = index();
    for q in queries() {
        for len in 0..q.len() {
            check(&index, &q[..len]);
        }
        for bit in 0..q.len() * 8 {
            let mut m = q.clone();
            m[bit / 8] ^= 1 << (bit % 8);
            check(&index, &m);
        }
    }
}

#[test]
fn random_bytes_never_panic() {
    let index = index();
    let mut rng = StdRng::seed_from_u64(0x6d65_7368);
    let valid = queries();
    for round in 0..20_000 {
        let bytes: Vec<u8> = if round % 2 == 0 {
            let len = rng.random_range(0..600);
            (0..len).map(|_| rng.random()).collect()
        } else {
            // A valid query with random bytes spliced in: gets past the header more often.
            let mut q = valid[rng.random_range(0..valid.len())].clone();
            for _ in 0..rng.random_range(1..6) {
                let i = rng.random_range(0..q.len());
                q[i] = rng.random();
            }
            if rng.random_bool(0.3) {
                q.truncate(rng.random_range(0..q.len()));
            }
            q
        };
        check(&index, &bytes);
    }
}
