//! The one I/O seam: every file operation of the store goes through [`Storage`]. Two
//! implementations: [`FsStorage`] (std::fs; segment data read through memmap2) and
//! [`crate::fault::FaultyStorage`] (in memory, fails or crashes on demand).
//!
//! Names are file names inside the store directory; there are no subdirectories.

use memmap2::Mmap;
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

/// Segment files are read through a memory map.
fn mapped(name: &str) -> bool {
    name.starts_with("seg-")
}

#[derive(Debug)]
struct OpenFile {
    file: File,
    /// Read-only map of the file as long as it was when mapped (segments).
    map: Option<Mmap>,
}

/// The real backend: `std::fs` on a directory. Segment data is read through memmap2 maps and
/// written with `pwrite`: measured, writing through a map of fresh (sparse) file space makes the
/// kernel fault every page in, zero-filled through readahead, before the copy overwrites it — 44%
/// of a first snapshot's time in a perf profile.
#[derive(Debug)]
pub struct FsStorage {
    dir: PathBuf,
    writable: bool,
    files: Mutex<HashMap<String, OpenFile>>,
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

    fn files(&self) -> MutexGuard<'_, HashMap<String, OpenFile>> {
        // A panic while holding this lock leaves only a cache of open files behind.
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn with_file<R>(
        &self,
        name: &str,
        f: impl FnOnce(&mut OpenFile) -> io::Result<R>,
    ) -> io::Result<R> {
        let mut files = self.files();
        if !files.contains_key(name) {
            let file = OpenOptions::new()
                .read(true)
                .write(self.writable)
                .open(self.path(name))?;
            files.insert(name.to_string(), OpenFile { file, map: None });
        }
        let entry = files
            .get_mut(name)
            .ok_or_else(|| io::Error::other("open file vanished"))?;
        f(entry)
    }

    fn remap(of: &mut OpenFile, name: &str) -> io::Result<()> {
        of.map = None;
        if !mapped(name) || of.file.metadata()?.len() == 0 {
            return Ok(());
        }
        // SAFETY: the map is read-only and covers the file's length now. The only process that
        // shrinks segment files is the store's single writer (holding the store lock), and it
        // drops its own map first (`set_len`) and only cuts bytes past the committed end, which
        // no reader's committed view reaches; growth and removal (unlinking) never invalidate a
        // mapping. Another program truncating the store's files would break this, which the docs
        // forbid (as ripgrep documents for the files it maps).
        of.map = Some(unsafe { Mmap::map(&of.file)? });
        Ok(())
    }
}

fn in_bounds(offset: u64, len: usize, map_len: usize) -> Option<usize> {
    let start = usize::try_from(offset).ok()?;
    (start.checked_add(len)? <= map_len).then_some(start)
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
        self.files()
            .insert(name.to_string(), OpenFile { file, map: None });
        Ok(())
    }

    fn len(&self, name: &str) -> io::Result<u64> {
        self.with_file(name, |of| Ok(of.file.metadata()?.len()))
    }

    fn read(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.with_file(name, |of| {
            let stale = of
                .map
                .as_ref()
                .is_none_or(|m| in_bounds(offset, buf.len(), m.len()).is_none());
            if stale && mapped(name) {
                // Not mapped yet, or the file grew past the map.
                Self::remap(of, name)?;
            }
            if let Some(map) = of.map.as_ref() {
                if let Some(start) = in_bounds(offset, buf.len(), map.len()) {
                    buf.copy_from_slice(&map[start..start + buf.len()]);
                    return Ok(());
                }
            }
            std::os::unix::fs::FileExt::read_exact_at(&of.file, buf, offset)
        })
    }

    fn write(&self, name: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        self.with_file(name, |of| {
            std::os::unix::fs::FileExt::write_all_at(&of.file, data, offset)
        })
    }

    fn set_len(&self, name: &str, len: u64) -> io::Result<()> {
        self.with_file(name, |of| {
            // Drop the map before resizing, so no mapped page outlives the file's end.
            of.map = None;
            of.file.set_len(len)
        })
    }

    fn sync(&self, name: &str) -> io::Result<()> {
        self.with_file(name, |of| of.file.sync_all())
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
