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

use crate::pipeline::jq::JqCondition;
use crate::pipeline::rules::{Condition, Rule};
use crate::pipeline::signature::Verifier;
use crate::url::{ChannelUrl, TargetUrl};

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Where the spool and alert state live. Default: as for `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// Serve `/healthz` and `/metrics` on this address (`--metrics-listen` wins).
    pub metrics_listen: Option<std::net::SocketAddr>,
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
}

/// One `[[channel]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    /// The channel URL (a secret: prefer `url_env`).
    pub url: Option<String>,
    /// The environment variable holding the channel URL.
    pub url_env: Option<String>,
    /// Targets each event is replayed to, each with the spool's guarantees.
    #[serde(default)]
    pub forward: Vec<String>,
    /// Run the rules on this channel's events.
    #[serde(default)]
    pub pipeline: bool,
    /// Reconnect when the channel sends nothing for this long.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Token for a `smee-relay serve --token` server (a secret: prefer `token_env`).
    pub token: Option<String>,
    /// The environment variable holding the token.
    pub token_env: Option<String>,
    /// Frames larger than this (e.g. "128MiB") are skipped, logged and counted.
    pub max_frame: Option<String>,
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
    pub client_secret: Option<String>,
    /// The environment variable holding the client secret.
    pub client_secret_env: Option<String>,
    /// How far `x-port-timestamp` may be from now.
    #[serde(default = "default_tolerance", with = "humantime_serde")]
    pub signature_tolerance: Duration,
    /// The Port app, for entity links in alerts.
    #[serde(default = "default_app_url")]
    pub app_url: String,
}

impl Default for PortConfig {
    fn default() -> Self {
        Self {
            client_secret: None,
            client_secret_env: None,
            signature_tolerance: default_tolerance(),
            app_url: default_app_url(),
        }
    }
}

fn default_tolerance() -> Duration {
    Duration::from_secs(300)
}

fn default_app_url() -> String {
    "https://app.getport.io".into()
}

/// `[slack]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackConfig {
    /// The incoming-webhook URL (a secret: prefer `webhook_url_env`).
    pub webhook_url: Option<String>,
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
    pub above: Option<f64>,
    /// With `above`: resolve only when the value falls below this (hysteresis). Default: `above`.
    pub clear_below: Option<f64>,
    /// Fire when the property is below this.
    pub below: Option<f64>,
    /// With `below`: resolve only when the value rises above this. Default: `below`.
    pub clear_above: Option<f64>,
    /// Fire while the property is one of these values.
    #[serde(rename = "in")]
    pub in_: Option<Vec<serde_json::Value>>,
    /// Fire while the property is none of these values.
    pub not_in: Option<Vec<serde_json::Value>>,
    /// Fire while this jq condition holds over the entity after the change.
    pub when: Option<Spanned<String>>,
    /// Hold: the condition must last this long before the alert fires; if it recovers first,
    /// nothing is sent.
    #[serde(rename = "for", default, with = "humantime_serde")]
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
    pub token: Option<String>,
    /// The frame size limit for this channel's source.
    pub max_frame: usize,
}

/// A validated config, secrets resolved.
#[derive(Clone, Debug)]
pub struct Config {
    pub state_dir: Option<PathBuf>,
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub channels: Vec<Channel>,
    pub rules: Vec<Rule>,
    /// Present when `[port]` names a client secret.
    pub verifier: Option<Verifier>,
    pub app_url: String,
    /// The Slack webhook. A secret: never logged.
    pub slack: Option<SecretUrl>,
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
    parse(&text, &path.display().to_string(), env)
}

/// Validate config `text` (from `origin`, for messages).
pub fn parse(
    text: &str,
    origin: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let file: ConfigFile = toml::from_str(text).map_err(|e| ConfigError {
        problems: vec![match e.span() {
            Some(span) => format!("{origin}:{}: {}", line_of(span.start), e.message()),
            None => format!("{origin}: {}", e.message()),
        }],
    })?;
    let mut problems = Vec::new();
    let at_line =
        |offset: usize, message: String| format!("{origin}:{}: {message}", line_of(offset));

    let secret = |literal: &Option<String>,
                  var: &Option<String>,
                  what: &str|
     -> Result<Option<String>, String> {
        match (literal, var) {
            (Some(_), Some(_)) => Err(format!("give {what} or {what}_env, not both")),
            (Some(value), None) => Ok(Some(value.clone())),
            (None, Some(name)) => env(name)
                .filter(|v| !v.is_empty())
                .map(Some)
                .ok_or_else(|| format!("{what}_env names {name}, which is not set")),
            (None, None) => Ok(None),
        }
    };

    let mut channels = Vec::new();
    for spanned in &file.channels {
        let at = spanned.span().start;
        let c = spanned.get_ref();
        match secret(&c.url, &c.url_env, "url") {
            Ok(Some(url)) => match url.parse::<ChannelUrl>() {
                Ok(url) => {
                    let mut forward = Vec::new();
                    for target in &c.forward {
                        match target.parse::<TargetUrl>() {
                            Ok(t) => forward.push(t),
                            Err(e) => problems
                                .push(at_line(at, format!("forward target {target:?}: {e}"))),
                        }
                    }
                    if forward.is_empty() && !c.pipeline {
                        problems.push(at_line(at, "this channel has no forward targets and pipeline = false: nothing would use it".into()));
                    }
                    let token = match secret(&c.token, &c.token_env, "token") {
                        Ok(token) => token,
                        Err(e) => {
                            problems.push(at_line(at, e));
                            None
                        }
                    };
                    let max_frame = match c.max_frame.as_deref().map(crate::memory::parse_size) {
                        None => crate::source::DEFAULT_MAX_FRAME,
                        Some(Ok(size)) => usize::try_from(size).unwrap_or(usize::MAX),
                        Some(Err(e)) => {
                            problems.push(at_line(at, format!("max_frame: {e}")));
                            crate::source::DEFAULT_MAX_FRAME
                        }
                    };
                    channels.push(Channel {
                        url,
                        forward,
                        pipeline: c.pipeline,
                        idle_timeout: c.idle_timeout,
                        token,
                        max_frame,
                    });
                }
                // The URL may be a secret; say what is wrong without repeating it.
                Err(e) => problems.push(at_line(at, format!("channel url: {e}"))),
            },
            Ok(None) => problems.push(at_line(at, "a channel needs url or url_env".into())),
            Err(e) => problems.push(at_line(at, e)),
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
        match rule(r) {
            Ok(rule) => rules.push(rule),
            Err((offset, message)) => problems.push(at_line(
                offset.unwrap_or(at),
                format!("rule {:?}: {message}", r.name),
            )),
        }
    }
    let pipelines = file.channels.iter().any(|c| c.get_ref().pipeline);
    if pipelines && file.rules.is_empty() {
        problems.push(format!(
            "{origin}: a channel has pipeline = true but there is no [[rule]]"
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
            problems.push(format!("{origin}: [port] {e}"));
            None
        }
    };
    let slack = match &file.slack {
        None => None,
        Some(s) => match secret(&s.webhook_url, &s.webhook_url_env, "webhook_url") {
            Ok(Some(url)) => match crate::url::parse_http_url(&url) {
                Ok(url) => Some(SecretUrl(url)),
                Err(e) => {
                    problems.push(format!("{origin}: [slack] webhook_url: {e}"));
                    None
                }
            },
            Ok(None) => {
                problems.push(format!(
                    "{origin}: [slack] needs webhook_url or webhook_url_env"
                ));
                None
            }
            Err(e) => {
                problems.push(format!("{origin}: [slack] {e}"));
                None
            }
        },
    };
    if let Err(e) = crate::url::parse_http_url(&file.port.app_url) {
        problems.push(format!("{origin}: [port] app_url: {e}"));
    }

    if !problems.is_empty() {
        return Err(ConfigError { problems });
    }
    Ok(Config {
        state_dir: file.state_dir,
        metrics_listen: file.metrics_listen,
        channels,
        rules,
        verifier,
        app_url: file.port.app_url.trim_end_matches('/').to_string(),
        slack,
    })
}

/// Build a rule, or say what is wrong (with the offset of the `when` string for jq errors).
fn rule(r: &RuleConfig) -> Result<Rule, (Option<usize>, String)> {
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
    Ok(Rule {
        name: r.name.clone(),
        blueprint: r.blueprint.clone(),
        condition,
        hold: r.hold,
        severity: r.severity.clone(),
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
        assert!(!format!("{config:?}").contains("hooks.slack.com/services/T/B/X"));
        assert!(!format!("{config:?}").contains("s3cret"));
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
        assert!(e.to_string().contains("c.toml:1: max_frame"), "{e}");
    }

    #[test]
    fn problems_name_their_line() {
        let e = parse(GOOD, "c.toml", &no_env).unwrap_err().to_string();
        assert!(
            e.contains(
                "c.toml: [port] client_secret_env names PORT_CLIENT_SECRET, which is not set"
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
}
