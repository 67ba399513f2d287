//! Process lifecycle: signals become a cancellation that every task watches, and systemd hears
//! how the service is doing (`sd_notify`: READY, STATUS, WATCHDOG, RELOADING, STOPPING).
//!
//! The first SIGINT or SIGTERM asks for a graceful stop (deliveries in flight may finish); a
//! second one means "now" and exits at once, as users expect from Ctrl-C pressed twice.
//! Without `NOTIFY_SOCKET` (not under systemd) every notification is a no-op.
//!
//! SIGHUP never kills a long-running mode: `run` reloads its config ([`reload_requests`]);
//! a mode with nothing to reload says so and goes on ([`ignore_hangups`]). The demo, which
//! belongs to its terminal, stops on it (`Stops::hangup`).

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Exit code for a stop forced by a second signal (128 + SIGINT, as shells report it).
const FORCED_EXIT: i32 = 130;

/// Cancel `cancel` on the first SIGINT/SIGTERM; exit the process on the second.
pub fn cancel_on_signals(cancel: CancellationToken) -> std::io::Result<()> {
    stop_on(cancel, Stops::default())
}

/// Besides SIGINT and SIGTERM, what stops a process ([`stop_on`]), and what it must do before a
/// second signal's exit at once: the demo's.
#[derive(Default)]
pub(crate) struct Stops {
    /// SIGHUP stops it too: a process the terminal owns, with nothing to reload (`demo`), so
    /// that closing the terminal stops it as Ctrl-C does.
    pub(crate) hangup: bool,
    /// Run before a second signal's exit (no destructor runs then): what a stop would have
    /// removed, such as the demo's state directory.
    pub(crate) before_forced_exit: Option<Box<dyn FnOnce() + Send>>,
}

/// Cancel `cancel` on the first of the `stops` signals; on the second, run its
/// `before_forced_exit` and exit the process.
pub(crate) fn stop_on(cancel: CancellationToken, stops: Stops) -> std::io::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = if stops.hangup {
        Some(signal(SignalKind::hangup())?)
    } else {
        None
    };
    let mut before_forced_exit = stops.before_forced_exit;
    tokio::spawn(async move {
        for round in 0.. {
            let name = tokio::select! {
                _ = interrupt.recv() => "SIGINT",
                _ = terminate.recv() => "SIGTERM",
                Some(()) = async { hangup.as_mut()?.recv().await } => "SIGHUP",
            };
            if round == 0 {
                info!(signal = name, "shutting down");
                notify(&[sd_notify::NotifyState::Stopping]);
                cancel.cancel();
            } else {
                warn!(signal = name, "second signal: exiting now");
                if let Some(before) = before_forced_exit.take() {
                    before();
                }
                super::logging::exit(FORCED_EXIT);
            }
        }
    });
    Ok(())
}

/// Whether this runs under systemd (or anything else that listens on `NOTIFY_SOCKET`).
pub(crate) fn notifying() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
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
