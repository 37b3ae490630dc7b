//! The wall clock, in the units the catalog and certificates use. A clock before the epoch
//! reads as 0 (never a panic): leases and expiry checks then err on the side of "old".

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Seconds since the Unix epoch (signed, as X.509 times are compared).
pub fn unix_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    #[test]
    fn both_units_read_the_same_clock() {
        let ms = super::unix_ms();
        let secs = super::unix_secs();
        assert!(ms > 1_600_000_000_000, "{ms}");
        assert!((secs - (ms / 1000) as i64).abs() <= 1, "{secs} {ms}");
    }
}
