//! The daemon's promises under reload, shutdown and broken pipes (issue 16, items 1, 2, 4, 10
//! and 16), with the real binary against fakes on loopback.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::{FakeChannel, FakeTarget, LogWatch, signal, slack_header, smee_relay};

/// A config with the fixture rules on one pipeline channel, alerts to the fake Slack, plus
/// `extra` (top-level keys go first, so they stay top-level).
fn write_config(path: &Path, channel: &str, top: &str, extra: &str) {
    let rules = include_str!("fixtures/port/rules.toml");
    std::fs::write(
        path,
        format!(
            "{top}\n[[channel]]\nurl = \"{channel}\"\npipeline = true\n{extra}\n\
             [slack]\nwebhook_url_env = \"TEST_SLACK_WEBHOOK\"\n\n{rules}"
        ),
    )
    .unwrap();
}

fn fixture_frame(file: &str) -> String {
    let body = support::port_fixture("legacy", file);
    format!(r#"{{"content-type":"application/json","body":{body}}}"#)
}

/// Start `command` with its stderr watched.
fn watched(command: &mut tokio::process::Command) -> (tokio::process::Child, LogWatch) {
    let mut child = command
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let logs = LogWatch::new(child.stderr.take().unwrap());
    (child, logs)
}

/// `smee-relay run --config` with stderr watched.
fn spawn_run(config: &Path, slack: &str, journal: bool) -> (tokio::process::Child, LogWatch) {
    let mut command = smee_relay();
    command
        .args(["run", "--config"])
        .arg(config)
        .env("TEST_SLACK_WEBHOOK", slack);
    if journal {
        command.env("JOURNAL_STREAM", "8:12345");
    }
    watched(&mut command)
}

fn count(logs: &LogWatch, needle: &str) -> usize {
    logs.all().lines().filter(|l| l.contains(needle)).count()
}

/// Wait until `needle` has been logged at least `n` times.
async fn wait_count(logs: &LogWatch, needle: &str, n: usize) {
    tokio::time::timeout(support::PATIENCE, async {
        while count(logs, needle) < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{needle:?} not logged {n} times:\n{}", logs.all()));
}

async fn stop(mut child: tokio::process::Child) {
    signal(&child, "TERM");
    let status = tokio::time::timeout(support::PATIENCE, child.wait())
        .await
        .expect("stopped in time")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// Regression (item 1): each SIGHUP started a new alert route while the old one was still
/// going through its read-ahead, so 6 expected alerts came out as 11. Now a reload hands
/// over: reloads all through the sequence, and each alert is sent exactly once.
#[tokio::test]
async fn regression_reloads_during_the_fixture_sequence_send_each_alert_once() {
    let channel = FakeChannel::start().await;
    let mut slack = FakeTarget::start().await;
    // Slow enough that reloads land while alerts are queued and in flight.
    slack.delay(Duration::from_millis(150));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let state = "";
    write_config(&config, &channel.url("ReloadStorm"), state, "");
    let (child, logs) = spawn_run(&config, &slack.url("/hook"), false);
    channel.wait_connections(1).await;
    logs.wait_for(&["connected to channel"]).await;

    let mut reloads = 0;
    for (n, (file, _)) in smee_relay::commands::demo::SEQUENCE.iter().enumerate() {
        channel.send_webhook(n as u64 + 1, &fixture_frame(file));
        // Alternate the config (an extra rule that never fires changes the pipeline) and
        // reload twice per event, waiting for each reload so none is coalesced.
        for extra in [
            "[[rule]]\nname = \"never\"\nproperty = \"nope\"\nabove = 1e9\n",
            "",
        ] {
            let rules = include_str!("fixtures/port/rules.toml");
            std::fs::write(
                &config,
                format!(
                    "{state}\n[[channel]]\nurl = \"{}\"\npipeline = true\n\
                     [slack]\nwebhook_url_env = \"TEST_SLACK_WEBHOOK\"\n\n{rules}\n{extra}",
                    channel.url("ReloadStorm")
                ),
            )
            .unwrap();
            signal(&child, "HUP");
            reloads += 1;
            wait_count(&logs, "config reloaded", reloads).await;
        }
    }
    let got: Vec<String> = slack.take(6).await.iter().map(slack_header).collect();
    assert_eq!(got, smee_relay::commands::demo::EXPECTED);
    slack.assert_quiet(Duration::from_secs(2)).await;
    assert_eq!(channel.connections(), 1, "rule changes never reconnect");
    assert!(count(&logs, "config not reloaded") == 0, "{}", logs.all());
    stop(child).await;
}

/// Regression (item 1): a reload that changed `idle_timeout` re-took the daemon's own channel
/// lock, failed, and dropped the channel. Now the channel reconnects with the new setting,
/// keeping its lock, and events flow on.
#[tokio::test]
async fn regression_a_reload_that_changes_idle_timeout_keeps_the_channel() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let hook = target.url("/hook");
    let write = |idle: &str| {
        std::fs::write(
            &config,
            format!(
                "[[channel]]\nurl = \"{}\"\nforward = [\"{}\"]\nidle_timeout = \"{idle}\"\n",
                channel.url("IdleChange"),
                hook
            ),
        )
        .unwrap();
    };
    write("90s");
    let (child, logs) = spawn_run(&config, "http://127.0.0.1:1/unused", false);
    channel.wait_connections(1).await;
    logs.wait_for(&["connected to channel"]).await;
    channel.send_webhook(1, r#"{"body":{"n":1}}"#);
    assert_eq!(target.next().await.body, r#"{"n":1}"#);

    write("60s");
    signal(&child, "HUP");
    logs.wait_for(&["config reloaded", "reconnects with its new settings"])
        .await;
    channel.wait_connections(2).await;
    wait_count(&logs, "connected to channel", 2).await;
    channel.send_webhook(2, r#"{"body":{"n":2}}"#);
    assert_eq!(target.next().await.body, r#"{"n":2}"#);
    assert!(count(&logs, "config not reloaded") == 0, "{}", logs.all());
    assert!(!logs.all().contains("already"), "{}", logs.all());
    stop(child).await;
}

/// Regression (a new user's run): a reload that added `ignore_events` said only what else
/// changed (or "nothing changed"), and the channel went on with its old list: every change
/// must take effect or the reload be refused whole.
#[tokio::test]
async fn regression_a_reload_that_changed_ignore_events_was_ignored() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let hook = target.url("/hook");
    let write = |ignored: &str| {
        std::fs::write(
            &config,
            format!(
                "[[channel]]\nurl = \"{}\"\nforward = [\"{}\"]\n{ignored}",
                channel.url("IgnoreChange"),
                hook
            ),
        )
        .unwrap();
    };
    write("");
    let (child, logs) = spawn_run(&config, "http://127.0.0.1:1/unused", false);
    channel.wait_connections(1).await;
    logs.wait_for(&["connected to channel"]).await;
    let ping = |id: u64, n: u64| {
        channel.send_webhook(
            id,
            &format!(r#"{{"x-github-event":"ping","body":{{"n":{n}}}}}"#),
        )
    };
    ping(1, 1);
    assert_eq!(target.next().await.body, r#"{"n":1}"#);

    write("ignore_events = [\"Ping\"]\n");
    signal(&child, "HUP");
    logs.wait_for(&["config reloaded", "reconnects with its new settings"])
        .await;
    channel.wait_connections(2).await;
    wait_count(&logs, "connected to channel", 2).await;
    ping(2, 2);
    channel.send_webhook(3, r#"{"body":{"n":3}}"#);
    assert_eq!(
        target.next().await.body,
        r#"{"n":3}"#,
        "the ping is skipped"
    );
    stop(child).await;
}

/// Regression (item 1): a changed channel `token` was ignored until a restart.
#[tokio::test]
async fn regression_a_changed_token_takes_effect_on_reload() {
    use smee_relay::server::{ServeConfig, serve};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = format!("http://{}", listener.local_addr().unwrap());
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn(serve(
        listener,
        ServeConfig {
            subscribe_token: Some("new-token".into()),
            post_token: Some("new-token".into()),
            ..Default::default()
        },
        cancel.clone(),
    ));
    let mut target = FakeTarget::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let hook = target.url("/hook");
    let write = |token: &str| {
        std::fs::write(
            &config,
            format!(
                "[[channel]]\nurl = \"{server}/TokenChannel\"\nforward = [\"{}\"]\ntoken = \"{token}\"\n",
                hook
            ),
        )
        .unwrap();
    };
    write("old-token");
    let (child, logs) = spawn_run(&config, "http://127.0.0.1:1/unused", false);
    logs.wait_for(&["401"]).await;

    write("new-token");
    signal(&child, "HUP");
    logs.wait_for(&["config reloaded", "reconnects with its new settings"])
        .await;
    logs.wait_for(&["connected to channel"]).await;
    let status = smee_relay::http::client_builder()
        .build()
        .unwrap()
        .post(format!("{server}/TokenChannel"))
        .bearer_auth("new-token")
        .header("content-type", "application/json")
        .body(r#"{"n":1}"#)
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_success(), "{status}");
    assert_eq!(target.next().await.body, r#"{"n":1}"#);
    assert!(!logs.all().contains("new-token") && !logs.all().contains("old-token"));
    stop(child).await;
    cancel.cancel();
}

/// Item 1: a reload that cannot take effect is refused whole, on one journald line at
/// priority err with its reason, and the running config goes on.
#[tokio::test]
async fn a_refused_reload_is_one_err_line_with_its_reason_and_the_old_config_runs_on() {
    let channel = FakeChannel::start().await;
    let mut slack = FakeTarget::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    write_config(&config, &channel.url("Refused"), "", "");
    let (child, logs) = spawn_run(&config, &slack.url("/hook"), true);
    channel.wait_connections(1).await;
    logs.wait_for(&["connected to channel"]).await;

    // Something that takes a restart.
    let listen = format!("metrics_listen = \"{}\"", support::unused_addr());
    write_config(&config, &channel.url("Refused"), &listen, "");
    signal(&child, "HUP");
    let line = logs.wait_for(&["config not reloaded"]).await;
    assert!(
        line.starts_with("<3>config not reloaded, the running one stays: "),
        "{line}"
    );
    assert!(
        line.contains("metrics_listen changed from none to") && line.contains("takes a restart"),
        "{line}"
    );

    // A file with two problems: both reasons, still one line.
    std::fs::write(&config, "[[channel]]\nurl = 3\nbogus = 1\n").unwrap();
    signal(&child, "HUP");
    wait_count(&logs, "config not reloaded", 2).await;
    let lines: Vec<String> = logs
        .all()
        .lines()
        .filter(|l| l.contains("config not reloaded"))
        .map(str::to_owned)
        .collect();
    assert!(lines[1].starts_with("<3>"), "{}", lines[1]);
    assert!(
        lines[1].contains("config.toml"),
        "the reason is on the line: {}",
        lines[1]
    );
    assert!(
        logs.all().lines().all(|l| l.starts_with('<')),
        "every journald line has its priority:\n{}",
        logs.all()
    );

    // The old config still runs.
    channel.send_webhook(1, &fixture_frame("02-cpu-25-to-87"));
    assert_eq!(
        slack_header(&slack.next().await),
        "FIRING cpu-high: Notification Service Production"
    );
    assert_eq!(channel.connections(), 1);
    stop(child).await;
}

/// A target whose answers hang while `hang` is set (it notes each arrival), and are 200
/// (recorded) once it is cleared.
struct Switchable {
    addr: std::net::SocketAddr,
    hang: Arc<AtomicBool>,
    arrived: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Switchable {
    async fn start() -> Self {
        use axum::routing::post;
        let hang = Arc::new(AtomicBool::new(true));
        let (tx, arrived) = tokio::sync::mpsc::unbounded_channel();
        let h = hang.clone();
        let app = axum::Router::new().route(
            "/slow",
            post(move |body: String| {
                let (hang, tx) = (h.clone(), tx.clone());
                async move {
                    if hang.load(Ordering::SeqCst) {
                        let _ = tx.send(format!("hung {body}"));
                        std::future::pending::<()>().await;
                    }
                    let _ = tx.send(body);
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            addr,
            hang,
            arrived,
        }
    }

    async fn next(&mut self) -> String {
        tokio::time::timeout(support::PATIENCE, self.arrived.recv())
            .await
            .expect("the target received nothing in time")
            .unwrap()
    }
}

fn seq(n: u64) -> String {
    format!(r#"{{"content-type":"application/json","body":{{"seq":{n}}}}}"#)
}

/// Regression (item 2): SIGTERM waited for the route's whole read-ahead batch (16.5 s against
/// a slow target). Now the request in flight gets `--shutdown-timeout`, the rest stays in the
/// spool and goes out, in order, after a restart.
#[tokio::test]
async fn regression_sigterm_ends_within_the_shutdown_timeout_against_a_hanging_target() {
    let channel = FakeChannel::start().await;
    let mut target = Switchable::start().await;
    let state = tempfile::tempdir().unwrap();
    let url = format!("http://{}/slow", target.addr);
    let spawn = || {
        watched(
            smee_relay()
                .args([
                    "forward",
                    &channel.url("Bounded"),
                    &url,
                    "--shutdown-timeout",
                    "1s",
                ])
                .arg("--state-dir")
                .arg(state.path()),
        )
    };
    let (mut child, logs) = spawn();
    channel.wait_connections(1).await;
    logs.wait_for(&["connected to channel"]).await;
    for n in 1..=3 {
        channel.send_webhook(n, &seq(n));
    }
    assert_eq!(target.next().await, r#"hung {"seq":1}"#);

    let asked = Instant::now();
    signal(&child, "TERM");
    let status = tokio::time::timeout(support::PATIENCE, child.wait())
        .await
        .unwrap()
        .unwrap();
    let took = asked.elapsed();
    eprintln!("stopped {took:?} after SIGTERM (--shutdown-timeout 1s)");
    assert_eq!(status.code(), Some(0));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "stopped {took:?} after SIGTERM, with --shutdown-timeout 1s"
    );
    logs.wait_for(&["did not finish within 1s", "stays queued"])
        .await;
    // The last word says the stop is over (helper-108: the log ended at "shutting down"), and
    // how much is left for the next start.
    logs.wait_for(&["stopped; 3 deliveries wait in the spool for the next start"])
        .await;

    // Nothing was lost: after a restart all three go out, in order.
    target.hang.store(false, Ordering::SeqCst);
    let (child, logs) = spawn();
    for n in 1..=3 {
        assert_eq!(target.next().await, format!(r#"{{"seq":{n}}}"#));
    }
    stop(child).await;
    logs.wait_for(&["stopped; nothing waits: everything received was delivered"])
        .await;
}

/// Regression: a relay started again with another target left the old target's queue in the
/// spool without a word, so its events looked lost. Now the start says how many wait there,
/// for which target, and how to deliver or see them.
#[tokio::test]
async fn regression_a_relay_started_with_another_target_said_nothing_of_the_old_queue() {
    the_old_queue_is_said_and_purged_as_said("").await;
}

/// Regression (helper-114): for an old target with a query (left out of the log: it often
/// carries a token), the line's purge command gave no channel key, and with two channels
/// queued for that target nothing told which queue was the one left behind.
#[tokio::test]
async fn regression_the_purge_said_for_a_target_with_a_query_had_no_channel_key() {
    the_old_queue_is_said_and_purged_as_said("?token=T0k3n").await;
}

/// A relay forwarding to a target that is down (with `query`), started again with another:
/// the start says what waits for the old one, and its purge command, run as said (the old
/// target written in, query and all, where the line says `TARGET`), drops it.
async fn the_old_queue_is_said_and_purged_as_said(query: &str) {
    let channel = FakeChannel::start().await;
    let state = tempfile::tempdir().unwrap();
    // Nothing listens there: the event waits in the spool for it.
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let old = format!("http://{}/old{query}", gone.local_addr().unwrap());
    let shown = format!(
        "http://{}/old{}",
        gone.local_addr().unwrap(),
        if query.is_empty() { "" } else { "?…" }
    );
    drop(gone);
    let mut target = FakeTarget::start().await;
    let spawn = |to: &str| {
        watched(
            smee_relay()
                .args(["forward", &channel.url("Moved"), to])
                .arg("--state-dir")
                .arg(state.path()),
        )
    };
    let (child, logs) = spawn(&old);
    logs.wait_for(&["connected to channel"]).await;
    channel.send_webhook(1, &seq(1));
    // The retry names its route: with several targets each has its own event 1 (helper-116).
    logs.wait_for(&["retrying in", &format!("route=\"{shown}\"")])
        .await;
    assert!(!logs.all().contains("still queued for"), "{}", logs.all());
    stop(child).await;

    let (child, logs) = spawn(&target.url("/new"));
    let state_dir = format!(" --state-dir {}", state.path().display());
    let list = format!("events list --status pending{state_dir}`");
    let line = logs
        .wait_for(&[
            "1 event from this channel is still queued for",
            &shown,
            &list,
        ])
        .await;
    assert!(query.is_empty() || !line.contains(query), "{line}");
    // The purge the line gives, a queue's name quoted as one shell word.
    let (_, purge) = line.split_once("run `").expect("a purge command");
    let (purge, _) = purge.split_once('`').unwrap();
    assert!(
        purge.starts_with("smee-relay events purge --queue '"),
        "{line}"
    );
    let as_printed = purge.to_string();
    let purge = match query {
        "" => purge.to_string(),
        _ => purge.replacen(" TARGET'", &format!(" {old}'"), 1),
    };
    assert!(purge.ends_with(&format!(" {old}'{state_dir}")), "{line}");
    // What comes now goes to the new target.
    logs.wait_for(&["connected to channel"]).await;
    channel.send_webhook(2, &seq(2));
    assert_eq!(target.next().await.body, r#"{"seq":2}"#);

    let run = |purge: String| async move {
        let mut shell = tokio::process::Command::new("sh");
        shell
            .arg("-c")
            .arg(purge.replacen("smee-relay", env!("CARGO_BIN_EXE_smee-relay"), 1));
        shell.output().await.unwrap()
    };
    let run_purge = || run(purge.clone());
    // Not while the relay runs that channel: it would deliver what it had read all the same.
    let refused = run_purge().await;
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(
        said.contains("runs this queue's channel") && said.contains("Stop it"),
        "{said}"
    );
    stop(child).await;
    if !query.is_empty() {
        // Regression (helper-116): run with `TARGET` left in, or with the name as the line
        // shows it (`?…`), the purge said "no delivery waits on that queue" and exited 0.
        for (given, hint) in [
            (as_printed.clone(), "in place of TARGET"),
            (
                as_printed.replacen(" TARGET'", &format!(" {shown}'"), 1),
                "stands for a query",
            ),
        ] {
            let out = run(given).await;
            let said = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{out:?}");
            assert!(
                said.starts_with("error: no queue named '") && said.contains(hint),
                "{said}"
            );
            assert!(said.contains(&format!(" {shown}' (1 delivery)")), "{said}");
        }
    }
    // Stopped, the line's advice is taken as printed, through a shell: the queue is dropped,
    // and the next start has nothing to say.
    let purged = run_purge().await;
    let said = String::from_utf8_lossy(&purged.stdout);
    assert!(purged.status.success(), "{purged:?}");
    assert!(
        said.contains(&format!("purged 1 delivery queued for {shown}")),
        "{said}"
    );
    let (child, logs) = spawn(&target.url("/new"));
    logs.wait_for(&["connected to channel"]).await;
    channel.send_webhook(3, &seq(3));
    assert_eq!(target.next().await.body, r#"{"seq":3}"#);
    assert!(!logs.all().contains("still queued for"), "{}", logs.all());
    stop(child).await;
}

/// Regression: a relay started again without one of its channels (another channel on its
/// command line, or the channel taken out of its config while it was stopped) left that
/// channel's queue in the spool without a word, so its events looked lost. Now the start says
/// how many wait, from which channel, for which target; but not while another relay sharing
/// the state directory runs that channel (it delivers them).
#[tokio::test]
async fn regression_a_relay_started_without_a_channel_said_nothing_of_its_queue() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let state = tempfile::tempdir().unwrap();
    // Nothing listens there: the event waits in the spool for it.
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = format!("http://{}/down", gone.local_addr().unwrap());
    drop(gone);
    let spawn = |name: &str, to: &str| {
        watched(
            smee_relay()
                .args(["forward", &channel.url(name), to])
                .arg("--state-dir")
                .arg(state.path()),
        )
    };
    let (child, logs) = spawn("Dropped", &down);
    logs.wait_for(&["connected to channel"]).await;
    channel.send_webhook(1, &seq(1));
    logs.wait_for(&["retrying in"]).await;
    // Beside it, a relay of another channel on the same state directory: the queue is served.
    let (beside, beside_logs) = spawn("Beside", &target.url("/beside"));
    beside_logs.wait_for(&["connected to channel"]).await;
    stop(beside).await;
    // Its stop line counts its own queues, not the other relay's (that one's waits).
    beside_logs
        .wait_for(&["stopped; nothing waits: everything received was delivered"])
        .await;
    assert!(
        !beside_logs.all().contains("does not subscribe to"),
        "{}",
        beside_logs.all()
    );
    stop(child).await;

    let (child, logs) = spawn("Kept", &target.url("/kept"));
    let list = format!(
        "events list --status pending --state-dir {}`",
        state.path().display()
    );
    let line = logs
        .wait_for(&[
            "1 event from a channel this relay does not subscribe to is still queued for",
            &down,
            &list,
        ])
        .await;
    assert!(
        line.contains("/Drop…"),
        "the channel is named (redacted): {line}"
    );
    // The channel it has is relayed as ever.
    logs.wait_for(&["connected to channel"]).await;
    channel.send_webhook(2, &seq(2));
    assert_eq!(target.next().await.body, r#"{"seq":2}"#);
    stop(child).await;
}

/// ... and events left in a channel's cluster outbox, found by a relay started without the
/// cluster, are named as such: no target to start again, but the cluster's config.
#[tokio::test]
async fn events_left_in_a_cluster_outbox_are_named_at_a_start_without_the_cluster() {
    let channel = FakeChannel::start().await;
    let target = FakeTarget::start().await;
    let state = tempfile::tempdir().unwrap();
    let url = channel.url("Outboxed");
    {
        let spool = smee_relay::spool::Spool::open(state.path()).unwrap();
        let key = smee_relay::spool::lock::channel_key(&url);
        let write = smee_relay::spool::Write::Append {
            channel: url.clone(),
            routes: vec![smee_relay::cluster::outbox_route(&key)],
            events: vec![smee_relay::event::Event {
                sse_id: Some("1".into()),
                timestamp_ms: None,
                headers: vec![],
                query: vec![],
                body: b"{}".to_vec().into(),
            }]
            .into(),
            cursor: None,
        };
        let room = smee_relay::spool::Limits { max_bytes: 1 << 30 };
        spool.write(&[write], room).unwrap();
    }
    let (child, logs) = watched(
        smee_relay()
            .args(["forward", &url, &target.url("/hook")])
            .arg("--state-dir")
            .arg(state.path()),
    );
    logs.wait_for(&[
        "1 event from this channel is still in its cluster outbox",
        "[cluster]",
    ])
    .await;
    assert!(!logs.all().contains("still queued for"), "{}", logs.all());
    stop(child).await;
}

/// ... and a reload that removed a target said its events "stay in the spool" at INFO, with no
/// count and nothing to do about them.
/// Regression (a new user's finding): once a target was back, nothing made the relay retry an
/// event it waited on (up to 5 min of backoff, or an hour a `Retry-After` asked): a reload now
/// does, as a restart did.
#[tokio::test]
async fn regression_a_reload_retries_a_waiting_delivery_now() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    target.answer_with_retry_after(503, 3600);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[[channel]]\nurl = \"{}\"\nforward = [\"{}\"]\n",
            channel.url("RetryNow"),
            target.url("/hook")
        ),
    )
    .unwrap();
    let (child, logs) = spawn_run(&config, "http://127.0.0.1:1/unused", false);
    logs.wait_for(&["connected to channel"]).await;
    channel.send_webhook(1, &seq(1));
    logs.wait_for(&["retrying in 1h"]).await;
    signal(&child, "HUP");
    logs.wait_for(&["retrying now (SIGHUP)"]).await;
    // The first request was the refused one; the retry is the second.
    for _ in 0..2 {
        assert_eq!(target.next().await.body, r#"{"seq":1}"#);
    }
    stop(child).await;
}

#[tokio::test]
async fn a_reload_that_removes_a_target_says_what_still_waits_for_it() {
    let channel = FakeChannel::start().await;
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let old = format!("http://{}/old", gone.local_addr().unwrap());
    drop(gone);
    let mut target = FakeTarget::start().await;
    let new = target.url("/new");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let write = |targets: &[&str], idle: &str| {
        let targets = targets
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>();
        let body = format!(
            "[[channel]]\nurl = \"{}\"\nforward = [{}]\nidle_timeout = \"{idle}\"\n",
            channel.url("Removed"),
            targets.join(", ")
        );
        std::fs::write(&config, body).unwrap();
    };
    write(&[&old, &new], "90s");
    let (child, logs) = spawn_run(&config, "http://127.0.0.1:1/unused", false);
    logs.wait_for(&["connected to channel"]).await;
    for n in 1..=2 {
        channel.send_webhook(n, &seq(n));
        assert_eq!(target.next().await.body, format!(r#"{{"seq":{n}}}"#));
    }
    // The channel restarts too (its idle timeout changed): still one line for the queue.
    write(&[&new], "60s");
    signal(&child, "HUP");
    logs.wait_for(&["config reloaded", "removed"]).await;
    logs.wait_for(&["2 events from this channel are still queued for", &old])
        .await;
    wait_count(&logs, "connected to channel", 2).await;
    assert_eq!(count(&logs, "still queued for"), 1, "{}", logs.all());
    // Removing a target that has nothing waiting is one INFO line.
    write(&[&target.url("/other")], "60s");
    signal(&child, "HUP");
    logs.wait_for(&["target removed; nothing was queued for it", &new])
        .await;
    stop(child).await;
}

/// Regression: an idle timeout below the server's 30 s ping reconnected an idle channel again
/// and again, with `/healthz` 503 most of the time, and nothing said why.
#[tokio::test]
async fn regression_an_idle_timeout_below_the_ping_interval_was_not_questioned() {
    let channel = FakeChannel::start().await;
    let target = FakeTarget::start().await;
    let spawn = |extra: &[&str]| {
        watched(
            smee_relay()
                .args(["forward", &channel.url("Idle"), &target.url("/hook")])
                .args(extra),
        )
    };
    // As long as the ping interval: expires just before each ping.
    let (child, logs) = spawn(&["--idle-timeout", "30s"]);
    logs.wait_for(&[
        "WARN",
        "idle timeout 30s leaves little or no room over the 30s between the pings",
        "at least 45s",
    ])
    .await;
    stop(child).await;
    // The default (90 s) is not questioned.
    let (child, logs) = spawn(&[]);
    logs.wait_for(&["connected to channel"]).await;
    assert!(!logs.all().contains("ping interval"), "{}", logs.all());
    stop(child).await;
}

/// Regression (item 4): SIGHUP ended `forward` (exit 129). It is logged and ignored.
#[tokio::test]
async fn regression_sighup_does_not_end_forward() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let (mut child, logs) =
        watched(smee_relay().args(["forward", &channel.url("Hangup"), &target.url("/hook")]));
    channel.wait_connections(1).await;
    logs.wait_for(&["connected to channel"]).await;
    for round in 1..=3 {
        signal(&child, "HUP");
        wait_count(&logs, "SIGHUP", round).await;
    }
    assert!(child.try_wait().unwrap().is_none(), "still running");
    channel.send_webhook(1, &seq(1));
    assert_eq!(target.next().await.body, r#"{"seq":1}"#);
    stop(child).await;
}

/// Regression (an adversary's finding): a SIGHUP in the first milliseconds after the program
/// started, before its handler was installed, ended it (exit 129), 10 times in 10. Made
/// deterministic here: the relay starts with SIGHUP blocked, so the one sent at once waits,
/// pending, for whatever the program does first (it used to keep it blocked: no reload ever).
#[tokio::test]
async fn regression_a_sighup_right_after_start_does_not_end_it() {
    let channel = FakeChannel::start().await;
    let target = FakeTarget::start().await;
    let mut command = smee_relay();
    command.args(["forward", &channel.url("EarlyHup"), &target.url("/hook")]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let mut hangup: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut hangup);
            libc::sigaddset(&mut hangup, libc::SIGHUP);
            libc::pthread_sigmask(libc::SIG_BLOCK, &hangup, std::ptr::null_mut());
            Ok(())
        });
    }
    let (mut child, logs) = watched(&mut command);
    signal(&child, "HUP");
    logs.wait_for(&["connected to channel"]).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "ended by an early SIGHUP:\n{}",
        logs.all()
    );
    // And later ones reach it.
    signal(&child, "HUP");
    wait_count(&logs, "SIGHUP", 1).await;
    stop(child).await;
}

/// Regression (item 10): with stderr a closed pipe (the log reader exited), logging panicked
/// in tasks: deliveries stopped and SIGTERM was ignored.
#[tokio::test]
async fn regression_a_closed_stderr_stops_neither_delivery_nor_shutdown() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let mut child = smee_relay()
        .args(["forward", &channel.url("NoReader"), &target.url("/hook")])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    channel.wait_connections(1).await;
    // The reader goes away: every log line from now on meets EPIPE.
    drop(child.stderr.take());
    for n in 1..=20 {
        channel.send_webhook(n, &seq(n));
    }
    for n in 1..=20 {
        assert_eq!(target.next().await.body, format!(r#"{{"seq":{n}}}"#));
    }
    stop(child).await;
}

/// `forward CHANNEL TARGET` serving `/metrics` on `metrics`, its spool in `state`.
fn forward_with_metrics(
    channel: &str,
    target: &str,
    metrics: &str,
    state: &std::path::Path,
) -> (tokio::process::Child, support::LogWatch) {
    watched(
        smee_relay()
            .args(["forward", channel, target, "--metrics-listen", metrics])
            .arg("--state-dir")
            .arg(state),
    )
}

/// `/metrics` of the relay at `addr` once it shows `needle` (within the patience).
async fn metrics_showing(addr: &str, needle: &str) -> String {
    tokio::time::timeout(support::PATIENCE, async {
        loop {
            let text = metrics_text(addr).await;
            if text.contains(needle) {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{needle} shows in /metrics"))
}

async fn metrics_text(addr: &str) -> String {
    smee_relay::http::client_builder()
        .build()
        .unwrap()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The relay's `/metrics` had no `# HELP` lines (the serve command's had): Prometheus and
/// Grafana showed each series with no word on what it counts.
#[tokio::test]
async fn regression_relay_metrics_had_no_help_lines() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let state = tempfile::tempdir().unwrap();
    let metrics = support::unused_addr().to_string();
    let (child, _logs) = forward_with_metrics(
        &channel.url("Help"),
        &target.url("/hook"),
        &metrics,
        state.path(),
    );
    channel.wait_connections(1).await;
    channel.send_webhook(1, &seq(1));
    target.next().await;
    let text = metrics_showing(&metrics, "smee_relay_deliveries_total{").await;
    stop(child).await;
    for name in text
        .lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
    {
        // A histogram's series are NAME_bucket, NAME_sum and NAME_count.
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|family| text.contains(&format!("# HELP {family} ")))
            .unwrap_or(name);
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "no # HELP for {name}:\n{text}"
        );
    }
}

/// Regression (item 16): credentials in a target URL were printed in logs, `/metrics` and
/// `events list`, and never sent. They go as Basic auth now, and show as `user:***`.
#[tokio::test]
async fn regression_target_credentials_go_as_basic_auth_and_are_never_shown() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let state = tempfile::tempdir().unwrap();
    let url = format!("http://alice:pa%24%24word@{}/hook", target.addr);
    let metrics = support::unused_addr().to_string();
    let (child, logs) = forward_with_metrics(&channel.url("Creds"), &url, &metrics, state.path());
    channel.wait_connections(1).await;
    channel.send_webhook(1, &seq(1));
    let request = target.next().await;
    // base64("alice:pa$$word"): percent-decoded, as curl sends it.
    assert_eq!(
        request.header("authorization"),
        Some("Basic YWxpY2U6cGEkJHdvcmQ=")
    );
    let shown = format!("alice:***@{}/hook", target.addr);
    logs.wait_for(&[&format!("POST {shown} -> 200")]).await;

    let route = format!("route=\"http://{shown}\"");
    let text = metrics_showing(&metrics, &route).await;
    let list = smee_relay()
        .args(["events", "list", "--state-dir"])
        .arg(state.path())
        .output()
        .await
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(list.contains(&shown), "{list}");
    stop(child).await;
    for (what, text) in [
        ("logs", logs.all()),
        ("/metrics", text),
        ("events list", list),
    ] {
        assert!(
            !text.contains("word") && !text.contains("pa%24"),
            "{what} shows the password:\n{text}"
        );
    }
}

/// Regression (helper-110): a token in a target's query (`/hook?token=...`) was sent, as it
/// should be, but also named every log line and `/metrics` label of the route. It shows as
/// `/hook?…` there now; `events list` (the spool's owner, on the machine) still shows it whole.
#[tokio::test]
async fn regression_a_token_in_a_target_s_query_named_the_route_in_logs_and_metrics() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    target.answer_with(&[503]);
    let state = tempfile::tempdir().unwrap();
    let url = format!("http://{}/hook?token=Tok3nS3cret", target.addr);
    let metrics = support::unused_addr().to_string();
    let (child, logs) = forward_with_metrics(&channel.url("Query"), &url, &metrics, state.path());
    channel.wait_connections(1).await;
    channel.send_webhook(1, &seq(1));
    // Refused once, then taken: both attempts carry the token.
    for _ in 0..2 {
        let request = target.next().await;
        assert_eq!(request.uri, "/hook?token=Tok3nS3cret");
    }
    logs.wait_for(&["-> 200"]).await;
    let route = format!("route=\"http://{}/hook?…\"", target.addr);
    let text = metrics_showing(&metrics, &route).await;
    stop(child).await;
    for (what, text) in [("logs", logs.all()), ("/metrics", text)] {
        assert!(!text.contains("Tok3n"), "{what} shows the token:\n{text}");
    }
}

/// Regression (item 16): control characters in event-derived text (an SSE id, an event name)
/// reached the logs raw, so a sender could drive the reader's terminal or forge lines.
#[tokio::test]
async fn regression_control_characters_from_events_are_escaped_in_logs() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let (child, logs) =
        watched(smee_relay().args(["forward", &channel.url("Escapes"), &target.url("/hook")]));
    channel.wait_connections(1).await;
    logs.wait_for(&["connected to channel"]).await;
    // A bad frame whose id clears the screen, and a Port-shaped body whose action paints red
    // and forges a second line.
    channel.send_raw("id: 7\u{1b}[2J\ndata: not json\n\n");
    channel.send_webhook(
        8,
        r#"{"body":{"action":"\u001b[31mUPDATE\nERROR forged","resourceType":"entity"}}"#,
    );
    target.next().await;
    // The id is refused (it is no header value) and shown escaped, however it is spelled.
    logs.wait_for(&["ignoring event id", "[2J"]).await;
    // An action that is no word is no label at all (helper-121), escaped or not.
    let line = logs.wait_for(&["POST ", "-> 200"]).await;
    assert!(
        !line.contains("UPDATE") && !line.contains("forged"),
        "{line}"
    );
    assert!(!logs.all().contains('\u{1b}'), "{}", logs.all());
    assert!(
        !logs.all().lines().any(|l| l.starts_with("ERROR forged")),
        "{}",
        logs.all()
    );
    stop(child).await;
}

/// Regression (item 7): `Retry-After: 999999999` parked the route for decades. It waits
/// `--max-retry-after` instead, and says so.
#[tokio::test]
async fn regression_a_huge_retry_after_waits_max_retry_after_and_is_logged() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    target.answer_with_retry_after(503, 999_999_999);
    let (child, logs) = watched(
        smee_relay()
            .args(["forward", &channel.url("Capped"), &target.url("/hook")])
            .args(["--max-retry-after", "1s"]),
    );
    channel.wait_connections(1).await;
    logs.wait_for(&["connected to channel"]).await;
    channel.send_webhook(1, &seq(1));
    target.next().await;
    let first = Instant::now();
    assert_eq!(target.next().await.body, r#"{"seq":1}"#);
    assert!(
        first.elapsed() < Duration::from_secs(5),
        "{:?}",
        first.elapsed()
    );
    logs.wait_for(&["Retry-After", "waiting 1s instead", "--max-retry-after"])
        .await;
    stop(child).await;
}
