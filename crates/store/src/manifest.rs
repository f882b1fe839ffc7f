//! Snapshot manifests: serialized with rkyv, stored as checksummed records, validated (crc32 and
//! blake3 first, then rkyv's validation under a size cap) before use.

use crate::format::{Location, NodePtr};

/// The most bytes a manifest may take (labels are capped well below).
pub(crate) const MAX_MANIFEST: usize = 64 << 10;
/// The longest label kept.
pub const MAX_LABEL: usize = 1024;

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Debug, PartialEq, Eq)]
pub(crate) struct RootRecord {
    pub(crate) segment: u32,
    pub(crate) offset: u64,
    pub(crate) len: u32,
    pub(crate) merkle: [u8; 32],
}

impl RootRecord {
    pub(crate) fn from_ptr(p: &NodePtr) -> Self {
        RootRecord {
            segment: p.loc.segment,
            offset: p.loc.offset,
            len: p.loc.len,
            merkle: p.merkle,
        }
    }
    pub(crate) fn ptr(&self) -> NodePtr {
        NodePtr {
            loc: Location {
                segment: self.segment,
                offset: self.offset,
                len: self.len,
                slot: 0,
            },
            merkle: self.merkle,
        }
    }
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Debug, PartialEq, Eq)]
pub(crate) struct Manifest {
    pub(crate) id: u64,
    pub(crate) parent: Option<u64>,
    pub(crate) epoch: u64,
    pub(crate) time_unix_ms: u64,
    pub(crate) label: Option<String>,
    pub(crate) logical_size: u64,
    pub(crate) page_size: u32,
    pub(crate) page_count: u64,
    pub(crate) merkle_root: [u8; 32],
    pub(crate) index_root: Option<RootRecord>,
    pub(crate) pages_written: u64,
    pub(crate) pages_changed: u64,
    pub(crate) data_bytes: u64,
    pub(crate) meta_bytes: u64,
    /// Where the snapshot's content came from, as its writer describes it (at most
    /// [`MAX_LABEL`] bytes): for a disk image, the file's identity when it was read.
    pub(crate) origin: Option<String>,
}

/// A manifest as format 1 wrote it (record kind 3): the same fields, without `origin`.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Debug, PartialEq, Eq)]
pub(crate) struct ManifestV1 {
    pub(crate) id: u64,
    pub(crate) parent: Option<u64>,
    pub(crate) epoch: u64,
    pub(crate) time_unix_ms: u64,
    pub(crate) label: Option<String>,
    pub(crate) logical_size: u64,
    pub(crate) page_size: u32,
    pub(crate) page_count: u64,
    pub(crate) merkle_root: [u8; 32],
    pub(crate) index_root: Option<RootRecord>,
    pub(crate) pages_written: u64,
    pub(crate) pages_changed: u64,
    pub(crate) data_bytes: u64,
    pub(crate) meta_bytes: u64,
}

impl From<ManifestV1> for Manifest {
    fn from(m: ManifestV1) -> Manifest {
        Manifest {
            id: m.id,
            parent: m.parent,
            epoch: m.epoch,
            time_unix_ms: m.time_unix_ms,
            label: m.label,
            logical_size: m.logical_size,
            page_size: m.page_size,
            page_count: m.page_count,
            merkle_root: m.merkle_root,
            index_root: m.index_root,
            pages_written: m.pages_written,
            pages_changed: m.pages_changed,
            data_bytes: m.data_bytes,
            meta_bytes: m.meta_bytes,
            origin: None,
        }
    }
}

impl Manifest {
    /// Serialised for a record of kind [`crate::format::Kind::Manifest2`].
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        match rkyv::to_bytes::<rkyv::rancor::Error>(self) {
            Ok(b) => b.to_vec(),
            // Serialising plain integers and strings into memory cannot fail.
            Err(e) => unreachable!("serialising a manifest: {e}"),
        }
    }

    /// Decodes the payload of a manifest record of `kind` (3: format 1, 4: with an origin),
    /// validating at most [`MAX_MANIFEST`] bytes.
    pub(crate) fn from_bytes(kind: u8, bytes: &[u8]) -> Result<Manifest, String> {
        if bytes.len() > MAX_MANIFEST {
            return Err(format!(
                "manifest of {} bytes exceeds the {MAX_MANIFEST}-byte cap",
                bytes.len()
            ));
        }
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        let bad = |e: rkyv::rancor::Error| format!("invalid manifest: {e}");
        if kind == crate::format::Kind::Manifest as u8 {
            rkyv::from_bytes::<ManifestV1, rkyv::rancor::Error>(&aligned)
                .map(Manifest::from)
                .map_err(bad)
        } else {
            rkyv::from_bytes::<Manifest, rkyv::rancor::Error>(&aligned).map_err(bad)
        }
    }
}

/// A record's place and the blake3 of its payload, as rkyv stores it.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RecordRef {
    pub(crate) segment: u32,
    pub(crate) offset: u64,
    pub(crate) len: u32,
    pub(crate) hash: [u8; 32],
}

impl RecordRef {
    pub(crate) fn new(loc: Location, hash: [u8; 32]) -> Self {
        RecordRef {
            segment: loc.segment,
            offset: loc.offset,
            len: loc.len,
            hash,
        }
    }
    pub(crate) fn loc(&self) -> Location {
        Location {
            segment: self.segment,
            offset: self.offset,
            len: self.len,
            slot: 0,
        }
    }
    pub(crate) fn chunk(&self) -> crate::index::ChunkRef {
        crate::index::ChunkRef {
            loc: self.loc(),
            hash: self.hash,
        }
    }
}

/// A format 3 snapshot manifest: carried inside the commit record that adds the snapshot (and in
/// catalog checkpoints), so it costs no record of its own.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Debug, PartialEq, Eq)]
pub(crate) struct ManifestV3 {
    pub(crate) id: u64,
    pub(crate) parent: Option<u64>,
    pub(crate) epoch: u64,
    pub(crate) time_unix_ms: u64,
    pub(crate) label: Option<String>,
    pub(crate) origin: Option<String>,
    pub(crate) logical_size: u64,
    pub(crate) page_size: u32,
    pub(crate) page_count: u64,
    /// The page map's content root (see `index.rs`).
    pub(crate) content_root: [u8; 32],
    /// The newest chunk of the page map's chain (`None`: no page is stored).
    pub(crate) index: Option<RecordRef>,
    /// Entries in the chain's base, and in its deltas since (the writer's rebase rule).
    pub(crate) base_entries: u64,
    pub(crate) chain_entries: u64,
    /// Deltas since the base.
    pub(crate) chain_deltas: u32,
    pub(crate) pages_written: u64,
    pub(crate) pages_changed: u64,
    pub(crate) data_bytes: u64,
    pub(crate) meta_bytes: u64,
}
