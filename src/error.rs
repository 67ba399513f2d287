//! Errors as people read them: one line with every cause, outermost first.

/// An error and its causes on one line, e.g. `cannot reach http://127.0.0.1:3000/hook: error
/// sending request: connection refused (os error 111)`. reqwest's own message alone is often
/// just "error sending request"; a cause already contained in the line is not repeated.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Whether `error` or one of its causes is the file system saying it is full (`ENOSPC`, or a
/// quota: `EDQUOT`).
pub fn disk_full(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        // redb's error holds the I/O error without giving it as its source.
        let io = match error.downcast_ref::<redb::Error>() {
            Some(redb::Error::Io(io)) => Some(io),
            _ => error.downcast_ref::<std::io::Error>(),
        };
        if io.is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            )
        }) {
            return true;
        }
        cause = error.source();
    }
    false
}

/// `1 channel`, `2 channels`, `0 rules`: a count as a sentence says it ("1 attempts" read as a
/// slip in every message that printed one).
pub fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// A command stopped by a signal before it ended: `main` exits 130 for it, as a shell reports
/// Ctrl-C. The text says what was stopped, e.g. "the demo was stopped before it ended".
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Stopped(pub &'static str);

/// Writing to standard output failed. Its own type so that `main` can tell a reader that
/// stopped reading (`smee-relay events export | head -1`: a broken pipe, ended quietly) from a
/// broken pipe anywhere else (a target's or a server's socket), which is a failure.
#[derive(Debug, thiserror::Error)]
#[error("cannot write to standard output")]
pub struct Stdout(#[source] pub std::io::Error);

impl Stdout {
    /// Whether whoever read standard output stopped reading.
    pub fn reader_left(&self) -> bool {
        self.0.kind() == std::io::ErrorKind::BrokenPipe
    }
}

/// A value that is not acceptable, and why, in words. For validation (a flag, a config value, a
/// handler's output line), where the message is the whole story: there is no underlying cause
/// to keep, unlike an I/O or HTTP error, which keeps its source.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl From<String> for Invalid {
    fn from(message: String) -> Self {
        Self(message)
    }
}

impl From<&str> for Invalid {
    fn from(message: &str) -> Self {
        Self(message.to_string())
    }
}

/// A listening socket that could not be bound, with what to do about the usual causes: the
/// operating system's words alone ("Address already in use") leave the user to guess the fix.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}{purpose}: {source}{}", listen_advice(*addr, source, flag))]
pub struct Listen {
    /// The address asked for.
    pub addr: std::net::SocketAddr,
    /// What the socket was for (` for /healthz and /metrics`), or empty.
    pub purpose: &'static str,
    /// The setting that chose the address, to name in the advice (`--listen`).
    pub flag: &'static str,
    #[source]
    pub source: std::io::Error,
}

fn listen_advice(addr: std::net::SocketAddr, error: &std::io::Error, flag: &str) -> String {
    use std::io::ErrorKind;
    match error.kind() {
        ErrorKind::AddrInUse => format!(
            "; another program listens there (`ss -ltnp` names it): stop it, or choose another {flag}"
        ),
        ErrorKind::PermissionDenied if addr.port() < 1024 => format!(
            "; a port below 1024 needs root or CAP_NET_BIND_SERVICE: choose a port above 1023 with {flag}, or grant the capability"
        ),
        ErrorKind::AddrNotAvailable => format!(
            "; no network interface of this machine has that address: choose one it has with {flag} (127.0.0.1 for this machine only, 0.0.0.0 for all)"
        ),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regression_a_count_of_one_took_the_plural_1_attempts() {
        assert_eq!(count(1, "attempt", "attempts"), "1 attempt");
        assert_eq!(count(0, "attempt", "attempts"), "0 attempts");
        assert_eq!(count(2, "delivery", "deliveries"), "2 deliveries");
    }

    /// `cannot connect to NATS ...: IO error: Connection refused (os error 111): Connection
    /// refused (os error 111)`: async-nats's error shows its I/O cause in its own text, and
    /// anyhow's `{:#}` printed that cause again. `chain` names each cause once.
    #[test]
    fn regression_errors_repeat_their_cause() {
        let refused = std::io::Error::from_raw_os_error(111);
        let nats = async_nats::ConnectError::with_source(async_nats::ConnectErrorKind::Io, refused);
        let e = anyhow::Error::new(nats).context("cannot connect to NATS at nats://h:4222");
        let line = chain(e.as_ref());
        assert_eq!(line.matches("(os error 111)").count(), 1, "{line}");
        assert!(
            line.starts_with("cannot connect to NATS at nats://h:4222: IO error: "),
            "{line}"
        );
        // A cause not in the text yet is kept.
        let e = anyhow::Error::new(std::io::Error::from_raw_os_error(111)).context("sending");
        assert_eq!(
            chain(e.as_ref()),
            format!("sending: {}", std::io::Error::from_raw_os_error(111))
        );
    }

    /// `cannot serve on 127.0.0.1:3333: cannot listen on 127.0.0.1:3333: Address already in
    /// use (os error 98)`: the address twice, and nothing said of what to do.
    #[test]
    fn regression_a_port_in_use_was_said_without_what_to_do() {
        let addr: std::net::SocketAddr = "127.0.0.1:3333".parse().unwrap();
        let in_use = Listen {
            addr,
            purpose: "",
            flag: "--listen",
            source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        };
        let line = chain(&in_use);
        assert!(
            line.starts_with("cannot listen on 127.0.0.1:3333: "),
            "{line}"
        );
        assert!(
            line.ends_with("stop it, or choose another --listen"),
            "{line}"
        );
        assert_eq!(line.matches("127.0.0.1:3333").count(), 1, "{line}");
        let low = Listen {
            addr: "0.0.0.0:80".parse().unwrap(),
            purpose: " for /healthz and /metrics",
            flag: "--metrics-listen",
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        assert!(
            chain(&low).contains("CAP_NET_BIND_SERVICE"),
            "{}",
            chain(&low)
        );
        // A cause with no known fix is said as it is.
        let other = Listen {
            source: std::io::Error::other("odd"),
            ..in_use
        };
        assert_eq!(chain(&other), "cannot listen on 127.0.0.1:3333: odd");
    }
}
