//! Fixed: `change_all` now sums on scoped threads of the store's own; this test failed (timed
//! out) while it used the global pool.
//!
//! Found by the review of d01eaa6 (`ContentRoot::change_all` sums the content-root terms on rayon's global
//! pool from 4096 changes). Its own test binary, because it sizes the global pool (one thread,
//! deterministic; the same happens with N threads whenever N pool jobs wait).
//!
//! Before d01eaa6 `Store::commit` never used the global pool (plain `put` hashes on the calling
//! thread), so a program that shares a store behind a mutex and touches it from pool jobs was
//! fine. Now a commit of >= 4096 changes, made by a thread that is not a pool worker while every
//! worker waits for that mutex (held by the committer), injects its summing jobs into a pool
//! that can never run them: the commit never returns and the mutex is never released.

use pagesnap_store::{Compression, SnapshotMeta, Store, StoreOptions, Vpn};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[test]
fn a_large_commit_while_every_pool_worker_waits_for_the_store_completes() {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global()
        .expect("global pool");
    let dir = tempfile::tempdir().expect("tmp");
    let opts = StoreOptions {
        page_size: 512,
        compression: Compression::None,
        ..StoreOptions::default()
    };
    let store = Arc::new(Mutex::new(
        Store::init(dir.path().join("store"), opts).expect("store"),
    ));
    let (tx, rx) = std::sync::mpsc::channel();
    let shared = store.clone();
    std::thread::spawn(move || {
        let mut s = shared.lock().expect("lock");
        s.begin(None).expect("begin");
        for v in 0..5000u64 {
            let mut p = vec![0u8; 512];
            p[..8].copy_from_slice(&v.to_le_bytes());
            s.put(Vpn(v), &p).expect("put");
        }
        // A pool job that wants the store (a reader, say) waits for this thread's lock. Once it
        // has started, the pool's only worker is taken by it until the lock is free.
        let waiter = shared.clone();
        let (started, running) = std::sync::mpsc::channel();
        rayon::spawn(move || {
            let _ = started.send(());
            let _g = waiter.lock();
        });
        running.recv().expect("the pool job started");
        let r = s.commit(SnapshotMeta::default()).map(|c| c.id);
        let _ = tx.send(r);
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(r) => {
            r.expect("commit");
        }
        Err(_) => panic!(
            "a commit of 5000 pages did not return in 30 s while the pool's only worker waited \
             for the store's lock (deadlock: change_all runs on the global pool)"
        ),
    }
}
