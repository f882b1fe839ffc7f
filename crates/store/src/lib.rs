//! # pagesnap-store
//!
//! Where snapshots live: a directory holding append-only segment files of checksummed records and
//! a two-slot superblock. Built for the engine (dirty pages of a persistent address space) and the
//! CLI (pages of raw disk images).
//!
//! - **Pages** (format 4): compressed in checksummed frames of up to 16 pages (zstd or lz4, on
//!   every core while the writer goes on; [`Compression`]), or back to back in extents when
//!   compression is off or does not pay; an index entry names the page's place and holds the
//!   blake3 of its plain bytes, checked on every read. All-zero pages are never stored;
//!   identical contents are stored once across all snapshots (dedup by blake3).
//! - **Page maps O(changed)**: a snapshot's index is a chain of sorted chunks — a base and the
//!   deltas of each commit since ([`docs/format.md`](../../docs/format.md)); a commit that
//!   changes D pages writes D entries of 56 bytes, and a new base when the deltas reach its size,
//!   so index metadata stays at a few percent of the data.
//! - **One sync per commit**: pages, chunks and a chained, checksummed commit record (written
//!   twice) are appended and synced once; the two-slot superblock is a hint that open scans on
//!   from. A snapshot is entirely there after a crash, or not at all; one flipped bit in a commit
//!   record or a slot hides nothing. Format 1 and 2 stores (a Merkle trie, a superblock write per
//!   commit) are still read and written; [`Store::upgrade`] converts them.
//! - **Recovery that proves before it deletes**: a writer locks before it reads, checks every
//!   listed segment, makes both slots agree, and only then removes leftovers (or quarantines them
//!   when a slot was damaged).
//! - **Damage is contained and reported**: every read is checked (crc32, blake3) and
//!   never returns wrong bytes; [`Store::verify`] lists damaged snapshots and pages; open reports
//!   the newest snapshot that still reads back.
//! - **Delete and GC**: deleting is a commit; [`Store::gc`] copies live records to new segments
//!   and drops the old ones; [`Store::check`] reports leaked bytes (0 after gc).
//! - **One writer**: an advisory lock; a second writer gets [`StoreError::Locked`] naming the
//!   holder. Readers use the last committed state.
//! - **One I/O seam**: [`Storage`], implemented by [`FsStorage`] (std::fs, positioned reads and writes) and by
//!   [`fault::FaultyStorage`], which fails or crashes at any operation for the crash tests.
//!
//! ```
//! use pagesnap_store::{Mode, SnapshotMeta, Store, StoreOptions};
//! use pagesnap_pagetable::Vpn;
//!
//! let dir = tempfile::tempdir().expect("temp dir");
//! let mut store = Store::init(dir.path(), StoreOptions::default()).expect("init");
//! store.begin(None).expect("begin");
//! store.put(Vpn(3), &[7u8; 4096]).expect("put");
//! let first = store.commit(SnapshotMeta::default()).expect("commit");
//! drop(store);
//! let (store, _report) = Store::open(dir.path(), Mode::Read).expect("open");
//! assert_eq!(store.read_page(first.id, Vpn(3)).expect("read"), Some(vec![7u8; 4096]));
//! assert_eq!(store.read_page(first.id, Vpn(4)).expect("read"), None); // zero page
//! ```

mod catalog;
mod codec;
mod error;
pub mod fault;
mod format;
mod index;
pub mod keys;
mod manifest;
pub mod pagehash;
mod storage;
mod store;
mod trie;

pub use codec::{Codec, Compression, DEFAULT_ZSTD_LEVEL, ZSTD_LEVELS};
pub use error::StoreError;

/// The decoders, exposed for fuzzing (`fuzz/`) and the arbitrary-bytes smoke tests. Each takes
/// untrusted bytes and must return an error, never panic or allocate by an unchecked length.
#[doc(hidden)]
pub mod fuzzing {
    /// Decodes a record of each kind; true if any kind accepts the bytes.
    pub fn decode_record(bytes: &[u8]) -> bool {
        use crate::format::{decode_record, Kind};
        [
            Kind::Page,
            Kind::Node,
            Kind::Manifest,
            Kind::Manifest2,
            Kind::Commit,
            Kind::Chunk,
            Kind::Pages,
        ]
        .into_iter()
        .any(|k| decode_record(bytes, k).is_ok())
    }
    /// Decodes a format 4 page frame record (512-byte pages) and decompresses it; true if both
    /// succeed.
    pub fn decode_frame(bytes: &[u8]) -> bool {
        crate::store::fuzz_frame(bytes)
    }
    /// Decodes a format 3 page-map chunk payload.
    pub fn decode_chunk(bytes: &[u8]) -> bool {
        crate::index::Chunk::decode(bytes).is_ok()
    }
    /// Decodes a format 3 commit record payload.
    pub fn decode_commit(bytes: &[u8]) -> bool {
        crate::catalog::CommitRecord::from_bytes(bytes).is_ok()
    }
    /// Decodes an index node payload.
    pub fn decode_node(bytes: &[u8]) -> bool {
        crate::trie::Node::decode(bytes).is_ok()
    }
    /// Decodes a superblock slot.
    pub fn decode_superblock(bytes: &[u8]) -> bool {
        crate::format::Superblock::decode(bytes).is_ok()
    }
    /// Decodes a manifest payload.
    pub fn decode_manifest(bytes: &[u8]) -> bool {
        use crate::format::Kind;
        [Kind::Manifest, Kind::Manifest2]
            .into_iter()
            .any(|k| crate::manifest::Manifest::from_bytes(k as u8, bytes).is_ok())
    }

    /// The files of a small valid store (three snapshots, small segments), to mutate.
    pub fn sample_store_files() -> Vec<(String, Vec<u8>)> {
        use crate::fault::FaultyStorage;
        use crate::{SnapshotMeta, Storage, Store, StoreOptions, Vpn};
        // An in-memory backend with no faults planned: none of these steps can fail.
        let io = std::sync::Arc::new(FaultyStorage::new());
        let opts = StoreOptions {
            page_size: 512,
            segment_bytes: 8 << 10,
            preallocate: 2 << 10,
            ..StoreOptions::default()
        };
        let mut store = Store::init_with(io.clone(), opts).expect("in-memory init");
        for round in 0..3u8 {
            let parent = store.latest().expect("in-memory read");
            store.begin(parent).expect("in-memory begin");
            for v in 0..5u64 {
                store
                    .put(
                        Vpn(v * 3 + u64::from(round)),
                        &[round ^ v as u8 ^ 0x55; 512],
                    )
                    .expect("in-memory put");
            }
            let meta = SnapshotMeta {
                label: Some(format!("r{round}")),
                ..SnapshotMeta::default()
            };
            store.commit(meta).expect("in-memory commit");
        }
        drop(store);
        let names = io.list().expect("in-memory list");
        names
            .into_iter()
            .filter(|n| n != "lock")
            .filter_map(|n| io.contents(&n).map(|c| (n, c)))
            .collect()
    }

    /// Builds a store from `files` and opens, lists, verifies and reads all of it, as the reader
    /// and as the writer. Errors are expected; a panic is a bug.
    pub fn exercise(files: &[(String, Vec<u8>)]) {
        use crate::fault::FaultyStorage;
        use crate::{Mode, Storage, Store, StoreOptions};
        let io = std::sync::Arc::new(FaultyStorage::new());
        for (name, bytes) in files {
            if io
                .create(name)
                .and_then(|_| io.write(name, 0, bytes))
                .is_err()
            {
                return;
            }
        }
        for mode in [Mode::Read, Mode::Write] {
            let Ok((store, _)) = Store::open_with(io.clone(), mode, StoreOptions::default()) else {
                continue;
            };
            let _ = store.verify(&[]);
            let _ = store.check();
            if let Ok(ids) = store.snapshot_ids() {
                for id in ids {
                    let _ = store.snapshot(id);
                    let _ = store.for_each_page(id, |_, r| store.read_ref(r).map(|_| ()));
                }
            }
        }
    }
}
pub use format::{Location, NodePtr, Ref, FORMAT_VERSION};
pub use manifest::MAX_LABEL;
pub use pagesnap_pagetable::{Epoch, Vpn};
pub use storage::{start_writeback, FsStorage, LockGuard, SharedStorage, Storage, DIRECT_ALIGN};
pub use store::{Cipher, Mode, Store, EMPTY_ROOT};

use std::fmt;

/// A snapshot's id: 1, 2, 3, … in commit order, never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapshotId(pub u64);

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Settings for creating (and writing) a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreOptions {
    /// Bytes per page: a power of two, 512 B to 16 MiB. Fixed when the store is created.
    pub page_size: u32,
    /// A segment file is closed once it reaches this size. Recorded in the superblock when the
    /// store is created; opening a format 2 store uses the recorded size, not this one.
    pub segment_bytes: u64,
    /// Segment files are pre-sized to this many bytes, then grow by at least as much: formats 3
    /// and 4 double them, in steps of at most 16 MiB (or this, if larger), so appends rarely
    /// extend the file and a large snapshot grows it a few times (each growth waits for the
    /// writes in flight); formats 1 and 2 grow in steps of exactly this.
    pub preallocate: u64,
    /// Pending page changes held in memory before they are applied to an intermediate index root
    /// (bounds a snapshot's memory; superseded intermediate nodes are reclaimed by gc).
    pub max_pending_changes: usize,
    /// The compression of new pages (format 4), recorded in the store when it is created;
    /// [`Store::set_compression`] changes it later.
    pub compression: Compression,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            page_size: 4096,
            segment_bytes: 256 << 20,
            preallocate: 8 << 20,
            max_pending_changes: 1 << 18,
            compression: Compression::Auto,
        }
    }
}

/// What the caller records with a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// The epoch the snapshot seals.
    pub epoch: Epoch,
    /// A label (at most [`MAX_LABEL`] bytes are kept).
    pub label: Option<String>,
    /// Logical size in bytes (a disk image's length).
    pub logical_size: u64,
    /// Commit time; now when `None`.
    pub time_unix_ms: Option<u64>,
    /// Where the content came from, as the writer describes it (at most [`MAX_LABEL`] bytes
    /// kept): the image module records the image file's identity here, to know an unchanged image
    /// without reading it.
    pub origin: Option<String>,
}

/// What the store knows about a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Its id.
    pub id: SnapshotId,
    /// The snapshot it was written on top of.
    pub parent: Option<SnapshotId>,
    /// The epoch it seals.
    pub epoch: Epoch,
    /// Commit time, milliseconds since the Unix epoch.
    pub time_unix_ms: u64,
    /// Its label.
    pub label: Option<String>,
    /// Where its content came from, as its writer described it (`None` for format 1 snapshots).
    pub origin: Option<String>,
    /// Logical size in bytes.
    pub logical_size: u64,
    /// Bytes per page.
    pub page_size: u32,
    /// Stored (non-zero) pages.
    pub page_count: u64,
    /// Merkle root over its (page, content hash) pairs.
    pub merkle_root: [u8; 32],
    /// New page records it wrote (content not already in the store).
    pub pages_written: u64,
    /// Pages whose content differs from its parent's.
    pub pages_changed: u64,
    /// Bytes of page records it wrote.
    pub data_bytes: u64,
    /// Bytes of index, manifest and catalog records it wrote.
    pub meta_bytes: u64,
}

/// The result of a commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitReport {
    /// The new snapshot.
    pub id: SnapshotId,
    /// New page records written.
    pub pages_written: u64,
    /// Index entries changed against the parent.
    pub pages_changed: u64,
    /// Stored pages in the snapshot.
    pub page_count: u64,
    /// Bytes of page records written.
    pub data_bytes: u64,
    /// Bytes of metadata written (index nodes, manifest, catalog and dedup nodes).
    pub meta_bytes: u64,
    /// The snapshot's Merkle root.
    pub merkle_root: [u8; 32],
}

/// What open found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// The committed generation in use.
    pub generation: u64,
    /// Which superblock slot holds it.
    pub superblock_slot: usize,
    /// A superblock slot failed its checksum (a torn superblock write, or damage); the other was used.
    pub damaged_slot: bool,
    /// What is wrong with the superblock's other slot, naming the file, the slot and what the
    /// store fell back to: damaged, or older than the one in use (a commit interrupted between its
    /// two slot writes, or a format 1 store). `None`: both slots hold the committed state.
    pub superblock_note: Option<String>,
    /// A writer's open rewrote the other slot with the committed state, so both hold it again.
    pub repaired_slot: bool,
    /// Format 3: the last commit record found after the superblock's hint was not taken because
    /// bytes the commit wrote before it fail their crc32: a commit interrupted before its sync
    /// finished (never acknowledged) — or, if it had been acknowledged, damage since (a log's
    /// tail cannot tell the two apart; see `docs/format.md`). Says which commit and snapshot.
    pub discarded_tail: Option<String>,
    /// Format 3: commit records of which one copy was damaged (a torn last commit, or damage
    /// since) that a writer's open rewrote from the other copy.
    pub repaired_records: usize,
    /// Files a writer's open set aside instead of removing (segment files no slot lists, found
    /// while a slot was damaged): renamed to `quarantine-…`, never deleted by pagesnap.
    pub quarantined: Vec<String>,
    /// Listed segment files whose header is damaged (their records are still read, each checked
    /// by its own crc32 and hashes; verify names them).
    pub damaged_segments: Vec<String>,
    /// The newest snapshot whose manifest and index root read back.
    pub latest: Option<SnapshotId>,
    /// Newer snapshots passed over because they are damaged (newest first).
    pub damaged: Vec<SnapshotId>,
    /// The snapshot catalog is damaged: what is wrong (no snapshot can be listed).
    pub catalog_damage: Option<String>,
}

/// One finding of [`Store::verify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// The snapshot affected (`None`: the store's own indexes).
    pub snapshot: Option<SnapshotId>,
    /// The page affected, when one is.
    pub vpn: Option<Vpn>,
    /// What is wrong, naming the file and offset.
    pub detail: String,
}

/// The result of [`Store::verify`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Snapshots checked.
    pub snapshots_checked: u64,
    /// Distinct page records checked.
    pub pages_checked: u64,
    /// Distinct index nodes checked.
    pub nodes_checked: u64,
    /// What is damaged; empty when the store is clean.
    pub damage: Vec<Damage>,
    /// What is worth knowing but is not damage (e.g. seen by a reader: the other superblock slot
    /// is older — a commit in flight, or a missing copy that the writer restores).
    pub notes: Vec<String>,
}

impl VerifyReport {
    /// True when nothing is damaged.
    pub fn is_clean(&self) -> bool {
        self.damage.is_empty()
    }
}

/// Space use (see [`Store::check`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpaceReport {
    /// Bytes of records in segment files.
    pub record_bytes: u64,
    /// Bytes of records something retained uses.
    pub live_bytes: u64,
    /// The rest.
    pub leaked_bytes: u64,
    /// Distinct stored pages the retained snapshots name (format 3 and later; 0 before).
    pub pages: u64,
    /// The record bytes holding them (their share of each frame or extent): `pages` times the
    /// page size over this is the compression ratio.
    pub page_bytes: u64,
}

/// The result of [`Store::gc`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Record bytes before.
    pub bytes_before: u64,
    /// Record bytes after.
    pub bytes_after: u64,
    /// Bytes reclaimed.
    pub bytes_freed: u64,
    /// Old segment files removed.
    pub segments_removed: usize,
}
