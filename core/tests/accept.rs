//! The shared TLS accept loop (`tls::handshakes`) over real sockets: handshakes side by
//! side up to the bound, a silent client timed out without holding up the others past it,
//! a refused connection closed before anything is read, and each outcome reported.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use meshbridge_core::id::SpiffeId;
use meshbridge_core::pki::Ca;
use meshbridge_core::tls::{
    AcceptLimits, AllowList, HandshakeError, Identity, IdentityFiles, handshakes,
};
use rustls_pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

const DAY: Duration = Duration::from_secs(86400);

fn identity(dir: &std::path::Path, ca: &Ca, id: &str) -> Arc<Identity> {
    ca.issue(&SpiffeId::parse(id).unwrap(), DAY, &[])
        .unwrap()
        .write_to(dir)
        .unwrap();
    Identity::load(IdentityFiles::in_dir(dir)).unwrap()
}

/// A server's listener and acceptor, and a client identity of the same CA.
struct Setup {
    _tmp: tempfile::TempDir,
    listener: TcpListener,
    addr: std::net::SocketAddr,
    acceptor: TlsAcceptor,
    client: Arc<Identity>,
}

async fn setup() -> Setup {
    meshbridge_core::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::generate("corp.example", DAY).unwrap();
    let server = identity(
        &tmp.path().join("s"),
        &ca,
        "spiffe://corp.example/registry/1",
    );
    let client = identity(
        &tmp.path().join("c"),
        &ca,
        "spiffe://corp.example/site/east/gateway",
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    Setup {
        addr: listener.local_addr().unwrap(),
        listener,
        acceptor: TlsAcceptor::from(Arc::new(server.server_config(AllowList::any(), &[]))),
        client,
        _tmp: tmp,
    }
}

#[tokio::test]
async fn a_silent_client_is_timed_out_and_holds_up_the_next_only_past_the_bound() {
    let Setup {
        _tmp,
        listener,
        addr,
        acceptor,
        client,
    } = setup().await;
    // Long enough that the first phase is surely over before the first silent client times
    // out, so the order of the outcomes below shows who waited for whom.
    let timeout = Duration::from_secs(2);
    let limits = AcceptLimits {
        handshake_timeout: timeout,
        max_handshakes: 2,
    };
    let admitted = Arc::new(AtomicUsize::new(0));
    let seen = admitted.clone();
    let stop = CancellationToken::new();
    let mut outcomes = Box::pin(handshakes(
        listener,
        acceptor,
        limits,
        stop.clone(),
        move |_, _| Some(seen.fetch_add(1, Ordering::SeqCst)),
    ));
    let connector = TlsConnector::from(Arc::new(client.client_config(AllowList::any(), &[])));
    let handshake = || {
        let connector = connector.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            connector
                .connect(ServerName::try_from("meshbridge").unwrap(), tcp)
                .await
        }
    };

    // One silent client takes one of the two slots: a real client still gets through at
    // once (its outcome is reported first, long before the silent one times out).
    let silent = TcpStream::connect(addr).await.unwrap();
    let _first = handshake().await.unwrap();
    let h = outcomes.next().await.unwrap();
    assert!(h.result.is_ok(), "the real client completed");
    assert_eq!(h.admitted, 1, "admitted second, after the silent one");
    assert!(h.took < timeout, "{:?}", h.took);

    // Two silent clients take both slots: the next real client waits for a slot, which
    // the first silent one gives up at its timeout.
    let silent2 = TcpStream::connect(addr).await.unwrap();
    let late = tokio::spawn(handshake());
    // Without the bound the late client would be through long before any timeout; its
    // outcome comes only after the first silent client's.
    let h = outcomes.next().await.unwrap();
    assert!(
        matches!(h.result, Err(HandshakeError::TimedOut(t)) if t == timeout),
        "the first outcome is the first silent client's timeout"
    );
    assert_eq!(h.admitted, 0);
    assert!(h.took >= timeout);
    let _late = late
        .await
        .unwrap()
        .expect("the waiting client gets through once a slot frees");
    let mut rest = Vec::new();
    for _ in 0..2 {
        rest.push(outcomes.next().await.unwrap());
    }
    assert!(
        rest.iter().any(|h| h.result.is_ok()),
        "the waiting client completed"
    );
    assert!(
        rest.iter()
            .any(|h| matches!(h.result, Err(HandshakeError::TimedOut(_)))),
        "the second silent client timed out"
    );
    drop((silent, silent2));
    stop.cancel();
    assert!(outcomes.next().await.is_none(), "the stream ends at stop");
}

#[tokio::test]
async fn a_connection_the_admission_refuses_is_closed_before_its_handshake() {
    let Setup {
        _tmp,
        listener,
        addr,
        acceptor,
        ..
    } = setup().await;
    let limits = AcceptLimits {
        handshake_timeout: Duration::from_secs(5),
        max_handshakes: 8,
    };
    let stop = CancellationToken::new();
    let _outcomes = Box::pin(handshakes(
        listener,
        acceptor,
        limits,
        stop.clone(),
        |_, _| None::<()>,
    ));
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("closed, not left open")
        .unwrap_or(0);
    assert_eq!(n, 0, "the server closed the connection");
    stop.cancel();
}
