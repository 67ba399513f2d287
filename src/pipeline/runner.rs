//! The pipeline route: reads the pipeline's queue from the spool in order, evaluates each event
//! against the rules, and commits the new alert states, the alerts (into the alert outbox, a
//! route like any other) and the event's "done" mark in one transaction. Held alerts (`for`)
//! fire here when their time comes.
//!
//! Each event is evaluated at most once: with the states, the same transaction records, per
//! entity, the last event evaluated for it (`evaluated` marks, kept beside the alert states).
//! Event ids grow with arrival, so an event that comes back (`events replay`) with an id not
//! above its entity's mark is either the one already evaluated or older than one that was;
//! judging it again could only repeat an alert or send a stale one, so it is skipped with an
//! info line saying so. (Forward routes do redeliver on replay; this is the pipeline only.)
//!
//! In a cluster the states are the cluster's (KV values spread by entity over [`SHARDS`]
//! shards, with, per entity, Port's time of the latest change judged): each event, held alert
//! and reconciliation snapshot is judged against them as they are now and written, shard by
//! shard, with compare-and-set before anything is committed locally; the alerts go to the
//! alerts' outbox, named by the unique token of the write that landed them (a write NATS did
//! not answer is read back: if its token is there, it landed).
//!
//! Each such write also records, in the shard, what it judged and the alerts it implies
//! ([`Judged`]). A live event is named by its stream message: an instance taking over an
//! event whose judgement landed but was never acked (the cluster feed acks the pipeline's
//! events only once their alerts are published) finds the record, does not judge again, and
//! commits the recorded alerts under the same names (the stream drops what was published
//! already). Held alerts and reconciliations have no stream message: every other instance
//! that reads their record queues its alerts again under the same names, so whatever becomes
//! of their writer, they are published, and before any later change of the entity.
//!
//! Every judgement that queues alerts for an entity (live, held, reconciled, a takeover) first
//! queues again that entity's alerts of the shard's earlier records still within the re-send
//! window, under their own names and in write order ([`ClusterView::earlier_alerts`]): an
//! earlier alert not yet published (its writer stalled, or died after its write) then goes
//! out before the newer one whoever publishes first, and the stream drops those published.
//!
//! Test-only: debug builds abort the process right after an alert-state write when
//! `SMEE_RELAY_FAULT` asks (see `cluster`'s module header).
//!
//! Evaluation runs on tokio's blocking pool: a `when` condition runs in the jq worker process
//! and may take up to its time budget; the async workers (other routes) never wait for it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use serde::{Deserialize, Serialize};

use super::{
    ALERT_ROUTE, Alert, AlertState, Evaluation, PIPELINE_ROUTE, Pipeline, port, reconcile,
};
use crate::cluster::{Cluster, SharedState, StoreError};
use crate::spool::writer::SpoolWriter;
use crate::spool::{Outcome, Spool, Write};

/// How often an idle pipeline in a cluster reads the states again (they live in NATS and may
/// change on any instance).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// How long after the start no held alert fires (see `holds_from` in [`run`]).
const HOLDS_WAIT_AT_START: Duration = Duration::from_secs(10);

/// A clock that follows tokio's (so tests can pause and advance it) from the wall-clock time
/// at start.
#[derive(Clone, Copy)]
struct Clock {
    wall_at_start: u64,
    started: tokio::time::Instant,
}

impl Clock {
    fn new() -> Self {
        Self {
            wall_at_start: crate::clock::now_ms(),
            started: tokio::time::Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.wall_at_start + self.started.elapsed().as_millis() as u64
    }
}

/// Evaluate the pipeline route's events in order; fire held alerts when their time comes.
/// Each event's new alert states, its alerts and its mark are committed together.
pub async fn run(
    spool: Arc<Spool>,
    writer: SpoolWriter,
    mut rules: watch::Receiver<Arc<Pipeline>>,
    cluster: Option<Cluster>,
    cancel: CancellationToken,
) {
    let clock = Clock::new();
    // No hold fires before this: one that ended while the relay was stopped waits for what
    // the channels send on reconnecting (a server that keeps events, as `serve` does, sends
    // those received meanwhile at once), which may end it (helper-139, helper-140: FIRING
    // then RESOLVED for a rise that ended within its hold, the recovery replayed just after
    // the start).
    let holds_from = clock.now_ms() + HOLDS_WAIT_AT_START.as_millis() as u64;
    // `evaluated`: per entity, the last event evaluated for it; a replayed event at or below it
    // is skipped.
    let (loaded, mut evaluated) = load_states(&spool).unwrap_or_else(|e| {
        error!("cannot read alert states, starting from OK: {e}");
        Default::default()
    });
    // In a cluster the states are the cluster's, read shard by shard below.
    let mut view = cluster.as_ref().map(|cluster| {
        let settings = cluster.settings();
        // A re-sent alert must reach the stream while it still drops the first copy.
        let resend_within = settings
            .dedupe_window
            .saturating_sub(settings.ack_wait + Duration::from_secs(60));
        ClusterView::new(cluster.shared_state("alert-states"), resend_within)
    });
    let loaded = if view.is_some() {
        HashMap::new()
    } else {
        loaded
    };
    // Shared with the blocking evaluation; the copy-on-write below is free once it returned.
    let mut states = Arc::new(loaded);
    // One warning per (rule, entity, reason), not one per event; the reason without the value
    // it quotes, or a string metric that changes often would warn on every change.
    let mut warned: HashSet<(String, String, String)> = HashSet::new();
    // One error line per (rule, kind of failure): a hostile rule fails on every event.
    let mut failed_once: HashSet<(String, &'static str)> = HashSet::new();
    let mut appended = writer.appended();
    // Wakes the idle wait for writes the writer does not tell of (`Spool::changed`).
    let mut nudges = spool.nudges();
    let mut cursor = 0;
    // In a cluster, per entity, Port's time of the latest change any instance judged (the
    // shared counterpart of `evaluated`'s `updated_ms`).
    let mut changed: HashMap<String, u64> = HashMap::new();
    while !cancel.is_cancelled() {
        // The rules as of now: a reload swaps them between events (and wakes the idle wait
        // below: a held alert's time may have moved).
        let pipeline = rules.borrow_and_update().clone();
        // A read of the cluster's states waits on NATS, which a stop does not (a stall would
        // hold it up to the request timeout, past the shutdown's bound).
        if let Some(view) = &mut view
            && (!cancel
                .run_until_cancelled(view.refresh_all(false, &mut states, &mut changed))
                .await
                .unwrap_or(false)
                || !resend_recorded(view, &writer).await)
        {
            wait(&cancel, Duration::from_secs(1)).await;
            continue;
        }
        // Before the read: another process's write from here on (`events replay`) changes the
        // file after `seen`, and a nudge from here on wakes the wait below.
        nudges.mark();
        let seen = spool.look();
        let queued = {
            let spool = spool.clone();
            tokio::task::spawn_blocking(move || spool.pending(PIPELINE_ROUTE, cursor, 64)).await
        };
        let queued = match queued {
            Ok(Ok(queued)) => queued,
            Ok(Err(e)) => {
                error!("pipeline cannot read the spool: {e}");
                Vec::new()
            }
            Err(_) => return,
        };
        // Held alerts whose time has come; in a cluster, shard by shard, each written with
        // compare-and-set before its alerts are committed. In the order of time, as they would
        // have come live: those due before the channel received the next event to judge (a
        // recovery received during a hold ends it, helper-138; one received after the hold
        // ended resolves the alert the hold fired, helper-141), and none before `holds_from`
        // while nothing is queued (what a server replays on reconnecting may be on its way).
        let now = clock.now_ms();
        let received = |item: &crate::spool::Queued| {
            super::received_ms(&item.event.event, item.event.received_ms).min(now)
        };
        let judged_up_to = match queued.first() {
            Some(item) => received(item),
            None if now < holds_from => 0,
            None => now,
        };
        // A snapshot at the head (the start's reconciliation, say) holds Port's state of its
        // entities since their last change: a hold of one of them that came due after that
        // change is the snapshot's to judge, not fired before it (helper-146: FIRING, then
        // RESOLVED by the snapshot, for a rise Port had seen end within its hold).
        let snapshot_times = queued
            .first()
            .filter(|_| {
                pipeline
                    .next_due(states.iter())
                    .is_some_and(|due| due <= judged_up_to)
            })
            .and_then(|head| reconcile::entity_times(&head.event))
            // Only a change newer than the last one judged (live, or in a cluster any
            // instance's): the change that began the hold, seen again, tells nothing new, and
            // the hold fires as it would have (helper-153: it fired as the snapshot's, "? → 95,
            // found by reconciliation after a gap", for a change the relay had judged).
            .map(|mut times| {
                times.retain(|subject, at| {
                    let judged = newest(changed.get(subject).copied(), &evaluated, subject);
                    judged.is_none_or(|judged| *at > judged)
                });
                times
            });
        let matured = pipeline.mature(
            states.iter().filter(|(key, state)| {
                !(snapshot_times.as_ref())
                    .is_some_and(|times| pipeline.due_after(key, state, times))
            }),
            judged_up_to,
        );
        let mut groups: std::collections::BTreeMap<usize, Vec<_>> = Default::default();
        for entry in matured {
            let n = if view.is_some() {
                shard_of(&entry.0)
            } else {
                0
            };
            groups.entry(n).or_default().push(entry);
        }
        let mut lost = false;
        for (n, matured) in groups {
            let (token, earlier) = match &mut view {
                Some(view) => {
                    let changes = matured.iter().map(|(k, s, _)| (k.clone(), s.clone()));
                    let record = (
                        HELD.to_string(),
                        fired(&matured).cloned().collect(),
                        Vec::new(),
                    );
                    match view.store(n, changes, [], Some(record), &cancel).await {
                        Stored::Landed(token) => {
                            // Test-only (debug builds, `SMEE_RELAY_FAULT`): a crash right
                            // here, the write landed and nothing committed locally.
                            #[cfg(debug_assertions)]
                            if crate::cluster::fault("abort-after-held-alert-write").is_some() {
                                eprintln!("fault injected: abort after a held alert's write");
                                std::process::abort();
                            }
                            let own: Vec<Alert> = fired(&matured).cloned().collect();
                            let earlier = view.earlier_alerts(n, &own, Some(&token));
                            (Some(token), earlier)
                        }
                        Stored::Lost => {
                            // Another instance moved first (it fires them) or NATS is away:
                            // read again.
                            lost = true;
                            break;
                        }
                    }
                }
                None => (None, Vec::new()),
            };
            let mut writes: Vec<Write> = (matured.iter())
                .map(|(key, state, _)| state_write(key, state))
                .collect();
            let alerts: Vec<Alert> = fired(&matured).cloned().collect();
            match &token {
                Some(token) => writes.extend(alert_appends(earlier, &alerts, token)),
                None if alerts.is_empty() => {}
                None => writes.push(alert_append(
                    alerts.iter().map(Alert::to_event).collect(),
                    None,
                )),
            }
            if commit(&writer, writes).await {
                let states = Arc::make_mut(&mut states);
                for (key, state, alert) in matured {
                    match alert {
                        Ok(alert) => {
                            info!(rule = %alert.rule, entity = %alert.entity, "{}", alert.headline());
                            count_alert(&alert);
                        }
                        Err(ended) => info!("{ended}"),
                    }
                    if state == AlertState::default() {
                        states.remove(&key);
                    } else {
                        states.insert(key, state);
                    }
                }
            }
        }
        if lost {
            continue;
        }

        if queued.is_empty() {
            // Wait for an append, a held alert's time, or a write by another process
            // (`Spool::changed`). In a cluster the states live in NATS and may change anywhere:
            // read again every second as before.
            let now = clock.now_ms();
            let due = pipeline
                .next_due(states.iter())
                .map(|due| Duration::from_millis(due.max(holds_from).saturating_sub(now)));
            let wait = if view.is_some() {
                Some(due.map_or(IDLE_POLL, |due| due.min(IDLE_POLL)))
            } else {
                due
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = appended.changed() => {}
                () = spool.changed(&mut nudges, &seen) => {}
                Ok(()) = rules.changed() => {}
                _ = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {}
            }
            continue;
        }
        // The first hold due after the step above. Walked once per read, not per event: a
        // hold that begins below is due after `now`, so after every event of this read; one
        // that ends below only costs a read again. In a cluster a state read below may be
        // another instance's hold, so there it is walked again after each read of states.
        let mut next_due = pipeline.next_due(states.iter());
        for (n, item) in queued.into_iter().enumerate() {
            // A hold due before the channel received this event fires first: read the queue
            // again from here, after the step above.
            if n > 0 && next_due.is_some_and(|due| due <= received(&item)) {
                break;
            }
            let id = item.event.id;
            // In a cluster, each event is judged against the states as they are now: its
            // entity's shard (a snapshot: every shard) read again.
            if let Some(view) = &mut view {
                let read = cancel.run_until_cancelled(async {
                    if reconcile::is_snapshot(&item.event) {
                        view.refresh_all(true, &mut states, &mut changed).await
                    } else if let Some((key, _)) = subject(&item.event.event) {
                        view.refresh_one(&key, &mut states, &mut changed).await
                    } else {
                        true
                    }
                });
                // Stopping: the event stays queued, unjudged.
                let Some(read) = read.await else { return };
                if !read || !resend_recorded(view, &writer).await {
                    break;
                }
                next_due = pipeline.next_due(states.iter());
            }
            let mark = |outcome| Write::Mark {
                route: PIPELINE_ROUTE.into(),
                seq: item.seq,
                event: item.event.id,
                outcome,
            };
            if reconcile::is_snapshot(&item.event) {
                let cluster = view.as_mut().map(|view| InCluster {
                    view,
                    changed: &mut changed,
                    cancel: &cancel,
                });
                if judge_snapshot(
                    &item,
                    &pipeline,
                    &mut states,
                    &mut evaluated,
                    &writer,
                    clock.now_ms(),
                    cluster,
                )
                .await
                .is_none()
                {
                    break;
                }
                cursor = item.seq;
                continue;
            }
            let subject = subject(&item.event.event);
            let changed_ms = subject.as_ref().and_then(|(_, at)| *at);
            let subject = subject.map(|(key, _)| key);
            // An entity named by kilobytes is hostile or broken: refused before it is judged
            // (and so before it is stored in state every instance reads).
            if let Some(key) = &subject
                && key.len() > MAX_ENTITY_BYTES
            {
                metrics::counter!("smee_relay_pipeline_refused_total", "reason" => "entity_too_long")
                    .increment(1);
                error!(
                    event = id,
                    "pipeline: event {id} names an entity of {} bytes (blueprint and identifier), over the {MAX_ENTITY_BYTES} the pipeline judges; refused as bad input, not judged (a dead letter of the pipeline route; counted in smee_relay_pipeline_refused_total)",
                    key.len()
                );
                let dead = Outcome::Dead {
                    status: None,
                    error: format!(
                        "entity of {} bytes, over the {MAX_ENTITY_BYTES} the pipeline judges",
                        key.len()
                    ),
                };
                if !commit(&writer, vec![mark(dead)]).await {
                    break;
                }
                cursor = item.seq;
                continue;
            }
            // In a cluster, what this event is cluster-wide: its stream message.
            let judged_as = judged_as(cluster.as_ref(), &item.event.event);
            // An event another instance judged (its alert-state write landed) and did not
            // finish (it died before its commit, or before its alerts were published and the
            // event acked): not judged again, which would find nothing to send; the write
            // recorded the alerts it implies, and they are committed here under its names.
            if let (Some(view), Some(key), Some(of)) = (&view, &subject, &judged_as)
                && let Some(record) = view.judged(shard_of(key), of).cloned()
            {
                let entity = key.split_once('\u{1f}').map_or(key.as_str(), |(_, e)| e);
                let mut writes: Vec<Write> = states
                    .iter()
                    .filter(|(k, _)| k.split_once('\u{1f}').is_some_and(|(_, e)| e == entity))
                    .map(|(k, s)| state_write(k, s))
                    .collect();
                // The earlier alerts of the entity first, as any judgement does.
                let earlier =
                    view.earlier_alerts(shard_of(key), &record.alerts, Some(&record.token));
                writes.extend(alert_appends(earlier, &record.alerts, &record.token));
                if pipeline.record_verdicts && carries_run(&item.event.event.body) {
                    let verdict = EventVerdict {
                        alerts: record
                            .alerts
                            .iter()
                            .map(|a| format!("{} {}", a.rule, a.status))
                            .collect(),
                        failed: record.failed.clone(),
                        // The judging instance kept only what it sent and what failed.
                        ..EventVerdict::default()
                    };
                    writes.push(Write::State {
                        key: verdict_key(id),
                        value: Some(serde_json::to_vec(&verdict).expect("a verdict serialises")),
                    });
                }
                let done = Evaluated {
                    event: id,
                    at_ms: clock.now_ms(),
                    updated_ms: newest(changed_ms, &evaluated, key),
                };
                writes.push(Write::State {
                    key: format!("{EVALUATED_PREFIX}{key}"),
                    value: Some(serde_json::to_vec(&done).expect("a mark serialises")),
                });
                writes.push(mark(Outcome::Delivered { status: 200 }));
                if !commit(&writer, writes).await {
                    break;
                }
                info!(
                    event = id,
                    entity,
                    "pipeline: took over another instance's judgement of event {id} (its alert-state write landed, it did not finish); re-sent its {} (the stream drops any it already published)",
                    crate::error::count(record.alerts.len(), "alert", "alerts")
                );
                if record.untold > 0 {
                    error!(
                        event = id,
                        entity,
                        "pipeline: {} of that judgement (too large to keep in the cluster's alert state, over {JUDGED_BYTES} bytes) cannot be re-sent: lost",
                        crate::error::count(record.untold, "alert", "alerts")
                    );
                }
                for alert in &record.alerts {
                    info!(event = id, rule = %alert.rule, entity = %alert.entity, "{}", alert.headline());
                    count_alert(alert);
                }
                evaluated.insert(key.clone(), done);
                cursor = item.seq;
                continue;
            }
            // An event is said to be an older change only if its signature holds: a forged
            // body, or an old signed one posted afresh, is rejected for that (helper-117).
            let received = super::received_ms(&item.event.event, item.event.received_ms);
            let signed = || {
                pipeline
                    .check_signature(&item.event.event, received)
                    .is_ok()
            };
            if let Some((key, done)) = subject
                .as_ref()
                .and_then(|key| Some((key, evaluated.get(key)?)))
                && (id <= done.event
                    || (matches!((changed_ms, done.updated_ms), (Some(now), Some(then)) if now < then)
                        && signed()))
            {
                say_skipped(id, key, done);
                if !commit(&writer, vec![mark(Outcome::Delivered { status: 200 })]).await {
                    break;
                }
                cursor = item.seq;
                continue;
            }
            // In a cluster, a change older than one another instance judged (or a
            // reconciliation read) is stale in the same way.
            if view.is_some()
                && let Some(key) = &subject
                && let (Some(now), Some(then)) = (changed_ms, changed.get(key).copied())
                && now < then
                && signed()
            {
                let entity = key.split('\u{1f}').nth(1).unwrap_or(key);
                info!(
                    event = id,
                    entity,
                    "pipeline: event {id} changes the entity at a time before the change of {} the cluster judged (or Port's state read by reconciliation); the newer one stands and no alert is sent",
                    crate::clock::rfc3339_seconds(then)
                );
                if !commit(&writer, vec![mark(Outcome::Delivered { status: 200 })]).await {
                    break;
                }
                cursor = item.seq;
                continue;
            }
            let now = clock.now_ms();
            let evaluation = {
                let (pipeline, states, event) =
                    (pipeline.clone(), states.clone(), item.event.event.clone());
                tokio::task::spawn_blocking(move || {
                    let current = |key: &str| states.get(key).cloned().unwrap_or_default();
                    pipeline.evaluate(&event, &current, now, received)
                })
                .await
            };
            let Ok(evaluation) = evaluation else {
                // The evaluation panicked (a bug, never input: bounds live in the worker).
                error!(
                    event = id,
                    "pipeline: evaluating the event failed; it stays queued"
                );
                break;
            };
            // Whether the rules judged the event (so it must never be judged again).
            match &evaluation {
                Evaluation::NotPort(reason) => {
                    tracing::debug!(event = id, "pipeline: not a Port event ({reason})");
                }
                Evaluation::Unreadable(reason) => warn!(
                    event = id,
                    "pipeline: {reason}; its rules do not judge it (a dead letter of the pipeline route; the channel's forward targets, if any, still get it)"
                ),
                _ => {}
            }
            // An event the rules never judged: only its mark, and a replay may judge it (after
            // fixing the secret, say).
            let unjudged = |outcome| {
                (
                    vec![mark(outcome)],
                    Default::default(),
                    Vec::new(),
                    false,
                    Vec::new(),
                )
            };
            let (mut writes, new_states, alerts, judged, failed_now) = match evaluation {
                Evaluation::NotPort(_) => unjudged(Outcome::Delivered { status: 200 }),
                // A dead letter, not a delivery: `events list` showed it judged (helper-138).
                Evaluation::Unreadable(reason) => unjudged(Outcome::Dead {
                    status: None,
                    error: format!("not judged: {reason}"),
                }),
                Evaluation::Rejected(e) => {
                    // Counted: a wrong client secret rejects every event (helper-146).
                    metrics::counter!("smee_relay_pipeline_refused_total", "reason" => "signature")
                        .increment(1);
                    warn!(
                        event = id,
                        "pipeline: rejected: {e}; the event is not evaluated"
                    );
                    unjudged(Outcome::Dead {
                        status: None,
                        error: format!("signature rejected: {e}"),
                    })
                }
                Evaluation::Evaluated {
                    alerts,
                    states: new_states,
                    skipped,
                    failed,
                    ..
                } => {
                    let mut unjudged = Vec::new();
                    for (rule, entity, reason) in skipped {
                        let kind = reason.split(" (").next().unwrap_or(&reason).to_string();
                        if warned.insert((rule.clone(), entity.clone(), kind)) {
                            warn!(rule = %rule, entity = %entity, "rule cannot judge: {reason}; its state is unchanged (said once per rule, entity and reason)");
                        }
                        unjudged.push(format!("{rule} cannot judge: {reason}"));
                    }
                    let failed_now: Vec<String> = failed
                        .iter()
                        .map(|f| format!("rule {} failed: {}", f.rule, f.reason))
                        .collect();
                    for failure in failed {
                        metrics::counter!(
                            "smee_relay_rule_errors_total",
                            "rule" => failure.rule.clone(),
                            "kind" => failure.kind
                        )
                        .increment(1);
                        if failed_once.insert((failure.rule.clone(), failure.kind)) {
                            error!(
                                event = id,
                                rule = %failure.rule,
                                entity = %failure.entity,
                                "rule {} failed for event {id}: {}; its state is unchanged, other rules go on (logged once per rule and kind; counted in smee_relay_rule_errors_total)",
                                failure.rule,
                                failure.reason
                            );
                        }
                    }
                    let mut writes: Vec<Write> =
                        new_states.iter().map(|(k, s)| state_write(k, s)).collect();
                    if pipeline.record_verdicts && carries_run(&item.event.event.body) {
                        let verdict = EventVerdict {
                            alerts: alerts
                                .iter()
                                .map(|a| format!("{} {}", a.rule, a.status))
                                .collect(),
                            failed: failed_now.clone(),
                            held: new_states
                                .values()
                                .filter(|s| matches!(s.phase, super::state::Phase::Pending { .. }))
                                .filter_map(|s| s.draft.as_ref())
                                .map(|a| format!("{} PENDING", a.rule))
                                .collect(),
                            unjudged,
                        };
                        writes.push(Write::State {
                            key: verdict_key(id),
                            value: Some(
                                serde_json::to_vec(&verdict).expect("a verdict serialises"),
                            ),
                        });
                    }
                    writes.push(mark(Outcome::Delivered { status: 200 }));
                    (writes, new_states, alerts, true, failed_now)
                }
            };
            let done = subject.clone().filter(|_| judged).map(|key| {
                let updated_ms = newest(changed_ms, &evaluated, &key);
                (
                    key,
                    Evaluated {
                        event: id,
                        at_ms: now,
                        updated_ms,
                    },
                )
            });
            if let Some((key, done)) = &done {
                writes.push(Write::State {
                    key: format!("{EVALUATED_PREFIX}{key}"),
                    value: Some(serde_json::to_vec(done).expect("a mark serialises")),
                });
            }
            // Compare-and-set first: of two instances judging with the same states, one wins
            // and sends; the other judges again against the winner's states. The change's
            // Port time goes with it, so a reconciliation on any instance knows it.
            let newer_mark: Vec<(String, u64)> = match (&done, changed_ms) {
                (Some((key, _)), Some(at)) if changed.get(key).is_none_or(|then| *then < at) => {
                    vec![(key.clone(), at)]
                }
                _ => Vec::new(),
            };
            let mut token = None;
            let mut earlier = Vec::new();
            if let Some(view) = &mut view
                // Alerts always make a write: its token names them (`alert_append`).
                && (!new_states.is_empty() || !newer_mark.is_empty() || !alerts.is_empty())
            {
                // One entity, one shard: its states and its change time hash alike.
                let n = subject
                    .as_deref()
                    .or_else(|| new_states.keys().next().map(String::as_str))
                    .map_or(0, shard_of);
                let record = judged_as
                    .clone()
                    .map(|of| (of, alerts.clone(), failed_now.clone()));
                match view
                    .store(n, new_states.clone(), newer_mark.clone(), record, &cancel)
                    .await
                {
                    Stored::Landed(landed) => {
                        earlier = view.earlier_alerts(n, &alerts, Some(&landed));
                        token = Some(landed);
                    }
                    Stored::Lost => break,
                }
                // Test-only (debug builds, `SMEE_RELAY_FAULT`): a crash right here, the
                // write landed and nothing committed locally.
                #[cfg(debug_assertions)]
                if alerts
                    .iter()
                    .any(|a| a.status == super::AlertStatus::Firing)
                    && crate::cluster::fault("abort-after-alert-state-write").is_some()
                {
                    eprintln!("fault injected: abort after the alert-state write of event {id}");
                    std::process::abort();
                }
            }
            match &token {
                Some(token) => writes.extend(alert_appends(earlier, &alerts, token)),
                None if !alerts.is_empty() => writes.push(alert_append(
                    alerts.iter().map(Alert::to_event).collect(),
                    None,
                )),
                None => {}
            }
            if !commit(&writer, writes).await {
                // Not recorded: stop here and read the queue again from this event.
                break;
            }
            for alert in &alerts {
                info!(event = id, rule = %alert.rule, entity = %alert.entity, "{}", alert.headline());
                count_alert(alert);
            }
            say_holds(&pipeline, id, &states, &new_states);
            Arc::make_mut(&mut states).extend(new_states);
            changed.extend(newer_mark);
            if let Some((key, done)) = done {
                evaluated.insert(key, done);
            }
            cursor = item.seq;
        }
    }
}

/// Say each hold that begins or ends unfired among `new_states`, judged from `states`
/// (helper-140: nothing told of one until it fired; helper-153: nor of one a reconciliation
/// began; helper-157: one that ended unfired was never said after its "fires at").
fn say_holds<'a>(
    pipeline: &Pipeline,
    id: u64,
    states: &HashMap<String, AlertState>,
    new_states: impl IntoIterator<Item = (&'a String, &'a AlertState)>,
) {
    for (key, state) in new_states {
        if let (Some(before), super::Phase::Ok) = (states.get(key), state.phase)
            && let (super::Phase::Pending { .. }, Some(draft)) = (before.phase, &before.draft)
        {
            info!(
                event = id,
                rule = %draft.rule,
                entity = %draft.entity,
                "held alert {}: {} ends without firing: its condition stopped holding before its hold time (or the entity was deleted)",
                draft.rule,
                crate::text::escape_control(&draft.title)
            );
            continue;
        }
        let began = !matches!(
            states.get(key).map(|s| s.phase),
            Some(super::Phase::Pending { .. })
        );
        if let (true, super::Phase::Pending { since_ms }, Some(draft)) =
            (began, state.phase, &state.draft)
        {
            let hold = pipeline
                .rule(&draft.rule)
                .map_or(Duration::ZERO, |r| r.hold);
            let due = super::state::due_at(state.phase, hold).unwrap_or(since_ms);
            info!(
                event = id,
                rule = %draft.rule,
                entity = %draft.entity,
                "PENDING {}: {}: held (for {}), fires at {} unless a change ends it first",
                draft.rule,
                crate::text::escape_control(&draft.title),
                humantime::format_duration(hold),
                crate::clock::rfc3339_seconds(due)
            );
        }
    }
}

/// The newest of Port's time of a change just judged and the newest judged before for the
/// entity: a change with no readable time is judged (its order is unknown) but must not
/// clear the time an older change is compared with (helper-130).
fn newest(
    changed_ms: Option<u64>,
    evaluated: &HashMap<String, Evaluated>,
    key: &str,
) -> Option<u64> {
    changed_ms.max(evaluated.get(key).and_then(|done| done.updated_ms))
}

/// Judge a reconciliation snapshot and commit what it found, like any event: the new states,
/// the alerts, the per-entity marks and the snapshot's own mark, in one transaction. `None`
/// when the commit failed (the snapshot stays queued and is judged again).
async fn judge_snapshot(
    item: &crate::spool::Queued,
    pipeline: &Arc<Pipeline>,
    states: &mut Arc<HashMap<String, AlertState>>,
    evaluated: &mut HashMap<String, Evaluated>,
    writer: &SpoolWriter,
    now: u64,
    mut cluster: Option<InCluster<'_>>,
) -> Option<()> {
    let id = item.event.id;
    let mark = |outcome| Write::Mark {
        route: PIPELINE_ROUTE.into(),
        seq: item.seq,
        event: id,
        outcome,
    };
    let snapshot: reconcile::Snapshot = match serde_json::from_slice(&item.event.event.body) {
        Ok(snapshot) => snapshot,
        Err(e) => {
            // Only the relay writes these; one it cannot read is kept, dead, for inspection.
            error!(
                event = id,
                "pipeline: reconciliation snapshot {id} cannot be read ({e}); it is not judged"
            );
            let dead = Outcome::Dead {
                status: None,
                error: format!("unreadable reconciliation snapshot: {e}"),
            };
            return commit(writer, vec![mark(dead)]).await.then_some(());
        }
    };
    let mut seen: HashMap<String, reconcile::Seen> = evaluated
        .iter()
        .map(|(k, e)| {
            (
                k.clone(),
                reconcile::Seen {
                    event: e.event,
                    updated_ms: e.updated_ms,
                },
            )
        })
        .collect();
    // In a cluster, the changes other instances judged count too: by Port's time (their
    // spool ids are theirs, not comparable with this snapshot's).
    if let Some(InCluster { changed, .. }) = &cluster {
        for (key, at) in changed.iter() {
            let entry = seen.entry(key.clone()).or_insert(reconcile::Seen {
                event: 0,
                updated_ms: None,
            });
            entry.updated_ms = Some(entry.updated_ms.map_or(*at, |then| then.max(*at)));
        }
    }
    let outcome = {
        let (pipeline, states, snapshot) = (pipeline.clone(), states.clone(), snapshot.clone());
        tokio::task::spawn_blocking(move || {
            reconcile::judge_snapshot(
                &pipeline,
                &snapshot,
                &states,
                &|k| seen.get(k).copied(),
                id,
                now,
            )
        })
        .await
        .ok()?
    };
    for (rule, entity, reason) in &outcome.skipped {
        tracing::debug!(rule = %rule, entity = %entity, "reconciliation: rule cannot judge: {reason}");
    }
    // In a cluster, compare-and-set first, as for a live event, shard by shard: of two
    // instances judging snapshots of the same gap against the same states, one wins and
    // sends; the other is judged again (by the caller) against the winner's states, and finds
    // nothing to send. Each shard's states and alerts are committed once its write landed, so
    // a later shard losing its write repeats nothing of an earlier one's.
    let mut committed: HashSet<usize> = HashSet::new();
    if let Some(InCluster {
        view,
        changed,
        cancel,
    }) = &mut cluster
    {
        let marks: Vec<(String, u64)> = outcome
            .seen
            .iter()
            .filter_map(|(key, at)| Some((key.clone(), (*at)?)))
            .filter(|(key, at)| changed.get(key).is_none_or(|then| then < at))
            .collect();
        let mut shards: std::collections::BTreeSet<usize> = Default::default();
        shards.extend(outcome.states.keys().map(|k| shard_of(k)));
        shards.extend(marks.iter().map(|(k, _)| shard_of(k)));
        shards.extend(
            outcome
                .alerts
                .iter()
                .map(|a| shard_of(&super::state_key(&a.rule, &a.entity))),
        );
        for n in shards {
            let changes: Vec<(String, AlertState)> = outcome
                .states
                .iter()
                .filter(|(k, _)| shard_of(k) == n)
                .map(|(k, s)| (k.clone(), s.clone()))
                .collect();
            let shard_marks: Vec<(String, u64)> = marks
                .iter()
                .filter(|(k, _)| shard_of(k) == n)
                .cloned()
                .collect();
            let alerts: Vec<&Alert> = outcome
                .alerts
                .iter()
                .filter(|a| shard_of(&super::state_key(&a.rule, &a.entity)) == n)
                .collect();
            let own: Vec<Alert> = alerts.iter().map(|a| (*a).clone()).collect();
            let token = match view
                .store(
                    n,
                    changes.clone(),
                    shard_marks.clone(),
                    Some((RECONCILED.to_string(), own.clone(), Vec::new())),
                    cancel,
                )
                .await
            {
                Stored::Landed(token) => token,
                Stored::Lost => return None,
            };
            let mut writes: Vec<Write> = changes.iter().map(|(k, s)| state_write(k, s)).collect();
            let earlier = view.earlier_alerts(n, &own, Some(&token));
            writes.extend(alert_appends(earlier, &own, &token));
            if !commit(writer, writes).await {
                return None;
            }
            for alert in alerts {
                info!(event = id, rule = %alert.rule, entity = %alert.entity, "{}", alert.headline());
                count_alert(alert);
            }
            say_holds(pipeline, id, states, changes.iter().map(|(k, s)| (k, s)));
            Arc::make_mut(states).extend(changes);
            changed.extend(shard_marks);
            committed.insert(n);
        }
    }
    let mut writes: Vec<Write> = Vec::new();
    if cluster.is_none() {
        writes.extend(outcome.states.iter().map(|(k, s)| state_write(k, s)));
        if !outcome.alerts.is_empty() {
            writes.push(alert_append(
                outcome.alerts.iter().map(Alert::to_event).collect(),
                None,
            ));
        }
    }
    let marks: Vec<(String, Evaluated)> = outcome
        .seen
        .iter()
        .map(|(key, updated_ms)| {
            (
                key.clone(),
                Evaluated {
                    event: id,
                    at_ms: now,
                    updated_ms: newest(*updated_ms, evaluated, key),
                },
            )
        })
        .collect();
    for (key, done) in &marks {
        writes.push(Write::State {
            key: format!("{EVALUATED_PREFIX}{key}"),
            value: Some(serde_json::to_vec(done).expect("a mark serialises")),
        });
    }
    writes.push(mark(Outcome::Delivered { status: 200 }));
    if !commit(writer, writes).await {
        return None;
    }
    reconcile::report(&snapshot.blueprint, id, &outcome);
    if cluster.is_none() {
        for alert in &outcome.alerts {
            info!(event = id, rule = %alert.rule, entity = %alert.entity, "{}", alert.headline());
            count_alert(alert);
        }
        say_holds(pipeline, id, states, &outcome.states);
        Arc::make_mut(states).extend(outcome.states);
    }
    evaluated.extend(marks);
    Some(())
}

/// What the pipeline made of one judged event that carries a run id, recorded in the
/// commit that settles the event (so whoever sees the event settled finds it) when
/// [`Pipeline::record_verdicts`](super::Pipeline) is on. The actions route reads it to report
/// an Automation run's outcome, and removes it in the commit that queues that report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventVerdict {
    /// The alerts it produced, as headlines (`cpu-high FIRING`): the run's summary.
    pub alerts: Vec<String>,
    /// Rules whose condition failed on it (`rule x failed: why`): the run failed.
    pub failed: Vec<String>,
    /// Rules it started holding (`cpu-high PENDING`): they fire after their `for`.
    #[serde(default)]
    pub held: Vec<String>,
    /// Rules that could not judge it (`cpu-high cannot judge: property cpuUtil is missing`).
    #[serde(default)]
    pub unjudged: Vec<String>,
}

/// The state key of an event's [`EventVerdict`]: a prefix no alert state or run state has.
pub fn verdict_key(event: u64) -> String {
    format!("{VERDICT_PREFIX}{event}")
}

const VERDICT_PREFIX: &str = "\u{1e}verdict\u{1f}";

/// Whether a body names a run (an Automation's WEBHOOK: `run.id`; the legacy shape's
/// `context.runId`; a self-service run's `port_context.runId`): the places the actions route
/// looks for one.
fn carries_run(body: &[u8]) -> bool {
    let Ok(value) = super::port::read_json(body) else {
        return false;
    };
    ["/run/id", "/context/runId", "/port_context/runId"]
        .iter()
        .any(|path| value.pointer(path).is_some_and(|v| v.is_string()))
}

/// How many KV values the cluster's alert state is spread over (`alert-states.<n>`), each
/// holding the entities whose identifier hashes to it. NATS caps one value at its
/// `max_payload` (1 MiB by default); spread this wide the state holds well over a million
/// entities, and a judgement compare-and-sets only the part its entity is in.
const SHARDS: usize = 256;

/// The longest entity (blueprint and identifier) the pipeline judges, in bytes. Port's
/// identifiers are far shorter; a longer one is hostile or broken input, refused (dead, with
/// the reason) rather than stored in state every instance reads.
pub(crate) const MAX_ENTITY_BYTES: usize = 1024;

/// How often, at most, every shard is read while the bucket moves (see
/// [`ClusterView::walked`]).
const WALK_EVERY: Duration = Duration::from_secs(1);

/// How many of the latest write tokens a shard keeps: an instance whose write got no answer
/// finds its token there as long as fewer writes followed.
const WRITE_TOKENS: usize = 32;

/// The shard of a state key (`rule<US>entity`) or a change-time key (`blueprint<US>entity`):
/// by the entity, so all of an entity's states and its change time share one shard. FNV-1a:
/// the same on every instance and every release (std's hasher promises neither).
fn shard_of(key: &str) -> usize {
    let entity = key.split_once('\u{1f}').map_or(key, |(_, entity)| entity);
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in entity.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % SHARDS as u64) as usize
}

/// What one shard of the cluster's alert state holds: a KV value, changed only with
/// compare-and-set on its revision.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SharedAlerts {
    /// The alert states, by rule and entity.
    states: HashMap<String, AlertState>,
    /// Per entity, Port's time of the latest change judged (live or by reconciliation), by
    /// any instance: a change older than it is stale, and a snapshot read before it loses.
    #[serde(default)]
    changed: HashMap<String, u64>,
    /// The tokens of the latest writes, newest last: a writer that got no answer from NATS
    /// reads the value again and finds its own token if its write landed.
    #[serde(default)]
    writes: Vec<String>,
    /// What the latest writes judged, and the alerts each implies (bounded: those of the
    /// last [`WRITE_TOKENS`] writes, at most [`JUDGED_BYTES`] of alerts): an instance that
    /// takes over a judgement whose writer did not finish re-sends them under the same names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    judged: Vec<Judged>,
}

/// One judgement a shard write landed, recorded beside the state it wrote.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Judged {
    /// What was judged, named alike on every instance ([`judged_as`]).
    of: String,
    /// The token of the write: its alerts are named by it (`alerts@<token>#<n>`).
    token: String,
    /// The alerts the write implies, in their order in the commit ([`alert_append`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    alerts: Vec<Alert>,
    /// How many alerts it implied beyond what a record keeps ([`JUDGED_BYTES`]): a takeover
    /// cannot re-send those, and says so.
    #[serde(default, skip_serializing_if = "is_zero")]
    untold: usize,
    /// When it was written (ms since the epoch, the writer's clock): a record of a held alert
    /// or a reconciliation is re-sent by the instances that read it only while the stream
    /// still drops a repeat ([`ClusterView::resend_within`]).
    #[serde(default)]
    at_ms: u64,
    /// Rules whose condition failed on a live event (`rule x failed: why`): a takeover records
    /// the same verdict for the actions route's run report ([`EventVerdict`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    failed: Vec<String>,
}

/// [`Judged::of`] for held alerts (`for`) coming due, judged without a stream message.
const HELD: &str = "held";

/// [`Judged::of`] for a reconciliation snapshot's alerts, judged without a stream message.
const RECONCILED: &str = "reconciled";

/// Commit the alerts of the held alerts and reconciliations other instances judged, as
/// [`ClusterView::replace`] found them, under their writers' names: the stream stores each
/// once whoever publishes it, so an alert whose writer died before its commit, or stalled or
/// stopped before its publish, is sent anyway, and before any change this instance judges
/// after reading it. False (logged) if the commit failed; they are tried again.
async fn resend_recorded(view: &mut ClusterView, writer: &SpoolWriter) -> bool {
    if view.resend.is_empty() {
        return true;
    }
    let records = std::mem::take(&mut view.resend);
    let writes: Vec<Write> = records
        .iter()
        .filter(|record| !record.alerts.is_empty())
        .map(|record| {
            alert_append(
                record.alerts.iter().map(Alert::to_event).collect(),
                Some(&record.token),
            )
        })
        .collect();
    if !writes.is_empty() && !commit(writer, writes).await {
        view.resend = records;
        return false;
    }
    for record in records.iter().filter(|record| record.untold > 0) {
        // Sent by their writer unless it died first: this instance cannot tell, nor re-send.
        warn!(
            "{} of a held alert or reconciliation another instance judged (too large to keep in the cluster's alert state, over {JUDGED_BYTES} bytes): if that instance stopped before publishing them, they are lost",
            crate::error::count(record.untold, "alert", "alerts")
        );
    }
    tracing::debug!(
        "queued again {} of held alerts or reconciliations another instance judged (the stream drops those it already has)",
        crate::error::count(
            records.iter().map(|r| r.alerts.len()).sum::<usize>(),
            "alert",
            "alerts"
        )
    );
    true
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The most bytes of alerts (as JSON) a shard keeps in its [`Judged`] records: the records
/// fill at most this much of a shard (NATS caps a value at `max_payload`, 1 MiB by default).
/// The oldest records go first; a judgement whose own alerts are over it keeps only its count.
const JUDGED_BYTES: usize = 64 * 1024;

/// What a live event from the cluster is, the same on every instance that takes it: its stream
/// sequence, and a hash of its body (a stream created again restarts its sequences). None for
/// an event that did not come from the cluster's pipeline route.
fn judged_as(cluster: Option<&Cluster>, event: &crate::event::Event) -> Option<String> {
    use sha2::Digest as _;
    let seq = cluster?.stream_seq(PIPELINE_ROUTE, event)?;
    let digest = sha2::Sha256::digest(&event.body);
    Some(format!("live {seq} {}", hex::encode(&digest[..6])))
}

/// Keep the records of writes still among `writes`, within [`JUDGED_BYTES`] of alerts. The
/// newest is always kept (its own alerts are within the bound, [`ClusterView::store`]). Over
/// the bound, held alerts' and reconciliations' records go first, oldest first, and a live
/// event's only once none of those is left: a live record is the only way a takeover re-sends
/// what its writer did not publish, while every other instance reads a held or reconciled
/// record (within a second) and queues its alerts again itself. So a large reconciliation
/// landing in a shard never pushes out the small live records before it.
fn trim_judged(judged: &mut Vec<Judged>, writes: &[String]) {
    judged.retain(|record| writes.contains(&record.token));
    let size = |record: &Judged| serde_json::to_vec(&record.alerts).map_or(0, |b| b.len());
    let mut total: usize = judged.iter().map(size).sum();
    while total > JUDGED_BYTES && judged.len() > 1 {
        let older = judged.len() - 1;
        let at = judged[..older]
            .iter()
            .position(|record| record.of == HELD || record.of == RECONCILED)
            .unwrap_or(0);
        total -= size(&judged.remove(at));
    }
}

/// How long the cluster keeps an entity's change time ([`SharedAlerts::changed`]): far longer
/// than a snapshot or an event waits between Port and its judgement.
const MARK_HORIZON: Duration = Duration::from_secs(24 * 3600);

/// Drop the change times more than [`MARK_HORIZON`] older than `newest`.
fn prune_marks(changed: &mut HashMap<String, u64>, newest: u64) {
    let horizon = newest.saturating_sub(MARK_HORIZON.as_millis() as u64);
    changed.retain(|_, at| *at >= horizon);
}

/// One shard as this instance last read it.
#[derive(Clone, Default)]
struct Part {
    /// Its value.
    alerts: SharedAlerts,
    /// Its KV revision (0: absent).
    revision: u64,
}

/// The cluster's alert state as this instance last read it, shard by shard, with the union
/// the rules judge against.
struct ClusterView {
    /// The KV values under `alert-states` (the old single value itself, and the shards).
    shared: SharedState,
    /// Each shard as last read or written, by shard number: what a write builds on.
    parts: Vec<Part>,
    /// The bucket's last revision when every shard was last read: unchanged, nothing to read.
    read_at: Option<u64>,
    /// When every shard was last read. The bucket also holds the routes' floors, which move
    /// with every delivery, so a moved bucket is read again at most every [`WALK_EVERY`] (an
    /// event reads its own shard anyway; held alerts are checked against shards this fresh).
    walked: Option<tokio::time::Instant>,
    /// A write lost to another instance's: read every shard at the next chance.
    stale: bool,
    /// This run's prefix of write tokens (random): no other run, here or elsewhere, has it.
    instance: String,
    /// How many writes this run made: with `instance`, a token no other write carries.
    writes: u64,
    /// Whether a shard too large to store was reported (once, not per attempt).
    too_large_said: HashSet<usize>,
    /// Records of held alerts and reconciliations that other instances (or an earlier run of
    /// this one) wrote, read for the first time: their alerts are queued again
    /// ([`resend_recorded`]).
    resend: Vec<Judged>,
    /// How recent such a record must be to be re-sent: the stream's `dedupe_window` less the
    /// `ack_wait` and a minute, so the stream still drops the repeat.
    resend_within: Duration,
}

/// What [`judge_snapshot`] needs in a cluster.
struct InCluster<'a> {
    view: &'a mut ClusterView,
    /// The union of the shards' change times, as read (and as this judgement moves them).
    changed: &'a mut HashMap<String, u64>,
    /// Ends a wait on NATS.
    cancel: &'a CancellationToken,
}

/// What became of a compare-and-set.
enum Stored {
    /// It landed; the alerts of that write are named by its token.
    Landed(String),
    /// Another instance moved first (or NATS refused or is away, logged): read and judge
    /// again.
    Lost,
}

impl ClusterView {
    fn new(shared: SharedState, resend_within: Duration) -> ClusterView {
        let mut bytes = [0u8; 8];
        // No randomness at all is not worth stopping for: the time tells runs apart too.
        if getrandom::fill(&mut bytes).is_err() {
            bytes = crate::clock::now_ms().to_be_bytes();
        }
        ClusterView {
            shared,
            parts: vec![Part::default(); SHARDS],
            read_at: None,
            walked: None,
            stale: false,
            instance: hex::encode(bytes),
            writes: 0,
            too_large_said: HashSet::new(),
            resend: Vec::new(),
            resend_within,
        }
    }

    /// Put a shard read from NATS in place, in the union maps too.
    fn replace(
        &mut self,
        n: usize,
        part: Part,
        states: &mut Arc<HashMap<String, AlertState>>,
        changed: &mut HashMap<String, u64>,
    ) {
        let old = std::mem::replace(&mut self.parts[n], part);
        if old.revision == self.parts[n].revision && old.revision != 0 {
            return;
        }
        let now = crate::clock::now_ms();
        let own = format!("{}-", self.instance);
        for record in &self.parts[n].alerts.judged {
            let fresh = !old.alerts.judged.iter().any(|o| o.token == record.token);
            if fresh
                && (!record.alerts.is_empty() || record.untold > 0)
                && (record.of == HELD || record.of == RECONCILED)
                && !record.token.starts_with(&own)
                && now.saturating_sub(record.at_ms) < self.resend_within.as_millis() as u64
            {
                self.resend.push(record.clone());
            }
        }
        let union = Arc::make_mut(states);
        for key in old.alerts.states.keys() {
            union.remove(key);
        }
        for key in old.alerts.changed.keys() {
            changed.remove(key);
        }
        let new = &self.parts[n].alerts;
        union.extend(new.states.iter().map(|(k, v)| (k.clone(), v.clone())));
        changed.extend(new.changed.iter().map(|(k, v)| (k.clone(), *v)));
    }

    /// The alerts, for the entities `alerts` name, of the records in shard `n` written before
    /// the one with token `before` (all of them when it is not there), still within
    /// [`ClusterView::resend_within`], in write order and under their own names: queued again
    /// ahead of a judgement's own alerts, so an earlier alert of the same entity whose writer
    /// has not published it yet (stalled, or dead before its commit) goes out before the newer
    /// one, whoever publishes first; one already published is a repeat the stream drops.
    fn earlier_alerts(
        &self,
        n: usize,
        alerts: &[Alert],
        before: Option<&str>,
    ) -> Vec<crate::event::Event> {
        let entities: HashSet<&str> = alerts.iter().map(|a| a.entity.as_str()).collect();
        let mut earlier = Vec::new();
        if entities.is_empty() {
            return earlier;
        }
        let now = crate::clock::now_ms();
        for record in &self.parts[n].alerts.judged {
            if before == Some(record.token.as_str()) {
                break;
            }
            if now.saturating_sub(record.at_ms) >= self.resend_within.as_millis() as u64 {
                continue;
            }
            for (at, alert) in record.alerts.iter().enumerate() {
                if entities.contains(alert.entity.as_str()) {
                    let mut event = alert.to_event();
                    event.sse_id = Some(alert_name(&record.token, at));
                    earlier.push(event);
                }
            }
        }
        earlier
    }

    /// The record of judgement `of` in shard `n` as last read, if a write of it landed.
    fn judged(&self, n: usize, of: &str) -> Option<&Judged> {
        self.parts[n]
            .alerts
            .judged
            .iter()
            .find(|record| record.of == of)
    }

    /// Read shard `n`; `None` (logged) if NATS cannot say.
    async fn load_part(&self, n: usize) -> Option<Part> {
        match self.shared.part(&n.to_string()).load().await {
            Ok((None, revision)) => Some(Part {
                alerts: SharedAlerts::default(),
                revision,
            }),
            Ok((Some(bytes), revision)) => match serde_json::from_slice(&bytes) {
                Ok(alerts) => Some(Part { alerts, revision }),
                Err(e) => {
                    error!(
                        "the cluster's alert states (shard {n}) are not what a relay writes ({e}); starting it from OK"
                    );
                    Some(Part {
                        alerts: SharedAlerts::default(),
                        revision,
                    })
                }
            },
            Err(e) => {
                if let Some(line) = crate::cluster::paced("alert states", &crate::error::chain(&e))
                {
                    warn!("cannot read the cluster's alert states, waiting: {line}");
                }
                None
            }
        }
    }

    /// Read the shard of `key` again. False (logged) if NATS cannot say.
    async fn refresh_one(
        &mut self,
        key: &str,
        states: &mut Arc<HashMap<String, AlertState>>,
        changed: &mut HashMap<String, u64>,
    ) -> bool {
        let n = shard_of(key);
        match self.load_part(n).await {
            Some(part) => {
                self.replace(n, part, states, changed);
                true
            }
            None => false,
        }
    }

    /// Read every shard that changed since the last full read (none when the bucket did not
    /// move; not again within [`WALK_EVERY`] unless `now` or a write was lost). False (logged)
    /// if NATS cannot say.
    async fn refresh_all(
        &mut self,
        now: bool,
        states: &mut Arc<HashMap<String, AlertState>>,
        changed: &mut HashMap<String, u64>,
    ) -> bool {
        if !now && !self.stale && self.walked.is_some_and(|at| at.elapsed() < WALK_EVERY) {
            return true;
        }
        let at = match self.shared.bucket_revision().await {
            Ok(at) => at,
            Err(e) => {
                if let Some(line) = crate::cluster::paced("alert states", &crate::error::chain(&e))
                {
                    warn!("cannot read the cluster's alert states, waiting: {line}");
                }
                return false;
            }
        };
        if self.read_at == Some(at) {
            self.walked = Some(tokio::time::Instant::now());
            self.stale = false;
            return true;
        }
        if self.read_at.is_none() && !self.migrate().await {
            return false;
        }
        use futures::StreamExt;
        let this = &*self;
        let loaded: Vec<(usize, Option<Part>)> = futures::stream::iter(0..SHARDS)
            .map(|n| async move { (n, this.load_part(n).await) })
            .buffer_unordered(32)
            .collect()
            .await;
        let mut all = true;
        for (n, part) in loaded {
            match part {
                Some(part) => self.replace(n, part, states, changed),
                None => all = false,
            }
        }
        if all {
            self.read_at = Some(at);
            self.walked = Some(tokio::time::Instant::now());
            self.stale = false;
        }
        all
    }

    /// Releases before the shards kept the whole state in one value (`alert-states`): spread
    /// it over the shards (those not yet written) and remove it. False if NATS cannot say.
    async fn migrate(&mut self) -> bool {
        let (bytes, revision) = match self.shared.load().await {
            Ok((Some(bytes), revision)) => (bytes, revision),
            Ok((None, _)) => return true,
            Err(e) => {
                if let Some(line) = crate::cluster::paced("alert states", &crate::error::chain(&e))
                {
                    warn!("cannot read the cluster's alert states, waiting: {line}");
                }
                return false;
            }
        };
        #[derive(Deserialize)]
        struct Legacy {
            states: HashMap<String, AlertState>,
            #[serde(default)]
            changed: HashMap<String, u64>,
        }
        // The first cluster releases stored the states alone.
        let legacy: Legacy = match serde_json::from_slice(&bytes).or_else(|e| {
            serde_json::from_slice(&bytes)
                .map(|states| Legacy {
                    states,
                    changed: HashMap::new(),
                })
                .map_err(|_| e)
        }) {
            Ok(legacy) => legacy,
            Err(e) => {
                error!(
                    "the cluster's old alert state is not what a relay writes ({e}); not carried over"
                );
                let _ = self.shared.remove(revision).await;
                return true;
            }
        };
        let mut parts = vec![SharedAlerts::default(); SHARDS];
        for (key, state) in legacy.states {
            parts[shard_of(&key)].states.insert(key, state);
        }
        for (key, at) in legacy.changed {
            parts[shard_of(&key)].changed.insert(key, at);
        }
        for (n, part) in parts.into_iter().enumerate() {
            if part.states.is_empty() && part.changed.is_empty() {
                continue;
            }
            let bytes = serde_json::to_vec(&part).expect("states serialise");
            // Created only where no shard is yet: another instance may have carried it over.
            if let Err(e) = self
                .shared
                .part(&n.to_string())
                .store(bytes.into(), 0)
                .await
            {
                warn!(
                    "cannot carry the cluster's old alert state over, waiting: {}",
                    crate::error::chain(&e)
                );
                return false;
            }
        }
        if let Err(e) = self.shared.remove(revision).await {
            tracing::debug!("the old alert state was removed meanwhile: {e}");
        }
        info!("carried the cluster's alert state over from one KV value to {SHARDS} shards");
        true
    }

    /// Store `changes` and `marks` (all of shard `n`) if shard `n` is still at the revision it
    /// was read at. After a write NATS gave no answer to, the shard is read again: if it
    /// carries this write's token, the write landed.
    async fn store(
        &mut self,
        n: usize,
        changes: impl IntoIterator<Item = (String, AlertState)>,
        marks: impl IntoIterator<Item = (String, u64)>,
        judged: Option<(String, Vec<Alert>, Vec<String>)>,
        cancel: &CancellationToken,
    ) -> Stored {
        let part = &self.parts[n];
        let revision = part.revision;
        let mut next = part.alerts.clone();
        for (key, state) in changes {
            if state == AlertState::default() {
                next.states.remove(&key);
            } else {
                next.states.insert(key, state);
            }
        }
        next.changed.extend(marks);
        // A mark only has to outlive the snapshots and events in flight when it was written,
        // so those far older than the newest any shard holds go. (Port's times against
        // Port's times: the relay's clock plays no part.)
        let newest = self
            .parts
            .iter()
            .flat_map(|p| p.alerts.changed.values())
            .chain(next.changed.values())
            .max()
            .copied()
            .unwrap_or(0);
        prune_marks(&mut next.changed, newest);
        self.writes += 1;
        let token = format!("{}-{}", self.instance, self.writes);
        next.writes.push(token.clone());
        let excess = next.writes.len().saturating_sub(WRITE_TOKENS);
        next.writes.drain(..excess);
        if let Some((of, alerts, failed)) = judged {
            let size = serde_json::to_vec(&alerts).map_or(0, |bytes| bytes.len());
            let (alerts, untold) = if size > JUDGED_BYTES {
                (Vec::new(), alerts.len())
            } else {
                (alerts, 0)
            };
            next.judged.push(Judged {
                of,
                token: token.clone(),
                alerts,
                untold,
                at_ms: crate::clock::now_ms(),
                failed,
            });
        }
        trim_judged(&mut next.judged, &next.writes);
        let bytes = serde_json::to_vec(&next).expect("states serialise");
        let target = self.shared.part(&n.to_string());
        match target.try_store(bytes.into(), revision).await {
            Ok(landed) => {
                // What this instance knows the shard holds now: the next event on it need not
                // lose a compare-and-set to learn it.
                self.parts[n] = Part {
                    alerts: next,
                    revision: landed,
                };
                // The bucket's revisions count every write: landing right after the last full
                // read, this was the only write since, and a full read would find nothing new.
                if self.read_at == Some(landed - 1) {
                    self.read_at = Some(landed);
                }
                Stored::Landed(token)
            }
            Err(StoreError::Moved) => {
                tracing::debug!(
                    "the cluster's alert states changed meanwhile (another instance); judging again"
                );
                self.stale = true;
                Stored::Lost
            }
            Err(e @ StoreError::TooLarge { .. }) => {
                // Never going to land: say so once, and do not spin on it.
                if self.too_large_said.insert(n) {
                    error!(
                        "cannot store the cluster's alert states (shard {n}): {e}; no alert for its entities until it shrinks (raise max_payload on the NATS server); retrying every 30s"
                    );
                }
                wait(cancel, Duration::from_secs(30)).await;
                Stored::Lost
            }
            Err(StoreError::Uncertain(e)) => {
                warn!(
                    "no answer from NATS to a write of the cluster's alert states ({}); reading it again to tell whether it landed",
                    crate::error::chain(&e)
                );
                loop {
                    if cancel.is_cancelled() {
                        return Stored::Lost;
                    }
                    let Ok((value, now_at)) = target.load().await else {
                        wait(cancel, Duration::from_secs(1)).await;
                        continue;
                    };
                    let read = value
                        .and_then(|bytes| serde_json::from_slice::<SharedAlerts>(&bytes).ok())
                        .unwrap_or_default();
                    let tokens = read.writes;
                    if tokens.contains(&token) {
                        info!(
                            "the write of the cluster's alert states NATS did not answer landed; its alerts go out"
                        );
                        // The shard as read may hold later writes too: the next read of it
                        // (its revision differs from the one this instance knows) takes them.
                        return Stored::Landed(token);
                    }
                    if now_at != revision && tokens.len() >= WRITE_TOKENS {
                        error!(
                            "cannot tell whether a write of the cluster's alert states NATS did not answer landed ({WRITE_TOKENS} writes followed it); if it did, its alerts are lost"
                        );
                    }
                    return Stored::Lost;
                }
            }
        }
    }
}

async fn wait(cancel: &CancellationToken, delay: Duration) {
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = tokio::time::sleep(delay) => {}
    }
}

/// Where the pipeline's per-entity "evaluated" marks live among the alert states: a prefix no
/// state key has (those start with a rule name, which cannot hold control characters).
const EVALUATED_PREFIX: &str = "\u{1e}evaluated\u{1f}";

/// The last event evaluated for one entity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Evaluated {
    /// Its spool id: an event with an id not above it comes back from a replay.
    event: u64,
    /// When it was evaluated (ms since the epoch), for the log line that skips a replay.
    at_ms: u64,
    /// Port's time of the change judged (`updatedAt`), when it said: a change older than it
    /// (a live event that arrives after a reconciliation read a newer state) is stale.
    #[serde(default)]
    updated_ms: Option<u64>,
}

/// The entity an event is about, `blueprint` and identifier, if it is a Port entity change,
/// and Port's time of the change when it says.
fn subject(event: &crate::event::Event) -> Option<(String, Option<u64>)> {
    let change = port::decode(&event.body).ok()?;
    // A run (or any change not of the entity itself) is none of the entity's state: taken as
    // its latest change, at its trigger's time, it muted every later change stamped before
    // that (helper-146).
    if change.resource_type != "entity" {
        return None;
    }
    Some((
        reconcile::subject(change.blueprint().unwrap_or(""), change.entity()?),
        reconcile::change_time_ms(&change),
    ))
}

/// Say why a replayed event is not evaluated again.
fn say_skipped(id: u64, subject: &str, done: &Evaluated) {
    let entity = subject.split('\u{1f}').nth(1).unwrap_or(subject);
    let at = crate::clock::rfc3339_seconds(done.at_ms);
    if id > done.event {
        // The time that wins is Port's time of the change judged, not when it was judged.
        let winning = done.updated_ms.map_or_else(
            || format!("judged at {at}"),
            |ms| format!("of {}", crate::clock::rfc3339_seconds(ms)),
        );
        info!(
            event = id,
            entity,
            "pipeline: event {id} changes the entity at a time before the change {winning} (event {}, or Port's state read by reconciliation); the newer one stands and no alert is sent",
            done.event
        );
    } else if id == done.event {
        info!(
            event = id,
            entity,
            "pipeline: event {id} was already evaluated at {at}; replayed, it is not evaluated again and no alert is sent"
        );
    } else {
        info!(
            event = id,
            entity,
            "pipeline: event {id} is older than event {}, evaluated for the same entity at {at}; replayed, it is not evaluated (it could only repeat an alert or send a stale one) and no alert is sent",
            done.event
        );
    }
}

/// Show `smee_relay_alerts_total` of each of `rules` at 0 from the pipeline's start (and a
/// reload adding a rule), as `deliveries_total` is: an alert on `increase()` must see the
/// first one (helper-153: the series appeared with it, with no value before to compare).
pub fn count_rules(rules: &[super::rules::Rule]) {
    for rule in rules {
        for status in [super::AlertStatus::Firing, super::AlertStatus::Resolved] {
            metrics::counter!(
                "smee_relay_alerts_total",
                "rule" => rule.name.clone(),
                "status" => status.to_string()
            )
            .increment(0);
        }
    }
}

fn count_alert(alert: &Alert) {
    metrics::counter!(
        "smee_relay_alerts_total",
        "rule" => alert.rule.clone(),
        "status" => alert.status.to_string()
    )
    .increment(1);
}

/// How many alerts `spool` holds (PENDING, a rule's `for` not over), for the stop line: their
/// holds go on at the next start (helper-140: a stop said nothing of them).
pub fn held_alerts(spool: &Spool) -> usize {
    match load_states(spool) {
        Ok((states, _)) => (states.values())
            .filter(|state| matches!(state.phase, super::Phase::Pending { .. }))
            .count(),
        Err(e) => {
            // Only the stop line's count is missing: the states stay as stored.
            warn!("cannot count the held alerts for the stop line: {e}");
            0
        }
    }
}

/// The alert states, and the per-entity "evaluated" marks; the caller words a failure (at a
/// start the runner goes on from OK, at a stop only a count is missing).
fn load_states(spool: &Spool) -> Result<States, crate::spool::SpoolError> {
    let mut states = HashMap::new();
    let mut evaluated = HashMap::new();
    for (key, bytes) in spool.states()? {
        if key.starts_with(VERDICT_PREFIX) {
            // The actions route's to read, not an alert state.
        } else if let Some(subject) = key.strip_prefix(EVALUATED_PREFIX) {
            if let Ok(mark) = serde_json::from_slice(&bytes) {
                evaluated.insert(subject.to_string(), mark);
            }
        } else if key.starts_with('\u{1e}') {
            // The reconciler's own records, not alert states.
        } else if let Ok(state) = serde_json::from_slice(&bytes) {
            states.insert(key, state);
        }
    }
    Ok((states, evaluated))
}

/// What [`load_states`] reads: the alert states by key, the "evaluated" marks by entity.
type States = (HashMap<String, AlertState>, HashMap<String, Evaluated>);

fn state_write(key: &str, state: &AlertState) -> Write {
    let forget = *state == AlertState::default();
    Write::State {
        key: key.to_string(),
        value: (!forget).then(|| serde_json::to_vec(state).expect("a state serialises")),
    }
}

/// The alerts of one commit, onto the alert route; in a cluster (`cluster_write`: the token
/// of the compare-and-set that landed them) onto the alerts' outbox instead, which publishes
/// them to the cluster, where whichever instance takes them from the alert route's consumer
/// delivers them. Each is named by that token and its place in the commit: a token names one
/// write, so the name is the alert's cluster-wide, and the outbox publishing it again (an ack
/// lost, a restart) stores it once.
fn alert_append(mut alerts: Vec<crate::event::Event>, cluster_write: Option<&str>) -> Write {
    let route = match cluster_write {
        Some(token) => {
            for (n, alert) in alerts.iter_mut().enumerate() {
                alert.sse_id = Some(alert_name(token, n));
            }
            crate::cluster::outbox_route(&crate::cluster::produced_key(ALERT_ROUTE))
        }
        None => ALERT_ROUTE.into(),
    };
    Write::Append {
        channel: PIPELINE_ROUTE.into(),
        routes: vec![route],
        events: alerts.into(),
        cursor: None,
    }
}

/// The cluster-wide name of the `n`th alert of the write with token `token` (its stream
/// message id: the stream stores it once, whoever publishes it).
fn alert_name(token: &str, n: usize) -> String {
    format!("alerts@{token}#{n}")
}

/// A cluster judgement's alerts to queue, in this order: the earlier alerts of the same
/// entities ([`ClusterView::earlier_alerts`], already named) and then its own, named by
/// `token`. Nothing when it has no alerts of its own.
fn alert_appends(earlier: Vec<crate::event::Event>, own: &[Alert], token: &str) -> Vec<Write> {
    if own.is_empty() {
        return Vec::new();
    }
    let mut writes = Vec::new();
    if !earlier.is_empty() {
        writes.push(Write::Append {
            channel: PIPELINE_ROUTE.into(),
            routes: vec![crate::cluster::outbox_route(&crate::cluster::produced_key(
                ALERT_ROUTE,
            ))],
            events: earlier.into(),
            cursor: None,
        });
    }
    writes.push(alert_append(
        own.iter().map(Alert::to_event).collect(),
        Some(token),
    ));
    writes
}

/// The alerts of matured holds that fire (not those that end without firing).
fn fired(matured: &[(String, AlertState, Result<Alert, String>)]) -> impl Iterator<Item = &Alert> {
    matured
        .iter()
        .filter_map(|(_, _, alert)| alert.as_ref().ok())
}

/// Commit and wait; false (logged) if it failed.
async fn commit(writer: &SpoolWriter, writes: Vec<Write>) -> bool {
    match writer.commit(writes).await {
        Ok(appended) => {
            if appended.iter().flatten().any(Option::is_none) {
                error!("spool full: an alert was refused; it is lost unless the event is replayed");
            }
            true
        }
        Err(e) => {
            error!("pipeline cannot commit, retrying in 1s: {e}");
            tokio::time::sleep(Duration::from_secs(1)).await;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::Limits;

    /// Wait (real time, a deadline) until the pipeline route has nothing pending.
    #[test]
    fn the_shared_change_times_keep_a_day_behind_the_newest() {
        let day = MARK_HORIZON.as_millis() as u64;
        let mut changed: HashMap<String, u64> = [
            ("old".to_string(), 1_000),
            ("edge".to_string(), 5_000),
            ("new".to_string(), 5_000 + day),
        ]
        .into();
        prune_marks(&mut changed, 5_000 + day);
        let mut kept: Vec<&str> = changed.keys().map(String::as_str).collect();
        kept.sort();
        assert_eq!(kept, ["edge", "new"]);
    }

    #[test]
    fn an_entity_s_states_and_change_time_share_a_shard_and_shards_spread() {
        let entity = "notification-service-prod";
        let n = shard_of(&crate::pipeline::state_key("cpu-high", entity));
        assert_eq!(n, shard_of(&reconcile::subject("DeploymentConfig", entity)));
        assert_eq!(
            n,
            shard_of(&crate::pipeline::state_key("other-rule", entity))
        );
        // Stable across releases: the shards of a running cluster must not move.
        assert_eq!(shard_of("r\u{1f}svc-00001"), shard_of("bp\u{1f}svc-00001"));
        let used: HashSet<usize> = (0..10_000)
            .map(|i| shard_of(&format!("bp\u{1f}svc-{i:05}")))
            .collect();
        assert_eq!(used.len(), SHARDS, "ten thousand entities use every shard");
    }

    #[test]
    fn a_shard_value_reads_without_tokens() {
        let read: SharedAlerts =
            serde_json::from_str(r#"{"states":{},"changed":{"x":1}}"#).unwrap();
        assert_eq!(read.changed.get("x"), Some(&1));
        assert!(read.writes.is_empty());
        assert!(read.judged.is_empty());
    }

    fn alert(entity: &str, note_bytes: usize) -> Alert {
        Alert {
            status: super::super::AlertStatus::Firing,
            rule: "cpu-high".into(),
            severity: "warning".into(),
            entity: entity.into(),
            title: entity.into(),
            blueprint: None,
            property: None,
            threshold: "above 80".into(),
            other_changes: vec![],
            action: "UPDATE".into(),
            triggered_by: None,
            triggered_at: None,
            entity_url: None,
            links: vec![],
            note: Some("x".repeat(note_bytes)),
        }
    }

    #[test]
    fn a_shard_keeps_the_judgements_of_its_last_writes_within_their_byte_bound() {
        let record = |n: usize, bytes: usize| Judged {
            of: format!("live {n} ab"),
            token: format!("t-{n}"),
            alerts: vec![alert("svc", bytes)],
            untold: 0,
            at_ms: 0,
            failed: vec![],
        };
        // Only writes whose token the shard still keeps.
        let mut judged: Vec<Judged> = (0..40).map(|n| record(n, 10)).collect();
        let writes: Vec<String> = (8..40).map(|n| format!("t-{n}")).collect();
        trim_judged(&mut judged, &writes);
        assert_eq!(judged.len(), WRITE_TOKENS);
        assert_eq!(judged[0].token, "t-8");
        // Within the byte bound, the newest kept.
        let mut judged: Vec<Judged> = (0..8).map(|n| record(n, JUDGED_BYTES / 3)).collect();
        let writes: Vec<String> = (0..8).map(|n| format!("t-{n}")).collect();
        trim_judged(&mut judged, &writes);
        let kept: Vec<&str> = judged.iter().map(|j| j.token.as_str()).collect();
        assert_eq!(kept, ["t-6", "t-7"]);
        // A record rebuilds the alert events the judging instance committed, byte for byte
        // (the stream's dedupe compares them by a hash of the whole event).
        let one = alert("svc", 5);
        let shard = SharedAlerts {
            judged: vec![Judged {
                of: "live 1 ab".into(),
                token: "t-1".into(),
                alerts: vec![one.clone()],
                untold: 0,
                at_ms: 0,
                failed: vec![],
            }],
            ..Default::default()
        };
        let read: SharedAlerts =
            serde_json::from_slice(&serde_json::to_vec(&shard).unwrap()).unwrap();
        assert_eq!(read.judged[0].alerts[0].to_event(), one.to_event());
    }

    /// Regression (adv3 review): a large reconciliation (or held) record landing in a shard
    /// pushed the small live records before it out of the byte bound, and with them the only
    /// way a takeover re-sends a live judgement's alerts.
    #[test]
    fn a_large_reconciliation_record_does_not_push_out_the_live_records_before_it() {
        let record = |of: &str, n: usize, bytes: usize| Judged {
            of: of.into(),
            token: format!("t-{n}"),
            alerts: vec![alert("svc", bytes)],
            untold: 0,
            at_ms: 0,
            failed: vec![],
        };
        let mut judged = vec![
            record(HELD, 0, JUDGED_BYTES / 4),
            record("live 1 ab", 1, 100),
            record(RECONCILED, 2, JUDGED_BYTES / 4),
            record("live 3 ab", 3, 100),
            record(RECONCILED, 4, JUDGED_BYTES - 1000),
        ];
        let writes: Vec<String> = (0..5).map(|n| format!("t-{n}")).collect();
        trim_judged(&mut judged, &writes);
        let kept: Vec<&str> = judged.iter().map(|j| j.token.as_str()).collect();
        assert_eq!(kept, ["t-1", "t-3", "t-4"]);
        // Live records alone over the bound: the oldest go, the newest stays.
        let mut judged: Vec<Judged> = (0..4)
            .map(|n| record("live", n, JUDGED_BYTES / 3))
            .collect();
        let writes: Vec<String> = (0..4).map(|n| format!("t-{n}")).collect();
        trim_judged(&mut judged, &writes);
        let kept: Vec<&str> = judged.iter().map(|j| j.token.as_str()).collect();
        assert_eq!(kept, ["t-2", "t-3"]);
    }

    async fn settled(spool: &Spool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !spool.pending(PIPELINE_ROUTE, 0, 10).unwrap().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the pipeline is stuck"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The pipeline on `spool`, outside a cluster, until `cancel`.
    fn spawn_pipeline(
        spool: &Arc<Spool>,
        writer: &SpoolWriter,
        rules: watch::Receiver<Arc<Pipeline>>,
        cancel: &CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(run(
            spool.clone(),
            writer.clone(),
            rules,
            None,
            cancel.clone(),
        ))
    }

    /// Queue [`hot_event`] for the pipeline.
    async fn queue_hot(writer: &SpoolWriter) {
        writer
            .append(
                "c",
                &[PIPELINE_ROUTE.to_string()],
                vec![hot_event()].into(),
                None,
            )
            .await
            .unwrap();
    }

    /// The fixture's CPU change of one entity, 25 to 87 (an Automation webhook).
    fn hot_event() -> crate::event::Event {
        let body = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/port/deployment-config/automation/02-cpu-25-to-87.json"
        ))
        .unwrap();
        crate::event::Event {
            body: body.into(),
            ..Default::default()
        }
    }

    /// A pipeline running `rules` (a watch the test may reload) on a fresh spool, with the
    /// fixture's CPU change (25 to 87) queued and judged.
    struct Held {
        _dir: tempfile::TempDir,
        spool: Arc<Spool>,
        writer: SpoolWriter,
        thread: std::thread::JoinHandle<()>,
        rules: watch::Sender<Arc<Pipeline>>,
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Held {
        async fn start(rules: &str) -> Held {
            let dir = tempfile::tempdir().unwrap();
            let spool = Arc::new(Spool::open(dir.path()).unwrap());
            let (writer, thread) = SpoolWriter::start(spool.clone(), Limits { max_bytes: 1 << 20 });
            queue_hot(&writer).await;
            let cancel = CancellationToken::new();
            let (rules, rules_rx) =
                watch::channel(Arc::new(super::super::tests::with_rules(rules)));
            let task = spawn_pipeline(&spool, &writer, rules_rx, &cancel);
            let held = Held {
                _dir: dir,
                spool,
                writer,
                thread,
                rules,
                cancel,
                task,
            };
            held.wait_real("the event evaluated", |spool| {
                spool.pending(PIPELINE_ROUTE, 0, 10).unwrap().is_empty()
            })
            .await;
            held
        }

        fn alerts(&self) -> Vec<crate::spool::Queued> {
            self.spool.pending(ALERT_ROUTE, 0, 10).unwrap()
        }

        /// The writer is a thread: what it commits is waited for in real time, inside a
        /// blocking task, which also keeps the paused clock from jumping ahead meanwhile.
        async fn wait_real(&self, what: &'static str, cond: fn(&Spool) -> bool) {
            let spool = self.spool.clone();
            tokio::task::spawn_blocking(move || {
                let deadline = std::time::Instant::now() + Duration::from_secs(20);
                while !cond(&spool) {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "waited in vain: {what}"
                    );
                    // The poll interval (real time), not a wait for the condition itself.
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
            .await
            .unwrap();
        }

        async fn fired(&self) -> Alert {
            self.wait_real("the held alert committed", |spool| {
                !spool.pending(ALERT_ROUTE, 0, 10).unwrap().is_empty()
            })
            .await;
            let sent = self.alerts();
            assert_eq!(sent.len(), 1, "fired once");
            serde_json::from_slice(&sent[0].event.event.body).unwrap()
        }

        async fn stop(self) {
            self.cancel.cancel();
            self.task.await.unwrap();
            drop(self.writer);
            self.thread.join().unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn for_holds_the_alert_on_the_paused_clock() {
        let held = Held::start(
            "[[rule]]\nname = \"hot\"\nproperty = \"cpuUtil\"\nabove = 80\nfor = \"5m\"\n",
        )
        .await;
        assert!(held.alerts().is_empty(), "held: nothing yet");
        // The paused clock: these return when tokio's time has moved on, at once in real time.
        tokio::time::sleep(Duration::from_secs(4 * 60)).await;
        assert!(held.alerts().is_empty(), "still held after 4 minutes");
        tokio::time::sleep(Duration::from_secs(61)).await;
        let alert = held.fired().await;
        assert_eq!(alert.note.as_deref(), Some("held for 5m"));
        held.stop().await;
    }

    /// A pipeline that held the fixture's rise (a 5m hold), stopped, its hold made to have
    /// begun 6 minutes ago (ended a minute ago, while it was stopped); and the recovery (91 to
    /// 75) its channel received 30 s into the hold. [`Restart::start`] starts it again.
    struct Restart {
        held: Held,
        recovery: crate::event::Event,
    }

    impl Restart {
        async fn after_the_hold_ended() -> Restart {
            let rule =
                "[[rule]]\nname = \"hot\"\nproperty = \"cpuUtil\"\nabove = 80\nfor = \"5m\"\n";
            let mut held = Held::start(rule).await;
            held.cancel.cancel();
            (&mut held.task).await.unwrap();
            let now = crate::clock::now_ms();
            let (key, mut state) = load_states(&held.spool)
                .expect("states")
                .0
                .into_iter()
                .next()
                .expect("held");
            assert!(
                matches!(state.phase, crate::pipeline::Phase::Pending { .. }),
                "{state:?}"
            );
            state.phase = crate::pipeline::Phase::Pending {
                since_ms: now - 6 * 60_000,
            };
            held.writer
                .commit(vec![state_write(&key, &state)])
                .await
                .unwrap();
            let recovery = crate::event::Event {
                body: std::fs::read(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/fixtures/port/deployment-config/automation/05-cpu-91-to-75.json"
                ))
                .unwrap()
                .into(),
                timestamp_ms: Some(now - 5 * 60_000 - 30_000),
                ..Default::default()
            };
            Restart { held, recovery }
        }

        async fn queue_the_recovery(&self) {
            queue(&self.held.writer, &self.recovery).await;
        }

        fn start(mut self) -> Held {
            let held = &mut self.held;
            held.cancel = CancellationToken::new();
            held.task = spawn_pipeline(
                &held.spool,
                &held.writer,
                held.rules.subscribe(),
                &held.cancel,
            );
            self.held
        }
    }

    /// Queue `event` for the pipeline, as a channel's source does. From a blocking task: the
    /// writer is a thread, and waiting on it here would let the paused clock jump ahead.
    async fn queue(writer: &SpoolWriter, event: &crate::event::Event) {
        let (writer, event) = (writer.clone(), event.clone());
        tokio::task::spawn_blocking(move || {
            let routes = [PIPELINE_ROUTE.to_string()];
            futures::executor::block_on(writer.append("c", &routes, vec![event].into(), None))
        })
        .await
        .unwrap()
        .unwrap();
    }

    /// Once the recovery is judged: no alert was sent, and the hold ended.
    async fn no_alert_once_the_recovery_is_judged(held: Held) {
        held.wait_real("the recovery judged", |spool| {
            spool.pending(PIPELINE_ROUTE, 0, 10).unwrap().is_empty()
        })
        .await;
        held.wait_real("the hold ended", |spool| {
            load_states(spool).expect("states").0.is_empty()
        })
        .await;
        assert!(
            held.alerts().is_empty(),
            "alerts for a rise that never held: {:?}",
            (held.alerts().iter())
                .map(|q| String::from_utf8_lossy(&q.event.event.body).into_owned())
                .collect::<Vec<_>>()
        );
        held.stop().await;
    }

    /// Regression (helper-138): a hold that ended while the relay was stopped fired at its
    /// start, before the recovery the channel had received during the hold was judged; that
    /// resolved it 2 ms later (FIRING and RESOLVED for a rise that never held). A hold now
    /// fires first only if it ended before the channel received the next event to judge.
    #[tokio::test(start_paused = true)]
    async fn regression_a_hold_that_ended_while_stopped_fired_before_the_recovery_was_judged() {
        let restart = Restart::after_the_hold_ended().await;
        restart.queue_the_recovery().await;
        no_alert_once_the_recovery_is_judged(restart.start()).await;
    }

    /// Regression (helper-139, helper-140): the recovery a channel server kept while the relay
    /// was stopped comes just after the start, when the relay reconnects; the hold that ended
    /// meanwhile fired first. No hold fires in the first seconds after a start.
    #[tokio::test(start_paused = true)]
    async fn regression_a_hold_fired_before_the_recovery_the_server_replayed_at_the_start() {
        let restart = Restart::after_the_hold_ended().await;
        let recovery = restart.recovery.clone();
        let held = restart.start();
        tokio::time::sleep(Duration::from_secs(2)).await;
        queue(&held.writer, &recovery).await;
        no_alert_once_the_recovery_is_judged(held).await;
    }

    /// Regression (helper-141): the recovery the channel received after a hold had ended,
    /// while the relay was stopped, was judged before the hold fired at the start, and ended
    /// it: the alert a live relay sends (FIRING, then RESOLVED) was lost. Holds fire in the
    /// order of time with the events queued, also behind another event of the same read.
    #[tokio::test(start_paused = true)]
    async fn regression_a_recovery_after_a_hold_ended_while_stopped_lost_its_alert() {
        for other_first in [false, true] {
            let restart = Restart::after_the_hold_ended().await;
            let in_hold = restart.recovery.timestamp_ms.unwrap();
            if other_first {
                // Another webhook on the channel, within the hold: read with the recovery.
                let other = crate::event::Event {
                    body: r#"{"zen":"not a Port change"}"#.into(),
                    timestamp_ms: Some(in_hold),
                    ..Default::default()
                };
                queue(&restart.held.writer, &other).await;
            }
            // Received 30 s after the hold ended (it began 6 minutes ago, for 5).
            let late = crate::event::Event {
                timestamp_ms: Some(in_hold + 5 * 60_000),
                ..restart.recovery.clone()
            };
            queue(&restart.held.writer, &late).await;
            let held = restart.start();
            held.wait_real("the recovery judged", |spool| {
                spool.pending(PIPELINE_ROUTE, 0, 10).unwrap().is_empty()
            })
            .await;
            let sent: Vec<String> = (held.alerts().iter())
                .map(|q| serde_json::from_slice::<Alert>(&q.event.event.body).unwrap())
                .map(|alert| alert.status.to_string())
                .collect();
            assert_eq!(
                sent,
                ["FIRING", "RESOLVED"],
                "another event first: {other_first}"
            );
            held.stop().await;
        }
    }

    /// A reload while the pipeline waited for a held alert's time did not wake it: it fired at
    /// the old rule's time (a hold shortened from 5m to 1m still waited 5 minutes).
    #[tokio::test(start_paused = true)]
    async fn regression_a_reload_while_an_alert_was_held_kept_the_old_hold() {
        let rule = |hold: &str| {
            format!(
                "[[rule]]\nname = \"hot\"\nproperty = \"cpuUtil\"\nabove = 80\nfor = \"{hold}\"\n"
            )
        };
        let held = Held::start(&rule("5m")).await;
        held.rules
            .send(Arc::new(super::super::tests::with_rules(&rule("1m"))))
            .unwrap();
        tokio::time::sleep(Duration::from_secs(61)).await;
        let alert = held.fired().await;
        assert_eq!(alert.note.as_deref(), Some("held for 1m"));
        held.stop().await;
    }

    /// An idle pipeline does not read the spool while nobody writes it, nor look at it while
    /// it holds it alone, and still takes an event appended later.
    #[tokio::test(start_paused = true)]
    async fn an_idle_pipeline_reads_nothing_until_the_spool_changes() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let (writer, thread) = SpoolWriter::start(spool.clone(), Limits { max_bytes: 1 << 20 });
        let pipeline = super::super::tests::with_rules(
            "[[rule]]\nname = \"hot\"\nproperty = \"cpuUtil\"\nabove = 80\n",
        );
        // The file looks long untouched, as an idle relay's does (the paused clock moves
        // tokio's time, not the file system's).
        std::fs::File::options()
            .write(true)
            .open(spool.path())
            .unwrap()
            .set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
            .unwrap();
        let cancel = CancellationToken::new();
        let (_rules, rules_rx) = watch::channel(Arc::new(pipeline));
        let task = spawn_pipeline(&spool, &writer, rules_rx, &cancel);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (reads, looks) = (spool.reads(), spool.looks());
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(spool.reads(), reads, "read during 10 idle minutes");
        assert_eq!(spool.looks(), looks, "looked at the file it holds alone");
        queue_hot(&writer).await;
        // Real time: the evaluation and the writer are threads.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while spool.pending(ALERT_ROUTE, 0, 10).unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "no alert");
            tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(2)))
                .await
                .unwrap();
        }
        cancel.cancel();
        task.await.unwrap();
        drop(writer);
        thread.join().unwrap();
    }

    /// A rejected event was never judged: once the cause is fixed (here, the secret), replaying
    /// it evaluates it, and it alerts once; replaying it again sends nothing. An older event of
    /// the same entity replayed after it is not judged either (it would be stale).
    #[tokio::test]
    async fn a_rejected_event_is_judged_on_replay_and_never_twice() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let (writer, thread) = SpoolWriter::start(spool.clone(), Limits { max_bytes: 1 << 20 });
        let unsigned = super::super::tests::with_rules(
            "[[rule]]\nname = \"hot\"\nproperty = \"cpuUtil\"\nabove = 80\n",
        );
        let strict = Pipeline {
            verifier: Some(super::super::signature::Verifier::new(
                "secret".into(),
                Duration::from_secs(300),
            )),
            ..unsigned.clone()
        };
        let fixture = |name: &str| crate::event::Event {
            body: std::fs::read(format!(
                "{}/tests/fixtures/port/deployment-config/automation/{name}.json",
                env!("CARGO_MANIFEST_DIR")
            ))
            .unwrap()
            .into(),
            ..Default::default()
        };
        let routes = [PIPELINE_ROUTE.to_string()];
        let ids = writer
            .append(
                "c",
                &routes,
                vec![fixture("01-create"), fixture("02-cpu-25-to-87")].into(),
                None,
            )
            .await
            .unwrap();
        let (older, hot) = (ids[0].unwrap(), ids[1].unwrap());
        let cancel = CancellationToken::new();
        let (rules, rules_rx) = watch::channel(Arc::new(strict));
        let task = spawn_pipeline(&spool, &writer, rules_rx, &cancel);
        settled(&spool).await;
        let dead = spool.list(Some(crate::spool::Status::Dead), 10).unwrap();
        assert_eq!(dead.len(), 2, "unsigned: both rejected");
        assert!(spool.pending(ALERT_ROUTE, 0, 10).unwrap().is_empty());

        // The secret requirement is dropped (a reload); the rejected event is replayed.
        rules.send(Arc::new(unsigned)).unwrap();
        spool.replay(crate::spool::Replay::Ids(vec![hot])).unwrap();
        writer.commit(vec![]).await.unwrap();
        settled(&spool).await;
        let alerts = spool.pending(ALERT_ROUTE, 0, 10).unwrap();
        assert_eq!(alerts.len(), 1, "judged once replayed");

        // Again, and the older event of the same entity: nothing more.
        spool
            .replay(crate::spool::Replay::Ids(vec![hot, older]))
            .unwrap();
        writer.commit(vec![]).await.unwrap();
        settled(&spool).await;
        assert_eq!(spool.pending(ALERT_ROUTE, 0, 10).unwrap().len(), 1);
        cancel.cancel();
        task.await.unwrap();
        drop(writer);
        thread.join().unwrap();
    }

    /// A spool whose pipeline route holds a snapshot of entity `svc` at 10:05 with cpuUtil 95
    /// (rule `hot`: above 80), a runner on it, and live changes of `svc` to append.
    struct Scene {
        spool: Arc<Spool>,
        writer: SpoolWriter,
        thread: std::thread::JoinHandle<()>,
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<()>,
        _rules: watch::Sender<Arc<Pipeline>>,
        _dir: tempfile::TempDir,
    }

    impl Restart {
        /// Queue a snapshot of the entity as the recovery's `side` (`before`: 91, `after`: 75)
        /// shows it, changed by Port 30 s into the hold (which came due a minute ago), as the
        /// start's reconciliation stores it.
        async fn queue_a_snapshot(&self, side: &str) {
            let mut entity: serde_json::Value =
                serde_json::from_slice(&self.recovery.body).unwrap();
            let mut entity = entity["event"]["diff"][side].take();
            entity["updatedAt"] =
                crate::clock::rfc3339_seconds(crate::clock::now_ms() - 5 * 60_000 - 30_000).into();
            self.queue_a_snapshot_of(entity).await;
        }

        /// Queue a snapshot of `entity`, as the start's reconciliation stores it.
        async fn queue_a_snapshot_of(&self, entity: serde_json::Value) {
            let snapshot = reconcile::Snapshot {
                blueprint: "DeploymentConfig".into(),
                fetched_at_ms: crate::clock::now_ms(),
                why: reconcile::Why::default(),
                entities: vec![entity],
            };
            let (writer, event) = (self.held.writer.clone(), snapshot.to_event());
            tokio::task::spawn_blocking(move || {
                let routes = [PIPELINE_ROUTE.to_string()];
                futures::executor::block_on(writer.append(
                    reconcile::CHANNEL,
                    &routes,
                    vec![event].into(),
                    None,
                ))
            })
            .await
            .unwrap()
            .unwrap();
        }
    }

    /// Regression (helper-146): the start-up reconciliation's snapshot is stored when it is
    /// read, so a hold that ended while the relay was stopped fired before it was judged, though
    /// Port's state in it had changed (the recovery, 91 to 75) before the hold's time: FIRING
    /// then RESOLVED for a rise that never held. A hold waits for the snapshot at the head of the
    /// queue when its entity changed there before the hold was due.
    #[tokio::test(start_paused = true)]
    async fn regression_a_hold_that_ended_while_stopped_fired_before_the_snapshot_was_judged() {
        let restart = Restart::after_the_hold_ended().await;
        restart.queue_a_snapshot("after").await;
        no_alert_once_the_recovery_is_judged(restart.start()).await;
    }

    /// Regression (helper-153): a snapshot showing the entity as the change that began the
    /// hold left it (nothing new) made the hold wait for it, and fire as the snapshot's alert:
    /// "? → 87, found by reconciliation after a gap". It fires first, as held.
    #[tokio::test(start_paused = true)]
    async fn a_snapshot_with_nothing_new_leaves_the_hold_to_fire_as_held() {
        let restart = Restart::after_the_hold_ended().await;
        let rise: serde_json::Value = serde_json::from_slice(
            &std::fs::read(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/port/deployment-config/automation/02-cpu-25-to-87.json"
            ))
            .unwrap(),
        )
        .unwrap();
        restart
            .queue_a_snapshot_of(rise["event"]["diff"]["after"].clone())
            .await;
        let held = restart.start();
        let alert = held.fired().await;
        assert_eq!(alert.note.as_deref(), Some("held for 5m"), "{alert:?}");
        held.stop().await;
    }

    /// The twin: the snapshot shows the rise still there (a change of another property), so
    /// the hold held: it fires, once.
    #[tokio::test(start_paused = true)]
    async fn a_hold_the_snapshot_shows_still_held_fires_once() {
        let restart = Restart::after_the_hold_ended().await;
        restart.queue_a_snapshot("before").await;
        let held = restart.start();
        let alert = held.fired().await;
        assert_eq!(alert.status, crate::pipeline::AlertStatus::Firing);
        held.wait_real("the snapshot judged", |spool| {
            spool.pending(PIPELINE_ROUTE, 0, 10).unwrap().is_empty()
        })
        .await;
        assert_eq!(held.alerts().len(), 1, "fired once");
        held.stop().await;
    }

    fn svc(cpu: u32, at: &str) -> serde_json::Value {
        serde_json::json!({"identifier": "svc", "blueprint": "DeploymentConfig",
            "properties": {"cpuUtil": cpu}, "updatedAt": at})
    }

    impl Scene {
        async fn start() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let spool = Arc::new(Spool::open(dir.path()).unwrap());
            let (writer, thread) = SpoolWriter::start(spool.clone(), Limits { max_bytes: 1 << 20 });
            let pipeline = super::super::tests::with_rules(
                "[[rule]]\nname = \"hot\"\nblueprint = \"DeploymentConfig\"\nproperty = \"cpuUtil\"\nabove = 80\n",
            );
            let snapshot = reconcile::Snapshot {
                blueprint: "DeploymentConfig".into(),
                fetched_at_ms: 1,
                why: reconcile::Why::default(),
                entities: vec![svc(95, "2026-11-20T10:05:00Z")],
            };
            let routes = [PIPELINE_ROUTE.to_string()];
            writer
                .append(
                    reconcile::CHANNEL,
                    &routes,
                    vec![snapshot.to_event()].into(),
                    None,
                )
                .await
                .unwrap();
            let cancel = CancellationToken::new();
            let (rules, rules_rx) = watch::channel(Arc::new(pipeline));
            let task = spawn_pipeline(&spool, &writer, rules_rx, &cancel);
            Scene {
                spool,
                writer,
                thread,
                cancel,
                task,
                _rules: rules,
                _dir: dir,
            }
        }

        /// A live change of `svc` to `cpu` at Port's time `at`, once judged.
        async fn live(&self, cpu: u32, at: &str) {
            let event = crate::event::Event {
                body: serde_json::json!({"action": "UPDATE", "resourceType": "entity",
                    "context": {"blueprint": "DeploymentConfig", "entity": "svc"},
                    "diff": {"before": svc(70, "2026-11-20T09:00:00Z"), "after": svc(cpu, at)}})
                .to_string()
                .into_bytes()
                .into(),
                ..Default::default()
            };
            let routes = [PIPELINE_ROUTE.to_string()];
            self.writer
                .append("c", &routes, vec![event].into(), None)
                .await
                .unwrap();
            settled(&self.spool).await;
        }

        /// The alerts sent so far, as headlines.
        fn said(&self) -> Vec<String> {
            (self.spool.pending(ALERT_ROUTE, 0, 10).unwrap().iter())
                .map(|q| {
                    let alert: Alert = serde_json::from_slice(&q.event.event.body).unwrap();
                    alert.headline()
                })
                .collect()
        }

        async fn stop(self) {
            self.cancel.cancel();
            self.task.await.unwrap();
            drop(self.writer);
            self.thread.join().unwrap();
        }
    }

    /// A snapshot and live events share one queue: a live event older than what the snapshot
    /// read (by Port's `updatedAt`) is stale and sends nothing; a newer one is judged.
    #[tokio::test]
    async fn a_live_event_older_than_the_snapshot_loses_and_a_newer_one_wins() {
        let scene = Scene::start().await;
        // Posted before the snapshot's state, delivered after it: stale.
        scene.live(50, "2026-11-20T10:03:00Z").await;
        assert_eq!(
            scene.said(),
            ["FIRING hot: svc"],
            "the stale event resolved nothing"
        );
        scene.live(50, "2026-11-20T10:10:00Z").await;
        assert_eq!(scene.said(), ["FIRING hot: svc", "RESOLVED hot: svc"]);
        scene.stop().await;
    }

    /// Regression (helper-130): a change whose `updatedAt` does not read as a time is judged
    /// without its order, and it cleared the newest time judged: a change older than the
    /// snapshot then fired again.
    #[tokio::test]
    async fn regression_an_unreadable_time_cleared_the_newest_time_judged() {
        let scene = Scene::start().await;
        scene.live(50, "yesterday").await;
        assert_eq!(scene.said(), ["FIRING hot: svc", "RESOLVED hot: svc"]);
        scene.live(95, "2026-11-20T10:03:00Z").await;
        assert_eq!(
            scene.said(),
            ["FIRING hot: svc", "RESOLVED hot: svc"],
            "older than the snapshot: stale"
        );
        scene.stop().await;
    }
}
