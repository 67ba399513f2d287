//! The `smee-relay` binary: parse the command line, set up logging, run, and map the outcome to
//! an exit code (0 success, 1 runtime failure, 2 usage or config error).

use std::process::ExitCode;

use clap::Parser as _;

use smee_relay::cli::{Cli, Command};
use smee_relay::config::ConfigError;
use smee_relay::service::logging;

const USAGE_ERROR: u8 = 2;

fn main() -> ExitCode {
    smee_relay::memory::return_large_buffers();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
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
    logging::init(cli.verbosity() - quieter, cli.log_format);

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
    match runtime.block_on(smee_relay::commands::run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<ConfigError>().is_some() => {
            eprintln!("{e}");
            ExitCode::from(USAGE_ERROR)
        }
        Err(e) if needs_the_user(&e) => {
            tracing::error!("{e:#}");
            ExitCode::from(USAGE_ERROR)
        }
        Err(e) => {
            // The whole chain on one line: `delivering to ...: connection refused (os error 111)`.
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A damaged spool, or a channel or pipeline another relay holds: nothing to retry, the user
/// must act (exit 2).
fn needs_the_user(e: &anyhow::Error) -> bool {
    use smee_relay::service::daemon::DaemonError;
    use smee_relay::spool::SpoolError;
    e.chain().any(|cause| {
        let spool = cause.downcast_ref::<SpoolError>().or_else(|| {
            match cause.downcast_ref::<DaemonError>() {
                Some(DaemonError::Spool(e)) => Some(e),
                _ => None,
            }
        });
        spool.is_some_and(SpoolError::needs_the_user)
    })
}
