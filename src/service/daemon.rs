//! The runtime every mode shares: channels in, spool, routes out.
//!
//! ```text
//! channel --SSE--> source --> intake --append--> spool --+--> route (per channel and target) --> HTTP
//!                                                        +--> pipeline --alerts--> spool --> route "alerts" --> Slack/stdout
//! ```
//!
//! `forward` is a plan with one channel and one target; `run --config` is a plan from the
//! config file. Shutdown runs the pipe dry from the front: sources stop, intakes store what they
//! took, routes finish the delivery in flight, the writer commits the last marks.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::health::{self, Health};
use super::systemd;
use crate::counters::Counters;
use crate::delivery::forward::Forwarder;
use crate::delivery::{self, RetryPolicy, Sink};
use crate::notify::AlertSink;
use crate::pipeline::{ALERT_ROUTE, PIPELINE_ROUTE, Pipeline, runner};
use crate::source::status::ChannelStatus;
use crate::source::{SourceConfig, SourceError};
use crate::spool::lock::ChannelLock;
use crate::spool::writer::SpoolWriter;
use crate::spool::{self, Limits, Spool, SpoolError};
use crate::url::TargetUrl;

/// Errors that stop the daemon from starting (or a reload from taking effect).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("cannot build the HTTP client for a target")]
    Target(#[source] reqwest::Error),
    #[error("cannot listen on {0} for /healthz and /metrics")]
    Listen(std::net::SocketAddr, #[source] std::io::Error),
    #[error("cannot start metrics")]
    Metrics(#[source] metrics_exporter_prometheus::BuildError),
}

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
) -> Result<(), DaemonError> {
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
            .map_err(|e| DaemonError::Listen(addr, e))?;
        let handle = health::install_metrics().map_err(DaemonError::Metrics)?;
        let bound = listener
            .local_addr()
            .map_err(|e| DaemonError::Listen(addr, e))?;
        info!(addr = %bound, "serving /healthz and /metrics");
        tokio::spawn(health::serve(
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
        tokio::spawn(spool::intake::prune_periodically(
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
    systemd::notify(&[sd_notify::NotifyState::Ready]);
    systemd::spawn_watchdog(cancel.clone());

    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(plan) = reloads.recv() => {
                systemd::notify(&[sd_notify::NotifyState::Reloading]);
                match runtime.apply(plan) {
                    Ok(()) => info!("config reloaded"),
                    Err(e) => error!("config reload incomplete: {e}"),
                }
                systemd::notify(&[sd_notify::NotifyState::Ready]);
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
    status: Arc<ChannelStatus>,
    /// Held while the channel runs.
    _lock: ChannelLock,
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
    /// One pipeline per state dir: its alert state and queues are the state dir's.
    _lock: Arc<ChannelLock>,
}

/// The running parts, keyed so a reload can tell what stays, what goes and what is new.
struct Runtime {
    spool: Arc<Spool>,
    writer: SpoolWriter,
    counters: Arc<Counters>,
    health: Arc<Health>,
    cancel: CancellationToken,
    state_dir: PathBuf,
    /// One delivery route per (channel, target), by [`spool::route_key`].
    routes: HashMap<String, Task>,
    /// Keyed by the full channel URL.
    channels: HashMap<String, ChannelTask>,
    pipeline: Option<PipelineTask>,
}

impl Runtime {
    /// Make the running parts match `plan`.
    fn apply(&mut self, plan: Plan) -> Result<(), DaemonError> {
        if plan.state_dir != self.state_dir {
            warn!("state_dir changed; that takes a restart, the running spool stays");
        }
        // Routes: one per (channel, target), so relays sharing a state dir never mix queues.
        // Started after the channels below: those take their locks first.
        let targets: HashMap<String, TargetUrl> = plan
            .channels
            .iter()
            .flat_map(|c| {
                let channel = spool::lock::channel_key(c.source.channel.expose().as_str());
                c.forward
                    .iter()
                    .map(move |t| (spool::route_key(&channel, &t.to_string()), t.clone()))
            })
            .collect();
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
                let lock = match &old {
                    Some(_) => None,
                    None => Some(Arc::new(ChannelLock::pipeline(&self.state_dir)?)),
                };
                let sink: Arc<dyn Sink> = Arc::new(sink);
                info!(rules = pipeline.rules.len(), alerts = %sink.describe(), "pipeline on");
                let alerts = self.route(ALERT_ROUTE.to_string(), sink, plan.retry);
                let pipeline = Arc::new(pipeline);
                let (task, rules, lock) = match old {
                    Some(old) => {
                        tokio::spawn(old.alerts.stop());
                        let _ = old.rules.send(pipeline);
                        (old.task, old.rules, old._lock)
                    }
                    None => {
                        let (rules, rules_rx) = watch::channel(pipeline);
                        let cancel = self.cancel.child_token();
                        let handle = tokio::spawn(runner::run(
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
                            lock.expect("taken above"),
                        )
                    }
                };
                self.pipeline = Some(PipelineTask {
                    task,
                    rules,
                    alerts,
                    _lock: lock,
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
            let lock =
                ChannelLock::acquire(&self.state_dir, url.expose().as_str(), &url.to_string())?;
            info!(channel = %url, routes = ?routes, "subscribing");
            // Resume after the last event stored, for servers that replay (smee-relay serve).
            let cursor_key = spool::lock::channel_key(url.expose().as_str());
            let legacy_key = spool::lock::legacy_channel_key(url.expose().as_str());
            let targets: Vec<String> = channel.forward.iter().map(|t| t.to_string()).collect();
            let adopted =
                self.spool
                    .adopt_legacy(&cursor_key, &legacy_key, &url.to_string(), &targets)?;
            if adopted > 0 {
                info!(channel = %url, deliveries = adopted, "spool upgraded: queued deliveries moved to this channel's queues");
            }
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
                tokio::spawn(spool::intake::intake(
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

        for gone in self
            .routes
            .keys()
            .filter(|t| !targets.contains_key(*t))
            .cloned()
            .collect::<Vec<_>>()
        {
            info!(target = %spool::route_name(&gone), "target removed; its queued events stay in the spool");
            let task = self.routes.remove(&gone).expect("listed");
            tokio::spawn(task.stop());
        }
        for (route, target_url) in targets {
            if self.routes.contains_key(&route) {
                continue;
            }
            let forwarder =
                Forwarder::new(target_url, plan.target_timeout).map_err(DaemonError::Target)?;
            let task = self.route(route.clone(), Arc::new(forwarder), plan.retry);
            self.routes.insert(route, task);
        }
        Ok(())
    }

    fn route(&self, name: String, sink: Arc<dyn Sink>, retry: RetryPolicy) -> Task {
        let cancel = self.cancel.child_token();
        let handle = tokio::spawn(delivery::run_route(
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
    let key = spool::lock::channel_key(channel.source.channel.expose().as_str());
    let mut routes: Vec<String> = channel
        .forward
        .iter()
        .map(|t| spool::route_key(&key, &t.to_string()))
        .collect();
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
        // While the spool cannot be read (a full disk), the line still says why.
        let pending = match stats {
            Ok(Ok(stats)) => {
                metrics::gauge!("smee_relay_spool_pending").set(stats.pending as f64);
                metrics::gauge!("smee_relay_spool_bytes").set(stats.stored_bytes as f64);
                stats.pending.to_string()
            }
            _ => "?".into(),
        };
        let (up, all) = {
            let channels = health.channels.lock().expect("not poisoned");
            let up = channels
                .iter()
                .filter(|c| c.connected.load(Relaxed))
                .count();
            (up, channels.len())
        };
        let paused = spool
            .write_error()
            .map(|why| format!("intake paused, the spool does not take writes: {why}; "))
            .unwrap_or_default();
        let line = format!(
            "{paused}{up}/{all} channels connected; {} received, {} delivered, {} retried, {} dead; {pending} pending",
            counters.received.load(Relaxed),
            counters.delivered.load(Relaxed),
            counters.retried.load(Relaxed),
            counters.dead.load(Relaxed),
        );
        systemd::notify(&[sd_notify::NotifyState::Status(&line)]);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}
