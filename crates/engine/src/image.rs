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
//! Stores through a shared memory map (`MAP_SHARED`, as a hypervisor may map a disk image) are
//! timestamped by the kernel only at the first write fault on a clean page; a store into a page
//! already dirty and writable moves no time. So the snapshot writes the image back (`fsync`)
//! before it takes its first stamp: writeback cleans and write-protects the mapped pages, and any
//! later store faults and moves `ctime`. (On tmpfs there is no writeback: there such stores are
//! not caught, and the unchanged-image skip below is never used.)
//!
//! Not caught: a change made through a different inode that the path does not name at the end
//! (nothing of it is in the bytes read anyway); a change with the clock set back; shared-map
//! stores on tmpfs. A live disk is best quiesced first anyway: stop or pause the writer (or
//! snapshot a reflink copy), as for any copy of a live disk. Not part of
//! this snapshot: whatever a writer writes after the final `fstat` (a writer that keeps the file
//! open may write then; that write is in the next snapshot, not this one). A snapshot of an image
//! that is being written is therefore either refused or a copy of the file as it was, unchanged,
//! for the whole read.
//!
//! # Unchanged images
//!
//! Each snapshot of an image file records the file's identity in its origin
//! ([`SnapshotMeta::origin`]): `image v1 dev=… ino=… size=… mtime=…s.…ns ctime=…s.…ns settled=0|1
//! path=<canonical path>` — the `fstat` stamp above, whether it was settled (below), and the
//! canonical path, last since it may hold spaces. The next snapshot of the image compares its own
//! first `fstat` (after the [`SETTLE`] wait) with the parent snapshot's origin; if that parses and
//! device, inode, size, mtime and ctime (to the nanosecond) and the canonical path are all equal, it
//! commits a snapshot with exactly the parent's pages *without reading the image*
//! ([`ImageSnapshot::unchanged`], `pages_read` 0, `pages_changed` 0); the final `fstat` check still
//! runs. [`SnapshotOptions::reread`] (`pagesnap snapshot --reread`) reads anyway. An origin that
//! does not parse, or none (a snapshot of the engine's `Space`, of a block device, of a store
//! written before origins, or of a path that is not UTF-8 or too long to keep whole) means read.
//!
//! The rule: `ctime` cannot be set by users, so any write through the inode after the parent
//! snapshot moved it — putting `mtime` back (`touch -d`, `File::set_modified`) sets `ctime` too.
//! The parent's stamp was taken when its `ctime` was already at least [`SETTLE`] old, so a write
//! after that stamp lands in a later timestamp tick; the origin records this as `settled=1`, and
//! only a settled parent (and a settled current stamp) is trusted — a stamp taken within a tick of
//! the last change could miss a write in that same tick. It cannot be trusted, and is not relied
//! on, when:
//! - the clock was set back between the two snapshots (a write could get the old `ctime` back);
//! - the file system has no writeback (tmpfs): shared-map stores into dirty pages are never
//!   timestamped there, so tmpfs is always read (elsewhere the `fsync` above makes them fault);
//! - the file system does not keep `ctime` itself: FUSE and network file systems (NFS, SMB/CIFS,
//!   9P, Ceph, AFS, recognized by `fstatfs`) are always read; times whose nanosecond parts are both
//!   zero are taken as coarse (a file system keeping whole seconds, or no times) and are read;
//! - another path names the file: the canonical path must be the same (a symbolic link to the same
//!   file is the same path; a hard link is not, and is read).
//!
//! # Block devices
//!
//! `path` may be a block device (a disk, partition, loop or LVM device). Its size is where its end
//! is (`lseek(SEEK_END)` of the open descriptor); it is read whole (no `SEEK_DATA`); its identity
//! is never used to skip the read, since a device node's `ctime` does not follow writes to its
//! blocks. For the same reason changes during the read cannot be detected (only that the path
//! names another device, or the device's length changed): quiesce the device first — unmount it,
//! or freeze its file system (`fsfreeze --freeze`), or snapshot an LVM snapshot of it. A device
//! that fails, shrinks or goes away during the read is refused with [`ImageError::DeviceRead`],
//! nothing committed.

use pagesnap_store::{
    pagehash::HashedPages, Epoch, SnapshotId, SnapshotMeta, Store, StoreError, Vpn, MAX_LABEL,
};
use rayon::prelude::*;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// How old the image's last change (`ctime`) must be before a snapshot starts reading it: longer
/// than any file-system timestamp tick, so that a later write moves `ctime`.
pub const SETTLE: Duration = Duration::from_millis(50);
/// How long a snapshot waits for an image that keeps changing before refusing it.
pub const SETTLE_LIMIT: Duration = Duration::from_secs(2);

/// Pages read and hashed per batch (4 MiB of 4 KiB pages).
pub(crate) const BATCH_PAGES: u64 = 1024;

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
    /// Neither a regular file nor a block device.
    #[error("{} is not a regular file or a block device; pagesnap snapshots raw disk images (regular files) and block devices", .0.display())]
    NotAFile(PathBuf),
    /// Reading a block device failed or came up short: it went away, shrank or failed.
    #[error("{}: reading the block device failed ({source}); was it detached, removed or resized during the snapshot? nothing was committed", .path.display())]
    DeviceRead {
        /// The device.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The image changed while it was read (or kept changing before the read could start).
    #[error("{} changed while it was being read for a snapshot (its size, modification or status-change time, or the file the path names); nothing was committed — stop whatever writes to it and retry", .0.display())]
    Changed(PathBuf),
    /// `pagesnap serve` serves regular files only.
    #[error("{} is not a regular file; pagesnap serve serves raw disk images (regular files)", .0.display())]
    NotServable(PathBuf),
    /// Another process holds the image's lock (another `pagesnap serve` of it).
    #[error("{} is locked by another process (another `pagesnap serve` of it?); stop that one first", .0.display())]
    Busy(PathBuf),
    /// An image name that cannot be used (see [`crate::names::check_name`]): what is wrong and
    /// what to do.
    #[error("{0}")]
    BadName(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub(crate) fn io_err(path: &Path, step: &'static str) -> impl FnOnce(io::Error) -> ImageError {
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
    /// The image was not read: its identity (device, inode, size, mtime and ctime to the
    /// nanosecond, canonical path) is the one the parent snapshot recorded, so the snapshot has
    /// the parent's pages (see the module documentation, "Unchanged images").
    pub unchanged: bool,
}

/// How to take an image snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// Read the image even when its identity says it is unchanged since the parent snapshot.
    pub reread: bool,
    /// The image's name (see [`crate::names`]); `None`: [`crate::names::default_name`] of the
    /// path. The parent is the newest snapshot of this name.
    pub name: Option<String>,
}

/// What must not change while an image is read: its identity, size and times (`fstat` of the open
/// descriptor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) size: u64,
    pub(crate) mtime: (i64, i64),
    pub(crate) ctime: (i64, i64),
}

impl Stamp {
    pub(crate) fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// How long ago the file last changed (zero if its `ctime` is in the future).
    pub(crate) fn age(&self) -> Duration {
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

/// What a snapshot reads: a regular file, or a block device (read whole, changes not detected).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    File,
    Block,
}

fn fstat(file: &File, path: &Path, source: Source) -> Result<Stamp, ImageError> {
    let m = file.metadata().map_err(io_err(path, "stat image"))?;
    match source {
        Source::File if m.is_file() => Ok(Stamp::of(&m)),
        Source::Block if m.file_type().is_block_device() => {
            // A device's length is not in its `stat`: it is where its end is. Its node's times do
            // not follow writes to its blocks, so only its identity and length are compared.
            let mut f = file;
            let size = f
                .seek(SeekFrom::End(0))
                .map_err(|source| ImageError::DeviceRead {
                    path: path.to_path_buf(),
                    source,
                })?;
            Ok(Stamp {
                dev: m.rdev(),
                ino: m.ino(),
                size,
                mtime: (0, 0),
                ctime: (0, 0),
            })
        }
        _ => Err(ImageError::NotAFile(path.to_path_buf())),
    }
}

/// The open image: a file whose last change is [`SETTLE`] old, or a block device.
struct Opened {
    file: File,
    source: Source,
    /// `fstat` before the first read.
    stamp: Stamp,
    /// The file's `ctime` was at least [`SETTLE`] old at that `fstat` (always so for a file whose
    /// snapshot goes ahead: [`open`] waits for it; never for a device).
    settled: bool,
}

/// Opens the image; for a file, waits until its last change is [`SETTLE`] old.
fn open(path: &Path) -> Result<Opened, ImageError> {
    // By path first: opening a FIFO or a character device is not something to do by accident.
    let m = std::fs::metadata(path).map_err(io_err(path, "stat image"))?;
    let source = if m.is_file() {
        Source::File
    } else if m.file_type().is_block_device() {
        Source::Block
    } else {
        return Err(ImageError::NotAFile(path.to_path_buf()));
    };
    let file = File::open(path).map_err(io_err(path, "open image"))?;
    if source == Source::Block {
        let stamp = fstat(&file, path, source)?;
        return Ok(Opened {
            file,
            source,
            stamp,
            settled: false,
        });
    }
    // Write back dirty pages first: writeback write-protects shared-mapped pages, so a later
    // store through a MAP_SHARED mapping faults and moves ctime.
    file.sync_all().map_err(io_err(path, "sync image"))?;
    let started = Instant::now();
    loop {
        let stamp = fstat(&file, path, source)?;
        let age = stamp.age();
        if age >= SETTLE {
            return Ok(Opened {
                file,
                source,
                stamp,
                settled: true,
            });
        }
        if started.elapsed() >= SETTLE_LIMIT {
            return Err(ImageError::Changed(path.to_path_buf()));
        }
        // Not a wait for a test: a change within one timestamp tick of the next could leave
        // `ctime` unchanged, so reading starts only once the last change is older than a tick.
        std::thread::sleep(SETTLE - age);
    }
}

/// Refuses the snapshot if the image changed since `before` or the path names another file now
/// (for a device: another device, or another length).
fn unchanged(opened: &Opened, path: &Path) -> Result<(), ImageError> {
    let before = &opened.stamp;
    let after = fstat(&opened.file, path, opened.source)?;
    let named = std::fs::metadata(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            ImageError::Changed(path.to_path_buf())
        } else {
            io_err(path, "stat image")(e)
        }
    })?;
    let id = match opened.source {
        Source::File => (named.dev(), named.ino()),
        Source::Block => (named.rdev(), named.ino()),
    };
    if after != *before || id != (before.dev, before.ino) {
        return Err(ImageError::Changed(path.to_path_buf()));
    }
    Ok(())
}

/// The identity of an image file as a snapshot records it in its origin
/// ([`SnapshotMeta::origin`]): `image v1 dev=… ino=… size=… mtime=…s.…ns ctime=…s.…ns settled=…
/// path=…`, the canonical path last (it may hold spaces).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Origin {
    pub(crate) stamp: Stamp,
    pub(crate) settled: bool,
    pub(crate) path: String,
}

const ORIGIN_V1: &str = "image v1 ";

impl Origin {
    pub(crate) fn render(&self) -> String {
        let s = &self.stamp;
        format!(
            "{ORIGIN_V1}dev={} ino={} size={} mtime={}s.{}ns ctime={}s.{}ns settled={} path={}",
            s.dev,
            s.ino,
            s.size,
            s.mtime.0,
            s.mtime.1,
            s.ctime.0,
            s.ctime.1,
            u8::from(self.settled),
            self.path
        )
    }

    /// `None` for anything else: another version, another writer's origin, a cut-off string.
    pub(crate) fn parse(text: &str) -> Option<Origin> {
        let rest = crate::names::identity(text).strip_prefix(ORIGIN_V1)?;
        let (fields, path) = rest.split_once(" path=")?;
        let mut it = fields.split(' ');
        let mut field = |name: &str| it.next()?.strip_prefix(name)?.strip_prefix('=');
        let time = |v: &str| -> Option<(i64, i64)> {
            let (secs, ns) = v.strip_suffix("ns")?.split_once("s.")?;
            let ns: i64 = ns.parse().ok()?;
            (0..1_000_000_000).contains(&ns).then_some(())?;
            Some((secs.parse().ok()?, ns))
        };
        let dev = field("dev")?.parse().ok()?;
        let ino = field("ino")?.parse().ok()?;
        let size = field("size")?.parse().ok()?;
        let mtime = time(field("mtime")?)?;
        let ctime = time(field("ctime")?)?;
        let settled = match field("settled")? {
            "0" => false,
            "1" => true,
            _ => return None,
        };
        if it.next().is_some() {
            return None;
        }
        Some(Origin {
            stamp: Stamp {
                dev,
                ino,
                size,
                mtime,
                ctime,
            },
            settled,
            path: path.to_string(),
        })
    }

    /// Whether the stamp's times look truncated to whole seconds (both nanosecond parts zero):
    /// a file system that keeps coarse times, or none, where a write within the same second
    /// would leave them unchanged.
    fn coarse(&self) -> bool {
        self.stamp.mtime.1 == 0 && self.stamp.ctime.1 == 0
    }
}

/// Whether an image whose identity is `now` is known to be unchanged since the snapshot whose
/// origin is `parent`, so that its pages are the parent's without reading it: the parent's
/// origin is an image identity that was settled when taken (so any later write moved `ctime`),
/// the same device, inode, size, mtime and ctime to the nanosecond and the same canonical path,
/// times that are not coarse, and a file system that keeps `ctime` itself (`trusted_fs`).
pub(crate) fn may_skip(parent: Option<&str>, now: &Origin, trusted_fs: bool) -> bool {
    let Some(p) = parent.and_then(Origin::parse) else {
        return false;
    };
    trusted_fs
        && p.settled
        && now.settled
        && !now.coarse()
        && p.stamp == now.stamp
        && p.path == now.path
}

/// Whether the file system of `file` keeps `ctime` itself, so that every write moves it: not a
/// FUSE or network file system (the times there come from a server or a user-space daemon, and
/// may be cached, coarse or not kept at all).
#[cfg(any(target_os = "linux", target_os = "android"))]
#[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
pub(crate) fn trusted_fs(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    const UNTRUSTED: [i64; 10] = [
        0x6573_5546, // FUSE
        0x6969,      // NFS
        0xFF53_4D42, // CIFS
        0xFE53_4D42, // SMB2
        0x517B,      // SMB
        0x0102_1997, // 9P
        0x00C3_6400, // Ceph
        0x5346_414F, // AFS
        0x6B41_4653, // kAFS
        0x0102_1994, // tmpfs: no writeback, shared-mapped stores are never timestamped
    ];
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `st` is a valid, writable `statfs` for the call; `file` keeps the descriptor open.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return false;
    }
    // SAFETY: `fstatfs` returned 0, so it filled `st`.
    let kind = (unsafe { st.assume_init() }.f_type as i64) & 0xFFFF_FFFF;
    !UNTRUSTED.contains(&kind)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn trusted_fs(_file: &File) -> bool {
    false
}

/// How a snapshot finds the image's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Holes {
    /// `lseek(SEEK_DATA)` / `lseek(SEEK_HOLE)`, falling back to [`Holes::ReadAll`] where the file
    /// system does not support them.
    Seek,
    /// Every page is read.
    ReadAll,
}

/// `lseek(fd, from, whence)` on the image's descriptor: the offset it returns.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn seek(file: &File, from: u64, whence: libc::c_int) -> io::Result<u64> {
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
pub(crate) struct Extents<'a> {
    pub(crate) file: &'a File,
    pub(crate) path: &'a Path,
    pub(crate) size: u64,
    pub(crate) ps: u64,
    /// Bytes before this offset have been handed out (always a page boundary).
    pub(crate) at: u64,
    pub(crate) holes: Holes,
}

impl Extents<'_> {
    pub(crate) fn next(&mut self) -> Result<Option<std::ops::Range<u64>>, ImageError> {
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

/// Snapshots the raw image at `path` into `store` (opened as the writer), on top of the store's
/// newest snapshot. `progress` is called with the bytes of the image done so far (read, or
/// skipped as holes). Refused, with nothing committed, if the image changes while it is read (see
/// the module documentation for exactly what is detected).
///
/// Only the image's data is read: holes are found with `lseek(SEEK_DATA / SEEK_HOLE)` (extents
/// aligned outward to whole pages) and are zero pages without a read; a page the parent snapshot
/// stored that now lies in a hole is removed. Where the file system cannot report holes, every page
/// is read. A page read as all zeros is a hole page too (no hash). [`ImageSnapshot::pages_read`]
/// counts the pages read. An image file unchanged since the parent snapshot (same identity, see
/// "Unchanged images" in the module documentation) is not read at all; `path` may also be a
/// block device, read whole.
pub fn snapshot_image(
    store: &mut Store,
    path: &Path,
    label: Option<String>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<ImageSnapshot, ImageError> {
    snapshot_image_with(store, path, label, progress, SnapshotOptions::default())
}

/// [`snapshot_image`] with options: [`SnapshotOptions::reread`] reads an image even when its
/// identity says it is unchanged.
pub fn snapshot_image_with(
    store: &mut Store,
    path: &Path,
    label: Option<String>,
    progress: &(dyn Fn(u64) + Sync),
    options: SnapshotOptions,
) -> Result<ImageSnapshot, ImageError> {
    snapshot_with(store, path, label, progress, Holes::Seek, options)
}

/// The epoch a new snapshot of `snaps`' store seals: one past the newest.
pub(crate) fn next_epoch(snaps: &[pagesnap_store::SnapshotInfo]) -> Epoch {
    snaps
        .iter()
        .map(|s| s.epoch)
        .max()
        .unwrap_or(Epoch(0))
        .next()
}

fn snapshot_with(
    store: &mut Store,
    path: &Path,
    label: Option<String>,
    progress: &(dyn Fn(u64) + Sync),
    holes: Holes,
    options: SnapshotOptions,
) -> Result<ImageSnapshot, ImageError> {
    let started = Instant::now();
    let opened = open(path)?;
    let (file, before) = (&opened.file, opened.stamp);
    let size = before.size;
    let ps = u64::from(store.page_size());
    let name = match options.name {
        Some(n) => {
            crate::names::check_name(&n).map_err(ImageError::BadName)?;
            n
        }
        None => crate::names::default_name(path)?,
    };
    let snaps = store.snapshots()?;
    // The newest snapshot of the same image name: dedup is store-wide, but the diff (and the
    // unchanged-image skip) is against this image's own history.
    let parent = crate::names::latest_of(&snaps, &name);
    let epoch = next_epoch(&snaps);
    let parent_origin = parent
        .and_then(|p| snaps.iter().find(|s| s.id == p))
        .and_then(|s| s.origin.as_deref());
    // A file's identity, recorded in the snapshot; none for a device (its times do not follow
    // writes to its blocks), for a path that is not UTF-8, or one too long to be kept whole.
    let origin = match opened.source {
        Source::Block => None,
        Source::File => std::fs::canonicalize(path)
            .ok()
            .and_then(|c| c.to_str().map(str::to_string))
            .map(|path| Origin {
                stamp: before,
                settled: opened.settled,
                path,
            })
            .filter(|o| o.render().len() <= MAX_LABEL),
    };
    let skip = !options.reread
        && origin
            .as_ref()
            .is_some_and(|o| may_skip(parent_origin, o, trusted_fs(file)));
    let holes = match opened.source {
        Source::File => holes,
        Source::Block => Holes::ReadAll,
    };
    let pages = size.div_ceil(ps);
    store.begin(parent)?;
    let result = (|| {
        let (read, changed) = if skip {
            // The parent's pages, unread: no change at all.
            progress(size);
            (0, 0)
        } else {
            read_image(&mut *store, &opened, path, parent, holes, progress)?
        };
        debug_assert!(read <= pages);
        unchanged(&opened, path)?;
        let meta = SnapshotMeta {
            epoch,
            label,
            logical_size: size,
            time_unix_ms: None,
            origin: Some(crate::names::origin_with_name(
                &name,
                origin.as_ref().map(Origin::render),
            ))
            .filter(|o| o.len() <= MAX_LABEL)
            .or_else(|| Some(crate::names::origin_with_name(&name, None))),
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
            unchanged: skip,
        })
    })();
    if result.is_err() {
        store.abort();
    }
    result
}

/// Reads the image's data into the pending snapshot: (pages read, pages changed).
fn read_image(
    store: &mut Store,
    opened: &Opened,
    path: &Path,
    parent: Option<SnapshotId>,
    holes: Holes,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(u64, u64), ImageError> {
    let (file, size) = (&opened.file, opened.stamp.size);
    let ps = u64::from(store.page_size());
    let mut run = Run {
        store,
        parent,
        read: 0,
        changed: 0,
    };
    let device = opened.source == Source::Block;
    // The extent map is taken after the first `fstat` (in `open`), while reading.
    let mut extents = Extents {
        file,
        path,
        size,
        ps,
        at: 0,
        holes,
    };
    // Three stages, each on its own thread, with buffers passed along: a reader thread reads the
    // next batches (a disk, or the kernel's copy out of the page cache), a hashing thread hashes
    // each on every core, and this thread stores them (the store's writer thread writes them
    // out). No stage waits for another while a buffer is free, so reading, hashing, storing and
    // the device all overlap.
    let ids = run.store.page_ids();
    std::thread::scope(|s| -> Result<(u64, u64), ImageError> {
        let (to_reader, jobs) = std::sync::mpsc::sync_channel::<(Batch, Vec<u8>)>(BUFFERS);
        let (to_hasher, reads) =
            std::sync::mpsc::sync_channel::<Result<(Batch, Vec<u8>), ImageError>>(BUFFERS);
        let (to_main, done_rx) =
            std::sync::mpsc::sync_channel::<Result<Hashed, ImageError>>(BUFFERS);
        s.spawn(move || {
            for (batch, mut buf) in jobs {
                let read = read_batch(file, path, device, size, ps, &batch, &mut buf);
                if to_hasher.send(read.map(|()| (batch, buf))).is_err() {
                    break;
                }
            }
        });
        s.spawn(move || {
            for read in reads {
                let hashed = read.map(|(b, buf)| {
                    let pages = HashedPages::new(&ids, buf, b.pages as usize, ps as usize);
                    (b, pages)
                });
                if to_main.send(hashed).is_err() {
                    break;
                }
            }
        });
        let mut free: Vec<Vec<u8>> = (0..BUFFERS)
            .map(|_| vec![0u8; (BATCH_PAGES * ps) as usize])
            .collect();
        let mut in_flight = 0usize;
        let mut batch = Batch::default();
        // Stores one batch read and hashed; returns its buffer.
        let take_in = |run: &mut Run<'_>, in_flight: &mut usize| -> Result<Vec<u8>, ImageError> {
            let (b, pages) = done_rx.recv().map_err(|_| reader_gone(path))??;
            *in_flight -= 1;
            run.put_batch(&b, &pages)?;
            progress((b.end * ps).min(size));
            Ok(pages.into_buffer())
        };
        // Sends the pending batch to the reader, first storing finished ones until a buffer is
        // free.
        let send = |run: &mut Run<'_>,
                    batch: &mut Batch,
                    free: &mut Vec<Vec<u8>>,
                    in_flight: &mut usize|
         -> Result<(), ImageError> {
            if batch.pages == 0 {
                return Ok(());
            }
            if free.is_empty() {
                let b = take_in(run, in_flight)?;
                free.push(b);
            }
            let buf = free.pop().ok_or_else(|| reader_gone(path))?;
            to_reader
                .send((std::mem::take(batch), buf))
                .map_err(|_| reader_gone(path))?;
            *in_flight += 1;
            Ok(())
        };
        let mut done = 0u64; // pages before this one are handled (or in a pending batch)
        while let Some(extent) = extents.next()? {
            if extent.start > done {
                run.hole(done..extent.start)?;
            }
            let mut first = extent.start;
            while first < extent.end {
                let n = (BATCH_PAGES - batch.pages).min(extent.end - first);
                batch.ranges.push(first..first + n);
                batch.pages += n;
                first += n;
                batch.end = first;
                if batch.pages == BATCH_PAGES {
                    send(&mut run, &mut batch, &mut free, &mut in_flight)?;
                }
            }
            done = extent.end;
        }
        send(&mut run, &mut batch, &mut free, &mut in_flight)?;
        drop(to_reader);
        while in_flight > 0 {
            take_in(&mut run, &mut in_flight)?;
        }
        // The holes at the end, and the pages past a shrunken image's end: all gone.
        run.hole(done..u64::MAX)?;
        progress(size);
        Ok((run.read, run.changed))
    })
}

/// Batch buffers passed between the stages of an image snapshot (reading, hashing, storing).
const BUFFERS: usize = 6;

/// A batch read and hashed, waiting to be stored.
type Hashed = (Batch, HashedPages);

/// Page ranges of data to read together, at most [`BATCH_PAGES`] pages in all.
#[derive(Default)]
pub(crate) struct Batch {
    pub(crate) ranges: Vec<std::ops::Range<u64>>,
    pub(crate) pages: u64,
    /// The page after its last.
    pub(crate) end: u64,
}

fn reader_gone(path: &Path) -> ImageError {
    io_err(path, "read image")(io::Error::other("the image reader thread stopped"))
}

/// Reads `batch`'s pages of the image into `buf`, back to back.
fn read_batch(
    file: &File,
    path: &Path,
    device: bool,
    size: u64,
    ps: u64,
    batch: &Batch,
    buf: &mut [u8],
) -> Result<(), ImageError> {
    let mut off = 0usize;
    for r in &batch.ranges {
        let (at, want) = (r.start * ps, ((r.end - r.start) * ps) as usize);
        // Only the image's last page can be partial; the rest of it is zero.
        let bytes = (size.saturating_sub(at) as usize).min(want);
        buf[off + bytes..off + want].fill(0);
        file.read_exact_at(&mut buf[off..off + bytes], at)
            .map_err(|e| {
                if device {
                    ImageError::DeviceRead {
                        path: path.to_path_buf(),
                        source: e,
                    }
                } else if e.kind() == io::ErrorKind::UnexpectedEof {
                    ImageError::Changed(path.to_path_buf())
                } else {
                    io_err(path, "read image")(e)
                }
            })?;
        off += want;
    }
    Ok(())
}

/// The state of one snapshot's pass over its image.
pub(crate) struct Run<'a> {
    pub(crate) store: &'a mut Store,
    pub(crate) parent: Option<SnapshotId>,
    /// Pages read from the image.
    pub(crate) read: u64,
    /// Pages that differ from the parent's.
    pub(crate) changed: u64,
}

impl Run<'_> {
    /// Pages `range` are a hole: every page the parent stored there is removed (the cost is the
    /// parent's pages in the range, not the range's length).
    pub(crate) fn hole(&mut self, range: std::ops::Range<u64>) -> Result<(), ImageError> {
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

    /// Puts or removes the pages of a batch read and hashed (`pages`, in the order of the
    /// batch's ranges) that differ from the parent's.
    pub(crate) fn put_batch(
        &mut self,
        batch: &Batch,
        pages: &HashedPages,
    ) -> Result<(), ImageError> {
        let mut i = 0usize;
        for r in batch.ranges.iter().cloned() {
            let mut old: HashMap<u64, [u8; 32]> = HashMap::new();
            if let Some(p) = self.parent {
                self.store
                    .for_each_page_in(p, Vpn(r.start)..Vpn(r.end), |v, rf| {
                        old.insert(v.0, rf.hash);
                        Ok(())
                    })?;
            }
            for vpn in r {
                let at = i;
                i += 1;
                if old.get(&vpn) == pages.id(at) {
                    continue;
                }
                self.changed += 1;
                self.store.put_hashed_pages(Vpn(vpn), pages, at)?;
            }
        }
        self.read += batch.pages;
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

/// Stored pages with consecutive numbers, read and checked: the first one's number, how many,
/// and their bytes back to back.
#[derive(Debug)]
pub struct PageRun {
    /// The first page's number.
    pub first: u64,
    /// How many pages.
    pub pages: u64,
    /// Their bytes, `pages` × the page size.
    pub bytes: Vec<u8>,
}

/// Bytes of the image per batch of [`for_each_page_batch`] (and per write when a device is
/// written in place).
pub const RESTORE_BATCH_BYTES: u64 = 4 << 20;

/// Reads snapshot `id`'s pages for a restore, in batches of [`RESTORE_BATCH_BYTES`] of the
/// image, and calls `write` with each batch in order: its first page's number, its number of
/// pages, and the runs of consecutive stored (non-zero) pages among them; pages in no run are
/// zero. Every page is checked (crc32, blake3) as it is read. A reader thread reads the next
/// batches (pages back to back in the store with one `pread`, straight into the run) and checks
/// them on every core while `write` handles the last one. The first error — reading, or
/// `write`'s — stops the reading and is returned.
pub fn for_each_page_batch<E: From<ImageError>>(
    store: &Store,
    id: SnapshotId,
    mut write: impl FnMut(u64, u64, &[PageRun]) -> Result<(), E>,
) -> Result<(), E> {
    let info = store.snapshot(id).map_err(ImageError::from)?;
    let ps = u64::from(info.page_size);
    let per_batch = (RESTORE_BATCH_BYTES / ps).max(1);
    let pages = info.logical_size.div_ceil(ps);
    if rayon::current_thread_index().is_some() {
        // On a rayon worker the reader thread's parallel reads could wait for this very worker
        // (blocked on the channel below) forever: read and write in turn here instead, the reads
        // still spread over the pool.
        let mut first = 0u64;
        while first < pages {
            let n = per_batch.min(pages - first);
            let runs = read_page_batch(store, id, ps, first, n)?;
            write(first, n, &runs)?;
            first += n;
        }
        return Ok(());
    }
    type Read = Result<(u64, u64, Vec<PageRun>), ImageError>;
    std::thread::scope(|s| -> Result<(), E> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Read>(2);
        s.spawn(move || {
            let mut first = 0u64;
            while first < pages {
                let n = per_batch.min(pages - first);
                let read = read_page_batch(store, id, ps, first, n);
                let failed = read.is_err();
                if tx.send(read.map(|c| (first, n, c))).is_err() || failed {
                    break;
                }
                first += n;
            }
        });
        // On an error `rx` is dropped on return, and the reader stops at its next send.
        for item in rx {
            let (first, n, runs) = item?;
            write(first, n, &runs)?;
        }
        Ok(())
    })
}

/// The stored pages of `first..first + n`, read and checked on every core, as runs of at most 64
/// consecutive pages (the unit of work spread over the cores).
fn read_page_batch(
    store: &Store,
    id: SnapshotId,
    ps: u64,
    first: u64,
    n: u64,
) -> Result<Vec<PageRun>, ImageError> {
    let mut runs: Vec<(u64, Vec<pagesnap_store::Ref>)> = Vec::new();
    store.for_each_page_in(id, Vpn(first)..Vpn(first + n), |v, r| {
        match runs.last_mut() {
            Some((start, refs)) if *start + refs.len() as u64 == v.0 && refs.len() < 64 => {
                refs.push(*r)
            }
            _ => runs.push((v.0, vec![*r])),
        }
        Ok(())
    })?;
    let runs = runs
        .par_iter()
        .map(|(start, refs)| {
            let mut bytes = Vec::with_capacity(refs.len() * ps as usize);
            store.read_refs_into(refs, &mut bytes).map(|()| PageRun {
                first: *start,
                pages: refs.len() as u64,
                bytes,
            })
        })
        .collect::<Result<Vec<PageRun>, _>>()?;
    // What the store promises; a run of another length would put pages at the wrong offsets.
    if let Some(r) = runs.iter().find(|r| r.bytes.len() as u64 != r.pages * ps) {
        return Err(StoreError::Corrupt {
            path: PathBuf::from(format!("snapshot {id}")),
            what: "page run",
            offset: r.first * ps,
            detail: format!("{} bytes read for {} pages", r.bytes.len(), r.pages),
        }
        .into());
    }
    Ok(runs)
}

/// Writes snapshot `id` as a raw image at `output`: exactly the snapshot's length, byte for byte,
/// sparse where pages are zero. Every page is checked (crc32, blake3) before it is written; the
/// image is built in a temporary file beside `output` and renamed into place only when complete.
///
/// Pages are read and checked on every core ahead of the writes ([`for_each_page_batch`]), each
/// run of consecutive pages goes out in one write, and each batch's writeback is started as soon
/// as it is written, so the final sync waits for little.
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
    // Removed on any failure, a panic included (its `Drop`); created exclusively, under a name no
    // other restore uses.
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".pagesnap.tmp")
        .tempfile_in(dir)
        .map_err(io_err(dir, "create a temporary output file in"))?;
    let shown = tmp.path().to_path_buf();
    let file = tmp.as_file();
    file.set_len(size).map_err(io_err(&shown, "size output"))?;
    let mut written = 0u64;
    for_each_page_batch(store, id, |first, n, runs| -> Result<(), ImageError> {
        for run in runs {
            let at = run.first * ps;
            let len = size.saturating_sub(at).min(run.bytes.len() as u64) as usize;
            file.write_all_at(&run.bytes[..len], at)
                .map_err(io_err(&shown, "write output"))?;
            written += run.pages;
        }
        // A hint: an error here only loses the overlap.
        let _ = pagesnap_store::start_writeback(file, first * ps, n * ps);
        progress(((first + n) * ps).min(size));
        Ok(())
    })?;
    file.sync_all().map_err(io_err(&shown, "sync output"))?;
    tmp.persist(output)
        .map_err(|e| io_err(output, "rename output into place")(e.error))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "sync output directory"))?;
    Ok(ImageRestore {
        image_size: size,
        pages_written: written,
        seconds: started.elapsed().as_secs_f64(),
    })
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
            let snap = snapshot_with(
                &mut store,
                &path,
                None,
                &|_| {},
                holes,
                SnapshotOptions::default(),
            )
            .expect("snapshot");
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

    fn origin() -> Origin {
        Origin {
            stamp: Stamp {
                dev: 2049,
                ino: 1_234_567,
                size: 1 << 30,
                mtime: (1_764_000_000, 5),
                ctime: (1_764_000_001, 999_999_999),
            },
            settled: true,
            path: "/var/lib/vm images/disk one.img".into(),
        }
    }

    #[test]
    fn the_origin_round_trips() {
        let o = origin();
        let text = o.render();
        assert_eq!(
            text,
            "image v1 dev=2049 ino=1234567 size=1073741824 mtime=1764000000s.5ns \
             ctime=1764000001s.999999999ns settled=1 path=/var/lib/vm images/disk one.img"
        );
        assert_eq!(Origin::parse(&text), Some(o.clone()));
        let before_epoch = Origin {
            stamp: Stamp {
                mtime: (-3, 7),
                ..o.stamp
            },
            settled: false,
            path: "/a path=with path= in it".into(),
        };
        assert_eq!(
            Origin::parse(&before_epoch.render()),
            Some(before_epoch.clone())
        );
    }

    #[test]
    fn only_a_settled_equal_identity_skips_the_read() {
        let now = origin();
        let same = now.render();
        assert!(may_skip(Some(&same), &now, true), "unchanged: skipped");
        // No origin (a snapshot of the engine's `Space`, or format 1), a foreign or damaged one.
        for foreign in [
            "",
            "space",
            "image v2 dev=2049",
            "image v1 dev=2049 ino=1234567",
            &same.replace("size=", "size=x"),
            &same.replace(
                "ctime=1764000001s.999999999ns",
                "ctime=1764000001s.1999999999ns",
            ),
            &same.replace(" settled=1", ""),
            &same.replace(" settled=1", " settled=1 extra=2"),
            &same[..same.len() - 4],
        ] {
            assert!(!may_skip(Some(foreign), &now, true), "{foreign:?}");
        }
        assert!(!may_skip(None, &now, true));
        // A parent whose stamp was not settled when taken: a write in its last tick may be unseen.
        let unsettled = Origin {
            settled: false,
            ..now.clone()
        };
        assert!(!may_skip(Some(&unsettled.render()), &now, true));
        assert!(!may_skip(Some(&same), &unsettled, true));
        // Any field differs: read.
        let differ = |f: &dyn Fn(&mut Stamp)| {
            let mut o = now.clone();
            f(&mut o.stamp);
            o
        };
        for other in [
            differ(&|s| s.dev += 1),
            differ(&|s| s.ino += 1),
            differ(&|s| s.size += 1),
            differ(&|s| s.mtime.1 += 1),
            differ(&|s| s.ctime.1 += 1),
            differ(&|s| s.ctime.0 += 1),
            Origin {
                path: "/var/lib/vm images/disk two.img".into(),
                ..now.clone()
            },
        ] {
            assert!(!may_skip(Some(&other.render()), &now, true), "{other:?}");
            assert!(!may_skip(Some(&same), &other, true), "{other:?}");
        }
        // Coarse times (both nanosecond parts zero), and file systems that do not keep ctime.
        let coarse = differ(&|s| {
            s.mtime.1 = 0;
            s.ctime.1 = 0;
        });
        assert!(!may_skip(Some(&coarse.render()), &coarse, true));
        assert!(!may_skip(Some(&same), &now, false));
    }

    #[test]
    fn the_test_file_system_keeps_ctime() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = File::create(dir.path().join("x")).expect("create");
        assert!(trusted_fs(&f), "the temp dir is on a local file system");
    }
}
