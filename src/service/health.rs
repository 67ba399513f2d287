//! Health and metrics: what `/healthz` judges, the Prometheus recorder, and the small HTTP server
//! that serves both (`--metrics-listen`).

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

/// Start recording metrics; the handle renders them in Prometheus text format.
pub fn install_metrics() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    PrometheusBuilder::new()
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
        .install_recorder()
}

/// What `/healthz` looks at: each channel's liveness and whether the spool takes writes.
#[derive(Default)]
pub struct Health {
    pub channels: std::sync::Mutex<Vec<Arc<ChannelStatus>>>,
    /// False after a failed spool commit, true again after a good one (set by the writer).
    pub spool_writable: Arc<AtomicBool>,
    /// In a cluster: NATS unreachable past the grace period is a problem.
    pub cluster: Option<crate::cluster::Cluster>,
}

impl Health {
    /// Why the relay is unhealthy, if it is.
    pub fn problems(&self) -> Vec<String> {
        let now = crate::clock::now_ms();
        let mut problems = Vec::new();
        for channel in self.channels.lock().expect("not poisoned").iter() {
            let last = channel.last_bytes_ms.load(Ordering::Relaxed);
            let silent = Duration::from_millis(now.saturating_sub(last));
            if last == 0 {
                problems.push(format!("channel {} has not connected yet", channel.name));
            } else if silent > channel.idle_timeout {
                problems.push(format!(
                    "channel {} has sent nothing for {} (idle timeout {})",
                    channel.name,
                    humantime::format_duration(Duration::from_secs(silent.as_secs())),
                    humantime::format_duration(channel.idle_timeout)
                ));
            }
        }
        if let Some(problem) = self.cluster.as_ref().and_then(|c| c.problem()) {
            problems.push(problem);
        }
        if !self.spool_writable.load(Ordering::Relaxed) {
            problems.push("the spool does not take writes (see the log)".into());
        }
        problems
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
    let (status, body) = if problems.is_empty() {
        (StatusCode::OK, serde_json::json!({"status": "ok"}))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "unhealthy", "reasons": problems}),
        )
    };
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
