//! The delivery journal: each finished delivery (delivered or dead) is appended here, one line,
//! before its route starts the next one, and before its mark reaches the spool's group commit.
//! A `write` into the kernel's page cache survives the death of the process (`kill -9`, a
//! panic, the OOM killer), so after a process crash at most the delivery in flight on each route
//! is repeated. It is not synced: after a power loss, the marks of the last group-commit
//! interval can be missing, as before.
//!
//! Each process has its own journal (`journal-PID-RANDOM.log` in the state directory, locked
//! while it runs); a journal whose lock is free belongs to a process that died, and the next
//! relay to start applies its marks to the spool and deletes it. Applying a mark twice is
//! harmless (a mark names its queue position, and a finished delivery ignores later marks).
//!
//! This module only keeps the file; the writer thread decides when marks are committed.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Read as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::{Outcome, Write};

/// Past this size, the journal is rewritten with only the marks not yet committed.
const COMPACT_AT: u64 = 64 << 10;

/// One finished delivery, as a line of the journal.
#[derive(Serialize, Deserialize)]
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
    /// The lines written whose marks are not known to be committed yet, oldest first: what a
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
        let tmp = dir.join(format!("{name}.tmp"));
        let path = dir.join(format!("{name}.log"));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        // Locked before it gets a name that others look for: nobody takes it for an orphan.
        file.lock()?;
        std::fs::rename(&tmp, &path)?;
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
    /// thread) under the same lock, so that the journal's lines and the writer's marks are in
    /// the same order.
    pub(crate) fn record<T>(&self, mark: &Write, then: impl FnOnce() -> T) -> std::io::Result<T> {
        let Write::Mark {
            route,
            seq,
            event,
            outcome,
        } = mark
        else {
            return Ok(then());
        };
        let entry = Entry {
            route: route.as_str().into(),
            seq: *seq,
            event: *event,
            outcome: std::borrow::Cow::Borrowed(outcome),
        };
        let line = encode(&entry);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.file.write_all_at(&line, inner.len)?;
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
        // Rewritten in place, from the start: only when what is kept is at most half the file,
        // so the new lines never overwrite the old copies of themselves. A crash in between
        // leaves stale lines, which are harmless when applied again.
        if keep.len() as u64 > inner.len / 2 {
            return;
        }
        let rewrite = inner
            .file
            .write_all_at(&keep, 0)
            .and_then(|()| inner.file.set_len(keep.len() as u64));
        match rewrite {
            Ok(()) => inner.len = keep.len() as u64,
            Err(e) => {
                tracing::warn!(journal = %self.path.display(), "cannot compact the delivery journal: {e}")
            }
        }
    }
}

/// A line: the entry's JSON, a tab, a checksum of the JSON (a line cut by a crash or a
/// compaction does not pass it), a newline.
fn encode(entry: &Entry<'_>) -> Vec<u8> {
    use std::io::Write as _;
    let mut line = Vec::with_capacity(160);
    serde_json::to_writer(&mut line, entry).expect("an entry always serialises");
    let sum = fnv1a(&line);
    // Into the line itself: a `format!` here was a second allocation per delivery.
    writeln!(line, "\t{sum:016x}").expect("a Vec takes every write");
    line
}

fn decode(line: &[u8]) -> Option<Write> {
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

/// The journals in `dir` whose process is gone (their lock is free), locked by us now.
fn orphans(dir: &Path) -> std::io::Result<Orphans> {
    let mut found = Orphans {
        marks: Vec::new(),
        files: Vec::new(),
    };
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !(name.starts_with("journal-") && name.ends_with(".log")) {
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
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        found
            .marks
            .extend(bytes.split(|b| *b == b'\n').filter_map(decode));
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
        // A torn last line (a crash in the middle of a write) is skipped.
        {
            let inner = first.inner.lock().unwrap();
            inner
                .file
                .write_all_at(b"{\"route\":\"x", inner.len)
                .unwrap();
        }
        let path = first.path().to_owned();
        drop(first);
        let (_third, found) = Journal::start(dir.path()).unwrap();
        assert_eq!(seqs(&found.marks), [1, 2, 3]);
        assert!(
            matches!(&found.marks[0], Write::Mark { outcome: Outcome::Dead { error, .. }, .. } if error == "bad\tinput\n")
        );
        found.remove();
        assert!(!path.exists());
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
        journal.record(&mark(seq + 1), || ()).unwrap();
        drop(journal);
        let (_, found) = Journal::start(dir.path()).unwrap();
        assert_eq!(seqs(&found.marks), [seq - 1, seq, seq + 1]);
    }
}
