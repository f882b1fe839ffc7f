//! The store: a directory of segment files and a two-slot superblock. See `docs/format.md` for the
//! layout and the commit protocol, and why a crash at any step loses nothing committed.
//!
//! This module holds the [`Store`] handle and what every job shares: the writer's state, record
//! reads and node loading (through the node cache), and the node access the trie walks use. The
//! jobs themselves live in the submodules:
//!
//! - `open`: creating and opening a store, the writer lock, reading both superblock slots, and
//!   the recovery a writer's open runs before it changes anything;
//! - `commit`: writing a snapshot (begin, put, remove), the commit protocol (`publish`: segments,
//!   then one superblock slot, then the other), leaving doubt, delete and pins;
//! - `read`: the catalog, manifests, pages and diffs;
//! - `verify`: checking every record and Merkle hash;
//! - `gc`: live records, the space check, and gc.

mod buffer;
mod commit;
mod frames;
mod gc;
mod log;
mod open;
mod read;
mod seal;
mod verify;

pub use seal::Cipher;
pub(crate) use seal::Encryption;

pub(crate) use self::commit::now_ms;
use self::commit::{append, WRITE_BUFFER};
use crate::error::StoreError;
use crate::format::{
    decode_record, seg_name, Kind, Location, NodePtr, Ref, Superblock, MAX_RECORD, SEG_HEADER,
};
use crate::storage::{LockGuard, SharedStorage, Storage};
use crate::trie::{Node, NodeIo};
use crate::{SnapshotId, StoreOptions};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// [`crate::fuzzing::decode_frame`].
pub(crate) fn fuzz_frame(bytes: &[u8]) -> bool {
    frames::decode_frame(bytes, 512)
        .and_then(|f| frames::frame_plain(&f))
        .is_ok()
}

/// The Merkle root of an empty snapshot.
pub const EMPTY_ROOT: [u8; 32] = [0; 32];
/// Node cache bound (entries); cleared when exceeded.
const CACHE_LIMIT: usize = 1 << 13;

/// Open for reading only, or as the one writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Read the last committed state; takes no lock.
    Read,
    /// Take the writer lock; recover leftovers of an interrupted writer.
    Write,
}

/// The changes of a snapshot being written: page → its new place (`None`: the page becomes
/// zero); the last change of a page wins. Kept as a list: pages put in ascending order (the
/// engine's snapshots and image snapshots put them so) are appended, and any other order is
/// sorted when the list is read, instead of keeping a search tree up to date on every put. An
/// unsorted list is also compacted (sorted, each page once) whenever it has doubled since it
/// last was, so pages put again and again out of order hold memory for the pages, not the puts.
#[derive(Default)]
struct Changes {
    entries: Vec<(u64, Option<Ref>)>,
    /// Some entry is out of order or repeats a page.
    unsorted: bool,
    /// The length after the last compaction.
    compacted: usize,
}

/// An unsorted change list is compacted once it holds this many entries, or twice as many as
/// after its last compaction.
const COMPACT_FROM: usize = 4096;

impl Changes {
    fn insert(&mut self, vpn: u64, to: Option<Ref>) {
        match self.entries.last_mut() {
            Some(last) if last.0 == vpn => last.1 = to,
            Some(last) if last.0 > vpn => {
                self.unsorted = true;
                self.entries.push((vpn, to));
            }
            _ => self.entries.push((vpn, to)),
        }
        if self.unsorted && self.entries.len() >= COMPACT_FROM.max(2 * self.compacted) {
            self.sorted();
        }
    }

    /// Entries held (a page changed again out of order counts again until the next
    /// compaction).
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Ascending by page, one entry per page (its last change).
    fn sorted(&mut self) -> &mut Vec<(u64, Option<Ref>)> {
        if self.unsorted {
            // Stable: a page's changes stay in the order they were made; of each run of one
            // page, the first entry is kept and takes the last one's place.
            self.entries.sort_by_key(|e| e.0);
            self.entries.dedup_by(|later, kept| {
                let same = later.0 == kept.0;
                if same {
                    kept.1 = later.1;
                }
                same
            });
            self.unsorted = false;
            self.compacted = self.entries.len();
        }
        &mut self.entries
    }

    fn into_sorted(mut self) -> Vec<(u64, Option<Ref>)> {
        self.sorted();
        self.entries
    }
}

struct Pending {
    parent: Option<SnapshotId>,
    base_root: Option<NodePtr>,
    base_count: u64,
    changes: Changes,
    /// Formats 1 and 2: page records written in this snapshot, by content hash (dedup within
    /// the snapshot; format 3's dedup map learns them as they are appended).
    fresh: crate::index::ByContent<Ref>,
    pages_written: u64,
    /// Index entries changed by earlier flushes.
    changed: u64,
    /// Format 3: the parent's page map.
    map: Option<Arc<crate::index::PageMap>>,
    /// Where this commit's first byte goes (segment, offset): a record at or after it was
    /// written by this commit.
    start: (u32, u64),
}

struct Writer {
    seg: u32,
    off: u64,
    cap: u64,
    segments: Vec<u32>,
    touched: BTreeSet<u32>,
    created: Vec<u32>,
    dir_dirty: bool,
    data_appended: u64,
    meta_appended: u64,
    pending: Option<Pending>,
    /// A superblock write failed and could not be undone: which state is durable is unknown until
    /// the store is reopened, so this writer changes nothing more.
    in_doubt: bool,
    /// The last commit is durable in one superblock slot only (writing the second copy failed):
    /// gc keeps the files it replaced until both slots agree again (a later commit or a reopen).
    degraded: bool,
    /// Records appended but not yet written: they end at `off` in segment `seg`.
    buf: buffer::LogBuffer,
    /// Format 3: the commit log's writer state.
    log: log::LogWriter,
    /// Format 4: new pages being compressed in frames.
    frames: frames::Framer,
    /// Last, so dropped last: the buffer's writes still in flight finish (its writer thread is
    /// joined) before another writer may take the store.
    _lock: Box<dyn LockGuard>,
}

/// A snapshot store in a directory.
pub struct Store {
    io: SharedStorage,
    opts: StoreOptions,
    sb: Superblock,
    cache: Mutex<HashMap<NodePtr, Arc<Node>>>,
    writer: Option<Writer>,
    /// Snapshots `delete` refuses, with how many pins each holds: they are in use by whoever
    /// holds the store.
    pinned: BTreeMap<SnapshotId, usize>,
    /// Format 3: the retained snapshots, as the commit log names them.
    catalog: log::Catalog,
    /// Format 3: page maps recently used.
    maps: Mutex<log::MapCache>,
    /// Format 4: frames recently decompressed.
    frame_cache: Mutex<frames::FrameCache>,
    /// An encrypted store's keys, unlocked at open (`None`: not encrypted).
    crypt: Option<Arc<seal::Crypt>>,
    /// An encrypted store: the master key and the slot that opened it (for key changes), and
    /// what is wrong with the key file's other copy (for verify).
    unlocked: Option<crate::keys::Unlocked>,
    key_note: Option<String>,
}

impl Drop for Store {
    fn drop(&mut self) {
        // A commit whose second superblock copy failed: one more try before the lock is released.
        // Not while unwinding: a backend that just panicked may panic again (an abort).
        if !std::thread::panicking() {
            self.restore_redundancy();
            // Format 3: a clean close writes a hint past the last commit, so that no commit of
            // this writer is left as the tail of the log, where damage could not be told from an
            // interrupted commit (see `log.rs`). Best effort: the commits are durable already.
            let owed = self.writer.as_ref().is_some_and(|w| {
                !w.in_doubt && w.pending.is_none() && (w.log.since_hint > 0 || w.log.need_hint)
            });
            if self.is_log() {
                self.trim_active_segment();
                if owed {
                    let _ = self.write_hint();
                }
            }
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.io.location())
            .field("generation", &self.sb.generation)
            .field("writer", &self.writer.is_some())
            .finish()
    }
}

pub(crate) fn io_err(
    io: &dyn Storage,
    name: &str,
    step: &'static str,
) -> impl FnOnce(io::Error) -> StoreError {
    let path = io.location().join(name);
    move |source| StoreError::Io { path, step, source }
}

fn corrupt(
    io: &dyn Storage,
    name: &str,
    what: &'static str,
    offset: u64,
    detail: impl Into<String>,
) -> StoreError {
    StoreError::Corrupt {
        path: io.location().join(name),
        what,
        offset,
        detail: detail.into(),
    }
}

/// Reads and checks the record at `loc`. `segments` are the live segments.
fn read_record(
    io: &dyn Storage,
    segments: &[u32],
    loc: &Location,
    kind: Kind,
) -> Result<(u64, [u8; 32], Vec<u8>), StoreError> {
    read_record_kind(io, segments, loc, kind).map(|(_, key, hash, payload)| (key, hash, payload))
}

/// [`read_record`], also giving the kind byte found (a manifest of either version).
fn read_record_kind(
    io: &dyn Storage,
    segments: &[u32],
    loc: &Location,
    kind: Kind,
) -> Result<(u8, u64, [u8; 32], Vec<u8>), StoreError> {
    let name = seg_name(loc.segment);
    let mut buf = read_raw_record(io, segments, loc, kind)?;
    let rec = decode_record(&buf, kind)
        .map_err(|e| corrupt(io, &name, kind.name(), loc.offset, e.to_string()))?;
    let (found, key, hash, start, plen) = (
        rec.kind,
        rec.key,
        rec.hash,
        crate::format::REC_HEADER,
        rec.payload.len(),
    );
    buf.truncate(start + plen);
    buf.drain(..start);
    Ok((found, key, hash, buf))
}

/// The bytes of the record at `loc`, read but not yet checked.
fn read_raw_record(
    io: &dyn Storage,
    segments: &[u32],
    loc: &Location,
    kind: Kind,
) -> Result<Vec<u8>, StoreError> {
    let name = seg_name(loc.segment);
    if segments.binary_search(&loc.segment).is_err() {
        return Err(corrupt(
            io,
            &name,
            kind.name(),
            loc.offset,
            "points into a segment the store does not have",
        ));
    }
    if u64::from(loc.len) > MAX_RECORD || loc.offset < SEG_HEADER {
        return Err(corrupt(
            io,
            &name,
            kind.name(),
            loc.offset,
            format!("implausible record length {}", loc.len),
        ));
    }
    let mut buf = vec![0u8; loc.len as usize];
    let read = match kind {
        // Page contents are data; everything else is the index and catalog that listing,
        // diffing and incremental snapshots read again and again (a remote backend caches it).
        Kind::Page | Kind::Pages | Kind::Frame => io.read(&name, loc.offset, &mut buf),
        _ => io.read_meta(&name, loc.offset, &mut buf),
    };
    read.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            corrupt(
                io,
                &name,
                kind.name(),
                loc.offset,
                "points past the end of the segment",
            )
        } else {
            StoreError::Read {
                path: io.location().join(&name),
                what: kind.name(),
                offset: loc.offset,
                len: loc.len,
                source: e,
            }
        }
    })?;
    Ok(buf)
}

/// Node access for readers.
struct ReadIo<'a> {
    io: &'a dyn Storage,
    segments: &'a [u32],
    cache: &'a Mutex<HashMap<NodePtr, Arc<Node>>>,
}

fn load_node(
    io: &dyn Storage,
    segments: &[u32],
    cache: &Mutex<HashMap<NodePtr, Arc<Node>>>,
    ptr: &NodePtr,
) -> Result<Arc<Node>, StoreError> {
    // Keyed by location *and* Merkle hash: a location reused after a rolled-back commit holds
    // another node.
    if let Some(n) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(ptr) {
        return Ok(n.clone());
    }
    let (_, hash, payload) = read_record(io, segments, &ptr.loc, Kind::Node)?;
    let name = seg_name(ptr.loc.segment);
    let node = Node::decode(&payload)
        .map_err(|e| corrupt(io, &name, "index node", ptr.loc.offset, e.0))?;
    // The hash is recomputed, not taken from the record's header: a node then cannot name
    // itself (or an ancestor) as a child, since that would need a blake3 fixpoint, so every walk
    // of the trie ends.
    if hash != ptr.merkle || node.merkle() != ptr.merkle {
        return Err(corrupt(
            io,
            &name,
            "index node",
            ptr.loc.offset,
            "Merkle hash differs from its parent's record",
        ));
    }
    let node = Arc::new(node);
    let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
    if c.len() >= CACHE_LIMIT {
        c.clear();
    }
    c.insert(*ptr, node.clone());
    Ok(node)
}

impl NodeIo for ReadIo<'_> {
    fn load(&mut self, ptr: &NodePtr) -> Result<Arc<Node>, StoreError> {
        load_node(self.io, self.segments, self.cache, ptr)
    }
    fn store(&mut self, _node: &Node) -> Result<NodePtr, StoreError> {
        Err(StoreError::ReadOnly)
    }
}

/// Node access for the writer: loads through the cache, stores by appending.
struct WriteIo<'a> {
    io: &'a dyn Storage,
    opts: &'a StoreOptions,
    cache: &'a Mutex<HashMap<NodePtr, Arc<Node>>>,
    w: &'a mut Writer,
}

impl NodeIo for WriteIo<'_> {
    fn load(&mut self, ptr: &NodePtr) -> Result<Arc<Node>, StoreError> {
        load_node(self.io, &self.w.segments, self.cache, ptr)
    }
    fn store(&mut self, node: &Node) -> Result<NodePtr, StoreError> {
        let merkle = node.merkle();
        let loc = append(
            self.io,
            self.opts,
            self.w,
            Kind::Node,
            u64::from(node.depth),
            &merkle,
            &node.encode(),
        )?;
        self.w.meta_appended += u64::from(loc.len);
        Ok(NodePtr { loc, merkle })
    }
}

/// The dedup index's key for a content hash: its first 8 bytes.
fn dedup_key(hash: &[u8; 32]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&hash[..8]);
    u64::from_le_bytes(b)
}

impl Store {
    fn read_io(&self) -> ReadIo<'_> {
        let segments = match &self.writer {
            Some(w) => &w.segments,
            None => &self.sb.segments,
        };
        ReadIo {
            io: &*self.io,
            segments,
            cache: &self.cache,
        }
    }

    fn write_io(&mut self) -> Result<WriteIo<'_>, StoreError> {
        let w = self.writer.as_mut().ok_or(StoreError::ReadOnly)?;
        if w.in_doubt {
            return Err(StoreError::InDoubt {
                path: self.io.location().into(),
            });
        }
        Ok(WriteIo {
            io: &*self.io,
            opts: &self.opts,
            cache: &self.cache,
            w,
        })
    }

    /// The directory (or backend location).
    pub fn location(&self) -> &Path {
        self.io.location()
    }

    /// Bytes per page.
    pub fn page_size(&self) -> u32 {
        self.sb.page_size
    }

    /// The superblock generation: it increases with every superblock write (every commit in
    /// formats 1 and 2; in format 3, every hint, gc and upgrade — commits go to the log).
    pub fn generation(&self) -> u64 {
        self.sb.generation
    }

    /// The store's on-disk format version (1 and 2: trie index; 3: commit log).
    pub fn format_version(&self) -> u32 {
        self.sb.version
    }
}

impl Writer {
    fn new(
        lock: Box<dyn LockGuard>,
        sb: &Superblock,
        shared: &SharedStorage,
    ) -> Result<Writer, StoreError> {
        let io = &**shared;
        let name = seg_name(sb.active_segment);
        let cap = io
            .len(&name)
            .map_err(io_err(io, &name, "open active segment"))?;
        let off = if sb.version >= 3 {
            log::committed_end(sb)
        } else {
            sb.active_len
        };
        Ok(Writer {
            _lock: lock,
            seg: sb.active_segment,
            off,
            cap,
            segments: sb.segments.clone(),
            touched: BTreeSet::new(),
            created: Vec::new(),
            dir_dirty: false,
            data_appended: 0,
            meta_appended: 0,
            pending: None,
            in_doubt: false,
            degraded: false,
            buf: buffer::LogBuffer::new(2 * WRITE_BUFFER + (64 << 10), off, shared.clone()),
            log: log::LogWriter::default(),
            frames: frames::Framer::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::commit::{append, flush_buffer};
    use super::*;
    use crate::fault::FaultyStorage;
    use crate::format::record_len;
    use crate::manifest::{Manifest, RootRecord};
    use crate::trie::{self, Delta, Slot};
    use crate::SnapshotMeta;
    use pagesnap_pagetable::Vpn;

    fn place(n: u8) -> Option<Ref> {
        Some(Ref {
            hash: [n; 32],
            loc: crate::format::Location {
                segment: 1,
                offset: u64::from(n) * 64,
                len: 8,
                slot: 0,
            },
        })
    }

    #[test]
    fn changes_keep_each_pages_last_change_in_page_order() {
        let mut c = Changes::default();
        for (vpn, n) in [(1, 1), (2, 2), (2, 3), (5, 4)] {
            c.insert(vpn, place(n));
        }
        // In order, a repeat of the last page replaced in place: nothing to sort.
        assert!(!c.unsorted);
        assert_eq!(c.len(), 3);
        c.insert(3, place(5));
        c.insert(1, None);
        c.insert(5, place(6));
        c.insert(3, place(7));
        assert!(c.unsorted);
        let want = vec![(1, None), (2, place(3)), (3, place(7)), (5, place(6))];
        assert_eq!(*c.sorted(), want);
        assert!(!c.unsorted);
        c.insert(4, place(8));
        assert!(c.unsorted, "4 after 5 is out of order again");
        assert_eq!(
            c.into_sorted(),
            vec![
                (1, None),
                (2, place(3)),
                (3, place(7)),
                (4, place(8)),
                (5, place(6))
            ]
        );
    }

    #[test]
    fn a_commit_holds_each_pages_last_put_whatever_the_order() {
        let opts = StoreOptions {
            page_size: 512,
            ..StoreOptions::default()
        };
        let format2 = Store::init_format2_with(Arc::new(FaultyStorage::new()), opts);
        let current = Store::init_with(Arc::new(FaultyStorage::new()), opts);
        for mut store in [format2.expect("init 2"), current.expect("init")] {
            store.begin(None).expect("begin");
            for vpn in [9u64, 3, 7, 3, 1, 9, 5] {
                store.put(Vpn(vpn), &[vpn as u8; 512]).expect("put");
            }
            store.put(Vpn(3), &[33; 512]).expect("put again");
            store.remove(Vpn(5)).expect("remove");
            store.put(Vpn(7), &[77; 512]).expect("put again");
            let first = store.commit(SnapshotMeta::default()).expect("commit").id;
            store.begin(Some(first)).expect("begin");
            store.remove(Vpn(9)).expect("remove");
            store.put(Vpn(1), &[11; 512]).expect("put");
            store.remove(Vpn(1)).expect("remove after put");
            store.put(Vpn(2), &[22; 512]).expect("put");
            let second = store.commit(SnapshotMeta::default()).expect("commit").id;
            let read = |id, vpn| store.read_page(id, Vpn(vpn)).expect("read");
            assert_eq!(read(first, 1), Some(vec![1; 512]));
            assert_eq!(read(first, 3), Some(vec![33; 512]));
            assert_eq!(read(first, 5), None);
            assert_eq!(read(first, 7), Some(vec![77; 512]));
            assert_eq!(read(first, 9), Some(vec![9; 512]));
            assert_eq!(read(second, 1), None);
            assert_eq!(read(second, 2), Some(vec![22; 512]));
            assert_eq!(read(second, 3), Some(vec![33; 512]));
            assert_eq!(read(second, 9), None);
            let report = store.verify(&[first, second]).expect("verify");
            assert!(report.is_clean(), "{report:?}");
        }
    }

    /// A commit that fails after its new page map was built puts the parent's map back, whether
    /// the new one was built entry by entry (a small delta), by a merge (a large one) or on an
    /// empty parent: the next commit on the same parent sees none of the failed one's changes.
    #[test]
    fn a_failed_commit_leaves_the_parents_page_map_as_it_was() {
        use crate::fault::FaultPlan;
        let opts = StoreOptions {
            page_size: 512,
            ..StoreOptions::default()
        };
        // (pages in the parent, pages the failing commit changes): 2 of 64 entry by entry, 40
        // of 64 by a merge (`index::apply_delta`), 40 on an empty parent; and past
        // `log::PARALLEL_COMMIT`: on an empty parent (the chunks written while another thread
        // builds the map) and on a larger one.
        for (parent_pages, changed) in [(64u64, 2u64), (64, 40), (0, 40), (0, 5000), (8192, 5000)] {
            let mut failures = 0;
            for k in 0.. {
                let io = Arc::new(FaultyStorage::new());
                let mut store = Store::init_with(io.clone(), opts).expect("init");
                store.begin(None).expect("begin");
                for vpn in 0..parent_pages {
                    store.put(Vpn(vpn), &[vpn as u8 + 1; 512]).expect("put");
                }
                let first = store.commit(SnapshotMeta::default()).expect("commit").id;
                store.begin(Some(first)).expect("begin");
                for vpn in 0..changed {
                    store.put(Vpn(vpn), &[200; 512]).expect("put");
                }
                store.remove(Vpn(63)).expect("remove");
                io.set_plan(FaultPlan {
                    fail_at: Some((k, 5)),
                    ..FaultPlan::default()
                });
                let failed = store.commit(SnapshotMeta::default()).is_err();
                io.set_plan(FaultPlan::default());
                if !failed {
                    break; // past the commit's last operation
                }
                failures += 1;
                // Snapshot 1's map must be whole: a commit of one change on it.
                store.begin(Some(first)).expect("begin again");
                store.put(Vpn(10), &[99; 512]).expect("put");
                let next = store
                    .commit(SnapshotMeta::default())
                    .expect("commit again")
                    .id;
                for vpn in 0..64u64 {
                    let want = match vpn {
                        10 => Some(vec![99; 512]),
                        v if v < parent_pages => Some(vec![v as u8 + 1; 512]),
                        _ => None,
                    };
                    assert_eq!(
                        store.read_page(next, Vpn(vpn)).expect("read"),
                        want,
                        "parent of {parent_pages}, {changed} changed, failure at operation \
                         +{k}: page {vpn}"
                    );
                }
                let report = store.verify(&[first, next]).expect("verify");
                assert!(report.is_clean(), "{report:?}");
            }
            assert!(
                failures > 0,
                "{changed} changed: no operation of the commit failed"
            );
        }
    }

    /// Appends, through the writer, an index node that names itself as its only child, and
    /// commits it both as the catalog root and as snapshot 2's index root.
    pub(super) fn store_with_a_looping_node() -> (Arc<FaultyStorage>, StoreOptions) {
        let io = Arc::new(FaultyStorage::new());
        let opts = StoreOptions {
            page_size: 512,
            ..StoreOptions::default()
        };
        let mut store = Store::init_format2_with(io.clone(), opts).expect("init");
        store.begin(None).expect("begin");
        store.put(Vpn(1), &[9u8; 512]).expect("put");
        store.commit(SnapshotMeta::default()).expect("commit");
        let mut sb = store.sb.clone();
        let mut wio = store.write_io().expect("writer");
        flush_buffer(wio.io, wio.w).expect("flush");
        let merkle = [7u8; 32];
        let node = |ptr| Node {
            depth: 0,
            slots: vec![(0, Slot::Child(ptr))],
        };
        let mut ptr = NodePtr {
            loc: Location {
                segment: wio.w.seg,
                offset: wio.w.off,
                len: 0,
                slot: 0,
            },
            merkle,
        };
        ptr.loc.len = u32::try_from(record_len(node(ptr).encode().len())).expect("small");
        let loc = append(
            wio.io,
            wio.opts,
            wio.w,
            Kind::Node,
            0,
            &merkle,
            &node(ptr).encode(),
        )
        .expect("append");
        assert_eq!(loc, ptr.loc, "the node sits where it says");
        let m = Manifest {
            id: 2,
            parent: None,
            epoch: 0,
            time_unix_ms: 0,
            label: None,
            logical_size: 0,
            page_size: 512,
            page_count: 1,
            merkle_root: merkle,
            index_root: Some(RootRecord::from_ptr(&ptr)),
            pages_written: 0,
            pages_changed: 0,
            data_bytes: 0,
            meta_bytes: 0,
            origin: None,
        };
        let bytes = m.to_bytes();
        let hash = *blake3::hash(&bytes).as_bytes();
        let mloc = append(wio.io, wio.opts, wio.w, Kind::Manifest2, 2, &hash, &bytes)
            .expect("append manifest");
        sb.catalog = trie::apply(
            &mut wio,
            sb.catalog,
            &[(2, Some(Ref { hash, loc: mloc }))],
            &mut Delta::default(),
        )
        .expect("catalog");
        store.publish(sb).expect("publish");
        (io, opts)
    }

    /// Finding 10: a self-referencing index node overflowed the stack (the Merkle hash was taken
    /// from the record's header, not recomputed); now it is damage, reported.
    #[test]
    fn a_node_that_names_itself_is_reported_damaged_not_a_stack_overflow() {
        let (io, opts) = store_with_a_looping_node();
        let (store, report) = Store::open_with(io.clone(), Mode::Read, opts).expect("open");
        assert_eq!(report.damaged, vec![SnapshotId(2)], "{report:?}");
        assert_eq!(report.latest, Some(SnapshotId(1)));
        let e = store
            .read_page(SnapshotId(2), Vpn(5))
            .expect_err("a looping index");
        assert!(e.is_corruption(), "{e}");
        let v = store.verify(&[]).expect("verify runs");
        assert!(
            v.damage
                .iter()
                .any(|d| d.snapshot == Some(SnapshotId(2)) && d.detail.contains("index node")),
            "{v:?}"
        );
        assert_eq!(
            store.read_page(SnapshotId(1), Vpn(1)).expect("intact"),
            Some(vec![9u8; 512])
        );
    }
}
