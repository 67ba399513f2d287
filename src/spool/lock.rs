//! Who may use a queue: one relay per channel and state directory, one pipeline per state
//! directory; and where that directory is.
//!
//! A channel is identified by what reaches the same channel on the server, not by the exact URL
//! text: the scheme and host in lower case (URLs do not distinguish their case), the port with
//! the scheme's default filled in, and the path without trailing slashes and with unreserved
//! characters unescaped (`%6C` is `l`). The query and the
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
///
/// The file is never removed, not even on a clean stop: a process that opened it just before
/// the removal would lock the removed file (`flock` locks the open file, not the name) while the
/// next one made and locked a new file by the same name, and both would relay the channel. A
/// stale file is harmless: the next holder takes it over and writes its own pid.
#[derive(Debug)]
pub struct StateLock {
    /// The lock is held while this file is open.
    _file: File,
}

/// The lock of one channel.
pub type ChannelLock = StateLock;

/// What identifies a channel (see the module header), as text.
pub fn channel_identity(channel_url: &str) -> String {
    match reqwest::Url::parse(channel_url) {
        Ok(url) => crate::url::identity(&url),
        Err(_) => channel_url.to_string(),
    }
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

    /// [`StateLock::acquire`] by the channel's key ([`channel_key`]), for a command that knows
    /// only that (a queue's name): no relay starts on that channel while it holds it.
    pub fn of_key(state_dir: &Path, key: &str) -> Result<Self, SpoolError> {
        let path = state_dir.join(format!("channel-{key}.lock"));
        Self::take(
            state_dir,
            path,
            format!("relays the channel with key {key}"),
        )
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
        // The lock file named, not the spool's (helper-122: a lock file another user owns was
        // said as "permission denied on the spool spool.redb").
        let io = |source: std::io::Error| {
            SpoolError::LockFile {
                path: path.clone(),
                source,
            }
            .or_denied(&path)
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
                    in_cluster: false,
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

/// A relay holding a state directory's lock: what a command that finds the spool held alone
/// and never shared can tell the user of who holds it ([`SpoolError::InUse`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The pid its lock file says.
    pub pid: u32,
    /// Whether the process is stopped (SIGSTOP, Ctrl-Z, a debugger): the likeliest reason it
    /// never shares, and one with a one-command fix.
    pub stopped: bool,
}

/// The relays holding the locks of `state_dir` now (`channel-*.lock`, `pipeline.lock`), by the
/// pids their files hold, each once. A lock file whose lock is free (left by a relay that
/// stopped: they are not removed) names nobody. Reads the files and looks at the locks without
/// taking one: taking one, even briefly, could make a relay starting meanwhile think its
/// channel taken.
pub fn holders(state_dir: &Path) -> Vec<Holder> {
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return Vec::new();
    };
    let locked = locked_inodes();
    let mut found: Vec<Holder> = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let lock_file =
            (name.starts_with("channel-") && name.ends_with(".lock")) || name == "pipeline.lock";
        if !lock_file || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let Some(pid) = std::fs::read_to_string(entry.path())
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok())
        else {
            continue;
        };
        let held = match &locked {
            Some(inodes) => {
                use std::os::unix::fs::MetadataExt as _;
                entry
                    .metadata()
                    .is_ok_and(|meta| inodes.contains(&meta.ino()))
            }
            // No /proc/locks (not Linux): a live process counts.
            None => process_state(pid).is_some(),
        };
        if held && !found.iter().any(|h| h.pid == pid) {
            found.push(Holder {
                pid,
                stopped: process_state(pid).is_some_and(|state| state == 'T' || state == 't'),
            });
        }
    }
    found.sort_by_key(|h| h.pid);
    found
}

/// Whether a relay holds the lock of the channel with key `key` in `state_dir` now: another
/// relay sharing the directory serves that channel's queues. Looks without taking the lock
/// (see [`holders`]); `false` where locks cannot be seen (no `/proc/locks`).
pub fn channel_held(state_dir: &Path, key: &str) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(meta) = std::fs::metadata(state_dir.join(format!("channel-{key}.lock"))) else {
        return false;
    };
    locked_inodes().is_some_and(|inodes| inodes.contains(&meta.ino()))
}

/// The inodes of the files someone holds a `flock` on (`/proc/locks`; `None` where there is
/// none). A line is `1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF`; one with `->` is a
/// process waiting for the lock, not holding it.
fn locked_inodes() -> Option<Vec<u64>> {
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    Some(
        text.lines()
            .filter(|line| !line.contains("->"))
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                (fields.nth(1)? == "FLOCK").then_some(())?;
                fields.nth(3)?.rsplit(':').next()?.parse().ok()
            })
            .collect(),
    )
}

/// The state letter of process `pid` (`/proc/PID/stat`: `R`, `S`, `T` for stopped...), or
/// `None` if there is no such process (or no `/proc`).
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name, which is in parentheses and may hold anything.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// [`holders`] for a message: `smee-relay pid 1234 (stopped)`, or empty if none is known.
pub(super) fn describe(holders: &[Holder]) -> String {
    match holders {
        [] => String::new(),
        [one] => format!("smee-relay pid {}{}", one.pid, stopped(one)),
        many => {
            let pids: Vec<String> = many
                .iter()
                .map(|h| format!("{}{}", h.pid, stopped(h)))
                .collect();
            format!("one of smee-relay pids {}", pids.join(", "))
        }
    }
}

fn stopped(holder: &Holder) -> &'static str {
    if holder.stopped { " (stopped)" } else { "" }
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
    shell_default()
}

/// Why this process could not use `dir` as its state directory, if it can tell before trying
/// (`check`): a file in its place or in its path, or a directory it may not write. Another user
/// (the service's) may fare otherwise.
pub fn state_dir_problem(dir: &Path) -> Option<String> {
    let writable = |p: &Path| rustix::fs::access(p, rustix::fs::Access::WRITE_OK).is_ok();
    if dir.exists() {
        return match (dir.is_dir(), writable(dir)) {
            (false, _) => Some(format!("{} is a file, not a directory", dir.display())),
            (true, false) => Some(format!("{} is not writable by this user", dir.display())),
            (true, true) => None,
        };
    }
    // The nearest part of the path that exists is where the rest would be made.
    let base = dir.ancestors().skip(1).find(|a| a.exists())?;
    let base = if base.as_os_str().is_empty() {
        Path::new(".")
    } else {
        base
    };
    let why = match (base.is_dir(), writable(base)) {
        (false, _) => format!("{} is not a directory", base.display()),
        (true, false) => format!("{} is not writable by this user", base.display()),
        (true, true) => return None,
    };
    Some(format!("{} cannot be made: {why}", dir.display()))
}

/// The state directory a command given neither `--state-dir` nor `$STATE_DIRECTORY` uses:
/// `$XDG_STATE_HOME/smee-relay`, else `~/.local/state/smee-relay`.
fn shell_default() -> PathBuf {
    let env = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = env("XDG_STATE_HOME") {
        return dir.join("smee-relay");
    }
    env("HOME")
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".local/state/smee-relay")
}

/// ` --state-dir DIR`, for a hint that names a command to run on the state directory `dir`
/// (`smee-relay events replay 7 --state-dir /srv/relay`), or nothing where that command, run
/// in a shell, looks by default. systemd's `$STATE_DIRECTORY` does not count as a default: a
/// shell does not have it. The path is absolute and quoted for a shell if it needs to be.
pub fn state_dir_arg(dir: &Path) -> String {
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    let dir = absolute(dir);
    if dir == absolute(&shell_default()) {
        return String::new();
    }
    let text = dir.to_string_lossy();
    let plain = text
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+,:@%=".contains(c));
    if plain {
        format!(" --state-dir {text}")
    } else {
        format!(" --state-dir '{}'", text.replace('\'', "'\\''"))
    }
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
            // Regression (helper-122): an unreserved character escaped, which the server reads
            // as the character, took a second lock on the channel.
            "https://smee.io/AbC%64%31234",
            "https://smee.io/%41bCd1234",
        ] {
            assert_eq!(channel_key(same), key, "{same}");
        }
        // An escaped `/` is not a `/`; an escape's hex digits in either case are one escape.
        assert_ne!(
            channel_key("https://smee.io/Ab%2FCd"),
            channel_key("https://smee.io/Ab/Cd")
        );
        assert_eq!(
            channel_key("https://smee.io/Ab%2fCd"),
            channel_key("https://smee.io/Ab%2FCd")
        );
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
    fn state_dir_arg_is_absolute_quoted_and_left_out_for_the_default() {
        assert_eq!(state_dir_arg(&shell_default()), "");
        assert_eq!(
            state_dir_arg(Path::new("/srv/relay state/it's")),
            r#" --state-dir '/srv/relay state/it'\''s'"#
        );
        assert_eq!(
            state_dir_arg(Path::new("/var/lib/smee-relay")),
            " --state-dir /var/lib/smee-relay"
        );
        let relative = state_dir_arg(Path::new("state"));
        assert!(relative.starts_with(" --state-dir /"), "{relative}");
    }

    /// Lock files stay after their relay stops (removing them races with a relay taking the
    /// lock: see [`StateLock`]); one left behind is taken over, with the new holder's pid, and
    /// names nobody as a holder meanwhile.
    #[test]
    fn a_lock_file_left_by_a_stopped_relay_is_harmless_and_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir
            .path()
            .join(format!("channel-{}.lock", channel_key("http://h/C")));
        drop(StateLock::acquire(dir.path(), "http://h/C", "x").unwrap());
        assert!(path.exists(), "left in place on stop");
        // As a relay that stopped long ago left it: another process's pid.
        std::fs::write(&path, "999999\n").unwrap();
        assert_eq!(holders(dir.path()), [], "a free lock names nobody");
        let _again = StateLock::acquire(dir.path(), "http://h/C", "x").unwrap();
        let pid = std::process::id();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{pid}\n"));
        assert_eq!(
            holders(dir.path()),
            [Holder {
                pid,
                stopped: false
            }]
        );
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
