//! The writer thread: every write to the spool goes through it, so commits are grouped and one
//! fsync covers many events. redb is blocking and allows one writer at a time; a thread that
//! owns the writes is what lets appends and delivery marks from every task share a commit.
//!
//! One exception saves the trickle two thread hand-offs per event: an append of one event,
//! while the thread sleeps and the write-ahead log takes it, is committed by the appender
//! itself ([`SpoolWriter::inline`]), with the marks queued, under the same lock the thread
//! commits under ([`Committer`]), so commits still come one at a time and in order.
//!
//! Idle, the thread wakes only when needed: for marks' deadlines, a second after a commit to
//! checkpoint the write-ahead log, and when another process asks to share the spool, which a
//! watch of the state directory tells ([`super::share::Watch`]; without one, it looks every
//! second). An inline commit into a thread asleep until told wakes it once, to set that
//! checkpoint's deadline a second later.
//!
//! Finished deliveries also go to the process's [`Journal`] at once ([`SpoolWriter::finish`]),
//! so that a crash of the process before their group commit forgets none of them. A commit that
//! fails (disk full) keeps the marks it carried and tries them again; appends are answered with
//! the error and their senders retry.
//!
//! Writes reach the thread through one queue ([`Queue`]), in the order they were sent. A write
//! someone waits for wakes the thread; a mark nobody waits for wakes it only if it has no
//! `MARK_DELAY` deadline set yet, and otherwise rides along with the next commit: at everyday
//! rates each delivery's mark used to cost the thread a wakeup of its own only to be queued.
//! After a commit that appended events, the routes are told ([`Tell`]) by the appender that
//! waited for it, from its own event loop, so the thread wakes that loop once, not twice.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};

use super::journal::Journal;
use super::room::Room;
use super::{Enqueued, Handover, Limits, Spool, SpoolError, Write, appended_bytes};
use crate::event::Event;

/// Most writes in one transaction; more wait for the next commit.
pub(crate) const MAX_BATCH: usize = 4096;

/// Most event bytes ([`Event::held_bytes`]) appended in one transaction, give or take the last
/// job taken: redb holds a transaction's pages in memory until its commit, so a burst commits
/// in slices of this size rather than all at once. An event larger than this is committed
/// alone. 1 MiB is about a thousand 1 KiB webhooks, far past where a larger commit saves CPU
/// (the fsync and redb's allocator record are per commit, a few hundred µs), and a commit of
/// it takes milliseconds, so the window between reading an event and its commit stays short.
pub(crate) const MAX_BATCH_BYTES: usize = 1 << 20;

/// Whether a batch of `jobs` writes appending `bytes` of events takes no more.
fn full(jobs: usize, bytes: usize) -> bool {
    jobs >= MAX_BATCH || bytes >= MAX_BATCH_BYTES
}

/// Per `Append` in a job, each event's id (`None`: refused, the spool is full).
pub type Appended = Vec<Vec<Option<u64>>>;

/// Writes that commit together, in one transaction.
struct Job {
    writes: Vec<Write>,
    /// Where to say the job is committed: per `Append` in it, the ids given, and what to tell
    /// the routes. `None` for delivery marks, which nobody waits for.
    reply: Option<oneshot::Sender<Answer>>,
    /// How many of the writes are marks also recorded in the journal: once committed, the
    /// journal may forget them.
    journaled: usize,
    /// Someone waits on it with nothing else to do ([`SpoolWriter::commit_now`]): committed as
    /// soon as the writer is free, not after `COMMIT_PACE`.
    urgent: bool,
    /// The bytes of the events it appends, for [`MAX_BATCH_BYTES`].
    bytes: usize,
}

/// What a job someone waits for is answered: per `Append`, the ids given, and the commit to
/// tell the routes of (if it appended events); or why it failed.
type Answer = Result<(Appended, Option<Told>), SpoolError>;

/// A commit that appended events, for its appenders to tell the routes of ([`Tell::tell`]): its
/// number (commits are numbered in order) and what it queued. Told when dropped: by the appender
/// that took the answer, normally; by whoever drops it otherwise (an appender cancelled after
/// the commit, such as a reconciliation stopped by a reload), so no append goes untold and an
/// idle route on a spool held alone, which waits for nothing else, still wakes.
struct Told {
    tell: Arc<Tell>,
    commit: u64,
    enqueued: Option<Arc<Enqueued>>,
}

impl Drop for Told {
    fn drop(&mut self) {
        self.tell.tell(self.commit, self.enqueued.take());
    }
}

/// How routes learn of appends. The appender that was waiting for the commit tells them, on its
/// own event loop, once it has its answer: the writer thread then wakes that loop once per
/// commit (the answer) rather than twice (the answer and the routes' watch).
struct Tell {
    /// Bumped after every commit that appended events, to wake idle routes.
    appended: watch::Sender<u64>,
    /// Handed, before `appended` is bumped, what that commit queued.
    handover: Arc<Handover>,
    /// The number of the last commit told: several appenders of one commit, or answers taken
    /// out of order, tell each commit once and never go back to an older one.
    told: Mutex<u64>,
}

impl Tell {
    fn tell(&self, commit: u64, enqueued: Option<Arc<Enqueued>>) {
        let mut told = self.told.lock().unwrap_or_else(|e| e.into_inner());
        if commit <= *told {
            return;
        }
        *told = commit;
        self.handover.push(enqueued);
        self.appended.send_modify(|n| *n += 1);
    }
}

/// How long finished deliveries may wait for a commit that someone waits for (an append) to
/// ride along with, before they get one of their own. They are in the journal meanwhile, so a
/// process crash forgets none of them; a power loss forgets at most this much (and forgetting a
/// delivery only repeats it).
const MARK_DELAY: Duration = Duration::from_millis(200);

/// After a failed commit, how long until the marks it carried are tried again.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// While events arrive faster than commits finish, the least time from one commit to the
/// next: each commit is an fsync plus a few pages, so under load fewer, larger commits cost
/// far less CPU. A lone event is committed at once, so a trickle pays no latency for it.
const COMMIT_PACE: Duration = Duration::from_millis(8);

/// An inline commit ([`SpoolWriter::inline`]) slower than this stalled its caller's event loop
/// too long: commits go through the thread for [`INLINE_OFF`].
const INLINE_SLOW: Duration = Duration::from_millis(20);

/// An append sooner than this after the last commit ended goes through the thread: events that
/// close together are a burst, relayed faster when the thread's commits overlap the event loop's
/// work. At 200 events a second an append comes about 4 ms after the last commit ended.
const INLINE_GAP: Duration = Duration::from_millis(2);

/// The most queued marks an inline commit takes along; with more, the append goes through the
/// thread (their commit is not the trickle's short one).
const MAX_RIDE: usize = 64;

/// How long commits go through the thread after a slow inline commit.
const INLINE_OFF: Duration = Duration::from_secs(60);

/// A handle for sending writes to the writer thread. Cloneable; the thread ends when every
/// handle is dropped, after applying what was sent.
#[derive(Clone)]
pub struct SpoolWriter {
    /// Where writes queue for the thread; the last handle dropped tells it to stop.
    jobs: Arc<Sender>,
    /// What commits, shared with the thread: its `writable` is false after a failed commit,
    /// true after a good one (for `/healthz`); its `tell` wakes idle routes (`appended`) and
    /// hands over what the commit queued (`handover`), so that a route that had its whole
    /// queue takes what follows without reading it back; its `journal` records finished deliveries
    /// before their commit (`None` if it could not be created: then a crash repeats what
    /// finished since the last commit).
    committer: Arc<Committer>,
    /// Told `(route, event id)` of each finished delivery as soon as it is durable (journaled
    /// or committed): the cluster's consumers ack an event on NATS only after that.
    finished: tokio::sync::broadcast::Sender<(String, u64)>,
}

/// The writes on their way to the writer thread, and what its senders must know to decide
/// whether to wake it.
struct Queue {
    /// Jobs not yet taken by the thread, oldest first.
    jobs: VecDeque<Job>,
    /// The thread holds unawaited marks and has a deadline to commit them by: a mark queued
    /// meanwhile is taken along by then (or sooner, with an append), so it need not wake it.
    marks_armed: bool,
    /// The thread is asleep on [`Shared::wake`] (a sender that finds it busy need not notify:
    /// it looks at the queue before it sleeps again).
    waiting: bool,
    /// The thread sleeps with no deadline (idle, alone, checkpointed: `must_poll`): an inline
    /// commit, which puts a record in the write-ahead log, wakes it, so that it checkpoints the
    /// log a second later (a `SHARE_POLL` deadline, not moved by later inline commits).
    unbounded: bool,
    /// The thread sleeps holding jobs it took from the queue (marks waiting for their deadline,
    /// or kept after a failed commit): an inline commit would overtake them, so there is none.
    holding: bool,
    /// Every [`SpoolWriter`] is gone: the thread commits what is queued and ends.
    closed: bool,
    /// Another process may have asked to share the spool (its [`super::share::Watch`] told):
    /// the thread looks at the requests when next idle, even if it looked less than a
    /// `SHARE_POLL` ago. Set at the start too, for a request made before the watch was.
    look: bool,
    /// The thread has ended (or panicked): nothing sent now would be written.
    stopped: bool,
}

/// What the handles and the thread share.
struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the thread: a job someone waits for, a first mark, or the last handle dropped.
    wake: Condvar,
    /// How many times the thread was woken from a wait, not by its deadline (tests pin that
    /// marks do not wake it).
    #[cfg(test)]
    wakeups: std::sync::atomic::AtomicU64,
    /// How many waits of the thread ended, by a wake or by their deadline (tests pin that an
    /// idle thread does not wake at all).
    #[cfg(test)]
    naps: std::sync::atomic::AtomicU64,
}

/// Counts a wait of the thread as it ends ([`Shared::naps`]).
#[cfg(test)]
struct Nap<'a>(&'a std::sync::atomic::AtomicU64);

#[cfg(test)]
impl Drop for Nap<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock leaves a queue that is still consistent (pushes and
        // drains are single calls), so a poisoned lock is taken as is.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sending side, shared by every clone of a [`SpoolWriter`]; dropping the last one closes
/// the queue.
struct Sender {
    shared: Arc<Shared>,
}

impl Sender {
    /// Queue `job`, waking the thread only if it needs to know now. Err: the thread has ended.
    fn send(&self, job: Job) -> Result<(), Job> {
        let mut queue = self.shared.lock();
        if queue.stopped {
            return Err(job);
        }
        let wake = queue.waiting && (job.reply.is_some() || !queue.marks_armed);
        queue.jobs.push_back(job);
        if wake {
            // Once is enough until it looks at the queue again.
            queue.waiting = false;
        }
        // Notified after the lock is let go: woken while it is held, the thread would at once
        // sleep again on the lock (one more context switch per commit). It cannot miss this:
        // `waiting` was true, so it is inside its wait.
        drop(queue);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(())
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
    }
}

/// How many finished deliveries a slow listener of [`SpoolWriter::finished`] may fall behind.
const FINISHED_BACKLOG: usize = 1024;

impl SpoolWriter {
    /// Start the writer thread. First applies the journals of relays that died (so their
    /// finished deliveries are not repeated), then starts this process's journal.
    pub fn start(spool: Arc<Spool>, limits: Limits) -> (SpoolWriter, std::thread::JoinHandle<()>) {
        Self::start_paced(spool, limits, COMMIT_PACE, MARK_DELAY, true)
    }

    /// [`SpoolWriter::start`] with another `COMMIT_PACE` and `MARK_DELAY` (tests make them
    /// long, so that what waits for them shows), and without a watch for requests to share if
    /// not `watched` (tests that count the thread's wakes: it then looks every `SHARE_POLL`,
    /// as where inotify is refused, and an inline commit never wakes it).
    fn start_paced(
        spool: Arc<Spool>,
        limits: Limits,
        pace: Duration,
        mark_delay: Duration,
        watched: bool,
    ) -> (SpoolWriter, std::thread::JoinHandle<()>) {
        let dir = spool.path().parent().map(std::path::Path::to_owned);
        let journal = match dir.as_deref().map(Journal::start) {
            Some(Ok((journal, orphans))) => {
                if orphans.marks.is_empty() {
                    // Dead relays' journals with nothing in them (killed before a delivery):
                    // nothing to apply, and kept they would pile up, one a crash.
                    orphans.remove();
                } else {
                    match spool.write(&orphans.marks, limits) {
                        Ok(_) => {
                            // The journal keeps records until it is compacted, so most of them
                            // were committed before the relay stopped (a mark applied again
                            // changes nothing): "marks=438" read as 438 deliveries lost.
                            info!(
                                "applied the delivery journal of a relay that stopped: {} it \
                                 recorded (usually most were already committed; those stay as \
                                 they were)",
                                crate::error::count(
                                    orphans.marks.len(),
                                    "finished delivery",
                                    "finished deliveries"
                                )
                            );
                            orphans.remove();
                        }
                        // The journals stay; the next start tries again.
                        Err(e) => warn!(
                            "cannot apply the delivery journal of a relay that stopped: {}; \
                             what it recorded may be delivered again",
                            crate::error::chain(&e)
                        ),
                    }
                }
                Some(Arc::new(journal))
            }
            Some(Err(e)) => {
                // Its own file in the state directory (helper-122: the spool's file was named).
                warn!(
                    "cannot start the delivery journal (a file of its own) in the state \
                     directory {}: {e}; after a crash, deliveries finished since the last \
                     commit are repeated",
                    dir.as_deref()
                        .map_or_else(String::new, |d| d.display().to_string())
                );
                None
            }
            None => None,
        };
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                marks_armed: false,
                waiting: false,
                unbounded: false,
                holding: false,
                closed: false,
                stopped: false,
                look: true,
            }),
            wake: Condvar::new(),
            #[cfg(test)]
            wakeups: 0.into(),
            #[cfg(test)]
            naps: 0.into(),
        });
        let tell = Arc::new(Tell {
            appended: watch::Sender::new(0),
            handover: Arc::default(),
            told: Mutex::new(0),
        });
        let committer = Arc::new(Committer {
            spool,
            limits,
            tell,
            commits: Mutex::new(0),
            writable: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            journal,
            gate: Mutex::new(Gate {
                last_end: None,
                off_until: None,
                gap: INLINE_GAP,
                slow: INLINE_SLOW,
                said_slow: false,
            }),
            room: std::sync::OnceLock::new(),
            waiting_room: false.into(),
            paused_why: Arc::default(),
            pruned_for_room: Mutex::default(),
        });
        // Made before the thread starts, which then looks once (`Queue::look`): a request made
        // between the spool's open and the watch is found by that look, any later one told.
        let watch = watched.then(|| {
            committer.spool.watch_requests({
                let shared = shared.clone();
                move || {
                    let mut queue = shared.lock();
                    queue.look = true;
                    let wake = std::mem::take(&mut queue.waiting);
                    drop(queue);
                    if wake {
                        shared.wake.notify_one();
                    }
                }
            })
        });
        let thread = WriterThread {
            pace,
            mark_delay,
            shared: shared.clone(),
            committer: committer.clone(),
            watch: watch.flatten(),
        };
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || thread.run())
            .expect("the spool writer thread starts");
        (
            SpoolWriter {
                jobs: Arc::new(Sender { shared }),
                committer,
                finished: tokio::sync::broadcast::channel(FINISHED_BACKLOG).0,
            },
            thread,
        )
    }

    /// Commit `writes` together and wait until they are on disk. Returns, per `Append`, each
    /// event's id, or `None` if the spool was full.
    pub async fn commit(&self, writes: Vec<Write>) -> Result<Appended, SpoolError> {
        self.commit_with(writes, false).await
    }

    /// [`SpoolWriter::commit`] for a caller whose whole pipeline waits on this one commit (a
    /// cluster delivery: one in flight per route cluster-wide): committed as soon as the
    /// commit in progress, if any, is done, without waiting out `COMMIT_PACE`. Whatever else
    /// is queued rides along. Exactly as durable as `commit`: only the wait differs.
    pub async fn commit_now(&self, writes: Vec<Write>) -> Result<Appended, SpoolError> {
        self.commit_with(writes, true).await
    }

    async fn commit_with(&self, writes: Vec<Write>, urgent: bool) -> Result<Appended, SpoolError> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            bytes: appended_bytes(&writes),
            writes,
            reply: Some(reply),
            journaled: 0,
            urgent,
        };
        let marks: Vec<(String, u64)> = writes_finished(&job.writes).collect();
        if let Some(job) = self.inline(job) {
            self.jobs.send(job).map_err(|_| SpoolError::WriterStopped)?;
        }
        // Committed inline, it is answered already.
        let (appended, told) = answer.await.map_err(|_| SpoolError::WriterStopped)??;
        // Tells the routes, here, on the appender's event loop.
        drop(told);
        for mark in marks {
            let _ = self.finished.send(mark);
        }
        Ok(appended)
    }

    /// Commit `job` here, on the caller's thread, if it appends one event (a trickle), the
    /// writer thread is asleep with nothing queued that someone waits for, and the spool takes
    /// it at once ([`Spool::try_write_logged`]): one record in the write-ahead log and its sync,
    /// as the thread would write it, without the two thread hand-offs (the thread's wake and
    /// the answer's), which at everyday rates cost the relay 13 to 18 % of its CPU. Marks
    /// queued ride along, as they would with the thread's commit, and keep their order: none
    /// while the thread holds marks of its own. Otherwise returns the job, for the thread:
    /// - a batch: a burst is relayed faster when the thread's commits overlap the event loop's
    ///   reads and deliveries;
    /// - an append less than [`INLINE_GAP`] after the last commit, part of a burst too;
    /// - anything that would wait, scan or sync to the file;
    /// - anything, for [`INLINE_OFF`] after an inline commit slower than [`INLINE_SLOW`]: a
    ///   slow disk must not stall the caller's event loop on every event.
    fn inline(&self, job: Job) -> Option<Job> {
        let committer = &self.committer;
        // One event: a trickle. A batch of them is a burst, relayed faster by the thread.
        let events: usize = job
            .writes
            .iter()
            .map(|write| match write {
                Write::Append { events, .. } => events.len(),
                Write::Mark { .. } => 0,
                Write::State { .. } => usize::MAX,
            })
            .fold(0, usize::saturating_add);
        if events != 1
            || job.bytes > super::wal::MAX_LOGGED_BYTES
            || !committer.gate().open(Instant::now())
            || committer
                .room
                .get()
                .is_some_and(|room| room.short(job.bytes))
        {
            return Some(job);
        }
        let shared = &self.jobs.shared;
        // Held throughout: the thread takes no job meanwhile, so none overtakes the marks taken
        // along, and what a failed commit gives back is first in line again. A sender on
        // another thread waits for the commit too (the relay sends from its one event loop).
        let mut queue = shared.lock();
        if !queue.waiting
            || queue.holding
            || queue.closed
            || queue.stopped
            || queue.jobs.len() > MAX_RIDE
            || queue.jobs.iter().any(|job| job.reply.is_some())
        {
            return Some(job);
        }
        // Not waited for: the thread holds it for a commit, a checkpoint or a look at sharing.
        let mut commits = match committer.commits.try_lock() {
            Ok(commits) => commits,
            // The count is right after a panic (`Committer::lock`).
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Some(job),
        };
        let mut batch: Vec<Job> = queue.jobs.drain(..).collect();
        batch.push(job);
        let writes: Vec<&Write> = batch.iter().flat_map(|job| &job.writes).collect();
        let started = Instant::now();
        let Some(written) = committer.spool.try_write_logged(&writes, committer.limits) else {
            // Another write is under way, or the log would not take it: all as it was.
            drop(writes);
            let job = batch.pop();
            for taken in batch.into_iter().rev() {
                queue.jobs.push_front(taken);
            }
            return job;
        };
        drop(writes);
        let answered = committer.answer(&mut commits, batch, written);
        drop(commits);
        let mut wake = false;
        if let Err(kept) = answered {
            // Back to the thread, first in its queue, as its own failed commit keeps them.
            for taken in kept.into_iter().rev() {
                queue.jobs.push_front(taken);
            }
            wake = std::mem::take(&mut queue.waiting);
        } else if std::mem::take(&mut queue.unbounded) {
            // The log holds a record now: the thread, asleep until someone needs it, must
            // checkpoint it (once a quiet spell: later inline commits find it with a deadline).
            wake = std::mem::take(&mut queue.waiting);
        }
        drop(queue);
        if wake {
            shared.wake.notify_one();
        }
        let took = started.elapsed();
        let mut gate = committer.gate();
        if took > gate.slow {
            gate.off_until = Some(Instant::now() + INLINE_OFF);
            // On a slow disk this comes back each minute: said once, then only with -v.
            let first = !std::mem::replace(&mut gate.said_slow, true);
            drop(gate);
            let ms = took.as_millis();
            let off = humantime::format_duration(INLINE_OFF);
            if first {
                info!(
                    "a commit to the spool took {ms} ms: for {off} (and after each commit this \
                     slow), commits are left to its writer thread, so the event loop does not \
                     wait for the disk"
                );
            } else {
                tracing::debug!(
                    "a commit to the spool took {ms} ms: left to its writer thread for {off}"
                );
            }
        }
        None
    }

    /// `(route, event id)` of each delivery finished from now on, once it is durable.
    pub fn finished(&self) -> tokio::sync::broadcast::Receiver<(String, u64)> {
        self.finished.subscribe()
    }

    /// Append events and wait until they are on disk. Returns each event's id, or `None` if
    /// the spool was full. `cursor`: the channel's key, to remember the last SSE id by.
    pub async fn append(
        &self,
        channel: &str,
        routes: &[String],
        events: Arc<[Event]>,
        cursor_key: Option<&str>,
    ) -> Result<Vec<Option<u64>>, SpoolError> {
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

    /// Keep `bytes` of the spool's file system free: appends go no further once it is short
    /// ([`Room`]). Set once, before the first append; later calls change nothing.
    pub fn keep_free(&self, bytes: u64) {
        if bytes > 0
            && let Some(dir) = self.committer.spool.path().parent()
        {
            let _ = self.committer.room.set(Room::new(dir.to_owned(), bytes));
        }
    }

    /// Why appends wait, while they do: the disk short of room ([`Room`]) or a failed commit.
    pub fn why_paused(&self) -> Arc<Mutex<Option<String>>> {
        self.committer.paused_why.clone()
    }

    /// Whether the last commit succeeded.
    pub fn writable(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.committer.writable.clone()
    }

    /// A receiver that changes after every commit that appended events.
    pub fn appended(&self) -> watch::Receiver<u64> {
        self.committer.tell.appended.subscribe()
    }

    /// What this writer's latest commits queued, for routes to take without reading it back.
    /// Up to date whenever [`SpoolWriter::appended`] has changed.
    pub fn handover(&self) -> Arc<Handover> {
        self.committer.tell.handover.clone()
    }

    /// Record a finished delivery (a `Write::Mark` that delivered or gave up): in the journal
    /// now, so that a crash of the process from here on does not repeat it, and in the spool
    /// with the next commit (within `MARK_DELAY`). Call it before starting the next delivery
    /// of the same route. An error means the journal could not be written (disk full): the
    /// mark was not sent, and the caller should try again rather than go on.
    pub fn finish(&self, mark: Write) -> Result<(), SpoolError> {
        // Only for listeners (a cluster's consumers): a relay alone has none, and made a copy
        // of the route's name per delivery for nobody.
        let done: Vec<(String, u64)> = if self.finished.receiver_count() > 0 {
            writes_finished(std::slice::from_ref(&mark)).collect()
        } else {
            Vec::new()
        };
        let Some(journal) = &self.committer.journal else {
            // Durable only once committed: listeners find it in the spool then.
            self.send(vec![mark], 0);
            return Ok(());
        };
        journal
            .record(&mark, || ())
            .map_err(|source| SpoolError::Journal {
                path: journal.path().to_owned(),
                source,
            })?;
        // Sent under no lock: the writer counts journaled marks, not their order.
        self.send(vec![mark], 1);
        for mark in done {
            let _ = self.finished.send(mark);
        }
        Ok(())
    }

    /// Record attempts that did not finish a delivery (and empty `marks`) without waiting:
    /// they are committed with the next commit (an append), or within `MARK_DELAY`.
    pub fn flush(&self, marks: &mut Vec<Write>) {
        if !marks.is_empty() {
            self.send(std::mem::take(marks), 0);
        }
    }

    fn send(&self, writes: Vec<Write>, journaled: usize) {
        let job = Job {
            bytes: appended_bytes(&writes),
            writes,
            reply: None,
            journaled,
            urgent: false,
        };
        if self.jobs.send(job).is_err() {
            error!("the spool writer has stopped: attempts were not recorded");
        }
    }
}

/// The deliveries among `writes` that finished (delivered or given up on).
fn writes_finished(writes: &[Write]) -> impl Iterator<Item = (String, u64)> + '_ {
    writes.iter().filter_map(|write| match write {
        Write::Mark {
            route,
            event,
            outcome: super::Outcome::Delivered { .. } | super::Outcome::Dead { .. },
            ..
        } => Some((route.clone(), *event)),
        _ => None,
    })
}

/// The thread that owns every write to the spool (redb is blocking, and one writer at a time
/// is what lets it group commits).
struct WriterThread {
    /// `COMMIT_PACE` (another in tests).
    pace: Duration,
    /// `MARK_DELAY` (another in tests).
    mark_delay: Duration,
    /// The queue it takes jobs from.
    shared: Arc<Shared>,
    /// What commits its batches (and, while the thread is idle, an appender's:
    /// [`SpoolWriter::inline`]).
    committer: Arc<Committer>,
    /// Tells of requests to share the spool as they come, so that idle, holding the spool
    /// alone, the thread sleeps until someone needs it instead of looking every `SHARE_POLL`.
    /// `None` (a command's spool, or inotify refused): it looks.
    watch: Option<super::share::Watch>,
}

/// What a commit needs, shared by the writer thread and the appenders that commit inline.
struct Committer {
    spool: Arc<Spool>,
    limits: Limits,
    /// Told of each commit that appended events, by an appender of it, or by the committer if
    /// none of them is still waiting for its answer.
    tell: Arc<Tell>,
    /// Commits so far, to number them for [`Tell`]. Its lock is held across each commit (and
    /// the thread's checkpoints and looks at sharing), so commits are numbered in the order
    /// they happen and never run two at a time.
    commits: Mutex<u64>,
    /// The last commit's outcome, for `/healthz`.
    writable: Arc<std::sync::atomic::AtomicBool>,
    /// Told how many journaled marks each commit made durable.
    journal: Option<Arc<Journal>>,
    /// When appenders may commit inline ([`SpoolWriter::inline`]).
    gate: Mutex<Gate>,
    /// The disk room appends must leave (`--keep-free`), once the relay sets it
    /// ([`SpoolWriter::keep_free`]).
    room: std::sync::OnceLock<Room>,
    /// Whether appends wait for room ([`Committer::make_room`]): the spool then does not take
    /// writes as far as `/healthz` is concerned, though marks still commit.
    waiting_room: std::sync::atomic::AtomicBool,
    /// Why appends wait, while they do (for `/healthz`): [`Committer::make_room`]'s answer, or
    /// the last commit's error.
    paused_why: Arc<Mutex<Option<String>>>,
    /// Delivered events pruned early for room, said at most once a minute (near the limit,
    /// every append prunes one).
    /// (Said at most once a minute.)
    pruned_for_room: Mutex<crate::clock::Tally>,
}

/// When appenders may commit inline: only a trickle of small appends on a fast disk, where the
/// thread's two hand-offs cost more CPU than the commit, and nothing overlaps it anyway.
struct Gate {
    /// When the last commit ended (the thread's or an inline one): an append sooner than `gap`
    /// after it is part of a burst, which the thread relays faster, its commits overlapping the
    /// event loop's reads and deliveries.
    last_end: Option<Instant>,
    /// Until when appenders do not commit inline: set after an inline commit slower than
    /// `slow`, so a slow disk stalls the event loop once, not on every event.
    off_until: Option<Instant>,
    /// [`INLINE_GAP`] (another in tests).
    gap: Duration,
    /// [`INLINE_SLOW`] (another in tests).
    slow: Duration,
    /// Whether a slow inline commit was said already (at INFO; later ones at DEBUG).
    said_slow: bool,
}

impl WriterThread {
    fn run(self) {
        // Whatever way this ends (a panic too), senders learn that nothing more is written.
        struct Stopped<'a>(&'a Shared);
        impl Drop for Stopped<'_> {
            fn drop(&mut self) {
                let mut queue = self.0.lock();
                queue.stopped = true;
                queue.marks_armed = false;
            }
        }
        let _stopped = Stopped(&self.shared);
        let mut batch: Vec<Job> = Vec::new();
        // When the batch's unawaited marks are due: `mark_delay` after the oldest arrived, or
        // RETRY_DELAY after a commit of them failed.
        let mut marks_due: Option<Instant> = None;
        // Until when to let writes gather before the next commit (COMMIT_PACE).
        let mut gather_until: Option<Instant> = None;
        let mut queue = self.shared.lock();
        loop {
            // Take what is queued; only then decide, under the same lock the senders take, so a
            // sender that did not wake the thread is sure its job is seen before it sleeps.
            // Up to MAX_BATCH writes and MAX_BATCH_BYTES of appended events (the last job taken
            // may go past the bytes: one event larger than the bound is committed alone).
            let mut bytes: usize = batch.iter().map(|job| job.bytes).sum();
            while !full(batch.len(), bytes) {
                let Some(job) = queue.jobs.pop_front() else {
                    break;
                };
                bytes += job.bytes;
                batch.push(job);
            }
            if marks_due.is_none() && batch.iter().any(|job| job.reply.is_none()) {
                marks_due = Some(Instant::now() + self.mark_delay);
            }
            if batch.is_empty() {
                if queue.closed {
                    break;
                }
                // A deadline with no marks yet was set for those of the deliveries of the last
                // append; once it passes with none come, sleep until someone needs the thread.
                if marks_due.is_some_and(|due| due <= Instant::now()) {
                    marks_due = None;
                }
                queue.marks_armed = marks_due.is_some();
                // Idle: look for another process asking to share the file (with the queue's
                // lock let go: sharing reopens the file) when told to, and every SHARE_POLL
                // unless a watch tells (`must_poll`).
                let poll = self.must_poll().then(|| Instant::now() + super::SHARE_POLL);
                queue.holding = false;
                let mut until_told = false;
                if !queue.look {
                    let until = match (marks_due, poll) {
                        (Some(due), Some(poll)) => Some(due.min(poll)),
                        (due, poll) => due.or(poll),
                    };
                    until_told = until.is_none();
                    queue = self.sleep(queue, until);
                }
                let look = std::mem::take(&mut queue.look);
                if until_told && !look && queue.jobs.is_empty() {
                    // Woken by an inline commit (or spuriously): its record's checkpoint is
                    // due a second from now, not now (`must_poll` sets that deadline); a
                    // checkpoint per inline commit would undo what the log saves.
                    continue;
                }
                // Also with jobs come meanwhile (marks, which do not wake it), when the look is
                // due: a process waiting for an answer must get it within a SHARE_POLL.
                if queue.jobs.is_empty() || look || poll.is_some_and(|poll| Instant::now() >= poll)
                {
                    // Idle, with no deliveries' marks awaited either (they follow an append
                    // within MARK_DELAY): what the write-ahead log holds goes into the file, one
                    // synced commit per quiet spell, on a wake the thread makes anyway.
                    let idle = queue.jobs.is_empty() && marks_due.is_none();
                    drop(queue);
                    if idle {
                        self.checkpoint();
                    }
                    self.share_poll(look, &mut batch, &mut marks_due, &mut gather_until);
                    queue = self.shared.lock();
                }
                continue;
            }
            queue.marks_armed = marks_due.is_some();
            // The batch is due at once if someone cannot wait, it is full, or the writer is
            // stopping; if someone waits, once the pace allows; marks alone at `marks_due`.
            let awaited = batch.iter().any(|job| job.reply.is_some());
            let urgent = batch.iter().any(|job| job.urgent);
            let due = if urgent || full(batch.len(), bytes) || queue.closed {
                None
            } else if awaited {
                gather_until
            } else {
                marks_due
            };
            if let Some(due) = due.filter(|due| Instant::now() < *due) {
                // Marks held for their deadline still let another process that asks to share
                // the file in within a SHARE_POLL (committed first: `share_poll`).
                let poll = Instant::now() + super::SHARE_POLL;
                queue.holding = true;
                if !queue.look {
                    queue = self.sleep(queue, Some(due.min(poll)));
                }
                let look = std::mem::take(&mut queue.look);
                if look || Instant::now() >= poll {
                    drop(queue);
                    self.share_poll(look, &mut batch, &mut marks_due, &mut gather_until);
                    queue = self.shared.lock();
                }
                continue;
            }
            let stopping = queue.closed && queue.jobs.is_empty();
            // Taken with the lock held anyway; one told during the commit waits for the next.
            let look = std::mem::take(&mut queue.look);
            drop(queue);
            let started = Instant::now();
            match self.commit(std::mem::take(&mut batch)) {
                Ok(events) => {
                    // Appended events are delivered next, and each delivery's mark comes here:
                    // with a deadline already set for them, they wait for the next append (or
                    // the deadline) without waking the thread one by one.
                    marks_due = (events > 0).then(|| Instant::now() + self.mark_delay);
                    gather_until = (events > 1).then(|| started + self.pace);
                }
                Err(_) if stopping => {
                    error!(
                        "stopping with finished deliveries not committed to the spool; \
                         they are in the delivery journal and applied on the next start"
                    );
                    queue = self.shared.lock();
                    break;
                }
                Err(kept) => {
                    marks_due = (!kept.is_empty()).then(|| Instant::now() + RETRY_DELAY);
                    gather_until = None;
                    batch = kept;
                }
            }
            // Between commits: at once if the watch told of a request (a command is waiting),
            // else at most once per SHARE_POLL (busy, it is awake anyway).
            self.share_poll(look, &mut batch, &mut marks_due, &mut gather_until);
            queue = self.shared.lock();
        }
        drop(queue);
        self.checkpoint();
        if let Some(journal) = &self.committer.journal {
            journal.close();
        }
    }

    /// Whether the idle thread must wake every `SHARE_POLL`: to look for requests to share the
    /// spool, unless its watch tells of them and the spool is open alone (shared, it looks
    /// whether those it shares with are done, which no watch tells: one killed leaves its
    /// request behind); and to checkpoint what the write-ahead log holds, on the first idle
    /// wake. An idle relay holding its spool alone, checkpointed, so sleeps until woken.
    /// Called with the queue's lock held, so it does not wait for the log's: a write holding it
    /// (a prune's scan) would stall every sender with it; a log busy counts as not empty.
    fn must_poll(&self) -> bool {
        let spool = &self.committer.spool;
        self.watch.as_ref().is_none_or(|watch| !watch.live())
            || !spool.is_alone()
            || spool.logged_now().is_none_or(|records| records > 0)
    }

    /// [`Spool::checkpoint`]; a failure is said like a failed commit's (the log keeps what it
    /// holds, and the next start applies it).
    fn checkpoint(&self) {
        let committer = &self.committer;
        let _commits = committer.lock();
        match committer.spool.checkpoint() {
            // As after a good commit: `/healthz` must not stay 503 after an idle spell's
            // failed checkpoint (the spool says "takes writes again").
            Ok(true) => {
                committer.wrote(Ok(()));
            }
            // Nothing to commit: says nothing about whether writes work.
            Ok(false) => {}
            Err(e) => {
                if committer.wrote(Err(&e)) && committer.spool.say_outage() {
                    error!(
                        "cannot write to the spool: {}; what its write-ahead log holds stays \
                         there, and new events wait once it is full",
                        crate::error::chain(&e)
                    );
                }
            }
        }
    }

    /// [`Spool::share_poll`], with the queue's lock let go. If it is about to share the file
    /// with a process that asked, what is queued (with `batch`, what the thread holds: marks
    /// waiting for their deadline, or kept after a failed commit) is committed first, in one
    /// commit of at most a batch's size, so that the process finds every delivery finished
    /// before it asked recorded as done. Only commits sooner than otherwise: no write waits
    /// longer, and the journal keeps each mark until its commit as before.
    fn share_poll(
        &self,
        now: bool,
        batch: &mut Vec<Job>,
        marks_due: &mut Option<Instant>,
        gather_until: &mut Option<Instant>,
    ) {
        // Held throughout: no appender commits inline while the file may change hands.
        let mut commits = self.committer.lock();
        self.committer.spool.share_poll(now, || {
            {
                let mut queue = self.shared.lock();
                let mut bytes: usize = batch.iter().map(|job| job.bytes).sum();
                while !full(batch.len(), bytes) {
                    let Some(job) = queue.jobs.pop_front() else {
                        break;
                    };
                    bytes += job.bytes;
                    batch.push(job);
                }
            }
            if batch.is_empty() {
                return;
            }
            let started = Instant::now();
            match self.committer.commit(&mut commits, std::mem::take(batch)) {
                Ok(events) => {
                    // As after any commit (`run`).
                    *marks_due = (events > 0).then(|| Instant::now() + self.mark_delay);
                    *gather_until = (events > 1).then(|| started + self.pace);
                }
                Err(kept) => {
                    *marks_due = (!kept.is_empty()).then(|| Instant::now() + RETRY_DELAY);
                    *gather_until = None;
                    *batch = kept;
                }
            }
        });
    }

    /// Wait for a job that needs the thread (or `until`), with `queue` locked; the lock is
    /// held again on return.
    fn sleep<'a>(
        &'a self,
        mut queue: MutexGuard<'a, Queue>,
        until: Option<Instant>,
    ) -> MutexGuard<'a, Queue> {
        queue.waiting = true;
        queue.unbounded = until.is_none();
        #[cfg(test)]
        let _nap = Nap(&self.shared.naps);
        let mut queue = match until {
            None => self
                .shared
                .wake
                .wait(queue)
                .unwrap_or_else(|e| e.into_inner()),
            Some(until) => {
                let left = until.saturating_duration_since(Instant::now());
                let (queue, waited) = self
                    .shared
                    .wake
                    .wait_timeout(queue, left)
                    .unwrap_or_else(|e| e.into_inner());
                if waited.timed_out() {
                    let mut queue = queue;
                    queue.waiting = false;
                    return queue;
                }
                queue
            }
        };
        queue.waiting = false;
        queue.unbounded = false;
        #[cfg(test)]
        self.shared.wakeups.fetch_add(1, Ordering::Relaxed);
        queue
    }

    /// [`Committer::commit`], waiting for a commit in progress (an appender's inline).
    fn commit(&self, batch: Vec<Job>) -> Result<usize, Vec<Job>> {
        let mut commits = self.committer.lock();
        self.committer.commit(&mut commits, batch)
    }
}

impl Gate {
    /// Whether an append at `now` may commit inline.
    fn open(&self, now: Instant) -> bool {
        self.off_until.is_none_or(|until| now >= until)
            && self.last_end.is_none_or(|end| now >= end + self.gap)
    }
}

impl Committer {
    fn gate(&self) -> MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> MutexGuard<'_, u64> {
        // A panic in a commit is caught in the spool (it fails the write); the count is
        // still right.
        self.commits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Apply `batch` in one transaction and answer each job, with `commits` (its lock) held.
    /// Returns how many events it appended, or, if it failed, the jobs nobody waits for
    /// (marks), to try again.
    fn commit(&self, commits: &mut u64, mut batch: Vec<Job>) -> Result<usize, Vec<Job>> {
        if let Some(room) = self.room.get() {
            batch = self.make_room(room, batch);
            if batch.is_empty() {
                return Ok(0);
            }
        }
        // The jobs keep their writes, in case they must be kept for another try.
        let result = self
            .spool
            .write_logged(batch.iter().flat_map(|job| &job.writes), self.limits);
        self.answer(commits, batch, result)
    }

    /// `batch`, less the jobs that append while the disk is short of room and the spool
    /// holds all it may ([`Room::admit`]): those are answered that they must wait, and their
    /// appenders try again (the intake's pause). The rest (marks, states) commits: recording
    /// deliveries is what lets pruning make room.
    fn make_room(&self, room: &Room, batch: Vec<Job>) -> Vec<Job> {
        let appends = |job: &Job| {
            job.writes
                .iter()
                .any(|write| matches!(write, Write::Append { .. }))
        };
        let bytes: usize = batch
            .iter()
            .filter(|job| appends(job))
            .map(|job| job.bytes)
            .sum();
        if bytes == 0 {
            return batch;
        }
        let admitted = room.admit(
            bytes,
            || self.spool.stored_bytes(),
            |target| {
                let pruned = self.spool.prune_early(target)?;
                let mut tally = self
                    .pruned_for_room
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if let Some(pruned) = tally.add(pruned, Instant::now()) {
                    info!(
                        pruned,
                        "disk short of room: pruned delivered events early (said at most once a \
                         minute)"
                    );
                }
                Ok(pruned)
            },
            || match self.spool.compact() {
                Ok(Some((before, after))) => {
                    info!(
                        before = %super::room::mib(before),
                        after = %super::room::mib(after),
                        "disk short of room: compacted the spool's file to give its free pages \
                         back to the disk"
                    );
                    true
                }
                Ok(None) => false,
                Err(e) => {
                    warn!(
                        "cannot compact the spool's file: {}",
                        crate::error::chain(&e)
                    );
                    false
                }
            },
        );
        self.waiting_room
            .store(admitted.is_err(), Ordering::Relaxed);
        let Err(no_room) = admitted else {
            return batch;
        };
        self.writable.store(false, Ordering::Relaxed);
        self.say_paused(Some(no_room.to_string()));
        let (waiting, rest): (Vec<Job>, Vec<Job>) = batch.into_iter().partition(appends);
        for job in waiting {
            if let Some(reply) = job.reply {
                let _ = reply.send(Err(SpoolError::NoRoom(no_room.clone())));
            }
        }
        rest
    }

    /// A commit (or checkpoint) ended with `result`: whether the spool takes writes, and why
    /// not, for `/healthz`. Returns whether it took them before.
    fn wrote(&self, result: Result<(), &SpoolError>) -> bool {
        // A commit of marks alone may succeed while appends fail (a disk too full for
        // events): the spool still refuses writes then, as far as appenders are concerned.
        let writable = result.is_ok()
            && !self.waiting_room.load(Ordering::Relaxed)
            && self.spool.takes_writes();
        let was_writable = self.writable.swap(writable, Ordering::Relaxed);
        match result {
            Err(e) => self.say_paused(Some(cannot_write(e))),
            Ok(()) if writable && !was_writable => self.say_paused(None),
            Ok(()) => {}
        }
        was_writable
    }

    /// Set why appends wait (`None`: they do not), for `/healthz`.
    fn say_paused(&self, why: Option<String>) {
        let paused = why.is_some();
        // A plain value: nothing a panic could leave half-changed.
        let was = std::mem::replace(
            &mut *self.paused_why.lock().unwrap_or_else(|e| e.into_inner()),
            why,
        );
        if was.is_some() != paused {
            metrics::gauge!("smee_relay_intake_paused").set(if paused { 1.0 } else { 0.0 });
        }
    }

    /// Answer each job of `batch` with `result`, its write's outcome, as [`Committer::commit`]
    /// returns.
    fn answer(
        &self,
        commits: &mut u64,
        batch: Vec<Job>,
        result: Result<super::WriteReport, SpoolError>,
    ) -> Result<usize, Vec<Job>> {
        self.gate().last_end = Some(Instant::now());
        let was_writable = self.wrote(result.as_ref().map(|_| ()));
        match result {
            Ok(report) => {
                if report.pruned > 0 {
                    warn!(
                        pruned = report.pruned,
                        "spool full: pruned delivered events early"
                    );
                }
                let events: usize = report.appended.iter().map(Vec::len).sum();
                *commits += 1;
                let told = (events > 0).then(|| (*commits, report.enqueued.map(Arc::new)));
                // Whether an appender took the answer, and with it the telling.
                let mut telling = false;
                let mut appended = report.appended.into_iter();
                let mut journaled = 0;
                for job in batch {
                    journaled += job.journaled;
                    let appends = job
                        .writes
                        .iter()
                        .filter(|w| matches!(w, Write::Append { .. }))
                        .count();
                    let ids: Vec<_> = appended.by_ref().take(appends).collect();
                    if let Some(reply) = job.reply {
                        let told = told.as_ref().map(|(commit, enqueued)| Told {
                            tell: self.tell.clone(),
                            commit: *commit,
                            enqueued: enqueued.clone(),
                        });
                        telling |= reply.send(Ok((ids, told))).is_ok();
                    }
                }
                if let (Some((commit, enqueued)), false) = (told, telling) {
                    self.tell.tell(commit, enqueued);
                }
                if let Some(journal) = &self.journal {
                    journal.committed(journaled);
                }
                Ok(events)
            }
            Err(e) => {
                // Once per outage, not once per try, and once a minute at most: the spool tells
                // when it takes writes again.
                if was_writable && self.spool.say_outage() {
                    error!(
                        "{}; new events wait (intake paused) and /healthz answers 503 until it \
                         takes writes again",
                        cannot_write(&e)
                    );
                }
                let e = Arc::new(e);
                let mut kept = Vec::new();
                for job in batch {
                    match job.reply {
                        Some(reply) => {
                            let _ = reply.send(Err(SpoolError::Commit(e.clone())));
                        }
                        None => kept.push(job),
                    }
                }
                Err(kept)
            }
        }
    }
}

/// Why the spool refused a commit, and on a full disk what to do.
fn cannot_write(e: &SpoolError) -> String {
    let full = match crate::error::disk_full(e) {
        true => {
            "; the disk holding the spool is full: free space there (the relay resumes by \
             itself, and nothing it received is lost)"
        }
        false => "",
    };
    format!(
        "cannot write to the spool: {}{full}",
        crate::error::chain(e)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::Counters;
    use crate::spool::backend::DiskFull;
    use crate::spool::{Outcome, intake};
    use std::sync::atomic::AtomicBool;

    /// A writer on `spool` with room for anything, `pace` between commits and `mark_delay` for
    /// marks alone (tests make them long, so that what waits for them shows). Its thread makes
    /// every commit: inline commits are off until a test turns them on ([`gate`]). Whether a
    /// lone append is committed inline hangs on the time since the last commit, which a loaded
    /// machine stretches; the thread's tests would see one or the other.
    fn writer_on(
        spool: &Arc<Spool>,
        pace: Duration,
        mark_delay: Duration,
    ) -> (SpoolWriter, std::thread::JoinHandle<()>) {
        writer_watched(spool, pace, mark_delay, false)
    }

    /// Append `batch(0)`, `batch(1)`, ... to route `r` until the spool answers that they must
    /// wait for room; returns how many were stored, and that answer.
    async fn append_until_no_room(
        writer: &SpoolWriter,
        batch: impl Fn(u64) -> Arc<[Event]>,
    ) -> (u64, SpoolError) {
        let routes = ["r".to_string()];
        for n in 0..10_000 {
            match writer.append("c", &routes, batch(n), None).await {
                Ok(ids) => assert!(ids.iter().all(Option::is_some), "refused, not waiting"),
                Err(e) => {
                    assert!(matches!(e, SpoolError::NoRoom(_)), "{e}");
                    return (n, e);
                }
            }
        }
        panic!("the disk never ran short");
    }

    /// Near `--keep-free`, each append pruned a delivered event, and each said so at `INFO`: a
    /// line an event. Now at most one a minute, with the count since.
    #[test]
    fn regression_pruning_for_room_was_said_at_every_append() {
        let mut tally = crate::clock::Tally::default();
        let start = Instant::now();
        assert_eq!(tally.add(1, start), Some(1));
        for n in 1..60 {
            assert_eq!(tally.add(1, start + Duration::from_millis(900 * n)), None);
        }
        assert_eq!(tally.add(0, start + Duration::from_secs(61)), Some(59));
        assert_eq!(
            tally.add(0, start + Duration::from_secs(200)),
            None,
            "nothing to say"
        );
    }

    /// A writer on a spool on a test's disk, keeping some of it free ([`on_a_small_disk`]).
    struct SmallDisk {
        /// Removed when the test ends.
        _dir: tempfile::TempDir,
        spool: Arc<Spool>,
        writer: SpoolWriter,
        thread: std::thread::JoinHandle<()>,
        /// What the disk has free.
        free: Arc<dyn Fn() -> u64 + Send + Sync>,
    }

    /// A writer on a spool on a test's disk of `size` bytes, keeping `keep_free` of it free.
    fn on_a_small_disk(size: u64, keep_free: u64) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let (factory, free) = DiskFull::sized(size);
        let spool = Arc::new(Spool::open_with(dir.path(), factory).unwrap());
        let (writer, thread) = writer_on(&spool, COMMIT_PACE, Duration::ZERO);
        let _ = writer
            .committer
            .room
            .set(Room::fake(free.clone(), keep_free));
        SmallDisk {
            _dir: dir,
            spool,
            writer,
            thread,
            free,
        }
    }

    /// [`writer_on`], with a watch for requests to share if `watched`, as a relay's is.
    fn writer_watched(
        spool: &Arc<Spool>,
        pace: Duration,
        mark_delay: Duration,
        watched: bool,
    ) -> (SpoolWriter, std::thread::JoinHandle<()>) {
        let (writer, thread) = SpoolWriter::start_paced(
            spool.clone(),
            Limits { max_bytes: 1 << 30 },
            pace,
            mark_delay,
            watched,
        );
        writer.committer.gate().off_until = Some(Instant::now() + Duration::from_secs(86_400));
        (writer, thread)
    }

    /// Regression (an adversary's run): a relay killed before it finished a delivery left its
    /// empty journal, and no later start removed it: one more file in the state directory for
    /// each crash, for good.
    #[test]
    fn regression_empty_journals_of_dead_relays_piled_up() {
        let dir = tempfile::tempdir().unwrap();
        let left: Vec<_> = (0..3)
            .map(|_| Journal::start(dir.path()).unwrap().0.path().to_owned())
            .collect();
        assert!(left.iter().all(|path| path.exists()));
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let (writer, thread) = SpoolWriter::start(spool, Limits { max_bytes: 1 << 30 });
        assert!(left.iter().all(|path| !path.exists()), "{left:?}");
        drop(writer);
        thread.join().unwrap();
    }

    /// An appender dropped after its commit, before it took the answer (a reconciliation
    /// stopped by a reload), took the telling with it: idle routes were not woken, and on a
    /// spool held alone nothing else wakes them (the pipeline's snapshot waited for the next
    /// append). The answer now tells when it is dropped.
    #[tokio::test]
    async fn regression_an_appender_dropped_after_its_commit_did_not_tell_the_routes() {
        struct Flag(AtomicBool);
        impl std::task::Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let (writer, thread) = writer_on(&spool, COMMIT_PACE, MARK_DELAY);
        // As on CI's run that failed: the thread already asleep when the append comes.
        until("the writer idle", || asleep(&writer, false)).await;
        let mut appended = writer.appended();
        let routes = ["r".to_string()];
        // Two events: never committed inline, by the poll itself (`SpoolWriter::inline`),
        // whatever the gate says; this is about the thread's answer.
        let mut append =
            Box::pin(writer.append("c", &routes, vec![event(1), event(2)].into(), None));
        // Sent, then answered (the answer wakes the appender), but never taken.
        let answered = Arc::new(Flag(AtomicBool::new(false)));
        let waker = std::task::Waker::from(answered.clone());
        let polled = append
            .as_mut()
            .poll(&mut std::task::Context::from_waker(&waker));
        assert!(polled.is_pending());
        let deadline = Instant::now() + Duration::from_secs(20);
        while !answered.0.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "no answer");
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(append);
        assert!(
            appended.has_changed().unwrap(),
            "the routes were not told of an append whose appender went away"
        );
        assert_eq!(spool.pending("r", 0, 10).unwrap().len(), 2);
        appended.borrow_and_update();
        drop(writer);
        thread.join().unwrap();
    }

    fn event(n: u64) -> Event {
        Event {
            sse_id: Some(n.to_string()),
            timestamp_ms: None,
            headers: vec![],
            query: vec![],
            body: format!("{{\"n\":{n}}}").into(),
        }
    }

    /// A lone append goes through the write-ahead log; once the writer is idle (no marks
    /// awaited either), what the log holds is committed to the file, and the log starts over.
    #[tokio::test]
    async fn an_idle_writer_commits_the_log_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let (writer, thread) = writer_on(&spool, COMMIT_PACE, Duration::from_millis(50));
        let routes = ["r".to_string()];
        writer
            .append("c", &routes, vec![event(1)].into(), None)
            .await
            .unwrap();
        // Checked before the first idle look (a second away) could have come.
        assert_eq!(spool.logged(), 1, "the append went through the log");
        until("the idle checkpoint", || spool.logged() == 0).await;
        writer
            .append("c", &routes, vec![event(2)].into(), None)
            .await
            .unwrap();
        assert_eq!(spool.logged(), 1);
        drop(writer);
        thread.join().unwrap();
        assert_eq!(spool.logged(), 0, "a stop commits the log too");
    }

    /// Wait for `done`, up to a deadline.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn bodies(spool: &Spool) -> Vec<String> {
        spool
            .pending("r", 0, usize::MAX)
            .unwrap()
            .iter()
            .map(|q| String::from_utf8_lossy(&q.event.event.body).into_owned())
            .collect()
    }

    /// Regression (helper-137): with the disk 0.7 MiB above `--keep-free`, a burst of 20 KB
    /// events read as one batch (1 MiB, which may grow the file by 1.3 MiB) waited for good:
    /// the batch was refused whole, and the spool, holding nothing then, could hold nothing
    /// more while the room was short, though 8 of the events would have gone. The intake now
    /// tries fewer at once, down to one.
    #[tokio::test]
    async fn regression_a_batch_larger_than_the_room_left_stalled_the_intake() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let (writer, thread) = writer_on(&spool, COMMIT_PACE, MARK_DELAY);
        let keep_free: u64 = 64 << 20;
        let _ = writer.committer.room.set(Room::fake(
            Arc::new(move || keep_free + (700 << 10)),
            keep_free,
        ));
        let (tx, rx) = crate::source::queue::channel(4 << 20);
        let sent: Vec<String> = (0..100).map(|n| format!("{n:020000}")).collect();
        for (n, body) in sent.iter().enumerate() {
            let event = Event {
                body: body.clone().into(),
                ..event(n as u64)
            };
            tx.send(event).await.unwrap();
        }
        let intake = tokio::spawn(intake::intake(
            rx,
            writer.clone(),
            "c".into(),
            None,
            watch::channel(vec!["r".to_string()]).1,
            Arc::new(Counters::default()),
        ));
        // Read a page at a time: a read stops at READ_BYTES.
        let all_bodies = || {
            let mut all = Vec::new();
            let mut after = 0;
            while let Some(last) = spool.pending("r", after, usize::MAX).ok().and_then(|page| {
                let last = page.last()?.seq;
                all.extend(
                    (page.iter())
                        .map(|q| String::from_utf8_lossy(&q.event.event.body).into_owned()),
                );
                Some(last)
            }) {
                after = last;
            }
            all
        };
        until("the 100 events stored", || all_bodies().len() == 100).await;
        assert!(all_bodies() == sent, "stored in the order received");
        drop(tx);
        intake.await.unwrap();
        drop(writer);
        thread.join().unwrap();
    }

    #[tokio::test]
    async fn disk_full_pauses_intake_keeps_what_was_stored_and_resumes_when_space_returns() {
        let dir = tempfile::tempdir().unwrap();
        let (factory, full) = DiskFull::factory();
        let spool = Arc::new(Spool::open_with(dir.path(), factory).unwrap());
        let (writer, thread) = writer_on(&spool, COMMIT_PACE, MARK_DELAY);
        let (tx, rx) = crate::source::queue::channel(1 << 20);
        let intake = tokio::spawn(intake::intake(
            rx,
            writer.clone(),
            "c".into(),
            None,
            watch::channel(vec!["r".to_string()]).1,
            Arc::new(Counters::default()),
        ));
        for n in 0..3 {
            tx.send(event(n)).await.unwrap();
        }
        until("3 events stored", || bodies(&spool).len() == 3).await;
        let first = spool.pending("r", 0, 1).unwrap().remove(0);

        // The disk fills up: the next events are not stored, and the spool says why.
        full.store(true, Ordering::SeqCst);
        tx.send(event(3)).await.unwrap();
        let writable = writer.writable();
        until("the spool reported not writable", || {
            !writable.load(Ordering::Relaxed)
        })
        .await;
        let why = spool.write_error().expect("a reason");
        assert!(why.contains("No space left on device"), "{why}");
        let health = crate::service::health::Health {
            channels: Default::default(),
            spool_writable: writer.writable(),
            ..Default::default()
        };
        assert!(!health.problems().is_empty(), "/healthz turns 503");
        // A delivery that finishes meanwhile is kept (journal) and committed later.
        writer.finish(delivered(&first)).unwrap();

        // Space returns: without a restart, what was stored is all there, the held event is
        // stored and the mark committed. (Meanwhile reads fail too: redb needs room to open
        // the file again.)
        full.store(false, Ordering::SeqCst);
        until("the held event stored", || {
            spool
                .pending("r", 0, usize::MAX)
                .is_ok_and(|_| bodies(&spool) == [r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#])
        })
        .await;
        until("writable again", || writable.load(Ordering::Relaxed)).await;
        assert_eq!(spool.write_error(), None);
        tx.send(event(4)).await.unwrap();
        until("new events flow", || bodies(&spool).len() == 4).await;

        // Shutting down while the disk is full ends within a bound, saying what is lost.
        full.store(true, Ordering::SeqCst);
        tx.send(event(5)).await.unwrap();
        until("the spool reported not writable", || {
            !writable.load(Ordering::Relaxed)
        })
        .await;
        drop(tx);
        tokio::time::timeout(GIVE_UP_BOUND, intake)
            .await
            .expect("the intake stops within its bound")
            .unwrap();
        drop(writer);
        thread.join().unwrap();
    }

    #[tokio::test]
    async fn commit_now_is_not_held_behind_the_pace_and_is_as_durable_as_commit() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        // A pace far longer than the deadlines below: whatever waits for it shows.
        let (writer, thread) = writer_on(&spool, Duration::from_secs(60), MARK_DELAY);
        let append = |n: u64| Write::Append {
            channel: "c".into(),
            routes: vec!["r".into()],
            events: Arc::from(vec![event(n)]),
            cursor: None,
        };
        // A commit of several events: the next awaited commit waits out the pace.
        writer
            .commit(vec![append(0), append(1)])
            .await
            .expect("committed");
        let mut paced = Box::pin(writer.commit(vec![append(2)]));
        // Polled once: its job is with the writer (which holds it for the pace).
        assert!(futures::poll!(&mut paced).is_pending());
        // The one that cannot wait goes at once, and takes what waits along.
        let ids = tokio::time::timeout(Duration::from_secs(20), writer.commit_now(vec![append(3)]))
            .await
            .expect("commit_now does not wait out the pace")
            .expect("committed");
        assert!(ids[0][0].is_some(), "{ids:?}");
        tokio::time::timeout(Duration::from_secs(20), paced)
            .await
            .expect("the waiting commit rode along")
            .expect("committed");
        // On disk, in order, before it returned: a fresh read of the file has it all.
        assert_eq!(
            bodies(&spool),
            [r#"{"n":0}"#, r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#]
        );
        drop(writer);
        thread.join().unwrap();
    }

    /// Whether the writer thread sleeps with its marks' deadline set (or with nothing to do).
    fn asleep(writer: &SpoolWriter, armed: bool) -> bool {
        let queue = writer.jobs.shared.lock();
        queue.waiting && queue.marks_armed == armed
    }

    fn wakeups(writer: &SpoolWriter) -> u64 {
        writer.jobs.shared.wakeups.load(Ordering::Relaxed)
    }

    /// Each finished delivery's mark woke the writer thread only to be queued for a commit due
    /// later anyway: at everyday rates, a wakeup (two context switches) per event for nothing.
    /// After an append, the marks of its deliveries wake it not at all; the first mark into an
    /// idle writer wakes it once, to set their deadline.
    #[tokio::test]
    async fn marks_do_not_wake_the_writer_and_a_commit_waits_for_the_marks_queued_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        // Queued by another process (no commit of this writer): the writer starts idle.
        let events: Arc<[Event]> = (0..4).map(event).collect();
        let other = Write::Append {
            channel: "c".into(),
            routes: vec!["r".into()],
            events,
            cursor: None,
        };
        spool
            .write(&[other], Limits { max_bytes: 1 << 30 })
            .unwrap();
        // A mark delay far longer than the test: only a commit can take the marks along.
        let (writer, thread) = writer_on(&spool, COMMIT_PACE, Duration::from_secs(600));
        let queued = spool.pending("r", 0, usize::MAX).unwrap();
        let mark = |n: usize, outcome: Outcome| Write::Mark {
            route: "r".into(),
            seq: queued[n].seq,
            event: queued[n].event.id,
            outcome,
        };
        let retry = || Outcome::Retry {
            status: Some(503),
            error: "busy".into(),
        };
        let delivered = || Outcome::Delivered { status: 200 };
        until("the writer idle", || asleep(&writer, false)).await;
        let idle = wakeups(&writer);

        // The first mark into an idle writer wakes it once, to set the marks' deadline.
        writer.flush(&mut vec![mark(1, retry())]);
        until("the marks' deadline set", || asleep(&writer, true)).await;
        assert_eq!(wakeups(&writer), idle + 1);

        // Every mark after it waits for the next commit without waking the thread, in order.
        for _ in 0..49 {
            writer.flush(&mut vec![mark(1, retry())]);
        }
        writer.finish(mark(0, delivered())).unwrap();
        writer.finish(mark(1, delivered())).unwrap();
        writer.flush(&mut vec![mark(1, retry())]);
        assert!(asleep(&writer, true), "the thread still sleeps");
        assert_eq!(wakeups(&writer), idle + 1, "no mark woke it");
        assert_eq!(spool.pending("r", 0, usize::MAX).unwrap().len(), 4);

        // A commit waits for the marks queued before it (what a route does before it stops).
        writer.commit(Vec::new()).await.unwrap();
        assert_eq!(wakeups(&writer), idle + 2, "the commit woke it once");
        let record = |n: usize| {
            let (_, routes) = spool.get(queued[n].event.id).unwrap();
            routes.into_iter().next().unwrap().1
        };
        assert_eq!(record(0).status, crate::spool::Status::Delivered);
        assert_eq!(record(0).attempts, 1);
        // 50 retries, then delivered; the retry after it is stale (the marks kept their order).
        assert_eq!(record(1).status, crate::spool::Status::Delivered);
        assert_eq!(record(1).attempts, 51);
        assert_eq!(record(2).status, crate::spool::Status::Pending);
        assert_eq!(
            spool.pending("r", 0, usize::MAX).unwrap().len(),
            2,
            "on disk when the commit returned"
        );

        // After an append, the marks of what it appended wake the thread not at all: it set
        // their deadline with the commit.
        writer
            .append("c", &["r".into()], Arc::from(vec![event(9)]), None)
            .await
            .unwrap();
        until("the marks' deadline set", || asleep(&writer, true)).await;
        let appended = wakeups(&writer);
        writer.finish(mark(2, delivered())).unwrap();
        writer.finish(mark(3, delivered())).unwrap();
        assert!(asleep(&writer, true), "the thread still sleeps");
        assert_eq!(wakeups(&writer), appended, "no mark woke it");
        // ... and they ride along with the next commit.
        writer.commit(Vec::new()).await.unwrap();
        assert_eq!(spool.pending("r", 0, usize::MAX).unwrap().len(), 1);
        drop(writer);
        thread.join().unwrap();
    }

    /// Append one event to route "r" and finish its delivery; returns its id once the writer
    /// sleeps with the mark held (not committed: the writer's mark delay is long).
    async fn deliver_one_holding_its_mark(writer: &SpoolWriter, spool: &Spool) -> u64 {
        writer
            .append("c", &["r".into()], Arc::from(vec![event(1)]), None)
            .await
            .unwrap();
        let queued = spool.pending("r", 0, usize::MAX).unwrap();
        writer.finish(delivered(&queued[0])).unwrap();
        until("the writer asleep with the mark held", || {
            asleep(writer, true)
        })
        .await;
        queued[0].event.id
    }

    /// That `reader` (another process's handle, in real life) sees event `id` delivered.
    fn assert_delivered(reader: &Spool, id: u64) {
        let (_, routes) = reader.get(id).unwrap();
        let record = routes.into_iter().next().unwrap().1;
        assert_eq!(record.status, crate::spool::Status::Delivered, "{record:?}");
    }

    /// `smee-relay events replay ID` run within `MARK_DELAY` of ID's delivery by a running relay
    /// said "queued 0 deliveries again": the delivery's mark was only in the relay's journal
    /// and writer queue when the relay shared the spool, and the command, reading at once,
    /// found the delivery pending. (With marks held past a `SHARE_POLL`, the relay did not
    /// share at all, and the command gave up after 10 s.) The writer now commits what it holds
    /// before it shares.
    #[tokio::test]
    async fn regression_a_command_opening_the_spool_saw_a_delivery_the_relay_had_finished_as_pending()
     {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        // A mark delay far longer than the test: only sharing can commit the mark in time.
        let (writer, thread) = writer_on(&spool, COMMIT_PACE, Duration::from_secs(600));
        let id = deliver_one_holding_its_mark(&writer, &spool).await;
        assert_eq!(spool.pending("r", 0, usize::MAX).unwrap().len(), 1);

        // The command, in another process in real life: it asks the relay to share and reads.
        let state = dir.path().to_owned();
        let command = tokio::task::spawn_blocking(move || Spool::open_shared(&state))
            .await
            .unwrap()
            .expect("the relay shared the spool");
        assert_delivered(&command, id);
        assert!(command.pending("r", 0, usize::MAX).unwrap().is_empty());
        drop(command);
        drop(writer);
        thread.join().unwrap();
    }

    /// The same on a spool the relay already shared (with a command run a moment before, or a
    /// relay of another channel): the command opened it at once and read it while the relay
    /// still held the mark, for up to `MARK_DELAY`. A relay now answers each new request once
    /// what it holds is committed, and a command waits for the answers.
    #[tokio::test]
    async fn regression_a_command_on_a_spool_already_shared_saw_a_finished_delivery_as_pending() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let (writer, thread) = writer_on(&spool, COMMIT_PACE, Duration::from_secs(600));
        let open_shared = || {
            let state = dir.path().to_owned();
            tokio::task::spawn_blocking(move || Spool::open_shared(&state))
        };
        // A command keeps the spool shared.
        let first = open_shared().await.unwrap().expect("shared");
        until("the relay shares the spool", || {
            spool.sharing.lock().unwrap().mode == crate::spool::Mode::Shared
        })
        .await;
        let id = deliver_one_holding_its_mark(&writer, &spool).await;
        assert_eq!(first.pending("r", 0, usize::MAX).unwrap().len(), 1);

        let second = open_shared().await.unwrap().expect("shared");
        assert_delivered(&second, id);
        drop((first, second));
        drop(writer);
        thread.join().unwrap();
    }

    /// Marks nobody waits for are still committed on their own, within the mark delay.
    #[tokio::test]
    async fn marks_alone_are_committed_within_the_mark_delay() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let (writer, thread) = writer_on(&spool, COMMIT_PACE, MARK_DELAY);
        let events: Arc<[Event]> = (0..2).map(event).collect();
        writer
            .append("c", &["r".into()], events, None)
            .await
            .unwrap();
        let queued = spool.pending("r", 0, usize::MAX).unwrap();
        until("the writer idle", || asleep(&writer, false)).await;
        for item in &queued {
            writer.finish(delivered(item)).unwrap();
        }
        until("the marks committed", || {
            spool.pending("r", 0, usize::MAX).unwrap().is_empty()
        })
        .await;
        until("the writer idle again", || asleep(&writer, false)).await;
        drop(writer);
        thread.join().unwrap();
    }

    /// `intake::GIVE_UP_AFTER_STOP` plus a retry and slack.
    const GIVE_UP_BOUND: Duration = Duration::from_secs(10);

    /// Appends that together reach `MAX_BATCH_BYTES` are committed at once, not held for the
    /// pace to gather more: a commit's bytes are bounded, like its number of writes.
    #[tokio::test]
    async fn appends_that_fill_a_commit_s_bytes_are_not_held_behind_the_pace() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let (writer, thread) = writer_on(&spool, Duration::from_secs(60), MARK_DELAY);
        let append = |n: u64, pad: usize| Write::Append {
            channel: "c".into(),
            routes: vec!["r".into()],
            events: Arc::from(vec![Event {
                body: format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(pad)).into(),
                ..event(n)
            }]),
            cursor: None,
        };
        // A commit of several events: the next awaited commit waits out the pace.
        writer
            .commit(vec![append(0, 0), append(1, 0)])
            .await
            .expect("committed");
        let mut first = Box::pin(writer.commit(vec![append(2, MAX_BATCH_BYTES * 2 / 3)]));
        assert!(futures::poll!(&mut first).is_pending());
        // Together past the byte bound: committed without waiting out the 60 s pace.
        let second = writer.commit(vec![append(3, MAX_BATCH_BYTES * 2 / 3)]);
        let (first, second) = tokio::time::timeout(
            Duration::from_secs(20),
            futures::future::join(first, second),
        )
        .await
        .expect("a commit full of bytes goes at once");
        first.expect("committed");
        second.expect("committed");
        assert_eq!(spool.stats().unwrap().events, 4);
        drop(writer);
        thread.join().unwrap();
    }

    /// A burst larger than the queue's byte bound: the source waits until commits give the
    /// room back (never more unstored than the bound), and everything is stored, whole and in
    /// order; then one event larger than every bound (the queue's and a commit's) passes alone.
    #[tokio::test]
    async fn a_burst_larger_than_the_byte_bound_waits_for_commits_and_is_stored_whole_in_order() {
        use crate::source::queue;
        const BOUND: usize = 64 << 10;
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let (writer, thread) = writer_on(&spool, COMMIT_PACE, MARK_DELAY);
        let (tx, rx) = queue::channel(BOUND);
        let counters = Arc::new(Counters::default());
        let intake = tokio::spawn(intake::intake(
            rx,
            writer.clone(),
            "c".into(),
            None,
            watch::channel(vec!["r".to_string()]).1,
            counters.clone(),
        ));
        let padded = |n: u64, pad: usize| Event {
            body: format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(pad)).into(),
            ..event(n)
        };
        let weight = padded(0, 4000).held_bytes();
        let fit = BOUND / weight;
        let burst = 4 * fit as u64;
        assert!(
            burst as usize * weight > 3 * BOUND,
            "the burst is larger than the bound"
        );
        let mut peak = 0;
        for n in 0..burst {
            tx.send(padded(n, 4000)).await.unwrap();
            // Counted only after the commit: what was sent and is not counted is not on disk.
            let stored = counters.received.load(Ordering::Relaxed);
            let unstored = (n + 1 - stored) as usize;
            assert!(unstored <= fit, "{unstored} events not stored, bound {fit}");
            assert!(tx.in_flight() <= BOUND);
            peak = peak.max(unstored);
        }
        assert_eq!(peak, fit, "the sender filled the bound and waited");

        // Larger than the queue's bound and a commit's: charged the whole bound, committed alone.
        let huge = padded(burst, MAX_BATCH_BYTES + BOUND);
        assert!(huge.held_bytes() > MAX_BATCH_BYTES);
        tx.send(huge.clone()).await.unwrap();
        tx.send(padded(burst + 1, 10)).await.unwrap();
        until("everything stored", || {
            counters.received.load(Ordering::Relaxed) == burst + 2
        })
        .await;
        // Read in pages: a read stops at its byte bound.
        let mut stored = Vec::new();
        loop {
            let after = stored.last().map_or(0, |q: &crate::spool::Queued| q.seq);
            let page = spool.pending("r", after, usize::MAX).unwrap();
            if page.is_empty() {
                break;
            }
            stored.extend(page);
        }
        let ns: Vec<u64> = stored
            .iter()
            .map(|q| {
                let body: serde_json::Value = serde_json::from_slice(&q.event.event.body).unwrap();
                body["n"].as_u64().unwrap()
            })
            .collect();
        assert_eq!(ns, (0..burst + 2).collect::<Vec<_>>(), "all, in order");
        assert_eq!(stored[burst as usize].event.event.body, huge.body, "whole");
        assert_eq!(tx.in_flight(), 0);
        drop(tx);
        intake.await.unwrap();
        drop(writer);
        thread.join().unwrap();
    }

    /// Turn inline commits on, with `gap` and `slow` ([`Gate`]).
    fn gate(writer: &SpoolWriter, gap: Duration, slow: Duration) {
        let mut gate = writer.committer.gate();
        gate.off_until = None;
        gate.gap = gap;
        gate.slow = slow;
    }

    /// A commit is never slow for tests that do not test slowness: on a loaded machine one
    /// could be, and turn inline commits off for a minute.
    const NEVER_SLOW: Duration = Duration::from_secs(3600);

    /// [`writer_on`] with inline commits on, `gap` between them and none slow ([`Gate`]), once
    /// its thread sleeps idle.
    async fn idle_inline_writer(
        spool: &Arc<Spool>,
        mark_delay: Duration,
        gap: Duration,
    ) -> (SpoolWriter, std::thread::JoinHandle<()>) {
        let (writer, thread) = writer_on(spool, COMMIT_PACE, mark_delay);
        gate(&writer, gap, NEVER_SLOW);
        until("the writer idle", || asleep(&writer, false)).await;
        (writer, thread)
    }

    /// The mark of `queued`'s delivery on route "r", delivered.
    fn delivered(queued: &crate::spool::Queued) -> Write {
        Write::Mark {
            route: "r".into(),
            seq: queued.seq,
            event: queued.event.id,
            outcome: Outcome::Delivered { status: 200 },
        }
    }

    /// Append one event to route "r"; returns its id.
    async fn append_one(writer: &SpoolWriter, n: u64) -> u64 {
        let ids = writer
            .append("c", &["r".into()], Arc::from(vec![event(n)]), None)
            .await
            .unwrap();
        ids[0].expect("stored")
    }

    /// At everyday rates each event cost two thread hand-offs (the thread's wake and the
    /// answer's), a fifth of the relay's CPU. A lone event on an idle writer is now committed
    /// by its appender, through the log, waking nobody; a batch still goes through the thread.
    #[tokio::test]
    async fn a_lone_event_on_an_idle_writer_is_committed_inline_and_a_batch_by_the_thread() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let (writer, thread) = idle_inline_writer(&spool, MARK_DELAY, Duration::ZERO).await;
        let idle = wakeups(&writer);
        append_one(&writer, 1).await;
        assert_eq!(wakeups(&writer), idle, "the thread was woken");
        assert_eq!(spool.logged(), 1, "made durable by a record in the log");
        assert_eq!(spool.pending("r", 0, usize::MAX).unwrap().len(), 1);

        writer
            .append(
                "c",
                &["r".into()],
                Arc::from(vec![event(2), event(3)]),
                None,
            )
            .await
            .unwrap();
        assert_eq!(
            wakeups(&writer),
            idle + 1,
            "a batch goes through the thread"
        );
        assert_eq!(spool.pending("r", 0, usize::MAX).unwrap().len(), 3);
        drop(writer);
        thread.join().unwrap();
        assert_eq!(spool.logged(), 0, "a stop commits the log");
    }

    /// Events close together are a burst, and an inline commit slower than `INLINE_SLOW`
    /// stalled the event loop: the next commits go through the thread.
    #[tokio::test]
    async fn a_burst_or_a_slow_disk_leaves_commits_to_the_thread() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let (writer, thread) = writer_on(&spool, COMMIT_PACE, MARK_DELAY);
        // An hour between commits is the least for a trickle: the second append is a burst.
        // (And no commit is slow: on a loaded machine one could be, and turn them off.)
        gate(&writer, Duration::from_secs(3600), NEVER_SLOW);
        until("the writer idle", || asleep(&writer, false)).await;
        let idle = wakeups(&writer);
        append_one(&writer, 1).await;
        assert_eq!(wakeups(&writer), idle, "the first one inline");
        append_one(&writer, 2).await;
        assert_eq!(
            wakeups(&writer),
            idle + 1,
            "the burst's next one by the thread"
        );

        // Any commit is slow: after one inline, the next goes through the thread.
        gate(&writer, Duration::ZERO, Duration::ZERO);
        // Asleep with the marks' deadline set, or past it (a slow poll may miss the deadline).
        until("the writer idle", || {
            asleep(&writer, true) || asleep(&writer, false)
        })
        .await;
        let before = wakeups(&writer);
        append_one(&writer, 3).await;
        assert_eq!(wakeups(&writer), before, "inline, and slow");
        append_one(&writer, 4).await;
        assert_eq!(
            wakeups(&writer),
            before + 1,
            "after a slow one, by the thread"
        );
        assert_eq!(spool.pending("r", 0, usize::MAX).unwrap().len(), 4);
        drop(writer);
        thread.join().unwrap();
    }

    /// Marks queued ride along with an inline commit, as with the thread's; but one the thread
    /// holds (for its deadline) would be overtaken by them, out of order: the append then goes
    /// through the thread, and takes the held mark along.
    #[tokio::test]
    async fn marks_ride_along_with_an_inline_commit_but_never_overtake_the_threads() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        // A mark delay far longer than the test: only a commit takes marks along.
        let (writer, thread) =
            idle_inline_writer(&spool, Duration::from_secs(600), Duration::ZERO).await;
        // Inline; its mark wakes the idle thread, which holds it.
        let first = deliver_one_holding_its_mark(&writer, &spool).await;
        let holding = wakeups(&writer);
        append_one(&writer, 2).await;
        assert_eq!(wakeups(&writer), holding + 1, "by the thread");
        assert_delivered(&spool, first);

        // The thread holds nothing now (and the marks' deadline is set): a mark queued rides
        // along with the next inline commit.
        until("the writer asleep, armed", || asleep(&writer, true)).await;
        let queued = spool.pending("r", 0, usize::MAX).unwrap();
        assert_eq!(queued.len(), 1);
        writer.finish(delivered(&queued[0])).unwrap();
        let before = wakeups(&writer);
        append_one(&writer, 3).await;
        assert_eq!(wakeups(&writer), before, "inline");
        assert_delivered(&spool, queued[0].event.id);
        assert_eq!(spool.pending("r", 0, usize::MAX).unwrap().len(), 1);
        drop(writer);
        thread.join().unwrap();
    }

    /// A spool whose target was down filled its disk by itself: redb then could record no
    /// delivery (copy on write needs new blocks, and so does opening the file again after the
    /// failed write), so nothing was pruned and no event taken, for good. It now leaves
    /// `--keep-free` on the disk: short of it, appends wait, deliveries are still recorded,
    /// and the next append prunes them early and fits in the pages they freed.
    #[tokio::test]
    async fn regression_a_spool_that_filled_its_disk_could_record_nothing_more() {
        let keep_free = 4 << 20;
        let disk = on_a_small_disk(16 << 20, keep_free);
        assert!(
            (disk.free)() > keep_free,
            "the test's disk has room to begin with"
        );
        let routes = ["r".to_string()];
        let batch = |from: u64| -> Arc<[Event]> {
            (from..from + 16)
                .map(|n| Event {
                    body: bytes::Bytes::from(vec![b'x'; 4096 + n as usize % 7]),
                    ..event(n)
                })
                .collect()
        };

        // The target is down: events pile up until the disk is short, then wait.
        let (batches, no_room) = append_until_no_room(&disk.writer, |n| batch(16 * n)).await;
        let n = 16 * batches;
        assert!(no_room.to_string().contains("--keep-free"), "{no_room}");
        assert_eq!(
            disk.spool.write_error(),
            None,
            "the disk itself never refused a write"
        );
        assert!(
            !disk.writer.writable().load(Ordering::Relaxed),
            "/healthz answers 503"
        );
        // And says why (it said "see the log": nothing ever set the reason).
        let why = disk.writer.why_paused().lock().unwrap().clone();
        assert!(why.is_some_and(|why| why.contains("--keep-free")));
        // Read in pages: a read holds a few MiB of bodies at most.
        let mut stored: Vec<crate::spool::Queued> = Vec::new();
        loop {
            let after = stored.last().map_or(0, |queued| queued.seq);
            let page = disk.spool.pending("r", after, usize::MAX).unwrap();
            if page.is_empty() {
                break;
            }
            stored.extend(page);
        }
        assert_eq!(stored.len() as u64, n);

        // The target is back: every delivery is recorded, on the room kept.
        for queued in &stored {
            disk.writer.finish(delivered(queued)).unwrap();
        }
        disk.writer.commit(Vec::new()).await.unwrap();
        assert!(disk.spool.pending("r", 0, usize::MAX).unwrap().is_empty());
        // And events are taken again (half as many: those delivered make room for them, the
        // undelivered take it), in the pages of those delivered, pruned early.
        for more in 0..(n / 32) {
            let ids = disk
                .writer
                .append("c", &routes, batch(n + 16 * more), None)
                .await
                .unwrap();
            assert!(ids.iter().all(Option::is_some));
        }
        assert!(disk.writer.writable().load(Ordering::Relaxed));
        assert_eq!(*disk.writer.why_paused().lock().unwrap(), None);
        assert_eq!(disk.spool.write_error(), None);
        assert!((disk.free)() > 0);
        drop(disk.writer);
        disk.thread.join().unwrap();
    }

    /// With a small `--keep-free` and events of a few MB, the disk filled before the room was
    /// ever seen short: an append was looked at only once the room was under `--keep-free`,
    /// and one append grew the file past it and past the disk's end (redb puts a large value
    /// in one run of pages, rounded up to a power of two). An append now goes as it is only if
    /// the room left after it, grown so, is still `--keep-free`.
    #[tokio::test]
    async fn regression_events_larger_than_the_room_kept_filled_the_disk() {
        let disk = on_a_small_disk(24 << 20, 2 << 20);
        let big = |n: u64| -> Arc<[Event]> {
            Arc::from(vec![Event {
                body: bytes::Bytes::from(vec![b'x'; 5_000_000 + n as usize]),
                ..event(n)
            }])
        };
        // The target is down: events pile up until they wait for room.
        let (n, _) = append_until_no_room(&disk.writer, big).await;
        assert_eq!(disk.spool.write_error(), None, "the disk refused a write");
        assert!(n >= 1, "the disk took none");
        assert!(
            (disk.free)() >= 2 << 20,
            "{} left of the room kept",
            (disk.free)()
        );
        drop(disk.writer);
        disk.thread.join().unwrap();
    }

    /// An inline commit that fails tells its appender, as the thread's does, and gives the
    /// marks it took along back to the thread, which commits them once the disk has room.
    #[tokio::test]
    async fn a_failed_inline_commit_gives_its_marks_back_to_the_thread() {
        let dir = tempfile::tempdir().unwrap();
        let (factory, full) = DiskFull::factory();
        let spool = Arc::new(Spool::open_with(dir.path(), factory).unwrap());
        let (writer, thread) =
            idle_inline_writer(&spool, Duration::from_secs(600), Duration::ZERO).await;
        // Two events: by the thread, which then sleeps with the marks' deadline set and
        // nothing held, so that a mark waits in the queue.
        writer
            .append(
                "c",
                &["r".into()],
                Arc::from(vec![event(1), event(2)]),
                None,
            )
            .await
            .unwrap();
        until("the writer asleep, armed, holding nothing", || {
            asleep(&writer, true) && !writer.jobs.shared.lock().holding
        })
        .await;
        let queued = spool.pending("r", 0, usize::MAX).unwrap();
        let before = wakeups(&writer);
        writer.finish(delivered(&queued[0])).unwrap();
        assert_eq!(writer.jobs.shared.lock().jobs.len(), 1, "the mark queued");

        // The disk fills, and the log cannot be written either: the commit fails.
        full.store(true, Ordering::SeqCst);
        spool.break_wal(true);
        let routes = ["r".to_string()];
        let mut failing = Box::pin(writer.append("c", &routes, Arc::from(vec![event(3)]), None));
        // Answered within its first poll: the commit was inline, not the thread's.
        let std::task::Poll::Ready(failed) = futures::poll!(&mut failing) else {
            panic!("the append was left to the thread, not committed inline");
        };
        drop(failing);
        assert!(failed.is_err(), "{failed:?}");
        until("the mark given back to the thread, and it woken", || {
            wakeups(&writer) == before + 1
        })
        .await;
        assert!(!writer.writable().load(Ordering::Relaxed));
        let why = writer.why_paused().lock().unwrap().clone();
        let why = why.unwrap_or_default();
        assert!(
            why.starts_with("cannot write to the spool: ")
                && why.contains("the disk holding the spool is full: free space there"),
            "{why}"
        );

        // Room again: the thread's next commit takes the mark along.
        full.store(false, Ordering::SeqCst);
        spool.break_wal(false);
        writer.commit(Vec::new()).await.unwrap();
        assert_delivered(&spool, queued[0].event.id);
        append_one(&writer, 3).await;
        assert_eq!(*writer.why_paused().lock().unwrap(), None);
        drop(writer);
        thread.join().unwrap();
    }

    /// An idle relay's writer thread woke every second to look for other processes asking to
    /// share its spool: 60 wakes a minute, most of an idle relay's CPU (issue 19's idle
    /// budget). Holding its spool alone, checkpointed, it now sleeps until a request is told
    /// by its watch, and a command's open is still answered at once.
    #[tokio::test]
    async fn regression_an_idle_writer_woke_every_second_to_look_for_requests_to_share() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let (writer, thread) = writer_watched(&spool, COMMIT_PACE, MARK_DELAY, true);
        assert!(writer.committer.spool.is_alone());
        append_one(&writer, 1).await;
        until("the write-ahead log checkpointed", || spool.logged() == 0).await;
        until("the writer idle", || asleep(&writer, false)).await;
        let looked = spool.sharing.lock().unwrap().looked;
        let naps = writer.jobs.shared.naps.load(Ordering::Relaxed);
        // Two and a half looks' worth of idleness (each was a wake: absence takes time to see).
        tokio::time::sleep(super::super::SHARE_POLL * 5 / 2).await;
        let looked_since = spool.sharing.lock().unwrap().looked;
        assert_eq!(
            looked_since, looked,
            "the idle writer looked for requests (it does where it cannot watch the directory: \
             is fs.inotify.max_user_instances used up?)"
        );
        assert_eq!(
            writer.jobs.shared.naps.load(Ordering::Relaxed),
            naps,
            "the idle writer woke"
        );
        // A command asks: with no look due for as long as the writer is idle, only the watch
        // can tell it (else the command gives up after SHARE_WAIT, 10 s).
        let asked = Instant::now();
        let command = {
            let dir = dir.path().to_owned();
            tokio::task::spawn_blocking(move || Spool::open_shared(&dir))
        };
        let command = tokio::time::timeout(Duration::from_secs(60), command)
            .await
            .unwrap()
            .unwrap()
            .expect("the command's open is answered");
        assert!(!spool.is_alone(), "the relay did not share its spool");
        assert!(
            asked.elapsed() < super::super::SHARE_WAIT,
            "answered only after {:?}",
            asked.elapsed()
        );
        // Shared, it looks every SHARE_POLL again (a command killed leaves its request), and
        // once the command is done it has the file alone again.
        drop(command);
        until("the spool alone again", || spool.is_alone()).await;
        append_one(&writer, 2).await;
        drop(writer);
        thread.join().unwrap();
    }

    /// An idle writer thread that sleeps until told (no deadline) was not woken by an inline
    /// commit, so the record it put in the write-ahead log waited for the next wake (a mark,
    /// another process) for its checkpoint, "one synced commit per quiet spell" (review).
    #[tokio::test]
    async fn regression_an_inline_commit_into_a_writer_asleep_until_told_was_not_checkpointed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let (writer, thread) = writer_watched(&spool, COMMIT_PACE, MARK_DELAY, true);
        gate(&writer, Duration::ZERO, NEVER_SLOW);
        until("the writer asleep until told", || {
            writer.jobs.shared.lock().unbounded
        })
        .await;
        let idle = wakeups(&writer);
        append_one(&writer, 1).await;
        until("the thread woken", || wakeups(&writer) == idle + 1).await;
        until("the writer asleep again", || asleep(&writer, false)).await;
        // Woken, it set the checkpoint's deadline and did not checkpoint at once: that would
        // be a synced commit of redb per event at everyday rates, which the log is there to
        // save. The next inline commit finds it asleep with that deadline, and wakes nobody.
        append_one(&writer, 2).await;
        assert_eq!(spool.logged(), 2, "checkpointed at the wake");
        // No mark follows (a delivery still running): the checkpoint comes all the same.
        until("the log checkpointed", || spool.logged() == 0).await;
        assert_eq!(
            wakeups(&writer),
            idle + 1,
            "woken once, for the checkpoint's deadline"
        );
        until("the writer asleep until told", || {
            writer.jobs.shared.lock().unbounded
        })
        .await;
        drop(writer);
        thread.join().unwrap();
    }

    /// The idle writer thread asked the write-ahead log how many records it holds with the
    /// queue's lock held, so while any write held the log (a prune's scan of a large spool,
    /// every minute) every sender on the event loop waited for the scan too (review).
    #[tokio::test]
    async fn regression_a_long_write_stalled_senders_on_the_idle_writer_s_queue_lock() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let (writer, thread) =
            writer_watched(&spool, COMMIT_PACE, Duration::from_millis(300), true);
        let routes = ["r".to_string()];
        writer
            .append("c", &routes, Arc::from(vec![event(1), event(2)]), None)
            .await
            .unwrap();
        let queued = spool.pending("r", 0, usize::MAX).unwrap();
        // A write transaction of 5 s, as a prune's scan of a large spool.
        let scan = {
            let spool = spool.clone();
            std::thread::spawn(move || {
                spool
                    .update(|_| {
                        std::thread::sleep(Duration::from_secs(5));
                        Ok(())
                    })
                    .unwrap();
            })
        };
        until("the scan holds the log", || spool.wal.try_lock().is_err()).await;
        // The marks' deadline (300 ms) passes meanwhile, and the writer goes idle. Not waited
        // for by looking at the queue: that takes the very lock a stalled writer holds.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let started = Instant::now();
        // What a route's delivery calls on the event loop.
        writer.finish(delivered(&queued[0])).unwrap();
        let took = started.elapsed();
        scan.join().unwrap();
        assert!(
            took < Duration::from_secs(2),
            "a sender waited {took:?} for another write"
        );
        drop(writer);
        thread.join().unwrap();
    }

    /// An inline commit waited in redb behind any other write transaction, such as a prune's
    /// scan of a large spool (every minute), and the appender's whole event loop with it. It
    /// now leaves the append to the thread when another write is under way.
    #[tokio::test]
    async fn regression_an_inline_commit_stalled_the_event_loop_behind_another_write() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let (writer, thread) = idle_inline_writer(&spool, MARK_DELAY, Duration::ZERO).await;
        // A write transaction of 2 s on another thread (as a prune's is, on the blocking pool).
        let (held, holding) = std::sync::mpsc::channel();
        let other = {
            let spool = spool.clone();
            std::thread::spawn(move || {
                spool
                    .update(|_| {
                        held.send(()).unwrap();
                        std::thread::sleep(Duration::from_secs(2));
                        Ok(())
                    })
                    .unwrap();
            })
        };
        holding.recv().unwrap();
        let before = wakeups(&writer);
        let mut append = Box::pin(append_one(&writer, 1));
        let polled = Instant::now();
        assert!(
            futures::poll!(&mut append).is_pending(),
            "left to the thread"
        );
        assert!(
            polled.elapsed() < Duration::from_secs(1),
            "the appender waited {:?} for the other write",
            polled.elapsed()
        );
        until("the thread woken", || wakeups(&writer) == before + 1).await;
        tokio::time::timeout(Duration::from_secs(20), append)
            .await
            .expect("stored once the other write is done");
        other.join().unwrap();
        drop(writer);
        thread.join().unwrap();
    }
}
