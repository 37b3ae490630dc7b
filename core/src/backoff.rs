//! Exponential backoff, one definition for every retry loop and ejection in meshbridge.

use std::time::Duration;

/// `initial` doubled `step` times, at most `max` (no overflow, however large `step`).
pub fn exponential(initial: Duration, max: Duration, step: u32) -> Duration {
    initial.saturating_mul(1u32 << step.min(16)).min(max)
}

/// The delays of a retry loop: `initial`, then doubling up to `max`, until [`Backoff::reset`]
/// after a success.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    step: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            step: 0,
        }
    }

    /// The delay before the next attempt; the one after is twice as long (up to `max`).
    pub fn next_delay(&mut self) -> Duration {
        let d = exponential(self.initial, self.max, self.step);
        self.step = self.step.saturating_add(1);
        d
    }

    /// What [`Backoff::next_delay`] will return, without moving on.
    pub fn peek(&self) -> Duration {
        exponential(self.initial, self.max, self.step)
    }

    /// After a success: start again from `initial`.
    pub fn reset(&mut self) {
        self.step = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_up_to_the_cap_and_starts_over_after_a_reset() {
        let mut b = Backoff::new(500 * MS, 3_000 * MS);
        let got: Vec<u128> = (0..6).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, vec![500, 1000, 2000, 3000, 3000, 3000]);
        b.reset();
        assert_eq!(b.peek(), 500 * MS);
        assert_eq!(b.next_delay(), 500 * MS);
    }

    #[test]
    fn huge_steps_neither_overflow_nor_exceed_the_cap() {
        assert_eq!(exponential(Duration::MAX, 7 * MS, 40), 7 * MS);
        assert_eq!(exponential(MS, Duration::MAX, u32::MAX), MS * (1 << 16));
    }
}
