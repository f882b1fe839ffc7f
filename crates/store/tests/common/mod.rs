//! Helpers shared by the reliability tests: small pages, small segments.

use pagesnap_store::StoreOptions;

/// A 512-byte page whose content is a function of `seed`.
pub fn page(seed: u64) -> Vec<u8> {
    let mut p = vec![0u8; 512];
    for (i, chunk) in p.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64).to_le_bytes());
    }
    p
}

/// 512-byte pages in 8 KiB segments: many segments from little data.
pub fn opts() -> StoreOptions {
    StoreOptions {
        page_size: 512,
        segment_bytes: 8 << 10,
        preallocate: 2 << 10,
        ..StoreOptions::default()
    }
}

/// Every page of snapshot `id`, read back and checked.
// Not every test binary that includes this module reads snapshots back.
#[allow(dead_code)]
pub fn pages_of(
    store: &pagesnap_store::Store,
    id: pagesnap_store::SnapshotId,
) -> Result<std::collections::BTreeMap<u64, Vec<u8>>, pagesnap_store::StoreError> {
    let mut got = std::collections::BTreeMap::new();
    store.for_each_page(id, |v, r| {
        got.insert(v.0, store.read_ref(r)?);
        Ok(())
    })?;
    Ok(got)
}
