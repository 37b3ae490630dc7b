//! `meshbridge demo --smoke`: the whole story, unattended, with a bound on its run time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

fn smoke() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_meshbridge"));
    c.args(["demo", "--smoke"]).env("MESHBRIDGE_LOG", "warn");
    c
}

#[test]
fn demo_smoke_passes_every_step_within_a_minute() {
    let started = Instant::now();
    let out = smoke().output().expect("run the demo");
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("all 4 steps passed"), "{text}");
    assert_eq!(text.matches("[ok]").count(), 4, "{text}");
    assert!(text.contains("reply \"east: hello from west\""), "{text}");
    assert!(text.contains("reply \"vm: hello again\""), "{text}");
    assert!(took < Duration::from_secs(60), "the demo took {took:?}");
}

/// Two demos at once on one machine (as the tests run them) each answer their own clients:
/// they used to share west's VIP block, so one demo's client reached the other's gateway
/// ("expected the VM to answer, got \"east: hello again\"").
#[test]
fn two_demos_at_once_do_not_answer_each_others_clients() {
    let children: Vec<_> = (0..2)
        .map(|_| {
            smoke()
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("run a demo")
        })
        .collect();
    let mut vips = Vec::new();
    for child in children {
        let out = child.wait_with_output().expect("a demo's output");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "a demo failed:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let vip = text
            .split("echo.demo.svc.clusterset.local A ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_default()
            .to_string();
        vips.push(vip);
    }
    assert_ne!(vips[0], vips[1], "both demos used one VIP: {vips:?}");
}
