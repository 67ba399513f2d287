//! Room on the disk: keeps the spool from filling the file system it is on (`--keep-free`).
//!
//! A spool that fills its disk is stuck: redb copies pages on write, so even recording a
//! delivery or pruning an event needs new blocks, and opening the file again after a failed
//! write applies the write-ahead log, which needs them too. Nothing is delivered or taken until
//! someone makes room. So the relay keeps `--keep-free` of the file system for those writes.
//! Once the room left falls under it, the spool may hold no more event bytes than it held then:
//! its file stops growing, since redb reuses the pages freed by pruning. An append that would go
//! past that first prunes delivered events early (as a full `--max-spool-size` does); if that is
//! not enough, its events wait in memory (the intake's pause, as on a full disk) until pruning
//! or the disk makes room. Once the file system has `--keep-free` again, the limit is lifted.
//!
//! What takes the room is measured (`statvfs`, blocks available to unprivileged users) at most
//! every [`LOOK_EVERY`]: the keep-free room also absorbs what is written between two looks.
//! This module only decides; the writer thread ([`super::writer`]) asks it before each commit
//! that appends.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{info, warn};

/// How often the file system's free room is measured, at most.
const LOOK_EVERY: Duration = Duration::from_millis(100);

/// How often the spool's file is compacted, at most, while appends wait for room: a
/// compaction holds the spool's reads and writes while it moves pages (a second or more for a
/// large file).
const COMPACT_EVERY: Duration = Duration::from_secs(60);

/// The disk room an append must leave: see the module's header.
pub(crate) struct Room {
    /// Where the room is measured.
    probe: Probe,
    /// Bytes of the file system to leave free (`--keep-free`).
    keep_free: u64,
    state: Mutex<State>,
}

/// How the free room is measured.
enum Probe {
    /// `statvfs` of this directory (the spool's).
    Dir(PathBuf),
    /// A test's disk, of which the test knows the free room.
    #[cfg(test)]
    Fake(std::sync::Arc<dyn Fn() -> u64 + Send + Sync>),
}

#[derive(Default)]
struct State {
    /// When the room was last measured.
    looked: Option<Instant>,
    /// The room then (bytes), `None` if it could not be measured (then nothing is held back).
    free: Option<u64>,
    /// While the room is short: the event bytes the spool held when it fell short, the most it
    /// may hold until the room is back (`None` until an append needed it).
    cap: Option<u64>,
    /// Whether the room being short was said (once per spell).
    said: bool,
    /// When the spool's file was last compacted to make room.
    compacted: Option<Instant>,
}

/// Why an append must wait.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the disk holding the spool has {free} free, less than --keep-free ({keep_free}), and the \
     spool holds all the events it may while the disk is short ({stored} of them, none \
     delivered that could be pruned): the events waiting must be delivered first (is a target \
     down? `smee-relay events list` shows them), or free disk space (the spool's own file keeps \
     its size), or restart with a lower --keep-free",
    free = mib(*free),
    keep_free = mib(*keep_free),
    stored = mib(*stored)
)]
pub struct NoRoom {
    free: u64,
    keep_free: u64,
    stored: u64,
}

/// A `--keep-free` the file system could never give: every append would wait for good.
#[derive(Debug, thiserror::Error)]
#[error(
    "--keep-free {keep_free} is at least the size of the whole file system holding the spool \
     ({total}, {dir}): no event could ever be stored; lower it (it is what the spool leaves \
     free there), or 0 turns it off",
    keep_free = mib(*keep_free),
    total = mib(*total),
    dir = dir.display()
)]
pub struct TooLarge {
    keep_free: u64,
    total: u64,
    dir: PathBuf,
}

/// Check `keep_free` against the file system of `dir` at start: refused if it is at least the
/// file system's size; otherwise the room there now, for the start's log line (`None`: it
/// could not be measured).
pub(crate) fn check_at_start(dir: &Path, keep_free: u64) -> Result<Option<u64>, TooLarge> {
    let Ok(fs) = rustix::fs::statvfs(dir) else {
        return Ok(None);
    };
    let total = fs.f_blocks.saturating_mul(fs.f_frsize);
    if keep_free > 0 && total > 0 && keep_free >= total {
        return Err(TooLarge {
            keep_free,
            total,
            dir: dir.to_owned(),
        });
    }
    Ok(Some(fs.f_bavail.saturating_mul(fs.f_frsize)))
}

/// Bytes, as a message shows them: `64 MiB`, `7.5 MiB`, `1.5 GiB`, `12 KiB`.
pub(crate) fn mib(bytes: u64) -> String {
    let (unit, size) = [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ]
    .into_iter()
    .find(|(_, size)| bytes >= *size)
    .unwrap_or(("bytes", 1));
    let shown = bytes as f64 / size as f64;
    if bytes.is_multiple_of(size) || shown >= 100.0 {
        format!("{shown:.0} {unit}")
    } else {
        format!("{shown:.1} {unit}")
    }
}

impl Room {
    /// Keep `keep_free` bytes free on the file system of `dir`.
    pub(crate) fn new(dir: PathBuf, keep_free: u64) -> Room {
        Room {
            probe: Probe::Dir(dir),
            keep_free,
            state: Mutex::default(),
        }
    }

    /// A room measured by `free` (a test's disk).
    #[cfg(test)]
    pub(crate) fn fake(
        free: std::sync::Arc<dyn Fn() -> u64 + Send + Sync>,
        keep_free: u64,
    ) -> Room {
        Room {
            probe: Probe::Fake(free),
            keep_free,
            state: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Plain values: nothing a panic could leave half-changed.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Measure the room if the last look is older than [`LOOK_EVERY`]; lift the limit if it is
    /// back. Returns the room (`None`: not measured, nothing held back).
    fn look(&self, state: &mut State) -> Option<u64> {
        let now = Instant::now();
        if state.looked.is_none_or(|at| now >= at + LOOK_EVERY) {
            state.looked = Some(now);
            state.free = self.measure();
            if state.free.is_none_or(|free| free >= self.keep_free) {
                if std::mem::take(&mut state.said) {
                    info!(
                        free = %state.free.map_or("unknown".into(), mib),
                        "the disk holding the spool has room again: appends are no longer limited"
                    );
                }
                state.cap = None;
            }
        }
        state.free.filter(|&free| free < self.keep_free)
    }

    fn measure(&self) -> Option<u64> {
        match &self.probe {
            Probe::Dir(dir) => rustix::fs::statvfs(dir)
                .ok()
                .map(|s| s.f_bavail.saturating_mul(s.f_frsize)),
            #[cfg(test)]
            Probe::Fake(free) => Some(free()),
        }
    }

    /// Whether the room is short now (an appender's quick look, which sends its append to the
    /// writer thread then).
    pub(crate) fn short(&self) -> bool {
        let mut state = self.state();
        self.look(&mut state).is_some()
    }

    /// Whether appends of `bytes` (events' [`crate::event::Event::held_bytes`]) may commit.
    /// `stored` reads the spool's event bytes; `prune` prunes delivered events down to the
    /// bytes given and returns how many it pruned; `compact` gives the spool file's free pages
    /// back to the disk and says whether it did. `stored` or `prune` failing lets the append go
    /// on (its commit meets the same disk and says why).
    ///
    /// While the disk is short, an append must fit under what the spool held when it fell
    /// short (the cap), and take at most half the room left, should the file grow by it all (a
    /// large event takes pages in one run, which freed pages here and there may not give).
    /// Past that, delivered events are pruned early; then the file is compacted (at most every
    /// [`COMPACT_EVERY`]): a spool whose own file holds the disk (it grew while a target was
    /// down, and never shrinks) gives its free pages back, and the room may be back.
    pub(crate) fn admit<E>(
        &self,
        bytes: usize,
        stored: impl Fn() -> Result<u64, E>,
        prune: impl FnOnce(u64) -> Result<u64, E>,
        compact: impl FnOnce() -> bool,
    ) -> Result<(), NoRoom> {
        let mut state = self.state();
        let Some(free) = self.look(&mut state) else {
            return Ok(());
        };
        let Ok(now) = stored() else { return Ok(()) };
        let cap = *state.cap.get_or_insert(now);
        if !std::mem::replace(&mut state.said, true) {
            warn!(
                free = %mib(free),
                keep_free = %mib(self.keep_free),
                stored = %mib(cap),
                "the disk holding the spool is short of room: the spool takes no more events \
                 than it holds now (their bytes, not its file's size); delivered events are \
                 pruned early, and new events wait in memory if that is not enough"
            );
        }
        // Rows take about twice what an event holds in memory (headers as JSON, the body).
        let need = 2 * bytes as u64;
        let fits = |stored: u64, cap: u64, free: u64| stored + need <= cap && need <= free / 2;
        if fits(now, cap, free) {
            return Ok(());
        }
        // Room for more than this append, so that a short disk does not prune on every one.
        let target = cap.saturating_sub(cap / 10 + need);
        let pruned = prune(target).is_ok_and(|pruned| pruned > 0);
        let now = match pruned {
            true => stored().unwrap_or(now),
            false => now,
        };
        if pruned && fits(now, cap, free) {
            return Ok(());
        }
        if state
            .compacted
            .is_none_or(|at| at.elapsed() >= COMPACT_EVERY)
        {
            state.compacted = Some(Instant::now());
            if compact() {
                state.looked = None;
                let Some(free) = self.look(&mut state) else {
                    return Ok(());
                };
                // Still short, the file holds little free: what it holds now is the most it may.
                let cap = state.cap.insert(cap.max(now));
                if fits(now, *cap, free) {
                    return Ok(());
                }
            }
        }
        Err(NoRoom {
            free,
            keep_free: self.keep_free,
            stored: now,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn room(free: &Arc<AtomicU64>, keep_free: u64) -> Room {
        let free = free.clone();
        Room::fake(Arc::new(move || free.load(Ordering::SeqCst)), keep_free)
    }

    fn no_compact() -> bool {
        panic!("no compaction")
    }

    /// Waits out [`LOOK_EVERY`], so the next call measures again.
    fn later(room: &Room) {
        room.state().looked = None;
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(mib(64 << 20), "64 MiB");
        assert_eq!(mib(7_864_320), "7.5 MiB");
        assert_eq!(mib(3 << 29), "1.5 GiB");
        assert_eq!(mib(16_777_216 << 30), "16384 TiB");
        assert_eq!(mib(100), "100 bytes");
    }

    #[test]
    fn with_room_every_append_goes() {
        let free = Arc::new(AtomicU64::new(1 << 30));
        let room = room(&free, 64 << 20);
        let stored = || Ok::<_, ()>(u64::MAX / 4);
        assert!(
            room.admit(1 << 20, stored, |_| panic!("no prune"), no_compact)
                .is_ok()
        );
        assert!(!room.short());
    }

    #[test]
    fn short_of_room_the_spool_holds_no_more_than_it_did() {
        let free = Arc::new(AtomicU64::new(10 << 20));
        let room = room(&free, 64 << 20);
        let held = AtomicU64::new(100_000);
        let stored = || Ok::<_, ()>(held.load(Ordering::SeqCst));
        // Past what it held when the room fell short: delivered events pruned first, then taken.
        let pruned_to = AtomicU64::new(0);
        let prune = |target| {
            pruned_to.store(target, Ordering::SeqCst);
            held.store(target, Ordering::SeqCst);
            Ok(3)
        };
        assert!(room.admit(100, stored, prune, no_compact).is_ok());
        assert_eq!(pruned_to.load(Ordering::SeqCst), 100_000 - 10_000 - 200);
        // Under it (pruned meanwhile): taken as it is.
        held.store(50_000, Ordering::SeqCst);
        assert!(
            room.admit(20_000, stored, |_| panic!("no prune"), no_compact)
                .is_ok()
        );
        // Nothing to prune: it waits, and says why.
        held.store(100_000, Ordering::SeqCst);
        let e = room.admit(100, stored, |_| Ok(0), || false).unwrap_err();
        assert!(e.to_string().contains("--keep-free (64 MiB)"), "{e}");
        assert!(room.short());
        // The room back: no limit.
        free.store(65 << 20, Ordering::SeqCst);
        later(&room);
        assert!(
            room.admit(1 << 20, stored, |_| panic!("no prune"), no_compact)
                .is_ok()
        );
        assert!(!room.short());
    }

    /// A relay restarted on a disk its spool's file had filled (all delivered, pruned since):
    /// the cap was what the spool held then, nothing, and every append waited for good,
    /// though the file was nearly all free pages. Compacting it gives them back.
    #[test]
    fn regression_an_empty_spool_whose_file_held_the_disk_waited_for_good() {
        let free = Arc::new(AtomicU64::new(4 << 20));
        let room = room(&free, 6 << 20);
        let stored = || Ok::<_, ()>(0);
        let compact = || {
            free.store(18 << 20, Ordering::SeqCst);
            true
        };
        assert!(room.admit(1000, stored, |_| Ok(0), compact).is_ok());
        assert!(!room.short(), "the limit lifted");
        // Short again (another program's files): compacted again only a while later.
        free.store(4 << 20, Ordering::SeqCst);
        later(&room);
        assert!(room.admit(1000, stored, |_| Ok(0), no_compact).is_err());
    }

    /// A large event on a short disk took more than the room kept (its pages in one run, past
    /// the file's end) and filled the disk. It now waits unless half the room left holds it.
    #[test]
    fn regression_an_event_larger_than_the_room_left_filled_the_disk() {
        let free = Arc::new(AtomicU64::new(1 << 20));
        let room = room(&free, 2 << 20);
        let held = AtomicU64::new(10 << 20);
        let stored = || Ok::<_, ()>(held.load(Ordering::SeqCst));
        // Under the cap once pruned, but 3 MB on a disk with 1 MiB left: it waits.
        let prune = |target| {
            held.store(target, Ordering::SeqCst);
            Ok(5)
        };
        assert!(room.admit(3 << 20, stored, prune, || false).is_err());
        // A small one goes.
        assert!(room.admit(100 << 10, stored, |_| Ok(0), no_compact).is_ok());
    }

    #[test]
    fn a_room_that_cannot_be_read_holds_nothing_back() {
        let free = Arc::new(AtomicU64::new(0));
        let room = room(&free, 64 << 20);
        assert!(room.admit(1, || Err(()), |_| Err(()), no_compact).is_ok());
    }

    #[test]
    fn the_state_directory_s_file_system_is_measured() {
        let dir = tempfile::tempdir().unwrap();
        let room = Room::new(dir.path().to_owned(), 1);
        assert!(room.measure().is_some_and(|free| free > 0));
        assert!(!room.short());
    }
}
