//! `meshbridge demo --smoke`: the whole story, unattended, with a bound on its run time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn demo_smoke_passes_every_step_within_a_minute() {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_meshbridge"))
        .args(["demo", "--smoke"])
        .env("MESHBRIDGE_LOG", "warn")
        .output()
        .expect("run the demo");
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
