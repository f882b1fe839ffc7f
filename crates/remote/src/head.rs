//! The head object: everything a store on object storage holds, in one object that a commit
//! replaces by one conditional put.
//!
//! ```text
//! magic "PGSNAPHD" 8 | format u32 | zero u32 | version u64 | body length u32 | zstd(body)
//! crc32 u32 over everything before it
//!
//! body:
//! pieces u32, then each: version u64 | token u64 | n u32 | length u64        (28 bytes)
//! files u32, then each: name length u16 | name | length u64 | kind u8
//!     kind 0 (inline): byte count u32 | bytes
//!     kind 1 (pieces): extents u32, then each: offset u64 | length u64 | piece u32 | piece offset u64
//! ```
//!
//! The body is compressed (zstd): the superblock it carries is mostly zeros, and piece names and
//! offsets repeat, so a head is a few KiB rather than 8 KiB plus 56 bytes a piece, and every
//! commit puts it.
//!
//! Every count and length is checked against what is left before anything is allocated.

use std::collections::BTreeMap;
use std::fmt;

/// What a head starts with.
pub(crate) const MAGIC: &[u8; 8] = b"PGSNAPHD";
/// The head's format.
pub(crate) const FORMAT: u32 = 1;
/// Largest head accepted (a store of a million commits is about 40 MiB of head).
pub(crate) const MAX_HEAD: usize = 1 << 30;

/// An immutable data object, named by the head version that first published it, a random token
/// of the writer that uploaded it, and a counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct PieceName {
    pub version: u64,
    pub token: u64,
    pub n: u32,
}

impl PieceName {
    /// The object's key below the store's prefix.
    pub fn key(&self) -> String {
        format!("p/{:016x}-{:016x}-{:08x}", self.version, self.token, self.n)
    }

    /// The name of a key below `p/`, if it is one.
    pub fn parse(key: &str) -> Option<PieceName> {
        let rest = key.strip_prefix("p/")?;
        let mut parts = rest.split('-');
        let (v, t, n) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || v.len() != 16 || t.len() != 16 || n.len() != 8 {
            return None;
        }
        Some(PieceName {
            version: u64::from_str_radix(v, 16).ok()?,
            token: u64::from_str_radix(t, 16).ok()?,
            n: u32::from_str_radix(n, 16).ok()?,
        })
    }
}

impl fmt::Display for PieceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

/// A run of a file's bytes held by a piece.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ExtentRec {
    pub len: u64,
    pub piece: u32,
    pub piece_off: u64,
}

/// A file as the head records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum FileRec {
    Inline(Vec<u8>),
    Pieces {
        len: u64,
        extents: BTreeMap<u64, ExtentRec>,
    },
}

/// A decoded head.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Head {
    pub version: u64,
    pub pieces: Vec<(PieceName, u64)>,
    pub files: BTreeMap<String, FileRec>,
}

/// Why a head could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct BadHead(pub &'static str);

impl Head {
    pub fn encode(&self) -> Vec<u8> {
        let body = self.encode_body();
        let packed = zstd::bulk::compress(&body, 3).unwrap_or_default();
        let mut out = Vec::with_capacity(36 + packed.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&packed);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    fn encode_body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.pieces.len() * 28 + self.files.len() * 64);
        out.extend_from_slice(&(self.pieces.len() as u32).to_le_bytes());
        for (p, len) in &self.pieces {
            out.extend_from_slice(&p.version.to_le_bytes());
            out.extend_from_slice(&p.token.to_le_bytes());
            out.extend_from_slice(&p.n.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
        out.extend_from_slice(&(self.files.len() as u32).to_le_bytes());
        for (name, f) in &self.files {
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            match f {
                FileRec::Inline(bytes) => {
                    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
                    out.push(0);
                    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                    out.extend_from_slice(bytes);
                }
                FileRec::Pieces { len, extents } => {
                    out.extend_from_slice(&len.to_le_bytes());
                    out.push(1);
                    out.extend_from_slice(&(extents.len() as u32).to_le_bytes());
                    for (off, e) in extents {
                        out.extend_from_slice(&off.to_le_bytes());
                        out.extend_from_slice(&e.len.to_le_bytes());
                        out.extend_from_slice(&e.piece.to_le_bytes());
                        out.extend_from_slice(&e.piece_off.to_le_bytes());
                    }
                }
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Head, BadHead> {
        if bytes.len() > MAX_HEAD {
            return Err(BadHead("larger than any head"));
        }
        if bytes.len() < 32 || &bytes[..8] != MAGIC {
            return Err(BadHead("not a pagesnap head (bad magic or too short)"));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if crc32fast::hash(body) != crc {
            return Err(BadHead("checksum mismatch"));
        }
        let mut h = Reader { b: body, at: 8 };
        let format = h.u32()?;
        if format != FORMAT {
            return Err(BadHead(
                "written by a newer pagesnap (unknown head format): upgrade pagesnap",
            ));
        }
        h.u32()?;
        let version = h.u64()?;
        let plain = h.u32()? as usize;
        if plain > MAX_HEAD {
            return Err(BadHead("larger than any head"));
        }
        let packed = &body[h.at..];
        let plain_body = zstd::bulk::decompress(packed, plain)
            .map_err(|_| BadHead("its body does not decompress"))?;
        if plain_body.len() != plain {
            return Err(BadHead("its body has the wrong length"));
        }
        let body = &plain_body[..];
        let mut r = Reader { b: body, at: 0 };
        let np = r.count(28)?;
        let mut pieces = Vec::with_capacity(np);
        for _ in 0..np {
            let name = PieceName {
                version: r.u64()?,
                token: r.u64()?,
                n: r.u32()?,
            };
            pieces.push((name, r.u64()?));
        }
        let nf = r.count(11)?;
        let mut files = BTreeMap::new();
        for _ in 0..nf {
            let nl = usize::from(r.u16()?);
            let name = std::str::from_utf8(r.take(nl)?)
                .map_err(|_| BadHead("a file name is not UTF-8"))?
                .to_string();
            let len = r.u64()?;
            let rec = match r.u8()? {
                0 => {
                    let n = r.u32()? as usize;
                    let data = r.take(n)?.to_vec();
                    if data.len() as u64 != len {
                        return Err(BadHead("an inline file's length disagrees with its bytes"));
                    }
                    FileRec::Inline(data)
                }
                1 => {
                    let ne = r.count(28)?;
                    let mut extents = BTreeMap::new();
                    let mut end = 0u64;
                    for _ in 0..ne {
                        let off = r.u64()?;
                        let e = ExtentRec {
                            len: r.u64()?,
                            piece: r.u32()?,
                            piece_off: r.u64()?,
                        };
                        let (_, plen) = pieces
                            .get(e.piece as usize)
                            .ok_or(BadHead("an extent names no piece"))?;
                        let stop = off.checked_add(e.len);
                        let pstop = e.piece_off.checked_add(e.len);
                        if e.len == 0
                            || off < end
                            || stop.is_none_or(|s| s > len)
                            || pstop.is_none_or(|s| s > *plen)
                        {
                            return Err(BadHead("an extent overlaps, is empty or out of range"));
                        }
                        end = off + e.len;
                        extents.insert(off, e);
                    }
                    FileRec::Pieces { len, extents }
                }
                _ => return Err(BadHead("unknown file kind")),
            };
            if files.insert(name, rec).is_some() {
                return Err(BadHead("a file name appears twice"));
            }
        }
        if r.at != body.len() {
            return Err(BadHead("bytes after the last file"));
        }
        Ok(Head {
            version,
            pieces,
            files,
        })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BadHead> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or(BadHead("truncated"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, BadHead> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, BadHead> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, BadHead> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, BadHead> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    /// A count of items of at least `min` bytes each, checked against what is left.
    fn count(&mut self, min: usize) -> Result<usize, BadHead> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min) > self.b.len() - self.at {
            return Err(BadHead("a count larger than the head"));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Head {
        let mut files = BTreeMap::new();
        files.insert("superblock".into(), FileRec::Inline(vec![1, 2, 3]));
        let mut extents = BTreeMap::new();
        extents.insert(
            0,
            ExtentRec {
                len: 100,
                piece: 0,
                piece_off: 0,
            },
        );
        extents.insert(
            4096,
            ExtentRec {
                len: 50,
                piece: 1,
                piece_off: 10,
            },
        );
        files.insert(
            "seg-00000001.pss".into(),
            FileRec::Pieces { len: 8192, extents },
        );
        Head {
            version: 7,
            pieces: vec![
                (
                    PieceName {
                        version: 3,
                        token: 9,
                        n: 0,
                    },
                    100,
                ),
                (
                    PieceName {
                        version: 7,
                        token: 9,
                        n: 1,
                    },
                    60,
                ),
            ],
            files,
        }
    }

    #[test]
    fn round_trip() {
        let h = sample();
        assert_eq!(Head::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn piece_names_round_trip_and_reject_others() {
        let p = PieceName {
            version: u64::MAX,
            token: 1,
            n: 77,
        };
        assert_eq!(PieceName::parse(&p.key()), Some(p));
        for bad in [
            "p/1-2-3",
            "head",
            "p/",
            "x/0000000000000001-0000000000000002-00000003",
        ] {
            assert_eq!(PieceName::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn extents_past_the_file_or_piece_are_refused() {
        let mut h = sample();
        if let Some(FileRec::Pieces { extents, .. }) = h.files.get_mut("seg-00000001.pss") {
            extents.insert(
                5000,
                ExtentRec {
                    len: 100,
                    piece: 1,
                    piece_off: 0,
                },
            );
        }
        // 5000 + 100 is inside the file but the extent at 4096 + 50 ends before: fine; piece 1
        // is 60 bytes long, so 100 bytes from it are not.
        assert!(Head::decode(&h.encode()).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Flipped bits and truncations are errors, never panics or huge allocations.
        #[test]
        fn damaged_heads_are_errors(at in 0usize..400, bit in 0u8..8, cut in 0usize..400) {
            let bytes = sample().encode();
            let mut flipped = bytes.clone();
            let i = at % flipped.len();
            flipped[i] ^= 1 << bit;
            prop_assert!(Head::decode(&flipped).is_err());
            let cut = cut % bytes.len();
            prop_assert!(Head::decode(&bytes[..cut]).is_err());
        }

        #[test]
        fn arbitrary_bytes_do_not_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&bytes);
            let _ = Head::decode(&b);
        }
    }
}
