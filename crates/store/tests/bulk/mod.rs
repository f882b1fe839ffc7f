//! Helpers shared by the tests of the bulk write path (`write_behind.rs`, `writeback_errors.rs`):
//! 4 KiB pages that differ for every snapshot and page, and a snapshot of the first pages.

use pagesnap_store::{SnapshotMeta, Store, StoreError, Vpn};

/// A 4 KiB page that differs for every `(snapshot, vpn)`.
pub fn page(snapshot: u64, vpn: u64) -> Vec<u8> {
    let mut p = vec![0u8; 4096];
    for (i, c) in p.chunks_mut(8).enumerate() {
        let x = (snapshot << 40 ^ vpn << 12 ^ i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        c.copy_from_slice(&x.to_le_bytes());
    }
    p
}

/// Snapshot `snapshot` of pages `0..pages` on top of the newest one; its id.
pub fn write_snapshot(store: &mut Store, snapshot: u64, pages: u64) -> Result<u64, StoreError> {
    let parent = store.latest()?;
    store.begin(parent)?;
    for v in 0..pages {
        store.put(Vpn(v), &page(snapshot, v))?;
    }
    Ok(store.commit(SnapshotMeta::default())?.id.0)
}
