//! Wall-clock time in milliseconds, the unit the spool and the wire use.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How long ago `ms` was, for people.
pub fn age(ms: u64) -> Duration {
    Duration::from_millis(now_ms().saturating_sub(ms))
}
