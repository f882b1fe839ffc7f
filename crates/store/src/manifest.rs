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
}

impl Manifest {
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        match rkyv::to_bytes::<rkyv::rancor::Error>(self) {
            Ok(b) => b.to_vec(),
            // Serialising plain integers and strings into memory cannot fail.
            Err(e) => unreachable!("serialising a manifest: {e}"),
        }
    }

    pub(crate) fn from_bytes(bytes: &[u8]) -> Result<Manifest, String> {
        if bytes.len() > MAX_MANIFEST {
            return Err(format!(
                "manifest of {} bytes exceeds the {MAX_MANIFEST}-byte cap",
                bytes.len()
            ));
        }
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        rkyv::from_bytes::<Manifest, rkyv::rancor::Error>(&aligned)
            .map_err(|e| format!("invalid manifest: {e}"))
    }
}
