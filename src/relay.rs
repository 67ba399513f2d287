//! The `forward` command's runtime: one channel, one target, events delivered one at a time in
//! the order they arrived.
//!
//! The source runs as its own task and hands events over a bounded queue; this module takes them
//! off in order and delivers each before looking at the next. A failed delivery is logged with
//! its status or error and skipped (durable retries come with the spool).

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::event::Event;
use crate::forward::{Delivered, ForwardError, Forwarder};
use crate::source::{SourceConfig, SourceError};
use crate::url::TargetUrl;

/// How long a delivery in flight may still take once shutdown is asked for.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Events received but not yet delivered; beyond this the source waits (backpressure).
const QUEUE_DEPTH: usize = 4096;

/// Errors that stop `forward` from starting.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("cannot build the HTTP client for the target: {0}")]
    Target(#[from] reqwest::Error),
}

/// Everything `forward` needs.
#[derive(Clone, Debug)]
pub struct ForwardOptions {
    /// The channel and how to stay connected to it.
    pub source: SourceConfig,
    /// Where to replay events.
    pub target: TargetUrl,
    /// How long one delivery may take.
    pub target_timeout: Duration,
}

/// Relay until `cancel` fires; then finish the delivery in flight (at most [`SHUTDOWN_GRACE`]).
pub async fn forward(options: ForwardOptions, cancel: CancellationToken) -> Result<(), RelayError> {
    let forwarder = Forwarder::new(options.target.clone(), options.target_timeout)?;
    info!(
        channel = %options.source.channel,
        target = %options.target,
        "forwarding"
    );
    let source = options.source.build()?;
    let (events_tx, events_rx) = mpsc::channel(QUEUE_DEPTH);
    let source_task = tokio::spawn(source.run(events_tx, cancel.clone()));
    deliver_in_order(events_rx, &forwarder, &cancel).await;
    cancel.cancel();
    let _ = source_task.await;
    Ok(())
}

async fn deliver_in_order(
    mut events: mpsc::Receiver<Event>,
    forwarder: &Forwarder,
    cancel: &CancellationToken,
) {
    loop {
        let event = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            next = events.recv() => match next {
                Some(event) => event,
                None => return,
            },
        };
        let grace_over = async {
            cancel.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::select! {
            outcome = forwarder.deliver(&event, &[]) => log_delivery(forwarder, &event, &outcome),
            _ = grace_over => {
                warn!(
                    event = event.sse_id.as_deref().unwrap_or("-"),
                    "shutting down: the delivery in flight did not finish within {}",
                    humantime::format_duration(SHUTDOWN_GRACE)
                );
                return;
            }
        }
    }
}

/// One line per delivery: `POST /hook -> 200 in 3 ms (event 12, x-github-event=push)`.
pub fn log_delivery(
    forwarder: &Forwarder,
    event: &Event,
    outcome: &Result<Delivered, ForwardError>,
) {
    let id = event.sse_id.as_deref().unwrap_or("-");
    let about = match event.kind() {
        Some(kind) => format!("event {id}, {kind}"),
        None => format!("event {id}"),
    };
    let path = forwarder.target().path();
    match outcome {
        Ok(done) => info!(
            "POST {path} -> {} in {} ms ({about})",
            done.status.as_u16(),
            done.elapsed.as_millis()
        ),
        Err(e) => warn!("POST {path} failed: {e} ({about})"),
    }
}
