//! From the spool to each route, in order: one task per route reads its queue and delivers the
//! head until it succeeds or is given up on, then the next. Retries back off from 1 s to 5 min
//! with jitter, honouring `Retry-After` up to a cap (`--max-retry-after`). Told to stop, a route
//! stops at an event boundary: the delivery in flight gets until the shutdown deadline
//! (`--shutdown-timeout`), the rest of what it read ahead stays queued, and what it finished is
//! committed before it returns, so whoever takes the route over next starts where it stopped. What a route delivers to is a [`Sink`]: an HTTP target
//! ([`forward`]), or Slack and stdout (the `notify` module implements the trait).
//!
//! This module never writes to the spool directly: finished attempts become marks that the
//! spool's writer thread commits. A finished delivery (delivered, or given up on) is recorded
//! with [`SpoolWriter::finish`] before the route starts the next one, so a crash of the process
//! repeats at most the delivery in flight on each route.
//!
//! A route's name is its queue's key ([`spool::route_key`]: channel and target); logs and
//! metrics show only its target ([`spool::route_name`]).

pub mod forward;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::counters::{Counters, RouteCounters};
use crate::retry::BackoffPolicy;
use crate::spool::{self, Outcome, Queued, Spool, StoredEvent, Taken, Write, writer::SpoolWriter};
use forward::{Delivered, ForwardError, Forwarder};

/// How many queued deliveries a route reads from disk at once.
const READ_AHEAD: usize = 256;

/// Somewhere a route delivers to: an HTTP target, Slack, stdout.
pub trait Sink: Send + Sync {
    /// How delivery lines name it: `POST 127.0.0.1:3000/hook`, `slack`. Never a secret.
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
    /// In cluster mode, the stream sequence of the cluster delivery `event` is: the id
    /// `smee-relay events list` shows and `events replay` takes, so delivery lines and the
    /// dead-letter hint give it rather than the local id. None: a local delivery.
    fn cluster_seq(&self, _event: &StoredEvent) -> Option<u64> {
        None
    }
    /// What `smee-relay events` needs, after a cluster id, to find the cluster (` --config
    /// FILE`): the dead-letter line's command works as printed.
    fn cluster_args(&self) -> String {
        String::new()
    }
    /// What the warning for a failed attempt says after `failed: `, or `None` to leave this one
    /// out (a sink that fails alike many times a second paces its warnings).
    fn failure(&self, error: &ForwardError) -> Option<String> {
        Some(error.to_string())
    }
    /// For a sink that shares its deliveries with others (a cluster route): what to wait on
    /// before each attempt at `event`. It ends with `Ok` once this route may attempt it, or
    /// with why it must not at all (another instance has it): the route then finishes it
    /// without delivering it. `None`: always attempt.
    fn claim<'a>(&'a self, _event: &'a StoredEvent) -> Option<BoxFuture<'a, Result<(), String>>> {
        None
    }
    /// Ends once `event` is no longer this route's to deliver (see [`Sink::claim`]); a wait
    /// between attempts then ends early. `None`: never.
    fn taken_away<'a>(&'a self, _event: &'a StoredEvent) -> Option<BoxFuture<'a, ()>> {
        None
    }
}

impl Sink for Forwarder {
    fn describe(&self) -> String {
        format!("POST {}", self.target().short())
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

/// One line per attempt: `POST 127.0.0.1:3000/hook -> 200 in 3 ms (event 12, x-github-event=push)`,
/// made before the delivery is recorded (a cluster delivery's stream sequence is known only
/// until then) and said after ([`DeliveryLine::say`]).
enum DeliveryLine {
    /// The target took it (info).
    Delivered(String),
    /// The attempt failed (warn).
    Failed(String),
}

impl DeliveryLine {
    fn say(self) {
        match self {
            DeliveryLine::Delivered(line) => info!("{line}"),
            DeliveryLine::Failed(line) => warn!("{line}"),
        }
    }
}

/// The [`DeliveryLine`] of one attempt to `sink` (described as `described`, made once per route);
/// `None` when its level is off. Written into one string: this runs once per event.
fn delivery_line(
    sink: &dyn Sink,
    described: &str,
    event: &StoredEvent,
    outcome: &Result<Delivered, ForwardError>,
) -> Option<DeliveryLine> {
    use std::fmt::Write as _;
    // Describing the event may parse its body: skip it when the line would not be written.
    let written = match outcome {
        Ok(_) => tracing::enabled!(tracing::Level::INFO),
        Err(_) => tracing::enabled!(tracing::Level::WARN),
    };
    if !written {
        return None;
    }
    let mut line = String::with_capacity(described.len() + 64);
    line.push_str(described);
    // (`write!` into a String cannot fail.)
    let _ = match outcome {
        Ok(Delivered {
            not_sent: Some(why),
            ..
        }) => write!(line, " not sent: {why} ("),
        Ok(done) => write!(
            line,
            " -> {} in {} ms (",
            done.status.as_u16(),
            done.elapsed.as_millis()
        ),
        // `None`: the sink paces this failure's line (a NATS outage repeats it).
        Err(e) => write!(line, " failed: {} (", sink.failure(e)?),
    };
    let _ = match sink.cluster_seq(event) {
        Some(seq) => write!(line, "event {seq} in the cluster (local {})", event.id),
        None => write!(line, "event {}", event.id),
    };
    if let Some(kind) = spool::event_kind(&event.event) {
        let _ = write!(line, ", {kind}");
    }
    line.push(')');
    Some(match outcome {
        Ok(_) => DeliveryLine::Delivered(line),
        Err(_) => DeliveryLine::Failed(line),
    })
}

/// How a route retries.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Delays between attempts at the same event.
    pub backoff: BackoffPolicy,
    /// An event older than this is not retried again: it becomes a dead letter.
    pub max_age: Duration,
    /// The longest `Retry-After` obeyed: a target (or Slack) asking for more waits this long
    /// instead, so one answer cannot park a route for years.
    pub max_retry_after: Duration,
    /// How long the delivery in flight may still take once the route is told to stop
    /// (shutdown, or a reload that replaces the route); then it is cut off and stays queued.
    pub shutdown_timeout: Duration,
}

impl RetryPolicy {
    /// 1 s up to 5 min, for 24 h; `Retry-After` up to 1 h; 5 s to stop.
    pub const DEFAULT: RetryPolicy = RetryPolicy {
        backoff: BackoffPolicy {
            min: Duration::from_secs(1),
            max: Duration::from_secs(300),
        },
        max_age: Duration::from_secs(24 * 3600),
        max_retry_after: Duration::from_secs(3600),
        shutdown_timeout: Duration::from_secs(5),
    };

    /// The wait before the next attempt: what the target asked for (capped, and the cap
    /// logged), else the next backoff delay. An ask below the backoff's least delay (`0`, or a
    /// date already past) counts as none: answered again and again, it retried in a tight loop.
    fn delay(
        &self,
        asked: Option<Duration>,
        backoff: &mut crate::retry::Backoff,
        event: u64,
    ) -> Duration {
        match asked {
            Some(asked) if asked > self.max_retry_after => {
                warn!(
                    event,
                    "the target asked to wait {} (Retry-After); waiting {} instead (--max-retry-after)",
                    humantime::format_duration(Duration::from_secs(asked.as_secs())),
                    humantime::format_duration(self.max_retry_after)
                );
                self.max_retry_after
            }
            Some(asked) if asked >= self.backoff.min => asked,
            _ => backoff.next_delay(),
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

/// How whoever runs a route steers it.
#[derive(Clone, Default)]
pub struct RouteControl {
    /// Stops it: the delivery in flight then has the policy's `shutdown_timeout` to finish.
    pub cancel: CancellationToken,
    /// Cuts a wait between attempts short, and starts the backoff over: a reload (the
    /// operator may have fixed the target) says "retry now" to every route.
    pub retry_now: Arc<tokio::sync::Notify>,
}

impl RouteControl {
    /// Stopped by `cancel`; nothing cuts its waits short.
    pub fn new(cancel: CancellationToken) -> Self {
        Self {
            cancel,
            retry_now: Arc::default(),
        }
    }
}

/// Deliver `route`'s queue in order until `control.cancel` fires; the delivery in flight then
/// has the policy's `shutdown_timeout` to finish. On return, every attempt it finished is
/// committed.
pub async fn run_route(
    spool: Arc<Spool>,
    writer: SpoolWriter,
    route: String,
    sink: Arc<dyn Sink>,
    policy: RetryPolicy,
    counters: Arc<Counters>,
    control: RouteControl,
) {
    let RouteControl { cancel, retry_now } = control;
    let mut appended = writer.appended();
    // The last seq this task finished with. Marks are committed asynchronously, so the
    // spool may still list it as pending for a moment; the cursor skips it.
    let mut cursor = 0;
    // Whether the spool's refusal to be read was logged (once per outage, e.g. a full disk).
    let mut said = false;
    // Whether the route delivered its whole queue as far as it knows it: then it waits for the
    // next append without reading an empty queue again (at everyday rates that second read
    // was one more blocking-pool handoff and read transaction per event).
    let mut drained = false;
    // The spool file as it was before the last read: an idle route reads again only once it
    // changed (another process's write has no other way to wake it).
    let mut seen = spool::Seen::default();
    // Wakes the idle wait for writes the writer does not tell of (`Spool::changed`).
    let mut nudges = spool.nudges();
    // What this process's writer queued, handed over with each append (`spool::Handover`).
    let handover = writer.handover();
    // The spool's seq counter up to which this route knows its whole queue and delivered all
    // of it (`None` after a read that stopped at its limits, or a delivery interrupted). What
    // this process's commits queued from exactly there is taken from `handover`, with no read;
    // anything else queued meanwhile (by `events replay` in another process too) moved the
    // counter, and the route reads.
    let mut known: Option<u64> = None;
    // What logs and metrics call the route, and the sink's description: fixed while it runs,
    // so made once here, with everything else an attempt needs but the event.
    let label = spool::route_name(&route);
    let label: &str = &label;
    let described = sink.describe();
    let route_counters = counters.route(&route, label);
    let delivery = Delivery {
        spool: &spool,
        writer: &writer,
        sink: sink.as_ref(),
        described: &described,
        route: &route,
        label,
        policy,
        counters: &route_counters,
        cancel: &cancel,
        retry_now: &retry_now,
    };
    while !cancel.is_cancelled() {
        // Woken by a change the writer did not tell of: the read below must see it, so the
        // handover is not taken for the whole queue.
        let mut changed = false;
        if std::mem::take(&mut drained) && !appended.has_changed().unwrap_or(true) {
            match idle(&spool, &mut appended, &mut nudges, &seen, &cancel).await {
                // Stopped while idle: what it finished last may not be committed yet (below).
                Woken::Cancelled => break,
                Woken::Appended => {}
                Woken::Changed => changed = true,
            }
        }
        // Seen before taking or reading: an append from here on is either in this take or
        // read, or wakes the next wait, and another process's write from here on changes the
        // file after `seen`.
        appended.borrow_and_update();
        let from = known.take().filter(|_| !changed);
        let taken = match from {
            Some(from) => handover.take(&route, from, READ_AHEAD, spool::READ_BYTES),
            None => Taken::Read,
        };
        // What to deliver, the counter up to which it is the route's whole queue (if it is),
        // and whether more is known to follow it.
        let (queued, whole, more) = match taken {
            // `seen` stays as it was, and the nudges unmarked: a write outside the writer since
            // the last read (another process's, a catch-up's) still wakes the next wait, which
            // then reads.
            Taken::Queue {
                queued,
                known,
                more,
            } => (queued, Some(known), more),
            Taken::Nothing => {
                (known, drained) = (from, true);
                continue;
            }
            Taken::Read => {
                nudges.mark();
                seen = spool.look();
                handover.reading(&route);
                let read = {
                    let (spool, route) = (spool.clone(), route.clone());
                    tokio::task::spawn_blocking(move || {
                        spool.pending_known(&route, cursor, READ_AHEAD)
                    })
                    .await
                };
                match read {
                    Ok(Ok((queued, next_known))) => {
                        if std::mem::take(&mut said) {
                            info!(route = label, "the spool reads again");
                        }
                        let bytes: usize = queued.iter().map(|q| q.event.event.body.len()).sum();
                        let whole = queued.len() < READ_AHEAD && bytes < spool::READ_BYTES;
                        let whole = whole.then_some(next_known);
                        handover.read(&route, whole);
                        (queued, whole, whole.is_none())
                    }
                    Ok(Err(e)) => {
                        if std::mem::replace(&mut said, true) {
                            wait(&cancel, Duration::from_secs(1)).await;
                            continue;
                        }
                        error!(
                            route = label,
                            "cannot read the spool, retrying in 1s: {}",
                            crate::error::chain(&e)
                        );
                        wait(&cancel, Duration::from_secs(1)).await;
                        continue;
                    }
                    Err(e) => {
                        error!(route = label, "spool reader failed: {e}");
                        handover.leave(&route);
                        return;
                    }
                }
            }
        };
        // Attempts that did not finish a delivery (retries) ride along with the next commit.
        let mut marks = Vec::new();
        let mut interrupted = false;
        for item in queued {
            // Stop at an event boundary: what was read ahead stays queued for the next owner.
            if cancel.is_cancelled() {
                interrupted = true;
                break;
            }
            if !delivery.run(&item, &mut marks).await {
                interrupted = true;
                break;
            }
            cursor = item.seq;
        }
        writer.flush(&mut marks);
        if !interrupted {
            known = whole;
            // Nothing more known: wait (at the top) for an append or a change of the file.
            drained = !more;
        }
    }
    handover.leave(&route);
    // Wait until what this route finished is on disk (a commit waits for the marks queued
    // before it): a route that takes over after a reload must not deliver them again.
    if let Err(e) = writer.commit(Vec::new()).await {
        error!(
            route,
            "cannot record the last deliveries: {e}; they may be repeated"
        );
    }
}

/// What ended an idle route's wait ([`idle`]).
enum Woken {
    Cancelled,
    /// This process's writer appended events (it hands them over: `spool::Handover`).
    Appended,
    /// The file changed otherwise ([`Spool::changed`]).
    Changed,
}

/// Wait until there may be something to read: an append by this process's writer, or any
/// other change of the spool file since `seen` ([`Spool::changed`]: looked at every second
/// while other processes share the file, not at all while this one has it alone). An idle
/// route thus costs no read transaction, and on a spool held alone no wake-up at all.
async fn idle(
    spool: &Spool,
    appended: &mut tokio::sync::watch::Receiver<u64>,
    nudges: &mut spool::Nudges,
    seen: &spool::Seen,
    cancel: &CancellationToken,
) -> Woken {
    tokio::select! {
        _ = cancel.cancelled() => Woken::Cancelled,
        // Once the writer is gone, only the file tells.
        Ok(()) = appended.changed() => Woken::Appended,
        () = spool.changed(nudges, seen) => Woken::Changed,
    }
}

/// Ends once `sink` says `event` is no longer this route's to deliver ([`Sink::taken_away`]).
async fn taken_away(sink: &dyn Sink, event: &StoredEvent) {
    match sink.taken_away(event) {
        Some(taken) => taken.await,
        None => std::future::pending().await,
    }
}

/// Sleep, or return early on cancel.
async fn wait(cancel: &CancellationToken, delay: Duration) {
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = tokio::time::sleep(delay) => {}
    }
}

/// A route's way of delivering one queued event through its attempts (made once per route).
struct Delivery<'a> {
    spool: &'a Spool,
    writer: &'a SpoolWriter,
    sink: &'a dyn Sink,
    /// What delivery lines call the sink ([`Sink::describe`]).
    described: &'a str,
    /// The queue's key, for marks.
    route: &'a str,
    /// What logs and metrics call the route: its target (no channel key in labels).
    label: &'a str,
    policy: RetryPolicy,
    counters: &'a RouteCounters<'a>,
    cancel: &'a CancellationToken,
    /// Ends a wait between attempts ([`RouteControl::retry_now`]).
    retry_now: &'a tokio::sync::Notify,
}

impl Delivery<'_> {
    /// Attempt until delivered or dead, and record the outcome ([`Delivery::finish`]); marks
    /// of failed attempts go into `marks` for the caller to commit. Returns false if shutdown
    /// interrupted it (it stays pending and is retried on the next start).
    async fn run(&self, item: &Queued, marks: &mut Vec<Write>) -> bool {
        let mut backoff = self.policy.backoff.start();
        let mut attempts = item.attempts;
        let delivery_id = self.spool.delivery_id(item.seq);
        if attempts > 0 {
            // The log said "retrying in ..." last: what ended that wait (helper-140).
            info!(
                event = item.event.id,
                route = self.label,
                "retrying now: the route started (a start or a reload), {} before",
                crate::error::count(attempts as usize, "attempt failed", "attempts failed")
            );
        }
        loop {
            if let Some(claim) = self.sink.claim(&item.event) {
                let claimed = tokio::select! {
                    claimed = claim => claimed,
                    _ = self.cancel.cancelled() => return false,
                };
                if let Err(why) = claimed {
                    // Not a dead letter: it is delivered, elsewhere. Nor this route's failure
                    // any more (helper-110: it stayed "failing" here).
                    info!(event = item.event.id, "{why}");
                    self.counters.moved_on();
                    return self
                        .finish(mark(
                            self.route,
                            item,
                            Outcome::Dead {
                                status: None,
                                error: why,
                            },
                        ))
                        .await;
                }
            }
            let started = tokio::time::Instant::now();
            let grace_over = async {
                self.cancel.cancelled().await;
                tokio::time::sleep(self.policy.shutdown_timeout).await;
            };
            let outcome = tokio::select! {
                outcome = self.sink.deliver(&item.event, &delivery_id) => outcome,
                _ = grace_over => {
                    // In a cluster the copy left is handed back, and another instance
                    // delivers it: again, if this attempt reached the target.
                    let left = match self.sink.cluster_seq(&item.event) {
                        Some(seq) => format!("it goes back to the cluster, and another instance delivers event {seq} (again, if this attempt reached the target: same x-smee-relay-delivery)"),
                        None => "it stays queued (delivered again at the next start, if this attempt reached the target)".into(),
                    };
                    warn!(
                        event = item.event.id,
                        "stopping: the delivery in flight did not finish within {} (--shutdown-timeout); {left}",
                        humantime::format_duration(self.policy.shutdown_timeout)
                    );
                    return false;
                }
            };
            attempts += 1;
            let line = delivery_line(self.sink, self.described, &item.event, &outcome);
            let error = match outcome {
                Ok(done) => {
                    // Recorded as soon as the target answered, and only then paced: a crash
                    // from here on does not repeat it (the line says so once it is true).
                    self.counters.delivered(done.elapsed);
                    let status = done.status.as_u16();
                    let finished = self
                        .finish(mark(self.route, item, Outcome::Delivered { status }))
                        .await;
                    if let Some(line) = line {
                        line.say();
                    }
                    self.pace(started).await;
                    return finished;
                }
                Err(error) => error,
            };
            if let Some(line) = line {
                line.say();
            }
            let status = error.status().map(|s| s.as_u16());
            let age = spool::age(item.event.received_ms);
            if !error.is_retryable() || age > self.policy.max_age {
                let why = if error.is_retryable() {
                    format!(
                        "gave up after {} over {} (--max-retry-age): {error}",
                        crate::error::count(attempts as usize, "attempt", "attempts"),
                        humantime::format_duration(Duration::from_secs(age.as_secs()))
                    )
                } else {
                    error.to_string()
                };
                self.counters.dead();
                // The relay's state directory, unless `events` finds it by itself.
                let state_dir = self
                    .spool
                    .path()
                    .parent()
                    .map(spool::lock::state_dir_arg)
                    .unwrap_or_default();
                let id = item.event.id;
                let cluster = self.sink.cluster_args();
                match (&error, self.sink.cluster_seq(&item.event)) {
                    // A replay would fail the same way: how to see it instead.
                    (ForwardError::Request(_), Some(seq)) => warn!(
                        event = id,
                        stream_seq = seq,
                        "dead letter: {why}; it cannot be sent as it is: see it with `smee-relay events show {seq}{cluster}` (the cluster's id, from any instance)"
                    ),
                    (ForwardError::Request(_), None) => warn!(
                        event = id,
                        "dead letter: {why}; it cannot be sent as it is: see it with `smee-relay events show {id}{state_dir}`"
                    ),
                    // `events replay` takes the cluster's ids in cluster mode.
                    (_, Some(seq)) => warn!(
                        event = id,
                        stream_seq = seq,
                        "dead letter: {why}; replay it with `smee-relay events replay {seq}{cluster}` (the cluster's id, from any instance)"
                    ),
                    (_, None) => warn!(
                        event = id,
                        "dead letter: {why}; replay it with `smee-relay events replay {id}{state_dir}`"
                    ),
                }
                let finished = self
                    .finish(mark(self.route, item, Outcome::Dead { status, error: why }))
                    .await;
                self.pace(started).await;
                return finished;
            }
            self.counters.retried(&error);
            let delay = self
                .policy
                .delay(error.retry_after(), &mut backoff, item.event.id);
            // Never wait past the event's --max-retry-age: the queue behind it would wait too.
            // The attempt after that age decides (a dead letter if it fails).
            let left = self.policy.max_age.saturating_sub(age);
            let delay = delay.min(left.max(Duration::from_secs(1)));
            // The sink's pace is part of the wait, not added to it (helper-140: Slack's
            // `Retry-After: 3` was retried after 4 s, its line said a second late).
            let delay = delay.max(self.pace_left(started));
            info!(
                event = item.event.id,
                // In a cluster, the id `events` takes (the line above names both).
                stream_seq = self.sink.cluster_seq(&item.event),
                attempt = attempts,
                // Routes to several targets each retry their own event 1 (helper-116).
                route = self.label,
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
            // A reload ends a wait (the operator may have fixed the target, even one that asked
            // for an hour), never a rate limit's (helper-147: five SIGHUPs, five messages into
            // Slack's 429 within its Retry-After).
            let rate_limited = matches!(&error, ForwardError::Status { status, .. }
                if status.as_u16() == 429);
            tokio::select! {
                _ = wait(self.cancel, delay) => {}
                _ = self.retry_now.notified(), if !rate_limited => {
                    info!(event = item.event.id, route = self.label, "retrying now (SIGHUP)");
                    backoff = self.policy.backoff.start();
                    // Now, but never faster than the sink's pace.
                    self.pace(started).await;
                }
                // The claim at the top of the loop says why.
                _ = taken_away(self.sink, &item.event) => {}
            }
            if self.cancel.is_cancelled() {
                return false;
            }
        }
    }
}

impl Delivery<'_> {
    /// Pace deliveries the sink asks to be paced (Slack: one message a second): the next one
    /// starts at least the pace after `started`. Only then: even an elapsed timer costs a turn
    /// of tokio's 1 ms timer wheel, which capped delivery at 1,000 events/s (bench/run.sh).
    /// Cut short by a stop (the next delivery will not come from this route); a cluster
    /// route's ack waits the pace out itself (`cluster`'s `Paced`).
    async fn pace(&self, started: tokio::time::Instant) {
        let pace = self.sink.min_interval();
        if !pace.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep_until(started + pace) => {}
                _ = self.cancel.cancelled() => {}
            }
        }
    }

    /// What is left of the sink's pace after an attempt that began at `started`.
    fn pace_left(&self, started: tokio::time::Instant) -> Duration {
        (started + self.sink.min_interval()).saturating_duration_since(tokio::time::Instant::now())
    }

    /// Record a finished delivery before the route goes on. While that fails (the disk is
    /// full), the route waits rather than deliver more than a crash could account for; false if
    /// shutdown came first (the delivery is then repeated after the restart).
    async fn finish(&self, mark: Write) -> bool {
        let mut said = false;
        loop {
            match self.writer.finish(mark.clone()) {
                Ok(()) => return true,
                Err(e) => {
                    if !said {
                        said = true;
                        let full = match crate::error::disk_full(&e) {
                            true => {
                                " (the disk holding the spool is full: free space there; the \
                                 route resumes by itself)"
                            }
                            false => "",
                        };
                        error!(
                            route = self.label,
                            "cannot record a finished delivery, pausing this route until it \
                             can: {}{full}",
                            crate::error::chain(&e)
                        );
                    }
                    wait(self.cancel, Duration::from_secs(1)).await;
                    if self.cancel.is_cancelled() {
                        return false;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;
    use crate::spool::Limits;
    use std::sync::Mutex;

    use http::StatusCode;
    use tokio::time::Instant;

    /// How often an idle route looks at a spool file it shares with other processes.
    const IDLE_POLL: Duration = crate::spool::LOOK_EVERY;

    /// A sink that answers from a script and notes when each attempt came.
    struct Scripted {
        answers: Mutex<Vec<Result<Delivered, ForwardError>>>,
        attempts: Mutex<Vec<Instant>>,
        /// How many attempts so far, for the test to wait on.
        attempted: tokio::sync::watch::Sender<usize>,
        /// Its [`Sink::min_interval`] (Slack's is 1 s).
        pace: Duration,
    }

    impl Scripted {
        fn new(answers: Vec<Result<Delivered, ForwardError>>) -> Self {
            Self {
                answers: Mutex::new(answers),
                attempts: Mutex::new(Vec::new()),
                attempted: tokio::sync::watch::Sender::new(0),
                pace: Duration::ZERO,
            }
        }
    }

    impl Sink for Scripted {
        fn describe(&self) -> String {
            "scripted".into()
        }
        fn min_interval(&self) -> Duration {
            self.pace
        }
        fn deliver<'a>(
            &'a self,
            _event: &'a StoredEvent,
            _delivery_id: &'a str,
        ) -> BoxFuture<'a, Result<Delivered, ForwardError>> {
            self.attempts.lock().unwrap().push(Instant::now());
            self.attempted.send_modify(|n| *n += 1);
            let answer = self.answers.lock().unwrap().remove(0);
            Box::pin(async move { answer })
        }
    }

    /// A 200 answer, at once.
    fn answered_200() -> Result<Delivered, ForwardError> {
        Ok(Delivered {
            status: StatusCode::OK,
            elapsed: Duration::ZERO,
            not_sent: None,
        })
    }

    fn status(code: u16, retry_after: Option<u64>) -> Result<Delivered, ForwardError> {
        Err(ForwardError::Status {
            status: StatusCode::from_u16(code).unwrap(),
            retry_after: retry_after.map(Duration::from_secs),
            location: None,
            body: String::new(),
        })
    }

    /// The delivery line users read (and grep) for each attempt, word for word: written into
    /// one string, with the sink described once per route.
    #[test]
    fn delivery_lines_read_as_documented() {
        let at = |level| {
            tracing_subscriber::fmt()
                .with_max_level(level)
                .with_writer(std::io::sink)
                .finish()
        };
        let event = StoredEvent {
            id: 12,
            received_ms: 0,
            channel: "https://smee.io/x".into(),
            event: Event {
                headers: vec![("x-github-event".into(), "push".into())],
                body: bytes::Bytes::from_static(b"{}"),
                ..Event::default()
            },
        };
        let sink = Scripted::new(Vec::new());
        let text = |outcome: &Result<Delivered, ForwardError>| {
            tracing::subscriber::with_default(at(tracing::Level::INFO), || {
                match delivery_line(&sink, "POST 127.0.0.1:3000/hook", &event, outcome) {
                    Some(DeliveryLine::Delivered(line)) => format!("info: {line}"),
                    Some(DeliveryLine::Failed(line)) => format!("warn: {line}"),
                    None => "none".into(),
                }
            })
        };
        let done = Ok(Delivered {
            status: StatusCode::OK,
            elapsed: Duration::from_millis(3),
            not_sent: None,
        });
        assert_eq!(
            text(&done),
            "info: POST 127.0.0.1:3000/hook -> 200 in 3 ms (event 12, x-github-event=push)"
        );
        assert_eq!(
            text(&status(503, None)),
            "warn: POST 127.0.0.1:3000/hook failed: target answered 503 Service Unavailable \
             (event 12, x-github-event=push)"
        );
        // Off at the level: nothing is made.
        tracing::subscriber::with_default(at(tracing::Level::ERROR), || {
            assert!(delivery_line(&sink, "x", &event, &done).is_none());
        });
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
        let sink = Arc::new(Scripted::new(vec![
            status(503, None),
            status(503, None),
            status(503, None),
            status(429, Some(7)),
            answered_200(),
        ]));
        let mut attempted = sink.attempted.subscribe();
        let cancel = CancellationToken::new();
        let route = start_route(&spool, &writer, sink.clone(), &cancel);
        // On the paused clock: the route's backoff timers are what move time on; the deadline
        // is far beyond the 1 + 2 + 4 (+ jitter) + 7 s the script takes.
        tokio::time::timeout(Duration::from_secs(120), attempted.wait_for(|n| *n >= 5))
            .await
            .expect("five attempts within the deadline")
            .unwrap();
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

    /// A cluster route's sink whose target fails once, after which the cluster gives the
    /// delivery to another instance (its claim says so).
    struct HandedOver {
        claims: tokio::sync::watch::Sender<usize>,
    }

    impl Sink for HandedOver {
        fn describe(&self) -> String {
            "handed over".into()
        }
        fn deliver<'a>(
            &'a self,
            _event: &'a StoredEvent,
            _delivery_id: &'a str,
        ) -> BoxFuture<'a, Result<Delivered, ForwardError>> {
            Box::pin(async { status(503, None) })
        }
        fn claim<'a>(
            &'a self,
            _event: &'a StoredEvent,
        ) -> Option<BoxFuture<'a, Result<(), String>>> {
            self.claims.send_modify(|n| *n += 1);
            let first = *self.claims.borrow() == 1;
            Some(Box::pin(async move {
                if first {
                    Ok(())
                } else {
                    Err("another instance has it".into())
                }
            }))
        }
    }

    /// helper-110: a cluster delivery another instance took over left this instance's route
    /// "failing" (on `/healthz` and the gauge) until it happened to deliver a later one.
    #[tokio::test(start_paused = true)]
    async fn regression_a_delivery_handed_over_left_the_route_failing() {
        let (_dir, spool, writer, thread) = spool_with(1).await;
        let sink = Arc::new(HandedOver {
            claims: tokio::sync::watch::Sender::new(0),
        });
        let mut claims = sink.claims.subscribe();
        let counters = Arc::new(Counters::default());
        let cancel = CancellationToken::new();
        let policy = RetryPolicy::DEFAULT;
        let route = start_route_with(&spool, &writer, sink.clone(), &cancel, policy, &counters);
        claims.wait_for(|n| *n == 1).await.unwrap();
        tokio::time::timeout(Duration::from_secs(60), claims.wait_for(|n| *n == 2))
            .await
            .expect("the second claim, after the backoff")
            .unwrap();
        // The route finishes the delivery right after the claim's answer.
        writer.commit(Vec::new()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            counters.failing(crate::clock::now_ms()).is_empty(),
            "{:?}",
            counters.failing(crate::clock::now_ms())
        );
        cancel.cancel();
        route.await.unwrap();
        drop(writer);
        thread.join().unwrap();
    }

    /// A sink that takes `delay` to answer 200 and counts attempts (started and finished).
    struct Slow {
        delay: Duration,
        started: Mutex<u32>,
        finished: Mutex<u32>,
    }

    impl Sink for Slow {
        fn describe(&self) -> String {
            "slow".into()
        }
        fn deliver<'a>(
            &'a self,
            _event: &'a StoredEvent,
            _delivery_id: &'a str,
        ) -> BoxFuture<'a, Result<Delivered, ForwardError>> {
            *self.started.lock().unwrap() += 1;
            Box::pin(async move {
                tokio::time::sleep(self.delay).await;
                *self.finished.lock().unwrap() += 1;
                Ok(Delivered {
                    status: StatusCode::OK,
                    elapsed: self.delay,
                    not_sent: None,
                })
            })
        }
    }

    fn one_event() -> Event {
        Event {
            sse_id: None,
            timestamp_ms: None,
            headers: vec![],
            query: vec![],
            body: "{}".into(),
        }
    }

    /// A spool with `n` events queued on route "r", and its writer.
    async fn spool_with(
        n: usize,
    ) -> (
        tempfile::TempDir,
        Arc<Spool>,
        SpoolWriter,
        std::thread::JoinHandle<()>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let (writer, thread) = SpoolWriter::start(spool.clone(), Limits { max_bytes: 1 << 20 });
        let events: Vec<Event> = (0..n).map(|_| one_event()).collect();
        writer
            .append("c", &["r".to_string()], events.into(), None)
            .await
            .unwrap();
        (dir, spool, writer, thread)
    }

    fn start_route(
        spool: &Arc<Spool>,
        writer: &SpoolWriter,
        sink: Arc<dyn Sink>,
        cancel: &CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let counters = Arc::new(Counters::default());
        start_route_with(spool, writer, sink, cancel, RetryPolicy::DEFAULT, &counters)
    }

    fn start_route_with(
        spool: &Arc<Spool>,
        writer: &SpoolWriter,
        sink: Arc<dyn Sink>,
        cancel: &CancellationToken,
        policy: RetryPolicy,
        counters: &Arc<Counters>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(run_route(
            spool.clone(),
            writer.clone(),
            "r".into(),
            sink,
            policy,
            counters.clone(),
            RouteControl::new(cancel.clone()),
        ))
    }

    /// Make the spool file look long untouched, as an idle relay's file is after a while (the
    /// paused clock moves tokio's time, not the file system's).
    fn age_the_file(spool: &Spool) {
        let file = std::fs::File::options()
            .write(true)
            .open(spool.path())
            .unwrap();
        let old = std::time::SystemTime::now() - Duration::from_secs(3600);
        file.set_modified(old).unwrap();
    }

    /// An idle route on a spool its relay holds alone neither reads it nor looks at it (no
    /// timer at all: no other process can write it), and an event queued in this process
    /// outside the writer (a catch-up's appends, a replay) is still delivered at once.
    #[tokio::test(start_paused = true)]
    async fn an_idle_route_reads_nothing_yet_sees_a_replay_outside_the_writer() {
        let (_dir, spool, writer, thread) = spool_with(1).await;
        let sink = Arc::new(Scripted::new(vec![answered_200(), answered_200()]));
        let mut attempted = sink.attempted.subscribe();
        let cancel = CancellationToken::new();
        let route = start_route(&spool, &writer, sink.clone(), &cancel);
        attempted.wait_for(|n| *n == 1).await.unwrap();
        // The mark is on disk, then the file stands still.
        writer.commit(Vec::new()).await.unwrap();
        age_the_file(&spool);
        // One read may follow: the file changed since the route last looked.
        tokio::time::sleep(IDLE_POLL * 3).await;
        let (reads, looks) = (spool.reads(), spool.looks());
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(
            spool.reads(),
            reads,
            "an idle route read the spool during 10 minutes in which nobody wrote it"
        );
        assert_eq!(
            spool.looks(),
            looks,
            "an idle route looked at a spool file no other process can write"
        );
        // Re-queued here, not through the writer: the spool nudges the route.
        let queued_at = tokio::time::Instant::now();
        let id = spool.list(None, 10).unwrap()[0].id;
        assert_eq!(
            spool.replay(crate::spool::Replay::Ids(vec![id])).unwrap(),
            1
        );
        tokio::time::timeout(Duration::from_secs(60), attempted.wait_for(|n| *n == 2))
            .await
            .expect("the replayed event is delivered")
            .unwrap();
        assert!(
            queued_at.elapsed() <= IDLE_POLL * 2,
            "delivered {:?} after the replay",
            queued_at.elapsed()
        );
        cancel.cancel();
        route.await.unwrap();
        drop(writer);
        thread.join().unwrap();
    }

    /// An event another process queues (`smee-relay events replay`, which wakes nothing in
    /// this one) once the relay shares its spool with it is delivered: the route looks at the
    /// shared file every second.
    #[tokio::test]
    async fn an_idle_route_sees_an_event_another_process_replays() {
        let (dir, spool, writer, thread) = spool_with(1).await;
        let sink = Arc::new(Recording::default());
        let cancel = CancellationToken::new();
        let route = start_route(&spool, &writer, sink.clone(), &cancel);
        delivered(&sink, 1).await;
        // The command: it asks the relay to share the file (the writer thread's next look),
        // then re-queues the event in its own transaction.
        let state = dir.path().to_owned();
        let command = tokio::task::spawn_blocking(move || Spool::open_shared(&state))
            .await
            .unwrap()
            .unwrap();
        let id = command.list(None, 10).unwrap()[0].id;
        assert_eq!(
            command.replay(crate::spool::Replay::Ids(vec![id])).unwrap(),
            1
        );
        delivered(&sink, 2).await;
        drop(command);
        cancel.cancel();
        route.await.unwrap();
        drop(writer);
        thread.join().unwrap();
    }

    /// A sink that answers 200 and notes each body it was given, in order; while `held` is
    /// locked for writing, a delivery waits (a slow target, for a route to fall behind).
    #[derive(Default)]
    struct Recording {
        bodies: Mutex<Vec<String>>,
        delivered: tokio::sync::watch::Sender<usize>,
        held: tokio::sync::RwLock<()>,
    }

    impl Sink for Recording {
        fn describe(&self) -> String {
            "recording".into()
        }
        fn deliver<'a>(
            &'a self,
            event: &'a StoredEvent,
            _delivery_id: &'a str,
        ) -> BoxFuture<'a, Result<Delivered, ForwardError>> {
            Box::pin(async {
                drop(self.held.read().await);
                let body = String::from_utf8_lossy(&event.event.body).into_owned();
                self.bodies.lock().unwrap().push(body);
                self.delivered.send_modify(|n| *n += 1);
                answered_200()
            })
        }
    }

    fn numbered(n: usize) -> Event {
        Event {
            body: format!("{n}").into(),
            ..one_event()
        }
    }

    /// Wait (real time, with a deadline) until the sink has `n` deliveries.
    async fn delivered(sink: &Recording, n: usize) {
        let mut delivered = sink.delivered.subscribe();
        tokio::time::timeout(Duration::from_secs(20), delivered.wait_for(|d| *d >= n))
            .await
            .unwrap_or_else(|_| panic!("{n} deliveries within the deadline"))
            .unwrap();
    }

    /// A route `r` on a fresh spool, delivering to a [`Recording`] sink.
    struct Harness {
        _dir: tempfile::TempDir,
        spool: Arc<Spool>,
        writer: SpoolWriter,
        thread: std::thread::JoinHandle<()>,
        sink: Arc<Recording>,
        cancel: CancellationToken,
        route: Option<tokio::task::JoinHandle<()>>,
    }

    impl Harness {
        async fn start() -> Harness {
            let (_dir, spool, writer, thread) = spool_with(0).await;
            let sink = Arc::new(Recording::default());
            let cancel = CancellationToken::new();
            let route = Some(start_route(&spool, &writer, sink.clone(), &cancel));
            Harness {
                _dir,
                spool,
                writer,
                thread,
                sink,
                cancel,
                route,
            }
        }

        /// Append event `n` (its body is `n`) through this process's writer.
        async fn append(&self, n: usize) {
            self.writer
                .append("c", &["r".into()], vec![numbered(n)].into(), None)
                .await
                .unwrap();
        }

        async fn stop_route(&mut self) {
            self.cancel.cancel();
            if let Some(route) = self.route.take() {
                route.await.unwrap();
            }
        }

        async fn stop(mut self) {
            self.stop_route().await;
            drop(self.writer);
            self.thread.join().unwrap();
        }

        /// Stop, once events `0..=last` were delivered in order and nothing is left queued.
        async fn stop_all_delivered(mut self, last: usize) {
            let expected: Vec<String> = (0..=last).map(|n| n.to_string()).collect();
            assert_eq!(*self.sink.bodies.lock().unwrap(), expected);
            self.stop_route().await;
            let left = self.spool.pending("r", 0, usize::MAX).unwrap();
            assert!(left.is_empty(), "{left:?}");
            self.stop().await;
        }
    }

    /// At everyday rates a drained route read every appended event back from the spool: a
    /// blocking-pool handoff, a read transaction and a `statx` per event. It now takes what
    /// this process's writer queued from the append itself.
    #[tokio::test]
    async fn a_drained_route_takes_what_this_process_appends_without_reading_it_back() {
        let h = Harness::start().await;
        h.append(0).await;
        delivered(&h.sink, 1).await;
        let reads = h.spool.reads();
        for n in 1..=20 {
            h.writer
                .append("c", &["r".into()], vec![numbered(n)].into(), None)
                .await
                .unwrap();
            delivered(&h.sink, n + 1).await;
        }
        // A stalled second (`IDLE_POLL`) on a loaded machine may add a read; one per event
        // was the old cost.
        assert!(
            h.spool.reads() - reads <= 6,
            "{} reads for 20 events",
            h.spool.reads() - reads
        );
        // What it took over is marked delivered like anything read.
        h.stop_all_delivered(20).await;
    }

    /// A route behind its appends by several commits (a slow target in a burst) read its
    /// backlog back from the spool: the writer handed over only its last commit. It now takes
    /// every commit since what it delivered from the handover chain.
    #[tokio::test]
    async fn a_route_behind_by_several_commits_takes_them_without_reading_them_back() {
        let h = Harness::start().await;
        h.append(0).await;
        delivered(&h.sink, 1).await;
        let reads = h.spool.reads();
        for round in 0..12 {
            let held = h.sink.held.write().await;
            for n in 1 + round * 4..=4 + round * 4 {
                h.append(n).await;
            }
            drop(held);
            delivered(&h.sink, 5 + round * 4).await;
        }
        // One read per round was the old cost; see the test above for the tolerance.
        assert!(
            h.spool.reads() - reads <= 4,
            "{} reads for 12 backlogs",
            h.spool.reads() - reads
        );
        h.stop_all_delivered(48).await;
    }

    /// The chain of commits a route takes from has a gap where another process queued: the
    /// route reads there, and delivers in queue order (with nothing else to wake it: the
    /// appends after the gap were told before the route got to them).
    #[tokio::test]
    async fn a_backlog_with_another_process_write_in_it_is_read_in_order() {
        let h = Harness::start().await;
        h.append(0).await;
        delivered(&h.sink, 1).await;
        let held = h.sink.held.write().await;
        h.append(1).await;
        h.append(2).await;
        let other = Write::Append {
            channel: "c".into(),
            routes: vec!["r".into()],
            events: vec![numbered(3)].into(),
            cursor: None,
        };
        h.spool
            .write(&[other], Limits { max_bytes: 1 << 20 })
            .unwrap();
        h.append(4).await;
        h.append(5).await;
        drop(held);
        delivered(&h.sink, 6).await;
        h.stop_all_delivered(5).await;
    }

    /// Found by review: commit N (events for `r`) is told after commit N+1, an event queued on
    /// no route (its `Tell` is then skipped: an older commit). N+1 handed over nothing and left
    /// the chain's end before N, so the woken route was told nothing was queued and waited
    /// idle, N's events queued, until some later append.
    #[tokio::test]
    async fn regression_a_commit_told_after_one_that_queued_nothing_was_left_queued() {
        let mut h = Harness::start().await;
        h.append(0).await;
        delivered(&h.sink, 1).await;
        let routes = vec!["r".to_string()];
        // Commit N, polled once: the job goes to the writer thread, its answer is not taken
        // yet. (If the answer was there at the first poll already, that commit was told in
        // order: again.)
        let mut n = 1;
        let pending = loop {
            let events = vec![numbered(n), numbered(n + 1)].into();
            let mut append = Box::pin(h.writer.append("c", &routes, events, None));
            if tokio::time::timeout(Duration::ZERO, &mut append)
                .await
                .is_err()
            {
                break append;
            }
            n += 2;
            delivered(&h.sink, n).await;
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let last = (n + 1).to_string();
        let committed = |q: &Queued| q.event.event.body == last.as_bytes();
        while !h.spool.pending("r", 0, 100).unwrap().iter().any(committed) {
            assert!(Instant::now() < deadline, "commit N not made");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Commit N+1: an event for no route, told at once.
        let events = vec![numbered(999)].into();
        h.writer.append("c", &[], events, None).await.unwrap();
        // Room for the route to take N+1's tell and go idle (nothing to wait on from here:
        // the fixed relay reads instead, and passes either way).
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Now N's appender takes its answer (its tell is skipped: N+1 was told).
        pending.await.unwrap();
        let mut delivered = h.sink.delivered.subscribe();
        let got =
            tokio::time::timeout(Duration::from_secs(5), delivered.wait_for(|d| *d >= n + 2)).await;
        assert!(
            got.is_ok(),
            "events {n} and {} still queued after 5 s; delivered: {:?}",
            n + 1,
            h.sink.bodies.lock().unwrap()
        );
        h.stop_route().await;
        h.stop().await;
    }

    /// A catch-up after a gap appends outside the writer (and nudges routes) right after a live
    /// event's append. A route woken by the nudge took what the live append handed over for its
    /// whole queue, and the catch-up's events waited for the next append: on a spool held alone
    /// nothing else wakes an idle route. (Which wake an idle route takes first, when both are
    /// ready, is a draw: rounds make it certain.)
    #[tokio::test]
    async fn regression_a_nudge_right_after_an_append_left_the_nudged_events_queued() {
        let h = Harness::start().await;
        h.append(0).await;
        delivered(&h.sink, 1).await;
        for round in 0..24 {
            let live = 1 + 2 * round;
            h.append(live).await;
            h.spool
                .append_missing("c", &["r".into()], &[numbered(live + 1)], "x-none")
                .unwrap();
            delivered(&h.sink, live + 2).await;
        }
        h.stop_all_delivered(48).await;
    }

    /// A route stopped while idle returned without waiting for its last finished delivery to
    /// be committed (marks wait up to `MARK_DELAY` for a commit): a route that took over at once
    /// (a reload) read it as pending and delivered it again.
    #[tokio::test]
    async fn regression_a_route_stopped_while_idle_commits_what_it_finished() {
        let mut h = Harness::start().await;
        h.append(0).await;
        delivered(&h.sink, 1).await;
        h.stop_route().await;
        let left = h.spool.pending("r", 0, usize::MAX).unwrap();
        assert!(
            left.is_empty(),
            "still pending after the route stopped: {left:?}"
        );
        h.stop().await;
    }

    /// A route that takes appends over must not skip what another process queued in between
    /// (`smee-relay events replay`, or any write to the file that bypasses this writer): it
    /// reads then, and delivers in queue order.
    #[tokio::test]
    async fn an_event_queued_by_another_process_between_two_appends_is_delivered_in_order() {
        let mut h = Harness::start().await;
        h.append(0).await;
        delivered(&h.sink, 1).await;
        h.append(1).await;
        delivered(&h.sink, 2).await;
        // Another process's transaction: it queues behind what is there, and wakes nobody here.
        let other = Write::Append {
            channel: "c".into(),
            routes: vec!["r".into()],
            events: vec![numbered(2)].into(),
            cursor: None,
        };
        h.spool
            .write(&[other], Limits { max_bytes: 1 << 20 })
            .unwrap();
        // This process appends next: its append must not be taken for the whole queue.
        h.append(3).await;
        delivered(&h.sink, 4).await;
        // A replay by another process, then an append here: the same.
        let id = h.spool.list(None, 100).unwrap()[0].id;
        assert_eq!(
            h.spool.replay(crate::spool::Replay::Ids(vec![id])).unwrap(),
            1
        );
        h.append(4).await;
        delivered(&h.sink, 6).await;
        assert_eq!(
            *h.sink.bodies.lock().unwrap(),
            ["0", "1", "2", "3", "0", "4"]
        );
        h.stop_route().await;
        h.stop().await;
    }

    /// Regression: a long Retry-After (within --max-retry-after) parked the queue past the
    /// event's --max-retry-age; the wait now ends when the retry age does.
    #[tokio::test(start_paused = true)]
    async fn regression_a_retry_after_never_waits_past_max_retry_age() {
        let (_dir, spool, writer, thread) = spool_with(1).await;
        let sink = Arc::new(Scripted::new(vec![status(503, Some(3600)), answered_200()]));
        let cancel = CancellationToken::new();
        let policy = RetryPolicy {
            max_age: Duration::from_secs(600),
            ..RetryPolicy::DEFAULT
        };
        let counters = Arc::new(Counters::default());
        let route = start_route_with(&spool, &writer, sink.clone(), &cancel, policy, &counters);
        while sink.attempts.lock().unwrap().len() < 2 {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        let at = sink.attempts.lock().unwrap().clone();
        assert!(
            at[1] - at[0] <= Duration::from_secs(660),
            "waited {:?}, past the 10 min retry age",
            at[1] - at[0]
        );
        cancel.cancel();
        route.await.unwrap();
        drop(writer);
        thread.join().unwrap();
    }

    /// Regression (helper-140, helper-144): a paced sink's retry (Slack's one message a
    /// second) waited the pace, then the whole retry delay: `Retry-After: 3` was retried after
    /// 4 s, and "retrying in 3s" was logged a second late. The pace is part of the delay.
    #[tokio::test(start_paused = true)]
    async fn regression_a_paced_retry_waited_the_pace_and_then_its_delay() {
        let (_dir, spool, writer, thread) = spool_with(1).await;
        let sink = Arc::new(Scripted {
            pace: Duration::from_secs(1),
            ..Scripted::new(vec![
                status(429, Some(3)),
                status(429, Some(3)),
                answered_200(),
            ])
        });
        let mut attempted = sink.attempted.subscribe();
        let cancel = CancellationToken::new();
        let route = start_route(&spool, &writer, sink.clone(), &cancel);
        tokio::time::timeout(Duration::from_secs(60), attempted.wait_for(|n| *n >= 3))
            .await
            .expect("three attempts")
            .unwrap();
        let at = sink.attempts.lock().unwrap().clone();
        let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps, [Duration::from_secs(3); 2]);
        cancel.cancel();
        route.await.unwrap();
        drop(writer);
        thread.join().unwrap();
    }

    /// Regression (helper-147): a SIGHUP ended every wait, one the target asked for with
    /// `Retry-After` too: five reloads sent five messages into Slack's 429 in five seconds. It
    /// ends backoff waits only (the operator may have fixed the target); a target's own ask
    /// is kept.
    #[tokio::test(start_paused = true)]
    async fn regression_a_sighup_cut_short_a_wait_the_target_asked_for() {
        let (_dir, spool, writer, thread) = spool_with(1).await;
        let sink = Arc::new(Scripted::new(vec![
            status(429, Some(10)),
            status(503, None),
            answered_200(),
        ]));
        let mut attempted = sink.attempted.subscribe();
        let cancel = CancellationToken::new();
        let control = RouteControl::new(cancel.clone());
        let retry_now = control.retry_now.clone();
        let route = tokio::spawn(run_route(
            spool.clone(),
            writer.clone(),
            "r".into(),
            sink.clone(),
            RetryPolicy::DEFAULT,
            Arc::new(Counters::default()),
            control,
        ));
        attempted.wait_for(|n| *n >= 1).await.unwrap();
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            retry_now.notify_waiters();
        }
        attempted.wait_for(|n| *n >= 2).await.unwrap();
        // The 503's backoff wait is the operator's to end.
        tokio::time::sleep(Duration::from_millis(100)).await;
        retry_now.notify_waiters();
        attempted.wait_for(|n| *n >= 3).await.unwrap();
        let at = sink.attempts.lock().unwrap().clone();
        assert_eq!(at[1] - at[0], Duration::from_secs(10), "Retry-After kept");
        assert!(
            at[2] - at[1] < Duration::from_millis(200),
            "{:?}",
            at[2] - at[1]
        );
        cancel.cancel();
        route.await.unwrap();
        drop(writer);
        thread.join().unwrap();
    }

    /// Regression (helper-140, helper-144): a route started again (a restart, or a reload,
    /// which starts the alert route anew) sent its failing head at once without a word: the
    /// log said "retrying in 2s", then nothing, then the delivery.
    #[tokio::test(start_paused = true)]
    async fn regression_a_route_started_again_retried_its_failing_head_without_a_word() {
        let (_dir, spool, writer, thread) = spool_with(1).await;
        let failing = Arc::new(Scripted::new(vec![status(503, Some(600))]));
        let cancel = CancellationToken::new();
        let route = start_route(&spool, &writer, failing.clone(), &cancel);
        while spool.pending("r", 0, 1).unwrap()[0].attempts < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cancel.cancel();
        route.await.unwrap();

        let (logs, _guard) = crate::test_logs::capture_at(tracing::Level::INFO);
        let back = Arc::new(Scripted::new(vec![answered_200()]));
        let mut attempted = back.attempted.subscribe();
        let cancel = CancellationToken::new();
        let route = start_route(&spool, &writer, back.clone(), &cancel);
        attempted.wait_for(|n| *n >= 1).await.unwrap();
        let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
        assert!(
            logs.contains(
                "retrying now: the route started (a start or a reload), 1 attempt failed before"
            ),
            "{logs}"
        );
        cancel.cancel();
        route.await.unwrap();
        drop(writer);
        thread.join().unwrap();
    }

    /// Regression: `Retry-After: 0` (or a date already past) was waited as asked, so a target
    /// answering `429` with it again and again was retried in a tight loop (thousands of
    /// requests a second, each with a log line). Such an ask now waits the backoff's delay.
    #[test]
    fn regression_a_retry_after_of_zero_retried_in_a_tight_loop() {
        let policy = RetryPolicy::DEFAULT;
        let mut backoff = policy.backoff.start();
        let waits: Vec<Duration> = (0..4)
            .map(|_| policy.delay(Some(Duration::ZERO), &mut backoff, 1))
            .collect();
        assert!(waits[0] >= Duration::from_secs(1), "{waits:?}");
        assert!(
            waits[3] >= Duration::from_secs(8),
            "the backoff grows: {waits:?}"
        );
        let mut backoff = policy.backoff.start();
        assert_eq!(
            policy.delay(Some(Duration::from_secs(7)), &mut backoff, 1),
            Duration::from_secs(7)
        );
    }

    /// Regression (issue 16, item 7): `Retry-After: 999999999` parked a route for decades.
    #[tokio::test(start_paused = true)]
    async fn regression_a_huge_retry_after_is_capped_at_max_retry_after() {
        let (_dir, spool, writer, thread) = spool_with(1).await;
        let sink = Arc::new(Scripted::new(vec![
            status(429, Some(999_999_999)),
            answered_200(),
        ]));
        let cancel = CancellationToken::new();
        let route = start_route(&spool, &writer, sink.clone(), &cancel);
        while sink.attempts.lock().unwrap().len() < 2 {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        let at = sink.attempts.lock().unwrap().clone();
        assert_eq!(
            at[1] - at[0],
            RetryPolicy::DEFAULT.max_retry_after,
            "waited the cap (1 h), not 31 years"
        );
        cancel.cancel();
        route.await.unwrap();
        drop(writer);
        thread.join().unwrap();
    }

    /// Regression (issue 16, item 2): a stopped route went on through its whole read-ahead
    /// batch. It now finishes the delivery in flight, leaves the rest queued, and has recorded
    /// what it finished by the time it returns.
    #[tokio::test(start_paused = true)]
    async fn regression_a_stopped_route_stops_at_an_event_boundary() {
        let (_dir, spool, writer, thread) = spool_with(5).await;
        let sink = Arc::new(Slow {
            delay: Duration::from_secs(2),
            started: Mutex::new(0),
            finished: Mutex::new(0),
        });
        let cancel = CancellationToken::new();
        let route = start_route(&spool, &writer, sink.clone(), &cancel);
        while *sink.started.lock().unwrap() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cancel.cancel();
        route.await.unwrap();
        assert_eq!(*sink.started.lock().unwrap(), 1, "nothing after the stop");
        assert_eq!(
            *sink.finished.lock().unwrap(),
            1,
            "the one in flight finished"
        );
        assert_eq!(
            spool.pending("r", 0, 10).unwrap().len(),
            4,
            "the finished one is recorded, the rest stay queued"
        );
        drop(writer);
        thread.join().unwrap();
    }

    /// A delivery that outlasts the shutdown timeout is cut off there and stays queued.
    #[tokio::test(start_paused = true)]
    async fn a_slow_delivery_is_cut_off_at_the_shutdown_timeout() {
        let (_dir, spool, writer, thread) = spool_with(3).await;
        let sink = Arc::new(Slow {
            delay: Duration::from_secs(3600),
            started: Mutex::new(0),
            finished: Mutex::new(0),
        });
        let cancel = CancellationToken::new();
        let route = start_route(&spool, &writer, sink.clone(), &cancel);
        while *sink.started.lock().unwrap() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let stopped_at = Instant::now();
        cancel.cancel();
        route.await.unwrap();
        assert_eq!(
            stopped_at.elapsed(),
            RetryPolicy::DEFAULT.shutdown_timeout,
            "cut off exactly at the deadline"
        );
        assert_eq!(*sink.finished.lock().unwrap(), 0);
        assert_eq!(
            spool.pending("r", 0, 10).unwrap().len(),
            3,
            "all still queued"
        );
        drop(writer);
        thread.join().unwrap();
    }
}
