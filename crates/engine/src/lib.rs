//! # pagesnap-engine
//!
//! A persistent virtual address space ([`Space`]): what PhantomOS does to all of memory, as a
//! library. Pages live in frames the engine owns, mapped through the page table
//! (`pagesnap-pagetable`); the first write to a page in an epoch stamps its descriptor and notes the
//! page under its stripe, and the snapshot that seals the epoch folds those notes into the epoch
//! tree (`pagesnap-epochtree`); snapshots persist exactly the pages modified since the last
//! successful snapshot into the store (`pagesnap-store`).
//!
//! - **Snapshot, PhantomOS style but better**: [`Space::begin_snapshot`] pauses the mutator only to
//!   seal the epoch — O(1), whatever the number of mapped pages — and persists in the background
//!   while the mutator runs. A page not yet persisted is copied aside on its first write after the
//!   pause (copy-on-write), so the snapshot holds exactly the state at the pause.
//! - **Never lose dirty state**: "dirty" means "modified after the last *successful* snapshot's
//!   epoch". A snapshot that fails (ENOSPC, EIO, a crash) advances nothing, so its pages are
//!   written by the next one.
//! - **Restore**: [`Space::restore`] rebuilds any retained snapshot; [`Space::open`] takes the
//!   newest one that restores, falling back past damaged ones and saying so; [`Space::open_lazy`]
//!   loads each page from the store on first access (O(1) open, O(1) first touch), through a
//!   read-only store handle and before taking any lock, so a fault never waits for a snapshot's
//!   commit.
//! - **The snapshot a space stands on stays**: its last snapshot (the next one's parent, a lazy
//!   space's source) is pinned in the store; deleting it through [`Space::with_store`] fails with
//!   [`StoreError::Pinned`].
//! - **A panic while persisting is an error, not a wedge**: the store's pending snapshot is
//!   aborted, [`SnapshotHandle::wait`] returns [`EngineError::PersistPanicked`], nothing advances.
//!
//! Locks: the mutators' gate, 256 page stripes, the mapping blocks, the running snapshot's job and
//! its copy-on-write shards, in that order (frames have no lock: a page's stripe guards its frame;
//! the epoch tree is taken only by the persisting thread); the store is taken only by the
//! persisting thread and `with_store`, never
//! by a mutator, and no store I/O happens under a lock a mutator needs (`docs/concurrency.md`).
//! - Mapped-but-zero pages survive: mappings are persisted as bitmap blocks (one store page per
//!   `8 × page size` pages) under store keys at and above 2^62, beside the page data.
//!
//! ```
//! use pagesnap_engine::Space;
//! use pagesnap_pagetable::VirtAddr;
//! use pagesnap_store::{Store, StoreOptions};
//!
//! let dir = tempfile::tempdir().expect("temp dir");
//! let space = Space::create(Store::init(dir.path(), StoreOptions::default()).expect("store")).expect("space");
//! space.map(VirtAddr(0x7000_0000), 8192).expect("map");
//! space.write(VirtAddr(0x7000_0010), b"persistent hello").expect("write");
//! let report = space.snapshot().expect("snapshot");
//! drop(space);
//! let (store, _) = Store::open(dir.path(), pagesnap_store::Mode::Write).expect("reopen");
//! let (space, opened) = Space::open(store).expect("open");
//! assert_eq!(opened.snapshot, Some(report.id));
//! let mut buf = [0u8; 16];
//! space.read(VirtAddr(0x7000_0010), &mut buf).expect("read");
//! assert_eq!(&buf, b"persistent hello");
//! ```

mod cow;
mod frames;
pub mod image;
pub mod names;
pub mod retention;
pub mod tracked;

use pagesnap_epochtree::{EpochTree, EpochTreeError, EpochView};
use pagesnap_pagetable::{
    BlockingLock, Epoch, Fmix64, Page, PageFlags, PageSize, PageTable, PageTableError, PhysAddr,
    VirtAddr, Vpn,
};
use pagesnap_store::{
    pagehash, Mode, SharedStorage, SnapshotId, SnapshotMeta, Store, StoreError, StoreOptions,
};
use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Store (and epoch-tree) keys at and above this hold mapping bitmaps, not pages.
pub const MAP_KEY_BASE: u64 = 1 << 62;
const STRIPES: usize = 256;

/// The engine's page table: writers (map, unmap, a page's first write in an epoch) park on a
/// parking_lot mutex instead of spinning. The spin lock is the page table's `no_std` default, for
/// a kernel that cannot be preempted while holding it; in a process, a writer preempted while
/// holding a spin lock makes every other writer burn its time slice (on a 2-core machine shared
/// with other work, whole slices), so the engine blocks instead.
/// Readers (`get_page`) take no lock either way.
///
/// A descriptor here carries the frame and the epoch of the page's last write; its flags are
/// `PHYS_MEM` only. Whether a page is dirty for a snapshot is the epoch tree's answer (written
/// after the parent's epoch), so no `PHYS_DIRTY` or `HAVE_CURR` is kept in step: clearing them
/// after every commit took the table's writer lock once per persisted page (0.2 s of a
/// snapshot of 1 Mi pages) for flags nothing reads.
type Table = PageTable<Fmix64, BlockingLock>;

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// An access to a page that is not mapped.
    #[error("address {0} is not mapped; map it first")]
    NotMapped(VirtAddr),
    /// The store failed; nothing committed was lost, and dirty pages stay dirty.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The page table is full.
    #[error(transparent)]
    PageTable(#[from] PageTableError),
    /// The store's page size cannot be a page table's.
    #[error("the store's page size ({0} bytes) is not a page size the engine supports")]
    PageSize(u32),
    /// A range that runs past the end of the 64-bit address space.
    #[error("{len} bytes at {addr} run past the end of the 64-bit address space")]
    Range {
        /// Start of the range.
        addr: VirtAddr,
        /// Its length.
        len: u64,
    },
    /// The background snapshot thread died.
    #[error("the snapshot writer thread panicked; the pages it was writing are still dirty")]
    WriterPanicked,
    /// Persisting the snapshot panicked (in the store or its storage backend). The snapshot was not
    /// recorded: the store's pending snapshot was aborted, the space's last snapshot and dirty
    /// pages are unchanged, and the next snapshot writes every page this one would have.
    #[error("persisting the snapshot panicked ({0}); nothing advanced, its pages stay dirty and the next snapshot writes them")]
    PersistPanicked(String),
    /// A lazy space could not open its read-only handle on the store.
    #[error("a lazy space reads pages through a second, read-only handle on the store, and {location} does not open as the same store ({detail}); for a store not on the file system use Space::open_lazy_with / restore_lazy_with with its Storage")]
    LazyReader {
        /// The store's location.
        location: PathBuf,
        /// Why.
        detail: String,
    },
    /// No frame for a new page: the space holds as many as it can (512 GiB of frames, more with
    /// pages over 2 MiB), or the system gave no more memory.
    #[error("no memory for another page: {0}; unmap pages to map others")]
    OutOfFrames(String),
    /// An internal epoch-tree query failed.
    #[error(transparent)]
    Epochs(#[from] EpochTreeError),
}

/// What a snapshot did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotReport {
    /// The snapshot's id in the store.
    pub id: SnapshotId,
    /// The epoch it sealed.
    pub epoch: Epoch,
    /// How long the mutator was paused.
    pub pause: Duration,
    /// Pages (and mapping blocks) persisted: modified since the last successful snapshot.
    pub pages_persisted: u64,
    /// New page records written (content not already in the store).
    pub pages_written: u64,
    /// Bytes of page records written.
    pub data_bytes: u64,
    /// Bytes of metadata written.
    pub meta_bytes: u64,
    /// From the pause to the commit.
    pub duration: Duration,
    /// Pages the mutator changed after the pause before they were persisted, whose state at the
    /// pause was copied aside for this snapshot.
    pub copied_on_write: u64,
}

/// What [`Space::open`] restored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Opened {
    /// The snapshot restored (`None`: the store held none; the space is empty).
    pub snapshot: Option<SnapshotId>,
    /// Newer snapshots passed over because they are damaged, newest first.
    pub damaged: Vec<(SnapshotId, String)>,
}

/// A page stripe: its lock, and the pages of the stripe written for the first time in an epoch
/// that the epoch tree does not record yet. Alone in its cache lines (two: the prefetcher pulls
/// lines in pairs), so a thread taking one stripe does not take the stripes beside it from
/// another core.
#[repr(align(128))]
struct Stripe(Mutex<Written>);

/// First changes of keys (key, epoch of the change) not yet folded into the epoch tree: a writer
/// notes them under the key's lock instead of taking the tree's, and the snapshot that seals their
/// epoch folds them in before it asks the tree what changed ([`Inner::fold_written`]).
#[derive(Default)]
struct Written {
    notes: Vec<(u64, Epoch)>,
    /// The list is sorted and rid of repeats when it grows past this (and [`WRITTEN_KEPT`]).
    compact_at: usize,
}

impl Written {
    /// Notes a change of `key` in `epoch`. Writes note a page once an epoch (its descriptor says
    /// when it was first changed); a map and unmap loop may note one page many times, so the same
    /// note twice in a row is dropped, and a list that doubles is compacted: it never holds more
    /// than about twice the keys changed since the last fold.
    fn note(&mut self, key: u64, epoch: Epoch) {
        if self.notes.last() == Some(&(key, epoch)) {
            return;
        }
        self.notes.push((key, epoch));
        if self.notes.len() > self.compact_at.max(WRITTEN_KEPT) {
            self.notes.sort_unstable();
            self.notes.dedup();
            self.compact_at = 2 * self.notes.len();
        }
    }
}

/// A stripe's noted first writes keep their room up to this many entries after a fold.
const WRITTEN_KEPT: usize = 1024;

struct MapBlock {
    bits: Vec<u8>,
    epoch: Epoch,
}

/// Keys of a batch with their states at the pause, back to back in one buffer and hashed
/// (`pagehash::HashedPages`; a zero or unmapped state has no id and is removed).
type Taken = (Vec<u64>, pagehash::HashedPages);

/// Keys taken, copied and hashed together.
const BATCH_KEYS: usize = 1024;

/// Batch buffers kept between snapshots (the pipeline has two batches in flight), each at most
/// [`KEPT_BUFFER_BYTES`]: a full batch of 4 KiB pages; larger pages get fresh buffers.
const KEPT_BUFFERS: usize = 2;
const KEPT_BUFFER_BYTES: usize = 4 << 20;

/// A snapshot's dirty set up to this size is copied in one sweep right after the pause (see
/// `persist`).
const EAGER_COPY_BYTES: u64 = 64 << 20;

struct Job {
    epoch: Epoch,
    since: Epoch,
    /// Every key's state at the pause has been taken: writers need no copy-on-write at all (and
    /// take none of the job's locks).
    all_copied: std::sync::atomic::AtomicBool,
    /// The epoch tree sealed at this snapshot's epoch, once the snapshot has folded the notes in:
    /// what a writer asks about a key whose last change it cannot see (a page being mapped).
    view: std::sync::OnceLock<EpochView>,
}

struct Persisted {
    epoch: Epoch,
    id: Option<SnapshotId>,
}

/// Where a lazy space's read-only store handles come from.
#[derive(Clone, Debug)]
enum ReaderIo {
    /// A std::fs store directory: each handle has its own `FsStorage` (its own open files), so a
    /// lazy read never waits for the writer's backend, and a handle dropped after a gc lets go of
    /// the removed segments.
    Dir(PathBuf),
    /// The caller's backend (shared with the writer).
    Shared(SharedStorage),
}

impl ReaderIo {
    fn open(&self) -> Result<Store, StoreError> {
        match self {
            ReaderIo::Dir(dir) => Store::open(dir, Mode::Read).map(|(s, _)| s),
            ReaderIo::Shared(io) => {
                Store::open_with(io.clone(), Mode::Read, StoreOptions::default()).map(|(s, _)| s)
            }
        }
    }
}

/// What a lazy space reads never-touched pages and mapping blocks from: a read-only handle on the
/// store (the last committed state when it was opened) and a snapshot in it. Every page not yet
/// resident and every block not yet loaded is unchanged since the space was opened, so it is the
/// same in the source snapshot and in every snapshot the space committed since; the source is
/// moved to each new snapshot when it commits, and is always pinned.
struct LazySource {
    reader: Store,
    id: SnapshotId,
    io: ReaderIo,
}

impl LazySource {
    fn open(io: ReaderIo, id: SnapshotId) -> Result<LazySource, StoreError> {
        Ok(LazySource {
            reader: io.open()?,
            id,
            io,
        })
    }
}

struct Inner {
    ps: PageSize,
    table: Table,
    frames: frames::Frames,
    maps: Mutex<BTreeMap<u64, MapBlock>>,
    tree: Mutex<EpochTree>,
    current: AtomicU64,
    gate: RwLock<()>,
    job: RwLock<Option<Arc<Job>>>,
    running: Mutex<bool>,
    idle: Condvar,
    persisted: Mutex<Persisted>,
    store: Mutex<Store>,
    /// A lazy space: pages and mapping blocks not in memory are read from the source.
    lazy_mode: bool,
    /// The lazy source. Held only to clone or swap the `Arc`: no I/O under it.
    lazy: Mutex<Option<Arc<LazySource>>>,
    /// The snapshots this space pinned in the store (its parent and its lazy source).
    pins: Mutex<BTreeSet<SnapshotId>>,
    stripes: Vec<Stripe>,
    /// Copies on write for the snapshot being persisted, sharded by stripe.
    cow: cow::CowShards,
    /// Mapping blocks changed for the first time in an epoch, not yet in the epoch tree (taken
    /// under the mapping blocks' lock, as a stripe's [`Written`] is under the stripe's).
    map_written: Mutex<Written>,
    /// Dirty sets up to this many bytes are copied in one sweep after the pause.
    eager_copy: AtomicU64,
    /// Batch buffers of earlier snapshots, kept for the next (at most [`KEPT_BUFFERS`] of at
    /// most [`KEPT_BUFFER_BYTES`]): a snapshot every few milliseconds then copies into memory
    /// already mapped.
    buffers: Mutex<Vec<Vec<u8>>>,
}

/// Ends a snapshot's persisting on every path, a panic included: aborts the store's pending
/// snapshot unless persisting ended normally (it commits or aborts by itself then), clears the
/// job, and lets the next snapshot (and `with_store`) in.
struct Finish<'a> {
    inner: &'a Inner,
    store_clean: bool,
}

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        if !self.store_clean {
            // A no-op when nothing is pending; parking_lot mutexes are not poisoned, and the
            // persister's guard on the store was released when it unwound.
            self.inner.store.lock().abort();
        }
        *self.inner.job.write() = None;
        self.inner.cow.clear();
        *self.inner.running.lock() = false;
        self.inner.idle.notify_all();
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_string()
    }
}

/// A persistent virtual address space backed by a snapshot store.
pub struct Space {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Space {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Space")
            .field("epoch", &self.current_epoch())
            .field("resident_pages", &self.inner.table.len())
            .finish()
    }
}

/// A snapshot persisting in the background.
#[derive(Debug)]
pub struct SnapshotHandle {
    pause: Duration,
    thread: std::thread::JoinHandle<Result<SnapshotReport, EngineError>>,
    hold: Option<std::sync::mpsc::Sender<()>>,
}

impl SnapshotHandle {
    /// How long the mutator was paused.
    pub fn pause(&self) -> Duration {
        self.pause
    }

    /// Lets a snapshot begun with [`Space::begin_snapshot_held`] start persisting.
    pub fn release(&mut self) {
        if let Some(go) = self.hold.take() {
            // The writer thread only ends after receiving; a send error means it is gone already.
            let _ = go.send(());
        }
    }

    /// Waits for the snapshot to commit. A panic while persisting is returned as
    /// [`EngineError::PersistPanicked`] (the space stays usable; nothing advanced).
    pub fn wait(mut self) -> Result<SnapshotReport, EngineError> {
        self.release();
        self.thread
            .join()
            .map_err(|_| EngineError::WriterPanicked)?
    }
}

fn bits_shift(ps: PageSize) -> u32 {
    ps.shift() + 3
}

impl Inner {
    fn new(
        mut store: Store,
        lazy: Option<LazySource>,
        persisted: Persisted,
    ) -> Result<Inner, EngineError> {
        let ps = PageSize::from_bytes(u64::from(store.page_size()))
            .ok_or(EngineError::PageSize(store.page_size()))?;
        let next = persisted.epoch.next();
        let pins: BTreeSet<SnapshotId> = persisted
            .id
            .into_iter()
            .chain(lazy.as_ref().map(|l| l.id))
            .collect();
        for id in &pins {
            store.pin(*id);
        }
        Ok(Inner {
            ps,
            table: Table::with_config(ps, 0),
            frames: frames::Frames::new(ps.shift()),
            maps: Mutex::new(BTreeMap::new()),
            tree: Mutex::new(EpochTree::starting_at(next)),
            current: AtomicU64::new(next.0),
            gate: RwLock::new(()),
            job: RwLock::new(None),
            running: Mutex::new(false),
            idle: Condvar::new(),
            persisted: Mutex::new(persisted),
            store: Mutex::new(store),
            lazy_mode: lazy.is_some(),
            lazy: Mutex::new(lazy.map(Arc::new)),
            pins: Mutex::new(pins),
            stripes: (0..STRIPES)
                .map(|_| Stripe(Mutex::new(Written::default())))
                .collect(),
            cow: cow::CowShards::new(STRIPES, ps.bytes() as usize),
            map_written: Mutex::new(Written::default()),
            eager_copy: AtomicU64::new(EAGER_COPY_BYTES),
            buffers: Mutex::new(Vec::new()),
        })
    }

    fn stripe_index(&self, key: u64) -> usize {
        (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as usize % STRIPES
    }

    fn stripe(&self, key: u64) -> &Mutex<Written> {
        &self.stripes[self.stripe_index(key)].0
    }

    /// The frame a physical address names.
    fn frame_index(&self, paddr: PhysAddr) -> usize {
        (paddr.0 >> self.ps.shift()) as usize
    }

    /// The bytes of the frame `page` is mapped to, to read.
    ///
    /// # Safety
    /// The stripe of `page` is held (since `page` was looked up), so its frame is the one mapped
    /// there and no other thread writes it meanwhile.
    unsafe fn frame(&self, page: &Page) -> &[u8] {
        // SAFETY: the caller's contract is the frames' contract.
        unsafe { self.frames.bytes(self.frame_index(page.paddr)) }
    }

    /// The bytes of the frame `page` is mapped to, to write.
    ///
    /// # Safety
    /// As [`Inner::frame`]: the stripe of `page` is held, so no other thread reads or writes it.
    #[allow(clippy::mut_from_ref)]
    unsafe fn frame_mut(&self, page: &Page) -> &mut [u8] {
        // SAFETY: the caller's contract is the frames' contract.
        unsafe { self.frames.bytes_mut(self.frame_index(page.paddr)) }
    }

    fn alloc_frame(&self, content: Option<&[u8]>) -> Result<PhysAddr, EngineError> {
        if let Some(c) = content.filter(|c| c.len() as u64 != self.ps.bytes()) {
            return Err(StoreError::PageSize {
                len: c.len(),
                page_size: self.ps.bytes() as u32,
            }
            .into());
        }
        let idx = self
            .frames
            .alloc(content)
            .map_err(|e| EngineError::OutOfFrames(e.0))?;
        Ok(PhysAddr((idx as u64) << self.ps.shift()))
    }

    fn lazy_source(&self) -> Option<Arc<LazySource>> {
        self.lazy.lock().clone()
    }

    /// Reads `key` (a page, or a mapping block at `MAP_KEY_BASE + block`) from the lazy source.
    /// Takes no lock of the space while reading: callers hold none either (entry points load what
    /// they need before taking the gate or a stripe). A read through a handle that went stale — the
    /// source moved to a newer snapshot, or a gc removed the segments it names — is retried on a
    /// fresh handle; reads are checked (crc32, blake3), so a stale handle fails, never lies.
    fn lazy_read(&self, key: u64) -> Result<Option<Vec<u8>>, EngineError> {
        let Some(mut src) = self.lazy_source() else {
            return Ok(None);
        };
        let mut attempts = 0;
        loop {
            let err = match src.reader.read_page(src.id, Vpn(key)) {
                Ok(content) => return Ok(content),
                Err(e) => e,
            };
            attempts += 1;
            if attempts > 3 {
                return Err(err.into());
            }
            match self.lazy_source() {
                Some(now) if !Arc::ptr_eq(&now, &src) => src = now,
                _ => {
                    let Ok(fresh) = LazySource::open(src.io.clone(), src.id) else {
                        return Err(err.into());
                    };
                    if fresh.reader.generation() == src.reader.generation() {
                        // The store did not move on: the error is the store's answer.
                        return Err(err.into());
                    }
                    let fresh = Arc::new(fresh);
                    let mut slot = self.lazy.lock();
                    if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, &src)) {
                        *slot = Some(fresh.clone());
                    }
                    drop(slot);
                    src = fresh;
                }
            }
        }
    }

    /// Loads the mapping blocks covering `vpns` from the lazy source, without holding the blocks'
    /// lock while reading; a block loaded meanwhile by another thread wins. A block the source
    /// does not have is installed empty, so it is never looked for again.
    fn ensure_blocks(&self, vpns: std::ops::Range<u64>) -> Result<(), EngineError> {
        if !self.lazy_mode || vpns.is_empty() {
            return Ok(());
        }
        let shift = bits_shift(self.ps);
        for b in (vpns.start >> shift)..=((vpns.end - 1) >> shift) {
            if self.maps.lock().contains_key(&b) {
                continue;
            }
            let bits = self.lazy_read(MAP_KEY_BASE + b)?;
            self.maps.lock().entry(b).or_insert_with(|| MapBlock {
                bits: bits.unwrap_or_else(|| vec![0; self.ps.bytes() as usize]),
                epoch: Epoch(0),
            });
        }
        Ok(())
    }

    /// Reads from the lazy source every page of `vpns` that is mapped but not resident, holding
    /// no lock while reading. Such a page has never been touched since the space was opened (a
    /// fault makes a page resident, and only `unmap` makes it non-resident again), so what is read
    /// is still its content when it is installed under its stripe. Mapping blocks loaded first.
    fn prefetch(
        &self,
        vpns: std::ops::Range<u64>,
    ) -> Result<HashMap<u64, Option<Vec<u8>>>, EngineError> {
        let mut loaded = HashMap::new();
        if !self.lazy_mode {
            return Ok(loaded);
        }
        self.ensure_blocks(vpns.clone())?;
        for vpn in vpns {
            if self.table.get_page(self.ps.addr(Vpn(vpn))).is_none() && self.is_mapped(vpn)? {
                loaded.insert(vpn, self.lazy_read(vpn)?);
            }
        }
        Ok(loaded)
    }

    /// The mapping block `b`. `maps` held. In a lazy space the entry points load blocks before
    /// taking any lock ([`Inner::ensure_blocks`]) and blocks are never evicted, so this finds it;
    /// were one missing, it is read here (under the lock: correct, only slower).
    fn block<'a>(
        &self,
        maps: &'a mut BTreeMap<u64, MapBlock>,
        b: u64,
    ) -> Result<Option<&'a mut MapBlock>, EngineError> {
        match maps.entry(b) {
            std::collections::btree_map::Entry::Occupied(o) => Ok(Some(o.into_mut())),
            std::collections::btree_map::Entry::Vacant(v) => {
                if !self.lazy_mode {
                    return Ok(None);
                }
                let bits = self.lazy_read(MAP_KEY_BASE + b)?;
                Ok(bits.map(|bits| {
                    v.insert(MapBlock {
                        bits,
                        epoch: Epoch(0),
                    })
                }))
            }
        }
    }

    fn is_mapped(&self, vpn: u64) -> Result<bool, EngineError> {
        let shift = bits_shift(self.ps);
        let mut maps = self.maps.lock();
        let bit = vpn & ((1 << shift) - 1);
        Ok(self
            .block(&mut maps, vpn >> shift)?
            .is_some_and(|b| b.bits[(bit / 8) as usize] & (1 << (bit % 8)) != 0))
    }

    /// The resident descriptor of a mapped page, installing it from `loaded` (the lazy source's
    /// content, read by [`Inner::prefetch`] with no lock held) if it is not resident. Stripe held.
    fn resident(
        &self,
        vpn: u64,
        loaded: &mut HashMap<u64, Option<Vec<u8>>>,
    ) -> Result<Option<Page>, EngineError> {
        let vaddr = self.ps.addr(Vpn(vpn));
        if let Some(p) = self.table.get_page(vaddr) {
            return Ok(Some(p));
        }
        if !self.lazy_mode || !self.is_mapped(vpn)? {
            return Ok(None);
        }
        let content = match loaded.remove(&vpn) {
            Some(c) => c,
            // Mapped and not resident now means mapped and not resident at the prefetch too (no
            // operation leads into that state), so this is not reached; reading here is correct.
            None => self.lazy_read(vpn)?,
        };
        let paddr = self.alloc_frame(content.as_deref())?;
        let page = Page {
            paddr,
            flags: PageFlags::PHYS_MEM,
            ..self.table.page_init(vaddr)
        };
        if let Err(e) = self.table.set_page(page) {
            self.frames.free(self.frame_index(paddr));
            return Err(e.into());
        }
        Ok(Some(page))
    }

    /// Pins in the store the snapshots the space stands on — its last snapshot (the parent of the
    /// next) and its lazy source — and unpins those it no longer does. `store` is the space's.
    fn sync_pins(&self, store: &mut Store) {
        let mut need: BTreeSet<SnapshotId> = self.persisted.lock().id.into_iter().collect();
        need.extend(self.lazy_source().map(|l| l.id));
        let mut pins = self.pins.lock();
        for id in pins.difference(&need) {
            store.unpin(*id);
        }
        for id in need.difference(&pins) {
            store.pin(*id);
        }
        *pins = need;
    }

    /// After a commit or a `with_store`: a lazy space reads from `id` (its newest snapshot) through
    /// a handle that sees the store's current state. No lock held while opening; on failure the
    /// old source stays (and stays pinned).
    fn refresh_lazy(&self, id: SnapshotId, generation: u64) {
        let Some(src) = self.lazy_source() else {
            return;
        };
        if src.id == id && src.reader.generation() == generation {
            return;
        }
        if let Ok(fresh) = LazySource::open(src.io.clone(), id) {
            *self.lazy.lock() = Some(Arc::new(fresh));
        }
    }

    /// Locks the stripes of every page in `vpns`, in stripe order (all of them for a large range):
    /// (stripe index, guard), sorted by index.
    fn lock_stripes(&self, vpns: std::ops::Range<u64>) -> Vec<(usize, MutexGuard<'_, Written>)> {
        let mut idx: Vec<usize> = if vpns.end - vpns.start >= STRIPES as u64 {
            (0..STRIPES).collect()
        } else {
            vpns.map(|v| self.stripe_index(v)).collect()
        };
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter()
            .map(|i| (i, self.stripes[i].0.lock()))
            .collect()
    }

    /// The snapshot `job`'s view of every change up to its pause: folds the notes in (once) and
    /// publishes the view to writers ([`Job::view`]).
    fn fold(&self, job: &Job) -> EpochView {
        job.view
            .get_or_init(|| self.fold_written(job.epoch))
            .clone()
    }

    /// Folds the changes noted up to `epoch` (in the stripes, and for mapping blocks) into the
    /// epoch tree, at the epochs they were made in, and seals the tree there: the view of every
    /// change up to `epoch`. Called by the snapshot of `epoch`, first thing: the writers note their
    /// first change of a key in an epoch under the key's own lock, and never take the tree's.
    fn fold_written(&self, epoch: Epoch) -> EpochView {
        // The notes are copied first and forgotten only once the tree has them, so no failure
        // between the two can lose one. No note of these epochs is added meanwhile: writers have
        // used a later epoch since the pause.
        let mut noted = Vec::new();
        let copy_due = |w: &Written, noted: &mut Vec<(u64, Epoch)>| {
            noted.extend(w.notes.iter().filter(|(_, e)| *e <= epoch));
        };
        for stripe in &self.stripes {
            copy_due(&stripe.0.lock(), &mut noted);
        }
        copy_due(&self.map_written.lock(), &mut noted);
        // In key order, the tree's walks share their paths.
        noted.sort_unstable();
        let view = {
            let mut tree = self.tree.lock();
            tree.advance_to(epoch);
            for &(key, e) in &noted {
                tree.mark_at(Vpn(key), e);
            }
            tree.seal()
        };
        let forget = |w: &mut Written| {
            w.notes.retain(|(_, e)| *e > epoch);
            w.compact_at = 2 * w.notes.len();
            if w.notes.capacity() > WRITTEN_KEPT && w.notes.len() < w.notes.capacity() / 4 {
                let keep = w.notes.len().max(WRITTEN_KEPT);
                w.notes.shrink_to(keep);
            }
        };
        for stripe in &self.stripes {
            forget(&mut stripe.0.lock());
        }
        forget(&mut self.map_written.lock());
        view
    }

    /// The resident descriptors of every page in `vpns` (stripes held), or the first unmapped one.
    fn resident_range(
        &self,
        addr: VirtAddr,
        vpns: std::ops::Range<u64>,
        loaded: &mut HashMap<u64, Option<Vec<u8>>>,
    ) -> Result<Vec<Page>, EngineError> {
        let first = vpns.start;
        vpns.map(|vpn| {
            let at = if vpn == first {
                addr
            } else {
                self.ps.addr(Vpn(vpn))
            };
            self.resident(vpn, loaded)?
                .ok_or(EngineError::NotMapped(at))
        })
        .collect()
    }

    /// Splits `len` bytes at `addr` by page: calls `f(page index in range, offset in page, byte
    /// range in the caller's buffer)`.
    fn chunks(
        &self,
        addr: VirtAddr,
        len: usize,
        mut f: impl FnMut(usize, usize, std::ops::Range<usize>),
    ) {
        let ps = self.ps.bytes();
        let (mut done, mut i) = (0usize, 0usize);
        while done < len {
            let a = addr.0.wrapping_add(done as u64);
            let off = (a & (ps - 1)) as usize;
            let n = (ps as usize - off).min(len - done);
            f(i, off, done..done + n);
            done += n;
            i += 1;
        }
    }

    /// Copy-on-write: before the first change of `key` after a pause, keep its state at the pause
    /// for the snapshot being persisted, if that snapshot still needs it (`cow.rs`). The key's
    /// lock is held (its stripe; the mapping blocks' lock for a block). `last` is the epoch of the
    /// key's last change (a resident page's descriptor, a mapping block's; the epoch tree records
    /// the same): the snapshot holds the key only if that is after its parent's and not after the
    /// pause. Without it (a page not mapped, or not resident) the snapshot's view is asked once it
    /// is folded; before that the state is kept anyway (a copy of a key the snapshot does not hold
    /// is never taken, and goes when the snapshot ends).
    fn preserve<'a>(
        &self,
        key: u64,
        last: Option<Epoch>,
        state: impl FnOnce() -> Option<&'a [u8]>,
    ) {
        let job = self.job.read();
        let Some(job) = job.as_ref() else { return };
        if job.all_copied.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let needed = || match last {
            // Changed after the pause: that first change decided already.
            Some(e) => e > job.since && e <= job.epoch,
            None => job
                .view
                .get()
                .is_none_or(|v| v.last_modified(Vpn(key)).is_some_and(|e| e > job.since)),
        };
        self.cow
            .keep(self.stripe_index(key), job.epoch, key, needed, state);
    }

    /// The first write to `page` in `epoch`: its state before is kept for a snapshot that needs
    /// it, its descriptor takes the epoch, and the write is noted in `written`, its stripe's, for
    /// the epoch tree. Stripe of `page` held (`written` is its guarded state).
    fn first_write(&self, page: &Page, epoch: Epoch, written: &mut Written) {
        let vpn = self.ps.vpn(page.vaddr);
        self.preserve(vpn.0, Some(page.epoch), || {
            // SAFETY: the page's stripe is held (the caller's contract).
            let bytes = unsafe { self.frame(page) };
            Some(bytes)
        });
        self.table.update(page.vaddr, |p| p.epoch = epoch);
        written.note(vpn.0, epoch);
    }

    /// Sets or clears the mapping bit of `vpn`. Stripe of `vpn` held.
    fn set_mapped(&self, vpn: u64, on: bool, epoch: Epoch) -> Result<(), EngineError> {
        let shift = bits_shift(self.ps);
        let (b, bit) = (vpn >> shift, vpn & ((1 << shift) - 1));
        let mut maps = self.maps.lock();
        if self.block(&mut maps, b)?.is_none() {
            maps.insert(
                b,
                MapBlock {
                    bits: vec![0; self.ps.bytes() as usize],
                    epoch: Epoch(0),
                },
            );
        }
        let key = MAP_KEY_BASE + b;
        let Some(block) = maps.get_mut(&b) else {
            unreachable!("inserted above")
        };
        if block.epoch < epoch {
            let before = &block.bits[..];
            self.preserve(key, Some(block.epoch), || {
                Some(before).filter(|b| b.iter().any(|x| *x != 0))
            });
            block.epoch = epoch;
            self.map_written.lock().note(key, epoch);
        }
        let byte = &mut block.bits[(bit / 8) as usize];
        if on {
            *byte |= 1 << (bit % 8);
        } else {
            *byte &= !(1 << (bit % 8));
        }
        Ok(())
    }

    /// Copies the state of `key` at the pause, for the snapshot `job`, into `out` (one page;
    /// zeros if it is unmapped), and says whether it came from a copy-on-write copy.
    fn state_at_pause(&self, job: &Job, key: u64, out: &mut [u8]) -> Result<bool, StoreError> {
        // Every state is one page long (a frame, a mapping block, a copy of either); another
        // length is refused as the store would refuse it.
        let put = |state: Option<&[u8]>, out: &mut [u8]| match state {
            None | Some([]) => {
                out.fill(0);
                Ok(())
            }
            Some(b) if b.len() == out.len() => {
                out.copy_from_slice(b);
                Ok(())
            }
            Some(b) => Err(StoreError::PageSize {
                len: b.len(),
                page_size: out.len() as u32,
            }),
        };
        let shard = self.stripe_index(key);
        if key >= MAP_KEY_BASE {
            let maps = self.maps.lock();
            if let Some(r) = self.cow.take(shard, job.epoch, key, |p| put(p, &mut *out)) {
                r?;
                return Ok(true);
            }
            put(maps.get(&(key - MAP_KEY_BASE)).map(|b| &b.bits[..]), out)?;
            return Ok(false);
        }
        let _s = self.stripe(key).lock();
        if let Some(r) = self.cow.take(shard, job.epoch, key, |p| put(p, &mut *out)) {
            r?;
            return Ok(true);
        }
        match self.table.get_page(self.ps.addr(Vpn(key))) {
            // SAFETY: the stripe of `key` is held since before the lookup.
            Some(page) => put(Some(unsafe { self.frame(&page) }), out)?,
            None => put(None, out)?,
        }
        Ok(false)
    }

    /// Copies the states of `keys` at the pause into one buffer, page after page; with how many
    /// came from copy-on-write copies. Every key is taken even when one fails (the sweep's
    /// protocol); the first error is returned.
    fn copy_states(&self, job: &Job, keys: &[u64]) -> Result<(Vec<u8>, u64), StoreError> {
        let ps = self.ps.bytes() as usize;
        let n = keys.len() * ps;
        let kept = self.buffers.lock().pop();
        let mut buf = match kept {
            // Only the part past its length is zeroed; every page is written below.
            Some(mut b) if b.capacity() >= n => {
                b.resize(n, 0);
                b
            }
            // Fresh zeroed memory from the allocator (not written twice), room for a whole batch
            // when it will be kept: the next snapshot's batch, a few pages longer or shorter,
            // then fits without a new allocation.
            _ => {
                let full = BATCH_KEYS * ps;
                let len = if full <= KEPT_BUFFER_BYTES {
                    full.max(n)
                } else {
                    n
                };
                let mut b = vec![0u8; len];
                b.truncate(n);
                b
            }
        };
        let mut cow = 0u64;
        let mut failed = None;
        for (&key, out) in keys.iter().zip(buf.chunks_exact_mut(ps)) {
            match self.state_at_pause(job, key, out) {
                Ok(c) => cow += u64::from(c),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok((buf, cow)),
        }
    }

    /// Puts (or removes) a batch of states taken at the pause into the pending snapshot.
    fn store_taken(&self, (keys, pages): Taken) -> Result<(), StoreError> {
        let mut store = self.store.lock();
        for (i, &key) in keys.iter().enumerate() {
            store.put_hashed_pages(Vpn(key), &pages, i)?;
        }
        drop(store);
        let buf = pages.into_buffer();
        let mut kept = self.buffers.lock();
        if kept.len() < KEPT_BUFFERS && buf.capacity() <= KEPT_BUFFER_BYTES {
            kept.push(buf);
        }
        Ok(())
    }

    fn persist(
        &self,
        job: &Job,
        started: Instant,
        pause: Duration,
    ) -> Result<SnapshotReport, EngineError> {
        // First, whatever happens next: the changes noted up to this epoch go into the tree (a
        // later snapshot, after this one fails say, finds them there), sealed at this epoch.
        let view = self.fold(job);
        let mut keys: Vec<u64> = view.modified_since(job.since)?.map(|(v, _)| v.0).collect();
        // Taken in ascending order (`cow.rs`); the tree yields them so, this makes sure.
        if !keys.is_sorted() {
            keys.sort_unstable();
        }
        let mut copied_on_write = 0u64;
        let parent = self.persisted.lock().id;
        self.store.lock().begin(parent)?;
        // A dirty set that fits in memory comfortably is taken whole first (one sweep of copies):
        // from then on writers need no copy-on-write and take none of the job's locks, so a
        // mutator is slowed only for that sweep. A larger one goes in batches, as it is stored.
        let eager = (keys.len() as u64).saturating_mul(self.ps.bytes())
            <= self.eager_copy.load(std::sync::atomic::Ordering::Relaxed);
        let ids = self.store.lock().page_ids();
        let ps = self.ps.bytes() as usize;
        let mut copied: Vec<Option<Vec<u8>>> = Vec::new();
        let mut swept_err = None;
        if eager {
            for batch in keys.chunks(BATCH_KEYS) {
                match self.copy_states(job, batch) {
                    Ok((buf, cow)) => {
                        copied_on_write += cow;
                        copied.push(Some(buf));
                    }
                    Err(e) => {
                        swept_err.get_or_insert(e);
                        copied.push(None);
                    }
                }
            }
            job.all_copied
                .store(true, std::sync::atomic::Ordering::Release);
        }
        let result = (|| -> Result<_, StoreError> {
            if let Some(e) = swept_err {
                return Err(e);
            }
            // In batches: take the states at the pause (unless the sweep did), hash them, then
            // store.
            let mut ready: Option<Taken> = None;
            for (i, batch) in keys.chunks(BATCH_KEYS).enumerate() {
                let swept = copied.get_mut(i).and_then(Option::take);
                // This batch's states are taken (copied out of their frames, unless the sweep did)
                // and hashed while the one before is stored (its copies into the store's buffer
                // and its writes), so the three overlap.
                let (taken_batch, stored) = rayon::join(
                    || -> Result<(Taken, u64), StoreError> {
                        let (buf, cow) = match swept {
                            Some(buf) => (buf, 0),
                            None => self.copy_states(job, batch)?,
                        };
                        let pages = pagehash::HashedPages::new(&ids, buf, batch.len(), ps);
                        Ok(((batch.to_vec(), pages), cow))
                    },
                    || match ready.take() {
                        Some(t) => self.store_taken(t),
                        None => Ok(()),
                    },
                );
                stored?;
                let (t, cow) = taken_batch?;
                copied_on_write += cow;
                ready = Some(t);
            }
            if let Some(t) = ready.take() {
                self.store_taken(t)?;
            }
            let mapped = self
                .maps
                .lock()
                .values()
                .map(|b| {
                    b.bits
                        .iter()
                        .map(|x| u64::from(x.count_ones()))
                        .sum::<u64>()
                })
                .sum::<u64>();
            let meta = SnapshotMeta {
                epoch: job.epoch,
                logical_size: mapped * self.ps.bytes(),
                ..SnapshotMeta::default()
            };
            let mut store = self.store.lock();
            let commit = store.commit(meta)?;
            Ok((commit, store.generation()))
        })();
        let (commit, generation) = match result {
            Ok(c) => c,
            Err(e) => {
                // The store rolls a failed commit back; this aborts a failed put. Nothing is marked
                // persisted, so every page of this snapshot is written by the next one.
                self.store.lock().abort();
                return Err(e.into());
            }
        };
        {
            let mut p = self.persisted.lock();
            p.epoch = job.epoch;
            p.id = Some(commit.id);
        }
        // The space stands on the new snapshot now: a lazy space reads its untouched pages from
        // it, and the pins move to it (before `running` clears, so no `with_store` sees between).
        self.refresh_lazy(commit.id, generation);
        self.sync_pins(&mut self.store.lock());
        self.tree.lock().retire_before(job.epoch);
        Ok(SnapshotReport {
            id: commit.id,
            epoch: job.epoch,
            pause,
            pages_persisted: keys.len() as u64,
            pages_written: commit.pages_written,
            data_bytes: commit.data_bytes,
            meta_bytes: commit.meta_bytes,
            duration: started.elapsed(),
            copied_on_write,
        })
    }
}

impl Space {
    /// An empty space on `store` (opened as the writer). Snapshots go on top of the store's
    /// newest snapshot's history only through [`Space::open`]; this starts from nothing.
    pub fn create(store: Store) -> Result<Space, EngineError> {
        let epoch = store
            .snapshots()?
            .iter()
            .map(|s| s.epoch)
            .max()
            .unwrap_or(Epoch(0));
        Ok(Space {
            inner: Arc::new(Inner::new(store, None, Persisted { epoch, id: None })?),
        })
    }

    /// Rebuilds snapshot `id` of `store` (opened as the writer) in memory: every mapped page
    /// resident. New snapshots are taken on top of it.
    pub fn restore(store: Store, id: SnapshotId) -> Result<Space, EngineError> {
        let info = store.snapshot(id)?;
        let inner = Inner::new(
            store,
            None,
            Persisted {
                epoch: info.epoch,
                id: Some(id),
            },
        )?;
        let mut pages = Vec::new();
        {
            let store = inner.store.lock();
            store.for_each_page(id, |vpn, r| {
                let bytes = store.read_ref(r)?;
                if vpn.0 >= MAP_KEY_BASE {
                    inner.maps.lock().insert(
                        vpn.0 - MAP_KEY_BASE,
                        MapBlock {
                            bits: bytes,
                            epoch: Epoch(0),
                        },
                    );
                } else {
                    pages.push((vpn.0, bytes));
                }
                Ok(())
            })?;
        }
        let mut content: HashMap<u64, Vec<u8>> = pages.into_iter().collect();
        let shift = bits_shift(inner.ps);
        let mapped: Vec<u64> = inner
            .maps
            .lock()
            .iter()
            .flat_map(|(b, blk)| {
                let base = b << shift;
                blk.bits.iter().enumerate().flat_map(move |(i, byte)| {
                    (0..8u64)
                        .filter(move |k| byte & (1 << k) != 0)
                        .map(move |k| base + i as u64 * 8 + k)
                })
            })
            .collect();
        for vpn in mapped {
            let bytes = content.remove(&vpn);
            let paddr = inner.alloc_frame(bytes.as_deref())?;
            let vaddr = inner.ps.addr(Vpn(vpn));
            inner.table.set_page(Page {
                paddr,
                flags: PageFlags::PHYS_MEM,
                ..inner.table.page_init(vaddr)
            })?;
        }
        Ok(Space {
            inner: Arc::new(inner),
        })
    }

    /// Like [`Space::restore`], but loads nothing up front: each page (and mapping block) is read
    /// from the store on its first access, through a second, read-only handle on the store's
    /// directory ([`Store::location`]), so that a lazy fault never waits for a snapshot being
    /// written. For a store on another [`pagesnap_store::Storage`], use
    /// [`Space::restore_lazy_with`].
    pub fn restore_lazy(store: Store, id: SnapshotId) -> Result<Space, EngineError> {
        let io = ReaderIo::Dir(store.location().to_path_buf());
        Self::restore_lazy_on(store, id, io)
    }

    /// [`Space::restore_lazy`] reading pages through read-only handles opened on `io`, which must
    /// be the store's own backend.
    pub fn restore_lazy_with(
        store: Store,
        id: SnapshotId,
        io: SharedStorage,
    ) -> Result<Space, EngineError> {
        Self::restore_lazy_on(store, id, ReaderIo::Shared(io))
    }

    fn restore_lazy_on(store: Store, id: SnapshotId, io: ReaderIo) -> Result<Space, EngineError> {
        let info = store.snapshot(id)?;
        let not_same = |detail: String| EngineError::LazyReader {
            location: store.location().to_path_buf(),
            detail,
        };
        let source = LazySource::open(io, id).map_err(|e| not_same(e.to_string()))?;
        // The handle must see this very store: same committed generation, same snapshot.
        let seen = source
            .reader
            .snapshot(id)
            .map_err(|e| not_same(e.to_string()))?;
        if source.reader.generation() != store.generation() || seen.merkle_root != info.merkle_root
        {
            return Err(not_same(
                "it holds a different state than the store handle given".into(),
            ));
        }
        let inner = Inner::new(
            store,
            Some(source),
            Persisted {
                epoch: info.epoch,
                id: Some(id),
            },
        )?;
        Ok(Space {
            inner: Arc::new(inner),
        })
    }

    /// Restores the newest snapshot that restores cleanly, passing over damaged newer ones (and
    /// saying which in [`Opened::damaged`]); an empty space if the store has no snapshot.
    pub fn open(store: Store) -> Result<(Space, Opened), EngineError> {
        Self::open_with(store, None)
    }

    /// [`Space::open`] with lazy loading: O(1) in the number of pages. Damage inside a snapshot is
    /// found when the damaged page is first touched (as an error, never as wrong data); open only
    /// checks each candidate's manifest and index root.
    /// Pages are read through a second, read-only handle on the store (see [`Space::restore_lazy`]).
    pub fn open_lazy(store: Store) -> Result<(Space, Opened), EngineError> {
        let io = ReaderIo::Dir(store.location().to_path_buf());
        Self::open_with(store, Some(io))
    }

    /// [`Space::open_lazy`] reading pages through read-only handles opened on `io`, which must be
    /// the store's own backend.
    pub fn open_lazy_with(store: Store, io: SharedStorage) -> Result<(Space, Opened), EngineError> {
        Self::open_with(store, Some(ReaderIo::Shared(io)))
    }

    fn open_with(store: Store, lazy: Option<ReaderIo>) -> Result<(Space, Opened), EngineError> {
        let mut opened = Opened::default();
        let ids = store.snapshot_ids()?;
        let mut store = Some(store);
        for id in ids.iter().rev() {
            let check = match store.as_ref() {
                Some(s) if lazy.is_some() => s.verify_root(*id),
                Some(s) => s.verify(&[*id]).map(|r| {
                    r.damage
                        .iter()
                        .find(|d| d.snapshot == Some(*id))
                        .map(|d| d.detail.clone())
                }),
                None => unreachable!("store is put back after every failed attempt"),
            };
            match check {
                Ok(None) => {
                    let s = store
                        .take()
                        .unwrap_or_else(|| unreachable!("checked above"));
                    let space = if let Some(io) = lazy {
                        Self::restore_lazy_on(s, *id, io)?
                    } else {
                        Self::restore(s, *id)?
                    };
                    opened.snapshot = Some(*id);
                    return Ok((space, opened));
                }
                Ok(Some(detail)) => opened.damaged.push((*id, detail)),
                Err(e) if e.is_corruption() => opened.damaged.push((*id, e.to_string())),
                Err(e) => return Err(e.into()),
            }
        }
        let s = store
            .take()
            .unwrap_or_else(|| unreachable!("no attempt took it"));
        Ok((Self::create(s)?, opened))
    }

    /// The page size.
    pub fn page_size(&self) -> u64 {
        self.inner.ps.bytes()
    }

    /// The epoch writes land in now.
    pub fn current_epoch(&self) -> Epoch {
        Epoch(self.inner.current.load(Ordering::Acquire))
    }

    /// The last snapshot committed (or restored from).
    pub fn last_snapshot(&self) -> Option<SnapshotId> {
        self.inner.persisted.lock().id
    }

    /// Pages resident in memory.
    pub fn resident_pages(&self) -> usize {
        self.inner.table.len()
    }

    fn pages(&self, addr: VirtAddr, len: u64) -> Result<std::ops::Range<u64>, EngineError> {
        let ps = self.inner.ps;
        let first = ps.vpn(addr).0;
        if len == 0 {
            return Ok(first..first);
        }
        let end = addr
            .0
            .checked_add(len - 1)
            .ok_or(EngineError::Range { addr, len })?;
        Ok(first..ps.vpn(VirtAddr(end)).0 + 1)
    }

    /// Maps the pages covering `[addr, addr + len)`, zero-filled; pages already mapped keep their
    /// contents.
    pub fn map(&self, addr: VirtAddr, len: u64) -> Result<(), EngineError> {
        let inner = &self.inner;
        let pages = self.pages(addr, len)?;
        inner.ensure_blocks(pages.clone())?;
        let _g = inner.gate.read();
        let epoch = self.current_epoch();
        for vpn in pages {
            let mut stripe = inner.stripe(vpn).lock();
            if inner.is_mapped(vpn)? {
                continue;
            }
            // Unmapped at the pause, if a snapshot is being taken and holds the page: kept as such.
            inner.preserve(vpn, None, || None);
            // Each step that can fail undoes the ones before it: the page is mapped whole or not
            // at all.
            let paddr = inner.alloc_frame(None)?;
            let frame = inner.frame_index(paddr);
            let vaddr = inner.ps.addr(Vpn(vpn));
            let page = Page {
                paddr,
                epoch,
                flags: PageFlags::PHYS_MEM,
                ..inner.table.page_init(vaddr)
            };
            if let Err(e) = inner.table.set_page(page) {
                inner.frames.free(frame);
                return Err(e.into());
            }
            if let Err(e) = inner.set_mapped(vpn, true, epoch) {
                inner.table.remove(vaddr);
                inner.frames.free(frame);
                return Err(e);
            }
            stripe.note(vpn, epoch);
        }
        Ok(())
    }

    /// Unmaps the pages covering `[addr, addr + len)`; unmapped pages are skipped.
    pub fn unmap(&self, addr: VirtAddr, len: u64) -> Result<(), EngineError> {
        let inner = &self.inner;
        let pages = self.pages(addr, len)?;
        inner.ensure_blocks(pages.clone())?;
        let _g = inner.gate.read();
        let epoch = self.current_epoch();
        for vpn in pages {
            let mut stripe = inner.stripe(vpn).lock();
            if !inner.is_mapped(vpn)? {
                continue;
            }
            let vaddr = inner.ps.addr(Vpn(vpn));
            let page = inner.table.get_page(vaddr);
            inner.preserve(vpn, page.map(|p| p.epoch), || {
                // SAFETY: the stripe of `vpn` is held since before the lookup.
                page.map(|p| unsafe { inner.frame(&p) })
            });
            inner.set_mapped(vpn, false, epoch)?;
            if let Some(p) = inner.table.remove(vaddr) {
                inner.frames.free(inner.frame_index(p.paddr));
            }
            // A page changed already in this epoch (written or mapped) is noted already.
            if page.is_none_or(|p| p.epoch < epoch) {
                stripe.note(vpn, epoch);
            }
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `addr`; every page touched must be mapped. The read is
    /// consistent: no write lands in the middle of it.
    pub fn read(&self, addr: VirtAddr, buf: &mut [u8]) -> Result<(), EngineError> {
        let pages = self.pages(addr, buf.len() as u64)?;
        let inner = &self.inner;
        let mut loaded = inner.prefetch(pages.clone())?;
        if pages.end - pages.start == 1 {
            // One page (the common case): one stripe, nothing allocated.
            let _s = inner.stripe(pages.start).lock();
            let page = inner
                .resident(pages.start, &mut loaded)?
                .ok_or(EngineError::NotMapped(addr))?;
            let off = (addr.0 & (inner.ps.bytes() - 1)) as usize;
            // SAFETY: the page's stripe is held since before the lookup.
            buf.copy_from_slice(&unsafe { inner.frame(&page) }[off..off + buf.len()]);
            return Ok(());
        }
        let _locks = inner.lock_stripes(pages.clone());
        let resident = inner.resident_range(addr, pages, &mut loaded)?;
        inner.chunks(addr, buf.len(), |i, off, range| {
            // SAFETY: the stripes of every page in the range are held since before the lookup.
            buf[range.clone()]
                .copy_from_slice(&unsafe { inner.frame(&resident[i]) }[off..off + range.len()]);
        });
        Ok(())
    }

    /// Writes `data` at `addr`; every page touched must be mapped, or nothing is written. Returns
    /// the epoch the write landed in: it is in every snapshot sealing that epoch or a later one.
    pub fn write(&self, addr: VirtAddr, data: &[u8]) -> Result<Epoch, EngineError> {
        let pages = self.pages(addr, data.len() as u64)?;
        let inner = &self.inner;
        // Lazy content is read before any lock (the gate included, so the pause never waits for it).
        let mut loaded = inner.prefetch(pages.clone())?;
        let _g = inner.gate.read();
        let epoch = self.current_epoch();
        if pages.end - pages.start == 1 {
            // One page (the common case): one stripe, nothing allocated.
            let mut stripe = inner.stripe(pages.start).lock();
            let page = inner
                .resident(pages.start, &mut loaded)?
                .ok_or(EngineError::NotMapped(addr))?;
            if page.epoch < epoch {
                inner.first_write(&page, epoch, &mut stripe);
            }
            let off = (addr.0 & (inner.ps.bytes() - 1)) as usize;
            // SAFETY: the page's stripe is held since before the lookup.
            let frame = unsafe { inner.frame_mut(&page) };
            frame[off..off + data.len()].copy_from_slice(data);
            return Ok(epoch);
        }
        let mut locks = inner.lock_stripes(pages.clone());
        let resident = inner.resident_range(addr, pages, &mut loaded)?;
        for page in &resident {
            if page.epoch < epoch {
                let idx = inner.stripe_index(inner.ps.vpn(page.vaddr).0);
                let Ok(at) = locks.binary_search_by_key(&idx, |(i, _)| *i) else {
                    unreachable!("every page's stripe is locked")
                };
                inner.first_write(page, epoch, &mut locks[at].1);
            }
        }
        inner.chunks(addr, data.len(), |i, off, range| {
            // SAFETY: the stripes of every page in the range are held since before the lookup.
            let frame = unsafe { inner.frame_mut(&resident[i]) };
            frame[off..off + range.len()].copy_from_slice(&data[range.clone()]);
        });
        Ok(epoch)
    }

    /// Takes a snapshot and waits for it to commit.
    pub fn snapshot(&self) -> Result<SnapshotReport, EngineError> {
        self.begin_snapshot()?.wait()
    }

    /// Seals the epoch (the only pause) and persists its pages in the background. Waits first for
    /// a snapshot still persisting.
    pub fn begin_snapshot(&self) -> Result<SnapshotHandle, EngineError> {
        self.begin(false)
    }

    /// Test hook: a snapshot whose dirty set is at most `bytes` copies it in one sweep right
    /// after the pause (64 MiB by default); a larger one is copied (and copied on write) batch by
    /// batch as it is stored. 0 makes every snapshot take the batch path.
    #[doc(hidden)]
    pub fn set_eager_copy_limit(&self, bytes: u64) {
        self.inner
            .eager_copy
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Test hook: [`Space::begin_snapshot`] whose persisting (after its fold of the noted
    /// changes, which this waits for) waits for [`SnapshotHandle::release`] (or `wait`), so a test
    /// can write between the pause and the
    /// persisting and check that the snapshot still holds the state at the pause.
    #[doc(hidden)]
    pub fn begin_snapshot_held(&self) -> Result<SnapshotHandle, EngineError> {
        self.begin(true)
    }

    fn begin(&self, held: bool) -> Result<SnapshotHandle, EngineError> {
        let inner = self.inner.clone();
        {
            let mut running = inner.running.lock();
            while *running {
                inner.idle.wait(&mut running);
            }
            *running = true;
        }
        // Made before the pause, so the pause allocates nothing; `since` cannot change meanwhile
        // (only a snapshot's commit moves it, and no other snapshot runs: `running`).
        let mut job = Arc::new(Job {
            epoch: Epoch(0),
            since: inner.persisted.lock().epoch,
            all_copied: std::sync::atomic::AtomicBool::new(false),
            view: std::sync::OnceLock::new(),
        });
        let started = Instant::now();
        {
            let _pause = inner.gate.write();
            let epoch = Epoch(inner.current.load(Ordering::Relaxed));
            inner.current.store(epoch.0 + 1, Ordering::Release);
            match Arc::get_mut(&mut job) {
                Some(j) => j.epoch = epoch,
                None => unreachable!("the job is not shared before it is published"),
            }
            *inner.job.write() = Some(job.clone());
        }
        let pause = started.elapsed();
        let (hold, go) = std::sync::mpsc::channel::<()>();
        let (folded_tx, folded) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("pagesnap-snapshot".into())
            .spawn(move || {
                // Resets the job and `running` and wakes waiters on every path, a panic included.
                let mut finish = Finish {
                    inner: &inner,
                    store_clean: false,
                };
                if held {
                    // Held after the fold (which the caller waits for): from then on a writer
                    // knows exactly which keys the snapshot holds.
                    finish.inner.fold(&job);
                    let _ = folded_tx.send(());
                    // Released by `release` or `wait`; a dropped handle releases too.
                    let _ = go.recv();
                }
                // A panic in persisting (a panicking Storage, a bug in the store) becomes an
                // error: nothing was marked persisted (that happens last, after the commit), so
                // the pages stay dirty; `finish` aborts the store's pending snapshot.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    finish.inner.persist(&job, started, pause)
                }));
                match result {
                    Ok(r) => {
                        finish.store_clean = true;
                        r
                    }
                    Err(payload) => Err(EngineError::PersistPanicked(panic_message(&*payload))),
                }
            })
            .map_err(|e| {
                *self.inner.job.write() = None;
                self.inner.cow.clear();
                *self.inner.running.lock() = false;
                self.inner.idle.notify_all();
                EngineError::Store(StoreError::Io {
                    path: "<snapshot thread>".into(),
                    step: "spawn snapshot writer",
                    source: e,
                })
            })?;
        if held {
            // An error means the thread ended (it panicked): `wait` reports it.
            let _ = folded.recv();
        }
        Ok(SnapshotHandle {
            pause,
            thread,
            hold: held.then_some(hold),
        })
    }

    /// Runs `f` on the store (e.g. to list, verify, delete snapshots, gc) while no snapshot is
    /// persisting. The snapshot the space stands on — its last snapshot, the parent of the next,
    /// which is also a lazy space's source — is pinned: deleting it fails with
    /// [`StoreError::Pinned`] and changes nothing. (Pins are a set: unpinning it here lifts the
    /// space's pin.) After `f`, a lazy space's read-only handle is reopened if the store changed
    /// (e.g. a gc moved the records it reads).
    pub fn with_store<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        let inner = &self.inner;
        let mut running = inner.running.lock();
        while *running {
            inner.idle.wait(&mut running);
        }
        let (r, generation) = {
            let mut store = inner.store.lock();
            let r = f(&mut store);
            (r, store.generation())
        };
        if let Some(id) = inner.persisted.lock().id.filter(|_| inner.lazy_mode) {
            inner.refresh_lazy(id, generation);
        }
        drop(running);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagesnap_store::fault::FaultyStorage;

    const PS: u64 = 512;

    fn new_space() -> Space {
        let opts = StoreOptions {
            page_size: PS as u32,
            segment_bytes: 1 << 20,
            preallocate: 64 << 10,
            ..StoreOptions::default()
        };
        let io = Arc::new(FaultyStorage::new());
        Space::create(Store::init_with(io, opts).expect("store")).expect("space")
    }

    /// Notes waiting in the stripes and for the mapping blocks.
    fn noted(space: &Space) -> usize {
        let inner = &space.inner;
        inner
            .stripes
            .iter()
            .map(|s| s.0.lock().notes.len())
            .sum::<usize>()
            + inner.map_written.lock().notes.len()
    }

    #[test]
    fn map_and_unmap_loops_between_snapshots_keep_the_notes_bounded() {
        let space = new_space();
        for _ in 0..100_000 {
            space.map(VirtAddr(0), PS).expect("map");
            space.unmap(VirtAddr(0), PS).expect("unmap");
        }
        // One page and its mapping block, changed in one epoch.
        assert!(noted(&space) <= 2, "{} notes for one page", noted(&space));
        // Many pages in turn: the lists are compacted, never more than about twice the keys.
        for round in 0..40u64 {
            for v in 0..3000u64 {
                let at = VirtAddr((v * 7 + round) % 3000 * PS);
                space.map(at, PS).expect("map");
                space.unmap(at, PS).expect("unmap");
            }
        }
        let n = noted(&space);
        assert!(
            n <= 2 * 3001 + STRIPES * WRITTEN_KEPT,
            "{n} notes for 3,000 pages"
        );
        // And a snapshot folds them all in: the next one has nothing to fold.
        space.snapshot().expect("snapshot");
        assert_eq!(noted(&space), 0);
    }

    #[test]
    fn keys_the_snapshot_does_not_hold_get_no_copies() {
        let space = new_space();
        space.set_eager_copy_limit(0);
        space.map(VirtAddr(0), 1000 * PS).expect("map");
        for v in 0..1000 {
            space
                .write(VirtAddr(v * PS), &[1u8; PS as usize])
                .expect("write");
        }
        space.snapshot().expect("first");
        // The one page the next snapshot holds.
        space
            .write(VirtAddr(999 * PS), &[2u8; PS as usize])
            .expect("write");
        let handle = space.begin_snapshot_held().expect("pause");
        // Pages mapped after the pause, and clean pages written then unmapped after it: none
        // is in the snapshot, so none needs a copy.
        space.map(VirtAddr(100_000 * PS), 5000 * PS).expect("map");
        for v in 0..998 {
            space
                .write(VirtAddr(v * PS), &[3u8; PS as usize])
                .expect("write");
            space.unmap(VirtAddr(v * PS), PS).expect("unmap");
        }
        // The dirty page, changed after the pause: its state at the pause is kept.
        space.unmap(VirtAddr(999 * PS), PS).expect("unmap");
        let (entries, bytes) = space.inner.cow.held();
        let report = handle.wait().expect("snapshot");
        assert_eq!(report.pages_persisted, 1);
        assert_eq!(report.copied_on_write, 1);
        assert_eq!(
            (entries, bytes),
            (1, PS as usize),
            "copies kept for keys the snapshot does not hold"
        );
    }
}
