//! `smee-relay serve`: a self-hosted, smee-compatible channel server.
//!
//! What it adds over smee.io, and why:
//! - **replay**: event ids are unique per channel and keep growing across server restarts (they
//!   start from the clock), so a client reconnecting with `Last-Event-ID` gets what it missed,
//!   including events posted while nobody was connected;
//! - **raw bodies**: a subscriber that sends `x-smee-relay-raw: 1` gets `bodyB`, the exact
//!   bytes of every POST, in place of `body`, so any sender's signature verifies and form or
//!   binary bodies survive. Others get smee's standard shape, with no key that smee-client would forward as a header;
//! - **any content type**, up to `--max-body`;
//! - **bounded memory**: each channel keeps its recent events (count, bytes and age limits); a
//!   subscriber that falls further behind than the live buffer is disconnected and catches up by
//!   replay;
//! - **optional tokens** for subscribers and posters (`Authorization: Bearer`).
//!
//! Buffers live in memory, and with `--state-dir` also on disk (`serve.redb`): a post is
//! answered 200 only once it is stored, and a restarted server replays what it had.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// How the server is run.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Largest POST body accepted.
    pub max_body: usize,
    /// Most events kept per channel for replay.
    pub max_events: usize,
    /// Most bytes kept for replay, across all channels.
    pub max_bytes: usize,
    /// How long an event is kept for replay.
    pub retain: Duration,
    /// Required from subscribers (`GET`), if set.
    pub subscribe_token: Option<String>,
    /// Required from posters (`POST`), if set.
    pub post_token: Option<String>,
    /// Interval of `ping` events (smee.io: 30 s).
    pub ping: Duration,
    /// Keep buffers on disk here, so they survive a restart of the server.
    pub state_dir: Option<std::path::PathBuf>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            max_body: 25 << 20,
            max_events: 1000,
            max_bytes: 64 << 20,
            retain: Duration::from_secs(3600),
            subscribe_token: None,
            post_token: None,
            ping: Duration::from_secs(30),
            state_dir: None,
        }
    }
}

/// One posted webhook, as kept for replay.
struct Posted {
    id: u64,
    received_ms: u64,
    headers: Vec<(String, String)>,
    query: serde_json::Map<String, serde_json::Value>,
    content_type: String,
    body: Bytes,
}

impl Posted {
    fn size(&self) -> usize {
        self.body.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }

    /// The smee `data:` payload: headers, `query`, `timestamp`, and the body: as `body` (smee's
    /// parsed form), or with `raw` as `bodyB` (the exact bytes) instead. Not both: a raw
    /// subscriber never reads `body`, and sending it too would more than double each frame.
    fn data(&self, raw: bool) -> String {
        let mut map = serde_json::Map::new();
        for (name, value) in &self.headers {
            map.insert(name.clone(), value.clone().into());
        }
        let body = if raw {
            base64::engine::general_purpose::STANDARD
                .encode(&self.body)
                .into()
        } else {
            parsed_body(&self.content_type, &self.body)
        };
        map.insert((if raw { "bodyB" } else { "body" }).into(), body);
        map.insert("query".into(), self.query.clone().into());
        map.insert("timestamp".into(), self.received_ms.into());
        serde_json::Value::Object(map).to_string()
    }

    fn frame(&self, raw: bool) -> String {
        format!("id: {}\ndata: {}\n\n", self.id, self.data(raw))
    }
}

/// `body` as smee shows it: parsed JSON, form fields as an object, else the text.
fn parsed_body(content_type: &str, body: &[u8]) -> serde_json::Value {
    if content_type.contains("json")
        && let Ok(value) = serde_json::from_slice(body)
    {
        return value;
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
        return fields.into();
    }
    String::from_utf8_lossy(body).into_owned().into()
}

struct Channel {
    next_id: u64,
    events: VecDeque<Arc<Posted>>,
    live: broadcast::Sender<Arc<Posted>>,
}

struct Hub {
    config: ServeConfig,
    channels: Mutex<HashMap<String, Channel>>,
    /// The buffers on disk, with `--state-dir`.
    store: Option<Arc<Store>>,
    /// Posts are stored and sent one at a time, so live subscribers see ids in order.
    post_order: tokio::sync::Mutex<()>,
    /// Ends every stream on shutdown (a graceful shutdown waits for open connections).
    shutdown: CancellationToken,
}

impl Hub {
    /// Store a webhook (on disk first, with `--state-dir`) and hand it to live subscribers.
    async fn post(&self, name: &str, make: impl FnOnce(u64) -> Posted) -> Result<u64, String> {
        let _in_order = self.post_order.lock().await;
        let (posted, evicted) = {
            let mut channels = self.channels.lock().expect("not poisoned");
            let channel = channels.entry(name.to_string()).or_insert_with(new_channel);
            let posted = Arc::new(make(channel.next_id));
            channel.next_id += 1;
            channel.events.push_back(posted.clone());
            (posted, self.evict(&mut channels))
        };
        if let Some(store) = &self.store {
            let (store, name, stored) = (store.clone(), name.to_string(), posted.clone());
            tokio::task::spawn_blocking(move || store.save(&name, &stored, &evicted))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        let channels = self.channels.lock().expect("not poisoned");
        if let Some(channel) = channels.get(name) {
            let _ = channel.live.send(posted.clone());
        }
        Ok(posted.id)
    }

    /// Drop what is too old, too many, or beyond the byte budget (oldest first). Returns what
    /// went, as (channel, id).
    fn evict(&self, channels: &mut HashMap<String, Channel>) -> Vec<(String, u64)> {
        let mut evicted = Vec::new();
        let cutoff = crate::clock::now_ms().saturating_sub(self.config.retain.as_millis() as u64);
        let mut total = 0;
        for (name, channel) in channels.iter_mut() {
            while channel.events.len() > self.config.max_events
                || channel
                    .events
                    .front()
                    .is_some_and(|e| e.received_ms < cutoff)
            {
                if let Some(gone) = channel.events.pop_front() {
                    evicted.push((name.clone(), gone.id));
                }
            }
            total += channel.events.iter().map(|e| e.size()).sum::<usize>();
        }
        while total > self.config.max_bytes {
            let oldest = channels
                .iter_mut()
                .filter(|(_, c)| !c.events.is_empty())
                .min_by_key(|(_, c)| c.events.front().map(|e| e.received_ms));
            match oldest.and_then(|(name, c)| Some((name.clone(), c.events.pop_front()?))) {
                Some((name, gone)) => {
                    total -= gone.size();
                    evicted.push((name, gone.id));
                }
                None => break,
            }
        }
        evicted
    }
}

fn new_channel() -> Channel {
    // Ids start from the clock, so they keep growing across server restarts and a client's
    // remembered Last-Event-ID never hides new events.
    let start = crate::clock::now_ms().saturating_mul(1000);
    Channel {
        next_id: start,
        events: VecDeque::new(),
        live: broadcast::channel(1024).0,
    }
}

/// Serve until `cancel`. Returns the address it listens on once bound.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: ServeConfig,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let max_body = config.max_body;
    let (store, channels) = match &config.state_dir {
        Some(dir) => {
            let store = Store::open(dir)?;
            let channels = store.load()?;
            info!(path = %store.path.display(), channels = channels.len(), "server buffers restored");
            (Some(Arc::new(store)), channels)
        }
        None => (None, HashMap::new()),
    };
    let hub = Arc::new(Hub {
        config,
        channels: Mutex::new(channels),
        store,
        post_order: tokio::sync::Mutex::new(()),
        shutdown: cancel.clone(),
    });
    let router = Router::new()
        .route("/new", get(new_channel_redirect).head(new_channel_redirect))
        .route("/{channel}", get(subscribe).post(post))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(hub);
    info!(addr = %listener.local_addr()?, "serving smee channels");
    axum::serve(listener, router)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
}

/// Bind `addr` and serve (the `serve` command).
pub async fn run(
    addr: SocketAddr,
    config: ServeConfig,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    serve(listener, config, cancel).await
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn authorized(headers: &HeaderMap, token: &Option<String>) -> bool {
    let Some(token) = token else { return true };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Constant-time compare: a token is a secret.
    given.is_some_and(|given| {
        given.len() == token.len()
            && given
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    })
}

async fn new_channel_redirect(headers: HeaderMap) -> Response {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let proto = text("x-forwarded-proto").unwrap_or("http");
    let host = text("x-forwarded-host")
        .or(text("host"))
        .unwrap_or("localhost");
    let id: String = std::iter::repeat_with(fastrand::alphanumeric)
        .take(16)
        .collect();
    (
        StatusCode::TEMPORARY_REDIRECT,
        [(header::LOCATION, format!("{proto}://{host}/{id}"))],
    )
        .into_response()
}

async fn post(
    State(hub): State<Arc<Hub>>,
    Path(name): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !valid_name(&name) {
        return (StatusCode::BAD_REQUEST, "bad channel name").into_response();
    }
    if !authorized(&headers, &hub.config.post_token) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let kept: Vec<(String, String)> = headers
        .iter()
        .filter(|(name, _)| !matches!(name.as_str(), "host" | "content-length" | "authorization"))
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_string())))
        .collect();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut params = serde_json::Map::new();
    for (k, v) in query {
        params.insert(k, v.into());
    }
    let stored = hub
        .post(&name, |id| Posted {
            id,
            received_ms: crate::clock::now_ms(),
            headers: kept,
            query: params,
            content_type,
            body,
        })
        .await;
    match stored {
        Ok(_) => (StatusCode::OK, "ok").into_response(),
        Err(e) => {
            tracing::error!(channel = %crate::url::redact(&name), "cannot store a posted event: {e}");
            (StatusCode::SERVICE_UNAVAILABLE, "cannot store the event").into_response()
        }
    }
}

async fn subscribe(
    State(hub): State<Arc<Hub>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !valid_name(&name) {
        return (StatusCode::BAD_REQUEST, "bad channel name").into_response();
    }
    if !authorized(&headers, &hub.config.subscribe_token) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let wants_stream = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if !wants_stream {
        return page(&hub, &name).into_response();
    }
    let raw = headers.contains_key(crate::source::wire::RAW_OPT_IN);
    let last_seen: Option<u64> = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    // Subscribe before taking the backlog, under one lock, so nothing falls in between.
    let (backlog, mut live) = {
        let mut channels = hub.channels.lock().expect("not poisoned");
        let channel = channels.entry(name.clone()).or_insert_with(new_channel);
        let backlog: Vec<Arc<Posted>> = match last_seen {
            Some(seen) => channel
                .events
                .iter()
                .filter(|e| e.id > seen)
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        (backlog, channel.live.subscribe())
    };
    let ping = hub.config.ping;
    let shutdown = hub.shutdown.clone();
    let stream = async_stream(move |tx| async move {
        let send = |text: String| tx.send(Ok::<_, std::io::Error>(Bytes::from(text)));
        if send("event: ready\ndata: {}\n\n".into()).await.is_err() {
            return;
        }
        let mut newest = last_seen.unwrap_or(0);
        for event in backlog {
            newest = event.id;
            if send(event.frame(raw)).await.is_err() {
                return;
            }
        }
        let mut pings = tokio::time::interval(ping);
        pings.tick().await;
        loop {
            let text = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = pings.tick() => "event: ping\ndata: {}\n\n".to_string(),
                next = live.recv() => match next {
                    Ok(event) if event.id <= newest => continue,
                    Ok(event) => { newest = event.id; event.frame(raw) }
                    // Fell behind the live buffer: end the stream; the client reconnects
                    // with Last-Event-ID and catches up from the replay buffer.
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            if send(text).await.is_err() {
                return;
            }
        }
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// A stream fed by a task through a small channel: memory per subscriber stays bounded, and a
/// slow reader slows only its own task.
fn async_stream<F, Fut>(
    produce: F,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(produce(tx));
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

/// The page a browser sees: the channel's recent events.
fn page(hub: &Hub, name: &str) -> Html<String> {
    let channels = hub.channels.lock().expect("not poisoned");
    let escape = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let mut rows = String::new();
    if let Some(channel) = channels.get(name) {
        for event in channel.events.iter().rev().take(50) {
            rows.push_str(&format!(
                "<li><code>{}</code> {} bytes, {}</li>",
                event.id,
                event.body.len(),
                escape(&event.content_type)
            ));
        }
    }
    Html(format!(
        "<!doctype html><title>smee-relay channel</title><h1>Channel {}</h1>\
         <p>Subscribe with <code>smee-relay forward URL --port 3000</code>. Recent events:</p><ul>{rows}</ul>",
        escape(&crate::url::redact(name))
    ))
}

/// The server's buffers on disk (`serve.redb` in `--state-dir`).
struct Store {
    db: redb::Database,
    path: std::path::PathBuf,
}

const STORED: redb::TableDefinition<(&str, u64), &[u8]> = redb::TableDefinition::new("posted");

/// The part of a posted event that is not its body.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredHead {
    received_ms: u64,
    headers: Vec<(String, String)>,
    query: serde_json::Map<String, serde_json::Value>,
    content_type: String,
}

fn io_error(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl Store {
    fn open(dir: &std::path::Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("serve.redb");
        let db = redb::Database::create(&path).map_err(|e| {
            io_error(format!(
                "cannot open {}: {e}; if it is damaged, move it aside and start again",
                path.display()
            ))
        })?;
        Ok(Self { db, path })
    }

    fn load(&self) -> std::io::Result<HashMap<String, Channel>> {
        use redb::{ReadableDatabase as _, ReadableTable as _};
        let txn = self.db.begin_read().map_err(io_error)?;
        let mut channels: HashMap<String, Channel> = HashMap::new();
        let table = match txn.open_table(STORED) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(channels),
            Err(e) => return Err(io_error(e)),
        };
        for entry in table.iter().map_err(io_error)? {
            let (key, value) = entry.map_err(io_error)?;
            let (name, id) = key.value();
            let bytes = value.value();
            let Some(len) = bytes
                .get(..4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4")) as usize)
            else {
                continue;
            };
            let Some(head) = bytes
                .get(4..4 + len)
                .and_then(|h| serde_json::from_slice::<StoredHead>(h).ok())
            else {
                continue;
            };
            let channel = channels.entry(name.to_string()).or_insert_with(new_channel);
            channel.next_id = channel.next_id.max(id + 1);
            channel.events.push_back(Arc::new(Posted {
                id,
                received_ms: head.received_ms,
                headers: head.headers,
                query: head.query,
                content_type: head.content_type,
                body: Bytes::copy_from_slice(&bytes[4 + len..]),
            }));
        }
        Ok(channels)
    }

    fn save(&self, name: &str, posted: &Posted, evicted: &[(String, u64)]) -> std::io::Result<()> {
        let head = serde_json::to_vec(&StoredHead {
            received_ms: posted.received_ms,
            headers: posted.headers.clone(),
            query: posted.query.clone(),
            content_type: posted.content_type.clone(),
        })
        .map_err(io_error)?;
        let mut value = Vec::with_capacity(4 + head.len() + posted.body.len());
        value.extend_from_slice(&(head.len() as u32).to_le_bytes());
        value.extend_from_slice(&head);
        value.extend_from_slice(&posted.body);
        let txn = self.db.begin_write().map_err(io_error)?;
        {
            let mut table = txn.open_table(STORED).map_err(io_error)?;
            table
                .insert((name, posted.id), value.as_slice())
                .map_err(io_error)?;
            for (channel, id) in evicted {
                table.remove((channel.as_str(), *id)).map_err(io_error)?;
            }
        }
        txn.commit().map_err(io_error)
    }
}
