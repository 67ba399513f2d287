//! The two windows that used to break "each alert once, in order" in cluster mode, each forced
//! at its exact point with a debug-only fault hook (`SMEE_RELAY_FAULT`, see `cluster`'s module
//! header), against a real nats-server and real relay processes:
//!
//! - lost: the instance judging a change dies after its alert-state write landed, before its
//!   local commit; another instance takes the change over and must send the alert that write
//!   implies (it finds the judgement recorded beside the state, and re-sends its alerts);
//! - out of order: the instance judging a change commits the FIRING locally and then stalls
//!   before publishing it; the next change (its RESOLVED) must not overtake it.

mod support;

use std::time::Duration;

use support::nats::{
    FAILOVER_PATIENCE, FreezableProxy, HeldFault, Instance, NatsServer, start_instance,
};
use support::{FakeChannel, FakeSlack};

/// Start an instance and wait until it joined the cluster and subscribed to `channel`.
async fn join(channel: &FakeChannel, config_body: &str, env: &[(&str, &str)]) -> Instance {
    let before = channel.connections();
    let instance = start_instance(config_body, env);
    instance.logs.wait_for(&["joined the cluster"]).await;
    channel.wait_connections(before + 1).await;
    instance
}

/// Join (see [`join`]) with a forward route, and wait until the route's consumer exists (one
/// made after an event was published starts after it).
async fn join_route(channel: &FakeChannel, config_body: &str) -> Instance {
    let instance = join(channel, config_body, &[]).await;
    instance
        .logs
        .wait_for(&["the route's NATS consumer is ready"])
        .await;
    instance
}

/// Join with `hold` (`hold-on-arrival`, a debug-only hook) and a forward route, and send event
/// 1: the instance takes it and is held as it arrives, before its floor read, until released.
async fn a_held_on_arrival(channel: &FakeChannel, config_body: &str, hold: &HeldFault) -> Instance {
    let a = join(channel, config_body, &hold.env()).await;
    a.logs
        .wait_for(&["the route's NATS consumer is ready"])
        .await;
    channel.send_webhook(1, r#"{"content-type":"application/json","body":{"n":1}}"#);
    a.logs
        .wait_for(&["fault injected: holding a delivery on arrival"])
        .await;
    a
}

/// Two instances of cluster `name` forwarding to a target that is down (its address is
/// returned, for the test to start it when a delivery should land): A, whose NATS connection
/// goes through `proxy`, took event 1 alone and retries it; B joined after.
async fn a_retrying_then_b(
    nats: &NatsServer,
    channel: &FakeChannel,
    proxy: &FreezableProxy,
    name: &str,
) -> (Instance, Instance, std::net::SocketAddr) {
    let target_addr = support::unused_addr();
    let target_url = format!("http://{target_addr}/hook");
    let body = |nats_url: &str| {
        support::nats::forward_config(&channel.url("ch"), &target_url, nats_url, name)
    };
    let a = join_route(channel, &body(&proxy.url)).await;
    channel.send_webhook(1, r#"{"content-type":"application/json","body":{"n":1}}"#);
    a.logs.wait_for(&["retrying in"]).await;
    let b = join_route(channel, &body(&nats.url)).await;
    (a, b, target_addr)
}

/// Two instances of cluster `name` alerting to `slack`: A, whose NATS connection goes through
/// `proxy` and whose alerts' publish `hold` holds (debug-only hook) until released, judged the
/// first two changes alone, so its FIRING is committed locally, not published; B joined after,
/// straight to NATS.
async fn a_holding_a_firing_then_b(
    nats: &NatsServer,
    channel: &FakeChannel,
    slack: &FakeSlack,
    proxy: &FreezableProxy,
    hold: &HeldFault,
    name: &str,
) -> (Instance, Instance) {
    let body = |nats_url: &str| {
        support::nats::alerts_config(&channel.url("ch"), &slack.webhook_url(), nats_url, name)
    };
    let a = join(channel, &body(&proxy.url), &hold.env()).await;
    channel.send_webhook(1, &change("01-create"));
    channel.send_webhook(2, &change("02-cpu-25-to-87"));
    a.logs.wait_for(&["FIRING cpu-high"]).await;
    let b = join(channel, &body(&nats.url), &[]).await;
    (a, b)
}

/// A smee frame carrying one of the Port fixtures (one entity, cpu changes).
fn change(file: &str) -> String {
    format!(
        r#"{{"content-type":"application/json","body":{}}}"#,
        support::port_fixture("automation", file)
    )
}

/// The next Slack headline, within a failover's patience.
async fn next_headline(slack: &mut FakeSlack, what: &str) -> String {
    let Some(request) = slack.try_next(FAILOVER_PATIENCE).await else {
        panic!("no {what} reached Slack within {FAILOVER_PATIENCE:?}");
    };
    support::slack_header(&request)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_alert_state_write_before_the_local_commit_loses_no_alert() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut slack = FakeSlack::start().await;
    let body = support::nats::alerts_config(
        &channel.url("ch"),
        &slack.webhook_url(),
        &nats.url,
        "window1",
    );
    // Both carry the fault: whichever judges the FIRING dies right after its state write
    // landed. The other one takes the change over (and judges the RESOLVED, no FIRING).
    let fault = [("SMEE_RELAY_FAULT", "abort-after-alert-state-write")];
    let mut instances = [
        join(&channel, &body, &fault).await,
        join(&channel, &body, &fault).await,
    ];

    channel.send_webhook(1, &change("01-create"));
    channel.send_webhook(2, &change("02-cpu-25-to-87"));
    let aborted = support::wait_for(
        FAILOVER_PATIENCE,
        "an instance aborting after its alert-state write",
        || {
            let found = instances
                .iter()
                .position(|i| i.logs.find(&["fault injected: abort after"]).is_some());
            std::future::ready(found)
        },
    )
    .await;
    // Gone for good (SIGABRT), as a kill -9 would leave it.
    instances[aborted].child.wait().await.unwrap();

    let firing = next_headline(&mut slack, "FIRING").await;
    assert!(firing.starts_with("FIRING cpu-high"), "{firing}");
    let survivor = &instances[1 - aborted];
    let line = survivor
        .logs
        .wait_for(&["took over another instance's judgement"])
        .await;
    assert!(line.contains("re-sent its 1 alert"), "{line}");

    channel.send_webhook(3, &change("06-cpu-75-to-60"));
    let resolved = next_headline(&mut slack, "RESOLVED").await;
    assert!(resolved.starts_with("RESOLVED cpu-high"), "{resolved}");
    slack.assert_quiet(Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_between_the_local_commit_and_the_publish_keeps_the_alerts_in_order() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut slack = FakeSlack::start().await;
    let proxy = FreezableProxy::start(nats.port).await;
    // A commits its FIRING locally, and its network stalls before it publishes it.
    let hold = HeldFault::new("hold-alert-publish");
    let (_a, b) =
        a_holding_a_firing_then_b(&nats, &channel, &slack, &proxy, &hold, "window2").await;
    proxy.freeze();
    hold.release();

    // The next change of the same rule and entity, received (and published) by B alone.
    channel.send_webhook(3, &change("06-cpu-75-to-60"));
    let first = next_headline(&mut slack, "the first alert").await;
    assert!(
        first.starts_with("FIRING cpu-high"),
        "the FIRING first, not the RESOLVED that ends it: {first:?}"
    );
    let second = next_headline(&mut slack, "the second alert").await;
    assert!(second.starts_with("RESOLVED cpu-high"), "{second:?}");
    // A's network comes back: its publish of the FIRING is a repeat the stream drops.
    proxy.thaw();
    slack.assert_quiet(Duration::from_secs(4)).await;
    assert!(
        b.logs
            .find(&["took over another instance's judgement"])
            .is_some(),
        "B re-sent A's FIRING:\n{}",
        b.logs.all()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_with_an_alert_committed_but_unpublished_hands_it_over_at_once() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut slack = FakeSlack::start().await;
    let body =
        support::nats::alerts_config(&channel.url("ch"), &slack.webhook_url(), &nats.url, "stop");
    let hold = HeldFault::new("hold-alert-publish");
    let mut a = join(&channel, &body, &hold.env()).await;
    channel.send_webhook(1, &change("01-create"));
    channel.send_webhook(2, &change("02-cpu-25-to-87"));
    a.logs.wait_for(&["FIRING cpu-high"]).await;
    let b = join(&channel, &body, &[]).await;

    // Stopped with its FIRING committed and not published: it hands the change back, and B
    // sends the FIRING without waiting for A to come back (nor for the ack wait).
    support::signal(&a.child, "TERM");
    a.logs
        .wait_for(&["handing the delivery back to the cluster"])
        .await;
    a.child.wait().await.unwrap();
    let firing = next_headline(&mut slack, "FIRING").await;
    assert!(firing.starts_with("FIRING cpu-high"), "{firing}");
    b.logs
        .wait_for(&["took over another instance's judgement"])
        .await;
    slack.assert_quiet(Duration::from_secs(3)).await;
    hold.release();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_a_held_alert_s_write_before_its_local_commit_loses_no_alert() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut slack = FakeSlack::start().await;
    let body =
        support::nats::alerts_config(&channel.url("ch"), &slack.webhook_url(), &nats.url, "held")
            .replace("clear_below = 70\n", "clear_below = 70\nfor = \"1s\"\n");
    assert!(body.contains("for = \"1s\""), "the rule is held: {body}");
    // Whichever instance's write of the held FIRING lands first dies right after it; the
    // other one (its own timer then finds the alert fired) sends it from the record.
    let fault = [("SMEE_RELAY_FAULT", "abort-after-held-alert-write")];
    let mut instances = [
        join(&channel, &body, &fault).await,
        join(&channel, &body, &fault).await,
    ];
    channel.send_webhook(1, &change("01-create"));
    channel.send_webhook(2, &change("02-cpu-25-to-87"));
    let aborted = support::wait_for(
        FAILOVER_PATIENCE,
        "an instance aborting after a held alert's write",
        || {
            let found = instances
                .iter()
                .position(|i| i.logs.find(&["fault injected: abort after"]).is_some());
            std::future::ready(found)
        },
    )
    .await;
    instances[aborted].child.wait().await.unwrap();

    let firing = next_headline(&mut slack, "the held FIRING").await;
    assert!(firing.starts_with("FIRING cpu-high"), "{firing}");
    slack.assert_quiet(Duration::from_secs(3)).await;
}

/// The highest route floor in the cluster's KV, and the stream's last sequence.
async fn top_floor_and_last(nats: &NatsServer, cluster: &str) -> Option<(u64, u64)> {
    use futures::StreamExt as _;
    let client = async_nats::connect(&nats.url).await.ok()?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(format!("SMEE_{cluster}")).await.ok()?;
    let last = stream.info().await.ok()?.state.last_sequence;
    let kv = js
        .get_key_value(format!("smee_{cluster}_alerts"))
        .await
        .ok()?;
    let mut keys = kv.keys().await.ok()?;
    let mut top = 0;
    // A listing error is no answer (the caller asks again); it never cuts the list short.
    while let Some(key) = keys.next().await {
        let key = key.ok()?;
        if key.starts_with("floor.") {
            let value = kv.get(&key).await.ok()??;
            // `SEQ CREATED`: the sequence, then the stream it counts in.
            let seq = std::str::from_utf8(&value).ok()?.split(' ').next()?;
            top = top.max(seq.parse::<u64>().ok()?);
        }
    }
    Some((top, last))
}

/// A `kill -9` of the instance sending an alert, after Slack answered but within the 1 s pace
/// wait, repeated the alert from another instance: the route's floor was written only after
/// the pace wait, so the redelivered alert did not read as delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_kill_within_the_slack_pace_repeated_the_alert_from_another_instance() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut slack = FakeSlack::start().await;
    let body =
        support::nats::alerts_config(&channel.url("ch"), &slack.webhook_url(), &nats.url, "pace");
    let mut instances = [
        join(&channel, &body, &[]).await,
        join(&channel, &body, &[]).await,
    ];

    channel.send_webhook(1, &change("01-create"));
    channel.send_webhook(2, &change("02-cpu-25-to-87"));
    let firing = next_headline(&mut slack, "FIRING").await;
    assert!(firing.starts_with("FIRING cpu-high"), "{firing}");
    let sender = support::wait_for(FAILOVER_PATIENCE, "the sender's delivery line", || {
        std::future::ready(
            instances
                .iter()
                .position(|i| i.logs.find(&["-> 200"]).is_some()),
        )
    })
    .await;
    // Within the pace (1 s from the attempt's start): as soon as the alert's floor is
    // written, or 600 ms after Slack answered if it is not.
    let answered = tokio::time::Instant::now();
    let deadline = answered + Duration::from_millis(600);
    while tokio::time::Instant::now() < deadline {
        if let Some((top, last)) = top_floor_and_last(&nats, "pace").await
            && top >= last
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    instances[sender].child.start_kill().unwrap();
    // The kill must land within the pace (1 s from the attempt's start, before the ack), or
    // this would test nothing.
    assert!(
        answered.elapsed() < Duration::from_millis(900),
        "killed {:?} after Slack's answer was seen: not within the pace",
        answered.elapsed()
    );
    instances[sender].child.wait().await.unwrap();
    // The other instance takes the alert over after the ack wait and skips it.
    slack.assert_quiet(Duration::from_secs(5)).await;
}

/// An instance whose network stalled kept retrying a delivery the cluster had given to
/// another: its lease renewals (progress acks) went nowhere, the ack wait ran out, and
/// another instance delivered the event; once the target was back, the stalled instance
/// delivered it again, after the other (and after events the other sent since). An instance
/// now attempts again only while NATS confirms its lease, and hands the delivery over once
/// NATS says another instance has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_stalled_instance_retried_a_delivery_the_cluster_gave_to_another() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let proxy = FreezableProxy::start(nats.port).await;
    let (a, b, target_addr) = a_retrying_then_b(&nats, &channel, &proxy, "stall").await;

    // A's network stalls: its lease runs out and B takes the delivery over.
    proxy.freeze();
    b.logs
        .wait_for(&["taking over a delivery another instance did not finish"])
        .await;
    let mut target = support::FakeTarget::start_on(target_addr).await;
    let first = target
        .try_next(FAILOVER_PATIENCE)
        .await
        .expect("B's delivery");
    assert_eq!(&first.body[..], br#"{"n":1}"#);
    b.logs.wait_for(&["/hook -> 200"]).await;

    // A's network comes back: it learns that B has the delivery, and does not send it.
    proxy.thaw();
    let line = support::wait_for(FAILOVER_PATIENCE, "A's next word on the delivery", || {
        std::future::ready(
            a.logs
                .find(&["/hook -> 200"])
                .or_else(|| a.logs.find(&["another instance has it"])),
        )
    })
    .await;
    assert!(
        line.contains("another instance has it"),
        "A delivered the event B had delivered: {line}\n{}",
        a.logs.all()
    );
    assert_eq!(target.arrived(), 1, "{:?}", target.arrivals());
}

/// The one repeat a stall leaves: an attempt already under way when an instance's network
/// stalls reaches the target beside the other instance's (same delivery id). The stalled
/// instance's floor write then finds the floor already moved by the other, which is as it
/// should be, but it warned "the route's delivered floor was not confirmed (wrong last
/// sequence: wrong last sequence: ...)" as if something had failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_floor_the_instance_taking_over_wrote_first_was_warned_about_as_unconfirmed() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let proxy = FreezableProxy::start(nats.port).await;
    let target = support::FakeTarget::start().await;
    target.hold();
    let target_url = target.url("/hook");
    let body = |nats_url: &str| {
        support::nats::forward_config(&channel.url("ch"), &target_url, nats_url, "underway")
    };
    let a = join_route(&channel, &body(&proxy.url)).await;
    channel.send_webhook(1, r#"{"content-type":"application/json","body":{"n":1}}"#);
    target.wait_arrived(1).await;
    let b = join_route(&channel, &body(&nats.url)).await;

    // A's request is under way when its network stalls: B takes the delivery over.
    proxy.freeze();
    target.wait_arrived(2).await;
    target.release();
    b.logs.wait_for(&["cluster delivery done"]).await;
    let ids: Vec<_> = target
        .arrivals()
        .iter()
        .map(|r| r.header("x-smee-relay-delivery").map(str::to_string))
        .collect();
    assert_eq!(ids[0], ids[1], "one delivery id for both");

    // A leaves the ack to B (its own would be a late copy's: helper-107), and raises the
    // floor B already moved without a warning.
    proxy.thaw();
    a.logs
        .wait_for(&[
            "delivered here after the cluster gave it to another instance",
            "that instance acks it",
        ])
        .await;
    assert!(
        a.logs.find(&["WARN", "floor"]).is_none(),
        "{}",
        a.logs.all()
    );
}

/// A stall as a delivery arrives (helper-105): the instance's floor read hung, the ack wait
/// ran out meanwhile, and another instance took the delivery over; the lease counted only
/// from after the read, so the first instance attempted it too, beside or after the other's
/// (its Slack FIRING after the RESOLVED the other sent since). The lease now counts from the
/// message's publication (a first delivery cannot have been sent before it), and a delivery
/// that may have run out is attempted only once NATS confirms it is still this instance's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_delivery_held_up_as_it_arrived_was_attempted_after_another_instance_took_it()
{
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let target = support::FakeTarget::start().await;
    target.hold();
    let target_url = target.url("/hook");
    let body = support::nats::forward_config(&channel.url("ch"), &target_url, &nats.url, "arrival");
    let hold = HeldFault::new("hold-on-arrival");
    // A takes the event and is held before its floor read: it sends no renewal, the ack
    // wait runs out, and B takes the delivery over (its attempt waits at the target).
    let a = a_held_on_arrival(&channel, &body, &hold).await;
    let b = join_route(&channel, &body).await;
    b.logs
        .wait_for(&["taking over a delivery another instance did not finish"])
        .await;
    target.wait_arrived(1).await;

    // A goes on: it must learn that B has the delivery, not attempt it.
    hold.release();
    let word = support::wait_for(FAILOVER_PATIENCE, "A's next word on the delivery", || {
        std::future::ready(if target.arrived() > 1 {
            Some("A attempted it".to_string())
        } else {
            a.logs.find(&["another instance has it"])
        })
    })
    .await;
    assert!(
        word.contains("another instance has it"),
        "A attempted the delivery B had taken: {word}\n{}",
        a.logs.all()
    );
    target.release();
    b.logs.wait_for(&["cluster delivery done"]).await;
    assert_eq!(target.arrived(), 1, "{:?}", target.arrivals());
}

/// A stall of only the way back (helper-105): the instance's lease renewals reached NATS and
/// kept the delivery its own, but no answer came back, so it could not attempt it either;
/// the route stood still cluster-wide until the client's pings gave the connection up
/// (about 3 minutes). Renewals now stop once a whole ack wait passed without an answer, and
/// another instance takes the delivery over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_stall_of_only_the_answers_held_the_route_until_the_connection_dropped() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let proxy = FreezableProxy::start(nats.port).await;
    let (a, b, target_addr) = a_retrying_then_b(&nats, &channel, &proxy, "oneway").await;
    // The retry line names the cluster's id too (helper-108: only the local one).
    assert!(
        a.logs.find(&["retrying in", "stream_seq=1"]).is_some(),
        "{}",
        a.logs.all()
    );

    // A's answers stall; it waits for NATS before attempting again (so that what reaches the
    // target below is B's), while its renewals still get through.
    proxy.freeze_answers();
    a.logs
        .wait_for(&["cannot confirm with NATS that this instance still holds the delivery"])
        .await;
    let mut target = support::FakeTarget::start_on(target_addr).await;
    let first = target
        .try_next(FAILOVER_PATIENCE)
        .await
        .expect("B's delivery, within the failover patience");
    assert_eq!(&first.body[..], br#"{"n":1}"#);
    b.logs
        .wait_for(&["taking over a delivery another instance did not finish"])
        .await;
    b.logs.wait_for(&["cluster delivery done"]).await;

    // A's answers come back: it learns that B has the delivery, and does not send it.
    proxy.thaw();
    a.logs.wait_for(&["another instance has it"]).await;
    assert_eq!(target.arrived(), 1, "{:?}", target.arrivals());
}

/// A clean stop while the instance's NATS connection stalls (helper-105): the stop waited on
/// NATS (the alerts route's floor, raised again and again; the pipeline's read of the alert
/// states) until the backstop ended the process ("shutdown did not finish", exit 1). A stop
/// now waits on a NATS that does not answer only for a short grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_clean_stop_during_a_stall_hit_the_shutdown_backstop() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut slack = FakeSlack::start().await;
    let proxy = FreezableProxy::start(nats.port).await;
    let body =
        support::nats::alerts_config(&channel.url("ch"), &slack.webhook_url(), &proxy.url, "stop");
    let mut a = join(&channel, &body, &[]).await;
    channel.send_webhook(1, &change("01-create"));
    channel.send_webhook(2, &change("02-cpu-25-to-87"));
    let firing = next_headline(&mut slack, "FIRING").await;
    assert!(firing.starts_with("FIRING cpu-high"), "{firing}");

    // The alerts route's ack and floor, and the next change, wait on the stalled connection.
    proxy.freeze();
    channel.send_webhook(3, &change("06-cpu-75-to-60"));
    a.logs
        .wait_for(&["the route's delivered floor was not confirmed"])
        .await;
    support::signal(&a.child, "TERM");
    let status = a.child.wait().await.unwrap();
    assert!(
        status.success() && a.logs.find(&["shutdown did not finish"]).is_none(),
        "{status}:\n{}",
        a.logs.all()
    );
    a.logs
        .wait_for(&["stopping before NATS confirmed this delivery's ack"])
        .await;
}

/// A stop while NATS stalls, with a message just arrived (its floor not read yet): the stop
/// waited out NATS's request timeout (5 s) on the floor read, and then on the event's body.
/// Nothing is queued at that point, so the stop hands the message back at once; the next
/// instance delivers it, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_stop_waited_on_a_stalled_floor_read() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut target = support::FakeTarget::start().await;
    let proxy = FreezableProxy::start(nats.port).await;
    let config = |nats_url: &str| {
        support::nats::forward_config(
            &channel.url("ch"),
            &target.url("/hook"),
            nats_url,
            "floorstop",
        )
    };
    let hold = HeldFault::new("hold-on-arrival");
    let mut a = a_held_on_arrival(&channel, &config(&proxy.url), &hold).await;

    // The floor read meets a stalled connection; the stop comes meanwhile.
    proxy.freeze();
    hold.release();
    support::signal(&a.child, "TERM");
    let status = a.child.wait().await.unwrap();
    assert!(
        status.success() && a.logs.find(&["shutdown did not finish"]).is_none(),
        "{status}:\n{}",
        a.logs.all()
    );
    assert!(
        a.logs
            .find(&["stopping before this delivery was queued"])
            .is_some(),
        "the stop waited on NATS:\n{}",
        a.logs.all()
    );
    assert_eq!(target.arrived(), 0);

    // Handed back, not lost: the next instance delivers it.
    proxy.thaw();
    let _b = join_route(&channel, &config(&nats.url)).await;
    let delivered = target
        .try_next(FAILOVER_PATIENCE)
        .await
        .expect("the event, delivered by the next instance");
    assert_eq!(&delivered.body[..], br#"{"n":1}"#);
}

/// A stall of only the way back while the alerts a change produced waited to be published:
/// the change's lease renewals (unconfirmed progress acks) still reached NATS, so no other
/// instance could take the change over, and the pipeline stood still cluster-wide until the
/// connection dropped (minutes). They are now confirmed, and stop after a whole ack wait
/// without an answer, as a delivery's do: B takes the change over and the alerts go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_one_way_stall_while_alerts_waited_to_be_published_held_the_pipeline() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut slack = FakeSlack::start().await;
    let proxy = FreezableProxy::start(nats.port).await;
    let hold = HeldFault::new("hold-alert-publish");
    let (a, b) = a_holding_a_firing_then_b(&nats, &channel, &slack, &proxy, &hold, "oneway2").await;

    // A's publish goes out, but nothing NATS says reaches A any more.
    proxy.freeze_answers();
    hold.release();
    channel.send_webhook(3, &change("06-cpu-75-to-60"));
    let mut next = async || {
        let message = slack.try_next(FAILOVER_PATIENCE).await;
        let message =
            message.unwrap_or_else(|| panic!("the pipeline stood still\n{}", a.logs.all()));
        support::slack_header(&message)
    };
    let first = next().await;
    assert!(first.starts_with("FIRING cpu-high"), "{first:?}");
    let second = next().await;
    assert!(second.starts_with("RESOLVED cpu-high"), "{second:?}");
    assert!(
        b.logs
            .find(&["taking over a delivery another instance did not finish"])
            .is_some(),
        "{}",
        b.logs.all()
    );
    proxy.thaw();
    slack.assert_quiet(Duration::from_secs(4)).await;
}

/// helper-110: a reload that added a target while NATS stalled, then a stop: the new route's
/// consumer creation waited out NATS's request timeout, and the stop took 11 s (the
/// backstop's edge; "cannot create the route's NATS consumer" logged after the signal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_stop_waited_on_a_stalled_consumer_creation() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let target = support::FakeTarget::start().await;
    let proxy = FreezableProxy::start(nats.port).await;
    let body = support::nats::forward_config(
        &channel.url("ch"),
        &target.url("/one"),
        &proxy.url,
        "consumerstop",
    );
    let mut a = join_route(&channel, &body).await;
    proxy.freeze();
    let added = body.replace(
        "forward = [\"",
        &format!("forward = [\"{}\", \"", target.url("/two")),
    );
    support::nats::write_config(a.dir.path(), &added);
    support::signal(&a.child, "HUP");
    a.logs.wait_for(&["config reloaded"]).await;
    support::signal(&a.child, "TERM");
    let status = a.child.wait().await.unwrap();
    assert!(status.success(), "{status}:\n{}", a.logs.all());
    assert!(
        a.logs
            .find(&["cannot create the route's NATS consumer"])
            .is_none(),
        "the stop waited on NATS:\n{}",
        a.logs.all()
    );
}
