//! The one I/O seam: every file operation of the store goes through [`Storage`]. Two
//! implementations: [`FsStorage`] (std::fs, positioned reads and writes) and
//! [`crate::fault::FaultyStorage`] (in memory, fails or crashes on demand).
//!
//! Names are file names inside the store directory; there are no subdirectories.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// [`Storage::read`] of a record that is index or catalog (a page-map chunk, a commit
    /// record), not page data: a backend far away may keep these in a local cache. The default
    /// is [`Storage::read`].
    fn read_meta(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read(name, offset, buf)
    }
    /// Writes `data` at `offset`, growing the file if needed. Not durable until [`Storage::sync`].
    fn write(&self, name: &str, offset: u64, data: &[u8]) -> io::Result<()>;
    /// [`Storage::write`] of a large append: whole blocks of a segment, written in ascending
    /// order of offset. A backend may keep such writes from piling up in the page cache
    /// ([`FsStorage`] makes their writeback wait for the device a few megabytes behind, or writes
    /// past the cache with `O_DIRECT` when asked). The caller passes `offset`, `data.len()` and
    /// `data`'s address as multiples of [`DIRECT_ALIGN`]. Not durable until [`Storage::sync`].
    /// The default is [`Storage::write`].
    fn write_bulk(&self, name: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write(name, offset, data)
    }
    /// Whether [`Storage::write_bulk`] waits for the device, so that appends gain from being
    /// handed to a writer thread (the store then writes whole blocks from a second thread, in
    /// order; see `store/buffer.rs`). The default, `false`, keeps every write on the caller's
    /// thread.
    fn write_behind(&self) -> bool {
        false
    }
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

/// The alignment [`Storage::write_bulk`] asks of offsets, lengths and buffers: a block of every
/// device in use (logical blocks are 512 or 4096 bytes).
pub const DIRECT_ALIGN: usize = 4096;

/// The real backend: `std::fs` on a directory. Reads and writes are positioned (`pread`,
/// `pwrite`) on file handles shared between threads: no lock is held while the kernel copies, so
/// readers run in parallel, and a failed read is an `io::Error` (a memory map would turn it into
/// SIGBUS).
#[derive(Debug)]
pub struct FsStorage {
    dir: PathBuf,
    writable: bool,
    files: Mutex<HashMap<String, Arc<File>>>,
    /// The file last opened with `O_DIRECT`, for [`Storage::write_bulk`] (the writer appends
    /// to one segment at a time: one descriptor, not one per segment ever written).
    direct: Mutex<Option<(String, Arc<File>)>>,
    /// Bulk writes go past the page cache (`PAGESNAP_DIRECT_IO=1`); cleared when the file
    /// system refuses direct I/O. Otherwise they go through the cache with a bounded writeback.
    direct_ok: AtomicBool,
}

/// The writeback window of bulk appends through the page cache ([`FsStorage`]'s
/// [`Storage::write_bulk`]). Each bulk write starts its own writeback at once (so a small
/// commit's `fdatasync` finds its bytes on their way, as with direct writes); each time an append
/// fills a window of this many bytes (aligned in the file), the window before it is waited for
/// and dropped from the cache. The device thus has up to two windows queued, the commit's
/// `fdatasync` has at most two left to wait for, and a snapshot of any size keeps at most two
/// windows of each segment in the page cache instead of evicting the machine's cache.
pub const WRITEBACK_WINDOW: u64 = 8 << 20;

#[derive(Debug)]
struct FsLock(#[allow(dead_code)] File);
impl LockGuard for FsLock {}

impl FsStorage {
    /// A backend on `dir`; `writable` opens files for writing (the store's writer).
    /// Bulk appends go through the page cache with a bounded writeback, or past it with
    /// `O_DIRECT` where `PAGESNAP_DIRECT_IO=1` asks for it or the directory is on overlayfs (whose
    /// `sync_file_range` reaches no pages, so the writeback could not be bounded there).
    pub fn new(dir: impl Into<PathBuf>, writable: bool) -> Self {
        let dir = dir.into();
        // Only a writer makes bulk writes: a reader asks nothing of the file system.
        let direct = writable
            && (std::env::var_os("PAGESNAP_DIRECT_IO").is_some_and(|v| v == "1")
                || on_overlayfs(&dir));
        FsStorage {
            dir,
            writable,
            files: Mutex::new(HashMap::new()),
            direct: Mutex::new(None),
            direct_ok: AtomicBool::new(direct),
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

    fn direct_file_cache(&self) -> MutexGuard<'_, Option<(String, Arc<File>)>> {
        // As for `files`: only a cache.
        self.direct.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets the direct descriptor of `name` (removed, renamed or created anew).
    fn forget_direct(&self, name: &str) {
        let mut d = self.direct_file_cache();
        if d.as_ref().is_some_and(|(n, _)| n == name) {
            *d = None;
        }
    }

    /// `name` opened for direct writes, or `None` where direct I/O is not available.
    #[cfg(target_os = "linux")]
    fn direct_file(&self, name: &str) -> Option<Arc<File>> {
        use std::os::unix::fs::OpenOptionsExt;
        if !self.direct_ok.load(Ordering::Relaxed) {
            return None;
        }
        if let Some((_, f)) = self.direct_file_cache().as_ref().filter(|(n, _)| n == name) {
            return Some(f.clone());
        }
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(self.path(name))
        {
            Ok(f) => {
                let f = Arc::new(f);
                *self.direct_file_cache() = Some((name.to_string(), f.clone()));
                Some(f)
            }
            Err(e) => {
                // tmpfs before Linux 6.6 and some FUSE file systems refuse O_DIRECT (EINVAL):
                // the page cache serves from then on. Any other error (a missing file) is the
                // buffered write's to report.
                if e.raw_os_error() == Some(libc::EINVAL) {
                    self.direct_ok.store(false, Ordering::Relaxed);
                }
                None
            }
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn direct_file(&self, _name: &str) -> Option<Arc<File>> {
        None
    }

    /// Whether writes still try `O_DIRECT` (for tests).
    #[doc(hidden)]
    pub fn direct_io(&self) -> bool {
        self.direct_ok.load(Ordering::Relaxed)
    }

    /// Asks for bulk writes past the page cache (as `PAGESNAP_DIRECT_IO=1` does; for tests and
    /// benchmarks).
    #[doc(hidden)]
    pub fn with_direct_io(self, on: bool) -> Self {
        self.direct_ok.store(on && self.writable, Ordering::Relaxed);
        self
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
        self.forget_direct(name);
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

    fn write_bulk(&self, name: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        let aligned = offset.is_multiple_of(DIRECT_ALIGN as u64)
            && data.len().is_multiple_of(DIRECT_ALIGN)
            && (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN);
        if let Some(file) = self.direct_file(name).filter(|_| aligned) {
            match std::os::unix::fs::FileExt::write_all_at(&*file, data, offset) {
                Ok(()) => return Ok(()),
                // Alignment the device refuses (a block larger than DIRECT_ALIGN): no more
                // direct writes; this one goes through the cache.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct_ok.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        let file = self.file(name)?;
        std::os::unix::fs::FileExt::write_all_at(&*file, data, offset)?;
        start_writeback(&file, offset, data.len() as u64)?;
        let end = offset.saturating_add(data.len() as u64);
        // Every window boundary the write crossed (one, for the writer's megabyte writes).
        for boundary in offset / WRITEBACK_WINDOW + 1..=end / WRITEBACK_WINDOW {
            bound_writeback(&file, boundary * WRITEBACK_WINDOW)?;
        }
        Ok(())
    }

    fn write_behind(&self) -> bool {
        cfg!(target_os = "linux")
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

    fn start_writeback(&self, name: &str, offset: u64, len: u64) -> io::Result<()> {
        start_writeback(&*self.file(name)?, offset, len)
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut files = self.files();
        files.remove(from);
        files.remove(to);
        self.forget_direct(from);
        self.forget_direct(to);
        std::fs::rename(self.path(from), self.path(to))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.files().remove(name);
        self.forget_direct(name);
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

/// An append through the page cache filled the window that ends at `end` (a multiple of
/// [`WRITEBACK_WINDOW`]), whose writeback has started: waits for the window before it and drops
/// that one from the cache. A failed wait is an error, whatever its errno: the kernel reports a
/// writeback error to one waiter of a file description, so the commit's `fdatasync` would not
/// see it again, and the commit that appended these bytes must fail instead (its writes are then
/// redone from the last commit's end). Nothing elsewhere than Linux: the commit's sync does it
/// all.
fn bound_writeback(file: &File, end: u64) -> io::Result<()> {
    let Some(before) = end.checked_sub(2 * WRITEBACK_WINDOW) else {
        return Ok(());
    };
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let wait = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        if !sync_range(file, before, WRITEBACK_WINDOW, wait)? {
            return Ok(());
        }
        // Both fit an off64_t: `sync_range` took them.
        let (off, n) = (before as libc::off64_t, WRITEBACK_WINDOW as libc::off64_t);
        // SAFETY: `file` is borrowed, so its descriptor stays open for the call, and
        // posix_fadvise reads and writes no memory of ours. DONTNEED drops the range's clean
        // pages that nothing maps or locks (after the wait above, every page of the range has
        // been written back: clean). Advice: a failure costs memory only, and is ignored.
        let _ = unsafe { libc::posix_fadvise(file.as_raw_fd(), off, n, libc::POSIX_FADV_DONTNEED) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, before);
    Ok(())
}

/// `sync_file_range(file, offset, len, flags)`: `Ok(true)` when done, `Ok(false)` where it cannot
/// be called. The call is first made with no flags, which only checks its arguments and takes no
/// writeback error from the file (ENOSYS on a kernel without it, EPERM or EACCES under a filter
/// that forbids it, ESPIPE on a descriptor it does not take, EINVAL for a range that overflows):
/// any error there means only that the early writeback is lost, the commit's sync doing all the
/// writing. Once the call exists, every error of the real one is returned as is: EINVAL or
/// EOPNOTSUPP then come from a file system's writeback (FUSE, NFS), and a wait has taken them from
/// the file. Also `Ok(false)` for a range past what the call can name.
#[cfg(target_os = "linux")]
fn sync_range(file: &File, offset: u64, len: u64, flags: libc::c_uint) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (
        libc::off64_t::try_from(offset),
        libc::off64_t::try_from(len),
    ) else {
        return Ok(false);
    };
    // SAFETY: `file` is borrowed, so its descriptor stays open for the call; sync_file_range
    // reads and writes no memory of ours, and with no flags only checks its arguments.
    if unsafe { libc::sync_file_range(file.as_raw_fd(), off, n, 0) } != 0 {
        return Ok(false);
    }
    // SAFETY: as above; with flags the kernel defines it starts the range's writeback and, with
    // the WAIT flags, waits for it.
    if unsafe { libc::sync_file_range(file.as_raw_fd(), off, n, flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}

/// Whether `dir` is on overlayfs (Docker's usual file system), where `sync_file_range` acts on the
/// overlay's own mapping, which holds none of the file's pages: nothing would be started, waited
/// for or dropped.
#[allow(clippy::useless_conversion)] // the magic's type differs between targets
fn on_overlayfs(dir: &Path) -> bool {
    fs_type(dir) == Some(i64::from(libc::OVERLAYFS_SUPER_MAGIC))
}

/// The file system type (`statfs`'s `f_type`) of `path`; `None` if it cannot be told.
#[cfg(target_os = "linux")]
#[allow(clippy::useless_conversion)] // `f_type`'s type differs between targets
fn fs_type(path: &Path) -> Option<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: `statfs` is a struct of plain integers: all zero is a valid value.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs writes one `statfs` into `fs`, for a NUL-terminated path that outlives the
    // call.
    if unsafe { libc::statfs(c.as_ptr(), &mut fs) } != 0 {
        return None;
    }
    Some(i64::from(fs.f_type))
}

#[cfg(not(target_os = "linux"))]
fn fs_type(_path: &Path) -> Option<i64> {
    None
}

/// Starts writing `len` bytes of `file` at `offset` to the device without waiting
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)` on Linux; nothing elsewhere, nor where the call is
/// not available), so that a sync that follows has less left to wait for. It promises no
/// durability; an error it returns is the file system's (a writeback it could not start), and a
/// bulk write that asked for it fails. A `len` of 0 does nothing (to the kernel it would mean "to
/// the end of the file").
pub fn start_writeback(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    #[cfg(target_os = "linux")]
    sync_range(file, offset, len, libc::SYNC_FILE_RANGE_WRITE)?;
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Starting writeback (`sync_range` with the write flag): a written range succeeds, a range
    /// past what the call can name is skipped, and a missing file is an error.
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

    /// A descriptor `sync_file_range` does not take (a pipe: ESPIPE from the probe) is "not
    /// available": nothing is started or waited for, and no error.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_descriptor_without_sync_file_range_is_skipped() {
        let (reader, _writer) = std::io::pipe().expect("pipe");
        let file = File::from(std::os::fd::OwnedFd::from(reader));
        assert!(!sync_range(&file, 0, 4096, libc::SYNC_FILE_RANGE_WRITE).expect("skipped"));
        start_writeback(&file, 0, 4096).expect("skipped");
        bound_writeback(&file, 2 * WRITEBACK_WINDOW).expect("skipped");
    }

    /// Bulk appends through the page cache: every byte reads back across window boundaries, and
    /// the windows the append has gone two past are out of the cache (where the file system
    /// caches: tmpfs has no writeback to wait for and keeps every page).
    #[test]
    fn bulk_appends_read_back_and_leave_the_cache() {
        let dir = tempfile::tempdir().expect("tmp");
        let io = FsStorage::new(dir.path(), true).with_direct_io(false);
        io.create("seg").expect("create");
        let window = WRITEBACK_WINDOW as usize;
        let mib = 1 << 20;
        let total = 3 * window + window / 2;
        let mut block = rkyv::util::AlignedVec::<DIRECT_ALIGN>::with_capacity(mib);
        for k in 0..total / mib {
            block.clear();
            block.extend_from_slice(&vec![k as u8 + 1; mib]);
            io.write_bulk("seg", (k * mib) as u64, &block)
                .expect("bulk write");
        }
        let resident = resident_pages(&dir.path().join("seg"), 2 * window);
        io.sync_data("seg").expect("sync");
        let mut back = vec![0u8; total];
        io.read("seg", 0, &mut back).expect("read");
        for (k, chunk) in back.chunks(mib).enumerate() {
            assert!(chunk.iter().all(|b| *b == k as u8 + 1), "megabyte {k}");
        }
        if let Some(resident) = resident {
            println!("pages of the first two windows still cached: {resident}");
            assert!(
                resident <= 2 * window / 4096 / 16,
                "{resident} pages of the first two windows are still cached"
            );
        }
        // A missing file is an error, never a silent drop.
        assert!(io.write_bulk("missing", 0, &block[..4096]).is_err());
    }

    /// On overlayfs (a container's file system), where the writeback cannot be bounded, a store
    /// writes its bulk appends past the page cache by default: they read back, and none of them
    /// stays in the cache. Needs root to mount an overlay; says so and returns without it.
    #[cfg(target_os = "linux")]
    #[test]
    fn bulk_appends_on_overlayfs_stay_out_of_the_cache() {
        let base = tempfile::tempdir().expect("tmp");
        let p = |s: &str| base.path().join(s);
        for d in ["lower", "upper", "work", "merged"] {
            std::fs::create_dir(p(d)).expect("mkdir");
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            p("lower").display(),
            p("upper").display(),
            p("work").display()
        );
        let mounted = std::process::Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(p("merged"))
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            println!("no overlay mount here (needs root): skipped");
            return;
        }
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(&self.0)
                    .status();
            }
        }
        let _unmount = Unmount(p("merged"));
        assert!(
            on_overlayfs(&p("merged")),
            "the mount is not seen as overlayfs"
        );
        let io = FsStorage::new(p("merged"), true);
        assert!(
            io.direct_io(),
            "a store on overlayfs does not ask for direct writes"
        );
        io.create("seg").expect("create");
        let mib = 1 << 20;
        let mut block = rkyv::util::AlignedVec::<DIRECT_ALIGN>::with_capacity(mib);
        block.extend_from_slice(&vec![7u8; mib]);
        for k in 0..24u64 {
            io.write_bulk("seg", k * mib as u64, &block)
                .expect("bulk write");
        }
        io.sync_data("seg").expect("sync");
        if !io.direct_io() {
            println!("O_DIRECT refused on this overlay: the cache serves (unbounded)");
            return;
        }
        // The upper file holds the pages; an overlay file's own mapping holds none.
        let resident = resident_pages(&p("upper").join("seg"), 24 * mib).unwrap_or(0);
        assert_eq!(
            resident, 0,
            "{resident} pages of direct writes are in the cache"
        );
        let mut back = vec![0u8; 24 * mib];
        io.read("seg", 0, &mut back).expect("read");
        assert!(back.iter().all(|b| *b == 7));
    }

    /// How many of the first `len` bytes' pages of `path` are in the page cache; `None` on
    /// tmpfs (its pages are the file), on overlayfs (its files' pages are the lower file
    /// system's) or where `mincore` is not available.
    #[allow(clippy::useless_conversion)] // the magics' types differ between targets
    fn resident_pages(path: &Path, len: usize) -> Option<usize> {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let file = File::open(path).expect("open");
            // SAFETY: sysconf has no preconditions.
            if unsafe { libc::sysconf(libc::_SC_PAGESIZE) } != 4096 {
                return None; // the count below is of 4 KiB pages
            }
            let kind = fs_type(path)?;
            if kind == i64::from(libc::TMPFS_MAGIC)
                || kind == i64::from(libc::OVERLAYFS_SUPER_MAGIC)
            {
                return None;
            }
            // SAFETY: a fresh shared read-only mapping of `len` bytes of an open file (at least
            // that long), unmapped below before the file closes; nothing reads through it.
            let map = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(map, libc::MAP_FAILED, "mmap");
            let mut vec = vec![0u8; len / 4096];
            // SAFETY: `map` is the mapping of `len` bytes made above and `vec` has one byte per
            // page of it (4 KiB pages: checked above).
            let rc = unsafe { libc::mincore(map, len, vec.as_mut_ptr()) };
            // SAFETY: the mapping made above, not used after this.
            unsafe { libc::munmap(map, len) };
            assert_eq!(rc, 0, "mincore");
            Some(vec.iter().filter(|b| **b & 1 == 1).count())
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = (path, len);
            None
        }
    }

    /// Bulk writes, through the cache and (asked for) past it: a block-aligned buffer goes past
    /// the cache where the file system allows it, anything unaligned through it; both read back,
    /// next to buffered writes in the blocks around them, and after a rename and a re-create of
    /// the name.
    #[test]
    fn direct_writes_read_back_beside_buffered_ones() {
        for direct in [false, true] {
            bulk_writes_read_back_beside_buffered_ones(direct);
        }
    }

    fn bulk_writes_read_back_beside_buffered_ones(direct: bool) {
        let dir = tempfile::tempdir().expect("tmp");
        let io = FsStorage::new(dir.path(), true).with_direct_io(direct);
        io.create("f").expect("create");
        io.set_len("f", 64 << 10).expect("size");
        let mut block = rkyv::util::AlignedVec::<DIRECT_ALIGN>::with_capacity(3 * DIRECT_ALIGN);
        block.extend_from_slice(&[5u8; 3 * DIRECT_ALIGN]);
        io.write("f", 100, &[1u8; 3996])
            .expect("head, through the cache");
        io.write_bulk("f", 4096, &block).expect("aligned");
        io.write("f", 4 * 4096, &[2u8; 10])
            .expect("tail, through the cache");
        // Unaligned offset, length or address: through the cache.
        io.write_bulk("f", 5 * 4096 + 1, &block[..4096])
            .expect("unaligned offset");
        io.write_bulk("f", 7 * 4096, &block[1..4097])
            .expect("unaligned address");
        io.sync_data("f").expect("sync");
        let mut back = vec![0u8; 8 * 4096 + 1];
        io.read("f", 0, &mut back).expect("read");
        assert!(back[..100].iter().all(|b| *b == 0));
        assert!(back[100..4096].iter().all(|b| *b == 1));
        assert!(back[4096..4 * 4096].iter().all(|b| *b == 5));
        assert!(back[4 * 4096..4 * 4096 + 10].iter().all(|b| *b == 2));
        assert!(back[5 * 4096 + 1..6 * 4096 + 1].iter().all(|b| *b == 5));
        assert!(back[7 * 4096..8 * 4096].iter().all(|b| *b == 5));
        println!(
            "asked {direct}, direct I/O on this file system: {}",
            io.direct_io()
        );
        // A renamed name and a new file of the old name: no stale direct handle writes the old.
        io.rename("f", "g").expect("rename");
        io.create("f").expect("create again");
        io.set_len("f", 16 << 10).expect("size");
        io.write_bulk("f", 4096, &block[..4096])
            .expect("direct, new file");
        let mut g = vec![0u8; 4096];
        io.read("g", 4096, &mut g).expect("read g");
        let mut f = vec![0u8; 4096];
        io.read("f", 4096, &mut f).expect("read f");
        assert!(g.iter().all(|b| *b == 5) && f.iter().all(|b| *b == 5));
        let before = io.direct_io();
        assert!(io.write_bulk("missing", 0, &block[..4096]).is_err());
        assert_eq!(
            io.direct_io(),
            before,
            "a missing file turned direct I/O off"
        );
    }
}
