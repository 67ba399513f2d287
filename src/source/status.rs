//! A channel's liveness as its source sees it: connected or not, when bytes last arrived, how
//! often it reconnected. The source writes it; `/healthz` and the status line read it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// One channel's connection, as the source reports it.
pub struct ChannelStatus {
    /// The channel, redacted.
    pub name: String,
    /// Silence longer than this is unhealthy.
    pub idle_timeout: Duration,
    pub connected: AtomicBool,
    /// When anything last arrived (ms since the epoch; 0: never).
    pub last_bytes_ms: AtomicU64,
    pub reconnects: AtomicU64,
    /// Frames skipped because they could not be read (refused by the SSE parser, over the size
    /// limit, or not a smee webhook): nothing is dropped without being counted.
    pub bad_frames: AtomicU64,
    /// How many times the channel has connected, watched by whoever must act on a gap (the
    /// Port reconciler, GitHub catch-up): events posted between two connections are gone on smee.io.
    connections: tokio::sync::watch::Sender<u64>,
    /// When the last connection ended (ms since the epoch; 0: none has), so a gap can say
    /// since when it lasted.
    disconnected_at_ms: AtomicU64,
    /// Why the last connection (or attempt) ended, while not connected: `/healthz` says it
    /// rather than only how long the channel has been silent.
    down_because: std::sync::Mutex<Option<String>>,
}

/// The kinds of `smee_relay_bad_frames_total`, each shown from the channel's start at 0.
const BAD_FRAME_KINDS: [&str; 5] = ["refused", "too_large", "malformed", "unknown_type", "gap"];

impl ChannelStatus {
    pub fn new(name: String, idle_timeout: Duration) -> Self {
        // There at 0 from the start, as `deliveries_total` is: an alert on `increase()` must
        // see the first one, and a series that appears with it has no value before to compare.
        metrics::counter!("smee_relay_reconnects_total", "channel" => name.clone()).increment(0);
        metrics::counter!("smee_relay_events_ignored_total", "channel" => name.clone())
            .increment(0);
        for kind in BAD_FRAME_KINDS {
            metrics::counter!("smee_relay_bad_frames_total", "channel" => name.clone(), "kind" => kind)
                .increment(0);
        }
        Self {
            name,
            idle_timeout,
            connected: AtomicBool::new(false),
            last_bytes_ms: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            bad_frames: AtomicU64::new(0),
            connections: tokio::sync::watch::Sender::new(0),
            disconnected_at_ms: AtomicU64::new(0),
            down_because: std::sync::Mutex::new(None),
        }
    }

    /// Something arrived on the connection.
    pub fn saw_bytes(&self) {
        self.last_bytes_ms
            .store(crate::clock::now_ms(), Ordering::Relaxed);
    }

    #[cfg(test)]
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn set_connected(&self, connected: bool) {
        let was = self.connected.swap(connected, Ordering::Relaxed);
        metrics::gauge!("smee_relay_channel_connected", "channel" => self.name.clone())
            .set(if connected { 1.0 } else { 0.0 });
        if connected {
            self.saw_bytes();
            self.connections.send_modify(|n| *n += 1);
            *self.down_because.lock().expect("not poisoned") = None;
        } else if was {
            self.disconnected_at_ms
                .store(crate::clock::now_ms(), Ordering::Relaxed);
        }
    }

    /// The connection (or the attempt to make one) ended: `reason` says why until the next
    /// connection.
    pub fn lost(&self, reason: &str) {
        self.set_connected(false);
        *self.down_because.lock().expect("not poisoned") = Some(reason.to_string());
    }

    /// Why the channel is not connected, if it is not and the source said.
    pub fn down_because(&self) -> Option<String> {
        if self.connected.load(Ordering::Relaxed) {
            return None;
        }
        self.down_because.lock().expect("not poisoned").clone()
    }

    /// Watch the number of connections made so far: it changes on every (re)connection.
    pub fn connections(&self) -> tokio::sync::watch::Receiver<u64> {
        self.connections.subscribe()
    }

    /// When the last connection ended, if one has (ms since the epoch).
    pub fn disconnected_at_ms(&self) -> Option<u64> {
        Some(self.disconnected_at_ms.load(Ordering::Relaxed)).filter(|&ms| ms > 0)
    }

    pub fn reconnecting(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("smee_relay_reconnects_total", "channel" => self.name.clone())
            .increment(1);
    }

    /// A frame was skipped; `kind` says why (`refused`, `too_large`, `malformed`).
    /// An event skipped as asked (`--ignore-event`): not lost, but not silent either.
    pub fn ignored(&self) {
        metrics::counter!("smee_relay_events_ignored_total", "channel" => self.name.clone())
            .increment(1);
    }

    pub fn bad_frame(&self, kind: &'static str) {
        self.bad_frames.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(
            "smee_relay_bad_frames_total",
            "channel" => self.name.clone(),
            "kind" => kind
        )
        .increment(1);
    }
}
