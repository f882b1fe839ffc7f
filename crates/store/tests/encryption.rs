//! Encryption at rest (issue 17), through the store's API: no plaintext anywhere in the store's
//! files, the password and the key file are required, and every kind of sealed record —
//! frame, page map chunk, commit record — tampered, truncated or swapped for another of the same
//! size is caught by verify and never read back as other bytes.

use pagesnap_store::keys::{KdfParams, Password};
use pagesnap_store::{
    Cipher, Compression, Mode, SnapshotId, SnapshotMeta, Storage, Store, StoreError, StoreOptions,
    Vpn,
};
use std::path::Path;

const PS: usize = 4096;
const MARKER: &[u8] = b"PAGESNAP-PLAINTEXT-MARKER";

fn pw(s: &str) -> Password {
    Password::from(s)
}

/// A page holding the marker and some text (compressible) or random bytes.
fn page(i: u64, random: bool) -> Vec<u8> {
    let mut p = vec![0u8; PS];
    if random {
        let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        for b in p.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    } else {
        for (k, c) in p.chunks_mut(64).enumerate() {
            let line = format!("page {i} line {k} of an ordinary text file{:.<64}", "");
            c.copy_from_slice(&line.as_bytes()[..64]);
        }
    }
    p[100..100 + MARKER.len()].copy_from_slice(MARKER);
    p
}

fn opts(c: Compression) -> StoreOptions {
    StoreOptions {
        compression: c,
        ..StoreOptions::default()
    }
}

/// An encrypted store with two snapshots (the second changes a few pages and deletes some).
/// Snapshots with their pages (page number, bytes).
type Snaps = Vec<(SnapshotId, Vec<(u64, Vec<u8>)>)>;

fn build(dir: &Path, c: Compression) -> Snaps {
    build_with(dir, c, Cipher::default())
}

/// Both ciphers: scheme 2 (the default) and scheme 1 (stores made before it), which must stay
/// readable and writable.
const CIPHERS: [Cipher; 2] = [Cipher::Aes256GcmSiv, Cipher::XChaCha20Poly1305];

fn build_with(dir: &Path, c: Compression, cipher: Cipher) -> Snaps {
    std::fs::create_dir_all(dir).expect("dir");
    let io: pagesnap_store::SharedStorage =
        std::sync::Arc::new(pagesnap_store::FsStorage::new(dir, true));
    let mut store = Store::init_encrypted_cipher_with(
        io,
        opts(c),
        &pw("right"),
        KdfParams::FOR_TESTS,
        "test",
        cipher,
    )
    .expect("init");
    assert_eq!(store.cipher(), Some(cipher));
    let mut out = Vec::new();
    let mut pages: Vec<(u64, Vec<u8>)> = (0..96).map(|i| (i, page(i, i % 3 == 0))).collect();
    // Two whole frames of random pages: frames of one size whatever the cipher's overhead (the
    // swap test needs a pair).
    pages.extend((300..332).map(|i| (i, page(i, true))));
    store.begin(None).expect("begin");
    for (v, p) in &pages {
        store.put(Vpn(*v), p).expect("put");
    }
    // The engine's way: ids computed with the store's keyed hasher.
    let id = store.page_ids().id(&page(200, false));
    store
        .put_hashed(Vpn(200), &page(200, false), id)
        .expect("put_hashed");
    pages.push((200, page(200, false)));
    let a = store.commit(SnapshotMeta::default()).expect("commit").id;
    out.push((a, pages.clone()));
    store.begin(Some(a)).expect("begin");
    for i in 0..8u64 {
        store.put(Vpn(i), &page(1000 + i, false)).expect("put");
        pages[i as usize].1 = page(1000 + i, false);
    }
    let b = store
        .commit(SnapshotMeta {
            label: Some("secret label".into()),
            ..SnapshotMeta::default()
        })
        .expect("commit")
        .id;
    out.push((b, pages));
    out
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().expect("name").to_string_lossy().into_owned(),
                std::fs::read(&p).expect("read"),
            )
        })
        .collect();
    v.sort();
    v
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn no_plaintext_and_no_plain_page_hash_anywhere_in_the_store() {
    for (c, cipher) in [Compression::Auto, Compression::None, Compression::Lz4]
        .into_iter()
        .flat_map(|c| CIPHERS.map(|k| (c, k)))
    {
        let dir = tempfile::tempdir().expect("tmp");
        let snaps = build_with(dir.path(), c, cipher);
        let all = files(dir.path());
        assert!(all.iter().any(|(n, _)| n == "keys"));
        for (name, bytes) in &all {
            assert!(!contains(bytes, MARKER), "{c}: the marker in {name}");
            assert!(
                !contains(bytes, b"secret label"),
                "{c}: the label in {name}"
            );
            assert!(
                !contains(bytes, b"ordinary text"),
                "{c}: page text in {name}"
            );
            for (_, pages) in &snaps {
                for (_, p) in pages.iter().take(20) {
                    let h = blake3::hash(p);
                    assert!(
                        !contains(bytes, &h.as_bytes()[..16]),
                        "{c}: a plain page hash in {name}"
                    );
                }
            }
        }
        // And everything reads back, verifies clean, and ids are keyed.
        let (store, _) =
            Store::open_encrypted(dir.path(), Mode::Read, Some(&pw("right"))).expect("open");
        assert!(store.is_encrypted() && store.page_ids().is_keyed());
        assert_eq!(
            store.cipher(),
            Some(cipher),
            "{c}: the scheme is the superblock's"
        );
        for (id, pages) in &snaps {
            for (v, p) in pages {
                assert_eq!(
                    store.read_page(*id, Vpn(*v)).expect("read").as_ref(),
                    Some(p)
                );
            }
            let mut n = 0;
            store
                .for_each_page(*id, |_, r| {
                    assert_ne!(&r.hash, blake3::hash(&page(200, false)).as_bytes());
                    n += 1;
                    Ok(())
                })
                .expect("walk");
            assert_eq!(n, pages.len());
        }
        let v = store.verify(&[]).expect("verify");
        assert!(v.is_clean(), "{c}: {v:?}");
    }
}

/// A caller's id that is not the store's keyed id of the page (a plain blake3, or another
/// page's id) never becomes an id: refused at once when the page would dedup against one of
/// the snapshot's, else the commit fails (the compression threads check new pages' ids).
#[test]
fn put_hashed_refuses_ids_that_are_not_the_keyed_ids_of_the_pages() {
    for c in [Compression::Auto, Compression::None] {
        let dir = tempfile::tempdir().expect("tmp");
        let mut store =
            Store::init_encrypted(dir.path(), opts(c), &pw("right"), KdfParams::FOR_TESTS, "t")
                .expect("init");
        let ids = store.page_ids();
        // A plain blake3 for a new page, among right ones (the frame's other pages). The
        // compression thread that checks it reports to whichever call comes next: a later put
        // (if its frame came back by then), else the commit.
        store.begin(None).expect("begin");
        let mut refused = false;
        for i in 0..40u64 {
            let p = page(i, i % 2 == 0);
            let h = if i == 21 {
                *blake3::hash(&p).as_bytes()
            } else {
                ids.id(&p)
            };
            if store.put_hashed(Vpn(i), &p, h).is_err() {
                assert!(i >= 21, "{c}: page {i} refused, before the wrong id");
                refused = true;
                break;
            }
        }
        refused = refused || store.commit(SnapshotMeta::default()).is_err();
        assert!(refused, "{c}: the wrong id was taken");
        store.abort();
        assert!(store.snapshots().expect("list").is_empty(), "{c}");
        // Another page's id, for a page that would dedup against it.
        store.begin(None).expect("begin");
        let a = page(1, false);
        store.put_hashed(Vpn(1), &a, ids.id(&a)).expect("put");
        assert!(
            store
                .put_hashed(Vpn(2), &page(2, false), ids.id(&a))
                .is_err(),
            "{c}"
        );
        store.abort();
        // Right ids work, and read back.
        store.begin(None).expect("begin");
        for i in 0..40u64 {
            let p = page(i, i % 2 == 0);
            store
                .put_hashed(Vpn(i), &p, ids.id(&p))
                .expect("put_hashed");
        }
        let s = store.commit(SnapshotMeta::default()).expect("commit").id;
        for i in 0..40u64 {
            assert_eq!(
                store.read_page(s, Vpn(i)).expect("read"),
                Some(page(i, i % 2 == 0)),
                "{c}"
            );
        }
        assert!(store.verify(&[]).expect("verify").is_clean(), "{c}");
    }
}

#[test]
fn the_password_and_the_key_file_are_required() {
    let dir = tempfile::tempdir().expect("tmp");
    let snaps = build(dir.path(), Compression::Auto);
    let before = files(dir.path());
    for mode in [Mode::Read, Mode::Write] {
        match Store::open(dir.path(), mode) {
            Err(StoreError::Encrypted { .. }) => {}
            other => panic!("{mode:?} without a password: {other:?}"),
        }
        match Store::open_encrypted(dir.path(), mode, Some(&pw("wrong"))) {
            Err(StoreError::WrongPassword { .. }) => {}
            other => panic!("{mode:?} with a wrong password: {other:?}"),
        }
    }
    assert_eq!(files(dir.path()), before, "refused opens change nothing");
    // Another password, added; the first one's slot cannot remove itself.
    {
        let (mut store, _) =
            Store::open_encrypted(dir.path(), Mode::Write, Some(&pw("right"))).expect("open");
        let slot = store
            .add_key(&pw("second"), KdfParams::FOR_TESTS, "other")
            .expect("add");
        assert_eq!(slot, 2);
        assert!(store.remove_key(1).is_err(), "the slot in use");
        assert_eq!(store.key_slots().expect("slots").len(), 2);
    }
    {
        let (mut store, _) =
            Store::open_encrypted(dir.path(), Mode::Write, Some(&pw("second"))).expect("open");
        store.remove_key(1).expect("remove the first");
        let (id, pages) = &snaps[1];
        assert_eq!(
            store
                .read_page(*id, Vpn(pages[3].0))
                .expect("read")
                .as_ref(),
            Some(&pages[3].1)
        );
        let new = store
            .change_password(&pw("third"), KdfParams::FOR_TESTS)
            .expect("passwd");
        assert_eq!(store.unlocked_slot(), Some(new));
    }
    assert!(Store::open_encrypted(dir.path(), Mode::Read, Some(&pw("right"))).is_err());
    assert!(Store::open_encrypted(dir.path(), Mode::Read, Some(&pw("second"))).is_err());
    Store::open_encrypted(dir.path(), Mode::Read, Some(&pw("third"))).expect("the new password");
    // Without its key file, or with another store's, it is refused, never taken as plaintext.
    let keys = dir.path().join("keys");
    let saved = std::fs::read(&keys).expect("keys");
    std::fs::remove_file(&keys).expect("rm");
    for mode in [Mode::Read, Mode::Write] {
        match Store::open_encrypted(dir.path(), mode, Some(&pw("third"))) {
            Err(StoreError::KeyFileMissing { .. }) => {}
            other => panic!("no key file: {other:?}"),
        }
    }
    let other = tempfile::tempdir().expect("tmp");
    Store::init_encrypted(
        other.path(),
        opts(Compression::Auto),
        &pw("third"),
        KdfParams::FOR_TESTS,
        "x",
    )
    .expect("other store");
    std::fs::copy(other.path().join("keys"), &keys).expect("copy");
    match Store::open_encrypted(dir.path(), Mode::Read, Some(&pw("third"))) {
        Err(e @ StoreError::KeyMismatch { .. }) => {
            assert!(e.to_string().contains("not this store's"), "{e}")
        }
        other => panic!("another store's key file: {other:?}"),
    }
    std::fs::write(&keys, saved).expect("restore");
    // A plaintext store never gets a key file; an init over a leftover key file is refused.
    let plain = tempfile::tempdir().expect("tmp");
    drop(Store::init(plain.path(), StoreOptions::default()).expect("init"));
    assert!(!plain.path().join("keys").exists());
    // A password given for a store whose superblock says "plaintext" is refused (a downgraded
    // superblock must not make the user write in clear; docs/security.md).
    assert!(matches!(
        Store::open_encrypted(plain.path(), Mode::Write, Some(&pw("x"))),
        Err(StoreError::NotEncryptedButKeyed { keys: false, .. })
    ));
    let (s, _) = Store::open_encrypted(plain.path(), Mode::Write, None).expect("open");
    assert!(!s.is_encrypted());
    drop(s);
    assert!(!plain.path().join("keys").exists());
    let leftover = tempfile::tempdir().expect("tmp");
    std::fs::copy(dir.path().join("keys"), leftover.path().join("keys")).expect("copy");
    assert!(matches!(
        Store::init(leftover.path(), StoreOptions::default()),
        Err(StoreError::KeysExist { .. })
    ));
}

/// The records of the store's segments: (file, offset, kind, length), by their clear headers.
fn records(dir: &Path) -> Vec<(String, u64, u8, usize)> {
    let mut out = Vec::new();
    for (name, bytes) in files(dir) {
        if !name.starts_with("seg-") {
            continue;
        }
        let mut at = 64usize;
        while at + 60 <= bytes.len() && &bytes[at..at + 4] == b"PREC" {
            let plen = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4")) as usize;
            let len = (56 + plen + 4).next_multiple_of(8);
            out.push((name.clone(), at as u64, bytes[at + 4], len));
            at += len;
        }
    }
    out
}

/// verify finds damage and no page of any snapshot reads back other than as written.
fn assert_caught(dir: &Path, snaps: &Snaps, what: &str) {
    let opened = Store::open_encrypted(dir, Mode::Read, Some(&pw("right")));
    let Ok((store, _)) = opened else {
        return; // refused outright: nothing wrong was read
    };
    let v = store.verify(&[]).expect("verify runs");
    assert!(!v.is_clean(), "{what}: verify found nothing");
    for (id, pages) in snaps {
        for (vpn, p) in pages {
            if let Ok(Some(got)) = store.read_page(*id, Vpn(*vpn)) {
                assert_eq!(&got, p, "{what}: wrong bytes read back");
            }
        }
    }
}

#[test]
fn every_kind_of_sealed_record_tampered_truncated_or_swapped_is_caught() {
    for cipher in CIPHERS {
        tampered_truncated_or_swapped_is_caught(cipher);
    }
}

fn tampered_truncated_or_swapped_is_caught(cipher: Cipher) {
    let base = tempfile::tempdir().expect("tmp");
    let snaps = build_with(base.path(), Compression::Auto, cipher);
    let recs = records(base.path());
    for kind in [8u8, 6, 5] {
        let of: Vec<_> = recs.iter().filter(|r| r.2 == kind).cloned().collect();
        assert!(of.len() >= 2, "kind {kind}: {} records", of.len());
        let copy = |tag: &str| {
            let d = tempfile::tempdir().expect("tmp");
            for (n, b) in files(base.path()) {
                std::fs::write(d.path().join(&n), b).expect("copy");
            }
            let _ = tag;
            d
        };
        // Tampered: one byte of the ciphertext, with the crc32 fixed up (an attacker's edit,
        // not an accident), and one byte of the clear header (the tag binds it).
        for (name, off, _, len) in of.iter().take(3) {
            for at in [off + 56 + 30, off + 16] {
                let d = copy("tamper");
                let path = d.path().join(name);
                let mut b = std::fs::read(&path).expect("seg");
                b[at as usize] ^= 0x20;
                let plen = u32::from_le_bytes(
                    b[*off as usize + 8..*off as usize + 12]
                        .try_into()
                        .expect("4"),
                ) as usize;
                let end = *off as usize + 56 + plen;
                let crc = crc32fast::hash(&b[*off as usize..end]);
                b[end..end + 4].copy_from_slice(&crc.to_le_bytes());
                std::fs::write(&path, &b).expect("write");
                let _ = len;
                assert_caught(
                    d.path(),
                    &snaps,
                    &format!("kind {kind} byte {at} of {name}"),
                );
            }
        }
        // Truncated: the segment cut inside the record.
        let (name, off, _, len) = &of[of.len() / 2];
        let d = copy("truncate");
        let path = d.path().join(name);
        let b = std::fs::read(&path).expect("seg");
        std::fs::write(&path, &b[..*off as usize + len / 2]).expect("cut");
        assert_caught(d.path(), &snaps, &format!("kind {kind} cut at {off}"));
        // Swapped with another record of the same kind and size.
        let mut pair = None;
        'find: for (i, a) in of.iter().enumerate() {
            for b in &of[i + 1..] {
                let same_bytes = {
                    let fa = std::fs::read(base.path().join(&a.0)).expect("a");
                    let fb = std::fs::read(base.path().join(&b.0)).expect("b");
                    fa[a.1 as usize..a.1 as usize + a.3] == fb[b.1 as usize..b.1 as usize + b.3]
                };
                if a.3 == b.3 && !same_bytes {
                    pair = Some((a.clone(), b.clone()));
                    break 'find;
                }
            }
        }
        if let Some((a, b)) = pair {
            let d = copy("swap");
            let fa = std::fs::read(d.path().join(&a.0)).expect("a");
            let fb = std::fs::read(d.path().join(&b.0)).expect("b");
            let ra = fa[a.1 as usize..a.1 as usize + a.3].to_vec();
            let rb = fb[b.1 as usize..b.1 as usize + b.3].to_vec();
            let mut fa2 = std::fs::read(d.path().join(&a.0)).expect("a");
            fa2[a.1 as usize..a.1 as usize + a.3].copy_from_slice(&rb);
            std::fs::write(d.path().join(&a.0), &fa2).expect("w");
            let mut fb2 = std::fs::read(d.path().join(&b.0)).expect("b");
            fb2[b.1 as usize..b.1 as usize + b.3].copy_from_slice(&ra);
            std::fs::write(d.path().join(&b.0), &fb2).expect("w");
            assert_caught(d.path(), &snaps, &format!("kind {kind} swapped"));
        } else {
            assert_ne!(kind, 8, "two frames of one size exist in this store");
        }
    }
}

#[test]
fn gc_and_reopen_keep_an_encrypted_store_encrypted() {
    for cipher in CIPHERS {
        gc_and_reopen_keep_it_encrypted(cipher);
    }
}

fn gc_and_reopen_keep_it_encrypted(cipher: Cipher) {
    let dir = tempfile::tempdir().expect("tmp");
    let snaps = build_with(dir.path(), Compression::Auto, cipher);
    {
        let (mut store, _) =
            Store::open_encrypted(dir.path(), Mode::Write, Some(&pw("right"))).expect("open");
        assert_eq!(store.cipher(), Some(cipher));
        store.delete(&[snaps[0].0]).expect("delete");
        store.gc().expect("gc");
        assert!(store.verify(&[]).expect("verify").is_clean());
    }
    for (name, bytes) in files(dir.path()) {
        assert!(!contains(&bytes, MARKER), "the marker in {name} after gc");
    }
    let (store, _) =
        Store::open_encrypted(dir.path(), Mode::Read, Some(&pw("right"))).expect("open");
    let (id, pages) = &snaps[1];
    for (v, p) in pages {
        assert_eq!(
            store.read_page(*id, Vpn(*v)).expect("read").as_ref(),
            Some(p)
        );
    }
    let io = pagesnap_store::FsStorage::new(dir.path(), false);
    assert!(io.len("keys").expect("keys") >= 8192);
}

/// Pages hashed as a batch with the store's own ids are taken without a second hash: they read
/// back, zero pages are removed, and the store verifies clean. A batch hashed for another store
/// (another key, or plain blake3) is refused before anything reaches the snapshot, and the
/// store's committed state is unchanged.
#[test]
fn hashed_pages_go_in_only_with_the_stores_own_ids() {
    use pagesnap_store::pagehash::{HashedPages, PageIds};
    let batch = |ids: &PageIds| {
        let mut buf = Vec::new();
        for i in 0..40u64 {
            if i % 10 == 3 {
                buf.extend_from_slice(&[0u8; PS]);
            } else {
                buf.extend_from_slice(&page(i, i % 2 == 0));
            }
        }
        HashedPages::new(ids, buf, 40, PS)
    };
    for cipher in CIPHERS {
        for c in [Compression::Auto, Compression::None] {
            let dir = tempfile::tempdir().expect("tmp");
            let mut store = Store::init_encrypted_cipher_with(
                std::sync::Arc::new(pagesnap_store::FsStorage::new(dir.path(), true)),
                opts(c),
                &pw("right"),
                KdfParams::FOR_TESTS,
                "t",
                cipher,
            )
            .expect("init");
            let own = batch(&store.page_ids());
            for i in 0..own.len() {
                match own.id(i) {
                    Some(id) => assert_eq!(*id, store.page_ids().id(own.page(i)), "page {i}"),
                    None => assert!(own.page(i).iter().all(|b| *b == 0), "page {i}"),
                }
            }
            // First a snapshot with page 3 stored, so that its zero page in the batch removes it.
            store.begin(None).expect("begin");
            store.put(Vpn(3), &page(3, true)).expect("put");
            let s1 = store.commit(SnapshotMeta::default()).expect("commit").id;

            // Another store's key, and plain blake3: refused at the first page.
            let other = tempfile::tempdir().expect("tmp");
            let other_store = Store::init_encrypted(
                other.path(),
                opts(c),
                &pw("right"),
                KdfParams::FOR_TESTS,
                "o",
            )
            .expect("init other");
            for foreign in [batch(&other_store.page_ids()), batch(&PageIds::default())] {
                store.begin(Some(s1)).expect("begin");
                let e = store
                    .put_hashed_pages(Vpn(0), &foreign, 0)
                    .expect_err("a foreign batch went in");
                assert!(e.to_string().contains("another store"), "{e}");
                store.abort();
            }
            assert_eq!(store.snapshots().expect("list").len(), 1);

            store.begin(Some(s1)).expect("begin");
            for i in 0..own.len() {
                store
                    .put_hashed_pages(Vpn(i as u64), &own, i)
                    .expect("put_hashed_pages");
            }
            let s2 = store.commit(SnapshotMeta::default()).expect("commit").id;
            drop(store);
            let (store, _) =
                Store::open_encrypted(dir.path(), Mode::Read, Some(&pw("right"))).expect("open");
            for i in 0..40u64 {
                let want = (i % 10 != 3).then(|| page(i, i % 2 == 0));
                assert_eq!(
                    store.read_page(s2, Vpn(i)).expect("read"),
                    want,
                    "{cipher} {c} page {i}"
                );
            }
            assert_eq!(
                store.read_page(s1, Vpn(3)).expect("read"),
                Some(page(3, true))
            );
            assert!(
                store.verify(&[]).expect("verify").is_clean(),
                "{cipher} {c}"
            );
        }
    }
}

/// In a store in clear, a batch hashed with an encrypted store's key is refused too (its ids
/// would never match a page read back).
#[test]
fn a_store_in_clear_refuses_keyed_batches() {
    use pagesnap_store::pagehash::HashedPages;
    let enc = tempfile::tempdir().expect("tmp");
    let keyed = Store::init_encrypted(
        enc.path(),
        opts(Compression::Auto),
        &pw("right"),
        KdfParams::FOR_TESTS,
        "k",
    )
    .expect("init");
    let clear = tempfile::tempdir().expect("tmp");
    let mut store = Store::init(clear.path(), opts(Compression::Auto)).expect("init");
    let p = page(1, true);
    let foreign = HashedPages::new(&keyed.page_ids(), p.clone(), 1, PS);
    let own = HashedPages::new(&store.page_ids(), p.clone(), 1, PS);
    assert_eq!(own.id(0), Some(blake3::hash(&p).as_bytes()));
    store.begin(None).expect("begin");
    assert!(store.put_hashed_pages(Vpn(1), &foreign, 0).is_err());
    store.put_hashed_pages(Vpn(1), &own, 0).expect("own");
    let s = store.commit(SnapshotMeta::default()).expect("commit").id;
    assert_eq!(store.read_page(s, Vpn(1)).expect("read"), Some(p));
}
