//! The `forward` command: one channel, one target, through the spool (see `daemon` for the
//! runtime it shares with `run`).

use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::daemon::{self, ChannelPlan, Plan};
use crate::dispatch::RetryPolicy;
use crate::source::{SourceConfig, SourceError};
use crate::spool::{Limits, SpoolError};
use crate::url::TargetUrl;

/// Errors that stop the relay from starting.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("cannot build the HTTP client for the target: {0}")]
    Target(#[from] reqwest::Error),
    #[error("cannot listen on {0} for /healthz and /metrics: {1}")]
    Listen(std::net::SocketAddr, std::io::Error),
    #[error("cannot start metrics: {0}")]
    Metrics(String),
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
    /// Where to serve `/healthz` and `/metrics`, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Relay until `cancel` fires, then shut down cleanly.
pub async fn forward(options: ForwardOptions, cancel: CancellationToken) -> Result<(), RelayError> {
    info!(
        channel = %options.source.channel,
        target = %options.target,
        "forwarding"
    );
    let plan = Plan {
        channels: vec![ChannelPlan {
            source: options.source,
            forward: vec![options.target],
            pipeline: false,
        }],
        pipeline: None,
        state_dir: options.state_dir,
        target_timeout: options.target_timeout,
        retry: options.retry,
        retain: options.retain,
        limits: options.limits,
        metrics_listen: options.metrics_listen,
    };
    // `forward` has no config file to reload.
    let (_no_reloads, reloads) = tokio::sync::mpsc::channel(1);
    daemon::run(plan, reloads, cancel).await
}
