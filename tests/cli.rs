//! The command line as a newcomer meets it: hints in errors, and nothing done that was not asked
//! for. Real binary; fake channel and targets on loopback.

mod support;

use std::process::Stdio;
use std::time::Duration;

use support::{FakeChannel, FakeTarget, LogWatch, PATIENCE, refused, smee_relay};

/// `smee-relay forward ARGS...`, its stderr watched.
fn forward_watched(args: &[&str]) -> (tokio::process::Child, LogWatch) {
    let mut child = smee_relay()
        .arg("forward")
        .args(args)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let logs = LogWatch::new(child.stderr.take().unwrap());
    (child, logs)
}

/// An `http://127.0.0.1:PORT` that refuses connections: nothing listens on the port.
fn refusing_url() -> String {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", dead.local_addr().unwrap())
}

/// That a relay whose channel answers `status` says `hint` in its retry line, without the
/// channel's id (a secret).
async fn refusal_hints(status: u16, hint: &str) {
    let channel = FakeChannel::start().await;
    channel.refuse_with(status, "text/plain");
    let target = FakeTarget::start().await;
    let (_child, logs) = forward_watched(&[&channel.url("Private1"), &target.url("/")]);
    let line = logs
        .wait_for(&[&status.to_string(), hint, "retry_in="])
        .await;
    assert!(!line.contains("Private1"), "channel id leaked: {line}");
}

#[tokio::test]
async fn regression_a_channel_answering_401_says_a_token_is_needed() {
    refusal_hints(
        401,
        "the channel requires a token: --token (or SMEE_RELAY_TOKEN), or token_env in a config's [[channel]]",
    )
    .await;
}

/// Regression: a URL that is no channel (a server root, a mistyped path, a server that is not
/// a smee server) was retried forever with a bare "the server answered 404 Not Found".
#[tokio::test]
async fn regression_a_channel_url_answering_404_got_no_hint() {
    refusal_hints(404, "is it a smee channel URL").await;
}

/// Regression (helper-121): a target given with `--port` or `--path` got clap's bare "cannot
/// be used with"; the refusal now says why, what to do, and that `smee` takes both.
#[tokio::test]
async fn regression_a_target_with_path_was_refused_without_a_reason() {
    for line in [
        &[
            "-u",
            "http://127.0.0.1:9/ch",
            "-t",
            "http://127.0.0.1:3000/",
            "-P",
            "/hook",
        ][..],
        &[
            "forward",
            "http://127.0.0.1:9/ch",
            "http://127.0.0.1:3000/",
            "-p",
            "4000",
        ],
    ] {
        let out = support::run_to_end(smee_relay().args(line)).await;
        assert_eq!(out.code, Some(2), "{}", out.stderr);
        assert!(
            out.stderr.contains("cannot be used with")
                && out.stderr.contains("would go unused: put them in it")
                && out
                    .stderr
                    .contains("`smee` (smee-client's command line) takes both"),
            "{}",
            out.stderr
        );
    }
}

/// Regression (helper-150): `smee-relay -v`, smee-client's version flag, met clap's bare
/// "requires a subcommand": `-v` is `--verbose` here, and the refusal now names the version
/// flag.
#[tokio::test]
async fn regression_v_alone_did_not_say_where_the_version_is() {
    let out = support::run_to_end(smee_relay().arg("-v")).await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("requires a subcommand")
            && out.stderr.contains("-v is --verbose here")
            && out.stderr.contains("`smee-relay --version` (or -V)"),
        "{}",
        out.stderr
    );
}

/// Regression (helper-121): an `events list` with nothing to list printed a bare header.
#[tokio::test]
async fn regression_an_empty_events_list_was_a_bare_header() {
    let state = tempfile::tempdir().unwrap();
    drop(smee_relay::spool::Spool::open(state.path()).unwrap());
    for (status, note) in [
        (Some("dead"), "note: no delivery is dead"),
        (None, "note: the spool holds no events"),
    ] {
        let mut command = smee_relay();
        command
            .args(["events", "list", "--state-dir"])
            .arg(state.path());
        if let Some(status) = status {
            command.args(["--status", status]);
        }
        let out = support::run_to_end(&mut command).await;
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        assert!(out.stderr.contains(note), "{}", out.stderr);
        assert!(out.stdout.starts_with("ID  RECEIVED"), "{}", out.stdout);
    }
}

/// A relay that never reached its channel logged "disconnected from channel" and a cryptic
/// `resume_after=-`: it now says it cannot connect, and names no event it has not seen.
#[tokio::test]
async fn regression_a_relay_that_never_connected_said_disconnected() {
    let channel = format!("{}/never", refusing_url());
    let target = FakeTarget::start().await;
    let (_child, logs) = forward_watched(&[&channel, &target.url("/")]);
    let line = logs
        .wait_for(&["cannot connect to channel", "retry_in="])
        .await;
    assert!(
        !line.contains("disconnected") && !line.contains("resume_after"),
        "{line}"
    );
}

#[tokio::test]
async fn regression_demo_ignores_slack_webhook_url_in_the_environment() {
    let mut slack = FakeTarget::start().await;
    let output = tokio::time::timeout(
        PATIENCE * 3,
        smee_relay()
            .arg("demo")
            .env("SLACK_WEBHOOK_URL", slack.url("/services/T/B/X"))
            // As an installed binary runs (`cargo run` sets CARGO, and so does `cargo test`).
            .env_remove("CARGO")
            .output(),
    )
    .await
    .expect("the demo finished in time")
    .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("FIRING cpu-high"));
    assert!(
        stdout.contains("`smee-relay forward https://smee.io/YOUR_CHANNEL --port 3000`"),
        "{stdout}"
    );
    slack.assert_quiet(Duration::from_millis(200)).await;
}

/// With a proxy in the environment (a corporate laptop), the demo failed at once: "cannot post
/// to the demo channel: error sending request", as its client, the relay's channel client and
/// its Port client all sent loopback requests to the proxy. Loopback is now reached directly.
#[tokio::test]
async fn regression_the_demo_failed_with_a_proxy_in_the_environment() {
    // A proxy that refuses every connection: anything sent to it fails.
    let proxy = refusing_url();
    let output = tokio::time::timeout(
        PATIENCE * 3,
        smee_relay()
            .arg("demo")
            .env("HTTP_PROXY", &proxy)
            .env("HTTPS_PROXY", &proxy)
            .env("ALL_PROXY", &proxy)
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .env("CARGO", "cargo")
            .output(),
    )
    .await
    .expect("the demo finished in time")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("app got issues") && stdout.contains("status: {\"status\":\"SUCCESS\"")
    );
    // Run under cargo (CARGO set, as by `cargo run`), the demo ended by naming `smee-relay`,
    // which was on no PATH: its next commands are cargo's.
    assert!(
        stdout.contains("`cargo run --release -- forward https://smee.io/YOUR_CHANNEL"),
        "{stdout}"
    );
}

/// A `demo` with its temporary directory in a directory of its own, once it made its state
/// directory there; and how many entries that directory holds.
async fn demo_with_its_state_directory() -> (tempfile::TempDir, tokio::process::Child) {
    let tmp = tempfile::tempdir().unwrap();
    let demo = smee_relay()
        .arg("demo")
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while entries(tmp.path()) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no state directory made"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (tmp, demo)
}

fn entries(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

fn signal(child: &tokio::process::Child, name: &str) {
    let pid = child.id().expect("running").to_string();
    let sent = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid])
        .status();
    assert!(sent.unwrap().success(), "kill -{name} {pid}");
}

/// Once `signals` are sent to a demo whose state directory is made: that it exits with `code`
/// and leaves its temporary directory empty; stopped by one signal, it says so once.
async fn demo_stops_clean(signals: &[&str], code: i32, why: &str) {
    let (tmp, demo) = demo_with_its_state_directory().await;
    for name in signals {
        signal(&demo, name);
    }
    let output = tokio::time::timeout(PATIENCE, demo.wait_with_output())
        .await
        .expect("the demo stopped")
        .unwrap();
    let status = output.status;
    assert_eq!(status.code(), Some(code), "{why}: {status}");
    if signals.len() == 1 {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            stderr
                .matches("the demo was stopped before it ended")
                .count(),
            1,
            "{stderr}"
        );
    }
    assert_eq!(
        entries(tmp.path()),
        0,
        "the state directory was left behind"
    );
}

/// A demo stopped by SIGTERM (or Ctrl-C) left its state directory in the temporary directory:
/// it had no signal handler, and its clean-up never ran.
#[tokio::test]
async fn regression_a_demo_stopped_by_a_signal_left_its_state_directory() {
    // 130 as for Ctrl-C (helper-133: it was 1, a failure).
    demo_stops_clean(&["TERM"], 130, "stopped by its own handler, saying so").await;
}

/// Closing the demo's terminal (SIGHUP) killed it where it stood, its state directory left in
/// the temporary directory: it now stops as on Ctrl-C.
#[tokio::test]
async fn regression_a_demo_whose_terminal_closed_left_its_state_directory() {
    demo_stops_clean(&["HUP"], 130, "stopped by its own handler").await;
}

/// Ctrl-C pressed twice exits at once (130), and no destructor runs then: the demo's state
/// directory was left behind.
#[tokio::test]
async fn regression_a_demo_stopped_twice_left_its_state_directory() {
    // Two signals that reach it at once, so that the second comes before the first's stop
    // can finish (the same signal twice would be one while it is stopped).
    demo_stops_clean(
        &["STOP", "INT", "TERM", "CONT"],
        130,
        "exited at the second signal",
    )
    .await;
}

/// A spool with two delivered events in it (a query, a header with a quote), and its directory.
async fn spool_with_two_events() -> std::path::PathBuf {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let relay = support::Relay::start(
        &channel,
        support::relay_options(&channel, &target.url("/hook")),
    )
    .await;
    channel.send_webhook(
        1,
        r#"{"content-type":"application/json","x-github-event":"it's","body":{"n":1,"s":"a b"},"query":{"a":"1 2"}}"#,
    );
    channel.send_webhook(
        2,
        r#"{"content-type":"application/json","x-github-event":"push","body":[2],"query":{}}"#,
    );
    target.take(2).await;
    let state_dir = relay.state_dir.clone();
    relay.stop().await;
    state_dir
}

async fn events(state_dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    tokio::time::timeout(
        PATIENCE,
        smee_relay()
            .arg("events")
            .args(args)
            .arg("--state-dir")
            .arg(state_dir)
            .output(),
    )
    .await
    .unwrap()
    .unwrap()
}

/// A relay forwarding to `target`, which is down, took one event, queued it, and stopped: its
/// state directory.
async fn one_queued_for(target: &str) -> std::path::PathBuf {
    let channel = FakeChannel::start().await;
    let relay = support::Relay::start(&channel, support::relay_options(&channel, target)).await;
    channel.send_webhook(1, r#"{"content-type":"application/json","body":{"n":1}}"#);
    let state_dir = relay.state_dir.clone();
    support::wait_for(PATIENCE, "the delivery queued", || {
        let state_dir = state_dir.clone();
        async move {
            let out = events(&state_dir, &["list", "--status", "pending"]).await;
            String::from_utf8_lossy(&out.stdout)
                .contains("pending")
                .then_some(())
        }
    })
    .await;
    relay.stop().await;
    state_dir
}

/// Regression (helper-150): `events replay ID` said only "queued 1 delivery again": queued for
/// a target the relay no longer had (a new one in its config), the event waited unseen. Each
/// target is named, and one whose channel no relay runs is said to wait for one.
#[tokio::test]
async fn regression_replay_did_not_say_for_which_target_it_queued() {
    let state_dir = spool_with_two_events().await;
    let out = events(&state_dir, &["replay", "1"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"queued 1 delivery again"), "{stdout}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("  1 for http://127.0.0.1:")
                && l.contains("/hook")
                && l.contains("no relay runs its channel now")),
        "{stdout}"
    );
}

/// Regression (a new user's finding): `purge --queue` needed the channel's key, which no
/// `events` command shows; a target alone is now enough when one queue of it holds deliveries,
/// and a target with none lists the queues that do.
#[tokio::test]
async fn regression_events_purge_queue_takes_a_target_alone() {
    let addr = support::unused_addr();
    let down = format!("http://{addr}/hook");
    let state_dir = one_queued_for(&down).await;

    let out = events(
        &state_dir,
        &["purge", "--queue", "http://127.0.0.1:1/other"],
    )
    .await;
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        said.contains("no queue of http://127.0.0.1:1/other holds deliveries")
            && said.contains(&format!(" {down}' (1 delivery)")),
        "{said}"
    );
    let out = events(&state_dir, &["purge", "--queue", &down]).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("purged 1 delivery queued for {down}")
    );
}

/// Regression (helper-113): a target with a password and a query could not be purged as given
/// (the queue names it with the password as `***`, as the relay's line asking for the target
/// "as given" does not say), and the refusal repeated the password given in clear, and
/// (helper-114) the query of the queues it listed.
#[tokio::test]
async fn regression_events_purge_took_a_target_with_a_password_only_as_the_queue_names_it() {
    let addr = support::unused_addr();
    let target = format!("http://bob:hunter2@{addr}/hook?token=SECRET");
    let state_dir = one_queued_for(&target).await;

    let wrong = format!("http://bob:wrongpass@{addr}/other?token=SECRET");
    let out = events(&state_dir, &["purge", "--queue", &wrong]).await;
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        said.contains(&format!("no queue of http://bob:***@{addr}/other?… holds")),
        "{said}"
    );
    assert!(!said.contains("wrongpass"), "{said}");
    // Nor the query of the queues it lists (helper-114): each by its whole name, the query
    // elided, and what to write in its place.
    assert!(!said.contains("SECRET"), "{said}");
    assert!(
        said.contains(&format!(" http://bob:***@{addr}/hook?…' (1 delivery)"))
            && said.contains("write the target as configured in its place"),
        "{said}"
    );
    let out = events(&state_dir, &["purge", "--queue", &target]).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("purged 1 delivery queued for http://bob:***@{addr}/hook?…")
    );
}

/// `cannot serve on 127.0.0.1:3333: cannot listen on 127.0.0.1:3333: Address already in use`:
/// the address twice and no word of what to do. Still exit 1: under systemd, a port the
/// previous process has not let go yet is worth the unit's retry.
#[tokio::test]
async fn regression_a_port_in_use_was_said_twice_without_what_to_do() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let state = tempfile::tempdir().unwrap();
    // Regression (helper-131): set in the config, it was still called a flag.
    let config = state.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\nmetrics_listen = {addr:?}\n[[channel]]\nurl = \"http://127.0.0.1:9/channel\"\nforward = [\"http://127.0.0.1:9/\"]\n",
            state.path().join("run")
        ),
    )
    .unwrap();
    let runs = [
        (vec!["serve", "--listen", &addr], "--listen"),
        (
            vec!["run", "--config", config.to_str().unwrap()],
            "metrics_listen in the config",
        ),
        (
            vec![
                "forward",
                "-u",
                "http://127.0.0.1:9/channel",
                "-t",
                "http://127.0.0.1:9/",
                "--state-dir",
                state.path().to_str().unwrap(),
                "--metrics-listen",
                &addr,
            ],
            "--metrics-listen",
        ),
    ];
    for (args, flag) in runs {
        let out = tokio::time::timeout(PATIENCE, smee_relay().args(&args).output())
            .await
            .expect("exits")
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {said}");
        assert_eq!(said.matches(addr.as_str()).count(), 1, "{args:?}: {said}");
        assert!(
            said.contains(&format!("stop it, or choose another {flag}")),
            "{args:?}: {said}"
        );
    }
}

/// Regression (helper-111): a command's error came as a daemon's log line
/// (`2026-12-06T10:00:00.000000Z ERROR no queue of ...`); a command says it as command-line tools
/// do, and a daemon still logs it.
#[tokio::test]
async fn regression_a_command_s_error_was_a_timestamped_log_line() {
    let dir = tempfile::tempdir().unwrap();
    drop(smee_relay::spool::Spool::open(dir.path()).unwrap());
    let out = events(dir.path(), &["purge", "--queue", "http://127.0.0.1:3000/x"]).await;
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        said.starts_with("error: no queue of http://127.0.0.1:3000/x holds deliveries"),
        "{said}"
    );
}

/// `events purge --queue` takes a queue's name as the relay gives it, and refuses what is not
/// one, and a cluster instance's spool (its queues are copies of the cluster's deliveries).
#[tokio::test]
async fn events_purge_queue_refuses_a_name_that_is_not_a_queue_and_a_cluster_spool() {
    let dir = tempfile::tempdir().unwrap();
    drop(smee_relay::spool::Spool::open(dir.path()).unwrap());
    let out = events(
        dir.path(),
        &["purge", "--queue", "http://127.0.0.1:3000/old"],
    )
    .await;
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        said.contains("no queue of http://127.0.0.1:3000/old holds deliveries"),
        "{said}"
    );
    let queue = "0123456789abcdef http://127.0.0.1:3000/old";
    let out = events(dir.path(), &["purge", "--queue", queue]).await;
    // No such queue: said (an error: a name mistyped is not a purge done), and no lock file
    // made for it.
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains(&format!(
            "no queue named '{queue}' holds deliveries; nothing waits in any queue: there is nothing to purge"
        )),
        "{said}"
    );
    assert!(!dir.path().join("channel-0123456789abcdef.lock").exists());
    let out = events(
        dir.path(),
        &["purge", "--queue", "0123456789ABCDEF http://x/"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let spool = smee_relay::spool::Spool::open(dir.path()).unwrap();
    spool.set_cluster(Some("prod")).unwrap();
    drop(spool);
    let out = events(dir.path(), &["purge", "--queue", queue, "--local"]).await;
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        said.contains("cluster prod") && said.contains("copies"),
        "{said}"
    );
}

#[tokio::test]
async fn events_export_gosmee_writes_scripts_that_replay_the_same_request() {
    let state_dir = spool_with_two_events().await;
    let dir = tempfile::tempdir().unwrap();
    let out = events(
        &state_dir,
        &[
            "export",
            "--format",
            "gosmee",
            "--dir",
            dir.path().to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let mut scripts: Vec<std::path::PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sh"))
        .collect();
    scripts.sort();
    assert_eq!(scripts.len(), 2);
    for script in &scripts {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(script).unwrap().permissions().mode();
        assert_eq!(mode & 0o111, 0o111, "{script:?} is not executable");
        assert!(script.with_extension("json").exists());
    }

    let mut other = FakeTarget::start().await;
    let status = tokio::process::Command::new(&scripts[0])
        .arg(other.url("/replayed"))
        .stdout(Stdio::null())
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let got = other.next().await;
    assert_eq!(got.uri, "/replayed?a=1+2");
    assert_eq!(&got.body[..], br#"{"n":1,"s":"a b"}"#);
    assert_eq!(got.header("x-github-event"), Some("it's"));
    assert_eq!(got.header("content-type"), Some("application/json"));
}

#[tokio::test]
async fn events_export_ndjson_has_one_line_per_event_with_the_exact_body() {
    let state_dir = spool_with_two_events().await;
    let out = events(&state_dir, &["export"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["body"], r#"{"n":1,"s":"a b"}"#);
    assert_eq!(lines[1]["body"], "[2]");
    assert_eq!(lines[0]["query"], serde_json::json!([["a", "1 2"]]));
}

#[tokio::test]
async fn events_replay_to_posts_every_event_in_order_and_fails_when_refused() {
    let state_dir = spool_with_two_events().await;
    let mut other = FakeTarget::start().await;
    let out = events(
        &state_dir,
        &["replay", "--since", "1h", "--to", &other.url("/again")],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("replayed 2 of 2 events"));
    let got = other.take(2).await;
    assert_eq!(got[0].uri, "/again?a=1+2");
    assert_eq!(&got[1].body[..], b"[2]");
    let first_id = got[0].header("x-smee-relay-delivery").unwrap().to_string();

    other.answer_with(&[500]);
    let out = events(
        &state_dir,
        &["replay", "--since", "1h", "--to", &other.url("/again")],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("1 answered with an error status"),
        "{stderr}"
    );
    // Regression: without a terminal the progress bar is hidden, and the per-event lines went
    // with it; the reason for a refusal must still be said.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("failed: target answered 500"), "{stdout}");
    // Regression: every replay is a new delivery, so a target that drops repeats takes it.
    let again = other.take(2).await;
    assert_ne!(
        again[0].header("x-smee-relay-delivery"),
        Some(first_id.as_str())
    );
}

/// Regression: `events replay ID... --to` stopped at an id not in the spool (never stored, or
/// pruned by the relay while a long replay ran) with "no event N in the spool": the events
/// after it were not sent, and no summary said what had been.
#[tokio::test]
async fn regression_replay_to_stopped_at_an_event_no_longer_in_the_spool() {
    let state_dir = spool_with_two_events().await;
    let listed = events(&state_dir, &["list", "--json"]).await;
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout).unwrap();
    let mut ids: Vec<u64> = rows.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 2, "{rows:?}");
    let missing = (ids[1] + 1000).to_string();
    let mut other = FakeTarget::start().await;
    let to = other.url("/again");
    let (first, second) = (ids[0].to_string(), ids[1].to_string());
    let out = events(
        &state_dir,
        &["replay", &first, &missing, &second, "--to", &to],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // Both stored events went, in order, past the missing one between them.
    let got = other.take(2).await;
    assert_eq!(got[0].uri, "/again?a=1+2");
    assert_eq!(&got[1].body[..], b"[2]");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("event {missing}: not in the spool")),
        "{stdout}"
    );
    assert!(stdout.contains("replayed 2 of 3 events"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("1 not in the spool"), "{stderr}");
}

/// Regression: a `--state-dir` naming a file was refused with "cannot create the state
/// directory X: File exists", as if the directory were there.
#[tokio::test]
async fn regression_a_state_dir_that_is_a_file_was_said_to_exist() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state");
    std::fs::write(&file, b"not a directory").unwrap();
    let stderr = refused(
        smee_relay()
            .args([
                "forward",
                "http://127.0.0.1:9/ch",
                "http://127.0.0.1:9/hook",
            ])
            .arg("--state-dir")
            .arg(&file),
    )
    .await;
    assert!(stderr.contains("is a file, not a directory"), "{stderr}");
    assert_eq!(std::fs::read(&file).unwrap(), b"not a directory");
}

/// Regression (a new user's finding): `check` said `ok` for a `state_dir` that cannot be
/// made, and `run` then exited 1, which the shipped unit restarts every 5 s for good.
#[tokio::test]
async fn regression_a_state_dir_that_cannot_be_made_is_warned_by_check_and_refused_by_run() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), b"").unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "state_dir = \"file/state\"\n[[channel]]\nurl = \"https://smee.io/AbCdEfGh\"\nforward = [\"http://127.0.0.1:3000/hook\"]\n",
    )
    .unwrap();
    let said = check_ok(&config).await;
    assert!(
        said.contains("warning: state_dir")
            && said.contains("file/state cannot be made")
            && said.contains("is not a directory"),
        "{said}"
    );
    // The config's state_dir, not the tests' own (SMEE_RELAY_STATE_DIR would win).
    let mut run = smee_relay();
    run.env_remove("SMEE_RELAY_STATE_DIR")
        .args(["run", "--config"])
        .arg(&config);
    let stderr = tokio::time::timeout(PATIENCE, refused(&mut run))
        .await
        .expect("refused at once");
    // Which setting to change (helper-116: it said only the path and the system's error).
    assert!(
        stderr.contains("cannot create the state directory")
            && stderr.contains("give --state-dir, or state_dir in the config, a directory"),
        "{stderr}"
    );
}

/// Regression: `events list` with a mistyped --state-dir created an empty spool there and
/// showed an empty table, which reads as "nothing queued". And (helper-150) it said "give
/// --state-dir" to someone who had given it.
#[tokio::test]
async fn regression_events_with_a_state_dir_holding_no_spool_says_so() {
    let dir = support::temp_dir();
    let out = events(&dir.path().join("typo"), &["list"]).await;
    assert_ne!(out.status.code(), Some(0), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no spool at")
            && stderr.contains("no relay has run with that state directory (--state-dir"),
        "{stderr}"
    );
    assert!(!stderr.contains("give --state-dir"), "{stderr}");
    assert!(!dir.path().join("typo").exists());
}

/// Regression: `events list` with no spool named only --state-dir as the way to find it; and
/// `events show ID --local --config FILE` ignored the config's `state_dir`, looking in the
/// default state directory.
#[tokio::test]
async fn regression_events_local_with_config_ignored_its_state_dir_and_no_spool_did_not_mention_config()
 {
    // No spool, no flag: the hint names --config too.
    let out = tokio::time::timeout(PATIENCE, smee_relay().args(["events", "list"]).output())
        .await
        .unwrap()
        .unwrap();
    assert_ne!(out.status.code(), Some(0), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no spool at")
            && stderr.contains("--state-dir")
            && stderr.contains("--config"),
        "{stderr}"
    );

    // A config naming the spool's directory: `--local` reads it.
    let state_dir = spool_with_two_events().await;
    let dir = support::temp_dir();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\n\n[[channel]]\nurl = \"https://smee.io/abc\"\nforward = [\"http://127.0.0.1:9/\"]\n",
            state_dir.display().to_string()
        ),
    )
    .unwrap();
    for args in [&["show", "1", "--local"][..], &["show", "1"], &["list"]] {
        let out = tokio::time::timeout(
            PATIENCE,
            smee_relay()
                .arg("events")
                .args(args)
                .arg("--config")
                .arg(&config)
                // As `run`, the flag (or its variable) wins over the config.
                .env_remove("SMEE_RELAY_STATE_DIR")
                .output(),
        )
        .await
        .unwrap()
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("x-github-event"), "{args:?}: {stdout}");
    }
}

#[tokio::test]
async fn ignore_event_skips_those_events_by_name_and_relays_the_rest() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let (_child, _logs) = forward_watched(&[
        &channel.url("Chan1"),
        &target.url("/hook"),
        "--ignore-event",
        "ping",
        "--ignore-event",
        "ISSUES",
    ]);
    channel.wait_connections(1).await;
    for (id, header, name) in [
        (1, "x-github-event", "ping"),
        (2, "x-github-event", "issues"),
        (3, "x-gitea-event", "Ping"),
        (4, "x-github-event", "push"),
    ] {
        channel.send_webhook(
            id,
            &format!(r#"{{"{header}":"{name}","body":{{"id":{id}}},"query":{{}}}}"#),
        );
    }
    let got = target.next().await;
    assert_eq!(got.header("x-github-event"), Some("push"));
    target.assert_quiet(Duration::from_millis(300)).await;
}

/// Regression (a new user's finding): `forward CHANNEL CHANNEL` posted each event back to the
/// channel, 1,409 POSTs in 3 s, and logged the channel's secret id as the target.
#[tokio::test]
async fn regression_forwarding_a_channel_to_itself_is_refused() {
    let stderr = tokio::time::timeout(
        PATIENCE,
        refused(smee_relay().args([
            "forward",
            "http://127.0.0.1:9/SelfLoopChannel",
            "http://127.0.0.1:9/SelfLoopChannel/",
        ])),
    )
    .await
    .expect("refused at once");
    assert!(
        stderr.contains("the target is the channel itself"),
        "{stderr}"
    );
    assert!(!stderr.contains("SelfLoopChannel"), "{stderr}");
}

#[tokio::test]
async fn cacert_that_is_missing_or_not_pem_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("ca.txt");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    // Regression (an adversary's finding): a PEM block that is no certificate was taken, and
    // every TLS connection then failed blaming the server ("invalid peer certificate").
    let (good, _, _) = support::certificate(dir.path(), "good");
    let not_der = dir.path().join("broken.pem");
    std::fs::write(
        &not_der,
        format!(
            "{}-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            std::fs::read_to_string(&good).unwrap()
        ),
    )
    .unwrap();
    // Regression (an adversary's finding): an unterminated block was reported as a list of
    // byte values, and a file of other PEM blocks (a key) only as "no PEM certificate".
    let unterminated = dir.path().join("cut.pem");
    std::fs::write(&unterminated, "-----BEGIN CERTIFICATE-----\nMIIB\n").unwrap();
    let key = dir.path().join("key.pem");
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    for (file, needle) in [
        (
            dir.path().join("missing.pem"),
            "(--cacert or SMEE_RELAY_CACERT)",
        ),
        (
            not_pem,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        ),
        (not_der, "certificate 2 is not a valid CA certificate"),
        (
            unterminated,
            "is not valid PEM: a block has no end line: -----END CERTIFICATE-----",
        ),
        (
            key,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----), only: PRIVATE KEY",
        ),
    ] {
        let out = tokio::time::timeout(
            PATIENCE,
            smee_relay()
                .args([
                    "forward",
                    "http://127.0.0.1:9/x",
                    "http://127.0.0.1:9/y",
                    "--cacert",
                ])
                .arg(&file)
                .output(),
        )
        .await
        .unwrap()
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // The user's to fix: exit 2, as for any bad setting.
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(needle), "{stderr}");
        assert!(stderr.contains(&*file.display().to_string()), "{stderr}");
    }
}

#[tokio::test]
async fn insecure_is_loudly_warned_about() {
    let channel = FakeChannel::start().await;
    let target = FakeTarget::start().await;
    let (_child, logs) = forward_watched(&[&channel.url("Chan2"), &target.url("/"), "--insecure"]);
    let line = logs.wait_for(&["WARN", "--insecure", "NOT verified"]).await;
    assert!(line.contains("--cacert"), "{line}");
}

#[tokio::test]
async fn config_takes_ignore_events_cacert_and_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    // `check` reads the CA file.
    let (ca, _, _) = support::certificate(dir.path(), "config");
    std::fs::write(
        &config,
        format!(
            r#"
cacert = "{}"
insecure = false

[[channel]]
url = "https://smee.io/AbCdEfGh"
forward = ["http://127.0.0.1:3000/hook"]
ignore_events = ["ping", "issues"]
"#,
            ca.display()
        ),
    )
    .unwrap();
    check_ok(&config).await;
}

/// `smee-relay check --config CONFIG`, which must pass; its stdout.
async fn check_ok(config: &std::path::Path) -> String {
    let out = smee_relay()
        .args(["check", "--config"])
        .arg(config)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Regression: `check` said `ok` for an idle timeout shorter than the server's pings, which
/// makes an idle channel reconnect again and again; the relay's start warns, `check` did not.
#[tokio::test]
async fn regression_check_was_silent_on_an_idle_timeout_below_the_pings() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let write = |idle: &str| {
        let text = format!(
            "[[channel]]\nurl = \"https://smee.io/AbCdEfGh\"\nforward = [\"http://127.0.0.1:3000/hook\"]\nidle_timeout = \"{idle}\"\n"
        );
        std::fs::write(&config, text).unwrap();
    };
    write("10s");
    let said = check_ok(&config).await;
    assert!(
        said.contains("warning: idle timeout 10s leaves little or no room")
            && said.contains("at least 45s"),
        "{said}"
    );
    write("90s");
    let said = check_ok(&config).await;
    assert!(!said.contains("warning"), "{said}");
}

/// Regression: `check --event` said of a rule whose `when` failed on the event (an error, or
/// over its memory or time bound) "condition does not hold: nothing to send", and exited 0;
/// the relay logs an error for it and keeps the rule's state.
#[tokio::test]
async fn regression_check_event_called_a_failed_condition_one_that_does_not_hold() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[[channel]]\nurl = \"https://smee.io/AbCdEfGh\"\npipeline = true\n\
         [[rule]]\nname = \"boom\"\nblueprint = \"DeploymentConfig\"\nwhen = 'error(\"boom\")'\n\
         [[rule]]\nname = \"fine\"\nblueprint = \"DeploymentConfig\"\nwhen = '.properties.cpuUtil > 80'\n",
    )
    .unwrap();
    let event = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/port/deployment-config/legacy/02-cpu-25-to-87.json");
    let out = smee_relay()
        .args(["check", "--config"])
        .arg(&config)
        .arg("--event")
        .arg(&event)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("rule boom: condition failed (error): ") && stdout.contains("boom"),
        "{stdout}"
    );
    assert!(stdout.contains("rule fine: would send"), "{stdout}");
    assert!(stderr.contains("1 rule failed on"), "{stderr}");
    // Regression (helper-133): an event file that is not there exited 1, a config's 2.
    let out = smee_relay()
        .args(["check", "--config"])
        .arg(&config)
        .args(["--event", "/nonexistent/event.json"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with("error: cannot read /nonexistent/event.json: "),
        "{stderr}"
    );
}

/// Waits until `dir` holds `n` files ending in `.sh`, and returns them sorted.
async fn scripts_in(dir: &std::path::Path, n: usize) -> Vec<std::path::PathBuf> {
    support::wait_for(PATIENCE, "the saved events", || async {
        let mut scripts: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
            .ok()?
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "sh"))
            .collect();
        scripts.sort();
        (scripts.len() == n && scripts.iter().all(|s| s.with_extension("json").exists()))
            .then_some(scripts)
    })
    .await
}

#[tokio::test]
async fn forward_save_dir_writes_each_event_in_gosmees_layout_and_failures_never_block_delivery() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let state = tempfile::tempdir().unwrap();
    let saved = tempfile::tempdir().unwrap();
    let save_dir = saved.path().join("events");
    let mut child = smee_relay()
        .args(["forward", &channel.url("SaveDir1"), &target.url("/hook")])
        .arg("--save-dir")
        .arg(&save_dir)
        .arg("--state-dir")
        .arg(state.path())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let logs = LogWatch::new(child.stderr.take().unwrap());
    channel.wait_connections(1).await;
    channel.send_webhook(
        1,
        r#"{"content-type":"application/json","x-github-event":"it's","body":{"n":1,"s":"a b"},"query":{"a":"1 2"}}"#,
    );
    channel.send_webhook(
        2,
        r#"{"content-type":"application/json","x-github-event":"push","body":[2],"query":{}}"#,
    );
    target.take(2).await;
    let scripts = scripts_in(&save_dir, 2).await;
    use std::os::unix::fs::PermissionsExt as _;
    for script in &scripts {
        // Its owner's alone (a relay's umask is 077), and executable.
        let mode = std::fs::metadata(script).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{script:?} is {mode:o}");
    }
    assert_eq!(
        std::fs::read(scripts[1].with_extension("json")).unwrap(),
        b"[2]"
    );
    // A script replays its event: by default to the forward target, here to another.
    let mut other = FakeTarget::start().await;
    let status = tokio::process::Command::new(&scripts[0])
        .arg(other.url("/replayed"))
        .stdout(Stdio::null())
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let got = other.next().await;
    assert_eq!(got.uri, "/replayed?a=1+2");
    assert_eq!(&got.body[..], br#"{"n":1,"s":"a b"}"#);
    assert_eq!(got.header("x-github-event"), Some("it's"));
    let default_target = std::fs::read_to_string(&scripts[0]).unwrap();
    assert!(
        default_target.contains(&target.url("/hook")),
        "{default_target}"
    );

    // The directory becomes unwritable (a file in its place): events are still delivered, in
    // order, with one warning.
    std::fs::remove_dir_all(&save_dir).unwrap();
    std::fs::write(&save_dir, "not a directory").unwrap();
    for id in 3..=5 {
        channel.send_webhook(
            id,
            &format!(r#"{{"content-type":"application/json","body":{{"n":{id}}},"query":{{}}}}"#),
        );
    }
    let got: Vec<Vec<u8>> = target
        .take(3)
        .await
        .into_iter()
        .map(|r| r.body.to_vec())
        .collect();
    assert_eq!(
        got,
        [
            br#"{"n":3}"#.to_vec(),
            br#"{"n":4}"#.to_vec(),
            br#"{"n":5}"#.to_vec()
        ]
    );
    logs.wait_for(&["--save-dir: cannot create", "delivered all the same"])
        .await;
    // Writable again: saving resumes.
    std::fs::remove_file(&save_dir).unwrap();
    channel.send_webhook(
        6,
        r#"{"content-type":"application/json","body":{"n":6},"query":{}}"#,
    );
    target.next().await;
    support::wait_until(PATIENCE, "event 6 saved", || {
        std::fs::read_dir(&save_dir).is_ok_and(|entries| {
            entries.flatten().any(|e| {
                e.path().extension().is_some_and(|x| x == "json")
                    && std::fs::read(e.path()).is_ok_and(|b| b == br#"{"n":6}"#)
                    && e.path().with_extension("sh").exists()
            })
        })
    })
    .await;
    assert!(
        logs.all().matches("--save-dir: cannot").count() == 1,
        "warned once: {}",
        logs.all()
    );
}

/// Regression: a command on another user's state directory (the relay's, run as its own user)
/// exited 1 with only "spool …: I/O error: Permission denied (os error 13)", or "no spool at …"
/// when it could not even look into the directory. It now names the file and what to do (run
/// as the owner, or --state-dir), and exits 2, as for a spool another relay holds. Real
/// denials: as root (whom permission bits do not stop) the command runs as `nobody`.
#[tokio::test]
async fn regression_permission_denied_on_the_spool_exited_1_with_no_hint() {
    use std::os::unix::fs::PermissionsExt as _;
    let state_dir = spool_with_two_events().await;
    // SAFETY: no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let as_other = |args: &[&str], dir: &std::path::Path| {
        let mut command = smee_relay();
        command.arg("events").args(args).arg("--state-dir").arg(dir);
        if root {
            command.uid(65534).gid(65534);
        }
        command.output()
    };
    let set = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    let check = |out: std::process::Output, file: &std::path::Path| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        for needle in [
            format!("permission denied on the spool {}", file.display()),
            "run this as the user the relay runs as".into(),
            "--state-dir".into(),
            "Permission denied (os error 13)".into(),
        ] {
            assert!(stderr.contains(&needle), "{needle:?} in {stderr}");
        }
        if root {
            assert!(stderr.contains("belongs to root, uid 0)"), "{stderr}");
            // The example names the owner (it said `sudo -u smee-relay` whoever owned it).
            assert!(stderr.contains("`sudo -u root smee-relay …`"), "{stderr}");
        }
    };

    // A directory this user may not enter (a relay's state directory is 0700).
    if !root {
        set(&state_dir, 0o000);
    }
    let out = tokio::time::timeout(PATIENCE, as_other(&["list"], &state_dir))
        .await
        .unwrap()
        .unwrap();
    if !root {
        set(&state_dir, 0o700);
    }
    check(out, &state_dir.join("spool.redb"));

    // A spool file this user may read but not write (redb opens it for writing).
    let open = tempfile::tempdir().unwrap();
    set(open.path(), 0o755);
    let file = open.path().join("spool.redb");
    std::fs::copy(state_dir.join("spool.redb"), &file).unwrap();
    set(&file, if root { 0o644 } else { 0o444 });
    let out = tokio::time::timeout(PATIENCE, as_other(&["list"], open.path()))
        .await
        .unwrap()
        .unwrap();
    set(&file, 0o644);
    check(out, &file);
}

/// Regression (helper-122): a channel's lock file this user may not open (left by a relay run
/// as another user) was said as "permission denied on the spool .../spool.redb", a file it
/// could open: the lock file is named.
#[tokio::test]
async fn regression_a_denied_lock_file_was_said_as_the_spool() {
    use std::os::unix::fs::PermissionsExt as _;
    // SAFETY: no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let channel = "http://127.0.0.1:9/LockedChannel";
    let lock = state.join(format!(
        "channel-{}.lock",
        smee_relay::spool::lock::channel_key(channel)
    ));
    std::fs::write(&lock, "1\n").unwrap();
    std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut command = smee_relay();
    command
        .args(["forward", channel, "http://127.0.0.1:9/", "--state-dir"])
        .arg(&state);
    if root {
        // As `nobody`, in a state directory of its own, beside root's lock file.
        std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
        std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
        command.uid(65534).gid(65534);
    } else {
        std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    let out = tokio::time::timeout(PATIENCE, command.output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "permission denied on the spool {}",
            lock.display()
        )),
        "{stderr}"
    );
}

/// Regression: the dead-letter hint of a relay with a state directory of its own said
/// `smee-relay events replay 1`, which, run as told, looks in the default state directory and
/// finds no spool there. It names the relay's `--state-dir` now, and only when not the default.
#[tokio::test]
async fn regression_the_dead_letter_hint_left_out_a_non_default_state_dir() {
    let channel = FakeChannel::start().await;
    let target = FakeTarget::start().await;
    let homes = support::temp_dir();
    for (n, own_dir) in [(1, true), (2, false)] {
        let state_dir = homes.path().join(format!("state {n}"));
        let xdg = homes.path().join(format!("xdg{n}"));
        let mut command = smee_relay();
        command
            .args([
                "forward",
                &channel.url(&format!("Chan{n}")),
                &target.url("/"),
            ])
            .env_remove("SMEE_RELAY_STATE_DIR")
            .env("XDG_STATE_HOME", &xdg)
            .stderr(Stdio::piped())
            .stdout(Stdio::null());
        if own_dir {
            command.arg("--state-dir").arg(&state_dir);
        }
        let before = channel.connections();
        let mut child = command.spawn().unwrap();
        let logs = LogWatch::new(child.stderr.take().unwrap());
        channel.wait_connections(before + 1).await;
        // Refused for good: a dead letter at once.
        target.answer_with(&[400]);
        channel.send_webhook(1, r#"{"body":{"n":1}}"#);
        let line = logs.wait_for(&["dead letter:"]).await;
        let hint = if own_dir {
            format!(
                "`smee-relay events replay 1 --state-dir '{}'`",
                state_dir.display()
            )
        } else {
            assert!(xdg.join("smee-relay/spool.redb").exists());
            "`smee-relay events replay 1`".to_string()
        };
        assert!(line.contains(&hint), "{hint} in {line}");
        child.kill().await.unwrap();
    }
}

/// Regression: `smee-relay events export | head -1` ended with a panic, "failed printing to
/// stdout: Broken pipe" (exit 101), once `head` had closed the pipe. A closed stdout ends
/// `list`, `export` and `show` quietly with success, as other tools do.
#[tokio::test]
async fn regression_events_export_into_a_closed_pipe_panicked_with_broken_pipe() {
    let state_dir = spool_with_two_events().await;
    for args in [
        &["export"][..],
        &["list"],
        &["list", "--json"],
        &["show", "1"],
        &["--help"],
    ] {
        // A pipe whose reader is gone before the command writes: every write fails (EPIPE).
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        // Not `output()`: it would pipe stdout itself.
        let child = smee_relay()
            .arg("events")
            .args(args)
            .arg("--state-dir")
            .arg(&state_dir)
            .stdout(writer)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = tokio::time::timeout(PATIENCE, child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        assert!(out.stdout.is_empty(), "stdout was the closed pipe");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: quietly: {stderr}");
    }
}

/// Regression: `events show` said "Delivered, 1 attempts" (and log lines "gave up after 1
/// attempts", "1 deliveries", "1 alerts"): a count now agrees with its noun.
#[tokio::test]
async fn regression_events_show_said_1_attempts() {
    let state_dir = spool_with_two_events().await;
    let out = events(&state_dir, &["show", "1"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout.contains(": delivered, 1 attempt\n"), "{stdout}");
    assert!(!stdout.contains("1 attempts"), "{stdout}");
}

/// The README showed no Port payload (helper-106); the one it shows now, run through
/// `check --event` with the example config's `cpu-high` rule, gives the output printed beside
/// it.
#[tokio::test]
async fn the_readme_s_port_change_example_is_what_check_says() {
    let readme = include_str!("../README.md");
    let start = readme
        .find("<!-- example: a Port change and what check --event says of it")
        .expect("the example's marker");
    let block = |from: usize, fence: &str| {
        let open = readme[from..].find(fence).unwrap() + from + fence.len();
        let close = readme[open..].find("\n```").unwrap() + open;
        (
            readme[open..close].trim_start_matches('\n').to_string(),
            close,
        )
    };
    let (payload, after) = block(start, "```json");
    let (shown, _) = block(after, "```text");
    let want = shown
        .strip_prefix("$ smee-relay check --config config.toml --event change.json\n")
        .expect("the command line first");

    let example = include_str!("../systemd/config.example.toml");
    let rule_at = example.find("name = \"cpu-high\"").unwrap();
    let rule = &example[rule_at..example[rule_at..].find("\n\n").unwrap() + rule_at];
    let dir = support::temp_dir();
    std::fs::write(dir.path().join("change.json"), &payload).unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        format!(
            "[[channel]]\nurl = \"https://smee.io/abc\"\npipeline = true\n\n[slack]\n\
             webhook_url = \"https://hooks.slack.com/services/T0/B0/X\"\n\n[[rule]]\n{rule}\n"
        ),
    )
    .unwrap();
    let out = support::run_to_end(smee_relay().current_dir(dir.path()).args([
        "check",
        "--config",
        "config.toml",
        "--event",
        "change.json",
    ]))
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.stdout.trim_end(), want.trim_end());
}

/// Regression (helper-115): in a state directory that was already there, 0755, a relay made
/// its spool 0644 under the usual umask: events, and targets' queries, readable by every user
/// of the machine. A relay or server makes its files as systemd's unit does (`UMask=0077`).
#[tokio::test]
async fn regression_a_relay_s_spool_was_readable_by_others() {
    use std::os::unix::fs::PermissionsExt as _;
    let channel = FakeChannel::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let save = dir.path().join("saved");
    let (mut child, logs) = support::spawn_logged(
        smee_relay()
            .args([
                "forward",
                &channel.url("Private"),
                "http://127.0.0.1:9/hook",
            ])
            .arg("--state-dir")
            .arg(dir.path())
            .arg("--save-dir")
            .arg(&save),
    );
    logs.wait_for(&["connected to channel"]).await;
    channel.send_webhook(1, r#"{"body":{"n":1}}"#);
    support::wait_until(PATIENCE, "the event saved", || {
        std::fs::read_dir(&save).is_ok_and(|mut d| d.next().is_some())
    })
    .await;
    child.kill().await.unwrap();
    let mut files = vec![dir.path().join("spool.redb"), save.clone()];
    files.extend(std::fs::read_dir(&save).unwrap().map(|e| e.unwrap().path()));
    for file in files {
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", file.display());
    }
}

/// Regression (helper-115): a target refused for a newline in it was repeated with the newline
/// as it was, breaking the message in two.
#[tokio::test]
async fn regression_a_refused_url_s_newline_broke_the_message() {
    let said = refused(smee_relay().args([
        "forward",
        "http://127.0.0.1:1/ch",
        "http://127.0.0.1:2/a\nb",
    ]))
    .await;
    assert!(
        said.starts_with("error: invalid value 'http://127.0.0.1:2/a\\nb' for '[TARGET_URL]': the URL holds a control character"),
        "{said}"
    );
}

/// Regression (helper-116): `events show abc` answered with Rust's own "invalid digit found
/// in string".
#[tokio::test]
async fn regression_an_event_id_that_is_not_a_number_got_rust_s_parse_error() {
    for args in [&["show", "abc"][..], &["replay", "1", "x2"]] {
        let said = refused(smee_relay().arg("events").args(args)).await;
        assert!(said.contains("an event id is a number"), "{said}");
        assert!(!said.contains("invalid digit"), "{said}");
    }
}

/// Regression (helper-115): a config's problems came without `error:`, unlike every other
/// command's failure; each is one line, said as an error.
#[tokio::test]
async fn regression_a_config_s_problems_were_not_said_as_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "[[channel]]\nurl = \"https://smee.io/abc\"\nforwad = []\nx = 1\n",
    )
    .unwrap();
    let said = refused(smee_relay().args(["check", "--config"]).arg(&config)).await;
    let lines: Vec<&str> = said.lines().collect();
    assert!(!lines.is_empty(), "{said}");
    assert!(lines.iter().all(|l| l.starts_with("error: ")), "{said}");
    let said = refused(
        smee_relay()
            .args(["check", "--config"])
            .arg(dir.path().join("nope.toml")),
    )
    .await;
    assert!(
        said.starts_with("error: ") && said.contains("nope.toml: cannot read"),
        "{said}"
    );
}

/// Regression (left open since helper-116): `events --help` listed the cluster flags among the
/// options every user needs; they have a heading of their own.
#[tokio::test]
async fn regression_events_help_mixed_the_cluster_flags_with_the_others() {
    let out = smee_relay()
        .args(["events", "--help"])
        .output()
        .await
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    let (common, cluster) = help.split_once("Cluster mode:").expect(&help);
    for flag in ["--nats-url", "--cluster <NAME>", "--local"] {
        assert!(cluster.contains(flag), "{flag} under its heading:\n{help}");
        assert!(
            !common.contains(flag),
            "{flag} not among the others:\n{help}"
        );
    }
}
