//! Backoff between attempts: reconnecting to a channel, retrying a delivery.
//!
//! One policy type serves every retry loop, so "1 s up to 30 s with jitter" means the same
//! thing everywhere. The delays come from `backon`'s exponential backoff with jitter; this
//! wrapper adds the two things the loops here need and `backon` leaves out: a hard ceiling
//! (backon's jitter may add up to 100% on top of its maximum) and a reset after a healthy spell.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// The shape of a backoff: first delay and ceiling, doubling in between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// The delay before the first retry.
    pub min: Duration,
    /// No delay is ever longer than this, jitter included.
    pub max: Duration,
}

impl BackoffPolicy {
    /// Reconnecting to a channel: 1 s up to 30 s.
    pub const RECONNECT: BackoffPolicy = BackoffPolicy {
        min: Duration::from_secs(1),
        max: Duration::from_secs(30),
    };

    /// A fresh sequence of delays.
    pub fn start(self) -> Backoff {
        Backoff {
            policy: self,
            delays: self.builder().build(),
        }
    }

    fn builder(self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.min)
            .with_max_delay(self.max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
    }
}

/// A running sequence of delays; [`Backoff::reset`] starts it over.
#[derive(Debug)]
pub struct Backoff {
    /// Kept to rebuild the sequence on reset.
    policy: BackoffPolicy,
    /// backon's iterator: exponential with jitter, never exhausted (no max times).
    delays: backon::ExponentialBackoff,
}

impl Backoff {
    /// The next delay to wait, between `min` and `max`.
    pub fn next_delay(&mut self) -> Duration {
        self.delays
            .next()
            .unwrap_or(self.policy.max)
            .clamp(self.policy.min, self.policy.max)
    }

    /// Start again from `min`, after things went well for a while.
    pub fn reset(&mut self) {
        self.delays = self.policy.builder().build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_stay_within_bounds_and_reset() {
        let mut backoff = BackoffPolicy::RECONNECT.start();
        let delays: Vec<Duration> = (0..12).map(|_| backoff.next_delay()).collect();
        assert!(delays.iter().all(|d| *d >= Duration::from_secs(1)));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(30)));
        assert!(
            delays[0] <= Duration::from_secs(2),
            "first delay {:?}",
            delays[0]
        );
        assert_eq!(
            delays[11],
            Duration::from_secs(30),
            "the ceiling is reached"
        );
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_secs(2));
    }
}
