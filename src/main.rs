//! The `smee-relay` binary: parse the command line, set up logging, run, and map the outcome to
//! an exit code (0 success, 1 runtime failure, 2 usage error).

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use tokio_util::sync::CancellationToken;

use smee_relay::cli::{Cli, Command, EventsArgs, EventsCommand, ForwardArgs};
use smee_relay::dispatch::RetryPolicy;
use smee_relay::relay::{self, ForwardOptions};
use smee_relay::source::{self, SourceConfig};
use smee_relay::spool::{self, Limits, Replay, Spool};
use smee_relay::{inspect, service, telemetry};

const USAGE_ERROR: u8 = 2;

fn main() -> ExitCode {
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
    telemetry::init(cli.verbosity(), cli.log_format);

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
        Command::Events(args) => events(args),
    }
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
    let retry = RetryPolicy {
        max_age: args.max_retry_age,
        ..RetryPolicy::DEFAULT
    };
    let cancel = CancellationToken::new();
    service::cancel_on_signals(cancel.clone()).context("cannot install signal handlers")?;
    relay::forward(
        ForwardOptions {
            source,
            target,
            target_timeout: args.target_timeout,
            state_dir: spool::state_dir(args.state.state_dir.as_deref()),
            retry,
            retain: args.retain,
            limits: Limits {
                max_bytes: args.max_spool_size,
            },
        },
        cancel,
    )
    .await?;
    Ok(())
}
