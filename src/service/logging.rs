//! Logs: `tracing` lines on stderr, as text or JSON.
//!
//! Logs go to stderr as text or JSON. Under systemd (`JOURNAL_STREAM` set) text lines carry no
//! colour and no timestamp (journald adds its own) and start with a syslog priority (`<3>` for
//! errors, `<4>` warnings, `<6>` info, `<7>` debug), so `journalctl -p err` works.

use std::io::IsTerminal as _;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Install the global subscriber. `verbosity` is the count of `-v` minus the count of `-q`;
/// `RUST_LOG`, when set, overrides it.
pub fn init(verbosity: i8, format: LogFormat) {
    let ours = match verbosity {
        i8::MIN..=-2 => "error",
        -1 => "warn",
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let default = format!(
        "{},smee_relay={ours}",
        if verbosity > 1 { "debug" } else { "warn" }
    );
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(
            !journal && std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        );
    match (format, journal) {
        (LogFormat::Json, _) => builder.json().init(),
        (LogFormat::Text, true) => builder.event_format(JournalFormat).init(),
        (LogFormat::Text, false) => builder.init(),
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
