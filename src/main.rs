//! The `smee-relay` binary: parse the command line, set up logging, run, and map the outcome to
//! an exit code (0 success, 1 runtime failure, 2 usage or config error, 130 stopped by a signal).

use std::process::ExitCode;

use std::io::Write as _;

use smee_relay::cli::{Command, Invocation};
use smee_relay::config::ConfigError;
use smee_relay::service::logging;

const USAGE_ERROR: u8 = 2;

/// A command stopped by a signal before it ended (128 + SIGINT, as shells report Ctrl-C).
const STOPPED: u8 = 130;

/// The system allocator, with the byte budget only the jq worker sets (see pipeline::jq).
#[global_allocator]
static ALLOCATOR: smee_relay::pipeline::jq::BoundedAlloc = smee_relay::pipeline::jq::BoundedAlloc;

/// Before `main` and the runtime's start: a reload sent as a daemon starts must not end it.
#[used]
#[unsafe(link_section = ".init_array")]
static HOLD_HANGUPS: extern "C" fn() = {
    extern "C" fn hold() {
        smee_relay::service::systemd::hold_hangups();
    }
    hold
};

fn main() -> ExitCode {
    // The bounded jq worker the pipeline starts is this binary (see pipeline::jq).
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(smee_relay::pipeline::jq::WORKER_ARG) {
        smee_relay::service::systemd::release_hangups();
        return ExitCode::from(smee_relay::pipeline::jq::worker_main(&args[1..]) as u8);
    }
    smee_relay::memory::return_large_buffers();
    // As `smee`, smee-client's command line; `smee-relay -u … -t …` is `forward`.
    let cli = match smee_relay::cli::parse(std::env::args_os()) {
        Ok(Invocation::Run(cli)) => cli,
        Ok(Invocation::Print(text)) => {
            // Not print!: it panics when stdout is a closed pipe (`--help | head -1`).
            let mut stdout = std::io::stdout().lock();
            let _ = stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush());
            return ExitCode::SUCCESS;
        }
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(USAGE_ERROR);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    // The demo's output is its alerts: keep its logs to warnings unless asked.
    let quieter = i8::from(matches!(cli.command, Command::Demo(_)));
    let daemon = matches!(
        cli.command,
        Command::Forward(_) | Command::Run(_) | Command::Serve(_)
    );
    // The daemons take SIGHUP themselves; other commands (the demo too) end on it.
    if !daemon {
        smee_relay::service::systemd::release_hangups();
    } else {
        // What a relay or server writes (the spool: events and targets' queries; saved
        // events) is its owner's alone, in a directory that was already there too: as
        // systemd's unit has it (`UMask=0077`), handlers it starts included.
        // SAFETY: umask(2) only sets the process's file mode mask; it cannot fail.
        unsafe {
            libc::umask(0o077);
        }
    }
    // A command (not a daemon) with text logs says its failure as command-line tools do;
    // under the journal, as a line with its priority.
    let plain_errors =
        !daemon && matches!(cli.log_format, logging::LogFormat::Text) && !logging::under_journal();
    logging::init(cli.verbosity() - quieter, cli.log_format, daemon);
    logging::log_panics();

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(smee_relay::commands::run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        // Whoever read the output stopped (`smee-relay events export | head -1`): done, as
        // for other tools that write to a pipe; nothing to say, and nowhere to say it.
        Err(e) if broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<ConfigError>().is_some() => {
            // After the lines logged before it.
            logging::flush();
            // One line per problem, each said as an error (`error: c.toml:3: ...`). Not
            // eprintln!: it panics when stderr is a closed pipe.
            let lines: String = (e.to_string().lines())
                .map(|line| format!("error: {line}\n"))
                .collect();
            let _ = std::io::stderr().write_all(lines.as_bytes());
            ExitCode::from(USAGE_ERROR)
        }
        // Stopped by a signal before it ended: as a shell reports Ctrl-C.
        Err(e) if e.chain().any(|c| c.is::<smee_relay::error::Stopped>()) => {
            report(&e, plain_errors);
            ExitCode::from(STOPPED)
        }
        Err(e) if needs_the_user(&e) => {
            report(&e, plain_errors);
            ExitCode::from(USAGE_ERROR)
        }
        Err(e) => {
            report(&e, plain_errors);
            ExitCode::FAILURE
        }
    };
    logging::flush();
    code
}

/// Say why the run failed, the whole chain on one line (`delivering to ...: connection refused
/// (os error 111)`, each cause once: anyhow's `{:#}` repeats a cause its error's text already
/// holds). `plain`: `error: ...` on stderr, as a command-line tool says it; else a log line (a
/// daemon's, which journald files with its priority, or JSON asked for).
fn report(e: &anyhow::Error, plain: bool) {
    let text = smee_relay::error::chain(e.as_ref());
    if plain {
        // After the lines logged before it. Not eprintln!: it panics when stderr is a closed pipe.
        logging::flush();
        let _ = writeln!(std::io::stderr(), "error: {text}");
    } else {
        tracing::error!("{text}");
    }
}

/// Whether `e` is writing to stdout after its reader closed it. Only stdout's: a broken pipe
/// to a target or a server is a failure like any other.
fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<smee_relay::error::Stdout>()
            .is_some_and(smee_relay::error::Stdout::reader_left)
    })
}

/// A damaged spool, a channel or pipeline another relay holds, or `serve` unable to join its
/// NATS cluster: nothing to retry, the user must act (exit 2).
fn needs_the_user(e: &anyhow::Error) -> bool {
    use smee_relay::service::daemon::DaemonError;
    use smee_relay::spool::SpoolError;
    e.chain().any(|cause| {
        // A CA file that cannot be used, a `PORT` that is not a port: settings to fix.
        if cause.is::<smee_relay::http::TrustError>() || cause.is::<smee_relay::cli::TargetError>()
        {
            return true;
        }
        if cause
            .downcast_ref::<smee_relay::server::ServeError>()
            .is_some_and(smee_relay::server::ServeError::needs_the_user)
        {
            return true;
        }
        // NATS unreachable at start (or JetStream off): the user's to fix.
        if matches!(
            cause.downcast_ref::<DaemonError>(),
            Some(DaemonError::Cluster(_))
        ) {
            return true;
        }
        let spool = cause.downcast_ref::<SpoolError>().or_else(|| {
            match cause.downcast_ref::<DaemonError>() {
                Some(DaemonError::Spool(e)) => Some(e),
                _ => None,
            }
        });
        spool.is_some_and(SpoolError::needs_the_user)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every error with a broken pipe anywhere in its chain ended the process with success:
    /// a relay or `events replay --to` failing on a target's closed socket exited 0 (systemd's
    /// `Restart=on-failure` would not restart it). Only stdout's reader leaving is success.
    #[test]
    fn regression_a_broken_pipe_to_anything_but_stdout_was_taken_for_success() {
        let pipe = || std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        let target = anyhow::Error::from(pipe()).context("delivering to http://127.0.0.1:3000/");
        assert!(!broken_pipe(&target));
        let stdout = anyhow::Error::from(smee_relay::error::Stdout(pipe())).context("export");
        assert!(broken_pipe(&stdout));
        let full = anyhow::Error::from(smee_relay::error::Stdout(std::io::Error::from(
            std::io::ErrorKind::StorageFull,
        )));
        assert!(!broken_pipe(&full));
        assert_eq!(
            smee_relay::error::chain(full.as_ref()),
            "cannot write to standard output: no storage space"
        );
    }
}
