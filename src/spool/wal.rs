//! The spool's write-ahead log (`spool.wal`): what makes a small commit durable at everyday
//! rates. Owns the file and its record format; the spool decides what goes through it.
//!
//! A redb commit of one event writes about a dozen scattered pages and syncs them: at a few
//! events a second that sync is most of a relay's CPU. While a relay holds the spool alone, its
//! writer thread instead writes a small batch as one record here and syncs that (one write into
//! space written before, so the sync writes no file metadata), then applies the batch to redb in
//! a commit redb keeps in memory ([`redb::Durability::None`]). An appender committing a lone
//! event itself (see `writer`) syncs its record the same way but leaves the apply to the
//! spool's next transaction, which applies a run of them at once ([`Wal::defer`]). Every
//! [`CHECKPOINT_RECORDS`] records, at the writer's next idle look (within a second), before the
//! file is shared and at a clean stop, an ordinary synced commit makes all of it durable in
//! `spool.redb`, and the log starts over at its beginning.
//!
//! Records are numbered: each commit that applies one stores its number (`meta.wal_seq`). After
//! a crash, redb opens at its last synced commit, and the records after the number it holds are
//! applied again, in order, with the time and the size limit they were first applied with, so
//! they give the same event ids and queue places. A record is applied only once its sync
//! returned, and its appenders are answered only after that, so the window in which a crash
//! loses a received event is the one it was: between reading the frame and that sync.
//!
//! Record: `u32` LE payload length, `u64` LE checksum of the payload ([`checksum`]), then the
//! payload: `u32` LE length of a head (number, time, limit, and the writes without their
//! bodies: [`encode_head`]), the head, and the appended events' bodies one after another.
//! Records written before format 3 (see `spool`) have a JSON head and an FNV-1a checksum; they
//! are still read, so a relay upgraded after a crash applies what the older one logged. The log is read from its start for as
//! long as records pass their checksum and number one more than the last: a record cut by a
//! crash, zeros, or what is left of a record from before the log started over ends it. Where it
//! ends on a header that is not empty, the rest is searched for sound records numbered past the
//! end ([`stranded`]): only a record damaged after its sync leaves any, and the spool reports
//! them rather than start over on them unsaid.

use std::borrow::Cow;
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::bin::{Reader, flags, put_pairs, put_text};
use super::{Limits, Outcome, Write};
use crate::event::Event;

/// A failure to write the log is said at most once in this long, and its end only if it was.
const FAILURES_SAID_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// The log's name, beside `spool.redb`.
pub(super) const FILE_NAME: &str = "spool.wal";

/// How many records at most before a synced commit of the spool starts the log over: bounds
/// what redb holds in memory, and what a start after a crash applies again.
pub(super) const CHECKPOINT_RECORDS: usize = 64;

/// The log's size, written (zeros) once when it is made: records go into it in place, so a
/// record's sync writes no metadata. A batch that does not fit is committed to redb directly.
const CAPACITY: u64 = 1 << 20;

/// Most event bytes ([`Event::held_bytes`]) in a batch written through the log: a larger batch
/// already spreads its commit's sync over many events, and through the log it would be written
/// twice.
pub(super) const MAX_LOGGED_BYTES: usize = 64 << 10;

/// Length and checksum.
const HEADER: usize = 4 + 8;

/// More event ids or queue places than one log's records can take (each event in a record
/// takes more than a byte of it).
pub(super) const MOST_TAKEN: u64 = CAPACITY;

/// What a record adds to the events' bytes it carries, generously: its header, its head's
/// JSON and the batch's routes and marks. For guesses made before encoding it.
pub(super) const RECORD_SLACK: usize = 16 << 10;

/// The open log of a spool held alone.
#[derive(Debug)]
pub(super) struct Wal {
    file: File,
    /// For messages.
    path: PathBuf,
    /// Where the next record goes.
    end: u64,
    /// The number of the last record written (or, when none since the log started over, of the
    /// last one applied): the next is one more.
    last: u64,
    /// Records written since the log started over: how many a checkpoint would make durable.
    records: usize,
    /// The last write failed (said once; commits are synced to the spool file meanwhile).
    failing: bool,
    /// When a failure was last said, and whether the current one was (its end is said only
    /// then): a disk at its last blocks fails and takes writes by turns, and each turn said
    /// both lines, one a second (helper-137).
    failure_said: (Option<std::time::Instant>, bool),
    /// Records written and synced whose apply to redb waits for the spool's next transaction
    /// ([`Wal::defer`]): a trickle of records is then applied in one transaction, not one each.
    /// Every transaction of the spool applies them first, in order, and a crash leaves them
    /// to the open after it, as it leaves any record not yet in the file.
    deferred: Vec<Record>,
    /// The bytes of the events they append: held in memory until applied.
    deferred_bytes: usize,
    /// The spool's counters once every record written is applied, while this process knows
    /// them without reading redb: what the next record expects. Unknown after an open until a
    /// commit of the spool has read them.
    known: Option<Expect>,
}

/// What a record expects of the spool it is applied to, as the spool was when the record was
/// written: a record is applied again after a crash only to the same spool in the same state
/// (not to one restored from a backup, made anew beside an old log, or written meanwhile by an
/// older smee-relay that does not know the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Expect {
    /// `meta.instance`.
    pub(super) instance: u64,
    /// `meta.next_event`.
    pub(super) next_event: u64,
    /// `meta.next_seq`.
    pub(super) next_seq: u64,
    /// `meta.stored_bytes` (changed by marks and pruning, which the two above are not).
    pub(super) stored_bytes: u64,
}

impl Expect {
    /// Whether `record` expects the spool as `now` is: the same instance and counters, but for
    /// a record from before format 3 the stored bytes (a relay upgraded after a crash applies
    /// the older one's records, whose expected sizes count JSON rows). Without the stored bytes
    /// the ids and queue places still follow; only the size limit can judge an append
    /// differently, and then only for more room, never less.
    pub(super) fn matches(&self, record: &Record) -> bool {
        if record.before_format_3 {
            Expect {
                stored_bytes: self.stored_bytes,
                ..record.expect
            } == *self
        } else {
            record.expect == *self
        }
    }
}

/// What [`read`] found: the records in order, and where the last ends.
#[derive(Debug, Default)]
pub(super) struct Chain {
    pub(super) records: Vec<Record>,
    pub(super) end: u64,
    /// After the last, a whole record (its checksum passes) that this build cannot read (one
    /// written by another version): the log must not be written over.
    pub(super) unreadable: bool,
}

/// One record: read back, or written and waiting for its apply ([`Wal::defer`]).
#[derive(Debug)]
pub(super) struct Record {
    pub(super) seq: u64,
    pub(super) expect: Expect,
    pub(super) now_ms: u64,
    pub(super) limits: Limits,
    pub(super) writes: Vec<Write>,
    /// Written by a smee-relay before format 3: it expects the spool's stored bytes as that
    /// version counted them (JSON rows, larger than ours), so after the first event applied
    /// here they no longer match ([`Expect::matches`]).
    pub(super) before_format_3: bool,
}

impl Record {
    /// At most how many event ids and queue places it takes (fewer if the spool refuses some).
    pub(super) fn takes(&self) -> (u64, u64) {
        self.writes
            .iter()
            .fold((0, 0), |(ids, places), write| match write {
                Write::Append { events, routes, .. } => (
                    ids + events.len() as u64,
                    places + (events.len() * routes.len()) as u64,
                ),
                _ => (ids, places),
            })
    }

    /// How many events it appends and how many delivery marks it makes.
    pub(super) fn counts(&self) -> (usize, usize) {
        self.writes
            .iter()
            .fold((0, 0), |(events, marks), write| match write {
                Write::Append { events: e, .. } => (events + e.len(), marks),
                Write::Mark { .. } => (events, marks + 1),
                Write::State { .. } => (events, marks),
            })
    }
}

/// The log's path for the spool at `spool`.
pub(super) fn path(spool: &Path) -> PathBuf {
    spool.with_file_name(FILE_NAME)
}

impl Wal {
    /// Open (or make) the log of the spool at `spool` for writing. `chain`: what [`read`] found
    /// in it, of which the records after `applied` are not yet durable in redb (they stay, and
    /// the next record follows them); `applied`: the spool's `meta.wal_seq`.
    pub(super) fn open(spool: &Path, chain: &Chain, applied: u64) -> std::io::Result<Wal> {
        let path = path(spool);
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let len = file.metadata()?.len();
        if len < CAPACITY {
            // Zeros, written: a later record over them changes no block map or size, so its
            // sync is one data write. In pieces: a relay's peak memory is small, and this comes
            // at its start.
            let zeros = [0; 64 << 10];
            let mut at = len;
            while at < CAPACITY {
                let n = (CAPACITY - at).min(zeros.len() as u64);
                file.write_all_at(&zeros[..n as usize], at)?;
                at += n;
            }
            file.sync_all()?;
        }
        // The file's name is durable before any record in it counts (cheap; also when an
        // earlier open made it and a power loss may have come before its directory's sync).
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        let unapplied = chain.records.iter().filter(|r| r.seq > applied).count();
        let last = chain.records.last().map_or(applied, |r| r.seq.max(applied));
        if unapplied == 0 && !chain.records.is_empty() {
            erase_spent(&file);
        }
        Ok(Wal {
            file,
            path,
            end: if unapplied > 0 { chain.end } else { 0 },
            last,
            records: unapplied,
            failing: false,
            failure_said: (None, false),
            deferred: Vec::new(),
            deferred_bytes: 0,
            known: None,
        })
    }

    #[cfg(test)]
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// The number the next record gets.
    pub(super) fn next_seq(&self) -> u64 {
        self.last + 1
    }

    /// Records written since the log started over.
    pub(super) fn records(&self) -> usize {
        self.records
    }

    /// The records whose apply waits ([`Wal::defer`]), in order.
    pub(super) fn deferred(&self) -> &[Record] {
        &self.deferred
    }

    /// The bytes of the events the deferred records append.
    pub(super) fn deferred_bytes(&self) -> usize {
        self.deferred_bytes
    }

    /// The spool's counters once every record written is applied, if known.
    pub(super) fn known(&self) -> Option<Expect> {
        self.known
    }

    /// The record just written ([`Wal::append`]) is applied by the spool's next transaction,
    /// not now; `bytes`: its events' bytes; `after`: the counters it leaves.
    pub(super) fn defer(&mut self, record: Record, bytes: usize, after: Expect) {
        debug_assert_eq!(record.seq, self.last, "the record just written");
        self.deferred.push(record);
        self.deferred_bytes += bytes;
        self.known = Some(after);
    }

    /// A transaction applied the deferred records and committed, leaving the spool's counters
    /// at `after`.
    pub(super) fn applied(&mut self, after: Expect) {
        self.deferred.clear();
        self.deferred_bytes = 0;
        self.known = Some(after);
    }

    /// Whether the last write failed: the next is likely to fail too.
    pub(super) fn failing(&self) -> bool {
        self.failing
    }

    /// Whether a record of `len` bytes may be written now (else the batch is committed to redb
    /// directly, which starts the log over).
    pub(super) fn takes(&self, len: usize) -> bool {
        self.records < CHECKPOINT_RECORDS && self.end + (len + HEADER) as u64 <= CAPACITY
    }

    /// Write `record` (numbered [`Wal::next_seq`]) and sync it. Returns where it starts, for
    /// [`Wal::undo`]; `None` if it could not be written (said once until a write succeeds
    /// again): nothing of it counts, what may have reached the disk is overwritten with zeros
    /// as far as that is possible, and the caller syncs its commit to the spool file instead.
    pub(super) fn append(&mut self, record: &[u8]) -> Option<u64> {
        let at = self.end;
        // Followed by an empty header, in the same write: a start reading the log stops right
        // after the last record, never running on into what an older one left there.
        let mut bytes = Vec::with_capacity(record.len() + HEADER);
        bytes.extend_from_slice(record);
        bytes.extend_from_slice(&[0; HEADER]);
        let written = self
            .file
            .write_all_at(&bytes, at)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            self.erase(at);
            let now = std::time::Instant::now();
            let say = !self.failing
                && (self.failure_said.0)
                    .is_none_or(|at| now.duration_since(at) >= FAILURES_SAID_EVERY);
            self.failing = true;
            if say {
                self.failure_said = (Some(now), true);
                tracing::warn!(
                    wal = %self.path.display(),
                    "cannot write the spool's write-ahead log: {e}; commits are synced to the \
                     spool file instead (more CPU per event, nothing less durable) until it \
                     takes writes again"
                );
            }
            return None;
        }
        if std::mem::take(&mut self.failing) && std::mem::take(&mut self.failure_said.1) {
            tracing::info!(wal = %self.path.display(), "the spool's write-ahead log takes writes again");
        }
        self.end += record.len() as u64;
        self.last += 1;
        self.records += 1;
        Some(at)
    }

    /// The number [`Wal::next_seq`] gave a record that could not be written goes to the synced
    /// commit made instead (as `meta.wal_seq`), so that no open applies what of it may be on
    /// the disk; the next record gets the next number.
    pub(super) fn burn(&mut self) {
        self.last += 1;
    }

    /// The record written at `at` (the last) was not applied (the commit failed): erase it, so
    /// that no start applies it (its appenders were told it failed, and try again).
    pub(super) fn undo(&mut self, at: u64) {
        self.erase(at);
        self.end = at;
        self.last -= 1;
        self.records -= 1;
    }

    /// Zero the header of the record at `at`, which ends the log there.
    fn erase(&self, at: u64) {
        let erased = self
            .file
            .write_all_at(&[0; HEADER], at)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = erased {
            // Only a record that was never answered can be left: the next open of the file
            // (after a crash, or the reopen that follows a failed commit) may apply it, and its
            // appenders' retry then stores its events a second time (repeated, not lost).
            tracing::error!(
                wal = %self.path.display(),
                "cannot erase a record of the spool's write-ahead log whose commit failed: {e}; \
                 its events may be stored twice"
            );
        }
    }

    /// A synced commit of the spool stored `persisted` as `meta.wal_seq`, leaving its counters
    /// at `after`: if that covers every record written, the log starts over at its beginning
    /// (nothing to write: a start reads only the records that follow each other from there),
    /// and the high-water mark beside it ([`write_highwater`]) keeps what the spent records said of the file.
    pub(super) fn persisted(&mut self, persisted: u64, after: Expect) {
        debug_assert!(
            self.deferred.is_empty(),
            "a synced commit applies them first"
        );
        if persisted >= self.last {
            if self.end > 0 {
                erase_spent(&self.file);
                write_highwater(&self.path, after);
            }
            self.end = 0;
            self.records = 0;
        }
    }
}

/// Zero the first record's header of a log whose records are all in the spool file: they no
/// longer count, and a spool file made anew beside the log (`mv spool.redb ...` after damage)
/// is not warned about them. Not synced, and a failure is harmless: a start skips records the
/// file holds by their number.
fn erase_spent(file: &File) {
    let _ = file.write_all_at(&[0; HEADER], 0);
}

/// The high-water mark's file name, beside the log.
pub(super) const HIGHWATER_FILE: &str = "spool.highwater";

/// What the high-water mark holds: `SMHW`, the instance, the next event id and seq, and their checksum.
const HIGHWATER_LEN: usize = 4 + 3 * 8 + 8;

/// Write the high-water mark: the spool's counters after the synced commit that spent the log's records.
/// Once the log starts over, nothing else says what the file held: a file that comes back
/// from a crash behind its high-water mark (redb fell back to an older commit after damage, or an older
/// copy was put back) lost commits it had made ([`read_highwater`]). Written whole under a
/// temporary name and renamed; not synced: the commit it follows is, so the file is never
/// behind a high-water mark that reached the disk, and one that did not is an older one.
/// A failure is harmless (only that check is lost) and said at debug level.
fn write_highwater(log: &Path, after: Expect) {
    let mut bytes = Vec::with_capacity(HIGHWATER_LEN);
    bytes.extend_from_slice(b"SMHW");
    for value in [after.instance, after.next_event, after.next_seq] {
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    bytes.extend_from_slice(&checksum(&bytes).to_le_bytes());
    let highwater = log.with_file_name(HIGHWATER_FILE);
    let temporary = log.with_file_name(format!("{HIGHWATER_FILE}.tmp"));
    if let Err(e) =
        std::fs::write(&temporary, &bytes).and_then(|()| std::fs::rename(&temporary, &highwater))
    {
        tracing::debug!(file = %highwater.display(), "cannot write the spool's high-water mark: {e}");
    }
}

/// The high-water mark beside the log at `log` ([`write_highwater`]): the instance, next event id and next seq
/// of the file when its log last started over. `None` if there is none, or it is not whole
/// (warned: it is only ever written whole, so something else changed it).
pub(super) fn read_highwater(log: &Path) -> Option<(u64, u64, u64)> {
    let file = log.with_file_name(HIGHWATER_FILE);
    let bytes = std::fs::read(&file).ok()?;
    let whole = bytes.len() == HIGHWATER_LEN
        && bytes.starts_with(b"SMHW")
        && checksum(&bytes[..HIGHWATER_LEN - 8]).to_le_bytes() == bytes[HIGHWATER_LEN - 8..];
    if !whole {
        tracing::warn!(
            file = %file.display(),
            "the spool's high-water mark is damaged (smee-relay writes it whole, so something \
             else changed it): the check that the spool did not come back from a crash behind \
             its last commits is skipped this time; the file is written anew when the \
             write-ahead log next starts over"
        );
        return None;
    }
    let body = &bytes[..HIGHWATER_LEN - 8];
    let value = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"));
    Some((value(4), value(12), value(20)))
}

/// The JSON head of a record written before format 3 (read, not written but by tests that make
/// such a log: [`decode_json`]).
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct Head<'a> {
    seq: u64,
    expect: Expect,
    now_ms: u64,
    max_bytes: u64,
    #[serde(borrow)]
    writes: Vec<LoggedWrite<'a>>,
}

/// A write, its events' bodies left out (they follow the head, in order).
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
enum LoggedWrite<'a> {
    Append {
        #[serde(borrow)]
        channel: Cow<'a, str>,
        routes: Cow<'a, [String]>,
        cursor: Option<Cow<'a, (String, String)>>,
        events: Vec<LoggedEvent<'a>>,
    },
    Mark {
        #[serde(borrow)]
        route: Cow<'a, str>,
        seq: u64,
        event: u64,
        outcome: Cow<'a, Outcome>,
    },
}

/// An event, its body left out: only its length.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct LoggedEvent<'a> {
    #[serde(borrow)]
    sse_id: Option<Cow<'a, str>>,
    timestamp_ms: Option<u64>,
    headers: Cow<'a, [(String, String)]>,
    query: Cow<'a, [(String, String)]>,
    body: u64,
}

/// `writes` as a record numbered `seq`, applied at `now_ms` under `limits` to the spool as
/// `expect` says; `None` if one of them is not taken by the log (a pipeline state: those
/// commits are synced as they are).
pub(super) fn encode(
    seq: u64,
    expect: Expect,
    now_ms: u64,
    limits: Limits,
    writes: &[&Write],
) -> Option<Vec<u8>> {
    let body_len: usize = writes
        .iter()
        .map(|w| match w {
            Write::Append { events, .. } => events.iter().map(|e| e.body.len()).sum(),
            _ => 0,
        })
        .sum();
    let mut record = Vec::with_capacity(HEADER + 4 + 512 + body_len);
    record.extend_from_slice(&[0; HEADER + 4]);
    encode_head(&mut record, seq, expect, now_ms, limits, writes)?;
    let head_len = (record.len() - HEADER - 4) as u32;
    record[HEADER..HEADER + 4].copy_from_slice(&head_len.to_le_bytes());
    for write in writes {
        if let Write::Append { events, .. } = write {
            for event in events.iter() {
                record.extend_from_slice(&event.body);
            }
        }
    }
    let payload_len = u32::try_from(record.len() - HEADER).ok()?;
    let sum = checksum(&record[HEADER..]);
    record[..4].copy_from_slice(&payload_len.to_le_bytes());
    record[4..HEADER].copy_from_slice(&sum.to_le_bytes());
    Some(record)
}

/// A record's checksum: rapidhash v3, whose output is fixed across versions and platforms, and
/// reads a record about twenty times as fast as FNV-1a, which records before format 3 carry
/// (and which [`decode`] still accepts).
pub(super) fn checksum(payload: &[u8]) -> u64 {
    rapidhash::v3::rapidhash_v3(payload)
}

/// The first byte of a binary head; a JSON head (before format 3) starts with `{`.
const TAG: u8 = 1;

/// What a write is, in a binary head.
const APPEND: u8 = 0;
const MARK: u8 = 1;
/// What an outcome is, in a binary head.
const DELIVERED: u8 = 0;
const RETRY: u8 = 1;
const DEAD: u8 = 2;
/// An event's flags, in a binary head.
const HAS_SSE_ID: u8 = 1;
const HAS_TIMESTAMP: u8 = 2;

/// The head of a record, binary ([`super::bin`]): [`TAG`]; the number, the four counters of
/// [`Expect`], the time and the size limit (u64 each); the count of writes (u32) and each: an
/// append ([`APPEND`], the channel, the routes (count and texts), a flag byte and the cursor's
/// key and id if set, the events (count, then per event a flags byte, the timestamp and SSE id
/// where flagged, the headers, the query and the body's length (u64))) or a mark ([`MARK`],
/// the mark's fields: [`put_mark`]).
fn encode_head(
    out: &mut Vec<u8>,
    seq: u64,
    expect: Expect,
    now_ms: u64,
    limits: Limits,
    writes: &[&Write],
) -> Option<()> {
    out.push(TAG);
    for n in [
        seq,
        expect.instance,
        expect.next_event,
        expect.next_seq,
        expect.stored_bytes,
        now_ms,
        limits.max_bytes,
    ] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    out.extend_from_slice(&(writes.len() as u32).to_le_bytes());
    for write in writes {
        match write {
            Write::Append {
                channel,
                routes,
                events,
                cursor,
            } => {
                out.push(APPEND);
                put_text(out, channel);
                out.extend_from_slice(&(routes.len() as u32).to_le_bytes());
                for route in routes {
                    put_text(out, route);
                }
                out.push(u8::from(cursor.is_some()));
                if let Some((key, id)) = cursor {
                    put_text(out, key);
                    put_text(out, id);
                }
                out.extend_from_slice(&(events.len() as u32).to_le_bytes());
                for event in events.iter() {
                    let flags = flags(&[
                        (event.sse_id.is_some(), HAS_SSE_ID),
                        (event.timestamp_ms.is_some(), HAS_TIMESTAMP),
                    ]);
                    out.push(flags);
                    if let Some(t) = event.timestamp_ms {
                        out.extend_from_slice(&t.to_le_bytes());
                    }
                    if let Some(id) = &event.sse_id {
                        put_text(out, id);
                    }
                    put_pairs(out, &event.headers);
                    put_pairs(out, &event.query);
                    out.extend_from_slice(&(event.body.len() as u64).to_le_bytes());
                }
            }
            Write::Mark {
                route,
                seq,
                event,
                outcome,
            } => {
                out.push(MARK);
                put_mark(out, route, *seq, *event, outcome);
            }
            // Not taken by the log (see `encode`).
            Write::State { .. } => return None,
        }
    }
    Some(())
}

/// A mark's fields, as a binary head holds them after [`MARK`] (and the delivery journal as
/// its record): the route, seq and event id (u64), the outcome ([`DELIVERED`] and a status
/// (u16), or [`RETRY`] or [`DEAD`], a flag byte, the status if set and the error).
pub(super) fn put_mark(out: &mut Vec<u8>, route: &str, seq: u64, event: u64, outcome: &Outcome) {
    put_text(out, route);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&event.to_le_bytes());
    let (kind, status, error) = match outcome {
        Outcome::Delivered { status } => (DELIVERED, Some(*status), None),
        Outcome::Retry { status, error } => (RETRY, *status, Some(error)),
        Outcome::Dead { status, error } => (DEAD, *status, Some(error)),
    };
    out.push(kind);
    if kind == DELIVERED {
        out.extend_from_slice(&status.unwrap_or(0).to_le_bytes());
    } else {
        out.push(u8::from(status.is_some()));
        out.extend_from_slice(&status.unwrap_or(0).to_le_bytes());
        put_text(out, error.map_or("", String::as_str));
    }
}

/// What [`put_mark`] wrote.
pub(super) fn read_mark(r: &mut Reader<'_>) -> Option<Write> {
    let route = r.text()?;
    let seq = r.u64()?;
    let event = r.u64()?;
    let outcome = match r.u8()? {
        DELIVERED => Outcome::Delivered { status: r.u16()? },
        kind @ (RETRY | DEAD) => {
            let has_status = r.u8()? != 0;
            let status = r.u16()?;
            let status = has_status.then_some(status);
            let error = r.text()?;
            if kind == RETRY {
                Outcome::Retry { status, error }
            } else {
                Outcome::Dead { status, error }
            }
        }
        _ => return None,
    };
    Some(Write::Mark {
        route,
        seq,
        event,
        outcome,
    })
}

/// The records of the log at `path`, from its start for as long as they follow each other
/// (see the module header); an empty chain if there is no log. Read record by record, not
/// whole: the log is 1 MiB, and this comes at a relay's start.
pub(super) fn read(path: &Path) -> std::io::Result<Chain> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Chain::default()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let mut buf = Vec::new();
    chain_with(|at| {
        // Past the end, or a record longer than the log can hold: the log ends here. A read
        // that fails otherwise is an error, not an end (records after it may count).
        let mut header = [0; HEADER];
        if at + HEADER as u64 > len {
            return Ok(Decoded::End);
        }
        file.read_exact_at(&mut header, at)?;
        let payload = u64::from(u32::from_le_bytes(
            header[..4].try_into().expect("four bytes"),
        ));
        if payload > CAPACITY || at + HEADER as u64 + payload > len {
            return Ok(Decoded::End);
        }
        buf.clear();
        buf.extend_from_slice(&header);
        buf.resize(HEADER + payload as usize, 0);
        file.read_exact_at(&mut buf[HEADER..], at + HEADER as u64)?;
        Ok(decode(&buf))
    })
}

/// Whether the chain of the log at `path` ends at `from` on a header that is not empty (a
/// record cut short, or damaged), and if so the sound records of this spool's (`instance`) log
/// past it numbered within `numbers` (those of the log's present cycle past the chain), in the
/// order found. Only a record damaged on the disk after its sync leaves any: a crash cuts only
/// the last record, and what older cycles left is numbered below. Each offset whose bytes
/// start like such a record (a binary head, a number in range, the spool's instance) is
/// checked; a record found is skipped over. The spool reports them ([`super::replay`]); they
/// are never applied, as what they expect of the spool followed the damaged record.
///
/// Not searched past an empty header: a clean end (a write the disk lost entirely looks the
/// same, and goes unseen). The instance is no secret (delivery ids carry it), so a webhook
/// body could hold a made-up record; searched only after a cut, it can at worst raise a false
/// alarm after a crash, and move the counters by no more than [`MOST_TAKEN`].
pub(super) fn stranded(
    path: &Path,
    from: u64,
    instance: u64,
    numbers: std::ops::RangeInclusive<u64>,
) -> std::io::Result<(Vec<Record>, bool)> {
    let log = match std::fs::read(path) {
        Ok(log) => log,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), false)),
        Err(e) => return Err(e),
    };
    let cut = usize::try_from(from)
        .ok()
        .and_then(|from| log.get(from..from.checked_add(4)?))
        .is_some_and(|len| len != [0; 4]);
    if !cut {
        return Ok((Vec::new(), false));
    }
    Ok((search(&log, from, instance, &numbers), true))
}

/// [`stranded`] on the log's bytes.
fn search(
    log: &[u8],
    from: u64,
    instance: u64,
    numbers: &std::ops::RangeInclusive<u64>,
) -> Vec<Record> {
    // A binary record's header, head length, tag, number and instance.
    const START: usize = HEADER + 4 + 1 + 8 + 8;
    let u64_at = |at: usize| u64::from_le_bytes(log[at..at + 8].try_into().expect("eight bytes"));
    let mut found = Vec::new();
    let mut at = usize::try_from(from).map_or(log.len(), |from| from.saturating_add(1));
    while at.saturating_add(START) <= log.len() {
        let len = u32::from_le_bytes(log[at..at + 4].try_into().expect("four bytes")) as usize;
        let looks = len > 0
            && log[at + HEADER + 4] == TAG
            && numbers.contains(&u64_at(at + HEADER + 5))
            && u64_at(at + HEADER + 13) == instance
            && at + HEADER + len <= log.len();
        let payload = &log[at + HEADER..][..if looks { len } else { 0 }];
        if looks
            && checksum(payload) == u64_at(at + 4)
            && let Some(record) = decode_payload(payload)
        {
            found.push(record);
            at += HEADER + len;
            continue;
        }
        at += 1;
    }
    found
}

/// [`read`] on the log's bytes.
#[cfg(test)]
fn chain(bytes: &[u8]) -> Chain {
    let at = |at: u64| usize::try_from(at).ok().and_then(|at| bytes.get(at..));
    chain_with(|offset| Ok(at(offset).map_or(Decoded::End, decode))).expect("no I/O")
}

/// What is at an offset of the log.
enum Decoded {
    /// A record, and its length.
    Record(Record, usize),
    /// A whole record this build cannot read.
    Unreadable,
    /// No whole record: the log ends.
    End,
}

/// The chain of records `next` finds: `next(at)` is what is at offset `at`.
fn chain_with(mut next: impl FnMut(u64) -> std::io::Result<Decoded>) -> std::io::Result<Chain> {
    let mut chain = Chain::default();
    loop {
        let (record, len) = match next(chain.end)? {
            Decoded::Record(record, len) => (record, len),
            Decoded::Unreadable => {
                chain.unreadable = true;
                break;
            }
            Decoded::End => break,
        };
        if chain
            .records
            .last()
            .is_some_and(|last| Some(record.seq) != last.seq.checked_add(1))
        {
            break;
        }
        chain.records.push(record);
        chain.end += len as u64;
    }
    Ok(chain)
}

/// What is at the start of `bytes`.
fn decode(bytes: &[u8]) -> Decoded {
    let whole = || {
        let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
        let sum = u64::from_le_bytes(bytes.get(4..HEADER)?.try_into().ok()?);
        let payload = bytes.get(HEADER..HEADER.checked_add(len)?)?;
        let sound = checksum(payload) == sum || super::journal::fnv1a(payload) == sum;
        (len > 0 && sound).then_some(payload)
    };
    let Some(payload) = whole() else {
        return Decoded::End;
    };
    match decode_payload(payload) {
        Some(record) => Decoded::Record(record, HEADER + payload.len()),
        None => Decoded::Unreadable,
    }
}

/// The record in a payload that passed its checksum, if this build can read it.
fn decode_payload(payload: &[u8]) -> Option<Record> {
    let head_len = u32::from_le_bytes(payload.get(..4)?.try_into().ok()?) as usize;
    let head = payload.get(4..4usize.checked_add(head_len)?)?;
    let bodies = &payload[4 + head_len..];
    if head.first() == Some(&TAG) {
        return decode_binary(Reader(&head[1..]), bodies);
    }
    decode_json(serde_json::from_slice(head).ok()?, bodies)
}

/// A binary head ([`encode_head`]) and its bodies.
fn decode_binary(mut r: Reader<'_>, mut bodies: &[u8]) -> Option<Record> {
    let seq = r.u64()?;
    let expect = Expect {
        instance: r.u64()?,
        next_event: r.u64()?,
        next_seq: r.u64()?,
        stored_bytes: r.u64()?,
    };
    let now_ms = r.u64()?;
    let max_bytes = r.u64()?;
    // A write takes at least 9 bytes, an event 17, a route 4.
    let n = r.count(9)?;
    let mut writes = Vec::with_capacity(n);
    for _ in 0..n {
        writes.push(match r.u8()? {
            APPEND => {
                let channel = r.text()?;
                let routes = (0..r.count(4)?).map(|_| r.text()).collect::<Option<_>>()?;
                let cursor = match r.u8()? {
                    0 => None,
                    1 => Some((r.text()?, r.text()?)),
                    _ => return None,
                };
                let count = r.count(17)?;
                let mut events = Vec::with_capacity(count);
                for _ in 0..count {
                    let flags = r.u8()?;
                    let timestamp_ms = r.u64_if(flags & HAS_TIMESTAMP != 0)?;
                    let sse_id = r.text_if(flags & HAS_SSE_ID != 0)?;
                    let headers = r.pairs()?;
                    let query = r.pairs()?;
                    let len = usize::try_from(r.u64()?).ok()?;
                    let (body, rest) = bodies.split_at_checked(len)?;
                    bodies = rest;
                    events.push(Event {
                        sse_id,
                        timestamp_ms,
                        headers,
                        query,
                        body: Bytes::copy_from_slice(body),
                    });
                }
                Write::Append {
                    channel,
                    routes,
                    events: Arc::from(events),
                    cursor,
                }
            }
            MARK => read_mark(&mut r)?,
            _ => return None,
        });
    }
    if !r.0.is_empty() || !bodies.is_empty() {
        return None;
    }
    Some(Record {
        seq,
        expect,
        now_ms,
        limits: Limits { max_bytes },
        writes,
        before_format_3: false,
    })
}

/// A JSON head (before format 3) and its bodies.
fn decode_json(head: Head<'_>, mut bodies: &[u8]) -> Option<Record> {
    let mut take = |n: u64| -> Option<Bytes> {
        let n = usize::try_from(n).ok()?;
        let body = bodies.get(..n)?;
        bodies = &bodies[n..];
        Some(Bytes::copy_from_slice(body))
    };
    let mut writes = Vec::with_capacity(head.writes.len());
    for write in head.writes {
        writes.push(match write {
            LoggedWrite::Append {
                channel,
                routes,
                cursor,
                events,
            } => {
                let mut stored = Vec::with_capacity(events.len());
                for event in events {
                    stored.push(Event {
                        sse_id: event.sse_id.map(Cow::into_owned),
                        timestamp_ms: event.timestamp_ms,
                        headers: event.headers.into_owned(),
                        query: event.query.into_owned(),
                        body: take(event.body)?,
                    });
                }
                Write::Append {
                    channel: channel.into_owned(),
                    routes: routes.into_owned(),
                    events: Arc::from(stored),
                    cursor: cursor.map(Cow::into_owned),
                }
            }
            LoggedWrite::Mark {
                route,
                seq,
                event,
                outcome,
            } => Write::Mark {
                route: route.into_owned(),
                seq,
                event,
                outcome: outcome.into_owned(),
            },
        });
    }
    if !bodies.is_empty() {
        return None;
    }
    let record = Record {
        seq: head.seq,
        expect: head.expect,
        now_ms: head.now_ms,
        limits: Limits {
            max_bytes: head.max_bytes,
        },
        writes,
        before_format_3: true,
    };
    Some(record)
}

/// A record as smee-relay wrote it before format 3: a JSON head, an FNV-1a checksum.
#[cfg(test)]
pub(super) fn encode_before_format_3(
    seq: u64,
    expect: Expect,
    now_ms: u64,
    limits: Limits,
    writes: &[Write],
) -> Vec<u8> {
    let mut bodies = Vec::new();
    let logged = writes
        .iter()
        .map(|write| match write {
            Write::Append {
                channel,
                routes,
                events,
                cursor,
            } => LoggedWrite::Append {
                channel: Cow::Borrowed(channel),
                routes: Cow::Borrowed(routes),
                cursor: cursor.as_ref().map(Cow::Borrowed),
                events: events
                    .iter()
                    .map(|event| {
                        bodies.extend_from_slice(&event.body);
                        LoggedEvent {
                            sse_id: event.sse_id.as_deref().map(Cow::Borrowed),
                            timestamp_ms: event.timestamp_ms,
                            headers: Cow::Borrowed(&event.headers),
                            query: Cow::Borrowed(&event.query),
                            body: event.body.len() as u64,
                        }
                    })
                    .collect(),
            },
            Write::Mark {
                route,
                seq,
                event,
                outcome,
            } => LoggedWrite::Mark {
                route: Cow::Borrowed(route),
                seq: *seq,
                event: *event,
                outcome: Cow::Borrowed(outcome),
            },
            Write::State { .. } => unreachable!("not logged"),
        })
        .collect();
    let head = Head {
        seq,
        expect,
        now_ms,
        max_bytes: limits.max_bytes,
        writes: logged,
    };
    let head = serde_json::to_vec(&head).unwrap();
    let mut payload = (head.len() as u32).to_le_bytes().to_vec();
    payload.extend_from_slice(&head);
    payload.extend_from_slice(&bodies);
    let mut record = (payload.len() as u32).to_le_bytes().to_vec();
    record.extend_from_slice(&super::journal::fnv1a(&payload).to_le_bytes());
    record.extend_from_slice(&payload);
    record
}

#[cfg(test)]
impl Wal {
    /// Make every later write fail (as a full or failing disk would), or work again.
    pub(super) fn break_writes(&mut self, broken: bool) {
        let mut options = File::options();
        options.read(true).write(!broken);
        self.file = options.open(&self.path).expect("the log reopens");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn append(n: u64, body: &[u8]) -> Write {
        Write::Append {
            channel: "http://x/\u{e9}\"quoted\"".into(),
            routes: vec!["k http://127.0.0.1:9/a".into(), "k b".into()],
            events: Arc::from(vec![Event {
                sse_id: Some(n.to_string()),
                timestamp_ms: Some(n * 1000),
                headers: vec![("x-n".into(), n.to_string())],
                query: vec![("q".into(), "\n".into())],
                body: Bytes::copy_from_slice(body),
            }]),
            cursor: Some(("k".into(), n.to_string())),
        }
    }

    fn mark(n: u64) -> Write {
        Write::Mark {
            route: "k b".into(),
            seq: n,
            event: n + 1,
            outcome: Outcome::Dead {
                status: None,
                error: "refused\t\u{0}".into(),
            },
        }
    }

    const EXPECT: Expect = Expect {
        instance: 3,
        next_event: 4,
        next_seq: 5,
        stored_bytes: 6,
    };

    fn record(seq: u64, writes: &[Write]) -> Vec<u8> {
        let writes: Vec<&Write> = writes.iter().collect();
        encode(seq, EXPECT, 7, Limits { max_bytes: 99 }, &writes).unwrap()
    }

    /// What a write looks like, for comparing (`Write` has no `PartialEq`).
    fn shown(writes: &[Write]) -> String {
        format!("{writes:?}")
    }

    #[test]
    fn records_read_back_as_written_and_end_at_a_cut_or_a_gap() {
        let first = [append(1, b"\x00\xffbinary{"), mark(1)];
        let second = [append(2, b"")];
        let mut log = [record(5, &first), record(6, &second)].concat();
        let chain = chain(&log);
        assert_eq!(chain.records.len(), 2);
        assert_eq!(chain.end, log.len() as u64);
        assert_eq!(chain.records[0].seq, 5);
        assert_eq!(chain.records[0].now_ms, 7);
        assert_eq!(chain.records[0].expect, EXPECT);
        assert_eq!(chain.records[0].limits.max_bytes, 99);
        assert_eq!(shown(&chain.records[0].writes), shown(&first));
        assert_eq!(shown(&chain.records[1].writes), shown(&second));
        // A record cut by a crash ends the log before it.
        let whole = log.len();
        log.extend_from_slice(&record(7, &second)[..20]);
        assert_eq!(super::chain(&log).records.len(), 2);
        // So does one not numbered next (what is left from before the log started over).
        log.truncate(whole);
        log.extend_from_slice(&record(3, &second));
        let chain = super::chain(&log);
        assert_eq!(chain.records.len(), 2);
        assert_eq!(chain.end, whole as u64);
        // And one changed on the disk.
        let mut damaged = record(5, &first);
        *damaged.last_mut().unwrap() ^= 1;
        assert!(super::chain(&damaged).records.is_empty());
    }

    /// A whole record this build cannot read (another version's) is not taken for the end of
    /// the log: the log must not be written over.
    #[test]
    fn a_whole_record_that_cannot_be_read_is_said_not_taken_for_the_end() {
        let mut payload = Vec::new();
        payload.extend_from_slice(&9u32.to_le_bytes());
        payload.extend_from_slice(b"{\"seq\":2}");
        let mut unknown = Vec::new();
        unknown.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        unknown.extend_from_slice(&super::super::journal::fnv1a(&payload).to_le_bytes());
        unknown.extend_from_slice(&payload);
        let log = [record(1, &[mark(1)]), unknown.clone()].concat();
        let chain = chain(&log);
        assert_eq!(chain.records.len(), 1);
        assert!(chain.unreadable);
        // Cut, the same bytes are only the end.
        assert!(!super::chain(&unknown[..unknown.len() - 1]).unreadable);
    }

    fn record_before_format_3(seq: u64, writes: &[Write]) -> Vec<u8> {
        encode_before_format_3(seq, EXPECT, 7, Limits { max_bytes: 99 }, writes)
    }

    /// A relay upgraded after a crash applies what the older one logged, and logs on after it.
    #[test]
    fn a_log_written_before_format_3_still_reads_and_new_records_follow_it() {
        let old = [append(1, b"old body"), mark(1)];
        let new = [append(2, b"new body"), delivered(2), retried(3, None)];
        let log = [record_before_format_3(4, &old), record(5, &new)].concat();
        let chain = chain(&log);
        assert_eq!(chain.records.len(), 2);
        assert_eq!(chain.end, log.len() as u64);
        assert_eq!(shown(&chain.records[0].writes), shown(&old));
        assert_eq!(chain.records[0].expect, EXPECT);
        assert_eq!(chain.records[0].limits.max_bytes, 99);
        assert_eq!(shown(&chain.records[1].writes), shown(&new));
    }

    fn delivered(n: u64) -> Write {
        Write::Mark {
            route: "k a".into(),
            seq: n,
            event: n,
            outcome: Outcome::Delivered { status: 204 },
        }
    }

    fn retried(n: u64, status: Option<u16>) -> Write {
        Write::Mark {
            route: "k a".into(),
            seq: n,
            event: n,
            outcome: Outcome::Retry {
                status,
                error: "target did not answer".into(),
            },
        }
    }

    #[test]
    fn every_outcome_reads_back_as_written() {
        let writes = [
            delivered(1),
            retried(2, None),
            retried(3, Some(503)),
            mark(4),
            Write::Mark {
                route: String::new(),
                seq: 5,
                event: 5,
                outcome: Outcome::Dead {
                    status: Some(410),
                    error: String::new(),
                },
            },
        ];
        let chain = chain(&record(9, &writes));
        assert_eq!(chain.records.len(), 1);
        assert_eq!(shown(&chain.records[0].writes), shown(&writes));
    }

    #[test]
    fn a_pipeline_state_is_not_taken_by_the_log() {
        let state = Write::State {
            key: "k".into(),
            value: Some(vec![1]),
        };
        let writes = [&state];
        assert!(encode(1, EXPECT, 1, Limits { max_bytes: 1 }, &writes).is_none());
    }

    #[test]
    fn an_erased_record_ends_the_log_and_the_next_one_takes_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool.redb");
        let mut wal = Wal::open(&spool, &Chain::default(), 10).unwrap();
        assert_eq!(std::fs::metadata(wal.path()).unwrap().len(), CAPACITY);
        let first = record(wal.next_seq(), &[mark(1)]);
        wal.append(&first).unwrap();
        let second = record(wal.next_seq(), &[mark(2)]);
        let at = wal.append(&second).unwrap();
        assert_eq!(read(wal.path()).unwrap().records.len(), 2);
        wal.undo(at);
        let chain = read(wal.path()).unwrap();
        assert_eq!(chain.records.len(), 1);
        assert_eq!(chain.records[0].seq, 11);
        let again = record(wal.next_seq(), &[mark(3)]);
        wal.append(&again).unwrap();
        let chain = read(wal.path()).unwrap();
        assert_eq!(
            chain.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [11, 12]
        );
        // Reopened with what it holds not yet durable: the next record follows it.
        let wal = Wal::open(&spool, &chain, 10).unwrap();
        assert_eq!((wal.next_seq(), wal.records(), wal.end), (13, 2, chain.end));
        // ... and with all of it durable: it starts over.
        let wal = Wal::open(&spool, &chain, 12).unwrap();
        assert_eq!((wal.next_seq(), wal.records(), wal.end), (13, 0, 0));
    }

    proptest! {
        /// The decoder never panics, whatever the file holds, and never reads a record that
        /// was not written whole.
        #[test]
        fn any_bytes_read_without_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = chain(&bytes);
        }

        /// The search for records past a damaged one, too, from anywhere in the log.
        #[test]
        fn any_bytes_searched_without_a_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            from in any::<u64>(),
            instance in any::<u64>(),
        ) {
            let _ = search(&bytes, from % 600, instance % 4, &(0..=u64::MAX));
            let _ = search(&bytes, from, instance, &(0..=u64::MAX));
            let _ = search(&bytes, u64::MAX, instance, &(0..=u64::MAX));
        }

        #[test]
        fn any_record_reads_back_as_written(
            seq in 0u64..u64::MAX,
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..4),
            header in "\\PC{0,20}",
            cut in any::<prop::sample::Index>(),
        ) {
            let writes: Vec<Write> = bodies
                .iter()
                .enumerate()
                .map(|(n, body)| {
                    let mut write = append(n as u64, body);
                    if let Write::Append { events, .. } = &mut write {
                        let mut event = events[0].clone();
                        event.headers.push(("x-h".into(), header.clone()));
                        *events = Arc::from(vec![event]);
                    }
                    write
                })
                .chain([mark(seq)])
                .collect();
            let bytes = record(seq, &writes);
            let chain = chain(&bytes);
            prop_assert_eq!(chain.records.len(), 1);
            prop_assert_eq!(shown(&chain.records[0].writes), shown(&writes));
            let cut = cut.index(bytes.len());
            prop_assert!(super::chain(&bytes[..cut]).records.is_empty());
        }
    }
}
