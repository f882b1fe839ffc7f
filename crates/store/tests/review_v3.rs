//! Hostile review of format 3 (the commit log): each test shows one finding.

use pagesnap_store::fault::{FaultyStorage, Intercept, Op};
use pagesnap_store::{Mode, SnapshotId, SnapshotMeta, Store, Vpn};
use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

mod common;
use common::{opts, page};

type Expected = BTreeMap<SnapshotId, BTreeMap<u64, Vec<u8>>>;

fn assert_holds(store: &Store, expected: &Expected, context: &str) {
    let ids = store.snapshot_ids().expect("list");
    assert_eq!(
        ids,
        expected.keys().copied().collect::<Vec<_>>(),
        "{context}: the snapshots listed"
    );
    for (id, pages) in expected {
        let mut got = BTreeMap::new();
        store
            .for_each_page(*id, |v, r| {
                got.insert(v.0, store.read_ref(r)?);
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{context}: snapshot {id} reads back: {e}"));
        assert_eq!(&got, pages, "{context}: snapshot {id}");
    }
}

fn ioerr() -> io::Error {
    io::Error::from_raw_os_error(5)
}

/// Finding 1: a put whose segment roll could not write its hint (the sync of the full segment
/// failed) returns Err but leaves the writer in the new segment, unnamed by any superblock, and
/// with a range crc that still covers the old segment's bytes. A commit after it returns Ok; after
/// a crash (before any later hint) the commit is gone and open deletes its segment as a leftover.
#[test]
fn a_commit_after_a_put_whose_roll_hint_failed_survives_a_crash() {
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
    assert_eq!(failed, 1, "one put failed (its roll's hint)");
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
