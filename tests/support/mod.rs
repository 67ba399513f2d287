//! What every black-box test shares, so each test file holds only its tests:
//! - fakes, all on 127.0.0.1 port 0: [`FakeChannel`] (a smee-compatible SSE server whose frames
//!   the test writes byte by byte), [`FakeTarget`] (an HTTP server that records every request
//!   and answers as scripted), [`FakeSlack`] (a fake target at a Slack-like webhook URL);
//! - temp dirs that are removed: [`temp_dir`] (removed when dropped) and [`fresh_state_dir`]
//!   (removed when the test binary exits);
//! - waiting: [`wait_until`] and [`wait_for`] poll a condition until a deadline. Tests never
//!   sleep for a fixed time and hope; timers inside the library are tested on tokio's paused
//!   clock in its own unit tests;
//! - the real binary ([`smee_relay`], [`spawn_logged`], [`run_to_end`], [`LogWatch`]) and the
//!   relay in process ([`Relay`]).
//!
//! It must not hold assertions about the product: those belong in the tests.
#![allow(dead_code)] // each test file uses a different part of this module

pub mod nats;

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, watch};

/// How long a test waits for something that should happen promptly. Generous, because a
/// loaded machine is slow; a passing test never waits it out.
pub const PATIENCE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------------------------

/// The first pause between two checks of a condition; it doubles up to [`POLL_MAX`], so a
/// condition that holds at once costs nothing and a slow one costs few checks.
const POLL_MIN: Duration = Duration::from_millis(5);
/// The longest pause between two checks.
const POLL_MAX: Duration = Duration::from_millis(100);

/// Wait until `cond` holds; panic naming `what` if it does not within `deadline`.
pub async fn wait_until(deadline: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(deadline, what, || std::future::ready(cond().then_some(()))).await
}

/// Wait until `probe` returns `Some`, and return its value; panic naming `what` if it does not
/// within `deadline`. For conditions that take a request to check (an endpoint, a CLI run).
pub async fn wait_for<T, F, Fut>(deadline: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let give_up = tokio::time::Instant::now() + deadline;
    let mut pause = POLL_MIN;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        let now = tokio::time::Instant::now();
        assert!(now < give_up, "waited {deadline:?} in vain for: {what}");
        // The poll interval, not a wait for the condition itself.
        tokio::time::sleep(pause.min(give_up - now)).await;
        pause = (pause * 2).min(POLL_MAX);
    }
}

/// The body of a GET of `url`, or `None` while it cannot be had (not listening yet, cut off):
/// the probe of a [`wait_for`] on an endpoint.
pub async fn get_text(client: &reqwest::Client, url: &str) -> Option<String> {
    client.get(url).send().await.ok()?.text().await.ok()
}

// ---------------------------------------------------------------------------------------------
// Temp dirs
// ---------------------------------------------------------------------------------------------

/// A fresh, empty directory, removed (with all in it) when the value is dropped, also when
/// the test fails. Hold it as long as anything uses the directory.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("smee-relay-test-")
        .tempdir_in(scratch_root())
        .expect("a temp dir")
}

/// A fresh, empty state directory that lives until this test binary exits, for helpers that
/// hand out a path and cannot hold a [`temp_dir`] guard (a spawned command, [`relay_options`]).
pub fn fresh_state_dir() -> PathBuf {
    tempfile::Builder::new()
        .prefix("state-")
        .tempdir_in(scratch_root())
        .expect("a state dir")
        .keep()
}

/// This test binary's own directory under the cargo target dir: every temp dir of the run lives
/// in it, and it is removed when the process exits (a `static` is never dropped, so an `atexit`
/// hook does it; the test harness ends through `exit`, on success and on failure alike).
static SCRATCH_ROOT: OnceLock<PathBuf> = OnceLock::new();

fn scratch_root() -> &'static Path {
    SCRATCH_ROOT.get_or_init(|| {
        let root = tempfile::Builder::new()
            .prefix("smee-relay-tests-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("a scratch dir")
            .keep();
        // SAFETY: registers a plain `extern "C" fn()` that touches only a `static`, as `atexit`
        // expects.
        let registered = unsafe { libc::atexit(remove_scratch_root) };
        assert_eq!(registered, 0, "atexit");
        root
    })
}

extern "C" fn remove_scratch_root() {
    // Children spawned with `kill_on_drop` may still be exiting; their open files do not keep
    // the directory from being removed.
    if let Some(root) = SCRATCH_ROOT.get() {
        let _ = std::fs::remove_dir_all(root);
    }
}

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
    /// Every subscription request seen: its channel (path) and headers.
    requests: Vec<(String, HeaderMap)>,
    /// What to answer instead of a stream, if set: (status, content type).
    refuse_with: Option<(u16, &'static str)>,
    /// Channels that answer with a redirect instead: channel -> (status, `Location`).
    redirects: std::collections::HashMap<String, (u16, String)>,
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

    /// Header `name` of subscription request `n` (0-based).
    pub fn request_header(&self, n: usize, name: &str) -> Option<String> {
        let state = self.state.lock().unwrap();
        let value = state.requests[n].1.get(name)?;
        Some(value.to_str().unwrap().to_owned())
    }

    /// The channel (path without the leading `/`) of subscription request `n`.
    pub fn request_channel(&self, n: usize) -> String {
        self.state.lock().unwrap().requests[n].0.clone()
    }

    /// The `Last-Event-ID` of subscription request `n` (0-based).
    pub fn last_event_id(&self, n: usize) -> Option<String> {
        self.request_header(n, "last-event-id")
    }

    /// The `Accept` header of subscription request `n`.
    pub fn accept(&self, n: usize) -> Option<String> {
        self.request_header(n, "accept")
    }

    /// Answer subscriptions to `channel` with a redirect (`status`) to `location`.
    pub fn redirect(&self, channel: &str, status: u16, location: &str) {
        let mut state = self.state.lock().unwrap();
        state
            .redirects
            .insert(channel.to_owned(), (status, location.to_owned()));
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
    axum::extract::Path(channel): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let redirect = {
        let mut state = state.lock().unwrap();
        state.requests.push((channel.clone(), headers));
        state.redirects.get(&channel).cloned()
    };
    if let Some((status, location)) = redirect {
        connected.notify_waiters();
        return (
            StatusCode::from_u16(status).unwrap(),
            [(header::LOCATION, location)],
        )
            .into_response();
    }
    let refuse = {
        let mut state = state.lock().unwrap();
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
    /// When it reached the server (before any hold or scripted delay): for pacing checks.
    pub at: std::time::Instant,
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
    /// How long to wait before answering: a slow target.
    delay: Duration,
}

/// What the server side of a [`FakeTarget`] shares with the test.
struct TargetShared {
    received: mpsc::UnboundedSender<Received>,
    script: Mutex<TargetScript>,
    /// Requests that reached the server, answered or not (a test can act while one is in
    /// flight).
    arrived: AtomicUsize,
    arrivals: Notify,
    /// While true, answers wait (see [`FakeTarget::hold`]).
    held: watch::Sender<bool>,
    /// Every request as it reached the server, answered or not (see
    /// [`FakeTarget::arrivals`]).
    arrival_log: Mutex<Vec<Received>>,
}

/// An HTTP server that records requests and answers as the test scripts.
pub struct FakeTarget {
    pub addr: SocketAddr,
    received: mpsc::UnboundedReceiver<Received>,
    shared: Arc<TargetShared>,
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
        let shared = Arc::new(TargetShared {
            received: tx,
            script: Mutex::default(),
            arrived: AtomicUsize::new(0),
            arrivals: Notify::new(),
            held: watch::Sender::new(false),
            arrival_log: Mutex::default(),
        });
        let router = Router::new().fallback(record).with_state(shared.clone());
        let addr = serve_on(addr, router).await;
        Self {
            addr,
            received,
            shared,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Answer the next requests with these statuses (then 200 again).
    pub fn answer_with(&self, statuses: &[u16]) {
        let mut script = self.shared.script.lock().unwrap();
        script.statuses.extend(statuses.iter().map(|s| (*s, None)));
    }

    /// Answer the next request with `status` and `Retry-After: seconds`.
    pub fn answer_with_retry_after(&self, status: u16, seconds: u64) {
        let mut script = self.shared.script.lock().unwrap();
        script.statuses.push_back((status, Some(seconds)));
    }

    /// Wait this long before answering each request (a slow target).
    pub fn delay(&self, delay: Duration) {
        self.shared.script.lock().unwrap().delay = delay;
    }

    /// Hold every answer until [`FakeTarget::release`]: the test decides when a request in
    /// flight ends.
    pub fn hold(&self) {
        self.shared.held.send_replace(true);
    }

    /// Answer the held requests, and the next ones at once.
    pub fn release(&self) {
        self.shared.held.send_replace(false);
    }

    /// How many requests have reached the server so far, answered or not.
    pub fn arrived(&self) -> usize {
        self.shared.arrived.load(Ordering::SeqCst)
    }

    /// Every request that reached the server so far, in arrival order, answered or not (one
    /// whose sender died before the answer included).
    pub fn arrivals(&self) -> Vec<Received> {
        self.shared.arrival_log.lock().unwrap().clone()
    }

    /// Wait until `n` requests in all have reached the server (answered or not).
    pub async fn wait_arrived(&self, n: usize) {
        tokio::time::timeout(PATIENCE, async {
            loop {
                let arrivals = self.shared.arrivals.notified();
                if self.arrived() >= n {
                    return;
                }
                arrivals.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("expected {n} requests, {} arrived", self.arrived()));
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

    /// Assert that no request came beyond those taken. Exact once the sender has stopped: a
    /// request is recorded before it is answered, so whatever a stopped sender sent is here.
    pub fn assert_no_more(&mut self) {
        if let Ok(extra) = self.received.try_recv() {
            panic!("unexpected request: {extra:?}");
        }
    }

    /// Assert nothing more arrives for `wait`: for a sender that is still running; prefer
    /// [`FakeTarget::assert_no_more`] after stopping it.
    pub async fn assert_quiet(&mut self, wait: Duration) {
        if let Ok(Some(extra)) = tokio::time::timeout(wait, self.received.recv()).await {
            panic!("unexpected request: {extra:?}");
        }
    }
}

async fn record(
    State(shared): State<Arc<TargetShared>>,
    request: axum::extract::Request,
) -> Response {
    let at = std::time::Instant::now();
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    shared.arrival_log.lock().unwrap().push(Received {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers: parts.headers.clone(),
        body: body.clone(),
        at,
    });
    shared.arrived.fetch_add(1, Ordering::SeqCst);
    shared.arrivals.notify_waiters();
    let (status, delay) = {
        let mut script = shared.script.lock().unwrap();
        (
            script.statuses.pop_front().unwrap_or((200, None)),
            script.delay,
        )
    };
    // A slow target, as scripted: part of the fake's behaviour, not a wait of the test's.
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let _ = shared.held.subscribe().wait_for(|held| !held).await;
    let _ = shared.received.send(Received {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers: parts.headers,
        body,
        at,
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
// Fake Slack
// ---------------------------------------------------------------------------------------------

/// The path of [`FakeSlack`]'s webhook URL: it looks like a real one, secret parts included, so
/// a test can check that none of it is logged.
pub const SLACK_PATH: &str = "/services/T0SECRET/B0SECRET/xoxSECRETtoken";

/// A Slack incoming webhook: a [`FakeTarget`] (all of its methods work on it) that reads each
/// message's headline.
pub struct FakeSlack(FakeTarget);

impl FakeSlack {
    pub async fn start() -> Self {
        Self(FakeTarget::start().await)
    }

    /// The webhook URL to configure.
    pub fn webhook_url(&self) -> String {
        self.0.url(SLACK_PATH)
    }

    /// The headline of the next message.
    pub async fn next_headline(&mut self) -> String {
        slack_header(&self.0.next().await)
    }

    /// The headlines of the next `n` messages, in order.
    pub async fn headlines(&mut self, n: usize) -> Vec<String> {
        self.0.take(n).await.iter().map(slack_header).collect()
    }
}

impl std::ops::Deref for FakeSlack {
    type Target = FakeTarget;
    fn deref(&self) -> &FakeTarget {
        &self.0
    }
}

impl std::ops::DerefMut for FakeSlack {
    fn deref_mut(&mut self) -> &mut FakeTarget {
        &mut self.0
    }
}

// ---------------------------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------------------------

/// A `smee-relay` command with no inherited `PORT` or `RUST_LOG`, and its own state dir
/// (override with `--state-dir`): a new path under this binary's scratch dir, created only by a
/// command that uses it.
pub fn smee_relay() -> tokio::process::Command {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let state_dir = scratch_root().join(format!(
        "command-state-{}",
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_smee-relay"));
    command
        .env("SMEE_RELAY_STATE_DIR", state_dir)
        .env_remove("STATE_DIRECTORY")
        .env_remove("PORT")
        .env_remove("RUST_LOG")
        .env_remove("SMEE_RELAY_LOG_FORMAT")
        .kill_on_drop(true);
    command
}

/// Run `command` to its end: it must refuse to start (exit 2, a usage or setup error).
/// Returns its stderr, which says why.
pub async fn refused(command: &mut tokio::process::Command) -> String {
    let output = command.output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(2), "{command:?}: {stderr}");
    stderr
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

/// Spawn `command` with its stderr watched (stdout piped too, for a test that reads it).
pub fn spawn_logged(command: &mut tokio::process::Command) -> (tokio::process::Child, LogWatch) {
    let mut child = command
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let logs = LogWatch::new(child.stderr.take().unwrap());
    (child, logs)
}

/// What a command that ran to its end said.
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Run `command` to its end (within [`PATIENCE`]).
pub async fn run_to_end(command: &mut tokio::process::Command) -> Output {
    let output = tokio::time::timeout(PATIENCE, command.output())
        .await
        .expect("the command ended in time")
        .unwrap();
    Output {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Wait until the child exits (within [`PATIENCE`]) and return its exit code.
pub async fn exit_code(child: &mut tokio::process::Child) -> Option<i32> {
    tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("the process exited in time")
        .unwrap()
        .code()
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
    relay_options_for(&channel.url("TestChannel123"), target)
}

/// Options for relaying the channel at `channel_url` (any channel server) to `target`, with
/// fast retries and a fresh state dir.
pub fn relay_options_for(
    channel_url: &str,
    target: &str,
) -> smee_relay::commands::forward::ForwardOptions {
    let mut source = smee_relay::source::SourceConfig::new(channel_url.parse().unwrap());
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
        keep_free: 0,
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
        let relay = Self::spawn(options);
        channel.wait_connections(before + 1).await;
        relay
    }

    /// Start relaying, without waiting for anything (the caller knows what to wait for).
    pub fn spawn(options: smee_relay::commands::forward::ForwardOptions) -> Self {
        let cancel = tokio_util::sync::CancellationToken::new();
        let state_dir = options.state_dir.clone();
        let task = tokio::spawn(smee_relay::commands::forward::forward(
            options,
            cancel.clone(),
        ));
        Self {
            cancel,
            state_dir,
            task: Some(task),
        }
    }

    /// Ask it to stop, without waiting (see [`Relay::stop`]).
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Stop and wait (within [`PATIENCE`]) until the spool is closed.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("the relay stopped in time")
                .unwrap()
                .unwrap();
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

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

/// A CA and a leaf for 127.0.0.1 signed by it, from the openssl tool: (CA cert, leaf cert,
/// leaf key), PEM.
pub fn certificate(
    dir: &std::path::Path,
    name: &str,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let file = |suffix: &str| dir.join(format!("{name}.{suffix}"));
    let openssl = |args: &[&str]| {
        let made = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (Debian package openssl) makes the test certificates");
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
    };
    let (ca, ca_key, csr, leaf, key) = (
        format!("{name}-ca.crt"),
        format!("{name}-ca.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
        format!("{name}.key"),
    );
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut args = vec![
        "req",
        "-x509",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
        "-keyout",
        &ca_key,
        "-out",
        &ca,
    ];
    args.extend(ec);
    openssl(&args);
    let mut args = vec![
        "req",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &key,
        "-out",
        &csr,
    ];
    args.extend(ec);
    openssl(&args);
    std::fs::write(
        file("ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n",
    )
    .unwrap();
    let ext = format!("{name}.ext");
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &ext,
        "-out",
        &leaf,
    ]);
    (dir.join(ca), dir.join(leaf), dir.join(key))
}

/// The address a `smee-relay serve --listen 127.0.0.1:0` child said it listens on.
pub async fn serve_address(logs: &LogWatch) -> String {
    let line = logs.wait_for(&["serving smee channels", "addr="]).await;
    line.split("addr=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the address in the log line")
        .to_string()
}
