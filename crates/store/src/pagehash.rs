//! Page hashes in batches: the blake3 of many equal-sized pages at once, on every SIMD lane.
//!
//! `blake3::hash` of one 4 KiB page compresses its four 1 KiB chunks side by side, which fills
//! four of AVX-512's sixteen lanes (half of AVX2's eight). Hashing a batch of pages instead
//! compresses chunk `j` of up to sixteen pages side by side, then their parent nodes the same
//! way, so every lane works: the same bytes out (`blake3::hash` of each page, checked against
//! it by the tests), at about three times the rate on one core here (docs/benchmarks.md).
//!
//! The lanes are reached through `blake3::platform::Platform::hash_many`, the crate's own SIMD
//! kernel (hidden from its docs; upstream's `blake3::many`, BLAKE3-team/BLAKE3#478 and #575, is
//! the public form in the making). The workspace pins the blake3 version, and the tests compare
//! every page size against `blake3::hash`, so a change there fails the build or the tests rather
//! than the hashes. Pages that are not a power-of-two number of chunks go through
//! `blake3::hash`.

use blake3::platform::Platform;
use blake3::IncrementCounter;

const CHUNK: usize = 1024;
const OUT: usize = 32;
// The BLAKE3 specification's domain flags and IV (the SHA-256 IV).
const CHUNK_START: u8 = 1 << 0;
const CHUNK_END: u8 = 1 << 1;
const PARENT: u8 = 1 << 2;
const ROOT: u8 = 1 << 3;
const KEYED_HASH: u8 = 1 << 4;
const IV: [u32; 8] = [
    0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19,
];

/// Pages hashed per pass: enough to fill the widest lanes several times over, small enough that
/// the chaining values stay in cache.
const BATCH: usize = 64;

/// The blake3 of each page of `pages` into `out`, which holds one hash per page (it panics
/// otherwise: a caller's error). Pages of one length, a power of two of at least 1 KiB, go many
/// at a time; others one by one.
pub fn hash_pages(pages: &[&[u8]], out: &mut [[u8; 32]]) {
    hash_pages_with(None, pages, out)
}

/// [`hash_pages`] in blake3's keyed mode: `blake3::keyed_hash(key, page)` of each page (the
/// key's words replace the IV and every compression carries the `KEYED_HASH` flag).
pub fn hash_pages_keyed(key: &[u8; 32], pages: &[&[u8]], out: &mut [[u8; 32]]) {
    hash_pages_with(Some(key), pages, out)
}

/// The page ids of a store: plain blake3, or keyed blake3 in an encrypted store (the dedup key:
/// an id then does not tell whether the store holds a page someone else knows). Cheap to clone
/// and to send to hashing threads; `Debug` shows no key.
#[derive(Clone, Default)]
pub struct PageIds(Option<std::sync::Arc<crate::keys::DedupKey>>);

impl std::fmt::Debug for PageIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "PageIds(keyed)"
        } else {
            "PageIds(blake3)"
        })
    }
}

impl PageIds {
    pub(crate) fn keyed(key: std::sync::Arc<crate::keys::DedupKey>) -> PageIds {
        PageIds(Some(key))
    }

    /// Whether ids are keyed (an encrypted store).
    pub fn is_keyed(&self) -> bool {
        self.0.is_some()
    }

    /// The id of one page.
    pub fn id(&self, page: &[u8]) -> [u8; 32] {
        match &self.0 {
            Some(k) => k.id(page),
            None => *blake3::hash(page).as_bytes(),
        }
    }

    /// The ids of many pages at once ([`hash_pages`], keyed or not).
    pub fn hash_pages(&self, pages: &[&[u8]], out: &mut [[u8; 32]]) {
        hash_pages_with(self.0.as_ref().map(|k| k.key_bytes()), pages, out)
    }
}

/// Pages one core hashes at a time in [`HashedPages::new`].
const HASH_GROUP: usize = 256;

/// Batches of at least this many pages are hashed on every core in [`HashedPages::new`]; smaller
/// ones on the calling thread.
const PARALLEL_MIN: usize = 1024;

/// A batch of pages and their ids, hashed together by a store's [`PageIds`]: the pages
/// back to back in one buffer, and the id of each that is not all zero.
///
/// Only this type pairs pages with ids, and only from the bytes it holds, so a store takes its
/// ids without hashing the pages again ([`crate::Store::put_hashed_pages`]); ids given one by
/// one ([`crate::Store::put_hashed`]) are checked in an encrypted store instead. The store
/// refuses a batch hashed with another store's key.
pub struct HashedPages {
    buf: Vec<u8>,
    page_size: usize,
    ids: Vec<Option<[u8; 32]>>,
    by: PageIds,
}

impl std::fmt::Debug for HashedPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HashedPages")
            .field("pages", &self.ids.len())
            .field("page_size", &self.page_size)
            .field("by", &self.by)
            .finish_non_exhaustive()
    }
}

impl HashedPages {
    /// Hashes the first `pages` pages of `buf` (each `page_size` bytes) with `ids`, many pages
    /// at once: on every core (rayon) from 1,024 pages, on the calling thread below. Panics if
    /// `buf` holds fewer than `pages` pages, if `page_size` is 0 or `pages * page_size`
    /// overflows (a caller's error).
    pub fn new(ids: &PageIds, buf: Vec<u8>, pages: usize, page_size: usize) -> HashedPages {
        use rayon::prelude::*;
        assert!(page_size > 0, "page size 0");
        let len = pages
            .checked_mul(page_size)
            .expect("pages * page_size overflows");
        let all: Vec<&[u8]> = buf[..len].chunks_exact(page_size).collect();
        let zero: Vec<bool> = all.iter().map(|p| is_zero(p)).collect();
        let data: Vec<&[u8]> = all
            .iter()
            .zip(&zero)
            .filter(|(_, z)| !**z)
            .map(|(p, _)| *p)
            .collect();
        let mut hashes = vec![[0u8; 32]; data.len()];
        if pages < PARALLEL_MIN {
            // A small batch keeps to this thread (and leaves the other cores to the program
            // whose memory is snapshotted: ~1 ms per 1,000 pages).
            ids.hash_pages(&data, &mut hashes);
        } else {
            data.par_chunks(HASH_GROUP)
                .zip(hashes.par_chunks_mut(HASH_GROUP))
                .for_each(|(pages, out)| ids.hash_pages(pages, out));
        }
        drop(data);
        drop(all);
        let mut next = hashes.into_iter();
        let ids_out = zero
            .iter()
            .map(|z| if *z { None } else { next.next() })
            .collect();
        HashedPages {
            buf,
            page_size,
            ids: ids_out,
            by: ids.clone(),
        }
    }

    /// How many pages.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the batch has no page.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The bytes of each page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Page `i`'s bytes.
    pub fn page(&self, i: usize) -> &[u8] {
        &self.buf[i * self.page_size..(i + 1) * self.page_size]
    }

    /// Page `i`'s id; `None` if it is all zero.
    pub fn id(&self, i: usize) -> Option<&[u8; 32]> {
        self.ids[i].as_ref()
    }

    /// Whether the ids were hashed with `key` (the same dedup key, or both plain blake3).
    pub(crate) fn hashed_with(&self, key: Option<&std::sync::Arc<crate::keys::DedupKey>>) -> bool {
        match (&self.by.0, key) {
            (None, None) => true,
            (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b) || a.key_bytes() == b.key_bytes(),
            _ => false,
        }
    }

    /// The buffer back, for the next batch.
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }
}

/// Whether a page is all zero bytes (64 bytes at a time, so the compiler vectorizes it, and a
/// data page is rejected after its first 64 bytes).
pub fn is_zero(page: &[u8]) -> bool {
    page.chunks(64)
        .all(|c| c.iter().fold(0u8, |a, b| a | b) == 0)
}

fn hash_pages_with(key: Option<&[u8; 32]>, pages: &[&[u8]], out: &mut [[u8; 32]]) {
    assert_eq!(pages.len(), out.len(), "one hash per page");
    let (words, keyed) = match key {
        Some(k) => {
            let mut w = [0u32; 8];
            for (i, c) in k.chunks_exact(4).enumerate() {
                w[i] = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
            (w, KEYED_HASH)
        }
        None => (IV, 0),
    };
    let len = pages.first().map_or(0, |p| p.len());
    let chunks = len / CHUNK;
    let batched = len.is_multiple_of(CHUNK)
        && chunks.is_power_of_two()
        && pages.iter().all(|p| p.len() == len);
    if !batched {
        for (p, o) in pages.iter().zip(out.iter_mut()) {
            *o = match key {
                Some(k) => *blake3::keyed_hash(k, p).as_bytes(),
                None => *blake3::hash(p).as_bytes(),
            };
        }
        return;
    }
    let platform = Platform::detect();
    let mut cvs = vec![0u8; BATCH * chunks * OUT];
    let mut next = vec![0u8; BATCH * chunks.div_ceil(2) * OUT];
    let mut inputs: Vec<&[u8; CHUNK]> = Vec::with_capacity(BATCH);
    for (group, outs) in pages.chunks(BATCH).zip(out.chunks_mut(BATCH)) {
        let n = group.len();
        if chunks == 1 {
            // One chunk per page: its chunk node is the root.
            inputs.clear();
            inputs.extend(
                group
                    .iter()
                    .filter_map(|p| <&[u8; CHUNK]>::try_from(&p[..]).ok()),
            );
            let roots = &mut cvs[..n * OUT];
            platform.hash_many(
                &inputs,
                &words,
                0,
                IncrementCounter::No,
                keyed,
                CHUNK_START,
                CHUNK_END | ROOT,
                roots,
            );
            for (o, r) in outs.iter_mut().zip(roots.chunks_exact(OUT)) {
                o.copy_from_slice(r);
            }
            continue;
        }
        // Chunk chaining values, laid out page by page: cvs[(i * chunks + j) * OUT..].
        let mut lane_out = vec![0u8; n * OUT];
        for j in 0..chunks {
            inputs.clear();
            inputs.extend(
                group
                    .iter()
                    .filter_map(|p| <&[u8; CHUNK]>::try_from(&p[j * CHUNK..(j + 1) * CHUNK]).ok()),
            );
            platform.hash_many(
                &inputs,
                &words,
                j as u64,
                IncrementCounter::No,
                keyed,
                CHUNK_START,
                CHUNK_END,
                &mut lane_out,
            );
            for (i, cv) in lane_out.chunks_exact(OUT).enumerate() {
                let at = (i * chunks + j) * OUT;
                cvs[at..at + OUT].copy_from_slice(cv);
            }
        }
        // Parent levels: each pair of chaining values (64 bytes, back to back) is one block.
        let mut width = chunks;
        while width > 1 {
            let half = width / 2;
            let blocks: Vec<&[u8; 64]> = cvs[..n * width * OUT]
                .chunks_exact(64)
                .filter_map(|b| <&[u8; 64]>::try_from(b).ok())
                .collect();
            let flags = keyed | if half == 1 { PARENT | ROOT } else { PARENT };
            let dst = &mut next[..n * half * OUT];
            platform.hash_many(&blocks, &words, 0, IncrementCounter::No, flags, 0, 0, dst);
            drop(blocks);
            cvs[..n * half * OUT].copy_from_slice(dst);
            width = half;
        }
        for (o, r) in outs.iter_mut().zip(cvs.chunks_exact(OUT)) {
            o.copy_from_slice(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(n: usize, len: usize, seed: u64) -> Vec<Vec<u8>> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn every_page_size_hashes_as_blake3_does() {
        for len in [
            0, 1, 64, 512, 1000, 1024, 2048, 3072, 4096, 8192, 16384, 65536,
        ] {
            for n in [0, 1, 2, 15, 16, 17, 63, 64, 65, 130] {
                let ps = pages(n, len, (len * 131 + n) as u64);
                let refs: Vec<&[u8]> = ps.iter().map(|p| &p[..]).collect();
                let mut out = vec![[0u8; 32]; n];
                hash_pages(&refs, &mut out);
                for (p, h) in ps.iter().zip(&out) {
                    assert_eq!(h, blake3::hash(p).as_bytes(), "len {len} n {n}");
                }
                let key = [len as u8 ^ 0x5a; 32];
                hash_pages_keyed(&key, &refs, &mut out);
                for (p, h) in ps.iter().zip(&out) {
                    assert_eq!(
                        h,
                        blake3::keyed_hash(&key, p).as_bytes(),
                        "keyed len {len} n {n}"
                    );
                }
            }
        }
    }
}
