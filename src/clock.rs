//! Wall-clock time in milliseconds, the unit the spool and the wire use; and durations as
//! people write them (`90s`, `5m`), bounded so that no setting overflows a clock.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A time in ms since the epoch as people read it in a log line: RFC 3339, whole seconds, UTC.
pub fn rfc3339_seconds(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// How often a [`Tally`] is said, at most.
pub const TALLY_PERIOD: Duration = Duration::from_secs(60);

/// A count of something too frequent to log each time (pruning for room, connections shed, a
/// flood's refusals), said at most once per [`TALLY_PERIOD`]: what was added since it was last
/// said. The first is said at once.
#[derive(Debug, Default)]
pub struct Tally {
    count: u64,
    said: Option<Instant>,
}

impl Tally {
    /// Add `n` at `now`; returns the count to say, if it is time to say it.
    pub fn add(&mut self, n: u64, now: Instant) -> Option<u64> {
        self.count += n;
        let due = self
            .said
            .is_none_or(|said| now.duration_since(said) >= TALLY_PERIOD);
        if self.count == 0 || !due {
            return None;
        }
        self.said = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

/// How long ago `ms` was, for people.
pub fn age(ms: u64) -> Duration {
    Duration::from_millis(now_ms().saturating_sub(ms))
}

/// The longest duration any setting takes. Far beyond any sensible value (a retention of
/// decades is still in reach), and far below what overflows a deadline: `300000000000y`
/// parses, and a clock's `now + that` panics.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600); // humantime's 100y

/// A duration such as `90s`, `5m` or `1h 30m`, zero allowed, at most [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, crate::error::Invalid> {
    let duration = humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration like 30s, 5m or 1h: {e}"))?;
    if duration > MAX_DURATION {
        return Err(format!("{text:?} is longer than 100 years, which no setting needs").into());
    }
    Ok(duration)
}

/// [`parse_duration`], refusing zero: a zero timeout, interval or tolerance would make a loop
/// spin or refuse everything.
pub fn parse_positive_duration(text: &str) -> Result<Duration, crate::error::Invalid> {
    match parse_duration(text)? {
        d if d.is_zero() => Err(format!("{text:?}: must be more than zero").into()),
        d => Ok(d),
    }
}

/// [`parse_duration`] for a config field read by serde.
pub fn deserialize_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = <String as serde::Deserialize>::deserialize(d)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: `--idle-timeout 300000000000y` (or the same in a config) was taken, and the
    /// first deadline made from it panicked (`overflow when adding duration to instant`): the
    /// channel's task died at every start, and `serve --read-timeout` so failed every request.
    #[test]
    fn regression_a_duration_of_billions_of_years_overflowed_a_deadline() {
        let said = parse_duration("300000000000y").unwrap_err().to_string();
        assert!(said.contains("longer than 100 years"), "{said}");
        assert_eq!(parse_duration("100y").unwrap(), MAX_DURATION);
        assert!(parse_duration("100y 1s").is_err());
        assert!(
            std::time::Instant::now()
                .checked_add(MAX_DURATION)
                .is_some()
        );
        assert!(
            tokio::time::Instant::now()
                .checked_add(MAX_DURATION)
                .is_some()
        );
        assert_eq!(parse_duration(" 0s ").unwrap(), Duration::ZERO);
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .to_string()
                .contains("like 30s")
        );
    }
}
