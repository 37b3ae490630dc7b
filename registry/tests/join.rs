//! Join tokens and SVIDs over real sockets: a token buys exactly one SVID for the id it
//! grants (on every node), expired, forged and malformed tokens are refused with the
//! reason, renewal issues a fresh certificate for the caller's own id only, and a client
//! without a certificate can call `Join` and nothing else.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshbridge_core::client::{
    ChannelOptions, ClientError, ClientOptions, Consistency, anonymous_channel, join,
};
use meshbridge_core::model::Rejection;
use meshbridge_core::pki::{Ca, Svid};
use meshbridge_core::proto::{self, registry_client::RegistryClient as Grpc};
use meshbridge_core::tls::{BundleSource, Identity, IdentityFiles, cert_info, parse_certs};
use support::{Cluster, TD, spec};
use tempfile::TempDir;
use tonic::Code;

const HOUR: Duration = Duration::from_secs(3600);

/// A cluster whose nodes sign joined SVIDs with their own issuing CA (`ca_dir`), trusted
/// beside the CA of the nodes' own certificates (as during a CA rotation).
struct Joinable {
    cluster: Cluster,
    ca: Ca,
    _ca_dir: TempDir,
}

impl Joinable {
    async fn start(nodes: usize, svid_ttl: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate(TD, Duration::from_secs(86_400)).unwrap();
        ca.write_to(dir.path()).unwrap();
        let path = dir.path().to_path_buf();
        let cluster = Cluster::start(nodes, |c| {
            c.ca_dir = Some(path.clone());
            c.svid_ttl_ms = svid_ttl.as_millis() as u64;
            c.tls.federated.push(BundleSource {
                path: path.join("ca.pem"),
                trust_domain: None,
            });
        })
        .await;
        Self {
            cluster,
            ca,
            _ca_dir: dir,
        }
    }

    /// What an operator hands to a new host: the registry nodes' CA certificate.
    fn bundle(&self) -> PathBuf {
        self.cluster.pki.dir().join("node-1").join("bundle.pem")
    }

    fn anonymous(&self, url: &str) -> Grpc<tonic::transport::Channel> {
        Grpc::new(anonymous_channel(url, &self.bundle(), TD, &ChannelOptions::default()).unwrap())
    }
}

fn opts() -> ClientOptions {
    ClientOptions {
        retry_deadline: Duration::from_secs(20),
        ..ClientOptions::default()
    }
}

fn token_refusal(err: &ClientError) -> String {
    match err {
        ClientError::Rejected(Rejection::Token { reason, .. }) => reason.clone(),
        other => panic!("not a token refusal: {other}"),
    }
}

fn invalid_field(status: &tonic::Status) -> String {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    match proto::rejection_from_status(status) {
        Some(Rejection::Invalid { field, .. }) => field,
        other => panic!("no field in {status:?}: {other:?}"),
    }
}

fn leaf(pem: &str) -> meshbridge_core::tls::CertInfo {
    let certs = parse_certs(std::path::Path::new("reply"), pem.as_bytes()).unwrap();
    cert_info(&certs[0]).unwrap()
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn load(svid: &Svid, dir: &TempDir) -> Arc<Identity> {
    svid.write_to(dir.path()).unwrap();
    Identity::load(IdentityFiles::in_dir(dir.path())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_buys_one_svid_and_a_second_use_is_refused_on_every_node() {
    let j = Joinable::start(3, HOUR).await;
    let leader = j.cluster.wait_leader(Duration::from_secs(20)).await;
    let follower = (1..=3).find(|n| *n != leader).unwrap();
    let admin = j.cluster.admin().await;
    let token = admin
        .create_join_token("vm-billing-01", "agent", HOUR)
        .await
        .unwrap();
    assert_eq!(
        token.spiffe_id,
        format!("spiffe://{TD}/site/vm-billing-01/agent")
    );

    // Through a follower: the token's use is forwarded to the leader and replicated.
    let svid = join(
        &[j.cluster.url(follower)],
        &j.bundle(),
        &token.token,
        &opts(),
    )
    .await
    .unwrap();
    assert_eq!(svid.id.to_string(), token.spiffe_id);
    let info = leaf(&svid.cert_pem);
    assert_eq!(info.spiffe_ids, vec![token.spiffe_id.clone()]);
    let left = info.seconds_left(now_unix());
    assert!(
        (3500..=3600).contains(&left),
        "svid_ttl is an hour: {left}s left"
    );
    assert!(svid.bundle_pem.contains(j.ca.cert_pem().trim()));

    // The SVID works for mTLS: the new site registers itself.
    let dir = tempfile::tempdir().unwrap();
    let me = j.cluster.client_as(load(&svid, &dir).await).await;
    me.register_site(&spec("vm-billing-01", "eu", "eu-1a"))
        .await
        .unwrap();

    for node in 1..=3 {
        let err = join(&[j.cluster.url(node)], &j.bundle(), &token.token, &opts())
            .await
            .unwrap_err();
        let meshbridge_core::client::JoinError::Registry(err) = err else {
            panic!("node {node}: {err}")
        };
        let reason = token_refusal(&err);
        assert!(
            reason.contains("already used by site vm-billing-01"),
            "node {node}: {reason}"
        );
        assert!(err.to_string().contains(&token.id), "{err}");
    }
    j.cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_forged_and_malformed_tokens_are_refused_with_the_reason() {
    let j = Joinable::start(1, HOUR).await;
    let url = j.cluster.url(1);

    // Forged: same trust domain, another CA's key.
    let rogue = Ca::generate(TD, HOUR).unwrap();
    let (_, forged) = rogue.mint_join_token("vm1", "agent", HOUR).unwrap();
    let err = join(std::slice::from_ref(&url), &j.bundle(), &forged, &opts())
        .await
        .unwrap_err();
    let meshbridge_core::client::JoinError::Registry(err) = err else {
        panic!("{err}")
    };
    assert!(token_refusal(&err).contains("signature"), "{err}");

    // Expired: valid for one second, used after it.
    let (claims, short) =
        j.ca.mint_join_token("vm2", "agent", Duration::from_secs(1))
            .unwrap();
    while now_unix() <= claims.expires as i64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err = join(std::slice::from_ref(&url), &j.bundle(), &short, &opts())
        .await
        .unwrap_err();
    let meshbridge_core::client::JoinError::Registry(err) = err else {
        panic!("{err}")
    };
    assert!(token_refusal(&err).contains("expired"), "{err}");

    // Missing or garbage fields are invalid arguments naming the field.
    let mut anon = j.anonymous(&url);
    let (_, csr) = meshbridge_core::pki::new_csr().unwrap();
    let (_, good) = j.ca.mint_join_token("vm3", "agent", HOUR).unwrap();
    let call = |token: &str, csr: &str| proto::JoinRequest {
        token: token.into(),
        csr_pem: csr.into(),
    };
    for (token, csr_pem, field) in [
        ("", csr.as_str(), "token"),
        ("hello", csr.as_str(), "token"),
        ("mbjt1.!!.x", csr.as_str(), "token"),
        (good.as_str(), "", "csr_pem"),
        (
            good.as_str(),
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "csr_pem",
        ),
    ] {
        let status = anon.join(call(token, csr_pem)).await.unwrap_err();
        assert_eq!(invalid_field(&status), field, "{token:?} {csr_pem:?}");
    }
    // A bad CSR did not burn the token.
    let ok = anon.join(call(&good, &csr)).await.unwrap().into_inner();
    assert_eq!(ok.spiffe_id, format!("spiffe://{TD}/site/vm3/agent"));
    j.cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn renew_issues_a_fresh_certificate_for_the_callers_own_id_only() {
    let j = Joinable::start(1, Duration::from_secs(120)).await;
    let east_id = j.cluster.pki.site("east");
    let before = east_id.cert_info();
    let east = j.cluster.client_as(east_id.clone()).await;
    east.register_site(&spec("east", "eu", "eu-1a"))
        .await
        .unwrap();

    // The CSR asks for west; the certificate is for the caller, east.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        format!("spiffe://{TD}/site/west/gateway")
            .as_str()
            .try_into()
            .unwrap(),
    )];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let renewed = east.renew(&csr).await.unwrap();
    assert_eq!(renewed.id, east_id.id());
    let info = leaf(&renewed.cert_pem);
    assert_eq!(info.spiffe_ids, vec![east_id.id().to_string()]);
    assert_ne!(info.serial, before.serial);
    let left = info.seconds_left(now_unix());
    assert!(
        (100..=120).contains(&left),
        "svid_ttl is 120 s: {left}s left"
    );

    // Operators and registry nodes are not sites: nothing to renew here.
    let err = j.cluster.admin().await.renew(&csr).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    // Nor is a client without a certificate.
    let status = j
        .anonymous(&j.cluster.url(1))
        .renew(proto::RenewRequest { csr_pem: csr })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // A garbage CSR names the field.
    let err = east.renew("not a csr").await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Rejected(Rejection::Invalid { field, .. }) if field == "csr_pem"),
        "{err}"
    );
    j.cluster.shutdown().await;
}

/// Renewal ends with the site: a removed or revoked site's identity is refused renewal (and
/// re-registration), until an admin reinstates it; an unregistered site cannot renew.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removed_or_revoked_sites_renewal_is_refused_until_reinstated() {
    let j = Joinable::start(1, Duration::from_secs(120)).await;
    let admin = j.cluster.admin().await;
    let east = j.cluster.client_as(j.cluster.pki.site("east")).await;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();

    // Never registered: nothing to renew.
    let err = east.renew(&csr).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    assert!(err.to_string().contains("not registered"), "{err}");

    east.register_site(&spec("east", "eu", "eu-1a"))
        .await
        .unwrap();
    east.renew(&csr).await.unwrap();

    // Removed by an admin: no renewal, and the site cannot simply register again.
    let removed = admin.remove_site("east").await.unwrap();
    assert!(removed.changed);
    let err = east.renew(&csr).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Rejected(Rejection::Revoked { site, .. }) if site == "east"),
        "{err}"
    );
    assert!(err.to_string().contains("reinstate"), "{err}");
    let err = east
        .register_site(&spec("east", "eu", "eu-1a"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Rejected(Rejection::Revoked { .. })),
        "{err}"
    );
    // Only admins revoke or reinstate.
    assert_eq!(
        east.reinstate_site("east").await.unwrap_err().code(),
        Some(Code::PermissionDenied)
    );

    // Reinstated: it registers and renews again.
    assert!(admin.reinstate_site("east").await.unwrap().changed);
    east.register_site(&spec("east", "eu", "eu-1a"))
        .await
        .unwrap();
    east.renew(&csr).await.unwrap();

    // Revoked directly (registered or not): the same.
    assert!(admin.revoke_site("east").await.unwrap().changed);
    assert!(!admin.revoke_site("east").await.unwrap().changed);
    assert!(east.renew(&csr).await.is_err());
    let catalog = j.cluster.node(1).catalog();
    assert!(catalog.site("east").is_none());
    assert!(catalog.revoked_sites.contains_key("east"));
    j.cluster.shutdown().await;
}

/// Limits before authentication: a client without a certificate gets `OutOfRange` ("too
/// large") for a 10 MiB `Join` (from the length prefix, before any handler), and `Unauthenticated`
/// for anything but `Join` (the Raft service's large messages included) before its message
/// is read; the node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_or_non_join_calls_without_a_certificate_are_refused_unread() {
    let j = Joinable::start(1, Duration::from_secs(120)).await;
    let url = j.cluster.url(1);
    let big = "x".repeat(10 * 1024 * 1024);
    let status = j
        .anonymous(&url)
        .max_encoding_message_size(usize::MAX)
        .join(proto::JoinRequest {
            token: big.clone(),
            csr_pem: String::new(),
        })
        .await
        .unwrap_err();
    // tonic answers OutOfRange for a message over the decoding limit.
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("too large"), "{status:?}");
    // Under the API's 4 MiB but far over what a Join needs: cut off at 64 KiB.
    let status = j
        .anonymous(&url)
        .join(proto::JoinRequest {
            token: "x".repeat(1024 * 1024),
            csr_pem: String::new(),
        })
        .await
        .unwrap_err();
    assert!(status.message().contains("length limit"), "{status:?}");

    // The Raft service takes messages up to 256 MiB from registry nodes; without a
    // certificate the call is refused at the gate, not decoded and then refused (which
    // answered PermissionDenied).
    let channel = anonymous_channel(&url, &j.bundle(), TD, &ChannelOptions::default()).unwrap();
    let status = proto::raft_client::RaftClient::new(channel)
        .max_encoding_message_size(usize::MAX)
        .append_entries(proto::RaftMessage {
            json: big.into_bytes(),
            early: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("only Join"), "{status:?}");

    // A site identity is no node either.
    let east = j.cluster.client_as(j.cluster.pki.site("east")).await;
    east.list_sites(Consistency::Stale).await.unwrap();
    j.cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_certificate_every_call_but_join_is_unauthenticated() {
    let j = Joinable::start(1, HOUR).await;
    let mut anon = j.anonymous(&j.cluster.url(1));
    let read = proto::ReadRequest { stale: true };
    let mut codes = vec![
        ("ListSites", anon.list_sites(read).await.map(|_| ())),
        ("GetCatalog", anon.get_catalog(read).await.map(|_| ())),
        (
            "RegisterSite",
            anon.register_site(proto::RegisterSiteRequest {
                spec: Some(proto::SiteSpec::from(&spec("evil", "eu", "eu-1a"))),
            })
            .await
            .map(|_| ()),
        ),
        (
            "Watch",
            anon.watch(proto::WatchRequest { from_revision: 0 })
                .await
                .map(|_| ()),
        ),
        (
            "Status",
            anon.status(proto::StatusRequest { local: true })
                .await
                .map(|_| ()),
        ),
        (
            "CreateJoinToken",
            anon.create_join_token(proto::CreateJoinTokenRequest {
                site: "evil".into(),
                role: "agent".into(),
                ttl_secs: 60,
            })
            .await
            .map(|_| ()),
        ),
    ];
    let mut raft = proto::raft_client::RaftClient::new(
        anonymous_channel(
            &j.cluster.url(1),
            &j.bundle(),
            TD,
            &ChannelOptions::default(),
        )
        .unwrap(),
    );
    codes.push((
        "AppendEntries",
        raft.append_entries(proto::RaftMessage {
            json: b"{}".to_vec(),
            early: false,
        })
        .await
        .map(|_| ()),
    ));
    let garbage = futures::stream::iter([proto::RaftMessage {
        json: b"{}".to_vec(),
        early: false,
    }]);
    codes.push((
        "AppendStream",
        raft.append_stream(garbage).await.map(|_| ()),
    ));
    for (method, result) in codes {
        let status = result.expect_err(method);
        assert_eq!(status.code(), Code::Unauthenticated, "{method}: {status:?}");
    }

    // Optional at the TLS layer means absent, not unchecked: a certificate from another CA
    // (of the same trust domain name) still fails the handshake.
    let rogue = Ca::generate(TD, HOUR).unwrap();
    let mut svid = rogue
        .issue(
            &meshbridge_core::id::SpiffeId::parse(&format!("spiffe://{TD}/ctl/mallory")).unwrap(),
            HOUR,
            &[],
        )
        .unwrap();
    svid.bundle_pem = std::fs::read_to_string(j.bundle()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let quick = ClientOptions {
        retry_deadline: Duration::from_secs(2),
        ..ClientOptions::default()
    };
    let mallory = meshbridge_core::client::RegistryClient::with_options(
        &j.cluster.urls(),
        load(&svid, &dir).await,
        quick,
    )
    .await
    .unwrap();
    let err = mallory
        .create_join_token("vm1", "agent", HOUR)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    j.cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_are_for_admins_and_need_a_ca() {
    let j = Joinable::start(1, HOUR).await;
    let admin = j.cluster.admin().await;
    let east = j.cluster.site("east").await;
    let err = east
        .create_join_token("vm1", "agent", HOUR)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    // Revoking one is for admins too.
    let err = east.revoke_token("some-token").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    for (site, role, ttl, field) in [
        ("VM_1", "agent", HOUR, "site"),
        ("vm1", "root", HOUR, "role"),
        ("vm1", "agent", Duration::from_secs(30 * 86_400), "ttl_secs"),
    ] {
        let err = admin.create_join_token(site, role, ttl).await.unwrap_err();
        assert!(
            matches!(&err, ClientError::Rejected(Rejection::Invalid { field: f, .. }) if f == field),
            "{site} {role}: {err}"
        );
    }
    j.cluster.shutdown().await;

    // A registry without ca_dir says so.
    let plain = Cluster::start(1, |_| {}).await;
    let err = plain
        .admin()
        .await
        .create_join_token("vm1", "agent", HOUR)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    assert!(err.to_string().contains("ca_dir"), "{err}");
    plain.shutdown().await;
}
