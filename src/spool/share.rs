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
//! A request is a file `spool-share.PID.N` in the state directory, locked (`flock`) by the
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
        // Unique within the process too: a test may open one spool twice.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "{}.{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let making = state_dir.join(format!("{MAKING}{name}"));
        let path = state_dir.join(format!("{PREFIX}{name}"));
        let file = File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&making)?;
        let made = file.lock().and_then(|()| std::fs::rename(&making, &path));
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
            if old && !alive(&path) {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        }
        if !name.starts_with(PREFIX) || mine.is_some_and(|mine| mine.path == path) {
            continue;
        }
        if alive(&path) {
            live += 1;
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
    live
}

/// Whether the request at `path` is held by a live process (its lock is taken). A file that
/// cannot be opened is gone (withdrawn meanwhile), so not alive.
fn alive(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    match file.try_lock() {
        Ok(()) => false,
        Err(std::fs::TryLockError::WouldBlock) => true,
        // Cannot tell (a file system without locks): count it, sharing is always safe.
        Err(std::fs::TryLockError::Error(_)) => true,
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
        let dead = dir.path().join(format!("{PREFIX}999999.0"));
        std::fs::write(&dead, b"").unwrap();
        assert_eq!(others(dir.path(), None), 0);
        assert!(!dead.exists());
    }
}
