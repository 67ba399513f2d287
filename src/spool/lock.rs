//! Who may use a channel's queue: one relay per channel and state directory, and where that
//! directory is.

use std::fs::File;
use std::path::{Path, PathBuf};

use sha2::Digest as _;

use super::SpoolError;

/// Keeps two relays for the same channel from sharing a state directory: each holds an
/// exclusive lock on a file named after a hash of the channel URL (not the URL: it is secret).
#[derive(Debug)]
pub struct ChannelLock {
    /// The lock is held while this file is open.
    _file: File,
}

/// A channel's name on disk: a hash of its URL (the URL itself is a secret).
pub fn channel_key(channel_url: &str) -> String {
    hex::encode(&sha2::Sha256::digest(channel_url.as_bytes())[..8])
}

impl ChannelLock {
    pub fn acquire(state_dir: &Path, channel_url: &str, shown: &str) -> Result<Self, SpoolError> {
        let path = state_dir.join(format!("channel-{}.lock", channel_key(channel_url)));
        let io = |e: std::io::Error| SpoolError::Io {
            path: path.clone(),
            reason: e.to_string(),
        };
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(SpoolError::Locked {
                channel: shown.to_string(),
                dir: state_dir.to_owned(),
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
        }
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
