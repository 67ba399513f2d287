//! Reconciliation with Port (issue 22): the real binary, a fake channel, a fake Slack and a
//! fake Port API (token, entity listing paged one entity per page, scripted errors). Whatever
//! changed in Port while the relay was stopped or a channel was down is found, alerted once,
//! and marked as found by reconciliation; nothing changed, nothing is sent.

mod support;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::Router;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use support::{FakeChannel, FakeSlack, LogWatch, PATIENCE, smee_relay};

/// What the fake Port holds and how it answers.
#[derive(Default)]
struct PortState {
    /// The DeploymentConfig entities, in listing order.
    entities: Vec<Value>,
    /// Statuses to answer entity listings with before answering properly (with a 429, an
    /// `x-ratelimit-reset` a second away).
    failures: VecDeque<u16>,
    /// Entity pages served (successful listings, one entity each).
    pages: usize,
}

#[derive(Clone)]
struct FakePort {
    addr: std::net::SocketAddr,
    state: Arc<Mutex<PortState>>,
}

type Shared = Arc<Mutex<PortState>>;

impl FakePort {
    async fn start() -> Self {
        let state = Arc::new(Mutex::new(PortState::default()));
        let router = Router::new()
            .route("/v1/auth/access_token", post(token))
            .route("/v1/blueprints/{blueprint}/entities", get(entities))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Self { addr, state }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn with<T>(&self, f: impl FnOnce(&mut PortState) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    /// Set one entity's cpuUtil (adding it if new), as Port would: `updatedAt` moves on.
    fn set_cpu(&self, id: &str, cpu: u32, minute: u32) {
        let entity = json!({
            "identifier": id,
            "title": format!("Service {id}"),
            "blueprint": "DeploymentConfig",
            "properties": {"cpuUtil": cpu, "healthStatus": "Healthy"},
            "relations": {},
            "updatedAt": format!("2026-11-20T10:{minute:02}:00.000Z"),
        });
        self.with(
            |s| match s.entities.iter_mut().find(|e| e["identifier"] == id) {
                Some(old) => *old = entity,
                None => s.entities.push(entity),
            },
        );
    }
}

async fn token(Json(body): Json<Value>) -> Response {
    if body["clientId"] == "test-client" && body["clientSecret"] == "test-secret" {
        Json(json!({"ok": true, "accessToken": "tok-1", "expiresIn": 3600, "tokenType": "Bearer"}))
            .into_response()
    } else {
        (
            StatusCode::UNAUTHORIZED,
            Json(json!({"ok": false, "error": "unauthorized"})),
        )
            .into_response()
    }
}

async fn entities(
    State(state): State<Shared>,
    UrlPath(blueprint): UrlPath<String>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer tok-1") {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"ok": false, "error": "unauthorized"})),
        )
            .into_response();
    }
    let mut state = state.lock().unwrap();
    if let Some(status) = state.failures.pop_front() {
        let status = StatusCode::from_u16(status).unwrap();
        // Port sends the seconds until the reset.
        return (
            status,
            [("x-ratelimit-reset", "1")],
            Json(json!({"ok": false, "error": "scripted", "message": "try later"})),
        )
            .into_response();
    }
    if blueprint != "DeploymentConfig" {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"ok": false, "error": "not_found"})),
        )
            .into_response();
    }
    // One entity per page, so every listing pages.
    let from: usize = query.get("from").and_then(|f| f.parse().ok()).unwrap_or(0);
    state.pages += 1;
    let page: Vec<Value> = state.entities.iter().skip(from).take(1).cloned().collect();
    let mut answer = json!({"ok": true, "entities": page});
    if from + 1 < state.entities.len() {
        answer["next"] = (from + 1).to_string().into();
    }
    Json(answer).into_response()
}

fn write_config(dir: &Path, channel: &str, port: &str) -> PathBuf {
    let path = dir.join("config.toml");
    let rules = include_str!("fixtures/port/rules.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[[channel]]
url = "{channel}"
pipeline = true

[slack]
webhook_url_env = "TEST_SLACK_WEBHOOK"

[port]
client_id = "test-client"
client_secret_env = "TEST_PORT_SECRET"
api_url = "{port}"
reconcile = "1h"

{rules}"#
        ),
    )
    .unwrap();
    path
}

struct Daemon {
    child: tokio::process::Child,
    logs: LogWatch,
    metrics: String,
}

async fn start(config: &Path, state: &Path, slack: &FakeSlack, channel: &FakeChannel) -> Daemon {
    let before = channel.connections();
    let (child, logs) = support::spawn_logged(
        smee_relay()
            .args(["run", "--config"])
            .arg(config)
            .arg("--state-dir")
            .arg(state)
            .args(["--metrics-listen", "127.0.0.1:0"])
            .env("TEST_SLACK_WEBHOOK", slack.webhook_url())
            .env("TEST_PORT_SECRET", "test-secret")
            // Reconnects here come seconds apart; the default spacing (60 s) would slow the
            // test, not change what it checks.
            .env("SMEE_RELAY_RECONCILE_GAP_SPACING", "100ms"),
    );
    let line = logs.wait_for(&["serving /healthz and /metrics"]).await;
    let metrics = line.rsplit("addr=").next().unwrap().trim().to_string();
    channel.wait_connections(before + 1).await;
    Daemon {
        child,
        logs,
        metrics,
    }
}

impl Daemon {
    /// How many snapshots the pipeline has judged so far.
    fn judged(&self) -> usize {
        self.logs
            .all()
            .matches("reconciliation of blueprint DeploymentConfig")
            .count()
    }

    async fn wait_judged(&self, n: usize) {
        support::wait_until(PATIENCE, &format!("{n} snapshots judged"), || {
            self.judged() >= n
        })
        .await;
    }

    async fn metrics(&self) -> String {
        smee_relay::http::client_builder()
            .build()
            .unwrap()
            .get(format!("http://{}/metrics", self.metrics))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    async fn stop(mut self) {
        support::signal(&self.child, "TERM");
        assert_eq!(support::exit_code(&mut self.child).await, Some(0));
    }
}

/// `events list --json` rows of `route`.
async fn rows(state: &Path, route: &str) -> Vec<Value> {
    let out = support::run_to_end(
        smee_relay()
            .args([
                "events",
                "list",
                "--json",
                "--limit",
                "10000",
                "--state-dir",
            ])
            .arg(state),
    )
    .await;
    let rows: Value = serde_json::from_str(&out.stdout).unwrap_or_default();
    rows.as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["route"] == route)
        .cloned()
        .collect()
}

/// Wait until the alert outbox holds `n` alerts, all delivered.
async fn wait_alerts(state: &Path, n: usize) {
    support::wait_for(PATIENCE, &format!("{n} alerts delivered"), || async {
        let alerts = rows(state, "alerts").await;
        (alerts.len() == n && alerts.iter().all(|r| r["status"] == "delivered")).then_some(())
    })
    .await;
}

/// Drop the channel's stream and wait for the relay to reconnect and the reconciliation it
/// asks for to be judged.
async fn reconnect(daemon: &Daemon, channel: &FakeChannel) {
    let (connections, judged) = (channel.connections(), daemon.judged());
    channel.close_all();
    channel.wait_connections(connections + 1).await;
    daemon.wait_judged(judged + 1).await;
}

fn text(request: &support::Received) -> String {
    String::from_utf8_lossy(&request.body).into_owned()
}

#[tokio::test]
async fn missed_changes_are_found_by_reconciliation_once_and_nothing_else_is_sent() {
    let port = FakePort::start().await;
    let channel = FakeChannel::start().await;
    let mut slack = FakeSlack::start().await;
    let dir = support::temp_dir();
    let state = dir.path().join("state");
    let config = write_config(dir.path(), &channel.url("PipelineChannel"), &port.url());
    port.set_cpu("a", 60, 0);
    port.set_cpu("b", 10, 0);

    // A first run learns the state: reconciled once at start (the first connection is folded
    // into it), nothing to say.
    let daemon = start(&config, &state, &slack, &channel).await;
    daemon.wait_judged(1).await;
    daemon.stop().await;
    slack.assert_no_more();
    assert_eq!(
        port.with(|s| s.pages),
        2,
        "two entities, one per page, once"
    );

    // While it is stopped, cpuUtil of a goes from 60 to 95 (the webhook went to nobody).
    port.set_cpu("a", 95, 5);
    let daemon = start(&config, &state, &slack, &channel).await;
    let fired = slack.next().await;
    assert_eq!(support::slack_header(&fired), "FIRING cpu-high: Service a");
    assert!(
        text(&fired)
            .contains("found by reconciliation after a gap: smee-relay was not receiving since"),
        "{}",
        text(&fired)
    );
    daemon.wait_judged(1).await;
    wait_alerts(&state, 1).await;

    // While the channel is down, a goes back to 50 and b goes up to 99: one RESOLVED and one
    // FIRING once it reconnects. (Few reconnects: the relay's backoff grows with each.)
    port.set_cpu("a", 50, 9);
    port.set_cpu("b", 99, 10);
    reconnect(&daemon, &channel).await;
    let found = slack.take(2).await;
    assert_eq!(
        found.iter().map(support::slack_header).collect::<Vec<_>>(),
        ["RESOLVED cpu-high: Service a", "FIRING cpu-high: Service b"]
    );
    assert!(
        text(&found[0]).contains("reconnected, disconnected since"),
        "{}",
        text(&found[0])
    );
    wait_alerts(&state, 3).await;

    // Nothing changed: a reconnect reconciles, and sends nothing.
    reconnect(&daemon, &channel).await;
    wait_alerts(&state, 3).await;
    slack.assert_no_more();

    // b is deleted in Port: it resolves.
    port.with(|s| s.entities.retain(|e| e["identifier"] != "b"));
    reconnect(&daemon, &channel).await;
    let gone = slack.next().await;
    assert_eq!(support::slack_header(&gone), "RESOLVED cpu-high: Service b");
    assert!(
        text(&gone).contains("entity deleted; found by reconciliation"),
        "{}",
        text(&gone)
    );
    wait_alerts(&state, 4).await;
    let metrics = daemon.metrics().await;
    for line in [
        r#"smee_relay_reconciliations_total{result="ok"}"#,
        r#"smee_relay_reconcile_alerts_total{rule="cpu-high",status="FIRING"} 2"#,
        r#"smee_relay_reconcile_alerts_total{rule="cpu-high",status="RESOLVED"} 2"#,
        "smee_relay_reconcile_entities_total",
    ] {
        assert!(metrics.contains(line), "{line} not in:\n{metrics}");
    }
    daemon.stop().await;
    slack.assert_no_more();

    // Port answering 500, then 429, at start: retried (the 429 after its reset) with a clear
    // warning each, the daemon keeps running, and then it reconciles. a went up meanwhile.
    port.with(|s| s.failures.extend([500, 429]));
    port.set_cpu("a", 97, 20);
    let daemon = start(&config, &state, &slack, &channel).await;
    daemon
        .logs
        .wait_for(&["Port reconciliation failed", "answered 500"])
        .await;
    daemon
        .logs
        .wait_for(&["Port reconciliation failed", "answered 429"])
        .await;
    assert_eq!(slack.next_headline().await, "FIRING cpu-high: Service a");
    daemon.wait_judged(1).await;
    wait_alerts(&state, 5).await;
    let metrics = daemon.metrics().await;
    assert!(
        metrics.contains(r#"smee_relay_reconciliations_total{result="error"}"#),
        "{metrics}"
    );

    // The snapshots are in `events list`, with their source.
    let snapshots = rows(&state, "pipeline").await;
    assert!(!snapshots.is_empty());
    assert!(
        snapshots
            .iter()
            .all(|r| r["channel"] == "port-reconciliation" && r["status"] == "delivered"),
        "{snapshots:#?}"
    );
    let table = support::run_to_end(
        smee_relay()
            .args(["events", "list", "--state-dir"])
            .arg(&state),
    )
    .await;
    assert!(
        table.stdout.contains("port-reconciliation")
            && table.stdout.contains("x-port-event=reconciliation"),
        "{}",
        table.stdout
    );
    daemon.stop().await;
    slack.assert_no_more();
}

/// Regression (helper-153): a hold a reconciliation began was not said (a live change's is:
/// `PENDING rule: title: held (for 1h), fires at ...`), so nothing told of it until it fired.
#[tokio::test]
async fn regression_a_hold_begun_by_reconciliation_was_not_said() {
    let port = FakePort::start().await;
    let channel = FakeChannel::start().await;
    let slack = FakeSlack::start().await;
    let dir = support::temp_dir();
    let state = dir.path().join("state");
    let config = write_config(dir.path(), &channel.url("PipelineChannel"), &port.url());
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(
        "\n[[rule]]\nname = \"cpu-held\"\nblueprint = \"DeploymentConfig\"\n\
         property = \"cpuUtil\"\nabove = 80\nfor = \"1h\"\n",
    );
    std::fs::write(&config, text).unwrap();
    port.set_cpu("a", 95, 0);
    let daemon = start(&config, &state, &slack, &channel).await;
    daemon.wait_judged(1).await;
    daemon
        .logs
        .wait_for(&["PENDING cpu-held: Service a: held (for 1h), fires at"])
        .await;
    daemon.stop().await;
}

/// Regression: a reload that restarted the reconciler (its interval changed) cleared the
/// `/healthz` warning of a reconciliation that kept failing, until the new reconciler failed
/// too: meanwhile a relay whose missed alerts wait on Port looked healthy.
#[tokio::test]
async fn regression_a_reload_cleared_the_failing_reconciliation_warning() {
    let port = FakePort::start().await;
    let channel = FakeChannel::start().await;
    let slack = FakeSlack::start().await;
    let dir = support::temp_dir();
    let config = write_config(dir.path(), &channel.url("PipelineChannel"), &port.url());
    port.with(|s| s.failures = std::iter::repeat_n(500, 1_000).collect());
    let daemon = start(&config, &dir.path().join("state"), &slack, &channel).await;
    let client = smee_relay::http::client_builder().build().unwrap();
    let warned = || {
        let request = client.get(format!("http://{}/healthz", daemon.metrics));
        async move {
            let body = request.send().await.ok()?.text().await.ok()?;
            body.contains("Port reconciliation failing for")
                .then_some(())
        }
    };
    support::wait_for(PATIENCE, "the failing reconciliation on /healthz", &warned).await;
    // Reload with `reconcile` set to `value`; wait for the reload line to say `said`.
    let text = std::fs::read_to_string(&config).unwrap();
    let reload = |value: &str, said: &'static str| {
        let with = text.replace(r#"reconcile = "1h""#, &format!("reconcile = {value:?}"));
        std::fs::write(&config, with).unwrap();
        support::signal(&daemon.child, "HUP");
        let logs = &daemon.logs;
        async move { logs.wait_for(&["config reloaded", said]).await }
    };
    // A new interval restarts the reconciler, which waits before its first try.
    reload("2h", "Port reconciliation every 2h").await;
    assert!(
        warned().await.is_some(),
        "nothing has gone through since: still failing"
    );
    // Reconciliation turned off: nothing is failing any more.
    reload("off", "Port reconciliation off").await;
    assert!(warned().await.is_none(), "reconciliation is off");
    daemon.stop().await;
}

#[tokio::test]
async fn check_refuses_a_reconcile_interval_under_a_minute() {
    let dir = support::temp_dir();
    let path = write_config(dir.path(), "http://127.0.0.1:1/c", "http://127.0.0.1:1");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("reconcile = \"1h\"", "reconcile = \"30s\"");
    std::fs::write(&path, text).unwrap();
    let out = support::run_to_end(
        smee_relay()
            .args(["check", "--config"])
            .arg(&path)
            .env("TEST_SLACK_WEBHOOK", "http://127.0.0.1:1/hook")
            .env("TEST_PORT_SECRET", "test-secret"),
    )
    .await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains(
            "config.toml:13: [port] reconcile = \"30s\" is shorter than the 1 minute minimum"
        ),
        "{}",
        out.stderr
    );

    // "off" is accepted and says nothing of reconciliation; the default says 15m.
    for (value, says) in [("\"off\"", None), ("\"2m\"", Some("every 2m"))] {
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("reconcile = \"30s\"", &format!("reconcile = {value}"));
        std::fs::write(&path, &text).unwrap();
        let out = support::run_to_end(
            smee_relay()
                .args(["check", "--config"])
                .arg(&path)
                .env("TEST_SLACK_WEBHOOK", "http://127.0.0.1:1/hook")
                .env("TEST_PORT_SECRET", "test-secret"),
        )
        .await;
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        match says {
            Some(says) => assert!(
                out.stdout.contains(&format!("Port reconciliation {says}")),
                "{}",
                out.stdout
            ),
            None => assert!(!out.stdout.contains("reconciliation"), "{}", out.stdout),
        }
        std::fs::write(
            &path,
            text.replace(&format!("reconcile = {value}"), "reconcile = \"30s\""),
        )
        .unwrap();
    }
    // Regression: with reconcile set but no rule naming a blueprint, check said it reconciled.
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("reconcile = \"30s\"", "reconcile = \"2m\"")
        .replace("blueprint = \"DeploymentConfig\"", "");
    std::fs::write(&path, &text).unwrap();
    let out = support::run_to_end(
        smee_relay()
            .args(["check", "--config"])
            .arg(&path)
            .env("TEST_SLACK_WEBHOOK", "http://127.0.0.1:1/hook")
            .env("TEST_PORT_SECRET", "test-secret"),
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout.contains("not active: no rule names a blueprint"),
        "{}",
        out.stdout
    );
}

/// A cluster instance with `[port]` reconciliation, started and joined.
async fn join_cluster(
    config: &str,
    channel: &FakeChannel,
    env: &[(&str, &str)],
) -> (tokio::process::Child, LogWatch, tempfile::TempDir) {
    let dir = support::temp_dir();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config).unwrap();
    let before = channel.connections();
    let mut command = smee_relay();
    command
        .args(["run", "--config"])
        .arg(&path)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("TEST_PORT_SECRET", "test-secret")
        .env(
            "RUST_LOG",
            "info,smee_relay::cluster=debug,smee_relay::pipeline::runner=debug",
        );
    for (k, v) in env {
        command.env(k, v);
    }
    let (child, logs) = support::spawn_logged(&mut command);
    logs.wait_for(&["joined the cluster"]).await;
    channel.wait_connections(before + 1).await;
    (child, logs, dir)
}

/// Regression (adv3 review, finding 1): instance A judged a live FIRING (its alert-state write
/// landed, its record with it) and has not published it yet (its publish is held); B starts
/// and reconciles against Port's newer state, back to normal. B sent the RESOLVED at once,
/// and A's FIRING (its own publish, or a takeover's re-send) followed it: Slack said RESOLVED
/// then FIRING, and the entity looked FIRING for good. A judgement now queues the entity's
/// earlier recorded alerts (under their own names) before its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconciliation_does_not_overtake_a_live_firing_not_yet_published() {
    use support::nats::{FAILOVER_PATIENCE, NatsServer};
    let nats = NatsServer::start().await;
    let port = FakePort::start().await;
    let channel = FakeChannel::start().await;
    let mut slack = FakeSlack::start().await;
    let config = format!(
        "{}\n[port]\nclient_id = \"test-client\"\nclient_secret_env = \"TEST_PORT_SECRET\"\napi_url = \"{}\"\nreconcile = \"1h\"\n",
        support::nats::alerts_config(&channel.url("ch"), &slack.webhook_url(), &nats.url, "recon"),
        port.url()
    );
    let hold = support::nats::HeldFault::new("hold-alert-publish");
    let (_a, a_logs, _a_dir) = join_cluster(&config, &channel, &hold.env()).await;
    // Port knows no entity yet: A's reconciliation at start finds nothing.
    a_logs
        .wait_for(&["reconciliation of blueprint DeploymentConfig"])
        .await;

    // With Port credentials the pipeline checks signatures: signed as Port signs.
    let change = |file: &str| signed_port_frame(&support::port_fixture("automation", file));
    channel.send_webhook(1, &change("01-create"));
    channel.send_webhook(2, &change("02-cpu-25-to-87"));
    // Committed on A (its alert-state write landed first), its publish held.
    a_logs.wait_for(&["FIRING cpu-high"]).await;

    // Meanwhile Port's entity went back to 25 (after the change A judged): B reconciles.
    port.set_cpu("notification-service-prod", 25, 5);
    let (_b, b_logs, _b_dir) = join_cluster(&config, &channel, &[]).await;
    b_logs
        .wait_for(&["reconciliation of blueprint DeploymentConfig"])
        .await;

    let mut next = async |what: &str| {
        let Some(request) = slack.try_next(FAILOVER_PATIENCE).await else {
            panic!("no {what} reached Slack within {FAILOVER_PATIENCE:?}");
        };
        support::slack_header(&request)
    };
    let first = next("the first alert").await;
    assert!(
        first.starts_with("FIRING cpu-high"),
        "the FIRING first, not the RESOLVED that ends it: {first:?}\nB:\n{}",
        b_logs.all()
    );
    let second = next("the second alert").await;
    assert!(second.starts_with("RESOLVED cpu-high"), "{second:?}");
    // A's publish goes on: a repeat the stream drops.
    hold.release();
    slack.assert_quiet(std::time::Duration::from_secs(4)).await;
}

/// Regression (adv3 review, finding 1, the crash variant): instance A judged a live FIRING and
/// died right after its alert-state write landed (nothing published); B starts and
/// reconciles against Port's newer state. B sent the RESOLVED at once and the FIRING only
/// when it took A's event over, an ack wait later: RESOLVED then FIRING. Now B's
/// reconciliation queues A's recorded FIRING (under its name) before its RESOLVED, and the
/// takeover's re-send is a repeat the stream drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconciliation_after_a_crash_after_the_write_sends_the_firing_first() {
    use support::nats::{FAILOVER_PATIENCE, NatsServer};
    let nats = NatsServer::start().await;
    let port = FakePort::start().await;
    let channel = FakeChannel::start().await;
    let mut slack = FakeSlack::start().await;
    // A long ack wait: B's reconciliation at start comes well before it takes A's event over.
    let cluster = support::nats::alerts_config(
        &channel.url("ch"),
        &slack.webhook_url(),
        &nats.url,
        "reconcrash",
    )
    .replace("ack_wait = \"2s\"", "ack_wait = \"10s\"");
    assert!(cluster.contains("ack_wait = \"10s\""), "{cluster}");
    let config = format!(
        "{cluster}\n[port]\nclient_id = \"test-client\"\nclient_secret_env = \"TEST_PORT_SECRET\"\napi_url = \"{}\"\nreconcile = \"1h\"\n",
        port.url()
    );
    let (mut a, a_logs, _a_dir) = join_cluster(
        &config,
        &channel,
        &[("SMEE_RELAY_FAULT", "abort-after-alert-state-write")],
    )
    .await;
    a_logs
        .wait_for(&["reconciliation of blueprint DeploymentConfig"])
        .await;
    let change = |file: &str| signed_port_frame(&support::port_fixture("automation", file));
    channel.send_webhook(1, &change("01-create"));
    channel.send_webhook(2, &change("02-cpu-25-to-87"));
    a_logs
        .wait_for(&["fault injected: abort after the alert-state write"])
        .await;
    a.wait().await.unwrap();

    port.set_cpu("notification-service-prod", 25, 5);
    let (_b, b_logs, _b_dir) = join_cluster(&config, &channel, &[]).await;
    let mut next = async |what: &str| {
        let Some(request) = slack.try_next(FAILOVER_PATIENCE).await else {
            panic!("no {what} reached Slack within {FAILOVER_PATIENCE:?}");
        };
        support::slack_header(&request)
    };
    let first = next("the first alert").await;
    assert!(
        first.starts_with("FIRING cpu-high"),
        "the FIRING first, not the RESOLVED that ends it: {first:?}\nB:\n{}",
        b_logs.all()
    );
    let second = next("the second alert").await;
    assert!(second.starts_with("RESOLVED cpu-high"), "{second:?}");
    // B takes A's event over (an ack wait later): its re-send is a repeat the stream drops.
    b_logs
        .wait_for(&["took over another instance's judgement"])
        .await;
    slack.assert_quiet(std::time::Duration::from_secs(3)).await;
}

/// A smee frame carrying a Port change signed with the test's client secret.
fn signed_port_frame(body: &str) -> String {
    use base64::Engine as _;
    use hmac::{KeyInit as _, Mac as _};
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"test-secret").unwrap();
    mac.update(format!("{timestamp}.{body}").as_bytes());
    let signature = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    format!(
        r#"{{"x-port-timestamp":"{timestamp}","x-port-signature":"{signature}","content-type":"application/json","body":{body}}}"#
    )
}
