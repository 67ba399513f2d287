//! An instance joining a cluster that exists (a real `nats-server -js`; see tests/support/nats.rs,
//! `NATS_SERVER_BIN`): its `[cluster]` settings replace the cluster's, each change said once;
//! a change NATS refuses stops it (exit 2); a route new to the cluster gets the events that
//! arrive from now on, not the stream's history.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt as _;
use support::nats::{ACK_WAIT, NatsServer};
use support::{FakeChannel, FakeTarget, smee_relay, spawn_logged};

fn config(dir: &std::path::Path, body: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, body).unwrap();
    path
}

/// A relay forwarding `channel` to `targets`, in cluster `join` with `extra` `[cluster]` lines.
fn cluster_config(channel: &str, targets: &[String], nats: &str, extra: &str) -> String {
    let targets: Vec<String> = targets.iter().map(|t| format!("{t:?}")).collect();
    format!(
        "[[channel]]\nurl = \"{channel}\"\nforward = [{}]\n\n[cluster]\nnats_url = \"{nats}\"\n\
         name = \"join\"\nhealth_grace = \"1s\"\n{extra}",
        targets.join(", ")
    )
}

fn start_in(dir: &std::path::Path, body: &str) -> (tokio::process::Child, support::LogWatch) {
    let path = config(dir, body);
    spawn_logged(
        smee_relay()
            .args(["run", "--config"])
            .arg(&path)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .env("SMEE_RELAY_SHUTDOWN_TIMEOUT", "1s")
            .env("RUST_LOG", "info"),
    )
}

fn frame(n: usize) -> String {
    format!(r#"{{"content-type":"application/json","x-github-event":"push","body":{{"n":{n}}}}}"#)
}

fn n_of(body: &[u8]) -> usize {
    let value: serde_json::Value = serde_json::from_slice(body).expect("a JSON body");
    value["n"].as_u64().expect("an n") as usize
}

/// The cluster's stream, read as an operator would (`nats stream info`).
async fn stream(nats: &NatsServer) -> async_nats::jetstream::stream::Stream {
    let client = async_nats::connect(&nats.url).await.unwrap();
    async_nats::jetstream::new(client)
        .get_stream("SMEE_join")
        .await
        .unwrap()
}

/// The route consumers' ack waits (`route_*`).
async fn route_ack_waits(nats: &NatsServer) -> Vec<Duration> {
    let stream = stream(nats).await;
    let mut consumers = stream.consumers();
    let mut waits = Vec::new();
    while let Some(info) = consumers.next().await {
        let info = info.unwrap();
        if info.name.starts_with("route_") {
            waits.push(info.config.ack_wait);
        }
    }
    waits
}

/// The cluster's ack_wait and dedupe_window were the last starter's and the first's: the
/// stream kept the first instance's duplicate window whatever the others said, the consumers
/// took the last starter's ack wait, and nothing was logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_the_last_instance_to_start_set_ack_wait_silently_and_dedupe_window_never() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let target = FakeTarget::start().await;
    let targets = [target.url("/hook")];
    let first = support::temp_dir();
    let (mut one, logs) = start_in(
        first.path(),
        &cluster_config(
            &channel.url("ch"),
            &targets,
            &nats.url,
            &format!("ack_wait = \"{ACK_WAIT}\"\n"),
        ),
    );
    logs.wait_for(&["joined the cluster"]).await;
    support::wait_for(Duration::from_secs(30), "the route's consumer", || async {
        (!route_ack_waits(&nats).await.is_empty()).then_some(())
    })
    .await;
    one.kill().await.unwrap();

    let second = support::temp_dir();
    let (mut two, logs) = start_in(
        second.path(),
        &cluster_config(
            &channel.url("ch"),
            &targets,
            &nats.url,
            "ack_wait = \"3s\"\ndedupe_window = \"90m\"\n",
        ),
    );
    logs.wait_for(&["joined the cluster"]).await;
    let info = stream(&nats).await.get_info().await.unwrap();
    assert_eq!(
        info.config.duplicate_window,
        Duration::from_secs(90 * 60),
        "the stream takes the joining instance's dedupe_window"
    );
    assert_eq!(route_ack_waits(&nats).await, vec![Duration::from_secs(3)]);
    let same = "every instance of the cluster must use the same [cluster] settings";
    logs.wait_for(&[
        "WARN",
        "[cluster] dedupe_window was 2h in the cluster, this instance's config says 1h 30m",
        same,
    ])
    .await;
    logs.wait_for(&[
        "WARN",
        "[cluster] ack_wait was 2s in the cluster, this instance's config says 3s",
        same,
    ])
    .await;
    two.kill().await.unwrap();

    // A change NATS refuses (3 copies on one server) stops the start, with what to do.
    let third = support::temp_dir();
    let path = config(
        third.path(),
        &cluster_config(
            &channel.url("ch"),
            &targets,
            &nats.url,
            "ack_wait = \"3s\"\ndedupe_window = \"90m\"\nreplicas = 3\n",
        ),
    );
    let out = support::run_to_end(
        smee_relay()
            .args(["run", "--config"])
            .arg(&path)
            .arg("--state-dir")
            .arg(third.path().join("state")),
    )
    .await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("cannot change the cluster's replicas from 1 to this instance's 3"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("set [cluster] replicas back"),
        "{}",
        out.stderr
    );
}

/// A target added on reload was sent the whole stream history (up to `max_age`, 7 days):
/// its consumer was new and started at the stream's first message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_target_added_on_reload_was_sent_the_whole_stream_history() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let before = channel.connections();
    let dir = support::temp_dir();
    let one = [target.url("/hook")];
    let both = [target.url("/hook"), target.url("/hook2")];
    let extra = format!("ack_wait = \"{ACK_WAIT}\"\n");
    let (child, logs) = start_in(
        dir.path(),
        &cluster_config(&channel.url("ch"), &one, &nats.url, &extra),
    );
    logs.wait_for(&["joined the cluster"]).await;
    channel.wait_connections(before + 1).await;
    for n in 0..3 {
        channel.send_webhook(n as u64 + 1, &frame(n));
    }
    target.wait_arrived(3).await;

    config(
        dir.path(),
        &cluster_config(&channel.url("ch"), &both, &nats.url, &extra),
    );
    support::signal(&child, "HUP");
    logs.wait_for(&["config reloaded", "hook2"]).await;
    for n in 3..5 {
        channel.send_webhook(n as u64 + 1, &frame(n));
    }
    support::wait_until(Duration::from_secs(30), "events 3 and 4 at both", || {
        let got = |path: &str| {
            target
                .arrivals()
                .iter()
                .filter(|r| r.uri == path)
                .map(|r| n_of(&r.body))
                .collect::<Vec<_>>()
        };
        got("/hook").len() >= 5 && got("/hook2").len() >= 2
    })
    .await;
    while target.try_next(Duration::ZERO).await.is_some() {}
    target.assert_quiet(Duration::from_secs(2)).await;
    let hook2: Vec<usize> = target
        .arrivals()
        .iter()
        .filter(|r| r.uri == "/hook2")
        .map(|r| n_of(&r.body))
        .collect();
    assert_eq!(hook2, vec![3, 4], "the new target gets what came after it");
}

/// Instances with different routes or rules judged and delivered differently, and nothing said
/// so: each now records a fingerprint of its routes and rules in KV, and warns about a live
/// instance whose fingerprint differs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_instances_with_different_routes_ran_side_by_side_without_a_warning() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let target = FakeTarget::start().await;
    let extra = format!("ack_wait = \"{ACK_WAIT}\"\n");
    let first = support::temp_dir();
    let (_one, one_logs) = start_in(
        first.path(),
        &cluster_config(&channel.url("ch"), &[target.url("/a")], &nats.url, &extra),
    );
    one_logs.wait_for(&["joined the cluster"]).await;
    // The same config: nothing to say.
    let same = support::temp_dir();
    let (_same, same_logs) = start_in(
        same.path(),
        &cluster_config(&channel.url("ch"), &[target.url("/a")], &nats.url, &extra),
    );
    same_logs.wait_for(&["joined the cluster"]).await;
    let second = support::temp_dir();
    let (_two, two_logs) = start_in(
        second.path(),
        &cluster_config(
            &channel.url("ch"),
            &[target.url("/a"), target.url("/b")],
            &nats.url,
            &extra,
        ),
    );
    let line = two_logs
        .wait_for(&[
            "WARN",
            "runs other forward targets, rules or Slack webhook than this one",
            "use the same config on every instance",
        ])
        .await;
    assert!(line.contains("of cluster join"), "{line}");
    // Once for each of the two other instances.
    let warnings = || {
        two_logs
            .all()
            .matches("runs other forward targets, rules or Slack webhook")
            .count()
    };
    support::wait_until(
        Duration::from_secs(30),
        "a warning per other instance",
        || warnings() >= 2,
    )
    .await;
    assert_eq!(warnings(), 2, "{}", two_logs.all());
    assert!(
        same_logs.find(&["runs other forward targets"]).is_none(),
        "{}",
        same_logs.all()
    );
}

/// A relay with `nats_url = "nats://USER:PASSWORD@host"` was refused ("authorization
/// violation") by a server that takes that user: the client does not send a URL's own
/// userinfo, and only `serve` gave it as options.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_user_and_password_in_the_cluster_s_nats_url_were_not_sent() {
    let nats = NatsServer::start_with(&["--user", "relay", "--pass", "s3cr%t"]).await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let url = nats.url.replace("nats://", "nats://relay:s3cr%25t@");
    let body =
        support::nats::forward_config(&channel.url("ch"), &target.url("/hook"), &url, "auth");
    let instances = support::nats::start_cluster(1, &channel, &body, &[]).await;
    channel.send_webhook(1, &frame(0));
    assert_eq!(n_of(&target.next().await.body), 0);
    let logs = instances[0].logs.all();
    assert!(
        !logs.contains("s3cr"),
        "the password is never logged: {logs}"
    );
}

/// Instances alerting to different Slack webhooks ran side by side without a warning: each
/// alert went to the webhook of whichever instance took it. The webhook is now part of the
/// fingerprint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_instances_with_different_slack_webhooks_ran_side_by_side_without_a_warning() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let slack = FakeTarget::start().await;
    let config = |webhook: &str| {
        support::nats::alerts_config(&channel.url("ch"), webhook, &nats.url, "slacks")
    };
    let one = support::nats::start_instance(&config(&slack.url("/one")), &[]);
    one.logs.wait_for(&["config fingerprints compared"]).await;
    let two = support::nats::start_instance(&config(&slack.url("/two")), &[]);
    let line = two
        .logs
        .wait_for(&["WARN", "runs other forward targets, rules or Slack webhook"])
        .await;
    assert!(line.contains("[slack] webhook_url"), "{line}");
    assert!(!line.contains("/one") && !line.contains("/two"), "{line}");
    // How long ago the other instance was heard from: it may have died since (helper-108).
    assert!(line.contains("last heard from"), "{line}");

    // The two agree again after a reload, and the warning instance says so (it never did).
    support::nats::write_config(two.dir.path(), &config(&slack.url("/one")));
    support::signal(&two.child, "HUP");
    two.logs
        .wait_for(&[
            "INFO",
            "now runs the same forward targets, rules and Slack webhook as this one",
        ])
        .await;
}

/// An instance stopped cleanly left its fingerprint record behind, live for 3 minutes: a
/// rolling restart with a new config warned about the old process as if it still ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_cleanly_stopped_instance_was_warned_about_as_running_other_routes() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let target = FakeTarget::start().await;
    let config = |path: &str| {
        support::nats::forward_config(&channel.url("ch"), &target.url(path), &nats.url, "rolling")
    };
    let mut old = support::nats::start_instance(&config("/old"), &[]);
    old.logs.wait_for(&["config fingerprints compared"]).await;
    support::signal(&old.child, "TERM");
    assert_eq!(
        support::exit_code(&mut old.child).await,
        Some(0),
        "{}",
        old.logs.all()
    );

    let new = support::nats::start_instance(&config("/new"), &[]);
    let compared = new.logs.wait_for(&["config fingerprints compared"]).await;
    assert!(compared.contains("others=0"), "{compared}");
    assert!(
        new.logs.find(&["runs other forward targets"]).is_none(),
        "{}",
        new.logs.all()
    );
}

/// A second instance started on the first one's state directory (helper-108) was told that,
/// given a state directory of its own, it "would run beside it doing the same work: each event
/// delivered twice", which is false in a cluster (instances share the work): it is now told to
/// give each instance its own state directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_cluster_instance_on_a_taken_state_dir_was_warned_off_its_own() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let target = FakeTarget::start().await;
    let dir = support::temp_dir();
    let body = cluster_config(&channel.url("ch"), &[target.url("/a")], &nats.url, "");
    let (_one, one_logs) = start_in(dir.path(), &body);
    one_logs.wait_for(&["connected to channel"]).await;
    // At INFO, the log names the target (helper-108: it showed only the channel's outbox).
    one_logs
        .wait_for(&[
            "INFO",
            "the route's NATS consumer is ready",
            &target.url("/a"),
        ])
        .await;
    let out = support::run_to_end(
        smee_relay()
            .args(["run", "--config"])
            .arg(dir.path().join("config.toml"))
            .arg("--state-dir")
            .arg(dir.path().join("state")),
    )
    .await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("In a cluster, give each instance its own state directory")
            && !out.stderr.contains("twice"),
        "{}",
        out.stderr
    );
}

/// A stop that cut a cluster delivery off said "it stays queued" (helper-108), while the copy
/// went back to the cluster and another instance delivered it again, the target getting it
/// twice: the line now says where it goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_cluster_delivery_cut_off_by_a_stop_was_said_to_stay_queued() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let target = FakeTarget::start().await;
    target.hold();
    let dir = support::temp_dir();
    let body = cluster_config(&channel.url("ch"), &[target.url("/a")], &nats.url, "");
    let (one, logs) = start_in(dir.path(), &body);
    logs.wait_for(&["connected to channel"]).await;
    channel.send_webhook(1, &frame(1));
    target.wait_arrived(1).await;
    support::signal(&one, "TERM");
    let line = logs
        .wait_for(&["stopping: the delivery in flight did not finish within 1s"])
        .await;
    assert!(
        line.contains("it goes back to the cluster, and another instance delivers event 1"),
        "{line}"
    );
    // And the shutdown says it handed the delivery back, and that it is over.
    logs.wait_for(&["handed back to the cluster", "stream_seq=1"])
        .await;
    logs.wait_for(&["stopped; what this instance did not deliver, the cluster gives"])
        .await;
    target.release();
}

/// A target a reload removed in cluster mode left its consumer and the events waiting on it in
/// the cluster, for good, and the reload said only "what the cluster holds for it is not
/// counted here" (helper-108): it now counts them and names the command that removes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_target_removed_in_a_cluster_left_its_events_without_a_word() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let kept = FakeTarget::start().await;
    let removed = FakeTarget::start().await;
    removed.hold();
    let dir = support::temp_dir();
    let both = [kept.url("/a"), removed.url("/b")];
    let (child, logs) = start_in(
        dir.path(),
        &cluster_config(&channel.url("ch"), &both, &nats.url, ""),
    );
    logs.wait_for(&["connected to channel"]).await;
    for n in 0..3 {
        channel.send_webhook(n as u64 + 1, &frame(n));
    }
    kept.wait_arrived(3).await;
    removed.wait_arrived(1).await;

    config(
        dir.path(),
        &cluster_config(&channel.url("ch"), &[kept.url("/a")], &nats.url, ""),
    );
    support::signal(&child, "HUP");
    let line = logs.wait_for(&["target removed"]).await;
    assert!(
        line.contains("WARN")
            && line.contains("The cluster keeps")
            && line.contains("`nats consumer rm SMEE_join route_"),
        "{line}"
    );
    removed.release();
}
