//! The server's buffers on disk (`serve.redb` in `--state-dir`), so a restarted server replays
//! what it had. It owns the redb handle and its recovery: after a failed write (a full disk)
//! redb refuses every later write, so the handle is dropped and reopened on the next attempt,
//! and writes work again as soon as space returns. It knows nothing of HTTP or budgets.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;

use super::hub::{Posted, Stats};

const STORED: redb::TableDefinition<(&str, u64), &[u8]> = redb::TableDefinition::new("posted");

/// Per channel, the highest id evicted from it: a restarted server must still tell a
/// subscriber that resumes from before it of the gap (kept after the channel expires, too).
const EVICTED: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("evicted_upto");
/// A write that proves the store takes posts again ([`Store::probe`]); always empty after it.
const PROBE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("probe");

/// How many expired channels' highest evicted ids a server remembers (the newest): a channel
/// made anew under a name it remembers tells a resuming subscriber of the gap; an older one
/// is forgotten (about 100 bytes each).
pub(super) const EXPIRED_KEPT: usize = 10_000;

/// What a restarted server had on disk.
#[derive(Default)]
pub(super) struct Restored {
    /// Channels with events, in name order: their events oldest first, and the highest id
    /// evicted from each (0 if none).
    pub channels: Vec<(String, u64, Vec<Posted>)>,
    /// Channels without events that had evicted some (expired, or emptied): the highest id
    /// evicted, at most [`EXPIRED_KEPT`] of them (the newest).
    pub expired: Vec<(String, u64)>,
}

/// Why the store could not open, read or write.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create {0}")]
    CreateDir(PathBuf, #[source] std::io::Error),
    #[error("the state directory {0} is a file, not a directory: give --state-dir a directory")]
    NotADirectory(PathBuf),
    #[error("cannot open {0}; if it is damaged, move it aside and start again")]
    Open(PathBuf, #[source] redb::DatabaseError),
    #[error("cannot write to {0}")]
    Write(PathBuf, #[source] redb::Error),
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] redb::Error),
    #[error("cannot encode an event's headers")]
    Encode(#[source] serde_json::Error),
    #[error("the storage task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// Opens the database; called again after a failed write.
type Opener = Box<dyn Fn() -> Result<redb::Database, redb::DatabaseError> + Send + Sync>;

pub struct Store {
    /// The file, for messages.
    pub path: PathBuf,
    /// How to (re)open it.
    opener: Opener,
    /// The open handle; None after a failed write, until it reopens.
    db: Mutex<Option<redb::Database>>,
}

/// The part of a posted event that is not its body.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredHead {
    received_ms: u64,
    headers: Vec<(String, String)>,
    query: serde_json::Map<String, serde_json::Value>,
    content_type: String,
}

/// A posted event as bytes: the head's length (u32, little-endian), the head as JSON, the body.
/// The same bytes are a message of the JetStream stream with `--nats-url`.
pub(super) fn encode(posted: &Posted) -> Result<Vec<u8>, serde_json::Error> {
    let head = serde_json::to_vec(&StoredHead {
        received_ms: posted.received_ms,
        headers: posted.headers.clone(),
        query: posted.query.clone(),
        content_type: posted.content_type.clone(),
    })?;
    let mut value = Vec::with_capacity(4 + head.len() + posted.body.len());
    value.extend_from_slice(&(head.len() as u32).to_le_bytes());
    value.extend_from_slice(&head);
    value.extend_from_slice(&posted.body);
    Ok(value)
}

/// The event [`encode`] wrote, as event `id`; None if the bytes are not such an event.
pub(super) fn decode(stats: &Arc<Stats>, id: u64, bytes: &[u8]) -> Option<Posted> {
    let len = bytes
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(|b| u32::from_le_bytes(b) as usize)?;
    let head = bytes
        .get(4..4usize.checked_add(len)?)
        .and_then(|h| serde_json::from_slice::<StoredHead>(h).ok())?;
    Some(Posted::new(
        stats,
        id,
        head.received_ms,
        head.headers,
        head.query,
        head.content_type,
        Bytes::copy_from_slice(&bytes[4 + len..]),
    ))
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        // As the spool's `create_state_dir` says it: anything but a directory in its place.
        crate::spool::create_private_dir(dir).map_err(|e| match dir.exists() && !dir.is_dir() {
            true => StoreError::NotADirectory(dir.to_path_buf()),
            false => StoreError::CreateDir(dir.to_path_buf(), e),
        })?;
        let path = dir.join("serve.redb");
        let file = path.clone();
        Self::open_with(path, Box::new(move || redb::Database::create(&file)))
    }

    /// With a custom way to open (tests inject storage faults this way).
    pub fn open_with(path: PathBuf, opener: Opener) -> Result<Self, StoreError> {
        let db = opener().map_err(|e| StoreError::Open(path.clone(), e))?;
        Ok(Self {
            path,
            opener,
            db: Mutex::new(Some(db)),
        })
    }

    /// Run `work` in a write transaction and commit it, reopening a handle a failed write
    /// left unusable.
    fn write(
        &self,
        work: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), StoreError> {
        let mut db = self.db.lock().unwrap_or_else(|e| e.into_inner());
        if db.is_none() {
            *db = Some((self.opener)().map_err(|e| StoreError::Open(self.path.clone(), e))?);
        }
        let handle = db.as_ref().expect("opened above");
        let result = (|| -> Result<(), redb::Error> {
            let txn = handle.begin_write()?;
            work(&txn)?;
            txn.commit()?;
            Ok(())
        })();
        if let Err(e) = result {
            // redb refuses every write after an I/O error until it is reopened (and repaired).
            *db = None;
            return Err(StoreError::Write(self.path.clone(), e));
        }
        Ok(())
    }

    /// What the server had: its channels' events and what each evicted. The notes of expired
    /// channels past [`EXPIRED_KEPT`] (the oldest) are deleted.
    pub(super) fn load(&self, stats: &Arc<Stats>) -> Result<Restored, StoreError> {
        use redb::{ReadableDatabase as _, ReadableTable as _};
        let read = |e: redb::Error| StoreError::Read(self.path.clone(), e);
        let mut restored = Restored::default();
        let mut upto = std::collections::BTreeMap::new();
        {
            let db = self.db.lock().unwrap_or_else(|e| e.into_inner());
            let Some(db) = db.as_ref() else {
                return Ok(restored);
            };
            let txn = db.begin_read().map_err(|e| read(e.into()))?;
            match txn.open_table(EVICTED) {
                Ok(table) => {
                    for entry in table.iter().map_err(|e| read(e.into()))? {
                        let (name, id) = entry.map_err(|e| read(e.into()))?;
                        upto.insert(name.value().to_string(), id.value());
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(read(e.into())),
            }
            let channels = &mut restored.channels;
            match txn.open_table(STORED) {
                Ok(table) => {
                    for entry in table.iter().map_err(|e| read(e.into()))? {
                        let (key, value) = entry.map_err(|e| read(e.into()))?;
                        let (name, id) = key.value();
                        let Some(posted) = decode(stats, id, value.value()) else {
                            continue;
                        };
                        if channels.last().is_none_or(|(last, ..)| last != name) {
                            let evicted = upto.remove(name).unwrap_or(0);
                            channels.push((name.to_string(), evicted, Vec::new()));
                        }
                        channels.last_mut().expect("pushed").2.push(posted);
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(read(e.into())),
            }
        }
        let mut expired: Vec<(String, u64)> = upto.into_iter().collect();
        // Ids grow with the clock: the newest notes are the highest.
        expired.sort_by_key(|(_, id)| std::cmp::Reverse(*id));
        let forgotten = expired.split_off(expired.len().min(EXPIRED_KEPT));
        if !forgotten.is_empty() {
            self.forget(forgotten.iter().map(|(name, _)| name.as_str()))?;
        }
        restored.expired = expired;
        Ok(restored)
    }

    /// Delete the notes of what these channels evicted.
    fn forget<'a>(&self, channels: impl Iterator<Item = &'a str>) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut upto = txn.open_table(EVICTED)?;
            for name in channels {
                upto.remove(name)?;
            }
            Ok(())
        })
    }

    /// Store `posted` and delete `evicted`, in one transaction.
    pub(super) fn save(
        &self,
        name: &str,
        posted: &Posted,
        evicted: &[(Arc<str>, u64)],
    ) -> Result<(), StoreError> {
        let value = encode(posted).map_err(StoreError::Encode)?;
        self.write(|txn| {
            txn.open_table(STORED)?
                .insert((name, posted.id), value.as_slice())?;
            drop_evicted(txn, evicted)
        })
    }

    /// Write `bytes` in a commit of their own and take them back in the next: what storing a
    /// post of that size needs of the disk (its pages written, the file grown if it must be),
    /// with nothing kept. In one commit the pages were freed before they were written, so the
    /// probe passed on a disk that refused the post (helper-132: health flapped).
    pub(super) fn probe(&self, bytes: usize) -> Result<(), StoreError> {
        let blob = vec![0u8; bytes];
        self.write(|txn| {
            txn.open_table(PROBE)?.insert(0, blob.as_slice())?;
            Ok(())
        })?;
        self.write(|txn| {
            txn.open_table(PROBE)?.remove(0)?;
            Ok(())
        })
    }

    /// Delete `evicted` (also a probe that the disk takes writes again).
    pub(super) fn remove(&self, evicted: &[(Arc<str>, u64)]) -> Result<(), StoreError> {
        self.write(|txn| drop_evicted(txn, evicted))
    }
}

/// Delete `evicted`, noting the highest id evicted from each of their channels.
fn drop_evicted(
    txn: &redb::WriteTransaction,
    evicted: &[(Arc<str>, u64)],
) -> Result<(), redb::Error> {
    use redb::ReadableTable as _;
    let mut table = txn.open_table(STORED)?;
    let mut upto = txn.open_table(EVICTED)?;
    for (channel, id) in evicted {
        table.remove((&**channel, *id))?;
        let was = upto.get(&**channel)?.map_or(0, |v| v.value());
        if *id > was {
            upto.insert(&**channel, *id)?;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use std::ops::Bound;
    use std::sync::atomic::{AtomicBool, Ordering};

    use redb::{BackendError, StorageBackend};

    use super::*;

    /// A file backend whose writes fail with "no space left" while `full` is set; with
    /// `growth_only`, only writes to blocks never written fail, past the [`ROOM_LEFT`] a full
    /// disk has: pages the file has take writes, and growing the file's length (sparse, as on
    /// ext4 or tmpfs) allocates nothing.
    #[derive(Debug)]
    struct FullDisk {
        inner: redb::backends::FileBackend,
        full: Arc<AtomicBool>,
        growth_only: bool,
        /// What the disk holds for the file (kept across reopenings, as the disk keeps it).
        blocks: Arc<Mutex<Blocks>>,
    }

    /// What a full disk still takes in [`FullDisk`]'s `growth_only` mode.
    const ROOM_LEFT: u64 = 64 << 10;

    /// The disk's block: a write to a block the file has never written allocates it.
    const BLOCK: u64 = 4096;

    /// The blocks a file was given: those written, as a file's length is sparse (ext4, tmpfs).
    #[derive(Debug, Default)]
    struct Blocks {
        written: std::collections::HashSet<u64>,
        /// While full, the bytes of new blocks the disk still takes.
        room: Option<u64>,
    }

    fn enospc() -> std::io::Error {
        std::io::Error::from_raw_os_error(28)
    }

    impl StorageBackend for FullDisk {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            if self.full.load(Ordering::SeqCst) && !self.growth_only && len > self.inner.len()? {
                return Err(enospc());
            }
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            if self.full.load(Ordering::SeqCst) && !self.growth_only {
                return Err(enospc());
            }
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            let mut blocks = self.blocks.lock().unwrap();
            let touched = offset / BLOCK..(offset + data.len() as u64).div_ceil(BLOCK);
            let new = touched
                .clone()
                .filter(|b| !blocks.written.contains(b))
                .count() as u64;
            if !self.full.load(Ordering::SeqCst) {
                blocks.room = None;
            } else {
                let room = blocks.room.get_or_insert(ROOM_LEFT);
                if !self.growth_only || new * BLOCK > *room {
                    return Err(enospc());
                }
                *room -= new * BLOCK;
            }
            blocks.written.extend(touched);
            self.inner.write(offset, data)
        }
        fn close(&self) -> Result<(), std::io::Error> {
            self.inner.close()
        }
        fn try_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
            self.inner.try_lock_range(s, e)
        }
        fn try_lock_shared_range(
            &self,
            s: Bound<u64>,
            e: Bound<u64>,
        ) -> Result<bool, BackendError> {
            self.inner.try_lock_shared_range(s, e)
        }
        fn lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
            self.inner.lock_range(s, e)
        }
        fn lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
            self.inner.lock_shared_range(s, e)
        }
        fn unlock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
            self.inner.unlock_range(s, e)
        }
        fn query_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
            self.inner.query_lock_range(s, e)
        }
    }

    fn faulty_store(path: PathBuf, full: Arc<AtomicBool>) -> Store {
        full_disk_store(path, full, false)
    }

    /// A store on [`FullDisk`].
    pub(in crate::server) fn full_disk_store(
        path: PathBuf,
        full: Arc<AtomicBool>,
        growth_only: bool,
    ) -> Store {
        let file = path.clone();
        let len = std::fs::metadata(&path).map_or(0, |m| m.len());
        let blocks = Arc::new(Mutex::new(Blocks {
            written: (0..len.div_ceil(BLOCK)).collect(),
            room: None,
        }));
        Store::open_with(
            path,
            Box::new(move || {
                let handle = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&file)
                    .map_err(|e| redb::DatabaseError::Storage(redb::StorageError::Io(e)))?;
                redb::Builder::new().create_with_backend(FullDisk {
                    inner: redb::backends::FileBackend::new(handle)?,
                    full: full.clone(),
                    growth_only,
                    blocks: Arc::clone(&blocks),
                })
            }),
        )
        .unwrap()
    }

    fn event(stats: &Arc<Stats>, id: u64) -> Posted {
        Posted::new(
            stats,
            id,
            id,
            vec![("x-n".into(), id.to_string())],
            serde_json::Map::new(),
            "application/json".into(),
            Bytes::from(format!("{{\"n\":{id}}}")),
        )
    }

    /// Regression (helper-132): on a full disk the probe (written and removed in one commit)
    /// passed where a post of its size was refused, so health said the store took writes again
    /// after every refused post.
    #[test]
    fn regression_the_probe_passed_where_a_post_of_its_size_failed() {
        let dir = tempfile::tempdir().unwrap();
        let full = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Stats::default());
        let store = full_disk_store(dir.path().join("serve.redb"), full.clone(), true);
        store.save("ch", &event(&stats, 1), &[]).unwrap();
        full.store(true, Ordering::SeqCst);
        let size = 300 << 10;
        let post = Posted::new(
            &stats,
            2,
            2,
            Vec::new(),
            serde_json::Map::new(),
            "application/octet-stream".into(),
            Bytes::from(vec![b'x'; size]),
        );
        assert!(
            store.save("ch", &post, &[]).is_err(),
            "the file cannot grow"
        );
        assert!(store.probe(size).is_err(), "nor for the probe");
        full.store(false, Ordering::SeqCst);
        store.probe(size).unwrap();
        store.save("ch", &post, &[]).unwrap();
    }

    /// Issue 16 item 12: after ENOSPC the store stayed unusable until restart.
    #[test]
    fn a_full_disk_fails_writes_and_they_work_again_once_space_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serve.redb");
        let full = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Stats::default());
        let store = faulty_store(path.clone(), full.clone());
        store.save("ch", &event(&stats, 1), &[]).unwrap();

        full.store(true, Ordering::SeqCst);
        let failed = store.save("ch", &event(&stats, 2), &[]);
        assert!(
            failed.is_err(),
            "a write to a full disk fails (and the post gets 503)"
        );
        assert!(store.save("ch", &event(&stats, 3), &[]).is_err());

        full.store(false, Ordering::SeqCst);
        store
            .save("ch", &event(&stats, 4), &[])
            .expect("writes work again by themselves once space returns");
        drop(store);

        let reopened = faulty_store(path, full);
        let loaded = reopened.load(&stats).unwrap();
        let ids: Vec<u64> = loaded.channels[0].2.iter().map(|e| e.id).collect();
        assert_eq!(
            ids,
            [1, 4],
            "every acknowledged event is kept, nothing else"
        );
    }
}
