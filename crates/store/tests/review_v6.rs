//! Review of encryption at rest (f36951d): failing tests for what the review found.

use pagesnap_store::keys::{KdfParams, Password};
use pagesnap_store::{Compression, Mode, SnapshotMeta, Store, StoreOptions, Vpn};
use std::path::Path;

const PS: usize = 4096;
const MARKER: &[u8] = b"REVIEW-V6-PLAINTEXT-MARKER";

fn pw(s: &str) -> Password {
    Password::from(s)
}

fn opts() -> StoreOptions {
    StoreOptions {
        compression: Compression::None,
        ..StoreOptions::default()
    }
}

fn page(i: u64) -> Vec<u8> {
    let mut p = vec![0u8; PS];
    for (k, c) in p.chunks_mut(64).enumerate() {
        let line = format!("page {i} line {k}{:.<64}", "");
        c.copy_from_slice(&line.as_bytes()[..64]);
    }
    p[100..100 + MARKER.len()].copy_from_slice(MARKER);
    p
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn files_with(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("dir") {
        let p = e.expect("entry").path();
        if p.is_file() && contains(&std::fs::read(&p).expect("read"), needle) {
            out.push(p.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    out
}

/// Rewrites both superblock slots with the encryption field (scheme byte and key id) zeroed and
/// the crc32 fixed up: what anyone with write access to the store can do (the superblock is
/// protected by an unkeyed checksum only). Returns how many slots were changed.
fn downgrade_superblock(dir: &Path, key_id: [u8; 16]) -> usize {
    let path = dir.join("superblock");
    let mut sb = std::fs::read(&path).expect("superblock");
    let mut changed = 0;
    for slot in sb.chunks_mut(4096) {
        // Either scheme: 1 (XChaCha20-Poly1305) or 2 (AES-256-GCM-SIV), then 3 zero bytes.
        let field = |w: &[u8]| matches!(w[0], 1 | 2) && w[1..4] == [0; 3] && w[4..] == key_id;
        if let Some(at) = slot.windows(20).position(field) {
            slot[at..at + 20].fill(0);
            let crc = crc32fast::hash(&slot[..4092]);
            slot[4092..].copy_from_slice(&crc.to_le_bytes());
            changed += 1;
        }
    }
    std::fs::write(&path, sb).expect("write superblock");
    changed
}

/// An attacker with write access flips the superblock's encryption field to "none" (fixing the
/// crc32). The store still has its `keys` file and the user still gives the password, but the
/// store opens as a plaintext store — the password is silently ignored ("a store that is not
/// encrypted ignores it") — and the user's next snapshot is written in clear. A store with a key
/// file, or an open that was given a password, must not open as a plaintext store.
#[test]
fn a_downgraded_superblock_does_not_make_an_encrypted_store_write_plaintext() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::init_encrypted(dir.path(), opts(), &pw("right"), KdfParams::FOR_TESTS, "t")
        .expect("init");
    let id = store.key_id().expect("encrypted").0;
    drop(store);
    assert_eq!(downgrade_superblock(dir.path(), id), 2, "both slots found");
    assert!(dir.path().join("keys").exists());

    let opened = Store::open_encrypted(dir.path(), Mode::Write, Some(&pw("right")));
    let Ok((mut store, _)) = opened else {
        return; // refused: the fix
    };
    let encrypted = store.is_encrypted();
    store.begin(None).expect("begin");
    for i in 0..32 {
        store.put(Vpn(i), &page(i)).expect("put");
    }
    store.commit(SnapshotMeta::default()).expect("commit");
    drop(store);
    let leaked = files_with(dir.path(), MARKER);
    panic!(
        "a store with a key file whose superblock says 'not encrypted' opened for writing with \
         the password given (is_encrypted = {encrypted}); the snapshot's plaintext is now in \
         {leaked:?}"
    );
}

/// `key passwd` with the key file full (8 slots): the password is *replaced*, so the number of
/// slots does not change, but `Store::change_password` adds the new slot before it removes the
/// old one and so fails with "key slots full" (`KeyFile::change_password`, which replaces in one
/// change, is not used).
#[test]
fn changing_the_password_works_when_all_eight_slots_are_used() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut store = Store::init_encrypted(dir.path(), opts(), &pw("p0"), KdfParams::FOR_TESTS, "t")
        .expect("init");
    for i in 1..8 {
        store
            .add_key(&pw(&format!("p{i}")), KdfParams::FOR_TESTS, "t")
            .expect("add");
    }
    assert_eq!(store.key_slots().expect("slots").len(), 8);
    drop(store);
    let (mut store, _) =
        Store::open_encrypted(dir.path(), Mode::Write, Some(&pw("p3"))).expect("open");
    let r = store.change_password(&pw("new"), KdfParams::FOR_TESTS);
    assert!(r.is_ok(), "key passwd with 8 slots: {:?}", r.err());
    drop(store);
    assert!(Store::open_encrypted(dir.path(), Mode::Read, Some(&pw("new"))).is_ok());
    assert!(Store::open_encrypted(dir.path(), Mode::Read, Some(&pw("p3"))).is_err());
}

/// Control: a plaintext store opened with a password by mistake. The API documents that the
/// password is ignored; the CLI does the same. This is what makes the downgrade above silent:
/// nothing tells the user who expects encryption that the store is not encrypted.
#[test]
fn a_password_given_for_a_plaintext_store_is_not_silently_ignored() {
    let dir = tempfile::tempdir().expect("tmp");
    drop(Store::init(dir.path(), opts()).expect("init"));
    let r = Store::open_encrypted(dir.path(), Mode::Write, Some(&pw("right")));
    assert!(
        r.is_err(),
        "a password was given, the store is not encrypted, and it opened for writing anyway"
    );
}
