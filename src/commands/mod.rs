//! What the command line asks for, one module per subcommand. Each turns parsed arguments
//! (and, for `run` and `check`, the config file) into the runtime's settings and runs them.
//! `main` only parses, sets up logging and maps the outcome to an exit code.

mod catch_up;
mod check;
pub mod demo;
mod events;
pub mod forward;
mod generate;
mod run;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::cli::{Command, DeliveryArgs, ServeArgs};
use crate::config::{self, ConfigError};
use crate::delivery::RetryPolicy;
use crate::service::systemd;

pub(crate) use crate::error::count;

/// Run one command to its end.
pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::New(args) => {
            args.tls.set_trust()?;
            let channel = crate::source::create_channel(&args.server).await?;
            // The one place the full channel URL is printed: the user asked for it.
            println!("{}", channel.expose());
            Ok(())
        }
        Command::Forward(args) => forward::run(args).await,
        Command::Run(args) => run::run(args).await,
        Command::Check(args) => check::run(args),
        Command::Events(args) => events::run(args).await,
        Command::CatchUp(args) => catch_up::run(args).await,
        Command::Serve(args) => serve(args).await,
        Command::Demo(args) => {
            demo::run(args.slack_webhook).await?;
            Ok(())
        }
        Command::Generate(args) => generate::run(&args),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let to_usize = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    let config = crate::server::ServeConfig {
        max_body: to_usize(args.max_body),
        max_events: args.max_events,
        max_memory: to_usize(args.max_memory),
        retain: args.retain,
        max_channels: args.max_channels,
        channel_ttl: args.channel_ttl,
        max_subscribers: args.max_subscribers,
        max_connections: args.max_connections,
        read_timeout: args.read_timeout,
        subscribe_token: args.subscribe_token.or(args.token.clone()),
        post_token: args.post_token.or(args.token),
        allow_post_from: args.allow_post_from,
        trust_proxy: args.trust_proxy,
        tls: args
            .tls_cert
            .zip(args.tls_key)
            .map(|(cert, key)| crate::server::TlsFiles { cert, key }),
        state_dir: args.state_dir,
        nats: args.nats_url.map(|url| crate::server::NatsConfig {
            credentials: args.nats_credentials,
            tls_ca: args.nats_tls_ca,
            stream: args.nats_stream,
            grace: args.nats_grace,
            replicas: usize::from(args.nats_replicas),
            ..crate::server::NatsConfig::new(url)
        }),
        smee_wire: args.smee_wire,
        ..Default::default()
    };
    // SIGHUP re-reads the TLS certificate; it never stops the server (its default action
    // would: exit 129).
    let reload = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot install the SIGHUP handler")?;
    let notify = reload.clone();
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            notify.notify_one();
        }
    });
    match crate::server::run(args.listen, config, stop_on_signals()?, reload).await {
        // Its own words name the address.
        Err(e @ crate::server::ServeError::Bind(_)) => Err(e.into()),
        other => other.with_context(|| format!("cannot serve on {}", args.listen)),
    }
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

/// Load the config; a `*_env = "NAME"` key reads the environment variable NAME, else the
/// systemd credential NAME (`LoadCredential=NAME:/path` puts it in `$CREDENTIALS_DIRECTORY`).
fn load_config(path: &std::path::Path) -> Result<config::Config, ConfigError> {
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(std::path::PathBuf::from);
    config::load(path, &|name| secret(name, credentials.as_deref()))
}

/// A secret by name: the environment first, then a credential file of that name. A credential's
/// one trailing newline (as `echo` or an editor leaves it) is not part of the secret.
fn secret(name: &str, credentials: Option<&std::path::Path>) -> Option<String> {
    if let Ok(value) = std::env::var(name) {
        return Some(value);
    }
    // A name with a path separator could read files outside the credentials directory.
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        return None;
    }
    let text = std::fs::read_to_string(credentials?.join(name)).ok()?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    Some(text.strip_suffix('\r').unwrap_or(text).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_come_from_the_environment_then_systemd_credentials() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("SMEE_RELAY_TEST_CREDENTIAL"),
            "https://hooks.slack.com/services/T/B/X\n",
        )
        .unwrap();
        assert_eq!(
            secret("SMEE_RELAY_TEST_CREDENTIAL", Some(dir.path())).as_deref(),
            Some("https://hooks.slack.com/services/T/B/X")
        );
        assert_eq!(secret("SMEE_RELAY_TEST_MISSING", Some(dir.path())), None);
        assert_eq!(secret("SMEE_RELAY_TEST_CREDENTIAL", None), None);
        // No escape from the credentials directory.
        std::fs::write(dir.path().join("outside"), "x").unwrap();
        let inner = dir.path().join("inner");
        std::fs::create_dir(&inner).unwrap();
        assert_eq!(secret("../outside", Some(&inner)), None);
        // PATH is set in every test environment: the environment wins.
        std::fs::write(dir.path().join("PATH"), "not this").unwrap();
        assert_ne!(
            secret("PATH", Some(dir.path())).as_deref(),
            Some("not this")
        );
    }

    /// The CLI printed `1 channels`, `queued 1 deliveries again`.
    #[test]
    fn regression_counts_of_one_were_plural() {
        assert_eq!(count(1, "delivery", "deliveries"), "1 delivery");
        assert_eq!(count(0, "delivery", "deliveries"), "0 deliveries");
        assert_eq!(count(2, "channel", "channels"), "2 channels");
    }
}
