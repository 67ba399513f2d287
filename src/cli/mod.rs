//! Command-line definitions (clap). Only the shape of the CLI lives here; `main` turns it into
//! calls to the library.

use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand};
use reqwest::Url;

use crate::service::logging::LogFormat;
use crate::url::{ChannelUrl, TargetUrl, parse_http_url};

/// Relay webhooks from a smee.io channel to a local service, without losing, reordering or
/// mangling them.
#[derive(Debug, Parser)]
#[command(name = "smee-relay", version, propagate_version = true)]
pub struct Cli {
    /// More log detail (-v debug, -vv trace). RUST_LOG overrides it.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,

    /// Less log detail (-q warnings and errors only, -qq errors only).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub quiet: u8,

    /// Log line format.
    #[arg(
        long,
        value_enum,
        default_value = "text",
        global = true,
        env = "SMEE_RELAY_LOG_FORMAT"
    )]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// `-v` count minus `-q` count.
    pub fn verbosity(&self) -> i8 {
        self.verbose.min(3) as i8 - self.quiet.min(3) as i8
    }
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once; boxing would only add noise
pub enum Command {
    /// Relay a channel to a local target (creates a channel when none is given).
    Forward(ForwardArgs),
    /// Create a new channel and print its URL.
    New(NewArgs),
    /// Run as a daemon from a config file: channels, targets, Port rules, Slack.
    Run(RunArgs),
    /// Validate a config file; with --event, show what the rules would do with one payload.
    Check(CheckArgs),
    /// Inspect and re-queue the events in the spool (works while the relay runs).
    Events(EventsArgs),
    /// Run a smee-compatible channel server that keeps raw bodies and replays missed events.
    Serve(ServeArgs),
    /// See the whole product work in one process, with no account and no network.
    Demo(DemoArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3333", env = "SMEE_RELAY_LISTEN")]
    pub listen: std::net::SocketAddr,

    /// Largest POST body accepted (413 beyond).
    #[arg(long, default_value = "25MiB", value_parser = parse_size)]
    pub max_body: u64,

    /// Keep events this long for replay.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub retain: Duration,

    /// Keep at most this many events per channel for replay.
    #[arg(long, default_value_t = 1000)]
    pub max_events: usize,

    /// Keep at most this many bytes of events for replay, across channels.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub max_buffer: u64,

    /// Require `Authorization: Bearer TOKEN` from subscribers and posters.
    #[arg(long, env = "SMEE_RELAY_SERVE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Require this token from subscribers only (overrides --token for them).
    #[arg(long, hide_env_values = true)]
    pub subscribe_token: Option<String>,

    /// Require this token from posters only (overrides --token for them).
    #[arg(long, hide_env_values = true)]
    pub post_token: Option<String>,

    /// Keep the buffers on disk here (serve.redb), so they survive a restart of the server.
    #[arg(long)]
    pub state_dir: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Also send the alerts to this Slack incoming webhook.
    #[arg(long, value_parser = parse_http_url, env = "SLACK_WEBHOOK_URL", hide_env_values = true)]
    pub slack_webhook: Option<Url>,
}

/// Where the spool lives; shared by every command that touches it.
#[derive(Debug, Args)]
pub struct StateDirArg {
    /// State directory (the spool). Default: $STATE_DIRECTORY (systemd), else
    /// $XDG_STATE_HOME/smee-relay, else ~/.local/state/smee-relay.
    #[arg(long, env = "SMEE_RELAY_STATE_DIR", global = true)]
    pub state_dir: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    #[command(flatten)]
    pub state: StateDirArg,

    #[command(subcommand)]
    pub command: EventsCommand,
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// List events and how their deliveries stand (the most recent last).
    List {
        /// Only deliveries with this status.
        #[arg(long, value_enum)]
        status: Option<crate::spool::Status>,
        /// How many rows at most.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one event: its deliveries, headers and body.
    Show {
        /// The event id (from `events list`).
        id: u64,
    },
    /// Queue events again, at the tail, in order.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["ids", "dead", "since"])))]
    Replay {
        /// Event ids.
        ids: Vec<u64>,
        /// Every dead letter.
        #[arg(long)]
        dead: bool,
        /// Every event received within this long (e.g. 1h).
        #[arg(long, value_parser = parse_duration)]
        since: Option<Duration>,
    },
    /// Delete dead letters.
    Purge {
        /// Delete every dead letter (required: say what to delete).
        #[arg(long, required = true)]
        dead: bool,
    },
}

#[derive(Debug, Args)]
pub struct ForwardArgs {
    /// The smee channel, e.g. https://smee.io/AbCd1234. Omitted: a new channel is created.
    #[arg(value_name = "CHANNEL_URL", conflicts_with = "url")]
    pub channel: Option<ChannelUrl>,

    /// Where to replay webhooks. Default: http://127.0.0.1:<PORT><PATH>.
    #[arg(value_name = "TARGET_URL", conflicts_with_all = ["target_flag", "port", "path"])]
    pub target: Option<TargetUrl>,

    /// The smee channel (smee-client's spelling of CHANNEL_URL).
    #[arg(short = 'u', long = "url", value_name = "CHANNEL_URL")]
    pub url: Option<ChannelUrl>,

    /// Where to replay webhooks (smee-client's spelling of TARGET_URL).
    #[arg(short = 't', long = "target", id = "target_flag", value_name = "TARGET_URL",
          conflicts_with_all = ["port", "path"])]
    pub target_flag: Option<TargetUrl>,

    /// Local port to replay webhooks to, on 127.0.0.1.
    #[arg(short = 'p', long, env = "PORT", default_value_t = 3000,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,

    /// Path on the local port to replay webhooks to.
    #[arg(short = 'P', long, default_value = "/")]
    pub path: String,

    /// Drop and reconnect a connection that has sent no bytes for this long (smee pings every 30s).
    #[arg(long, default_value = "90s", value_parser = parse_duration, env = "SMEE_RELAY_IDLE_TIMEOUT")]
    pub idle_timeout: Duration,

    /// The smee server to create a channel on when no CHANNEL_URL is given.
    #[arg(long, default_value = "https://smee.io", value_parser = parse_http_url)]
    pub server: Url,

    /// Token for a `smee-relay serve --token` channel (sent as `Authorization: Bearer`).
    #[arg(long, env = "SMEE_RELAY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Skip (log and count) any SSE frame larger than this: the most memory one frame may
    /// take is about twice this. A smee frame is about 1.35x its webhook's body.
    #[arg(long, default_value = "128MiB", value_parser = parse_size, env = "SMEE_RELAY_MAX_FRAME")]
    pub max_frame: u64,

    #[command(flatten)]
    pub delivery: DeliveryArgs,
}

/// How events are kept and retried; shared by `forward` and `run`.
#[derive(Debug, Args)]
pub struct DeliveryArgs {
    #[command(flatten)]
    pub state: StateDirArg,

    /// How long a target may take to answer one delivery.
    #[arg(long, default_value = "30s", value_parser = parse_duration, env = "SMEE_RELAY_TARGET_TIMEOUT")]
    pub target_timeout: Duration,

    /// Keep delivered events this long, for `events replay`.
    #[arg(long, default_value = "24h", value_parser = parse_duration, env = "SMEE_RELAY_RETAIN")]
    pub retain: Duration,

    /// Spool size limit (e.g. 512MiB, 1GiB). Full: delivered events are pruned early, then new
    /// events are refused with an error.
    #[arg(long, default_value = "1GiB", value_parser = parse_size, env = "SMEE_RELAY_MAX_SPOOL_SIZE")]
    pub max_spool_size: u64,

    /// Stop retrying an event this old; it becomes a dead letter.
    #[arg(long, default_value = "24h", value_parser = parse_duration, env = "SMEE_RELAY_MAX_RETRY_AGE")]
    pub max_retry_age: Duration,

    /// Serve /healthz and /metrics (Prometheus) on this address, e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR", env = "SMEE_RELAY_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The config file (TOML).
    #[arg(short, long, env = "SMEE_RELAY_CONFIG")]
    pub config: std::path::PathBuf,

    #[command(flatten)]
    pub delivery: DeliveryArgs,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The config file (TOML).
    #[arg(short, long, env = "SMEE_RELAY_CONFIG")]
    pub config: std::path::PathBuf,

    /// A webhook body (Port payload JSON): show the change, the diff, and what each rule would
    /// send for it, starting from no alert.
    #[arg(long)]
    pub event: Option<std::path::PathBuf>,
}

impl ForwardArgs {
    /// The target, from whichever spelling was used.
    pub fn target_url(&self) -> Result<TargetUrl, crate::url::UrlError> {
        match self.target.clone().or_else(|| self.target_flag.clone()) {
            Some(target) => Ok(target),
            None => TargetUrl::local(self.port, &self.path),
        }
    }

    /// The channel, from whichever spelling was used.
    pub fn channel_url(&self) -> Option<ChannelUrl> {
        self.channel.clone().or_else(|| self.url.clone())
    }
}

#[derive(Debug, Args)]
pub struct NewArgs {
    /// The smee server to create the channel on.
    #[arg(long, default_value = "https://smee.io", value_parser = parse_http_url)]
    pub server: Url,
}

/// A duration such as `90s`, `5m` or `1h 30m`, rejecting zero.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => Err("must be longer than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{e} (write it like 30s, 5m or 1h)")),
    }
}

/// A size such as `1GiB`, `512MiB`, `64KiB`, `10MB` or a number of bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    crate::memory::parse_size(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("10 MB"), Ok(10_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("1PiB").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn the_cli_is_well_formed() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
