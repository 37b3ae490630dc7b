//! Typed requests ↔ model types (`From` toward the wire, `TryFrom` from it), and
//! refusals ↔ gRPC statuses.
//!
//! Conversions from the wire name every bad field with the same path the model's validation
//! uses (`export.endpoints[2].address`), so a caller sees one naming scheme whichever layer
//! refused the value. They only check what the wire type cannot express (an address that is
//! not an IP, a port above 65535, an unknown enum value); the rest is
//! [`Command::validate`](crate::model::Command::validate)'s job. A message field the
//! request lacks is refused by [`required`], which names it.

use std::net::IpAddr;

use bytes::Bytes;
use tonic::{Code, Status};

use super::generated as pb;
use crate::model::{self, Rejection};

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Rejection {
    Rejection::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A message field that must be set (proto3 makes every message field optional); `field`
/// is its path in refusals (`export`, `policy.service`).
pub fn required<'a, T>(value: Option<&'a T>, field: &str) -> Result<&'a T, Rejection> {
    value.ok_or_else(|| invalid(field, "is required"))
}

impl From<&pb::ServiceKey> for model::ServiceKey {
    fn from(key: &pb::ServiceKey) -> Self {
        model::ServiceKey::new(&key.namespace, &key.name)
    }
}

impl From<&model::ServiceKey> for pb::ServiceKey {
    fn from(key: &model::ServiceKey) -> Self {
        pb::ServiceKey {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
        }
    }
}

/// A site spec from the wire; unset lease fields take the registry's defaults (which is
/// why this is a function of the defaults, not a `TryFrom`).
pub fn to_site_spec(
    spec: &pb::SiteSpec,
    default_ttl_ms: u64,
    default_grace_ms: u64,
) -> Result<model::SiteSpec, Rejection> {
    let kind = match pb::SiteKind::try_from(spec.kind) {
        Ok(pb::SiteKind::Unspecified | pb::SiteKind::Cluster) => model::SiteKind::Cluster,
        Ok(pb::SiteKind::Zone) => model::SiteKind::Zone,
        Ok(pb::SiteKind::Vm) => model::SiteKind::Vm,
        Err(_) => return Err(invalid("spec.kind", format!("unknown kind {}", spec.kind))),
    };
    let locality = spec.locality.clone().unwrap_or_default();
    Ok(model::SiteSpec {
        name: spec.name.clone(),
        kind,
        locality: model::Locality {
            region: locality.region,
            zone: locality.zone,
        },
        gateways: spec.gateways.clone(),
        lease_ttl_ms: spec.lease_ttl_ms.unwrap_or(default_ttl_ms),
        grace_ms: spec.grace_ms.unwrap_or(default_grace_ms),
        instance: spec.instance.clone(),
    })
}

/// The wire form of a site spec. A zero `lease_ttl_ms` asks for the registry's default
/// lease, and then so does the grace.
impl From<&model::SiteSpec> for pb::SiteSpec {
    fn from(spec: &model::SiteSpec) -> Self {
        let kind = match spec.kind {
            model::SiteKind::Cluster => pb::SiteKind::Cluster,
            model::SiteKind::Zone => pb::SiteKind::Zone,
            model::SiteKind::Vm => pb::SiteKind::Vm,
        };
        let defaults = spec.lease_ttl_ms == 0;
        pb::SiteSpec {
            name: spec.name.clone(),
            kind: kind.into(),
            locality: Some(pb::Locality {
                region: spec.locality.region.clone(),
                zone: spec.locality.zone.clone(),
            }),
            gateways: spec.gateways.clone(),
            lease_ttl_ms: (!defaults).then_some(spec.lease_ttl_ms),
            grace_ms: (!defaults).then_some(spec.grace_ms),
            instance: spec.instance.clone(),
        }
    }
}

fn to_port_number(n: u32, field: impl FnOnce() -> String) -> Result<u16, Rejection> {
    u16::try_from(n).map_err(|_| invalid(field(), format!("{n} is not in 1..=65535")))
}

fn to_port(p: &pb::Port, i: usize) -> Result<model::Port, Rejection> {
    let f = |leaf: &str| format!("export.ports[{i}].{leaf}");
    let protocol = match pb::Protocol::try_from(p.protocol) {
        Ok(pb::Protocol::Unspecified | pb::Protocol::Tcp) => model::Protocol::Tcp,
        Ok(pb::Protocol::Udp) => model::Protocol::Udp,
        Ok(pb::Protocol::Sctp) => model::Protocol::Sctp,
        Err(_) => {
            return Err(invalid(
                f("protocol"),
                format!("unknown protocol {}", p.protocol),
            ));
        }
    };
    let port = to_port_number(p.port, || f("port"))?;
    let target_port = match p.target_port {
        0 => port,
        n => to_port_number(n, || f("target_port"))?,
    };
    Ok(model::Port {
        name: p.name.clone(),
        port,
        protocol,
        target_port,
        app_protocol: p.app_protocol.clone(),
    })
}

fn to_endpoint(e: &pb::Endpoint, i: usize) -> Result<model::Endpoint, Rejection> {
    let address: IpAddr = e.address.parse().map_err(|_| {
        invalid(
            format!("export.endpoints[{i}].address"),
            format!("{:?} is not an IPv4 or IPv6 address", e.address),
        )
    })?;
    Ok(model::Endpoint {
        address,
        hostname: e.hostname.clone(),
        ready: e.ready,
        weight: e.weight.unwrap_or(1),
        identity: e.identity.clone(),
        zone: e.zone.clone(),
    })
}

/// An export from the wire. Revisions are the catalog's to stamp; they start at 0.
impl TryFrom<&pb::Export> for model::Export {
    type Error = Rejection;

    fn try_from(e: &pb::Export) -> Result<Self, Rejection> {
        let ports = e
            .ports
            .iter()
            .enumerate()
            .map(|(i, p)| to_port(p, i))
            .collect::<Result<_, _>>()?;
        let endpoints = e
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, p)| to_endpoint(p, i))
            .collect::<Result<_, _>>()?;
        Ok(model::Export {
            site: e.site.clone(),
            service: required(e.service.as_ref(), "export.service")?.into(),
            generation: e.generation,
            ports,
            endpoints,
            headless: e.headless,
            created_revision: 0,
            updated_revision: 0,
        })
    }
}

/// An import address record from the wire.
impl TryFrom<&pb::PutImportRequest> for model::Import {
    type Error = Rejection;

    fn try_from(r: &pb::PutImportRequest) -> Result<Self, Rejection> {
        let ips = r
            .ips
            .iter()
            .enumerate()
            .map(|(i, ip)| {
                ip.parse::<IpAddr>().map_err(|_| {
                    invalid(
                        format!("import.ips[{i}]"),
                        format!("{ip:?} is not an IPv4 or IPv6 address"),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(model::Import {
            site: r.site.clone(),
            service: required(r.service.as_ref(), "import.service")?.into(),
            generation: r.generation,
            ips,
        })
    }
}

impl From<&model::Import> for pb::PutImportRequest {
    fn from(i: &model::Import) -> Self {
        pb::PutImportRequest {
            site: i.site.clone(),
            service: Some((&i.service).into()),
            generation: i.generation,
            ips: i.ips.iter().map(ToString::to_string).collect(),
        }
    }
}

impl From<&model::Export> for pb::Export {
    fn from(e: &model::Export) -> Self {
        let protocol = |p: model::Protocol| match p {
            model::Protocol::Tcp => pb::Protocol::Tcp,
            model::Protocol::Udp => pb::Protocol::Udp,
            model::Protocol::Sctp => pb::Protocol::Sctp,
        };
        pb::Export {
            site: e.site.clone(),
            service: Some((&e.service).into()),
            generation: e.generation,
            ports: e
                .ports
                .iter()
                .map(|p| pb::Port {
                    name: p.name.clone(),
                    port: p.port.into(),
                    protocol: protocol(p.protocol).into(),
                    target_port: p.target_port.into(),
                    app_protocol: p.app_protocol.clone(),
                })
                .collect(),
            endpoints: e
                .endpoints
                .iter()
                .map(|ep| pb::Endpoint {
                    address: ep.address.to_string(),
                    hostname: ep.hostname.clone(),
                    ready: ep.ready,
                    weight: Some(ep.weight),
                    identity: ep.identity.clone(),
                    zone: ep.zone.clone(),
                })
                .collect(),
            headless: e.headless,
        }
    }
}

impl TryFrom<&pb::Policy> for model::Policy {
    type Error = Rejection;

    fn try_from(p: &pb::Policy) -> Result<Self, Rejection> {
        let allow = p
            .allow
            .iter()
            .enumerate()
            .map(|(i, a)| match &a.kind {
                Some(pb::principal::Kind::Id(s)) => Ok(model::Principal::Id(s.clone())),
                Some(pb::principal::Kind::IdPrefix(s)) => Ok(model::Principal::IdPrefix(s.clone())),
                Some(pb::principal::Kind::TrustDomain(s)) => {
                    Ok(model::Principal::TrustDomain(s.clone()))
                }
                Some(pb::principal::Kind::Site(s)) => Ok(model::Principal::Site(s.clone())),
                None => Err(invalid(
                    format!("policy.allow[{i}]"),
                    "needs one of id, id_prefix, trust_domain, site",
                )),
            })
            .collect::<Result<_, _>>()?;
        Ok(model::Policy {
            name: p.name.clone(),
            service: required(p.service.as_ref(), "policy.service")?.into(),
            allow,
        })
    }
}

impl From<&model::Policy> for pb::Policy {
    fn from(p: &model::Policy) -> Self {
        use pb::principal::Kind;
        pb::Policy {
            name: p.name.clone(),
            service: Some((&p.service).into()),
            allow: p
                .allow
                .iter()
                .map(|a| pb::Principal {
                    kind: Some(match a {
                        model::Principal::Id(s) => Kind::Id(s.clone()),
                        model::Principal::IdPrefix(s) => Kind::IdPrefix(s.clone()),
                        model::Principal::TrustDomain(s) => Kind::TrustDomain(s.clone()),
                        model::Principal::Site(s) => Kind::Site(s.clone()),
                    }),
                })
                .collect(),
        }
    }
}

/// The gRPC code of a rejection.
pub fn rejection_code(r: &Rejection) -> Code {
    match r {
        Rejection::Invalid { .. } => Code::InvalidArgument,
        Rejection::NotFound { .. } => Code::NotFound,
        Rejection::StaleGeneration { .. }
        | Rejection::Token { .. }
        | Rejection::Withdrawn { .. } => Code::FailedPrecondition,
        Rejection::Revoked { .. } | Rejection::NotOwner { .. } => Code::PermissionDenied,
        Rejection::Quota { .. } => Code::ResourceExhausted,
    }
}

/// The gRPC status of a refused command. The rejection itself travels as JSON in the
/// status details, so a client gets the same [`Rejection`] back.
pub fn rejection_to_status(r: &Rejection) -> Status {
    let code = rejection_code(r);
    match serde_json::to_vec(r) {
        Ok(details) => Status::with_details(code, r.to_string(), Bytes::from(details)),
        Err(_) => Status::new(code, r.to_string()),
    }
}

/// The rejection carried by a status made with [`rejection_to_status`].
pub fn rejection_from_status(status: &Status) -> Option<Rejection> {
    match status.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::FailedPrecondition
        | Code::PermissionDenied => serde_json::from_slice(status.details()).ok(),
        _ => None,
    }
}

/// A link report for the wire, its error cut as on the way in.
impl From<&model::Link> for pb::LinkReport {
    fn from(l: &model::Link) -> Self {
        pb::LinkReport {
            peer_site: l.peer_site.clone(),
            connected: l.connected,
            transport: l.transport.clone().unwrap_or_default(),
            rtt_us: l.rtt_us,
            failures: l.failures,
            last_error: l.last_error.as_deref().map(cut_text).unwrap_or_default(),
        }
    }
}

/// `text` cut to [`model::MAX_LINK_ERROR`] bytes at a character boundary.
fn cut_text(text: &str) -> String {
    model::cut_report_text(text).to_string()
}

/// A link report from the wire: an over-long error is cut (at a character boundary)
/// rather than refused, so a chatty TLS error never costs a site its lease renewal.
impl From<&pb::LinkReport> for model::Link {
    fn from(l: &pb::LinkReport) -> Self {
        let err = cut_text(&l.last_error);
        model::Link {
            peer_site: l.peer_site.clone(),
            connected: l.connected,
            transport: (!l.transport.is_empty()).then(|| l.transport.clone()),
            rtt_us: l.rtt_us,
            failures: l.failures,
            last_error: (!err.is_empty()).then_some(err),
        }
    }
}

/// An xDS rejection for the wire, over-long texts cut (a heartbeat over the registry's
/// message limit would fail, and the site would lose its lease).
impl From<&model::XdsRejection> for pb::XdsRejection {
    fn from(r: &model::XdsRejection) -> Self {
        pb::XdsRejection {
            node: cut_text(&r.node),
            type_url: cut_text(&r.type_url),
            error: cut_text(&r.error),
        }
    }
}

/// An xDS rejection from the wire, over-long texts cut as with links.
impl From<&pb::XdsRejection> for model::XdsRejection {
    fn from(r: &pb::XdsRejection) -> Self {
        model::XdsRejection {
            node: cut_text(&r.node),
            type_url: cut_text(&r.type_url),
            error: cut_text(&r.error),
        }
    }
}

/// A heartbeat's xDS rejections from the wire: only the newest
/// [`model::MAX_XDS_REJECTIONS`] are kept, so a report never costs a lease.
pub fn to_xds_rejections(list: &[pb::XdsRejection]) -> Vec<model::XdsRejection> {
    let skip = list.len().saturating_sub(model::MAX_XDS_REJECTIONS);
    list[skip..].iter().map(Into::into).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(name: &str, port: u32) -> pb::Port {
        pb::Port {
            name: name.into(),
            port,
            protocol: pb::Protocol::Tcp.into(),
            target_port: 0,
            app_protocol: None,
        }
    }

    fn export() -> pb::Export {
        pb::Export {
            site: "east".into(),
            service: Some(pb::ServiceKey {
                namespace: "shop".into(),
                name: "cart".into(),
            }),
            generation: 3,
            ports: vec![port("http", 80)],
            endpoints: vec![pb::Endpoint {
                address: "10.0.0.1".into(),
                hostname: None,
                ready: true,
                weight: None,
                identity: None,
                zone: None,
            }],
            headless: false,
        }
    }

    /// What a gateway sends is cut like what the registry keeps: a report over the
    /// registry's message limit would fail the heartbeat that carries it.
    #[test]
    fn report_texts_are_cut_on_the_way_out_too() {
        let long = "x".repeat(1 << 20);
        let sent = pb::XdsRejection::from(&model::XdsRejection {
            node: long.clone(),
            type_url: long.clone(),
            error: long.clone(),
        });
        for text in [&sent.node, &sent.type_url, &sent.error] {
            assert_eq!(text.len(), model::MAX_LINK_ERROR);
        }
        let link = pb::LinkReport::from(&model::Link {
            peer_site: "east".into(),
            last_error: Some(long),
            ..Default::default()
        });
        assert_eq!(link.last_error.len(), model::MAX_LINK_ERROR);
    }

    #[test]
    fn export_round_trips_and_fills_defaults() {
        let e = model::Export::try_from(&export()).unwrap();
        assert_eq!(e.ports[0].target_port, 80);
        assert_eq!(e.endpoints[0].weight, 1);
        assert_eq!(model::Export::try_from(&pb::Export::from(&e)).unwrap(), e);
    }

    #[test]
    fn bad_wire_values_name_their_field() {
        let mut e = export();
        e.endpoints.push(pb::Endpoint {
            address: "not-an-ip".into(),
            ..e.endpoints[0].clone()
        });
        let field = |r: Rejection| match r {
            Rejection::Invalid { field, .. } => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(model::Export::try_from(&e).unwrap_err()),
            "export.endpoints[1].address"
        );
        let mut e = export();
        e.ports.push(port("grpc", 70_000));
        assert_eq!(
            field(model::Export::try_from(&e).unwrap_err()),
            "export.ports[1].port"
        );
        let mut e = export();
        e.service = None;
        assert_eq!(
            field(model::Export::try_from(&e).unwrap_err()),
            "export.service"
        );
        assert_eq!(
            field(required::<pb::Export>(None, "export").unwrap_err()),
            "export"
        );
        let p = pb::Policy {
            name: "p".into(),
            service: e.service.clone(),
            allow: vec![pb::Principal { kind: None }],
        };
        assert_eq!(
            field(model::Policy::try_from(&p).unwrap_err()),
            "policy.allow[0]"
        );
    }

    #[test]
    fn site_spec_takes_registry_defaults() {
        let spec = model::SiteSpec {
            name: "east".into(),
            kind: model::SiteKind::Vm,
            locality: model::Locality::default(),
            gateways: vec![],
            lease_ttl_ms: 0,
            grace_ms: 0,
            instance: String::new(),
        };
        let back = to_site_spec(&pb::SiteSpec::from(&spec), 15_000, 600_000).unwrap();
        assert_eq!((back.lease_ttl_ms, back.grace_ms), (15_000, 600_000));
        assert_eq!(back.kind, model::SiteKind::Vm);
    }

    #[test]
    fn rejection_survives_the_status() {
        let r = Rejection::StaleGeneration {
            site: "east".into(),
            service: "shop/cart".into(),
            got: 1,
            stored: 2,
        };
        let status = rejection_to_status(&r);
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(rejection_from_status(&status), Some(r));
    }
}
