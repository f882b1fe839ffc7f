//! Key management tests. Slots use [`KdfParams::FOR_TESTS`] (64 KiB, one pass), so each
//! derivation costs well under a millisecond and the crash campaign stays fast.

use super::*;
use crate::fault::{FaultPlan, FaultyStorage};
use std::collections::BTreeSet;
use std::sync::Arc;

const P: KdfParams = KdfParams::FOR_TESTS;

fn pw(s: &str) -> Password {
    Password::from(s)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh in-memory store directory with a key file under `password`.
fn created(password: &str) -> (Arc<FaultyStorage>, KeyFile, MasterKey) {
    let io = Arc::new(FaultyStorage::new());
    let (file, key) = KeyFile::create(io.clone(), &pw(password), P, "alice@host").expect("create");
    (io, file, key)
}

fn same_key(a: &MasterKey, b: &MasterKey) -> bool {
    a.bytes[..] == b.bytes[..]
}

#[test]
fn round_trip_create_open_unlock() {
    let (io, file, key) = created("correct horse");
    assert_eq!(file.key_id(), key.id());
    let slots = file.slots();
    assert_eq!(slots.len(), 1);
    assert_eq!(slots[0].id, 1);
    assert_eq!(slots[0].label, "alice@host");
    assert_eq!(slots[0].kdf, P);
    assert!(slots[0].created_unix_ms > 1_700_000_000_000);
    assert_eq!(io.contents(KEYS_FILE).map(|c| c.len()), Some(2 * COPY_SIZE));
    assert!(
        io.contents(KEYS_TMP_FILE).is_none(),
        "the temporary name is gone"
    );

    let reopened = KeyFile::open(io.clone()).expect("open");
    assert_eq!(reopened.note(), None);
    assert_eq!(reopened.slots(), slots);
    let unlocked = reopened.unlock(&pw("correct horse")).expect("unlock");
    assert_eq!(unlocked.slot, 1);
    assert!(same_key(&unlocked.key, &key));

    // The master key is not in the file, in clear or in any derived form the file could hold.
    let bytes = io.contents(KEYS_FILE).expect("file");
    for needle in [
        &key.bytes[..],
        &key.record_key().0[..],
        &key.dedup_key().0[..],
    ] {
        assert!(!bytes.windows(KEY_LEN).any(|w| w == needle));
    }
    // Nor the password.
    assert!(!bytes.windows(13).any(|w| w == b"correct horse"));

    // A second create is refused, and changes nothing.
    let before = io.contents(KEYS_FILE);
    let e = KeyFile::create(io.clone(), &pw("other"), P, "").expect_err("exists");
    assert!(matches!(e, StoreError::KeysExist { .. }), "{e}");
    assert_eq!(io.contents(KEYS_FILE), before);
}

#[test]
fn no_key_file_is_not_encrypted() {
    let io = Arc::new(FaultyStorage::new());
    assert!(!KeyFile::exists(&*io).expect("exists"));
    let e = KeyFile::open(io).expect_err("no file");
    assert!(matches!(e, StoreError::NotEncrypted { .. }), "{e}");
}

#[test]
fn wrong_password_is_refused_and_changes_nothing() {
    let (io, mut file, key) = created("right");
    let before = io.contents(KEYS_FILE);
    for wrong in ["xyzzy", "right ", "Right", "righ", "\u{0}", ""] {
        let e = file.unlock(&pw(wrong)).expect_err("wrong password");
        assert!(matches!(e, StoreError::WrongPassword { .. }), "{e}");
        assert!(e.to_string().contains("wrong password"));
    }
    assert!(!file
        .unlock(&pw("xyzzy"))
        .expect_err("wrong")
        .to_string()
        .contains("xyzzy"));
    let e = file
        .change_password(&pw("wrong"), &pw("new"), P)
        .expect_err("wrong old password");
    assert!(matches!(e, StoreError::WrongPassword { .. }), "{e}");
    assert_eq!(io.contents(KEYS_FILE), before, "nothing changed");
    assert!(same_key(
        &file.unlock(&pw("right")).expect("right").key,
        &key
    ));
}

#[test]
fn several_slots_each_open_the_same_key() {
    let (io, mut file, key) = created("zero");
    let names = ["one", "two", "three"];
    let mut ids = vec![1];
    for (i, name) in names.iter().enumerate() {
        let id = file
            .add_slot(&key, &pw(name), P, &format!("slot {i}"))
            .expect("add");
        ids.push(id);
    }
    assert_eq!(ids, vec![1, 2, 3, 4]);
    let file = KeyFile::open(io.clone()).expect("reopen");
    assert_eq!(file.generation(), 4);
    assert_eq!(
        file.slots().iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    for (password, id) in ["zero", "one", "two", "three"].iter().zip(&ids) {
        let u = file.unlock(&pw(password)).expect("each opens");
        assert_eq!(u.slot, *id);
        assert!(same_key(&u.key, &key));
    }
    // Slots keep their own parameters.
    let mut file = file;
    let strong = KdfParams {
        m_kib: 256,
        t: 2,
        p: 2,
    };
    let id = file.add_slot(&key, &pw("four"), strong, "").expect("add");
    let info = file.slots().into_iter().find(|s| s.id == id).expect("slot");
    assert_eq!(info.kdf, strong);
    assert!(same_key(
        &file.unlock(&pw("four")).expect("opens").key,
        &key
    ));

    // Removing one: its password stops working, the others do not; ids are not reused.
    file.remove_slot(&key, 3).expect("remove");
    let e = file.unlock(&pw("two")).expect_err("removed");
    assert!(matches!(e, StoreError::WrongPassword { .. }), "{e}");
    for password in ["zero", "one", "three", "four"] {
        assert!(same_key(
            &file.unlock(&pw(password)).expect("opens").key,
            &key
        ));
    }
    let id = file.add_slot(&key, &pw("five"), P, "").expect("add");
    assert_eq!(id, 6, "slot ids are never reused");
}

#[test]
fn slot_limits_and_misuse_are_typed_errors() {
    let (io, mut file, key) = created("a");
    // The last slot stays.
    let e = file.remove_slot(&key, 1).expect_err("last");
    assert!(matches!(e, StoreError::LastKeySlot { slot: 1, .. }), "{e}");
    let e = file.remove_slot(&key, 9).expect_err("unknown");
    assert!(
        matches!(e, StoreError::UnknownKeySlot { slot: 9, .. }),
        "{e}"
    );
    // Another store's master key adds nothing.
    let other = MasterKey::generate().expect("key");
    let e = file
        .add_slot(&other, &pw("b"), P, "")
        .expect_err("not ours");
    assert!(matches!(e, StoreError::KeyMismatch { .. }), "{e}");
    let e = file.remove_slot(&other, 1).expect_err("not ours");
    assert!(matches!(e, StoreError::KeyMismatch { .. }), "{e}");
    // Empty passwords, bad labels and parameters.
    for (password, label, kdf) in [
        ("", "", P),
        ("b", "x\ny", P),
        ("b", &"l".repeat(MAX_SLOT_LABEL + 1)[..], P),
        ("b", "", KdfParams { m_kib: 4, ..P }),
        ("b", "", KdfParams { t: 0, ..P }),
        ("b", "", KdfParams { p: 0, ..P }),
        (
            "b",
            "",
            KdfParams {
                m_kib: KdfParams::MAX_M_KIB + 1,
                ..P
            },
        ),
    ] {
        let e = file
            .add_slot(&key, &pw(password), kdf, label)
            .expect_err("refused");
        assert!(matches!(e, StoreError::InvalidKeyInput(_)), "{e}");
    }
    // A label of the longest length, in UTF-8, is fine.
    let label = "é".repeat(MAX_SLOT_LABEL / 2);
    file.add_slot(&key, &pw("b"), P, &label)
        .expect("long label");
    // Up to MAX_SLOTS.
    while file.slots().len() < MAX_SLOTS {
        file.add_slot(&key, &pw("c"), P, &"m".repeat(MAX_SLOT_LABEL))
            .expect("add");
    }
    let before = io.contents(KEYS_FILE);
    let e = file.add_slot(&key, &pw("d"), P, "").expect_err("full");
    assert!(
        matches!(e, StoreError::KeySlotsFull { max: MAX_SLOTS, .. }),
        "{e}"
    );
    assert_eq!(io.contents(KEYS_FILE), before);
    let reopened = KeyFile::open(io).expect("a full file reads back");
    assert_eq!(reopened.slots().len(), MAX_SLOTS);
    assert_eq!(reopened.slots()[1].label, label);
}

#[test]
fn change_password_replaces_one_slot() {
    let (io, mut file, key) = created("old");
    file.add_slot(&key, &pw("other"), P, "backup key")
        .expect("add");
    let id = file
        .change_password(&pw("old"), &pw("new"), P)
        .expect("change");
    assert_eq!(id, 3);
    let file = KeyFile::open(io).expect("open");
    let e = file.unlock(&pw("old")).expect_err("old gone");
    assert!(matches!(e, StoreError::WrongPassword { .. }), "{e}");
    let u = file.unlock(&pw("new")).expect("new opens");
    assert_eq!(u.slot, 3);
    assert!(same_key(&u.key, &key));
    assert!(same_key(
        &file.unlock(&pw("other")).expect("other").key,
        &key
    ));
    let slots = file.slots();
    assert_eq!(
        slots
            .iter()
            .map(|s| (s.id, &s.label[..]))
            .collect::<Vec<_>>(),
        vec![(3, "alice@host"), (2, "backup key")],
        "the label is kept, the position too"
    );
}

/// Every single byte of the file flipped: never a panic, never a different key. A flip in one
/// copy is repaired from the other (and noted); the same flip in both copies is damage.
#[test]
fn a_flipped_byte_anywhere_is_survived_or_a_typed_error() {
    let (io, mut file, key) = created("pw");
    file.add_slot(&key, &pw("second"), P, "second slot")
        .expect("add");
    let good = io.contents(KEYS_FILE).expect("file");
    // Every byte in release builds; a sample in debug builds (Argon2 is slow there).
    let step = if cfg!(debug_assertions) { 61 } else { 1 };
    for offset in (0..good.len()).step_by(step) {
        let mut one = good.clone();
        one[offset] ^= 1 << (offset % 8);
        let fs = Arc::new(FaultyStorage::new());
        fs.create(KEYS_FILE).expect("create");
        fs.write(KEYS_FILE, 0, &one).expect("write");
        let file = KeyFile::open(fs.clone()).expect("the other copy is whole");
        assert!(file.note().is_some(), "offset {offset}: damage not noted");
        for (password, slot) in [("pw", 1), ("second", 2)] {
            let u = file.unlock(&pw(password)).expect("opens");
            assert_eq!(u.slot, slot);
            assert!(same_key(&u.key, &key));
        }
        // The same flip in both copies.
        let at = offset % COPY_SIZE;
        let mut both = good.clone();
        both[at] ^= 1 << (offset % 8);
        both[COPY_SIZE + at] ^= 1 << (offset % 8);
        let fs = Arc::new(FaultyStorage::new());
        fs.create(KEYS_FILE).expect("create");
        fs.write(KEYS_FILE, 0, &both).expect("write");
        match KeyFile::open(fs) {
            Err(StoreError::Corrupt { what, detail, .. }) => {
                assert_eq!(what, "key file");
                assert!(detail.contains("both copies"), "{detail}");
            }
            other => panic!("offset {at} in both copies: {other:?}"),
        }
    }
}

/// A forger who fixes the checksum after changing a byte (blake3 has no key) gets a typed
/// error, or the file opens to the same key (fields outside the sealed slot: the generation);
/// nothing that protects the master key can be changed unnoticed.
#[test]
fn a_forged_byte_with_a_fixed_checksum_never_opens_another_key() {
    let (io, mut file, key) = created("pw");
    file.add_slot(&key, &pw("second"), P, "second slot")
        .expect("add");
    let good = io.contents(KEYS_FILE).expect("file");
    let used = HEADER + 2 * SLOT_FIXED + "alice@host".len() + "second slot".len();
    let mut opened = BTreeSet::new();
    let step = if cfg!(debug_assertions) { 29 } else { 1 };
    for offset in (0..CHECKSUM_AT).step_by(step) {
        for bit in [0u8, 7] {
            let mut copy = good[..COPY_SIZE].to_vec();
            copy[offset] ^= 1 << bit;
            let sum = blake3::hash(&copy[..CHECKSUM_AT]);
            copy[CHECKSUM_AT..].copy_from_slice(sum.as_bytes());
            let mut both = copy.clone();
            both.extend_from_slice(&copy);
            let fs = Arc::new(FaultyStorage::new());
            fs.create(KEYS_FILE).expect("create");
            fs.write(KEYS_FILE, 0, &both).expect("write");
            let result = KeyFile::open(fs).and_then(|f| f.unlock(&pw("pw")));
            match result {
                Ok(u) => {
                    assert!(same_key(&u.key, &key), "offset {offset}: another key");
                    opened.insert(offset);
                }
                Err(
                    StoreError::Corrupt { .. }
                    | StoreError::WrongPassword { .. }
                    | StoreError::KeyFileVersion { .. },
                ) => {}
                Err(e) => panic!("offset {offset}: unexpected error {e}"),
            }
        }
    }
    // Only the header's unsealed fields (generation, next slot id) and the other slot leave
    // the first password working.
    let slot2 = HEADER + SLOT_FIXED + "alice@host".len();
    for offset in &opened {
        assert!(
            (16..24).contains(offset)
                || (40..44).contains(offset)
                || (slot2..used).contains(offset),
            "offset {offset} changed and still opened"
        );
    }
    // The first slot's every byte is sealed.
    assert!(!opened
        .iter()
        .any(|o| (HEADER..HEADER + SLOT_FIXED + 10).contains(o)));
}

#[test]
fn truncated_or_garbage_files_are_typed_errors() {
    let (io, _file, _key) = created("pw");
    let good = io.contents(KEYS_FILE).expect("file");
    let mut rng = crate::fault::SplitMix64(7);
    let mut cases: Vec<Vec<u8>> = (0..=2 * COPY_SIZE)
        .step_by(97)
        .map(|n| good[..n].to_vec())
        .collect();
    cases.push(Vec::new());
    cases.push(vec![0u8; 2 * COPY_SIZE]);
    cases.push((0..2 * COPY_SIZE).map(|_| rng.next_u64() as u8).collect());
    let mut long = good.clone();
    long.extend_from_slice(&[1u8; 100]);
    cases.push(long);
    for bytes in cases {
        let fs = Arc::new(FaultyStorage::new());
        fs.create(KEYS_FILE).expect("create");
        fs.write(KEYS_FILE, 0, &bytes).expect("write");
        match KeyFile::open(fs).and_then(|f| f.unlock(&pw("pw")).map(|u| u.slot)) {
            Ok(1) => assert!(bytes.len() >= COPY_SIZE),
            Ok(n) => panic!("slot {n}?"),
            Err(StoreError::Corrupt { .. }) => {}
            Err(e) => panic!("{} bytes: {e}", bytes.len()),
        }
    }
}

#[test]
fn a_newer_format_is_refused_by_name() {
    let (io, _file, _key) = created("pw");
    let mut copy = io.contents(KEYS_FILE).expect("file")[..COPY_SIZE].to_vec();
    copy[8..12].copy_from_slice(&2u32.to_le_bytes());
    let sum = blake3::hash(&copy[..CHECKSUM_AT]);
    copy[CHECKSUM_AT..].copy_from_slice(sum.as_bytes());
    let fs = Arc::new(FaultyStorage::new());
    fs.create(KEYS_FILE).expect("create");
    fs.write(KEYS_FILE, 0, &copy).expect("write");
    let e = KeyFile::open(fs).expect_err("newer");
    assert!(
        matches!(
            e,
            StoreError::KeyFileVersion {
                found: 2,
                supported: 1,
                ..
            }
        ),
        "{e}"
    );
}

/// The passwords, of `candidates`, that open the key file on `io` (all to `key`).
fn opening(io: Arc<FaultyStorage>, key: &MasterKey, candidates: &[&str]) -> BTreeSet<String> {
    let file = KeyFile::open(io).expect("a crash never leaves the key file unreadable");
    let mut open = BTreeSet::new();
    for c in candidates {
        match file.unlock(&pw(c)) {
            Ok(u) => {
                assert!(same_key(&u.key, key));
                open.insert(c.to_string());
            }
            Err(StoreError::WrongPassword { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    open
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

type Change = fn(&mut KeyFile, &MasterKey) -> Result<(), StoreError>;

/// A crash at every storage operation of a slot change, each with many fates of the unsynced
/// writes: the key file always opens, with exactly the old or exactly the new password set.
/// And the same with an I/O error at each operation instead of a crash.
#[test]
fn a_crash_at_any_step_of_a_change_leaves_the_old_or_the_new_slots() {
    let candidates = ["a", "b", "c", "d"];
    // Fates of the unsynced writes per crash point: fewer in debug builds (Argon2 is slow there).
    let seeds = if cfg!(debug_assertions) { 3 } else { 24 };
    let changes: [(&str, Change, &[&str], &[&str]); 4] = [
        (
            "add",
            |f, k| f.add_slot(k, &pw("c"), P, "c").map(|_| ()),
            &["a", "b"],
            &["a", "b", "c"],
        ),
        ("remove", |f, k| f.remove_slot(k, 2), &["a", "b"], &["a"]),
        (
            "passwd",
            |f, _| f.change_password(&pw("a"), &pw("d"), P).map(|_| ()),
            &["a", "b"],
            &["b", "d"],
        ),
        (
            "repair",
            |f, _| f.repair().map(|_| ()),
            &["a", "b"],
            &["a", "b"],
        ),
    ];
    // Both copies whole, or one damaged before the change (the change must then write over
    // the damaged copy first: the whole one is all there is).
    for damaged in [None, Some(0u64), Some(1)] {
        for (name, change, old, new) in changes {
            // The starting store: slots a (1) and b (2), all durable.
            let (io, mut file, key) = created("a");
            file.add_slot(&key, &pw("b"), P, "b").expect("add b");
            io.sync_dir().expect("sync");
            if let Some(c) = damaged {
                io.flip_bit(KEYS_FILE, c * COPY_SIZE as u64 + 77, 2)
                    .expect("flip");
            }
            // How many operations the change takes.
            let probe = Arc::new(io.crash_image(0));
            let mut f = KeyFile::open(probe.clone()).expect("open");
            let before = probe.ops();
            change(&mut f, &key).expect("the change works");
            let n = probe.ops() - before;
            assert!(n >= 2, "{name}: {n} operations");
            assert_eq!(opening(probe, &key, &candidates), set(new), "{name}");

            let (old, new) = (set(old), set(new));
            let mut seen = BTreeSet::new();
            for at in 0..=n {
                for failure in [false, true] {
                    let disk = Arc::new(io.crash_image(0));
                    let mut f = KeyFile::open(disk.clone()).expect("open");
                    disk.set_plan(if failure {
                        FaultPlan {
                            fail_at: Some((at, 5)),
                            ..FaultPlan::default()
                        }
                    } else {
                        FaultPlan {
                            crash_at: Some(at),
                            ..FaultPlan::default()
                        }
                    });
                    let result = change(&mut f, &key);
                    disk.set_plan(FaultPlan::default());
                    if failure {
                        // The machine is up: the file as it is now, and after a crash from here.
                        let now = opening(disk.clone(), &key, &candidates);
                        assert!(now == old || now == new, "{name} EIO at {at}: {now:?}");
                        if result.is_ok() {
                            assert_eq!(now, new, "{name} EIO at {at}: Ok but not changed");
                        }
                    }
                    for seed in 0..seeds {
                        let after = Arc::new(disk.crash_image(seed));
                        let got = opening(after.clone(), &key, &candidates);
                        assert!(
                            got == old || got == new,
                            "{name}: crash at {at} (failure {failure}, seed {seed}): {got:?}"
                        );
                        if result.is_ok() && !failure && at == n {
                            assert_eq!(got, new, "{name}: done, then lost");
                        }
                        seen.insert(got == new);
                        // The writer after the crash puts the other copy right; both copies then
                        // hold what opened.
                        let mut f = KeyFile::open(after.clone()).expect("open");
                        f.repair().expect("repair");
                        let f = KeyFile::open(after.clone()).expect("open");
                        assert_eq!(f.note(), None, "{name}: repaired");
                        assert_eq!(opening(after, &key, &candidates), got);
                    }
                }
            }
            if old != new {
                assert_eq!(seen.len(), 2, "{name}: both outcomes occur");
            }
        }
    }
}

/// A crash at any step of creating the key file: no key file (create again, over the leftover
/// temporary file) or a whole one.
#[test]
fn a_crash_while_creating_leaves_no_key_file_or_a_whole_one() {
    let probe = Arc::new(FaultyStorage::new());
    KeyFile::create(probe.clone(), &pw("a"), P, "").expect("create");
    let n = probe.ops();
    let mut outcomes = BTreeSet::new();
    for at in 0..=n {
        let disk = Arc::new(FaultyStorage::new());
        disk.set_plan(FaultPlan {
            crash_at: Some(at),
            ..FaultPlan::default()
        });
        let created = KeyFile::create(disk.clone(), &pw("a"), P, "");
        for seed in 0..24 {
            let after = Arc::new(disk.crash_image(seed));
            match KeyFile::open(after.clone()) {
                Ok(f) => {
                    let u = f.unlock(&pw("a")).expect("a whole key file");
                    if let Ok((_, key)) = &created {
                        assert!(same_key(&u.key, key));
                    }
                    outcomes.insert("whole");
                }
                Err(StoreError::NotEncrypted { .. }) => {
                    assert!(created.is_err(), "created, synced, then lost");
                    let (_, key) =
                        KeyFile::create(after.clone(), &pw("b"), P, "").expect("create again");
                    let f = KeyFile::open(after).expect("open");
                    assert!(same_key(&f.unlock(&pw("b")).expect("b").key, &key));
                    outcomes.insert("none");
                }
                Err(e) => panic!("crash at {at}, seed {seed}: {e}"),
            }
        }
    }
    assert_eq!(outcomes.len(), 2);
}

#[test]
fn an_older_or_damaged_copy_is_noted_and_repaired() {
    let (io, mut file, key) = created("a");
    // Copy 1 damaged: noted; the next change writes copy 1 first, then copy 0.
    io.flip_bit(KEYS_FILE, COPY_SIZE as u64 + 100, 3)
        .expect("flip");
    let mut f = KeyFile::open(io.clone()).expect("open");
    assert!(f.note().expect("noted").contains("copy 1 is damaged"));
    assert!(f.repair().expect("repair"));
    assert_eq!(KeyFile::open(io.clone()).expect("open").note(), None);
    assert!(!f.repair().expect("nothing to do"));
    // An interrupted change: one copy new, the other still the old state.
    let before = io.contents(KEYS_FILE).expect("file");
    file.add_slot(&key, &pw("b"), P, "").expect("add");
    let after = io.contents(KEYS_FILE).expect("file");
    for (c, newer) in [(0usize, 1usize), (1, 0)] {
        let mut mixed = vec![0u8; 2 * COPY_SIZE];
        mixed[c * COPY_SIZE..][..COPY_SIZE].copy_from_slice(&before[..COPY_SIZE]);
        mixed[newer * COPY_SIZE..][..COPY_SIZE].copy_from_slice(&after[..COPY_SIZE]);
        let fs = Arc::new(FaultyStorage::new());
        fs.create(KEYS_FILE).expect("create");
        fs.write(KEYS_FILE, 0, &mixed).expect("write");
        let mut f = KeyFile::open(fs.clone()).expect("open");
        let note = f.note().expect("noted").to_string();
        assert!(note.contains(&format!("copy {c} is older")), "{note}");
        assert_eq!(f.slots().len(), 2, "the newer copy is used");
        assert!(f.repair().expect("repair"));
        let f = KeyFile::open(fs.clone()).expect("open");
        assert_eq!(f.note(), None);
        assert_eq!(
            fs.contents(KEYS_FILE).expect("file")[..COPY_SIZE],
            fs.contents(KEYS_FILE).expect("file")[COPY_SIZE..]
        );
        assert!(same_key(&f.unlock(&pw("b")).expect("b").key, &key));
    }
}

#[test]
fn a_file_of_the_wrong_length_is_noted_and_repaired() {
    let (io, _file, key) = created("a");
    let good = io.contents(KEYS_FILE).expect("file");
    io.write(KEYS_FILE, good.len() as u64, &[9u8; 100])
        .expect("grow");
    let mut f = KeyFile::open(io.clone()).expect("open");
    assert!(f.note().expect("noted").contains("8292 bytes"));
    assert!(f.repair().expect("repair"));
    assert_eq!(io.contents(KEYS_FILE).map(|c| c.len()), Some(2 * COPY_SIZE));
    let f = KeyFile::open(io.clone()).expect("open");
    assert_eq!(f.note(), None);
    assert!(same_key(&f.unlock(&pw("a")).expect("a").key, &key));
}

#[test]
fn subkeys_are_distinct_and_deterministic() {
    let key = MasterKey::generate().expect("key");
    let other = MasterKey::generate().expect("key");
    assert!(!same_key(&key, &other));
    assert_ne!(key.id(), other.id());
    let (r, d) = (key.record_key(), key.dedup_key());
    assert_ne!(r.0[..], d.0[..]);
    assert_ne!(r.0[..], key.bytes[..]);
    assert_ne!(d.0[..], key.bytes[..]);
    assert_eq!(r.0[..], key.record_key().0[..], "deterministic");
    assert_ne!(r.0[..], other.record_key().0[..]);
    assert_eq!(
        &key.id().0[..],
        &blake3::derive_key(CONTEXT_KEY_ID, &key.bytes[..])[..16]
    );

    // Keyed dedup ids: not the plain hash, differ between stores, same in one store.
    let page = [0x42u8; 4096];
    let id = d.id(&page);
    assert_ne!(id, *blake3::hash(&page).as_bytes());
    assert_ne!(id, other.dedup_key().id(&page));
    assert_eq!(id, key.dedup_key().id(&page));
    let mut h = d.hasher();
    h.update(&page[..1000]);
    h.update(&page[1000..]);
    assert_eq!(*h.finalize().as_bytes(), id);
    assert_eq!(*blake3::keyed_hash(d.key_bytes(), &page).as_bytes(), id);

    // The record key seals and opens (the nonce scheme is the sealing step's).
    let cipher = r.cipher();
    let nonce = XNonce::from([7u8; NONCE_LEN]);
    let mut buf = *b"some page bytes";
    let tag = cipher
        .encrypt_inout_detached(&nonce, b"kind 7", (&mut buf[..]).into())
        .expect("seal");
    assert_ne!(&buf, b"some page bytes");
    let mut wrong = buf;
    assert!(cipher
        .decrypt_inout_detached(&nonce, b"kind 6", (&mut wrong[..]).into(), &tag)
        .is_err());
    cipher
        .decrypt_inout_detached(&nonce, b"kind 7", (&mut buf[..]).into(), &tag)
        .expect("open");
    assert_eq!(&buf, b"some page bytes");
}

#[test]
fn debug_output_holds_no_secret() {
    let (_io, file, key) = created("hunter2hunter2");
    let secrets = [
        hex(&key.bytes[..]),
        format!("{:?}", &key.bytes[..]),
        hex(&key.record_key().0[..]),
        format!("{:?}", &key.record_key().0[..]),
        hex(&key.dedup_key().0[..]),
        format!("{:?}", &key.dedup_key().0[..]),
        "hunter2".to_string(),
        format!("{:?}", b"hunter2"),
    ];
    let unlocked = file.unlock(&pw("hunter2hunter2")).expect("unlock");
    let shown = [
        format!("{key:?}"),
        format!("{key:#?}"),
        format!("{unlocked:?}"),
        format!("{:?}", key.record_key()),
        format!("{:?}", key.dedup_key()),
        format!("{:?}", pw("hunter2hunter2")),
        format!("{file:?}"),
        format!("{:?}", file.unlock(&pw("hunter2")).expect_err("wrong")),
        file.unlock(&pw("hunter2")).expect_err("wrong").to_string(),
    ];
    for s in &shown {
        for secret in &secrets {
            assert!(!s.contains(secret.as_str()), "{s} shows {secret}");
        }
    }
    assert!(shown[0].contains(&key.id().to_string()), "{}", shown[0]);
}

#[test]
fn params_fit_the_floor_and_the_memory_cap() {
    assert!(KdfParams::OWASP_MIN.meets_owasp_minimum());
    assert!(!KdfParams::FOR_TESTS.meets_owasp_minimum());
    KdfParams::FOR_TESTS.validate().expect("valid");
    // A slow machine: the floor, with a third pass if it fits.
    assert_eq!(KdfParams::fit(1000.0), KdfParams::OWASP_MIN);
    assert_eq!(KdfParams::fit(19456.0 * 2.4), KdfParams::OWASP_MIN);
    assert_eq!(
        KdfParams::fit(19456.0 * 2.6),
        KdfParams {
            t: 3,
            ..KdfParams::OWASP_MIN
        }
    );
    // 300 MiB-passes: 3 passes of 100 MiB.
    assert_eq!(
        KdfParams::fit(300.0 * 1024.0),
        KdfParams {
            m_kib: 100 << 10,
            t: 3,
            p: 1
        }
    );
    // A fast machine: memory capped, more passes.
    let fast = KdfParams::fit(f64::from(KdfParams::TUNE_MAX_M_KIB) * 5.0);
    assert_eq!(
        fast,
        KdfParams {
            m_kib: KdfParams::TUNE_MAX_M_KIB,
            t: 5,
            p: 1
        }
    );
    assert_eq!(KdfParams::fit(f64::MAX).t, KdfParams::MAX_T);
}

/// Measures this machine (about a second): the tuned parameters take about half a second and
/// are at least OWASP's minimum.
#[test]
fn tuning_takes_about_half_a_second() {
    let target = Duration::from_millis(500);
    let tuned = KdfParams::tune(target).expect("tune");
    println!(
        "tuned: {} in {:.3} s (probe {:.0} MiB-passes/s)",
        tuned.params,
        tuned.measured.as_secs_f64(),
        tuned.probe_kib_passes_per_sec / 1024.0
    );
    assert!(tuned.params.meets_owasp_minimum());
    tuned.params.validate().expect("valid");
    if tuned.params != KdfParams::OWASP_MIN && !cfg!(debug_assertions) {
        // Not at the floor: the time is the target's, within what a busy machine does to it.
        let t = tuned.measured.as_secs_f64();
        assert!((0.15..2.0).contains(&t), "{t} s");
    }
}

#[test]
fn passwords_come_from_the_option_the_file_variable_or_the_variable() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("pw");
    std::fs::write(&file, b"from file\n").expect("write");
    let file2 = dir.path().join("pw2");
    std::fs::write(&file2, b"from env file\r\n").expect("write");
    let env_of = |pairs: Vec<(&'static str, OsString)>| {
        move |name: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
        }
    };
    let all = || {
        env_of(vec![
            ("PAGESNAP_PASSWORD", "from env".into()),
            ("PAGESNAP_PASSWORD_FILE", file2.clone().into_os_string()),
            ("PAGESNAP_NEW_PASSWORD", "new from env".into()),
        ])
    };
    let get = |role, f: Option<&Path>, env| {
        password_from(role, f, env)
            .expect("read")
            .map(|p| String::from_utf8(p.as_bytes().to_vec()).expect("utf8"))
    };
    use PasswordRole::{Current, New};
    assert_eq!(
        get(Current, Some(file.as_path()), all()).as_deref(),
        Some("from file")
    );
    assert_eq!(get(Current, None, all()).as_deref(), Some("from env file"));
    assert_eq!(
        get(
            Current,
            None,
            env_of(vec![("PAGESNAP_PASSWORD", "from env".into())])
        )
        .as_deref(),
        Some("from env")
    );
    assert_eq!(get(New, None, all()).as_deref(), Some("new from env"));
    assert_eq!(get(Current, None, env_of(vec![])), None);
    assert_eq!(get(New, None, env_of(vec![])), None);
    // Only one line end is taken off; other whitespace is the password's.
    std::fs::write(&file, b" spaced \n\n").expect("write");
    assert_eq!(
        get(Current, Some(file.as_path()), env_of(vec![])).as_deref(),
        Some(" spaced \n")
    );
    // Non-UTF-8 passwords are bytes like any other.
    std::fs::write(&file, [0xffu8, 0xfe, b'x']).expect("write");
    let p = password_from(Current, Some(file.as_path()), env_of(vec![]))
        .expect("read")
        .expect("some");
    assert_eq!(p.as_bytes(), &[0xff, 0xfe, b'x']);
    // Refused: an empty file, a missing one, a huge one, an empty variable.
    std::fs::write(&file, b"\n").expect("write");
    let missing = dir.path().join("missing");
    let huge = dir.path().join("huge");
    std::fs::write(&huge, vec![b'x'; (MAX_PASSWORD_FILE + 1) as usize]).expect("write");
    for f in [&file, &missing, &huge] {
        let e = password_from(Current, Some(f.as_path()), env_of(vec![])).expect_err("refused");
        assert!(matches!(e, StoreError::PasswordFile { .. }), "{e}");
        assert!(e.to_string().contains("password file"), "{e}");
    }
    let e = password_from(
        New,
        None,
        env_of(vec![("PAGESNAP_NEW_PASSWORD", OsString::new())]),
    )
    .expect_err("empty");
    assert!(matches!(e, StoreError::InvalidKeyInput(_)), "{e}");
    // The message when nothing was given names every way to give one.
    let msg = StoreError::NoPassword { role: New }.to_string();
    for part in [
        "new password",
        "PAGESNAP_NEW_PASSWORD",
        "PAGESNAP_NEW_PASSWORD_FILE",
        "--new-password-file",
        "terminal",
    ] {
        assert!(msg.contains(part), "{msg}");
    }
}

/// The real backend: create, change and reopen in a directory; no temporary file is left.
#[test]
fn on_a_real_directory() {
    let dir = tempfile::tempdir().expect("tmp");
    let io: SharedStorage = Arc::new(crate::FsStorage::new(dir.path(), true));
    std::fs::write(dir.path().join(KEYS_TMP_FILE), b"leftover").expect("leftover");
    let (mut file, key) = KeyFile::create(io.clone(), &pw("a"), P, "").expect("create");
    let id = file.add_slot(&key, &pw("b"), P, "").expect("add");
    file.remove_slot(&key, 1).expect("remove");
    let reader: SharedStorage = Arc::new(crate::FsStorage::new(dir.path(), false));
    let f = KeyFile::open(reader).expect("open");
    assert_eq!(f.unlock(&pw("b")).expect("b").slot, id);
    assert!(f.unlock(&pw("a")).is_err());
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    assert_eq!(names, vec![OsString::from(KEYS_FILE)]);
    assert_eq!(
        std::fs::metadata(dir.path().join(KEYS_FILE))
            .expect("stat")
            .len(),
        2 * COPY_SIZE as u64
    );
}
