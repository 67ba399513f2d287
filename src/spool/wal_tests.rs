//! The write-ahead log in the spool ([`super::wal`]): what only the log holds survives a crash
//! with the ids and queue places it was given, is applied once, goes into the file at a
//! checkpoint, and a write the log refuses stores nothing.
//!
//! A crash is a copy of the state directory taken while the spool is open: redb keeps the
//! commits it did not sync in memory, so the copy of `spool.redb` holds only what a `kill -9`
//! would leave of it, and the log what was synced (its writes are synced before they count).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;

use bytes::Bytes;

use super::{Limits, Outcome, Spool, Write, wal};
use crate::event::Event;

const A: &str = "0123456789abcdef http://127.0.0.1:9/a";
const B: &str = "0123456789abcdef http://127.0.0.1:9/b";
const ROOM: Limits = Limits { max_bytes: 1 << 30 };

fn event(n: u64) -> Event {
    Event {
        sse_id: Some(format!("sse-{n}")),
        timestamp_ms: Some(n),
        headers: vec![("x-n".into(), n.to_string())],
        query: vec![],
        body: Bytes::from(format!("{{\"n\":{n}}}")),
    }
}

fn appending(from: u64, n: u64) -> Write {
    Write::Append {
        channel: "https://smee.io/abc".into(),
        routes: vec![A.into(), B.into()],
        events: (from..from + n).map(event).collect::<Vec<_>>().into(),
        cursor: Some(("0123456789abcdef".into(), format!("sse-{}", from + n - 1))),
    }
}

/// How many logs were set aside in `dir` (`spool.wal.unapplied-<time>`).
fn set_aside(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().starts_with("spool.wal.unapplied-")
        })
        .count()
}

/// Write through the log, as the writer thread does; the ids given.
fn logged(spool: &Spool, write: Write) -> Vec<u64> {
    ids(spool.write_logged(&[write], ROOM).unwrap())
}

/// Write through the log as an appender does ([`Spool::try_write_logged`]); the ids given.
fn inline(spool: &Spool, write: Write) -> Vec<u64> {
    ids(spool
        .try_write_logged(&[&write], ROOM)
        .expect("taken at once")
        .unwrap())
}

/// The ids a write gave its events.
fn ids(report: super::WriteReport) -> Vec<u64> {
    report.appended.concat().into_iter().flatten().collect()
}

/// What a reader of the spool sees: each queue as (seq, event id, body), the cursor, and the
/// spool's counts of events and pending deliveries.
type View = (Vec<Vec<(u64, u64, Bytes)>>, Option<String>, u64, u64);

fn view(spool: &Spool) -> View {
    let queues = [A, B]
        .iter()
        .map(|route| {
            spool
                .pending(route, 0, usize::MAX)
                .unwrap()
                .into_iter()
                .map(|q| (q.seq, q.event.id, q.event.event.body))
                .collect()
        })
        .collect();
    let stats = spool.stats().unwrap();
    (
        queues,
        spool.cursor("0123456789abcdef").unwrap(),
        stats.events,
        stats.pending,
    )
}

/// A copy of the state directory as it is now (what a crash would leave), with or without the
/// log.
fn crash_copy(from: &Path, with_log: bool) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    std::fs::copy(
        from.join(super::FILE_NAME),
        to.path().join(super::FILE_NAME),
    )
    .unwrap();
    if with_log {
        std::fs::copy(from.join(wal::FILE_NAME), to.path().join(wal::FILE_NAME)).unwrap();
    }
    // The high-water mark, as a crash leaves it beside the file.
    let highwater = from.join(wal::HIGHWATER_FILE);
    if highwater.exists() {
        std::fs::copy(highwater, to.path().join(wal::HIGHWATER_FILE)).unwrap();
    }
    to
}

/// A new spool in a directory of its own.
fn opened() -> (tempfile::TempDir, Spool) {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    (dir, spool)
}

/// What `spool` shows now is what a crash now would leave of it: the file (and the log, if
/// `with_log`), opened as a new spool, show the same.
fn assert_survives_a_crash(spool: &Spool, dir: &Path, with_log: bool) {
    let seen = view(spool);
    let crashed = crash_copy(dir, with_log);
    assert_eq!(view(&Spool::open(crashed.path()).unwrap()), seen);
}

/// A spool with three logged batches: appends on two routes with the channel's cursor, and
/// the head of one route finished.
fn spool_with_logged_writes(dir: &Path) -> Spool {
    let spool = Spool::open(dir).unwrap();
    assert_eq!(logged(&spool, appending(1, 3)), [1, 2, 3]);
    let head = spool.pending(A, 0, 1).unwrap().remove(0);
    logged(
        &spool,
        Write::Mark {
            route: A.into(),
            seq: head.seq,
            event: head.event.id,
            outcome: Outcome::Delivered { status: 200 },
        },
    );
    assert_eq!(logged(&spool, appending(4, 1)), [4]);
    assert_eq!(spool.logged(), 3, "each batch went through the log");
    spool
}

#[test]
fn what_only_the_log_holds_survives_a_crash_with_its_ids_and_places() {
    let dir = tempfile::tempdir().unwrap();
    let spool = spool_with_logged_writes(dir.path());
    let seen = view(&spool);
    assert_eq!(seen.0[0].len(), 3, "A's head was delivered");
    assert_eq!(seen.0[1].len(), 4);
    assert_eq!(seen.1.as_deref(), Some("sse-4"));

    // Without the log, the file alone holds none of it: the log is what made it durable.
    let without = crash_copy(dir.path(), false);
    let reopened = Spool::open(without.path()).unwrap();
    assert_eq!(view(&reopened).2, 0);
    drop(reopened);

    let crashed = crash_copy(dir.path(), true);
    let reopened = Spool::open(crashed.path()).unwrap();
    assert_eq!(view(&reopened), seen);
    drop(reopened);
    // Applied once: a second start finds the same, and new events take the next ids.
    let reopened = Spool::open(crashed.path()).unwrap();
    assert_eq!(view(&reopened), seen);
    assert_eq!(logged(&reopened, appending(5, 1)), [5]);
}

/// At everyday rates an appender's write is a record of its own; redb applies a run of them
/// in the spool's next transaction (a read, a checkpoint), not one transaction each. Until
/// then the log alone holds them, and they keep the ids and places they were answered with:
/// the same as a spool written without the log gives.
#[test]
fn records_applied_together_later_keep_their_ids_and_places() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    assert_eq!(inline(&spool, appending(1, 2)), [1, 2]);
    assert_eq!(
        spool.deferred(),
        0,
        "the first write learns the spool's counters"
    );
    let report = spool
        .try_write_logged(&[&appending(3, 1)], ROOM)
        .unwrap()
        .unwrap();
    assert_eq!(report.appended, [[Some(3)]]);
    let enqueued = report.enqueued.expect("the routes are told");
    assert_eq!((enqueued.seq_before, enqueued.seq_after), (4, 6));
    let places: Vec<(&str, u64, u64)> = enqueued
        .routes
        .iter()
        .flat_map(|(route, queued)| queued.iter().map(|q| (route.as_str(), q.seq, q.event.id)))
        .collect();
    assert_eq!(places, [(A, 5, 3), (B, 6, 3)]);
    // A's head, marked along with the next append, without a read first (as a route marks
    // what it was told).
    let head = Write::Mark {
        route: A.into(),
        seq: 1,
        event: 1,
        outcome: Outcome::Delivered { status: 200 },
    };
    let report = spool.try_write_logged(&[&head, &appending(4, 1)], ROOM);
    assert_eq!(report.unwrap().unwrap().appended, [[Some(4)]]);
    assert_eq!(spool.deferred(), 2, "two records wait for one transaction");

    // A crash now: the file holds only the first write; the log, the rest.
    let crashed = crash_copy(dir.path(), true);
    let seen = view(&spool);
    assert_eq!(spool.deferred(), 0, "the read applied them");
    assert_eq!(view(&Spool::open(crashed.path()).unwrap()), seen);

    // The same writes, each committed to the file at once.
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = Spool::open(plain_dir.path()).unwrap();
    for writes in [
        vec![appending(1, 2)],
        vec![appending(3, 1)],
        vec![head, appending(4, 1)],
    ] {
        plain.write(&writes, ROOM).unwrap();
    }
    assert_eq!(view(&plain), seen);
    assert_eq!(seen.0[0].len(), 3, "A's head was delivered");

    // A checkpoint after more deferred records puts them in the file.
    assert_eq!(inline(&spool, appending(5, 1)), [5]);
    assert_eq!(inline(&spool, appending(6, 1)), [6]);
    assert_eq!(
        spool.deferred(),
        2,
        "the read's transaction taught the counters"
    );
    spool.checkpoint().unwrap();
    assert_eq!(spool.deferred(), 0);
    assert_survives_a_crash(&spool, dir.path(), false);
}

/// A checkpoint that fails (a full disk) with records not yet applied to redb: they are in the
/// log, and the open that follows the failure applies them.
#[test]
fn deferred_records_survive_a_failed_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, full) = on_a_disk_that_fills(dir.path());
    inline(&relay, appending(1, 1));
    inline(&relay, appending(2, 1));
    inline(&relay, appending(3, 2));
    assert_eq!(relay.deferred(), 2);
    full.store(true, SeqCst);
    assert!(relay.checkpoint().is_err());
    full.store(false, SeqCst);
    let seen = view(&relay);
    assert_eq!(seen.2, 4, "every answered event is there");
    assert_eq!(
        seen.0[1].iter().map(|q| q.1).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert_eq!(logged(&relay, appending(5, 1)), [5]);
    assert_survives_a_crash(&relay, dir.path(), true);
}

/// An appender's record whose write fails is not answered from: the append is committed and
/// synced to the file, with the records deferred before it.
#[test]
fn a_deferred_record_that_cannot_be_written_is_synced_to_the_file() {
    let (dir, spool) = opened();
    inline(&spool, appending(1, 1));
    assert_eq!(inline(&spool, appending(2, 1)), [2]);
    spool.break_wal(true);
    assert_eq!(inline(&spool, appending(3, 1)), [3]);
    assert_eq!(spool.deferred(), 0, "applied with it, in a synced commit");
    spool.break_wal(false);
    assert_survives_a_crash(&spool, dir.path(), false);
    assert_eq!(view(&spool).2, 3);
    // The thread's next write finds the log working again, and appenders defer again.
    assert_eq!(logged(&spool, appending(4, 1)), [4]);
    assert_eq!(inline(&spool, appending(5, 1)), [5]);
    assert_eq!(spool.deferred(), 1);
}

/// An appender checks that no commit failed before it takes the log's lock. A commit failing
/// in between (it may have reached the disk in part, so only the reopen knows the counters)
/// still let it defer its record on the counters from before, and answer from them.
#[test]
fn regression_an_appender_deferred_a_record_after_a_commit_failed() {
    let (_dir, spool) = opened();
    inline(&spool, appending(1, 1));
    // What the appender finds once it holds the log: a commit failed since it looked.
    spool.needs_reopen.store(true, SeqCst);
    let db = spool.db.read().unwrap();
    let mut log = spool.log();
    let write = appending(2, 1);
    let tried = spool.log_and_apply(
        db.as_ref().unwrap(),
        log.as_mut().unwrap(),
        spool.writing(),
        &[&write],
        ROOM,
        true,
    );
    assert!(
        tried.is_none(),
        "left to the thread, which opens the file again first"
    );
    assert!(log.as_ref().unwrap().deferred().is_empty());
    drop((log, db));
    assert_eq!(view(&spool).2, 1);
}

#[test]
fn a_command_opening_after_a_crash_applies_the_log_to_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let spool = spool_with_logged_writes(dir.path());
    let seen = view(&spool);
    let crashed = crash_copy(dir.path(), true);
    // A command opens it shared: other processes may write the file next, so what the log
    // held is synced to the file at once.
    let command = Spool::open_shared(crashed.path()).unwrap();
    assert_eq!(view(&command), seen);
    drop(command);
    std::fs::remove_file(crashed.path().join(wal::FILE_NAME)).unwrap();
    let reopened = Spool::open(crashed.path()).unwrap();
    assert_eq!(view(&reopened), seen);
}

#[test]
fn a_checkpoint_puts_it_in_the_file_and_the_log_starts_over() {
    let dir = tempfile::tempdir().unwrap();
    let spool = spool_with_logged_writes(dir.path());
    assert!(spool.checkpoint().unwrap(), "committed");
    assert!(!spool.checkpoint().unwrap(), "nothing left to commit");
    assert_eq!(spool.logged(), 0);
    assert_survives_a_crash(&spool, dir.path(), false);

    // The next record goes at the start of the log, over the old ones, which a start after a
    // crash must not apply again.
    assert_eq!(logged(&spool, appending(5, 1)), [5]);
    assert_eq!(spool.logged(), 1);
    assert_survives_a_crash(&spool, dir.path(), true);
}

#[test]
fn what_the_log_does_not_take_is_synced_to_the_file_and_starts_it_over() {
    let (dir, spool) = opened();
    logged(&spool, appending(1, 1));
    assert_eq!(spool.logged(), 1);
    // A pipeline state: synced, with what the log held before it.
    let state = Write::State {
        key: "rule\u{0}entity".into(),
        value: Some(b"{}".to_vec()),
    };
    spool.write_logged(&[state], ROOM).unwrap();
    assert_eq!(spool.logged(), 0);
    // A large batch (past MAX_LOGGED_BYTES): synced too.
    logged(&spool, appending(2, 1));
    let big = Write::Append {
        channel: "c".into(),
        routes: vec![A.into()],
        events: Arc::from(vec![Event {
            body: Bytes::from(vec![b'x'; wal::MAX_LOGGED_BYTES]),
            ..event(3)
        }]),
        cursor: None,
    };
    logged(&spool, big);
    assert_eq!(spool.logged(), 0);
    assert_survives_a_crash(&spool, dir.path(), false);
}

#[test]
fn a_full_log_makes_the_next_commit_a_synced_one() {
    let (dir, spool) = opened();
    for n in 0..wal::CHECKPOINT_RECORDS as u64 {
        logged(&spool, appending(n + 1, 1));
    }
    assert_eq!(spool.logged(), wal::CHECKPOINT_RECORDS);
    logged(&spool, appending(100, 1));
    assert_eq!(spool.logged(), 0);
    let seen = view(&spool);
    assert_eq!(seen.2, wal::CHECKPOINT_RECORDS as u64 + 1);
    let without = crash_copy(dir.path(), false);
    assert_eq!(view(&Spool::open(without.path()).unwrap()), seen);
}

#[test]
fn a_log_that_cannot_be_written_leaves_each_commit_synced_to_the_file() {
    let (dir, spool) = opened();
    logged(&spool, appending(1, 1));
    spool.break_wal(true);
    assert_eq!(logged(&spool, appending(2, 1)), [2], "stored all the same");
    assert_eq!(
        spool.logged(),
        0,
        "synced to the file, with what the log held"
    );
    assert_eq!(spool.write_error(), None);
    let seen = view(&spool);
    assert_eq!(seen.2, 2);
    let without = crash_copy(dir.path(), false);
    assert_eq!(view(&Spool::open(without.path()).unwrap()), seen);
    spool.break_wal(false);
    logged(&spool, appending(3, 1));
    assert_eq!(spool.logged(), 1, "logged again once it takes writes");
}

#[test]
fn a_relay_started_after_a_crash_goes_on_logging_and_survives_a_second_crash() {
    let dir = tempfile::tempdir().unwrap();
    let spool = spool_with_logged_writes(dir.path());
    let first = crash_copy(dir.path(), true);
    drop(spool);
    let restarted = Spool::open(first.path()).unwrap();
    assert_eq!(
        restarted.logged(),
        3,
        "applied in memory; still only in the log"
    );
    assert_eq!(logged(&restarted, appending(5, 2)), [5, 6]);
    assert_survives_a_crash(&restarted, first.path(), true);
}

#[test]
fn a_synced_commit_outside_the_writer_between_records_keeps_ids_and_order() {
    let (dir, spool) = opened();
    logged(&spool, appending(1, 2));
    // A catch-up's append, say: synced, with what the log held before it.
    spool.write(&[appending(3, 1)], ROOM).unwrap();
    assert_eq!(spool.logged(), 0);
    logged(&spool, appending(4, 1));
    logged(&spool, appending(5, 1));
    let seen = view(&spool);
    assert_eq!(
        seen.0[1].iter().map(|q| q.1).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    let crashed = crash_copy(dir.path(), true);
    assert_eq!(view(&Spool::open(crashed.path()).unwrap()), seen);
}

/// The README's way out of a damaged spool is to move `spool.redb` aside and start again: the
/// new spool must not be given the old log's records (they would be delivered again).
/// The README's way out of a damaged spool in `dir`: the file moved aside, a new one opened
/// beside the old log. The new spool, and the names in `dir` then.
fn a_new_spool_beside_the_old(dir: &Path) -> (Spool, Vec<String>) {
    std::fs::rename(dir.join(super::FILE_NAME), dir.join("spool.redb.damaged")).unwrap();
    let fresh = Spool::open(dir).unwrap();
    let names = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    (fresh, names)
}

#[test]
fn a_new_spool_beside_an_old_log_is_not_given_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let spool = spool_with_logged_writes(dir.path());
    let crashed = crash_copy(dir.path(), true);
    drop(spool);
    let (fresh, names) = a_new_spool_beside_the_old(crashed.path());
    assert_eq!(view(&fresh).2, 0, "nothing of the old log applied");
    let aside: Vec<_> = names
        .into_iter()
        .filter(|name| name.starts_with("spool.wal.unapplied-"))
        .collect();
    assert_eq!(aside.len(), 1, "the old log is kept aside");
    assert_eq!(
        wal::read(&crashed.path().join(&aside[0]))
            .unwrap()
            .records
            .len(),
        3
    );
    assert_eq!(logged(&fresh, appending(1, 1)), [1]);
    drop(fresh);
    assert_eq!(view(&Spool::open(crashed.path()).unwrap()).2, 1);
}

/// Two more records logged in `spool` (in `dir`), then its log put beside the `backup` of its
/// file, which is opened: a restore from that backup after a crash.
fn restore_beside_new_records(
    spool: &Spool,
    dir: &Path,
    backup: &Path,
) -> Result<Spool, super::SpoolError> {
    logged(spool, appending(2, 1));
    logged(spool, appending(3, 1));
    std::fs::copy(dir.join(wal::FILE_NAME), backup.join(wal::FILE_NAME)).unwrap();
    Spool::open(backup)
}

/// That `opened` failed as a spool that lost commits, with `events` in its log it cannot apply.
fn assert_lost_commits(opened: Result<Spool, super::SpoolError>, events: usize) {
    let Err(error) = opened else {
        panic!("a spool that lost commits was opened");
    };
    assert!(
        matches!(&error, super::SpoolError::Damaged { why: super::Damage::LostCommits { events: n, .. }, .. } if *n == events),
        "{error}"
    );
    assert!(error.needs_the_user());
    assert!(
        error.to_string().contains("lost commits it had made"),
        "{error}"
    );
}

/// Regression (helper-149): the damaged-spool message said to read what is left by copying
/// the file and its log to a directory of their own; for a file behind its log that met the
/// same refusal, leading back to itself. It says to copy the file alone, which opens.
#[test]
fn regression_the_salvage_advice_for_a_file_behind_its_log_led_back_to_itself() {
    let (dir, spool) = opened();
    logged(&spool, appending(1, 1));
    let backup = crash_copy(dir.path(), false);
    spool.checkpoint().unwrap();
    let Err(error) = restore_beside_new_records(&spool, dir.path(), backup.path()) else {
        panic!("a spool that lost commits was opened");
    };
    let said = error.to_string();
    assert!(
        said.contains("put the file alone, as spool.redb (without its log), in a directory"),
        "{said}"
    );
    let salvage = tempfile::tempdir().unwrap();
    std::fs::copy(
        backup.path().join(super::FILE_NAME),
        salvage.path().join(super::FILE_NAME),
    )
    .unwrap();
    // What the file holds is read (here nothing: its one event was in the log at the copy).
    let read = Spool::open_shared(salvage.path()).expect("the file alone opens");
    assert_eq!(view(&read).0[0].len(), 0);
}

/// Regression: once a checkpoint had started the log over, nothing said what the file held:
/// after a crash, a file that redb's recovery took back to an older commit (one flipped bit
/// after an idle checkpoint), or an older copy put back, opened without a word, its later
/// events gone and their delivery ids given again to new events. The high-water mark the
/// checkpoint leaves now finds it.
#[test]
fn regression_a_spool_behind_its_last_checkpoint_opened_without_a_word() {
    let (dir, spool) = opened();
    logged(&spool, appending(1, 1));
    spool.checkpoint().unwrap();
    let older = crash_copy(dir.path(), false);
    logged(&spool, appending(2, 2));
    spool.checkpoint().unwrap();
    assert_eq!(spool.logged(), 0, "the log started over");
    // A healthy crash now opens, the high-water mark beside it.
    assert_survives_a_crash(&spool, dir.path(), true);
    // The older file beside the present log and high-water mark.
    for name in [wal::FILE_NAME, wal::HIGHWATER_FILE] {
        std::fs::copy(dir.path().join(name), older.path().join(name)).unwrap();
    }
    assert_lost_commits(Spool::open(older.path()), 0);
    // A spool made anew beside them (another instance) is not held to them.
    let (fresh, _) = a_new_spool_beside_the_old(dir.path());
    drop(fresh);
}

/// Regression: a spool file behind its own log (the same instance, older counters) was taken
/// for a spool made anew: the log was set aside with a warning and the relay went on, its
/// events lost and their ids given again. That is what a disk's damage looks like after redb's
/// recovery (it falls back to its last sound commit when a newer one fails its checksum: one
/// flipped bit took a relay back to an empty spool), as much as a restore of the file's own
/// older copy. The open now fails as for a damaged spool (exit 2), and leaves the log in place.
#[test]
fn regression_a_spool_behind_its_own_log_went_on_without_the_logs_events() {
    let (dir, spool) = opened();
    logged(&spool, appending(1, 1));
    let backup = crash_copy(dir.path(), false);
    spool.checkpoint().unwrap();
    assert_lost_commits(
        restore_beside_new_records(&spool, dir.path(), backup.path()),
        2,
    );
    assert_eq!(set_aside(backup.path()), 0, "the log is left in place");
    assert_eq!(
        wal::read(&backup.path().join(wal::FILE_NAME))
            .unwrap()
            .records
            .len(),
        2
    );
}

/// A relay's spool on a disk that is full while the flag is set (redb's writes fail; the log,
/// written before, still takes records).
fn on_a_disk_that_fills(dir: &Path) -> (Spool, Arc<AtomicBool>) {
    let (factory, full) = super::backend::DiskFull::factory();
    (Spool::open_with(dir, factory).unwrap(), full)
}

/// Before it shares the file, a relay commits what only its log holds. When that fails (a
/// full disk) it keeps the file alone: shared, the log could only be applied by a synced
/// commit, which would fail the same way, and the relay could not open the file again.
#[test]
fn a_relay_that_cannot_commit_its_log_keeps_the_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, full) = on_a_disk_that_fills(dir.path());
    logged(&relay, appending(1, 1));
    let seen = view(&relay);
    full.store(true, SeqCst);
    let request = super::share::Request::make(dir.path(), None).unwrap();
    relay.share_look(relay.sharing.lock().unwrap());
    assert_eq!(relay.sharing.lock().unwrap().mode, super::Mode::Alone);
    assert_eq!(relay.logged(), 1);
    // With room again, the next read opens the file again (as after any failed commit),
    // applying the log, and the next look shares it.
    full.store(false, SeqCst);
    assert_eq!(view(&relay), seen);
    relay.share_look(relay.sharing.lock().unwrap());
    assert_eq!(relay.sharing.lock().unwrap().mode, super::Mode::Shared);
    assert_eq!(view(&relay), seen);
    drop(request);
    drop(relay);
    std::fs::remove_file(dir.path().join(wal::FILE_NAME)).unwrap();
    assert_eq!(view(&Spool::open(dir.path()).unwrap()), seen);
}

/// A relay whose checkpoint failed (a full disk) opens its file again before its next read.
/// With a command's request waiting it opened it shared, where the log could only be applied
/// by a synced commit: every reopen then failed that way, until the disk had room again. It
/// now opens it alone again while its log holds what the file does not.
#[test]
fn regression_a_failed_checkpoint_with_a_command_waiting_reopened_the_spool_shared() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, full) = on_a_disk_that_fills(dir.path());
    logged(&relay, appending(1, 2));
    let seen = view(&relay);
    full.store(true, SeqCst);
    assert!(relay.checkpoint().is_err());
    let _request = super::share::Request::make(dir.path(), None).unwrap();
    // The reopen before the read, on the full disk.
    let _ = relay.pending(A, 0, 10);
    assert_eq!(relay.sharing.lock().unwrap().mode, super::Mode::Alone);
    assert_eq!(relay.logged(), 1, "the log's records still counted");
    full.store(false, SeqCst);
    assert_eq!(view(&relay), seen);
    assert_eq!(relay.sharing.lock().unwrap().mode, super::Mode::Alone);
}

/// While the disk stays full, a relay opens its file again before each read and write, about
/// twice a second, and each open applied the log's records again with an `INFO` line that said
/// the relay "stopped without a checkpoint": the same line, untrue, for as long as the disk was
/// full. The same records applied again are now said once.
#[test]
fn regression_each_reopen_on_a_full_disk_said_the_relay_had_stopped_without_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, full) = on_a_disk_that_fills(dir.path());
    logged(&relay, appending(1, 2));
    full.store(true, SeqCst);
    assert!(relay.checkpoint().is_err());
    let (logs, _guard) = crate::test_logs::capture_at(tracing::Level::INFO);
    for _ in 0..3 {
        // The reopen before the read, on the full disk; then the next write fails again.
        let _ = relay.pending(A, 0, 10);
        assert!(relay.checkpoint().is_err());
    }
    let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let said = logs.matches("stopped without a checkpoint").count();
    assert_eq!(said, 1, "{logs}");
    full.store(false, SeqCst);
    relay.checkpoint().unwrap();
}

/// The same, with a new record logged between two failed writes (a delivery recorded while
/// appends fail on a disk too full for them): each reopen applied records not applied before,
/// and said so at `INFO`, about once a second for as long as the disk was full. Records applied
/// by a reopen of the process's own spool are said once.
#[test]
fn regression_each_reopen_on_a_full_disk_said_so_again_when_a_record_was_new() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, full) = on_a_disk_that_fills(dir.path());
    let (logs, _guard) = crate::test_logs::capture_at(tracing::Level::INFO);
    for n in 0..3 {
        full.store(false, SeqCst);
        logged(&relay, appending(10 * n + 1, 1));
        full.store(true, SeqCst);
        assert!(relay.checkpoint().is_err());
        // The reopen before the read applies the record, on the full disk.
        let _ = relay.pending(A, 0, 10);
    }
    let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let said = logs.matches("stopped without a checkpoint").count();
    assert_eq!(said, 1, "{logs}");
    full.store(false, SeqCst);
    relay.checkpoint().unwrap();
    assert_eq!(view(&relay).0[0].len(), 3, "every record applied");
}

/// On a disk too full for events, a delivery recorded in pages already written succeeded:
/// the spool said "takes writes again", the relay's health went back to 200, and the next
/// append failed with the same ERROR, by turns, about once a second. After a failed append,
/// the spool takes writes again only once an append succeeds.
#[test]
fn regression_a_delivery_recorded_on_a_disk_too_full_for_events_said_it_took_writes_again() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, full) = on_a_disk_that_fills(dir.path());
    for n in 0..20 {
        spool.write(&[appending(10 * n + 1, 5)], ROOM).unwrap();
    }
    spool.checkpoint().unwrap();
    full.store(true, SeqCst);
    let (logs, _guard) = crate::test_logs::capture_at(tracing::Level::INFO);
    let large = || Write::Append {
        channel: "https://smee.io/abc".into(),
        routes: vec![A.into()],
        events: vec![Event {
            body: Bytes::from(vec![b'x'; 1 << 20]),
            ..event(500)
        }]
        .into(),
        cursor: None,
    };
    assert!(spool.write_logged(&[large()], ROOM).is_err());
    // The writer said the outage (its end is said only then).
    assert!(spool.say_outage());
    let head = spool.pending(A, 0, 1).unwrap().remove(0);
    let mark = Write::Mark {
        route: A.into(),
        seq: head.seq,
        event: head.event.id,
        outcome: Outcome::Delivered { status: 200 },
    };
    spool
        .write_logged(&[mark], ROOM)
        .expect("a mark fits in pages written");
    assert!(spool.write_error().is_some(), "appends still fail");
    assert!(!spool.takes_writes());
    full.store(false, SeqCst);
    logged(&spool, large());
    assert!(spool.takes_writes());
    let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert_eq!(logs.matches("takes writes again").count(), 1, "{logs}");
}

/// The same, and the first append after it was an appender's, kept in the log with its apply
/// deferred: no commit, so the spool never said it took writes again, and `/healthz` stayed 503
/// while events were stored (a CI run under load found it).
#[test]
fn regression_an_append_kept_in_the_log_alone_did_not_end_the_outage() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, full) = on_a_disk_that_fills(dir.path());
    logged(&spool, appending(1, 1));
    full.store(true, SeqCst);
    spool.break_wal(true);
    assert!(spool.write_logged(&[appending(2, 1)], ROOM).is_err());
    assert!(!spool.takes_writes());
    full.store(false, SeqCst);
    spool.break_wal(false);
    // A delivery recorded first (the writer thread's), which does not end the outage.
    let head = spool.pending(A, 0, 1).unwrap().remove(0);
    logged(
        &spool,
        Write::Mark {
            route: A.into(),
            seq: head.seq,
            event: head.event.id,
            outcome: Outcome::Delivered { status: 200 },
        },
    );
    assert!(!spool.takes_writes());
    inline(&spool, appending(3, 1));
    assert!(spool.deferring.load(SeqCst), "kept in the log alone");
    assert!(spool.takes_writes());
}

/// A spool file restored from a backup taken after the log's last checkpoint, but written to
/// since (a synced append): the log's next records expect counters the file no longer has.
#[test]
fn a_spool_restored_from_a_backup_that_differs_is_not_given_the_logs_records() {
    let (dir, spool) = opened();
    logged(&spool, appending(1, 1));
    spool.checkpoint().unwrap();
    let backup = crash_copy(dir.path(), false);
    // The backup is then written to on its own (by the same instance: same id in the file).
    {
        let diverged = Spool::open(backup.path()).unwrap();
        diverged.write(&[appending(50, 1)], ROOM).unwrap();
    }
    let restored = restore_beside_new_records(&spool, dir.path(), backup.path()).unwrap();
    let events: Vec<u64> = view(&restored).0[1].iter().map(|q| q.1).collect();
    assert_eq!(events, [1, 2], "the backup's own events only");
}

/// A relay stopped cleanly leaves a log whose records are all in the spool file: a spool made
/// anew beside it (the README's way out of damage) took them for records of another spool and
/// warned that they were not applied. They are now erased from the log at each checkpoint.
#[test]
fn regression_a_new_spool_beside_a_cleanly_stopped_relays_log_warned_of_unapplied_records() {
    let dir = tempfile::tempdir().unwrap();
    let spool = spool_with_logged_writes(dir.path());
    spool.checkpoint().unwrap();
    drop(spool);
    let (fresh, names) = a_new_spool_beside_the_old(dir.path());
    assert_eq!(view(&fresh).2, 0);
    assert!(
        !names.iter().any(|name| name.contains("unapplied")),
        "nothing set aside: {names:?}"
    );
}

/// A log holding a record this build cannot read (written by another version) is kept aside,
/// not written over as if it ended there.
#[test]
fn a_log_with_a_record_this_build_cannot_read_is_kept_aside() {
    let dir = tempfile::tempdir().unwrap();
    let spool = spool_with_logged_writes(dir.path());
    let seen = view(&spool);
    let crashed = crash_copy(dir.path(), true);
    drop(spool);
    // The third record's head, changed as another version might write it, checksum and all.
    let path = crashed.path().join(wal::FILE_NAME);
    let mut log = std::fs::read(&path).unwrap();
    let chain = wal::read(&path).unwrap();
    assert_eq!(chain.records.len(), 3);
    let third = {
        let mut at = 0usize;
        for _ in 0..2 {
            at += 12 + u32::from_le_bytes(log[at..at + 4].try_into().unwrap()) as usize;
        }
        at
    };
    let len = u32::from_le_bytes(log[third..third + 4].try_into().unwrap()) as usize;
    let payload = third + 12..third + 12 + len;
    // A head's first byte names its layout: 2 is one this build does not know.
    log[payload.start + 4] = 2;
    let sum = wal::checksum(&log[payload]);
    log[third + 4..third + 12].copy_from_slice(&sum.to_le_bytes());
    std::fs::write(&path, log).unwrap();

    let reopened = Spool::open(crashed.path()).unwrap();
    let found = view(&reopened);
    assert_eq!(found.0[1].len(), 3, "the two records before it applied");
    assert_ne!(found, seen);
    let aside = set_aside(crashed.path());
    assert_eq!(aside, 1, "the log is kept aside");
}

/// A retry of the first delivery on route A, its error `len` bytes long: a large record with
/// no event in it.
fn retried(spool: &Spool, len: usize) -> Write {
    let queued = spool.pending(A, 0, 1).unwrap().remove(0);
    Write::Mark {
        route: A.into(),
        seq: queued.seq,
        event: queued.event.id,
        outcome: Outcome::Retry {
            status: Some(503),
            error: "x".repeat(len),
        },
    }
}

/// An inline commit (`try_write_logged`, on an appender's event loop) on a spool near its
/// `--max-spool-size` pruned first, a scan of every delivery record, on the event loop. It now
/// does nothing and leaves the write to the writer thread, which may wait.
#[test]
fn regression_a_quick_write_near_a_full_spool_pruned_on_the_event_loop() {
    let (_dir, spool) = opened();
    let small = Limits { max_bytes: 10_000 };
    let write = appending(1, 1);
    assert!(spool.try_write_logged(&[&write], small).is_none());
    assert_eq!(spool.logged(), 0, "nothing written");
    assert_eq!(view(&spool).2, 0, "nothing stored");
    spool.write_logged(&[write], small).unwrap();
    assert_eq!(view(&spool).2, 1);
    // Far from full, it is done at once.
    assert!(spool.try_write_logged(&[&appending(2, 1)], ROOM).is_some());
    assert_eq!(view(&spool).2, 2);
}

/// A quick write whose record the log had no room for (the estimate counts events, not the
/// marks riding along) was synced to the file instead, on the event loop. It now does nothing.
#[test]
fn regression_a_quick_write_the_log_had_no_room_for_was_synced_on_the_event_loop() {
    let (_dir, spool) = opened();
    logged(&spool, appending(1, 1));
    // Nine marks of 110 KB: about 60 KB of the log's 1 MiB left.
    for _ in 0..9 {
        spool
            .write_logged(&[retried(&spool, 110_000)], ROOM)
            .unwrap();
    }
    let before = spool.logged();
    let seen = view(&spool);
    let large = retried(&spool, 100_000);
    assert!(spool.try_write_logged(&[&large], ROOM).is_none());
    assert_eq!(spool.logged(), before, "no checkpoint, no record");
    assert_eq!(view(&spool), seen);
    // A write that may wait takes it: synced to the file, and the log starts over.
    spool.write_logged(&[large], ROOM).unwrap();
    assert_eq!(spool.logged(), 0);
}

/// Found upgrading after a crash: the older relay's log records expect the spool's stored bytes
/// as its JSON rows counted them. The first record applied here stores a smaller row, and every
/// record after it was set aside as not following this spool: those events were lost.
#[test]
fn regression_a_log_of_several_records_from_before_format_3_was_applied_only_in_part() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    let counters = |spool: &Spool| {
        spool
            .read(|txn| {
                let meta = txn.open_table(super::META)?;
                let get = |name| -> Result<u64, redb::Error> {
                    Ok(meta.get(name)?.map_or(0, |v| v.value()))
                };
                Ok((
                    wal::Expect {
                        instance: get(super::INSTANCE)?,
                        next_event: get(super::NEXT_EVENT)?,
                        next_seq: get(super::NEXT_SEQ)?,
                        stored_bytes: get(super::STORED_BYTES)?,
                    },
                    get(super::WAL_SEQ)?,
                ))
            })
            .unwrap()
    };
    let (mut expect, applied) = counters(&spool);
    let path = spool.path().to_owned();
    drop(spool);

    // What the older relay logged before it was killed: two appends, each expecting the spool
    // as the one before left it, with the row sizes of that version (a JSON header).
    let mut log = wal::Wal::open(&path, &wal::Chain::default(), applied).unwrap();
    let now = 1_000;
    for n in 1..=2 {
        let write = Write::Append {
            channel: "https://smee.io/abc".into(),
            routes: vec![A.into(), B.into()],
            events: vec![event(n)].into(),
            cursor: None,
        };
        let record = wal::encode_before_format_3(log.next_seq(), expect, now, ROOM, &[write]);
        log.append(&record).unwrap();
        let e = event(n);
        let header = super::EventHeader {
            received_ms: now,
            channel: "https://smee.io/abc".into(),
            sse_id: e.sse_id.clone(),
            timestamp_ms: e.timestamp_ms,
            headers: e.headers.clone(),
            query: e.query.clone(),
            chunked_len: None,
        };
        let json_row = 4 + serde_json::to_vec(&header).unwrap().len() + e.body.len();
        expect.next_event += 1;
        expect.next_seq += 2;
        expect.stored_bytes += json_row as u64;
    }
    drop(log);

    let upgraded = Spool::open(dir.path()).unwrap();
    let (queues, _, events, pending) = view(&upgraded);
    assert_eq!(events, 2, "both records applied");
    assert_eq!(pending, 4);
    for queue in &queues {
        let bodies: Vec<&Bytes> = queue.iter().map(|(_, _, body)| body).collect();
        assert_eq!(bodies, [&event(1).body, &event(2).body]);
    }
    let unapplied = set_aside(dir.path());
    assert_eq!(unapplied, 0, "nothing set aside");
}

/// The offset of record `n` (from 0) in the log `log`.
fn record_at(log: &[u8], n: usize) -> usize {
    let mut at = 0usize;
    for _ in 0..n {
        at += 12 + u32::from_le_bytes(log[at..at + 4].try_into().unwrap()) as usize;
    }
    at
}

/// The spool in `crashed` opened after `damage` was done to its log's bytes, and what its open
/// warned of.
fn reopened_after(crashed: &Path, damage: impl FnOnce(&mut Vec<u8>)) -> (Spool, String) {
    let path = crashed.join(wal::FILE_NAME);
    let mut log = std::fs::read(&path).unwrap();
    damage(&mut log);
    std::fs::write(&path, log).unwrap();
    let (logs, guard) = crate::test_logs::capture();
    let reopened = Spool::open(crashed).unwrap();
    drop(guard);
    let said = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    (reopened, said)
}

/// Regression: a record damaged on the disk after its sync ended the log's chain there, and
/// the records after it (answered, so their events promised) were dropped without a word: the
/// start said it applied the records before it and that nothing was lost.
#[test]
fn regression_records_after_a_damaged_one_were_dropped_without_a_word() {
    let dir = tempfile::tempdir().unwrap();
    let spool = spool_with_logged_writes(dir.path());
    let crashed = crash_copy(dir.path(), true);
    drop(spool);
    // A bit of the second record's payload flipped, as a failing disk would.
    let (reopened, said) = reopened_after(crashed.path(), |log| {
        let second = record_at(log, 1);
        log[second + 12 + 30] ^= 0x10;
    });
    assert!(
        said.contains("ERROR")
            && said.contains("write-ahead log is damaged: its record 2")
            && said.contains("1 record after it (1 events, 0 delivery marks,"),
        "{said}"
    );
    assert_eq!(set_aside(crashed.path()), 1, "the damaged log is kept");
    assert_eq!(
        view(&reopened).2,
        3,
        "the first record's events are applied"
    );
    // The relay goes on, with a new log, and never gives again the id the stranded record gave
    // (its event may have been delivered under it).
    assert_eq!(logged(&reopened, appending(10, 1)), [5]);
}

/// A record cut by a crash (its sync never returned, so nothing after it was answered) ends
/// the log quietly, as before: the records before it are applied, the log is not set aside.
#[test]
fn a_record_cut_by_a_crash_ends_the_log_without_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let spool = spool_with_logged_writes(dir.path());
    let crashed = crash_copy(dir.path(), true);
    drop(spool);
    // The last record's second half never reached the disk.
    let (reopened, said) = reopened_after(crashed.path(), |log| {
        let (third, end) = (record_at(log, 2), record_at(log, 3));
        log[(third + end) / 2..end].fill(0);
    });
    assert!(said.is_empty(), "no warning: {said}");
    assert_eq!(set_aside(crashed.path()), 0);
    assert_eq!(view(&reopened).2, 3, "the first two records' events");
}

/// A record made up in a webhook's body with this spool's instance (delivery ids carry it) and
/// absurd counters: after a clean stop the log is not searched at all; after a cut end it can
/// raise a false alarm, but move the counters no further than a log could.
#[test]
fn a_record_made_up_with_the_spools_instance_cannot_move_its_counters_far() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    let forged = wal::Expect {
        instance: spool.instance,
        next_event: u64::MAX - 1,
        next_seq: u64::MAX - 1,
        stored_bytes: 0,
    };
    let mut body = vec![b' '; 3000];
    for seq in 2..=20 {
        body.extend(wal::encode(seq, forged, 0, ROOM, &[&appending(100, 1)]).unwrap());
    }
    assert_eq!(logged(&spool, carrying(1, body)), [1]);
    spool.checkpoint().unwrap();
    drop(spool);
    let (reopened, said) = reopened_after(dir.path(), |_| {});
    assert!(said.is_empty(), "a clean stop: {said}");
    assert_eq!(logged(&reopened, appending(2, 1)), [2]);
    assert_eq!(logged(&reopened, appending(3, 1)), [3]);
    let crashed = crash_copy(dir.path(), true);
    drop(reopened);
    let (reopened, _) = reopened_after(crashed.path(), |log| {
        let end = record_at(log, 2);
        log[end - 1] ^= 1;
    });
    let next = logged(&reopened, appending(4, 1))[0];
    assert!(next <= 3 + wal::MOST_TAKEN + 1, "{next}");
}

/// One event `n` whose body is `body`.
fn carrying(n: u64, body: Vec<u8>) -> Write {
    let mut write = appending(n, 1);
    if let Write::Append { events, .. } = &mut write {
        let mut event = events[0].clone();
        event.body = Bytes::from(body);
        *events = vec![event].into();
    }
    write
}

/// Bytes that look like a record of the log's present cycle, in a webhook's body past where a
/// crash cut the log, are no record of this spool's: they do not carry its instance, which no
/// webhook can know. A cut end then stays quiet.
#[test]
fn a_record_made_up_in_a_webhook_past_a_cut_end_is_not_taken_for_damage() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    // A record as the log would hold it, numbered 3, of another instance.
    let other = wal::Expect {
        instance: 7,
        next_event: 0,
        next_seq: 0,
        stored_bytes: 0,
    };
    let made_up = wal::encode(3, other, 0, ROOM, &[&appending(100, 1)]).unwrap();
    let mut body = vec![b' '; 3000];
    body.extend_from_slice(&made_up);
    assert_eq!(logged(&spool, carrying(1, body)), [1]);
    spool.checkpoint().unwrap();
    // The log started over: its records 2 and 3 go where the carrier was.
    assert_eq!(logged(&spool, appending(2, 1)), [2]);
    assert_eq!(logged(&spool, appending(3, 1)), [3]);
    let crashed = crash_copy(dir.path(), true);
    drop(spool);
    let (reopened, said) = reopened_after(crashed.path(), |log| {
        let end = record_at(log, 2);
        log[end - 1] ^= 1;
    });
    assert!(said.is_empty(), "{said}");
    assert_eq!(set_aside(crashed.path()), 0);
    assert_eq!(view(&reopened).2, 2, "the carrier and record 2's event");
}

/// Regression (an adversary's finding): a relay stopped on a full disk could not start again
/// until space was freed (exit 1, "cannot apply the spool's write-ahead log"): a log of a
/// megabyte took more pages than redb keeps in memory, and writing them out needs the disk.
#[test]
fn regression_a_full_log_is_applied_at_an_open_on_a_full_disk() {
    // A few large events a record, and many small ones (more pages per byte).
    for (per_record, size) in [(1, 15 << 10), (40, 300)] {
        let (crashed, factory, full, events) = crashed_with_a_nearly_full_log(per_record, size);
        full.store(true, SeqCst);
        let relay = Spool::open_with(crashed.path(), factory)
            .unwrap_or_else(|e| panic!("{}", crate::error::chain(&e)));
        assert_eq!(view(&relay).2, events, "every logged event is there");
    }
}

/// A crashed copy of a spool whose log is nearly full of appends of `per_record` events of
/// `size` bytes, on a disk that fills when told; with its factory, the switch, and how many
/// events it holds.
fn crashed_with_a_nearly_full_log(
    per_record: u64,
    size: usize,
) -> (
    tempfile::TempDir,
    super::backend::Factory,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    u64,
) {
    let dir = tempfile::tempdir().unwrap();
    let (factory, full) = super::backend::DiskFull::factory();
    let before = Spool::open_with(dir.path(), factory.clone()).unwrap();
    before.write(&[appending(1, 5)], ROOM).unwrap();
    before.checkpoint().unwrap();
    // Records until the log is nearly full.
    let mut next = 100;
    while before.logged() < 60 {
        let events: Vec<Event> = (next..next + per_record)
            .map(|n| Event {
                body: Bytes::from(vec![b'x'; size]),
                ..event(n)
            })
            .collect();
        logged(
            &before,
            Write::Append {
                channel: "https://smee.io/abc".into(),
                routes: vec![A.into(), B.into()],
                events: events.into(),
                cursor: None,
            },
        );
        next += per_record;
    }
    let crashed = crash_copy(dir.path(), true);
    (crashed, factory, full, 5 + next - 100)
}

/// Regression (helper-122): each open on a full disk that applied the log in memory warned
/// again, and a relay opens its spool again at each switch between sharing it and having it
/// alone: 183 lines in 3 minutes. Said once a process.
#[test]
fn regression_each_open_on_a_full_disk_warned_again() {
    let (crashed, factory, full, _) = crashed_with_a_nearly_full_log(1, 15 << 10);
    full.store(true, SeqCst);
    let (logs, _guard) = crate::test_logs::capture();
    for _ in 0..3 {
        drop(Spool::open_with(crashed.path(), factory.clone()).unwrap());
    }
    let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    // Once at most: another test of this process may have said it first.
    assert!(logs.matches("applied in memory").count() <= 1, "{logs}");
}

/// A relay restarted on a disk already full after a crash: its open applied the log in memory,
/// its first checkpoint failed, and a delivery recorded next (in pages written) said "the spool
/// takes writes again", just before the first append failed again.
#[test]
fn regression_a_relay_restarted_on_a_full_disk_said_it_took_writes_again_before_an_append() {
    let dir = tempfile::tempdir().unwrap();
    let (factory, full) = super::backend::DiskFull::factory();
    let before = Spool::open_with(dir.path(), factory.clone()).unwrap();
    for n in 0..20 {
        before.write(&[appending(10 * n + 1, 5)], ROOM).unwrap();
    }
    before.checkpoint().unwrap();
    logged(&before, appending(500, 3));
    let crashed = crash_copy(dir.path(), true);
    drop(before);
    full.store(true, SeqCst);
    let (logs, _guard) = crate::test_logs::capture_at(tracing::Level::INFO);
    let relay = Spool::open_with(crashed.path(), factory).unwrap();
    let checkpointed = relay.checkpoint();
    let head = relay.pending(A, 0, 1).unwrap().remove(0);
    let mark = Write::Mark {
        route: A.into(),
        seq: head.seq,
        event: head.event.id,
        outcome: Outcome::Delivered { status: 200 },
    };
    let marked = relay.write_logged(&[mark], ROOM).map(|_| ());
    let large = Write::Append {
        channel: "https://smee.io/abc".into(),
        routes: vec![A.into()],
        events: vec![Event {
            body: Bytes::from(vec![b'x'; 1 << 20]),
            ..event(900)
        }]
        .into(),
        cursor: None,
    };
    let appended = relay.write_logged(&[large], ROOM).map(|_| ());
    assert!(checkpointed.is_err() && marked.is_ok() && appended.is_err());
    // The writer said the outage (its end is said only then).
    assert!(relay.say_outage());
    assert!(!relay.takes_writes());
    let said =
        |logs: &std::sync::Mutex<Vec<u8>>| String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert_eq!(
        said(&logs).matches("takes writes again").count(),
        0,
        "{}",
        said(&logs)
    );
    // With room again, the idle checkpoint (the writer thread's) ends the outage.
    full.store(false, SeqCst);
    assert!(relay.checkpoint().unwrap());
    assert!(relay.takes_writes());
    assert_eq!(
        said(&logs).matches("takes writes again").count(),
        1,
        "{}",
        said(&logs)
    );
}

/// Regression (an adversary's finding): a `spool.highwater` that is not whole (damaged, or
/// written by something else) was ignored in silence, and with it the check that the spool
/// did not come back from a crash behind its last commits. It is a warning now; the spool
/// still opens, and the file is written anew when the log next starts over.
#[test]
fn regression_a_damaged_highwater_file_was_ignored_in_silence() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = Spool::open(dir.path()).unwrap();
        logged(&spool, appending(1, 3));
        assert!(spool.checkpoint().unwrap(), "the log starts over");
    }
    let highwater = dir.path().join(wal::HIGHWATER_FILE);
    assert!(
        highwater.exists(),
        "the log's start-over leaves the high-water mark"
    );
    std::fs::write(&highwater, b"not a high-water mark").unwrap();
    let (logs, guard) = crate::test_logs::capture();
    let reopened = Spool::open(dir.path()).unwrap();
    drop(guard);
    let said = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(
        said.contains("WARN") && said.contains("spool.highwater") && said.contains("damaged"),
        "{said}"
    );
    assert_eq!(view(&reopened).2, 3, "the spool opens whole");
}

/// Regression (helper-137): a disk at its last blocks failed the log's writes and took them by
/// turns, and each turn said both "cannot write the spool's write-ahead log" and "takes writes
/// again", about once a second. A failure is now said at most once a minute, and its end only
/// if it was said.
#[test]
fn regression_a_log_failing_by_turns_said_each_turn() {
    let (_dir, spool) = opened();
    let (logs, _guard) = crate::test_logs::capture_at(tracing::Level::INFO);
    for n in 0..5 {
        spool.break_wal(true);
        inline(&spool, appending(2 * n + 1, 1));
        spool.break_wal(false);
        logged(&spool, appending(2 * n + 2, 1));
    }
    let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert_eq!(
        logs.matches("cannot write the spool's write-ahead log")
            .count(),
        1,
        "{logs}"
    );
    assert_eq!(
        logs.matches("write-ahead log takes writes again").count(),
        1,
        "{logs}"
    );
}

/// Regression (helper-139): a disk at its last blocks refused and took writes by turns, and
/// each turn said "cannot write to the spool" (the writer's, when [`Spool::say_outage`] lets
/// it) and "the spool takes writes again", about every 1.5 s. An outage is said at most once a
/// minute, and its end only if it was said.
#[test]
fn regression_a_disk_refusing_writes_by_turns_said_each_turn() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, full) = on_a_disk_that_fills(dir.path());
    let (logs, _guard) = crate::test_logs::capture_at(tracing::Level::INFO);
    let mut said = Vec::new();
    for n in 0..5 {
        full.store(true, SeqCst);
        spool.break_wal(true);
        assert!(
            spool
                .write_logged(&[appending(2 * n + 1, 1)], ROOM)
                .is_err()
        );
        said.push(spool.say_outage());
        full.store(false, SeqCst);
        spool.break_wal(false);
        logged(&spool, appending(2 * n + 2, 1));
    }
    assert_eq!(said, [true, false, false, false, false]);
    let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert_eq!(
        logs.matches("the spool takes writes again").count(),
        1,
        "{logs}"
    );
}
