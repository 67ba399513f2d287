//! The thread that writes log lines, a batch per wake.
//!
//! A task that logs must never wait for stderr (a stalled journald, a full pipe), so lines are
//! queued in memory and written by a thread of their own. `tracing-appender`, which did this
//! before, wakes its thread for every line and spins (`sched_yield`) before parking it: a relay
//! writing one line per delivery made about six system calls and two context switches per event
//! for its logs, an eighth of its CPU at full speed. Here the first line after a quiet spell
//! wakes the thread; while lines keep coming it writes whatever gathered every [`Linger`] without
//! being woken, and parks once a look finds nothing.
//!
//! What holds:
//! - Lines are written whole and in order, in writes of at most [`PIPE_BUF`] bytes cut at line
//!   ends (a longer line goes alone, in one `write_all`): the kernel keeps such a write to a pipe
//!   whole, so processes sharing a log pipe (`serve` and `forward` into one `logger`) do not
//!   split each other's lines.
//! - Once [`QUEUE_BYTES`] are queued, new lines are dropped and counted, and the queue takes no
//!   more until the thread has taken it. The thread then makes the drop notice (a line in the
//!   log's own format, from the `notice` callback) and puts it first in the fresh queue, so it
//!   sits exactly where the lines went missing; lines logged meanwhile are taken. A line is
//!   taken whatever its size while the queue holds less.
//! - Write errors are ignored: a log reader that left costs log lines, nothing else.
//! - [`LogWriter::close`] writes out what is queued (waiting a second at most for a stalled
//!   stderr); lines logged after the thread has ended are written at once by whoever logs them.

use std::cell::Cell;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How many bytes of lines may wait before new ones are dropped: about 5,000 text lines, half a
/// second of lines at full speed (one per delivery) for a stalled reader to catch up. Grown only
/// as used; with the batch being written, a stalled reader costs about twice this in memory.
pub(super) const QUEUE_BYTES: usize = 512 << 10;

/// The largest write a pipe keeps whole (POSIX's minimum `PIPE_BUF`, Linux's value).
const PIPE_BUF: usize = 4096;

/// How long the thread lets lines gather after a write before it looks again. Lines reach stderr
/// at most this late; the log's own timestamps are taken when a line is made, not written.
#[derive(Clone, Copy, Debug)]
pub(super) struct Linger(pub(super) Duration);

/// A buffer that grew past this in a burst is dropped once written rather than kept.
const KEEP_CAPACITY: usize = 64 << 10;

/// How long [`LogWriter::close`] waits for the thread to write out what is queued.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

thread_local! {
    /// Set on the log thread: what it logs is its drop notice, which goes first in the queue.
    static LOG_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// The queue shared by whoever logs and the thread.
struct Queue {
    state: Mutex<State>,
    /// Signalled when the first line (or drop) arrives while the thread is parked, and on close.
    wake: Condvar,
    /// Signalled by the thread when it has ended.
    done: Condvar,
}

struct State {
    /// Whole lines, in the order they were logged.
    lines: Vec<u8>,
    /// Lines dropped since the thread last took the queue. While any were, later lines are
    /// dropped too (the queue is sealed), so that everything queued was logged before the gap.
    dropped: u64,
    /// The thread took a sealed queue and is making its notice: the notice goes before the
    /// lines logged since.
    notice_first: bool,
    /// The thread waits for a line: the next one must wake it. While it writes or lingers
    /// nobody wakes it, which is the point.
    parked: bool,
    /// `close` was called: the thread writes out what is left and ends.
    closed: bool,
    /// The thread has ended: lines are written by whoever logs them.
    finished: bool,
}

/// The writing end that `tracing-subscriber` gets: cheap to clone, one per line.
pub(super) struct LogWriter<W> {
    queue: Arc<Queue>,
    /// Where lines go once the thread has ended (and what the thread writes to).
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
    /// Start the thread writing to `out`. `notice(n)` is called on the thread when `n` lines were
    /// dropped, to log a line saying so (through this writer, in the log's format).
    pub(super) fn start(
        out: W,
        linger: Linger,
        notice: impl Fn(u64) + Send + 'static,
    ) -> std::io::Result<Self> {
        let queue = Arc::new(Queue {
            state: Mutex::new(State {
                lines: Vec::new(),
                dropped: 0,
                notice_first: false,
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
            .spawn(move || run(&thread_queue, &thread_out, linger, notice))?;
        Ok(Self { queue, out })
    }

    /// Write out what is queued and end the thread, waiting [`CLOSE_WAIT`] at most. Calling it
    /// again does nothing.
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
            write_in_pieces(&mut *lock(&self.out), line);
            return Ok(line.len());
        }
        if LOG_THREAD.get() && state.notice_first {
            state.notice_first = false;
            state.lines.splice(0..0, line.iter().copied());
        } else if LOG_THREAD.get() || (state.lines.len() < QUEUE_BYTES && state.dropped == 0) {
            // Grown by doubling, but not far past the bound: the queue's memory stays near it.
            let needed = state.lines.len() + line.len();
            if needed > state.lines.capacity() {
                let grown = (state.lines.capacity() * 2).clamp(needed, needed.max(QUEUE_BYTES));
                let len = state.lines.len();
                state.lines.reserve_exact(grown - len);
            }
            state.lines.extend_from_slice(line);
        } else {
            state.dropped += 1;
        }
        if state.parked {
            state.parked = false;
            drop(state);
            self.queue.wake.notify_one();
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
fn run<W: Write>(queue: &Queue, out: &Mutex<W>, linger: Linger, notice: impl Fn(u64)) {
    LOG_THREAD.set(true);
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
        if state.lines.is_empty() && state.dropped == 0 && state.closed {
            // Under the lock: a line logged from now on is written by whoever logs it.
            state.finished = true;
            queue.done.notify_all();
            return;
        }
        let closed = state.closed;
        let mut batch = std::mem::replace(&mut state.lines, std::mem::take(&mut spare));
        // A sealed queue holds the lines logged before the gap: the notice starts the next one.
        let dropped = std::mem::take(&mut state.dropped);
        state.notice_first = dropped > 0;
        drop(state);
        if dropped > 0 {
            notice(dropped);
            // The notice may have been filtered out.
            lock(&queue.state).notice_first = false;
        }

        write_in_pieces(&mut *lock(out), &batch);
        batch.clear();
        if batch.capacity() <= KEEP_CAPACITY {
            spare = batch;
        }
        if !closed && !linger.0.is_zero() {
            let state = lock(&queue.state);
            let _ = queue
                .wake
                .wait_timeout_while(state, linger.0, |state| !state.closed)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Write `lines` in writes of at most [`PIPE_BUF`] bytes that end at line ends (a longer line in
/// one `write_all` of its own), ignoring errors.
fn write_in_pieces(out: &mut impl Write, mut lines: &[u8]) {
    while !lines.is_empty() {
        let cut = if lines.len() <= PIPE_BUF {
            lines.len()
        } else {
            match lines[..PIPE_BUF].iter().rposition(|&b| b == b'\n') {
                Some(end) => end + 1,
                None => lines
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(lines.len(), |end| end + 1),
            }
        };
        let _ = out.write_all(&lines[..cut]);
        lines = &lines[cut..];
    }
}

/// A lock that a panic elsewhere does not poison for logging: the queue holds plain bytes.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

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

    /// A writer whose notice is the line `dropped N` (the real one logs a warning).
    fn start<W: Write + Send + 'static>(out: W, linger: Duration) -> LogWriter<W> {
        start_slow_notice(out, linger, Duration::ZERO).0
    }

    /// [`start`], with a notice that takes `making` to make (a tracing event being formatted,
    /// slowly in a debug build or on a busy machine), and a count of the notices made.
    fn start_slow_notice<W: Write + Send + 'static>(
        out: W,
        linger: Duration,
        making: Duration,
    ) -> (LogWriter<W>, Arc<AtomicUsize>) {
        let me: Arc<OnceLock<LogWriter<W>>> = Arc::default();
        let notices = Arc::new(AtomicUsize::new(0));
        let (notice_to, made) = (Arc::clone(&me), Arc::clone(&notices));
        let writer = LogWriter::start(out, Linger(linger), move |n| {
            std::thread::sleep(making);
            if let Some(writer) = notice_to.get() {
                log(writer, &format!("dropped {n}\n"));
            }
            made.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        let _ = me.set(writer.clone());
        (writer, notices)
    }

    fn log<W: Write>(writer: &LogWriter<W>, line: &str) {
        writer.clone().write_all(line.as_bytes()).unwrap();
    }

    /// A stderr that blocks until released.
    #[derive(Clone)]
    struct Stalled(Arc<(Mutex<bool>, Condvar)>, Recorder);

    impl Stalled {
        fn release(&self) {
            *lock(&self.0.0) = true;
            self.0.1.notify_all();
        }
    }

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

    /// Wait until the thread has taken what is queued (it is then blocked in a stalled write).
    fn until_taken<W>(writer: &LogWriter<W>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !lock(&writer.queue.state).lines.is_empty() {
            assert!(Instant::now() < deadline, "the thread never took the queue");
            std::thread::yield_now();
        }
    }

    #[test]
    fn lines_come_out_whole_in_order_and_close_writes_out_the_rest() {
        let out = Recorder::default();
        let writer = start(out.clone(), Duration::from_millis(5));
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
        // thread lingers are written together: 1,000 lines (8.9 KB) in at most four writes (the
        // first line alone, then writes of up to 4 KiB).
        let out = Recorder::default();
        let writer = start(out.clone(), Duration::from_secs(60));
        for n in 0..1_000 {
            log(&writer, &format!("line {n}\n"));
        }
        writer.close();
        let writes = out.writes();
        assert!(writes.len() <= 4, "{} writes for 1,000 lines", writes.len());
        assert_eq!(out.text().lines().count(), 1_000);
    }

    #[test]
    fn regression_batched_lines_were_split_when_two_processes_shared_a_pipe() {
        // A batch went to stderr in one write of up to hundreds of KiB. Past PIPE_BUF a pipe
        // write is not atomic: with the pipe full, another writer's bytes landed mid-line.
        // Two writers (two processes' log threads) share one pipe; a reader drains it in small
        // reads, so both keep finding it full.
        let (mut reader, pipe) = std::io::pipe().unwrap();
        let writers = [
            start(pipe.try_clone().unwrap(), Duration::from_millis(5)),
            start(pipe, Duration::from_millis(5)),
        ];
        const LINES: usize = 3_000;
        let line = |who: usize, n: usize| format!("{who} {n:05} {}\n", "x".repeat(70));
        let expected = 2 * LINES * line(0, 0).len();
        let drain = std::thread::spawn(move || {
            let (mut got, mut buf) = (Vec::new(), [0; 512]);
            let deadline = Instant::now() + Duration::from_secs(60);
            while got.len() < expected && Instant::now() < deadline {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            got
        });
        std::thread::scope(|scope| {
            for (who, writer) in writers.iter().enumerate() {
                scope.spawn(move || {
                    for n in 0..LINES {
                        log(writer, &line(who, n));
                    }
                });
            }
        });
        let got = String::from_utf8(drain.join().unwrap()).unwrap();
        for writer in &writers {
            writer.close();
        }
        let mut next = [0, 0];
        for text in got.lines() {
            let who: usize = text[..1].parse().unwrap_or(9);
            assert!(
                who < 2 && format!("{text}\n") == line(who, next[who]),
                "a split or foreign line: {text:?}"
            );
            next[who] += 1;
        }
        assert_eq!(next, [LINES, LINES]);
    }

    #[test]
    fn writes_end_at_line_ends_and_a_long_line_goes_alone() {
        let out = Recorder::default();
        let writer = start(out.clone(), Duration::from_secs(60));
        let long = format!("{}\n", "l".repeat(10_000));
        let mut all = String::new();
        for n in 0..300 {
            let line = if n == 150 {
                long.clone()
            } else {
                format!("line {n:04} {}\n", "s".repeat(50))
            };
            log(&writer, &line);
            all.push_str(&line);
        }
        writer.close();
        assert_eq!(out.text(), all);
        for write in out.writes() {
            assert!(write.ends_with(b"\n"));
            assert!(
                write.len() <= PIPE_BUF || write == long.as_bytes(),
                "{} bytes",
                write.len()
            );
        }
    }

    #[test]
    fn a_full_queue_drops_whole_lines_and_the_notice_is_where_they_went_missing() {
        let out = Recorder::default();
        let stalled = Stalled(Arc::default(), out.clone());
        let writer = start(stalled.clone(), Duration::ZERO);
        log(&writer, "first\n");
        until_taken(&writer);
        let line = format!("{}\n", "x".repeat(1_023));
        // Taken while the queue holds less than QUEUE_BYTES.
        let fit = QUEUE_BYTES.div_ceil(line.len());
        for _ in 0..fit + 10 {
            log(&writer, &line);
        }
        // Short enough to fit, but after a drop: dropped too, or the notice would be misplaced.
        log(&writer, "late\n");
        stalled.release();
        writer.close();
        assert_eq!(
            out.text(),
            format!("first\n{}dropped 11\n", line.repeat(fit)),
            "the lines kept, then the notice of the 11 dropped after them"
        );
    }

    #[test]
    fn regression_lines_logged_while_the_notice_was_made_kept_the_queue_sealed() {
        // The queue stayed sealed while the thread made its notice, so lines logged meanwhile
        // were dropped, which called for another notice, and so on: with lines coming faster
        // than a notice is made, the log was notices only, with stderr fast again.
        let out = Recorder::default();
        let stalled = Stalled(Arc::default(), out.clone());
        let (writer, notices) =
            start_slow_notice(stalled.clone(), Duration::ZERO, Duration::from_millis(5));
        log(&writer, "first\n");
        until_taken(&writer);
        let line = format!("{}\n", "x".repeat(1_023));
        for _ in 0..QUEUE_BYTES.div_ceil(line.len()) + 10 {
            log(&writer, &line);
        }
        // Lines all along: dropped while the queue is sealed, then logged while the thread makes
        // its notice (the window of the bug), then 100 more once it is made.
        std::thread::scope(|scope| {
            let logger = scope.spawn(|| {
                let deadline = Instant::now() + Duration::from_secs(20);
                let mut n = 0;
                while notices.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
                    log(&writer, &format!("after {n}\n"));
                    n += 1;
                }
                for _ in 0..100 {
                    log(&writer, &format!("after {n}\n"));
                    n += 1;
                }
            });
            stalled.release();
            logger.join().unwrap()
        });
        // The last of those lines may have found the queue full again (a loaded machine can
        // starve the log thread while the logger runs), and dropped they are followed by a
        // notice: once the thread has taken the queue, one more line must come out last.
        until_taken(&writer);
        log(&writer, "the end\n");
        writer.close();
        let text = out.text();
        assert!(text.contains("dropped "), "the notice of the first gap");
        // After the first notice, another only where the queue filled again (a loaded machine
        // can starve the log thread while the lines keep coming): each line queued since the
        // last notice is written before the next. With the bug, the next notice came with the
        // lines logged while the first was made dropped, none of them written.
        let after_first = text.split_once("dropped ").unwrap().1;
        let mut since_notice = 0;
        for line in after_first.lines().skip(1) {
            if line.starts_with("dropped ") {
                assert!(
                    since_notice + 64 >= QUEUE_BYTES,
                    "a notice with {since_notice} bytes queued since the last one"
                );
                since_notice = 0;
            } else {
                since_notice += line.len() + 1;
            }
        }
        assert!(text.ends_with("the end\n"), "the last line is missing");
    }

    #[test]
    fn regression_a_line_alone_over_the_queue_size_was_dropped() {
        // A 300 KB SSE id in a warning was dropped with "stderr was not read fast enough", to a
        // regular file. A line alone in the queue is taken whatever its size.
        let out = Recorder::default();
        let writer = start(out.clone(), Duration::ZERO);
        let huge = format!("{}\n", "I".repeat(QUEUE_BYTES + 1));
        log(&writer, &huge);
        until_taken(&writer);
        log(&writer, "next\n");
        writer.close();
        assert_eq!(out.text(), format!("{huge}next\n"));
    }

    #[test]
    fn regression_a_line_logged_while_close_finished_was_lost() {
        // The thread found the queue empty, let go of the lock and only then said it had
        // ended: a line queued in between was never written (1 round in 5 lost lines).
        for _ in 0..200 {
            let out = Recorder::default();
            let writer = start(out.clone(), Duration::ZERO);
            let (stop, logged) = (AtomicBool::new(false), AtomicUsize::new(0));
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        let n = logged.load(Ordering::Relaxed);
                        log(&writer, &format!("{n}\n"));
                        logged.store(n + 1, Ordering::Relaxed);
                    }
                });
                let deadline = Instant::now() + Duration::from_secs(10);
                while logged.load(Ordering::Relaxed) < 20 && Instant::now() < deadline {
                    std::thread::yield_now();
                }
                writer.close();
                let after = logged.load(Ordering::Relaxed);
                while logged.load(Ordering::Relaxed) < after + 20 && Instant::now() < deadline {
                    std::thread::yield_now();
                }
                stop.store(true, Ordering::Relaxed);
            });
            // `close` waits a second at most; a starved thread may still be writing.
            let deadline = Instant::now() + Duration::from_secs(60);
            while !lock(&writer.queue.state).finished && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            // On a busy machine the log thread may not run for a while: the queue fills and
            // lines are dropped, each gap with its notice, and only once the queue is full
            // (each line queued since the last notice is written before the next). A gap
            // without one is a loss.
            let (mut next, mut since_notice) = (0, 0);
            for line in out.text().lines() {
                match line.strip_prefix("dropped ") {
                    Some(n) => {
                        assert!(
                            since_notice + 64 >= QUEUE_BYTES,
                            "lines dropped with {since_notice} bytes queued"
                        );
                        next += n.parse::<usize>().unwrap();
                        since_notice = 0;
                    }
                    None => {
                        assert_eq!(line, next.to_string(), "a line lost or out of order");
                        next += 1;
                        since_notice += line.len() + 1;
                    }
                }
            }
            assert_eq!(next, logged.into_inner(), "the last lines were lost");
        }
    }

    #[test]
    fn lines_after_close_are_written_at_once() {
        let out = Recorder::default();
        let writer = start(out.clone(), Duration::from_secs(60));
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
        let writer = start(Broken, Duration::ZERO);
        let mut w = writer.clone();
        assert_eq!(w.write(b"line\n").unwrap(), 5);
        writer.close();
        assert!(lock(&writer.queue.state).finished, "the thread did not end");
        assert_eq!(w.write(b"after\n").unwrap(), 6);
    }

    #[test]
    fn close_returns_when_stderr_is_stalled() {
        let stalled = Stalled(Arc::default(), Recorder::default());
        let writer = start(stalled.clone(), Duration::ZERO);
        log(&writer, "stuck\n");
        let started = Instant::now();
        writer.close();
        assert!(started.elapsed() < Duration::from_secs(10));
        stalled.release();
    }
}
