//! The smee subscription: one long-lived SSE connection per channel, and everything it takes
//! to keep it alive.
//!
//! [`Source::run`] connects, decodes each webhook frame into an [`Event`] and hands it on, in
//! the order the channel sent it. When the connection ends for any reason (the server closed
//! it, a network error, the idle watchdog in [`transport`]) it logs why and reconnects, forever,
//! with exponential backoff and jitter; a connection that stayed up for a healthy minute resets
//! the backoff. Reconnection is done here rather than inside `eventsource-client`, so that each
//! disconnect is logged with its reason and each new connection is a fresh, known state.
//!
//! Bad frames never stop the source: a frame that cannot be decoded is logged with its id and
//! reason and skipped; the next frame is decoded as usual.

pub mod transport;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use eventsource_client::{Client as _, ClientBuilder, ReconnectOptions, SSE};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace, warn};

use crate::event::Event;
use crate::retry::BackoffPolicy;
use crate::telemetry::ChannelStatus;
use crate::url::ChannelUrl;
use transport::WatchdogTransport;

/// How long a connection must stay up before the reconnect backoff starts over.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// Errors that stop a source before it starts. Once running, a source never fails: it
/// reconnects.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
    #[error("cannot create a channel on {server}: {reason}")]
    NewChannel { server: String, reason: String },
}

/// What a source needs to know.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// The channel to subscribe to.
    pub channel: ChannelUrl,
    /// No bytes for this long (smee pings every 30 s) means the connection is dead.
    pub idle_timeout: Duration,
    /// Delays between reconnects.
    pub reconnect: BackoffPolicy,
    /// Sent as `Authorization: Bearer` (for `smee-relay serve --token`). A secret.
    pub token: Option<String>,
    /// Where to resume: sent as `Last-Event-ID` on the first connection.
    pub last_event_id: Option<String>,
}

impl SourceConfig {
    /// The defaults `forward` uses: a 90 s idle timeout, reconnecting from 1 s up to 30 s.
    pub fn new(channel: ChannelUrl) -> Self {
        Self {
            channel,
            idle_timeout: Duration::from_secs(90),
            reconnect: BackoffPolicy::RECONNECT,
            token: None,
            last_event_id: None,
        }
    }

    pub fn build(self) -> Result<Source, SourceError> {
        let client = crate::http::client_builder().build()?;
        let transport = WatchdogTransport::new(client, self.idle_timeout);
        let status = Arc::new(ChannelStatus::new(
            self.channel.to_string(),
            self.idle_timeout,
        ));
        Ok(Source {
            last_event_id: self.last_event_id.clone(),
            config: self,
            transport,
            status,
        })
    }
}

/// A running subscription to one channel.
pub struct Source {
    /// What to connect to and how patiently.
    config: SourceConfig,
    /// HTTP under the SSE client, with the idle watchdog.
    transport: WatchdogTransport,
    /// The id of the last frame received, sent back as `Last-Event-ID` on reconnect so that a
    /// server that keeps events can replay what was missed.
    last_event_id: Option<String>,
    /// Liveness for `/healthz`, metrics and the systemd status line.
    status: Arc<ChannelStatus>,
}

/// Why one connection ended.
enum Ended {
    /// Whoever consumes events is gone: stop for good.
    ConsumerGone,
    /// The connection was lost; reconnect after a delay.
    Lost {
        reason: String,
        /// How long it was up, to decide whether the backoff starts over.
        connected_for: Duration,
    },
}

impl Source {
    /// This source's liveness, shared with whoever reports on it.
    pub fn status(&self) -> Arc<ChannelStatus> {
        self.status.clone()
    }

    /// Receive events and send them to `events` until `cancel` fires or the receiver is dropped.
    pub async fn run(mut self, events: mpsc::Sender<Event>, cancel: CancellationToken) {
        let channel = self.config.channel.clone();
        let mut backoff = self.config.reconnect.start();
        loop {
            info!(%channel, "connecting to channel");
            let ended = tokio::select! {
                _ = cancel.cancelled() => return,
                ended = self.connect_once(&events) => ended,
            };
            let Ended::Lost {
                reason,
                connected_for,
            } = ended
            else {
                return;
            };
            self.status.set_connected(false);
            self.status.reconnecting();
            if connected_for >= HEALTHY_AFTER {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            warn!(
                %channel,
                retry_in = %humantime::format_duration(round_to_ms(delay)),
                "disconnected from channel: {reason}"
            );
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One connection, from request to its end.
    async fn connect_once(&mut self, events: &mpsc::Sender<Event>) -> Ended {
        let mut connected_at: Option<Instant> = None;
        let lost = |reason: String, connected_at: Option<Instant>| Ended::Lost {
            reason,
            connected_for: connected_at.map_or(Duration::ZERO, |t| t.elapsed()),
        };
        let client = match self.sse_client() {
            Ok(client) => client,
            Err(e) => return lost(format!("cannot build the request: {e}"), None),
        };
        let mut stream = client.stream();
        while let Some(item) = stream.next().await {
            if item.is_ok() {
                self.status.saw_bytes();
            }
            match item {
                Ok(SSE::Connected(details)) => {
                    let response = details.response();
                    let content_type = response
                        .get_header_value("content-type")
                        .ok()
                        .flatten()
                        .unwrap_or("");
                    if !content_type.starts_with("text/event-stream") {
                        return lost(
                            format!(
                                "the server answered {} with content-type {content_type:?}, not an \
                                 event stream; check that the URL is a smee channel",
                                response.status()
                            ),
                            None,
                        );
                    }
                    connected_at = Some(Instant::now());
                    self.status.set_connected(true);
                    info!(channel = %self.config.channel, "connected to channel");
                }
                Ok(SSE::Comment(_)) => trace!("comment received"),
                Ok(SSE::Event(frame)) => {
                    if frame.id.is_some() {
                        self.last_event_id.clone_from(&frame.id);
                    }
                    match frame.event_type.as_str() {
                        "ready" => debug!("channel ready"),
                        "ping" => trace!("ping received"),
                        "message" => {
                            if let Some(event) = decode_frame(&frame)
                                && events.send(event).await.is_err()
                            {
                                return Ended::ConsumerGone;
                            }
                        }
                        other => debug!(event_type = other, "skipping event of unknown type"),
                    }
                }
                Err(e) => return lost(describe(&e), connected_at),
            }
        }
        lost("the stream ended".into(), connected_at)
    }

    fn sse_client(
        &self,
    ) -> Result<impl eventsource_client::Client + use<>, eventsource_client::Error> {
        let mut builder = ClientBuilder::for_url(self.config.channel.expose().as_str())?
            .header("Accept", "text/event-stream")?
            // Ask smee-relay servers for exact bodies; other servers ignore it.
            .header(crate::serve::RAW_OPT_IN, "1")?
            .reconnect(ReconnectOptions::reconnect(false).build());
        if let Some(token) = &self.config.token {
            builder = builder.header("Authorization", &format!("Bearer {token}"))?;
        }
        if let Some(id) = &self.last_event_id {
            builder = builder.last_event_id(id.clone());
        }
        Ok(builder.build_with_transport(self.transport.clone()))
    }
}

/// Decode a webhook frame, logging (not failing on) anything wrong with it.
fn decode_frame(frame: &eventsource_client::Event) -> Option<Event> {
    let id = frame.id.as_deref().unwrap_or("-");
    match wire::decode(frame.id.as_deref(), &frame.data) {
        Ok(decoded) => {
            for dropped in &decoded.dropped {
                warn!(event = %id, "{dropped}");
            }
            Some(decoded.event)
        }
        Err(e) => {
            warn!(event = %id, "skipping malformed event: {e}");
            None
        }
    }
}

/// A disconnect reason a person can act on.
fn describe(error: &eventsource_client::Error) -> String {
    use eventsource_client::Error as E;
    match error {
        E::UnexpectedResponse(response, _) => format!("the server answered {}", response.status()),
        E::Eof => "the server closed the stream".into(),
        E::UnexpectedEof => {
            "the server closed the stream in the middle of a frame (the partial frame is discarded)"
                .into()
        }
        E::InvalidLine(line) => format!("malformed SSE line ({line})"),
        E::Transport(e) => match std::error::Error::source(e) {
            Some(inner) => inner.to_string(),
            None => e.to_string(),
        },
        other => other.to_string(),
    }
}

fn round_to_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// Create a new channel on a smee server (`HEAD /new`, which redirects to a fresh channel).
pub async fn create_channel(server: &reqwest::Url) -> Result<ChannelUrl, SourceError> {
    let fail = |reason: String| SourceError::NewChannel {
        server: server.to_string(),
        reason,
    };
    let client = crate::http::client_builder().build()?;
    let new = server.join("new").map_err(|e| fail(e.to_string()))?;
    let response = client
        .head(new)
        .send()
        .await
        .map_err(|e| fail(e.without_url().to_string()))?;
    let location = response
        .headers()
        .get(http::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            fail(format!(
                "it answered {} with no Location",
                response.status()
            ))
        })?;
    let url = server.join(location).map_err(|e| fail(e.to_string()))?;
    url.as_str().parse().map_err(|e| fail(format!("{e}")))
}
