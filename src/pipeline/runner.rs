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
//! In a cluster the states are the cluster's (one KV value, with, per entity, Port's time of
//! the latest change judged): each event, held alert and reconciliation snapshot is judged
//! against them as they are now and written with compare-and-set before anything is committed
//! locally; the alerts go to the alerts' outbox, named by the revision that write moved from.
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
use crate::cluster::SharedState;
use crate::spool::writer::SpoolWriter;
use crate::spool::{Outcome, Spool, Write};

/// How often an idle pipeline looks at the spool file for events queued by another process
/// (`smee-relay events replay`): one `statx`, and a read only if the file changed.
const IDLE_POLL: Duration = Duration::from_secs(1);

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
    rules: watch::Receiver<Arc<Pipeline>>,
    shared: Option<SharedState>,
    cancel: CancellationToken,
) {
    let clock = Clock::new();
    // `evaluated`: per entity, the last event evaluated for it; a replayed event at or below it
    // is skipped.
    let (loaded, mut evaluated) = load_states(&spool);
    // Shared with the blocking evaluation; the copy-on-write below is free once it returned.
    let mut states = Arc::new(loaded);
    // One warning per (rule, entity, reason), not one per event.
    let mut warned: HashSet<(String, String, String)> = HashSet::new();
    // One error line per (rule, kind of failure): a hostile rule fails on every event.
    let mut failed_once: HashSet<(String, &'static str)> = HashSet::new();
    let mut appended = writer.appended();
    let mut cursor = 0;
    // In a cluster, the revision of the shared states `states` was read at.
    let mut revision = 0;
    // In a cluster, per entity, Port's time of the latest change any instance judged (the
    // shared counterpart of `evaluated`'s `updated_ms`).
    let mut changed: HashMap<String, u64> = HashMap::new();
    while !cancel.is_cancelled() {
        // The rules as of now: a reload swaps them between events.
        let pipeline = rules.borrow().clone();
        if let Some(shared) = &shared {
            match load_shared(shared).await {
                Some((loaded, at)) => {
                    (states, changed, revision) = (Arc::new(loaded.states), loaded.changed, at)
                }
                None => {
                    wait(&cancel, Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        // Held alerts whose time has come.
        let matured = pipeline.mature(states.iter(), clock.now_ms());
        if !matured.is_empty()
            && let Some(shared) = &shared
        {
            let changes = matured.iter().map(|(k, s, _)| (k.clone(), s.clone()));
            if !store_shared(shared, &states, &changed, changes, [], revision).await {
                // Another instance moved first (it fires them) or NATS is away: read again.
                continue;
            }
        }
        if !matured.is_empty() {
            let mut writes = Vec::new();
            let mut alerts = Vec::new();
            for (key, state, alert) in &matured {
                writes.push(state_write(key, state));
                alerts.push(Alert::to_event(alert));
            }
            writes.push(alert_append(alerts, shared.as_ref().map(|_| revision)));
            if commit(&writer, writes).await {
                let states = Arc::make_mut(&mut states);
                for (key, state, alert) in matured {
                    info!(rule = %alert.rule, entity = %alert.entity, "{}", alert.headline());
                    count_alert(&alert);
                    states.insert(key, state);
                }
            }
        }

        // Before the read: another process's write from here on (`events replay`) changes the
        // file after `seen`.
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
        if queued.is_empty() {
            // Wait for an append, a held alert's time, or (looked at every second, one `statx`)
            // a write by another process. In a cluster the states live in NATS and may change
            // anywhere: read again every second as before.
            loop {
                let now = clock.now_ms();
                let due = pipeline
                    .next_due(states.iter())
                    .map(|due| Duration::from_millis(due.saturating_sub(now)));
                let wait = due.map_or(IDLE_POLL, |due| due.min(IDLE_POLL));
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = appended.changed() => break,
                    _ = tokio::time::sleep(wait) => {
                        if shared.is_some()
                            || due.is_some_and(|due| due <= wait)
                            || spool.changed_since(&seen)
                        {
                            break;
                        }
                    }
                }
            }
            continue;
        }
        for (n, item) in queued.into_iter().enumerate() {
            let id = item.event.id;
            // In a cluster, each event is judged against the states as they are now.
            if n > 0
                && let Some(shared) = &shared
            {
                match load_shared(shared).await {
                    Some((loaded, at)) => {
                        (states, changed, revision) = (Arc::new(loaded.states), loaded.changed, at)
                    }
                    None => break,
                }
            }
            let mark = |outcome| Write::Mark {
                route: PIPELINE_ROUTE.into(),
                seq: item.seq,
                event: item.event.id,
                outcome,
            };
            if reconcile::is_snapshot(&item.event) {
                let cluster = shared.as_ref().map(|shared| Shared {
                    state: shared,
                    changed: &changed,
                    revision,
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
            if let Some((key, done)) = subject
                .as_ref()
                .and_then(|key| Some((key, evaluated.get(key)?)))
                && (id <= done.event
                    || matches!((changed_ms, done.updated_ms), (Some(now), Some(then)) if now < then))
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
            if shared.is_some()
                && let Some(key) = &subject
                && let (Some(now), Some(then)) = (changed_ms, changed.get(key).copied())
                && now < then
            {
                let entity = key.split('\u{1f}').nth(1).unwrap_or(key);
                info!(
                    event = id,
                    entity,
                    "pipeline: event {id} changes the entity at a time before the change of {} the cluster judged (or Port's state read by reconciliation); the newer one stands and no alert is sent",
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + Duration::from_millis(then)
                    )
                );
                if !commit(&writer, vec![mark(Outcome::Delivered { status: 200 })]).await {
                    break;
                }
                cursor = item.seq;
                continue;
            }
            let now = clock.now_ms();
            let received = super::received_ms(&item.event.event, item.event.received_ms);
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
            let (mut writes, new_states, alerts, judged) = match evaluation {
                Evaluation::NotPort(reason) => {
                    tracing::debug!(event = id, "pipeline: not a Port event ({reason})");
                    (
                        vec![mark(Outcome::Delivered { status: 200 })],
                        Default::default(),
                        Vec::new(),
                        false,
                    )
                }
                Evaluation::Rejected(e) => {
                    warn!(
                        event = id,
                        "pipeline: rejected: {e}; the event is not evaluated"
                    );
                    let error = format!("signature rejected: {e}");
                    (
                        vec![mark(Outcome::Dead {
                            status: None,
                            error,
                        })],
                        Default::default(),
                        Vec::new(),
                        // Never judged: a replay (after fixing the secret, say) may judge it.
                        false,
                    )
                }
                Evaluation::Evaluated {
                    alerts,
                    states: new_states,
                    skipped,
                    failed,
                    ..
                } => {
                    for (rule, entity, reason) in skipped {
                        let key = (rule, entity, reason);
                        if !warned.contains(&key) {
                            warn!(rule = %key.0, entity = %key.1, "rule cannot judge: {}; its state is unchanged", key.2);
                            warned.insert(key);
                        }
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
                        };
                        writes.push(Write::State {
                            key: verdict_key(id),
                            value: Some(
                                serde_json::to_vec(&verdict).expect("a verdict serialises"),
                            ),
                        });
                    }
                    if !alerts.is_empty() {
                        writes.push(alert_append(
                            alerts.iter().map(Alert::to_event).collect(),
                            shared.as_ref().map(|_| revision),
                        ));
                    }
                    writes.push(mark(Outcome::Delivered { status: 200 }));
                    (writes, new_states, alerts, true)
                }
            };
            let done = subject.filter(|_| judged).map(|key| {
                (
                    key,
                    Evaluated {
                        event: id,
                        at_ms: now,
                        updated_ms: changed_ms,
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
            if let Some(shared) = &shared
                // Alerts always move the revision: it names them (`alert_append`).
                && (!new_states.is_empty() || !newer_mark.is_empty() || !alerts.is_empty())
                && !store_shared(
                    shared,
                    &states,
                    &changed,
                    new_states.clone(),
                    newer_mark.clone(),
                    revision,
                )
                .await
            {
                break;
            }
            if !commit(&writer, writes).await {
                // Not recorded: stop here and read the queue again from this event.
                break;
            }
            for alert in &alerts {
                info!(event = id, rule = %alert.rule, entity = %alert.entity, "{}", alert.headline());
                count_alert(alert);
            }
            Arc::make_mut(&mut states).extend(new_states);
            changed.extend(newer_mark);
            if let Some((key, done)) = done {
                evaluated.insert(key, done);
            }
            cursor = item.seq;
        }
    }
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
    cluster: Option<Shared<'_>>,
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
    if let Some(cluster) = &cluster {
        for (key, at) in cluster.changed {
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
    let mut writes: Vec<Write> = outcome
        .states
        .iter()
        .map(|(k, s)| state_write(k, s))
        .collect();
    if !outcome.alerts.is_empty() {
        writes.push(alert_append(
            outcome.alerts.iter().map(Alert::to_event).collect(),
            cluster.as_ref().map(|c| c.revision),
        ));
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
                    updated_ms: *updated_ms,
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
    // In a cluster, compare-and-set first, as for a live event: of two instances judging
    // snapshots of the same gap against the same states, one wins and sends; the other is
    // judged again (by the caller) against the winner's states, and finds nothing to send.
    if let Some(cluster) = &cluster {
        let marks: Vec<(String, u64)> = outcome
            .seen
            .iter()
            .filter_map(|(key, at)| Some((key.clone(), (*at)?)))
            .filter(|(key, at)| cluster.changed.get(key).is_none_or(|then| then < at))
            .collect();
        if (!outcome.states.is_empty() || !marks.is_empty() || !outcome.alerts.is_empty())
            && !store_shared(
                cluster.state,
                states,
                cluster.changed,
                outcome.states.clone(),
                marks,
                cluster.revision,
            )
            .await
        {
            return None;
        }
    }
    if !commit(writer, writes).await {
        return None;
    }
    reconcile::report(&snapshot.blueprint, id, &outcome);
    for alert in &outcome.alerts {
        info!(event = id, rule = %alert.rule, entity = %alert.entity, "{}", alert.headline());
        count_alert(alert);
    }
    Arc::make_mut(states).extend(outcome.states);
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
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return false;
    };
    ["/run/id", "/context/runId", "/port_context/runId"]
        .iter()
        .any(|path| value.pointer(path).is_some_and(|v| v.is_string()))
}

/// What the cluster's KV holds for the pipeline: one value, changed only with
/// compare-and-set on its revision.
#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SharedAlerts {
    /// The alert states, by rule and entity.
    states: HashMap<String, AlertState>,
    /// Per entity, Port's time of the latest change judged (live or by reconciliation), by
    /// any instance: a change older than it is stale, and a snapshot read before it loses.
    #[serde(default)]
    changed: HashMap<String, u64>,
}

/// How long the cluster keeps an entity's change time ([`SharedAlerts::changed`]): far longer
/// than a snapshot or an event waits between Port and its judgement.
const MARK_HORIZON: Duration = Duration::from_secs(24 * 3600);

/// Drop the change times more than [`MARK_HORIZON`] older than the newest.
fn prune_marks(changed: &mut HashMap<String, u64>) {
    if let Some(newest) = changed.values().max().copied() {
        let horizon = newest.saturating_sub(MARK_HORIZON.as_millis() as u64);
        changed.retain(|_, at| *at >= horizon);
    }
}

/// The shared value as [`judge_snapshot`] judges against it in a cluster.
struct Shared<'a> {
    state: &'a SharedState,
    /// [`SharedAlerts::changed`] as read.
    changed: &'a HashMap<String, u64>,
    /// The revision it was read at.
    revision: u64,
}

/// The cluster's alert states and their revision; `None` (logged) if NATS cannot say.
async fn load_shared(shared: &SharedState) -> Option<(SharedAlerts, u64)> {
    match shared.load().await {
        Ok((None, revision)) => Some((SharedAlerts::default(), revision)),
        // The first cluster releases stored the states alone.
        Ok((Some(bytes), revision)) => match serde_json::from_slice(&bytes).or_else(|e| {
            serde_json::from_slice(&bytes)
                .map(|states| SharedAlerts {
                    states,
                    changed: HashMap::new(),
                })
                .map_err(|_| e)
        }) {
            Ok(loaded) => Some((loaded, revision)),
            Err(e) => {
                error!(
                    "the cluster's alert states are not what a relay writes ({e}); starting from OK"
                );
                Some((SharedAlerts::default(), revision))
            }
        },
        Err(e) => {
            warn!(
                "cannot read the cluster's alert states, waiting: {}",
                crate::error::chain(&e)
            );
            None
        }
    }
}

/// Store `states` with `changes` if the cluster's states are still at `revision`. False if
/// another instance changed them first (or NATS is away, logged): nothing is sent then.
async fn store_shared(
    shared: &SharedState,
    states: &HashMap<String, AlertState>,
    changed: &HashMap<String, u64>,
    changes: impl IntoIterator<Item = (String, AlertState)>,
    marks: impl IntoIterator<Item = (String, u64)>,
    revision: u64,
) -> bool {
    let mut next = SharedAlerts {
        states: states.clone(),
        changed: changed.clone(),
    };
    for (key, state) in changes {
        if state == AlertState::default() {
            next.states.remove(&key);
        } else {
            next.states.insert(key, state);
        }
    }
    next.changed.extend(marks);
    // One mark per entity changed would grow the one KV value without end (NATS caps a value
    // at its max payload, 1 MiB by default); a mark only has to outlive the snapshots and
    // events in flight when it was written, so those far older than the newest go. (Port's
    // times against Port's times: the relay's clock plays no part.)
    prune_marks(&mut next.changed);
    let bytes = serde_json::to_vec(&next).expect("states serialise");
    match shared.store(bytes.into(), revision).await {
        Ok(true) => true,
        Ok(false) => {
            tracing::debug!(
                "the cluster's alert states changed meanwhile (another instance); judging again"
            );
            false
        }
        Err(e) => {
            warn!(
                "cannot store the cluster's alert states, waiting: {}",
                crate::error::chain(&e)
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
            false
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
    Some((
        reconcile::subject(change.blueprint().unwrap_or(""), change.entity()?),
        reconcile::change_time_ms(&change),
    ))
}

/// Say why a replayed event is not evaluated again.
fn say_skipped(id: u64, subject: &str, done: &Evaluated) {
    let entity = subject.split('\u{1f}').nth(1).unwrap_or(subject);
    let at = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + Duration::from_millis(done.at_ms),
    );
    if id > done.event {
        // The time that wins is Port's time of the change judged, not when it was judged.
        let winning = done.updated_ms.map_or_else(
            || format!("judged at {at}"),
            |ms| {
                format!(
                    "of {}",
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + Duration::from_millis(ms)
                    )
                )
            },
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

fn count_alert(alert: &Alert) {
    metrics::counter!(
        "smee_relay_alerts_total",
        "rule" => alert.rule.clone(),
        "status" => alert.status.to_string()
    )
    .increment(1);
}

/// The alert states, and the per-entity "evaluated" marks.
fn load_states(spool: &Spool) -> (HashMap<String, AlertState>, HashMap<String, Evaluated>) {
    let mut states = HashMap::new();
    let mut evaluated = HashMap::new();
    match spool.states() {
        Ok(stored) => {
            for (key, bytes) in stored {
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
        }
        Err(e) => error!("cannot read alert states, starting from OK: {e}"),
    }
    (states, evaluated)
}

fn state_write(key: &str, state: &AlertState) -> Write {
    let forget = *state == AlertState::default();
    Write::State {
        key: key.to_string(),
        value: (!forget).then(|| serde_json::to_vec(state).expect("a state serialises")),
    }
}

/// The alerts of one commit, onto the alert route; in a cluster (`cluster_revision`: the
/// revision of the shared states the compare-and-set moved from) onto the alerts' outbox
/// instead, which publishes them to the cluster, where whichever instance takes them from the
/// alert route's consumer delivers them. Each is named by that revision and its place in the
/// commit: only one compare-and-set moves from a revision, so the name is the alert's
/// cluster-wide, and the outbox publishing it again (an ack lost, a restart) stores it once.
fn alert_append(mut alerts: Vec<crate::event::Event>, cluster_revision: Option<u64>) -> Write {
    let route = match cluster_revision {
        Some(revision) => {
            for (n, alert) in alerts.iter_mut().enumerate() {
                alert.sse_id = Some(format!("alerts@{revision}#{n}"));
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
        prune_marks(&mut changed);
        let mut kept: Vec<&str> = changed.keys().map(String::as_str).collect();
        kept.sort();
        assert_eq!(kept, ["edge", "new"]);
    }

    #[test]
    fn the_shared_value_reads_both_layouts() {
        let states: HashMap<String, AlertState> =
            [("cpu\u{1f}a".to_string(), AlertState::default())].into();
        let state = &serde_json::to_string(&states).unwrap();
        let legacy: Result<SharedAlerts, _> = serde_json::from_str(state);
        assert!(
            legacy.is_err(),
            "the states alone are not taken for the new layout"
        );
        let states: HashMap<String, AlertState> = serde_json::from_str(state).unwrap();
        let now = format!(r#"{{"states":{state},"changed":{{"x":1}}}}"#);
        let read: SharedAlerts = serde_json::from_str(&now).unwrap();
        assert_eq!(read.states, states);
        assert_eq!(read.changed.get("x"), Some(&1));
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

    #[tokio::test(start_paused = true)]
    async fn for_holds_the_alert_on_the_paused_clock() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let (writer, thread) = SpoolWriter::start(spool.clone(), Limits { max_bytes: 1 << 20 });
        let pipeline = super::super::tests::with_rules(
            "[[rule]]\nname = \"hot\"\nproperty = \"cpuUtil\"\nabove = 80\nfor = \"5m\"\n",
        );
        let body = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/port/deployment-config/automation/02-cpu-25-to-87.json"
        ))
        .unwrap();
        let event = crate::event::Event {
            sse_id: None,
            timestamp_ms: None,
            headers: vec![],
            query: vec![],
            body: body.into(),
        };
        writer
            .append("c", &[PIPELINE_ROUTE.to_string()], vec![event].into(), None)
            .await
            .unwrap();
        let cancel = CancellationToken::new();
        let (_rules, rules_rx) = watch::channel(Arc::new(pipeline));
        let task = tokio::spawn(run(
            spool.clone(),
            writer.clone(),
            rules_rx,
            None,
            cancel.clone(),
        ));
        let alerts = |spool: &Spool| spool.pending(ALERT_ROUTE, 0, 10).unwrap();
        // The writer is a thread: what it commits is waited for in real time, inside a
        // blocking task, which also keeps the paused clock from jumping ahead meanwhile.
        let wait_real = |what: &'static str, cond: fn(&Spool) -> bool| {
            let spool = spool.clone();
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
        };
        wait_real("the event evaluated", |spool| {
            spool.pending(PIPELINE_ROUTE, 0, 10).unwrap().is_empty()
        })
        .await
        .unwrap();
        assert!(alerts(&spool).is_empty(), "held: nothing yet");
        // The paused clock: these return when tokio's time has moved on, at once in real time.
        tokio::time::sleep(Duration::from_secs(4 * 60)).await;
        assert!(alerts(&spool).is_empty(), "still held after 4 minutes");
        tokio::time::sleep(Duration::from_secs(61)).await;
        wait_real("the held alert committed", |spool| {
            !spool.pending(ALERT_ROUTE, 0, 10).unwrap().is_empty()
        })
        .await
        .unwrap();
        let sent = alerts(&spool);
        assert_eq!(sent.len(), 1, "fired once the 5 minutes were over");
        let alert: Alert = serde_json::from_slice(&sent[0].event.event.body).unwrap();
        assert_eq!(alert.note.as_deref(), Some("held for 5m"));
        cancel.cancel();
        task.await.unwrap();
        drop(writer);
        thread.join().unwrap();
    }

    /// An idle pipeline does not read the spool while nobody writes it (one `statx` a second),
    /// and still takes an event appended later.
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
        let task = tokio::spawn(run(
            spool.clone(),
            writer.clone(),
            rules_rx,
            None,
            cancel.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(3)).await;
        let reads = spool.reads();
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(spool.reads(), reads, "read during 10 idle minutes");
        let body = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/port/deployment-config/automation/02-cpu-25-to-87.json"
        ))
        .unwrap();
        let event = crate::event::Event {
            body: body.into(),
            ..Default::default()
        };
        writer
            .append("c", &[PIPELINE_ROUTE.to_string()], vec![event].into(), None)
            .await
            .unwrap();
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
        let task = tokio::spawn(run(
            spool.clone(),
            writer.clone(),
            rules_rx,
            None,
            cancel.clone(),
        ));
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

    /// A snapshot and live events share one queue: a live event older than what the snapshot
    /// read (by Port's `updatedAt`) is stale and sends nothing; a newer one is judged.
    #[tokio::test]
    async fn a_live_event_older_than_the_snapshot_loses_and_a_newer_one_wins() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let (writer, thread) = SpoolWriter::start(spool.clone(), Limits { max_bytes: 1 << 20 });
        let pipeline = super::super::tests::with_rules(
            "[[rule]]\nname = \"hot\"\nblueprint = \"DeploymentConfig\"\nproperty = \"cpuUtil\"\nabove = 80\n",
        );
        let entity = |cpu: u32, at: &str| {
            serde_json::json!({"identifier": "svc", "blueprint": "DeploymentConfig",
                "properties": {"cpuUtil": cpu}, "updatedAt": at})
        };
        let live = |cpu: u32, at: &str| crate::event::Event {
            body: serde_json::json!({"action": "UPDATE", "resourceType": "entity",
                "context": {"blueprint": "DeploymentConfig", "entity": "svc"},
                "diff": {"before": entity(70, "2026-11-20T09:00:00Z"), "after": entity(cpu, at)}})
            .to_string()
            .into_bytes()
            .into(),
            ..Default::default()
        };
        let snapshot = reconcile::Snapshot {
            blueprint: "DeploymentConfig".into(),
            fetched_at_ms: 1,
            why: reconcile::Why::default(),
            entities: vec![entity(95, "2026-11-20T10:05:00Z")],
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
        // Posted before the snapshot's state, delivered after it: stale.
        writer
            .append(
                "c",
                &routes,
                vec![live(50, "2026-11-20T10:03:00Z")].into(),
                None,
            )
            .await
            .unwrap();
        let cancel = CancellationToken::new();
        let (_rules, rules_rx) = watch::channel(Arc::new(pipeline));
        let task = tokio::spawn(run(
            spool.clone(),
            writer.clone(),
            rules_rx,
            None,
            cancel.clone(),
        ));
        settled(&spool).await;
        let said = |spool: &Spool| -> Vec<String> {
            spool
                .pending(ALERT_ROUTE, 0, 10)
                .unwrap()
                .iter()
                .map(|q| {
                    let alert: Alert = serde_json::from_slice(&q.event.event.body).unwrap();
                    alert.headline()
                })
                .collect()
        };
        assert_eq!(
            said(&spool),
            ["FIRING hot: svc"],
            "the stale event resolved nothing"
        );
        writer
            .append(
                "c",
                &routes,
                vec![live(50, "2026-11-20T10:10:00Z")].into(),
                None,
            )
            .await
            .unwrap();
        settled(&spool).await;
        assert_eq!(said(&spool), ["FIRING hot: svc", "RESOLVED hot: svc"]);
        cancel.cancel();
        task.await.unwrap();
        drop(writer);
        thread.join().unwrap();
    }
}
