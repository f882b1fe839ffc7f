//! Review 17: `pagehash::HashedPages` and `Store::put_hashed_pages`.

use pagesnap_store::keys::{KdfParams, Password};
use pagesnap_store::pagehash::{HashedPages, PageIds};
use pagesnap_store::{Compression, Mode, SnapshotMeta, Store, StoreOptions, Vpn};

fn pw() -> Password {
    Password::new("pw")
}

fn opts(page_size: u32) -> StoreOptions {
    StoreOptions {
        page_size,
        compression: Compression::Auto,
        ..StoreOptions::default()
    }
}

fn enc(dir: &std::path::Path, page_size: u32) -> Store {
    Store::init_encrypted(dir, opts(page_size), &pw(), KdfParams::FOR_TESTS, "t").expect("init")
}

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

/// A batch of `n` pages, every seventh all zero, one page zero but for its last byte.
fn batch(n: usize, ps: usize, seed: u64) -> Vec<u8> {
    let mut buf = Vec::with_capacity(n * ps);
    for i in 0..n {
        if i % 7 == 3 {
            buf.extend(std::iter::repeat_n(0u8, ps));
        } else if i % 7 == 5 {
            let mut p = vec![0u8; ps];
            p[ps - 1] = 1;
            buf.extend(p);
        } else {
            buf.extend(noise(ps, seed + i as u64));
        }
    }
    buf
}

/// HashedPages' ids are the store's ids (keyed blake3 via `DedupKey::id`, i.e.
/// `blake3::keyed_hash`) for every page size a store may have, 512 B to 16 MiB, across the
/// SIMD batch (64) and rayon group (256) boundaries. The crate's own pagehash test stops at
/// 64 KiB.
#[test]
fn ids_are_the_keyed_ids_for_every_store_page_size() {
    let dir = tempfile::tempdir().expect("tmp");
    let keyed = enc(dir.path(), 4096).page_ids();
    let plain = PageIds::default();
    let mut ps = 512usize;
    while ps <= 16 << 20 {
        let counts: &[usize] = if ps <= 8192 {
            &[0, 1, 63, 64, 65, 257, 300]
        } else if ps <= 1 << 20 {
            &[1, 17, 66]
        } else {
            &[1, 3]
        };
        for &n in counts {
            let buf = batch(n, ps, ps as u64 ^ n as u64);
            for ids in [&keyed, &plain] {
                let hp = HashedPages::new(ids, buf.clone(), n, ps);
                assert_eq!(hp.len(), n);
                for i in 0..n {
                    let p = &buf[i * ps..(i + 1) * ps];
                    assert_eq!(hp.page(i), p);
                    if p.iter().all(|b| *b == 0) {
                        assert_eq!(hp.id(i), None, "ps {ps} n {n} i {i}");
                    } else {
                        assert_eq!(hp.id(i), Some(&ids.id(p)), "ps {ps} n {n} i {i} {ids:?}");
                    }
                }
            }
        }
        ps *= 2;
    }
}

/// A zero page of a batch hashed with another page size is a PageSize error, as `put` of the
/// same bytes is (the review found it removed the vpn, and the commit succeeded).
#[test]
fn a_zero_page_of_another_page_size_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut store = enc(dir.path(), 4096);
    store.begin(None).expect("begin");
    store.put(Vpn(0), &noise(4096, 1)).expect("put");
    let s1 = store.commit(SnapshotMeta::default()).expect("commit").id;

    store.begin(Some(s1)).expect("begin");
    assert!(
        store.put(Vpn(0), &[0u8; 512]).is_err(),
        "put checks the size"
    );
    let wrong = HashedPages::new(&store.page_ids(), vec![0u8; 512], 1, 512);
    let r = store.put_hashed_pages(Vpn(0), &wrong, 0);
    // A data page of the wrong size is refused...
    let data = HashedPages::new(&store.page_ids(), noise(512, 2), 1, 512);
    assert!(store.put_hashed_pages(Vpn(1), &data, 0).is_err());
    store.abort();
    // ...but the zero one is not.
    assert!(
        r.is_err(),
        "zero page of 512 bytes in a 4096-byte store was accepted (removes vpn 0)"
    );
}

/// An index past the batch is `StoreError::Usage`, like the store's other caller errors (the
/// review found a panic inside the store's public API).
#[test]
fn an_index_past_the_batch_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut store = enc(dir.path(), 4096);
    let hp = HashedPages::new(&store.page_ids(), noise(4096 * 2, 3), 2, 4096);
    store.begin(None).expect("begin");
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        store.put_hashed_pages(Vpn(0), &hp, 2)
    }));
    assert!(
        matches!(r, Ok(Err(_))),
        "put_hashed_pages(i = len) panicked instead of returning an error"
    );
}

/// A store copied byte for byte (same master key) takes the other's batches,
/// whose ids are its own ids; a store with the same password but a new key does not.
#[test]
fn same_key_copies_accept_new_keys_refuse() {
    let a = tempfile::tempdir().expect("tmp");
    let store_a = enc(a.path(), 4096);
    drop(store_a);
    let b = tempfile::tempdir().expect("tmp");
    for e in std::fs::read_dir(a.path()).expect("ls") {
        let e = e.expect("entry");
        if e.file_name() != "lock" {
            std::fs::copy(e.path(), b.path().join(e.file_name())).expect("copy");
        }
    }
    let (store_a, _) = Store::open_encrypted(a.path(), Mode::Read, Some(&pw())).expect("a");
    let (mut store_b, _) = Store::open_encrypted(b.path(), Mode::Write, Some(&pw())).expect("b");
    let hp = HashedPages::new(&store_a.page_ids(), noise(4096, 9), 1, 4096);
    store_b.begin(None).expect("begin");
    store_b.put_hashed_pages(Vpn(0), &hp, 0).expect("same key");
    let s = store_b.commit(SnapshotMeta::default()).expect("commit").id;
    assert_eq!(
        store_b.read_page(s, Vpn(0)).expect("read"),
        Some(noise(4096, 9))
    );
    let c = tempfile::tempdir().expect("tmp");
    let store_c = enc(c.path(), 4096);
    let hc = HashedPages::new(&store_c.page_ids(), noise(4096, 9), 1, 4096);
    store_b.begin(Some(s)).expect("begin");
    assert!(store_b.put_hashed_pages(Vpn(0), &hc, 0).is_err());
    store_b.abort();
}

/// A batch whose pages also appear in this snapshot (dedup against a page written
/// by the same commit, the unchecked `claimed == false` branch of put3) and against a stored
/// page reads back right, in many page sizes.
#[test]
fn dedup_within_and_across_commits_reads_back() {
    for ps in [512usize, 1024, 4096, 65536] {
        let dir = tempfile::tempdir().expect("tmp");
        let mut store = enc(dir.path(), ps as u32);
        let mut buf = Vec::new();
        for i in 0..40u64 {
            buf.extend(if i % 5 == 4 {
                vec![0u8; ps]
            } else {
                noise(ps, i % 6)
            });
        }
        let hp = HashedPages::new(&store.page_ids(), buf.clone(), 40, ps);
        store.begin(None).expect("begin");
        for i in 0..40 {
            store.put_hashed_pages(Vpn(i as u64), &hp, i).expect("put");
        }
        let s1 = store.commit(SnapshotMeta::default()).expect("commit").id;
        store.begin(Some(s1)).expect("begin");
        for i in 0..40 {
            store
                .put_hashed_pages(Vpn(100 + i as u64), &hp, i)
                .expect("put");
        }
        let s2 = store.commit(SnapshotMeta::default()).expect("commit").id;
        for (s, base) in [(s1, 0u64), (s2, 100)] {
            for i in 0..40u64 {
                let want = (i % 5 != 4).then(|| noise(ps, i % 6));
                assert_eq!(
                    store.read_page(s, Vpn(base + i)).expect("read"),
                    want,
                    "ps {ps}"
                );
            }
        }
        assert!(store.verify(&[]).expect("verify").is_clean());
    }
}

/// A page count times page size that overflows is refused (a panic at construction, documented)
/// rather than wrapped: the review found that in release builds it wrapped, and for a page size
/// that does not divide 2^64 an id was then the hash of fewer bytes than its page.
#[test]
#[cfg(not(debug_assertions))]
fn an_overflowing_batch_length_is_refused_not_wrapped() {
    let ids = PageIds::default();
    let k = (u64::MAX / 3 + 1) as usize; // 3k = 2^64 + 2 -> wraps to 2
    let buf = vec![1u8, 2, 3, 4, 5, 6];
    // Refusing the batch (a panic: a caller's error, as documented) is fine; pairing id and
    // bytes that do not match is not.
    let Ok(hp) = std::panic::catch_unwind(|| HashedPages::new(&ids, buf, k, 3)) else {
        return;
    };
    for i in 0..hp.len() {
        assert_eq!(
            hp.id(i),
            Some(&ids.id(hp.page(i))),
            "id({i}) is not the id of page({i}) (blake3 of [1, 2] against [1, 2, 3])"
        );
    }
}
