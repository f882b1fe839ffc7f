//! Hostile review of the store v3 follow-ups (log scan, superblock hint, coalesced reads).

use pagesnap_store::fault::FaultyStorage;
use pagesnap_store::{Mode, SnapshotId, SnapshotMeta, Storage, Store, StoreOptions, Vpn};
use std::sync::Arc;

mod common;
use common::{opts, page};

/// Plain pages: the tests flip bits in one page and read its neighbours (a compressed frame
/// would share the damage among its pages; `tests/corruption.rs` covers frames).
fn big_segments() -> StoreOptions {
    StoreOptions {
        segment_bytes: 1 << 20,
        compression: pagesnap_store::Compression::None,
        ..opts()
    }
}

/// Offsets and lengths of the records of segment `seg`, walked header by header.
fn records(seg: &[u8]) -> Vec<(usize, u8, u64, usize)> {
    let mut out = Vec::new();
    let mut off = 64usize;
    while off + 56 <= seg.len() && &seg[off..off + 4] == b"PREC" {
        let plen = u32::from_le_bytes(seg[off + 8..off + 12].try_into().expect("4")) as usize;
        let len = (56 + plen + 4).next_multiple_of(8);
        let key = u64::from_le_bytes(seg[off + 16..off + 24].try_into().expect("8"));
        out.push((off, seg[off + 4], key, len));
        off += len;
    }
    out
}

/// Three commits after the hint. Damage since: a bit of one of commit 2's pages flips (a page
/// commit 3 replaces), and a zeroed block wipes commit 2's first commit record copy. Commit 2's
/// second copy is intact and commit 3 is whole and stands on it: both must be taken (commit 2 with
/// its damage reported). The scan finds commit 2 at its second copy with the crc matching neither
/// way; the `differing` test sees a first copy that differs in more than len/8 bytes (zeroed), so
/// it places commit 2 at the second copy: its end, and the start of commit 3's crc range, land one
/// record too far; commit 3's crc then fails both ways and, last in the log, it is discarded.
#[test]
fn a_zeroed_first_copy_over_damaged_data_does_not_discard_the_next_commit() {
    let io = Arc::new(FaultyStorage::new());
    let mut store = Store::init_with(io.clone(), big_segments()).expect("init");
    let mut parent: Option<SnapshotId> = None;
    let mut ids = Vec::new();
    for s in 0..3u64 {
        store.begin(parent).expect("begin");
        for v in 0..4u64 {
            store.put(Vpn(s * 10 + v), &page(s * 10 + v)).expect("put");
        }
        if s == 2 {
            store.put(Vpn(10), &page(99)).expect("put");
        }
        let id = store.commit(SnapshotMeta::default()).expect("commit").id;
        ids.push(id);
        parent = Some(id);
    }
    let mut loc = None;
    store
        .for_each_page(ids[1], |v, r| {
            if v == Vpn(10) {
                loc = Some(r.loc);
            }
            Ok(())
        })
        .expect("walk");
    let loc = loc.expect("page 10 of snapshot 2");
    // The machine stops (no hint at close): all three commits are found by the scan.
    std::mem::forget(store);
    let name = "seg-00000001.pss";
    let seg = io.contents(name).expect("segment");
    let recs = records(&seg);
    let commits: Vec<_> = recs.iter().filter(|r| r.1 == 5).collect();
    assert_eq!(commits.len(), 6, "three commits, two copies each: {recs:?}");
    let (first_copy, _, _, len) = *commits[2];
    io.flip_bit(name, loc.offset + 100, 3).expect("flip");
    io.write(name, first_copy as u64, &vec![0u8; len])
        .expect("zero");
    let (store, report) = Store::open_with(io.clone(), Mode::Read, big_segments()).expect("opens");
    assert_eq!(report.discarded_tail, None, "nothing discarded: {report:?}");
    assert_eq!(store.snapshot_ids().expect("list"), ids, "{report:?}");
    assert_eq!(report.latest, Some(ids[2]), "{report:?}");
    for v in (0..4u64).chain(11..14).chain(20..24) {
        assert_eq!(
            store.read_page(ids[2], Vpn(v)).expect("read"),
            Some(page(v))
        );
    }
    assert_eq!(
        store.read_page(ids[2], Vpn(10)).expect("read"),
        Some(page(99))
    );
}
