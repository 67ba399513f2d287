//! Cluster mode when NATS forgets acks it took: a real `nats-server -js` killed and started
//! again with its consumer state rolled back (as a crash loses consumer state flushed lazily),
//! two real relay processes, one fake channel and one fake target. Each route's floor in KV
//! (the last stream sequence delivered, written right before the ack goes out) makes the
//! instances pass over what NATS redelivers, so nothing is delivered twice.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt as _;
use support::nats::{FAILOVER_PATIENCE, Instance, NatsServer, start_instance};
use support::{FakeChannel, FakeTarget};

/// This file's cluster name.
const NAME: &str = "floor";

/// A smee frame whose body says which event it is.
fn frame(n: usize) -> String {
    format!(r#"{{"content-type":"application/json","x-github-event":"push","body":{{"n":{n}}}}}"#)
}

/// The `n` of a delivered body.
fn n_of(body: &[u8]) -> usize {
    let value: serde_json::Value = serde_json::from_slice(body).expect("a JSON body");
    value["n"].as_u64().expect("an n") as usize
}

/// Take requests until every event of `wanted` arrived; every body's `n`, in arrival order.
async fn take_until_seen(target: &mut FakeTarget, wanted: std::ops::Range<usize>) -> Vec<usize> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + FAILOVER_PATIENCE;
    while !wanted.clone().all(|n| seen.contains(&n)) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(request) = target.try_next(left).await else {
            panic!("not every event of {wanted:?} arrived in time: {seen:?}");
        };
        seen.push(n_of(&request.body));
    }
    seen
}

/// The route consumers' state directory in a stopped server's store.
fn consumers_dir(store: &Path) -> PathBuf {
    store
        .join("jetstream")
        .join("$G")
        .join("streams")
        .join(format!("SMEE_{NAME}"))
        .join("obs")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Wait until every route's floor in KV is at the stream's last sequence: what was delivered
/// is recorded (the ack went out right behind the floor's put; this waits for the put).
async fn wait_floors_at_the_stream_end(nats: &NatsServer) {
    let client = async_nats::connect(&nats.url)
        .await
        .expect("connect to NATS");
    let js = async_nats::jetstream::new(client);
    support::wait_for(support::PATIENCE, "the floors at the stream's end", || {
        let js = js.clone();
        async move {
            let mut stream = js.get_stream(format!("SMEE_{NAME}")).await.ok()?;
            let last = stream.info().await.ok()?.state.last_sequence;
            let kv = js.get_key_value(format!("smee_{NAME}_alerts")).await.ok()?;
            let mut keys = kv.keys().await.ok()?;
            let mut floors = Vec::new();
            // A listing error retries the whole check; it never cuts the list short.
            while let Some(key) = keys.next().await {
                let key = key.ok()?;
                if key.starts_with("floor.") {
                    let value = kv.get(&key).await.ok()??;
                    // `SEQ CREATED`: the sequence, then the stream it counts in.
                    let text = String::from_utf8(value.to_vec()).ok()?;
                    floors.push(text.split(' ').next()?.parse::<u64>().ok()?);
                }
            }
            (!floors.is_empty() && floors.iter().all(|floor| *floor == last)).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_forgetting_the_acks_it_took_repeats_nothing_the_floor_records() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let body =
        support::nats::forward_config(&channel.url("ch"), &target.url("/hook"), &nats.url, NAME);
    let before = channel.connections();
    let instances: Vec<Instance> = (0..2).map(|_| start_instance(&body, &[])).collect();
    for instance in &instances {
        instance.logs.wait_for(&["joined the cluster"]).await;
    }
    channel.wait_connections(before + 2).await;

    let mut seen = Vec::new();
    for n in 0..5 {
        channel.send_webhook(n as u64 + 1, &frame(n));
    }
    seen.extend(take_until_seen(&mut target, 0..5).await);
    wait_floors_at_the_stream_end(&nats).await;

    // The consumers' state as the server has it on disk now (what it flushed so far).
    let (store, port) = nats.stop().await;
    let snapshot = support::temp_dir();
    copy_dir(&consumers_dir(store.path()), snapshot.path());
    let nats = NatsServer::start_again(store, port).await;

    for n in 5..10 {
        channel.send_webhook(n as u64 + 1, &frame(n));
    }
    seen.extend(take_until_seen(&mut target, 5..10).await);
    wait_floors_at_the_stream_end(&nats).await;

    // A crash that loses the acks since: the consumers come back as they were.
    let (store, port) = nats.stop().await;
    let consumers = consumers_dir(store.path());
    std::fs::remove_dir_all(&consumers).unwrap();
    copy_dir(snapshot.path(), &consumers);
    let _nats = NatsServer::start_again(store, port).await;

    // NATS hands out again what it forgot; the floor says it was delivered.
    support::wait_for(
        FAILOVER_PATIENCE,
        "an instance passing over a redelivery",
        || async {
            instances
                .iter()
                .any(|i| {
                    i.logs
                        .find(&["already delivered (NATS did not get or forgot the ack"])
                        .is_some()
                })
                .then_some(())
        },
    )
    .await;
    for n in 10..15 {
        channel.send_webhook(n as u64 + 1, &frame(n));
    }
    seen.extend(take_until_seen(&mut target, 10..15).await);
    target.assert_quiet(Duration::from_secs(3)).await;
    assert_eq!(seen, (0..15).collect::<Vec<_>>(), "each once, in order");
}

/// An instance overtaken mid-delivery (its NATS connection stalled past the ack wait while
/// another instance delivered the message and moved the floor on) wrote its older floor over
/// the newer one when it finished; NATS then forgetting acks would deliver again what the
/// newer floor said was done. Here the test itself moves the floor on while the delivery is
/// held at the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_an_overtaken_instance_moved_the_route_s_floor_backwards() {
    let nats = NatsServer::start().await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let body =
        support::nats::forward_config(&channel.url("ch"), &target.url("/hook"), &nats.url, NAME);
    let instance = start_instance(&body, &[]);
    instance.logs.wait_for(&["joined the cluster"]).await;
    channel.wait_connections(1).await;

    target.hold();
    channel.send_webhook(1, &frame(0));
    target.wait_arrived(1).await;
    // Meanwhile "another instance" delivered it and 99 more.
    let client = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let kv = js
        .get_key_value(format!("smee_{NAME}_alerts"))
        .await
        .unwrap();
    // The route's floor key is named after its consumer.
    let stream = js.get_stream(format!("SMEE_{NAME}")).await.unwrap();
    let consumers: Vec<String> = stream
        .consumer_names()
        .map(|name| name.expect("list the stream's consumers"))
        .collect()
        .await;
    let consumer = consumers
        .iter()
        .find(|n| n.starts_with("route_"))
        .unwrap_or_else(|| panic!("no route consumer among {consumers:?}"));
    let key = format!("floor.{consumer}");
    kv.put(&key, "100".into()).await.unwrap();
    target.release();
    assert_eq!(n_of(&target.next().await.body), 0);
    instance.logs.wait_for(&["cluster delivery done"]).await;
    let floor = kv.get(&key).await.unwrap().unwrap();
    assert_eq!(
        std::str::from_utf8(&floor).unwrap(),
        "100",
        "the floor only moves forward"
    );
}
