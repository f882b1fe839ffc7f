//! A gc whose storage backend panics (unwinds out of a storage call) at any point: the next
//! change either abandons it (before its commit point) or completes it in memory (after), and
//! nothing committed before or after is lost, in the writer or in any crash image.

use pagesnap_store::fault::{FaultyStorage, Intercept, Op};
use pagesnap_store::{Mode, SnapshotId, SnapshotMeta, Store, Vpn};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

mod common;
use common::{opts, page, pages_of};

type Expected = BTreeMap<SnapshotId, BTreeMap<u64, Vec<u8>>>;

fn check(store: &Store, expected: &Expected, context: &str) -> Result<(), String> {
    let ids = store
        .snapshot_ids()
        .map_err(|e| format!("{context}: list: {e}"))?;
    if ids != expected.keys().copied().collect::<Vec<_>>() {
        return Err(format!("{context}: listed {ids:?}"));
    }
    for (id, pages) in expected {
        let got = pages_of(store, *id)
            .map_err(|e| format!("{context}: snapshot {id} reads back: {e}"))?;
        if &got != pages {
            return Err(format!("{context}: snapshot {id} differs"));
        }
    }
    Ok(())
}

/// A store on `io` with three snapshots of 8 pages each, the first deleted (so gc has work).
fn three_snapshots_first_deleted(io: Arc<Intercept>) -> (Store, Expected) {
    let mut store = Store::init_with(io, opts()).expect("init");
    let mut expected = Expected::new();
    let mut ids = Vec::new();
    let mut cur: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for round in 0..3u64 {
        store.begin(ids.last().copied()).expect("begin");
        for v in 0..8u64 {
            let p = page(round * 100 + v);
            store.put(Vpn(v), &p).expect("put");
            cur.insert(v, p);
        }
        let id = store.commit(SnapshotMeta::default()).expect("commit").id;
        ids.push(id);
        expected.insert(id, cur.clone());
    }
    store.delete(&[ids[0]]).expect("delete");
    expected.remove(&ids[0]);
    (store, expected)
}

/// Commits a snapshot changing one page on `parent` (its map a delta on the parent's), or a
/// fresh one; then checks the writer and `images` crash images of `inner` against `expected`
/// (which gains it). What went wrong, as messages.
fn commit_and_check(
    store: &mut Store,
    inner: &FaultyStorage,
    expected: &mut Expected,
    parent: Option<SnapshotId>,
    images: u64,
) -> Vec<String> {
    let committed = store.begin(parent).and_then(|()| {
        store.put(Vpn(3), &page(777))?;
        store.commit(SnapshotMeta::default())
    });
    let id = match committed {
        Ok(rep) => rep.id,
        Err(e) => return vec![format!("commit: {e}")],
    };
    let mut m = parent.map(|p| expected[&p].clone()).unwrap_or_default();
    m.insert(3, page(777));
    expected.insert(id, m);
    let mut errs: Vec<String> = check(store, expected, "the writer")
        .err()
        .into_iter()
        .collect();
    for seed in 0..images {
        match Store::open_with(Arc::new(inner.crash_image(seed)), Mode::Read, opts()) {
            Err(e) => errs.push(format!("crash image {seed}: open: {e}")),
            Ok((r, _)) => errs.extend(check(&r, expected, &format!("crash image {seed}")).err()),
        }
    }
    errs
}

/// A gc whose backend panics: past its commit point, at the write of the superblock's second
/// slot (the first, the commit point, written and synced); before it, at the sync of its new
/// segment.
fn store_after_gc_panic(past_commit_point: bool) -> (Arc<FaultyStorage>, Store, Expected) {
    let inner = Arc::new(FaultyStorage::new());
    // 0: off; n > 0: armed, counting the operations the panic is aimed at.
    let armed = Arc::new(AtomicU32::new(0));
    let a = armed.clone();
    let io = Arc::new(Intercept::new(inner.clone(), move |op| {
        let aimed = match op {
            Op::Write {
                name: "superblock", ..
            } => past_commit_point,
            Op::Sync(name) => !past_commit_point && name.starts_with("seg-"),
            _ => false,
        };
        let nth = if past_commit_point { 2 } else { 1 };
        if aimed && a.load(Ordering::SeqCst) > 0 && a.fetch_add(1, Ordering::SeqCst) == nth {
            panic!("backend panic in gc (past its commit point: {past_commit_point})");
        }
        Ok(())
    }));
    let (mut store, expected) = three_snapshots_first_deleted(io);
    armed.store(1, Ordering::SeqCst);
    let gc = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| store.gc()));
    assert!(gc.is_err(), "gc panicked in its backend");
    armed.store(0, Ordering::SeqCst);
    (inner, store, expected)
}

/// The gc did commit (its first slot is durable), but the catalog, the page map cache and the
/// sequence number were still the ones before it: the next change moves them to the gc's state.
#[test]
fn a_gc_that_panicked_after_its_commit_point_loses_nothing() {
    let (inner, mut store, mut expected) = store_after_gc_panic(true);
    for seed in 0..4 {
        let (r, _) =
            Store::open_with(Arc::new(inner.crash_image(seed)), Mode::Read, opts()).expect("open");
        check(
            &r,
            &expected,
            &format!("reader after the panic, image {seed}"),
        )
        .unwrap();
    }
    let parent = expected.keys().last().copied();
    let errs = commit_and_check(&mut store, &inner, &mut expected, parent, 8);
    std::mem::forget(store);
    assert!(errs.is_empty(), "{errs:#?}");
}

/// A store closed right after a gc panicked, on either side of its commit point: a writer
/// reopens it, lists what it held, and commits as usual.
#[test]
fn a_store_closed_after_a_gc_that_panicked_reopens_and_commits() {
    for past_commit_point in [false, true] {
        let (inner, store, mut expected) = store_after_gc_panic(past_commit_point);
        drop(store);
        let (mut store, _) = Store::open_with(inner.clone(), Mode::Write, opts()).expect("reopen");
        check(&store, &expected, "reopened").unwrap();
        let parent = expected.keys().last().copied();
        let errs = commit_and_check(&mut store, &inner, &mut expected, parent, 4);
        assert!(
            errs.is_empty(),
            "past its commit point: {past_commit_point}: {errs:#?}"
        );
    }
}

/// Every storage operation of a gc, in turn, panics — before it, then after it (the operation
/// done: a segment created, a slot written); then a child is committed, and the writer and every
/// crash image must hold all of it.
#[test]
fn a_gc_panicking_at_any_operation_loses_nothing() {
    let mut report = Vec::new();
    // Set once a gc completes before its k-th operation: every operation was tried.
    let mut done = [false; 2];
    for (after, k) in [false, true]
        .into_iter()
        .flat_map(|a| (0..400u32).map(move |k| (a, k)))
    {
        if done[usize::from(after)] {
            continue;
        }
        let inner = Arc::new(FaultyStorage::new());
        let count = Arc::new(AtomicU32::new(u32::MAX));
        let desc = Arc::new(std::sync::Mutex::new(String::new()));
        let fire = {
            let (c, d) = (count.clone(), desc.clone());
            move |op: &Op<'_>| {
                if c.load(Ordering::SeqCst) != u32::MAX && c.fetch_add(1, Ordering::SeqCst) == k {
                    // A panic, not an error: the rewrite's error paths do not run.
                    *d.lock().unwrap() = format!("{op:?}").chars().take(60).collect();
                    panic!("backend panic at op {k} (after: {after})");
                }
            }
        };
        let io = if after {
            Intercept::new(inner.clone(), |_| Ok(())).after(fire)
        } else {
            Intercept::new(inner.clone(), move |op| {
                fire(op);
                Ok(())
            })
        };
        let (mut store, mut expected) = three_snapshots_first_deleted(Arc::new(io));
        count.store(0, Ordering::SeqCst);
        let gc = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| store.gc()));
        count.store(u32::MAX, Ordering::SeqCst);
        if gc.is_ok() {
            assert!(
                k > 20,
                "a gc of this store takes more than {k} storage operations"
            );
            std::mem::forget(store);
            done[usize::from(after)] = true;
            continue;
        }
        let at = desc.lock().unwrap().clone();
        let parent = expected.keys().last().copied();
        let errs = commit_and_check(&mut store, &inner, &mut expected, parent, 4);
        std::mem::forget(store);
        if let Some(first) = errs.first() {
            report.push(format!(
                "op {k} after {after} ({at}): {} errors, first: {first}",
                errs.len()
            ));
        }
    }
    assert!(
        done == [true; 2],
        "a gc of this store takes fewer than 400 operations"
    );
    assert!(report.is_empty(), "{report:#?}");
}

/// A double fault: gc's first superblock slot fails (publish's undo lands, and moves the
/// generation although gc did not commit), then the backend panics while the failed gc is rolled
/// back (removing gc's new segment). The next change must abandon it again, not take it as
/// committed: taken so, a commit on a fresh snapshot returned `Ok` into gc's segment, and every
/// crash image lost every snapshot. Both with a parent and without one.
#[test]
fn a_gc_that_failed_then_panicked_in_its_rollback_loses_nothing() {
    for fresh in [false, true] {
        let inner = Arc::new(FaultyStorage::new());
        // 0 off; 1: the next superblock write fails; 2: the next remove panics; 3 done.
        let state = Arc::new(AtomicU32::new(0));
        let s = state.clone();
        let io = Arc::new(Intercept::new(inner.clone(), move |op| {
            match (s.load(Ordering::SeqCst), op) {
                (
                    1,
                    Op::Write {
                        name: "superblock", ..
                    },
                ) => {
                    s.store(2, Ordering::SeqCst);
                    return Err(std::io::Error::other("injected"));
                }
                (2, Op::Remove(_)) => {
                    s.store(3, Ordering::SeqCst);
                    panic!("backend panic while the failed gc is rolled back");
                }
                _ => {}
            }
            Ok(())
        }));
        let (mut store, mut expected) = three_snapshots_first_deleted(io);
        state.store(1, Ordering::SeqCst);
        let gc = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| store.gc()));
        assert!(
            gc.is_err() && state.load(Ordering::SeqCst) == 3,
            "both faults hit"
        );
        let parent = expected.keys().last().copied().filter(|_| !fresh);
        let errs = commit_and_check(&mut store, &inner, &mut expected, parent, 4);
        std::mem::forget(store);
        assert!(errs.is_empty(), "fresh {fresh}: {errs:#?}");
    }
}
