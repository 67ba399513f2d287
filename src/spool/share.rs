//! Who else wants the spool open: the requests that make a relay share its spool.
//!
//! redb opens a file in one of three modes. Alone, a relay opens `spool.redb` in its
//! exclusive-writer mode: a commit is one `fdatasync` and takes no file locks. When another
//! process must use the same file (`smee-relay events`, `catch-up`, a relay of another channel
//! sharing the state directory), everyone opens it in the multi-writer mode, whose commits cost
//! two `fdatasync`s, a dozen lock calls and redb's allocator state (BENCHMARKS.md). The two modes
//! exclude each other, so a process that finds the file held exclusively asks for it to be
//! shared, and the holder switches at its next look ([`super::Spool::share_poll`]).
//!
//! A request is a file `spool-share.PID.N.RANDOM` in the state directory, locked (`flock`) by the
//! process that made it for as long as it keeps the spool open shared. A request whose lock is
//! free belongs to a process that ended (even by `kill -9`) and is removed by whoever finds it.
//! The file is made under a temporary name, locked, then renamed, so a live request is never
//! seen unlocked. Owns nothing else: which mode the spool is in is [`super::Spool`]'s.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// What a request's file name starts with.
const PREFIX: &str = "spool-share.";

/// What a request's file is called while it is being made (before it is locked).
const MAKING: &str = ".spool-share-making.";

/// A leftover of a request made by a process that died before renaming it is removed after
/// this long (a live one is renamed within microseconds).
const MAKING_STALE: std::time::Duration = std::time::Duration::from_secs(60);

/// This process's request: the spool stays shared while it exists. Dropping it withdraws it.
#[derive(Debug)]
pub(super) struct Request {
    /// Holds the lock that says the request's maker is alive.
    _file: File,
    /// Where it is, to remove it when withdrawn.
    path: PathBuf,
}

impl Drop for Request {
    fn drop(&mut self) {
        // Removed before the lock goes (with the file handle), so a reader never takes a
        // withdrawn request for a dead one's and races to remove another's.
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Request {
    /// Ask, in `state_dir`, for the spool to be shared.
    pub(super) fn make(state_dir: &Path) -> std::io::Result<Request> {
        use std::os::unix::fs::PermissionsExt as _;
        // Unique within the process (a test may open one spool twice) and across processes
        // that see the same pid (two containers sharing a volume are each pid 1).
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "{}.{}.{:08x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            fastrand::u32(..)
        );
        let making = state_dir.join(format!("{MAKING}{name}"));
        let path = state_dir.join(format!("{PREFIX}{name}"));
        let file = File::options().write(true).create_new(true).open(&making)?;
        // Readable by all whatever the umask: the relay may run as another user than a command
        // (root), and it must open the file to see that its maker is alive.
        let made = file
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .and_then(|()| file.lock())
            .and_then(|()| std::fs::rename(&making, &path));
        if let Err(e) = made {
            let _ = std::fs::remove_file(&making);
            return Err(e);
        }
        Ok(Request { _file: file, path })
    }
}

/// How many live requests other than `mine` there are in `state_dir`. Removes those whose maker
/// ended. An error reading the directory counts as one request: sharing is always safe, only
/// slower.
pub(super) fn others(state_dir: &Path, mine: Option<&Request>) -> usize {
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return 1;
    };
    let mut live = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let path = entry.path();
        if name.starts_with(MAKING) {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|at| at.elapsed().ok())
                .is_some_and(|age| age > MAKING_STALE);
            if old && alive(&path) == Some(false) {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        }
        if !name.starts_with(PREFIX) || mine.is_some_and(|mine| mine.path == path) {
            continue;
        }
        match alive(&path) {
            Some(true) => live += 1,
            Some(false) => {
                let _ = std::fs::remove_file(&path);
            }
            None => {}
        }
    }
    live
}

/// Whether the request at `path` is held by a live process (its lock is taken). Only a file
/// that is gone (withdrawn meanwhile) or whose lock is free counts as not alive: one that cannot
/// be opened or locked (another user's, a file system without locks) counts as alive, since
/// sharing is always safe and removing a live request is not. What is not a plain file (a
/// FIFO, whose open would block) is nobody's request: not counted, not touched.
fn alive(path: &Path) -> Option<bool> {
    use std::os::unix::fs::OpenOptionsExt as _;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => return None,
        Err(_) => return Some(false),
    }
    let opened = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path);
    Some(held(opened))
}

/// Whether a request file, as its open went, is held by a live process.
fn held(opened: std::io::Result<File>) -> bool {
    match opened {
        Ok(file) => match file.try_lock() {
            Ok(()) => false,
            Err(std::fs::TryLockError::WouldBlock) => true,
            Err(std::fs::TryLockError::Error(_)) => true,
        },
        Err(e) => e.kind() != std::io::ErrorKind::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_counts_for_others_until_it_is_withdrawn() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(others(dir.path(), None), 0);
        let first = Request::make(dir.path()).unwrap();
        let second = Request::make(dir.path()).unwrap();
        assert_eq!(others(dir.path(), None), 2);
        assert_eq!(
            others(dir.path(), Some(&first)),
            1,
            "its own is not counted"
        );
        drop(second);
        assert_eq!(others(dir.path(), Some(&first)), 0);
        drop(first);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "nothing left"
        );
    }

    #[test]
    fn the_request_of_a_process_that_died_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        // What `kill -9` leaves: the file, with nobody holding its lock.
        let dead = dir.path().join(format!("{PREFIX}999999.0.00000000"));
        std::fs::write(&dead, b"").unwrap();
        assert_eq!(others(dir.path(), None), 0);
        assert!(!dead.exists());
    }
}

#[cfg(test)]
mod regression_tests {
    use super::*;

    /// A command run as root under `umask 077` made a request the relay (another user) could
    /// not open; the relay took that for a dead request, removed it and never shared, and the
    /// command gave up after 10 s saying the relay was stuck. A request is now readable by all,
    /// and one that cannot be opened counts as alive.
    #[test]
    fn regression_a_request_the_relay_cannot_open_was_taken_for_a_dead_one() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let request = Request::make(dir.path()).unwrap();
        let mode = std::fs::metadata(&request.path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
        // What the relay meets when it may not open another user's file.
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert!(held(Err(denied)), "counted as alive, not removed");
        let gone = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert!(!held(Err(gone)));
        drop(request);
    }

    /// Two relays in separate pid namespaces (containers on one volume, both pid 1) made the
    /// same request name and each took the other's for its own, switching every second.
    #[test]
    fn regression_two_makers_with_the_same_pid_made_the_same_request_name() {
        let dir = tempfile::tempdir().unwrap();
        let first = Request::make(dir.path()).unwrap();
        let second = Request::make(dir.path()).unwrap();
        assert_ne!(first.path, second.path);
        let name = |r: &Request| r.path.file_name().unwrap().to_string_lossy().into_owned();
        // pid, counter, and a random part that a second namespace's pid 1 does not share.
        assert_eq!(name(&first).split('.').count(), 4, "{}", name(&first));
    }

    /// A FIFO named like a request (anyone who may write the state directory can make one)
    /// blocked the relay's writer thread for good in its open.
    #[test]
    fn regression_a_fifo_named_like_a_request_hung_the_writer_thread() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join(format!("{PREFIX}7.0.00000000"));
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        assert_eq!(others(dir.path(), None), 0);
        assert!(fifo.exists(), "not a request: left alone");
    }
}
