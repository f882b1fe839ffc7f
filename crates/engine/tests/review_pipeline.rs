//! Review of the image snapshot pipeline (reader thread + hash/store overlap): its error paths end
//! with the error, never a hang, and nothing is committed.

use pagesnap_engine::image::{snapshot_image, ImageError};
use pagesnap_store::fault::{FaultyStorage, Intercept, Op};
use pagesnap_store::{Store, StoreOptions};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

fn noise_image(pages: usize) -> Vec<u8> {
    let mut data = vec![0u8; pages * 4096];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for c in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    data
}

/// The store fails while batches are read ahead (the reader blocked on a full channel): the
/// snapshot returns the store's error.
#[test]
fn a_store_error_mid_pipeline_ends_the_snapshot() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("a.img");
    std::fs::write(&path, noise_image(10_000)).expect("write");
    let writes = Arc::new(AtomicU32::new(0));
    let w = writes.clone();
    let io = Arc::new(Intercept::new(Arc::new(FaultyStorage::new()), move |op| {
        if let Op::Write { name, .. } = op {
            if name.starts_with("seg-") && w.fetch_add(1, Ordering::SeqCst) > 6 {
                return Err(std::io::Error::from_raw_os_error(28));
            }
        }
        Ok(())
    }));
    let mut store = Store::init_with(io, StoreOptions::default()).expect("init");
    let err = snapshot_image(&mut store, &path, None, &|_| {}).expect_err("store fails");
    assert!(matches!(err, ImageError::Store(_)), "{err}");
    assert_eq!(store.latest().expect("latest"), None);
}

/// The image shrinks while it is read: the reader's error (a short read) reaches the snapshot,
/// whatever the consumer was doing.
#[test]
fn a_reader_error_mid_pipeline_ends_the_snapshot() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("b.img");
    std::fs::write(&path, noise_image(10_000)).expect("write");
    let mut store = Store::init(dir.path().join("store"), StoreOptions::default()).expect("init");
    let cut = AtomicBool::new(false);
    let err = snapshot_image(&mut store, &path, None, &|_| {
        if !cut.swap(true, Ordering::SeqCst) {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(4096))
                .expect("truncate");
        }
    })
    .expect_err("shrunk under the read");
    assert!(matches!(err, ImageError::Changed(_)), "{err}");
    assert_eq!(store.latest().expect("latest"), None);
}
