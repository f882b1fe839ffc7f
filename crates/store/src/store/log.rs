//! Format 3: the commit log. How a commit is laid out and made durable with one sync, how open
//! finds the last commit past the superblock's hint, the catalog the log carries, page maps
//! (chains of chunks) and page extents. See `docs/format.md` ("Format 3").
//!
//! A commit appends, after the committed end of the active segment: its new pages in extents, its
//! page map chunks (a delta, or a new base), then its commit record twice; then syncs the segment
//! once. The superblock is written only as a *hint* (every [`HINT_EVERY`] commits or
//! [`HINT_BYTES`], when a segment is added, when a writer opens, after a failed commit, and by gc
//! and upgrade, for which it is the commit point). Open reads the hint and scans the log after it:
//! a commit record counts only if it was written under the hint's generation, names the last
//! counted commit as its predecessor, and the crc32 of every byte the commit appended before it
//! matches — so a torn commit (its record landed, some of its pages did not) is not taken, and a
//! record left over from an abandoned commit (older generation) never is.

use super::commit::{new_segment, now_ms, WRITE_BUFFER};
use super::{corrupt, io_err, Pending, Store, Writer};
use crate::catalog::{CommitRecord, Link};
use crate::error::StoreError;
use crate::format::{
    decode_record, encode_record, record_len, seg_name, Kind, Location, Ref, Superblock,
    MAX_RECORD, REC_HEADER, REC_MAGIC, REC_TRAILER, SEG_HEADER, SLOT_SIZE, SUPERBLOCK_FILE,
};
use crate::index::{
    apply_chain, Chunk, ChunkRef, ContentRoot, PageMap, MAX_CHAIN_CHUNKS, MAX_CHAIN_DELTAS,
    MAX_CHUNK_ENTRIES,
};
use crate::manifest::{ManifestV3, RecordRef, MAX_LABEL};
use crate::storage::Storage;
use crate::{CommitReport, SnapshotId, SnapshotInfo, SnapshotMeta};
use pagesnap_pagetable::{Epoch, Vpn};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::Arc;

/// The superblock hint is rewritten after this many commits...
pub(crate) const HINT_EVERY: u64 = 256;
/// ... or once this many bytes were appended since it (bounds open's scan).
pub(crate) const HINT_BYTES: u64 = 64 << 20;
/// A commit writes a hint inside itself once it has appended this many bytes since the last one:
/// open scans at most [`MAX_SCAN`] after the hint, and a commit starts less than [`HINT_BYTES`]
/// after one (a hint owed is written by `begin`), so what it appends after its last hint — less
/// than this, then what one check lets through (an extent or frame of at most one 16 MiB page or
/// 1 MiB, a page map chunk of 3.5 MiB, or a commit record's two copies of at most 16 MiB each) —
/// ends inside the window. A hint inside a commit writes and syncs both superblock slots (it
/// syncs none of the commit's bytes: `hint_inside_commit`): spaced at 128 MiB rather than every
/// [`HINT_BYTES`], a 256 MiB first snapshot takes one instead of three.
const COMMIT_HINT_BYTES: u64 = MAX_SCAN - (64 << 20);

/// Changes from which a commit on an empty parent writes its page-map chunks while another
/// thread sums the content root and builds the map (`commit3_inner`).
const PARALLEL_COMMIT: usize = 4096;

/// What a hint makes durable before the superblock names its position.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HintSync {
    /// Everything appended so far: the log buffer written out, every segment written since the
    /// last sync synced (a hint between commits).
    Log,
    /// Only what the hint names: the segments created since the last hint (their size and
    /// header) and their directory entries (a hint inside a commit, `hint_inside_commit`).
    Named,
}
/// A catalog checkpoint is written once this many commits (or more than the retained snapshots)
/// passed since the last one (bounds the walk that lists snapshots).
const CHECKPOINT_EVERY: u64 = 64;
/// Page maps kept in memory (the writer's parent, the newest snapshots read).
const MAP_CACHE: usize = 4;

/// The snapshot catalog of a format 3 store, as the commit log gives it.
#[derive(Debug, Default)]
pub(crate) struct Catalog {
    pub(crate) manifests: BTreeMap<u64, ManifestV3>,
    /// The last commit's sequence number.
    pub(crate) seq: u64,
    /// Commits since the last checkpoint.
    pub(crate) since_checkpoint: u64,
    /// What open found wrong with the log (bytes under a commit that fail their crc32, a commit
    /// record damaged in one copy): damage that verify reports.
    pub(crate) damage: Vec<String>,
    /// The catalog could not be read: no snapshot is reachable.
    pub(crate) unreadable: Option<String>,
    /// Open did not take the log's last commit (see `OpenReport::discarded_tail`).
    pub(crate) discarded: Option<String>,
}

/// Page maps recently used, newest last.
#[derive(Debug, Default)]
pub(crate) struct MapCache(Vec<(u64, Arc<PageMap>)>);

impl MapCache {
    fn get(&mut self, id: u64) -> Option<Arc<PageMap>> {
        let i = self.0.iter().position(|(k, _)| *k == id)?;
        let e = self.0.remove(i);
        let m = e.1.clone();
        self.0.push(e);
        Some(m)
    }
    fn put(&mut self, id: u64, map: Arc<PageMap>) {
        self.0.retain(|(k, _)| *k != id);
        if self.0.len() >= MAP_CACHE {
            self.0.remove(0);
        }
        self.0.push((id, map));
    }
    fn take(&mut self, id: u64) -> Option<Arc<PageMap>> {
        let i = self.0.iter().position(|(k, _)| *k == id)?;
        Some(self.0.remove(i).1)
    }
    pub(crate) fn clear(&mut self) {
        self.0.clear();
    }
}

/// The writer's format 3 state.
#[derive(Default)]
pub(crate) struct LogWriter {
    /// crc32 of the bytes appended since the last commit (or since the segment began).
    pub(crate) range_crc: crc32fast::Hasher,
    /// An extent being filled in the write buffer: where its record starts in `buf`, and pages.
    pub(crate) extent: Option<(usize, u32)>,
    /// Commits and bytes since the superblock was last written.
    pub(crate) since_hint: u64,
    pub(crate) bytes_since_hint: u64,
    /// Bytes may have been appended past the committed end by a commit that did not happen: the
    /// superblock generation must move on before the next commit (records of the abandoned one
    /// then never count).
    pub(crate) need_hint: bool,
    /// A hint inside this commit synced none of the bytes the commit appended before it (its
    /// record's range crc starts after the hint): they are synced before the record is written
    /// (`write_commit`), so the record never lands without them.
    pub(crate) unsynced_before_hint: bool,
    /// Content hash to the place of a stored page, for every page a retained snapshot uses (built
    /// on first need).
    pub(crate) dedup: Option<crate::index::ByContent<Location>>,
    /// A commit is being written: if it is still set when the next change begins, that commit
    /// was abandoned by a panic out of the backend, and its bytes may be on the disk.
    pub(crate) in_commit: bool,
    /// gc or an upgrade is copying into segments no superblock lists yet (its own superblock
    /// write is the commit point): a new segment needs no hint.
    pub(crate) bulk: bool,
    /// With `bulk`: the rewrite's superblock reached the disk (its commit point; set by
    /// `publish`). A moved generation does not say so: a failed slot write moves it too.
    pub(crate) bulk_committed: bool,
}

impl std::fmt::Debug for LogWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogWriter")
            .field("since_hint", &self.since_hint)
            .field("need_hint", &self.need_hint)
            .finish()
    }
}

pub(super) fn link_of(sb: &Superblock) -> Option<Link> {
    let (a, b) = (sb.catalog?, sb.catalog_copy?);
    Some(Link {
        a: RecordRef::new(a.loc, a.merkle),
        b: RecordRef::new(b.loc, b.merkle),
    })
}

/// Where a writer appends in the active segment (format 3 and later): right after the last
/// commit's record when it lies there, else at the segment's start (a segment that a commit added
/// and named in a hint holds nothing committed); never past the hint's position. A hint inside a
/// commit syncs none of the commit's bytes before it (`hint_inside_commit`): after a crash or a
/// rollback those may be torn or missing, and appending from the hint's position would leave
/// them between whole records, where the walk of a segment's records (`segment_records`: verify,
/// gc) stops. From here they are overwritten instead. Nothing past here counts: open's scan
/// found no commit after it, and a writer writes a hint naming this position before it appends.
pub(super) fn committed_end(sb: &Superblock) -> u64 {
    let end = match link_of(sb) {
        Some(l) if l.a.segment == sb.active_segment && l.b.segment == sb.active_segment => {
            let end = |r: RecordRef| r.offset + u64::from(r.len);
            end(l.a).max(end(l.b))
        }
        _ => SEG_HEADER,
    };
    end.min(sb.active_len)
}

/// Everything appended durable: the log buffer written out, every segment written since its
/// last sync synced, the directory if a segment was created.
fn sync_appended(io: &dyn Storage, w: &mut Writer) -> Result<(), StoreError> {
    super::commit::flush_buffer(io, w)?;
    for id in &w.touched {
        let name = seg_name(*id);
        io.sync_data(&name)
            .map_err(io_err(io, &name, "sync segment"))?;
    }
    if w.dir_dirty {
        io.sync_dir()
            .map_err(io_err(io, "", "sync store directory"))?;
        w.dir_dirty = false;
    }
    Ok(())
}

pub(super) fn set_link(sb: &mut Superblock, link: Option<Link>) {
    use crate::format::NodePtr;
    sb.catalog = link.map(|l| NodePtr {
        loc: l.a.loc(),
        merkle: l.a.hash,
    });
    sb.catalog_copy = link.map(|l| NodePtr {
        loc: l.b.loc(),
        merkle: l.b.hash,
    });
}

/// Reads a record of `kind` at `loc`, checks its crc32 and the blake3 of its payload (over the
/// sealed bytes, in an encrypted store), and opens it: its plain payload.
pub(super) fn read_checked(
    io: &dyn Storage,
    segments: &[u32],
    loc: &Location,
    hash: &[u8; 32],
    kind: Kind,
    crypt: Option<&super::seal::Crypt>,
) -> Result<Vec<u8>, StoreError> {
    let name = seg_name(loc.segment);
    let buf = super::read_raw_record(io, segments, loc, kind)?;
    let rec = decode_record(&buf, kind)
        .map_err(|e| corrupt(io, &name, kind.name(), loc.offset, e.to_string()))?;
    if blake3::hash(rec.payload).as_bytes() != hash {
        return Err(corrupt(
            io,
            &name,
            kind.name(),
            loc.offset,
            "blake3 differs from the reference to it",
        ));
    }
    super::seal::open_meta(crypt, &buf[..REC_HEADER], rec.payload)
        .map_err(|e| corrupt(io, &name, kind.name(), loc.offset, e))
}

/// Reads a commit record through its link: copy a, or b past damage (noted in `damage`).
pub(super) fn read_commit(
    io: &dyn Storage,
    segments: &[u32],
    link: &Link,
    damage: &mut Vec<String>,
    crypt: Option<&super::seal::Crypt>,
) -> Result<CommitRecord, StoreError> {
    let mut first = None;
    for r in [link.a, link.b] {
        let got =
            read_checked(io, segments, &r.loc(), &r.hash, Kind::Commit, crypt).and_then(|p| {
                CommitRecord::from_bytes(&p)
                    .map_err(|e| corrupt(io, &seg_name(r.segment), "commit record", r.offset, e))
            });
        match got {
            Ok(c) => {
                if let Some(e) = first {
                    damage.push(format!("commit record (first copy): {e}"));
                }
                return Ok(c);
            }
            Err(e) if e.is_corruption() => {
                if first.is_none() {
                    first = Some(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(first.unwrap_or(StoreError::Usage("a link with no copy")))
}

/// Walks the commit chain from `head` back to a checkpoint (or its start): the retained
/// snapshots' manifests, and the head's sequence number.
pub(crate) fn load_catalog(
    io: &dyn Storage,
    sb: &Superblock,
    damage: &mut Vec<String>,
    crypt: Option<&super::seal::Crypt>,
) -> Result<Catalog, StoreError> {
    let mut cat = Catalog::default();
    let Some(head) = link_of(sb) else {
        return Ok(cat);
    };
    let mut deleted = BTreeSet::new();
    let mut link = Some(head);
    let mut first = true;
    let mut walked = 0u64;
    while let Some(l) = link {
        let rec = read_commit(io, &sb.segments, &l, damage, crypt)?;
        if first {
            cat.seq = rec.seq;
            first = false;
        }
        walked += 1;
        if walked > (1 << 24) {
            return Err(corrupt(
                io,
                &seg_name(l.a.segment),
                "commit record",
                l.a.offset,
                "the commit chain does not end",
            ));
        }
        deleted.extend(rec.deleted.iter().copied());
        if let Some(m) = rec.added {
            if !deleted.contains(&m.id) {
                cat.manifests.entry(m.id).or_insert(m);
            }
        }
        if let Some(all) = rec.checkpoint {
            for m in all {
                if !deleted.contains(&m.id) {
                    cat.manifests.entry(m.id).or_insert(m);
                }
            }
            break;
        }
        link = rec.prev;
    }
    cat.since_checkpoint = walked.saturating_sub(1);
    Ok(cat)
}

/// What the scan of the log after the hint found.
#[derive(Debug, Default)]
pub(crate) struct Scanned {
    pub(crate) commits: u64,
    pub(crate) damage: Vec<String>,
    pub(crate) discarded: Option<String>,
}

/// Finds the commits after the superblock's hint and moves `sb` (in memory) to the last one.
pub(crate) fn scan_log(
    io: &dyn Storage,
    sb: &mut Superblock,
    crypt: Option<&super::seal::Crypt>,
) -> Result<Scanned, StoreError> {
    let mut out = Scanned::default();
    let name = seg_name(sb.active_segment);
    let start = sb.active_len;
    // The window up to the file's end. A writer trims the segment to its records when it rolls
    // to a new one or closes: a read that meets the new end reads the window again.
    let mut tries = 0;
    let buf = loop {
        let file_len = io
            .len(&name)
            .map_err(io_err(io, &name, "open active segment"))?;
        if file_len <= start {
            return Ok(out);
        }
        let window = (file_len - start).min(MAX_SCAN);
        let mut buf = vec![0u8; usize::try_from(window).unwrap_or(usize::MAX)];
        match io.read_meta(&name, start, &mut buf) {
            Ok(()) => break buf,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && tries < 3 => tries += 1,
            Err(e) => {
                return Err(StoreError::Read {
                    path: io.location().join(&name),
                    what: "commit log",
                    offset: start,
                    len: u32::try_from(window).unwrap_or(u32::MAX),
                    source: e,
                })
            }
        }
    };
    let mut head = link_of(sb).map(|l| l.a.hash);
    let mut range_start = 0usize;
    let mut i = 0usize;
    // A commit accepted although the bytes under it fail their crc32: it stands only if a later
    // commit stands on it (then it was whole when that one was written, and this is damage since);
    // else it is a torn last commit and is dropped. Holds the state before it.
    let mut unproven: Option<(Superblock, Option<[u8; 32]>, usize, u64)> = None;
    while i + REC_HEADER + REC_TRAILER <= buf.len() {
        // A whole record is stepped over as one (so the bytes of pages inside an extent are never
        // read as records); damaged bytes are searched 8 bytes at a time.
        let Some(len) = whole_record_at(&buf, i) else {
            i += 8;
            continue;
        };
        let Some(rec) = commit_at(&buf, i, len, crypt) else {
            i += len;
            continue;
        };
        if rec.hint_gen != sb.generation || rec.prev.map(|l| l.a.hash) != head {
            i += len;
            continue;
        }
        // The record names where the commit it stands on lies: when that one was placed by a
        // guess (the crc under it matched neither way), its copies, its end and so the start of
        // this commit's crc range are taken from here.
        if let Some(l) = rec.prev.filter(|_| unproven.is_some()) {
            let end = l.b.offset + u64::from(l.b.len);
            if l.a.segment == sb.active_segment && l.b.segment == sb.active_segment && end >= start
            {
                if let Ok(end) = usize::try_from(end - start) {
                    if end <= i {
                        set_link(sb, Some(l));
                        sb.active_len = start + end as u64;
                        range_start = end;
                    }
                }
            }
        }
        let crc_of = |from: usize, to: usize| crc32fast::hash(&buf[from..to]);
        // The first copy at i (its crc covers up to it), or the second with a damaged first copy
        // before it. When the crc matches neither way (damage under the commit too), the bytes
        // decide: the copies are written identical and adjacent, so a damaged first copy differs
        // from this one in a few bytes, and whatever else precedes it in most.
        let second_follows =
            i + 2 * len <= buf.len() && buf[i + len..i + 2 * len] == buf[i..i + len];
        let has_before = i >= range_start + len;
        let (a_at, whole) = if crc_of(range_start, i) == rec.range_crc {
            (i, true)
        } else if has_before && crc_of(range_start, i - len) == rec.range_crc {
            (i - len, true)
        } else if !second_follows
            && has_before
            && differing(&buf[i - len..i], &buf[i..i + len]) < len / 8
        {
            (i - len, false)
        } else {
            (i, false)
        };
        let rec_hash = record_hash(&buf, i);
        // If this one is unproven, the state to go back to; a whole one proves the one before.
        let before = (sb.clone(), head, range_start, out.commits);
        unproven = (!whole).then_some(before);
        let at = |off: usize| start + off as u64;
        let l32 = u32::try_from(len).unwrap_or(u32::MAX);
        let link = Link {
            a: RecordRef::new(
                Location {
                    segment: sb.active_segment,
                    offset: at(a_at),
                    len: l32,
                    slot: 0,
                },
                rec_hash,
            ),
            b: RecordRef::new(
                Location {
                    segment: sb.active_segment,
                    offset: at(a_at + len),
                    len: l32,
                    slot: 0,
                },
                rec_hash,
            ),
        };
        set_link(sb, Some(link));
        sb.next_snapshot = rec.next_snapshot;
        sb.active_len = at(a_at + 2 * len);
        head = Some(rec_hash);
        range_start = a_at + 2 * len;
        i = range_start;
        out.commits += 1;
        if !whole {
            out.damage.push(format!(
                "{}: bytes under commit {} (offset {}) fail their crc32",
                io.location().join(&name).display(),
                rec.seq,
                at(a_at)
            ));
        }
    }
    if let Some((old, _, _, commits)) = unproven {
        // The last commit's bytes are not whole and nothing stands on it: a torn commit (or one
        // damaged since, which the tail of a log cannot tell apart). Not taken, and said so.
        out.damage.pop();
        out.discarded = Some(format!(
            "{}: the last commit after offset {} (snapshot id {} if it added one) was not taken: \
             bytes it wrote fail their crc32 — a commit interrupted before its sync finished, \
             or damage since",
            io.location().join(&name).display(),
            old.active_len,
            old.next_snapshot
        ));
        *sb = old;
        out.commits = commits;
    }
    Ok(out)
}

/// The most bytes open scans after the hint (the hint is rewritten well before).
const MAX_SCAN: u64 = 2 * HINT_BYTES + (64 << 20);

fn payload_len(buf: &[u8], i: usize) -> usize {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[i + 8..i + 12]);
    u32::from_le_bytes(b) as usize
}

fn record_hash(buf: &[u8], i: usize) -> [u8; 32] {
    let mut h = [0u8; 32];
    h.copy_from_slice(&buf[i + 24..i + 56]);
    h
}

/// The length of a whole record (format 3 kind, crc32 good) at `i` of `buf`.
fn whole_record_at(buf: &[u8], i: usize) -> Option<usize> {
    if buf[i..i + 4] != REC_MAGIC {
        return None;
    }
    let kind = [Kind::Commit, Kind::Chunk, Kind::Pages]
        .into_iter()
        .find(|k| *k as u8 == buf[i + 4])?;
    let plen = payload_len(buf, i);
    if u64::try_from(plen).ok()? > MAX_RECORD {
        return None;
    }
    let len = record_len(plen);
    if i + len > buf.len() {
        return None;
    }
    decode_record(&buf[i..i + len], kind).ok()?;
    Some(len)
}

/// The commit record in the whole record of `len` bytes at `i` of `buf`, checked.
fn commit_at(
    buf: &[u8],
    i: usize,
    len: usize,
    crypt: Option<&super::seal::Crypt>,
) -> Option<CommitRecord> {
    let cap = crate::catalog::MAX_COMMIT_RECORD + super::seal::SEAL_OVERHEAD;
    if buf[i + 4] != Kind::Commit as u8 || payload_len(buf, i) > cap {
        return None;
    }
    let rec = decode_record(&buf[i..i + len], Kind::Commit).ok()?;
    if *blake3::hash(rec.payload).as_bytes() != rec.hash {
        return None;
    }
    let plain = super::seal::open_meta(crypt, &buf[i..i + REC_HEADER], rec.payload).ok()?;
    CommitRecord::from_bytes(&plain).ok()
}

/// How many bytes differ between two slices of one length.
fn differing(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x != y).count()
}

pub(crate) fn info3(m: &ManifestV3) -> SnapshotInfo {
    SnapshotInfo {
        id: SnapshotId(m.id),
        parent: m.parent.map(SnapshotId),
        epoch: Epoch(m.epoch),
        time_unix_ms: m.time_unix_ms,
        label: m.label.clone(),
        origin: m.origin.clone(),
        logical_size: m.logical_size,
        page_size: m.page_size,
        page_count: m.page_count,
        merkle_root: m.content_root,
        pages_written: m.pages_written,
        pages_changed: m.pages_changed,
        data_bytes: m.data_bytes,
        meta_bytes: m.meta_bytes,
    }
}

fn cap(mut s: String) -> String {
    if s.len() > MAX_LABEL {
        let mut cut = MAX_LABEL;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// The extent's record header, filled in when it is sealed.
const EXTENT_HEADER: usize = REC_HEADER;

impl Store {
    pub(super) fn is_log(&self) -> bool {
        self.sb.version >= 3
    }

    pub(super) fn log_writer(&mut self) -> Result<&mut Writer, StoreError> {
        let w = self.writer.as_mut().ok_or(StoreError::ReadOnly)?;
        if w.in_doubt {
            return Err(StoreError::InDoubt {
                path: self.io.location().into(),
            });
        }
        Ok(w)
    }

    /// A format 3 manifest.
    pub(super) fn manifest3(&self, id: SnapshotId) -> Result<&ManifestV3, StoreError> {
        if let Some(e) = &self.catalog.unreadable {
            return Err(StoreError::Corrupt {
                path: self.io.location().into(),
                what: "commit log",
                offset: 0,
                detail: e.clone(),
            });
        }
        self.catalog
            .manifests
            .get(&id.0)
            .ok_or(StoreError::UnknownSnapshot(id))
    }

    pub(super) fn segments(&self) -> &[u32] {
        match &self.writer {
            Some(w) => &w.segments,
            None => &self.sb.segments,
        }
    }

    /// Reads and checks one chunk.
    pub(super) fn read_chunk(&self, r: &ChunkRef) -> Result<Chunk, StoreError> {
        let payload = read_checked(
            &*self.io,
            self.segments(),
            &r.loc,
            &r.hash,
            Kind::Chunk,
            self.crypt.as_deref(),
        )?;
        Chunk::decode(&payload).map_err(|e| {
            corrupt(
                &*self.io,
                &seg_name(r.loc.segment),
                "page map chunk",
                r.loc.offset,
                e,
            )
        })
    }

    /// The chain of a page map, newest first, with each chunk's reference.
    pub(super) fn chain(
        &self,
        head: Option<ChunkRef>,
    ) -> Result<Vec<(ChunkRef, Chunk)>, StoreError> {
        let mut out = Vec::new();
        let mut next = head;
        while let Some(r) = next {
            if out.len() >= MAX_CHAIN_CHUNKS {
                return Err(corrupt(
                    &*self.io,
                    &seg_name(r.loc.segment),
                    "page map chunk",
                    r.loc.offset,
                    "the chain does not end",
                ));
            }
            let c = self.read_chunk(&r)?;
            next = c.prev;
            out.push((r, c));
        }
        Ok(out)
    }

    /// Snapshot `id`'s whole page map (cached).
    pub(super) fn page_map(&self, id: SnapshotId) -> Result<Arc<PageMap>, StoreError> {
        if let Some(m) = self
            .maps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id.0)
        {
            return Ok(m);
        }
        let head = self.manifest3(id)?.index.map(|r| r.chunk());
        let chain: Vec<Chunk> = self.chain(head)?.into_iter().map(|(_, c)| c).collect();
        let map = Arc::new(apply_chain(&chain));
        self.maps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(id.0, map.clone());
        Ok(map)
    }

    /// A page whose bytes failed their blake3 in a run read but read back intact alone (the
    /// segment changed between the two reads: another program writing into the store).
    pub(super) fn changed_under_us(&self, r: &Ref) -> StoreError {
        corrupt(
            &*self.io,
            &seg_name(r.loc.segment),
            "page",
            r.loc.offset,
            "content changed between two reads",
        )
    }

    /// Appends the bytes at `r.loc` (any span of a segment) to `out`, unchecked: the caller
    /// checks each page.
    pub(super) fn read_span_into(&self, r: &Ref, out: &mut Vec<u8>) -> Result<(), StoreError> {
        let io = &*self.io;
        let name = seg_name(r.loc.segment);
        if self.segments().binary_search(&r.loc.segment).is_err() || r.loc.offset < SEG_HEADER {
            return Err(corrupt(
                io,
                &name,
                "page",
                r.loc.offset,
                "implausible page location",
            ));
        }
        let start = out.len();
        out.resize(start + r.loc.len as usize, 0);
        let read = io.read(&name, r.loc.offset, &mut out[start..]);
        read.map_err(|e| {
            out.truncate(start);
            if e.kind() == io::ErrorKind::UnexpectedEof {
                corrupt(
                    io,
                    &name,
                    "page",
                    r.loc.offset,
                    "points past the end of the segment",
                )
            } else {
                StoreError::Read {
                    path: io.location().join(&name),
                    what: "page",
                    offset: r.loc.offset,
                    len: r.loc.len,
                    source: e,
                }
            }
        })
    }

    /// A page's bytes from a format 3 extent, checked against its blake3.
    pub(super) fn read_page_bytes(&self, r: &Ref) -> Result<Vec<u8>, StoreError> {
        if r.loc.slot > 0 {
            return self.read_framed_page(r);
        }
        let io = &*self.io;
        let name = seg_name(r.loc.segment);
        if r.loc.len != self.sb.page_size {
            return Err(corrupt(
                io,
                &name,
                "page",
                r.loc.offset,
                "implausible page location",
            ));
        }
        let mut buf = Vec::with_capacity(r.loc.len as usize);
        self.read_span_into(r, &mut buf)?;
        if self.page_id(&buf) != r.hash {
            return Err(corrupt(
                io,
                &name,
                "page",
                r.loc.offset,
                "content does not match its blake3 hash",
            ));
        }
        Ok(buf)
    }

    // ---- writing ----------------------------------------------------------------------------

    /// Writes a superblock hint: the committed state (as the log holds it), at the next
    /// generation, naming the active segment and where the scan starts (the writer's position:
    /// the committed end between commits, somewhere inside one). Segments written so far are
    /// synced first. As in a format 2 commit, slot (generation mod 2) is written and synced
    /// first: if that fails, the other slot (the only copy known good) is left alone and the
    /// writer is in doubt; if only the second fails, the hint stands in one slot and the copy is
    /// retried before the next change.
    pub(super) fn publish_hint(&mut self) -> Result<(), StoreError> {
        self.publish_hint_with(HintSync::Log)
    }

    /// [`Store::publish_hint`], syncing first what `sync` says.
    fn publish_hint_with(&mut self, sync: HintSync) -> Result<(), StoreError> {
        let io = self.io.clone();
        let mut sb = self.sb.clone();
        let w = self.writer.as_mut().ok_or(StoreError::ReadOnly)?;
        match sync {
            HintSync::Log => sync_appended(&*io, w)?,
            HintSync::Named => {
                for id in &w.created {
                    let name = seg_name(*id);
                    io.sync_data(&name)
                        .map_err(io_err(&*io, &name, "sync segment"))?;
                }
                if w.dir_dirty {
                    io.sync_dir()
                        .map_err(io_err(&*io, "", "sync store directory"))?;
                }
            }
        }
        sb.generation += 1;
        sb.active_segment = w.seg;
        sb.active_len = w.off;
        sb.segments = w.segments.clone();
        sb.segments.sort_unstable();
        sb.segment_bytes = self.opts.segment_bytes;
        let bytes = sb.encode();
        let first = (sb.generation % 2) * SLOT_SIZE as u64;
        let write_slot = |at: u64| {
            io.write(SUPERBLOCK_FILE, at, &bytes)
                .map_err(io_err(&*io, SUPERBLOCK_FILE, "write superblock"))
                .and_then(|_| {
                    io.sync(SUPERBLOCK_FILE).map_err(io_err(
                        &*io,
                        SUPERBLOCK_FILE,
                        "sync superblock",
                    ))
                })
        };
        w.in_doubt = true;
        // The first slot's write failing may have torn it: the other slot then holds the only
        // good copy, and is not touched (a crash while overwriting it would leave none). The
        // writer is in doubt until both slots are rewritten, that slot first (`recover_in_doubt`).
        write_slot(first)?;
        let ok = if write_slot(SLOT_SIZE as u64 - first).is_ok() {
            2
        } else {
            1
        };
        w.in_doubt = false;
        w.degraded = ok < 2;
        match sync {
            HintSync::Log => {
                w.touched.clear();
                w.log.unsynced_before_hint = false;
            }
            HintSync::Named => w.log.unsynced_before_hint = true,
        }
        w.created.clear();
        w.dir_dirty = false;
        self.sb = sb;
        Ok(())
    }

    /// At a clean close: the active segment trimmed to its last record, so that the zeros it was
    /// grown by (`grown_cap`) are not read by every later open's scan. Nothing committed lies
    /// past the writer's position, and a crash before the trim reaches the disk leaves either
    /// length (the scan reads zeros past the last record either way). Best effort.
    pub(super) fn trim_active_segment(&mut self) {
        let io = self.io.clone();
        if let Some(w) = self.writer.as_mut() {
            if !w.in_doubt
                && w.pending.is_none()
                && w.cap > w.off
                && io.set_len(&seg_name(w.seg), w.off).is_ok()
            {
                w.cap = w.off;
            }
        }
    }

    /// A hint in the middle of a commit (a new segment, or 128 MiB appended), at the writer's
    /// position; the range crc starts again after it. It syncs only what it names (a new segment
    /// and its directory entry), not the commit's bytes so far: those count only through the
    /// commit's record, which lies past the hint, and `write_commit` syncs every segment the
    /// commit touched before it appends the record (the record's crc does not cover them). A
    /// crash before that leaves the hint naming a position in bytes that may be torn or missing
    /// (even past the file's durable end): open's scan finds no record there, as for any
    /// unfinished commit, and a writer appends from the last commit's end (`committed_end`). So
    /// the writer thread keeps writing through the hint (no drain, no segment sync: both cost
    /// 15–30 ms a hint on a busy machine), and a commit of any size pays one sync more than it
    /// did, not one per hint. If it fails, the hint stays owed, so the commit record is not
    /// written before one (`write_commit`).
    fn hint_inside_commit(&mut self) -> Result<(), StoreError> {
        self.write_hint_with(HintSync::Named).inspect_err(|_| {
            if let Some(w) = self.writer.as_mut() {
                w.log.need_hint = true;
            }
        })
    }

    /// Writes the superblock hint now (the committed state, generation + 1).
    pub(super) fn write_hint(&mut self) -> Result<(), StoreError> {
        self.write_hint_with(HintSync::Log)
    }

    fn write_hint_with(&mut self, sync: HintSync) -> Result<(), StoreError> {
        self.publish_hint_with(sync)?;
        if let Some(w) = self.writer.as_mut() {
            w.log.since_hint = 0;
            w.log.bytes_since_hint = 0;
            w.log.need_hint = false;
            w.log.range_crc = crc32fast::Hasher::new();
        }
        Ok(())
    }

    /// Before a change: a hint if one is owed (a failed commit, a failed hint) or if a commit
    /// was abandoned by a panic.
    fn hint_if_owed(&mut self) -> Result<(), StoreError> {
        if self
            .writer
            .as_ref()
            .is_some_and(|w| w.log.need_hint || w.log.in_commit)
        {
            self.write_hint()?;
            if let Some(w) = self.writer.as_mut() {
                w.log.in_commit = false;
            }
        }
        Ok(())
    }

    pub(super) fn begin3(&mut self, parent: Option<SnapshotId>) -> Result<(), StoreError> {
        self.hint_if_owed()?;
        let map = match parent {
            Some(p) => Some(self.page_map(p)?),
            None => None,
        };
        let w = self.log_writer()?;
        w.pending = Some(Pending {
            parent,
            base_root: None,
            base_count: 0,
            changes: Default::default(),
            fresh: Default::default(),
            pages_written: 0,
            changed: 0,
            map,
            start: (w.seg, w.off),
        });
        w.data_appended = 0;
        w.meta_appended = 0;
        Ok(())
    }

    /// Every page a retained snapshot uses, by content: built once, learns each page a commit
    /// appends as it is appended, and is dropped by a rollback (its pages are gone).
    fn ensure_dedup(&mut self) -> Result<(), StoreError> {
        if self.writer.as_ref().is_some_and(|w| w.log.dedup.is_some()) {
            return Ok(());
        }
        let mut dedup = crate::index::ByContent::default();
        let mut seen: BTreeSet<Location> = BTreeSet::new();
        let heads: Vec<Option<ChunkRef>> = self
            .catalog
            .manifests
            .values()
            .map(|m| m.index.map(|r| r.chunk()))
            .collect();
        for head in heads {
            let mut next = head;
            while let Some(r) = next {
                if !seen.insert(r.loc) {
                    break; // the rest of this chain was read with another snapshot
                }
                // A damaged chunk only means its pages are not offered for reuse (dedup is an
                // optimisation; `verify` reports the damage): new content is then written again.
                let c = match self.read_chunk(&r) {
                    Ok(c) => c,
                    Err(e) if e.is_corruption() => break,
                    Err(e) => return Err(e),
                };
                for (_, e) in &c.entries {
                    if let Some(e) = e {
                        dedup.entry(e.hash).or_insert(e.loc);
                    }
                }
                next = c.prev;
            }
        }
        if let Some(w) = self.writer.as_mut() {
            w.log.dedup = Some(dedup);
        }
        Ok(())
    }

    /// `claimed`: `hash` is an id the caller gave, not computed here (an encrypted store's
    /// `put_hashed`): it is checked against the page before it is used, here for a page that
    /// dedups against one written by this commit, in a compression thread for a new page.
    pub(super) fn put3(
        &mut self,
        vpn: Vpn,
        data: &[u8],
        hash: [u8; 32],
        claimed: bool,
    ) -> Result<(), StoreError> {
        self.ensure_dedup()?;
        let w = self.log_writer()?;
        let start = w
            .pending
            .as_ref()
            .ok_or(StoreError::Usage("put without begin"))?
            .start;
        let known = w.log.dedup.as_ref().and_then(|d| d.get(&hash)).copied();
        let reuse = match known {
            // Written by this commit (the dedup map learns a page when it is appended; a
            // rollback drops the map): the same bytes, not yet readable from the file.
            Some(loc) if (loc.segment, loc.offset) >= start => {
                if claimed && self.page_id(data) != hash {
                    return Err(super::frames::wrong_page_id());
                }
                Some(Ref { hash, loc })
            }
            // Reuse stored content only after reading it back intact: a damaged page must not
            // be linked into a new snapshot (a fresh copy is written instead). Bytes equal to
            // a page read back and checked against `hash` prove a claimed id too.
            Some(loc) => {
                let r = Ref { hash, loc };
                match self.read_page_bytes(&r) {
                    Ok(b) if b == data => Some(r),
                    Ok(_) => None,
                    Err(e) if e.is_corruption() => None,
                    Err(e) => return Err(e),
                }
            }
            None => None,
        };
        let r = match reuse {
            Some(r) => r,
            None => {
                let loc = if self.compressing() {
                    let loc = self.frame_page(data, hash, claimed)?;
                    // The frame may be appended already (by the pump inside `frame_page`): then
                    // the dedup map must learn its real place, not the placeholder.
                    self.log_writer()?.frames.resolve(loc).unwrap_or(loc)
                } else {
                    self.append_page(data)?
                };
                let w = self.log_writer()?;
                if let Some(d) = w.log.dedup.as_mut() {
                    // Replaces a damaged copy's entry, if there was one.
                    d.insert(hash, loc);
                }
                let p = w
                    .pending
                    .as_mut()
                    .ok_or(StoreError::Usage("put without begin"))?;
                p.pages_written += 1;
                Ref { hash, loc }
            }
        };
        let w = self.log_writer()?;
        let p = w
            .pending
            .as_mut()
            .ok_or(StoreError::Usage("put without begin"))?;
        p.changes.insert(vpn.0, Some(r));
        Ok(())
    }

    /// Room for `len` bytes in the active segment: a new segment (and a hint naming it) if the
    /// active one is full, the file grown if it is too short.
    pub(super) fn reserve3(&mut self, len: u64) -> Result<(), StoreError> {
        self.reserve3_in(len, true)
    }

    /// [`Store::reserve3`]; with `roll` false, in the active segment whatever its size (the
    /// second copy of a commit record goes right after the first).
    fn reserve3_in(&mut self, len: u64, roll: bool) -> Result<(), StoreError> {
        let io = self.io.clone();
        let opts = self.opts;
        let may_roll = roll;
        let roll = roll && {
            let w = self.log_writer()?;
            w.off + len > opts.segment_bytes && w.off > SEG_HEADER
        };
        // A commit that appended COMMIT_HINT_BYTES since the hint writes one at its position (as
        // a roll does): open scans at most MAX_SCAN after the hint, so a record further on would
        // be lost whenever the hint after the commit fails.
        let hint_due = may_roll && !roll && {
            let w = self.log_writer()?;
            !w.log.bulk && w.log.bytes_since_hint >= COMMIT_HINT_BYTES
        };
        if hint_due {
            self.seal_extent()?;
            self.hint_inside_commit()?;
        }
        if roll {
            self.seal_extent()?;
            let version = self.sb.version;
            let w = self.log_writer()?;
            super::commit::flush_buffer(&*io, w)?;
            let name = seg_name(w.seg);
            io.set_len(&name, w.off)
                .map_err(io_err(&*io, &name, "trim segment"))?;
            w.touched.insert(w.seg);
            new_segment(&*io, &opts, w, version)?;
            if !w.log.bulk {
                // The scan after a crash must know the new segment: a hint names it (the
                // committed state is unchanged; the bytes of this commit so far are synced by it).
                // If it cannot be written, the commit must not go on as if it had been (its
                // record would sit in a segment no hint names, its crc over the old segment's
                // bytes too): `write_commit` writes the hint first.
                self.hint_inside_commit()?;
            }
        }
        let w = self.log_writer()?;
        if w.off + len > w.cap {
            let name = seg_name(w.seg);
            let cap =
                super::commit::grown_cap(w.cap, w.off + len, opts.preallocate, opts.segment_bytes);
            io.set_len(&name, cap)
                .map_err(io_err(&*io, &name, "grow segment"))?;
            w.cap = cap;
        }
        Ok(())
    }

    /// Appends a whole record (not a page) and returns where it is.
    pub(super) fn append3(
        &mut self,
        kind: Kind,
        key: u64,
        hash: &[u8; 32],
        payload: &[u8],
    ) -> Result<Location, StoreError> {
        self.append3_in(kind, key, hash, payload, true)
    }

    /// [`Store::append3`]; with `roll` false, in the active segment whatever its size.
    pub(super) fn append3_in(
        &mut self,
        kind: Kind,
        key: u64,
        hash: &[u8; 32],
        payload: &[u8],
        roll: bool,
    ) -> Result<Location, StoreError> {
        self.seal_extent()?;
        let mut rec = encode_record(kind, key, hash, payload);
        if self.crypt.is_some() {
            // Sealed by the caller (`seal_meta`): header byte 6 says so, under the crc32.
            rec[6] = super::seal::SEALED;
            let end = REC_HEADER + payload.len();
            let crc = crc32fast::hash(&rec[..end]);
            rec[end..end + REC_TRAILER].copy_from_slice(&crc.to_le_bytes());
        }
        self.reserve3_in(rec.len() as u64, roll)?;
        let io = self.io.clone();
        let w = self.log_writer()?;
        let loc = Location {
            segment: w.seg,
            offset: w.off,
            len: u32::try_from(rec.len()).unwrap_or(u32::MAX),
            slot: 0,
        };
        w.log.range_crc.update(&rec);
        w.buf.extend_from_slice(&rec);
        w.off += rec.len() as u64;
        w.log.bytes_since_hint += rec.len() as u64;
        w.meta_appended += rec.len() as u64;
        w.touched.insert(w.seg);
        if w.buf.len() >= WRITE_BUFFER {
            super::commit::flush_blocks(&*io, w)?;
        }
        Ok(loc)
    }

    /// Pages an extent holds at most: a write buffer's worth, and no more than fit a segment.
    fn extent_pages(&self) -> u32 {
        let page = u64::from(self.sb.page_size);
        let room = self.opts.segment_bytes.saturating_sub(SEG_HEADER + 64) / page;
        let n = (WRITE_BUFFER as u64 / page).min(room).max(1);
        u32::try_from(n).unwrap_or(1)
    }

    /// Appends one page to the open extent (opening one if needed); its place.
    pub(super) fn append_page(&mut self, data: &[u8]) -> Result<Location, StoreError> {
        if self.crypt.is_some() {
            // Every page of an encrypted store is in a sealed frame.
            return Err(StoreError::Usage(
                "a page in clear in an encrypted store (a bug: please report it)",
            ));
        }
        let page = data.len() as u64;
        let limit = self.extent_pages();
        let segment_bytes = self.opts.segment_bytes;
        // The extent's end after this page (its crc and padding included), if one is open.
        let grown = self.writer.as_ref().and_then(|w| {
            w.log
                .extent
                .map(|(at, n)| (n, w.off + (w.buf.len() - at) as u64 + page + 8))
        });
        if let Some((n, end)) = grown {
            if n >= limit || (end > segment_bytes && n > 0) {
                self.seal_extent()?;
            }
        }
        if self.writer.as_ref().is_some_and(|w| w.log.extent.is_none()) {
            self.reserve3(record_len(page as usize) as u64)?;
            let w = self.log_writer()?;
            let at = w.buf.len();
            w.buf.resize(at + EXTENT_HEADER, 0);
            w.log.extent = Some((at, 0));
        }
        let io = self.io.clone();
        let preallocate = self.opts.preallocate;
        let w = self.log_writer()?;
        let Some((at, n)) = w.log.extent else {
            return Err(StoreError::Usage("no extent"));
        };
        let end = w.off + (w.buf.len() - at) as u64 + page + 8;
        if end > w.cap {
            let name = seg_name(w.seg);
            let cap = super::commit::grown_cap(w.cap, end, preallocate, segment_bytes);
            io.set_len(&name, cap)
                .map_err(io_err(&*io, &name, "grow segment"))?;
            w.cap = cap;
        }
        // Until the extent is sealed, `w.off` is where its record starts (byte `at` of `buf`).
        let loc = Location {
            segment: w.seg,
            offset: w.off + (w.buf.len() - at) as u64,
            len: u32::try_from(page).unwrap_or(u32::MAX),
            slot: 0,
        };
        w.buf.extend_from_slice(data);
        w.log.extent = Some((at, n + 1));
        w.data_appended += page;
        Ok(loc)
    }

    /// Closes the open extent: fills in its header, appends its crc32 and padding.
    pub(super) fn seal_extent(&mut self) -> Result<(), StoreError> {
        let Some(w) = self.writer.as_mut() else {
            return Ok(());
        };
        let Some((at, n)) = w.log.extent.take() else {
            return Ok(());
        };
        let plen = w.buf.len() - at - EXTENT_HEADER;
        let mut head = Vec::with_capacity(EXTENT_HEADER);
        head.extend_from_slice(&REC_MAGIC);
        head.push(Kind::Pages as u8);
        head.extend_from_slice(&[0; 3]);
        head.extend_from_slice(&u32::try_from(plen).unwrap_or(u32::MAX).to_le_bytes());
        head.extend_from_slice(&0u32.to_le_bytes());
        head.extend_from_slice(&u64::from(n).to_le_bytes());
        head.extend_from_slice(&[0; 32]);
        w.buf[at..at + EXTENT_HEADER].copy_from_slice(&head);
        // One pass over the pages: the extent's crc32, folded into the commit's range crc32.
        let mut crc = crc32fast::Hasher::new();
        crc.update(&w.buf[at..]);
        w.log.range_crc.combine(&crc);
        let body = w.buf.len();
        w.buf.extend_from_slice(&crc.finalize().to_le_bytes());
        let total = record_len(plen);
        w.buf.resize(at + total, 0);
        w.log.range_crc.update(&w.buf[body..]);
        w.off += total as u64;
        w.log.bytes_since_hint += total as u64;
        w.meta_appended += (total - plen) as u64;
        w.touched.insert(w.seg);
        if w.buf.len() >= WRITE_BUFFER {
            let io = self.io.clone();
            let w = self.log_writer()?;
            super::commit::flush_blocks(&*io, w)?;
        }
        Ok(())
    }

    /// Writes `entries` (ascending) as chunks after `prev`; the newest chunk.
    pub(super) fn write_chunks(
        &mut self,
        base: bool,
        mut prev: Option<ChunkRef>,
        entries: &[(u64, Option<Ref>)],
    ) -> Result<Option<ChunkRef>, StoreError> {
        for part in entries.chunks(MAX_CHUNK_ENTRIES) {
            let plain = Chunk::encode_parts(base, prev.as_ref(), part);
            let bytes = self.seal_meta(Kind::Chunk, part.len() as u64, plain)?;
            let hash = *blake3::hash(&bytes).as_bytes();
            let loc = self.append3(Kind::Chunk, part.len() as u64, &hash, &bytes)?;
            prev = Some(ChunkRef { loc, hash });
        }
        Ok(prev)
    }

    /// Appends the commit record (twice), syncs, and moves the committed state to it.
    fn write_commit(&mut self, mut rec: CommitRecord) -> Result<Link, StoreError> {
        self.log_writer()?.log.in_commit = true;
        rec.hint_gen = self.sb.generation;
        rec.seq = self.catalog.seq + 1;
        rec.prev = link_of(&self.sb);
        self.seal_extent()?;
        // A hint owed mid-commit (a segment roll whose hint failed in a `put`): written now, at
        // the writer's position, as the roll would have (it syncs the bytes so far, names the
        // segment, and the record's crc covers only what follows it).
        if self.writer.as_ref().is_some_and(|w| w.log.need_hint) {
            self.write_hint()?;
        }
        // The record's length does not depend on the integers in it (rkyv lays them out fixed),
        // so it is known before they are filled in.
        let sealing = self.crypt.as_ref().map_or(0, |c| c.overhead());
        let len = record_len(rec.to_bytes().len() + sealing) as u64;
        // Both copies in one segment, back to back (a segment change here writes a hint, so
        // the generation and the crc are read after it).
        self.reserve3(2 * len)?;
        self.sync_before_record()?;
        rec.hint_gen = self.sb.generation;
        let w = self.log_writer()?;
        rec.range_crc = w.log.range_crc.clone().finalize();
        // meta_bytes counts both copies of the record itself.
        let (data, meta) = (w.data_appended, w.meta_appended + 2 * len);
        if let Some(m) = rec.added.as_mut() {
            m.meta_bytes = meta;
            m.data_bytes = data;
        }
        let bytes = self.seal_meta(Kind::Commit, rec.seq, rec.to_bytes())?;
        let hash = *blake3::hash(&bytes).as_bytes();
        let a = self.append3_in(Kind::Commit, rec.seq, &hash, &bytes, false)?;
        let b = self.append3_in(Kind::Commit, rec.seq, &hash, &bytes, false)?;
        let io = self.io.clone();
        let w = self.log_writer()?;
        // One sync: the segment (normally one file; more if this commit filled a segment).
        sync_appended(&*io, w)?;
        w.touched.clear();
        w.created.clear();
        w.log.unsynced_before_hint = false;
        w.log.range_crc = crc32fast::Hasher::new();
        w.log.since_hint += 1;
        w.log.in_commit = false;
        let link = Link {
            a: RecordRef::new(a, hash),
            b: RecordRef::new(b, hash),
        };
        let (seg, off) = (w.seg, w.off);
        set_link(&mut self.sb, Some(link));
        self.sb.active_segment = seg;
        self.sb.active_len = off;
        self.sb.next_snapshot = rec.next_snapshot;
        self.catalog.seq = rec.seq;
        self.catalog.since_checkpoint = if rec.checkpoint.is_some() {
            0
        } else {
            self.catalog.since_checkpoint + 1
        };
        for id in &rec.deleted {
            self.catalog.manifests.remove(id);
        }
        if let Some(m) = rec.added {
            self.catalog.manifests.insert(m.id, m);
        }
        Ok(link)
    }

    /// After a hint inside this commit that synced none of its bytes before it: every segment
    /// the commit touched synced now, before its record is appended, so that a record found
    /// after a crash has everything before its hint under it (its range crc covers only what
    /// follows the hint). The record's own sync then covers the record.
    fn sync_before_record(&mut self) -> Result<(), StoreError> {
        let io = self.io.clone();
        let w = self.log_writer()?;
        if !w.log.unsynced_before_hint {
            return Ok(());
        }
        sync_appended(&*io, w)?;
        let active = w.seg;
        w.touched.retain(|id| *id == active);
        w.log.unsynced_before_hint = false;
        Ok(())
    }

    fn checkpoint_due(&self) -> bool {
        self.catalog.since_checkpoint + 1
            >= CHECKPOINT_EVERY.max(self.catalog.manifests.len() as u64)
    }

    /// After a commit: the hint, when due. The commit stands whatever happens here.
    fn after_commit(&mut self) {
        let due = self.writer.as_ref().is_some_and(|w| {
            w.log.since_hint >= HINT_EVERY || w.log.bytes_since_hint >= HINT_BYTES
        });
        if due && self.write_hint().is_err() {
            if let Some(w) = self.writer.as_mut() {
                w.log.need_hint = true;
            }
        }
    }

    /// After a failed commit (whose bytes may be on the disk, its record too): back to the
    /// committed state, then a hint at a new generation so that nothing it wrote can ever count.
    /// If the hint cannot be written, the writer is in doubt (see `recover_in_doubt`).
    pub(super) fn abandon3(&mut self) {
        self.rollback();
        if let Some(w) = self.writer.as_mut() {
            // The dedup map learned this commit's pages as they were appended: rebuilt from the
            // committed page maps when next needed.
            w.log = LogWriter::default();
            w.log.need_hint = true;
        }
        if self.writer.as_ref().is_some_and(|w| !w.in_doubt) && self.write_hint().is_err() {
            if let Some(w) = self.writer.as_mut() {
                w.in_doubt = true;
            }
        }
    }

    pub(super) fn commit3(&mut self, meta: SnapshotMeta) -> Result<CommitReport, StoreError> {
        let result = self.commit3_inner(meta);
        match result {
            Ok((report, map)) => {
                if let Some(w) = self.writer.as_mut() {
                    w.frames.reset();
                }
                // Only now, with the commit durable: the cache learns its map.
                self.maps
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .put(report.id.0, map);
                self.after_commit();
                Ok(report)
            }
            Err(e) => {
                self.abandon3();
                Err(e)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn commit3_inner(
        &mut self,
        meta: SnapshotMeta,
    ) -> Result<(CommitReport, Arc<PageMap>), StoreError> {
        let page_size = self.sb.page_size;
        // Every page of the commit in its place: frames in flight appended, placeholders resolved.
        self.drain_frames()?;
        let w = self.log_writer()?;
        let mut pending = w
            .pending
            .take()
            .ok_or(StoreError::Usage("commit without begin"))?;
        let changes = pending.changes.sorted();
        Store::resolve_refs(w, changes.iter_mut().filter_map(|(_, r)| r.as_mut()))?;
        let parent_m = match pending.parent {
            Some(p) => Some(self.manifest3(p)?.clone()),
            None => None,
        };
        let empty = Arc::new(PageMap::new());
        let parent_map = pending.map.clone().unwrap_or(empty);
        // Changes that leave a page as it was are dropped.
        let mut delta = pending.changes.into_sorted();
        let mut root =
            ContentRoot::from_bytes(&parent_m.as_ref().map(|m| m.content_root).unwrap_or([0; 32]));
        let mut count = parent_m.as_ref().map_or(0, |m| m.page_count);
        // On an empty parent the root's terms are the delta's pages (`ContentRoot::add_delta`),
        // and the new map is the delta.
        let parent_was_empty = parent_map.is_empty();
        let mut terms = Vec::with_capacity(if parent_was_empty { 0 } else { delta.len() });
        delta.retain(|(k, v)| {
            let old = parent_map.get(k);
            if old.map(|r| r.hash) == v.map(|r| r.hash) {
                return false;
            }
            if old.is_some() {
                count -= 1;
            }
            if v.is_some() {
                count += 1;
            }
            if !parent_was_empty {
                terms.push((*k, old.map(|r| r.hash), v.map(|r| r.hash)));
            }
            true
        });
        root.change_all(&terms);
        drop(terms);
        // The new map: the parent's, changed in place when nobody else holds it.
        drop(pending.map);
        let mut map = match pending.parent {
            Some(p) => self
                .maps
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(p.0)
                .unwrap_or(parent_map),
            None => parent_map,
        };
        let map_mut = Arc::make_mut(&mut map);
        let (mut base_entries, mut chain_entries, mut chain_deltas, parent_head) = match &parent_m {
            Some(m) => (
                m.base_entries,
                m.chain_entries,
                m.chain_deltas,
                m.index.map(|r| r.chunk()),
            ),
            None => (0, 0, 0, None),
        };
        // If writing fails below, the map must go back to the parent's: the entries the delta
        // changes, as the parent had them (`None`: absent); nothing to keep for an empty parent.
        let undo: Vec<(u64, Option<Ref>)> = if parent_was_empty {
            Vec::new()
        } else {
            delta
                .iter()
                .map(|(k, _)| (*k, map_mut.get(k).copied()))
                .collect()
        };
        // A new base once the deltas since the last one would hold more entries than it.
        let rebase = !delta.is_empty()
            && (parent_head.is_none()
                || chain_entries + delta.len() as u64 > base_entries
                || chain_deltas >= MAX_CHAIN_DELTAS);
        // On an empty parent the base's chunks are the delta itself (it holds no removals: a
        // change that leaves a page as it was is dropped above): a large first snapshot writes
        // them while another thread sums the content root and builds the map from the delta (at
        // 64 Ki pages about 6 and 9 ms, beside 8 ms of chunks). Not on a larger parent: the
        // merge's scratch and the delta's chunks would then be live at once (measured on
        // `review20_merge_memory`'s commit of N/4 changes on N pages: a peak of 0.96 page maps
        // instead of 0.76, next to its bound of one).
        let mut early: Option<Result<Option<ChunkRef>, StoreError>> = None;
        let mut mapped = false;
        if delta.len() >= PARALLEL_COMMIT && parent_was_empty {
            let prev = if rebase { None } else { parent_head };
            std::thread::scope(|s| {
                let side = std::thread::Builder::new()
                    .name("pagesnap-map".into())
                    .spawn_scoped(s, || {
                        root.add_delta(&delta);
                        crate::index::apply_delta(map_mut, &delta);
                    });
                if let Ok(side) = side {
                    early = Some(self.write_chunks(rebase, prev, &delta));
                    // A panic there is a bug: raised again here (the store settles the commit
                    // as one abandoned by a panic).
                    side.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
                    mapped = true;
                }
            });
        }
        if !mapped {
            if parent_was_empty {
                root.add_delta(&delta);
            }
            crate::index::apply_delta(map_mut, &delta);
        }
        let result = (|| {
            let head = if !rebase {
                if !delta.is_empty() {
                    chain_entries += delta.len() as u64;
                    chain_deltas += 1;
                }
                match early {
                    Some(written) => written?,
                    None if delta.is_empty() => parent_head,
                    None => self.write_chunks(false, parent_head, &delta)?,
                }
            } else {
                base_entries = map_mut.len() as u64;
                chain_entries = 0;
                chain_deltas = 0;
                match early {
                    Some(written) => written?,
                    None if parent_was_empty => self.write_chunks(true, None, &delta)?,
                    None => {
                        let all: Vec<(u64, Option<Ref>)> =
                            map_mut.iter().map(|(k, r)| (*k, Some(*r))).collect();
                        self.write_chunks(true, None, &all)?
                    }
                }
            };
            let id = self.sb.next_snapshot;
            let manifest = ManifestV3 {
                id,
                parent: pending.parent.map(|p| p.0),
                epoch: meta.epoch.0,
                time_unix_ms: meta.time_unix_ms.unwrap_or_else(now_ms),
                label: meta.label.clone().map(cap),
                origin: meta.origin.clone().map(cap),
                logical_size: meta.logical_size,
                page_size,
                page_count: count,
                content_root: root.to_bytes(),
                index: head.map(|h| RecordRef::new(h.loc, h.hash)),
                base_entries,
                chain_entries,
                chain_deltas,
                pages_written: pending.pages_written,
                pages_changed: delta.len() as u64,
                data_bytes: 0,
                meta_bytes: 0,
            };
            let checkpoint = self.checkpoint_due().then(|| {
                let mut all: Vec<ManifestV3> = self.catalog.manifests.values().cloned().collect();
                all.push(manifest.clone());
                all
            });
            let rec = CommitRecord {
                hint_gen: 0,
                seq: 0,
                range_crc: 0,
                prev: None,
                next_snapshot: id + 1,
                added: Some(manifest),
                deleted: Vec::new(),
                checkpoint,
            };
            self.write_commit(rec)?;
            let m = self.manifest3(SnapshotId(id))?;
            Ok(CommitReport {
                id: SnapshotId(id),
                pages_written: m.pages_written,
                pages_changed: m.pages_changed,
                page_count: m.page_count,
                data_bytes: m.data_bytes,
                meta_bytes: m.meta_bytes,
                merkle_root: m.content_root,
            })
        })();
        match result {
            Ok(report) => Ok((report, map)),
            Err(e) => {
                // The parent's map, as it was, back into the cache.
                let m = Arc::make_mut(&mut map);
                if parent_was_empty {
                    m.clear();
                } else {
                    crate::index::apply_delta(m, &undo);
                }
                if let Some(p) = pending.parent {
                    self.maps
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .put(p.0, map);
                }
                Err(e)
            }
        }
    }

    pub(super) fn delete3(&mut self, ids: &[SnapshotId]) -> Result<(), StoreError> {
        self.hint_if_owed()?;
        let mut deleted: Vec<u64> = ids.iter().map(|i| i.0).collect();
        deleted.sort_unstable();
        deleted.dedup();
        let checkpoint = self.checkpoint_due().then(|| {
            self.catalog
                .manifests
                .values()
                .filter(|m| deleted.binary_search(&m.id).is_err())
                .cloned()
                .collect()
        });
        let rec = CommitRecord {
            hint_gen: 0,
            seq: 0,
            range_crc: 0,
            prev: None,
            next_snapshot: self.sb.next_snapshot,
            added: None,
            deleted,
            checkpoint,
        };
        let w = self.log_writer()?;
        w.data_appended = 0;
        w.meta_appended = 0;
        match self.write_commit(rec) {
            Ok(_) => {
                let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
                for id in ids {
                    maps.take(id.0);
                }
                drop(maps);
                self.after_commit();
                Ok(())
            }
            Err(e) => {
                self.abandon3();
                Err(e)
            }
        }
    }
}
