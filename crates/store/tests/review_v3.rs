//! Hostile review of format 3 (the commit log): each test shows one finding.

use pagesnap_store::fault::{FaultyStorage, Intercept, Op};
use pagesnap_store::{Mode, SnapshotId, SnapshotMeta, Storage, Store, Vpn};
use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

mod common;
use common::{assert_holds, opts, page, Expected};

fn ioerr() -> io::Error {
    io::Error::from_raw_os_error(5)
}

/// Finding 1: a put whose segment roll could not write its hint (the sync of the full segment
/// failed) returns Err but leaves the writer in the new segment, unnamed by any superblock, and
/// with a range crc that still covers the old segment's bytes. A commit after it returns Ok; after
/// a crash (before any later hint) the commit is gone and open deletes its segment as a leftover.
#[test]
fn a_commit_after_a_put_whose_roll_hint_failed_survives_a_crash() {
    // Plain pages: the roll comes inside a put. Compressed: inside the put that sends a frame,
    // or at the commit (then the commit is refused).
    roll_hint_fails(pagesnap_store::Compression::None);
    roll_hint_fails(pagesnap_store::Compression::Auto);
}

fn roll_hint_fails(compression: pagesnap_store::Compression) {
    let opts = || pagesnap_store::StoreOptions {
        compression,
        ..opts()
    };
    let inner = Arc::new(FaultyStorage::new());
    let armed = Arc::new(AtomicBool::new(false));
    let fail = armed.clone();
    let io = Arc::new(Intercept::new(inner.clone(), move |op| {
        if let Op::Sync(name) = op {
            if name.starts_with("seg-") && fail.swap(false, Ordering::SeqCst) {
                return Err(ioerr());
            }
        }
        Ok(())
    }));
    let mut store = Store::init_with(io.clone(), opts()).expect("init");
    let mut expected = Expected::new();
    store.begin(None).expect("begin");
    let mut pages = BTreeMap::new();
    for v in 0..4u64 {
        store.put(Vpn(v), &page(v)).expect("put");
        pages.insert(v, page(v));
    }
    let first = store.commit(SnapshotMeta::default()).expect("commit 1").id;
    expected.insert(first, pages.clone());
    store.begin(Some(first)).expect("begin 2");
    armed.store(true, Ordering::SeqCst);
    let mut failed = 0;
    for v in 10..40u64 {
        // A caller that retries a failed put.
        let mut tries = 0;
        loop {
            match store.put(Vpn(v), &page(v)) {
                Ok(()) => break,
                Err(e) => {
                    eprintln!("put {v} failed: {e}");
                    failed += 1;
                    tries += 1;
                    assert!(tries < 3, "put keeps failing: {e}");
                }
            }
        }
        pages.insert(v, page(v));
        if failed > 0 {
            break; // commit right after the failed put was retried
        }
    }
    if compression == pagesnap_store::Compression::None {
        assert_eq!(failed, 1, "one put failed (its roll's hint)");
    }
    match store.commit(SnapshotMeta::default()) {
        Ok(r) => {
            eprintln!("commit ok: {r:?}");
            expected.insert(r.id, pages.clone());
        }
        // Refusing the commit is also a correct outcome.
        Err(e) => eprintln!("commit refused after the failed put: {e}"),
    }
    // The machine crashes now, before any later hint (no clean close).
    let image = Arc::new(inner.crash_image(1));
    std::mem::forget(store);
    let (store, report) = Store::open_with(image, Mode::Write, opts()).expect("reopen");
    assert_holds(&store, &expected, &format!("after the crash ({report:?})"));
}

/// A store with `n` snapshots on one another, closed cleanly; what each holds.
fn sample(n: u64) -> (Arc<FaultyStorage>, Expected) {
    let io = Arc::new(FaultyStorage::new());
    let mut store = Store::init_with(io.clone(), opts()).expect("init");
    let mut expected = Expected::new();
    let mut pages = BTreeMap::new();
    let mut parent = None;
    for s in 0..n {
        store.begin(parent).expect("begin");
        for v in 0..6u64 {
            store.put(Vpn(v * 3 + s), &page(s * 100 + v)).expect("put");
            pages.insert(v * 3 + s, page(s * 100 + v));
        }
        let id = store.commit(SnapshotMeta::default()).expect("commit").id;
        expected.insert(id, pages.clone());
        parent = Some(id);
    }
    drop(store);
    (io, expected)
}

/// Finding 3 of the review: `publish_hint` wrote the second superblock slot even when the write of
/// the first failed. A failed write may have torn its slot (an EIO mid-sector); overwriting the
/// other slot, the only good copy, then left a crash during that write with no valid slot at all:
/// the whole store gone. Now, as in format 2, the other slot is left alone and the writer is in
/// doubt.
#[test]
fn a_hint_never_risks_the_only_good_superblock_slot() {
    let (inner, expected) = sample(3);
    let writes = Arc::new(std::sync::Mutex::new(0u32));
    let count = writes.clone();
    let target = inner.clone();
    let io = Arc::new(Intercept::new(inner.clone(), move |op| {
        if let Op::Write {
            name: "superblock",
            offset,
            data,
        } = *op
        {
            let mut n = count.lock().unwrap_or_else(|e| e.into_inner());
            *n += 1;
            // Both writes tear: the first fails with EIO after half of it reached the media,
            // the second is cut by a crash (half of it durable).
            let _ = target.write("superblock", offset, &data[..data.len() / 2]);
            let _ = target.sync("superblock");
            return Err(ioerr());
        }
        Ok(())
    }));
    let opened = Store::open_with(io, Mode::Write, opts());
    let n = *writes.lock().unwrap_or_else(|e| e.into_inner());
    drop(opened);
    // The hint at the writer's open wrote the first slot (failed, torn) and stopped there: the
    // crash that would have hit the second write finds it untouched.
    assert_eq!(n, 1, "only the slot whose write failed was written");
    let image = Arc::new(inner.crash_image(0));
    let (store, _) = Store::open_with(image, Mode::Read, opts())
        .expect("the store still opens after a failed hint and a crash");
    assert_holds(&store, &expected, "after the failed hint");
}

/// Accounting: right after gc nothing is leaked, whatever the snapshots shared, deleted, removed
/// or rewrote; verify is clean; a second gc frees nothing; reopening agrees.
#[test]
fn gc_leaves_no_leak_across_random_workloads() {
    for seed in 0..40u64 {
        let mut r = pagesnap_store::fault::SplitMix64(seed);
        let io = Arc::new(FaultyStorage::new());
        let mut store = Store::init_with(io.clone(), opts()).expect("init");
        let mut expected = Expected::new();
        let mut latest: Option<(SnapshotId, BTreeMap<u64, Vec<u8>>)> = None;
        for step in 0..30 {
            match r.below(10) {
                0..=5 => {
                    let parent = if r.below(4) == 0 {
                        None
                    } else {
                        latest.clone()
                    };
                    let mut pages = parent.as_ref().map(|p| p.1.clone()).unwrap_or_default();
                    store.begin(parent.map(|p| p.0)).expect("begin");
                    for _ in 0..r.below(20) {
                        let v = r.below(60);
                        if r.below(5) == 0 {
                            store.remove(Vpn(v)).expect("remove");
                            pages.remove(&v);
                        } else {
                            let p = page(r.below(25));
                            store.put(Vpn(v), &p).expect("put");
                            pages.insert(v, p);
                        }
                    }
                    let id = store.commit(SnapshotMeta::default()).expect("commit").id;
                    expected.insert(id, pages.clone());
                    latest = Some((id, pages));
                }
                6..=7 if expected.len() > 1 => {
                    let k = r.below(expected.len() as u64) as usize;
                    let id = *expected.keys().nth(k).expect("k");
                    store.delete(&[id]).expect("delete");
                    expected.remove(&id);
                    if latest.as_ref().is_some_and(|l| l.0 == id) {
                        latest = expected.iter().last().map(|(k, v)| (*k, v.clone()));
                    }
                }
                _ => {
                    store.gc().expect("gc");
                    let c = store.check().expect("check");
                    assert_eq!(c.leaked_bytes, 0, "seed {seed} step {step}: {c:?}");
                    let again = store.gc().expect("gc again");
                    assert_eq!(again.bytes_freed, 0, "seed {seed} step {step}: {again:?}");
                    let v = store.verify(&[]).expect("verify");
                    assert!(v.damage.is_empty(), "seed {seed} step {step}: {v:?}");
                }
            }
        }
        assert_holds(&store, &expected, &format!("seed {seed}"));
        drop(store);
        let (mut store, _) = Store::open_with(io, Mode::Write, opts()).expect("reopen");
        assert_holds(&store, &expected, &format!("seed {seed} reopened"));
        store.gc().expect("gc after reopen");
        let c = store.check().expect("check");
        assert_eq!(c.leaked_bytes, 0, "seed {seed} after reopen: {c:?}");
    }
}

/// Finding 3, its cost: a hint inside a commit drains the writer and syncs the segment and both
/// superblock slots, so a commit writes one only every 128 MiB (the scan window, 192 MiB, less
/// a margin for the records appended after it), not every 64 MiB. A commit of 140 MiB into one
/// segment writes exactly one while it appends (two slot writes): none would lose it to a crash
/// after a failed hint (the test above), two would be the old, dearer spacing. That hint syncs
/// nothing of the segment (a sync there drains the writes in flight): the commit syncs it
/// before its record, then after. Its segment grows a few times, doubling up to 16 MiB steps, for the same
/// reason.
#[test]
fn a_large_commit_writes_one_hint_per_128_mib() {
    const BIG: usize = 1 << 20;
    let o = pagesnap_store::StoreOptions {
        page_size: BIG as u32,
        segment_bytes: 1 << 30,
        // Plain pages: 140 MiB appended (these pages would compress to a few).
        compression: pagesnap_store::Compression::None,
        ..pagesnap_store::StoreOptions::default()
    };
    let big = |seed: u64| {
        let mut p = vec![0u8; BIG];
        for (i, c) in p.chunks_mut(8).enumerate() {
            c.copy_from_slice(&(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64).to_le_bytes());
        }
        p
    };
    let slot_writes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let segment_syncs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (count, grown, synced) = (slot_writes.clone(), sizes.clone(), segment_syncs.clone());
    let io = Arc::new(Intercept::new(Arc::new(FaultyStorage::new()), move |op| {
        match op {
            Op::Write {
                name: "superblock", ..
            } => {
                count.fetch_add(1, Ordering::SeqCst);
            }
            Op::SetLen(_, len) => grown.lock().expect("sizes").push(*len),
            Op::Sync(name) if name.starts_with("seg-") => {
                synced.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
        Ok(())
    }));
    let mut store = Store::init_with(io, o).expect("init");
    store.begin(None).expect("begin");
    store.put(Vpn(0), &big(0)).expect("put");
    let first = store.commit(SnapshotMeta::default()).expect("commit 1").id;
    let before = slot_writes.load(Ordering::SeqCst);
    let syncs_before = segment_syncs.load(Ordering::SeqCst);
    sizes.lock().expect("sizes").clear();
    store.begin(Some(first)).expect("begin 2");
    for v in 1..=140u64 {
        store.put(Vpn(v), &big(v)).expect("put");
    }
    assert_eq!(
        slot_writes.load(Ordering::SeqCst) - before,
        2,
        "one hint (both slots) while a commit appends 140 MiB"
    );
    assert_eq!(
        segment_syncs.load(Ordering::SeqCst),
        syncs_before,
        "the hint inside the commit synced the segment"
    );
    // The segment is pre-sized to about 8 MiB, then grows by doubling up to 16 MiB steps (each
    // growth drains the writes in flight): to about 16, 32, 48 … 144 MiB — not in 8 MiB steps
    // (17 growths), nor by more than 16 MiB (every open reads the zeros past the last record).
    let sizes = sizes.lock().expect("sizes").clone();
    let steps: Vec<u64> = sizes.windows(2).map(|w| (w[1] - w[0]) >> 20).collect();
    assert_eq!(steps, vec![16; 8], "growth steps in MiB: {sizes:?}");
    assert!(sizes[0] >> 20 == 16 && sizes[8] >= 140 << 20, "{sizes:?}");
    let second = store.commit(SnapshotMeta::default()).expect("commit 2").id;
    assert_eq!(
        segment_syncs.load(Ordering::SeqCst) - syncs_before,
        2,
        "two segment syncs for the commit: before its record, and after"
    );
    assert_eq!(store.snapshot_ids().expect("ids"), vec![first, second]);
}

/// Finding 3: open scans at most MAX_SCAN (192 MiB) after the hint, and the hint is only
/// rewritten *after* a commit (or at a segment roll). A single commit of more than that into one
/// segment (the default segment is 256 MiB) whose post-commit hint fails returns Ok, yet after a
/// crash its record lies past the scan window and the snapshot is gone.
#[test]

fn a_commit_larger_than_the_scan_window_survives_a_failed_hint_and_a_crash() {
    const BIG: usize = 1 << 20;
    let o = pagesnap_store::StoreOptions {
        page_size: BIG as u32,
        ..pagesnap_store::StoreOptions::default()
    };
    let big = |seed: u64| {
        let mut p = vec![0u8; BIG];
        for (i, c) in p.chunks_mut(8).enumerate() {
            c.copy_from_slice(&(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64).to_le_bytes());
        }
        p
    };
    let inner = Arc::new(FaultyStorage::new());
    let armed = Arc::new(AtomicBool::new(false));
    let fail = armed.clone();
    let io = Arc::new(Intercept::new(inner.clone(), move |op| {
        if let Op::Write {
            name: "superblock", ..
        } = op
        {
            if fail.load(Ordering::SeqCst) {
                return Err(ioerr());
            }
        }
        Ok(())
    }));
    let mut store = Store::init_with(io, o).expect("init");
    store.begin(None).expect("begin");
    store.put(Vpn(0), &big(0)).expect("put");
    let first = store.commit(SnapshotMeta::default()).expect("commit 1").id;
    store.begin(Some(first)).expect("begin 2");
    for v in 1..=200u64 {
        store.put(Vpn(v), &big(v)).expect("put");
    }
    armed.store(true, Ordering::SeqCst);
    let second = store
        .commit(SnapshotMeta::default())
        .expect("commit 2 returns Ok")
        .id;
    let image = Arc::new(inner.crash_image(1));
    std::mem::forget(store);
    let (store, report) = Store::open_with(image, Mode::Read, o).expect("reopen");
    assert_eq!(
        store.snapshot_ids().expect("ids"),
        vec![first, second],
        "{report:?}"
    );
}

/// Bytes read from segment files, counted through an [`Intercept`]; and a switch that makes the
/// next read of a segment's tail (1 MiB or more) fail as a read past a file's (new) end does.
struct ReadCount {
    bytes: std::sync::atomic::AtomicU64,
    eof_once: AtomicBool,
}

fn counted(inner: Arc<FaultyStorage>) -> (Arc<Intercept>, Arc<ReadCount>) {
    let count = Arc::new(ReadCount {
        bytes: std::sync::atomic::AtomicU64::new(0),
        eof_once: AtomicBool::new(false),
    });
    let c = count.clone();
    let io = Arc::new(Intercept::new(inner, move |op| {
        if let Op::Read { name, len, .. } = op {
            if name.starts_with("seg-") {
                // The scan's window (the tail past the hint) is the only read this long.
                if *len >= 1 << 20 && c.eof_once.swap(false, Ordering::SeqCst) {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
                }
                c.bytes.fetch_add(*len as u64, Ordering::SeqCst);
            }
        }
        Ok(())
    }));
    (io, count)
}

/// Review of the segment growth: open scans the active segment from the hint to the file's end,
/// so the zeros a segment was grown by are read by every open: unbounded doubling left 57 MiB
/// past a 70 MiB commit. Steps are now at most 16 MiB, a writer trims the tail when it closes,
/// and a scan whose read meets a segment trimmed meanwhile (a writer rolling to a new segment,
/// or closing) reads the window again.
#[test]
fn opens_read_at_most_one_growth_step_of_zeros_and_none_after_a_clean_close() {
    const BIG: usize = 1 << 20;
    let o = pagesnap_store::StoreOptions {
        page_size: BIG as u32,
        compression: pagesnap_store::Compression::None,
        ..pagesnap_store::StoreOptions::default()
    };
    let inner = Arc::new(FaultyStorage::new());
    let (io, count) = counted(inner.clone());
    let mut store = Store::init_with(io.clone(), o).expect("init");
    store.begin(None).expect("begin");
    for v in 0..70u64 {
        let mut p = vec![0u8; BIG];
        for (i, c) in p.chunks_mut(8).enumerate() {
            c.copy_from_slice(&(v << 32 | i as u64).to_le_bytes());
        }
        store.put(Vpn(v), &p).expect("put");
    }
    let id = store.commit(SnapshotMeta::default()).expect("commit").id;
    let open_reads = || {
        count.bytes.store(0, Ordering::SeqCst);
        let (reader, _) = Store::open_with(io.clone(), Mode::Read, o).expect("open a reader");
        assert_eq!(reader.snapshot_ids().expect("ids"), vec![id]);
        count.bytes.load(Ordering::SeqCst)
    };
    let live = open_reads();
    assert!(
        live <= 17 << 20,
        "a reader beside the writer read {live} bytes"
    );
    // The segment trimmed between the scan's length and its read: the first read of the window
    // fails as a read past the end does, and the scan reads again.
    count.eof_once.store(true, Ordering::SeqCst);
    open_reads();
    assert!(
        !count.eof_once.load(Ordering::SeqCst),
        "the scan met the short read"
    );
    drop(store);
    let closed = open_reads();
    assert!(
        closed < 1 << 20,
        "a reader after a clean close read {closed} bytes"
    );
}
