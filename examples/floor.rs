//! Benchmark floor: the least a relay can do on the smee wire, with the relay's own parts and
//! nothing else. It reads a channel's frames through the same SSE stack as the relay
//! (eventsource-client over `smee_relay::source::transport::Transport`, reqwest underneath),
//! decodes each with `smee_relay::source::wire::decode` and POSTs it, one after another, with
//! `smee_relay::delivery::forward::Forwarder`. No spool (nothing survives a crash), no retries,
//! no reconnects, no logging: bench/run.sh compares the relay against this loop to show what the
//! spool, the dispatcher and the rest cost per event.
//!
//! Usage: `floor CHANNEL_URL TARGET_URL`. Runs until killed.

use std::sync::Arc;
use std::time::Duration;

use eventsource_client::{Client as _, ClientBuilder, ReconnectOptions, SSE};
use futures::StreamExt;
use smee_relay::delivery::forward::Forwarder;
use smee_relay::source::status::ChannelStatus;
use smee_relay::source::transport::Transport;
use smee_relay::source::wire;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, channel, target] = &args[..] else {
        panic!("usage: floor CHANNEL_URL TARGET_URL");
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
    let mut stream = sse.stream();
    while let Some(item) = stream.next().await {
        let frame = match item {
            Ok(SSE::Event(frame)) => frame,
            Ok(_) => continue,
            Err(e) => {
                // No reconnects here: say why the loop ends, for the benchmark's log.
                eprintln!("floor: the stream failed: {e:?}");
                continue;
            }
        };
        if frame.event_type != "message" {
            continue;
        }
        let decoded = wire::decode(frame.id.as_deref(), &frame.data).unwrap();
        forwarder.deliver(&decoded.event, &[]).await.unwrap();
    }
    eprintln!("floor: the stream ended");
}
