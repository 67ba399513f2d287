//! What the relay tells about itself: logs (`tracing`), metrics (Prometheus) and health, and
//! the small HTTP server that serves the last two (`--metrics-listen`).
//!
//! Logs go to stderr as text or JSON. Under systemd (`JOURNAL_STREAM` set) text lines carry no
//! colour and no timestamp (journald adds its own) and start with a syslog priority (`<3>` for
//! errors, `<4>` warnings, `<6>` info, `<7>` debug), so `journalctl -p err` works.

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Install the global subscriber. `verbosity` is the count of `-v` minus the count of `-q`;
/// `RUST_LOG`, when set, overrides it.
pub fn init(verbosity: i8, format: LogFormat) {
    let ours = match verbosity {
        i8::MIN..=-2 => "error",
        -1 => "warn",
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let default = format!(
        "{},smee_relay={ours}",
        if verbosity > 1 { "debug" } else { "warn" }
    );
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(
            !journal && std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        );
    match (format, journal) {
        (LogFormat::Json, _) => builder.json().init(),
        (LogFormat::Text, true) => builder.event_format(JournalFormat).init(),
        (LogFormat::Text, false) => builder.init(),
    }
}

/// Text lines for journald: `<priority>message fields`, no timestamp, no level word.
#[derive(Default)]
struct JournalFormat;

impl<S, N> FormatEvent<S, N> for JournalFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            _ => 7,
        };
        write!(writer, "<{priority}>")?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                if let Some(fields) = span.extensions().get::<FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    write!(writer, "{}: ", fields)?;
                }
            }
        }
        ctx.format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Start recording metrics; the handle renders them in Prometheus text format.
pub fn install_metrics() -> Result<PrometheusHandle, String> {
    PrometheusBuilder::new()
        .set_buckets(&[
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ])
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())
}

/// What `/healthz` looks at: each channel's liveness and whether the spool takes writes.
#[derive(Default)]
pub struct Health {
    pub channels: std::sync::Mutex<Vec<Arc<ChannelStatus>>>,
    /// False after a failed spool commit, true again after a good one (set by the writer).
    pub spool_writable: Arc<AtomicBool>,
}

/// One channel's connection, as the source reports it.
pub struct ChannelStatus {
    /// The channel, redacted.
    pub name: String,
    /// Silence longer than this is unhealthy.
    pub idle_timeout: Duration,
    pub connected: AtomicBool,
    /// When anything last arrived (ms since the epoch; 0: never).
    pub last_bytes_ms: AtomicU64,
    pub reconnects: AtomicU64,
}

impl ChannelStatus {
    pub fn new(name: String, idle_timeout: Duration) -> Self {
        Self {
            name,
            idle_timeout,
            connected: AtomicBool::new(false),
            last_bytes_ms: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        }
    }

    /// Something arrived on the connection.
    pub fn saw_bytes(&self) {
        self.last_bytes_ms
            .store(crate::spool::now_ms(), Ordering::Relaxed);
    }

    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
        metrics::gauge!("smee_relay_channel_connected", "channel" => self.name.clone())
            .set(if connected { 1.0 } else { 0.0 });
        if connected {
            self.saw_bytes();
        }
    }

    pub fn reconnecting(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("smee_relay_reconnects_total", "channel" => self.name.clone())
            .increment(1);
    }
}

impl Health {
    /// Why the relay is unhealthy, if it is.
    pub fn problems(&self) -> Vec<String> {
        let now = crate::spool::now_ms();
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
