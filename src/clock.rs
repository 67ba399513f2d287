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

/// Lines about something that may come in a flood (a hostile channel's malformed frames):
/// the first [`Said::PER_MINUTE`] of each minute said, the rest counted and said in one line
/// when the next comes after the minute.
#[derive(Debug, Default)]
pub struct Said {
    /// When the current minute began.
    since: Option<Instant>,
    /// Said in it.
    said: u32,
    /// Not said in it.
    unsaid: u64,
}

/// Whether to say one of [`Said`]'s lines.
#[derive(Debug, PartialEq, Eq)]
pub enum Say {
    Yes,
    /// Yes, the last of the minute: it says so.
    Last,
    No,
}

impl Said {
    pub const PER_MINUTE: u32 = 10;

    /// What went unsaid in a minute that is over at `now` (to say now: the flood ended);
    /// 0 if none, or the minute is not over. Cheap when nothing went unsaid.
    pub fn over(&mut self, now: impl FnOnce() -> Instant) -> u64 {
        if self.unsaid == 0 {
            return 0;
        }
        let now = now();
        match self.since {
            Some(since) if now.duration_since(since) < TALLY_PERIOD => 0,
            _ => {
                self.since = None;
                std::mem::take(&mut self.unsaid)
            }
        }
    }

    /// One more at `now`: whether to say it, and how many of the minute before went unsaid
    /// (to say first).
    pub fn next(&mut self, now: Instant) -> (Say, u64) {
        let mut unsaid = 0;
        if self
            .since
            .is_none_or(|since| now.duration_since(since) >= TALLY_PERIOD)
        {
            unsaid = std::mem::take(&mut self.unsaid);
            self.since = Some(now);
            self.said = 0;
        }
        let say = match self.said + 1 {
            n if n < Self::PER_MINUTE => Say::Yes,
            n if n == Self::PER_MINUTE => Say::Last,
            _ => {
                self.unsaid += 1;
                return (Say::No, unsaid);
            }
        };
        self.said += 1;
        (say, unsaid)
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

#[cfg(test)]
mod said_tests {
    use super::*;

    /// Regression (helper-137): 500,000 malformed frames of a hostile channel made a line each.
    /// The first ten of a minute are said, the rest counted into one line after it.
    #[test]
    fn regression_a_flood_of_malformed_frames_was_said_a_line_each() {
        let mut said = Said::default();
        let start = Instant::now();
        let lines: Vec<_> = (0..1000).map(|_| said.next(start)).collect();
        assert_eq!(lines.iter().filter(|(say, _)| *say == Say::Yes).count(), 9);
        assert_eq!(lines[9], (Say::Last, 0));
        assert!(lines[10..].iter().all(|line| *line == (Say::No, 0)));
        assert_eq!(said.next(start + TALLY_PERIOD), (Say::Yes, 990));
        assert_eq!(said.next(start + TALLY_PERIOD * 3), (Say::Yes, 0));
        // A flood that ends: its count is said at the next good frame after its minute
        // (helper-139: only at the next bad one, which may never come).
        for _ in 0..20 {
            said.next(start + TALLY_PERIOD * 4);
        }
        assert_eq!(
            said.over(|| start + TALLY_PERIOD * 4),
            0,
            "the minute not over"
        );
        assert_eq!(said.over(|| start + TALLY_PERIOD * 5), 10);
        assert_eq!(said.over(|| start + TALLY_PERIOD * 6), 0, "said once");
    }
}
