//! Machine-wide exclusive slots for tests that need a fixed resource of their own, such as
//! a /24 of loopback VIPs: nextest runs every test in its own process, so an in-process
//! counter cannot keep two tests apart. A slot is an advisory lock on a file under the
//! temp dir; the kernel drops it when the holding process exits, so nothing goes stale.

use std::fs::{File, OpenOptions};
use std::sync::Mutex;

/// Locks held until this process exits.
static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());

/// Take the lowest free slot of `count` in `family`, held until this process exits.
/// Panics when every slot is taken (more parallel tests than slots: raise `count`).
pub fn take(family: &str, count: u32) -> u32 {
    let dir = std::env::temp_dir().join("meshbridge-test-slots");
    std::fs::create_dir_all(&dir).unwrap();
    for n in 0..count {
        let path = dir.join(format!("{family}-{n}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap();
        if file.try_lock().is_ok() {
            HELD.lock().unwrap().push(file);
            return n;
        }
    }
    panic!("all {count} {family} slots are held by other processes");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_never_gets_the_same_slot_twice() {
        let a = take("selftest", 64);
        let b = take("selftest", 64);
        assert_ne!(a, b);
        // A held slot is locked: another open of the same file cannot lock it.
        let dir = std::env::temp_dir().join("meshbridge-test-slots");
        let f = File::open(dir.join(format!("selftest-{a}.lock"))).unwrap();
        assert!(f.try_lock().is_err());
    }
}
