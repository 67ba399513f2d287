//! Process lifecycle: signals become a cancellation that every task watches, and systemd hears
//! how the service is doing (`sd_notify`: READY, STATUS, WATCHDOG, RELOADING, STOPPING).
//!
//! The first SIGINT or SIGTERM asks for a graceful stop (deliveries in flight may finish); a
//! second one means "now" and exits at once, as users expect from Ctrl-C pressed twice.
//! Without `NOTIFY_SOCKET` (not under systemd) every notification is a no-op.
//!
//! SIGHUP never kills a long-running mode: `run` reloads its config ([`reload_requests`]);
//! a mode with nothing to reload says so and goes on ([`ignore_hangups`]).

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
                notify(&[sd_notify::NotifyState::Stopping]);
                cancel.cancel();
            } else {
                warn!(signal = name, "second signal: exiting now");
                super::logging::exit(FORCED_EXIT);
            }
        }
    });
    Ok(())
}

/// Tell systemd something; failures are logged, never fatal.
pub fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!("cannot notify systemd: {e}");
    }
}

/// Ping the systemd watchdog at half its interval for as long as this task runs. It runs on
/// the event loop, so a stuck loop stops the pings and systemd restarts the service.
pub fn spawn_watchdog(cancel: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval / 2);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ticks.tick() => notify(&[sd_notify::NotifyState::Watchdog]),
            }
        }
    });
}

/// Take SIGHUP (whose default action ends the process, exit 129) and only log it: for modes
/// with no config file to reload. `mode` names the command in the line.
pub fn ignore_hangups(mode: &'static str) -> std::io::Result<()> {
    let mut hangup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            info!(
                "SIGHUP: `{mode}` has no config file to reload and logs to stderr; ignored, still running"
            );
        }
    });
    Ok(())
}

/// SIGHUP, as a stream of reload requests.
pub fn reload_requests() -> std::io::Result<tokio::sync::mpsc::Receiver<()>> {
    let mut hangup = signal(SignalKind::hangup())?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            let _ = tx.try_send(());
        }
    });
    Ok(rx)
}
