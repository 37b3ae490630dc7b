//! Small synchronisation helpers shared by the crates.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, going on with the data if a holder panicked: every mutex in meshbridge guards
/// state that stays consistent between statements (maps, counters, queues), so a panic
/// elsewhere must not take the process's other tasks down with it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_mutex_still_locks_with_its_data() {
        let m = std::sync::Arc::new(Mutex::new(vec![1]));
        let m2 = m.clone();
        let panicked = std::thread::spawn(move || {
            let mut v = lock(&m2);
            v.push(2);
            panic!("holder panics");
        })
        .join();
        assert!(panicked.is_err());
        assert!(m.is_poisoned());
        assert_eq!(*lock(&m), vec![1, 2]);
    }
}
