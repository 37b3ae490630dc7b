//! Output into a closed pipe (`meshbridge ctl status | head -3`) ends the process quietly,
//! as SIGPIPE ends other tools (exit status 141), instead of a panic with a backtrace.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};

#[test]
fn writing_into_a_closed_pipe_ends_quietly() {
    // A pipe whose reading end is closed before the process starts: its first line to
    // stdout (the echo server's "listening on ...") meets EPIPE.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_meshbridge"))
        .args(["echo", "--listen", "127.0.0.1:0", "--name", "x"])
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{stderr}");
}
