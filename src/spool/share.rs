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
//!
//! A relay's request also answers the others: it starts with [`RELAY`], then names, one a line,
//! the requests whose makers may read every delivery the relay finished before it saw them
//! (it commits the marks it holds first: [`super::Spool::share_poll`]). A command that opens a
//! spool already shared waits, briefly, to be named by each relay sharing it
//! ([`wait_for_relays`]): otherwise it read the file while a relay still held marks of
//! deliveries it had finished (for up to its `MARK_DELAY`), and `events replay ID` right after
//! ID's delivery found it pending. A request with no such line (a command's, or an older
//! smee-relay's) answers nobody and is waited for by nobody.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// What a request's file name starts with.
const PREFIX: &str = "spool-share.";

/// What a request's file is called while it is being made (before it is locked).
const MAKING: &str = ".spool-share-making.";

/// What a relay's request starts with (see the module header).
const RELAY: &str = "relay\n";

/// How long a relay's request may grow with answers before it is made again with only the
/// live ones ([`Request::answer`]).
const ANSWERS_MAX: u64 = 16 << 10;

/// A leftover of a request made by a process that died before renaming it is removed after
/// this long (a live one is renamed within microseconds).
const MAKING_STALE: std::time::Duration = std::time::Duration::from_secs(60);

/// This process's request: the spool stays shared while it exists. Dropping it withdraws it.
#[derive(Debug)]
pub(super) struct Request {
    /// Holds the lock that says the request's maker is alive; a relay appends its answers to it.
    file: File,
    /// Where it is, to remove it when withdrawn.
    path: PathBuf,
    /// A relay's: the requests it has answered (named in the file). `None`: a command's.
    answered: Option<std::collections::HashSet<String>>,
}

impl Drop for Request {
    fn drop(&mut self) {
        // Removed before the lock goes (with the file handle), so a reader never takes a
        // withdrawn request for a dead one's and races to remove another's.
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Request {
    /// Ask, in `state_dir`, for the spool to be shared. `answer`: a relay's request, answering
    /// these requests at once (everything it finished before they were made is committed).
    pub(super) fn make(state_dir: &Path, answer: Option<&[String]>) -> std::io::Result<Request> {
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
        // Its answers are there before anyone sees it.
        let text = answer.map(|names| {
            let mut text = RELAY.to_string();
            for name in names {
                text.push_str(name);
                text.push('\n');
            }
            text
        });
        let made = file
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .and_then(|()| file.lock())
            .and_then(|()| match &text {
                Some(text) => (&file).write_all(text.as_bytes()),
                None => Ok(()),
            })
            .and_then(|()| std::fs::rename(&making, &path));
        if let Err(e) = made {
            let _ = std::fs::remove_file(&making);
            return Err(e);
        }
        Ok(Request {
            file,
            path,
            answered: answer.map(|names| names.iter().cloned().collect()),
        })
    }

    /// Whether the request's file is still where it was made: one removed (by hand) asks
    /// nothing of anyone, and is made again ([`super::Spool::share_poll`]).
    pub(super) fn in_place(&self) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        match (self.file.metadata(), std::fs::symlink_metadata(&self.path)) {
            (Ok(open), Ok(named)) => open.ino() == named.ino() && open.dev() == named.dev(),
            _ => false,
        }
    }

    /// The request's file name, as others' answers name it.
    fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Whether this is a relay's request and `names` holds one it has not answered yet.
    pub(super) fn to_answer(&self, names: &[String]) -> bool {
        self.answered
            .as_ref()
            .is_some_and(|answered| names.iter().any(|name| !answered.contains(name)))
    }

    /// A relay's: answer `names`, the live requests (call it once everything it finished
    /// before they were made is committed). Appended, never rewritten: a reader never sees a
    /// name that was not written. Past [`ANSWERS_MAX`] the request is made again, naming only
    /// `names`: a relay that shares for months answers every command run beside it.
    pub(super) fn answer(&mut self, names: &[String]) -> std::io::Result<()> {
        let Some(answered) = &mut self.answered else {
            return Ok(());
        };
        // A withdrawn request is never seen again (names are unique): forget it.
        answered.retain(|name| names.contains(name));
        if names.iter().all(|name| answered.contains(name)) {
            return Ok(());
        }
        if self.file.metadata()?.len() > ANSWERS_MAX {
            let dir = self.path.parent().unwrap_or(Path::new("."));
            // Made (whole, under another name) before this one is withdrawn: a reader sees
            // every answer in one of the two.
            *self = Request::make(dir, Some(names))?;
            return Ok(());
        }
        let mut text = String::new();
        for name in names {
            if answered.insert(name.clone()) {
                text.push_str(name);
                text.push('\n');
            }
        }
        if text.is_empty() {
            return Ok(());
        }
        (&self.file).write_all(text.as_bytes())
    }
}

/// Wait, up to `patience`, until every live relay's request in `state_dir` answers `mine`
/// (see the module header). Otherwise the pids (from their requests' names) of the relays that
/// did not answer in time (stopped or hung): what they finished last may then show as pending.
pub(super) fn wait_for_relays(
    state_dir: &Path,
    mine: &Request,
    patience: std::time::Duration,
) -> Result<(), Vec<u32>> {
    let me = mine.name();
    let started = std::time::Instant::now();
    loop {
        let silent = unanswered(state_dir, mine, &me);
        if silent.is_empty() {
            return Ok(());
        }
        if started.elapsed() >= patience {
            return Err(silent
                .iter()
                .filter_map(|name| name.strip_prefix(PREFIX)?.split('.').next()?.parse().ok())
                .collect());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A relay's request is never longer than its answers before it is made again
/// ([`ANSWERS_MAX`]) plus one look's new ones; a longer file is not one (and is not read).
const REQUEST_MAX: u64 = 1 << 20;

/// The names of the live relays' requests in `state_dir` that do not answer `me` yet.
fn unanswered(state_dir: &Path, mine: &Request, me: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return Vec::new();
    };
    let mut waiting = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let relay_request = name.starts_with(PREFIX)
            && path != mine.path
            && entry
                .metadata()
                .is_ok_and(|meta| meta.is_file() && meta.len() <= REQUEST_MAX);
        if !relay_request {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Some(answers) = text.strip_prefix(RELAY) else {
            continue;
        };
        // Whole lines only: a line being appended is not an answer until its newline.
        let answered = answers
            .split_inclusive('\n')
            .any(|line| line.strip_suffix('\n') == Some(me));
        if !answered && alive(&path) == Some(true) {
            waiting.push(name);
        }
    }
    waiting
}

/// Tells a relay of requests as they are made, so that while it holds the spool alone it need
/// not look at the directory every [`super::SHARE_POLL`] to find them: idle, it then wakes for
/// nothing (each look was a wake of its writer thread, 60 a minute: issue 19's idle budget). An
/// inotify watch on the state directory, read by a thread of its own that sleeps in `poll`
/// until something happens there. Dropping it ends the thread.
pub(super) struct Watch {
    /// Written on drop, to end the thread: it waits on this beside the watch. (Removing the
    /// watch would queue `IN_IGNORED` instead, which the kernel drops when the queue is full.)
    stop: Arc<OwnedFd>,
    /// Cleared when the thread ends (the directory was removed or a read failed): from then on
    /// only looking finds requests.
    live: Arc<AtomicBool>,
}

/// File systems on which inotify may see only this host's changes (`statfs`'s `f_type`): NFS,
/// SMB/CIFS, FUSE (sshfs and the like; also a local fuse-overlayfs, which only costs it the
/// watch), 9p, Ceph, AFS, Lustre, GPFS, OCFS2, GFS2, VirtualBox's shared folders, Coda,
/// OrangeFS, BeeGFS. A command on another host (or the VM's host) sharing the state directory
/// there would not be told; the relay looks instead.
const REMOTE: [u32; 17] = [
    0x6969,
    0x517b,
    0xff53_4d42,
    0xfe53_4d42,
    0x6573_5546,
    0x0102_1997,
    0x00c3_6400,
    0x5346_414f,
    0x6b41_4653,
    0x0bd0_0bd0,
    0x4750_4653,
    0x7461_636f,
    0x0116_1970,
    0x786f_4256,
    0x7375_7245,
    0x2003_0528,
    0x1983_0326,
];

impl Watch {
    /// Watch `state_dir`, calling `tell` on the thread for each request that appears (made in
    /// place or renamed into place), for an overflow of the kernel's queue (which may hide
    /// one), and once when the watch ends. Fails where inotify does (too many instances for
    /// the user: `fs.inotify.max_user_instances`) or would not see other hosts' requests (a
    /// network file system); the caller then keeps looking.
    pub(super) fn start(
        state_dir: &Path,
        tell: impl Fn() + Send + 'static,
    ) -> std::io::Result<Watch> {
        use rustix::event::{EventfdFlags, PollFd, PollFlags};
        use rustix::fs::inotify;
        // The magic number is a `long`: truncated, as the kernel's 32-bit ones are meant.
        let kind = rustix::fs::statfs(state_dir)?.f_type as u32;
        if REMOTE.contains(&kind) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                format!(
                    "a network or FUSE file system (type {kind:#x}): inotify may not see what \
                     other hosts write there"
                ),
            ));
        }
        let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)?;
        inotify::add_watch(
            &fd,
            state_dir,
            inotify::WatchFlags::CREATE
                | inotify::WatchFlags::MOVED_TO
                | inotify::WatchFlags::ONLYDIR,
        )?;
        let stop = Arc::new(rustix::event::eventfd(
            0,
            EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK,
        )?);
        let live = Arc::new(AtomicBool::new(true));
        let (stopped, alive) = (stop.clone(), live.clone());
        std::thread::Builder::new()
            .name("spool-watch".into())
            // It only waits, reads and calls `tell`: the default 2 MiB of stack is address
            // space only, but a small one says what it needs.
            .stack_size(256 << 10)
            .spawn(move || {
                let mut buf = [std::mem::MaybeUninit::uninit(); 4096];
                let mut events = inotify::Reader::new(&fd, &mut buf);
                'watch: loop {
                    let mut waits = [
                        PollFd::new(&fd, PollFlags::IN),
                        PollFd::new(&*stopped, PollFlags::IN),
                    ];
                    match rustix::event::poll(&mut waits, None) {
                        Ok(_) | Err(rustix::io::Errno::INTR) => {}
                        Err(e) => {
                            tracing::debug!("stopped watching for requests to share: {e}");
                            break;
                        }
                    }
                    if !waits[1].revents().is_empty() {
                        break;
                    }
                    // Everything queued, then wait again.
                    loop {
                        match events.next() {
                            Ok(event) if event.events().contains(inotify::ReadFlags::IGNORED) => {
                                break 'watch;
                            }
                            Ok(event) => {
                                let request = event.file_name().is_some_and(|name| {
                                    name.to_bytes().starts_with(PREFIX.as_bytes())
                                });
                                let overflow =
                                    event.events().contains(inotify::ReadFlags::QUEUE_OVERFLOW);
                                if request || overflow {
                                    tell();
                                }
                            }
                            Err(rustix::io::Errno::AGAIN) => break,
                            Err(rustix::io::Errno::INTR) => {}
                            Err(e) => {
                                tracing::debug!("stopped watching for requests to share: {e}");
                                break 'watch;
                            }
                        }
                    }
                }
                alive.store(false, Ordering::Release);
                tell();
            })?;
        Ok(Watch { stop, live })
    }

    /// Whether it still tells of requests.
    pub(super) fn live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // Cannot fail short of 2^64 - 1 stops; the thread may have ended by itself already.
        let _ = rustix::io::write(&*self.stop, &1u64.to_ne_bytes());
    }
}

/// The names of the live requests other than `mine` in `state_dir`. Removes those whose maker
/// ended. An error reading the directory counts as one request (named ""): sharing is always
/// safe, only slower.
pub(super) fn others(state_dir: &Path, mine: Option<&Request>) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return vec![String::new()];
    };
    let mut live = Vec::new();
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
            Some(true) => live.push(name.to_string()),
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

    /// Waits for `rx`'s next message, failing after a deadline.
    fn next_tell(rx: &std::sync::mpsc::Receiver<()>, what: &str) {
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("no tell for {what}: {e}"));
    }

    #[test]
    fn a_watch_tells_of_each_request_made_and_of_nothing_else_in_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (told, tells) = std::sync::mpsc::channel();
        let watch = Watch::start(dir.path(), move || told.send(()).unwrap()).unwrap();
        assert!(watch.live());
        // A relay's own files come and go in the same directory.
        std::fs::write(dir.path().join("journal-1-abc.log"), b"").unwrap();
        std::fs::rename(
            dir.path().join("journal-1-abc.log"),
            dir.path().join("spool.wal"),
        )
        .unwrap();
        let request = Request::make(dir.path(), None).unwrap();
        next_tell(&tells, "the request");
        // Events come in order: the files above were seen before the request, and told nothing.
        assert!(
            tells.try_recv().is_err(),
            "told of a file that is no request"
        );
        drop(request);
        // Dropped, the watch ends its thread (telling once more, as it ends), which drops
        // `tell` with it.
        drop(watch);
        next_tell(&tells, "the end of the watch");
        let ended = tells.recv_timeout(std::time::Duration::from_secs(20));
        assert_eq!(
            ended,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected),
            "the thread still runs"
        );
    }

    #[test]
    fn a_watch_whose_directory_is_removed_says_so_and_tells_once_more() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let (told, tells) = std::sync::mpsc::channel();
        let watch = Watch::start(&state, move || told.send(()).unwrap()).unwrap();
        std::fs::remove_dir(&state).unwrap();
        next_tell(&tells, "the end of the watch");
        assert!(
            !watch.live(),
            "a watch of a removed directory counts as live"
        );
        drop(watch);
    }

    /// A watch ended its thread by removing itself, which queues `IN_IGNORED` for the thread's
    /// blocking read. With the kernel's queue full (a flood of files while the thread was held
    /// up in `tell`), that event was dropped, and the thread read on forever (found by review).
    #[test]
    fn regression_a_watch_dropped_with_its_queue_full_kept_its_thread() {
        let dir = tempfile::tempdir().unwrap();
        let (told, tells) = std::sync::mpsc::channel();
        let (entered, inside) = std::sync::mpsc::channel();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let held = std::sync::Mutex::new(Some(held));
        let watch = Watch::start(dir.path(), move || {
            // The first tell is held up, as by a writer holding the queue's lock.
            if let Some(held) = held.lock().unwrap().take() {
                entered.send(()).unwrap();
                let _ = held.recv();
            }
            let _ = told.send(());
        })
        .unwrap();
        std::fs::write(dir.path().join("spool-share.first"), b"").unwrap();
        inside
            .recv_timeout(std::time::Duration::from_secs(20))
            .unwrap();
        let max: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        for n in 0..max + 16 {
            std::fs::write(dir.path().join(format!("junk{n}")), b"").unwrap();
        }
        drop(watch);
        release.send(()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            match tells.recv_timeout(std::time::Duration::from_millis(100)) {
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                _ => assert!(
                    std::time::Instant::now() < deadline,
                    "the watch's thread still runs 20 s after its drop"
                ),
            }
        }
    }

    #[test]
    fn a_watch_of_what_is_no_directory_fails() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("spool.redb");
        std::fs::write(&file, b"").unwrap();
        assert!(Watch::start(&file, || {}).is_err());
        assert!(Watch::start(&dir.path().join("missing"), || {}).is_err());
    }

    #[test]
    fn a_request_counts_for_others_until_it_is_withdrawn() {
        let dir = tempfile::tempdir().unwrap();
        assert!(others(dir.path(), None).is_empty());
        let first = Request::make(dir.path(), None).unwrap();
        let second = Request::make(dir.path(), None).unwrap();
        assert_eq!(others(dir.path(), None).len(), 2);
        assert_eq!(
            others(dir.path(), Some(&first)),
            [second.name()],
            "its own is not counted"
        );
        drop(second);
        assert!(others(dir.path(), Some(&first)).is_empty());
        drop(first);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "nothing left"
        );
    }

    #[test]
    fn a_command_waits_for_each_live_relay_to_answer_its_request_and_for_nobody_else() {
        let dir = tempfile::tempdir().unwrap();
        let quick = std::time::Duration::from_millis(100);
        // A command's request and an older smee-relay's (no answers): nobody waits for them.
        let _other_command = Request::make(dir.path(), None).unwrap();
        let mut relay = Request::make(dir.path(), Some(&[])).unwrap();
        let command = Request::make(dir.path(), None).unwrap();
        assert_eq!(
            wait_for_relays(dir.path(), &command, quick),
            Err(vec![std::process::id()]),
            "not answered yet: the relay is named by its pid"
        );
        let names = others(dir.path(), Some(&relay));
        assert_eq!(names.len(), 2);
        assert!(relay.to_answer(&names));
        relay.answer(&names).unwrap();
        assert!(!relay.to_answer(&names));
        assert!(wait_for_relays(dir.path(), &command, quick).is_ok());
        // A relay made after the command answers it when made.
        let later = Request::make(dir.path(), None).unwrap();
        let answering = Request::make(dir.path(), Some(&[later.name()])).unwrap();
        assert!(
            wait_for_relays(dir.path(), &later, quick).is_err(),
            "the first relay has not"
        );
        relay.answer(&[later.name()]).unwrap();
        assert!(wait_for_relays(dir.path(), &later, quick).is_ok());
        // A relay that ended is not waited for.
        let fresh = Request::make(dir.path(), None).unwrap();
        drop(relay);
        drop(answering);
        assert!(wait_for_relays(dir.path(), &fresh, quick).is_ok());
    }

    #[test]
    fn regression_a_relay_s_request_grew_with_every_command_it_answered() {
        // A relay sharing for months (beside a relay of another channel) answers each command
        // run beside it; its request kept every name, in its file and in memory.
        let dir = tempfile::tempdir().unwrap();
        let quick = std::time::Duration::from_millis(100);
        let mut relay = Request::make(dir.path(), Some(&[])).unwrap();
        for _ in 0..1_000 {
            let command = Request::make(dir.path(), None).unwrap();
            relay.answer(&others(dir.path(), Some(&relay))).unwrap();
            assert!(wait_for_relays(dir.path(), &command, quick).is_ok());
        }
        let len = std::fs::metadata(&relay.path).unwrap().len();
        assert!(len <= ANSWERS_MAX + 100, "the request is {len} bytes long");
        assert!(relay.answered.as_ref().unwrap().len() <= 1);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "only the relay's request is left"
        );
    }

    #[test]
    fn regression_a_huge_file_named_like_a_request_was_read_whole_at_every_look() {
        // A live "request" of megabytes (no relay's is): each waiting command read it whole
        // every 20 ms, and waited for it.
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = (0..40_000)
            .map(|n| format!("{PREFIX}{n}.0.0123456789abcdef"))
            .collect();
        let _huge = Request::make(dir.path(), Some(&names)).unwrap();
        let command = Request::make(dir.path(), None).unwrap();
        let quick = std::time::Duration::from_millis(100);
        assert_eq!(wait_for_relays(dir.path(), &command, quick), Ok(()));
    }

    #[test]
    fn the_request_of_a_process_that_died_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        // What `kill -9` leaves: the file, with nobody holding its lock.
        let dead = dir.path().join(format!("{PREFIX}999999.0.00000000"));
        std::fs::write(&dead, b"").unwrap();
        assert!(others(dir.path(), None).is_empty());
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
        let request = Request::make(dir.path(), None).unwrap();
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
        let first = Request::make(dir.path(), None).unwrap();
        let second = Request::make(dir.path(), None).unwrap();
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
        assert!(others(dir.path(), None).is_empty());
        assert!(fifo.exists(), "not a request: left alone");
    }
}
