//! Raw disk images as persistent address spaces: page *n* of an image is the page at offset
//! `n × page size`. A snapshot of an image persists the pages whose content changed since the
//! store's previous snapshot — the dirty pages, found by hashing the image against the parent's
//! index — so an incremental snapshot writes O(changed) bytes. Reading and hashing use every core
//! and never hold more than one batch of the image in memory.
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
    /// Pages read.
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

/// Snapshots the raw image at `path` into `store` (opened as the writer), on top of the store's
/// newest snapshot. `progress` is called with the bytes read so far. Refused, with nothing
/// committed, if the image changes while it is read (see the module documentation for exactly
/// what is detected).
pub fn snapshot_image(
    store: &mut Store,
    path: &Path,
    label: Option<String>,
    progress: &(dyn Fn(u64) + Sync),
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
        let (mut changed, mut buf) = (0u64, vec![0u8; (BATCH_PAGES * ps) as usize]);
        let mut first = 0u64;
        while first < pages {
            let n = BATCH_PAGES.min(pages - first);
            let bytes = (n * ps).min(size - first * ps) as usize;
            buf[..(n * ps) as usize].fill(0);
            file.read_exact_at(&mut buf[..bytes], first * ps)
                .map_err(|e| {
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        ImageError::Changed(path.to_path_buf())
                    } else {
                        io_err(path, "read image")(e)
                    }
                })?;
            let hashes: Vec<Option<[u8; 32]>> = buf[..(n * ps) as usize]
                .par_chunks(ps as usize)
                .map(|page| {
                    page.iter()
                        .any(|b| *b != 0)
                        .then(|| *blake3::hash(page).as_bytes())
                })
                .collect();
            let mut old: HashMap<u64, [u8; 32]> = HashMap::new();
            if let Some(p) = parent {
                store.for_each_page_in(p, Vpn(first)..Vpn(first + n), |v, r| {
                    old.insert(v.0, r.hash);
                    Ok(())
                })?;
            }
            for (i, new) in hashes.iter().enumerate() {
                let vpn = first + i as u64;
                if old.get(&vpn) == new.as_ref() {
                    continue;
                }
                changed += 1;
                match new {
                    Some(h) => {
                        let page = &buf[i * ps as usize..(i + 1) * ps as usize];
                        store.put_hashed(Vpn(vpn), page, *h)?;
                    }
                    None => store.remove(Vpn(vpn))?,
                }
            }
            first += n;
            progress((first * ps).min(size));
        }
        // The image shrank: pages past its end are gone.
        if let Some(p) = parent {
            let mut gone = Vec::new();
            store.for_each_page_in(p, Vpn(pages)..Vpn(u64::MAX), |v, _| {
                gone.push(v);
                Ok(())
            })?;
            changed += gone.len() as u64;
            for v in gone {
                store.remove(v)?;
            }
        }
        unchanged(&file, path, &before)?;
        let meta = SnapshotMeta {
            epoch,
            label,
            logical_size: size,
            time_unix_ms: None,
        };
        let report = store.commit(meta)?;
        Ok(ImageSnapshot {
            id: report.id,
            image_size: size,
            pages_read: pages,
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
