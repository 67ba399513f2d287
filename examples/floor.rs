//! Benchmark floor: the least a relay can do on the smee wire, with the relay's own parts and
//! nothing else. It reads a channel's frames through the same SSE stack as the relay
//! (eventsource-client over `smee_relay::source::transport::Transport`, reqwest underneath),
//! decodes each with `smee_relay::source::wire::decode` and POSTs it, one after another, with
//! `smee_relay::delivery::forward::Forwarder`. No spool (nothing survives a crash), no retries,
//! no reconnects, no logging: bench/run.sh compares the relay against this loop to show what the
//! spool, the dispatcher and the rest cost per event.
//!
//! With `--durable FILE` it is the least a relay can do that keeps the spool's promise (an
//! event is on disk before it is delivered): the frames read so far are appended to FILE and
//! `fdatasync`ed, once per group as the spool's group commit does, before they are POSTed. Its
//! CPU per event is a floor under any design that keeps today's window (from reading a frame to
//! its commit), on the machine that runs it; the fsync's cost depends on the machine's disk
//! and, in a VM, on its virtualisation.
//!
//! Usage: `floor CHANNEL_URL TARGET_URL [--durable FILE]`. Runs until killed.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use eventsource_client::{Client as _, ClientBuilder, ReconnectOptions, SSE};
use futures::{FutureExt as _, StreamExt};
use smee_relay::delivery::forward::Forwarder;
use smee_relay::source::status::ChannelStatus;
use smee_relay::source::transport::Transport;
use smee_relay::source::wire;

/// A group's frames, at most (one commit's appends in the spool).
const GROUP_BYTES: usize = 1 << 20;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (channel, target, mut durable) = match &args[..] {
        [_, channel, target] => (channel, target, None),
        [_, channel, target, flag, file] if flag == "--durable" => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(file)
                .unwrap();
            (channel, target, Some(file))
        }
        _ => panic!("usage: floor CHANNEL_URL TARGET_URL [--durable FILE]"),
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let idle = Duration::from_secs(90);
    let status = Arc::new(ChannelStatus::new(channel.clone(), idle));
    let client = smee_relay::http::client_builder().build().unwrap();
    let transport = Transport::new(client, idle, smee_relay::source::DEFAULT_MAX_FRAME, status);
    let forwarder = Forwarder::new(target.parse().unwrap(), Duration::from_secs(10)).unwrap();
    let sse = ClientBuilder::for_url(channel)
        .unwrap()
        .reconnect(ReconnectOptions::reconnect(false).build())
        .build_with_transport(transport);
    // Fused: the inner loop may see the stream end, and the outer one then polls it once more.
    let mut stream = sse.stream().fuse();
    let mut group = Vec::new();
    while let Some(item) = stream.next().await {
        // The group: this frame and whatever else has arrived, up to a commit's 1 MiB (the
        // spool's group commit takes what queued up while the last one ran, the same way). The
        // connection's task moves bytes into the stream, so the loop yields to it once between
        // looks, and the group ends at the first look that finds nothing.
        let (mut next, mut bytes) = (Some(item), 0);
        loop {
            while let Some(item) = next.take() {
                match item {
                    Ok(SSE::Event(frame)) if frame.event_type == "message" => {
                        bytes += frame.data.len();
                        group.push(frame);
                    }
                    Ok(_) => {}
                    // No reconnects here: say why the loop ends, for the benchmark's log.
                    Err(e) => eprintln!("floor: the stream failed: {e:?}"),
                }
                if bytes < GROUP_BYTES {
                    next = stream.next().now_or_never().flatten();
                }
            }
            if bytes >= GROUP_BYTES {
                break;
            }
            tokio::task::yield_now().await;
            next = stream.next().now_or_never().flatten();
            if next.is_none() {
                break;
            }
        }
        if let Some(file) = durable.as_mut() {
            for frame in &group {
                file.write_all(&(frame.data.len() as u64).to_le_bytes())
                    .unwrap();
                file.write_all(frame.data.as_bytes()).unwrap();
            }
            file.sync_data().unwrap();
        }
        for frame in group.drain(..) {
            let decoded = wire::decode(frame.id.as_deref(), &frame.data).unwrap();
            forwarder.deliver(&decoded.event, &[]).await.unwrap();
        }
    }
    eprintln!("floor: the stream ended");
}
