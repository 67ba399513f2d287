//! From the source to the spool, and from the spool to each route, in order.
//!
//! Three kinds of tasks share one spool:
//! - the **writer** (a thread, since redb is blocking): applies every queued append and mark in
//!   one transaction, so commits are grouped and one fsync covers many events;
//! - the **intake**: takes events from the source in batches and appends them; an event is on
//!   disk before any route can see it. If the disk refuses, the batch is kept and retried;
//! - one **route** task per target: reads its queue from the spool and delivers the head until
//!   it succeeds or is given up on, then the next. Retries back off from 1 s to 5 min with
//!   jitter, honouring `Retry-After`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::event::Event;
use crate::forward::{Delivered, ForwardError, Forwarder};
use crate::retry::BackoffPolicy;
use crate::spool::{self, Limits, Outcome, Queued, Spool, SpoolError, StoredEvent, Write};
use futures::future::BoxFuture;

/// How long a delivery in flight may still take once shutdown is asked for.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Most writes in one transaction; more wait for the next commit.
const MAX_BATCH: usize = 4096;

/// How many queued deliveries a route reads from disk at once.
const READ_AHEAD: usize = 256;

/// How often an idle route looks at the spool for events queued by another process
/// (`smee-relay events replay`).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Somewhere a route delivers to: an HTTP target, Slack, stdout.
pub trait Sink: Send + Sync {
    /// How delivery lines name it: `POST /hook`, `slack`. Never a secret.
    fn describe(&self) -> String;
    /// Deliver one event; `delivery_id` is stable across attempts of one queued delivery.
    fn deliver<'a>(
        &'a self,
        event: &'a StoredEvent,
        delivery_id: &'a str,
    ) -> BoxFuture<'a, Result<Delivered, ForwardError>>;
    /// The least time between two deliveries (Slack allows about one message per second).
    fn min_interval(&self) -> Duration {
        Duration::ZERO
    }
}

impl Sink for Forwarder {
    fn describe(&self) -> String {
        format!("POST {}", self.target().path())
    }

    fn deliver<'a>(
        &'a self,
        event: &'a StoredEvent,
        delivery_id: &'a str,
    ) -> BoxFuture<'a, Result<Delivered, ForwardError>> {
        Box::pin(async move {
            let extra = [("x-smee-relay-delivery", delivery_id)];
            Forwarder::deliver(self, &event.event, &extra).await
        })
    }
}

/// One line per attempt: `POST /hook -> 200 in 3 ms (event 12, x-github-event=push)`.
pub fn log_delivery(
    sink: &dyn Sink,
    event: &StoredEvent,
    outcome: &Result<Delivered, ForwardError>,
) {
    // Describing the event may parse its body: skip it when the line would not be written.
    let written = match outcome {
        Ok(_) => tracing::enabled!(tracing::Level::INFO),
        Err(_) => tracing::enabled!(tracing::Level::WARN),
    };
    if !written {
        return;
    }
    let about = match spool::event_kind(&event.event) {
        Some(kind) => format!("event {}, {kind}", event.id),
        None => format!("event {}", event.id),
    };
    let what = sink.describe();
    match outcome {
        Ok(done) => info!(
            "{what} -> {} in {} ms ({about})",
            done.status.as_u16(),
            done.elapsed.as_millis()
        ),
        Err(e) => warn!("{what} failed: {e} ({about})"),
    }
}

/// Counters the relay keeps about itself: read back for the systemd status line, and
/// recorded as Prometheus metrics at the same time.
#[derive(Debug, Default)]
pub struct Counters {
    pub received: AtomicU64,
    pub refused: AtomicU64,
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub dead: AtomicU64,
}

impl Counters {
    fn received(&self, n: u64) {
        self.received.fetch_add(n, Ordering::Relaxed);
        metrics::counter!("smee_relay_events_received_total").increment(n);
    }

    fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("smee_relay_events_refused_total").increment(1);
    }

    fn delivered(&self, route: &str, elapsed: Duration) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("smee_relay_deliveries_total", "route" => route.to_string()).increment(1);
        metrics::histogram!("smee_relay_delivery_seconds", "route" => route.to_string())
            .record(elapsed.as_secs_f64());
    }

    fn retried(&self, route: &str) {
        self.retried.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("smee_relay_retries_total", "route" => route.to_string()).increment(1);
    }

    fn dead(&self, route: &str) {
        self.dead.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("smee_relay_dead_letters_total", "route" => route.to_string())
            .increment(1);
    }
}

/// Per `Append` in a job, each event's id (`None`: refused, the spool is full).
pub type Appended = Vec<Vec<Option<u64>>>;

/// Writes that commit together, in one transaction.
struct Job {
    writes: Vec<Write>,
    /// Where to say the job is committed: per `Append` in it, the ids given. `None` for
    /// delivery marks, which nobody waits for.
    reply: Option<oneshot::Sender<Result<Appended, String>>>,
}

/// How long finished deliveries may wait for a commit that someone waits for (an append) to
/// ride along with, before they get one of their own. A crash forgets at most this much, and
/// forgetting a delivery only repeats it.
const MARK_DELAY: Duration = Duration::from_millis(200);

/// While events arrive faster than commits finish, the least time from one commit to the
/// next: each commit is an fsync plus a few pages, so under load fewer, larger commits cost
/// far less CPU. A lone event is committed at once, so a trickle pays no latency for it.
const COMMIT_PACE: Duration = Duration::from_millis(8);

/// A handle for sending writes to the writer thread. Cloneable; the thread ends when every
/// handle is dropped, after applying what was sent.
#[derive(Clone)]
pub struct SpoolWriter {
    jobs: std::sync::mpsc::Sender<Job>,
    /// False after a failed commit, true after a good one (for `/healthz`).
    writable: Arc<std::sync::atomic::AtomicBool>,
    /// Bumped after every commit that appended events, to wake idle routes.
    appended: watch::Receiver<u64>,
}

impl SpoolWriter {
    /// Start the writer thread.
    pub fn start(spool: Arc<Spool>, limits: Limits) -> (SpoolWriter, std::thread::JoinHandle<()>) {
        let (jobs_tx, jobs) = std::sync::mpsc::channel::<Job>();
        let (appended_tx, appended) = watch::channel(0u64);
        let writable = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let thread = WriterThread {
            spool,
            limits,
            jobs,
            appended: appended_tx,
            writable: writable.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || thread.run())
            .expect("the spool writer thread starts");
        (
            SpoolWriter {
                jobs: jobs_tx,
                writable,
                appended,
            },
            thread,
        )
    }

    /// Commit `writes` together and wait until they are on disk. Returns, per `Append`, each
    /// event's id, or `None` if the spool was full.
    pub async fn commit(&self, writes: Vec<Write>) -> Result<Appended, String> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            writes,
            reply: Some(reply),
        };
        let stopped = || "the spool writer has stopped".to_string();
        self.jobs.send(job).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Append events and wait until they are on disk. Returns each event's id, or `None` if
    /// the spool was full. `cursor`: the channel's key, to remember the last SSE id by.
    pub async fn append(
        &self,
        channel: &str,
        routes: &[String],
        events: Arc<[Event]>,
        cursor_key: Option<&str>,
    ) -> Result<Vec<Option<u64>>, String> {
        let cursor = cursor_key.and_then(|key| {
            let last = events.iter().rev().find_map(|e| e.sse_id.clone())?;
            Some((key.to_string(), last))
        });
        let write = Write::Append {
            channel: channel.to_string(),
            routes: routes.to_vec(),
            events,
            cursor,
        };
        let mut appended = self.commit(vec![write]).await?;
        Ok(appended.pop().unwrap_or_default())
    }

    /// Whether the last commit succeeded.
    pub fn writable(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.writable.clone()
    }

    /// A receiver that changes after every commit that appended events.
    pub fn appended(&self) -> watch::Receiver<u64> {
        self.appended.clone()
    }

    /// Record finished attempts (and empty `marks`) without waiting: they are committed with
    /// the next append, or within 200 ms (`MARK_DELAY`).
    pub fn flush(&self, marks: &mut Vec<Write>) {
        if marks.is_empty() {
            return;
        }
        let job = Job {
            writes: std::mem::take(marks),
            reply: None,
        };
        if self.jobs.send(job).is_err() {
            error!("the spool writer has stopped: attempts were not recorded");
        }
    }
}

/// The thread that owns every write to the spool (redb is blocking, and one writer at a time
/// is what lets it group commits).
struct WriterThread {
    spool: Arc<Spool>,
    limits: Limits,
    jobs: std::sync::mpsc::Receiver<Job>,
    /// Bumped after a commit that appended events.
    appended: watch::Sender<u64>,
    /// The last commit's outcome, for `/healthz`.
    writable: Arc<std::sync::atomic::AtomicBool>,
}

impl WriterThread {
    fn run(self) {
        use std::sync::mpsc::RecvTimeoutError;
        use std::time::Instant;
        let mut batch: Vec<Job> = Vec::new();
        // When the batch's oldest unawaited mark arrived; it is committed by MARK_DELAY after.
        let mut marks_since: Option<Instant> = None;
        // Until when to let writes gather before the next commit (COMMIT_PACE).
        let mut gather_until: Option<Instant> = None;
        loop {
            // Wait for work: anything, if the batch is empty; otherwise only until the batch is
            // due (a job someone awaits is due once the pace allows, marks after MARK_DELAY).
            let awaited = batch.iter().any(|job| job.reply.is_some());
            let due = match (awaited, marks_since) {
                (true, _) => gather_until,
                (false, Some(since)) => Some(since + MARK_DELAY),
                (false, None) => None,
            };
            let received = match due {
                None => self.jobs.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(due) => self
                    .jobs
                    .recv_timeout(due.saturating_duration_since(Instant::now())),
            };
            match received {
                Ok(job) => {
                    if job.reply.is_none() && marks_since.is_none() {
                        marks_since = Some(Instant::now());
                    }
                    batch.push(job);
                    // Take what else is queued, without waiting.
                    while batch.len() < MAX_BATCH {
                        match self.jobs.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    let awaited = batch.iter().any(|job| job.reply.is_some());
                    let paced = gather_until.is_some_and(|until| Instant::now() < until);
                    if !awaited || (paced && batch.len() < MAX_BATCH) {
                        continue;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    if !batch.is_empty() {
                        self.commit(std::mem::take(&mut batch));
                    }
                    return;
                }
            }
            let started = Instant::now();
            let events = self.commit(std::mem::take(&mut batch));
            marks_since = None;
            gather_until = (events > 1).then(|| started + COMMIT_PACE);
        }
    }

    /// Apply `batch` in one transaction and answer each job. Returns how many events it
    /// appended.
    fn commit(&self, batch: Vec<Job>) -> usize {
        // Each job's appends, so the report can be handed back per job.
        let mut replies = Vec::new();
        let mut writes = Vec::new();
        for job in batch {
            let appends = job
                .writes
                .iter()
                .filter(|w| matches!(w, Write::Append { .. }))
                .count();
            replies.push((job.reply, appends));
            writes.extend(job.writes);
        }
        let result = self.spool.write(writes, self.limits);
        self.writable.store(result.is_ok(), Ordering::Relaxed);
        match result {
            Ok(report) => {
                if report.pruned > 0 {
                    warn!(
                        pruned = report.pruned,
                        "spool full: pruned delivered events early"
                    );
                }
                let events = report.appended.iter().map(Vec::len).sum();
                let mut appended = report.appended.into_iter();
                for (reply, appends) in replies {
                    let ids: Vec<_> = appended.by_ref().take(appends).collect();
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(ids));
                    }
                }
                if events > 0 {
                    self.appended.send_modify(|n| *n += 1);
                }
                events
            }
            Err(e) => {
                error!("cannot write to the spool: {e}");
                for (reply, _) in replies {
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(e.to_string()));
                    }
                }
                0
            }
        }
    }
}

/// The write that records an attempt at `queued` on `route`.
fn mark(route: &str, queued: &Queued, outcome: Outcome) -> Write {
    Write::Mark {
        route: route.to_string(),
        seq: queued.seq,
        event: queued.event.id,
        outcome,
    }
}

/// Take events from the source and append them to the spool in batches, until the source is
/// done. Nothing taken is dropped: a failed append is retried.
pub async fn intake(
    mut events: mpsc::Receiver<Event>,
    writer: SpoolWriter,
    channel: String,
    cursor_key: Option<String>,
    routes: watch::Receiver<Vec<String>>,
    counters: Arc<Counters>,
) {
    let mut received = Vec::new();
    while events.recv_many(&mut received, MAX_BATCH).await > 0 {
        let batch: Arc<[Event]> = std::mem::take(&mut received).into();
        // The routes as of now: a reload may change them between batches.
        let routes = routes.borrow().clone();
        loop {
            let appended = writer
                .append(&channel, &routes, batch.clone(), cursor_key.as_deref())
                .await;
            match appended {
                Ok(ids) => {
                    counters.received(ids.len() as u64);
                    for (event, id) in batch.iter().zip(&ids) {
                        if id.is_none() {
                            counters.refused();
                            error!(
                                event = %event.sse_id.as_deref().unwrap_or("-"),
                                "spool full: event refused; deliver, purge (smee-relay events purge --dead) \
                                 or raise --max-spool-size"
                            );
                        }
                    }
                    break;
                }
                Err(e) => {
                    error!(
                        events = batch.len(),
                        "cannot store events, retrying in 1s (they are kept in memory): {e}"
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// How a route retries.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Delays between attempts at the same event.
    pub backoff: BackoffPolicy,
    /// An event older than this is not retried again: it becomes a dead letter.
    pub max_age: Duration,
}

impl RetryPolicy {
    /// 1 s up to 5 min, for 24 h.
    pub const DEFAULT: RetryPolicy = RetryPolicy {
        backoff: BackoffPolicy {
            min: Duration::from_secs(1),
            max: Duration::from_secs(300),
        },
        max_age: Duration::from_secs(24 * 3600),
    };
}

/// Deliver `route`'s queue in order until `cancel` fires; the delivery in flight then has
/// [`SHUTDOWN_GRACE`] to finish.
pub async fn run_route(
    spool: Arc<Spool>,
    writer: SpoolWriter,
    route: String,
    sink: Arc<dyn Sink>,
    policy: RetryPolicy,
    counters: Arc<Counters>,
    cancel: CancellationToken,
) {
    let mut appended = writer.appended.clone();
    // The last seq this task finished with. Marks are committed asynchronously, so the
    // spool may still list it as pending for a moment; the cursor skips it.
    let mut cursor = 0;
    while !cancel.is_cancelled() {
        let read = {
            let (spool, route) = (spool.clone(), route.clone());
            tokio::task::spawn_blocking(move || spool.pending(&route, cursor, READ_AHEAD)).await
        };
        let queued = match read {
            Ok(Ok(queued)) => queued,
            Ok(Err(e)) => {
                error!(route, "cannot read the spool, retrying in 1s: {e}");
                wait(&cancel, Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => {
                error!(route, "spool reader failed: {e}");
                return;
            }
        };
        if queued.is_empty() {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = appended.changed() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
            }
            continue;
        }
        // Finished deliveries are recorded together, once per read-ahead batch (or before a
        // retry waits): one commit instead of one per event. A crash before that commit only
        // redelivers them, which at-least-once allows and the delivery id lets targets spot.
        let mut marks = Vec::new();
        for item in queued {
            let delivery = Delivery {
                spool: &spool,
                writer: &writer,
                sink: sink.as_ref(),
                route: &route,
                policy,
                counters: &counters,
                cancel: &cancel,
            };
            if !delivery.run(&item, &mut marks).await {
                writer.flush(&mut marks);
                return;
            }
            cursor = item.seq;
        }
        writer.flush(&mut marks);
    }
}

/// Sleep, or return early on cancel.
async fn wait(cancel: &CancellationToken, delay: Duration) {
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = tokio::time::sleep(delay) => {}
    }
}

/// One queued event's way through its attempts.
struct Delivery<'a> {
    spool: &'a Spool,
    writer: &'a SpoolWriter,
    sink: &'a dyn Sink,
    route: &'a str,
    policy: RetryPolicy,
    counters: &'a Counters,
    cancel: &'a CancellationToken,
}

impl Delivery<'_> {
    /// Attempt until delivered or dead; the final mark goes into `marks` for the caller to
    /// commit. Returns false if shutdown interrupted it (it stays pending and is retried on
    /// the next start).
    async fn run(&self, item: &Queued, marks: &mut Vec<Write>) -> bool {
        let mut backoff = self.policy.backoff.start();
        let mut attempts = item.attempts;
        let delivery_id = self.spool.delivery_id(item.seq);
        loop {
            let started = tokio::time::Instant::now();
            let grace_over = async {
                self.cancel.cancelled().await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            };
            let outcome = tokio::select! {
                outcome = self.sink.deliver(&item.event, &delivery_id) => outcome,
                _ = grace_over => {
                    warn!(
                        event = item.event.id,
                        "shutting down: the delivery in flight did not finish within {}; it stays queued",
                        humantime::format_duration(SHUTDOWN_GRACE)
                    );
                    return false;
                }
            };
            attempts += 1;
            log_delivery(self.sink, &item.event, &outcome);
            // Pace deliveries the sink asks to be paced (Slack: one message a second). Only
            // then: even an elapsed timer costs a turn of tokio's 1 ms timer wheel, which
            // capped delivery at 1,000 events/s (bench/run.sh).
            let pace = self.sink.min_interval();
            if !pace.is_zero() {
                tokio::time::sleep_until(started + pace).await;
            }
            let error = match outcome {
                Ok(done) => {
                    self.counters.delivered(self.route, done.elapsed);
                    let status = done.status.as_u16();
                    marks.push(mark(self.route, item, Outcome::Delivered { status }));
                    return true;
                }
                Err(error) => error,
            };
            let status = error.status().map(|s| s.as_u16());
            let age = spool::age(item.event.received_ms);
            if !error.is_retryable() || age > self.policy.max_age {
                let why = if error.is_retryable() {
                    format!(
                        "gave up after {attempts} attempts over {} (--max-retry-age): {error}",
                        humantime::format_duration(Duration::from_secs(age.as_secs()))
                    )
                } else {
                    error.to_string()
                };
                self.counters.dead(self.route);
                warn!(
                    event = item.event.id,
                    "dead letter: {why}; replay it with `smee-relay events replay {}`",
                    item.event.id
                );
                marks.push(mark(self.route, item, Outcome::Dead { status, error: why }));
                return true;
            }
            self.counters.retried(self.route);
            let delay = error.retry_after().unwrap_or_else(|| backoff.next_delay());
            info!(
                event = item.event.id,
                attempt = attempts,
                "retrying in {}",
                humantime::format_duration(Duration::from_millis(delay.as_millis() as u64))
            );
            // What finished before this one is recorded now, not after the wait.
            marks.push(mark(
                self.route,
                item,
                Outcome::Retry {
                    status,
                    error: error.to_string(),
                },
            ));
            self.writer.flush(marks);
            wait(self.cancel, delay).await;
            if self.cancel.is_cancelled() {
                return false;
            }
        }
    }
}

/// Prune delivered events older than `retain`, now and every minute, until `cancel`.
pub async fn prune_periodically(spool: Arc<Spool>, retain: Duration, cancel: CancellationToken) {
    loop {
        let cutoff = spool::now_ms().saturating_sub(retain.as_millis() as u64);
        let spool2 = spool.clone();
        match tokio::task::spawn_blocking(move || spool2.prune(cutoff)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => info!(pruned = n, "pruned delivered events past --retain"),
            Ok(Err(e)) => warn!("cannot prune the spool: {e}"),
            Err(_) => return,
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
}

/// Open the spool for a channel, holding the channel's lock.
pub fn open_for_channel(
    state_dir: &std::path::Path,
    channel: &crate::url::ChannelUrl,
) -> Result<(Arc<Spool>, spool::ChannelLock), SpoolError> {
    std::fs::create_dir_all(state_dir).map_err(|source| SpoolError::StateDir {
        path: state_dir.to_owned(),
        source,
    })?;
    let lock =
        spool::ChannelLock::acquire(state_dir, channel.expose().as_str(), &channel.to_string())?;
    Ok((Arc::new(Spool::open(state_dir)?), lock))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use http::StatusCode;
    use tokio::time::Instant;

    /// A sink that answers from a script and notes when each attempt came.
    struct Scripted {
        answers: Mutex<Vec<Result<Delivered, ForwardError>>>,
        attempts: Mutex<Vec<Instant>>,
    }

    impl Sink for Scripted {
        fn describe(&self) -> String {
            "scripted".into()
        }
        fn deliver<'a>(
            &'a self,
            _event: &'a StoredEvent,
            _delivery_id: &'a str,
        ) -> BoxFuture<'a, Result<Delivered, ForwardError>> {
            self.attempts.lock().unwrap().push(Instant::now());
            let answer = self.answers.lock().unwrap().remove(0);
            Box::pin(async move { answer })
        }
    }

    fn status(code: u16, retry_after: Option<u64>) -> Result<Delivered, ForwardError> {
        Err(ForwardError::Status {
            status: StatusCode::from_u16(code).unwrap(),
            retry_after: retry_after.map(Duration::from_secs),
            body: String::new(),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn retries_back_off_exponentially_and_honour_retry_after() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let (writer, thread) = SpoolWriter::start(spool.clone(), Limits { max_bytes: 1 << 20 });
        let event = Event {
            sse_id: None,
            timestamp_ms: None,
            headers: vec![],
            query: vec![],
            body: "{}".into(),
        };
        writer
            .append("c", &["r".to_string()], vec![event].into(), None)
            .await
            .unwrap();
        let ok = Ok(Delivered {
            status: StatusCode::OK,
            elapsed: Duration::ZERO,
        });
        let sink = Arc::new(Scripted {
            answers: Mutex::new(vec![
                status(503, None),
                status(503, None),
                status(503, None),
                status(429, Some(7)),
                ok,
            ]),
            attempts: Mutex::new(Vec::new()),
        });
        let cancel = CancellationToken::new();
        let route = tokio::spawn(run_route(
            spool.clone(),
            writer.clone(),
            "r".into(),
            sink.clone(),
            RetryPolicy::DEFAULT,
            Arc::new(Counters::default()),
            cancel.clone(),
        ));
        while sink.attempts.lock().unwrap().len() < 5 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let at = sink.attempts.lock().unwrap().clone();
        let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
        // Jitter puts each backoff delay between d and 2d: 1 s, then 2 s, then 4 s.
        for (gap, base) in gaps.iter().zip([1u64, 2, 4]) {
            assert!(
                *gap >= Duration::from_secs(base) && *gap <= Duration::from_secs(2 * base),
                "gap {gap:?} for base {base}s (all: {gaps:?})"
            );
        }
        assert_eq!(
            gaps[3],
            Duration::from_secs(7),
            "Retry-After: 7 is waited exactly"
        );
        cancel.cancel();
        route.await.unwrap();
        drop(writer);
        thread.join().unwrap();
    }
}
