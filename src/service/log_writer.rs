//! The thread that writes log lines, a batch per wake.
//!
//! A task that logs must never wait for stderr (a stalled journald, a full pipe), so lines are
//! queued in memory and written by a thread of their own. `tracing-appender`, which did this
//! before, wakes its thread for every line and spins (`sched_yield`) before parking it: a relay
//! writing one line per delivery made about six system calls and two context switches per event
//! for its logs, an eighth of its CPU at full speed. Here the first line after a quiet spell
//! wakes the thread; while lines keep coming it writes whatever gathered every [`Linger`] without
//! being woken, in one `write`, and parks once a look finds nothing.
//!
//! Lines are whole or not at all: past [`QUEUE_BYTES`] queued, new lines are dropped and counted,
//! and the next batch starts with a line saying how many. Write errors are ignored (a log reader
//! that left costs log lines, nothing else). [`LogWriter::close`] writes out what is queued
//! (waiting a second at most for a stalled stderr); lines logged after it are written at once by
//! whoever logs them.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How many bytes of lines may wait before new ones are dropped: over a second of lines at full
/// speed (one ~100-byte line per delivery) for a stalled reader to catch up. Grown only as used.
pub(super) const QUEUE_BYTES: usize = 256 << 10;

/// How long the thread lets lines gather after a write before it looks again. Lines reach stderr
/// at most this late; the log's own timestamps are taken when a line is made, not written.
#[derive(Clone, Copy, Debug)]
pub(super) struct Linger(pub(super) Duration);

/// A buffer that grew past this in a burst is dropped once written rather than kept.
const KEEP_CAPACITY: usize = 64 << 10;

/// How long [`LogWriter::close`] waits for the thread to write out what is queued.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// The queue shared by whoever logs and the thread.
struct Queue {
    state: Mutex<State>,
    /// Signalled when the first line arrives while the thread is parked, and on close.
    wake: Condvar,
    /// Signalled by the thread when it has written everything after a close.
    done: Condvar,
}

struct State {
    /// Whole lines, in the order they were logged.
    lines: Vec<u8>,
    /// Lines dropped since the last batch (the queue was full).
    dropped: u64,
    /// The thread waits for a line: the next one must wake it. While it writes or lingers
    /// nobody wakes it, which is the point.
    parked: bool,
    /// `close` was called: the thread writes out what is left and ends; later lines are written
    /// by the caller.
    closed: bool,
    /// The thread has ended.
    finished: bool,
}

/// The writing end that `tracing-subscriber` gets: cheap to clone, one per line.
pub(super) struct LogWriter<W> {
    queue: Arc<Queue>,
    /// Where lines go once the thread has been closed (and what the thread writes to).
    out: Arc<Mutex<W>>,
}

impl<W> Clone for LogWriter<W> {
    fn clone(&self) -> Self {
        Self {
            queue: Arc::clone(&self.queue),
            out: Arc::clone(&self.out),
        }
    }
}

impl<W: Write + Send + 'static> LogWriter<W> {
    /// Start the thread writing to `out`.
    pub(super) fn start(out: W, linger: Linger) -> std::io::Result<Self> {
        let queue = Arc::new(Queue {
            state: Mutex::new(State {
                lines: Vec::new(),
                dropped: 0,
                parked: false,
                closed: false,
                finished: false,
            }),
            wake: Condvar::new(),
            done: Condvar::new(),
        });
        let out = Arc::new(Mutex::new(out));
        let (thread_queue, thread_out) = (Arc::clone(&queue), Arc::clone(&out));
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || run(&thread_queue, &thread_out, linger))?;
        Ok(Self { queue, out })
    }

    /// Write out what is queued and end the thread, waiting [`CLOSE_WAIT`] at most. Lines
    /// logged afterwards are written at once. Calling it again does nothing.
    pub(super) fn close(&self) {
        let mut state = lock(&self.queue.state);
        state.closed = true;
        self.queue.wake.notify_one();
        let deadline = Instant::now() + CLOSE_WAIT;
        while !state.finished {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            state = self
                .queue
                .done
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl<W: Write> Write for LogWriter<W> {
    /// Queue `line` (tracing-subscriber hands over one whole formatted event per call).
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut state = lock(&self.queue.state);
        if state.finished {
            drop(state);
            let _ = lock(&self.out).write_all(line);
        } else if state.lines.len() + line.len() > QUEUE_BYTES {
            state.dropped += 1;
        } else {
            state.lines.extend_from_slice(line);
            if state.parked {
                state.parked = false;
                drop(state);
                self.queue.wake.notify_one();
            }
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a, W: Write + 'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter<W> {
    type Writer = Self;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// The thread: wait for lines, write what gathered, let more gather, until closed.
fn run<W: Write>(queue: &Queue, out: &Mutex<W>, linger: Linger) {
    let mut spare = Vec::new();
    loop {
        let mut state = lock(&queue.state);
        while state.lines.is_empty() && state.dropped == 0 && !state.closed {
            state.parked = true;
            state = queue
                .wake
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.parked = false;
        let closed = state.closed;
        let dropped = std::mem::take(&mut state.dropped);
        let mut batch = std::mem::replace(&mut state.lines, std::mem::take(&mut spare));
        drop(state);

        if batch.is_empty() && dropped == 0 {
            break; // closed, and nothing left
        }
        let mut out = lock(out);
        if dropped > 0 {
            let _ = writeln!(
                out,
                "smee-relay: {dropped} log line{} dropped: stderr was not read fast enough",
                if dropped == 1 { "" } else { "s" }
            );
        }
        let _ = out.write_all(&batch);
        drop(out);
        batch.clear();
        if batch.capacity() <= KEEP_CAPACITY {
            spare = batch;
        }
        if closed {
            continue; // write out the rest without lingering
        }
        if !linger.0.is_zero() {
            let state = lock(&queue.state);
            let _ = queue
                .wake
                .wait_timeout_while(state, linger.0, |state| !state.closed)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
    lock(&queue.state).finished = true;
    queue.done.notify_all();
}

/// A lock that a panic elsewhere does not poison for logging: the queue holds plain bytes.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records each `write` call, so a test sees how lines were batched.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Recorder {
        fn writes(&self) -> Vec<Vec<u8>> {
            lock(&self.0).clone()
        }
        fn text(&self) -> String {
            String::from_utf8(self.writes().concat()).unwrap()
        }
    }

    fn log<W: Write>(writer: &LogWriter<W>, line: &str) {
        writer.clone().write_all(line.as_bytes()).unwrap();
    }

    #[test]
    fn lines_come_out_whole_in_order_and_close_writes_out_the_rest() {
        let out = Recorder::default();
        let writer = LogWriter::start(out.clone(), Linger(Duration::from_millis(5))).unwrap();
        let lines: Vec<String> = (0..2_000).map(|n| format!("line {n}\n")).collect();
        for line in &lines {
            log(&writer, line);
        }
        writer.close();
        assert_eq!(out.text(), lines.concat());
    }

    #[test]
    fn regression_logging_woke_its_thread_for_every_line() {
        // With tracing-appender each line was one wake and one write. Lines logged while the
        // thread lingers are written together: at most the first line alone, then one batch.
        let out = Recorder::default();
        let writer = LogWriter::start(out.clone(), Linger(Duration::from_secs(60))).unwrap();
        for n in 0..1_000 {
            log(&writer, &format!("line {n}\n"));
        }
        writer.close();
        let writes = out.writes();
        assert!(writes.len() <= 2, "{} writes for 1,000 lines", writes.len());
        assert_eq!(out.text().lines().count(), 1_000);
    }

    #[test]
    fn a_full_queue_drops_whole_lines_and_says_how_many() {
        // A writer that blocks until released: a stalled stderr.
        #[derive(Clone)]
        struct Stalled(Arc<(Mutex<bool>, Condvar)>, Recorder);
        impl Write for Stalled {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let (open, cv) = &*self.0;
                let mut open = lock(open);
                while !*open {
                    open = cv.wait(open).unwrap();
                }
                self.1.write(buf)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let out = Recorder::default();
        let writer = LogWriter::start(
            Stalled(Arc::clone(&gate), out.clone()),
            Linger(Duration::ZERO),
        )
        .unwrap();
        // The first line is taken by the thread, which then blocks in write.
        log(&writer, "first\n");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !lock(&writer.queue.state).lines.is_empty() {
            assert!(
                Instant::now() < deadline,
                "the thread never took the first line"
            );
            std::thread::yield_now();
        }
        let line = format!("{}\n", "x".repeat(1_023));
        let fit = QUEUE_BYTES / line.len();
        for _ in 0..fit + 10 {
            log(&writer, &line);
        }
        {
            let (open, cv) = &*gate;
            *lock(open) = true;
            cv.notify_all();
        }
        writer.close();
        let text = out.text();
        assert!(text.starts_with("first\n"), "{}", &text[..40]);
        assert!(
            text.contains("smee-relay: 10 log lines dropped: stderr was not read fast enough\n"),
            "no count of the dropped lines"
        );
        assert_eq!(text.matches(line.as_str()).count(), fit);
    }

    #[test]
    fn lines_after_close_are_written_at_once() {
        let out = Recorder::default();
        let writer = LogWriter::start(out.clone(), Linger(Duration::from_secs(60))).unwrap();
        log(&writer, "before\n");
        writer.close();
        writer.close();
        log(&writer, "after\n");
        assert_eq!(out.text(), "before\nafter\n");
    }

    #[test]
    fn a_failing_stderr_costs_lines_and_nothing_else() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
        }
        let writer = LogWriter::start(Broken, Linger(Duration::ZERO)).unwrap();
        let mut w = writer.clone();
        assert_eq!(w.write(b"line\n").unwrap(), 5);
        writer.close();
        assert!(lock(&writer.queue.state).finished, "the thread did not end");
        assert_eq!(w.write(b"after\n").unwrap(), 6);
    }

    #[test]
    fn close_returns_when_stderr_is_stalled() {
        struct Forever;
        impl Write for Forever {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                loop {
                    std::thread::park();
                }
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let writer = LogWriter::start(Forever, Linger(Duration::ZERO)).unwrap();
        let mut w = writer.clone();
        w.write_all(b"stuck\n").unwrap();
        let started = Instant::now();
        writer.close();
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
