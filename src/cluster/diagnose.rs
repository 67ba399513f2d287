//! What NATS trouble means for the user: the hint that goes with an error joining the cluster
//! (what to check, chosen from what NATS said, never a guess that sends the user the wrong
//! way), and the pace of repeated client errors in the log during an outage.
//!
//! It only reads errors and decides words and whether to log; it does not connect, retry or
//! change the cluster's state (that is `cluster`'s).

use std::time::{Duration, Instant};

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::CreateStreamErrorKind;
use async_nats::{ConnectError, ConnectErrorKind};

/// The hint for a failed connect, from its kind: "is nats-server running" only when nothing
/// answered (refused, unreachable, timed out); a bad URL, a name that does not resolve or
/// refused credentials each say what to check instead.
pub(super) fn connect_hint(e: &ConnectError) -> &'static str {
    use std::io::ErrorKind as Io;
    const NOT_THERE: &str = " (is nats-server running with -js, and reachable?)";
    match e.kind() {
        ConnectErrorKind::TimedOut => NOT_THERE,
        ConnectErrorKind::Io => {
            let io = std::error::Error::source(e).and_then(|s| s.downcast_ref::<std::io::Error>());
            match io.map(std::io::Error::kind) {
                Some(
                    Io::ConnectionRefused
                    | Io::TimedOut
                    | Io::HostUnreachable
                    | Io::NetworkUnreachable
                    | Io::ConnectionReset
                    | Io::ConnectionAborted,
                ) => NOT_THERE,
                _ => "",
            }
        }
        ConnectErrorKind::ServerParse => {
            " (the URL: nats://HOST:PORT, tls://, ws:// or wss://; comma-separate several)"
        }
        ConnectErrorKind::Dns => " (is the host name right, and resolvable from here?)",
        ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
            " (check credentials_file, or the user and password in the URL)"
        }
        ConnectErrorKind::Tls => {
            " (for tls://, ca_file must name the CA that signed the server's certificate)"
        }
        ConnectErrorKind::MaxReconnects => "",
    }
}

/// The hint for a stream that could not be created: about replicas when NATS refused the
/// replica count (a single server, or fewer JetStream servers than replicas), about `-js` only
/// when JetStream did not answer at all.
pub(super) fn stream_hint(kind: &CreateStreamErrorKind, replicas: usize) -> String {
    match kind {
        CreateStreamErrorKind::JetStreamUnavailable => {
            " (is JetStream enabled on the server: -js?)".into()
        }
        CreateStreamErrorKind::JetStream(e) if is_about_replicas(e.error_code(), replicas) => {
            replicas_hint(replicas)
        }
        _ => String::new(),
    }
}

/// The hint for a KV bucket that could not be created, from the text of its causes (the
/// bucket's error kinds do not carry NATS's code).
pub(super) fn bucket_hint(e: &dyn std::error::Error, replicas: usize) -> String {
    let text = crate::error::chain(e);
    let codes = [
        ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED,
        ErrorCode::INSUFFICIENT_RESOURCES,
    ];
    if replicas > 1
        && codes
            .iter()
            .any(|c| text.contains(&format!("error code {}", c.0)))
    {
        replicas_hint(replicas)
    } else {
        String::new()
    }
}

fn is_about_replicas(code: ErrorCode, replicas: usize) -> bool {
    code == ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED
        || (replicas > 1 && code == ErrorCode::INSUFFICIENT_RESOURCES)
}

fn replicas_hint(replicas: usize) -> String {
    format!(
        " ([cluster] replicas = {replicas} needs a NATS cluster of at least {replicas} JetStream \
         servers; against a single server set replicas = 1)"
    )
}

/// How often a client error that keeps coming back is logged again.
pub(super) const REPEAT_EVERY: Duration = Duration::from_secs(60);

/// Repeated NATS client errors, logged once and then at most once per [`REPEAT_EVERY`] with a
/// count: during an outage the client retries every few seconds, each failure the same line.
#[derive(Debug, Default)]
pub(super) struct Repeats {
    /// The error last logged, and when: a different one is logged at once.
    last: Option<(String, Instant)>,
    /// Times `last` came again since it was logged (not logged).
    unlogged: u64,
}

impl Repeats {
    /// The line to log for `error` seen at `now`, if any: the first of a kind as it is, then
    /// one a minute saying how many times it came.
    pub(super) fn note(&mut self, error: &str, now: Instant) -> Option<String> {
        match &mut self.last {
            Some((text, at)) if text == error => {
                self.unlogged += 1;
                if now.duration_since(*at) < REPEAT_EVERY {
                    return None;
                }
                let line = format!(
                    "{error} (again, {} in the last {})",
                    count(self.unlogged),
                    humantime::format_duration(Duration::from_secs(
                        now.duration_since(*at).as_secs()
                    ))
                );
                *at = now;
                self.unlogged = 0;
                Some(line)
            }
            _ => {
                self.last = Some((error.to_string(), now));
                self.unlogged = 0;
                Some(error.to_string())
            }
        }
    }

    /// The connection is back: the next outage's first error is news again.
    pub(super) fn reset(&mut self) {
        *self = Repeats::default();
    }
}

/// The other warnings an outage repeats (a publish timing out, a consumer missing its
/// heartbeats, the alert states unreadable), each paced as the client's errors: per `what`
/// (the warning and whose it is, so that routes do not reset each other), the first at once,
/// then at most one a minute with a count. Process-wide, as the log is; the connection coming
/// back ([`calm`]) makes the next outage's first warning news again.
static PACED: std::sync::Mutex<Option<std::collections::HashMap<String, Repeats>>> =
    std::sync::Mutex::new(None);

/// The line to log for warning `what` saying `line` now, if any (see [`PACED`]).
pub fn paced(what: &str, line: &str) -> Option<String> {
    let mut paced = PACED.lock().unwrap_or_else(|p| p.into_inner());
    paced
        .get_or_insert_with(Default::default)
        .entry(what.to_string())
        .or_default()
        .note(line, Instant::now())
}

/// NATS is back: every paced warning is news again.
pub(super) fn calm() {
    *PACED.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

fn count(n: u64) -> String {
    if n == 1 {
        "1 time".into()
    } else {
        format!("{n} times")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An outage logged `NATS: client error: nats: IO error` every 2 s: now the first, then one
    /// line a minute with how many were not logged.
    #[test]
    fn regression_a_nats_outage_logs_the_same_client_error_every_2_s() {
        let start = Instant::now();
        let mut repeats = Repeats::default();
        let error = "client error: nats: IO error";
        let logged: Vec<String> = (0..90)
            .filter_map(|n| repeats.note(error, start + Duration::from_secs(2 * n)))
            .collect();
        // 0 s, 60 s, 120 s: three lines for three minutes, not ninety.
        assert_eq!(
            logged,
            [
                error.to_string(),
                format!("{error} (again, 30 times in the last 1m)"),
                format!("{error} (again, 30 times in the last 1m)"),
            ]
        );
        // Another error is news at once; so is the same one after the connection came back.
        let later = start + Duration::from_secs(200);
        assert_eq!(repeats.note("other", later).as_deref(), Some("other"));
        assert_eq!(repeats.note(error, later).as_deref(), Some(error));
        repeats.reset();
        assert_eq!(repeats.note(error, later).as_deref(), Some(error));
    }

    /// `replicas = 3` against one server said "is JetStream enabled on the server: -js?";
    /// an invalid URL said "is nats-server running". Each now says what NATS meant.
    #[test]
    fn regression_misleading_hints_for_replicas_and_bad_urls() {
        use async_nats::jetstream::Error as JsError;
        let refused: JsError = serde_json::from_value(serde_json::json!({
            "code": 500,
            "err_code": 10074,
            "description": "replicas > 1 not supported in non-clustered mode"
        }))
        .unwrap();
        let hint = stream_hint(&CreateStreamErrorKind::JetStream(refused), 3);
        assert!(
            hint.contains("replicas = 3 needs a NATS cluster of at least 3"),
            "{hint}"
        );
        assert!(!hint.contains("-js"), "{hint}");
        let hint = stream_hint(&CreateStreamErrorKind::JetStreamUnavailable, 1);
        assert!(hint.contains("-js"), "{hint}");

        let bad_url = ConnectError::new(ConnectErrorKind::ServerParse);
        assert!(!connect_hint(&bad_url).contains("running"));
        let refused = ConnectError::with_source(
            ConnectErrorKind::Io,
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        );
        assert!(connect_hint(&refused).contains("is nats-server running"));
        let denied = ConnectError::new(ConnectErrorKind::AuthorizationViolation);
        assert!(connect_hint(&denied).contains("credentials_file"));
    }
}
