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
    /// Starts writing `len` bytes of `name` at `offset` to the device without waiting
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so that the `sync` that follows has less
    /// left to wait for. A hint only: it promises no durability, and the default does nothing.
    fn start_writeback(&self, _name: &str, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
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

    #[cfg(target_os = "linux")]
    fn start_writeback(&self, name: &str, offset: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let file = self.file(name)?;
        let (Ok(off), Ok(n)) = (
            libc::off64_t::try_from(offset),
            libc::off64_t::try_from(len),
        ) else {
            return Ok(()); // past what the call can name: the sync does it all
        };
        // SAFETY: `file` is an open file this function holds (the `Arc` keeps the descriptor
        // open for the call); sync_file_range reads no memory of ours and only starts writeback
        // of the range, with a flag the kernel defines.
        let rc =
            unsafe { libc::sync_file_range(file.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The one `unsafe` call of the crate: starting writeback of a written range succeeds, a
    /// range past what the call can name is skipped, and a missing file is an error.
    #[test]
    fn writeback_starts_on_written_ranges() {
        let dir = tempfile::tempdir().expect("tmp");
        let io = FsStorage::new(dir.path(), true);
        io.create("f").expect("create");
        io.write("f", 0, &[7u8; 8192]).expect("write");
        io.start_writeback("f", 0, 8192).expect("writeback");
        io.start_writeback("f", 4096, u64::MAX)
            .expect("past the end: skipped");
        io.sync_data("f").expect("sync");
        let mut back = [0u8; 8192];
        io.read("f", 0, &mut back).expect("read");
        assert_eq!(back, [7u8; 8192]);
        assert!(io.start_writeback("missing", 0, 1).is_err());
    }
}
