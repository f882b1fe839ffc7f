//! The store: a directory of segment files and a two-slot superblock. See `docs/format.md` for the
//! layout and the commit protocol, and why a crash at any step loses nothing committed.

use crate::error::StoreError;
use crate::format::{
    decode_record, encode_record, parse_seg_name, seg_name, segment_header, segment_runs, Kind,
    Location, NodePtr, Ref, SlotError, Superblock, FORMAT_VERSION, LOCK_FILE, MAX_RECORD,
    MAX_SEGMENT_IDS, MAX_SEGMENT_RUNS, SEG_HEADER, SEG_MAGIC, SLOT_SIZE, SUPERBLOCK_FILE,
};
use crate::manifest::{Manifest, RootRecord, MAX_LABEL};
use crate::storage::{FsStorage, LockGuard, SharedStorage, Storage};
use crate::trie::{self, Delta, Node, NodeIo, Slot};
use crate::{
    CommitReport, Damage, GcReport, OpenReport, SnapshotId, SnapshotInfo, SnapshotMeta,
    SpaceReport, StoreOptions, VerifyReport,
};
use pagesnap_pagetable::{Epoch, Vpn};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

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

struct Pending {
    parent: Option<SnapshotId>,
    base_root: Option<NodePtr>,
    base_count: u64,
    changes: BTreeMap<u64, Option<Ref>>,
    /// Page records written in this snapshot, by content hash (dedup within the snapshot).
    fresh: HashMap<[u8; 32], Ref>,
    pages_written: u64,
    /// Index entries changed by earlier flushes.
    changed: u64,
}

struct Writer {
    _lock: Box<dyn LockGuard>,
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
    buf: Vec<u8>,
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
}

/// What the superblock slot not in use holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OtherSlot {
    /// The committed state too: the normal case.
    Same,
    /// An older valid state (this generation).
    Older(u64),
    /// Never written (a format 1 store after its first commit).
    Empty,
    /// Fails its checksum or does not decode.
    Damaged,
}

/// Both superblock slots as read.
struct SlotsRead {
    sb: Superblock,
    slot: usize,
    other: OtherSlot,
}

impl SlotsRead {
    /// A sentence on the other slot, naming the file and what is in use, when it is not a copy.
    fn note(&self, io: &dyn Storage) -> Option<String> {
        let file = io.location().join(SUPERBLOCK_FILE);
        let (other, using) = (1 - self.slot, self.slot);
        let what = match self.other {
            OtherSlot::Same => return None,
            OtherSlot::Older(g) => format!(
                "slot {other} holds generation {g}, older than the committed state (a commit \
                 interrupted between its two slot writes, or a format 1 store)"
            ),
            OtherSlot::Empty => format!("slot {other} is empty (a format 1 store)"),
            OtherSlot::Damaged => format!(
                "slot {other} (offset {}) fails its checksum: it is damaged",
                other * SLOT_SIZE
            ),
        };
        Some(format!(
            "{}: {what}; using slot {using}, generation {}; a writer's open rewrites slot {other}",
            file.display(),
            self.sb.generation
        ))
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // A commit whose second superblock copy failed: one more try before the lock is released.
        // Not while unwinding: a backend that just panicked may panic again (an abort).
        if !std::thread::panicking() {
            self.restore_redundancy();
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

fn io_err(
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
    io.read(&name, loc.offset, &mut buf).map_err(|e| {
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
    let rec = decode_record(&buf, kind)
        .map_err(|e| corrupt(io, &name, kind.name(), loc.offset, e.to_string()))?;
    let (key, hash, start, plen) = (
        rec.key,
        rec.hash,
        crate::format::REC_HEADER,
        rec.payload.len(),
    );
    buf.truncate(start + plen);
    buf.drain(..start);
    Ok((key, hash, buf))
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

fn new_segment(io: &dyn Storage, opts: &StoreOptions, w: &mut Writer) -> Result<(), StoreError> {
    let id = w
        .segments
        .last()
        .copied()
        .unwrap_or(0)
        .checked_add(1)
        .ok_or(StoreError::TooManySegments {
            count: w.segments.len(),
        })?;
    let mut with_new = w.segments.clone();
    with_new.push(id);
    if with_new.len() > MAX_SEGMENT_IDS || segment_runs(&with_new).len() > MAX_SEGMENT_RUNS {
        return Err(StoreError::TooManySegments {
            count: w.segments.len(),
        });
    }
    let name = seg_name(id);
    io.create(&name)
        .map_err(io_err(io, &name, "create segment"))?;
    w.created.push(id);
    w.segments.push(id);
    w.dir_dirty = true;
    let cap = opts.preallocate.min(opts.segment_bytes).max(SEG_HEADER);
    io.set_len(&name, cap)
        .map_err(io_err(io, &name, "size segment"))?;
    io.write(&name, 0, &segment_header(id))
        .map_err(io_err(io, &name, "write segment header"))?;
    w.touched.insert(id);
    w.seg = id;
    w.off = SEG_HEADER;
    w.cap = cap;
    Ok(())
}

/// Appended records are gathered into writes of this size: whole-page writes spare the
/// filesystem zero-filling the rest of each fresh page (records are not page-sized).
const WRITE_BUFFER: usize = 1 << 20;

/// Writes the buffered records of the active segment.
fn flush_buffer(io: &dyn Storage, w: &mut Writer) -> Result<(), StoreError> {
    if !w.buf.is_empty() {
        let name = seg_name(w.seg);
        io.write(&name, w.off - w.buf.len() as u64, &w.buf)
            .map_err(io_err(io, &name, "write records"))?;
        w.buf.clear();
    }
    Ok(())
}

fn append(
    io: &dyn Storage,
    opts: &StoreOptions,
    w: &mut Writer,
    kind: Kind,
    key: u64,
    hash: &[u8; 32],
    payload: &[u8],
) -> Result<Location, StoreError> {
    let rec = encode_record(kind, key, hash, payload);
    let len = rec.len() as u64;
    if w.off + len > opts.segment_bytes && w.off > SEG_HEADER {
        // Trim the full segment to its records and move on to a new one.
        flush_buffer(io, w)?;
        let name = seg_name(w.seg);
        io.set_len(&name, w.off)
            .map_err(io_err(io, &name, "trim segment"))?;
        w.touched.insert(w.seg);
        new_segment(io, opts, w)?;
    }
    let name = seg_name(w.seg);
    if w.off + len > w.cap {
        let cap = (w.cap + opts.preallocate)
            .max(w.off + len)
            .min(opts.segment_bytes.max(w.off + len));
        io.set_len(&name, cap)
            .map_err(io_err(io, &name, "grow segment"))?;
        w.cap = cap;
    }
    w.buf.extend_from_slice(&rec);
    let loc = Location {
        segment: w.seg,
        offset: w.off,
        len: u32::try_from(len).unwrap_or(u32::MAX),
    };
    w.off += len;
    w.touched.insert(w.seg);
    if w.buf.len() >= WRITE_BUFFER {
        flush_buffer(io, w)?;
    }
    Ok(loc)
}

fn is_zero(data: &[u8]) -> bool {
    let words = data.chunks_exact(8);
    let tail = words.remainder();
    words.into_iter().all(|w| w == [0u8; 8]) && tail.iter().all(|b| *b == 0)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn info(m: &Manifest) -> SnapshotInfo {
    SnapshotInfo {
        id: SnapshotId(m.id),
        parent: m.parent.map(SnapshotId),
        epoch: Epoch(m.epoch),
        time_unix_ms: m.time_unix_ms,
        label: m.label.clone(),
        logical_size: m.logical_size,
        page_size: m.page_size,
        page_count: m.page_count,
        merkle_root: m.merkle_root,
        pages_written: m.pages_written,
        pages_changed: m.pages_changed,
        data_bytes: m.data_bytes,
        meta_bytes: m.meta_bytes,
    }
}

impl Store {
    /// Creates a store in the existing directory `dir` (std::fs backend).
    pub fn init(dir: impl AsRef<Path>, opts: StoreOptions) -> Result<Store, StoreError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.into(),
            step: "create store directory",
            source,
        })?;
        Self::init_with(Arc::new(FsStorage::new(dir, true)), opts)
    }

    /// Opens the store in `dir` (std::fs backend).
    pub fn open(dir: impl AsRef<Path>, mode: Mode) -> Result<(Store, OpenReport), StoreError> {
        let dir = dir.as_ref();
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(StoreError::NotAStore { path: dir.into() }),
            Err(source) if source.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotAStore { path: dir.into() })
            }
            Err(source) => {
                return Err(StoreError::Io {
                    path: dir.into(),
                    step: "open store directory",
                    source,
                })
            }
        }
        Self::open_with(
            Arc::new(FsStorage::new(dir, mode == Mode::Write)),
            mode,
            StoreOptions::default(),
        )
    }

    /// Creates a store on `io`.
    pub fn init_with(io: SharedStorage, opts: StoreOptions) -> Result<Store, StoreError> {
        if !opts.page_size.is_power_of_two() || !(512..=(16 << 20)).contains(&opts.page_size) {
            return Err(StoreError::Usage(
                "the page size must be a power of two from 512 bytes to 16 MiB",
            ));
        }
        // Lock first, then look: a writer that commits between our look and our lock must not
        // have its files taken for leftovers.
        let lock = match Self::lock(&*io) {
            Ok(lock) => lock,
            // Held by a writer: say that a store is there, if one is (nothing is changed).
            Err(e @ StoreError::Locked { .. }) => {
                return Err(match Self::read_superblock(&*io) {
                    Err(StoreError::NotAStore { .. }) => e,
                    _ => StoreError::AlreadyExists {
                        path: io.location().into(),
                    },
                })
            }
            Err(e) => return Err(e),
        };
        let names = io
            .list()
            .map_err(io_err(&*io, "", "list store directory"))?;
        if names.iter().any(|n| n == SUPERBLOCK_FILE) {
            match Self::read_superblock(&*io) {
                Err(StoreError::NotAStore { .. }) => {}
                _ => {
                    return Err(StoreError::AlreadyExists {
                        path: io.location().into(),
                    })
                }
            }
        }
        // Leftovers of an interrupted init (no superblock slot was ever written) are cleared.
        for n in names
            .iter()
            .filter(|n| parse_seg_name(n).is_some() || *n == SUPERBLOCK_FILE)
        {
            io.remove(n)
                .map_err(io_err(&*io, n, "remove leftover file"))?;
        }
        let first = seg_name(1);
        io.create(&first)
            .map_err(io_err(&*io, &first, "create segment"))?;
        io.write(&first, 0, &segment_header(1)).map_err(io_err(
            &*io,
            &first,
            "write segment header",
        ))?;
        io.sync(&first)
            .map_err(io_err(&*io, &first, "sync segment"))?;
        let sb = Superblock {
            generation: 1,
            page_size: opts.page_size,
            next_snapshot: 1,
            catalog: None,
            dedup: None,
            catalog_copy: None,
            active_segment: 1,
            active_len: SEG_HEADER,
            segments: vec![1],
            segment_bytes: opts.segment_bytes,
            version: FORMAT_VERSION,
        };
        io.create(SUPERBLOCK_FILE)
            .map_err(io_err(&*io, SUPERBLOCK_FILE, "create superblock"))?;
        // Both slots hold the committed state (see `publish`).
        let mut slots = sb.encode();
        slots.extend_from_slice(&sb.encode());
        io.write(SUPERBLOCK_FILE, 0, &slots).map_err(io_err(
            &*io,
            SUPERBLOCK_FILE,
            "write superblock",
        ))?;
        io.sync(SUPERBLOCK_FILE)
            .map_err(io_err(&*io, SUPERBLOCK_FILE, "sync superblock"))?;
        io.sync_dir()
            .map_err(io_err(&*io, "", "sync store directory"))?;
        let writer = Writer::new(lock, &sb, &*io)?;
        Ok(Store {
            io,
            opts,
            sb,
            cache: Mutex::new(HashMap::new()),
            pinned: BTreeMap::new(),
            writer: Some(writer),
        })
    }

    fn lock(io: &dyn Storage) -> Result<Box<dyn LockGuard>, StoreError> {
        match io
            .try_lock(LOCK_FILE)
            .map_err(io_err(io, LOCK_FILE, "lock store"))?
        {
            Some(guard) => {
                let note = format!("pid {}\n", std::process::id());
                // Best effort: the note only names the holder in others' error messages.
                let _ = io
                    .set_len(LOCK_FILE, 0)
                    .and_then(|_| io.write(LOCK_FILE, 0, note.as_bytes()));
                Ok(guard)
            }
            None => {
                let len = io.len(LOCK_FILE).unwrap_or(0).min(256);
                let mut buf = vec![0u8; len as usize];
                let holder = match io.read(LOCK_FILE, 0, &mut buf) {
                    Ok(()) => String::from_utf8_lossy(&buf).trim().to_string(),
                    Err(_) => String::new(),
                };
                let holder = if holder.is_empty() {
                    "unknown process".to_string()
                } else {
                    holder
                };
                Err(StoreError::Locked {
                    path: io.location().into(),
                    holder,
                })
            }
        }
    }

    /// Reads both superblock slots: the valid one with the highest generation, and what the other
    /// slot holds.
    fn read_superblock(io: &dyn Storage) -> Result<SlotsRead, StoreError> {
        let not_a_store = || StoreError::NotAStore {
            path: io.location().into(),
        };
        let len = match io.len(SUPERBLOCK_FILE) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_a_store()),
            Err(e) => return Err(io_err(io, SUPERBLOCK_FILE, "read superblock")(e)),
        };
        let mut buf = vec![0u8; 2 * SLOT_SIZE];
        let have = usize::try_from(len)
            .unwrap_or(usize::MAX)
            .min(2 * SLOT_SIZE);
        io.read(SUPERBLOCK_FILE, 0, &mut buf[..have])
            .map_err(io_err(io, SUPERBLOCK_FILE, "read superblock"))?;
        let slots = [
            Superblock::decode(&buf[..SLOT_SIZE]),
            Superblock::decode(&buf[SLOT_SIZE..]),
        ];
        for s in &slots {
            if let Err(SlotError::Newer(found)) = s {
                return Err(StoreError::NewerVersion {
                    path: io.location().into(),
                    found: *found,
                    supported: FORMAT_VERSION,
                });
            }
        }
        let damaged = |s: &Result<Superblock, SlotError>| {
            matches!(s, Err(SlotError::Checksum) | Err(SlotError::Malformed))
        };
        let best = slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().ok().map(|sb| (i, sb)))
            .max_by_key(|(i, sb)| (sb.generation, std::cmp::Reverse(*i)));
        let Some((slot, sb)) = best else {
            return Err(if slots.iter().any(damaged) {
                corrupt(
                    io,
                    SUPERBLOCK_FILE,
                    "superblock",
                    0,
                    "both slots fail their checksum",
                )
            } else {
                not_a_store()
            });
        };
        let other = &slots[1 - slot];
        let state = match other {
            Ok(o) if o.same_state(sb) => OtherSlot::Same,
            Ok(o) => OtherSlot::Older(o.generation),
            Err(SlotError::Empty) => OtherSlot::Empty,
            Err(_) => OtherSlot::Damaged,
        };
        Ok(SlotsRead {
            sb: sb.clone(),
            slot,
            other: state,
        })
    }

    /// Opens the store on `io`.
    ///
    /// A writer locks the store before it reads anything. Then, before it changes anything, it
    /// checks that every segment the committed state lists is there; rewrites the other
    /// superblock slot if it does not hold the committed state (so both do again); and only then
    /// removes segment files that no slot lists, the leftovers of an interrupted commit or gc —
    /// or, if a slot was damaged, renames them to `quarantine-…` instead.
    pub fn open_with(
        io: SharedStorage,
        mode: Mode,
        opts: StoreOptions,
    ) -> Result<(Store, OpenReport), StoreError> {
        let lock = match mode {
            Mode::Read => None,
            Mode::Write => Some(Self::lock(&*io)?),
        };
        let read = Self::read_superblock(&*io)?;
        let sb = read.sb.clone();
        let mut damaged_segments = Vec::new();
        for id in &sb.segments {
            let name = seg_name(*id);
            let mut head = [0u8; 8];
            match io.read(&name, 0, &mut head) {
                Ok(()) if head == SEG_MAGIC => {}
                // Records carry their own checks: a damaged header hides nothing by itself, so
                // it is reported (and verify names it), not fatal.
                Ok(()) => damaged_segments.push(name),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => damaged_segments.push(name),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(corrupt(
                        &*io,
                        &name,
                        "segment file",
                        0,
                        format!(
                            "missing, but the superblock (generation {}) lists it; nothing was \
                             changed: restore the file from a copy of the store",
                            sb.generation
                        ),
                    ))
                }
                Err(e) => return Err(io_err(&*io, &name, "open segment")(e)),
            }
        }
        let mut report = OpenReport {
            generation: sb.generation,
            superblock_slot: read.slot,
            damaged_slot: read.other == OtherSlot::Damaged,
            superblock_note: read.note(&*io),
            damaged_segments,
            ..OpenReport::default()
        };
        let writer = match lock {
            None => None,
            Some(lock) => {
                let mut agree = read.other == OtherSlot::Same;
                if !agree {
                    // Both slots must name the committed state before anything is removed: a
                    // slot still naming an older state may list files that are garbage now.
                    let at = (1 - read.slot) as u64 * SLOT_SIZE as u64;
                    agree = io
                        .write(SUPERBLOCK_FILE, at, &sb.encode())
                        .and_then(|_| io.sync(SUPERBLOCK_FILE))
                        .is_ok();
                    report.repaired_slot = agree;
                }
                // If the slot could not be rewritten (a bad sector under it), the writer still
                // opens, with one copy, as the writer before it ran; nothing is removed.
                let names = if agree {
                    io.list()
                        .map_err(io_err(&*io, "", "list store directory"))?
                } else {
                    Vec::new()
                };
                let mut changed = false;
                for n in &names {
                    let Some(id) = parse_seg_name(n) else {
                        continue;
                    };
                    if sb.segments.binary_search(&id).is_ok() {
                        continue;
                    }
                    if read.other == OtherSlot::Damaged {
                        // A name nothing else has: quarantined files are never replaced.
                        let mut to = format!("quarantine-g{}-{n}", sb.generation);
                        let mut k = 1;
                        while names.contains(&to) || report.quarantined.contains(&to) {
                            to = format!("quarantine-g{}-{k}-{n}", sb.generation);
                            k += 1;
                        }
                        io.rename(n, &to).map_err(io_err(
                            &*io,
                            n,
                            "quarantine unlisted segment",
                        ))?;
                        report.quarantined.push(to);
                    } else {
                        io.remove(n)
                            .map_err(io_err(&*io, n, "remove leftover segment"))?;
                    }
                    changed = true;
                }
                if changed {
                    io.sync_dir()
                        .map_err(io_err(&*io, "", "sync store directory"))?;
                }
                let mut w = Writer::new(lock, &sb, &*io)?;
                w.degraded = !agree;
                Some(w)
            }
        };
        let opts = StoreOptions {
            page_size: sb.page_size,
            segment_bytes: if sb.segment_bytes == 0 {
                opts.segment_bytes
            } else {
                sb.segment_bytes
            },
            ..opts
        };
        let store = Store {
            io,
            opts,
            sb,
            cache: Mutex::new(HashMap::new()),
            pinned: BTreeMap::new(),
            writer,
        };
        // Damage containment: the newest snapshot whose manifest and index root read back.
        let ids = match store.snapshot_ids() {
            Ok(ids) => ids,
            Err(e) if e.is_corruption() => {
                // The catalog itself is damaged: no snapshot is reachable, but the store opens so
                // that verify can say what is wrong.
                report.catalog_damage = Some(e.to_string());
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        for id in ids.iter().rev() {
            match store
                .snapshot(*id)
                .and_then(|s| store.index_root(&s).map(|_| s))
            {
                Ok(_) => {
                    report.latest = Some(*id);
                    break;
                }
                Err(e) if e.is_corruption() => report.damaged.push(*id),
                Err(e) => return Err(e),
            }
        }
        Ok((store, report))
    }

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

    /// The committed generation (increases with every commit).
    pub fn generation(&self) -> u64 {
        self.sb.generation
    }

    /// Ids of the retained snapshots, ascending. Read from the catalog, or from its copy if the
    /// catalog is damaged.
    pub fn snapshot_ids(&self) -> Result<Vec<SnapshotId>, StoreError> {
        self.with_catalogs(|root| {
            let mut ids = Vec::new();
            trie::for_each(&mut self.read_io(), root, &mut |k, _| {
                ids.push(SnapshotId(k));
                Ok(())
            })?;
            Ok(ids)
        })
    }

    /// `f` on the catalog; if that meets damage and the store has a copy, `f` on the copy. The
    /// first error is returned when both fail.
    fn with_catalogs<R>(
        &self,
        f: impl Fn(Option<NodePtr>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        match f(self.sb.catalog) {
            Err(e) if e.is_corruption() && self.sb.catalog_copy.is_some() => {
                f(self.sb.catalog_copy).map_err(|_| e)
            }
            r => r,
        }
    }

    /// The newest retained snapshot.
    pub fn latest(&self) -> Result<Option<SnapshotId>, StoreError> {
        Ok(self.snapshot_ids()?.last().copied())
    }

    /// Snapshot `id`'s manifest, through the catalog or, past damage, its copy.
    fn manifest(&self, id: SnapshotId) -> Result<Manifest, StoreError> {
        self.with_catalogs(|root| self.manifest_in(root, id))
    }

    /// Snapshot `id`'s manifest as the catalog at `root` names it, checked.
    fn manifest_in(&self, root: Option<NodePtr>, id: SnapshotId) -> Result<Manifest, StoreError> {
        let r =
            trie::get(&mut self.read_io(), root, id.0)?.ok_or(StoreError::UnknownSnapshot(id))?;
        let segments = &self.read_io().segments.to_vec();
        let (_, _, payload) = read_record(&*self.io, segments, &r.loc, Kind::Manifest)?;
        let name = seg_name(r.loc.segment);
        if *blake3::hash(&payload).as_bytes() != r.hash {
            return Err(corrupt(
                &*self.io,
                &name,
                "snapshot manifest",
                r.loc.offset,
                "blake3 differs from the catalog's",
            ));
        }
        let m = Manifest::from_bytes(&payload)
            .map_err(|e| corrupt(&*self.io, &name, "snapshot manifest", r.loc.offset, e))?;
        if m.id != id.0 {
            return Err(corrupt(
                &*self.io,
                &name,
                "snapshot manifest",
                r.loc.offset,
                "manifest names another snapshot",
            ));
        }
        Ok(m)
    }

    /// What the store knows about snapshot `id`.
    pub fn snapshot(&self, id: SnapshotId) -> Result<SnapshotInfo, StoreError> {
        self.manifest(id).map(|m| info(&m))
    }

    /// Every retained snapshot, ascending by id.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>, StoreError> {
        self.snapshot_ids()?
            .into_iter()
            .map(|id| self.snapshot(id))
            .collect()
    }

    fn index_root(&self, s: &SnapshotInfo) -> Result<Option<NodePtr>, StoreError> {
        let root = self.manifest(s.id)?.index_root.map(|r| r.ptr());
        if let Some(p) = &root {
            self.read_io().load(p)?;
        }
        Ok(root)
    }

    /// Checks that snapshot `id`'s manifest and index root read back (O(1) in pages): `Ok(None)`
    /// if they do, `Ok(Some(what is wrong))` if they are damaged.
    pub fn verify_root(&self, id: SnapshotId) -> Result<Option<String>, StoreError> {
        match self.snapshot(id).and_then(|s| self.index_root(&s)) {
            Ok(_) => Ok(None),
            Err(e) if e.is_corruption() => Ok(Some(e.to_string())),
            Err(e) => Err(e),
        }
    }

    /// The content of page `vpn` in snapshot `id` (`None`: the page is zero), checked against its
    /// crc32 and blake3 before it is returned.
    pub fn read_page(&self, id: SnapshotId, vpn: Vpn) -> Result<Option<Vec<u8>>, StoreError> {
        let root = self.manifest(id)?.index_root.map(|r| r.ptr());
        match trie::get(&mut self.read_io(), root, vpn.0)? {
            Some(r) => self.read_ref(&r).map(Some),
            None => Ok(None),
        }
    }

    /// Calls `f` with every stored (non-zero) page of snapshot `id`, in address order.
    pub fn for_each_page(
        &self,
        id: SnapshotId,
        mut f: impl FnMut(Vpn, &Ref) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let root = self.manifest(id)?.index_root.map(|r| r.ptr());
        trie::for_each(&mut self.read_io(), root, &mut |k, r| f(Vpn(k), &r))
    }

    /// Calls `f` with every stored page of snapshot `id` whose number is in `range`, in order; only
    /// the index paths that reach the range are read.
    pub fn for_each_page_in(
        &self,
        id: SnapshotId,
        range: std::ops::Range<Vpn>,
        mut f: impl FnMut(Vpn, &Ref) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let root = self.manifest(id)?.index_root.map(|r| r.ptr());
        trie::for_each_in(
            &mut self.read_io(),
            root,
            range.start.0,
            range.end.0,
            &mut |k, r| f(Vpn(k), &r),
        )
    }

    /// The content a page reference names, checked (crc32, then blake3).
    pub fn read_ref(&self, r: &Ref) -> Result<Vec<u8>, StoreError> {
        let (_, hash, payload) =
            read_record(&*self.io, self.read_io().segments, &r.loc, Kind::Page)?;
        if hash != r.hash || *blake3::hash(&payload).as_bytes() != r.hash {
            return Err(corrupt(
                &*self.io,
                &seg_name(r.loc.segment),
                "page record",
                r.loc.offset,
                "content does not match its blake3 hash",
            ));
        }
        Ok(payload)
    }

    /// Pages whose content differs between snapshots `a` and `b`, in address order.
    pub fn diff(&self, a: SnapshotId, b: SnapshotId) -> Result<Vec<Vpn>, StoreError> {
        let ra = self.manifest(a)?.index_root.map(|r| r.ptr());
        let rb = self.manifest(b)?.index_root.map(|r| r.ptr());
        Ok(trie::diff(&mut self.read_io(), ra, rb)?
            .into_iter()
            .map(Vpn)
            .collect())
    }

    // ------------------------------------------------------------------------------------------
    // Writing a snapshot

    /// After a superblock write whose outcome is unknown (it failed and so did its undo, or the
    /// backend panicked during it), before anything else: the failed commit used generation
    /// g + 1 and may be on the disk in one slot, whatever a read says (after a failed `fsync` a
    /// read can come from the cache). So the committed state is written at generation g + 2 into
    /// both slots, each synced: it outranks the failed commit wherever that landed, and only then
    /// may the failed commit's record space be reused. The writer lock is still ours, so nobody
    /// else changed anything. If the writes fail, the writer stays in doubt.
    fn recover_in_doubt(&mut self) -> Result<(), StoreError> {
        if !self.writer.as_ref().is_some_and(|w| w.in_doubt) {
            return Ok(());
        }
        let in_doubt = StoreError::InDoubt {
            path: self.io.location().into(),
        };
        let mut sb = self.sb.clone();
        sb.generation += 2;
        sb.version = FORMAT_VERSION;
        let bytes = sb.encode();
        // The failed commit's slot first: the other one holds the only known-good copy.
        let failed = ((self.sb.generation + 1) % 2) * SLOT_SIZE as u64;
        for at in [failed, SLOT_SIZE as u64 - failed] {
            if self
                .io
                .write(SUPERBLOCK_FILE, at, &bytes)
                .and_then(|_| self.io.sync(SUPERBLOCK_FILE))
                .is_err()
            {
                return Err(in_doubt);
            }
        }
        self.sb = sb;
        if let Some(w) = self.writer.as_mut() {
            w.in_doubt = false;
            w.degraded = false;
        }
        // Back to the committed state: the failed commit's records and segments are garbage.
        self.rollback();
        Ok(())
    }

    /// After a commit whose second superblock copy could not be written: try again, so that one
    /// damaged slot cannot lose that commit. Called before every change and when the store is
    /// dropped; while it keeps failing the store still works (and gc keeps old files).
    fn restore_redundancy(&mut self) {
        let Some(w) = self.writer.as_mut().filter(|w| w.degraded && !w.in_doubt) else {
            return;
        };
        let second = SLOT_SIZE as u64 - (self.sb.generation % 2) * SLOT_SIZE as u64;
        let copied = self
            .io
            .write(SUPERBLOCK_FILE, second, &self.sb.encode())
            .and_then(|_| self.io.sync(SUPERBLOCK_FILE));
        w.degraded = copied.is_err();
    }

    /// Before a change: leave doubt, and restore the superblock's redundancy.
    fn settle(&mut self) -> Result<(), StoreError> {
        self.recover_in_doubt()?;
        self.restore_redundancy();
        Ok(())
    }

    /// Starts a snapshot whose pages are those of `parent` (or none) plus what `put` and
    /// `remove` change.
    pub fn begin(&mut self, parent: Option<SnapshotId>) -> Result<(), StoreError> {
        self.settle()?;
        self.write_io()?;
        self.idle_writer("a snapshot is already being written; commit or abort it first")?;
        let (base_root, base_count) = match parent {
            Some(p) => {
                let m = self.manifest(p)?;
                (m.index_root.map(|r| r.ptr()), m.page_count)
            }
            None => (None, 0),
        };
        let w = self.writer.as_mut().ok_or(StoreError::ReadOnly)?;
        w.pending = Some(Pending {
            parent,
            base_root,
            base_count,
            changes: BTreeMap::new(),
            fresh: HashMap::new(),
            pages_written: 0,
            changed: 0,
        });
        w.data_appended = 0;
        w.meta_appended = 0;
        Ok(())
    }

    /// Sets page `vpn` of the snapshot being written. All-zero pages are not stored (a zero page
    /// and an absent page are the same). Content already in the store is not written again.
    pub fn put(&mut self, vpn: Vpn, data: &[u8]) -> Result<(), StoreError> {
        if data.len() != self.sb.page_size as usize {
            return Err(StoreError::PageSize {
                len: data.len(),
                page_size: self.sb.page_size,
            });
        }
        if is_zero(data) {
            return self.remove(vpn);
        }
        self.put_hashed(vpn, data, *blake3::hash(data).as_bytes())
    }

    /// [`Store::put`] for a caller that already computed the content's blake3 (and knows the page
    /// is not all zero). The hash is checked again on every read, so a wrong one is caught there.
    pub fn put_hashed(&mut self, vpn: Vpn, data: &[u8], hash: [u8; 32]) -> Result<(), StoreError> {
        if data.len() != self.sb.page_size as usize {
            return Err(StoreError::PageSize {
                len: data.len(),
                page_size: self.sb.page_size,
            });
        }
        let dedup_root = self.sb.dedup;
        let mut wio = self.write_io()?;
        let fresh = wio
            .w
            .pending
            .as_ref()
            .ok_or(StoreError::Usage("put without begin"))?
            .fresh
            .get(&hash)
            .copied();
        let r = match fresh {
            Some(r) => r,
            None => match trie::get(&mut wio, dedup_root, dedup_key(&hash))? {
                // Reuse stored content only after reading it back intact: a damaged record must
                // not be linked into a new snapshot (a fresh copy is written instead, and the
                // dedup index is pointed at it on commit).
                Some(r) if r.hash == hash && intact(wio.io, &wio.w.segments, &r, data)? => r,
                _ => {
                    let loc = append(wio.io, wio.opts, wio.w, Kind::Page, vpn.0, &hash, data)?;
                    wio.w.data_appended += u64::from(loc.len);
                    let r = Ref { hash, loc };
                    let p = wio
                        .w
                        .pending
                        .as_mut()
                        .ok_or(StoreError::Usage("put without begin"))?;
                    p.fresh.insert(hash, r);
                    p.pages_written += 1;
                    r
                }
            },
        };
        let p = wio
            .w
            .pending
            .as_mut()
            .ok_or(StoreError::Usage("put without begin"))?;
        p.changes.insert(vpn.0, Some(r));
        self.flush_if_large()
    }

    /// Keeps the pending change list bounded: past `max_pending_changes` entries they are applied to
    /// an intermediate index root (whose superseded nodes gc reclaims), so a snapshot of any size
    /// is written in bounded memory.
    fn flush_if_large(&mut self) -> Result<(), StoreError> {
        let full = self
            .writer
            .as_ref()
            .and_then(|w| w.pending.as_ref())
            .is_some_and(|p| p.changes.len() >= self.opts.max_pending_changes.max(1));
        if full {
            self.flush_pending()?;
        }
        Ok(())
    }

    fn flush_pending(&mut self) -> Result<(), StoreError> {
        let mut wio = self.write_io()?;
        // Index nodes written by an earlier flush are read back below.
        flush_buffer(wio.io, wio.w)?;
        let Some(mut p) = wio.w.pending.take() else {
            return Ok(());
        };
        let result = (|| {
            let mut changes = Vec::with_capacity(p.changes.len());
            for (k, v) in std::mem::take(&mut p.changes) {
                let old = trie::get(&mut wio, p.base_root, k)?;
                if old.map(|r| r.hash) != v.map(|r| r.hash) {
                    changes.push((k, v));
                }
            }
            let mut delta = Delta::default();
            p.base_root = trie::apply(&mut wio, p.base_root, &changes, &mut delta)?;
            p.base_count = p.base_count + delta.added - delta.removed;
            p.changed += changes.len() as u64;
            Ok(())
        })();
        wio.w.pending = Some(p);
        result
    }

    /// Makes page `vpn` zero (absent) in the snapshot being written.
    pub fn remove(&mut self, vpn: Vpn) -> Result<(), StoreError> {
        let w = self.writer.as_mut().ok_or(StoreError::ReadOnly)?;
        let p = w
            .pending
            .as_mut()
            .ok_or(StoreError::Usage("remove without begin"))?;
        p.changes.insert(vpn.0, None);
        self.flush_if_large()
    }

    /// Drops the snapshot being written; the store stays as last committed.
    pub fn abort(&mut self) {
        self.rollback();
    }

    fn rollback(&mut self) {
        let sb = self.sb.clone();
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
        if let Some(w) = self.writer.as_mut().filter(|w| w.in_doubt) {
            // No reuse while in doubt, but reads of the committed state must still find its
            // segments (a failed gc dropped them from the list).
            w.pending = None;
            for id in &sb.segments {
                if let Err(i) = w.segments.binary_search(id) {
                    w.segments.insert(i, *id);
                }
            }
        }
        if let Some(w) = self.writer.as_mut().filter(|w| !w.in_doubt) {
            w.pending = None;
            for id in w.created.drain(..) {
                // Best effort; open removes segments the superblock does not list anyway.
                let _ = self.io.remove(&seg_name(id));
            }
            w.segments = sb.segments.clone();
            w.seg = sb.active_segment;
            w.off = sb.active_len;
            w.cap = self.io.len(&seg_name(sb.active_segment)).unwrap_or(0);
            w.touched.clear();
            w.buf.clear();
        }
    }

    /// Commits the snapshot being written: after `Ok`, it survives any crash.
    pub fn commit(&mut self, meta: SnapshotMeta) -> Result<CommitReport, StoreError> {
        let result = self.commit_inner(meta);
        if result.is_err() {
            self.rollback();
        }
        result
    }

    fn commit_inner(&mut self, meta: SnapshotMeta) -> Result<CommitReport, StoreError> {
        let page_size = self.sb.page_size;
        let mut sb = self.sb.clone();
        let upgrade = self.manifests_to_copy(&sb)?;
        let mut wio = self.write_io()?;
        // Index nodes of earlier flushes are read back below.
        flush_buffer(wio.io, wio.w)?;
        let pending = wio
            .w
            .pending
            .take()
            .ok_or(StoreError::Usage("commit without begin"))?;
        // Changes that leave a page as it was in the parent are dropped: they would only rewrite
        // index nodes.
        let mut changes = Vec::with_capacity(pending.changes.len());
        for (k, v) in pending.changes {
            let old = trie::get(&mut wio, pending.base_root, k)?;
            if old.map(|r| r.hash) != v.map(|r| r.hash) {
                changes.push((k, v));
            }
        }
        let mut delta = Delta::default();
        let root = trie::apply(&mut wio, pending.base_root, &changes, &mut delta)?;
        let page_count = pending.base_count + delta.added - delta.removed;
        let id = sb.next_snapshot;
        let mut label = meta.label;
        if let Some(l) = label.as_mut() {
            if l.len() > MAX_LABEL {
                let mut cut = MAX_LABEL;
                while !l.is_char_boundary(cut) {
                    cut -= 1;
                }
                l.truncate(cut);
            }
        }
        let manifest = Manifest {
            id,
            parent: pending.parent.map(|p| p.0),
            epoch: meta.epoch.0,
            time_unix_ms: meta.time_unix_ms.unwrap_or_else(now_ms),
            label,
            logical_size: meta.logical_size,
            page_size,
            page_count,
            merkle_root: root.map(|p| p.merkle).unwrap_or(EMPTY_ROOT),
            index_root: root.as_ref().map(RootRecord::from_ptr),
            pages_written: pending.pages_written,
            pages_changed: pending.changed + changes.len() as u64,
            data_bytes: wio.w.data_appended,
            meta_bytes: wio.w.meta_appended,
        };
        let bytes = manifest.to_bytes();
        let mhash = *blake3::hash(&bytes).as_bytes();
        let mloc = append(wio.io, wio.opts, wio.w, Kind::Manifest, id, &mhash, &bytes)?;
        wio.w.meta_appended += u64::from(mloc.len);
        sb.catalog = trie::apply(
            &mut wio,
            sb.catalog,
            &[(
                id,
                Some(Ref {
                    hash: mhash,
                    loc: mloc,
                }),
            )],
            &mut Delta::default(),
        )?;
        // The second copy, in the catalog's copy.
        let mloc2 = append(wio.io, wio.opts, wio.w, Kind::Manifest, id, &mhash, &bytes)?;
        wio.w.meta_appended += u64::from(mloc2.len);
        sb.catalog_copy = apply_catalog_copy(
            &mut wio,
            sb.catalog_copy,
            upgrade,
            vec![(
                id,
                Some(Ref {
                    hash: mhash,
                    loc: mloc2,
                }),
            )],
        )?;
        let mut fresh: Vec<(u64, Option<Ref>)> = pending
            .fresh
            .values()
            .map(|r| (dedup_key(&r.hash), Some(*r)))
            .collect();
        fresh.sort_unstable_by_key(|(k, _)| *k);
        fresh.dedup_by_key(|(k, _)| *k);
        // A 64-bit prefix already taken by other content keeps its first owner; one taken by the
        // same content was rewritten because the old record was damaged, and now points here.
        let mut new_keys = Vec::with_capacity(fresh.len());
        for (k, v) in fresh {
            let existing = trie::get(&mut wio, sb.dedup, k)?;
            if existing.is_none() || existing.map(|r| r.hash) == v.map(|r| r.hash) {
                new_keys.push((k, v));
            }
        }
        sb.dedup = trie::apply(&mut wio, sb.dedup, &new_keys, &mut Delta::default())?;
        sb.next_snapshot = id + 1;
        let (data_bytes, meta_bytes) = (wio.w.data_appended, wio.w.meta_appended);
        self.publish(sb)?;
        Ok(CommitReport {
            id: SnapshotId(id),
            pages_written: pending.pages_written,
            pages_changed: pending.changed + changes.len() as u64,
            page_count,
            data_bytes,
            meta_bytes,
            merkle_root: manifest.merkle_root,
        })
    }

    /// The commit point: sync every segment written, the directory if files were created, then
    /// write the new state into one superblock slot and sync it (the commit is durable), then into
    /// the other slot and sync it (the commit is redundant: one damaged slot loses nothing).
    ///
    /// Both slots hold the committed state whenever no commit is in flight (a writer's open
    /// repairs them), so while either slot is being written the other names a committed state.
    fn publish(&mut self, mut sb: Superblock) -> Result<(), StoreError> {
        let io = &*self.io;
        let w = self.writer.as_mut().ok_or(StoreError::ReadOnly)?;
        flush_buffer(io, w)?;
        for id in &w.touched {
            let name = seg_name(*id);
            io.sync(&name).map_err(io_err(io, &name, "sync segment"))?;
        }
        if w.dir_dirty {
            io.sync_dir()
                .map_err(io_err(io, "", "sync store directory"))?;
        }
        sb.generation = self.sb.generation + 1;
        sb.active_segment = w.seg;
        sb.active_len = w.off;
        sb.segments = w.segments.clone();
        sb.segments.sort_unstable();
        sb.segment_bytes = self.opts.segment_bytes;
        let bytes = sb.encode();
        let first = (sb.generation % 2) * SLOT_SIZE as u64;
        let second = SLOT_SIZE as u64 - first;
        // Until the outcome of the slot write is known, the writer is in doubt: if a panic
        // unwinds out of the backend here, the flag stays set, so no rollback reuses the records
        // a half-written slot may name (the store must be reopened).
        w.in_doubt = true;
        let written = io
            .write(SUPERBLOCK_FILE, first, &bytes)
            .map_err(io_err(io, SUPERBLOCK_FILE, "write superblock"))
            .and_then(|_| {
                io.sync(SUPERBLOCK_FILE)
                    .map_err(io_err(io, SUPERBLOCK_FILE, "sync superblock"))
            });
        if let Err(e) = written {
            // The new slot may or may not have reached the disk. Put the committed state in that
            // slot again, so the failed commit cannot surface later over records we will reuse.
            let undone = io
                .write(SUPERBLOCK_FILE, first, &self.sb.encode())
                .and_then(|_| io.sync(SUPERBLOCK_FILE));
            w.in_doubt = undone.is_err();
            return Err(e);
        }
        w.in_doubt = false;
        // Durable from here: a crash now opens to this commit (the other slot is older).
        w.touched.clear();
        w.created.clear();
        w.dir_dirty = false;
        self.sb = sb;
        w.degraded = true;
        let copied = io
            .write(SUPERBLOCK_FILE, second, &bytes)
            .and_then(|_| io.sync(SUPERBLOCK_FILE));
        // The commit stands either way. If the copy failed, only one slot names it; the next
        // commit writes the other slot first (generation parity), which is safe, but gc must not
        // remove files the other slot may still list until both slots agree again.
        w.degraded = copied.is_err();
        Ok(())
    }

    /// For a store without a catalog copy (written by format 1), every manifest, read and checked,
    /// to copy with the next commit; `None` when there is a copy (or nothing to copy).
    fn manifests_to_copy(&self, sb: &Superblock) -> Result<Option<ManifestCopies>, StoreError> {
        if sb.catalog_copy.is_some() || sb.catalog.is_none() {
            return Ok(None);
        }
        let mut out = Vec::new();
        for id in self.snapshot_ids()? {
            out.push((id.0, self.manifest(id)?.to_bytes()));
        }
        Ok(Some(out))
    }

    /// The writer, with no snapshot being written (else `Usage(busy)`).
    fn idle_writer(&self, busy: &'static str) -> Result<(), StoreError> {
        match self.writer.as_ref().ok_or(StoreError::ReadOnly)?.pending {
            Some(_) => Err(StoreError::Usage(busy)),
            None => Ok(()),
        }
    }

    /// Makes [`Store::delete`] refuse snapshot `id` until a matching [`Store::unpin`]: for a user
    /// of the store (the engine) whose next snapshot, or whose lazily read pages, stand on it.
    /// Pins are counted, so one holder's unpin does not lift another's. They live in this handle
    /// only; they are not persisted.
    pub fn pin(&mut self, id: SnapshotId) {
        *self.pinned.entry(id).or_insert(0) += 1;
    }

    /// Lifts one [`Store::pin`] of `id` (nothing if it holds none).
    pub fn unpin(&mut self, id: SnapshotId) {
        if let Some(n) = self.pinned.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.pinned.remove(&id);
            }
        }
    }

    /// The pinned snapshots, ascending.
    pub fn pinned(&self) -> Vec<SnapshotId> {
        self.pinned.keys().copied().collect()
    }

    /// Deletes snapshots (a commit). Their space is reclaimed by [`Store::gc`]. A pinned snapshot
    /// is refused with [`StoreError::Pinned`] and nothing is deleted.
    pub fn delete(&mut self, ids: &[SnapshotId]) -> Result<(), StoreError> {
        self.settle()?;
        self.idle_writer("a snapshot is being written; commit or abort it before deleting")?;
        let known = self.snapshot_ids()?;
        if let Some(missing) = ids.iter().find(|id| !known.contains(id)) {
            return Err(StoreError::UnknownSnapshot(*missing));
        }
        if let Some(pinned) = ids.iter().find(|id| self.pinned.contains_key(id)) {
            return Err(StoreError::Pinned(*pinned));
        }
        let mut changes: Vec<(u64, Option<Ref>)> = ids.iter().map(|id| (id.0, None)).collect();
        changes.sort_unstable_by_key(|(k, _)| *k);
        changes.dedup_by_key(|(k, _)| *k);
        let result = (|| {
            let mut sb = self.sb.clone();
            let upgrade = self.manifests_to_copy(&sb)?;
            let mut wio = self.write_io()?;
            sb.catalog = trie::apply(&mut wio, sb.catalog, &changes, &mut Delta::default())?;
            sb.catalog_copy =
                apply_catalog_copy(&mut wio, sb.catalog_copy, upgrade, changes.clone())?;
            self.publish(sb)
        })();
        if result.is_err() {
            self.rollback();
        }
        result
    }

    // ------------------------------------------------------------------------------------------
    // Space: check and gc

    /// Every record location reachable from the committed state, with its length (for `check`
    /// and the corruption campaign).
    #[doc(hidden)]
    pub fn live_records(&self) -> Result<BTreeMap<Location, u64>, StoreError> {
        let mut live = BTreeMap::new();
        let mut rio = self.read_io();
        for root in [self.sb.catalog, self.sb.dedup, self.sb.catalog_copy] {
            trie::for_each_node(&mut rio, root, &mut |p, _| {
                Ok(live.insert(p.loc, u64::from(p.loc.len)).is_none())
            })?;
        }
        // Page records only the dedup index names (a deleted snapshot's pages) are not live: gc
        // drops them and rebuilds the index without them.
        for root in [self.sb.catalog, self.sb.catalog_copy] {
            trie::for_each(&mut self.read_io(), root, &mut |_, r| {
                live.insert(r.loc, u64::from(r.loc.len));
                Ok(())
            })?;
        }
        for id in self.snapshot_ids()? {
            let root = self.manifest(id)?.index_root.map(|r| r.ptr());
            let mut rio = self.read_io();
            let mut pages = Vec::new();
            trie::for_each_node(&mut rio, root, &mut |p, n| {
                if live.insert(p.loc, u64::from(p.loc.len)).is_some() {
                    return Ok(false);
                }
                for (_, s) in &n.slots {
                    if let Slot::Entry(_, r) = s {
                        pages.push(r.loc);
                    }
                }
                Ok(true)
            })?;
            for loc in pages {
                live.insert(loc, u64::from(loc.len));
            }
        }
        Ok(live)
    }

    /// The records of both copies of the snapshot catalog — its nodes and the manifests it names —
    /// for the corruption campaign: one flipped bit in any of them must hide no snapshot.
    #[doc(hidden)]
    pub fn catalog_records(&self) -> Result<Vec<Location>, StoreError> {
        let mut out = Vec::new();
        for root in [self.sb.catalog, self.sb.catalog_copy] {
            trie::for_each_node(&mut self.read_io(), root, &mut |p, _| {
                out.push(p.loc);
                Ok(true)
            })?;
            trie::for_each(&mut self.read_io(), root, &mut |_, r| {
                out.push(r.loc);
                Ok(())
            })?;
        }
        Ok(out)
    }

    /// Record bytes in the store's segments, how many of them a retained snapshot (or the store's
    /// own indexes) uses, and the rest: leaked space that [`Store::gc`] reclaims.
    pub fn check(&self) -> Result<SpaceReport, StoreError> {
        let live: u64 = self.live_records()?.values().sum();
        let mut file_bytes = 0;
        for id in &self.sb.segments {
            let len = if *id == self.sb.active_segment {
                self.sb.active_len
            } else {
                let name = seg_name(*id);
                self.io
                    .len(&name)
                    .map_err(io_err(&*self.io, &name, "stat segment"))?
            };
            file_bytes += len.saturating_sub(SEG_HEADER);
        }
        Ok(SpaceReport {
            record_bytes: file_bytes,
            live_bytes: live,
            leaked_bytes: file_bytes.saturating_sub(live),
        })
    }

    /// Reclaims every byte no retained snapshot uses, by copying the live records into new
    /// segments, committing, then removing the old segments. Crash-safe: until the commit the old
    /// state is intact; after it, old segments are leftovers that open removes.
    pub fn gc(&mut self) -> Result<GcReport, StoreError> {
        self.settle()?;
        self.idle_writer("a snapshot is being written; commit or abort it before gc")?;
        let before = self.check()?;
        if before.leaked_bytes == 0 {
            return Ok(GcReport {
                bytes_before: before.record_bytes,
                bytes_after: before.record_bytes,
                bytes_freed: 0,
                segments_removed: 0,
            });
        }
        let old_segments = self.sb.segments.clone();
        let result = self.gc_copy();
        match result {
            Ok(()) => {}
            Err(e) => {
                self.rollback();
                return Err(e);
            }
        }
        let keep_old = self.writer.as_ref().is_some_and(|w| w.degraded);
        for id in old_segments.iter().filter(|_| !keep_old) {
            let name = seg_name(*id);
            self.io
                .remove(&name)
                .map_err(io_err(&*self.io, &name, "remove old segment"))?;
        }
        self.io
            .sync_dir()
            .map_err(io_err(&*self.io, "", "sync store directory"))?;
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let after = self.check()?;
        Ok(GcReport {
            bytes_before: before.record_bytes,
            bytes_after: after.record_bytes,
            bytes_freed: before.record_bytes.saturating_sub(after.record_bytes),
            segments_removed: if keep_old { 0 } else { old_segments.len() },
        })
    }

    fn gc_copy(&mut self) -> Result<(), StoreError> {
        let ids = self.snapshot_ids()?;
        let manifests: Vec<Manifest> = ids
            .iter()
            .map(|id| self.manifest(*id))
            .collect::<Result<_, _>>()?;
        let old_segments = self.sb.segments.clone();
        let mut sb = self.sb.clone();
        let io = self.io.clone();
        let mut wio = self.write_io()?;
        // New records go to fresh segments only.
        new_segment(&*io, wio.opts, wio.w)?;
        wio.w
            .segments
            .retain(|s| !old_segments.contains(s) || *s == 0);
        let mut segs_for_read = old_segments.clone();
        segs_for_read.extend(wio.w.segments.iter().copied());
        let mut page_map: HashMap<Location, Location> = HashMap::new();
        let mut node_map: HashMap<Location, NodePtr> = HashMap::new();
        let mut dedup: BTreeMap<u64, Ref> = BTreeMap::new();
        let mut catalog = Vec::new();
        let mut catalog_copy = Vec::new();
        for mut m in manifests {
            let root = m.index_root.as_ref().map(|r| r.ptr());
            let new_root = match root {
                Some(p) => Some(copy_node(
                    &*io,
                    &segs_for_read,
                    &mut wio,
                    &p,
                    &mut node_map,
                    &mut page_map,
                    &mut dedup,
                )?),
                None => None,
            };
            m.index_root = new_root.as_ref().map(RootRecord::from_ptr);
            let bytes = m.to_bytes();
            let hash = *blake3::hash(&bytes).as_bytes();
            let loc = append(&*io, wio.opts, wio.w, Kind::Manifest, m.id, &hash, &bytes)?;
            catalog.push((m.id, Some(Ref { hash, loc })));
            let loc = append(&*io, wio.opts, wio.w, Kind::Manifest, m.id, &hash, &bytes)?;
            catalog_copy.push((m.id, Some(Ref { hash, loc })));
        }
        sb.catalog = trie::apply(&mut wio, None, &catalog, &mut Delta::default())?;
        sb.catalog_copy = trie::apply(&mut wio, None, &catalog_copy, &mut Delta::default())?;
        let dedup: Vec<(u64, Option<Ref>)> = dedup.into_iter().map(|(k, r)| (k, Some(r))).collect();
        sb.dedup = trie::apply(&mut wio, None, &dedup, &mut Delta::default())?;
        wio.w.dir_dirty = true;
        self.publish(sb)
    }

    // ------------------------------------------------------------------------------------------
    // Verify

    /// Checks every crc32, every page's blake3 and every Merkle hash of the given snapshots (all
    /// when `ids` is empty), and the store's own indexes. Damage is reported, not returned as an
    /// error; an `Err` means verification itself could not run.
    pub fn verify(&self, ids: &[SnapshotId]) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        // The superblock as it is now (a writer's open may have repaired it since we opened). A
        // format 2 store keeps both slots equal: anything else is damage, or lost redundancy
        // (a commit interrupted between its slot writes) that a writer's open restores.
        // A reader cannot tell an older slot from a commit in flight between its two slot writes
        // (it takes no lock), so for a reader that is a note; the writer knows no commit is in
        // flight, so for it the older slot is a missing copy.
        match Self::read_superblock(&*self.io) {
            Ok(read)
                if read.other == OtherSlot::Damaged
                    || (read.other != OtherSlot::Same
                        && read.sb.version >= 2
                        && self.writer.is_some()) =>
            {
                report.damage.push(Damage {
                    snapshot: None,
                    vpn: None,
                    detail: read.note(&*self.io).unwrap_or_default(),
                })
            }
            Ok(read) => report.notes.extend(read.note(&*self.io)),
            Err(e) if e.is_corruption() => report.damage.push(Damage {
                snapshot: None,
                vpn: None,
                detail: e.to_string(),
            }),
            Err(e) => return Err(e),
        }
        let all = match self.snapshot_ids() {
            Ok(ids) => ids,
            Err(e) if e.is_corruption() => {
                report.damage.push(Damage {
                    snapshot: None,
                    vpn: None,
                    detail: format!("snapshot catalog: {e}"),
                });
                return Ok(report);
            }
            Err(e) => return Err(e),
        };
        let ids: Vec<SnapshotId> = if ids.is_empty() {
            all.clone()
        } else {
            ids.to_vec()
        };
        let mut nodes: HashMap<Location, Result<(), String>> = HashMap::new();
        let mut pages: HashMap<Location, Result<(), String>> = HashMap::new();
        for id in ids {
            if !all.contains(&id) {
                return Err(StoreError::UnknownSnapshot(id));
            }
            report.snapshots_checked += 1;
            let m = match self.manifest(id) {
                Ok(m) => m,
                Err(e) if e.is_corruption() => {
                    report.damage.push(Damage {
                        snapshot: Some(id),
                        vpn: None,
                        detail: e.to_string(),
                    });
                    continue;
                }
                Err(e) => return Err(e),
            };
            let root = m.index_root.as_ref().map(|r| r.ptr());
            let computed = match root {
                None => Ok(EMPTY_ROOT),
                Some(p) => self.verify_node(id, &p, 0, &mut nodes, &mut pages, &mut report),
            };
            match computed {
                Ok(h) if h == m.merkle_root => {}
                Ok(_) => report.damage.push(Damage {
                    snapshot: Some(id),
                    vpn: None,
                    detail: "Merkle root differs from the manifest's".into(),
                }),
                Err(detail) => report.damage.push(Damage {
                    snapshot: Some(id),
                    vpn: None,
                    detail,
                }),
            }
        }
        report.pages_checked = pages.len() as u64;
        report.nodes_checked = nodes.len() as u64;
        // Each copy of the catalog on its own: snapshots above were read through whichever is
        // intact, so damage in one copy hides nothing, but it is still damage.
        let copies = [
            ("snapshot catalog", self.sb.catalog, true),
            (
                "snapshot catalog copy",
                self.sb.catalog_copy,
                self.sb.catalog_copy.is_some(),
            ),
        ];
        for (which, root, present) in copies {
            if !present {
                continue; // a format 1 store has no copy until its next commit
            }
            let mut ids = Vec::new();
            let walked = trie::for_each(&mut self.read_io(), root, &mut |k, _| {
                ids.push(SnapshotId(k));
                Ok(())
            });
            let mut found = Vec::new();
            match walked {
                Ok(()) => {}
                Err(e) if e.is_corruption() => found.push(e.to_string()),
                Err(e) => return Err(e),
            }
            for id in ids {
                match self.manifest_in(root, id) {
                    Ok(_) => {}
                    Err(e) if e.is_corruption() => {
                        found.push(format!("snapshot {id}'s manifest: {e}"))
                    }
                    Err(e) => return Err(e),
                }
            }
            report.damage.extend(found.into_iter().map(|f| Damage {
                snapshot: None,
                vpn: None,
                detail: format!("{which}: {f}"),
            }));
        }
        for id in self.read_io().segments {
            let name = seg_name(*id);
            let mut head = [0u8; 8];
            if self.io.read(&name, 0, &mut head).is_err() || head != SEG_MAGIC {
                report.damage.push(Damage {
                    snapshot: None,
                    vpn: None,
                    detail: format!(
                        "{}: damaged segment header (its records are checked one by one)",
                        self.io.location().join(&name).display()
                    ),
                });
            }
        }
        // The dedup index only steers writes, but damage there is still damage.
        let mut rio = self.read_io();
        if let Err(e) = trie::for_each_node(&mut rio, self.sb.dedup, &mut |_, _| Ok(true)) {
            report.damage.push(Damage {
                snapshot: None,
                vpn: None,
                detail: format!("dedup index: {e}"),
            });
        }
        Ok(report)
    }

    /// Recomputes the Merkle hash below `ptr`, checking every record; `Err` describes why the
    /// subtree cannot be trusted. Damaged pages are recorded in `report` and still hash by their
    /// recorded hash, so one bad page does not hide the rest.
    #[allow(clippy::too_many_arguments)]
    fn verify_node(
        &self,
        id: SnapshotId,
        ptr: &NodePtr,
        depth: u8,
        nodes: &mut HashMap<Location, Result<(), String>>,
        pages: &mut HashMap<Location, Result<(), String>>,
        report: &mut VerifyReport,
    ) -> Result<[u8; 32], String> {
        let segments = self.read_io().segments.to_vec();
        let (_, _, payload) =
            read_record(&*self.io, &segments, &ptr.loc, Kind::Node).map_err(|e| e.to_string())?;
        let node =
            Node::decode(&payload).map_err(|e| format!("index node at {:?}: {}", ptr.loc, e.0))?;
        // Children sit one level deeper; checking it bounds the recursion by the trie's depth
        // even when damage makes a node point at itself.
        if node.depth != depth {
            return Err(format!(
                "index node at {:?}: depth {} where {depth} was expected (misplaced or looping)",
                ptr.loc, node.depth
            ));
        }
        for (_, s) in &node.slots {
            match s {
                Slot::Entry(vpn, r) => {
                    let res = pages
                        .entry(r.loc)
                        .or_insert_with(|| self.read_ref(r).map(|_| ()).map_err(|e| e.to_string()));
                    if let Err(detail) = res {
                        report.damage.push(Damage {
                            snapshot: Some(id),
                            vpn: Some(Vpn(*vpn)),
                            detail: detail.clone(),
                        });
                    }
                }
                Slot::Child(p) => {
                    let known = nodes.get(&p.loc).cloned();
                    let res = match known {
                        Some(r) => r,
                        None => {
                            let r = match self.verify_node(id, p, depth + 1, nodes, pages, report) {
                                Ok(h) if h == p.merkle => Ok(()),
                                Ok(_) => Err(format!(
                                    "index node at {:?}: Merkle hash differs from its parent's",
                                    p.loc
                                )),
                                Err(e) => Err(e),
                            };
                            nodes.insert(p.loc, r.clone());
                            r
                        }
                    };
                    if let Err(detail) = res {
                        report.damage.push(Damage {
                            snapshot: Some(id),
                            vpn: None,
                            detail,
                        });
                    }
                }
            }
        }
        nodes.entry(ptr.loc).or_insert(Ok(()));
        Ok(node.merkle())
    }
}

/// True if the page record `r` reads back, passes its checks and holds exactly `data`.
fn intact(io: &dyn Storage, segments: &[u32], r: &Ref, data: &[u8]) -> Result<bool, StoreError> {
    match read_record(io, segments, &r.loc, Kind::Page) {
        Ok((_, hash, payload)) => Ok(hash == r.hash && payload == data),
        Err(e) if e.is_corruption() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Manifests to copy into a new catalog copy: (snapshot id, manifest bytes).
type ManifestCopies = Vec<(u64, Vec<u8>)>;

/// Applies `changes` (sorted, key-unique) to the catalog copy at `root`; with `upgrade` (a store
/// that had no copy), first writes a copy of each of those manifests and builds the copy anew.
fn apply_catalog_copy(
    wio: &mut WriteIo<'_>,
    root: Option<NodePtr>,
    upgrade: Option<ManifestCopies>,
    changes: Vec<(u64, Option<Ref>)>,
) -> Result<Option<NodePtr>, StoreError> {
    let Some(manifests) = upgrade else {
        return trie::apply(wio, root, &changes, &mut Delta::default());
    };
    let mut all: BTreeMap<u64, Option<Ref>> = BTreeMap::new();
    for (id, bytes) in manifests {
        let hash = *blake3::hash(&bytes).as_bytes();
        let loc = append(wio.io, wio.opts, wio.w, Kind::Manifest, id, &hash, &bytes)?;
        wio.w.meta_appended += u64::from(loc.len);
        all.insert(id, Some(Ref { hash, loc }));
    }
    all.extend(changes);
    let entries: Vec<(u64, Option<Ref>)> = all.into_iter().filter(|(_, r)| r.is_some()).collect();
    trie::apply(wio, None, &entries, &mut Delta::default())
}

/// The dedup index's key for a content hash: its first 8 bytes.
fn dedup_key(hash: &[u8; 32]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&hash[..8]);
    u64::from_le_bytes(b)
}

#[allow(clippy::too_many_arguments)]
fn copy_node(
    io: &dyn Storage,
    segs: &[u32],
    wio: &mut WriteIo<'_>,
    ptr: &NodePtr,
    node_map: &mut HashMap<Location, NodePtr>,
    page_map: &mut HashMap<Location, Location>,
    dedup: &mut BTreeMap<u64, Ref>,
) -> Result<NodePtr, StoreError> {
    if let Some(p) = node_map.get(&ptr.loc) {
        return Ok(*p);
    }
    let node = load_node(io, segs, wio.cache, ptr)?;
    let mut slots = Vec::with_capacity(node.slots.len());
    for (d, s) in &node.slots {
        let s = match *s {
            Slot::Entry(k, r) => {
                let loc = match page_map.get(&r.loc) {
                    Some(l) => *l,
                    None => {
                        let (key, hash, payload) = read_record(io, segs, &r.loc, Kind::Page)?;
                        if hash != r.hash || *blake3::hash(&payload).as_bytes() != r.hash {
                            return Err(corrupt(io, &seg_name(r.loc.segment), "page record", r.loc.offset, "content does not match its blake3 hash; delete the damaged snapshot before gc"));
                        }
                        let l = append(io, wio.opts, wio.w, Kind::Page, key, &hash, &payload)?;
                        page_map.insert(r.loc, l);
                        dedup
                            .entry(dedup_key(&hash))
                            .or_insert(Ref { hash, loc: l });
                        l
                    }
                };
                Slot::Entry(k, Ref { hash: r.hash, loc })
            }
            Slot::Child(p) => Slot::Child(copy_node(io, segs, wio, &p, node_map, page_map, dedup)?),
        };
        slots.push((*d, s));
    }
    let new = wio.store(&Node {
        depth: node.depth,
        slots,
    })?;
    node_map.insert(ptr.loc, new);
    Ok(new)
}

impl Writer {
    fn new(
        lock: Box<dyn LockGuard>,
        sb: &Superblock,
        io: &dyn Storage,
    ) -> Result<Writer, StoreError> {
        let name = seg_name(sb.active_segment);
        let cap = io
            .len(&name)
            .map_err(io_err(io, &name, "open active segment"))?;
        Ok(Writer {
            _lock: lock,
            seg: sb.active_segment,
            off: sb.active_len,
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
            buf: Vec::with_capacity(WRITE_BUFFER + (64 << 10)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::FaultyStorage;
    use crate::format::record_len;

    /// Appends, through the writer, an index node that names itself as its only child, and
    /// commits it both as the catalog root and as snapshot 2's index root.
    fn store_with_a_looping_node() -> (Arc<FaultyStorage>, StoreOptions) {
        let io = Arc::new(FaultyStorage::new());
        let opts = StoreOptions {
            page_size: 512,
            ..StoreOptions::default()
        };
        let mut store = Store::init_with(io.clone(), opts).expect("init");
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
        };
        let bytes = m.to_bytes();
        let hash = *blake3::hash(&bytes).as_bytes();
        let mloc = append(wio.io, wio.opts, wio.w, Kind::Manifest, 2, &hash, &bytes)
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

    /// The same loop reached by verify's own walk (which reads records without the node cache):
    /// the depth check ends it.
    #[test]
    fn verify_walk_stops_at_a_misplaced_depth() {
        let (io, opts) = store_with_a_looping_node();
        let (store, _) = Store::open_with(io, Mode::Read, opts).expect("open");
        let m = store.manifest(SnapshotId(2)).expect("manifest");
        let root = m.index_root.expect("root").ptr();
        let mut report = VerifyReport::default();
        let r = store.verify_node(
            SnapshotId(2),
            &root,
            0,
            &mut HashMap::new(),
            &mut HashMap::new(),
            &mut report,
        );
        // The root itself decodes; its child (itself, one level down) is refused.
        assert!(r.is_ok());
        assert!(
            report.damage.iter().any(|d| d.detail.contains("depth")),
            "{report:?}"
        );
    }
}
