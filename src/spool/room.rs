//! Room on the disk: keeps the spool from filling the file system it is on (`--keep-free`).
//!
//! A spool that fills its disk is stuck: redb copies pages on write, so even recording a
//! delivery or pruning an event needs new blocks, and opening the file again after a failed
//! write applies the write-ahead log, which needs them too. Nothing is delivered or taken until
//! someone makes room. So the relay keeps `--keep-free` of the file system for those writes.
//!
//! An append goes as it is if the room left after it is still `--keep-free`, counting what the
//! file may grow by for it ([`growth`]: its rows, and the tables' pages written anew, which the
//! free pages in the file may not give). Otherwise the room is short: the spool may hold no
//! more event bytes than it held then, and its file stops growing, since redb reuses the pages
//! freed by pruning. An append that would go past that first prunes delivered events early (as
//! a full `--max-spool-size` does); if that is not enough, its events wait in memory (the
//! intake's pause, as on a full disk) until pruning or the disk makes room. The spell ends, and
//! the limit is lifted, once the room would hold the last append that met it.
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
    /// The [`growth`] of the appends let through since: the room is taken to be `free` less
    /// this, and measured again once that is near `--keep-free` (a fast disk takes several
    /// batches in one [`LOOK_EVERY`], and a look that old let them fill it).
    spent: u64,
    /// While the room is short: the event bytes the spool held when it fell short, the most it
    /// may hold until the room is back (`None` until an append needed it).
    cap: Option<u64>,
    /// While the room is short (a spell, said once as it begins): the [`growth`] of the last
    /// append that met it. The spell ends once the room left after that much is `--keep-free`:
    /// ending it as soon as a small append fits would start it again at the next large one,
    /// and say both each time.
    short_for: Option<u64>,
    /// When the spool's file was last compacted to make room.
    compacted: Option<Instant>,
}

/// Why an append must wait.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the disk holding the spool has {free} free: the next {waiting} of events to store may take \
     {growth} of it (its rows, and the spool's pages written anew), which would leave less \
     than --keep-free ({keep_free}), {why}",
    free = mib(*free),
    waiting = mib(*waiting),
    growth = mib(*growth),
    keep_free = mib(*keep_free),
    why = match held {
        true if *stored == 0 => "and the spool holds no event whose delivery would make room: \
                                 free disk space, or restart with a lower --keep-free"
            .to_string(),
        true => format!(
            "and the spool holds all the events it may while the disk is short ({} of them, \
             none delivered that could be pruned): the events waiting must be delivered first \
             (is a target down? `smee-relay events list` shows them), or free disk space \
             (deleting events does not shrink the spool's file), or restart with a lower \
             --keep-free",
            mib(*stored)
        ),
        false => "more than half of what is free: free disk space, or restart with a lower \
                  --keep-free (while no other process shares the spool, the relay also \
                  compacts its file at most once a minute, which may give room back)"
            .into(),
    }
)]
pub struct NoRoom {
    free: u64,
    waiting: u64,
    /// What the file may grow by for them ([`growth`]).
    growth: u64,
    keep_free: u64,
    stored: u64,
    /// Whether the spool holds all it may (the cap), rather than the growth taking more than
    /// half the room.
    held: bool,
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

    /// The room: as last measured, less what was let through since; measured again if that
    /// is older than [`LOOK_EVERY`] or would not leave `--keep-free` after `growth`. The spell
    /// of short room ended if the room is back. `None`: not measured, nothing held back.
    fn look(&self, state: &mut State, growth: u64) -> Option<u64> {
        let room = |state: &State| state.free.map(|free| free.saturating_sub(state.spent));
        let near = room(state).is_some_and(|free| free < self.keep_free.saturating_add(growth));
        let now = Instant::now();
        if near || state.looked.is_none_or(|at| now >= at + LOOK_EVERY) {
            state.looked = Some(now);
            state.free = self.measure();
            state.spent = 0;
        }
        let free = room(state);
        if let Some(growth) = state.short_for
            && free.is_none_or(|free| free >= self.keep_free.saturating_add(growth))
        {
            info!(
                free = %free.map_or("unknown".into(), mib),
                "the disk holding the spool has room again: appends are no longer limited"
            );
            state.short_for = None;
            state.cap = None;
        }
        free
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

    /// Whether an append of `bytes` would meet short room now (an appender's quick look,
    /// which sends its append to the writer thread then); if not, the append is counted as
    /// let through (it commits at once, without [`Room::admit`]).
    pub(crate) fn short(&self, bytes: usize) -> bool {
        let mut state = self.state();
        let growth = growth(bytes);
        let free = self.look(&mut state, growth);
        let short = state.short_for.is_some()
            || free.is_some_and(|free| free < self.keep_free.saturating_add(growth));
        if !short {
            state.spent = state.spent.saturating_add(growth);
        }
        short
    }

    /// Whether appends of `bytes` (events' [`crate::event::Event::held_bytes`]) may commit.
    /// `stored` reads the spool's event bytes; `prune` prunes delivered events down to the
    /// bytes given and returns how many it pruned; `compact` gives the spool file's free pages
    /// back to the disk and says whether it did. `stored` or `prune` failing lets the append go
    /// on (its commit meets the same disk and says why).
    ///
    /// An append goes if the room left after its [`growth`] is still `--keep-free`. Otherwise
    /// it must fit under what the spool held when the room fell short (the cap), and its growth
    /// take at most half the room left. Past that, delivered events are pruned early; then the
    /// file is compacted (at most every [`COMPACT_EVERY`]): a spool whose own file holds the
    /// disk (it grew while a target was down, and never shrinks) gives its free pages back, and
    /// the room may be back.
    pub(crate) fn admit<E>(
        &self,
        bytes: usize,
        stored: impl Fn() -> Result<u64, E>,
        prune: impl FnOnce(u64) -> Result<u64, E>,
        compact: impl FnOnce() -> bool,
    ) -> Result<(), NoRoom> {
        let mut state = self.state();
        let growth = growth(bytes);
        let Some(free) = self.look(&mut state, growth) else {
            return Ok(());
        };
        if free >= self.keep_free.saturating_add(growth) {
            state.spent = state.spent.saturating_add(growth);
            return Ok(());
        }
        let Ok(now) = stored() else { return Ok(()) };
        let cap = *state.cap.get_or_insert(now);
        if state.short_for.replace(growth).is_none() {
            warn!(
                free = %mib(free),
                keep_free = %mib(self.keep_free),
                appending = %mib(bytes as u64),
                stored = %mib(cap),
                "the disk holding the spool is short of room: the spool takes no more events \
                 than it holds now (their bytes, not its file's size); delivered events are \
                 pruned early, and new events wait in memory if that is not enough"
            );
        }
        // Rows take about twice what an event holds in memory (headers as JSON, the body).
        let need = 2 * bytes as u64;
        let fits = |stored: u64, cap: u64, free: u64| stored + need <= cap && growth <= free / 2;
        let admitted = |state: &mut State| {
            state.spent = state.spent.saturating_add(growth);
            Ok(())
        };
        if fits(now, cap, free) {
            return admitted(&mut state);
        }
        // Room for more than this append, so that a short disk does not prune on every one.
        let target = cap.saturating_sub(cap / 10 + need);
        let pruned = prune(target).is_ok_and(|pruned| pruned > 0);
        let now = match pruned {
            true => stored().unwrap_or(now),
            false => now,
        };
        if pruned && fits(now, cap, free) {
            return admitted(&mut state);
        }
        if state
            .compacted
            .is_none_or(|at| at.elapsed() >= COMPACT_EVERY)
        {
            state.compacted = Some(Instant::now());
            if compact() {
                state.looked = None;
                let Some(free) = self.look(&mut state, growth) else {
                    return Ok(());
                };
                if state.short_for.is_none() {
                    return Ok(()); // The room is back, for this append too.
                }
                // Still short, the file holds little free: what it holds now is the most it may.
                let cap = state.cap.insert(cap.max(now));
                if fits(now, *cap, free) {
                    return admitted(&mut state);
                }
            }
        }
        Err(NoRoom {
            free,
            waiting: bytes as u64,
            growth,
            keep_free: self.keep_free,
            stored: now,
            held: now + need > state.cap.unwrap_or(cap),
        })
    }
}

/// What the disk may give the spool's file for appends of `bytes` (events'
/// [`crate::event::Event::held_bytes`]): their rows, a quarter more for the pages of the
/// tables' trees written anew (copy on write), and a few pages besides. redb reserves a large
/// value's run of pages rounded up to a power of two, but the disk gives only the blocks
/// written (the rest is a hole): on tmpfs a 300 KB event took 320 to 364 KiB, a 1 MB one
/// 1.06 to 1.09 MiB. (Twice the bytes rounded up held a 5 MB event to 16 MiB of room: with
/// compaction impossible or once a minute, a backlog crawled.)
fn growth(bytes: usize) -> u64 {
    let bytes = bytes as u64;
    bytes + bytes / 4 + (64 << 10)
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
        assert!(!room.short(0));
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
        assert!(e.to_string().contains("holds all the events it may"), "{e}");
        assert!(room.short(0));
        // The room back (for the append and what it may grow the file by): no limit.
        free.store(66 << 20, Ordering::SeqCst);
        later(&room);
        assert!(
            room.admit(1 << 20, stored, |_| panic!("no prune"), no_compact)
                .is_ok()
        );
        assert!(!room.short(0));
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
        assert!(!room.short(0), "the limit lifted");
        // Short again (another program's files): compacted again only a while later.
        free.store(4 << 20, Ordering::SeqCst);
        later(&room);
        let e = room.admit(1000, stored, |_| Ok(0), no_compact).unwrap_err();
        // Delivering would not help: the spool holds nothing.
        assert!(
            e.to_string().contains("holds no event whose delivery"),
            "{e}"
        );
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
        let e = room.admit(3 << 20, stored, prune, || false).unwrap_err();
        assert!(
            e.to_string().contains("more than half of what is free"),
            "{e}"
        );
        // A small one goes.
        assert!(room.admit(100 << 10, stored, |_| Ok(0), no_compact).is_ok());
    }

    /// Events of a few MB on a disk with little more than `--keep-free` left: the room was
    /// looked at only under `--keep-free`, and one append grew the file past it and past the
    /// disk's end. An append now goes as it is only if the room left after its growth is
    /// still `--keep-free`.
    #[test]
    fn regression_an_append_went_as_it_was_though_it_would_fill_the_room_kept() {
        let free = Arc::new(AtomicU64::new(20 << 20));
        let room = room(&free, 2 << 20);
        let stored = || Ok::<_, ()>(30 << 20);
        assert_eq!(growth(5_000_000), 6_315_536);
        // 5 MB may take 6.0 MiB: 8.0 MiB must be free.
        free.store(8_412_688, Ordering::SeqCst);
        later(&room);
        assert!(!room.short(5_000_000));
        free.store(8_412_687, Ordering::SeqCst);
        later(&room);
        assert!(room.short(5_000_000));
        let e = room
            .admit(5_000_000, stored, |_| Ok(0), || false)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("the next 4.8 MiB of events to store may take 6.0 MiB"),
            "{e}"
        );
        // Small ones still go, and the spell goes on while the large one waits.
        assert!(
            room.admit(1000, stored, |_| panic!("no prune"), no_compact)
                .is_ok()
        );
        assert!(room.short(1000), "the spell ended at a small append");
        // With room for it, the spell ends.
        free.store(18 << 20, Ordering::SeqCst);
        later(&room);
        assert!(!room.short(1000));
        assert!(
            room.admit(5_000_000, stored, |_| panic!("no prune"), no_compact)
                .is_ok()
        );
    }

    /// On a fast disk, the writer commits several batches in one [`LOOK_EVERY`]: all were
    /// let through on a look taken before the first, and they filled the disk to its last
    /// byte. What is let through now counts against the room until the next look, and a room
    /// near `--keep-free` is measured again.
    #[test]
    fn regression_batches_let_through_on_an_old_look_filled_the_disk() {
        let free = Arc::new(AtomicU64::new(20 << 20));
        let room = room(&free, 2 << 20);
        let stored = || Ok::<_, ()>(1 << 30);
        for n in 0..20 {
            let let_through = match n % 2 {
                0 => room.admit(1 << 20, stored, |_| Ok(0), || false).is_ok(),
                _ => !room.short(1 << 20),
            };
            if let_through {
                // The commit takes what it may.
                free.fetch_sub(growth(1 << 20), Ordering::SeqCst);
            }
            assert!(
                free.load(Ordering::SeqCst) >= 2 << 20,
                "append {n} left {}",
                free.load(Ordering::SeqCst)
            );
        }
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
        assert!(!room.short(0));
    }
}
