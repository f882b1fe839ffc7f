//! The hostile review of issue 17's speed change (ids checked in the compression threads,
//! AES-256-GCM-SIV as scheme 2, frames sealed in place with reused buffers).

use pagesnap_store::keys::{KdfParams, Password};
use pagesnap_store::{
    Cipher, Compression, Mode, SharedStorage, SnapshotMeta, Store, StoreError, StoreOptions, Vpn,
};
use std::path::Path;
use std::sync::Arc;

const PS: usize = 4096;
const CIPHERS: [Cipher; 2] = [Cipher::Aes256GcmSiv, Cipher::XChaCha20Poly1305];

fn pw(s: &str) -> Password {
    Password::from(s)
}

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
    p
}

fn init(dir: &Path, c: Compression, cipher: Cipher) -> Store {
    std::fs::create_dir_all(dir).expect("dir");
    let io: SharedStorage = Arc::new(pagesnap_store::FsStorage::new(dir, true));
    Store::init_encrypted_cipher_with(
        io,
        StoreOptions {
            compression: c,
            ..StoreOptions::default()
        },
        &pw("right"),
        KdfParams::FOR_TESTS,
        "test",
        cipher,
    )
    .expect("init")
}

/// Bytes of the records in the store's segments (header 64 bytes, then records back to back).
fn record_bytes(dir: &Path) -> u64 {
    let mut total = 0u64;
    for e in std::fs::read_dir(dir).expect("dir") {
        let p = e.expect("entry").path();
        let name = p.file_name().expect("name").to_string_lossy().into_owned();
        if !name.starts_with("seg-") {
            continue;
        }
        let bytes = std::fs::read(&p).expect("read");
        let mut at = 64usize;
        while at + 60 <= bytes.len() && &bytes[at..at + 4] == b"PREC" {
            let plen = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4")) as usize;
            let len = (56 + plen + 4).next_multiple_of(8);
            total += len as u64;
            at += len;
        }
    }
    total
}

/// Finding: `write_commit` sizes the commit record with `SEAL_OVERHEAD` (40 bytes, scheme 1's
/// 24-byte nonce + tag), but a scheme 2 record has a 12-byte nonce: the commit's `meta_bytes`
/// (and so `bytes_written`, "added" in list/info) is over-counted by 2 × 16 bytes per commit
/// in every AES-256-GCM-SIV store. Scheme 1 is exact.
#[test]
fn a_first_commits_reported_bytes_are_the_bytes_it_wrote_in_both_schemes() {
    let mut wrong = Vec::new();
    for cipher in CIPHERS {
        let dir = tempfile::tempdir().expect("tmp");
        let mut store = init(dir.path(), Compression::Auto, cipher);
        store.begin(None).expect("begin");
        for i in 0..40u64 {
            store.put(Vpn(i), &page(i, i % 2 == 0)).expect("put");
        }
        let r = store.commit(SnapshotMeta::default()).expect("commit");
        drop(store);
        let on_disk = record_bytes(dir.path());
        if r.data_bytes + r.meta_bytes != on_disk {
            wrong.push(format!(
                "{cipher}: data {} + meta {} = {}, records on disk {on_disk}",
                r.data_bytes,
                r.meta_bytes,
                r.data_bytes + r.meta_bytes
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// Rewrites the scheme byte of both superblock slots (and their crc32).
fn set_scheme(dir: &Path, scheme: u8, key_id: [u8; 16]) -> usize {
    let path = dir.join("superblock");
    let mut sb = std::fs::read(&path).expect("superblock");
    let mut changed = 0;
    for slot in sb.chunks_mut(4096) {
        let field = |w: &[u8]| matches!(w[0], 1 | 2) && w[1..4] == [0; 3] && w[4..] == key_id;
        if let Some(at) = slot.windows(20).position(field) {
            slot[at] = scheme;
            let crc = crc32fast::hash(&slot[..4092]);
            slot[4092..].copy_from_slice(&crc.to_le_bytes());
            changed += 1;
        }
    }
    std::fs::write(&path, &sb).expect("write");
    changed
}

fn key_id_of(dir: &Path) -> [u8; 16] {
    let keys = std::fs::read(dir.join("keys")).expect("keys");
    keys[24..40].try_into().expect("16")
}

/// Finding: a store whose superblock names an encryption scheme this binary does not know (a
/// newer pagesnap's scheme 3 — or, for a binary from before this change, scheme 2) is reported
/// as *damaged*: "both slots fail their checksum", which is false (the checksums are right) and
/// sends the user to recovery instead of to a newer pagesnap. A format version from the future
/// gets `NewerVersion`; an unknown scheme deserves the same.
#[test]
fn an_unknown_encryption_scheme_is_named_not_reported_as_a_bad_checksum() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut store = init(dir.path(), Compression::Auto, Cipher::Aes256GcmSiv);
    store.begin(None).expect("begin");
    store.put(Vpn(1), &page(1, false)).expect("put");
    store.commit(SnapshotMeta::default()).expect("commit");
    drop(store);
    let id = key_id_of(dir.path());
    assert_eq!(set_scheme(dir.path(), 3, id), 2, "both slots");
    let err = match Store::open_encrypted(dir.path(), Mode::Read, Some(&pw("right"))) {
        Ok(_) => panic!("a store of an unknown scheme opened"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(
        !matches!(err, StoreError::Corrupt { .. }) && !msg.contains("checksum"),
        "an unknown scheme is reported as damage: {msg}"
    );
    assert!(msg.contains('3') && msg.contains("scheme"), "{msg}");
}

/// Editing the (unauthenticated) scheme byte 2 -> 1 opens no record: the other scheme's key
/// opens nothing, and no read returns bytes. (Passes: recorded as a check, not a finding.)
#[test]
fn a_scheme_byte_edit_reads_nothing() {
    for (from, to) in [
        (Cipher::Aes256GcmSiv, 1u8),
        (Cipher::XChaCha20Poly1305, 2u8),
    ] {
        let dir = tempfile::tempdir().expect("tmp");
        let mut store = init(dir.path(), Compression::Auto, from);
        store.begin(None).expect("begin");
        for i in 0..20u64 {
            store.put(Vpn(i), &page(i, false)).expect("put");
        }
        let s = store.commit(SnapshotMeta::default()).expect("commit").id;
        drop(store);
        let id = key_id_of(dir.path());
        assert_eq!(set_scheme(dir.path(), to, id), 2);
        if let Ok((store, _)) = Store::open_encrypted(dir.path(), Mode::Read, Some(&pw("right"))) {
            for i in 0..20u64 {
                assert!(
                    !matches!(store.read_page(s, Vpn(i)), Ok(Some(_))),
                    "{from} read as scheme {to}"
                );
            }
        }
    }
}

/// A claimed id that is a *stored* page's keyed id, for other bytes (dedup against a stored
/// page), and the same wrong pair again in the same snapshot (dedup against the placeholder the
/// first one left in the dedup map): the commit fails, and after abort and a retry with right
/// ids nothing of the wrong pair is in the store. Also after a failed commit the next commit
/// (without an explicit abort) is clean.
#[test]
fn wrong_ids_against_stored_pages_and_retries_never_reach_an_index() {
    for cipher in CIPHERS {
        for c in [Compression::Auto, Compression::None] {
            let dir = tempfile::tempdir().expect("tmp");
            let mut store = init(dir.path(), c, cipher);
            let ids = store.page_ids();
            store.begin(None).expect("begin");
            for i in 0..40u64 {
                let p = page(i, i % 2 == 0);
                store.put_hashed(Vpn(i), &p, ids.id(&p)).expect("put");
            }
            let s1 = store.commit(SnapshotMeta::default()).expect("commit").id;
            // Page 7's id for other bytes, twice, among right ones.
            let victim = ids.id(&page(7, false));
            store.begin(Some(s1)).expect("begin");
            let mut failed = false;
            for i in 100..140u64 {
                let p = page(i, i % 2 == 0);
                let h = if i == 105 || i == 121 {
                    victim
                } else {
                    ids.id(&p)
                };
                let p = if i == 121 { page(105, false) } else { p };
                if store.put_hashed(Vpn(i), &p, h).is_err() {
                    failed = true;
                    break;
                }
            }
            if !failed {
                assert!(
                    store.commit(SnapshotMeta::default()).is_err(),
                    "{cipher} {c}: a wrong id against a stored page committed"
                );
            } else {
                store.abort();
            }
            assert_eq!(store.snapshots().expect("list").len(), 1);
            // Retry with right ids: the same pages; the store must serve page 7 as page 7.
            store.begin(Some(s1)).expect("begin");
            for i in 100..140u64 {
                let p = page(i, i % 2 == 0);
                store.put_hashed(Vpn(i), &p, ids.id(&p)).expect("put");
            }
            // And a page that dedups against stored page 7 with its right id.
            store
                .put_hashed(Vpn(500), &page(7, false), victim)
                .expect("put");
            let s2 = store.commit(SnapshotMeta::default()).expect("commit").id;
            for i in 100..140u64 {
                assert_eq!(
                    store.read_page(s2, Vpn(i)).expect("read"),
                    Some(page(i, i % 2 == 0)),
                    "{cipher} {c}"
                );
            }
            assert_eq!(
                store.read_page(s2, Vpn(500)).expect("read"),
                Some(page(7, false))
            );
            assert_eq!(
                store.read_page(s2, Vpn(7)).expect("read"),
                Some(page(7, false))
            );
            assert!(
                store.verify(&[]).expect("verify").is_clean(),
                "{cipher} {c}"
            );
            drop(store);
            let (store, _) =
                Store::open_encrypted(dir.path(), Mode::Read, Some(&pw("right"))).expect("open");
            assert!(
                store.verify(&[]).expect("verify").is_clean(),
                "{cipher} {c}"
            );
        }
    }
}

/// Frame buffers are reused: a frame of compressible pages after frames of random ones, a
/// short last frame after full ones, and many snapshots in one writer; every page reads back
/// as written after reopening (no stale tail of an earlier frame).
#[test]
fn reused_frame_buffers_never_leak_one_frames_bytes_into_another() {
    for cipher in CIPHERS {
        for c in [Compression::Auto, Compression::None, Compression::Lz4] {
            let dir = tempfile::tempdir().expect("tmp");
            let mut store = init(dir.path(), c, cipher);
            let ids = store.page_ids();
            let mut snaps = Vec::new();
            let mut parent = None;
            for round in 0..6u64 {
                store.begin(parent).expect("begin");
                // 16 * k + round pages: full frames then a short one.
                let n = 16 * (round + 1) + round;
                let mut pages = Vec::new();
                for i in 0..n {
                    let seed = round * 10_000 + i;
                    let p = page(seed, (i / 16 + round) % 2 == 0);
                    if i % 3 == 0 {
                        store.put(Vpn(i), &p).expect("put");
                    } else {
                        store.put_hashed(Vpn(i), &p, ids.id(&p)).expect("put");
                    }
                    pages.push((i, p));
                }
                if round == 3 {
                    store.abort();
                    continue;
                }
                let s = store.commit(SnapshotMeta::default()).expect("commit").id;
                parent = Some(s);
                snaps.push((s, pages));
            }
            drop(store);
            let (store, _) =
                Store::open_encrypted(dir.path(), Mode::Read, Some(&pw("right"))).expect("open");
            for (s, pages) in &snaps {
                for (i, p) in pages {
                    assert_eq!(
                        store.read_page(*s, Vpn(*i)).expect("read").as_ref(),
                        Some(p),
                        "{cipher} {c} snapshot {s:?} page {i}"
                    );
                }
            }
            assert!(
                store.verify(&[]).expect("verify").is_clean(),
                "{cipher} {c}"
            );
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("dir");
    for e in std::fs::read_dir(from).expect("dir") {
        let p = e.expect("entry").path();
        if p.is_file() {
            let name = p.file_name().expect("name");
            if name == "lock" {
                continue;
            }
            std::fs::copy(&p, to.join(name)).expect("copy");
        }
    }
}

/// The record and range crc32s are now folded from the threads' payload crc32s
/// (`crc32fast::Hasher::combine`): a crash image taken right after commits (no hint since,
/// so open proves the tail by the commit records' range crc32) keeps every commit.
#[test]
fn commits_in_the_unproven_tail_survive_a_crash_with_folded_crcs() {
    for enc in [
        None,
        Some(Cipher::Aes256GcmSiv),
        Some(Cipher::XChaCha20Poly1305),
    ] {
        for c in [Compression::Auto, Compression::None, Compression::Lz4] {
            if enc.is_none() && c == Compression::None {
                continue;
            }
            let dir = tempfile::tempdir().expect("tmp");
            let mut store = match enc {
                Some(cipher) => init(dir.path(), c, cipher),
                None => Store::init(
                    dir.path(),
                    StoreOptions {
                        compression: c,
                        ..StoreOptions::default()
                    },
                )
                .expect("init"),
            };
            let mut snaps = Vec::new();
            let mut parent = None;
            for round in 0..4u64 {
                store.begin(parent).expect("begin");
                let mut pages = Vec::new();
                for i in 0..(35 + round) {
                    let p = page(round * 1000 + i, (i / 16) % 2 == 0);
                    store.put(Vpn(i), &p).expect("put");
                    pages.push((i, p));
                }
                let s = store.commit(SnapshotMeta::default()).expect("commit").id;
                parent = Some(s);
                snaps.push((s, pages));
            }
            let crash = tempfile::tempdir().expect("tmp");
            copy_dir(dir.path(), crash.path());
            // The control: the same image with one byte of the last frame record changed loses its commit by the range crc32 — so the tail is proven
            // by the range crc32 here, and it holds for the untouched image.
            let control = tempfile::tempdir().expect("tmp");
            copy_dir(dir.path(), control.path());
            tamper_last_frame(control.path());

            drop(store);
            let (cs, report) = Store::open_encrypted(
                control.path(),
                Mode::Read,
                enc.map(|_| pw("right")).as_ref(),
            )
            .expect("open control");
            assert!(
                report.discarded_tail.is_some()
                    && cs.snapshots().expect("list").len() < snaps.len(),
                "{enc:?} {c}: the control kept its tail: {report:?}"
            );
            let store = match enc {
                Some(_) => {
                    Store::open_encrypted(crash.path(), Mode::Read, Some(&pw("right")))
                        .expect("open")
                        .0
                }
                None => {
                    Store::open_encrypted(crash.path(), Mode::Read, None)
                        .expect("open")
                        .0
                }
            };
            assert_eq!(
                store.snapshots().expect("list").len(),
                snaps.len(),
                "{enc:?} {c}: commits lost after a crash"
            );
            for (s, pages) in &snaps {
                for (i, p) in pages {
                    assert_eq!(
                        store.read_page(*s, Vpn(*i)).expect("read").as_ref(),
                        Some(p),
                        "{enc:?} {c}"
                    );
                }
            }
        }
    }
}

/// Changes a byte of the last frame or extent record's payload in the newest segment (its
/// crc32 left as it was: a crc32 fixed up would leave the range crc32 unchanged too, crc32 of
/// a message followed by its own crc32 being a constant).
fn tamper_last_frame(dir: &Path) {
    let mut segs: Vec<_> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name()
                .expect("n")
                .to_string_lossy()
                .starts_with("seg-")
        })
        .collect();
    segs.sort();
    let path = segs.last().expect("a segment").clone();
    let mut bytes = std::fs::read(&path).expect("read");
    let mut at = 64usize;
    let mut last = None;
    while at + 60 <= bytes.len() && &bytes[at..at + 4] == b"PREC" {
        let plen = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4")) as usize;
        if bytes[at + 4] == 8 || bytes[at + 4] == 7 {
            last = Some((at, plen));
        }
        at += (56 + plen + 4).next_multiple_of(8);
    }
    let (at, plen) = last.expect("a frame or extent record");
    bytes[at + 56 + plen / 2] ^= 0x40;
    std::fs::write(&path, &bytes).expect("write");
}

#[test]
fn claimed_ids_are_checked_at_every_page_size() {
    for ps in [512u32, 2048, 65536, 1 << 20] {
        for cipher in CIPHERS {
            let dir = tempfile::tempdir().expect("tmp");
            let io: SharedStorage = Arc::new(pagesnap_store::FsStorage::new(dir.path(), true));
            let mut store = Store::init_encrypted_cipher_with(
                io,
                StoreOptions {
                    page_size: ps,
                    compression: Compression::Auto,
                    ..StoreOptions::default()
                },
                &pw("right"),
                KdfParams::FOR_TESTS,
                "t",
                cipher,
            )
            .expect("init");
            let ids = store.page_ids();
            let mk = |i: u64| {
                let mut p = Vec::new();
                while p.len() < ps as usize {
                    p.extend_from_slice(&page(i * 7919 + p.len() as u64, i.is_multiple_of(2)));
                }
                p.truncate(ps as usize);
                p
            };
            let n = 20u64;
            store.begin(None).expect("begin");
            for i in 0..n {
                let p = mk(i);
                store.put_hashed(Vpn(i), &p, ids.id(&p)).expect("put");
            }
            let s = store.commit(SnapshotMeta::default()).expect("commit").id;
            for i in 0..n {
                assert_eq!(
                    store.read_page(s, Vpn(i)).expect("read"),
                    Some(mk(i)),
                    "{ps} {cipher}"
                );
            }
            store.begin(Some(s)).expect("begin");
            let mut refused = false;
            for i in 0..n {
                let p = mk(i + 100);
                let h = if i == 5 {
                    *blake3::hash(&p).as_bytes()
                } else {
                    ids.id(&p)
                };
                if store.put_hashed(Vpn(i), &p, h).is_err() {
                    refused = true;
                    break;
                }
            }
            if refused {
                store.abort();
            } else {
                assert!(
                    store.commit(SnapshotMeta::default()).is_err(),
                    "{ps} {cipher}"
                );
            }
            assert_eq!(store.snapshots().expect("list").len(), 1, "{ps} {cipher}");
            assert!(
                store.verify(&[]).expect("verify").is_clean(),
                "{ps} {cipher}"
            );
        }
    }
}
