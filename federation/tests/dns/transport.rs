//! Message sizes (TC then TCP, EDNS0), malformed input, rate limit.

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use meshbridge_core::model::SiteState;
use meshbridge_federation::dns::{Config, MAX_UDP_PAYLOAD, RateLimit, Transport};

use crate::fixture::*;

/// A headless service with `n` ready endpoints in one site.
async fn big(n: u32) -> (World, meshbridge_federation::dns::DnsHandle) {
    let (mut world, rx) = World::new();
    world.site("east", SiteState::Fresh);
    let eps = (0..n)
        .map(|i| ep(&format!("10.1.{}.{}", i / 250, i % 250 + 1), None))
        .collect();
    world.export(headless("east", "big", vec![port("http", 80, 80)], eps));
    world.publish();
    let dns = start(Config::for_test("east"), rx).await;
    (world, dns)
}

#[tokio::test]
async fn oversize_udp_answer_sets_tc_and_tcp_returns_it_all() {
    let (_world, dns) = big(200).await;
    let q = query_bytes(7, &svc("big"), RecordType::A, None);
    let udp = raw_udp(dns.local_addr(), &q).await.unwrap();
    assert!(
        udp.len() <= 512,
        "{} bytes over UDP without EDNS",
        udp.len()
    );
    let udp = Message::from_vec(&udp).unwrap();
    assert!(udp.metadata.truncation);
    assert_eq!(udp.metadata.id, 7);
    assert!(udp.answers.is_empty());

    let tcp = ask_raw(dns.local_addr(), Transport::Tcp, &q).await;
    assert!(!tcp.metadata.truncation);
    assert_eq!(tcp.answers.len(), 200);
}

#[tokio::test]
async fn edns0_payload_size_is_honored_up_to_1232_bytes() {
    // 60 A records: about 1 KB, too much for 512, fine for 1232.
    let (_world, dns) = big(60).await;
    let name = svc("big");
    let plain = ask_raw(
        dns.local_addr(),
        Transport::Udp,
        &query_bytes(1, &name, RecordType::A, None),
    )
    .await;
    assert!(plain.metadata.truncation);
    assert!(plain.edns.is_none());

    let edns = ask_raw(
        dns.local_addr(),
        Transport::Udp,
        &query_bytes(2, &name, RecordType::A, Some(1232)),
    )
    .await;
    assert!(!edns.metadata.truncation);
    assert_eq!(edns.answers.len(), 60);
    assert!(edns.edns.is_some(), "a request with OPT gets OPT back");

    // A client offering 4096 still gets at most 1232 bytes over UDP.
    let (_w, dns) = big(100).await;
    let q = query_bytes(3, &svc("big"), RecordType::A, Some(4096));
    let bytes = raw_udp(dns.local_addr(), &q).await.unwrap();
    assert!(
        bytes.len() <= usize::from(MAX_UDP_PAYLOAD),
        "{}",
        bytes.len()
    );
    let msg = Message::from_vec(&bytes).unwrap();
    assert!(msg.metadata.truncation && msg.edns.is_some());
    // An offer below 512 counts as 512.
    let tiny = ask_raw(
        dns.local_addr(),
        Transport::Udp,
        &query_bytes(4, "clusterset.local.", RecordType::SOA, Some(100)),
    )
    .await;
    assert_eq!(tiny.answers.len(), 1);
}

#[tokio::test]
async fn unsupported_edns_version_gets_badvers() {
    let (_world, dns) = big(1).await;
    let mut msg =
        Message::from_vec(&query_bytes(9, &svc("big"), RecordType::A, Some(1232))).unwrap();
    if let Some(e) = msg.edns.as_mut() {
        e.set_version(1);
    }
    for t in BOTH {
        let reply = ask_raw(dns.local_addr(), t, &msg.to_vec().unwrap()).await;
        // 16 is BADVERS with an OPT record (hickory decodes it under its TSIG name, BADSIG).
        assert_eq!(u16::from(reply.metadata.response_code), 16, "{t:?}");
        assert!(reply.edns.is_some());
    }
}

#[tokio::test]
async fn malformed_and_truncated_messages_never_stop_the_server() {
    let (_world, dns) = big(3).await;
    let addr = dns.local_addr();
    let good = query_bytes(0x4242, &svc("big"), RecordType::A, Some(1232));
    // Shorter than a header: no answer.
    assert!(raw_udp(addr, &good[..5]).await.is_none());
    // A header, then a question cut short: FORMERR with the id.
    for t in BOTH {
        let cut = ask_raw(addr, t, &good[..good.len() - 16]).await;
        assert_eq!(cut.metadata.response_code, ResponseCode::FormErr, "{t:?}");
        assert_eq!(cut.metadata.id, 0x4242);
    }
    // Garbage with a plausible header; a response sent as a query (ignored).
    let mut garbage = good.clone();
    garbage[12..].iter_mut().for_each(|b| *b = 0xff);
    let _ = raw_udp(addr, &garbage).await;
    let mut response = good.clone();
    response[2] |= 0x80;
    assert!(raw_udp(addr, &response).await.is_none());
    // A TCP stream that announces more than it sends, then closes.
    {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(&[0x10, 0x00, 1, 2, 3]).await.unwrap();
    }
    // Still answering, on both transports.
    for t in BOTH {
        let ok = ask_raw(addr, t, &good).await;
        assert_eq!(ok.answers.len(), 3, "{t:?}");
    }
}

#[tokio::test]
async fn over_the_rate_limit_udp_gets_an_empty_truncated_answer_and_tcp_is_refused() {
    let (mut world, rx) = World::new();
    world.site("east", SiteState::Fresh);
    world.publish();
    let config = Config {
        rate_limit: RateLimit {
            per_client_qps: 1,
            burst: 3,
        },
        ..Config::for_test("east")
    };
    let dns = start(config, rx).await;
    let q = query_bytes(1, "dns-version.clusterset.local.", RecordType::TXT, None);
    for _ in 0..3 {
        let ok = ask_raw(dns.local_addr(), Transport::Udp, &q).await;
        assert_eq!(ok.answers.len(), 1);
    }
    // The bucket is empty (a slow machine may have refilled one token meanwhile).
    let mut limited = None;
    for _ in 0..3 {
        let reply = ask_raw(dns.local_addr(), Transport::Udp, &q).await;
        if reply.metadata.truncation {
            limited = Some(reply);
            break;
        }
    }
    let limited = limited.expect("no query was limited");
    assert!(limited.answers.is_empty());
    let mut refused = false;
    for _ in 0..3 {
        let reply = ask_raw(dns.local_addr(), Transport::Tcp, &q).await;
        refused |= reply.metadata.response_code == ResponseCode::Refused;
    }
    assert!(refused);
}

/// A client holding connections open cannot take them all: past the server's most, a new
/// connection is closed at once (and counted), the ones held still answer, and so does a
/// new one once some are let go. (hickory-server's TCP side took every connection until
/// the process ran out of file descriptors.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_past_the_most_are_closed_at_once() {
    use tokio::io::AsyncReadExt;
    let (_world, dns) = big(3).await;
    let addr = dns.local_addr();
    let limit = meshbridge_federation::dns::MAX_TCP_CONNECTIONS;
    let mut held = Vec::with_capacity(limit);
    for _ in 0..limit {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // Each held one has been accepted once the server closes the next: wait for that.
    let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), extra.read(&mut byte))
        .await
        .expect("the connection past the most was kept open");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &{
        let mut r = prometheus_client::registry::Registry::default();
        dns.metrics().register(&mut r);
        r
    })
    .unwrap();
    assert!(
        text.contains("meshbridge_dns_tcp_refused_total 1"),
        "{text}"
    );

    // A held connection still answers.
    let q = query_bytes(9, &svc("big"), RecordType::A, None);
    let mut first = held.swap_remove(0);
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    tokio::io::AsyncWriteExt::write_all(&mut first, &framed)
        .await
        .unwrap();
    let len = first.read_u16().await.unwrap();
    let mut reply = vec![0u8; usize::from(len)];
    first.read_exact(&mut reply).await.unwrap();
    assert_eq!(Message::from_vec(&reply).unwrap().answers.len(), 3);

    // Let some go: a new connection is served again.
    drop(first);
    held.truncate(limit - 10);
    let answered = async {
        loop {
            if let Some(reply) = raw_tcp(addr, &q).await {
                return reply;
            }
        }
    };
    let reply = tokio::time::timeout(std::time::Duration::from_secs(10), answered)
        .await
        .expect("no new connection was served after some were let go");
    assert_eq!(Message::from_vec(&reply).unwrap().answers.len(), 3);
}
