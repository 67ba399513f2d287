//! The writer thread: every write to the spool goes through it, so commits are grouped and one
//! fsync covers many events. redb is blocking and allows one writer at a time; a thread that
//! owns the writes is what lets appends and delivery marks from every task share a commit.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tracing::{error, warn};

use super::{Limits, Spool, Write};
use crate::event::Event;

/// Most writes in one transaction; more wait for the next commit.
pub(crate) const MAX_BATCH: usize = 4096;

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
