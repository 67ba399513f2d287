//! The daemon's TOML config (`smee-relay run --config FILE`): serde structs, every field
//! documented, unknown keys refused, and validation that reports `file:line: problem`.
//!
//! The pipeline's shape lives here (channels, targets, rules, Slack); runtime knobs (log format,
//! state dir override) are CLI flags. Secrets may be literal or read from the environment
//! (`*_env` keys), which is how a systemd `EnvironmentFile=` supplies them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::pipeline::jq::{JqCondition, JqLimits};
use crate::pipeline::rules::{Condition, Rule};
use crate::pipeline::signature::Verifier;
use crate::secret::{ExposeSecret as _, SecretString};
use crate::url::{ChannelUrl, TargetUrl};

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Where the spool and alert state live. Default: as for `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// Serve `/healthz` and `/metrics` on this address (`--metrics-listen` wins).
    #[serde(default, deserialize_with = "listen")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Also trust this PEM file's CA certificates (`--cacert` wins). Read at start.
    pub cacert: Option<PathBuf>,
    /// Verify no TLS certificate (`--insecure`); warned about at start.
    #[serde(default)]
    pub insecure: bool,
    /// The channels to subscribe to.
    #[serde(default, rename = "channel")]
    pub channels: Vec<Spanned<ChannelConfig>>,
    /// Port: signature checking and links.
    #[serde(default)]
    pub port: PortConfig,
    /// Where alerts go. Absent: alerts are printed to stdout.
    pub slack: Option<SlackConfig>,
    /// Alert rules, evaluated on every Port entity change of a `pipeline = true` channel.
    #[serde(default, rename = "rule")]
    pub rules: Vec<Spanned<RuleConfig>>,
    /// Bounds on each evaluation of a `when` condition.
    #[serde(default)]
    pub jq: JqConfig,
    /// Self-service action runs to execute, on the runs of a `pipeline = true` channel.
    #[serde(default, rename = "action")]
    pub actions: Vec<Spanned<crate::actions::ActionConfig>>,
    /// Relays on several machines sharing the work through NATS JetStream.
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]`: relays with the same `name` on one NATS JetStream share channels, routes and
/// alert state (see `src/cluster`). Each value is `Spanned` and checked after parsing, so that
/// every problem is reported, each at its own line (a serde check would stop at the first).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `nats://host:4222` or `tls://…` (may hold a password: prefer `nats_url_env`).
    /// `--nats-url` / `SMEE_RELAY_NATS_URL` wins.
    pub nats_url: Option<Spanned<SecretString>>,
    /// The environment variable holding the URL.
    pub nats_url_env: Option<Spanned<String>>,
    /// Relays with the same name share the work. Letters, digits, `-`, `_`. Required: without
    /// it an instance would run a cluster of its own on the same channels.
    pub name: Option<Spanned<String>>,
    /// A NATS credentials file (`.creds`: JWT and nkey seed).
    pub credentials_file: Option<PathBuf>,
    /// A PEM CA bundle to trust for the NATS server's TLS certificate (implies TLS).
    pub ca_file: Option<PathBuf>,
    /// How long a delivery in flight may go without news from its instance before another
    /// takes it over: the failover time. Default 30s.
    pub ack_wait: Option<Spanned<String>>,
    /// How long NATS may be unreachable before `/healthz` fails. Default 30s.
    pub health_grace: Option<Spanned<String>>,
    /// How far apart instances may publish one frame and still store it once. Default 2h.
    pub dedupe_window: Option<Spanned<String>>,
    /// Copies of the stream and alert state across NATS servers (3 on a 3-node NATS cluster).
    /// Default 1. (i64: a negative value is reported as out of range, at its line.)
    pub replicas: Option<Spanned<i64>>,
}

/// `[jq]`: what one evaluation of a `when` condition may cost. A condition that loops,
/// recurses or allocates without end is stopped at these bounds, counted as a failed
/// evaluation of its rule, and the others go on.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JqConfig {
    /// Wall-clock time per evaluation.
    #[serde(default = "default_jq_timeout", deserialize_with = "positive_duration")]
    pub timeout: Duration,
    /// Memory the jq worker process may allocate, in MiB.
    #[serde(default = "default_jq_memory", deserialize_with = "jq_memory")]
    pub max_memory_mib: u64,
}

impl Default for JqConfig {
    fn default() -> Self {
        Self {
            timeout: default_jq_timeout(),
            max_memory_mib: default_jq_memory(),
        }
    }
}

fn default_jq_timeout() -> Duration {
    JqLimits::default().timeout
}

fn default_jq_memory() -> u64 {
    JqLimits::default().max_memory >> 20
}

/// The worker itself needs some address space to start (its binary, stack, allocator).
const MIN_JQ_MEMORY_MIB: u64 = 64;

fn jq_memory<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let mib = u64::deserialize(d)?;
    if !(MIN_JQ_MEMORY_MIB..=1 << 20).contains(&mib) {
        return Err(serde::de::Error::custom(format!(
            "max_memory_mib must be between {MIN_JQ_MEMORY_MIB} and 1048576, not {mib}"
        )));
    }
    Ok(mib)
}

/// A duration like `90s` that is more than zero: a zero timeout or tolerance would make the
/// relay reconnect in a loop or refuse every signature.
fn positive_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    crate::clock::parse_positive_duration(&String::deserialize(d)?)
        .map_err(serde::de::Error::custom)
}

/// An address to listen on, with [`crate::url::parse_listen`]'s hint when it is not one.
fn listen<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<std::net::SocketAddr>, D::Error> {
    crate::url::parse_listen(&String::deserialize(d)?)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// A threshold: a finite number (`nan` never compares, `inf` is never crossed).
fn finite<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    let value = f64::deserialize(d)?;
    if !value.is_finite() {
        return Err(serde::de::Error::custom(format!(
            "{value} is not a usable threshold: give a finite number"
        )));
    }
    Ok(Some(value))
}

/// `in` / `not_in`: at least one value (an empty list would never fire, or always).
fn values<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<serde_json::Value>>, D::Error> {
    let values = Vec::<serde_json::Value>::deserialize(d)?;
    if values.is_empty() {
        return Err(serde::de::Error::custom(
            "an empty list: give at least one value (with none, the rule would never fire, or always)",
        ));
    }
    Ok(Some(values))
}

/// A literal secret or name: not empty, no control characters (a newline in a token would
/// make an invalid header on every connection).
fn text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let value = String::deserialize(d)?;
    check_text(&value).map_err(serde::de::Error::custom)?;
    Ok(Some(value))
}

/// [`text`] for a secret: the checked value goes straight into a [`SecretString`].
fn secret_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SecretString>, D::Error> {
    Ok(text(d)?.map(SecretString::from))
}

/// Why `value` is not usable as a secret, URL or name; the value itself is never repeated
/// (it may be a secret).
fn check_text(value: &str) -> Result<(), crate::error::Invalid> {
    if value.trim().is_empty() {
        return Err("empty: give a value, or leave the key out".into());
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(format!(
            "contains a control character ({:?}): a stray newline from copying it?",
            c
        )
        .into());
    }
    Ok(())
}

/// One `[[channel]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    /// The channel URL (a secret: prefer `url_env`).
    #[serde(default, deserialize_with = "secret_text")]
    pub url: Option<SecretString>,
    /// The environment variable holding the channel URL.
    pub url_env: Option<String>,
    /// Targets each event is replayed to, each with the spool's guarantees.
    /// (Spanned: a bad target is reported at its own line, not the `[[channel]]` header's.)
    #[serde(default)]
    pub forward: Vec<Spanned<String>>,
    /// Run the rules on this channel's events.
    #[serde(default)]
    pub pipeline: bool,
    /// Reconnect when the channel sends nothing for this long.
    #[serde(
        default = "default_idle_timeout",
        deserialize_with = "positive_duration"
    )]
    pub idle_timeout: Duration,
    /// Token for a `smee-relay serve --token` server (a secret: prefer `token_env`).
    #[serde(default, deserialize_with = "secret_text")]
    pub token: Option<SecretString>,
    /// The environment variable holding the token.
    pub token_env: Option<String>,
    /// Event names to skip (`--ignore-event`).
    #[serde(default)]
    pub ignore_events: Vec<String>,
    /// Frames larger than this (e.g. "128MiB") are skipped, logged and counted. (Spanned: a
    /// bad size is reported at its own line.)
    pub max_frame: Option<Spanned<String>>,
    /// Recover the GitHub deliveries this channel missed, after every gap.
    pub github_catch_up: Option<GithubCatchUpConfig>,
}

/// `[channel.github_catch_up]`: the GitHub hook that posts to this channel, whose deliveries
/// the daemon compares with the spool after every gap (`smee-relay catch-up github`'s flags).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GithubCatchUpConfig {
    /// `OWNER/REPO` of a repository hook.
    pub repo: Option<String>,
    /// The organisation of an organisation hook.
    pub org: Option<String>,
    /// The hook's id.
    pub hook: u64,
    /// The API base. Default: `$GITHUB_API_URL`, else https://api.github.com.
    pub api_url: Option<String>,
    /// The environment variable (or systemd credential) holding the token. Default GITHUB_TOKEN.
    pub token_env: Option<String>,
    /// A file holding the token (relative: also looked up in `$CREDENTIALS_DIRECTORY`).
    pub token_file: Option<PathBuf>,
    /// How far back each run looks. Keep it within `--retain`.
    #[serde(
        default = "default_catch_up_since",
        deserialize_with = "positive_duration"
    )]
    pub since: Duration,
}

fn default_catch_up_since() -> Duration {
    Duration::from_secs(3600)
}

/// `[channel.github_catch_up]`, resolved: the hook, its API, the token.
/// [`github_catch_up`]'s problem: the key it concerns (to say its line), and what is wrong.
type CatchUpProblem = (&'static str, crate::error::Invalid);

fn github_catch_up(
    c: &GithubCatchUpConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<crate::source::github::CatchUp, CatchUpProblem> {
    use crate::source::github::{self, HookOwner};
    let owner = match (&c.repo, &c.org) {
        (Some(repo), None) => HookOwner::repo(repo).map_err(|e| ("repo", e))?,
        (None, Some(org)) => HookOwner::org(org).map_err(|e| ("org", e))?,
        (Some(_), Some(_)) => {
            return Err((
                "org",
                "github_catch_up: give repo = \"OWNER/REPO\" or org = \"ORG\" (one)".into(),
            ));
        }
        (None, None) => {
            return Err((
                "hook",
                "github_catch_up: give repo = \"OWNER/REPO\" or org = \"ORG\" (one)".into(),
            ));
        }
    };
    if c.hook == 0 {
        return Err((
            "hook",
            "github_catch_up: hook = 0 is not a hook id (the number in the hook's settings URL)"
                .into(),
        ));
    }
    let api_url = c
        .api_url
        .clone()
        .or_else(|| env("GITHUB_API_URL").filter(|v| !v.is_empty()))
        .unwrap_or_else(|| github::DEFAULT_API_URL.into());
    let api_url = crate::url::parse_http_url(&api_url).map_err(|e| {
        let e = match e {
            crate::url::UrlError::NoScheme => crate::url::UrlError::ApiNoScheme,
            e => e,
        };
        ("api_url", format!("github_catch_up api_url: {e}").into())
    })?;
    let token = match (&c.token_file, &c.token_env) {
        (Some(_), Some(_)) => {
            return Err((
                "token_file",
                "github_catch_up: give token_env or token_file, not both".into(),
            ));
        }
        (Some(path), None) => {
            let credentials = env("CREDENTIALS_DIRECTORY").map(PathBuf::from);
            github::read_token_file(path, credentials.as_deref())
                .map_err(|e| ("token_file", format!("github_catch_up: {e}").into()))?
        }
        (None, name) => {
            let name = name.as_deref().unwrap_or("GITHUB_TOKEN");
            match env(name) {
                Some(token) if token.trim().is_empty() => {
                    return Err((
                        "token_env",
                        format!("github_catch_up: the token variable {name} is empty").into(),
                    ));
                }
                Some(token) => SecretString::from(token.trim_end_matches(['\r', '\n']).to_string()),
                None => {
                    return Err((
                        "token_env",
                        format!(
                            "github_catch_up: the token variable {name} is not set (token_env, or token_file)"
                        )
                        .into(),
                    ));
                }
            }
        }
    };
    Ok(github::CatchUp {
        hook: github::HookConfig {
            owner,
            hook: c.hook,
            api_url,
            token,
        },
        since: c.since,
    })
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(90)
}

/// `[port]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    /// The Port client secret that signs webhooks (a secret: prefer `client_secret_env`).
    /// When set, unsigned or badly signed events are rejected by the pipeline.
    #[serde(default, deserialize_with = "secret_text")]
    pub client_secret: Option<SecretString>,
    /// The environment variable holding the client secret.
    pub client_secret_env: Option<String>,
    /// How far `x-port-timestamp` may be from when the event reached the channel.
    #[serde(default = "default_tolerance", deserialize_with = "positive_duration")]
    pub signature_tolerance: Duration,
    /// The Port app, for entity links in alerts.
    #[serde(default = "default_app_url")]
    pub app_url: String,
    /// The Port client id, to report action runs (with the client secret).
    pub client_id: Option<String>,
    /// The environment variable holding the client id.
    pub client_id_env: Option<String>,
    /// Port's API: `https://api.port.io`, or `https://api.us.port.io` for the US region.
    #[serde(default = "default_api_url")]
    pub api_url: String,
    /// Report the outcome of Automation runs (webhook bodies with `run.id`) once the pipeline
    /// has evaluated them: the alerts queued, rules held or unable to judge, or "no alert: no rule's state changed".
    #[serde(default)]
    pub report_automation_runs: bool,
    /// How often to read the watched blueprints' entities from Port and judge them against the
    /// alert state, closing the gaps smee.io leaves (also at start and after every reconnect):
    /// a duration of 1 minute or more, or `"off"`. Default `"15m"` when `client_id` and
    /// `client_secret` are set.
    pub reconcile: Option<toml::Spanned<String>>,
}

impl Default for PortConfig {
    fn default() -> Self {
        Self {
            client_secret: None,
            client_secret_env: None,
            signature_tolerance: default_tolerance(),
            app_url: default_app_url(),
            client_id: None,
            client_id_env: None,
            api_url: default_api_url(),
            report_automation_runs: false,
            reconcile: None,
        }
    }
}

fn default_tolerance() -> Duration {
    Duration::from_secs(300)
}

fn default_api_url() -> String {
    crate::notify::port::DEFAULT_API_URL.into()
}

fn default_app_url() -> String {
    "https://app.getport.io".into()
}

/// `[slack]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackConfig {
    /// The incoming-webhook URL (a secret: prefer `webhook_url_env`).
    #[serde(default, deserialize_with = "secret_text")]
    pub webhook_url: Option<SecretString>,
    /// The environment variable holding the webhook URL.
    pub webhook_url_env: Option<String>,
}

/// One `[[rule]]`. Exactly one condition: `above`, `below`, `in`, `not_in` or `when`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Names the rule in alerts and state; unique.
    pub name: String,
    /// Only entities of this blueprint. Absent: every blueprint.
    pub blueprint: Option<String>,
    /// The property watched by `above`, `below`, `in` and `not_in`.
    pub property: Option<String>,
    /// Fire when the property is above this.
    #[serde(default, deserialize_with = "finite")]
    pub above: Option<f64>,
    /// With `above`: resolve only when the value falls below this (hysteresis). Default: `above`.
    #[serde(default, deserialize_with = "finite")]
    pub clear_below: Option<f64>,
    /// Fire when the property is below this.
    #[serde(default, deserialize_with = "finite")]
    pub below: Option<f64>,
    /// With `below`: resolve only when the value rises above this. Default: `below`.
    #[serde(default, deserialize_with = "finite")]
    pub clear_above: Option<f64>,
    /// Fire while the property is one of these values.
    #[serde(rename = "in", default, deserialize_with = "values")]
    pub in_: Option<Vec<serde_json::Value>>,
    /// Fire while the property is none of these values.
    #[serde(default, deserialize_with = "values")]
    pub not_in: Option<Vec<serde_json::Value>>,
    /// Fire while this jq condition holds over the entity after the change.
    pub when: Option<Spanned<String>>,
    /// Hold: the condition must last this long before the alert fires; if it recovers first,
    /// nothing is sent.
    #[serde(
        rename = "for",
        default,
        deserialize_with = "crate::clock::deserialize_duration"
    )]
    pub hold: Duration,
    /// Shown in alerts: `info`, `warning`, `critical`, ...
    #[serde(default = "default_severity")]
    pub severity: String,
}

fn default_severity() -> String {
    "warning".into()
}

/// Problems found in a config, each with its place.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

/// A channel, ready to run.
#[derive(Clone, Debug)]
pub struct Channel {
    pub url: ChannelUrl,
    pub forward: Vec<TargetUrl>,
    pub pipeline: bool,
    pub idle_timeout: Duration,
    pub token: Option<SecretString>,
    pub ignore_events: Vec<String>,
    /// The frame size limit for this channel's source.
    pub max_frame: usize,
    /// `[channel.github_catch_up]`, resolved.
    pub github_catch_up: Option<crate::source::github::CatchUp>,
}

/// A validated config, secrets resolved.
#[derive(Clone, Debug)]
pub struct Config {
    pub state_dir: Option<PathBuf>,
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub cacert: Option<PathBuf>,
    pub insecure: bool,
    pub channels: Vec<Channel>,
    pub rules: Vec<Rule>,
    /// Present when `[port]` names a client secret.
    pub verifier: Option<Verifier>,
    pub app_url: String,
    /// Bounds on each evaluation of a `when` condition.
    pub jq: JqLimits,
    /// The Slack webhook. A secret: never logged.
    pub slack: Option<SecretUrl>,
    /// `[[action]]`s, validated.
    pub actions: Vec<crate::actions::ActionSpec>,
    /// Port's API credentials, present when `[port]` has a client id and secret.
    pub port_api: Option<crate::notify::port::PortApi>,
    /// `[port] report_automation_runs`.
    pub report_automation_runs: bool,
    /// `[port] reconcile`: how often to reconcile alert state with Port, when it is on (Port
    /// API credentials, a pipeline channel and a rule with a blueprint).
    pub reconcile: Option<Duration>,
    /// The config says `reconcile = "off"`: `check` does not explain why it does not run.
    pub reconcile_off: bool,
    /// `[cluster]`, validated (its URL a secret).
    pub cluster: Option<crate::cluster::Settings>,
}

/// A URL that must not be printed (a Slack webhook holds its credential in the path).
#[derive(Clone)]
pub struct SecretUrl(pub reqwest::Url);

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}://{}/<redacted>",
            self.0.scheme(),
            self.0.host_str().unwrap_or("")
        )
    }
}

/// Read and validate `path`. `env` looks up environment variables (injectable for tests).
pub fn load(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        problems: vec![format!("{}: cannot read: {e}", path.display())],
    })?;
    let mut config = parse(&text, &path.display().to_string(), env)?;
    config.cacert = config.cacert.map(|file| beside(path, file));
    config.state_dir = config.state_dir.map(|dir| beside(path, dir));
    // A program named by a relative path, as the other paths (a bare name is PATH's).
    for action in &mut config.actions {
        if let crate::actions::Handler::Command(argv) = &mut action.handler
            && argv[0].contains('/')
        {
            argv[0] = beside(path, PathBuf::from(&argv[0])).display().to_string();
        }
    }
    Ok(config)
}

/// A path the config file at `config` names: a relative one is relative to the file's
/// directory, not to wherever the command was started (systemd starts the relay in `/`).
pub fn beside(config: &Path, file: PathBuf) -> PathBuf {
    match config.parent() {
        Some(dir) if file.is_relative() => dir.join(file),
        _ => file,
    }
}

/// How much longer than `ack_wait` the cluster's `dedupe_window` must be: the time a
/// takeover takes beyond the ack wait (reading the judgement back, committing, publishing).
const DEDUPE_MARGIN: Duration = crate::cluster::DEDUPE_MARGIN;

/// Where `[cluster]`'s URL comes from, for [`cluster_settings`].
enum ClusterUrlEnv<'a> {
    /// `run` and `check`: `nats_url_env` must name a variable that is set.
    Required(&'a dyn Fn(&str) -> Option<String>),
    /// `events`: not set in this shell is fine when `--nats-url` gives it (`events` checks).
    Optional(&'a dyn Fn(&str) -> Option<String>),
}

/// `[cluster]` validated, and its problems, each at its key's line (`at_line`), in file order:
/// a file with several mistakes shows them all at once.
fn cluster_settings(
    c: &ClusterConfig,
    table_at: usize,
    env: ClusterUrlEnv<'_>,
    at_line: &dyn Fn(usize, String) -> String,
) -> (crate::cluster::Settings, Vec<String>) {
    let mut problems = Vec::new();
    let mut problem = |at: usize, message: String| {
        problems.push((at, at_line(at, format!("[cluster] {message}"))));
    };
    let mut url = None;
    match (&c.nats_url, &c.nats_url_env) {
        (Some(literal), Some(_)) => problem(
            literal.span().start,
            "give nats_url or nats_url_env, not both".into(),
        ),
        (Some(literal), None) => {
            let value = literal.get_ref().expose_secret();
            match check_text(value).and_then(|()| crate::url::check_nats_urls(value)) {
                Ok(()) => url = Some(literal.get_ref().clone()),
                Err(e) => problem(literal.span().start, format!("nats_url: {e}")),
            }
        }
        (None, Some(name)) => {
            let (lookup, required) = match env {
                ClusterUrlEnv::Required(lookup) => (lookup, true),
                ClusterUrlEnv::Optional(lookup) => (lookup, false),
            };
            let at = name.span().start;
            let name = name.get_ref();
            match lookup(name).filter(|v| !v.is_empty()) {
                None if required => {
                    problem(at, format!("nats_url_env names {name}, which is not set"))
                }
                None => {}
                Some(value) => {
                    match check_text(&value).and_then(|()| crate::url::check_nats_urls(&value)) {
                        Ok(()) => url = Some(SecretString::from(value)),
                        Err(e) => problem(at, format!("nats_url_env: the value of {name} is {e}")),
                    }
                }
            }
        }
        // No URL here is fine when --nats-url gives it; `run` checks that.
        (None, None) => {}
    }
    let name = match &c.name {
        Some(name) => {
            let valid = !name.get_ref().is_empty()
                && name
                    .get_ref()
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_');
            if !valid {
                problem(
                    name.span().start,
                    format!(
                        "name {:?}: use letters, digits, '-' and '_'",
                        name.get_ref()
                    ),
                );
            }
            name.get_ref().clone()
        }
        // Without it an instance would join a cluster of its own (`default`) on the same
        // channels: a second, independent cluster, and every alert sent twice.
        None => {
            problem(
                table_at,
                "needs name = \"...\", the same on every instance of the cluster".into(),
            );
            String::new()
        }
    };
    let mut settings = crate::cluster::Settings::new(
        url.unwrap_or_else(|| SecretString::from(String::new())),
        name,
    );
    // `why`: the reason for the minimum, said with the problem.
    let mut duration =
        |key: &str, value: &Option<Spanned<String>>, minimum: Duration, why: &str| {
            let value = value.as_ref()?;
            match crate::clock::parse_positive_duration(value.get_ref()) {
                Ok(d) if d < minimum => problem(
                    value.span().start,
                    format!(
                        "{key} = {:?} must be at least {}{why}",
                        value.get_ref(),
                        humantime::format_duration(minimum)
                    ),
                ),
                Ok(d) => return Some(d),
                Err(e) => problem(value.span().start, format!("{key}: {e}")),
            }
            None
        };
    // The alert route's next message, on any instance, may start once the last one's ack
    // lands or its ack_wait runs out: Slack's pace of one a second holds cluster-wide only
    // when ack_wait is not shorter than it.
    let slack_pace = " (Slack's pace of one message a second holds across the cluster only \
                      with ack_wait of 1s or more)";
    if let Some(d) = duration("ack_wait", &c.ack_wait, Duration::from_secs(1), slack_pace) {
        settings.ack_wait = d;
    }
    if let Some(d) = duration("health_grace", &c.health_grace, Duration::ZERO, "") {
        settings.health_grace = d;
    }
    let dedupe_set = duration("dedupe_window", &c.dedupe_window, Duration::ZERO, "");
    if let Some(d) = dedupe_set {
        settings.dedupe_window = d;
    }
    // A pipeline event whose instance published its alerts and then stalled or died before
    // the ack is taken over up to ack_wait later, and its alerts are published again under
    // the same names: the stream drops that repeat only within its duplicate window.
    let covers = settings.ack_wait + DEDUPE_MARGIN;
    if settings.dedupe_window < covers {
        let key = match (&c.dedupe_window, &c.ack_wait) {
            (Some(dedupe), _) if dedupe_set.is_some() => Some(("dedupe_window", dedupe)),
            (_, Some(ack)) if dedupe_set.is_none() && c.dedupe_window.is_none() => {
                Some(("ack_wait", ack))
            }
            _ => None,
        };
        if let Some((key, value)) = key {
            problem(
                value.span().start,
                format!(
                    "{key} = {:?}: dedupe_window ({}) must be at least ack_wait ({}) plus {} \
                     (an alert another instance re-sends after a takeover comes up to ack_wait \
                     after the first, and the stream drops it as a repeat only within \
                     dedupe_window; other instances re-send a held alert or a reconciliation's \
                     alerts only while their record is younger than dedupe_window less ack_wait \
                     and 1m, which must leave them at least a minute)",
                    value.get_ref(),
                    humantime::format_duration(settings.dedupe_window),
                    humantime::format_duration(settings.ack_wait),
                    humantime::format_duration(DEDUPE_MARGIN)
                ),
            );
        }
    }
    if let Some(replicas) = &c.replicas {
        match usize::try_from(*replicas.get_ref()) {
            Ok(n @ 1..=5) => settings.replicas = n,
            _ => problem(
                replicas.span().start,
                format!(
                    "replicas = {}: must be 1 to 5 (1 on a single NATS server, 3 on a 3-node \
                     NATS cluster)",
                    replicas.get_ref()
                ),
            ),
        }
    }
    settings.credentials = c.credentials_file.clone();
    settings.ca = c.ca_file.clone();
    problems.sort_by_key(|(at, _)| *at);
    (settings, problems.into_iter().map(|(_, p)| p).collect())
}

/// Where table `[name]`'s header is in `text` (its offset; 0 when it is not written as one:
/// an inline table), for a problem of the table as a whole.
fn table_offset(text: &str, name: &str) -> usize {
    key_offset(text, name, None).unwrap_or(0)
}

/// Where `key` of table `[table]` is written in `text` (the offset of its line), else the
/// table's header; None when the table is not written as one (absent, or inline). For a
/// problem the parsed value carries no span for (a secret looked up, a default).
fn key_offset(text: &str, table: &str, key: Option<&str>) -> Option<usize> {
    let mut offset = 0;
    let mut header_at = None;
    for line in text.split_inclusive('\n') {
        let code = line.trim().split('#').next().unwrap_or("").trim();
        if let Some(inner) = code.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            if header_at.is_some() {
                break;
            }
            if inner.trim() == table {
                header_at = Some(offset);
            }
        } else if header_at.is_some()
            && let Some(key) = key
            && code
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        {
            return Some(offset);
        }
        offset += line.len();
    }
    header_at
}

/// `[cluster]` with `--nats-url` / `SMEE_RELAY_NATS_URL` on top, for `run` and `events`: the flag
/// alone joins cluster `default`. The flag is checked as the config's URL is (not by clap, whose
/// message would repeat the value, password and all). `Ok(None)`: no cluster asked for.
pub fn cluster_with_flag(
    flag: Option<&SecretString>,
    file: Option<crate::cluster::Settings>,
) -> Result<Option<crate::cluster::Settings>, ConfigError> {
    let refuse = |problem: String| ConfigError {
        problems: vec![problem],
    };
    let settings = match (flag, file) {
        (None, None) => return Ok(None),
        (Some(url), _) if let Err(e) = crate::url::check_nats_urls(url.expose_secret()) => {
            return Err(refuse(format!("--nats-url / SMEE_RELAY_NATS_URL: {e}")));
        }
        (Some(url), None) => crate::cluster::Settings::new(url.clone(), "default".into()),
        (Some(url), Some(mut file)) => {
            file.url = url.clone();
            file
        }
        (None, Some(file)) => file,
    };
    if settings.url.expose_secret().is_empty() {
        return Err(refuse(
            "[cluster] needs nats_url or nats_url_env (set in this shell), or --nats-url / \
             SMEE_RELAY_NATS_URL"
                .into(),
        ));
    }
    Ok(Some(settings))
}

/// Only `[cluster]` of the config at `path` (for `smee-relay events`, which needs nothing
/// else: the rest of the file, and the secrets it names, are not read). `url_given`: the
/// command line gives the URL (`--nats-url`), so a `nats_url_env` not set here is fine.
pub fn load_cluster(
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    url_given: bool,
) -> Result<Option<crate::cluster::Settings>, ConfigError> {
    /// The one table wanted; the others are left unread.
    #[derive(Deserialize)]
    struct ClusterOnly {
        cluster: Option<ClusterConfig>,
    }
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        problems: vec![format!("{origin}: cannot read: {e}")],
    })?;
    let line_of = |offset: usize| line_of(&text, offset);
    let file: ClusterOnly = toml::from_str(&text).map_err(|e| ConfigError {
        problems: vec![toml_problem(&origin, &text, &e)],
    })?;
    let Some(c) = file.cluster else {
        return Ok(None);
    };
    let at_line =
        |offset: usize, message: String| format!("{origin}:{}: {message}", line_of(offset));
    let (settings, problems) = cluster_settings(
        &c,
        table_offset(&text, "cluster"),
        if url_given {
            ClusterUrlEnv::Optional(env)
        } else {
            ClusterUrlEnv::Required(env)
        },
        &at_line,
    );
    if !problems.is_empty() {
        return Err(ConfigError { problems });
    }
    Ok(Some(settings))
}

/// serde's "unknown field `idle_timout`, expected one of `url`, ..." with the known field
/// nearest to the one typed, when one is near: a typo is the usual cause.
fn with_suggestion(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_string();
    };
    let Some((typed, known)) = rest.split_once("`, expected ") else {
        return message.to_string();
    };
    let nearest = known
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|name| {
            let score = strsim::jaro_winkler(&typed.to_lowercase(), &name.to_lowercase());
            (score, name)
        })
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match nearest {
        Some((_, name)) => format!("{message}; did you mean `{name}`?"),
        None => message.to_string(),
    }
}

/// TOML's or serde's `message` without the string values it quotes (`invalid type: string
/// "http://bob:pw@h/x", expected a sequence`): a value refused for its type may be a URL with
/// a password or a token, and the line named already says where it is.
fn without_values(message: &str) -> String {
    // serde's words for a value it quotes, what to write instead, and the quote that ends it.
    const QUOTED: [(&str, &str, char); 4] = [
        ("string \"", "a string", '"'),
        ("integer `", "an integer", '`'),
        ("floating point `", "a number", '`'),
        ("character `", "a character", '`'),
    ];
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some((at, (opening, instead, closing))) = (QUOTED.iter())
        .filter_map(|quoted| rest.find(quoted.0).map(|at| (at, quoted)))
        .min_by_key(|(at, _)| *at)
    {
        out.push_str(&rest[..at]);
        out.push_str(instead);
        let value = &rest[at + opening.len()..];
        // To the closing quote, past escaped ones (`\"`); unclosed, to the end.
        let mut escaped = false;
        let end = value.char_indices().find_map(|(i, c)| {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, c) if c == *closing => return Some(i + 1),
                _ => {}
            }
            None
        });
        rest = &value[end.unwrap_or(value.len())..];
    }
    out.push_str(rest);
    out
}

/// serde's names of Rust types (`expected f64`) in words a config's author knows.
fn plain_types(message: &str) -> String {
    const TYPES: [(&str, &str); 8] = [
        ("expected f64", "expected a number"),
        ("expected f32", "expected a number"),
        ("expected u64", "expected a whole number, 0 or more"),
        ("expected u32", "expected a whole number, 0 or more"),
        ("expected u16", "expected a whole number, 0 or more"),
        ("expected u8", "expected a whole number, 0 or more"),
        ("expected usize", "expected a whole number, 0 or more"),
        ("expected i64", "expected a whole number"),
    ];
    TYPES
        .iter()
        .fold(message.to_string(), |text, (rust, plain)| {
            text.replace(rust, plain)
        })
}

/// A TOML error in config `text` (from `origin`): its line, and what serde said, with a guess
/// at a mistyped key and without the values it quotes.
pub(crate) fn toml_problem(origin: &str, text: &str, e: &toml::de::Error) -> String {
    let message = plain_types(&without_values(&with_suggestion(e.message())));
    let Some(span) = e.span() else {
        return format!("{origin}: {message}");
    };
    let line = line_of(text, span.start);
    // One value where a list is wanted (`forward = "http://..."`): the usual first mistake.
    let key = (text.lines().nth(line - 1))
        .and_then(|l| l.split_once('='))
        .map(|(key, _)| key.trim())
        .filter(|key| !key.is_empty() && !key.contains(['"', '[', '{']));
    let hint = match key {
        Some(key) if message.ends_with("expected a sequence") => {
            format!(": `{key}` takes a list, even of one: {key} = [\"...\"]")
        }
        _ => String::new(),
    };
    // A value of the wrong type names its key (helper-120: "invalid type: a string, expected
    // a number" said the line only).
    match key {
        Some(key) if message.starts_with("invalid type") && hint.is_empty() => {
            format!("{origin}:{line}: `{key}`: {message}")
        }
        _ => format!("{origin}:{line}: {message}{hint}"),
    }
}

/// The line of `text` at byte `offset` (1-based).
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Validate config `text` (from `origin`, for messages).
pub fn parse(
    text: &str,
    origin: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let line_of = |offset: usize| line_of(text, offset);
    let file: ConfigFile = toml::from_str(text).map_err(|e| ConfigError {
        problems: vec![toml_problem(origin, text, &e)],
    })?;
    let mut problems = Vec::new();
    let at_line =
        |offset: usize, message: String| format!("{origin}:{}: {message}", line_of(offset));
    // A problem of a table's key, at the key's line where the file has one.
    let at_key = |table: &str, key: &str, message: String| match key_offset(text, table, Some(key))
    {
        Some(offset) => at_line(offset, message),
        None => format!("{origin}: {message}"),
    };

    let secret = |literal: &Option<SecretString>,
                  var: &Option<String>,
                  what: &str|
     -> Result<Option<SecretString>, crate::error::Invalid> {
        match (literal, var) {
            (Some(_), Some(_)) => Err(format!("give {what} or {what}_env, not both").into()),
            (Some(value), None) => Ok(Some(value.clone())),
            (None, Some(name)) => match env(name).filter(|v| !v.is_empty()) {
                None => Err(format!(
                    "{what}_env names {name}, which is not set (set it where the relay runs: the unit's EnvironmentFile, or a systemd credential of that name)"
                )
                .into()),
                Some(value) => match check_text(&value) {
                    Ok(()) => Ok(Some(SecretString::from(value))),
                    Err(e) => Err(format!("{what}_env: the value of {name} is {e}").into()),
                },
            },
            (None, None) => Ok(None),
        }
    };

    let mut channels = Vec::new();
    // Where each channel was first given, by its identity (what the spool's lock keys on).
    let mut seen_channels: std::collections::HashMap<String, usize> = Default::default();
    for spanned in &file.channels {
        let at = spanned.span().start;
        let c = spanned.get_ref();
        match secret(&c.url, &c.url_env, "url") {
            Ok(Some(url)) => match url.expose_secret().parse::<ChannelUrl>() {
                Ok(url) => {
                    let identity = crate::spool::lock::channel_identity(url.expose().as_str());
                    if let Some(first) = seen_channels.insert(identity, line_of(at)) {
                        problems.push(at_line(
                            at,
                            format!(
                                "this channel is the one at line {first} again (URLs that differ \
                                 only in letter case, a default port, a trailing slash or a query \
                                 name one channel): give it once, with all its targets"
                            ),
                        ));
                    }
                    let mut forward: Vec<TargetUrl> = Vec::new();
                    for target in &c.forward {
                        let at = target.span().start;
                        match target.get_ref().parse::<TargetUrl>() {
                            Ok(t) if t.is_channel(&url) => problems.push(at_line(
                                at,
                                "forward target: this is the channel itself: each event would be \
                                 posted back to it, forever"
                                    .into(),
                            )),
                            // One queue per name: a second would deliver every event again.
                            Ok(t) if forward.iter().any(|f| f.to_string() == t.to_string()) => {
                                problems.push(at_line(
                                    at,
                                    format!(
                                        "forward target {} is given twice: give it once (each \
                                         event would be sent to it twice)",
                                        t.shown()
                                    ),
                                ))
                            }
                            Ok(t) => forward.push(t),
                            Err(e) => problems.push(at_line(
                                at,
                                format!(
                                    "forward target {:?}: {e}",
                                    crate::url::shown_text(target.get_ref(), false)
                                ),
                            )),
                        }
                    }
                    // Targets given but refused are already said, each at its line.
                    if c.forward.is_empty() && !c.pipeline {
                        problems.push(at_line(at, "this channel has no forward targets and pipeline = false: nothing would use it".into()));
                    }
                    let token = match secret(&c.token, &c.token_env, "token") {
                        Ok(token) => token,
                        Err(e) => {
                            problems.push(at_line(at, e.0));
                            None
                        }
                    };
                    let max_frame = match &c.max_frame {
                        None => crate::source::DEFAULT_MAX_FRAME,
                        Some(text) => match crate::memory::parse_size(text.get_ref()) {
                            Ok(size) => usize::try_from(size).unwrap_or(usize::MAX),
                            Err(e) => {
                                problems
                                    .push(at_line(text.span().start, format!("max_frame: {e}")));
                                crate::source::DEFAULT_MAX_FRAME
                            }
                        },
                    };
                    let github_catch_up =
                        match c.github_catch_up.as_ref().map(|g| github_catch_up(g, env)) {
                            None => None,
                            Some(Ok(catch_up)) => Some(catch_up),
                            // At the key's line in this channel's block (a key the block
                            // does not write, such as a default token variable: its header).
                            Some(Err((key, e))) => {
                                let block = "channel.github_catch_up";
                                let key_at = key_offset(&text[at..], block, Some(key))
                                    .map_or(at, |offset| at + offset);
                                problems.push(at_line(key_at, e.0));
                                None
                            }
                        };
                    channels.push(Channel {
                        github_catch_up,
                        url,
                        forward,
                        pipeline: c.pipeline,
                        idle_timeout: c.idle_timeout,
                        token,
                        ignore_events: c.ignore_events.clone(),
                        max_frame,
                    });
                }
                // The URL may be a secret; say what is wrong without repeating it.
                Err(e) => problems.push(at_line(at, format!("channel url: {e}"))),
            },
            Ok(None) => problems.push(at_line(at, "a channel needs url or url_env".into())),
            // The variable's problem at its key's line (its channel's when given both).
            Err(e) => {
                let key_at = match (&c.url, &c.url_env) {
                    (None, Some(_)) => key_offset(&text[at..], "[channel]", Some("url_env"))
                        .map_or(at, |offset| at + offset),
                    _ => at,
                };
                problems.push(at_line(key_at, e.0))
            }
        }
    }
    if file.channels.is_empty() {
        problems.push(format!("{origin}: no [[channel]]: nothing to subscribe to"));
    }

    let mut rules: Vec<Rule> = Vec::new();
    for spanned in &file.rules {
        let at = spanned.span().start;
        let r = spanned.get_ref();
        if rules.iter().any(|other| other.name == r.name) {
            problems.push(at_line(
                at,
                format!("rule {:?}: the name is used twice", r.name),
            ));
        }
        match rule(r, format!("{origin}:{}", line_of(at))) {
            Ok(rule) => rules.push(rule),
            Err((offset, message)) => problems.push(at_line(
                offset.unwrap_or(at),
                format!("rule {:?}: {message}", r.name),
            )),
        }
    }
    let pipelines = file.channels.iter().any(|c| c.get_ref().pipeline);
    if pipelines && file.rules.is_empty() && file.actions.is_empty() {
        problems.push(format!(
            "{origin}: a channel has pipeline = true but there is no [[rule]] or [[action]]"
        ));
    }

    let verifier = match secret(
        &file.port.client_secret,
        &file.port.client_secret_env,
        "client_secret",
    ) {
        Ok(Some(secret)) => Some(Verifier::new(secret, file.port.signature_tolerance)),
        Ok(None) => None,
        Err(e) => {
            let key = secret_key(&file.port.client_secret_env, "client_secret");
            problems.push(at_key("port", &key, format!("[port] {e}")));
            None
        }
    };
    let slack = match &file.slack {
        None => None,
        Some(s) => {
            let key = secret_key(&s.webhook_url_env, "webhook_url");
            match secret(&s.webhook_url, &s.webhook_url_env, "webhook_url") {
                Ok(Some(url)) => match crate::url::parse_http_url(url.expose_secret()) {
                    Ok(url) => Some(SecretUrl(url)),
                    Err(e) => {
                        problems.push(at_key("slack", &key, format!("[slack] webhook_url: {e}")));
                        None
                    }
                },
                Ok(None) => {
                    problems.push(at_key(
                        "slack",
                        &key,
                        "[slack] needs webhook_url or webhook_url_env".into(),
                    ));
                    None
                }
                Err(e) => {
                    problems.push(at_key("slack", &key, format!("[slack] {e}")));
                    None
                }
            }
        }
    };
    let cluster = file.cluster.as_ref().map(|c| {
        let (settings, found) = cluster_settings(
            c,
            table_offset(text, "cluster"),
            ClusterUrlEnv::Required(env),
            &at_line,
        );
        problems.extend(found);
        settings
    });
    let (actions, port_api) =
        actions_config(&file, &at_line, &at_key, &secret, &mut problems, origin);
    if let Err(e) = crate::url::parse_http_url(&file.port.app_url) {
        problems.push(at_key("port", "app_url", format!("[port] app_url: {e}")));
    }
    // Credentials named but not usable (a variable not set) are their own problem, already
    // said: not also "set client_id and client_secret" for reconcile.
    let reconcile = reconcile_config(
        &file,
        port_api.is_some() || credentials_named(&file.port),
        &rules,
        &at_line,
        &mut problems,
    );

    if !problems.is_empty() {
        // In file order (helper-121: a channel's problems came before the line 1 above it);
        // a problem of the whole file, with no line, first.
        let line = |p: &String| -> usize {
            p.strip_prefix(origin)
                .and_then(|rest| rest.strip_prefix(':'))
                .and_then(|rest| rest.split_once(':'))
                .and_then(|(n, _)| n.parse().ok())
                .unwrap_or(0)
        };
        problems.sort_by_key(line);
        return Err(ConfigError { problems });
    }
    Ok(Config {
        cluster,
        state_dir: file.state_dir,
        metrics_listen: file.metrics_listen,
        cacert: file.cacert,
        insecure: file.insecure,
        channels,
        rules,
        verifier,
        app_url: file.port.app_url.trim_end_matches('/').to_string(),
        slack,
        jq: JqLimits {
            timeout: file.jq.timeout,
            max_memory: file.jq.max_memory_mib << 20,
        },
        actions,
        port_api,
        report_automation_runs: file.port.report_automation_runs,
        reconcile,
        reconcile_off: file
            .port
            .reconcile
            .as_ref()
            .is_some_and(|text| text.get_ref().trim() == "off"),
    })
}

/// `[port] reconcile`: the interval, if reconciliation runs.
fn reconcile_config(
    file: &ConfigFile,
    credentials: bool,
    rules: &[Rule],
    at_line: &dyn Fn(usize, String) -> String,
    problems: &mut Vec<String>,
) -> Option<Duration> {
    use crate::pipeline::reconcile::{DEFAULT_INTERVAL, MIN_INTERVAL};
    let interval = match &file.port.reconcile {
        None => DEFAULT_INTERVAL,
        Some(text) if text.get_ref().trim() == "off" => return None,
        Some(text) => {
            let at = text.span().start;
            let value = text.get_ref();
            let interval = match crate::clock::parse_duration(value) {
                Ok(interval) => interval,
                Err(e) => {
                    problems.push(at_line(at, format!("[port] reconcile: {e} (or \"off\")")));
                    return None;
                }
            };
            if interval < MIN_INTERVAL {
                problems.push(at_line(
                    at,
                    format!(
                        "[port] reconcile = {value:?} is shorter than the 1 minute minimum (each reconciliation reads every watched blueprint from Port's API); give \"1m\" or more, or \"off\""
                    ),
                ));
                return None;
            }
            if !credentials {
                problems.push(at_line(
                    at,
                    "[port] reconcile reads entities from Port's API: set client_id (or client_id_env) and client_secret (or client_secret_env), or reconcile = \"off\"".into(),
                ));
                return None;
            }
            interval
        }
    };
    let pipelines = file.channels.iter().any(|c| c.get_ref().pipeline);
    let watched = rules.iter().any(|r| r.blueprint.is_some());
    (credentials && pipelines && watched).then_some(interval)
}

/// Resolves a literal-or-`_env` secret (the closure inside [`parse`]).
type SecretLookup<'a> = dyn Fn(
        &Option<SecretString>,
        &Option<String>,
        &str,
    ) -> Result<Option<SecretString>, crate::error::Invalid>
    + 'a;

/// The key a literal-or-`_env` secret's problem is at: `{what}_env` when that is given.
fn secret_key(var: &Option<String>, what: &str) -> String {
    match var {
        Some(_) => format!("{what}_env"),
        None => what.to_string(),
    }
}

/// `[[action]]`s and Port's API credentials.
fn actions_config(
    file: &ConfigFile,
    at_line: &dyn Fn(usize, String) -> String,
    at_key: &dyn Fn(&str, &str, String) -> String,
    secret: &SecretLookup<'_>,
    problems: &mut Vec<String>,
    origin: &str,
) -> (
    Vec<crate::actions::ActionSpec>,
    Option<crate::notify::port::PortApi>,
) {
    let port = &file.port;
    let client_secret = secret(
        &port.client_secret,
        &port.client_secret_env,
        "client_secret",
    )
    .ok()
    .flatten();
    let client_id = match secret(
        &port.client_id.clone().map(SecretString::from),
        &port.client_id_env,
        "client_id",
    ) {
        Ok(id) => id,
        Err(e) => {
            let key = secret_key(&port.client_id_env, "client_id");
            problems.push(at_key("port", &key, format!("[port] {e}")));
            None
        }
    };
    let api_url = match crate::url::parse_http_url(&port.api_url) {
        Ok(url) => url.as_str().trim_end_matches('/').to_string(),
        Err(e) => {
            problems.push(at_key("port", "api_url", format!("[port] api_url: {e}")));
            String::new()
        }
    };
    let port_api = match (client_id, client_secret) {
        (Some(id), Some(secret)) => Some(crate::notify::port::PortApi {
            api_url,
            client_id: id.expose_secret().to_string(),
            client_secret: secret,
        }),
        _ => None,
    };
    // Credentials named through variables that are not set are their own problem, said
    // already: not also "set client_id and client_secret" (helper-117, helper-120).
    let named = credentials_named(port);
    if port.report_automation_runs && !named {
        problems.push(at_key(
            "port",
            "report_automation_runs",
            "[port] report_automation_runs needs client_id (or client_id_env) and client_secret (or client_secret_env)".into(),
        ));
    }
    // Every variable the config names for a credential, with the key that names it: a
    // handler gets none of them (helper-132: a channel's URL, which lets anyone read its
    // events, was allowed).
    let mut keys: Vec<(&Option<String>, &str)> = vec![
        (&port.client_secret_env, "[port] client_secret_env"),
        (&port.client_id_env, "[port] client_id_env"),
    ];
    for channel in file.channels.iter().map(Spanned::get_ref) {
        keys.push((&channel.url_env, "a [[channel]]'s url_env"));
        keys.push((&channel.token_env, "a [[channel]]'s token_env"));
        if let Some(catch_up) = &channel.github_catch_up {
            keys.push((&catch_up.token_env, "[channel.github_catch_up] token_env"));
        }
    }
    if let Some(slack) = &file.slack {
        keys.push((&slack.webhook_url_env, "[slack] webhook_url_env"));
    }
    let mut secret_vars: Vec<(&str, &str)> = (keys.into_iter())
        .filter_map(|(var, key)| var.as_deref().map(|var| (var, key)))
        .collect();
    if let Some(var) = file.cluster.as_ref().and_then(|c| c.nats_url_env.as_ref()) {
        secret_vars.push((var.get_ref().as_str(), "[cluster] nats_url_env"));
    }
    let mut actions: Vec<crate::actions::ActionSpec> = Vec::new();
    for spanned in &file.actions {
        let at = spanned.span().start;
        match spanned
            .get_ref()
            .compile(client_secret_given(port), &secret_vars)
        {
            Ok(action) => {
                if actions.iter().any(|a| a.name == action.name) {
                    problems.push(at_line(
                        at,
                        format!("action {:?}: defined twice", action.name),
                    ));
                }
                actions.push(action);
            }
            Err(e) => problems.push(at_line(at, format!("[[action]]: {e}"))),
        }
    }
    if let Some(first) = file.actions.first()
        && !named
    {
        problems.push(at_line(
            first.span().start,
            "[[action]] reports runs to Port: set [port] client_id (or client_id_env) and client_secret (or client_secret_env)".into(),
        ));
    }
    if !file.actions.is_empty() && !file.channels.iter().any(|c| c.get_ref().pipeline) {
        problems.push(format!(
            "{origin}: [[action]] needs a channel with pipeline = true to receive runs"
        ));
    }
    (actions, port_api)
}

fn client_secret_given(port: &PortConfig) -> bool {
    port.client_secret.is_some() || port.client_secret_env.is_some()
}

/// Whether `[port]` names a client id and a client secret (literally or by variable), set or
/// not: a variable not set is said on its own.
fn credentials_named(port: &PortConfig) -> bool {
    (port.client_id.is_some() || port.client_id_env.is_some()) && client_secret_given(port)
}

/// Build a rule, or say what is wrong (with the offset of the `when` string for jq errors).
fn rule(r: &RuleConfig, origin: String) -> Result<Rule, (Option<usize>, String)> {
    let plain = |message: &str| (None, message.to_string());
    let given = [
        r.above.is_some(),
        r.below.is_some(),
        r.in_.is_some(),
        r.not_in.is_some(),
        r.when.is_some(),
    ]
    .iter()
    .filter(|g| **g)
    .count();
    if given == 0 {
        return Err(plain(
            "no condition: give one of above, below, in, not_in or when",
        ));
    }
    if given > 1 {
        return Err(plain("give only one of above, below, in, not_in or when"));
    }
    if r.clear_below.is_some() && r.above.is_none() {
        return Err(plain("clear_below goes with above"));
    }
    if r.clear_above.is_some() && r.below.is_none() {
        return Err(plain("clear_above goes with below"));
    }
    let property = || {
        r.property
            .clone()
            .ok_or_else(|| plain("this condition needs a property"))
    };
    let condition = if let Some(above) = r.above {
        let clear_below = r.clear_below.unwrap_or(above);
        if clear_below > above {
            return Err(plain("clear_below must not be greater than above"));
        }
        Condition::Above {
            property: property()?,
            above,
            clear_below,
        }
    } else if let Some(below) = r.below {
        let clear_above = r.clear_above.unwrap_or(below);
        if clear_above < below {
            return Err(plain("clear_above must not be less than below"));
        }
        Condition::Below {
            property: property()?,
            below,
            clear_above,
        }
    } else if let Some(values) = &r.in_ {
        Condition::In {
            property: property()?,
            values: values.clone(),
        }
    } else if let Some(values) = &r.not_in {
        Condition::NotIn {
            property: property()?,
            values: values.clone(),
        }
    } else {
        let when = r.when.as_ref().expect("counted above");
        // +1: the span includes the opening quote.
        let start = when.span().start + 1;
        match JqCondition::new(when.get_ref()) {
            Ok(jq) => Condition::When(jq),
            Err(e) => return Err((Some(start + e.offset), format!("when: {e}"))),
        }
    };
    if r.name.trim().is_empty() {
        return Err(plain("the name is empty"));
    }
    if let Err(e) = check_text(&r.name) {
        // The name keys the rule's alert state: no control characters there either.
        return Err((None, format!("name: {e}")));
    }
    Ok(Rule {
        name: r.name.clone(),
        blueprint: r.blueprint.clone(),
        condition,
        hold: r.hold,
        severity: r.severity.clone(),
        origin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    const GOOD: &str = r#"
state_dir = "/var/lib/smee-relay"

[[channel]]
url = "https://smee.io/abc"
forward = ["http://127.0.0.1:3000/webhook"]
pipeline = true

[port]
client_secret_env = "PORT_CLIENT_SECRET"
signature_tolerance = "5m"
app_url = "https://app.getport.io"

[slack]
webhook_url_env = "SLACK_WEBHOOK_URL"

[[rule]]
name = "cpu-high"
blueprint = "DeploymentConfig"
property = "cpuUtil"
above = 80
clear_below = 70
for = "0s"
severity = "warning"

[[rule]]
name = "unhealthy"
blueprint = "DeploymentConfig"
property = "healthStatus"
not_in = ["Healthy"]
severity = "critical"

[[rule]]
name = "locked"
blueprint = "DeploymentConfig"
when = '.properties.locked == true'
"#;

    #[test]
    fn the_documented_shape_loads() {
        let env = |name: &str| match name {
            "PORT_CLIENT_SECRET" => Some("s3cret".to_string()),
            "SLACK_WEBHOOK_URL" => Some("https://hooks.slack.com/services/T/B/X".to_string()),
            _ => None,
        };
        let config = parse(GOOD, "c.toml", &env).unwrap();
        assert_eq!(config.channels.len(), 1);
        assert_eq!(config.rules.len(), 3);
        assert!(config.verifier.is_some());
        let shown = format!("{config:?}");
        assert!(!shown.contains("hooks.slack.com/services/T/B/X"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    /// systemd/config.example.toml had no `[cluster]` section: a user had to find its keys in
    /// the README. Its commented one, uncommented, loads (a bare host:port URL included).
    #[test]
    fn regression_the_example_config_had_no_cluster_section() {
        let example = include_str!("../systemd/config.example.toml");
        let at = example
            .find("# [cluster]")
            .expect("a commented [cluster] section");
        let block: String = example[at..]
            .lines()
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        let text = format!(
            "[[channel]]\nurl = \"https://smee.io/abc\"\nforward = [\"http://127.0.0.1:1/\"]\n{block}"
        );
        let env = |name: &str| (name == "NATS_URL").then(|| "10.0.0.1:4222".to_string());
        let config = parse(&text, "c.toml", &env).unwrap();
        let cluster = config.cluster.expect("[cluster] read");
        assert_eq!(cluster.name, "prod");
        // A bare host:port, shown as the client reads it.
        assert_eq!(cluster.shown_url(), "nats://10.0.0.1:4222");
    }

    /// Regression (helper-132, helper-133): an action's `env` could pass a channel's URL (or
    /// token, Slack's URL, NATS's) to its handler, and only its first bad entry was said.
    #[test]
    fn regression_env_passed_the_configs_credentials_and_said_one_problem() {
        let text = r#"
[port]
client_id_env = "PORT_ID"
client_secret_env = "PORT_SECRET"
[[channel]]
url_env = "SMEE_URL"
token_env = "SMEE_TOKEN"
pipeline = true
[slack]
webhook_url_env = "SLACK_URL"
[[action]]
identifier = "deploy"
command = ["/bin/true"]
env = ["SMEE_URL", "SMEE_TOKEN", "SLACK_URL", "PORT_SECRET", "KUBECONFIG", "A=b", "PORT_X", "TZ", "TZ"]
timeout = "0s"
"#;
        let env = |name: &str| match name {
            "SMEE_URL" => Some("https://smee.io/AbCdEfGh".to_string()),
            "SLACK_URL" => Some("https://hooks.slack.com/services/T/B/X".to_string()),
            _ => Some("s3cret".to_string()),
        };
        let e = parse(text, "c.toml", &env).unwrap_err().to_string();
        assert!(!e.contains("not a full URL"), "{e}");
        for (var, key) in [
            ("SMEE_URL", "a [[channel]]'s url_env"),
            ("SMEE_TOKEN", "a [[channel]]'s token_env"),
            ("SLACK_URL", "[slack] webhook_url_env"),
            ("PORT_SECRET", "[port] client_secret_env"),
        ] {
            assert!(
                e.contains(&format!("env: {var} holds a credential ({key} names it)")),
                "{var}: {e}"
            );
        }
        assert!(e.contains("env: \"A=b\" is not a variable name"), "{e}");
        assert!(
            e.contains("env: PORT_X: PORT_* names are the run's own"),
            "{e}"
        );
        // Regression (helper-135): a duplicate passed, a bad timeout waited for the next check.
        assert_eq!(e.matches("env: TZ is listed twice").count(), 1, "{e}");
        assert!(e.contains("timeout must be more than 0s"), "{e}");
        assert!(!e.contains("KUBECONFIG"), "{e}");
    }

    #[test]
    fn regression_debug_of_a_config_shows_no_secret() {
        let text = r#"
[[channel]]
url = "https://smee.io/ChannelSecretId123"
token = "token-secret-456"
pipeline = true
[port]
client_secret = "port-secret-789"
[slack]
webhook_url = "https://hooks.slack.com/services/T0/B0/slack-secret-0"
[[rule]]
name = "hot"
property = "cpuUtil"
above = 80
"#;
        let file: ConfigFile = toml::from_str(text).unwrap();
        let config = parse(text, "c.toml", &no_env).unwrap();
        for shown in [format!("{file:?}"), format!("{config:?}")] {
            for secret in [
                "ChannelSecretId123",
                "token-secret-456",
                "port-secret-789",
                "slack-secret-0",
            ] {
                assert!(!shown.contains(secret), "{secret} in {shown}");
            }
        }
    }

    #[test]
    fn a_channel_may_catch_up_from_a_github_hook() {
        let channel = |block: &str| {
            format!(
                "[[channel]]\nurl = \"https://smee.io/abc\"\nforward = [\"http://127.0.0.1:3000/\"]\n\
                 [channel.github_catch_up]\n{block}\n"
            )
        };
        let env = |name: &str| match name {
            "GITHUB_TOKEN" => Some("ghp_secret_token".to_string()),
            "EMPTY" => Some(String::new()),
            "GITHUB_API_URL" => Some("https://ghe.example.com/api/v3".to_string()),
            _ => None,
        };
        let config = parse(&channel("repo = \"o/r\"\nhook = 7"), "c.toml", &env).unwrap();
        let catch_up = config.channels[0].github_catch_up.as_ref().unwrap();
        assert_eq!(catch_up.hook.hook, 7);
        assert_eq!(catch_up.since, Duration::from_secs(3600));
        assert_eq!(
            catch_up.hook.api_url.as_str(),
            "https://ghe.example.com/api/v3"
        );
        assert!(!format!("{config:?}").contains("ghp_secret_token"));
        let config = parse(
            &channel("org = \"o\"\nhook = 7\nsince = \"2h\""),
            "c.toml",
            &env,
        )
        .unwrap();
        let catch_up = config.channels[0].github_catch_up.as_ref().unwrap();
        assert_eq!(catch_up.since, Duration::from_secs(7200));
        for (block, problem) in [
            ("hook = 7", "give repo = \"OWNER/REPO\" or org"),
            (
                "repo = \"o/r\"\norg = \"o\"\nhook = 7",
                "give repo = \"OWNER/REPO\" or org",
            ),
            ("repo = \"o\"\nhook = 7", "is not OWNER/REPO"),
            (
                "repo = \"o/r\"\nhook = 7\ntoken_env = \"NOPE\"",
                "NOPE is not set",
            ),
            // Regression: hook = 0 and an empty token variable were taken.
            ("repo = \"o/r\"\nhook = 0", "hook = 0 is not a hook id"),
            (
                "repo = \"o/r\"\nhook = 7\ntoken_env = \"EMPTY\"",
                "EMPTY is empty",
            ),
        ] {
            let e = parse(&channel(block), "c.toml", &env).unwrap_err();
            assert!(e.to_string().contains(problem), "{block}: {e}");
        }
    }

    /// Regression (helper-121): a `[channel.github_catch_up]` problem was said at the channel's
    /// line (1), after problems of later lines, and a URL without a scheme got a webhook
    /// target's example.
    #[test]
    fn regression_catch_up_problems_were_said_at_the_channels_line() {
        let text = "[slack]\nwebhook_url_env = \"NOPE\"\n\
                    [[channel]]\nurl = \"https://smee.io/a\"\nforward = [\"http://127.0.0.1:3000/\"]\n\
                    [[channel]]\nurl = \"https://smee.io/b\"\nforward = [\"127.0.0.1:3000/x\"]\n\
                    [channel.github_catch_up]\nrepo = \"o/r\"\nhook = 7\napi_url = \"api.github.com\"\n";
        let e = parse(text, "c.toml", &|name| (name != "NOPE").then(|| "t".into()))
            .unwrap_err()
            .to_string();
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines.len(), 3, "{e}");
        assert!(lines[0].starts_with("c.toml:2: [slack]"), "{e}");
        assert!(lines[1].starts_with("c.toml:8: forward target"), "{e}");
        assert!(
            lines[2].starts_with("c.toml:12: github_catch_up api_url: not a full URL")
                && lines[2].contains("such as https://api.github.com"),
            "{e}"
        );
    }

    /// Regression (helper-126): `command = ["handlers/run.sh"]` was looked up from wherever the
    /// relay was started (`/` under systemd), not beside the config as `state_dir` is: every
    /// run failed "No such file". A bare name is still looked up in PATH.
    #[test]
    fn regression_a_relative_command_was_not_beside_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(
            &path,
            "[port]\nclient_id = \"i\"\nclient_secret = \"s\"\nreconcile = \"off\"\n\
             [[channel]]\nurl = \"https://smee.io/abc\"\npipeline = true\n\
             [[action]]\nidentifier = \"a\"\ncommand = [\"handlers/run.sh\", \"x/y\"]\n\
             [[action]]\nidentifier = \"b\"\ncommand = [\"bash\", \"-c\", \"true\"]\n",
        )
        .unwrap();
        let config = load(&path, &no_env).unwrap();
        let argv = |i: usize| match &config.actions[i].handler {
            crate::actions::Handler::Command(argv) => argv.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            argv(0),
            [
                dir.path().join("handlers/run.sh").display().to_string(),
                "x/y".into()
            ]
        );
        assert_eq!(argv(1)[0], "bash");
    }

    #[test]
    fn max_frame_is_a_size_per_channel() {
        let channel = |extra: &str| {
            format!(
                "[[channel]]\nurl = \"https://smee.io/abc\"\nforward = [\"http://127.0.0.1:3000/\"]\n{extra}\n"
            )
        };
        let config = parse(&channel(""), "c.toml", &no_env).unwrap();
        assert_eq!(
            config.channels[0].max_frame,
            crate::source::DEFAULT_MAX_FRAME
        );
        let config = parse(&channel("max_frame = \"16MiB\""), "c.toml", &no_env).unwrap();
        assert_eq!(config.channels[0].max_frame, 16 << 20);
        let e = parse(&channel("max_frame = \"lots\""), "c.toml", &no_env).unwrap_err();
        assert!(e.to_string().contains("c.toml:4: max_frame"), "{e}");
    }

    /// Bug: errors found after deserialization (a bad forward target, a bad `max_frame`) were
    /// reported at the `[[channel]]` header's line, not at the offending key's. Errors toml
    /// finds itself (a wrong type, an unknown key) already point at the key.
    #[test]
    fn regression_config_errors_point_at_the_offending_key_not_the_table_header() {
        let text = "[[channel]]\nurl = \"https://smee.io/abc\"\npipeline = false\n\
                    forward = [\n  \"http://127.0.0.1:3000/\",\n  \"not a url\",\n]\n\
                    max_frame = \"huge\"\n";
        let e = parse(text, "c.toml", &no_env).unwrap_err().to_string();
        assert!(e.contains("c.toml:6: forward target \"not a url\""), "{e}");
        assert!(e.contains("c.toml:8: max_frame"), "{e}");
        let e = parse(
            "[[channel]]\nurl = \"https://smee.io/abc\"\nforward = [\"http://x/\"]\n\
             idle_timeout = 5\n",
            "c.toml",
            &no_env,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("c.toml:4: `idle_timeout`: invalid type"), "{e}");
    }

    /// Regression: a mistyped key got serde's list of every key, without the one meant; and a
    /// channel whose targets were all refused was also said to have none ("no forward
    /// targets"), after each target's own error.
    #[test]
    fn regression_a_mistyped_key_got_no_suggestion_and_refused_targets_were_called_none() {
        let e = parse(
            "[[channel]]\nurl = \"https://smee.io/abc\"\nforward = [\"http://x/\"]\n\
             idle_timout = \"60s\"\n",
            "c.toml",
            &no_env,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("c.toml:4: unknown field `idle_timout`"), "{e}");
        assert!(e.ends_with("did you mean `idle_timeout`?"), "{e}");
        // Nothing near: no guess.
        assert_eq!(
            with_suggestion("unknown field `zzz`, expected `url` or `forward`"),
            "unknown field `zzz`, expected `url` or `forward`"
        );

        let e = parse(
            "[[channel]]\nurl = \"https://smee.io/abc\"\nforward = [\"localhost:3000/hook\"]\n",
            "c.toml",
            &no_env,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("c.toml:3: forward target \"localhost:3000/hook\""),
            "{e}"
        );
        assert!(!e.contains("no forward targets"), "{e}");
    }

    /// Regression (helper-114): a value refused for its type was repeated whole:
    /// `invalid type: string "http://bob:pw@h/x?token=T", expected a sequence` (a `forward`
    /// given as a string, not a list) put a target's password and token in the reload's log.
    #[test]
    fn regression_a_value_of_the_wrong_type_was_repeated_with_its_secrets() {
        let e = parse(
            "[[channel]]\nurl = \"https://smee.io/abc\"\n\
             forward = \"http://bob:hunter2@h/x?token=T0KEN\"\n",
            "c.toml",
            &no_env,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(
                "c.toml:3: invalid type: a string, expected a sequence: `forward` takes a list, \
                 even of one: forward = [\"...\"]"
            ),
            "{e}"
        );
        assert!(!e.contains("hunter2") && !e.contains("T0KEN"), "{e}");
        // A line TOML cannot read is not quoted either (`events --config` said it whole).
        let text = "[[channel]]\nforward = \"http://bob:hunter2@h/x\n";
        let e = toml::from_str::<toml::Value>(text).unwrap_err();
        let said = toml_problem("c.toml", text, &e);
        assert!(
            said.starts_with("c.toml:2: ") && !said.contains("hunter2"),
            "{said}"
        );
        assert_eq!(
            without_values(r#"invalid value: string "a \"quoted\" one", expected x; string "b""#),
            "invalid value: a string, expected x; a string"
        );
        // Nor a number (a token written without quotes).
        let e = parse(
            "[[channel]]\nurl = \"https://smee.io/abc\"\nforward = [\"http://x/\"]\n\
             token = 98765432101234\n",
            "c.toml",
            &no_env,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("c.toml:4: `token`: invalid type: an integer, expected"),
            "{e}"
        );
        assert!(!e.contains("98765432101234"), "{e}");
        assert_eq!(
            without_values("floating point `1.5`, expected"),
            "a number, expected"
        );
        // Regression (helper-117): `above = "80"` said "expected f64", Rust's name for it.
        let e = parse(
            "[[channel]]\nurl = \"https://smee.io/abc\"\npipeline = true\n\
             [[rule]]\nname = \"r\"\nproperty = \"p\"\nabove = \"80\"\n",
            "c.toml",
            &no_env,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("c.toml:7: `above`: invalid type: a string, expected a number"),
            "{e}"
        );
    }

    /// Regression: `check` passed two spellings of one channel, which `run` then refused with
    /// "another smee-relay (pid N)", its own pid.
    #[test]
    fn regression_one_channel_given_twice_is_refused_with_both_lines() {
        let text = "[[channel]]\nurl = \"https://smee.io/dupch\"\nforward = [\"http://127.0.0.1:3000/\"]\n\
                    [[channel]]\nurl = \"https://SMEE.io/dupch/\"\nforward = [\"http://127.0.0.1:3000/\"]\n";
        let e = parse(text, "c.toml", &no_env).unwrap_err().to_string();
        assert!(
            e.contains("c.toml:4: this channel is the one at line 1 again"),
            "{e}"
        );
    }

    /// Regression (a new user's finding): a target listed twice got every event twice, under
    /// two delivery ids, and a target that is the channel posted each event back forever.
    #[test]
    fn regression_a_target_given_twice_or_the_channel_itself_is_refused() {
        let text = "[[channel]]\nurl = \"https://smee.io/loopch\"\nforward = [\n  \"http://127.0.0.1:3000/a\",\n  \"http://127.0.0.1:3000/a\",\n  \"https://SMEE.io/loopch/?x=1\",\n]\n";
        let e = parse(text, "c.toml", &no_env).unwrap_err().to_string();
        assert!(
            e.contains("c.toml:5: forward target http://127.0.0.1:3000/a is given twice"),
            "{e}"
        );
        assert!(
            e.contains("c.toml:6: forward target: this is the channel itself"),
            "{e}"
        );
        assert!(!e.contains("loopch"), "the channel id is a secret: {e}");
    }

    /// Regression (helper-117): credentials named through a variable that is not set were
    /// said twice, the second time as "set client_id and client_secret" for `reconcile`, as if
    /// none were configured. And `reconcile = "off"` is kept, so `check` does not explain why
    /// reconciliation does not run.
    #[test]
    fn regression_a_missing_secret_variable_was_also_said_as_missing_credentials() {
        let text = GOOD.replace(
            "client_secret_env = \"PORT_CLIENT_SECRET\"",
            "client_id = \"id\"\nclient_secret_env = \"PORT_CLIENT_SECRET\"\nreconcile = \"10m\"",
        );
        let e = parse(&text, "c.toml", &no_env).unwrap_err().to_string();
        assert!(
            e.contains("client_secret_env names PORT_CLIENT_SECRET"),
            "{e}"
        );
        assert!(!e.contains("reconcile reads entities"), "{e}");
        // Nor for reporting runs (helper-120).
        let reporting = text.replace("reconcile = \"10m\"", "report_automation_runs = true")
            + "\n[[action]]\nidentifier = \"a\"\nforward = \"http://127.0.0.1:1/a\"\n";
        let e = parse(&reporting, "c.toml", &no_env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("client_secret_env names PORT_CLIENT_SECRET"),
            "{e}"
        );
        assert!(
            !e.contains("report_automation_runs needs") && !e.contains("reports runs to Port"),
            "{e}"
        );
        let env = |name: &str| {
            Some(
                if name == "SLACK_WEBHOOK_URL" {
                    "https://hooks.slack.com/x"
                } else {
                    "x"
                }
                .to_string(),
            )
        };
        let off = GOOD.replace(
            "client_secret_env = \"PORT_CLIENT_SECRET\"",
            "client_id = \"id\"\nclient_secret_env = \"PORT_CLIENT_SECRET\"\nreconcile = \"off\"",
        );
        let config = parse(&off, "c.toml", &env).unwrap();
        assert!(config.reconcile_off && config.reconcile.is_none());
    }

    #[test]
    fn problems_name_their_line() {
        let e = parse(GOOD, "c.toml", &no_env).unwrap_err().to_string();
        // Regression (helper-129): a channel's `url_env` was said at its `[[channel]]` line,
        // and none of them said where the variable may come from.
        let channel = "state_dir = \"/tmp/x\"\n[[channel]]\n# the channel\nurl_env = \"SMEE_URL\"\nforward = [\"http://127.0.0.1:3000/\"]\n";
        let said = parse(channel, "c.toml", &no_env).unwrap_err().to_string();
        assert_eq!(
            said,
            "c.toml:4: url_env names SMEE_URL, which is not set (set it where the relay runs: the unit's EnvironmentFile, or a systemd credential of that name)"
        );
        // Secrets looked up in the environment carry no span: the key's line is found.
        assert!(
            e.contains(
                "c.toml:10: [port] client_secret_env names PORT_CLIENT_SECRET, which is not set"
            ),
            "{e}"
        );
        assert!(
            e.contains(
                "c.toml:15: [slack] webhook_url_env names SLACK_WEBHOOK_URL, which is not set"
            ),
            "{e}"
        );

        let unknown = GOOD.replace(
            "severity = \"critical\"",
            "severity = \"critical\"\nthreshold = 3",
        );
        let e = parse(&unknown, "c.toml", &no_env).unwrap_err().to_string();
        assert!(
            e.starts_with("c.toml:32:") && e.contains("unknown field `threshold`"),
            "{e}"
        );

        let bad_jq = GOOD.replace(".properties.locked == true", ".properties.locked ==");
        let e = parse(&bad_jq, "c.toml", &|_| Some("x".into()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.toml:36:") && e.contains("rule \"locked\": when:"),
            "{e}"
        );

        let no_condition = GOOD.replace("not_in = [\"Healthy\"]\n", "");
        let e = parse(&no_condition, "c.toml", &|_| Some("https://x/y".into()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.toml:26:") && e.contains("no condition"),
            "{e}"
        );

        let wrong_type = GOOD.replace("above = 80", "above = \"80\"");
        let e = parse(&wrong_type, "c.toml", &no_env)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("c.toml:21:"), "{e}");
    }

    /// A minimal valid config with `extra` spliced in at the given place.
    fn with(channel_extra: &str, rest: &str) -> String {
        format!(
            "[[channel]]\nurl = \"https://smee.io/abc\"\npipeline = true\n{channel_extra}\n\
             [[rule]]\nname = \"r\"\nproperty = \"cpu\"\nabove = 80\n{rest}"
        )
    }

    /// The error for `text`, which must be refused.
    fn refused(text: &str, env: &dyn Fn(&str) -> Option<String>) -> String {
        match parse(text, "c.toml", env) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn config_accepts_nonsense_zero_idle_timeout() {
        let e = refused(&with("idle_timeout = \"0s\"", ""), &no_env);
        assert!(
            e.starts_with("c.toml:4:") && e.contains("more than zero"),
            "{e}"
        );
        let e = refused(&with("idle_timeout = \"soon\"", ""), &no_env);
        assert!(
            e.starts_with("c.toml:4:") && e.contains("not a duration"),
            "{e}"
        );
        let e = refused(&with("", "[port]\nsignature_tolerance = \"0s\"\n"), &no_env);
        assert!(
            e.starts_with("c.toml:10:") && e.contains("more than zero"),
            "{e}"
        );
        let e = refused(&with("", "[jq]\ntimeout = \"0ms\"\n"), &no_env);
        assert!(
            e.starts_with("c.toml:10:") && e.contains("more than zero"),
            "{e}"
        );
    }

    #[test]
    fn config_accepts_nonsense_empty_client_secret() {
        let e = refused(&with("", "[port]\nclient_secret = \"\"\n"), &no_env);
        assert!(e.starts_with("c.toml:10:") && e.contains("empty"), "{e}");
        let e = refused(&with("", "[port]\nclient_secret = \"  \"\n"), &no_env);
        assert!(e.starts_with("c.toml:10:") && e.contains("empty"), "{e}");
        // From the environment: an empty variable is as good as unset.
        let env = |_: &str| Some(String::new());
        let e = refused(&with("", "[port]\nclient_secret_env = \"SECRET\"\n"), &env);
        assert!(e.contains("SECRET, which is not set"), "{e}");
    }

    #[test]
    fn config_accepts_nonsense_non_finite_thresholds() {
        for (key, value, line) in [
            ("above", "nan", 8),
            ("above", "inf", 8),
            ("above", "-inf", 8),
            ("clear_below", "nan", 9),
        ] {
            let text = if key == "above" {
                with("", "").replace("above = 80", &format!("above = {value}"))
            } else {
                with("", &format!("{key} = {value}\n"))
            };
            let e = refused(&text, &no_env);
            assert!(
                e.starts_with(&format!("c.toml:{line}:")) && e.contains("finite number"),
                "{key} = {value}: {e}"
            );
        }
        let below = with("", "").replace("above = 80", "below = nan");
        let e = refused(&below, &no_env);
        assert!(e.starts_with("c.toml:8:") && e.contains("finite"), "{e}");
    }

    #[test]
    fn config_accepts_nonsense_empty_value_lists() {
        for key in ["in", "not_in"] {
            let text = with("", "").replace("above = 80", &format!("{key} = []"));
            let e = refused(&text, &no_env);
            assert!(
                e.starts_with("c.toml:8:") && e.contains("empty list"),
                "{key}: {e}"
            );
        }
    }

    #[test]
    fn config_accepts_nonsense_token_with_a_newline() {
        let e = refused(&with("token = \"abc\\ndef\"", ""), &no_env);
        assert!(
            e.starts_with("c.toml:4:") && e.contains("control character"),
            "{e}"
        );
        assert!(!e.contains("abc"), "the token is never repeated: {e}");
        let e = refused(&with("token = \"\"", ""), &no_env);
        assert!(e.starts_with("c.toml:4:") && e.contains("empty"), "{e}");
        // From the environment (a trailing newline from `echo` into an env file, say): the
        // channel's line.
        let env = |_: &str| Some("abc\n".to_string());
        let e = refused(&with("token_env = \"TOKEN\"", ""), &env);
        assert!(e.starts_with("c.toml:1:") && !e.contains("abc"), "{e}");
        assert!(
            e.contains("the value of TOKEN") && e.contains("control character"),
            "{e}"
        );
        let e = refused(
            &with("", "").replace("name = \"r\"", "name = \"a\\u001fb\""),
            &no_env,
        );
        assert!(
            e.starts_with("c.toml:5:") && e.contains("control character"),
            "{e}"
        );
    }

    #[test]
    fn jq_bounds_are_read_and_checked() {
        let config = parse(
            &with("", "[jq]\ntimeout = \"250ms\"\nmax_memory_mib = 128\n"),
            "c.toml",
            &no_env,
        )
        .unwrap();
        assert_eq!(config.jq.timeout, Duration::from_millis(250));
        assert_eq!(config.jq.max_memory, 128 << 20);
        assert_eq!(
            parse(&with("", ""), "c.toml", &no_env).unwrap().jq,
            JqLimits::default()
        );
        let e = refused(&with("", "[jq]\nmax_memory_mib = 1\n"), &no_env);
        assert!(
            e.starts_with("c.toml:10:") && e.contains("between 64"),
            "{e}"
        );
    }

    #[test]
    fn cluster_is_read_with_defaults_and_its_url_stays_secret() {
        let text = "[[channel]]\nurl = \"https://smee.io/abc\"\nforward = [\"http://127.0.0.1:1/\"]\n\
                    [cluster]\nnats_url = \"nats://app:hunter2@10.0.0.1:4222\"\nname = \"prod\"\nreplicas = 3\n";
        let config = parse(text, "c.toml", &no_env).unwrap();
        let cluster = config.cluster.clone().expect("[cluster] read");
        assert_eq!(cluster.name, "prod");
        assert_eq!(cluster.replicas, 3);
        assert_eq!(cluster.ack_wait, Duration::from_secs(30));
        assert!(!format!("{config:?}").contains("hunter2"));
        assert_eq!(cluster.shown_url(), "nats://app:***@10.0.0.1:4222");

        let bad = text
            .replace("\"prod\"", "\"no spaces\"")
            .replace("replicas = 3", "replicas = 9");
        let e = parse(&bad, "c.toml", &no_env).unwrap_err();
        let all = e.problems.join("\n");
        assert!(all.contains("[cluster] name \"no spaces\""), "{all}");
        assert!(all.contains("replicas = 9: must be 1 to 5"), "{all}");
    }

    /// `check` said ok for NATS URLs that `run` then refused when connecting: a bad scheme, a
    /// host that does not parse, in a list. Now both refuse them when the file is read, at the
    /// key's line, with what a URL should look like, and without the password.
    #[test]
    fn regression_check_accepts_a_nats_url_that_run_refuses() {
        let config = |url: &str| {
            format!(
                "[[channel]]\nurl = \"https://smee.io/abc\"\nforward = [\"http://127.0.0.1:1/\"]\n\
                 [cluster]\nname = \"prod\"\nnats_url = \"{url}\"\n"
            )
        };
        let e = refused(&config("htp://u:hunter2@host:4222"), &no_env);
        assert!(
            e.starts_with("c.toml:6: [cluster] nats_url: scheme must be nats"),
            "{e}"
        );
        assert!(e.contains("expected nats://HOST:PORT"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let e = refused(&config("nats://a:4222, nats://bad host:4222"), &no_env);
        assert!(
            e.starts_with("c.toml:6: [cluster] nats_url: server 2 of 2: not a URL"),
            "{e}"
        );
        // From the environment: at nats_url_env's line.
        let text = config("x").replace("nats_url = \"x\"", "nats_url_env = \"NATS_URL\"");
        let env = |name: &str| (name == "NATS_URL").then(|| "htp://host:4222".to_string());
        let e = refused(&text, &env);
        assert!(
            e.starts_with("c.toml:6: [cluster] nats_url_env: the value of NATS_URL is scheme"),
            "{e}"
        );
        assert!(parse(&config("nats://a:4222, tls://b:4222"), "c.toml", &no_env).is_ok());
    }

    /// `[cluster]` problems had no line (`bad.toml: [cluster] name ...`), and a bad duration
    /// stopped parsing so only it was reported. Now each is at its key's line, all of them, in
    /// file order.
    #[test]
    fn regression_cluster_errors_have_no_line_and_only_one_is_reported() {
        let text = "[[channel]]\nurl = \"https://smee.io/abc\"\nforward = [\"http://127.0.0.1:1/\"]\n\
                    [cluster]\nnats_url = \"nats://h:4222\"\nname = \"\"\nreplicas = 0\n\
                    ack_wait = \"0s\"\nhealth_grace = \"soon\"\ndedupe_window = \"1h\"\n";
        let e = parse(text, "c.toml", &no_env).unwrap_err();
        assert_eq!(
            e.problems,
            [
                r#"c.toml:6: [cluster] name "": use letters, digits, '-' and '_'"#,
                "c.toml:7: [cluster] replicas = 0: must be 1 to 5 (1 on a single NATS server, 3 \
                 on a 3-node NATS cluster)",
                r#"c.toml:8: [cluster] ack_wait: "0s": must be more than zero"#,
                r#"c.toml:9: [cluster] health_grace: "soon" is not a duration like 30s, 5m or 1h: expected number at 0"#,
            ]
        );
        let e = refused(&text.replace("\"0s\"", "\"100ms\""), &no_env);
        assert!(
            e.contains("c.toml:8: [cluster] ack_wait = \"100ms\" must be at least 1s"),
            "{e}"
        );
        // `events` reads `[cluster]` alone, with the same lines.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[cluster]\n\nname = \"prod.eu\"\n").unwrap();
        let e = load_cluster(&path, &no_env, false)
            .unwrap_err()
            .problems
            .join("\n");
        assert!(
            e.ends_with(r#"c.toml:3: [cluster] name "prod.eu": use letters, digits, '-' and '_'"#),
            "{e}"
        );
    }

    #[test]
    fn a_dedupe_window_that_cannot_cover_a_takeover_is_refused() {
        let text = "[[channel]]\nurl = \"https://smee.io/abc\"\nforward = [\"http://127.0.0.1:1/\"]\n\
                    [cluster]\nnats_url = \"nats://10.0.0.1:4222\"\nack_wait = \"30s\"\n\
                    dedupe_window = \"140s\"\nname = \"prod\"\n";
        let all = parse(text, "c.toml", &no_env)
            .unwrap_err()
            .problems
            .join("\n");
        assert!(
            all.contains(
                "c.toml:7: [cluster] dedupe_window = \"140s\": dedupe_window (2m 20s) must be at \
                 least ack_wait (30s) plus 2m"
            ),
            "{all}"
        );
        assert!(parse(&text.replace("140s", "150s"), "c.toml", &no_env).is_ok());
        // The default window (2h) against a longer ack_wait: said at ack_wait.
        let long = text
            .replace("dedupe_window = \"140s\"\n", "")
            .replace("30s", "3h");
        let all = parse(&long, "c.toml", &no_env)
            .unwrap_err()
            .problems
            .join("\n");
        assert!(
            all.contains("c.toml:6: [cluster] ack_wait = \"3h\": dedupe_window (2h) must be"),
            "{all}"
        );
    }

    /// `[cluster]` without `name` joined cluster `default`: an instance whose file forgot it ran
    /// a second, independent cluster on the same channels, and every alert was sent twice.
    #[test]
    fn regression_a_cluster_table_without_name_silently_joined_cluster_default() {
        let text = "[[channel]]\nurl = \"https://smee.io/abc\"\nforward = [\"http://127.0.0.1:1/\"]\n\
                    \n  [cluster]  # shared\nnats_url = \"nats://10.0.0.1:4222\"\n";
        let want = "c.toml:5: [cluster] needs name = \"...\", the same on every instance of the \
                    cluster";
        let all = parse(text, "c.toml", &no_env)
            .unwrap_err()
            .problems
            .join("\n");
        assert_eq!(all, want);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        let e = load_cluster(&path, &no_env, false)
            .unwrap_err()
            .problems
            .join("\n");
        assert!(e.ends_with(&want[6..]), "{e}");
        assert!(parse(&format!("{text}name = \"prod\"\n"), "c.toml", &no_env).is_ok());
    }

    /// Regression (adv3 review, finding 2): the smallest window accepted (ack_wait + 1m) left
    /// the re-send window of held alerts and reconciliations at zero, so a held FIRING whose
    /// writer died right after its write was never sent by another instance.
    #[test]
    fn a_dedupe_window_leaving_no_resend_window_for_held_alerts_is_refused() {
        let text = "[[channel]]\nurl = \"https://smee.io/abc\"\nforward = [\"http://127.0.0.1:1/\"]\n\
                    [cluster]\nnats_url = \"nats://10.0.0.1:4222\"\nack_wait = \"2s\"\n\
                    dedupe_window = \"62s\"\nname = \"prod\"\n";
        let all = parse(text, "c.toml", &no_env)
            .unwrap_err()
            .problems
            .join("\n");
        assert!(
            all.contains(
                "c.toml:7: [cluster] dedupe_window = \"62s\": dedupe_window (1m 2s) must be at \
                 least ack_wait (2s) plus 2m"
            ),
            "{all}"
        );
        // A minute of re-send window left: accepted.
        assert!(parse(&text.replace("62s", "122s"), "c.toml", &no_env).is_ok());
    }

    #[test]
    fn an_ack_wait_under_the_slack_pace_is_refused() {
        let text = "[[channel]]\nurl = \"https://smee.io/abc\"\nforward = [\"http://127.0.0.1:1/\"]\n\
                    [cluster]\nnats_url = \"nats://10.0.0.1:4222\"\nack_wait = \"600ms\"\n\
                    name = \"prod\"\n";
        let all = parse(text, "c.toml", &no_env)
            .unwrap_err()
            .problems
            .join("\n");
        assert!(
            all.contains("c.toml:6: [cluster] ack_wait = \"600ms\" must be at least 1s"),
            "{all}"
        );
        let one = text.replace("600ms", "1s");
        assert!(parse(&one, "c.toml", &no_env).is_ok());
    }

    #[test]
    fn run_and_events_put_the_nats_url_flag_on_top_of_the_cluster_table_alike() {
        let secret = |s: &str| SecretString::from(s.to_string());
        assert!(cluster_with_flag(None, None).unwrap().is_none());
        let alone = cluster_with_flag(Some(&secret("nats://h:4222")), None)
            .unwrap()
            .unwrap();
        assert_eq!(alone.name, "default");
        let mut file = crate::cluster::Settings::new(secret("nats://file:4222"), "prod".into());
        file.replicas = 3;
        let over = cluster_with_flag(Some(&secret("nats://flag:4222")), Some(file.clone()))
            .unwrap()
            .unwrap();
        assert_eq!(over.url.expose_secret(), "nats://flag:4222");
        assert_eq!((over.name.as_str(), over.replicas), ("prod", 3));
        // A bad flag is refused without repeating it (it may hold a password).
        let bad = cluster_with_flag(Some(&secret("htp://u:hunter2@h:4222")), Some(file))
            .unwrap_err()
            .to_string();
        assert!(
            bad.starts_with("--nats-url / SMEE_RELAY_NATS_URL: "),
            "{bad}"
        );
        assert!(!bad.contains("hunter2"), "{bad}");
        // `nats_url_env` unset and no flag: said, not a connection to "".
        let empty = crate::cluster::Settings::new(secret(""), "prod".into());
        let missing = cluster_with_flag(None, Some(empty))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("[cluster] needs nats_url"), "{missing}");
    }

    #[test]
    fn events_read_only_the_cluster_table_and_not_the_secrets_the_rest_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        // [slack] names a variable this shell does not have: `events` must not care.
        std::fs::write(
            &path,
            "[[channel]]\nurl = \"https://smee.io/abc\"\npipeline = true\n\
             [slack]\nwebhook_url_env = \"NOT_SET_HERE\"\n\
             [cluster]\nnats_url_env = \"NATS_URL\"\nname = \"prod\"\n",
        )
        .unwrap();
        let env = |name: &str| (name == "NATS_URL").then(|| "nats://10.0.0.1:4222".to_string());
        let cluster = load_cluster(&path, &env, false)
            .unwrap()
            .expect("[cluster] read");
        assert_eq!(cluster.name, "prod");
        assert_eq!(cluster.shown_url(), "nats://10.0.0.1:4222");
        // Unset here, and --nats-url gives it: an empty URL, the flag's to fill.
        let cluster = load_cluster(&path, &no_env, true).unwrap().unwrap();
        assert!(cluster.shown_url().is_empty());
        // Unset and no flag: the variable is named, at its line (it said only that
        // `[cluster] needs nats_url or nats_url_env`).
        let e = load_cluster(&path, &no_env, false).unwrap_err().to_string();
        assert!(
            e.contains("c.toml:7: [cluster] nats_url_env names NATS_URL, which is not set"),
            "{e}"
        );
        std::fs::write(&path, "[[channel]]\nurl = \"https://smee.io/abc\"\n").unwrap();
        assert!(load_cluster(&path, &no_env, false).unwrap().is_none());
        std::fs::write(&path, "[cluster]\nname = \"no spaces\"\n").unwrap();
        let e = load_cluster(&path, &no_env, false).unwrap_err();
        assert!(
            e.problems.join("\n").contains("name \"no spaces\""),
            "{e:?}"
        );
    }
}
