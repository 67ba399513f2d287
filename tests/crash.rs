//! A crash (`kill -9`) in the middle of a stream: the relay, restarted, delivers everything it
//! had stored, in order, and repeats at most the one delivery that was in flight per crash.

mod support;

use std::time::Duration;

use support::{FakeChannel, FakeTarget, LogWatch, smee_relay};

const KILLS: usize = 5;
const PER_ROUND: u64 = 120;

fn seq_of(request: &support::Received) -> u64 {
    let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
    body["seq"].as_u64().unwrap()
}

/// Wait until the spool holds `n` events (so all that was sent is stored before the kill).
async fn wait_stored(state_dir: &std::path::Path, n: u64) {
    tokio::time::timeout(support::PATIENCE, async {
        loop {
            let stored = smee_relay::spool::Spool::open(state_dir)
                .and_then(|spool| spool.stats())
                .map_or(0, |stats| stats.events);
            if stored >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the spool never held {n} events"));
}

#[tokio::test]
async fn kill_9_mid_stream_repeats_at_most_the_delivery_in_flight_and_keeps_order() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    // Slow enough that a backlog waits in the spool when the relay is killed.
    target.delay(Duration::from_millis(5));
    let state_dir = support::fresh_state_dir();
    let hook = target.url("/hook");
    let spawn = || {
        let mut child = smee_relay()
            .args(["forward", &channel.url("CrashChannel"), &hook])
            .arg("--state-dir")
            .arg(&state_dir)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let logs = LogWatch::new(child.stderr.take().unwrap());
        (child, logs)
    };

    let mut received = Vec::new();
    let mut sent = 0;
    for round in 0..=KILLS {
        let (mut relay, logs) = spawn();
        channel.wait_connections(round + 1).await;
        logs.wait_for(&["connected to channel"]).await;
        for _ in 0..PER_ROUND {
            channel.send_webhook(sent + 1, &format!(r#"{{"body":{{"seq":{sent}}}}}"#));
            sent += 1;
        }
        wait_stored(&state_dir, sent).await;
        if round == KILLS {
            // The last run delivers the rest.
            while received.iter().map(seq_of).max() != Some(sent - 1) {
                received.push(target.next().await);
            }
            target.assert_quiet(Duration::from_millis(500)).await;
            break;
        }
        // Kill it in the middle of this round's backlog.
        let goal = (sent - PER_ROUND / 2) as usize;
        while received.len() < goal {
            received.push(target.next().await);
        }
        relay.start_kill().unwrap(); // SIGKILL
        relay.wait().await.unwrap();
        // What the dying relay still had on the wire.
        while let Some(request) = target.try_next(Duration::from_millis(100)).await {
            received.push(request);
        }
    }

    let seqs: Vec<u64> = received.iter().map(seq_of).collect();
    let mut distinct = seqs.clone();
    distinct.dedup();
    assert_eq!(
        distinct,
        (0..sent).collect::<Vec<_>>(),
        "every event once, in order (repeats only back to back)"
    );
    let repeats = seqs.len() - distinct.len();
    assert!(
        repeats <= KILLS,
        "{repeats} repeated deliveries over {KILLS} kills: {seqs:?}"
    );
}
