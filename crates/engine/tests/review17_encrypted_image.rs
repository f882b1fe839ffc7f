//! Review 17: image snapshots through `HashedPages` / `put_hashed_pages` in encrypted and plain
//! stores, page sizes other than 4096, incremental snapshots (ids compared with the parent's),
//! holes, zeroed pages and a partial last page.

use pagesnap_engine::image::{restore_image, snapshot_image_with, SnapshotOptions};
use pagesnap_store::keys::{KdfParams, Password};
use pagesnap_store::{Mode, Store, StoreOptions};
use std::io::{Seek, SeekFrom, Write};

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write_at(path: &std::path::Path, at: u64, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    f.seek(SeekFrom::Start(at)).expect("seek");
    f.write_all(data).expect("write");
}

fn reread() -> SnapshotOptions {
    SnapshotOptions {
        reread: true,
        ..SnapshotOptions::default()
    }
}

#[test]
fn encrypted_and_plain_image_snapshots_in_many_page_sizes() {
    for encrypted in [true, false] {
        for ps in [512u64, 4096, 65536, 1 << 20] {
            let dir = tempfile::tempdir().expect("tmp");
            let path = dir.path().join("disk.img");
            let pages = 24u64;
            // Partial last page: the image is not a whole number of pages.
            let size = pages * ps - ps / 2;
            let f = std::fs::File::create(&path).expect("create");
            f.set_len(size).expect("len");
            drop(f);
            let mut want = vec![0u8; size as usize];
            for p in 0..pages {
                if p % 4 == 1 {
                    continue; // hole
                }
                let n = if p == pages - 1 { ps / 2 } else { ps } as usize;
                // Pages 2 and 6 and 10 hold the same bytes (dedup within the batch).
                let d = if p % 4 == 2 {
                    noise(n, 1000)
                } else if p % 4 == 3 {
                    vec![0u8; n] // written zeros
                } else {
                    noise(n, p)
                };
                write_at(&path, p * ps, &d);
                want[(p * ps) as usize..(p * ps) as usize + n].copy_from_slice(&d);
            }
            let sdir = dir.path().join("store");
            let opts = StoreOptions {
                page_size: ps as u32,
                ..StoreOptions::default()
            };
            let mut store = if encrypted {
                Store::init_encrypted(&sdir, opts, &Password::new("pw"), KdfParams::FOR_TESTS, "t")
                    .expect("init")
            } else {
                Store::init(&sdir, opts).expect("init")
            };
            let first =
                snapshot_image_with(&mut store, &path, None, &|_| {}, reread()).expect("first");
            let nonzero = (0..pages).filter(|p| p % 4 == 0 || p % 4 == 2).count() as u64;
            assert_eq!(first.pages_changed, nonzero, "enc {encrypted} ps {ps}");
            let out = dir.path().join("out1.img");
            restore_image(&store, first.id, &out, &|_| {}).expect("restore");
            assert!(
                std::fs::read(&out).expect("read") == want,
                "enc {encrypted} ps {ps}"
            );

            // Incremental: change one page, zero one, fill one hole, rewrite one unchanged.
            let change = |want: &mut Vec<u8>, p: u64, d: &[u8]| {
                write_at(&path, p * ps, d);
                want[(p * ps) as usize..(p * ps) as usize + d.len()].copy_from_slice(d);
            };
            change(&mut want, 0, &noise(ps as usize, 77));
            change(&mut want, 4, &vec![0u8; ps as usize]);
            change(&mut want, 5, &noise(ps as usize, 1000)); // a hole now a dedup page
            let same = noise(ps as usize, 8);
            change(&mut want, 8, &same); // same bytes as before
            let second =
                snapshot_image_with(&mut store, &path, None, &|_| {}, reread()).expect("second");
            assert_eq!(second.pages_changed, 3, "enc {encrypted} ps {ps}");
            let out = dir.path().join("out2.img");
            restore_image(&store, second.id, &out, &|_| {}).expect("restore");
            assert!(
                std::fs::read(&out).expect("read") == want,
                "enc {encrypted} ps {ps}"
            );
            assert!(store.verify(&[]).expect("verify").is_clean());
            drop(store);
            let (store, _) = if encrypted {
                Store::open_encrypted(&sdir, Mode::Read, Some(&Password::new("pw"))).expect("open")
            } else {
                Store::open(&sdir, Mode::Read).expect("open")
            };
            assert!(store.verify(&[]).expect("verify").is_clean());
        }
    }
}

/// The serve (tracked) path through `HashedPages` in an encrypted store, page sizes 512 and
/// 64 KiB: a full snapshot, then writes (a changed page, a zeroed page, a page written with its
/// own bytes) and a tracked snapshot; both restore byte for byte.
#[test]
fn tracked_snapshots_in_an_encrypted_store() {
    use pagesnap_engine::tracked::TrackedImage;
    for ps in [512u64, 65536] {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("disk.img");
        let pages = 40u64;
        let mut want = Vec::new();
        for p in 0..pages {
            want.extend(if p % 3 == 0 {
                vec![0u8; ps as usize]
            } else {
                noise(ps as usize, p % 7)
            });
        }
        std::fs::write(&path, &want).expect("write");
        let sdir = dir.path().join("store");
        let opts = StoreOptions {
            page_size: ps as u32,
            ..StoreOptions::default()
        };
        let mut store =
            Store::init_encrypted(&sdir, opts, &Password::new("pw"), KdfParams::FOR_TESTS, "t")
                .expect("init");
        let tracked = TrackedImage::open(&path, &dir.path().join("state"), &store).expect("open");
        let first = tracked
            .snapshot(&mut store, None, true, &|_| {})
            .expect("first");
        let out = dir.path().join("o1.img");
        restore_image(&store, first.snapshot.id, &out, &|_| {}).expect("restore");
        assert!(std::fs::read(&out).expect("read") == want, "ps {ps}");
        let mut put = |p: u64, d: Vec<u8>| {
            tracked.write(p * ps, &d, false).expect("write");
            want[(p * ps) as usize..((p + 1) * ps) as usize].copy_from_slice(&d);
        };
        put(1, noise(ps as usize, 99));
        put(2, vec![0u8; ps as usize]);
        put(4, noise(ps as usize, 4)); // same bytes (4 % 7)
        put(6, noise(ps as usize, 3)); // a zero page now the bytes of page 3's kind
        let second = tracked
            .snapshot(&mut store, None, false, &|_| {})
            .expect("second");
        assert_eq!(second.snapshot.pages_changed, 3, "ps {ps}");
        drop(tracked);
        let out = dir.path().join("o2.img");
        restore_image(&store, second.snapshot.id, &out, &|_| {}).expect("restore");
        assert!(std::fs::read(&out).expect("read") == want, "ps {ps}");
        assert!(store.verify(&[]).expect("verify").is_clean());
    }
}
