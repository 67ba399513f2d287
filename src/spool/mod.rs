//! The spool: a durable, ordered queue of events on disk (redb), the line of durability.
//!
//! SSE has no acknowledgements, so nothing upstream will ever resend an event. Every event is
//! therefore committed here before any route sees it, and a route marks its delivery done only
//! after the target accepted it. A crash or restart resumes from what is on disk.
//!
//! Layout (one database file, `spool.redb`, in the state directory):
//!
//! | table      | key                 | value                                   |
//! |------------|---------------------|-----------------------------------------|
//! | `meta`     | name                | counters: next event id, next seq, bytes, last log record |
//! | `events`   | event id            | header JSON length, header JSON, body (if small) |
//! | `body_chunks` | (event id, n)    | a large body, in pieces of [`BODY_CHUNK`] |
//! | `records`  | (event id, queue)   | delivery record JSON: status, attempts  |
//! | `pending`  | (queue, seq)        | event id: the per-queue FIFO            |
//! | `alert_states` | rule and entity | the pipeline's alert state (JSON)       |
//! | `cursors`  | channel key         | the last SSE id stored, for `Last-Event-ID` after a restart |
//! | `cursors`  | `cluster`           | the cluster the relay last ran in, if any ([`Spool::cluster`]) |
//!
//! A queue is named by [`route_key`]: the channel's key and the target URL, so two relays that
//! share a state directory and a target never deliver each other's events. The pipeline's and
//! the alerts' queues (`pipeline`, `alerts`) belong to the state directory as a whole, as the
//! alert state does; one relay at a time may run a pipeline there ([`lock::StateLock`]). A route
//! reads its queue from `pending` in `seq` order; replaying an event adds it again at the tail
//! with a new `seq`.
//!
//! Format versions (`meta.format`): 1 named a forward queue by the target URL alone; 2 by
//! [`route_key`]; 3 (this one) writes `records` rows in a binary layout ([`record`]) where 2
//! wrote JSON. A version-1 spool is upgraded in place: its queued deliveries keep their `seq`
//! (so their order) and move to the new key when the relay of their channel starts
//! ([`Spool::adopt_legacy`]). A version-2 spool is used as it is: its JSON rows are read, and
//! rewritten in the new layout when their delivery next changes. The first transaction that
//! writes raises its number to 3 ([`Spool::mark_current`]), so that an older build, which would
//! misread the new rows, refuses it from then on; an open or a read leaves it as it is, for an
//! older relay that may still be using it. A newer version than this build knows is refused. A
//! relay opens
//! the database in redb's exclusive-writer mode (one fsync per commit) while no other process
//! uses it, and shares it (multi-writer mode) while `smee-relay events`, `catch-up` or a relay
//! of another channel does ([`share`]); two relays for the same channel are kept apart by a
//! lock file instead (see [`lock::ChannelLock`]).
//!
//! Writes are grouped: [`Spool::write`] applies a batch of appends and marks in one transaction
//! with one fsync. The [`writer`] thread feeds it whatever queued up during the last
//! commit (group commit), which is what makes thousands of durable events per second possible.
//! At everyday rates a commit holds one event or a few, and a small one is made durable by one
//! synced record in the write-ahead log ([`wal`]) instead of redb's sync of a dozen pages: redb
//! commits it in memory, and a synced commit (a checkpoint) every 64 records or on an idle
//! second puts it in the file. An appender's lone event (an inline commit, [`writer`]) is not
//! even applied to redb at once: its record is answered from the spool's counters, and the next
//! transaction (a read, a checkpoint) applies a run of such records together
//! ([`wal::Wal::defer`]).
//! Finished deliveries are also written at once to a small per-process [`journal`], so that a
//! process crash forgets none of them even before their group commit.
//!
//! The file is never created empty in place (a new spool is built under a temporary name and
//! renamed), so an empty or unreadable `spool.redb` is damage: it is refused with what to do,
//! never started over. A failed write (disk full) makes redb refuse every later one until the
//! database is opened again; the next write does that by itself.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use bytes::Bytes;
use redb::{
    Database, ReadableDatabase as _, ReadableTable, ReadableTableMetadata as _, TableDefinition,
};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::clock::now_ms;
use crate::event::Event;

mod backend;
mod bin;
#[cfg(test)]
mod crash_tests;
pub mod export;
mod handover;
mod header;
pub mod intake;
pub(crate) mod journal;
pub mod lock;
mod record;
pub(crate) mod room;
mod share;
mod wal;
#[cfg(test)]
mod wal_tests;
pub mod writer;

pub use crate::clock::age;
pub use handover::{Handover, Taken};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const BODY_CHUNKS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("body_chunks");
const RECORDS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("records");
const PENDING: TableDefinition<(&str, u64), u64> = TableDefinition::new("pending");
const ALERT_STATES: TableDefinition<&str, &[u8]> = TableDefinition::new("alert_states");
const CURSORS: TableDefinition<&str, &str> = TableDefinition::new("cursors");

const NEXT_EVENT: &str = "next_event";
const NEXT_SEQ: &str = "next_seq";
const STORED_BYTES: &str = "stored_bytes";
const INSTANCE: &str = "instance";
const FORMAT: &str = "format";
/// The number of the last record of the write-ahead log applied ([`wal`]).
const WAL_SEQ: &str = "wal_seq";
/// The `cursors` key naming the cluster a relay runs in with this state directory. In
/// `cursors` (text values), not `meta` (numbers), and never a channel key (those are 16 hex
/// digits): a build that does not know it never reads it, so the format stays as it was.
const CLUSTER: &str = "cluster";
/// Set while a version-1 spool still has deliveries under queue names of that version.
const LEGACY: &str = "legacy_queues";
/// When the newest event pruned so far was received (ms since the epoch): before it, the
/// spool no longer knows what it had, so catch-up must not take an absence for a miss. A
/// build that does not know the key never reads it.
const PRUNED_THROUGH: &str = "pruned_through";

/// The spool format this build writes (see the module header).
pub const FORMAT_VERSION: u64 = 3;

/// The queue of deliveries from the channel with key `channel_key` ([`lock::channel_key`]) to
/// `target`. A URL has no spaces, so the key splits back unambiguously.
pub fn route_key(channel_key: &str, target: &str) -> String {
    format!("{channel_key} {target}")
}

/// The target of a forward queue as the queue's key holds it (query and all), or `pipeline` /
/// `alerts`: what `events` matches and shows to the spool's owner.
pub fn route_target(key: &str) -> &str {
    key.split_once(' ').map_or(key, |(_, target)| target)
}

/// What logs, `/metrics` and `/healthz` call a queue: [`route_target`] with its query left out
/// (`?…`), since a query often carries a token (`/hook?token=...`) and those lines reach
/// journals, dashboards and whoever can reach the health port.
pub fn route_name(key: &str) -> std::borrow::Cow<'_, str> {
    let target = route_target(key);
    match target.split_once('?') {
        Some((before, _)) => format!("{before}?…").into(),
        None => target.into(),
    }
}

/// Bodies larger than this are stored apart, in pieces of this size. redb keeps a value in one
/// page of the next power of two and fills it in memory before the commit, so a large body
/// stored whole costs up to twice its size in memory at once; pieces go through redb's bounded
/// write buffer. (A piece plus its key fits a 64 KiB page.)
pub const BODY_CHUNK: usize = 63 << 10;

/// About how many body bytes one [`Spool::pending`] read returns at most.
pub const READ_BYTES: usize = 1 << 20;

/// The spool's file name inside the state directory.
pub const FILE_NAME: &str = "spool.redb";

/// Errors at the spool boundary. All are about the disk, so none is retryable by waiting,
/// except [`SpoolError::Io`] when the disk was full.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error(
        "the spool {path} is damaged: {why}. smee-relay does not start over a spool that held \
         events. {advice}",
        path = path.display(),
        advice = damaged_advice(path, why)
    )]
    Damaged { path: PathBuf, why: Damage },
    #[error(
        "the spool {path} was written by a newer smee-relay (format {version}; this one reads up \
         to {FORMAT_VERSION}). It is not damaged: do not move it. Run the newer smee-relay on \
         it; there is no downgrade",
        path = path.display()
    )]
    Newer { path: PathBuf, version: u64 },
    #[error(
        "the state directory {path} is a file, not a directory: give --state-dir (or state_dir) \
         a directory, or move the file away",
        path = path.display()
    )]
    NotADirectory { path: PathBuf },
    #[error(
        "cannot create the state directory {path} (give --state-dir, or state_dir in the \
         config, a directory this user can create)",
        path = path.display()
    )]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another smee-relay{holder} already {what} with state directory {dir}; stop it first. \
         ({beside})",
        holder = pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        dir = dir.display(),
        beside = if *in_cluster {
            "In a cluster, give each instance its own state directory (state_dir or \
             --state-dir): the instances then share the work"
        } else {
            "Given its own --state-dir, this one would run beside it doing the same work: each \
             event delivered, or alert sent, twice"
        }
    )]
    Locked {
        /// `relays CHANNEL` or `runs the pipeline`.
        what: String,
        dir: PathBuf,
        /// The holder's pid, as it wrote it into the lock file.
        pid: Option<u32>,
        /// The relay refused is a cluster instance: another state directory is the way to run
        /// beside the holder, not a mistake ([`SpoolError::in_cluster`]).
        in_cluster: bool,
    },
    #[error("lock file {path}", path = path.display())]
    LockFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spool {path}", path = path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
    #[error(
        "the spool {path} is open in another process that did not share it within {}s: {}",
        SHARE_WAIT.as_secs(),
        in_use_hint(holders),
        path = path.display()
    )]
    InUse {
        path: PathBuf,
        /// The relays holding the state directory's locks ([`lock::holders`]), to name in the
        /// message (found only once the wait is over: empty until then).
        holders: Vec<lock::Holder>,
    },
    #[error(
        "a relay has the spool in {dir} to itself, and this process cannot ask it to share: no \
         request file can be made there; run this as the relay's user (or root)",
        dir = dir.display()
    )]
    CannotAsk {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "permission denied on the spool {path}{owner}: run this as the user the relay runs as \
         (the state directory's owner, e.g. `sudo -u {user} smee-relay …`), or give it a \
         state directory of its own (--state-dir DIR)",
        path = path.display(),
        owner = owner.as_ref().map(|o| format!(" (its state directory belongs to {o})")).unwrap_or_default(),
        // `root, uid 0` -> root; the packaged service's user when the owner is unknown.
        user = owner.as_deref().and_then(|o| o.split(',').next()).unwrap_or("smee-relay")
    )]
    PermissionDenied {
        path: PathBuf,
        /// Who owns the state directory (`root, uid 0`), if it can be looked at: who to run
        /// as instead.
        owner: Option<String>,
        #[source]
        source: std::io::Error,
    },
    /// The system refused the change whoever asks (`EPERM`: an immutable file or directory, a
    /// mount or a security policy): not the "run as the owner" of [`SpoolError::PermissionDenied`]
    /// (helper-155: root was told to run as root).
    #[error(
        "the system does not permit changing the spool {path} or its state directory, whoever \
         asks (EPERM): an immutable or append-only flag (`lsattr -d DIR` shows it, `chattr -i` \
         removes it), or a mount or security policy that forbids writing there; give \
         --state-dir (or state_dir) a directory the relay may write",
        path = path.display()
    )]
    NotPermitted {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file system refused a write (`EROFS`): said with what to do, and exit 2 (helper-149:
    /// "I/O error: Read-only file system", exit 1).
    #[error(
        "the spool {path} is on a read-only file system, and a relay or a command writes to its \
         state directory: give --state-dir (or state_dir) a writable directory. To read a spool \
         on read-only media (a snapshot, a backup), copy it with its spool.wal to a writable \
         directory first",
        path = path.display()
    )]
    ReadOnly {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the spool is being opened again after a failed write; try again")]
    Reopening,
    #[error("the spool writer has stopped")]
    WriterStopped,
    #[error("the commit this write was part of failed")]
    Commit(#[source] std::sync::Arc<SpoolError>),
    #[error("cannot record a finished delivery in the journal {path}", path = path.display())]
    Journal {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot apply the spool's write-ahead log {path} to the spool file: what it holds stays in it; free disk space or fix the files' permissions and start again (moving it aside loses the events only it holds)", path = path.display())]
    Replay {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
    #[error(
        "no event {0} in the spool (delivered and older than --retain, it was pruned; or \
         `events purge` removed it)"
    )]
    NoSuchEvent(u64),
    #[error("no event {id} in the spool yet: the newest is {newest}")]
    NotYet { id: u64, newest: u64 },
    #[error(transparent)]
    NoRoom(room::NoRoom),
    #[error(transparent)]
    KeepFree(room::TooLarge),
}

/// What to do about a spool held alone and never shared, naming who holds it if known (pids
/// only: lock file names derive from channel URLs, which are secret).
fn in_use_hint(holders: &[lock::Holder]) -> String {
    if holders.is_empty() {
        return "an older smee-relay, or one that is stuck; stop it and try again".into();
    }
    let pids: Vec<String> = holders.iter().map(|h| h.pid.to_string()).collect();
    let pids = pids.join(" ");
    let who = lock::describe(holders);
    if holders.iter().all(|h| h.stopped) {
        format!(
            "held by {who} (its lock file in the state directory says so; stopped by SIGSTOP \
             or Ctrl-Z): resume it (`kill -CONT {pids}`) and try again"
        )
    } else {
        format!(
            "held by {who} (its lock file in the state directory says so); is it stopped \
             (SIGSTOP) or hung? Resume it (`kill -CONT {pids}`) or stop it, and try again"
        )
    }
}

impl SpoolError {
    /// The same, told that the relay refused is a cluster instance (`cluster`): a state
    /// directory another relay holds then calls for one of its own, which is how instances
    /// share a machine.
    pub fn in_cluster(self, cluster: bool) -> SpoolError {
        match self {
            SpoolError::Locked { what, dir, pid, .. } => SpoolError::Locked {
                what,
                dir,
                pid,
                in_cluster: cluster,
            },
            other => other,
        }
    }

    /// Whether the user must act before smee-relay can run (exit code 2): a damaged spool, a
    /// state directory another relay holds.
    pub fn needs_the_user(&self) -> bool {
        matches!(
            self,
            SpoolError::Damaged { .. }
                | SpoolError::Newer { .. }
                | SpoolError::Locked { .. }
                | SpoolError::InUse { .. }
                | SpoolError::CannotAsk { .. }
                | SpoolError::PermissionDenied { .. }
                | SpoolError::NotPermitted { .. }
                | SpoolError::ReadOnly { .. }
                | SpoolError::NotADirectory { .. }
                | SpoolError::KeepFree(_)
        ) || matches!(
            // A path that cannot be made whatever the wait (a full disk can: not here).
            self,
            SpoolError::StateDir { source, .. } if matches!(
                source.raw_os_error(),
                Some(libc::EACCES | libc::EPERM | libc::EROFS | libc::ENOTDIR | libc::ENOENT)
            )
        )
    }

    /// This error, or [`SpoolError::PermissionDenied`] about the spool `file` if the system
    /// refused this process the file or its directory (another user's state directory): the
    /// plain I/O error said only "Permission denied (os error 13)", not what to do.
    pub(crate) fn or_denied(self, file: &Path) -> SpoolError {
        let io = match &self {
            SpoolError::Io {
                source: redb::Error::Io(e),
                ..
            } => e,
            SpoolError::StateDir { source, .. } | SpoolError::LockFile { source, .. } => source,
            _ => return self,
        };
        if io.raw_os_error() == Some(libc::EROFS) {
            return SpoolError::ReadOnly {
                path: file.to_owned(),
                source: std::io::Error::new(io.kind(), io.to_string()),
            };
        }
        if io.kind() != std::io::ErrorKind::PermissionDenied {
            return self;
        }
        // The same error, its code kept (`EPERM` is told apart from `EACCES` by it).
        let source = match io.raw_os_error() {
            Some(code) => std::io::Error::from_raw_os_error(code),
            None => std::io::Error::new(io.kind(), io.to_string()),
        };
        denied(file, source)
    }
}

/// Create the state directory if it is missing. A file in its place is said as such: the
/// system's own "File exists" reads as if the directory were there.
pub fn create_state_dir(state_dir: &Path) -> Result<(), SpoolError> {
    create_private_dir(state_dir).map_err(|source| {
        if state_dir.exists() && !state_dir.is_dir() {
            SpoolError::NotADirectory {
                path: state_dir.to_owned(),
            }
        } else {
            SpoolError::StateDir {
                path: state_dir.to_owned(),
                source,
            }
        }
    })
}

/// Create `dir` and its missing parents readable by their owner alone (0700, as systemd's
/// `StateDirectoryMode` makes it): what is kept there (events, targets' queries) is no other
/// user's. A directory already there is left as its owner made it.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Permission denied on the spool `file` ([`SpoolError::PermissionDenied`]), or not permitted
/// to anyone ([`SpoolError::NotPermitted`]).
pub(crate) fn denied(file: &Path, source: std::io::Error) -> SpoolError {
    if source.raw_os_error() == Some(libc::EPERM) {
        return SpoolError::NotPermitted {
            path: file.to_owned(),
            source,
        };
    }
    SpoolError::PermissionDenied {
        path: file.to_owned(),
        owner: owner_of(file.parent().unwrap_or(Path::new("."))),
        source,
    }
}

/// Who owns `dir`, or the nearest of its parents this process may look at: `name, uid N`.
fn owner_of(dir: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let uid = dir
        .ancestors()
        .find_map(|p| std::fs::metadata(p).ok())?
        .uid();
    let name = std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|passwd| {
            passwd.lines().find_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                (fields.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_string())
            })
        });
    Some(match name {
        Some(name) => format!("{name}, uid {uid}"),
        None => format!("uid {uid}"),
    })
}

/// What is wrong with a damaged spool.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Damage {
    #[error("the file is empty (0 bytes), but a spool is never empty once created")]
    Empty,
    #[error("{0}")]
    Redb(String),
    #[error("reading it crashed the database library ({0})")]
    Panic(String),
    /// The file is behind its own write-ahead log, or behind the high-water mark its last
    /// checkpoint left: commits it had made are gone.
    #[error(
        "it lost commits it had made: {known} the file's event counter at {expected} and its \
         queue counter at {expected_seq}, and they now stand at {next} and {next_seq}. {held}\
         What the lost commits held is gone from it. The database library falls back to its \
         last sound commit when a newer one fails its checksum: the disk damaged the file \
         (check it: dmesg, smartctl), or it was restored from an older copy of itself. Nothing \
         was applied or set aside",
        known = match seq {
            Some(seq) => format!("its write-ahead log's record {seq} was written with"),
            None => format!("its last checkpoint left (in {})", wal::HIGHWATER_FILE),
        },
        held = match events {
            0 => String::new(),
            n => format!("The log's {n} events cannot be applied to it. "),
        }
    )]
    LostCommits {
        /// The log's next record; `None` when the high-water mark told.
        seq: Option<u64>,
        expected: u64,
        expected_seq: u64,
        next: u64,
        next_seq: u64,
        events: usize,
    },
}

/// What to do about the damaged spool `path`: move it aside, with its log if there is one
/// (helper-155: the advice had a `mv` of a log that was not there, which failed), and how
/// to read what it still holds.
fn damaged_advice(path: &Path, why: &Damage) -> String {
    let wal = wal::path(path);
    let (path, log) = (path.display(), wal.display());
    let (what, moves, salvage) = if wal.exists() {
        (
            "the file and its log",
            format!("mv {path} {path}.damaged; mv {log} {log}.damaged"),
            why.salvage(),
        )
    } else {
        (
            "the file",
            format!("mv {path} {path}.damaged"),
            "the file, as spool.redb,",
        )
    };
    format!(
        "Stop it, move {what} aside ({moves}) and start again (the new spool starts empty: \
         what this one held is not delivered from it). To see what is still readable in it, \
         put {salvage} in a directory of its own and run `smee-relay events list --state-dir \
         THAT_DIR` (a listing that meets the damage stops there: then read events one by one, \
         `smee-relay events show ID --state-dir THAT_DIR`); if that stops with this same \
         message, the file cannot be read at all, and what it held is lost unless a backup \
         has it"
    )
}

impl Damage {
    /// What to copy to read what the file still holds: a file behind its log opens alone
    /// (the log is what does not match it); any other, with its log (helper-149: the advice
    /// was the same for both, and led back to itself).
    fn salvage(&self) -> &'static str {
        match self {
            Damage::LostCommits { .. } => "the file alone, as spool.redb (without its log),",
            _ => "the file and its log, as spool.redb and spool.wal,",
        }
    }
}

/// Where a delivery stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Waiting in its route's queue, or being retried.
    Pending,
    /// The target accepted it.
    Delivered,
    /// Given up on: a permanent refusal, or too old to keep retrying. Replayable.
    Dead,
}

impl Status {
    /// As `events list` and `show` print it (and JSON spells it).
    pub fn name(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Delivered => "delivered",
            Status::Dead => "dead",
        }
    }
}

/// The state of one event's delivery to one route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    pub status: Status,
    /// Attempts so far, across restarts.
    pub attempts: u32,
    /// The last HTTP status the target answered, if it answered.
    pub last_status: Option<u16>,
    /// The last failure, in words.
    pub last_error: Option<String>,
    /// When this record last changed (ms since the epoch).
    pub updated_ms: u64,
    /// The position in the route's queue while pending; also names the delivery.
    pub seq: u64,
}

/// What an attempt came to, as the spool records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Delivered {
        status: u16,
    },
    /// Failed, will be tried again.
    Retry {
        status: Option<u16>,
        error: String,
    },
    /// Failed for good.
    Dead {
        status: Option<u16>,
        error: String,
    },
}

/// An event as stored: the webhook plus where and when it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEvent {
    pub id: u64,
    /// When the relay received it (ms since the epoch).
    pub received_ms: u64,
    /// The channel it came from, redacted (as it is shown in logs).
    pub channel: String,
    pub event: Event,
}

/// The part of a stored event that is not the body ([`header`]; JSON before format 3, which is
/// still read, and written only by tests that make such a spool).
#[derive(Debug, PartialEq, Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct EventHeader {
    received_ms: u64,
    channel: String,
    sse_id: Option<String>,
    timestamp_ms: Option<u64>,
    headers: Vec<(String, String)>,
    query: Vec<(String, String)>,
    /// The body's length when it is stored in `body_chunks` rather than after the header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    chunked_len: Option<u64>,
}

/// [`EventHeader`] as it is written: borrowed from the event, so that storing one copies
/// nothing before encoding it.
struct EventHeaderRef<'a> {
    received_ms: u64,
    channel: &'a str,
    sse_id: Option<&'a str>,
    timestamp_ms: Option<u64>,
    headers: &'a [(String, String)],
    query: &'a [(String, String)],
    chunked_len: Option<u64>,
}

/// One pending delivery, as a route reads it off its queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queued {
    pub seq: u64,
    pub event: StoredEvent,
    pub attempts: u32,
}

/// One row of `events list`: an event and its delivery to one route.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub id: u64,
    pub received_ms: u64,
    pub channel: String,
    pub route: String,
    #[serde(flatten)]
    pub record: DeliveryRecord,
    /// `x-github-event=push`, or a Port `action`/`resourceType`, when the event says.
    pub kind: Option<String>,
    /// Where the event was recovered from after a gap (`github`: catch-up), if it did not
    /// come live from the channel (its `x-smee-relay-recovered` header, which no live event
    /// can carry: the source drops the relay's own headers from frames).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered: Option<String>,
}

/// A write the spool applies in a batch.
#[derive(Clone, Debug)]
pub enum Write {
    /// Store events from `channel` and queue each on every route.
    Append {
        channel: String,
        routes: Vec<String>,
        /// Shared, so that an append that failed can be tried again without a copy.
        events: std::sync::Arc<[Event]>,
        /// The channel's key and the SSE id of the last event, stored with the events so a
        /// restart resumes from exactly what is on disk.
        cursor: Option<(String, String)>,
    },
    /// Record an attempt at the head of `route`.
    Mark {
        route: String,
        seq: u64,
        event: u64,
        outcome: Outcome,
    },
    /// Store (or with `None`, forget) the pipeline's state under `key`.
    State { key: String, value: Option<Vec<u8>> },
}

/// What a batch of writes did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WriteReport {
    /// Per `Append`, in order: the ids given, or `None` for events refused (spool full).
    pub appended: Vec<Vec<Option<u64>>>,
    /// Delivered events pruned to make room.
    pub pruned: u64,
    /// What the write queued, for routes to take without reading it back ([`Handover`]);
    /// `None` if it queued more than [`handover::HANDOVER_BYTES`] of events.
    pub enqueued: Option<Enqueued>,
}

/// The deliveries one committed write queued, as [`Spool::pending`] would read them back, and
/// where they stand in the spool's sequence (equal if it queued nothing). A route whose last
/// whole read (or take from the [`Handover`]) left it knowing its queue up to `seq_before` knows
/// from this its whole queue up to `seq_after`: every queueing, by any process, takes the next
/// seqs in its transaction, so nothing else can have been queued in between.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Enqueued {
    /// The spool's next-seq counter before the write.
    pub seq_before: u64,
    /// ... and after it.
    pub seq_after: u64,
    /// Per route, what it queued there, in order.
    pub routes: Vec<(String, Vec<Queued>)>,
    /// The bytes those events hold ([`Event::held_bytes`], once per route), counted as they
    /// were queued: what bounds the [`Handover`].
    pub held_bytes: usize,
}

/// Most event bytes held by records whose apply is deferred ([`wal::Wal::defer`]): they stay
/// in memory until applied. Two of the log's largest records, and room for a checkpoint's 64
/// records of an event up to 2 KiB each.
const DEFERRED_BYTES: usize = 2 * wal::MAX_LOGGED_BYTES;

/// Size limits the spool enforces on append.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Stored event bytes (headers and bodies) at most; beyond, delivered events are pruned
    /// first, then new events refused.
    pub max_bytes: u64,
}

/// The open spool.
pub struct Spool {
    /// The redb database, shared between the writer thread and readers. `None` only while it is
    /// being opened again after a failed write (redb refuses all writes after one fails).
    db: std::sync::RwLock<Option<Database>>,
    /// Set by a failed write: the next write opens the database again first.
    needs_reopen: std::sync::atomic::AtomicBool,
    /// Held across every write transaction, from its start to its commit: what a writer that
    /// must not wait ([`Spool::try_write_logged`]) tries, rather than block in redb behind a
    /// prune's scan.
    writing: std::sync::Mutex<()>,
    /// Why the last write failed, until one succeeds (for systemd's STATUS= line); after a
    /// failed append, until an append succeeds.
    write_error: std::sync::Mutex<Option<String>>,
    /// Whether a write that appended events failed since writes last worked: a write that
    /// appends nothing (a delivery recorded in pages already written) may succeed on a disk too
    /// full for events, and is not the end of the outage (it said "takes writes again", and
    /// the next append failed again, by turns).
    appends_refused: std::sync::atomic::AtomicBool,
    /// When an outage (writes refused) was last said, and whether the current one was: a disk
    /// at its last blocks refuses and takes writes by turns, and each turn said an ERROR and
    /// "takes writes again", about every 1.5 s (helper-139). Said at most once a minute; its
    /// end only if it was said.
    outage_said: std::sync::Mutex<(Option<std::time::Instant>, bool)>,
    /// How the file is opened: the plain file, or in tests a backend that injects faults.
    backend: backend::Factory,
    /// For messages.
    path: PathBuf,
    /// A random id of this spool, so delivery ids from two machines never collide.
    instance: u64,
    /// Read transactions begun, so tests can pin that an idle relay does not read.
    reads: std::sync::atomic::AtomicU64,
    /// Looks at the file (`statx`, [`Spool::changed_since`]), so tests can pin that an idle
    /// relay holding the file alone does not look.
    looks: std::sync::atomic::AtomicU64,
    /// Whether the file is open alone (redb's exclusive-writer mode): then no other process can
    /// write it, and readers waiting for a change need not look at it ([`Spool::changed`]).
    /// Cleared before the file is closed to be shared, set once it is open alone again: so it
    /// leads `sharing`'s mode rather than copying it, and an async reader takes no lock for it
    /// (`sharing`'s is held through a reopen).
    alone: std::sync::atomic::AtomicBool,
    /// Wakes readers waiting in [`Spool::changed`]: bumped when [`Spool::alone`] changes and
    /// after a write in this process that queues deliveries outside the writer thread (a
    /// catch-up's appends, a replay), which does not tell them otherwise.
    nudges: tokio::sync::watch::Sender<u64>,
    /// The first damage found while the file is open (redb panicked on a page, or called the
    /// file corrupted): a relay stops on it ([`Spool::damage`]), as it does when the open finds
    /// damage, rather than go on failing every read and write.
    damage: tokio::sync::watch::Sender<Option<Damage>>,
    /// Whether this process would rather have the file alone (a relay, whose every event is a
    /// commit) than shared (a command, which is brief): see [`share`].
    prefer_alone: bool,
    /// In which of redb's modes the file is open, and this process's request while shared.
    /// Declared after `db`, so that on drop the file is closed before the request goes.
    sharing: std::sync::Mutex<Sharing>,
    /// The write-ahead log, while the file is open alone ([`wal`]; `None` if it could not be
    /// opened: then every commit is synced to the file itself). Locked after `db`, before
    /// `writing`.
    wal: std::sync::Mutex<Option<wal::Wal>>,
    /// The file is of an older format ([`upgrade`]): the next transaction that writes raises
    /// its number ([`Spool::mark_current`]). Until then an older relay may still use it.
    behind: std::sync::atomic::AtomicBool,
    /// The file's device and inode as opened, to tell whether the path still names it
    /// ([`Spool::file_gone`]).
    file_id: Option<(u64, u64)>,
    /// Whether the log holds records not yet applied to redb ([`wal::Wal::defer`]): set before
    /// their appenders are answered, so a reader that finds it clear has nothing to apply and
    /// need not wait for the log's lock. One that finds it set may wait for a whole write (a
    /// log sync, a checkpoint's commit, a prune's scan): the relay reads on its blocking pool.
    deferring: std::sync::atomic::AtomicBool,
}

/// How the spool file is open ([`share`]): alone, in redb's exclusive-writer mode, or shared
/// with other processes, in its multi-writer mode. The two exclude each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Alone,
    Shared,
}

/// The spool's side of sharing.
#[derive(Debug)]
struct Sharing {
    mode: Mode,
    /// This process's request while the file is open shared: other processes see from it that
    /// the file is in use, and a relay holding it alone that it must share it.
    request: Option<share::Request>,
    /// When the requests were last looked at ([`Spool::share_poll`]).
    looked: std::time::Instant,
    /// When an open alone was last refused though nobody asked to share: a process that makes
    /// no requests (an older smee-relay) has the file open. Tried again only after
    /// [`ALONE_RETRY`], not at every look (each try closes and opens the file).
    refused: Option<std::time::Instant>,
    /// A relay's: its request could not be made again while shared, and it said so (once, not
    /// at every look).
    unasked: bool,
}

impl Sharing {
    /// Open alone, asking nothing of anyone.
    fn alone() -> Sharing {
        Sharing {
            mode: Mode::Alone,
            request: None,
            looked: std::time::Instant::now(),
            refused: None,
            unasked: false,
        }
    }
}

/// How long after a refused open alone ([`Sharing::refused`]) a relay tries again.
const ALONE_RETRY: std::time::Duration = std::time::Duration::from_secs(60);

/// How long an open waits for the process holding the spool alone to share it: that one looks
/// every [`SHARE_POLL`].
const SHARE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a command opening a spool already shared waits for the relays sharing it to answer
/// its request ([`share::wait_for_relays`]): each looks every [`SHARE_POLL`].
const ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// How often a relay looks for other processes asking to share its spool (and, while shared,
/// whether they are done): the longest a command like `smee-relay events list` waits for it.
pub(crate) const SHARE_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// How recent a modification time must be for a [`Seen`] to be trusted not to hide a later
/// write: a file system stamps times from a coarse clock, so two writes within one tick (a few
/// ms; a second or two on some file systems) can leave the same time and size.
const RACY: std::time::Duration = std::time::Duration::from_secs(2);

/// What the spool file looked like just before a reader read it: one `statx` later tells
/// whether anyone wrote since, this process or another (`smee-relay events replay`), without a
/// read transaction (which in redb's multi-writer mode takes file locks and reads the header).
#[derive(Clone, Debug, Default)]
pub(crate) struct Seen {
    /// The file's modification time, size and inode; `None` if it could not be looked at
    /// (then it counts as changed).
    stamp: Option<(SystemTime, u64, u64)>,
    /// When it was looked at: a modification time closer to this than [`RACY`] counts as
    /// changed, since a write in the same clock tick would leave the same stamp.
    at: Option<SystemTime>,
}

/// A reader's side of [`Spool::changed`]'s wake-ups ([`Spool::nudges`]).
pub(crate) struct Nudges(tokio::sync::watch::Receiver<u64>);

impl Nudges {
    /// Call before a read: a nudge from here on wakes the next [`Spool::changed`], one before
    /// is in the read.
    pub(crate) fn mark(&mut self) {
        self.0.borrow_and_update();
    }
}

/// How often a reader waiting in [`Spool::changed`] looks at a file shared with other
/// processes.
pub(crate) const LOOK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Spool {
    /// Open (or create) the spool in `state_dir` for a relay: alone if no other process uses
    /// it, else shared ([`share`]; the relay's writer thread calls [`Spool::share_poll`]).
    pub fn open(state_dir: &Path) -> Result<Spool, SpoolError> {
        Self::open_with(state_dir, backend::Factory::file())
    }

    /// Open (or create) the spool in `state_dir` for a brief command (`smee-relay events`,
    /// `catch-up`): always shared, so that a relay starting meanwhile is not kept waiting; a
    /// relay holding it alone is asked to share it, and this waits for that (tens of ms; up to
    /// about a second from a relay that cannot watch the directory and looks every second).
    pub fn open_shared(state_dir: &Path) -> Result<Spool, SpoolError> {
        Self::open_as(state_dir, backend::Factory::file(), false)
    }

    /// Open (or create) the spool in `state_dir` through `backend`, as a relay.
    pub(crate) fn open_with(
        state_dir: &Path,
        backend: backend::Factory,
    ) -> Result<Spool, SpoolError> {
        Self::open_as(state_dir, backend, true)
    }

    fn open_as(
        state_dir: &Path,
        backend: backend::Factory,
        prefer_alone: bool,
    ) -> Result<Spool, SpoolError> {
        Self::open_in(state_dir, backend, prefer_alone)
            .map_err(|e| e.or_denied(&state_dir.join(FILE_NAME)))
    }

    /// Whether `state_dir` holds a spool (for commands, which do not create one). Err: this
    /// process may not look ([`SpoolError::PermissionDenied`]); another error counts as
    /// there being one, for the open to say what is wrong with it.
    pub fn exists(state_dir: &Path) -> Result<bool, SpoolError> {
        let file = state_dir.join(FILE_NAME);
        match file.try_exists() {
            Ok(exists) => Ok(exists),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(denied(&file, e)),
            Err(_) => Ok(true),
        }
    }

    fn open_in(
        state_dir: &Path,
        backend: backend::Factory,
        prefer_alone: bool,
    ) -> Result<Spool, SpoolError> {
        create_state_dir(state_dir)?;
        let path = state_dir.join(FILE_NAME);
        if !path.exists() {
            if prefer_alone {
                say_spool_gone(&path);
            }
            create_new(&path, &backend)?;
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        // A relay starting holds no marks yet: it answers every request there is at once.
        let answer = prefer_alone.then(|| share::others(dir, None));
        let (opened, sharing) =
            open_sharing(&path, &backend, prefer_alone, None, answer.as_deref())?;
        // A command on a spool already shared: the relays sharing it may hold marks of
        // deliveries they finished; they commit them and say so within a SHARE_POLL.
        if let (false, Some(mine)) = (prefer_alone, &sharing.request)
            && let Err(silent) = share::wait_for_relays(dir, mine, ANSWER_WAIT)
        {
            // Named by the pids in their requests' names, if they hold the directory's locks
            // (a pid from another pid namespace names nobody here).
            let holders: Vec<_> = lock::holders(dir)
                .into_iter()
                .filter(|h| silent.contains(&h.pid))
                .collect();
            let who = match holders.as_slice() {
                [] => "a relay sharing the spool".to_string(),
                some => lock::describe(some),
            };
            tracing::info!(
                spool = %path.display(),
                "{who} did not answer within {}s (stopped or hung?): deliveries it finished \
                 last may show as pending",
                ANSWER_WAIT.as_secs()
            );
        }
        let wal = opened.wal(&path, sharing.mode);
        let behind = opened.behind.into();
        let file_id = file_id(&path);
        Ok(Spool {
            db: std::sync::RwLock::new(Some(opened.db)),
            needs_reopen: false.into(),
            writing: std::sync::Mutex::new(()),
            write_error: Default::default(),
            appends_refused: Default::default(),
            outage_said: Default::default(),
            backend,
            path,
            instance: opened.instance,
            reads: 0.into(),
            looks: 0.into(),
            deferring: false.into(),
            alone: (sharing.mode == Mode::Alone).into(),
            nudges: tokio::sync::watch::Sender::new(0),
            damage: tokio::sync::watch::Sender::new(None),
            prefer_alone,
            sharing: std::sync::Mutex::new(sharing),
            wal: std::sync::Mutex::new(wal),
            behind,
            file_id,
        })
    }

    /// Whether the spool's path no longer names the file this process opened (removed, or
    /// replaced): what the open file holds then leaves with the process (helper-149: the stop
    /// line said "200 deliveries wait in the spool for the next start" of a removed file).
    pub fn file_gone(&self) -> bool {
        self.file_id
            .is_some_and(|id| file_id(&self.path) != Some(id))
    }

    /// For a relay's writer thread, between commits and at least every [`SHARE_POLL`] while
    /// idle: if the spool is open alone and another process asks to share it, open it shared;
    /// if it is open shared and nobody else uses it any more, open it alone again. Looks at
    /// most once per `SHARE_POLL`. A failure leaves it shared (always safe) and is retried.
    ///
    /// Before it shares, it calls `before_sharing`, with no lock of the spool's held (so that
    /// it may write; a write may reopen the file, which takes them): the writer thread commits
    /// there the marks it holds (finished deliveries that are only in its journal and queue).
    /// The process asking reads the file as soon as it is shared (`smee-relay events replay
    /// ID` right after ID's delivery) and must find them done. While shared, it does the same
    /// for each new request before it answers it ([`share`]): a command opening a spool already
    /// shared waits for that answer.
    ///
    /// `now`: look even if it looked less than a `SHARE_POLL` ago ([`Spool::watch_requests`]
    /// told of a request).
    pub(crate) fn share_poll(&self, now: bool, before_sharing: impl FnOnce()) {
        if !self.prefer_alone {
            return;
        }
        let mut sharing = self.sharing.lock().expect("not poisoned");
        if !now && sharing.looked.elapsed() < SHARE_POLL {
            return;
        }
        sharing.looked = std::time::Instant::now();
        let others = self.others(&sharing);
        let to_answer = !others.is_empty()
            && match sharing.mode {
                Mode::Alone => true,
                // No request (it could not be made, or someone removed it) is made again,
                // answering them all.
                Mode::Shared => sharing
                    .request
                    .as_ref()
                    .is_none_or(|mine| !mine.in_place() || mine.to_answer(&others)),
            };
        if to_answer {
            drop(sharing);
            before_sharing();
            sharing = self.sharing.lock().expect("not poisoned");
        }
        // A request withdrawn meanwhile only makes it share once more than needed: the next
        // look has it alone again.
        self.share_switch(sharing, &others);
    }

    /// For a relay's writer thread: call `tell` (on a thread of the watch's) whenever another
    /// process may have asked to share the file, so that it calls [`Spool::share_poll`] then
    /// instead of every [`SHARE_POLL`] ([`share::Watch`]). `None` for a command's spool (it
    /// never looks), or if the directory cannot be watched (said at INFO: the writer
    /// then looks every `SHARE_POLL`, as it did before).
    fn watch_requests(&self, tell: impl Fn() + Send + 'static) -> Option<share::Watch> {
        if !self.prefer_alone {
            return None;
        }
        let dir = self.dir();
        share::Watch::start(dir, tell)
            .inspect_err(|e| {
                tracing::info!(
                    "cannot watch {} for commands asking to share the spool ({e}); looking \
                     every {}s instead, so a command beside this relay may wait that long",
                    dir.display(),
                    SHARE_POLL.as_secs()
                );
            })
            .ok()
    }

    /// The state directory the file is in (where requests to share it are made).
    fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Whether the file is open alone (no other process may write it).
    fn is_alone(&self) -> bool {
        self.alone.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The other processes' requests to share the file.
    fn others(&self, sharing: &Sharing) -> Vec<String> {
        share::others(self.dir(), sharing.request.as_ref())
    }

    /// [`Spool::share_poll`]'s look, now.
    #[cfg(test)]
    fn share_look(&self, mut sharing: std::sync::MutexGuard<'_, Sharing>) {
        sharing.looked = std::time::Instant::now();
        let others = self.others(&sharing);
        self.share_switch(sharing, &others);
    }

    /// Open the file in the mode `others` (the requests of processes asking to share it) calls
    /// for, if it is not open so already, answering them (a relay's: called once what it holds
    /// is committed).
    fn share_switch(&self, mut sharing: std::sync::MutexGuard<'_, Sharing>, others: &[String]) {
        let wanted = if others.is_empty() {
            Mode::Alone
        } else {
            Mode::Shared
        };
        let refused_lately = sharing.refused.is_some_and(|at| at.elapsed() < ALONE_RETRY);
        if wanted == sharing.mode || (wanted == Mode::Alone && refused_lately) {
            if wanted == Mode::Shared && !sharing.request.as_ref().is_some_and(|r| r.in_place()) {
                // Shared without a request of its own: commands would not wait for this
                // relay's marks, and another relay would keep trying to have the file alone.
                let dir = self.dir();
                match share::Request::make(dir, Some(others)) {
                    Ok(request) => {
                        sharing.request = Some(request);
                        sharing.unasked = false;
                    }
                    Err(e) if !sharing.unasked => {
                        sharing.unasked = true;
                        tracing::warn!(
                            "cannot make this relay's request to share the spool in {}: {e}; \
                             commands beside it may show what it delivered last as pending; \
                             retrying every second",
                            dir.display()
                        );
                    }
                    Err(e) => tracing::debug!("still cannot make the request to share: {e}"),
                }
                return;
            }
            if let Some(mine) = sharing.request.as_mut()
                && let Err(e) = mine.answer(others)
            {
                // Those asking wait a little longer (`ANSWER_WAIT`), then read anyway.
                tracing::debug!("cannot answer the requests to share the spool: {e}");
            }
            return;
        }
        let mut db = self.db.write().expect("not poisoned");
        // What only the write-ahead log holds goes into the file before others may read it.
        // Should that fail (a full disk), the file stays alone: shared, it could be read only
        // after a synced replay of the log, which would fail the same way, and stop this
        // relay's reads too. Those asking wait, then give up with what to do.
        let committed = match db.as_ref() {
            _ if self.logged() == 0 => Ok(()),
            Some(open) => self.transact(open, |_| Ok(()), |_| true, false),
            // Closed after a failed reopen: it holds nothing the log does not.
            None => Err(SpoolError::Reopening),
        };
        if let Err(e) = committed {
            tracing::warn!(
                "cannot share the spool: what its write-ahead log holds cannot be committed to \
                 the file first ({}); it stays open alone, and a command asking for it gives up \
                 after {}s",
                crate::error::chain(&e),
                SHARE_WAIT.as_secs()
            );
            return;
        }
        *self.log() = None;
        // Readers look at the file from now on: once closed here, others may write it.
        self.set_alone(false);
        // Close first: the file cannot be open twice in one process in these modes.
        drop(db.take());
        let mine = sharing.request.take();
        // Going alone, a request made after all (someone asked meanwhile) answers nobody yet:
        // what this holds is not committed for them.
        let answer = if wanted == Mode::Shared { others } else { &[] };
        match open_sharing(
            &self.path,
            &self.backend,
            wanted == Mode::Alone,
            mine,
            Some(answer),
        ) {
            Ok((fresh, now)) => {
                *self.log() = fresh.wal(&self.path, now.mode);
                *db = Some(fresh.db);
                self.needs_reopen
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(
                    spool = %self.path.display(),
                    others = others.len(),
                    "the spool is now open {}",
                    if now.mode == Mode::Alone { "alone (exclusive-writer mode)" } else { "shared (multi-writer mode)" }
                );
                *sharing = now;
                self.set_alone(sharing.mode == Mode::Alone);
            }
            Err(e) => {
                // The next read or write opens it again (shared: see `reopen`), and says so.
                self.needs_reopen
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                sharing.mode = Mode::Shared;
                tracing::warn!(
                    "cannot open the spool again to share it or have it alone: {}; retrying",
                    crate::error::chain(&e)
                );
            }
        }
    }

    /// Look at the spool file now: take this before a read, so that any write after the read
    /// began shows in [`Spool::changed_since`].
    pub(crate) fn look(&self) -> Seen {
        Seen {
            stamp: self.stamp(),
            at: Some(SystemTime::now()),
        }
    }

    /// Whether the spool may have been written since `seen` was taken (one `statx`). False only
    /// when the file's stamp is the same and was already old when `seen` was taken.
    pub(crate) fn changed_since(&self, seen: &Seen) -> bool {
        let (Some(stamp), Some(at)) = (seen.stamp, seen.at) else {
            return true;
        };
        self.looks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let settled = at.duration_since(stamp.0).is_ok_and(|old| old >= RACY);
        !settled || self.stamp() != Some(stamp)
    }

    /// For a reader that waits in [`Spool::changed`]: take it before the first read, and
    /// [`Nudges::mark`] it before each (with the [`Seen`] of that read).
    pub(crate) fn nudges(&self) -> Nudges {
        Nudges(self.nudges.subscribe())
    }

    /// Returns once the file may have changed since `seen` by a write that this process's
    /// writer thread does not tell of (its appends come through [`writer::SpoolWriter`]): one
    /// by another process (`smee-relay events replay`), or one here outside the writer (a
    /// catch-up's appends). While the file is open alone no other process can write it, and
    /// this waits for a nudge without looking at the file; shared, it looks every [`LOOK_EVERY`]
    /// (one `statx`). An idle relay holding its spool alone so wakes for none of this.
    pub(crate) async fn changed(&self, nudges: &mut Nudges, seen: &Seen) {
        loop {
            let shared = !self.alone.load(std::sync::atomic::Ordering::Acquire);
            tokio::select! {
                nudged = nudges.0.changed() => {
                    if nudged.is_err() {
                        // The spool is gone (it cannot be while borrowed here).
                        std::future::pending::<()>().await;
                    }
                }
                _ = tokio::time::sleep(LOOK_EVERY), if shared => {}
            }
            if self.changed_since(seen) {
                return;
            }
        }
    }

    /// Whether the file is open alone; readers waiting in [`Spool::changed`] hear of a change.
    fn set_alone(&self, alone: bool) {
        let was = self.alone.swap(alone, std::sync::atomic::Ordering::AcqRel);
        if was != alone {
            self.nudge();
        }
    }

    /// Wake readers waiting in [`Spool::changed`] (after a write outside the writer thread).
    fn nudge(&self) {
        self.nudges.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Make writes to the write-ahead log fail (or work again).
    #[cfg(test)]
    pub(crate) fn break_wal(&self, broken: bool) {
        if let Some(log) = self.log().as_mut() {
            log.break_writes(broken);
        }
    }

    /// How many times the file was looked at (tests pin that an idle relay does not look).
    #[cfg(test)]
    pub(crate) fn looks(&self) -> u64 {
        self.looks.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The spool file's modification time, size and inode.
    fn stamp(&self) -> Option<(SystemTime, u64, u64)> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(&self.path).ok()?;
        Some((meta.modified().ok()?, meta.len(), meta.ino()))
    }

    /// How many read transactions this handle began.
    #[cfg(test)]
    pub(crate) fn reads(&self) -> u64 {
        self.reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Why writes fail, while they do.
    pub fn write_error(&self) -> Option<String> {
        self.write_error.lock().expect("not poisoned").clone()
    }

    /// Whether writes succeed (the last one did, and so did the last that appended).
    pub(crate) fn takes_writes(&self) -> bool {
        self.write_error.lock().expect("not poisoned").is_none()
    }

    /// Open the database again (after a failed write left redb refusing every later one), in
    /// the mode it was in (shared, if a switch of modes failed).
    fn reopen(&self) -> Result<(), SpoolError> {
        let mut sharing = self.sharing.lock().expect("not poisoned");
        let mut db = self.db.write().expect("not poisoned");
        let alone = sharing.mode == Mode::Alone;
        // As in `share_switch`: another process may take the file while it is closed.
        self.set_alone(false);
        // The write-ahead log keeps what the old handle held only in memory: the open applies
        // it. While it holds such records the file is opened alone again, whoever asks: shared,
        // they could be applied only by a synced commit, which fails the same way as the one
        // that brought this here (a full disk), and every read would fail with it.
        let log = self.log().take();
        let keep_alone = alone && log.as_ref().is_some_and(|log| log.records() > 0);
        // Close the old handle first: the file cannot be opened twice in one process.
        drop(db.take());
        let mine = sharing.request.take();
        // A relay's new request answers nobody yet: its next look does.
        let answer = self.prefer_alone.then_some(&[][..]);
        let opened = match keep_alone {
            true => match open_existing(&self.path, &self.backend, Mode::Alone) {
                // Taken meanwhile by a command (which could apply the log, synced): join it.
                Err(SpoolError::InUse { .. }) => {
                    open_sharing(&self.path, &self.backend, alone, mine, answer)
                }
                opened => opened.map(|opened| (opened, Sharing::alone())),
            },
            false => open_sharing(&self.path, &self.backend, alone, mine, answer),
        };
        let (fresh, now) = match opened {
            Ok(opened) => opened,
            Err(e) if keep_alone => {
                // Tried alone again next time, the log's records still counted.
                *self.log() = log;
                return Err(e);
            }
            Err(e) => {
                // `open_sharing` dropped the request with its error: shared is safe to retry.
                sharing.mode = Mode::Shared;
                return Err(e);
            }
        };
        *sharing = now;
        *self.log() = fresh.wal(&self.path, sharing.mode);
        self.behind
            .store(fresh.behind, std::sync::atomic::Ordering::Relaxed);
        *db = Some(fresh.db);
        self.set_alone(sharing.mode == Mode::Alone);
        self.needs_reopen
            .store(false, std::sync::atomic::Ordering::Relaxed);
        // Debug: while the disk stays full this repeats with every retry; the user-facing lines
        // are the writer's ERROR and "the spool takes writes again".
        tracing::debug!(spool = %self.path.display(), "spool opened again after a failed write");
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id a target sees in `x-smee-relay-delivery`: the same for every attempt of one queued
    /// delivery (so it can dedupe a redelivery), new for an explicit replay.
    pub fn delivery_id(&self, seq: u64) -> String {
        format!("{:016x}-{seq}", self.instance)
    }

    /// Run `f` in a read transaction.
    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, SpoolError> {
        use std::sync::atomic::Ordering::Relaxed;
        // After a failed write, redb refuses reads too until the database is opened again.
        self.reopen_if_needed()?;
        let db = self.db.read().expect("not poisoned");
        let db = db.as_ref().ok_or(SpoolError::Reopening)?;
        // What only the log holds yet is applied first: a reader sees every answered write.
        self.apply_logged(db)?;
        self.reads.fetch_add(1, Relaxed);
        let run = || f(&db.begin_read()?);
        // Damage that the open did not see can make redb panic on a read: name the file.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
            .map_err(|panic| self.panicked(panic))?;
        result.map_err(|e| {
            if matches!(e, redb::Error::PreviousIo) {
                self.needs_reopen.store(true, Relaxed);
            }
            self.io(e)
        })
    }

    /// Run `f` in a write transaction and commit it (one fsync).
    fn update<T>(
        &self,
        f: impl FnOnce(&mut Tables<'_>) -> Result<T, redb::Error>,
    ) -> Result<T, SpoolError> {
        self.update_if(f, |_| true)
    }

    /// Run `f` in a write transaction; commit it if `wrote` says `f` changed anything or the
    /// log holds records not yet applied (the transaction applies them first), else abort it
    /// (no write, no fsync: an idle file keeps its stamp, see [`Spool::look`]).
    fn update_if<T>(
        &self,
        f: impl FnOnce(&mut Tables<'_>) -> Result<T, redb::Error>,
        wrote: impl FnOnce(&T) -> bool,
    ) -> Result<T, SpoolError> {
        self.reopen_if_needed()?;
        let db = self.db.read().expect("not poisoned");
        let db = db.as_ref().ok_or(SpoolError::Reopening)?;
        self.transact(db, f, wrote, false)
    }

    /// After a failed write, open the database again first (redb refuses every later one).
    fn reopen_if_needed(&self) -> Result<(), SpoolError> {
        if self.needs_reopen.load(std::sync::atomic::Ordering::Relaxed) {
            self.reopen().inspect_err(|e| {
                if let SpoolError::Damaged { why, .. } = e {
                    self.found(why.clone());
                }
                self.failed(e)
            })?;
        }
        Ok(())
    }

    /// [`Spool::update_if`] on `db` (a synced commit). It makes what the write-ahead log holds
    /// durable in the file: the log starts over. `appends`: whether `f` appends events.
    fn transact<T>(
        &self,
        db: &Database,
        f: impl FnOnce(&mut Tables<'_>) -> Result<T, redb::Error>,
        wrote: impl FnOnce(&T) -> bool,
        appends: bool,
    ) -> Result<T, SpoolError> {
        // The log before the lock of write transactions, as every writer takes them.
        let mut log = self.log();
        let _writing = self.writing();
        // A synced commit also carries what the log holds into the file: events, as far as
        // the outage is concerned (a relay restarted on a full disk failed its checkpoint, and
        // a delivery recorded next in the log said it took writes again).
        let appends = appends || log.as_ref().is_some_and(|log| log.records() > 0);
        let deferred = log.as_ref().map_or(&[][..], wal::Wal::deferred);
        let run = || {
            let txn = db.begin_write()?;
            let mut tables = Tables::open(&txn)?;
            apply_deferred(&mut tables, deferred)?;
            let out = f(&mut tables)?;
            if !wrote(&out) && deferred.is_empty() {
                drop(tables);
                txn.abort()?;
                return Ok((out, None));
            }
            let marked = self.mark_current(&mut tables)?;
            let logged = tables.counter(WAL_SEQ)?;
            let after = counters(&mut tables, self.instance)?;
            tables.store_counters()?;
            drop(tables);
            txn.commit()?;
            self.marked_current(marked);
            Ok((out, Some((logged, after))))
        };
        // A panic in redb (damage the open did not find) fails the write like an error does.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
            Ok(Ok((out, committed))) => {
                if let Some((persisted, after)) = committed
                    && let Some(log) = log.as_mut()
                {
                    self.applied(log, after);
                    log.persisted(persisted, after);
                }
                self.writes_again(appends);
                Ok(out)
            }
            failed => {
                self.write_refused(appends);
                Err(match failed {
                    Ok(Err(e)) => self.commit_failed(e),
                    Err(panic) => self.write_panicked(panic),
                    Ok(Ok(_)) => unreachable!("matched above"),
                })
            }
        }
    }

    /// In a transaction that writes: if the file is of an older format, raise its number (its
    /// rows are now partly of this one; written back with the counters, as `meta` values).
    /// Returns whether it did, for [`Spool::marked_current`].
    fn mark_current(&self, t: &mut Tables<'_>) -> Result<bool, redb::Error> {
        if !self.behind.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(false);
        }
        t.set(FORMAT, FORMAT_VERSION)?;
        Ok(true)
    }

    /// The transaction that raised the format's number committed: said once.
    fn marked_current(&self, marked: bool) {
        if marked
            && self
                .behind
                .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::info!(
                spool = %self.path.display(),
                "upgraded the spool to format {FORMAT_VERSION}: smee-relay builds from before \
                 2026-12-02 no longer open it (they refuse it as newer; there is no downgrade)"
            );
        }
    }

    /// A commit failed; it appended events if `appends`.
    fn write_refused(&self, appends: bool) {
        if appends {
            self.appends_refused
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A commit succeeded (one that appended events if `appends`): if writes failed before,
    /// say that they work again; after a failed append, only once an append succeeds.
    fn writes_again(&self, appends: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        if !appends && self.appends_refused.load(Relaxed) {
            return;
        }
        self.appends_refused.store(false, Relaxed);
        let was_refused = (self.write_error.lock().expect("not poisoned").take()).is_some();
        let said = std::mem::take(&mut self.outage_said.lock().expect("not poisoned").1);
        if was_refused && said {
            tracing::info!(spool = %self.path.display(), "the spool takes writes again");
        }
    }

    /// Whether to say that writes are refused now, at the start of an outage (see
    /// [`Spool::outage_said`]); if so, its end will be said too.
    pub(crate) fn say_outage(&self) -> bool {
        let mut said = self.outage_said.lock().expect("not poisoned");
        let now = std::time::Instant::now();
        let due = said
            .0
            .is_none_or(|at| now.duration_since(at) >= crate::clock::TALLY_PERIOD);
        if due {
            *said = (Some(now), true);
        }
        due
    }

    /// A commit failed with `e`: whatever failed, redb may now refuse every later write
    /// (PreviousIo), so the file is opened again before the next one (an open of a healthy file
    /// is cheap).
    fn commit_failed(&self, e: redb::Error) -> SpoolError {
        self.needs_reopen
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let e = self.io(e);
        self.failed(&e);
        e
    }

    /// The write-ahead log. A panic while it was held (redb's, on damage) leaves it as
    /// consistent as the file it mirrors: taken as is, and the reopen that follows the failed
    /// write starts it again from the file.
    fn log(&self) -> std::sync::MutexGuard<'_, Option<wal::Wal>> {
        self.wal.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lock of write transactions ([`Spool::writing`]); it guards no data, so a panic
    /// while it was held leaves nothing to mend.
    fn writing(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A panic in redb while reading or writing: damage the open did not find.
    fn panicked(&self, panic: Box<dyn std::any::Any + Send>) -> SpoolError {
        let why = Damage::Panic(panic_message(&*panic));
        self.found(why.clone());
        self.damaged(why)
    }

    /// Note damage found while open (the first is kept): see [`Spool::damage`].
    fn found(&self, why: Damage) {
        self.damage.send_if_modified(|damage| {
            let first = damage.is_none();
            damage.get_or_insert(why);
            first
        });
    }

    /// Damage found in the file since it was opened (redb panicked reading a page, or said the
    /// file is corrupted, or a reopen after a failed write refused it): what a relay stops on,
    /// with the same message and exit status as when its start finds damage.
    pub fn damage(&self) -> tokio::sync::watch::Receiver<Option<Damage>> {
        self.damage.subscribe()
    }

    /// [`Spool::damage`] as the error a start that found it returns.
    pub fn damaged(&self, why: Damage) -> SpoolError {
        SpoolError::Damaged {
            path: self.path.clone(),
            why,
        }
    }

    /// A panic in redb while writing: as [`Spool::commit_failed`], the file is opened again
    /// before the next write (redb's state after it is unknown).
    fn write_panicked(&self, panic: Box<dyn std::any::Any + Send>) -> SpoolError {
        self.needs_reopen
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let e = self.panicked(panic);
        self.failed(&e);
        e
    }

    fn failed(&self, e: &SpoolError) {
        *self.write_error.lock().expect("not poisoned") = Some(crate::error::chain(e));
    }

    fn io(&self, source: redb::Error) -> SpoolError {
        if let redb::Error::Corrupted(why) = &source {
            self.found(Damage::Redb(format!(
                "the database library calls it corrupted: {why}"
            )));
        }
        SpoolError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Apply `writes` in one transaction (one fsync). In a relay, only its writer thread
    /// calls this: the writer tells the routes of what it appended. Anything else in the relay's
    /// process that queues deliveries must [`Spool::nudge`] them (as `append_missing` and
    /// `replay` do), or an idle route on a spool held alone never hears of it.
    pub fn write<'w>(
        &self,
        writes: impl IntoIterator<Item = &'w Write>,
        limits: Limits,
    ) -> Result<WriteReport, SpoolError> {
        let now = now_ms();
        self.update(|t| apply(t, writes, now, limits))
    }

    /// [`Spool::write`], for the writer thread: while the file is open alone, a small batch of
    /// appends and marks is made durable by a record in the write-ahead log ([`wal`]) and
    /// applied in a commit that is not synced; anything else (a large batch, a pipeline state,
    /// a spool shared or a log that is full) is committed and synced as `write` does, which
    /// also makes everything logged before it durable in the file.
    pub(crate) fn write_logged<'w>(
        &self,
        writes: impl IntoIterator<Item = &'w Write>,
        limits: Limits,
    ) -> Result<WriteReport, SpoolError> {
        let writes: Vec<&Write> = writes.into_iter().collect();
        self.reopen_if_needed()?;
        let db = self.db.read().expect("not poisoned");
        let db = db.as_ref().ok_or(SpoolError::Reopening)?;
        let mut log = self.log();
        let Some(log) = log
            .as_mut()
            .filter(|_| appended_bytes(writes.iter().copied()) <= wal::MAX_LOGGED_BYTES)
        else {
            drop(log);
            let now = now_ms();
            let appends = appended_bytes(writes.iter().copied()) > 0;
            return self.transact(db, |t| apply(t, writes, now, limits), |_| true, appends);
        };
        self.log_and_apply(db, log, self.writing(), &writes, limits, false)
            .expect("a write that may wait is always done")
    }

    /// [`Spool::write_logged`] for a writer that must not wait (an appender, on its event
    /// loop): `None`, having done nothing, unless the batch goes to the write-ahead log at once
    /// and is applied without a scan, or its apply deferred to the spool's next transaction
    /// ([`log_only`]). That takes the file open alone and not being opened
    /// again, the log free, working and with room for the record, no other write transaction
    /// under way (a prune's scan), and the spool not near `limits.max_bytes` (where an append
    /// prunes first, a scan of every delivery record). Only a log write that fails is still
    /// followed by a synced commit here, as in [`Spool::write_logged`].
    pub(crate) fn try_write_logged(
        &self,
        writes: &[&Write],
        limits: Limits,
    ) -> Option<Result<WriteReport, SpoolError>> {
        let bytes = appended_bytes(writes.iter().copied());
        if bytes > wal::MAX_LOGGED_BYTES
            || self.needs_reopen.load(std::sync::atomic::Ordering::Relaxed)
        {
            return None;
        }
        // A lock poisoned by a panic guards nothing broken (see `log` and `writing`).
        fn free<G>(tried: std::sync::TryLockResult<G>) -> Option<G> {
            match tried {
                Ok(guard) => Some(guard),
                Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            }
        }
        let db = free(self.db.try_read())?;
        // Again, under the lock a reopen takes: a reader may have failed meanwhile.
        if self.needs_reopen.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let db = db.as_ref()?;
        let mut log = free(self.wal.try_lock())?;
        let log = log
            .as_mut()
            .filter(|log| !log.failing() && log.takes(bytes + wal::RECORD_SLACK))?;
        let writing = free(self.writing.try_lock())?;
        self.log_and_apply(db, log, writing, writes, limits, true)
    }

    /// The write of [`Spool::write_logged`] when the log is there for it, with the lock of
    /// write transactions (`_writing`) taken. `quick` ([`Spool::try_write_logged`]): the
    /// record's apply is deferred where it can be ([`log_only`]); `None`, with nothing written,
    /// if the log would not take the record, the spool is near full, or a commit failed since
    /// the caller looked.
    fn log_and_apply(
        &self,
        db: &Database,
        log: &mut wal::Wal,
        _writing: std::sync::MutexGuard<'_, ()>,
        writes: &[&Write],
        limits: Limits,
        quick: bool,
    ) -> Option<Result<WriteReport, SpoolError>> {
        let now = now_ms();
        let appends = appended_bytes(writes.iter().copied()) > 0;
        // A commit synced to the file carries what the log holds into it (as `transact`'s).
        let logged_before = log.records() > 0;
        let was_failing = log.failing();
        // Checked again under the log's lock: a commit that failed since the caller looked may
        // have reached the disk in part, and only the reopen knows the counters then.
        if quick && self.needs_reopen.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        // Only an appender's (a trickle): the writer thread's batches are larger, and their
        // apply runs beside the event loop, where a deferred one would fall to the next read.
        if quick && let Some(report) = log_only(log, writes, limits, now) {
            self.deferring
                .store(true, std::sync::atomic::Ordering::Release);
            // In the log, synced: stored as much as a commit's events are.
            self.writes_again(appends);
            return Some(Ok(report));
        }
        // The record's write just failed there (it said why): not tried twice.
        let failed_now = log.failing() && !was_failing;
        // The record is written inside the transaction, so that what it expects of the spool
        // (read here) is what it is applied to: no other commit can come between.
        let mut logged_at = None;
        let run = || -> Result<Option<(WriteReport, Option<u64>, wal::Expect)>, redb::Error> {
            let mut txn = db.begin_write()?;
            let mut t = Tables::open(&txn)?;
            apply_deferred(&mut t, log.deferred())?;
            // Read once, and kept for `apply` (counters are cached per transaction).
            let expect = counters(&mut t, self.instance)?;
            let seq = log.next_seq();
            let record =
                wal::encode(seq, expect, now, limits, writes).filter(|r| log.takes(r.len()));
            if quick {
                // Rows count about twice what an event holds in memory (headers as JSON, the
                // body): well short of full, no append prunes.
                let room = (2 * appended_bytes(writes.iter().copied()) + wal::RECORD_SLACK) as u64;
                if record.is_none() || expect.stored_bytes + room > limits.max_bytes {
                    // What this transaction applied of the deferred records waits on.
                    drop(t);
                    txn.abort()?;
                    return Ok(None);
                }
            }
            // Not taken by the log (a pipeline state, a full log): synced to the file, with
            // everything logged before.
            let mut numbered = false;
            if let Some(record) = record {
                numbered = true;
                match (!failed_now).then(|| log.append(&record)).flatten() {
                    Some(at) => logged_at = Some(at),
                    // Not written (it said why): synced to the file, under the record's number,
                    // so that whatever of the record reached the disk is never applied again.
                    None => log.burn(),
                }
            }
            let report = apply(&mut t, writes.iter().copied(), now, limits)?;
            if numbered {
                t.set(WAL_SEQ, seq)?;
            }
            let marked = self.mark_current(&mut t)?;
            let persisted = t.counter(WAL_SEQ)?;
            let after = counters(&mut t, self.instance)?;
            t.store_counters()?;
            drop(t);
            // Decided at the end (redb takes it at the commit): logged, the record is what
            // makes it durable. Not the commit that raises the format's number: an older
            // relay started after a crash must find the file refusing it, not a log it
            // cannot read.
            if logged_at.is_some() && !marked {
                txn.set_durability(redb::Durability::None)?;
            }
            txn.commit()?;
            self.marked_current(marked);
            Ok(Some((
                report,
                logged_at.is_none().then_some(persisted),
                after,
            )))
        };
        // A panic in redb (damage the open did not find) fails the write like an error does.
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run));
        Some(match ran {
            Ok(Ok(None)) => return None,
            Ok(Ok(Some((report, persisted, after)))) => {
                self.applied(log, after);
                let synced = persisted.is_some();
                if let Some(persisted) = persisted {
                    log.persisted(persisted, after);
                }
                self.writes_again(appends || (synced && logged_before));
                Ok(report)
            }
            failed => {
                self.write_refused(appends || (logged_at.is_none() && logged_before));
                // Its appenders are told it failed, and try again: the record must not be
                // applied by the reopen that follows, nor by a start after a crash. (Deferred
                // records stay in the log: the reopen applies them.)
                if let Some(at) = logged_at {
                    log.undo(at);
                }
                Err(match failed {
                    Ok(Err(e)) => self.commit_failed(e),
                    Err(panic) => self.write_panicked(panic),
                    Ok(Ok(_)) => unreachable!("matched above"),
                })
            }
        })
    }

    /// A commit applied `log`'s deferred records (and whatever else), leaving the counters at
    /// `after`. Called with the log's lock held, as every deferral is made.
    fn applied(&self, log: &mut wal::Wal, after: wal::Expect) {
        log.applied(after);
        self.deferring
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// Apply what the write-ahead log holds and redb does not yet ([`wal::Wal::defer`]), in a
    /// commit that is not synced: before a read, which must see it.
    fn apply_logged(&self, db: &Database) -> Result<(), SpoolError> {
        if !self.deferring.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let mut log = self.log();
        let Some(log) = log.as_mut().filter(|log| !log.deferred().is_empty()) else {
            // Applied meanwhile, or the log was opened again (a reopen applies what it held).
            self.deferring
                .store(false, std::sync::atomic::Ordering::Release);
            return Ok(());
        };
        let _writing = self.writing();
        let run = || -> Result<wal::Expect, redb::Error> {
            let mut txn = db.begin_write()?;
            txn.set_durability(redb::Durability::None)?;
            let mut t = Tables::open(&txn)?;
            apply_deferred(&mut t, log.deferred())?;
            let after = counters(&mut t, self.instance)?;
            t.store_counters()?;
            drop(t);
            txn.commit()?;
            Ok(after)
        };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
            Ok(Ok(after)) => {
                self.applied(log, after);
                Ok(())
            }
            Ok(Err(e)) => Err(self.commit_failed(e)),
            Err(panic) => Err(self.write_panicked(panic)),
        }
    }

    /// Make everything written through the write-ahead log durable in the file itself (one
    /// synced commit), so the log starts over. Nothing to do if nothing was logged since.
    /// Returns whether it committed.
    pub(crate) fn checkpoint(&self) -> Result<bool, SpoolError> {
        if self.logged() == 0 {
            return Ok(false);
        }
        self.update(|_| Ok(())).map(|()| true)
    }

    /// Records in the write-ahead log not yet made durable in the file ([`Spool::checkpoint`]).
    pub(crate) fn logged(&self) -> usize {
        self.log().as_ref().map_or(0, wal::Wal::records)
    }

    /// [`Spool::logged`] unless a write holds the log (`None`): for a caller that must not wait
    /// for a whole write (a prune's scan), holding a lock others need.
    pub(crate) fn logged_now(&self) -> Option<usize> {
        let log = match self.wal.try_lock() {
            Ok(log) => log,
            // As `log()` takes it.
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(log.as_ref().map_or(0, wal::Wal::records))
    }

    /// Records in the write-ahead log not yet applied to redb at all ([`wal::Wal::defer`]).
    #[cfg(test)]
    fn deferred(&self) -> usize {
        self.log().as_ref().map_or(0, |log| log.deferred().len())
    }

    /// Up to `limit` deliveries queued on `route` after `after_seq`, in order, and no more
    /// bodies than [`READ_BYTES`] beyond the first (so reading ahead stays cheap in memory when
    /// events are large).
    pub fn pending(
        &self,
        route: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Queued>, SpoolError> {
        Ok(self.pending_known(route, after_seq, limit)?.0)
    }

    /// [`Spool::pending`], and the spool's next-seq counter as of the read (see [`Enqueued`]):
    /// up to it, the route's whole queue is in the read if the read returned less than `limit`
    /// events and [`READ_BYTES`].
    pub fn pending_known(
        &self,
        route: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<(Vec<Queued>, u64), SpoolError> {
        self.read(|txn| {
            let next_seq = txn
                .open_table(META)?
                .get(NEXT_SEQ)?
                .map_or(0, |v| v.value());
            let pending = txn.open_table(PENDING)?;
            let events = txn.open_table(EVENTS)?;
            let chunks = txn.open_table(BODY_CHUNKS)?;
            let records = txn.open_table(RECORDS)?;
            let mut out = Vec::new();
            let mut bytes = 0;
            for entry in pending.range((route, after_seq.saturating_add(1))..=(route, u64::MAX))? {
                let (key, id) = entry?;
                let (seq, id) = (key.value().1, id.value());
                let attempts = read_record(&records, id, route)?.map_or(0, |r| r.attempts);
                if let Some(event) = read_full_event(&events, &chunks, id)? {
                    bytes += event.event.body.len();
                    out.push(Queued {
                        seq,
                        event,
                        attempts,
                    });
                }
                if out.len() >= limit || bytes >= READ_BYTES {
                    break;
                }
            }
            Ok((out, next_seq))
        })
    }

    /// One event and its delivery records.
    pub fn get(&self, id: u64) -> Result<EventWithRecords, SpoolError> {
        self.read(|txn| {
            let events = txn.open_table(EVENTS)?;
            let chunks = txn.open_table(BODY_CHUNKS)?;
            let records = txn.open_table(RECORDS)?;
            let Some(event) = read_full_event(&events, &chunks, id)? else {
                // Pruned, or not received yet: the error says which.
                let newest = txn
                    .open_table(META)?
                    .get(NEXT_EVENT)?
                    .map_or(0, |v| v.value());
                return Ok(Err(newest));
            };
            let mut routes = Vec::new();
            for entry in records.range((id, "")..(id + 1, ""))? {
                let (key, value) = entry?;
                if let Some(record) = record::decode(value.value()) {
                    routes.push((route_target(key.value().1).to_string(), record));
                }
            }
            Ok(Ok((event, routes)))
        })?
        .map_err(|newest| match id > newest {
            true => SpoolError::NotYet { id, newest },
            false => SpoolError::NoSuchEvent(id),
        })
    }

    /// The last `limit` rows (oldest first), optionally only those with `status`.
    pub fn list(&self, status: Option<Status>, limit: usize) -> Result<Vec<Row>, SpoolError> {
        self.read(|txn| {
            let events = txn.open_table(EVENTS)?;
            let records = txn.open_table(RECORDS)?;
            let mut rows = std::collections::VecDeque::new();
            for entry in records.iter()?.rev() {
                if rows.len() >= limit {
                    break;
                }
                let (key, value) = entry?;
                let (id, route) = key.value();
                let Some(record) = record::decode(value.value()) else {
                    continue;
                };
                if status.is_some_and(|s| s != record.status) {
                    continue;
                }
                let Some(event) = read_event(&events, id)? else {
                    continue;
                };
                rows.push_front(Row {
                    id,
                    received_ms: event.received_ms,
                    channel: event.channel.clone(),
                    route: route_target(route).to_string(),
                    record,
                    kind: event_kind(&event.event),
                    recovered: event
                        .event
                        .header("x-smee-relay-recovered")
                        .map(String::from),
                });
            }
            Ok(rows.into())
        })
    }

    /// Queue events again at the tail of their routes: the given ids, every dead letter, or
    /// every event received since a time. Pending deliveries are left where they are. Returns
    /// how many deliveries were queued.
    pub fn replay(&self, which: Replay) -> Result<usize, SpoolError> {
        self.replay_routes(which).map(|routes| routes.len())
    }

    /// [`Spool::replay`], returning the route (queue) of each delivery queued again.
    pub fn replay_routes(&self, which: Replay) -> Result<Vec<String>, SpoolError> {
        if let Replay::Ids(ids) = &which {
            for id in ids {
                self.get(*id)?;
            }
        }
        self.update(|t| {
            let mut chosen = Vec::new();
            for entry in t.records.iter()? {
                let (key, value) = entry?;
                let (id, route) = key.value();
                let Some(record) = record::decode(value.value()) else {
                    continue;
                };
                let wanted = record.status != Status::Pending
                    && match &which {
                        Replay::Ids(ids) => ids.contains(&id),
                        Replay::Dead => record.status == Status::Dead,
                        Replay::ReceivedSince(since_ms) => {
                            read_event(&t.events, id)?.is_some_and(|e| e.received_ms >= *since_ms)
                        }
                    };
                if wanted {
                    chosen.push((id, route.to_string()));
                }
            }
            let now = now_ms();
            for (id, route) in &chosen {
                t.enqueue(*id, route, now)?;
            }
            Ok(chosen.into_iter().map(|(_, route)| route).collect())
        })
        .inspect(|_| self.nudge())
    }

    /// Forget every dead letter. Returns how many deliveries were removed.
    pub fn purge_dead(&self) -> Result<usize, SpoolError> {
        self.update(|t| {
            let mut dead = Vec::new();
            for entry in t.records.iter()? {
                let (key, value) = entry?;
                let (id, route) = key.value();
                if record::status(value.value()) == Some(Status::Dead) {
                    dead.push((id, route.to_string()));
                }
            }
            for (id, route) in &dead {
                t.records.remove((*id, route.as_str()))?;
                t.drop_event_if_unreferenced(*id)?;
            }
            Ok(dead.len())
        })
    }

    /// How many deliveries wait on `route`, counted up to one past [`MOST_COUNTED`].
    pub fn queued(&self, route: &str) -> Result<u64, SpoolError> {
        self.read(|txn| count_queued(&txn.open_table(PENDING)?, route))
    }

    /// Every queue that holds pending deliveries, by name, with how many (counted up to one
    /// past [`MOST_COUNTED`]).
    pub fn pending_queues(&self) -> Result<Vec<(String, u64)>, SpoolError> {
        self.read(|txn| {
            let pending = txn.open_table(PENDING)?;
            let mut queues: Vec<(String, u64)> = Vec::new();
            loop {
                // Past the last queue found: no delivery has seq u64::MAX.
                let next = match queues.last() {
                    None => pending.first()?,
                    Some((route, _)) => pending
                        .range((route.as_str(), u64::MAX)..)?
                        .next()
                        .transpose()?,
                };
                let Some((key, _)) = next else {
                    return Ok(queues);
                };
                let route = key.value().0.to_string();
                let count = count_queued(&pending, &route)?;
                queues.push((route, count));
            }
        })
    }

    /// Forget the deliveries still waiting on `route`: a queue no relay delivers from. Events
    /// no other delivery needs go with them. Returns how many deliveries.
    pub fn purge_queue(&self, route: &str) -> Result<usize, SpoolError> {
        self.update(|t| {
            let mut queued = Vec::new();
            for entry in t.pending.range((route, 0)..=(route, u64::MAX))? {
                let (key, id) = entry?;
                queued.push((key.value().1, id.value()));
            }
            for (seq, id) in &queued {
                t.pending.remove((route, *seq))?;
                t.records.remove((*id, route))?;
                t.drop_event_if_unreferenced(*id)?;
            }
            Ok(queued.len())
        })
    }

    /// The values of header `name` on the stored events from `channel` (as shown, redacted):
    /// e.g. the GitHub delivery GUIDs the spool already has. Events pruned are not seen.
    pub fn header_values(
        &self,
        channel: &str,
        name: &str,
    ) -> Result<std::collections::HashSet<String>, SpoolError> {
        self.read(|txn| header_values(&txn.open_table(EVENTS)?, channel, name))
    }

    /// The queues events of the channel with key `channel_key` ([`lock::channel_key`]) have
    /// been queued on: the routes of a `forward` relay when there is no config to say them.
    pub fn channel_routes(&self, channel_key: &str) -> Result<Vec<String>, SpoolError> {
        let prefix = format!("{channel_key} ");
        self.read(|txn| {
            let mut routes = std::collections::BTreeSet::new();
            for entry in txn.open_table(RECORDS)?.iter()? {
                let (key, _) = entry?;
                let route = key.value().1;
                if route.starts_with(&prefix) {
                    routes.insert(route.to_string());
                }
            }
            Ok(routes.into_iter().collect())
        })
    }

    /// The queues of the channel with key `channel_key` that hold pending deliveries, other
    /// than `served`, with how many each holds (up to one past [`MOST_COUNTED`]): what a relay
    /// started with other targets leaves undelivered. A look per queue, and a count only of
    /// those not served.
    pub fn unserved_queues(
        &self,
        channel_key: &str,
        served: &[String],
    ) -> Result<Vec<(String, u64)>, SpoolError> {
        let prefix = format!("{channel_key} ");
        self.read(|txn| {
            let pending = txn.open_table(PENDING)?;
            let mut out = Vec::new();
            let mut from = prefix.clone();
            loop {
                let route = match pending.range((from.as_str(), 0)..)?.next() {
                    Some(entry) => entry?.0.value().0.to_string(),
                    None => break,
                };
                if !route.starts_with(&prefix) {
                    break;
                }
                if !served.contains(&route) {
                    out.push((route.clone(), count_queued(&pending, &route)?));
                }
                // Past every place in this queue: the least name after it.
                from = route + "\0";
            }
            Ok(out)
        })
    }

    /// Append `events` from `channel` to each of `routes`, in order, except those whose header
    /// `name` has a value already stored for the channel (checked in the same transaction, so
    /// two runs at once cannot both add one). Returns per event its new id, or `None` when it
    /// was there already. Used for events recovered from elsewhere (GitHub's deliveries): they
    /// queue behind what is queued, as if they arrived now. The size limit is not applied: they
    /// are few, and what `--max-spool-size` the relay runs with is not known here.
    pub fn append_missing(
        &self,
        channel: &str,
        routes: &[String],
        events: &[Event],
        name: &str,
    ) -> Result<Vec<Option<u64>>, SpoolError> {
        self.update(|t| {
            let mut seen = header_values(&t.events, channel, name)?;
            let now = now_ms();
            let mut ids = Vec::with_capacity(events.len());
            for event in events {
                if let Some(value) = event.header(name)
                    && !seen.insert(value.to_string())
                {
                    ids.push(None);
                    continue;
                }
                let row = EventRow::new(now, channel, event);
                let id = t.bump(NEXT_EVENT, 1)? + 1;
                t.put_event(id, &row)?;
                t.bump(STORED_BYTES, row.stored_size())?;
                for route in routes {
                    t.enqueue(id, route, now)?;
                }
                ids.push(Some(id));
            }
            Ok(ids)
        })
        .inspect(|_| self.nudge())
    }

    /// Move the version-1 deliveries of one channel to their version-2 queues: those queued
    /// on one of `targets` by the target URL alone, of events received from the channel shown
    /// as `shown` (its redacted name, which is what version 1 stored). Each keeps its `seq`, so
    /// its place in line. The channel's `Last-Event-ID` moves from `legacy_cursor` (its key in
    /// version 1) to `channel_key` unless one is already there. Returns how many moved.
    pub fn adopt_legacy(
        &self,
        channel_key: &str,
        legacy_cursor: &str,
        shown: &str,
        targets: &[String],
    ) -> Result<usize, SpoolError> {
        let legacy = self.read(|txn| Ok(txn.open_table(META)?.get(LEGACY)?.is_some()))?;
        if !legacy {
            return Ok(0);
        }
        self.update(|t| {
            if t.cursors.get(channel_key)?.is_none() {
                let old = t
                    .cursors
                    .remove(legacy_cursor)?
                    .map(|v| v.value().to_string());
                if let Some(old) = old {
                    t.cursors.insert(channel_key, old.as_str())?;
                }
            }
            let mut moving = Vec::new();
            let mut left = false;
            for entry in t.records.iter()? {
                let (key, value) = entry?;
                let (id, route) = key.value();
                if !is_legacy(route) {
                    continue;
                }
                let ours = targets.iter().any(|t| t == route)
                    && read_event(&t.events, id)?.is_some_and(|e| e.channel == shown);
                if !ours {
                    left = true;
                    continue;
                }
                if let Some(record) = record::decode(value.value()) {
                    moving.push((id, route.to_string(), record));
                }
            }
            for (id, route, record) in &moving {
                let key = route_key(channel_key, route);
                t.records.remove((*id, route.as_str()))?;
                t.put_record(*id, &key, record)?;
                if record.status == Status::Pending
                    && t.pending.remove((route.as_str(), record.seq))?.is_some()
                {
                    t.pending.insert((key.as_str(), record.seq), *id)?;
                }
            }
            if !moving.is_empty() {
                // Every change to what is queued moves the seq counter: a route that knows its
                // queue up to a seq ([`Handover`]) then knows it must read again.
                t.bump(NEXT_SEQ, 1)?;
            }
            if !left {
                t.meta.remove(LEGACY)?;
            }
            Ok(moving.len())
        })
        .inspect(|_| self.nudge())
    }

    /// Remove delivered events received before `older_than_ms`. Returns how many.
    pub fn prune(&self, older_than_ms: u64) -> Result<u64, SpoolError> {
        Ok(self.prune_due(older_than_ms)?.0)
    }

    /// [`Spool::prune`], also returning when the oldest delivered event left was received
    /// (`None`: none is left), so that the caller knows when the next prune can find anything
    /// while nobody writes. Nothing pruned, nothing is committed (unless records deferred in
    /// the log are: [`Spool::update_if`]).
    pub(crate) fn prune_due(&self, older_than_ms: u64) -> Result<(u64, Option<u64>), SpoolError> {
        self.update_if(
            |t| {
                let mut next = None;
                let pruned = t.prune_delivered(older_than_ms, None, &mut next)?;
                Ok((pruned, next))
            },
            |(pruned, _)| *pruned > 0,
        )
    }

    /// Prune delivered events, oldest first, until the spool's event bytes are at most
    /// `target` (kept as long as `--retain` says otherwise): what an append does on a full
    /// spool, for a disk short of room ([`room`]). Returns how many.
    pub(crate) fn prune_early(&self, target: u64) -> Result<u64, SpoolError> {
        self.update_if(
            |t| t.prune_delivered(u64::MAX, Some(target), &mut None),
            |pruned| *pruned > 0,
        )
    }

    /// When the newest event pruned so far was received (ms since the epoch), if any was:
    /// events received before it may be gone, so their absence proves nothing.
    pub fn pruned_through(&self) -> Result<Option<u64>, SpoolError> {
        self.read(|txn| {
            Ok(txn
                .open_table(META)?
                .get(PRUNED_THROUGH)?
                .map(|v| v.value()))
        })
    }

    /// The last SSE id stored for a channel (see [`channel_key`]).
    pub fn cursor(&self, key: &str) -> Result<Option<String>, SpoolError> {
        self.read(|txn| {
            let cursors = txn.open_table(CURSORS)?;
            Ok(cursors.get(key)?.map(|v| v.value().to_string()))
        })
    }

    /// The cluster the relay using this spool last ran in (`[cluster] name`), or `None` if it
    /// ran on its own: in cluster mode the local spool holds copies of the cluster's
    /// deliveries, with local ids, and `events` says so.
    pub fn cluster(&self) -> Result<Option<String>, SpoolError> {
        self.cursor(CLUSTER)
    }

    /// Record (at start) whether the relay runs in a cluster, and which. Writes only when it
    /// changed.
    pub fn set_cluster(&self, name: Option<&str>) -> Result<(), SpoolError> {
        if self.cluster()?.as_deref() == name {
            return Ok(());
        }
        self.update(|t| {
            match name {
                Some(name) => {
                    t.cursors.insert(CLUSTER, name)?;
                }
                None => {
                    t.cursors.remove(CLUSTER)?;
                }
            }
            Ok(())
        })
    }

    /// Every stored pipeline state.
    pub fn states(&self) -> Result<Vec<(String, Vec<u8>)>, SpoolError> {
        self.read(|txn| {
            let states = txn.open_table(ALERT_STATES)?;
            let mut out = Vec::new();
            for entry in states.iter()? {
                let (key, value) = entry?;
                out.push((key.value().to_string(), value.value().to_vec()));
            }
            Ok(out)
        })
    }

    /// One stored pipeline state, by key.
    pub fn state(&self, key: &str) -> Result<Option<Vec<u8>>, SpoolError> {
        self.read(|txn| {
            let states = txn.open_table(ALERT_STATES)?;
            Ok(states.get(key)?.map(|v| v.value().to_vec()))
        })
    }

    /// Give the file's free pages back to the disk (redb's compaction: pages moved to the front,
    /// the file cut after them): what makes room on a disk the spool's own file holds
    /// ([`room`]). Only while the file is open alone, and no transaction is under way (else
    /// `Ok(None)`); it waits for reads and writes under way to end, and holds the next ones for
    /// as long as it takes. Returns what the file took on the disk before and after.
    pub(crate) fn compact(&self) -> Result<Option<(u64, u64)>, SpoolError> {
        if !self.alone.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(None);
        }
        // What the file takes on the disk (blocks): redb sizes it ahead, with holes.
        let size = || {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&self.path).map_or(0, |m| m.blocks() * 512)
        };
        let mut db = self.db.write().expect("not poisoned");
        let _writing = self.writing();
        let Some(db) = db.as_mut() else {
            return Ok(None);
        };
        let before = size();
        let run = || -> Result<bool, redb::CompactionError> {
            let mut compacted = false;
            // Each call moves what it can; the next finds more until none is left.
            while db.compact()? {
                compacted = true;
            }
            Ok(compacted)
        };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
            Ok(Ok(true)) => Ok(Some((before, size()))),
            Ok(Ok(false)) | Ok(Err(redb::CompactionError::TransactionInProgress)) => Ok(None),
            Ok(Err(e)) => {
                // A failed write in it leaves redb refusing every later one, as after any.
                Err(self.commit_failed(redb::Error::from(e)))
            }
            Err(panic) => Err(self.write_panicked(panic)),
        }
    }

    /// The bytes the stored events count for (against `--max-spool-size`).
    pub(crate) fn stored_bytes(&self) -> Result<u64, SpoolError> {
        self.read(|txn| {
            Ok(txn
                .open_table(META)?
                .get(STORED_BYTES)?
                .map_or(0, |v| v.value()))
        })
    }

    pub fn stats(&self) -> Result<SpoolStats, SpoolError> {
        self.read(|txn| {
            let meta = txn.open_table(META)?;
            Ok(SpoolStats {
                stored_bytes: meta.get(STORED_BYTES)?.map_or(0, |v| v.value()),
                pending: txn.open_table(PENDING)?.len()?,
                events: txn.open_table(EVENTS)?.len()?,
            })
        })
    }
}

/// Most deliveries counted on one queue ([`Spool::queued`]; past it, one more is returned): a
/// count for a message, which must not hold a relay's start for long over a queue of millions.
pub const MOST_COUNTED: u64 = 100_000;

/// The deliveries waiting on `route` in `pending`, up to one past [`MOST_COUNTED`] (so that a
/// message can say "more than").
fn count_queued(
    pending: &impl ReadableTable<(&'static str, u64), u64>,
    route: &str,
) -> Result<u64, redb::Error> {
    let queued = pending.range((route, 0)..=(route, u64::MAX))?;
    Ok(queued.take(MOST_COUNTED as usize + 1).count() as u64)
}

/// Apply `writes` at `now` under `limits` in `t` (what [`Spool::write`] and a replay of the
/// write-ahead log commit).
fn apply<'w>(
    t: &mut Tables<'_>,
    writes: impl IntoIterator<Item = &'w Write>,
    now: u64,
    limits: Limits,
) -> Result<WriteReport, redb::Error> {
    let mut report = WriteReport::default();
    let seq_before = t.counter(NEXT_SEQ)?;
    let mut queuing = Queuing::default();
    for write in writes {
        match write {
            Write::Append {
                channel,
                routes,
                events,
                cursor,
            } => {
                if let Some((key, id)) = cursor {
                    t.cursors.insert(key.as_str(), id.as_str())?;
                }
                let mut ids = Vec::with_capacity(events.len());
                for event in events.iter() {
                    let row = EventRow::new(now, channel, event);
                    let size = row.stored_size();
                    if t.counter(STORED_BYTES)? + size > limits.max_bytes {
                        // Make room for more than this one event, so that a full spool
                        // does not scan on every append.
                        let headroom = limits.max_bytes / 10 + size;
                        let target = limits.max_bytes.saturating_sub(headroom);
                        report.pruned += t.prune_delivered(u64::MAX, Some(target), &mut None)?;
                    }
                    if t.counter(STORED_BYTES)? + size > limits.max_bytes {
                        ids.push(None);
                        continue;
                    }
                    let id = t.bump(NEXT_EVENT, 1)? + 1;
                    t.put_event(id, &row)?;
                    t.bump(STORED_BYTES, size)?;
                    queuing.event(event, routes.len());
                    for route in routes {
                        let seq = t.enqueue(id, route, now)?;
                        queuing.push(route, seq, id, now, channel, event);
                    }
                    ids.push(Some(id));
                }
                report.appended.push(ids);
            }
            Write::Mark {
                route,
                seq,
                event,
                outcome,
            } => t.mark(route, *seq, *event, outcome, now)?,
            Write::State { key, value } => match value {
                Some(value) => {
                    t.states()?.insert(key.as_str(), value.as_slice())?;
                }
                None => {
                    t.states()?.remove(key.as_str())?;
                }
            },
        }
    }
    report.enqueued = queuing.finish(seq_before, t.counter(NEXT_SEQ)?);
    Ok(report)
}

/// What [`apply`] would report for `writes` and leave in the counters, on a spool whose
/// counters are `before`, worked out without redb: for a record whose apply is deferred
/// ([`wal::Wal::defer`]). `None` where that cannot be known so: a pipeline state, or an event
/// that would not fit under `limits` as it is (`apply` prunes then, a scan, or refuses it).
/// A delivery mark changes no counter.
fn predict(
    before: wal::Expect,
    writes: &[&Write],
    now: u64,
    limits: Limits,
) -> Option<(WriteReport, wal::Expect)> {
    let mut after = before;
    let mut report = WriteReport::default();
    let mut queuing = Queuing::default();
    for write in writes {
        match write {
            Write::Append {
                channel,
                routes,
                events,
                ..
            } => {
                let mut ids = Vec::with_capacity(events.len());
                for event in events.iter() {
                    let size = EventRow::new(now, channel, event).stored_size();
                    if after.stored_bytes + size > limits.max_bytes {
                        return None;
                    }
                    after.next_event += 1;
                    after.stored_bytes += size;
                    queuing.event(event, routes.len());
                    for route in routes {
                        after.next_seq += 1;
                        queuing.push(route, after.next_seq, after.next_event, now, channel, event);
                    }
                    ids.push(Some(after.next_event));
                }
                report.appended.push(ids);
            }
            Write::Mark { .. } => {}
            Write::State { .. } => return None,
        }
    }
    report.enqueued = queuing.finish(before.next_seq, after.next_seq);
    Some((report, after))
}

/// Write `writes` to the log as a record whose apply to redb is deferred
/// ([`wal::Wal::defer`]): at everyday rates, the spool's next transaction (a checkpoint, the
/// next read, a commit that cannot be deferred) applies a run of them together, where each
/// would otherwise cost a transaction of its own. Answered from [`predict`], so only while the
/// spool's counters are known and the writes' outcome follows from them. `None`, with nothing
/// written (or a write of the log that failed, [`wal::Wal::failing`]), where they must be
/// applied now.
fn log_only(
    log: &mut wal::Wal,
    writes: &[&Write],
    limits: Limits,
    now: u64,
) -> Option<WriteReport> {
    let before = log.known().filter(|_| !log.failing())?;
    let bytes = appended_bytes(writes.iter().copied());
    if log.deferred_bytes() + bytes > DEFERRED_BYTES {
        return None;
    }
    let (report, after) = predict(before, writes, now, limits)?;
    let seq = log.next_seq();
    let record = wal::encode(seq, before, now, limits, writes).filter(|r| log.takes(r.len()))?;
    // Not written (it said why): the commit that follows is synced under this number, or (if
    // it does not follow: the spool near full) the next record takes the number and its place.
    log.append(&record)?;
    let record = wal::Record {
        seq,
        expect: before,
        now_ms: now,
        limits,
        writes: writes.iter().map(|&write| write.clone()).collect(),
        before_format_3: false,
    };
    log.defer(record, bytes, after);
    Some(report)
}

/// The deliveries a write queues, gathered for its report ([`WriteReport::enqueued`]) while
/// they fit in [`handover::HANDOVER_BYTES`].
#[derive(Default)]
struct Queuing {
    routes: Vec<(String, Vec<Queued>)>,
    /// The bytes queued so far ([`Event::held_bytes`]), on every route.
    bytes: usize,
}

impl Queuing {
    /// An event is queued on `routes` routes.
    fn event(&mut self, event: &Event, routes: usize) {
        self.bytes += event.held_bytes() * routes;
    }

    /// ... on `route`, at `seq`, as event `id`.
    fn push(&mut self, route: &str, seq: u64, id: u64, now: u64, channel: &str, event: &Event) {
        if self.bytes > handover::HANDOVER_BYTES {
            return;
        }
        let at = match self.routes.iter().position(|(r, _)| r == route) {
            Some(at) => at,
            None => {
                self.routes.push((route.to_string(), Vec::new()));
                self.routes.len() - 1
            }
        };
        self.routes[at].1.push(Queued {
            seq,
            event: StoredEvent {
                id,
                received_ms: now,
                channel: channel.to_string(),
                event: event.clone(),
            },
            attempts: 0,
        });
    }

    /// What the write queued, if all of it is here.
    fn finish(self, seq_before: u64, seq_after: u64) -> Option<Enqueued> {
        (self.bytes <= handover::HANDOVER_BYTES).then_some(Enqueued {
            seq_before,
            seq_after,
            routes: self.routes,
            held_bytes: self.bytes,
        })
    }
}

/// Apply the records whose apply was deferred ([`wal::Wal::defer`]), in order, as a start
/// after a crash would ([`replay`]); first in every transaction of the spool.
fn apply_deferred(t: &mut Tables<'_>, deferred: &[wal::Record]) -> Result<(), redb::Error> {
    for record in deferred {
        debug_assert_eq!(
            counters(t, record.expect.instance)?,
            record.expect,
            "a deferred record applies to the spool it was predicted on"
        );
        apply(t, &record.writes, record.now_ms, record.limits)?;
        t.set(WAL_SEQ, record.seq)?;
    }
    Ok(())
}

/// The counters a log record expects ([`wal::Expect`]), as `t` has them now.
fn counters(t: &mut Tables<'_>, instance: u64) -> Result<wal::Expect, redb::Error> {
    Ok(wal::Expect {
        instance,
        next_event: t.counter(NEXT_EVENT)?,
        next_seq: t.counter(NEXT_SEQ)?,
        stored_bytes: t.counter(STORED_BYTES)?,
    })
}

/// The builder every open uses, for `mode` ([`share`]).
fn builder(mode: Mode) -> redb::Builder {
    let mut builder = Database::builder();
    builder
        .set_concurrency_mode(match mode {
            Mode::Alone => redb::ConcurrencyMode::ExclusiveWriter,
            Mode::Shared => redb::ConcurrencyMode::MultiWriter,
        })
        // The spool is written once and read about once per event, soon after, while the
        // kernel's page cache still has it: a small cache serves it. redb's default (1 GiB)
        // would let resident memory grow with the file, and a larger cache measured no CPU
        // saved (BENCHMARKS.md).
        .set_cache_size(CACHE_SIZE);
    builder
}

/// redb's cache ([`builder`]).
const CACHE_SIZE: usize = 1 << 20;

/// A fresh random instance id.
fn new_instance() -> u64 {
    let seed = format!("{:?}{}", SystemTime::now(), std::process::id());
    let digest = sha2::Sha256::digest(seed);
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// Create a new spool at `path`: built under a temporary name, then renamed, so that a file
/// named `spool.redb` always holds an initialised spool (and an empty one is damage).
fn create_new(path: &Path, backend: &backend::Factory) -> Result<(), SpoolError> {
    let fresh = path.with_extension("redb.new");
    let io = |source: redb::Error| SpoolError::Io {
        path: fresh.clone(),
        source,
    };
    // Two processes starting at once on a new state directory (two relays of different
    // channels) must not build it side by side: one removed the other's file under it. The
    // second waits here, then finds the spool made.
    let creating = path.with_extension("redb.creating");
    let lock = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&creating)
        .and_then(|file| file.lock().map(|()| file))
        .map_err(|source| SpoolError::LockFile {
            path: creating.clone(),
            source,
        })?;
    // Removed while still locked: whoever waits on it finds the spool made, and it is not
    // left behind in the state directory.
    let unlock = || {
        let _ = std::fs::remove_file(&creating);
        drop(lock);
    };
    if path.exists() {
        unlock();
        return Ok(());
    }
    // A leftover from a crash during an earlier creation never held events.
    let _ = std::fs::remove_file(&fresh);
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&fresh)
        .map_err(|e| io(redb::Error::Io(e)))?;
    // Nobody else opens the file under its temporary name (creators take turns above).
    let db = builder(Mode::Alone)
        .create_with_backend(backend.wrap(file).map_err(|e| io(e.into()))?)
        .map_err(|e| io(e.into()))?;
    let init = || -> Result<(), redb::Error> {
        let txn = db.begin_write()?;
        {
            let mut t = Tables::open(&txn)?;
            // Every table exists from the start: readers open them without creating them.
            t.chunks()?;
            t.states()?;
            let mut meta = t.meta;
            meta.insert(INSTANCE, new_instance())?;
            meta.insert(FORMAT, FORMAT_VERSION)?;
        }
        txn.commit()?;
        Ok(())
    };
    init().map_err(io)?;
    drop(db);
    std::fs::rename(&fresh, path).map_err(|e| io(redb::Error::Io(e)))?;
    if let Some(dir) = path.parent()
        && let Ok(dir) = std::fs::File::open(dir)
    {
        let _ = dir.sync_all();
    }
    unlock();
    Ok(())
}

/// redb's cache for an open that applies the write-ahead log on a full disk, per byte of the
/// log: the pages the records change stay in its write buffer (half the cache), which is then
/// never written out before a checkpoint can be. A full log (1 MiB) of large or of small events
/// fit a cache of twice its size in the tests; six times leaves room.
const FULL_DISK_CACHE_PER_LOGGED_BYTE: u64 = 6;

/// Open the spool at `path`, which exists; returns it and its instance id. Damage (an empty
/// file, a file redb cannot read or panics on, a newer format) is refused, never started over.
///
/// Opened alone on a full disk, the log is applied in memory only: if what it changes does not
/// fit redb's usual cache (whose overflow is written to the file), the open is made again with
/// a cache large enough to hold it, for the life of this handle (about 6 MiB more resident at
/// most, once reads fill it), rather than refusing to start until there is space.
fn open_existing(
    path: &Path,
    backend: &backend::Factory,
    mode: Mode,
) -> Result<Opened, SpoolError> {
    match open_existing_cached(path, backend, mode, CACHE_SIZE) {
        Err(SpoolError::Replay {
            source: redb::Error::Io(e),
            ..
        }) if mode == Mode::Alone && e.raw_os_error() == Some(libc::ENOSPC) => {
            let logged = std::fs::metadata(wal::path(path)).map_or(0, |m| m.len());
            let cache = usize::try_from(logged * FULL_DISK_CACHE_PER_LOGGED_BYTE)
                .unwrap_or(usize::MAX)
                .max(CACHE_SIZE);
            // Said once a process: a relay opens the spool again at each switch between
            // sharing it and having it alone (helper-122: 183 lines in 3 minutes).
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    spool = %path.display(),
                    "the disk is full: the write-ahead log is applied in memory ({} MiB of cache) \
                     until it can be written to the spool file",
                    cache >> 20
                );
            }
            open_existing_cached(path, backend, mode, cache)
        }
        other => other,
    }
}

fn open_existing_cached(
    path: &Path,
    backend: &backend::Factory,
    mode: Mode,
    cache: usize,
) -> Result<Opened, SpoolError> {
    let damaged = |why| SpoolError::Damaged {
        path: path.to_owned(),
        why,
    };
    let io = |source: redb::Error| SpoolError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io(redb::Error::Io(e)))?;
    if file.metadata().map_err(|e| io(redb::Error::Io(e)))?.len() == 0 {
        return Err(damaged(Damage::Empty));
    }
    let backend = backend.wrap(file).map_err(|e| io(e.into()))?;
    // Whether redb found the file not closed cleanly (a crash): see `log_gone` below.
    let repaired = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let repairing = std::sync::Arc::clone(&repaired);
    // Heavy damage makes redb panic rather than return an error; catch it, to name the file.
    let opened = catch_panic(move || -> Result<Opened, SpoolError> {
        let log_gone = !wal::path(path).exists();
        let db = builder(mode)
            .set_cache_size(cache)
            .set_repair_callback(move |_| {
                repairing.store(true, std::sync::atomic::Ordering::Relaxed);
            })
            .create_with_backend(backend)
            .map_err(|e| match e {
                // Open in another process, in a mode that excludes this one ([`share`]).
                redb::DatabaseError::DatabaseAlreadyOpen => SpoolError::InUse {
                    path: path.to_owned(),
                    holders: Vec::new(),
                },
                // An error from the system (disk full, permissions) is about the disk; what
                // else redb says (a bad magic number, a checksum) is about the contents.
                redb::DatabaseError::Storage(redb::StorageError::Io(e))
                    if e.raw_os_error().is_some() =>
                {
                    io(redb::Error::Io(e))
                }
                e => damaged(Damage::Redb(e.to_string())),
            })?;
        let (instance, behind) = upgrade(&db).map_err(|e| match e {
            UpgradeError::Newer(version) => SpoolError::Newer {
                path: path.to_owned(),
                version,
            },
            UpgradeError::Redb(redb::Error::Io(e)) if e.raw_os_error().is_some() => {
                io(redb::Error::Io(e))
            }
            UpgradeError::Redb(e) => damaged(Damage::Redb(e.to_string())),
        })?;
        let (chain, applied, behind) = replay(&db, path, mode, behind)
            .map_err(|source| SpoolError::Replay {
                path: wal::path(path),
                source,
            })?
            .map_err(damaged)?;
        // A relay that crashed had its last events' commits only in its log (applied to the
        // file at a checkpoint): with the log gone they are lost, which nothing else can tell
        // (helper-149: `rm spool.wal` after a kill -9; the start said "nothing waits").
        if mode == Mode::Alone && log_gone && repaired.load(std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                spool = %path.display(),
                "the spool was not closed cleanly (a crash) and its write-ahead log {} is \
                 missing: the events and deliveries its last relay had only in the log (those \
                 of about its last second) are lost. If the log was moved, stop the relay, put \
                 it back beside the spool, and start again",
                wal::path(path).display()
            );
        }
        Ok(Opened {
            db,
            instance,
            chain,
            applied,
            behind,
        })
    });
    opened.unwrap_or_else(|panic| Err(damaged(Damage::Panic(panic.0))))
}

/// An open spool file, as [`open_existing`] leaves it.
struct Opened {
    db: Database,
    /// `meta.instance`.
    instance: u64,
    /// What the write-ahead log held, applied ([`replay`]).
    chain: wal::Chain,
    /// The last record of it that is durable in the file (`meta.wal_seq`): opened alone, the
    /// ones after it were applied in memory only, and stay in the log until a checkpoint.
    applied: u64,
    /// The file is of an older format whose number the first write raises ([`upgrade`]).
    behind: bool,
}

impl Opened {
    /// The write-ahead log to write to, for a file open alone; `None` (every commit synced to
    /// the file) if it cannot be opened, which is said.
    fn wal(&self, spool: &Path, mode: Mode) -> Option<wal::Wal> {
        if mode != Mode::Alone {
            return None;
        }
        wal::Wal::open(spool, &self.chain, self.applied)
            .inspect_err(|e| {
                tracing::warn!(
                    "cannot open the spool's write-ahead log {}: {e}; every commit is synced to \
                     the spool file instead (more CPU per event, nothing less durable)",
                    wal::path(spool).display()
                )
            })
            .ok()
    }
}

/// The bytes of the events `writes` append ([`Event::held_bytes`]): what the log's and a
/// commit's bounds count.
fn appended_bytes<'w>(writes: impl IntoIterator<Item = &'w Write>) -> usize {
    writes
        .into_iter()
        .map(|write| match write {
            Write::Append { events, .. } => events.iter().map(Event::held_bytes).sum(),
            _ => 0,
        })
        .sum()
}

/// `1 record (2 events, 0 delivery marks)`: records of the write-ahead log, as messages say
/// them.
fn records_holding(records: usize, events: usize, marks: usize) -> String {
    use crate::error::count;
    format!(
        "{} ({}, {})",
        count(records, "record", "records"),
        count(events, "event", "events"),
        count(marks, "delivery mark", "delivery marks")
    )
}

/// The spools (and their instance) of which this process said at `INFO` that it applied
/// records of the log ([`replay`]). After that, a replay is a reopen after a failed write (the
/// disk full), applying what this process logged: not news, however many times it happens.
static REPLAYS_SAID: std::sync::Mutex<Vec<(PathBuf, u64)>> = std::sync::Mutex::new(Vec::new());

/// What [`replay`] leaves: the log's records as read, the last record durable in the file, and
/// whether the file is still of an older format.
type Replayed = (wal::Chain, u64, bool);

/// Apply the records of the write-ahead log of the spool at `spool` that `db` does not hold
/// yet (a relay that held the file alone stopped without a checkpoint: a crash). Opened alone,
/// in a commit that is not synced (so an open needs no room on the disk: the records stay in
/// the log until the next checkpoint); shared, in a synced one (other processes may write the
/// file next). Returns what the log held and the last record durable in the file.
///
/// The device and inode of the file at `path`.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// A relay is about to make a new spool at `path`: if the high-water mark of an earlier one is
/// still beside it, that spool was removed or moved, and what it held is not delivered from
/// the new one; said (helper-149: the start said nothing, then "nothing waits").
fn say_spool_gone(path: &Path) {
    let Some((_, next_event, _)) = wal::read_highwater(&wal::path(path)) else {
        return;
    };
    tracing::warn!(
        spool = %path.display(),
        "no spool here, yet the high-water mark beside it ({}) says a spool with events up to \
         id {} was: it was removed or moved. A new, empty spool is made; what the old one held \
         is not delivered from it. If it was set aside as damaged, that is expected; if it was \
         moved by mistake, stop the relay, put it back, and start again",
        wal::HIGHWATER_FILE,
        next_event.saturating_sub(1)
    );
}

/// A record is applied only to the spool it was written for, as it was then
/// ([`wal::Expect`]). One that does not follow (the spool restored from a backup or made anew
/// beside an old log, or written meanwhile by an older smee-relay) ends the replay: what was
/// applied is synced, and the log is kept aside, named in a warning, rather than applied to a
/// spool it does not belong to.
///
/// A log whose next record was written for this very file (its instance) but expects more
/// than the file holds means the file lost commits it had made ([`Damage::LostCommits`]):
/// nothing is applied or set aside, and the open fails (it set the log aside as foreign, and
/// the relay went on without the lost events and reused their ids).
fn replay(
    db: &Database,
    spool: &Path,
    mode: Mode,
    behind: bool,
) -> Result<Result<Replayed, Damage>, redb::Error> {
    let path = wal::path(spool);
    let chain = wal::read(&path)?;
    let mut txn = db.begin_write()?;
    if mode == Mode::Alone {
        txn.set_durability(redb::Durability::None)?;
    }
    let mut t = Tables::open(&txn)?;
    let instance = t.counter(INSTANCE)?;
    let durable = t.counter(WAL_SEQ)?;
    // What the file held when it was last known: the log's next record, else (a log that
    // started over holds nothing of the file) the high-water mark its last start-over left.
    let next = chain.records.iter().find(|r| r.seq > durable);
    let known = match next {
        Some(r) => Some((r.expect.instance, r.expect.next_event, r.expect.next_seq)),
        None => wal::read_highwater(&path),
    };
    if let Some((of, expected, expected_seq)) = known
        && of == instance
    {
        let (events, seqs) = (t.counter(NEXT_EVENT)?, t.counter(NEXT_SEQ)?);
        let gap = next.is_some_and(|r| r.seq > durable + 1);
        if gap || events < expected || seqs < expected_seq {
            let lost = Damage::LostCommits {
                seq: next.map(|r| r.seq),
                expected,
                expected_seq,
                next: events,
                next_seq: seqs,
                events: chain
                    .records
                    .iter()
                    .filter(|r| r.seq > durable)
                    .map(|r| r.counts().0)
                    .sum(),
            };
            drop(t);
            txn.abort()?;
            return Ok(Err(lost));
        }
    }
    let mut applied = durable;
    // Records, events and marks applied, and of those that do not follow.
    let (mut records, mut events, mut marks) = (0, 0, 0);
    let (mut foreign, mut foreign_events, mut foreign_marks) = (0, 0, 0);
    for record in chain.records.iter().filter(|r| r.seq > durable) {
        let expected = wal::Expect {
            instance,
            next_event: t.counter(NEXT_EVENT)?,
            next_seq: t.counter(NEXT_SEQ)?,
            stored_bytes: t.counter(STORED_BYTES)?,
        };
        let (appended, marked) = record.counts();
        if foreign > 0 || record.seq != applied + 1 || !expected.matches(record) {
            foreign += 1;
            foreign_events += appended;
            foreign_marks += marked;
            continue;
        }
        apply(&mut t, &record.writes, record.now_ms, record.limits)?;
        t.set(WAL_SEQ, record.seq)?;
        applied = record.seq;
        records += 1;
        events += appended;
        marks += marked;
    }
    // Sound records past a damaged one ([`wal::stranded`]): answered, so their events were
    // promised; not applied, as what they expect followed the damaged record. The log started
    // over after record `durable`, and takes at most CHECKPOINT_RECORDS before it starts over
    // again (twice that, for slack). Not looked for in a log that does not follow this spool
    // (the warning below says what it is).
    let numbers = applied.max(durable) + 1..=durable + 2 * wal::CHECKPOINT_RECORDS as u64;
    let (stranded, cut) = match chain.unreadable || foreign > 0 {
        true => (Vec::new(), false),
        false => wal::stranded(&path, chain.end, instance, numbers).map_err(redb::Error::from)?,
    };
    // Their events may have been delivered already, under their ids and queue places: those
    // are never given again (a target that drops repeats by delivery id would drop new ones).
    // What a record says it expects is taken only within what a log can hold past the
    // counters (a record made up to look like one cannot move them far).
    let bound = [
        t.counter(NEXT_EVENT)?.saturating_add(wal::MOST_TAKEN),
        t.counter(NEXT_SEQ)?.saturating_add(wal::MOST_TAKEN),
    ];
    for record in &stranded {
        let (events, places) = record.takes();
        for (counter, expected, took, bound) in [
            (NEXT_EVENT, record.expect.next_event, events, bound[0]),
            (NEXT_SEQ, record.expect.next_seq, places, bound[1]),
        ] {
            let past = expected.saturating_add(took).min(bound);
            if past > t.counter(counter)? {
                t.set(counter, past)?;
            }
        }
    }
    // Applied here, the records' rows are of this format: the file says so from this commit on.
    let behind = behind && records == 0;
    if records > 0 {
        t.set(FORMAT, FORMAT_VERSION)?;
    }
    t.store_counters()?;
    drop(t);
    if records == 0 && stranded.is_empty() {
        txn.abort()?;
    } else {
        if foreign > 0 || !stranded.is_empty() {
            // The log is about to go: what came from it (and the counters past the stranded
            // records' ids) must be in the file.
            txn.set_durability(redb::Durability::Immediate)?;
        }
        txn.commit()?;
    }
    // Records applied again by the same process (a relay that cannot write, on a full disk,
    // opens the file again about twice a second, and logs deliveries meanwhile): said once.
    let again = records > 0 && {
        let mut said = REPLAYS_SAID.lock().unwrap_or_else(|e| e.into_inner());
        let this = (spool.to_owned(), instance);
        let again = said.contains(&this);
        if !again {
            said.push(this);
        }
        again
    };
    if again {
        tracing::debug!(
            spool = %spool.display(),
            records,
            "applied the write-ahead log's records again (the file was opened again after a failed write)"
        );
    } else if records > 0 {
        tracing::info!(
            spool = %spool.display(),
            "applied {} from the spool's write-ahead log that were not yet in {FILE_NAME} (the \
             relay holding it stopped without a checkpoint, or could not make one: a full \
             disk){}",
            records_holding(records, events, marks),
            if stranded.is_empty() && !cut {
                "; nothing is lost"
            } else {
                ""
            }
        );
    }
    if cut && stranded.is_empty() {
        tracing::info!(
            spool = %spool.display(),
            "the spool's write-ahead log ends on a record cut short at byte {} of {}: the relay \
             stopped while writing it, before its events counted as stored (the crash window in \
             the README), or the disk damaged it since",
            chain.end,
            wal::FILE_NAME
        );
    }
    if !stranded.is_empty() {
        let (events, marks) = stranded.iter().fold((0, 0), |(e, m), r| {
            let (events, marks) = r.counts();
            (e + events, m + marks)
        });
        let Some(aside) = set_aside(&path)? else {
            return Ok(Ok((wal::Chain::default(), applied, behind)));
        };
        tracing::error!(
            spool = %spool.display(),
            "the spool's write-ahead log is damaged: its record {} (at byte {} of {}) is \
             missing or fails its checksum, and {} after it ({events} events, {marks} delivery \
             marks, besides what the damaged record held) cannot be applied without it. Those \
             events are not in the spool: any not delivered before the stop (the delivery \
             journal's line below counts those that were) will not be, and their ids are not \
             given again. The log is kept as {}. The disk may be failing: check it (dmesg, \
             smartctl). A smee.io channel keeps no copy: ask the senders to send again what \
             matters",
            applied.max(chain.records.last().map_or(0, |r| r.seq)) + 1,
            chain.end,
            wal::FILE_NAME,
            crate::error::count(stranded.len(), "record", "records"),
            aside.display()
        );
        return Ok(Ok((wal::Chain::default(), applied, behind)));
    }
    if chain.unreadable && foreign == 0 {
        foreign = chain.records.iter().filter(|r| r.seq > applied).count();
    }
    if chain.unreadable || foreign > 0 {
        let Some(aside) = set_aside(&path)? else {
            // Another process opening the file at the same moment set it aside (and said so).
            return Ok(Ok((wal::Chain::default(), applied, behind)));
        };
        let said = format!(
            "the spool's write-ahead log held {}{} that do not follow this spool file: it was made \
             anew beside an old log (after mv {FILE_NAME} ...), restored from a backup, or \
             written meanwhile by an older or newer smee-relay. They were not applied, so those \
             events are not delivered from here; the log is kept as {}. To read them, put it \
             as spool.wal beside the spool file it came with, in a directory of their own, and \
             run `smee-relay events list --state-dir THAT_DIR` with the smee-relay that wrote \
             it",
            records_holding(foreign, foreign_events, foreign_marks),
            if chain.unreadable {
                ", and then a record this smee-relay cannot read"
            } else {
                ""
            },
            aside.display()
        );
        if foreign_events > 0 || chain.unreadable {
            tracing::warn!(spool = %spool.display(), "{said}");
        } else {
            tracing::info!(spool = %spool.display(), "{said}");
        }
        return Ok(Ok((wal::Chain::default(), applied, behind)));
    }
    let durable = match mode {
        Mode::Shared => applied,
        Mode::Alone => durable,
    };
    Ok(Ok((chain, durable, behind)))
}

/// Move the log at `path` to `spool.wal.unapplied-<UTC time>` (with `.N` after it if that is
/// taken: never over another) and return the new name; `None` if it is gone already (another
/// process opening the spool at the same moment set it aside).
fn set_aside(path: &Path) -> std::io::Result<Option<PathBuf>> {
    let time: String = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .chars()
        .filter(|c| !matches!(c, '-' | ':'))
        .collect();
    let mut n = 0;
    loop {
        let name = match n {
            0 => format!("{}.unapplied-{time}", wal::FILE_NAME),
            n => format!("{}.unapplied-{time}.{n}", wal::FILE_NAME),
        };
        let aside = path.with_file_name(name);
        // A link fails rather than replace a file of that name; the log then goes.
        match std::fs::hard_link(path, &aside) {
            Ok(()) => {
                std::fs::remove_file(path)?;
                return Ok(Some(aside));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

/// Open the spool at `path`, which exists: alone if `alone` is wanted and no other process
/// asks to share it, else shared, with a request of this process's (`mine`, or a new one) so
/// that a relay holding it alone shares it: waits up to [`SHARE_WAIT`] for that. `answer`: a
/// relay's (a new request answers these: [`share::Request::make`]); `None`: a command's.
fn open_sharing(
    path: &Path,
    backend: &backend::Factory,
    alone: bool,
    mine: Option<share::Request>,
    answer: Option<&[String]>,
) -> Result<(Opened, Sharing), SpoolError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    open_sharing_in(path, backend, alone, mine, answer, dir)
}

/// [`open_sharing`], with the requests in `dir` (tests give one where none can be made).
fn open_sharing_in(
    path: &Path,
    backend: &backend::Factory,
    alone: bool,
    mut mine: Option<share::Request>,
    answer: Option<&[String]>,
    dir: &Path,
) -> Result<(Opened, Sharing), SpoolError> {
    let mut refused = None;
    let sharing = |mode, request, refused| Sharing {
        mode,
        request,
        looked: std::time::Instant::now(),
        refused,
        unasked: false,
    };
    if alone && share::others(dir, mine.as_ref()).is_empty() {
        match open_existing(path, backend, Mode::Alone) {
            Ok(opened) => return Ok((opened, Sharing::alone())),
            // Open shared by a process that made no request (an older smee-relay): join it,
            // and do not try again at every look.
            Err(SpoolError::InUse { .. }) => refused = Some(std::time::Instant::now()),
            Err(e) => return Err(e),
        }
    }
    // Without a request (no right to create one in the directory, no free inode) the file can
    // still be opened shared, unless a relay has it alone: that one would never be asked.
    // One removed from the directory (by hand) asks nothing of anyone: made again.
    let (request, cannot_ask) = match mine.take().filter(share::Request::in_place) {
        Some(request) => (Some(request), None),
        None => match share::Request::make(dir, answer) {
            Ok(request) => (Some(request), None),
            Err(e) => (None, Some(e)),
        },
    };
    let started = std::time::Instant::now();
    let mut said = false;
    let mut tries = 0;
    loop {
        tries += 1;
        match open_existing(path, backend, Mode::Shared) {
            Ok(opened) => {
                // Refused alone, then let in at once: the file is open shared by a process
                // that makes no request. Let in only after waiting: a relay that had it alone
                // shared it when asked, nothing to remember.
                if tries > 1 {
                    refused = None;
                }
                return Ok((opened, sharing(Mode::Shared, request, refused)));
            }
            Err(SpoolError::InUse { .. }) if cannot_ask.is_some() => {
                return Err(SpoolError::CannotAsk {
                    dir: dir.to_owned(),
                    source: cannot_ask.expect("checked"),
                });
            }
            Err(SpoolError::InUse { .. }) if started.elapsed() < SHARE_WAIT => {
                if !said && started.elapsed() >= 2 * SHARE_POLL {
                    said = true;
                    tracing::info!(
                        spool = %path.display(),
                        "waiting for the relay that has the spool open to share it"
                    );
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(SpoolError::InUse { path, .. }) => {
                return Err(SpoolError::InUse {
                    path,
                    holders: lock::holders(dir),
                });
            }
            Err(e) => return Err(e),
        }
    }
}

enum UpgradeError {
    Newer(u64),
    Redb(redb::Error),
}

impl<E: Into<redb::Error>> From<E> for UpgradeError {
    fn from(e: E) -> Self {
        UpgradeError::Redb(e.into())
    }
}

/// Check the format version and record it; returns the instance id. A spool without a
/// version is version 1: its forward queues are adopted later ([`Spool::adopt_legacy`]).
/// Returns `meta.instance`, and whether the spool is of version 2: its JSON rows are read as
/// they are, and its number is raised by the first write ([`Spool::mark_current`]), not here, so
/// that a command that only reads (`events list`) leaves it to the older relay still using it.
fn upgrade(db: &Database) -> Result<(u64, bool), UpgradeError> {
    let txn = db.begin_write()?;
    let mut changed = false;
    let (instance, behind) = {
        let mut t = Tables::open(&txn)?;
        // Every table exists from here on, as readers expect ([`create_new`]): spools made
        // before `body_chunks` and `alert_states` existed lack them. Opened in a write
        // transaction, a missing table is made (and committed with a version-1 upgrade, the
        // only spools without them).
        t.chunks()?;
        t.states()?;
        let mut meta = t.meta;
        let format = meta.get(FORMAT)?.map(|v| v.value());
        if let Some(v) = format.filter(|v| *v > FORMAT_VERSION) {
            return Err(UpgradeError::Newer(v));
        }
        let behind = format.is_some_and(|v| v < FORMAT_VERSION);
        if format.is_none() {
            changed = true;
            meta.insert(FORMAT, FORMAT_VERSION)?;
            if !t.records.is_empty()? {
                meta.insert(LEGACY, 1)?;
            }
        }
        let instance = meta.get(INSTANCE)?.map(|v| v.value());
        let instance = match instance {
            Some(id) => id,
            None => {
                changed = true;
                let id = new_instance();
                meta.insert(INSTANCE, id)?;
                id
            }
        };
        (instance, behind)
    };
    // An open that changes nothing costs no commit (and no fsync): `events list` opens often.
    if changed {
        txn.commit()?;
    } else {
        txn.abort()?;
    }
    Ok((instance, behind))
}

/// Run `f`, turning a panic into its message. The panic hook is silenced meanwhile: the caller
/// reports the panic itself, with the file's name and what to do.
fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, crate::error::Invalid> {
    static HOOK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = HOOK.lock().unwrap_or_else(|e| e.into_inner());
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    result.map_err(|panic| panic_message(&*panic).into())
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// Whether a queue name is of format version 1: a forward queue named by its target alone.
fn is_legacy(route: &str) -> bool {
    !route.contains(' ') && route != "pipeline" && route != "alerts"
}

/// An event and its delivery records, one per route.
pub type EventWithRecords = (StoredEvent, Vec<(String, DeliveryRecord)>);

/// An event as its row holds it: a body stored apart is left empty (lists and pruning need
/// only the header).
fn read_event(
    events: &impl ReadableTable<u64, &'static [u8]>,
    id: u64,
) -> Result<Option<StoredEvent>, redb::Error> {
    Ok(events
        .get(id)?
        .and_then(|bytes| decode(id, bytes.value()))
        .map(|(event, _)| event))
}

/// The values of header `name` on the events from `channel` (see [`Spool::header_values`]).
fn header_values(
    events: &impl ReadableTable<u64, &'static [u8]>,
    channel: &str,
    name: &str,
) -> Result<std::collections::HashSet<String>, redb::Error> {
    let mut values = std::collections::HashSet::new();
    for entry in events.iter()? {
        let (id, bytes) = entry?;
        if let Some((event, _)) = decode(id.value(), bytes.value())
            && event.channel == channel
            && let Some(value) = event.event.header(name)
        {
            values.insert(value.to_string());
        }
    }
    Ok(values)
}

/// An event with its body, wherever the body is stored. `None` if it is missing or damaged.
fn read_full_event(
    events: &impl ReadableTable<u64, &'static [u8]>,
    chunks: &impl ReadableTable<(u64, u32), &'static [u8]>,
    id: u64,
) -> Result<Option<StoredEvent>, redb::Error> {
    let Some((mut event, chunked_len)) = events.get(id)?.and_then(|b| decode(id, b.value())) else {
        return Ok(None);
    };
    if let Some(len) = chunked_len {
        let mut body = Vec::with_capacity(len as usize);
        for piece in chunks.range((id, 0)..=(id, u32::MAX))? {
            body.extend_from_slice(piece?.1.value());
        }
        if body.len() as u64 != len {
            return Ok(None);
        }
        event.event.body = Bytes::from(body);
    }
    Ok(Some(event))
}

fn read_record(
    records: &impl ReadableTable<(u64, &'static str), &'static [u8]>,
    id: u64,
    route: &str,
) -> Result<Option<DeliveryRecord>, redb::Error> {
    Ok(records
        .get((id, route))?
        .and_then(|r| record::decode(r.value())))
}

/// Which events `replay` queues again.
#[derive(Clone, Debug)]
pub enum Replay {
    Ids(Vec<u64>),
    Dead,
    /// Received at or after this time (ms since the epoch).
    ReceivedSince(u64),
}

/// A snapshot of the spool's size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SpoolStats {
    pub stored_bytes: u64,
    pub pending: u64,
    pub events: u64,
}

/// The tables of one write transaction, with the operations that keep them consistent.
struct Tables<'txn> {
    /// For the tables opened when first used ([`Tables::chunks`], [`Tables::states`]): most
    /// transactions (an event or a mark) touch neither, and opening a table costs a lookup in
    /// redb's table of tables, several per transaction at a few events a second.
    txn: &'txn redb::WriteTransaction,
    meta: redb::Table<'txn, &'static str, u64>,
    events: redb::Table<'txn, u64, &'static [u8]>,
    chunks: Option<redb::Table<'txn, (u64, u32), &'static [u8]>>,
    records: redb::Table<'txn, (u64, &'static str), &'static [u8]>,
    pending: redb::Table<'txn, (&'static str, u64), u64>,
    states: Option<redb::Table<'txn, &'static str, &'static [u8]>>,
    cursors: redb::Table<'txn, &'static str, &'static str>,
    /// The `meta` counters this transaction read or changed, written back once at the end: a
    /// batch of events then costs one read and one write of each, not several per event.
    counters: Vec<(&'static str, u64, bool)>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn redb::WriteTransaction) -> Result<Self, redb::Error> {
        Ok(Self {
            txn,
            meta: txn.open_table(META)?,
            events: txn.open_table(EVENTS)?,
            chunks: None,
            records: txn.open_table(RECORDS)?,
            pending: txn.open_table(PENDING)?,
            states: None,
            cursors: txn.open_table(CURSORS)?,
            counters: Vec::new(),
        })
    }

    /// `body_chunks`, opened on first use.
    fn chunks(&mut self) -> Result<&mut redb::Table<'txn, (u64, u32), &'static [u8]>, redb::Error> {
        if self.chunks.is_none() {
            self.chunks = Some(self.txn.open_table(BODY_CHUNKS)?);
        }
        Ok(self.chunks.as_mut().expect("opened above"))
    }

    /// `alert_states`, opened on first use.
    fn states(
        &mut self,
    ) -> Result<&mut redb::Table<'txn, &'static str, &'static [u8]>, redb::Error> {
        if self.states.is_none() {
            self.states = Some(self.txn.open_table(ALERT_STATES)?);
        }
        Ok(self.states.as_mut().expect("opened above"))
    }

    /// A counter's slot in `counters`, read from `meta` the first time.
    fn slot(&mut self, name: &'static str) -> Result<&mut (&'static str, u64, bool), redb::Error> {
        let at = match self.counters.iter().position(|c| c.0 == name) {
            Some(at) => at,
            None => {
                let value = self.meta.get(name)?.map_or(0, |v| v.value());
                self.counters.push((name, value, false));
                self.counters.len() - 1
            }
        };
        Ok(&mut self.counters[at])
    }

    fn counter(&mut self, name: &'static str) -> Result<u64, redb::Error> {
        Ok(self.slot(name)?.1)
    }

    /// Add `by` to a counter; returns the value before.
    fn bump(&mut self, name: &'static str, by: u64) -> Result<u64, redb::Error> {
        let slot = self.slot(name)?;
        let before = slot.1;
        *slot = (name, before.wrapping_add(by), true);
        Ok(before)
    }

    /// Set a counter.
    fn set(&mut self, name: &'static str, value: u64) -> Result<(), redb::Error> {
        *self.slot(name)? = (name, value, true);
        Ok(())
    }

    fn shrink(&mut self, name: &'static str, by: u64) -> Result<(), redb::Error> {
        let slot = self.slot(name)?;
        *slot = (name, slot.1.saturating_sub(by), true);
        Ok(())
    }

    /// Write back the counters that changed.
    fn store_counters(&mut self) -> Result<(), redb::Error> {
        for (name, value, changed) in std::mem::take(&mut self.counters) {
            if changed {
                self.meta.insert(name, value)?;
            }
        }
        Ok(())
    }

    /// Store an event under `id`: the header row, and a large body in pieces.
    fn put_event(&mut self, id: u64, row: &EventRow<'_>) -> Result<(), redb::Error> {
        self.events.insert(id, row.row.as_slice())?;
        if let Some(body) = row.chunked_body {
            for (n, piece) in body.chunks(BODY_CHUNK).enumerate() {
                self.chunks()?.insert((id, n as u32), piece)?;
            }
        }
        Ok(())
    }

    /// Put event `id` at the tail of `route`'s queue; returns its seq.
    fn enqueue(&mut self, id: u64, route: &str, now: u64) -> Result<u64, redb::Error> {
        let seq = self.bump(NEXT_SEQ, 1)? + 1;
        self.pending.insert((route, seq), id)?;
        let record = DeliveryRecord {
            status: Status::Pending,
            attempts: 0,
            last_status: None,
            last_error: None,
            updated_ms: now,
            seq,
        };
        self.put_record(id, route, &record)?;
        Ok(seq)
    }

    fn put_record(
        &mut self,
        id: u64,
        route: &str,
        record: &DeliveryRecord,
    ) -> Result<(), redb::Error> {
        self.records
            .insert((id, route), record::encode(record).as_slice())?;
        Ok(())
    }

    fn mark(
        &mut self,
        route: &str,
        seq: u64,
        id: u64,
        outcome: &Outcome,
        now: u64,
    ) -> Result<(), redb::Error> {
        let Some(mut record) = read_record(&self.records, id, route)? else {
            return Ok(()); // purged meanwhile
        };
        if record.seq != seq || record.status != Status::Pending {
            return Ok(()); // replayed or finished meanwhile: this mark is stale
        }
        record.attempts += 1;
        record.updated_ms = now;
        match outcome {
            Outcome::Delivered { status } => {
                record.status = Status::Delivered;
                record.last_status = Some(*status);
                record.last_error = None;
            }
            Outcome::Retry { status, error } => {
                record.last_status = *status;
                record.last_error = Some(error.clone());
            }
            Outcome::Dead { status, error } => {
                record.status = Status::Dead;
                record.last_status = *status;
                record.last_error = Some(error.clone());
            }
        }
        if record.status != Status::Pending {
            self.pending.remove((route, seq))?;
        }
        self.put_record(id, route, &record)
    }

    /// Remove events received before `older_than_ms` whose every delivery is done, oldest
    /// first; with `target_bytes`, stop once the stored bytes are at most that. Returns how many.
    /// `next` is set to when the first delivered event left was received, if one is left for
    /// being too new.
    fn prune_delivered(
        &mut self,
        older_than_ms: u64,
        target_bytes: Option<u64>,
        next: &mut Option<u64>,
    ) -> Result<u64, redb::Error> {
        let mut candidates = Vec::new();
        let mut current: Option<(u64, bool)> = None;
        for entry in self.records.iter()? {
            let (key, value) = entry?;
            let id = key.value().0;
            let delivered = record::status(value.value()) == Some(Status::Delivered);
            match &mut current {
                Some((cur, all)) if *cur == id => *all &= delivered,
                _ => {
                    if let Some((done, true)) = current.replace((id, delivered)) {
                        candidates.push(done);
                    }
                }
            }
        }
        if let Some((done, true)) = current {
            candidates.push(done);
        }
        let (mut pruned, mut newest_pruned) = (0, 0);
        for id in candidates {
            if let Some(target) = target_bytes
                && self.counter(STORED_BYTES)? <= target
            {
                break;
            }
            let received = read_event(&self.events, id)?.map_or(0, |e| e.received_ms);
            if received >= older_than_ms {
                *next = Some(received);
                break;
            }
            let routes: Vec<String> = self
                .records
                .range((id, "")..(id + 1, ""))?
                .filter_map(|e| e.ok().map(|(k, _)| k.value().1.to_string()))
                .collect();
            for route in routes {
                self.records.remove((id, route.as_str()))?;
            }
            self.drop_event_if_unreferenced(id)?;
            pruned += 1;
            newest_pruned = newest_pruned.max(received);
        }
        if pruned > 0 && newest_pruned > self.counter(PRUNED_THROUGH)? {
            self.set(PRUNED_THROUGH, newest_pruned)?;
        }
        Ok(pruned)
    }

    fn drop_event_if_unreferenced(&mut self, id: u64) -> Result<(), redb::Error> {
        if self.records.range((id, "")..(id + 1, ""))?.next().is_none() {
            let (row_len, chunked_len) = match self.events.remove(id)? {
                Some(row) => {
                    let chunked_len = decode(id, row.value()).and_then(|(_, len)| len);
                    (row.value().len() as u64, chunked_len)
                }
                None => (0, None),
            };
            if chunked_len.is_some() {
                self.chunks()?
                    .retain_in((id, 0)..=(id, u32::MAX), |_, _| false)?;
            }
            self.shrink(STORED_BYTES, row_len + chunked_len.unwrap_or(0))?;
        }
        Ok(())
    }
}

/// An event encoded for the `events` table: the row (header, then the body if small), and
/// the body to store in pieces if large.
struct EventRow<'a> {
    row: Vec<u8>,
    chunked_body: Option<&'a [u8]>,
}

impl<'a> EventRow<'a> {
    fn new(received_ms: u64, channel: &str, event: &'a Event) -> Self {
        let chunked = event.body.len() > BODY_CHUNK;
        let header = EventHeaderRef {
            received_ms,
            channel,
            sse_id: event.sse_id.as_deref(),
            timestamp_ms: event.timestamp_ms,
            headers: &event.headers,
            query: &event.query,
            chunked_len: chunked.then_some(event.body.len() as u64),
        };
        let inline: &[u8] = if chunked { &[] } else { &event.body };
        // The header is encoded in place, after room for its length: one buffer per event.
        let mut row = Vec::with_capacity(256 + inline.len());
        row.extend_from_slice(&[0; 4]);
        header::encode(&header, &mut row);
        let len = (row.len() - 4) as u32;
        row[..4].copy_from_slice(&len.to_le_bytes());
        row.extend_from_slice(inline);
        EventRow {
            row,
            chunked_body: chunked.then_some(&event.body[..]),
        }
    }

    /// What the event counts for against `--max-spool-size`.
    fn stored_size(&self) -> u64 {
        (self.row.len() + self.chunked_body.map_or(0, <[u8]>::len)) as u64
    }
}

/// An event from its row; for a body stored in pieces, its length (the body is left empty).
fn decode(id: u64, bytes: &[u8]) -> Option<(StoredEvent, Option<u64>)> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let header = header::decode(bytes.get(4..4 + len)?)?;
    let event = StoredEvent {
        id,
        received_ms: header.received_ms,
        channel: header.channel,
        event: Event {
            sse_id: header.sse_id,
            timestamp_ms: header.timestamp_ms,
            headers: header.headers,
            query: header.query,
            body: Bytes::copy_from_slice(&bytes[4 + len..]),
        },
    };
    Some((event, header.chunked_len))
}

/// What an event is, for a list: a GitHub event name, or a Port action on a resource type.
pub fn event_kind(event: &Event) -> Option<String> {
    /// Port events are small; a large body is not parsed just to label it.
    const SNIFF_LIMIT: usize = 256 << 10;
    if let Some(kind) = event.kind() {
        return Some(kind);
    }
    if event.body.len() > SNIFF_LIMIT {
        return None;
    }
    // Without an `action` key there is no label: most bodies (a plain webhook) are not parsed
    // at all, which was most of the cost of a delivery's log line.
    memchr::memmem::find(&event.body, b"\"action\"")?;
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct PortShape {
        action: Option<String>,
        resource_type: Option<String>,
        event: Option<Box<PortShape>>,
    }
    let shape: PortShape = serde_json::from_slice(&event.body).ok()?;
    let shape = match shape.event {
        Some(inner) => *inner,
        None => shape,
    };
    // A label, not text: a word such as `UPDATE` or `opened`, kept short (helper-121: a body's
    // 3,000-character `action` went whole into every log line of its delivery).
    let word = |w: &str| {
        !w.is_empty()
            && w.len() <= 64
            && w.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    };
    match (shape.action, shape.resource_type) {
        (Some(a), Some(r)) if word(&a) && word(&r) => Some(format!("{a} {r}")),
        (Some(a), _) if word(&a) => Some(a),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const ROUTE: &str = "http://127.0.0.1:9/";
    const ROOM: Limits = Limits { max_bytes: 1 << 20 };

    /// Regression (helper-155): an immutable state directory (`chattr +i`: EPERM, whoever
    /// asks) was said as permission denied, "run this as the user the relay runs as (`sudo -u
    /// root`)", to root.
    #[test]
    fn regression_root_was_told_to_run_as_root_on_an_immutable_state_dir() {
        let eperm = || std::io::Error::from_raw_os_error(libc::EPERM);
        for refused in [
            SpoolError::Io {
                path: "d/spool.redb".into(),
                source: redb::Error::Io(eperm()),
            },
            SpoolError::LockFile {
                path: "d/channel-x.lock".into(),
                source: eperm(),
            },
        ] {
            let said = refused.or_denied(Path::new("d/spool.redb"));
            assert!(matches!(said, SpoolError::NotPermitted { .. }), "{said}");
            assert!(said.needs_the_user());
            let text = said.to_string();
            assert!(
                text.contains("whoever asks (EPERM)")
                    && text.contains("chattr -i")
                    && !text.contains("sudo"),
                "{text}"
            );
        }
        // EACCES stays a matter of the user.
        let said = denied(
            Path::new("d/spool.redb"),
            std::io::Error::from_raw_os_error(libc::EACCES),
        );
        assert!(
            matches!(said, SpoolError::PermissionDenied { .. }),
            "{said}"
        );
    }

    /// Regression (helper-149): a state directory on a read-only file system said only "I/O
    /// error: Read-only file system (os error 30)" and exited 1, as a failure to try again; it
    /// is a setting to fix (exit 2), said with what to do.
    #[test]
    fn regression_a_read_only_state_dir_said_only_the_systems_error() {
        let erofs = || std::io::Error::from_raw_os_error(libc::EROFS);
        for refused in [
            SpoolError::Io {
                path: "d/spool.redb.new".into(),
                source: redb::Error::Io(erofs()),
            },
            SpoolError::LockFile {
                path: "d/channel-x.lock".into(),
                source: erofs(),
            },
        ] {
            let said = refused.or_denied(Path::new("d/spool.redb"));
            assert!(matches!(said, SpoolError::ReadOnly { .. }), "{said}");
            assert!(said.needs_the_user());
            let text = said.to_string();
            assert!(
                text.contains("d/spool.redb is on a read-only file system")
                    && text.contains("give --state-dir (or state_dir) a writable directory"),
                "{text}"
            );
        }
    }

    /// Regression (helper-121): a sender's 60 KB `x-github-event`, or a body's 3,000-character
    /// `action`, went whole into every log line and `events list` row of its delivery.
    #[test]
    fn regression_a_senders_long_kind_filled_every_line() {
        let with = |headers: Vec<(String, String)>, body: &str| Event {
            sse_id: None,
            timestamp_ms: None,
            headers,
            query: vec![],
            body: Bytes::from(body.to_string()),
        };
        let long = "C".repeat(60_000);
        let kind = event_kind(&with(vec![("x-github-event".into(), long.clone())], "{}")).unwrap();
        assert_eq!(kind, format!("x-github-event={}…", "C".repeat(63)));
        let push = with(vec![("x-github-event".into(), "push".into())], "{}");
        assert_eq!(event_kind(&push).as_deref(), Some("x-github-event=push"));
        let body = |json: &str| event_kind(&with(vec![], json));
        assert_eq!(
            body(r#"{"action":"UPDATE","resourceType":"entity"}"#).as_deref(),
            Some("UPDATE entity")
        );
        assert_eq!(body(r#"{"action":"opened"}"#).as_deref(), Some("opened"));
        // Not a word: no label, rather than the sender's text.
        assert_eq!(
            body(&format!(r#"{{"action":"{}"}}"#, "A".repeat(3_000))),
            None
        );
        assert_eq!(body(r#"{"action":"rm -rf"}"#), None);
        assert_eq!(
            body(r#"{"action":"UPDATE","resourceType":"x y"}"#).as_deref(),
            Some("UPDATE")
        );
    }

    /// Regression (helper-138, helper-144): an alert's row in `events list`, and its delivery
    /// lines ("slack failed: ... (event 6, UPDATE)"), were labelled by the entity change's
    /// `action` inside it, not as the alert it is.
    #[test]
    fn regression_an_alert_was_labelled_by_the_change_it_came_from() {
        let alert = Event {
            headers: vec![(crate::event::ALERT_HEADER.into(), "cpu-high FIRING".into())],
            body: Bytes::from_static(br#"{"action":"UPDATE","rule":"cpu-high"}"#),
            ..Event::default()
        };
        assert_eq!(event_kind(&alert).as_deref(), Some("cpu-high FIRING"));
        assert_eq!(alert.kind().as_deref(), Some("cpu-high FIRING"));
    }

    fn event(n: u8) -> Event {
        Event {
            sse_id: Some(n.to_string()),
            timestamp_ms: None,
            headers: vec![("x-github-event".into(), "push".into())],
            query: vec![],
            body: Bytes::from(vec![b'a' + n; 100]),
        }
    }

    #[test]
    fn a_queue_is_named_without_its_targets_query() {
        let key = route_key("0123456789abcdef", "http://h:1/hook?token=T&x=1");
        assert_eq!(route_target(&key), "http://h:1/hook?token=T&x=1");
        assert_eq!(route_name(&key), "http://h:1/hook?…");
        assert_eq!(route_name(&route_key("k", ROUTE)), ROUTE);
        assert_eq!(route_name("pipeline"), "pipeline");
    }

    fn append(spool: &Spool, events: Vec<Event>) -> Vec<u64> {
        append_on(spool, &[ROUTE], events)
    }

    /// Append `events` to each of `routes`; their ids.
    fn append_on(spool: &Spool, routes: &[&str], events: Vec<Event>) -> Vec<u64> {
        let write = Write::Append {
            channel: "http://x/abcd…".into(),
            routes: routes.iter().map(|r| r.to_string()).collect(),
            events: events.into(),
            cursor: None,
        };
        let report = spool.write(&[write], ROOM).unwrap();
        report.appended[0].iter().map(|id| id.unwrap()).collect()
    }

    fn mark(spool: &Spool, queued: &Queued, outcome: Outcome) {
        mark_on(spool, ROUTE, queued, outcome);
    }

    /// Record an attempt at `queued`, on `route`.
    fn mark_on(spool: &Spool, route: &str, queued: &Queued, outcome: Outcome) {
        let write = Write::Mark {
            route: route.into(),
            seq: queued.seq,
            event: queued.event.id,
            outcome,
        };
        spool.write(&[write], ROOM).unwrap();
    }

    /// The ids of the first events queued for `route` (up to 10), in order.
    fn pending_ids(spool: &Spool, route: &str) -> Vec<u64> {
        let queued = spool.pending(route, 0, 10).unwrap();
        queued.iter().map(|q| q.event.id).collect()
    }

    fn mode(spool: &Spool) -> Mode {
        spool.sharing.lock().unwrap().mode
    }

    /// The names of the files in a state directory, sorted.
    fn state_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// A relay's writer thread, for what sharing needs of it: it calls `share_poll` often.
    struct Poller {
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
        thread: std::thread::JoinHandle<()>,
    }

    impl Poller {
        fn start(spool: std::sync::Arc<Spool>) -> Poller {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let stopped = stop.clone();
            let thread = std::thread::spawn(move || {
                while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                    spool.share_poll(false, || ());
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
            Poller { stop, thread }
        }

        fn stop(self) {
            self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
            self.thread.join().unwrap();
        }
    }

    /// What the relay's writer thread does every SHARE_POLL, now.
    fn look(spool: &Spool) {
        spool.share_look(spool.sharing.lock().unwrap());
    }

    /// A relay has its spool alone; a command opening it meanwhile gets it shared once the
    /// relay looks ([`Spool::share_poll`]), both write, and the relay has it alone again once
    /// the command is done. Nothing written by either is lost.
    #[test]
    fn a_relay_shares_its_spool_while_a_command_uses_it_then_has_it_alone_again() {
        let dir = tempfile::tempdir().unwrap();
        let relay = std::sync::Arc::new(Spool::open(dir.path()).unwrap());
        assert_eq!(mode(&relay), Mode::Alone);
        let before = append(&relay, vec![event(1)]);
        // The relay's writer thread, in short: it looks while idle.
        let poller = Poller::start(relay.clone());
        let command = Spool::open_shared(dir.path()).unwrap();
        assert_eq!(mode(&command), Mode::Shared);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while mode(&relay) != Mode::Shared {
            assert!(
                std::time::Instant::now() < deadline,
                "the relay never shared"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let by_command = append(&command, vec![event(2)]);
        let by_relay = append(&relay, vec![event(3)]);
        assert_eq!(command.pending(ROUTE, 0, 10).unwrap().len(), 3);
        drop(command);
        while mode(&relay) != Mode::Alone {
            assert!(
                std::time::Instant::now() < deadline,
                "the relay never had it alone again"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        poller.stop();
        let ids = pending_ids(&relay, ROUTE);
        assert_eq!(ids, [before, by_command, by_relay].concat());
        assert_eq!(
            state_files(dir.path()),
            [FILE_NAME, wal::FILE_NAME],
            "only the spool and its log, no request left"
        );
    }

    /// A relay beside an older smee-relay (which opens the file shared and makes no request)
    /// found nobody asking, so it closed the file and tried to have it alone at every look,
    /// once a second, blocking reads and writes each time. A refusal is now remembered.
    #[test]
    fn regression_a_relay_beside_one_that_makes_no_request_tried_to_be_alone_every_second() {
        let dir = tempfile::tempdir().unwrap();
        drop(Spool::open(dir.path()).unwrap());
        // An older smee-relay: the file open shared, no request.
        let older = redb::Database::builder()
            .set_concurrency_mode(redb::ConcurrencyMode::MultiWriter)
            .create(dir.path().join(FILE_NAME))
            .unwrap();
        let relay = Spool::open(dir.path()).unwrap();
        assert_eq!(mode(&relay), Mode::Shared);
        let refused = relay.sharing.lock().unwrap().refused;
        assert!(refused.is_some());
        look(&relay);
        assert_eq!(
            relay.sharing.lock().unwrap().refused,
            refused,
            "not tried again at once"
        );
        append(&relay, vec![event(1)]);
        drop(older);
    }

    /// A command that may not create files in the state directory (a user with read access
    /// to the spool only) could not open the spool at all: it now opens it shared without a
    /// request, and says at once what to do if a relay has it alone (it would never be asked).
    #[test]
    fn regression_a_command_that_cannot_make_a_request_could_not_open_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        drop(Spool::open(dir.path()).unwrap());
        let path = dir.path().join(FILE_NAME);
        let nowhere = dir.path().join("no-such-directory");
        let (db, sharing) = open_sharing_in(
            &path,
            &backend::Factory::file(),
            false,
            None,
            None,
            &nowhere,
        )
        .unwrap();
        assert_eq!(sharing.mode, Mode::Shared);
        assert!(sharing.request.is_none());
        drop(db);
        let _relay = Spool::open(dir.path()).unwrap();
        let started = std::time::Instant::now();
        let Err(e) = open_sharing_in(
            &path,
            &backend::Factory::file(),
            false,
            None,
            None,
            &nowhere,
        ) else {
            panic!("opened a spool held alone without asking");
        };
        assert!(matches!(e, SpoolError::CannotAsk { .. }), "{e}");
        assert!(started.elapsed() < SHARE_POLL, "said at once");
        assert!(
            e.to_string().contains("run this as the relay's user"),
            "{e}"
        );
    }

    /// Two relays starting at once on a new state directory: each built the new spool under
    /// the same temporary name and removed the other's file under it, so one of them exited
    /// ("No such file or directory" or "File exists"). Creators now take turns.
    #[test]
    fn regression_two_processes_creating_a_new_spool_at_once_made_one_of_them_fail() {
        for _ in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(FILE_NAME);
            let barrier = std::sync::Barrier::new(4);
            std::thread::scope(|scope| {
                let creators: Vec<_> = (0..4)
                    .map(|_| {
                        scope.spawn(|| {
                            barrier.wait();
                            create_new(&path, &backend::Factory::file())
                        })
                    })
                    .collect();
                for creator in creators {
                    creator.join().unwrap().unwrap();
                }
            });
            let spool = Spool::open(dir.path()).unwrap();
            assert_eq!(append(&spool, vec![event(1)]).len(), 1);
            assert_eq!(
                state_files(dir.path()),
                [FILE_NAME, wal::FILE_NAME],
                "only the spool and its log"
            );
        }
    }

    /// A command finding the spool held alone by a process that never looks (an older
    /// smee-relay, or one stuck) gives up after SHARE_WAIT with what to do, instead of hanging.
    #[test]
    fn a_command_gives_up_on_a_spool_held_alone_by_a_process_that_never_shares() {
        let dir = tempfile::tempdir().unwrap();
        let _holder = Spool::open(dir.path()).unwrap();
        let started = std::time::Instant::now();
        let Err(e) = Spool::open_shared(dir.path()) else {
            panic!("opened a spool held alone");
        };
        assert!(started.elapsed() >= SHARE_WAIT);
        assert!(matches!(e, SpoolError::InUse { .. }), "{e}");
        assert!(e.needs_the_user());
        assert!(e.to_string().contains("stop it and try again"), "{e}");
    }

    /// A command that gave up on a spool held alone by a relay that never shared (stopped with
    /// SIGSTOP, hung) said "an older smee-relay, or one that is stuck", and the user had to
    /// find which process. It names the pid from the state directory's lock files now (not a
    /// stale file's, not the channel), and says when that process is stopped.
    #[test]
    fn regression_a_command_giving_up_on_a_stuck_relay_did_not_name_its_pid() {
        let dir = tempfile::tempdir().unwrap();
        // A stale lock file: its relay stopped (the lock is free), its pid no longer means it.
        std::fs::write(dir.path().join("channel-00000000000000aa.lock"), "999999\n").unwrap();
        let channel = "https://smee.io/SecretChannelId";
        let _lock = lock::StateLock::acquire(dir.path(), channel, "https://smee.io/Sec…").unwrap();
        let _holder = Spool::open(dir.path()).unwrap();
        let Err(e) = Spool::open_shared(dir.path()) else {
            panic!("opened a spool held alone");
        };
        let message = e.to_string();
        let pid = std::process::id();
        assert!(
            message.contains(&format!("held by smee-relay pid {pid} ")),
            "{message}"
        );
        assert!(message.contains("SIGSTOP"), "{message}");
        assert!(message.contains(&format!("kill -CONT {pid}")), "{message}");
        assert!(!message.contains("999999"), "a stale lock's pid: {message}");
        assert!(!message.contains("SecretChannelId"), "{message}");
        assert!(!message.contains(&lock::channel_key(channel)), "{message}");
        assert!(e.needs_the_user());

        // A stopped relay is said to be stopped: a child stands in for it (the lock held here,
        // its pid in the file, as a relay writes it).
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        let child_pid = child.id();
        let stand_in = dir.path().join("pipeline.lock");
        let held = std::fs::File::create(&stand_in).unwrap();
        held.lock().unwrap();
        std::fs::write(&stand_in, format!("{child_pid}\n")).unwrap();
        // SAFETY: a signal to our own child.
        assert_eq!(unsafe { libc::kill(child_pid as i32, libc::SIGSTOP) }, 0);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let stopped = lock::Holder {
            pid: child_pid,
            stopped: true,
        };
        while !lock::holders(dir.path()).contains(&stopped) {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                lock::holders(dir.path())
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let hint = in_use_hint(&lock::holders(dir.path()));
        assert!(hint.contains(&format!("{child_pid} (stopped)")), "{hint}");
        assert!(
            hint.contains(&format!("kill -CONT {pid} {child_pid}"))
                || hint.contains(&format!("kill -CONT {child_pid} {pid}")),
            "{hint}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Regression (helper-114): outside systemd (whose unit makes it 0700), the state
    /// directory was made 0755 under the usual umask, and the spool in it (events, and the
    /// targets' queries) readable by every user of the machine.
    #[test]
    fn regression_the_state_directory_was_readable_by_others() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("made").join("state");
        create_state_dir(&state).unwrap();
        for made in [&state, &dir.path().join("made")] {
            let mode = std::fs::metadata(made).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "{}", made.display());
        }
        // One already there is left as its owner made it.
        let there = dir.path().join("there");
        std::fs::create_dir(&there).unwrap();
        std::fs::set_permissions(&there, std::fs::Permissions::from_mode(0o750)).unwrap();
        create_state_dir(&there).unwrap();
        let mode = std::fs::metadata(&there).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o750);
    }

    /// Two relays (of different channels) on one state directory: the second finds the first
    /// alone, asks, and both run shared; when one stops, the other has it alone again.
    #[test]
    fn two_relays_on_one_state_directory_share_it_and_the_last_has_it_alone() {
        let dir = tempfile::tempdir().unwrap();
        let first = std::sync::Arc::new(Spool::open(dir.path()).unwrap());
        let poller = Poller::start(first.clone());
        let second = Spool::open(dir.path()).unwrap();
        assert_eq!(mode(&second), Mode::Shared);
        poller.stop();
        assert_eq!(mode(&first), Mode::Shared);
        // Neither goes alone while the other is there.
        look(&first);
        look(&second);
        assert_eq!((mode(&first), mode(&second)), (Mode::Shared, Mode::Shared));
        append(&second, vec![event(1)]);
        drop(first);
        look(&second);
        assert_eq!(mode(&second), Mode::Alone);
        assert_eq!(second.pending(ROUTE, 0, 10).unwrap().len(), 1);
    }

    /// Two relays sharing a state directory, their requests removed (by hand, or never made:
    /// a full disk): neither made one again, so commands no longer waited for their marks
    /// (`events show ID` right after ID's delivery said pending) and each kept trying to have
    /// the file alone.
    #[test]
    fn regression_a_sharing_relay_without_its_request_never_made_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let requests = || {
            std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("spool-share."))
                .map(|e| e.path())
                .collect::<Vec<_>>()
        };
        let first = std::sync::Arc::new(Spool::open(dir.path()).unwrap());
        let poller = Poller::start(first.clone());
        let second = Spool::open(dir.path()).unwrap();
        poller.stop();
        assert_eq!((mode(&first), mode(&second)), (Mode::Shared, Mode::Shared));
        assert_eq!(requests().len(), 2);
        for request in requests() {
            std::fs::remove_file(request).unwrap();
        }
        look(&first);
        look(&second);
        assert_eq!((mode(&first), mode(&second)), (Mode::Shared, Mode::Shared));
        assert_eq!(requests().len(), 2, "each made its request again");
        drop(first);
        look(&second);
        assert_eq!(mode(&second), Mode::Alone);
        assert!(requests().is_empty());
    }

    /// The cluster a relay ran in is kept across opens, and forgotten when it runs alone.
    #[test]
    fn the_cluster_a_relay_runs_in_is_recorded_and_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.cluster().unwrap(), None);
        spool.set_cluster(Some("prod")).unwrap();
        drop(spool);
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.cluster().unwrap().as_deref(), Some("prod"));
        spool.set_cluster(None).unwrap();
        assert_eq!(spool.cluster().unwrap(), None);
    }

    #[test]
    fn events_round_trip_and_queue_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let ids = append(&spool, vec![event(0), event(1), event(2)]);
        assert_eq!(ids, [1, 2, 3]);
        let queued = spool.pending(ROUTE, 0, 10).unwrap();
        assert_eq!(queued.iter().map(|q| q.event.id).collect::<Vec<_>>(), ids);
        assert_eq!(queued[1].event.event, event(1));
        assert_eq!(spool.pending(ROUTE, queued[0].seq, 10).unwrap().len(), 2);
    }

    /// Catch-up's append: a GUID the channel has (live, or recovered by an earlier run, or
    /// twice in one batch) is not added again; other channels' GUIDs do not count; the rest
    /// queue in the order given.
    #[test]
    fn append_missing_adds_each_guid_of_a_channel_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let with_guid = |n: u8, guid: &str| {
            let mut e = event(n);
            e.headers.push(("x-github-delivery".into(), guid.into()));
            e
        };
        append(&spool, vec![with_guid(0, "g0")]);
        let channel = "http://x/abcd…";
        let route = route_key("k", ROUTE);
        let ids = spool
            .append_missing(
                channel,
                std::slice::from_ref(&route),
                &[
                    with_guid(1, "g0"),
                    with_guid(2, "g2"),
                    with_guid(3, "g2"),
                    with_guid(4, "g4"),
                ],
                "x-github-delivery",
            )
            .unwrap();
        assert_eq!(ids, [None, Some(2), None, Some(3)]);
        let queued = pending_ids(&spool, &route);
        assert_eq!(queued, [2, 3]);
        assert_eq!(
            spool.header_values(channel, "x-github-delivery").unwrap(),
            ["g0", "g2", "g4"].map(String::from).into()
        );
        // Another channel has none of them.
        let other = spool
            .append_missing(
                "http://y/efgh…",
                &[],
                &[with_guid(5, "g2")],
                "x-github-delivery",
            )
            .unwrap();
        assert_eq!(other, [Some(4)]);
        assert_eq!(spool.channel_routes("k").unwrap(), [route]);
        assert!(spool.channel_routes("other").unwrap().is_empty());
    }

    #[test]
    fn the_queues_a_relay_does_not_serve_are_found_with_what_they_hold() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let queue = |key: &str, target: &str| route_key(key, target);
        let (old, old_sub, new) = (
            queue("k", "http://127.0.0.1:1/a"),
            // A name that starts with another's: a queue of its own.
            queue("k", "http://127.0.0.1:1/a/b"),
            queue("k", "http://127.0.0.1:2/"),
        );
        let other = queue("kk", "http://127.0.0.1:3/");
        let three = |n: u8| vec![event(n), event(n + 1), event(n + 2)];
        append_on(&spool, &[&old, &other], three(0));
        append_on(&spool, &[&old_sub, &new], three(3));
        // Delivered on `old_sub`: nothing is left there.
        for queued in spool.pending(&old_sub, 0, 10).unwrap() {
            mark_on(
                &spool,
                &old_sub,
                &queued,
                Outcome::Delivered { status: 200 },
            );
        }
        let served = [new.clone()];
        assert_eq!(
            spool.unserved_queues("k", &served).unwrap(),
            [(old.clone(), 3)]
        );
        append_on(&spool, &[&old_sub], three(6));
        assert_eq!(
            spool.unserved_queues("k", &served).unwrap(),
            [(old.clone(), 3), (old_sub.clone(), 3)]
        );
        assert_eq!(
            spool
                .unserved_queues("k", &[old.clone(), old_sub, new])
                .unwrap(),
            []
        );
        assert_eq!(spool.unserved_queues("kk", &[]).unwrap(), [(other, 3)]);
        assert_eq!(spool.unserved_queues("none", &[]).unwrap(), []);
    }

    #[test]
    fn a_purged_queue_loses_its_deliveries_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let old = "http://127.0.0.1:1/old";
        let (a_old, b_old, a_new) = (
            route_key("a", old),
            route_key("b", old),
            route_key("a", "http://127.0.0.1:2/new"),
        );
        let one_on = |routes: &[&str], n: u8| append_on(&spool, routes, vec![event(n)])[0];
        let only_old = one_on(&[&a_old], 0);
        let shared = one_on(&[&a_old, &a_new], 1);
        // The same target from another channel: another queue.
        let other_channel = one_on(&[&b_old], 2);
        let elsewhere = one_on(&[&a_new], 3);
        let bytes = spool.stats().unwrap().stored_bytes;
        assert_eq!(spool.purge_queue(&a_old).unwrap(), 2);
        assert!(spool.pending(&a_old, 0, 10).unwrap().is_empty());
        assert_eq!(pending_ids(&spool, &b_old), [other_channel]);
        // The new target's queue is as it was; an event it still needs stays.
        assert_eq!(pending_ids(&spool, &a_new), [shared, elsewhere]);
        assert!(matches!(
            spool.get(only_old),
            Err(SpoolError::NoSuchEvent(_))
        ));
        assert_eq!(spool.get(shared).unwrap().1.len(), 1);
        assert!(spool.stats().unwrap().stored_bytes < bytes);
        assert!(spool.unserved_queues("a", &[a_new]).unwrap().is_empty());
        assert_eq!(spool.purge_queue(&a_old).unwrap(), 0);
    }

    #[test]
    fn a_large_body_is_stored_in_pieces_and_counted_and_removed_whole() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let mut large = event(0);
        large.body = (0..3 * BODY_CHUNK + 5)
            .map(|i| i as u8)
            .collect::<Vec<_>>()
            .into();
        let room = Limits { max_bytes: 1 << 30 };
        let write = Write::Append {
            channel: "c".into(),
            routes: vec![ROUTE.into()],
            events: vec![large.clone(), event(1)].into(),
            cursor: None,
        };
        spool.write(&[write], room).unwrap();
        assert_eq!(
            spool
                .read(|txn| Ok(txn.open_table(BODY_CHUNKS)?.len()?))
                .unwrap(),
            4
        );
        let stored = spool.stats().unwrap().stored_bytes;
        assert!(stored > large.body.len() as u64, "{stored}");

        let queued = spool.pending(ROUTE, 0, 10).unwrap();
        assert_eq!(queued[0].event.event, large);
        assert_eq!(queued[1].event.event, event(1));
        assert_eq!(spool.get(1).unwrap().0.event, large);
        // A list shows it without loading the body.
        assert_eq!(
            spool.list(None, 10).unwrap()[0].kind.as_deref(),
            Some("x-github-event=push")
        );

        for item in &queued {
            mark(&spool, item, Outcome::Delivered { status: 200 });
        }
        assert_eq!(spool.prune(u64::MAX).unwrap(), 2);
        assert_eq!(
            spool
                .read(|txn| Ok(txn.open_table(BODY_CHUNKS)?.len()?))
                .unwrap(),
            0
        );
        assert_eq!(spool.stats().unwrap().stored_bytes, 0);
    }

    #[test]
    fn reads_ahead_at_most_about_a_mebibyte_of_bodies() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let mut big = event(0);
        big.body = vec![b'x'; READ_BYTES / 2 + 1].into();
        let room = Limits { max_bytes: 1 << 30 };
        let write = Write::Append {
            channel: "c".into(),
            routes: vec![ROUTE.into()],
            events: vec![big.clone(), big.clone(), big].into(),
            cursor: None,
        };
        spool.write(&[write], room).unwrap();
        assert_eq!(spool.pending(ROUTE, 0, 64).unwrap().len(), 2);
    }

    #[test]
    fn marks_move_deliveries_out_of_the_queue_and_replay_puts_them_back_at_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        append(&spool, vec![event(0), event(1), event(2)]);
        let queued = spool.pending(ROUTE, 0, 10).unwrap();
        let retry = Outcome::Retry {
            status: Some(503),
            error: "busy".into(),
        };
        mark(&spool, &queued[0], retry);
        mark(
            &spool,
            &queued[0],
            Outcome::Dead {
                status: Some(400),
                error: "bad".into(),
            },
        );
        mark(&spool, &queued[1], Outcome::Delivered { status: 200 });

        let pending = pending_ids(&spool, ROUTE);
        assert_eq!(pending, [3]);
        let (_, records) = spool.get(1).unwrap();
        assert_eq!(records[0].1.status, Status::Dead);
        assert_eq!(records[0].1.attempts, 2);
        assert_eq!(records[0].1.last_status, Some(400));

        assert_eq!(spool.replay(Replay::Dead).unwrap(), 1);
        let pending = pending_ids(&spool, ROUTE);
        assert_eq!(pending, [3, 1], "a replay goes to the tail");
        assert!(matches!(
            spool.replay(Replay::Ids(vec![99])),
            Err(SpoolError::NotYet { id: 99, .. })
        ));

        // A mark for the old queue position is stale and changes nothing.
        mark(&spool, &queued[0], Outcome::Delivered { status: 200 });
        assert_eq!(spool.get(1).unwrap().1[0].1.status, Status::Pending);
    }

    /// Make the spool file look long untouched (as an idle relay's is after a while).
    fn age_the_file(spool: &Spool) {
        let file = std::fs::File::options()
            .write(true)
            .open(spool.path())
            .unwrap();
        file.set_modified(SystemTime::now() - std::time::Duration::from_secs(3600))
            .unwrap();
    }

    /// An idle relay's prune and status reads must find out from the file's stamp that nothing
    /// changed; a prune that finds nothing must not write (which would change the stamp).
    #[test]
    fn a_prune_that_finds_nothing_leaves_the_file_alone_and_says_when_to_look_again() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        append(&spool, vec![event(0), event(1)]);
        let queued = spool.pending(ROUTE, 0, 10).unwrap();
        mark(&spool, &queued[0], Outcome::Delivered { status: 200 });
        let received = spool.get(1).unwrap().0.received_ms;

        age_the_file(&spool);
        let seen = spool.look();
        assert!(!spool.changed_since(&seen), "nobody wrote");
        assert_eq!(
            spool.prune_due(received).unwrap(),
            (0, Some(received)),
            "the delivered event is not old enough; it will be at its receive time"
        );
        assert!(!spool.changed_since(&seen), "a prune of nothing wrote");

        // Any write shows, here the second event's delivery.
        mark(&spool, &queued[1], Outcome::Delivered { status: 200 });
        assert!(spool.changed_since(&seen));
        assert_eq!(spool.prune_due(u64::MAX).unwrap(), (2, None));
    }

    /// A stamp taken while the file's modification time is recent is not trusted: a write in
    /// the same clock tick would leave the same time and size.
    #[test]
    fn a_recently_written_file_always_counts_as_changed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        append(&spool, vec![event(0)]);
        let seen = spool.look();
        assert!(spool.changed_since(&seen));
        assert!(spool.changed_since(&Seen::default()));
    }

    /// Regression: a full disk's reopen said "applied 1 records (0 events, 1 delivery marks)".
    #[test]
    fn regression_the_log_s_records_were_counted_as_1_records() {
        assert_eq!(
            records_holding(1, 2, 0),
            "1 record (2 events, 0 delivery marks)"
        );
        assert_eq!(
            records_holding(3, 1, 1),
            "3 records (1 event, 1 delivery mark)"
        );
    }

    /// A spool file that grew while a target was down keeps its size once everything is
    /// delivered and pruned; on a disk short of room it is compacted ([`room`]), which gives
    /// its free pages back, and what it still holds stays as it was.
    #[test]
    fn compaction_gives_a_spools_free_pages_back_to_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let big = |n: u8| Event {
            body: Bytes::from(vec![b'a' + n % 26; 64 << 10]),
            ..event(n)
        };
        for n in 0..8u8 {
            let write = Write::Append {
                channel: "http://x/abcd…".into(),
                routes: vec![ROUTE.to_string()],
                events: (0..16).map(|i| big(n * 16 + i)).collect::<Vec<_>>().into(),
                cursor: None,
            };
            spool
                .write(&[write], Limits { max_bytes: 1 << 30 })
                .unwrap();
        }
        let mut queued = Vec::new();
        loop {
            let after = queued.last().map_or(0, |q: &Queued| q.seq);
            let page = spool.pending(ROUTE, after, usize::MAX).unwrap();
            if page.is_empty() {
                break;
            }
            queued.extend(page);
        }
        assert_eq!(queued.len(), 128);
        let (last, delivered) = queued.split_last().unwrap();
        for q in delivered {
            mark(&spool, q, Outcome::Delivered { status: 200 });
        }
        assert_eq!(spool.prune(u64::MAX).unwrap(), 127);
        let (before, after) = spool.compact().unwrap().expect("compacted");
        assert!(after * 2 < before, "{before} -> {after}");
        let kept = spool.pending(ROUTE, 0, 10).unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].event.id, last.event.id);
        assert_eq!(
            spool.get(last.event.id).unwrap().0.event.body,
            big(127).body
        );
        // Writes go on after it.
        append(&spool, vec![event(1)]);
    }

    #[test]
    fn prune_and_purge_free_the_bytes_they_account_for() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        append(&spool, vec![event(0), event(1), event(2)]);
        let full = spool.stats().unwrap().stored_bytes;
        let queued = spool.pending(ROUTE, 0, 10).unwrap();
        mark(&spool, &queued[0], Outcome::Delivered { status: 200 });
        mark(
            &spool,
            &queued[1],
            Outcome::Dead {
                status: Some(404),
                error: "gone".into(),
            },
        );

        assert_eq!(
            spool.prune(0).unwrap(),
            0,
            "nothing is older than the epoch"
        );
        assert_eq!(
            spool.prune(u64::MAX).unwrap(),
            1,
            "only the delivered event goes"
        );
        assert!(matches!(spool.get(1), Err(SpoolError::NoSuchEvent(1))));
        // helper-155: a purged event read "it may have been pruned" only.
        assert!(
            spool
                .get(1)
                .unwrap_err()
                .to_string()
                .contains("`events purge` removed it"),
            "{}",
            spool.get(1).unwrap_err()
        );
        // Regression (an adversary's finding): an id not received yet "may have been pruned".
        assert_eq!(
            spool.get(99).unwrap_err().to_string(),
            "no event 99 in the spool yet: the newest is 3"
        );
        assert_eq!(spool.purge_dead().unwrap(), 1);
        let stats = spool.stats().unwrap();
        assert_eq!(stats.events, 1);
        assert_eq!(stats.pending, 1);
        assert_eq!(stats.stored_bytes, full / 3);
    }

    #[test]
    fn a_full_spool_prunes_delivered_events_then_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        append(&spool, vec![event(0)]);
        let one = spool.stats().unwrap().stored_bytes;
        let limits = Limits { max_bytes: one * 2 };
        let queued = spool.pending(ROUTE, 0, 10).unwrap();
        mark(&spool, &queued[0], Outcome::Delivered { status: 200 });
        let write = |n| Write::Append {
            channel: "http://x/abcd…".into(),
            routes: vec![ROUTE.into()],
            events: vec![event(n)].into(),
            cursor: None,
        };
        let report = spool
            .write(&[write(1), write(2), write(3)], limits)
            .unwrap();
        assert_eq!(report.appended, [vec![Some(2)], vec![Some(3)], vec![None]]);
        assert_eq!(report.pruned, 1, "the delivered event made room first");
    }

    /// Rewrite the spool's `meta.format` (None: as version 1 had none).
    fn set_format(dir: &Path, format: Option<u64>) {
        let db = Database::create(dir.join(FILE_NAME)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            match format {
                Some(v) => meta.insert(FORMAT, v).unwrap(),
                None => meta.remove(FORMAT).unwrap(),
            };
        }
        txn.commit().unwrap();
    }

    #[test]
    fn a_version_1_spool_keeps_its_queued_events_in_order_under_the_new_queue_keys() {
        let dir = tempfile::tempdir().unwrap();
        let target = "http://127.0.0.1:9/hook".to_string();
        {
            // What version 1 wrote: queues named by the target alone.
            let spool = Spool::open(dir.path()).unwrap();
            let append = |channel: &str, n: u8| Write::Append {
                channel: channel.into(),
                routes: vec![target.clone()],
                events: vec![event(n)].into(),
                cursor: Some(("legacykey".into(), n.to_string())),
            };
            let writes = [
                append("https://smee.io/Mine…", 0),
                append("https://smee.io/Othe…", 1),
                append("https://smee.io/Mine…", 2),
                append("https://smee.io/Mine…", 3),
            ];
            spool.write(&writes, ROOM).unwrap();
        }
        set_format(dir.path(), None);

        let spool = Spool::open(dir.path()).unwrap();
        let mine = route_key("newkey", &target);
        let moved = spool
            .adopt_legacy(
                "newkey",
                "legacykey",
                "https://smee.io/Mine…",
                std::slice::from_ref(&target),
            )
            .unwrap();
        assert_eq!(moved, 3);
        let ids = pending_ids(&spool, &mine);
        assert_eq!(ids, [1, 3, 4], "the channel's events, in their order");
        let theirs = pending_ids(&spool, &target);
        assert_eq!(
            theirs,
            [2],
            "another channel's event waits for its own relay"
        );
        assert_eq!(spool.cursor("newkey").unwrap().as_deref(), Some("3"));
        assert_eq!(
            spool.list(None, 10).unwrap()[0].route,
            target,
            "shown by target"
        );

        // The other channel's relay takes the rest; then the upgrade is complete.
        spool
            .adopt_legacy(
                "otherkey",
                "x",
                "https://smee.io/Othe…",
                std::slice::from_ref(&target),
            )
            .unwrap();
        assert_eq!(
            spool
                .pending(&route_key("otherkey", &target), 0, 10)
                .unwrap()
                .len(),
            1
        );
        assert!(
            spool
                .read(|txn| Ok(txn.open_table(META)?.get(LEGACY)?.is_none()))
                .unwrap()
        );
    }

    #[test]
    fn a_spool_from_a_newer_version_is_refused_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        drop(Spool::open(dir.path()).unwrap());
        set_format(dir.path(), Some(FORMAT_VERSION + 1));
        let Err(e) = Spool::open(dir.path()) else {
            panic!("opened a newer spool");
        };
        assert!(e.needs_the_user());
        let said = format!("newer smee-relay (format {}", FORMAT_VERSION + 1);
        assert!(e.to_string().contains(&said), "{e}");
        assert!(e.to_string().contains("not damaged: do not move it"), "{e}");
    }

    /// Found by review: a version-1 spool from before `body_chunks` and `alert_states` existed
    /// was opened without them once the tables were opened lazily, and every read of its queue
    /// failed ("Table 'body_chunks' does not exist").
    #[test]
    fn regression_a_spool_from_before_body_chunks_existed_could_not_be_read() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::create(dir.path().join(FILE_NAME)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                txn.open_table(META).unwrap();
                txn.open_table(EVENTS).unwrap();
                txn.open_table(RECORDS).unwrap();
                txn.open_table(PENDING).unwrap();
                txn.open_table(CURSORS).unwrap();
            }
            txn.commit().unwrap();
        }
        let spool = Spool::open(dir.path()).unwrap();
        assert!(spool.pending(ROUTE, 0, 10).unwrap().is_empty());
        assert!(spool.states().unwrap().is_empty());
        append(&spool, vec![event(1)]);
        assert_eq!(spool.pending(ROUTE, 0, 10).unwrap().len(), 1);
    }

    /// What version 2 left: every `records` row and `events` header as JSON, `meta.format` 2.
    fn as_version_2(dir: &Path) {
        let db = Database::create(dir.join(FILE_NAME)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut records = txn.open_table(RECORDS).unwrap();
            let rows: Vec<((u64, String), Vec<u8>)> = records
                .iter()
                .unwrap()
                .map(|e| {
                    let (k, v) = e.unwrap();
                    let (id, route) = k.value();
                    let json = serde_json::to_vec(&record::decode(v.value()).unwrap()).unwrap();
                    ((id, route.to_string()), json)
                })
                .collect();
            assert!(!rows.is_empty());
            for ((id, route), json) in rows {
                records
                    .insert((id, route.as_str()), json.as_slice())
                    .unwrap();
            }
            let mut events = txn.open_table(EVENTS).unwrap();
            let rows: Vec<(u64, Vec<u8>)> = events
                .iter()
                .unwrap()
                .map(|e| {
                    let (id, row) = e.unwrap();
                    let row = row.value();
                    let len = u32::from_le_bytes(row[..4].try_into().unwrap()) as usize;
                    let header = header::decode(&row[4..4 + len]).unwrap();
                    let json = serde_json::to_vec(&header).unwrap();
                    let mut old = (json.len() as u32).to_le_bytes().to_vec();
                    old.extend_from_slice(&json);
                    old.extend_from_slice(&row[4 + len..]);
                    (id.value(), old)
                })
                .collect();
            for (id, row) in rows {
                events.insert(id, row.as_slice()).unwrap();
            }
            txn.open_table(META).unwrap().insert(FORMAT, 2).unwrap();
        }
        txn.commit().unwrap();
    }

    #[test]
    fn a_version_2_spool_keeps_its_json_rows_and_is_marked_version_3_by_its_first_write() {
        let dir = tempfile::tempdir().unwrap();
        let route = ROUTE.to_string();
        {
            let spool = Spool::open(dir.path()).unwrap();
            append(&spool, vec![event(1), event(2), event(3)]);
            let queued = spool.pending(&route, 0, 10).unwrap();
            mark(&spool, &queued[0], Outcome::Delivered { status: 200 });
            let error = "target refused: 503".to_string();
            let retry = Outcome::Retry {
                status: Some(503),
                error,
            };
            mark(&spool, &queued[1], retry);
        }
        as_version_2(dir.path());

        let spool = Spool::open(dir.path()).unwrap();
        let format = |spool: &Spool| {
            spool
                .read(|txn| Ok(txn.open_table(META)?.get(FORMAT)?.map(|v| v.value())))
                .unwrap()
        };
        // Opening and reading change nothing: an older relay may still be using it.
        assert_eq!(format(&spool), Some(2));
        // The JSON rows read as they were written.
        let queued = spool.pending(&route, 0, 10).unwrap();
        assert_eq!(queued.len(), 2);
        assert_eq!(queued[0].event.event, event(2));
        assert_eq!(queued[1].event.event, event(3));
        assert_eq!(queued[0].event.channel, "http://x/abcd…");
        assert_eq!(queued[0].attempts, 1, "the retried one keeps its attempt");
        let (_, records) = spool.get(queued[0].event.id).unwrap();
        assert_eq!(
            records[0].1.last_error.as_deref(),
            Some("target refused: 503")
        );
        let statuses: Vec<Status> = spool
            .list(None, 10)
            .unwrap()
            .iter()
            .map(|r| r.record.status)
            .collect();
        assert_eq!(
            statuses,
            [Status::Delivered, Status::Pending, Status::Pending]
        );
        // A mark still applies to a JSON row, and rewrites it in the new layout.
        mark(&spool, &queued[0], Outcome::Delivered { status: 200 });
        let row = spool
            .read(|txn| {
                let records = txn.open_table(RECORDS)?;
                let row = records.get((queued[0].event.id, route.as_str()))?;
                Ok(row.map(|r| r.value().to_vec()))
            })
            .unwrap()
            .unwrap();
        assert_ne!(row.first(), Some(&b'{'));
        // The first write marks the file: its rows are now partly of this format.
        assert_eq!(format(&spool), Some(FORMAT_VERSION));
        let record = record::decode(&row).unwrap();
        assert_eq!((record.status, record.attempts), (Status::Delivered, 2));
        assert_eq!(spool.pending(&route, 0, 10).unwrap().len(), 1);
    }

    #[test]
    fn a_failed_creation_leaves_no_empty_spool_and_an_empty_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        // A creation cut short leaves only the temporary file, which the next open replaces.
        std::fs::write(dir.path().join("spool.redb.new"), b"").unwrap();
        drop(Spool::open(dir.path()).unwrap());
        assert!(!dir.path().join("spool.redb.new").exists());
        std::fs::write(dir.path().join(FILE_NAME), b"").unwrap();
        let Err(e) = Spool::open(dir.path()) else {
            panic!("started over an empty spool");
        };
        assert!(
            matches!(
                e,
                SpoolError::Damaged {
                    why: Damage::Empty,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(
            std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len(),
            0,
            "left as it was"
        );
    }

    /// A step of [`predict_answers_as_apply_does`]: append events of these body sizes to
    /// one or both routes, or mark the head of a route.
    #[derive(Clone, Debug)]
    enum Step {
        Append(Vec<usize>, bool),
        Mark(bool, bool),
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            (
                proptest::collection::vec(0usize..2_000, 1..4),
                any::<bool>()
            )
                .prop_map(|(sizes, both)| Step::Append(sizes, both)),
            (any::<bool>(), any::<bool>()).prop_map(|(second, ok)| Step::Mark(second, ok)),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 64,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// A record whose apply is deferred is answered from `predict`: whenever it answers,
        /// its report and counters are what `apply` gives; where it does not, `apply` prunes or
        /// refuses an event.
        #[test]
        fn predict_answers_as_apply_does(
            steps in proptest::collection::vec(proptest::collection::vec(step(), 1..4), 1..16),
            max_bytes in 2_000u64..20_000,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let spool = Spool::open(dir.path()).unwrap();
            let limits = Limits { max_bytes };
            let routes = ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"];
            for batch in steps {
                let mut writes = Vec::new();
                for step in batch {
                    match step {
                        Step::Append(sizes, both) => writes.push(Write::Append {
                            channel: "c".into(),
                            routes: routes[..1 + usize::from(both)]
                                .iter()
                                .map(|r| r.to_string())
                                .collect(),
                            events: sizes
                                .iter()
                                .map(|&n| Event { body: Bytes::from(vec![b'x'; n]), ..event(1) })
                                .collect::<Vec<_>>()
                                .into(),
                            cursor: None,
                        }),
                        Step::Mark(second, ok) => {
                            let route = routes[usize::from(second)];
                            if let Some(head) = spool.pending(route, 0, 1).unwrap().pop() {
                                writes.push(Write::Mark {
                                    route: route.into(),
                                    seq: head.seq,
                                    event: head.event.id,
                                    outcome: match ok {
                                        true => Outcome::Delivered { status: 200 },
                                        false => Outcome::Dead { status: None, error: "no".into() },
                                    },
                                });
                            }
                        }
                    }
                }
                let refs: Vec<&Write> = writes.iter().collect();
                let now = 1_700_000_000_000;
                let instance = spool.instance;
                let (predicted, applied, after) = spool
                    .update(|t| {
                        let predicted = predict(counters(t, instance)?, &refs, now, limits);
                        let applied = apply(t, refs.iter().copied(), now, limits)?;
                        Ok((predicted, applied, counters(t, instance)?))
                    })
                    .unwrap();
                match predicted {
                    Some(predicted) => proptest::prop_assert_eq!(predicted, (applied, after)),
                    None => proptest::prop_assert!(
                        applied.pruned > 0 || applied.appended.concat().contains(&None),
                        "predict gave up, yet apply stored everything without pruning: {applied:?}"
                    ),
                }
            }
        }
    }

    /// A panic inside a synced commit (redb's, on damage the open did not find) escaped
    /// `transact`, the one write path without a catch, and took the caller's thread down with
    /// the log's lock held. It now fails the write, naming the file, and the next write opens
    /// the file again.
    #[test]
    fn regression_a_panic_in_a_synced_commit_escaped_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let failed = spool.update(|_| -> Result<(), redb::Error> { panic!("a damaged page") });
        assert!(
            matches!(
                &failed,
                Err(SpoolError::Damaged { why: Damage::Panic(why), .. })
                    if why.contains("a damaged page")
            ),
            "{failed:?}"
        );
        assert_eq!(append(&spool, vec![event(1)]), [1]);
    }
}
