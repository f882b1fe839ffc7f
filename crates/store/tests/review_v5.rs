//! Hostile review of store format 4: pages compressed in frames by a pool of threads.
//!
//! Tests that depend on the pool's timing take `SERIAL` (the pool has one thread per core, and
//! tests running side by side would change who waits for whom) and run their store work on a
//! thread watched by a timeout, so that a deadlock fails the test instead of hanging it.

use pagesnap_store::fault::{FaultyStorage, Intercept, Op};
use pagesnap_store::{
    Compression, Mode, SnapshotId, SnapshotMeta, Storage, Store, StoreError, StoreOptions, Vpn,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[allow(dead_code)]
mod common;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on its own thread; a panic there fails the test, and so does no answer in `secs`.
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(RecvTimeoutError::Timeout) => {
            panic!("{what}: no answer in {secs} s: the writer is hung (deadlock)")
        }
        Err(RecvTimeoutError::Disconnected) => panic!("{what}: the store thread panicked"),
    }
}

/// A page of `size` bytes from 16 letters: zstd and lz4 keep it (about 2x), and every seed
/// gives other bytes.
fn cpage(seed: u64, size: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b'a' + (x & 15) as u8
        })
        .collect()
}

/// 4 KiB pages, large segments, and a segment grown by one page at a time: every frame appended
/// needs a `set_len`, which the tests can make fail.
fn opts4k(compression: Compression) -> StoreOptions {
    StoreOptions {
        page_size: 4096,
        segment_bytes: 64 << 20,
        preallocate: 4096,
        compression,
        ..StoreOptions::default()
    }
}

/// A backend whose segment `set_len` fails with ENOSPC while the flag is set (a full disk).
fn disk_full_switch() -> (Arc<FaultyStorage>, Arc<Intercept>, Arc<AtomicBool>) {
    let inner = Arc::new(FaultyStorage::new());
    let full = Arc::new(AtomicBool::new(false));
    let f = full.clone();
    let io = Arc::new(Intercept::new(inner.clone(), move |op| match op {
        Op::SetLen(name, _) if name.starts_with("seg-") && f.load(Ordering::SeqCst) => {
            Err(std::io::Error::from_raw_os_error(28))
        }
        _ => Ok(()),
    }));
    (inner, io, full)
}

/// Reads every page of `expected` back from snapshot `id`, one by one and in one batch.
fn check_pages(store: &Store, id: SnapshotId, expected: &BTreeMap<u64, Vec<u8>>) {
    for (v, want) in expected {
        let got = store
            .read_page(id, Vpn(*v))
            .unwrap_or_else(|e| panic!("snapshot {id:?} page {v}: {e}"));
        assert_eq!(got.as_deref(), Some(&want[..]), "snapshot {id:?} page {v}");
    }
    let mut refs = Vec::new();
    store
        .for_each_page(id, |_, r| {
            refs.push(*r);
            Ok(())
        })
        .expect("walk");
    let mut out = Vec::new();
    store
        .read_refs_into(&refs, &mut out)
        .unwrap_or_else(|e| panic!("snapshot {id:?} batch read: {e}"));
    let want: Vec<u8> = expected.values().flatten().copied().collect();
    assert!(out == want, "snapshot {id:?}: batch read differs");
}

/// The records of a segment image, header by header: (offset, kind, key).
fn records(seg: &[u8]) -> Vec<(usize, u8, u64)> {
    let mut out = Vec::new();
    let mut off = 64usize;
    while off + 56 <= seg.len() && &seg[off..off + 4] == b"PREC" {
        let plen = u32::from_le_bytes(seg[off + 8..off + 12].try_into().expect("4")) as usize;
        let len = (56 + plen + 4).next_multiple_of(8);
        let key = u64::from_le_bytes(seg[off + 16..off + 24].try_into().expect("8"));
        out.push((off, seg[off + 4], key));
        off += len;
    }
    out
}

fn cap_frames() -> usize {
    4 * std::thread::available_parallelism().map_or(1, |n| n.get())
}

// ---- Finding 1: a put retried while the disk is full hangs the writer forever -------------------

/// A caller that retries a put the store refused (ENOSPC: "a caller may retry the put", as
/// `frames.rs` says), backing off a millisecond, on a disk that is full for a while. Each failed
/// attempt leaves its page in the open frame, and the frame at the head of the queue can never be
/// appended, so the frames in flight pile up, all of them compressed and waiting in `ready`. Once
/// `cap` of them wait, `send_frame` calls `pump(true)`, whose first loop blocks in `done.recv()`
/// for a result that no thread will ever send (every frame in flight was received already): the
/// writer hangs, and it stays hung when the disk has room again.
#[test]
fn a_put_retried_while_the_disk_is_full_does_not_hang_the_writer() {
    let _g = serial();
    let (_inner, io, full) = disk_full_switch();
    let mut store = Store::init_with(io, opts4k(Compression::Lz4)).expect("init");
    let failures_while_full = 16 * (cap_frames() + 3);
    let expected = within(30, "retried puts", move || {
        store.begin(None).expect("begin");
        let mut expected = BTreeMap::new();
        full.store(true, Ordering::SeqCst);
        let mut failures = 0usize;
        let mut v = 0u64;
        // Until the disk has room again, then 32 pages more.
        let mut after = 0;
        while failures < failures_while_full || after < 32 {
            if failures >= failures_while_full {
                after += 1;
            }
            let p = cpage(v, 4096);
            loop {
                match store.put(Vpn(v), &p) {
                    Ok(()) => break,
                    Err(_) => {
                        failures += 1;
                        if failures >= failures_while_full {
                            full.store(false, Ordering::SeqCst);
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
            expected.insert(v, p);
            v += 1;
        }
        let id = store.commit(SnapshotMeta::default()).expect("commit").id;
        check_pages(&store, id, &expected);
        expected.len()
    });
    assert!(expected > 0);
}

// ---- Finding 2: a frame of more than 16 pages (written, committed, unreadable) ------------------

/// With the pool at its cap (slow zstd:19 frames in flight), a put whose frame is full calls
/// `send_frame`, which waits in `pump(true)`; when the append there fails (ENOSPC) the error
/// returns *before* the open frame is taken, so the frame stays full. The caller retries the
/// put: its page is pushed as the 17th, and once the disk has room `send_frame` sends a frame of
/// 17+ pages (the test keeps the disk full until two refusals in a row came from that wait). It is appended and committed (the commit reports success), but `decode_frame`
/// refuses any frame of more than 16 pages: every page in it is unreadable, the snapshot is lost.
#[test]
fn a_retried_put_never_commits_a_frame_of_more_than_16_pages() {
    let _g = serial();
    let (inner, io, full) = disk_full_switch();
    let mut store = Store::init_with(io, opts4k(Compression::Zstd { level: 19 })).expect("init");
    let warm = 16 * cap_frames() * 2;
    let (id, expected, store) = within(60, "retried puts", move || {
        store.begin(None).expect("begin");
        let mut expected = BTreeMap::new();
        let mut v = 0u64;
        for round in 0..16 {
            // Fast puts: the pool (zstd:19, 64 KiB frames) falls behind and reaches its cap.
            for _ in 0..warm {
                let p = cpage(v, 4096);
                store.put(Vpn(v), &p).expect("put");
                expected.insert(v, p);
                v += 1;
            }
            // The disk fills; the caller retries each refused put at once. Two refusals in a row
            // that each took milliseconds came from `send_frame` waiting at the cap for a result
            // (a refusal from `pump(false)` is immediate, and a `send` that waited for room in
            // the job queue is followed by an immediate one): then the disk has room again.
            full.store(true, Ordering::SeqCst);
            let mut failures = 0;
            let mut prev_slow = false;
            for _ in 0..48 {
                let p = cpage(v, 4096);
                loop {
                    let t = Instant::now();
                    match store.put(Vpn(v), &p) {
                        Ok(()) => break,
                        Err(e) => {
                            failures += 1;
                            let slow = t.elapsed() >= Duration::from_millis(2);
                            if std::env::var("RV5_DEBUG").is_ok() {
                                eprintln!(
                                    "round {round} page {v} failure {failures} after {:?}: {e}",
                                    t.elapsed()
                                );
                            }
                            assert!(failures < 1000, "round {round}: {e}");
                            // (Fixed: a full frame that cannot go refuses the put at once,
                            // so the disk also gets room after a few quick refusals.)
                            if (slow && prev_slow) || failures >= 8 {
                                full.store(false, Ordering::SeqCst);
                            }
                            prev_slow = slow;
                        }
                    }
                }
                expected.insert(v, p);
                v += 1;
            }
            full.store(false, Ordering::SeqCst);
        }
        let id = store.commit(SnapshotMeta::default()).expect("commit").id;
        (id, expected, store)
    });
    // No frame record claims more than 16 pages.
    let seg = inner.contents("seg-00000001.pss").expect("segment");
    let big: Vec<_> = records(&seg)
        .into_iter()
        .filter(|(_, kind, pages)| *kind == 8 && *pages > 16)
        .collect();
    if std::env::var("RV5_DEBUG").is_ok() {
        let mut h = BTreeMap::new();
        for (_, k, key) in records(&seg) {
            *h.entry((k, if k == 8 { key } else { 0 })).or_insert(0) += 1;
        }
        eprintln!("records (kind, pages): {h:?}");
    }
    let verify = store.verify(&[id]).expect("verify");
    check_pages(&store, id, &expected);
    assert!(big.is_empty(), "frames of more than 16 pages: {big:?}");
    assert!(verify.damage.is_empty(), "{:?}", verify.damage);
}

// ---- Finding 3: the dedup map keeps a placeholder past its commit ------------------------------

/// `put3` inserts the placeholder into the dedup map *after* `frame_page` returns; but when the
/// page completes its frame, `frame_page`'s `pump(false)` can find that very frame compressed
/// already and append it, and `append_frame` writes the real location into the dedup map first.
/// `put3` then overwrites it with the placeholder. After the commit (`frames.reset()` forgets the
/// placeholders) the map still offers it; `put3` takes a placeholder for "written by this
/// commit" (segment u32::MAX is past any start), and the next commit storing that content fails
/// with "a page in a frame that was never written (a bug: please report it)". Timing decides
/// (the pool must finish the frame between `send` and `try_recv`), so this runs many rounds.
#[test]
fn content_stored_by_one_commit_is_reused_by_the_next() {
    let _g = serial();
    let io = Arc::new(FaultyStorage::new());
    let opts = StoreOptions {
        compression: Compression::Lz4,
        segment_bytes: 64 << 20,
        preallocate: 1 << 20,
        ..common::opts()
    };
    let mut store = Store::init_with(io, opts).expect("init");
    within(240, "rounds", move || {
        let mut parent = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut round = 0u64;
        while Instant::now() < deadline && round < 400 {
            // New contents, 16 frames of them.
            store.begin(parent).expect("begin");
            for k in 0..256u64 {
                store
                    .put(Vpn(k), &cpage(round << 20 | k, 512))
                    .expect("put");
            }
            let a = store.commit(SnapshotMeta::default()).expect("commit a").id;
            // The same contents under other page numbers: all reused from commit a.
            store.begin(Some(a)).expect("begin");
            for k in 0..256u64 {
                store
                    .put(Vpn(1000 + k), &cpage(round << 20 | k, 512))
                    .expect("put");
            }
            let b = store
                .commit(SnapshotMeta::default())
                .unwrap_or_else(|e| panic!("round {round}: commit reusing commit a's pages: {e}"));
            parent = Some(b.id);
            round += 1;
        }
    });
}

// ---- Accounting: check() after gc with frames ----------------------------------------------------

/// Frames partly replaced and a snapshot deleted: gc reclaims, and right after it nothing is
/// leaked; the stored share of each frame adds up to the file bytes.
#[test]
fn gc_of_frames_leaves_nothing_leaked() {
    let _g = serial();
    let io = Arc::new(FaultyStorage::new());
    let opts = StoreOptions {
        segment_bytes: 1 << 20,
        ..common::opts()
    };
    let mut store = Store::init_with(io.clone(), opts).expect("init");
    within(120, "gc", move || {
        let mut expected: BTreeMap<SnapshotId, BTreeMap<u64, Vec<u8>>> = BTreeMap::new();
        let mut parent = None;
        let mut map = BTreeMap::new();
        for s in 0..4u64 {
            store.begin(parent).expect("begin");
            for k in 0..40u64 {
                if s == 0 || k % (s + 2) == 0 {
                    let p = cpage(s * 1000 + k, 512);
                    store.put(Vpn(k), &p).expect("put");
                    map.insert(k, p);
                }
            }
            let id = store.commit(SnapshotMeta::default()).expect("commit").id;
            expected.insert(id, map.clone());
            parent = Some(id);
        }
        let first = *expected.keys().next().expect("one");
        store.delete(&[first]).expect("delete");
        expected.remove(&first);
        let before = store.check().expect("check");
        assert!(before.leaked_bytes > 0, "{before:?}");
        store.gc().expect("gc");
        let after = store.check().expect("check");
        assert_eq!(after.leaked_bytes, 0, "after gc: {after:?}");
        for (id, map) in &expected {
            check_pages(&store, *id, map);
        }
        let v = store.verify(&[]).expect("verify");
        assert!(v.damage.is_empty(), "{:?}", v.damage);
        drop(store);
        let (store, _) = Store::open_with(io, Mode::Read, common::opts()).expect("reopen");
        for (id, map) in &expected {
            check_pages(&store, *id, map);
        }
    });
}

// ---- Failure paths that turned out sound ---------------------------------------------------------

/// A commit whose drain fails (ENOSPC while frames are in flight) rolls back; results of the
/// dropped generation still arriving are discarded, and the snapshot written again commits and
/// reads back; the frame cache holds nothing of the dropped commit.
#[test]
fn a_commit_failing_mid_drain_rolls_back_and_the_retry_commits() {
    let _g = serial();
    let (inner, io, full) = disk_full_switch();
    let mut store = Store::init_with(io, opts4k(Compression::Zstd { level: 19 })).expect("init");
    within(300, "commit retry", move || {
        // A committed snapshot, read once (its frames enter the cache).
        store.begin(None).expect("begin");
        let mut first = BTreeMap::new();
        for v in 0..64u64 {
            let p = cpage(v, 4096);
            store.put(Vpn(v), &p).expect("put");
            first.insert(v, p);
        }
        let a = store.commit(SnapshotMeta::default()).expect("commit").id;
        check_pages(&store, a, &first);
        let mut second = first.clone();
        for attempt in 0..3 {
            store.begin(Some(a)).expect("begin");
            for v in 0..200u64 {
                let p = cpage(10_000 + v, 4096);
                store.put(Vpn(v), &p).expect("put");
                second.insert(v, p);
            }
            if attempt < 2 {
                full.store(true, Ordering::SeqCst);
                assert!(store.commit(SnapshotMeta::default()).is_err());
                full.store(false, Ordering::SeqCst);
            }
        }
        let b = store.commit(SnapshotMeta::default()).expect("commit").id;
        check_pages(&store, a, &first);
        check_pages(&store, b, &second);
        let v = store.verify(&[]).expect("verify");
        assert!(v.damage.is_empty(), "{:?}", v.damage);
        drop(store);
        let img = inner.crash_image(1);
        let (store, _) =
            Store::open_with(Arc::new(img), Mode::Read, opts4k(Compression::Auto)).expect("open");
        check_pages(&store, a, &first);
        check_pages(&store, b, &second);
    });
}

/// The compression changed between commits (zstd, lz4, none, zstd again), an abort with frames
/// in flight, and the store dropped while frames are in flight: every committed snapshot reads
/// back, and no compression thread outlives its store.
#[test]
fn compression_changes_aborts_and_drops_leave_no_threads_and_lose_nothing() {
    let _g = serial();
    let threads = || {
        std::fs::read_dir("/proc/self/task")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| {
                        std::fs::read_to_string(e.path().join("comm"))
                            .is_ok_and(|c| c.starts_with("pagesnap-compre"))
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    let before = threads();
    let io = Arc::new(FaultyStorage::new());
    let io2 = io.clone();
    within(300, "settings", move || {
        let mut store =
            Store::init_with(io2.clone(), opts4k(Compression::Zstd { level: 3 })).expect("init");
        let mut all = BTreeMap::new();
        let mut parent = None;
        let settings = [
            Compression::Zstd { level: 3 },
            Compression::Lz4,
            Compression::None,
            Compression::Zstd { level: 19 },
            Compression::Auto,
        ];
        for (s, c) in settings.into_iter().enumerate() {
            store.set_compression(c).expect("set");
            // An aborted snapshot with frames in flight first.
            store.begin(parent).expect("begin");
            for v in 0..100u64 {
                store
                    .put(Vpn(v), &cpage(99_000 + s as u64 * 1000 + v, 4096))
                    .expect("put");
            }
            store.abort();
            store.begin(parent).expect("begin");
            let mut map: BTreeMap<u64, Vec<u8>> = parent
                .map(|p: SnapshotId| all.get(&p).cloned().unwrap_or_default())
                .unwrap_or_default();
            for v in 0..100u64 {
                let p = cpage(s as u64 * 1000 + v, 4096);
                store.put(Vpn(v * 2), &p).expect("put");
                map.insert(v * 2, p);
            }
            let id = store.commit(SnapshotMeta::default()).expect("commit").id;
            all.insert(id, map);
            parent = Some(id);
        }
        for (id, map) in &all {
            check_pages(&store, *id, map);
        }
        // Dropped with frames in flight.
        store.begin(parent).expect("begin");
        for v in 0..300u64 {
            store.put(Vpn(v), &cpage(500_000 + v, 4096)).expect("put");
        }
        drop(store);
        let (store, _) =
            Store::open_with(io2, Mode::Write, opts4k(Compression::Auto)).expect("reopen");
        for (id, map) in &all {
            check_pages(&store, *id, map);
        }
        let v = store.verify(&[]).expect("verify");
        assert!(v.damage.is_empty(), "{:?}", v.damage);
    });
    assert_eq!(
        threads(),
        before,
        "compression threads outlived their store"
    );
}

/// A format 3 store stays format 3 (no frames) until `upgrade`; set_compression says to upgrade;
/// after the upgrade and a setting, new pages are framed and old ones read as before.
#[test]
fn format_3_stays_plain_until_upgraded() {
    let _g = serial();
    let io = Arc::new(FaultyStorage::new());
    let mut store = Store::init_format3_with(io.clone(), common::opts()).expect("init");
    within(120, "upgrade", move || {
        store.begin(None).expect("begin");
        let mut m = BTreeMap::new();
        for v in 0..40u64 {
            let p = cpage(v, 512);
            store.put(Vpn(v), &p).expect("put");
            m.insert(v, p);
        }
        let a = store.commit(SnapshotMeta::default()).expect("commit").id;
        assert_eq!(store.format_version(), 3);
        match store.set_compression(Compression::Lz4) {
            Err(StoreError::Usage(msg)) => assert!(msg.contains("upgrade"), "{msg}"),
            other => panic!("set_compression on format 3: {other:?}"),
        }
        store.upgrade().expect("upgrade");
        assert_eq!(store.format_version(), 4);
        assert_eq!(store.compression(), Compression::None);
        store.set_compression(Compression::Lz4).expect("set");
        store.begin(Some(a)).expect("begin");
        let mut m2 = m.clone();
        for v in 40..80u64 {
            let p = cpage(v, 512);
            store.put(Vpn(v), &p).expect("put");
            m2.insert(v, p);
        }
        let b = store.commit(SnapshotMeta::default()).expect("commit").id;
        check_pages(&store, a, &m);
        check_pages(&store, b, &m2);
        drop(store);
        let (store, _) = Store::open_with(io.clone(), Mode::Read, common::opts()).expect("open");
        assert_eq!(store.compression(), Compression::Lz4);
        check_pages(&store, a, &m);
        check_pages(&store, b, &m2);
        let names = io.list().expect("list");
        assert!(!names.is_empty());
    });
}

/// Incompressible data makes most frames skip the attempt (one in 8 is tried); compressible
/// data after it is compressed again once a tried frame shrinks, and every page reads back.
#[test]
fn random_then_compressible_pages_are_stored_plain_then_compressed() {
    let _g = serial();
    let io = Arc::new(FaultyStorage::new());
    let mut store = Store::init_with(io, opts4k(Compression::Auto)).expect("init");
    store.begin(None).expect("begin");
    let mut expected = BTreeMap::new();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for v in 0..512u64 {
        let p: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        store.put(Vpn(v), &p).expect("put");
        expected.insert(v, p);
    }
    let random = store.commit(SnapshotMeta::default()).expect("commit");
    assert!(random.data_bytes >= 512 * 4096, "random pages stay plain");
    store.begin(Some(random.id)).expect("begin");
    for v in 512..1024u64 {
        let p = cpage(v, 4096);
        store.put(Vpn(v), &p).expect("put");
        expected.insert(v, p);
    }
    let text = store.commit(SnapshotMeta::default()).expect("commit");
    assert!(
        text.data_bytes < 512 * 4096 * 7 / 10,
        "compressible pages after random ones are compressed again: {} bytes",
        text.data_bytes
    );
    check_pages(&store, text.id, &expected);
    assert!(store.verify(&[]).expect("verify").is_clean());
}
