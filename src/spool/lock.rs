//! Who may use a queue: one relay per channel and state directory, one pipeline per state
//! directory; and where that directory is.
//!
//! A channel is identified by what reaches the same channel on the server, not by the exact URL
//! text: the scheme and host in lower case (URLs do not distinguish their case), the port with
//! the scheme's default filled in, and the path without trailing slashes. The query and the
//! fragment are left out (smee.io and `smee-relay serve` name a channel by its path alone, so
//! `?x=1` reaches the same channel), and so are user name and password. The path keeps its case:
//! channel ids are case-sensitive.

use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};

use sha2::Digest as _;

use super::SpoolError;

/// Keeps two relays for the same channel from sharing a state directory, or two pipelines from
/// sharing one: each holds an exclusive lock on a file (for a channel, named after a hash of its
/// identity, not the URL: it is secret), with its pid written in it for the message the second
/// one gets.
#[derive(Debug)]
pub struct StateLock {
    /// The lock is held while this file is open.
    _file: File,
}

/// The lock of one channel.
pub type ChannelLock = StateLock;

/// What identifies a channel (see the module header), as text.
pub fn channel_identity(channel_url: &str) -> String {
    let Ok(url) = reqwest::Url::parse(channel_url) else {
        return channel_url.to_string();
    };
    // `Url` already lower-cases the scheme and a domain host and drops a default port.
    let host = url.host_str().unwrap_or("").to_ascii_lowercase();
    let port = url
        .port_or_known_default()
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    let path = url.path().trim_end_matches('/');
    format!("{}://{host}{port}{path}", url.scheme())
}

/// A channel's name on disk: a hash of its identity ([`channel_identity`]; the URL itself is a
/// secret). Names its lock, its stored `Last-Event-ID` and its queues.
pub fn channel_key(channel_url: &str) -> String {
    hex::encode(&sha2::Sha256::digest(channel_identity(channel_url).as_bytes())[..8])
}

/// The key spool format 1 used: a hash of the exact URL text.
pub fn legacy_channel_key(channel_url: &str) -> String {
    hex::encode(&sha2::Sha256::digest(channel_url.as_bytes())[..8])
}

impl StateLock {
    /// Take the lock of channel `channel_url` (`shown` is its redacted form, for messages).
    pub fn acquire(state_dir: &Path, channel_url: &str, shown: &str) -> Result<Self, SpoolError> {
        let path = state_dir.join(format!("channel-{}.lock", channel_key(channel_url)));
        Self::take(state_dir, path, format!("relays {shown}"))
    }

    /// Take the lock of the state directory's pipeline: its alert state and its `pipeline` and
    /// `alerts` queues belong to one relay at a time.
    pub fn pipeline(state_dir: &Path) -> Result<Self, SpoolError> {
        Self::take(
            state_dir,
            state_dir.join("pipeline.lock"),
            "runs the pipeline (its alert state and queues belong to one relay)".into(),
        )
    }

    fn take(state_dir: &Path, path: PathBuf, what: String) -> Result<Self, SpoolError> {
        let io = |source: std::io::Error| SpoolError::LockFile {
            path: path.clone(),
            source,
        };
        let mut file = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(SpoolError::Locked {
                    what,
                    dir: state_dir.to_owned(),
                    pid: text.trim().parse().ok(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        // Ours now: say who holds it.
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(Self { _file: file })
    }
}

/// The state directory: the flag or `SMEE_RELAY_STATE_DIR` (given as `explicit`), else
/// `$STATE_DIRECTORY` (systemd), else `$XDG_STATE_HOME/smee-relay`, else
/// `~/.local/state/smee-relay`.
pub fn state_dir(explicit: Option<&Path>) -> PathBuf {
    if let Some(dir) = explicit {
        return dir.to_owned();
    }
    let env = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = env("STATE_DIRECTORY") {
        // systemd may list several, separated by ':'; the first is ours.
        let first = dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_string();
        return PathBuf::from(first);
    }
    if let Some(dir) = env("XDG_STATE_HOME") {
        return dir.join("smee-relay");
    }
    env("HOME")
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".local/state/smee-relay")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_channel_have_one_key_and_other_channels_another() {
        let key = channel_key("https://smee.io/AbCd1234");
        for same in [
            "https://smee.io/AbCd1234/",
            "HTTPS://SMEE.IO/AbCd1234",
            "https://smee.io:443/AbCd1234",
            "https://smee.io/AbCd1234?x=1",
            "https://smee.io/AbCd1234?b=2&a=1#top",
            "https://user:pw@smee.io/AbCd1234",
        ] {
            assert_eq!(channel_key(same), key, "{same}");
        }
        for other in [
            "https://smee.io/abcd1234",
            "http://smee.io/AbCd1234",
            "https://smee.io:8443/AbCd1234",
            "https://smee.io/AbCd12345",
            "https://example.com/AbCd1234",
        ] {
            assert_ne!(channel_key(other), key, "{other}");
        }
    }

    #[test]
    fn a_second_holder_is_told_the_first_ones_pid() {
        let dir = tempfile::tempdir().unwrap();
        let _first = StateLock::acquire(dir.path(), "http://h/Chan", "http://h/Chan…").unwrap();
        let second = StateLock::acquire(dir.path(), "HTTP://H:80/Chan/?x=1", "x").unwrap_err();
        let message = second.to_string();
        assert!(
            message.contains(&format!("(pid {})", std::process::id())),
            "{message}"
        );
        assert!(second.needs_the_user());
        let _pipeline = StateLock::pipeline(dir.path()).unwrap();
        assert!(StateLock::pipeline(dir.path()).is_err());
    }
}
