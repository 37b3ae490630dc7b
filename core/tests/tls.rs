//! Mutual TLS between real sockets on loopback, with SVIDs from the development PKI.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use meshbridge_core::id::SpiffeId;
use meshbridge_core::pki::{Ca, Svid};
use meshbridge_core::tls::{AllowList, Identity, IdentityFiles, PeerRejected, peer_id, rejection};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const DAY: Duration = Duration::from_secs(86400);

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn write_identity(dir: &std::path::Path, svid: &Svid) -> Arc<Identity> {
    svid.write_to(dir).unwrap();
    Identity::load(IdentityFiles::in_dir(dir)).unwrap()
}

struct Server {
    addr: std::net::SocketAddr,
    /// Per accepted connection: the client's id, or the server-side handshake error.
    results: tokio::sync::mpsc::UnboundedReceiver<Result<SpiffeId, std::io::Error>>,
}

/// An echo server that reports each handshake's outcome.
async fn serve(identity: Arc<Identity>, allow: AllowList) -> Server {
    let acceptor = TlsAcceptor::from(Arc::new(identity.server_config(allow, &[])));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, results) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Ok(mut tls) => {
                        let peer = peer_id(tls.get_ref().1.peer_certificates());
                        let _ = tx.send(peer.ok_or_else(|| std::io::Error::other("no peer id")));
                        let mut buf = [0u8; 1024];
                        while let Ok(n) = tls.read(&mut buf).await {
                            if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        }
    });
    Server { addr, results }
}

async fn connect(
    identity: &Arc<Identity>,
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = TlsConnector::from(Arc::new(identity.client_config(AllowList::any(), &[])));
    let tcp = TcpStream::connect(addr).await?;
    let mut tls = connector
        .connect(ServerName::try_from("meshbridge").unwrap(), tcp)
        .await?;
    // TLS 1.3: the server checks the client certificate after the client's handshake ends,
    // so a round trip is what proves the connection was accepted.
    tls.write_all(b"ping").await?;
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"ping");
    Ok(tls)
}

async fn refused_reason(server: &mut Server) -> PeerRejected {
    let err = server
        .results
        .recv()
        .await
        .unwrap()
        .expect_err("handshake should fail");
    rejection(&err).unwrap_or_else(|| panic!("no verifier reason in {err}"))
}

#[tokio::test]
async fn valid_svids_handshake_and_server_sees_client_id() {
    meshbridge_core::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::generate("corp.example", DAY).unwrap();
    let server_id = write_identity(
        &tmp.path().join("s"),
        &ca.issue(&id("spiffe://corp.example/site/east/gateway"), DAY, &[])
            .unwrap(),
    );
    let client_id = write_identity(
        &tmp.path().join("c"),
        &ca.issue(&id("spiffe://corp.example/site/west/gateway"), DAY, &[])
            .unwrap(),
    );
    let mut server = serve(
        server_id,
        AllowList::parse(&["spiffe://corp.example/site/"]).unwrap(),
    )
    .await;
    let tls = connect(&client_id, server.addr).await.unwrap();
    let seen = server.results.recv().await.unwrap().unwrap();
    assert_eq!(seen, id("spiffe://corp.example/site/west/gateway"));
    // And the client sees the server's id.
    assert_eq!(
        peer_id(tls.get_ref().1.peer_certificates()),
        Some(id("spiffe://corp.example/site/east/gateway"))
    );
}

#[tokio::test]
async fn refusals_each_have_a_distinct_readable_reason() {
    meshbridge_core::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::generate("corp.example", DAY).unwrap();
    let server_identity = write_identity(
        &tmp.path().join("s"),
        &ca.issue(&id("spiffe://corp.example/site/east/gateway"), DAY, &[])
            .unwrap(),
    );
    let allow =
        AllowList::parse(&["spiffe://corp.example/site/", "spiffe://partner.example"]).unwrap();
    let mut server = serve(server_identity.clone(), allow).await;

    // 1. No client certificate at all.
    let no_cert = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(server_identity.verifier(AllowList::any()))
        .with_no_client_auth();
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    if let Ok(mut tls) = TlsConnector::from(Arc::new(no_cert))
        .connect(ServerName::try_from("x").unwrap(), tcp)
        .await
    {
        let _ = tls.write_all(b"ping").await;
        let _ = tls.read(&mut [0u8; 4]).await;
    }
    let err = server.results.recv().await.unwrap().unwrap_err();
    assert!(
        err.to_string().contains("peer sent no certificates"),
        "{err}"
    );

    // 2. Same trust domain, but another CA.
    let rogue = Ca::generate("corp.example", DAY).unwrap();
    // (The client itself trusts the real CA too, so only the server's check can fail.)
    let mut svid = rogue
        .issue(&id("spiffe://corp.example/site/west/gateway"), DAY, &[])
        .unwrap();
    svid.bundle_pem = format!("{}{}", rogue.cert_pem(), ca.cert_pem());
    let c = write_identity(&tmp.path().join("rogue"), &svid);
    assert!(connect(&c, server.addr).await.is_err());
    let r = refused_reason(&mut server).await;
    assert!(matches!(r, PeerRejected::UnknownIssuer { .. }), "{r}");
    assert!(
        r.to_string().contains("not signed by a trusted root"),
        "{r}"
    );

    // 3. Another trust domain that is not trusted here.
    let other = Ca::generate("other.example", DAY).unwrap();
    let dir = tmp.path().join("other");
    other
        .issue(&id("spiffe://other.example/site/west/gateway"), DAY, &[])
        .unwrap()
        .write_to(&dir)
        .unwrap();
    std::fs::write(dir.join("corp.pem"), ca.cert_pem()).unwrap();
    let mut files = IdentityFiles::in_dir(&dir);
    files.federated.push(meshbridge_core::tls::BundleSource {
        path: dir.join("corp.pem"),
        trust_domain: Some("corp.example".into()),
    });
    let c = Identity::load(files).unwrap();
    assert!(connect(&c, server.addr).await.is_err());
    let r = refused_reason(&mut server).await;
    assert!(matches!(r, PeerRejected::UntrustedDomain { .. }), "{r}");
    assert!(
        r.to_string()
            .contains("\"other.example\" is not trusted here"),
        "{r}"
    );

    // 4. Expired. (Identity::load refuses expired files, so build the client config from a
    //    valid identity and swap in the expired cert underneath with a reload bypass.)
    let now = time::OffsetDateTime::now_utc();
    let expired = ca
        .issue_between(
            &id("spiffe://corp.example/site/west/gateway"),
            &[],
            now - time::Duration::days(3),
            now - time::Duration::days(1),
        )
        .unwrap();
    let dir = tmp.path().join("expired");
    expired.write_to(&dir).unwrap();
    let err = Identity::load(IdentityFiles::in_dir(&dir)).unwrap_err();
    assert!(err.to_string().contains("certificate expired at"), "{err}");
    let cfg = expired_client_config(&expired, &server_identity);
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    if let Ok(mut tls) = TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("x").unwrap(), tcp)
        .await
    {
        let _ = tls.write_all(b"ping").await;
        let _ = tls.read(&mut [0u8; 4]).await;
    }
    let r = refused_reason(&mut server).await;
    assert!(matches!(r, PeerRejected::Expired { .. }), "{r}");

    // 5. Valid chain, but not on the allow-list.
    let c = write_identity(
        &tmp.path().join("workload"),
        &ca.issue(&id("spiffe://corp.example/ns/default/sa/web"), DAY, &[])
            .unwrap(),
    );
    assert!(connect(&c, server.addr).await.is_err());
    let r = refused_reason(&mut server).await;
    assert!(matches!(r, PeerRejected::NotAllowed { .. }), "{r}");
    assert!(
        r.to_string()
            .contains("spiffe://corp.example/ns/default/sa/web"),
        "{r}"
    );
}

/// A client config presenting `svid` as is (no file checks), trusting `trust`'s roots.
fn expired_client_config(svid: &Svid, trust: &Arc<Identity>) -> rustls::ClientConfig {
    let chain =
        meshbridge_core::tls::parse_certs(std::path::Path::new("mem"), svid.cert_pem.as_bytes())
            .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::try_from(
        rustls_pki_types::pem::PemObject::from_pem_slice(svid.key_pem.as_bytes())
            .map(|k: rustls_pki_types::PrivatePkcs8KeyDer<'static>| k.secret_pkcs8_der().to_vec())
            .unwrap(),
    )
    .unwrap();
    rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(trust.verifier(AllowList::any()))
        .with_client_auth_cert(chain, key)
        .unwrap()
}

#[tokio::test]
async fn rotation_keeps_open_connections_and_new_ones_see_the_new_cert() {
    meshbridge_core::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let old_ca = Ca::generate("corp.example", DAY).unwrap();
    let server_dir = tmp.path().join("s");
    let server_identity = write_identity(
        &server_dir,
        &old_ca
            .issue(&id("spiffe://corp.example/site/east/gateway"), DAY, &[])
            .unwrap(),
    );
    let client_dir = tmp.path().join("c");
    let client_identity = write_identity(
        &client_dir,
        &old_ca
            .issue(&id("spiffe://corp.example/site/west/gateway"), DAY, &[])
            .unwrap(),
    );
    let mut changes = server_identity.subscribe();
    let watcher = tokio::spawn(
        server_identity
            .clone()
            .watch_files(Duration::from_millis(50), std::future::pending()),
    );
    let mut server = serve(server_identity.clone(), AllowList::any()).await;
    let mut before = connect(&client_identity, server.addr).await.unwrap();
    server.results.recv().await.unwrap().unwrap();
    let old_serial = serial_of(&before);

    // Rotate to a new CA. First every bundle carries both roots, then leaves are reissued.
    let new_ca = Ca::generate("corp.example", DAY).unwrap();
    let both = format!("{}{}", old_ca.cert_pem(), new_ca.cert_pem());
    meshbridge_core::pki::write_atomic(&client_dir.join("bundle.pem"), both.as_bytes(), 0o644)
        .unwrap();
    assert!(client_identity.reload().unwrap());
    let mut svid = new_ca
        .issue(&id("spiffe://corp.example/site/east/gateway"), DAY, &[])
        .unwrap();
    svid.bundle_pem = format!("{}{}", old_ca.cert_pem(), new_ca.cert_pem());
    svid.write_to(&server_dir).unwrap();
    tokio::time::timeout(Duration::from_secs(10), changes.changed())
        .await
        .unwrap()
        .unwrap();

    // The connection opened before the rotation still works.
    before.write_all(b"more").await.unwrap();
    let mut buf = [0u8; 4];
    before.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"more");

    // A new connection sees the new certificate, and the old client is still trusted.
    let after = connect(&client_identity, server.addr).await.unwrap();
    server.results.recv().await.unwrap().unwrap();
    let new_serial = serial_of(&after);
    assert_ne!(old_serial, new_serial);
    let info = meshbridge_core::tls::cert_info(
        after
            .get_ref()
            .1
            .peer_certificates()
            .unwrap()
            .first()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(info.serial, new_serial);
    assert_eq!(server_identity.cert_info().serial, new_serial);
    watcher.abort();
}

fn serial_of(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> String {
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .unwrap()
        .first()
        .unwrap()
        .clone();
    meshbridge_core::tls::cert_info(&leaf).unwrap().serial
}

#[test]
fn bad_files_name_the_file_and_the_problem() {
    meshbridge_core::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::generate("corp.example", DAY).unwrap();
    let svid = ca
        .issue(&id("spiffe://corp.example/site/east/gateway"), DAY, &[])
        .unwrap();
    let dir = tmp.path().join("ok");
    svid.write_to(&dir).unwrap();
    let files = IdentityFiles::in_dir(&dir);

    let check = |files: &IdentityFiles, want: &str, file: &std::path::Path| {
        let err = Identity::load(files.clone()).unwrap_err().to_string();
        assert!(err.contains(want), "{err:?} should contain {want:?}");
        assert!(
            err.contains(&file.display().to_string()),
            "{err:?} should name {}",
            file.display()
        );
    };

    // Missing.
    let mut f = files.clone();
    f.key = dir.join("missing.pem");
    check(&f, "cannot read", &f.key);
    // Not PEM.
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "hello").unwrap();
    let mut f = files.clone();
    f.cert = junk.clone();
    check(&f, "no CERTIFICATE block found", &junk);
    // Key not matching the cert.
    let other = ca
        .issue(&id("spiffe://corp.example/site/west/gateway"), DAY, &[])
        .unwrap();
    let other_key = dir.join("other-key.pem");
    std::fs::write(&other_key, &other.key_pem).unwrap();
    let mut f = files.clone();
    f.key = other_key.clone();
    check(&f, "does not match the certificate", &other_key);
    // A certificate without a SPIFFE id (the CA's own has a URI SAN of the trust domain only,
    // so use a plain DNS certificate).
    let plain = rcgen::generate_simple_self_signed(vec!["example.com".into()]).unwrap();
    let plain_cert = dir.join("plain.pem");
    let plain_key = dir.join("plain-key.pem");
    std::fs::write(&plain_cert, plain.cert.pem()).unwrap();
    std::fs::write(&plain_key, plain.signing_key.serialize_pem()).unwrap();
    let f = IdentityFiles {
        cert: plain_cert.clone(),
        key: plain_key,
        ..files.clone()
    };
    check(&f, "has no spiffe:// URI SAN", &plain_cert);
    // A bundle with a non-CA certificate in it.
    let mut f = files.clone();
    f.bundle = dir.join("cert.pem");
    check(&f, "is not a CA certificate", &f.bundle);
}
