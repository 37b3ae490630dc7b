//! The registry's `/ui` status page, loaded in headless Chromium against a running demo:
//! every site and the links between them are drawn, and the services table lists the echo
//! service with its per-site endpoints.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

fn chromium() -> Option<&'static str> {
    let found = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI must install chromium (apt-get install chromium) for the status page test"
        );
        eprintln!("skipping: chromium is not installed here (CI installs it)");
    }
    found
}

async fn dump_dom(browser: &str, url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=2000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--dump-dom", url])
        .output()
        .await
        .unwrap();
    if out.stdout.is_empty() {
        eprintln!(
            "chromium printed nothing: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn status_page_shows_every_site_link_and_service_of_the_demo() {
    let Some(browser) = chromium() else { return };
    let mut demo = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshbridge"))
        .arg("demo")
        .env("MESHBRIDGE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut admins = Vec::new();
    let mut seen = Vec::new();
    let collect = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            seen.push(line.clone());
            // "curl http://127.0.0.1:PORT/metrics   # registry-N"
            if let Some(rest) = line.trim().strip_prefix("curl http://")
                && line.contains("# registry-")
            {
                admins.push(rest.split('/').next().unwrap().to_string());
            }
            if line.contains("# gateway-west") {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), collect)
        .await
        .expect("the demo came up");
    assert!(
        seen.iter().any(|l| l.contains("all 4 steps passed")),
        "{seen:#?}"
    );
    // The leader was killed in the story; any surviving node serves the page.
    // Bounded retries: a loaded machine can make a browser start fail now and then.
    let mut dom = String::new();
    'found: for _ in 0..5 {
        for admin in &admins {
            dom = dump_dom(browser, &format!("http://{admin}/ui")).await;
            if dom.contains("id=\"topology\"") {
                break 'found;
            }
        }
    }
    for site in ["east", "west", "vm"] {
        assert!(
            dom.contains(&format!("data-site=\"{site}\" data-state=\"fresh\"")),
            "site {site} missing:\n{dom}"
        );
    }
    for peer in ["east", "vm"] {
        assert!(
            dom.contains(&format!(
                "data-from=\"west\" data-to=\"{peer}\" data-up=\"true\""
            )),
            "link west → {peer} missing:\n{dom}"
        );
    }
    assert!(dom.contains("data-service=\"demo/echo\""), "{dom}");
    assert!(dom.contains("3 sites, 1 services"), "{dom}");
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &demo.id().unwrap().to_string()])
        .status();
    let status = tokio::time::timeout(Duration::from_secs(20), demo.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.success(),
        "the demo stops cleanly on SIGTERM: {status:?}"
    );
}
