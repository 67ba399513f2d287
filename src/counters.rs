//! Counters the relay keeps about itself, shared by the stages that count (intake, routes) and
//! read back by the service (the systemd status line, `/healthz`). Each bump is also a
//! Prometheus metric.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counters the relay keeps about itself: read back for the systemd status line, and
/// recorded as Prometheus metrics at the same time.
#[derive(Debug, Default)]
pub struct Counters {
    pub received: AtomicU64,
    pub refused: AtomicU64,
    /// When an event was last refused (Unix ms, 0: never): `/healthz` fails while the spool
    /// refuses events, since each one refused is lost.
    refused_at_ms: AtomicU64,
    /// Received events an intake gave up at a stop, the spool refusing writes: lost unless
    /// the channel sends them again. The stop line counts them (helper-137: it said "nothing
    /// waits: everything received was delivered" right below the error saying so).
    pub never_stored: AtomicU64,
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub dead: AtomicU64,
    /// The routes whose event at the head of the queue failed its last attempt, by queue (two
    /// channels' queues may share a target, and so a label): the target is down or refuses
    /// it, and everything behind it waits. Only a delivered (or given up, or handed over)
    /// event, or the route's end, takes a route off.
    failing: Mutex<BTreeMap<String, Failing>>,
    /// Queues holding deliveries that no route of this relay takes (a target a reload
    /// removed, a relay started again with another one), by queue: how many wait. The log
    /// says so once, with what to do; `/healthz` says it while the queue holds any (counted
    /// again when the spool changes: a purge empties it, a replay fills it) until a route
    /// for the queue starts. A target a reload removed is here, at 0, from then on. By queue:
    /// its target, as logs name it, and how many wait.
    unserved: Mutex<BTreeMap<String, (String, u64)>>,
    /// Reconciliation with Port's API, while its attempts fail (Port down, credentials
    /// refused): alerts missed in a gap wait for it, so `/healthz` says so.
    reconcile_failing: Mutex<Option<Failing>>,
}

/// A route whose head event failed its last attempt ([`Counters::failing`]).
#[derive(Debug, Clone)]
struct Failing {
    /// What logs and metrics call the route (its target).
    label: String,
    /// When the run of failed attempts began (Unix ms).
    since_ms: u64,
    /// Failed attempts in the run, across the events it spans.
    attempts: u64,
    /// What the last attempt met.
    last_error: String,
}

impl Failing {
    /// `failing for 2m 5s (7 attempts; last: ...)`, as of `now_ms`.
    fn said(&self, now_ms: u64) -> String {
        let for_ = Duration::from_secs(now_ms.saturating_sub(self.since_ms) / 1000);
        format!(
            "failing for {} ({}; last: {})",
            humantime::format_duration(for_),
            crate::error::count(self.attempts as usize, "attempt", "attempts"),
            self.last_error
        )
    }
}

impl Counters {
    /// Show the relay's own counters at 0 before their first event (once a recorder is
    /// installed): an alert on `increase()` sees the first one only if the series was there
    /// before it.
    pub fn register(&self) {
        metrics::counter!("smee_relay_events_received_total").increment(0);
        metrics::counter!("smee_relay_events_refused_total").increment(0);
    }

    pub fn received(&self, n: u64) {
        self.received.fetch_add(n, Ordering::Relaxed);
        metrics::counter!("smee_relay_events_received_total").increment(n);
    }

    /// An event refused (the spool full); returns how many so far.
    pub fn refused(&self) -> u64 {
        self.refused_at_ms
            .store(crate::clock::now_ms(), Ordering::Relaxed);
        metrics::counter!("smee_relay_events_refused_total").increment(1);
        self.refused.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The `/healthz` problem while events are being refused: one within the last minute.
    pub fn refusing_line(&self, now_ms: u64) -> Option<String> {
        let at = self.refused_at_ms.load(Ordering::Relaxed);
        (at != 0 && now_ms.saturating_sub(at) < 60_000).then(|| {
            format!(
                "the spool is full (--max-spool-size): received events are refused and lost \
                 ({} so far)",
                self.refused.load(Ordering::Relaxed)
            )
        })
    }

    /// Routes whose head event keeps failing, one line each (`/healthz` warnings, the status
    /// line): `route http://127.0.0.1:3000/hook failing for 2m 5s (7 attempts; last: ...)`.
    pub fn failing(&self, now_ms: u64) -> Vec<String> {
        lock(&self.failing)
            .values()
            .map(|failing| format!("route {} {}", failing.label, failing.said(now_ms)))
            .collect()
    }

    /// A reconciliation with Port failed with `error`: one more attempt in the failing run.
    pub fn reconcile_failed(&self, error: &str) {
        let mut failing = lock(&self.reconcile_failing);
        let run = failing.get_or_insert_with(|| Failing {
            label: "Port reconciliation".into(),
            since_ms: crate::clock::now_ms(),
            attempts: 0,
            last_error: String::new(),
        });
        run.attempts += 1;
        run.last_error = error.to_string();
    }

    /// A reconciliation went through (or stopped): no longer failing.
    pub fn reconcile_ok(&self) {
        *lock(&self.reconcile_failing) = None;
    }

    /// The failing reconciliation, if it is (`/healthz` warnings).
    pub fn reconcile_line(&self, now_ms: u64) -> Option<String> {
        lock(&self.reconcile_failing).as_ref().map(|failing| {
            format!(
                "{} {}: alerts a gap missed wait for it",
                failing.label,
                failing.said(now_ms)
            )
        })
    }

    /// `pending` deliveries wait on `queue` (whose target logs call `target`), which no route
    /// of this relay takes.
    pub fn unserved(&self, queue: &str, target: &str, pending: u64) {
        lock(&self.unserved).insert(queue.to_string(), (target.to_string(), pending));
    }

    /// The queues said to be unserved ([`Counters::unserved`]), to count again.
    pub fn unserved_queues(&self) -> Vec<String> {
        lock(&self.unserved).keys().cloned().collect()
    }

    /// `queue`, known unserved, was counted again: `pending` wait on it. None (`events purge`
    /// emptied it while the relay ran) and it is not said; some where there were none
    /// (`events replay` queued them again) and it is, and the caller is told (true) to log it.
    /// Kept until a route takes the queue.
    pub fn unserved_recounted(&self, queue: &str, pending: u64) -> bool {
        // Only while still known: a route that started meanwhile took the queue.
        match lock(&self.unserved).get_mut(queue) {
            Some(said) => {
                let was = std::mem::replace(&mut said.1, pending);
                was == 0 && pending > 0
            }
            None => false,
        }
    }

    /// The queues no route takes, one line each (`/healthz` warnings).
    pub fn unserved_lines(&self) -> Vec<String> {
        lock(&self.unserved)
            .values()
            .filter(|(_, pending)| *pending > 0)
            .map(|(target, pending)| {
                format!(
                    "{} queued for {}, which this relay does not deliver to: kept, not delivered (the log's warning about it says what to do)",
                    crate::error::count(*pending as usize, "event", "events"),
                    target
                )
            })
            .collect()
    }

    /// The counters of the route of `queue`, labelled `label` (its target, as metrics label
    /// it). A route that starts takes its queue: not unserved any more.
    pub fn route<'a>(&'a self, queue: &'a str, label: &'a str) -> RouteCounters<'a> {
        lock(&self.unserved).remove(queue);
        let failing = metrics::gauge!("smee_relay_route_failing", "route" => label.to_string());
        // There at 0 from the start (an alert on it sees the first failure), unless another
        // queue with this target is failing.
        let failing_now = lock(&self.failing).values().any(|f| f.label == label);
        failing.set(if failing_now { 1.0 } else { 0.0 });
        RouteCounters {
            counters: self,
            queue,
            label,
            failing,
            is_failing: Default::default(),
            deliveries: metrics::counter!("smee_relay_deliveries_total", "route" => label.to_string()),
            retries: metrics::counter!("smee_relay_retries_total", "route" => label.to_string()),
            dead: metrics::counter!("smee_relay_dead_letters_total", "route" => label.to_string()),
            seconds: metrics::histogram!("smee_relay_delivery_seconds", "route" => label.to_string()),
        }
    }
}

/// One route's counters. Its per-delivery metrics are registered once, when the route starts:
/// a delivery then costs no label allocation or registry lookup (it cost two of each).
pub struct RouteCounters<'a> {
    counters: &'a Counters,
    /// The route's queue, its key in [`Counters::failing`].
    queue: &'a str,
    /// What logs and metrics call it.
    label: &'a str,
    /// 1 while a route with this label is in [`Counters::failing`].
    failing: metrics::Gauge,
    /// Whether it is: a delivery then looks at the shared map only after a failure.
    is_failing: std::sync::atomic::AtomicBool,
    deliveries: metrics::Counter,
    /// Registered with the others, so that they show 0 before the first retry or dead letter.
    retries: metrics::Counter,
    dead: metrics::Counter,
    seconds: metrics::Histogram,
}

impl RouteCounters<'_> {
    pub fn delivered(&self, elapsed: Duration) {
        self.counters.delivered.fetch_add(1, Ordering::Relaxed);
        self.deliveries.increment(1);
        self.seconds.record(elapsed.as_secs_f64());
        self.moved_on();
    }

    /// An attempt failed, and will be retried: the route is failing until one succeeds.
    pub fn retried(&self, error: &dyn std::fmt::Display) {
        self.counters.retried.fetch_add(1, Ordering::Relaxed);
        self.retries.increment(1);
        let mut failing = lock(&self.counters.failing);
        let entry = failing
            .entry(self.queue.to_string())
            .or_insert_with(|| Failing {
                label: self.label.to_string(),
                since_ms: crate::clock::now_ms(),
                attempts: 0,
                last_error: String::new(),
            });
        entry.attempts += 1;
        entry.last_error = error.to_string();
        self.failing.set(1.0);
        self.is_failing.store(true, Ordering::Relaxed);
    }

    /// Given up on: a dead letter (its own counter and warning), and the route goes on.
    pub fn dead(&self) {
        self.counters.dead.fetch_add(1, Ordering::Relaxed);
        self.dead.increment(1);
        self.moved_on();
    }

    /// The head event is done with (delivered, given up on, or handed over to another
    /// instance of the cluster): the route no longer waits on its target.
    pub fn moved_on(&self) {
        if self.is_failing.swap(false, Ordering::Relaxed) {
            let mut failing = lock(&self.counters.failing);
            failing.remove(self.queue);
            // Another queue with this target may still be failing.
            if !failing.values().any(|f| f.label == self.label) {
                self.failing.set(0.0);
            }
        }
    }
}

impl Drop for RouteCounters<'_> {
    /// A route that ends (a reload removed it, a stop) is not failing any more: what waits
    /// for it is the next run's.
    fn drop(&mut self) {
        self.moved_on();
    }
}

/// A lock that a panic elsewhere does not make unusable: the map stays consistent.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_fails_from_its_first_failed_attempt_until_one_succeeds() {
        let counters = Counters::default();
        let route = counters.route("k http://127.0.0.1:9/hook", "http://127.0.0.1:9/hook");
        route.retried(&"cannot reach target: connection refused");
        route.retried(&"target answered 503 Service Unavailable");
        let now = crate::clock::now_ms() + 65_000;
        assert_eq!(
            counters.failing(now),
            [
                "route http://127.0.0.1:9/hook failing for 1m 5s (2 attempts; last: target answered 503 Service Unavailable)"
            ]
        );
        route.delivered(Duration::from_millis(3));
        assert!(counters.failing(now).is_empty());
        // A dead letter moves the route on too; its own counter and warning tell of it.
        route.retried(&"x");
        route.dead();
        assert!(counters.failing(now).is_empty());
    }

    #[test]
    fn a_route_that_ends_is_not_failing_any_more() {
        let counters = Counters::default();
        counters.route("k a", "a").retried(&"x");
        assert!(counters.failing(0).is_empty(), "dropped at once");
        let b = counters.route("k b", "b");
        b.retried(&"x");
        assert_eq!(counters.failing(0).len(), 1);
        drop(b);
        assert!(counters.failing(0).is_empty());
    }

    /// helper-110: two channels' queues with the same target shared one entry: one of them
    /// delivering took the other, still failing, off (and reset its count).
    #[test]
    fn two_queues_with_one_target_fail_apart() {
        let counters = Counters::default();
        let a = counters.route("a http://t/h", "http://t/h");
        let b = counters.route("b http://t/h", "http://t/h");
        a.retried(&"x");
        b.retried(&"y");
        b.delivered(Duration::ZERO);
        assert_eq!(
            counters.failing(0),
            ["route http://t/h failing for 0s (1 attempt; last: x)"]
        );
    }
}
