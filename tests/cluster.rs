//! Cluster mode end to end: a real `nats-server -js`, several real relay processes on one fake
//! channel, one fake target. Each event is delivered once, in order, whichever instance
//! delivers it; kill -9 of the instance delivering hands the route over after the ack wait,
//! repeating at most the delivery in flight; the alert state is compare-and-set in KV, so two
//! instances never send the same FIRING.

mod support;

use std::time::Duration;

use support::nats::{
    FAILOVER_PATIENCE, Instance, NatsServer, restart, start_cluster, write_config,
};
use support::{FakeChannel, FakeSlack, FakeTarget, smee_relay};

/// A smee frame whose body says which event it is.
fn frame(n: usize) -> String {
    format!(r#"{{"content-type":"application/json","x-github-event":"push","body":{{"n":{n}}}}}"#)
}

/// The `n` of a delivered body.
fn n_of(body: &[u8]) -> usize {
    let value: serde_json::Value = serde_json::from_slice(body).expect("a JSON body");
    value["n"].as_u64().expect("an n") as usize
}

/// This file's forwarding config (cluster `test`).
fn forward_config(channel: &str, target: &str, nats: &str) -> String {
    support::nats::forward_config(channel, target, nats, "test")
}

/// Take requests until every event of `wanted` arrived; return every body's `n`, in arrival
/// order (duplicates and events outside `wanted` included).
async fn take_until_seen(
    target: &mut FakeTarget,
    wanted: std::ops::Range<usize>,
    patience: Duration,
) -> Vec<usize> {
    let taken = take_with_ids_until_seen(target, wanted, patience).await;
    taken.into_iter().map(|(n, _)| n).collect()
}

/// [`take_until_seen`], each event with its `x-smee-relay-delivery`.
async fn take_with_ids_until_seen(
    target: &mut FakeTarget,
    wanted: std::ops::Range<usize>,
    patience: Duration,
) -> Vec<(usize, String)> {
    let mut seen: Vec<(usize, String)> = Vec::new();
    let deadline = tokio::time::Instant::now() + patience;
    while !wanted.clone().all(|n| seen.iter().any(|(s, _)| *s == n)) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(request) = target.try_next(left).await else {
            panic!("not every event of {wanted:?} arrived within {patience:?}: {seen:?}");
        };
        let id = request.header("x-smee-relay-delivery").unwrap_or_default();
        seen.push((n_of(&request.body), id.to_string()));
    }
    seen
}

/// Whether two deliveries of different events share an id (a target dropping repeats by id
/// drops one of them).
fn shared_ids(a: &[(usize, String)], b: &[(usize, String)]) -> Vec<(usize, usize, String)> {
    let mut shared = Vec::new();
    for (n, id) in a {
        for (m, other) in b {
            if id == other && n != m {
                shared.push((*n, *m, id.clone()));
            }
        }
    }
    shared
}

/// The order of first arrivals.
fn first_arrivals(seen: &[usize]) -> Vec<usize> {
    let mut out = Vec::new();
    for n in seen {
        if !out.contains(n) {
            out.push(*n);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_deliver_each_event_once_in_order() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let body = forward_config(&channel.url("ch"), &target.url("/hook"), &nats.url);
    let instances = start_cluster(3, &channel, &body, &[]).await;

    const EVENTS: usize = 30;
    for n in 0..EVENTS {
        channel.send_webhook(n as u64 + 1, &frame(n));
    }
    let seen = take_until_seen(&mut target, 0..EVENTS, support::PATIENCE).await;
    assert_eq!(seen, (0..EVENTS).collect::<Vec<_>>(), "once each, in order");
    // Nothing more comes: no instance delivers a second copy (the ack wait is 2s: any
    // repeat of an unacked delivery would show within it).
    target.assert_quiet(Duration::from_secs(3)).await;
    // Every instance published every frame; the stream stored each once.
    let published = instances
        .iter()
        .filter(|i| i.logs.find(&["NATS publish"]).is_some())
        .count();
    assert!(published >= 2, "more than one instance published");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_delivering_instance_hands_over_with_at_most_the_in_flight_repeated() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let body = forward_config(&channel.url("ch"), &target.url("/hook"), &nats.url);
    let mut instances = start_cluster(3, &channel, &body, &[]).await;

    const EVENTS: usize = 20;
    // The first delivery is held at the target: the instance holding it is mid-delivery.
    target.hold();
    for n in 0..EVENTS {
        channel.send_webhook(n as u64 + 1, &frame(n));
    }
    target.wait_arrived(1).await;
    let holder = support::wait_for(
        support::PATIENCE,
        "the instance holding the delivery",
        || {
            let found = instances.iter().position(|i| {
                i.logs
                    .find(&["took a delivery from the cluster", "stream_seq=1"])
                    .is_some()
            });
            std::future::ready(found)
        },
    )
    .await;
    let killed_at = tokio::time::Instant::now();
    instances[holder].child.start_kill().unwrap();
    instances[holder].child.wait().await.unwrap();
    target.release();

    let seen = take_until_seen(&mut target, 0..EVENTS, FAILOVER_PATIENCE).await;
    let failover = killed_at.elapsed();
    // Repeats, if any, are only of the delivery that was in flight (event 0).
    target.assert_quiet(Duration::from_secs(3)).await;
    let mut all = seen.clone();
    while let Some(request) = target.try_next(Duration::ZERO).await {
        all.push(n_of(&request.body));
    }
    let duplicates = all.len() - EVENTS;
    eprintln!("failover: {failover:?}, duplicates: {duplicates}, arrivals: {all:?}");
    assert!(
        duplicates <= 1,
        "at most the in-flight delivery repeats: {all:?}"
    );
    assert!(
        all.iter().filter(|n| **n != 0).count() == EVENTS - 1,
        "only event 0 (in flight at the kill) may repeat: {all:?}"
    );
    assert_eq!(
        first_arrivals(&all),
        (0..EVENTS).collect::<Vec<_>>(),
        "in order"
    );
    let survivors: Vec<&Instance> = instances
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != holder)
        .map(|(_, i)| i)
        .collect();
    assert!(
        survivors.iter().any(|i| i
            .logs
            .find(&["taking over a delivery another instance did not finish"])
            .is_some()),
        "a survivor took the in-flight delivery over"
    );
}

/// The pipeline config with the rule held 1 s (`for`), cluster `alerts`.
fn pipeline_config(channel: &str, slack: &str, nats: &str) -> String {
    let config = support::nats::alerts_config(channel, slack, nats, "alerts")
        .replace("clear_below = 70\n", "clear_below = 70\nfor = \"1s\"\n");
    assert!(
        config.contains("for = \"1s\""),
        "the rule is held: {config}"
    );
    config
}

/// A smee frame carrying a Port change.
fn port_frame(body: &str) -> String {
    format!(r#"{{"content-type":"application/json","body":{body}}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_judging_the_same_rule_send_one_firing() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut slack = FakeSlack::start().await;
    let body = pipeline_config(&channel.url("ch"), &slack.webhook_url(), &nats.url);
    let instances = start_cluster(2, &channel, &body, &[]).await;

    // cpu 25 -> 87 holds the alert for 1s: then both instances' runners find it due, and
    // only the one whose compare-and-set wins sends it.
    channel.send_webhook(
        1,
        &port_frame(&support::port_fixture("automation", "01-create")),
    );
    channel.send_webhook(
        2,
        &port_frame(&support::port_fixture("automation", "02-cpu-25-to-87")),
    );
    let headline = slack.next_headline().await;
    assert!(headline.contains("FIRING"), "{headline}");
    slack.assert_quiet(Duration::from_secs(4)).await;
    // The judging instance's line (an alert's delivery line, "(event 5, cpu-high FIRING)",
    // may be another instance's).
    let fired = instances
        .iter()
        .filter(|i| i.logs.find(&["FIRING cpu-high:"]).is_some())
        .count();
    assert_eq!(fired, 1, "one instance sent it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_set_lets_one_of_two_writers_win() {
    let nats = NatsServer::start().await;
    let settings = smee_relay::cluster::Settings::new(
        smee_relay::secret::SecretString::from(nats.url.clone()),
        "cas".into(),
    );
    let a = smee_relay::cluster::Cluster::connect(settings.clone())
        .await
        .unwrap();
    let b = smee_relay::cluster::Cluster::connect(settings)
        .await
        .unwrap();
    let (a, b) = (a.shared_state("k"), b.shared_state("k"));
    let (value, revision) = a.load().await.unwrap();
    assert_eq!((value, revision), (None, 0));
    // Both start from "absent": one creates, the other is told it lost.
    let won_a = a.store("from a".into(), 0).await.unwrap();
    let won_b = b.store("from b".into(), 0).await.unwrap();
    assert!(won_a && !won_b);
    let (value, revision) = b.load().await.unwrap();
    assert_eq!(value.as_deref(), Some(&b"from a"[..]));
    // Both read the same revision: again only the first update lands.
    assert!(b.store("b2".into(), revision).await.unwrap());
    assert!(!a.store("a2".into(), revision).await.unwrap());
    assert_eq!(a.load().await.unwrap().0.as_deref(), Some(&b"b2"[..]));
}

#[tokio::test]
async fn nats_unreachable_at_start_exits_2_with_the_reason() {
    let channel = FakeChannel::start().await;
    let target = FakeTarget::start().await;
    let unused = support::unused_addr();
    let dir = support::temp_dir();
    let path = write_config(
        dir.path(),
        &forward_config(
            &channel.url("ch"),
            &target.url("/hook"),
            &format!("nats://{unused}"),
        ),
    );
    let out = support::run_to_end(
        smee_relay()
            .args(["run", "--config"])
            .arg(&path)
            .arg("--state-dir")
            .arg(dir.path().join("state")),
    )
    .await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("cannot connect to NATS"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains(&unused.to_string()), "{}", out.stderr);
}

#[tokio::test]
async fn the_nats_url_flag_joins_and_hides_its_password() {
    let dir = support::temp_dir();
    let channel = FakeChannel::start().await;
    let target = FakeTarget::start().await;
    let unused = support::unused_addr();
    let path = write_config(
        dir.path(),
        &format!(
            "[[channel]]\nurl = \"{}\"\nforward = [\"{}\"]\n",
            channel.url("ch"),
            target.url("/hook")
        ),
    );
    let out = support::run_to_end(
        smee_relay()
            .args(["run", "--config"])
            .arg(&path)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env(
                "SMEE_RELAY_NATS_URL",
                format!("nats://app:hunter2@{unused}"),
            ),
    )
    .await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("cannot connect to NATS"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("hunter2"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_mid_stream_loses_nothing() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let metrics = support::unused_addr();
    let body = forward_config(&channel.url("ch"), &target.url("/hook"), &nats.url);
    // The first instance serves /healthz.
    let watched = format!("metrics_listen = \"{metrics}\"\n{body}");
    let mut instances = start_cluster(1, &channel, &watched, &[]).await;
    instances.extend(start_cluster(1, &channel, &body, &[]).await);
    let healthz = format!("http://{metrics}/healthz");
    let client = smee_relay::http::client_builder().build().unwrap();
    let health = || async {
        let response = client.get(&healthz).send().await.ok()?;
        Some((response.status().as_u16(), response.text().await.ok()?))
    };

    for n in 0..10 {
        channel.send_webhook(n as u64 + 1, &frame(n));
    }
    let first = take_until_seen(&mut target, 0..10, support::PATIENCE).await;
    assert_eq!(first, (0..10).collect::<Vec<_>>());

    // NATS goes away; receipts keep coming and wait in each instance's local spool.
    let (store, port) = nats.stop().await;
    for instance in &instances {
        instance.logs.wait_for(&["NATS connection lost"]).await;
    }
    for n in 10..20 {
        channel.send_webhook(n as u64 + 1, &frame(n));
    }
    // Past the grace (1s here), /healthz says NATS is unreachable.
    let reasons = support::wait_for(support::PATIENCE, "/healthz failing on NATS", || async {
        health()
            .await
            .filter(|(status, body)| *status == 503 && body.contains("NATS"))
            .map(|(_, body)| body)
    })
    .await;
    assert!(reasons.contains("unreachable for"), "{reasons}");
    let _nats = NatsServer::start_again(store, port).await;
    let rest = take_until_seen(&mut target, 10..20, FAILOVER_PATIENCE).await;
    target.assert_quiet(Duration::from_secs(3)).await;
    support::wait_for(support::PATIENCE, "/healthz passing again", || async {
        health().await.filter(|(status, _)| *status == 200)
    })
    .await;
    // Nothing lost, in order. The delivery in flight when NATS died (delivered, its ack not
    // yet recorded) may come once more; nothing else does (the route's floor in KV).
    let all: Vec<usize> = first.iter().chain(&rest).copied().collect();
    assert_eq!(first_arrivals(&all), (0..20).collect::<Vec<_>>(), "{all:?}");
    let repeated: Vec<usize> = rest.iter().copied().filter(|n| *n < 10).collect();
    assert!(
        repeated.len() <= 1,
        "at most the in-flight delivery repeats: {all:?}"
    );
    assert!(
        repeated.iter().all(|n| *n == 9),
        "only the last before the crash: {all:?}"
    );
}

/// This file's pipeline config (cluster `notify`).
fn alerts_config(channel: &str, slack: &str, nats: &str) -> String {
    support::nats::alerts_config(channel, slack, nats, "notify")
}

/// The cpu 25 -> 87 change of the fixtures, on entity `n` of its own (`Svc-NN`): one FIRING
/// each.
fn firing_frame(n: usize) -> String {
    let body = support::port_fixture("automation", "02-cpu-25-to-87")
        .replace("notification-service-prod", &format!("svc-{n:02}"))
        .replace("Notification Service Production", &format!("Svc-{n:02}"));
    port_frame(&body)
}

/// Which entity a Slack message is about (`Svc-NN` in its header).
fn entity_of(request: &support::Received) -> usize {
    let header = support::slack_header(request);
    let at = header.find("Svc-").unwrap_or_else(|| panic!("{header}"));
    header[at + 4..at + 6].parse().unwrap()
}

/// The instance that took a delivery of the alert route from the cluster, if one did.
fn alert_holder(instances: &[Instance]) -> Option<usize> {
    instances.iter().position(|i| {
        i.logs
            .find(&["took a delivery from the cluster", "route=alerts"])
            .is_some()
    })
}

/// The instances that took a delivery of the alert route from the cluster.
fn alert_deliverers(instances: &[Instance]) -> usize {
    instances
        .iter()
        .filter(|i| {
            i.logs
                .find(&["took a delivery from the cluster", "route=alerts"])
                .is_some()
        })
        .count()
}

/// The next `n` Slack messages: one per entity 0..n, once each, in order, and one a second
/// per webhook cluster-wide (the route's next delivery, whichever instance takes it, starts a
/// pace after the last one started; a little slack for the loopback's own jitter).
async fn next_alerts_paced(slack: &mut FakeSlack, n: usize) {
    let mut received = Vec::new();
    for _ in 0..n {
        received.push(slack.next().await);
    }
    let entities: Vec<usize> = received.iter().map(entity_of).collect();
    assert_eq!(entities, (0..n).collect::<Vec<_>>(), "once each, in order");
    let gaps: Vec<Duration> = received
        .windows(2)
        .map(|w| w[1].at.duration_since(w[0].at))
        .collect();
    eprintln!("gaps between Slack messages: {gaps:?}");
    assert!(
        gaps.iter().all(|gap| *gap >= Duration::from_millis(950)),
        "paced at one a second: {gaps:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_pacing_holds_across_two_instances_and_each_alert_arrives_once_in_order() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut slack = FakeSlack::start().await;
    let body = alerts_config(&channel.url("ch"), &slack.webhook_url(), &nats.url);
    let instances = start_cluster(2, &channel, &body, &[]).await;

    const ALERTS: usize = 8;
    for n in 0..ALERTS {
        channel.send_webhook(n as u64 + 1, &firing_frame(n));
    }
    next_alerts_paced(&mut slack, ALERTS).await;
    slack.assert_quiet(Duration::from_secs(3)).await;
    let deliverers = alert_deliverers(&instances);
    eprintln!("instances that delivered alerts: {deliverers}");
    assert_eq!(
        deliverers, 2,
        "both instances delivered alerts: the pace held across them"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_instance_delivering_an_alert_hands_over_each_alert_once_in_order() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut slack = FakeSlack::start().await;
    let body = alerts_config(&channel.url("ch"), &slack.webhook_url(), &nats.url);
    let mut instances = start_cluster(3, &channel, &body, &[]).await;

    const ALERTS: usize = 5;
    // The first alert is held at Slack: the instance delivering it is mid-delivery.
    slack.hold();
    for n in 0..ALERTS {
        channel.send_webhook(n as u64 + 1, &firing_frame(n));
    }
    slack.wait_arrived(1).await;
    // Every change judged and its alert published first: a kill between a state write and
    // the publish is a takeover of the judgement (tests/cluster_windows.rs), not what this
    // test is about.
    wait_published(&nats, 2 * ALERTS).await;
    let holder = support::wait_for(
        support::PATIENCE,
        "the instance holding the alert delivery",
        || {
            let found = instances.iter().position(|i| {
                i.logs
                    .find(&["took a delivery from the cluster", "route=alerts"])
                    .is_some()
            });
            std::future::ready(found)
        },
    )
    .await;
    let killed_at = tokio::time::Instant::now();
    instances[holder].child.start_kill().unwrap();
    instances[holder].child.wait().await.unwrap();
    slack.release();

    let mut all = Vec::new();
    let mut first_after_kill = None;
    let deadline = tokio::time::Instant::now() + FAILOVER_PATIENCE;
    while !(0..ALERTS).all(|n| all.contains(&n)) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(request) = slack.try_next(left).await else {
            panic!("not every alert arrived within {FAILOVER_PATIENCE:?}: {all:?}");
        };
        first_after_kill.get_or_insert_with(|| killed_at.elapsed());
        all.push(entity_of(&request));
    }
    let failover = killed_at.elapsed();
    eprintln!("kill -9 -> next Slack message: {first_after_kill:?}");
    slack.assert_quiet(Duration::from_secs(3)).await;
    while let Some(request) = slack.try_next(Duration::ZERO).await {
        all.push(entity_of(&request));
    }
    eprintln!(
        "alert failover: {failover:?}, duplicates: {}, arrivals: {all:?}",
        all.len() - ALERTS
    );
    assert!(
        all.len() <= ALERTS + 1,
        "at most the alert in flight repeats: {all:?}"
    );
    assert_eq!(
        all.iter().filter(|n| **n != 0).count(),
        ALERTS - 1,
        "only alert 0 (in flight at the kill) may repeat: {all:?}"
    );
    assert_eq!(
        first_arrivals(&all),
        (0..ALERTS).collect::<Vec<_>>(),
        "in order"
    );
    assert!(
        instances
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != holder)
            .any(|(_, i)| i
                .logs
                .find(&["taking over a delivery another instance did not finish"])
                .is_some()),
        "a survivor took the alert in flight over"
    );
}

/// A Port API with the DeploymentConfig entities a test sets: a token, and the entity listing
/// (one page).
#[derive(Clone, Default)]
struct FakePort {
    entities: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl FakePort {
    async fn start(&self) -> String {
        use axum::routing::{get, post};
        let entities = self.entities.clone();
        let router = axum::Router::new()
            .route(
                "/v1/auth/access_token",
                post(|| async {
                    axum::Json(serde_json::json!({
                        "ok": true, "accessToken": "tok", "expiresIn": 3600, "tokenType": "Bearer"
                    }))
                }),
            )
            .route(
                "/v1/blueprints/{blueprint}/entities",
                get(move || {
                    let entities = entities.lock().unwrap().clone();
                    async move { axum::Json(serde_json::json!({"ok": true, "entities": entities})) }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        format!("http://{addr}")
    }

    /// Entity `id` with this cpuUtil, changed in Port at 10:`minute`.
    fn set_cpu(&self, id: &str, cpu: u32, minute: u32) {
        let entity = serde_json::json!({
            "identifier": id,
            "title": format!("Service {id}"),
            "blueprint": "DeploymentConfig",
            "properties": {"cpuUtil": cpu, "healthStatus": "Healthy"},
            "relations": {},
            "updatedAt": format!("2026-11-20T10:{minute:02}:00.000Z"),
        });
        let mut entities = self.entities.lock().unwrap();
        match entities.iter_mut().find(|e| e["identifier"] == id) {
            Some(old) => *old = entity,
            None => entities.push(entity),
        }
    }
}

/// How many reconciliation snapshots an instance has judged.
fn snapshots_judged(instance: &Instance) -> usize {
    instance
        .logs
        .all()
        .matches("reconciliation of blueprint DeploymentConfig")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_reconciling_the_same_gap_send_each_alert_once() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut slack = FakeSlack::start().await;
    let port = FakePort::default();
    let port_url = port.start().await;
    // Changed in Port while no relay listened: a is over the threshold, b is not.
    port.set_cpu("a", 95, 1);
    port.set_cpu("b", 10, 1);
    let body = format!(
        r#"{}
[port]
client_id = "test-client"
client_secret = "test-secret"
api_url = "{port_url}"
reconcile = "1h"
"#,
        alerts_config(&channel.url("ch"), &slack.webhook_url(), &nats.url)
    );
    // Reconnects come seconds apart here; the default spacing (60 s) would only slow the test.
    let instances = start_cluster(
        2,
        &channel,
        &body,
        &[("SMEE_RELAY_RECONCILE_GAP_SPACING", "100ms")],
    )
    .await;
    // Both reconcile at start and judge their snapshots against the shared states: one
    // FIRING.
    for instance in &instances {
        support::wait_until(support::PATIENCE, "a snapshot judged", || {
            snapshots_judged(instance) >= 1
        })
        .await;
    }
    let headline = slack.next_headline().await;
    assert!(
        headline.contains("FIRING") && headline.contains("Service a"),
        "{headline}"
    );
    slack.assert_quiet(Duration::from_secs(3)).await;

    // a recovers in Port while the channel is down; both instances reconnect, both read the
    // gap, one RESOLVED.
    port.set_cpu("a", 40, 2);
    let (connections, judged): (usize, Vec<usize>) = (
        channel.connections(),
        instances.iter().map(snapshots_judged).collect(),
    );
    channel.close_all();
    channel.wait_connections(connections + 2).await;
    for (instance, before) in instances.iter().zip(judged) {
        support::wait_until(support::PATIENCE, "the gap's snapshot judged", || {
            snapshots_judged(instance) > before
        })
        .await;
    }
    let headline = slack.next_headline().await;
    assert!(
        headline.contains("RESOLVED") && headline.contains("Service a"),
        "{headline}"
    );
    slack.assert_quiet(Duration::from_secs(3)).await;
    let lost = instances
        .iter()
        .filter(|i| {
            i.logs
                .find(&["the cluster's alert states changed meanwhile"])
                .is_some()
        })
        .count();
    eprintln!("instances whose compare-and-set lost at least once: {lost}");
}

/// A smee frame carrying a Port change signed as Port signs it with `secret` (with Port API
/// credentials configured, the pipeline checks signatures).
fn signed_port_frame(body: &str, secret: &str) -> String {
    use base64::Engine as _;
    use hmac::{KeyInit as _, Mac as _};
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.{body}").as_bytes());
    let signature = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    format!(
        r#"{{"x-port-timestamp":"{timestamp}","x-port-signature":"{signature}","content-type":"application/json","body":{body}}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_older_than_a_change_another_instance_judged_sends_nothing() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut slack = FakeSlack::start().await;
    let port = FakePort::default();
    let port_url = port.start().await;
    let entity = "notification-service-prod";
    port.set_cpu(entity, 25, 0);
    let body = format!(
        r#"{}
[port]
client_id = "test-client"
client_secret = "test-secret"
api_url = "{port_url}"
reconcile = "1h"
"#,
        alerts_config(&channel.url("ch"), &slack.webhook_url(), &nats.url)
    );
    let instances = start_cluster(
        2,
        &channel,
        &body,
        &[("SMEE_RELAY_RECONCILE_GAP_SPACING", "100ms")],
    )
    .await;
    for instance in &instances {
        support::wait_until(support::PATIENCE, "the start's snapshot judged", || {
            snapshots_judged(instance) >= 1
        })
        .await;
    }
    // Live: cpu 25 -> 87 at 10:01 fires, 75 -> 60 at 10:05 resolves (judged by whichever
    // instance takes each from the pipeline's consumer).
    for (n, fixture) in ["02-cpu-25-to-87", "06-cpu-75-to-60"].iter().enumerate() {
        channel.send_webhook(
            n as u64 + 1,
            &signed_port_frame(&support::port_fixture("automation", fixture), "test-secret"),
        );
    }
    let headlines = slack.headlines(2).await;
    assert!(headlines[0].contains("FIRING"), "{headlines:?}");
    assert!(headlines[1].contains("RESOLVED"), "{headlines:?}");
    // Port's listing lags: it still says 87 as of 10:01. Both instances reconcile; the
    // change of 10:05 is newer, whichever instance judged it, so nothing fires again.
    port.set_cpu(entity, 87, 1);
    let (connections, judged): (usize, Vec<usize>) = (
        channel.connections(),
        instances.iter().map(snapshots_judged).collect(),
    );
    channel.close_all();
    channel.wait_connections(connections + 2).await;
    for (instance, before) in instances.iter().zip(judged) {
        support::wait_until(support::PATIENCE, "the gap's snapshot judged", || {
            snapshots_judged(instance) > before
        })
        .await;
    }
    slack.assert_quiet(Duration::from_secs(3)).await;
    let left = instances
        .iter()
        .filter(|i| {
            i.logs
                .find(&["1 left to newer changes judged already"])
                .is_some()
        })
        .count();
    assert_eq!(left, 2, "both left the entity to the newer live change");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_mid_pace_does_not_let_the_next_instance_send_early() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut slack = FakeSlack::start().await;
    let body = alerts_config(&channel.url("ch"), &slack.webhook_url(), &nats.url);
    let instances = start_cluster(2, &channel, &body, &[]).await;

    const ALERTS: usize = 3;
    for n in 0..ALERTS {
        channel.send_webhook(n as u64 + 1, &firing_frame(n));
    }
    // The instance that sent the first alert is stopped during its pace wait: the route cuts
    // the wait short, and the ack must wait it out, or the other instance sends at once.
    slack.wait_arrived(1).await;
    // Every alert published first (3 frames + 3 alerts in the stream): an alert its instance
    // judged but had not yet published when stopped would wait for that instance to start
    // again (the README's "late" window), which is not what this test is about.
    wait_published(&nats, 2 * ALERTS).await;
    // Only one alert is in flight cluster-wide: the one instance that took one has it.
    let holder = support::wait_for(
        support::PATIENCE,
        "the instance that took the first alert",
        || std::future::ready(alert_holder(&instances)),
    )
    .await;
    support::signal(&instances[holder].child, "TERM");
    let mut received = Vec::new();
    for _ in 0..ALERTS {
        received.push(slack.next().await);
    }
    let entities: Vec<usize> = received.iter().map(entity_of).collect();
    assert_eq!(
        entities,
        (0..ALERTS).collect::<Vec<_>>(),
        "once each, in order"
    );
    let gaps: Vec<Duration> = received
        .windows(2)
        .map(|w| w[1].at.duration_since(w[0].at))
        .collect();
    eprintln!("gaps across the stop: {gaps:?}");
    assert!(
        gaps.iter().all(|gap| *gap >= Duration::from_millis(950)),
        "paced across the stop: {gaps:?}"
    );
}

/// Wait until the stream of `alerts_config`'s cluster holds `count` messages (frames and the
/// alerts judged from them).
async fn wait_published(nats: &NatsServer, count: usize) {
    let client = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    support::wait_for(support::PATIENCE, "frames and alerts published", || {
        let js = js.clone();
        async move {
            let mut stream = js.get_stream("SMEE_notify").await.ok()?;
            (stream.info().await.ok()?.state.messages >= count as u64).then_some(())
        }
    })
    .await;
}

/// `smee-relay events ARGS` as run on `instance`'s machine: its config (with `[cluster]`) and
/// its state directory.
async fn events_on(instance: &Instance, args: &[&str]) -> support::Output {
    let dir = instance.dir.path();
    let out = support::run_to_end(
        smee_relay()
            .arg("events")
            .args(args)
            .arg("--config")
            .arg(dir.join("config.toml"))
            .arg("--state-dir")
            .arg(dir.join("state")),
    )
    .await;
    assert_eq!(out.code, Some(0), "events {args:?}: {}", out.stderr);
    out
}

/// `events list --json` on `instance`: the cluster's rows.
async fn cluster_rows(instance: &Instance) -> Vec<serde_json::Value> {
    let out = events_on(instance, &["list", "--json"]).await;
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_made_by_one_instance_is_listed_and_replayed_from_another_and_delivered_once()
{
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let body = forward_config(&channel.url("ch"), &target.url("/hook"), &nats.url);
    let instances = start_cluster(3, &channel, &body, &[]).await;

    // Event 0 is refused for good (400: a dead letter at once), event 1 is delivered.
    target.answer_with(&[400]);
    channel.send_webhook(1, &frame(0));
    channel.send_webhook(2, &frame(1));
    let seen = take_until_seen(&mut target, 0..2, support::PATIENCE).await;
    assert_eq!(seen, vec![0, 1]);
    let gave_up = support::wait_for(support::PATIENCE, "the dead letter recorded", || {
        std::future::ready(instances.iter().position(|i| {
            i.logs
                .find(&["dead letter recorded in the cluster"])
                .is_some()
        }))
    })
    .await;
    let other = &instances[(gave_up + 1) % instances.len()];
    let third = &instances[(gave_up + 2) % instances.len()];

    // Another instance lists it: the cluster's view, not its own spool.
    let rows = support::wait_for(support::PATIENCE, "both rows settled", || async {
        let rows = cluster_rows(other).await;
        let settled = rows.len() == 2 && rows[1]["status"] == "delivered";
        settled.then_some(rows)
    })
    .await;
    assert_eq!(rows[0]["status"], "dead", "{rows:?}");
    assert_eq!(rows[0]["last_status"], 400, "{rows:?}");
    assert_eq!(rows[0]["route"], target.url("/hook"), "{rows:?}");
    let dead_id = rows[0]["id"].as_u64().unwrap();
    let table = events_on(other, &["list"]).await.stdout;
    eprintln!("{table}");
    assert!(
        table.contains("dead") && table.contains("delivered"),
        "{table}"
    );
    let shown = events_on(other, &["show", &dead_id.to_string()])
        .await
        .stdout;
    assert!(shown.contains("dead"), "{shown}");
    assert!(shown.contains(r#"{"n":0}"#), "{shown}");
    let dead_only = events_on(third, &["list", "--status", "dead", "--json"]).await;
    let dead_only: Vec<serde_json::Value> = serde_json::from_str(&dead_only.stdout).unwrap();
    assert_eq!(dead_only.len(), 1, "{dead_only:?}");

    // Replayed from another instance: delivered once, by whichever instance takes it.
    let out = events_on(other, &["replay", "--dead"]).await;
    assert!(
        out.stdout.contains("queued 1 delivery again"),
        "{}",
        out.stdout
    );
    let again = target.next().await;
    assert_eq!(n_of(&again.body), 0);
    target.assert_quiet(Duration::from_secs(3)).await;
    // A second replay of the dead letters finds none left.
    let out = events_on(third, &["replay", "--dead"]).await;
    assert!(
        out.stdout.contains("queued 0 deliveries again"),
        "{}",
        out.stdout
    );
    target.assert_quiet(Duration::from_secs(1)).await;

    // Every instance now sees the dead letter replayed, and its replay delivered.
    let rows = support::wait_for(support::PATIENCE, "the replay delivered", || async {
        let rows = cluster_rows(third).await;
        let settled = rows.len() == 3 && rows[2]["status"] == "delivered";
        settled.then_some(rows)
    })
    .await;
    assert_eq!(rows[0]["status"], "replayed");
    let replay_id = rows[2]["id"].as_u64().unwrap();
    assert_eq!(rows[0]["replayed_as"], replay_id, "{rows:?}");
    assert_eq!(rows[2]["replay_of"], dead_id, "{rows:?}");
    // The local view is still there.
    let local = events_on(&instances[gave_up], &["list", "--local", "--json"]).await;
    let local: Vec<serde_json::Value> = serde_json::from_str(&local.stdout).unwrap();
    assert!(local.iter().any(|r| r["status"] == "dead"), "{local:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_repeat_after_a_kill_9_carries_the_same_delivery_id() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let body = forward_config(&channel.url("ch"), &target.url("/hook"), &nats.url);
    let mut instances = start_cluster(2, &channel, &body, &[]).await;

    const EVENTS: usize = 3;
    target.hold();
    for n in 0..EVENTS {
        channel.send_webhook(n as u64 + 1, &frame(n));
    }
    target.wait_arrived(1).await;
    let holder = support::wait_for(
        support::PATIENCE,
        "the instance holding the delivery",
        || {
            let found = instances.iter().position(|i| {
                i.logs
                    .find(&["took a delivery from the cluster", "stream_seq=1"])
                    .is_some()
            });
            std::future::ready(found)
        },
    )
    .await;
    instances[holder].child.start_kill().unwrap();
    instances[holder].child.wait().await.unwrap();
    target.release();

    // The survivor repeats the held delivery, then delivers the rest.
    take_until_seen(&mut target, 0..EVENTS, FAILOVER_PATIENCE).await;
    target.assert_quiet(Duration::from_secs(3)).await;
    // Every request that reached the target, the one the killed instance never heard back
    // about included.
    let requests = target.arrivals();
    let ids: Vec<(usize, String)> = requests
        .iter()
        .map(|r| {
            let id = r.header("x-smee-relay-delivery").expect("a delivery id");
            (n_of(&r.body), id.to_string())
        })
        .collect();
    eprintln!("arrivals: {ids:?}");
    let of = |n: usize| -> Vec<&String> {
        ids.iter()
            .filter(|(m, _)| *m == n)
            .map(|(_, id)| id)
            .collect()
    };
    let first = of(0);
    assert_eq!(first.len(), 2, "the held delivery and its repeat: {ids:?}");
    assert_eq!(
        first[0], first[1],
        "the repeat carries the same id: {ids:?}"
    );
    assert!(
        first[0].starts_with("test-"),
        "named after the cluster: {ids:?}"
    );
    // Each event has its own.
    let mut distinct: Vec<&String> = ids.iter().map(|(_, id)| id).collect();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), EVENTS, "{ids:?}");
}

#[tokio::test]
async fn events_for_a_cluster_that_does_not_exist_say_so_and_create_nothing() {
    let nats = NatsServer::start().await;
    let dir = support::temp_dir();
    let out = support::run_to_end(
        smee_relay()
            .args(["events", "list", "--nats-url", &nats.url])
            .arg("--state-dir")
            .arg(dir.path()),
    )
    .await;
    assert_ne!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stderr.contains(r#"no cluster "default""#),
        "{}",
        out.stderr
    );
    // Nothing was created: opening it still fails.
    let settings = smee_relay::cluster::Settings::new(
        smee_relay::secret::SecretString::from(nats.url.clone()),
        "default".into(),
    );
    assert!(smee_relay::cluster::Cluster::open(settings).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_killed_instance_restarting_does_not_deliver_its_handed_back_copy_locally() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let body = forward_config(&channel.url("ch"), &target.url("/hook"), &nats.url);
    let mut instances = start_cluster(2, &channel, &body, &[]).await;

    // The first delivery is held at the target, and its instance killed mid-delivery: its
    // local copy stays queued in its spool.
    target.hold();
    channel.send_webhook(1, &frame(0));
    target.wait_arrived(1).await;
    let holder = support::wait_for(
        support::PATIENCE,
        "the instance holding the delivery",
        || {
            let found = instances.iter().position(|i| {
                i.logs
                    .find(&["took a delivery from the cluster", "stream_seq=1"])
                    .is_some()
            });
            std::future::ready(found)
        },
    )
    .await;
    instances[holder].child.start_kill().unwrap();
    instances[holder].child.wait().await.unwrap();
    target.release();
    // The survivor takes it over (the one repeat, with the cluster's id).
    support::wait_until(FAILOVER_PATIENCE, "the takeover", || target.arrived() >= 2).await;

    // The killed instance comes back: it hands its copy back, and must not deliver it.
    restart(&mut instances[holder], &body);
    instances[holder]
        .logs
        .wait_for(&["handed back to the cluster the deliveries"])
        .await;
    // A new event shows the restarted instance's routes are running.
    channel.send_webhook(2, &frame(1));
    support::wait_until(support::PATIENCE, "event 1", || {
        target.arrivals().iter().any(|r| n_of(&r.body) == 1)
    })
    .await;
    while target.try_next(Duration::ZERO).await.is_some() {}
    target.assert_quiet(Duration::from_secs(2)).await;
    let ids: Vec<(usize, String)> = target
        .arrivals()
        .iter()
        .map(|r| {
            let id = r.header("x-smee-relay-delivery").expect("a delivery id");
            (n_of(&r.body), id.to_string())
        })
        .collect();
    eprintln!("arrivals: {ids:?}");
    assert!(
        ids.iter().all(|(_, id)| id.starts_with("test-")),
        "every delivery is the cluster's (no local id): {ids:?}"
    );
    assert_eq!(
        ids.iter().filter(|(n, _)| *n == 0).count(),
        2,
        "event 0: the held delivery and its one repeat: {ids:?}"
    );
    // Its local copy lists as handed back, not as a dead letter (helper-106: "this instance
    // stopped", whatever stopped the route).
    let local = events_on(&instances[holder], &["list", "--local", "--status", "dead"]).await;
    assert!(
        local
            .stdout
            .contains("handed back to the cluster, not a dead letter"),
        "{}",
        local.stdout
    );
}

/// Wait until `events list` on `instance` shows stream event `id` delivered.
async fn wait_delivered(instance: &Instance, id: u64) {
    support::wait_for(support::PATIENCE, "the event delivered", || async {
        let rows = cluster_rows(instance).await;
        rows.iter()
            .any(|r| r["id"] == id && r["status"] == "delivered")
            .then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_replay_since_neither_stops_at_an_old_replay_copy_nor_replays_copies() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let body = forward_config(&channel.url("ch"), &target.url("/hook"), &nats.url);
    let instances = start_cluster(1, &channel, &body, &[]).await;
    let one = &instances[0];

    // Event 0 (stream 1), old enough to be out of a 5 s window; then event 1 (stream 2).
    channel.send_webhook(1, &frame(0));
    assert_eq!(n_of(&target.next().await.body), 0);
    let sent = tokio::time::Instant::now();
    wait_delivered(one, 1).await;
    support::wait_until(Duration::from_secs(10), "event 0 out of the window", || {
        sent.elapsed() > Duration::from_secs(7)
    })
    .await;
    channel.send_webhook(2, &frame(1));
    assert_eq!(n_of(&target.next().await.body), 1);
    wait_delivered(one, 2).await;
    // Event 0 replayed: its copy (stream 3), at the end of the stream, keeps its old receive
    // time.
    let out = events_on(one, &["replay", "1"]).await;
    assert!(
        out.stdout.contains("queued 1 delivery again"),
        "{}",
        out.stdout
    );
    assert_eq!(n_of(&target.next().await.body), 0);
    wait_delivered(one, 3).await;

    // Received in the last 5 s: event 1 only (not the copy of event 0, nor event 0).
    let out = events_on(one, &["replay", "--since", "5s"]).await;
    assert!(
        out.stdout.contains("queued 1 delivery again"),
        "{}",
        out.stdout
    );
    assert_eq!(n_of(&target.next().await.body), 1);
    wait_delivered(one, 4).await;
    // Again: still event 1 alone, not also the copy the last replay made (stream 4).
    let out = events_on(one, &["replay", "--since", "5s"]).await;
    assert!(
        out.stdout.contains("queued 1 delivery again"),
        "{}",
        out.stdout
    );
    assert_eq!(n_of(&target.next().await.body), 1);
    target.assert_quiet(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_cluster_dead_letter_line_gives_the_stream_sequence_not_the_local_id() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let body = forward_config(&channel.url("ch"), &target.url("/hook"), &nats.url);
    let instances = start_cluster(1, &channel, &body, &[]).await;
    let one = &instances[0];

    // Stream event 1; locally the outbox took id 1 and the delivery's copy a later one.
    target.answer_with(&[400]);
    channel.send_webhook(1, &frame(0));
    assert_eq!(n_of(&target.next().await.body), 0);
    let line = one.logs.wait_for(&["dead letter:"]).await;
    // The hint names the stream sequence, and the config that finds the cluster (it named
    // no config, and `events` run as printed did not know where the cluster was).
    let config = one.dir.path().join("config.toml");
    let hint = format!("`smee-relay events replay 1 --config {}`", config.display());
    assert!(line.contains(&hint), "{line}");
    let delivery = one.logs.wait_for(&["failed:", "(event "]).await;
    assert!(
        delivery.contains("event 1 in the cluster"),
        "the delivery line names the stream sequence: {delivery}"
    );
    // And the hint works: the replay it names is the cluster's. The line saying the dead
    // letter is recorded in the cluster names the same command (helper-136: without the
    // config, it looked for a local spool and failed).
    let recorded = one
        .logs
        .wait_for(&["dead letter recorded in the cluster"])
        .await;
    assert!(recorded.contains(&hint), "{recorded}");
    let printed: Vec<&str> = hint.trim_matches('`').split(' ').skip(1).collect();
    let out = support::run_to_end(smee_relay().args(&printed)).await;
    assert!(
        out.code == Some(0) && out.stdout.contains("queued 1 delivery again"),
        "{printed:?}: {}{}",
        out.stdout,
        out.stderr
    );
    assert_eq!(n_of(&target.next().await.body), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_replay_local_without_to_is_refused_in_cluster_mode() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let body = forward_config(&channel.url("ch"), &target.url("/hook"), &nats.url);
    let instances = start_cluster(1, &channel, &body, &[]).await;
    let one = &instances[0];

    // A dead letter, in the cluster and in this machine's spool.
    target.answer_with(&[400]);
    channel.send_webhook(1, &frame(0));
    assert_eq!(n_of(&target.next().await.body), 0);
    one.logs
        .wait_for(&["dead letter recorded in the cluster"])
        .await;
    let dir = one.dir.path();
    let out = support::run_to_end(
        smee_relay()
            .args(["events", "replay", "--dead", "--local", "--config"])
            .arg(dir.join("config.toml"))
            .arg("--state-dir")
            .arg(dir.join("state")),
    )
    .await;
    assert_ne!(out.code, Some(0), "refused: {}", out.stdout);
    assert!(
        out.stderr.contains("--local` is refused") && out.stderr.contains("--to URL"),
        "says why and what to do: {}",
        out.stderr
    );
    // Nothing was queued locally: nothing is delivered outside the cluster.
    target.assert_quiet(Duration::from_secs(2)).await;
    // The cluster's replay is the way.
    let out = events_on(one, &["replay", "--dead"]).await;
    assert!(
        out.stdout.contains("queued 1 delivery again"),
        "{}",
        out.stdout
    );
    assert_eq!(n_of(&target.next().await.body), 0);
    target.assert_quiet(Duration::from_secs(1)).await;
}

/// The `status` of each row of `events list --json ARGS` on `instance`, by id.
async fn statuses(instance: &Instance, args: &[&str]) -> Vec<(u64, String)> {
    let mut all = vec!["list", "--json"];
    all.extend(args);
    let out = events_on(instance, &all).await;
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout));
    rows.iter()
        .map(|r| {
            (
                r["id"].as_u64().unwrap(),
                r["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_replayed_and_purged_dead_letters_are_not_listed_as_dead_or_delivered() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let body = forward_config(&channel.url("ch"), &target.url("/hook"), &nats.url);
    let instances = start_cluster(1, &channel, &body, &[]).await;
    let one = &instances[0];

    // Two dead letters (stream 1 and 2).
    target.answer_with(&[400, 400]);
    channel.send_webhook(1, &frame(0));
    channel.send_webhook(2, &frame(1));
    take_until_seen(&mut target, 0..2, support::PATIENCE).await;
    support::wait_for(support::PATIENCE, "both dead letters recorded", || async {
        (statuses(one, &["--status", "dead"]).await.len() == 2).then_some(())
    })
    .await;
    // One replayed (stream 3), the other purged.
    let out = events_on(one, &["replay", "1"]).await;
    assert!(
        out.stdout.contains("queued 1 delivery again"),
        "{}",
        out.stdout
    );
    assert_eq!(n_of(&target.next().await.body), 0);
    wait_delivered(one, 3).await;
    let out = events_on(one, &["purge", "--dead"]).await;
    assert!(
        out.stdout.contains("purged 1 dead letter"),
        "{}",
        out.stdout
    );

    let all = statuses(one, &[]).await;
    assert_eq!(
        all,
        [
            (1, "replayed".to_string()),
            (2, "purged".to_string()),
            (3, "delivered".to_string())
        ],
        "{all:?}"
    );
    assert_eq!(statuses(one, &["--status", "dead"]).await, []);
    assert_eq!(
        statuses(one, &["--status", "purged"]).await,
        [(2, "purged".to_string())]
    );
    assert_eq!(statuses(one, &["--status", "in-flight"]).await, []);
    let table = events_on(one, &["list"]).await.stdout;
    assert!(table.contains("dead (purged)"), "{table}");
    // Neither is replayed by --dead again.
    let out = events_on(one, &["replay", "--dead"]).await;
    assert!(
        out.stdout.contains("queued 0 deliveries again"),
        "{}",
        out.stdout
    );
    target.assert_quiet(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn regression_events_commands_stay_quiet_on_stderr_and_suggest_local_when_nats_is_down() {
    let nats = NatsServer::start().await;
    let settings = smee_relay::cluster::Settings::new(
        smee_relay::secret::SecretString::from(nats.url.clone()),
        "test".into(),
    );
    smee_relay::cluster::Cluster::connect(settings)
        .await
        .expect("the cluster is created");
    let dir = support::temp_dir();
    let body = forward_config(
        "http://127.0.0.1:9/ch",
        "http://127.0.0.1:9/hook",
        &nats.url,
    );
    let path = write_config(dir.path(), &body);
    let events_list = || async {
        support::run_to_end(
            smee_relay()
                .args(["events", "list", "--config"])
                .arg(&path)
                .arg("--state-dir")
                .arg(dir.path().join("state")),
        )
        .await
    };
    let out = events_list().await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        !out.stderr.contains("joined the cluster") && !out.stderr.contains("INFO"),
        "a read-only command logs no INFO: {}",
        out.stderr
    );
    let _gone = nats.stop().await;
    let out = events_list().await;
    assert_ne!(out.code, Some(0), "{}", out.stdout);
    assert!(
        out.stderr.contains("cannot connect to NATS") && out.stderr.contains("`--local`"),
        "says what else to do: {}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_route_stopped_by_a_reload_does_not_deliver_its_copy_locally_when_restarted() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let body = forward_config(&channel.url("ch"), &target.url("/hook"), &nats.url);
    let elsewhere = forward_config(&channel.url("ch"), &target.url("/other"), &nats.url);
    let env = [("SMEE_RELAY_SHUTDOWN_TIMEOUT", "1s")];
    let mut instances = start_cluster(1, &channel, &body, &env).await;
    let one = &mut instances[0];

    // The delivery is held at the target while a reload removes the route: cut off, it stays
    // queued locally and goes back to the cluster.
    target.hold();
    channel.send_webhook(1, &frame(0));
    target.wait_arrived(1).await;
    write_config(one.dir.path(), &elsewhere);
    support::signal(&one.child, "HUP");
    one.logs.wait_for(&["config reloaded", "removed"]).await;
    target.release();
    // The route comes back: the cluster redelivers the event, and only the cluster.
    write_config(one.dir.path(), &body);
    support::signal(&one.child, "HUP");
    support::wait_until(FAILOVER_PATIENCE, "the redelivery", || {
        target
            .arrivals()
            .iter()
            .filter(|r| n_of(&r.body) == 0)
            .count()
            >= 2
    })
    .await;
    while target.try_next(Duration::ZERO).await.is_some() {}
    target.assert_quiet(Duration::from_secs(2)).await;
    let ids: Vec<(usize, String)> = target
        .arrivals()
        .iter()
        .map(|r| {
            let id = r.header("x-smee-relay-delivery").expect("a delivery id");
            (n_of(&r.body), id.to_string())
        })
        .collect();
    eprintln!("arrivals: {ids:?}");
    assert!(
        ids.iter().all(|(_, id)| id.starts_with("test-")),
        "every delivery is the cluster's (no local id): {ids:?}"
    );
    assert_eq!(
        ids.len(),
        2,
        "the cut-off delivery and its one repeat: {ids:?}"
    );
}

/// One instance with two dead letters (stream 1 and 2), the event of the first gone from the
/// stream (as `max_age`, or the stream created anew, would let it go).
async fn two_dead_letters_one_gone() -> (
    NatsServer,
    FakeChannel,
    FakeTarget,
    Vec<Instance>,
    async_nats::jetstream::Context,
) {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let body = forward_config(&channel.url("ch"), &target.url("/hook"), &nats.url);
    let instances = start_cluster(1, &channel, &body, &[]).await;
    let one = &instances[0];
    target.answer_with(&[400, 400]);
    channel.send_webhook(1, &frame(0));
    channel.send_webhook(2, &frame(1));
    take_until_seen(&mut target, 0..2, support::PATIENCE).await;
    support::wait_for(support::PATIENCE, "both dead letters recorded", || async {
        (statuses(one, &["--status", "dead"]).await.len() == 2).then_some(())
    })
    .await;
    let client = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream("SMEE_test").await.unwrap();
    assert!(stream.delete_message(1).await.unwrap());
    (nats, channel, target, instances, js)
}

/// Regression (helper-154): `events replay --dead` stopped at the first dead letter whose
/// event the stream no longer holds (`no event 55 in the cluster's stream`, exit 1), and
/// replayed none of the others. It replays the others and says what it left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_replay_dead_failed_on_a_letter_whose_event_was_gone() {
    let (_nats, _channel, mut target, instances, _js) = two_dead_letters_one_gone().await;
    let out = events_on(&instances[0], &["replay", "--dead"]).await;
    assert!(
        out.stdout.contains("queued 1 delivery again")
            && out.stdout.contains(
                "left 1 dead letter: the stream no longer holds their event (it expired, or the stream was created anew)"
            ),
        "{} {}",
        out.stdout,
        out.stderr
    );
    let again = take_until_seen(&mut target, 1..2, support::PATIENCE).await;
    assert_eq!(again, [1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_dead_letters_of_events_gone_from_the_stream_were_kept_in_kv_forever() {
    let (_nats, _channel, _target, instances, js) = two_dead_letters_one_gone().await;
    let one = &instances[0];
    let out = events_on(one, &["purge", "--dead"]).await;
    assert!(
        out.stdout.contains("purged 1 dead letter")
            && out
                .stdout
                .contains("forgot 1 dead letter whose event the stream no longer holds"),
        "{}",
        out.stdout
    );
    // Only the record of the event still in the stream is left.
    let kv = js.get_key_value("smee_test_alerts").await.unwrap();
    let mut keys = kv.keys().await.unwrap();
    let mut dead = Vec::new();
    while let Some(key) = futures::StreamExt::next(&mut keys).await {
        let key = key.unwrap();
        if key.starts_with("dead.") {
            dead.push(key);
        }
    }
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].ends_with(".2"), "{dead:?}");
    assert_eq!(
        statuses(one, &["--status", "purged"]).await,
        [(2, "purged".to_string())]
    );
    // A second purge has nothing left to do.
    let out = events_on(one, &["purge", "--dead"]).await;
    assert!(
        out.stdout.contains("purged 0 dead letters") && !out.stdout.contains("forgot"),
        "{}",
        out.stdout
    );
}

/// `smee-relay events ARGS` on `instance`'s state directory WITHOUT its config: what a user
/// types who knows only `--state-dir`.
async fn events_without_config(instance: &Instance, args: &[&str]) -> support::Output {
    support::run_to_end(
        smee_relay()
            .arg("events")
            .args(args)
            .arg("--state-dir")
            .arg(instance.dir.path().join("state"))
            .env_remove("SMEE_RELAY_CONFIG")
            .env_remove("SMEE_RELAY_NATS_URL"),
    )
    .await
}

/// Regression: `events replay 1 --state-dir DIR` without `--config`, on a cluster instance's
/// state directory, re-queued this machine's copy and delivered it outside the cluster (and
/// local id 1 need not be the cluster's event 1). The spool now knows its cluster: replay
/// without `--to` and purge are refused with what to give instead, and `list` says whose ids
/// these are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_replay_without_config_on_a_cluster_spool_delivered_outside_the_cluster() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let body = forward_config(&channel.url("ch"), &target.url("/hook"), &nats.url);
    let instances = start_cluster(1, &channel, &body, &[]).await;
    let one = &instances[0];
    channel.send_webhook(1, &frame(0));
    assert_eq!(n_of(&target.next().await.body), 0);
    wait_delivered(one, 1).await;

    for args in [
        &["replay", "1"][..],
        &["replay", "--since", "1h"],
        &["replay", "--dead"],
    ] {
        let out = events_without_config(one, args).await;
        assert_ne!(out.code, Some(0), "{args:?} refused: {}", out.stdout);
        assert!(
            out.stderr.contains("cluster test")
                && out.stderr.contains("--config")
                && out.stderr.contains("--local --to URL"),
            "{args:?} names the cluster and what to do: {}",
            out.stderr
        );
    }
    let out = events_without_config(one, &["purge", "--dead"]).await;
    assert_ne!(out.code, Some(0), "purge refused: {}", out.stdout);
    assert!(
        out.stderr.contains("cluster test") && out.stderr.contains("--local"),
        "{}",
        out.stderr
    );
    // Nothing was queued locally: nothing delivered outside the cluster.
    target.assert_quiet(Duration::from_secs(2)).await;

    // `list` still works, and says these are this instance's local ids.
    let out = events_without_config(one, &["list"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stderr.contains("local ids") && out.stderr.contains("cluster test"),
        "{}",
        out.stderr
    );
    assert!(out.stdout.contains("delivered"), "{}", out.stdout);
    // Asked for explicitly, this machine's copies may still go elsewhere, or be forgotten.
    let out = events_without_config(one, &["purge", "--dead", "--local"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}

/// Regression: `events replay --since` in cluster mode re-queued the alert message on the
/// alerts route with the frames, and Slack got an old alert again ("Replay never re-alerts").
/// Now the received frames only: the forward target gets them again, Slack nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_replay_since_in_cluster_mode_re_sent_an_old_slack_alert() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut slack = FakeSlack::start().await;
    let mut target = FakeTarget::start().await;
    let body = alerts_config(&channel.url("ch"), &slack.webhook_url(), &nats.url).replace(
        "pipeline = true\n",
        &format!("pipeline = true\nforward = [\"{}\"]\n", target.url("/hook")),
    );
    let instances = start_cluster(1, &channel, &body, &[]).await;
    let one = &instances[0];
    channel.send_webhook(
        1,
        &port_frame(&support::port_fixture("automation", "01-create")),
    );
    channel.send_webhook(
        2,
        &port_frame(&support::port_fixture("automation", "02-cpu-25-to-87")),
    );
    let headline = slack.next_headline().await;
    assert!(headline.contains("FIRING"), "{headline}");
    target.take(2).await;
    // Two frames and the alert in the stream, each delivered on every route.
    wait_published(&nats, 3).await;
    support::wait_for(support::PATIENCE, "every row delivered", || async {
        let rows = cluster_rows(one).await;
        (rows.len() == 5 && rows.iter().all(|r| r["status"] == "delivered")).then_some(())
    })
    .await;

    let out = events_on(one, &["replay", "--since", "1h"]).await;
    // The two frames, on the forward target and the pipeline; not the alert.
    assert!(
        out.stdout.contains("queued 4 deliveries again"),
        "{}",
        out.stdout
    );
    let again = target.take(2).await;
    assert_eq!(again.len(), 2);
    slack.assert_quiet(Duration::from_secs(4)).await;
}

/// Regression: while NATS was down each instance logged `NATS publish (cluster …) failed:
/// cannot reach target: NATS: timed out…` at every attempt (NATS is no target). Now NATS's
/// words, paced: the first at once, then one a minute with a count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_nats_outage_logged_every_publish_attempt_as_a_target_failure() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let target = FakeTarget::start().await;
    let metrics = support::unused_addr();
    let body = format!(
        "metrics_listen = \"{metrics}\"\n{}",
        forward_config(&channel.url("ch"), &target.url("/hook"), &nats.url)
    );
    let instances = start_cluster(1, &channel, &body, &[]).await;
    let one = &instances[0];
    let client = smee_relay::http::client_builder().build().unwrap();
    let url = format!("http://{metrics}/metrics");
    // The route's cluster counters have a sample at zero before anything happened to them
    // (helper-108: none until the first skip or redelivery).
    let zero = format!(
        "smee_relay_cluster_skipped_total{{route=\"{}\"}} 0",
        target.url("/hook")
    );
    support::wait_for(support::PATIENCE, "the skipped counter at zero", || async {
        let text = support::get_text(&client, &url).await?;
        text.lines().any(|l| l == zero).then_some(())
    })
    .await;
    let (_store, _port) = nats.stop().await;
    one.logs.wait_for(&["NATS connection lost"]).await;
    channel.send_webhook(1, &frame(0));
    // Three attempts at publishing it failed.
    support::wait_for(FAILOVER_PATIENCE * 2, "three failed publishes", || async {
        let text = support::get_text(&client, &url).await?;
        let retries: f64 = text
            .lines()
            .find(|l| l.starts_with("smee_relay_retries_total") && l.contains("nats-outbox"))?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()?;
        (retries >= 3.0).then_some(())
    })
    .await;
    let all = one.logs.all();
    let failed: Vec<&str> = all
        .lines()
        .filter(|l| l.contains("NATS publish (cluster test) failed"))
        .collect();
    assert_eq!(failed.len(), 1, "one line for three attempts: {failed:?}");
    assert!(
        failed[0].contains("failed: NATS") && !failed[0].contains("target"),
        "NATS's words: {}",
        failed[0]
    );
}

/// `events list` showed an event stuck in flight as `in-flight` with no attempts and no error
/// (helper-106, helper-108: its holder failing on and on), so finding why meant reading every
/// instance's log. The holder now records its attempts and last failure in the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_an_event_stuck_in_flight_was_listed_without_its_last_error() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let target = FakeTarget::start().await;
    target.answer_with(&[503, 503, 503, 503, 503, 503, 503, 503]);
    let body = forward_config(&channel.url("ch"), &target.url("/hook"), &nats.url);
    let instances = start_cluster(2, &channel, &body, &[]).await;
    channel.send_webhook(1, &frame(0));
    target.wait_arrived(2).await;
    let row = support::wait_for(support::PATIENCE, "the in-flight row's error", || async {
        let rows = cluster_rows(&instances[0]).await;
        rows.into_iter()
            .find(|r| r["status"] == "in-flight" && r["last_status"] == 503)
    })
    .await;
    assert!(row["attempts"].as_u64() >= Some(1), "{row}");
    assert!(
        row["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("503")),
        "{row}"
    );
}

/// helper-107: Slack got two alerts 0.16 s apart across the cluster. A copy of an alert that
/// waited at one instance (a stall) while another took it over found the floor the other had
/// written, logged "already delivered (NATS forgot its ack)" and acked it: NATS took the ack
/// of the late copy, and the route's next alert went out during the other instance's pace.
/// A late copy now leaves the ack to the instance that holds the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_late_copy_s_ack_released_the_slack_pace_early() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut slack = FakeSlack::start().await;
    let body = alerts_config(&channel.url("ch"), &slack.webhook_url(), &nats.url);
    // A holds each delivery as it arrives, and sends no renewal: B takes them over.
    let hold = support::nats::HeldFault::new("hold-on-arrival");
    let _a = start_cluster(1, &channel, &body, &hold.env()).await;
    let b = start_cluster(1, &channel, &body, &[]).await;
    const ALERTS: usize = 3;
    for n in 0..ALERTS {
        channel.send_webhook(n as u64 + 1, &firing_frame(n));
    }
    // B delivers the first alert A was given, writes the floor, and waits out its pace: A's
    // late copy goes on then.
    b[0].logs
        .wait_for(&["the route's floor is written", "route=alerts"])
        .await;
    hold.release();
    next_alerts_paced(&mut slack, ALERTS).await;
    slack.assert_quiet(Duration::from_secs(3)).await;
}

/// `events list --nats-url URL` without a config knew only cluster `default`, and there was no
/// way to name another (helper-108): `--cluster NAME` names it, and the error says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_events_with_only_a_nats_url_could_not_name_the_cluster() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let body = forward_config(&channel.url("ch"), &target.url("/hook"), &nats.url);
    let instances = start_cluster(1, &channel, &body, &[]).await;
    channel.send_webhook(1, &frame(0));
    assert_eq!(n_of(&target.next().await.body), 0);
    wait_delivered(&instances[0], 1).await;

    let list = |extra: &[&str]| {
        let mut command = smee_relay();
        command
            .args(["events", "list", "--json", "--nats-url", &nats.url])
            .args(extra)
            .env_remove("SMEE_RELAY_CONFIG");
        async move { support::run_to_end(&mut command).await }
    };
    let out = list(&[]).await;
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains("--cluster NAME"), "{}", out.stderr);
    let out = list(&["--cluster", "test"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
    assert!(
        rows.iter()
            .any(|r| r["id"] == 1 && r["status"] == "delivered"),
        "{rows:?}"
    );
}

/// helper-109: Slack got two alerts 0.67 s apart. An instance whose attempt finished while
/// NATS's answers to it were stalled (its lease no longer confirmed) asked whether the
/// message was still its own, took no answer for "yes", and acked: its ack reached NATS,
/// which had given the message to another instance, and the route's next message could go
/// out during that one's pace. It now asks until NATS answers (bounded by a stop), and
/// leaves the ack to the holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_late_attempt_acked_when_nats_did_not_answer() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let target = FakeTarget::start().await;
    let proxy = support::nats::FreezableProxy::start(nats.port).await;
    target.hold();
    let config =
        |nats_url: &str| forward_config(&channel.url("ch"), &target.url("/hook"), nats_url);
    let a = start_cluster(1, &channel, &config(&proxy.url), &[]).await;
    channel.send_webhook(1, &frame(0));
    target.wait_arrived(1).await;
    let b = start_cluster(1, &channel, &config(&nats.url), &[]).await;

    // A's answers stall while its attempt is under way: B takes the delivery over.
    proxy.freeze_answers();
    target.wait_arrived(2).await;
    target.release();
    b[0].logs.wait_for(&["cluster delivery done"]).await;
    // A's attempt ended too, NATS not answering it: it must not ack (for 5 s of no answer).
    a[0].logs.wait_for(&["/hook -> 200"]).await;
    let quiet_until = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < quiet_until {
        if let Some(line) = a[0].logs.find(&["the route's floor is written"]) {
            panic!("A acked without NATS's word: {line}\n{}", a[0].logs.all());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // NATS answers again: A learns that B has it, and leaves the ack to B.
    proxy.thaw();
    a[0].logs
        .wait_for(&["delivered here after the cluster gave it to another instance"])
        .await;
    assert_eq!(target.arrived(), 2, "the one repeat under way");
}

/// Regression (helper-136): the instance delivering a route said its lag only between
/// deliveries, and when it took a message: stuck on one delivery (the target slow or down),
/// it said 0 while events waited behind it. The lag (in flight included) is now said every
/// 5 s, whatever the route is doing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_the_lag_of_a_route_stuck_on_a_delivery_read_0() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let target = FakeTarget::start().await;
    let metrics = support::unused_addr();
    let body = forward_config(&channel.url("ch"), &target.url("/hook"), &nats.url);
    let watched = format!("metrics_listen = \"{metrics}\"\n{body}");
    let _instances = start_cluster(1, &channel, &watched, &[]).await;
    target.hold();
    channel.send_webhook(1, &frame(0));
    support::wait_for(support::PATIENCE, "the first delivery under way", || {
        std::future::ready((target.arrived() == 1).then_some(()))
    })
    .await;
    channel.send_webhook(2, &frame(1));
    channel.send_webhook(3, &frame(2));
    let client = smee_relay::http::client_builder().build().unwrap();
    let url = format!("http://{metrics}/metrics");
    let series = format!(
        "smee_relay_cluster_consumer_lag{{route=\"{}\"}} 3",
        target.url("/hook")
    );
    support::wait_for(
        support::PATIENCE,
        "the lag said while the delivery is held",
        || async {
            let text = client.get(&url).send().await.ok()?.text().await.ok()?;
            text.lines().any(|line| line == series).then_some(())
        },
    )
    .await;
    target.release();
}

/// Delete this file's cluster's stream, as `nats stream rm SMEE_test` does.
async fn delete_the_stream(nats: &NatsServer) {
    let client = async_nats::connect(&nats.url).await.unwrap();
    async_nats::jetstream::new(client)
        .delete_stream("SMEE_test")
        .await
        .unwrap();
}

/// Regression (helper-148): the stream deleted (`nats stream rm SMEE_...`) and created anew
/// by an operator numbers its messages from 1 again, while each route's floor in KV still
/// said the old stream's last delivered sequence: every new event below it was skipped as
/// "already delivered" (and listed delivered), with nothing said above INFO. A floor names
/// its stream now, and one of an earlier stream is said and counts as none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_stream_created_anew_had_its_events_skipped_as_delivered() {
    let (instances, _, _) = restart_on_a_new_stream(true).await;
    instances[0]
        .logs
        .wait_for(&["WARN", "is of an earlier stream SMEE_test"])
        .await;
}

/// Regression (helper-151): the stream deleted and created anew by an instance's start
/// numbered its messages from 1 again, so its events took the ids (`x-smee-relay-delivery`)
/// of the old stream's: a target dropping repeats by id dropped them. The stream an instance
/// creates numbers on from the routes' floors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_stream_created_anew_gave_its_events_the_old_ids() {
    let (instances, first, rest) = restart_on_a_new_stream(false).await;
    assert_eq!(shared_ids(&first, &rest), vec![], "{first:?} {rest:?}");
    // helper-154: the start that created it anew said nothing of what was lost with it.
    instances[0]
        .logs
        .wait_for(&[
            "WARN",
            "the cluster's stream SMEE_test was gone",
            "numbering on from sequence",
        ])
        .await;
}

/// One instance delivers 0..10, is killed, the stream is deleted (and created again by hand,
/// numbered from 1, if `by_hand`), the instance starts again and delivers 10..15: once each,
/// in order, none skipped as delivered. Returns the instance and both deliveries with ids.
async fn restart_on_a_new_stream(
    by_hand: bool,
) -> (Vec<Instance>, Vec<(usize, String)>, Vec<(usize, String)>) {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let body = forward_config(&channel.url("ch"), &target.url("/hook"), &nats.url);
    let mut instances = start_cluster(1, &channel, &body, &[]).await;
    for n in 0..10 {
        channel.send_webhook(n as u64 + 1, &frame(n));
    }
    let first = take_with_ids_until_seen(&mut target, 0..10, support::PATIENCE).await;
    let numbers: Vec<usize> = first.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, (0..10).collect::<Vec<_>>());

    instances[0].child.start_kill().unwrap();
    instances[0].child.wait().await.unwrap();
    delete_the_stream(&nats).await;
    if by_hand {
        let client = async_nats::connect(&nats.url).await.unwrap();
        async_nats::jetstream::new(client)
            .create_stream(async_nats::jetstream::stream::Config {
                name: "SMEE_test".into(),
                subjects: vec!["smee.test.>".into()],
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let before = channel.connections();
    restart(&mut instances[0], &body);
    instances[0]
        .logs
        .wait_for(&["the route's NATS consumer is ready"])
        .await;
    channel.wait_connections(before + 1).await;
    for n in 10..15 {
        channel.send_webhook(n as u64 + 1, &frame(n));
    }
    let rest = take_with_ids_until_seen(&mut target, 10..15, support::PATIENCE).await;
    let numbers: Vec<usize> = rest.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, (10..15).collect::<Vec<_>>(), "once each, in order");
    assert!(
        instances[0].logs.find(&["already delivered"]).is_none(),
        "{}",
        instances[0].logs.all()
    );
    (instances, first, rest)
}

/// Regression (helper-148): with the stream deleted while the instances ran, every outbox
/// retried "no stream found" for ever (at INFO), and nothing was delivered until an instance
/// restarted. A publish that finds no stream creates it anew, and the routes take up the new
/// one, their floors of the old one counting as none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_stream_deleted_under_running_instances_was_never_created_again() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let body = forward_config(&channel.url("ch"), &target.url("/hook"), &nats.url);
    let instances = start_cluster(2, &channel, &body, &[]).await;
    for n in 0..5 {
        channel.send_webhook(n as u64 + 1, &frame(n));
    }
    let first = take_with_ids_until_seen(&mut target, 0..5, support::PATIENCE).await;
    let numbers: Vec<usize> = first.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, (0..5).collect::<Vec<_>>());
    delete_the_stream(&nats).await;
    for n in 5..10 {
        channel.send_webhook(n as u64 + 1, &frame(n));
    }
    let rest = take_with_ids_until_seen(&mut target, 5..10, FAILOVER_PATIENCE).await;
    let numbers: Vec<usize> = rest.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        first_arrivals(&numbers),
        (5..10).collect::<Vec<_>>(),
        "{rest:?}"
    );
    // helper-151: the new stream numbered from 1 again, so its events had the old ones' ids.
    assert_eq!(shared_ids(&first, &rest), vec![], "{first:?} {rest:?}");
    // helper-154: a consumer deleted with the stream was said as a connection slow or down.
    for instance in &instances {
        assert!(
            instance
                .logs
                .find(&["the connection is slow or down"])
                .is_none(),
            "{}",
            instance.logs.all()
        );
    }
    // Its line may still be in the instance's log thread when the target has the events.
    support::wait_for(support::PATIENCE, "the stream's loss said", || {
        let said = instances.iter().any(|i| {
            i.logs
                .find(&["WARN", "stream SMEE_test was gone"])
                .is_some()
        });
        std::future::ready(said.then_some(()))
    })
    .await;
}

/// Regression (helper-151): with the stream deleted, a reload adding a target started a route
/// that waited for its consumer, and so for the stream, while nothing was published until it
/// had one: no publish came to create the stream, and the cluster stopped for good. A route
/// that finds no stream creates it anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_reload_right_after_the_stream_was_deleted_stopped_the_cluster() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let mut added = FakeTarget::start().await;
    let body = forward_config(&channel.url("ch"), &target.url("/hook"), &nats.url);
    let instances = start_cluster(1, &channel, &body, &[]).await;
    channel.send_webhook(1, &frame(0));
    take_until_seen(&mut target, 0..1, support::PATIENCE).await;
    delete_the_stream(&nats).await;
    let both = body.replace(
        &format!(r#"forward = ["{}"]"#, target.url("/hook")),
        &format!(
            r#"forward = ["{}", "{}"]"#,
            target.url("/hook"),
            added.url("/b")
        ),
    );
    assert_ne!(both, body);
    write_config(instances[0].dir.path(), &both);
    support::signal(&instances[0].child, "HUP");
    instances[0].logs.wait_for(&["config reloaded"]).await;
    for n in 1..4 {
        channel.send_webhook(n as u64 + 1, &frame(n));
    }
    let seen = take_until_seen(&mut target, 1..4, FAILOVER_PATIENCE).await;
    assert_eq!(
        first_arrivals(&seen),
        (1..4).collect::<Vec<_>>(),
        "{seen:?}"
    );
    let seen = take_until_seen(&mut added, 1..4, FAILOVER_PATIENCE).await;
    assert_eq!(
        first_arrivals(&seen),
        (1..4).collect::<Vec<_>>(),
        "{seen:?}"
    );
}
