//! gosmee's `--saveDir` layout for stored events: for each, `<timestamp>.json` (the exact body)
//! and an executable `<timestamp>.sh` that replays it with curl. One writer serves
//! `events export --format gosmee` and `forward --save-dir` ([`SaveDir`]), so both write the
//! same files. It only writes files: it never changes the spool, and a failed write is the
//! caller's to report (for `--save-dir`, a warning; delivery never waits for it).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::warn;

use super::StoredEvent;
use crate::url::TargetUrl;

/// A file of the layout could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot {what} {}", .path.display())]
pub struct ExportError {
    /// `write`, `make executable`, `rename`, `create`.
    what: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// A receive time as RFC 3339 with milliseconds (UTC).
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// gosmee's layout: `<timestamp>.json` holds the exact body; `<timestamp>.sh` POSTs it with the
/// event's headers and query, to `target` or the script's first argument. The event id keeps
/// names unique when two events share a millisecond.
/// `by` names what wrote them, in the script's comment.
pub fn write_gosmee(
    dir: &Path,
    event: &StoredEvent,
    target: &TargetUrl,
    by: &str,
) -> Result<(), ExportError> {
    let stem = format!(
        "{}-{}",
        rfc3339(event.received_ms).replace(':', "-"),
        event.id
    );
    let failed = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| ExportError { what, path, source }
    };
    let json = dir.join(format!("{stem}.json"));
    std::fs::write(&json, &event.event.body).map_err(failed("write", &json))?;
    // Written whole and made executable under a hidden name, then renamed: whoever watches the
    // directory (or a test) never sees a script half written or not yet executable.
    let script = dir.join(format!("{stem}.sh"));
    let partial = dir.join(format!(".{stem}.sh.partial"));
    let written = std::fs::write(&partial, gosmee_script(event, &stem, target, by))
        .map_err(failed("write", &partial))
        .and_then(|()| {
            // Executable by whoever may read it, as `chmod +x` under the umask makes it
            // (a relay's own is 077: the script holds the target's query).
            use std::os::unix::fs::PermissionsExt as _;
            let made = std::fs::metadata(&partial).map_err(failed("make executable", &partial))?;
            let mode = made.permissions().mode();
            std::fs::set_permissions(
                &partial,
                std::fs::Permissions::from_mode(mode | ((mode & 0o444) >> 2)),
            )
            .map_err(failed("make executable", &partial))
        })
        .and_then(|()| std::fs::rename(&partial, &script).map_err(failed("rename", &partial)));
    if written.is_err() {
        // A full disk: no half-written file left behind.
        let _ = std::fs::remove_file(&partial);
    }
    written
}

fn gosmee_script(event: &StoredEvent, stem: &str, target: &TargetUrl, by: &str) -> String {
    // The query exactly as forwarding appends it (the target's own query has none here).
    let query = match "http://x/".parse::<TargetUrl>() {
        Ok(base) => base
            .with_query(&event.event.query)
            .query()
            .unwrap_or("")
            .to_string(),
        Err(_) => String::new(),
    };
    let mut out = String::new();
    let _ = writeln!(out, "#!/usr/bin/env bash");
    let _ = writeln!(
        out,
        "# Event {} received {} from {} ({by}).",
        event.id,
        rfc3339(event.received_ms),
        event.channel
    );
    if target.has_password() {
        // The password is never written to disk; the URL as shown (`user:***@`) would be
        // refused. The script asks for the URL.
        let _ = writeln!(out, "# Usage: ./{stem}.sh TARGET_URL");
        let _ = writeln!(out, "set -euo pipefail");
        let _ = writeln!(
            out,
            "target=${{1:?{}}}",
            quote(&format!(
                "give the target URL with its password ({target}; the password is not saved here)"
            ))
        );
    } else {
        let _ = writeln!(out, "# Usage: ./{stem}.sh [TARGET_URL]");
        let _ = writeln!(out, "set -euo pipefail");
        let _ = writeln!(out, "target=${{1:-{}}}", quote(&target.to_string()));
    }
    let _ = writeln!(out, "cd \"$(dirname \"$0\")\"");
    let _ = write!(out, "exec curl -sS --fail-with-body -X POST");
    if query.is_empty() {
        let _ = write!(out, " \"$target\"");
    } else {
        let _ = write!(out, " \"$target\"{}", quote(&format!("?{query}")));
    }
    // As delivery does: a target with credentials gets them as `Authorization`, in place of
    // the sender's (curl sends the URL's; an explicit header would win over them).
    let replaced = target.authorization().is_some();
    for (name, value) in &event.event.headers {
        if replaced && name.eq_ignore_ascii_case("authorization") {
            continue;
        }
        let _ = write!(out, " \\\n  -H {}", quote(&format!("{name}: {value}")));
    }
    let _ = writeln!(
        out,
        " \\\n  --data-binary @{}",
        quote(&format!("{stem}.json"))
    );
    out
}

/// `text` as one single-quoted shell word.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// How many received events may wait for their files; past that, an event is not saved (it is
/// in the spool all the same: `events export` writes it later) rather than slow the intake.
const SAVE_QUEUE: usize = 1024;

/// `forward --save-dir`: writes each received event in gosmee's layout, on a thread of its own.
/// Delivery never waits for it: a full queue or a failed write is a warning (once until
/// writes succeed again), and the event is delivered all the same.
#[derive(Clone, Debug)]
pub struct SaveDir {
    /// Events to write, in order of arrival.
    queue: mpsc::Sender<StoredEvent>,
    /// Whether the queue was full at the last offer: warned once per such stretch.
    behind: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SaveDir {
    /// Start the writer for `dir` (created if missing; a failure is warned, and each write
    /// tries again). `target` is where the scripts POST by default.
    pub fn start(dir: PathBuf, target: TargetUrl) -> SaveDir {
        let (queue, mut events) = mpsc::channel::<StoredEvent>(SAVE_QUEUE);
        tokio::task::spawn_blocking(move || {
            // Warn once per failing stretch, not once per event.
            let mut failing = false;
            while let Some(event) = events.blocking_recv() {
                let written = std::fs::create_dir_all(&dir)
                    .map_err(|source| ExportError {
                        what: "create",
                        path: dir.clone(),
                        source,
                    })
                    .and_then(|()| {
                        write_gosmee(&dir, &event, &target, "smee-relay forward --save-dir")
                    });
                match written {
                    Ok(()) if failing => {
                        failing = false;
                        warn!(dir = %dir.display(), "--save-dir: writing events works again");
                    }
                    Ok(()) => {}
                    Err(e) if !failing => {
                        failing = true;
                        warn!(
                            event = event.id,
                            "--save-dir: {}; the event is delivered all the same and stays in the spool (`smee-relay events export --format gosmee` writes it later); warned once until writes work again",
                            crate::error::chain(&e)
                        );
                    }
                    Err(_) => {}
                }
            }
        });
        SaveDir {
            queue,
            behind: Default::default(),
        }
    }

    /// Queue `event` for writing; never waits.
    pub fn offer(&self, event: StoredEvent) {
        use std::sync::atomic::Ordering;
        match self.queue.try_send(event) {
            Ok(()) => self.behind.store(false, Ordering::Relaxed),
            Err(mpsc::error::TrySendError::Full(event)) => {
                if !self.behind.swap(true, Ordering::Relaxed) {
                    warn!(
                        event = event.id,
                        "--save-dir: the writer is behind ({SAVE_QUEUE} events waiting); events are not saved until it catches up, but delivered all the same (warned once per stretch)"
                    );
                }
            }
            // The writer is gone (shutting down): nothing to save to.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (a new user's finding): for a target with a password, the saved script's
    /// default target was the URL as shown, `user:***@host`: curl sent `***` as the password
    /// and the replay failed with a 401. The password is never written; the script asks for
    /// the URL instead, and says why.
    #[test]
    fn regression_a_saved_script_for_a_target_with_a_password_asks_for_the_url() {
        let event = StoredEvent {
            id: 7,
            received_ms: 0,
            channel: "https://smee.io/AbCd…".into(),
            event: crate::event::Event {
                sse_id: None,
                timestamp_ms: None,
                headers: vec![("authorization".into(), "token xyz".into())],
                query: vec![],
                body: bytes::Bytes::from_static(b"{}"),
            },
        };
        let secret: TargetUrl = "http://bob:hunter2@127.0.0.1:4000/hook".parse().unwrap();
        let script = gosmee_script(&event, "e7", &secret, "test");
        assert!(
            !script.contains("hunter2") && !script.contains("${1:-"),
            "{script}"
        );
        assert!(
            script.contains("target=${1:?") && script.contains("password is not saved"),
            "{script}"
        );
        // Regression (a new user's finding): the sender's `authorization` stayed in the
        // script, and curl sent it instead of the target's credentials (delivery replaces it).
        assert!(!script.contains("token xyz"), "{script}");
        let plain: TargetUrl = "http://127.0.0.1:4000/hook".parse().unwrap();
        let script = gosmee_script(&event, "e7", &plain, "test");
        assert!(
            script.contains("target=${1:-'http://127.0.0.1:4000/hook'}"),
            "{script}"
        );
    }
}
