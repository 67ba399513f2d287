//! `serve --nats-url`: replicas of `serve` share their channels through one NATS JetStream
//! stream, so any number of them can run behind a load balancer.
//!
//! It owns the NATS connection, the stream (one subject per channel, `STREAM.CHANNEL`), the
//! publishing of posts and the feed: one ordered, ephemeral consumer per replica that reads the
//! whole stream, in stream order, into the [`Hub`]'s replay buffers. The stream is the history:
//! a post is answered 2xx only once JetStream stored it, the hub gets it (with every other
//! replica's posts, in the one stream order) from the feed, never straight from the POST, and
//! an event's SSE `id:` is its stream sequence, the same on every replica. Retention is the
//! stream's limits (`--retain` is its max age, `--max-events` its per-channel message limit,
//! `--max-memory` its byte limit); the hub applies the same limits to its copy.
//!
//! A stream found missing is created again with the configured limits; a stream found reset
//! (its sequence went back, or it was created anew) makes the hub drop its copy and cut its
//! subscribers, which resume and are told `event: gap` with `"reset":true`: never silence.
//!
//! It must not decide what a frame looks like (that is [`Hub`]'s `Posted`) nor answer HTTP
//! (that is `http`), and it never accepts a post it could not store: while NATS is away,
//! posts get 503.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::DeliverPolicy;
use futures::StreamExt as _;
use tracing::{debug, info, warn};

use super::hub::Hub;
use crate::cluster::UrlAuth;
use crate::secret::{ExposeSecret as _, SecretString};

/// The head and framing a stored event adds to its body, at most: a body is refused (413)
/// when it and this do not fit in the server's `max_payload`.
const HEAD_ALLOWANCE: usize = 64 << 10;
/// How long a publish waits for JetStream's acknowledgement before the post gets 503.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Pull requests of the feed expire after this; its idle heartbeat is half of it, so a feed
/// whose consumer vanished (a restarted server) notices within a few seconds.
const FEED_EXPIRES: Duration = Duration::from_secs(4);
/// Most holes remembered (see [`Feed::unseen`]); older ones merge, which only widens a gap
/// report, never hides one.
const MAX_UNSEEN: usize = 256;

/// How to reach NATS (`serve --nats-url` and friends).
#[derive(Clone, Debug)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated; may carry `user:password@` or a token, hence secret.
    pub url: SecretString,
    /// A NATS credentials file (JWT and NKey seed), as `nats` tools take.
    pub credentials: Option<std::path::PathBuf>,
    /// A PEM file of CA certificates to trust for `tls://` servers (besides the system's).
    pub tls_ca: Option<std::path::PathBuf>,
    /// The stream's name; its subjects are `NAME.CHANNEL`. Replicas that share channels use
    /// the same name.
    pub stream: String,
    /// How long NATS may be unreachable before `/healthz` fails.
    pub grace: Duration,
    /// Copies of the stream in a NATS cluster (1 on a single server; 3 survives a lost node).
    pub replicas: usize,
}

impl NatsConfig {
    /// The stream name used when none is given.
    pub const DEFAULT_STREAM: &str = "SMEE_SERVE";

    /// With the defaults for everything but the URL.
    pub fn new(url: SecretString) -> Self {
        Self {
            url,
            credentials: None,
            tls_ca: None,
            stream: Self::DEFAULT_STREAM.to_string(),
            grace: Duration::from_secs(10),
            replicas: 1,
        }
    }
}

/// Why `serve` could not join the cluster at start.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot read the NATS credentials file {0}")]
    Credentials(std::path::PathBuf, #[source] std::io::Error),
    #[error("cannot connect to NATS at {url}: {cause} ({hint})")]
    Connect {
        /// The URL(s), credentials out.
        url: String,
        /// What failed, in the client's words, each cause once.
        cause: String,
        /// What to check, by the kind of failure.
        hint: &'static str,
    },
    #[error("--nats-url `{0}`: {1}")]
    Url(String, &'static str),
    #[error("cannot create or update the JetStream stream {name} ({hint})")]
    Stream {
        /// The stream's name.
        name: String,
        /// What to check, by the refusal.
        hint: String,
        #[source]
        source: jetstream::context::CreateStreamError,
    },
    #[error("--nats-tls-ca {0}: cannot read it")]
    TlsCaUnreadable(std::path::PathBuf, #[source] std::io::Error),
    #[error("--nats-tls-ca {0}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    TlsCaNotPem(std::path::PathBuf),
    #[error("`{0}` is not a stream name: use letters, digits, - and _")]
    StreamName(String),
}

/// Why a post could not be stored in the stream.
#[derive(Debug, thiserror::Error)]
pub(super) enum PublishError {
    #[error("NATS is unreachable; this server keeps nothing it cannot store, try again shortly")]
    Unavailable,
    #[error("JetStream did not confirm the event in time; try again shortly")]
    Timeout,
    #[error("JetStream refused the event")]
    Refused(#[source] jetstream::context::PublishError),
    #[error("the event is {0} bytes with its headers; the NATS server takes at most {1}")]
    TooLarge(usize, usize),
}

/// `/metrics` and `/healthz` figures of the cluster path.
#[derive(Default)]
pub(super) struct NatsStats {
    /// Posts JetStream confirmed.
    pub published: AtomicU64,
    /// Posts refused because NATS was unreachable.
    pub refused_unavailable: AtomicU64,
    /// Posts whose acknowledgement did not come in time.
    pub publish_timeouts: AtomicU64,
    /// Posts JetStream answered with an error.
    pub publish_errors: AtomicU64,
    /// Events the feed put into the hub.
    pub fed: AtomicU64,
    /// Messages still in the stream after the last one fed (the feed's lag).
    pub lag: AtomicU64,
    /// The last stream sequence fed.
    pub last_sequence: AtomicU64,
    /// Stream sequences this replica never saw (deleted before the feed reached them).
    pub unseen: AtomicU64,
    /// Messages of the stream that are no event (not written by `serve`): skipped.
    pub undecodable: AtomicU64,
    /// Times the feed had to start its consumer again.
    pub feed_restarts: AtomicU64,
    /// Times the connection was lost.
    pub disconnects: AtomicU64,
    /// When the connection was lost (ms since the epoch), 0 while connected.
    pub disconnected_since_ms: AtomicU64,
    /// The feed has once reached the end of the stream: until then, this replica's replay
    /// buffers are incomplete and `/healthz` says so.
    pub caught_up: AtomicBool,
    /// Times the stream was found reset (its sequence went back, or it was created anew:
    /// deleted, or NATS lost its store): this replica dropped its copy, cut its subscribers
    /// (they resume and are told `event: gap`) and read the new stream from its start.
    pub stream_resets: AtomicU64,
    /// The stream can be written: it exists (or was created again). While it cannot,
    /// `/healthz` fails (posts get 503).
    pub writable: AtomicBool,
}

/// A replica's link to the cluster.
pub(super) struct Cluster {
    /// The connection, for its state.
    client: async_nats::Client,
    /// JetStream on it.
    js: jetstream::Context,
    /// The stream's name, also the subjects' prefix.
    stream: String,
    /// The stream as configured (limits from the flags): to create it again when it is lost.
    config: jetstream::stream::Config,
    /// How long NATS may be away before `/healthz` fails.
    grace: Duration,
    /// Figures.
    pub stats: Arc<NatsStats>,
}

/// Stream names may not hold `.`, `*`, `>`, spaces or path separators; be stricter.
fn valid_stream_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `--nats-url`, split into servers and credentials ([`crate::cluster::split_urls`]).
fn parse_urls(urls: &str) -> Result<(Vec<async_nats::ServerAddr>, Option<UrlAuth>), NatsError> {
    crate::cluster::split_urls(urls).map_err(|why| NatsError::Url(redact_url(urls), why))
}

/// What to check when the connection failed, by how it failed.
fn connect_hint(kind: async_nats::ConnectErrorKind) -> &'static str {
    use async_nats::ConnectErrorKind as K;
    match kind {
        K::AuthorizationViolation | K::Authentication => {
            "check the user and password or token in --nats-url, or --nats-credentials"
        }
        K::Tls => "check --nats-tls-ca and the server's certificate and name",
        K::Dns => "check the host name in --nats-url",
        K::ServerParse => "check --nats-url",
        K::TimedOut | K::Io | K::MaxReconnects => "is nats-server running, and the URL right?",
    }
}

/// The client's error with each cause once: its own message repeats its source's.
fn connect_cause(e: &async_nats::ConnectError) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut push = |text: String| {
        for part in text.split(": ") {
            let part = part.trim().to_string();
            if !part.is_empty() && part != "nats" && !parts.contains(&part) {
                parts.push(part);
            }
        }
    };
    push(e.kind().to_string());
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        push(cause.to_string());
        source = cause.source();
    }
    parts.join(": ")
}

/// The URL(s) for messages: passwords and tokens out.
pub(super) fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|one| {
            let one = one.trim();
            match one.rsplit_once('@') {
                Some((userinfo, host)) => {
                    let (scheme, _) = userinfo.split_once("://").unwrap_or(("nats", ""));
                    format!("{scheme}://***@{host}")
                }
                None => one.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl Cluster {
    /// Connect, and create the stream (or bring its limits to these). Fails at once if NATS
    /// cannot be reached: a replica that starts without its history would serve wrong replays.
    pub(super) async fn connect(
        config: &NatsConfig,
        limits: &super::ServeConfig,
    ) -> Result<Self, NatsError> {
        if !valid_stream_name(&config.stream) {
            return Err(NatsError::StreamName(config.stream.clone()));
        }
        let shown = redact_url(config.url.expose_secret());
        let (addrs, auth) = parse_urls(config.url.expose_secret())?;
        let stats = Arc::new(NatsStats::default());
        let mut options = async_nats::ConnectOptions::new()
            .name("smee-relay serve")
            .connection_timeout(Duration::from_secs(5))
            // Reconnect soon after NATS returns (the default waits up to 4 s between tries).
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((attempts as u64 * 100).min(1000))
            })
            .event_callback({
                let stats = stats.clone();
                let shown = shown.clone();
                move |event| {
                    let stats = stats.clone();
                    let shown = shown.clone();
                    async move { on_event(&stats, &shown, event) }
                }
            });
        if let Some(path) = &config.credentials {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| NatsError::Credentials(path.clone(), e))?;
        }
        match auth {
            Some(UrlAuth::UserPassword(user, password)) => {
                options = options.user_and_password(user, password);
            }
            Some(UrlAuth::Token(token)) => options = options.token(token),
            None => {}
        }
        if let Some(ca) = &config.tls_ca {
            let pem = std::fs::read(ca).map_err(|e| NatsError::TlsCaUnreadable(ca.clone(), e))?;
            if !pem
                .windows(b"-----BEGIN CERTIFICATE-----".len())
                .any(|w| w == b"-----BEGIN CERTIFICATE-----")
            {
                return Err(NatsError::TlsCaNotPem(ca.clone()));
            }
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        let client = options
            .connect(addrs)
            .await
            .map_err(|e| NatsError::Connect {
                url: shown.clone(),
                cause: connect_cause(&e),
                hint: connect_hint(e.kind()),
            })?;
        let max_payload = client.server_info().max_payload;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(ACK_TIMEOUT);
        let stream = jetstream::stream::Config {
            name: config.stream.clone(),
            description: Some("smee-relay serve: posted webhooks, one subject per channel".into()),
            subjects: vec![format!("{}.*", config.stream)],
            max_age: limits.retain,
            max_bytes: i64::try_from(limits.max_memory).unwrap_or(i64::MAX),
            max_messages_per_subject: i64::try_from(limits.max_events).unwrap_or(i64::MAX),
            discard: jetstream::stream::DiscardPolicy::Old,
            storage: jetstream::stream::StorageType::File,
            num_replicas: config.replicas,
            ..Default::default()
        };
        if let Ok(mut existing) = js.get_stream(&config.stream).await {
            warn_changed_limits(
                &config.stream,
                &existing.info().await.ok().map(|i| i.config.clone()),
                &stream,
            );
        }
        js.create_or_update_stream(stream.clone())
            .await
            .map_err(|e| NatsError::Stream {
                hint: stream_hint(&e, config.replicas),
                name: config.stream.clone(),
                source: e,
            })?;
        stats.writable.store(true, Ordering::Relaxed);
        if limits.max_body + HEAD_ALLOWANCE > max_payload {
            warn!(
                max_payload,
                "the NATS server takes messages of at most {max_payload} bytes, less than \
                 --max-body: larger posts get 413 (raise max_payload in nats-server's config)"
            );
        }
        info!(nats = %shown, stream = %config.stream, "sharing channels through NATS JetStream");
        Ok(Self {
            client,
            js,
            stream: config.stream.clone(),
            config: stream,
            grace: config.grace,
            stats,
        })
    }

    fn subject(&self, channel: &str) -> String {
        format!("{}.{channel}", self.stream)
    }

    /// Store an encoded event in the stream; its sequence once JetStream confirmed it. A
    /// stream found missing is created again (with the configured limits) and the event
    /// published once more.
    pub(super) async fn publish(
        &self,
        channel: &str,
        payload: Vec<u8>,
    ) -> Result<u64, PublishError> {
        // The server's current limit (a reloaded config may have lowered it since connect).
        let max_payload = self.client.server_info().max_payload;
        if payload.len() > max_payload {
            return Err(PublishError::TooLarge(payload.len(), max_payload));
        }
        let payload = bytes::Bytes::from(payload);
        match self.publish_once(channel, payload.clone()).await {
            Err(PublishError::Refused(e))
                if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound =>
            {
                self.stats.writable.store(false, Ordering::Relaxed);
                if self.ensure_stream().await.is_err() {
                    return Err(PublishError::Refused(e));
                }
                self.publish_once(channel, payload).await
            }
            other => other,
        }
    }

    async fn publish_once(
        &self,
        channel: &str,
        payload: bytes::Bytes,
    ) -> Result<u64, PublishError> {
        // While disconnected the client would queue the message and send it on reconnect,
        // after this post was answered 503: refuse before it is queued.
        if self.client.connection_state() != async_nats::connection::State::Connected {
            self.stats
                .refused_unavailable
                .fetch_add(1, Ordering::Relaxed);
            return Err(PublishError::Unavailable);
        }
        let sent = self
            .js
            .publish(self.subject(channel), payload.clone())
            .await;
        let ack = match sent {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match ack {
            Ok(ack) => {
                self.stats.published.fetch_add(1, Ordering::Relaxed);
                self.stats.writable.store(true, Ordering::Relaxed);
                Ok(ack.sequence)
            }
            // nats-server closes the connection on a message above its max_payload (lowered
            // by a config reload after connect); the client reconnects and learns the new
            // limit. The post was refused for its size: 413, not a 503 a sender retries.
            Err(_) if payload.len() > self.client.server_info().max_payload => {
                self.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
                let max_payload = self.client.server_info().max_payload;
                Err(PublishError::TooLarge(payload.len(), max_payload))
            }
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::TimedOut => {
                self.stats.publish_timeouts.fetch_add(1, Ordering::Relaxed);
                Err(PublishError::Timeout)
            }
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::BrokenPipe => {
                self.stats
                    .refused_unavailable
                    .fetch_add(1, Ordering::Relaxed);
                Err(PublishError::Unavailable)
            }
            Err(e) if too_large(&e) => {
                self.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
                let max_payload = self.client.server_info().max_payload;
                Err(PublishError::TooLarge(payload.len(), max_payload))
            }
            Err(e) => {
                self.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
                Err(PublishError::Refused(e))
            }
        }
    }

    /// The stream's state, creating it again (with the configured limits) when it is gone.
    async fn ensure_stream(&self) -> Result<jetstream::stream::Info, async_nats::Error> {
        match self.js.get_stream(&self.stream).await {
            Ok(stream) => Ok(stream.cached_info().clone()),
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(api)
                        if api.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                let mut created = self.js.create_stream(self.config.clone()).await?;
                warn!(
                    stream = %self.stream,
                    "the JetStream stream was missing (deleted, or NATS lost its store): \
                     created it again with this replica's limits"
                );
                Ok(created.info().await?.clone())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The stream's last sequence, if NATS answers: a Last-Event-ID above it is from a stream
    /// that was reset.
    pub(super) async fn stream_last_sequence(&self) -> Option<u64> {
        let asked = tokio::time::timeout(ACK_TIMEOUT, self.js.get_stream(&self.stream)).await;
        let Ok(Ok(stream)) = asked else { return None };
        Some(stream.cached_info().state.last_sequence)
    }

    /// Whether `/healthz` may say ok: connected (or not away longer than the grace period) and
    /// the feed has read the stream's history once. The reason when not.
    pub(super) fn health(&self) -> Result<(), String> {
        let since = self.stats.disconnected_since_ms.load(Ordering::Relaxed);
        if since != 0 {
            let away = crate::clock::age(since);
            if away > self.grace {
                return Err(format!(
                    "NATS has been unreachable for {}s (grace {}s); posts get 503 until it returns",
                    away.as_secs(),
                    self.grace.as_secs()
                ));
            }
        }
        if !self.stats.writable.load(Ordering::Relaxed) {
            return Err(format!(
                "the JetStream stream {} cannot be written (missing, and not created again \
                 yet); posts get 503",
                self.stream
            ));
        }
        if !self.stats.caught_up.load(Ordering::Relaxed) {
            return Err("still reading the channels' history from JetStream".into());
        }
        Ok(())
    }

    /// Prometheus lines of the cluster path.
    pub(super) fn render_metrics(&self, out: &mut String) {
        let s = &self.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let connected =
            u64::from(self.client.connection_state() == async_nats::connection::State::Connected);
        let mut metric = |name: &str, kind: &str, help: &str, values: &[(&str, u64)]| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (labels, value) in values {
                out.push_str(&format!("{name}{labels} {value}\n"));
            }
        };
        metric(
            "smee_relay_serve_nats_connected",
            "gauge",
            "1 while connected to NATS.",
            &[("", connected)],
        );
        metric(
            "smee_relay_serve_nats_disconnects_total",
            "counter",
            "Times the NATS connection was lost.",
            &[("", get(&s.disconnects))],
        );
        metric(
            "smee_relay_serve_nats_published_total",
            "counter",
            "Posts JetStream confirmed.",
            &[("", get(&s.published))],
        );
        metric(
            "smee_relay_serve_nats_publish_errors_total",
            "counter",
            "Posts answered 503 because they could not be stored, by reason.",
            &[
                ("{reason=\"unavailable\"}", get(&s.refused_unavailable)),
                ("{reason=\"timeout\"}", get(&s.publish_timeouts)),
                ("{reason=\"refused\"}", get(&s.publish_errors)),
            ],
        );
        metric(
            "smee_relay_serve_nats_stream_reset",
            "counter",
            "Times the stream was found reset or created anew (its copy here was dropped and read again).",
            &[("", get(&s.stream_resets))],
        );
        metric(
            "smee_relay_serve_nats_stream_writable",
            "gauge",
            "1 while the stream exists (or could be created again).",
            &[("", u64::from(s.writable.load(Ordering::Relaxed)))],
        );
        metric(
            "smee_relay_serve_nats_fed_total",
            "counter",
            "Events read from the stream into this replica.",
            &[("", get(&s.fed))],
        );
        metric(
            "smee_relay_serve_nats_stream_lag",
            "gauge",
            "Messages in the stream this replica has not read yet.",
            &[("", get(&s.lag))],
        );
        metric(
            "smee_relay_serve_nats_last_sequence",
            "gauge",
            "The last stream sequence read.",
            &[("", get(&s.last_sequence))],
        );
        metric(
            "smee_relay_serve_nats_unseen_total",
            "counter",
            "Stream sequences deleted (limits) before this replica read them.",
            &[("", get(&s.unseen))],
        );
        metric(
            "smee_relay_serve_nats_undecodable_total",
            "counter",
            "Stream messages that are not events written by serve (skipped).",
            &[("", get(&s.undecodable))],
        );
        metric(
            "smee_relay_serve_nats_feed_restarts_total",
            "counter",
            "Times the feed started its consumer again.",
            &[("", get(&s.feed_restarts))],
        );
    }
}

/// JetStream's (or the client's) refusal of a message for its size.
fn too_large(e: &jetstream::context::PublishError) -> bool {
    if e.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded {
        return true;
    }
    let text = crate::error::chain(e).to_ascii_lowercase();
    text.contains("maximum payload") || text.contains("message size exceeds maximum")
}

/// What to check when the stream could not be created, by the refusal.
fn stream_hint(e: &jetstream::context::CreateStreamError, replicas: usize) -> String {
    let text = crate::error::chain(e).to_ascii_lowercase();
    if replicas > 1
        && (text.contains("replicas") || text.contains("insufficient") || text.contains("peers"))
    {
        return format!(
            "--nats-replicas {replicas} exceeds the NATS cluster's size: a single server \
             keeps 1 copy; use at most as many as there are JetStream servers"
        );
    }
    if text.contains("timed out") || text.contains("no responders") || text.contains("not enabled")
    {
        return "is JetStream enabled: `nats-server -js`?".into();
    }
    "check the stream's limits against the account's JetStream limits".into()
}

/// Log at WARN what this replica changes in an existing stream's limits (replicas started
/// with different limit flags overwrite each other's: the last one started wins).
fn warn_changed_limits(
    name: &str,
    old: &Option<jetstream::stream::Config>,
    new: &jetstream::stream::Config,
) {
    let Some(old) = old else { return };
    let mut changes = Vec::new();
    if old.max_age != new.max_age {
        changes.push(format!(
            "max age {:?} -> {:?} (--retain)",
            old.max_age, new.max_age
        ));
    }
    if old.max_messages_per_subject != new.max_messages_per_subject {
        changes.push(format!(
            "messages per channel {} -> {} (--max-events)",
            old.max_messages_per_subject, new.max_messages_per_subject
        ));
    }
    if old.max_bytes != new.max_bytes {
        changes.push(format!(
            "bytes {} -> {} (--max-memory)",
            old.max_bytes, new.max_bytes
        ));
    }
    if old.num_replicas != new.num_replicas {
        changes.push(format!(
            "replicas {} -> {} (--nats-replicas)",
            old.num_replicas, new.num_replicas
        ));
    }
    if !changes.is_empty() {
        warn!(
            stream = %name,
            "changing the existing stream's limits, which every replica shares: {} (start every \
             replica with the same limit flags)",
            changes.join(", ")
        );
    }
}

fn on_event(stats: &NatsStats, shown: &str, event: async_nats::Event) {
    match event {
        async_nats::Event::Disconnected => {
            stats.disconnects.fetch_add(1, Ordering::Relaxed);
            let _ = stats.disconnected_since_ms.compare_exchange(
                0,
                crate::clock::now_ms().max(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            warn!(nats = %shown, "lost the connection to NATS: posts get 503 until it returns; subscribers stay connected");
        }
        async_nats::Event::Connected => {
            if stats.disconnected_since_ms.swap(0, Ordering::Relaxed) != 0 {
                info!(nats = %shown, "connected to NATS again");
            }
        }
        other => debug!(nats = %shown, "NATS: {other}"),
    }
}

/// The feed's memory of stream sequences it never saw: holes in the sequence it read (messages
/// the stream deleted by its limits before this replica reached them, including everything
/// before the first one it read). Which channels they belonged to is unknown, so a resume from
/// before a hole is told of a gap on any channel: a false alarm at worst, never silence.
#[derive(Default)]
pub(super) struct Unseen {
    /// Inclusive ranges, ascending, disjoint.
    ranges: Vec<(u64, u64)>,
}

impl Unseen {
    pub(super) fn add(&mut self, from: u64, to: u64) {
        if from > to {
            return;
        }
        self.ranges.push((from, to));
        if self.ranges.len() > MAX_UNSEEN {
            // Merge the two oldest: the range grows, so a report can only get wider.
            let (a, _) = self.ranges.remove(0);
            self.ranges[0].0 = a;
        }
    }

    /// The last unseen sequence after `seen`, if any: a resume from `seen` may have missed up
    /// to it.
    pub(super) fn after(&self, seen: u64) -> Option<u64> {
        self.ranges
            .iter()
            .rev()
            .find(|(_, to)| *to > seen)
            .map(|(_, to)| *to)
    }
}

/// How often the feed compares its position with the stream's (lag while idle, resets).
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// What the feed remembers of the stream it reads, to notice it was replaced.
#[derive(Default)]
struct Seen {
    /// The last stream sequence fed.
    last: u64,
    /// When the stream was created, as NATS says: another value means a new stream.
    created: Option<i128>,
}

/// Compare the stream with what was fed (creating it again when it is gone): the lag, and
/// whether it was reset (its sequence went back below what was fed, or it was created anew).
/// On a reset the hub drops its copy and tells its subscribers; the caller reads the stream
/// again from its start.
async fn check_stream(cluster: &Cluster, hub: &Hub, seen: &mut Seen) -> bool {
    let info = tokio::time::timeout(CHECK_EVERY, cluster.ensure_stream()).await;
    let info = match info {
        Ok(Ok(info)) => info,
        Ok(Err(e)) => {
            if cluster.stats.writable.swap(false, Ordering::Relaxed) {
                warn!(stream = %cluster.stream, "the JetStream stream is missing and cannot be created again: {e}");
            }
            return false;
        }
        Err(_) => return false,
    };
    cluster.stats.writable.store(true, Ordering::Relaxed);
    let newest = info.state.last_sequence;
    let created = info.created.unix_timestamp_nanos();
    let replaced = seen.created.is_some_and(|before| before != created);
    seen.created = Some(created);
    if newest < seen.last || replaced {
        cluster.stats.stream_resets.fetch_add(1, Ordering::Relaxed);
        warn!(
            stream = %cluster.stream,
            newest,
            fed = seen.last,
            "the stream was reset (deleted, or NATS lost its store): dropping this replica's copy \
             and reading it again; subscribers are cut and told of a gap when they resume"
        );
        hub.reset_stream(seen.last);
        // Its replay buffers are empty until the new stream is read: /healthz says so.
        cluster.stats.caught_up.store(false, Ordering::Relaxed);
        seen.last = 0;
        cluster.stats.last_sequence.store(0, Ordering::Relaxed);
        return true;
    }
    cluster
        .stats
        .lag
        .store(newest - seen.last, Ordering::Relaxed);
    false
}

/// Read the stream into `hub`, in order, until shutdown: an ordered consumer from the start
/// of the stream, started again from the next sequence whenever it fails.
pub(super) async fn feed(cluster: Arc<Cluster>, hub: Arc<Hub>) {
    let mut seen = Seen::default();
    let mut checks = tokio::time::interval(CHECK_EVERY);
    checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pause = Duration::from_millis(100);
    loop {
        let last = seen.last;
        let deliver_policy = if last == 0 {
            DeliverPolicy::All
        } else {
            DeliverPolicy::ByStartSequence {
                start_sequence: last + 1,
            }
        };
        let messages = async {
            let stream = cluster.js.get_stream_no_info(&cluster.stream).await?;
            let consumer = stream
                .create_consumer(jetstream::consumer::pull::OrderedConfig {
                    filter_subject: format!("{}.*", cluster.stream),
                    deliver_policy,
                    max_expires: FEED_EXPIRES,
                    ..Default::default()
                })
                .await?;
            Ok::<_, async_nats::Error>(consumer.messages().await?)
        };
        let mut messages = tokio::select! {
            _ = hub.shutdown.cancelled() => return,
            made = messages => match made {
                Ok(messages) => messages,
                Err(e) => {
                    debug!("cannot start reading the stream (retrying): {e}");
                    check_stream(&cluster, &hub, &mut seen).await;
                    tokio::select! {
                        _ = hub.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(2));
                    continue;
                }
            },
        };
        pause = Duration::from_millis(100);
        if last == 0 {
            // An empty stream sends nothing to wait for: caught up when it holds nothing.
            if let Ok(info) = cluster.js.get_stream(&cluster.stream).await
                && info.cached_info().state.messages == 0
            {
                let first = info.cached_info().state.first_sequence;
                hub.unseen(1, first.saturating_sub(1));
                cluster.stats.caught_up.store(true, Ordering::Relaxed);
            }
        }
        loop {
            let next = tokio::select! {
                _ = hub.shutdown.cancelled() => return,
                _ = checks.tick() => {
                    if check_stream(&cluster, &hub, &mut seen).await {
                        break;
                    }
                    continue;
                }
                next = messages.next() => next,
            };
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(e)) => {
                    debug!("reading the stream: {e}");
                    if e.kind() == jetstream::consumer::pull::OrderedErrorKind::Recreate {
                        break;
                    }
                    continue;
                }
                None => break,
            };
            let Ok(info) = message.info() else {
                cluster.stats.undecodable.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let (seq, pending) = (info.stream_sequence, info.pending);
            let last = seen.last;
            if seq <= last {
                // Only a redelivery: a stream that went back is caught by `check_stream`.
                continue;
            }
            if seq > last + 1 {
                cluster
                    .stats
                    .unseen
                    .fetch_add(seq - last - 1, Ordering::Relaxed);
                hub.unseen(last + 1, seq - 1);
            }
            seen.last = seq;
            cluster.stats.last_sequence.store(seq, Ordering::Relaxed);
            cluster.stats.lag.store(pending, Ordering::Relaxed);
            let channel = message
                .subject
                .as_str()
                .strip_prefix(&cluster.stream)
                .and_then(|rest| rest.strip_prefix('.'));
            let posted =
                channel.and_then(|_| super::store::decode(&hub.stats, seq, &message.payload));
            match (channel, posted) {
                (Some(channel), Some(posted)) => {
                    hub.insert_fed(channel, posted);
                    cluster.stats.fed.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    cluster.stats.undecodable.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        seq,
                        "skipped a stream message that is not an event posted to serve"
                    );
                }
            }
            if pending == 0 && !cluster.stats.caught_up.swap(true, Ordering::Relaxed) {
                info!(last = seq, "read the channels' history from JetStream");
            }
        }
        cluster.stats.feed_restarts.fetch_add(1, Ordering::Relaxed);
        debug!(
            last = seen.last,
            "the stream's consumer ended: starting it again from the next sequence"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_the_nats_url_are_taken_out_of_the_addresses_and_decoded() {
        let (addrs, auth) =
            parse_urls("nats://us%40r:p%3Ass@h:4222, nats://us%40r:p%3Ass@g:4223").unwrap();
        assert_eq!(
            auth,
            Some(UrlAuth::UserPassword("us@r".into(), "p:ss".into()))
        );
        assert_eq!(addrs.len(), 2);
        assert!(addrs.iter().all(|a| !a.has_user_pass()));
        let (_, auth) = parse_urls("tls://T0K@h:4222").unwrap();
        assert_eq!(auth, Some(UrlAuth::Token("T0K".into())));
        let (addrs, auth) = parse_urls("127.0.0.1:4222").unwrap();
        assert_eq!((addrs.len(), auth), (1, None));
        assert!(matches!(
            parse_urls("nats://a:b@h:1,nats://c:d@g:2"),
            Err(NatsError::Url(..))
        ));
        assert!(matches!(
            parse_urls("nats://h:1,,nats://g:2"),
            Err(NatsError::Url(..))
        ));
        let Err(e) = parse_urls("nats://u:pw@h:notaport") else {
            panic!("a bad port")
        };
        assert!(!e.to_string().contains("pw"), "{e}");
    }

    #[test]
    fn urls_lose_their_credentials() {
        assert_eq!(
            redact_url("nats://user:s3cret@h:4222, tls://tok@g:4222,nats://plain:4222"),
            "nats://***@h:4222,tls://***@g:4222,nats://plain:4222"
        );
    }

    #[test]
    fn a_resume_before_a_hole_is_told_after_it_is_not() {
        let mut unseen = Unseen::default();
        unseen.add(1, 4);
        unseen.add(10, 12);
        assert_eq!(unseen.after(0), Some(12));
        assert_eq!(unseen.after(11), Some(12));
        assert_eq!(unseen.after(12), None);
        for n in 0..(MAX_UNSEEN as u64 * 2) {
            unseen.add(100 + 3 * n, 100 + 3 * n);
        }
        assert!(unseen.ranges.len() <= MAX_UNSEEN);
        assert_eq!(unseen.after(2), Some(100 + 3 * (MAX_UNSEEN as u64 * 2 - 1)));
        assert_eq!(
            unseen.ranges[0].0, 1,
            "merging only widens the oldest range"
        );
    }
}
