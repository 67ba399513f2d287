//! Command-line definitions (clap). Only the shape of the CLI lives here; `main` turns it into
//! calls to the library.

use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand};
use reqwest::Url;

use crate::telemetry::LogFormat;
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

    /// How long the target may take to answer one delivery.
    #[arg(long, default_value = "30s", value_parser = parse_duration, env = "SMEE_RELAY_TARGET_TIMEOUT")]
    pub target_timeout: Duration,

    /// The smee server to create a channel on when no CHANNEL_URL is given.
    #[arg(long, default_value = "https://smee.io", value_parser = parse_http_url)]
    pub server: Url,
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
