//! Per-record compression: the store's setting ([`Compression`]), the codec byte a record
//! carries, and bounded compress/decompress of page frames.
//!
//! A frame is a group of up to [`FRAME_PAGES`] pages compressed together (64 KiB at 4 KiB
//! pages: zstd on 64 KiB groups of an ext4 image gives 2.56-2.77x against 2.31-2.35x on single
//! pages, and a single-page read costs one frame's decompression). A frame is kept only when it
//! saves at least 1/32 of its bytes; otherwise its pages are stored plain (borg's rule: random data
//! costs nothing extra to read). Decompression never trusts the input: the output buffer has
//! exactly the frame's plain length, and anything else (a shorter or longer result, a decoder
//! error) is an error naming the frame, never a panic or an allocation by a claimed size.

use std::fmt;
use std::str::FromStr;

/// Pages per frame at most.
pub(crate) const FRAME_PAGES: usize = 16;
/// Plain bytes per frame at most: large pages get fewer per frame (a 1 MiB page is a frame of
/// its own), so a frame's buffers, the frames in flight and the frame cache stay bounded.
pub(crate) const FRAME_BYTES: usize = 256 << 10;

/// Pages per frame at `page_size`: 16 up to 16 KiB pages, then fewer, at least 1.
pub(crate) fn frame_pages(page_size: u32) -> usize {
    (FRAME_BYTES / (page_size as usize).max(1)).clamp(1, FRAME_PAGES)
}

/// The codec byte of a record (byte 5 of its header; 0 in formats 1-3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Codec {
    /// Stored as is.
    None = 0,
    /// LZ4 block format (`lz4_flex`).
    Lz4 = 1,
    /// A zstd frame (`zstd`, libzstd).
    Zstd = 2,
}

impl Codec {
    /// The codec a record's byte names.
    pub(crate) fn from_byte(b: u8) -> Option<Codec> {
        match b {
            0 => Some(Codec::None),
            1 => Some(Codec::Lz4),
            2 => Some(Codec::Zstd),
            _ => None,
        }
    }
}

/// zstd levels accepted by `zstd:LEVEL` (negative levels are zstd's fast modes).
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = -7..=19;

/// The compression a store applies to new pages (`pagesnap init --compression`, changeable
/// later; pages already stored keep the codec they were written with).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Compression {
    /// The project's default, resolved by the writing binary: today zstd level 1 (see
    /// [`Compression::resolve`]).
    #[default]
    Auto,
    /// Pages stored as they are.
    None,
    /// LZ4: fastest, about 2.0x on an ext4 image.
    Lz4,
    /// zstd at a level in [`ZSTD_LEVELS`].
    Zstd {
        /// The level.
        level: i8,
    },
}

/// The level `auto` and a bare `zstd` use.
pub const DEFAULT_ZSTD_LEVEL: i8 = 1;

impl Compression {
    /// What a writer does for `self`: the codec and level, `Auto` resolved.
    pub fn resolve(self) -> (Codec, i32) {
        match self {
            Compression::Auto => (Codec::Zstd, i32::from(DEFAULT_ZSTD_LEVEL)),
            Compression::None => (Codec::None, 0),
            Compression::Lz4 => (Codec::Lz4, 0),
            Compression::Zstd { level } => (Codec::Zstd, i32::from(level)),
        }
    }

    /// The 4 bytes a format 4 superblock keeps: kind, level, two zero bytes.
    pub(crate) fn to_bytes(self) -> [u8; 4] {
        match self {
            Compression::Auto => [0, 0, 0, 0],
            Compression::None => [1, 0, 0, 0],
            Compression::Lz4 => [2, 0, 0, 0],
            Compression::Zstd { level } => [3, level.to_le_bytes()[0], 0, 0],
        }
    }

    pub(crate) fn from_bytes(b: [u8; 4]) -> Option<Compression> {
        if b[2] != 0 || b[3] != 0 {
            return None;
        }
        let level = i8::from_le_bytes([b[1]]);
        match (b[0], level) {
            (0, 0) => Some(Compression::Auto),
            (1, 0) => Some(Compression::None),
            (2, 0) => Some(Compression::Lz4),
            (3, l) if ZSTD_LEVELS.contains(&i32::from(l)) => Some(Compression::Zstd { level: l }),
            _ => None,
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::Auto => write!(f, "auto"),
            Compression::None => write!(f, "none"),
            Compression::Lz4 => write!(f, "lz4"),
            Compression::Zstd { level } => write!(f, "zstd:{level}"),
        }
    }
}

impl FromStr for Compression {
    type Err = String;

    /// `auto`, `none`, `lz4`, `zstd` or `zstd:LEVEL`.
    fn from_str(s: &str) -> Result<Compression, String> {
        let bad = || {
            format!(
                "unknown compression {s:?}: use auto, none, lz4, zstd or zstd:LEVEL (LEVEL {}..={})",
                ZSTD_LEVELS.start(),
                ZSTD_LEVELS.end()
            )
        };
        match s {
            "auto" => Ok(Compression::Auto),
            "none" => Ok(Compression::None),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd {
                level: DEFAULT_ZSTD_LEVEL,
            }),
            _ => {
                let level = s.strip_prefix("zstd:").ok_or_else(bad)?;
                let level: i32 = level.parse().map_err(|_| bad())?;
                if !ZSTD_LEVELS.contains(&level) {
                    return Err(bad());
                }
                let level = i8::try_from(level).map_err(|_| bad())?;
                Ok(Compression::Zstd { level })
            }
        }
    }
}

/// A compressor with its state (one per thread: zstd keeps a context).
pub(crate) struct Compressor {
    codec: Codec,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    check: Decompressor,
    scratch: Vec<u8>,
}

impl fmt::Debug for Compressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Compressor")
            .field("codec", &self.codec)
            .finish()
    }
}

impl Compressor {
    pub(crate) fn new(codec: Codec, level: i32) -> Result<Compressor, String> {
        let zstd = match codec {
            Codec::Zstd => Some(
                zstd::bulk::Compressor::new(level)
                    .map_err(|e| format!("zstd level {level}: {e}"))?,
            ),
            _ => None,
        };
        Ok(Compressor {
            codec,
            zstd,
            check: Decompressor::default(),
            scratch: Vec::new(),
        })
    }

    /// Compresses `plain` into `out` (cleared first) if that saves at least 1/32 of it, and
    /// checks the result by decompressing it once (restic's rule after zstd corruption
    /// incidents). `false`: store the frame plain (it did not shrink, or the check failed).
    pub(crate) fn compress(&mut self, plain: &[u8], out: &mut Vec<u8>) -> bool {
        out.clear();
        let budget = plain.len() - plain.len() / 32;
        let n = match (self.codec, self.zstd.as_mut()) {
            (Codec::Zstd, Some(z)) => {
                out.reserve(zstd::zstd_safe::compress_bound(plain.len()));
                match z.compress_to_buffer(plain, out) {
                    Ok(n) => n,
                    Err(_) => return false,
                }
            }
            (Codec::Lz4, _) => {
                out.resize(lz4_flex::block::get_maximum_output_size(plain.len()), 0);
                match lz4_flex::block::compress_into(plain, out) {
                    Ok(n) => n,
                    Err(_) => return false,
                }
            }
            _ => return false,
        };
        out.truncate(n);
        if n > budget {
            return false;
        }
        self.scratch.clear();
        self.scratch.resize(plain.len(), 0);
        match self.check.decompress(self.codec, out, &mut self.scratch) {
            Ok(()) => self.scratch == plain,
            Err(_) => false,
        }
    }
}

/// A decompressor with its state.
#[derive(Default)]
pub(crate) struct Decompressor {
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decompressor").finish()
    }
}

impl Decompressor {
    /// Decompresses `input` into exactly `out` (its length is the frame's plain length).
    /// Errors (never panics) on any input that does not decode to exactly that many bytes.
    pub(crate) fn decompress(
        &mut self,
        codec: Codec,
        input: &[u8],
        out: &mut [u8],
    ) -> Result<(), String> {
        let n = match codec {
            Codec::None => return Err("not a compressed frame".into()),
            Codec::Lz4 => {
                lz4_flex::block::decompress_into(input, out).map_err(|e| format!("lz4: {e}"))?
            }
            Codec::Zstd => {
                if self.zstd.is_none() {
                    self.zstd =
                        Some(zstd::bulk::Decompressor::new().map_err(|e| format!("zstd: {e}"))?);
                }
                let Some(z) = self.zstd.as_mut() else {
                    return Err("zstd: no decompressor".into());
                };
                z.decompress_to_buffer(input, out)
                    .map_err(|e| format!("zstd: {e}"))?
            }
        };
        if n != out.len() {
            return Err(format!(
                "decompressed to {n} bytes, the frame holds {}",
                out.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn text(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| b"pagesnap frame "[i % 15] ^ (i / 4096) as u8)
            .collect()
    }

    #[test]
    fn settings_parse_print_and_round_trip() {
        for s in ["auto", "none", "lz4", "zstd:1", "zstd:-7", "zstd:19"] {
            let c: Compression = s.parse().expect(s);
            assert_eq!(c.to_string(), s);
            assert_eq!(Compression::from_bytes(c.to_bytes()), Some(c));
        }
        assert_eq!(
            "zstd".parse::<Compression>(),
            Ok(Compression::Zstd { level: 1 })
        );
        for bad in ["zstd:20", "zstd:-8", "zstd:x", "gzip", "", "zstd:"] {
            let e = bad.parse::<Compression>().expect_err(bad);
            assert!(e.contains("auto, none, lz4, zstd"), "{e}");
        }
        assert_eq!(Compression::from_bytes([3, 30, 0, 0]), None);
        assert_eq!(Compression::from_bytes([9, 0, 0, 0]), None);
        assert_eq!(Compression::from_bytes([1, 0, 1, 0]), None);
    }

    #[test]
    fn compressible_frames_round_trip_and_random_ones_stay_plain() {
        let plain = text(16 * 4096);
        let mut x = 7u64;
        let random: Vec<u8> = (0..16 * 4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for (codec, level) in [(Codec::Zstd, 1), (Codec::Zstd, 3), (Codec::Lz4, 0)] {
            let mut c = Compressor::new(codec, level).expect("compressor");
            let mut out = Vec::new();
            assert!(c.compress(&plain, &mut out), "{codec:?}");
            assert!(out.len() < plain.len() / 4);
            let mut back = vec![0u8; plain.len()];
            Decompressor::default()
                .decompress(codec, &out, &mut back)
                .expect("decompress");
            assert_eq!(back, plain);
            // A wrong plain length is an error, not a short or padded result.
            let mut short = vec![0u8; plain.len() - 1];
            assert!(Decompressor::default()
                .decompress(codec, &out, &mut short)
                .is_err());
            let mut long = vec![0u8; plain.len() + 1];
            assert!(Decompressor::default()
                .decompress(codec, &out, &mut long)
                .is_err());
            assert!(!c.compress(&random, &mut out), "{codec:?} kept random data");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Hostile input never panics, never yields other than exactly the asked length.
        #[test]
        fn hostile_frames_are_errors(bytes in proptest::collection::vec(any::<u8>(), 0..512),
                                     len in 0usize..70_000, zstd in any::<bool>()) {
            let codec = if zstd { Codec::Zstd } else { Codec::Lz4 };
            let mut out = vec![0u8; len];
            let _ = Decompressor::default().decompress(codec, &bytes, &mut out);
        }

        /// A flipped bit in a compressed frame decodes to an error or to other bytes, never to
        /// a panic (the page hashes catch other bytes).
        #[test]
        fn flipped_bits_never_panic(bit in 0usize..4096, zstd in any::<bool>()) {
            let codec = if zstd { Codec::Zstd } else { Codec::Lz4 };
            let plain = text(4 * 4096);
            let mut c = Compressor::new(codec, 1).expect("compressor");
            let mut out = Vec::new();
            prop_assert!(c.compress(&plain, &mut out));
            let bit = bit % (out.len() * 8);
            out[bit / 8] ^= 1 << (bit % 8);
            let mut back = vec![0u8; plain.len()];
            let _ = Decompressor::default().decompress(codec, &out, &mut back);
        }
    }
}
