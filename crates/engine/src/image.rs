//! Raw disk images as persistent address spaces: page *n* of an image is the page at offset
//! `n × page size`. A snapshot of an image persists the pages whose content changed since the
//! store's previous snapshot — the dirty pages, found by hashing the image against the parent's
//! index — so an incremental snapshot writes O(changed) bytes. Reading and hashing use every core
//! and never hold more than one batch of the image in memory.
//!
//! # Holes
//!
//! Only the image's data is read. After the first `fstat`, the snapshot walks the file with
//! `lseek(SEEK_DATA)` / `lseek(SEEK_HOLE)`; each data extent is aligned outward to whole pages and
//! read as before, and the pages of a hole are zero pages without a read: the pages the parent
//! snapshot stored there are removed, found through the parent's index for just that range (the
//! cost is the parent's pages there, not the hole's length). A page read as all zero bytes is a
//! hole page too, without a hash. Where the file system does not support `SEEK_DATA` (`EINVAL`,
//! `EOPNOTSUPP`), or on systems without it, the rest of the image is read whole. So a snapshot of a
//! sparse image costs what the image holds, and [`ImageSnapshot::pages_read`] counts the pages
//! actually read. A write that moves a hole during the read is caught like any other (below).
//!
//! # An image written during a snapshot
//!
//! The image is read through one open descriptor, and the snapshot commits only if the file did
//! not change while it was read. What is compared, from `fstat` of that descriptor just before the
//! first read and just before the commit: device, inode, size, modification time and status-change
//! time (`ctime`), both to the nanosecond; and the path must still name the same device and inode.
//! Any difference refuses the snapshot ([`ImageError::Changed`], naming the image) and commits
//! nothing.
//!
//! What that promises. Every write to the file sets its `ctime`, and no user can set `ctime` (a
//! user can set `mtime`, e.g. `touch -d` or `File::set_modified`, but that sets `ctime` too): only
//! changing the system clock can. So a write made through the image's inode between the two
//! `fstat`s is caught, unless the clock was set back meanwhile. Timestamps have the file system's
//! granularity — on Linux before 6.13, or on file systems without fine-grained ("multigrain")
//! timestamps, a coarse clock tick of a few milliseconds, within which two changes can carry the
//! same `ctime` — so the snapshot first waits until the image's `ctime` is at least
//! [`SETTLE`] old (an image still being written for longer than [`SETTLE_LIMIT`] is refused):
//! then a write after the first `fstat` lands in a later tick and moves `ctime`.
//!
//! Not caught: a change made through a different inode that the path does not name at the end
//! (nothing of it is in the bytes read anyway); a change with the clock set back; and stores
//! through a shared memory map (`MAP_SHARED`) of the image into pages already dirty and writable,
//! which the kernel does not timestamp (a virtual machine whose disk image is memory-mapped by a
//! running hypervisor writes that way). Such an image must be quiesced first: stop or pause the
//! writer (or snapshot a reflink copy), as for any copy of a live disk. Not part of
//! this snapshot: whatever a writer writes after the final `fstat` (a writer that keeps the file
//! open may write then; that write is in the next snapshot, not this one). A snapshot of an image
//! that is being written is therefore either refused or a copy of the file as it was, unchanged,
//! for the whole read.

use pagesnap_store::{Epoch, SnapshotId, SnapshotMeta, Store, StoreError, Vpn};
use rayon::prelude::*;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// How old the image's last change (`ctime`) must be before a snapshot starts reading it: longer
/// than any file-system timestamp tick, so that a later write moves `ctime`.
pub const SETTLE: Duration = Duration::from_millis(50);
/// How long a snapshot waits for an image that keeps changing before refusing it.
pub const SETTLE_LIMIT: Duration = Duration::from_secs(2);

/// Pages read and hashed per batch (4 MiB of 4 KiB pages).
const BATCH_PAGES: u64 = 1024;

/// Errors of image snapshots and restores.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// The image (or output) file failed.
    #[error("{}: {step} failed: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        step: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Not a regular file.
    #[error("{} is not a regular file; pagesnap snapshots raw disk images (regular files)", .0.display())]
    NotAFile(PathBuf),
    /// The image changed while it was read (or kept changing before the read could start).
    #[error("{} changed while it was being read for a snapshot (its size, modification or status-change time, or the file the path names); nothing was committed — stop whatever writes to it and retry", .0.display())]
    Changed(PathBuf),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn io_err(path: &Path, step: &'static str) -> impl FnOnce(io::Error) -> ImageError {
    let path = path.to_path_buf();
    move |source| ImageError::Io { path, step, source }
}

/// What an image snapshot did.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageSnapshot {
    /// The new snapshot.
    pub id: SnapshotId,
    /// The image's size in bytes.
    pub image_size: u64,
    /// Pages read from the image: its data extents, whole pages; holes are not read (all pages
    /// where the file system cannot report holes).
    pub pages_read: u64,
    /// Pages whose content differs from the previous snapshot's.
    pub pages_changed: u64,
    /// New page records written (content not already in the store).
    pub pages_written: u64,
    /// Bytes of page records written.
    pub data_bytes: u64,
    /// Bytes of metadata written.
    pub meta_bytes: u64,
    /// Wall time.
    pub seconds: f64,
}

/// What must not change while an image is read: its identity, size and times (`fstat` of the open
/// descriptor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// How long ago the file last changed (zero if its `ctime` is in the future).
    fn age(&self) -> Duration {
        let ctime = if self.ctime.0 >= 0 {
            SystemTime::UNIX_EPOCH
                + Duration::new(
                    self.ctime.0.unsigned_abs(),
                    self.ctime.1.clamp(0, 999_999_999) as u32,
                )
        } else {
            SystemTime::UNIX_EPOCH
        };
        SystemTime::now()
            .duration_since(ctime)
            .unwrap_or(Duration::ZERO)
    }
}

fn fstat(file: &File, path: &Path) -> Result<Stamp, ImageError> {
    let m = file.metadata().map_err(io_err(path, "stat image"))?;
    if !m.is_file() {
        return Err(ImageError::NotAFile(path.to_path_buf()));
    }
    Ok(Stamp::of(&m))
}

/// Opens the image and waits until its last change is [`SETTLE`] old; the stamp to compare with.
fn open_settled(path: &Path) -> Result<(File, Stamp), ImageError> {
    // By path first: opening a FIFO or a device is not something to do by accident.
    let m = std::fs::metadata(path).map_err(io_err(path, "stat image"))?;
    if !m.is_file() {
        return Err(ImageError::NotAFile(path.to_path_buf()));
    }
    let file = File::open(path).map_err(io_err(path, "open image"))?;
    let started = Instant::now();
    loop {
        let stamp = fstat(&file, path)?;
        let age = stamp.age();
        if age >= SETTLE {
            return Ok((file, stamp));
        }
        if started.elapsed() >= SETTLE_LIMIT {
            return Err(ImageError::Changed(path.to_path_buf()));
        }
        // Not a wait for a test: a change within one timestamp tick of the next could leave
        // `ctime` unchanged, so reading starts only once the last change is older than a tick.
        std::thread::sleep(SETTLE - age);
    }
}

/// Refuses the snapshot if the image changed since `before` or the path names another file now.
fn unchanged(file: &File, path: &Path, before: &Stamp) -> Result<(), ImageError> {
    let after = fstat(file, path)?;
    let named = std::fs::metadata(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            ImageError::Changed(path.to_path_buf())
        } else {
            io_err(path, "stat image")(e)
        }
    })?;
    if after != *before || (named.dev(), named.ino()) != (before.dev, before.ino) {
        return Err(ImageError::Changed(path.to_path_buf()));
    }
    Ok(())
}

/// How a snapshot finds the image's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holes {
    /// `lseek(SEEK_DATA)` / `lseek(SEEK_HOLE)`, falling back to [`Holes::ReadAll`] where the file
    /// system does not support them.
    Seek,
    /// Every page is read.
    ReadAll,
}

/// `lseek(fd, from, whence)` on the image's descriptor: the offset it returns.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn seek(file: &File, from: u64, whence: libc::c_int) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    let from =
        libc::off_t::try_from(from).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `lseek` takes no pointers; it only reads and moves the file offset of a descriptor
    // that `file` owns and keeps open for this call. Reads use `pread`, which ignores that offset.
    let at = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
    u64::try_from(at).map_err(|_| io::Error::last_os_error())
}

/// Whether an `lseek(SEEK_DATA / SEEK_HOLE)` error means "not supported here" (read everything).
#[cfg(any(target_os = "linux", target_os = "android"))]
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS)
    )
}

/// The data extents of the image, in pages, in ascending order and disjoint: each extent found
/// with `SEEK_DATA` / `SEEK_HOLE`, aligned outward to whole pages. Where the file system cannot
/// say (or on systems without `SEEK_DATA`), the rest of the image is one extent.
struct Extents<'a> {
    file: &'a File,
    path: &'a Path,
    size: u64,
    ps: u64,
    /// Bytes before this offset have been handed out (always a page boundary).
    at: u64,
    holes: Holes,
}

impl Extents<'_> {
    fn next(&mut self) -> Result<Option<std::ops::Range<u64>>, ImageError> {
        let (size, ps) = (self.size, self.ps);
        if self.at >= size {
            return Ok(None);
        }
        if self.holes == Holes::Seek {
            match self.next_data() {
                Ok(found) => return Ok(found),
                Err(e) if unsupported(&e) => self.holes = Holes::ReadAll,
                Err(e) => return Err(io_err(self.path, "find the data in image (lseek)")(e)),
            }
        }
        let all = self.at / ps..size.div_ceil(ps);
        self.at = size;
        Ok(Some(all))
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn next_data(&mut self) -> io::Result<Option<std::ops::Range<u64>>> {
        let (size, ps) = (self.size, self.ps);
        let data = match seek(self.file, self.at, libc::SEEK_DATA) {
            Ok(d) => d,
            // No data at or after `at`: the rest is a hole.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => size,
            Err(e) => return Err(e),
        };
        if data >= size {
            self.at = size;
            return Ok(None);
        }
        let hole = match seek(self.file, data, libc::SEEK_HOLE) {
            Ok(h) => h.min(size),
            // The file shrank under us: the read then fails and the snapshot is refused.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => size,
            Err(e) => return Err(e),
        };
        let first = data / ps;
        let end = hole.div_ceil(ps).max(first + 1);
        self.at = end * ps;
        Ok(Some(first..end))
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    fn next_data(&mut self) -> io::Result<Option<std::ops::Range<u64>>> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn unsupported(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Unsupported
}

/// Whether a page is all zero bytes (64 bytes at a time, so the compiler vectorizes it, and a
/// data page is rejected after its first 64 bytes).
fn is_zero(page: &[u8]) -> bool {
    page.chunks(64)
        .all(|c| c.iter().fold(0u8, |a, b| a | b) == 0)
}

/// Snapshots the raw image at `path` into `store` (opened as the writer), on top of the store's
/// newest snapshot. `progress` is called with the bytes of the image done so far (read, or
/// skipped as holes). Refused, with nothing committed, if the image changes while it is read (see
/// the module documentation for exactly what is detected).
///
/// Only the image's data is read: holes are found with `lseek(SEEK_DATA / SEEK_HOLE)` (extents
/// aligned outward to whole pages) and are zero pages without a read; a page the parent snapshot
/// stored that now lies in a hole is removed. Where the file system cannot report holes, every page
/// is read. A page read as all zeros is a hole page too (no hash). [`ImageSnapshot::pages_read`]
/// counts the pages read.
pub fn snapshot_image(
    store: &mut Store,
    path: &Path,
    label: Option<String>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<ImageSnapshot, ImageError> {
    snapshot_with(store, path, label, progress, Holes::Seek)
}

fn snapshot_with(
    store: &mut Store,
    path: &Path,
    label: Option<String>,
    progress: &(dyn Fn(u64) + Sync),
    holes: Holes,
) -> Result<ImageSnapshot, ImageError> {
    let started = Instant::now();
    let (file, before) = open_settled(path)?;
    let size = before.size;
    let ps = u64::from(store.page_size());
    let parent = store.latest()?;
    let epoch = store
        .snapshots()?
        .iter()
        .map(|s| s.epoch)
        .max()
        .unwrap_or(Epoch(0))
        .next();
    let pages = size.div_ceil(ps);
    store.begin(parent)?;
    let result = (|| {
        let mut run = Run {
            store: &mut *store,
            file: &file,
            path,
            size,
            ps,
            parent,
            buf: vec![0u8; (BATCH_PAGES * ps) as usize],
            batch: Vec::new(),
            batch_pages: 0,
            read: 0,
            changed: 0,
        };
        // The extent map is taken after the first `fstat` (in `open_settled`), while reading.
        let mut extents = Extents {
            file: &file,
            path,
            size,
            ps,
            at: 0,
            holes,
        };
        let mut done = 0u64; // pages before this one are handled (or in the pending batch)
        while let Some(extent) = extents.next()? {
            if extent.start > done {
                run.hole(done..extent.start)?;
            }
            let mut first = extent.start;
            while first < extent.end {
                let n = (BATCH_PAGES - run.batch_pages).min(extent.end - first);
                run.batch.push(first..first + n);
                run.batch_pages += n;
                first += n;
                if run.batch_pages == BATCH_PAGES {
                    run.flush()?;
                    progress((first * ps).min(size));
                }
            }
            done = extent.end;
        }
        run.flush()?;
        // The holes at the end, and the pages past a shrunken image's end: all gone.
        run.hole(done..u64::MAX)?;
        progress(size);
        let (read, changed) = (run.read, run.changed);
        debug_assert!(read <= pages);
        unchanged(&file, path, &before)?;
        let meta = SnapshotMeta {
            epoch,
            label,
            logical_size: size,
            time_unix_ms: None,
            origin: None,
        };
        let report = store.commit(meta)?;
        Ok(ImageSnapshot {
            id: report.id,
            image_size: size,
            pages_read: read,
            pages_changed: changed,
            pages_written: report.pages_written,
            data_bytes: report.data_bytes,
            meta_bytes: report.meta_bytes,
            seconds: started.elapsed().as_secs_f64(),
        })
    })();
    if result.is_err() {
        store.abort();
    }
    result
}

/// The state of one snapshot's pass over its image.
struct Run<'a> {
    store: &'a mut Store,
    file: &'a File,
    path: &'a Path,
    size: u64,
    ps: u64,
    parent: Option<SnapshotId>,
    /// One batch of pages read.
    buf: Vec<u8>,
    /// Page ranges of data to read, at most [`BATCH_PAGES`] pages in all.
    batch: Vec<std::ops::Range<u64>>,
    batch_pages: u64,
    /// Pages read from the image.
    read: u64,
    /// Pages that differ from the parent's.
    changed: u64,
}

impl Run<'_> {
    /// Pages `range` are a hole: every page the parent stored there is removed (the cost is the
    /// parent's pages in the range, not the range's length).
    fn hole(&mut self, range: std::ops::Range<u64>) -> Result<(), ImageError> {
        let Some(p) = self.parent else {
            return Ok(());
        };
        let mut gone = Vec::new();
        self.store
            .for_each_page_in(p, Vpn(range.start)..Vpn(range.end), |v, _| {
                gone.push(v);
                Ok(())
            })?;
        self.changed += gone.len() as u64;
        for v in gone {
            self.store.remove(v)?;
        }
        Ok(())
    }

    /// Reads the pending batch, hashes its non-zero pages on every core, and puts or removes the
    /// pages that differ from the parent's.
    fn flush(&mut self) -> Result<(), ImageError> {
        let ps = self.ps;
        let (size, path) = (self.size, self.path);
        let mut off = 0usize;
        for r in &self.batch {
            let (at, want) = (r.start * ps, ((r.end - r.start) * ps) as usize);
            // Only the image's last page can be partial; the rest of it is zero.
            let bytes = (size.saturating_sub(at) as usize).min(want);
            self.buf[off + bytes..off + want].fill(0);
            self.file
                .read_exact_at(&mut self.buf[off..off + bytes], at)
                .map_err(|e| {
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        ImageError::Changed(path.to_path_buf())
                    } else {
                        io_err(path, "read image")(e)
                    }
                })?;
            off += want;
        }
        let hashes: Vec<Option<[u8; 32]>> = self.buf[..off]
            .par_chunks(ps as usize)
            .map(|page| (!is_zero(page)).then(|| *blake3::hash(page).as_bytes()))
            .collect();
        let mut i = 0usize;
        for r in std::mem::take(&mut self.batch) {
            let mut old: HashMap<u64, [u8; 32]> = HashMap::new();
            if let Some(p) = self.parent {
                self.store
                    .for_each_page_in(p, Vpn(r.start)..Vpn(r.end), |v, rf| {
                        old.insert(v.0, rf.hash);
                        Ok(())
                    })?;
            }
            for vpn in r {
                let new = &hashes[i];
                let page = &self.buf[i * ps as usize..(i + 1) * ps as usize];
                i += 1;
                if old.get(&vpn) == new.as_ref() {
                    continue;
                }
                self.changed += 1;
                match new {
                    Some(h) => self.store.put_hashed(Vpn(vpn), page, *h)?,
                    None => self.store.remove(Vpn(vpn))?,
                }
            }
        }
        self.read += self.batch_pages;
        self.batch_pages = 0;
        Ok(())
    }
}

/// What a restore did.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageRestore {
    /// Bytes of the image written (its logical size).
    pub image_size: u64,
    /// Non-zero pages written; the rest are holes.
    pub pages_written: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Writes snapshot `id` as a raw image at `output`: exactly the snapshot's length, byte for byte,
/// sparse where pages are zero. Every page is checked (crc32, blake3) before it is written; the
/// image is built in a temporary file beside `output` and renamed into place only when complete.
pub fn restore_image(
    store: &Store,
    id: SnapshotId,
    output: &Path,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<ImageRestore, ImageError> {
    let started = Instant::now();
    let info = store.snapshot(id)?;
    let size = info.logical_size;
    let ps = u64::from(info.page_size);
    let dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let tmp = dir.join(format!(".{name}.pagesnap-{}.tmp", std::process::id()));
    let result = (|| {
        let file = File::create(&tmp).map_err(io_err(&tmp, "create output"))?;
        file.set_len(size).map_err(io_err(&tmp, "size output"))?;
        let pages = size.div_ceil(ps);
        let mut written = 0u64;
        let mut first = 0u64;
        while first < pages {
            let n = BATCH_PAGES.min(pages - first);
            let mut refs = Vec::new();
            store.for_each_page_in(id, Vpn(first)..Vpn(first + n), |v, r| {
                refs.push((v, *r));
                Ok(())
            })?;
            let contents: Vec<(u64, Vec<u8>)> = refs
                .par_iter()
                .map(|(v, r)| store.read_ref(r).map(|c| (v.0, c)))
                .collect::<Result<_, _>>()?;
            for (vpn, content) in &contents {
                let at = vpn * ps;
                let len = (size.saturating_sub(at)).min(ps) as usize;
                file.write_all_at(&content[..len], at)
                    .map_err(io_err(&tmp, "write output"))?;
            }
            written += contents.len() as u64;
            first += n;
            progress((first * ps).min(size));
        }
        file.sync_all().map_err(io_err(&tmp, "sync output"))?;
        std::fs::rename(&tmp, output).map_err(io_err(output, "rename output into place"))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir, "sync output directory"))?;
        Ok(ImageRestore {
            image_size: size,
            pages_written: written,
            seconds: started.elapsed().as_secs_f64(),
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagesnap_store::StoreOptions;

    /// A 64 MiB sparse image: 1 MiB of data at 4 MiB + 10 (so 257 pages), 100 bytes at the end.
    fn sparse(dir: &Path) -> PathBuf {
        let path = dir.join("sparse.img");
        let f = File::create(&path).expect("create");
        f.set_len(64 << 20).expect("size");
        f.write_all_at(&vec![7u8; 1 << 20], (4 << 20) + 10)
            .expect("write");
        f.write_all_at(&[9u8; 100], (64 << 20) - 100)
            .expect("write");
        path
    }

    #[test]
    fn extents_are_the_data_aligned_outward_to_pages() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = sparse(dir.path());
        let file = File::open(&path).expect("open");
        let mut ext = Extents {
            file: &file,
            path: &path,
            size: 64 << 20,
            ps: 4096,
            at: 0,
            holes: Holes::Seek,
        };
        let mut got = Vec::new();
        while let Some(r) = ext.next().expect("extents") {
            got.push(r);
        }
        assert_eq!(got, vec![1024..1281, 16383..16384]);
    }

    #[test]
    fn without_seek_data_every_page_is_read_and_the_snapshot_is_the_same() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = sparse(dir.path());
        let mut pages = Vec::new();
        for holes in [Holes::Seek, Holes::ReadAll] {
            let store_dir = dir.path().join(format!("{holes:?}"));
            let mut store = Store::init(&store_dir, StoreOptions::default()).expect("store");
            let snap = snapshot_with(&mut store, &path, None, &|_| {}, holes).expect("snapshot");
            let want_read = if holes == Holes::Seek { 258 } else { 16384 };
            assert_eq!((snap.pages_read, snap.pages_changed), (want_read, 258));
            let mut stored = Vec::new();
            store
                .for_each_page_in(snap.id, Vpn(0)..Vpn(u64::MAX), |v, r| {
                    stored.push((v.0, r.hash));
                    Ok(())
                })
                .expect("walk");
            pages.push(stored);
            let out = dir.path().join(format!("{holes:?}.img"));
            restore_image(&store, snap.id, &out, &|_| {}).expect("restore");
            assert!(std::fs::read(&out).expect("read") == std::fs::read(&path).expect("read"));
        }
        assert_eq!(pages[0], pages[1], "the same pages either way");
    }
}
