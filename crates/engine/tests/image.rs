//! Raw images as address spaces: what a snapshot writes, and what it refuses.

use pagesnap_engine::image::{restore_image, snapshot_image, ImageError};
use pagesnap_store::{Mode, Store, StoreOptions};
use std::io::Write;

/// Every fourth page zero, the others unique.
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

#[test]
fn an_image_that_changes_while_it_is_read_is_refused_and_nothing_is_committed() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("live.img");
    std::fs::write(&path, image(3000, 3)).expect("write");
    let mut store = Store::init(dir.path().join("store"), StoreOptions::default()).expect("store");
    let first = snapshot_image(&mut store, &path, None, &|_| {}).expect("first snapshot");
    // Something writes to the image while the second snapshot reads it.
    let grow = |done: u64| {
        if done > 0 && done < 3000 * 4096 {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .expect("open");
            f.write_all(&[1u8; 10]).expect("append");
        }
    };
    let err = snapshot_image(&mut store, &path, None, &grow).expect_err("changed under us");
    assert!(
        matches!(err, ImageError::Changed(_)) && err.to_string().contains("nothing was committed"),
        "{err}"
    );
    assert_eq!(store.latest().expect("latest"), Some(first.id));
    drop(store);
    let (store, _) = Store::open(dir.path().join("store"), Mode::Read).expect("reopen");
    assert_eq!(store.snapshot_ids().expect("ids"), vec![first.id]);
    assert!(store.verify(&[]).expect("verify").is_clean());
}

#[test]
fn an_incremental_image_snapshot_writes_only_changed_pages() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("disk.img");
    let mut data = image(2048, 5);
    std::fs::write(&path, &data).expect("write");
    let mut store = Store::init(dir.path().join("store"), StoreOptions::default()).expect("store");
    let first = snapshot_image(&mut store, &path, Some("a".into()), &|_| {}).expect("first");
    assert_eq!(first.pages_changed, 1536, "every non-zero page is new");
    for p in [3usize, 700, 2047] {
        data[p * 4096 + 1] ^= 0x40;
    }
    std::fs::write(&path, &data).expect("write");
    let second = snapshot_image(&mut store, &path, None, &|_| {}).expect("second");
    assert_eq!((second.pages_changed, second.pages_written), (3, 3));
    assert_eq!(second.data_bytes, 3 * (4096 + 64), "three page records");
    let out = dir.path().join("out.img");
    restore_image(&store, second.id, &out, &|_| {}).expect("restore");
    assert!(std::fs::read(&out).expect("read") == data);
}

/// The progress callback of the second snapshot runs between batches: it rewrites one page of a
/// batch already read (same size) and puts the modification time back exactly.
fn snapshot_while(tamper: impl Fn(&std::path::Path) + Sync) {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("live.img");
    std::fs::write(&path, image(3000, 7)).expect("write");
    let mut store = Store::init(dir.path().join("store"), StoreOptions::default()).expect("store");
    let first = snapshot_image(&mut store, &path, None, &|_| {}).expect("first snapshot");
    let once = std::sync::Once::new();
    let during = |done: u64| {
        if done > 0 && done < 3000 * 4096 {
            once.call_once(|| tamper(&path));
        }
    };
    let err = snapshot_image(&mut store, &path, None, &during).expect_err("changed under us");
    assert!(
        matches!(err, ImageError::Changed(_))
            && err.to_string().contains("nothing was committed")
            && err.to_string().contains("live.img"),
        "{err}"
    );
    assert!(once.is_completed(), "the image was changed during the read");
    assert_eq!(store.latest().expect("latest"), Some(first.id));
    assert_eq!(store.snapshot_ids().expect("ids"), vec![first.id]);
}

#[test]
fn a_write_during_the_read_whose_mtime_is_put_back_is_refused() {
    snapshot_while(|path| {
        let mtime = std::fs::metadata(path)
            .expect("stat")
            .modified()
            .expect("mtime");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .expect("open");
        std::os::unix::fs::FileExt::write_all_at(&f, &[0xAB; 64], 5).expect("write");
        f.set_modified(mtime).expect("put the mtime back");
        drop(f);
        let now = std::fs::metadata(path).expect("stat");
        assert_eq!(now.modified().expect("mtime"), mtime, "mtime restored");
        assert_eq!(now.len(), 3000 * 4096, "same size");
    });
}

#[test]
fn an_image_replaced_during_the_read_by_another_file_is_refused() {
    snapshot_while(|path| {
        let old = std::fs::metadata(path).expect("stat");
        let other = path.with_extension("new");
        let mut data = std::fs::read(path).expect("read");
        data[5] ^= 1;
        std::fs::write(&other, &data).expect("write");
        std::fs::File::options()
            .write(true)
            .open(&other)
            .expect("open")
            .set_modified(old.modified().expect("mtime"))
            .expect("mtime");
        std::fs::rename(&other, path).expect("rename over the image");
    });
}
