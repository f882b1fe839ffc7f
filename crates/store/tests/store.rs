//! The store through its public API, on the real filesystem backend and in memory.

use pagesnap_store::fault::FaultyStorage;
use pagesnap_store::{Epoch, Mode, SnapshotId, SnapshotMeta, Store, StoreError, StoreOptions, Vpn};
use std::collections::BTreeMap;
use std::sync::Arc;

fn page(seed: u64) -> Vec<u8> {
    let mut p = vec![0u8; 4096];
    for (i, chunk) in p.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64).to_le_bytes());
    }
    p
}

fn meta(epoch: u64) -> SnapshotMeta {
    SnapshotMeta {
        epoch: Epoch(epoch),
        label: Some(format!("e{epoch}")),
        logical_size: 1 << 30,
        time_unix_ms: Some(1_700_000_000_000 + epoch),
        origin: Some(format!("image e{epoch}")),
    }
}

fn small() -> StoreOptions {
    StoreOptions {
        segment_bytes: 64 << 10,
        preallocate: 16 << 10,
        ..StoreOptions::default()
    }
}

fn contents(store: &Store, id: SnapshotId) -> BTreeMap<u64, Vec<u8>> {
    let mut out = BTreeMap::new();
    store
        .for_each_page(id, |vpn, r| {
            out.insert(vpn.0, store.read_ref(r)?);
            Ok(())
        })
        .expect("read snapshot");
    out
}

#[test]
fn snapshots_round_trip_through_reopen() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut store = Store::init(dir.path(), small()).expect("init");
    store.begin(None).expect("begin");
    for v in 0..100u64 {
        store.put(Vpn(v * 3), &page(v)).expect("put");
    }
    store.put(Vpn(1000), &[0u8; 4096]).expect("zero page");
    let s1 = store.commit(meta(1)).expect("commit 1");
    assert_eq!(
        (s1.id, s1.page_count, s1.pages_written),
        (SnapshotId(1), 100, 100)
    );
    store.begin(Some(s1.id)).expect("begin");
    store.put(Vpn(0), &page(500)).expect("change");
    store.put(Vpn(3), &[0u8; 4096]).expect("zero it");
    store.put(Vpn(9), &page(3)).expect("unchanged content");
    store
        .put(Vpn(5000), &page(7))
        .expect("same content as page 21: dedup");
    let s2 = store.commit(meta(2)).expect("commit 2");
    assert_eq!(
        (s2.id, s2.page_count, s2.pages_written, s2.pages_changed),
        (SnapshotId(2), 100, 1, 3)
    );
    drop(store);

    let (store, report) = Store::open(dir.path(), Mode::Read).expect("open");
    assert_eq!(report.latest, Some(SnapshotId(2)));
    assert!(report.damaged.is_empty() && !report.damaged_slot);
    let c1 = contents(&store, s1.id);
    assert_eq!(c1.len(), 100);
    assert!(c1.iter().all(|(v, p)| *p == page(v / 3)));
    let c2 = contents(&store, s2.id);
    assert_eq!(c2.get(&0), Some(&page(500)));
    assert_eq!(c2.get(&3), None);
    assert_eq!(c2.get(&5000), Some(&page(7)));
    assert_eq!(store.read_page(s2.id, Vpn(6)).expect("read"), Some(page(2)));
    assert_eq!(
        store.diff(s1.id, s2.id).expect("diff"),
        vec![Vpn(0), Vpn(3), Vpn(5000)]
    );
    let infos = store.snapshots().expect("list");
    assert_eq!(
        infos.iter().map(|i| i.id).collect::<Vec<_>>(),
        vec![SnapshotId(1), SnapshotId(2)]
    );
    assert_eq!(infos[1].parent, Some(SnapshotId(1)));
    assert_eq!(infos[1].label.as_deref(), Some("e2"));
    assert_eq!(infos[1].origin.as_deref(), Some("image e2"));
    assert_eq!(infos[1].merkle_root, s2.merkle_root);
    assert!(store.verify(&[]).expect("verify").is_clean());
}

#[test]
fn equal_contents_have_equal_merkle_roots() {
    let mut store = Store::init_with(Arc::new(FaultyStorage::new()), small()).expect("init");
    store.begin(None).expect("begin");
    for v in 0..50u64 {
        store.put(Vpn(v), &page(v)).expect("put");
    }
    let a = store.commit(meta(1)).expect("commit");
    store.begin(Some(a.id)).expect("begin");
    store.put(Vpn(7), &page(99)).expect("change");
    let b = store.commit(meta(2)).expect("commit");
    store.begin(Some(b.id)).expect("begin");
    store.put(Vpn(7), &page(7)).expect("change back");
    let c = store.commit(meta(3)).expect("commit");
    assert_ne!(a.merkle_root, b.merkle_root);
    assert_eq!(a.merkle_root, c.merkle_root);
    // Built from scratch, in another order: the same root.
    store.begin(None).expect("begin");
    for v in (0..50u64).rev() {
        store.put(Vpn(v), &page(v)).expect("put");
    }
    let d = store.commit(meta(4)).expect("commit");
    assert_eq!(d.merkle_root, a.merkle_root);
    assert_eq!(d.pages_written, 0, "all content was already stored");
}

#[test]
fn a_snapshot_writes_metadata_proportional_to_its_changes() {
    let mut store =
        Store::init_with(Arc::new(FaultyStorage::new()), StoreOptions::default()).expect("init");
    store.begin(None).expect("begin");
    for v in 0..20_000u64 {
        store.put(Vpn(v), &page(v % 64)).expect("put");
    }
    let base = store.commit(meta(1)).expect("commit");
    let mut last = base.id;
    let mut meta_per_change = Vec::new();
    for (round, changed) in [10u64, 100, 1000].into_iter().enumerate() {
        store.begin(Some(last)).expect("begin");
        for i in 0..changed {
            store
                .put(
                    Vpn(i * 19 % 20_000),
                    &page(1000 + round as u64 * 10_000 + i),
                )
                .expect("put");
        }
        let r = store.commit(meta(2 + round as u64)).expect("commit");
        assert_eq!(r.pages_changed, changed);
        meta_per_change.push(r.meta_bytes as f64 / changed as f64);
        last = r.id;
    }
    // Per-change metadata does not grow with the number of changes (it falls, as paths share).
    assert!(
        meta_per_change[2] <= meta_per_change[0],
        "{meta_per_change:?}"
    );
    // And 10 changes of a 20,000-page snapshot write far less than its whole index.
    assert!(
        meta_per_change[0] * 10.0 < 0.05 * base.meta_bytes as f64,
        "{meta_per_change:?} vs {}",
        base.meta_bytes
    );
}

#[test]
fn segments_roll_over_and_everything_still_reads() {
    let mut store = Store::init_with(Arc::new(FaultyStorage::new()), small()).expect("init");
    let mut last = None;
    for round in 0..6u64 {
        store.begin(last).expect("begin");
        for v in 0..40u64 {
            store.put(Vpn(v), &page(round * 100 + v)).expect("put");
        }
        last = Some(store.commit(meta(round + 1)).expect("commit").id);
    }
    for round in 0..6u64 {
        let c = contents(&store, SnapshotId(round + 1));
        assert!(c.iter().all(|(v, p)| *p == page(round * 100 + v)));
    }
    assert!(store.verify(&[]).expect("verify").is_clean());
}

#[test]
fn delete_and_gc_reclaim_everything_unused() {
    let io = Arc::new(FaultyStorage::new());
    let mut store = Store::init_with(io.clone(), small()).expect("init");
    let mut ids = Vec::new();
    let mut last = None;
    for round in 0..5u64 {
        store.begin(last).expect("begin");
        for v in 0..30u64 {
            store
                .put(Vpn(v + round * 10), &page(round * 1000 + v))
                .expect("put");
        }
        let id = store.commit(meta(round + 1)).expect("commit").id;
        ids.push(id);
        last = Some(id);
    }
    let kept = contents(&store, ids[4]);
    // Before any delete, the only garbage is superseded catalog and dedup nodes.
    let cow_garbage = store.check().expect("check").leaked_bytes;
    store.delete(&ids[..4]).expect("delete");
    assert!(matches!(
        store.delete(&[SnapshotId(1)]),
        Err(StoreError::UnknownSnapshot(SnapshotId(1)))
    ));
    let before = store.check().expect("check");
    assert!(
        before.leaked_bytes > cow_garbage,
        "deleting snapshots frees their pages and nodes"
    );
    let gc = store.gc().expect("gc");
    assert!(gc.bytes_freed > 0 && gc.bytes_after < gc.bytes_before);
    assert_eq!(
        store.check().expect("check").leaked_bytes,
        0,
        "gc must leave no leak"
    );
    assert_eq!(contents(&store, ids[4]), kept);
    assert!(store.verify(&[]).expect("verify").is_clean());
    // After gc the store goes on: new snapshots dedup against the compacted pages.
    store.begin(Some(ids[4])).expect("begin");
    store
        .put(Vpn(1), &page(4001))
        .expect("put existing content elsewhere");
    let r = store.commit(meta(9)).expect("commit");
    assert_eq!((r.id, r.pages_written), (SnapshotId(6), 0));
    drop(store);
    let (mut store, _) =
        Store::open_with(io, Mode::Write, StoreOptions::default()).expect("reopen");
    assert_eq!(
        store.snapshot_ids().expect("ids"),
        vec![ids[4], SnapshotId(6)]
    );
    // The commit superseded a catalog node; gc after reopen reclaims it.
    store.gc().expect("gc");
    assert_eq!(store.check().expect("check").leaked_bytes, 0);
    assert_eq!(contents(&store, ids[4]), kept);
}

#[test]
fn bad_input_gets_clear_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    let missing = dir.path().join("nope");
    let e = Store::open(&missing, Mode::Read).expect_err("missing");
    assert!(
        matches!(e, StoreError::NotAStore { .. }) && e.to_string().contains("pagesnap init"),
        "{e}"
    );
    let e = Store::open(dir.path(), Mode::Read).expect_err("empty dir");
    assert!(matches!(e, StoreError::NotAStore { .. }), "{e}");

    let mut store = Store::init(dir.path(), StoreOptions::default()).expect("init");
    let e = Store::init(dir.path(), StoreOptions::default()).expect_err("twice");
    assert!(matches!(e, StoreError::AlreadyExists { .. }), "{e}");
    let e = Store::open(dir.path(), Mode::Write).expect_err("second writer");
    assert!(
        matches!(&e, StoreError::Locked { holder, .. } if holder.contains(&std::process::id().to_string())),
        "{e}"
    );
    // Readers are not locked out.
    Store::open(dir.path(), Mode::Read).expect("reader beside the writer");

    assert!(matches!(
        store.put(Vpn(1), &page(1)),
        Err(StoreError::Usage(_))
    ));
    store.begin(None).expect("begin");
    assert!(matches!(
        store.put(Vpn(1), &[1u8; 100]),
        Err(StoreError::PageSize {
            len: 100,
            page_size: 4096
        })
    ));
    assert!(matches!(store.begin(None), Err(StoreError::Usage(_))));
    store.put(Vpn(1), &page(1)).expect("put");
    let id = store.commit(SnapshotMeta::default()).expect("commit").id;
    assert!(matches!(
        store.read_page(SnapshotId(9), Vpn(1)),
        Err(StoreError::UnknownSnapshot(SnapshotId(9)))
    ));
    drop(store);

    let (mut reader, _) = Store::open(dir.path(), Mode::Read).expect("reader");
    assert!(matches!(reader.begin(None), Err(StoreError::ReadOnly)));

    // A newer format version is refused, not misread.
    let sb = dir.path().join("superblock");
    let original = std::fs::read(&sb).expect("read sb");
    let mut newer = original.clone();
    for slot in 0..2 {
        let at = slot * 4096;
        if newer[at..at + 8] == *b"PGSNAPSB" {
            newer[at + 8..at + 12].copy_from_slice(&7u32.to_le_bytes());
            let crc = crc32(&newer[at..at + 4092]);
            newer[at + 4092..at + 4096].copy_from_slice(&crc.to_le_bytes());
        }
    }
    std::fs::write(&sb, &newer).expect("write");
    let e = Store::open(dir.path(), Mode::Read).expect_err("newer");
    assert!(
        matches!(e, StoreError::NewerVersion { found: 7, .. }) && e.to_string().contains("upgrade"),
        "{e}"
    );
    // A truncated superblock, garbage in both slots: clear errors, no panic.
    std::fs::write(&sb, &original[..100]).expect("write");
    assert!(Store::open(dir.path(), Mode::Read).is_err());
    std::fs::write(&sb, vec![0xA5u8; 8192]).expect("write");
    let e = Store::open(dir.path(), Mode::Read).expect_err("garbage");
    // Not taken for "no store here": init must not clear a directory whose superblock is damaged.
    assert!(
        matches!(e, StoreError::Corrupt { .. }) && e.to_string().contains("both slots"),
        "{e}"
    );
    let e = Store::init(dir.path(), StoreOptions::default()).expect_err("init over damage");
    assert!(matches!(e, StoreError::AlreadyExists { .. }), "{e}");
    std::fs::write(&sb, &original).expect("restore");
    let (store, _) = Store::open(dir.path(), Mode::Read).expect("intact again");
    assert_eq!(store.read_page(id, Vpn(1)).expect("read"), Some(page(1)));
}

fn crc32(b: &[u8]) -> u32 {
    // The same polynomial as the store (crc32fast is the store's dependency, not this test's).
    let mut c = !0u32;
    for &x in b {
        c ^= u32::from(x);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

#[test]
fn flipped_bits_are_found_by_verify_and_never_returned_as_data() {
    let io = Arc::new(FaultyStorage::new());
    let mut store = Store::init_with(io.clone(), small()).expect("init");
    store.begin(None).expect("begin");
    for v in 0..20u64 {
        store.put(Vpn(v), &page(v)).expect("put");
    }
    let s1 = store.commit(meta(1)).expect("commit");
    store.begin(Some(s1.id)).expect("begin");
    store.put(Vpn(3), &page(333)).expect("put");
    let s2 = store.commit(meta(2)).expect("commit");
    // Page 3 of snapshot 2 lives in the newest page record: find it and flip a content bit.
    let mut target = None;
    store
        .for_each_page(s2.id, |v, r| {
            if v == Vpn(3) {
                target = Some(*r);
            }
            Ok(())
        })
        .expect("walk");
    let target = target.expect("page 3");
    io.flip_bit(
        &format!("seg-{:08}.pss", target.loc.segment),
        target.loc.offset + 100,
        3,
    )
    .expect("flip");
    let report = store.verify(&[]).expect("verify runs");
    assert!(!report.is_clean());
    assert!(
        report
            .damage
            .iter()
            .any(|d| d.snapshot == Some(s2.id) && d.vpn == Some(Vpn(3))),
        "{report:?}"
    );
    assert!(
        report.damage.iter().all(|d| d.snapshot != Some(s1.id)),
        "snapshot 1 does not use that record"
    );
    let e = store.read_page(s2.id, Vpn(3)).expect_err("damaged page");
    assert!(e.is_corruption() && e.to_string().contains("verify"), "{e}");
    // Everything else still reads.
    assert_eq!(contents(&store, s1.id).len(), 20);
    assert_eq!(
        store.read_page(s2.id, Vpn(4)).expect("undamaged"),
        Some(page(4))
    );
}

#[test]
fn open_falls_back_past_a_damaged_newest_snapshot() {
    let io = Arc::new(FaultyStorage::new());
    let mut store = Store::init_with(io.clone(), small()).expect("init");
    store.begin(None).expect("begin");
    store.put(Vpn(1), &page(1)).expect("put");
    let s1 = store.commit(meta(1)).expect("commit");
    store.begin(Some(s1.id)).expect("begin");
    store.put(Vpn(2), &page(2)).expect("put");
    let s2 = store.commit(meta(2)).expect("commit");
    // Later commits stand on snapshot 2's (format 3: damage under the last commit of the log
    // cannot be told from an interrupted commit; see the next test), and leave it the newest.
    store.begin(Some(s1.id)).expect("begin");
    store.put(Vpn(3), &page(3)).expect("put");
    let s3 = store.commit(meta(3)).expect("commit");
    store.delete(&[s3.id]).expect("delete");
    let root = {
        let mut loc = None;
        // Snapshot 2's page map is the last chunk record (kind 6) before its commit record
        // (kind 5, key 2: the second commit).
        let seg = io.contents("seg-00000001.pss").expect("segment");
        let mut off = 64usize;
        let mut chunks = Vec::new();
        while off + 56 <= seg.len() && &seg[off..off + 4] == b"PREC" {
            let plen =
                u32::from_le_bytes(seg[off + 8..off + 12].try_into().expect("4 bytes")) as usize;
            let len = (56 + plen + 4).next_multiple_of(8);
            if seg[off + 4] == 6 {
                chunks.push(off);
            }
            if seg[off + 4] == 5
                && loc.is_none()
                && u64::from_le_bytes(seg[off + 16..off + 24].try_into().expect("8 bytes")) == 2
            {
                loc = chunks.last().copied();
            }
            off += len;
        }
        loc.expect("snapshot 2's page map")
    };
    io.flip_bit("seg-00000001.pss", root as u64 + 60, 0)
        .expect("flip");
    drop(store);
    let (store, report) = Store::open_with(io, Mode::Read, StoreOptions::default()).expect("open");
    assert_eq!(report.latest, Some(s1.id));
    assert_eq!(report.damaged, vec![s2.id]);
    assert_eq!(report.discarded_tail, None);
    assert_eq!(
        store
            .read_page(s1.id, Vpn(1))
            .expect("older snapshot restores"),
        Some(page(1))
    );
    assert!(store.read_page(s2.id, Vpn(2)).is_err());
}

/// Format 3: bytes under the last commit of the log that fail their crc32 are what an interrupted
/// commit leaves; that commit is not taken, and open says so (never silently).
#[test]
fn a_damaged_last_commit_is_not_taken_and_open_says_so() {
    let io = Arc::new(FaultyStorage::new());
    let mut store = Store::init_with(io.clone(), small()).expect("init");
    store.begin(None).expect("begin");
    store.put(Vpn(1), &page(1)).expect("put");
    let s1 = store.commit(meta(1)).expect("commit");
    store.begin(Some(s1.id)).expect("begin");
    store.put(Vpn(2), &page(2)).expect("put");
    let s2 = store.commit(meta(2)).expect("commit");
    let mut loc = None;
    store
        .for_each_page(s2.id, |v, r| {
            if v == Vpn(2) {
                loc = Some(r.loc);
            }
            Ok(())
        })
        .expect("walk");
    let loc = loc.expect("page 2");
    // The machine stops here (a clean close would write a hint past the commit, and damage to
    // it would then be page damage like any other: see the test above).
    let crashed = Arc::new(io.crash_image(0));
    drop(store);
    crashed
        .flip_bit(&format!("seg-{:08}.pss", loc.segment), loc.offset + 9, 1)
        .expect("flip");
    let (store, report) =
        Store::open_with(crashed, Mode::Read, StoreOptions::default()).expect("open");
    assert_eq!(store.snapshot_ids().expect("ids"), vec![s1.id]);
    let note = report.discarded_tail.expect("said so");
    assert!(
        note.contains("not taken") && note.contains("crc32"),
        "{note}"
    );
}

#[test]
fn damaged_content_is_never_reused_by_dedup() {
    let io = Arc::new(FaultyStorage::new());
    let mut store = Store::init_with(io.clone(), small()).expect("init");
    store.begin(None).expect("begin");
    store.put(Vpn(1), &page(42)).expect("put");
    let first = store.commit(meta(1)).expect("commit");
    let mut loc = None;
    store
        .for_each_page(first.id, |_, r| {
            loc = Some(r.loc);
            Ok(())
        })
        .expect("walk");
    let loc = loc.expect("the page record");
    io.flip_bit(&format!("seg-{:08}.pss", loc.segment), loc.offset + 80, 2)
        .expect("flip");
    // The same content again: the damaged record must not be linked in.
    store.begin(None).expect("begin");
    store.put(Vpn(9), &page(42)).expect("put");
    let second = store.commit(meta(2)).expect("commit");
    assert_eq!(second.pages_written, 1, "a fresh copy is written");
    assert_eq!(
        store.read_page(second.id, Vpn(9)).expect("intact"),
        Some(page(42))
    );
    let report = store.verify(&[second.id]).expect("verify");
    assert!(report.is_clean(), "{report:?}");
    // And the next writer of that content finds the fresh copy through the dedup index.
    store.begin(None).expect("begin");
    store.put(Vpn(10), &page(42)).expect("put");
    assert_eq!(store.commit(meta(3)).expect("commit").pages_written, 0);
}

#[test]
fn origins_round_trip_and_are_capped_like_labels() {
    let io = Arc::new(FaultyStorage::new());
    let mut store = Store::init_with(io.clone(), StoreOptions::default()).expect("init");
    store.begin(None).expect("begin");
    let long = "é".repeat(2000); // 4000 bytes, cut at a character boundary
    let id = store
        .commit(SnapshotMeta {
            origin: Some(long.clone()),
            ..SnapshotMeta::default()
        })
        .expect("commit")
        .id;
    drop(store);
    let (store, _) = Store::open_with(io, Mode::Read, StoreOptions::default()).expect("open");
    let origin = store.snapshot(id).expect("info").origin.expect("origin");
    assert!(origin.len() <= pagesnap_store::MAX_LABEL && long.starts_with(&origin));
    assert!(origin.len() >= pagesnap_store::MAX_LABEL - 1);
}
