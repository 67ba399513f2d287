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
    args.tls.set_trust()?;
    let (spool, to, block, dir) = destination(&args)?;
    let block = block.as_ref();
    let owner = match (args.repo.clone().or_else(|| args.org.clone()), block) {
        (Some(owner), _) => owner,
        (None, Some(block)) => block.hook.owner.clone(),
        (None, None) => {
            return Err(usage(
                "say whose hook: --repo OWNER/REPO or --org ORG (or give --config with the \
                 channel's [channel.github_catch_up] block)"
                    .into(),
            ));
        }
    };
    let hook = match (args.hook, block) {
        (Some(hook), _) => hook,
        (None, Some(block)) => block.hook.hook,
        (None, None) => {
            return Err(usage(
                "say which hook: --hook ID (the number in the hook's settings URL)".into(),
            ));
        }
    };
    let api_url = match (&args.api_url, block) {
        (Some(url), _) => url.clone(),
        (None, Some(block)) => block.hook.api_url.clone(),
        (None, None) => github::DEFAULT_API_URL.parse().expect("a valid URL"),
    };
    let since = args
        .since
        .or(block.map(|b| b.since))
        .unwrap_or(std::time::Duration::from_secs(3600));
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(std::path::PathBuf::from);
    let token = match (&args.token_file, &args.token_env, block) {
        (Some(path), _, _) => github::read_token_file(path, credentials.as_deref())
            .map_err(|e| usage(format!("--token-file: {e}")))?,
        (None, None, Some(block)) => block.hook.token.clone(),
        (None, name, _) => {
            let name = name.as_deref().unwrap_or("GITHUB_TOKEN");
            match super::secret(name, credentials.as_deref()) {
                Some(token) if token.trim().is_empty() => {
                    return Err(usage(format!(
                        "no GitHub token: {name} is empty (--token-env NAME names another \
                         variable; --token-file PATH reads a file)"
                    )));
                }
                Some(token) => SecretString::from(token.trim_end_matches(['\r', '\n']).to_string()),
                None => {
                    return Err(usage(format!(
                        "no GitHub token: {name} is not set (--token-env NAME names another \
                         variable; --token-file PATH reads a file)"
                    )));
                }
            }
        }
    };
    println!("spool: {}", dir.display());
    let mut client = HookClient::new(HookConfig {
        owner,
        hook,
        api_url,
        token,
    })?;
    let since_ms = crate::clock::now_ms().saturating_sub(since.as_millis() as u64);
    let report = catch_up::github(spool.as_ref(), &mut client, &to, since_ms, args.dry_run)
        .await
        .with_context(|| format!("catch-up of {} failed", client.describe()))?;
    print!("{}", summary(&report, &client.describe(), &args, since));
    if report.failures() > 0 {
        anyhow::bail!(
            "{} of {} could not be recovered (marked FAILED above); the others were",
            super::count(report.failures(), "delivery", "deliveries"),
            client.describe()
        );
    }
    Ok(())
}

/// What [`destination`] found: the spool (`None` only for a dry run before the relay ever
/// ran: a dry run creates nothing), where recovered events go, the channel's
/// `[channel.github_catch_up]` block (defaults for the flags), and the state directory.
type Found = (
    Option<Arc<Spool>>,
    Destination,
    Option<github::CatchUp>,
    std::path::PathBuf,
);

/// The spool, and the channel and queues the recovered events go to: from the config, or
/// without one, the queues the spool already has for `--channel`.
fn destination(args: &GithubCatchUpArgs) -> anyhow::Result<Found> {
    let Some(path) = &args.config else {
        let Some(channel) = &args.channel else {
            return Err(usage(
                "give --config FILE (the relay's config), or --channel URL with --state-dir".into(),
            ));
        };
        let dir = spool::lock::state_dir(args.state.state_dir.as_deref());
        let file = dir.join(spool::FILE_NAME);
        if !Spool::exists(&dir)? {
            return Err(usage(format!(
                "no spool at {}: is --state-dir the relay's state directory? (or give --config)",
                file.display()
            )));
        }
        let spool = Spool::open_shared(&dir)?;
        let key = spool::lock::channel_key(channel.expose().as_str());
        // The targets given, named as the relay names their queues; else those the spool has.
        let routes = match &args.targets[..] {
            [] => spool.channel_routes(&key)?,
            targets => targets
                .iter()
                .map(|t| spool::route_key(&key, &t.to_string()))
                .collect(),
        };
        if routes.is_empty() {
            return Err(usage(format!(
                "the spool in {} has no queue for channel {channel} yet (it has received no \
                 event): give the relay's target with --target URL (or --config FILE)",
                dir.display()
            )));
        }
        let to = Destination {
            channel: channel.to_string(),
            routes,
            ignore_events: args.ignore_events.clone(),
        };
        return Ok((Some(Arc::new(spool)), to, None, dir));
    };
    let config = super::load_config(path)?;
    let channel = pick_channel(&config.channels, args.channel.as_ref())?;
    let (dir, chosen) = match (&args.state.state_dir, &config.state_dir) {
        (Some(flag), _) => (flag.clone(), true),
        (None, Some(file)) => (file.clone(), true),
        (None, None) => (spool::lock::state_dir(None), false),
    };
    let actions =
        config.port_api.is_some() && (!config.actions.is_empty() || config.report_automation_runs);
    let plan = ChannelPlan {
        source: SourceConfig::new(channel.url.clone()),
        forward: channel.forward.clone(),
        pipeline: channel.pipeline,
        save_dir: None,
    };
    let mut ignore_events = channel.ignore_events.clone();
    ignore_events.extend(args.ignore_events.iter().cloned());
    let to = Destination {
        channel: channel.url.to_string(),
        routes: routes_of(&plan, actions, config.cluster.is_some()),
        ignore_events,
    };
    let block = channel.github_catch_up.clone();
    let exists = dir.join(spool::FILE_NAME).exists();
    // The daemon may run with another state directory (systemd's StateDirectory, a
    // --state-dir flag) than the default: a new spool here would hold what it never sees.
    if !exists && !chosen {
        return Err(usage(format!(
            "no spool at {}: the config names no state_dir, so the relay's spool is not known; \
             give --state-dir DIR (the relay's state directory)",
            dir.join(spool::FILE_NAME).display()
        )));
    }
    // A relay that has not run yet: the spool is made, and it delivers them when it starts.
    if args.dry_run && !exists {
        return Ok((None, to, block, dir));
    }
    let spool = Spool::open_shared(&dir)?;
    Ok((Some(Arc::new(spool)), to, block, dir))
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
                        "--channel {url} is not one of the config's {}",
                        super::count(channels.len(), "channel", "channels")
                    ))
                })
        }
        None => match channels {
            [only] => Ok(only),
            _ => Err(usage(format!(
                "the config has {}: say which one the hook posts to with --channel URL",
                super::count(channels.len(), "channel", "channels")
            ))),
        },
    }
}

/// What was found, one line per missing delivery, then the outcome.
fn summary(
    report: &Report,
    hook: &str,
    args: &GithubCatchUpArgs,
    since: std::time::Duration,
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{hook}: {} ({}) since {}, {} missing from the spool",
        super::count(report.listed, "delivery", "deliveries"),
        super::count(report.guids, "GUID", "GUIDs"),
        humantime::format_duration(since),
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
    if let Some(from) = report.checked_from_ms {
        let _ = writeln!(
            out,
            "  {} made before {} not checked: the spool has pruned what it received then (--retain); keep --since within --retain",
            super::count(report.unchecked, "delivery", "deliveries"),
            crate::clock::rfc3339_seconds(from)
        );
    }
    if args.dry_run {
        let _ = writeln!(
            out,
            "dry run: would recover {}",
            super::count(report.missing.len(), "delivery", "deliveries")
        );
    } else {
        let _ = writeln!(
            out,
            "recovered {} into the spool{}{}",
            super::count(report.recovered.len(), "delivery", "deliveries"),
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
    crate::text::escape_control(text).into_owned()
}
