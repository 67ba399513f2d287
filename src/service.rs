//! Process lifecycle: signals become a cancellation that every task watches.
//!
//! The first SIGINT or SIGTERM asks for a graceful stop (deliveries in flight may finish); a
//! second one means "now" and exits at once, as users expect from Ctrl-C pressed twice.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Exit code for a stop forced by a second signal (128 + SIGINT, as shells report it).
const FORCED_EXIT: i32 = 130;

/// Cancel `cancel` on the first SIGINT/SIGTERM; exit the process on the second.
pub fn cancel_on_signals(cancel: CancellationToken) -> std::io::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        for round in 0.. {
            let name = tokio::select! {
                _ = interrupt.recv() => "SIGINT",
                _ = terminate.recv() => "SIGTERM",
            };
            if round == 0 {
                info!(signal = name, "shutting down");
                cancel.cancel();
            } else {
                warn!(signal = name, "second signal: exiting now");
                std::process::exit(FORCED_EXIT);
            }
        }
    });
    Ok(())
}
