//! The Kubernetes adapter against real kube-apiservers (built from their Go modules by
//! tools/build.sh), a real registry and real gateways: exports with EndpointSlice
//! conditions, imports with derived Services and EndpointSlices, MCS conditions, conflicts,
//! withdrawal, objects it did not create, bad input.

#![allow(clippy::unwrap_used)]

#[path = "kube/env.rs"]
mod env;

use std::net::IpAddr;
use std::time::Duration;

use anyhow::Result;
use env::*;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use meshbridge_core::model::{Catalog, ServiceKey};
use meshbridge_core::vip::{PortRange, assign_ports};
use meshbridge_federation::kube::crd::{ServiceExport, ServiceImport, ServiceImportType};
use meshbridge_testkit::kube::ApiServerOptions;

const WITHIN: Duration = Duration::from_secs(30);

fn cond<'a>(se: &'a ServiceExport, t: &str) -> Option<(&'a str, &'a str, &'a str)> {
    se.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.as_str(), c.reason.as_str(), c.message.as_str()))
}

/// Wait until `pred` holds on the ServiceExport (the adapter writes its status).
async fn until_export(
    api: &Api<ServiceExport>,
    name: &str,
    what: &str,
    pred: impl Fn(&ServiceExport) -> bool,
) -> ServiceExport {
    eventually(what, WITHIN, || async {
        let se = api
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("{what}: get {name}: {e}"));
        let seen = format!("{:?}", se.status);
        (pred(&se).then_some(se), seen)
    })
    .await
}

async fn until_import(
    api: &Api<ServiceImport>,
    name: &str,
    what: &str,
    pred: impl Fn(Option<&ServiceImport>) -> bool,
) -> Option<ServiceImport> {
    eventually(what, WITHIN, || async {
        let si = api
            .get_opt(name)
            .await
            .unwrap_or_else(|e| panic!("{what}: get {name}: {e}"));
        let seen = format!("{si:?}");
        (pred(si.as_ref()).then_some(si), seen)
    })
    .await
}

fn export_view(c: &Catalog, site: &str, svc: &str) -> Option<Vec<(String, bool)>> {
    let e = c
        .exports
        .get(&(ServiceKey::new("shop", svc), site.to_string()))?;
    Some(
        e.endpoints
            .iter()
            .map(|e| (e.address.to_string(), e.ready))
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_exported_in_east_is_imported_in_west_and_withdrawn_with_its_export() -> Result<()>
{
    let env = Env::start(&["east", "west"], ApiServerOptions::default()).await?;
    let east = env.admin("east").clone();
    let west = env.admin("west").clone();
    let mut a_east = env.adapter("east", "east-0").await?;
    let mut a_west = env.adapter("west", "west-0").await?;

    // A Service with mixed endpoints: ready, unknown (= ready), draining (serving and
    // terminating), gone (terminating, not serving), not ready.
    let svcs: Api<Service> = Api::namespaced(east.clone(), "shop");
    let slices: Api<EndpointSlice> = Api::namespaced(east.clone(), "shop");
    let exports: Api<ServiceExport> = Api::namespaced(east.clone(), "shop");
    svcs.create(
        &PostParams::default(),
        &service("web", false, &[("http", 80, 8080)]),
    )
    .await?;
    add_slice(
        &east,
        "web",
        "web-1",
        &[
            ("10.1.0.1", Some(true), Some(true), Some(false), None),
            ("10.1.0.2", None, None, None, None),
            ("10.1.0.3", Some(false), Some(true), Some(true), None),
            ("10.1.0.4", Some(false), Some(false), Some(true), None),
            ("10.1.0.5", Some(false), Some(false), None, None),
        ],
        &[("http", 8080)],
    )
    .await?;
    exports
        .create(&PostParams::default(), &service_export("web"))
        .await?;

    let took = env
        .until_catalog("east's export of shop/web", WITHIN, |c| {
            export_view(c, "east", "web").is_some()
        })
        .await?;
    let c = env.catalog.borrow().clone();
    assert_eq!(
        export_view(&c, "east", "web").unwrap(),
        vec![
            ("10.1.0.1".into(), true),
            ("10.1.0.2".into(), true),
            ("10.1.0.3".into(), false)
        ],
        "ready and unknown endpoints ready, the draining one listed not ready, the rest left out"
    );
    let export = &c.exports[&(ServiceKey::new("shop", "web"), "east".to_string())];
    assert_eq!(export.ports[0].target_port, 8080);
    println!("export in the registry {took:?} after the ServiceExport was created");

    let se = until_export(
        &exports,
        "web",
        "Ready=True on east's ServiceExport",
        |se| cond(se, "Ready").is_some_and(|c| c.0 == "True"),
    )
    .await;
    assert_eq!(cond(&se, "Valid").map(|c| c.0), Some("True"));
    assert_eq!(
        cond(&se, "Conflict").map(|c| (c.0, c.1)),
        Some(("False", "NoConflict"))
    );
    assert!(
        cond(&se, "Ready")
            .unwrap()
            .2
            .contains("3 endpoints, 2 ready"),
        "{:?}",
        cond(&se, "Ready")
    );

    // West imports it: a ServiceImport whose IP is the derived Service's ClusterIP, and an
    // EndpointSlice pointing at west's gateway on the port the gateway listens on for it.
    let imports: Api<ServiceImport> = Api::namespaced(west.clone(), "shop");
    let si = until_import(&imports, "web", "west's ServiceImport with an IP", |si| {
        si.is_some_and(|si| !si.spec.ips.is_empty())
    })
    .await
    .unwrap();
    assert_eq!(si.spec.type_, ServiceImportType::ClusterSetIP);
    assert_eq!(
        si.status.as_ref().map(|s| s
            .clusters
            .iter()
            .map(|c| c.cluster.clone())
            .collect::<Vec<_>>()),
        Some(vec!["east".to_string()])
    );
    assert_eq!(si.spec.ports.len(), 1);
    assert_eq!(si.spec.ports[0].port, 80);
    let derived = Api::<Service>::namespaced(west.clone(), "shop")
        .get("derived-web")
        .await?;
    let spec = derived.spec.clone().unwrap_or_default();
    assert_eq!(
        spec.cluster_ip.as_deref(),
        Some(si.spec.ips[0].as_str()),
        "the import's IP is the derived Service's ClusterIP"
    );
    assert!(spec.selector.is_none(), "a derived Service selects no pods");
    let owner = &derived
        .metadata
        .owner_references
        .clone()
        .unwrap_or_default()[0];
    assert_eq!(
        (
            owner.kind.as_str(),
            owner.name.as_str(),
            Some(owner.uid.as_str())
        ),
        ("ServiceImport", "web", si.metadata.uid.as_deref())
    );
    let west_slices: Api<EndpointSlice> = Api::namespaced(west.clone(), "shop");
    let ours = west_slices
        .list(&ListParams::default().labels("multicluster.kubernetes.io/service-name=web"))
        .await?;
    assert_eq!(
        ours.items.len(),
        1,
        "{:?}\nwest adapter:\n{}",
        ours.items,
        a_west.collect().join("\n")
    );
    let s = &ours.items[0];
    let labels = s.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels["kubernetes.io/service-name"], "derived-web");
    assert_eq!(
        labels["endpointslice.kubernetes.io/managed-by"],
        "kube-adapter.meshbridge.io"
    );
    assert_eq!(labels["multicluster.kubernetes.io/source-cluster"], "west");
    let gw_port = assign_ports(
        IMPORT_PORTS
            .parse::<PortRange>()
            .map_err(anyhow::Error::msg)?,
        &env.catalog.borrow(),
    )[&(ServiceKey::new("shop", "web"), 80)];
    assert_eq!(
        s.endpoints.clone().unwrap_or_default()[0].addresses,
        vec![gateway_ip("west")]
    );
    assert_eq!(
        s.ports.clone().unwrap_or_default()[0].port,
        Some(i32::from(gw_port))
    );
    assert!(
        Api::<ServiceImport>::namespaced(east.clone(), "shop")
            .get_opt("web")
            .await?
            .is_none(),
        "a cluster does not import what only it exports"
    );

    // Scale up: a new ready endpoint reaches the registry.
    add_slice(
        &east,
        "web",
        "web-2",
        &[("10.1.0.9", Some(true), None, None, None)],
        &[("http", 8080)],
    )
    .await?;
    env.until_catalog("scaled up", WITHIN, |c| {
        export_view(c, "east", "web").is_some_and(|v| v.contains(&("10.1.0.9".to_string(), true)))
    })
    .await?;
    // Scale down: the endpoint leaves the registry.
    slices.delete("web-2", &DeleteParams::default()).await?;
    env.until_catalog("scaled down", WITHIN, |c| {
        export_view(c, "east", "web").is_some_and(|v| !v.iter().any(|(a, _)| a == "10.1.0.9"))
    })
    .await?;

    // A headless service: west's imported EndpointSlice carries east's endpoints, so
    // scaling east up and down shows there.
    svcs.create(
        &PostParams::default(),
        &service("pg", true, &[("pg", 5432, 5432)]),
    )
    .await?;
    add_slice(
        &east,
        "pg",
        "pg-1",
        &[("10.1.1.1", Some(true), None, None, Some("pg-0"))],
        &[("pg", 5432)],
    )
    .await?;
    exports
        .create(&PostParams::default(), &service_export("pg"))
        .await?;
    let west_pg = |want: Vec<&'static str>| {
        let api: Api<EndpointSlice> = Api::namespaced(west.clone(), "shop");
        async move {
            let deadline = tokio::time::Instant::now() + WITHIN;
            loop {
                let list = api
                    .list(
                        &ListParams::default().labels("multicluster.kubernetes.io/service-name=pg"),
                    )
                    .await
                    .unwrap();
                let mut got: Vec<String> = list
                    .items
                    .iter()
                    .flat_map(|s| s.endpoints.clone().unwrap_or_default())
                    .flat_map(|e| e.addresses)
                    .collect();
                got.sort();
                if got == want {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "west's pg slices {got:?}, want {want:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    west_pg(vec!["10.1.1.1"]).await;
    add_slice(
        &east,
        "pg",
        "pg-2",
        &[("10.1.1.2", Some(true), None, None, Some("pg-1"))],
        &[("pg", 5432)],
    )
    .await?;
    west_pg(vec!["10.1.1.1", "10.1.1.2"]).await;
    slices.delete("pg-1", &DeleteParams::default()).await?;
    west_pg(vec!["10.1.1.2"]).await;

    // West exports the same name with an incompatible port: the later export (west's)
    // gets Conflict=True naming the winner; east's stays without a conflict.
    let west_svcs: Api<Service> = Api::namespaced(west.clone(), "shop");
    west_svcs
        .create(
            &PostParams::default(),
            &service("web", false, &[("http", 81, 8081)]),
        )
        .await?;
    let west_exports: Api<ServiceExport> = Api::namespaced(west.clone(), "shop");
    west_exports
        .create(&PostParams::default(), &service_export("web"))
        .await?;
    let se = until_export(
        &west_exports,
        "web",
        "Conflict=True on west's ServiceExport",
        |se| cond(se, "Conflict").is_some_and(|c| c.0 == "True"),
    )
    .await;
    let (_, reason, message) = cond(&se, "Conflict").unwrap();
    assert_eq!(reason, "PortConflict");
    assert!(
        message.contains("east") && message.contains("80"),
        "{message}"
    );
    let se = exports.get("web").await?;
    assert_eq!(cond(&se, "Conflict").map(|c| c.0), Some("False"));
    west_exports.delete("web", &DeleteParams::default()).await?;

    // A ServiceExport with no Service: Valid=False, NoService; nothing in the registry.
    exports
        .create(&PostParams::default(), &service_export("ghost"))
        .await?;
    let se = until_export(
        &exports,
        "ghost",
        "Valid=False on a ServiceExport without Service",
        |se| cond(se, "Valid").is_some_and(|c| c.0 == "False"),
    )
    .await;
    assert_eq!(cond(&se, "Valid").map(|c| c.1), Some("NoService"));
    assert!(
        env.catalog
            .borrow()
            .exports
            .keys()
            .all(|(k, _)| k.name != "ghost")
    );

    // An object the adapter did not create is left alone: a hand-made ServiceImport in
    // west for a service east exports.
    let mut foreign = ServiceImport::new("legacy", Default::default());
    foreign.spec.type_ = ServiceImportType::Headless;
    imports.create(&PostParams::default(), &foreign).await?;
    svcs.create(
        &PostParams::default(),
        &service("legacy", false, &[("tcp", 9000, 9000)]),
    )
    .await?;
    exports
        .create(&PostParams::default(), &service_export("legacy"))
        .await?;
    env.until_catalog("legacy exported", WITHIN, |c| {
        export_view(c, "east", "legacy").is_some()
    })
    .await?;
    // The adapter has seen the catalog with `legacy` once it has written the ServiceExport's
    // Ready condition; by then west's adapter has had the same catalog.
    until_export(&exports, "legacy", "legacy Ready", |se| {
        cond(se, "Ready").is_some_and(|c| c.0 == "True")
    })
    .await;
    let mut logs = a_west.wait_for("legacy", WITHIN).await?;
    logs.push_str("");
    assert!(logs.contains("not created by meshbridge"), "{logs}");
    let after = imports.get("legacy").await?;
    assert_eq!(
        after.spec.type_,
        ServiceImportType::Headless,
        "the hand-made import was not changed"
    );
    assert!(after.metadata.labels.unwrap_or_default().is_empty());

    // The ServiceExport deleted: withdrawn from the registry, west's import objects removed.
    exports.delete("web", &DeleteParams::default()).await?;
    env.until_catalog("web withdrawn", WITHIN, |c| {
        export_view(c, "east", "web").is_none()
    })
    .await?;
    until_import(&imports, "web", "west's import of web removed", |si| {
        si.is_none()
    })
    .await;
    assert!(
        Api::<Service>::namespaced(west.clone(), "shop")
            .get_opt("derived-web")
            .await?
            .is_none()
    );
    let left = west_slices
        .list(&ListParams::default().labels("multicluster.kubernetes.io/service-name=web"))
        .await?;
    assert!(left.items.is_empty(), "{:?}", left.items);

    a_east.terminate(Duration::from_secs(5)).await;
    a_west.terminate(Duration::from_secs(5)).await;
    env.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coredns_multicluster_answers_from_the_imports_the_adapter_writes() -> Result<()> {
    let env = Env::start(&["east", "west"], ApiServerOptions::default()).await?;
    let mut a_east = env.adapter("east", "east-0").await?;
    let mut a_west = env.adapter("west", "west-0").await?;
    export_service(env.admin("east"), "web", &["10.1.0.1"]).await?;
    let imports: Api<ServiceImport> = Api::namespaced(env.admin("west").clone(), "shop");
    let si = until_import(&imports, "web", "west's import", |si| {
        si.is_some_and(|si| !si.spec.ips.is_empty())
    })
    .await
    .unwrap();

    // CoreDNS built from its Go module, `kubernetes` plugin with `multicluster`, reading
    // west's API server with a token.
    let coredns = meshbridge_testkit::kube::tool("coredns")?;
    let port = free_port();
    let corefile = env.root.join("Corefile");
    let kubeconfig = env.clusters["west"].api.kubeconfig("admin")?;
    std::fs::write(
        &corefile,
        format!(
            ".:{port} {{\n  bind 127.0.0.1\n  kubernetes cluster.local clusterset.local {{\n    kubeconfig {} west\n    multicluster clusterset.local\n  }}\n}}\n",
            kubeconfig.display()
        ),
    )?;
    let mut cmd = tokio::process::Command::new(coredns);
    cmd.arg("-conf").arg(&corefile);
    let mut dns = meshbridge_testkit::process::Proc::spawn("coredns", cmd)?;
    dns.wait_for("CoreDNS-", READY).await?;
    let server: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let want: std::net::Ipv4Addr = si.spec.ips[0].parse()?;
    let deadline = tokio::time::Instant::now() + WITHIN;
    let mut last;
    loop {
        match dig_a(server, "web.shop.svc.clusterset.local").await {
            Ok(ips) if ips == vec![want] => break,
            other => last = Some(format!("{other:?}")),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "CoreDNS never answered {want} for web.shop.svc.clusterset.local (last: {last:?}); log:\n{}",
            dns.collect().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("CoreDNS answers web.shop.svc.clusterset.local = {want} (the ServiceImport's IP)");

    // `meshbridge dns` of site west answers the same address: west's adapter reports the
    // ClusterSetIP to the registry as west's import address, and every replica of west
    // answers it (east has the endpoints and no import).
    let (mut mdns, mdns_addr) = env.start_dns("west").await?;
    let ip = IpAddr::V4(want);
    env.until_catalog("west's import address in the registry", WITHIN, |c| {
        c.import(&ServiceKey::new("shop", "web"), "west")
            .is_some_and(|i| i.ips == vec![ip])
    })
    .await?;
    eventually(
        "meshbridge dns (west) answers the ClusterSetIP",
        WITHIN,
        || async {
            let got = dig_a(mdns_addr, "web.shop.svc.clusterset.local").await;
            let seen = format!("{got:?}");
            (got.is_ok_and(|ips| ips == vec![want]).then_some(()), seen)
        },
    )
    .await;
    println!("meshbridge dns (west) answers web.shop.svc.clusterset.local = {want} as well");

    // The import withdrawn: CoreDNS stops answering, and so does meshbridge dns.
    Api::<ServiceExport>::namespaced(env.admin("east").clone(), "shop")
        .delete("web", &DeleteParams::default())
        .await?;
    until_import(&imports, "web", "import removed", |si| si.is_none()).await;
    for (who, server) in [("CoreDNS", server), ("meshbridge dns", mdns_addr)] {
        eventually(
            &format!("{who} stops answering a removed import"),
            WITHIN,
            || async {
                let got = dig_a(server, "web.shop.svc.clusterset.local").await;
                let seen = format!("{got:?}");
                (got.is_ok_and(|ips| ips.is_empty()).then_some(()), seen)
            },
        )
        .await;
    }
    env.until_catalog("west's import address removed", WITHIN, |c| {
        c.imports.is_empty()
    })
    .await?;
    mdns.terminate(Duration::from_secs(5)).await;
    dns.terminate(Duration::from_secs(5)).await;
    a_east.terminate(Duration::from_secs(5)).await;
    a_west.terminate(Duration::from_secs(5)).await;
    env.stop().await;
    Ok(())
}

/// Run `meshbridge kube` with `kubeconfig` (no API server or registry needed to fail).
fn adapter_config_with(dir: &std::path::Path, kubeconfig: &std::path::Path) -> std::path::PathBuf {
    let pki = meshbridge_testkit::pki::TestPki::new(TD);
    let files = pki.issue("adapter", &format!("spiffe://{TD}/site/east/adapter"));
    let mut cfg = meshbridge_federation::kube::config::Config::new(
        "east",
        TD,
        ["https://127.0.0.1:1"],
        files,
    );
    cfg.kubeconfig = Some(kubeconfig.to_path_buf());
    let path = meshbridge_testkit::process::write_config(&dir.join("kube.toml"), &cfg).unwrap();
    // The PKI's files must outlive the process: keep its dir.
    std::mem::forget(pki);
    path
}

#[tokio::test]
async fn a_missing_or_bad_kubeconfig_is_named_and_an_unreachable_api_server_is_retried()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    // Missing.
    let missing = dir.path().join("no-such-kubeconfig");
    let cfg = adapter_config_with(dir.path(), &missing);
    let out = tokio::process::Command::new(exe())
        .args(["kube", "--config"])
        .arg(&cfg)
        .output()
        .await?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&missing.display().to_string()) && err.contains("cannot read"),
        "{err}"
    );
    // Not a kubeconfig.
    let bad = dir.path().join("bad-kubeconfig");
    std::fs::write(&bad, "clusters: [this is not: a kubeconfig")?;
    let cfg = adapter_config_with(dir.path(), &bad);
    let out = tokio::process::Command::new(exe())
        .args(["kube", "--config"])
        .arg(&cfg)
        .output()
        .await?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&bad.display().to_string()), "{err}");
    // An API server that is not there: a clear error, and it keeps trying.
    let port = free_port();
    let unreachable = dir.path().join("kubeconfig-unreachable");
    std::fs::write(
        &unreachable,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:{port}\n    insecure-skip-tls-verify: true\n\
             users:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n"
        ),
    )?;
    let cfg = adapter_config_with(dir.path(), &unreachable);
    let mut p = spawn("adapter", &["kube", "--config", cfg.to_str().unwrap()]);
    p.wait_for("cannot reach the Kubernetes API server; retrying", WITHIN)
        .await?;
    p.wait_for("cannot reach the Kubernetes API server; retrying", WITHIN)
        .await?;
    assert!(!p.exited(), "the adapter gave up");
    assert!(!p.log.iter().any(|l| l.contains("export updated")));
    p.terminate(Duration::from_secs(5)).await;
    Ok(())
}
