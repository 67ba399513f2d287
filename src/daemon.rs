//! The runtime every mode shares: channels in, spool, routes out.
//!
//! ```text
//! channel --SSE--> source --> intake --append--> spool --+--> route (per target) --> HTTP
//!                                                        +--> pipeline --alerts--> spool --> route "alerts" --> Slack/stdout
//! ```
//!
//! `forward` is a plan with one channel and one target; `run --config` is a plan from the
//! config file. Shutdown runs the pipe dry from the front: sources stop, intakes store what they
//! took, routes finish the delivery in flight, the writer commits the last marks.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::dispatch::{self, Counters, RetryPolicy, Sink, SpoolWriter};
use crate::forward::Forwarder;
use crate::notify::{self, ALERT_ROUTE, AlertSink};
use crate::pipeline::{AlertState, Evaluation, Pipeline};
use crate::relay::RelayError;
use crate::service;
use crate::source::SourceConfig;
use crate::spool::{self, Limits, Outcome, Spool, Write};
use crate::telemetry::{self, Health};
use crate::url::TargetUrl;

/// The route name the pipeline reads its events from.
pub const PIPELINE_ROUTE: &str = "pipeline";

/// Events received but not yet stored; beyond this a source waits (backpressure).
const QUEUE_DEPTH: usize = 8192;

/// One channel and where its events go.
#[derive(Clone, Debug)]
pub struct ChannelPlan {
    pub source: SourceConfig,
    pub forward: Vec<TargetUrl>,
    /// Whether the pipeline evaluates this channel's events.
    pub pipeline: bool,
}

/// Everything the runtime needs.
pub struct Plan {
    pub channels: Vec<ChannelPlan>,
    /// The pipeline and where its alerts go, if any channel uses it.
    pub pipeline: Option<(Pipeline, AlertSink)>,
    pub state_dir: PathBuf,
    pub target_timeout: Duration,
    pub retry: RetryPolicy,
    pub retain: Duration,
    pub limits: Limits,
    /// Where to serve `/healthz` and `/metrics`, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Run `plan` until `cancel` fires.
pub async fn run(plan: Plan, cancel: CancellationToken) -> Result<(), RelayError> {
    std::fs::create_dir_all(&plan.state_dir).map_err(|source| spool::SpoolError::StateDir {
        path: plan.state_dir.clone(),
        source,
    })?;
    let mut locks = Vec::new();
    for channel in &plan.channels {
        let url = &channel.source.channel;
        locks.push(spool::ChannelLock::acquire(
            &plan.state_dir,
            url.expose().as_str(),
            &url.to_string(),
        )?);
    }
    let spool = Arc::new(Spool::open(&plan.state_dir)?);
    info!(spool = %spool.path().display(), "spool open");

    let counters = Arc::new(Counters::default());
    let (writer, writer_thread) = SpoolWriter::start(spool.clone(), plan.limits);
    let health = Arc::new(Health {
        channels: Default::default(),
        spool_writable: writer.writable(),
    });
    if let Some(addr) = plan.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| RelayError::Listen(addr, e))?;
        let handle = telemetry::install_metrics().map_err(RelayError::Metrics)?;
        info!(%addr, "serving /healthz and /metrics");
        tasks_spawn_serve(listener, health.clone(), handle, cancel.clone());
    }
    let mut tasks = tokio::task::JoinSet::new();
    let mut front = tokio::task::JoinSet::new();

    // Routes: one per distinct target, plus the pipeline and its alerts.
    let targets: BTreeSet<String> = plan
        .channels
        .iter()
        .flat_map(|c| c.forward.iter().map(|t| t.to_string()))
        .collect();
    for target in &targets {
        let target_url: TargetUrl = target.parse().expect("it was a TargetUrl");
        let forwarder = Forwarder::new(target_url, plan.target_timeout)?;
        tasks.spawn(dispatch::run_route(
            spool.clone(),
            writer.clone(),
            target.clone(),
            Arc::new(forwarder),
            plan.retry,
            counters.clone(),
            cancel.clone(),
        ));
    }
    if let Some((pipeline, sink)) = plan.pipeline {
        let sink: Arc<dyn Sink> = Arc::new(sink);
        info!(rules = pipeline.rules.len(), alerts = %sink.describe(), "pipeline on");
        tasks.spawn(run_pipeline(
            spool.clone(),
            writer.clone(),
            pipeline,
            cancel.clone(),
        ));
        tasks.spawn(dispatch::run_route(
            spool.clone(),
            writer.clone(),
            ALERT_ROUTE.to_string(),
            sink,
            plan.retry,
            counters.clone(),
            cancel.clone(),
        ));
    }

    // Channels: a source and an intake each.
    for channel in plan.channels {
        let mut routes: Vec<String> = channel.forward.iter().map(|t| t.to_string()).collect();
        if channel.pipeline {
            routes.push(PIPELINE_ROUTE.to_string());
        }
        info!(channel = %channel.source.channel, routes = ?routes, "subscribing");
        let shown = channel.source.channel.to_string();
        let source = channel.source.build()?;
        health
            .channels
            .lock()
            .expect("not poisoned")
            .push(source.status());
        let (events_tx, events_rx) = mpsc::channel(QUEUE_DEPTH);
        front.spawn(source.run(events_tx, cancel.clone()));
        front.spawn(dispatch::intake(
            events_rx,
            writer.clone(),
            shown,
            routes,
            counters.clone(),
        ));
    }
    tasks.spawn(dispatch::prune_periodically(
        spool.clone(),
        plan.retain,
        cancel.clone(),
    ));
    tasks.spawn(report_status(
        spool.clone(),
        health.clone(),
        counters.clone(),
        cancel.clone(),
    ));
    service::notify(&[sd_notify::NotifyState::Ready]);
    service::spawn_watchdog(cancel.clone());

    cancel.cancelled().await;
    // Sources stop at once; intakes then store what they took and end.
    while front.join_next().await.is_some() {}
    while tasks.join_next().await.is_some() {}
    drop(writer);
    let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
    drop(locks);
    Ok(())
}

fn tasks_spawn_serve(
    listener: tokio::net::TcpListener,
    health: Arc<Health>,
    handle: metrics_exporter_prometheus::PrometheusHandle,
    cancel: CancellationToken,
) {
    tokio::spawn(telemetry::serve(listener, health, handle, cancel));
}

/// Every few seconds: spool gauges for `/metrics`, and a status line for `systemctl status`.
async fn report_status(
    spool: Arc<Spool>,
    health: Arc<Health>,
    counters: Arc<Counters>,
    cancel: CancellationToken,
) {
    use std::sync::atomic::Ordering::Relaxed;
    loop {
        let stats = {
            let spool = spool.clone();
            tokio::task::spawn_blocking(move || spool.stats()).await
        };
        if let Ok(Ok(stats)) = stats {
            metrics::gauge!("smee_relay_spool_pending").set(stats.pending as f64);
            metrics::gauge!("smee_relay_spool_bytes").set(stats.stored_bytes as f64);
            let (up, all) = {
                let channels = health.channels.lock().expect("not poisoned");
                let up = channels
                    .iter()
                    .filter(|c| c.connected.load(Relaxed))
                    .count();
                (up, channels.len())
            };
            let line = format!(
                "{up}/{all} channels connected; {} received, {} delivered, {} retried, {} dead; {} pending",
                counters.received.load(Relaxed),
                counters.delivered.load(Relaxed),
                counters.retried.load(Relaxed),
                counters.dead.load(Relaxed),
                stats.pending,
            );
            service::notify(&[sd_notify::NotifyState::Status(&line)]);
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

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
            wall_at_start: spool::now_ms(),
            started: tokio::time::Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.wall_at_start + self.started.elapsed().as_millis() as u64
    }
}

/// Evaluate the pipeline route's events in order; fire held alerts when their time comes.
/// Each event's new alert states, its alerts and its mark are committed together.
async fn run_pipeline(
    spool: Arc<Spool>,
    writer: SpoolWriter,
    pipeline: Pipeline,
    cancel: CancellationToken,
) {
    let clock = Clock::new();
    let mut states = load_states(&spool);
    // One warning per (rule, entity, reason), not one per event.
    let mut warned: HashSet<(String, String, String)> = HashSet::new();
    let mut appended = writer.appended();
    let mut cursor = 0;
    while !cancel.is_cancelled() {
        // Held alerts whose time has come.
        let matured = pipeline.mature(states.iter(), clock.now_ms());
        if !matured.is_empty() {
            let mut writes = Vec::new();
            let mut alerts = Vec::new();
            for (key, state, alert) in &matured {
                writes.push(state_write(key, state));
                alerts.push(notify::to_event(alert));
            }
            writes.push(alert_append(alerts));
            if commit(&writer, writes).await {
                for (key, state, alert) in matured {
                    info!(rule = %alert.rule, entity = %alert.entity, "{}", notify::headline(&alert));
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
                        writes.push(alert_append(alerts.iter().map(notify::to_event).collect()));
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
                info!(event = id, rule = %alert.rule, entity = %alert.entity, "{}", notify::headline(alert));
                count_alert(alert);
            }
            states.extend(new_states);
            cursor = item.seq;
        }
    }
}

fn count_alert(alert: &crate::pipeline::Alert) {
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
        events: alerts,
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
            .append("c", &[PIPELINE_ROUTE.to_string()], vec![event])
            .await
            .unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run_pipeline(
            spool.clone(),
            writer.clone(),
            pipeline,
            cancel.clone(),
        ));
        let alerts = || spool.pending(ALERT_ROUTE, 0, 10).unwrap();
        // Waits in real time (the writer is a thread); blocking tasks also keep the paused
        // clock from jumping ahead meanwhile.
        let settle =
            || tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(50)));
        while !spool.pending(PIPELINE_ROUTE, 0, 10).unwrap().is_empty() {
            settle().await.unwrap();
        }
        assert!(alerts().is_empty(), "held: nothing yet");
        tokio::time::sleep(Duration::from_secs(4 * 60)).await;
        assert!(alerts().is_empty(), "still held after 4 minutes");
        tokio::time::sleep(Duration::from_secs(61)).await;
        for _ in 0..100 {
            if !alerts().is_empty() {
                break;
            }
            settle().await.unwrap();
        }
        let sent = alerts();
        assert_eq!(sent.len(), 1, "fired once the 5 minutes were over");
        let alert: crate::pipeline::Alert =
            serde_json::from_slice(&sent[0].event.event.body).unwrap();
        assert_eq!(alert.note.as_deref(), Some("held for 5m"));
        cancel.cancel();
        task.await.unwrap();
        drop(writer);
        thread.join().unwrap();
    }
}
