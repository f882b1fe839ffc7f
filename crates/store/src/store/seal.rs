//! Encryption at rest (issue 17): sealing records with an AEAD, and keyed page ids.
//!
//! In an encrypted store (the superblock's encryption field names the scheme and the key file's
//! key id) every page goes into a frame record, and frames, page map chunks and commit records are
//! *sealed*: header byte 6 is 1, and the payload is `nonce | ciphertext | tag 16`. The scheme
//! names the AEAD: 1, XChaCha20-Poly1305 (24-byte nonce); 2, AES-256-GCM-SIV (12-byte nonce),
//! the default for new stores (about twice the rate on a CPU with AES-NI). The nonce is random
//! (see `docs/security.md` for why not a counter, and why 96 random bits suffice for a
//! nonce-misuse-resistant AEAD); the associated data binds the ciphertext to the record's clear
//! header fields and to the store:
//!
//! ```text
//! "pagesnap record v1" | kind u8 | codec u8 | key u64 | plain length u32 | key id 16
//! ```
//!
//! Each scheme seals with a key of its own, derived from the master key under its own context.
//! The blake3 in a chunk's or commit record's header (and in the link that names it) is over the
//! *sealed* payload, so a record swapped for another sealed record fails the link, and one whose
//! header was edited fails the tag. A page's id is `blake3::keyed_hash(dedup key, page)`.

use crate::keys::{DedupKey, KeyId, MasterKey};
use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use std::sync::Arc;

/// Bytes a sealed payload adds at most (scheme 1): the nonce in front, the tag behind.
pub(crate) const SEAL_OVERHEAD: usize = NONCE_MAX + TAG;
const NONCE_MAX: usize = 24;
const TAG: usize = 16;
/// Header byte 6 of a sealed record.
pub(crate) const SEALED: u8 = 1;
const AD_PREFIX: &[u8] = b"pagesnap record v1";

/// The AEAD an encrypted store seals its records with (the superblock's scheme byte; ids are
/// keyed blake3 in both).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Cipher {
    /// Scheme 1: XChaCha20-Poly1305, 24-byte random nonces (stores made before scheme 2).
    XChaCha20Poly1305,
    /// Scheme 2: AES-256-GCM-SIV (RFC 8452), 12-byte random nonces; the default.
    #[default]
    Aes256GcmSiv,
}

impl Cipher {
    /// The superblock's scheme byte.
    pub fn scheme(self) -> u8 {
        match self {
            Cipher::XChaCha20Poly1305 => 1,
            Cipher::Aes256GcmSiv => 2,
        }
    }

    /// The cipher of a scheme byte.
    pub(crate) fn from_scheme(b: u8) -> Option<Cipher> {
        match b {
            1 => Some(Cipher::XChaCha20Poly1305),
            2 => Some(Cipher::Aes256GcmSiv),
            _ => None,
        }
    }

    /// Nonce bytes in front of each sealed payload.
    fn nonce_len(self) -> usize {
        match self {
            Cipher::XChaCha20Poly1305 => 24,
            Cipher::Aes256GcmSiv => 12,
        }
    }
}

impl std::fmt::Display for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cipher::XChaCha20Poly1305 => "XChaCha20-Poly1305",
            Cipher::Aes256GcmSiv => "AES-256-GCM-SIV",
        })
    }
}

/// A store's encryption, as its superblock records it: the cipher and the master key's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Encryption {
    pub(crate) cipher: Cipher,
    pub(crate) key_id: KeyId,
}

/// The record sealing AEAD, keyed (AES-256-GCM-SIV's round keys are large: boxed).
enum Aead {
    XChaCha(XChaCha20Poly1305),
    GcmSiv(Box<aes_gcm_siv::Aes256GcmSiv>),
}

/// The keys of an unlocked encrypted store (derived from its master key; zeroed on drop).
pub(crate) struct Crypt {
    pub(crate) key_id: KeyId,
    cipher: Cipher,
    aead: Aead,
    pub(crate) dedup: Arc<DedupKey>,
}

impl Crypt {
    /// Bytes sealing adds to a payload (nonce and tag) with this store's cipher.
    pub(crate) fn overhead(&self) -> usize {
        self.cipher.nonce_len() + TAG
    }
}

impl std::fmt::Debug for Crypt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Crypt")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// The clear header fields a sealed payload is bound to.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Header {
    pub(crate) kind: u8,
    pub(crate) codec: u8,
    pub(crate) key: u64,
    pub(crate) plain_len: u32,
}

impl Header {
    /// The fields of a record header (at least 24 bytes).
    pub(crate) fn of(head: &[u8]) -> Header {
        let mut key = [0u8; 8];
        key.copy_from_slice(&head[16..24]);
        let mut plain = [0u8; 4];
        plain.copy_from_slice(&head[12..16]);
        Header {
            kind: head[4],
            codec: head[5],
            key: u64::from_le_bytes(key),
            plain_len: u32::from_le_bytes(plain),
        }
    }
}

/// What sealing in place adds around the ciphertext: the nonce before it, the tag after it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SealParts {
    nonce: [u8; NONCE_MAX],
    nonce_len: u8,
    pub(crate) tag: [u8; TAG],
}

impl SealParts {
    /// The nonce as stored in front of the ciphertext.
    pub(crate) fn nonce(&self) -> &[u8] {
        &self.nonce[..usize::from(self.nonce_len)]
    }
}

impl Crypt {
    pub(crate) fn new(master: &MasterKey, cipher: Cipher) -> Crypt {
        Crypt {
            key_id: master.id(),
            cipher,
            aead: match cipher {
                Cipher::XChaCha20Poly1305 => Aead::XChaCha(master.record_key().cipher()),
                Cipher::Aes256GcmSiv => {
                    Aead::GcmSiv(Box::new(master.record_key_gcm_siv().gcm_siv()))
                }
            },
            dedup: Arc::new(master.dedup_key()),
        }
    }

    fn ad(&self, h: &Header) -> Vec<u8> {
        let mut ad = Vec::with_capacity(AD_PREFIX.len() + 2 + 8 + 4 + 16);
        ad.extend_from_slice(AD_PREFIX);
        ad.push(h.kind);
        ad.push(h.codec);
        ad.extend_from_slice(&h.key.to_le_bytes());
        ad.extend_from_slice(&h.plain_len.to_le_bytes());
        ad.extend_from_slice(&self.key_id.0);
        ad
    }

    /// `plain` sealed for a record with header `h`: nonce, ciphertext, tag.
    pub(crate) fn seal(&self, h: &Header, plain: &[u8]) -> Result<Vec<u8>, crate::StoreError> {
        let n = self.cipher.nonce_len();
        let mut out = Vec::with_capacity(plain.len() + n + TAG);
        out.resize(n, 0);
        out.extend_from_slice(plain);
        let parts = self.seal_in_place(h, &mut out[n..])?;
        out[..n].copy_from_slice(parts.nonce());
        out.extend_from_slice(&parts.tag);
        Ok(out)
    }

    /// Seals `buf` in place (it becomes the ciphertext) for a record with header `h`; the nonce
    /// and tag that go before and after it.
    pub(crate) fn seal_in_place(
        &self,
        h: &Header,
        buf: &mut [u8],
    ) -> Result<SealParts, crate::StoreError> {
        let n = self.cipher.nonce_len();
        let mut nonce = [0u8; NONCE_MAX];
        getrandom::fill(&mut nonce[..n]).map_err(|e| crate::StoreError::Random(e.to_string()))?;
        let ad = self.ad(h);
        let failed = |_| crate::StoreError::Usage("sealing a record failed");
        let tag: [u8; TAG] = match &self.aead {
            Aead::XChaCha(c) => c
                .encrypt_inout_detached(&XNonce::from(nonce), &ad, buf.into())
                .map_err(failed)?
                .into(),
            Aead::GcmSiv(c) => {
                let mut n12 = [0u8; 12];
                n12.copy_from_slice(&nonce[..12]);
                c.encrypt_inout_detached(&aes_gcm_siv::Nonce::from(n12), &ad, buf.into())
                    .map_err(failed)?
                    .into()
            }
        };
        Ok(SealParts {
            nonce,
            nonce_len: n as u8,
            tag,
        })
    }

    /// Opens a sealed payload of a record with header `h`; an error (never the bytes) if the tag
    /// fails: other bytes, another header, another store, or no key that fits.
    pub(crate) fn open(&self, h: &Header, sealed: &[u8]) -> Result<Vec<u8>, String> {
        let n = self.cipher.nonce_len();
        if sealed.len() < n + TAG {
            return Err("a sealed payload shorter than its nonce and tag".into());
        }
        let body = sealed.len() - TAG;
        let mut tag = [0u8; TAG];
        tag.copy_from_slice(&sealed[body..]);
        let mut out = sealed[n..body].to_vec();
        let ad = self.ad(h);
        let opened = match &self.aead {
            Aead::XChaCha(c) => {
                let mut nonce = [0u8; 24];
                nonce.copy_from_slice(&sealed[..24]);
                c.decrypt_inout_detached(
                    &XNonce::from(nonce),
                    &ad,
                    (&mut out[..]).into(),
                    &tag.into(),
                )
            }
            Aead::GcmSiv(c) => {
                let mut nonce = [0u8; 12];
                nonce.copy_from_slice(&sealed[..12]);
                c.decrypt_inout_detached(
                    &aes_gcm_siv::Nonce::from(nonce),
                    &ad,
                    (&mut out[..]).into(),
                    &tag.into(),
                )
            }
        };
        opened.map_err(|_| {
            "the record fails its authentication tag (tampered, moved, or damaged)".to_string()
        })?;
        Ok(out)
    }
}

/// Opens the payload of a chunk or commit record (`rec` is the whole record, already checked by
/// `decode_record`): sealed in an encrypted store, clear otherwise; either the other way round is
/// an error.
pub(crate) fn open_meta(
    crypt: Option<&Crypt>,
    head: &[u8],
    payload: &[u8],
) -> Result<Vec<u8>, String> {
    match (crypt, head[6]) {
        (None, 0) => Ok(payload.to_vec()),
        (Some(c), SEALED) => c.open(&Header::of(head), payload),
        (Some(_), _) => Err("a record in clear in an encrypted store".into()),
        (None, _) => Err("a sealed record in a store that is not encrypted".into()),
    }
}

/// What a compression thread needs to seal frames: the keys and the store's page size.
pub(crate) type Sealer = (Arc<Crypt>, u32);

/// Seals a frame's payload in place in a compression thread: `payload` is the compressed frame
/// (`codec`), or with codec 0 the plain pages themselves, `plain_len` bytes of pages in all;
/// bound to the header the writer will give the record (kind 8, the codec, the page count, the
/// plain length). `None` if sealing failed (the writer then refuses the frame).
pub(crate) fn seal_frame(
    (c, page): &Sealer,
    codec: crate::codec::Codec,
    plain_len: usize,
    payload: &mut [u8],
) -> Option<SealParts> {
    let h = Header {
        kind: crate::format::Kind::Frame as u8,
        codec: codec as u8,
        key: (plain_len / (*page).max(1) as usize) as u64,
        plain_len: u32::try_from(plain_len).ok()?,
    };
    c.seal_in_place(&h, payload).ok()
}

/// The plain pages of a frame record (`bytes`, decoded as `f`) in an encrypted store: opened,
/// then decompressed (or, codec 0, taken as they are) to exactly the plain length.
pub(crate) fn open_frame(
    crypt: Option<&Crypt>,
    bytes: &[u8],
    f: &super::frames::FrameRecord<'_>,
) -> Result<Vec<u8>, String> {
    let Some(c) = crypt else {
        return Err("a sealed frame in a store that is not encrypted".into());
    };
    if !f.sealed {
        return Err("a frame in clear in an encrypted store".into());
    }
    let inner = c.open(&Header::of(bytes), f.packed)?;
    if f.codec == crate::codec::Codec::None {
        if inner.len() != f.plain_len {
            return Err(format!(
                "a stored frame of {} bytes, its header says {}",
                inner.len(),
                f.plain_len
            ));
        }
        return Ok(inner);
    }
    super::frames::frame_plain(&super::frames::FrameRecord {
        codec: f.codec,
        plain_len: f.plain_len,
        packed: &inner,
        sealed: false,
    })
}

impl super::Store {
    /// `plain`, the payload of a chunk or commit record with key `key`, sealed in an encrypted
    /// store (as is otherwise).
    pub(super) fn seal_meta(
        &self,
        kind: crate::format::Kind,
        key: u64,
        plain: Vec<u8>,
    ) -> Result<Vec<u8>, crate::StoreError> {
        match &self.crypt {
            None => Ok(plain),
            Some(c) => c.seal(
                &Header {
                    kind: kind as u8,
                    codec: 0,
                    key,
                    plain_len: 0,
                },
                &plain,
            ),
        }
    }

    /// How this store names page contents: blake3, or blake3 keyed with the dedup key in an
    /// encrypted store. Callers that hash pages before [`super::Store::put_hashed`] (the engine)
    /// hash with it, so that their ids compare with the stored ones.
    pub fn page_ids(&self) -> crate::pagehash::PageIds {
        match &self.crypt {
            Some(c) => crate::pagehash::PageIds::keyed(c.dedup.clone()),
            None => crate::pagehash::PageIds::default(),
        }
    }

    /// The id of one page ([`super::Store::page_ids`]).
    pub(super) fn page_id(&self, data: &[u8]) -> [u8; 32] {
        match &self.crypt {
            Some(c) => c.dedup.id(data),
            None => *blake3::hash(data).as_bytes(),
        }
    }

    /// Whether the store is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.sb.encryption.is_some()
    }

    /// The encrypted store's key id (the master key's fingerprint; nothing secret).
    pub fn key_id(&self) -> Option<crate::keys::KeyId> {
        self.sb.encryption.map(|e| e.key_id)
    }

    /// The AEAD the encrypted store seals its records with (its superblock's scheme).
    pub fn cipher(&self) -> Option<Cipher> {
        self.sb.encryption.map(|e| e.cipher)
    }

    pub(super) fn sealer(&self) -> Option<Sealer> {
        self.crypt.clone().map(|c| (c, self.sb.page_size))
    }
}

/// Key slots of an encrypted store (`pagesnap key …`). Changes are the writer's (it holds the
/// store's lock); each is one crash-safe change of the key file (`keys.rs`).
impl super::Store {
    fn key_file(&self) -> Result<crate::keys::KeyFile, crate::StoreError> {
        if !self.is_encrypted() {
            return Err(crate::StoreError::NotEncrypted {
                path: self.io.location().into(),
            });
        }
        crate::keys::KeyFile::open(self.io.clone())
    }

    fn key_writer(&self) -> Result<&crate::keys::Unlocked, crate::StoreError> {
        if self.writer.is_none() {
            return Err(crate::StoreError::ReadOnly);
        }
        self.unlocked
            .as_ref()
            .ok_or(crate::StoreError::NotEncrypted {
                path: self.io.location().into(),
            })
    }

    /// The key slots (ids, labels, times, Argon2id parameters: nothing secret).
    pub fn key_slots(&self) -> Result<Vec<crate::keys::SlotInfo>, crate::StoreError> {
        Ok(self.key_file()?.slots())
    }

    /// The slot whose password opened this store.
    pub fn unlocked_slot(&self) -> Option<u32> {
        self.unlocked.as_ref().map(|u| u.slot)
    }

    /// Adds a key slot under `password`; its id.
    pub fn add_key(
        &mut self,
        password: &crate::keys::Password,
        kdf: crate::keys::KdfParams,
        label: &str,
    ) -> Result<u32, crate::StoreError> {
        let mut kf = self.key_file()?;
        let u = self.key_writer()?;
        kf.add_slot(&u.key, password, kdf, label)
    }

    /// Removes key slot `slot`. Refuses the slot this store was opened with (restic's rule: a
    /// typo in the id must not lock out the one who typed it) and the last one.
    pub fn remove_key(&mut self, slot: u32) -> Result<(), crate::StoreError> {
        let mut kf = self.key_file()?;
        let u = self.key_writer()?;
        if u.slot == slot {
            return Err(crate::StoreError::InvalidKeyInput(format!(
                "key slot {slot} is the one this password opened; remove it with another password"
            )));
        }
        kf.remove_slot(&u.key, slot)
    }

    /// Replaces the slot this store was opened with by one under `new` (same label): added
    /// first, then the old one removed, so a crash between leaves both passwords working, never
    /// neither. The new slot's id.
    pub fn change_password(
        &mut self,
        new: &crate::keys::Password,
        kdf: crate::keys::KdfParams,
    ) -> Result<u32, crate::StoreError> {
        let mut kf = self.key_file()?;
        let u = self.key_writer()?;
        let old = u.slot;
        // One change that swaps the slot (works with all 8 slots in use; crash-safe).
        let id = kf.replace_slot(&u.key, old, new, kdf)?;
        if let Some(u) = self.unlocked.as_mut() {
            u.slot = id;
        }
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_bytes_open_only_with_their_header_and_key() {
        for cipher in [Cipher::XChaCha20Poly1305, Cipher::Aes256GcmSiv] {
            sealed_bytes_open_only_with_their_header_and_key_in(cipher);
        }
    }

    fn sealed_bytes_open_only_with_their_header_and_key_in(cipher: Cipher) {
        let k = MasterKey::generate().expect("key");
        let c = Crypt::new(&k, cipher);
        let h = Header {
            kind: 6,
            codec: 0,
            key: 3,
            plain_len: 0,
        };
        let s = c.seal(&h, b"a page map").expect("seal");
        assert_eq!(s.len(), 10 + cipher.nonce_len() + TAG);
        assert_eq!(c.open(&h, &s).expect("open"), b"a page map");
        assert_ne!(c.seal(&h, b"a page map").expect("seal"), s, "random nonces");
        for bit in 0..s.len() * 8 {
            let mut bad = s.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(c.open(&h, &bad).is_err(), "bit {bit}");
        }
        for other in [
            Header { kind: 5, ..h },
            Header { codec: 1, ..h },
            Header { key: 4, ..h },
            Header { plain_len: 1, ..h },
        ] {
            assert!(c.open(&other, &s).is_err(), "{other:?}");
        }
        let other = Crypt::new(&MasterKey::generate().expect("key"), cipher);
        assert!(other.open(&h, &s).is_err());
        // The same master key under the other scheme: another key, another AEAD.
        let twin = match cipher {
            Cipher::XChaCha20Poly1305 => Cipher::Aes256GcmSiv,
            Cipher::Aes256GcmSiv => Cipher::XChaCha20Poly1305,
        };
        assert!(Crypt::new(&k, twin).open(&h, &s).is_err());
        assert!(c.open(&h, &s[..cipher.nonce_len() + TAG - 1]).is_err());
        // Sealed in place: the same bytes around the same ciphertext open.
        let mut buf = b"a frame of pages".to_vec();
        let parts = c.seal_in_place(&h, &mut buf).expect("seal");
        assert_ne!(&buf[..], b"a frame of pages");
        let mut whole = parts.nonce().to_vec();
        whole.extend_from_slice(&buf);
        whole.extend_from_slice(&parts.tag);
        assert_eq!(c.open(&h, &whole).expect("open"), b"a frame of pages");
    }
}
