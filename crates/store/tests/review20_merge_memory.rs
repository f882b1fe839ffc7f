//! Fixed: a large delta now goes in by `BTreeMap::append` and a failed commit puts back only the
//! changed entries (`index::apply_delta`); this test failed at 2.21 maps with `merged`.
//!
//! Found by the review of d01eaa6 / 6019b71 (a commit whose delta is >= 1/8 of the parent's map builds the new
//! map by `merged` and keeps the parent's whole map in `Undo::Map` until the commit is durable).
//! Before, the map was changed in place and only the changed entries were kept aside, so such a
//! commit held one map plus O(delta); now it holds the parent's map, a Vec of the whole new map
//! (`merged`'s `out`), the sort scratch of `BTreeMap::from_iter` and the new map at once, and two
//! whole maps until the commit returns. Measured with a counting global allocator (its own test
//! binary): the peak a commit of N/4 changes on a map of N pages adds over what was live before it,
//! in units of one page map of N pages.

use pagesnap_store::{Compression, Ref, SnapshotMeta, Store, StoreOptions, Vpn};
mod counting_alloc;
use counting_alloc::{Counting, LIVE, PEAK};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

#[global_allocator]
static A: Counting = Counting;

const N: u64 = 1 << 19;

fn page(v: u64, round: u64) -> Vec<u8> {
    let mut p = vec![0u8; 512];
    p[..8].copy_from_slice(&v.to_le_bytes());
    p[8..16].copy_from_slice(&round.to_le_bytes());
    p
}

#[test]
fn a_commit_of_a_quarter_of_the_map_adds_at_most_one_map_at_its_peak() {
    // One page map of N pages, as the store holds it.
    let base = LIVE.load(Ordering::Relaxed);
    let one_map: BTreeMap<u64, [u8; std::mem::size_of::<Ref>()]> = (0..N)
        .map(|v| (v, [0; std::mem::size_of::<Ref>()]))
        .collect();
    let map_bytes = LIVE.load(Ordering::Relaxed) - base;
    drop(one_map);

    let dir = tempfile::tempdir().expect("tmp");
    let opts = StoreOptions {
        page_size: 512,
        compression: Compression::None,
        ..StoreOptions::default()
    };
    let mut store = Store::init(dir.path().join("store"), opts).expect("store");
    store.begin(None).expect("begin");
    for v in 0..N {
        store.put(Vpn(v), &page(v, 0)).expect("put");
    }
    let first = store.commit(SnapshotMeta::default()).expect("commit").id;
    store.begin(Some(first)).expect("begin");
    for v in (0..N).step_by(4) {
        store.put(Vpn(v), &page(v, 1)).expect("put");
    }
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let second = store.commit(SnapshotMeta::default()).expect("commit").id;
    let peak = PEAK.load(Ordering::Relaxed) - before;
    let after = LIVE.load(Ordering::Relaxed) - before;
    let ratio = peak as f64 / map_bytes as f64;
    println!(
        "map of {N} pages: {} KiB; commit of {} changes: peak +{} KiB ({ratio:.2} maps), after +{} KiB",
        map_bytes >> 10,
        N / 4,
        peak >> 10,
        after >> 10
    );
    assert_eq!(
        store.read_page(second, Vpn(4)).expect("read"),
        Some(page(4, 1))
    );
    assert!(
        ratio <= 1.0,
        "a commit of N/4 changes peaked at {ratio:.2} page maps of N pages above what was live"
    );
}
