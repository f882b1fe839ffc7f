//! Fixed: `flush_if_large` sorts the list (one entry per page) before it compares; this test
//! failed while it counted the repeats.
//!
//! Found by the review of 6019b71 in a format 2 store: `flush_if_large` compares `Changes::len()` with
//! `max_pending_changes`, and `len()` now counts every put of a page made out of order, not the
//! pages. A writer that rewrites a few pages out of order flushes intermediate index roots (index
//! nodes written, then superseded: garbage left for gc) where the BTreeMap of 2 entries never
//! reached the limit and flushed none.

use pagesnap_store::{Compression, SnapshotMeta, Store, StoreOptions, Vpn};
use std::sync::Arc;

#[test]
fn two_pages_rewritten_out_of_order_leave_no_intermediate_roots_for_gc() {
    let opts = StoreOptions {
        page_size: 512,
        max_pending_changes: 1000,
        compression: Compression::None,
        ..StoreOptions::default()
    };
    let io = Arc::new(pagesnap_store::fault::FaultyStorage::new());
    let mut store = Store::init_format2_with(io, opts).expect("init");
    store.begin(None).expect("begin");
    let mut last = [0u8; 2];
    for i in 0..100_000u64 {
        let v = 1 - i % 2; // 1, 0, 1, 0, ...
        let n = (i / 2 % 7) as u8 + 1; // each page's content changes between flushes
        store.put(Vpn(v), &[n; 512]).expect("put");
        last[v as usize] = n;
    }
    let c = store.commit(SnapshotMeta::default()).expect("commit");
    for v in 0..2u64 {
        assert_eq!(
            store.read_page(c.id, Vpn(v)).expect("read"),
            Some(vec![last[v as usize]; 512])
        );
    }
    let space = store.check().expect("check");
    // Before 6019b71: 3,456 bytes (the superseded page contents); since: 157,896 (100
    // intermediate index roots).
    assert!(
        space.leaked_bytes < 16 << 10,
        "a first snapshot of 2 pages left index garbage (intermediate roots): {space:?}"
    );
}
