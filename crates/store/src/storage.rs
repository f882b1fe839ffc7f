//! The one I/O seam: every file operation of the store goes through [`Storage`]. Two
//! implementations: [`FsStorage`] (std::fs, and memmap2 for segment data) and
//! [`crate::fault::FaultyStorage`] (in memory, fails or crashes on demand).
//!
//! Names are file names inside the store directory; there are no subdirectories.

use memmap2::{Mmap, MmapMut};
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

/// Files the real backend maps for writing: segment data is written by copying into a map of the
/// pre-sized file and flushed by range.
fn mapped_for_write(name: &str) -> bool {
    name.starts_with("seg-")
}

#[derive(Debug)]
struct OpenFile {
    file: File,
    /// Writable map of the whole file (segments, writer side).
    map: Option<MmapMut>,
    /// Read-only map (segments, reader side).
    ro_map: Option<Mmap>,
    /// Byte range written through the map since the last sync.
    dirty: Option<(usize, usize)>,
}

/// The real backend: `std::fs` on a directory, with memmap2 for segment files.
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
    /// A backend on `dir`. `writable` selects writable maps; readers map read-only.
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
            files.insert(
                name.to_string(),
                OpenFile {
                    file,
                    map: None,
                    ro_map: None,
                    dirty: None,
                },
            );
        }
        let entry = files
            .get_mut(name)
            .ok_or_else(|| io::Error::other("open file vanished"))?;
        f(entry)
    }

    fn remap(&self, of: &mut OpenFile, name: &str) -> io::Result<()> {
        of.map = None;
        of.ro_map = None;
        of.dirty = None;
        let len = of.file.metadata()?.len();
        if !mapped_for_write(name) || len == 0 {
            return Ok(());
        }
        if self.writable {
            // SAFETY: the map covers the file's current length. Only the store's single writer
            // (holding the store lock) writes or resizes segment files, and it drops this map
            // before any resize (`set_len` calls `remap`), so no access goes past the end of the
            // file. Another process changing the file under us would break this; the store lock
            // and the docs forbid it (as ripgrep documents for the files it maps).
            of.map = Some(unsafe { MmapMut::map_mut(&of.file)? });
        } else {
            // SAFETY: as above for readers: the writer only ever appends to segments past the
            // committed length a reader uses, or removes whole files (unlinking keeps the mapping
            // valid); truncation happens only to uncommitted tails no reader reads.
            of.ro_map = Some(unsafe { Mmap::map(&of.file)? });
        }
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
        self.files().insert(
            name.to_string(),
            OpenFile {
                file,
                map: None,
                ro_map: None,
                dirty: None,
            },
        );
        Ok(())
    }

    fn len(&self, name: &str) -> io::Result<u64> {
        self.with_file(name, |of| Ok(of.file.metadata()?.len()))
    }

    fn read(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.with_file(name, |of| {
            if of.map.is_none() && of.ro_map.is_none() && mapped_for_write(name) {
                self.remap(of, name)?;
            }
            let mapped: Option<&[u8]> = of.map.as_deref().or(of.ro_map.as_deref());
            if let Some(map) = mapped {
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
            if of.map.is_none() && mapped_for_write(name) {
                self.remap(of, name)?;
            }
            if let Some(map) = of.map.as_mut() {
                if let Some(start) = in_bounds(offset, data.len(), map.len()) {
                    map[start..start + data.len()].copy_from_slice(data);
                    let end = start + data.len();
                    of.dirty = Some(match of.dirty {
                        Some((a, b)) => (a.min(start), b.max(end)),
                        None => (start, end),
                    });
                    return Ok(());
                }
            }
            std::os::unix::fs::FileExt::write_all_at(&of.file, data, offset)
        })
    }

    fn set_len(&self, name: &str, len: u64) -> io::Result<()> {
        self.with_file(name, |of| {
            // Flush and drop the map before resizing, so no mapped page outlives the file's end.
            if let (Some(map), Some((a, b))) = (of.map.as_ref(), of.dirty) {
                map.flush_range(a, b - a)?;
            }
            of.map = None;
            of.ro_map = None;
            of.dirty = None;
            of.file.set_len(len)?;
            self.remap(of, name)
        })
    }

    fn sync(&self, name: &str) -> io::Result<()> {
        self.with_file(name, |of| {
            if let (Some(map), Some((a, b))) = (of.map.as_ref(), of.dirty) {
                map.flush_range(a, b - a)?;
            }
            of.dirty = None;
            of.file.sync_all()
        })
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
