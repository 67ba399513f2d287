//! The `smee-relay` binary: parse the command line, set up logging, run, and map the outcome to
//! an exit code (0 success, 1 runtime failure, 2 usage or config error).

use std::process::ExitCode;

use smee_relay::cli::{Command, Invocation};
use smee_relay::config::ConfigError;
use smee_relay::service::logging;

const USAGE_ERROR: u8 = 2;

fn main() -> ExitCode {
    smee_relay::memory::return_large_buffers();
    // As `smee`, smee-client's command line; `smee-relay -u … -t …` is `forward`.
    let cli = match smee_relay::cli::parse(std::env::args_os()) {
        Ok(Invocation::Run(cli)) => cli,
        Ok(Invocation::Print(text)) => {
            print!("{text}");
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
        Err(e) => {
            // The whole chain on one line: `delivering to ...: connection refused (os error 111)`.
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
