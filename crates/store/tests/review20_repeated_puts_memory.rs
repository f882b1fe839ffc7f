//! Fixed: an unsorted list is compacted each time it doubles; this test failed (71 MiB) before.
//!
//! Found by the review of 6019b71 (`Changes`: a pending commit's changes as a list, sorted and deduplicated
//! only when read). A page put again out of order is pushed again, so the list holds one entry
//! per *put*, not per page: a writer that replays a journal (pages out of order, each rewritten
//! many times) into one snapshot now holds O(puts) in memory where the BTreeMap held O(pages).
//! Format 3 never flushes a pending commit, so nothing bounds it (format 2 flushes at
//! `max_pending_changes`, now counting the repeats, so it writes intermediate index roots more
//! often instead).
//!
//! Measured with a counting global allocator (its own test binary).

use pagesnap_store::{Compression, SnapshotMeta, Store, StoreOptions, Vpn};
mod counting_alloc;
use counting_alloc::{Counting, LIVE};
use std::sync::atomic::Ordering;

#[global_allocator]
static A: Counting = Counting;

#[test]
fn two_pages_put_a_million_times_out_of_order_hold_little_memory() {
    let dir = tempfile::tempdir().expect("tmp");
    let opts = StoreOptions {
        page_size: 512,
        compression: Compression::None,
        ..StoreOptions::default()
    };
    let mut store = Store::init(dir.path().join("store"), opts).expect("store");
    store.begin(None).expect("begin");
    let pages = [vec![1u8; 512], vec![2u8; 512]];
    // Warm up (the dedup map, the write buffer), then measure.
    for v in [1u64, 0] {
        store.put(Vpn(v), &pages[v as usize]).expect("put");
    }
    let before = LIVE.load(Ordering::Relaxed);
    for i in 0..1_000_000u64 {
        let v = 1 - (i % 2); // 1, 0, 1, 0, ...: each put out of order
        store.put(Vpn(v), &pages[v as usize]).expect("put");
    }
    let grown = LIVE.load(Ordering::Relaxed) - before;
    let id = store.commit(SnapshotMeta::default()).expect("commit").id;
    assert_eq!(
        store.read_page(id, Vpn(1)).expect("read"),
        Some(pages[1].clone())
    );
    assert!(
        grown < 4 << 20,
        "a pending commit of 2 pages grew by {} MiB over 1,000,000 puts",
        grown >> 20
    );
}
