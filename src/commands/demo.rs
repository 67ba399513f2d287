//! `smee-relay demo`: the whole product in one process, with no account and no network.
//!
//! It starts `serve` on a free loopback port. First the relay: three GitHub-style webhooks
//! (signed, with bodies a re-serialiser would change) are posted to a channel forwarded to a
//! local app that answers 503 until the first one has reached it; the app then checks that each
//! arrives in order, byte for byte, with a signature that verifies.
//!
//! Then the pipeline: it subscribes to a fresh channel with
//! the example rules (cpu-high and unhealthy), posts the DeploymentConfig sequence (the Port
//! fixtures, embedded in the binary), and prints every alert the pipeline sends, one block per
//! alert. With `--slack-webhook` it sends them to Slack as well. Everything goes through the
//! real path: SSE, the spool (in a temporary state directory), the rules and alert state.
//!
//! Then a Port self-service action run (`restart_deployment`, signed as Port signs) goes the same
//! way to a local command, and its log lines and final status are reported to an embedded fake
//! Port API, which prints them as Port would record them.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::delivery::RetryPolicy;
use crate::delivery::forward::Forwarder;
use crate::notify::AlertSink;
use crate::pipeline::Pipeline;
use crate::service::daemon::{self, ChannelPlan, DaemonError, Plan};
use crate::source::SourceConfig;

/// The example rules: the ones the fixtures' README documents.
const RULES: &str = include_str!("../../tests/fixtures/port/rules.toml");

/// The DeploymentConfig sequence (fixture names and Port Automation webhook bodies); tests use
/// the names to load the legacy shape too.
pub const SEQUENCE: [(&str, &str); 9] = [
    (
        "01-create",
        include_str!("../../tests/fixtures/port/deployment-config/automation/01-create.json"),
    ),
    (
        "02-cpu-25-to-87",
        include_str!("../../tests/fixtures/port/deployment-config/automation/02-cpu-25-to-87.json"),
    ),
    (
        "03-cpu-87-to-91",
        include_str!("../../tests/fixtures/port/deployment-config/automation/03-cpu-87-to-91.json"),
    ),
    (
        "04-health-healthy-to-degraded",
        include_str!(
            "../../tests/fixtures/port/deployment-config/automation/04-health-healthy-to-degraded.json"
        ),
    ),
    (
        "05-cpu-91-to-75",
        include_str!("../../tests/fixtures/port/deployment-config/automation/05-cpu-91-to-75.json"),
    ),
    (
        "06-cpu-75-to-60",
        include_str!("../../tests/fixtures/port/deployment-config/automation/06-cpu-75-to-60.json"),
    ),
    (
        "07-health-degraded-to-healthy",
        include_str!(
            "../../tests/fixtures/port/deployment-config/automation/07-health-degraded-to-healthy.json"
        ),
    ),
    (
        "08-cpu-60-to-95",
        include_str!("../../tests/fixtures/port/deployment-config/automation/08-cpu-60-to-95.json"),
    ),
    (
        "09-delete",
        include_str!("../../tests/fixtures/port/deployment-config/automation/09-delete.json"),
    ),
];

/// What the sequence must send with the example rules, in order (the fixtures' README).
pub const EXPECTED: [&str; 6] = [
    "FIRING cpu-high: Notification Service Production",
    "FIRING unhealthy: Notification Service Production",
    "RESOLVED cpu-high: Notification Service Production",
    "RESOLVED unhealthy: Notification Service Production",
    "FIRING cpu-high: Notification Service Production",
    "RESOLVED cpu-high: Notification Service Production",
];

/// How many alerts the sequence produces with the example rules.
const EXPECTED_ALERTS: usize = EXPECTED.len();

/// What can stop the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start the demo server: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Relay(#[from] DaemonError),
    #[error("cannot post to the demo channel: {0}")]
    Post(String),
    #[error("only {got} of {EXPECTED_ALERTS} alerts arrived within {}", humantime::format_duration(*.within))]
    Incomplete { got: usize, within: Duration },
    #[error("the action run's final status did not reach the fake Port API within 10s")]
    ActionRun,
    #[error("cannot make the demo's state directory {}: {source} (TMPDIR names where it goes)", .dir.display())]
    StateDir {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Interrupted(#[source] crate::error::Stopped),
    #[error("the relay stopped before the demo ended")]
    RelayEnded,
    #[error("only {got} of {} webhooks reached the local app within {}", WEBHOOKS.len(), humantime::format_duration(*.within))]
    Undelivered { got: usize, within: Duration },
    #[error("the local app got {got} where {sent} was sent (#{n}): {how}")]
    Mangled {
        n: usize,
        sent: &'static str,
        got: String,
        how: &'static str,
    },
}

/// The secret the demo's GitHub webhooks are signed with (`x-hub-signature-256`).
const GITHUB_SECRET: &str = "demo-github-secret";

/// The relay part's webhooks: event names and bodies as a sender wrote them. Spacing, `\u`
/// escapes, `1.0` and an integer past 2^64 are what a client that re-serialises the body
/// changes, and with them the signature.
const WEBHOOKS: [(&str, &str); 3] = [
    (
        "push",
        r#"{"ref": "refs/heads/main", "after": "9f2c1e07", "size": 1.0,
 "head_commit": {"message": "caf\u00e9: fix the na\u00efve retry", "id": 18446744073709551617}}"#,
    ),
    (
        "pull_request",
        r#"{"action":"opened","number":42,"pull_request":{"title":"Keep \/ escapes","draft":false}}"#,
    ),
    (
        "issues",
        r#"{ "action" : "closed", "issue" : { "number" : 7, "labels" : [ ] } }"#,
    ),
];

/// POST a JSON `body` with `headers` to the demo `channel`, as its sender would; `what` names
/// it in an error.
async fn post(
    client: &reqwest::Client,
    channel: &str,
    headers: &[(&'static str, String)],
    body: &'static str,
    what: &str,
) -> Result<(), DemoError> {
    let mut request = client
        .post(channel)
        .header("content-type", "application/json")
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = request
        .send()
        .await
        .map_err(|e| DemoError::Post(e.without_url().to_string()))?;
    if !response.status().is_success() {
        return Err(DemoError::Post(format!("{what}: {}", response.status())));
    }
    Ok(())
}

/// HMAC-SHA256 of `message` with `key`: what GitHub and Port sign with.
fn hmac_sha256(key: &str, message: &[u8]) -> Vec<u8> {
    use hmac::{KeyInit as _, Mac as _};
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes any key");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

/// The `x-hub-signature-256` GitHub sends with `body`.
fn github_signature(body: &[u8]) -> String {
    format!("sha256={}", hex::encode(hmac_sha256(GITHUB_SECRET, body)))
}

/// What the demo's local app saw of one request.
struct AppSaw {
    /// `x-github-event`.
    event: String,
    body: bytes::Bytes,
    /// Whether `x-hub-signature-256` verified over the body as it arrived.
    signed: bool,
    /// Whether the app answered 503 (it was down).
    refused: bool,
}

/// The demo's local app on a loopback port: answers 503 while `up` is false, then 200, and
/// reports every request. Returns its webhook URL.
async fn local_app(
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<(String, tokio::sync::mpsc::UnboundedReceiver<AppSaw>)> {
    use std::sync::atomic::Ordering;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let router = axum::Router::new().route(
        "/webhook",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: bytes::Bytes| async move {
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string()
                };
                let refused = !up.load(Ordering::SeqCst);
                let _ = tx.send(AppSaw {
                    event: header("x-github-event"),
                    signed: header("x-hub-signature-256") == github_signature(&body),
                    body,
                    refused,
                });
                if refused {
                    axum::http::StatusCode::SERVICE_UNAVAILABLE
                } else {
                    axum::http::StatusCode::OK
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok((format!("http://{addr}/webhook"), rx))
}

/// Post the webhooks to `channel`; print what the app sees: the refusal, then each webhook,
/// checked against what was sent.
async fn relay_part(
    client: &reqwest::Client,
    channel: &str,
    app: &str,
    up: &std::sync::atomic::AtomicBool,
    saw: &mut tokio::sync::mpsc::UnboundedReceiver<AppSaw>,
) -> Result<(), DemoError> {
    println!(
        "The relay: {} GitHub webhooks to a local app ({app}) that is down when they arrive.\n",
        WEBHOOKS.len()
    );
    for (n, (event, body)) in WEBHOOKS.iter().enumerate() {
        let headers = [
            ("x-github-event", event.to_string()),
            ("x-github-delivery", format!("demo-{}", n + 1)),
            ("x-hub-signature-256", github_signature(body.as_bytes())),
        ];
        post(client, channel, &headers, body, event).await?;
    }
    // The first try waits for the route's retry (1 s, then doubling): 15 s leaves room for two.
    let within = Duration::from_secs(15);
    let deadline = tokio::time::Instant::now() + within;
    let mut got = 0;
    while got < WEBHOOKS.len() {
        let Ok(Some(seen)) = tokio::time::timeout_at(deadline, saw.recv()).await else {
            return Err(DemoError::Undelivered { got, within });
        };
        if seen.refused {
            println!(
                "  app answered 503 to {}: smee-relay keeps it in its spool and tries again; the others wait behind it.",
                seen.event
            );
            println!("  app is up again.");
            up.store(true, std::sync::atomic::Ordering::SeqCst);
            continue;
        }
        let (event, body) = WEBHOOKS[got];
        got += 1;
        let mangled = |how| DemoError::Mangled {
            n: got,
            sent: event,
            got: seen.event.clone(),
            how,
        };
        if seen.event != event {
            return Err(mangled("out of order"));
        }
        if seen.body != body.as_bytes() {
            return Err(mangled("the body changed"));
        }
        if !seen.signed {
            return Err(mangled("the signature does not verify"));
        }
        println!(
            "  app got {event} ({} bytes): the body byte for byte, signature valid.",
            seen.body.len()
        );
    }
    println!(
        "  (Through smee.io itself, a body arrives byte for byte only if it is JSON as JSON.stringify writes it, as GitHub's real ones are: smee.io re-serialises bodies. The README's \"Which bodies survive smee.io\" says more.)\n"
    );
    Ok(())
}

/// The demo's Port client secret: signs the action run and authenticates to the fake API.
const DEMO_SECRET: &str = "demo-secret";

/// The action run the demo posts (Port's default body for a migrated action).
const ACTION_RUN: &str =
    include_str!("../../tests/fixtures/port/actions/01-legacy-run-message.json");

/// The demo's handler: a fixed script (arguments are never built from the payload); the run's
/// details come in `PORT_*` variables and the body on stdin.
const HANDLER: &str = r#"echo "restarting $PORT_ENTITY (run $PORT_RUN_ID)"
echo "reason: $(grep -o '"reason":"[^"]*"' | cut -d'"' -f4)"
echo "3/3 pods ready"
echo '::port:: {"link": "https://grafana.example.com/d/deploys", "statusLabel": "restarted"}'"#;

/// What the fake Port API heard, in order, as lines to print.
type Recorded = tokio::sync::mpsc::UnboundedReceiver<(bool, String)>;

/// An embedded stand-in for Port's API on a loopback port: issues a token, records run logs
/// and the final PATCH. Returns its URL and what it records (`true` for the final status).
async fn fake_port_api() -> std::io::Result<(String, Recorded)> {
    use axum::routing::{patch, post};
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(bool, String)>();
    let (logs, finish) = (tx.clone(), tx);
    let router = axum::Router::new()
        .route(
            "/v1/auth/access_token",
            post(|| async {
                axum::Json(
                    serde_json::json!({"ok": true, "accessToken": "demo-token", "expiresIn": 3600}),
                )
            }),
        )
        .route(
            "/v1/actions/runs/{run}/logs",
            post(
                move |axum::extract::Path(run): axum::extract::Path<String>, body: String| {
                    let logs = logs.clone();
                    async move {
                        let body: serde_json::Value =
                            serde_json::from_str(&body).unwrap_or_default();
                        for line in body["message"].as_str().unwrap_or("").lines() {
                            let _ = logs.send((false, format!("  Port run {run} log: {line}")));
                        }
                        axum::Json(serde_json::json!({"ok": true}))
                    }
                },
            ),
        )
        .route(
            "/v1/actions/runs/{run}",
            patch(
                move |axum::extract::Path(run): axum::extract::Path<String>, body: String| {
                    let finish = finish.clone();
                    async move {
                        let _ = finish.send((true, format!("  Port run {run} status: {body}")));
                        axum::Json(serde_json::json!({"ok": true}))
                    }
                },
            ),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok((format!("http://{addr}"), rx))
}

/// The demo's one `[[action]]` and its reporter to the fake Port API.
fn demo_actions(
    api_url: &str,
) -> (
    crate::actions::runner::Actions,
    crate::notify::port::PortReporter,
) {
    let config: crate::actions::ActionConfig = toml::from_str(&format!(
        "identifier = \"restart_deployment\"\ncommand = [\"/bin/sh\", \"-c\", {}]\ntimeout = \"30s\"",
        toml::Value::String(HANDLER.into())
    ))
    .expect("the demo action parses");
    let action = config.compile(true, &[]).expect("the demo action is valid");
    let secret = crate::secret::SecretString::from(DEMO_SECRET.to_string());
    let actions = crate::actions::runner::Actions {
        actions: vec![action],
        verifier: Some(crate::pipeline::signature::Verifier::new(
            secret.clone(),
            Duration::from_secs(300),
        )),
        retry: RetryPolicy::DEFAULT,
        automation_runs: None,
        jq: crate::pipeline::jq::JqEngine::new(Default::default()),
    };
    let reporter = crate::notify::port::PortReporter::new(crate::notify::port::PortApi {
        api_url: api_url.to_string(),
        client_id: "demo-client".into(),
        client_secret: secret,
    })
    .expect("an HTTP client builds");
    (actions, reporter)
}

/// Post a signed action run and print what the fake Port API records, until its final status.
async fn action_run(
    client: &reqwest::Client,
    channel: &str,
    recorded: &mut Recorded,
) -> Result<(), DemoError> {
    use base64::Engine as _;
    println!(
        "Now a self-service action run: Port's `restart_deployment` button, handled by a local command.\n"
    );
    let timestamp = (crate::clock::now_ms() / 1000).to_string();
    let mac = hmac_sha256(DEMO_SECRET, format!("{timestamp}.{ACTION_RUN}").as_bytes());
    let signature = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac)
    );
    let headers = [
        ("x-port-timestamp", timestamp),
        ("x-port-signature", signature),
    ];
    post(client, channel, &headers, ACTION_RUN, "action run").await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, recorded.recv()).await {
            Ok(Some((last, line))) => {
                println!("{line}");
                if last {
                    println!();
                    return Ok(());
                }
            }
            _ => return Err(DemoError::ActionRun),
        }
    }
}

/// Run the demo; print the alerts to stdout.
/// Where the .deb installs the example config and environment file.
const PACKAGED_EXAMPLES: &str = "/etc/smee-relay";

/// Where the example config is, and whose it is: the package's in `packaged` when installed,
/// else a source checkout's in systemd/ (helper-150: an installed relay named files only a
/// checkout has).
fn examples(packaged: &std::path::Path) -> (String, &'static str) {
    match packaged.join("config.example.toml").exists() {
        true => (packaged.display().to_string(), "the package's"),
        false => ("systemd".to_string(), "a source checkout's"),
    }
}

pub async fn run(slack: Option<reqwest::Url>) -> Result<(), DemoError> {
    let started = Instant::now();
    let cancel = CancellationToken::new();
    let state_dir = std::env::temp_dir().join(format!(
        "smee-relay-demo-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    ));
    // Ctrl-C, SIGTERM or the terminal closing (SIGHUP) stops the demo as Ctrl-C stops a relay,
    // and its state directory goes too; a second signal removes the directory before it exits.
    let leftover = state_dir.clone();
    crate::service::systemd::stop_on(
        cancel.clone(),
        crate::service::systemd::Stops {
            hangup: true,
            before_forced_exit: Some(Box::new(move || {
                let _ = std::fs::remove_dir_all(leftover);
            })),
        },
    )
    .map_err(DemoError::Serve)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(DemoError::Serve)?;
    let addr = listener.local_addr().map_err(DemoError::Serve)?;
    let server = tokio::spawn(crate::server::serve(
        listener,
        crate::server::ServeConfig::default(),
        cancel.clone(),
    ));
    let channel = format!("http://{addr}/demo");
    let relay_channel = format!("http://{addr}/demo-relay");
    println!(
        "smee-relay demo: `smee-relay serve` on {addr} is the channel server (in smee.io's place); everything runs on this machine.\n"
    );
    // One client for every POST; all of them go to this machine, never through a proxy.
    let client = crate::http::client_builder()
        .no_proxy()
        .build()
        .map_err(|e| DemoError::Post(e.to_string()))?;
    let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (app, mut saw) = local_app(up.clone()).await.map_err(DemoError::Serve)?;

    let rules = crate::config::parse(
        &format!("[[channel]]\nurl = \"{channel}\"\npipeline = true\n{RULES}"),
        "built-in demo rules",
        &|_| None,
    )
    .expect("the built-in rules are valid")
    .rules;
    let (delivered_tx, mut delivered) = tokio::sync::mpsc::unbounded_channel();
    let (port_api, mut recorded) = fake_port_api().await.map_err(DemoError::Serve)?;
    let slack = match slack {
        Some(url) => Some(
            Forwarder::new(
                url.as_str()
                    .parse()
                    .map_err(|e| DemoError::Post(format!("{e}")))?,
                Duration::from_secs(10),
            )
            .map_err(|e| DemoError::Relay(DaemonError::Target(e)))?,
        ),
        None => None,
    };
    let sink = AlertSink {
        slack,
        stdout: false,
        delivered: Some(delivered_tx),
    };
    // The server keeps what is posted: each source starts from the beginning of its channel.
    let source = |url: &str| {
        let mut source = SourceConfig::new(url.parse().expect("a loopback URL"));
        source.last_event_id = Some("0".into());
        source
    };
    // Made here, not with its parents by the relay: a TMPDIR that does not exist is an error,
    // not a directory left behind.
    std::fs::create_dir(&state_dir).map_err(|e| DemoError::StateDir {
        dir: state_dir.clone(),
        source: e,
    })?;
    let plan = Plan {
        announce: None,
        channels: vec![
            ChannelPlan {
                source: source(&relay_channel),
                forward: vec![app.parse().expect("a loopback URL")],
                pipeline: false,
                save_dir: None,
            },
            ChannelPlan {
                source: source(&channel),
                forward: vec![],
                pipeline: true,
                save_dir: None,
            },
        ],
        pipeline: Some((
            Pipeline {
                rules,
                verifier: None,
                app_url: "https://app.getport.io".into(),
                jq: crate::pipeline::jq::JqEngine::new(Default::default()),
                record_verdicts: false,
            },
            sink,
        )),
        state_dir: state_dir.clone(),
        target_timeout: Duration::from_secs(10),
        retry: RetryPolicy::DEFAULT,
        retain: Duration::from_secs(3600),
        limits: crate::spool::Limits {
            max_bytes: 64 << 20,
        },
        // A few events in a temporary directory: nothing to guard the disk from.
        keep_free: 0,
        metrics_listen: None,
        actions: Some(demo_actions(&port_api)),
        reconcile: None,
        cluster: None,
    };
    let (_no_reloads, reloads) = tokio::sync::mpsc::channel(1);
    let mut relay = tokio::spawn(daemon::run(plan, reloads, cancel.clone()));

    let parts = async {
        relay_part(&client, &relay_channel, &app, &up, &mut saw).await?;
        post_and_collect(&client, &channel, &mut delivered).await?;
        action_run(&client, &channel, &mut recorded).await
    };
    // A relay that ends early (it cannot use its state directory, say) is said at once, not
    // after a part's deadline.
    let mut relayed = None;
    let outcome = tokio::select! {
        outcome = parts => outcome,
        () = cancel.cancelled() => Err(DemoError::Interrupted(crate::error::Stopped(
            "the demo was stopped before it ended (its temporary directory is removed)",
        ))),
        ended = &mut relay => {
            relayed = Some(ended);
            Err(DemoError::RelayEnded)
        }
    };
    cancel.cancel();
    let relayed = match relayed {
        Some(ended) => ended,
        None => relay.await,
    };
    let _ = server.await;
    let _ = std::fs::remove_dir_all(&state_dir);
    if let Ok(Err(e)) = relayed {
        return Err(e.into());
    }
    outcome?;
    println!(
        "{} webhooks relayed unchanged and in order through an outage, {EXPECTED_ALERTS} alerts from 9 changes (FIRING when a rule starts to hold, RESOLVED when it stops, nothing in between) and one action run reported to Port, in {} ms.",
        WEBHOOKS.len(),
        started.elapsed().as_millis()
    );
    // Run by `cargo run` (which sets CARGO), the binary is not on the PATH: the commands say so.
    let me = match std::env::var_os("CARGO") {
        Some(_) => "cargo run --release --",
        None => "smee-relay",
    };
    let (examples, whose) = examples(std::path::Path::new(PACKAGED_EXAMPLES));
    println!(
        "Next: relay your own channel with `{me} forward https://smee.io/YOUR_CHANNEL \
         --port 3000`. For the pipeline and actions, {whose} example config reads its secrets \
         from the environment: `(set -a; . {examples}/smee-relay.env.example; {me} check \
         --config {examples}/config.example.toml)`, then `{me} run --config ...` with your own."
    );
    Ok(())
}

/// Post the sequence, then print alerts as they are delivered until all have come.
async fn post_and_collect(
    client: &reqwest::Client,
    channel: &str,
    delivered: &mut tokio::sync::mpsc::UnboundedReceiver<crate::pipeline::Alert>,
) -> Result<(), DemoError> {
    println!(
        "The pipeline: a DeploymentConfig entity in Port changes 9 times; the example rules alert when its CPU is high or its health degrades.\n"
    );
    for (name, body) in SEQUENCE {
        post(
            client,
            channel,
            &[("x-demo-change", name.to_string())],
            body,
            name,
        )
        .await?;
    }
    // Slack allows about one message a second: six alerts take about six seconds.
    let within = Duration::from_secs(9);
    let deadline = tokio::time::Instant::now() + within;
    let mut got = 0;
    while got < EXPECTED_ALERTS {
        match tokio::time::timeout_at(deadline, delivered.recv()).await {
            Ok(Some(alert)) => {
                got += 1;
                println!("{}", crate::notify::text(&alert));
            }
            _ => return Err(DemoError::Incomplete { got, within }),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (helper-150): the demo's last line named `systemd/config.example.toml` of a
    /// source checkout to a user of the package, which installs it in /etc/smee-relay.
    #[test]
    fn regression_the_next_step_named_a_checkouts_files_to_a_package_user() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            examples(dir.path()),
            ("systemd".to_string(), "a source checkout's")
        );
        std::fs::write(dir.path().join("config.example.toml"), "").unwrap();
        assert_eq!(
            examples(dir.path()),
            (dir.path().display().to_string(), "the package's")
        );
    }
}
