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

use tokio::sync::{mpsc, watch};
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

/// Run `plan` until `cancel` fires. Each plan received on `reloads` replaces the running one
/// (SIGHUP): channels that stay keep their connection, targets and rules are swapped in place.
pub async fn run(
    plan: Plan,
    mut reloads: mpsc::Receiver<Plan>,
    cancel: CancellationToken,
) -> Result<(), RelayError> {
    std::fs::create_dir_all(&plan.state_dir).map_err(|source| spool::SpoolError::StateDir {
        path: plan.state_dir.clone(),
        source,
    })?;
    let spool = Arc::new(Spool::open(&plan.state_dir)?);
    info!(spool = %spool.path().display(), "spool open");
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
        let bound = listener
            .local_addr()
            .map_err(|e| RelayError::Listen(addr, e))?;
        info!(addr = %bound, "serving /healthz and /metrics");
        tokio::spawn(telemetry::serve(
            listener,
            health.clone(),
            handle,
            cancel.clone(),
        ));
    }
    let mut runtime = Runtime {
        spool: spool.clone(),
        writer,
        counters: Arc::new(Counters::default()),
        health: health.clone(),
        cancel: cancel.clone(),
        state_dir: plan.state_dir.clone(),
        routes: HashMap::new(),
        channels: HashMap::new(),
        pipeline: None,
    };
    let retain = plan.retain;
    runtime.apply(plan)?;
    let background = [
        tokio::spawn(dispatch::prune_periodically(
            spool.clone(),
            retain,
            cancel.clone(),
        )),
        tokio::spawn(report_status(
            spool.clone(),
            health,
            runtime.counters.clone(),
            cancel.clone(),
        )),
    ];
    service::notify(&[sd_notify::NotifyState::Ready]);
    service::spawn_watchdog(cancel.clone());

    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(plan) = reloads.recv() => {
                service::notify(&[sd_notify::NotifyState::Reloading]);
                match runtime.apply(plan) {
                    Ok(()) => info!("config reloaded"),
                    Err(e) => error!("config reload incomplete: {e}"),
                }
                service::notify(&[sd_notify::NotifyState::Ready]);
            }
        }
    }
    // Sources stop at once; intakes then store what they took; routes finish what is in flight.
    let Runtime {
        writer,
        routes,
        channels,
        pipeline,
        ..
    } = runtime;
    for channel in channels.into_values() {
        channel.stop().await;
    }
    for route in routes.into_values() {
        route.stop().await;
    }
    if let Some(pipeline) = pipeline {
        pipeline.task.stop().await;
        pipeline.alerts.stop().await;
    }
    for task in background {
        let _ = task.await;
    }
    drop(writer);
    let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
    Ok(())
}

/// A task that can be stopped on its own.
struct Task {
    cancel: CancellationToken,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Task {
    async fn stop(self) {
        self.cancel.cancel();
        for handle in self.handles {
            let _ = handle.await;
        }
    }
}

/// A subscribed channel: its source and intake, and the routes its events go to.
struct ChannelTask {
    task: Task,
    /// What the channel was started with: a change of these restarts it.
    idle_timeout: Duration,
    routes: watch::Sender<Vec<String>>,
    /// Liveness, for `/healthz`.
    status: Arc<telemetry::ChannelStatus>,
    /// Held while the channel runs.
    _lock: spool::ChannelLock,
}

impl ChannelTask {
    async fn stop(self) {
        self.task.stop().await;
    }
}

struct PipelineTask {
    task: Task,
    rules: watch::Sender<Arc<Pipeline>>,
    alerts: Task,
}

/// The running parts, keyed so a reload can tell what stays, what goes and what is new.
struct Runtime {
    spool: Arc<Spool>,
    writer: SpoolWriter,
    counters: Arc<Counters>,
    health: Arc<Health>,
    cancel: CancellationToken,
    state_dir: PathBuf,
    /// One delivery route per target URL.
    routes: HashMap<String, Task>,
    /// Keyed by the full channel URL.
    channels: HashMap<String, ChannelTask>,
    pipeline: Option<PipelineTask>,
}

impl Runtime {
    /// Make the running parts match `plan`.
    fn apply(&mut self, plan: Plan) -> Result<(), RelayError> {
        if plan.state_dir != self.state_dir {
            warn!("state_dir changed; that takes a restart, the running spool stays");
        }
        // Routes: one per distinct target.
        let targets: BTreeSet<String> = plan
            .channels
            .iter()
            .flat_map(|c| c.forward.iter().map(|t| t.to_string()))
            .collect();
        for gone in self
            .routes
            .keys()
            .filter(|t| !targets.contains(*t))
            .cloned()
            .collect::<Vec<_>>()
        {
            info!(target = %gone, "target removed; its queued events stay in the spool");
            let task = self.routes.remove(&gone).expect("listed");
            tokio::spawn(task.stop());
        }
        for target in targets {
            if self.routes.contains_key(&target) {
                continue;
            }
            let target_url: TargetUrl = target.parse().expect("it was a TargetUrl");
            let forwarder = Forwarder::new(target_url, plan.target_timeout)?;
            let task = self.route(target.clone(), Arc::new(forwarder), plan.retry);
            self.routes.insert(target, task);
        }

        // The pipeline and its alert route.
        match (plan.pipeline, self.pipeline.take()) {
            (None, None) => {}
            (None, Some(old)) => {
                info!("pipeline off");
                tokio::spawn(async move {
                    old.task.stop().await;
                    old.alerts.stop().await;
                });
            }
            (Some((pipeline, sink)), old) => {
                let sink: Arc<dyn Sink> = Arc::new(sink);
                info!(rules = pipeline.rules.len(), alerts = %sink.describe(), "pipeline on");
                let alerts = self.route(ALERT_ROUTE.to_string(), sink, plan.retry);
                let pipeline = Arc::new(pipeline);
                let (task, rules) = match old {
                    Some(old) => {
                        tokio::spawn(old.alerts.stop());
                        let _ = old.rules.send(pipeline);
                        (old.task, old.rules)
                    }
                    None => {
                        let (rules, rules_rx) = watch::channel(pipeline);
                        let cancel = self.cancel.child_token();
                        let handle = tokio::spawn(run_pipeline(
                            self.spool.clone(),
                            self.writer.clone(),
                            rules_rx,
                            cancel.clone(),
                        ));
                        (
                            Task {
                                cancel,
                                handles: vec![handle],
                            },
                            rules,
                        )
                    }
                };
                self.pipeline = Some(PipelineTask {
                    task,
                    rules,
                    alerts,
                });
            }
        }

        // Channels: keep those that stay, stop those that go, start the new ones.
        let mut wanted: HashMap<String, ChannelPlan> = plan
            .channels
            .into_iter()
            .map(|c| (c.source.channel.expose().to_string(), c))
            .collect();
        for key in self.channels.keys().cloned().collect::<Vec<_>>() {
            let stays = wanted
                .get(&key)
                .is_some_and(|c| c.source.idle_timeout == self.channels[&key].idle_timeout);
            if !stays {
                let old = self.channels.remove(&key).expect("listed");
                tokio::spawn(old.stop());
            }
        }
        for (key, channel) in wanted.drain() {
            let routes = routes_of(&channel);
            if let Some(running) = self.channels.get(&key) {
                running.routes.send_replace(routes);
                continue;
            }
            let url = channel.source.channel.clone();
            let lock = spool::ChannelLock::acquire(
                &self.state_dir,
                url.expose().as_str(),
                &url.to_string(),
            )?;
            info!(channel = %url, routes = ?routes, "subscribing");
            // Resume after the last event stored, for servers that replay (smee-relay serve).
            let cursor_key = spool::channel_key(url.expose().as_str());
            let mut source_config = channel.source.clone();
            if let Some(stored) = self.spool.cursor(&cursor_key)? {
                source_config.last_event_id = Some(stored);
            }
            let source = source_config.build()?;
            let status = source.status();
            let (routes_tx, routes_rx) = watch::channel(routes);
            let (events_tx, events_rx) = mpsc::channel(QUEUE_DEPTH);
            let cancel = self.cancel.child_token();
            let handles = vec![
                tokio::spawn(source.run(events_tx, cancel.clone())),
                tokio::spawn(dispatch::intake(
                    events_rx,
                    self.writer.clone(),
                    url.to_string(),
                    Some(cursor_key),
                    routes_rx,
                    self.counters.clone(),
                )),
            ];
            self.channels.insert(
                key,
                ChannelTask {
                    task: Task { cancel, handles },
                    idle_timeout: channel.source.idle_timeout,
                    routes: routes_tx,
                    status,
                    _lock: lock,
                },
            );
        }
        *self.health.channels.lock().expect("not poisoned") =
            self.channels.values().map(|c| c.status.clone()).collect();
        Ok(())
    }

    fn route(&self, name: String, sink: Arc<dyn Sink>, retry: RetryPolicy) -> Task {
        let cancel = self.cancel.child_token();
        let handle = tokio::spawn(dispatch::run_route(
            self.spool.clone(),
            self.writer.clone(),
            name,
            sink,
            retry,
            self.counters.clone(),
            cancel.clone(),
        ));
        Task {
            cancel,
            handles: vec![handle],
        }
    }
}

/// The spool routes a channel's events are queued on.
fn routes_of(channel: &ChannelPlan) -> Vec<String> {
    let mut routes: Vec<String> = channel.forward.iter().map(|t| t.to_string()).collect();
    if channel.pipeline {
        routes.push(PIPELINE_ROUTE.to_string());
    }
    routes
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
        let task = tokio::spawn(run_pipeline(
            spool.clone(),
            writer.clone(),
            rules_rx,
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
