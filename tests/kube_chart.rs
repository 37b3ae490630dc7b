//! The Helm chart against a real API server: every object `helm template` renders (helm
//! built from its Go module) passes a server-side dry-run; the adapter running with a
//! token bound only to the chart's RBAC exports and imports, and is refused what it has no
//! need for.

#![allow(clippy::unwrap_used)]

#[path = "kube/env.rs"]
mod env;

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use env::*;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{Discovery, Scope};
use meshbridge_federation::kube::crd::ServiceImport;
use meshbridge_testkit::kube::ApiServerOptions;

const WITHIN: Duration = Duration::from_secs(30);

/// `helm template` of the chart with `sets`, as objects.
async fn render(sets: &[&str]) -> Result<Vec<DynamicObject>> {
    let helm = meshbridge_testkit::kube::tool("helm")?;
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/helm/meshbridge");
    let mut cmd = tokio::process::Command::new(helm);
    cmd.args(["template", "meshbridge"])
        .arg(&chart)
        .args(["--namespace", "meshbridge"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().await?;
    if !out.status.success() {
        bail!("helm template: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8(out.stdout)?;
    let mut objects = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_yaml::Value::deserialize(doc)?;
        if v.is_null() {
            continue;
        }
        objects.push(serde_yaml::from_value::<DynamicObject>(v)?);
    }
    Ok(objects)
}

use serde::Deserialize;

/// Server-side apply each object (a dry run unless `for_real`), as a cluster would take it.
async fn apply(
    client: &kube::Client,
    objects: &[DynamicObject],
    for_real: bool,
) -> Result<Vec<String>> {
    let discovery = Discovery::new(client.clone()).run().await?;
    let mut applied = Vec::new();
    for o in objects {
        let types = o.types.clone().context("object without apiVersion/kind")?;
        let gvk = GroupVersionKind::try_from(&types)?;
        let (ar, caps) = discovery
            .resolve_gvk(&gvk)
            .with_context(|| format!("the API server does not serve {gvk:?}"))?;
        let name = o.metadata.name.clone().context("object without a name")?;
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Namespaced => Api::namespaced_with(client.clone(), "meshbridge", &ar),
            Scope::Cluster => Api::all_with(client.clone(), &ar),
        };
        let mut pp = PatchParams::apply("chart-test").force();
        if !for_real {
            pp = pp.dry_run();
        }
        api.patch(&name, &pp, &Patch::Apply(o))
            .await
            .with_context(|| format!("{} {name} refused by the API server", types.kind))?;
        applied.push(format!("{}/{name}", types.kind));
    }
    Ok(applied)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rendered_object_is_accepted_and_the_charts_rbac_is_enough_and_no_more() -> Result<()>
{
    let env = Env::start(&["east", "west"], ApiServerOptions::default()).await?;
    let base = ["site.name=east", "trustDomain=kube.example"];
    let external = [
        &base[..],
        &["registry.urls={https://registry.example:7443}"],
    ]
    .concat();
    let bundled = [&base[..], &["registry.enabled=true"]].concat();
    for sets in [&external, &bundled] {
        let objects = render(sets).await?;
        let kinds = apply(env.admin("east"), &objects, false).await?;
        println!(
            "dry-run accepted {} objects ({sets:?}): {kinds:?}",
            kinds.len()
        );
        for want in [
            "Deployment/meshbridge-gateway",
            "Deployment/meshbridge-kube-adapter",
            "PodDisruptionBudget/meshbridge-gateway",
            "ClusterRole/meshbridge-kube-adapter",
            "Role/meshbridge-kube-adapter",
        ] {
            assert!(
                kinds.iter().any(|k| k == want),
                "{want} not rendered: {kinds:?}"
            );
        }
    }
    assert!(
        render(&bundled)
            .await?
            .iter()
            .any(|o| o.types.as_ref().is_some_and(|t| t.kind == "StatefulSet"))
    );
    assert!(
        render(&base)
            .await
            .unwrap_err()
            .to_string()
            .contains("registry.urls"),
        "a missing required value is named"
    );

    // The chart's RBAC, for real, in both clusters; the adapters run as its ServiceAccount.
    let rbac: Vec<DynamicObject> = render(&external)
        .await?
        .into_iter()
        .filter(|o| {
            o.types.as_ref().is_some_and(|t| {
                matches!(
                    t.kind.as_str(),
                    "ServiceAccount"
                        | "ClusterRole"
                        | "ClusterRoleBinding"
                        | "Role"
                        | "RoleBinding"
                )
            })
        })
        .collect();
    let user = "system:serviceaccount:meshbridge:meshbridge-kube-adapter";
    let mut adapters = Vec::new();
    for site in ["east", "west"] {
        apply(env.admin(site), &rbac, true).await?;
        let kc = env.clusters[site].api.kubeconfig(user)?;
        adapters.push(
            env.adapter_with(site, &format!("{site}-rbac"), &kc)
                .await?
                .0,
        );
    }
    export_service(env.admin("east"), "web", &["10.1.0.1"]).await?;
    env.until_catalog("exported with the chart's RBAC", WITHIN, |c| {
        exported(c, "east", "web").is_some()
    })
    .await?;
    let imports: Api<ServiceImport> = Api::namespaced(env.admin("west").clone(), "shop");
    let deadline = tokio::time::Instant::now() + WITHIN;
    while imports
        .get_opt("web")
        .await?
        .is_none_or(|si| si.spec.ips.is_empty())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no import with the chart's RBAC; adapter:\n{}",
            adapters[1].collect().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What it has no need for is refused.
    let restricted = env.clusters["east"].api.client(user).await?;
    let err = Api::<Secret>::namespaced(restricted.clone(), "meshbridge")
        .list(&Default::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 403),
        "secrets: {err}"
    );
    let err = Api::<k8s_openapi::api::core::v1::Pod>::all(restricted)
        .list(&Default::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 403),
        "pods: {err}"
    );
    for mut a in adapters {
        a.terminate(Duration::from_secs(5)).await;
    }
    env.stop().await;
    Ok(())
}

/// With no `site.region`/`site.zone`, a gateway of the chart places its site by its Node's
/// `topology.kubernetes.io/*` labels: the real API server copies them onto the pod when it
/// is bound to a Node (PodTopologyLabels admission), the pod's downward-API environment
/// (resolved here from the pod as the kubelet would: no kubelet runs) overrides the
/// gateway's `[register]` region and zone, and the registry shows the site there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_takes_its_sites_region_and_zone_from_its_nodes_topology_labels() -> Result<()> {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{Node, Pod};
    use kube::api::{ObjectMeta, PostParams};

    let env = Env::start(&["east"], ApiServerOptions::default()).await?;
    let admin = env.admin("east").clone();
    let node = Node {
        metadata: ObjectMeta {
            name: Some("node-a".into()),
            labels: Some(
                [
                    ("topology.kubernetes.io/region", "eu-west"),
                    ("topology.kubernetes.io/zone", "eu-west-1b"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Node>::all(admin.clone())
        .create(&PostParams::default(), &node)
        .await?;

    // The chart's gateway pod, as its Deployment would create it, bound to node-a.
    let sets = [
        "site.name=east",
        "trustDomain=kube.example",
        "registry.urls={https://registry.example:7443}",
    ];
    let deployment = render(&sets)
        .await?
        .into_iter()
        .find(|o| {
            o.types.as_ref().is_some_and(|t| t.kind == "Deployment")
                && o.metadata.name.as_deref() == Some("meshbridge-gateway")
        })
        .context("no gateway Deployment rendered")?;
    let deployment: Deployment = serde_json::from_value(serde_json::to_value(&deployment)?)?;
    let template = deployment.spec.template;
    let mut spec = template.spec.context("pod template without spec")?;
    spec.node_name = Some("node-a".into());
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some("meshbridge-gateway-test".into()),
            namespace: Some("meshbridge".into()),
            ..template.metadata.unwrap_or_default()
        },
        spec: Some(spec),
        ..Default::default()
    };
    let pod = Api::<Pod>::namespaced(admin.clone(), "meshbridge")
        .create(&PostParams::default(), &pod)
        .await?;
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels
            .get("topology.kubernetes.io/region")
            .map(String::as_str),
        Some("eu-west"),
        "the API server did not copy the Node's topology labels onto the pod: {labels:?}"
    );

    // The gateway container's environment, resolved as the kubelet does.
    let container = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.iter().find(|c| c.name == "gateway"))
        .context("no gateway container")?;
    let mut vars = Vec::new();
    for var in container.env.iter().flatten() {
        let Some(path) = var
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str())
        else {
            continue;
        };
        if let Some(label) = path
            .strip_prefix("metadata.labels['")
            .and_then(|r| r.strip_suffix("']"))
        {
            let value = labels.get(label).cloned().unwrap_or_default();
            vars.push((var.name.clone(), value));
        }
    }
    vars.sort();
    assert_eq!(
        vars,
        vec![
            (
                "MESHBRIDGE_REGISTER__REGION".to_string(),
                "eu-west".to_string()
            ),
            (
                "MESHBRIDGE_REGISTER__ZONE".to_string(),
                "eu-west-1b".to_string()
            ),
        ]
    );

    // A gateway with that environment (its config file says region "r-east") places the
    // site where its Node is.
    let mut gw = start_gateway_env(
        &env.pki,
        &env.registry_urls,
        "east",
        "gw-east-node-a",
        "127.0.0.1",
        &vars,
    )
    .await?;
    env.until_catalog("east placed by its Node's labels", WITHIN, |c| {
        c.site("east").is_some_and(|s| {
            s.locality.region == "eu-west"
                && s.locality.zone == "eu-west-1b"
                && s.instances.iter().any(|i| i.name == "gw-east-node-a")
        })
    })
    .await?;

    // An explicit site.region wins: the chart then takes only the zone from the Node.
    let with_region = [&sets[..], &["site.region=eu-central"]].concat();
    let rendered = serde_json::to_string(&render(&with_region).await?)?;
    assert!(!rendered.contains("MESHBRIDGE_REGISTER__REGION"));
    assert!(rendered.contains("MESHBRIDGE_REGISTER__ZONE"));
    gw.terminate(Duration::from_secs(5)).await;
    env.stop().await;
    Ok(())
}
