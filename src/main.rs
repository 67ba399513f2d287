//! The `smee-relay` binary: parse the command line, set up logging, run, and map the outcome to
//! an exit code (0 success, 1 runtime failure, 2 usage or config error).

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use tokio_util::sync::CancellationToken;

use smee_relay::cli::{
    CheckArgs, Cli, Command, DeliveryArgs, EventsArgs, EventsCommand, ForwardArgs, RunArgs,
};
use smee_relay::config::{self, ConfigError};
use smee_relay::daemon::{self, ChannelPlan, Plan};
use smee_relay::dispatch::RetryPolicy;
use smee_relay::forward::Forwarder;
use smee_relay::notify::AlertSink;
use smee_relay::pipeline::Pipeline;
use smee_relay::relay::{self, ForwardOptions};
use smee_relay::source::{self, SourceConfig};
use smee_relay::spool::{self, Limits, Replay, Spool};
use smee_relay::{inspect, service, telemetry};

const USAGE_ERROR: u8 = 2;

fn main() -> ExitCode {
    smee_relay::memory::return_large_buffers();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // One line that names the argument and the problem; --help has the rest.
            let rendered = e.render().to_string();
            eprintln!(
                "{}",
                rendered
                    .lines()
                    .next()
                    .unwrap_or("error: invalid arguments")
            );
            return ExitCode::from(USAGE_ERROR);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    // The demo's output is its alerts: keep its logs to warnings unless asked.
    let quieter = i8::from(matches!(cli.command, Command::Demo(_)));
    telemetry::init(cli.verbosity() - quieter, cli.log_format);

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<ConfigError>().is_some() => {
            eprintln!("{e}");
            ExitCode::from(USAGE_ERROR)
        }
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::New(args) => {
            let channel = source::create_channel(&args.server).await?;
            // The one place the full channel URL is printed: the user asked for it.
            println!("{}", channel.expose());
            Ok(())
        }
        Command::Forward(args) => forward(args).await,
        Command::Run(args) => run_config(args).await,
        Command::Check(args) => check(args),
        Command::Events(args) => events(args),
        Command::Serve(args) => serve(args).await,
        Command::Demo(args) => {
            smee_relay::demo::run(args.slack_webhook).await?;
            Ok(())
        }
    }
}

async fn serve(args: smee_relay::cli::ServeArgs) -> anyhow::Result<()> {
    let config = smee_relay::serve::ServeConfig {
        max_body: usize::try_from(args.max_body).unwrap_or(usize::MAX),
        max_events: args.max_events,
        max_bytes: usize::try_from(args.max_buffer).unwrap_or(usize::MAX),
        retain: args.retain,
        subscribe_token: args.subscribe_token.or(args.token.clone()),
        post_token: args.post_token.or(args.token),
        state_dir: args.state_dir,
        ..Default::default()
    };
    smee_relay::serve::run(args.listen, config, stop_on_signals()?)
        .await
        .with_context(|| format!("cannot serve on {}", args.listen))
}

fn retry_policy(delivery: &DeliveryArgs) -> RetryPolicy {
    RetryPolicy {
        max_age: delivery.max_retry_age,
        ..RetryPolicy::DEFAULT
    }
}

fn stop_on_signals() -> anyhow::Result<CancellationToken> {
    let cancel = CancellationToken::new();
    service::cancel_on_signals(cancel.clone()).context("cannot install signal handlers")?;
    Ok(cancel)
}

async fn forward(args: ForwardArgs) -> anyhow::Result<()> {
    let target = args.target_url().context("invalid target")?;
    let channel = match args.channel_url() {
        Some(channel) => channel,
        None => {
            let channel = source::create_channel(&args.server).await?;
            println!("Forwarding {} to {target}", channel.expose());
            channel
        }
    };
    let mut source = SourceConfig::new(channel);
    source.idle_timeout = args.idle_timeout;
    source.token = args.token.clone();
    let delivery = &args.delivery;
    let options = ForwardOptions {
        source,
        target,
        target_timeout: delivery.target_timeout,
        state_dir: spool::state_dir(delivery.state.state_dir.as_deref()),
        retry: retry_policy(delivery),
        retain: delivery.retain,
        limits: Limits {
            max_bytes: delivery.max_spool_size,
        },
        metrics_listen: delivery.metrics_listen,
    };
    relay::forward(options, stop_on_signals()?).await?;
    Ok(())
}

fn load_config(path: &std::path::Path) -> Result<config::Config, ConfigError> {
    config::load(path, &|name| std::env::var(name).ok())
}

async fn run_config(args: RunArgs) -> anyhow::Result<()> {
    let plan = plan_from_config(&args)?;
    let cancel = stop_on_signals()?;
    let mut hangups = service::reload_requests().context("cannot install the SIGHUP handler")?;
    let (reload_tx, reloads) = tokio::sync::mpsc::channel(1);
    // SIGHUP: read the file again; an invalid file is logged and the running config stays.
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!(config = %args.config.display(), "SIGHUP: reloading the config");
            match plan_from_config(&args) {
                Ok(plan) => {
                    if reload_tx.send(plan).await.is_err() {
                        return;
                    }
                }
                Err(e) => tracing::error!("config not reloaded, the running one stays:\n{e:#}"),
            }
        }
    });
    daemon::run(plan, reloads, cancel).await?;
    Ok(())
}

/// The runtime plan `run` carries out: the config file, with the flags on top.
fn plan_from_config(args: &RunArgs) -> anyhow::Result<Plan> {
    let config = load_config(&args.config)?;
    let delivery = &args.delivery;
    let state_dir = match (&delivery.state.state_dir, &config.state_dir) {
        (Some(flag), _) => flag.clone(),
        (None, Some(file)) => file.clone(),
        (None, None) => spool::state_dir(None),
    };
    let uses_pipeline = config.channels.iter().any(|c| c.pipeline);
    let pipeline = if uses_pipeline {
        let sink = match &config.slack {
            Some(url) => AlertSink::slack(Forwarder::new(
                url.0.as_str().parse().context("slack webhook_url")?,
                delivery.target_timeout,
            )?),
            None => AlertSink::stdout(),
        };
        let pipeline = Pipeline {
            rules: config.rules.clone(),
            verifier: config.verifier.clone(),
            app_url: config.app_url.clone(),
        };
        Some((pipeline, sink))
    } else {
        None
    };
    let channels = config
        .channels
        .iter()
        .map(|c| {
            let mut source = SourceConfig::new(c.url.clone());
            source.idle_timeout = c.idle_timeout;
            source.token = c.token.clone();
            ChannelPlan {
                source,
                forward: c.forward.clone(),
                pipeline: c.pipeline,
            }
        })
        .collect();
    Ok(Plan {
        channels,
        pipeline,
        state_dir,
        target_timeout: delivery.target_timeout,
        retry: retry_policy(delivery),
        retain: delivery.retain,
        limits: Limits {
            max_bytes: delivery.max_spool_size,
        },
        metrics_listen: delivery.metrics_listen.or(config.metrics_listen),
    })
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    let config = load_config(&args.config)?;
    let Some(event) = args.event else {
        println!(
            "{}: ok ({} channels, {} rules)",
            args.config.display(),
            config.channels.len(),
            config.rules.len()
        );
        return Ok(());
    };
    let body = std::fs::read(&event).with_context(|| format!("cannot read {}", event.display()))?;
    print!("{}", inspect::check_event(&config, &body));
    Ok(())
}

fn events(args: EventsArgs) -> anyhow::Result<()> {
    let dir = spool::state_dir(args.state.state_dir.as_deref());
    let spool = Spool::open(&dir)?;
    match args.command {
        EventsCommand::List {
            status,
            limit,
            json,
        } => {
            let rows = spool.list(status, limit)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", inspect::table(&rows));
            }
        }
        EventsCommand::Show { id } => {
            let (event, records) = spool.get(id)?;
            print!("{}", inspect::show(&event, &records));
        }
        EventsCommand::Replay { ids, dead, since } => {
            let which = match (dead, since) {
                (true, _) => Replay::Dead,
                (false, Some(since)) => {
                    Replay::ReceivedSince(spool::now_ms().saturating_sub(since.as_millis() as u64))
                }
                (false, None) => Replay::Ids(ids),
            };
            let queued = spool.replay(which)?;
            println!("queued {queued} deliveries again");
        }
        EventsCommand::Purge { .. } => {
            let purged = spool.purge_dead()?;
            println!("purged {purged} dead letters");
        }
    }
    Ok(())
}
