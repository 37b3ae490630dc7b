//! The agent's configuration: the documented example (`deploy/agent.toml`) loads as is, and
//! a bad file gets every problem named by its field at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use meshbridge_core::config::parse_with_env;
use meshbridge_core::model::SiteKind;
use meshbridge_core::pki::Ca;
use meshbridge_federation::agent::Config;
use meshbridge_federation::agent::health::Probe;

const EXAMPLE: &str = include_str!("../../deploy/agent.toml");

#[test]
fn the_documented_example_loads_with_its_defaults() {
    let cfg: Config = parse_with_env("deploy/agent.toml", EXAMPLE, &[]).unwrap();
    assert_eq!(cfg.site, "vm-billing-01");
    assert_eq!(cfg.registry.len(), 3);
    assert_eq!(cfg.services.len(), 2);
    assert!(matches!(
        cfg.services[0].check.as_ref().unwrap().probe,
        Probe::Http { .. }
    ));
    assert_eq!(cfg.services[1].address.to_string(), "127.0.0.1");
    assert_eq!(cfg.vip_range.to_string(), "127.240.0.0/16");

    let dns = cfg.dns().unwrap();
    assert_eq!(
        dns.site, "vm-billing-01",
        "the stub answers as the agent's site"
    );
    assert_eq!(dns.vip_range, Some(cfg.vip_range));
    let gw = cfg.gateway();
    assert_eq!(gw.listeners.vip_range, Some(cfg.vip_range));
    assert_eq!(gw.data_dir, cfg.data_dir);
    let spec = cfg.site_spec("0.0.0.0:15008".parse().unwrap());
    assert_eq!(spec.kind, SiteKind::Vm);
    assert_eq!(spec.gateways, vec!["10.1.2.3:15008".to_string()]);
    assert_eq!(spec.locality.zone, "eu-west-1a");
    let files = cfg.joined_files();
    assert_eq!(
        files.cert, files.key,
        "key and chain share one atomically written file"
    );
}

#[test]
fn environment_overrides_apply() {
    let env = [(
        "MESHBRIDGE_TUNNEL__LISTEN".to_string(),
        "127.0.0.1:25008".to_string(),
    )];
    let cfg: Config = parse_with_env("agent.toml", EXAMPLE, &env).unwrap();
    assert_eq!(cfg.tunnel.listen, "127.0.0.1:25008");
}

#[test]
fn every_problem_is_named_by_its_field() {
    let other = Ca::generate("other.example", Duration::from_secs(3600)).unwrap();
    let (_, gateway_token) = other
        .mint_join_token("someone-else", "gateway", Duration::from_secs(3600))
        .unwrap();
    let text = format!(
        r#"
site = "VM 1"
trust_domain = "Corp!"
registry = ["ftp://x:1", "https://nohost"]
data_dir = ""
join_token = "{gateway_token}"
colour = "blue"

[tls]
cert = "/c"
key = "/k"
bundle = "/b"

[tunnel]
listen = "0.0.0.0:15008"
keepalive_ms = 0

[dns]
site = "elsewhere"
listen = "nowhere"

[[services]]
namespace = "billing"
name = "Invoices!"
ports = [{{ name = "http", port = 0 }}]

[services.check]
kind = "http"
address = "127.0.0.1:8080"
path = "healthz"
interval_ms = 50

[[services]]
namespace = "billing"
name = "Invoices!"
ports = [{{ name = "http", port = 80 }}]
"#
    );
    let err = parse_with_env::<Config>("agent.toml", &text, &[]).unwrap_err();
    let fields: Vec<&str> = err.problems.iter().map(|p| p.field.as_str()).collect();
    for want in [
        "colour",
        "site",
        "trust_domain",
        "registry[0]",
        "registry[1]",
        "data_dir",
        "tls",
        "bundle",
        "join_token",
        "services[0]",
        "services[0].check.interval_ms",
        "services[0].check.path",
        "services[1]",
        "dns.site",
        "dns.listen",
        "tunnel.keepalive_ms",
        "advertise",
    ] {
        assert!(
            fields.contains(&want),
            "{want} missing from {fields:?}\n{err}"
        );
    }
    let token: Vec<&str> = err
        .problems
        .iter()
        .filter(|p| p.field == "join_token")
        .map(|p| p.message.as_str())
        .collect();
    assert_eq!(token.len(), 3, "site, trust domain and role: {token:?}");
}
