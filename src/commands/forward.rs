//! `smee-relay forward`: one channel, one target, through the spool (the daemon's runtime with
//! a plan of one channel and no config file).

use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::info;

use anyhow::Context as _;

use super::{retry_policy, stop_on_signals};
use crate::cli::ForwardArgs;
use crate::delivery::RetryPolicy;
use crate::service::daemon::{self, ChannelPlan, DaemonError, Plan};
use crate::source::SourceConfig;
use crate::spool::Limits;
use crate::url::TargetUrl;

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
    /// Disk room the spool leaves free on its file system (`--keep-free`; 0: none).
    pub keep_free: u64,
    /// Where to serve `/healthz` and `/metrics`, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Relay until `cancel` fires, then shut down cleanly.
pub async fn forward(
    options: ForwardOptions,
    cancel: CancellationToken,
) -> Result<(), DaemonError> {
    forward_saving(options, None, None, None, cancel).await
}

/// [`forward`], also writing each received event into `save_dir` in gosmee's layout, and
/// retrying now what waits for the target on each of `hangups` (SIGHUP: `forward` has no
/// config file to reload, and a target back up need not wait out the backoff). `announce`:
/// the line for stdout once the relay runs (`Plan::announce`).
async fn forward_saving(
    options: ForwardOptions,
    announce: Option<String>,
    save_dir: Option<PathBuf>,
    hangups: Option<tokio::sync::mpsc::Receiver<()>>,
    cancel: CancellationToken,
) -> Result<(), DaemonError> {
    info!(
        channel = %options.source.channel,
        target = %options.target.shown(),
        "forwarding"
    );
    let plan = Plan {
        channels: vec![ChannelPlan {
            source: options.source,
            forward: vec![options.target],
            pipeline: false,
            save_dir,
        }],
        pipeline: None,
        state_dir: options.state_dir,
        target_timeout: options.target_timeout,
        retry: options.retry,
        retain: options.retain,
        limits: options.limits,
        keep_free: options.keep_free,
        metrics_listen: options
            .metrics_listen
            .map(|addr| crate::service::daemon::MetricsListen {
                addr,
                set_by: crate::cli::METRICS_LISTEN_FLAG,
            }),
        actions: None,
        reconcile: None,
        cluster: None,
        announce,
    };
    let (retry_tx, reloads) = tokio::sync::mpsc::channel(1);
    if let Some(mut hangups) = hangups {
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                if retry_tx.send(None).await.is_err() {
                    return;
                }
            }
        });
    }
    daemon::run(plan, reloads, cancel).await
}

pub async fn run(args: ForwardArgs) -> anyhow::Result<()> {
    // First, so no SIGHUP can end the process from here on.
    let cancel = stop_on_signals()?;
    let hangups =
        crate::service::systemd::reload_requests().context("cannot install the SIGHUP handler")?;
    let target = args.target_url().context("invalid target")?;
    let tls = &args.delivery.tls;
    tls.set_trust()?;
    // smee-client says where it forwards on stdout, either way (helper-144): a channel the
    // user gave is shown as in the logs; a new one in full, since it is the user's to use.
    // Said once the relay runs (`Plan::announce`).
    let (channel, announce) = match args.channel_url() {
        Some(channel) => {
            let line = format!("Forwarding {channel} to {target}");
            (channel, line)
        }
        None => {
            // A stop while the server is asked ends it (helper-132: it waited for the answer).
            let channel = tokio::select! {
                channel = crate::source::create_channel(&args.server) => channel?,
                () = cancel.cancelled() => return Ok(()),
            };
            let line = format!("Forwarding {} to {target}", channel.expose());
            (channel, line)
        }
    };
    if target.is_channel(&channel) {
        return Err(crate::cli::TargetError::IsTheChannel).context("invalid target");
    }
    let state_dir = crate::spool::lock::state_dir(args.delivery.state.state_dir.as_deref());
    let mut source = SourceConfig::new(channel);
    source.idle_timeout = args.idle_timeout;
    source.token = args.token.clone();
    source.ignore_events = args.ignore_event.clone();
    source.max_frame = usize::try_from(args.max_frame).unwrap_or(usize::MAX);
    let delivery = &args.delivery;
    let options = ForwardOptions {
        source,
        target,
        target_timeout: delivery.target_timeout,
        state_dir,
        retry: retry_policy(delivery),
        retain: delivery.retain,
        limits: Limits {
            max_bytes: delivery.max_spool_size,
        },
        keep_free: delivery.keep_free,
        metrics_listen: delivery.metrics_listen,
    };
    forward_saving(
        options,
        Some(announce),
        args.save_dir.clone(),
        Some(hangups),
        cancel,
    )
    .await?;
    Ok(())
}
