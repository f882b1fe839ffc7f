//! Review of dee514e: `restore_image` called from a job on rayon's global pool. Its own test
//! binary, because it sizes the global pool (one thread, deterministic; the same happens with N
//! threads whenever N restores run on the pool at once).
//!
//! The review found that `for_each_page_batch` blocked the calling thread on its channel while
//! its reader thread ran `par_iter` on the *global* pool: when the caller was that pool's worker
//! (and no other worker was free), the reader's job was never picked up — a deadlock. On a rayon
//! worker it now reads and writes each batch in turn on the calling thread.

use pagesnap_engine::image::{restore_image, snapshot_image};
use pagesnap_store::{Store, StoreOptions};
use std::time::Duration;

#[test]
fn restore_image_from_a_job_on_the_global_rayon_pool_completes() {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global()
        .expect("global pool");
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("disk.img");
    // Every fourth page zero: each batch has many runs, so par_iter really splits (rayon::join).
    let mut data = vec![0u8; 2048 * 4096];
    for (p, page) in data.chunks_mut(4096).enumerate() {
        if p % 4 != 0 {
            page.fill((p % 251) as u8 + 1);
            page[..8].copy_from_slice(&(p as u64).to_le_bytes());
        }
    }
    std::fs::write(&path, &data).expect("write");
    let mut store = Store::init(dir.path().join("store"), StoreOptions::default()).expect("store");
    let snap = snapshot_image(&mut store, &path, None, &|_| {}).expect("snapshot");
    let out = dir.path().join("out.img");
    let (tx, rx) = std::sync::mpsc::channel();
    let store = std::sync::Arc::new(store);
    let (s, o) = (store.clone(), out.clone());
    rayon::spawn(move || {
        let _ = tx.send(restore_image(&s, snap.id, &o, &|_| {}).map(|_| ()));
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(r) => r.expect("restore"),
        Err(_) => {
            panic!("restore_image called on a rayon worker did not finish in 60 s (deadlock)")
        }
    }
    assert!(std::fs::read(&out).expect("read") == data);
}
