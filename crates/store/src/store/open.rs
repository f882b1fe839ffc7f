//! Creating and opening a store: the writer lock, reading both superblock slots, and the recovery
//! a writer's open runs (check every listed segment, make both slots agree, and only then remove
//! or quarantine leftovers). See `docs/format.md` for the superblock and the recovery order.

use super::{corrupt, io_err, Cipher, Mode, Store, Writer};
use crate::error::StoreError;
use crate::format::{
    parse_seg_name, seg_name, segment_header, SlotError, Superblock, FORMAT_VERSION, LOCK_FILE,
    SEG_HEADER, SEG_MAGIC, SLOT_SIZE, SUPERBLOCK_FILE,
};
use crate::keys::{KdfParams, KeyFile, KeyId, Password};
use crate::storage::{FsStorage, LockGuard, SharedStorage, Storage};
use crate::{OpenReport, StoreOptions};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// What the superblock slot not in use holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum OtherSlot {
    /// The committed state too: the normal case.
    Same,
    /// An older valid state (this generation).
    Older(u64),
    /// Never written (a format 1 store after its first commit).
    Empty,
    /// Fails its checksum or does not decode.
    Damaged,
}

/// Both superblock slots as read.
pub(super) struct SlotsRead {
    pub(super) sb: Superblock,
    slot: usize,
    pub(super) other: OtherSlot,
}

impl SlotsRead {
    /// A sentence on the other slot, naming the file and what is in use, when it is not a copy.
    pub(super) fn note(&self, io: &dyn Storage) -> Option<String> {
        let file = io.location().join(SUPERBLOCK_FILE);
        let (other, using) = (1 - self.slot, self.slot);
        let what = match self.other {
            OtherSlot::Same => return None,
            OtherSlot::Older(g) => format!(
                "slot {other} holds generation {g}, older than the committed state (a commit \
                 interrupted between its two slot writes, or a format 1 store)"
            ),
            OtherSlot::Empty => format!("slot {other} is empty (a format 1 store)"),
            OtherSlot::Damaged => format!(
                "slot {other} (offset {}) fails its checksum: it is damaged",
                other * SLOT_SIZE
            ),
        };
        Some(format!(
            "{}: {what}; using slot {using}, generation {}; a writer's open rewrites slot {other}",
            file.display(),
            self.sb.generation
        ))
    }
}

impl Store {
    /// Creates a store in the existing directory `dir` (std::fs backend).
    pub fn init(dir: impl AsRef<Path>, opts: StoreOptions) -> Result<Store, StoreError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.into(),
            step: "create store directory",
            source,
        })?;
        Self::init_with(Arc::new(FsStorage::new(dir, true)), opts)
    }

    /// Creates an encrypted store in `dir` (std::fs backend): a new random master key in a key
    /// file (one slot under `password`, Argon2id with `kdf`), then the store, whose superblock
    /// names the key's id. See `docs/security.md`.
    pub fn init_encrypted(
        dir: impl AsRef<Path>,
        opts: StoreOptions,
        password: &Password,
        kdf: KdfParams,
        label: &str,
    ) -> Result<Store, StoreError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.into(),
            step: "create store directory",
            source,
        })?;
        Self::init_encrypted_with(
            Arc::new(FsStorage::new(dir, true)),
            opts,
            password,
            kdf,
            label,
        )
    }

    /// [`Store::init_encrypted`] on `io`.
    pub fn init_encrypted_with(
        io: SharedStorage,
        opts: StoreOptions,
        password: &Password,
        kdf: KdfParams,
        label: &str,
    ) -> Result<Store, StoreError> {
        Self::init_encrypted_cipher_with(io, opts, password, kdf, label, Cipher::default())
    }

    /// [`Store::init_encrypted_with`] sealing with `cipher` ([`Cipher::default`], AES-256-GCM-SIV,
    /// unless a store must be readable by a pagesnap that knows only scheme 1).
    pub fn init_encrypted_cipher_with(
        io: SharedStorage,
        opts: StoreOptions,
        password: &Password,
        kdf: KdfParams,
        label: &str,
        cipher: Cipher,
    ) -> Result<Store, StoreError> {
        Self::init_version_keyed(
            io,
            opts,
            FORMAT_VERSION,
            Some((password, kdf, label, cipher)),
        )
    }

    /// Whether the store in `dir` is encrypted (its key id), from its superblock; nothing
    /// secret is needed.
    pub fn encryption_of(dir: impl AsRef<Path>) -> Result<Option<KeyId>, StoreError> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(StoreError::NotAStore { path: dir.into() });
        }
        Ok(Self::read_superblock(&FsStorage::new(dir, false))?
            .sb
            .encryption
            .map(|e| e.key_id))
    }

    /// [`Store::encryption_of`] for a store on `io`.
    pub fn encryption_of_storage(io: &dyn Storage) -> Result<Option<KeyId>, StoreError> {
        Ok(Self::read_superblock(io)?.sb.encryption.map(|e| e.key_id))
    }

    /// Opens the store in `dir` (std::fs backend). An encrypted store needs its password:
    /// [`Store::open_encrypted`]; here it is [`StoreError::Encrypted`].
    pub fn open(dir: impl AsRef<Path>, mode: Mode) -> Result<(Store, OpenReport), StoreError> {
        Self::open_encrypted(dir, mode, None)
    }

    /// Opens the store in `dir` (std::fs backend) with the password of an encrypted store
    /// (reading or writing, either needs it; a store that is not encrypted ignores it).
    pub fn open_encrypted(
        dir: impl AsRef<Path>,
        mode: Mode,
        password: Option<&Password>,
    ) -> Result<(Store, OpenReport), StoreError> {
        let dir = dir.as_ref();
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(StoreError::NotAStore { path: dir.into() }),
            Err(source) if source.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotAStore { path: dir.into() })
            }
            Err(source) => {
                return Err(StoreError::Io {
                    path: dir.into(),
                    step: "open store directory",
                    source,
                })
            }
        }
        Self::open_with_key(
            Arc::new(FsStorage::new(dir, mode == Mode::Write)),
            mode,
            StoreOptions::default(),
            password,
        )
    }

    /// Creates a store on `io`.
    pub fn init_with(io: SharedStorage, opts: StoreOptions) -> Result<Store, StoreError> {
        Self::init_version(io, opts, FORMAT_VERSION)
    }

    /// Creates a store in format 2 (a trie index, a superblock write per commit), as the
    /// previous release did: for compatibility tests and the upgrade path.
    #[doc(hidden)]
    pub fn init_format2_with(io: SharedStorage, opts: StoreOptions) -> Result<Store, StoreError> {
        Self::init_version(io, opts, crate::format::TRIE_FORMAT)
    }

    /// Creates a format 3 store (the commit log without compression), for tests of the
    /// compatibility path.
    #[doc(hidden)]
    pub fn init_format3_with(io: SharedStorage, opts: StoreOptions) -> Result<Store, StoreError> {
        Self::init_version(io, opts, 3)
    }

    fn init_version(
        io: SharedStorage,
        opts: StoreOptions,
        version: u32,
    ) -> Result<Store, StoreError> {
        Self::init_version_keyed(io, opts, version, None)
    }

    fn init_version_keyed(
        io: SharedStorage,
        opts: StoreOptions,
        version: u32,
        keyed: Option<(&Password, KdfParams, &str, Cipher)>,
    ) -> Result<Store, StoreError> {
        if !opts.page_size.is_power_of_two() || !(512..=(16 << 20)).contains(&opts.page_size) {
            return Err(StoreError::Usage(
                "the page size must be a power of two from 512 bytes to 16 MiB",
            ));
        }
        // Lock first, then look: a writer that commits between our look and our lock must not
        // have its files taken for leftovers.
        let lock = match Self::lock(&*io) {
            Ok(lock) => lock,
            // Held by a writer: say that a store is there, if one is (nothing is changed).
            Err(e @ StoreError::Locked { .. }) => {
                return Err(match Self::read_superblock(&*io) {
                    Err(StoreError::NotAStore { .. }) => e,
                    _ => StoreError::AlreadyExists {
                        path: io.location().into(),
                    },
                })
            }
            Err(e) => return Err(e),
        };
        let names = io
            .list()
            .map_err(io_err(&*io, "", "list store directory"))?;
        if names.iter().any(|n| n == SUPERBLOCK_FILE) {
            match Self::read_superblock(&*io) {
                Err(StoreError::NotAStore { .. }) => {}
                _ => {
                    return Err(StoreError::AlreadyExists {
                        path: io.location().into(),
                    })
                }
            }
        }
        // A key file without a superblock: an encrypted init interrupted after creating it, or a
        // store whose superblock is gone. Never removed nor reused silently: the key file is the
        // one file whose loss loses everything.
        if names.iter().any(|n| n == crate::keys::KEYS_FILE) {
            return Err(StoreError::KeysExist {
                path: io.location().into(),
            });
        }
        // Leftovers of an interrupted init (no superblock slot was ever written) are cleared.
        for n in names
            .iter()
            .filter(|n| parse_seg_name(n).is_some() || *n == SUPERBLOCK_FILE)
        {
            io.remove(n)
                .map_err(io_err(&*io, n, "remove leftover file"))?;
        }
        // The key file first (whole or not at all); the superblock that names it comes after.
        let unlocked = match keyed {
            Some((password, kdf, label, cipher)) => {
                let (_, key) = KeyFile::create(io.clone(), password, kdf, label)?;
                Some((crate::keys::Unlocked { key, slot: 1 }, cipher))
            }
            None => None,
        };
        let first = seg_name(1);
        io.create(&first)
            .map_err(io_err(&*io, &first, "create segment"))?;
        io.write(&first, 0, &segment_header(1, version))
            .map_err(io_err(&*io, &first, "write segment header"))?;
        io.sync(&first)
            .map_err(io_err(&*io, &first, "sync segment"))?;
        let sb = Superblock {
            generation: 1,
            page_size: opts.page_size,
            next_snapshot: 1,
            catalog: None,
            dedup: None,
            catalog_copy: None,
            active_segment: 1,
            active_len: SEG_HEADER,
            segments: vec![1],
            segment_bytes: opts.segment_bytes,
            version,
            compression: if version >= crate::format::FRAME_FORMAT {
                opts.compression
            } else {
                crate::Compression::None
            },
            encryption: unlocked.as_ref().map(|(u, cipher)| super::Encryption {
                cipher: *cipher,
                key_id: u.key.id(),
            }),
        };
        io.create(SUPERBLOCK_FILE)
            .map_err(io_err(&*io, SUPERBLOCK_FILE, "create superblock"))?;
        // Both slots hold the committed state (see `publish`).
        let mut slots = sb.encode();
        slots.extend_from_slice(&sb.encode());
        io.write(SUPERBLOCK_FILE, 0, &slots).map_err(io_err(
            &*io,
            SUPERBLOCK_FILE,
            "write superblock",
        ))?;
        io.sync(SUPERBLOCK_FILE)
            .map_err(io_err(&*io, SUPERBLOCK_FILE, "sync superblock"))?;
        io.sync_dir()
            .map_err(io_err(&*io, "", "sync store directory"))?;
        let writer = Writer::new(lock, &sb, &io)?;
        Ok(Store {
            io,
            opts,
            sb,
            cache: Mutex::new(HashMap::new()),
            pinned: BTreeMap::new(),
            writer: Some(writer),
            catalog: Default::default(),
            maps: Default::default(),
            frame_cache: Default::default(),
            crypt: unlocked
                .as_ref()
                .map(|(u, cipher)| Arc::new(super::seal::Crypt::new(&u.key, *cipher))),
            unlocked: unlocked.map(|(u, _)| u),
            key_note: None,
        })
    }

    fn lock(io: &dyn Storage) -> Result<Box<dyn LockGuard>, StoreError> {
        match io
            .try_lock(LOCK_FILE)
            .map_err(io_err(io, LOCK_FILE, "lock store"))?
        {
            Some(guard) => {
                let note = format!("pid {}\n", std::process::id());
                // Best effort: the note only names the holder in others' error messages.
                let _ = io
                    .set_len(LOCK_FILE, 0)
                    .and_then(|_| io.write(LOCK_FILE, 0, note.as_bytes()));
                Ok(guard)
            }
            None => {
                let len = io.len(LOCK_FILE).unwrap_or(0).min(256);
                let mut buf = vec![0u8; len as usize];
                let holder = match io.read(LOCK_FILE, 0, &mut buf) {
                    Ok(()) => String::from_utf8_lossy(&buf).trim().to_string(),
                    Err(_) => String::new(),
                };
                let holder = if holder.is_empty() {
                    "unknown process".to_string()
                } else {
                    holder
                };
                Err(StoreError::Locked {
                    path: io.location().into(),
                    holder,
                })
            }
        }
    }

    /// Reads both superblock slots: the valid one with the highest generation, and what the other
    /// slot holds.
    pub(super) fn read_superblock(io: &dyn Storage) -> Result<SlotsRead, StoreError> {
        let not_a_store = || StoreError::NotAStore {
            path: io.location().into(),
        };
        let len = match io.len(SUPERBLOCK_FILE) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_a_store()),
            Err(e) => return Err(io_err(io, SUPERBLOCK_FILE, "read superblock")(e)),
        };
        let mut buf = vec![0u8; 2 * SLOT_SIZE];
        let have = usize::try_from(len)
            .unwrap_or(usize::MAX)
            .min(2 * SLOT_SIZE);
        io.read(SUPERBLOCK_FILE, 0, &mut buf[..have])
            .map_err(io_err(io, SUPERBLOCK_FILE, "read superblock"))?;
        let slots = [
            Superblock::decode(&buf[..SLOT_SIZE]),
            Superblock::decode(&buf[SLOT_SIZE..]),
        ];
        for s in &slots {
            if let Err(SlotError::Newer(found)) = s {
                return Err(StoreError::NewerVersion {
                    path: io.location().into(),
                    found: *found,
                    supported: FORMAT_VERSION,
                });
            }
            if let Err(SlotError::UnknownScheme(scheme)) = s {
                return Err(StoreError::UnknownEncryption {
                    path: io.location().into(),
                    scheme: *scheme,
                });
            }
        }
        let damaged = |s: &Result<Superblock, SlotError>| {
            matches!(s, Err(SlotError::Checksum) | Err(SlotError::Malformed))
        };
        let best = slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().ok().map(|sb| (i, sb)))
            .max_by_key(|(i, sb)| (sb.generation, std::cmp::Reverse(*i)));
        let Some((slot, sb)) = best else {
            return Err(if slots.iter().any(damaged) {
                corrupt(
                    io,
                    SUPERBLOCK_FILE,
                    "superblock",
                    0,
                    "both slots fail their checksum",
                )
            } else {
                not_a_store()
            });
        };
        let other = &slots[1 - slot];
        let state = match other {
            Ok(o) if o.same_state(sb) => OtherSlot::Same,
            Ok(o) => OtherSlot::Older(o.generation),
            Err(SlotError::Empty) => OtherSlot::Empty,
            Err(_) => OtherSlot::Damaged,
        };
        Ok(SlotsRead {
            sb: sb.clone(),
            slot,
            other: state,
        })
    }

    /// Opens the store on `io`.
    ///
    /// A writer locks the store before it reads anything. Then, before it changes anything, it
    /// checks that every segment the committed state lists is there; rewrites the other
    /// superblock slot if it does not hold the committed state (so both do again); and only then
    /// removes segment files that no slot lists, the leftovers of an interrupted commit or gc —
    /// or, if a slot was damaged, renames them to `quarantine-…` instead.
    pub fn open_with(
        io: SharedStorage,
        mode: Mode,
        opts: StoreOptions,
    ) -> Result<(Store, OpenReport), StoreError> {
        Self::open_with_key(io, mode, opts, None)
    }

    /// [`Store::open_with`], with the password of an encrypted store: its key file is read
    /// (refused if missing or of another master key) and unlocked before anything else is read
    /// past the superblock or changed; a wrong password is [`StoreError::WrongPassword`] and no
    /// password [`StoreError::Encrypted`], with nothing changed.
    pub fn open_with_key(
        io: SharedStorage,
        mode: Mode,
        opts: StoreOptions,
        password: Option<&Password>,
    ) -> Result<(Store, OpenReport), StoreError> {
        let lock = match mode {
            Mode::Read => None,
            Mode::Write => Some(Self::lock(&*io)?),
        };
        let read = Self::read_superblock(&*io)?;
        let mut sb = read.sb.clone();
        let mut key_file = None;
        let unlocked = match sb.encryption {
            // A superblock that says "not encrypted" beside a key file, or a password given for
            // a store that says so, is refused: either may be a downgrade by someone who edited
            // the superblock (its crc32 is no protection against that), and writing on would put
            // the user's data in clear.
            None if password.is_some() || KeyFile::exists(&*io)? => {
                return Err(StoreError::NotEncryptedButKeyed {
                    path: io.location().into(),
                    keys: KeyFile::exists(&*io)?,
                })
            }
            None => None,
            Some(super::Encryption { key_id: id, .. }) => {
                let Some(password) = password else {
                    return Err(StoreError::Encrypted {
                        path: io.location().into(),
                    });
                };
                let kf = match KeyFile::open(io.clone()) {
                    Err(StoreError::NotEncrypted { path }) => {
                        return Err(StoreError::KeyFileMissing { path })
                    }
                    r => r?,
                };
                if kf.key_id() != id {
                    return Err(StoreError::KeyMismatch {
                        path: io.location().join(crate::keys::KEYS_FILE),
                        found: kf.key_id().to_string(),
                        expected: id.to_string(),
                    });
                }
                let u = kf.unlock(password)?;
                key_file = Some(kf);
                Some(u)
            }
        };
        let crypt = unlocked
            .as_ref()
            .zip(sb.encryption)
            .map(|(u, e)| Arc::new(super::seal::Crypt::new(&u.key, e.cipher)));
        let mut damaged_segments = Vec::new();
        for id in &sb.segments {
            let name = seg_name(*id);
            let mut head = [0u8; 8];
            match io.read_meta(&name, 0, &mut head) {
                Ok(()) if head == SEG_MAGIC => {}
                // Records carry their own checks: a damaged header hides nothing by itself, so
                // it is reported (and verify names it), not fatal.
                Ok(()) => damaged_segments.push(name),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => damaged_segments.push(name),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(corrupt(
                        &*io,
                        &name,
                        "segment file",
                        0,
                        format!(
                            "missing, but the superblock (generation {}) lists it; nothing was \
                             changed: restore the file from a copy of the store",
                            sb.generation
                        ),
                    ))
                }
                Err(e) => return Err(io_err(&*io, &name, "open segment")(e)),
            }
        }
        // Format 3: the commits after the superblock's hint (see `log.rs`).
        let mut log_damage = Vec::new();
        let mut discarded_tail = None;
        if sb.version >= 3 {
            let scanned = super::log::scan_log(&*io, &mut sb, crypt.as_deref())?;
            log_damage = scanned.damage;
            discarded_tail = scanned.discarded;
        }
        let mut report = OpenReport {
            generation: sb.generation,
            superblock_slot: read.slot,
            damaged_slot: read.other == OtherSlot::Damaged,
            superblock_note: read.note(&*io),
            damaged_segments,
            discarded_tail,
            ..OpenReport::default()
        };
        let writer = match lock {
            None => None,
            Some(lock) => {
                let mut agree = read.other == OtherSlot::Same;
                if !agree {
                    // Both slots must name the committed state before anything is removed: a
                    // slot still naming an older state may list files that are garbage now.
                    let at = (1 - read.slot) as u64 * SLOT_SIZE as u64;
                    agree = io
                        .write(SUPERBLOCK_FILE, at, &sb.encode())
                        .and_then(|_| io.sync(SUPERBLOCK_FILE))
                        .is_ok();
                    report.repaired_slot = agree;
                }
                // If the slot could not be rewritten (a bad sector under it), the writer still
                // opens, with one copy, as the writer before it ran; nothing is removed.
                let names = if agree {
                    io.list()
                        .map_err(io_err(&*io, "", "list store directory"))?
                } else {
                    Vec::new()
                };
                let mut changed = false;
                for n in &names {
                    let Some(id) = parse_seg_name(n) else {
                        continue;
                    };
                    if sb.segments.binary_search(&id).is_ok() {
                        continue;
                    }
                    if read.other == OtherSlot::Damaged {
                        // A name nothing else has: quarantined files are never replaced.
                        let mut to = format!("quarantine-g{}-{n}", sb.generation);
                        let mut k = 1;
                        while names.contains(&to) || report.quarantined.contains(&to) {
                            to = format!("quarantine-g{}-{k}-{n}", sb.generation);
                            k += 1;
                        }
                        io.rename(n, &to).map_err(io_err(
                            &*io,
                            n,
                            "quarantine unlisted segment",
                        ))?;
                        report.quarantined.push(to);
                    } else {
                        io.remove(n)
                            .map_err(io_err(&*io, n, "remove leftover segment"))?;
                    }
                    changed = true;
                }
                if changed {
                    io.sync_dir()
                        .map_err(io_err(&*io, "", "sync store directory"))?;
                }
                let mut w = Writer::new(lock, &sb, &io)?;
                w.degraded = !agree;
                Some(w)
            }
        };
        let opts = StoreOptions {
            page_size: sb.page_size,
            segment_bytes: if sb.segment_bytes == 0 {
                opts.segment_bytes
            } else {
                sb.segment_bytes
            },
            ..opts
        };
        let mut catalog = super::log::Catalog::default();
        if sb.version >= 3 {
            match super::log::load_catalog(&*io, &sb, &mut log_damage, crypt.as_deref()) {
                Ok(c) => catalog = c,
                Err(e) if e.is_corruption() => catalog.unreadable = Some(e.to_string()),
                Err(e) => return Err(e),
            }
            catalog.damage = log_damage;
            catalog.discarded = report.discarded_tail.clone();
        }
        let mut store = Store {
            io,
            opts,
            sb,
            cache: Mutex::new(HashMap::new()),
            pinned: BTreeMap::new(),
            writer,
            catalog,
            maps: Default::default(),
            frame_cache: Default::default(),
            crypt,
            unlocked,
            key_note: key_file.as_ref().and_then(|k| k.note().map(String::from)),
        };
        // A writer's open puts the key file's other copy right, as the superblock's (best
        // effort: verify reports what is left).
        if let Some(kf) = key_file.as_mut().filter(|_| store.writer.is_some()) {
            if kf.repair().is_ok() {
                store.key_note = kf.note().map(String::from);
            }
        }
        if store.is_log() && store.writer.is_some() {
            report.repaired_records = store.repair_commit_copies()?;
        }
        if store.is_log() && store.writer.is_some() && store.write_hint().is_err() {
            // Records an earlier writer left past the last commit must never count: the
            // generation moves on before this writer's first commit (retried then).
            if let Some(w) = store.writer.as_mut() {
                w.log.need_hint = true;
            }
        }
        // Damage containment: the newest snapshot whose manifest and index root read back.
        let ids = match store.snapshot_ids() {
            Ok(ids) => ids,
            Err(e) if e.is_corruption() => {
                // The catalog itself is damaged: no snapshot is reachable, but the store opens so
                // that verify can say what is wrong.
                report.catalog_damage = Some(e.to_string());
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        for id in ids.iter().rev() {
            match store
                .snapshot(*id)
                .and_then(|s| store.index_root(&s).map(|_| s))
            {
                Ok(_) => {
                    report.latest = Some(*id);
                    break;
                }
                Err(e) if e.is_corruption() => report.damaged.push(*id),
                Err(e) => return Err(e),
            }
        }
        Ok((store, report))
    }
}
