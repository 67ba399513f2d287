//! Benchmark peer: a counting HTTP target on loopback (see bench/run.sh).
//!
//! Every POST body starts with `{"seq":N,"sent_us":T`; the target notes the arrival, and
//! `GET /report` answers how many arrived, how many out of order, and end-to-end latency
//! percentiles (sent by the load generator -> received here). `POST /reset` starts over.
//! Prints its port on stdout, then serves until killed.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::{get, post};

#[derive(Default)]
struct Seen {
    last_seq: Option<u64>,
    count: u64,
    out_of_order: u64,
    latencies_us: Vec<u64>,
    /// Distinct seqs (a relay cluster may repeat the delivery in flight at a failover).
    distinct: std::collections::HashSet<u64>,
    /// When the last request arrived, and the longest gap between two arrivals (failover).
    last_at_us: Option<u64>,
    max_gap_us: u64,
}

type Shared = Arc<Mutex<Seen>>;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn field(body: &[u8], name: &str) -> Option<u64> {
    let head = std::str::from_utf8(&body[..body.len().min(80)]).ok()?;
    let start = head.find(&format!("\"{name}\":"))? + name.len() + 3;
    let digits: String = head[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

async fn record(State(seen): State<Shared>, body: Bytes) -> &'static str {
    let at = now_us();
    let (Some(seq), Some(sent)) = (field(&body, "seq"), field(&body, "sent_us")) else {
        return "ignored";
    };
    let mut seen = seen.lock().unwrap();
    if seen.last_seq.is_some_and(|last| seq <= last) {
        seen.out_of_order += 1;
    }
    seen.last_seq = Some(seen.last_seq.map_or(seq, |last| last.max(seq)));
    seen.count += 1;
    seen.distinct.insert(seq);
    if let Some(last) = seen.last_at_us {
        seen.max_gap_us = seen.max_gap_us.max(at.saturating_sub(last));
    }
    seen.last_at_us = Some(at);
    seen.latencies_us.push(at.saturating_sub(sent));
    "ok"
}

async fn report(State(seen): State<Shared>) -> String {
    let seen = seen.lock().unwrap();
    let mut lat = seen.latencies_us.clone();
    lat.sort_unstable();
    let pct = |p: f64| {
        if lat.is_empty() {
            0.0
        } else {
            lat[((lat.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
        }
    };
    format!(
        r#"{{"delivered":{},"distinct":{},"out_of_order":{},"p50_ms":{:.2},"p99_ms":{:.2},"max_gap_ms":{:.1}}}"#,
        seen.count,
        seen.distinct.len(),
        seen.out_of_order,
        pct(0.50),
        pct(0.99),
        seen.max_gap_us as f64 / 1000.0
    )
}

async fn reset(State(seen): State<Shared>) -> &'static str {
    *seen.lock().unwrap() = Seen::default();
    "ok"
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let seen = Shared::default();
    let app = Router::new()
        .route("/report", get(report))
        .route("/reset", post(reset))
        .fallback(record)
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
        .with_state(seen);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", listener.local_addr().unwrap().port());
    axum::serve(listener, app).await.unwrap();
}
