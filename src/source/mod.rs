//! The smee subscription: one long-lived SSE connection per channel, and everything it takes
//! to keep it alive.
//!
//! [`Source::run`] connects, decodes each webhook frame into an [`Event`] and hands it on, in
//! the order the channel sent it. When the connection ends for any reason (the server closed
//! it, a network error, the idle watchdog below) it logs why and reconnects, forever,
//! with exponential backoff and jitter; a connection that stayed up for a healthy minute resets
//! the backoff. Each disconnect is logged with its reason.
//!
//! The idle watchdog lives here too: every wait for the response head and for each chunk of
//! the stream is bounded by the idle timeout. A half-open TCP connection (the peer vanished,
//! nothing says so) looks exactly like that, and smee pings every 30 s, so silence means the
//! connection is dead.
//!
//! Bad frames never stop the source: a frame that cannot be decoded is logged with its id and
//! reason and skipped; the next frame is decoded as usual.
//!
//! The HTTP side is reqwest (one HTTP and TLS stack for the whole binary); the event-stream
//! format is parsed by [`sse`]. Until 2026-11 this was `eventsource-client` 0.18.0 over a reqwest
//! transport; its parser held every frame three times, which broke the memory budget for large
//! webhooks (see [`sse`] and BENCHMARKS.md), and reconnection was already ours.

pub mod sse;
pub mod status;
pub mod wire;

use std::collections::VecDeque;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, trace, warn};

use crate::event::Event;
use crate::retry::BackoffPolicy;
use crate::secret::{ExposeSecret as _, SecretString};
use crate::url::ChannelUrl;
use status::ChannelStatus;

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

/// Why the channel refused a subscription, with what to do when a token is the answer.
fn refused(status: http::StatusCode, has_token: bool) -> String {
    match (status, has_token) {
        (http::StatusCode::UNAUTHORIZED, false) => format!(
            "the server answered {status}: the channel requires a token: --token or token_env"
        ),
        (http::StatusCode::UNAUTHORIZED | http::StatusCode::FORBIDDEN, true) => format!(
            "the server answered {status}: the channel refused the token; check --token or token_env"
        ),
        _ => format!("the server answered {status}"),
    }
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
    pub token: Option<SecretString>,
    /// Where to resume: sent as `Last-Event-ID` on the first connection.
    pub last_event_id: Option<String>,
    /// Event names to skip (`--ignore-event`, gosmee's flag): matched, ignoring case, against
    /// the sender's event header ([`EVENT_HEADERS`]). Skipped events are never spooled.
    pub ignore_events: Vec<String>,
}

/// Headers that name a webhook's event, by sender: GitHub, GitLab, Gitea, Gogs, Bitbucket.
pub const EVENT_HEADERS: [&str; 5] = [
    "x-github-event",
    "x-gitlab-event",
    "x-gitea-event",
    "x-gogs-event",
    "x-event-key",
];

/// Whether `event` is one of the `ignored` event names.
fn is_ignored(event: &Event, ignored: &[String]) -> bool {
    !ignored.is_empty()
        && EVENT_HEADERS.iter().any(|header| {
            event
                .header(header)
                .is_some_and(|name| ignored.iter().any(|i| i.eq_ignore_ascii_case(name)))
        })
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
            ignore_events: Vec::new(),
        }
    }

    pub fn build(self) -> Result<Source, SourceError> {
        let client = crate::http::client_builder().build()?;
        let status = Arc::new(ChannelStatus::new(
            self.channel.to_string(),
            self.idle_timeout,
        ));
        Ok(Source {
            last_event_id: self.last_event_id.clone(),
            config: self,
            client,
            status,
        })
    }
}

/// A running subscription to one channel.
pub struct Source {
    /// What to connect to and how patiently.
    config: SourceConfig,
    /// HTTP client for the stream (no overall timeout: the stream is meant to last).
    client: reqwest::Client,
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
        let idle = self.config.idle_timeout;
        let lost = |reason: String, connected_at: Option<Instant>| Ended::Lost {
            reason,
            connected_for: connected_at.map_or(Duration::ZERO, |t| t.elapsed()),
        };
        let mut response = match tokio::time::timeout(idle, self.request().send()).await {
            Err(_) => return lost(idle_timeout(idle), None),
            Ok(Err(e)) => return lost(error_chain(&e.without_url()), None),
            Ok(Ok(response)) => response,
        };
        self.status.saw_bytes();
        let status = response.status();
        let content_type = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !status.is_success() {
            return lost(refused(status, self.config.token.is_some()), None);
        }
        if !content_type.starts_with("text/event-stream") {
            return lost(
                format!(
                    "the server answered {status} with content-type {content_type:?}, not an \
                     event stream; check that the URL is a smee channel"
                ),
                None,
            );
        }
        let connected_at = Some(Instant::now());
        self.status.set_connected(true);
        info!(channel = %self.config.channel, "connected to channel");

        let mut parser = sse::Parser::new();
        let mut items = VecDeque::new();
        loop {
            let chunk = match tokio::time::timeout(idle, response.chunk()).await {
                Err(_) => return lost(idle_timeout(idle), connected_at),
                Ok(Err(e)) => return lost(error_chain(&e.without_url()), connected_at),
                Ok(Ok(None)) if parser.mid_frame() => {
                    return lost(
                        "the server closed the stream in the middle of a frame (the partial \
                         frame is discarded)"
                            .into(),
                        connected_at,
                    );
                }
                Ok(Ok(None)) => return lost("the server closed the stream".into(), connected_at),
                Ok(Ok(Some(chunk))) => chunk,
            };
            self.status.saw_bytes();
            parser.feed(&chunk, &mut items);
            drop(chunk);
            while let Some(item) = items.pop_front() {
                if !self.handle(item, events).await {
                    return Ended::ConsumerGone;
                }
            }
        }
    }

    /// Act on one parsed item. Returns false if the consumer is gone.
    async fn handle(&mut self, item: sse::Item, events: &mpsc::Sender<Event>) -> bool {
        let frame = match item {
            sse::Item::Frame(frame) => frame,
            sse::Item::Oversized { id, bytes } => {
                error!(
                    event = %id.as_deref().unwrap_or("-"),
                    "skipping a frame of {} MiB: over the {} MiB limit",
                    bytes >> 20,
                    sse::MAX_FRAME >> 20
                );
                return true;
            }
        };
        if frame.id.is_some() {
            self.last_event_id.clone_from(&frame.id);
        }
        match frame.event.as_str() {
            "ready" => debug!("channel ready"),
            "ping" => trace!("ping received"),
            "message" => {
                let Some(event) = decode_frame(frame) else {
                    return true;
                };
                if is_ignored(&event, &self.config.ignore_events) {
                    debug!(kind = ?event.kind(), "ignoring event (--ignore-event)");
                } else if events.send(event).await.is_err() {
                    return false;
                }
            }
            other => debug!(event_type = other, "skipping event of unknown type"),
        }
        true
    }

    /// The subscription request: asks smee-relay servers for exact bodies (others ignore
    /// the header), and resumes after the last event seen.
    fn request(&self) -> reqwest::RequestBuilder {
        let mut request = self
            .client
            .get(self.config.channel.expose().clone())
            .header(http::header::ACCEPT, "text/event-stream")
            .header(http::header::CACHE_CONTROL, "no-cache")
            .header(wire::RAW_OPT_IN, "1");
        if let Some(token) = &self.config.token {
            request = request.bearer_auth(token.expose_secret());
        }
        if let Some(id) = &self.last_event_id {
            request = request.header("last-event-id", id);
        }
        request
    }
}

/// Decode a webhook frame, logging (not failing on) anything wrong with it. The frame is
/// dropped as soon as it is decoded, so a large one is not held next to its body.
fn decode_frame(frame: sse::Frame) -> Option<Event> {
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

fn idle_timeout(idle: Duration) -> String {
    format!(
        "no bytes received for {} (idle timeout); the connection is presumed dead",
        humantime::format_duration(idle)
    )
}

/// An error and its causes, with the URL (which holds the channel id) already removed.
fn error_chain(error: &reqwest::Error) -> String {
    crate::error::chain(error)
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
        .map_err(|e| fail(error_chain(&e.without_url())))?;
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
