//! Catch-up: recover what a channel missed while no relay listened, from a sender that kept it
//! (GitHub's hook deliveries, through `source::github`), and queue it like live events.
//!
//! One run lists the hook's deliveries since a time, compares their GUIDs with the
//! `x-github-delivery` headers of the channel's events in the spool, fetches each missing one
//! (a GUID once, however often GitHub redelivered it) and appends them, oldest first, to the
//! channel's queues in bounded batches, each one transaction that checks the GUIDs again (two
//! runs at once add each once). A delivery that cannot be fetched is skipped and reported; the
//! others are recovered in order. Routes of a running relay pick them up as they do `events replay`'s
//! (`Spool::changed`: the daemon's own appends nudge its routes; a command's are seen within a
//! second, the relay sharing the file with it), so `smee-relay catch-up` works whether the
//! daemon runs or not. The daemon runs it itself after every gap of a channel that has a
//! `[channel.github_catch_up]` block ([`after_gaps`]).
//!
//! This module does not decide which channel or routes: the command and the daemon say.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::source::github::{self, DELIVERY_HEADER, DeliverySummary, GithubError, HookClient};
use crate::spool::{Spool, SpoolError};

/// The least time between two catch-ups of one channel run by the daemon: a channel that
/// reconnects again and again costs GitHub one listing per this, not one per reconnect.
pub const MIN_INTERVAL: Duration = Duration::from_secs(60);

/// Why a catch-up failed.
#[derive(Debug, thiserror::Error)]
pub enum CatchUpError {
    #[error("cannot read the deliveries of the GitHub hook")]
    Github(#[from] GithubError),
    #[error("cannot compare with or add to the spool")]
    Spool(#[from] SpoolError),
    #[error("the spool task stopped")]
    Join(#[from] tokio::task::JoinError),
}

/// Where recovered events go.
#[derive(Clone, Debug)]
pub struct Destination {
    /// The channel as shown (redacted): what the spool records events under.
    pub channel: String,
    /// The queues the channel's events go on ([`crate::spool::route_key`], `pipeline`, ...).
    pub routes: Vec<String>,
    /// Event names the channel skips (`ignore_events`): skipped when recovered too.
    pub ignore_events: Vec<String>,
}

/// At most this many recovered events are held before they are appended: a long outage's
/// deliveries (each up to 25 MB) go in in bounded batches, in order, not all at once.
const BATCH_EVENTS: usize = 50;

/// ... and at most this many bytes of bodies.
const BATCH_BYTES: usize = 64 * 1024 * 1024;

/// What became of one missing delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Not fetched: a dry run, or the run stopped before it.
    Pending,
    /// Appended to the spool as this event.
    Recovered(u64),
    /// The channel's `ignore_events` skips its event.
    Ignored,
    /// Stored meanwhile (another run, or the live channel, added its GUID first).
    AlreadyThere,
    /// Could not be fetched (GitHub answered 404 for it, its detail did not decode, ...): the
    /// reason. The others were recovered all the same.
    Failed(String),
}

/// What one run found.
#[derive(Debug, Default)]
pub struct Report {
    /// Deliveries GitHub listed since the time asked (redeliveries included).
    pub listed: usize,
    /// Distinct GUIDs among them.
    pub guids: usize,
    /// Missing from the spool, oldest first: recovered, or with a dry run, what would be.
    pub missing: Vec<DeliverySummary>,
    /// What became of each of `missing` (same order).
    pub fates: Vec<Fate>,
    /// Event ids given to what was recovered, in order (empty on a dry run).
    pub recovered: Vec<u64>,
    /// Missing ones the channel's `ignore_events` skips.
    pub ignored: usize,
    /// List entries GitHub gave that could not be read (what was readable of them, and why):
    /// not compared, not recovered.
    pub unreadable: Vec<String>,
    /// Not in the spool, but made before what it still remembers ([`Spool::pruned_through`],
    /// plus [`CLOCK_MARGIN`]): pruned or never received, it cannot tell, so not recovered.
    pub unchecked: usize,
    /// The time (ms since the epoch) before which deliveries were not checked, if any were not.
    pub checked_from_ms: Option<u64>,
}

/// GitHub's clock and this machine's may differ by this much: a delivery made this close
/// after the newest pruned event was received may have been that event.
const CLOCK_MARGIN: Duration = Duration::from_secs(300);

impl Report {
    /// How many deliveries could not be recovered (failed details and unreadable list entries).
    pub fn failures(&self) -> usize {
        self.unreadable.len()
            + self
                .fates
                .iter()
                .filter(|f| matches!(f, Fate::Failed(_)))
                .count()
    }
}

/// Recover the deliveries of `client`'s hook since `since_ms` that `to`'s channel does not
/// have. With `dry_run`, only say which (and `spool` may be `None`: none exists yet).
///
/// A delivery that cannot be fetched (a 404 for it, a detail that does not decode, one larger
/// than GitHub sends) is skipped, warned and reported ([`Fate::Failed`]); the others are
/// recovered in order. An error that concerns every request (the token refused, the rate limit,
/// GitHub unreachable) ends the run; what was fetched before it is appended first.
pub async fn github(
    spool: Option<&Arc<Spool>>,
    client: &mut HookClient,
    to: &Destination,
    since_ms: u64,
    dry_run: bool,
) -> Result<Report, CatchUpError> {
    let listing = client.deliveries(since_ms).await?;
    for bad in &listing.unreadable {
        warn!(channel = %to.channel, "GitHub catch-up: a delivery listed by {} cannot be read and is skipped: {bad}", client.describe());
    }
    let listed = listing.deliveries;
    // No spool (a dry run before the relay ever ran): nothing is stored, all is missing.
    let (have, pruned_through) = match spool {
        Some(spool) => {
            let (spool, channel) = (spool.clone(), to.channel.clone());
            tokio::task::spawn_blocking(move || {
                Ok::<_, SpoolError>((
                    spool.header_values(&channel, DELIVERY_HEADER)?,
                    spool.pruned_through()?,
                ))
            })
            .await??
        }
        None => (HashSet::new(), None),
    };
    // Before this, a GUID absent from the spool may be one it delivered and pruned
    // (`--since` beyond `--retain`): recovering it would deliver it again.
    let checked_from = pruned_through.map(|ms| ms.saturating_add(CLOCK_MARGIN.as_millis() as u64));
    let mut report = Report {
        listed: listed.len(),
        unreadable: listing.unreadable,
        ..Report::default()
    };
    let mut seen = HashSet::new();
    for delivery in listed {
        // Oldest first: a GUID's first attempt stands for its redeliveries (same payload).
        if !seen.insert(delivery.guid.clone()) || have.contains(&delivery.guid) {
            continue;
        }
        if let Some(from) = checked_from
            && delivery.delivered_ms().is_none_or(|ms| ms < from)
        {
            report.unchecked += 1;
            report.checked_from_ms = Some(from);
            continue;
        }
        report.missing.push(delivery);
    }
    if let Some(from) = report.checked_from_ms {
        warn!(
            channel = %to.channel,
            "GitHub catch-up: {} made before {} not checked: the spool has pruned the events it received then (--retain), so their absence proves nothing and recovering them could deliver them again; keep `since` within --retain",
            crate::error::count(report.unchecked, "delivery", "deliveries"),
            crate::clock::rfc3339_seconds(from)
        );
    }
    report.guids = seen.len();
    report.fates = vec![Fate::Pending; report.missing.len()];
    let Some(spool) = spool.filter(|_| !dry_run && !report.missing.is_empty()) else {
        return Ok(report);
    };
    // Fetched, not yet appended: (index in `missing`, event).
    let mut batch: Vec<(usize, crate::event::Event)> = Vec::new();
    let mut batch_bytes = 0;
    let mut stopped = None;
    for i in 0..report.missing.len() {
        let delivery = &report.missing[i];
        match client.event(delivery, &to.ignore_events).await {
            Ok(Some(event)) => {
                batch_bytes += event.body.len();
                batch.push((i, event));
            }
            Ok(None) => {
                report.ignored += 1;
                report.fates[i] = Fate::Ignored;
            }
            Err(e) if e.concerns_one_delivery() => {
                let reason = crate::error::chain(&e);
                warn!(channel = %to.channel, "GitHub catch-up: delivery {} ({}) cannot be recovered and is skipped: {reason}", delivery.guid, delivery.id);
                report.fates[i] = Fate::Failed(reason);
            }
            Err(e) => {
                stopped = Some(e);
                break;
            }
        }
        if batch.len() >= BATCH_EVENTS || batch_bytes >= BATCH_BYTES {
            append(spool, to, std::mem::take(&mut batch), &mut report).await?;
            batch_bytes = 0;
        }
    }
    append(spool, to, batch, &mut report).await?;
    metrics::counter!("smee_relay_catch_up_recovered_total", "source" => "github")
        .increment(report.recovered.len() as u64);
    match stopped {
        Some(e) => Err(e.into()),
        None => Ok(report),
    }
}

/// Append one batch (in order; the GUIDs checked again in the same transaction).
async fn append(
    spool: &Arc<Spool>,
    to: &Destination,
    batch: Vec<(usize, crate::event::Event)>,
    report: &mut Report,
) -> Result<(), CatchUpError> {
    if batch.is_empty() {
        return Ok(());
    }
    let (index, events): (Vec<usize>, Vec<_>) = batch.into_iter().unzip();
    let ids = {
        let (spool, to) = (spool.clone(), to.clone());
        tokio::task::spawn_blocking(move || {
            spool.append_missing(&to.channel, &to.routes, &events, DELIVERY_HEADER)
        })
        .await??
    };
    for (i, id) in index.into_iter().zip(ids) {
        report.fates[i] = match id {
            Some(id) => {
                report.recovered.push(id);
                Fate::Recovered(id)
            }
            None => Fate::AlreadyThere,
        };
    }
    Ok(())
}

/// The daemon's catch-up for one channel: a run at every change of connections (the channel
/// connected: at start, and after every gap), at most one per [`MIN_INTERVAL`] (changes in
/// between are folded into one run at its end), until `cancel`. A failed run is logged and
/// counted; the next gap tries again.
pub async fn after_gaps(
    spool: Arc<Spool>,
    config: github::CatchUp,
    to: Destination,
    mut routes: watch::Receiver<Vec<String>>,
    connects: watch::Receiver<u64>,
    cancel: CancellationToken,
) {
    let mut client = match HookClient::new(config.hook.clone()) {
        Ok(client) => client,
        Err(e) => {
            warn!(channel = %to.channel, "GitHub catch-up off: {}", crate::error::chain(&e));
            return;
        }
    };
    let mut gaps = Gaps {
        connects,
        last_run: None,
    };
    while gaps.next(&cancel).await {
        let to = Destination {
            routes: routes.borrow_and_update().clone(),
            ..to.clone()
        };
        let since_ms = crate::clock::now_ms().saturating_sub(config.since.as_millis() as u64);
        let run = github(Some(&spool), &mut client, &to, since_ms, false);
        let outcome = tokio::select! {
            _ = cancel.cancelled() => return,
            outcome = run => outcome,
        };
        match outcome {
            Ok(report) => {
                metrics::counter!("smee_relay_catch_up_runs_total", "source" => "github", "outcome" => "ok")
                    .increment(1);
                if report.failures() > 0 {
                    warn!(channel = %to.channel, "GitHub catch-up: {} from {} could not be recovered (see above); run `smee-relay catch-up github` to see which",
                        crate::error::count(report.failures(), "delivery", "deliveries"), client.describe());
                }
                if report.recovered.is_empty() {
                    info!(channel = %to.channel, "GitHub catch-up: {} missed nothing ({} since {})",
                        client.describe(), crate::error::count(report.guids, "delivery", "deliveries"), humantime::format_duration(config.since));
                } else {
                    info!(channel = %to.channel, "GitHub catch-up: recovered {} the channel missed from {} (events {})",
                        crate::error::count(report.recovered.len(), "delivery", "deliveries"), client.describe(), ids(&report.recovered));
                }
            }
            Err(e) => {
                metrics::counter!("smee_relay_catch_up_runs_total", "source" => "github", "outcome" => "failed")
                    .increment(1);
                // A refused token does not mend itself at the next gap (helper-121).
                if let CatchUpError::Github(GithubError::Unauthorized { .. }) = e {
                    error!(channel = %to.channel, "GitHub catch-up cannot run until the token \
                           is fixed (then reload): {}", crate::error::chain(&e));
                } else {
                    warn!(channel = %to.channel, "GitHub catch-up failed, the next gap tries \
                          again (or run `smee-relay catch-up github --config` with this \
                          relay's config): {}", crate::error::chain(&e));
                }
            }
        }
    }
}

/// When the daemon's catch-up runs: at a change of the channel's connection count, at most
/// once per [`MIN_INTERVAL`].
struct Gaps {
    /// The channel's connection count ([`crate::source::status::ChannelStatus::connections`]).
    connects: watch::Receiver<u64>,
    /// When the last run started.
    last_run: Option<tokio::time::Instant>,
}

impl Gaps {
    /// Wait until a run is due; `false` once `cancel` fires or the channel is gone.
    async fn next(&mut self, cancel: &CancellationToken) -> bool {
        tokio::select! {
            _ = cancel.cancelled() => return false,
            changed = self.connects.changed() => if changed.is_err() { return false },
        }
        if let Some(last) = self.last_run {
            tokio::select! {
                _ = cancel.cancelled() => return false,
                _ = tokio::time::sleep_until(last + MIN_INTERVAL) => {}
            }
        }
        // Whatever connected meanwhile is covered by this run.
        self.connects.borrow_and_update();
        self.last_run = Some(tokio::time::Instant::now());
        true
    }
}

/// Event ids for a log line: joined by commas, at most 20 (then `…`).
fn ids(ids: &[u64]) -> String {
    let mut text: Vec<String> = ids.iter().take(20).map(u64::to_string).collect();
    if ids.len() > 20 {
        text.push("…".into());
    }
    text.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The debounce, on tokio's paused clock: connects in quick succession make one run now and
    /// one at the end of the interval, not one each.
    #[tokio::test(start_paused = true)]
    async fn reconnects_within_the_interval_fold_into_one_run() {
        let (tx, rx) = watch::channel(0u64);
        let runs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let cancel = CancellationToken::new();
        let start = tokio::time::Instant::now();
        let task = {
            let runs = runs.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let mut gaps = Gaps {
                    connects: rx,
                    last_run: None,
                };
                while gaps.next(&cancel).await {
                    runs.lock().unwrap().push(start.elapsed());
                }
            })
        };
        for _ in 0..3 {
            tx.send_modify(|n| *n += 1);
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        tokio::time::sleep(MIN_INTERVAL * 2).await;
        cancel.cancel();
        task.await.unwrap();
        assert_eq!(
            *runs.lock().unwrap(),
            [Duration::ZERO, MIN_INTERVAL],
            "one run at the first connect, one for the two after it"
        );
    }
}
