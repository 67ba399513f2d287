//! The `forward` command's runtime: one channel, one target, through the spool.
//!
//! ```text
//! source --Event--> intake --append--> spool --queue--> route --> target
//! ```
//!
//! Shutdown runs the pipe dry from the front: the source stops, the intake stores what it
//! already took, the route finishes the delivery in flight (at most
//! [`dispatch::SHUTDOWN_GRACE`]), and the writer commits the last marks before the spool closes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::dispatch::{self, Counters, RetryPolicy, SpoolWriter};
use crate::forward::{Delivered, ForwardError, Forwarder};
use crate::source::{SourceConfig, SourceError};
use crate::spool::{Limits, SpoolError, StoredEvent};
use crate::url::TargetUrl;

/// Events received but not yet stored; beyond this the source waits (backpressure).
const QUEUE_DEPTH: usize = 8192;

/// Errors that stop `forward` from starting.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
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
    /// Where the spool lives.
    pub state_dir: PathBuf,
    /// How retries back off and when they give up.
    pub retry: RetryPolicy,
    /// How long delivered events stay in the spool for replay.
    pub retain: Duration,
    /// The spool's size limit.
    pub limits: Limits,
}

/// Relay until `cancel` fires, then shut down cleanly.
pub async fn forward(options: ForwardOptions, cancel: CancellationToken) -> Result<(), RelayError> {
    let forwarder = Forwarder::new(options.target.clone(), options.target_timeout)?;
    let channel = options.source.channel.clone();
    let (spool, _lock) = dispatch::open_for_channel(&options.state_dir, &channel)?;
    let source = options.source.build()?;
    info!(
        %channel,
        target = %options.target,
        spool = %spool.path().display(),
        "forwarding"
    );

    let counters = Arc::new(Counters::default());
    let (writer, writer_thread) = SpoolWriter::start(spool.clone(), options.limits);
    let (events_tx, events_rx) = mpsc::channel(QUEUE_DEPTH);
    let source_task = tokio::spawn(source.run(events_tx, cancel.clone()));
    let intake_task = tokio::spawn(dispatch::intake(
        events_rx,
        writer.clone(),
        channel.to_string(),
        vec![options.target.to_string()],
        counters.clone(),
    ));
    let prune_task = tokio::spawn(dispatch::prune_periodically(
        spool.clone(),
        options.retain,
        cancel.clone(),
    ));
    dispatch::run_route(
        spool,
        writer.clone(),
        forwarder,
        options.retry,
        counters,
        cancel.clone(),
    )
    .await;

    cancel.cancel();
    let _ = source_task.await;
    let _ = intake_task.await;
    let _ = prune_task.await;
    drop(writer);
    let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
    Ok(())
}

/// One line per attempt: `POST /hook -> 200 in 3 ms (event 12, x-github-event=push)`.
pub fn log_delivery(
    forwarder: &Forwarder,
    event: &StoredEvent,
    outcome: &Result<Delivered, ForwardError>,
) {
    let about = match crate::spool::event_kind(&event.event) {
        Some(kind) => format!("event {}, {kind}", event.id),
        None => format!("event {}", event.id),
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
