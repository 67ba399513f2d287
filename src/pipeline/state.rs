//! Alert state per (rule, entity): OK, PENDING (held by `for`), FIRING.
//!
//! Alerts are sent on the way into FIRING and on the way out of it (RESOLVED), never while a
//! state holds. This module is pure: it takes the current phase, a verdict and the time, and
//! returns the next phase and what to send. Persistence is the spool's job.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::rules::Verdict;

/// Where an alert stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "phase", rename_all = "lowercase")]
pub enum Phase {
    #[default]
    Ok,
    /// The condition holds, but not yet for the rule's `for`.
    Pending {
        since_ms: u64,
    },
    Firing {
        since_ms: u64,
    },
}

/// What to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Fire,
    Resolve,
}

/// The next phase after `verdict` at `now_ms`, for a rule that holds for `hold`.
pub fn step(
    phase: Phase,
    verdict: &Verdict,
    hold: Duration,
    now_ms: u64,
) -> (Phase, Option<Transition>) {
    match (phase, verdict) {
        (_, Verdict::Keep | Verdict::Skip(_) | Verdict::Failed { .. }) => (phase, None),
        (Phase::Ok, Verdict::Bad) if hold.is_zero() => {
            (Phase::Firing { since_ms: now_ms }, Some(Transition::Fire))
        }
        (Phase::Ok, Verdict::Bad) => (Phase::Pending { since_ms: now_ms }, None),
        (Phase::Pending { since_ms }, Verdict::Bad) => {
            tick(Phase::Pending { since_ms }, hold, now_ms)
        }
        (Phase::Firing { .. }, Verdict::Bad) => (phase, None),
        (Phase::Ok | Phase::Pending { .. }, Verdict::Good) => (Phase::Ok, None),
        (Phase::Firing { .. }, Verdict::Good) => (Phase::Ok, Some(Transition::Resolve)),
    }
}

/// Time passing: a pending alert whose hold is over fires.
pub fn tick(phase: Phase, hold: Duration, now_ms: u64) -> (Phase, Option<Transition>) {
    match phase {
        Phase::Pending { since_ms }
            if now_ms.saturating_sub(since_ms) >= hold.as_millis() as u64 =>
        {
            (Phase::Firing { since_ms: now_ms }, Some(Transition::Fire))
        }
        other => (other, None),
    }
}

/// The entity is gone: a firing alert resolves, a pending one is forgotten.
pub fn entity_deleted(phase: Phase) -> (Phase, Option<Transition>) {
    match phase {
        Phase::Firing { .. } => (Phase::Ok, Some(Transition::Resolve)),
        _ => (Phase::Ok, None),
    }
}

/// When a pending alert is due, if it is pending.
pub fn due_at(phase: Phase, hold: Duration) -> Option<u64> {
    match phase {
        Phase::Pending { since_ms } => Some(since_ms + hold.as_millis() as u64),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;

    #[test]
    fn fires_once_and_resolves_once() {
        let zero = Duration::ZERO;
        let (p, t) = step(Phase::Ok, &Verdict::Bad, zero, NOW);
        assert_eq!(t, Some(Transition::Fire));
        let (p, t) = step(p, &Verdict::Bad, zero, NOW + 1);
        assert_eq!(t, None, "already firing");
        let (p, t) = step(p, &Verdict::Keep, zero, NOW + 2);
        assert_eq!(t, None, "hysteresis band");
        let (p, t) = step(p, &Verdict::Good, zero, NOW + 3);
        assert_eq!((p, t), (Phase::Ok, Some(Transition::Resolve)));
        let (_, t) = step(p, &Verdict::Good, zero, NOW + 4);
        assert_eq!(t, None);
    }

    #[test]
    fn a_hold_delays_firing_and_a_recovery_within_it_sends_nothing() {
        let hold = Duration::from_secs(60);
        let (p, t) = step(Phase::Ok, &Verdict::Bad, hold, NOW);
        assert_eq!((p, t), (Phase::Pending { since_ms: NOW }, None));
        assert_eq!(due_at(p, hold), Some(NOW + 60_000));
        assert_eq!(tick(p, hold, NOW + 59_999), (p, None));
        let (fired, t) = tick(p, hold, NOW + 60_000);
        assert_eq!(t, Some(Transition::Fire));
        assert!(matches!(fired, Phase::Firing { .. }));
        assert_eq!(
            step(p, &Verdict::Good, hold, NOW + 30_000),
            (Phase::Ok, None)
        );
    }

    #[test]
    fn deletion_resolves_only_what_fired_and_skips_change_nothing() {
        assert_eq!(
            entity_deleted(Phase::Firing { since_ms: 1 }),
            (Phase::Ok, Some(Transition::Resolve))
        );
        assert_eq!(
            entity_deleted(Phase::Pending { since_ms: 1 }),
            (Phase::Ok, None)
        );
        let firing = Phase::Firing { since_ms: 1 };
        assert_eq!(
            step(firing, &Verdict::Skip("x".into()), Duration::ZERO, NOW),
            (firing, None)
        );
    }
}
