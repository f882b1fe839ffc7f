//! Raw images written through pagesnap (`pagesnap serve`): every write, trim and zeroing lands in
//! the image file — which stays a plain raw image — and the pages it touches are *tracked*, so a
//! snapshot reads only the tracked pages: O(pages written), not O(image).
//!
//! # Snapshots while writes go on
//!
//! A snapshot is the image as it was at one instant, the *freeze*, and holds every write
//! acknowledged before it. The freeze waits for the writes in flight to finish (writers hold a
//! shared gate from marking their pages to the end of their write; the freeze takes it
//! exclusively, for as long as it takes to swap two bit sets). The pages tracked until then become
//! the snapshot's set; new writes are tracked afresh for the next snapshot. While the snapshot
//! reads its pages, a writer about to change one of them that is not read yet first keeps it as
//! of the freeze (copy-on-write, under the same lock the snapshot reads under, a few pages per
//! hold), and the snapshot takes that: a page in a hole is recorded as a zero page (nothing
//! copied), a data page is copied into a *spill file* — an unlinked temporary file in the state
//! file's directory, sparse, each page at its own offset — so the memory this takes is three bit
//! sets and one small buffer, however large the write, trim or zeroing. (Making the write wait
//! until the snapshot has read those pages would stall a client for as long as a full read of
//! the image can take; keeping copies in memory lets one trim of a large range exhaust it.) If
//! copying a page aside fails (the spill file's file system is full), the snapshot is abandoned,
//! not the write. If the snapshot fails, its pages are tracked again.
//!
//! # The tracking state and crashes
//!
//! The tracked set counts from a *base* snapshot. It lives in memory while the image is open and
//! in a state file (in the store directory, chosen by the caller) when it is not:
//!
//! - Before the first change after opening, the state file is replaced by an *unclean* marker and
//!   synced (file and directory), so it is durable before any write reaches the image.
//! - A clean close ([`TrackedImage::close`]) syncs the image, waits until its change time is
//!   [`SETTLE`] old, and replaces the state file with: clean, the base, the tracked pages, and
//!   the image's identity (device, inode, size, mtime and ctime to the nanosecond).
//! - Opening trusts a state file only if it is clean, names the same path, page size and size,
//!   the image's identity is unchanged since (so nothing wrote to it while no server ran) and the
//!   base snapshot is still in the store. Anything else — no file, a damaged one, an unclean one
//!   (the process was killed, or the machine went down), an image changed since — means the next
//!   snapshot reads the whole image once, and [`Tracking::full_read`] says why. A snapshot
//!   therefore never misses a write.
//! - Unless the end was unclean (or the state is damaged or unreadable), if the newest snapshot
//!   of the image's name (its canonical path, see [`crate::names`]) is of this very image as it is now (its recorded identity matches, by the rule of
//!   the unchanged-image skip in [`crate::image`]), tracking starts from it with nothing
//!   tracked. After an unclean end the identity proves nothing: a client's FLUSH (`fdatasync`)
//!   makes the written data durable but not necessarily the timestamps (XFS leaves
//!   timestamp-only changes out; ext4 commits them with a later journal transaction), so after a
//!   machine crash the image can hold writes made after that snapshot while its identity still
//!   matches it. The whole image is read once instead ([`unclean_end`] tells a snapshot taken
//!   without a server the same).
//!
//! The image is locked (`flock`, exclusive) while open: a second server of it is refused.

use crate::image::{
    io_err, may_skip, seek, trusted_fs, Batch, Extents, Holes, ImageError, ImageSnapshot, Origin,
    Run, Stamp, BATCH_PAGES, SETTLE, SETTLE_LIMIT,
};
use pagesnap_store::{pagehash::HashedPages, SnapshotId, SnapshotMeta, Store, MAX_LABEL};
use parking_lot::{Mutex, RwLock};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Pages a writer copies aside per hold of the lock (128 KiB of 4 KiB pages): the bound on the
/// memory a write uses to keep a running snapshot's pages, and on how long it holds the lock.
const COPY_CHUNK: u64 = 32;

/// Why a full read follows an unclean end (the state file is the unclean marker).
const UNCLEAN: &str = "the last server of this image did not stop cleanly (killed, or the machine went down): writes it took after its last snapshot may be in the image without having changed the image's recorded identity, so the whole image is read once";

/// A raw image open for writing, with its written pages tracked.
#[derive(Debug)]
pub struct TrackedImage {
    path: PathBuf,
    /// The canonical path, as recorded in snapshot origins and the state file.
    canonical: String,
    /// The image's default name ([`crate::names::default_name`]), which its snapshots take.
    name: String,
    file: File,
    size: u64,
    ps: u64,
    pages: u64,
    state_path: PathBuf,
    /// The tracking state is written to `state_path` (not for an encrypted store).
    persist: bool,
    /// Writers hold it shared from marking their pages to the end of their write; a freeze
    /// holds it exclusively.
    gate: RwLock<()>,
    inner: Mutex<Inner>,
    /// One snapshot (or close) at a time.
    snapping: Mutex<()>,
}

#[derive(Debug)]
struct Inner {
    /// Pages changed since the last freeze (of a snapshot that then succeeded).
    active: Bits,
    /// The snapshot being taken.
    cow: Option<Cow>,
    /// The snapshot the tracked pages count from.
    base: Option<SnapshotId>,
    /// Tracking is not known to be complete: why (the next snapshot reads every page).
    full: Option<String>,
    /// The unclean marker is durable.
    marked: bool,
}

/// A snapshot in progress: its pages not taken yet, and where those that writers changed since
/// the freeze are kept as of the freeze. Its memory is three bit sets, however much is copied.
#[derive(Debug)]
struct Cow {
    /// Frozen pages not taken yet and unchanged since the freeze: read from the image.
    pending: Bits,
    /// Frozen pages a writer changed: their content as of the freeze is in `spill`, at the
    /// page's own offset.
    saved: Bits,
    /// Frozen pages a writer changed that were holes at the freeze: zero pages, nothing copied.
    zero: Bits,
    /// An unlinked temporary file in the state file's directory (the store's), sparse: only the
    /// copied pages take space, and it is gone when the snapshot ends.
    spill: File,
    /// Copying a page aside failed: the snapshot is abandoned (the write goes on), and why.
    failed: Option<String>,
}

/// Whether the tracking state at `state` shows that the last server of its image did not stop
/// cleanly (the unclean marker, or a state that cannot be read or decoded): then the image may
/// hold writes that its recorded identity does not show, and a snapshot of it must read it whole
/// rather than trust the unchanged-image skip. `Some(why)` if so; `None` without a state file or
/// with a clean one.
pub fn unclean_end(state: &Path) -> Option<String> {
    match std::fs::read(state) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => Some(format!(
            "the tracking state {} could not be read ({e})",
            state.display()
        )),
        Ok(bytes) => match State::decode(&bytes) {
            None => Some(format!("the tracking state {} is damaged", state.display())),
            Some(st) if !st.clean => Some(UNCLEAN.into()),
            Some(_) => None,
        },
    }
}

/// Where tracking stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tracking {
    /// The snapshot the tracked pages count from.
    pub base: Option<SnapshotId>,
    /// Pages tracked (changed since the base).
    pub pages: u64,
    /// The next snapshot reads the whole image, and why.
    pub full_read: Option<String>,
}

/// What a snapshot of a tracked image did.
#[derive(Clone, Debug, PartialEq)]
pub struct TrackedSnapshot {
    /// The snapshot; `pages_read` counts the tracked pages read (holes are not read).
    pub snapshot: ImageSnapshot,
    /// Pages the snapshot took from tracking (every page for a full read).
    pub pages_tracked: u64,
    /// The whole image was read, and why.
    pub full_read: Option<String>,
}

impl TrackedImage {
    /// Opens the raw image at `path` for writing, locked, with tracking loaded from the state
    /// file at `state` (see the module documentation for when it is trusted). `store` is the
    /// store the snapshots go to (its page size is the tracking granularity).
    pub fn open(path: &Path, state: &Path, store: &Store) -> Result<TrackedImage, ImageError> {
        let m = std::fs::metadata(path).map_err(io_err(path, "stat image"))?;
        if !m.is_file() {
            return Err(ImageError::NotServable(path.to_path_buf()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path, "open image for writing"))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(ImageError::Busy(path.to_path_buf()))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(path, "lock image")(e)),
        }
        let canonical = std::fs::canonicalize(path)
            .map_err(io_err(path, "resolve image path"))?
            .to_string_lossy()
            .into_owned();
        let name = crate::names::default_name(path)?;
        let size = file.metadata().map_err(io_err(path, "stat image"))?.len();
        let ps = u64::from(store.page_size());
        let pages = size.div_ceil(ps);
        let (stamp, settled) = settled_stamp(&file, path)?;
        let now = Origin {
            stamp,
            settled,
            path: canonical.clone(),
        };
        let trusted = trusted_fs(&file);
        let snaps = store.snapshots()?;
        // `Err((why, may_resume))`: tracking from the state is not trusted, and whether the
        // store's newest snapshot may stand in for it.
        // An encrypted store keeps no tracking state on disk: the state names the image's path
        // and the ranges written, in clear. So the first snapshot after each start reads the
        // image whole, as after an unclean end (timestamps are never trusted instead).
        let persist = !store.is_encrypted();
        if !persist {
            match std::fs::remove_file(state) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(state, "remove tracking state")(e)),
            }
        }
        let from_state = (|| -> Result<(SnapshotId, Bits), (String, bool)> {
            if !persist {
                return Err((
                    "an encrypted store keeps no tracking state on disk (it would name the image)"
                        .into(),
                    false,
                ));
            }
            let bytes = match std::fs::read(state) {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err((
                        "no tracking state for this image in this store yet".into(),
                        true,
                    ))
                }
                Err(e) => {
                    return Err((
                        format!(
                            "the tracking state {} could not be read ({e})",
                            state.display()
                        ),
                        false,
                    ))
                }
            };
            // A damaged state may have been an unclean marker: treated as one.
            let st = State::decode(&bytes).ok_or_else(|| {
                (
                    format!("the tracking state {} is damaged", state.display()),
                    false,
                )
            })?;
            if !st.clean {
                return Err((UNCLEAN.into(), false));
            }
            if st.path != canonical || u64::from(st.page_size) != ps || st.image_size != size {
                return Err((
                    "the tracking state is of another image path, size or page size".into(),
                    true,
                ));
            }
            let same = Origin {
                stamp: st.stamp,
                settled: st.settled,
                path: st.path.clone(),
            };
            if !may_skip(Some(&same.render()), &now, trusted) {
                return Err((
                    "the image changed (or may have) since its server stopped".into(),
                    true,
                ));
            }
            if let Some(why) = st.full {
                return Err((why, true));
            }
            let base = SnapshotId(st.base);
            if !snaps.iter().any(|s| s.id == base) {
                return Err((
                    format!(
                        "snapshot {base}, which tracking counted from, is no longer in the store"
                    ),
                    true,
                ));
            }
            let mut bits = Bits::new(pages);
            for r in st.ranges {
                for p in r.start..r.end.min(pages) {
                    bits.set(p);
                }
            }
            Ok((base, bits))
        })();
        let (base, active, full) = match from_state {
            Ok((base, bits)) => (Some(base), bits, None),
            Err((why, may_resume)) => {
                // The store's newest snapshot may be of exactly this image as it is now — but
                // not after an unclean end: `fdatasync` (a client's FLUSH) makes data durable
                // and not necessarily the timestamps that record it (XFS leaves timestamp-only
                // changes out of it; ext4 commits them with a later journal transaction), so
                // after a machine crash the image can hold writes made after that snapshot
                // while its identity still matches it.
                // The image's own newest snapshot (of its default name).
                let latest = crate::names::latest_of(&snaps, &name)
                    .and_then(|id| snaps.iter().find(|s| s.id == id));
                if may_resume
                    && latest.is_some_and(|s| may_skip(s.origin.as_deref(), &now, trusted))
                {
                    (latest.map(|s| s.id), Bits::new(pages), None)
                } else {
                    (None, Bits::new(pages), Some(why))
                }
            }
        };
        Ok(TrackedImage {
            path: path.to_path_buf(),
            canonical,
            name,
            file,
            size,
            ps,
            pages,
            state_path: state.to_path_buf(),
            persist,
            gate: RwLock::new(()),
            inner: Mutex::new(Inner {
                active,
                cow: None,
                base,
                full,
                marked: false,
            }),
            snapping: Mutex::new(()),
        })
    }

    /// The image's size in bytes (fixed while it is open).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The image's path, as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where tracking stands.
    pub fn tracking(&self) -> Tracking {
        let g = self.inner.lock();
        let mut pages = g.active.count();
        if let Some(c) = &g.cow {
            pages += c.pending.count();
        }
        Tracking {
            base: g.base,
            pages,
            full_read: g.full.clone(),
        }
    }

    /// Reads `buf.len()` bytes at `offset` (within the image).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Writes `data` at `offset` (within the image); with `fua`, durably.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let _g = self.gate.read();
        self.touch(offset, data.len() as u64)?;
        self.file.write_all_at(data, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Zeroes `len` bytes at `offset`: by punching a hole if `may_punch`, else keeping the range
    /// allocated; by writing zeros where the file system cannot do either.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fua: bool,
    ) -> io::Result<()> {
        let _g = self.gate.read();
        self.touch(offset, len)?;
        let mode = if may_punch {
            FALLOC_PUNCH
        } else {
            FALLOC_ZERO_RANGE
        };
        match fallocate(&self.file, mode, offset, len) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS)
                ) =>
            {
                let zeros = vec![0u8; len.min(1 << 20) as usize];
                let mut at = offset;
                while at < offset + len {
                    let n = (offset + len - at).min(zeros.len() as u64) as usize;
                    self.file.write_all_at(&zeros[..n], at)?;
                    at += n as u64;
                }
            }
            Err(e) => return Err(e),
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Discards `len` bytes at `offset` (a hole is punched; they read as zeros after). Where
    /// the file system cannot punch holes, nothing is done (a trim is a hint).
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let _g = self.gate.read();
        self.touch(offset, len)?;
        match fallocate(&self.file, FALLOC_PUNCH, offset, len) {
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS)) => {}
            Err(e) => return Err(e),
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Makes every completed write durable (`fdatasync` of the image; the tracking state needs
    /// no sync: the unclean marker is durable since before the first write).
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// The image's data and holes from `offset` on, as (length, is a hole) runs covering up to
    /// `len` bytes (at most 1,024 runs; the whole range is data where the file system cannot
    /// say).
    pub fn extents(&self, offset: u64, len: u64, out: &mut Vec<(u64, bool)>) -> io::Result<()> {
        let end = offset.saturating_add(len).min(self.size);
        let mut at = offset;
        while at < end && out.len() < 1024 {
            let data = match seek(&self.file, at, libc::SEEK_DATA) {
                Ok(d) => d.min(end),
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                    out.push((end - at, false));
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            if data > at {
                out.push((data - at, true));
                at = data;
                continue;
            }
            let hole = match seek(&self.file, at, libc::SEEK_HOLE) {
                Ok(h) => h.min(end),
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
                Err(e) => return Err(e),
            };
            let hole = hole.max(at + 1);
            out.push((hole - at, false));
            at = hole;
        }
        Ok(())
    }

    /// Before pages `offset..offset + len` change: the unclean marker is made durable (once),
    /// the pages are tracked, and those a running snapshot has not read yet are copied aside.
    fn touch(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (first, end) = (offset / self.ps, (offset + len).div_ceil(self.ps));
        let mut g = self.inner.lock();
        if !g.marked {
            let marker = State {
                clean: false,
                page_size: self.ps as u32,
                image_size: self.size,
                base: 0,
                full: None,
                stamp: Stamp::of(&self.file.metadata()?),
                settled: false,
                path: self.canonical.clone(),
                ranges: Vec::new(),
            };
            if self.persist {
                marker.store(&self.state_path)?;
            }
            g.marked = true;
        }
        for p in first..end.min(self.pages) {
            g.active.set(p);
        }
        if g.cow.is_some() {
            drop(g);
            self.copy_aside(first, end.min(self.pages));
        }
        Ok(())
    }

    /// Before pages `first..end` change while a snapshot runs: those it has not taken yet are
    /// kept as of the freeze — holes recorded as zero pages, data copied into the spill file —
    /// [`COPY_CHUNK`] pages at a time under the lock the snapshot takes pages under (it goes on
    /// between chunks; the caller holds the gate, so no other snapshot can start meanwhile).
    /// Memory: one buffer of at most [`COPY_CHUNK`] pages, whatever the range. A failure
    /// abandons the snapshot, not the write: the snapshot then fails and its pages are tracked
    /// again.
    fn copy_aside(&self, first: u64, end: u64) {
        let mut buf = Vec::new();
        let mut at = first;
        while at < end {
            let stop = at.saturating_add(COPY_CHUNK).min(end);
            let mut g = self.inner.lock();
            let Some(cow) = g.cow.as_mut() else { return };
            if cow.failed.is_some() {
                return;
            }
            if let Err(e) = self.copy_chunk(cow, at..stop, &mut buf) {
                cow.failed = Some(format!(
                    "keeping pages {at}..{stop} as of the snapshot before a write changed them failed ({e}); the snapshot was abandoned"
                ));
                return;
            }
            drop(g);
            at = stop;
        }
    }

    /// [`TrackedImage::copy_aside`] of one chunk, under the lock.
    fn copy_chunk(&self, cow: &mut Cow, range: Range<u64>, buf: &mut Vec<u8>) -> io::Result<()> {
        let ps = self.ps;
        if !(range.start..range.end).any(|p| cow.pending.get(p)) {
            return Ok(());
        }
        // A pending page has not changed since the freeze, nor has its allocation: one in a
        // hole now was a hole then.
        let mut ext = Extents {
            file: &self.file,
            path: &self.path,
            size: (range.end * ps).min(self.size),
            ps,
            at: range.start * ps,
            holes: Holes::Seek,
        };
        let mut at = range.start;
        loop {
            let next = ext.next().map_err(io::Error::other)?;
            let data = match &next {
                Some(d) => d.start.max(at).min(range.end)..d.end.min(range.end),
                None => range.end..range.end,
            };
            for p in at..data.start {
                if cow.pending.get(p) {
                    cow.pending.clear(p);
                    cow.zero.set(p);
                }
            }
            let mut p = data.start;
            while p < data.end {
                if !cow.pending.get(p) {
                    p += 1;
                    continue;
                }
                let mut q = p;
                while q < data.end && cow.pending.get(q) {
                    q += 1;
                }
                let want = ((q - p) * ps) as usize;
                buf.resize(want, 0);
                let have = (self.size.saturating_sub(p * ps) as usize).min(want);
                buf[have..].fill(0);
                self.file.read_exact_at(&mut buf[..have], p * ps)?;
                cow.spill.write_all_at(buf, p * ps)?;
                for i in p..q {
                    cow.pending.clear(i);
                    cow.saved.set(i);
                }
                p = q;
            }
            at = data.end;
            if next.is_none() || at >= range.end {
                return Ok(());
            }
        }
    }

    /// Snapshots the image into `store` (opened as the writer): the tracked pages, on top of the
    /// base snapshot — or, when tracking is not known complete or `reread` asks for it, every
    /// page, on top of the store's newest snapshot. Writes go on meanwhile (see the module
    /// documentation). `progress` is called with the tracked pages done so far.
    pub fn snapshot(
        &self,
        store: &mut Store,
        label: Option<String>,
        reread: bool,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<TrackedSnapshot, ImageError> {
        self.snapshot_with(store, label, reread, progress, &|| {})
    }

    /// [`TrackedImage::snapshot`], calling `after_freeze` right after the freeze (tests write
    /// there).
    fn snapshot_with(
        &self,
        store: &mut Store,
        label: Option<String>,
        reread: bool,
        progress: &(dyn Fn(u64) + Sync),
        after_freeze: &dyn Fn(),
    ) -> Result<TrackedSnapshot, ImageError> {
        let _one = self.snapping.lock();
        let started = Instant::now();
        let (base, mut full) = {
            let g = self.inner.lock();
            (g.base, g.full.clone())
        };
        if reread && full.is_none() {
            full = Some("a full read was asked for (--reread)".into());
        }
        let snaps = store.snapshots()?;
        if full.is_none() {
            if let Some(b) = base.filter(|b| !snaps.iter().any(|s| s.id == *b)) {
                full = Some(format!(
                    "snapshot {b}, which tracking counted from, is no longer in the store"
                ));
            }
        }
        let parent = if full.is_some() {
            // The newest snapshot of this image's default name, as for `snapshot_image`.
            crate::names::latest_of(&snaps, &self.name)
        } else {
            base
        };
        let epoch = crate::image::next_epoch(&snaps);
        let spill = spill_file(&self.state_path)?;
        let frozen = self.freeze(full.is_some(), spill)?;
        after_freeze();
        let result = self
            .persist(store, parent, &frozen, progress)
            .and_then(|(read, changed)| {
                let origin = Origin {
                    stamp: frozen.stamp,
                    settled: frozen.settled,
                    path: self.canonical.clone(),
                }
                .render();
                // As `snapshot_image` records a default-named snapshot: the identity alone when
                // the name is the canonical path, else a name line first; the name alone when
                // that is too long to keep.
                let origin = Some(crate::names::origin_with_name(&self.name, Some(origin)))
                    .filter(|o| o.len() <= MAX_LABEL)
                    .or_else(|| Some(crate::names::origin_with_name(&self.name, None)));
                let meta = SnapshotMeta {
                    epoch,
                    label,
                    logical_size: self.size,
                    time_unix_ms: None,
                    origin,
                };
                let report = store.commit(meta)?;
                Ok(ImageSnapshot {
                    id: report.id,
                    image_size: self.size,
                    pages_read: read,
                    pages_changed: changed,
                    pages_written: report.pages_written,
                    data_bytes: report.data_bytes,
                    meta_bytes: report.meta_bytes,
                    seconds: started.elapsed().as_secs_f64(),
                    unchanged: false,
                })
            });
        let mut g = self.inner.lock();
        g.cow = None;
        match result {
            Ok(snapshot) => {
                g.base = Some(snapshot.id);
                g.full = None;
                Ok(TrackedSnapshot {
                    snapshot,
                    pages_tracked: frozen.pages.count(),
                    full_read: full,
                })
            }
            Err(e) => {
                store.abort();
                // Tracked again: the pages of the failed snapshot still differ from the base.
                g.active.union(&frozen.tracked);
                Err(e)
            }
        }
    }

    /// The freeze: waits for writes in flight, takes the tracked pages (every page if `all`) as
    /// the snapshot's, and starts copy-on-write for them (into `spill`).
    fn freeze(&self, all: bool, spill: File) -> Result<Frozen, ImageError> {
        let _w = self.gate.write();
        let mut g = self.inner.lock();
        let m = self
            .file
            .metadata()
            .map_err(io_err(&self.path, "stat image"))?;
        let stamp = Stamp::of(&m);
        let tracked = std::mem::replace(&mut g.active, Bits::new(self.pages));
        let pages = if all {
            Bits::full(self.pages)
        } else {
            tracked.clone()
        };
        g.cow = Some(Cow {
            pending: pages.clone(),
            saved: Bits::new(self.pages),
            zero: Bits::new(self.pages),
            spill,
            failed: None,
        });
        Ok(Frozen {
            // A write after the freeze lands in a later timestamp tick only if the last change
            // is older than a tick; otherwise the origin is not trusted to skip a later read.
            settled: stamp.age() >= SETTLE,
            stamp,
            pages,
            tracked,
        })
    }

    /// Puts the frozen pages' contents as of the freeze into the pending snapshot: (pages read,
    /// pages changed).
    fn persist(
        &self,
        store: &mut Store,
        parent: Option<SnapshotId>,
        frozen: &Frozen,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(u64, u64), ImageError> {
        store.begin(parent)?;
        let ps = self.ps;
        let mut run = Run {
            store,
            parent,
            read: 0,
            changed: 0,
        };
        let mut buf = vec![0u8; (BATCH_PAGES * ps) as usize];
        let mut done = 0u64;
        let mut window: Vec<Range<u64>> = Vec::new();
        let mut in_window = 0u64;
        let ids = run.store.page_ids();
        let mut runs = frozen.pages.runs().into_iter();
        let mut carry: Option<Range<u64>> = None;
        loop {
            // Up to BATCH_PAGES frozen pages, as ranges.
            while in_window < BATCH_PAGES {
                let Some(r) = carry.take().or_else(|| runs.next()) else {
                    break;
                };
                let n = (r.end - r.start).min(BATCH_PAGES - in_window);
                window.push(r.start..r.start + n);
                in_window += n;
                if r.start + n < r.end {
                    carry = Some(r.start + n..r.end);
                }
            }
            if window.is_empty() {
                break;
            }
            let (batch, holes) = self.capture(&window, &mut buf)?;
            let pages = HashedPages::new(
                &ids,
                std::mem::take(&mut buf),
                batch.pages as usize,
                ps as usize,
            );
            let stored = run.put_batch(&batch, &pages);
            buf = pages.into_buffer();
            stored?;
            for h in holes {
                run.hole(h)?;
            }
            done += in_window;
            progress(done);
            window.clear();
            in_window = 0;
        }
        // Pages a parent of another size has past this image's end.
        run.hole(self.pages..u64::MAX)?;
        if let Some(why) = self
            .inner
            .lock()
            .cow
            .as_ref()
            .and_then(|c| c.failed.clone())
        {
            return Err(io_err(&self.path, "snapshot")(io::Error::other(why)));
        }
        Ok((run.read, run.changed))
    }

    /// Takes the pages of `window` as of the freeze, under the lock writers copy aside under:
    /// pages unchanged since are read from the image (those in holes are not read: they are
    /// returned as ranges of zero pages, with the pages a writer changed that were holes at the
    /// freeze); pages a writer changed since come from the spill file. The data pages go into
    /// `buf`, back to back, as the returned batch.
    fn capture(
        &self,
        window: &[Range<u64>],
        buf: &mut [u8],
    ) -> Result<(Batch, Vec<Range<u64>>), ImageError> {
        let ps = self.ps;
        let mut g = self.inner.lock();
        let cow = g.cow.as_mut().ok_or_else(|| {
            io_err(&self.path, "snapshot")(io::Error::other("no snapshot running"))
        })?;
        if let Some(why) = &cow.failed {
            return Err(io_err(&self.path, "snapshot")(io::Error::other(
                why.clone(),
            )));
        }
        let mut batch = Batch::default();
        let mut holes: Vec<Range<u64>> = Vec::new();
        let hole = |holes: &mut Vec<Range<u64>>, p: u64| match holes.last_mut() {
            Some(h) if h.end == p => h.end = p + 1,
            _ => holes.push(p..p + 1),
        };
        let spill_dir = self.state_path.parent().unwrap_or(Path::new("."));
        let spill_err =
            |e: io::Error| io_err(spill_dir, "read the snapshot's copy-on-write file in")(e);
        let image_err = |e: io::Error| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                ImageError::Changed(self.path.clone())
            } else {
                io_err(&self.path, "read image")(e)
            }
        };
        for r in window {
            // The image's data as it is now: for pending pages, as of the freeze.
            let mut ext = Extents {
                file: &self.file,
                path: &self.path,
                size: (r.end * ps).min(self.size),
                ps,
                at: r.start * ps,
                holes: Holes::Seek,
            };
            let mut at = r.start;
            loop {
                let next = ext.next()?;
                let data = match &next {
                    Some(d) => d.start.max(at).min(r.end)..d.end.min(r.end),
                    None => r.end..r.end,
                };
                // In a hole now: copied aside before a write filled it, or zeros.
                let mut p = at;
                while p < data.start {
                    if cow.saved.get(p) {
                        let q = take_run(&mut cow.saved, p, data.start);
                        append(&mut batch, buf, &cow.spill, u64::MAX, p..q, ps)
                            .map_err(spill_err)?;
                        p = q;
                    } else {
                        cow.pending.clear(p);
                        cow.zero.clear(p);
                        hole(&mut holes, p);
                        p += 1;
                    }
                }
                let mut p = data.start;
                while p < data.end {
                    if cow.saved.get(p) {
                        let q = take_run(&mut cow.saved, p, data.end);
                        append(&mut batch, buf, &cow.spill, u64::MAX, p..q, ps)
                            .map_err(spill_err)?;
                        p = q;
                    } else if cow.zero.get(p) {
                        cow.zero.clear(p);
                        hole(&mut holes, p);
                        p += 1;
                    } else {
                        // A run of pages not changed since the freeze: one read.
                        let q = take_run(&mut cow.pending, p, data.end);
                        if q == p {
                            // Neither pending nor kept aside: cannot happen (every frozen page
                            // is one or the other until taken here); refuse rather than guess.
                            return Err(image_err(io::Error::other(format!(
                                "page {p} of the snapshot was lost track of"
                            ))));
                        }
                        append(&mut batch, buf, &self.file, self.size, p..q, ps)
                            .map_err(image_err)?;
                        p = q;
                    }
                }
                at = data.end;
                if next.is_none() || at >= r.end {
                    break;
                }
            }
        }
        Ok((batch, holes))
    }

    /// Closes the image cleanly: waits for a running snapshot, syncs the image and stores the
    /// tracking state (clean, with the image's identity) for the next open.
    pub fn close(self) -> Result<Tracking, ImageError> {
        let _one = self.snapping.lock();
        self.file
            .sync_all()
            .map_err(io_err(&self.path, "sync image"))?;
        let (stamp, settled) = settled_stamp(&self.file, &self.path)?;
        let g = self.inner.lock();
        let state = State {
            clean: true,
            page_size: self.ps as u32,
            image_size: self.size,
            base: g.base.map_or(0, |b| b.0),
            full: g.full.clone(),
            stamp,
            settled,
            path: self.canonical.clone(),
            ranges: g.active.runs(),
        };
        if self.persist {
            state
                .store(&self.state_path)
                .map_err(io_err(&self.state_path, "write tracking state"))?;
        }
        Ok(Tracking {
            base: g.base,
            pages: g.active.count(),
            full_read: g.full.clone(),
        })
    }
}

/// The pages from `p` on that are in `set`, up to `end`: taken out of it; the run's end.
fn take_run(set: &mut Bits, p: u64, end: u64) -> u64 {
    let mut q = p;
    while q < end && set.get(q) {
        set.clear(q);
        q += 1;
    }
    q
}

/// Appends pages `pages` of `file` (each at its own offset; zeros from byte `len` on) to the
/// batch in `buf`.
fn append(
    batch: &mut Batch,
    buf: &mut [u8],
    file: &File,
    len: u64,
    pages: Range<u64>,
    ps: u64,
) -> io::Result<()> {
    let (p, q) = (pages.start, pages.end);
    let at = (batch.pages * ps) as usize;
    let want = ((q - p) * ps) as usize;
    let have = (len.saturating_sub(p * ps).min(want as u64)) as usize;
    buf[at + have..at + want].fill(0);
    file.read_exact_at(&mut buf[at..at + have], p * ps)?;
    match batch.ranges.last_mut() {
        Some(l) if l.end == p => l.end = q,
        _ => batch.ranges.push(p..q),
    }
    batch.pages += q - p;
    batch.end = q;
    Ok(())
}

/// The spill file of a snapshot: unlinked (`O_TMPFILE` where there is one), in the directory of
/// the state file `state` — the store's, whose file system takes the snapshot anyway.
fn spill_file(state: &Path) -> Result<File, ImageError> {
    let dir = state
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .and_then(|()| tempfile::tempfile_in(dir))
        .map_err(io_err(dir, "create the snapshot's copy-on-write file in"))
}

/// The frozen set of a snapshot.
struct Frozen {
    stamp: Stamp,
    settled: bool,
    /// The pages the snapshot takes.
    pages: Bits,
    /// The pages that were tracked at the freeze (tracked again if the snapshot fails).
    tracked: Bits,
}

/// Syncs the image and takes its identity once its last change is [`SETTLE`] old (waiting up to
/// [`SETTLE_LIMIT`]); whether it got there.
fn settled_stamp(file: &File, path: &Path) -> Result<(Stamp, bool), ImageError> {
    file.sync_all().map_err(io_err(path, "sync image"))?;
    let started = Instant::now();
    loop {
        let stamp = Stamp::of(&file.metadata().map_err(io_err(path, "stat image"))?);
        let age = stamp.age();
        if age >= SETTLE {
            return Ok((stamp, true));
        }
        if started.elapsed() >= SETTLE_LIMIT {
            return Ok((stamp, false));
        }
        // Not a wait for a test: see `image::SETTLE`.
        std::thread::sleep(SETTLE - age);
    }
}

const FALLOC_PUNCH: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const FALLOC_ZERO_RANGE: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

/// `fallocate(2)` on the image.
fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: `fallocate` takes no pointers; the descriptor is owned by `file`, open for the
    // whole call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, n) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A set of pages.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Bits {
    words: Vec<u64>,
    len: u64,
}

impl Bits {
    fn new(len: u64) -> Bits {
        Bits {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }
    fn full(len: u64) -> Bits {
        let mut b = Bits {
            words: vec![u64::MAX; len.div_ceil(64) as usize],
            len,
        };
        if !len.is_multiple_of(64) {
            if let Some(last) = b.words.last_mut() {
                *last = (1u64 << (len % 64)) - 1;
            }
        }
        b
    }
    fn set(&mut self, i: u64) {
        self.words[(i / 64) as usize] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: u64) {
        self.words[(i / 64) as usize] &= !(1 << (i % 64));
    }
    fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
    fn union(&mut self, o: &Bits) {
        for (a, b) in self.words.iter_mut().zip(&o.words) {
            *a |= b;
        }
    }
    /// The set as ascending ranges of consecutive pages.
    fn runs(&self) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for (wi, &w) in self.words.iter().enumerate() {
            if w == 0 {
                continue;
            }
            let base = wi as u64 * 64;
            if w == u64::MAX {
                match out.last_mut() {
                    Some(r) if r.end == base => r.end = base + 64,
                    _ => out.push(base..base + 64),
                }
                continue;
            }
            let mut w = w;
            while w != 0 {
                let start = u64::from(w.trailing_zeros());
                let ones = u64::from((w >> start).trailing_ones());
                let (s, e) = (base + start, base + start + ones);
                match out.last_mut() {
                    Some(r) if r.end == s => r.end = e,
                    _ => out.push(s..e),
                }
                w = if start + ones >= 64 {
                    0
                } else {
                    w & !(((1u64 << ones) - 1) << start)
                };
            }
        }
        out
    }
}

/// Reads the state file's fields; `None` when it runs out.
struct Rd<'a>(&'a [u8]);

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (a, b) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = b;
        Some(a)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn text(&mut self) -> Option<String> {
        let n = u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

/// The tracking state file.
#[derive(Clone, Debug, PartialEq, Eq)]
struct State {
    clean: bool,
    page_size: u32,
    image_size: u64,
    /// The base snapshot's id, 0 for none.
    base: u64,
    full: Option<String>,
    stamp: Stamp,
    settled: bool,
    path: String,
    ranges: Vec<Range<u64>>,
}

const STATE_MAGIC: &[u8; 8] = b"PSNTRAK1";

impl State {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.push(u8::from(self.clean));
        b.push(u8::from(self.settled));
        b.extend_from_slice(&self.page_size.to_le_bytes());
        b.extend_from_slice(&self.image_size.to_le_bytes());
        b.extend_from_slice(&self.base.to_le_bytes());
        let s = &self.stamp;
        for v in [s.dev, s.ino, s.size] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for v in [s.mtime.0, s.mtime.1, s.ctime.0, s.ctime.1] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let full = self.full.as_deref().unwrap_or("");
        b.push(u8::from(self.full.is_some()));
        for text in [full, self.path.as_str()] {
            b.extend_from_slice(&(text.len() as u32).to_le_bytes());
            b.extend_from_slice(text.as_bytes());
        }
        b.extend_from_slice(&(self.ranges.len() as u64).to_le_bytes());
        for r in &self.ranges {
            b.extend_from_slice(&r.start.to_le_bytes());
            b.extend_from_slice(&r.end.to_le_bytes());
        }
        let mut out = STATE_MAGIC.to_vec();
        out.extend_from_slice(&blake3::hash(&b).as_bytes()[..16]);
        out.extend_from_slice(&b);
        out
    }

    fn decode(bytes: &[u8]) -> Option<State> {
        let rest = bytes.strip_prefix(STATE_MAGIC)?;
        let (sum, body) = (rest.get(..16)?, rest.get(16..)?);
        if blake3::hash(body).as_bytes()[..16] != *sum {
            return None;
        }
        let mut c = Rd(body);
        let flags = c.take(2)?;
        let (clean, settled) = (flags[0] == 1, flags[1] == 1);
        let page_size = u32::from_le_bytes(c.take(4)?.try_into().ok()?);
        let mut u64s = [0u64; 5];
        for v in &mut u64s {
            *v = c.u64()?;
        }
        let mut i64s = [0i64; 4];
        for v in &mut i64s {
            *v = i64::from_le_bytes(c.take(8)?.try_into().ok()?);
        }
        let has_full = c.take(1)?[0] == 1;
        let full = c.text()?;
        let path = c.text()?;
        let n = c.u64()?;
        if n > (c.0.len() / 16) as u64 {
            return None;
        }
        let mut ranges = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let (s, e) = (c.u64()?, c.u64()?);
            ranges.push(s..e);
        }
        if !c.0.is_empty() {
            return None;
        }
        Some(State {
            clean,
            page_size,
            image_size: u64s[0],
            base: u64s[1],
            full: has_full.then_some(full),
            stamp: Stamp {
                dev: u64s[2],
                ino: u64s[3],
                size: u64s[4],
                mtime: (i64s[0], i64s[1]),
                ctime: (i64s[2], i64s[3]),
            },
            settled,
            path,
            ranges,
        })
    }

    /// Replaces the state file durably: a temporary file, synced, renamed over it, the
    /// directory synced.
    fn store(&self, path: &Path) -> io::Result<()> {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension("tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&self.encode())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests;
