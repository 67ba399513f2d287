//! Logs: `tracing` lines on stderr, as text or JSON.
//!
//! Logs go to stderr as text or JSON. Under systemd (`JOURNAL_STREAM` set) text lines carry no
//! colour and no timestamp (journald adds its own) and start with a syslog priority (`<3>` for
//! errors, `<4>` warnings, `<6>` info, `<7>` debug), so `journalctl -p err` works.
//!
//! Logging never stops delivery. Lines go to stderr from a thread of their own, a batch per wake
//! ([`super::log_writer`]: past 512 KiB queued, new lines are dropped and counted rather than
//! waited for, and a warning says how many where they went missing, whatever the filter), and
//! write errors are ignored: a log reader that exited (EPIPE) or a stalled one
//! costs log lines, never a panic in a task or a blocked event loop.
//!
//! Every text line is one line of printable text: control characters in messages and fields
//! (an SSE id, an event name, an entity id: whatever a sender chose) are escaped by
//! [`escape_control`], so no sender can move the cursor, recolour a terminal or forge a line.
//! JSON lines are escaped by JSON itself.

use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::sync::OnceLock;
use std::time::Duration;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::MakeExt as _;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

use crate::text::escape_control;

use super::log_writer::{Linger, LogWriter};

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// How long a relay's or server's log thread lets lines gather before writing them, when stderr
/// is not a terminal (journald, a file, a pipe): one wake per 25 ms at most while lines keep
/// coming, instead of one per line. On a terminal, and for commands, lines are written as they
/// come.
const LINGER: Duration = Duration::from_millis(25);

/// The target of the warning that lines were dropped: always on (at WARN), whatever the filter
/// says of the rest, or a gap in the log would go unexplained.
const DROPPED_TARGET: &str = "smee_relay::log_dropped";

/// The log thread, kept to write out its queue at exit ([`flush`]).
static WRITER: OnceLock<LogWriter<std::io::Stderr>> = OnceLock::new();

/// Whether stderr goes to systemd's journal (`JOURNAL_STREAM` set): lines then carry their
/// priority, not a timestamp.
pub fn under_journal() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some()
}

/// Install the global subscriber. `verbosity` is the count of `-v` minus the count of `-q`;
/// `RUST_LOG`, when set, overrides it. `daemon`: a relay or server, whose lines may be batched
/// ([`LINGER`]); a command's lines are written as they come. Call [`flush`] before the process
/// ends.
pub fn init(verbosity: i8, format: LogFormat, daemon: bool) {
    let filter = filter(verbosity, std::env::var("RUST_LOG").ok().as_deref());
    let journal = under_journal();
    let terminal = std::io::stderr().is_terminal();
    let linger = Linger(if daemon && !terminal {
        LINGER
    } else {
        Duration::ZERO
    });
    let writer = match WRITER.get() {
        Some(writer) => writer.clone(),
        None => match LogWriter::start(std::io::stderr(), linger, |dropped| {
            tracing::warn!(
                target: DROPPED_TARGET,
                "{dropped} log line{} dropped here: the log queue was full (stderr is read \
                 more slowly than lines come)",
                if dropped == 1 { "" } else { "s" }
            );
        }) {
            Ok(writer) => WRITER.get_or_init(|| writer).clone(),
            Err(e) => {
                // No thread (a limit on threads or memory): nothing will be logged; say so once.
                use std::io::Write as _;
                let _ = writeln!(
                    std::io::stderr(),
                    "smee-relay: no logging: cannot start the log thread: {e}"
                );
                return;
            }
        },
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .log_internal_errors(false)
        .with_timer(Clock)
        .with_target(false)
        .with_ansi(!journal && terminal && std::env::var_os("NO_COLOR").is_none());
    let fields = || {
        tracing_subscriber::fmt::format::debug_fn(|writer, field, value| {
            if field.name() != "message" {
                write!(writer, "{}=", field.name())?;
            }
            write!(Escaping(writer), "{value:?}")
        })
        .delimited(" ")
    };
    match (format, journal) {
        (LogFormat::Json, _) => builder.json().init(),
        (LogFormat::Text, true) => builder
            .fmt_fields(fields())
            .event_format(JournalFormat)
            .init(),
        (LogFormat::Text, false) => builder.fmt_fields(fields()).init(),
    }
}

/// What is logged: `RUST_LOG` (`rust_log`) when set and valid, else the level `verbosity` gives
/// our lines (and eventsource-client's only errors unless `-v`); async-nats never below INFO;
/// the dropped-lines warning always.
fn filter(verbosity: i8, rust_log: Option<&str>) -> EnvFilter {
    let ours = match verbosity {
        i8::MIN..=-2 => "error",
        -1 => "warn",
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    // async-nats logs its server addresses (with a URL's userinfo) and connection details at
    // DEBUG: whatever -v or RUST_LOG say, it never logs below INFO.
    // eventsource-client warns of each failed connection attempt, which the source says in its
    // own words (and with the channel's name) a line later: by default, only its errors.
    let default = format!(
        "{base},smee_relay={ours},async_nats={base_nats},eventsource_client={base_sse}",
        base = if verbosity > 1 { "debug" } else { "warn" },
        base_nats = if verbosity > 1 { "info" } else { "warn" },
        base_sse = if verbosity > 0 { "info" } else { "error" },
    );
    match rust_log.map(EnvFilter::try_new) {
        Some(Ok(from_env)) => from_env.add_directive(
            "async_nats=info"
                .parse()
                .expect("a constant, valid directive"),
        ),
        _ => EnvFilter::new(default),
    }
    .add_directive(
        format!("{DROPPED_TARGET}=warn")
            .parse()
            .expect("a constant, valid directive"),
    )
}

/// Say panics in the log, in its format, rather than raw on stderr beside it (`--log-format
/// json` stays one object a line): redb panics on a damaged page, which the spool catches
/// and reports as damage, and a task's panic is reported by what watches it. With
/// `RUST_BACKTRACE` set, the backtrace follows. A panic of the main thread ends the process:
/// its line is written out first.
pub fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let what = info
            .payload_as_str()
            .unwrap_or("(a panic without a message)");
        let at = info
            .location()
            .map_or_else(String::new, |at| format!(" at {at}"));
        let trace = std::backtrace::Backtrace::capture();
        let trace = match trace.status() {
            std::backtrace::BacktraceStatus::Captured => format!("\n{trace}"),
            _ => String::new(),
        };
        tracing::error!(
            "thread '{}' panicked{at}: {what}{trace}",
            thread.name().unwrap_or("unnamed")
        );
        if thread.name() == Some("main") {
            flush();
        }
    }));
}

/// Write out the lines still queued (waiting a second at most for a stalled stderr), before the
/// process ends or writes to stderr itself. Lines logged afterwards are written at once.
pub fn flush() {
    if let Some(writer) = WRITER.get() {
        writer.close();
    }
}

/// End the process now with `code`, after writing out the queued log lines.
pub fn exit(code: i32) -> ! {
    flush();
    std::process::exit(code)
}

/// The time at the start of a line: tracing-subscriber's own `SystemTime` text
/// (`2026-12-03T08:27:11.123456Z`, UTC, microseconds), written by humantime from digits rather
/// than through `fmt` field by field, which cost about 2,500 instructions a line: half of a
/// delivery line's cost, once per event (BENCHMARKS.md, "Issue 19, eighteenth session").
struct Clock;

impl tracing_subscriber::fmt::time::FormatTime for Clock {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        write_time(w, std::time::SystemTime::now())
    }
}

fn write_time(w: &mut impl std::fmt::Write, at: std::time::SystemTime) -> std::fmt::Result {
    write!(w, "{}", humantime::format_rfc3339_micros(at))
}

/// Writes text through [`escape_control`] as it is formatted, with no copy of the whole value.
/// Formatting hands over whole `str`s, so no character is split between two calls.
struct Escaping<'a, 'w>(&'a mut Writer<'w>);

impl std::fmt::Write for Escaping<'_, '_> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        self.0.write_str(&escape_control(text))
    }
}

/// Text lines for journald: `<priority>message fields`, no timestamp, no level word.
#[derive(Default)]
struct JournalFormat;

impl<S, N> FormatEvent<S, N> for JournalFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            _ => 7,
        };
        write!(writer, "<{priority}>")?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                if let Some(fields) = span.extensions().get::<FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    write!(writer, "{}: ", fields)?;
                }
            }
        }
        ctx.format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::fmt::time::FormatTime as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    #[test]
    fn lines_carry_the_same_time_text_as_tracing_subscribers_own_clock() {
        let at = std::time::UNIX_EPOCH + Duration::from_micros(1_796_286_431_000_042);
        let mut text = String::new();
        write_time(&mut text, at).unwrap();
        assert_eq!(text, "2026-12-03T08:27:11.000042Z");
        // The shape of what the default clock writes, at nearly the same moment.
        let (mut ours, mut theirs) = (String::new(), String::new());
        Clock.format_time(&mut Writer::new(&mut ours)).unwrap();
        tracing_subscriber::fmt::time::SystemTime
            .format_time(&mut Writer::new(&mut theirs))
            .unwrap();
        let shape = |s: &str| s.replace(|c: char| c.is_ascii_digit(), "0");
        assert_eq!(shape(&ours), shape(&theirs));
    }

    #[test]
    fn regression_the_dropped_lines_warning_was_filtered_out_with_the_rest() {
        // RUST_LOG naming one module (or -qq) filtered the warning out: a gap with no word.
        for (verbosity, rust_log) in [
            (0, Some("smee_relay::delivery=info")),
            (-2, None),
            (0, Some("error")),
            (0, None),
        ] {
            let subscriber = tracing_subscriber::registry().with(filter(verbosity, rust_log));
            tracing::subscriber::with_default(subscriber, || {
                assert!(
                    tracing::enabled!(target: DROPPED_TARGET, Level::WARN),
                    "filtered out with {verbosity} and {rust_log:?}"
                );
            });
        }
        // The rest still obeys the filter.
        let subscriber = tracing_subscriber::registry().with(filter(-2, None));
        tracing::subscriber::with_default(subscriber, || {
            assert!(!tracing::enabled!(target: "smee_relay::delivery", Level::WARN));
        });
    }

    /// A new user saw two WARN lines for each failed reconnect: eventsource-client's (with the
    /// path of the crate's source on the build machine) and the source's own.
    #[test]
    fn regression_each_failed_reconnect_was_warned_twice() {
        let subscriber = tracing_subscriber::registry().with(filter(0, None));
        tracing::subscriber::with_default(subscriber, || {
            assert!(!tracing::enabled!(target: "eventsource_client::client", Level::WARN));
            assert!(tracing::enabled!(target: "eventsource_client::client", Level::ERROR));
            assert!(tracing::enabled!(target: "smee_relay::source", Level::WARN));
        });
        let subscriber = tracing_subscriber::registry().with(filter(1, None));
        tracing::subscriber::with_default(subscriber, || {
            assert!(tracing::enabled!(target: "eventsource_client::client", Level::INFO));
        });
    }
}
