//! Benchmark peer: posts a workload to a channel, then waits for the counting target to have
//! it all (see bench/run.sh). Usage: `bench_load CHANNEL_URL TARGET_BASE a|b|c|d`
//! - a: 5,000 events of 1 KiB, as fast as the server takes them;
//! - b: 1,000 events at 200 per second;
//! - c: 200 events of 1 MiB;
//! - d: 1 event of 10 MiB;
//! - e: 100 events of 1 KiB at 5 per second (each its own commit: per-event instruction counts
//!   under callgrind, where the relay runs too slowly for b's rate).
//!
//! `BENCH_COUNT=N` sends N events instead of the workload's count; `BENCH_RATE=R`, R per second.
//!
//! Prints one JSON line: the target's report plus the time the load took.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn body(seq: u64, size: usize) -> String {
    let mut text = format!(r#"{{"seq":{seq},"sent_us":{},"pad":""#, now_us());
    let pad = size.saturating_sub(text.len() + 2);
    text.extend(std::iter::repeat_n('x', pad));
    text.push_str("\"}");
    text
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (channel, target, workload) = (&args[1], &args[2], args[3].as_str());
    let (count, size, rate): (u64, usize, Option<u64>) = match workload {
        "a" => (5000, 1024, None),
        "b" => (1000, 1024, Some(200)),
        "c" => (200, 1 << 20, None),
        "d" => (1, 10 << 20, None),
        "e" => (100, 1024, Some(5)),
        other => panic!("unknown workload {other}"),
    };
    // A shorter run of the same workload (a slow path, a quick look).
    let count = std::env::var("BENCH_COUNT")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(count);
    // Another rate for the same events (a paced workload under callgrind, which runs the relay
    // tens of times slower than b's rate allows).
    let rate = std::env::var("BENCH_RATE")
        .ok()
        .and_then(|n| n.parse().ok())
        .or(rate);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    client.post(format!("{target}/reset")).send().await.unwrap();
    let started = Instant::now();
    let mut ticks = rate.map(|r| tokio::time::interval(Duration::from_micros(1_000_000 / r)));
    for seq in 0..count {
        if let Some(ticks) = &mut ticks {
            ticks.tick().await;
        }
        let response = client
            .post(channel)
            .header("content-type", "application/json")
            .body(body(seq, size))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.status());
    }
    let posted = started.elapsed();
    // Wait for everything, or for 15 s without progress.
    let mut last = (0u64, Instant::now());
    let report = loop {
        let report: serde_json::Value = client
            .get(format!("{target}/report"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        // Distinct events: a relay cluster may repeat the one in flight at a failover.
        let delivered = report["distinct"]
            .as_u64()
            .or(report["delivered"].as_u64())
            .unwrap_or(0);
        let patience = std::env::var("BENCH_PATIENCE_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(15);
        if delivered >= count || last.1.elapsed() > Duration::from_secs(patience) {
            break report;
        }
        if delivered != last.0 {
            last = (delivered, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        r#"{{"workload":"{workload}","sent":{count},"posted_s":{:.2},"report":{report}}}"#,
        posted.as_secs_f64()
    );
}
