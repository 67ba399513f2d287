//! Benchmark: the CPU one sequential POST of 1 KiB costs this process, through reqwest (as
//! `smee_relay::http::client_builder` makes it) and through `smee_relay::delivery::forward::Forwarder`
//! (hyper's pooled client for plain http). Why the relay does not use reqwest for local targets
//! (see bench/run.sh and BENCHMARKS.md). Usage: `http_client_cost TARGET_BASE` (a bench_target).
//!
//! Prints one line: `http client: reqwest N µs/POST, forward M µs/POST (CPU, 5,000 each)`.

use std::time::Duration;

use bytes::Bytes;
use smee_relay::delivery::forward::Forwarder;
use smee_relay::event::Event;

const POSTS: u32 = 5000;

/// This process's user+system CPU time so far, in microseconds.
fn cpu_us() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let micros = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    micros(usage.ru_utime) + micros(usage.ru_stime)
}

/// CPU microseconds per call of `post`, after a warm-up.
async fn per_post<F: AsyncFnMut()>(mut post: F) -> f64 {
    for _ in 0..200 {
        post().await;
    }
    let before = cpu_us();
    for _ in 0..POSTS {
        post().await;
    }
    (cpu_us() - before) / f64::from(POSTS)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let base = std::env::args()
        .nth(1)
        .expect("usage: http_client_cost TARGET_BASE");
    let url = format!("{base}/hook");
    let body = Bytes::from(vec![b'x'; 1024]);
    let headers = [
        ("content-type", "application/json"),
        ("x-github-event", "ping"),
    ];

    let client = smee_relay::http::client_builder().build().unwrap();
    let target: reqwest::Url = url.parse().unwrap();
    let reqwest_us = per_post(async || {
        let mut request = client.post(target.clone()).body(body.clone());
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let response = request.send().await.unwrap();
        assert!(response.status().is_success());
        response.bytes().await.unwrap();
    })
    .await;

    let forwarder = Forwarder::new(url.parse().unwrap(), Duration::from_secs(10)).unwrap();
    let event = Event {
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
        body: body.clone(),
        ..Event::default()
    };
    let forward_us = per_post(async || {
        forwarder.deliver(&event, &[]).await.unwrap();
    })
    .await;

    println!(
        "http client: reqwest {reqwest_us:.0} µs/POST, forward {forward_us:.0} µs/POST \
         (CPU, {POSTS} sequential POSTs of 1 KiB each)"
    );
}
