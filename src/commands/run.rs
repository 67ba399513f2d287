//! `smee-relay run --config FILE`: the daemon, from a config file, reloaded on SIGHUP.

use anyhow::Context as _;

use super::{load_config, retry_policy, stop_on_signals};
use crate::cli::RunArgs;
use crate::delivery::forward::Forwarder;
use crate::notify::AlertSink;
use crate::pipeline::Pipeline;
use crate::service::daemon::{self, ChannelPlan, MetricsListen, Plan};
use crate::service::systemd;
use crate::source::SourceConfig;
use crate::spool::Limits;

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    // Signals first, so a SIGHUP that comes early is a reload request, never the end.
    let cancel = stop_on_signals()?;
    let mut hangups = systemd::reload_requests().context("cannot install the SIGHUP handler")?;
    let plan = plan_from_config(&args)?;
    // Which file, said once: with several configs about, the journal shows which one runs.
    tracing::info!(config = %args.config.display(), "config loaded");
    let (reload_tx, reloads) = tokio::sync::mpsc::channel(1);
    // SIGHUP: read the file again; an invalid file is refused whole, with its reasons on the
    // one log line (journald shows it at priority err), and the running config stays.
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!(config = %args.config.display(), "SIGHUP: reloading the config");
            match plan_from_config(&args) {
                Ok(plan) => {
                    if reload_tx.send(Some(plan)).await.is_err() {
                        return;
                    }
                }
                Err(e) => tracing::error!(
                    "config not reloaded, the running one stays: {}",
                    crate::error::chain(e.as_ref()).replace('\n', "; ")
                ),
            }
        }
    });
    daemon::run(plan, reloads, cancel).await?;
    Ok(())
}

/// How the `cacert` of the config at `config` is named in an error.
pub(super) fn config_cacert(config: &std::path::Path) -> String {
    format!("cacert in {}", config.display())
}

/// The runtime plan `run` carries out: the config file, with the flags on top.
fn plan_from_config(args: &RunArgs) -> anyhow::Result<Plan> {
    let config = load_config(&args.config)?;
    let delivery = &args.delivery;
    // TLS trust is set once, at start; a reload cannot change it.
    let tls = &delivery.tls;
    let config_cacert = config_cacert(&args.config);
    let cacert = match (&tls.cacert, &config.cacert) {
        (Some(flag), _) => Some((flag.as_path(), "--cacert or SMEE_RELAY_CACERT")),
        (None, Some(file)) => Some((file.as_path(), config_cacert.as_str())),
        (None, None) => None,
    };
    crate::http::set_trust(cacert, tls.insecure || config.insecure)?;
    let state_dir = match (&delivery.state.state_dir, &config.state_dir) {
        (Some(flag), _) => flag.clone(),
        (None, Some(file)) => file.clone(),
        (None, None) => crate::spool::lock::state_dir(None),
    };
    let uses_pipeline = config.channels.iter().any(|c| c.pipeline);
    for hint in config.rules.iter().filter_map(|r| r.when_hint()) {
        tracing::warn!("{hint}");
    }
    // One bounded jq worker for the rules' and the actions' `when` conditions.
    let jq = crate::pipeline::jq::JqEngine::new(config.jq);
    let pipeline = if uses_pipeline {
        let sink = match &config.slack {
            // Its path is the secret: hidden in what an error answer echoes.
            Some(url) => AlertSink::slack(
                Forwarder::new(
                    url.0.as_str().parse().context("slack webhook_url")?,
                    delivery.target_timeout,
                )?
                .with_secret_path(),
            ),
            None => AlertSink::stdout(),
        };
        let pipeline = Pipeline {
            rules: config.rules.clone(),
            verifier: config.verifier.clone(),
            app_url: config.app_url.clone(),
            jq: jq.clone(),
            record_verdicts: config.report_automation_runs,
        };
        Some((pipeline, sink))
    } else {
        None
    };
    let wanted = !config.actions.is_empty() || config.report_automation_runs;
    let actions = match (&config.port_api, wanted) {
        (Some(api), true) => Some((
            crate::actions::runner::Actions {
                actions: config.actions.clone(),
                verifier: config.verifier.clone(),
                jq: jq.clone(),
                retry: retry_policy(delivery),
                automation_runs: config.report_automation_runs.then(|| {
                    if config.slack.is_some() {
                        "Slack"
                    } else {
                        "stdout"
                    }
                    .to_string()
                }),
            },
            crate::notify::port::PortReporter::new(api.clone())?,
        )),
        _ => None,
    };
    let channels = config
        .channels
        .iter()
        .map(|c| {
            let mut source = SourceConfig::new(c.url.clone());
            source.idle_timeout = c.idle_timeout;
            source.token = c.token.clone();
            source.ignore_events = c.ignore_events.clone();
            source.max_frame = c.max_frame;
            source.github_catch_up = c.github_catch_up.clone();
            ChannelPlan {
                source,
                forward: c.forward.clone(),
                pipeline: c.pipeline,
                save_dir: None,
            }
        })
        .collect();
    Ok(Plan {
        announce: None,
        channels,
        pipeline,
        state_dir,
        target_timeout: delivery.target_timeout,
        retry: retry_policy(delivery),
        retain: delivery.retain,
        limits: Limits {
            max_bytes: delivery.max_spool_size,
        },
        keep_free: delivery.keep_free,
        metrics_listen: match (delivery.metrics_listen, config.metrics_listen) {
            (Some(addr), _) => Some(MetricsListen {
                addr,
                set_by: crate::cli::METRICS_LISTEN_FLAG,
            }),
            (None, addr) => addr.map(|addr| MetricsListen {
                addr,
                set_by: "metrics_listen in the config",
            }),
        },
        actions,
        reconcile: config
            .port_api
            .clone()
            .zip(config.reconcile)
            .map(|(api, interval)| crate::service::daemon::ReconcilePlan { api, interval }),
        cluster: crate::config::cluster_with_flag(args.nats_url.as_ref(), config.cluster)?.map(
            |mut cluster| {
                cluster.config_file = std::path::absolute(&args.config).ok();
                cluster
            },
        ),
    })
}
