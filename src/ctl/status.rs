//! `ctl status`: the one-screen diagnosis. Anything wrong comes first.

use std::process::ExitCode;

use anyhow::Result;
use meshbridge_core::client::{Consistency, RegistryClient};
use meshbridge_core::model::{Link, Site, SiteState, XdsRejection};
use meshbridge_core::proto;
use meshbridge_core::tls::Identity;
use serde_json::{Value, json};

use super::{Printer, member_json, print_services, print_sites, sites_json};

pub(super) async fn status(
    client: &RegistryClient,
    identity: &Identity,
    consistency: Consistency,
    json_out: bool,
    out: &Printer,
) -> Result<ExitCode> {
    let mut problems: Vec<String> = Vec::new();
    let nodes = client.status_of_each().await;
    let mut node_rows = Vec::new();
    let mut leader: Option<(u64, u64)> = None;
    for (url, r) in &nodes {
        match r {
            Ok(s) => {
                if let Some(l) = s.leader_id {
                    leader = Some((l, s.term));
                }
                node_rows.push(
                    json!({"url": url, "reachable": true, "node_id": s.node_id, "state": s.state,
                    "term": s.term, "leader_id": s.leader_id, "commit_index": s.commit_index,
                    "applied_index": s.applied_index, "revision": s.revision,
                    "members": s.members.iter().map(member_json).collect::<Vec<_>>()}),
                );
                problems.extend(member_problems(s));
            }
            Err(e) => {
                problems.push(format!("registry node {url} is unreachable: {e}"));
                node_rows.push(json!({"url": url, "reachable": false, "error": e.to_string()}));
            }
        }
    }
    if leader.is_none() {
        problems.push("no registry node knows a leader: writes and linearizable reads fail".into());
    }
    // With no node answering, catalog reads would only wait out the timeout again.
    let any_answered = nodes.iter().any(|(_, r)| r.is_ok());
    let (sites, services) = if any_answered {
        (
            client.list_sites(consistency).await.ok(),
            client.list_services(consistency).await.ok(),
        )
    } else {
        (None, None)
    };
    if let Some(list) = &sites {
        problems.extend(site_problems(&list.sites, list.now_ms));
    }
    let mut link_rows = Vec::new();
    let mut xds_rows = Vec::new();
    if let Some(list) = &sites {
        let (p, rows) = link_findings(&list.sites);
        problems.extend(p);
        link_rows = rows;
        let (p, rows) = xds_findings(&list.sites);
        problems.extend(p);
        xds_rows = rows;
    }
    if let Some(list) = &services {
        for s in &list.value {
            for c in &s.conflicts {
                problems.push(format!(
                    "service {}: port {:?} conflicts: site {} says {}/{}, site {} (older, wins) says {}/{}",
                    s.key, c.port_name, c.loser_site, c.loser.port, c.loser.protocol, c.winner_site, c.winner.port, c.winner.protocol
                ));
            }
            for c in &s.type_conflicts {
                problems.push(format!(
                    "service {}: type conflict: site {} exports it as {}, site {} (older, wins) as {}",
                    s.key,
                    c.loser_site,
                    meshbridge_core::model::TypeConflict::type_name(!c.headless),
                    c.winner_site,
                    meshbridge_core::model::TypeConflict::type_name(c.headless)
                ));
            }
        }
    }
    // Warnings: worth knowing, not failures (the exit code stays 0).
    let mut warnings: Vec<String> = Vec::new();
    if let Ok(catalog) = client.catalog(consistency).await
        && catalog.owners.is_empty()
    {
        warnings.push(
            "no export ownership rules: any site may export any service and attract its traffic (set some with `ctl owners put NS --site S`)".into(),
        );
    }
    let cert = identity.cert_info();
    let now = meshbridge_core::clock::unix_secs();
    let days_left = cert.seconds_left(now) / 86400;
    // The whole mesh's certificates: each registry node's own SVID and bundle, and every
    // client SVID the nodes have seen (gateways, agents, DNS servers, adapters), and ours.
    let mut seen: Vec<proto::SeenCertificate> = vec![proto::SeenCertificate {
        id: identity.id().to_string(),
        kind: "svid (this operator)".into(),
        not_before_unix: cert.not_before,
        not_after_unix: cert.not_after,
        last_seen_unix_ms: (now as u64) * 1000,
    }];
    for s in nodes.iter().filter_map(|(_, r)| r.as_ref().ok()) {
        seen.extend(s.certificates.iter().cloned());
    }
    let certs = merge_certificates(seen);
    problems.extend(certificate_problems(&certs, now));
    if json_out {
        let v = json!({
            "ok": problems.is_empty(),
            "problems": problems,
            "warnings": warnings,
            "registry": {"leader_id": leader.map(|l| l.0), "term": leader.map(|l| l.1), "nodes": node_rows},
            "sites": sites.as_ref().map(|l| sites_json(&l.sites, l.now_ms)),
            "links": link_rows,
            "xds_rejections": xds_rows,
            "services": services.as_ref().map(|l| &l.value),
            "certificates": certs.iter().map(|c| json!({
                "id": c.id, "kind": c.kind,
                "not_after": meshbridge_core::tls::rfc3339(c.not_after_unix),
                "days_left": c.not_after_unix.saturating_sub(now).div_euclid(86400),
                "expired": c.not_after_unix <= now,
                "last_seen": meshbridge_core::tls::rfc3339((c.last_seen_unix_ms / 1000) as i64),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        if problems.is_empty() {
            println!("{}", out.green("no problems found"));
        } else {
            println!(
                "{}",
                out.red(&format!(
                    "{} problem{}:",
                    problems.len(),
                    if problems.len() == 1 { "" } else { "s" }
                ))
            );
            for p in &problems {
                println!("  {}", out.red(&format!("✗ {p}")));
            }
        }
        for w in &warnings {
            println!("  ! warning: {w}");
        }
        println!();
        println!(
            "REGISTRY  leader {}  term {}",
            leader.map(|l| l.0.to_string()).unwrap_or("none".into()),
            leader.map(|l| l.1).unwrap_or(0)
        );
        for (url, r) in &nodes {
            match r {
                Ok(s) => println!(
                    "  node {:<3} {:<10} {:<28} commit {:<7} applied {:<7} revision {}",
                    s.node_id, s.state, url, s.commit_index, s.applied_index, s.revision
                ),
                Err(_) => println!("  {:<14} {:<28} {}", "", url, out.red("unreachable")),
            }
        }
        if let Some(s) = nodes
            .iter()
            .find_map(|(_, r)| r.as_ref().ok().filter(|s| !s.members.is_empty()))
        {
            for m in &s.members {
                println!(
                    "    member {:<3} {:<8} lag {}",
                    m.node_id,
                    if m.voter { "voter" } else { "learner" },
                    m.lag
                );
            }
        }
        println!();
        if let Some(list) = &sites {
            print_sites(&list.sites, list.now_ms, out);
            println!();
        }
        if !link_rows.is_empty() {
            println!(
                "{:<24} {:<6} {:<10} {:>9} {:>8}  LAST ERROR",
                "LINK", "TRANS", "STATE", "RTT", "FAILURES"
            );
            for l in &link_rows {
                let up = l["connected"].as_bool().unwrap_or(false);
                let state = if up { out.green("up") } else { out.red("down") };
                let pad = 10 + state.len() - if up { 2 } else { 4 };
                println!(
                    "{:<24} {:<6} {:<pad$} {:>9} {:>8}  {}",
                    format!(
                        "{}{} → {}",
                        l["from"].as_str().unwrap_or(""),
                        l["gateway"]
                            .as_str()
                            .map(|g| format!(" ({g})"))
                            .unwrap_or_default(),
                        l["to"].as_str().unwrap_or("")
                    ),
                    l["transport"].as_str().unwrap_or("-"),
                    state,
                    l["rtt_ms"]
                        .as_f64()
                        .map(|r| format!("{r:.2}ms"))
                        .unwrap_or_else(|| "-".into()),
                    l["failures"],
                    l["last_error"].as_str().unwrap_or(""),
                );
            }
            println!();
        }
        if let Some(list) = &services {
            print_services(&list.value);
            println!();
        }
        println!(
            "CERTIFICATE  {}  expires {} ({} days)",
            identity.id(),
            meshbridge_core::tls::rfc3339(cert.not_after),
            days_left
        );
        let soon: Vec<&proto::SeenCertificate> =
            certs.iter().filter(|c| expiring(c, now)).collect();
        println!(
            "{} certificates in the mesh, {} expiring (past two thirds of their lifetime, or \
             within 7 days) or expired",
            certs.len(),
            soon.len()
        );
        for c in soon {
            println!(
                "  {}  {}  expires {}",
                c.id,
                c.kind,
                meshbridge_core::tls::rfc3339(c.not_after_unix)
            );
        }
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

/// Members that lag far behind the leader, and (in the leader's report, the only one that
/// knows) members that never answered it.
fn member_problems(s: &proto::StatusReply) -> Vec<String> {
    let leader = s.state == "Leader";
    s.members
        .iter()
        .filter_map(|m| {
            if leader && m.node_id != s.node_id && m.matched_index.is_none() {
                let role = if m.voter {
                    "a voter: every write waits for a quorum that counts it"
                } else {
                    "a learner"
                };
                Some(format!(
                    "registry node {} ({}) has never answered the leader; it is {role}",
                    m.node_id, m.url
                ))
            } else if m.lag > 100 {
                Some(format!(
                    "registry node {} is {} entries behind the leader",
                    m.node_id, m.lag
                ))
            } else {
                None
            }
        })
        .collect()
}

/// Whether `c` is expired or close enough to its end to be a problem: within a third of
/// its lifetime, at most 7 days ([`meshbridge_core::tls::expiring`]).
fn expiring(c: &proto::SeenCertificate, now: i64) -> bool {
    meshbridge_core::tls::expiring(c.not_before_unix, c.not_after_unix, now)
}

/// One row per certificate (id and kind), the last seen of its reports.
fn merge_certificates(all: Vec<proto::SeenCertificate>) -> Vec<proto::SeenCertificate> {
    let mut by: std::collections::BTreeMap<(String, String), proto::SeenCertificate> =
        std::collections::BTreeMap::new();
    for c in all {
        let key = (c.id.clone(), c.kind.clone());
        match by.get(&key) {
            Some(old) if old.last_seen_unix_ms >= c.last_seen_unix_ms => {}
            _ => {
                by.insert(key, c);
            }
        }
    }
    by.into_values().collect()
}

/// Expired certificates, then those expiring ([`expiring`]), soonest first; a certificate
/// reported under several kinds (a registry node's own SVID is also a client's) once.
fn certificate_problems(certs: &[proto::SeenCertificate], now: i64) -> Vec<String> {
    let mut soon: std::collections::BTreeMap<(i64, &str), Vec<&str>> = Default::default();
    for c in certs.iter().filter(|c| expiring(c, now)) {
        soon.entry((c.not_after_unix, &c.id))
            .or_default()
            .push(&c.kind);
    }
    soon.into_iter()
        .map(|((not_after, id), mut kinds)| {
            kinds.sort_unstable();
            kinds.dedup();
            let kinds = kinds.join(", ");
            let when = meshbridge_core::tls::rfc3339(not_after);
            if not_after <= now {
                format!("certificate {id} ({kinds}) EXPIRED at {when}")
            } else {
                let left = meshbridge_core::tls::time_left(not_after.saturating_sub(now));
                format!("certificate {id} ({kinds}) expires in {left} ({when})")
            }
        })
        .collect()
}

/// Stale and withdrawn sites, and why a stale site past its grace is still not withdrawn (a
/// partial partition: live sites still reach its gateway).
fn site_problems(sites: &[Site], now_ms: u64) -> Vec<String> {
    let catalog = meshbridge_core::model::Catalog {
        sites: sites
            .iter()
            .map(|s| (s.name.clone(), std::sync::Arc::new(s.clone())))
            .collect(),
        ..Default::default()
    };
    let mut problems = Vec::new();
    for s in sites {
        match s.state {
            SiteState::Stale { since_ms } => {
                let vouchers = catalog.vouchers(&s.name, now_ms);
                let stale_s = s.staleness_seconds(now_ms);
                problems.push(if vouchers.is_empty() {
                    format!(
                        "site {} is stale for {stale_s} s (lease lapsed): its endpoints rank last and are withdrawn after {} s",
                        s.name,
                        s.grace_ms / 1000
                    )
                } else if since_ms.saturating_add(s.grace_ms) <= now_ms {
                    format!(
                        "site {} is stale for {stale_s} s, past its {} s grace, but kept, not withdrawn: {} still reach its gateway (partial partition: the registry lost the site, the data plane did not)",
                        s.name,
                        s.grace_ms / 1000,
                        vouchers.join(", ")
                    )
                } else {
                    format!(
                        "site {} is stale for {stale_s} s (lease lapsed) while {} still reach its gateway (partial partition): its endpoints rank last; it is not withdrawn while they do",
                        s.name,
                        vouchers.join(", ")
                    )
                });
            }
            SiteState::Withdrawn { .. } => problems.push(format!(
                "site {} is withdrawn: its endpoints are gone",
                s.name
            )),
            SiteState::Fresh => {}
        }
    }
    problems
}

/// Problems and rows from the links every site reported with its heartbeats: links down
/// (with the peer's TLS reason), links down in one direction only, and stale sites that a
/// peer still reaches (the control plane lost them, the data plane did not).
fn link_findings(sites: &[Site]) -> (Vec<String>, Vec<Value>) {
    let mut problems = Vec::new();
    let mut rows = Vec::new();
    let up = |from: &str, to: &str| -> Option<bool> {
        sites
            .iter()
            .find(|s| s.name == from)?
            .links
            .iter()
            .find(|l| l.peer_site == to)
            .map(|l| l.connected)
    };
    for s in sites {
        // Each gateway's own links when the site has several (named in the row).
        let reports: Vec<(Option<&str>, &Link)> = if s.instances.is_empty() {
            s.links.iter().map(|l| (None, l)).collect()
        } else {
            s.instances
                .iter()
                .flat_map(|i| i.links.iter().map(move |l| (Some(i.name.as_str()), l)))
                .collect()
        };
        for (gateway, l) in reports {
            rows.push(json!({
                "from": s.name, "gateway": gateway, "to": l.peer_site, "connected": l.connected, "transport": l.transport,
                "rtt_ms": l.rtt_us.map(|us| us as f64 / 1000.0), "failures": l.failures, "last_error": l.last_error,
                "reporter_state": s.state.name(),
            }));
            let from = match gateway {
                Some(g) => format!("{} ({g})", s.name),
                None => s.name.clone(),
            };
            if !matches!(s.state, SiteState::Fresh) {
                continue; // a stale site's reports are old; its staleness is reported already
            }
            if !l.connected && l.failures > 0 {
                let reason = l.last_error.as_deref().unwrap_or("no error recorded");
                match up(&l.peer_site, &s.name) {
                    Some(true) => problems.push(format!(
                        "link {from} → {} is down in one direction ({} → {} is up): {reason}",
                        l.peer_site, l.peer_site, s.name
                    )),
                    _ => problems.push(format!("link {from} → {} is down: {reason}", l.peer_site)),
                }
            }
            if l.connected
                && let Some(peer) = sites.iter().find(|p| p.name == l.peer_site)
                && !matches!(peer.state, SiteState::Fresh)
            {
                problems.push(format!(
                    "site {} is {} in the registry, but {} still has a live link to it: its gateway runs and lost the registry",
                    peer.name,
                    peer.state.name(),
                    s.name
                ));
            }
        }
    }
    (problems, rows)
}

/// Problems and rows from the xDS rejections each fresh site's gateways reported: an Envoy
/// or gRPC client that NACKed a configuration runs without it.
fn xds_findings(sites: &[Site]) -> (Vec<String>, Vec<Value>) {
    let mut problems = Vec::new();
    let mut rows = Vec::new();
    for s in sites.iter().filter(|s| s.is_fresh()) {
        let reports: Vec<(Option<&str>, &XdsRejection)> = if s.instances.is_empty() {
            s.xds_rejections.iter().map(|r| (None, r)).collect()
        } else {
            s.instances
                .iter()
                .flat_map(|i| {
                    i.xds_rejections
                        .iter()
                        .map(move |r| (Some(i.name.as_str()), r))
                })
                .collect()
        };
        for (gateway, r) in reports {
            let kind = r.type_url.rsplit('.').next().unwrap_or(&r.type_url);
            rows.push(json!({
                "site": s.name, "gateway": gateway, "node": r.node, "type_url": r.type_url,
                "error": r.error,
            }));
            let at = match gateway {
                Some(g) => format!("{} ({g})", s.name),
                None => s.name.clone(),
            };
            problems.push(format!(
                "xDS client {} of site {at} rejected its {kind} configuration (NACK), and runs without it: {}",
                r.node, r.error
            ));
        }
    }
    (problems, rows)
}

#[cfg(test)]
mod tests {
    use meshbridge_core::model::{Link, Locality, Site, SiteKind, SiteState};

    use super::site_problems;

    fn site(name: &str, state: SiteState, links: &[(&str, bool)]) -> Site {
        Site {
            name: name.into(),
            kind: SiteKind::Cluster,
            locality: Locality::default(),
            gateways: vec![],
            lease_ttl_ms: 10_000,
            grace_ms: 60_000,
            last_heartbeat_ms: 100_000,
            state,
            created_revision: 1,
            links: links
                .iter()
                .map(|(peer, connected)| Link {
                    peer_site: (*peer).into(),
                    connected: *connected,
                    transport: None,
                    rtt_us: None,
                    failures: 0,
                    last_error: None,
                })
                .collect(),
            instances: Vec::new(),
            xds_rejections: Vec::new(),
        }
    }

    #[test]
    fn expired_and_soon_expiring_certificates_are_problems_soonest_first() {
        use meshbridge_core::proto::SeenCertificate;
        let now = 1_000_000;
        let year = 365 * 86400;
        let cert = |id: &str, kind: &str, left: i64, seen: u64| SeenCertificate {
            id: id.into(),
            kind: kind.into(),
            not_before_unix: now + left - year,
            not_after_unix: now + left,
            last_seen_unix_ms: seen,
        };
        let certs = super::merge_certificates(vec![
            cert("spiffe://t/site/a/gateway", "client", 30 * 86400, 1),
            // The same gateway, seen later by another node with a renewed certificate.
            cert("spiffe://t/site/a/gateway", "client", 2 * 86400, 5),
            cert("spiffe://t/site/b/dns", "client", -60, 3),
            cert("spiffe://t/registry/1", "svid", 90 * 86400, 9),
        ]);
        assert_eq!(certs.len(), 3);
        let problems = super::certificate_problems(&certs, now);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("site/b/dns") && problems[0].contains("EXPIRED"));
        assert!(
            problems[1].contains("site/a/gateway") && problems[1].contains("expires in 2 days")
        );
    }

    /// Short-lived SVIDs renew themselves at half of what is left: a 24-hour SVID with 20
    /// hours left is healthy, not "expiring within 7 days" (with the defaults, `ctl status`
    /// was never green). One with under a third of its lifetime left has missed its
    /// renewal. The same certificate seen as a node's own and as a client's is one problem.
    #[test]
    fn a_member_that_never_answered_the_leader_is_a_problem() {
        use meshbridge_core::proto::{MemberStatus, StatusReply};
        let member =
            |node_id: u64, voter: bool, matched_index: Option<u64>, lag: u64| MemberStatus {
                node_id,
                url: format!("https://127.0.0.1:{}", 7000 + node_id),
                voter,
                matched_index,
                lag,
            };
        let mut s = StatusReply {
            node_id: 1,
            state: "Leader".into(),
            members: vec![
                member(1, true, Some(50), 0),
                member(2, true, Some(50), 0),
                member(3, true, None, 45),
                member(4, false, Some(10), 400),
            ],
            ..Default::default()
        };
        let problems = super::member_problems(&s);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("node 3 (https://127.0.0.1:7003) has never answered"));
        assert!(problems[0].contains("a voter"));
        assert!(problems[1].contains("node 4 is 400 entries behind"));
        // A follower does not know who answered the leader.
        s.state = "Follower".into();
        assert_eq!(super::member_problems(&s).len(), 1);
    }

    #[test]
    fn short_lived_certificates_are_problems_only_past_two_thirds_of_their_life() {
        use meshbridge_core::proto::SeenCertificate;
        let now = 1_000_000;
        let day = 86400;
        let cert = |id: &str, kind: &str, lifetime: i64, left: i64| SeenCertificate {
            id: id.into(),
            kind: kind.into(),
            not_before_unix: now + left - lifetime,
            not_after_unix: now + left,
            last_seen_unix_ms: 1,
        };
        let certs = super::merge_certificates(vec![
            cert("spiffe://t/site/a/agent", "client", day, 20 * 3600),
            cert("spiffe://t/site/b/agent", "client", day, 5 * 3600),
            cert("spiffe://t/registry/1", "svid", day, 7 * 3600),
            cert("spiffe://t/registry/1", "client", day, 7 * 3600),
            cert("spiffe://t/site/c/gateway", "client", 365 * day, 6 * day),
        ]);
        let problems = super::certificate_problems(&certs, now);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0].contains("site/b/agent") && problems[0].contains("expires in 5 h"),
            "{problems:?}"
        );
        assert!(
            problems[1].contains("registry/1 (client, svid) expires in 7 h"),
            "{problems:?}"
        );
        assert!(problems[2].contains("site/c/gateway") && problems[2].contains("in 6 days"));
    }

    #[test]
    fn a_stale_site_a_live_peer_reaches_is_explained_as_a_partial_partition() {
        let now = 105_000;
        let past_grace = SiteState::Stale { since_ms: 40_000 };
        let in_grace = SiteState::Stale { since_ms: 100_000 };
        let cases = [
            // (east's state, west's link to east up, the words expected)
            (
                past_grace,
                true,
                "past its 60 s grace, but kept, not withdrawn: west still reach",
            ),
            (
                in_grace,
                true,
                "while west still reach its gateway (partial partition)",
            ),
            (
                in_grace,
                false,
                "(lease lapsed): its endpoints rank last and are withdrawn after 60 s",
            ),
        ];
        for (state, up, want) in cases {
            let sites = [
                site("east", state, &[]),
                site("west", SiteState::Fresh, &[("east", up)]),
            ];
            let problems = site_problems(&sites, now);
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(problems[0].contains(want), "{state:?} {up}: {problems:?}");
        }
    }

    #[test]
    fn standing_xds_rejections_of_fresh_sites_are_problems_naming_client_site_and_error() {
        use meshbridge_core::model::{GatewayInstance, XdsRejection};
        let nack = |node: &str| XdsRejection {
            node: node.into(),
            type_url: "type.googleapis.com/envoy.config.listener.v3.Listener".into(),
            error: "cannot bind '127.0.0.1:80': Address already in use".into(),
        };
        let mut west = site("west", SiteState::Fresh, &[]);
        west.xds_rejections = vec![nack("sidecar-1")];
        let mut east = site("east", SiteState::Fresh, &[]);
        east.instances = vec![GatewayInstance {
            name: "gw-0".into(),
            xds_rejections: vec![nack("sidecar-2")],
            ..Default::default()
        }];
        east.derive_from_instances();
        // A stale site's reports are old: its staleness is the problem.
        let mut north = site("north", SiteState::Stale { since_ms: 1 }, &[]);
        north.xds_rejections = vec![nack("sidecar-3")];
        let (problems, rows) = super::xds_findings(&[west, east, north]);
        assert_eq!(
            problems,
            vec![
                "xDS client sidecar-1 of site west rejected its Listener configuration (NACK), \
                 and runs without it: cannot bind '127.0.0.1:80': Address already in use",
                "xDS client sidecar-2 of site east (gw-0) rejected its Listener configuration \
                 (NACK), and runs without it: cannot bind '127.0.0.1:80': Address already in use",
            ]
        );
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1]["gateway"], "gw-0");
        assert_eq!(rows[1]["node"], "sidecar-2");
    }
}
