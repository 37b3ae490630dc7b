//! glibc's allocator, tuned for the data plane by re-executing with `GLIBC_TUNABLES`.
//!
//! By default glibc gives the top of its heap back to the kernel (`brk`) as soon as 128 KiB
//! are free there, and takes it again, page fault by page fault, on the next allocation.
//! A gateway receiving a TCP-fallback tunnel allocates each HTTP/2 frame it receives (up to
//! 256 KiB, inside the h2 crate) and frees it once written on: measured, 214,283 page faults
//! and 4,808 `brk` in 5 s of one stream on the receiving gateway, and 896 and 14 with the
//! thresholds below, for 1.1–1.25× the throughput and the same memory per connection
//! (docs/BENCHMARKS.md). The workspace forbids `unsafe`, so `mallopt` is out of reach; the
//! same settings are glibc tunables, read at process start: the data-plane roles re-execute
//! themselves (same pid, name, arguments and environment) with them set.
//!
//! Not done when `GLIBC_TUNABLES` already sets a `glibc.malloc.` tunable (the operator's
//! choice wins), when `MESHBRIDGE_MALLOC_TUNING=off`, or off glibc Linux. If the re-exec
//! fails, the process goes on with glibc's defaults.

/// Keep up to 64 MiB free at the heap's top; serve allocations below 4 MiB from the heap.
pub const TUNABLES: &str =
    "glibc.malloc.trim_threshold=67108864:glibc.malloc.mmap_threshold=4194304";

/// The environment variable that turns the re-exec off (`off`, `0` or `false`).
pub const OPT_OUT: &str = "MESHBRIDGE_MALLOC_TUNING";

/// Whether [`OPT_OUT`]'s value turns the tuning off; `Err` names a value that is neither
/// on nor off (taken as on, the default).
pub fn opted_out(value: Option<&str>) -> Result<bool, String> {
    match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("" | "on" | "1" | "true") => Ok(false),
        Some("off" | "0" | "false") => Ok(true),
        Some(other) => Err(format!(
            "{OPT_OUT}={other:?} is neither on (on, 1, true) nor off (off, 0, false); taken as on"
        )),
    }
}

/// The `GLIBC_TUNABLES` to re-execute with, or `None` to run as is.
pub fn tunables(current: Option<&str>, opt_out: Option<&str>) -> Option<String> {
    if opted_out(opt_out).unwrap_or(false) {
        return None;
    }
    match current.map(str::trim).filter(|c| !c.is_empty()) {
        None => Some(TUNABLES.to_string()),
        Some(c) if c.contains("glibc.malloc.") => None,
        Some(c) => Some(format!("{c}:{TUNABLES}")),
    }
}

/// Re-execute this process with [`TUNABLES`] when [`tunables`] says so. Returns only when
/// nothing was done or the exec failed (then why, for the log).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn reexec_tuned() -> Option<String> {
    use std::os::unix::process::CommandExt;
    let current = std::env::var("GLIBC_TUNABLES").ok();
    let opt_out = std::env::var(OPT_OUT).ok();
    let value = tunables(current.as_deref(), opt_out.as_deref())?;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "meshbridge".into());
    let err = std::process::Command::new(this_binary())
        .arg0(arg0)
        .args(args)
        .env("GLIBC_TUNABLES", value)
        .exec();
    Some(format!(
        "re-executing with GLIBC_TUNABLES failed ({err}); glibc's malloc defaults stay"
    ))
}

/// The file to re-execute: this binary's own path, so the process keeps its name (the
/// kernel names a process after the file it executes, and `ps`, `top`, `pgrep meshbridge`
/// and `pkill meshbridge` go by that name), unless that path no longer holds this binary
/// (replaced or deleted since start): then `/proc/self/exe`, which always does, at the cost
/// of the process being named `exe`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn this_binary() -> std::path::PathBuf {
    use std::os::unix::fs::MetadataExt;
    const SELF: &str = "/proc/self/exe";
    let same = |path: &std::path::Path| match (std::fs::metadata(path), std::fs::metadata(SELF)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    };
    match std::env::current_exe() {
        Ok(path) if same(&path) => path,
        _ => SELF.into(),
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn reexec_tuned() -> Option<String> {
    None
}

#[cfg(test)]
mod tests {
    use super::{TUNABLES, opted_out, tunables};

    #[test]
    fn tunables_are_added_unless_the_operator_set_malloc_ones_or_opted_out() {
        assert_eq!(tunables(None, None).as_deref(), Some(TUNABLES));
        assert_eq!(tunables(Some(""), None).as_deref(), Some(TUNABLES));
        // Other tunables are kept, ours appended.
        assert_eq!(
            tunables(Some("glibc.pthread.rseq=0"), None),
            Some(format!("glibc.pthread.rseq=0:{TUNABLES}"))
        );
        // Any malloc tunable of the operator's: theirs stand alone (and no loop after the
        // re-exec, which sets ours).
        assert_eq!(tunables(Some("glibc.malloc.arena_max=2"), None), None);
        assert_eq!(tunables(Some(TUNABLES), None), None);
        for off in ["off", "0", "false", " off "] {
            assert_eq!(tunables(None, Some(off)), None, "{off:?}");
        }
        assert_eq!(tunables(None, Some("on")).as_deref(), Some(TUNABLES));
        assert_eq!(tunables(None, Some("OFF")), None);
    }

    #[test]
    fn a_value_that_is_neither_on_nor_off_is_named_and_taken_as_on() {
        let err = opted_out(Some("of")).err().unwrap_or_default();
        assert!(err.contains("MESHBRIDGE_MALLOC_TUNING=\"of\""), "{err}");
        assert_eq!(tunables(None, Some("of")).as_deref(), Some(TUNABLES));
    }
}
