//! The everyday `ctl` commands with the real binary against a real registry: each write
//! prints what it changed, `-o json` everywhere, and bad input is refused naming what is
//! wrong, with nothing written.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::Output;

use anyhow::Result;
use meshbridge_core::client::{Consistency, RegistryClient};
use meshbridge_core::model::{
    Endpoint, Export, Locality, Port, Principal, Protocol, ServiceKey, SiteKind, SiteSpec,
};
use meshbridge_testkit::pki::TestPki;
use serde_json::Value;
use support::registry;

const TD: &str = "ctl.example";
const PUT_WEB: [&str; 8] = [
    "policy",
    "put",
    "--name",
    "web-from-west",
    "--service",
    "shop/web",
    "--allow",
    "site:west",
];

struct Ctl {
    url: String,
    tls_dir: std::path::PathBuf,
}

impl Ctl {
    fn run(&self, args: &[&str]) -> Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_meshbridge"))
            .args(["ctl", "--registry", &self.url, "--tls-dir"])
            .arg(&self.tls_dir)
            .args(args)
            .env("MESHBRIDGE_LOG", "warn")
            .output()
            .unwrap()
    }

    /// Succeeds; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "ctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        let text = self.ok(&[args, &["-o", "json"]].concat());
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    /// Fails; its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "ctl {args:?} should have failed");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_export_and_token_commands_print_what_changed_and_name_bad_input() -> Result<()> {
    let pki = TestPki::new(TD);
    let (_registry, url) = registry(&pki, TD).await?;
    let admin = pki.issue("ctl", &format!("spiffe://{TD}/ctl/ops"));
    let ctl = Ctl {
        url: url.clone(),
        tls_dir: admin.cert.parent().unwrap().to_path_buf(),
    };
    // Site east registers and exports shop/web (as its gateway would).
    let east = RegistryClient::connect(
        std::slice::from_ref(&url),
        pki.identity("east", &format!("spiffe://{TD}/site/east/gateway")),
    )
    .await?;
    east.register_site(&SiteSpec {
        name: "east".into(),
        kind: SiteKind::Cluster,
        locality: Locality::default(),
        gateways: vec!["127.0.0.1:15008".into()],
        lease_ttl_ms: 600_000,
        grace_ms: 600_000,
        instance: String::new(),
    })
    .await?;
    let endpoint = |a: &str, ready| Endpoint {
        address: a.parse().unwrap(),
        hostname: None,
        ready,
        weight: 1,
        identity: None,
        zone: None,
    };
    east.put_export(&Export {
        site: "east".into(),
        service: ServiceKey::new("shop", "web"),
        generation: 1,
        ports: vec![Port {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Tcp,
            target_port: 8080,
            app_protocol: None,
        }],
        endpoints: vec![endpoint("10.1.0.1", true), endpoint("10.1.0.2", false)],
        headless: false,
        created_revision: 0,
        updated_revision: 0,
    })
    .await?;

    // ctl export list.
    let list = ctl.json(&["export", "list"]);
    assert_eq!(list[0]["site"], "east", "{list}");
    assert_eq!(list[0]["service"], "shop/web");
    assert_eq!(list[0]["ready"], 1);
    assert_eq!(list[0]["endpoints"].as_array().map(Vec::len), Some(2));
    let table = ctl.ok(&["export", "list", "--site", "east"]);
    assert!(
        table.contains("shop/web") && table.contains("1/2"),
        "{table}"
    );
    let err = ctl.fails(&["export", "list", "--site", "nowhere"]);
    assert!(err.contains("nowhere") && err.contains("east"), "{err}");
    let err = ctl.fails(&["export", "list", "--site", "Bad_Site"]);
    assert!(err.contains("Bad_Site"), "{err}");

    // ctl policy put (flags), then replaced from a file, listed, deleted.
    assert!(ctl.ok(&["policy", "list"]).contains("no policies"));
    let put = ctl.ok(&PUT_WEB);
    assert!(
        put.contains("policy web-from-west created") && put.contains("site:west"),
        "{put}"
    );
    let again = ctl.json(&PUT_WEB);
    assert_eq!(again["changed"], false, "{again}");
    let file = pki.dir().join("policy.toml");
    write(
        &file,
        "name = \"web-from-west\"\nservice = \"shop/web\"\nallow = [\"site:west\", \"td:partner.example\"]\n",
    );
    let replaced = ctl.ok(&["policy", "put", "--file", file.to_str().unwrap()]);
    assert!(
        replaced.contains("replaced (was shop/web from site:west)")
            && replaced.contains("td:partner.example"),
        "{replaced}"
    );
    let list = ctl.json(&["policy", "list"]);
    assert_eq!(
        list[0]["allow"],
        serde_json::json!(["site:west", "td:partner.example"]),
        "{list}"
    );
    // Bad input: named, nothing written.
    let err = ctl.fails(&[
        "policy",
        "put",
        "--name",
        "x",
        "--service",
        "shop/web",
        "--allow",
        "bogus:y",
    ]);
    assert!(err.contains("unknown principal kind \"bogus\""), "{err}");
    let err = ctl.fails(&[
        "policy",
        "put",
        "--name",
        "x",
        "--service",
        "Shop/web",
        "--allow",
        "site:west",
    ]);
    assert!(err.contains("policy.service"), "{err}");
    // Without --allow: refused (it made a deny-all policy without a word); a deny-all
    // policy is asked for by name.
    let err = ctl.fails(&["policy", "put", "--name", "x", "--service", "shop/web"]);
    assert!(err.contains("--allow"), "{err}");
    let closed = ctl.ok(&[
        "policy",
        "put",
        "--name",
        "closed",
        "--service",
        "shop/db",
        "--deny-all",
    ]);
    assert!(closed.contains("shop/db from nobody"), "{closed}");
    assert!(ctl.json(&["policy", "delete", "closed"])["deleted"] == true);
    write(&file, "name = \"x\"\nservice = \"shop/web\"\nallows = []\n");
    let err = ctl.fails(&["policy", "put", "--file", file.to_str().unwrap()]);
    assert!(
        err.contains("policy.toml") && err.contains("allows"),
        "{err}"
    );
    let catalog = east.catalog(Consistency::Linearizable).await?;
    assert_eq!(catalog.policies.len(), 1);
    assert_eq!(
        catalog.policies["web-from-west"].allow,
        vec![
            Principal::Site("west".into()),
            Principal::TrustDomain("partner.example".into())
        ]
    );
    let deleted = ctl.json(&["policy", "delete", "web-from-west"]);
    assert_eq!(deleted["deleted"], true, "{deleted}");
    let err = ctl.fails(&["policy", "delete", "web-from-west"]);
    assert!(err.contains("web-from-west"), "{err}");

    // ctl token: none used yet; one minted and used by a joining agent is listed; a bad
    // site name for a new token is refused.
    assert_eq!(ctl.json(&["token", "list"]), serde_json::json!([]));
    assert!(
        ctl.ok(&["token", "list"])
            .contains("no join token has been used")
    );
    let minted = ctl.json(&["token", "create", "--site", "vm-1", "--ttl", "10m"]);
    let token = minted["token"].as_str().unwrap();
    meshbridge_core::client::join(
        std::slice::from_ref(&url),
        &admin.bundle,
        token,
        &Default::default(),
    )
    .await?;
    let used = ctl.json(&["token", "list"]);
    assert_eq!(used[0]["id"], minted["id"], "{used}");
    assert_eq!(used[0]["site"], "vm-1", "{used}");
    assert!(ctl.ok(&["token", "list"]).contains("vm-1"));
    // Revoked before use: listed as such, and a join with it is refused saying so.
    let second = ctl.json(&["token", "create", "--site", "vm-2"]);
    let id = second["id"].as_str().unwrap();
    let revoked = ctl.ok(&["token", "revoke", id]);
    assert!(
        revoked.contains(&format!("join token {id} revoked")),
        "{revoked}"
    );
    assert!(ctl.ok(&["token", "revoke", id]).contains("already revoked"));
    let err = meshbridge_core::client::join(
        std::slice::from_ref(&url),
        &admin.bundle,
        second["token"].as_str().unwrap(),
        &Default::default(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("revoked"), "{err}");
    let list = ctl.json(&["token", "list"]);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == id && t["state"] == "revoked"),
        "{list}"
    );
    // A used token cannot be revoked; the refusal names the site to revoke instead.
    let err = ctl.fails(&["token", "revoke", minted["id"].as_str().unwrap()]);
    assert!(err.contains("ctl site revoke vm-1"), "{err}");
    let err = ctl.fails(&["token", "create", "--site", "Bad_Site"]);
    assert!(err.contains("Bad_Site"), "{err}");
    Ok(())
}
