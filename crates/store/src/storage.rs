//! The one I/O seam: every file operation of the store goes through [`Storage`]. Two
//! implementations: [`FsStorage`] (std::fs, positioned reads and writes) and
//! [`crate::fault::FaultyStorage`] (in memory, fails or crashes on demand).
//!
//! Names are file names inside the store directory; there are no subdirectories.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// A held advisory lock; dropping it releases the lock.
pub trait LockGuard: Send + Sync + std::fmt::Debug {}

/// File operations the store needs, on one directory.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// The directory, for messages.
    fn location(&self) -> &Path;
    /// File names in the directory.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Creates an empty file; fails if it exists.
    fn create(&self, name: &str) -> io::Result<()>;
    /// The file's length.
    fn len(&self, name: &str) -> io::Result<u64>;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `offset`, growing the file if needed. Not durable until [`Storage::sync`].
    fn write(&self, name: &str, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Sets the file's length (zero-filling when growing). Not durable until [`Storage::sync`].
    fn set_len(&self, name: &str, len: u64) -> io::Result<()>;
    /// Makes the file's data and length durable.
    fn sync(&self, name: &str) -> io::Result<()>;
    /// Makes `name`'s data durable, and its metadata as far as reading the data back needs it
    /// (`fdatasync`); the default is [`Storage::sync`].
    fn sync_data(&self, name: &str) -> io::Result<()> {
        self.sync(name)
    }
    /// Renames `from` to `to`, replacing `to`. Not durable until [`Storage::sync_dir`].
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Removes the file. Not durable until [`Storage::sync_dir`].
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes creations, renames and removals durable.
    fn sync_dir(&self) -> io::Result<()>;
    /// Takes an exclusive advisory lock on `name` (created if missing) without waiting.
    /// `Ok(None)` if another holder has it.
    fn try_lock(&self, name: &str) -> io::Result<Option<Box<dyn LockGuard>>>;
}

/// The real backend: `std::fs` on a directory. Reads and writes are positioned (`pread`,
/// `pwrite`) on file handles shared between threads: no lock is held while the kernel copies, so
/// readers run in parallel, and a failed read is an `io::Error` (a memory map would turn it into
/// SIGBUS).
#[derive(Debug)]
pub struct FsStorage {
    dir: PathBuf,
    writable: bool,
    files: Mutex<HashMap<String, Arc<File>>>,
}

#[derive(Debug)]
struct FsLock(#[allow(dead_code)] File);
impl LockGuard for FsLock {}

impl FsStorage {
    /// A backend on `dir`; `writable` opens files for writing (the store's writer).
    pub fn new(dir: impl Into<PathBuf>, writable: bool) -> Self {
        FsStorage {
            dir: dir.into(),
            writable,
            files: Mutex::new(HashMap::new()),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn files(&self) -> MutexGuard<'_, HashMap<String, Arc<File>>> {
        // A panic while holding this lock leaves only a cache of open files behind.
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The open file `name` (opened on first use). The cache's lock is held only to look it up.
    fn file(&self, name: &str) -> io::Result<Arc<File>> {
        if let Some(f) = self.files().get(name) {
            return Ok(f.clone());
        }
        let file = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(self.writable)
                .open(self.path(name))?,
        );
        Ok(self.files().entry(name.to_string()).or_insert(file).clone())
    }
}

impl Storage for FsStorage {
    fn location(&self) -> &Path {
        &self.dir
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                if let Some(name) = entry.file_name().to_str() {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    fn create(&self, name: &str) -> io::Result<()> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.path(name))?;
        self.files().insert(name.to_string(), Arc::new(file));
        Ok(())
    }

    fn len(&self, name: &str) -> io::Result<u64> {
        Ok(self.file(name)?.metadata()?.len())
    }

    fn read(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&*self.file(name)?, buf, offset)
    }

    fn write(&self, name: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&*self.file(name)?, data, offset)
    }

    fn set_len(&self, name: &str, len: u64) -> io::Result<()> {
        self.file(name)?.set_len(len)
    }

    fn sync(&self, name: &str) -> io::Result<()> {
        self.file(name)?.sync_all()
    }

    fn sync_data(&self, name: &str) -> io::Result<()> {
        self.file(name)?.sync_data()
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut files = self.files();
        files.remove(from);
        files.remove(to);
        std::fs::rename(self.path(from), self.path(to))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.files().remove(name);
        std::fs::remove_file(self.path(name))
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    fn try_lock(&self, name: &str) -> io::Result<Option<Box<dyn LockGuard>>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.path(name))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Box::new(FsLock(file)))),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }
}

/// Shared handle to a backend.
pub type SharedStorage = Arc<dyn Storage>;
