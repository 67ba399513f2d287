//! Other clusters on the same NATS relaying this instance's channels. Each cluster delivers
//! every event of a channel it relays, so an instance started under another `name` (a typo, or
//! no `[cluster]` beside `SMEE_RELAY_NATS_URL`, which joins cluster `default`) delivers every
//! webhook a second time, and nothing else would say so (helper-123).
//!
//! Every cluster publishes a channel's frames on `smee.<cluster>.ch.<hash of the channel>`, the
//! hash the same in every cluster. At start, after each reload and every minute, an
//! instance looks in the other clusters' streams (`SMEE_*`) for a frame of one of its channels
//! published within [`RECENT`]: one is a neighbour relaying it now. Each is a WARN once, and a
//! `/healthz` warning while it lasts.
//!
//! It must not change what an instance does: it only reads and warns.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::watch;
use tracing::warn;

use super::{Cluster, channel_subject, stream_name};

/// How often an instance looks (`SMEE_RELAY_NEIGHBOUR_LOOK` overrides it, for tests: a
/// neighbour's first frame comes after both started, so the look at start finds none).
const LOOK_EVERY: Duration = Duration::from_secs(60);

/// A frame published this recently says its cluster relays the channel now (not long ago,
/// under a name since changed: its frames stay until the stream's `max_age`).
const RECENT: Duration = Duration::from_secs(15 * 60);

fn look_every() -> Duration {
    std::env::var("SMEE_RELAY_NEIGHBOUR_LOOK")
        .ok()
        .and_then(|v| crate::clock::parse_duration(&v).ok())
        .unwrap_or(LOOK_EVERY)
}

/// A channel of this instance: its spool key and its name as logs show it (redacted).
pub type Channel = (String, String);

/// The neighbours found at the last look, as `/healthz` warnings.
#[derive(Default)]
pub struct Neighbours {
    /// Set once the task looking has started: later calls only update its channels.
    channels: Mutex<Option<watch::Sender<Vec<Channel>>>>,
    lines: Mutex<Vec<String>>,
}

impl Cluster {
    /// Look for other clusters relaying `channels` now and every minute; called again
    /// (a reload), the next look is at once with the new channels.
    pub fn watch_neighbours(&self, channels: Vec<Channel>) {
        let mut sender = self
            .neighbours
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match &*sender {
            Some(sender) => {
                sender.send_replace(channels);
            }
            None => {
                let (tx, rx) = watch::channel(channels);
                *sender = Some(tx);
                tokio::spawn(self.clone().look_for_neighbours(rx));
            }
        }
    }

    /// `/healthz` warnings: the other clusters relaying this instance's channels.
    pub fn neighbour_lines(&self) -> Vec<String> {
        self.neighbours
            .lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn look_for_neighbours(self, mut channels: watch::Receiver<Vec<Channel>>) {
        let mut warned: HashSet<(String, String)> = HashSet::new();
        loop {
            let now = channels.borrow_and_update().clone();
            let found = self.neighbours_of(&now).await;
            let mut lines = Vec::new();
            for (cluster, shown, ago) in found {
                let line = format!(
                    "cluster \"{cluster}\" on this NATS also relays channel {shown} (its last \
                     frame {} ago): each of its events is delivered by both clusters, twice to \
                     a target both have. If its instances belong with this one, give them the \
                     same [cluster] name (\"{}\" here); an instance with no [cluster] but \
                     SMEE_RELAY_NATS_URL set joins \"default\"",
                    humantime::format_duration(Duration::from_secs(ago.as_secs())),
                    self.settings.name
                );
                if warned.insert((cluster, shown)) {
                    warn!("{line}");
                }
                lines.push(line);
            }
            *self
                .neighbours
                .lines
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = lines;
            tokio::select! {
                _ = tokio::time::sleep(look_every()) => {}
                changed = channels.changed() => if changed.is_err() { return },
            }
        }
    }

    /// The other clusters with a recent frame of one of `channels`: (cluster, channel shown,
    /// how long ago). Whatever NATS does not answer is taken as no neighbour.
    async fn neighbours_of(&self, channels: &[Channel]) -> Vec<(String, String, Duration)> {
        let mut found = Vec::new();
        if channels.is_empty() {
            return found;
        }
        let mut names = self.js.stream_names();
        let mut others = Vec::new();
        while let Some(Ok(name)) = names.next().await {
            if name != self.stream_name
                && let Some(other) = name.strip_prefix(&stream_name(""))
            {
                others.push(other.to_string());
            }
        }
        let now_ms = crate::clock::now_ms();
        for other in others {
            let Ok(stream) = self.js.get_stream(stream_name(&other)).await else {
                continue;
            };
            for (key, shown) in channels {
                let subject = channel_subject(&other, key);
                let Ok(last) = stream.get_last_raw_message_by_subject(&subject).await else {
                    continue;
                };
                let at_ms = (last.time.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
                let ago = Duration::from_millis(now_ms.saturating_sub(at_ms));
                if ago <= RECENT {
                    found.push((other.clone(), shown.clone(), ago));
                }
            }
        }
        found
    }
}

/// Shared by the clones of one [`Cluster`].
pub type Shared = Arc<Neighbours>;
