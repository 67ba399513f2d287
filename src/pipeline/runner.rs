//! The pipeline route: reads the pipeline's queue from the spool in order, evaluates each event
//! against the rules, and commits the new alert states, the alerts (into the alert outbox, a
//! route like any other) and the event's "done" mark in one transaction. Held alerts (`for`)
//! fire here when their time comes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{ALERT_ROUTE, Alert, AlertState, Evaluation, PIPELINE_ROUTE, Pipeline};
use crate::spool::writer::SpoolWriter;
use crate::spool::{Outcome, Spool, Write};

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
    cancel: CancellationToken,
) {
    let clock = Clock::new();
    let mut states = load_states(&spool);
    // One warning per (rule, entity, reason), not one per event.
    let mut warned: HashSet<(String, String, String)> = HashSet::new();
    let mut appended = writer.appended();
    let mut cursor = 0;
    while !cancel.is_cancelled() {
        // The rules as of now: a reload swaps them between events.
        let pipeline = rules.borrow().clone();
        // Held alerts whose time has come.
        let matured = pipeline.mature(states.iter(), clock.now_ms());
        if !matured.is_empty() {
            let mut writes = Vec::new();
            let mut alerts = Vec::new();
            for (key, state, alert) in &matured {
                writes.push(state_write(key, state));
                alerts.push(Alert::to_event(alert));
            }
            writes.push(alert_append(alerts));
            if commit(&writer, writes).await {
                for (key, state, alert) in matured {
                    info!(rule = %alert.rule, entity = %alert.entity, "{}", alert.headline());
                    count_alert(&alert);
                    states.insert(key, state);
                }
            }
        }

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
            let now = clock.now_ms();
            let wait = pipeline
                .next_due(states.iter())
                .map_or(Duration::from_secs(1), |due| {
                    Duration::from_millis(due.saturating_sub(now)).min(Duration::from_secs(1))
                });
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = appended.changed() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            continue;
        }
        for item in queued {
            let current = |key: &str| states.get(key).cloned().unwrap_or_default();
            let evaluation = pipeline.evaluate(&item.event.event, &current, clock.now_ms());
            let mark = |outcome| Write::Mark {
                route: PIPELINE_ROUTE.into(),
                seq: item.seq,
                event: item.event.id,
                outcome,
            };
            let id = item.event.id;
            let (writes, new_states, alerts) = match evaluation {
                Evaluation::NotPort(reason) => {
                    tracing::debug!(event = id, "pipeline: not a Port event ({reason})");
                    (
                        vec![mark(Outcome::Delivered { status: 200 })],
                        Default::default(),
                        Vec::new(),
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
                    )
                }
                Evaluation::Evaluated {
                    alerts,
                    states: new_states,
                    skipped,
                    ..
                } => {
                    for (rule, entity, reason) in skipped {
                        let key = (rule, entity, reason);
                        if !warned.contains(&key) {
                            warn!(rule = %key.0, entity = %key.1, "rule cannot judge: {}; its state is unchanged", key.2);
                            warned.insert(key);
                        }
                    }
                    let mut writes: Vec<Write> =
                        new_states.iter().map(|(k, s)| state_write(k, s)).collect();
                    if !alerts.is_empty() {
                        writes.push(alert_append(alerts.iter().map(Alert::to_event).collect()));
                    }
                    writes.push(mark(Outcome::Delivered { status: 200 }));
                    (writes, new_states, alerts)
                }
            };
            if !commit(&writer, writes).await {
                // Not recorded: stop here and read the queue again from this event.
                break;
            }
            for alert in &alerts {
                info!(event = id, rule = %alert.rule, entity = %alert.entity, "{}", alert.headline());
                count_alert(alert);
            }
            states.extend(new_states);
            cursor = item.seq;
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

fn load_states(spool: &Spool) -> HashMap<String, AlertState> {
    match spool.states() {
        Ok(stored) => stored
            .into_iter()
            .filter_map(|(key, bytes)| Some((key, serde_json::from_slice(&bytes).ok()?)))
            .collect(),
        Err(e) => {
            error!("cannot read alert states, starting from OK: {e}");
            HashMap::new()
        }
    }
}

fn state_write(key: &str, state: &AlertState) -> Write {
    let forget = *state == AlertState::default();
    Write::State {
        key: key.to_string(),
        value: (!forget).then(|| serde_json::to_vec(state).expect("a state serialises")),
    }
}

fn alert_append(alerts: Vec<crate::event::Event>) -> Write {
    Write::Append {
        channel: PIPELINE_ROUTE.into(),
        routes: vec![ALERT_ROUTE.into()],
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

    #[tokio::test(start_paused = true)]
    async fn for_holds_the_alert_on_the_paused_clock() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let (writer, thread) = SpoolWriter::start(spool.clone(), Limits { max_bytes: 1 << 20 });
        let config = crate::config::parse(
            "[[channel]]\nurl = \"http://127.0.0.1:1/c\"\npipeline = true\n\
             [[rule]]\nname = \"hot\"\nproperty = \"cpuUtil\"\nabove = 80\nfor = \"5m\"\n",
            "test",
            &|_| None,
        )
        .unwrap();
        let pipeline = Pipeline {
            rules: config.rules,
            verifier: None,
            app_url: "https://app.getport.io".into(),
        };
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
        let task = tokio::spawn(run(spool.clone(), writer.clone(), rules_rx, cancel.clone()));
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
}
