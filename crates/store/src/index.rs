//! Format 3 page maps: a snapshot's index is a chain of *chunks*, each a sorted array of
//! fixed-size entries (page number, content hash, location), linked newest to oldest. A chain is a
//! *base* (the whole map, in chunks of ascending, disjoint page ranges) followed by *deltas* (each
//! snapshot's changes since its parent; a delta entry with no location makes the page zero).
//! Reading a snapshot applies its chain oldest first. A snapshot that changes D pages writes one
//! delta of D entries (56 bytes each) and shares everything else with its parent; once the deltas
//! since the base hold as many entries as the base (or 1,024 deltas), the writer writes a new base
//! instead, so the chain a read walks stays within twice the map and a changed page costs about
//! two entries of index in all. See `docs/format.md`.
//!
//! The map's *content root* is a multiset hash (the sum, modulo 2^256, of blake3 over each
//! page number and content hash): it is updated from the changes alone, so equal maps have equal
//! roots at O(changed) cost per commit, and verify recomputes it from the whole map.

use crate::format::{Dec, Enc, Location, Ref};
use std::collections::BTreeMap;

/// Bytes of one entry: page number 8, hash 32, location 16.
pub(crate) const ENTRY_BYTES: usize = 56;
/// Bytes of a chunk payload before its entries.
pub(crate) const CHUNK_HEADER: usize = 64;
/// Entries per chunk at most (a chunk record is then at most ~3.5 MiB).
pub(crate) const MAX_CHUNK_ENTRIES: usize = 1 << 16;
/// A new base is written once a chain holds this many deltas.
pub(crate) const MAX_CHAIN_DELTAS: u32 = 1024;
/// A chain walk gives up past this many chunks (a damaged store cannot make a read loop).
pub(crate) const MAX_CHAIN_CHUNKS: usize = 1 << 22;

/// A whole page map: page number to the page's content hash and location.
pub(crate) type PageMap = BTreeMap<u64, Ref>;

/// Hashes a blake3 key by its first 8 bytes: they are already uniformly distributed, and no
/// content can steer them (that would need blake3 preimages), so SipHash's work buys nothing.
#[derive(Default)]
pub(crate) struct ContentHasher(u64);

impl std::hash::Hasher for ContentHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` hashes as its length then its bytes: keep the first 8 content bytes.
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.0 ^= u64::from(*b) << (8 * i);
        }
        self.0 = self.0.rotate_left(29);
    }
}

/// A map keyed by content hash.
pub(crate) type ByContent<V> =
    std::collections::HashMap<[u8; 32], V, std::hash::BuildHasherDefault<ContentHasher>>;

/// Where a chunk record is and the blake3 of its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ChunkRef {
    pub(crate) loc: Location,
    pub(crate) hash: [u8; 32],
}

/// A decoded chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Chunk {
    /// Part of a base (no zero entries) rather than a delta.
    pub(crate) base: bool,
    /// The chunk before it in the chain (`None`: the first chunk of a base).
    pub(crate) prev: Option<ChunkRef>,
    /// Ascending page numbers; `None`: the page becomes zero (deltas only).
    pub(crate) entries: Vec<(u64, Option<Ref>)>,
}

impl Chunk {
    #[cfg(test)]
    pub(crate) fn encode(&self) -> Vec<u8> {
        Chunk::encode_parts(self.base, self.prev.as_ref(), &self.entries)
    }

    /// The bytes of a chunk of these parts (what [`Chunk::encode`] gives, without building one).
    pub(crate) fn encode_parts(
        base: bool,
        prev: Option<&ChunkRef>,
        entries: &[(u64, Option<Ref>)],
    ) -> Vec<u8> {
        let mut e = Enc(Vec::with_capacity(
            CHUNK_HEADER + entries.len() * ENTRY_BYTES,
        ));
        e.u8(u8::from(base));
        e.bytes(&[0; 7]);
        match prev {
            Some(p) => {
                e.u8(1);
                e.loc(&p.loc);
                e.bytes(&p.hash);
            }
            None => {
                e.u8(0);
                e.bytes(&[0; 48]);
            }
        }
        e.bytes(&[0; 3]);
        // Bounded by MAX_CHUNK_ENTRIES.
        e.u32(u32::try_from(entries.len()).unwrap_or(u32::MAX));
        for (vpn, r) in entries {
            e.u64(*vpn);
            match r {
                Some(r) => {
                    e.bytes(&r.hash);
                    e.loc(&r.loc);
                }
                None => e.bytes(&[0; 48]),
            }
        }
        e.0
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Chunk, String> {
        let short = |_| "chunk too short".to_string();
        let mut d = Dec::new(bytes);
        let flags = d.u8().map_err(short)?;
        if flags > 1 || d.take(7).map_err(short)?.iter().any(|b| *b != 0) {
            return Err("unknown chunk flags".into());
        }
        let present = d.u8().map_err(short)?;
        let loc = d.loc().map_err(short)?;
        let hash = d.hash().map_err(short)?;
        let prev = match present {
            0 => None,
            1 => Some(ChunkRef { loc, hash }),
            _ => return Err("bad chunk link".into()),
        };
        d.take(3).map_err(short)?;
        let n = d.u32().map_err(short)? as usize;
        if n > MAX_CHUNK_ENTRIES || n * ENTRY_BYTES != d.remaining() {
            return Err(format!("chunk entry count {n} does not match its length"));
        }
        let mut entries = Vec::with_capacity(n);
        let mut last = None;
        for _ in 0..n {
            let vpn = d.u64().map_err(short)?;
            if last.is_some_and(|l| l >= vpn) {
                return Err("chunk entries out of order".into());
            }
            last = Some(vpn);
            let hash = d.hash().map_err(short)?;
            let loc = d.loc().map_err(short)?;
            let r = if loc.len == 0 {
                if flags == 1 {
                    return Err("a zero entry in a base chunk".into());
                }
                None
            } else {
                Some(Ref { hash, loc })
            };
            entries.push((vpn, r));
        }
        Ok(Chunk {
            base: flags == 1,
            prev,
            entries,
        })
    }
}

/// Applies a chain, given newest first, to an empty map.
pub(crate) fn apply_chain(chain: &[Chunk]) -> PageMap {
    let mut map = PageMap::new();
    for c in chain.iter().rev() {
        for (vpn, r) in &c.entries {
            match r {
                Some(r) => {
                    map.insert(*vpn, *r);
                }
                None => {
                    map.remove(vpn);
                }
            }
        }
    }
    map
}

/// One map entry's term of the content root.
fn term(vpn: u64, hash: &[u8; 32]) -> [u64; 4] {
    let mut h = blake3::Hasher::new();
    h.update(b"pagesnap map entry");
    h.update(&vpn.to_le_bytes());
    h.update(hash);
    let out = h.finalize();
    let b = out.as_bytes();
    let mut w = [0u64; 4];
    for (i, w) in w.iter_mut().enumerate() {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[i * 8..i * 8 + 8]);
        *w = u64::from_le_bytes(x);
    }
    w
}

/// A content root under construction (256-bit little-endian sum).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ContentRoot([u64; 4]);

impl ContentRoot {
    pub(crate) fn from_bytes(b: &[u8; 32]) -> ContentRoot {
        let mut w = [0u64; 4];
        for (i, w) in w.iter_mut().enumerate() {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i * 8..i * 8 + 8]);
            *w = u64::from_le_bytes(x);
        }
        ContentRoot(w)
    }

    pub(crate) fn to_bytes(self) -> [u8; 32] {
        let mut b = [0u8; 32];
        for (i, w) in self.0.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    pub(crate) fn add(&mut self, vpn: u64, hash: &[u8; 32]) {
        self.add_words(term(vpn, hash));
    }

    #[cfg(test)]
    pub(crate) fn sub(&mut self, vpn: u64, hash: &[u8; 32]) {
        self.sub_words(term(vpn, hash));
    }

    fn add_words(&mut self, t: [u64; 4]) {
        let mut carry = false;
        for (a, b) in self.0.iter_mut().zip(t) {
            let (s1, c1) = a.overflowing_add(b);
            let (s2, c2) = s1.overflowing_add(u64::from(carry));
            *a = s2;
            carry = c1 || c2;
        }
    }

    fn sub_words(&mut self, t: [u64; 4]) {
        let mut borrow = false;
        for (a, b) in self.0.iter_mut().zip(t) {
            let (s1, c1) = a.overflowing_sub(b);
            let (s2, c2) = s1.overflowing_sub(u64::from(borrow));
            *a = s2;
            borrow = c1 || c2;
        }
    }

    /// Applies a commit's changes, each (page, hash before, hash after): the term of every hash
    /// before is subtracted and of every hash after added. The root is a sum modulo 2^256, so
    /// the order does not matter: from [`PARALLEL_TERMS`] changes on, the terms (one blake3
    /// each) are summed in parts on scoped threads of the store's own (not on a shared pool,
    /// which a caller holding a lock the pool's jobs wait for would deadlock), a part that
    /// cannot get a thread on the calling thread.
    pub(crate) fn change_all(&mut self, changes: &[RootChange]) {
        self.sum_parts(changes, |c| {
            let (mut plus, mut minus) = (ContentRoot::default(), ContentRoot::default());
            for (vpn, before, after) in c {
                if let Some(h) = before {
                    minus.add(*vpn, h);
                }
                if let Some(h) = after {
                    plus.add(*vpn, h);
                }
            }
            (plus, minus)
        });
    }

    /// Adds the term of every page `delta` puts (a commit on an empty parent: nothing before),
    /// in parts on threads as [`ContentRoot::change_all`] does.
    pub(crate) fn add_delta(&mut self, delta: &[(u64, Option<Ref>)]) {
        self.sum_parts(delta, |c| {
            let mut plus = ContentRoot::default();
            for (vpn, r) in c {
                if let Some(r) = r {
                    plus.add(*vpn, &r.hash);
                }
            }
            (plus, ContentRoot::default())
        });
    }

    /// Adds, for each part of `items`, what `part` sums to add and subtracts what it sums to
    /// subtract.
    fn sum_parts<T: Sync>(
        &mut self,
        items: &[T],
        part: impl Fn(&[T]) -> (ContentRoot, ContentRoot) + Sync,
    ) {
        let part = &part;
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, MAX_TERM_THREADS)
            .min(items.len().div_ceil(PARALLEL_TERMS).max(1));
        let sums: Vec<(ContentRoot, ContentRoot)> = if threads == 1 {
            vec![part(items)]
        } else {
            let size = items.len().div_ceil(threads);
            std::thread::scope(|s| {
                let mut parts = items.chunks(size);
                let mine = parts.next().unwrap_or(&[]);
                let spawned: Vec<_> = parts
                    .map(|c| {
                        std::thread::Builder::new()
                            .name("pagesnap-root".into())
                            .spawn_scoped(s, move || part(c))
                            .map_err(|_| c)
                    })
                    .collect();
                let mut sums = vec![part(mine)];
                for h in spawned {
                    sums.push(match h {
                        // A panic in a summing thread is a bug: raised again here.
                        Ok(h) => h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
                        Err(c) => part(c),
                    });
                }
                sums
            })
        };
        for (plus, minus) in sums {
            self.add_words(plus.0);
            self.sub_words(minus.0);
        }
    }

    /// The root of a whole map.
    pub(crate) fn of(map: &PageMap) -> ContentRoot {
        let mut r = ContentRoot::default();
        for (vpn, x) in map {
            r.add(*vpn, &x.hash);
        }
        r
    }
}

/// A page's change as the content root sees it: (page, hash before, hash after).
pub(crate) type RootChange = (u64, Option<[u8; 32]>, Option<[u8; 32]>);

/// Changes from which [`ContentRoot::change_all`] sums the terms on more than one thread (and at
/// least this many per thread).
const PARALLEL_TERMS: usize = 4096;

/// Threads [`ContentRoot::change_all`] sums on at most, the calling one included.
const MAX_TERM_THREADS: usize = 4;

/// Applies `delta` (ascending, one entry per page: `None` removes the page) to `map`. A delta at
/// least an eighth of the map's size goes in by one merge ([`BTreeMap::append`] of its new
/// entries: a pass over both, freeing the old nodes as it goes, and a bulk build) and then its
/// removals; a smaller one by an insert or a removal per entry.
pub(crate) fn apply_delta(map: &mut PageMap, delta: &[(u64, Option<Ref>)]) {
    if delta.len() >= map.len() / MERGE_FRACTION {
        let mut puts: PageMap = delta
            .iter()
            .filter_map(|(k, v)| v.map(|v| (*k, v)))
            .collect();
        map.append(&mut puts);
        for (k, _) in delta.iter().filter(|(_, v)| v.is_none()) {
            map.remove(k);
        }
    } else {
        for (k, v) in delta {
            match v {
                Some(r) => {
                    map.insert(*k, *r);
                }
                None => {
                    map.remove(k);
                }
            }
        }
    }
}

/// A delta with at least 1/MERGE_FRACTION as many entries as the map goes in by one merge
/// ([`apply_delta`]).
const MERGE_FRACTION: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    /// A map of `n` pages and a delta against it that updates, removes and adds pages, from a
    /// seed (xorshift).
    fn map_and_delta(n: u64, seed: u64) -> (PageMap, Vec<(u64, Option<Ref>)>) {
        let mut x = seed | 1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let map: PageMap = (0..n).map(|i| (i * 3, r((i % 251) as u8))).collect();
        let mut delta = std::collections::BTreeMap::new();
        for _ in 0..n {
            let page = next() % (n * 4);
            let v = match next() % 3 {
                0 => None,
                k => Some(r((k * 7 + page % 200) as u8)),
            };
            delta.insert(page, v);
        }
        (map, delta.into_iter().collect())
    }

    #[test]
    fn a_delta_applies_alike_by_merge_and_entry_by_entry() {
        for (n, seed) in [(0, 1), (1, 2), (10, 3), (5000, 4), (20_000, 5)] {
            let (map, delta) = map_and_delta(n, seed);
            // Entry by entry, as a reader of the chain applies it.
            let naive = |map: &PageMap, delta: &[(u64, Option<Ref>)]| {
                let mut m = map.clone();
                for (k, v) in delta {
                    match v {
                        Some(v) => m.insert(*k, *v),
                        None => m.remove(k),
                    };
                }
                m
            };
            let want = naive(&map, &delta);
            let applied = |map: &PageMap, delta: &[(u64, Option<Ref>)]| {
                let mut m = map.clone();
                apply_delta(&mut m, delta);
                m
            };
            assert_eq!(applied(&map, &delta), want, "{n} pages, seed {seed}");
            // The other way in: a delta less than an eighth of the map.
            let small: Vec<_> = delta.iter().step_by(9).copied().collect();
            let want_small = naive(&map, &small);
            assert_eq!(
                applied(&map, &small),
                want_small,
                "{n} pages, seed {seed}, small"
            );
            assert_eq!(
                applied(&PageMap::new(), &delta).len(),
                delta.iter().filter(|d| d.1.is_some()).count()
            );
            assert_eq!(applied(&map, &[]), map);
        }
    }

    #[test]
    fn the_root_of_many_changes_is_the_root_of_each_in_turn() {
        // Past PARALLEL_TERMS, so the terms are summed on more than one thread.
        for (n, seed) in [(3, 7), (PARALLEL_TERMS as u64 * 3 + 17, 8)] {
            let (map, delta) = map_and_delta(n, seed);
            let changes: Vec<_> = delta
                .iter()
                .map(|(k, v)| (*k, map.get(k).map(|r| r.hash), v.map(|r| r.hash)))
                .collect();
            let mut one_by_one = ContentRoot::of(&map);
            for (k, before, after) in &changes {
                if let Some(h) = before {
                    one_by_one.sub(*k, h);
                }
                if let Some(h) = after {
                    one_by_one.add(*k, h);
                }
            }
            let mut all = ContentRoot::of(&map);
            all.change_all(&changes);
            assert_eq!(all, one_by_one);
            let mut new = map.clone();
            apply_delta(&mut new, &delta);
            assert_eq!(all, ContentRoot::of(&new));
        }
    }

    fn r(n: u8) -> Ref {
        Ref {
            hash: [n; 32],
            loc: Location {
                segment: 1,
                offset: 64 + u64::from(n) * 4096,
                len: 4096,
                slot: 0,
            },
        }
    }

    #[test]
    fn chunks_round_trip_and_refuse_bad_bytes() {
        let c = Chunk {
            base: false,
            prev: Some(ChunkRef {
                loc: Location {
                    segment: 2,
                    offset: 64,
                    len: 200,
                    slot: 0,
                },
                hash: [9; 32],
            }),
            entries: vec![(1, Some(r(1))), (5, None), (7, Some(r(7)))],
        };
        let bytes = c.encode();
        assert_eq!(bytes.len(), CHUNK_HEADER + 3 * ENTRY_BYTES);
        assert_eq!(Chunk::decode(&bytes), Ok(c.clone()));
        // Out of order, a zero entry in a base, a wrong count, a truncation: refused.
        let mut swapped = c.clone();
        swapped.entries.swap(0, 2);
        assert!(Chunk::decode(&swapped.encode()).is_err());
        let base = Chunk { base: true, ..c };
        assert!(Chunk::decode(&base.encode()).is_err());
        assert!(Chunk::decode(&bytes[..bytes.len() - 1]).is_err());
        for cut in 0..CHUNK_HEADER {
            assert!(Chunk::decode(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn chains_apply_oldest_first_and_roots_follow_the_changes() {
        let base = Chunk {
            base: true,
            prev: None,
            entries: vec![(1, Some(r(1))), (2, Some(r(2))), (3, Some(r(3)))],
        };
        let delta = Chunk {
            base: false,
            prev: None,
            entries: vec![(2, None), (3, Some(r(9))), (4, Some(r(4)))],
        };
        let map = apply_chain(&[delta, base.clone()]);
        let keys: Vec<u64> = map.keys().copied().collect();
        assert_eq!(keys, vec![1, 3, 4]);
        assert_eq!(map[&3], r(9));
        // The incremental root equals the root of the whole map.
        let mut root = ContentRoot::of(&apply_chain(&[base]));
        root.sub(2, &r(2).hash);
        root.sub(3, &r(3).hash);
        root.add(3, &r(9).hash);
        root.add(4, &r(4).hash);
        assert_eq!(root, ContentRoot::of(&map));
        assert_eq!(ContentRoot::from_bytes(&root.to_bytes()), root);
        assert_ne!(root, ContentRoot::default());
        // Order does not matter; content does.
        let mut a = ContentRoot::default();
        a.add(1, &[1; 32]);
        a.add(2, &[2; 32]);
        let mut b = ContentRoot::default();
        b.add(2, &[2; 32]);
        b.add(1, &[1; 32]);
        assert_eq!(a, b);
        b.sub(1, &[1; 32]);
        b.add(1, &[3; 32]);
        assert_ne!(a, b);
    }
}
