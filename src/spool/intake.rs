//! The intake: takes events from a source and appends them to the spool in batches. An event
//! is on disk before any route can see it; if the disk refuses, the batch is kept and retried.
//! A batch is at most [`MAX_BATCH`] events and [`MAX_BATCH_BYTES`] bytes (one larger event goes
//! alone); the source's queue gets the room back only once the batch is committed.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::Spool;
use super::writer::{MAX_BATCH, MAX_BATCH_BYTES, SpoolWriter};
use crate::counters::Counters;
use crate::event::Event;
use crate::source::queue;

/// After the source has stopped (shutdown), how long the intake still tries to store what it
/// holds while the spool refuses writes, before it gives up on it (and says how much).
pub(crate) const GIVE_UP_AFTER_STOP: Duration = Duration::from_secs(5);

/// A pause of the intake is said (`ERROR`, and `INFO` when it ends) at most once in this long:
/// a disk short of room while deliveries catch up pauses and resumes it by turns.
const PAUSES_SAID_EVERY: Duration = Duration::from_secs(60);

/// Take events from the source and append them to the spool in batches, until the source is
/// done. Nothing taken is dropped while the relay runs: a failed append (disk full) pauses the
/// intake, says so once, and is retried every second until the spool takes writes again.
pub async fn intake(
    events: queue::Receiver,
    writer: SpoolWriter,
    channel: String,
    cursor_key: Option<String>,
    routes: watch::Receiver<Vec<String>>,
    counters: Arc<Counters>,
) {
    intake_saving(events, writer, channel, cursor_key, routes, counters, None).await
}

/// [`intake`], and each event stored is also offered to `save` (`forward --save-dir`), which
/// never makes the intake wait.
pub async fn intake_saving(
    mut events: queue::Receiver,
    writer: SpoolWriter,
    channel: String,
    cursor_key: Option<String>,
    routes: watch::Receiver<Vec<String>>,
    counters: Arc<Counters>,
    save: Option<super::export::SaveDir>,
) {
    let mut received = Vec::new();
    // When a pause was last said: one that comes within PAUSES_SAID_EVERY of it (a disk short
    // of room while deliveries catch up pauses and resumes by turns) is not said again.
    let mut pause_said: Option<std::time::Instant> = None;
    while events
        .recv_batch(&mut received, MAX_BATCH, MAX_BATCH_BYTES)
        .await
        > 0
    {
        let batch: Arc<[Event]> = std::mem::take(&mut received).into();
        // The routes as of now: a reload may change them between batches.
        let routes = routes.borrow().clone();
        let mut paused: Option<std::time::Instant> = None;
        // Whether this pause was said (and so its end is).
        let mut said = false;
        let mut stopped: Option<std::time::Instant> = None;
        // The events of `batch` stored so far, and how many the next append takes: all of
        // them, fewer once the disk is short of room for all (see `piece`).
        let mut done = 0;
        let mut size = batch.len();
        while done < batch.len() {
            let piece = piece(&batch, done, size);
            let appended = writer
                .append(&channel, &routes, piece.clone(), cursor_key.as_deref())
                .await;
            match appended {
                Ok(ids) => {
                    if let Some(since) = paused.take().filter(|_| said) {
                        info!(
                            channel,
                            "the spool takes writes again: intake resumed after {}",
                            humantime::format_duration(Duration::from_secs(
                                since.elapsed().as_secs()
                            ))
                        );
                    }
                    done += piece.len();
                    stored(&piece, &ids, &counters, &channel, save.as_ref());
                }
                // Room for some of the events, not for all (helper-137: 102 events of 20 KB
                // waited for good 0.7 MiB above --keep-free, where 8 would have gone): fewer,
                // at once, down to one; the pause is said only when one must wait.
                Err(super::SpoolError::NoRoom(_)) if size > 1 => size = size.div_ceil(2),
                Err(e) => {
                    if paused.is_none() {
                        let now = std::time::Instant::now();
                        paused = Some(now);
                        said = pause_said.is_none_or(|at| now >= at + PAUSES_SAID_EVERY);
                        if said {
                            pause_said = Some(now);
                            error!(
                                channel,
                                events = batch.len() - done,
                                "intake paused: cannot store events ({}); they are kept in memory \
                                 and stored when the spool takes writes again (tried every second)",
                                crate::error::chain(&e)
                            );
                        }
                    }
                    // Shutting down: the source is gone. Try a little longer, then say what is lost.
                    if events.is_closed() {
                        let since = *stopped.get_or_insert_with(std::time::Instant::now);
                        if since.elapsed() >= GIVE_UP_AFTER_STOP {
                            let waiting = batch.len() - done + events.len();
                            (counters.never_stored)
                                .fetch_add(waiting as u64, std::sync::atomic::Ordering::Relaxed);
                            error!(
                                channel,
                                events = waiting,
                                "stopping while the spool refuses writes: {waiting} received events \
                                 were never stored; they are lost unless the channel server sends \
                                 them again (smee-relay serve does, from Last-Event-ID; smee.io \
                                 does not)"
                            );
                            return;
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    // The room may be back for more than one.
                    size = batch.len() - done;
                }
            }
        }
        // Committed: the source may read as much again.
        events.stored();
    }
}

/// The next `size` events of `batch` from `done` on (fewer at its end): the whole batch,
/// shared, while nothing was refused.
fn piece(batch: &Arc<[Event]>, done: usize, size: usize) -> Arc<[Event]> {
    let end = batch.len().min(done + size);
    match (done, end) {
        (0, end) if end == batch.len() => batch.clone(),
        _ => batch[done..end].into(),
    }
}

/// `piece` is committed, each event with its id in `ids` (`None`: refused, the spool full):
/// count them, offer the stored ones to `save`, and say the refused ones.
fn stored(
    piece: &[Event],
    ids: &[Option<u64>],
    counters: &Counters,
    channel: &str,
    save: Option<&super::export::SaveDir>,
) {
    // Stored ones only (helper-122: refused ones were counted as stored).
    counters.received(ids.iter().flatten().count() as u64);
    let received_ms = crate::clock::now_ms();
    for (event, id) in piece.iter().zip(ids) {
        if let (Some(save), Some(id)) = (save, id) {
            save.offer(super::StoredEvent {
                id: *id,
                received_ms,
                channel: channel.to_string(),
                event: event.clone(),
            });
        }
        // Said at the first and every 1000th (helper-122: a line per event).
        let refused = match id {
            Some(_) => 0,
            None => counters.refused(),
        };
        if refused == 1 || (refused != 0 && refused.is_multiple_of(1000)) {
            error!(
                event = %event.sse_id.as_deref().unwrap_or("-"),
                refused,
                "spool full (--max-spool-size): received event refused and lost \
                 ({refused} so far). The spool holds what its targets have not \
                 taken: is a target down (see /healthz)? Make room by delivering \
                 them, dropping dead letters (`smee-relay events purge --dead`) or \
                 raising --max-spool-size"
            );
        }
    }
}

/// Prune delivered events older than `retain`, now and every minute, until `cancel`. A minute
/// in which nobody wrote the spool and no delivered event grew old enough is skipped without a
/// read: pruning decodes every delivery record, which an idle relay should not do each minute.
pub async fn prune_periodically(spool: Arc<Spool>, retain: Duration, cancel: CancellationToken) {
    // What the file looked like at the last prune, and when the oldest delivered event left
    // then was received (`None`: none was left).
    let mut last: Option<(crate::spool::Seen, Option<u64>)> = None;
    loop {
        let cutoff = crate::clock::now_ms().saturating_sub(retain.as_millis() as u64);
        let nothing_due = last.as_ref().is_some_and(|(seen, oldest)| {
            oldest.is_none_or(|received| received >= cutoff) && !spool.changed_since(seen)
        });
        if !nothing_due {
            let spool2 = spool.clone();
            let seen = spool.look();
            match tokio::task::spawn_blocking(move || spool2.prune_due(cutoff)).await {
                Ok(Ok((pruned, oldest))) => {
                    if pruned > 0 {
                        info!(pruned, "pruned delivered events past --retain");
                    }
                    last = Some((seen, oldest));
                }
                Ok(Err(e)) => {
                    warn!("cannot prune the spool: {e}");
                    last = None;
                }
                Err(_) => return,
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
}
