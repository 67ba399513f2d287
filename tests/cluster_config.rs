//! `[cluster]` as a new user meets it: `check` and `run` refuse the same bad NATS URLs at the
//! same line, `run` says what NATS refused (not a hint that points elsewhere), an error names
//! each cause once, and an outage does not flood the log (a real `nats-server -js`; see
//! tests/support/nats.rs, `NATS_SERVER_BIN`).

mod support;

use std::path::PathBuf;

use support::nats::NatsServer;
use support::{FakeChannel, FakeTarget, smee_relay, spawn_logged};

fn config(dir: &std::path::Path, body: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, body).unwrap();
    path
}

/// A forwarding channel and a `[cluster]` with `extra` lines after its URL (line 6).
fn cluster_config(channel: &str, target: &str, nats_url: &str, extra: &str) -> String {
    format!(
        "[[channel]]\nurl = \"{channel}\"\nforward = [\"{target}\"]\n\n[cluster]\n\
         nats_url = \"{nats_url}\"\nname = \"prod\"\n{extra}"
    )
}

async fn run_once(path: &std::path::Path, state: &std::path::Path) -> support::Output {
    support::run_to_end(
        smee_relay()
            .args(["run", "--config"])
            .arg(path)
            .arg("--state-dir")
            .arg(state),
    )
    .await
}

/// `check` said ok for NATS URLs `run` then refused (a bad scheme; a host that does not parse,
/// in a list); now both refuse them when reading the file, at the line, before connecting.
#[tokio::test]
async fn regression_check_says_ok_for_a_nats_url_run_refuses() {
    let dir = support::temp_dir();
    for (url, problem) in [
        ("htp://host:4222", "scheme must be nats, tls, ws or wss"),
        (
            "nats://a:4222, nats://bad host:4222",
            "server 2 of 2: not a URL",
        ),
    ] {
        let path = config(
            dir.path(),
            &cluster_config("https://smee.io/abc", "http://127.0.0.1:1/", url, ""),
        );
        let check = support::run_to_end(smee_relay().args(["check", "--config"]).arg(&path)).await;
        let run = run_once(&path, &dir.path().join("state")).await;
        for out in [check, run] {
            assert_eq!(out.code, Some(2), "{url}: {}", out.stderr);
            let expected = format!("{}:6: [cluster] nats_url: {problem}", path.display());
            assert!(out.stderr.contains(&expected), "{url}: {}", out.stderr);
            assert!(!out.stderr.contains("cannot connect"), "{}", out.stderr);
        }
    }
}

/// Regression (helper-123): `check` took no `--nats-url` and, with SMEE_RELAY_NATS_URL set and
/// no `[cluster]` in the file, said plain "ok" where `run` joins cluster `default`.
#[tokio::test]
async fn regression_check_did_not_see_the_nats_url_run_uses() {
    let dir = support::temp_dir();
    let path = config(
        dir.path(),
        "[[channel]]\nurl = \"https://smee.io/abc\"\nforward = [\"http://127.0.0.1:1/\"]\n",
    );
    let flag = support::run_to_end(
        smee_relay()
            .args(["check", "--config"])
            .arg(&path)
            .args(["--nats-url", "nats://127.0.0.1:4222"]),
    )
    .await;
    let env = support::run_to_end(
        smee_relay()
            .args(["check", "--config"])
            .arg(&path)
            .env("SMEE_RELAY_NATS_URL", "nats://127.0.0.1:4222"),
    )
    .await;
    for out in [flag, env] {
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        assert!(
            out.stdout
                .contains("cluster \"default\" at nats://127.0.0.1:4222")
                && out.stdout.contains("warning: no [cluster] in the file"),
            "{}",
            out.stdout
        );
    }
}

/// `[cluster]` without `name` joined cluster `default`: an instance whose file forgot it ran a
/// second, independent cluster on the same channels, and every alert was sent twice. Now
/// `check` and `run` refuse it at the table's line, exit 2, before connecting.
#[tokio::test]
async fn regression_a_cluster_table_without_name_silently_joined_cluster_default() {
    let dir = support::temp_dir();
    let body = cluster_config(
        "https://smee.io/abc",
        "http://127.0.0.1:1/",
        "nats://h:4222",
        "",
    )
    .replace("name = \"prod\"\n", "");
    let path = config(dir.path(), &body);
    let check = support::run_to_end(smee_relay().args(["check", "--config"]).arg(&path)).await;
    let run = run_once(&path, &dir.path().join("state")).await;
    for out in [check, run] {
        assert_eq!(out.code, Some(2), "{}", out.stderr);
        let expected = format!(
            "{}:5: [cluster] needs name = \"...\", the same on every instance of the cluster",
            path.display()
        );
        assert!(out.stderr.contains(&expected), "{}", out.stderr);
        assert!(!out.stderr.contains("cannot connect"), "{}", out.stderr);
    }
}

/// `Connection refused (os error 111): Connection refused (os error 111)`: the error line
/// repeated a cause the text before it already held.
#[tokio::test]
async fn regression_errors_repeat_their_cause() {
    let dir = support::temp_dir();
    let unused = support::unused_addr();
    let path = config(
        dir.path(),
        &cluster_config(
            "https://smee.io/abc",
            "http://127.0.0.1:1/",
            &format!("nats://{unused}"),
            "",
        ),
    );
    let out = run_once(&path, &dir.path().join("state")).await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("(is nats-server running with -js, and reachable?)"),
        "{}",
        out.stderr
    );
    assert_eq!(
        out.stderr.matches("Connection refused").count(),
        1,
        "{}",
        out.stderr
    );
}

/// `replicas = 3` against one server failed with "is JetStream enabled on the server: -js?",
/// which sent the user the wrong way: now NATS's own words, and what replicas needs.
#[tokio::test]
async fn regression_replicas_on_a_single_server_blames_jetstream() {
    let nats = NatsServer::start().await;
    let dir = support::temp_dir();
    let path = config(
        dir.path(),
        &cluster_config(
            "https://smee.io/abc",
            "http://127.0.0.1:1/",
            &nats.url,
            "replicas = 3\n",
        ),
    );
    let out = run_once(&path, &dir.path().join("state")).await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("replicas = 3 needs a NATS cluster of at least 3 JetStream servers"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("not supported in non-clustered mode"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("-js"), "{}", out.stderr);
}

/// During a NATS outage the relay logged `NATS: client error: ...` at every reconnect attempt
/// (about every 2 s). Now the first, then at most one a minute; the WARN at the loss stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_nats_outage_logs_a_client_error_every_2_s() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let target = FakeTarget::start().await;
    let dir = support::temp_dir();
    let path = config(
        dir.path(),
        &cluster_config(&channel.url("ch"), &target.url("/hook"), &nats.url, ""),
    );
    let (mut child, logs) = spawn_logged(
        smee_relay()
            .args(["run", "--config"])
            .arg(&path)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("RUST_LOG", "info"),
    );
    logs.wait_for(&["joined the cluster"]).await;
    let _stopped = nats.stop().await;
    logs.wait_for(&["WARN", "NATS connection lost"]).await;
    // async-nats logs each failed attempt itself at INFO (`event: client error`, shown with
    // RUST_LOG=info): the test waits for several of them, no clock needed.
    support::wait_until(support::PATIENCE, "5 failed reconnect attempts", || {
        logs.all().matches("event: client error").count() >= 5
    })
    .await;
    let all = logs.all();
    assert_eq!(all.matches("NATS: client error").count(), 1, "{all}");
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// Regression (helper-123): an instance in another cluster on the same NATS (a typo in `name`,
/// or no `[cluster]` beside `SMEE_RELAY_NATS_URL`: cluster `default`) delivered every event a
/// second time without a word, and `/healthz` said ok. Each instance now warns of the other
/// cluster relaying its channel, in the log and on `/healthz`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_second_cluster_on_the_same_channel_doubled_every_event_silently() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let dir = support::temp_dir();
    let body = cluster_config(&channel.url("ch"), &target.url("/hook"), &nats.url, "");
    for sub in ["prod", "typo"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
    }
    let prod = config(&dir.path().join("prod"), &body);
    let typo = config(
        &dir.path().join("typo"),
        &body.replace("name = \"prod\"", "name = \"Prod\""),
    );
    let spawn = |path: &std::path::Path, state: &str| {
        spawn_logged(
            smee_relay()
                .args(["run", "--config"])
                .arg(path)
                .arg("--state-dir")
                .arg(dir.path().join(state))
                .args(["--metrics-listen", "127.0.0.1:0"])
                .env("SMEE_RELAY_NEIGHBOUR_LOOK", "200ms"),
        )
    };
    let (mut a, a_logs) = spawn(&prod, "a");
    let (mut b, b_logs) = spawn(&typo, "b");
    for logs in [&a_logs, &b_logs] {
        logs.wait_for(&["connected to channel"]).await;
    }
    channel.send_webhook(1, r#"{"body":{"n":1}}"#);
    // What the bug did, still: each cluster delivers it.
    target.take(2).await;
    let line = a_logs
        .wait_for(&["WARN", "cluster \"Prod\" on this NATS also relays channel"])
        .await;
    assert!(
        line.contains("same [cluster] name (\"prod\" here)"),
        "{line}"
    );
    b_logs
        .wait_for(&["WARN", "cluster \"prod\" on this NATS also relays channel"])
        .await;
    let addr = a_logs.wait_for(&["serving /healthz and /metrics"]).await;
    let addr = addr.rsplit("addr=").next().unwrap().trim().to_string();
    let client = smee_relay::http::client_builder().build().unwrap();
    let health = support::get_text(&client, &format!("http://{addr}/healthz"))
        .await
        .unwrap();
    assert!(health.contains("also relays channel"), "{health}");
    // Once per cluster and channel, however often it has looked since (every 200 ms).
    assert_eq!(
        a_logs.all().matches("also relays channel").count(),
        1,
        "{}",
        a_logs.all()
    );
    for child in [&mut a, &mut b] {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}
