//! The runtime every mode shares: channels in, spool, routes out.
//!
//! ```text
//! channel --SSE--> source --> intake --append--> spool --+--> route (per channel and target) --> HTTP
//!                                                        +--> pipeline --alerts--> spool --> route "alerts" --> Slack/stdout
//! Port API --reconciler (at start, on each pipeline channel's reconnect, every interval)--> spool --> pipeline
//! ```
//!
//! With `[cluster]` (see [`crate::cluster`]) the intake queues each channel's events on one
//! local route only, its outbox, whose sink publishes them to NATS; each delivery route (and
//! the pipeline and actions queues) is fed from its shared NATS consumer instead of the intake.
//! What the pipeline and the actions produce (alerts, Port reports) goes the same way: queued
//! on a local outbox, published, and delivered by whichever instance takes it from the alert
//! (or reports) route's consumer.
//!
//! `forward` is a plan with one channel and one target; `run --config` is a plan from the
//! config file. Shutdown runs the pipe dry from the front: sources read what their connection
//! already holds and stop (at most 2 s: `source::DRAIN_MAX`), intakes store what they
//! took, routes finish the delivery in flight (cut off at `--shutdown-timeout`), the writer
//! commits the last marks; a backstop exits the process if that ever takes much longer.
//!
//! A reload (SIGHUP) is a handover, in two steps. First everything that can fail is done aside
//! (HTTP clients for new targets, locks for new channels, what cannot change without a restart
//! is checked): a failure refuses the whole reload and the running config stays. Then each part
//! that changes is stopped at an event boundary, its last marks committed, before its
//! replacement starts from where it stopped: a route, the alert route, a channel whose settings
//! changed (it keeps its lock). Two owners of one queue never run at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::health::{self, Health};
use super::systemd;
use crate::cluster::{Cluster, ClusterError};
use crate::counters::Counters;
use crate::delivery::forward::Forwarder;
use crate::delivery::{self, RetryPolicy, Sink};
use crate::notify::AlertSink;
use crate::pipeline::port_api::PortClient;
use crate::pipeline::reconcile::{self, Gaps};
use crate::pipeline::{ALERT_ROUTE, PIPELINE_ROUTE, Pipeline, runner};
use crate::secret::{ExposeSecret as _, SecretString};
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
    #[error("cannot build the HTTP client for {0}")]
    TargetClient(String, #[source] reqwest::Error),
    #[error("{what} changed from {from} to {to}; that takes a restart")]
    NeedsRestart {
        what: &'static str,
        from: String,
        to: String,
    },
    #[error("targets {0} differ only in their credentials; give each target once")]
    SameTarget(String),
    #[error(transparent)]
    Listen(crate::error::Listen),
    #[error("cannot start metrics")]
    Metrics(#[source] metrics_exporter_prometheus::BuildError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The keys that changed (or `added`, `removed`).
    #[error("[cluster] changed ({0}); that takes a restart")]
    ClusterChanged(String),
}

/// What a reload did to the `[[action]]`s, by name: added, removed, or changed (its handler,
/// timeout, `env` or `on_interrupt`). A run in progress finishes as it began.
fn action_changes(
    was: &[crate::actions::ActionSpec],
    now: &[crate::actions::ActionSpec],
) -> Vec<String> {
    let find = |specs: &[crate::actions::ActionSpec], name: &str| {
        specs.iter().position(|a| a.name == name)
    };
    let mut changes = Vec::new();
    for action in now {
        match find(was, &action.name) {
            None => changes.push(format!("[[action]] {} added", action.name)),
            Some(i) if was[i] != *action => changes.push(format!(
                "[[action]] {} changed (a run in progress finishes as it began)",
                action.name
            )),
            Some(_) => {}
        }
    }
    changes.extend(
        (was.iter().filter(|a| find(now, &a.name).is_none())).map(|a| {
            format!(
                "[[action]] {} removed (a run in progress finishes as it began)",
                a.name
            )
        }),
    );
    changes
}

/// Which settings of two `[cluster]` tables differ, by their key in the file (secrets
/// compared, not shown); empty when they are the same.
fn cluster_changes(
    a: Option<&crate::cluster::Settings>,
    b: Option<&crate::cluster::Settings>,
) -> Vec<&'static str> {
    use crate::secret::ExposeSecret;
    match (a, b) {
        (None, None) => Vec::new(),
        (Some(_), None) => vec!["added"],
        (None, Some(_)) => vec!["removed"],
        (Some(a), Some(b)) => {
            // Destructured, so a setting added later cannot be forgotten here.
            let crate::cluster::Settings {
                url,
                name,
                credentials,
                ca,
                ack_wait,
                health_grace,
                dedupe_window,
                max_age,
                replicas,
                // The same file on a reload (`run --config` does not change).
                config_file: _,
            } = a;
            [
                (url.expose_secret() != b.url.expose_secret(), "nats_url"),
                (*name != b.name, "name"),
                (*credentials != b.credentials, "credentials_file"),
                (*ca != b.ca, "ca_file"),
                (*ack_wait != b.ack_wait, "ack_wait"),
                (*health_grace != b.health_grace, "health_grace"),
                (*dedupe_window != b.dedupe_window, "dedupe_window"),
                (*max_age != b.max_age, "max_age"),
                (*replicas != b.replicas, "replicas"),
            ]
            .into_iter()
            .filter_map(|(changed, key)| changed.then_some(key))
            .collect()
        }
    }
}

/// What the instances of a cluster must agree on, hashed (see `cluster::config_fingerprint`):
/// the routes (channel and target), the rules (not where in the file they are written) and
/// the Slack webhook (whichever instance takes an alert sends it to its own).
fn plan_fingerprint(plan: &Plan) -> String {
    let mut parts = Vec::new();
    for channel in &plan.channels {
        parts.extend(
            channel
                .forward
                .iter()
                .map(|t| format!("route {}", route_key(channel, t))),
        );
        if channel.pipeline {
            parts.push(format!("pipeline {}", channel_key(channel)));
        }
    }
    if let Some((pipeline, alerts)) = &plan.pipeline {
        // Hashed with the rest: the webhook URL is a secret.
        if let Some(slack) = &alerts.slack {
            parts.push(format!("slack {}", slack.target().with_query(&[])));
        }
        parts.extend(
            pipeline
                .rules
                .iter()
                .map(|r| format!("rule {:?} {}", r.name, r.meaning())),
        );
    }
    crate::cluster::config_fingerprint(parts)
}

/// What a reload changed in the rules, by name: `rule cpu-high changed`, `rule x added`, ...
fn rule_changes(
    old: &[crate::pipeline::rules::Rule],
    new: &[crate::pipeline::rules::Rule],
) -> Vec<String> {
    let find = |rules: &[crate::pipeline::rules::Rule], name: &str| {
        rules.iter().find(|r| r.name == name).map(|r| r.meaning())
    };
    let mut changes = Vec::new();
    for rule in new {
        match find(old, &rule.name) {
            None => changes.push(format!("rule {} added", rule.name)),
            Some(was) if was != rule.meaning() => {
                changes.push(format!("rule {} changed", rule.name))
            }
            Some(_) => {}
        }
    }
    changes.extend(
        old.iter()
            .filter(|r| find(new, &r.name).is_none())
            .map(|r| format!("rule {} removed", r.name)),
    );
    changes
}

/// Bytes of a channel's events received but not yet committed to the spool (queued, and in
/// the commit under way); beyond this its source waits and stops reading (backpressure to the
/// kernel's socket buffer and the server). Two commits' worth (`MAX_BATCH_BYTES`): one is
/// committed while the next is read, so the writer never waits on the network, and no more
/// than that sits in memory in a burst.
const QUEUE_BYTES: usize = 2 << 20;

/// One channel and where its events go.
#[derive(Clone, Debug)]
pub struct ChannelPlan {
    pub source: SourceConfig,
    pub forward: Vec<TargetUrl>,
    /// Whether the pipeline evaluates this channel's events.
    pub pipeline: bool,
    /// `forward --save-dir`: each received event is also written here in gosmee's layout.
    pub save_dir: Option<PathBuf>,
}

/// Where to serve `/healthz` and `/metrics`, and how the user said so.
#[derive(Clone, Copy)]
pub struct MetricsListen {
    pub addr: std::net::SocketAddr,
    /// The flag or the config key that set `addr`, for the hint when it cannot be bound: a
    /// user who wrote it in the config looks for no flag.
    pub set_by: &'static str,
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
    /// Disk room the spool leaves free on its file system (`--keep-free`; 0: none).
    pub keep_free: u64,
    /// Where to serve `/healthz` and `/metrics`, if anywhere.
    pub metrics_listen: Option<MetricsListen>,
    /// Self-service action runs (on `pipeline` channels) and the Port API their reports go to.
    pub actions: Option<(
        crate::actions::runner::Actions,
        crate::notify::port::PortReporter,
    )>,
    /// Reconciling alert state with Port's API (`[port] reconcile`), when the pipeline runs.
    pub reconcile: Option<ReconcilePlan>,
    /// `[cluster]`: share the work with other relays through NATS JetStream.
    pub cluster: Option<crate::cluster::Settings>,
    /// A line for stdout once the relay runs, its spool open and its channels' locks taken
    /// (`forward`'s `Forwarding X to Y`, as smee-client prints it). Not before: a script
    /// reading stdout took it for success when another relay's lock (helper-150) or a damaged
    /// or read-only spool (helper-152) then stopped the start.
    pub announce: Option<String>,
}

/// What the reconciler needs: Port's API and how often to read it.
#[derive(Clone, Debug)]
pub struct ReconcilePlan {
    pub api: crate::pipeline::port_api::PortApi,
    pub interval: Duration,
}

/// Run `plan` until `cancel` fires. Each plan received on `reloads` replaces the running one
/// (SIGHUP): channels that stay keep their connection, targets and rules are swapped in place.
/// `None` there (SIGHUP to `forward`, which has no config file) only retries now what waits.
pub async fn run(
    mut plan: Plan,
    mut reloads: mpsc::Receiver<Option<Plan>>,
    cancel: CancellationToken,
) -> Result<(), DaemonError> {
    spool::create_state_dir(&plan.state_dir)?;
    // NATS first: unreachable at start is the user's to fix (exit 2), before anything runs.
    let cluster = match &plan.cluster {
        Some(settings) => Some(Cluster::connect(settings.clone()).await?),
        None => None,
    };
    let spool = Arc::new(Spool::open(&plan.state_dir)?);
    let free = spool::room::check_at_start(&plan.state_dir, plan.keep_free)
        .map_err(|e| DaemonError::Spool(spool::SpoolError::KeepFree(e)))?;
    info!(
        spool = %spool.path().display(),
        keep_free = %spool::room::mib(plan.keep_free),
        free = %free.map_or("unknown".into(), spool::room::mib),
        "spool open"
    );
    if let Some(free) = free.filter(|&free| free < plan.keep_free) {
        warn!(
            "the disk holding the spool has {} free, already less than --keep-free ({}): the \
             spool takes no more room than it holds now (free disk space, or lower --keep-free)",
            spool::room::mib(free),
            spool::room::mib(plan.keep_free)
        );
    }
    // So that `smee-relay events` on this state directory knows its ids are local copies.
    spool.set_cluster(plan.cluster.as_ref().map(|c| c.name.as_str()))?;
    let (writer, writer_thread) = SpoolWriter::start(spool.clone(), plan.limits);
    writer.keep_free(plan.keep_free);
    let counters = Arc::new(Counters::default());
    let health = Arc::new(Health {
        channels: Default::default(),
        spool_writable: writer.writable(),
        spool_paused_why: writer.why_paused(),
        cluster: cluster.clone(),
        counters: counters.clone(),
        ..Default::default()
    });
    if let Some(MetricsListen { addr, set_by }) = plan.metrics_listen {
        let cannot_listen = |source| {
            DaemonError::Listen(crate::error::Listen {
                addr,
                purpose: " for /healthz and /metrics",
                flag: set_by,
                source,
            })
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(cannot_listen)?;
        let handle = health::install_metrics().map_err(DaemonError::Metrics)?;
        // Set by the writer when it changes; there from the start, so an alert sees a 0.
        let paused = health
            .spool_paused_why
            .lock()
            .is_ok_and(|why| why.is_some());
        metrics::gauge!("smee_relay_intake_paused").set(if paused { 1.0 } else { 0.0 });
        let bound = listener.local_addr().map_err(cannot_listen)?;
        info!(addr = %bound, "serving /healthz and /metrics");
        tokio::spawn(health::serve(
            listener,
            health.clone(),
            handle,
            cancel.clone(),
        ));
    }
    counters.register();
    let mut runtime = Runtime {
        spool: spool.clone(),
        writer,
        counters,
        health: health.clone(),
        cancel: cancel.clone(),
        state_dir: plan.state_dir.clone(),
        metrics_listen: plan.metrics_listen.map(|m| m.addr),
        routes: HashMap::new(),
        channels: HashMap::new(),
        pipeline: None,
        actions: None,
        gaps: Arc::new(Gaps::default()),
        reconciler: None,
        cluster,
        handed_back: false,
        shutdown_timeout: plan.retry.shutdown_timeout,
        retry_now: Arc::default(),
    };
    let retain = plan.retain;
    // Past the deadline the process exits, whatever is stuck (a hung disk, a wedged task).
    let _backstop = backstop(cancel.clone(), shutdown_bound(plan.retry.shutdown_timeout));
    let fingerprint = plan_fingerprint(&plan);
    let configured = plan.channels.iter().map(channel_key).collect();
    let actions_off = plan.actions.is_none();
    let announce = plan.announce.take();
    runtime.apply(plan).await?;
    if let Some(line) = announce {
        // A closed stdout is the reader's choice, not the relay's failure.
        let _ = std::io::Write::write_all(&mut std::io::stdout(), format!("{line}\n").as_bytes());
    }
    runtime.say_unconfigured(configured);
    if actions_off {
        runtime.say_unsettled_runs();
    }
    if let Some(cluster) = &runtime.cluster {
        cluster.announce_config(fingerprint);
        cluster.watch_neighbours(runtime.channel_names());
    }
    let mut background = vec![tokio::spawn(spool::intake::prune_periodically(
        spool.clone(),
        retain,
        cancel.clone(),
    ))];
    // Only for someone who reads it: otherwise a wake every few seconds for nothing.
    if runtime.metrics_listen.is_some() || systemd::notifying() {
        background.push(tokio::spawn(report_status(
            spool.clone(),
            health,
            runtime.counters.clone(),
            runtime.cluster.clone(),
            cancel.clone(),
        )));
    }
    systemd::notify(&[sd_notify::NotifyState::Ready]);
    systemd::spawn_watchdog(cancel.clone());

    // Damage found in the spool while running stops the relay as damage found at its start
    // does (exit status 2, with what to do): every read and write would fail on from here.
    let mut damage = spool.damage();
    let mut damaged = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            why = damage_found(&mut damage) => {
                error!("the spool is damaged: stopping (exit status 2): {why}");
                damaged = Some(spool.damaged(why));
                // As a signal does: what runs beside the loop stops on it.
                cancel.cancel();
                break;
            }
            Some(reload) = reloads.recv() => {
                let Some(plan) = reload else {
                    info!("SIGHUP: retrying now what waits for its target (`forward` has no config file to reload)");
                    runtime.retry_now.notify_waiters();
                    continue;
                };
                systemd::notify(&[sd_notify::NotifyState::Reloading]);
                let fingerprint = plan_fingerprint(&plan);
                let applied = runtime.apply(plan).await;
                // The operator may have fixed what a route waits on (its target is back).
                runtime.retry_now.notify_waiters();
                if let (Ok(_), Some(cluster)) = (&applied, &runtime.cluster) {
                    cluster.announce_config(fingerprint);
                    cluster.watch_neighbours(runtime.channel_names());
                }
                match applied {
                    Ok(changes) if changes.is_empty() => info!("config reloaded: nothing changed"),
                    Ok(changes) => info!("config reloaded: {}", changes.join("; ")),
                    Err(e) => error!(
                        "config not reloaded, the running one stays: {}",
                        crate::error::chain(&e)
                    ),
                }
                systemd::notify(&[sd_notify::NotifyState::Ready]);
            }
        }
    }
    // Sources stop at once; intakes then store what they took; routes finish what is in flight.
    let Runtime {
        writer,
        counters,
        routes,
        channels,
        pipeline,
        actions,
        reconciler,
        cluster,
        ..
    } = runtime;
    for channel in channels.into_values() {
        channel.stop().await;
    }
    // This relay's queues, for the stop line: another relay may share the state directory.
    let served: Vec<String> = routes.keys().cloned().collect();
    if let Some(reconciler) = reconciler {
        reconciler.task.stop().await;
    }
    for route in routes.into_values() {
        route.task.stop().await;
    }
    if let Some(pipeline) = pipeline {
        pipeline.task.stop().await;
        pipeline.alerts.stop().await;
    }
    if let Some(actions) = actions {
        actions.task.stop().await;
        actions.reports.stop().await;
    }
    for task in background {
        let _ = task.await;
    }
    let clustered = cluster.is_some();
    if let Some(cluster) = cluster {
        cluster.leave_config().await;
    }
    drop(writer);
    let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
    match damaged {
        Some(e) => Err(e.into()),
        None => {
            let never_stored = counters
                .never_stored
                .load(std::sync::atomic::Ordering::Relaxed);
            if clustered {
                info!(
                    "stopped; what this instance did not deliver, the cluster gives to another{}",
                    match never_stored {
                        0 => String::new(),
                        n => format!("; {}", never_stored_line(n)),
                    }
                );
            } else if spool.file_gone() {
                // What the open file holds leaves with this process (helper-149).
                error!(
                    "stopped; the spool file {} was removed or replaced while the relay ran: what was not delivered was in the file this relay had open, and is not in the state directory for the next start ({})",
                    spool.path().display(),
                    waiting_line(&spool, &served, never_stored)
                );
            } else {
                info!("stopped; {}", waiting_line(&spool, &served, never_stored));
            }
            Ok(())
        }
    }
}

/// What the stop line says is left: how many deliveries wait for the next start, so that a
/// stop with work left is told apart from one with none. Counts the channel queues in `served`
/// (this relay's) and the queues of no channel (the pipeline's, the actions'), not those of
/// another relay sharing the state directory.
fn waiting_line(spool: &Spool, served: &[String], never_stored: u64) -> String {
    // Runs a stop interrupted: nothing waits for them in a queue, but the next start settles
    // them (helper-126: "everything received was delivered" read as all done).
    let interrupted = crate::actions::stored_runs(spool).map_or(0, |runs| {
        (runs.iter())
            .filter(|(_, state)| state.run_phase == crate::actions::RunPhase::Running)
            .count()
    });
    let ours = |queue: &str| channel_of_queue(queue).is_none() || served.iter().any(|s| s == queue);
    let our_channel = |queue: &str| {
        channel_of_queue(queue)
            .is_some_and(|key| served.iter().any(|s| channel_of_queue(s) == Some(key)))
    };
    // Counting is a courtesy: on an error the spool's own message was said where it happened.
    let waiting = spool.pending_queues().ok().map(|all| {
        // What this relay's channels keep queued for targets it no longer delivers to
        // (helper-133: "nothing waits" with those kept).
        let kept = (all.iter())
            .filter(|(queue, _)| !ours(queue) && our_channel(queue))
            .map(|(_, n)| n)
            .sum();
        let ours: Vec<_> = all.iter().filter(|(queue, _)| ours(queue)).collect();
        Waiting {
            deliveries: ours.iter().map(|(_, n)| n).sum(),
            at_least: ours.iter().any(|&&(_, n)| n > spool::MOST_COUNTED),
            kept,
        }
    });
    let line = stop_line(waiting, interrupted, never_stored);
    match crate::pipeline::runner::held_alerts(spool) {
        0 => line,
        n => format!(
            "{line}; {} (`for`): {} at the next start",
            crate::error::count(n, "alert is held", "alerts are held"),
            if n == 1 {
                "its hold goes on"
            } else {
                "their holds go on"
            }
        ),
    }
}

/// What waits in the spool when the relay stops, as the stop line counts it.
struct Waiting {
    /// Deliveries queued for this relay's targets.
    deliveries: u64,
    /// A queue held more than the spool counts exactly, so `deliveries` is a lower bound.
    at_least: bool,
    /// Events its channels keep queued for targets it no longer delivers to.
    kept: u64,
}

/// The stop line's words for what is left: `waiting` (`None` when the spool could not count
/// it), the action runs the stop interrupted, and the received events an intake gave up
/// ([`Counters::never_stored`]). Worded in one place, so that each part says "nothing" only
/// when nothing of any kind is left.
fn stop_line(waiting: Option<Waiting>, interrupted: usize, never_stored: u64) -> String {
    let kept = waiting.as_ref().map_or(0, |waiting| waiting.kept);
    let mut parts = vec![match waiting {
        None => "what was not delivered waits in the spool for the next start".into(),
        Some(Waiting { deliveries: 0, .. })
            if kept == 0 && interrupted == 0 && never_stored == 0 =>
        {
            "nothing waits: everything received was delivered".into()
        }
        Some(Waiting { deliveries: 0, .. }) if kept == 0 => "no delivery waits in the spool".into(),
        Some(Waiting { deliveries: 0, .. }) => "nothing waits for this relay's targets".into(),
        Some(Waiting { deliveries: 1, .. }) => {
            "1 delivery waits in the spool for the next start".into()
        }
        Some(Waiting {
            deliveries: n,
            at_least,
            ..
        }) => format!(
            "{}{n} deliveries wait in the spool for the next start",
            if at_least { "at least " } else { "" }
        ),
    }];
    if kept > 0 {
        parts.push(format!(
            "{} queued for a target this relay no longer delivers to (its warning says what to do)",
            crate::error::count(kept as usize, "event stays", "events stay"),
        ));
    }
    if interrupted > 0 {
        parts.push(format!(
            "{} interrupted, settled at the next start (Port shows {} in progress until then)",
            crate::error::count(interrupted, "action run was", "action runs were"),
            if interrupted == 1 { "it" } else { "them" }
        ));
    }
    if never_stored > 0 {
        parts.push(never_stored_line(never_stored));
    }
    parts.join("; ")
}

/// The stop line's words for received events an intake gave up (its error said why).
fn never_stored_line(n: u64) -> String {
    format!(
        "{} never stored, the spool refusing writes (lost unless the channel sends {} again)",
        crate::error::count(n as usize, "received event was", "received events were"),
        if n == 1 { "it" } else { "them" }
    )
}

/// The first damage the spool finds while the relay runs ([`Spool::damage`]).
async fn damage_found(damage: &mut watch::Receiver<Option<spool::Damage>>) -> spool::Damage {
    let found = damage
        .wait_for(Option::is_some)
        .await
        .map(|why| why.clone().expect("waited for"));
    match found {
        Ok(why) => why,
        // The spool is gone (never while the relay holds it): nothing more to find.
        Err(_) => std::future::pending().await,
    }
}

/// A task that can be stopped on its own.
struct Task {
    cancel: CancellationToken,
    handles: Vec<tokio::task::JoinHandle<()>>,
    /// Fires once the task that consumes the local queue (the first handle) has returned,
    /// its last marks committed: a cluster feeder then knows whether its message was finished.
    done: CancellationToken,
}

/// Spawn what consumes a local queue, watched by `health` under the name `what` (it must run
/// until `cancel`); the token returned fires once it has returned.
fn spawn_local(
    health: &Arc<Health>,
    what: String,
    cancel: &CancellationToken,
    work: impl std::future::Future<Output = ()> + Send + 'static,
) -> (tokio::task::JoinHandle<()>, CancellationToken) {
    let done = CancellationToken::new();
    let fired = done.clone();
    let work = health.watch(what, cancel.clone(), work);
    let handle = tokio::spawn(async move {
        work.await;
        fired.cancel();
    });
    (handle, done)
}

impl Task {
    /// Whether the task consuming its queue has ended (only ever unasked while it is kept).
    fn ended(&self) -> bool {
        self.handles.first().is_some_and(|h| h.is_finished())
    }

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
    /// What the source was started with: a change of these settings restarts it.
    source: SourceConfig,
    routes: watch::Sender<Vec<String>>,
    /// Liveness, for `/healthz`.
    status: Arc<ChannelStatus>,
    /// Held while the channel runs, and handed to its successor when its settings change.
    lock: ChannelLock,
}

impl ChannelTask {
    /// Stop the source, let the intake store what it took, and give the lock back.
    async fn stop(self) -> ChannelLock {
        self.task.stop().await;
        self.lock
    }
}

/// A delivery route to a target.
struct RouteTask {
    /// The target it was started for (with its credentials): a change restarts the route.
    target: TargetUrl,
    task: Task,
}

/// How much longer than `--shutdown-timeout` a shutdown may take before the process exits
/// regardless: recording the last marks and closing the spool take milliseconds, not seconds.
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(3);

/// A stop while the spool refuses writes (a full disk) takes this long whatever
/// `--shutdown-timeout` says: the source reads on what the connection holds, then the intake
/// tries to store it, a second apart, before it says how many events are lost.
const FULL_DISK_STOP: Duration = crate::source::DRAIN_MAX
    .saturating_add(crate::spool::intake::GIVE_UP_AFTER_STOP)
    .saturating_add(Duration::from_secs(1));

/// How long a shutdown may take before the process exits regardless ([`backstop`]): a full
/// disk's stop gets to say what it lost.
fn shutdown_bound(shutdown_timeout: Duration) -> Duration {
    shutdown_timeout
        .max(FULL_DISK_STOP)
        .saturating_add(SHUTDOWN_MARGIN)
}

/// Once `cancel` fires, exit the process if it is still running `bound` later. The wait is on a
/// thread of its own, so a task that blocks the event loop during shutdown (a hung disk) cannot
/// hold it up. Dropping the returned guard (when `run` returns) disarms it.
fn backstop(cancel: CancellationToken, bound: Duration) -> std::sync::mpsc::Sender<()> {
    let (disarm, disarmed) = std::sync::mpsc::channel::<()>();
    tokio::spawn(async move {
        cancel.cancelled().await;
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = disarmed.recv_timeout(bound) {
                error!(
                    "shutdown did not finish within {}; exiting now (undelivered events stay in the spool)",
                    humantime::format_duration(bound)
                );
                super::logging::exit(1);
            }
        });
    });
    disarm
}

/// How a target is named in queues and logs: as displayed, credentials redacted, so the
/// password is never stored in the spool nor shown in `/metrics`.
fn route_name(target: &TargetUrl) -> String {
    target.to_string()
}

/// The spool queue of `channel`'s deliveries to `target` ([`spool::route_key`]).
fn route_key(channel: &ChannelPlan, target: &TargetUrl) -> String {
    spool::route_key(&channel_key(channel), &route_name(target))
}

/// A channel's key in the spool (and, hashed, its subject in a cluster).
fn channel_key(channel: &ChannelPlan) -> String {
    spool::lock::channel_key(channel.source.channel.expose().as_str())
}

/// The outbox never gives up: a frame waits in the local spool until NATS has it. Retries
/// stay frequent so it is published soon after NATS returns.
fn outbox_policy(shutdown_timeout: Duration) -> RetryPolicy {
    RetryPolicy {
        backoff: crate::retry::BackoffPolicy {
            min: Duration::from_millis(200),
            max: Duration::from_secs(2),
        },
        max_age: Duration::from_secs(100 * 365 * 24 * 3600),
        max_retry_after: Duration::from_secs(2),
        shutdown_timeout,
    }
}

/// Publishing to the cluster's stream, as a delivery route (the outbox).
struct Publish {
    cluster: Cluster,
    /// The channel's spool key: its subject and its frames' message ids derive from it.
    channel_key: String,
    /// What this relay produced (alerts, Port reports: [`crate::cluster::produced_key`]),
    /// not frames every instance receives: named by its producer, or by the local event.
    produced: bool,
}

impl Sink for Publish {
    fn describe(&self) -> String {
        format!("NATS publish (cluster {})", self.cluster.settings().name)
    }

    /// NATS's error as NATS said it (not "cannot reach target": NATS is not a target), paced:
    /// during an outage every attempt fails alike.
    fn failure(&self, error: &delivery::forward::ForwardError) -> Option<String> {
        match error {
            delivery::forward::ForwardError::Connection(cause) => {
                crate::cluster::paced(&format!("publish {}", self.channel_key), cause)
            }
            other => Some(other.to_string()),
        }
    }

    fn deliver<'a>(
        &'a self,
        event: &'a spool::StoredEvent,
        _delivery_id: &'a str,
    ) -> futures::future::BoxFuture<
        'a,
        Result<delivery::forward::Delivered, delivery::forward::ForwardError>,
    > {
        Box::pin(async move {
            // Test-only (debug builds, `SMEE_RELAY_FAULT`): hold the alerts' publish.
            #[cfg(debug_assertions)]
            if self.produced
                && self.channel_key == crate::cluster::produced_key(ALERT_ROUTE)
                && let Some(path) = crate::cluster::fault("hold-alert-publish")
            {
                while std::path::Path::new(&path).exists() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let started = std::time::Instant::now();
            let id = if self.produced {
                crate::cluster::produced_message_id(
                    &self.channel_key,
                    &event.event,
                    event.id,
                    event.received_ms,
                )
            } else {
                crate::cluster::message_id(&self.channel_key, &event.event)
            };
            self.cluster
                .publish_as(
                    &self.channel_key,
                    id,
                    &event.channel,
                    &event.event,
                    event.received_ms,
                )
                .await
                .map(|_| delivery::forward::Delivered {
                    status: reqwest::StatusCode::OK,
                    elapsed: started.elapsed(),
                    not_sent: None,
                })
                .map_err(|e| {
                    if e.is_permanent() {
                        // Retrying can never succeed: a dead letter on the outbox, so the
                        // frames behind it are published (the warning names the event).
                        delivery::forward::ForwardError::Status {
                            status: reqwest::StatusCode::PAYLOAD_TOO_LARGE,
                            retry_after: None,
                            location: None,
                            body: format!(
                                "NATS cannot take event {} ({} bytes{}): {e}",
                                event.id,
                                event.event.body.len(),
                                event
                                    .event
                                    .kind()
                                    .map(|k| format!(", {k}"))
                                    .unwrap_or_default()
                            ),
                        }
                    } else {
                        delivery::forward::ForwardError::Connection(crate::error::chain(&e))
                    }
                })
        })
    }
}

/// A cluster route's target: each cluster delivery carries the cluster's delivery id
/// ([`Cluster::delivery_id`]), the same on every instance, so a target can drop the one repeat
/// a failover may make; and the cluster hears how each attempt went, to record a dead letter
/// where every instance sees it.
struct ClusterDeliveryId {
    inner: Arc<dyn Sink>,
    cluster: Cluster,
    /// The local spool route it delivers.
    route: String,
}

impl Sink for ClusterDeliveryId {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn deliver<'a>(
        &'a self,
        event: &'a spool::StoredEvent,
        delivery_id: &'a str,
    ) -> futures::future::BoxFuture<
        'a,
        Result<delivery::forward::Delivered, delivery::forward::ForwardError>,
    > {
        Box::pin(async move {
            // The cluster's ack of a paced route waits the pace out from here.
            self.cluster.attempt_started(&self.route, &event.event);
            let id = self.cluster.delivery_id(&self.route, &event.event);
            let outcome = self
                .inner
                .deliver(event, id.as_deref().unwrap_or(delivery_id))
                .await;
            // The cluster records a dead letter from the last attempt's failure.
            self.cluster.attempted(
                &self.route,
                &event.event,
                match &outcome {
                    Ok(_) => Ok(()),
                    Err(e) => Err((e.status().map(|s| s.as_u16()), e.to_string())),
                },
            );
            outcome
        })
    }

    fn min_interval(&self) -> Duration {
        self.inner.min_interval()
    }

    fn cluster_seq(&self, event: &spool::StoredEvent) -> Option<u64> {
        self.cluster.stream_seq(&self.route, &event.event)
    }

    fn cluster_args(&self) -> String {
        self.cluster.settings().events_args()
    }

    fn claim<'a>(
        &'a self,
        event: &'a spool::StoredEvent,
    ) -> Option<futures::future::BoxFuture<'a, Result<(), String>>> {
        Some(Box::pin(self.cluster.claim(&self.route, &event.event)))
    }

    fn taken_away<'a>(
        &'a self,
        event: &'a spool::StoredEvent,
    ) -> Option<futures::future::BoxFuture<'a, ()>> {
        Some(Box::pin(self.cluster.taken_away(&self.route, &event.event)))
    }
}

/// Whether a running source can keep going with `new`'s settings.
fn same_source(running: &SourceConfig, new: &SourceConfig) -> bool {
    running.idle_timeout == new.idle_timeout
        && expose(&running.token) == expose(&new.token)
        && running.reconnect == new.reconnect
        && running.max_frame == new.max_frame
        && ignored(running) == ignored(new)
        && catch_up_settings(running) == catch_up_settings(new)
}

/// A channel's `ignore_events`, comparable (matched ignoring case and order).
fn ignored(source: &SourceConfig) -> std::collections::BTreeSet<String> {
    source
        .ignore_events
        .iter()
        .map(|name| name.to_ascii_lowercase())
        .collect()
}

/// A channel's GitHub catch-up settings, comparable (a change restarts the channel with them).
fn catch_up_settings(source: &SourceConfig) -> Option<(String, u64, String, &str, Duration)> {
    source.github_catch_up.as_ref().map(|c| {
        (
            c.hook.owner.to_string(),
            c.hook.hook,
            c.hook.api_url.to_string(),
            c.hook.token.expose_secret(),
            c.since,
        )
    })
}

fn expose(token: &Option<SecretString>) -> Option<&str> {
    token.as_ref().map(|t| t.expose_secret())
}

struct PipelineTask {
    task: Task,
    rules: watch::Sender<Arc<Pipeline>>,
    alerts: Task,
    /// The Slack webhook alerts go to, if any: a reload says when it changed (never what it
    /// is: the URL is a secret).
    slack: Option<crate::url::TargetUrl>,
    /// Where alerts go (`slack`, `stdout`, ...): a reload says so only when it changed.
    alerts_to: String,
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
    /// Where `/healthz` and `/metrics` are served: bound once, at start.
    metrics_listen: Option<std::net::SocketAddr>,
    /// One delivery route per target, by route name.
    routes: HashMap<String, RouteTask>,
    /// Keyed by the full channel URL.
    channels: HashMap<String, ChannelTask>,
    pipeline: Option<PipelineTask>,
    /// The actions route and the Port reports route.
    actions: Option<ActionsTask>,
    /// `[cluster]`: routes are fed from NATS consumers, receipts published to NATS.
    cluster: Option<Cluster>,
    /// Whether the local copies of cluster deliveries an earlier run left unfinished were
    /// handed back (once, before the first route starts).
    handed_back: bool,
    /// `--shutdown-timeout` as of the last plan, for the outbox routes.
    shutdown_timeout: Duration,
    /// Where the watchers of pipeline channels report reconnections, for the reconciler.
    gaps: Arc<Gaps>,
    /// The Port reconciler, when it runs.
    reconciler: Option<ReconcilerTask>,
    /// Told on each reload: every route waiting between attempts tries again now.
    retry_now: Arc<tokio::sync::Notify>,
}

/// The running reconciler and what it was started with (a reload that changes it restarts it).
struct ReconcilerTask {
    plan: ReconcilePlan,
    task: Task,
}

struct ActionsTask {
    task: Task,
    config: watch::Sender<Arc<crate::actions::runner::Actions>>,
    reports: Task,
    /// Who the reports go to Port as: a reload that keeps it keeps the reports' route, with
    /// its wait and what Port refused.
    api: crate::pipeline::port_api::PortApi,
}

impl Runtime {
    /// Make the running parts match `plan`, or change nothing and say why. Returns what
    /// changed, for the log.
    async fn apply(&mut self, plan: Plan) -> Result<Vec<String>, DaemonError> {
        // 1. Everything that can fail, with nothing running touched.
        if plan.state_dir != self.state_dir {
            return Err(DaemonError::NeedsRestart {
                what: "state_dir",
                from: self.state_dir.display().to_string(),
                to: plan.state_dir.display().to_string(),
            });
        }
        let metrics_listen = plan.metrics_listen.map(|m| m.addr);
        if metrics_listen != self.metrics_listen {
            let show = |a: Option<std::net::SocketAddr>| a.map_or("none".into(), |a| a.to_string());
            return Err(DaemonError::NeedsRestart {
                what: "metrics_listen",
                from: show(self.metrics_listen),
                to: show(metrics_listen),
            });
        }
        // Every setting, the URL's password included (compared, never shown): the cluster
        // connection was made with them, and none of them changes without a restart.
        let changed = cluster_changes(
            plan.cluster.as_ref(),
            self.cluster.as_ref().map(|c| c.settings()),
        );
        if !changed.is_empty() {
            return Err(DaemonError::ClusterChanged(changed.join(", ")));
        }
        // Routes: one per (channel, target), so relays sharing a state dir never mix queues.
        let mut targets: BTreeMap<String, TargetUrl> = BTreeMap::new();
        // In a cluster, each route's consumer reads its channel's subject.
        let mut route_channels: HashMap<String, String> = HashMap::new();
        for channel in &plan.channels {
            for target in &channel.forward {
                let key = route_key(channel, target);
                route_channels.insert(key.clone(), channel_key(channel));
                match targets.get(&key) {
                    Some(seen) if seen != target => {
                        return Err(DaemonError::SameTarget(route_name(target)));
                    }
                    _ => targets.insert(key, target.clone()),
                };
            }
        }
        // Routes whose task ended unasked ([`Health::watch`]) are started again; looked at
        // once, so a route is either kept or stopped and started.
        let ended: HashSet<String> = self
            .routes
            .iter()
            .filter(|(_, r)| r.task.ended())
            .map(|(name, _)| name.clone())
            .collect();
        let mut new_routes = Vec::new();
        for (name, target) in &targets {
            if !ended.contains(name) && self.routes.get(name).is_some_and(|r| r.target == *target) {
                continue;
            }
            let forwarder = Forwarder::new(target.clone(), plan.target_timeout)
                .map_err(|e| DaemonError::TargetClient(target.to_string(), e))?;
            new_routes.push((name.clone(), target.clone(), Arc::new(forwarder)));
        }
        let stale_routes: Vec<String> = self
            .routes
            .iter()
            .filter(|(name, r)| targets.get(*name) != Some(&r.target) || ended.contains(*name))
            .map(|(name, _)| name.clone())
            .collect();

        let wanted: HashMap<String, ChannelPlan> = plan
            .channels
            .into_iter()
            .map(|c| (c.source.channel.expose().to_string(), c))
            .collect();
        // Channels to start: new ones with their lock taken now, and running ones whose
        // settings changed (they keep their own lock).
        let mut to_start: Vec<(String, ChannelPlan, Option<ChannelLock>)> = Vec::new();
        for (key, channel) in &wanted {
            match self.channels.get(key) {
                Some(running) if same_source(&running.source, &channel.source) => {}
                Some(_) => {
                    channel.source.clone().build()?;
                    to_start.push((key.clone(), channel.clone(), None));
                }
                None => {
                    let url = &channel.source.channel;
                    let lock = ChannelLock::acquire(
                        &self.state_dir,
                        url.expose().as_str(),
                        &url.to_string(),
                    )
                    .map_err(|e| e.in_cluster(self.cluster.is_some()))?;
                    channel.source.clone().build()?;
                    to_start.push((key.clone(), channel.clone(), Some(lock)));
                }
            }
        }

        // The reconciler's client, if it (re)starts: built now, so a failure refuses the reload.
        // In a cluster every instance reconciles; the runner judges each snapshot against the
        // cluster's alert states with compare-and-set, so a gap two instances both read sends
        // each alert once.
        let reconcile = match plan.reconcile.filter(|_| plan.pipeline.is_some()) {
            Some(wanted)
                if !self.reconciler.as_ref().is_some_and(|r| {
                    r.plan.api.same_as(&wanted.api) && r.plan.interval == wanted.interval
                }) =>
            {
                let client = PortClient::new(wanted.api.clone())
                    .map_err(|e| DaemonError::TargetClient("Port's API".into(), e))?;
                Reconcile::Start(wanted, Arc::new(client))
            }
            Some(_) => Reconcile::Keep,
            None => Reconcile::Off,
        };

        // One relay with a pipeline per state dir: its alert state and queues are the dir's.
        let pipeline_lock = match (&plan.pipeline, &self.pipeline) {
            (Some(_), None) => Some(Arc::new(
                ChannelLock::pipeline(&self.state_dir)
                    .map_err(|e| e.in_cluster(self.cluster.is_some()))?,
            )),
            _ => None,
        };

        // 2. The handover: stop what goes or changes (at an event boundary, its marks
        // committed), then start what replaces it. Nothing here fails.
        let mut changes = Vec::new();
        self.shutdown_timeout = plan.retry.shutdown_timeout;
        let mut kept_locks = HashMap::new();
        let stopping: Vec<String> = self
            .channels
            .keys()
            .filter(|key| !wanted.contains_key(*key) || to_start.iter().any(|(k, ..)| k == *key))
            .cloned()
            .collect();
        // Channels removed, by their key in the spool: for what their queues still hold.
        let mut removed: HashMap<String, String> = HashMap::new();
        for key in stopping {
            let old = self.channels.remove(&key).expect("listed");
            let shown = old.source.channel.to_string();
            let lock = old.stop().await;
            if wanted.contains_key(&key) {
                changes.push(format!("channel {shown} reconnects with its new settings"));
                kept_locks.insert(key, lock);
            } else {
                changes.push(format!("channel {shown} removed"));
                removed.insert(spool::lock::channel_key(&key), shown);
            }
        }
        let actions_on = plan.actions.is_some();
        for (key, running) in &self.channels {
            running.routes.send_replace(routes_of(
                &wanted[key],
                actions_on,
                self.cluster.is_some(),
            ));
        }
        for name in stale_routes {
            let old = self.routes.remove(&name).expect("listed");
            old.task.stop().await;
            if !targets.contains_key(&name) {
                changes.push(format!("target {} removed", spool::route_name(&name)));
                let key = name.split_once(' ').map_or("", |(key, _)| key);
                let shown = (wanted.values().find(|c| channel_key(c) == key))
                    .map(|c| c.source.channel.to_string())
                    .or_else(|| removed.get(key).cloned());
                self.say_removed_target(&name, shown.as_deref()).await;
            }
        }
        if let Some(cluster) = &self.cluster
            && !std::mem::replace(&mut self.handed_back, true)
        {
            let mut routes: Vec<String> = targets.keys().cloned().collect();
            routes.extend([
                PIPELINE_ROUTE.to_string(),
                crate::actions::ACTIONS_ROUTE.to_string(),
                ALERT_ROUTE.to_string(),
                reports_delivery_route(),
            ]);
            let count = crate::cluster::hand_back(self.spool.clone(), &self.writer, routes).await;
            if count > 0 {
                info!(
                    deliveries = count,
                    cluster = %cluster.settings().name,
                    "handed back to the cluster the deliveries the last run took but did not finish"
                );
            }
        }
        let pipeline_subjects: Vec<String> = match &self.cluster {
            Some(cluster) => wanted
                .values()
                .filter(|c| c.pipeline)
                .map(|c| cluster.subject(&channel_key(c)))
                .collect(),
            None => Vec::new(),
        };
        for (key, target, forwarder) in new_routes {
            let forwarder: Arc<dyn Sink> = match &self.cluster {
                Some(cluster) => Arc::new(ClusterDeliveryId {
                    inner: forwarder,
                    cluster: cluster.clone(),
                    route: key.clone(),
                }),
                None => forwarder,
            };
            let mut task = self.route(key.clone(), forwarder, plan.retry);
            if let Some(channel) = route_channels.get(&key) {
                self.feed(&mut task, &key, vec![self.subject(channel)]);
            }
            changes.push(format!("target {} started", spool::route_name(&key)));
            self.routes.insert(key, RouteTask { target, task });
        }

        // The pipeline and its alert route.
        match (plan.pipeline, self.pipeline.take()) {
            (None, None) => {}
            (None, Some(old)) => {
                old.task.stop().await;
                old.alerts.stop().await;
                changes.push("pipeline off".into());
            }
            (Some((pipeline, sink)), old) => {
                let slack = sink.slack.as_ref().map(|f| f.target().clone());
                let sink: Arc<dyn Sink> = Arc::new(sink);
                let alerts_to = sink.describe();
                // What changed, not what runs (helper-144: every reload said "pipeline on").
                match &old {
                    None => changes.push(format!(
                        "pipeline on ({}, alerts to {alerts_to})",
                        crate::error::count(pipeline.rules.len(), "rule", "rules"),
                    )),
                    Some(old) if old.alerts_to != alerts_to => {
                        changes.push(format!("alerts to {alerts_to}"));
                    }
                    Some(_) => {}
                }
                if let Some(old) = &old {
                    changes.extend(rule_changes(&old.rules.borrow().rules, &pipeline.rules));
                    if old.slack.is_some() && slack.is_some() && old.slack != slack {
                        changes.push("[slack] webhook_url changed".into());
                    }
                }
                crate::pipeline::runner::count_rules(&pipeline.rules);
                let pipeline = Arc::new(pipeline);
                // Alerts going where they went keep their route, with its pace and its wait
                // (helper-145: a route started anew at each reload sent its failing head at
                // once, three SIGHUPs three messages to Slack within a second).
                let same_sink = (old.as_ref())
                    .is_some_and(|old| old.slack == slack && old.alerts_to == alerts_to);
                let (task, rules, lock, kept) = match old {
                    Some(old) => {
                        // The runner takes the new rules between events; the alert route
                        // hands over to one with the new sink, if it changed.
                        old.rules.send_replace(pipeline);
                        let kept = if same_sink {
                            Some(old.alerts)
                        } else {
                            old.alerts.stop().await;
                            None
                        };
                        (old.task, old.rules, old._lock, kept)
                    }
                    None => {
                        let (rules, rules_rx) = watch::channel(pipeline);
                        let cancel = self.cancel.child_token();
                        let (handle, done) = spawn_local(
                            &self.health,
                            "the pipeline".into(),
                            &cancel,
                            runner::run(
                                self.spool.clone(),
                                self.writer.clone(),
                                rules_rx,
                                self.cluster.clone(),
                                cancel.clone(),
                            ),
                        );
                        let mut task = Task {
                            cancel,
                            handles: vec![handle],
                            done,
                        };
                        self.feed_pipeline(&mut task, pipeline_subjects.clone());
                        let lock = pipeline_lock.clone().expect("taken in step 1");
                        (task, rules, lock, None)
                    }
                };
                // In a cluster the runner queues alerts on their outbox; the alert route is
                // fed from the cluster.
                let alerts = match kept {
                    Some(alerts) => alerts,
                    None => self.produced_route(
                        ALERT_ROUTE.to_string(),
                        crate::cluster::outbox_route(&crate::cluster::produced_key(ALERT_ROUTE)),
                        ALERT_ROUTE,
                        sink,
                        plan.retry,
                    ),
                };
                self.pipeline = Some(PipelineTask {
                    task,
                    rules,
                    alerts,
                    slack,
                    alerts_to,
                    _lock: lock,
                });
            }
        }

        self.apply_actions(plan.actions, plan.retry, &mut changes, &pipeline_subjects)
            .await;
        self.apply_reconcile(reconcile, &mut changes).await;

        for (key, channel, lock) in to_start {
            let is_new = lock.is_some();
            let Some(lock) = lock.or_else(|| kept_locks.remove(&key)) else {
                continue;
            };
            if let Some(running) = self.start_channel(&channel, lock, actions_on, is_new) {
                if is_new {
                    changes.push(format!("channel {} added", channel.source.channel));
                }
                self.channels.insert(key, running);
            }
        }
        *self.health.channels.lock().expect("not poisoned") =
            self.channels.values().map(|c| c.status.clone()).collect();
        Ok(changes)
    }

    /// Say which of `channel`'s queues in the spool still hold deliveries that no route of this
    /// relay takes (a relay started again with another target, or a target a reload removed):
    /// they are kept, not delivered, and without a word they would look lost. Looked at off
    /// the event loop: a count over a long queue takes a while.
    fn say_unserved(&self, channel: &ChannelPlan, key: &str, routes: &[String]) {
        let mut served = routes.to_vec();
        // In a cluster its forward queues are fed from the cluster, not from `routes`.
        served.extend(channel.forward.iter().map(|t| route_key(channel, t)));
        let (spool, key, hint) = (self.spool.clone(), key.to_string(), self.unserved_hint());
        let shown = channel.source.channel.to_string();
        tokio::task::spawn_blocking(move || match spool.unserved_queues(&key, &served) {
            Ok(unserved) => {
                for (queue, pending) in unserved {
                    say_unserved_queue(Some(&shown), &queue, pending, Unserved::Target, &hint);
                }
            }
            Err(e) => warn!(
                channel = %shown,
                "cannot look for deliveries queued for other targets: {}",
                crate::error::chain(&e)
            ),
        });
    }

    /// The channels running: their spool keys and their names as logs show them.
    fn channel_names(&self) -> Vec<(String, String)> {
        self.channels
            .values()
            .map(|c| {
                let key = spool::lock::channel_key(c.source.channel.expose().as_str());
                (key, c.source.channel.to_string())
            })
            .collect()
    }

    /// Say which queues in the spool still hold deliveries of channels that are not among
    /// `configured` (channel keys) and that no other relay sharing the state directory holds:
    /// a relay started again without one of its channels keeps that channel's backlog, and
    /// without a word it would look lost. Once, at start (a reload that removes a channel says
    /// so itself); looked at off the event loop.
    fn say_unconfigured(&self, configured: Vec<String>) {
        let (spool, hint, state_dir) = (
            self.spool.clone(),
            self.unserved_hint(),
            self.state_dir.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let queues = match spool.pending_queues() {
                Ok(queues) => queues,
                Err(e) => {
                    return warn!(
                        "cannot look for deliveries queued for channels not in the config: {}",
                        crate::error::chain(&e)
                    );
                }
            };
            for (queue, pending) in queues {
                // Channel queues only: `alerts`, `port-reports` and `produced/...` are the
                // pipeline's and the actions', whose own starts speak of them.
                let Some(key) = channel_of_queue(&queue) else {
                    continue;
                };
                // In a cluster a channel queue holds local copies the cluster gives to another
                // instance; only an outbox holds what the cluster does not have yet.
                if (hint.cluster && !crate::cluster::is_outbox(&queue))
                    || configured.iter().any(|k| k == key)
                    || spool::lock::channel_held(&state_dir, key)
                {
                    continue;
                }
                // The channel as stored with its events (redacted): the key alone says nothing.
                let shown = spool
                    .pending(&queue, 0, 1)
                    .ok()
                    .and_then(|first| first.into_iter().next())
                    .map(|q| q.event.channel);
                say_unserved_queue(shown.as_deref(), &queue, pending, Unserved::Channel, &hint);
            }
        });
    }

    /// Started with actions off (no `[[action]]`, Automation runs not reported): say what the
    /// actions of an earlier run left unsettled, which nothing settles now: runs a stop
    /// interrupted (Port shows them in progress; a handler a kill -9 left runs on unwatched)
    /// and reports to Port still queued. Without a word, Port's page would be all there is.
    fn say_unsettled_runs(&self) {
        if self.cluster.is_some() {
            // The cluster's instances share the runs: another may have them on.
            return;
        }
        let (spool, state_dir) = (
            self.spool.clone(),
            spool::lock::state_dir_arg(&self.state_dir),
        );
        tokio::task::spawn_blocking(move || {
            let interrupted: Vec<(String, crate::actions::RunState)> =
                match crate::actions::stored_runs(&spool) {
                    Ok(runs) => runs
                        .into_iter()
                        .filter(|(_, state)| state.run_phase == crate::actions::RunPhase::Running)
                        .collect(),
                    Err(e) => {
                        return warn!(
                            "cannot look for action runs left unsettled: {}",
                            crate::error::chain(&e)
                        );
                    }
                };
            for (run, state) in &interrupted {
                let handler = match &state.process {
                    Some(process) => format!(
                        "; its handler (pid {}) may still run, unwatched",
                        process.pid
                    ),
                    None => String::new(),
                };
                warn!(
                    run = %run,
                    action = %state.action,
                    "action run interrupted by the last stop, not settled: this relay has no \
                     [[action]] (nor `report_automation_runs`), so nothing reports it and Port \
                     shows it in progress{handler}. Start the relay with its [[action]] again \
                     (its `on_interrupt` decides: run again, or FAILURE)"
                );
            }
            match spool.queued(crate::actions::REPORT_ROUTE) {
                Ok(0) => {}
                Ok(n) => warn!(
                    queued = n,
                    "reports to Port (run logs and statuses) wait in the spool, unsent: this \
                     relay has no [[action]] (nor `report_automation_runs`). They are sent when \
                     it runs with them again; `smee-relay events list --status pending{state_dir}` \
                     shows them"
                ),
                Err(e) => warn!(
                    "cannot count the reports to Port left queued: {}",
                    crate::error::chain(&e)
                ),
            }
        });
    }

    /// A reload removed the target of queue `name` (of channel `channel`, if known): say what
    /// still waits on it.
    async fn say_removed_target(&self, name: &str, channel: Option<&str>) {
        let target = spool::route_name(name);
        // In a cluster the backlog is in the cluster's stream, not in this spool; asked off the
        // reload (NATS may be slow to answer).
        if let Some(cluster) = &self.cluster {
            let (cluster, name, target) = (cluster.clone(), name.to_string(), target.to_string());
            tokio::spawn(async move {
                match cluster.route_backlog(&name).await {
                    Some((stream, consumer, waiting)) if waiting > 0 => warn!(
                        %target,
                        "target removed; this instance no longer delivers to it. The cluster keeps {waiting} event(s) for it: an instance that still has this target delivers them; if none does, nothing will, and `nats consumer rm {stream} {consumer}` removes them (and the target's consumer)"
                    ),
                    Some((stream, consumer, _)) => info!(
                        %target,
                        "target removed; this instance no longer delivers to it, and nothing waits for it in the cluster (once no instance has this target, `nats consumer rm {stream} {consumer}` removes its consumer)"
                    ),
                    None => info!(
                        %target,
                        "target removed; this instance no longer delivers to it (NATS did not say what the cluster holds for it)"
                    ),
                }
            });
            return;
        }
        let (spool, queue) = (self.spool.clone(), name.to_string());
        match tokio::task::spawn_blocking(move || spool.queued(&queue)).await {
            Ok(Ok(0)) => {
                info!(%target, "target removed; nothing was queued for it");
                // Known, at 0: an `events replay` may queue some for it again.
                self.counters.unserved(name, &target, 0);
            }
            Ok(Ok(pending)) => say_unserved_queue(
                channel,
                name,
                pending,
                Unserved::Target,
                &self.unserved_hint(),
            ),
            Ok(Err(e)) => warn!(
                %target,
                "target removed; cannot count what is still queued for it: {}",
                crate::error::chain(&e)
            ),
            Err(e) => {
                warn!(%target, "target removed; cannot count what is still queued for it: {e}")
            }
        }
    }

    /// What the commands a line about an unserved queue names need.
    fn unserved_hint(&self) -> Hint {
        Hint {
            counters: self.counters.clone(),
            state_dir: spool::lock::state_dir_arg(&self.state_dir),
            cluster: self.cluster.is_some(),
        }
    }

    /// Subscribe to a channel, resuming after the last event stored (for servers that replay,
    /// such as smee-relay serve). `None` (logged) if its source cannot be built.
    /// `is_new`: not a restart by a reload, which says nothing new of its old queues.
    fn start_channel(
        &self,
        channel: &ChannelPlan,
        lock: ChannelLock,
        actions_on: bool,
        is_new: bool,
    ) -> Option<ChannelTask> {
        let url = channel.source.channel.clone();
        let routes = routes_of(channel, actions_on, self.cluster.is_some());
        // Named as the queue's line names it, a target's query left out.
        let shown: Vec<String> = (routes.iter())
            .map(|r| match r.split_once(' ') {
                Some((key, _)) => format!("{key} {}", spool::route_name(r)),
                None => r.clone(),
            })
            .collect();
        info!(channel = %url, routes = ?shown, "subscribing");
        if let Some(problem) = crate::source::idle_timeout_problem(channel.source.idle_timeout) {
            warn!(channel = %url, "{problem}");
        }
        let cursor_key = spool::lock::channel_key(url.expose().as_str());
        // A spool from before queues were per channel: this channel's share moves over.
        let legacy_key = spool::lock::legacy_channel_key(url.expose().as_str());
        let targets: Vec<String> = channel.forward.iter().map(route_name).collect();
        match self
            .spool
            .adopt_legacy(&cursor_key, &legacy_key, &url.to_string(), &targets)
        {
            Ok(0) => {}
            Ok(adopted) => info!(
                channel = %url,
                deliveries = adopted,
                "spool upgraded: queued deliveries moved to this channel's queues"
            ),
            Err(e) => error!(
                channel = %url,
                "cannot move this channel's queued deliveries from the old spool layout: {}",
                crate::error::chain(&e)
            ),
        }
        if is_new {
            self.say_unserved(channel, &cursor_key, &routes);
        }
        let mut source_config = channel.source.clone();
        match self.spool.cursor(&cursor_key) {
            Ok(Some(stored)) => source_config.last_event_id = Some(stored),
            Ok(None) => {}
            Err(e) => {
                warn!(channel = %url, "cannot read where the channel stopped, starting without Last-Event-ID: {e}")
            }
        }
        // It was built once already while the plan was checked; the same client builds again.
        let source = match source_config.build() {
            Ok(source) => source,
            Err(e) => {
                error!(channel = %url, "cannot subscribe: {}", crate::error::chain(&e));
                return None;
            }
        };
        let status = source.status();
        let (routes_tx, routes_rx) = watch::channel(routes);
        let (events_tx, events_rx) = crate::source::queue::channel(QUEUE_BYTES);
        let cancel = self.cancel.child_token();
        // Subscribed before the source runs, so its first connection counts as a gap's end.
        let catch_up = channel.source.github_catch_up.clone().map(|config| {
            let to = super::catch_up::Destination {
                channel: url.to_string(),
                routes: routes_rx.borrow().clone(),
                ignore_events: channel.source.ignore_events.clone(),
            };
            super::catch_up::after_gaps(
                self.spool.clone(),
                config,
                to,
                routes_rx.clone(),
                status.connections(),
                cancel.clone(),
            )
        });
        let mut handles = vec![
            tokio::spawn(self.health.watch(
                format!("channel {}", status.name),
                cancel.clone(),
                source.run(events_tx, cancel.clone()),
            )),
            tokio::spawn(
                self.health.watch(
                    format!("the intake of channel {}", status.name),
                    cancel.clone(),
                    spool::intake::intake_saving(
                        events_rx,
                        self.writer.clone(),
                        url.to_string(),
                        Some(cursor_key),
                        routes_rx,
                        self.counters.clone(),
                        // The scripts POST to the channel's first target by default.
                        channel
                            .save_dir
                            .clone()
                            .zip(channel.forward.first().cloned())
                            .map(|(dir, target)| spool::export::SaveDir::start(dir, target)),
                    ),
                ),
            ),
        ];
        handles.extend(catch_up.map(tokio::spawn));
        if channel.pipeline {
            // Events posted while it was not connected are gone: each (re)connection asks the
            // reconciler to read Port's state.
            handles.push(tokio::spawn(reconcile::watch_channel(
                status.clone(),
                self.gaps.clone(),
                cancel.clone(),
            )));
        }
        if let Some(cluster) = &self.cluster {
            // The outbox: what this instance received, published until NATS has it.
            let outbox = crate::cluster::outbox_route(&channel_key(channel));
            let sink = Arc::new(Publish {
                cluster: cluster.clone(),
                channel_key: channel_key(channel),
                produced: false,
            });
            let what = format!("outbox {}", spool::route_name(&outbox));
            handles.push(tokio::spawn(self.health.watch(
                what,
                cancel.clone(),
                delivery::run_route(
                    self.spool.clone(),
                    self.writer.clone(),
                    outbox,
                    sink,
                    outbox_policy(self.shutdown_timeout),
                    self.counters.clone(),
                    delivery::RouteControl::new(cancel.clone()),
                ),
            )));
        }
        Some(ChannelTask {
            task: Task {
                cancel,
                handles,
                done: CancellationToken::new(),
            },
            source: channel.source.clone(),
            routes: routes_tx,
            status,
            lock,
        })
    }

    /// Start, swap or stop the actions route and its Port reports route, handing over as the
    /// pipeline does: the runner takes the new actions between runs, the reports route stops
    /// (its marks committed) before the new one starts.
    async fn apply_actions(
        &mut self,
        plan: Option<(
            crate::actions::runner::Actions,
            crate::notify::port::PortReporter,
        )>,
        retry: RetryPolicy,
        changes: &mut Vec<String>,
        pipeline_subjects: &[String],
    ) {
        use crate::actions::{REPORT_ROUTE, runner};
        match (plan, self.actions.take()) {
            (None, None) => {}
            (None, Some(old)) => {
                old.task.stop().await;
                old.reports.stop().await;
                changes.push("actions off; runs queued for them stay in the spool".into());
            }
            (Some((actions, reporter)), old) => {
                // What changed, not what runs (helper-145, helper-146: every reload said
                // "actions on (1)", and none said a new `api_url`).
                let api = reporter.api().clone();
                let same_api = old.as_ref().is_some_and(|old| old.api.same_as(&api));
                match &old {
                    None => changes.push(match (actions.actions.len(), &actions.automation_runs) {
                        (0, Some(_)) => "Automation runs reported (no [[action]])".to_string(),
                        (n, Some(_)) => format!("actions on ({n}; Automation runs reported)"),
                        (n, None) => format!("actions on ({n})"),
                    }),
                    Some(_) if !same_api => changes.push(
                        "[port] api_url or credentials changed: the reports go with them".into(),
                    ),
                    Some(_) => {}
                }
                for action in &actions.actions {
                    // As `check` does: a program that is not there fails every run.
                    if let crate::actions::Handler::Command(argv) = &action.handler
                        && let Some(problem) = crate::actions::command_problem(argv)
                    {
                        warn!(
                            "[[action]] {}: {problem}: its runs fail until it can be run",
                            action.name
                        );
                    }
                    for unset in action.unset_env() {
                        warn!(
                            "[[action]] {}: env lists {unset}, which is not set in the relay's environment: its handler does not get it",
                            action.name
                        );
                    }
                }
                if let Some(old) = &old {
                    let was = old.config.borrow().automation_runs.is_some();
                    if was != actions.automation_runs.is_some() {
                        changes.push(format!(
                            "[port] report_automation_runs {}",
                            if was { "off" } else { "on" }
                        ));
                    }
                    changes.extend(action_changes(
                        &old.config.borrow().actions,
                        &actions.actions,
                    ));
                }
                let actions = Arc::new(actions);
                let (task, config, kept) = match old {
                    Some(old) => {
                        old.config.send_replace(actions);
                        let kept = if same_api {
                            Some(old.reports)
                        } else {
                            old.reports.stop().await;
                            None
                        };
                        (old.task, old.config, kept)
                    }
                    None => {
                        let (config, config_rx) = watch::channel(actions);
                        let cancel = self.cancel.child_token();
                        let (handle, done) = spawn_local(
                            &self.health,
                            "the actions runner".into(),
                            &cancel,
                            runner::run(
                                self.spool.clone(),
                                self.writer.clone(),
                                config_rx,
                                cancel.clone(),
                            ),
                        );
                        let mut task = Task {
                            cancel,
                            handles: vec![handle],
                            done,
                        };
                        self.feed(
                            &mut task,
                            crate::actions::ACTIONS_ROUTE,
                            pipeline_subjects.to_vec(),
                        );
                        (task, config, None)
                    }
                };
                // In a cluster the runner's report queue is the outbox; the reporter's route
                // is fed from the cluster.
                let reports = match (kept, &self.cluster) {
                    (Some(reports), _) => reports,
                    (None, None) => self.route(REPORT_ROUTE.to_string(), Arc::new(reporter), retry),
                    (None, Some(_)) => self.produced_route(
                        reports_delivery_route(),
                        REPORT_ROUTE.to_string(),
                        REPORT_ROUTE,
                        Arc::new(reporter),
                        retry,
                    ),
                };
                self.actions = Some(ActionsTask {
                    task,
                    config,
                    reports,
                    api,
                });
            }
        }
    }

    /// Start, restart or stop the reconciler. It follows the pipeline's rules as they are
    /// swapped, so only a change of its own settings restarts it (which reconciles at once).
    async fn apply_reconcile(&mut self, wanted: Reconcile, changes: &mut Vec<String>) {
        let start = match wanted {
            Reconcile::Keep => return,
            Reconcile::Off => None,
            Reconcile::Start(plan, client) => Some((plan, client)),
        };
        let restarted = self.reconciler.is_some();
        if let Some(old) = self.reconciler.take() {
            old.task.stop().await;
            if start.is_none() {
                changes.push("Port reconciliation off".into());
            }
        }
        let (Some((plan, client)), Some(pipeline)) = (start, &self.pipeline) else {
            // No reconciliation now: a failing run of the one stopped is nobody's to end.
            self.counters.reconcile_ok();
            return;
        };
        changes.push(format!(
            "Port reconciliation every {}, at start and after every reconnect",
            humantime::format_duration(plan.interval)
        ));
        let cancel = self.cancel.child_token();
        let handle = tokio::spawn(reconcile::run(
            self.spool.clone(),
            self.writer.clone(),
            client,
            plan.interval,
            gap_spacing(),
            pipeline.rules.subscribe(),
            self.gaps.clone(),
            self.counters.clone(),
            restarted,
            cancel.clone(),
        ));
        self.reconciler = Some(ReconcilerTask {
            plan,
            task: Task {
                cancel,
                handles: vec![handle],
                done: CancellationToken::new(),
            },
        });
    }

    /// In a cluster: feed local `route` from its NATS consumer on `subjects`, as part of `task`.
    fn feed(&self, task: &mut Task, route: &str, subjects: Vec<String>) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        if subjects.is_empty() {
            return;
        }
        task.handles.push(tokio::spawn(cluster.clone().feed(
            route.to_string(),
            subjects,
            self.spool.clone(),
            self.writer.clone(),
            task.cancel.clone(),
            task.done.clone(),
        )));
    }

    /// In a cluster: feed the pipeline route from its NATS consumer, acking each event once
    /// the alerts its judgement produced are published ([`Cluster::feed_producing`]).
    fn feed_pipeline(&self, task: &mut Task, subjects: Vec<String>) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        if subjects.is_empty() {
            return;
        }
        task.handles
            .push(tokio::spawn(cluster.clone().feed_producing(
                PIPELINE_ROUTE.to_string(),
                subjects,
                crate::cluster::outbox_route(&crate::cluster::produced_key(ALERT_ROUTE)),
                self.spool.clone(),
                self.writer.clone(),
                task.cancel.clone(),
                task.done.clone(),
            )));
    }

    /// The route delivering what this relay produces (alerts, Port reports) to `sink`. In a
    /// cluster it is three parts, stopped together: the producer's queue `outbox` published to
    /// the stream under [`crate::cluster::produced_key`]`(produced)`, the durable consumer
    /// that feeds local `route` (one in flight cluster-wide, paced as the sink asks), and the
    /// route delivering it. Outside a cluster, just the route.
    fn produced_route(
        &self,
        route: String,
        outbox: String,
        produced: &str,
        sink: Arc<dyn Sink>,
        retry: RetryPolicy,
    ) -> Task {
        let Some(cluster) = &self.cluster else {
            return self.route(route, sink, retry);
        };
        let key = crate::cluster::produced_key(produced);
        let pace = sink.min_interval();
        // As a forward target's: the cluster hears of each attempt (a dead letter is recorded
        // in the cluster, replayable from any instance) and logs give the stream sequence.
        let sink: Arc<dyn Sink> = Arc::new(ClusterDeliveryId {
            inner: sink,
            cluster: cluster.clone(),
            route: route.clone(),
        });
        let mut task = self.route(route.clone(), sink, retry);
        task.handles.push(tokio::spawn(cluster.clone().feed_paced(
            route,
            vec![cluster.subject(&key)],
            self.spool.clone(),
            self.writer.clone(),
            task.cancel.clone(),
            task.done.clone(),
            pace,
        )));
        let publish = Arc::new(Publish {
            cluster: cluster.clone(),
            channel_key: key,
            produced: true,
        });
        let what = format!("outbox {}", spool::route_name(&outbox));
        task.handles.push(tokio::spawn(self.health.watch(
            what,
            task.cancel.clone(),
            delivery::run_route(
                self.spool.clone(),
                self.writer.clone(),
                outbox,
                publish,
                outbox_policy(self.shutdown_timeout),
                self.counters.clone(),
                delivery::RouteControl::new(task.cancel.clone()),
            ),
        )));
        task
    }

    /// A channel's subject in the cluster's stream.
    fn subject(&self, channel_key: &str) -> String {
        self.cluster
            .as_ref()
            .map(|c| c.subject(channel_key))
            .unwrap_or_default()
    }

    fn route(&self, name: String, sink: Arc<dyn Sink>, retry: RetryPolicy) -> Task {
        let cancel = self.cancel.child_token();
        let what = format!("route {}", spool::route_name(&name));
        let (handle, done) = spawn_local(
            &self.health,
            what,
            &cancel,
            delivery::run_route(
                self.spool.clone(),
                self.writer.clone(),
                name,
                sink,
                retry,
                self.counters.clone(),
                delivery::RouteControl {
                    cancel: cancel.clone(),
                    retry_now: self.retry_now.clone(),
                },
            ),
        );
        Task {
            cancel,
            handles: vec![handle],
            done,
        }
    }
}

/// The channel key of a channel's queue (`0123456789abcdef TARGET`); `None` for the queues of
/// no channel (`pipeline`, `alerts`, `port-reports`, `produced/...`).
fn channel_of_queue(queue: &str) -> Option<&str> {
    let (key, _) = queue.split_once(' ')?;
    (key.len() == 16 && key.bytes().all(|b| b.is_ascii_hexdigit())).then_some(key)
}

/// What the commands a line about an unserved queue names need ([`say_unserved_queue`]).
struct Hint {
    /// Where `/healthz` learns of the queue ([`Counters::unserved`]).
    counters: Arc<Counters>,
    /// ` --state-dir DIR`, unless it is the default ([`spool::lock::state_dir_arg`]).
    state_dir: String,
    /// The relay runs in a cluster: `events` reads this machine's spool with `--local`, and
    /// refuses to purge its queues (copies of the cluster's deliveries).
    cluster: bool,
}

/// Why no route of this relay takes a queue ([`say_unserved_queue`]).
#[derive(Clone, Copy)]
enum Unserved {
    /// The relay has the queue's channel but not its target (or not its cluster outbox).
    Target,
    /// The relay does not subscribe to the queue's channel at all.
    Channel,
}

/// Say that `pending` deliveries of `channel` (if known) wait on `queue`, which no route of this
/// relay takes: kept, not delivered, and what to do.
fn say_unserved_queue(
    channel: Option<&str>,
    queue: &str,
    pending: u64,
    why: Unserved,
    hint: &Hint,
) {
    hint.counters
        .unserved(queue, &spool::route_name(queue), pending);
    let (count, events, are) = match pending {
        1 => ("1".to_string(), "event", "is"),
        n if n > spool::MOST_COUNTED => (
            format!("more than {}", spool::MOST_COUNTED),
            "events",
            "are",
        ),
        _ => (pending.to_string(), "events", "are"),
    };
    let list = if hint.cluster {
        format!("{} --local", hint.state_dir)
    } else {
        hint.state_dir.clone()
    };
    // One shell word, whatever the target holds (`&`, `?`, `*`). A query stays out of the log
    // (it often carries a token): the user writes the target as they gave it, after the
    // channel's key (which tells this queue from another channel's of the same target).
    let (name, note) = match spool::route_name(queue) {
        std::borrow::Cow::Borrowed(_) => (format!("'{}'", queue.replace('\'', r"'\''")), ""),
        std::borrow::Cow::Owned(_) => {
            let key = queue.split_once(' ').map_or("", |(key, _)| key);
            (
                format!("'{key} TARGET'"),
                " (TARGET: the target, query and all, as configured or as `events list` shows it)",
            )
        }
    };
    let drop = if hint.cluster {
        String::new()
    } else {
        format!(
            "; to drop them, stop the relay and run `smee-relay events purge --queue {name}{}`{note}",
            hint.state_dir
        )
    };
    if let Unserved::Channel = why {
        let target = spool::route_name(queue);
        warn!(
            channel,
            queued = pending,
            "{count} {events} from a channel this relay does not subscribe to {are} still \
             queued for {target}: kept in the spool, not delivered. To deliver them, run a \
             relay for that channel with this state directory (or put the channel back in the \
             config); to see them, `smee-relay events list --status pending{list}`{drop}"
        );
        return;
    }
    if crate::cluster::is_outbox(queue) {
        warn!(
            channel,
            queued = pending,
            "{count} {events} from this channel {are} still in its cluster outbox, not yet \
             published to the cluster, and this relay runs without one: kept in the spool, not \
             delivered. To publish them, start a relay with the cluster's config (`[cluster]`); \
             to see them, `smee-relay events list --status pending{list}`{drop}"
        );
        return;
    }
    let target = spool::route_name(queue);
    warn!(
        channel,
        queued = pending,
        "{count} {events} from this channel {are} still queued for {target}, which this relay \
         does not deliver this channel's events to: kept in the spool, not delivered. To \
         deliver them, give the relay that target for this channel again (on its command line, \
         or in the channel's `forward` in its config, and reload); to see them, `smee-relay \
         events list --status pending{list}`{drop}"
    );
}

/// In a cluster, the local route the Port reporter delivers from (fed from the cluster);
/// the actions runner's own queue, [`crate::actions::REPORT_ROUTE`], is then the reports'
/// outbox.
fn reports_delivery_route() -> String {
    spool::route_key(
        &crate::cluster::produced_key(crate::actions::REPORT_ROUTE),
        "port",
    )
}

/// What a reload does to the reconciler.
enum Reconcile {
    /// Keep the running one: nothing it depends on changed.
    Keep,
    /// (Re)start it with this plan and client.
    Start(ReconcilePlan, Arc<PortClient>),
    /// Stop it, if it runs.
    Off,
}

/// The spool routes a channel's events are queued on: in a cluster, only its outbox (the
/// routes are fed from NATS).
pub fn routes_of(channel: &ChannelPlan, actions: bool, cluster: bool) -> Vec<String> {
    if cluster {
        return vec![crate::cluster::outbox_route(&channel_key(channel))];
    }
    let mut routes: Vec<String> = channel
        .forward
        .iter()
        .map(|t| route_key(channel, t))
        .collect();
    if channel.pipeline {
        routes.push(PIPELINE_ROUTE.to_string());
    }
    if channel.pipeline && actions {
        routes.push(crate::actions::ACTIONS_ROUTE.to_string());
    }
    routes
}

/// Every few seconds: spool gauges for `/metrics`, and a status line for `systemctl status`.
async fn report_status(
    spool: Arc<Spool>,
    health: Arc<Health>,
    counters: Arc<Counters>,
    cluster: Option<Cluster>,
    cancel: CancellationToken,
) {
    use std::sync::atomic::Ordering::Relaxed;
    // The spool's figures change only when the file does: an idle relay reads them once, not
    // every few seconds (the file as it was before the last read, and what that read said).
    let mut last: Option<(spool::Seen, String)> = None;
    loop {
        let pending = match &last {
            Some((seen, pending)) if !spool.changed_since(seen) => pending.clone(),
            _ => {
                let seen = spool.look();
                let stats = {
                    let (spool, counters) = (spool.clone(), counters.clone());
                    tokio::task::spawn_blocking(move || {
                        // A queue no route takes may have been purged since (`events purge`
                        // runs beside the relay once the queue's channel is gone), or filled
                        // again (`events replay`).
                        for queue in counters.unserved_queues() {
                            let Ok(pending) = spool.queued(&queue) else {
                                continue;
                            };
                            if counters.unserved_recounted(&queue, pending) {
                                warn!(
                                    target = %spool::route_name(&queue),
                                    queued = pending,
                                    "deliveries were queued again (`events replay`) for a \
                                     target this relay no longer delivers to: kept, not \
                                     delivered, until a relay with that target runs or they \
                                     are purged (`smee-relay events list --status pending` \
                                     shows them)"
                                );
                            }
                        }
                        spool.stats()
                    })
                    .await
                };
                // While the spool cannot be read (a full disk), the line still says why.
                match stats {
                    Ok(Ok(stats)) => {
                        metrics::gauge!("smee_relay_spool_pending").set(stats.pending as f64);
                        metrics::gauge!("smee_relay_spool_bytes").set(stats.stored_bytes as f64);
                        let pending = stats.pending.to_string();
                        last = Some((seen, pending.clone()));
                        pending
                    }
                    _ => {
                        last = None;
                        "?".into()
                    }
                }
            }
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
        // In a cluster: whether NATS is there, and which routes this instance delivers.
        let cluster_part = match &cluster {
            Some(cluster) => {
                let connected = cluster.connected();
                metrics::gauge!("smee_relay_cluster_connected").set(if connected {
                    1.0
                } else {
                    0.0
                });
                let routes = cluster.delivering(Duration::from_secs(60));
                format!(
                    "cluster {} ({}), delivering: {}; ",
                    cluster.settings().name,
                    if connected {
                        "NATS up"
                    } else {
                        "NATS DOWN, receipts kept locally"
                    },
                    if routes.is_empty() {
                        "none".to_string()
                    } else {
                        routes.join(", ")
                    }
                )
            }
            None => String::new(),
        };
        // A target that keeps failing holds its route's queue: said first, as a pause is.
        let failing: String = counters
            .failing(crate::clock::now_ms())
            .into_iter()
            .map(|route| route + "; ")
            .collect();
        let line = format!(
            "{paused}{failing}{cluster_part}{up}/{all} channels connected; {} received, {} delivered, {} retried, {} dead; {pending} pending",
            counters.received.load(Relaxed),
            counters.delivered.load(Relaxed),
            counters.retried.load(Relaxed),
            counters.dead.load(Relaxed),
        );
        systemd::status(&line);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// The least time between two reconciliations asked for by gaps:
/// `SMEE_RELAY_RECONCILE_GAP_SPACING` (a duration, for tests and a lab Port), else
/// [`reconcile::MIN_GAP_SPACING`].
fn gap_spacing() -> Duration {
    std::env::var("SMEE_RELAY_RECONCILE_GAP_SPACING")
        .ok()
        .and_then(|v| crate::clock::parse_duration(&v).ok())
        .unwrap_or(reconcile::MIN_GAP_SPACING)
}

#[cfg(test)]
mod tests {
    /// The stop line says "nothing" only when nothing of any kind is left, and each kind of
    /// leftover once (it was worded by replacing words of another line).
    #[test]
    fn stop_line_words_each_leftover_once() {
        use super::{Waiting, stop_line};
        let waiting = |deliveries, kept| {
            Some(Waiting {
                deliveries,
                at_least: false,
                kept,
            })
        };
        let kept = "1 event stays queued for a target this relay no longer delivers to (its warning says what to do)";
        let runs = "2 action runs were interrupted, settled at the next start (Port shows them in progress until then)";
        for (waiting, interrupted, said) in [
            (
                waiting(0, 0),
                0,
                "nothing waits: everything received was delivered".to_string(),
            ),
            (
                waiting(0, 0),
                2,
                format!("no delivery waits in the spool; {runs}"),
            ),
            (
                waiting(0, 1),
                0,
                format!("nothing waits for this relay's targets; {kept}"),
            ),
            (
                waiting(0, 1),
                2,
                format!("nothing waits for this relay's targets; {kept}; {runs}"),
            ),
            (
                waiting(1, 1),
                0,
                format!("1 delivery waits in the spool for the next start; {kept}"),
            ),
            (
                Some(Waiting {
                    deliveries: 7,
                    at_least: true,
                    kept: 0,
                }),
                2,
                format!("at least 7 deliveries wait in the spool for the next start; {runs}"),
            ),
            (
                None,
                2,
                format!("what was not delivered waits in the spool for the next start; {runs}"),
            ),
        ] {
            assert_eq!(stop_line(waiting, interrupted, 0), said);
        }
        // Regression (helper-137): "nothing waits: everything received was delivered" right
        // below the error saying that 102 received events were never stored.
        assert_eq!(
            stop_line(waiting(0, 0), 0, 102),
            "no delivery waits in the spool; 102 received events were never stored, the spool \
             refusing writes (lost unless the channel sends them again)"
        );
    }

    /// A reload that changed a rule said only "pipeline on (2 rules, ...)" (helper-106): it
    /// now names each rule added, changed (not merely moved in the file) or removed.
    #[test]
    fn regression_a_reload_did_not_say_which_rules_changed() {
        use crate::pipeline::rules::{Condition, Rule};
        let rule = |name: &str, above: f64, origin: &str| Rule {
            name: name.into(),
            blueprint: None,
            condition: Condition::Above {
                property: "cpu".into(),
                above,
                clear_below: above - 10.0,
            },
            hold: Duration::ZERO,
            severity: "warning".into(),
            origin: origin.into(),
        };
        let old = [
            rule("cpu-high", 80.0, "c.toml:3"),
            rule("gone", 1.0, "c.toml:9"),
        ];
        let new = [
            rule("cpu-high", 90.0, "c.toml:3"),
            rule("moved", 5.0, "c.toml:20"),
        ];
        assert_eq!(
            super::rule_changes(&old, &new),
            [
                "rule cpu-high changed",
                "rule moved added",
                "rule gone removed"
            ]
        );
        // Moved in the file, same meaning: nothing to say.
        let moved = [
            rule("cpu-high", 80.0, "c.toml:30"),
            rule("gone", 1.0, "c.toml:2"),
        ];
        assert!(super::rule_changes(&old, &moved).is_empty());
    }

    /// Regression (an adversary's finding): stopped on a full disk, the relay was cut off by
    /// the backstop (exit 1, at `--shutdown-timeout` + 3 s) before the intake said how many
    /// received events were never stored (2 s of drain and 5 s of tries after the stop).
    #[test]
    fn regression_the_backstop_waits_for_a_full_disks_stop_to_say_what_it_lost() {
        for timeout in [0, 1, 5] {
            let bound = super::shutdown_bound(Duration::from_secs(timeout));
            assert!(
                bound >= Duration::from_secs(8) + super::SHUTDOWN_MARGIN,
                "{bound:?}"
            );
        }
        let long = Duration::from_secs(60);
        assert_eq!(super::shutdown_bound(long), long + super::SHUTDOWN_MARGIN);
    }

    use super::*;

    /// A reload changing `[cluster]` was refused with `[cluster] changed; that takes a
    /// restart`, not saying which setting: the user had to diff the file.
    #[test]
    fn regression_the_cluster_reload_refusal_did_not_name_the_changed_keys() {
        let running =
            crate::cluster::Settings::new("nats://h:4222".to_string().into(), "prod".into());
        let mut new = running.clone();
        assert!(cluster_changes(Some(&new), Some(&running)).is_empty());
        new.ack_wait = Duration::from_secs(5);
        new.url = "nats://other:4222".to_string().into();
        let changed = cluster_changes(Some(&new), Some(&running));
        assert_eq!(changed, ["nats_url", "ack_wait"]);
        assert_eq!(
            DaemonError::ClusterChanged(changed.join(", ")).to_string(),
            "[cluster] changed (nats_url, ack_wait); that takes a restart"
        );
        assert_eq!(cluster_changes(Some(&new), None), ["added"]);
        assert_eq!(cluster_changes(None, Some(&running)), ["removed"]);
    }
}
