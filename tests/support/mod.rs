//! In-process fakes for black-box tests, all on 127.0.0.1 port 0:
//! - [`FakeChannel`]: a smee-compatible SSE server whose frames the test writes byte by byte;
//! - [`FakeTarget`]: an HTTP server that records every request and answers as scripted.
//!
//! Plus helpers to run the real binary.
#![allow(dead_code)] // each test file uses a different part of this module

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};

/// How long a test waits for something that should happen promptly.
pub const PATIENCE: Duration = Duration::from_secs(20);

async fn serve(router: Router) -> SocketAddr {
    serve_on("127.0.0.1:0".parse().unwrap(), router).await
}

async fn serve_on(addr: SocketAddr, router: Router) -> SocketAddr {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

// ---------------------------------------------------------------------------------------------
// Fake channel
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct ChannelState {
    /// One sender per open subscriber connection.
    subscribers: Vec<mpsc::UnboundedSender<Bytes>>,
    /// Every subscription request seen: its `Accept` and `Last-Event-ID`.
    requests: Vec<(Option<String>, Option<String>)>,
    /// What to answer instead of a stream, if set: (status, content type).
    refuse_with: Option<(u16, &'static str)>,
}

/// A smee-like channel server. The test writes frames; the server sends them to every
/// connected subscriber, after the `ready` frame smee sends on connect.
#[derive(Clone)]
pub struct FakeChannel {
    pub addr: SocketAddr,
    state: Arc<Mutex<ChannelState>>,
    connected: Arc<Notify>,
}

impl FakeChannel {
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(ChannelState::default()));
        let connected = Arc::new(Notify::new());
        let router = Router::new()
            .route("/new", any(new_channel))
            .route("/{channel}", get(subscribe))
            .with_state((state.clone(), connected.clone()));
        let addr = serve(router).await;
        Self {
            addr,
            state,
            connected,
        }
    }

    /// The URL of a channel on this server.
    pub fn url(&self, id: &str) -> String {
        format!("http://{}/{id}", self.addr)
    }

    /// Write raw bytes to every open connection.
    pub fn send_raw(&self, bytes: impl Into<Bytes>) {
        let bytes = bytes.into();
        let state = self.state.lock().unwrap();
        for subscriber in &state.subscribers {
            let _ = subscriber.send(bytes.clone());
        }
    }

    /// Send a webhook frame: `id: N` and one `data:` line.
    pub fn send_webhook(&self, id: u64, data: &str) {
        self.send_raw(format!("id: {id}\ndata: {data}\n\n"));
    }

    /// End every open connection (the server closes the stream).
    pub fn close_all(&self) {
        self.state.lock().unwrap().subscribers.clear();
    }

    /// Answer subscriptions with this status and content type instead of a stream.
    pub fn refuse_with(&self, status: u16, content_type: &'static str) {
        self.state.lock().unwrap().refuse_with = Some((status, content_type));
    }

    /// How many subscription requests have been made so far.
    pub fn connections(&self) -> usize {
        self.state.lock().unwrap().requests.len()
    }

    /// The `Last-Event-ID` of subscription request `n` (0-based).
    pub fn last_event_id(&self, n: usize) -> Option<String> {
        self.state.lock().unwrap().requests[n].1.clone()
    }

    /// The `Accept` header of subscription request `n`.
    pub fn accept(&self, n: usize) -> Option<String> {
        self.state.lock().unwrap().requests[n].0.clone()
    }

    /// Wait until at least `n` subscribers have connected in total.
    pub async fn wait_connections(&self, n: usize) {
        tokio::time::timeout(PATIENCE, async {
            loop {
                let notified = self.connected.notified();
                if self.connections() >= n {
                    return;
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("expected {n} connections, saw {}", self.connections()));
    }
}

type ChannelShared = (Arc<Mutex<ChannelState>>, Arc<Notify>);

async fn new_channel(headers: HeaderMap) -> Response {
    let _ = headers;
    (
        StatusCode::TEMPORARY_REDIRECT,
        [(header::LOCATION, "/FreshChannel42")],
    )
        .into_response()
}

async fn subscribe(
    State((state, connected)): State<ChannelShared>,
    Path(_channel): Path<String>,
    headers: HeaderMap,
) -> Response {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let refuse = {
        let mut state = state.lock().unwrap();
        state.requests.push((text("accept"), text("last-event-id")));
        if state.refuse_with.is_none() {
            let _ = tx.send(Bytes::from_static(b"id: 0\nevent: ready\ndata: {}\n\n"));
            state.subscribers.push(tx);
        }
        state.refuse_with
    };
    connected.notify_waiters();
    if let Some((status, content_type)) = refuse {
        return (
            StatusCode::from_u16(status).unwrap(),
            [(header::CONTENT_TYPE, content_type)],
            "<html>not a stream</html>",
        )
            .into_response();
    }
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|bytes| (Ok::<_, std::io::Error>(bytes), rx))
    });
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(stream),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------------
// Fake target
// ---------------------------------------------------------------------------------------------

/// One request the target received.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    /// Path and query, as sent.
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Default)]
struct TargetScript {
    /// Statuses to answer, in order, with a `Retry-After` if given; when empty, 200.
    statuses: VecDeque<(u16, Option<u64>)>,
    /// How long to wait before answering.
    delay: Duration,
}

/// An HTTP server that records requests and answers as the test scripts.
pub struct FakeTarget {
    pub addr: SocketAddr,
    received: mpsc::UnboundedReceiver<Received>,
    script: Arc<Mutex<TargetScript>>,
}

/// A loopback address with nothing listening on it (yet): a target that is down.
pub fn unused_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

impl FakeTarget {
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    /// Start on a given address: a target that was down comes up.
    pub async fn start_on(addr: SocketAddr) -> Self {
        let (tx, received) = mpsc::unbounded_channel();
        let script = Arc::new(Mutex::new(TargetScript::default()));
        let router = Router::new()
            .fallback(record)
            .with_state((tx, script.clone()));
        let addr = serve_on(addr, router).await;
        Self {
            addr,
            received,
            script,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Answer the next requests with these statuses (then 200 again).
    pub fn answer_with(&self, statuses: &[u16]) {
        let mut script = self.script.lock().unwrap();
        script.statuses.extend(statuses.iter().map(|s| (*s, None)));
    }

    /// Answer the next request with `status` and `Retry-After: seconds`.
    pub fn answer_with_retry_after(&self, status: u16, seconds: u64) {
        let mut script = self.script.lock().unwrap();
        script.statuses.push_back((status, Some(seconds)));
    }

    /// Wait this long before answering each request.
    pub fn delay(&self, delay: Duration) {
        self.script.lock().unwrap().delay = delay;
    }

    /// The next request, or a panic after [`PATIENCE`].
    pub async fn next(&mut self) -> Received {
        tokio::time::timeout(PATIENCE, self.received.recv())
            .await
            .expect("the target received nothing in time")
            .expect("target stopped")
    }

    /// `n` requests, in arrival order.
    pub async fn take(&mut self, n: usize) -> Vec<Received> {
        let mut all = Vec::with_capacity(n);
        for _ in 0..n {
            all.push(self.next().await);
        }
        all
    }

    /// The next request if one arrives within `wait`.
    pub async fn try_next(&mut self, wait: Duration) -> Option<Received> {
        tokio::time::timeout(wait, self.received.recv())
            .await
            .ok()
            .flatten()
    }

    /// Forget whatever arrives within `wait`.
    pub async fn drain(&mut self, wait: Duration) {
        while let Ok(Some(_)) = tokio::time::timeout(wait, self.received.recv()).await {}
    }

    /// Assert nothing more arrives for `wait`.
    pub async fn assert_quiet(&mut self, wait: Duration) {
        if let Ok(Some(extra)) = tokio::time::timeout(wait, self.received.recv()).await {
            panic!("unexpected request: {extra:?}");
        }
    }
}

type TargetShared = (mpsc::UnboundedSender<Received>, Arc<Mutex<TargetScript>>);

async fn record(
    State((tx, script)): State<TargetShared>,
    request: axum::extract::Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let (status, delay) = {
        let mut script = script.lock().unwrap();
        (
            script.statuses.pop_front().unwrap_or((200, None)),
            script.delay,
        )
    };
    tokio::time::sleep(delay).await;
    let _ = tx.send(Received {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers: parts.headers,
        body,
    });
    let mut response = StatusCode::from_u16(status.0).unwrap().into_response();
    if let Some(seconds) = status.1 {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, seconds.to_string().parse().unwrap());
    }
    response
}

// ---------------------------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------------------------

/// A fresh, empty state directory under the cargo target dir.
pub fn fresh_state_dir() -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("state-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A `smee-relay` command with no inherited `PORT` or `RUST_LOG`, and its own fresh state dir
/// (override with `--state-dir`).
pub fn smee_relay() -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_smee-relay"));
    command
        .env("SMEE_RELAY_STATE_DIR", fresh_state_dir())
        .env_remove("STATE_DIRECTORY")
        .env_remove("PORT")
        .env_remove("RUST_LOG")
        .env_remove("SMEE_RELAY_LOG_FORMAT")
        .kill_on_drop(true);
    command
}

/// Collects a child's stderr lines so a test can wait for a log line.
pub struct LogWatch {
    lines: Arc<Mutex<Vec<String>>>,
    grew: Arc<Notify>,
}

impl LogWatch {
    pub fn new(stderr: tokio::process::ChildStderr) -> Self {
        use tokio::io::AsyncBufReadExt;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let grew = Arc::new(Notify::new());
        let (l, g) = (lines.clone(), grew.clone());
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                eprintln!("[smee-relay] {line}");
                l.lock().unwrap().push(line);
                g.notify_waiters();
            }
        });
        Self { lines, grew }
    }

    /// Wait for a line containing every one of `needles`, and return it.
    pub async fn wait_for(&self, needles: &[&str]) -> String {
        let found = tokio::time::timeout(PATIENCE, async {
            loop {
                let grew = self.grew.notified();
                if let Some(line) = self.find(needles) {
                    return line;
                }
                grew.await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no log line with {needles:?}:\n{}", self.all()))
    }

    pub fn find(&self, needles: &[&str]) -> Option<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .find(|line| needles.iter().all(|n| line.contains(n)))
            .cloned()
    }

    pub fn all(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

// ---------------------------------------------------------------------------------------------
// The relay, in process
// ---------------------------------------------------------------------------------------------

/// Reconnect and retry quickly: tests are about what happens, not how long the waits are.
pub const FAST: smee_relay::retry::BackoffPolicy = smee_relay::retry::BackoffPolicy {
    min: Duration::from_millis(10),
    max: Duration::from_millis(50),
};

/// Options for relaying a channel on `channel` to `target`, with fast retries and a fresh
/// state dir.
pub fn relay_options(
    channel: &FakeChannel,
    target: &str,
) -> smee_relay::commands::forward::ForwardOptions {
    let mut source =
        smee_relay::source::SourceConfig::new(channel.url("TestChannel123").parse().unwrap());
    source.reconnect = FAST;
    smee_relay::commands::forward::ForwardOptions {
        source,
        target: target.parse().unwrap(),
        target_timeout: Duration::from_secs(10),
        state_dir: fresh_state_dir(),
        retry: smee_relay::delivery::RetryPolicy {
            backoff: FAST,
            ..smee_relay::delivery::RetryPolicy::DEFAULT
        },
        retain: Duration::from_secs(3600),
        limits: smee_relay::spool::Limits { max_bytes: 1 << 30 },
        metrics_listen: None,
    }
}

/// A relay running in this process; stopped (gracefully) when dropped or by [`Relay::stop`].
pub struct Relay {
    pub cancel: tokio_util::sync::CancellationToken,
    pub state_dir: std::path::PathBuf,
    task: Option<tokio::task::JoinHandle<Result<(), smee_relay::service::daemon::DaemonError>>>,
}

impl Relay {
    /// Start relaying and wait until the channel has a new subscriber.
    pub async fn start(
        channel: &FakeChannel,
        options: smee_relay::commands::forward::ForwardOptions,
    ) -> Self {
        let before = channel.connections();
        let cancel = tokio_util::sync::CancellationToken::new();
        let state_dir = options.state_dir.clone();
        let task = tokio::spawn(smee_relay::commands::forward::forward(
            options,
            cancel.clone(),
        ));
        channel.wait_connections(before + 1).await;
        Self {
            cancel,
            state_dir,
            task: Some(task),
        }
    }

    /// Stop and wait until the spool is closed.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

// ---------------------------------------------------------------------------------------------
// Small shared helpers
// ---------------------------------------------------------------------------------------------

/// Send `signal` (e.g. "TERM", "HUP") to a child process, with the `kill` command.
pub fn signal(child: &tokio::process::Child, signal: &str) {
    let pid = child.id().expect("the child is running").to_string();
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// The bytes of a Port fixture (`shape`: legacy or automation; `file` without `.json`).
pub fn port_fixture(shape: &str, file: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/port/deployment-config/{shape}/{file}.json",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// The header line of a Slack message the fake Slack received.
pub fn slack_header(request: &Received) -> String {
    let message: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
    message["blocks"][0]["text"]["text"]
        .as_str()
        .unwrap()
        .to_string()
}
