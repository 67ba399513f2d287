//! Running under systemd: readiness, watchdog and stop notifications on a fake NOTIFY_SOCKET,
//! config reload on SIGHUP, and the /healthz and /metrics endpoints.

mod support;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::Duration;

use support::{FakeChannel, FakeSlack, FakeTarget, smee_relay, unused_addr};

/// Start `smee-relay` with `--metrics-listen 127.0.0.1:0`; returns it and the address it bound.
async fn with_metrics(args: &[&str]) -> (tokio::process::Child, String) {
    let (child, addr, _) = with_metrics_logged(args).await;
    (child, addr)
}

/// [`with_metrics`], and its log.
async fn with_metrics_logged(args: &[&str]) -> (tokio::process::Child, String, support::LogWatch) {
    let (child, logs) = support::spawn_logged(
        smee_relay()
            .args(args)
            .args(["--metrics-listen", "127.0.0.1:0"]),
    );
    let line = logs.wait_for(&["serving /healthz and /metrics"]).await;
    let addr = line.rsplit("addr=").next().unwrap().trim().to_string();
    (child, addr, logs)
}

use support::signal as kill;

/// Receives what the service tells systemd.
struct FakeSystemd {
    socket: UnixDatagram,
    pub path: std::path::PathBuf,
}

impl FakeSystemd {
    fn new(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(support::PATIENCE)).unwrap();
        Self { socket, path }
    }

    /// The next message that contains `needle`.
    fn wait_for(&self, needle: &str) -> String {
        let mut buf = vec![0; 4096];
        loop {
            let n = self
                .socket
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no {needle:?} from the service: {e}"));
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            if message.contains(needle) {
                return message;
            }
        }
    }
}

fn rules_config(dir: &Path, channel: &str, rules: &str) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[[channel]]\nurl = \"{channel}\"\npipeline = true\n\
             [slack]\nwebhook_url_env = \"TEST_SLACK_WEBHOOK\"\n{rules}"
        ),
    )
    .unwrap();
    path
}

const UNHEALTHY: &str =
    "[[rule]]\nname = \"unhealthy\"\nproperty = \"healthStatus\"\nnot_in = [\"Healthy\"]\n";
const CPU_HIGH: &str = "[[rule]]\nname = \"cpu-high\"\nproperty = \"cpuUtil\"\nabove = 80\n";

/// `run --config config`, alerts to `slack`, once connected to `channel`.
async fn run_connected(
    config: &Path,
    slack: &FakeSlack,
    channel: &FakeChannel,
) -> (tokio::process::Child, support::LogWatch) {
    let (child, logs) = support::spawn_logged(
        smee_relay()
            .args(["run", "--config"])
            .arg(config)
            .env("TEST_SLACK_WEBHOOK", slack.webhook_url()),
    );
    channel.wait_connections(1).await;
    logs.wait_for(&["connected to channel"]).await;
    (child, logs)
}

fn fixture_frame(shape: &str, file: &str) -> String {
    let body = support::port_fixture(shape, file);
    format!(r#"{{"content-type":"application/json","body":{body}}}"#)
}

#[tokio::test]
async fn it_tells_systemd_ready_watchdog_status_and_stopping() {
    let channel = FakeChannel::start().await;
    let target = FakeTarget::start().await;
    let dir = support::temp_dir();
    let systemd = FakeSystemd::new(dir.path());
    let mut child = smee_relay()
        .args(["forward", &channel.url("NotifyChannel"), &target.url("/")])
        .env("NOTIFY_SOCKET", &systemd.path)
        .env("WATCHDOG_USEC", "200000")
        .spawn()
        .unwrap();
    let socket = std::sync::Arc::new(systemd);
    let s = socket.clone();
    tokio::task::spawn_blocking(move || s.wait_for("READY=1"))
        .await
        .unwrap();
    let s = socket.clone();
    tokio::task::spawn_blocking(move || s.wait_for("WATCHDOG=1"))
        .await
        .unwrap();
    let s = socket.clone();
    let status = tokio::task::spawn_blocking(move || s.wait_for("STATUS="))
        .await
        .unwrap();
    assert!(
        status.contains("channels connected") && status.contains("pending"),
        "{status}"
    );
    kill(&child, "TERM");
    let s = socket.clone();
    tokio::task::spawn_blocking(move || s.wait_for("STOPPING=1"))
        .await
        .unwrap();
    assert_eq!(support::exit_code(&mut child).await, Some(0));
}

/// helper-110: the status line quotes a failing target's error body, and its newlines split
/// the notify datagram into fields of their own: a target answering `...\nSTOPPING=1\n
/// WATCHDOG=trigger` spoke to systemd in the relay's name.
#[tokio::test]
async fn regression_a_target_s_error_body_injected_systemd_notify_fields() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let channel = FakeChannel::start().await;
    let hostile = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = format!("http://{}/hook", hostile.local_addr().unwrap());
    tokio::spawn(async move {
        let body = "busy\nSTOPPING=1\nWATCHDOG=trigger\r\nSTATUS=INJECTED\n";
        while let Ok((mut socket, _)) = hostile.accept().await {
            let mut request = vec![0u8; 64 * 1024];
            let _ = socket.read(&mut request).await;
            let answer = format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(answer.as_bytes()).await;
        }
    });
    let dir = support::temp_dir();
    let systemd = FakeSystemd::new(dir.path());
    let child = smee_relay()
        .args(["forward", &channel.url("InjectChannel"), &target])
        .env("NOTIFY_SOCKET", &systemd.path)
        .spawn()
        .unwrap();
    channel.wait_connections(1).await;
    channel.send_webhook(1, r#"{"body":{"n":1}}"#);
    let status = tokio::task::spawn_blocking(move || systemd.wait_for("failing for"))
        .await
        .unwrap();
    let fields: Vec<&str> = status.lines().collect();
    assert_eq!(fields.len(), 1, "one STATUS field: {fields:?}");
    assert!(fields[0].starts_with("STATUS=route "), "{status}");
    kill(&child, "TERM");
}

/// Regression (helper-145): every reload, one that changed nothing too, started the alert
/// route anew, and a new route sent its failing head at once: three SIGHUPs sent three
/// messages to Slack within a second, past its one a second and its `Retry-After`. A reload
/// that leaves Slack as it was keeps the route; its wait ends (`retrying now (SIGHUP)`), never
/// sooner than Slack's pace.
#[tokio::test]
async fn regression_reloads_sent_to_slack_faster_than_its_pace() {
    let channel = FakeChannel::start().await;
    let mut slack = FakeSlack::start().await;
    for _ in 0..4 {
        slack.answer_with_retry_after(429, 3);
    }
    let dir = support::temp_dir();
    let dir = dir.path();
    let config = rules_config(dir, &channel.url("PaceChannel"), CPU_HIGH);
    let (child, logs) = run_connected(&config, &slack, &channel).await;
    channel.send_webhook(1, &fixture_frame("legacy", "02-cpu-25-to-87"));
    let first = slack.next().await;
    for n in 1..=3 {
        kill(&child, "HUP");
        support::wait_for(support::PATIENCE, "the reload", || async {
            (logs
                .all()
                .matches("config reloaded: nothing changed")
                .count()
                == n)
                .then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let second = slack.next().await;
    assert!(
        second.at - first.at >= Duration::from_secs(1),
        "{:?} between messages",
        second.at - first.at
    );
    assert!(
        logs.find(&["retrying now: the route started"]).is_none(),
        "{}",
        logs.all()
    );
    kill(&child, "TERM");
}

#[tokio::test]
async fn sighup_applies_a_new_config_and_keeps_the_old_one_if_the_new_is_broken() {
    let channel = FakeChannel::start().await;
    let mut slack = FakeSlack::start().await;
    let dir = support::temp_dir();
    let dir = dir.path();
    let config = rules_config(dir, &channel.url("ReloadChannel"), UNHEALTHY);
    let (child, logs) = run_connected(&config, &slack, &channel).await;
    // Which file runs is said once (it was not: with several configs about, which one?).
    let loaded = logs.wait_for(&["config loaded"]).await;
    assert!(loaded.contains(&config.display().to_string()), "{loaded}");

    // Add cpu-high and reload: it takes effect without a new connection.
    rules_config(
        dir,
        &channel.url("ReloadChannel"),
        &format!("{UNHEALTHY}{CPU_HIGH}"),
    );
    kill(&child, "HUP");
    let line = logs.wait_for(&["config reloaded"]).await;
    // Regression (helper-144): each reload also said "pipeline on (2 rules, alerts to
    // slack)", as if the pipeline had been off; a reload names what changed.
    assert!(
        line.contains("rule cpu-high added") && !line.contains("pipeline on"),
        "{line}"
    );
    channel.send_webhook(1, &fixture_frame("legacy", "02-cpu-25-to-87"));
    assert_eq!(
        slack.next_headline().await,
        "FIRING cpu-high: Notification Service Production"
    );

    // A broken config is refused; the running rules stay.
    std::fs::write(&config, "[[channel]]\nurl = 3\n").unwrap();
    kill(&child, "HUP");
    logs.wait_for(&["config not reloaded"]).await;
    channel.send_webhook(2, &fixture_frame("legacy", "04-health-healthy-to-degraded"));
    assert_eq!(
        slack.next_headline().await,
        "FIRING unhealthy: Notification Service Production"
    );
    assert_eq!(
        channel.connections(),
        1,
        "reloads never dropped the connection"
    );

    // Regression (helper-117): a rule removed (or renamed) left its firing alerts open in
    // Slack for ever. The reload resolves them, once.
    rules_config(dir, &channel.url("ReloadChannel"), CPU_HIGH);
    kill(&child, "HUP");
    logs.wait_for(&["config reloaded", "rule unhealthy removed"])
        .await;
    assert_eq!(
        slack.next_headline().await,
        "RESOLVED unhealthy: Notification Service Production"
    );
    kill(&child, "HUP");
    support::wait_for(support::PATIENCE, "a third reload", || async {
        (logs.all().matches("config reloaded").count() == 3).then_some(())
    })
    .await;
    let all = logs.all();
    let third = all.lines().filter(|l| l.contains("config reloaded")).nth(2);
    assert!(
        third.is_some_and(|l| l.ends_with("config reloaded: nothing changed")),
        "{third:?}"
    );
    channel.send_webhook(3, &fixture_frame("legacy", "05-cpu-91-to-75"));
    channel.send_webhook(4, &fixture_frame("legacy", "06-cpu-75-to-60"));
    assert_eq!(
        slack.next_headline().await,
        "RESOLVED cpu-high: Notification Service Production",
        "the removed rule's alert was resolved once"
    );

    // Regression (helper-117): a new Slack webhook was applied without a word in the reload's
    // line (which names the change, never the URL: it is a secret).
    let moved = format!("{}/moved", slack.webhook_url());
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "webhook_url_env = \"TEST_SLACK_WEBHOOK\"",
        &format!("webhook_url = \"{moved}\""),
    );
    std::fs::write(&config, text).unwrap();
    kill(&child, "HUP");
    let line = logs
        .wait_for(&["config reloaded", "[slack] webhook_url changed"])
        .await;
    assert!(!line.contains("/moved"), "{line}");
}

#[tokio::test]
async fn healthz_turns_503_when_the_channel_goes_silent() {
    let channel = FakeChannel::start().await;
    let target = FakeTarget::start().await;
    let addr = unused_addr();
    let _child = smee_relay()
        .args(["forward", &channel.url("SilentChannel"), &target.url("/")])
        .args([
            "--idle-timeout",
            "1s",
            "--metrics-listen",
            &addr.to_string(),
        ])
        .spawn()
        .unwrap();
    channel.wait_connections(1).await;
    let client = smee_relay::http::client_builder().build().unwrap();
    let health = |client: reqwest::Client| async move {
        match client.get(format!("http://{addr}/healthz")).send().await {
            Ok(r) => Some((r.status().as_u16(), r.text().await.unwrap_or_default())),
            Err(_) => None,
        }
    };
    let seen_ok = std::cell::Cell::new(false);
    let found = support::wait_for(support::PATIENCE, "healthz went 200 then 503", || {
        let answer = health(client.clone());
        let seen_ok = &seen_ok;
        async move {
            match answer.await {
                Some((200, _)) => seen_ok.set(true),
                Some((503, body)) if seen_ok.get() => return Some(body),
                _ => {}
            }
            None
        }
    })
    .await;
    let body: serde_json::Value = serde_json::from_str(&found).unwrap();
    assert_eq!(body["status"], "unhealthy");
    let reason = body["reasons"][0].as_str().unwrap();
    assert!(
        reason.contains("has sent nothing for") && reason.contains("Sile…"),
        "{reason}"
    );
}

/// A target that was down said nothing to `/healthz`: a watcher saw "ok" while every event
/// waited. It is a warning, not a 503 (the relay is fine and a restart would not help), and it
/// goes once the target takes the event.
#[tokio::test]
async fn healthz_warns_of_a_failing_target_until_it_takes_the_event() {
    let channel = FakeChannel::start().await;
    let down = unused_addr();
    let route = format!("http://{down}/w");
    let (_child, addr) = with_metrics(&["forward", &channel.url("FailingTarget"), &route]).await;
    channel.wait_connections(1).await;
    channel.send_webhook(1, r#"{"body":{"n":1}}"#);
    let client = smee_relay::http::client_builder().build().unwrap();
    let get = |path: &str| {
        let request = client.get(format!("http://{addr}{path}"));
        async move {
            let response = request.send().await.ok()?;
            Some((response.status().as_u16(), response.text().await.ok()?))
        }
    };
    let body = support::wait_for(support::PATIENCE, "a warning on /healthz", || {
        let answer = get("/healthz");
        async move {
            let (status, body) = answer.await?;
            body.contains("warnings").then_some((status, body))
        }
    })
    .await;
    assert_eq!(body.0, 200, "the relay itself is healthy: {}", body.1);
    let json: serde_json::Value = serde_json::from_str(&body.1).unwrap();
    assert_eq!(json["status"], "ok");
    let warning = json["warnings"][0].as_str().unwrap();
    let expected = format!("route {route} failing for ");
    assert!(
        warning.starts_with(&expected) && warning.contains("last: cannot reach target"),
        "{warning}"
    );
    let (_, metrics) = get("/metrics").await.unwrap();
    let gauge = format!("smee_relay_route_failing{{route=\"{route}\"}} 1");
    assert!(metrics.contains(&gauge), "{metrics}");

    let mut target = FakeTarget::start_on(down).await;
    target.next().await;
    support::wait_for(support::PATIENCE, "the warning gone", || {
        let answer = get("/healthz");
        async move {
            let (status, body) = answer.await?;
            (status == 200 && !body.contains("warnings")).then_some(())
        }
    })
    .await;
    let (_, metrics) = get("/metrics").await.unwrap();
    let gauge = format!("smee_relay_route_failing{{route=\"{route}\"}} 0");
    assert!(metrics.contains(&gauge), "{metrics}");
}

/// SIGHUP to `forward` was logged and ignored: after the target came back, its event waited out
/// the backoff (up to 5 minutes, or an hour of `Retry-After`) with no way to say "now" short of
/// a restart. It now retries at once, as a reload does for `run`.
#[tokio::test]
async fn sighup_makes_forward_retry_now() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    // Asked to come back in an hour: only a retry on demand delivers it within the test.
    target.answer_with_retry_after(503, 3600);
    let (child, logs) = support::spawn_logged(smee_relay().args([
        "forward",
        &channel.url("HupChannel"),
        &target.url("/h"),
    ]));
    channel.wait_connections(1).await;
    channel.send_webhook(1, r#"{"body":{"n":1}}"#);
    target.next().await;
    logs.wait_for(&["retrying in 1h"]).await;
    kill(&child, "HUP");
    let retried = target.next().await;
    assert_eq!(&retried.body[..], br#"{"n":1}"#);
    logs.wait_for(&["retrying now (SIGHUP)"]).await;
    logs.wait_for(&["SIGHUP: retrying now what waits for its target"])
        .await;
    assert!(logs.find(&["shutting down"]).is_none(), "{}", logs.all());
}

/// Wait until the warnings `/healthz` at `addr` gives meet `until`; returns them.
async fn wait_warnings(
    client: &reqwest::Client,
    addr: &str,
    what: &str,
    until: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let url = format!("http://{addr}/healthz");
    support::wait_for(support::PATIENCE, what, || async {
        let body = support::get_text(client, &url).await?;
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        let warnings: Vec<String> = (json["warnings"].as_array().cloned().unwrap_or_default())
            .iter()
            .map(|w| w.as_str().unwrap().to_string())
            .collect();
        until(&warnings).then_some(warnings)
    })
    .await
}

/// `run --config CONFIG --state-dir STATE` with `/healthz` and `/metrics` ([`with_metrics`]).
async fn run_with_metrics(
    config: &Path,
    state: &str,
) -> (tokio::process::Child, String, support::LogWatch) {
    let config = config.to_str().unwrap();
    with_metrics_logged(&["run", "--config", config, "--state-dir", state]).await
}

/// Write `config`: one channel, `channel`, forwarding to `targets`.
fn write_forward(config: &Path, channel: &str, targets: &[&str]) {
    let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
    let body = format!(
        "[[channel]]\nurl = \"{channel}\"\nforward = [{}]\n",
        targets.join(", ")
    );
    std::fs::write(config, body).unwrap();
}

/// Whether one of `warnings` contains `needle`.
fn warns(warnings: &[String], needle: &str) -> bool {
    warnings.iter().any(|w| w.contains(needle))
}

const UNSERVED: &str = "which this relay does not deliver to";

/// A new user's run: a reload removed a target with events still queued for it; the log said
/// so once, and `/healthz` went on saying "ok" with nothing else. It is a warning now, until a
/// route for the queue starts again. The removed route's "failing" warning goes with it.
#[tokio::test]
async fn healthz_warns_of_events_left_queued_for_a_removed_target() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let new = target.url("/new");
    let old = format!("http://{}/old", unused_addr());
    let dir = support::temp_dir();
    let config = dir.path().join("config.toml");
    let write = |targets: &[&str]| write_forward(&config, &channel.url("Unserved"), targets);
    write(&[&old, &new]);
    let (child, addr, logs) =
        with_metrics_logged(&["run", "--config", config.to_str().unwrap()]).await;
    channel.wait_connections(1).await;
    channel.send_webhook(1, r#"{"body":{"n":1}}"#);
    target.next().await;
    let client = smee_relay::http::client_builder().build().unwrap();
    let failing = format!("route {old} failing");
    wait_warnings(&client, &addr, "the old target failing", |w| {
        warns(w, &failing)
    })
    .await;

    write(&[&new]);
    kill(&child, "HUP");
    let expected = format!("1 event queued for {old}, {UNSERVED}");
    let said = wait_warnings(&client, &addr, "the queue left behind", |w| {
        warns(w, &expected)
    })
    .await;
    assert_eq!(said.len(), 1, "the removed route fails no more: {said:?}");

    // The target back in the config: its route takes the queue again.
    write(&[&old, &new]);
    kill(&child, "HUP");
    wait_warnings(&client, &addr, "the queue served again", |w| {
        !warns(w, UNSERVED)
    })
    .await;

    // Regression (helper-133): removed again and stopped, the stop line said "nothing waits:
    // everything received was delivered".
    write(&[&new]);
    kill(&child, "HUP");
    wait_warnings(&client, &addr, "the queue left behind again", |w| {
        warns(w, &expected)
    })
    .await;
    kill(&child, "TERM");
    logs.wait_for(&[
        "stopped; nothing waits for this relay's targets; 1 event stays queued for a target this relay no longer delivers to",
    ])
    .await;
}

/// Regression (helper-113): a reload removed a channel whose target still had an event queued;
/// `events purge` of that queue, allowed while the relay runs (the channel is not running any
/// more), emptied it, and `/healthz` went on warning of the event until the relay restarted.
#[tokio::test]
async fn regression_a_purged_queue_was_still_said_unserved() {
    let kept = FakeChannel::start().await;
    let gone = FakeChannel::start().await;
    let target = FakeTarget::start().await;
    let old = format!("http://{}/old", unused_addr());
    let dir = support::temp_dir();
    let config = dir.path().join("config.toml");
    let kept_part = format!(
        "[[channel]]\nurl = \"{}\"\nforward = [\"{}\"]\n",
        kept.url("Kept"),
        target.url("/hook")
    );
    let gone_part = format!(
        "[[channel]]\nurl = \"{}\"\nforward = [\"{old}\"]\n",
        gone.url("Gone")
    );
    std::fs::write(&config, format!("{kept_part}{gone_part}")).unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let (child, addr, _) = run_with_metrics(&config, state).await;
    gone.wait_connections(1).await;
    gone.send_webhook(1, r#"{"body":{"n":1}}"#);
    let client = smee_relay::http::client_builder().build().unwrap();
    let failing = format!("route {old} failing");
    wait_warnings(&client, &addr, "the old target failing", |w| {
        warns(w, &failing)
    })
    .await;

    std::fs::write(&config, &kept_part).unwrap();
    kill(&child, "HUP");
    let unserved = format!("1 event queued for {old}, {UNSERVED}");
    wait_warnings(&client, &addr, "the queue left behind", |w| {
        warns(w, &unserved)
    })
    .await;

    let purged = support::run_to_end(smee_relay().args([
        "events",
        "purge",
        "--queue",
        &old,
        "--state-dir",
        state,
    ]))
    .await;
    assert_eq!(purged.code, Some(0), "{}", purged.stderr);
    wait_warnings(&client, &addr, "the warning gone", |w| !warns(w, UNSERVED)).await;
}

/// Regression (helper-114): a reload removed a target with nothing queued for it ("nothing was
/// queued"); `events replay --dead` then queued its dead letter again, for a target no route
/// takes, and `/healthz` never said so.
#[tokio::test]
async fn regression_a_replay_into_a_removed_target_s_queue_was_not_said() {
    let channel = FakeChannel::start().await;
    let mut kept = FakeTarget::start().await;
    let mut refusing = FakeTarget::start().await;
    refusing.answer_with(&[400]);
    let dir = support::temp_dir();
    let config = dir.path().join("config.toml");
    let write = |targets: &[&str]| write_forward(&config, &channel.url("Replayed"), targets);
    let (kept_url, refusing_url) = (kept.url("/kept"), refusing.url("/refusing"));
    write(&[&kept_url, &refusing_url]);
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let (child, addr, logs) = run_with_metrics(&config, state).await;
    channel.wait_connections(1).await;
    channel.send_webhook(1, r#"{"body":{"n":1}}"#);
    kept.next().await;
    refusing.next().await;
    let client = smee_relay::http::client_builder().build().unwrap();
    let metrics = format!("http://{addr}/metrics");
    support::wait_for(support::PATIENCE, "the dead letter", || async {
        let text = support::get_text(&client, &metrics).await?;
        (text.lines())
            .any(|l| l.starts_with("smee_relay_dead_letters_total") && l.ends_with(" 1"))
            .then_some(())
    })
    .await;

    write(&[&kept_url]);
    kill(&child, "HUP");
    logs.wait_for(&["target removed; nothing was queued for it"])
        .await;
    let replayed = support::run_to_end(smee_relay().args([
        "events",
        "replay",
        "--dead",
        "--state-dir",
        state,
    ]))
    .await;
    assert_eq!(replayed.code, Some(0), "{}", replayed.stderr);
    let unserved = format!("1 event queued for {refusing_url}, {UNSERVED}");
    wait_warnings(&client, &addr, "the replayed queue said", |w| {
        warns(w, &unserved)
    })
    .await;
}

#[tokio::test]
async fn metrics_count_what_happened() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let (_child, addr) = with_metrics(&[
        "forward",
        &channel.url("MetricsChannel"),
        &target.url("/m"),
        "--ignore-event",
        "ping",
    ])
    .await;
    channel.wait_connections(1).await;
    target.answer_with(&[503]);
    // Regression: an event skipped by --ignore-event left no trace but a debug line.
    channel.send_webhook(1, r#"{"x-github-event":"ping","body":{}}"#);
    for n in 0..5 {
        channel.send_webhook(n + 2, &format!(r#"{{"body":{{"n":{n}}}}}"#));
    }
    target.take(6).await;
    let route = target.url("/m");
    let expected = [
        "smee_relay_events_received_total 5".to_string(),
        format!("smee_relay_deliveries_total{{route=\"{route}\"}} 5"),
        format!("smee_relay_retries_total{{route=\"{route}\"}} 1"),
        "smee_relay_channel_connected{channel=\"http://".to_string(),
        format!("smee_relay_delivery_seconds_count{{route=\"{route}\"}} 5"),
        "smee_relay_intake_paused 0".to_string(),
        // Regression (a new user's run): the counters of what has not happened yet were
        // missing until the first one, so `increase()` alerts missed it.
        format!("smee_relay_dead_letters_total{{route=\"{route}\"}} 0"),
        "smee_relay_events_refused_total 0".to_string(),
        // Its one failure is behind it.
        format!("smee_relay_route_failing{{route=\"{route}\"}} 0"),
        "smee_relay_reconnects_total{channel=\"http://".to_string(),
        "smee_relay_bad_frames_total{channel=\"http://".to_string(),
    ];
    let ignored_once = |text: &str| {
        text.lines().any(|l| {
            l.starts_with("smee_relay_events_ignored_total{channel=") && l.ends_with("} 1")
        })
    };
    let client = smee_relay::http::client_builder().build().unwrap();
    let what = format!("/metrics showing {expected:?}");
    support::wait_for(support::PATIENCE, &what, || async {
        let text = client
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        (expected.iter().all(|e| text.contains(e.as_str())) && ignored_once(&text)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn under_journald_lines_carry_priorities_and_no_timestamps() {
    let port = unused_addr().port();
    let out = support::run_to_end(
        smee_relay()
            .args(["new", "--server", &format!("http://127.0.0.1:{port}")])
            .env("JOURNAL_STREAM", "8:12345"),
    )
    .await;
    let stderr = out.stderr;
    let line = stderr.lines().next().unwrap_or_default();
    assert!(line.starts_with("<3>cannot create a channel"), "{stderr}");
    assert!(
        !stderr.contains('\u{1b}') && !stderr.contains("Z "),
        "{stderr}"
    );
}
