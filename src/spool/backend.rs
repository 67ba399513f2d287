//! How the spool's file is reached: redb's file backend, wrapped so that tests can put a
//! backend that injects faults (a full disk, a crash) between redb and the file. Owns nothing
//! else; it must not change what reaches the file.

use std::fmt;
use std::fs::File;
use std::ops::Bound;
use std::sync::Arc;

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// Makes the backend for a file; the spool keeps it to open the file again after a failed
/// write.
#[derive(Clone)]
pub(crate) struct Factory(Arc<dyn Fn(FileBackend) -> Box<dyn StorageBackend> + Send + Sync>);

impl fmt::Debug for Factory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("backend::Factory")
    }
}

impl Factory {
    /// The file itself.
    pub(crate) fn file() -> Self {
        Factory(Arc::new(|file| Box::new(file)))
    }

    /// A backend made by `wrap` around the file's.
    #[cfg(test)]
    pub(crate) fn wrapping(
        wrap: impl Fn(FileBackend) -> Box<dyn StorageBackend> + Send + Sync + 'static,
    ) -> Self {
        Factory(Arc::new(wrap))
    }

    pub(crate) fn wrap(&self, file: File) -> Result<Dyn, redb::DatabaseError> {
        Ok(Dyn((self.0)(FileBackend::new(file)?)))
    }
}

/// A boxed backend (redb takes one by value, of a concrete type).
#[derive(Debug)]
pub(crate) struct Dyn(pub(crate) Box<dyn StorageBackend>);

impl StorageBackend for Dyn {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.0.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.0.read(offset, out)
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> Result<(), std::io::Error> {
        self.0.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.0.write(offset, data)
    }
    fn close(&self) -> Result<(), std::io::Error> {
        self.0.close()
    }
    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.0.try_lock_range(start, end)
    }
    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.0.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.unlock_range(start, end)
    }
    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.0.query_lock_range(start, end)
    }
}

/// Forwards every call to a FileBackend and, while `full` is set, fails what a full disk
/// fails with "no space left on device": a write that needs a new block (beyond the blocks
/// written so far; growing the file with `set_len` makes holes, which take blocks only when
/// written). Overwriting written blocks still succeeds, as it does on a real full disk.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct DiskFull {
    pub(crate) inner: FileBackend,
    pub(crate) full: Arc<std::sync::atomic::AtomicBool>,
    /// The 4 KiB blocks of the file that have been written (shared by every open of it).
    pub(crate) allocated: Arc<std::sync::Mutex<std::collections::HashSet<u64>>>,
    /// The disk's size in blocks, if it fills up by itself (the file alone on it).
    pub(crate) capacity: Option<u64>,
}

#[cfg(test)]
impl DiskFull {
    const BLOCK: u64 = 4096;

    /// A factory of such backends, and the flag that fills the disk (shared by every open of
    /// the file, as the blocks written are).
    pub(crate) fn factory() -> (Factory, Arc<std::sync::atomic::AtomicBool>) {
        let full = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = full.clone();
        let allocated = Arc::default();
        let factory = Factory::wrapping(move |inner| {
            Box::new(DiskFull {
                inner,
                full: full.clone(),
                allocated: Arc::clone(&allocated),
                capacity: None,
            })
        });
        (factory, flag)
    }

    /// A factory of such backends on a disk of `bytes` that holds the file alone, and what is
    /// free on it (bytes).
    pub(crate) fn sized(bytes: u64) -> (Factory, Arc<dyn Fn() -> u64 + Send + Sync>) {
        let capacity = bytes / Self::BLOCK;
        let allocated: Arc<std::sync::Mutex<std::collections::HashSet<u64>>> = Arc::default();
        let taken = Arc::clone(&allocated);
        let free = Arc::new(move || {
            let used = taken.lock().expect("not poisoned").len() as u64;
            capacity.saturating_sub(used) * Self::BLOCK
        });
        let factory = Factory::wrapping(move |inner| {
            Box::new(DiskFull {
                inner,
                full: Arc::default(),
                allocated: Arc::clone(&allocated),
                capacity: Some(capacity),
            })
        });
        (factory, free)
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), std::io::Error> {
        let blocks = offset / Self::BLOCK..(offset + len as u64).div_ceil(Self::BLOCK);
        let mut allocated = self.allocated.lock().expect("not poisoned");
        if self.full.load(std::sync::atomic::Ordering::SeqCst) {
            if blocks.clone().all(|b| allocated.contains(&b)) {
                return Ok(());
            }
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        if let Some(capacity) = self.capacity {
            let new = blocks.clone().filter(|b| !allocated.contains(b)).count() as u64;
            if allocated.len() as u64 + new > capacity {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        allocated.extend(blocks);
        Ok(())
    }
}

#[cfg(test)]
impl StorageBackend for DiskFull {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> Result<(), std::io::Error> {
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.check(offset, data.len())?;
        self.inner.write(offset, data)
    }
    fn close(&self) -> Result<(), std::io::Error> {
        self.inner.close()
    }
    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }
    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }
    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}
