//! What the command line asks for, one module per subcommand. Each turns parsed arguments
//! (and, for `run` and `check`, the config file) into the runtime's settings and runs them.
//! `main` only parses, sets up logging and maps the outcome to an exit code.

mod check;
pub mod demo;
mod events;
pub mod forward;
mod run;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::cli::{Command, DeliveryArgs, ServeArgs};
use crate::config::{self, ConfigError};
use crate::delivery::RetryPolicy;
use crate::service::systemd;

/// Run one command to its end.
pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::New(args) => {
            let channel = crate::source::create_channel(&args.server).await?;
            // The one place the full channel URL is printed: the user asked for it.
            println!("{}", channel.expose());
            Ok(())
        }
        Command::Forward(args) => forward::run(args).await,
        Command::Run(args) => run::run(args).await,
        Command::Check(args) => check::run(args),
        Command::Events(args) => events::run(args),
        Command::Serve(args) => serve(args).await,
        Command::Demo(args) => {
            demo::run(args.slack_webhook).await?;
            Ok(())
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = crate::server::ServeConfig {
        max_body: usize::try_from(args.max_body).unwrap_or(usize::MAX),
        max_events: args.max_events,
        max_bytes: usize::try_from(args.max_buffer).unwrap_or(usize::MAX),
        retain: args.retain,
        subscribe_token: args.subscribe_token.or(args.token.clone()),
        post_token: args.post_token.or(args.token),
        state_dir: args.state_dir,
        ..Default::default()
    };
    crate::server::run(args.listen, config, stop_on_signals()?)
        .await
        .with_context(|| format!("cannot serve on {}", args.listen))
}

fn retry_policy(delivery: &DeliveryArgs) -> RetryPolicy {
    RetryPolicy {
        max_age: delivery.max_retry_age,
        max_retry_after: delivery.max_retry_after,
        shutdown_timeout: delivery.shutdown_timeout,
        ..RetryPolicy::DEFAULT
    }
}

/// A token cancelled by the first SIGINT or SIGTERM.
fn stop_on_signals() -> anyhow::Result<CancellationToken> {
    let cancel = CancellationToken::new();
    systemd::cancel_on_signals(cancel.clone()).context("cannot install signal handlers")?;
    Ok(cancel)
}

fn load_config(path: &std::path::Path) -> Result<config::Config, ConfigError> {
    config::load(path, &|name| std::env::var(name).ok())
}
