//! Byte layouts of everything on disk (see `docs/format.md`). All integers are little-endian and
//! fixed-width; nothing is `usize` on disk. Decoders check magic, lengths and the crc32 before they
//! interpret anything, and never allocate by a length they have not bounded.

/// The format version this code creates (and the newest it reads). Versions 1 and 2 (a
/// copy-on-write trie index, a superblock write per commit) and 3 (the commit log without
/// compression) still open, read and take commits in their own format; `Store::upgrade`
/// converts them.
pub const FORMAT_VERSION: u32 = 4;
/// The first format with compressed page frames and a compression setting in the superblock.
pub(crate) const FRAME_FORMAT: u32 = 4;
/// The last format with a trie index (versions 1 and 2 are written as 2).
pub(crate) const TRIE_FORMAT: u32 = 2;
pub(crate) const SUPERBLOCK_FILE: &str = "superblock";
pub(crate) const LOCK_FILE: &str = "lock";
pub(crate) const SLOT_SIZE: usize = 4096;
pub(crate) const SB_MAGIC: [u8; 8] = *b"PGSNAPSB";
pub(crate) const SEG_MAGIC: [u8; 8] = *b"PGSNAPSG";
/// Bytes of a segment file before its first record.
pub(crate) const SEG_HEADER: u64 = 64;
pub(crate) const REC_MAGIC: [u8; 4] = *b"PREC";
/// Record header: magic 4, kind 1, reserved 3, payload length 4, reserved 4, key 8, hash 32.
pub(crate) const REC_HEADER: usize = 56;
/// crc32 after the payload.
pub(crate) const REC_TRAILER: usize = 4;
/// No record is larger than this (a 16 MiB page plus its header).
pub(crate) const MAX_RECORD: u64 = (16 << 20) + 64;
/// At most this many segment ids fit in a version 1 superblock slot.
const MAX_SEGMENTS_V1: usize = 900;
/// At most this many runs of consecutive segment ids fit in a version 2 superblock slot. The
/// writer numbers segments upwards and gc replaces all of them at once, so the live ids are one
/// run in practice: the number of segments (and the store's size) is not bounded by the slot.
pub(crate) const MAX_SEGMENT_RUNS: usize = 480;
/// At most this many live segments (4 Mi: a PiB at the default 256 MiB per segment); bounds what a
/// decoder allocates.
pub(crate) const MAX_SEGMENT_IDS: usize = 1 << 22;

/// Record kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    Page = 1,
    Node = 2,
    /// A format 1 manifest (read only; see `manifest::ManifestV1`).
    Manifest = 3,
    /// A manifest with an origin (format 2 writes these).
    Manifest2 = 4,
    /// Format 3: a commit record (catalog change, chained; see `catalog.rs`).
    Commit = 5,
    /// Format 3: a chunk of a page map (base or delta; see `index.rs`).
    Chunk = 6,
    /// Format 3: pages back to back (an extent); index entries point at the bytes inside.
    Pages = 7,
    /// Format 4: up to 16 pages compressed together (a frame); index entries name the frame
    /// and the page's slot in it.
    Frame = 8,
}

impl Kind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Page => "page record",
            Kind::Node => "index node",
            Kind::Manifest | Kind::Manifest2 => "snapshot manifest",
            Kind::Commit => "commit record",
            Kind::Chunk => "page map chunk",
            Kind::Pages => "page extent",
            Kind::Frame => "page frame",
        }
    }
}

pub(crate) fn seg_name(id: u32) -> String {
    format!("seg-{id:08}.pss")
}

pub(crate) fn parse_seg_name(name: &str) -> Option<u32> {
    name.strip_prefix("seg-")?
        .strip_suffix(".pss")?
        .parse()
        .ok()
}

/// Where a record lives: segment, byte offset, total length (header, payload and crc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Location {
    /// Segment file id.
    pub segment: u32,
    /// Byte offset of the record in the segment file.
    pub offset: u64,
    /// Record length in bytes.
    pub len: u32,
    /// 0: the bytes at `offset` (a record, or a page inside an extent). `k > 0`: page `k - 1`
    /// of the page frame record at `offset` (format 4). On disk it is the top 16 bits of the
    /// offset (offsets stay below 2^48).
    pub slot: u16,
}

/// Offsets on disk keep their top 16 bits for [`Location::slot`].
pub(crate) const OFFSET_BITS: u32 = 48;

/// A content hash and where the record with that content lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ref {
    /// blake3 of the record's payload (pages, manifests).
    pub hash: [u8; 32],
    /// The record.
    pub loc: Location,
}

/// A pointer to an index node: where it is, and its Merkle hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodePtr {
    /// The node record.
    pub loc: Location,
    /// Merkle hash of the subtree (independent of where records live).
    pub merkle: [u8; 32],
}

pub(crate) const LOCATION_BYTES: usize = 16;
pub(crate) const REF_BYTES: usize = 32 + LOCATION_BYTES;
pub(crate) const NODEPTR_BYTES: usize = LOCATION_BYTES + 32;

/// Little-endian writer.
#[derive(Default)]
pub(crate) struct Enc(pub(crate) Vec<u8>);

impl Enc {
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
    pub(crate) fn loc(&mut self, l: &Location) {
        self.u32(l.segment);
        self.u32(l.len);
        // Offsets are bounded by the segment size (checked at open), far below 2^48.
        debug_assert!(l.offset >> OFFSET_BITS == 0);
        self.u64(l.offset | (u64::from(l.slot) << OFFSET_BITS));
    }
    pub(crate) fn reference(&mut self, r: &Ref) {
        self.bytes(&r.hash);
        self.loc(&r.loc);
    }
    /// An optional trie root: present u8, then the pointer (zero when absent).
    pub(crate) fn root(&mut self, root: &Option<NodePtr>) {
        match root {
            Some(p) => {
                self.u8(1);
                self.node_ptr(p);
            }
            None => {
                self.u8(0);
                self.bytes(&[0; NODEPTR_BYTES]);
            }
        }
    }
    pub(crate) fn node_ptr(&mut self, p: &NodePtr) {
        self.loc(&p.loc);
        self.bytes(&p.merkle);
    }
}

/// Little-endian reader over bytes already bounded and checksummed.
pub(crate) struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// Not enough bytes: the caller names what it was decoding.
#[derive(Debug)]
pub(crate) struct Short;

impl<'a> Dec<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Dec { buf, pos: 0 }
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], Short> {
        let end = self.pos.checked_add(n).ok_or(Short)?;
        let s = self.buf.get(self.pos..end).ok_or(Short)?;
        self.pos = end;
        Ok(s)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, Short> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u32(&mut self) -> Result<u32, Short> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, Short> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }
    pub(crate) fn hash(&mut self) -> Result<[u8; 32], Short> {
        let mut h = [0u8; 32];
        h.copy_from_slice(self.take(32)?);
        Ok(h)
    }
    pub(crate) fn loc(&mut self) -> Result<Location, Short> {
        let segment = self.u32()?;
        let len = self.u32()?;
        let offset = self.u64()?;
        Ok(Location {
            segment,
            offset: offset & ((1 << OFFSET_BITS) - 1),
            len,
            slot: u16::try_from(offset >> OFFSET_BITS).unwrap_or(u16::MAX),
        })
    }
    pub(crate) fn reference(&mut self) -> Result<Ref, Short> {
        let hash = self.hash()?;
        Ok(Ref {
            hash,
            loc: self.loc()?,
        })
    }
    pub(crate) fn node_ptr(&mut self) -> Result<NodePtr, Short> {
        let loc = self.loc()?;
        Ok(NodePtr {
            loc,
            merkle: self.hash()?,
        })
    }
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}

/// Total on-disk length of a record with `payload` bytes, padded to 8.
pub(crate) fn record_len(payload: usize) -> usize {
    (REC_HEADER + payload + REC_TRAILER).next_multiple_of(8)
}

/// A whole record: header, payload, crc32 over both, zero padding to 8 bytes.
pub(crate) fn encode_record(kind: Kind, key: u64, hash: &[u8; 32], payload: &[u8]) -> Vec<u8> {
    let mut e = Enc(Vec::with_capacity(record_len(payload.len())));
    e.bytes(&REC_MAGIC);
    e.u8(kind as u8);
    e.bytes(&[0; 3]);
    // Payloads are bounded by MAX_RECORD (16 MiB) long before u32 overflows.
    e.u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    e.u32(0);
    e.u64(key);
    e.bytes(hash);
    e.bytes(payload);
    let crc = crc32fast::hash(&e.0);
    e.u32(crc);
    e.0.resize(record_len(payload.len()), 0);
    e.0
}

/// What is wrong with bytes that should be a record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RecordError {
    Magic,
    Kind(u8),
    Length,
    Checksum,
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::Magic => write!(f, "no record magic"),
            RecordError::Kind(k) => write!(f, "unexpected record kind {k}"),
            RecordError::Length => write!(f, "record length does not match its header"),
            RecordError::Checksum => write!(f, "crc32 mismatch"),
        }
    }
}

/// A decoded record borrowing its payload.
pub(crate) struct Record<'a> {
    /// The kind byte found (for [`Kind::Manifest`], either manifest kind).
    pub(crate) kind: u8,
    pub(crate) key: u64,
    pub(crate) hash: [u8; 32],
    pub(crate) payload: &'a [u8],
}

/// Checks and decodes a record of `kind` from exactly the bytes its location names.
pub(crate) fn decode_record(bytes: &[u8], kind: Kind) -> Result<Record<'_>, RecordError> {
    let mut d = Dec::new(bytes);
    let magic = d.take(4).map_err(|_| RecordError::Length)?;
    if magic != REC_MAGIC {
        return Err(RecordError::Magic);
    }
    let k = d.u8().map_err(|_| RecordError::Length)?;
    d.take(3).map_err(|_| RecordError::Length)?;
    let plen = d.u32().map_err(|_| RecordError::Length)? as usize;
    d.u32().map_err(|_| RecordError::Length)?;
    let key = d.u64().map_err(|_| RecordError::Length)?;
    let hash = d.hash().map_err(|_| RecordError::Length)?;
    if record_len(plen) != bytes.len() {
        return Err(RecordError::Length);
    }
    let payload = d.take(plen).map_err(|_| RecordError::Length)?;
    let crc = d.u32().map_err(|_| RecordError::Length)?;
    if crc32fast::hash(&bytes[..REC_HEADER + plen]) != crc {
        return Err(RecordError::Checksum);
    }
    // The padding is not under the crc; it must be zero so that no byte of a record can change
    // unnoticed.
    if bytes[REC_HEADER + plen + REC_TRAILER..]
        .iter()
        .any(|b| *b != 0)
    {
        return Err(RecordError::Checksum);
    }
    // A manifest is read as either version; the caller decodes by the kind found.
    let manifest = kind == Kind::Manifest && k == Kind::Manifest2 as u8;
    if k != kind as u8 && !manifest {
        return Err(RecordError::Kind(k));
    }
    Ok(Record {
        kind: k,
        key,
        hash,
        payload,
    })
}

/// The committed state a superblock slot names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Superblock {
    pub(crate) generation: u64,
    pub(crate) page_size: u32,
    pub(crate) next_snapshot: u64,
    pub(crate) catalog: Option<NodePtr>,
    pub(crate) dedup: Option<NodePtr>,
    /// A second catalog, of second copies of the manifests (format 2): one damaged catalog node
    /// or manifest hides no snapshot.
    pub(crate) catalog_copy: Option<NodePtr>,
    pub(crate) active_segment: u32,
    pub(crate) active_len: u64,
    /// Every live segment, the active one included, ascending.
    pub(crate) segments: Vec<u32>,
    /// The size at which the writer moves to a new segment (0: not recorded, a version 1 store).
    pub(crate) segment_bytes: u64,
    /// The format version the slot was read in (and is written in: 1 becomes 2).
    pub(crate) version: u32,
    /// The compression new pages get (format 4; `None` before).
    pub(crate) compression: crate::codec::Compression,
    /// Format 4: the store is encrypted (scheme 1, XChaCha20-Poly1305, or 2, AES-256-GCM-SIV;
    /// keyed blake3 ids in both) with the master key of this id; `None`: not encrypted.
    pub(crate) encryption: Option<crate::store::Encryption>,
}

impl Superblock {
    /// The same committed state, whichever format version each was read in.
    pub(crate) fn same_state(&self, other: &Superblock) -> bool {
        Superblock {
            version: other.version,
            ..self.clone()
        } == *other
    }
}

/// `ids` (ascending, distinct) as runs of consecutive ids: (first, count).
pub(crate) fn segment_runs(ids: &[u32]) -> Vec<(u32, u32)> {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for &id in ids {
        match runs.last_mut() {
            Some((first, count)) if u64::from(*first) + u64::from(*count) == u64::from(id) => {
                *count += 1
            }
            _ => runs.push((id, 1)),
        }
    }
    runs
}

/// Why a superblock slot was not used.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SlotError {
    /// All zero: never written.
    Empty,
    Checksum,
    Newer(u32),
    /// Encrypted with a scheme this build does not know (a newer pagesnap's).
    UnknownScheme(u8),
    Malformed,
}

impl Superblock {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.bytes(&SB_MAGIC);
        // A trie store stays in its format (1 becomes 2); `Store::upgrade` converts it.
        // Written as a clamp, not as `if v >= 3 { v.min(FORMAT_VERSION) } else { TRIE_FORMAT }`:
        // rustc 1.95.0 with optimisations folds that into `v.min(FORMAT_VERSION)`, so a version 1
        // slot came out as version 1 in a version 2 layout (`dbg`-free unit test below).
        e.u32(self.version.clamp(TRIE_FORMAT, FORMAT_VERSION));
        e.u32(self.page_size);
        e.u64(self.generation);
        e.u64(self.next_snapshot);
        e.root(&self.catalog);
        e.root(&self.dedup);
        e.u32(self.active_segment);
        e.u64(self.active_len);
        e.u64(self.segment_bytes);
        e.root(&self.catalog_copy);
        if self.version >= FRAME_FORMAT {
            e.bytes(&self.compression.to_bytes());
            match &self.encryption {
                Some(enc) => {
                    e.bytes(&[enc.cipher.scheme(), 0, 0, 0]);
                    e.bytes(&enc.key_id.0);
                }
                None => e.bytes(&[0; 20]),
            }
        }
        // The writer refuses a commit with more runs than fit (`TooManySegments`) before it
        // encodes; truncating here would be a bug, so it is checked in debug builds.
        let runs = segment_runs(&self.segments);
        debug_assert!(runs.len() <= MAX_SEGMENT_RUNS);
        e.u32(u32::try_from(runs.len()).unwrap_or(u32::MAX));
        for (first, count) in runs.iter().take(MAX_SEGMENT_RUNS) {
            e.u32(*first);
            e.u32(*count);
        }
        e.0.resize(SLOT_SIZE - 4, 0);
        let crc = crc32fast::hash(&e.0);
        e.u32(crc);
        e.0
    }

    pub(crate) fn decode(slot: &[u8]) -> Result<Superblock, SlotError> {
        if slot.len() != SLOT_SIZE || slot.iter().all(|b| *b == 0) {
            return Err(SlotError::Empty);
        }
        if slot[..8] != SB_MAGIC {
            // Written once (format 2 writes both slots at init), so damaged now.
            return Err(SlotError::Malformed);
        }
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&slot[SLOT_SIZE - 4..]);
        if crc32fast::hash(&slot[..SLOT_SIZE - 4]) != u32::from_le_bytes(crc) {
            return Err(SlotError::Checksum);
        }
        let mut d = Dec::new(&slot[8..SLOT_SIZE - 4]);
        let m = |_| SlotError::Malformed;
        let version = d.u32().map_err(m)?;
        if version > FORMAT_VERSION {
            return Err(SlotError::Newer(version));
        }
        let page_size = d.u32().map_err(m)?;
        let generation = d.u64().map_err(m)?;
        let next_snapshot = d.u64().map_err(m)?;
        let mut roots = [None, None];
        for root in roots.iter_mut() {
            let present = d.u8().map_err(m)?;
            let p = d.node_ptr().map_err(m)?;
            *root = (present == 1).then_some(p);
        }
        let active_segment = d.u32().map_err(m)?;
        let active_len = d.u64().map_err(m)?;
        let mut segment_bytes = 0;
        let mut catalog_copy = None;
        let mut compression = crate::codec::Compression::None;
        let mut encryption = None;
        let mut segments = Vec::new();
        if version == 1 {
            let n = d.u32().map_err(m)? as usize;
            if n > MAX_SEGMENTS_V1 || n * 4 > d.remaining() {
                return Err(SlotError::Malformed);
            }
            for _ in 0..n {
                segments.push(d.u32().map_err(m)?);
            }
        } else {
            segment_bytes = d.u64().map_err(m)?;
            let present = d.u8().map_err(m)?;
            let p = d.node_ptr().map_err(m)?;
            catalog_copy = (present == 1).then_some(p);
            if version >= FRAME_FORMAT {
                let mut b = [0u8; 4];
                b.copy_from_slice(d.take(4).map_err(m)?);
                compression =
                    crate::codec::Compression::from_bytes(b).ok_or(SlotError::Malformed)?;
                let head = d.take(4).map_err(m)?;
                let mut id = [0u8; 16];
                id.copy_from_slice(d.take(16).map_err(m)?);
                encryption = match head {
                    [0, 0, 0, 0] if id == [0; 16] => None,
                    [scheme, 0, 0, 0] => match crate::store::Cipher::from_scheme(*scheme) {
                        Some(cipher) => Some(crate::store::Encryption {
                            cipher,
                            key_id: crate::keys::KeyId(id),
                        }),
                        None => return Err(SlotError::UnknownScheme(*scheme)),
                    },
                    _ => return Err(SlotError::Malformed),
                };
            }
            let n = d.u32().map_err(m)? as usize;
            if n > MAX_SEGMENT_RUNS || n * 8 > d.remaining() {
                return Err(SlotError::Malformed);
            }
            for _ in 0..n {
                let (first, count) = (d.u32().map_err(m)?, d.u32().map_err(m)?);
                if segments.len() + count as usize > MAX_SEGMENT_IDS {
                    return Err(SlotError::Malformed);
                }
                let last = first.checked_add(count.checked_sub(1).ok_or(SlotError::Malformed)?);
                segments.extend(first..=last.ok_or(SlotError::Malformed)?);
            }
        }
        if !page_size.is_power_of_two()
            || version == 0
            || !segments.windows(2).all(|w| w[0] < w[1])
            || segments.binary_search(&active_segment).is_err()
        {
            return Err(SlotError::Malformed);
        }
        let [catalog, dedup] = roots;
        Ok(Superblock {
            generation,
            page_size,
            next_snapshot,
            catalog,
            dedup,
            catalog_copy,
            active_segment,
            active_len,
            segments,
            segment_bytes,
            version,
            compression,
            encryption,
        })
    }
}

/// The 64-byte header of segment file `id` of a store of format `version`.
pub(crate) fn segment_header(id: u32, version: u32) -> Vec<u8> {
    let mut e = Enc::default();
    e.bytes(&SEG_MAGIC);
    e.u32(version.max(TRIE_FORMAT));
    e.u32(id);
    e.0.resize(SEG_HEADER as usize - 4, 0);
    let crc = crc32fast::hash(&e.0);
    e.u32(crc);
    e.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_every_flipped_bit_is_caught() {
        let rec = encode_record(Kind::Page, 42, &[7; 32], b"hello page");
        assert_eq!(rec.len() % 8, 0);
        let r = decode_record(&rec, Kind::Page).expect("valid");
        assert_eq!(
            (r.key, r.hash, r.payload),
            (42, [7; 32], &b"hello page"[..])
        );
        assert_eq!(
            decode_record(&rec, Kind::Node).err(),
            Some(RecordError::Kind(1))
        );
        for bit in 0..rec.len() * 8 {
            let mut bad = rec.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode_record(&bad, Kind::Page).is_err(),
                "bit {bit} not detected"
            );
        }
        assert_eq!(
            decode_record(&rec[..rec.len() - 8], Kind::Page).err(),
            Some(RecordError::Length)
        );
    }

    #[test]
    fn superblock_round_trips_and_refuses_damage_and_newer_versions() {
        let sb = Superblock {
            generation: 9,
            page_size: 4096,
            next_snapshot: 4,
            catalog: Some(NodePtr {
                loc: Location {
                    segment: 1,
                    offset: 64,
                    len: 200,
                    slot: 0,
                },
                merkle: [3; 32],
            }),
            dedup: None,
            catalog_copy: None,
            active_segment: 2,
            active_len: 1234,
            segments: vec![1, 2, 5, 6, 7],
            segment_bytes: 1 << 20,
            version: FORMAT_VERSION,
            compression: crate::codec::Compression::Lz4,
            encryption: None,
        };
        let bytes = sb.encode();
        assert_eq!(bytes.len(), SLOT_SIZE);
        assert_eq!(Superblock::decode(&bytes), Ok(sb.clone()));
        for cipher in [
            crate::store::Cipher::XChaCha20Poly1305,
            crate::store::Cipher::Aes256GcmSiv,
        ] {
            let enc = Superblock {
                encryption: Some(crate::store::Encryption {
                    cipher,
                    key_id: crate::keys::KeyId([0xab; 16]),
                }),
                ..sb.clone()
            };
            assert_eq!(Superblock::decode(&enc.encode()), Ok(enc.clone()));
        }
        let mut bad = bytes.clone();
        bad[100] ^= 1;
        assert_eq!(Superblock::decode(&bad), Err(SlotError::Checksum));
        assert_eq!(Superblock::decode(&[0; SLOT_SIZE]), Err(SlotError::Empty));
        let mut newer = bytes.clone();
        newer[8..12].copy_from_slice(&5u32.to_le_bytes());
        let crc = crc32fast::hash(&newer[..SLOT_SIZE - 4]);
        newer[SLOT_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(Superblock::decode(&newer), Err(SlotError::Newer(5)));
        // Each version is written as the format it stays in (1 becomes 2), and reads back.
        for (version, written) in [(1, 2), (2, 2), (3, 3), (4, 4)] {
            let v = Superblock {
                version: std::hint::black_box(version),
                compression: if version >= FRAME_FORMAT {
                    sb.compression
                } else {
                    crate::codec::Compression::None
                },
                ..sb.clone()
            };
            let bytes = v.encode();
            assert_eq!(bytes[8..12], u32::to_le_bytes(written), "version {version}");
            let back = Superblock::decode(&bytes).expect("decodes");
            assert_eq!(back.version, written);
            assert!(back.same_state(&v), "version {version}");
        }
    }

    fn with_crc(mut slot: Vec<u8>) -> Vec<u8> {
        slot.resize(SLOT_SIZE - 4, 0);
        let crc = crc32fast::hash(&slot);
        slot.extend_from_slice(&crc.to_le_bytes());
        slot
    }

    #[test]
    fn segment_ids_are_stored_as_runs_without_a_count_limit() {
        assert_eq!(
            segment_runs(&[1, 2, 3, 7, 9, 10]),
            vec![(1, 3), (7, 1), (9, 2)]
        );
        // 100,000 segments (25 TiB at 256 MiB each) in one run: format 1 stopped at 900.
        let sb = Superblock {
            generation: 3,
            page_size: 4096,
            next_snapshot: 1,
            catalog: None,
            dedup: None,
            catalog_copy: None,
            active_segment: 100_000,
            active_len: 64,
            segments: (1..=100_000).collect(),
            segment_bytes: 256 << 20,
            version: FORMAT_VERSION,
            compression: crate::codec::Compression::Lz4,
            encryption: None,
        };
        assert_eq!(Superblock::decode(&sb.encode()), Ok(sb));
        // A run longer than any store may hold, or overlapping runs, is refused without a large
        // allocation.
        let mut e = Enc::default();
        e.bytes(&SB_MAGIC);
        e.u32(2);
        e.u32(4096);
        e.u64(1);
        e.u64(1);
        e.bytes(&[0; 2 * (1 + NODEPTR_BYTES)]);
        e.u32(1);
        e.u64(64);
        e.u64(1 << 20);
        e.bytes(&[0; 1 + NODEPTR_BYTES]);
        let head = e.0.clone();
        e.u32(1);
        e.u32(1);
        e.u32(u32::MAX);
        assert_eq!(
            Superblock::decode(&with_crc(e.0)),
            Err(SlotError::Malformed)
        );
        let mut e = Enc(head);
        e.u32(2);
        for (first, count) in [(1, 3), (2, 1)] {
            e.u32(first);
            e.u32(count);
        }
        assert_eq!(
            Superblock::decode(&with_crc(e.0)),
            Err(SlotError::Malformed)
        );
    }

    #[test]
    fn version_1_slots_still_decode() {
        let mut e = Enc::default();
        e.bytes(&SB_MAGIC);
        e.u32(1);
        e.u32(4096);
        e.u64(7);
        e.u64(3);
        e.bytes(&[0; 2 * (1 + NODEPTR_BYTES)]);
        e.u32(4);
        e.u64(999);
        e.u32(3);
        for id in [2, 4, 5] {
            e.u32(id);
        }
        let sb = Superblock::decode(&with_crc(e.0)).expect("a version 1 slot");
        assert_eq!(sb.segments, vec![2, 4, 5]);
        assert_eq!(
            (sb.generation, sb.active_segment, sb.active_len),
            (7, 4, 999)
        );
        assert_eq!(sb.segment_bytes, 0);
    }

    #[test]
    fn segment_names_parse_back() {
        assert_eq!(parse_seg_name(&seg_name(17)), Some(17));
        assert_eq!(parse_seg_name("seg-x.pss"), None);
        assert_eq!(parse_seg_name("superblock"), None);
    }
}
