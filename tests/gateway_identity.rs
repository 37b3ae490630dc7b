//! A gateway refuses to start with an SVID that is not its site's: peers and the registry
//! authorize a gateway by the site in its SPIFFE id, so another site's SVID (it then retried
//! the registry's refusal every 5 s, forever) or a registry node's (whose admin rights let
//! it register any site) is a mistake to name at start, not to run with.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use meshbridge_core::model::Catalog;
use meshbridge_federation::source::CatalogSource;
use meshbridge_testkit::pki::TestPki;
use support::{gateway_file, write};

const TD: &str = "gwid.example";

/// Runs `meshbridge gateway` for site east with the SVID `id`; its stderr once it ended,
/// or `None` when it was still running after 20 s (it started).
async fn gateway_with_svid(pki: &TestPki, name: &str, id: &str) -> Option<String> {
    let catalog = pki.dir().join("catalog.json");
    std::fs::write(&catalog, serde_json::to_vec(&Catalog::default()).unwrap()).unwrap();
    let mut file = gateway_file(pki, TD, "east", CatalogSource::file(&catalog));
    file.tls = pki.issue(name, id);
    let cfg = write(pki, name, &file).unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshbridge"))
        .args(["gateway", "--config"])
        .arg(&cfg)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(std::time::Duration::from_secs(20), child.wait_with_output())
        .await
        .ok()?
        .unwrap();
    assert!(!out.status.success(), "{name}: exited with success");
    Some(String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn a_gateway_with_another_sites_or_a_registry_svid_does_not_start() {
    let pki = TestPki::new(TD);
    for (name, id) in [
        ("west", format!("spiffe://{TD}/site/west/gateway")),
        ("node", format!("spiffe://{TD}/registry/1")),
    ] {
        let err = gateway_with_svid(&pki, name, &id)
            .await
            .unwrap_or_else(|| panic!("{name}: the gateway started with {id}"));
        assert!(
            err.contains(&id)
                && err.contains("gateway.site is \"east\"")
                && err.contains(&format!("spiffe://{TD}/site/east/")),
            "{name}: {err}"
        );
    }
}
