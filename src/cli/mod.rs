//! Command-line definitions (clap). Only the shape of the CLI lives here; `main` turns it into
//! calls to the library.
//!
//! Two spellings lead to `forward`: invoked as `smee` (a symlink or a copy), the command line is
//! smee-client's ([`smee`]); and `smee-relay -u URL -t TARGET` with no subcommand is `forward`
//! ([`parse`] inserts the word). Neither may change what `smee-relay forward` accepts.

pub mod smee;

use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand};
use reqwest::Url;

use crate::service::logging::LogFormat;
use crate::url::{ChannelUrl, TargetUrl, parse_http_url};

/// Relay webhooks from a smee.io channel to a local service, without losing, reordering or
/// mangling them.
#[derive(Debug, Parser)]
#[command(
    name = "smee-relay",
    version,
    propagate_version = true,
    after_help = "smee-client's command line works too: `smee-relay -u CHANNEL_URL -t TARGET_URL` \
                  is `forward` (-q and -v keep their meaning here), and the binary linked as \
                  `smee` takes smee-client 5's flags exactly."
)]
pub struct Cli {
    /// More log detail (-v debug, -vv trace). RUST_LOG overrides it.
    #[arg(short, long, action = ArgAction::Count, global = true, help_heading = "Logging")]
    pub verbose: u8,

    /// Less log detail (-q warnings and errors only, -qq errors only).
    #[arg(short, long, action = ArgAction::Count, global = true, help_heading = "Logging")]
    pub quiet: u8,

    /// Log line format.
    #[arg(
        long,
        value_enum,
        default_value = "text",
        global = true,
        env = "SMEE_RELAY_LOG_FORMAT",
        help_heading = "Logging"
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
    /// Recover webhooks a channel missed while no relay listened, from a sender that kept them
    /// (GitHub's hook deliveries), and queue them (works while the relay runs).
    CatchUp(CatchUpArgs),
    /// Run a smee-compatible channel server that keeps raw bodies and replays missed events.
    Serve(ServeArgs),
    /// See the whole product work in one process, with no account and no network.
    Demo(DemoArgs),
    /// Write shell completions or man pages (the packages ship them; for a `cargo install`)
    Generate(GenerateArgs),
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// What to write.
    #[arg(value_enum)]
    pub what: Generated,
    /// The directory to write into (created if missing).
    pub dir: std::path::PathBuf,
}

/// The files `generate` writes.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Generated {
    /// bash, zsh and fish completions for `smee-relay` and `smee`.
    Completions,
    /// Man pages: smee-relay(1), one per subcommand, and smee(1).
    Man,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3333", env = "SMEE_RELAY_LISTEN",
          value_parser = crate::url::parse_listen)]
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

    /// Hold at most this much for clients: replay buffers, channels, subscribers and bodies
    /// being read, all together. Replay data is evicted from the channel holding the most, oldest first (counted in /metrics).
    #[arg(long, alias = "max-buffer", default_value = "256MiB", value_parser = parse_size)]
    pub max_memory: u64,

    /// Keep at most this many channels; past it, new channels get 503.
    #[arg(long, default_value_t = 10_000)]
    pub max_channels: usize,

    /// Drop a channel, with its events, after this long with no post and no subscriber.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    pub channel_ttl: Duration,

    /// Accept at most this many subscribers on one channel.
    #[arg(long, default_value_t = 256)]
    pub max_subscribers: usize,

    /// Keep at most this many connections open; more are closed as they come.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,

    /// A request head, or a whole POST body, must arrive within this (event streams are exempt).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub read_timeout: Duration,

    /// Serve HTTPS with this PEM certificate chain (re-read on SIGHUP).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// The PEM private key for --tls-cert (re-read on SIGHUP).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,

    /// Believe X-Forwarded-For, -Proto and -Host (only behind a proxy that sets them).
    #[arg(long)]
    pub trust_proxy: bool,

    /// Accept posts only from these networks (comma-separated CIDRs or addresses).
    #[arg(long, value_delimiter = ',', value_parser = parse_net)]
    pub allow_post_from: Vec<ipnet::IpNet>,

    /// Require `Authorization: Bearer TOKEN` from subscribers and posters.
    #[arg(long, env = "SMEE_RELAY_SERVE_TOKEN", hide_env_values = true, value_parser = crate::secret::parse_token)]
    pub token: Option<crate::secret::SecretString>,

    /// Require this token from subscribers only (overrides --token for them).
    #[arg(long, env = "SMEE_RELAY_SERVE_SUBSCRIBE_TOKEN", hide_env_values = true, value_parser = crate::secret::parse_token)]
    pub subscribe_token: Option<crate::secret::SecretString>,

    /// Require this token from posters only (overrides --token for them).
    #[arg(long, env = "SMEE_RELAY_SERVE_POST_TOKEN", hide_env_values = true, value_parser = crate::secret::parse_token)]
    pub post_token: Option<crate::secret::SecretString>,

    /// Keep the buffers on disk here (serve.redb), so they survive a restart of the server.
    #[arg(long, conflicts_with = "nats_url")]
    pub state_dir: Option<std::path::PathBuf>,

    /// Share channels with other `serve` replicas through NATS JetStream (e.g.
    /// nats://127.0.0.1:4222; comma-separate several): the stream holds the events, and
    /// --retain, --max-events and --max-memory become its limits.
    #[arg(long, env = "SMEE_RELAY_NATS_URL", hide_env_values = true, value_parser = parse_nats_url)]
    pub nats_url: Option<crate::secret::SecretString>,

    /// A NATS credentials file (.creds: JWT and NKey seed) for --nats-url.
    #[arg(long, env = "SMEE_RELAY_NATS_CREDENTIALS", requires = "nats_url")]
    pub nats_credentials: Option<std::path::PathBuf>,

    /// Trust the CA certificates in this PEM file for NATS over TLS (and require TLS).
    #[arg(long, env = "SMEE_RELAY_NATS_TLS_CA", requires = "nats_url")]
    pub nats_tls_ca: Option<std::path::PathBuf>,

    /// The JetStream stream the replicas share (subjects STREAM.CHANNEL).
    #[arg(long, default_value = "SMEE_SERVE", requires = "nats_url")]
    pub nats_stream: String,

    /// Copies of the stream in a NATS cluster (3 survives the loss of a NATS node).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5), requires = "nats_url")]
    pub nats_replicas: u8,

    /// /healthz fails once NATS has been unreachable this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration, requires = "nats_url")]
    pub nats_grace: Duration,

    /// Send every subscriber smee.io's frames only (the body re-serialised), ignoring the raw
    /// opt-in, as smee.io does: to see what a relay gets through smee.io, and to benchmark on it.
    #[arg(long)]
    pub smee_wire: bool,
}

/// A CIDR (`10.0.0.0/8`) or a single address.
fn parse_net(text: &str) -> Result<ipnet::IpNet, crate::error::Invalid> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("`{text}` is not a CIDR (10.0.0.0/8) or an IP address").into())
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Also send the alerts to this Slack incoming webhook. Only when given here: the demo never
    /// posts to a webhook it found in the environment.
    #[arg(long, value_parser = parse_http_url)]
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

/// Said under `--help` of the commands that open the spool beside a running relay.
const SHARE_WAIT_HELP: &str = "While a relay runs on the same state directory, this waits for the \
relay to share the spool with it and to record what it has delivered: usually tens of \
milliseconds, up to about a second where the relay cannot watch the directory (up to 10 s before \
it gives up, saying which relay to look at).";

#[derive(Debug, Args)]
#[command(after_help = SHARE_WAIT_HELP)]
pub struct EventsArgs {
    #[command(flatten)]
    pub state: StateDirArg,

    /// The relay's config: with `[cluster]` in it, the events are the cluster's (from NATS:
    /// every frame once, ids are stream sequences), not this machine's spool. Only
    /// `[cluster]` and `state_dir` (this machine's spool, unless --state-dir) are read.
    #[arg(long, env = "SMEE_RELAY_CONFIG", global = true)]
    pub config: Option<std::path::PathBuf>,

    /// The cluster's NATS (cluster mode, as `run --nats-url`); wins over the config's URL.
    #[arg(long, env = "SMEE_RELAY_NATS_URL", hide_env_values = true, value_parser = crate::secret::parse_arg, global = true, help_heading = "Cluster mode")]
    pub nats_url: Option<crate::secret::SecretString>,

    /// The cluster's name (its `[cluster] name`), over the config's; with `--nats-url` and no
    /// config, without it the cluster is `default`, as for `run`.
    #[arg(
        long,
        value_name = "NAME",
        global = true,
        help_heading = "Cluster mode"
    )]
    pub cluster: Option<String>,

    /// This machine's spool, even in cluster mode (the deliveries this instance made).
    #[arg(long, global = true, help_heading = "Cluster mode")]
    pub local: bool,

    #[command(subcommand)]
    pub command: EventsCommand,
}

/// `events list --status`: the statuses `list` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ListStatus {
    /// Queued (in cluster mode, in flight too).
    Pending,
    /// Cluster mode: held by an instance delivering it now.
    InFlight,
    Delivered,
    /// Given up on, not yet replayed (nor, in cluster mode, purged).
    Dead,
    /// Cluster mode: a dead letter replayed.
    Replayed,
    /// Cluster mode: a dead letter purged (never delivered).
    Purged,
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// List events and how their deliveries stand (the most recent last).
    #[command(after_help = SHARE_WAIT_HELP)]
    List {
        /// Only deliveries with this status (in-flight, replayed and purged: cluster mode).
        #[arg(long, value_enum)]
        status: Option<ListStatus>,
        /// How many rows at most.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one event: its deliveries, headers and body.
    #[command(after_help = SHARE_WAIT_HELP)]
    Show {
        /// The event id (from `events list`).
        #[arg(value_parser = event_id)]
        id: u64,
    },
    /// Queue events again, at the tail, in order; with --to, POST them to another URL now.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["ids", "dead", "since"])))]
    #[command(after_help = SHARE_WAIT_HELP)]
    Replay {
        #[command(flatten)]
        which: EventSelection,
        /// POST the events to this URL now, in order, instead of queueing them again (the
        /// spool is not changed). A progress bar shows on a terminal.
        #[arg(long, value_name = "URL")]
        to: Option<TargetUrl>,
        /// With --to: how long one POST may take.
        #[arg(long, default_value = "30s", value_parser = parse_duration, requires = "to")]
        timeout: Duration,
    },
    /// Write events out: NDJSON (one object per line), or gosmee's layout (for each event a
    /// `<received time>-<id>.json` body and an executable `<received time>-<id>.sh` that
    /// replays it with curl).
    #[command(after_help = SHARE_WAIT_HELP)]
    Export {
        #[command(flatten)]
        which: EventSelection,
        /// Every event in the spool (the default when nothing else is selected).
        #[arg(long)]
        all: bool,
        /// The output format.
        #[arg(long, value_enum, default_value = "ndjson")]
        format: ExportFormat,
        /// Write into this directory (created if missing); NDJSON goes to DIR/events.ndjson.
        /// Without it, NDJSON goes to stdout. Required for gosmee.
        #[arg(long, required_if_eq("format", "gosmee"))]
        dir: Option<std::path::PathBuf>,
        /// gosmee: where the scripts POST by default (a script's first argument overrides it).
        #[arg(long, default_value = "http://127.0.0.1:3000/")]
        target: TargetUrl,
    },
    /// Delete dead letters, or a queue no relay delivers from.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["dead", "queue"])))]
    #[command(after_help = SHARE_WAIT_HELP)]
    Purge {
        /// Delete every dead letter.
        #[arg(long)]
        dead: bool,
        /// Delete the deliveries still waiting on this queue: its target when one channel's
        /// queue of it holds deliveries, else `CHANNEL-KEY TARGET`, as the relay's start names
        /// a queue whose target it no longer has. They are never
        /// delivered; events still needed by another queue, or kept as delivered history,
        /// stay. Refused while a relay runs that channel on this state directory (it may be
        /// delivering from the queue): stop it first.
        #[arg(long, value_name = "NAME")]
        queue: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct CatchUpArgs {
    #[command(subcommand)]
    pub command: CatchUpCommand,
}

#[derive(Debug, Subcommand)]
pub enum CatchUpCommand {
    /// Compare a GitHub hook's recent deliveries with the spool and queue the missing ones,
    /// oldest first, marked `x-smee-relay-recovered: github` (payload re-serialised as compact
    /// JSON, `x-hub-signature*` dropped: GitHub's API does not return the signed bytes).
    #[command(after_help = SHARE_WAIT_HELP)]
    Github(GithubCatchUpArgs),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("hook_owner").args(["repo", "org"])))]
pub struct GithubCatchUpArgs {
    /// The repository of a repository hook. Default: the channel's `[channel.github_catch_up]`.
    #[arg(long, value_name = "OWNER/REPO", value_parser = crate::source::github::HookOwner::repo)]
    pub repo: Option<crate::source::github::HookOwner>,
    /// The organisation of an organisation hook.
    #[arg(long, value_name = "ORG", value_parser = crate::source::github::HookOwner::org)]
    pub org: Option<crate::source::github::HookOwner>,
    /// The hook's id (the number in its settings URL). Default: the channel's
    /// `[channel.github_catch_up]` hook.
    #[arg(long, value_name = "ID", value_parser = clap::value_parser!(u64).range(1..))]
    pub hook: Option<u64>,
    /// Look at deliveries made within this long (default: the block's `since`, else 1h). Keep
    /// it within the relay's --retain (24h by default): older events are pruned from the spool
    /// and would look missing.
    #[arg(long, value_parser = parse_duration)]
    pub since: Option<Duration>,
    /// List what would be recovered; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// The GitHub API (GitHub Enterprise Server: https://HOST/api/v3). Default: the block's
    /// `api_url`, else https://api.github.com.
    #[arg(long, env = "GITHUB_API_URL", value_parser = parse_http_url)]
    pub api_url: Option<Url>,
    /// The environment variable (or systemd credential in $CREDENTIALS_DIRECTORY) holding the
    /// token. Default: the block's token, else GITHUB_TOKEN.
    #[arg(long, value_name = "NAME")]
    pub token_env: Option<String>,
    /// A file holding the token (relative: also looked up in $CREDENTIALS_DIRECTORY).
    #[arg(long, value_name = "PATH", conflicts_with = "token_env")]
    pub token_file: Option<std::path::PathBuf>,
    /// An event name the channel skips (the relay's --ignore-event / ignore_events): not
    /// recovered either. Repeatable; added to the config's.
    #[arg(long = "ignore-event", value_name = "EVENT")]
    pub ignore_events: Vec<String>,
    /// The relay's config: its state directory, the channel's queues and ignore_events.
    #[arg(short, long, env = "SMEE_RELAY_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// The channel the hook posts to. Default: the config's only channel. Without --config,
    /// required: its queues are those the spool has for it.
    #[arg(long, value_name = "URL")]
    pub channel: Option<ChannelUrl>,
    /// Without --config: the relay's target, as given to `forward` (repeatable). Needed before
    /// the channel's first event, when the spool knows none of its queues yet.
    #[arg(long = "target", value_name = "URL", conflicts_with = "config")]
    pub targets: Vec<TargetUrl>,
    #[command(flatten)]
    pub state: StateDirArg,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// Which events an `events` subcommand works on.
#[derive(Debug, Args)]
pub struct EventSelection {
    /// Event ids.
    #[arg(value_parser = event_id)]
    pub ids: Vec<u64>,
    /// Every dead letter.
    #[arg(long)]
    pub dead: bool,
    /// Every event received within this long (e.g. 1h).
    #[arg(long, value_parser = parse_duration)]
    pub since: Option<Duration>,
}

/// How `events export` writes events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// One JSON object per line: id, received, channel, headers, query, body (text, or base64).
    Ndjson,
    /// gosmee's --saveDir layout: `<received time>-<id>.json` and an executable
    /// `<received time>-<id>.sh`.
    Gosmee,
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

    /// Local port to replay webhooks to, on 127.0.0.1. Default: $PORT, else 3000. ($PORT is only
    /// this default: a target given another way wins over it.)
    #[arg(short = 'p', long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,

    /// Path on the local port to replay webhooks to.
    #[arg(short = 'P', long, default_value = "/")]
    pub path: String,

    /// Drop and reconnect a connection that has sent no bytes for this long (smee pings every 30s).
    #[arg(long, default_value = "90s", value_parser = parse_duration, env = "SMEE_RELAY_IDLE_TIMEOUT")]
    pub idle_timeout: Duration,

    /// The smee server to create a channel on when no CHANNEL_URL is given.
    #[arg(long, default_value = "https://smee.io", value_parser = parse_http_url, env = "SMEE_RELAY_SERVER")]
    pub server: Url,

    /// Skip events with this name (x-github-event, x-gitlab-event, x-gitea-event, x-event-key
    /// ...), e.g. `--ignore-event ping`. Repeatable. Skipped events are not kept.
    #[arg(long, value_name = "NAME")]
    pub ignore_event: Vec<String>,

    /// Also write each received event into DIR, in gosmee's --saveDir layout (as `events
    /// export --format gosmee` writes it): `<received time>-<id>.json` and an executable
    /// `<received time>-<id>.sh` that replays it with curl, such as
    /// `2026-12-01T04-04-52.265Z-1.sh`. A failed write is a warning; delivery never waits for it.
    #[arg(long, value_name = "DIR", alias = "saveDir")]
    pub save_dir: Option<std::path::PathBuf>,

    /// Forward the query string each webhook came with to the target. Always on; accepted so that
    /// smee-client's command line works unchanged.
    #[arg(long = "query-forwarding")]
    pub query_forwarding: bool,

    /// Token for a `smee-relay serve --token` channel (sent as `Authorization: Bearer`).
    #[arg(long, env = "SMEE_RELAY_TOKEN", hide_env_values = true, value_parser = crate::secret::parse_token)]
    pub token: Option<crate::secret::SecretString>,

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

    /// Disk space to leave free where the spool is (as df's Avail counts it). Short of it, the
    /// spool takes no more room: delivered events are pruned early, then new events wait in
    /// memory. 0 turns it off: a spool that fills its disk then stops until room is made.
    #[arg(long, default_value = "64MiB", value_parser = parse_size_or_zero, env = "SMEE_RELAY_KEEP_FREE")]
    pub keep_free: u64,

    /// Stop retrying an event this old; it becomes a dead letter.
    #[arg(long, default_value = "24h", value_parser = parse_duration, env = "SMEE_RELAY_MAX_RETRY_AGE")]
    pub max_retry_age: Duration,

    /// Serve /healthz and /metrics (Prometheus) on this address, e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR", env = "SMEE_RELAY_METRICS_LISTEN",
          value_parser = crate::url::parse_listen)]
    pub metrics_listen: Option<std::net::SocketAddr>,

    /// The longest Retry-After obeyed (seconds or an HTTP-date); a longer one waits this long.
    /// At most 7d.
    #[arg(long, default_value = "1h", value_parser = parse_max_retry_after, env = "SMEE_RELAY_MAX_RETRY_AFTER")]
    pub max_retry_after: Duration,

    /// On SIGTERM/SIGINT, how long a delivery in flight may still take; then it is cut off and
    /// stays queued. Keep it below systemd's TimeoutStopSec (30s in the shipped units).
    #[arg(long, default_value = "5s", value_parser = parse_duration, env = "SMEE_RELAY_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Duration,

    #[command(flatten)]
    pub tls: TlsArgs,
}

/// TLS trust for every outbound connection (channels, https targets, Slack).
#[derive(Debug, Args)]
pub struct TlsArgs {
    /// Also trust the certificates in this PEM file (a private CA).
    #[arg(long, value_name = "FILE", env = "SMEE_RELAY_CACERT")]
    pub cacert: Option<std::path::PathBuf>,

    /// Verify no TLS certificate at all (a development proxy only; logged as a warning).
    #[arg(long)]
    pub insecure: bool,
}

impl TlsArgs {
    /// Make these the process's TLS trust ([`crate::http::set_trust`]).
    pub fn set_trust(&self) -> Result<(), crate::http::TrustError> {
        crate::http::set_trust(
            self.cacert
                .as_deref()
                .map(|path| (path, "--cacert or SMEE_RELAY_CACERT")),
            self.insecure,
        )
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The config file (TOML).
    #[arg(short, long, env = "SMEE_RELAY_CONFIG")]
    pub config: std::path::PathBuf,

    #[command(flatten)]
    pub delivery: DeliveryArgs,

    /// Join the relays sharing this NATS JetStream (cluster mode; `[cluster]` in the config
    /// names it and sets the rest). May hold a password: prefer the environment variable.
    #[arg(long, env = "SMEE_RELAY_NATS_URL", hide_env_values = true, value_parser = crate::secret::parse_arg)]
    pub nats_url: Option<crate::secret::SecretString>,
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

    /// The cluster's NATS, as `run --nats-url` takes it (the variable too): `check` then says
    /// the cluster `run` would join, cluster `default` for a config without `[cluster]`.
    #[arg(long, env = "SMEE_RELAY_NATS_URL", hide_env_values = true, value_parser = crate::secret::parse_arg)]
    pub nats_url: Option<crate::secret::SecretString>,
}

impl ForwardArgs {
    /// The target, from whichever spelling was used; else `127.0.0.1:<--port or $PORT or
    /// 3000><--path>`.
    pub fn target_url(&self) -> Result<TargetUrl, TargetError> {
        if let Some(target) = self.target.clone().or_else(|| self.target_flag.clone()) {
            return Ok(target);
        }
        let port = match self.port {
            Some(port) => port,
            None => port_from_env(std::env::var("PORT").ok().as_deref())?,
        };
        Ok(TargetUrl::local(port, &self.path)?)
    }

    /// The channel, from whichever spelling was used.
    pub fn channel_url(&self) -> Option<ChannelUrl> {
        self.channel.clone().or_else(|| self.url.clone())
    }
}

/// Why no target could be made from the arguments.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("PORT in the environment is {0:?}, not a port (1-65535): give --port or --target")]
    EnvPort(String),
    #[error(transparent)]
    Url(#[from] crate::url::UrlError),
    #[error("the target is the channel itself: each event would be posted back to it, forever")]
    IsTheChannel,
}

/// The default port: `$PORT` when set (as smee-client reads it), else 3000.
fn port_from_env(port: Option<&str>) -> Result<u16, TargetError> {
    match port {
        None | Some("") => Ok(3000),
        Some(text) => match text.trim().parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(TargetError::EnvPort(text.to_string())),
        },
    }
}

/// Parse a command line: as smee-client's when the program is called `smee`, else as
/// smee-relay's, where `-u/--url`, `-t/--target`, `-p/--port` or `-P/--path` before any
/// subcommand mean `forward`.
pub fn parse(
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> Result<Invocation, clap::Error> {
    let mut args: Vec<std::ffi::OsString> = args.into_iter().collect();
    let program = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_stem())
        .and_then(|n| n.to_str())
        .unwrap_or("smee-relay");
    if program == "smee" {
        return smee::parse(args).map_err(without_secrets);
    }
    if let Some(at) = forward_flags_at(&args) {
        args.insert(at, "forward".into());
    }
    let verbose_alone = args.len() > 1 && args[1..].iter().all(|a| a == "-v" || a == "-vv");
    Cli::try_parse_from(args)
        .map(|cli| Invocation::Run(Box::new(cli)))
        .map_err(without_secrets)
        .map_err(target_with_port_or_path)
        .map_err(|e| version_tip(e, verbose_alone))
}

/// smee-client's `-v` is its version; here it is `--verbose`, and alone it met clap's bare
/// "requires a subcommand" (helper-150): a tip names the version flag.
fn version_tip(mut error: clap::Error, verbose_alone: bool) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if verbose_alone && error.kind() == ErrorKind::MissingSubcommand {
        error.insert(
            ContextKind::Suggested,
            ContextValue::StyledStrs(vec![
                "-v is --verbose here; the version is `smee-relay --version` (or -V), and \
                 `smee -v` (smee-client's command line) prints it too"
                    .into(),
            ]),
        );
    }
    error
}

/// clap's "cannot be used with" for a target given with `--port` or `--path` said neither why
/// nor what to do (helper-121): a tip says both, and that smee-client's `smee` line takes them.
fn target_with_port_or_path(mut error: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if error.kind() != ErrorKind::ArgumentConflict {
        return error;
    }
    let named = |kind| match error.get(kind) {
        Some(ContextValue::String(arg)) => arg.clone(),
        Some(ContextValue::Strings(args)) => args.join(" "),
        _ => String::new(),
    };
    let (arg, prior) = (named(ContextKind::InvalidArg), named(ContextKind::PriorArg));
    let target = |a: &str| a.contains("--target") || a.contains("TARGET_URL");
    let port_or_path = |a: &str| a.contains("--port") || a.contains("--path");
    if (target(&arg) && port_or_path(&prior)) || (port_or_path(&arg) && target(&prior)) {
        error.insert(
            ContextKind::Suggested,
            ContextValue::StyledStrs(vec![
                "a target is the whole URL, so --port and --path would go unused: put them in \
                 it (http://127.0.0.1:3000/hook), or leave the target out"
                    .into(),
                "`smee` (smee-client's command line) takes both and lets the target win".into(),
            ]),
        );
    }
    error
}

/// clap's error for a refused value repeats the value: for a URL, with what is secret in it
/// (a channel's id, a target's password) hidden as [`crate::url::shown_text`] does.
fn without_secrets(mut error: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue};
    let (Some(ContextValue::String(arg)), Some(ContextValue::String(value))) = (
        error.get(ContextKind::InvalidArg),
        error.get(ContextKind::InvalidValue),
    ) else {
        return error;
    };
    let arg = arg.to_ascii_lowercase();
    let channel = arg.contains("channel_url") || arg.starts_with("--url");
    if !channel && !arg.contains("url") && !arg.contains("target") {
        return error;
    }
    // A control character (refused in a URL) as an escape, not a line break in the message.
    let shown = crate::text::escape_control(&crate::url::shown_text(value, channel)).into_owned();
    error.insert(ContextKind::InvalidValue, ContextValue::String(shown));
    error
}

/// An event id: a number, as `events list` shows them (clap's own word was Rust's "invalid
/// digit found in string").
fn event_id(text: &str) -> Result<u64, String> {
    text.parse().map_err(|_| {
        "an event id is a number, as `events list` shows them (its first column)".into()
    })
}

/// What a command line asks for.
#[derive(Debug)]
pub enum Invocation {
    /// Run a command.
    Run(Box<Cli>),
    /// Print this and exit 0 (`smee -v`).
    Print(String),
}

/// Where `forward` belongs when the command line starts (after global flags) with one of
/// smee-client's flags instead of a subcommand.
fn forward_flags_at(args: &[std::ffi::OsString]) -> Option<usize> {
    let mut i = 1;
    while let Some(arg) = args.get(i).and_then(|a| a.to_str()) {
        let flag = arg.split('=').next().unwrap_or(arg);
        match flag {
            "--log-format" if !arg.contains('=') => i += 2,
            "--log-format" | "--verbose" | "--quiet" => i += 1,
            _ if arg.starts_with('-')
                && !arg.starts_with("--")
                && arg.len() > 1
                && arg[1..].chars().all(|c| c == 'v' || c == 'q') =>
            {
                i += 1
            }
            "--url" | "--target" | "--port" | "--path" => return Some(i),
            _ if ["-u", "-t", "-p", "-P"].iter().any(|f| arg.starts_with(f)) => return Some(i),
            _ => return None,
        }
    }
    None
}

#[derive(Debug, Args)]
pub struct NewArgs {
    /// The smee server to create the channel on.
    #[arg(long, default_value = "https://smee.io", value_parser = parse_http_url, env = "SMEE_RELAY_SERVER")]
    pub server: Url,

    /// TLS trust for the server (a self-hosted `serve` with a private CA).
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// `--nats-url`: not empty (an empty `SMEE_RELAY_NATS_URL=` would otherwise be looked up as a
/// host named "").
fn parse_nats_url(value: &str) -> Result<crate::secret::SecretString, crate::error::Invalid> {
    if value.trim().is_empty() {
        return Err(
            "empty: give nats://HOST:PORT (comma-separate several), or leave the flag and \
             SMEE_RELAY_NATS_URL unset to serve without NATS"
                .into(),
        );
    }
    Ok(crate::secret::SecretString::from(value))
}

/// A duration such as `90s`, `5m` or `1h 30m`, rejecting zero.
pub fn parse_duration(text: &str) -> Result<Duration, crate::error::Invalid> {
    crate::clock::parse_positive_duration(text)
}

/// The longest `--max-retry-after` accepted: a week. Past it, a wait is not a retry but an
/// outage (events older than `--max-retry-age`, 24h by default, are dead letters anyway), and
/// a value of years is a typo.
const MAX_RETRY_AFTER_LIMIT: Duration = Duration::from_secs(7 * 24 * 3600);

/// `--max-retry-after`: a duration of at least a second (a smaller cap made a target's every
/// `Retry-After` a retry in a tight loop) and at most [`MAX_RETRY_AFTER_LIMIT`].
pub fn parse_max_retry_after(text: &str) -> Result<Duration, crate::error::Invalid> {
    let duration = parse_duration(text)?;
    if duration < Duration::from_secs(1) {
        return Err(format!(
            "{} is under the 1s floor: a target asking to wait would be asked again at once, \
             over and over (write it like 1h or 1d)",
            humantime::format_duration(duration)
        )
        .into());
    }
    if duration > MAX_RETRY_AFTER_LIMIT {
        // As typed: humantime writes 8d back as "8days" (helper-150).
        return Err(format!(
            "{} is longer than the 7d limit: a target asking to wait longer is down, and events older than --max-retry-age are dead letters anyway (write it like 1h or 1d)",
            text.trim()
        )
        .into());
    }
    Ok(duration)
}

/// A size such as `1GiB`, `512MiB`, `64KiB`, `10MB` or a number of bytes.
pub fn parse_size(text: &str) -> Result<u64, crate::error::Invalid> {
    crate::memory::parse_size(text)
}

/// [`parse_size`], or 0 (`0`, `0MiB`): for a size that 0 turns off.
fn parse_size_or_zero(text: &str) -> Result<u64, crate::error::Invalid> {
    let digits = text
        .trim()
        .trim_end_matches(|c: char| c.is_ascii_alphabetic());
    match digits.trim().parse::<u64>() {
        Ok(0) => parse_size(&text.replacen('0', "1", 1)).map(|_| 0),
        _ => parse_size(text),
    }
}

/// How a hint names `--metrics-listen`: the flag, or its variable, either may have set it.
pub const METRICS_LISTEN_FLAG: &str = "--metrics-listen (or SMEE_RELAY_METRICS_LISTEN)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("10 MB"), Ok(10_000_000));
        assert_eq!(parse_size_or_zero("0"), Ok(0));
        assert_eq!(parse_size_or_zero("0MiB"), Ok(0));
        assert_eq!(parse_size_or_zero("64MiB"), Ok(64 << 20));
        assert!(parse_size_or_zero("0 parsecs").is_err());
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("1PiB").is_err());
        assert!(parse_size("0").is_err());
        // Each refusal says what is wrong (1.5GiB was "an unknown unit \".5gib\"").
        let said = |text: &str| parse_size(text).unwrap_err().to_string();
        assert!(
            said("1.5GiB").contains("whole numbers only"),
            "{}",
            said("1.5GiB")
        );
        assert!(said("-1").contains("cannot be negative"));
        assert!(said("18446744073709551616").contains("too large"));
        assert!(said("99999999999GiB").contains("too large"));
        assert!(
            said("3 PiB").contains(r#"unknown size unit "PiB""#),
            "{}",
            said("3 PiB")
        );
    }

    fn args(line: &str) -> Vec<std::ffi::OsString> {
        line.split_whitespace().map(Into::into).collect()
    }

    #[test]
    fn top_level_smee_flags_mean_forward() {
        for line in [
            "smee-relay -u https://smee.io/abc -t http://127.0.0.1:3000/events",
            "smee-relay --url https://smee.io/abc --port 4000",
            "smee-relay -q --log-format json -u https://smee.io/abc -P /hook",
            "smee-relay -vv --url=https://smee.io/abc",
        ] {
            let Ok(Invocation::Run(cli)) = parse(args(line)) else {
                panic!("{line}: not a run");
            };
            let Command::Forward(forward) = cli.command else {
                panic!("{line}: not forward");
            };
            assert_eq!(
                forward.channel_url().unwrap().expose().as_str(),
                "https://smee.io/abc"
            );
        }
        let Ok(Invocation::Run(cli)) = parse(args("smee-relay events list")) else {
            panic!()
        };
        assert!(matches!(cli.command, Command::Events(_)));
    }

    /// Regression: clap's error repeated a refused URL whole: a channel's id (`invalid value
    /// 'smee.io/AbCdSECRET' for '[CHANNEL_URL]'`) and a target's password, on the terminal.
    #[test]
    fn regression_a_refused_url_argument_was_repeated_with_its_secrets() {
        for line in [
            "smee-relay forward smee.io/AbCdSECRET",
            "smee-relay -u smee.io/AbCdSECRET",
            "smee-relay forward https://smee.io/AbCd bob:SECRET@127.0.0.1:1/x",
            "smee-relay events replay 1 --to bob:SECRET@127.0.0.1:1/x",
            "smee -u smee.io/AbCdSECRET",
        ] {
            let error = match parse(args(line)) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{line}: accepted"),
            };
            assert!(!error.contains("SECRET"), "{line}: {error}");
            assert!(error.contains("not a full URL"), "{line}: {error}");
        }
    }

    /// Bug: `--max-retry-after` took absurd values (100 years) without a word. It is bounded
    /// at 7 days, with a clear error when parsed.
    #[test]
    fn regression_max_retry_after_is_bounded_with_a_clear_error() {
        let line = "smee-relay forward https://smee.io/abc http://127.0.0.1:1/ --max-retry-after";
        let error = match parse(args(&format!("{line} 100years"))) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("100 years accepted"),
        };
        assert!(
            error.contains("--max-retry-after") && error.contains("longer than the 7d limit"),
            "{error}"
        );
        // Regression (helper-150): said as humantime writes it back, `8days`.
        let error = match parse(args(&format!("{line} 8d"))) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("8 days accepted"),
        };
        assert!(error.contains("8d is longer than the 7d limit"), "{error}");
        // Regression: `1ms` was taken, and a target answering `Retry-After: 60` was asked
        // again every millisecond.
        let error = match parse(args(&format!("{line} 1ms"))) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("1ms accepted"),
        };
        assert!(error.contains("under the 1s floor"), "{error}");
        let Ok(Invocation::Run(cli)) = parse(args(&format!("{line} 7d"))) else {
            panic!("7d refused")
        };
        let Command::Forward(forward) = cli.command else {
            panic!()
        };
        assert_eq!(
            forward.delivery.max_retry_after,
            Duration::from_secs(7 * 24 * 3600)
        );
    }

    #[test]
    fn port_from_env_is_only_a_default() {
        assert_eq!(port_from_env(None).unwrap(), 3000);
        assert_eq!(port_from_env(Some("4567")).unwrap(), 4567);
        let error = port_from_env(Some("web")).unwrap_err().to_string();
        assert!(error.contains("PORT in the environment"), "{error}");
        // A target given on the command line never reads PORT, so PORT cannot conflict.
        let Ok(Invocation::Run(cli)) = parse(args(
            "smee-relay forward https://smee.io/abc http://127.0.0.1:9/x",
        )) else {
            panic!()
        };
        let Command::Forward(forward) = cli.command else {
            panic!()
        };
        assert_eq!(
            forward.target_url().unwrap().to_string(),
            "http://127.0.0.1:9/x"
        );
    }

    /// `events` commands beside a running relay seemed to hang for a second or more: their
    /// `--help` did not say that they wait for the relay to share the spool (about a second, up
    /// to 10 s).
    #[test]
    fn regression_events_help_did_not_say_it_may_wait_for_the_relay() {
        for sub in [
            &["events"][..],
            &["events", "list"],
            &["events", "show"],
            &["events", "replay"],
            &["events", "export"],
            &["events", "purge"],
            &["catch-up", "github"],
        ] {
            let line = format!("smee-relay {} --help", sub.join(" "));
            let help = match parse(args(&line)) {
                Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => e.to_string(),
                _ => panic!("{line}: no help"),
            };
            let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
            assert!(
                help.contains("waits for the relay to share the spool")
                    && help.contains("up to about a second where the relay cannot watch")
                    && help.contains("up to 10 s before it gives up"),
                "{line}: {help}"
            );
        }
    }

    #[test]
    fn the_cli_is_well_formed() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }

    #[test]
    fn regression_debug_of_the_arguments_shows_no_token_or_channel_id() {
        let cli = Cli::try_parse_from([
            "smee-relay",
            "forward",
            "https://smee.io/ChannelSecretId123",
            "--token",
            "token-secret-456",
        ])
        .unwrap();
        let shown = format!("{cli:?}");
        assert!(!shown.contains("token-secret-456"), "{shown}");
        assert!(!shown.contains("ChannelSecretId123"), "{shown}");
    }
}
