//! Superblock writes that fail or land in one slot only, and damage beside them. Found by a
//! hostile review of the second reliability pass; each test failed before its fix.

use pagesnap_store::fault::{FaultyStorage, Intercept, Op};
use pagesnap_store::{
    Compression, Mode, SnapshotId, SnapshotMeta, Storage, Store, StoreOptions, Vpn,
};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

mod common;
use common::{opts, page, pages_of};

/// What the scripted backend does to superblock operations.
#[derive(Default)]
struct Script {
    /// Superblock syncs still to fail with EIO.
    fail_syncs: u32,
    /// The superblock write (counted from 1) to fail with EIO; 0: none.
    fail_write: u32,
    /// After this many more superblock writes, every superblock write panics.
    panic_after: Option<u32>,
    /// Every superblock write at this offset fails with EIO (a bad sector under one slot).
    bad_offset: Option<u64>,
    /// Capture crash images just before the next superblock write, or just after it lands.
    capture_before: bool,
    capture_after: bool,
    images: Vec<FaultyStorage>,
    /// Offsets of superblock writes, in order.
    log: Vec<u64>,
    /// At the next superblock sync, run a reader's verify first (a concurrent `pagesnap verify`).
    verify_at_sync: bool,
    verify_clean: Option<Result<bool, String>>,
}

type Shared = Arc<Mutex<Script>>;

fn lock(script: &Shared) -> std::sync::MutexGuard<'_, Script> {
    script.lock().unwrap_or_else(|e| e.into_inner())
}

/// An in-memory store directory, the backend the store uses on it (superblock operations go as
/// the script says), and the script.
fn scripted() -> (Arc<FaultyStorage>, Arc<Intercept>, Shared) {
    let inner = Arc::new(FaultyStorage::new());
    let script: Shared = Arc::default();
    let (s, target) = (script.clone(), inner.clone());
    let images =
        move |target: &FaultyStorage| (0..64).map(|seed| target.crash_image(seed)).collect();
    let before = move |op: &Op<'_>| -> io::Result<()> {
        let mut s = lock(&s);
        match *op {
            Op::Write {
                name: "superblock",
                offset,
                ..
            } => {
                s.log.push(offset);
                match s.panic_after {
                    Some(0) => {
                        drop(s);
                        panic!("backend panics on a superblock write");
                    }
                    Some(n) => s.panic_after = Some(n - 1),
                    None => {}
                }
                if s.capture_before {
                    s.capture_before = false;
                    s.images = images(&target);
                }
                if s.bad_offset == Some(offset) {
                    return Err(io::Error::from_raw_os_error(5));
                }
                if s.fail_write > 0 {
                    s.fail_write -= 1;
                    if s.fail_write == 0 {
                        return Err(io::Error::from_raw_os_error(5));
                    }
                }
            }
            Op::Sync("superblock") => {
                if s.verify_at_sync {
                    s.verify_at_sync = false;
                    // A reader on the same files, as a concurrent `pagesnap verify` would be.
                    let reader = Arc::new((*target).clone());
                    s.verify_clean = Some(
                        Store::open_with(reader, Mode::Read, opts())
                            .and_then(|(st, _)| st.verify(&[]))
                            .map(|v| v.is_clean())
                            .map_err(|e| e.to_string()),
                    );
                }
                if s.fail_syncs > 0 {
                    s.fail_syncs -= 1;
                    return Err(io::Error::from_raw_os_error(5));
                }
            }
            _ => {}
        }
        Ok(())
    };
    let (s, target) = (script.clone(), inner.clone());
    let io = Intercept::new(inner.clone(), before).after(move |op| {
        let mut s = lock(&s);
        if matches!(
            op,
            Op::Write {
                name: "superblock",
                ..
            }
        ) && s.capture_after
        {
            s.capture_after = false;
            s.images = (0..64).map(|seed| target.crash_image(seed)).collect();
        }
    });
    (inner, Arc::new(io), script)
}

/// A snapshot of pages `base..base + 8` on top of `parent`.
fn snap(store: &mut Store, parent: Option<SnapshotId>, base: u64) -> SnapshotId {
    store.begin(parent).expect("begin");
    for v in 0..8 {
        store.put(Vpn(base + v), &page(base + v)).expect("put");
    }
    store.commit(SnapshotMeta::default()).expect("commit").id
}

/// Two snapshots: pages 0..8 in the first, 0..16 in the second.
fn two_snapshots(store: &mut Store) -> (SnapshotId, SnapshotId) {
    store.begin(None).expect("begin");
    for v in 0..8 {
        store.put(Vpn(v), &page(v)).expect("put");
    }
    let s1 = store.commit(SnapshotMeta::default()).expect("commit").id;
    store.begin(Some(s1)).expect("begin");
    for v in 8..16 {
        store.put(Vpn(v), &page(v)).expect("put");
    }
    let s2 = store.commit(SnapshotMeta::default()).expect("commit").id;
    (s1, s2)
}

fn holds(store: &Store, s1: SnapshotId, s2: SnapshotId) -> Result<(), String> {
    for (id, n) in [(s1, 8u64), (s2, 16)] {
        for v in 0..n {
            match store.read_page(id, Vpn(v)) {
                Ok(Some(p)) if p == page(v) => {}
                other => return Err(format!("snapshot {id} page {v}: {other:?}")),
            }
        }
    }
    Ok(())
}

/// A commit's slot write and its undo both fail to sync: which state is on the disk is unknown,
/// and a read-back may come from the cache. Leaving doubt must outrank the failed commit before
/// its record space is reused: a crash at the next superblock write must lose nothing.
#[test]
fn leaving_doubt_outranks_the_failed_commit_before_reusing_its_space() {
    let (mem, io, script) = scripted();
    let mut store = Store::init_format2_with(io.clone(), opts()).expect("init");
    let (s1, s2) = two_snapshots(&mut store);
    store.begin(Some(s2)).expect("begin");
    for v in 16..24 {
        store.put(Vpn(v), &page(1000 + v)).expect("put");
    }
    lock(&script).fail_syncs = 2;
    let e = store.commit(SnapshotMeta::default()).expect_err("EIO");
    assert!(e.to_string().contains("I/O error"), "{e}");
    // The next change leaves doubt, then reuses the space after the committed end.
    store.begin(Some(s2)).expect("recovered");
    for v in 16..24 {
        store.put(Vpn(v), &page(2000 + v)).expect("put");
    }
    lock(&script).capture_before = true;
    let s3 = store.commit(SnapshotMeta::default()).expect("commit").id;
    let images = std::mem::take(&mut lock(&script).images);
    assert_eq!(images.len(), 64);
    let mut bad = Vec::new();
    for (seed, img) in images.into_iter().enumerate() {
        match Store::open_with(Arc::new(img), Mode::Write, opts()) {
            Err(e) => bad.push(format!("seed {seed}: open: {e}")),
            Ok((st, _)) => {
                if let Err(e) = holds(&st, s1, s2) {
                    bad.push(format!("seed {seed}: {e}"));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} of 64 crash images lost snapshots:\n{}",
        bad.len(),
        bad.join("\n")
    );
    drop(store);
    let (st, _) = Store::open_with(mem, Mode::Read, opts()).expect("open");
    holds(&st, s1, s2).expect("committed snapshots");
    assert_eq!(st.read_page(s3, Vpn(20)).expect("read"), Some(page(2020)));
}

/// The second slot write of a commit fails: the commit stands (acknowledged), held in one slot.
/// Verify reports the lost redundancy, the next change (or closing the store) writes the copy,
/// and then one flipped bit in the slot that held the only copy loses nothing.
#[test]
fn a_commit_held_in_one_slot_gets_its_copy_before_a_flip_can_lose_it() {
    for close in [false, true] {
        let (mem, io, script) = scripted();
        let mut store = Store::init_format2_with(io.clone(), opts()).expect("init");
        store.begin(None).expect("begin");
        store.put(Vpn(1), &page(1)).expect("put");
        let s1 = store.commit(SnapshotMeta::default()).expect("commit").id;
        store.begin(Some(s1)).expect("begin");
        store.put(Vpn(2), &page(2)).expect("put");
        lock(&script).fail_write = 2; // the second superblock write of this commit
        let s2 = store
            .commit(SnapshotMeta::default())
            .expect("acknowledged")
            .id;
        let generation = store.generation();
        let v = store.verify(&[]).expect("verify");
        assert!(
            v.damage.iter().any(|d| d.detail.contains("older")),
            "verify reports one copy: {v:?}"
        );
        if close {
            drop(store);
        } else {
            store.begin(Some(s2)).expect("begin"); // restores the copy first
            store.abort();
            drop(store);
        }
        let sb = mem.contents("superblock").expect("superblock");
        assert_eq!(sb[..4096], sb[4096..], "both slots hold the commit again");
        mem.flip_bit("superblock", (generation % 2) * 4096 + 100, 3)
            .expect("flip");
        let (store, _) = Store::open_with(mem.clone(), Mode::Write, opts()).expect("open");
        assert!(
            store.snapshot_ids().expect("ids").contains(&s2),
            "close={close}"
        );
        assert_eq!(store.read_page(s2, Vpn(2)).expect("read"), Some(page(2)));
    }
}

/// One flipped bit in a segment header made the whole store unopenable (verify included): now the
/// header is reported and every record is still checked on its own.
#[test]
fn a_damaged_segment_header_is_reported_not_fatal() {
    let mem = Arc::new(FaultyStorage::new());
    let mut store = Store::init_with(mem.clone(), opts()).expect("init");
    let mut parent = None;
    for s in 0..6u64 {
        store.begin(parent).expect("begin");
        for v in 0..8u64 {
            store.put(Vpn(s * 8 + v), &page(s * 8 + v)).expect("put");
        }
        parent = Some(store.commit(SnapshotMeta::default()).expect("commit").id);
    }
    drop(store);
    let segs: Vec<String> = mem
        .list()
        .expect("list")
        .into_iter()
        .filter(|n| n.starts_with("seg-"))
        .collect();
    assert!(segs.len() >= 2, "{segs:?}");
    mem.flip_bit(&segs[0], 2, 0).expect("flip");
    let (store, report) = Store::open_with(mem.clone(), Mode::Read, opts()).expect("opens");
    assert_eq!(report.damaged_segments, vec![segs[0].clone()]);
    let v = store.verify(&[]).expect("verify");
    assert!(
        v.damage
            .iter()
            .any(|d| d.detail.contains(&segs[0]) && d.detail.contains("header")),
        "{v:?}"
    );
    let last = parent.expect("snapshots");
    for p in 0..48u64 {
        assert_eq!(store.read_page(last, Vpn(p)).expect("read"), Some(page(p)));
    }
}

/// Quarantined files are never replaced: a second quarantine of the same segment name keeps the
/// first.
#[test]
fn a_second_quarantine_of_the_same_name_keeps_the_first() {
    let mem = Arc::new(FaultyStorage::new());
    let mut store = Store::init_with(mem.clone(), opts()).expect("init");
    store.begin(None).expect("begin");
    store.put(Vpn(1), &page(1)).expect("put");
    store.commit(SnapshotMeta::default()).expect("commit");
    drop(store);
    let next = "seg-00000002.pss";
    for fill in [0xAAu8, 0xBB] {
        mem.create(next).expect("create");
        mem.write(next, 0, &[fill; 4096]).expect("write");
        mem.sync(next).expect("sync");
        mem.sync_dir().expect("sync dir");
        mem.flip_bit("superblock", 100, 1).expect("flip");
        let (_store, report) = Store::open_with(mem.clone(), Mode::Write, opts()).expect("open");
        assert_eq!(report.quarantined.len(), 1);
    }
    let kept: Vec<u8> = mem
        .list()
        .expect("list")
        .iter()
        .filter(|n| n.starts_with("quarantine-"))
        .map(|n| mem.contents(n).expect("contents")[0])
        .collect();
    assert_eq!(kept.len(), 2, "both quarantined files are kept");
    assert!(kept.contains(&0xAA) && kept.contains(&0xBB));
}

/// Leaving doubt writes the failed commit's slot first: the other holds the only good copy, so a
/// crash during the first recovery write must leave it intact, whatever the generation's parity.
#[test]
fn a_crash_while_leaving_doubt_never_damages_both_slots() {
    for parity in [1u64, 0] {
        let (_mem, io, script) = scripted();
        let mut store = Store::init_format2_with(io.clone(), opts()).expect("init");
        let mut acked = vec![snap(&mut store, None, 0)];
        while store.generation() % 2 != parity {
            let p = acked.last().copied();
            acked.push(snap(&mut store, p, 100 * acked.len() as u64));
        }
        store.begin(acked.last().copied()).expect("begin");
        store.put(Vpn(999), &page(999)).expect("put");
        lock(&script).fail_syncs = 2; // the slot's sync and its undo's: in doubt
        store.commit(SnapshotMeta::default()).expect_err("EIO");
        lock(&script).capture_after = true;
        store.begin(acked.last().copied()).expect("leaves doubt");
        let images = std::mem::take(&mut lock(&script).images);
        assert_eq!(images.len(), 64);
        for (seed, img) in images.into_iter().enumerate() {
            let (st, _) = Store::open_with(Arc::new(img), Mode::Read, opts())
                .unwrap_or_else(|e| panic!("parity {parity}, seed {seed}: {e}"));
            let ids = st.snapshot_ids().expect("ids");
            assert!(
                acked.iter().all(|id| ids.contains(id)),
                "parity {parity}, seed {seed}: {ids:?}"
            );
        }
    }
}

/// A backend that panics on the second slot write, and again when the unwind drops the store:
/// the drop must not retry while panicking (a panic in a destructor during unwinding aborts).
/// Run in a child process, so an abort is seen as a failure rather than killing the run.
#[test]
fn dropping_the_store_while_a_backend_panic_unwinds_does_not_abort() {
    if std::env::var_os("PAGESNAP_DROP_CHILD").is_some() {
        let (_mem, io, script) = scripted();
        let mut store = Store::init_format2_with(io.clone(), opts()).expect("init");
        let s1 = snap(&mut store, None, 0);
        store.begin(Some(s1)).expect("begin");
        store.put(Vpn(50), &page(50)).expect("put");
        lock(&script).panic_after = Some(1); // the commit point passes, the copy panics
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let mut store = store; // dropped by the unwind
            let _ = store.commit(SnapshotMeta::default());
        }));
        assert!(r.is_err());
        println!("child survived");
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "dropping_the_store_while_a_backend_panic_unwinds_does_not_abort",
            "--nocapture",
        ])
        .env("PAGESNAP_DROP_CHILD", "1")
        .output()
        .expect("spawn");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("child survived"),
        "child: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A gc whose superblock write and undo both fail: the writer is in doubt, but its own reads of
/// the committed state (which still lists the old segments) must work, and verify stays clean.
#[test]
fn a_gc_in_doubt_still_reads_every_committed_snapshot() {
    let (_mem, io, script) = scripted();
    let mut store = Store::init_with(io.clone(), opts()).expect("init");
    let s1 = snap(&mut store, None, 0);
    let s2 = snap(&mut store, Some(s1), 8);
    let s3 = snap(&mut store, Some(s2), 16);
    store.delete(&[s2]).expect("delete");
    lock(&script).fail_syncs = 2;
    store.gc().expect_err("EIO on the slot's sync and its undo");
    for (id, n) in [(s1, 8u64), (s3, 24)] {
        for v in 0..n {
            assert_eq!(
                store.read_page(id, Vpn(v)).expect("read"),
                Some(page(v)),
                "{id} {v}"
            );
        }
    }
    // Every snapshot verifies; the superblock, whose slots the failed writes left unequal, is
    // what is in doubt (format 3 says so until the next change rewrites both).
    let v = store.verify(&[]).expect("verify");
    assert!(
        v.damage
            .iter()
            .all(|d| d.snapshot.is_none() && d.detail.contains("superblock")),
        "{v:?}"
    );
    // And the next change leaves doubt and collects.
    store.gc().expect("gc");
    assert_eq!(store.check().expect("check").leaked_bytes, 0);
    assert!(store.verify(&[]).expect("verify").is_clean());
}

/// A reader's verify that runs between the two slot writes of a healthy commit sees an older
/// slot: a note, not damage.
#[test]
fn verify_during_a_healthy_commit_reports_no_damage() {
    let (_mem, io, script) = scripted();
    let mut store = Store::init_format2_with(io.clone(), opts()).expect("init");
    let s1 = snap(&mut store, None, 0);
    store.begin(Some(s1)).expect("begin");
    store.put(Vpn(77), &page(77)).expect("put");
    lock(&script).verify_at_sync = true; // at the commit point's sync
    store
        .commit(SnapshotMeta::default())
        .expect("a healthy commit");
    let clean = lock(&script).verify_clean.take();
    assert_eq!(clean, Some(Ok(true)), "a concurrent verify reported damage");
    assert!(store.verify(&[]).expect("verify").is_clean());
}

/// A bad sector under one slot: the running writer commits with one copy; the next writer still
/// opens (with one copy, removing nothing) instead of failing on the slot's repair.
#[test]
fn a_slot_that_cannot_be_written_does_not_lock_out_the_next_writer() {
    let (_mem, io, script) = scripted();
    let mut store = Store::init_format2_with(io.clone(), opts()).expect("init");
    let s1 = snap(&mut store, None, 0);
    lock(&script).bad_offset = Some(0);
    let s2 = snap(&mut store, Some(s1), 8); // generation 3: slot 1 first, the copy fails
    drop(store);
    let (store, report) = Store::open_with(io.clone(), Mode::Write, opts()).expect("opens");
    assert!(!report.repaired_slot);
    assert_eq!(store.read_page(s2, Vpn(8)).expect("read"), Some(page(8)));
    let v = store.verify(&[]).expect("verify");
    assert!(!v.is_clean(), "the writer reports the missing copy");
}

/// Format 3: a bad sector under one slot. Commits write no superblock; a hint that starts with
/// that slot fails and leaves the writer in doubt (the other slot, then the only good copy, is
/// not overwritten). Whatever the writer then does — refuse changes, or go on — every snapshot
/// whose commit returned `Ok` reads back, in this handle and after reopening.
#[test]
fn format3_a_slot_that_cannot_be_written_loses_nothing() {
    let (_mem, io, script) = scripted();
    let mut store = Store::init_with(io.clone(), opts()).expect("init");
    let s1 = snap(&mut store, None, 0);
    lock(&script).bad_offset = Some(0);
    let mut committed = vec![(s1, 0u64)];
    for round in 0..3u64 {
        let mut parent = committed.last().map(|c| c.0);
        for k in 1..4u64 {
            let base = 100 * (round + 1) + 10 * k;
            let attempt = store.begin(parent).and_then(|_| {
                for v in base..base + 8 {
                    store.put(Vpn(v), &page(v))?;
                }
                store.commit(SnapshotMeta::default())
            });
            match attempt {
                Ok(r) => {
                    committed.push((r.id, base));
                    parent = Some(r.id);
                }
                Err(e) => {
                    store.abort();
                    assert!(
                        matches!(e, pagesnap_store::StoreError::InDoubt { .. })
                            || e.to_string().contains("superblock"),
                        "a clear error: {e}"
                    );
                }
            }
        }
        drop(store);
        store = Store::open_with(io.clone(), Mode::Write, opts())
            .expect("reopens")
            .0;
        for (id, base) in &committed {
            for v in *base..*base + 8 {
                assert_eq!(
                    store.read_page(*id, Vpn(v)).expect("read"),
                    Some(page(v)),
                    "snapshot {id} page {v}"
                );
            }
        }
    }
}

fn small_segments(c: Compression) -> StoreOptions {
    StoreOptions {
        page_size: 512,
        segment_bytes: 1 << 20,
        compression: c,
        ..StoreOptions::default()
    }
}

/// Once armed, every second superblock write fails: the first slot lands, the copy fails (the
/// writer is degraded and restores the redundancy before its next change).
fn degrading(inner: Arc<FaultyStorage>) -> (Arc<Intercept>, Arc<AtomicBool>) {
    let armed = Arc::new(AtomicBool::new(false));
    let n = Arc::new(AtomicU64::new(0));
    let a = armed.clone();
    let io = Intercept::new(inner, move |op| match op {
        Op::Write {
            name: "superblock", ..
        } if a.load(Ordering::SeqCst) => {
            if n.fetch_add(1, Ordering::SeqCst) % 2 == 1 {
                Err(io::Error::from_raw_os_error(5))
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    });
    (Arc::new(io), armed)
}

/// A degraded writer dropped in the middle of a snapshot restored the redundancy there: its hint
/// wrote the log buffer (an open extent) below its place, over the last commit's records.
#[test]
fn dropping_a_degraded_writer_mid_snapshot_keeps_the_last_commit() {
    let o = small_segments(Compression::None);
    let inner = Arc::new(FaultyStorage::new());
    let (io, armed) = degrading(inner.clone());
    let first = {
        let mut s = Store::init_with(io.clone(), o).expect("init");
        s.begin(None).expect("begin");
        for v in 0..4 {
            s.put(Vpn(v), &page(v)).expect("put");
        }
        s.commit(SnapshotMeta::default()).expect("commit").id
    };
    armed.store(true, Ordering::SeqCst);
    let (mut s, _) = Store::open_with(io.clone(), Mode::Write, o).expect("open");
    s.begin(Some(first)).expect("begin");
    for v in 10..14 {
        s.put(Vpn(v), &page(v)).expect("put");
    }
    drop(s);
    let (r, rep) = Store::open_with(inner.clone(), Mode::Read, o).expect("reopen");
    let got = pages_of(&r, first);
    assert!(
        got.is_ok() && r.snapshot_ids().expect("ids") == vec![first],
        "{got:?} {rep:?}"
    );
}

/// A call refused because a snapshot is being written (here `delete`) restored the redundancy
/// first: its hint moved the scan past bytes the commit's range crc covers, so the commit,
/// acknowledged, was dropped after a crash as a torn tail.
#[test]
fn a_busy_call_while_degraded_does_not_lose_the_next_commit() {
    let o = small_segments(Compression::Lz4);
    let inner = Arc::new(FaultyStorage::new());
    let (io, armed) = degrading(inner.clone());
    let first = {
        let mut s = Store::init_with(io.clone(), o).expect("init");
        s.begin(None).expect("begin");
        s.put(Vpn(0), &page(0)).expect("put");
        s.commit(SnapshotMeta::default()).expect("commit").id
    };
    armed.store(true, Ordering::SeqCst);
    let (mut s, _) = Store::open_with(io.clone(), Mode::Write, o).expect("open");
    s.begin(Some(first)).expect("begin");
    for v in 10..400 {
        s.put(Vpn(v), &page(v)).expect("put");
    }
    assert!(
        s.delete(&[first]).is_err(),
        "refused: a snapshot is being written"
    );
    for v in 400..800 {
        s.put(Vpn(v), &page(v)).expect("put");
    }
    let second = s.commit(SnapshotMeta::default()).expect("commit").id;
    let img = Arc::new(inner.crash_image(1));
    std::mem::forget(s);
    let (r, rep) = Store::open_with(img, Mode::Read, o).expect("open after a crash");
    assert_eq!(
        r.snapshot_ids().expect("ids"),
        vec![first, second],
        "{rep:?}"
    );
}
