//! `/ui`: a status page on the admin port — the sites and the links between them as a
//! picture (health by colour, RTT on the edges) and the services with their per-site
//! endpoint counts. Server-rendered HTML with inline SVG, no scripts and no build step;
//! it reloads itself every two seconds.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::Html;
use axum::routing::get;
use meshbridge_core::model::{Catalog, SiteState};

use crate::shared::{Shared, now_ms};

pub(crate) fn routes(s: Arc<Shared>) -> Router {
    Router::new().route("/ui", get(page)).with_state(s)
}

async fn page(State(s): State<Arc<Shared>>) -> Html<String> {
    let leader = s.raft.metrics().borrow().current_leader;
    let mut html = render(&s.catalog(), now_ms(), s.node_id, leader);
    let certs = expiring(&s.seen.report(&s.identity), (now_ms() / 1000) as i64);
    if let Some(i) = html.rfind("</body>") {
        html.insert_str(i, &certs);
    }
    Html(html)
}

/// The certificates this node knows of (its own, its bundle's, its callers') that are
/// expiring (within a third of their lifetime, at most 7 days), expired ones marked;
/// nothing when there are none.
fn expiring(certs: &[meshbridge_core::proto::SeenCertificate], now: i64) -> String {
    let mut soon: Vec<_> = certs
        .iter()
        .filter(|c| meshbridge_core::tls::expiring(c.not_before_unix, c.not_after_unix, now))
        .collect();
    if soon.is_empty() {
        return String::new();
    }
    soon.sort_by_key(|c| c.not_after_unix);
    let rows: String = soon
        .iter()
        .map(|c| {
            let left = c.not_after_unix.saturating_sub(now);
            let when = if left <= 0 {
                r#"<b class="bad">EXPIRED</b>"#.to_string()
            } else {
                format!(
                    r#"<span class="bad">in {}</span>"#,
                    meshbridge_core::tls::time_left(left)
                )
            };
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{when}</td></tr>",
                esc(&c.id),
                esc(&c.kind),
                meshbridge_core::tls::rfc3339(c.not_after_unix)
            )
        })
        .collect();
    format!(
        r#"<h2>Certificates expiring (within a third of their lifetime, at most 7 days)</h2><table id="certificates"><tr><th>id</th><th>kind</th><th>not after</th><th>expires</th></tr>{rows}</table>"#
    )
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn state_of(s: &SiteState) -> (&'static str, &'static str) {
    let colour = match s {
        SiteState::Fresh => "#2e9d4f",
        SiteState::Stale { .. } => "#e09a1b",
        SiteState::Withdrawn { .. } => "#c73a3a",
    };
    (s.name(), colour)
}

/// The page for one catalog (pure, for tests).
pub fn render(c: &Catalog, now_ms: u64, node: u64, leader: Option<u64>) -> String {
    let sites: Vec<_> = c.sites.values().collect();
    let n = sites.len().max(1) as f64;
    let (w, h, r) = (640.0, 420.0, 150.0);
    let pos = |i: usize| {
        let a = std::f64::consts::TAU * i as f64 / n - std::f64::consts::FRAC_PI_2;
        (w / 2.0 + r * a.cos(), h / 2.0 + r * a.sin())
    };
    let index = |name: &str| sites.iter().position(|s| s.name == name);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg id="topology" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">"#
    );
    for (i, s) in sites.iter().enumerate() {
        for l in &s.links {
            let Some(j) = index(&l.peer_site) else {
                continue;
            };
            let ((x1, y1), (x2, y2)) = (pos(i), pos(j));
            // Two directions of one pair are drawn side by side.
            let (dx, dy) = (y2 - y1, x1 - x2);
            let len = (dx * dx + dy * dy).sqrt().max(1.0);
            let (ox, oy) = (6.0 * dx / len, 6.0 * dy / len);
            let colour = if l.connected { "#2e9d4f" } else { "#c73a3a" };
            let label = match (l.connected, l.rtt_us) {
                (true, Some(us)) => format!("{:.2} ms", us as f64 / 1000.0),
                (true, None) => "up".into(),
                (false, _) => "down".into(),
            };
            let _ = write!(
                svg,
                r#"<g class="link" data-from="{f}" data-to="{t}" data-up="{up}"><title>{f} → {t}: {tip}</title><line x1="{a:.1}" y1="{b:.1}" x2="{c:.1}" y2="{d:.1}" stroke="{colour}" stroke-width="3" marker-end="url(#arrow)"{dash}/><text x="{mx:.1}" y="{my:.1}" font-size="11" fill="{colour}">{label}</text></g>"#,
                f = esc(&s.name),
                t = esc(&l.peer_site),
                up = l.connected,
                tip = esc(l
                    .last_error
                    .as_deref()
                    .unwrap_or(l.transport.as_deref().unwrap_or(""))),
                a = x1 + ox,
                b = y1 + oy,
                c = x2 + ox,
                d = y2 + oy,
                dash = if l.connected {
                    ""
                } else {
                    r#" stroke-dasharray="6 4""#
                },
                mx = (x1 + x2) / 2.0 + 2.5 * ox,
                my = (y1 + y2) / 2.0 + 2.5 * oy,
            );
        }
    }
    for (i, s) in sites.iter().enumerate() {
        let (x, y) = pos(i);
        let (state, colour) = state_of(&s.state);
        let _ = write!(
            svg,
            r##"<g class="site" data-site="{name}" data-state="{state}"><circle cx="{x:.1}" cy="{y:.1}" r="28" fill="{colour}"/><text x="{x:.1}" y="{ty:.1}" text-anchor="middle" font-size="13" fill="white">{name}</text><text x="{x:.1}" y="{sy:.1}" text-anchor="middle" font-size="11" fill="#444">{region}/{zone} · {state}{stale}</text></g>"##,
            name = esc(&s.name),
            ty = y + 4.0,
            sy = y + 44.0,
            region = esc(&s.locality.region),
            zone = esc(&s.locality.zone),
            stale = match s.staleness_seconds(now_ms) {
                0 => String::new(),
                secs => format!(" {secs}s"),
            },
        );
    }
    svg.push_str(r##"<defs><marker id="arrow" viewBox="0 0 10 10" refX="30" refY="5" markerWidth="6" markerHeight="6" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#666"/></marker></defs></svg>"##);

    let mut rows = String::new();
    for svc in c.services() {
        let ports: Vec<String> = svc
            .ports
            .iter()
            .map(|p| format!("{}:{}", esc(&p.name), p.port))
            .collect();
        let groups: Vec<String> = svc
            .groups
            .iter()
            .map(|g| {
                format!(
                    r#"<span class="group" data-site="{0}">{0}: {1}</span>"#,
                    esc(&g.site),
                    g.ready_count()
                )
            })
            .collect();
        let conflicts = match (svc.conflicts.len(), svc.type_conflicts.len()) {
            (0, 0) => String::new(),
            (ports, 0) => format!(r#" <b class="bad">{ports} port conflict(s)</b>"#),
            (ports, types) => {
                format!(r#" <b class="bad">{ports} port conflict(s), {types} type conflict(s)</b>"#)
            }
        };
        let _ = write!(
            rows,
            r#"<tr class="service" data-service="{key}"><td>{key}</td><td>{ports}</td><td>{groups}{conflicts}</td></tr>"#,
            key = esc(&svc.key.to_string()),
            ports = ports.join(", "),
            groups = groups.join(" "),
        );
    }
    // Sites with several gateways: each gateway, its addresses, heartbeat and links.
    let mut gateways = String::new();
    for s in c.sites.values() {
        for i in &s.instances {
            let links: Vec<String> = i
                .links
                .iter()
                .map(|l| {
                    format!(
                        r#"<span class="{cls}">{} {}</span>"#,
                        esc(&l.peer_site),
                        if l.connected { "up" } else { "down" },
                        cls = if l.connected { "group" } else { "group bad" },
                    )
                })
                .collect();
            let _ = write!(
                gateways,
                r#"<tr class="gateway" data-site="{site}" data-gateway="{name}"><td>{site}</td><td>{name}</td><td>{addrs}</td><td>{age:.1}s</td><td>{links}</td></tr>"#,
                site = esc(&s.name),
                name = esc(&i.name),
                addrs = esc(&i.gateways.join(", ")),
                age = now_ms.saturating_sub(i.last_heartbeat_ms) as f64 / 1000.0,
                links = links.join(" "),
            );
        }
    }
    let gateways = if gateways.is_empty() {
        String::new()
    } else {
        format!(
            r#"<h2>Gateways</h2><table id="gateways"><tr><th>site</th><th>gateway</th><th>addresses</th><th>heartbeat</th><th>links</th></tr>{gateways}</table>"#
        )
    };
    format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="2"><title>meshbridge status</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px;color:#222}}table{{border-collapse:collapse}}td,th{{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}}.bad{{color:#c73a3a}}.group{{margin-right:10px}}</style></head>
<body><h1>meshbridge</h1><p id="summary">registry node {node}, leader {leader}, catalog revision {rev}, {ns} sites, {nv} services</p>
{svg}
{gateways}
<h2>Services</h2><table id="services"><tr><th>service</th><th>ports</th><th>ready endpoints per site</th></tr>{rows}</table></body></html>"#,
        leader = leader
            .map(|l| l.to_string())
            .unwrap_or_else(|| "none".into()),
        rev = c.revision,
        ns = c.sites.len(),
        nv = c.services().len(),
    )
}

#[cfg(test)]
mod tests {
    use meshbridge_core::model::{Command, Link, Locality, SiteKind, SiteSpec};

    use super::*;

    #[test]
    fn page_shows_sites_links_and_escapes_errors() {
        let mut c = Catalog::default();
        for name in ["east", "west"] {
            let spec = SiteSpec {
                name: name.into(),
                kind: SiteKind::Cluster,
                locality: Locality {
                    region: "us".into(),
                    zone: name.into(),
                },
                gateways: vec!["127.0.0.1:1".into()],
                lease_ttl_ms: 1000,
                grace_ms: 1000,
                instance: String::new(),
            };
            c.apply(&Command::RegisterSite { spec, at_ms: 1 }).unwrap();
        }
        let links = vec![Link {
            peer_site: "east".into(),
            connected: false,
            failures: 2,
            last_error: Some("<script>unknown issuer</script>".into()),
            ..Link::default()
        }];
        c.apply(&Command::Heartbeat {
            site: "west".into(),
            at_ms: 2,
            links: Some(links),
            instance: String::new(),
            xds_rejections: None,
        })
        .unwrap();
        let html = render(&c, 3, 1, Some(1));
        assert!(html.contains(r#"data-site="east" data-state="fresh""#));
        assert!(html.contains(r#"data-from="west" data-to="east" data-up="false""#));
        assert!(html.contains("&lt;script&gt;") && !html.contains("<script>"));
    }

    #[test]
    fn certificates_expiring_soon_are_listed_and_expired_ones_marked() {
        use meshbridge_core::proto::SeenCertificate;
        let cert = |id: &str, left: i64| SeenCertificate {
            id: id.into(),
            kind: "client".into(),
            not_before_unix: 0,
            not_after_unix: 1_000_000 + left,
            last_seen_unix_ms: 0,
        };
        let html = super::expiring(
            &[
                cert("spiffe://t/site/a/gateway", 3 * 86_400),
                cert("spiffe://t/site/b/<dns>", -5),
                cert("spiffe://t/site/c/agent", 30 * 86_400),
            ],
            1_000_000,
        );
        assert!(
            html.contains("site/a/gateway") && html.contains("in 3 days"),
            "{html}"
        );
        assert!(
            html.contains("site/b/&lt;dns&gt;") && html.contains("EXPIRED"),
            "{html}"
        );
        assert!(!html.contains("site/c/agent"), "{html}");
        assert_eq!(super::expiring(&[cert("x", 30 * 86_400)], 1_000_000), "");
    }
}
