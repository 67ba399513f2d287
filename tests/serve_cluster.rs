//! `smee-relay serve --nats-url`: replicas (real processes on 127.0.0.1:0) sharing channels
//! through one real `nats-server -js` (see tests/support/nats.rs; set `NATS_SERVER_BIN`).

mod support;

use std::time::Duration;

use base64::Engine as _;
use futures::StreamExt as _;
use support::nats::NatsServer;
use support::{LogWatch, PATIENCE};

/// A `serve` replica: its process, its logs and its base URL.
struct Replica {
    child: tokio::process::Child,
    logs: LogWatch,
    url: String,
}

impl Replica {
    /// Start a replica on `nats` with `extra` flags, and wait until it listens and has read
    /// the stream's history (`/healthz` 200).
    async fn start(nats: &str, extra: &[&str]) -> Replica {
        let mut command = support::smee_relay();
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--nats-url", nats])
            .args(extra);
        let (child, logs) = support::spawn_logged(&mut command);
        let addr = support::serve_address(&logs).await;
        let replica = Replica {
            child,
            logs,
            url: format!("http://{addr}"),
        };
        replica.wait_healthy().await;
        replica
    }

    async fn wait_healthy(&self) {
        let url = format!("{}/healthz", self.url);
        support::wait_for(PATIENCE, "the replica is healthy", || async {
            let status = get(&url).await.ok()?.status();
            status.is_success().then_some(())
        })
        .await;
    }

    fn channel(&self, name: &str) -> String {
        format!("{}/{name}", self.url)
    }

    async fn metric(&self, name: &str) -> u64 {
        let text = get(format!("{}/metrics", self.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
    }
}

async fn get(url: impl reqwest::IntoUrl) -> reqwest::Result<reqwest::Response> {
    client().get(url).send().await
}

fn client() -> reqwest::Client {
    smee_relay::http::client_builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap()
}

/// POST `body` to `url`; the status (0 when the request failed).
async fn post(url: &str, body: &[u8]) -> u16 {
    match client()
        .post(url)
        .header("content-type", "application/octet-stream")
        .header("x-test", "cluster")
        .body(body.to_vec())
        .send()
        .await
    {
        Ok(response) => response.status().as_u16(),
        Err(_) => 0,
    }
}

async fn post_ok(url: &str, body: &[u8]) {
    assert_eq!(post(url, body).await, 200, "POST {url}");
}

/// One SSE subscription, read frame by frame (pings skipped).
struct Sse {
    stream:
        std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<axum::body::Bytes>> + Send>>,
    buffer: Vec<u8>,
}

/// A frame's fields.
#[derive(Debug, Clone, PartialEq)]
struct Frame {
    /// The whole frame text, for byte-exact comparison.
    text: String,
    id: Option<u64>,
    event: Option<String>,
    data: String,
}

impl Frame {
    /// The exact body bytes of a raw (`bodyB`) frame.
    fn body(&self) -> Vec<u8> {
        let data: serde_json::Value = serde_json::from_str(&self.data).unwrap();
        base64::engine::general_purpose::STANDARD
            .decode(data["bodyB"].as_str().expect("a raw frame"))
            .unwrap()
    }
}

impl Sse {
    /// Subscribe (raw bodies) and wait for `ready`: the subscription exists from then on.
    async fn open(url: &str, last_event_id: Option<u64>) -> Sse {
        let mut request = client_no_timeout()
            .get(url)
            .header("accept", "text/event-stream")
            .header("x-smee-relay-raw", "1");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let mut sse = Sse {
            stream: Box::pin(response.bytes_stream()),
            buffer: Vec::new(),
        };
        let ready = sse.next().await;
        assert_eq!(ready.event.as_deref(), Some("ready"), "{ready:?}");
        sse
    }

    async fn next(&mut self) -> Frame {
        tokio::time::timeout(PATIENCE, self.next_frame())
            .await
            .expect("a frame came in time")
    }

    async fn next_frame(&mut self) -> Frame {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let text = String::from_utf8(self.buffer.drain(..end + 2).collect()).unwrap();
                let mut frame = Frame {
                    text: text.clone(),
                    id: None,
                    event: None,
                    data: String::new(),
                };
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        frame.id = v.parse().ok();
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        frame.event = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        frame.data = v.to_string();
                    }
                }
                if frame.event.as_deref() == Some("ping") || text.starts_with(':') {
                    continue;
                }
                return frame;
            }
            let chunk = self
                .stream
                .next()
                .await
                .expect("the stream stayed open")
                .expect("the stream read");
            self.buffer.extend_from_slice(&chunk);
        }
    }

    /// The next `n` event frames.
    async fn take(&mut self, n: usize) -> Vec<Frame> {
        let mut frames = Vec::new();
        while frames.len() < n {
            frames.push(self.next().await);
        }
        frames
    }

    /// The server ends the stream (cuts the subscriber) within the patience.
    async fn wait_end(&mut self) {
        let ended = tokio::time::timeout(PATIENCE, async {
            loop {
                match self.stream.next().await {
                    None | Some(Err(_)) => return,
                    Some(Ok(chunk)) => self.buffer.extend_from_slice(&chunk),
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "the subscription was not cut");
    }

    /// Nothing more arrives within `wait` (a positive check, after the expected frames).
    async fn assert_quiet(&mut self, wait: Duration) {
        if let Ok(frame) = tokio::time::timeout(wait, self.next_frame()).await {
            panic!("an unexpected frame: {frame:?}");
        }
    }
}

fn client_no_timeout() -> reqwest::Client {
    smee_relay::http::client_builder().build().unwrap()
}

fn bodies(frames: &[Frame]) -> Vec<Vec<u8>> {
    frames.iter().map(Frame::body).collect()
}

#[tokio::test]
async fn a_post_to_one_replica_reaches_subscribers_of_every_replica_byte_exact_in_one_order() {
    let nats = NatsServer::start().await;
    let a = Replica::start(&nats.url, &[]).await;
    let b = Replica::start(&nats.url, &[]).await;
    let c = Replica::start(&nats.url, &[]).await;
    let mut on_a = Sse::open(&a.channel("shared"), None).await;
    let mut on_b = Sse::open(&b.channel("shared"), None).await;
    let mut on_c = Sse::open(&c.channel("shared"), None).await;

    // Every byte value, and JSON that a re-serialisation would change.
    let binary: Vec<u8> = (0..=255u8).collect();
    post_ok(&a.channel("shared"), &binary).await;
    let frame_b = on_b.next().await;
    assert_eq!(frame_b.body(), binary, "byte-exact through another replica");
    assert_eq!(on_a.next().await.text, frame_b.text, "the same frame");
    assert_eq!(on_c.next().await.text, frame_b.text, "the same frame");
    let data: serde_json::Value = serde_json::from_str(&frame_b.data).unwrap();
    assert_eq!(data["x-test"], "cluster", "the sender's headers too");

    // Posts to all three replicas at once come out in one order everywhere.
    let replicas = [&a, &b, &c];
    let mut posts = Vec::new();
    for n in 0..30 {
        let url = replicas[n % 3].channel("shared");
        posts.push(async move { post_ok(&url, format!("{{ \"n\": {n} }}").as_bytes()).await });
    }
    futures::future::join_all(posts).await;
    let (from_a, from_b, from_c) = (
        on_a.take(30).await,
        on_b.take(30).await,
        on_c.take(30).await,
    );
    assert_eq!(from_a, from_b);
    assert_eq!(from_b, from_c);
    let ids: Vec<u64> = from_a.iter().map(|f| f.id.unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    let mut seen: Vec<Vec<u8>> = bodies(&from_a);
    seen.sort();
    let mut sent: Vec<Vec<u8>> = (0..30)
        .map(|n| format!("{{ \"n\": {n} }}").into_bytes())
        .collect();
    sent.sort();
    assert_eq!(seen, sent, "every post once");
    on_b.assert_quiet(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_subscriber_that_moves_from_a_to_b_gets_exactly_what_it_missed_in_order() {
    let nats = NatsServer::start().await;
    let a = Replica::start(&nats.url, &[]).await;
    let b = Replica::start(&nats.url, &[]).await;
    let mut on_a = Sse::open(&a.channel("moving"), None).await;
    for n in 0..3 {
        post_ok(&a.channel("moving"), format!("before {n}").as_bytes()).await;
    }
    let before = on_a.take(3).await;
    let last = before.last().unwrap().id.unwrap();
    drop(on_a);
    let mut missed = Vec::new();
    for n in 0..6 {
        let body = format!("missed {n}");
        // Alternate replicas, and another channel in between, which must not show up.
        post_ok(&[&a, &b][n % 2].channel("moving"), body.as_bytes()).await;
        post_ok(&b.channel("other"), b"elsewhere").await;
        missed.push(body.into_bytes());
    }
    let mut on_b = Sse::open(&b.channel("moving"), Some(last)).await;
    let replayed = on_b.take(6).await;
    assert!(
        replayed.iter().all(|f| f.event.is_none()),
        "no gap: {replayed:?}"
    );
    assert_eq!(bodies(&replayed), missed);
    on_b.assert_quiet(Duration::from_millis(300)).await;
    post_ok(&a.channel("moving"), b"live again").await;
    assert_eq!(on_b.next().await.body(), b"live again");
}

#[tokio::test]
async fn kill_9_of_a_replica_loses_nothing_that_was_acknowledged() {
    let nats = NatsServer::start().await;
    let mut a = Replica::start(&nats.url, &[]).await;
    let b = Replica::start(&nats.url, &[]).await;
    let mut on_b = Sse::open(&b.channel("crash"), None).await;
    let target = a.channel("crash");
    let poster = tokio::spawn(async move {
        let mut acknowledged = Vec::new();
        for n in 0..100_000u32 {
            let body = format!("event {n}");
            match post(&target, body.as_bytes()).await {
                200 => acknowledged.push(body.into_bytes()),
                0 => break, // the replica is gone
                other => panic!("unexpected status {other}"),
            }
        }
        acknowledged
    });
    // Kill it mid-stream, once some posts went through.
    support::wait_for(PATIENCE, "posts went through A", || async {
        (b.metric("smee_relay_serve_posts_total").await >= 20).then_some(())
    })
    .await;
    support::signal(&a.child, "KILL");
    let _ = a.child.wait().await;
    let acknowledged = tokio::time::timeout(PATIENCE, poster)
        .await
        .expect("the poster stopped")
        .unwrap();
    assert!(acknowledged.len() >= 20);
    // The live subscriber on B, and a full replay from B, have every acknowledged post in
    // order (at most one more: a post stored whose answer the kill cut off).
    let live = bodies(&on_b.take(acknowledged.len()).await);
    assert_eq!(live, acknowledged);
    let mut replay = Sse::open(&format!("{}?replay=all", b.channel("crash")), None).await;
    let all = bodies(&replay.take(acknowledged.len()).await);
    assert_eq!(all, acknowledged);
    let _ = a.logs.all();
}

#[tokio::test]
async fn retention_limits_evict_and_a_resume_past_them_is_told_of_the_gap() {
    let nats = NatsServer::start().await;
    let limits = ["--max-events", "3"];
    let a = Replica::start(&nats.url, &limits).await;
    let mut on_a = Sse::open(&a.channel("short"), None).await;
    for n in 0..6 {
        post_ok(&a.channel("short"), format!("kept? {n}").as_bytes()).await;
    }
    let all = on_a.take(6).await;
    let first = all[0].id.unwrap();
    // The stream keeps 3: a resume after the first is told that events up to the third's id
    // are gone, then gets the 3 kept.
    let mut resumed = Sse::open(&a.channel("short"), Some(first)).await;
    let gap = resumed.next().await;
    assert_eq!(gap.event.as_deref(), Some("gap"), "{gap:?}");
    let gap: serde_json::Value = serde_json::from_str(&gap.data).unwrap();
    assert_eq!(gap["after"], first);
    assert_eq!(gap["upto"], all[2].id.unwrap());
    assert_eq!(bodies(&resumed.take(3).await), bodies(&all[3..]));

    // A replica started after the eviction knows only what the stream kept: it says so too.
    let late = Replica::start(&nats.url, &limits).await;
    let mut resumed = Sse::open(&late.channel("short"), Some(first)).await;
    let gap = resumed.next().await;
    assert_eq!(gap.event.as_deref(), Some("gap"), "{gap:?}");
    assert_eq!(bodies(&resumed.take(3).await), bodies(&all[3..]));
    // And one that missed nothing is not told of a gap.
    let mut caught_up = Sse::open(&late.channel("short"), Some(all[4].id.unwrap())).await;
    assert_eq!(caught_up.next().await.body(), all[5].body());
}

#[tokio::test]
async fn nats_unreachable_at_start_exits_2_with_the_reason() {
    let unused = support::unused_addr();
    let url = format!("nats://user:s3cretpw@{unused}");
    let output = support::run_to_end(support::smee_relay().args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--nats-url",
        &url,
    ]))
    .await;
    assert_eq!(output.code, Some(2), "{}", output.stderr);
    assert!(
        output.stderr.contains("cannot connect to NATS"),
        "{}",
        output.stderr
    );
    assert!(!output.stderr.contains("s3cretpw"), "{}", output.stderr);
}

#[tokio::test]
async fn when_nats_comes_back_posts_resume_and_nothing_acknowledged_is_lost() {
    let nats = NatsServer::start().await;
    let a = Replica::start(&nats.url, &["--nats-grace", "1s"]).await;
    let b = Replica::start(&nats.url, &["--nats-grace", "1s"]).await;
    let mut on_b = Sse::open(&b.channel("outage"), None).await;
    post_ok(&a.channel("outage"), b"before").await;
    assert_eq!(on_b.next().await.body(), b"before");

    let (store, port) = nats.stop().await;
    // Posts are refused with Retry-After, never accepted unstored.
    let refused = support::wait_for(PATIENCE, "a post is refused", || async {
        let response = client()
            .post(a.channel("outage"))
            .body("during")
            .send()
            .await
            .ok()?;
        (response.status().as_u16() == 503).then_some(response)
    })
    .await;
    assert!(refused.headers().contains_key("retry-after"));
    support::wait_for(PATIENCE, "/healthz fails past the grace period", || async {
        let status = get(format!("{}/healthz", a.url)).await.ok()?.status();
        (status.as_u16() == 503).then_some(())
    })
    .await;
    assert!(
        a.metric("smee_relay_serve_nats_publish_errors_total{reason=\"unavailable\"}")
            .await
            >= 1
    );

    let _nats = NatsServer::start_again(store, port).await;
    let mut acknowledged = Vec::new();
    support::wait_for(PATIENCE, "posts are taken again", || async {
        (post(&a.channel("outage"), b"after").await == 200).then_some(())
    })
    .await;
    acknowledged.push(b"after".to_vec());
    for n in 0..5 {
        let body = format!("after {n}");
        post_ok(&[&a, &b][n % 2].channel("outage"), body.as_bytes()).await;
        acknowledged.push(body.into_bytes());
    }
    // The subscriber stayed connected through the outage and gets exactly what was taken.
    assert_eq!(bodies(&on_b.take(acknowledged.len()).await), acknowledged);
    on_b.assert_quiet(Duration::from_millis(300)).await;
    let mut replay = Sse::open(&format!("{}?replay=all", a.channel("outage")), None).await;
    let mut expected = vec![b"before".to_vec()];
    expected.extend(acknowledged);
    assert_eq!(bodies(&replay.take(expected.len()).await), expected);
    a.wait_healthy().await;
}

#[tokio::test]
async fn forward_subscribed_to_replica_b_relays_what_is_posted_to_replica_a() {
    let nats = NatsServer::start().await;
    let a = Replica::start(&nats.url, &[]).await;
    let b = Replica::start(&nats.url, &[]).await;
    let mut target = support::FakeTarget::start().await;
    let _relay = support::Relay::spawn(support::relay_options_for(
        &b.channel("fwd"),
        &target.url("/hook"),
    ));
    // Subscribed once a probe posted to A arrives (a new subscriber gets no backlog); every
    // probe posted after the first that arrived comes too, so all are taken.
    let probe_number = |r: &support::Received| {
        serde_json::from_slice::<serde_json::Value>(&r.body).ok()?["probe"].as_u64()
    };
    let mut posted = 0u64;
    let first = tokio::time::timeout(PATIENCE, async {
        loop {
            posted += 1;
            post_ok(
                &a.channel("fwd"),
                format!("{{\"probe\":{posted}}}").as_bytes(),
            )
            .await;
            if let Ok(got) = tokio::time::timeout(Duration::from_millis(300), target.next()).await {
                return got;
            }
        }
    })
    .await
    .expect("the relay subscribed to B");
    let mut last = probe_number(&first);
    while last < Some(posted) {
        last = probe_number(&target.next().await);
    }
    let sent: Vec<String> = (0..10)
        .map(|n| format!("{{\"n\":{n},  \"spaced\" : [1.50, 2e3]}}"))
        .collect();
    for body in &sent {
        post_ok(&a.channel("fwd"), body.as_bytes()).await;
    }
    let got = target.take(10).await;
    let got: Vec<String> = got
        .iter()
        .map(|r| String::from_utf8(r.body.to_vec()).unwrap())
        .collect();
    assert_eq!(got, sent, "in order, byte-exact");
    target.assert_quiet(Duration::from_millis(300)).await;
}

/// Post until the replica stores it (it may be reconnecting or recreating the stream).
async fn post_until_ok(url: &str, body: &[u8]) {
    support::wait_for(PATIENCE, "a post is stored", || async {
        (post(url, body).await == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_stream_lost_with_the_nats_store_is_recreated_and_its_reset_is_told_as_a_gap_not_silence()
{
    let nats = NatsServer::start().await;
    let a = Replica::start(&nats.url, &[]).await;
    let mut on_a = Sse::open(&a.channel("reset"), None).await;
    for n in 0..5 {
        post_ok(&a.channel("reset"), format!("old {n}").as_bytes()).await;
    }
    let old_last = on_a.take(5).await[4].id.unwrap();
    // NATS loses its store: the stream is gone, and its sequence starts again from 1.
    let (_old_store, port) = nats.stop().await;
    let fresh = NatsServer::start_again(support::temp_dir(), port).await;
    // A creates the stream again (posts are stored, not 503 forever) ...
    post_until_ok(&a.channel("reset"), b"new 0").await;
    a.wait_healthy().await;
    // ... drops its copy and cuts its subscribers, so they resume ...
    on_a.wait_end().await;
    // ... and a resume from the old stream's id is told of the reset, then gets the new
    // stream's events, instead of waiting silently for ids above 5.
    let mut resumed = Sse::open(&a.channel("reset"), Some(old_last)).await;
    let gap = resumed.next().await;
    assert_eq!(gap.event.as_deref(), Some("gap"), "{gap:?}");
    let gap: serde_json::Value = serde_json::from_str(&gap.data).unwrap();
    assert_eq!(
        (gap["after"].as_u64(), gap["reset"].as_bool()),
        (Some(old_last), Some(true))
    );
    let first_new = resumed.next().await;
    assert_eq!(first_new.body(), b"new 0");
    assert!(first_new.id.unwrap() < old_last, "{first_new:?}");
    // Another replica's posts to the new stream reach A's subscribers (not skipped as "<= 5").
    let b = Replica::start(&fresh.url, &[]).await;
    for n in 1..7 {
        post_ok(&b.channel("reset"), format!("new {n}").as_bytes()).await;
    }
    for n in 1..7 {
        assert_eq!(resumed.next().await.body(), format!("new {n}").as_bytes());
    }
    assert!(a.metric("smee_relay_serve_nats_stream_reset").await >= 1);
    assert_eq!(a.metric("smee_relay_serve_nats_stream_writable").await, 1);
}

#[tokio::test]
async fn a_last_event_id_beyond_the_streams_sequence_is_told_as_a_reset_not_silence() {
    let nats = NatsServer::start().await;
    let a = Replica::start(&nats.url, &[]).await;
    post_ok(&a.channel("beyond"), b"only").await;
    // An id from an earlier stream (this replica never saw it: no reset is known here).
    let mut resumed = Sse::open(&a.channel("beyond"), Some(1000)).await;
    let gap = resumed.next().await;
    assert_eq!(gap.event.as_deref(), Some("gap"), "{gap:?}");
    assert!(gap.data.contains("\"reset\":true"), "{gap:?}");
    assert_eq!(resumed.next().await.body(), b"only");
}

#[tokio::test]
async fn a_deleted_stream_is_created_again_and_posts_are_stored() {
    let nats = NatsServer::start().await;
    let a = Replica::start(&nats.url, &["--max-events", "7"]).await;
    post_ok(&a.channel("del"), b"before").await;
    let client = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.delete_stream("SMEE_SERVE").await.unwrap();
    post_until_ok(&a.channel("del"), b"after").await;
    let mut stream = js.get_stream("SMEE_SERVE").await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(
        info.config.max_messages_per_subject, 7,
        "created with the replica's limits"
    );
    // A notices the new stream (its periodic check), drops the deleted history and reads
    // the new one: "after" only, with the new stream's sequence.
    support::wait_for(PATIENCE, "A saw the reset", || async {
        (a.metric("smee_relay_serve_nats_stream_reset").await >= 1).then_some(())
    })
    .await;
    let mut on_a = Sse::open(&a.channel("del"), Some(0)).await;
    let after = on_a.next().await;
    assert_eq!((after.body(), after.id), (b"after".to_vec(), Some(1)));
    a.wait_healthy().await;
}

#[tokio::test]
async fn a_post_above_a_max_payload_lowered_after_connect_gets_413_not_503() {
    let dir = support::temp_dir();
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, "max_payload: 1048576\n").unwrap();
    let nats = NatsServer::start_with(&["-c", conf.to_str().unwrap()]).await;
    let a = Replica::start(&nats.url, &[]).await;
    post_ok(&a.channel("lowered"), b"small").await;
    std::fs::write(&conf, "max_payload: 65536\n").unwrap();
    nats.reload().await;
    // Whether the client heard of the new limit yet or the server cut it for the message:
    // the sender is told its post is too large, not to retry.
    assert_eq!(post(&a.channel("lowered"), &[b'x'; 100_000]).await, 413);
    post_until_ok(&a.channel("lowered"), b"small again").await;
}

#[tokio::test]
async fn a_post_jetstream_refuses_for_its_size_gets_413_not_503() {
    let nats = NatsServer::start().await;
    let a = Replica::start(&nats.url, &[]).await;
    post_ok(&a.channel("size"), b"small").await;
    // The stream's limit shrinks after the replica started (as a lowered limit would).
    let client = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("SMEE_SERVE").await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    config.max_message_size = 2048;
    js.update_stream(config).await.unwrap();
    assert_eq!(post(&a.channel("size"), &[b'x'; 4096]).await, 413);
}

#[tokio::test]
async fn user_and_password_in_the_nats_url_are_sent_to_the_server() {
    let nats = NatsServer::start_with(&["--user", "relay", "--pass", "s3cret%pw"]).await;
    // The password is percent-encoded in the URL, as URLs want (`%25` is `%`).
    let url = format!("nats://relay:s3cret%25pw@127.0.0.1:{}", nats.port);
    let a = Replica::start(&url, &[]).await;
    post_ok(&a.channel("creds"), b"{\"n\":1}").await;
    assert_eq!(a.metric("smee_relay_serve_nats_published_total").await, 1);
}

#[tokio::test]
async fn a_token_in_the_nats_url_is_sent_to_the_server() {
    let nats = NatsServer::start_with(&["--auth", "t0ken-abc"]).await;
    let url = format!("nats://t0ken-abc@127.0.0.1:{}", nats.port);
    let a = Replica::start(&url, &[]).await;
    post_ok(&a.channel("token"), b"{\"n\":1}").await;
}

#[tokio::test]
async fn a_wrong_nats_password_is_told_as_such_once_without_the_password() {
    let nats = NatsServer::start_with(&["--user", "relay", "--pass", "right"]).await;
    let url = format!("nats://relay:wr0ngpw@127.0.0.1:{}", nats.port);
    let output = support::run_to_end(support::smee_relay().args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--nats-url",
        &url,
    ]))
    .await;
    assert_eq!(output.code, Some(2), "{}", output.stderr);
    let err = output
        .stderr
        .lines()
        .find(|l| l.contains("cannot connect to NATS"))
        .unwrap_or_else(|| panic!("no connect error in:\n{}", output.stderr));
    assert!(!output.stderr.contains("wr0ngpw"), "{}", output.stderr);
    assert!(err.contains("check the user and password"), "{err}");
    assert!(!err.contains("is nats-server running"), "{err}");
    assert_eq!(err.matches("authorization violation").count(), 1, "{err}");
    assert!(!err.contains(": nats"), "{err}");
}

#[tokio::test]
async fn a_comma_separated_nats_url_list_is_accepted() {
    let nats = NatsServer::start().await;
    let unused = support::unused_addr();
    let list = format!("nats://{unused}, {}", nats.url);
    let a = Replica::start(&list, &[]).await;
    post_ok(&a.channel("list"), b"{\"n\":1}").await;
}

#[tokio::test]
async fn the_nats_password_never_appears_in_the_logs_at_vv() {
    let nats = NatsServer::start_with(&["--user", "relay", "--pass", "vvs3cretpw"]).await;
    let url = format!("nats://relay:vvs3cretpw@127.0.0.1:{}", nats.port);
    let a = Replica::start(&url, &["-vv"]).await;
    post_ok(&a.channel("vv"), b"{\"n\":1}").await;
    // A reconnect logs the servers again.
    let nats = nats.restart().await;
    let channel = a.channel("vv");
    support::wait_for(PATIENCE, "posts are stored again", || async {
        (post(&channel, b"{\"n\":2}").await < 300).then_some(())
    })
    .await;
    let logs = a.logs.all();
    // Before, async-nats's DEBUG "attempting connection server=ServerAddr(Url { .. password:
    // Some(..) })" carried it.
    assert!(!logs.contains("vvs3cretpw"), "{logs}");
    drop(nats);
}

#[tokio::test]
async fn an_empty_nats_url_is_a_usage_error_not_a_lookup_of_an_empty_host() {
    let output = support::run_to_end(
        support::smee_relay()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("SMEE_RELAY_NATS_URL", ""),
    )
    .await;
    assert_eq!(output.code, Some(2), "{}", output.stderr);
    assert!(output.stderr.contains("--nats-url"), "{}", output.stderr);
    assert!(output.stderr.contains("empty"), "{}", output.stderr);
}

/// `serve --nats-url URL extra...` run to its end (a start that must fail).
async fn serve_fails(url: &str, extra: &[&str]) -> String {
    let output = support::run_to_end(
        support::smee_relay()
            .args(["serve", "--listen", "127.0.0.1:0", "--nats-url", url])
            .args(extra),
    )
    .await;
    assert_eq!(output.code, Some(2), "{}", output.stderr);
    output.stderr
}

#[tokio::test]
async fn nats_replicas_beyond_a_single_server_say_so_not_is_jetstream_enabled() {
    let nats = NatsServer::start().await;
    let err = serve_fails(&nats.url, &["--nats-replicas", "3"]).await;
    assert!(err.contains("--nats-replicas 3 exceeds"), "{err}");
    assert!(!err.contains("is JetStream enabled"), "{err}");
}

#[tokio::test]
async fn a_missing_or_non_pem_nats_tls_ca_is_refused_at_start_naming_the_file() {
    let nats = NatsServer::start().await;
    let dir = support::temp_dir();
    let missing = dir.path().join("missing-ca.pem");
    let err = serve_fails(&nats.url, &["--nats-tls-ca", missing.to_str().unwrap()]).await;
    assert!(err.contains("missing-ca.pem"), "{err}");
    assert!(!err.contains("is nats-server running"), "{err}");
    let empty = dir.path().join("empty-ca.pem");
    std::fs::write(&empty, b"").unwrap();
    let err = serve_fails(&nats.url, &["--nats-tls-ca", empty.to_str().unwrap()]).await;
    assert!(
        err.contains("empty-ca.pem") && err.contains("no PEM certificate"),
        "{err}"
    );
}

#[tokio::test]
async fn a_replica_that_changes_the_streams_limits_warns_old_to_new() {
    let nats = NatsServer::start().await;
    let _a = Replica::start(&nats.url, &["--max-events", "10"]).await;
    let b = Replica::start(&nats.url, &["--max-events", "20"]).await;
    let line = b
        .logs
        .wait_for(&["WARN", "changing the existing stream's limits"])
        .await;
    assert!(line.contains("10 -> 20 (--max-events)"), "{line}");
    let same = Replica::start(&nats.url, &["--max-events", "20"]).await;
    assert!(same.logs.find(&["changing the existing stream"]).is_none());
}

#[tokio::test]
async fn state_dir_with_nats_url_is_a_usage_error() {
    let dir = support::temp_dir();
    let err = serve_fails(
        "nats://127.0.0.1:4222",
        &["--state-dir", dir.path().to_str().unwrap()],
    )
    .await;
    assert!(
        err.contains("--state-dir") && err.contains("--nats-url"),
        "{err}"
    );
}
