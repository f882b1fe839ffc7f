//! The second reliability pass: each test here failed on the store before it, and names the
//! finding it covers (docs/reliability.md lists them).

use pagesnap_store::fault::{FaultPlan, FaultyStorage, Intercept, Op, SplitMix64};
use pagesnap_store::{
    Mode, SnapshotId, SnapshotMeta, Storage, Store, StoreError, StoreOptions, Vpn,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

const SLOT: u64 = 4096;

mod common;
use common::{assert_holds, opts, page, Expected};

/// A store with a few snapshots; with `gc`, one is deleted and the store collected (so the
/// segments the older state named are gone).
fn sample(gc: bool) -> (Arc<FaultyStorage>, Expected) {
    sample_in(gc, pagesnap_store::FORMAT_VERSION)
}

/// [`sample`] in format `version` (2 or 3).
fn sample_in(gc: bool, version: u32) -> (Arc<FaultyStorage>, Expected) {
    let io = Arc::new(FaultyStorage::new());
    let mut store = if version == 2 {
        Store::init_format2_with(io.clone(), opts()).expect("init")
    } else {
        Store::init_with(io.clone(), opts()).expect("init")
    };
    let mut expected = Expected::new();
    let mut pages = BTreeMap::new();
    let mut parent = None;
    for s in 0..4u64 {
        store.begin(parent).expect("begin");
        for v in 0..12u64 {
            let seed = s * 100 + v;
            store.put(Vpn(v * 7 + s), &page(seed)).expect("put");
            pages.insert(v * 7 + s, page(seed));
        }
        let id = store.commit(SnapshotMeta::default()).expect("commit").id;
        expected.insert(id, pages.clone());
        parent = Some(id);
    }
    if gc {
        store.delete(&[SnapshotId(2)]).expect("delete");
        expected.remove(&SnapshotId(2));
        let r = store.gc().expect("gc");
        assert!(r.segments_removed > 0, "gc replaced the segments");
    }
    (io, expected)
}

/// Finding 1: one flipped bit in either superblock slot hid the newest commit, and verify called
/// the store clean. Every bit of both slots' used bytes and crc, and a sample of the rest.
#[test]
fn one_flipped_bit_in_either_superblock_slot_hides_nothing_and_verify_reports_it() {
    let (io, expected) = sample(false);
    let mut rng = SplitMix64(7);
    let mut bits: Vec<u64> = Vec::new();
    for slot in 0..2 {
        let base = slot * SLOT;
        bits.extend((base * 8..(base + 200) * 8).step_by(3));
        bits.extend(((base + SLOT - 4) * 8..(base + SLOT) * 8).step_by(1));
        bits.extend((0..40).map(|_| base * 8 + rng.below(SLOT * 8)));
    }
    let mut checked = 0;
    for bit in bits {
        let img = io.crash_image(0);
        img.flip_bit("superblock", bit / 8, (bit % 8) as u8)
            .expect("flip");
        let ctx = format!("bit {bit} of the superblock");
        let img = Arc::new(img);
        let (store, report) =
            Store::open_with(img.clone(), Mode::Read, opts()).expect("a reader opens");
        assert_holds(&store, &expected, &ctx);
        assert!(report.damaged_slot, "{ctx}: open reports the slot");
        let verify = store.verify(&[]).expect("verify runs");
        let slot = bit / 8 / SLOT;
        assert!(
            verify.damage.iter().any(|d| d.detail.contains("superblock")
                && d.detail.contains(&format!("slot {slot}"))
                && d.detail.contains("using slot")),
            "{ctx}: verify names the file, the slot and what it fell back to: {:?}",
            verify.damage
        );
        drop(store);
        // A writer's open rewrites the damaged slot; then verify is clean and work goes on.
        let (mut store, report) =
            Store::open_with(img.clone(), Mode::Write, opts()).expect("a writer opens");
        assert!(report.repaired_slot, "{ctx}");
        assert_holds(&store, &expected, &ctx);
        assert!(store.verify(&[]).expect("verify").is_clean(), "{ctx}");
        let last = *expected.keys().last().expect("snapshots");
        store.begin(Some(last)).expect("begin");
        store.put(Vpn(1), &page(9999)).expect("put");
        store.commit(SnapshotMeta::default()).expect("commit");
        drop(store);
        let (store, report) = Store::open_with(img, Mode::Read, opts()).expect("reopen");
        assert!(report.superblock_note.is_none() && !report.damaged_slot);
        assert_eq!(store.snapshot_ids().expect("ids").len(), expected.len() + 1);
        checked += 1;
    }
    println!("{checked} superblock bit flips checked, 0 failed");
}

/// Finding 2: after gc, one flipped bit in the newest slot made a writer's open fall back to the
/// pre-gc slot and delete every live segment as a leftover.
#[test]
fn gc_then_a_flipped_bit_in_either_slot_deletes_nothing() {
    let (io, expected) = sample(true);
    let files_before: Vec<String> = io.list().expect("list");
    for slot in 0..2u64 {
        for byte in [16u64, 140, 150, 300, 4000] {
            let img = Arc::new(io.crash_image(1));
            img.flip_bit("superblock", slot * SLOT + byte, 3)
                .expect("flip");
            let ctx = format!("slot {slot}, byte {byte}");
            let (store, report) =
                Store::open_with(img.clone(), Mode::Write, opts()).expect("the writer opens");
            assert!(report.quarantined.is_empty(), "{ctx}: nothing to set aside");
            assert_holds(&store, &expected, &ctx);
            assert!(store.verify(&[]).expect("verify").is_clean(), "{ctx}");
            drop(store);
            assert_eq!(
                img.list().expect("list"),
                files_before,
                "{ctx}: no file removed"
            );
        }
    }
}

/// Recovery never deletes what it cannot prove is garbage: a missing listed segment fails the
/// open and changes nothing; unlisted segments found while a slot is damaged are set aside.
#[test]
fn a_missing_segment_fails_the_open_and_unlisted_files_beside_damage_are_quarantined() {
    let (io, expected) = sample(false);
    let img = Arc::new(io.crash_image(2));
    let victim = img
        .list()
        .expect("list")
        .into_iter()
        .find(|n| n.starts_with("seg-"))
        .expect("a segment");
    let saved = img.contents(&victim).expect("contents");
    img.remove(&victim).expect("remove");
    let before = img.list().expect("list");
    let e = Store::open_with(img.clone(), Mode::Write, opts()).expect_err("missing segment");
    let msg = e.to_string();
    assert!(
        msg.contains(&victim) && msg.contains("missing") && msg.contains("nothing was changed"),
        "{msg}"
    );
    assert_eq!(img.list().expect("list"), before, "nothing removed");
    // Put it back: the store is whole again.
    img.create(&victim).expect("create");
    img.write(&victim, 0, &saved).expect("write");
    let (store, _) = Store::open_with(img.clone(), Mode::Read, opts()).expect("open");
    assert_holds(&store, &expected, "segment restored");
    drop(store);

    // An unlisted segment next to a damaged slot is renamed, not removed.
    img.create("seg-00099999.pss").expect("create");
    img.write("seg-00099999.pss", 0, b"PGSNAPSG")
        .expect("write");
    img.flip_bit("superblock", 20, 1).expect("flip");
    let (store, report) = Store::open_with(img.clone(), Mode::Write, opts()).expect("open");
    assert_eq!(report.quarantined.len(), 1, "{report:?}");
    let q = &report.quarantined[0];
    assert!(
        q.starts_with("quarantine-") && q.ends_with("seg-00099999.pss"),
        "{q}"
    );
    assert!(img.contents(q).is_some());
    assert!(img.contents("seg-00099999.pss").is_none());
    assert_holds(&store, &expected, "quarantine");
}

type Session = Box<dyn FnOnce() + Send>;

/// `inner`, whose first `try_lock` first runs `session`: another writer's whole session, racing
/// ours.
fn racing(inner: Arc<FaultyStorage>, session: Session) -> Arc<Intercept> {
    let session = Mutex::new(Some(session));
    Arc::new(Intercept::new(inner, move |op| {
        if let Op::TryLock(_) = op {
            let session = session.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(run) = session {
                run();
            }
        }
        Ok(())
    }))
}

/// Finding 3: a second writer read the superblock and listed the directory before it took the
/// lock; a writer that committed (creating segments) and exited in that window had its segments
/// deleted as leftovers and its slot reused.
#[test]
fn a_writer_that_commits_while_another_waits_for_the_lock_loses_nothing() {
    let (io, mut expected) = sample(false);
    let other = io.clone();
    let expected_other = Arc::new(Mutex::new(None));
    let record = expected_other.clone();
    let racing = racing(
        io.clone(),
        Box::new(move || {
            let (mut store, _) =
                Store::open_with(other, Mode::Write, opts()).expect("the other writer");
            let parent = store.snapshot_ids().expect("ids").last().copied();
            store.begin(parent).expect("begin");
            // Enough pages to need new segment files.
            for v in 0..40u64 {
                store.put(Vpn(1000 + v), &page(5000 + v)).expect("put");
            }
            let id = store.commit(SnapshotMeta::default()).expect("commit").id;
            *record.lock().expect("record") = Some(id);
        }),
    );
    let (mut store, _) = Store::open_with(racing, Mode::Write, opts()).expect("our writer");
    let theirs = expected_other
        .lock()
        .expect("record")
        .expect("the other writer committed");
    let mut pages = expected.values().last().cloned().expect("pages");
    for v in 0..40u64 {
        pages.insert(1000 + v, page(5000 + v));
    }
    expected.insert(theirs, pages.clone());
    store.begin(Some(theirs)).expect("begin");
    store.put(Vpn(1), &page(7777)).expect("put");
    let ours = store.commit(SnapshotMeta::default()).expect("commit").id;
    assert_ne!(ours, theirs, "ids are not reused");
    pages.insert(1, page(7777));
    expected.insert(ours, pages);
    drop(store);
    let (store, _) = Store::open_with(io, Mode::Read, opts()).expect("reopen");
    assert_holds(&store, &expected, "after the race");
    assert!(store.verify(&[]).expect("verify").is_clean());
}

/// Finding 3, init: `init` checked for a store before it took the lock, then removed the files of
/// a store created in between as leftovers of an interrupted init.
#[test]
fn init_racing_another_init_removes_nothing() {
    let io = Arc::new(FaultyStorage::new());
    let other = io.clone();
    let racing = racing(
        io.clone(),
        Box::new(move || {
            let mut store = Store::init_with(other, opts()).expect("the other init");
            store.begin(None).expect("begin");
            store.put(Vpn(3), &page(3)).expect("put");
            store.commit(SnapshotMeta::default()).expect("commit");
        }),
    );
    let e = Store::init_with(racing, opts()).expect_err("a store is there now");
    assert!(matches!(e, StoreError::AlreadyExists { .. }), "{e}");
    let (store, _) = Store::open_with(io, Mode::Read, opts()).expect("open");
    assert_eq!(
        store.read_page(SnapshotId(1), Vpn(3)).expect("read"),
        Some(page(3))
    );
}

/// Finding 8: a failed segment read is an error naming the file and offset (with memory maps, a
/// segment cut short under a reader was a SIGBUS that killed the process).
#[test]
fn failed_segment_reads_are_errors_naming_file_and_offset() {
    let dir = tempfile::tempdir().expect("tmp");
    // Plain pages, so page 9 lies past the cut below (a compressed frame holds all ten).
    let plain = StoreOptions {
        compression: pagesnap_store::Compression::None,
        ..opts()
    };
    let mut store = Store::init(dir.path(), plain).expect("init");
    store.begin(None).expect("begin");
    for v in 0..10u64 {
        store.put(Vpn(v), &page(v)).expect("put");
    }
    let id = store.commit(SnapshotMeta::default()).expect("commit").id;
    drop(store);
    let (reader, _) = Store::open(dir.path(), Mode::Read).expect("reader");
    assert_eq!(reader.read_page(id, Vpn(0)).expect("read"), Some(page(0)));
    // Something outside pagesnap cuts the segment short under the open reader.
    let seg = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .find(|p| p.to_string_lossy().ends_with(".pss"))
        .expect("segment");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .and_then(|f| f.set_len(600))
        .expect("truncate");
    let e = reader.read_page(id, Vpn(9)).expect_err("past the end");
    let msg = e.to_string();
    assert!(
        msg.contains(".pss") && msg.contains("offset"),
        "names the file and offset: {msg}"
    );

    // An I/O error from the device, in memory: a `Read` error with the offset.
    let (io, expected) = sample(false);
    let img = Arc::new(io.crash_image(0));
    let (store, _) = Store::open_with(img.clone(), Mode::Read, opts()).expect("open");
    img.set_plan(FaultPlan {
        fail_at: Some((0, 5)),
        fail_count: 1000,
        fail_only: None,
        ..FaultPlan::default()
    });
    let (id, pages) = expected.iter().next().expect("a snapshot");
    let vpn = *pages.keys().next().expect("a page");
    let e = store.read_page(*id, Vpn(vpn)).expect_err("EIO");
    let msg = e.to_string();
    assert!(
        msg.contains("offset") && msg.contains("I/O error"),
        "clear: {msg}"
    );
}

/// Finding 8: reads run in parallel — many threads read one store through one backend, and every
/// read returns the right bytes (the old backend serialised them behind one mutex).
#[test]
fn parallel_readers_read_the_right_bytes() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut store = Store::init(dir.path(), opts()).expect("init");
    store.begin(None).expect("begin");
    for v in 0..256u64 {
        store.put(Vpn(v), &page(v)).expect("put");
    }
    let id = store.commit(SnapshotMeta::default()).expect("commit").id;
    drop(store);
    let (reader, _) = Store::open(dir.path(), Mode::Read).expect("reader");
    let reader = Arc::new(reader);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let reader = reader.clone();
            s.spawn(move || {
                for round in 0..20u64 {
                    for v in (t..256).step_by(4) {
                        let v = (v + round * 13) % 256;
                        assert_eq!(reader.read_page(id, Vpn(v)).expect("read"), Some(page(v)));
                    }
                }
            });
        }
    });
}

/// Finding 10: a store was limited to 900 segment files (the superblock listed each id), and the
/// segment size was not recorded, so a reopen with other options wrote differently-sized segments.
#[test]
fn more_than_900_segments_and_the_segment_size_is_kept() {
    let io = Arc::new(FaultyStorage::new());
    let tiny = StoreOptions {
        page_size: 512,
        segment_bytes: 1024,
        preallocate: 1024,
        // Plain pages: one or two a segment.
        compression: pagesnap_store::Compression::None,
        ..StoreOptions::default()
    };
    let mut store = Store::init_with(io.clone(), tiny).expect("init");
    store.begin(None).expect("begin");
    for v in 0..1000u64 {
        store.put(Vpn(v), &page(v)).expect("put");
    }
    let id = store.commit(SnapshotMeta::default()).expect("commit").id;
    drop(store);
    let segments = |io: &FaultyStorage| {
        io.list()
            .expect("list")
            .iter()
            .filter(|n| n.starts_with("seg-"))
            .count()
    };
    let n = segments(&io);
    assert!(n > 1000, "{n} segments");
    // Reopened with the default options (256 MiB segments): the store's own size is used.
    let (mut store, _) =
        Store::open_with(io.clone(), Mode::Write, StoreOptions::default()).expect("reopen");
    store.begin(Some(id)).expect("begin");
    for v in 0..10u64 {
        store.put(Vpn(5000 + v), &page(5000 + v)).expect("put");
    }
    store.commit(SnapshotMeta::default()).expect("commit");
    assert!(
        segments(&io) >= n + 10,
        "new records went to 1 KiB segments"
    );
    for v in [0u64, 500, 999] {
        assert_eq!(store.read_page(id, Vpn(v)).expect("read"), Some(page(v)));
    }
    assert!(store.verify(&[]).expect("verify").is_clean());
}

/// Finding 5's store side: a pinned snapshot is refused by delete, and nothing changes.
#[test]
fn pinned_snapshots_are_not_deleted() {
    let (io, expected) = sample(false);
    let (mut store, _) = Store::open_with(io, Mode::Write, opts()).expect("open");
    let ids: Vec<SnapshotId> = expected.keys().copied().collect();
    store.pin(ids[1]);
    let generation = store.generation();
    let e = store.delete(&[ids[0], ids[1]]).expect_err("pinned");
    assert!(matches!(e, StoreError::Pinned(id) if id == ids[1]), "{e}");
    assert_eq!(store.generation(), generation, "nothing committed");
    assert_holds(&store, &expected, "after a refused delete");
    // Pins are counted: another holder's pin and unpin do not lift the first.
    store.pin(ids[1]);
    store.unpin(ids[1]);
    assert!(matches!(
        store.delete(&[ids[1]]),
        Err(StoreError::Pinned(_))
    ));
    store.unpin(ids[1]);
    store.delete(&[ids[1]]).expect("unpinned");
}

/// `inner`, whose superblock write number `writes_left` (counted down; 0: none) lands half and
/// then panics: a panic in the backend while a commit publishes.
fn panicking_on_superblock(inner: Arc<FaultyStorage>) -> (Arc<Intercept>, Arc<Mutex<u32>>) {
    let writes_left = Arc::new(Mutex::new(0u32));
    let left = writes_left.clone();
    let target = inner.clone();
    let io = Intercept::new(inner, move |op| {
        if let Op::Write {
            name: "superblock",
            offset,
            data,
        } = *op
        {
            let mut left = left.lock().unwrap_or_else(|e| e.into_inner());
            if *left == 1 {
                *left = 0;
                let _ = target.write("superblock", offset, &data[..data.len() / 2]);
                panic!("backend panics while the superblock is written");
            }
            *left = left.saturating_sub(1);
        }
        Ok(())
    });
    (Arc::new(io), writes_left)
}

/// A panic out of the backend during either superblock slot write (format 2 wrote them in every
/// commit): the writer must not roll back over records a half-written slot may name. The next
/// change first reads back which state the superblock holds and repairs it; every committed
/// snapshot survives, the interrupted one is whole or absent, and work goes on.
#[test]
fn a_panic_while_the_superblock_is_written_is_recovered_from_before_the_next_change() {
    for nth in 1..=2u32 {
        let (io, expected) = sample_in(false, 2);
        let (panicky, writes_left) = panicking_on_superblock(io.clone());
        let (mut store, _) = Store::open_with(panicky, Mode::Write, opts()).expect("open");
        let last = *expected.keys().last().expect("snapshots");
        store.begin(Some(last)).expect("begin");
        store.put(Vpn(3), &page(4242)).expect("put");
        *writes_left.lock().expect("plan") = nth;
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            store.commit(SnapshotMeta::default())
        }));
        assert!(panicked.is_err(), "slot write {nth}: the backend panicked");
        store.abort();
        // Work goes on in the same handle: the commit that panicked is whole or absent.
        let ids = store.snapshot_ids().expect("ids");
        assert!(ids.len() == expected.len() || ids.len() == expected.len() + 1);
        store.begin(Some(last)).expect("begin after recovery");
        store.put(Vpn(4), &page(4343)).expect("put");
        let next = store.commit(SnapshotMeta::default()).expect("commit").id;
        assert_eq!(
            store.read_page(next, Vpn(4)).expect("read"),
            Some(page(4343))
        );
        drop(store);
        let (store, _) = Store::open_with(io.clone(), Mode::Write, opts()).expect("reopen");
        for (id, pages) in &expected {
            let mut got = BTreeMap::new();
            store
                .for_each_page(*id, |v, r| {
                    got.insert(v.0, store.read_ref(r)?);
                    Ok(())
                })
                .expect("committed snapshot reads back");
            assert_eq!(&got, pages, "slot write {nth}: snapshot {id}");
        }
        assert!(store.verify(&[]).expect("verify").is_clean());
    }
}

/// One flipped bit in any record of either catalog copy — its nodes, the manifests — hides no
/// snapshot: they list and restore through the other copy, and verify reports the damage.
#[test]
fn a_flipped_bit_in_any_catalog_record_hides_nothing() {
    for gc in [false, true] {
        let (io, expected) = sample(gc);
        let records = {
            let (store, _) = Store::open_with(io.clone(), Mode::Read, opts()).expect("open");
            store.catalog_records().expect("catalog records")
        };
        // Each commit record twice (format 3), back to the last checkpoint (gc writes one).
        assert!(records.len() >= 2, "{records:?}");
        for loc in records {
            let img = Arc::new(io.crash_image(0));
            let at = loc.offset + u64::from(loc.len) / 2;
            img.flip_bit(&format!("seg-{:08}.pss", loc.segment), at, 5)
                .expect("flip");
            let ctx = format!("gc {gc}, record {loc:?}");
            let (store, report) = Store::open_with(img.clone(), Mode::Read, opts()).expect("opens");
            assert!(
                report.catalog_damage.is_none() && report.damaged.is_empty(),
                "{ctx}"
            );
            assert_holds(&store, &expected, &ctx);
            let v = store.verify(&[]).expect("verify");
            assert!(
                v.damage
                    .iter()
                    .any(|d| d.snapshot.is_none() && d.detail.contains("commit record")),
                "{ctx}: {v:?}"
            );
        }
    }
}

/// Format 3: a panic out of the backend while a commit syncs its segment (its commit point).
/// The commit is whole or absent; the next change first moves the superblock generation on, so
/// the abandoned commit's bytes can never count later; every committed snapshot survives.
#[test]
fn a_panic_while_a_commit_syncs_is_recovered_from_before_the_next_change() {
    let (io, expected) = sample(false);
    let armed = Arc::new(Mutex::new(false));
    let a = armed.clone();
    let panicky = Arc::new(Intercept::new(io.clone(), move |op| {
        if let Op::Sync(name) = *op {
            let mut armed = a.lock().unwrap_or_else(|e| e.into_inner());
            if *armed && name.starts_with("seg-") {
                *armed = false;
                panic!("backend panics while a segment is synced");
            }
        }
        Ok(())
    }));
    let (mut store, _) = Store::open_with(panicky, Mode::Write, opts()).expect("open");
    let last = *expected.keys().last().expect("snapshots");
    let generation = store.generation();
    store.begin(Some(last)).expect("begin");
    store.put(Vpn(3), &page(4242)).expect("put");
    *armed.lock().expect("arm") = true;
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        store.commit(SnapshotMeta::default())
    }));
    assert!(panicked.is_err(), "the backend panicked");
    store.abort();
    store.begin(Some(last)).expect("begin after the panic");
    assert!(
        store.generation() > generation,
        "the generation moved on before the next commit"
    );
    store.put(Vpn(4), &page(4343)).expect("put");
    let next = store.commit(SnapshotMeta::default()).expect("commit").id;
    drop(store);
    let (store, _) = Store::open_with(io.clone(), Mode::Write, opts()).expect("reopen");
    let mut with_next = expected.clone();
    let mut pages = expected[&last].clone();
    pages.insert(4, page(4343));
    with_next.insert(next, pages);
    assert_holds(&store, &with_next, "after a panic in a commit's sync");
    assert_eq!(
        store.read_page(next, Vpn(4)).expect("read"),
        Some(page(4343))
    );
    assert!(store.verify(&[]).expect("verify").is_clean());
}
