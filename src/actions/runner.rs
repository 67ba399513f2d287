//! The actions route: reads action runs off the spool in order, checks the signature, finds the
//! `[[action]]`, and executes its handler once per run id. A run's state ("running", then
//! "done") and its report messages are committed to the spool, so:
//!
//! - the run state and the event's mark are one transaction: a run delivered twice, even while
//!   its handler still runs, executes once;
//! - the terminal status and the "done" state are one transaction: it is queued exactly once,
//!   after every log line of the run, and nothing is queued for the run after it;
//! - a run found "running" at start was interrupted (kill -9, power loss, stop): `on_interrupt`
//!   decides between FAILURE "interrupted by restart" and running it again.
//!
//! It never calls Port: reports go to the `port-reports` route. It never gives a handler Port
//! credentials: a command gets a clean environment.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncWriteExt as _};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{
    ACTIONS_ROUTE, ActionSpec, ENV_ALLOW, Finish, Handler, HandlerProcess, Links, REPORT_ROUTE,
    Report, ReportMapping, RunInfo, RunPhase, RunState, Terminal, decode_run, find_action,
    parse_directive, state_key, stored_runs, why_not_a_run,
};
use crate::delivery::RetryPolicy;
use crate::pipeline::signature::Verifier;
use crate::spool::writer::SpoolWriter;
use crate::spool::{Outcome, Spool, Write};

/// The actions in force (swapped on reload) and how they are checked.
#[derive(Clone, Debug)]
pub struct Actions {
    pub actions: Vec<ActionSpec>,
    /// Checks `x-port-signature`; required by config when a command handler exists.
    pub verifier: Option<Verifier>,
    /// How a forward handler is retried (5xx, network), and until when.
    pub retry: RetryPolicy,
    /// Report an Automation run's outcome once the pipeline has evaluated it; the name of
    /// where alerts go (`Slack`, `stdout`), for the summary. `None`: off.
    pub automation_runs: Option<String>,
    /// Evaluates `when` matchers within the `[jq]` bounds (a worker process).
    pub jq: crate::pipeline::jq::JqEngine,
}

/// One log message to Port at most this long (Port refuses bodies over 1 MiB; JSON escaping
/// can grow text up to six times).
const LOG_BATCH: usize = 128 << 10;
/// A longer output line is cut here.
const MAX_LINE: usize = 16 << 10;
/// A handler's output past this much is not sent: a runaway handler would otherwise fill the
/// spool and Port's log view. The relay's own notes still go through.
const MAX_RUN_OUTPUT: usize = 8 << 20;
/// Log lines are sent at most this often per run (Port rate-limits its API).
const LOG_PACE: Duration = Duration::from_secs(1);
/// After a command exits, how long its output may still be read (a background child may keep
/// the pipe open).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Execute the actions route's runs until `cancel` fires. Running handlers are then killed;
/// their runs stay "running" and `on_interrupt` decides at the next start.
pub async fn run(
    spool: Arc<Spool>,
    writer: SpoolWriter,
    config: watch::Receiver<Arc<Actions>>,
    cancel: CancellationToken,
) {
    let mut executing = JoinSet::new();
    let at_start = config.borrow().clone();
    recover(&spool, &writer, &at_start, &mut executing, &cancel).await;
    // Read after recovery, which settles the runs a restart interrupted.
    let mut runs: HashMap<String, RunPhase> = match stored_runs(&spool) {
        Ok(runs) => runs.into_iter().map(|(id, s)| (id, s.run_phase)).collect(),
        Err(e) => {
            error!("cannot read action run states: {e}; the actions route does not start");
            return;
        }
    };
    let mut appended = writer.appended();
    let mut cursor = 0;
    while !cancel.is_cancelled() {
        while executing.try_join_next().is_some() {}
        let actions = config.borrow().clone();
        let queued = {
            let spool = spool.clone();
            tokio::task::spawn_blocking(move || spool.pending(ACTIONS_ROUTE, cursor, 64)).await
        };
        let queued = match queued {
            Ok(Ok(queued)) => queued,
            Ok(Err(e)) => {
                error!("actions cannot read the spool: {e}");
                Vec::new()
            }
            Err(_) => break,
        };
        if queued.is_empty() {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = appended.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        for item in queued {
            let id = item.event.id;
            let mark = |outcome| Write::Mark {
                route: ACTIONS_ROUTE.into(),
                seq: item.seq,
                event: id,
                outcome,
            };
            let mut done = mark(Outcome::Delivered { status: 200 });
            let event = &item.event.event;
            // Signed as Port signs: by its header, and where a client secret is set, verified
            // (helper-152: a made-up header made a dead letter "signed, yet not JSON").
            let signed = event.header("x-port-signature").is_some()
                && actions.verifier.as_ref().is_none_or(|v| {
                    v.verify(
                        event.header("x-port-signature"),
                        event.header("x-port-timestamp"),
                        &event.body,
                        crate::pipeline::received_ms(event, item.event.received_ms),
                    )
                    .is_ok()
                });
            let body = match crate::pipeline::port::read_json(&event.body) {
                Ok(body) => Some(body),
                Err(e) => {
                    use crate::pipeline::port::NotPort;
                    // A body beyond the JSON limits, or Port's (by its header) and no JSON at
                    // all, may be a run: said, and not a delivery (`events list` showed them
                    // handled: helper-138's twin, helper-146).
                    let unread = match e {
                        NotPort::BeyondLimits(_) | NotPort::TooLarge(_) => Some(e.to_string()),
                        NotPort::NotJson(_) if signed => Some(format!("signed, yet the {e}")),
                        NotPort::NotJson(_) | NotPort::Shape(_) => None,
                    };
                    if let Some(unread) = unread {
                        warn!(
                            event = id,
                            "actions: {unread}; if it is an action run, nothing runs and nothing is reported (a dead letter of the actions route)"
                        );
                        done = mark(Outcome::Dead {
                            status: None,
                            error: format!("not read: {unread}"),
                        });
                    }
                    None
                }
            };
            let run = body.as_ref().and_then(decode_run);
            let not_a_run = match (&body, &run) {
                (Some(body), None) => why_not_a_run(body, &actions.actions, signed),
                _ => None,
            };
            let (Some(body), Some(run)) = (body, run) else {
                // Meant as a run, by the look of it: said, and a dead letter (helper-143: a run
                // without its id went by silently, listed as delivered).
                match not_a_run {
                    Some(why) => {
                        warn!(
                            event = id,
                            "actions: event {id} looks like an action run, but {why}: nothing runs and nothing is reported (a dead letter of the actions route)"
                        );
                        done = mark(Outcome::Dead {
                            status: None,
                            error: format!("not a run: {why}"),
                        });
                    }
                    None => debug!(event = id, "actions: not an action run"),
                }
                if !commit(&writer, vec![done]).await {
                    break;
                }
                cursor = item.seq;
                continue;
            };
            // `when` matchers run in the jq worker and block for up to its time budget: off
            // the async workers, as the pipeline's rules are.
            let found = {
                let (specs, run, body) = (actions.clone(), run.clone(), body.clone());
                match tokio::task::spawn_blocking(move || {
                    find_action(&specs.actions, &run, &body, &specs.jq)
                        .map(|found| found.map(|a| a.name.clone()))
                })
                .await
                {
                    Ok(Ok(name)) => {
                        Ok(name.and_then(|n| actions.actions.iter().find(|a| a.name == n)))
                    }
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(format!("matching actions failed: {e}")),
                }
            };
            // Decoded once, and only for a run nothing here handles.
            let automation = matches!(found, Ok(None)) && is_automation_run(&event.body);
            if automation
                && let Some(alerts_to) = &actions.automation_runs
                && !runs.contains_key(&run.run_id)
                && actions.verifier.as_ref().is_some_and(|v| {
                    v.verify(
                        event.header("x-port-signature"),
                        event.header("x-port-timestamp"),
                        &event.body,
                        crate::clock::now_ms(),
                    )
                    .is_ok()
                })
            {
                // An Automation run: its outcome is what the pipeline made of it.
                let Some(finish) =
                    automation_outcome(&spool, &item.event, alerts_to, &cancel).await
                else {
                    break;
                };
                let status = finish.status.unwrap_or(Terminal::Failure);
                info!(event = id, run = %run.run_id, "automation run: {status}: {}", finish.summary.as_deref().unwrap_or(""));
                let (phase, mut writes) = finished(&run.run_id, "automation", id, finish);
                writes.extend([
                    // Read: the pipeline's verdict has served.
                    Write::State {
                        key: crate::pipeline::runner::verdict_key(id),
                        value: None,
                    },
                    done,
                ]);
                if !commit(&writer, writes).await {
                    break;
                }
                runs.insert(run.run_id.clone(), phase);
                cursor = item.seq;
                continue;
            }
            // A `when` that failed is reported to Port as the run's failure, once the run is
            // known to be Port's (below).
            let spec = match found {
                Ok(Some(spec)) => Ok(spec),
                Ok(None) => {
                    // An Automation's webhook (a Port change) is the pipeline's; a
                    // self-service run nothing here handles stays in progress on Port's side
                    // (unless another relay handles it), so that is said.
                    if automation {
                        debug!(event = id, run = %run.run_id, "actions: an Automation run no [[action]] handles");
                    } else {
                        info!(
                            event = id,
                            run = %run.run_id,
                            "action run {} ({}): no [[action]] here handles it, so nothing runs and nothing is reported to Port (the run stays in progress there unless another relay handles it; `smee-relay check --event FILE` shows how each [[action]] matches)",
                            crate::text::escape_control(&run.run_id),
                            run.action.as_deref().map_or("no action identifier in the body".into(), |a| format!("action {}", crate::text::escape_control(a)))
                        );
                    }
                    if !commit(&writer, vec![done]).await {
                        break;
                    }
                    cursor = item.seq;
                    continue;
                }
                Err(e) => Err(e),
            };
            // Only a run that would execute is judged: other events on the channel are not
            // this route's business (the pipeline checks their signatures itself).
            if let Some(verifier) = &actions.verifier
                && let Err(e) = verifier.verify(
                    event.header("x-port-signature"),
                    event.header("x-port-timestamp"),
                    &event.body,
                    crate::clock::now_ms(),
                )
            {
                warn!(
                    event = id,
                    "action run rejected: {e}; nothing runs, nothing is reported"
                );
                let dead = mark(Outcome::Dead {
                    status: None,
                    error: format!("signature rejected: {e}"),
                });
                if !commit(&writer, vec![dead]).await {
                    break;
                }
                cursor = item.seq;
                continue;
            }
            if let Some(known) = runs.get(&run.run_id) {
                // "Running" is as of the last read: it may have finished since (helper-127).
                let stored = matches!(known, RunPhase::Running)
                    .then(|| stored_runs(&spool).ok())
                    .flatten()
                    .and_then(|stored| stored.into_iter().find(|(id, _)| *id == run.run_id))
                    .map(|(_, state)| state.run_phase);
                let phase = stored.as_ref().unwrap_or(known);
                let was = match phase {
                    RunPhase::Running => "still running".to_string(),
                    RunPhase::Done { status, .. } => format!("done, {status}"),
                };
                info!(event = id, run = %run.run_id, "run delivered again ({was}): not executed again");
                if !commit(&writer, vec![done]).await {
                    break;
                }
                cursor = item.seq;
                continue;
            }
            let spec = match spec {
                Ok(spec) => spec,
                Err(reason) => {
                    warn!(event = id, run = %run.run_id, "{reason}; no handler runs, the run is reported as FAILURE");
                    let finish = Finish {
                        status: Some(Terminal::Failure),
                        summary: Some(reason),
                        ..Finish::default()
                    };
                    let (phase, mut writes) = finished(&run.run_id, "-", id, finish);
                    writes.push(done);
                    if !commit(&writer, writes).await {
                        break;
                    }
                    runs.insert(run.run_id.clone(), phase);
                    cursor = item.seq;
                    continue;
                }
            };
            let state = RunState {
                action: spec.name.clone(),
                event: id,
                started_ms: crate::clock::now_ms(),
                run_phase: RunPhase::Running,
                process: None,
            };
            let writes = vec![state_write(&run.run_id, &state), done];
            if !commit(&writer, writes).await {
                break;
            }
            runs.insert(run.run_id.clone(), RunPhase::Running);
            cursor = item.seq;
            info!(event = id, run = %run.run_id, action = %spec.name, "action run: executing");
            count_started(&spec.name);
            executing.spawn(execute(Execution {
                writer: writer.clone(),
                spec: spec.clone(),
                run,
                body: event.body.clone(),
                received_ms: item.event.received_ms,
                retry: actions.retry,
                jq: actions.jq.clone(),
                state,
                cancel: cancel.clone(),
                note: None,
            }));
        }
        // What finished meanwhile: known as done for duplicates that arrive later.
        if let Ok(stored) = stored_runs(&spool) {
            for (id, state) in stored {
                runs.insert(id, state.run_phase);
            }
        }
    }
    // Handlers are killed by `cancel`; wait for them to leave.
    while executing.join_next().await.is_some() {}
}

/// Runs found "running" at start: the relay stopped while their handler executed.
async fn recover(
    spool: &Arc<Spool>,
    writer: &SpoolWriter,
    actions: &Actions,
    executing: &mut JoinSet<()>,
    cancel: &CancellationToken,
) {
    let Ok(stored) = stored_runs(spool) else {
        return;
    };
    for (run_id, mut state) in stored {
        if state.run_phase != RunPhase::Running {
            continue;
        }
        // Its handler may outlive the relay (kill -9): it must not run beside a rerun, nor
        // go on after its run is reported interrupted.
        if let Some(process) = state.process.take()
            && process.kill_if_running()
        {
            warn!(run = %run_id, pid = process.pid, "the run's handler was still running, left by the previous process: killed, with its process group");
        }
        let spec = actions.actions.iter().find(|a| a.name == state.action);
        let rerun = spec.filter(|s| s.on_interrupt == super::OnInterrupt::Rerun);
        if let Some(spec) = rerun {
            match spool.get(state.event) {
                Ok((event, _)) => {
                    let body: serde_json::Value =
                        serde_json::from_slice(&event.event.body).unwrap_or_default();
                    if let Some(run) = decode_run(&body) {
                        warn!(run = %run_id, action = %spec.name, "run was interrupted by a restart; running it again (on_interrupt = \"rerun\")");
                        count_started(&spec.name);
                        executing.spawn(execute(Execution {
                            writer: writer.clone(),
                            spec: spec.clone(),
                            run,
                            body: event.event.body.clone(),
                            received_ms: event.received_ms,
                            retry: actions.retry,
                            jq: actions.jq.clone(),
                            state,
                            cancel: cancel.clone(),
                            note: Some("smee-relay restarted before the run finished; it runs again from the start (on_interrupt = \"rerun\")"),
                        }));
                        continue;
                    }
                }
                Err(e) => warn!(run = %run_id, "cannot run it again: {e}"),
            }
        }
        // Why it is not run again: its `on_interrupt`, or its `[[action]]` gone from the
        // config (helper-120: said to be `on_interrupt = "fail"` when it was "rerun").
        let why = match (spec, rerun) {
            (None, _) => format!("its [[action]] {} is no longer in the config", state.action),
            (Some(_), None) => "on_interrupt = \"fail\"".to_string(),
            (Some(_), Some(_)) => "its event could not be read again".to_string(),
        };
        warn!(run = %run_id, action = %state.action, "run was interrupted by a restart and is not run again ({why}): reporting FAILURE");
        count_finished(&state.action, "interrupted");
        let finish = Finish {
            status: Some(Terminal::Failure),
            summary: Some("interrupted by restart".into()),
            ..Finish::default()
        };
        let log = Report::Log {
            run: run_id.clone(),
            message: format!(
                "smee-relay restarted before the run finished; it is not run again ({why})"
            ),
        };
        finish_writes_commit(writer, &run_id, &state, vec![log], finish, cancel).await;
    }
}

/// What the pipeline made of an Automation run's event: FAILURE if it rejected it, else
/// SUCCESS naming the alerts it produced. Waits until the pipeline has judged it; `None` on
/// shutdown.
async fn automation_outcome(
    spool: &Arc<Spool>,
    stored: &crate::spool::StoredEvent,
    alerts_to: &str,
    cancel: &CancellationToken,
) -> Option<Finish> {
    use crate::pipeline::PIPELINE_ROUTE;
    use crate::pipeline::runner::{EventVerdict, verdict_key};
    use crate::spool::Status;
    let id = stored.id;
    let (status, error) = loop {
        let spool_ = spool.clone();
        let record = tokio::task::spawn_blocking(move || spool_.get(id))
            .await
            .ok()?;
        let record = record.ok().and_then(|(_, records)| {
            records
                .into_iter()
                .find(|(route, _)| route == PIPELINE_ROUTE)
                .map(|(_, r)| r)
        });
        match record {
            Some(r) if r.status != Status::Pending => break (r.status, r.last_error),
            // Not (yet) judged: the pipeline runs beside this route.
            _ => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    };
    if status == Status::Dead {
        return Some(Finish {
            status: Some(Terminal::Failure),
            summary: Some(format!(
                "the pipeline could not evaluate it: {}",
                error.unwrap_or_default()
            )),
            ..Finish::default()
        });
    }
    // The pipeline recorded its verdict in the commit that settled the event: it is there now.
    let spool_ = spool.clone();
    let verdict = tokio::task::spawn_blocking(move || spool_.state(&verdict_key(id)))
        .await
        .ok()?;
    let verdict = match verdict {
        Ok(Some(bytes)) => serde_json::from_slice::<EventVerdict>(&bytes).ok(),
        Ok(None) => None,
        Err(e) => {
            warn!(event = id, "cannot read the pipeline's verdict: {e}");
            None
        }
    };
    let Some(verdict) = verdict else {
        // Settled without a verdict: not judged (an event replayed after a newer one of its
        // entity, or judged before reporting was turned on).
        return Some(Finish {
            status: Some(Terminal::Success),
            summary: Some(
                "not evaluated by the pipeline: older than a change of its entity already \
                 judged, or a replay"
                    .into(),
            ),
            ..Finish::default()
        });
    };
    // What the pipeline did, in order of weight. Alerts are queued when the run is reported:
    // their delivery is the alert route's (`events list`), and may come later.
    let mut said: Vec<String> = verdict.failed.clone();
    if !verdict.alerts.is_empty() {
        said.push(format!(
            "{} queued for {alerts_to}",
            verdict.alerts.join(", ")
        ));
    }
    if !verdict.held.is_empty() {
        said.push(format!(
            // Plain words: Port shows a run's summary as text (helper-153: backticks).
            "{} (held: it fires only if its condition lasts the rule's hold time)",
            verdict.held.join(", ")
        ));
    }
    said.extend(verdict.unjudged.iter().cloned());
    if said.is_empty() {
        said.push("no alert: no rule's state changed".into());
    }
    let status = if verdict.failed.is_empty() {
        Terminal::Success
    } else {
        Terminal::Failure
    };
    Some(Finish {
        status: Some(status),
        summary: Some(said.join("; ")),
        ..Finish::default()
    })
}

/// Whether a body carrying a run id is an Automation's (a Port change, bare or in `event`),
/// not a self-service action run: those decode as a change too, of resource type `run`
/// (helper-120: one no `[[action]]` handled was reported SUCCESS as an Automation run).
fn is_automation_run(body: &[u8]) -> bool {
    crate::pipeline::port::decode(body).is_ok_and(|change| change.resource_type != "run")
}

/// How a command's timeout summary starts (also how [`execute`] tells it apart, for metrics).
const TIMED_OUT: &str = "timed out after";

/// A run ended: counted by action and outcome (`success`, `failure`, `timeout`, `interrupted`).
fn count_finished(action: &str, outcome: &'static str) {
    metrics::counter!(
        "smee_relay_action_runs_finished_total",
        "action" => action.to_string(),
        "outcome" => outcome
    )
    .increment(1);
}

/// A handler started (a first run, or a rerun after a restart).
fn count_started(action: &str) {
    metrics::counter!("smee_relay_action_runs_started_total", "action" => action.to_string())
        .increment(1);
}

/// Everything one execution needs.
struct Execution {
    writer: SpoolWriter,
    spec: ActionSpec,
    run: RunInfo,
    body: Bytes,
    /// When the event arrived: a forward handler is retried until `retry.max_age` after it.
    received_ms: u64,
    retry: RetryPolicy,
    /// Evaluates a forward handler's `[action.report]` mappings within the `[jq]` bounds.
    jq: crate::pipeline::jq::JqEngine,
    state: RunState,
    cancel: CancellationToken,
    /// A first line for the run's log, before the handler's own (a rerun says why it runs
    /// again, or Port shows the handler's output twice with nothing between).
    note: Option<&'static str>,
}

/// Collects a run's log lines into paced messages under Port's size limit.
struct LogBatch {
    writer: SpoolWriter,
    run: String,
    text: String,
    last_sent: tokio::time::Instant,
    /// Bytes of handler output taken so far, against [`MAX_RUN_OUTPUT`].
    output: usize,
    /// Handler output lines and bytes left out past [`MAX_RUN_OUTPUT`].
    left_out: (u64, usize),
}

impl LogBatch {
    fn new(writer: SpoolWriter, run: String) -> Self {
        Self {
            writer,
            run,
            text: String::new(),
            last_sent: tokio::time::Instant::now() - LOG_PACE,
            output: 0,
            left_out: (0, 0),
        }
    }

    /// A line of the handler's own output: taken up to [`MAX_RUN_OUTPUT`], counted after.
    async fn output(&mut self, line: &str) {
        self.output += line.len() + 1;
        if self.output > MAX_RUN_OUTPUT {
            if self.left_out.0 == 0 {
                warn!(run = %self.run, "the handler's output passed {} MiB: the rest is not sent to Port", MAX_RUN_OUTPUT >> 20);
            }
            self.left_out.0 += 1;
            self.left_out.1 += line.len() + 1;
            return;
        }
        self.line(line).await;
    }

    /// Say how much output was left out, if any (once the handler is done).
    async fn close(&mut self) {
        let (lines, bytes) = std::mem::take(&mut self.left_out);
        if lines > 0 {
            self.line(&format!(
                "smee-relay: {lines} more output lines ({bytes} bytes) not sent: a run's log is capped at {} MiB",
                MAX_RUN_OUTPUT >> 20
            ))
            .await;
        }
    }

    async fn line(&mut self, line: &str) {
        if self.text.len() + line.len() + 1 > LOG_BATCH {
            self.send().await;
        }
        if !self.text.is_empty() {
            self.text.push('\n');
        }
        self.text.push_str(line);
    }

    /// Send what is collected if the pace allows.
    async fn tick(&mut self) {
        if !self.text.is_empty() && self.last_sent.elapsed() >= LOG_PACE {
            self.send().await;
        }
    }

    /// Queue the collected lines now (durably).
    async fn send(&mut self) {
        if let Some(report) = self.take() {
            let writes = vec![reports_append(vec![report])];
            while !commit(&self.writer, writes_clone(&writes)).await {}
            self.last_sent = tokio::time::Instant::now();
        }
    }

    fn take(&mut self) -> Option<Report> {
        (!self.text.is_empty()).then(|| Report::Log {
            run: self.run.clone(),
            message: std::mem::take(&mut self.text),
        })
    }
}

/// `Write` is not `Clone` (it shares its events); rebuild an append for a retry.
fn writes_clone(writes: &[Write]) -> Vec<Write> {
    writes
        .iter()
        .filter_map(|w| match w {
            Write::Append {
                channel,
                routes,
                events,
                cursor,
            } => Some(Write::Append {
                channel: channel.clone(),
                routes: routes.clone(),
                events: events.clone(),
                cursor: cursor.clone(),
            }),
            Write::State { key, value } => Some(Write::State {
                key: key.clone(),
                value: value.clone(),
            }),
            Write::Mark { .. } => None,
        })
        .collect()
}

/// What a handler said with `::port::` lines.
#[derive(Default)]
struct Said {
    finish: Finish,
}

impl Said {
    /// Apply a directive line; returns an entity to upsert, or a problem for the run log.
    /// `None`: the line is no directive, just output.
    fn apply(
        &mut self,
        line: &str,
        run: &str,
    ) -> Option<Result<Option<Report>, crate::error::Invalid>> {
        let directive = match parse_directive(line)? {
            Err(e) => {
                // The line itself is in the log just before this note.
                return Some(Err(format!(
                    "the line above is not a valid {} line ({e})",
                    super::DIRECTIVE
                )
                .into()));
            }
            Ok(d) => d,
        };
        if directive.summary.is_some() {
            self.finish.summary = directive.summary;
        }
        let links = match directive.link {
            Some(Links::One(link)) => vec![link],
            Some(Links::Many(links)) => links,
            None => Vec::new(),
        };
        let not_web = keep_web_links(&mut self.finish.link, links);
        if directive.status_label.is_some() {
            self.finish.status_label = directive.status_label;
        }
        if directive.external_run_id.is_some() {
            self.finish.external_run_id = directive.external_run_id;
        }
        if let Some(mut entity) = directive.entity {
            let Some(serde_json::Value::String(blueprint)) = entity.remove("blueprint") else {
                return Some(Err(
                    "the line above has an entity without \"blueprint\" (a string)".into(),
                ));
            };
            return Some(Ok(Some(Report::Entity {
                run: run.to_string(),
                blueprint,
                entity: serde_json::Value::Object(entity),
            })));
        }
        if not_web > 0 {
            return Some(Err(format!(
                "the line above has {} not http(s): not sent",
                crate::error::count(not_web, "link that is", "links that are")
            )
            .into()));
        }
        Some(Ok(None))
    }
}

/// Add the http(s) ones of `links` to `kept`; returns how many were not (`javascript:`,
/// `data:`, not a URL). Port shows a run's links as buttons its users click: only web links
/// go there, as only they go into Slack's buttons.
fn keep_web_links(kept: &mut Vec<String>, links: Vec<String>) -> usize {
    let (given, had) = (links.len(), kept.len());
    kept.extend(links.into_iter().filter(|link| {
        reqwest::Url::parse(link).is_ok_and(|url| matches!(url.scheme(), "http" | "https"))
    }));
    given - (kept.len() - had)
}

async fn execute(x: Execution) {
    let started = tokio::time::Instant::now();
    let mut logs = LogBatch::new(x.writer.clone(), x.run.run_id.clone());
    if let Some(note) = x.note {
        logs.line(note).await;
    }
    let outcome = match &x.spec.handler {
        Handler::Command(argv) => run_command(&x, argv, &mut logs).await,
        Handler::Forward { url, report } => run_forward(&x, url, report, &mut logs).await,
    };
    logs.close().await;
    let Some((status, summary, mut finish)) = outcome else {
        // Stopped: the run stays "running" for on_interrupt at the next start.
        logs.send().await;
        return;
    };
    metrics::histogram!("smee_relay_action_run_seconds", "action" => x.spec.name.clone())
        .record(started.elapsed().as_secs_f64());
    count_finished(
        &x.spec.name,
        match status {
            Terminal::Success => "success",
            Terminal::Failure if summary.starts_with(TIMED_OUT) => "timeout",
            Terminal::Failure => "failure",
        },
    );
    let took =
        humantime::format_duration(Duration::from_millis(started.elapsed().as_millis() as u64));
    let summary = summary.replace("{took}", &took.to_string());
    finish.summary = Some(match finish.summary.take() {
        Some(said) if status == Terminal::Success => said,
        Some(said) => format!("{said} ({summary})"),
        None => summary,
    });
    finish.status = Some(status);
    info!(run = %x.run.run_id, action = %x.spec.name, "action run: {status}: {}", finish.summary.as_deref().unwrap_or(""));
    let last = logs.take().into_iter().collect();
    finish_writes_commit(&x.writer, &x.run.run_id, &x.state, last, finish, &x.cancel).await;
}

/// Queue the last logs and the terminal status, and mark the run done, in one transaction.
async fn finish_writes_commit(
    writer: &SpoolWriter,
    run_id: &str,
    state: &RunState,
    mut reports: Vec<Report>,
    finish: Finish,
    cancel: &CancellationToken,
) {
    let status = finish.status.unwrap_or(Terminal::Failure);
    let summary = finish.summary.clone().unwrap_or_default();
    reports.push(Report::Finish {
        run: run_id.to_string(),
        finish,
    });
    let done = RunState {
        run_phase: RunPhase::Done { status, summary },
        process: None,
        ..state.clone()
    };
    let writes = vec![reports_append(reports), state_write(run_id, &done)];
    while !commit(writer, writes_clone(&writes)).await {
        if cancel.is_cancelled() {
            return;
        }
    }
}

/// Run a command: the body on stdin, each output line a log; exit status, timeout. `None`:
/// stopped by shutdown.
async fn run_command(
    x: &Execution,
    argv: &[String],
    logs: &mut LogBatch,
) -> Option<(Terminal, String, Finish)> {
    let mut command = tokio::process::Command::new(&argv[0]);
    command.args(&argv[1..]).env_clear();
    for var in ENV_ALLOW
        .iter()
        .map(|s| s.to_string())
        .chain(x.spec.env.iter().cloned())
    {
        if let Some(value) = std::env::var_os(&var) {
            command.env(var, value);
        }
    }
    command
        .env("PORT_RUN_ID", &x.run.run_id)
        .env("PORT_ACTION", x.run.action.as_deref().unwrap_or(""))
        .env("PORT_ENTITY", x.run.entity.as_deref().unwrap_or(""))
        .env("PORT_BLUEPRINT", x.run.blueprint.as_deref().unwrap_or(""))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        // Its own process group: a timeout kills the handler and whatever it started.
        .process_group(0)
        .kill_on_drop(true);
    let started = tokio::time::Instant::now();
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let message = format!("cannot start {}: {e}", argv[0]);
            logs.line(&message).await;
            return Some((Terminal::Failure, message, Finish::default()));
        }
    };
    let pid = child.id();
    // Stored, so that a relay killed meanwhile kills it at its next start (see `recover`).
    if let Some(process) = pid.and_then(HandlerProcess::of) {
        let running = RunState {
            process: Some(process),
            ..x.state.clone()
        };
        commit(&x.writer, vec![state_write(&x.run.run_id, &running)]).await;
    }
    if let Some(mut stdin) = child.stdin.take() {
        let body = x.body.clone();
        // A handler that does not read stdin closes it: that is not an error.
        tokio::spawn(async move {
            let _ = stdin.write_all(&body).await;
        });
    }
    let (lines_tx, mut lines) = mpsc::channel::<String>(256);
    if let Some(out) = child.stdout.take() {
        tokio::spawn(read_lines(tokio::io::BufReader::new(out), lines_tx.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(read_lines(tokio::io::BufReader::new(err), lines_tx.clone()));
    }
    drop(lines_tx);
    let kill_group = || {
        if let Some(pid) = pid {
            super::kill_group(pid);
        }
    };
    let mut said = Said::default();
    let mut tick = tokio::time::interval(LOG_PACE);
    let deadline = tokio::time::sleep(x.spec.timeout);
    tokio::pin!(deadline);
    let drain = tokio::time::sleep(Duration::MAX / 4);
    tokio::pin!(drain);
    let mut exited: Option<std::process::ExitStatus> = None;
    // The handler's own time, not the wait for its output after it (helper-143).
    let mut took = Duration::ZERO;
    let mut timed_out = false;
    let mut output_open = true;
    while output_open || exited.is_none() {
        tokio::select! {
            line = lines.recv(), if output_open => match line {
                Some(line) => match said.apply(&line, &x.run.run_id) {
                    None => logs.output(&line).await,
                    Some(Err(problem)) => {
                        logs.output(&line).await;
                        logs.line(&format!("smee-relay: {problem}")).await;
                    }
                    Some(Ok(Some(entity))) => {
                        logs.send().await;
                        let writes = vec![reports_append(vec![entity])];
                        while !commit(&x.writer, writes_clone(&writes)).await {}
                    }
                    Some(Ok(None)) => {}
                },
                None => output_open = false,
            },
            _ = tick.tick() => logs.tick().await,
            status = child.wait(), if exited.is_none() => {
                exited = Some(status.unwrap_or_else(|_| std::os::unix::process::ExitStatusExt::from_raw(1 << 8)));
                took = started.elapsed();
                drain.as_mut().reset(tokio::time::Instant::now() + DRAIN_GRACE);
            }
            _ = &mut deadline, if exited.is_none() && !timed_out => {
                timed_out = true;
                kill_group();
            }
            _ = &mut drain, if exited.is_some() => {
                logs.line("smee-relay: the handler exited but something it started still holds its output; not read further").await;
                kill_group();
                output_open = false;
            }
            _ = x.cancel.cancelled() => {
                kill_group();
                let _ = child.wait().await;
                warn!(run = %x.run.run_id, "stopping: the handler was killed; the run is settled at the next start (on_interrupt)");
                return None;
            }
        }
    }
    let status = exited.expect("the loop ends after exit");
    // What the handler left in its group ends with the run, as a CI job's leftovers do
    // (helper-143: a child that closed its output outlived the run); only one it moved out of
    // the group (`setsid`) goes on.
    kill_group();
    use std::os::unix::process::ExitStatusExt as _;
    let took = humantime::format_duration(Duration::from_millis(took.as_millis() as u64));
    Some(if timed_out {
        let limit = humantime::format_duration(x.spec.timeout);
        let message = format!("{TIMED_OUT} {limit}; process group killed");
        logs.line(&format!("smee-relay: {message}")).await;
        (Terminal::Failure, message, said.finish)
    } else if status.success() {
        (Terminal::Success, format!("exit 0 in {took}"), said.finish)
    } else if let Some(code) = status.code() {
        (
            Terminal::Failure,
            format!("exit code {code} after {took}"),
            said.finish,
        )
    } else {
        let signal = status.signal().unwrap_or(0);
        (
            Terminal::Failure,
            format!("killed by signal {signal} after {took}"),
            said.finish,
        )
    })
}

/// Read lines of at most [`MAX_LINE`] bytes (the rest of a longer line is dropped).
async fn read_lines(mut reader: impl AsyncBufRead + Unpin, lines: mpsc::Sender<String>) {
    let mut line = Vec::new();
    let mut cut = false;
    loop {
        let buf = match reader.fill_buf().await {
            Ok(buf) if !buf.is_empty() => buf,
            _ => break,
        };
        let end = memchr::memchr(b'\n', buf);
        let piece = &buf[..end.unwrap_or(buf.len())];
        let room = MAX_LINE.saturating_sub(line.len());
        cut |= piece.len() > room;
        line.extend_from_slice(&piece[..piece.len().min(room)]);
        let used = end.map_or(buf.len(), |i| i + 1);
        reader.consume(used);
        if end.is_some() {
            let mut text = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_string();
            if std::mem::take(&mut cut) {
                text.push_str(" [line cut]");
            }
            line.clear();
            if lines.send(text).await.is_err() {
                return;
            }
        }
    }
    if !line.is_empty() {
        let _ = lines
            .send(String::from_utf8_lossy(&line).into_owned())
            .await;
    }
}

/// POST the body to a local handler: 2xx SUCCESS, 4xx FAILURE at once, 5xx and network errors
/// retried until the retry age. `None`: stopped by shutdown.
async fn run_forward(
    x: &Execution,
    url: &reqwest::Url,
    mapping: &ReportMapping,
    logs: &mut LogBatch,
) -> Option<(Terminal, String, Finish)> {
    let client = match crate::http::client_builder()
        .no_proxy()
        .timeout(x.spec.timeout)
        .build()
    {
        Ok(client) => client,
        Err(e) => {
            return Some((
                Terminal::Failure,
                format!("cannot build an HTTP client: {e}"),
                Finish::default(),
            ));
        }
    };
    let mut backoff = x.retry.backoff.start();
    let mut attempts = 0u32;
    let shown = format!(
        "{}:{}{}",
        url.host_str().unwrap_or(""),
        url.port_or_known_default().unwrap_or(0),
        url.path()
    );
    loop {
        attempts += 1;
        let started = tokio::time::Instant::now();
        let sent = client
            .post(url.clone())
            .header("content-type", "application/json")
            .header("x-port-run-id", &x.run.run_id)
            .body(x.body.clone())
            .send();
        let answer = tokio::select! {
            answer = sent => answer,
            _ = x.cancel.cancelled() => return None,
        };
        let problem = match answer {
            Ok(response) => {
                let status = response.status();
                let headers: serde_json::Map<String, serde_json::Value> = response
                    .headers()
                    .iter()
                    .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.into())))
                    .collect();
                let body = response.bytes().await.unwrap_or_default();
                let ms = started.elapsed().as_millis();
                logs.line(&format!("POST {shown} -> {} in {ms} ms", status.as_u16()))
                    .await;
                let preview = String::from_utf8_lossy(&body[..body.len().min(4096)]).into_owned();
                if !preview.trim().is_empty() {
                    logs.line(&preview).await;
                }
                if status.is_success() || status.is_client_error() || !status.is_server_error() {
                    let default = if status.is_success() {
                        Terminal::Success
                    } else {
                        Terminal::Failure
                    };
                    let answer = Answer {
                        status: status.as_u16(),
                        headers,
                        body: &body,
                    };
                    return Some(map_answer(answer, &x.body, default, mapping, &x.jq, logs).await);
                }
                format!("handler answered {}", status.as_u16())
            }
            // No connection: nothing was sent, so trying again runs nothing twice.
            Err(e) if e.is_connect() => {
                let e = crate::error::chain(&e);
                logs.line(&format!("POST {shown} failed: {e}")).await;
                format!("cannot reach the handler: {e}")
            }
            // Sent, then no answer (the timeout, or the connection lost): the handler may be
            // running it. Sending it again could run it twice (a deploy, twice).
            Err(e) => {
                let why = if e.is_timeout() {
                    format!(
                        "no answer within the action's timeout ({})",
                        humantime::format_duration(x.spec.timeout)
                    )
                } else {
                    format!("no answer: {}", crate::error::chain(&e))
                };
                logs.line(&format!("POST {shown}: {why}")).await;
                return Some((
                    Terminal::Failure,
                    // Port's user reads this: what happened, not how to code a handler.
                    format!(
                        "{why}; the handler got the run and may still be working on it: not sent again, so that it does not run twice"
                    ),
                    Finish::default(),
                ));
            }
        };
        let age = crate::spool::age(x.received_ms);
        if age > x.retry.max_age {
            return Some((
                Terminal::Failure,
                format!(
                    "{problem}; gave up after {} over {}",
                    crate::error::count(attempts as usize, "attempt", "attempts"),
                    humantime::format_duration(Duration::from_secs(age.as_secs()))
                ),
                Finish::default(),
            ));
        }
        let delay = backoff.next_delay();
        logs.line(&format!(
            "smee-relay: {problem}; retrying in {}",
            humantime::format_duration(Duration::from_millis(delay.as_millis() as u64))
        ))
        .await;
        logs.tick().await;
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = x.cancel.cancelled() => return None,
        }
    }
}

/// A forward handler's answer.
struct Answer<'a> {
    status: u16,
    headers: serde_json::Map<String, serde_json::Value>,
    body: &'a [u8],
}

/// The report for a handler's answer: by status, or by the jq mappings over the context
/// port-agent's `report` mappings see: `{"body": run body, "request": {"body": run body},
/// "response": {"statusCode", "headers", "text", "json"}}`.
async fn map_answer(
    answer: Answer<'_>,
    request: &[u8],
    default: Terminal,
    mapping: &ReportMapping,
    jq: &crate::pipeline::jq::JqEngine,
    logs: &mut LogBatch,
) -> (Terminal, String, Finish) {
    let status = answer.status;
    let run_body: serde_json::Value = serde_json::from_slice(request).unwrap_or_default();
    let input = serde_json::json!({
        "body": run_body,
        "request": {"body": run_body},
        "response": {
            "statusCode": status,
            "headers": answer.headers,
            "text": String::from_utf8_lossy(answer.body),
            "json": serde_json::from_slice::<serde_json::Value>(answer.body).ok(),
        },
    });
    // In the jq worker, within the `[jq]` time and memory bounds (a mapping that loops or
    // grows without end fails this report, never the daemon), off the async workers.
    let (status_out, summary_out, link_out) = {
        let (jq, mapping) = (jq.clone(), mapping.clone());
        let evaluated = tokio::task::spawn_blocking(move || {
            let run = |expr: &Option<crate::pipeline::jq::JqCondition>| {
                expr.as_ref().map(|e| jq.output(e, &input))
            };
            (
                run(&mapping.status),
                run(&mapping.summary),
                run(&mapping.link),
            )
        })
        .await;
        match evaluated {
            Ok(outputs) => outputs,
            Err(e) => {
                let failed = || {
                    Some(Err(crate::pipeline::jq::JqFailure::Worker(
                        std::io::Error::other(e.to_string()),
                    )))
                };
                (failed(), failed(), failed())
            }
        }
    };
    let mut finish = Finish::default();
    let mut terminal = default;
    let mut problems = Vec::new();
    let mut failed = Vec::new();
    if let Some(output) = status_out {
        match output {
            Ok(serde_json::Value::String(s)) if s.eq_ignore_ascii_case("SUCCESS") => {
                terminal = Terminal::Success
            }
            Ok(serde_json::Value::String(s)) if s.eq_ignore_ascii_case("FAILURE") => {
                terminal = Terminal::Failure
            }
            Ok(other) => problems.push(format!(
                "report.status gave {other}, not \"SUCCESS\" or \"FAILURE\""
            )),
            Err(e) => failed.push(("status", e)),
        }
    }
    if let Some(output) = summary_out {
        match output {
            Ok(serde_json::Value::String(s)) => finish.summary = Some(s),
            Ok(serde_json::Value::Null) => {}
            Ok(other) => finish.summary = Some(other.to_string()),
            Err(e) => failed.push(("summary", e)),
        }
    }
    if let Some(output) = link_out {
        match output {
            Ok(serde_json::Value::String(s)) => {
                if keep_web_links(&mut finish.link, vec![s]) > 0 {
                    problems.push("report.link gave a link that is not http(s): not sent".into());
                }
            }
            Ok(serde_json::Value::Array(items)) => {
                let links = (items.into_iter())
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect();
                let not_web = keep_web_links(&mut finish.link, links);
                if not_web > 0 {
                    problems.push(format!(
                        "report.link gave {} not http(s): not sent",
                        crate::error::count(not_web, "link that is", "links that are")
                    ));
                }
            }
            Ok(serde_json::Value::Null) => {}
            Ok(other) => problems.push(format!("report.link gave {other}, not a string or a list")),
            Err(e) => failed.push(("link", e)),
        }
    }
    // A mapping that went past a bound (it loops, grows or yields a huge value) fails the run
    // with the reason: its report cannot be trusted. A plain jq error is noted in the run's log.
    let mut past_bounds = Vec::new();
    for (field, e) in failed {
        let said = format!("[action.report] {field}: {e}");
        if matches!(e.kind(), "timeout" | "bound" | "output" | "worker") {
            past_bounds.push(said.clone());
        }
        problems.push(said);
    }
    if !past_bounds.is_empty() {
        metrics::counter!("smee_relay_action_report_errors_total", "kind" => "mapping")
            .increment(past_bounds.len() as u64);
        warn!(run = %logs.run, "{}", past_bounds.join("; "));
        terminal = Terminal::Failure;
        finish.summary = Some(format!("report mapping failed: {}", past_bounds.join("; ")));
    }
    for p in problems {
        logs.line(&format!("smee-relay: {p}")).await;
    }
    (
        terminal,
        format!("handler answered {status} in {{took}}"),
        finish,
    )
}

/// The writes that end a run that never executed (an Automation run, or one whose `when`
/// failed): its terminal status queued for Port, and its state, done. With the phase stored.
fn finished(run_id: &str, action: &str, event: u64, finish: Finish) -> (RunPhase, Vec<Write>) {
    let state = RunState {
        action: action.into(),
        event,
        started_ms: crate::clock::now_ms(),
        run_phase: RunPhase::Done {
            status: finish.status.unwrap_or(Terminal::Failure),
            summary: finish.summary.clone().unwrap_or_default(),
        },
        process: None,
    };
    let report = Report::Finish {
        run: run_id.to_string(),
        finish,
    };
    let writes = vec![reports_append(vec![report]), state_write(run_id, &state)];
    (state.run_phase, writes)
}

fn reports_append(reports: Vec<Report>) -> Write {
    Write::Append {
        channel: ACTIONS_ROUTE.into(),
        routes: vec![REPORT_ROUTE.into()],
        events: reports
            .iter()
            .map(Report::to_event)
            .collect::<Vec<_>>()
            .into(),
        cursor: None,
    }
}

fn state_write(run_id: &str, state: &RunState) -> Write {
    Write::State {
        key: state_key(run_id),
        value: Some(serde_json::to_vec(state).expect("a run state serialises")),
    }
}

/// Commit and wait; false (logged, after a pause) if it failed.
async fn commit(writer: &SpoolWriter, writes: Vec<Write>) -> bool {
    match writer.commit(writes).await {
        Ok(appended) => {
            if appended.iter().flatten().any(Option::is_none) {
                error!("spool full: a report for Port was refused");
            }
            true
        }
        Err(e) => {
            error!("actions cannot commit, retrying in 1s: {e}");
            tokio::time::sleep(Duration::from_secs(1)).await;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{PIPELINE_ROUTE, Pipeline};
    use crate::spool::Limits;

    const SECRET: &str = "automation-secret";

    fn signed(body: Vec<u8>) -> crate::event::Event {
        use base64::Engine as _;
        use hmac::{KeyInit as _, Mac as _};
        let timestamp = (crate::clock::now_ms() / 1000).to_string();
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(&body);
        let signature = format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        );
        crate::event::Event {
            headers: vec![
                ("x-port-timestamp".into(), timestamp),
                ("x-port-signature".into(), signature),
            ],
            body: body.into(),
            ..Default::default()
        }
    }

    /// Bug: the outcome of an Automation run was found by scanning the 256 spool ids after
    /// its event for the alerts it produced. With more than 256 events stored between an
    /// event and its evaluation (a backlog, a busy channel), the alert was out of reach and
    /// the run was reported "no rule matched". The pipeline now records its verdict in the
    /// commit that settles the event, and the report says exactly that.
    #[tokio::test]
    async fn automation_outcome_is_right_with_more_than_256_interleaved_events() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let (writer, thread) = SpoolWriter::start(spool.clone(), Limits { max_bytes: 1 << 30 });
        let verifier =
            crate::pipeline::signature::Verifier::new(SECRET.into(), Duration::from_secs(300));
        let pipeline = Pipeline {
            rules: crate::pipeline::tests::fixture_rules(),
            verifier: Some(verifier.clone()),
            app_url: "https://app.getport.io".into(),
            jq: crate::pipeline::jq::JqEngine::here(),
            record_verdicts: true,
        };
        let actions = Actions {
            actions: vec![],
            verifier: Some(verifier),
            retry: RetryPolicy::DEFAULT,
            automation_runs: Some("stdout".into()),
            jq: crate::pipeline::jq::JqEngine::here(),
        };
        // The nine Automation events of the fixtures, each followed by 40 other events (not
        // Port's): 369 events, all stored before anything is evaluated.
        let fixtures = [
            ("01-create", "no alert: no rule's state changed"),
            ("02-cpu-25-to-87", "cpu-high FIRING queued for stdout"),
            ("03-cpu-87-to-91", "no alert: no rule's state changed"),
            (
                "04-health-healthy-to-degraded",
                "unhealthy FIRING queued for stdout",
            ),
            ("05-cpu-91-to-75", "no alert: no rule's state changed"),
            ("06-cpu-75-to-60", "cpu-high RESOLVED queued for stdout"),
            (
                "07-health-degraded-to-healthy",
                "unhealthy RESOLVED queued for stdout",
            ),
            ("08-cpu-60-to-95", "cpu-high FIRING queued for stdout"),
            ("09-delete", "cpu-high RESOLVED queued for stdout"),
        ];
        let mut events = Vec::new();
        for (name, _) in fixtures {
            let body = std::fs::read(format!(
                "{}/tests/fixtures/port/deployment-config/automation/{name}.json",
                env!("CARGO_MANIFEST_DIR")
            ))
            .unwrap();
            events.push(signed(body));
            for n in 0..40 {
                events.push(crate::event::Event {
                    body: format!("{{\"other\": {n}}}").into_bytes().into(),
                    ..Default::default()
                });
            }
        }
        assert!(events.len() > 256);
        let routes = [PIPELINE_ROUTE.to_string(), ACTIONS_ROUTE.to_string()];
        writer
            .append("c", &routes, events.into(), None)
            .await
            .unwrap();
        let cancel = CancellationToken::new();
        let (_rules, rules_rx) = watch::channel(Arc::new(pipeline));
        let (_actions, actions_rx) = watch::channel(Arc::new(actions));
        let tasks = [
            tokio::spawn(crate::pipeline::runner::run(
                spool.clone(),
                writer.clone(),
                rules_rx,
                None,
                cancel.clone(),
            )),
            tokio::spawn(run(
                spool.clone(),
                writer.clone(),
                actions_rx,
                cancel.clone(),
            )),
        ];
        let finishes = || -> Vec<(String, Finish)> {
            spool
                .pending(REPORT_ROUTE, 0, 100)
                .unwrap()
                .into_iter()
                .filter_map(|q| match serde_json::from_slice(&q.event.event.body) {
                    Ok(Report::Finish { run, finish }) => Some((run, finish)),
                    _ => None,
                })
                .collect()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while finishes().len() < fixtures.len() {
            assert!(
                std::time::Instant::now() < deadline,
                "waited in vain for the reports: {:?}",
                finishes()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let got = finishes();
        for (n, (name, summary)) in fixtures.iter().enumerate() {
            let run = format!("r_fixture{n:02}");
            let (_, finish) = got
                .iter()
                .find(|(r, _)| *r == run)
                .unwrap_or_else(|| panic!("no report for {run} ({name}): {got:?}"));
            assert_eq!(finish.status, Some(Terminal::Success), "{name}");
            assert_eq!(finish.summary.as_deref(), Some(*summary), "{name}");
        }
        // Each verdict was read and removed with its report: nothing is left behind.
        let left: Vec<String> = spool
            .states()
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| k.contains("verdict"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        cancel.cancel();
        for task in tasks {
            task.await.unwrap();
        }
        drop(writer);
        thread.join().unwrap();
    }
}
