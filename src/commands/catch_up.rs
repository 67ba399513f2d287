//! `smee-relay catch-up github`: recover the GitHub deliveries a channel missed while no relay
//! listened, into the spool of the relay (its config, or its state directory), whether the relay
//! runs or not. This module picks the channel, its queues and the token; the run itself is
//! `service::catch_up`'s.

use std::sync::Arc;

use anyhow::Context as _;

use crate::cli::{CatchUpArgs, CatchUpCommand, GithubCatchUpArgs};
use crate::config::ConfigError;
use crate::secret::SecretString;
use crate::service::catch_up::{self, Destination, Fate, Report};
use crate::service::daemon::{ChannelPlan, routes_of};
use crate::source::SourceConfig;
use crate::source::github::{self, HookClient, HookConfig};
use crate::spool::{self, Spool};
use crate::url::ChannelUrl;

pub async fn run(args: CatchUpArgs) -> anyhow::Result<()> {
    match args.command {
        CatchUpCommand::Github(args) => run_github(args).await,
    }
}

/// A usage problem: exit code 2, as for a bad config.
fn usage(message: String) -> anyhow::Error {
    ConfigError {
        problems: vec![message],
    }
    .into()
}

async fn run_github(args: GithubCatchUpArgs) -> anyhow::Result<()> {
    crate::http::set_trust(args.tls.cacert.as_deref(), args.tls.insecure)?;
    let owner = args
        .repo
        .clone()
        .or_else(|| args.org.clone())
        .expect("clap requires --repo or --org");
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(std::path::PathBuf::from);
    let token = match &args.token_file {
        Some(path) => github::read_token_file(path, credentials.as_deref())
            .map_err(|e| usage(format!("--token-file: {e}")))?,
        None => super::secret(&args.token_env, credentials.as_deref())
            .filter(|t| !t.is_empty())
            .map(SecretString::from)
            .ok_or_else(|| {
                usage(format!(
                    "no GitHub token: {} is not set (--token-env NAME names another variable; \
                     --token-file PATH reads a file)",
                    args.token_env
                ))
            })?,
    };
    let (spool, to) = destination(&args)?;
    let mut client = HookClient::new(HookConfig {
        owner,
        hook: args.hook,
        api_url: args.api_url.clone(),
        token,
    })?;
    let since_ms = crate::clock::now_ms().saturating_sub(args.since.as_millis() as u64);
    let report = catch_up::github(spool.as_ref(), &mut client, &to, since_ms, args.dry_run)
        .await
        .with_context(|| format!("catch-up of {} failed", client.describe()))?;
    print!("{}", summary(&report, &client.describe(), &args));
    if report.failures() > 0 {
        anyhow::bail!(
            "{} deliveries of {} could not be recovered (marked FAILED above); the others were",
            report.failures(),
            client.describe()
        );
    }
    Ok(())
}

/// The spool, and the channel and queues the recovered events go to: from the config, or
/// without one, the queues the spool already has for `--channel`.
/// The spool is `None` only for a dry run before the relay ever ran: a dry run creates nothing.
fn destination(args: &GithubCatchUpArgs) -> anyhow::Result<(Option<Arc<Spool>>, Destination)> {
    let Some(path) = &args.config else {
        let Some(channel) = &args.channel else {
            return Err(usage(
                "give --config FILE (the relay's config), or --channel URL with --state-dir".into(),
            ));
        };
        let dir = spool::lock::state_dir(args.state.state_dir.as_deref());
        let file = dir.join(spool::FILE_NAME);
        if !file.exists() {
            return Err(usage(format!(
                "no spool at {}: is --state-dir the relay's state directory? (or give --config)",
                file.display()
            )));
        }
        let spool = Spool::open(&dir)?;
        let key = spool::lock::channel_key(channel.expose().as_str());
        let routes = spool.channel_routes(&key)?;
        if routes.is_empty() {
            return Err(usage(format!(
                "the spool in {} has no queue for channel {channel}: give --config FILE so the \
                 relay's targets are known",
                dir.display()
            )));
        }
        let to = Destination {
            channel: channel.to_string(),
            routes,
            ignore_events: Vec::new(),
        };
        return Ok((Some(Arc::new(spool)), to));
    };
    let config = super::load_config(path)?;
    let channel = pick_channel(&config.channels, args.channel.as_ref())?;
    let dir = match (&args.state.state_dir, &config.state_dir) {
        (Some(flag), _) => flag.clone(),
        (None, Some(file)) => file.clone(),
        (None, None) => spool::lock::state_dir(None),
    };
    let actions =
        config.port_api.is_some() && (!config.actions.is_empty() || config.report_automation_runs);
    let plan = ChannelPlan {
        source: SourceConfig::new(channel.url.clone()),
        forward: channel.forward.clone(),
        pipeline: channel.pipeline,
        save_dir: None,
    };
    let to = Destination {
        channel: channel.url.to_string(),
        routes: routes_of(&plan, actions),
        ignore_events: channel.ignore_events.clone(),
    };
    // A relay that has not run yet: the spool is made, and it delivers them when it starts.
    if args.dry_run && !dir.join(spool::FILE_NAME).exists() {
        return Ok((None, to));
    }
    let spool = Spool::open(&dir)?;
    Ok((Some(Arc::new(spool)), to))
}

/// The channel `--channel` names (by what identifies a channel), or the only one.
fn pick_channel<'c>(
    channels: &'c [crate::config::Channel],
    wanted: Option<&ChannelUrl>,
) -> anyhow::Result<&'c crate::config::Channel> {
    match wanted {
        Some(url) => {
            let identity = spool::lock::channel_identity(url.expose().as_str());
            channels
                .iter()
                .find(|c| spool::lock::channel_identity(c.url.expose().as_str()) == identity)
                .ok_or_else(|| {
                    usage(format!(
                        "--channel {url} is not one of the config's {} channels",
                        channels.len()
                    ))
                })
        }
        None => match channels {
            [only] => Ok(only),
            _ => Err(usage(format!(
                "the config has {} channels: say which one the hook posts to with --channel URL",
                channels.len()
            ))),
        },
    }
}

/// What was found, one line per missing delivery, then the outcome.
fn summary(report: &Report, hook: &str, args: &GithubCatchUpArgs) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{hook}: {} deliveries ({} GUIDs) since {}, {} missing from the spool",
        report.listed,
        report.guids,
        humantime::format_duration(args.since),
        report.missing.len()
    );
    for (d, fate) in report.missing.iter().zip(&report.fates) {
        let id = match fate {
            Fate::Pending => "-".to_string(),
            Fate::Recovered(id) => format!("event {id}"),
            Fate::Ignored => "ignored (ignore_events)".into(),
            Fate::AlreadyThere => "stored meanwhile".into(),
            Fate::Failed(why) => format!("FAILED: {}", escape(why)),
        };
        let _ = writeln!(
            out,
            "  {}  {}  {}{}  (GitHub got {})  {id}",
            d.delivered_at,
            d.guid,
            escape(&d.event),
            d.action
                .as_deref()
                .map(|a| format!(".{}", escape(a)))
                .unwrap_or_default(),
            d.status_code
        );
    }
    for bad in &report.unreadable {
        let _ = writeln!(out, "  FAILED: {}", escape(bad));
    }
    if args.dry_run {
        let _ = writeln!(
            out,
            "dry run: would recover {} deliveries",
            report.missing.len()
        );
    } else {
        let _ = writeln!(
            out,
            "recovered {} deliveries into the spool{}{}",
            report.recovered.len(),
            if report.ignored > 0 {
                format!(" ({} skipped by ignore_events)", report.ignored)
            } else {
                String::new()
            },
            if report.failures() > 0 {
                format!("; {} could not be recovered", report.failures())
            } else {
                String::new()
            }
        );
    }
    out
}

/// What GitHub said, safe for a terminal.
fn escape(text: &str) -> String {
    crate::service::logging::escape_control(text).into_owned()
}
