//! Format 3 commit records: the log that makes commits durable and is the snapshot catalog.
//!
//! Every commit appends one commit record — written twice, back to back — after its pages and
//! page map chunks, then syncs once. The record names the previous commit (by the blake3 of its
//! payload and both copies' places), so commits form a chain; it carries the snapshot it adds (its
//! whole manifest), the ids it deletes, and from time to time a *checkpoint*: every retained
//! snapshot's manifest, where a walk of the chain may stop. It also carries the crc32 of every byte
//! the commit appended before it, and the generation of the superblock it was written under: the
//! superblock is only a hint of where the log was at some point, and open scans on from there,
//! accepting a record only if it chains on the last accepted one, was written under the current
//! superblock generation, and the bytes before it are whole. See `docs/format.md`.

use crate::manifest::{ManifestV3, RecordRef};

/// The most bytes of a commit record's payload (a checkpoint of many manifests).
pub(crate) const MAX_COMMIT_RECORD: usize = 16 << 20;

/// A link to a commit record: the blake3 of its payload, and both copies.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Link {
    pub(crate) a: RecordRef,
    pub(crate) b: RecordRef,
}

/// A commit record's payload.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Debug, PartialEq, Eq)]
pub(crate) struct CommitRecord {
    /// The superblock generation it was written under.
    pub(crate) hint_gen: u64,
    /// 1, 2, 3, … along the chain.
    pub(crate) seq: u64,
    /// crc32 of the bytes the commit appended before this record (in this segment).
    pub(crate) range_crc: u32,
    /// The commit before (`None`: the first commit, or the first after gc or an upgrade).
    pub(crate) prev: Option<Link>,
    /// The next snapshot id to hand out.
    pub(crate) next_snapshot: u64,
    /// The snapshot it adds.
    pub(crate) added: Option<ManifestV3>,
    /// The snapshots it deletes.
    pub(crate) deleted: Vec<u64>,
    /// Every retained snapshot after this commit (a walk of the chain stops here).
    pub(crate) checkpoint: Option<Vec<ManifestV3>>,
}

impl CommitRecord {
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        match rkyv::to_bytes::<rkyv::rancor::Error>(self) {
            Ok(b) => b.to_vec(),
            // Serialising plain integers, strings and vectors into memory cannot fail.
            Err(e) => unreachable!("serialising a commit record: {e}"),
        }
    }

    /// Validates (rkyv, under a size cap) and decodes a payload already checked by crc32.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Result<CommitRecord, String> {
        if bytes.len() > MAX_COMMIT_RECORD {
            return Err(format!(
                "commit record of {} bytes exceeds the {MAX_COMMIT_RECORD}-byte cap",
                bytes.len()
            ));
        }
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        rkyv::from_bytes::<CommitRecord, rkyv::rancor::Error>(&aligned)
            .map_err(|e| format!("invalid commit record: {e}"))
    }
}
