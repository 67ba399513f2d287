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
    pub fn received(&self, n: u64) {
        self.received.fetch_add(n, Ordering::Relaxed);
        metrics::counter!("smee_relay_events_received_total").increment(n);
    }

    pub fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("smee_relay_events_refused_total").increment(1);
    }

    pub fn delivered(&self, route: &str, elapsed: Duration) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("smee_relay_deliveries_total", "route" => route.to_string()).increment(1);
        metrics::histogram!("smee_relay_delivery_seconds", "route" => route.to_string())
            .record(elapsed.as_secs_f64());
    }

    pub fn retried(&self, route: &str) {
        self.retried.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("smee_relay_retries_total", "route" => route.to_string()).increment(1);
    }

    pub fn dead(&self, route: &str) {
        self.dead.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("smee_relay_dead_letters_total", "route" => route.to_string())
            .increment(1);
    }
}
