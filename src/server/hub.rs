//! The channels: replay buffers, live wake-ups, the one memory budget, eviction and the
//! channel cap and time-to-live. It owns every byte `serve` holds on behalf of clients; it
//! does no HTTP (that is `http`) and touches the disk only through [`Store`].
//!
//! Memory is accounted by [`Charge`]s, each released when what it stands for is freed (an
//! event, a cached frame, a channel, a subscriber, a body being read), so the figure in
//! `/metrics` is what is really held, including a frame still pinned by a slow socket.
//! Subscribers hold no queue of their own: each keeps a cursor into its channel's replay
//! buffer, and one that lost events to eviction is disconnected (it resumes with
//! `Last-Event-ID`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use axum::body::Bytes;
use base64::Engine as _;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::ServeConfig;
use super::store::{Store, StoreError};

/// What a channel costs besides its events: map entry, name, buffer header, wake-up cell.
pub(super) const CHANNEL_OVERHEAD: usize = 512;
/// What an event costs besides its bytes: the struct, its slots in the channel's and the
/// global queue, allocator slack.
pub(super) const EVENT_OVERHEAD: usize = 256;
/// What a subscriber costs besides the frame it is sending: its task, stream state and
/// hyper's read buffer.
pub(super) const SUBSCRIBER_OVERHEAD: usize = 16 << 10;
/// Frames go to hyper in pieces of this size, so a slow socket pins at most a slice of a
/// shared frame, never a private copy.
const CHUNK: usize = 64 << 10;

/// How long `/healthz` fails after a post is refused for memory.
pub(super) const MEMORY_REFUSALS_UNHEALTHY: Duration = Duration::from_secs(10);

/// How a resume warning says it is not said every time.
pub(super) const RESUME_WARNINGS: &str = "such warnings are said at the first and every 1,000th";

/// Why a post or a subscription was refused.
#[derive(Debug, thiserror::Error)]
pub(super) enum HubError {
    #[error("the server holds its maximum of {}; use an existing channel or try later", crate::error::count(*.0, "channel", "channels"))]
    TooManyChannels(usize),
    #[error("this channel has its maximum of {0} subscribers")]
    TooManySubscribers(usize),
    #[error("the server's memory budget (--max-memory) is full even after evicting replay data")]
    MemoryFull,
    #[error(
        "bodies being read hold half of the server's memory budget (--max-memory), all they may; \
         try again shortly"
    )]
    ReadingFull,
    #[error("cannot store the event")]
    Store(#[source] StoreError),
}

/// Counters for `/metrics` (no channel ids: label values are a small fixed set). Gauges are
/// what is open or held now; `evicted_*` count events dropped by reason, `shed_*` connections
/// the server closed by reason, `refused_*` requests answered 503/403 by reason.
#[derive(Default)]
pub(super) struct Stats {
    /// Bytes held now, all charges together.
    pub held: AtomicUsize,
    /// Of those, bytes of bodies still being read: kept under half the budget, so that
    /// uploads that never finish cannot evict the events just posted before their
    /// subscribers take them.
    pub reading: AtomicUsize,
    pub channels: AtomicUsize,
    pub subscribers: AtomicUsize,
    pub connections: AtomicUsize,
    pub posts: AtomicU64,
    pub evicted_memory: AtomicU64,
    pub evicted_age: AtomicU64,
    pub evicted_count: AtomicU64,
    pub evicted_ttl: AtomicU64,
    pub channels_expired: AtomicU64,
    pub shed_max_connections: AtomicU64,
    pub shed_read_timeout: AtomicU64,
    pub shed_write_stall: AtomicU64,
    pub shed_lagging: AtomicU64,
    pub shed_tls_handshake: AtomicU64,
    pub refused_channel_cap: AtomicU64,
    pub refused_subscriber_cap: AtomicU64,
    pub refused_memory: AtomicU64,
    pub refused_forbidden: AtomicU64,
    /// Requests without the `--post-token` or `--subscribe-token` asked for (401).
    pub refused_token: AtomicU64,
    /// Connections shed (at the cap, past the read timeout, a failed TLS handshake), said at
    /// most once a minute: a flood is worth a line, not a line a connection.
    pub shed_said: Mutex<(crate::clock::Tally, String)>,
    /// Posts refused for memory (503), said at most once a minute (helper-142: a full budget
    /// refused every post for a minute without a line).
    pub refused_memory_said: Mutex<(crate::clock::Tally, String)>,
    /// When a post was last refused for memory (ms since the epoch; 0: never): `/healthz`
    /// fails for [`MEMORY_REFUSALS_UNHEALTHY`] after it.
    pub memory_refused_ms: AtomicU64,
    /// Requests refused for their token, said at most once a minute.
    pub refused_token_said: Mutex<(crate::clock::Tally, Option<std::net::IpAddr>)>,
    /// Gap warnings of all channels in the current minute: (when it began, said, not said). A
    /// stranger's channels each get their first line too, so the lines are capped
    /// ([`GAP_LINES_A_MINUTE`]) and the rest counted (helper-130).
    pub gap_lines: Mutex<(Option<std::time::Instant>, u32, u64)>,
    /// Subscribers that resumed from an id this server cannot serve whole (not an id, above
    /// its newest, or past what was evicted): the warning is said at the first and every
    /// 1,000th, or anyone could fill the log.
    pub resume_warnings: AtomicU64,
    /// Subscribers told of a gap (`event: gap`): events they missed, or an id not this
    /// server's.
    pub gaps: AtomicU64,
    pub headers_dropped: AtomicU64,
    pub store_errors: AtomicU64,
    /// False from a failed disk write until a write succeeds again.
    pub store_healthy: AtomicBool,
}

/// Bytes held on behalf of something; given back when dropped.
pub(super) struct Charge {
    /// The counters the bytes are counted in.
    stats: Arc<Stats>,
    /// How many bytes this charge stands for now.
    bytes: usize,
    /// A body being read: counted in [`Stats::reading`] too.
    reading: bool,
}

impl Stats {
    /// Count a connection shed for `why` (its counter, already counted) and say the count
    /// since the last line, at most once a minute.
    pub(super) fn say_shed(&self, why: &str) {
        if let Ok(mut said) = self.shed_said.lock() {
            said.1 = why.to_string();
            if let Some(n) = said.0.add(1, std::time::Instant::now()) {
                warn!("{}", shed_line(n, &said.1));
            }
        }
    }

    /// Count a post refused for memory (`why`), and say the count since the last line, at most
    /// once a minute.
    fn say_refused_memory(&self, why: &HubError) {
        self.refused_memory.fetch_add(1, Ordering::Relaxed);
        // Uploads holding their half is a sender's doing, not a server that cannot take posts
        // (helper-145: one post every 10 s kept /healthz failing).
        if let HubError::MemoryFull = why {
            self.memory_refused_ms
                .store(crate::clock::now_ms(), Ordering::Relaxed);
        }
        if let Ok(mut said) = self.refused_memory_said.lock() {
            said.1 = why.to_string();
            if let Some(n) = said.0.add(1, std::time::Instant::now()) {
                warn!("{}", memory_line(n, &said.1));
            }
        }
    }

    /// Whether a post was refused for memory in the last [`MEMORY_REFUSALS_UNHEALTHY`].
    pub(super) fn refusing_for_memory(&self) -> bool {
        let at = self.memory_refused_ms.load(Ordering::Relaxed);
        at != 0
            && crate::clock::now_ms().saturating_sub(at)
                < MEMORY_REFUSALS_UNHEALTHY.as_millis() as u64
    }

    /// Count a request refused for its token, and say the count since the last line (and who
    /// sent the latest), at most once a minute.
    pub(super) fn say_refused_token(&self, ip: std::net::IpAddr) {
        self.refused_token.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut said) = self.refused_token_said.lock() {
            said.1 = Some(ip);
            if let Some(n) = said.0.add(1, std::time::Instant::now()) {
                warn!("{}", refused_line(n, ip));
            }
        }
    }

    /// Whether a channel's gap warning may be said at `now`, within [`GAP_LINES_A_MINUTE`];
    /// counted as not said if not.
    pub(super) fn gap_line_allowed(&self, now: std::time::Instant) -> bool {
        let Ok(mut lines) = self.gap_lines.lock() else {
            return true;
        };
        let (began, said, unsaid) = &mut *lines;
        if began.is_none_or(|at| now.duration_since(at) >= crate::clock::TALLY_PERIOD) {
            if *unsaid == 0 {
                *began = Some(now);
                *said = 0;
            } else {
                // The count of the minute that ended goes first (see `floods_due`).
                *unsaid += 1;
                return false;
            }
        }
        if *said < GAP_LINES_A_MINUTE {
            *said += 1;
            true
        } else {
            *unsaid += 1;
            false
        }
    }

    /// The counts of floods not said yet, once their minute is over (the sweep's, every
    /// second): a flood that stopped is said a minute after its first line, not with the next
    /// one's sender (helper-130).
    pub(super) fn floods_due(&self, now: std::time::Instant) -> Vec<String> {
        let mut lines = Vec::new();
        if let Ok(mut said) = self.shed_said.lock()
            && let Some(n) = said.0.add(0, now)
        {
            lines.push(shed_line(n, &said.1));
        }
        if let Ok(mut said) = self.refused_token_said.lock()
            && let (Some(n), Some(ip)) = (said.0.add(0, now), said.1)
        {
            lines.push(refused_line(n, ip));
        }
        if let Ok(mut said) = self.refused_memory_said.lock()
            && let Some(n) = said.0.add(0, now)
        {
            lines.push(memory_line(n, &said.1));
        }
        if let Ok(mut gaps) = self.gap_lines.lock() {
            let (began, said, unsaid) = &mut *gaps;
            if *unsaid > 0
                && began.is_some_and(|at| now.duration_since(at) >= crate::clock::TALLY_PERIOD)
            {
                lines.push(format!(
                    "{} not said in the last minute, past {GAP_LINES_A_MINUTE} lines (smee_relay_serve_gaps_total counts every gap)",
                    crate::error::count(*unsaid as usize, "more gap warning", "more gap warnings")
                ));
                (*began, *said, *unsaid) = (Some(now), 0, 0);
            }
        }
        lines
    }
}

fn shed_line(n: u64, why: &str) -> String {
    format!(
        "shed {} since the last report (the latest: {why}); many at once are a flood of connections, or too low a limit (smee_relay_serve_shed_connections_total counts them by reason)",
        crate::error::count(n as usize, "connection", "connections")
    )
}

fn memory_line(n: u64, why: &str) -> String {
    format!(
        "refused {} (503) since the last report: {why}; smee_relay_serve_bytes_held shows what \
         is held (subscribers that stopped reading in a frame are cut, and their memory comes \
         back); raise --max-memory, or lower --max-body",
        crate::error::count(n as usize, "post", "posts")
    )
}

fn refused_line(n: u64, ip: std::net::IpAddr) -> String {
    format!(
        "refused {} without the right token since the last report (the latest from {ip})",
        crate::error::count(n as usize, "request", "requests"),
    )
}

impl Charge {
    pub(super) fn new(stats: &Arc<Stats>, bytes: usize) -> Self {
        stats.held.fetch_add(bytes, Ordering::Relaxed);
        Self {
            stats: stats.clone(),
            bytes,
            reading: false,
        }
    }

    pub(super) fn grow(&mut self, bytes: usize) {
        self.stats.held.fetch_add(bytes, Ordering::Relaxed);
        if self.reading {
            self.stats.reading.fetch_add(bytes, Ordering::Relaxed);
        }
        self.bytes += bytes;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.stats.held.fetch_sub(self.bytes, Ordering::Relaxed);
        if self.reading {
            self.stats.reading.fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}

/// A frame's bytes with their charge: freed (and uncounted) when the last slice goes, which
/// may be after its event was evicted, if a socket still holds a piece.
struct ChargedFrame {
    /// The `id:`/`data:` text.
    text: String,
    /// Its share of the budget.
    _charge: Charge,
}

impl AsRef<[u8]> for ChargedFrame {
    fn as_ref(&self) -> &[u8] {
        self.text.as_bytes()
    }
}

/// One posted webhook, as kept for replay.
pub(super) struct Posted {
    /// Unique and increasing in its channel (the SSE `id:`, for Last-Event-ID).
    pub id: u64,
    /// When the server took it (smee's `timestamp`).
    pub received_ms: u64,
    /// The sender's headers that are text, minus host, length and authorization.
    pub headers: Vec<(String, String)>,
    /// The POST's query parameters (smee's `query`).
    pub query: serde_json::Map<String, serde_json::Value>,
    /// How to show `body` the smee way.
    pub content_type: String,
    /// The exact bytes posted (an exact-size allocation, as counted).
    pub body: Bytes,
    /// The SSE frames, made once on first use and shared by every subscriber: smee's shape
    /// (`[0]`) and the raw one with `bodyB` (`[1]`).
    frames: [OnceLock<Bytes>; 2],
    /// Budget for the fields above (frames carry their own).
    charge: Charge,
    /// For the frames' charges.
    stats: Arc<Stats>,
}

impl Posted {
    pub(super) fn new(
        stats: &Arc<Stats>,
        id: u64,
        received_ms: u64,
        headers: Vec<(String, String)>,
        query: serde_json::Map<String, serde_json::Value>,
        content_type: String,
        body: Bytes,
    ) -> Self {
        let size = EVENT_OVERHEAD
            + body.len()
            + content_type.len()
            + headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + 48)
                .sum::<usize>()
            + query
                .iter()
                .map(|(k, v)| k.len() + value_bytes(v) + 48)
                .sum::<usize>();
        Self {
            id,
            received_ms,
            headers,
            query,
            content_type,
            body,
            frames: [OnceLock::new(), OnceLock::new()],
            charge: Charge::new(stats, size),
            stats: stats.clone(),
        }
    }

    /// The smee `data:` payload: headers, `query`, `timestamp`, and the body: as `body` (smee's
    /// parsed form), or with `raw` as `bodyB` (the exact bytes) instead. Not both: a raw
    /// subscriber never reads `body`, and sending it too would more than double each frame.
    /// Written straight out, never through a `serde_json::Value`: a tree of a 25 MiB body of
    /// `[0,0,...]` takes over a gigabyte.
    pub(super) fn data(&self, raw: bool) -> String {
        let mut out: Vec<u8> = Vec::with_capacity(self.body.len() + 256);
        out.push(b'{');
        // A header named as a frame field (kept by an older server) is not set beside it.
        for (name, value) in self
            .headers
            .iter()
            .filter(|(name, _)| !FRAME_FIELDS.contains(&name.as_str()))
        {
            push_json(&mut out, name.as_str());
            out.push(b':');
            push_json(&mut out, value.as_str());
            out.push(b',');
        }
        if raw {
            out.extend_from_slice(b"\"bodyB\":\"");
            let encoded = base64::engine::general_purpose::STANDARD.encode(&self.body);
            out.extend_from_slice(encoded.as_bytes());
            out.push(b'"');
        } else {
            out.extend_from_slice(b"\"body\":");
            push_smee_body(&mut out, &self.content_type, &self.body);
        }
        out.extend_from_slice(b",\"query\":");
        push_json(&mut out, &self.query);
        out.extend_from_slice(format!(",\"timestamp\":{}}}", self.received_ms).as_bytes());
        // serde_json writes UTF-8 only, and every piece above is its output or ASCII.
        String::from_utf8(out)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }

    /// The whole SSE frame, shared.
    /// Whether the frame (`raw` or smee's) is made already.
    fn has_frame(&self, raw: bool) -> bool {
        self.frames[usize::from(raw)].get().is_some()
    }

    fn frame(&self, raw: bool) -> Bytes {
        self.frames[usize::from(raw)]
            .get_or_init(|| {
                let text = format!("id: {}\ndata: {}\n\n", self.id, self.data(raw));
                let charge = Charge::new(&self.stats, text.len());
                Bytes::from_owner(ChargedFrame {
                    text,
                    _charge: charge,
                })
            })
            .clone()
    }
}

/// At most this many gap warnings a minute, all channels together.
const GAP_LINES_A_MINUTE: u32 = 10;

/// Bodies larger than this have their frames made on a blocking thread, off the one thread
/// that serves every connection.
const BUILT_ASIDE: usize = 256 << 10;

/// The fields of smee's frame besides the headers (lower-case, as header names arrive): a
/// posted header of one of these names is dropped, never set beside them.
pub(super) const FRAME_FIELDS: [&str; 5] = ["body", "bodyb", "query", "timestamp", "rawdata"];

/// `value` as JSON at the end of `out`.
fn push_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    // Writing into a Vec fails only for a value that cannot be JSON, and strings and maps of
    // JSON values always can.
    let _ = serde_json::to_writer(&mut *out, value);
}

/// `body` as smee shows it: parsed JSON (re-serialised, compact), form fields as an object,
/// else the text. JSON goes from the body to `out` token by token, with no tree between.
fn push_smee_body(out: &mut Vec<u8>, content_type: &str, body: &[u8]) {
    if content_type.contains("json") {
        let mark = out.len();
        let mut from = serde_json::Deserializer::from_slice(body);
        let mut to = serde_json::Serializer::new(&mut *out);
        if serde_transcode::transcode(&mut from, &mut to).is_ok() && from.end().is_ok() {
            return;
        }
        // Not JSON after all (or past serde_json's nesting limit): shown as text below.
        out.truncate(mark);
    }
    if content_type.starts_with("application/x-www-form-urlencoded") {
        let fields: serde_json::Map<String, serde_json::Value> = reqwest::Url::parse("http://x/")
            .ok()
            .map(|mut u| {
                u.set_query(Some(&String::from_utf8_lossy(body)));
                u.query_pairs()
                    .map(|(k, v)| (k.into_owned(), v.into_owned().into()))
                    .collect()
            })
            .unwrap_or_default();
        push_json(out, &fields);
        return;
    }
    push_json(out, &*String::from_utf8_lossy(body));
}

pub(super) struct Channel {
    /// The id the next post gets.
    pub next_id: u64,
    /// Replay buffer, oldest first, ids increasing. Changed through `push`, `pop_front` and
    /// `clear`, which keep `held`.
    pub events: VecDeque<Arc<Posted>>,
    /// What `events` are charged (frames aside): the channel holding the most is evicted from
    /// first when the budget is full.
    held: usize,
    /// Highest id dropped from `events`: a subscriber whose cursor is below it lost events.
    evicted_upto: u64,
    /// The newest id, for waking subscribers (a watch cell is a few words; no ring).
    live: watch::Sender<u64>,
    /// Open subscriptions: their cursors, and how to cut their connections.
    watchers: Vec<Arc<Watcher>>,
    /// Last post or last subscriber leaving, for `--channel-ttl`.
    last_used_ms: u64,
    /// The channel's own budget.
    _charge: Charge,
    /// Gaps told to this channel's subscribers, said at most once a minute.
    gaps_said: crate::clock::Tally,
    /// Whether a subscriber that follows the channel (not the page, which asks for
    /// `replay=all`) has been handed an event since this process holds it. Until one has,
    /// what was posted waits for it: a follower with no place to resume from gets everything
    /// the channel keeps (helper-155: the README's `new` then `forward` lost a webhook sent in
    /// between, GitHub's `ping` say). Set by an event handed out, not by a connection
    /// (helper-156: a `HEAD`, or a relay stopped before its first event, which then has no
    /// `Last-Event-ID` to resume from, used it up).
    followed: bool,
}

impl Channel {
    fn new(stats: &Arc<Stats>, name: &str) -> Self {
        // Ids start from the clock, so they keep growing across server restarts and a client's
        // remembered Last-Event-ID never hides new events.
        let start = crate::clock::now_ms().saturating_mul(1000);
        Self {
            next_id: start,
            events: VecDeque::new(),
            held: 0,
            evicted_upto: 0,
            live: watch::channel(0).0,
            watchers: Vec::new(),
            last_used_ms: crate::clock::now_ms(),
            _charge: Charge::new(stats, CHANNEL_OVERHEAD + name.len()),
            gaps_said: crate::clock::Tally::default(),
            followed: false,
        }
    }
}

impl Channel {
    fn push(&mut self, posted: Arc<Posted>) {
        self.held += posted.charge.bytes;
        self.events.push_back(posted);
    }

    fn pop_front(&mut self) -> Option<Arc<Posted>> {
        let gone = self.events.pop_front()?;
        self.held -= gone.charge.bytes;
        Some(gone)
    }

    fn clear(&mut self) {
        self.events.clear();
        self.held = 0;
    }
}

/// Note that the expired channel `name` had evicted events up to `upto`, forgetting the
/// oldest note past [`super::store::EXPIRED_KEPT`] (the store forgets it at the next start).
fn remember_expired(expired: &mut HashMap<Arc<str>, u64>, name: Arc<str>, upto: u64) {
    if expired.len() >= super::store::EXPIRED_KEPT
        && let Some(oldest) = expired
            .iter()
            .min_by_key(|(_, upto)| **upto)
            .map(|(name, _)| name.clone())
    {
        expired.remove(&oldest);
    }
    expired.insert(name, upto);
}

/// Why an event left the replay buffer (a `/metrics` label).
#[derive(Clone, Copy)]
enum Reason {
    Memory,
    Age,
}

pub(super) struct Channels {
    /// The channels by name.
    pub map: HashMap<Arc<str>, Channel>,
    /// Every kept event in post order, (channel, id, received): the global oldest is at the
    /// front. Entries of events already gone from their channel are skipped when reached.
    order: VecDeque<(Arc<str>, u64, u64)>,
    /// Evicted events still to be deleted from disk (with the next write).
    pub unstored: Vec<(Arc<str>, u64)>,
    /// With `--nats-url`: stream sequences this replica never saw, for gap reports.
    unseen: super::nats::Unseen,
    /// With `--nats-url`: the last stream sequence fed, so a new channel's first id is above it.
    last_fed: u64,
    /// Channels expired (`--channel-ttl`) that had evicted events: the highest id evicted, so
    /// that one made anew under the name tells a subscriber resuming from before it of the gap.
    /// At most [`super::store::EXPIRED_KEPT`], the newest.
    expired: HashMap<Arc<str>, u64>,
    /// With `--nats-url`: the highest id handed out from a stream that was since reset. A
    /// Last-Event-ID above what was fed and at most this is from the old stream: told as a
    /// gap and replayed from the new stream's start.
    reset_upto: u64,
}

pub(super) struct Hub {
    /// The limits.
    pub config: ServeConfig,
    /// Every channel, under one lock held only for short, non-blocking work.
    pub channels: Mutex<Channels>,
    /// Counters for `/metrics` and the budget.
    pub stats: Arc<Stats>,
    /// The buffers on disk, with `--state-dir`.
    pub store: Option<Arc<Store>>,
    /// The body size of the last post the store refused: what a probe of a failed store
    /// writes, to know it takes posts again.
    refused_bytes: std::sync::atomic::AtomicUsize,
    /// Posts are stored and published one at a time, so the global order is post order and
    /// live subscribers see ids in order.
    post_order: tokio::sync::Mutex<()>,
    /// Ends every stream on shutdown, after a final comment.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// With `--nats-url`: posts go to the stream, and events come only from its feed.
    pub cluster: Option<Arc<super::nats::Cluster>>,
}

impl Hub {
    pub(super) fn new(
        config: ServeConfig,
        store: Option<Arc<Store>>,
        stats: Arc<Stats>,
        restored: super::store::Restored,
        shutdown: tokio_util::sync::CancellationToken,
        cluster: Option<Arc<super::nats::Cluster>>,
    ) -> Self {
        stats.store_healthy.store(true, Ordering::Relaxed);
        let mut channels = Channels {
            map: HashMap::new(),
            order: VecDeque::new(),
            unstored: Vec::new(),
            unseen: Default::default(),
            last_fed: 0,
            expired: restored
                .expired
                .into_iter()
                .map(|(name, upto)| (name.into(), upto))
                .collect(),
            reset_upto: 0,
        };
        let mut all = Vec::new();
        for (name, evicted_upto, events) in restored.channels {
            let name: Arc<str> = name.into();
            let mut channel = Channel::new(&stats, &name);
            channel.evicted_upto = evicted_upto;
            for event in events {
                channel.next_id = channel.next_id.max(event.id + 1);
                all.push((event.received_ms, name.clone(), event.id));
                channel.push(Arc::new(event));
            }
            channels.map.insert(name, channel);
        }
        all.sort();
        channels.order = all
            .into_iter()
            .map(|(received, name, id)| (name, id, received))
            .collect();
        stats.channels.store(channels.map.len(), Ordering::Relaxed);
        let hub = Self {
            config,
            channels: Mutex::new(channels),
            stats,
            store,
            refused_bytes: Default::default(),
            post_order: tokio::sync::Mutex::new(()),
            shutdown,
            cluster,
        };
        {
            let mut channels = hub.lock();
            let names: Vec<Arc<str>> = channels.map.keys().cloned().collect();
            for name in names {
                hub.trim_count(&mut channels, &name);
            }
            hub.trim(&mut channels, 0);
        }
        hub
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Channels> {
        // A panic while holding this lock is a bug; the data stays consistent enough to serve.
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn limit(&self) -> usize {
        self.config.max_memory
    }

    /// The largest body taken: `--max-body`, or what bodies being read may hold together (half
    /// the budget) if less. A larger one could never be read, whatever waits (helper-145: it
    /// got 503 "try again shortly", and senders retry that for ever).
    pub(super) fn max_body(&self) -> usize {
        self.config.max_body.min(self.limit() / 2)
    }

    /// Make room for `more` bytes: drop what is too old, then, while over the budget, the
    /// oldest event of the channel holding the most. Not the globally oldest: anyone who may
    /// post can fill the budget through channels of their own, and would evict first the
    /// replay that a relay offline for a minute is about to ask for (helper-125). False if
    /// the budget cannot take `more` even with every replay buffer empty.
    pub(super) fn trim(&self, channels: &mut Channels, more: usize) -> bool {
        let cutoff = crate::clock::now_ms().saturating_sub(self.config.retain.as_millis() as u64);
        while let Some((name, id, _)) = (channels.order.front())
            .filter(|(_, _, received)| *received < cutoff)
            .cloned()
        {
            channels.order.pop_front();
            self.drop_event(channels, &name, id, Reason::Age);
        }
        while self.stats.held.load(Ordering::Relaxed) + more > self.limit() {
            // A scan of the channels (at most --max-channels) per event evicted.
            let Some((name, id)) = (channels.map.iter())
                .filter_map(|(name, c)| Some((c.held, name, c.events.front()?.id)))
                .max_by_key(|(held, ..)| *held)
                .map(|(_, name, id)| (name.clone(), id))
            else {
                break;
            };
            self.drop_event(channels, &name, id, Reason::Memory);
        }
        let room = self.stats.held.load(Ordering::Relaxed) + more <= self.limit();
        if !room {
            // What is left is held by sockets: those that stopped reading let go, and a later
            // post finds the room.
            for channel in channels.map.values() {
                cut_pinning(channel, &self.stats);
            }
        }
        room
    }

    /// `--max-events` for one channel (only a post makes a channel longer). The global queue
    /// keeps stale entries for what goes here; they are skipped when reached.
    fn trim_count(&self, channels: &mut Channels, name: &Arc<str>) {
        let max_events = self.config.max_events;
        let Some(channel) = channels.map.get_mut(name) else {
            return;
        };
        let mut over = Vec::new();
        while channel.events.len() > max_events {
            if let Some(gone) = channel.pop_front() {
                channel.evicted_upto = channel.evicted_upto.max(gone.id);
                cut_lagging(channel, gone.id, &self.stats);
                over.push((name.clone(), gone.id));
            }
        }
        self.stats
            .evicted_count
            .fetch_add(over.len() as u64, Ordering::Relaxed);
        channels.unstored.extend(over);
    }

    fn drop_event(&self, channels: &mut Channels, name: &Arc<str>, id: u64, reason: Reason) {
        let Some(channel) = channels.map.get_mut(name) else {
            return;
        };
        if channel.events.front().is_none_or(|e| e.id != id) {
            return; // already gone (count limit or expiry)
        }
        channel.pop_front();
        channel.evicted_upto = channel.evicted_upto.max(id);
        cut_lagging(channel, id, &self.stats);
        let counter = match reason {
            Reason::Memory => &self.stats.evicted_memory,
            Reason::Age => &self.stats.evicted_age,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        channels.unstored.push((name.clone(), id));
    }

    /// Charge `bytes` for a body being read, evicting replay data to make room. Bodies being
    /// read may hold half the budget at most: bodies that never finish (a slow or hostile
    /// sender) would otherwise evict every event posted as soon as it is stored, before its
    /// subscribers could take it.
    pub(super) fn reserve(
        &self,
        charge: &mut Option<Charge>,
        bytes: usize,
    ) -> Result<(), HubError> {
        let mut channels = self.lock();
        let refused = if self.stats.reading.load(Ordering::Relaxed) + bytes > self.limit() / 2 {
            Some(HubError::ReadingFull)
        } else if !self.trim(&mut channels, bytes) {
            Some(HubError::MemoryFull)
        } else {
            None
        };
        if let Some(refused) = refused {
            self.stats.say_refused_memory(&refused);
            return Err(refused);
        }
        match charge {
            Some(charge) => charge.grow(bytes),
            None => {
                let mut new = Charge::new(&self.stats, 0);
                new.reading = true;
                new.grow(bytes);
                *charge = Some(new);
            }
        }
        Ok(())
    }

    /// Whether a new channel may be made now (`/new`); refused, as a post to a new name is.
    pub(super) fn can_create(&self) -> Result<(), HubError> {
        if self.lock().map.len() < self.config.max_channels {
            Ok(())
        } else {
            Err(self.channel_cap_refusal())
        }
    }

    /// Whether to say this resume warning: the first and every 1,000th, with how many so far.
    pub(super) fn resume_warning(&self) -> Option<u64> {
        let n = self.stats.resume_warnings.fetch_add(1, Ordering::Relaxed);
        n.is_multiple_of(1000).then_some(n + 1)
    }

    /// A new channel refused at `--max-channels`: counted, and said at the first refusal and
    /// every 1,000th after (new channels are refused for as long as `--channel-ttl` keeps the
    /// old ones, which anyone who may post can bring about).
    fn channel_cap_refusal(&self) -> HubError {
        let refused = self
            .stats
            .refused_channel_cap
            .fetch_add(1, Ordering::Relaxed);
        if refused.is_multiple_of(1000) {
            warn!(
                "the server holds its maximum of {} channels (--max-channels): new ones are refused until unused ones expire (--channel-ttl); {} refused so far (if strangers made them, see --post-token and --allow-post-from)",
                self.config.max_channels,
                refused + 1
            );
        }
        HubError::TooManyChannels(self.config.max_channels)
    }

    fn channel_mut<'a>(
        &self,
        channels: &'a mut Channels,
        name: &str,
    ) -> Result<(Arc<str>, &'a mut Channel), HubError> {
        self.channel_entry(channels, name, false)
    }

    /// The channel, made if new; past `--max-channels` only if `force`d (an event the stream
    /// already holds is never refused).
    fn channel_entry<'a>(
        &self,
        channels: &'a mut Channels,
        name: &str,
        force: bool,
    ) -> Result<(Arc<str>, &'a mut Channel), HubError> {
        if !channels.map.contains_key(name) {
            if !force && channels.map.len() >= self.config.max_channels {
                return Err(self.channel_cap_refusal());
            }
            let key: Arc<str> = name.into();
            let mut channel = Channel::new(&self.stats, name);
            channel.evicted_upto = channels.expired.remove(name).unwrap_or(0);
            if self.cluster.is_some() {
                // Ids are stream sequences: the next one is above everything fed so far.
                channel.next_id = channels.last_fed + 1;
            }
            channels.map.insert(key.clone(), channel);
            self.stats.channels.fetch_add(1, Ordering::Relaxed);
        }
        let (key, channel) = channels
            .map
            .get_key_value(name)
            .map(|(k, _)| k.clone())
            .zip(channels.map.get_mut(name))
            .expect("just inserted");
        Ok((key, channel))
    }

    /// Store a webhook (on disk first, with `--state-dir`) and hand it to live subscribers.
    /// Only a stored event is published, so a 503 never leaves a copy behind to be delivered.
    pub(super) async fn post(
        &self,
        name: &str,
        make: impl FnOnce(u64) -> Posted,
    ) -> Result<u64, HubError> {
        let _in_order = self.post_order.lock().await;
        let (posted, unstored) = {
            let mut channels = self.lock();
            let (_, channel) = self.channel_mut(&mut channels, name)?;
            let posted = Arc::new(make(channel.next_id));
            channel.next_id += 1;
            channel.last_used_ms = crate::clock::now_ms();
            (posted, std::mem::take(&mut channels.unstored))
        };
        if let Some(store) = &self.store {
            let (store, owned, stored, gone) = (
                store.clone(),
                name.to_string(),
                posted.clone(),
                unstored.clone(),
            );
            let saved = tokio::task::spawn_blocking(move || store.save(&owned, &stored, &gone))
                .await
                .unwrap_or_else(|e| Err(StoreError::Task(e)));
            if let Err(e) = saved {
                self.lock().unstored.extend(unstored);
                self.refused_bytes
                    .store(posted.body.len(), Ordering::Relaxed);
                self.store_failed(&e);
                return Err(HubError::Store(e));
            }
            self.store_recovered();
        }
        let mut channels = self.lock();
        let (key, channel) = self.channel_mut(&mut channels, name)?;
        channel.push(posted.clone());
        channel.live.send_replace(posted.id);
        channels
            .order
            .push_back((key.clone(), posted.id, posted.received_ms));
        self.stats.posts.fetch_add(1, Ordering::Relaxed);
        self.trim_count(&mut channels, &key);
        self.trim(&mut channels, 0);
        Ok(posted.id)
    }

    /// Whether a post to `name` may be taken: the channel exists or one more fits.
    pub(super) fn may_post(&self, name: &str) -> bool {
        let channels = self.lock();
        channels.map.contains_key(name) || channels.map.len() < self.config.max_channels
    }

    /// With `--nats-url`: an event read from the stream (in stream order, `id` its sequence)
    /// joins its channel's replay buffer and wakes its subscribers.
    pub(super) fn insert_fed(&self, name: &str, posted: Posted) {
        let mut channels = self.lock();
        channels.last_fed = channels.last_fed.max(posted.id);
        let Ok((key, channel)) = self.channel_entry(&mut channels, name, true) else {
            return;
        };
        let posted = Arc::new(posted);
        channel.next_id = posted.id + 1;
        channel.last_used_ms = crate::clock::now_ms();
        channel.push(posted.clone());
        channel.live.send_replace(posted.id);
        channels
            .order
            .push_back((key.clone(), posted.id, posted.received_ms));
        self.stats.posts.fetch_add(1, Ordering::Relaxed);
        self.trim_count(&mut channels, &key);
        self.trim(&mut channels, 0);
    }

    /// With `--nats-url`: the stream was reset (deleted, or NATS lost its store) after the feed
    /// read up to `fed`: its ids start again from 1. Drop every channel's events and cut every
    /// subscriber: it resumes with its Last-Event-ID, above the new stream's, and is told of a
    /// gap (see [`Hub::subscribe`]) rather than waiting silently for ids it already passed.
    pub(super) fn reset_stream(&self, fed: u64) {
        let mut channels = self.lock();
        let upto = channels.last_fed.max(fed);
        channels.reset_upto = channels.reset_upto.max(upto);
        channels.last_fed = 0;
        channels.unseen = super::nats::Unseen::default();
        channels.expired.clear();
        channels.order.clear();
        for channel in channels.map.values_mut() {
            channel.clear();
            channel.evicted_upto = 0;
            channel.next_id = 1;
            for watcher in &channel.watchers {
                if !watcher.kill.is_cancelled() {
                    watcher.kill.cancel();
                    self.stats.shed_lagging.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// With `--nats-url`: the last stream sequence fed.
    pub(super) fn fed_upto(&self) -> u64 {
        self.lock().last_fed
    }

    /// With `--nats-url`: stream sequences `from..=to` were deleted before the feed read them.
    pub(super) fn unseen(&self, from: u64, to: u64) {
        if from > to {
            return;
        }
        let mut channels = self.lock();
        channels.unseen.add(from, to);
        channels.last_fed = channels.last_fed.max(to);
        // A live subscriber may have lost some of them: cut it, so it resumes with
        // Last-Event-ID and is told of the gap (its channel's or not, nobody knows).
        for channel in channels.map.values() {
            cut_lagging(channel, to, &self.stats);
        }
    }

    fn store_failed(&self, e: &StoreError) {
        self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
        // Said once per outage; the posts it refuses are counted (store_errors_total).
        if self.stats.store_healthy.swap(false, Ordering::Relaxed) {
            error!(
                "cannot store posted events; posts get 503 and /healthz 503 until a write \
                 succeeds again (retried with every post and every second): {}",
                crate::error::chain(e)
            );
        }
    }

    fn store_recovered(&self) {
        if !self.stats.store_healthy.swap(true, Ordering::Relaxed) {
            info!("storing posted events again");
        }
    }

    /// Every second: age limits, expired channels, deletions owed to the disk, and a probe of
    /// a failed store so `/healthz` recovers without waiting for a post.
    pub(super) async fn sweep(&self) {
        for line in self.stats.floods_due(std::time::Instant::now()) {
            warn!("{line}");
        }
        let now = crate::clock::now_ms();
        let ttl = self.config.channel_ttl.as_millis() as u64;
        let unstored = {
            let mut channels = self.lock();
            self.trim(&mut channels, 0);
            let expired: Vec<Arc<str>> = channels
                .map
                .iter()
                .filter(|(_, c)| c.watchers.is_empty() && now.saturating_sub(c.last_used_ms) >= ttl)
                .map(|(name, _)| name.clone())
                .collect();
            for name in expired {
                if let Some(channel) = channels.map.remove(&name) {
                    self.stats
                        .evicted_ttl
                        .fetch_add(channel.events.len() as u64, Ordering::Relaxed);
                    self.stats.channels_expired.fetch_add(1, Ordering::Relaxed);
                    self.stats.channels.fetch_sub(1, Ordering::Relaxed);
                    let ids: Vec<_> = channel
                        .events
                        .iter()
                        .map(|e| (name.clone(), e.id))
                        .collect();
                    let upto = ids.last().map_or(channel.evicted_upto, |&(_, id)| id);
                    channels.unstored.extend(ids);
                    if upto > 0 {
                        remember_expired(&mut channels.expired, name, upto);
                    }
                }
            }
            if channels.order.len()
                > 2 * channels.map.values().map(|c| c.events.len()).sum::<usize>() + 64
            {
                // Stale entries (count limits, expiry) pile up in a quiet server: compact.
                let Channels { map, order, .. } = &mut *channels;
                order.retain(|(name, id, _)| {
                    map.get(name)
                        .is_some_and(|c| c.events.front().is_some_and(|e| e.id <= *id))
                });
            }
            std::mem::take(&mut channels.unstored)
        };
        let Some(store) = &self.store else { return };
        let healthy = self.stats.store_healthy.load(Ordering::Relaxed);
        if unstored.is_empty() {
            if healthy {
                return;
            }
            // A probe as large as the post refused last: an empty write succeeds on a disk
            // that refuses every post, and said the store healthy again each second
            // (helper-128); no probe at all left /healthz failing until a post came, which a
            // load balancer that reads it never sends (helper-130).
            let bytes = self.refused_bytes.load(Ordering::Relaxed).max(4096);
            let owned = store.clone();
            let _in_order = self.post_order.lock().await;
            let probed = tokio::task::spawn_blocking(move || owned.probe(bytes))
                .await
                .unwrap_or_else(|e| Err(StoreError::Task(e)));
            if probed.is_ok() {
                self.store_recovered();
            }
            return;
        }
        let _in_order = self.post_order.lock().await;
        let (owned, gone) = (store.clone(), unstored.clone());
        let done = tokio::task::spawn_blocking(move || owned.remove(&gone))
            .await
            .unwrap_or_else(|e| Err(StoreError::Task(e)));
        match done {
            Ok(()) => self.store_recovered(),
            Err(e) => {
                self.lock().unstored.extend(unstored);
                self.store_failed(&e);
            }
        }
    }

    /// Open a subscription: replay from `last_seen` (all kept events with `replay_all`), then
    /// live events.
    pub(super) fn subscribe(
        self: &Arc<Self>,
        name: &str,
        last_seen: Option<u64>,
        replay_all: bool,
        raw: bool,
        kill: tokio_util::sync::CancellationToken,
        stream_last: Option<u64>,
    ) -> Result<Subscription, HubError> {
        let mut channels = self.lock();
        let max = self.config.max_subscribers;
        let (key, channel) = self.channel_mut(&mut channels, name)?;
        if channel.watchers.len() >= max {
            self.stats
                .refused_subscriber_cap
                .fetch_add(1, Ordering::Relaxed);
            return Err(HubError::TooManySubscribers(max));
        }
        self.stats.subscribers.fetch_add(1, Ordering::Relaxed);
        // A follower with no place to resume from, before any was handed an event, gets what
        // waits for it, and is told of what was evicted before (helper-156: it got part of
        // the backlog, said nowhere), as one resuming from the channel's start would be.
        let first = !channel.followed && last_seen.is_none() && !replay_all;
        let cursor = if replay_all || first {
            0
        } else {
            last_seen.unwrap_or(channel.next_id.saturating_sub(1))
        };
        // Events at or below `evicted_upto` are gone for everyone. A subscriber that resumes
        // from before them missed them: it is told (an `event: gap` frame, which smee-client
        // ignores and smee-relay's client logs) and so is this log, never silence.
        let evicted_upto = channel.evicted_upto;
        let newest = channel.next_id.saturating_sub(1);
        let gap = match last_seen.filter(|_| !replay_all) {
            Some(seen) => {
                // With `--nats-url`, also sequences this replica never saw (which channel
                // they were is unknown: told as a possible gap rather than kept quiet).
                let upto = evicted_upto.max(channels.unseen.after(seen).unwrap_or(0));
                (seen < upto).then_some((seen, upto))
            }
            None => (first && evicted_upto > 0).then_some((0, evicted_upto)),
        };
        // With `--nats-url`: a Last-Event-ID above every sequence fed that is from a stream
        // since reset (or above the stream's own last sequence, `stream_last`) will never
        // come: the subscriber is told of the reset and gets the new stream's events.
        // Without it, this channel alone hands out ids: one above its newest is not its own
        // (another server's, or from before the clock was set back) and would hide every
        // event to come; the subscriber is told of a gap and gets what is kept.
        let reset_gap = match last_seen {
            Some(seen) if self.cluster.is_some() && !replay_all && seen > channels.last_fed => {
                seen <= channels.reset_upto || stream_last.is_some_and(|last| seen > last)
            }
            Some(seen) if self.cluster.is_none() && !replay_all => seen > newest,
            _ => false,
        };
        let (_, channel) = self.channel_mut(&mut channels, name)?;
        if reset_gap && let Some(n) = self.resume_warning() {
            let seen = last_seen.unwrap_or(0);
            if self.cluster.is_some() {
                warn!(
                    channel = %crate::url::redact(name),
                    "a subscriber resumed after event {seen}, beyond the stream's sequence (it \
                     was reset): told of a gap, and given the channel's events from the new stream \
                     ({RESUME_WARNINGS}: {n} so far)"
                );
            } else {
                warn!(
                    channel = %crate::url::redact(name),
                    "a subscriber resumed after event {seen}, beyond this channel's newest \
                     ({newest}): not an id of this server (another server's, or the clock was \
                     set back); told of a gap, and given the events the channel keeps \
                     ({RESUME_WARNINGS}: {n} so far)"
                );
            }
        }
        if gap.is_some() || reset_gap {
            self.stats.gaps.fetch_add(1, Ordering::Relaxed);
        }
        // Said per channel (the first, then at most once a minute): a stranger's resumes on
        // channels of their own must not use up the line a relay's real loss is said in.
        if let Some((seen, upto)) = gap
            && let Some(n) = channel.gaps_said.add(1, std::time::Instant::now())
            && self.stats.gap_line_allowed(std::time::Instant::now())
        {
            warn!(
                channel = %crate::url::redact(name),
                "a subscriber resumed after event {seen}, but events up to {upto} were already \
                 evicted (--max-events, --retain, --max-memory or --channel-ttl): it missed them \
                 ({} on this channel since the last such warning, said at most once a minute)",
                crate::error::count(n as usize, "gap", "gaps")
            );
        }
        let cursor = if reset_gap {
            0
        } else {
            cursor.max(channel.evicted_upto)
        };
        let gap = if reset_gap {
            last_seen.map(|seen| (seen, 0))
        } else {
            gap
        };
        let watcher = Arc::new(Watcher {
            cursor: AtomicU64::new(cursor),
            sending: AtomicU64::new(0),
            took_ms: AtomicU64::new(crate::clock::now_ms()),
            kill,
        });
        channel.watchers.push(watcher.clone());
        Ok(Subscription {
            watcher,
            hub: self.clone(),
            name: key,
            cursor,
            raw,
            live: channel.live.subscribe(),
            pending: Bytes::new(),
            gap,
            follows: !replay_all,
            ready_sent: false,
            final_sent: false,
            _charge: Charge::new(&self.stats, SUBSCRIBER_OVERHEAD),
        })
    }
}

/// What the hub knows of a subscription, to cut it when eviction passes its cursor: a socket
/// that stopped reading never asks for its next event, so it cannot notice by itself.
pub(super) struct Watcher {
    /// Last id taken by the subscription.
    cursor: AtomicU64,
    /// The id whose frame the subscription is still writing (0: none). That frame stays in
    /// memory, charged, while its socket does not take it, even once the event is evicted.
    sending: AtomicU64,
    /// When its socket last took a piece of a frame (ms since the epoch): one that took none
    /// for [`PINNING_IDLE`] stopped reading; one that takes pieces is reading, however slowly.
    took_ms: AtomicU64,
    /// Closes the subscription's connection.
    kill: tokio_util::sync::CancellationToken,
}

/// Cut the subscriptions of `channel` that had not yet taken event `id`, just evicted.
fn cut_lagging(channel: &Channel, id: u64, stats: &Stats) {
    cut_where(channel, stats, |watcher| {
        watcher.cursor.load(Ordering::Relaxed) < id
    });
}

/// With the memory budget full and every replay buffer evicted: cut the subscriptions of
/// `channel` still writing the frame of an event evicted already, whose sockets stopped taking
/// it ([`PINNING_IDLE`]). The frame stays charged as long as they hold it (helper-142: two
/// such frames held the budget full, and every post to every channel was refused until the
/// write stall, a minute later). One still reading keeps its frame, and the post waits
/// (helper-145: a reader at 1 MB/s was cut, and lost the event).
fn cut_pinning(channel: &Channel, stats: &Stats) {
    let idle_since = crate::clock::now_ms().saturating_sub(PINNING_IDLE.as_millis() as u64);
    let cut = cut_where(channel, stats, |watcher| {
        let sending = watcher.sending.load(Ordering::Relaxed);
        sending != 0
            && sending <= channel.evicted_upto
            && watcher.took_ms.load(Ordering::Relaxed) <= idle_since
    });
    for _ in 0..cut {
        stats.say_shed(
            "a subscriber that stopped reading in a frame the memory budget needed back; it \
             resumes with Last-Event-ID",
        );
    }
}

/// How long a subscriber writing a frame may take no piece of it before it counts as stopped,
/// when the memory budget needs that frame back. The socket takes pieces in bursts, as the
/// kernel's send buffer (megabytes) drains: a reader of 320 KB/s went 3 s without one
/// (helper-147, at 2 s). A minute is the write stall's; 10 s cuts a stopped reader sooner.
const PINNING_IDLE: Duration = Duration::from_secs(10);

/// Cut the subscriptions of `channel` that `cut` picks; how many were cut.
fn cut_where(channel: &Channel, stats: &Stats, cut: impl Fn(&Watcher) -> bool) -> usize {
    let mut n = 0;
    for watcher in &channel.watchers {
        if cut(watcher) && !watcher.kill.is_cancelled() {
            watcher.kill.cancel();
            stats.shed_lagging.fetch_add(1, Ordering::Relaxed);
            n += 1;
        }
    }
    n
}

/// What comes after a cursor.
enum Next {
    Event(Arc<Posted>),
    Nothing,
    Lagged,
}

/// One subscriber: a cursor into its channel's replay buffer.
pub(super) struct Subscription {
    /// Shared with the channel.
    watcher: Arc<Watcher>,
    hub: Arc<Hub>,
    name: Arc<str>,
    /// Last id sent.
    cursor: u64,
    /// `bodyB` frames instead of smee's.
    raw: bool,
    /// Wakes on each post to the channel.
    live: watch::Receiver<u64>,
    /// The rest of the frame being sent.
    pending: Bytes,
    /// Events this subscriber resumed after (`Last-Event-ID`) and the last one already
    /// evicted: told once, right after `ready`.
    gap: Option<(u64, u64)>,
    /// Not the page (`replay=all`): the events it is handed make the channel followed.
    follows: bool,
    /// The `ready` event went out.
    ready_sent: bool,
    /// The shutdown comment went out.
    final_sent: bool,
    /// Budget for the subscriber itself.
    _charge: Charge,
}

impl Subscription {
    fn next_event(&self) -> Next {
        let mut channels = self.hub.lock();
        let Some(channel) = channels.map.get_mut(&self.name) else {
            return Next::Lagged;
        };
        if channel.evicted_upto > self.cursor {
            return Next::Lagged;
        }
        let start = channel.events.partition_point(|e| e.id <= self.cursor);
        match channel.events.get(start) {
            Some(event) => {
                channel.followed |= self.follows;
                Next::Event(event.clone())
            }
            None => Next::Nothing,
        }
    }

    /// The next piece of the stream; None ends it.
    pub(super) async fn next(&mut self, pings: &mut tokio::time::Interval) -> Option<Bytes> {
        loop {
            if self.final_sent {
                return None;
            }
            if self.hub.shutdown.is_cancelled() {
                self.final_sent = true;
                return Some(Bytes::from_static(b": the server is shutting down\n\n"));
            }
            if !self.pending.is_empty() {
                let n = self.pending.len().min(CHUNK);
                (self.watcher.took_ms).store(crate::clock::now_ms(), Ordering::Relaxed);
                return Some(self.pending.split_to(n));
            }
            // Asked for more: the frame's last piece is written (or in hyper's hands).
            self.watcher.sending.store(0, Ordering::Relaxed);
            if !self.ready_sent {
                self.ready_sent = true;
                return Some(Bytes::from_static(b"event: ready\ndata: {}\n\n"));
            }
            if let Some((after, upto)) = self.gap.take() {
                if upto == 0 {
                    // The stream was reset: ids start again below `after`.
                    return Some(Bytes::from(format!(
                        "event: gap\ndata: {{\"after\":{after},\"reset\":true}}\n\n"
                    )));
                }
                return Some(Bytes::from(format!(
                    "event: gap\ndata: {{\"after\":{after},\"upto\":{upto}}}\n\n"
                )));
            }
            self.live.borrow_and_update();
            match self.next_event() {
                Next::Event(event) => {
                    self.cursor = event.id;
                    self.watcher.cursor.store(event.id, Ordering::Relaxed);
                    self.watcher.sending.store(event.id, Ordering::Relaxed);
                    self.pending = if event.body.len() > BUILT_ASIDE && !event.has_frame(self.raw) {
                        // Made on a blocking thread: smee's frame of a large body (up to 6
                        // times it) took seconds on the one thread every request waits on.
                        let (built, raw) = (event.clone(), self.raw);
                        tokio::task::spawn_blocking(move || built.frame(raw))
                            .await
                            .unwrap_or_else(|_| event.frame(self.raw))
                    } else {
                        event.frame(self.raw)
                    };
                    continue;
                }
                Next::Lagged => {
                    // Fell behind the replay buffer: end the stream; the client reconnects
                    // with Last-Event-ID and catches up from what is kept.
                    if !self.watcher.kill.is_cancelled() {
                        self.watcher.kill.cancel();
                        self.hub.stats.shed_lagging.fetch_add(1, Ordering::Relaxed);
                    }
                    return None;
                }
                Next::Nothing => {}
            }
            tokio::select! {
                _ = self.hub.shutdown.cancelled() => {}
                _ = pings.tick() => return Some(Bytes::from_static(b"event: ping\ndata: {}\n\n")),
                changed = self.live.changed() => if changed.is_err() { return None },
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.stats.subscribers.fetch_sub(1, Ordering::Relaxed);
        let mut channels = self.hub.lock();
        if let Some(channel) = channels.map.get_mut(&self.name) {
            channel.watchers.retain(|w| !Arc::ptr_eq(w, &self.watcher));
            channel.last_used_ms = crate::clock::now_ms();
        }
    }
}

/// Run [`Hub::sweep`] every `every` until shutdown.
pub(super) async fn sweeper(hub: Arc<Hub>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = hub.shutdown.cancelled() => return,
            _ = ticks.tick() => hub.sweep().await,
        }
    }
}

/// Log once that the budget was hit, so an operator knows replay got shorter.
pub(super) fn warn_evicting(stats: &Stats) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if stats.evicted_memory.load(Ordering::Relaxed) > 0 && !WARNED.swap(true, Ordering::Relaxed) {
        warn!(
            "the memory budget (--max-memory) is full: replay data is being evicted, from the channels holding the most"
        );
    }
}

/// About what a query value holds in memory: its text, and each element's slot of an array. A
/// name repeated 30,000 times in one POST (`?a&a&...`, within the 64 KiB head) holds megabytes
/// in its array; it was charged 16 bytes, and posts of it got past `--max-memory`.
fn value_bytes(value: &serde_json::Value) -> usize {
    use serde_json::Value;
    match value {
        Value::String(text) => text.len(),
        Value::Array(items) => items
            .iter()
            .map(|item| std::mem::size_of::<Value>() + value_bytes(item))
            .sum(),
        Value::Object(fields) => fields
            .iter()
            .map(|(name, item)| name.len() + 48 + value_bytes(item))
            .sum(),
        Value::Null | Value::Bool(_) | Value::Number(_) => 16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> Arc<Hub> {
        let stats = Arc::new(Stats::default());
        Arc::new(Hub::new(
            ServeConfig::default(),
            None,
            stats,
            Default::default(),
            tokio_util::sync::CancellationToken::new(),
            None,
        ))
    }

    /// Regression (helper-128): on a full disk, the sweep's write of nothing succeeded each
    /// second and said the store healthy again ("storing posted events again", /healthz ok)
    /// while every post still got 503, and each post logged a warning of its own. Its probe
    /// now writes as much as the refused post.
    #[tokio::test]
    async fn regression_a_full_disk_said_the_store_healthy_every_second() {
        let dir = tempfile::tempdir().unwrap();
        let full = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let store = super::super::store::tests::full_disk_store(
            dir.path().join("serve.redb"),
            full.clone(),
            true,
        );
        let stats = Arc::new(Stats::default());
        let hub = Arc::new(Hub::new(
            ServeConfig::default(),
            Some(Arc::new(store)),
            stats.clone(),
            Default::default(),
            tokio_util::sync::CancellationToken::new(),
            None,
        ));
        let big = |id| {
            Posted::new(
                &stats,
                id,
                0,
                vec![],
                Default::default(),
                String::new(),
                Bytes::from(vec![b'x'; 1 << 20]),
            )
        };
        full.store(true, Ordering::SeqCst);
        assert!(hub.post("ch", big).await.is_err(), "the disk is full");
        assert!(!stats.store_healthy.load(Ordering::Relaxed));
        hub.sweep().await;
        assert!(
            !stats.store_healthy.load(Ordering::Relaxed),
            "nothing stored, nothing deleted: not healthy again"
        );
        // Room again: the sweep's probe (as large as the refused post) finds it, with no post
        // (helper-130: a load balancer reading /healthz sends none while it fails).
        full.store(false, Ordering::SeqCst);
        hub.sweep().await;
        assert!(stats.store_healthy.load(Ordering::Relaxed));
        assert!(hub.post("ch", big).await.is_ok());
    }

    /// Regression (helper-130): a flood's count was said only with the next flood, with the
    /// next one's sender; it is said once its minute is over.
    #[test]
    fn regression_a_floods_count_waited_for_the_next_flood() {
        let stats = Stats::default();
        let ip: std::net::IpAddr = "192.0.2.7".parse().unwrap();
        let start = std::time::Instant::now();
        for _ in 0..3 {
            stats.say_refused_token(ip);
            stats.say_shed("a test");
            // helper-142: posts refused for memory were counted, never said.
            stats.say_refused_memory(&HubError::MemoryFull);
        }
        assert!(stats.refusing_for_memory(), "/healthz fails meanwhile");
        assert!(
            stats.floods_due(start).is_empty(),
            "said at the first, then a minute"
        );
        let due = stats.floods_due(start + std::time::Duration::from_secs(61));
        assert_eq!(
            due,
            [
                shed_line(2, "a test"),
                "refused 2 requests without the right token since the last report (the latest from 192.0.2.7)".to_string(),
                memory_line(2, &HubError::MemoryFull.to_string()),
            ]
        );
        assert!(
            stats
                .floods_due(start + std::time::Duration::from_secs(200))
                .is_empty()
        );
    }

    /// Regression (helper-130): gap warnings said per channel let a stranger's channels buy a
    /// line each (218 lines in 6 s); at most 10 a minute now, the rest counted in one line.
    #[test]
    fn regression_gap_warnings_of_many_channels_flooded_the_log() {
        let stats = Stats::default();
        let start = std::time::Instant::now();
        let said = (0..12).filter(|_| stats.gap_line_allowed(start)).count();
        assert_eq!(said, 10);
        let later = start + std::time::Duration::from_secs(61);
        assert_eq!(
            stats.floods_due(later),
            [
                "2 more gap warnings not said in the last minute, past 10 lines (smee_relay_serve_gaps_total counts every gap)"
            ]
        );
        assert!(stats.gap_line_allowed(later));
    }

    /// `?a&a&...` 30,000 times: one array of 30,000 values, charged 16 bytes before.
    #[test]
    fn regression_a_repeated_query_name_was_charged_as_one_value() {
        let stats = Arc::new(Stats::default());
        let mut query = serde_json::Map::new();
        query.insert("a".into(), vec![serde_json::Value::from(""); 30_000].into());
        let posted = Posted::new(&stats, 1, 0, vec![], query, String::new(), Bytes::new());
        let held = stats.held.load(Ordering::Relaxed);
        assert!(
            held >= 30_000 * std::mem::size_of::<serde_json::Value>(),
            "charged {held} bytes"
        );
        drop(posted);
        assert_eq!(stats.held.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn sequences_the_feed_never_saw_cut_live_subscribers_and_are_told_on_resume() {
        let hub = hub();
        let kill = tokio_util::sync::CancellationToken::new();
        let live = hub
            .subscribe("ch", Some(4), false, false, kill.clone(), None)
            .unwrap();
        assert_eq!(live.gap, None);
        hub.unseen(5, 9);
        assert!(kill.is_cancelled(), "a subscriber before the hole is cut");
        let resumed = hub
            .subscribe("ch", Some(4), false, false, Default::default(), None)
            .unwrap();
        assert_eq!(resumed.gap, Some((4, 9)));
        let after = hub
            .subscribe("ch", Some(9), false, false, Default::default(), None)
            .unwrap();
        assert_eq!(after.gap, None, "nothing unseen after 9");
        drop(live);
    }
}
