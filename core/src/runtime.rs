//! The tokio runtime a long-running role runs on, sized by its `workers` setting.
//!
//! One worker is tokio's current-thread scheduler: every task, timer and socket of the
//! process on one thread, so a request's path has no hand-offs between threads (no futex
//! wake-ups, no work stealing). On the 2-core machines the benchmarks run on, that is both
//! faster and cheaper for the gateway than a thread per core; see `docs/BENCHMARKS.md`.
//! More workers use tokio's multi-thread scheduler; 0 means one per CPU.

/// Most worker threads a configuration may ask for.
pub const MAX_WORKERS: usize = 1024;

/// Checks a `workers` setting (for [`crate::config::RoleConfig::validate`]).
pub fn check_workers(p: &mut crate::config::Problems, field: &str, workers: usize) {
    p.check(
        workers <= MAX_WORKERS,
        field,
        format!("{workers} is more than {MAX_WORKERS}"),
    );
}

/// A runtime with `workers` threads (1: current-thread; 0: one per CPU), I/O and time on.
pub fn build(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match workers {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    builder.enable_all().build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_worker_runs_everything_on_the_calling_thread() -> std::io::Result<()> {
        let caller = std::thread::current().id();
        let rt = build(1)?;
        let on = rt.block_on(async { tokio::spawn(async { std::thread::current().id() }).await });
        assert_eq!(on.ok(), Some(caller));
        Ok(())
    }

    #[test]
    fn more_workers_run_tasks_on_worker_threads() -> std::io::Result<()> {
        let caller = std::thread::current().id();
        let rt = build(2)?;
        assert_eq!(rt.metrics().num_workers(), 2);
        let on = rt.block_on(async { tokio::spawn(async { std::thread::current().id() }).await });
        assert_ne!(on.ok(), Some(caller));
        Ok(())
    }

    #[test]
    fn too_many_workers_is_a_problem_naming_the_field() {
        let mut p = crate::config::Problems::default();
        check_workers(&mut p, "workers", MAX_WORKERS);
        assert!(p.0.is_empty());
        check_workers(&mut p, "workers", MAX_WORKERS + 1);
        assert_eq!(p.0.len(), 1);
        assert_eq!(p.0[0].field, "workers");
    }
}
