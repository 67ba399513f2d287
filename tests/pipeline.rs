//! The Port pipeline end to end: the real binary with `run --config`, a fake channel sending
//! the DeploymentConfig fixtures, and a fake Slack.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use hmac::{KeyInit, Mac};
use support::{FakeChannel, FakeSlack, FakeTarget, LogWatch, SLACK_PATH, smee_relay};

/// The fixture names, in order.
fn files() -> Vec<&'static str> {
    smee_relay::commands::demo::SEQUENCE
        .iter()
        .map(|(name, _)| *name)
        .collect()
}

use support::{port_fixture as fixture, slack_header as header};

/// A smee frame carrying `body` with these headers.
fn frame(body: &str, headers: &[(&str, &str)]) -> String {
    let mut fields: Vec<String> = headers
        .iter()
        .map(|(k, v)| format!("{}:{}", serde_json::json!(k), serde_json::json!(v)))
        .collect();
    fields.push(r#""content-type":"application/json""#.into());
    fields.push(format!(r#""body":{body}"#));
    format!("{{{}}}", fields.join(","))
}

fn sign(secret: &str, timestamp: &str, body: &str) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.{body}").as_bytes());
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// The time now as Port stamps a signature: seconds since the epoch.
fn now_secs() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string()
}

/// The headers of a body signed at `timestamp` with `signature`.
fn signed<'a>(timestamp: &'a str, signature: &'a str) -> [(&'static str, &'a str); 2] {
    [
        ("x-port-timestamp", timestamp),
        ("x-port-signature", signature),
    ]
}

fn write_config(dir: &Path, channel: &str, extra: &str) -> PathBuf {
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

{extra}

{rules}"#
        ),
    )
    .unwrap();
    path
}

struct Daemon {
    child: tokio::process::Child,
    logs: LogWatch,
    state_dir: PathBuf,
}

/// Wait until the daemon has evaluated (or rejected) `events` events and delivered `alerts`
/// alerts, as its spool records them, then stop it: Slack must have had nothing beyond what the
/// test took, and the spool must hold exactly `alerts` alerts, all delivered.
async fn stop_when_done(
    daemon: Daemon,
    slack: &mut FakeTarget,
    events: usize,
    alerts: usize,
) -> LogWatch {
    // A route's rows in the spool, and how many of them have one of `done`'s statuses.
    let account = |rows: &serde_json::Value, route: &str, done: &[&str]| -> (usize, usize) {
        let rows: Vec<_> = rows
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["route"] == route)
            .collect();
        let finished = rows
            .iter()
            .filter(|r| done.iter().any(|d| r["status"] == *d))
            .count();
        (rows.len(), finished)
    };
    let state_dir = daemon.state_dir.clone();
    let list = || list_events(&state_dir);
    let what = format!("{events} events evaluated and {alerts} alerts delivered");
    support::wait_for(support::PATIENCE, &what, || async {
        let rows = list().await;
        let evaluated = account(&rows, "pipeline", &["delivered", "dead"]);
        let sent = account(&rows, "alerts", &["delivered"]);
        (evaluated == (events, events) && sent.1 >= alerts).then_some(())
    })
    .await;
    let logs = stop(daemon).await;
    slack.assert_no_more();
    assert_eq!(
        account(&list().await, "alerts", &["delivered"]),
        (alerts, alerts),
        "alerts in the spool"
    );
    logs
}

/// `events list --json` of `state_dir`: one row per (event, route); null if it failed.
async fn list_events(state_dir: &Path) -> serde_json::Value {
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
            .arg(state_dir),
    )
    .await;
    serde_json::from_str::<serde_json::Value>(&out.stdout).unwrap_or_default()
}

async fn start(config: &Path, state_dir: &Path, slack: &str, channel: &FakeChannel) -> Daemon {
    let before = channel.connections();
    let (child, logs) = support::spawn_logged(
        smee_relay()
            .args(["run", "--config"])
            .arg(config)
            .arg("--state-dir")
            .arg(state_dir)
            .env("TEST_SLACK_WEBHOOK", slack)
            .env("TEST_PORT_SECRET", "test-secret"),
    );
    channel.wait_connections(before + 1).await;
    logs.wait_for(&["connected to channel"]).await;
    Daemon {
        child,
        logs,
        state_dir: state_dir.to_owned(),
    }
}

/// A fake channel, a fake Slack, and the daemon running the fixture rules (plus `extra`).
async fn setup(extra: &str) -> (FakeChannel, FakeSlack, Daemon) {
    let channel = FakeChannel::start().await;
    let slack = FakeSlack::start().await;
    let dir = support::fresh_state_dir();
    let config = write_config(&dir, &channel.url("PipelineChannel"), extra);
    let daemon = start(&config, &dir.join("state"), &slack.webhook_url(), &channel).await;
    (channel, slack, daemon)
}

async fn stop(mut daemon: Daemon) -> LogWatch {
    support::signal(&daemon.child, "TERM");
    assert_eq!(support::exit_code(&mut daemon.child).await, Some(0));
    daemon.logs
}

#[tokio::test]
async fn the_fixture_sequence_sends_exactly_the_documented_alerts_in_both_shapes() {
    for shape in ["legacy", "automation"] {
        let (channel, mut slack, daemon) = setup("").await;

        for (n, file) in files().iter().enumerate() {
            channel.send_webhook(n as u64 + 1, &frame(&fixture(shape, file), &[]));
        }
        let got = slack.headlines(6).await;
        assert_eq!(got, smee_relay::commands::demo::EXPECTED, "{shape}");
        let logs = stop_when_done(daemon, &mut slack, files().len(), 6).await;
        assert!(
            !logs.all().contains("SECRET"),
            "the Slack webhook URL must never be logged"
        );
    }
}

#[tokio::test]
async fn the_slack_message_carries_what_people_need() {
    let (channel, mut slack, _daemon) = setup("").await;

    channel.send_webhook(1, &frame(&fixture("automation", "02-cpu-25-to-87"), &[]));
    let request = slack.next().await;
    assert_eq!(request.uri, SLACK_PATH);
    assert_eq!(request.header("content-type"), Some("application/json"));
    let text = String::from_utf8_lossy(&request.body).into_owned();
    let message: serde_json::Value = serde_json::from_str(&text).unwrap();
    let fallback = message["text"].as_str().unwrap();
    assert!(
        fallback.starts_with("FIRING cpu-high: Notification Service Production"),
        "{fallback}"
    );
    assert!(fallback.contains("cpuUtil 25 → 87"), "{fallback}");
    for needle in [
        "app.getport.io/DeploymentConfigEntity?identifier=notification-service-prod",
        "DeploymentConfig",
        "25 → 87",
        "above 80 (clears below 70)",
        "warning",
        "h2Mf13aRSCYQCUPIcqufoP4XRLwAt8Od@clients",
        "2026-11-20T10:01:00.000Z",
        r#""url":"https://newrelic.com""#,
        r#""url":"https://sentry.io/""#,
        r##""color":"#ecb22e""##,
    ] {
        assert!(text.contains(needle), "{needle} missing from {text}");
    }
}

/// Regression (an adversary's finding): a signed Port event that is valid JSON beyond what the
/// parser takes (a number past f64, nesting past 128) was dropped with a DEBUG line: its rules
/// silently never judged it. It is a WARN naming the limit; the event is still forwarded.
/// And (helper-138) `events list` showed it delivered to the pipeline with 200, as if judged:
/// it is a dead letter of the pipeline route, naming the limit. So is (helper-146) a body Port
/// signed that is not JSON at all: it went by as another sender's, listed delivered.
#[tokio::test]
async fn regression_a_port_event_beyond_the_json_limits_is_a_warning_not_silence() {
    let (channel, mut slack, daemon) =
        setup("[port]\nclient_secret_env = \"TEST_PORT_SECRET\"\n").await;
    let now = now_secs();
    let huge =
        fixture("automation", "02-cpu-25-to-87").replace("\"cpuUtil\":87", "\"cpuUtil\":1e309");
    let deep = format!(
        r#"{{"action":"UPDATE","x":{}1{}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    for (id, body) in [(1, &huge), (2, &deep)] {
        let signature = sign("test-secret", &now, body);
        channel.send_webhook(id, &frame(body, &signed(&now, &signature)));
    }
    let text = "not JSON {";
    let signature = sign("test-secret", &now, text);
    channel.send_webhook(
        3,
        &format!(
            r#"{{"x-port-timestamp":"{now}","x-port-signature":"{signature}","content-type":"text/plain","rawdata":{}}}"#,
            serde_json::json!(text)
        ),
    );
    daemon
        .logs
        .wait_for(&["WARN", "event=1", "number out of range"])
        .await;
    daemon
        .logs
        .wait_for(&["WARN", "event=2", "recursion limit exceeded"])
        .await;
    daemon
        .logs
        .wait_for(&[
            "WARN",
            "event=3",
            "signed by Port, yet the body is not JSON",
        ])
        .await;
    let state_dir = daemon.state_dir.clone();
    let logs = stop_when_done(daemon, &mut slack, 3, 0).await;
    for id in ["event=1", "event=2"] {
        assert!(
            logs.find(&["WARN", id, "not JSON"]).is_none(),
            "{}",
            logs.all()
        );
    }
    let rows = list_events(&state_dir).await;
    let pipeline: Vec<_> = (rows.as_array().into_iter().flatten())
        .filter(|row| row["route"] == "pipeline")
        .map(|row| {
            (
                row["id"].clone(),
                row["status"].clone(),
                row["last_error"].clone(),
            )
        })
        .collect();
    assert_eq!(pipeline.len(), 3, "{rows}");
    for ((id, status, error), limit) in pipeline.iter().zip([
        "number out of range",
        "recursion limit exceeded",
        "signed by Port, yet the body is not JSON",
    ]) {
        assert_eq!(status, "dead", "event {id}: {rows}");
        let error = error.as_str().unwrap_or_default();
        assert!(
            error.starts_with("not judged: ") && error.contains(limit),
            "event {id}: {error}"
        );
    }
}

/// Regression (helper-146): an action run on an entity (resourceType `run`) counted as the
/// entity's latest change, at its trigger's time: every later change of the entity stamped
/// before the run was dropped as older ("the newer one stands and no alert is sent"), and the
/// alert never resolved. A run is no change of its entity's state.
#[tokio::test]
async fn regression_an_action_run_muted_the_entitys_later_changes() {
    let (channel, mut slack, daemon) = setup("").await;
    channel.send_webhook(1, &frame(&fixture("automation", "01-create"), &[]));
    channel.send_webhook(2, &frame(&fixture("automation", "02-cpu-25-to-87"), &[]));
    assert_eq!(
        header(&slack.next().await),
        "FIRING cpu-high: Notification Service Production"
    );
    let run = std::fs::read_to_string(format!(
        "{}/tests/fixtures/port/actions/01-legacy-run-message.json",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    assert!(run.contains(r#""resourceType":"run""#) && run.contains("2026-11-20T11:00:00"));
    channel.send_webhook(3, &frame(&run, &[]));
    // Stamped 10:05, before the run's 11:00.
    // (Its health reads Degraded too: the unhealthy rule's first sight of it.)
    channel.send_webhook(4, &frame(&fixture("automation", "06-cpu-75-to-60"), &[]));
    assert_eq!(
        slack.headlines(2).await,
        [
            "RESOLVED cpu-high: Notification Service Production",
            "FIRING unhealthy: Notification Service Production"
        ]
    );
    let logs = stop_when_done(daemon, &mut slack, 4, 3).await;
    assert!(
        logs.find(&["the newer one stands"]).is_none(),
        "{}",
        logs.all()
    );
}

/// Regression (helper-153): `smee_relay_alerts_total{rule,status}` appeared with a rule's
/// first alert, so an alert on its `increase()` never saw that one. Each rule's series is there
/// at 0 from the start.
#[tokio::test]
async fn regression_alerts_total_was_absent_until_the_first_alert() {
    let channel = FakeChannel::start().await;
    let slack = FakeTarget::start().await;
    let dir = support::fresh_state_dir();
    let (daemon, addr) = start_with_metrics(&dir, &channel, &slack, "").await;
    for status in ["FIRING", "RESOLVED"] {
        let wanted = format!("smee_relay_alerts_total{{rule=\"cpu-high\",status=\"{status}\"}} 0");
        support::wait_for(support::PATIENCE, &wanted, || async {
            metrics_of(&addr).await.contains(&wanted).then_some(())
        })
        .await;
    }
    stop(daemon).await;
}

/// Regression (helper-146): rejected signatures were only logged: a wrong client secret,
/// rejecting every Port event, showed nowhere in `/metrics`.
#[tokio::test]
async fn regression_rejected_signatures_were_not_counted() {
    let channel = FakeChannel::start().await;
    let slack = FakeTarget::start().await;
    let dir = support::fresh_state_dir();
    let extra = "[port]\nclient_secret_env = \"TEST_PORT_SECRET\"\n";
    let (daemon, addr) = start_with_metrics(&dir, &channel, &slack, extra).await;
    for id in 1..=2 {
        channel.send_webhook(id, &frame(&fixture("automation", "02-cpu-25-to-87"), &[]));
    }
    let wanted = "smee_relay_pipeline_refused_total{reason=\"signature\"} 2";
    support::wait_for(support::PATIENCE, wanted, || async {
        metrics_of(&addr).await.contains(wanted).then_some(())
    })
    .await;
    stop(daemon).await;
}

/// The daemon on `channel` with the rules and `extra`, serving `/metrics`: it, and where.
async fn start_with_metrics(
    dir: &Path,
    channel: &FakeChannel,
    slack: &FakeTarget,
    extra: &str,
) -> (Daemon, String) {
    let config = write_config(dir, &channel.url("PipelineChannel"), extra);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("metrics_listen = \"127.0.0.1:0\"\n{text}")).unwrap();
    let daemon = start(&config, &dir.join("state"), &slack.url(SLACK_PATH), channel).await;
    let line = daemon
        .logs
        .wait_for(&["serving /healthz and /metrics"])
        .await;
    let addr = line.rsplit("addr=").next().unwrap().trim().to_string();
    (daemon, addr)
}

/// `/metrics` at `addr` (empty if it did not answer).
async fn metrics_of(addr: &str) -> String {
    let client = smee_relay::http::client_builder().build().unwrap();
    match client.get(format!("http://{addr}/metrics")).send().await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

#[tokio::test]
async fn signed_events_pass_and_a_tampered_one_is_rejected() {
    let (channel, mut slack, daemon) =
        setup("[port]\nclient_secret_env = \"TEST_PORT_SECRET\"\n").await;
    let now = now_secs();

    // Tampered: signed, then the cpu value changed. Rejected, so no FIRING.
    let body = fixture("automation", "02-cpu-25-to-87");
    let signature = sign("test-secret", &now, &body);
    let tampered = body.replace("\"cpuUtil\":87", "\"cpuUtil\":99");
    let headers = signed(&now, &signature);
    channel.send_webhook(1, &frame(&tampered, &headers));
    daemon.logs.wait_for(&["rejected", "does not match"]).await;
    // Unsigned: rejected too.
    channel.send_webhook(2, &frame(&body, &[]));
    daemon
        .logs
        .wait_for(&["rejected", "no x-port-signature"])
        .await;
    // Signed and intact: evaluated.
    channel.send_webhook(3, &frame(&body, &headers));
    assert_eq!(
        header(&slack.next().await),
        "FIRING cpu-high: Notification Service Production"
    );
    let logs = stop_when_done(daemon, &mut slack, 3, 1).await;
    assert!(!logs.all().contains("test-secret"));
}

#[tokio::test]
async fn slack_429_waits_for_retry_after_and_sends_once() {
    let (channel, mut slack, daemon) = setup("").await;
    slack.answer_with_retry_after(429, 1);

    channel.send_webhook(1, &frame(&fixture("legacy", "02-cpu-25-to-87"), &[]));
    let first = slack.next().await;
    let refused_at = std::time::Instant::now();
    let second = slack.next().await;
    assert!(refused_at.elapsed() >= Duration::from_millis(900));
    assert_eq!(header(&first), header(&second));
    daemon.logs.wait_for(&["slack -> 200"]).await;
    stop_when_done(daemon, &mut slack, 1, 1).await;
}

#[tokio::test]
async fn a_restart_neither_realerts_nor_forgets() {
    let channel = FakeChannel::start().await;
    let mut slack = FakeSlack::start().await;
    let dir = support::temp_dir();
    let dir = dir.path();
    let state = dir.join("state");
    let config = write_config(dir, &channel.url("PipelineChannel"), "");
    let webhook = slack.webhook_url();

    let daemon = start(&config, &state, &webhook, &channel).await;
    for (n, file) in files()[..2].iter().enumerate() {
        channel.send_webhook(n as u64 + 1, &frame(&fixture("legacy", file), &[]));
    }
    assert_eq!(
        slack.next_headline().await,
        "FIRING cpu-high: Notification Service Production"
    );
    stop_when_done(daemon, &mut slack, 2, 1).await;

    let daemon = start(&config, &state, &webhook, &channel).await;
    for (n, file) in files()[2..6].iter().enumerate() {
        channel.send_webhook(n as u64 + 10, &frame(&fixture("legacy", file), &[]));
    }
    let got = slack.headlines(2).await;
    assert_eq!(
        got,
        [
            "FIRING unhealthy: Notification Service Production",
            "RESOLVED cpu-high: Notification Service Production"
        ]
    );
    // Over both runs: six events evaluated once each, three alerts in all.
    stop_when_done(daemon, &mut slack, 6, 3).await;
}

#[tokio::test]
async fn check_validates_and_explains() {
    let dir = support::temp_dir();
    let config = write_config(dir.path(), "https://smee.io/abc", "");
    let run = |args: Vec<String>| async move {
        let out = support::run_to_end(
            smee_relay()
                .env(
                    "TEST_SLACK_WEBHOOK",
                    "https://hooks.slack.com/services/T/B/X",
                )
                .args(args),
        )
        .await;
        (out.code, out.stdout, out.stderr)
    };
    let config_arg = config.display().to_string();
    let (code, stdout, _) = run(vec!["check".into(), "--config".into(), config_arg.clone()]).await;
    assert_eq!(code, Some(0));
    assert!(stdout.contains("ok (1 channel, 2 rules)"), "{stdout}");

    let event = format!(
        "{}/tests/fixtures/port/deployment-config/automation/04-health-healthy-to-degraded.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let (code, stdout, _) = run(vec![
        "check".into(),
        "--config".into(),
        config_arg.clone(),
        "--event".into(),
        event,
    ])
    .await;
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains("healthStatus: Healthy -> Degraded"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "rule unhealthy: would send\nFIRING unhealthy: Notification Service Production"
        ),
        "{stdout}"
    );
    // From no alert, cpuUtil 91 is above 80 too.
    assert!(
        stdout.contains("rule cpu-high: would send\nFIRING cpu-high"),
        "{stdout}"
    );

    // Regression (helper-117): a "transition" written over `.diff` passed `check` and never
    // held (`when` sees the entity after the change). It is a warning now.
    let good = std::fs::read_to_string(&config).unwrap();
    let transition = format!(
        "{good}\n[[rule]]\nname = \"went-bad\"\nwhen = '.diff.before.properties.healthStatus == \"Healthy\" and .properties.healthStatus == \"Degraded\"'\n"
    );
    std::fs::write(&config, transition).unwrap();
    let (code, stdout, _) = run(vec!["check".into(), "--config".into(), config_arg.clone()]).await;
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains("warning: rule \"went-bad\": `when` reads .diff, which it is never given"),
        "{stdout}"
    );
    let broken = good.replace(
        "not_in = [\"Healthy\"]",
        "not_in = [\"Healthy\"]\nwhen = '.x =='",
    );
    std::fs::write(&config, broken).unwrap();
    let (code, _, stderr) = run(vec!["check".into(), "--config".into(), config_arg]).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("config.toml:") && stderr.contains("give only one of"),
        "{stderr}"
    );
}

/// The daemon in `dir` with one rule, `cpu-high` above 80 held `hold`, on `channel`.
async fn start_holding(
    dir: &Path,
    hold: &str,
    channel: &FakeChannel,
    slack: &FakeTarget,
) -> Daemon {
    let config = dir.join("held.toml");
    std::fs::write(
        &config,
        format!(
            "[[channel]]\nurl = \"{}\"\npipeline = true\n[slack]\nwebhook_url_env = \"TEST_SLACK_WEBHOOK\"\n\
             [[rule]]\nname = \"cpu-high\"\nproperty = \"cpuUtil\"\nabove = 80\nfor = \"{hold}\"\n",
            channel.url("HeldChannel")
        ),
    )
    .unwrap();
    start(&config, &dir.join("state"), &slack.url(SLACK_PATH), channel).await
}

/// A daemon in `dir` holding `cpu-high` for an hour: fixture 02 sent, its PENDING said.
async fn holding_an_alert(dir: &Path) -> (FakeChannel, FakeTarget, Daemon) {
    let channel = FakeChannel::start().await;
    let slack = FakeTarget::start().await;
    let daemon = start_holding(dir, "1h", &channel, &slack).await;
    channel.send_webhook(1, &frame(&fixture("automation", "02-cpu-25-to-87"), &[]));
    daemon
        .logs
        .wait_for(&["PENDING cpu-high", "fires at"])
        .await;
    (channel, slack, daemon)
}

#[tokio::test]
async fn for_holds_the_alert_and_then_fires_it() {
    let channel = FakeChannel::start().await;
    let mut slack = FakeTarget::start().await;
    let dir = support::temp_dir();
    let _daemon = start_holding(dir.path(), "2s", &channel, &slack).await;

    let sent_at = std::time::Instant::now();
    channel.send_webhook(1, &frame(&fixture("automation", "02-cpu-25-to-87"), &[]));
    let request = slack.next().await;
    assert!(
        sent_at.elapsed() >= Duration::from_secs(2),
        "fired after {:?}",
        sent_at.elapsed()
    );
    assert_eq!(
        header(&request),
        "FIRING cpu-high: Notification Service Production"
    );
    assert!(String::from_utf8_lossy(&request.body).contains("held for 2s"));
}

/// Regression (helper-140): a stop while an alert was held said "nothing waits: everything
/// received was delivered", and nothing of the hold.
#[tokio::test]
async fn regression_a_stop_said_nothing_of_a_held_alert() {
    let dir = support::temp_dir();
    let (_channel, _slack, daemon) = holding_an_alert(dir.path()).await;
    let logs = stop(daemon).await;
    let line = logs.wait_for(&["stopped;"]).await;
    assert!(
        line.contains("1 alert is held (`for`): its hold goes on at the next start"),
        "{line}"
    );
}

/// Regression (helper-157): a hold said "fires at ... unless a change ends it first", and a
/// change that ended it was said nowhere.
#[tokio::test]
async fn regression_a_hold_that_ended_unfired_was_not_said() {
    let dir = support::temp_dir();
    let (channel, _slack, daemon) = holding_an_alert(dir.path()).await;
    channel.send_webhook(2, &frame(&fixture("automation", "06-cpu-75-to-60"), &[]));
    daemon
        .logs
        .wait_for(&["held alert cpu-high: Notification Service Production ends without firing"])
        .await;
    stop(daemon).await;
}

/// The fixture's signature vector for `file` (under tests/fixtures/port): its timestamp (s)
/// and signature.
fn vector(file: &str) -> (String, String) {
    let vectors: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/port/signatures.json")).unwrap();
    let v = vectors["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["file"] == file)
        .unwrap();
    (
        v["x-port-timestamp"].as_str().unwrap().to_string(),
        v["x-port-signature"].as_str().unwrap().to_string(),
    )
}

/// `frame` with the channel server's receive time, as smee.io puts it in every frame.
fn frame_at(body: &str, headers: &[(&str, &str)], timestamp_ms: u64) -> String {
    let frame = frame(body, headers);
    format!(
        "{},\"timestamp\":{timestamp_ms}}}",
        frame.strip_suffix('}').unwrap()
    )
}

/// Item 5: the signature's age was judged when the pipeline evaluated, so a signed event that
/// reached the channel in time but was evaluated after the tolerance (a backlog, an outage, a
/// replay) was rejected for good. The fixture vectors were signed in 2024: their frames say
/// the channel received them 2 s later, and they verify; the same body posted afresh does not.
#[tokio::test]
async fn signature_age_is_judged_against_the_channels_receive_time() {
    let (channel, mut slack, daemon) =
        setup("[port]\nclient_secret_env = \"TEST_PORT_SECRET\"\n").await;
    let file = "deployment-config/automation/02-cpu-25-to-87.json";
    let (timestamp, signature) = vector(file);
    let headers = [
        ("x-port-timestamp", timestamp.as_str()),
        ("x-port-signature", signature.as_str()),
    ];
    let body = fixture("automation", "02-cpu-25-to-87");
    let signed_ms = timestamp.parse::<u64>().unwrap() * 1000;

    // Posted afresh now (a captured request replayed to the channel): rejected.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    channel.send_webhook(1, &frame_at(&body, &headers, now_ms));
    daemon
        .logs
        .wait_for(&["event=1", "rejected", "beyond the 5m tolerance"])
        .await;
    // Received by the channel 2 s after it was signed, evaluated long after: verified.
    channel.send_webhook(2, &frame_at(&body, &headers, signed_ms + 2_000));
    assert_eq!(
        header(&slack.next().await),
        "FIRING cpu-high: Notification Service Production"
    );
    slack.assert_quiet(Duration::from_millis(1000)).await;
    // Regression (helper-117): an older change's signed body posted afresh was said to be "a
    // time before the change" the pipeline had judged, not rejected for its signature.
    let (timestamp, signature) = vector("deployment-config/automation/01-create.json");
    let headers = [
        ("x-port-timestamp", timestamp.as_str()),
        ("x-port-signature", signature.as_str()),
    ];
    let older = fixture("automation", "01-create");
    channel.send_webhook(3, &frame_at(&older, &headers, now_ms));
    support::wait_for(support::PATIENCE, "a second rejection", || async {
        (daemon.logs.all().matches("beyond the 5m tolerance").count() == 2).then_some(())
    })
    .await;
    let logs = daemon.logs.all();
    assert!(
        !logs.contains("changes the entity at a time before"),
        "{logs}"
    );
    stop(daemon).await;
}

/// Run `smee-relay` with `args` to the end: exit code, stdout, stderr.
async fn run_to_end(args: &[&str]) -> (Option<i32>, String, String) {
    let out = smee_relay()
        .args(args)
        .env(
            "TEST_SLACK_WEBHOOK",
            "https://hooks.slack.com/services/T/B/X",
        )
        .output()
        .await
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Item 6: `events replay` of pipeline events ran the rules again and could re-send alerts
/// whose transition had already happened. Replaying the whole fixture sequence sends nothing,
/// and the log says why for each event.
#[tokio::test]
async fn replaying_the_whole_fixture_sequence_sends_no_alert_again() {
    let channel = FakeChannel::start().await;
    let mut slack = FakeTarget::start().await;
    let dir = support::fresh_state_dir();
    let state = dir.join("state");
    let config = write_config(&dir, &channel.url("PipelineChannel"), "");
    let daemon = start(&config, &state, &slack.url(SLACK_PATH), &channel).await;
    let files = files();
    for (n, file) in files.iter().enumerate() {
        channel.send_webhook(n as u64 + 1, &frame(&fixture("legacy", file), &[]));
    }
    let got: Vec<String> = slack.take(6).await.iter().map(header).collect();
    assert_eq!(got, smee_relay::commands::demo::EXPECTED);

    let state_arg = state.to_str().unwrap();
    let (code, listed, stderr) =
        run_to_end(&["events", "list", "--json", "--state-dir", state_arg]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap();
    let ids: Vec<String> = rows
        .iter()
        .filter(|r| r["route"] == "pipeline")
        .map(|r| r["id"].to_string())
        .collect();
    assert_eq!(ids.len(), files.len(), "{listed}");
    let mut args = vec!["events", "replay", "--state-dir", state_arg];
    args.extend(ids.iter().map(String::as_str));
    let (code, _, stderr) = run_to_end(&args).await;
    assert_eq!(code, Some(0), "{stderr}");

    for id in &ids {
        daemon
            .logs
            .wait_for(&[&format!("event {id} "), "replayed, it is not evaluated"])
            .await;
    }
    slack.assert_quiet(Duration::from_millis(1500)).await;
    // Replayed again after a restart: the marks are on disk.
    stop(daemon).await;
    let daemon = start(&config, &state, &slack.url(SLACK_PATH), &channel).await;
    let (code, _, stderr) = run_to_end(&args).await;
    assert_eq!(code, Some(0), "{stderr}");
    daemon
        .logs
        .wait_for(&[
            &format!("event {} was already evaluated", ids.last().unwrap()),
            "no alert is sent",
        ])
        .await;
    slack.assert_quiet(Duration::from_millis(1500)).await;
    stop(daemon).await;
}

/// Item 13: a hostile or buggy jq rule took the daemon down: endless recursion overflowed the
/// stack (exit 134), an endless loop froze every route, a generator grew without bound. Each now
/// fails on its own, is logged once and counted, and the other rules still alert.
#[tokio::test]
async fn hostile_jq_rules_fail_alone_and_the_other_rules_still_alert() {
    let hostile = r#"
[jq]
timeout = "500ms"

[[rule]]
name = "spin"
when = 'def f: f; f'

[[rule]]
name = "deep"
when = 'def f: 1 + f; f'

[[rule]]
name = "hungry"
when = '[limit(1e9; repeat("x" * 10000))] | length > 0'
"#;
    // `check` refuses them: they cannot finish even on an empty entity.
    let dir = support::fresh_state_dir();
    let config = write_config(&dir, "https://smee.io/abc", hostile);
    let (code, _, stderr) = run_to_end(&["check", "--config", config.to_str().unwrap()]).await;
    assert_eq!(code, Some(2), "{stderr}");
    for (rule, why) in [
        ("spin", "longer than its 500ms budget"),
        ("deep", "overflowed its stack"),
        ("hungry", "memory or recursion bound"),
    ] {
        assert!(
            stderr.contains("config.toml:")
                && stderr.contains(&format!("rule {rule:?}: when:"))
                && stderr.contains(why),
            "{rule}: {stderr}"
        );
    }

    // `run` keeps going with them.
    let channel = FakeChannel::start().await;
    let mut slack = FakeTarget::start().await;
    let (daemon, addr) = start_with_metrics(&dir, &channel, &slack, hostile).await;
    for (n, file) in files().iter().enumerate() {
        channel.send_webhook(n as u64 + 1, &frame(&fixture("automation", file), &[]));
    }
    let got: Vec<String> = slack.take(6).await.iter().map(header).collect();
    assert_eq!(got, smee_relay::commands::demo::EXPECTED);
    slack.assert_quiet(Duration::from_millis(1000)).await;
    let logs = daemon.logs.all();
    // Logged once per rule and kind of failure, not once per event. `hungry` allocates without
    // end: on a loaded machine it can meet the time budget before the memory budget, so it may
    // show both kinds (never more than once each).
    for (rule, most) in [("spin", 1), ("deep", 1), ("hungry", 2)] {
        let count = logs
            .matches(&format!("rule {rule} failed for event"))
            .count();
        assert!(
            (1..=most).contains(&count),
            "{rule} logged {count} times: {logs}"
        );
    }
    let metrics = metrics_of(&addr).await;
    // Every event but the deletion, which resolves without judging.
    let events = files().len() - 1;
    assert!(
        metrics.contains(&format!(
            "smee_relay_rule_errors_total{{rule=\"spin\",kind=\"timeout\"}} {events}"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("smee_relay_rule_errors_total{rule=\"deep\",kind=\"bound\"}"),
        "{metrics}"
    );
    stop(daemon).await;
}

/// Item 14: nonsense in the config was accepted. `check` and `run` refuse it with file:line and
/// exit 2 (the cases one by one are config's unit tests).
#[tokio::test]
async fn config_nonsense_is_refused_by_check_and_run_with_exit_2() {
    let dir = support::fresh_state_dir();
    let config = write_config(&dir, "https://smee.io/abc", "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("pipeline = true", "pipeline = true\nidle_timeout = \"0s\"");
    std::fs::write(&config, text).unwrap();
    for command in ["check", "run"] {
        let state = dir.join("state");
        let mut args = vec![command, "--config", config.to_str().unwrap()];
        if command == "run" {
            args.extend(["--state-dir", state.to_str().unwrap()]);
        }
        let (code, _, stderr) = run_to_end(&args).await;
        assert_eq!(code, Some(2), "{command}: {stderr}");
        assert!(
            stderr.contains("config.toml:5:") && stderr.contains("more than zero"),
            "{command}: {stderr}"
        );
    }
}

/// Regression (adv3 review, finding 3): the route waited out Slack's pace (a second) before
/// journaling the delivery, so a `kill -9` up to a second after Slack answered repeated the
/// alert after the restart. It is journaled as soon as Slack answered (and the delivery's log
/// line is said once it is), then paced.
#[tokio::test]
async fn a_kill_9_right_after_slack_answered_does_not_repeat_the_alert() {
    let channel = FakeChannel::start().await;
    let mut slack = FakeSlack::start().await;
    let dir = support::fresh_state_dir();
    let config = write_config(&dir, &channel.url("PipelineChannel"), "");
    let state = dir.join("state");
    let mut daemon = start(&config, &state, &slack.webhook_url(), &channel).await;
    for (n, file) in ["01-create", "02-cpu-25-to-87"].iter().enumerate() {
        channel.send_webhook(n as u64 + 1, &frame(&fixture("automation", file), &[]));
    }
    assert_eq!(
        slack.next_headline().await,
        "FIRING cpu-high: Notification Service Production"
    );
    // Slack answered, and the relay says so: killed at once, well inside the pace.
    daemon.logs.wait_for(&["slack -> 200"]).await;
    daemon.child.start_kill().unwrap();
    daemon.child.wait().await.unwrap();

    let daemon = start(&config, &state, &slack.webhook_url(), &channel).await;
    slack.assert_quiet(Duration::from_secs(3)).await;
    stop(daemon).await;
}

/// Regression (helper-117): "one warning per (rule, entity, reason)" warned once per value: a
/// metric sent as a string ("95", then "96", then "97") warned on every change. The value is
/// named in the one warning, and is not part of what makes it new.
#[tokio::test]
async fn regression_a_string_metric_warned_once_per_value() {
    let (channel, mut slack, daemon) = setup("").await;
    let body = fixture("automation", "02-cpu-25-to-87");
    for (n, value) in [(1, "95"), (2, "96"), (3, "97")] {
        let body = body
            .replace("\"cpuUtil\":87", &format!("\"cpuUtil\":\"{value}\""))
            .replace("10:01:00.000Z", &format!("10:0{n}:30.000Z"));
        channel.send_webhook(n, &frame(&body, &[]));
    }
    let logs = stop_when_done(daemon, &mut slack, 3, 0).await;
    let warnings = logs.all();
    let said: Vec<&str> = warnings
        .lines()
        .filter(|l| l.contains("rule cannot judge"))
        .collect();
    assert_eq!(said.len(), 1, "{warnings}");
    assert!(said[0].contains(r#"not a number ("95")"#), "{}", said[0]);
}
