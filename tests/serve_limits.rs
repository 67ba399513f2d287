//! `serve` facing the internet: the memory budget, caps, timeouts, bad input, drain, signals,
//! TLS and the allow-list. Every server listens on 127.0.0.1:0; waits are conditions with
//! deadlines.

mod support;

use std::time::Duration;

use smee_relay::server::{ServeConfig, serve, serve_with_reload};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

struct Server {
    url: String,
    addr: String,
    cancel: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

async fn start(config: ServeConfig) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let cancel = CancellationToken::new();
    let run = serve(listener, config, cancel.clone());
    let done = tokio::spawn(async move { run.await.unwrap() });
    Server {
        url: format!("http://{addr}"),
        addr,
        cancel,
        done,
    }
}

fn client() -> reqwest::Client {
    smee_relay::http::client_builder().build().unwrap()
}

/// A value from `/metrics` (the line starting with `name`, labels included).
async fn metric(server: &Server, name: &str) -> f64 {
    let text = client()
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// Wait until `metric(name)` satisfies `ok`.
async fn wait_metric(server: &Server, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    loop {
        let value = metric(server, name).await;
        if ok(value) {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} stayed at {value}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn post(url: &str, body: Vec<u8>) -> reqwest::Response {
    client()
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn error_of(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let json: serde_json::Value = response.json().await.expect("a JSON error body");
    (
        status,
        json["error"].as_str().expect("an error reason").to_string(),
    )
}

/// A raw subscriber on `path` that reads nothing until asked.
async fn raw_subscriber(
    server: &Server,
    path: &str,
    last_id: Option<&str>,
) -> tokio::net::TcpStream {
    let mut socket = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let resume = last_id.map_or(String::new(), |id| format!("Last-Event-ID: {id}\r\n"));
    socket
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n{resume}\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    socket
}

/// A subscriber on `path`, ready, that reads nothing more: a small receive buffer, so the
/// kernel does not read on its behalf for long.
async fn stalled_subscriber(server: &Server, path: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut socket = socket.connect(server.addr.parse().unwrap()).await.unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n");
    socket.write_all(head.as_bytes()).await.unwrap();
    read_until(&mut socket, "event: ready").await;
    socket
}

/// Read from `socket` until `needle` has been seen (or panic after the deadline).
async fn read_until(socket: &mut tokio::net::TcpStream, needle: &str) -> String {
    let mut seen = Vec::new();
    tokio::time::timeout(support::PATIENCE, async {
        let mut buf = [0u8; 16384];
        while !String::from_utf8_lossy(&seen).contains(needle) {
            let n = socket.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed before {needle:?}: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {needle:?} in {}", String::from_utf8_lossy(&seen)));
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test]
async fn memory_stays_within_the_budget_and_evictions_are_counted() {
    let limit = 2 << 20;
    let server = start(ServeConfig {
        max_memory: limit,
        ..ServeConfig::default()
    })
    .await;
    let body = vec![b'7'; 32 << 10];
    for i in 0..200 {
        let sent = post(&format!("{}/ch{}", server.url, i % 40), body.clone()).await;
        assert_eq!(sent.status().as_u16(), 200);
        if i % 10 == 9 {
            let held = metric(&server, "smee_relay_serve_bytes_held").await;
            assert!(held <= limit as f64, "held {held} > {limit}");
        }
    }
    let evicted = metric(
        &server,
        "smee_relay_serve_evicted_events_total{reason=\"memory\"}",
    )
    .await;
    assert!(evicted > 100.0, "{evicted} evictions counted");
    // The newest events are the ones kept.
    let mut replay = raw_subscriber(&server, "/ch39", Some("0")).await;
    read_until(&mut replay, "id: ").await;
    server.cancel.cancel();
}

#[tokio::test]
async fn channels_cost_no_ring_up_front_and_the_cap_answers_503_json() {
    let server = start(ServeConfig {
        max_channels: 200,
        ..ServeConfig::default()
    })
    .await;
    for i in 0..200 {
        assert_eq!(
            post(&format!("{}/c{i}", server.url), b"{}".to_vec())
                .await
                .status(),
            200
        );
    }
    // 200 channels with one small event each: a few hundred bytes apiece, not a ring each.
    let held = metric(&server, "smee_relay_serve_bytes_held").await;
    assert!(held < 200.0 * 2048.0, "200 tiny channels hold {held} bytes");

    let (status, reason) =
        error_of(post(&format!("{}/one-more", server.url), b"{}".to_vec()).await).await;
    assert_eq!(status, 503);
    assert!(reason.contains("maximum of 200 channels"), "{reason}");
    let subscribe = client()
        .get(format!("{}/another", server.url))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(subscribe).await.0, 503);
    let new = client()
        .get(format!("{}/new", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(new).await.0, 503);
    // Existing channels work on.
    assert_eq!(
        post(&format!("{}/c7", server.url), b"{}".to_vec())
            .await
            .status(),
        200
    );
    server.cancel.cancel();
}

#[tokio::test]
async fn an_unused_channel_expires_with_its_events() {
    let server = start(ServeConfig {
        channel_ttl: Duration::from_millis(50),
        ..ServeConfig::default()
    })
    .await;
    assert_eq!(
        post(&format!("{}/brief", server.url), b"{}".to_vec())
            .await
            .status(),
        200
    );
    wait_metric(&server, "smee_relay_serve_channels_expired_total", |n| {
        n >= 1.0
    })
    .await;
    assert_eq!(metric(&server, "smee_relay_serve_channels").await, 0.0);
    assert_eq!(
        metric(
            &server,
            "smee_relay_serve_evicted_events_total{reason=\"channel_ttl\"}"
        )
        .await,
        1.0
    );
    server.cancel.cancel();
}

#[tokio::test]
async fn a_stalled_subscriber_is_cut_off_within_the_budget_and_resumes() {
    let limit = 4 << 20;
    let server = start(ServeConfig {
        max_memory: limit,
        ..ServeConfig::default()
    })
    .await;
    let mut stalled = stalled_subscriber(&server, "/stall").await;
    let body = format!("{{\"pad\":\"{}\"}}", "x".repeat(32 << 10)).into_bytes();
    for i in 0..400 {
        assert_eq!(
            post(&format!("{}/stall", server.url), body.clone())
                .await
                .status(),
            200
        );
        if i % 10 != 9 {
            continue;
        }
        let held = metric(&server, "smee_relay_serve_bytes_held").await;
        assert!(
            held <= limit as f64,
            "held {held} > {limit} with a stalled subscriber"
        );
    }
    wait_metric(
        &server,
        "smee_relay_serve_shed_connections_total{reason=\"lagging_subscriber\"}",
        |n| n >= 1.0,
    )
    .await;
    // It reads what it was sent, then the end of the stream.
    let mut got = Vec::new();
    tokio::time::timeout(support::PATIENCE, stalled.read_to_end(&mut got))
        .await
        .expect("the stalled subscriber was disconnected")
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    let last = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("id: "))
        .expect("some events")
        .to_string();
    let mut resumed = raw_subscriber(&server, "/stall", Some(&last)).await;
    let replay = read_until(&mut resumed, "\nid: ").await;
    let first: u64 = replay
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(first > last.parse::<u64>().unwrap());
    server.cancel.cancel();
}

/// Regression (helper-142): a subscriber that stopped reading in the middle of a large frame
/// pinned that frame after its event was evicted: the budget stayed full, so every post to
/// every channel got 503 until the write stall shed the socket (60 s), and nothing was said.
/// Two subscribers and two posts of control characters (whose smee frame is six times the
/// body) did it again every minute. Evicting an event now cuts the subscribers still sending
/// its frame.
#[tokio::test]
async fn regression_a_stalled_subscriber_pinning_a_frame_refused_every_post() {
    let limit = 16 << 20;
    let server = start(ServeConfig {
        max_memory: limit,
        write_stall: Duration::from_secs(300),
        ..ServeConfig::default()
    })
    .await;
    // Two subscribers stop reading, each in the middle of a frame of about 12 MiB (2 MiB of
    // control characters, each escaped in 6 bytes): 24 MiB pinned, past the budget.
    let mut stalled = Vec::new();
    for name in ["pin1", "pin2"] {
        let socket = stalled_subscriber(&server, &format!("/{name}")).await;
        let sent = client()
            .post(format!("{}/{name}", server.url))
            .header("content-type", "text/plain")
            .body(vec![1u8; 2 << 20])
            .send()
            .await
            .unwrap();
        assert_eq!(sent.status(), 200);
        stalled.push(socket);
    }
    wait_metric(&server, "smee_relay_serve_bytes_held", |held| {
        held > (24 << 20) as f64
    })
    .await;
    // Posts to another channel: each goes through, at most after a moment's refusal while
    // the subscribers count as stopped (10 s without taking a piece) and are cut.
    let body = format!("{{\"pad\":\"{}\"}}", "x".repeat(1 << 20)).into_bytes();
    for n in 0..12 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let status = post(&format!("{}/victim", server.url), body.clone())
                .await
                .status();
            if status == 200 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "post {n} refused for 15 s: {status}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let shed = "smee_relay_serve_shed_connections_total{reason=\"lagging_subscriber\"}";
    assert!(metric(&server, shed).await >= 1.0);
    server.cancel.cancel();
}

/// Regression (helper-145, of the fix above): a subscriber reading a large frame steadily, if
/// slowly, was cut when its event was evicted for memory, and lost the event.
#[tokio::test]
async fn regression_a_slow_but_reading_subscriber_was_cut_mid_frame() {
    let limit = 16 << 20;
    let server = start(ServeConfig {
        max_memory: limit,
        ..ServeConfig::default()
    })
    .await;
    let mut reader = raw_subscriber(&server, "/steady", None).await;
    read_until(&mut reader, "event: ready").await;
    // 2 MiB of control characters: a frame of about 12 MiB, read steadily.
    let sent = client()
        .post(format!("{}/steady", server.url))
        .header("content-type", "text/plain")
        .body(vec![1u8; 2 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 200);
    let read = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        // The frame's end, before the chunk's `\r\n` of HTTP/1.1.
        let ended = |seen: &[u8]| seen.len() > 12 << 20 && seen.ends_with(b"}\n\n\r\n");
        while !ended(&seen) {
            let n = reader.read(&mut buf).await.unwrap();
            assert!(n > 0, "cut after {} bytes", seen.len());
            seen.extend_from_slice(&buf[..n]);
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        seen.len()
    });
    wait_metric(&server, "smee_relay_serve_bytes_held", |held| {
        held > (12 << 20) as f64
    })
    .await;
    // A post elsewhere that the frame being read leaves no room for: the event is evicted,
    // and the post refused (the frame's memory is in use), not the reader cut.
    let refused = post(&format!("{}/other", server.url), vec![b'x'; 5 << 20]).await;
    assert_eq!(refused.status(), 503);
    let evicted = "smee_relay_serve_evicted_events_total{reason=\"memory\"}";
    assert!(
        metric(&server, evicted).await >= 1.0,
        "the event was evicted"
    );
    let got = tokio::time::timeout(support::PATIENCE, read)
        .await
        .expect("the frame read within the deadline")
        .unwrap();
    assert!(got > 12 << 20, "read {got} bytes");
    let shed = "smee_relay_serve_shed_connections_total{reason=\"lagging_subscriber\"}";
    assert_eq!(metric(&server, shed).await, 0.0);
    server.cancel.cancel();
}

/// Regression (helper-145): a body over half of `--max-memory` (all that bodies being read may
/// hold) could never be read, yet got 503 "try again shortly", which senders retry for ever,
/// and failed `/healthz` for 10 s: it is 413, and the server healthy.
#[tokio::test]
async fn regression_a_body_over_half_the_budget_got_503_and_failed_healthz() {
    let server = start(ServeConfig {
        max_memory: 16 << 20,
        ..ServeConfig::default()
    })
    .await;
    let url = format!("{}/big", server.url);
    for chunked in [false, true] {
        let body = vec![b'x'; 9 << 20];
        let request = client().post(&url).header("content-type", "text/plain");
        let request = if chunked {
            let piece = bytes::Bytes::from(body);
            let stream = futures::stream::iter([Ok::<_, std::io::Error>(piece)]);
            request.body(reqwest::Body::wrap_stream(stream))
        } else {
            request.body(body)
        };
        let (status, reason) = error_of(request.send().await.unwrap()).await;
        assert_eq!(status, 413, "chunked {chunked}: {reason}");
        assert!(
            reason.contains("8388608 bytes") && reason.contains("half of --max-memory"),
            "{reason}"
        );
    }
    let health = client()
        .get(format!("{}/healthz", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    server.cancel.cancel();
}

#[tokio::test]
async fn slow_loris_heads_and_bodies_are_cut_at_the_read_timeout() {
    let server = start(ServeConfig {
        read_timeout: Duration::from_millis(300),
        ..ServeConfig::default()
    })
    .await;
    let mut loris = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    loris
        .write_all(b"POST /x HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(support::PATIENCE, loris.read_to_end(&mut rest))
        .await
        .expect("the server closed a head that never ended")
        .ok();
    wait_metric(
        &server,
        "smee_relay_serve_shed_connections_total{reason=\"read_timeout\"}",
        |n| n >= 1.0,
    )
    .await;

    let mut body = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    body.write_all(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"a\":")
        .await
        .unwrap();
    let answer = read_until(&mut body, "}").await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("--read-timeout"), "{answer}");
    server.cancel.cancel();
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_and_counted() {
    let server = start(ServeConfig {
        max_connections: 2,
        ..ServeConfig::default()
    })
    .await;
    let _a = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let _b = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    // `/metrics` itself needs a connection: wait until both idle ones are counted by trying.
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    loop {
        let mut third = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
        third
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(support::PATIENCE, third.read_to_end(&mut got)).await;
        if got.is_empty() {
            break; // closed unanswered: shed
        }
        assert!(tokio::time::Instant::now() < deadline, "never shed");
    }
    drop((_a, _b));
    wait_metric(
        &server,
        "smee_relay_serve_shed_connections_total{reason=\"max_connections\"}",
        |n| n >= 1.0,
    )
    .await;
    server.cancel.cancel();
}

#[tokio::test]
async fn subscribers_per_channel_are_bounded() {
    let server = start(ServeConfig {
        max_subscribers: 1,
        ..ServeConfig::default()
    })
    .await;
    let mut first = raw_subscriber(&server, "/busy", None).await;
    read_until(&mut first, "event: ready").await;
    let second = client()
        .get(format!("{}/busy", server.url))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let (status, reason) = error_of(second).await;
    assert_eq!(status, 503);
    assert!(reason.contains("maximum of 1 subscribers"), "{reason}");
    server.cancel.cancel();
}

#[tokio::test]
async fn bad_input_gets_json_errors_and_odd_headers_are_counted() {
    let server = start(ServeConfig {
        max_body: 1024,
        ..ServeConfig::default()
    })
    .await;
    let (status, reason) =
        error_of(post(&format!("{}/big", server.url), vec![b'x'; 2048]).await).await;
    assert_eq!(status, 413);
    assert!(reason.contains("--max-body"), "{reason}");
    // `%ff` (not UTF-8) was a plain-text 400 from the router (helper-118).
    for bad in ["bad.name", "%00", "%ff", &"x".repeat(65)] {
        let (status, reason) =
            error_of(post(&format!("{}/{bad}", server.url), b"{}".to_vec()).await).await;
        assert_eq!(status, 404, "{bad}");
        assert!(reason.contains("channel"), "{reason}");
    }
    let (status, _) = error_of(
        client()
            .delete(format!("{}/ch", server.url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 405);
    // A webhook posted to /new (a sender's URL copied from the wrong place) was told that
    // channels take POST.
    let (status, reason) =
        error_of(post(&format!("{}/new", server.url), b"{}".to_vec()).await).await;
    assert_eq!(status, 405);
    assert_eq!(
        reason,
        "/new takes GET (it redirects to a fresh channel); post webhooks to a channel's URL, /CHANNEL"
    );
    let (status, reason) =
        error_of(post(&format!("{}/healthz", server.url), b"{}".to_vec()).await).await;
    assert_eq!((status, reason.as_str()), (405, "/healthz takes GET"));

    let mut subscriber = raw_subscriber(&server, "/odd", None).await;
    read_until(&mut subscriber, "event: ready").await;
    let mut raw = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    // Regression (helper-118): a value in UTF-8 beyond ASCII was dropped as "not UTF-8", and a
    // header named `rawdata` stood beside the frame's body, where a client took it for the body.
    raw.write_all("POST /odd HTTP/1.1\r\nHost: x\r\nX-Good: yes\r\nX-Utf8: café\r\nRawdata: REPLACED\r\nBody: also\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n".as_bytes())
        .await
        .unwrap();
    raw.write_all(b"X-Bad: \xff\xfe\r\n\r\n{}").await.unwrap();
    let mut answer = Vec::new();
    raw.read_to_end(&mut answer).await.unwrap();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    let event = read_until(&mut subscriber, "timestamp").await;
    assert!(event.contains(r#""x-good":"yes""#), "{event}");
    assert!(event.contains(r#""x-utf8":"café""#), "{event}");
    assert!(!event.contains("x-bad"), "{event}");
    assert!(
        !event.contains("rawdata") && !event.contains("REPLACED"),
        "{event}"
    );
    assert!(
        event.contains(r#""body":{}"#) && !event.contains("also"),
        "{event}"
    );
    assert_eq!(
        metric(&server, "smee_relay_serve_headers_dropped_total").await,
        3.0
    );
    // A content type with UTF-8 beyond ASCII in it still says JSON: the body is parsed
    // (helper-119: it counted as none, and the body went out as a string).
    let mut raw = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    raw.write_all("POST /odd HTTP/1.1\r\nHost: x\r\nContent-Type: application/json; charset=\"utf-8é\"\r\nContent-Length: 10\r\nConnection: close\r\n\r\n{\"real\":3}".as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    raw.read_to_end(&mut answer).await.unwrap();
    let event = read_until(&mut subscriber, "timestamp").await;
    assert!(event.contains(r#""body":{"real":3}"#), "{event}");
    server.cancel.cancel();
}

#[tokio::test]
async fn shutdown_sends_subscribers_a_final_comment_and_closes() {
    let server = start(ServeConfig::default()).await;
    let mut subscriber = raw_subscriber(&server, "/drain", None).await;
    read_until(&mut subscriber, "event: ready").await;
    server.cancel.cancel();
    let mut rest = Vec::new();
    tokio::time::timeout(support::PATIENCE, subscriber.read_to_end(&mut rest))
        .await
        .expect("the socket closed")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&rest).contains(": the server is shutting down"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
    tokio::time::timeout(support::PATIENCE, server.done)
        .await
        .expect("serve returned after the drain")
        .unwrap();
}

#[tokio::test]
async fn posts_only_from_allowed_networks() {
    let server = start(ServeConfig {
        allow_post_from: vec!["10.0.0.0/8".parse().unwrap()],
        trust_proxy: true,
        ..ServeConfig::default()
    })
    .await;
    let (status, reason) =
        error_of(post(&format!("{}/ch", server.url), b"{}".to_vec()).await).await;
    assert_eq!(status, 403);
    assert!(reason.contains("127.0.0.1"), "{reason}");
    let proxied = client()
        .post(format!("{}/ch", server.url))
        .header("x-forwarded-for", "192.0.2.1, 10.1.2.3")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(proxied.status(), 200, "the proxy's last hop is the client");
    // Regression (helper-128): a last hop the server could not parse was passed over for an
    // earlier one, which the client wrote: `--allow-post-from` was bypassed.
    let send = |forwarded: &'static str| {
        client()
            .post(format!("{}/ch", server.url))
            .header("x-forwarded-for", forwarded)
            .body("{}")
            .send()
    };
    for forged in [
        "10.1.1.1, 203.0.113.5:443",
        "10.1.1.1, unknown",
        "10.1.1.1, unix:",
        "10.1.1.1,",
    ] {
        let (status, reason) = error_of(send(forged).await.unwrap()).await;
        assert_eq!(status, 403, "{forged}: {reason}");
    }
    // A proxy's own spellings of the client: with a port, and IPv4 mapped into IPv6.
    for allowed in [
        "192.0.2.1, 10.1.2.3:51000",
        "[::ffff:10.1.2.3]:443",
        "::ffff:10.1.2.3",
    ] {
        assert_eq!(send(allowed).await.unwrap().status(), 200, "{allowed}");
    }
    server.cancel.cancel();
}

/// Regression (helper-130): behind a proxy, `/new` took the first `X-Forwarded-Host` and
/// `-Proto`, which the client may have written itself; the proxy's are the last.
#[tokio::test]
async fn regression_new_took_the_clients_forwarded_host_before_the_proxys() {
    let server = start(ServeConfig {
        trust_proxy: true,
        ..ServeConfig::default()
    })
    .await;
    let new = |host: &'static str, proto: &'static str| {
        client()
            .head(format!("{}/new", server.url))
            .header("x-forwarded-host", host)
            .header("x-forwarded-proto", proto)
            .send()
    };
    for (host, proto) in [
        ("evil.example, hooks.example.org", "http, https"),
        ("evil.example,hooks.example.org", "http,https"),
        // Regression (helper-132): a scheme in capitals was not taken.
        ("hooks.example.org", "HTTPS"),
    ] {
        let answer = new(host, proto).await.unwrap();
        let location = answer.headers()["location"].to_str().unwrap();
        assert!(
            location.starts_with("https://hooks.example.org/"),
            "{host}: {location}"
        );
    }
    // Regression (helper-134): a last hop that is no host fell back to `Host`, the proxy's
    // upstream name.
    for host in ["hooks.example.org, host:abc", "hooks.example.org,", ""] {
        let answer = new(host, "https").await.unwrap();
        assert_eq!(answer.status(), 400, "{host:?}");
    }
    // Two header lines: the proxy's is the last.
    let answer = client()
        .head(format!("{}/new", server.url))
        .header("x-forwarded-host", "evil.example")
        .header("x-forwarded-host", "hooks.example.org:8443")
        .send()
        .await
        .unwrap();
    let location = answer.headers()["location"].to_str().unwrap();
    assert!(
        location.starts_with("http://hooks.example.org:8443/"),
        "{location}"
    );
    server.cancel.cancel();
}

#[tokio::test]
async fn sighup_does_not_kill_serve() {
    let mut child = support::smee_relay()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let logs = support::LogWatch::new(child.stderr.take().unwrap());
    let line = logs.wait_for(&["serving smee channels"]).await;
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .expect("the address is logged")
        .to_string();
    let pid = child.id().unwrap() as i32;
    for _ in 0..3 {
        // SAFETY: kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    }
    logs.wait_for(&["SIGHUP"]).await;
    let health = client()
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    // The relay's shape (`{"ok":true}` before), so one health check fits both.
    assert_eq!(health.text().await.unwrap(), r#"{"status":"ok"}"#);
    assert!(child.try_wait().unwrap().is_none(), "still running");
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = tokio::time::timeout(support::PATIENCE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    // Regression (helper-133): no line said the stop had ended.
    logs.wait_for(&["stopped; the channels' events were in memory only"])
        .await;
}

fn trusting(cert: &std::path::Path) -> reqwest::Client {
    let pem = std::fs::read(cert).unwrap();
    // reqwest's own TLS set-up, not the process's shared config: this client trusts the test CA.
    smee_relay::http::client_builder()
        .tls_backend_rustls()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

#[tokio::test]
async fn tls_serves_https_and_a_reload_picks_up_a_new_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (first_ca, first_cert, first_key) = support::certificate(dir.path(), "first");
    let (second_ca, second_cert, second_key) = support::certificate(dir.path(), "second");
    let (cert, key) = (dir.path().join("live.crt"), dir.path().join("live.key"));
    std::fs::copy(&first_cert, &cert).unwrap();
    std::fs::copy(&first_key, &key).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cancel = CancellationToken::new();
    let reload = std::sync::Arc::new(tokio::sync::Notify::new());
    let config = ServeConfig {
        tls: Some(smee_relay::server::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        }),
        ..ServeConfig::default()
    };
    tokio::spawn(serve_with_reload(
        listener,
        config,
        cancel.clone(),
        reload.clone(),
    ));
    let url = format!("https://{addr}/healthz");
    assert_eq!(
        trusting(&first_ca).get(&url).send().await.unwrap().status(),
        200
    );
    assert!(trusting(&second_ca).get(&url).send().await.is_err());

    std::fs::copy(&second_cert, &cert).unwrap();
    std::fs::copy(&second_key, &key).unwrap();
    reload.notify_one();
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    while trusting(&second_ca).get(&url).send().await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // `/new` hands out https URLs with 22-character ids.
    let new = trusting(&second_ca)
        .get(format!("https://{addr}/new"))
        .send()
        .await
        .unwrap();
    let location = new.headers()["location"].to_str().unwrap().to_string();
    assert!(
        location.starts_with(&format!("https://{addr}/")),
        "{location}"
    );
    assert_eq!(location.rsplit('/').next().unwrap().len(), 22);
    cancel.cancel();
}

/// The relay reads the system's CA certificates only when a TLS connection first needs them,
/// and still trusts `--cacert` beside them: a relay subscribes to a `serve --tls-cert` channel
/// signed by a private CA, relays an event, and reads the certificates once.
#[tokio::test]
async fn a_relay_trusting_cacert_relays_from_an_https_channel_reading_the_roots_once() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = support::certificate(dir.path(), "relay");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cancel = CancellationToken::new();
    let config = ServeConfig {
        tls: Some(smee_relay::server::TlsFiles { cert, key }),
        ..ServeConfig::default()
    };
    tokio::spawn(serve_with_reload(
        listener,
        config,
        cancel.clone(),
        std::sync::Arc::new(tokio::sync::Notify::new()),
    ));
    let mut target = support::FakeTarget::start().await;
    let channel = format!("https://{addr}/relayed");
    let (_child, logs) = support::spawn_logged(
        support::smee_relay()
            .arg("forward")
            .arg(&channel)
            .args(["-t", &target.url("/hook"), "--cacert"])
            .arg(&ca)
            .arg("-v"),
    );
    logs.wait_for(&["connected to channel"]).await;
    let sent = trusting(&ca)
        .post(&channel)
        .header("content-type", "application/json")
        .body(r#"{"n":1}"#)
        .send()
        .await
        .unwrap();
    assert!(sent.status().is_success(), "{}", sent.status());
    assert_eq!(target.next().await.body, r#"{"n":1}"#);
    let loads = logs
        .all()
        .matches("loaded the system's CA certificates")
        .count();
    assert_eq!(loads, 1, "{}", logs.all());
    cancel.cancel();
}

/// Regression (helper-118): bodies being read were charged to `--max-memory` without bound, so
/// uploads that never finish (anyone may post) filled the budget, and every event posted after
/// them was evicted as soon as it was stored, before a subscriber took it: a connected relay
/// lost events the server had answered 200 for. Bodies being read now hold half the budget at
/// most; past it a new upload gets 503, and the replay data keeps the other half.
#[tokio::test]
async fn regression_unfinished_uploads_evicted_the_events_just_posted() {
    let limit = 1 << 20;
    let server = start(ServeConfig {
        max_memory: limit,
        read_timeout: Duration::from_secs(60),
        ..ServeConfig::default()
    })
    .await;
    // Five uploads that declare 400 KiB, send 200 KiB, and stall.
    let mut stalls = Vec::new();
    for n in 0..5 {
        let mut socket = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
        socket
            .write_all(
                format!("POST /stall{n} HTTP/1.1\r\nHost: x\r\nContent-Length: 409600\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        // The server may refuse partway (and close): what matters is what it holds.
        let _ = socket.write_all(&vec![b'x'; 200 << 10]).await;
        stalls.push(socket);
    }
    wait_metric(&server, "smee_relay_serve_bytes_held", |held| {
        held >= (400 << 10) as f64
    })
    .await;
    let reading = wait_metric(&server, "smee_relay_serve_bytes_reading", |n| n > 0.0).await;
    assert!(reading <= (limit / 2) as f64, "{reading} bytes being read");
    assert!(metric(&server, "smee_relay_serve_refused_total{reason=\"memory\"}").await >= 1.0);

    // Posted meanwhile: each stored and kept for the subscriber that comes for them.
    for n in 1..=5 {
        let sent = post(&format!("{}/live", server.url), vec![b'7'; 16 << 10]).await;
        assert_eq!(sent.status().as_u16(), 200, "post {n}");
    }
    let mut replay = raw_subscriber(&server, "/live", Some("0")).await;
    let mut seen = read_until(&mut replay, "event: ready").await;
    while seen.matches("\nid: ").count() < 5 && !seen.contains("event: gap") {
        seen.push_str(&read_until(&mut replay, "\n\n").await);
    }
    assert!(
        !seen.contains("event: gap"),
        "the five were evicted before they were read"
    );
    drop(stalls);
    server.cancel.cancel();
}

/// Regression (helper-125): the budget evicted the globally oldest events, so anyone who may
/// post filled it through channels of their own and the replay of a relay offline for a
/// minute was gone when it came back (its sender had been told 200). The channel holding the
/// most is evicted from first.
#[tokio::test]
async fn regression_posts_to_other_channels_evicted_a_quiet_channels_replay() {
    let limit = 2 << 20;
    let server = start(ServeConfig {
        max_memory: limit,
        ..ServeConfig::default()
    })
    .await;
    for n in 0..5 {
        let sent = post(
            &format!("{}/quiet", server.url),
            format!("{{\"n\":{n}}}").into(),
        )
        .await;
        assert_eq!(sent.status().as_u16(), 200);
    }
    // Four times the budget, through channels no one subscribes to.
    for i in 0..64 {
        let sent = post(
            &format!("{}/flood{}", server.url, i % 8),
            vec![b'7'; 128 << 10],
        )
        .await;
        assert_eq!(sent.status().as_u16(), 200);
    }
    assert!(
        metric(
            &server,
            "smee_relay_serve_evicted_events_total{reason=\"memory\"}"
        )
        .await
            > 0.0
    );
    let mut replay = raw_subscriber(&server, "/quiet", Some("0")).await;
    let mut seen = read_until(&mut replay, "event: ready").await;
    while seen.matches("\nid: ").count() < 5 && !seen.contains("event: gap") {
        seen.push_str(&read_until(&mut replay, "\n\n").await);
    }
    assert!(!seen.contains("event: gap"), "{seen}");
    server.cancel.cancel();
}

/// `smee-relay serve` as a child process on 127.0.0.1:0 with `extra` flags (its memory and
/// its log are its own), and the server it is.
async fn serve_child(extra: &[&str]) -> (tokio::process::Child, support::LogWatch, Server) {
    let (child, logs) = support::spawn_logged(
        support::smee_relay()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(extra),
    );
    let addr = support::serve_address(&logs).await;
    let server = Server {
        url: format!("http://{addr}"),
        addr,
        cancel: CancellationToken::new(),
        done: tokio::spawn(async {}),
    };
    (child, logs, server)
}

/// Regression (helper-125): under the common soft open-file limit of 1024, `serve` ran out of
/// files before `--max-connections` and said "cannot accept a connection" 20 times a second
/// while new clients could not connect. It raises the soft limit to the hard one.
#[tokio::test]
async fn regression_the_open_file_limit_came_before_max_connections() {
    let mut command = support::smee_relay();
    command.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--max-connections",
        "100",
    ]);
    // SAFETY: between fork and exec only setrlimit, which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
            limit.rlim_cur = 48.min(limit.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            Ok(())
        });
    }
    let (_child, logs) = support::spawn_logged(&mut command);
    let addr = support::serve_address(&logs).await;
    let mut held = Vec::new();
    for _ in 0..90 {
        held.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let server = Server {
        url: format!("http://{addr}"),
        addr,
        cancel: CancellationToken::new(),
        done: tokio::spawn(async {}),
    };
    wait_metric(&server, "smee_relay_serve_connections", |n| n >= 90.0).await;
    assert!(logs.find(&["cannot accept"]).is_none(), "{}", logs.all());
}

/// Regression (helper-125): connections shed by a flood and requests refused for their
/// token left no line in the log (and refusals no metric): an operator saw nothing.
#[tokio::test]
async fn regression_floods_and_wrong_tokens_were_not_logged() {
    let (_child, logs, server) =
        serve_child(&["--max-connections", "3", "--post-token", "right"]).await;
    for _ in 0..2 {
        let refused = post(&format!("{}/ch", server.url), b"{}".to_vec()).await;
        assert_eq!(refused.status().as_u16(), 401);
    }
    logs.wait_for(&[
        "refused 1 request without the right token",
        "from 127.0.0.1",
    ])
    .await;
    assert_eq!(
        metric(&server, "smee_relay_serve_refused_total{reason=\"token\"}").await,
        2.0
    );
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tokio::net::TcpStream::connect(&server.addr).await.unwrap());
    }
    logs.wait_for(&[
        "shed 1 connection since the last report",
        "--max-connections 3",
    ])
    .await;
}

/// The peak resident memory of process `pid` (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .expect("VmHWM in /proc/PID/status")
        * 1024
}

/// Regression (helper-118): smee's frame (the body parsed, as smee-client and `--smee-wire`
/// subscribers get it) was built through a `serde_json::Value`: one post of 25 MiB of
/// `[0,0,...]` took the server past a gigabyte. The body is re-serialised token by token now:
/// a post of 8 MiB of it costs tens of MiB, not hundreds.
#[tokio::test]
async fn regression_one_json_post_took_the_server_past_a_gigabyte() {
    let (mut child, _logs, server) = serve_child(&["--smee-wire"]).await;
    let mut subscriber = raw_subscriber(&server, "/zeros", None).await;
    read_until(&mut subscriber, "event: ready").await;
    let before = peak_rss(child.id().unwrap());
    let mut body = b"[0".to_vec();
    body.extend(std::iter::repeat_n(*b",0", 4 << 20).flatten());
    body.push(b']');
    assert_eq!(
        post(&format!("{}/zeros", server.url), body)
            .await
            .status()
            .as_u16(),
        200
    );
    // The frame is made when the subscriber is sent it: read to its end.
    let mut tail = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    tokio::time::timeout(support::PATIENCE, async {
        while !tail.ends_with(b"}\n\n") && !tail.ends_with(b"}\n\n\r\n") {
            let n = subscriber.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the frame ended");
            tail.extend_from_slice(&buf[..n]);
            let keep = tail.len().saturating_sub(16);
            tail.drain(..keep);
        }
    })
    .await
    .expect("the frame arrived whole");
    let grew = peak_rss(child.id().unwrap()).saturating_sub(before);
    eprintln!("the peak grew by {} MiB for an 8 MiB post", grew >> 20);
    assert!(
        grew < 96 << 20,
        "the peak grew by {} MiB for an 8 MiB post",
        grew >> 20
    );
    support::signal(&child, "TERM");
    let _ = child.wait().await;
}

/// Regression (helper-118): once `--max-channels` was reached (anyone who may post can reach
/// it), every new channel was refused for days with nothing in the log; only a counter said
/// so. The first refusal is a warning naming the flag and what to do.
#[tokio::test]
async fn regression_the_channel_cap_was_reached_without_a_word() {
    let (mut child, logs, server) = serve_child(&["--max-channels", "2"]).await;
    let url = server.url.clone();
    for (name, status) in [("a", 200), ("b", 200), ("c", 503), ("d", 503)] {
        let sent = post(&format!("{url}/{name}"), b"{}".to_vec()).await;
        assert_eq!(sent.status().as_u16(), status, "{name}");
    }
    // `/new` refused at the cap is counted too (helper-119: it was neither said nor counted).
    let new = client().get(format!("{url}/new")).send().await.unwrap();
    assert_eq!(new.status().as_u16(), 503);
    assert_eq!(
        metric(
            &server,
            "smee_relay_serve_refused_total{reason=\"max_channels\"}"
        )
        .await,
        3.0
    );
    logs.wait_for(&[
        "WARN",
        "maximum of 2 channels (--max-channels)",
        "--post-token",
    ])
    .await;
    support::signal(&child, "TERM");
    let _ = child.wait().await;
    assert_eq!(
        logs.all().matches("maximum of 2 channels").count(),
        1,
        "said once"
    );
}

/// Regression (helper-150): `--subscribe-token` and `--post-token` could be given only on the
/// command line, in `ps` for anyone to read, while `--token` had its variable.
#[tokio::test]
async fn regression_the_post_and_subscribe_tokens_had_no_variable() {
    let (child, logs) = support::spawn_logged(
        support::smee_relay()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("SMEE_RELAY_SERVE_POST_TOKEN", "post-secret")
            .env("SMEE_RELAY_SERVE_SUBSCRIBE_TOKEN", "sub-secret"),
    );
    let url = format!("http://{}", support::serve_address(&logs).await);
    // helper-155: nothing said whether tokens were on.
    assert!(
        logs.find(&["serving smee channels", r#"tokens="posts and subscribers""#])
            .is_some(),
        "{}",
        logs.all()
    );
    assert_eq!(
        post(&format!("{url}/ch"), b"{}".to_vec()).await.status(),
        401
    );
    let posted = client()
        .post(format!("{url}/ch"))
        .bearer_auth("post-secret")
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert!(posted.status().is_success(), "{}", posted.status());
    let subscribe = |token: Option<&str>| {
        let mut request = client()
            .get(format!("{url}/ch"))
            .header("accept", "text/event-stream");
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    assert_eq!(subscribe(None).await.unwrap().status(), 401);
    assert_eq!(subscribe(Some("sub-secret")).await.unwrap().status(), 200);
    support::signal(&child, "TERM");
    assert!(!logs.all().contains("secret"), "{}", logs.all());
}

/// Regression (helper-152): an empty `SMEE_RELAY_SERVE_POST_TOKEN` (an env file's `KEY=`
/// line) was taken as the posters' token, overriding `--token`: a post with
/// `Authorization: Bearer ` and nothing after it was let in. An empty token is refused.
#[tokio::test]
async fn regression_an_empty_token_let_in_anyone() {
    for (option, variable) in [
        ("--token", "SMEE_RELAY_SERVE_TOKEN"),
        ("--post-token", "SMEE_RELAY_SERVE_POST_TOKEN"),
        ("--subscribe-token", "SMEE_RELAY_SERVE_SUBSCRIBE_TOKEN"),
    ] {
        let mut serve = support::smee_relay();
        serve.args(["serve", "--listen", "127.0.0.1:0"]);
        if option != "--token" {
            serve.args(["--token", "real-secret"]);
        }
        let out = refused(serve.env(variable, "")).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{variable}: {stderr}");
        assert!(stderr.contains("a token cannot be empty"), "{stderr}");
        let out =
            refused(support::smee_relay().args(["serve", "--listen", "127.0.0.1:0", option, " "]))
                .await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{option}: {stderr}");
        assert!(stderr.contains(option), "{stderr}");
        // helper-156: one with a `\r` (a CRLF env file) was taken, and no request matched it.
        let out = refused(
            support::smee_relay()
                .args(["serve", "--listen", "127.0.0.1:0"])
                .env(variable, "abc\r"),
        )
        .await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{variable}: {stderr}");
        assert!(
            stderr.contains("cannot start or end with spaces"),
            "{stderr}"
        );
    }
}

/// The output of `command`, which must exit on its own (a server that starts fails here).
async fn refused(command: &mut tokio::process::Command) -> std::process::Output {
    let output = command.kill_on_drop(true).output();
    tokio::time::timeout(support::PATIENCE, output)
        .await
        .expect("the server started: the token was taken")
        .unwrap()
}

/// Regression (helper-119): a body sent a byte at a time was kept as the pieces hyper handed
/// over, each sharing (and so pinning) a read buffer of kilobytes: 200 such uploads took the
/// server from 31 MiB to nearly 2 GiB while the budget counted under 1 MiB. Each piece is
/// copied into the body's own buffer now, and the buffer's capacity is what is charged.
#[tokio::test]
async fn regression_a_body_sent_a_byte_at_a_time_pinned_a_read_buffer_per_byte() {
    let (mut child, _logs, server) = serve_child(&[]).await;
    let addr = server.addr;
    let pid = child.id().unwrap();
    let before = peak_rss(pid);
    let mut drips = Vec::new();
    for n in 0..20 {
        let addr = addr.clone();
        drips.push(tokio::spawn(async move {
            let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
            socket.set_nodelay(true).unwrap();
            socket
                .write_all(
                    format!("POST /drip{n} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
                        .as_bytes(),
                )
                .await
                .unwrap();
            for _ in 0..1500 {
                if socket.write_all(b"x").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_micros(300)).await;
            }
            socket
        }));
    }
    let mut sockets = Vec::new();
    for drip in drips {
        sockets.push(drip.await.unwrap());
    }
    let grew = peak_rss(pid).saturating_sub(before);
    eprintln!(
        "the peak grew by {} MiB for 20 uploads of 1,500 bytes sent a byte at a time",
        grew >> 20
    );
    assert!(grew < 64 << 20, "the peak grew by {} MiB", grew >> 20);
    drop(sockets);
    support::signal(&child, "TERM");
    let _ = child.wait().await;
}

/// Regression (helper-119): every subscription resuming from an id the server cannot serve
/// (`Last-Event-ID: x`) logged a warning, so anyone could fill the log. Said at the first and
/// every 1,000th, with the count.
#[tokio::test]
async fn regression_resume_warnings_could_fill_the_log() {
    let (mut child, logs, server) = serve_child(&[]).await;
    for n in 0..5 {
        let mut subscriber = raw_subscriber(&server, &format!("/flood{n}"), Some("x")).await;
        read_until(&mut subscriber, "event: ready").await;
    }
    logs.wait_for(&["WARN", "not an event id of this server", "1 so far"])
        .await;
    // helper-156: it said "new events only" to one given the channel's backlog.
    assert!(
        logs.find(&["taken as one with no place to resume from"])
            .is_some(),
        "{}",
        logs.all()
    );
    support::signal(&child, "TERM");
    let _ = child.wait().await;
    assert_eq!(
        logs.all().matches("not an event id").count(),
        1,
        "{}",
        logs.all()
    );
}

/// Regression (helper-125): gap warnings were said at the first and every 1,000th across the
/// whole server, so a stranger's resume on a channel of their own used up the line, and a
/// relay's real loss on another channel was never logged. Said per channel now, and counted.
#[tokio::test]
async fn regression_a_strangers_gap_hid_a_relays_loss_from_the_log() {
    let (_child, logs, server) = serve_child(&["--max-events", "2"]).await;
    for channel in ["/strangersChannel", "/relaysOwnChannel"] {
        for n in 0..5 {
            let sent = post(
                &format!("{}{channel}", server.url),
                format!("{{\"n\":{n}}}").into(),
            )
            .await;
            assert_eq!(sent.status().as_u16(), 200);
        }
        let mut subscriber = raw_subscriber(&server, channel, Some("0")).await;
        read_until(&mut subscriber, "event: gap").await;
    }
    support::wait_until(support::PATIENCE, "both gaps logged", || {
        logs.all().matches("it missed them").count() == 2
    })
    .await;
    assert_eq!(metric(&server, "smee_relay_serve_gaps_total").await, 2.0);
}

/// Regression (helper-125): what a client sent went into `/new`'s redirect as it was
/// (`Host: a b"<>`), and the channel page could be framed by any site. (A post framed both by
/// Content-Length and Transfer-Encoding was safe already.)
#[tokio::test]
async fn regression_hostile_heads_were_taken_as_they_came() {
    let server = start(ServeConfig::default()).await;
    let mut socket = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    socket
        .write_all(b"GET /new HTTP/1.1\r\nHost: a b\"<>\r\nX-Forwarded-Proto: javascript\r\n\r\n")
        .await
        .unwrap();
    let head = read_until(&mut socket, "\r\n\r\n")
        .await
        .to_ascii_lowercase();
    // No host to name (helper-132: it named `localhost`, the client's own machine).
    assert!(head.starts_with("http/1.1 400"), "{head}");
    assert!(!head.contains("location"), "{head}");
    // Never cached: each client gets a fresh channel.
    let new = client()
        .get(format!("{}/new", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(new.headers()["cache-control"], "no-store");
    // Framed both ways: hyper takes Transfer-Encoding and closes the connection after the
    // answer (RFC 9112 6.3), so nothing after it can pass for a request of its own.
    let mut socket = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    socket
        .write_all(
            b"POST /smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(support::PATIENCE, socket.read_to_string(&mut answer))
        .await
        .expect("the connection is closed")
        .unwrap();
    assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer}");
    let page = client()
        .get(format!("{}/somechannel", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    server.cancel.cancel();
}
