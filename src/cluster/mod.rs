//! Cluster mode (`[cluster]`): relays on several machines share the work through NATS
//! JetStream. The cluster is a shared spool: this module owns the connection, the stream the
//! frames are published to, the durable consumers (one per route, shared by every instance) and
//! the KV bucket that holds the alert state.
//!
//! ```text
//! channel --SSE--> intake --> local spool, route "outbox" --publish (Nats-Msg-Id)--> stream
//! stream --durable consumer per route (one in flight)--> local spool, the route's queue --> run_route
//! ```
//!
//! Every instance subscribes to every channel and publishes every frame it receives; the
//! message id is a hash of the frame (identical on every instance), so the stream stores it
//! once. Each route's consumer has at most one message in flight cluster-wide
//! (`max_ack_pending = 1`): the instance that got it queues it on its local spool, where the
//! ordinary route (`delivery::run_route`) delivers it, and acks it on NATS only once that
//! delivery is durable (journaled). An instance that dies stops renewing its lease (progress
//! acks) and another takes the message over after the ack wait.
//!
//! What a relay produces (alerts, Port run reports) travels the same way under a key of its
//! own ([`produced_key`]): a local outbox publishes it, and the alert (reports) route is fed
//! from its consumer, so whichever instance is alive delivers it. A paced route (Slack) acks
//! only once its pace has passed since the delivery started ([`Cluster::feed_paced`]): the
//! pace holds cluster-wide.
//!
//! It must not deliver anything itself (the local routes do), nor decide what an alert is (the
//! pipeline does; this module only stores its bytes with compare-and-set).
//!
//! # The floor, and what a message costs
//!
//! Each route keeps its floor in KV (`floor.route_<hash>`): the last stream sequence delivered
//! on it. A NATS server that crashed may forget acks it confirmed (consumer state is flushed
//! lazily) and redeliver what was delivered; a message at or below the floor is acked, not
//! delivered, if the floor counts in the stream as it is now ([`floor`]: a stream an instance
//! creates anew numbers on from the old one's, see [`create_stream`], but one created by hand
//! numbers from 1 again). With one message in flight cluster-wide, a route's
//! throughput is one over the time a message takes end to end, so what a message waits on is
//! kept to what a guarantee needs ([`Cluster::handle`]):
//!
//! - **The floor is read from KV for every message**, though a first delivery (`delivered ==
//!   1`) from a server that kept its state is above every delivered message (the consumer
//!   hands messages out in stream order, one at a time). A copy cached by the feed cannot
//!   stand in for the read: a message sits in the client's buffer from the moment the server
//!   sends it, and if this instance stalls (a paused VM, swap) past the ack wait, the server
//!   gives it to another instance, which delivers it and moves the floor; the stalled copy
//!   still says `delivered == 1` when this instance gets to it. Only what NATS says after it
//!   is taken tells: the floor read, and the lease, which counts from the message's
//!   publication and asks NATS when that leaves too little ([`lease`]).
//! - **The ack goes out right behind the floor's put**, not after its confirmation (one round
//!   trip less per message). Once NATS stored the put, an ack it loses costs a redelivery the
//!   floor skips, as before. If NATS dies before storing it, the message repeats whether the
//!   ack went out or not, as before (it is the message in flight when NATS died). New is only
//!   a put NATS refuses (or does not confirm) while taking the ack: the floor is then raised
//!   again before the next message (compare-and-set, so that it never lowers a floor another
//!   instance already moved past it), and only if that fails too and NATS also forgets the
//!   ack does this one message repeat.
//! - **The local copy is committed at once** ([`SpoolWriter::commit_now`]), not after the
//!   writer's pace behind the intake's group commits; it is as durable as before (its own
//!   fsync). It cannot skip the fsync: redb refuses non-durable commits in the multi-process
//!   mode the spool is opened in (so that `smee-relay events` works beside a running relay),
//!   and the route reads its queue from the file. Keeping it durable also keeps
//!   [`hand_back`] as it is: a copy the route did not finish before a crash is found at the
//!   next start and given back to NATS, which redelivers it.
//!
//! How an event travels in a stream message (its body raw, or in the cluster's object store
//! when the message would exceed the server's `max_payload`) is in [`envelope`].
//!
//! What the cluster knows about its events (for `smee-relay events` in cluster mode) is in
//! [`inspect`]: the stream, each route's floor, and the dead letters, which the instance that
//! gave up records in KV (`dead.<route>.<stream seq>`) so every instance sees them.
//!
//! Test-only: debug builds honour `SMEE_RELAY_FAULT` ([`fault`]), which the cluster tests use
//! to stop an instance at an exact point (`abort-after-alert-state-write`: the pipeline aborts
//! the process right after a FIRING's alert-state write landed, before its local commit;
//! `abort-after-held-alert-write`: the same after a held alert's write;
//! `hold-alert-publish=<path>`: the alerts' outbox does not publish while `<path>` exists;
//! `hold-on-arrival=<path>`: a route's delivery waits before its floor read while `<path>`
//! exists, as it does when the network stalls as the delivery arrives;
//! `slow-body-fetch=<ms>`: each fetch of a body stored apart takes that much longer, as on a
//! slow link). Release builds have no such hook.

mod diagnose;
mod envelope;
mod fingerprint;
mod floor;
mod lease;
mod neighbours;
pub use diagnose::paced;
pub mod inspect;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, kv, stream};
use bytes::Bytes;
use futures::StreamExt as _;
use sha2::Digest as _;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::event::Event;
use crate::secret::{ExposeSecret as _, SecretString};
use crate::spool::writer::SpoolWriter;
use crate::spool::{Outcome, Spool, Write};
pub use envelope::PublishError;
use envelope::{Envelope, OpenError};
pub use fingerprint::fingerprint as config_fingerprint;
use floor::Floor;

/// How long a stopping route still waits for NATS to take the ack of a delivery it finished
/// (the floor's write, the ack): enough for a NATS that answers, well within the shutdown's
/// bound for one that does not.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// How many messages each pull asks for. One is in flight per route cluster-wide whatever
/// this is (`max_ack_pending = 1`); more keeps a request waiting at the server.
const PULL_BATCH: usize = 4;

/// The local spool route a channel's frames wait on until they are published.
pub fn outbox_route(channel_key: &str) -> String {
    crate::spool::route_key(channel_key, "nats-outbox")
}

/// Whether a local spool route is a cluster outbox (never delivered by a consumer).
pub fn is_outbox(route: &str) -> bool {
    crate::spool::route_name(route) == "nats-outbox"
}

/// The key under which what this relay produces for route `route` (alerts, Port run reports)
/// is published: its stream subject and its local outbox derive from it, as a channel's do from
/// the channel's key. Channel keys are hashes of URLs, so the two never meet.
pub fn produced_key(route: &str) -> String {
    format!("produced/{route}")
}

/// The message id of something produced (an alert, a Port report) that its producer did not
/// name itself: the local event's id and receive time name it, so the outbox re-publishing it
/// (an ack lost, a restart) stores it once. Producers that can name what produced it across
/// instances (the pipeline: the alert-state revision its compare-and-set moved from) put
/// that name in the event's `sse_id`, and the id is then the frame's own ([`message_id`]).
pub fn produced_message_id(key: &str, event: &Event, local_id: u64, received_ms: u64) -> String {
    if event.sse_id.is_some() {
        return message_id(key, event);
    }
    let mut hash = sha2::Sha256::new();
    hash.update(message_id(key, event).as_bytes());
    hash.update(local_id.to_be_bytes());
    hash.update(received_ms.to_be_bytes());
    hex::encode(hash.finalize())
}

/// Test-only fault injection, in debug builds only (see the module header): the argument of
/// `SMEE_RELAY_FAULT` when it names `fault` (`fault` alone: an empty argument).
#[cfg(debug_assertions)]
pub fn fault(fault: &str) -> Option<String> {
    let value = std::env::var("SMEE_RELAY_FAULT").ok()?;
    match value.split_once('=') {
        Some((name, arg)) if name == fault => Some(arg.to_string()),
        None if value == fault => Some(String::new()),
        _ => None,
    }
}

/// `[cluster]`: where NATS is and how this relay joins it.
#[derive(Clone)]
pub struct Settings {
    /// `nats://host:4222` (may hold a user and password: a secret).
    pub url: SecretString,
    /// Relays with the same name share the stream, the consumers and the alert state.
    pub name: String,
    /// A NATS credentials file (JWT and nkey seed), if the server wants one.
    pub credentials: Option<PathBuf>,
    /// A CA bundle (PEM) to trust for `tls://` servers, beyond the system roots.
    pub ca: Option<PathBuf>,
    /// How long a route's message in flight may go without news from the instance holding it
    /// before another instance takes it over (the failover time).
    pub ack_wait: Duration,
    /// How long NATS may be unreachable before `/healthz` fails.
    pub health_grace: Duration,
    /// How far apart two instances' copies of one frame may be published and still be stored
    /// once (JetStream's duplicate window).
    pub dedupe_window: Duration,
    /// How long the stream keeps frames (consumers further behind than this lose them).
    pub max_age: Duration,
    /// Copies of the stream and the KV bucket across NATS servers: 3 on a 3-node NATS
    /// cluster, so losing one server loses no frame, ack or alert state.
    pub replicas: usize,
    /// The config file the relay runs (`run --config`), absolute: the commands its logs
    /// suggest name it, or `smee-relay events` would not know which cluster to ask.
    pub config_file: Option<PathBuf>,
}

impl Settings {
    /// The defaults for a URL and name.
    pub fn new(url: SecretString, name: String) -> Settings {
        Settings {
            url,
            name,
            credentials: None,
            ca: None,
            ack_wait: Duration::from_secs(30),
            health_grace: Duration::from_secs(30),
            dedupe_window: Duration::from_secs(2 * 3600),
            max_age: Duration::from_secs(7 * 24 * 3600),
            replicas: 1,
            config_file: None,
        }
    }

    /// The URL for logs: the password, if any, redacted.
    pub fn shown_url(&self) -> String {
        redact_url(self.url.expose_secret())
    }

    /// What a command the logs suggest (`smee-relay events replay N`) needs to find this
    /// cluster: ` --config FILE`, or nothing when the relay runs without a file.
    pub fn events_args(&self) -> String {
        self.config_file
            .as_ref()
            .map(|file| format!(" --config {}", file.display()))
            .unwrap_or_default()
    }
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("url", &self.shown_url())
            .field("name", &self.name)
            .field("credentials", &self.credentials)
            .field("ca", &self.ca)
            .field("ack_wait", &self.ack_wait)
            .finish_non_exhaustive()
    }
}

/// `nats://user:secret@host` -> `nats://user:***@host`; a token alone (`nats://tok@host`)
/// is hidden whole.
fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|url| redact_one(url.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

fn redact_one(url: &str) -> String {
    if url.is_empty() {
        // No URL yet (`events` asks for one with --nats-url): nothing to show.
        return String::new();
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        // Shown as the client reads it (`check` said `at x` for `NATS_URL=x`, which is a
        // host name): `nats://`, and port 4222 when none is given.
        let default_port = reqwest::Url::parse(&format!("nats://{url}"))
            .is_ok_and(|parsed| parsed.port().is_none() && parsed.host_str().is_some());
        let port = if default_port { ":4222" } else { "" };
        return redact_one(&format!("nats://{url}{port}"));
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some(split) => split,
        None => return url.to_string(),
    };
    let auth = match auth.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_string(),
    };
    format!("{scheme}://{auth}@{host}")
}

/// What stops the cluster from starting.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot read the NATS credentials file {0}")]
    Credentials(PathBuf, #[source] std::io::Error),
    /// The URL, and a hint chosen from the error (see `diagnose`).
    #[error("cannot connect to NATS at {0}{1}")]
    Connect(String, &'static str, #[source] async_nats::ConnectError),
    /// The stream's name, and a hint chosen from what NATS said.
    #[error("cannot create the JetStream stream {0}{1}")]
    Stream(String, String, #[source] async_nats::Error),
    /// The bucket's name, and a hint chosen from what NATS said.
    #[error("cannot create the JetStream KV bucket {0}{1}")]
    Bucket(String, String, #[source] async_nats::Error),
    /// The URL (redacted) and why it is not one.
    #[error("invalid NATS URL {0}: {1}")]
    Url(String, &'static str),
    #[error("invalid cluster name {0:?}: use letters, digits, '-' and '_'")]
    Name(String),
    #[error(
        "no cluster {0:?} on this NATS ({1} not found): is [cluster] name (or `events --cluster NAME`) the relays' name, and have they run?"
    )]
    NoCluster(String, String, #[source] async_nats::Error),
    /// The key, its value in the cluster, this instance's value, what to do; what NATS said.
    #[error("cannot change the cluster's {0} from {1} to this instance's {2}{3}")]
    Adopt(
        &'static str,
        String,
        String,
        String,
        #[source] async_nats::Error,
    ),
    /// The stream's duplicate window and the ack wait, as they hold after joining.
    #[error(
        "the cluster's dedupe_window ({0}) is shorter than its ack_wait ({1}) plus {margin}: an \
         alert re-sent after a takeover would be stored twice; set dedupe_window to at least \
         ack_wait plus {margin} in [cluster] on every instance",
        margin = humantime::format_duration(DEDUPE_MARGIN)
    )]
    Dedupe(String, String),
}

/// Credentials a NATS URL carried in its userinfo.
#[derive(Debug, PartialEq)]
pub enum UrlAuth {
    /// `nats://user:password@host`.
    UserPassword(String, String),
    /// `nats://TOKEN@host`.
    Token(String),
}

/// NATS URLs (comma-separated), split: the servers without their userinfo (so the client never
/// logs a password with the address), and the credentials, given to the client as options (it
/// does not send a URL's own userinfo). `Err`: why the text is not one, for a message that
/// shows the URL redacted.
pub fn split_urls(
    urls: &str,
) -> Result<(Vec<async_nats::ServerAddr>, Option<UrlAuth>), &'static str> {
    let bad = |why: &'static str| why;
    let decode = |part: &str| {
        percent_encoding::percent_decode_str(part)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| bad("its user or password is not UTF-8 once percent-decoded"))
    };
    let mut addrs = Vec::new();
    let mut auth: Option<UrlAuth> = None;
    for one in urls.split(',').map(str::trim) {
        if one.is_empty() {
            return Err(bad(
                "a server in the list is empty (comma-separate nats://HOST:PORT)",
            ));
        }
        let (scheme, rest) = match one.split_once("://") {
            Some((scheme, rest)) => (Some(scheme), rest),
            None => (None, one),
        };
        let (userinfo, host) = match rest.rsplit_once('@') {
            Some((userinfo, host)) => (Some(userinfo), host),
            None => (None, rest),
        };
        if let Some(userinfo) = userinfo {
            let this = match userinfo.split_once(':') {
                Some((user, password)) => UrlAuth::UserPassword(decode(user)?, decode(password)?),
                None => UrlAuth::Token(decode(userinfo)?),
            };
            match &auth {
                Some(earlier) if *earlier != this => {
                    return Err(bad(
                        "its servers carry different credentials; give them once",
                    ));
                }
                _ => auth = Some(this),
            }
        }
        let bare = match scheme {
            Some(scheme) => format!("{scheme}://{host}"),
            None => host.to_string(),
        };
        let addr = bare
            .parse::<async_nats::ServerAddr>()
            .map_err(|_| bad("not a server address (nats://HOST:PORT, tls://HOST:PORT)"))?;
        addrs.push(addr);
    }
    Ok((addrs, auth))
}

/// A JetStream operation that failed (the caller retries).
#[derive(Debug, thiserror::Error)]
#[error("NATS: {0}")]
pub struct NatsError(#[source] pub async_nats::Error);

/// Live figures for `/metrics`, `/healthz` and STATUS=.
#[derive(Default)]
pub struct ClusterStatus {
    /// Whether the connection is up.
    pub connected: AtomicBool,
    /// When it went down (ms since the epoch), 0 while up.
    pub down_since_ms: AtomicU64,
    /// When it last came back (ms since the epoch), 0 if it never went down.
    pub back_at_ms: AtomicU64,
    /// Per route (display name): when this instance last took a message of it (ms).
    pub delivering: Mutex<HashMap<String, u64>>,
}

impl ClusterStatus {
    /// Whether the connection is up and came back within the last 10 s: a consumer's missed
    /// heartbeat said now is the outage's, not a new one.
    fn just_back(&self, now_ms: u64) -> bool {
        let back = self.back_at_ms.load(Ordering::Relaxed);
        self.connected.load(Ordering::Relaxed) && back != 0 && now_ms.saturating_sub(back) < 10_000
    }
}

/// The stream of cluster `name`: what its instances publish frames to.
fn stream_name(name: &str) -> String {
    format!("SMEE_{name}")
}

/// The stream as an instance with `settings` creates it.
fn stream_config(settings: &Settings) -> stream::Config {
    stream::Config {
        name: stream_name(&settings.name),
        subjects: vec![format!("smee.{}.>", settings.name)],
        storage: stream::StorageType::File,
        duplicate_window: settings.dedupe_window,
        max_age: settings.max_age,
        num_replicas: settings.replicas,
        ..Default::default()
    }
}

/// The subject cluster `cluster` publishes the frames of the channel with key `channel_key` on
/// (the key hashed: it holds the channel id, a secret, and has characters a subject cannot).
/// The hash is the same in every cluster ([`neighbours`]).
fn channel_subject(cluster: &str, channel_key: &str) -> String {
    format!("smee.{cluster}.ch.{}", short_hash(channel_key))
}

/// Create the cluster's stream, numbering its messages on from stream sequence `after` (0:
/// from 1). A stream deleted (`nats stream rm`) and created anew numbered from 1 again, so
/// its events took the ids (`x-smee-relay-delivery`), dead letters and attempt records of
/// the old stream's (helper-151: a target dropping repeats by id dropped new events).
/// Another instance creating it at the same moment, from what it knew, wins: its stream is
/// taken as it is. Returns the stream and whether this call created it.
async fn create_stream(
    js: &jetstream::Context,
    settings: &Settings,
    after: u64,
) -> Result<(stream::Stream, bool), jetstream::context::CreateStreamError> {
    let mut config = stream_config(settings);
    config.first_sequence = (after > 0).then(|| after + 1);
    let name = config.name.clone();
    if let Ok(stream) = js.get_stream(&name).await {
        return Ok((stream, false));
    }
    match js.create_stream(config).await {
        Ok(stream) => Ok((stream, true)),
        Err(e) => js
            .get_stream(&name)
            .await
            .map(|s| (s, false))
            .map_err(|_| e),
    }
}

/// Say that the cluster's stream was gone and is there anew, numbering from `stream`'s first
/// sequence: a WARN from the instance that created it (`here`), what the old one held
/// undelivered being lost; an INFO from the others (helper-154: every instance said it
/// created the stream).
fn say_created_anew(stream: &stream::Stream, here: bool) {
    let info = stream.cached_info();
    let first = info.config.first_sequence.unwrap_or(1);
    if here {
        warn!(
            "the cluster's stream {} was gone (deleted, or NATS lost its data): it is created anew, numbering on from sequence {first}; what it held undelivered is gone with it",
            info.config.name
        );
    } else {
        info!(
            "the cluster's stream {} was gone (deleted, or NATS lost its data); another instance created it anew, numbering on from sequence {first}",
            info.config.name
        );
    }
}

/// The highest sequence a target may have seen delivered, by the routes' floors in `kv` (0:
/// no floor, or KV cannot say): what a stream created anew numbers on from. A floor is
/// written after its delivery, so an instance killed in between delivered one sequence above
/// its route's floor (a route delivers one at a time). Floors of an earlier stream count
/// too: their numbers were given to events already.
async fn highest_floor(kv: &kv::Store) -> u64 {
    let Ok(keys) = kv.keys().await else {
        return 0;
    };
    let keys: Vec<String> = keys
        .filter_map(|key| std::future::ready(key.ok()))
        .filter(|key| std::future::ready(key.starts_with("floor.")))
        .collect()
        .await;
    let mut highest = 0;
    for key in keys {
        if let Ok(Some(value)) = kv.get(&key).await
            && let Some(floor) = Floor::parse(&value)
        {
            highest = highest.max(floor.seq.saturating_add(1));
        }
    }
    highest
}

/// A connection to the cluster.
#[derive(Clone)]
pub struct Cluster {
    js: jetstream::Context,
    client: async_nats::Client,
    stream_name: String,
    settings: Arc<Settings>,
    kv: kv::Store,
    /// The object store bucket holding bodies too large for one message ([`envelope`]).
    bodies: jetstream::object_store::ObjectStore,
    pub status: Arc<ClusterStatus>,
    /// Per local route, the cluster delivery it is delivering now and the id targets see for
    /// it in `x-smee-relay-delivery` (see [`Cluster::delivery_id`]).
    in_flight: Arc<Mutex<HashMap<String, InFlight>>>,
    /// Told whenever a lease in `in_flight` changes ([`lease`]): routes waiting to attempt
    /// a cluster delivery look again.
    leases: Arc<tokio::sync::Notify>,
    /// Other clusters on this NATS relaying this instance's channels ([`neighbours`]).
    neighbours: neighbours::Shared,
    /// How many routes of this instance wait for their consumer: while any does, nothing is
    /// published ([`Cluster::publish_as`]), so a route whose consumer is new (it starts after
    /// the stream's last message) misses nothing this instance receives after the route began.
    starting: Arc<tokio::sync::watch::Sender<usize>>,
    /// The creation time of the stream as this instance last saw it (ns since the epoch; 0:
    /// not known), which the floors it writes name ([`floor`]).
    stream_created: Arc<AtomicU64>,
    /// The highest stream sequence this instance has seen (published, taken, or read as the
    /// stream's last): a stream created anew numbers on from it ([`Cluster::stream_gone`]).
    stream_last: Arc<AtomicU64>,
}

/// How much longer than `ack_wait` the cluster's `dedupe_window` must be: a minute for what a
/// takeover takes beyond the ack wait (reading the judgement back, committing, publishing),
/// and at least another during which the other instances re-send a held alert's or a
/// reconciliation's recorded alerts (the pipeline re-sends a record only while it is younger
/// than `dedupe_window` less `ack_wait` and a minute; instances read moved shards every
/// second). With one minute alone that re-send window was empty: a held FIRING whose writer
/// died right after its write was never sent.
pub const DEDUPE_MARGIN: Duration = Duration::from_secs(120);

/// What every instance must share, said with each change.
const SAME_EVERYWHERE: &str = "every instance of the cluster must use the same [cluster] settings";

/// Join an existing stream: the cluster's settings are what its stream (dedupe_window,
/// max_age, replicas) and its route consumers (ack_wait) hold. Where this instance's
/// `[cluster]` differs, its values replace them (a rolling restart with a new config takes
/// effect), each change logged once with the old and new value; then the stream's window
/// must still cover the ack wait (it does, both being this instance's, unless NATS kept
/// another). A change NATS refuses stops the start, with what to do.
async fn adopt_settings(
    js: &jetstream::Context,
    mut existing: stream::Stream,
    settings: &Settings,
) -> Result<(), ClusterError> {
    let show = |d: Duration| humantime::format_duration(d).to_string();
    let current = existing.cached_info().config.clone();
    let mut changed = current.clone();
    let mut changes: Vec<(&'static str, String, String)> = Vec::new();
    if current.duplicate_window != settings.dedupe_window {
        changes.push((
            "dedupe_window",
            show(current.duplicate_window),
            show(settings.dedupe_window),
        ));
        changed.duplicate_window = settings.dedupe_window;
    }
    if current.max_age != settings.max_age {
        changes.push(("max_age", show(current.max_age), show(settings.max_age)));
        changed.max_age = settings.max_age;
    }
    if current.num_replicas != settings.replicas {
        changes.push((
            "replicas",
            current.num_replicas.to_string(),
            settings.replicas.to_string(),
        ));
        changed.num_replicas = settings.replicas;
    }
    if !changes.is_empty() {
        let updated = js.update_stream(changed).await.map_err(|e| {
            let (key, old, new) = changes.last().cloned().expect("not empty");
            let keys: Vec<&str> = changes.iter().map(|(k, ..)| *k).collect();
            let mut hint = diagnose::stream_hint(&e.kind(), settings.replicas);
            hint.push_str(&format!(
                " (NATS refused the change of {}: set [cluster] {} back to the cluster's value \
                 on this instance, {}, or change it where NATS allows it)",
                keys.join(", "),
                keys.join(", "),
                changes
                    .iter()
                    .map(|(k, old, _)| format!("{k} = {old}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            ClusterError::Adopt(key, old, new, hint, e.into())
        })?;
        for (key, old, new) in &changes {
            warn!(
                "[cluster] {key} was {old} in the cluster, this instance's config says {new}: \
                 applied ({SAME_EVERYWHERE})"
            );
        }
        let name = updated.config.name;
        existing = js
            .get_stream(&name)
            .await
            .map_err(|e| ClusterError::Stream(name.clone(), String::new(), e.into()))?;
    }
    // The route consumers' ack wait (`route_<hash>`, see `Cluster::consumer`).
    let mut consumers = existing.consumers();
    let mut old_waits: Vec<Duration> = Vec::new();
    while let Some(info) = consumers.next().await {
        let info = info.map_err(|e| {
            ClusterError::Adopt(
                "ack_wait",
                "?".into(),
                show(settings.ack_wait),
                String::new(),
                e.into(),
            )
        })?;
        if !info.name.starts_with("route_") || info.config.ack_wait == settings.ack_wait {
            continue;
        }
        let old = info.config.ack_wait;
        existing
            .update_consumer(consumer::Config {
                ack_wait: settings.ack_wait,
                ..info.config.clone()
            })
            .await
            .map_err(|e| {
                ClusterError::Adopt(
                    "ack_wait",
                    show(old),
                    show(settings.ack_wait),
                    String::new(),
                    e.into(),
                )
            })?;
        if !old_waits.contains(&old) {
            old_waits.push(old);
        }
    }
    if !old_waits.is_empty() {
        let old: Vec<String> = old_waits.into_iter().map(show).collect();
        warn!(
            "[cluster] ack_wait was {} in the cluster, this instance's config says {}: applied \
             ({SAME_EVERYWHERE})",
            old.join(" and "),
            show(settings.ack_wait)
        );
    }
    let window = existing
        .get_info()
        .await
        .map_or(settings.dedupe_window, |i| i.config.duplicate_window);
    if window < settings.ack_wait + DEDUPE_MARGIN {
        return Err(ClusterError::Dedupe(show(window), show(settings.ack_wait)));
    }
    Ok(())
}

/// Says a route's consumer lag (and redeliveries) every 5 s while it lives: also while a
/// delivery takes long (helper-136: the instance stuck retrying a delivery said 0, the gauge
/// set when it took the message and not since). Stopped when dropped.
struct LagWatch(tokio::task::JoinHandle<()>);

impl LagWatch {
    fn start(consumer: consumer::PullConsumer, label: String) -> LagWatch {
        LagWatch(tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                every.tick().await;
                if let Ok(info) = consumer.get_info().await {
                    metrics::gauge!("smee_relay_cluster_consumer_lag", "route" => label.clone())
                        .set((info.num_pending + info.num_ack_pending as u64) as f64);
                    metrics::gauge!("smee_relay_cluster_consumer_redelivered", "route" => label.clone())
                        .set(info.num_redelivered as f64);
                }
            }
        }))
    }
}

impl Drop for LagWatch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sets a route's consumer lag to 0 when dropped: the route ended on this instance.
struct LagZero(String);

impl Drop for LagZero {
    fn drop(&mut self) {
        metrics::gauge!("smee_relay_cluster_consumer_lag", "route" => self.0.clone()).set(0.0);
    }
}

impl Cluster {
    /// Connect, and create the stream and the KV bucket if they do not exist. Fails (and the
    /// daemon exits 2) if NATS is unreachable now.
    pub async fn connect(settings: Settings) -> Result<Cluster, ClusterError> {
        Cluster::join(settings, true).await
    }

    /// Connect to a cluster that exists (for `smee-relay events`): a mistyped name is an
    /// error, not a new empty stream.
    pub async fn open(settings: Settings) -> Result<Cluster, ClusterError> {
        Cluster::join(settings, false).await
    }

    async fn join(settings: Settings, create: bool) -> Result<Cluster, ClusterError> {
        if settings.name.is_empty()
            || !settings
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ClusterError::Name(settings.name.clone()));
        }
        let status = Arc::new(ClusterStatus::default());
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("smee-relay/{}", settings.name))
            .connection_timeout(Duration::from_secs(5));
        if let Some(path) = &settings.credentials {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| ClusterError::Credentials(path.clone(), e))?;
        }
        if let Some(ca) = &settings.ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        let events = status.clone();
        // One client error a minute while NATS stays away (the client retries every ~2 s).
        let repeats = Arc::new(Mutex::new(diagnose::Repeats::default()));
        options = options.event_callback(move |event| {
            let status = events.clone();
            let repeats = repeats.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        repeats.lock().unwrap_or_else(|p| p.into_inner()).reset();
                        diagnose::calm();
                        if !status.connected.swap(true, Ordering::Relaxed) {
                            info!("NATS connection is back");
                            status.back_at_ms.store(crate::clock::now_ms(), Ordering::Relaxed);
                        }
                        status.down_since_ms.store(0, Ordering::Relaxed);
                    }
                    async_nats::Event::Disconnected => {
                        status.connected.store(false, Ordering::Relaxed);
                        let _ = status.down_since_ms.compare_exchange(
                            0,
                            crate::clock::now_ms(),
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                        warn!("NATS connection lost; receipts stay in the local spool until it returns");
                    }
                    async_nats::Event::ClientError(e) => {
                        let line = repeats
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .note(&format!("client error: {e}"), std::time::Instant::now());
                        if let Some(line) = line {
                            info!("NATS: {line}");
                        }
                    }
                    other => info!("NATS: {other}"),
                }
            }
        });
        let shown = settings.shown_url();
        // `nats://a:4222,nats://b:4222`: the client fails over between the servers. A URL's
        // user and password (or token) go to the client as options: it does not send a URL's
        // own userinfo.
        let (servers, auth) = split_urls(settings.url.expose_secret())
            .map_err(|why| ClusterError::Url(shown.clone(), why))?;
        match auth {
            Some(UrlAuth::UserPassword(user, password)) => {
                options = options.user_and_password(user, password);
            }
            Some(UrlAuth::Token(token)) => options = options.token(token),
            None => {}
        }
        let client = options
            .connect(servers)
            .await
            .map_err(|e| ClusterError::Connect(shown.clone(), diagnose::connect_hint(&e), e))?;
        status.connected.store(true, Ordering::Relaxed);
        let js = jetstream::new(client.clone());
        let stream_name = stream_name(&settings.name);
        if !create {
            js.get_stream(&stream_name).await.map_err(|e| {
                ClusterError::NoCluster(settings.name.clone(), stream_name.clone(), e.into())
            })?;
        }
        let bucket = format!("smee_{}_alerts", settings.name);
        let kv = match js.get_key_value(&bucket).await {
            Ok(kv) => kv,
            Err(e) if !create => {
                return Err(ClusterError::NoCluster(
                    settings.name.clone(),
                    bucket.clone(),
                    e.into(),
                ));
            }
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: bucket.clone(),
                    history: 1,
                    storage: stream::StorageType::File,
                    num_replicas: settings.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    let hint = diagnose::bucket_hint(&e, settings.replicas);
                    ClusterError::Bucket(bucket.clone(), hint, e.into())
                })?,
        };
        match js.get_stream(&stream_name).await {
            // An instance joining (not a command reading): the cluster's settings are what
            // the stream and the consumers hold; this instance's `[cluster]` replaces them.
            Ok(existing) if create => {
                adopt_settings(&js, existing, &settings).await?;
            }
            Ok(_) => {}
            // A first start, or the stream deleted since the last: numbered on from the
            // floors the KV bucket kept (see `create_stream`).
            Err(_) => {
                let after = highest_floor(&kv).await;
                let (stream, here) = create_stream(&js, &settings, after).await.map_err(|e| {
                    let hint = diagnose::stream_hint(&e.kind(), settings.replicas);
                    ClusterError::Stream(stream_name.clone(), hint, e.into())
                })?;
                // Floors in KV: the cluster ran before, and its stream is gone (helper-154:
                // a start that created it anew said nothing of what was lost with it).
                if after > 0 {
                    say_created_anew(&stream, here);
                }
            }
        }
        let bodies =
            envelope::bodies_bucket(&js, &settings.name, settings.max_age, settings.replicas)
                .await
                .map_err(|e| {
                    let hint = diagnose::bucket_hint(&*e, settings.replicas);
                    ClusterError::Bucket(envelope::bucket_name(&settings.name), hint, e)
                })?;
        if create {
            info!(nats = %shown, cluster = %settings.name, "joined the cluster");
        } else {
            // A command reading the cluster (`events`): its output is what it prints.
            tracing::debug!(nats = %shown, cluster = %settings.name, "joined the cluster");
        }
        let cluster = Cluster {
            js,
            client,
            stream_name,
            settings: Arc::new(settings),
            kv,
            bodies,
            status,
            in_flight: Default::default(),
            leases: Default::default(),
            neighbours: Default::default(),
            starting: Arc::new(tokio::sync::watch::channel(0).0),
            stream_created: Default::default(),
            stream_last: Default::default(),
        };
        cluster.stream_now().await;
        Ok(cluster)
    }

    /// The stream's creation time and last sequence, asked of NATS (and kept for the floors
    /// this instance writes); None when NATS cannot say.
    async fn stream_now(&self) -> Option<(u64, u64)> {
        let stream = self.js.get_stream(&self.stream_name).await.ok()?;
        let info = stream.cached_info();
        let created = floor::created_ns(info);
        self.stream_created.store(created, Ordering::Relaxed);
        self.saw_seq(info.state.last_sequence);
        Some((created, info.state.last_sequence))
    }

    /// Note stream sequence `seq` as seen (see `stream_last`).
    pub(crate) fn saw_seq(&self, seq: u64) {
        self.stream_last.fetch_max(seq, Ordering::Relaxed);
    }

    /// A publish found no stream: it was deleted (`nats stream rm`) or lost with NATS's data
    /// while this instance ran. Created anew, as a start would, and said (helper-148: every
    /// running instance's outbox retried "no stream found" for ever at INFO). The routes'
    /// consumers come back with it ([`Cluster::consumer`]), and their floors of the old
    /// stream count as none ([`floor`]).
    pub(crate) async fn stream_gone(&self) {
        let after = self
            .stream_last
            .load(Ordering::Relaxed)
            .max(highest_floor(&self.kv).await);
        match create_stream(&self.js, &self.settings, after).await {
            Ok((stream, here)) => {
                self.stream_created
                    .store(floor::created_ns(stream.cached_info()), Ordering::Relaxed);
                say_created_anew(&stream, here);
            }
            Err(e) => {
                let hint = diagnose::stream_hint(&e.kind(), self.settings.replicas);
                warn!(
                    "the cluster's stream {} is gone (deleted, or NATS lost its data), and cannot be created anew: {}; receipts wait in the local outbox",
                    self.stream_name,
                    crate::error::chain(&ClusterError::Stream(
                        self.stream_name.clone(),
                        hint,
                        e.into()
                    ))
                );
            }
        }
    }

    /// Whether `floor`, read from KV, counts in the stream as it is now. One of an earlier
    /// stream (deleted and created anew) is said, and counts as none: its route's next
    /// delivery writes a floor of the new stream over it ([`floor`]). When NATS cannot say,
    /// it counts, as before floors named their stream.
    async fn floor_counts(&self, label: &str, floor: &Floor) -> bool {
        let Some((created, last)) = self.stream_now().await else {
            return true;
        };
        if floor.of_stream(created, last) {
            return true;
        }
        warn!(
            route = %label,
            "the route's delivered floor (stream sequence {}) is of an earlier stream {}: the stream was created anew (deleted, or NATS lost its data), and its sequences started again below the floor (it was created by hand, or with NATS's data lost); the floor starts over with it. What the old stream held undelivered is gone with it",
            floor.seq,
            self.stream_name
        );
        false
    }

    /// The creation time of the stream for a floor to name: learnt again from NATS when a
    /// floor read names another (the stream was created anew since this instance last saw).
    async fn floor_stream(&self, read: Option<&Floor>) -> u64 {
        let known = self.stream_created.load(Ordering::Relaxed);
        if read.and_then(|f| f.stream).is_some_and(|s| s != known) || known == 0 {
            self.stream_now().await;
        }
        self.stream_created.load(Ordering::Relaxed)
    }

    /// The `x-smee-relay-delivery` of the cluster delivery `event` on local `route`, if it is
    /// one: the cluster's name, the route and the stream sequence, so it is the same on every
    /// instance (a target can drop the one repeat a failover may make) and new for a replay
    /// (a new stream sequence).
    pub fn delivery_id(&self, route: &str, event: &Event) -> Option<String> {
        let in_flight = self.in_flight.lock().expect("not poisoned");
        // Compared whole: anything else queued on the route locally keeps its local id.
        in_flight
            .get(route)
            .filter(|taken| taken.event == *event)
            .map(|taken| taken.delivery_id.clone())
    }

    /// The stream sequence of the cluster delivery `event` on local `route`, if it is one.
    pub fn stream_seq(&self, route: &str, event: &Event) -> Option<u64> {
        let in_flight = self.in_flight.lock().expect("not poisoned");
        in_flight
            .get(route)
            .filter(|taken| taken.event == *event)
            .map(|taken| taken.seq)
    }

    /// Told by local `route`'s target that an attempt at `event` starts now: a paced route's
    /// ack waits until the pace has passed since the last attempt started ([`Paced`]).
    pub fn attempt_started(&self, route: &str, event: &Event) {
        let mut in_flight = self.in_flight.lock().expect("not poisoned");
        if let Some(taken) = in_flight
            .get_mut(route)
            .filter(|taken| taken.event == *event)
        {
            taken.started = Some(tokio::time::Instant::now());
        }
    }

    /// Told by local `route`'s target of each attempt at `event`: `Err` holds the target's
    /// status, if it answered, and why it failed. A cluster delivery that the route finishes
    /// after a failed attempt was given up on: [`Cluster::feed`] records it as a dead letter.
    pub fn attempted(
        &self,
        route: &str,
        event: &Event,
        outcome: Result<(), (Option<u16>, String)>,
    ) {
        let mut in_flight = self.in_flight.lock().expect("not poisoned");
        if let Some(taken) = in_flight
            .get_mut(route)
            .filter(|taken| taken.event == *event)
        {
            taken.attempts += 1;
            taken.failed = outcome.err();
            // For `events list` on any instance (a put per failed attempt: retries are paced
            // by their backoff). Not waited on: a lost record only leaves the list less said.
            if let Some((status, error)) = &taken.failed {
                let trying = inspect::Trying {
                    stream_seq: taken.seq,
                    attempts: taken.attempts,
                    status: *status,
                    error: error.clone(),
                };
                if let Ok(value) = serde_json::to_vec(&trying) {
                    let (kv, key) = (self.kv.clone(), inspect::trying_key(&short_hash(route)));
                    tokio::spawn(async move {
                        let put = kv.put(key, value.into());
                        let _ = tokio::time::timeout(Duration::from_secs(5), put).await;
                    });
                }
            }
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The subject a channel's frames are published on (the channel's key hashed: it holds
    /// the channel id, a secret, and has characters a subject cannot).
    pub fn subject(&self, channel_key: &str) -> String {
        channel_subject(&self.settings.name, channel_key)
    }

    /// Publish one received frame, stored once however many instances publish it (within the
    /// dedupe window). Returns whether the stream already had it.
    pub async fn publish(
        &self,
        channel_key: &str,
        channel: &str,
        event: &Event,
        received_ms: u64,
    ) -> Result<bool, PublishError> {
        self.publish_as(
            channel_key,
            message_id(channel_key, event),
            channel,
            event,
            received_ms,
        )
        .await
    }

    /// Publish under message id `id` (what [`Cluster::publish`] does with the frame's own).
    pub async fn publish_as(
        &self,
        channel_key: &str,
        id: String,
        channel: &str,
        event: &Event,
        received_ms: u64,
    ) -> Result<bool, PublishError> {
        // The routes started with this instance (or a reload) have their consumers first.
        let _ = self.starting.subscribe().wait_for(|n| *n == 0).await;
        let envelope = Envelope {
            channel: channel.to_string(),
            received_ms,
            event: event.clone(),
            replay_of: None,
        };
        let ack = self
            .publish_envelope(self.subject(channel_key), id, &envelope)
            .await?;
        Ok(ack.duplicate)
    }

    /// Why `/healthz` should fail, if NATS has been unreachable for longer than the grace.
    pub fn problem(&self) -> Option<String> {
        let since = self.status.down_since_ms.load(Ordering::Relaxed);
        if since == 0 || self.status.connected.load(Ordering::Relaxed) {
            return None;
        }
        let down = Duration::from_millis(crate::clock::now_ms().saturating_sub(since));
        (down > self.settings.health_grace).then(|| {
            format!(
                "NATS at {} unreachable for {} (grace {})",
                self.settings.shown_url(),
                humantime::format_duration(Duration::from_secs(down.as_secs())),
                humantime::format_duration(self.settings.health_grace)
            )
        })
    }

    /// The routes (display names) this instance took a message of within `recent`.
    pub fn delivering(&self, recent: Duration) -> Vec<String> {
        let now = crate::clock::now_ms();
        let mut routes: Vec<String> = self
            .status
            .delivering
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|(_, at)| now.saturating_sub(**at) <= recent.as_millis() as u64)
            .map(|(route, _)| route.clone())
            .collect();
        routes.sort();
        routes
    }

    /// The alert state, shared by every instance.
    pub fn shared_state(&self, key: &str) -> SharedState {
        SharedState {
            kv: self.kv.clone(),
            key: key.to_string(),
            max_payload: self.client.server_info().max_payload,
        }
    }

    /// Feed local `route` from its durable consumer (on `subjects`) until `cancel`: take one
    /// message, queue it on the local spool, wait until the local route finished it (durably),
    /// then ack it. While it is being delivered the lease is renewed (progress acks), so a
    /// slow target never hands it to another instance; a dead instance stops renewing.
    pub fn feed(
        self,
        route: String,
        subjects: Vec<String>,
        spool: Arc<Spool>,
        writer: SpoolWriter,
        cancel: CancellationToken,
        route_done: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        self.feed_paced(
            route,
            subjects,
            spool,
            writer,
            cancel,
            route_done,
            Duration::ZERO,
        )
    }

    /// [`Cluster::feed`] for a route whose sink is paced (Slack: `pace` between two messages).
    /// With one message in flight cluster-wide and the ack sent only once `pace` has passed
    /// since the delivery's last attempt started (waited out here: the route records the
    /// delivery as soon as Slack answered, and paces after that, or not at all when told to
    /// stop), the next delivery of the route, whichever instance takes it, starts at least
    /// `pace` after this one started, a stop (a reload, a shutdown) that hands the route to
    /// another instance included.
    #[allow(clippy::too_many_arguments)]
    pub fn feed_paced(
        self,
        route: String,
        subjects: Vec<String>,
        spool: Arc<Spool>,
        writer: SpoolWriter,
        cancel: CancellationToken,
        route_done: CancellationToken,
        pace: Duration,
    ) -> impl Future<Output = ()> + Send + 'static {
        let starting = self.starting(&route, &subjects);
        async move {
            starting.ready(&self, &cancel).await;
            self.feed_with(
                route, subjects, spool, writer, cancel, route_done, pace, None,
            )
            .await
        }
    }

    /// [`Cluster::feed`] for a route whose deliveries produce something onto local outbox
    /// `outbox` (the pipeline: alerts). A message is acked only once what its delivery
    /// produced is in the stream, not merely committed locally: an instance that dies or
    /// stalls before publishing it has not acked it, so another takes the message over, in
    /// order, before the next one (which must not overtake what this one produced).
    #[allow(clippy::too_many_arguments)]
    pub fn feed_producing(
        self,
        route: String,
        subjects: Vec<String>,
        outbox: String,
        spool: Arc<Spool>,
        writer: SpoolWriter,
        cancel: CancellationToken,
        route_done: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let starting = self.starting(&route, &subjects);
        async move {
            starting.ready(&self, &cancel).await;
            self.feed_with(
                route,
                subjects,
                spool,
                writer,
                cancel,
                route_done,
                Duration::ZERO,
                Some(outbox),
            )
            .await
        }
    }

    /// Count local `route` as waiting for its consumer, from now (the call, not the task's
    /// first poll: the daemon starts a route before the channels whose frames it reads).
    fn starting(&self, route: &str, subjects: &[String]) -> Starting {
        self.starting.send_modify(|n| *n += 1);
        let hash = short_hash(route);
        let mut subjects = subjects.to_vec();
        subjects.push(self.replay_subject(&hash));
        Starting {
            gate: self.starting.clone(),
            durable: format!("route_{hash}"),
            label: crate::spool::route_name(route).to_string(),
            subjects,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn feed_with(
        self,
        route: String,
        subjects: Vec<String>,
        spool: Arc<Spool>,
        writer: SpoolWriter,
        cancel: CancellationToken,
        route_done: CancellationToken,
        pace: Duration,
        outbox: Option<String>,
    ) {
        let label = crate::spool::route_name(&route).to_string();
        let hash = short_hash(&route);
        let durable = format!("route_{hash}");
        let names = RouteNames {
            label: label.clone(),
            route: route.clone(),
            floor_key: format!("floor.{durable}"),
            hash: hash.clone(),
            outbox,
        };
        // At zero from the start, so that a dashboard sees the series before the first skip or
        // redelivery (helper-108: no sample until then).
        for counter in [
            "smee_relay_cluster_skipped_total",
            "smee_relay_cluster_redeliveries_total",
        ] {
            metrics::counter!(counter, "route" => label.clone()).increment(0);
        }
        // This route's lag is no longer this instance's to say once it ends (helper-136: a
        // target a reload removed showed 299 for good, delivered meanwhile by others).
        let _zero = LagZero(label.clone());
        // The route also reads its own replay subject: `events replay` re-queues there.
        let mut subjects = subjects;
        subjects.push(self.replay_subject(&hash));
        let mut said = false;
        // The stream the route's consumer was last taken of (see [`Cluster::consumer`]).
        let mut seen = None;
        while !cancel.is_cancelled() {
            // Not waited on past a stop (NATS may be stalled): see `Starting::ready`.
            let made = cancel
                .run_until_cancelled(self.consumer(&durable, &label, &subjects, &mut seen))
                .await;
            let Some(made) = made else {
                return;
            };
            let consumer = match made {
                Ok(consumer) => consumer,
                Err(e) => {
                    if !std::mem::replace(&mut said, true) {
                        warn!(route = %label, "cannot reach the route's NATS consumer, retrying: {}", crate::error::chain(&e));
                    }
                    sleep(&cancel, Duration::from_secs(1)).await;
                    continue;
                }
            };
            let messages = consumer
                .stream()
                // More than one, so that a pull request is waiting at the server when this
                // instance acks: the next message (one in flight at most, `max_ack_pending`)
                // comes at once, not after one more request's round trip.
                .max_messages_per_batch(PULL_BATCH)
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(10))
                .messages();
            let Some(messages) = cancel.run_until_cancelled(messages).await else {
                return;
            };
            let mut messages = match messages {
                Ok(messages) => messages,
                Err(e) => {
                    if !std::mem::replace(&mut said, true) {
                        warn!(route = %label, "cannot pull from the route's NATS consumer, retrying: {e}");
                    }
                    sleep(&cancel, Duration::from_secs(1)).await;
                    continue;
                }
            };
            said = false;
            let _lag = LagWatch::start(consumer.clone(), label.clone());
            loop {
                let next = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return,
                    next = messages.next() => next,
                };
                let message = match next {
                    Some(Ok(message)) => message,
                    Some(Err(e)) => {
                        // Heartbeats missed (NATS down) and the like: pull again.
                        // Paced: while NATS is down this comes every few seconds.
                        // Just after a reconnect it is the outage's heartbeat, said late:
                        // a WARN then read as the connection lost again (helper-123).
                        if self.status.just_back(crate::clock::now_ms()) {
                            info!(route = %label, "NATS consumer: {e} (during the outage that just ended); asking it for the route's messages again");
                        } else if e.kind() == consumer::pull::MessagesErrorKind::ConsumerDeleted {
                            // Not the connection (helper-154: it said "slow or down" when
                            // the stream was deleted, taking its consumers with it).
                            warn!(route = %label, "the route's NATS consumer was deleted (with the cluster's stream, or by hand); making it again");
                        } else if let Some(line) =
                            paced(&format!("consumer {label}"), &e.to_string())
                        {
                            warn!(route = %label, "NATS consumer: {line} (no word from NATS: the connection is slow or down); asking it for the route's messages again");
                        }
                        break;
                    }
                    None => break,
                };
                // Not waited on past a stop: a message that arrives with too little lease left
                // is renewed first, which waits on NATS (it goes back to NATS unacked).
                let lease = match cancel
                    .run_until_cancelled(self.arrive(&consumer, &message))
                    .await
                {
                    None => return,
                    Some(Some(lease)) => lease,
                    Some(None) => {
                        info!(route = %label, stream_seq = stream_seq(&message), "a delivery reached this instance after its ack wait ran out (its NATS connection stalled); another instance has it, not delivering it here");
                        continue;
                    }
                };
                let paced = Paced { pace };
                self.handle(
                    &names,
                    &consumer,
                    message,
                    lease,
                    &spool,
                    &writer,
                    &route_done,
                    paced,
                )
                .await;
            }
        }
    }

    /// One message: into the local queue, wait for its delivery, ack.
    #[allow(clippy::too_many_arguments)]
    async fn handle(
        &self,
        names: &RouteNames,
        consumer: &consumer::PullConsumer,
        message: jetstream::Message,
        mut lease: lease::Lease,
        spool: &Arc<Spool>,
        writer: &SpoolWriter,
        route_done: &CancellationToken,
        paced: Paced,
    ) {
        let RouteNames {
            label,
            route,
            floor_key,
            hash,
            ..
        } = names;
        let (label, route, floor_key) = (label.as_str(), route.as_str(), floor_key.as_str());
        let stream_seq = stream_seq(&message);
        // Where a message's time goes (debug log at the end): the floor read, the local
        // queue (its commit) and delivery, and the floor write and ack.
        let took = std::time::Instant::now();
        // A NATS server that crashed may forget acks it confirmed (consumer state is flushed
        // lazily); the route's floor (the last stream sequence delivered, kept in KV beside
        // the message data) says what was delivered whatever the consumer remembers. Read on
        // every message: see "The floor" in the module header for why no cached copy will do.
        // The floor's KV revision as read: the floor's write after the delivery expects it,
        // so that an instance overtaken meanwhile (another delivered this message and moved
        // the floor on) never writes its older floor over the newer one.
        let mut floor_revision = None;
        let mut floor: Option<Floor> = None;
        // Test-only (debug builds, `SMEE_RELAY_FAULT`): hold the delivery here, where a
        // network that stalls as it arrives holds up the floor read.
        #[cfg(debug_assertions)]
        if let Some(path) = fault("hold-on-arrival") {
            info!(route = %label, "fault injected: holding a delivery on arrival");
            while std::path::Path::new(&path).exists() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // A stop does not wait on NATS here (a stall would hold it for the request timeout):
        // nothing is queued yet, and the message goes back to NATS unacked.
        let stopped = || {
            info!(route = %label, stream_seq, "stopping before this delivery was queued (NATS is slow to answer): it goes back to the cluster unacked, and is delivered after the ack wait");
        };
        if stream_seq.is_some() {
            let Some(read) = route_done
                .run_until_cancelled(self.kv.entry(floor_key))
                .await
            else {
                stopped();
                return;
            };
            match read {
                Ok(Some(entry)) => {
                    floor_revision = Some(entry.revision);
                    if entry.operation == kv::Operation::Put {
                        floor = Floor::parse(&entry.value);
                    }
                }
                Ok(None) => floor_revision = Some(0),
                Err(_) => {}
            }
        }
        // A floor naming another stream than this instance knows: the stream was created
        // anew since; learnt before this delivery's floor is written.
        if route_done
            .run_until_cancelled(self.floor_stream(floor.as_ref()))
            .await
            .is_none()
        {
            stopped();
            return;
        }
        // At or below the floor: delivered already, if the floor is of this stream (one
        // created anew starts its sequences again).
        let below = match (stream_seq, &floor) {
            (Some(seq), Some(floor)) if seq <= floor.seq => {
                let Some(counts) = route_done
                    .run_until_cancelled(self.floor_counts(label, floor))
                    .await
                else {
                    stopped();
                    return;
                };
                counts
            }
            _ => false,
        };
        if let Some(seq) = stream_seq
            && below
        {
            metrics::counter!("smee_relay_cluster_skipped_total", "route" => label.to_string())
                .increment(1);
            // Delivered already, by whom tells what to do with this copy. NATS forgot its ack
            // (a crash): this is its one delivery, acked here. Or another instance took it
            // over while this copy waited (a stall) and delivered it: that one acks it, after
            // its pace, and this copy's ack would release the route early.
            match self.still_ours(consumer, &message).await {
                Some(true) => {
                    info!(route = %label, stream_seq = seq, "already delivered (NATS did not get or forgot the ack of its earlier delivery); not delivering it again");
                    let _ = message.double_ack().await;
                }
                Some(false) => {
                    info!(route = %label, stream_seq = seq, "already delivered by another instance, which took it over while this copy waited (a stall); not delivering it, nor acking it");
                }
                None => {
                    info!(route = %label, stream_seq = seq, "already delivered; NATS cannot say whether this copy is still the one out, so it is left to NATS (it comes again, and is skipped)");
                }
            }
            return;
        }
        if let Ok(info) = message.info() {
            self.saw_seq(info.stream_sequence);
            if info.delivered > 1 {
                metrics::counter!("smee_relay_cluster_redeliveries_total", "route" => label.to_string())
                    .increment(1);
                info!(route = %label, stream_seq = info.stream_sequence, attempt = info.delivered, "taking over a delivery another instance did not finish");
            }
            tracing::debug!(route = %label, stream_seq = info.stream_sequence, "took a delivery from the cluster");
        }
        self.status
            .delivering
            .lock()
            .expect("not poisoned")
            .insert(label.to_string(), crate::clock::now_ms());
        // A body stored apart is fetched first, the lease renewed meanwhile.
        let opening = self.open_envelope(message.headers.as_ref(), &message.payload);
        let opened = self
            .renewing(&mut lease, consumer, &message, route_done, opening)
            .await;
        let envelope = match opened {
            Err(lease::Interrupted::Stopped) => {
                stopped();
                return;
            }
            Err(lease::Interrupted::Lost) => {
                info!(route = %label, stream_seq, "the cluster gave this delivery to another instance while its body was fetched; not delivering it here");
                return;
            }
            Ok(Ok(envelope)) => envelope,
            Ok(Err(OpenError::Invalid(why))) => {
                // No instance could ever deliver it.
                error!(route = %label, stream_seq, "a message in the cluster stream cannot be delivered: {why}; it is not delivered (terminated)");
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
            Ok(Err(e)) => {
                warn!(route = %label, stream_seq, "cannot read a cluster delivery: {}; handing it back", crate::error::chain(&e));
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
                return;
            }
        };
        let mut finished = writer.finished();
        if let Some(seq) = stream_seq {
            let taken = InFlight {
                event: envelope.event.clone(),
                seq,
                delivery_id: format!("{}-{hash}-{seq}", self.settings.name),
                attempts: 0,
                failed: None,
                started: None,
                lease,
                withdrawn: false,
            };
            self.in_flight
                .lock()
                .expect("not poisoned")
                .insert(route.to_string(), taken);
        }
        let checked = took.elapsed();
        let done = self
            .deliver_locally(
                names,
                consumer,
                &message,
                envelope,
                spool,
                writer,
                route_done,
                &mut finished,
                took,
            )
            .await;
        let mut taken = self.in_flight.lock().expect("not poisoned").remove(route);
        if done.is_none() || taken.as_ref().is_some_and(|taken| taken.withdrawn) {
            return;
        }
        // What the delivery produced is published before the ack (see `feed_producing`).
        if let Some(outbox) = &names.outbox
            && !self
                .wait_published(
                    label,
                    outbox,
                    consumer,
                    &message,
                    taken.as_mut().map(|taken| &mut taken.lease),
                    spool,
                    route_done,
                    &mut finished,
                )
                .await
        {
            return;
        }
        // The route records a delivery as soon as the target answered and paces after that
        // (and not at all once told to stop): the ack, which lets another instance send the
        // next one, waits until the pace has passed since the last attempt started. The
        // floor is written before that wait, so that an instance killed during it hands over
        // a message the next instance skips (already delivered) rather than sends again.
        let ack_at = (!paced.pace.is_zero())
            .then(|| taken.as_ref().and_then(|taken| taken.started))
            .flatten()
            .map(|started| started + paced.pace);
        let delivered = took.elapsed();
        let settle = async {
            // Delivered here after NATS gave the message to another instance (an attempt under
            // way as a stall began): the other one acks it, after its pace; the floor is still
            // raised (it was delivered).
            if let (Some(seq), Some(held)) = (stream_seq, &taken)
                && self.acked_by_another(&held.lease, consumer, &message).await
            {
                info!(route = %label, stream_seq = seq, "delivered here after the cluster gave it to another instance (a stall); that instance acks it");
                self.raise_floor(label, floor_key, seq).await;
                return;
            }
            // Finished after a failed attempt: given up on. Recorded in the cluster before the
            // ack, so that whichever instance runs `events list` sees it, and any can replay it.
            if let Some(seq) = stream_seq
                && let Some(InFlight {
                    attempts,
                    failed: Some((status, error)),
                    ..
                }) = taken
            {
                self.record_dead(hash, label, seq, status, error, attempts)
                    .await;
            }
            match stream_seq {
                Some(seq) => {
                    self.floor_and_ack(names, &message, seq, floor_revision, ack_at)
                        .await
                }
                None => {
                    wait_until(ack_at).await;
                    if let Err(e) = message.double_ack().await {
                        warn!(route = %label, "delivered, but NATS did not record the ack ({e}); it may be delivered once more");
                    }
                }
            }
        };
        // A stop does not wait on a NATS that does not answer (a stall) past a short grace:
        // the retries of the floor would outlast the process's own shutdown bound.
        let stopping = async {
            route_done.cancelled().await;
            tokio::time::sleep(STOP_GRACE).await;
        };
        tokio::select! {
            () = settle => {}
            () = stopping => {
                warn!(route = %label, stream_seq, "stopping before NATS confirmed this delivery's ack (it does not answer): another instance may deliver it again after the ack wait, with the same x-smee-relay-delivery");
                return;
            }
        }
        tracing::debug!(
            route = %label,
            stream_seq,
            checked_us = checked.as_micros() as u64,
            queued_us = done.map_or(0, |(_, queued)| (queued - checked).as_micros() as u64),
            delivered_us = (delivered - checked).as_micros() as u64,
            acked_us = (took.elapsed() - delivered).as_micros() as u64,
            "cluster delivery done"
        );
    }

    /// Record `seq` as the route's floor and ack the message. The ack goes out right behind
    /// the floor's put, before its confirmation (one round trip less per message); a put that
    /// is not confirmed is written again here before the next message (see "The floor" in
    /// the module header for what that leaves). The put expects the floor's revision as read
    /// before the delivery (`revision`; unknown: no such put): if another instance wrote the
    /// floor since, it fails, and the floor is only ever raised ([`Cluster::raise_floor`]).
    async fn floor_and_ack(
        &self,
        names: &RouteNames,
        message: &jetstream::Message,
        seq: u64,
        revision: Option<u64>,
        ack_at: Option<tokio::time::Instant>,
    ) {
        let (label, floor_key) = (names.label.as_str(), names.floor_key.as_str());
        let value = Floor::value(seq, self.stream_created.load(Ordering::Relaxed));
        let mut ack_sent = false;
        let mut floored = false;
        if let Some(subject) = self.floor_subject(floor_key)
            && let Some(revision) = revision
            && let Ok(confirmation) = {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(
                    "Nats-Expected-Last-Subject-Sequence",
                    revision.to_string().as_str(),
                );
                self.js
                    .publish_with_headers(subject, headers, value.clone())
                    .await
            }
        {
            tracing::debug!(route = %label, stream_seq = seq, "the route's floor is written; acking after the pace");
            wait_until(ack_at).await;
            if let Err(e) = message.ack().await {
                warn!(route = %label, "delivered, but the ack did not go out ({e}); the route's floor skips its redelivery");
            }
            ack_sent = true;
            match confirmation.await {
                Ok(_) => floored = true,
                // Not a fault yet: another instance may have moved the floor on since it was
                // read (it took the delivery over while this one's network stalled, and both
                // delivered). `raise_floor` tells, and warns if the floor is still short.
                Err(e) => {
                    tracing::debug!(route = %label, "the route's delivered floor was not confirmed ({e}); raising it");
                }
            }
        }
        if ack_sent && !floored {
            // A lost floor now only matters if NATS also forgets the ack: it is tried again
            // before the next message rather than given up at once.
            floored = self.raise_floor(label, floor_key, seq).await;
        } else if !floored {
            floored = self.raise_floor(label, floor_key, seq).await;
        }
        if !ack_sent {
            wait_until(ack_at).await;
            if floored {
                // The floor (confirmed) already says it was delivered: an ack NATS loses
                // costs a redelivery that the floor skips, not a repeat.
                if let Err(e) = message.ack().await {
                    warn!(route = %label, "delivered, but the ack did not go out ({e}); the route's floor skips its redelivery");
                }
            } else if let Err(e) = message.double_ack().await {
                warn!(route = %label, "delivered, but NATS did not record the ack ({e}); it may be delivered once more");
            }
        }
    }

    /// Raise the floor at `floor_key` to `seq` unless it is there already: with the ack out,
    /// the next message of the route may already be delivered by another instance and its
    /// floor written, which a plain put of `seq` would lower. Compare-and-set on the
    /// revision, a few tries; whether the floor is at `seq` or above.
    async fn raise_floor(&self, label: &str, floor_key: &str, seq: u64) -> bool {
        let mut last = String::new();
        for attempt in 0..3 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let (current, revision) = match self.kv.entry(floor_key).await {
                Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                    (Floor::parse(&entry.value), entry.revision)
                }
                Ok(Some(entry)) => (None, entry.revision),
                Ok(None) => (None, 0),
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            // Never lowered, unless it is of an earlier stream (see [`floor`]).
            let stream = self.floor_stream(current.as_ref()).await;
            if current
                .is_some_and(|floor| floor.seq >= seq && floor.stream.is_none_or(|s| s == stream))
            {
                return true;
            }
            let value = Floor::value(seq, stream);
            let stored = if revision == 0 {
                self.kv
                    .create(floor_key, value)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            } else {
                self.kv
                    .update(floor_key, value, revision)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            };
            match stored {
                Ok(()) => return true,
                Err(e) => last = e,
            }
        }
        warn!(route = %label, "cannot record the route's delivered floor ({last}); if NATS also loses the ack, it is delivered once more");
        false
    }

    /// The subject a put of KV key `key` is published on, for [`Cluster::floor_and_ack`] to
    /// send it without waiting; None when the bucket is reached through a JetStream domain
    /// prefix (then the plain `put` is used).
    fn floor_subject(&self, key: &str) -> Option<String> {
        if self.kv.use_jetstream_prefix {
            return None;
        }
        let prefix = self.kv.put_prefix.as_ref().unwrap_or(&self.kv.prefix);
        Some(format!("{prefix}{key}"))
    }

    /// Queue `envelope` on the local route and wait until it is finished there (delivered or
    /// dead): its local event id, and when (since `took`) it was queued. None: not finished
    /// here (handed back to the cluster).
    #[allow(clippy::too_many_arguments)]
    async fn deliver_locally(
        &self,
        names: &RouteNames,
        consumer: &consumer::PullConsumer,
        message: &jetstream::Message,
        envelope: Envelope,
        spool: &Arc<Spool>,
        writer: &SpoolWriter,
        route_done: &CancellationToken,
        finished: &mut tokio::sync::broadcast::Receiver<(String, u64)>,
        took: std::time::Instant,
    ) -> Option<(u64, Duration)> {
        let (label, route) = (names.label.as_str(), names.route.as_str());
        let write = Write::Append {
            channel: envelope.channel,
            routes: vec![route.to_string()],
            events: Arc::from(vec![envelope.event]),
            cursor: None,
        };
        // Not paced behind the intake's group commits: the route's next message waits on it.
        let id = {
            match writer.commit_now(vec![write]).await {
                Ok(ids) => match ids.first().and_then(|ids| ids.first()).copied().flatten() {
                    Some(id) => id,
                    None => {
                        // Spool full: leave the message to NATS (another instance, or later).
                        warn!(route = %label, "the local spool is full; handing the delivery back to the cluster");
                        let _ = message
                            .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                            .await;
                        return None;
                    }
                },
                Err(e) => {
                    warn!(route = %label, "cannot queue a cluster delivery on the local spool: {e}; handing it back");
                    let _ = message
                        .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                        .await;
                    return None;
                }
            }
        };
        let queued = took.elapsed();
        // Renew the lease well within the ack wait; the route attempts again only while
        // renewals are confirmed ([`lease`]).
        let mut renew_every = tokio::time::interval_at(self.renewal_due(route), self.renew_every());
        renew_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Told to stop, the local route finishes the delivery in flight within its shutdown
        // timeout, or leaves it queued; once it has returned, the spool says which.
        let done = loop {
            // Biased: a delivery finished is seen first, then a stop, then a renewal due.
            tokio::select! {
                biased;
                signal = finished.recv() => match signal {
                    Ok((r, e)) if r == route && e == id => break true,
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        if finished_in_spool(spool, route, id).await { break true; }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break false,
                },
                _ = route_done.cancelled() => {
                    break finished_in_spool(spool, route, id).await;
                }
                _ = renew_every.tick() => {
                    // The spool may have it (no journal: marks come with commits).
                    if finished_in_spool(spool, route, id).await { break true; }
                    // Not waited on past a stop: NATS may be slow to answer.
                    route_done.run_until_cancelled(self.renew_lease(route, consumer, message)).await;
                }
            }
        };
        if !done {
            // The route stopped (a reload, a shutdown) and left it queued. The local copy is
            // handed back now, before the nak: a route started after a reload reads the same
            // queue, and would deliver it under its local id beside the cluster's redelivery.
            // (A crash leaves it to [`hand_back`] at the next start.)
            hand_back_one(spool, writer, route, id).await;
            let _ = message.ack_with(AckKind::Nak(None)).await;
            info!(route = %label, stream_seq = stream_seq(message), "the route stopped before finishing this delivery: handed back to the cluster, which gives it to another instance at once");
            return None;
        }
        Some((id, queued))
    }

    /// Wait until local `outbox` has published (or given up on) everything queued on it now,
    /// renewing the `lease` of `message` meanwhile. False: the route stopped first, and the
    /// message is handed back (nak) so another instance takes it over at once; it finds the
    /// judgement recorded in the cluster and publishes the same alerts under the same names.
    /// Or NATS gave the message to another instance (a stall: renewals are confirmed and
    /// stop extending after a whole ack wait without an answer, as a delivery's do), which
    /// does the same; this one's outbox still publishes, and the stream drops the repeats.
    #[allow(clippy::too_many_arguments)]
    async fn wait_published(
        &self,
        label: &str,
        outbox: &str,
        consumer: &consumer::PullConsumer,
        message: &jetstream::Message,
        mut lease: Option<&mut lease::Lease>,
        spool: &Arc<Spool>,
        route_done: &CancellationToken,
        finished: &mut tokio::sync::broadcast::Receiver<(String, u64)>,
    ) -> bool {
        let mut left = pending_ids(spool, outbox).await;
        let renew = self.renew_every();
        let mut renew_every = tokio::time::interval_at(tokio::time::Instant::now() + renew, renew);
        // A renewal NATS is slow to answer is not followed by a burst of them.
        renew_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !left.is_empty() {
            tokio::select! {
                signal = finished.recv() => match signal {
                    Ok((r, e)) if r == outbox => { left.remove(&e); }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        let now = pending_ids(spool, outbox).await;
                        left.retain(|id| now.contains(id));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return false,
                },
                _ = renew_every.tick() => {
                    let now = pending_ids(spool, outbox).await;
                    left.retain(|id| now.contains(id));
                    if left.is_empty() {
                        continue;
                    }
                    let Some(lease) = lease.as_deref_mut() else {
                        // Not a JetStream message: nothing to lease.
                        continue;
                    };
                    // Not waited on past a stop (handled below, on the next turn).
                    let renewed = route_done
                        .run_until_cancelled(self.renew_own(lease, consumer, message))
                        .await;
                    if renewed == Some(false) {
                        info!(route = %label, stream_seq = stream_seq(message), "the cluster gave this delivery to another instance while what it produced waited to be published (a stall); that instance takes it over, and publishes the same alerts under the same names");
                        return false;
                    }
                }
                _ = route_done.cancelled() => {
                    let now = pending_ids(spool, outbox).await;
                    left.retain(|id| now.contains(id));
                    if left.is_empty() {
                        break;
                    }
                    info!(route = %label, "stopping with what this delivery produced not yet published; handing the delivery back to the cluster, which publishes it again under the same names");
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                    return false;
                }
            }
        }
        true
    }

    /// What the cluster still holds for local `route` (a route a reload removed here): its
    /// consumer's name and stream, and how many events wait on it (pending and in flight).
    /// None: no such consumer, or NATS cannot say.
    pub async fn route_backlog(&self, route: &str) -> Option<(String, String, u64)> {
        let durable = format!("route_{}", short_hash(route));
        let stream = self.js.get_stream(&self.stream_name).await.ok()?;
        let info = stream.consumer_info(&durable).await.ok()?;
        let waiting = info.num_pending + info.num_ack_pending as u64;
        Some((self.stream_name.clone(), durable, waiting))
    }

    /// The route's durable consumer, created if no instance made it yet. A new one starts
    /// after the stream's last message: a route new to the cluster (a target added on reload,
    /// or at an instance's start) gets what arrives from now on, as a new smee client would,
    /// not the stream's history (up to `max_age`). One that exists keeps where it starts (NATS
    /// cannot change that) and takes this instance's filter and ack wait.
    ///
    /// `seen`: the creation time of the stream the route last took a consumer of. A stream
    /// created anew since (deleted under the running route) holds only what arrived since,
    /// all of it the route's: its new consumer starts at its first message (helper-148:
    /// after the last, it missed what was published before it was made).
    async fn consumer(
        &self,
        durable: &str,
        label: &str,
        subjects: &[String],
        seen: &mut Option<u64>,
    ) -> Result<consumer::PullConsumer, NatsError> {
        let stream = match self.js.get_stream(&self.stream_name).await {
            // Deleted under the running route: created anew, as a publish would (helper-151:
            // a reload's new route waited for it, and held every publish back, for ever).
            Err(e)
                if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                self.stream_gone().await;
                self.js.get_stream(&self.stream_name).await
            }
            other => other,
        }
        .map_err(|e| NatsError(e.into()))?;
        let created = floor::created_ns(stream.cached_info());
        let renewed = seen
            .replace(created)
            .is_some_and(|before| before != created);
        let mut config = consumer::pull::Config {
            durable_name: Some(durable.to_string()),
            // What `events list` calls the route (its target as shown, no channel key).
            description: Some(label.to_string()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.settings.ack_wait,
            max_ack_pending: 1,
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        };
        match subjects {
            [one] => config.filter_subject = one.clone(),
            many => config.filter_subjects = many.to_vec(),
        }
        // Twice at most: another instance may create it between the look and the creation
        // (with another start); the second look finds it.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match stream.consumer_info(durable).await {
                Ok(info) => {
                    config.deliver_policy = info.config.deliver_policy;
                    // Applied at join (`adopt_settings`); one that differs now is another
                    // instance's, which joined since and said so: not set back silently.
                    if info.config.ack_wait != self.settings.ack_wait {
                        warn!(
                            route = %label,
                            "the cluster's ack_wait is {} (another instance's), this instance's \
                             config says {}: the cluster's holds (every instance of the cluster \
                             must use the same [cluster] settings)",
                            humantime::format_duration(info.config.ack_wait),
                            humantime::format_duration(self.settings.ack_wait)
                        );
                        config.ack_wait = info.config.ack_wait;
                    }
                }
                Err(e)
                    if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound
                        && renewed =>
                {
                    config.deliver_policy = consumer::DeliverPolicy::All;
                }
                Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => {
                    let last = stream
                        .get_info()
                        .await
                        .map_err(|e| NatsError(e.into()))?
                        .state
                        .last_sequence;
                    config.deliver_policy = consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: last + 1,
                    };
                }
                Err(e) => return Err(NatsError(e.into())),
            }
            match stream.create_consumer(config.clone()).await {
                Ok(consumer) => return Ok(consumer),
                Err(_) if attempt < 2 => continue,
                Err(e) => return Err(NatsError(e.into())),
            }
        }
    }

    /// The subject `events replay` re-queues a route's events on (read by that route only).
    fn replay_subject(&self, route_hash: &str) -> String {
        format!("smee.{}.replay.{route_hash}", self.settings.name)
    }

    /// Record in KV that the route hashed `hash` gave up on stream message `seq`, so that
    /// every instance lists it and can replay it. Tried a few times: NATS is usually there
    /// (the message's ack goes the same way right after).
    async fn record_dead(
        &self,
        hash: &str,
        label: &str,
        seq: u64,
        status: Option<u16>,
        error: String,
        attempts: u32,
    ) {
        let dead = inspect::DeadLetter {
            route: label.to_string(),
            route_hash: hash.to_string(),
            stream_seq: seq,
            status,
            error,
            attempts,
            at_ms: crate::clock::now_ms(),
            replayed_as: None,
            purged_ms: None,
        };
        let value = Bytes::from(serde_json::to_vec(&dead).expect("a dead letter serialises"));
        let key = inspect::dead_key(hash, seq);
        let mut last = None;
        for attempt in 0..3 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            match self.kv.put(&key, value.clone()).await {
                Ok(_) => {
                    // With the arguments that find the cluster (helper-136: without them the
                    // command looked for a local spool and failed).
                    info!(route = %label, stream_seq = seq, "dead letter recorded in the cluster; `smee-relay events replay {seq}{}` (or `--dead`) on any instance re-queues it", self.settings.events_args());
                    return;
                }
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = last {
            warn!(route = %label, stream_seq = seq, "cannot record the dead letter in the cluster ({e}); it is only in this instance's spool (`smee-relay events list --local`)");
        }
    }

    /// Whether the client is connected now.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

/// A fed route's pacing: the least time between two of its deliveries, cluster-wide. The
/// route records a delivery as soon as its target answered and paces only after that (not at
/// all once told to stop), so the ack waits the pace out itself, from when the last attempt
/// started ([`InFlight::started`]).
struct Paced {
    /// The sink's least interval (zero: not paced).
    pace: Duration,
}

/// The cluster delivery a local route is delivering now.
struct InFlight {
    /// The event, to tell it from anything else on the local queue.
    event: Event,
    /// Its stream sequence: its id in `events list` and `events replay`.
    seq: u64,
    /// What its target sees in `x-smee-relay-delivery`.
    delivery_id: String,
    /// Attempts this instance made at it.
    attempts: u32,
    /// How the last attempt failed (the target's status, if it answered, and why); None after
    /// a success.
    failed: Option<(Option<u16>, String)>,
    /// When the last attempt started ([`Cluster::attempt_started`]): a paced route's ack waits
    /// the pace out from there.
    started: Option<tokio::time::Instant>,
    /// This instance's hold on it ([`lease`]).
    lease: lease::Lease,
    /// The local route finished it without delivering it: NATS gave it to another instance
    /// ([`Cluster::claim`]), so it is neither acked nor recorded as delivered here.
    withdrawn: bool,
}

/// How a fed route is named: in logs and metrics, in the local spool, and its floor in KV.
struct RouteNames {
    /// The target as shown (no channel key).
    label: String,
    /// The local spool route.
    route: String,
    /// The KV key of the last stream sequence delivered on it.
    floor_key: String,
    /// The route's key hashed: its consumer, replay subject and dead letters are named by it.
    hash: String,
    /// The local outbox what the route's deliveries produce goes to, if the ack waits for it
    /// to be published ([`Cluster::feed_producing`]).
    outbox: Option<String>,
}

/// A route waiting for its consumer (see [`Cluster::starting`]); counted until dropped.
struct Starting {
    /// The instance's count of routes waiting.
    gate: Arc<tokio::sync::watch::Sender<usize>>,
    /// The consumer's name, description and subjects, as `feed_with` makes them.
    durable: String,
    label: String,
    subjects: Vec<String>,
}

impl Starting {
    /// Make the route's consumer (retrying while NATS is away), then stop counting.
    async fn ready(self, cluster: &Cluster, cancel: &CancellationToken) {
        let mut said = false;
        while !cancel.is_cancelled() {
            // Not waited on past a stop: a stalled NATS answers nothing until its request
            // timeout (helper-110: a stop then took 11 s, at the backstop's edge).
            let made = cancel
                .run_until_cancelled(cluster.consumer(
                    &self.durable,
                    &self.label,
                    &self.subjects,
                    &mut None,
                ))
                .await;
            let Some(made) = made else {
                return;
            };
            match made {
                Ok(_) => {
                    // INFO: in a cluster the channel's own routes are its outbox, so this is
                    // where the log shows what the instance delivers to.
                    info!(route = %self.label, "the route's NATS consumer is ready: this instance takes the route's deliveries from the cluster");
                    return;
                }
                Err(e) => {
                    if !std::mem::replace(&mut said, true) {
                        warn!(route = %self.label, "cannot create the route's NATS consumer, retrying (nothing is published until it exists): {}", crate::error::chain(&e));
                    }
                    sleep(cancel, Duration::from_secs(1)).await;
                }
            }
        }
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        self.gate.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Sleep until `at`, if given (the ack of a paced route).
async fn wait_until(at: Option<tokio::time::Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

/// The local events queued on `route` now (none if the spool cannot say: nothing to wait for).
async fn pending_ids(spool: &Arc<Spool>, route: &str) -> std::collections::HashSet<u64> {
    let (spool, route) = (spool.clone(), route.to_string());
    tokio::task::spawn_blocking(move || {
        spool
            .pending(&route, 0, usize::MAX)
            .map(|queued| queued.iter().map(|q| q.event.id).collect())
            .unwrap_or_default()
    })
    .await
    .unwrap_or_default()
}

/// Whether `route` has no delivery of `event` pending in the local spool any more.
async fn finished_in_spool(spool: &Arc<Spool>, route: &str, event: u64) -> bool {
    let (spool, route) = (spool.clone(), route.to_string());
    tokio::task::spawn_blocking(move || {
        spool
            .pending(&route, 0, usize::MAX)
            .map(|queued| !queued.iter().any(|q| q.event.id == event))
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

/// At start, local deliveries of cluster routes that an earlier run of this instance took but
/// did not finish are given back: NATS never got their ack, so it redelivers them (to this
/// instance or another) and delivering the local copy too would repeat them. Returns how many.
///
/// The marks are committed (not only journaled) before this returns: a route reads its queue
/// from the spool file, so a mark still waiting for its group commit would let the route,
/// started right after, deliver the handed-back copy under its local id.
pub async fn hand_back(spool: Arc<Spool>, writer: &SpoolWriter, routes: Vec<String>) -> usize {
    let queued = tokio::task::spawn_blocking(move || {
        let mut marks = Vec::new();
        for route in routes {
            if let Ok(queued) = spool.pending(&route, 0, usize::MAX) {
                for item in queued {
                    marks.push(Write::Mark {
                        route: route.clone(),
                        seq: item.seq,
                        event: item.event.id,
                        outcome: Outcome::Dead {
                            status: None,
                            error: HANDED_BACK.into(),
                        },
                    });
                }
            }
        }
        marks
    })
    .await
    .unwrap_or_default();
    let count = queued.len();
    if count == 0 {
        return 0;
    }
    let mut delay = Duration::from_millis(100);
    loop {
        match writer.commit(queued.clone()).await {
            Ok(_) => return count,
            Err(e) => {
                // Starting the routes now would deliver the copies: wait for the disk.
                error!(
                    "cannot record that the deliveries the last run left unfinished are handed back to the cluster ({}); retrying before the routes start",
                    crate::error::chain(&e)
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Hand back local event `event`, still queued on `route`, to the cluster (see [`hand_back`]).
async fn hand_back_one(spool: &Arc<Spool>, writer: &SpoolWriter, route: &str, event: u64) {
    let (spool, owned) = (spool.clone(), route.to_string());
    let queued = tokio::task::spawn_blocking(move || {
        spool
            .pending(&owned, 0, usize::MAX)
            .map(|queued| queued.into_iter().find(|q| q.event.id == event))
    })
    .await;
    let Ok(Ok(Some(item))) = queued else {
        return;
    };
    let mark = Write::Mark {
        route: route.to_string(),
        seq: item.seq,
        event,
        outcome: Outcome::Dead {
            status: None,
            error: HANDED_BACK.into(),
        },
    };
    if let Err(e) = writer.commit(vec![mark]).await {
        warn!(
            route = %crate::spool::route_name(route),
            "cannot record that a delivery is handed back to the cluster ({}); a route started on this queue before the next restart may deliver it again",
            crate::error::chain(&e)
        );
    }
}

/// Why a local copy of a cluster delivery is marked dead when handed back ([`hand_back`]): it is
/// not a dead letter, and no local replay may deliver it (the cluster does).
const HANDED_BACK: &str = "handed back to the cluster, not a dead letter: this instance's route \
     stopped (a stop, a reload, a crash) before finishing it; the cluster delivers it (events \
     list --config shows where it stands)";

/// Stored once, whichever instance publishes it: a hash of the channel and the frame as
/// received (for smee.io, its data line holds smee's receive timestamp, so two posts of the
/// same body differ).
pub fn message_id(channel_key: &str, event: &Event) -> String {
    let mut hash = sha2::Sha256::new();
    hash.update(channel_key.as_bytes());
    hash.update([0]);
    // Streamed into the hash: the JSON of a large body (an array of numbers) is never held.
    serde_json::to_writer(HashWriter(&mut hash), event).expect("an event serialises");
    hex::encode(hash.finalize())
}

/// Feeds what is written to it into a hash.
struct HashWriter<'a>(&'a mut sha2::Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn short_hash(text: &str) -> String {
    let digest = sha2::Sha256::digest(text.as_bytes());
    hex::encode(&digest[..8])
}

async fn sleep(cancel: &CancellationToken, delay: Duration) {
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = tokio::time::sleep(delay) => {}
    }
}

/// Values in the cluster's KV bucket under one name (`<name>` itself, and `<name>.<part>`),
/// each changed only with compare-and-set on its revision.
#[derive(Clone)]
pub struct SharedState {
    kv: kv::Store,
    key: String,
    /// The largest message the server takes: a value over it is refused here, without
    /// asking (NATS would refuse it every time).
    max_payload: usize,
}

/// Why a compare-and-set did not land.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another writer changed the value first: load and decide again.
    #[error("changed meanwhile by another writer")]
    Moved,
    /// The value can never be stored (over NATS's max payload): retrying cannot help.
    #[error("a value of {size} bytes is over the NATS server's max_payload of {max} bytes")]
    TooLarge { size: usize, max: usize },
    /// NATS did not answer (a timeout, a dropped connection, a leader change): the write may
    /// or may not have landed; read the value again to tell.
    #[error("no answer from NATS, the write may have landed")]
    Uncertain(#[source] NatsError),
}

impl SharedState {
    /// The value named `<this name>.<part>`.
    pub fn part(&self, part: &str) -> SharedState {
        SharedState {
            kv: self.kv.clone(),
            key: format!("{}.{part}", self.key),
            max_payload: self.max_payload,
        }
    }

    /// The value and its revision (0: none yet).
    pub async fn load(&self) -> Result<(Option<Bytes>, u64), NatsError> {
        match self.kv.entry(self.key.clone()).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                Ok((Some(entry.value), entry.revision))
            }
            Ok(Some(entry)) => Ok((None, entry.revision)),
            Ok(None) => Ok((None, 0)),
            Err(e) => Err(NatsError(e.into())),
        }
    }

    /// The last revision of the whole bucket: unchanged, no value in it changed.
    pub async fn bucket_revision(&self) -> Result<u64, NatsError> {
        self.kv
            .stream
            .get_info()
            .await
            .map(|info| info.state.last_sequence)
            .map_err(|e| NatsError(e.into()))
    }

    /// Delete the value if it is still at `revision`.
    pub async fn remove(&self, revision: u64) -> Result<(), NatsError> {
        self.kv
            .delete_expect_revision(&self.key, Some(revision))
            .await
            .map_err(|e| NatsError(e.into()))
    }

    /// Store `value` if the key is still at `revision` (0: absent); the new revision.
    pub async fn try_store(&self, value: Bytes, revision: u64) -> Result<u64, StoreError> {
        if value.len() > self.max_payload {
            return Err(StoreError::TooLarge {
                size: value.len(),
                max: self.max_payload,
            });
        }
        if revision == 0 {
            self.kv
                .create(&self.key, value)
                .await
                .map_err(|e| match e.kind() {
                    kv::CreateErrorKind::AlreadyExists => StoreError::Moved,
                    _ => StoreError::Uncertain(NatsError(e.into())),
                })
        } else {
            self.kv
                .update(&self.key, value, revision)
                .await
                .map_err(|e| match e.kind() {
                    kv::UpdateErrorKind::WrongLastRevision => StoreError::Moved,
                    _ => StoreError::Uncertain(NatsError(e.into())),
                })
        }
    }

    /// Store `value` if the key is still at `revision` (0: absent). `Ok(false)`: another
    /// instance changed it first; load and decide again.
    pub async fn store(&self, value: Bytes, revision: u64) -> Result<bool, NatsError> {
        match self.try_store(value, revision).await {
            Ok(_) => Ok(true),
            Err(StoreError::Moved) => Ok(false),
            Err(StoreError::Uncertain(e)) => Err(e),
            Err(e @ StoreError::TooLarge { .. }) => Err(NatsError(e.to_string().into())),
        }
    }
}

/// A message's sequence number in its stream, for a log line (none if NATS's reply subject
/// does not carry it).
fn stream_seq(message: &jetstream::Message) -> Option<u64> {
    message.info().map(|info| info.stream_sequence).ok()
}

#[cfg(test)]
mod tests {

    /// Regression (helper-123): right after NATS came back, a consumer's heartbeat missed
    /// during the outage was a WARN that the connection was "slow or down", read as a new loss.
    #[test]
    fn regression_a_heartbeat_missed_in_the_outage_was_said_as_a_new_one() {
        let status = ClusterStatus::default();
        status.connected.store(true, Ordering::Relaxed);
        assert!(!status.just_back(50_000), "never went down");
        status.back_at_ms.store(40_000, Ordering::Relaxed);
        assert!(status.just_back(45_000));
        assert!(!status.just_back(51_000), "long back: a new stall");
        status.connected.store(false, Ordering::Relaxed);
        assert!(!status.just_back(45_000), "down again");
    }
    use super::*;

    #[test]
    fn urls_in_logs_hide_passwords_and_tokens() {
        assert_eq!(
            redact_url("nats://app:s3cret@nats.example:4222"),
            "nats://app:***@nats.example:4222"
        );
        assert_eq!(
            redact_url("nats://T0KEN@nats.example"),
            "nats://***@nats.example"
        );
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        // A bare host, as the client reads it.
        assert_eq!(redact_url("x"), "nats://x:4222");
        assert_eq!(redact_url("u:pw@h:1"), "nats://u:***@h:1");
        assert_eq!(
            redact_url("nats://u:p1@a:4222, nats://u:p2@b:4222"),
            "nats://u:***@a:4222,nats://u:***@b:4222"
        );
        let settings = Settings::new(
            SecretString::from("tls://u:pw@h:1".to_string()),
            "prod".into(),
        );
        assert!(!format!("{settings:?}").contains("pw"));
    }

    #[test]
    fn the_message_id_is_the_frame_s_not_the_instance_s() {
        let event = Event {
            sse_id: Some("1700000000000".into()),
            timestamp_ms: Some(1_700_000_000_000),
            headers: vec![("x-github-event".into(), "push".into())],
            query: vec![],
            body: Bytes::from_static(b"{\"a\":1}"),
        };
        assert_eq!(message_id("ch", &event), message_id("ch", &event.clone()));
        // The id every earlier version gave it: instances of both versions store it once.
        let mut hash = sha2::Sha256::new();
        hash.update(b"ch\0");
        hash.update(serde_json::to_vec(&event).unwrap());
        assert_eq!(message_id("ch", &event), hex::encode(hash.finalize()));
        assert_ne!(message_id("ch", &event), message_id("other", &event));
        let mut later = event.clone();
        later.timestamp_ms = Some(1_700_000_000_001);
        assert_ne!(message_id("ch", &event), message_id("ch", &later));
    }
}
