//! Whether the instances of a cluster run the same routes and rules. Each instance records a
//! fingerprint of its own (a hash of its forward routes and pipeline rules, computed by the
//! daemon) in the cluster's KV bucket under `config.<instance>`, at start and on each reload,
//! and refreshes it every minute, and removes it when it stops cleanly; it warns, once per
//! instance and fingerprint, when another live instance (one that refreshed within the last 3
//! minutes) records another fingerprint:
//! instances with different rules judge the same event differently, with different targets
//! deliver differently, and nothing else would say so.
//!
//! It must not change what an instance does: it only reads, writes its own key and warns.

use std::collections::HashSet;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Cluster, short_hash};

/// How often an instance refreshes its record (and reads the others').
const REFRESH: Duration = Duration::from_secs(60);
/// A record older than this is of an instance that stopped: not compared.
const LIVE: Duration = Duration::from_secs(180);
/// A record older than this is removed by whichever instance reads it.
const FORGOTTEN: Duration = Duration::from_secs(24 * 3600);

/// The fingerprint this process announces; the task announcing it starts with the first.
static ANNOUNCED: OnceLock<watch::Sender<String>> = OnceLock::new();
/// Set once this process removed its record ([`Cluster::leave_config`]): it writes no more.
static LEFT: AtomicBool = AtomicBool::new(false);

/// This process's name among the records (`config.<me>`): its pid and start, hashed.
fn me() -> &'static str {
    static ME: OnceLock<String> = OnceLock::new();
    ME.get_or_init(|| {
        short_hash(&format!(
            "{}-{}",
            std::process::id(),
            crate::clock::now_ms()
        ))
    })
}

/// What an instance records.
#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    /// The hash of its routes and rules.
    fingerprint: String,
    /// Its machine's name and process id, for the warning.
    host: String,
    pid: u32,
    /// When it wrote this (ms since the epoch): the record is live while recent.
    at_ms: u64,
}

/// The fingerprint of an instance's routes and rules (the texts given, in any order).
pub fn fingerprint(parts: impl IntoIterator<Item = String>) -> String {
    let mut parts: Vec<String> = parts.into_iter().collect();
    parts.sort();
    short_hash(&parts.join("\n"))
}

impl Cluster {
    /// Record `fingerprint` as this instance's (at start, after each reload) and compare it
    /// with the other live instances' now and every minute.
    pub fn announce_config(&self, fingerprint: String) {
        if let Some(sender) = ANNOUNCED.get() {
            sender.send_replace(fingerprint);
            return;
        }
        let (sender, receiver) = watch::channel(fingerprint);
        if ANNOUNCED.set(sender).is_ok() {
            tokio::spawn(self.clone().announce(receiver));
        }
    }

    /// Remove this instance's record, as it stops cleanly: a restarted instance with a new
    /// config is not warned about its predecessor for the 3 minutes its record would stay
    /// live. Waits at most a second (NATS may be down: the record then ages out).
    pub async fn leave_config(&self) {
        if ANNOUNCED.get().is_none() || LEFT.swap(true, Ordering::SeqCst) {
            return;
        }
        let gone = self.kv.delete(format!("config.{}", me()));
        let _ = tokio::time::timeout(Duration::from_secs(1), gone).await;
    }

    async fn announce(self, mut fingerprint: watch::Receiver<String>) {
        let me = me();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let mut warned: HashSet<(String, String)> = HashSet::new();
        loop {
            let mine = fingerprint.borrow_and_update().clone();
            let record = Record {
                fingerprint: mine.clone(),
                host: host.clone(),
                pid: std::process::id(),
                at_ms: crate::clock::now_ms(),
            };
            if LEFT.load(Ordering::SeqCst) {
                return;
            }
            if let Ok(bytes) = serde_json::to_vec(&record)
                && self
                    .kv
                    .put(format!("config.{me}"), bytes.into())
                    .await
                    .is_ok()
            {
                self.compare(me, &mine, &mut warned).await;
            }
            tokio::select! {
                _ = tokio::time::sleep(REFRESH) => {}
                changed = fingerprint.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Warn about each live instance whose fingerprint differs from `mine` (once per pair).
    async fn compare(&self, me: &str, mine: &str, warned: &mut HashSet<(String, String)>) {
        let Ok(mut keys) = self.kv.keys().await else {
            return;
        };
        let now = crate::clock::now_ms();
        let mut live = 0;
        while let Some(Ok(key)) = keys.next().await {
            let Some(other) = key.strip_prefix("config.") else {
                continue;
            };
            if other == me {
                continue;
            }
            let Ok(Some(value)) = self.kv.get(&key).await else {
                continue;
            };
            let Ok(record) = serde_json::from_slice::<Record>(&value) else {
                continue;
            };
            let age = now.saturating_sub(record.at_ms);
            if age > FORGOTTEN.as_millis() as u64 {
                let _ = self.kv.delete(&key).await;
                continue;
            }
            if age > LIVE.as_millis() as u64 {
                continue;
            }
            live += 1;
            if record.fingerprint == mine {
                // Warned about before (one of the two was reloaded since): said to agree now.
                let before = warned.len();
                warned.retain(|(instance, _)| instance != other);
                if warned.len() < before {
                    info!(
                        "instance {} (pid {}) of cluster {} now runs the same forward targets, \
                         rules and Slack webhook as this one",
                        record.host, record.pid, self.settings.name
                    );
                }
                continue;
            }
            if warned.insert((other.to_string(), record.fingerprint.clone())) {
                // Its age: a record stays live for 3 minutes after its instance's last word,
                // so the instance named may have stopped (a kill -9) since.
                let seen = humantime::format_duration(Duration::from_secs(age / 1000));
                warn!(
                    "instance {} (pid {}, last heard from {seen} ago) of cluster {} runs other \
                     forward targets, rules or Slack webhook than this one (config fingerprint \
                     {} there, {mine} here): instances with different [[channel]] forward lists, \
                     [[rule]]s or [slack] webhook_url deliver and judge the same events \
                     differently; use the same config on every instance",
                    record.host, record.pid, self.settings.name, record.fingerprint
                );
            }
        }
        tracing::debug!(
            others = live,
            "config fingerprints compared with the other live instances"
        );
    }
}
