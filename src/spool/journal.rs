//! The delivery journal: each finished delivery (delivered or dead) is appended here, one record,
//! before its route starts the next one, and before its mark reaches the spool's group commit.
//! A `write` into the kernel's page cache survives the death of the process (`kill -9`, a
//! panic, the OOM killer), so after a process crash at most the delivery in flight on each route
//! is repeated. It is not synced: after a power loss, the marks of the last group-commit
//! interval can be missing, as before.
//!
//! Each process has its own journal (`journal-PID-RANDOM.marks` in the state directory, locked
//! while it runs); a journal whose lock is free belongs to a process that died, and the next
//! relay to start applies its marks to the spool and deletes it. Applying a mark twice is
//! harmless (a mark names its queue position, and a finished delivery ignores later marks).
//!
//! A mark is a binary record: [`TAG`], the payload's length (u32 LE), its checksum (u64 LE,
//! the write-ahead log's) and the mark's fields as the log holds them (`wal::put_mark`).
//! Journals written before (JSON lines with an FNV-1a checksum, named `.log`, by a relay that
//! died before an upgrade) are still read. A journal is read from its start for as long as
//! records pass their checksum: a record cut by a crash ends it. A compaction writes the marks
//! it keeps into a new file and renames it over the old, so a crash leaves one or the other,
//! whole.
//!
//! This module only keeps the file; the writer thread decides when marks are committed.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Read as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Deserialize;
#[cfg(test)]
use serde::Serialize;

use super::bin::Reader;
use super::{Outcome, Write, wal};

/// Past this size, the journal is rewritten with only the marks not yet committed.
const COMPACT_AT: u64 = 64 << 10;

/// A journal's file name ends in this: `journal-PID-RANDOM.marks`.
const EXTENSION: &str = "marks";

/// How journals of JSON lines, written before records, were named (`journal-PID-RANDOM.log`).
/// Records have a name of their own because an older relay reads every `.log` as lines: in
/// records, a target's error text is held raw, and one holding a newline and a line with a
/// valid checksum would be read by it as a mark.
const LINES_EXTENSION: &str = "log";

/// The first byte of a record.
const TAG: u8 = 1;

/// A record's tag, length and checksum.
const HEADER: usize = 1 + 4 + 8;

/// One finished delivery, as a line of a journal written before records (JSON; written by tests
/// only, as an older relay wrote it).
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct Entry<'a> {
    route: std::borrow::Cow<'a, str>,
    seq: u64,
    event: u64,
    outcome: std::borrow::Cow<'a, Outcome>,
}

/// This process's journal.
#[derive(Debug)]
pub(crate) struct Journal {
    inner: Mutex<Inner>,
    /// For messages.
    path: PathBuf,
}

#[derive(Debug)]
struct Inner {
    /// Open, and exclusively locked, for as long as the process runs.
    file: File,
    /// Bytes in the file.
    len: u64,
    /// The records written whose marks are not known to be committed yet, oldest first: what a
    /// compaction keeps.
    uncommitted: VecDeque<Vec<u8>>,
}

/// Marks left by a process that died, and the journal files they came from (locked by us
/// until they are removed).
pub(crate) struct Orphans {
    pub(crate) marks: Vec<Write>,
    files: Vec<(PathBuf, File)>,
}

impl Orphans {
    /// Delete the journals, once their marks are committed.
    pub(crate) fn remove(self) {
        for (path, _file) in self.files {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Journal {
    /// Start this process's journal in `dir`, and collect the marks of dead processes'.
    pub(crate) fn start(dir: &Path) -> std::io::Result<(Journal, Orphans)> {
        // Collect orphans first: our own file must not be among them.
        let orphans = orphans(dir)?;
        let name = format!("journal-{}-{:08x}", std::process::id(), fastrand::u32(..));
        let path = dir.join(format!("{name}.{EXTENSION}"));
        let file = locked_file(&path, &[])?;
        let journal = Journal {
            inner: Mutex::new(Inner {
                file,
                len: 0,
                uncommitted: VecDeque::new(),
            }),
            path,
        };
        Ok((journal, orphans))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Append `mark` (a `Write::Mark`), then call `then` (which hands the mark to the writer
    /// thread) under the same lock, so that the journal's records and the writer's marks are in
    /// the same order.
    pub(crate) fn record<T>(&self, mark: &Write, then: impl FnOnce() -> T) -> std::io::Result<T> {
        let Some((route, seq, event, outcome)) = fields(mark) else {
            return Ok(then());
        };
        let line = encode(route, seq, event, outcome);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = inner.file.write_all_at(&line, inner.len) {
            // A part written (the disk filled up) must not stay past the end: the next record
            // would go over its start, and a reader after a crash would go on into the rest of
            // it, an error text a target chose. Shrinking takes no space.
            let _ = inner.file.set_len(inner.len);
            return Err(e);
        }
        inner.len += line.len() as u64;
        inner.uncommitted.push_back(line);
        Ok(then())
    }

    /// On a clean stop: delete the journal if every mark in it is committed.
    pub(crate) fn close(&self) {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.uncommitted.is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// The oldest `n` recorded marks are committed to the spool.
    pub(crate) fn committed(&self, n: usize) {
        if n == 0 {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let n = n.min(inner.uncommitted.len());
        inner.uncommitted.drain(..n);
        if inner.len < COMPACT_AT {
            return;
        }
        let keep: Vec<u8> = inner.uncommitted.iter().flatten().copied().collect();
        // Only once it saves half: a backlog of uncommitted marks is not rewritten per commit.
        if keep.len() as u64 > inner.len / 2 {
            return;
        }
        match locked_file(&self.path, &keep) {
            Ok(file) => {
                // The old file's lock goes with it; the new one is locked already.
                inner.file = file;
                inner.len = keep.len() as u64;
            }
            Err(e) => {
                tracing::warn!(journal = %self.path.display(), "cannot compact the delivery journal: {e}")
            }
        }
    }
}

/// A journal file at `path` holding `contents`, exclusively locked: made under another name,
/// locked and written there, then renamed to `path` (over the file there, if any). Locked
/// before it gets a name that others look for, so nobody takes it for an orphan; whole before
/// it replaces a journal, so a crash leaves the old one or the new one.
fn locked_file(path: &Path, contents: &[u8]) -> std::io::Result<File> {
    // A crash may leave it: the next start's orphan scan removes it once its lock is free.
    let tmp = path.with_extension("tmp");
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    let made = file
        .lock()
        .and_then(|()| file.write_all_at(contents, 0))
        .and_then(|()| std::fs::rename(&tmp, path));
    if made.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    made.map(|()| file)
}

/// A mark's route, seq, event id and outcome; `None` for any other write.
fn fields(mark: &Write) -> Option<(&str, u64, u64, &Outcome)> {
    match mark {
        Write::Mark {
            route,
            seq,
            event,
            outcome,
        } => Some((route, *seq, *event, outcome)),
        _ => None,
    }
}

/// A mark's record (see the module header).
fn encode(route: &str, seq: u64, event: u64, outcome: &Outcome) -> Vec<u8> {
    let mut record = Vec::with_capacity(HEADER + route.len() + 32);
    record.push(TAG);
    record.extend_from_slice(&[0; HEADER - 1]);
    wal::put_mark(&mut record, route, seq, event, outcome);
    let payload = &record[HEADER..];
    let (len, sum) = (payload.len() as u32, wal::checksum(payload));
    record[1..5].copy_from_slice(&len.to_le_bytes());
    record[5..HEADER].copy_from_slice(&sum.to_le_bytes());
    record
}

/// Whether `file` is the file at `path` now.
fn same_file(file: &File, path: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt as _;
    let open = file.metadata()?;
    Ok(match std::fs::metadata(path) {
        Ok(named) => open.dev() == named.dev() && open.ino() == named.ino(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    })
}

/// The marks of a journal of lines (written before records).
fn decode_lines(bytes: &[u8]) -> Vec<Write> {
    bytes
        .split(|b| *b == b'\n')
        .filter_map(decode_line)
        .collect()
}

/// The marks in a journal's records, from its start for as long as they are whole.
#[cfg(test)]
fn decode_records(bytes: &[u8]) -> Vec<Write> {
    decode_whole_records(bytes).0
}

/// [`decode_records`], and how many bytes they took (the rest is cut or damaged).
fn decode_whole_records(bytes: &[u8]) -> (Vec<Write>, usize) {
    let mut marks = Vec::new();
    let mut rest = bytes;
    while let Some((mark, len)) = decode_record(rest) {
        marks.push(mark);
        rest = &rest[len..];
    }
    (marks, bytes.len() - rest.len())
}

/// The record at the start of `bytes`, and its length.
fn decode_record(bytes: &[u8]) -> Option<(Write, usize)> {
    let mut r = Reader(bytes);
    if r.u8()? != TAG {
        return None;
    }
    let len = usize::try_from(r.u32()?).ok()?;
    let sum = r.u64()?;
    let payload = r.take(len)?;
    if wal::checksum(payload) != sum {
        return None;
    }
    let mut fields = Reader(payload);
    let mark = wal::read_mark(&mut fields)?;
    fields.0.is_empty().then_some((mark, HEADER + len))
}

/// A line of a journal written before records: the entry's JSON, a tab, an FNV-1a checksum of
/// the JSON, a newline.
fn decode_line(line: &[u8]) -> Option<Write> {
    let tab = line.iter().rposition(|b| *b == b'\t')?;
    let (json, sum) = (&line[..tab], std::str::from_utf8(&line[tab + 1..]).ok()?);
    if u64::from_str_radix(sum.trim(), 16).ok()? != fnv1a(json) {
        return None;
    }
    let entry: Entry<'_> = serde_json::from_slice(json).ok()?;
    Some(Write::Mark {
        route: entry.route.into_owned(),
        seq: entry.seq,
        event: entry.event,
        outcome: entry.outcome.into_owned(),
    })
}

pub(super) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// How old a journal's `.tmp` file must be before a start takes it for a crash's.
const LEFT_BEHIND: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether the file at `path` was last changed longer than `age` ago (not if that is unknown).
fn older_than(path: &Path, age: std::time::Duration) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .is_ok_and(|at| at.elapsed().is_ok_and(|elapsed| elapsed > age))
}

/// The journals in `dir` whose process is gone (their lock is free), locked by us now.
fn orphans(dir: &Path) -> std::io::Result<Orphans> {
    let mut found = Orphans {
        marks: Vec::new(),
        files: Vec::new(),
    };
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let extension = path.extension().and_then(|e| e.to_str());
        let lines = extension == Some(LINES_EXTENSION);
        // A new journal file that a crash left before its rename (a compaction's holds only
        // what is still in the journal it was made from): only removed. Not while it is
        // young: a live relay's is unlocked for the moment between its making and its lock.
        let made = extension == Some("tmp");
        if made && !older_than(&path, LEFT_BEHIND) {
            continue;
        }
        if !(name.starts_with("journal-") && (lines || made || extension == Some(EXTENSION))) {
            continue;
        }
        let Ok(mut file) = File::options().read(true).write(true).open(&path) else {
            continue;
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => continue, // a live relay's
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        // The file opened may have been replaced meanwhile by its relay's compaction, which
        // frees the old file's lock once the new one has its name: the lock taken is then a
        // live relay's old file's, and its name the live journal's. Only the file still under
        // that name, locked by us, is a dead relay's (a live one always holds the file there).
        if !same_file(&file, &path)? {
            continue;
        }
        let mut bytes = Vec::new();
        if lines {
            file.read_to_end(&mut bytes)?;
            found.marks.extend(decode_lines(&bytes));
        } else if !made {
            file.read_to_end(&mut bytes)?;
            let (marks, read) = decode_whole_records(&bytes);
            if read < bytes.len() {
                tracing::warn!(
                    journal = %path.display(),
                    "the delivery journal of a relay that stopped is unreadable past byte {read} \
                     of {} (cut by a power loss, or damaged on disk): the {} finished deliveries \
                     before it are applied; any recorded after it may be delivered again",
                    bytes.len(),
                    marks.len()
                );
            }
            found.marks.extend(marks);
        }
        found.files.push((path, file));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(seq: u64) -> Write {
        Write::Mark {
            route: "k http://127.0.0.1:9/".into(),
            seq,
            event: seq * 10,
            outcome: Outcome::Dead {
                status: Some(400),
                error: "bad\tinput\n".into(),
            },
        }
    }

    fn seqs(marks: &[Write]) -> Vec<u64> {
        marks
            .iter()
            .map(|m| match m {
                Write::Mark { seq, .. } => *seq,
                _ => unreachable!(),
            })
            .collect()
    }

    /// A crash between a compaction's making of its new file and its rename left the file
    /// (`journal-*.tmp`) in the state directory for good.
    #[test]
    fn regression_a_compactions_file_left_by_a_crash_stayed_forever() {
        let dir = tempfile::tempdir().unwrap();
        let left = dir.path().join("journal-1-0000beef.tmp");
        let young = dir.path().join("journal-2-0000cafe.tmp");
        let held = dir.path().join("journal-3-0000f00d.tmp");
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for path in [&left, &held] {
            let file = File::create(path).unwrap();
            file.write_all_at(&encode("r", 1, 1, &Outcome::Delivered { status: 200 }), 0)
                .unwrap();
            file.set_modified(hour_ago).unwrap();
        }
        File::create(&young).unwrap();
        // A live relay's, locked (as it is from just after its making until its rename).
        let holder = File::open(&held).unwrap();
        holder.lock().unwrap();

        let (journal, found) = Journal::start(dir.path()).unwrap();
        assert!(
            found.marks.is_empty(),
            "what it holds is in the journal it came from"
        );
        found.remove();
        assert!(!left.exists());
        assert!(
            young.exists() && held.exists(),
            "a live relay's is left alone"
        );
        drop(journal);
    }

    #[test]
    fn a_dead_process_journal_is_found_whole_and_a_live_one_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (first, none) = Journal::start(dir.path()).unwrap();
        assert!(none.marks.is_empty());
        for seq in 1..=3 {
            first.record(&mark(seq), || ()).unwrap();
        }
        // While it is held, another start does not take it.
        let (second, found) = Journal::start(dir.path()).unwrap();
        assert!(found.marks.is_empty());
        drop(second);
        // A torn last record (a power loss in the middle of a write) is skipped.
        {
            let inner = first.inner.lock().unwrap();
            let Write::Mark { outcome, .. } = mark(4) else {
                unreachable!()
            };
            let torn = encode("k http://127.0.0.1:9/", 4, 40, &outcome);
            inner
                .file
                .write_all_at(&torn[..torn.len() - 3], inner.len)
                .unwrap();
        }
        let path = first.path().to_owned();
        drop(first);
        // Regression (an adversary's finding): a journal cut or damaged on disk was read up to
        // the damage without a word, and the deliveries recorded past it were repeated.
        let (logs, guard) = crate::test_logs::capture();
        let (_third, found) = Journal::start(dir.path()).unwrap();
        drop(guard);
        let said = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
        assert!(
            said.contains("WARN")
                && said.contains("unreadable past byte")
                && said.contains("the 3 finished deliveries before it are applied"),
            "{said}"
        );
        assert_eq!(seqs(&found.marks), [1, 2, 3]);
        assert!(
            matches!(&found.marks[0], Write::Mark { outcome: Outcome::Dead { error, .. }, .. } if error == "bad\tinput\n")
        );
        found.remove();
        assert!(!path.exists());
    }

    /// A line as journals were written before records.
    fn json_line(mark: &Write) -> Vec<u8> {
        let (route, seq, event, outcome) = fields(mark).unwrap();
        let entry = Entry {
            route: route.into(),
            seq,
            event,
            outcome: std::borrow::Cow::Borrowed(outcome),
        };
        let mut line = serde_json::to_vec(&entry).unwrap();
        let sum = fnv1a(&line);
        line.extend_from_slice(format!("\t{sum:016x}\n").as_bytes());
        line
    }

    #[test]
    fn a_journal_of_json_lines_left_by_a_relay_before_records_is_still_applied() {
        let dir = tempfile::tempdir().unwrap();
        let mut old = Vec::new();
        for seq in 1..=3 {
            old.extend(json_line(&mark(seq)));
        }
        // Its last line cut by a crash.
        old.extend_from_slice(&json_line(&mark(4))[..20]);
        let path = dir
            .path()
            .join(format!("journal-1-0000abcd.{LINES_EXTENSION}"));
        std::fs::write(&path, old).unwrap();
        let (_journal, found) = Journal::start(dir.path()).unwrap();
        assert_eq!(seqs(&found.marks), [1, 2, 3]);
        assert!(
            matches!(&found.marks[2], Write::Mark { outcome: Outcome::Dead { error, status: Some(400) }, .. } if error == "bad\tinput\n")
        );
        found.remove();
        assert!(!path.exists());
    }

    #[test]
    fn a_record_inside_a_targets_error_text_is_not_read_as_a_mark() {
        // A target that answers with the bytes of a record that would mark another delivery
        // done: they are the error's text, read as part of the record that holds them. (An
        // error is text: the forger picks a status and an event that make the record UTF-8.)
        let forged = (1..1_000_000)
            .map(|event| {
                let done = Outcome::Delivered { status: 299 };
                encode("k http://127.0.0.1:9/", 7, event, &done)
            })
            .find_map(|record| String::from_utf8(record).ok())
            .unwrap();
        assert_eq!(seqs(&decode_records(forged.as_bytes())), [7], "a record");
        let outcome = Outcome::Retry {
            status: Some(503),
            error: forged,
        };
        let mut bytes = encode("k http://127.0.0.1:9/", 1, 10, &outcome);
        assert_eq!(seqs(&decode_records(&bytes)), [1]);
        // Cut, the record holding it ends the journal; nothing inside it is taken.
        bytes.truncate(bytes.len() - 1);
        assert!(decode_records(&bytes).is_empty());
    }

    #[test]
    fn compaction_keeps_what_is_not_committed() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::start(dir.path()).unwrap();
        let mut seq = 0;
        while journal.inner.lock().unwrap().len < COMPACT_AT {
            seq += 1;
            journal.record(&mark(seq), || ()).unwrap();
        }
        journal.committed(seq as usize - 2);
        assert!(journal.inner.lock().unwrap().len < 1024, "compacted");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 1, "the new file replaced the old: {names:?}");
        assert!(names[0].ends_with(".marks"));
        // Still locked: another start does not take it for a dead relay's.
        let (_other, found) = Journal::start(dir.path()).unwrap();
        assert!(found.marks.is_empty());
        journal.record(&mark(seq + 1), || ()).unwrap();
        drop(journal);
        let (_, found) = Journal::start(dir.path()).unwrap();
        assert_eq!(seqs(&found.marks), [seq - 1, seq, seq + 1]);
    }

    #[test]
    fn regression_an_orphan_scan_racing_a_compaction_took_the_live_journal_and_removed_it() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::start(dir.path()).unwrap();
        let live = journal.path().to_owned();
        let (stop, compactions) = (AtomicBool::new(false), AtomicUsize::new(0));
        let taken = std::thread::scope(|scope| {
            scope.spawn(|| {
                for seq in 1.. {
                    if stop.load(Relaxed) {
                        break;
                    }
                    let before = journal.inner.lock().unwrap().len;
                    journal.record(&mark(seq), || ()).unwrap();
                    journal.committed(1);
                    if journal.inner.lock().unwrap().len < before {
                        compactions.fetch_add(1, Relaxed);
                    }
                }
            });
            // Scan while it compacts, 1,000 times (the bug showed within a few hundred).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            let mut taken = 0;
            while compactions.load(Relaxed) < 1000 && std::time::Instant::now() < deadline {
                let found = orphans(dir.path()).unwrap();
                taken += found.files.len();
                found.remove();
            }
            stop.store(true, Relaxed);
            taken
        });
        assert!(
            compactions.load(Relaxed) > 0,
            "the journal compacted meanwhile"
        );
        assert_eq!(taken, 0, "a live journal was taken for a dead relay's");
        assert!(live.exists(), "the live journal's name was removed");
    }

    #[test]
    fn regression_an_older_relay_read_a_journal_of_records_as_lines() {
        // A target's error text held raw in a record, with a newline and a line an older relay
        // reads as a mark of another delivery done (it reads every `journal-*.log` as lines).
        let forged = json_line(&Write::Mark {
            route: "victim http://127.0.0.1:9/".into(),
            seq: 42,
            event: 4242,
            outcome: Outcome::Delivered { status: 200 },
        });
        let error = format!(
            "target answered 400: x\n{}x",
            String::from_utf8(forged).unwrap()
        );
        let outcome = Outcome::Dead {
            status: Some(400),
            error,
        };
        let record = encode("k http://127.0.0.1:9/", 1, 10, &outcome);
        assert_eq!(
            seqs(&decode_lines(&record)),
            [42],
            "read as lines, it forges"
        );
        assert_eq!(seqs(&decode_records(&record)), [1]);
        // So records never go into a file an older relay reads as lines.
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::start(dir.path()).unwrap();
        let extension = journal.path().extension().unwrap();
        assert_ne!(extension, LINES_EXTENSION);
    }

    proptest::proptest! {
        /// Whatever a journal holds, reading it never panics.
        #[test]
        fn any_bytes_read_without_a_panic(bytes in proptest::collection::vec(proptest::arbitrary::any::<u8>(), 0..512)) {
            let _ = decode_records(&bytes);
            let mut tagged = vec![TAG];
            tagged.extend(&bytes);
            let _ = decode_records(&tagged);
        }

        /// Marks read back as written, in order; cut anywhere, the whole ones before the cut.
        #[test]
        fn marks_read_back_as_written_and_a_cut_keeps_the_whole_ones(
            errors in proptest::collection::vec("\\PC{0,40}", 1..6),
            cut in proptest::arbitrary::any::<proptest::sample::Index>(),
        ) {
            let mut bytes = Vec::new();
            let mut ends = Vec::new();
            for (n, error) in errors.iter().enumerate() {
                let outcome = Outcome::Dead { status: None, error: error.clone() };
                bytes.extend(encode("k http://127.0.0.1:9/", n as u64, 10 * n as u64, &outcome));
                ends.push(bytes.len());
            }
            let all = decode_records(&bytes);
            proptest::prop_assert_eq!(seqs(&all), (0..errors.len() as u64).collect::<Vec<_>>());
            for (mark, error) in all.iter().zip(&errors) {
                let is_it = matches!(mark, Write::Mark { outcome: Outcome::Dead { error: e, .. }, .. } if e == error);
                proptest::prop_assert!(is_it);
            }
            let at = cut.index(bytes.len());
            let whole = ends.iter().filter(|end| **end <= at).count();
            proptest::prop_assert_eq!(decode_records(&bytes[..at]).len(), whole);
        }
    }
}
