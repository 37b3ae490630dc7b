//! Stateless validation of commands. Every refusal names the field
//! (`export.endpoints[2].address`) and says what is wrong with it.
//!
//! [`Catalog::apply`](super::Catalog::apply) runs these first; the API layer may run them
//! before proposing, to refuse bad input without a round through the Raft log.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use super::apply::{Command, Rejection};
use super::types::*;

/// Longest site, namespace, service, port and endpoint host name (an RFC 1123 label).
pub const MAX_LABEL_LEN: usize = 63;
/// Longest policy name (an RFC 1123 subdomain) and gateway host name.
pub const MAX_SUBDOMAIN_LEN: usize = 253;
/// Longest locality region or zone.
pub const MAX_LOCALITY_LEN: usize = 63;
pub const MAX_ENDPOINTS: usize = 10_000;
pub const MAX_PORTS: usize = 256;
pub const MAX_GATEWAYS: usize = 64;
pub const MAX_PRINCIPALS: usize = 256;
/// Longest SPIFFE id (endpoint identity, policy principal).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
pub const MAX_TOKEN_ID_LEN: usize = 256;

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Rejection {
    Rejection::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Whether `s` is a lowercase RFC 1123 label: 1 to 63 of `a-z`, `0-9`, `-`, starting and
/// ending with a letter or digit.
pub fn is_dns_label(s: &str) -> bool {
    check_label(s).is_ok()
}

fn check_label(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > MAX_LABEL_LEN {
        return Err(format!(
            "must be at most {MAX_LABEL_LEN} characters (got {})",
            s.len()
        ));
    }
    let ok_chars = s
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-');
    if !ok_chars || s.starts_with('-') || s.ends_with('-') {
        return Err(format!(
            "{s:?} is not a lowercase RFC 1123 label (a-z, 0-9 and '-', starting and ending with a letter or digit)"
        ));
    }
    Ok(())
}

/// A lowercase RFC 1123 subdomain: labels joined by dots, at most 253 characters.
fn check_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > MAX_SUBDOMAIN_LEN {
        return Err(format!(
            "must be at most {MAX_SUBDOMAIN_LEN} characters (got {})",
            s.len()
        ));
    }
    if s.split('.').any(|l| check_label(l).is_err()) {
        return Err(format!(
            "{s:?} is not a lowercase RFC 1123 subdomain (dot-separated labels of a-z, 0-9 and '-')"
        ));
    }
    Ok(())
}

/// A gateway address: `ip:port`, `[ipv6]:port` or `hostname:port`, port 1..=65535.
fn check_host_port(s: &str) -> Result<(), String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        if addr.ip().is_unspecified() {
            return Err(format!(
                "{s:?}: an unspecified address cannot be reached by peers"
            ));
        }
        if addr.port() == 0 {
            return Err(format!("{s:?}: port must be in 1..=65535"));
        }
        return Ok(());
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("{s:?} is not host:port"));
    };
    if host.contains(':') || host.starts_with('[') {
        return Err(format!(
            "{s:?} is not host:port (write IPv6 addresses as [addr]:port)"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p >= 1 => {}
        _ => return Err(format!("{s:?}: port {port:?} is not in 1..=65535")),
    }
    let host_ok = !host.is_empty()
        && host.len() <= MAX_SUBDOMAIN_LEN
        && host
            .split('.')
            .all(|l| check_label(&l.to_ascii_lowercase()).is_ok());
    if !host_ok {
        return Err(format!(
            "{s:?}: {host:?} is neither an IP address nor a host name"
        ));
    }
    Ok(())
}

fn check_endpoint_address(ip: IpAddr) -> Result<(), String> {
    let bad = ip.is_unspecified()
        || ip.is_multicast()
        || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if bad {
        return Err(format!("{ip} is not a unicast address"));
    }
    Ok(())
}

fn check_locality_part(s: &str) -> Result<(), String> {
    if s.len() > MAX_LOCALITY_LEN {
        return Err(format!(
            "must be at most {MAX_LOCALITY_LEN} characters (got {})",
            s.len()
        ));
    }
    if !s
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    {
        return Err(format!(
            "{s:?} may only contain letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

fn check_spiffe_id(s: &str) -> Result<(), String> {
    if s.len() > MAX_SPIFFE_ID_LEN {
        return Err(format!(
            "must be at most {MAX_SPIFFE_ID_LEN} characters (got {})",
            s.len()
        ));
    }
    let rest = s
        .strip_prefix("spiffe://")
        .ok_or_else(|| format!("{s:?} is not a spiffe:// id"))?;
    let td = rest.split('/').next().unwrap_or_default();
    check_trust_domain(td).map_err(|r| format!("{s:?}: trust domain {r}"))
}

fn check_trust_domain(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"-._".contains(&c));
    if !ok {
        return Err(format!(
            "{s:?} is not a trust domain (a-z, 0-9, '-', '.', '_')"
        ));
    }
    Ok(())
}

fn check_token_id(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > MAX_TOKEN_ID_LEN {
        return Err(format!(
            "must be at most {MAX_TOKEN_ID_LEN} characters (got {})",
            s.len()
        ));
    }
    if !s.bytes().all(|c| c.is_ascii_graphic()) {
        return Err("may only contain printable ASCII without spaces".into());
    }
    Ok(())
}

fn too_many(what: &str, max: usize, got: usize) -> String {
    format!("at most {max} {what} (got {got})")
}

fn service_key(key: &ServiceKey, p: &str) -> Result<(), Rejection> {
    check_label(&key.namespace).map_err(|r| invalid(format!("{p}.namespace"), r))?;
    check_label(&key.name).map_err(|r| invalid(format!("{p}.name"), r))
}

/// An ownership scope: a namespace `ns` or a service `ns/name`.
fn check_scope(scope: &str) -> Result<(), Rejection> {
    match scope.split_once('/') {
        Some((ns, name)) => service_key(&ServiceKey::new(ns, name), "scope"),
        None => check_label(scope).map_err(|r| invalid("scope", r)),
    }
}

impl ServiceKey {
    /// Both parts are RFC 1123 labels (fields `service.namespace`, `service.name`).
    pub fn validate(&self) -> Result<(), Rejection> {
        service_key(self, "service")
    }
}

/// A gateway instance name: empty, or a DNS subdomain (a pod or host name).
fn check_instance(name: &str) -> Result<(), String> {
    if name.len() > 253 {
        return Err(format!("{} characters, at most 253", name.len()));
    }
    if name
        .split('.')
        .any(|part| !part.is_empty() && check_label(part).is_err())
        || name.starts_with('.')
        || name.ends_with('.')
        || name.contains("..")
    {
        return Err(format!("{name:?} is not a DNS name (a-z 0-9 - .)"));
    }
    Ok(())
}

impl SiteSpec {
    /// Fields are named as in [`Command::RegisterSite`]: `spec.gateways[1]`.
    pub fn validate(&self) -> Result<(), Rejection> {
        check_label(&self.name).map_err(|r| invalid("spec.name", r))?;
        check_locality_part(&self.locality.region)
            .map_err(|r| invalid("spec.locality.region", r))?;
        check_locality_part(&self.locality.zone).map_err(|r| invalid("spec.locality.zone", r))?;
        if self.gateways.len() > MAX_GATEWAYS {
            return Err(invalid(
                "spec.gateways",
                too_many("gateways", MAX_GATEWAYS, self.gateways.len()),
            ));
        }
        for (i, gw) in self.gateways.iter().enumerate() {
            check_host_port(gw).map_err(|r| invalid(format!("spec.gateways[{i}]"), r))?;
            if let Some(j) = self.gateways[..i].iter().position(|g| g == gw) {
                return Err(invalid(
                    format!("spec.gateways[{i}]"),
                    format!("duplicate of spec.gateways[{j}]"),
                ));
            }
        }
        if self.lease_ttl_ms == 0 {
            return Err(invalid("spec.lease_ttl_ms", "must be greater than 0"));
        }
        check_instance(&self.instance).map_err(|r| invalid("spec.instance", r))?;
        Ok(())
    }
}

impl Export {
    /// Fields are named as in [`Command::PutExport`]: `export.endpoints[2].address`.
    pub fn validate(&self) -> Result<(), Rejection> {
        check_label(&self.site).map_err(|r| invalid("export.site", r))?;
        service_key(&self.service, "export.service")?;
        self.validate_ports()?;
        self.validate_endpoints()
    }

    fn validate_ports(&self) -> Result<(), Rejection> {
        let n = self.ports.len();
        if n > MAX_PORTS {
            return Err(invalid("export.ports", too_many("ports", MAX_PORTS, n)));
        }
        if n == 0 && !self.headless {
            return Err(invalid(
                "export.ports",
                "a service that is not headless needs at least one port",
            ));
        }
        let mut names: BTreeMap<&str, usize> = BTreeMap::new();
        let mut numbers: BTreeMap<(u16, Protocol), usize> = BTreeMap::new();
        for (i, port) in self.ports.iter().enumerate() {
            let f = |leaf: &str| format!("export.ports[{i}].{leaf}");
            if port.name.is_empty() {
                if n > 1 {
                    return Err(invalid(
                        f("name"),
                        "required when an export has more than one port",
                    ));
                }
            } else {
                check_label(&port.name).map_err(|r| invalid(f("name"), r))?;
            }
            if let Some(j) = names.insert(&port.name, i) {
                return Err(invalid(
                    f("name"),
                    format!("{:?} is a duplicate of export.ports[{j}].name", port.name),
                ));
            }
            if port.port == 0 {
                return Err(invalid(f("port"), "must be in 1..=65535"));
            }
            if port.target_port == 0 {
                return Err(invalid(f("target_port"), "must be in 1..=65535"));
            }
            if let Some(a) = &port.app_protocol
                && (a.is_empty()
                    || a.len() > 316
                    || !a
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b)))
            {
                return Err(invalid(
                    f("app_protocol"),
                    format!(
                        "{a:?}: at most 316 of a-z A-Z 0-9 - _ . / (like Kubernetes appProtocol)"
                    ),
                ));
            }
            if let Some(j) = numbers.insert((port.port, port.protocol), i) {
                return Err(invalid(
                    f("port"),
                    format!(
                        "{}/{} is a duplicate of export.ports[{j}]",
                        port.port, port.protocol
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_endpoints(&self) -> Result<(), Rejection> {
        let n = self.endpoints.len();
        if n > MAX_ENDPOINTS {
            return Err(invalid(
                "export.endpoints",
                too_many("endpoints", MAX_ENDPOINTS, n),
            ));
        }
        let mut addresses: BTreeMap<IpAddr, usize> = BTreeMap::new();
        let mut hostnames: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, ep) in self.endpoints.iter().enumerate() {
            let f = |leaf: &str| format!("export.endpoints[{i}].{leaf}");
            check_endpoint_address(ep.address).map_err(|r| invalid(f("address"), r))?;
            if let Some(j) = addresses.insert(ep.address, i) {
                return Err(invalid(
                    f("address"),
                    format!(
                        "{} is a duplicate of export.endpoints[{j}].address",
                        ep.address
                    ),
                ));
            }
            if let Some(h) = &ep.hostname {
                check_label(h).map_err(|r| invalid(f("hostname"), r))?;
                if let Some(j) = hostnames.insert(h, i) {
                    return Err(invalid(
                        f("hostname"),
                        format!("{h:?} is a duplicate of export.endpoints[{j}].hostname"),
                    ));
                }
            }
            if ep.ready && ep.weight == 0 {
                return Err(invalid(
                    f("weight"),
                    "must be at least 1 for a ready endpoint",
                ));
            }
            if let Some(id) = &ep.identity {
                check_spiffe_id(id).map_err(|r| invalid(f("identity"), r))?;
            }
            if let Some(z) = &ep.zone {
                check_locality_part(z).map_err(|r| invalid(f("zone"), r))?;
            }
        }
        Ok(())
    }
}

impl Import {
    /// Fields are named as in [`Command::PutImport`]: `import.ips[1]`.
    pub fn validate(&self) -> Result<(), Rejection> {
        check_label(&self.site).map_err(|r| invalid("import.site", r))?;
        service_key(&self.service, "import.service")?;
        if self.ips.len() > 2 {
            return Err(invalid(
                "import.ips",
                too_many("addresses (one per family)", 2, self.ips.len()),
            ));
        }
        for (i, ip) in self.ips.iter().enumerate() {
            let f = format!("import.ips[{i}]");
            check_endpoint_address(*ip).map_err(|r| invalid(&f, r))?;
            if self.ips[..i].iter().any(|o| o.is_ipv4() == ip.is_ipv4()) {
                return Err(invalid(f, format!("{ip}: a second address of its family")));
            }
        }
        Ok(())
    }
}

impl Policy {
    /// Fields are named as in [`Command::PutPolicy`]: `policy.allow[0]`.
    pub fn validate(&self) -> Result<(), Rejection> {
        check_subdomain(&self.name).map_err(|r| invalid("policy.name", r))?;
        service_key(&self.service, "policy.service")?;
        if self.allow.len() > MAX_PRINCIPALS {
            return Err(invalid(
                "policy.allow",
                too_many("principals", MAX_PRINCIPALS, self.allow.len()),
            ));
        }
        for (i, principal) in self.allow.iter().enumerate() {
            let checked = match principal {
                Principal::Id(id) | Principal::IdPrefix(id) => check_spiffe_id(id),
                Principal::TrustDomain(td) => check_trust_domain(td),
                // `site` (of the local trust domain) or `<trust-domain>/site`.
                Principal::Site(site) => match site.split_once('/') {
                    Some((td, site)) => check_trust_domain(td).and_then(|()| check_label(site)),
                    None => check_label(site),
                },
            };
            checked.map_err(|r| invalid(format!("policy.allow[{i}]"), r))?;
        }
        Ok(())
    }
}

impl Command {
    /// Stateless checks of the command's fields; [`Catalog::apply`] runs them first.
    pub fn validate(&self) -> Result<(), Rejection> {
        match self {
            Command::RegisterSite { spec, .. } => spec.validate(),
            Command::Heartbeat {
                site,
                links,
                instance,
                xds_rejections,
                ..
            } => {
                check_label(site).map_err(|r| invalid("site", r))?;
                check_instance(instance).map_err(|r| invalid("instance", r))?;
                let links = links.as_deref().unwrap_or_default();
                if links.len() > super::MAX_LINKS {
                    return Err(invalid(
                        "links",
                        format!("{} links, at most {}", links.len(), super::MAX_LINKS),
                    ));
                }
                for (i, l) in links.iter().enumerate() {
                    check_label(&l.peer_site)
                        .map_err(|r| invalid(format!("links[{i}].peer_site"), r))?;
                    if l.last_error
                        .as_ref()
                        .is_some_and(|e| e.len() > super::MAX_LINK_ERROR)
                    {
                        return Err(invalid(
                            format!("links[{i}].last_error"),
                            format!("longer than {} bytes", super::MAX_LINK_ERROR),
                        ));
                    }
                }
                let rejections = xds_rejections.as_deref().unwrap_or_default();
                if rejections.len() > super::MAX_XDS_REJECTIONS {
                    return Err(invalid(
                        "xds_rejections",
                        format!(
                            "{} rejections, at most {}",
                            rejections.len(),
                            super::MAX_XDS_REJECTIONS
                        ),
                    ));
                }
                for (i, r) in rejections.iter().enumerate() {
                    for (field, text) in [
                        ("node", &r.node),
                        ("type_url", &r.type_url),
                        ("error", &r.error),
                    ] {
                        if text.len() > super::MAX_LINK_ERROR {
                            return Err(invalid(
                                format!("xds_rejections[{i}].{field}"),
                                format!("longer than {} bytes", super::MAX_LINK_ERROR),
                            ));
                        }
                    }
                }
                Ok(())
            }
            Command::RemoveSite { site }
            | Command::RevokeSite { site }
            | Command::ReinstateSite { site } => check_label(site).map_err(|r| invalid("site", r)),
            Command::PutExport { export } => export.validate(),
            Command::DeleteExport { site, service, .. } => {
                check_label(site).map_err(|r| invalid("site", r))?;
                service.validate()
            }
            Command::PutImport { import } => import.validate(),
            Command::PutPolicy { policy } => policy.validate(),
            Command::DeletePolicy { name } => check_subdomain(name).map_err(|r| invalid("name", r)),
            Command::PutOwnership { scope, sites } => {
                check_scope(scope)?;
                if sites.is_empty() {
                    return Err(invalid("sites", "must name at least one site"));
                }
                if sites.len() > MAX_GATEWAYS * 4 {
                    return Err(invalid(
                        "sites",
                        too_many("sites", MAX_GATEWAYS * 4, sites.len()),
                    ));
                }
                for (i, site) in sites.iter().enumerate() {
                    check_label(site).map_err(|r| invalid(format!("sites[{i}]"), r))?;
                }
                Ok(())
            }
            Command::DeleteOwnership { scope } => check_scope(scope),
            Command::UseToken { id, site, .. } => {
                check_token_id(id).map_err(|r| invalid("id", r))?;
                check_label(site).map_err(|r| invalid("site", r))
            }
            Command::RevokeToken { id, .. } => check_token_id(id).map_err(|r| invalid("id", r)),
            Command::Tick { .. } | Command::ForgetWithdrawn { .. } => Ok(()),
        }
    }
}
