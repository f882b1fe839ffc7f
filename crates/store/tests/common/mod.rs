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

/// Each snapshot's pages, as a test expects to read them back.
#[allow(dead_code)]
pub type Expected = std::collections::BTreeMap<
    pagesnap_store::SnapshotId,
    std::collections::BTreeMap<u64, Vec<u8>>,
>;

/// Every snapshot of `store` is listed and reads back exactly as `expected` says.
// Not every test binary that includes this module checks whole stores.
#[allow(dead_code)]
pub fn assert_holds(store: &pagesnap_store::Store, expected: &Expected, context: &str) {
    let ids = store.snapshot_ids().expect("list");
    assert_eq!(
        ids,
        expected.keys().copied().collect::<Vec<_>>(),
        "{context}: the snapshots listed"
    );
    for (id, pages) in expected {
        let got = pages_of(store, *id)
            .unwrap_or_else(|e| panic!("{context}: snapshot {id} reads back: {e}"));
        assert_eq!(&got, pages, "{context}: snapshot {id}");
    }
}
