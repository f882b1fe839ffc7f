//! The review of `for_each_page_batch` / `restore_image` (commit dee514e): edge cases and failure
//! paths. Each test is its own process-level concern only where it says so.

use pagesnap_engine::image::{for_each_page_batch, restore_image, snapshot_image, ImageError};
use pagesnap_store::{Store, StoreOptions};
use std::path::Path;
use std::time::Duration;

/// Every fourth page zero, the others unique (so a batch holds many short runs).
fn image(pages: usize, seed: u8) -> Vec<u8> {
    let mut data = vec![0u8; pages * 4096];
    for (p, page) in data.chunks_mut(4096).enumerate() {
        if p % 4 != 0 {
            let mut x = (p as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(seed);
            for c in page.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
        }
    }
    data
}

fn store_with(dir: &Path, data: &[u8]) -> (Store, pagesnap_store::SnapshotId) {
    let path = dir.join("disk.img");
    std::fs::write(&path, data).expect("write");
    let mut store = Store::init(dir.join("store"), StoreOptions::default()).expect("store");
    let snap = snapshot_image(&mut store, &path, None, &|_| {}).expect("snapshot");
    (store, snap.id)
}

fn tmp_leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

/// An empty image: no batch at all, and the restore is an empty file.
#[test]
fn an_empty_image_has_no_batch_and_restores_empty() {
    let dir = tempfile::tempdir().expect("tmp");
    let (store, id) = store_with(dir.path(), &[]);
    let mut calls = 0;
    for_each_page_batch(&store, id, |_, _, _| -> Result<(), ImageError> {
        calls += 1;
        Ok(())
    })
    .expect("batches");
    assert_eq!(calls, 0);
    let out = dir.path().join("out.img");
    let r = restore_image(&store, id, &out, &|_| {}).expect("restore");
    assert_eq!(r.image_size, 0);
    assert_eq!(std::fs::metadata(&out).expect("meta").len(), 0);
    assert!(tmp_leftovers(dir.path()).is_empty());
}

/// All pages zero: batches with no runs, and a restore of the right size that is all zero.
#[test]
fn an_all_zero_image_has_batches_without_runs_and_restores_exactly() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = vec![0u8; 3 * 4096 * 1024 + 1234];
    let (store, id) = store_with(dir.path(), &data);
    let mut next = 0;
    for_each_page_batch(&store, id, |first, n, runs| -> Result<(), ImageError> {
        assert_eq!(first, next);
        assert!(runs.is_empty());
        next = first + n;
        Ok(())
    })
    .expect("batches");
    assert_eq!(next, (data.len() as u64).div_ceil(4096));
    let out = dir.path().join("out.img");
    let r = restore_image(&store, id, &out, &|_| {}).expect("restore");
    assert_eq!(r.pages_written, 0);
    assert!(std::fs::read(&out).expect("read") == data);
}

/// A size that is no multiple of the page size, the last (partial) page non-zero and in the
/// middle of a run, and a batch boundary crossed by data: the restore is the image exactly, and
/// progress ends at the size.
#[test]
fn a_partial_last_page_restores_exactly() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut data = image(1024 + 9, 4);
    data.truncate(data.len() - 4096 + 777);
    let last = data.len() - 1;
    data[last] = 0xEE;
    let (store, id) = store_with(dir.path(), &data);
    let out = dir.path().join("out.img");
    let seen = std::sync::Mutex::new(Vec::new());
    restore_image(&store, id, &out, &|p| seen.lock().unwrap().push(p)).expect("restore");
    assert!(std::fs::read(&out).expect("read") == data);
    let seen = seen.into_inner().unwrap();
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert_eq!(seen.last().copied(), Some(data.len() as u64));
}

/// A panic in the writer (here: the caller's progress callback) neither deadlocks the reader
/// thread nor is swallowed, and `restore_image` leaves no temporary file behind (the review
/// found it did: its clean-up ran only on `Err`; the temporary file now removes itself on drop).
#[test]
fn a_panic_while_writing_leaves_no_temporary_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let (store, id) = store_with(dir.path(), &image(3000, 5));
    let outdir = dir.path().join("outdir");
    std::fs::create_dir(&outdir).expect("mkdir");
    let out = outdir.join("out.img");
    let (tx, rx) = std::sync::mpsc::channel();
    let store = std::sync::Arc::new(store);
    let s = store.clone();
    let o = out.clone();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            restore_image(&s, id, &o, &|_| panic!("progress callback panics"))
        }));
        let _ = tx.send(r.is_err());
    });
    let panicked = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("a writer panic must not deadlock the reader thread");
    assert!(panicked, "the panic propagates");
    assert!(!out.exists());
    let left = tmp_leftovers(&outdir);
    assert!(
        left.is_empty(),
        "temporary file left behind after a panic: {left:?}"
    );
}
