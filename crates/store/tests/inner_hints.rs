//! Hints inside a commit (every 128 MiB appended, and at each segment roll) sync only what they
//! name, not the commit's bytes before them (docs/format.md, "A hint inside a commit"): a crash
//! or a rollback past such a hint must lose nothing committed, never take a commit whose bytes
//! before the hint are missing, and leave no gap between a segment's records.

use pagesnap_store::fault::{FaultyStorage, Intercept, Op};
use pagesnap_store::{Mode, SnapshotMeta, Storage, Store, Vpn};
use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

mod common;
use common::{assert_holds, opts, page, pages_of, Expected};

fn ioerr() -> io::Error {
    io::Error::from_raw_os_error(5)
}

const BIG: usize = 1 << 20;

fn big_opts() -> pagesnap_store::StoreOptions {
    pagesnap_store::StoreOptions {
        page_size: BIG as u32,
        segment_bytes: 1 << 30,
        compression: pagesnap_store::Compression::None,
        ..pagesnap_store::StoreOptions::default()
    }
}

fn big(seed: u64) -> Vec<u8> {
    let mut p = vec![0u8; BIG];
    for (i, c) in p.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64).to_le_bytes());
    }
    p
}

/// A store of 1 MiB pages on `io` with a first snapshot of one page (then `after_first` runs);
/// then a second snapshot begun on it and given pages until the hint inside it (128 MiB
/// appended) was written. Returns the store, the first snapshot and the next page number.
fn past_the_inner_hint(
    io: Arc<dyn Storage>,
    after_first: impl FnOnce(),
) -> (Store, pagesnap_store::SnapshotId, u64) {
    let mut store = Store::init_with(io, big_opts()).expect("init");
    store.begin(None).expect("begin");
    store.put(Vpn(0), &big(0)).expect("put");
    let first = store.commit(SnapshotMeta::default()).expect("commit 1").id;
    after_first();
    let generation = store.generation();
    store.begin(Some(first)).expect("begin 2");
    let mut v = 1;
    while store.generation() == generation {
        store.put(Vpn(v), &big(v)).expect("put");
        v += 1;
    }
    (store, first, v)
}

/// After a crash image in which the commit's bytes before its inner hint are lost: open takes
/// the first snapshot only, or the second whole (never one that does not read back).
fn assert_not_taken_torn(
    img: Arc<FaultyStorage>,
    o: pagesnap_store::StoreOptions,
    first: pagesnap_store::SnapshotId,
    second: pagesnap_store::SnapshotId,
) {
    let (r, _) = Store::open_with(img, Mode::Read, o).expect("open after the crash");
    let ids = r.snapshot_ids().expect("ids");
    if ids.contains(&second) {
        let read = pages_of(&r, second);
        let damage = r.verify(&[]).expect("verify").damage;
        assert!(
            read.is_ok() && damage.is_empty(),
            "open took commit 2 whose bytes before the inner hint never reached the disk: \
             reading it back: {:?}; verify: {} damage entries",
            read.err(),
            damage.len()
        );
    } else {
        assert_eq!(ids, vec![first]);
    }
}

/// `abort` after a hint inside the commit (128 MiB appended) rolls the writer back to
/// the last commit's end, *below* the durable hint's position, and writes no hint. The next
/// commit is appended there under the same generation and returns Ok (synced), but open scans
/// from the hint's position: after a crash the acknowledged snapshot is gone.
#[test]
fn a_commit_after_an_abort_past_an_inner_hint_survives_a_crash() {
    let o = big_opts();
    let inner = Arc::new(FaultyStorage::new());
    let (mut store, first, _) = past_the_inner_hint(inner.clone(), || {});
    store.abort();
    store.begin(Some(first)).expect("begin 3");
    store.put(Vpn(7), &big(7)).expect("put");
    let next = store.commit(SnapshotMeta::default()).expect("commit 3").id;
    // A reader opened now (no crash) does not see it either.
    let (r, _) = Store::open_with(inner.clone(), Mode::Read, o).expect("read-only open");
    let seen_by_reader = r.snapshot_ids().expect("ids");
    drop(r);
    // The machine crashes (everything the commit synced is there).
    let img = Arc::new(inner.crash_image(7));
    std::mem::forget(store);
    let (r, rep) = Store::open_with(img, Mode::Read, o).expect("open after crash");
    assert_eq!(
        r.snapshot_ids().expect("ids"),
        vec![first, next],
        "acknowledged snapshot {next:?} lost after a crash (reader before the crash saw \
         {seen_by_reader:?}; open report {rep:?})"
    );
}

/// Follows what is durable while a commit runs, to build the crash image the model allows in
/// which the commit's writes before its last inner hint are lost and those after it landed.
#[derive(Default)]
struct Tracker {
    armed: bool,
    /// Each file's durable bytes (as of its last sync that returned: a write came after it).
    durable: BTreeMap<String, Vec<u8>>,
    /// Syncs no write has followed yet (the commit's final syncs stay here: a crash during them).
    provisional: Vec<(String, Vec<u8>)>,
    /// Segment writes since the last superblock write: (name, offset, len).
    since_hint: Vec<(String, u64, usize)>,
    hints: usize,
}

fn tracked(inner: Arc<FaultyStorage>) -> (Arc<Intercept>, Arc<Mutex<Tracker>>) {
    let t = Arc::new(Mutex::new(Tracker::default()));
    let (tt, ii) = (t.clone(), inner.clone());
    let io = Intercept::new(inner, move |op| {
        let mut t = tt.lock().unwrap();
        if !t.armed {
            return Ok(());
        }
        match op {
            Op::Sync(name) if name.starts_with("seg-") => {
                let c = ii.contents(name).unwrap_or_default();
                t.provisional.push((name.to_string(), c));
            }
            Op::Write { name, offset, data } => {
                // Issued after the syncs before it returned: those bytes are durable.
                for (n, c) in std::mem::take(&mut t.provisional) {
                    t.durable.insert(n, c);
                }
                if name.starts_with("seg-") {
                    t.since_hint.push((name.to_string(), *offset, data.len()));
                } else {
                    // A superblock slot.
                    t.since_hint.clear();
                    t.hints += 1;
                }
            }
            _ => {}
        }
        Ok(())
    });
    (Arc::new(io), t)
}

fn arm(inner: &FaultyStorage, t: &Mutex<Tracker>) {
    let mut t = t.lock().unwrap();
    t.durable = inner
        .list()
        .unwrap()
        .into_iter()
        .map(|n| {
            let c = inner.contents(&n).unwrap();
            (n, c)
        })
        .collect();
    t.armed = true;
}

/// The crash image: every segment as durable before the commit's final syncs, plus the writes
/// made after the last hint (landed); the rest of the commit's writes lost.
fn torn_image(inner: &FaultyStorage, t: &Mutex<Tracker>) -> Arc<FaultyStorage> {
    let t = t.lock().unwrap();
    let img = Arc::new(FaultyStorage::new());
    for n in inner.list().unwrap() {
        let cur = inner.contents(&n).unwrap();
        let bytes = if n.starts_with("seg-") {
            let mut b = t.durable.get(&n).cloned().unwrap_or_default();
            b.resize(cur.len().max(b.len()), 0);
            for (w, off, len) in &t.since_hint {
                if *w == n {
                    let o = *off as usize;
                    b[o..o + len].copy_from_slice(&cur[o..o + len]);
                }
            }
            b
        } else {
            cur
        };
        img.create(&n).unwrap();
        img.write(&n, 0, &bytes).unwrap();
        img.sync(&n).unwrap();
    }
    img.sync_dir().unwrap();
    img
}

/// A hint inside a commit (here at each segment roll) syncs none of the commit's bytes
/// before it, and the record's range crc covers only the bytes after the hint. A crash during
/// the commit's final syncs may keep what was written after the last hint (the record too) and
/// lose what was written before it, unless the commit syncs them before it appends its record
/// (`sync_before_record`): else open takes that commit, whose map or pages do not read back.
#[test]
fn a_torn_commit_across_an_inner_hint_is_not_taken() {
    let o = pagesnap_store::StoreOptions {
        compression: pagesnap_store::Compression::None,
        ..opts()
    };
    let inner = Arc::new(FaultyStorage::new());
    let (io, t) = tracked(inner.clone());
    let mut store = Store::init_with(io, o).expect("init");
    store.begin(None).expect("begin");
    for v in 0..2u64 {
        store.put(Vpn(v), &page(v)).expect("put");
    }
    let first = store.commit(SnapshotMeta::default()).expect("commit 1").id;
    arm(&inner, &t);
    store.begin(Some(first)).expect("begin 2");
    for v in 10..60u64 {
        store.put(Vpn(v), &page(v)).expect("put");
    }
    let second = store.commit(SnapshotMeta::default()).expect("commit 2").id;
    assert!(t.lock().unwrap().hints > 0, "a hint inside the commit");
    let img = torn_image(&inner, &t);
    std::mem::forget(store);
    assert_not_taken_torn(img, o, first, second);
}

/// The same with the 128 MiB hint (one segment).
#[test]
fn a_torn_large_commit_across_its_128_mib_hint_is_not_taken() {
    let inner = Arc::new(FaultyStorage::new());
    let (io, t) = tracked(inner.clone());
    let (mut store, first, v) = past_the_inner_hint(io, || arm(&inner, &t));
    for k in 0..4 {
        store.put(Vpn(v + k), &big(v + k)).expect("put");
    }
    let second = store.commit(SnapshotMeta::default()).expect("commit 2").id;
    assert_eq!(
        t.lock().unwrap().hints,
        2,
        "one hint (two slots) inside the commit"
    );
    let img = torn_image(&inner, &t);
    std::mem::forget(store);
    assert_not_taken_torn(img, big_opts(), first, second);
}

/// The hint inside a large commit syncs nothing of the commit's bytes before it, so a crash right
/// after it can leave its position in bytes that are torn, garbage or missing, past the file's
/// durable length too (the crash images choose each unsynced write's and size change's fate).
/// Open then finds the snapshot before, a writer appends from the hint's position, and its next
/// commit is found after another crash and reads back whole.
#[test]
fn a_crash_after_the_hint_inside_a_commit_loses_nothing() {
    let o = big_opts();
    let inner = Arc::new(FaultyStorage::new());
    let (mut store, first, mut v) = past_the_inner_hint(inner.clone(), || {});
    assert!(v < 160, "the hint came after {v} MiB");
    // A few pages more (their writes unsynced after it).
    for _ in 0..4 {
        store.put(Vpn(v), &big(v)).expect("put");
        v += 1;
    }
    let mut expected: Expected = BTreeMap::new();
    expected.insert(first, BTreeMap::from([(0, big(0))]));
    for seed in 0..6 {
        let img = Arc::new(inner.crash_image(seed));
        let (mut w, _) = Store::open_with(img.clone(), Mode::Write, o).expect("open after crash");
        assert_holds(&w, &expected, &format!("seed {seed}: after the crash"));
        w.begin(Some(first)).expect("begin");
        w.put(Vpn(7), &big(1000 + seed)).expect("put");
        let next = w
            .commit(SnapshotMeta::default())
            .expect("commit after the crash")
            .id;
        drop(w);
        let again = Arc::new(img.crash_image(seed + 100));
        let (r, _) = Store::open_with(again, Mode::Read, o).expect("open after a second crash");
        let mut want = expected.clone();
        want.insert(next, BTreeMap::from([(0, big(0)), (7, big(1000 + seed))]));
        assert_holds(&r, &want, &format!("seed {seed}: after the second crash"));
        let report = r.verify(&[]).expect("verify");
        assert!(report.damage.is_empty(), "seed {seed}: {:?}", report.damage);
    }
    drop(store);
}

/// The same bytes after a commit that fails past its inner hint (a write of its pages fails): the
/// writer rolls back to the last commit's end, not to the hint's position (its next write lands
/// there), so the bytes the failed commit left unwritten before the hint are not left between
/// the records of the next commit and the ones before (`verify` walks a segment's records in
/// order).
#[test]
fn a_commit_that_fails_after_its_inner_hint_leaves_no_gap() {
    let o = big_opts();
    let inner = Arc::new(FaultyStorage::new());
    let armed = Arc::new(AtomicBool::new(false));
    let first_write = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    let (fail, seen) = (armed.clone(), first_write.clone());
    let io = Arc::new(Intercept::new(inner.clone(), move |op| {
        if let Op::Write { name, offset, .. } = op {
            if name.starts_with("seg-") {
                if fail.load(Ordering::SeqCst) {
                    return Err(ioerr());
                }
                seen.fetch_min(*offset, Ordering::SeqCst);
            }
        }
        Ok(())
    }));
    let (mut store, first, v) = past_the_inner_hint(io, || {});
    // The bytes buffered at the hint (before its position) are never written.
    armed.store(true, Ordering::SeqCst);
    let failed = (0..8).any(|k| store.put(Vpn(v + k), &big(v + k)).is_err())
        || store.commit(SnapshotMeta::default()).is_err();
    assert!(failed, "a write failed");
    store.abort();
    armed.store(false, Ordering::SeqCst);
    first_write.store(u64::MAX, Ordering::SeqCst);
    store.begin(Some(first)).expect("begin 3");
    store.put(Vpn(7), &big(7)).expect("put");
    let next = store.commit(SnapshotMeta::default()).expect("commit 3").id;
    let at = first_write.load(Ordering::SeqCst);
    assert!(
        at < 2 << 20,
        "the next commit wrote first at {at}, not after the first commit"
    );
    let report = store.verify(&[]).expect("verify");
    assert!(report.damage.is_empty(), "{:?}", report.damage);
    let mut expected: Expected = BTreeMap::new();
    expected.insert(first, BTreeMap::from([(0, big(0))]));
    expected.insert(next, BTreeMap::from([(0, big(0)), (7, big(7))]));
    assert_holds(&store, &expected, "after the failed commit");
    drop(store);
    let img = Arc::new(inner.crash_image(1));
    let (r, _) = Store::open_with(img, Mode::Read, o).expect("open after a crash");
    assert_holds(&r, &expected, "after a crash");
    assert!(r.verify(&[]).expect("verify").damage.is_empty());
}
