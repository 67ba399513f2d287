//! The cluster's alert state in NATS KV under load and faults: a state larger than one NATS
//! value holds, hostile entity ids, and a compare-and-set whose answer never arrives.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::nats::{Instance, NatsServer, start_instance};
use support::{FakeChannel, FakeSlack, smee_relay, spawn_logged};

/// This file's pipeline config (cluster `state`).
fn alerts_config(channel: &str, slack: &str, nats: &str) -> String {
    support::nats::alerts_config(channel, slack, nats, "state")
}

/// A Port change of the fixtures on an entity of its own.
fn frame_for(fixture: &str, entity: &str) -> String {
    let body = support::port_fixture("automation", fixture)
        .replace("notification-service-prod", entity)
        .replace("Notification Service Production", entity);
    format!(r#"{{"content-type":"application/json","body":{body}}}"#)
}

async fn one_instance(nats: &str) -> (FakeChannel, FakeSlack, Instance) {
    let channel = FakeChannel::start().await;
    let slack = FakeSlack::start().await;
    let instance = start_instance(
        &alerts_config(&channel.url("ch"), &slack.webhook_url(), nats),
        &[],
    );
    instance.logs.wait_for(&["joined the cluster"]).await;
    channel.wait_connections(1).await;
    (channel, slack, instance)
}

/// The alert state was one KV value: past NATS's max payload (1 MiB by default, a few
/// thousand entities' change times; 8 KiB here, a few hundred) every compare-and-set failed
/// and the whole cluster sent no alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_state_larger_than_one_nats_value_still_fires() {
    let dir = support::temp_dir();
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, "max_payload: 8192\n").unwrap();
    let nats = NatsServer::start_with(&["-c", conf.to_str().unwrap()]).await;
    let (channel, mut slack, instance) = one_instance(&nats.url).await;
    // 400 entities created (cpu 25: no alert), each leaving its change time in the state.
    let entities = 400;
    for n in 0..entities {
        channel.send_webhook(n + 1, &frame_for("01-create", &format!("svc-{n:05}")));
    }
    channel.send_webhook(entities + 1, &frame_for("02-cpu-25-to-87", "svc-00007"));
    let headline = tokio::time::timeout(Duration::from_secs(60), slack.next_headline())
        .await
        .expect("the FIRING arrives");
    assert!(headline.contains("FIRING"), "{headline}");
    assert!(
        instance
            .logs
            .find(&["cannot store the cluster's alert states"])
            .is_none(),
        "no write was refused"
    );
}

/// 28 events naming 40 KB entities filled the one KV value: every later alert was stuck.
/// Such an entity is refused as bad input (a dead letter, counted) and never stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entities_named_by_kilobytes_are_refused_and_alerts_go_on() {
    let nats = NatsServer::start().await;
    let (channel, mut slack, instance) = one_instance(&nats.url).await;
    for n in 0..28 {
        let huge = format!("{n:02}{}", "x".repeat(40 * 1024));
        channel.send_webhook(n + 1, &frame_for("01-create", &huge));
    }
    channel.send_webhook(29, &frame_for("02-cpu-25-to-87", "svc-ok"));
    let headline = slack.next_headline().await;
    assert!(headline.contains("FIRING"), "{headline}");
    let refused = instance
        .logs
        .wait_for(&["refused as bad input", "over the 1024"])
        .await;
    assert!(refused.contains("bytes"), "{refused}");
    let shards = state_written(&nats.url).await;
    assert!(shards < 40 * 1024, "no huge entity stored: {shards} bytes");
}

/// The bytes of the cluster's alert state in KV, once there are any.
async fn state_written(url: &str) -> usize {
    support::wait_for(support::PATIENCE, "the alert state written", || async {
        let client = async_nats::connect(url).await.ok()?;
        let kv = async_nats::jetstream::new(client)
            .get_key_value("smee_state_alerts")
            .await
            .ok()?;
        // The one value of releases before the shards, then the shards.
        let mut total = match kv.get("alert-states").await {
            Ok(Some(value)) => value.len(),
            _ => 0,
        };
        for n in 0..256 {
            if let Ok(Some(value)) = kv.get(format!("alert-states.{n}")).await {
                total += value.len();
            }
        }
        (total > 0).then_some(total)
    })
    .await
}

/// A TCP proxy to NATS that, once armed, forwards the first client bytes carrying `trigger`,
/// lets the server apply them, then cuts the connection: the server did the write, its
/// answer never reaches the client.
async fn cutting_proxy(nats_port: u16, trigger: &'static [u8], armed: Arc<AtomicBool>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", nats_port)).await else {
                continue;
            };
            let armed = armed.clone();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let cut = Arc::new(tokio::sync::Notify::new());
                let cut2 = cut.clone();
                let up = async move {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        let hit = buf[..n].windows(trigger.len()).any(|w| w == trigger)
                            && armed.swap(false, Ordering::SeqCst);
                        if hit {
                            // Stop passing answers before the write goes on: notified after
                            // it, the answer could slip through first on a busy machine
                            // (CI, 2026-12-06), and the write looked answered.
                            cut2.notify_one();
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        if hit {
                            // Give the server the moment it takes to apply the write before
                            // the connection goes (a reset could discard it unread): fault
                            // injection, not a wait.
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            return;
                        }
                    }
                };
                let down = async move {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        tokio::select! {
                            // The cut first, whatever else is ready.
                            biased;
                            _ = cut.notified() => return,
                            read = sr.read(&mut buf) => {
                                let n = match read {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => n,
                                };
                                if cw.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                };
                tokio::select! {
                    _ = up => {}
                    _ = down => {}
                }
            });
        }
    });
    port
}

/// The compare-and-set that judged a FIRING landed in NATS, but its answer was lost with the
/// connection: judged again, the state already said FIRING and nothing was ever sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firing_whose_write_landed_without_an_answer_is_still_sent() {
    let nats = NatsServer::start().await;
    let nats_port: u16 = nats.url.rsplit(':').next().unwrap().parse().unwrap();
    let armed = Arc::new(AtomicBool::new(false));
    let proxy = cutting_proxy(nats_port, b"HPUB $KV.smee_state_alerts.", armed.clone()).await;
    let (channel, mut slack, instance) = one_instance(&format!("nats://127.0.0.1:{proxy}")).await;

    channel.send_webhook(1, &frame_for("01-create", "svc-cut"));
    // The create judged (its change time written) before the cut is armed.
    state_written(&nats.url).await;
    armed.store(true, Ordering::SeqCst);
    channel.send_webhook(2, &frame_for("02-cpu-25-to-87", "svc-cut"));
    let headline = tokio::time::timeout(Duration::from_secs(60), slack.next_headline())
        .await
        .expect("the FIRING arrives");
    assert!(headline.contains("FIRING"), "{headline}");
    assert!(!armed.load(Ordering::SeqCst), "the cut happened");
    instance
        .logs
        .wait_for(&["NATS did not answer landed"])
        .await;
    slack.assert_quiet(Duration::from_secs(3)).await;
}

/// SIGHUP compared only `[cluster]`'s shown URL and name: a new ack_wait (or replicas,
/// credentials, the NATS password...) logged "config reloaded" and applied nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changing_any_cluster_setting_says_it_takes_a_restart() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let slack = FakeSlack::start().await;
    let body = alerts_config(&channel.url("ch"), &slack.webhook_url(), &nats.url);
    let dir = support::temp_dir();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, &body).unwrap();
    let mut command = smee_relay();
    command
        .args(["run", "--config"])
        .arg(&path)
        .arg("--state-dir")
        .arg(dir.path().join("state"));
    let (child, logs) = spawn_logged(&mut command);
    logs.wait_for(&["joined the cluster"]).await;
    std::fs::write(
        &path,
        body.replace("ack_wait = \"2s\"", "ack_wait = \"3s\""),
    )
    .unwrap();
    support::signal(&child, "HUP");
    let line = logs
        .wait_for(&["[cluster] changed (ack_wait); that takes a restart"])
        .await;
    assert!(!line.contains("config reloaded"), "{line}");
    assert!(logs.find(&["config reloaded"]).is_none(), "nothing applied");
}

/// Releases before the shards kept the whole alert state in one KV value (`alert-states`):
/// an alert firing there is still known, and resolves, after the upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_one_value_state_of_earlier_releases_is_carried_over() {
    let nats = NatsServer::start().await;
    let client = async_nats::connect(&nats.url).await.unwrap();
    let kv = async_nats::jetstream::new(client)
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: "smee_state_alerts".into(),
            history: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let legacy = r#"{"states":{"cpu-high\u001fsvc-old":{"phase":{"phase":"firing","since_ms":1},"draft":null,"fired":null}},"changed":{}}"#;
    kv.put("alert-states", legacy.into()).await.unwrap();
    let (channel, mut slack, instance) = one_instance(&nats.url).await;
    instance
        .logs
        .wait_for(&["carried the cluster's alert state over"])
        .await;
    // cpu 75 -> 60 clears the alert: only a FIRING state (the old value's) resolves.
    channel.send_webhook(1, &frame_for("06-cpu-75-to-60", "svc-old"));
    let headline = slack.next_headline().await;
    assert!(headline.contains("RESOLVED"), "{headline}");
    assert!(
        matches!(kv.get("alert-states").await, Ok(None)),
        "the one value is gone"
    );
}
