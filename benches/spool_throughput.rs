//! Spool throughput: how many 1 KiB events per second the spool makes durable, through the
//! same intake and group-commit writer the relay uses. Run: `cargo bench --bench spool_throughput`.
//!
//! Prints one line per run; the README and BENCHMARKS.md carry dated figures from it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use smee_relay::counters::Counters;
use smee_relay::event::Event;
use smee_relay::source::queue;
use smee_relay::spool::intake;
use smee_relay::spool::writer::SpoolWriter;
use smee_relay::spool::{Limits, Spool};

const EVENTS: usize = 50_000;
const BODY: usize = 1024;

fn event(n: usize) -> Event {
    let mut body = format!(r#"{{"seq":{n},"pad":""#).into_bytes();
    body.resize(BODY - 2, b'x');
    body.extend_from_slice(b"\"}");
    Event {
        sse_id: Some(n.to_string()),
        timestamp_ms: Some(1_700_000_000_000),
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("x-github-event".into(), "push".into()),
        ],
        query: vec![],
        body: Bytes::from(body),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path()).unwrap());
    let (writer, thread) = SpoolWriter::start(spool.clone(), Limits { max_bytes: 1 << 34 });
    let counters = Arc::new(Counters::default());
    // The relay's bound (`QUEUE_BYTES` in `service::daemon`).
    let (tx, rx) = queue::channel(2 << 20);
    let intake = tokio::spawn(intake::intake(
        rx,
        writer.clone(),
        "bench".into(),
        None,
        tokio::sync::watch::channel(vec!["http://127.0.0.1:1/".to_string()]).1,
        counters.clone(),
    ));
    let events: Vec<Event> = (0..EVENTS).map(event).collect();
    let started = Instant::now();
    for e in events {
        tx.send(e).await.unwrap();
    }
    drop(tx);
    intake.await.unwrap();
    let elapsed = started.elapsed();
    drop(writer);
    thread.join().unwrap();
    let stats = spool.stats().unwrap();
    assert_eq!(stats.events as usize, EVENTS);
    report(elapsed, stats.stored_bytes);
}

fn report(elapsed: Duration, bytes: u64) {
    println!(
        "spool append: {EVENTS} events of {BODY} B durable in {:.2} s = {:.0} events/s ({:.1} MiB stored)",
        elapsed.as_secs_f64(),
        EVENTS as f64 / elapsed.as_secs_f64(),
        bytes as f64 / (1 << 20) as f64
    );
}
