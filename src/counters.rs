//! Counters the relay keeps about itself, shared by the stages that count (intake, routes) and
//! read back by the service (the systemd status line). Each bump is also a Prometheus metric.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counters the relay keeps about itself: read back for the systemd status line, and
/// recorded as Prometheus metrics at the same time.
#[derive(Debug, Default)]
pub struct Counters {
    pub received: AtomicU64,
    pub refused: AtomicU64,
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub dead: AtomicU64,
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

    pub fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("smee_relay_events_refused_total").increment(1);
    }

    /// The counters of the route `route` (its target, as metrics label it).
    pub fn route<'a>(&'a self, route: &'a str) -> RouteCounters<'a> {
        RouteCounters {
            counters: self,
            deliveries: metrics::counter!("smee_relay_deliveries_total", "route" => route.to_string()),
            retries: metrics::counter!("smee_relay_retries_total", "route" => route.to_string()),
            dead: metrics::counter!("smee_relay_dead_letters_total", "route" => route.to_string()),
            seconds: metrics::histogram!("smee_relay_delivery_seconds", "route" => route.to_string()),
        }
    }
}

/// One route's counters. Its per-delivery metrics are registered once, when the route starts:
/// a delivery then costs no label allocation or registry lookup (it cost two of each).
pub struct RouteCounters<'a> {
    counters: &'a Counters,
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
    }

    pub fn retried(&self) {
        self.counters.retried.fetch_add(1, Ordering::Relaxed);
        self.retries.increment(1);
    }

    pub fn dead(&self) {
        self.counters.dead.fetch_add(1, Ordering::Relaxed);
        self.dead.increment(1);
    }
}
