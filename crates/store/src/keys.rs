//! Key management for encryption at rest (issue 17): the store's master key, the key slots that
//! wrap it under passwords, and where passwords come from.
//!
//! - A [`MasterKey`] is 32 random bytes. It never reaches the disk in clear: the key file `keys`
//!   holds it once per *key slot*, sealed (XChaCha20-Poly1305) under a key derived from that
//!   slot's password with Argon2id (random salt, parameters stored in the slot). Any slot's
//!   password opens the store; a password changes without re-encrypting anything.
//! - Every key the store uses is derived from the master key with blake3's `derive_key` and a
//!   context string of its own ([`MasterKey::record_key`], [`MasterKey::dedup_key`],
//!   [`MasterKey::id`]), so no two purposes ever share a key.
//! - The key file is two copies of one 4096-byte block, each with a generation and a blake3
//!   checksum, written one after the other with a sync after each (the superblock's scheme): a
//!   crash leaves one whole copy of the old or the new slot set, and one damaged copy loses
//!   nothing. It is created whole under a temporary name and renamed into place.
//! - Secrets (master key, derived keys, passwords) are zeroed when dropped (`zeroize`) and have
//!   no `Debug` that prints them; no error message holds one.
//!
//! Changes to the key file must be made by the store's one writer (the caller holds the store's
//! lock). `docs/security.md` has the key hierarchy, the file's bytes and the reasons.

use crate::storage::{SharedStorage, Storage};
use crate::store::{io_err, now_ms};
use crate::StoreError;
use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// The key file's name in the store directory.
pub const KEYS_FILE: &str = "keys";
/// The name a new key file is written under before it is renamed to [`KEYS_FILE`].
pub const KEYS_TMP_FILE: &str = "keys.tmp";
/// The key file format this build writes (and the newest it reads).
pub const KEYS_VERSION: u32 = 1;
/// Bytes of one copy; the file is two copies.
pub const COPY_SIZE: usize = 4096;
/// Most key slots a key file holds.
pub const MAX_SLOTS: usize = 8;
/// Longest slot label, in bytes.
pub const MAX_SLOT_LABEL: usize = 255;

const MAGIC: &[u8; 8] = b"PGSNAPKY";
const HEADER: usize = 64;
const SLOT_FIXED: usize = 136;
const CHECKSUM_AT: usize = COPY_SIZE - 32;
const SALT_LEN: usize = 32;
const NONCE_LEN: usize = 24;
const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;
/// Slot field: the password hash (1 = Argon2id, version 0x13).
const KDF_ARGON2ID: u8 = 1;
/// Slot field: the wrapping AEAD (1 = XChaCha20-Poly1305).
const AEAD_XCHACHA20POLY1305: u8 = 1;
/// A password file longer than this is refused (it is not a password file).
const MAX_PASSWORD_FILE: u64 = 64 << 10;

/// blake3 `derive_key` contexts: one per purpose, never reused for another.
const CONTEXT_KEY_ID: &str = "pagesnap 2026-12-07 master key id v1";
const CONTEXT_RECORD: &str = "pagesnap 2026-12-07 record sealing v1";
const CONTEXT_RECORD_GCM_SIV: &str = "pagesnap 2026-12-07 record sealing aes-256-gcm-siv v1";
const CONTEXT_DEDUP: &str = "pagesnap 2026-12-07 keyed dedup id v1";
/// Associated data of a slot's wrapped key starts with this.
const WRAP_AD_PREFIX: &[u8] = b"pagesnap key slot v1";

// ---------------------------------------------------------------------------------------------
// Secrets

/// A password (or passphrase, or the bytes of a key file used as one). Zeroed when dropped;
/// `Debug` does not print it.
pub struct Password(Zeroizing<Vec<u8>>);

impl Password {
    /// A password of these bytes (taken, not copied).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Password(Zeroizing::new(bytes.into()))
    }

    /// Its bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// True for the empty password (never accepted for a new slot).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Password {
    fn from(s: String) -> Self {
        Password::new(s.into_bytes())
    }
}

impl From<&str> for Password {
    fn from(s: &str) -> Self {
        Password::new(s.as_bytes().to_vec())
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(..)")
    }
}

/// The fingerprint of a master key: blake3 `derive_key` under its own context, first 16 bytes.
/// One-way, so it may be shown and stored; it tells which master key a slot or a store belongs
/// to.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 16]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// The store's master key: 32 random bytes, zeroed when dropped. Not `Clone` (one copy in
/// memory), and its `Debug` shows only its [`KeyId`]. Nothing is keyed with it directly: each use
/// takes a subkey ([`MasterKey::record_key`], [`MasterKey::dedup_key`]).
pub struct MasterKey {
    bytes: Zeroizing<[u8; KEY_LEN]>,
}

impl MasterKey {
    /// A new random master key (from the operating system's generator).
    pub fn generate() -> Result<MasterKey, StoreError> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        random(&mut bytes[..])?;
        Ok(MasterKey { bytes })
    }

    /// Its fingerprint.
    pub fn id(&self) -> KeyId {
        let full = Zeroizing::new(blake3::derive_key(CONTEXT_KEY_ID, &self.bytes[..]));
        let mut id = [0u8; 16];
        id.copy_from_slice(&full[..16]);
        KeyId(id)
    }

    /// The key that seals records in a scheme 1 store (XChaCha20-Poly1305; see
    /// `docs/security.md` for the nonce scheme and the associated data).
    pub fn record_key(&self) -> RecordKey {
        RecordKey(self.derive(CONTEXT_RECORD))
    }

    /// The key that seals records in a scheme 2 store (AES-256-GCM-SIV): a key of its own (its
    /// own context string), never the scheme 1 key under another cipher.
    pub fn record_key_gcm_siv(&self) -> RecordKey {
        RecordKey(self.derive(CONTEXT_RECORD_GCM_SIV))
    }

    /// The key of dedup ids: a page's id in an encrypted store is blake3 keyed with it, so an id
    /// does not tell whether the store holds a page someone else knows.
    pub fn dedup_key(&self) -> DedupKey {
        DedupKey(self.derive(CONTEXT_DEDUP))
    }

    fn derive(&self, context: &str) -> Zeroizing<[u8; KEY_LEN]> {
        Zeroizing::new(blake3::derive_key(context, &self.bytes[..]))
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

/// The record-sealing key (derived from the master key). Zeroed when dropped.
pub struct RecordKey(Zeroizing<[u8; KEY_LEN]>);

impl RecordKey {
    /// The AEAD keyed with it (it zeroes its copy of the key when dropped).
    pub fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&chacha20poly1305::Key::from(*self.0))
    }

    /// The key as AES-256-GCM-SIV (it zeroes its round keys when dropped).
    pub fn gcm_siv(&self) -> aes_gcm_siv::Aes256GcmSiv {
        aes_gcm_siv::Aes256GcmSiv::new(&aes_gcm_siv::Key::<aes_gcm_siv::Aes256GcmSiv>::from(
            *self.0,
        ))
    }
}

impl fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecordKey(..)")
    }
}

/// The dedup-id key (derived from the master key). Zeroed when dropped.
pub struct DedupKey(Zeroizing<[u8; KEY_LEN]>);

impl DedupKey {
    /// The keyed dedup id of `data`: `blake3::keyed_hash(key, data)`.
    pub fn id(&self, data: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.0, data).as_bytes()
    }

    /// A keyed blake3 hasher (for ids computed incrementally).
    pub fn hasher(&self) -> blake3::Hasher {
        blake3::Hasher::new_keyed(&self.0)
    }

    /// The key's bytes, for the many-pages-at-once keyed hashing of `pagehash` (do not copy them
    /// anywhere that is not zeroed).
    #[doc(hidden)]
    pub fn key_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for DedupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DedupKey(..)")
    }
}

fn random(buf: &mut [u8]) -> Result<(), StoreError> {
    getrandom::fill(buf).map_err(|e| StoreError::Random(e.to_string()))
}

// ---------------------------------------------------------------------------------------------
// Argon2id

/// A slot's Argon2id parameters (version 0x13, 32-byte output).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory, KiB.
    pub m_kib: u32,
    /// Passes over the memory.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl KdfParams {
    /// OWASP's minimum for Argon2id (19 MiB, 2 passes, 1 lane): the floor of [`KdfParams::tune`].
    pub const OWASP_MIN: KdfParams = KdfParams {
        m_kib: 19 * 1024,
        t: 2,
        p: 1,
    };
    /// Cheap parameters for tests (64 KiB, 1 pass): no protection for a real password. Slots
    /// store their parameters, so tests create slots with these and stay fast.
    pub const FOR_TESTS: KdfParams = KdfParams {
        m_kib: 64,
        t: 1,
        p: 1,
    };
    /// Most memory a slot may ask for (4 GiB): bounds what opening a tampered file allocates.
    pub const MAX_M_KIB: u32 = 4 << 20;
    /// Most passes a slot may ask for.
    pub const MAX_T: u32 = 64;
    /// Most lanes a slot may ask for.
    pub const MAX_P: u32 = 16;
    /// Memory [`KdfParams::tune`] goes up to before it adds passes instead (256 MiB: a restore
    /// may run on a smaller machine than the backup did).
    pub const TUNE_MAX_M_KIB: u32 = 256 << 10;

    /// Checks the parameters are within what Argon2 and this format allow.
    pub fn validate(&self) -> Result<(), String> {
        if self.p == 0 || self.p > Self::MAX_P {
            return Err(format!(
                "Argon2id lanes {} not in 1..={}",
                self.p,
                Self::MAX_P
            ));
        }
        if self.t == 0 || self.t > Self::MAX_T {
            return Err(format!(
                "Argon2id passes {} not in 1..={}",
                self.t,
                Self::MAX_T
            ));
        }
        let min_m = (8 * self.p).max(argon2::Params::MIN_M_COST);
        if self.m_kib < min_m || self.m_kib > Self::MAX_M_KIB {
            return Err(format!(
                "Argon2id memory {} KiB not in {min_m}..={} KiB",
                self.m_kib,
                Self::MAX_M_KIB
            ));
        }
        Ok(())
    }

    /// True if at least OWASP's minimum (memory and passes).
    pub fn meets_owasp_minimum(&self) -> bool {
        self.m_kib >= Self::OWASP_MIN.m_kib && self.t >= Self::OWASP_MIN.t
    }

    /// Derives the 32-byte key-encryption key of `password` and `salt`.
    fn derive(
        &self,
        password: &Password,
        salt: &[u8; SALT_LEN],
    ) -> Result<Zeroizing<[u8; KEY_LEN]>, StoreError> {
        self.validate().map_err(StoreError::InvalidKeyInput)?;
        let params = argon2::Params::new(self.m_kib, self.t, self.p, Some(KEY_LEN))
            .map_err(|e| StoreError::InvalidKeyInput(format!("Argon2id parameters: {e}")))?;
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = Zeroizing::new([0u8; KEY_LEN]);
        argon
            .hash_password_into(password.as_bytes(), salt, &mut out[..])
            .map_err(|e| match e {
                argon2::Error::OutOfMemory => StoreError::InvalidKeyInput(format!(
                    "Argon2id needs {} MiB of memory, which could not be had",
                    self.m_kib / 1024
                )),
                e => StoreError::InvalidKeyInput(format!("Argon2id: {e}")),
            })?;
        Ok(out)
    }

    /// Parameters that take about `target` to derive a key on this machine: 3 passes (RFC 9106's
    /// second recommended option) over as much memory as fits the time, up to
    /// [`KdfParams::TUNE_MAX_M_KIB`], then more passes; never below [`KdfParams::OWASP_MIN`].
    /// Measures a 32 MiB probe twice (the faster run counts), derives with the fitted
    /// parameters, and if that took more than 15% off the target fits once more by what it
    /// measured (the probe's fixed costs — allocation, page faults — weigh more in a short
    /// run): about three times `target` in all.
    pub fn tune(target: Duration) -> Result<Tuning, StoreError> {
        let probe = KdfParams {
            m_kib: 32 << 10,
            t: 1,
            p: 1,
        };
        let password = Password::from("pagesnap tuning probe");
        let salt = [0x5au8; SALT_LEN];
        let time = |params: &KdfParams| -> Result<f64, StoreError> {
            let start = Instant::now();
            params.derive(&password, &salt)?;
            Ok(start.elapsed().as_secs_f64().max(1e-6))
        };
        let best = time(&probe)?.min(time(&probe)?);
        // KiB-passes per second; Argon2's cost is close to linear in memory × passes.
        let rate = f64::from(probe.m_kib) / best;
        let goal = target.as_secs_f64();
        let mut params = Self::fit(rate * goal);
        let mut measured = time(&params)?;
        if params != Self::OWASP_MIN && (measured / goal - 1.0).abs() > 0.15 {
            let work = params.work() * goal / measured;
            let refit = Self::fit(work);
            if refit != params {
                params = refit;
                measured = time(&params)?;
            }
        }
        Ok(Tuning {
            params,
            measured: Duration::from_secs_f64(measured),
            probe_kib_passes_per_sec: rate,
        })
    }

    /// Memory × passes, KiB.
    fn work(&self) -> f64 {
        f64::from(self.m_kib) * f64::from(self.t)
    }

    /// The parameters for `work` KiB-passes (see [`KdfParams::tune`]).
    fn fit(work: f64) -> KdfParams {
        let floor = Self::OWASP_MIN;
        let mut t = 3u32;
        let mut m = work / f64::from(t);
        if m > f64::from(Self::TUNE_MAX_M_KIB) {
            m = f64::from(Self::TUNE_MAX_M_KIB);
            t = ((work / m).round() as u32).clamp(3, Self::MAX_T);
        }
        if m < f64::from(floor.m_kib) {
            // A slow machine: OWASP's minimum memory, and its 2 passes unless 3 fit.
            let t = ((work / f64::from(floor.m_kib)).round() as u32).clamp(floor.t, 3);
            return KdfParams { t, ..floor };
        }
        // Whole MiB.
        KdfParams {
            m_kib: (m as u32) / 1024 * 1024,
            t,
            p: 1,
        }
    }
}

impl fmt::Display for KdfParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Argon2id m={} KiB t={} p={}", self.m_kib, self.t, self.p)
    }
}

/// What [`KdfParams::tune`] chose and measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tuning {
    /// The parameters.
    pub params: KdfParams,
    /// How long one derivation with them took.
    pub measured: Duration,
    /// The probe's speed, KiB × passes per second.
    pub probe_kib_passes_per_sec: f64,
}

// ---------------------------------------------------------------------------------------------
// The key file

/// What a listing of key slots shows (nothing secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    /// The slot's id (1, 2, 3, … in the order slots were added; never reused in a key file).
    pub id: u32,
    /// When it was added, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Its Argon2id parameters.
    pub kdf: KdfParams,
    /// Its label (who or what it is for: `user@host` by default in the CLI).
    pub label: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Slot {
    info: SlotInfo,
    salt: [u8; SALT_LEN],
    nonce: [u8; NONCE_LEN],
    /// The master key sealed (32 bytes) and the tag (16).
    wrapped: [u8; KEY_LEN + TAG_LEN],
}

/// One copy's contents.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Contents {
    generation: u64,
    key_id: KeyId,
    next_slot: u32,
    slots: Vec<Slot>,
}

/// A master key opened from the key file, and the slot that opened it.
#[derive(Debug)]
pub struct Unlocked {
    /// The master key.
    pub key: MasterKey,
    /// The slot whose password it was.
    pub slot: u32,
}

/// The store's key file, as read. Holds no secret: unlocking derives one.
#[derive(Debug)]
pub struct KeyFile {
    io: SharedStorage,
    contents: Contents,
    /// The copy (0 or 1) the contents were read from.
    copy: usize,
    note: Option<String>,
}

fn check_label(label: &str) -> Result<(), StoreError> {
    if label.len() > MAX_SLOT_LABEL {
        return Err(StoreError::InvalidKeyInput(format!(
            "a key slot label is at most {MAX_SLOT_LABEL} bytes ({} given)",
            label.len()
        )));
    }
    if label.chars().any(char::is_control) {
        return Err(StoreError::InvalidKeyInput(
            "a key slot label has no control characters".into(),
        ));
    }
    Ok(())
}

fn check_new_password(password: &Password) -> Result<(), StoreError> {
    if password.is_empty() {
        return Err(StoreError::InvalidKeyInput(
            "an empty password protects nothing; choose another".into(),
        ));
    }
    Ok(())
}

impl Slot {
    /// Associated data of the wrapped key: the format, the key id and every field of the slot
    /// but the nonce and the wrapped key, so that no field (parameters, label, id) can be
    /// changed, and no slot moved into another key file, without the unwrap failing.
    fn associated_data(&self, key_id: &KeyId) -> Vec<u8> {
        let mut ad = Vec::with_capacity(WRAP_AD_PREFIX.len() + 16 + 64 + self.info.label.len());
        ad.extend_from_slice(WRAP_AD_PREFIX);
        ad.extend_from_slice(&key_id.0);
        let mut fixed = [0u8; SLOT_FIXED];
        self.encode_fixed(&mut fixed);
        ad.extend_from_slice(&fixed[..64]);
        ad.extend_from_slice(self.info.label.as_bytes());
        ad
    }

    fn encode_fixed(&self, out: &mut [u8; SLOT_FIXED]) {
        out[0..4].copy_from_slice(&self.info.id.to_le_bytes());
        out[4] = KDF_ARGON2ID;
        out[5] = AEAD_XCHACHA20POLY1305;
        // The label is at most MAX_SLOT_LABEL (255) bytes: checked before any slot is made.
        out[6..8].copy_from_slice(&(self.info.label.len() as u16).to_le_bytes());
        out[8..16].copy_from_slice(&self.info.created_unix_ms.to_le_bytes());
        out[16..20].copy_from_slice(&self.info.kdf.m_kib.to_le_bytes());
        out[20..24].copy_from_slice(&self.info.kdf.t.to_le_bytes());
        out[24..28].copy_from_slice(&self.info.kdf.p.to_le_bytes());
        out[28..32].fill(0);
        out[32..64].copy_from_slice(&self.salt);
        out[64..88].copy_from_slice(&self.nonce);
        out[88..136].copy_from_slice(&self.wrapped);
    }

    /// A new slot holding `master` under `password`.
    fn seal(
        id: u32,
        master: &MasterKey,
        key_id: &KeyId,
        password: &Password,
        kdf: KdfParams,
        label: &str,
    ) -> Result<Slot, StoreError> {
        check_label(label)?;
        check_new_password(password)?;
        kdf.validate().map_err(StoreError::InvalidKeyInput)?;
        let mut slot = Slot {
            info: SlotInfo {
                id,
                created_unix_ms: now_ms(),
                kdf,
                label: label.to_string(),
            },
            salt: [0; SALT_LEN],
            nonce: [0; NONCE_LEN],
            wrapped: [0; KEY_LEN + TAG_LEN],
        };
        random(&mut slot.salt)?;
        random(&mut slot.nonce)?;
        let kek = kdf.derive(password, &slot.salt)?;
        let cipher = XChaCha20Poly1305::new(&chacha20poly1305::Key::from(*kek));
        let mut buf = Zeroizing::new(*master.bytes);
        let ad = slot.associated_data(key_id);
        let tag = cipher
            .encrypt_inout_detached(&XNonce::from(slot.nonce), &ad, (&mut buf[..]).into())
            .map_err(|_| StoreError::InvalidKeyInput("sealing the master key failed".into()))?;
        slot.wrapped[..KEY_LEN].copy_from_slice(&buf[..]);
        slot.wrapped[KEY_LEN..].copy_from_slice(tag.as_slice());
        Ok(slot)
    }

    /// The master key, if `password` is this slot's. `Ok(None)`: not this slot's password (or
    /// the slot was tampered with: the two cannot be told apart).
    fn open(&self, key_id: &KeyId, password: &Password) -> Result<Option<MasterKey>, StoreError> {
        let kek = self.info.kdf.derive(password, &self.salt)?;
        let cipher = XChaCha20Poly1305::new(&chacha20poly1305::Key::from(*kek));
        let mut buf = Zeroizing::new([0u8; KEY_LEN]);
        buf.copy_from_slice(&self.wrapped[..KEY_LEN]);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&self.wrapped[KEY_LEN..]);
        let ad = self.associated_data(key_id);
        match cipher.decrypt_inout_detached(
            &XNonce::from(self.nonce),
            &ad,
            (&mut buf[..]).into(),
            &Tag::from(tag),
        ) {
            Ok(()) => Ok(Some(MasterKey { bytes: buf })),
            Err(_) => Ok(None),
        }
    }
}

impl Contents {
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; COPY_SIZE];
        out[0..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&KEYS_VERSION.to_le_bytes());
        out[16..24].copy_from_slice(&self.generation.to_le_bytes());
        out[24..40].copy_from_slice(&self.key_id.0);
        out[40..44].copy_from_slice(&self.next_slot.to_le_bytes());
        // At most MAX_SLOTS (8): checked by every change.
        out[44..46].copy_from_slice(&(self.slots.len() as u16).to_le_bytes());
        let mut at = HEADER;
        for slot in &self.slots {
            let mut fixed = [0u8; SLOT_FIXED];
            slot.encode_fixed(&mut fixed);
            out[at..at + SLOT_FIXED].copy_from_slice(&fixed);
            at += SLOT_FIXED;
            let label = slot.info.label.as_bytes();
            out[at..at + label.len()].copy_from_slice(label);
            at += label.len();
        }
        let sum = blake3::hash(&out[..CHECKSUM_AT]);
        out[CHECKSUM_AT..].copy_from_slice(sum.as_bytes());
        out
    }

    /// Decodes one copy. `Err(Ok(version))`: a valid copy of a newer format; `Err(Err(why))`:
    /// damaged.
    fn decode(b: &[u8]) -> Result<Contents, Result<u32, String>> {
        if b.len() != COPY_SIZE {
            return Err(Err(format!("{} bytes, not {COPY_SIZE}", b.len())));
        }
        if b.iter().all(|&x| x == 0) {
            return Err(Err("never written (all zero)".into()));
        }
        if blake3::hash(&b[..CHECKSUM_AT]).as_bytes()[..] != b[CHECKSUM_AT..] {
            return Err(Err("checksum mismatch".into()));
        }
        if &b[0..8] != MAGIC {
            return Err(Err("bad magic".into()));
        }
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        let version = u32_at(8);
        if version > KEYS_VERSION {
            return Err(Ok(version));
        }
        if version != KEYS_VERSION {
            return Err(Err(format!("unknown version {version}")));
        }
        if b[12..16].iter().chain(&b[46..HEADER]).any(|&x| x != 0) {
            return Err(Err("reserved header bytes are not zero".into()));
        }
        let generation = u64_at(16);
        let mut key_id = [0u8; 16];
        key_id.copy_from_slice(&b[24..40]);
        let next_slot = u32_at(40);
        let count = usize::from(u16_at(44));
        if count == 0 || count > MAX_SLOTS {
            return Err(Err(format!("{count} key slots (1 to {MAX_SLOTS} allowed)")));
        }
        let mut slots: Vec<Slot> = Vec::with_capacity(count);
        let mut at = HEADER;
        for i in 0..count {
            let s = &b[at..at + SLOT_FIXED];
            let id = u32_at(at);
            if s[4] != KDF_ARGON2ID || s[5] != AEAD_XCHACHA20POLY1305 {
                return Err(Err(format!(
                    "slot {i}: unknown algorithms (kdf {}, aead {})",
                    s[4], s[5]
                )));
            }
            let label_len = usize::from(u16_at(at + 6));
            if label_len > MAX_SLOT_LABEL {
                return Err(Err(format!("slot {i}: label of {label_len} bytes")));
            }
            let kdf = KdfParams {
                m_kib: u32_at(at + 16),
                t: u32_at(at + 20),
                p: u32_at(at + 24),
            };
            kdf.validate().map_err(|e| Err(format!("slot {i}: {e}")))?;
            if s[28..32].iter().any(|&x| x != 0) {
                return Err(Err(format!("slot {i}: reserved bytes are not zero")));
            }
            if id == 0 || id >= next_slot || slots.iter().any(|o| o.info.id == id) {
                return Err(Err(format!("slot {i}: bad or repeated id {id}")));
            }
            let mut salt = [0u8; SALT_LEN];
            salt.copy_from_slice(&s[32..64]);
            let mut nonce = [0u8; NONCE_LEN];
            nonce.copy_from_slice(&s[64..88]);
            let mut wrapped = [0u8; KEY_LEN + TAG_LEN];
            wrapped.copy_from_slice(&s[88..136]);
            let created_unix_ms = u64_at(at + 8);
            let label = std::str::from_utf8(&b[at + SLOT_FIXED..at + SLOT_FIXED + label_len])
                .map_err(|_| Err(format!("slot {i}: label is not UTF-8")))?
                .to_string();
            at += SLOT_FIXED + label_len;
            slots.push(Slot {
                info: SlotInfo {
                    id,
                    created_unix_ms,
                    kdf,
                    label,
                },
                salt,
                nonce,
                wrapped,
            });
        }
        if b[at..CHECKSUM_AT].iter().any(|&x| x != 0) {
            return Err(Err("bytes after the last slot are not zero".into()));
        }
        Ok(Contents {
            generation,
            key_id: KeyId(key_id),
            next_slot,
            slots,
        })
    }
}

/// Both copies as read: the newer valid one, which copy it is, and a note on the other.
fn read_copies(io: &dyn Storage) -> Result<(Contents, usize, Option<String>), StoreError> {
    let path = io.location().join(KEYS_FILE);
    let len = match io.len(KEYS_FILE) {
        Ok(len) => len,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StoreError::NotEncrypted {
                path: io.location().into(),
            })
        }
        Err(e) => return Err(io_err(io, KEYS_FILE, "read key file")(e)),
    };
    let have = usize::try_from(len.min(2 * COPY_SIZE as u64)).unwrap_or(2 * COPY_SIZE);
    let mut bytes = vec![0u8; have];
    io.read(KEYS_FILE, 0, &mut bytes)
        .map_err(io_err(io, KEYS_FILE, "read key file"))?;
    let mut found: [Option<Contents>; 2] = [None, None];
    let mut why: [String; 2] = [String::new(), String::new()];
    for (c, (f, w)) in found.iter_mut().zip(why.iter_mut()).enumerate() {
        let start = c * COPY_SIZE;
        let part = &bytes[start.min(have)..(start + COPY_SIZE).min(have)];
        match Contents::decode(part) {
            Ok(contents) => *f = Some(contents),
            Err(Ok(version)) => {
                return Err(StoreError::KeyFileVersion {
                    path,
                    found: version,
                    supported: KEYS_VERSION,
                })
            }
            Err(Err(e)) => *w = e,
        }
    }
    let [a, b] = found;
    let (contents, copy, note) = match (a, b) {
        (None, None) => {
            return Err(StoreError::Corrupt {
                path,
                what: "key file",
                offset: 0,
                detail: format!(
                    "both copies are damaged (copy 0: {}; copy 1: {}); the store cannot be \
                     opened without a good copy of its key file",
                    why[0], why[1]
                ),
            })
        }
        (Some(a), None) => (a, 0, Some(format!("copy 1 is damaged ({})", why[1]))),
        (None, Some(b)) => (b, 1, Some(format!("copy 0 is damaged ({})", why[0]))),
        (Some(a), Some(b)) => {
            if a == b {
                (a, 0, None)
            } else if b.generation > a.generation {
                let note = format!(
                    "copy 0 is older (generation {}, copy 1 {}): a change was interrupted",
                    a.generation, b.generation
                );
                (b, 1, Some(note))
            } else {
                let note = if a.generation == b.generation {
                    format!(
                        "the copies differ at the same generation {}: copy 0 is used",
                        a.generation
                    )
                } else {
                    format!(
                        "copy 1 is older (generation {}, copy 0 {}): a change was interrupted",
                        b.generation, a.generation
                    )
                };
                (a, 0, Some(note))
            }
        }
    };
    if len != 2 * COPY_SIZE as u64 && note.is_none() {
        let note = format!("the file is {len} bytes, not {}", 2 * COPY_SIZE);
        return Ok((contents, copy, Some(note)));
    }
    Ok((contents, copy, note))
}

impl KeyFile {
    /// Whether the store has a key file (is encrypted).
    pub fn exists(io: &dyn Storage) -> Result<bool, StoreError> {
        match io.len(KEYS_FILE) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(io, KEYS_FILE, "read key file")(e)),
        }
    }

    /// Creates the key file: a new random master key in one slot under `password`. Refuses a
    /// store that has a key file. The file appears whole or not at all: written as
    /// [`KEYS_TMP_FILE`], synced, renamed, and the directory synced (a leftover temporary file
    /// of an interrupted create is replaced).
    pub fn create(
        io: SharedStorage,
        password: &Password,
        kdf: KdfParams,
        label: &str,
    ) -> Result<(KeyFile, MasterKey), StoreError> {
        if Self::exists(&*io)? {
            return Err(StoreError::KeysExist {
                path: io.location().into(),
            });
        }
        let master = MasterKey::generate()?;
        let key_id = master.id();
        let slot = Slot::seal(1, &master, &key_id, password, kdf, label)?;
        let contents = Contents {
            generation: 1,
            key_id,
            next_slot: 2,
            slots: vec![slot],
        };
        let copy = contents.encode();
        let mut both = copy.clone();
        both.extend_from_slice(&copy);
        let d = &*io;
        match d.remove(KEYS_TMP_FILE) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(d, KEYS_TMP_FILE, "remove leftover key file")(e)),
        }
        d.create(KEYS_TMP_FILE)
            .map_err(io_err(d, KEYS_TMP_FILE, "create key file"))?;
        d.write(KEYS_TMP_FILE, 0, &both)
            .map_err(io_err(d, KEYS_TMP_FILE, "write key file"))?;
        d.sync(KEYS_TMP_FILE)
            .map_err(io_err(d, KEYS_TMP_FILE, "sync key file"))?;
        d.rename(KEYS_TMP_FILE, KEYS_FILE).map_err(io_err(
            d,
            KEYS_FILE,
            "rename key file into place",
        ))?;
        d.sync_dir()
            .map_err(io_err(d, "", "sync store directory"))?;
        Ok((
            KeyFile {
                io,
                contents,
                copy: 0,
                note: None,
            },
            master,
        ))
    }

    /// Reads the key file (the newer valid copy). [`StoreError::NotEncrypted`] if there is
    /// none; [`StoreError::Corrupt`] if neither copy is whole.
    pub fn open(io: SharedStorage) -> Result<KeyFile, StoreError> {
        let (contents, copy, note) = read_copies(&*io)?;
        Ok(KeyFile {
            io,
            contents,
            copy,
            note,
        })
    }

    /// The master key's fingerprint, as the file records it.
    pub fn key_id(&self) -> KeyId {
        self.contents.key_id
    }

    /// The generation of the copy in use (each change adds one).
    pub fn generation(&self) -> u64 {
        self.contents.generation
    }

    /// The slots (nothing secret).
    pub fn slots(&self) -> Vec<SlotInfo> {
        self.contents.slots.iter().map(|s| s.info.clone()).collect()
    }

    /// What is wrong with the other copy (damaged, older), if anything: for `verify`. A writer
    /// puts it right with [`KeyFile::repair`].
    pub fn note(&self) -> Option<&str> {
        self.note.as_deref()
    }

    /// Opens the master key with `password`, trying each slot in order (each costs its
    /// Argon2id). [`StoreError::WrongPassword`] if none opens.
    pub fn unlock(&self, password: &Password) -> Result<Unlocked, StoreError> {
        for slot in &self.contents.slots {
            if let Some(key) = slot.open(&self.contents.key_id, password)? {
                if key.id() != self.contents.key_id {
                    // The AEAD authenticates the key id too, so only a forger who knows a
                    // slot's password and the master key gets here; say so rather than use it.
                    return Err(StoreError::Corrupt {
                        path: self.path(),
                        what: "key file",
                        offset: 0,
                        detail: format!(
                            "slot {} opens a master key that is not the file's (key id {})",
                            slot.info.id, self.contents.key_id
                        ),
                    });
                }
                return Ok(Unlocked {
                    key,
                    slot: slot.info.id,
                });
            }
        }
        Err(StoreError::WrongPassword { path: self.path() })
    }

    /// Adds a slot holding `master` under `password`; returns its id. `master` must be this
    /// file's master key ([`StoreError::KeyMismatch`] otherwise).
    pub fn add_slot(
        &mut self,
        master: &MasterKey,
        password: &Password,
        kdf: KdfParams,
        label: &str,
    ) -> Result<u32, StoreError> {
        self.reload()?;
        self.check_key(master)?;
        if self.contents.slots.len() >= MAX_SLOTS {
            return Err(StoreError::KeySlotsFull {
                path: self.path(),
                max: MAX_SLOTS,
            });
        }
        let mut next = self.contents.clone();
        let id = next.next_slot;
        next.slots
            .push(Slot::seal(id, master, &next.key_id, password, kdf, label)?);
        next.next_slot = id.checked_add(1).ok_or_else(|| {
            StoreError::InvalidKeyInput("no key slot ids left in this key file".into())
        })?;
        self.write(next)?;
        Ok(id)
    }

    /// Removes slot `id`. Refuses the last slot ([`StoreError::LastKeySlot`]): the store would
    /// be lost. `master` must be this file's master key.
    pub fn remove_slot(&mut self, master: &MasterKey, id: u32) -> Result<(), StoreError> {
        self.reload()?;
        self.check_key(master)?;
        let Some(i) = self.contents.slots.iter().position(|s| s.info.id == id) else {
            return Err(StoreError::UnknownKeySlot {
                path: self.path(),
                slot: id,
            });
        };
        if self.contents.slots.len() == 1 {
            return Err(StoreError::LastKeySlot {
                path: self.path(),
                slot: id,
            });
        }
        let mut next = self.contents.clone();
        next.slots.remove(i);
        self.write(next)
    }

    /// Replaces the slot that `old` opens by a new slot under `new` (keeping its label), in one
    /// change: a crash leaves the old password or the new one working, never neither. Returns
    /// the new slot's id. [`StoreError::WrongPassword`] if `old` opens no slot.
    pub fn change_password(
        &mut self,
        old: &Password,
        new: &Password,
        kdf: KdfParams,
    ) -> Result<u32, StoreError> {
        self.reload()?;
        let unlocked = self.unlock(old)?;
        self.replace_slot(&unlocked.key, unlocked.slot, new, kdf)
    }

    /// Replaces slot `slot` by one for `new` (same label, a new id), in one crash-safe change:
    /// the file holds the old slot or the new one, and a full file (8 slots) is no obstacle.
    /// Needs the unlocked master key of this file.
    pub fn replace_slot(
        &mut self,
        key: &MasterKey,
        slot: u32,
        new: &Password,
        kdf: KdfParams,
    ) -> Result<u32, StoreError> {
        self.reload()?;
        self.check_key(key)?;
        let mut next = self.contents.clone();
        let Some(i) = next.slots.iter().position(|s| s.info.id == slot) else {
            return Err(StoreError::UnknownKeySlot {
                path: self.path(),
                slot,
            });
        };
        let id = next.next_slot;
        let label = next.slots[i].info.label.clone();
        let slot = Slot::seal(id, key, &next.key_id, new, kdf, &label)?;
        next.slots[i] = slot;
        next.next_slot = id.checked_add(1).ok_or_else(|| {
            StoreError::InvalidKeyInput("no key slot ids left in this key file".into())
        })?;
        self.write(next)?;
        Ok(id)
    }

    /// Rewrites both copies with the contents in use if the other copy is damaged or older;
    /// returns whether it wrote. For a writer's open (as the superblock's other slot is
    /// rewritten).
    pub fn repair(&mut self) -> Result<bool, StoreError> {
        self.reload()?;
        if self.note.is_none() {
            return Ok(false);
        }
        let next = self.contents.clone();
        self.write(next)?;
        Ok(true)
    }

    fn path(&self) -> PathBuf {
        self.io.location().join(KEYS_FILE)
    }

    fn check_key(&self, master: &MasterKey) -> Result<(), StoreError> {
        let found = master.id();
        if found != self.contents.key_id {
            return Err(StoreError::KeyMismatch {
                path: self.path(),
                found: found.to_string(),
                expected: self.contents.key_id.to_string(),
            });
        }
        Ok(())
    }

    /// Reads the file again: a change starts from what is on disk (after a failed write, that
    /// may be the old or the new state), never from a stale copy in memory.
    fn reload(&mut self) -> Result<(), StoreError> {
        let (contents, copy, note) = read_copies(&*self.io)?;
        self.contents = contents;
        self.copy = copy;
        self.note = note;
        Ok(())
    }

    /// Writes `next` at the next generation: first over the copy *not* in use (the one in use
    /// stays whole until the new state is durable), sync, then over the other, sync. A crash
    /// leaves the old state in one whole copy or the new one. If the first write or sync fails,
    /// the change is not made (an error); if only the second fails, it is made, with one copy,
    /// and [`KeyFile::note`] says so until the next change or [`KeyFile::repair`].
    fn write(&mut self, mut next: Contents) -> Result<(), StoreError> {
        if next.slots.is_empty() || next.slots.len() > MAX_SLOTS {
            return Err(StoreError::InvalidKeyInput(format!(
                "a key file holds 1 to {MAX_SLOTS} slots"
            )));
        }
        next.generation = self.contents.generation + 1;
        let bytes = next.encode();
        let io = &*self.io;
        let first = 1 - self.copy;
        io.write(KEYS_FILE, (first * COPY_SIZE) as u64, &bytes)
            .map_err(io_err(io, KEYS_FILE, "write key file"))?;
        io.sync(KEYS_FILE)
            .map_err(io_err(io, KEYS_FILE, "sync key file"))?;
        self.contents = next;
        self.copy = first;
        let whole = 2 * COPY_SIZE as u64;
        let second = io
            .write(KEYS_FILE, ((1 - first) * COPY_SIZE) as u64, &bytes)
            .and_then(|()| io.sync(KEYS_FILE))
            // Bytes past the two copies (a file grown by damage) are dropped.
            .and_then(|()| match io.len(KEYS_FILE)? {
                len if len == whole => Ok(()),
                _ => io
                    .set_len(KEYS_FILE, whole)
                    .and_then(|()| io.sync(KEYS_FILE)),
            });
        self.note = match second {
            Ok(()) => {
                self.copy = 0;
                None
            }
            Err(e) => Some(format!(
                "copy {} could not be written ({e}): the key file has one good copy until the \
                 next change",
                1 - first
            )),
        };
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Where passwords come from

/// Which password a command asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasswordRole {
    /// The password that opens the store.
    Current,
    /// A new password (`key add`, `key passwd`, `init --encrypt`).
    New,
}

impl PasswordRole {
    /// The environment variable holding the password itself.
    pub fn env(self) -> &'static str {
        match self {
            PasswordRole::Current => "PAGESNAP_PASSWORD",
            PasswordRole::New => "PAGESNAP_NEW_PASSWORD",
        }
    }

    /// The environment variable naming a file that holds it.
    pub fn file_env(self) -> &'static str {
        match self {
            PasswordRole::Current => "PAGESNAP_PASSWORD_FILE",
            PasswordRole::New => "PAGESNAP_NEW_PASSWORD_FILE",
        }
    }

    /// The command-line option naming such a file.
    pub fn file_flag(self) -> &'static str {
        match self {
            PasswordRole::Current => "--password-file",
            PasswordRole::New => "--new-password-file",
        }
    }

    /// "password" or "new password", for messages and prompts.
    pub fn what(self) -> &'static str {
        match self {
            PasswordRole::Current => "password",
            PasswordRole::New => "new password",
        }
    }
}

/// The password given without a terminal: `file` (the command's option), else the file the
/// role's `…_FILE` variable names, else the role's variable itself (restic's order: a file
/// before the variable). `Ok(None)`: none given (the CLI then prompts on a terminal, or fails
/// with [`StoreError::NoPassword`]).
pub fn password_from_env_or_file(
    role: PasswordRole,
    file: Option<&Path>,
) -> Result<Option<Password>, StoreError> {
    password_from(role, file, |name| std::env::var_os(name))
}

/// [`password_from_env_or_file`] with the environment given as a function (for tests).
pub fn password_from(
    role: PasswordRole,
    file: Option<&Path>,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<Option<Password>, StoreError> {
    if let Some(path) = file {
        return read_password_file(role, path).map(Some);
    }
    if let Some(path) = env(role.file_env()).filter(|p| !p.is_empty()) {
        return read_password_file(role, Path::new(&path)).map(Some);
    }
    match env(role.env()) {
        Some(value) => {
            let password = Password::new(std::os::unix::ffi::OsStringExt::into_vec(value));
            if password.is_empty() {
                return Err(StoreError::InvalidKeyInput(format!(
                    "{} is set but empty",
                    role.env()
                )));
            }
            Ok(Some(password))
        }
        None => Ok(None),
    }
}

/// Reads a password file: its bytes, less one trailing line end (`\n` or `\r\n`). An empty
/// password or a file over 64 KiB is refused.
pub fn read_password_file(role: PasswordRole, path: &Path) -> Result<Password, StoreError> {
    use std::io::Read;
    let fail = |source: io::Error| StoreError::PasswordFile {
        path: path.into(),
        what: role.what(),
        source,
    };
    let file = std::fs::File::open(path).map_err(fail)?;
    // Room for all of it up front: no reallocation leaves a copy behind unzeroed.
    let mut bytes = Zeroizing::new(Vec::with_capacity(MAX_PASSWORD_FILE as usize + 1));
    file.take(MAX_PASSWORD_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(fail)?;
    if bytes.len() as u64 > MAX_PASSWORD_FILE {
        return Err(fail(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("longer than {MAX_PASSWORD_FILE} bytes: not a password file"),
        )));
    }
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    if bytes.is_empty() {
        return Err(fail(io::Error::new(
            io::ErrorKind::InvalidData,
            "empty: no password in it",
        )));
    }
    Ok(Password::new(std::mem::take(&mut *bytes)))
}

#[cfg(test)]
mod tests;
