//! Trust bundles vouch for their own trust domain only, and a peer certificate must carry
//! exactly one SPIFFE id (the X.509-SVID rule).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meshbridge_core::pki::Ca;
use meshbridge_core::tls::{BundleSource, PeerRejected, TlsError, TrustStore};
use rcgen::{
    CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, UnixTime};

const DAY: Duration = Duration::from_secs(86_400);

fn bundle(dir: &std::path::Path, ca: &Ca, name: &str, td: Option<&str>) -> BundleSource {
    let path = dir.join(name);
    std::fs::write(&path, ca.cert_pem()).unwrap();
    BundleSource {
        path,
        trust_domain: td.map(str::to_owned),
    }
}

#[test]
fn a_partners_bundle_cannot_carry_roots_for_our_trust_domain() {
    let dir = tempfile::tempdir().unwrap();
    let ours = Ca::generate("corp.example", DAY).unwrap();
    let partner = Ca::generate("partner.example", DAY).unwrap();
    let own = bundle(dir.path(), &ours, "own.pem", None);

    // Correctly configured federation: each domain gets its own roots.
    let good = bundle(dir.path(), &partner, "partner.pem", Some("partner.example"));
    let store = TrustStore::load(&[own.clone(), good], "corp.example").unwrap();
    assert_eq!(
        store.trust_domains(),
        vec!["corp.example", "partner.example"]
    );

    // The partner's bundle file holds a CA that names our trust domain: refused, naming the
    // file and both domains, instead of filing a root under corp.example.
    let claim = bundle(
        dir.path(),
        &ours,
        "claims-ours.pem",
        Some("partner.example"),
    );
    let err = TrustStore::load(&[own.clone(), claim], "corp.example").unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, TlsError::Bundle { .. }), "{text}");
    assert!(text.contains("claims-ours.pem"), "{text}");
    assert!(
        text.contains("\"corp.example\"") && text.contains("\"partner.example\""),
        "{text}"
    );

    // A third domain's CA in the partner's bundle: refused the same way.
    let third = Ca::generate("third.example", DAY).unwrap();
    let other = bundle(dir.path(), &third, "third.pem", Some("partner.example"));
    assert!(TrustStore::load(&[own.clone(), other], "corp.example").is_err());

    // A federated bundle without a configured domain is taken as ours: a partner CA in it
    // is refused (it names partner.example), never filed under its own claim.
    let unnamed = bundle(dir.path(), &partner, "unnamed.pem", None);
    let err = TrustStore::load(&[own, unnamed], "corp.example").unwrap_err();
    assert!(err.to_string().contains("set `trust_domain`"), "{err}");
}

/// A leaf signed by `ca` (loaded from `dir`) carrying every id of `ids`.
fn leaf_with(ca_dir: &std::path::Path, ids: &[&str]) -> CertificateDer<'static> {
    let ca_pem = std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap();
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca.key")).unwrap()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    for id in ids {
        params
            .subject_alt_names
            .push(SanType::URI((*id).try_into().unwrap()));
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    params.signed_by(&key, &issuer).unwrap().der().clone()
}

#[test]
fn a_peer_certificate_with_several_spiffe_ids_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("corp.example", DAY).unwrap();
    ca.write_to(dir.path()).unwrap();
    let store = TrustStore::load(
        &[BundleSource {
            path: dir.path().join("ca.pem"),
            trust_domain: None,
        }],
        "corp.example",
    )
    .unwrap();
    let now = UnixTime::now();

    let one = leaf_with(dir.path(), &["spiffe://corp.example/site/east/gateway"]);
    let id = store.verify_peer(&one, &[], now, true).unwrap();
    assert_eq!(id.to_string(), "spiffe://corp.example/site/east/gateway");

    // Two ids, the first harmless: the old code took the first parseable one.
    let two = leaf_with(
        dir.path(),
        &[
            "spiffe://corp.example/site/east/gateway",
            "spiffe://corp.example/ctl/admin",
        ],
    );
    let err = store.verify_peer(&two, &[], now, true).unwrap_err();
    assert!(
        matches!(err, PeerRejected::SeveralSpiffeIds { count: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("exactly one"), "{err}");

    // One malformed SPIFFE URI is not silently skipped either.
    let bad = leaf_with(dir.path(), &["spiffe://corp.example/site/east/../ctl"]);
    assert!(matches!(
        store.verify_peer(&bad, &[], now, true),
        Err(PeerRejected::Invalid { .. })
    ));
}
