//! The registry API over mTLS: fencing, refusals that name the field and change nothing,
//! authorization by SPIFFE id, resolve, stale reads.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::Ipv4Addr;
use std::time::Duration;

use meshbridge_core::client::{ClientError, Consistency, RegistryClient};
use meshbridge_core::model::{
    Endpoint, Import, MAX_ENDPOINTS, Policy, Principal, Rejection, SiteRank,
};
use meshbridge_core::proto::{self, registry_client::RegistryClient as Grpc};
use support::{Cluster, export, key, spec, visible};
use tonic::Code;

/// Sites east (eu) and west (us), registered, with their clients.
async fn east_and_west(cluster: &Cluster) -> (RegistryClient, RegistryClient) {
    let east = cluster.site("east").await;
    let west = cluster.site("west").await;
    east.register_site(&spec("east", "eu", "eu-1a"))
        .await
        .unwrap();
    west.register_site(&spec("west", "us", "us-1a"))
        .await
        .unwrap();
    (east, west)
}

fn field(err: ClientError) -> String {
    match err {
        ClientError::Rejected(Rejection::Invalid { field, .. }) => field,
        other => panic!("not an invalid-argument refusal: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn older_generation_is_fenced_and_delete_then_higher_generation_works() {
    let cluster = Cluster::start(3, |_| {}).await;
    let east = cluster.site("east").await;
    east.register_site(&spec("east", "eu", "eu-1a"))
        .await
        .unwrap();
    east.put_export(&export("east", "cart", 5, &["10.0.0.1"]))
        .await
        .unwrap();

    let err = east
        .put_export(&export("east", "cart", 4, &["10.0.0.9"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    assert!(matches!(
        err,
        ClientError::Rejected(Rejection::StaleGeneration {
            got: 4,
            stored: 5,
            ..
        })
    ));

    // The same generation again is a no-op, not an error (a retried write).
    let again = east
        .put_export(&export("east", "cart", 5, &["10.0.0.1"]))
        .await
        .unwrap();
    assert!(!again.changed);

    east.delete_export("east", &key("cart"), 5).await.unwrap();
    // A restarted exporter replaying an old generation cannot resurrect it...
    let err = east
        .put_export(&export("east", "cart", 5, &["10.0.0.1"]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Rejected(Rejection::StaleGeneration { .. })
        ),
        "{err}"
    );
    // ...a newer one can.
    east.put_export(&export("east", "cart", 6, &["10.0.0.2"]))
        .await
        .unwrap();
    let cart = east
        .get_service(&key("cart"), Consistency::Linearizable)
        .await
        .unwrap();
    let group = &cart.value.unwrap().groups[0];
    assert_eq!(group.generation, 6);
    assert_eq!(group.endpoints[0].address.to_string(), "10.0.0.2");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_refused_naming_the_field_and_changes_nothing() {
    let cluster = Cluster::start(3, |_| {}).await;
    let admin = cluster.admin().await;
    admin
        .register_site(&spec("east", "eu", "eu-1a"))
        .await
        .unwrap();
    admin
        .put_export(&export("east", "cart", 1, &["10.0.0.1"]))
        .await
        .unwrap();
    let before = admin.catalog(Consistency::Linearizable).await.unwrap();

    let mut bad = spec("East_1", "eu", "eu-1a");
    assert_eq!(
        field(admin.register_site(&bad).await.unwrap_err()),
        "spec.name"
    );
    bad = spec("west", "eu", "eu-1a");
    bad.gateways.push("no-port".into());
    assert_eq!(
        field(admin.register_site(&bad).await.unwrap_err()),
        "spec.gateways[1]"
    );

    let mut e = export("east", "cart", 2, &["10.0.0.1", "10.0.0.2"]);
    e.endpoints[1].address = "224.0.0.1".parse().unwrap();
    assert_eq!(
        field(admin.put_export(&e).await.unwrap_err()),
        "export.endpoints[1].address"
    );
    let mut e = export("east", "cart", 2, &["10.0.0.1"]);
    e.service.name = String::new();
    assert_eq!(
        field(admin.put_export(&e).await.unwrap_err()),
        "export.service.name"
    );
    let mut e = export("east", "cart", 2, &["10.0.0.1"]);
    let template = e.endpoints[0].clone();
    e.endpoints = (0..=MAX_ENDPOINTS as u32)
        .map(|i| Endpoint {
            address: Ipv4Addr::from(0x0a00_0001 + i).into(),
            ..template.clone()
        })
        .collect();
    assert_eq!(
        field(admin.put_export(&e).await.unwrap_err()),
        "export.endpoints"
    );

    let policy = Policy {
        name: "cart-from-west".into(),
        service: key("cart"),
        allow: vec![Principal::Id("not-a-spiffe-id".into())],
    };
    assert_eq!(
        field(admin.put_policy(&policy).await.unwrap_err()),
        "policy.allow[0]"
    );

    // Wire-level problems the model types cannot express, sent raw.
    let ctl = cluster.pki.ctl();
    let channel = meshbridge_core::client::lazy_channel(
        &cluster.url(1),
        &ctl,
        meshbridge_core::client::registry_allow_list(&ctl),
        &Default::default(),
    )
    .unwrap();
    let mut raw = Grpc::new(channel);
    let mut wire = proto::Export::from(&export("east", "cart", 3, &["10.0.0.1"]));
    wire.endpoints[0].address = "10.0.0.300".into();
    wire.ports[0].port = 70_000;
    let status = raw
        .put_export(proto::PutExportRequest { export: Some(wire) })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("export.ports[0].port"),
        "{}",
        status.message()
    );
    let status = raw
        .register_site(proto::RegisterSiteRequest { spec: None })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("spec"), "{}", status.message());

    // Unknown site: NotFound, naming it.
    let err = admin
        .put_export(&export("nowhere", "cart", 1, &["10.0.0.1"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));
    assert!(err.to_string().contains("nowhere"), "{err}");
    let err = admin.heartbeat("nowhere").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));

    let after = admin.catalog(Consistency::Linearizable).await.unwrap();
    assert_eq!(
        visible(&after),
        visible(&before),
        "a refused request changed the catalog"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sites_may_write_only_their_own_registration_and_exports() {
    let cluster = Cluster::start(3, |_| {}).await;
    let (_east, west) = east_and_west(&cluster).await;

    let err = west
        .put_export(&export("east", "cart", 1, &["10.0.0.1"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    assert_eq!(
        west.heartbeat("east").await.unwrap_err().code(),
        Some(Code::PermissionDenied)
    );
    assert_eq!(
        west.remove_site("east").await.unwrap_err().code(),
        Some(Code::PermissionDenied)
    );
    let policy = Policy {
        name: "p".into(),
        service: key("cart"),
        allow: vec![Principal::Site("west".into())],
    };
    assert_eq!(
        west.put_policy(&policy).await.unwrap_err().code(),
        Some(Code::PermissionDenied)
    );
    assert_eq!(
        west.promote(7).await.unwrap_err().code(),
        Some(Code::PermissionDenied)
    );

    // Reads are open to sites; admins may write anything.
    assert_eq!(
        west.list_sites(Consistency::Linearizable)
            .await
            .unwrap()
            .sites
            .len(),
        2
    );
    let admin = cluster.admin().await;
    admin.put_policy(&policy).await.unwrap();
    assert_eq!(
        admin
            .list_policies(Consistency::Linearizable)
            .await
            .unwrap()
            .value,
        [policy]
    );

    // A workload identity is refused outright.
    let workload = cluster.pki.identity(
        &format!("spiffe://{}/ns/shop/sa/cart", support::TD),
        "workload",
    );
    let client = cluster.client_as(workload).await;
    let err = client.list_sites(Consistency::Stale).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resolve_ranks_by_locality_and_stale_reads_come_from_any_node() {
    let cluster = Cluster::start(3, |_| {}).await;
    let admin = cluster.admin().await;
    for (site, region, zone) in [
        ("a", "eu", "eu-1a"),
        ("b", "eu", "eu-1a"),
        ("c", "eu", "eu-1b"),
        ("d", "us", "us-1a"),
    ] {
        admin
            .register_site(&spec(site, region, zone))
            .await
            .unwrap();
        admin
            .put_export(&export(site, "cart", 1, &["10.0.0.1"]))
            .await
            .unwrap();
    }
    let ranked = admin
        .resolve(&key("cart"), "a", Consistency::Linearizable)
        .await
        .unwrap();
    let order: Vec<(SiteRank, &str)> = ranked
        .value
        .iter()
        .map(|(r, g)| (*r, g.site.as_str()))
        .collect();
    assert_eq!(
        order,
        [
            (SiteRank::SameSite, "a"),
            (SiteRank::SameZone, "b"),
            (SiteRank::SameRegion, "c"),
            (SiteRank::Other, "d")
        ]
    );
    let none = admin
        .resolve(&key("nothing"), "a", Consistency::Stale)
        .await
        .unwrap();
    assert!(none.value.is_empty());
    assert!(
        admin
            .get_service(&key("nothing"), Consistency::Stale)
            .await
            .unwrap()
            .value
            .is_none()
    );

    // Every node answers stale reads from its own replica once it has caught up.
    cluster
        .wait_revision(ranked.revision, Duration::from_secs(10))
        .await;
    for id in 1..=3 {
        let only: RegistryClient = cluster.admin_of(id).await;
        let services = only.list_services(Consistency::Stale).await.unwrap();
        assert_eq!(services.value.len(), 1);
        assert_eq!(services.value[0].groups.len(), 4);
        let local = only.status_of_each().await;
        assert_eq!(local[0].1.as_ref().unwrap().node_id, id);
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_write_is_applied_once_and_answered_again() {
    let cluster = Cluster::start(3, |_| {}).await;
    let admin = cluster.admin().await;
    let policy = Policy {
        name: "cart-from-west".into(),
        service: key("cart"),
        allow: vec![Principal::Site("west".into())],
    };
    admin.put_policy(&policy).await.unwrap();

    // The same request id twice, through a follower and through the leader, as a client
    // does when its first attempt's connection broke after the leader took the write.
    let ctl = cluster.pki.ctl();
    let leader = cluster.wait_leader(Duration::from_secs(10)).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let delete = |node| {
        let channel = meshbridge_core::client::lazy_channel(
            &cluster.url(node),
            &ctl,
            meshbridge_core::client::registry_allow_list(&ctl),
            &Default::default(),
        )
        .unwrap();
        async move {
            let mut req = tonic::Request::new(proto::DeletePolicyRequest {
                name: "cart-from-west".into(),
            });
            req.metadata_mut().insert(
                meshbridge_core::client::REQUEST_ID,
                "00000000000000aa-7".parse().unwrap(),
            );
            Grpc::new(channel).delete_policy(req).await
        }
    };
    let first = delete(follower).await.unwrap().into_inner();
    assert!(first.changed);
    let again = delete(leader).await.unwrap().into_inner();
    assert!(!again.changed, "applied twice");
    assert_eq!(again.revision, first.revision);
    // A new write (a new id) of the same delete is refused: the policy is gone.
    let err = admin.delete_policy("cart-from-west").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));
    cluster.shutdown().await;
}

/// Garbage from a registry node on the AppendEntries stream ends that stream with an
/// InvalidArgument that says what was wrong; the node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_on_the_append_stream_is_refused_with_the_reason() {
    use meshbridge_core::client::{ChannelOptions, lazy_channel, registry_allow_list};
    let cluster = Cluster::start(3, |_| {}).await;
    let node = cluster
        .pki
        .identity(&format!("spiffe://{}/registry/9", support::TD), "node-9");
    let channel = lazy_channel(
        &cluster.url(1),
        &node,
        registry_allow_list(&node),
        &ChannelOptions::default(),
    )
    .unwrap();
    let mut raft = proto::raft_client::RaftClient::new(channel);
    let garbage = futures::stream::iter([proto::RaftMessage {
        json: b"not json".to_vec(),
        early: false,
    }]);
    let mut replies = raft.append_stream(garbage).await.unwrap().into_inner();
    let status = replies.message().await.expect_err("garbage refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("raft message"), "{status:?}");

    let admin = cluster.admin().await;
    admin
        .register_site(&spec("east", "eu", "eu-1a"))
        .await
        .unwrap();
    cluster.shutdown().await;
}

/// A correctly federated partner domain: its ids are verified against its own roots and it
/// may read the catalog, but its `/ctl/` id is no admin here and its `site/east` is not our
/// `east` (sites are keyed by trust domain and site).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_federated_partner_reads_but_is_neither_admin_nor_one_of_our_sites() {
    use meshbridge_core::client::ClientOptions;
    use meshbridge_core::tls::{AllowList, AllowRule, BundleSource, Identity, IdentityFiles};

    const DAY: Duration = Duration::from_secs(86_400);
    let partner_dir = tempfile::tempdir().unwrap();
    let partner = meshbridge_core::pki::Ca::generate("partner.example", DAY).unwrap();
    partner.write_to(partner_dir.path()).unwrap();
    let partner_ca = partner_dir.path().join("ca.pem");
    let cluster = Cluster::start(3, |c| {
        c.tls.federated.push(BundleSource {
            path: partner_ca.clone(),
            trust_domain: Some("partner.example".into()),
        });
    })
    .await;
    let east = cluster.site("east").await;
    east.register_site(&spec("east", "eu", "eu-1a"))
        .await
        .unwrap();

    // A partner identity that trusts our CA for our trust domain, and our registry ids.
    let our_ca = cluster.pki.issue(
        &format!("spiffe://{}/site/probe/gateway", support::TD),
        "probe",
    );
    let as_partner = |path: &str, name: &str| {
        let id = meshbridge_core::id::SpiffeId::parse(&format!("spiffe://partner.example{path}"))
            .unwrap();
        let dir = partner_dir.path().join(name);
        partner
            .issue(&id, DAY, &[])
            .unwrap()
            .write_to(&dir)
            .unwrap();
        let mut files = IdentityFiles::in_dir(&dir);
        files.federated.push(BundleSource {
            path: our_ca.join("bundle.pem"),
            trust_domain: Some(support::TD.into()),
        });
        Identity::load(files).unwrap()
    };
    let options = || ClientOptions {
        retry_deadline: Duration::from_secs(5),
        registry_ids: Some(AllowList(vec![AllowRule::Prefix(format!(
            "spiffe://{}/registry/",
            support::TD
        ))])),
        ..ClientOptions::default()
    };
    let partner_ctl =
        RegistryClient::with_options(&cluster.urls(), as_partner("/ctl/alice", "ctl"), options())
            .await
            .unwrap();
    let partner_east = RegistryClient::with_options(
        &cluster.urls(),
        as_partner("/site/east/gateway", "east"),
        options(),
    )
    .await
    .unwrap();

    // Reads: allowed (the chain verified against the partner's roots).
    let sites = partner_east
        .list_sites(Consistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(sites.sites.len(), 1);

    // The partner's /ctl/ id: no join token for our east (which would buy a real local
    // SVID), no policy writes.
    let err = partner_ctl
        .create_join_token("east", "agent", Duration::from_secs(600))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    assert!(err.to_string().contains("partner.example"), "{err}");
    let policy = Policy {
        name: "p".into(),
        service: key("cart"),
        allow: vec![Principal::Site("east".into())],
    };
    let err = partner_ctl.put_policy(&policy).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");

    // The partner's east gateway: not our east.
    let err = partner_east
        .put_export(&export("east", "cart", 1, &["10.0.0.9"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    let err = partner_east
        .register_site(&spec("east", "eu", "eu-1a"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    assert_eq!(
        partner_east.heartbeat("east").await.unwrap_err().code(),
        Some(Code::PermissionDenied)
    );

    // Nothing of theirs reached the catalog; our east still writes.
    let catalog = cluster.node(1).catalog();
    assert!(catalog.exports.is_empty() && catalog.policies.is_empty());
    east.put_export(&export("east", "cart", 1, &["10.0.0.1"]))
        .await
        .unwrap();
    cluster.shutdown().await;
}

/// Export ownership through the API: admins set it, a site that does not own a service
/// cannot export it (the refusal names the rule), the owner can, and sites cannot change
/// the rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_owners_may_export_a_service_once_ownership_is_set() {
    let cluster = Cluster::start(1, |_| {}).await;
    let admin = cluster.admin().await;
    let (east, west) = east_and_west(&cluster).await;
    assert_eq!(
        west.put_ownership("shop", &["west".into()])
            .await
            .unwrap_err()
            .code(),
        Some(Code::PermissionDenied)
    );
    assert!(
        admin
            .put_ownership("shop", &["east".into()])
            .await
            .unwrap()
            .changed
    );
    let err = west
        .put_export(&export("west", "cart", 1, &["10.9.9.9"]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Rejected(Rejection::NotOwner { site, scope, .. }) if site == "west" && scope == "shop"),
        "{err}"
    );
    east.put_export(&export("east", "cart", 1, &["10.0.0.1"]))
        .await
        .unwrap();
    let catalog = admin.catalog(Consistency::Linearizable).await.unwrap();
    assert_eq!(catalog.owners["shop"], vec!["east".to_string()]);
    assert_eq!(catalog.exports.len(), 1);
    cluster.shutdown().await;
}

/// Import addresses: a site writes its own, never another site's; a bad address is refused naming the field over
/// the wire; no addresses removes the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_site_writes_its_own_import_addresses_only() {
    let cluster = Cluster::start(3, |_| {}).await;
    let admin = cluster.admin().await;
    let (east, west) = east_and_west(&cluster).await;
    east.put_export(&export("east", "cart", 1, &["10.0.0.1"]))
        .await
        .unwrap();
    let import = |site: &str, generation, ips: &[&str]| Import {
        site: site.into(),
        service: key("cart"),
        generation,
        ips: ips.iter().map(|a| a.parse().unwrap()).collect(),
    };
    let w = west
        .put_import(&import("west", 3, &["10.96.0.7"]))
        .await
        .unwrap();
    assert!(w.changed);
    // East may not say where west's clients reach a service.
    let err = east
        .put_import(&import("west", 4, &["10.96.0.66"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    // Bad input is named, over the wire as in the model.
    let ident = cluster.pki.site("west");
    let channel = meshbridge_core::client::lazy_channel(
        &cluster.url(1),
        &ident,
        meshbridge_core::client::registry_allow_list(&ident),
        &Default::default(),
    )
    .unwrap();
    let bad = Grpc::new(channel)
        .put_import(proto::PutImportRequest {
            site: "west".into(),
            service: Some(proto::ServiceKey::from(&key("cart"))),
            generation: 9,
            ips: vec!["10.96.0.7".into(), "not-an-ip".into()],
        })
        .await
        .unwrap_err();
    assert!(bad.message().contains("import.ips[1]"), "{bad:?}");
    assert_eq!(
        field(
            west.put_import(&import("west", 9, &["10.96.0.7", "10.96.0.8"]))
                .await
                .unwrap_err()
        ),
        "import.ips[1]"
    );
    let catalog = admin.catalog(Consistency::Linearizable).await.unwrap();
    assert_eq!(
        catalog.import(&key("cart"), "west").map(|i| i.ips.clone()),
        Some(vec!["10.96.0.7".parse().unwrap()])
    );
    assert_eq!(catalog.imports.len(), 1);
    // No addresses: removed.
    west.put_import(&import("west", 10, &[])).await.unwrap();
    let catalog = admin.catalog(Consistency::Linearizable).await.unwrap();
    assert!(catalog.imports.is_empty());
    cluster.shutdown().await;
}

/// Mesh-wide certificate expiry: each node's status lists its own SVID, its bundle's
/// earliest expiry, and the SVID of every client that called it, with the expiry the
/// client's certificate carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_node_reports_its_own_its_bundles_and_its_callers_certificates() {
    let cluster = Cluster::start(1, |_| {}).await;
    let admin = cluster.admin().await;
    let (east, _west) = east_and_west(&cluster).await;
    east.heartbeat("east").await.unwrap();
    let status = admin.status().await.unwrap();
    let kinds: Vec<(String, String)> = status
        .certificates
        .iter()
        .map(|c| (c.kind.clone(), c.id.clone()))
        .collect();
    let has = |kind: &str, id_part: &str| {
        kinds
            .iter()
            .any(|(k, id)| k == kind && id.contains(id_part))
    };
    assert!(has("svid", "/registry/1"), "{kinds:?}");
    assert!(has("bundle", "(trust bundle)"), "{kinds:?}");
    assert!(has("client", "/site/east"), "{kinds:?}");
    assert!(has("client", "/site/west"), "{kinds:?}");
    assert!(has("client", "/ctl/"), "{kinds:?}");
    // The expiry is the certificate's own (test SVIDs live a day).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for c in &status.certificates {
        let left = c.not_after_unix - now;
        assert!(
            c.kind == "bundle" || (0..=86_400 + 60).contains(&left),
            "{} {}: {left} s left",
            c.kind,
            c.id
        );
    }
    cluster.shutdown().await;
}

/// Quota: one caller may hold `MAX_WATCHES_PER_CALLER` (16) watch streams on a node; the
/// next is refused with `ResourceExhausted` naming the caller; closing one frees its place;
/// another caller is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_streams_per_caller_are_bounded() {
    use meshbridge_core::client::{ChannelOptions, lazy_channel, registry_allow_list};
    let cluster = Cluster::start(1, |_| {}).await;
    let east_id = cluster.pki.site("east");
    let channel = lazy_channel(
        &cluster.url(1),
        &east_id,
        registry_allow_list(&east_id),
        &ChannelOptions::default(),
    )
    .unwrap();
    let mut raw = Grpc::new(channel);
    let mut open = Vec::new();
    for _ in 0..16 {
        let mut s = raw
            .watch(proto::WatchRequest { from_revision: 0 })
            .await
            .unwrap()
            .into_inner();
        // The reset arrives: the stream is being served.
        s.message().await.unwrap().unwrap();
        open.push(s);
    }
    let err = raw
        .watch(proto::WatchRequest { from_revision: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("site/east/gateway"), "{err:?}");
    // Another caller still watches.
    let west = cluster.site("west").await;
    west.list_sites(Consistency::Stale).await.unwrap();
    let west_id = cluster.pki.site("west");
    let mut other = Grpc::new(
        lazy_channel(
            &cluster.url(1),
            &west_id,
            registry_allow_list(&west_id),
            &ChannelOptions::default(),
        )
        .unwrap(),
    );
    other
        .watch(proto::WatchRequest { from_revision: 0 })
        .await
        .unwrap();
    // Closing one of east's streams frees its place (the node notices the close).
    drop(open.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match raw.watch(proto::WatchRequest { from_revision: 0 }).await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(
                    std::time::Instant::now() < deadline,
                    "the place never freed"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    cluster.shutdown().await;
}
