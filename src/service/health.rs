//! Health and metrics: what `/healthz` judges, the Prometheus recorder, and the small HTTP server
//! that serves both (`--metrics-listen`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::source::status::ChannelStatus;

/// What each of the relay's metrics counts: its `# HELP` line in `/metrics` (the README's table
/// says more; a test keeps the two lists the same).
const DESCRIBED: &[(&str, Kind, &str)] = &[
    (
        "smee_relay_events_received_total",
        Kind::Counter,
        "Events stored in the spool.",
    ),
    (
        "smee_relay_events_refused_total",
        Kind::Counter,
        "Events refused because the spool was full.",
    ),
    (
        "smee_relay_deliveries_total",
        Kind::Counter,
        "Successful deliveries, per route.",
    ),
    (
        "smee_relay_retries_total",
        Kind::Counter,
        "Failed attempts that will be retried, per route.",
    ),
    (
        "smee_relay_dead_letters_total",
        Kind::Counter,
        "Deliveries given up on, per route.",
    ),
    (
        "smee_relay_delivery_seconds",
        Kind::Histogram,
        "Time of successful deliveries, per route.",
    ),
    (
        "smee_relay_route_failing",
        Kind::Gauge,
        "1 while the event at the head of the route's queue is being retried, per route.",
    ),
    (
        "smee_relay_spool_pending",
        Kind::Gauge,
        "Deliveries waiting in the spool.",
    ),
    (
        "smee_relay_spool_bytes",
        Kind::Gauge,
        "Stored event bytes (compare with --max-spool-size).",
    ),
    (
        "smee_relay_intake_paused",
        Kind::Gauge,
        "1 while new events wait in memory because the spool does not take them.",
    ),
    (
        "smee_relay_channel_connected",
        Kind::Gauge,
        "1 while the channel is connected.",
    ),
    (
        "smee_relay_reconnects_total",
        Kind::Counter,
        "Channel connections lost.",
    ),
    (
        "smee_relay_events_ignored_total",
        Kind::Counter,
        "Events skipped as ignore_events asks.",
    ),
    (
        "smee_relay_bad_frames_total",
        Kind::Counter,
        "Frames skipped, by kind (refused, too_large, malformed, unknown_type, gap).",
    ),
    (
        "smee_relay_catch_up_runs_total",
        Kind::Counter,
        "Catch-ups run after a gap, by outcome.",
    ),
    (
        "smee_relay_catch_up_recovered_total",
        Kind::Counter,
        "Events catch-ups recovered and queued.",
    ),
    (
        "smee_relay_alerts_total",
        Kind::Counter,
        "Alerts produced, by rule and status (FIRING, RESOLVED).",
    ),
    (
        "smee_relay_rule_errors_total",
        Kind::Counter,
        "Failed rule evaluations, by rule and kind.",
    ),
    (
        "smee_relay_pipeline_refused_total",
        Kind::Counter,
        "Events the pipeline refused as bad input, by reason.",
    ),
    (
        "smee_relay_reconciliations_total",
        Kind::Counter,
        "Reconciliations with Port, by result.",
    ),
    (
        "smee_relay_reconcile_entities_total",
        Kind::Counter,
        "Entities compared with the alert state by reconciliation.",
    ),
    (
        "smee_relay_reconcile_newer_live_total",
        Kind::Counter,
        "Entities a reconciliation left to a newer live change.",
    ),
    (
        "smee_relay_reconcile_alerts_total",
        Kind::Counter,
        "Alerts found by reconciliation, by rule and status.",
    ),
    (
        "smee_relay_reconcile_last_success_seconds",
        Kind::Gauge,
        "When the last reconciliation read Port (Unix seconds).",
    ),
    (
        "smee_relay_action_runs_started_total",
        Kind::Counter,
        "Action handlers started, per action.",
    ),
    (
        "smee_relay_action_runs_finished_total",
        Kind::Counter,
        "Action runs ended, per action and outcome.",
    ),
    (
        "smee_relay_action_run_seconds",
        Kind::Histogram,
        "How long action handlers took, per action.",
    ),
    (
        "smee_relay_action_report_errors_total",
        Kind::Counter,
        "Reports Port did not take, by kind.",
    ),
    (
        "smee_relay_cluster_connected",
        Kind::Gauge,
        "1 while connected to the cluster's NATS.",
    ),
    (
        "smee_relay_cluster_consumer_lag",
        Kind::Gauge,
        "Cluster messages not yet delivered (in flight included), per route.",
    ),
    (
        "smee_relay_cluster_consumer_redelivered",
        Kind::Gauge,
        "Messages the route's consumer redelivered, per route.",
    ),
    (
        "smee_relay_cluster_redeliveries_total",
        Kind::Counter,
        "Deliveries this instance took over from another, per route.",
    ),
    (
        "smee_relay_cluster_skipped_total",
        Kind::Counter,
        "Repeats a crashed NATS offered, not delivered, per route.",
    ),
];

/// A metric's type, for [`DESCRIBED`].
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Start recording metrics; the handle renders them in Prometheus text format.
pub fn install_metrics() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&[
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ])?
        // An action run takes seconds to minutes (its `timeout` defaults to 10m).
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("smee_relay_action_run_seconds".into()),
            &[
                0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0,
            ],
        )?
        .install_recorder()?;
    for (name, kind, help) in DESCRIBED {
        match kind {
            Kind::Counter => metrics::describe_counter!(*name, *help),
            Kind::Gauge => metrics::describe_gauge!(*name, *help),
            Kind::Histogram => metrics::describe_histogram!(*name, *help),
        }
    }
    Ok(handle)
}

/// What `/healthz` looks at: each channel's liveness, whether the spool takes writes, and
/// whether every task that consumes a queue still runs.
#[derive(Default)]
pub struct Health {
    pub channels: std::sync::Mutex<Vec<Arc<ChannelStatus>>>,
    /// False after a failed spool commit, true again after a good one (set by the writer).
    pub spool_writable: Arc<AtomicBool>,
    /// Why appends wait, if they do (set by the writer: the spool's disk short of room for
    /// `--keep-free`, or a failed commit): `spool_writable` is false then, and this says why.
    pub spool_paused_why: Arc<std::sync::Mutex<Option<String>>>,
    /// In a cluster: NATS unreachable past the grace period is a problem.
    pub cluster: Option<crate::cluster::Cluster>,
    /// The watched tasks ([`Health::watch`]) that ended before they were asked to, how, and
    /// their token: a queue nobody consumes fills up unseen, so it is a problem until a task
    /// of that name starts again, or the token fires (the task's part was stopped on purpose:
    /// a reload removed its target, a shutdown).
    pub(crate) stopped: std::sync::Mutex<BTreeMap<String, (&'static str, CancellationToken)>>,
    /// The routes' failing targets, for [`Health::warnings`].
    pub counters: Arc<crate::counters::Counters>,
}

/// Says, once dropped, that its task ended before its token asked it to ([`Health::watch`]).
struct Watched {
    health: Arc<Health>,
    what: String,
    cancel: CancellationToken,
}

impl Drop for Watched {
    fn drop(&mut self) {
        if self.cancel.is_cancelled() {
            return;
        }
        let how = if std::thread::panicking() {
            "panicked"
        } else {
            "stopped"
        };
        tracing::error!(
            "{} {how}: what it takes care of waits (in the spool, nothing is lost); /healthz \
             reports it until it runs again. Restart the relay (a reload also starts a \
             forward route that ended again), and report the lines before this one",
            self.what
        );
        lock(&self.health.stopped)
            .insert(std::mem::take(&mut self.what), (how, self.cancel.clone()));
    }
}

/// A lock that a panic elsewhere does not make unusable: what it guards stays consistent.
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Health {
    /// `work`, watched: if it ends (returns or panics) before `cancel` asks it to, an error
    /// says so and `/healthz` reports `what` (such as "route x") until a task of that name is
    /// watched again.
    pub fn watch(
        self: &Arc<Self>,
        what: String,
        cancel: CancellationToken,
        work: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        lock(&self.stopped).remove(&what);
        let watched = Watched {
            health: self.clone(),
            what,
            cancel,
        };
        async move {
            let _watched = watched;
            work.await;
        }
    }

    /// Why the relay is unhealthy, if it is.
    pub fn problems(&self) -> Vec<String> {
        let now = crate::clock::now_ms();
        let mut problems = Vec::new();
        // A paused intake stops reading the channels once their queues are full: their
        // silence is then the pause's (said below), not theirs.
        let paused = !self.spool_writable.load(Ordering::Relaxed);
        for channel in self.channels.lock().expect("not poisoned").iter() {
            let last = channel.last_bytes_ms.load(Ordering::Relaxed);
            let silent = Duration::from_millis(now.saturating_sub(last));
            // What the source last met, if it is not connected: the cause, not only the silence.
            let down = channel.down_because();
            if last == 0 {
                let because = down.map(|why| format!(": {why}")).unwrap_or_default();
                problems.push(format!(
                    "channel {} has not connected yet{because}",
                    channel.name
                ));
            } else if silent > channel.idle_timeout && !paused {
                let because = down
                    .map(|why| format!("; not connected: {why}"))
                    .unwrap_or_default();
                problems.push(format!(
                    "channel {} has sent nothing for {} (idle timeout {}){because}",
                    channel.name,
                    humantime::format_duration(Duration::from_secs(silent.as_secs())),
                    humantime::format_duration(channel.idle_timeout),
                ));
            }
        }
        if let Some(problem) = self.cluster.as_ref().and_then(|c| c.problem()) {
            problems.push(problem);
        }
        problems.extend(self.counters.refusing_line(crate::clock::now_ms()));
        if paused {
            let waiting = lock(&self.spool_paused_why).clone();
            problems.push(match waiting {
                Some(why) => format!("intake paused: {why}"),
                None => "the spool does not take writes (see the log)".into(),
            });
        }
        let mut stopped = lock(&self.stopped);
        stopped.retain(|_, (_, cancel)| !cancel.is_cancelled());
        for (what, (how, _)) in stopped.iter() {
            problems.push(format!("{what} {how} (see the log)"));
        }
        problems
    }
}

impl Health {
    /// What `/healthz` reports without failing: routes whose target keeps refusing or not
    /// answering. Their events wait safely in the spool and a restart of the relay would not
    /// help (a watchdog acting on a 503 would only restart it), but whoever watches should
    /// know that deliveries stand still.
    /// A channel that lost its connection is one too, until its silence passes the idle
    /// timeout and it becomes a problem ([`Health::problems`]): a reconnect usually comes
    /// first, and events sent meanwhile wait on the server (smee.io keeps none, and a
    /// GitHub catch-up fetches them back).
    pub fn warnings(&self) -> Vec<String> {
        let now = crate::clock::now_ms();
        let mut warnings = Vec::new();
        for channel in self.channels.lock().expect("not poisoned").iter() {
            let last = channel.last_bytes_ms.load(Ordering::Relaxed);
            let silent = Duration::from_millis(now.saturating_sub(last));
            // Not connected yet, or silent too long: said among the problems.
            if last == 0 || silent > channel.idle_timeout {
                continue;
            }
            if let Some(why) = channel.down_because() {
                warnings.push(format!(
                    "channel {} not connected, reconnecting: {why} (a problem after {} without a word)",
                    channel.name,
                    humantime::format_duration(channel.idle_timeout),
                ));
            }
        }
        warnings.extend(self.counters.failing(now));
        warnings.extend(self.counters.reconcile_line(now));
        warnings.extend(self.counters.unserved_lines());
        if let Some(cluster) = &self.cluster {
            warnings.extend(cluster.neighbour_lines());
        }
        warnings
    }
}

/// Serve `/healthz` and `/metrics` on `listener` until `cancel`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: Arc<Health>,
    metrics: PrometheusHandle,
    cancel: CancellationToken,
) {
    let router = Router::new()
        .route("/healthz", get(healthz))
        .with_state(health)
        .merge(
            Router::new()
                .route("/metrics", get(render_metrics))
                .with_state(metrics),
        );
    let _ = axum::serve(listener, router)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await;
}

async fn healthz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let problems = health.problems();
    let (status, mut body) = if problems.is_empty() {
        (StatusCode::OK, serde_json::json!({"status": "ok"}))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "unhealthy", "reasons": problems}),
        )
    };
    let warnings = health.warnings();
    if !warnings.is_empty() {
        body["warnings"] = serde_json::json!(warnings);
    }
    (status, axum::Json(body))
}

async fn render_metrics(State(handle): State<PrometheusHandle>) -> impl IntoResponse {
    handle.run_upkeep();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        handle.render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> Arc<Health> {
        Arc::new(Health {
            spool_writable: Arc::new(AtomicBool::new(true)),
            ..Health::default()
        })
    }

    /// A channel `health` watches, `http://x/ch` with an idle timeout of 90 s.
    fn watched_channel(health: &Health) -> Arc<ChannelStatus> {
        let channel = Arc::new(ChannelStatus::new(
            "http://x/ch".into(),
            Duration::from_secs(90),
        ));
        health.channels.lock().unwrap().push(channel.clone());
        channel
    }

    /// The `# HELP` lines and the README's metric list name the same metrics (the serve
    /// command's, `smee_relay_serve_*`, are its own).
    #[test]
    fn every_metric_the_readme_lists_is_described_and_no_other() {
        let readme = include_str!("../../README.md");
        let listed: std::collections::BTreeSet<&str> = readme
            .split('`')
            .filter(|word| word.starts_with("smee_relay_") && !word.starts_with("smee_relay_serve"))
            .filter_map(|word| word.split('{').next())
            .collect();
        let described: std::collections::BTreeSet<&str> =
            DESCRIBED.iter().map(|(name, _, _)| *name).collect();
        assert_eq!(listed, described);
    }

    /// Regression: a route whose task ended (its spool reader panicked, say) left its queue
    /// undelivered while `/healthz` said ok, so nothing restarted or paged anyone.
    #[tokio::test]
    async fn regression_a_route_task_that_ended_left_healthz_ok() {
        let health = healthy();
        let cancel = CancellationToken::new();
        tokio::spawn(health.watch("route a".into(), cancel.clone(), async {}))
            .await
            .unwrap();
        let panicked = tokio::spawn(health.watch("route b".into(), cancel.clone(), async {
            panic!("a reader's panic");
        }))
        .await;
        assert!(panicked.is_err());
        assert_eq!(
            health.problems(),
            [
                "route a stopped (see the log)",
                "route b panicked (see the log)"
            ]
        );

        // Started again (a reload), it is healthy again.
        let again = tokio::spawn(health.watch("route a".into(), cancel.clone(), async {
            std::future::pending::<()>().await
        }));
        assert_eq!(health.problems(), ["route b panicked (see the log)"]);
        again.abort();
        // Stopped on purpose afterwards (a reload removed its target, a shutdown): no longer
        // a problem.
        cancel.cancel();
        assert!(health.problems().is_empty(), "{:?}", health.problems());
    }

    /// `/healthz` said a channel "has sent nothing for 2m" while the source knew why: the
    /// server refused it (404), or nothing listened. The cause is said now.
    #[test]
    fn regression_healthz_said_a_channel_was_silent_not_why_it_was_down() {
        let health = healthy();
        let channel = watched_channel(&health);
        channel.lost("connection refused");
        assert_eq!(
            health.problems(),
            ["channel http://x/ch has not connected yet: connection refused"]
        );
        channel.set_connected(true);
        let long_ago = crate::clock::now_ms() - 120_000;
        channel.last_bytes_ms.store(long_ago, Ordering::Relaxed);
        assert_eq!(
            health.problems(),
            ["channel http://x/ch has sent nothing for 2m (idle timeout 1m 30s)"]
        );
        channel.lost("the server answered 404 Not Found");
        assert_eq!(
            health.problems(),
            [
                "channel http://x/ch has sent nothing for 2m (idle timeout 1m 30s); not connected: the server answered 404 Not Found"
            ]
        );
    }

    /// While the intake was paused (a full disk), the channels it no longer read were also
    /// reported, as having sent nothing past their idle timeout: the user went to debug a
    /// channel server that was fine.
    #[test]
    fn regression_a_paused_intake_blamed_the_channels_it_did_not_read() {
        let health = healthy();
        let channel = watched_channel(&health);
        let long_ago = crate::clock::now_ms() - 120_000;
        channel.last_bytes_ms.store(long_ago, Ordering::Relaxed);
        assert_eq!(
            health.problems(),
            ["channel http://x/ch has sent nothing for 2m (idle timeout 1m 30s)"]
        );
        health.spool_writable.store(false, Ordering::Relaxed);
        *lock(&health.spool_paused_why) = Some("cannot write to the spool: full".into());
        assert_eq!(
            health.problems(),
            ["intake paused: cannot write to the spool: full"]
        );
    }

    #[tokio::test]
    async fn a_task_that_ends_when_asked_to_is_no_problem() {
        let health = healthy();
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        let task = tokio::spawn(health.watch("route a".into(), cancel.clone(), async move {
            stop.cancelled().await;
        }));
        cancel.cancel();
        task.await.unwrap();
        assert!(health.problems().is_empty(), "{:?}", health.problems());
    }

    /// A new user's run: with the channel server gone, `/healthz` said "ok" and nothing else
    /// until the idle timeout (90 s) had passed; only the metric showed it at once.
    #[test]
    fn a_channel_that_lost_its_connection_is_a_warning_until_the_idle_timeout() {
        let health = healthy();
        let channel = watched_channel(&health);
        channel.set_connected(true);
        assert!(health.warnings().is_empty());
        channel.lost("the server closed the stream");
        assert!(health.problems().is_empty(), "{:?}", health.problems());
        assert_eq!(
            health.warnings(),
            [
                "channel http://x/ch not connected, reconnecting: the server closed the stream (a problem after 1m 30s without a word)"
            ]
        );
        channel.set_connected(true);
        assert!(health.warnings().is_empty());
    }
}
