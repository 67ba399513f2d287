//! Cluster mode with large frames: a real `nats-server -js` (its `max_payload` the default
//! 1 MiB, or lowered by a config file to keep the tests fast), real relay processes, one fake
//! channel and one fake target. A body travels raw in its NATS message, or through the
//! cluster's object store when the message would exceed `max_payload`; a frame NATS can never
//! take is a dead letter on the outbox, and the frames behind it still go; frames published by
//! a relay before this format are still delivered.

mod support;

use std::time::Duration;

use futures::StreamExt as _;
use support::nats::{NatsServer, start_cluster};
use support::{FakeChannel, FakeTarget};

/// This file's forwarding config (cluster `sizes`).
fn forward_config(channel: &str, target: &str, nats: &str) -> String {
    support::nats::forward_config(channel, target, nats, "sizes")
}

/// A nats-server whose `max_payload` is `bytes` (a config file: there is no flag for it).
async fn nats_with_max_payload(bytes: usize) -> (NatsServer, tempfile::TempDir) {
    let dir = support::temp_dir();
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, format!("max_payload: {bytes}\n")).unwrap();
    let nats = NatsServer::start_with(&["-c", conf.to_str().unwrap()]).await;
    (nats, dir)
}

/// A JSON body of about `size` bytes saying it is event `n`, its padding varied so a shifted
/// or truncated copy shows.
fn body(n: usize, size: usize) -> String {
    let pad: String = (0..size)
        .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
        .collect();
    format!(r#"{{"n":{n},"pad":"{pad}"}}"#)
}

/// A smee frame carrying `body` as its exact text.
fn frame(body: &str) -> String {
    format!(r#"{{"content-type":"application/json","x-github-event":"push","body":{body}}}"#)
}

fn n_of(body: &[u8]) -> u64 {
    let value: serde_json::Value = serde_json::from_slice(body).expect("a JSON body");
    value["n"].as_u64().expect("an n")
}

/// Every request until `count` arrived, then nothing more for a while.
async fn take(target: &mut FakeTarget, count: usize) -> Vec<bytes::Bytes> {
    let mut got = Vec::new();
    while got.len() < count {
        let Some(request) = target.try_next(support::PATIENCE).await else {
            panic!(
                "only {} of {count} deliveries arrived: {:?}",
                got.len(),
                got.iter()
                    .map(|b: &bytes::Bytes| n_of(b))
                    .collect::<Vec<_>>()
            );
        };
        got.push(request.body);
    }
    // Any repeat of an unacked delivery would show within the ack wait (2s).
    target.assert_quiet(Duration::from_secs(3)).await;
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_nats_max_payload_no_longer_blocks_the_cluster() {
    // The server's default max_payload (1 MiB): the frame is three times that.
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let config = forward_config(&channel.url("big"), &target.url("/hook"), &nats.url);
    let instances = start_cluster(2, &channel, &config, &[]).await;

    let small = body(0, 10);
    let big = body(1, 3 * 1024 * 1024);
    let after = body(2, 10);
    channel.send_webhook(1, &frame(&small));
    channel.send_webhook(2, &frame(&big));
    channel.send_webhook(3, &frame(&after));

    let got = take(&mut target, 3).await;
    assert_eq!(got[0], small.as_bytes(), "the first, as sent");
    assert!(got[1] == big.as_bytes(), "the 3 MiB frame, byte-exact");
    assert_eq!(got[2], after.as_bytes(), "the one behind it, delivered too");

    // Both instances published the big frame; its body is stored once.
    let client = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let bodies = js.get_object_store("smee_sizes_bodies").await.unwrap();
    let objects: Vec<_> = bodies.list().await.unwrap().collect().await;
    assert_eq!(objects.len(), 1, "one object: {objects:?}");
    let bucket = js.get_stream("OBJ_smee_sizes_bodies").await.unwrap();
    let stream = js.get_stream("SMEE_sizes").await.unwrap();
    assert_eq!(
        bucket.cached_info().config.max_age,
        stream.cached_info().config.max_age,
        "bodies are kept as long as the frames"
    );
    assert!(
        instances
            .iter()
            .all(|i| i.logs.find(&["max payload"]).is_none()),
        "no instance was refused for size"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_chunked_through_a_small_max_payload_arrive_whole() {
    let (nats, _conf) = nats_with_max_payload(16 * 1024).await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let config = forward_config(&channel.url("chunks"), &target.url("/hook"), &nats.url);
    let _instances = start_cluster(1, &channel, &config, &[]).await;

    // Just under, just over, and many chunks over the limit.
    let bodies = [
        body(0, 15 * 1024),
        body(1, 17 * 1024),
        body(2, 200 * 1024),
        body(3, 1),
    ];
    for (i, b) in bodies.iter().enumerate() {
        channel.send_webhook(i as u64 + 1, &frame(b));
    }
    // Headers travel in a NATS header as JSON: quotes, backslashes and non-ASCII too.
    let note = r#"caf\u00e9 \u2713 \"q\" back\\slash"#;
    channel.send_webhook(
        9,
        &format!(r#"{{"content-type":"application/json","x-note":"{note}","body":{{"n":4}}}}"#),
    );
    let got = take(&mut target, bodies.len() + 1).await;
    let noted = target.arrivals().last().cloned().expect("arrived");
    assert_eq!(n_of(&noted.body), 4);
    assert_eq!(
        noted.headers.get("x-note").map(|v| v.as_bytes()),
        Some("café ✓ \"q\" back\\slash".as_bytes()),
        "the header as sent"
    );
    for (sent, got) in bodies.iter().zip(&got) {
        assert!(
            got == sent.as_bytes(),
            "event {} byte-exact ({} bytes sent, {} got)",
            n_of(got),
            sent.len(),
            got.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_nats_can_never_take_is_a_dead_letter_and_the_queue_behind_it_proceeds() {
    let (nats, _conf) = nats_with_max_payload(8 * 1024).await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let config = forward_config(&channel.url("refused"), &target.url("/hook"), &nats.url);
    let instances = start_cluster(1, &channel, &config, &[]).await;

    // Its headers alone (they travel in the message, not in the object store) exceed it.
    let huge_header = "h".repeat(10 * 1024);
    channel.send_webhook(
        1,
        &format!(
            r#"{{"content-type":"application/json","x-huge":"{huge_header}","body":{{"n":0}}}}"#
        ),
    );
    let next = body(1, 10);
    channel.send_webhook(2, &frame(&next));

    let got = take(&mut target, 1).await;
    assert_eq!(got[0], next.as_bytes(), "the frame behind it went");
    let line = instances[0]
        .logs
        .wait_for(&["dead letter", "NATS cannot take event"])
        .await;
    assert!(
        line.contains("max_payload") && line.contains("raise max_payload"),
        "says why and what to do: {line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_published_before_the_upgrade_are_still_delivered() {
    use sha2::Digest as _;
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let url = channel.url("upgrade");
    let config = forward_config(&url, &target.url("/hook"), &nats.url);

    // What a relay before this format left in the stream: the whole payload a JSON envelope,
    // the body an array of numbers.
    let old_body = body(0, 300);
    let envelope = serde_json::json!({
        "channel": url,
        "received_ms": 1_700_000_000_000u64,
        "event": {
            "sse_id": "1",
            "timestamp_ms": null,
            "headers": [["content-type", "application/json"]],
            "query": [],
            "body": old_body.as_bytes(),
        },
    });
    let key = smee_relay::spool::lock::channel_key(&url);
    let subject = format!(
        "smee.sizes.ch.{}",
        hex::encode(&sha2::Sha256::digest(key.as_bytes())[..8])
    );
    // The stream is the relay's: the first instance creates it, then stops publishing nothing
    // of its own until the channel sends.
    let instances = start_cluster(1, &channel, &config, &[]).await;
    let client = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.publish(subject, serde_json::to_vec(&envelope).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let got = take(&mut target, 1).await;
    assert_eq!(got[0], old_body.as_bytes(), "the old envelope's body");

    let new_body = body(1, 10);
    channel.send_webhook(2, &frame(&new_body));
    let got = take(&mut target, 1).await;
    assert_eq!(got[0], new_body.as_bytes());
    assert!(
        instances[0].logs.find(&["cannot be delivered"]).is_none(),
        "nothing terminated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_larger_than_nats_may_store_is_a_dead_letter_and_the_queue_behind_it_proceeds() {
    let dir = support::temp_dir();
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        "max_payload: 65536\njetstream { max_file_store: 2MB }\n",
    )
    .unwrap();
    let nats = NatsServer::start_with(&["-c", conf.to_str().unwrap()]).await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let config = forward_config(&channel.url("nospace"), &target.url("/hook"), &nats.url);
    let instances = start_cluster(1, &channel, &config, &[]).await;

    channel.send_webhook(1, &frame(&body(0, 3 * 1024 * 1024)));
    let next = body(1, 10);
    channel.send_webhook(2, &frame(&next));

    let got = take(&mut target, 1).await;
    assert_eq!(got[0], next.as_bytes(), "the frame behind it went");
    let line = instances[0]
        .logs
        .wait_for(&["dead letter", "NATS cannot take event"])
        .await;
    assert!(
        line.contains("no room for its body") && line.contains("max_file_store"),
        "says why and what to do: {line}"
    );
}

/// helper-107: a body fetch (object store) slower than the ack wait let NATS give the message
/// to another delivery meanwhile; the fetching instance then withdrew its copy, and the next
/// fetch was as slow: the route never delivered it. The lease is renewed during the fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_body_fetch_slower_than_the_ack_wait_never_delivered() {
    let (nats, _conf) = nats_with_max_payload(16 * 1024).await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let config = forward_config(&channel.url("slowfetch"), &target.url("/hook"), &nats.url);
    // Each fetch takes twice the ack wait (2s).
    let instances = start_cluster(
        1,
        &channel,
        &config,
        &[("SMEE_RELAY_FAULT", "slow-body-fetch=4000")],
    )
    .await;
    let sent = body(1, 64 * 1024);
    channel.send_webhook(1, &frame(&sent));
    let got = target
        .try_next(support::nats::FAILOVER_PATIENCE)
        .await
        .unwrap_or_else(|| panic!("never delivered:\n{}", instances[0].logs.all()));
    assert!(got.body == sent.as_bytes(), "byte-exact");
    target.assert_quiet(Duration::from_secs(3)).await;
}
