//! Process lifecycle: signals become a cancellation that every task watches, and systemd hears
//! how the service is doing (`sd_notify`: READY, STATUS, WATCHDOG, RELOADING, STOPPING).
//!
//! The first SIGINT or SIGTERM asks for a graceful stop (deliveries in flight may finish); a
//! second one means "now" and exits at once, as users expect from Ctrl-C pressed twice.
//! Without `NOTIFY_SOCKET` (not under systemd) every notification is a no-op.
//!
//! SIGHUP never kills a long-running mode: `run` reloads its config and `forward` retries
//! now what waits ([`reload_requests`]). The demo, which belongs to its terminal, stops on it
//! (`Stops::hangup`).

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

/// Set the status line `systemctl status` shows. It quotes what others sent (a target's
/// error body): each newline would start a notify field of its own (`WATCHDOG=trigger`,
/// `STOPPING=1`: helper-110), so control characters go, each as a space.
pub fn status(line: &str) {
    let line = one_line(line);
    notify(&[sd_notify::NotifyState::Status(&line)]);
}

/// `text` without control characters (each a space): one notify field's value.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
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

/// How SIGHUP was set up when the program started (its action, and whether it was blocked),
/// for [`release_hangups`] to put back.
static STARTED_WITH: std::sync::Mutex<Option<(libc::sigaction, bool)>> =
    std::sync::Mutex::new(None);

/// Hold off SIGHUP from before `main` until the command installs its own handler: a reload
/// sent as a daemon starts (`systemctl reload` right after `start`, a supervisor's HUP) ended
/// it, exit 129. The window left is the dynamic loader's, before any of this program runs.
///
/// A handler that does nothing, not `SIG_IGN`: a handler is reset to the default in the
/// programs this one starts (action handlers, the jq worker), where `SIG_IGN` would be
/// inherited. SIGHUP is also unblocked: a daemon started with it blocked would never reload. A
/// hangup held off is not a reload (the config is read after it anyway). Commands that do not
/// take SIGHUP call [`release_hangups`].
pub fn hold_hangups() {
    extern "C" fn nothing(_: libc::c_int) {}
    // SAFETY: plain sigaction/sigprocmask calls on one signal, before any other thread exists;
    // the handler does nothing, so it is async-signal-safe.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = nothing as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        let mut previous: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGHUP, &action, &mut previous);
        let mut mask: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &hangup_set(), &mut mask);
        let blocked = libc::sigismember(&mask, libc::SIGHUP) == 1;
        if let Ok(mut started) = STARTED_WITH.lock() {
            *started = Some((previous, blocked));
        }
    }
}

/// A signal set of SIGHUP alone, to block or unblock it.
fn hangup_set() -> libc::sigset_t {
    // SAFETY: a zeroed sigset_t is valid storage; sigemptyset initialises it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// SIGHUP as the program started with it ([`hold_hangups`]): for a command-line tool, the
/// default (it ends the process), or ignored under `nohup`.
pub fn release_hangups() {
    let Some((previous, blocked)) = STARTED_WITH.lock().ok().and_then(|mut s| s.take()) else {
        return;
    };
    // SAFETY: puts back the action and mask this process started with, for one signal.
    unsafe {
        libc::sigaction(libc::SIGHUP, &previous, std::ptr::null_mut());
        if blocked {
            libc::pthread_sigmask(libc::SIG_BLOCK, &hangup_set(), std::ptr::null_mut());
        }
    }
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
