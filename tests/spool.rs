//! The spool's guarantees, black-box: nothing received is lost while the target is down, fails,
//! or the relay is killed; order holds; refusals become dead letters that can be replayed.

mod support;

use std::time::{Duration, Instant};

use support::{
    FakeChannel, FakeTarget, LogWatch, Relay, refused, relay_options, smee_relay, unused_addr,
};

fn webhook(seq: u64) -> String {
    format!(r#"{{"content-type":"application/json","body":{{"seq":{seq}}}}}"#)
}

fn seqs(requests: &[support::Received]) -> Vec<String> {
    requests
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect()
}

fn expected(range: std::ops::Range<u64>) -> Vec<String> {
    range.map(|n| format!(r#"{{"seq":{n}}}"#)).collect()
}

#[tokio::test]
async fn events_sent_while_the_target_is_down_arrive_in_order_once_it_is_up() {
    let channel = FakeChannel::start().await;
    let addr = unused_addr();
    let relay = Relay::start(
        &channel,
        relay_options(&channel, &format!("http://{addr}/hook")),
    )
    .await;

    for n in 0..50 {
        channel.send_webhook(n + 1, &webhook(n));
    }
    // The target comes up only after attempts have failed against the closed port and all 50
    // events are stored.
    support::wait_for(
        support::PATIENCE,
        "failed attempts on the spool",
        || async {
            let rows = events_json(&relay.state_dir, &["list", "--json"]).await;
            let rows = rows.as_array()?;
            (rows.len() == 50 && rows.iter().any(|r| r["attempts"].as_u64() > Some(1)))
                .then_some(())
        },
    )
    .await;
    let mut target = FakeTarget::start_on(addr).await;
    let got = target.take(50).await;
    assert_eq!(seqs(&got), expected(0..50));
    let state_dir = relay.state_dir.clone();
    relay.stop().await;
    target.assert_no_more();
    let stats = smee_relay::spool::Spool::open(&state_dir)
        .unwrap()
        .stats()
        .unwrap();
    assert_eq!(stats.events, 50, "each event stored once: {stats:?}");
}

#[tokio::test]
async fn server_errors_are_retried_with_the_same_delivery_id_and_order_holds() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let _relay = Relay::start(&channel, relay_options(&channel, &target.url("/hook"))).await;

    target.answer_with(&[500, 502, 503, 504]);
    for n in 0..3 {
        channel.send_webhook(n + 1, &webhook(n));
    }
    let got = target.take(7).await;
    let bodies = seqs(&got);
    assert_eq!(
        bodies[..5],
        [
            expected(0..1),
            expected(0..1),
            expected(0..1),
            expected(0..1),
            expected(0..1)
        ]
        .concat()
    );
    assert_eq!(bodies[5..], expected(1..3));
    let first_id = got[0].header("x-smee-relay-delivery").unwrap();
    assert!(
        got[..5]
            .iter()
            .all(|r| r.header("x-smee-relay-delivery") == Some(first_id))
    );
    assert_ne!(got[5].header("x-smee-relay-delivery"), Some(first_id));
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let _relay = Relay::start(&channel, relay_options(&channel, &target.url("/hook"))).await;

    target.answer_with_retry_after(429, 1);
    channel.send_webhook(1, &webhook(0));
    target.next().await;
    let refused_at = Instant::now();
    target.next().await;
    assert!(
        refused_at.elapsed() >= Duration::from_millis(900),
        "retried after {:?}, before Retry-After: 1",
        refused_at.elapsed()
    );
}

async fn events_cli(state_dir: &std::path::Path, args: &[&str]) -> String {
    let output = support::run_to_end(
        smee_relay()
            .arg("events")
            .args(args)
            .arg("--state-dir")
            .arg(state_dir),
    )
    .await;
    assert_eq!(output.code, Some(0), "events {args:?}: {}", output.stderr);
    output.stdout
}

/// `events ARGS` (with `--json` among them) as JSON.
async fn events_json(state_dir: &std::path::Path, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&events_cli(state_dir, args).await).unwrap()
}

#[tokio::test]
async fn a_refused_event_becomes_a_dead_letter_and_can_be_replayed() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let relay = Relay::start(&channel, relay_options(&channel, &target.url("/hook"))).await;

    target.answer_with(&[400]);
    channel.send_webhook(1, r#"{"x-github-event":"issues","body":{"seq":0}}"#);
    channel.send_webhook(2, &webhook(1));
    assert_eq!(
        seqs(&target.take(2).await),
        expected(0..2),
        "the next event proceeds"
    );

    // Marks are committed asynchronously; wait until both outcomes are on disk.
    let dead = support::wait_for(
        support::PATIENCE,
        "a dead letter and a delivery on disk",
        || async {
            let rows = events_json(&relay.state_dir, &["list", "--json"]).await;
            let with = |status: &str| -> Vec<serde_json::Value> {
                let rows = rows.as_array().into_iter().flatten();
                rows.filter(|r| r["status"] == status).cloned().collect()
            };
            let dead = with("dead");
            (!dead.is_empty() && !with("delivered").is_empty()).then_some(dead)
        },
    )
    .await;
    assert_eq!(dead[0]["id"], 1);
    assert_eq!(dead[0]["status"], "dead");
    assert_eq!(dead[0]["last_status"], 400);
    assert_eq!(dead[0]["kind"], "x-github-event=issues");
    assert_eq!(dead[0]["route"], target.url("/hook"));

    let table = events_cli(&relay.state_dir, &["list"]).await;
    assert!(
        table.contains("dead") && table.contains("delivered"),
        "{table}"
    );
    let shown = events_cli(&relay.state_dir, &["show", "1"]).await;
    assert!(
        shown.contains("x-github-event: issues") && shown.contains(r#"{"seq":0}"#),
        "{shown}"
    );

    // Replayed from another process while the relay runs: it goes out again.
    let said = events_cli(&relay.state_dir, &["replay", "--dead"]).await;
    let lines: Vec<&str> = said.trim().lines().collect();
    assert_eq!(lines[0], "queued 1 delivery again", "{said}");
    // Its target named; its channel's relay runs (helper-150's line says when none does).
    assert!(
        lines.len() == 2 && lines[1].starts_with("  1 for http://127.0.0.1:"),
        "{said}"
    );
    assert!(!said.contains("no relay runs"), "{said}");
    assert_eq!(seqs(&[target.next().await]), expected(0..1));

    relay.stop().await;
}

/// The spool refuses what does not fit, said at the first refusal (and every 1000th: helper-122
/// found a line per event), counted apart from what it stored (refused events were counted as
/// received), and `/healthz` fails while it refuses (it said ok while events were lost).
#[tokio::test]
async fn the_spool_refuses_new_events_when_full_and_says_so() {
    let channel = FakeChannel::start().await;
    let addr = unused_addr(); // the target is down: nothing is delivered, nothing can be pruned
    let state_dir = support::temp_dir();
    let state_dir = state_dir.path();
    let mut child = smee_relay()
        .args([
            "forward",
            &channel.url("FullChannel"),
            &format!("http://{addr}/"),
        ])
        .args([
            "--max-spool-size",
            "4KiB",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .arg("--state-dir")
        .arg(state_dir)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let logs = LogWatch::new(child.stderr.take().unwrap());
    let line = logs.wait_for(&["serving /healthz and /metrics"]).await;
    let metrics_addr = line.rsplit("addr=").next().unwrap().trim().to_string();
    channel.wait_connections(1).await;
    logs.wait_for(&["connected to channel"]).await;

    let big = format!(r#"{{"body":{{"pad":"{}"}}}}"#, "x".repeat(1000));
    for n in 0..10 {
        channel.send_webhook(n + 1, &big);
    }
    logs.wait_for(&[
        "ERROR",
        "spool full (--max-spool-size): received event refused and lost (1 so far)",
    ])
    .await;
    let client = smee_relay::http::client_builder().build().unwrap();
    let get = |path: &str| {
        let request = client.get(format!("http://{metrics_addr}{path}"));
        async move {
            let response = request.send().await.ok()?;
            Some((response.status().as_u16(), response.text().await.ok()?))
        }
    };
    let counter = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let (received, refused) =
        support::wait_for(support::PATIENCE, "all 10 stored or refused", || {
            let answer = get("/metrics");
            async move {
                let (_, text) = answer.await?;
                let received = counter(&text, "smee_relay_events_received_total");
                let refused = counter(&text, "smee_relay_events_refused_total");
                (received + refused == 10).then_some((received, refused))
            }
        })
        .await;
    assert!(refused > 0);
    assert_eq!(
        logs.all().matches("spool full").count(),
        1,
        "once, not per event: {}",
        logs.all()
    );
    let (status, body) = get("/healthz").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("the spool is full (--max-spool-size)"),
        "{body}"
    );
    let _ = child.start_kill();
    let _ = child.wait().await;
    let spool = smee_relay::spool::Spool::open(state_dir).unwrap();
    let stats = spool.stats().unwrap();
    assert!(stats.stored_bytes <= 4096, "{stats:?}");
    assert_eq!(
        stats.events, received,
        "what was counted received is what was stored"
    );
}

#[tokio::test]
async fn the_same_channel_twice_in_one_state_dir_is_refused_at_once() {
    let channel = FakeChannel::start().await;
    let target = FakeTarget::start().await;
    let options = relay_options(&channel, &target.url("/"));
    let _first = Relay::start(&channel, options.clone()).await;

    let second = smee_relay::commands::forward::forward(options.clone(), Default::default()).await;
    let message = second.unwrap_err().to_string();
    assert!(
        message.contains("another smee-relay (pid ") && message.contains(") already relays"),
        "{message}"
    );
    assert!(
        !message.contains("TestChannel123"),
        "the channel id is secret: {message}"
    );

    // A different channel shares the state dir without trouble.
    let mut other = options;
    other.source.channel = channel.url("OtherChannel").parse().unwrap();
    let _second = Relay::start(&channel, other).await;
}

#[tokio::test]
async fn a_damaged_spool_is_reported_with_what_to_do() {
    let dir = support::temp_dir();
    let dir = dir.path();
    std::fs::write(
        dir.join("spool.redb"),
        b"this is not a database, just some bytes",
    )
    .unwrap();
    let output = support::run_to_end(
        smee_relay()
            .args(["events", "list", "--state-dir"])
            .arg(dir),
    )
    .await;
    let stderr = output.stderr;
    assert_eq!(output.code, Some(2), "{stderr}");
    // Regression (helper-155): with no log there, the advice moved one too, and that `mv`
    // failed.
    let file = dir.join("spool.redb");
    assert!(
        stderr.contains(&format!(
            "move the file aside (mv {} {}.damaged)",
            file.display(),
            file.display()
        )) && !stderr.contains("spool.wal"),
        "{stderr}"
    );
    // Regression (helper-152): `forward` said `Forwarding ... to ...` on stdout before the
    // spool stopped it, and a script reading stdout took that for success.
    let output = support::run_to_end(
        smee_relay()
            .args(["forward", "http://127.0.0.1:9/Chan", "http://127.0.0.1:9/"])
            .arg("--state-dir")
            .arg(dir),
    )
    .await;
    assert_eq!(output.code, Some(2), "{}", output.stderr);
    assert_eq!(output.stdout, "", "{}", output.stderr);
}

/// Regression (helper-155): `--limit 3` noted "the last 3 deliveries are shown" over the
/// deliveries of the 3 newest events, while a replay's (newer) delivery of an older event was
/// not among them.
#[tokio::test]
async fn regression_the_limit_note_said_last_deliveries_for_newest_events() {
    let dir = support::temp_dir();
    spool_with_events(dir.path());
    let output = support::run_to_end(
        smee_relay()
            .args(["events", "list", "--limit", "3", "--state-dir"])
            .arg(dir.path()),
    )
    .await;
    assert_eq!(output.code, Some(0), "{}", output.stderr);
    assert!(
        output
            .stderr
            .contains("note: 3 deliveries of the newest events are shown; --limit N shows more"),
        "{}",
        output.stderr
    );
}

/// A spool with a few events in it, as a relay would have left it.
fn spool_with_events(dir: &std::path::Path) -> u64 {
    let spool = smee_relay::spool::Spool::open(dir).unwrap();
    let events: Vec<smee_relay::event::Event> = (0..200)
        .map(|n| smee_relay::event::Event {
            sse_id: Some(n.to_string()),
            timestamp_ms: None,
            headers: vec![("x-github-event".into(), "push".into())],
            query: vec![],
            body: vec![b'x'; 2000].into(),
        })
        .collect();
    let write = smee_relay::spool::Write::Append {
        channel: "c".into(),
        routes: vec!["k http://127.0.0.1:9/".into()],
        events: events.into(),
        cursor: None,
    };
    spool
        .write(&[write], smee_relay::spool::Limits { max_bytes: 1 << 30 })
        .unwrap();
    std::fs::metadata(spool.path()).unwrap().len()
}

/// Run the relay (and `events list`) over the state dir: both must refuse with exit 2, name
/// the file and say what to do, and leave the file as it was.
async fn assert_refused(dir: &std::path::Path, why: &str) {
    let file = dir.join("spool.redb");
    let before = std::fs::read(&file).unwrap();
    for args in [
        vec!["events", "list"],
        vec!["forward", "http://127.0.0.1:9/Chan", "http://127.0.0.1:9/"],
    ] {
        let stderr = refused(smee_relay().args(&args).arg("--state-dir").arg(dir)).await;
        let log = dir.join("spool.wal");
        assert!(
            stderr.contains(&file.display().to_string())
                && stderr.contains("move the file and its log aside")
                && stderr.contains(&format!("mv {} {}.damaged", log.display(), log.display()))
                && !stderr.contains("panicked"),
            "{args:?} ({why}): {stderr}"
        );
        assert_eq!(
            std::fs::read(&file).unwrap(),
            before,
            "{why}: the file is left as it was"
        );
    }
}

/// Regression (an adversary's run): damage the open does not find (64 bits flipped in a
/// cleanly stopped spool, `tests/fixtures/spool-damaged-at-run`) made redb panic once the relay
/// read the file. The relay printed raw panics beside its log (every second, with a backtrace)
/// and went on failing every read and write instead of stopping. It now stops as damage found
/// at its start stops it: exit status 2, the file named, what to do, and every line a log line.
#[tokio::test]
async fn regression_damage_found_while_running_looped_with_raw_panics_instead_of_exit_2() {
    let dir = support::temp_dir();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/spool-damaged-at-run");
    for file in ["spool.redb", "spool.highwater"] {
        std::fs::copy(fixture.join(file), dir.path().join(file)).unwrap();
    }
    let mut relay = smee_relay();
    relay
        .args(["forward", "http://127.0.0.1:9/chanEEEEEEEEEEEEEEEEEE"])
        .args(["http://127.0.0.1:9/hook", "--log-format", "json"])
        .arg("--state-dir")
        .arg(dir.path())
        .kill_on_drop(true);
    let stderr = tokio::time::timeout(support::PATIENCE, support::refused(&mut relay))
        .await
        .expect("the relay stopped on the damage");
    assert!(
        stderr.contains("is damaged") && stderr.contains("move the file and its log aside"),
        "{stderr}"
    );
    assert!(
        stderr.lines().all(|line| line.starts_with('{')),
        "only log lines, no raw panic: {stderr}"
    );
}

#[tokio::test]
async fn an_empty_spool_file_is_refused_not_started_over() {
    let dir = support::fresh_state_dir();
    spool_with_events(&dir);
    std::fs::File::create(dir.join("spool.redb")).unwrap(); // truncated to 0 bytes
    assert_refused(&dir, "0 bytes").await;
}

#[tokio::test]
async fn heavy_spool_corruption_exits_2_naming_the_file_instead_of_panicking() {
    // Garbage over the header, over the middle, over everything: each is refused cleanly.
    for (n, (from, to)) in [(0.0, 0.05), (0.2, 0.9), (0.0, 1.0), (0.5, 1.0)]
        .into_iter()
        .enumerate()
    {
        let dir = support::fresh_state_dir();
        let len = spool_with_events(&dir) as usize;
        let file = dir.join("spool.redb");
        let mut bytes = std::fs::read(&file).unwrap();
        let mut state = 0x9e37_79b9_7f4a_7c15u64 + n as u64;
        for byte in &mut bytes[(len as f64 * from) as usize..(len as f64 * to) as usize] {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = state as u8;
        }
        std::fs::write(&file, bytes).unwrap();
        assert_refused(&dir, &format!("garbage over {from}..{to}")).await;
    }
}

#[tokio::test]
async fn relays_of_two_channels_sharing_a_state_dir_and_a_target_deliver_only_their_own() {
    let (first, second) = (FakeChannel::start().await, FakeChannel::start().await);
    let mut target = FakeTarget::start().await;
    // Slow, so that each relay's route has time to find the other's queued events (the bug).
    target.delay(Duration::from_millis(20));
    let a = relay_options(&first, &target.url("/hook"));
    let mut b = relay_options(&second, &target.url("/hook"));
    b.state_dir = a.state_dir.clone();
    let _a = Relay::start(&first, a).await;
    let _b = Relay::start(&second, b).await;

    for n in 0..20 {
        first.send_webhook(n + 1, &format!(r#"{{"body":{{"a":{n}}}}}"#));
        second.send_webhook(n + 1, &format!(r#"{{"body":{{"b":{n}}}}}"#));
    }
    let got = seqs(&target.take(40).await);
    target.assert_quiet(Duration::from_millis(1500)).await;
    let of = |channel: &str| -> Vec<String> {
        got.iter()
            .filter(|body| body.contains(channel))
            .cloned()
            .collect()
    };
    let want = |channel: &str| -> Vec<String> {
        (0..20).map(|n| format!(r#"{{"{channel}":{n}}}"#)).collect()
    };
    assert_eq!(
        of("\"a\""),
        want("a"),
        "the first channel's, once each, in order"
    );
    assert_eq!(
        of("\"b\""),
        want("b"),
        "the second channel's, once each, in order"
    );
}

#[tokio::test]
async fn another_spelling_of_a_running_channel_exits_2_naming_the_holder_pid() {
    let channel = FakeChannel::start().await;
    let target = FakeTarget::start().await;
    let options = relay_options(&channel, &target.url("/"));
    let state_dir = options.state_dir.clone();
    let _first = Relay::start(&channel, options).await;

    // Upper-case scheme and host, the default path's trailing slash, a query; and (regression,
    // helper-122: it took a second lock, and every event went out twice) an unreserved
    // character percent-escaped.
    for spelling in [
        format!(
            "HTTP://127.0.0.1:{}/TestChannel123/?x=1",
            channel.addr.port()
        ),
        format!("http://127.0.0.1:{}/Test%43hannel123", channel.addr.port()),
    ] {
        let stderr = refused(
            smee_relay()
                .args(["forward", &spelling, &target.url("/")])
                .arg("--state-dir")
                .arg(&state_dir),
        )
        .await;
        assert!(
            stderr.contains(&format!(
                "another smee-relay (pid {}) already relays",
                std::process::id()
            )),
            "{spelling}: {stderr}"
        );
        assert!(
            !stderr.contains("TestChannel123"),
            "the channel id is secret: {stderr}"
        );
    }
    // Regression (helper-150): it said `Forwarding ... to ...` on stdout first, as a relay
    // that starts does (smee-client's line), and a script reading stdout took it for success.
    let output = smee_relay()
        .args(["forward", &channel.url("TestChannel123"), &target.url("/")])
        .arg("--state-dir")
        .arg(&state_dir)
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "");
}

#[tokio::test]
async fn kill_9_loses_nothing_and_the_rest_goes_out_in_order_after_restart() {
    let channel = FakeChannel::start().await;
    let addr = unused_addr();
    let state_dir = support::temp_dir();
    let state_dir = state_dir.path();
    let spawn = || {
        let mut child = smee_relay()
            .args([
                "forward",
                &channel.url("KillChannel"),
                &format!("http://{addr}/"),
            ])
            .arg("--state-dir")
            .arg(state_dir)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let logs = LogWatch::new(child.stderr.take().unwrap());
        (child, logs)
    };

    // The target is down: everything stays queued.
    let (mut first, logs) = spawn();
    channel.wait_connections(1).await;
    logs.wait_for(&["connected to channel"]).await;
    for n in 0..20 {
        channel.send_webhook(n + 1, &webhook(n));
    }
    // Each event is on disk before the first attempt; the 20th attempt's failure proves all 20 arrived.
    logs.wait_for(&["failed", "event 1)"]).await;
    support::wait_for(support::PATIENCE, "20 events on disk", || async {
        let rows = events_json(state_dir, &["list", "--json"]).await;
        rows.as_array().is_some_and(|r| r.len() == 20).then_some(())
    })
    .await;
    first.start_kill().unwrap(); // SIGKILL
    first.wait().await.unwrap();

    let mut target = FakeTarget::start_on(addr).await;
    let (_second, _logs) = spawn();
    let got = target.take(20).await;
    assert_eq!(seqs(&got), expected(0..20));
}

/// `smee-relay forward CHANNEL http://ADDR/ --state-dir DIR`, its log watched.
fn forward_logged(
    channel: &str,
    addr: std::net::SocketAddr,
    state_dir: &std::path::Path,
) -> (tokio::process::Child, LogWatch) {
    support::spawn_logged(
        smee_relay()
            .args(["forward", channel, &format!("http://{addr}/")])
            .arg("--state-dir")
            .arg(state_dir),
    )
}

/// Regression (helper-149): `spool.redb` removed while the relay ran (its events in the file it
/// had open, gone with the process): the stop line said "N deliveries wait in the spool for the
/// next start", and the next start made a new, empty spool and said "nothing waits". The stop
/// says the file was removed, and the start that finds only its high-water mark warns.
#[tokio::test]
async fn regression_a_spool_removed_while_running_was_said_to_wait_for_the_next_start() {
    let channel = FakeChannel::start().await;
    let addr = unused_addr();
    let state_dir = support::temp_dir();
    let state_dir = state_dir.path();
    let spawn = || forward_logged(&channel.url("GoneChannel"), addr, state_dir);
    // The target is down: everything stays queued.
    let (first, logs) = spawn();
    channel.wait_connections(1).await;
    for n in 0..5 {
        channel.send_webhook(n + 1, &webhook(n));
    }
    logs.wait_for(&["failed", "event 1)"]).await;
    // A clean stop and start first, so the log has started over once (its high-water mark
    // written), as on any relay that ran a while.
    support::signal(&first, "TERM");
    logs.wait_for(&["stopped;", "5 deliveries wait"]).await;
    let (first, logs) = spawn();
    logs.wait_for(&["connected to channel"]).await;
    std::fs::remove_file(state_dir.join("spool.redb")).unwrap();
    support::signal(&first, "TERM");
    let line = logs
        .wait_for(&[
            "ERROR",
            "stopped;",
            "was removed or replaced while the relay ran",
        ])
        .await;
    assert!(line.contains("5 deliveries wait"), "{line}");
    let (_second, logs) = spawn();
    logs.wait_for(&[
        "WARN",
        "no spool here, yet the high-water mark",
        "it was removed or moved",
    ])
    .await;
}

/// Regression (helper-149): `spool.wal` removed after a `kill -9` took the last events' commits
/// with it (they were only in the log), and the start said nothing of it ("nothing waits").
/// It warns now; after a crash with the log in place, or a clean stop, it has nothing to say.
#[tokio::test]
async fn regression_a_log_removed_after_a_crash_lost_its_events_without_a_word() {
    let channel = FakeChannel::start().await;
    let addr = unused_addr();
    let state_dir = support::temp_dir();
    let state_dir = state_dir.path();
    let spawn = || forward_logged(&channel.url("LogChannel"), addr, state_dir);
    let missing = ["WARN", "write-ahead log", "is missing"];
    let (mut first, logs) = spawn();
    channel.wait_connections(1).await;
    channel.send_webhook(1, &webhook(0));
    logs.wait_for(&["failed", "event 1)"]).await;
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    // A crash, the log in place: nothing to say.
    let (mut second, logs) = spawn();
    logs.wait_for(&["connected to channel"]).await;
    assert!(logs.find(&missing).is_none(), "{}", logs.all());
    second.start_kill().unwrap();
    second.wait().await.unwrap();
    std::fs::remove_file(state_dir.join("spool.wal")).unwrap();
    let (_third, logs) = spawn();
    logs.wait_for(&missing).await;
}

/// A relay has its spool to itself (redb's exclusive-writer mode: one fsync per commit and no
/// file locks, BENCHMARKS.md). `smee-relay events` run meanwhile asks it to share the file; the
/// relay does within a second, the command answers, and once it is done the relay has the file
/// to itself again. Events before, during and after all go out, in order.
#[tokio::test]
async fn a_relay_shares_its_spool_with_an_events_command_then_has_it_alone_again() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let state = support::temp_dir();
    let (mut child, logs) = support::spawn_logged(
        smee_relay()
            .args([
                "forward",
                &channel.url("abcdef"),
                "-t",
                &target.url("/hook"),
                "-v",
            ])
            .arg("--state-dir")
            .arg(state.path()),
    );
    logs.wait_for(&["connected to channel"]).await;
    channel.send_webhook(1, &webhook(0));
    assert_eq!(seqs(&[target.next().await]), expected(0..1));

    let started = Instant::now();
    let listed = events_json(state.path(), &["list", "--json"]).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the command waited {:?} for the relay to share",
        started.elapsed()
    );
    logs.wait_for(&["the spool is now open shared"]).await;
    channel.send_webhook(2, &webhook(1));
    assert_eq!(seqs(&[target.next().await]), expected(1..2));
    logs.wait_for(&["the spool is now open alone"]).await;
    channel.send_webhook(3, &webhook(2));
    assert_eq!(seqs(&[target.next().await]), expected(2..3));

    support::signal(&child, "TERM");
    assert_eq!(
        support::exit_code(&mut child).await,
        Some(0),
        "{}",
        logs.all()
    );
    let left: Vec<_> = std::fs::read_dir(state.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("share"))
        .collect();
    assert!(left.is_empty(), "requests left behind: {left:?}");
}

/// A relay killed with `kill -9` while it had its spool to itself leaves a file redb must
/// repair (exclusive-writer mode does not save its allocator state on every commit): `events
/// list` reads it, and a restarted relay delivers what was left, in order.
#[tokio::test]
async fn after_a_kill_9_of_a_relay_holding_its_spool_alone_events_and_a_restart_read_it() {
    let channel = FakeChannel::start().await;
    let target = FakeTarget::start().await;
    let state = support::temp_dir();
    let (channel_url, target_url) = (channel.url("abcdef"), target.url("/hook"));
    let forward = || {
        let mut command = smee_relay();
        command
            .args(["forward", &channel_url, "-t", &target_url])
            .arg("--state-dir")
            .arg(state.path());
        command
    };
    let (mut child, logs) = support::spawn_logged(forward().arg("-v"));
    logs.wait_for(&["connected to channel"]).await;
    target.hold();
    for n in 0..5 {
        channel.send_webhook(n + 1, &webhook(n));
    }
    target.wait_arrived(1).await;
    support::wait_for(support::PATIENCE, "the five events stored", || async {
        let listed = events_json(state.path(), &["list", "--json"]).await;
        (listed.as_array().map(Vec::len) == Some(5)).then_some(())
    })
    .await;
    // Killed while it has the file to itself again, after the last command.
    support::wait_until(
        support::PATIENCE,
        "the relay has its spool alone again",
        || {
            let all = logs.all();
            let shared = all.matches("the spool is now open shared").count();
            shared > 0 && all.matches("the spool is now open alone").count() == shared
        },
    )
    .await;
    support::signal(&child, "KILL");
    let _ = support::exit_code(&mut child).await;
    target.release();

    let listed = events_json(state.path(), &["list", "--json"]).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(5), "{listed}");
    let (_child, logs) = support::spawn_logged(&mut forward());
    logs.wait_for(&["connected to channel"]).await;
    // The killed relay's one request in flight, then the restarted relay's five.
    target.wait_arrived(6).await;
    let got = seqs(&target.arrivals());
    assert_eq!(
        got[1..],
        expected(0..5),
        "all five, in order, the first one again"
    );
    assert_eq!(got[0], expected(0..1)[0]);
}

/// A `--keep-free` of the whole file system or more was taken: the relay started, said it was
/// healthy, and paused its intake for good at the first event. It is refused at start.
#[tokio::test]
async fn a_keep_free_beyond_the_whole_disk_is_refused_at_start() {
    let state_dir = tempfile::tempdir().unwrap();
    let stderr = refused(
        smee_relay()
            .args([
                "forward",
                "http://127.0.0.1:9/channel",
                "http://127.0.0.1:9/",
            ])
            .args(["--keep-free", "16777216GiB", "--state-dir"])
            .arg(state_dir.path()),
    )
    .await;
    assert!(
        stderr.contains("--keep-free 16384 TiB is at least the size of the whole file system"),
        "{stderr}"
    );
}
