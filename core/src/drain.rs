//! Graceful shutdown: signal → not ready → stop accepting → wait for in-flight work up to a
//! deadline → force.
//!
//! A [`Trigger`] starts the drain; every task holds a [`Watch`] to learn about it, and every
//! in-flight unit of work (a proxied connection, an RPC) holds a [`Guard`].

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

struct Shared {
    inflight: AtomicUsize,
    idle: Notify,
}

/// Starts the drain.
pub struct Trigger {
    tx: watch::Sender<bool>,
    shared: Arc<Shared>,
}

/// Learns that a drain started; hands out guards.
#[derive(Clone)]
pub struct Watch {
    rx: watch::Receiver<bool>,
    shared: Arc<Shared>,
}

/// Held by one unit of in-flight work; the drain waits for all guards to drop.
pub struct Guard {
    shared: Arc<Shared>,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything finished before the deadline.
    Graceful,
    /// The deadline passed with this much work still in flight.
    Forced { remaining: usize },
}

/// The end of every role's drain (gateway streams, registry calls, DNS sockets): wait up
/// to `deadline` for `done`; if the deadline passes first, the drain is forced with
/// `remaining()` units of work still in flight (at least one: something did not finish).
pub async fn within(
    deadline: Duration,
    done: impl Future<Output = ()>,
    remaining: impl FnOnce() -> usize,
) -> Outcome {
    match tokio::time::timeout(deadline, done).await {
        Ok(()) => Outcome::Graceful,
        Err(_) => Outcome::Forced {
            remaining: remaining().max(1),
        },
    }
}

/// A new trigger/watch pair.
pub fn channel() -> (Trigger, Watch) {
    let (tx, rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        inflight: AtomicUsize::new(0),
        idle: Notify::new(),
    });
    (
        Trigger {
            tx,
            shared: shared.clone(),
        },
        Watch { rx, shared },
    )
}

impl Trigger {
    /// Announce the drain now (every [`Watch::is_draining`] answers true from here on),
    /// before waiting: a caller that reports not-ready must do this first, or a client
    /// that sees not-ready could still be served as if nothing were draining.
    pub fn announce(&self) {
        let _ = self.tx.send(true);
    }

    /// Announce the drain, then wait up to `deadline` for every guard to drop.
    pub async fn drain(self, deadline: Duration) -> Outcome {
        let _ = self.tx.send(true);
        let shared = &self.shared;
        let idle = async {
            loop {
                let notified = shared.idle.notified();
                if shared.inflight.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        within(deadline, idle, || shared.inflight.load(Ordering::Acquire)).await
    }

    /// A watch tied to this trigger.
    pub fn watch(&self) -> Watch {
        Watch {
            rx: self.tx.subscribe(),
            shared: self.shared.clone(),
        }
    }
}

impl Watch {
    /// Resolves once the drain has started (at once if it already has).
    pub async fn signaled(&self) {
        let mut rx = self.rx.clone();
        let _ = rx.wait_for(|d| *d).await;
    }

    pub fn is_draining(&self) -> bool {
        *self.rx.borrow()
    }

    /// Count one unit of in-flight work until the guard drops.
    pub fn guard(&self) -> Guard {
        self.shared.inflight.fetch_add(1, Ordering::AcqRel);
        Guard {
            shared: self.shared.clone(),
        }
    }

    /// Units of work in flight now.
    pub fn inflight(&self) -> usize {
        self.shared.inflight.load(Ordering::Acquire)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.shared.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.idle.notify_waiters();
        }
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called, not
/// when the future is first polled: call it before announcing readiness (the "listening"
/// line), so that a signal sent right after that line is caught instead of killing the
/// process with the default action (exit by signal, no drain).
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        match handlers {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn within_is_graceful_when_the_work_ends_and_forced_with_at_least_one_left_when_not() {
        let quick = tokio::time::sleep(Duration::from_millis(10));
        assert_eq!(
            within(Duration::from_secs(1), quick, || 7).await,
            Outcome::Graceful
        );
        let stuck = std::future::pending::<()>();
        assert_eq!(
            within(Duration::from_secs(1), stuck, || 3).await,
            Outcome::Forced { remaining: 3 }
        );
        // Unknown counts (a server that does not count its calls) still read as forced.
        assert_eq!(
            within(Duration::from_secs(1), std::future::pending(), || 0).await,
            Outcome::Forced { remaining: 1 }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_guards_then_reports_graceful() {
        let (trigger, watch) = channel();
        let guard = watch.guard();
        let w2 = watch.clone();
        let task = tokio::spawn(async move {
            w2.signaled().await;
            drop(guard);
        });
        assert_eq!(
            trigger.drain(Duration::from_secs(5)).await,
            Outcome::Graceful
        );
        task.await.unwrap();
        assert!(watch.is_draining());
    }

    #[tokio::test(start_paused = true)]
    async fn drain_forces_after_the_deadline() {
        let (trigger, watch) = channel();
        let _stuck = watch.guard();
        assert_eq!(
            trigger.drain(Duration::from_secs(2)).await,
            Outcome::Forced { remaining: 1 }
        );
    }

    /// A SIGTERM that arrives after `shutdown_signal()` was called but before its future is
    /// polled is caught (the process would otherwise die of it: this test process too).
    #[tokio::test]
    async fn a_signal_right_after_the_call_is_caught_not_fatal() {
        let stop = shutdown_signal();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success());
        tokio::time::timeout(Duration::from_secs(10), stop)
            .await
            .expect("the signal resolves the future");
    }
}
