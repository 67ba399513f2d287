//! `smee-relay demo`: the whole product in one process, with no account and no network.
//!
//! It starts `serve` on a free loopback port, subscribes the pipeline to a fresh channel with
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
async fn action_run(channel: &str, recorded: &mut Recorded) -> Result<(), DemoError> {
    use base64::Engine as _;
    use hmac::{KeyInit as _, Mac as _};
    println!(
        "Now a self-service action run: Port's `restart_deployment` button, handled by a local command.\n"
    );
    let timestamp = (crate::clock::now_ms() / 1000).to_string();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(DEMO_SECRET.as_bytes())
        .expect("HMAC takes any key");
    mac.update(format!("{timestamp}.{ACTION_RUN}").as_bytes());
    let signature = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    let client = crate::http::client_builder()
        .build()
        .map_err(|e| DemoError::Post(e.to_string()))?;
    let response = client
        .post(channel)
        .header("content-type", "application/json")
        .header("x-port-timestamp", &timestamp)
        .header("x-port-signature", signature)
        .body(ACTION_RUN)
        .send()
        .await
        .map_err(|e| DemoError::Post(e.without_url().to_string()))?;
    if !response.status().is_success() {
        return Err(DemoError::Post(format!(
            "action run: {}",
            response.status()
        )));
    }
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
pub async fn run(slack: Option<reqwest::Url>) -> Result<(), DemoError> {
    let started = Instant::now();
    let cancel = CancellationToken::new();
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
    println!(
        "smee-relay demo: a channel server on {addr}, the example rules, and a DeploymentConfig entity changing 9 times.\n"
    );

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
    let mut source = SourceConfig::new(channel.parse().expect("a loopback URL"));
    // The server keeps what is posted: start from the beginning of the channel.
    source.last_event_id = Some("0".into());
    let state_dir = std::env::temp_dir().join(format!(
        "smee-relay-demo-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    ));
    let plan = Plan {
        channels: vec![ChannelPlan {
            source,
            forward: vec![],
            pipeline: true,
            save_dir: None,
        }],
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
        metrics_listen: None,
        actions: Some(demo_actions(&port_api)),
        reconcile: None,
        cluster: None,
    };
    let (_no_reloads, reloads) = tokio::sync::mpsc::channel(1);
    let relay = tokio::spawn(daemon::run(plan, reloads, cancel.clone()));

    let mut outcome = post_and_collect(&channel, &mut delivered).await;
    if outcome.is_ok()
        && let Err(e) = action_run(&channel, &mut recorded).await
    {
        outcome = Err(e);
    }
    cancel.cancel();
    let relayed = relay.await;
    let _ = server.await;
    let _ = std::fs::remove_dir_all(&state_dir);
    if let Ok(Err(e)) = relayed {
        return Err(e.into());
    }
    let got = outcome?;
    println!(
        "{got} alerts from 9 changes and one action run reported to Port, in {} ms: FIRING when a rule starts to hold, RESOLVED when it stops, nothing in between.",
        started.elapsed().as_millis()
    );
    println!(
        "Next: the example config reads its secrets from the environment; with the example's \
         values: `(set -a; . systemd/smee-relay.env.example; smee-relay check --config \
         systemd/config.example.toml)`, then `smee-relay run --config ...` with your own."
    );
    Ok(())
}

/// Post the sequence, then print alerts as they are delivered until all have come.
async fn post_and_collect(
    channel: &str,
    delivered: &mut tokio::sync::mpsc::UnboundedReceiver<crate::pipeline::Alert>,
) -> Result<usize, DemoError> {
    let client = crate::http::client_builder()
        .build()
        .map_err(|e| DemoError::Post(e.to_string()))?;
    for (name, body) in SEQUENCE {
        let response = client
            .post(channel)
            .header("content-type", "application/json")
            .header("x-demo-change", name)
            .body(body)
            .send()
            .await
            .map_err(|e| DemoError::Post(e.without_url().to_string()))?;
        if !response.status().is_success() {
            return Err(DemoError::Post(format!("{name}: {}", response.status())));
        }
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
    Ok(got)
}
