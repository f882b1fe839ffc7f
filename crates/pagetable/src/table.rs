//! The hashed (inverted) page table. See `docs/concurrency.md` for the protocol in prose.
//!
//! Layout:
//! - `slots`: the descriptors, one 64-byte cache line each, in an append-only segmented array.
//!   A slot index is a mapping's stable identity; removed slots go on a free list, except a slot
//!   whose 15-bit generation is used up, which is retired for good (see [`PageHandle`]).
//! - `buckets`: linear-hashing buckets, one cache line each: a sequence counter, a link to an
//!   overflow bucket, and 8 entries of (16-bit tag, 32-bit slot handle). Entries of a chain are
//!   packed, so a lookup stops at the first empty entry.
//! - `overflow`: more buckets of the same shape, chained from a full bucket. No mapping is ever
//!   evicted: a full bucket grows a chain.
//!
//! Readers take no lock: they read a bucket's sequence counter, the entries and the descriptor,
//! and retry if the counter moved (a seqlock per bucket). Writers hold one writer lock (the note's
//! `vm_map_mutex`), and make every change to a chain and to the descriptors it names inside an odd
//! window of the chain's counter.

use crate::addr::{PageSize, VirtAddr};
use crate::hash::{DefaultHash, VpnHasher};
use crate::lock::{DefaultLock, WriterMutex};
use crate::page::{is_live, meta_of, Page, PageHandle, Words, GEN_MASK, LIVE_BIT, META_SHIFT};
use crate::segvec::SegVec;
use crate::sync::{fence, spin_wait, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use alloc::vec::Vec;
use core::fmt;

#[cfg(not(loom))]
pub(crate) const BUCKET_SLOTS: usize = 8;
#[cfg(loom)]
pub(crate) const BUCKET_SLOTS: usize = 2;

/// Average entries per bucket above which a bucket is split (of [`BUCKET_SLOTS`] per bucket).
#[cfg(not(loom))]
const TARGET_LOAD: u64 = 6;
#[cfg(loom)]
const TARGET_LOAD: u64 = 1;

#[cfg(not(loom))]
const MIN_BUCKETS: u64 = 16;
#[cfg(loom)]
const MIN_BUCKETS: u64 = 1;

#[cfg(not(loom))]
const SLOT_SEG_SHIFT: u32 = 12;
#[cfg(loom)]
const SLOT_SEG_SHIFT: u32 = 1;
#[cfg(not(loom))]
const BUCKET_SEG_SHIFT: u32 = 10;
#[cfg(loom)]
const BUCKET_SEG_SHIFT: u32 = 1;

/// Slot handles are stored as `index + 1` in 32 bits, 0 meaning "empty".
const MAX_SLOTS: u64 = u32::MAX as u64 - 1;

/// Tags are 16 bits, four to a 64-bit word.
const TAG_WORDS: usize = BUCKET_SLOTS.div_ceil(4);
/// Every stored tag has its top bit set, so an empty entry (tag 0) never matches a lookup.
const TAG_USED: u16 = 0x8000;
const LANES_LOW: u64 = 0x0001_0001_0001_0001;
const LANES_TOP: u64 = 0x8000_8000_8000_8000;

#[repr(C, align(64))]
#[derive(Default)]
struct Bucket {
    /// Entry `i`'s tag is bits `16 * (i % 4)..` of word `i / 4`: the top 15 bits of the hash with
    /// [`TAG_USED`] set, or 0 for an empty entry. Compared all at once (`matches`). First in the
    /// bucket, so the 16 bytes are aligned for one SSE load.
    tags: [AtomicU64; TAG_WORDS],
    seq: AtomicU32,
    /// 1 + index of the next overflow bucket; 0 ends the chain. Free overflow buckets are chained
    /// through it too.
    next: AtomicU32,
    /// 1 + slot index; 0 is an empty entry (and ends the chain's packed entries).
    handles: [AtomicU32; BUCKET_SLOTS],
}

impl Bucket {
    /// Entry `i`'s tag.
    #[inline]
    fn tag(&self, i: usize) -> u16 {
        #[allow(clippy::cast_possible_truncation)] // one 16-bit lane
        let t = (self.tags[i / 4].load(Ordering::Relaxed) >> (16 * (i % 4))) as u16;
        t
    }

    /// Sets entry `i` (a writer, inside the chain's write window; `tag` 0 and `handle` 0 empty
    /// it). Only writers store tags, one at a time under the writer lock, so the word's other lanes
    /// cannot change between the load and the store.
    fn set_entry(&self, i: usize, tag: u16, handle: u32) {
        debug_assert_eq!(
            tag == 0,
            handle == 0,
            "an entry has both a tag and a handle, or neither"
        );
        let word = &self.tags[i / 4];
        let shift = 16 * (i % 4);
        let old = word.load(Ordering::Relaxed);
        word.store(
            (old & !(0xffff << shift)) | (u64::from(tag) << shift),
            Ordering::Relaxed,
        );
        self.handles[i].store(handle, Ordering::Relaxed);
    }

    /// The entries of this bucket whose tag is `h`'s ([`tag_of`]), as a mask [`entry_of`] turns
    /// back into entries, computed without a branch: lookups take no branch on where in the bucket
    /// a match is, so the branch predictor has nothing to miss. x86-64 compares all eight tags in
    /// one SSE2 instruction; elsewhere (and under loom) four at a time in a 64-bit word.
    #[inline]
    fn matches(&self, h: u64) -> u64 {
        #[cfg(all(target_arch = "x86_64", target_feature = "sse2", not(loom), not(miri)))]
        {
            // SAFETY: `matches_sse2` only needs SSE2, and this is compiled only where SSE2 is
            // enabled for the target (`target_feature = "sse2"`: the hosted x86_64 targets; a
            // kernel target without SSE, such as x86_64-unknown-none, takes the portable path);
            // it has no other precondition.
            unsafe { self.matches_sse2(h) }
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "sse2", not(loom), not(miri))))]
        {
            self.matches_swar(h)
        }
    }

    /// SSE2: entry `i` is bit `2i + 1` of the result. The tags are one 16-byte load (as the slot
    /// copy: see [`Slot::load_x86_64`]), the pattern the top 16 bits of `h` spread to every lane.
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2", not(loom), not(miri)))]
    #[inline]
    #[target_feature(enable = "sse2")]
    fn matches_sse2(&self, h: u64) -> u64 {
        use core::arch::x86_64::{
            __m128i, _mm_cmpeq_epi16, _mm_cvtsi64_si128, _mm_movemask_epi8, _mm_or_si128,
            _mm_set1_epi16, _mm_shuffle_epi32, _mm_shufflelo_epi16,
        };
        const _: () = assert!(TAG_WORDS == 2 && core::mem::offset_of!(Bucket, tags) == 0);
        let tags: __m128i;
        // SAFETY: `src` is this bucket's 16 bytes of tags, aligned to 64 (they open the bucket).
        // The asm only loads them into the xmm register it declares as output; it touches no
        // other memory, no stack and no flags. As in `Slot::load_x86_64`, each aligned 8-byte half
        // of the load is read in one access, i.e. what a relaxed `AtomicU64` load returns, and a
        // reader validates everything it read against the bucket's sequence counter.
        unsafe {
            core::arch::asm!(
                "movdqa {t}, xmmword ptr [{src}]",
                src = in(reg) self.tags.as_ptr(),
                t = out(xmm_reg) tags,
                options(nostack, preserves_flags, readonly),
            );
        }
        // Lane 3 (the top 16 bits) to lanes 0-3, then to all eight, and the used bit set: the
        // tag of `tag_of`.
        #[allow(clippy::cast_possible_wrap)] // bit patterns
        let pattern = _mm_or_si128(
            _mm_shuffle_epi32::<0>(_mm_shufflelo_epi16::<0xff>(_mm_cvtsi64_si128(h as i64))),
            _mm_set1_epi16(TAG_USED as i16),
        );
        let equal = _mm_cmpeq_epi16(tags, pattern);
        // Two mask bits per 16-bit lane; keep the upper one.
        #[allow(clippy::cast_sign_loss)] // a 16-bit mask
        let m = (_mm_movemask_epi8(equal) as u32 & 0xaaaa) as u64;
        m
    }

    /// Four lanes a word at a time, merged: word `k`'s lane `l` (entry `4k + l`) is bit
    /// `16l + 15 - (TAG_WORDS - 1 - k)` of the result.
    #[inline]
    #[cfg_attr(
        all(target_arch = "x86_64", target_feature = "sse2", not(loom), not(miri)),
        allow(dead_code)
    )]
    fn matches_swar(&self, h: u64) -> u64 {
        let pattern = u64::from(tag_of(h)) * LANES_LOW;
        let mut m = 0;
        for (k, word) in self.tags.iter().enumerate() {
            let x = word.load(Ordering::Relaxed) ^ pattern;
            // A lane's top bit ends up set iff the lane is non-zero (no carry crosses lanes).
            let nonzero = ((x & !LANES_TOP) + !LANES_TOP) | x;
            m |= (!nonzero & LANES_TOP) >> (TAG_WORDS - 1 - k);
        }
        m
    }
}

/// The tag entries of a hash's mapping carry: its top 16 bits, the top one replaced by
/// [`TAG_USED`].
#[inline]
fn tag_of(h: u64) -> u16 {
    #[allow(clippy::cast_possible_truncation)] // the top 16 bits
    let t = (h >> 48) as u16;
    t | TAG_USED
}

/// The entry a bit of [`Bucket::matches`] stands for.
#[inline]
fn entry_of(bit: u32) -> usize {
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2", not(loom), not(miri)))]
    {
        bit as usize >> 1
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "sse2", not(loom), not(miri))))]
    {
        entry_of_swar(bit)
    }
}

/// The entry a bit of [`Bucket::matches_swar`] stands for.
#[inline]
#[cfg_attr(
    all(target_arch = "x86_64", target_feature = "sse2", not(loom)),
    allow(dead_code)
)]
fn entry_of_swar(bit: u32) -> usize {
    let (lane, word) = (bit as usize >> 4, (bit as usize & 15) + TAG_WORDS - 16);
    4 * word + lane
}

#[cfg(not(loom))]
const _: () = assert!(core::mem::size_of::<Bucket>() == 64);

#[repr(C, align(64))]
#[derive(Default)]
struct Slot {
    words: [AtomicU64; 8],
}

#[cfg(not(loom))]
const _: () = assert!(core::mem::size_of::<Slot>() == 64);

impl Slot {
    /// A copy of the eight words, racy unless the caller holds the writer lock: a reader validates
    /// it with its bucket's sequence counter.
    #[inline]
    fn load(&self) -> Words {
        #[cfg(all(target_arch = "x86_64", target_feature = "sse2", not(loom), not(miri)))]
        {
            self.load_x86_64()
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "sse2", not(loom), not(miri))))]
        {
            self.load_words()
        }
    }

    /// The portable copy: eight relaxed word loads.
    #[inline]
    #[cfg_attr(
        all(target_arch = "x86_64", target_feature = "sse2", not(loom), not(miri)),
        allow(dead_code)
    )]
    fn load_words(&self) -> Words {
        let mut w = [0u64; 8];
        for (dst, src) in w.iter_mut().zip(self.words.iter()) {
            *dst = src.load(Ordering::Relaxed);
        }
        w
    }

    /// The descriptor as one copy: four 16-byte loads of the (64-byte aligned) slot and four
    /// stores, instead of eight word loads held in registers. What each aligned 16-byte load reads
    /// is at least what a pair of relaxed 8-byte atomic loads would read: Intel and AMD document
    /// aligned 16-byte SSE loads as atomic on processors with AVX, and on older ones each aligned
    /// 8-byte part is read in one access in practice. The seqlock needs no more: a copy that
    /// overlapped a write window is discarded. Only where SSE2 is enabled for the target.
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2", not(loom), not(miri)))]
    #[inline]
    fn load_x86_64(&self) -> Words {
        use core::arch::x86_64::__m128i;
        let (a, b, c, d): (__m128i, __m128i, __m128i, __m128i);
        // SAFETY: `src` is this slot: 64 readable bytes aligned to 64. The asm only loads them into
        // the four xmm registers it declares as outputs; it touches no other memory, no stack and
        // no flags. The slot's words are atomics that writers may store concurrently: the loads
        // are plain hardware loads, each 8-byte half of which is single-copy atomic, i.e. what
        // relaxed `AtomicU64` loads return (see `load_words`), so no torn word is ever read and
        // nothing the compiler assumed is broken; a copy taken during a write window is rejected by
        // the caller's validation.
        unsafe {
            core::arch::asm!(
                "movdqa {a}, xmmword ptr [{src}]",
                "movdqa {b}, xmmword ptr [{src} + 16]",
                "movdqa {c}, xmmword ptr [{src} + 32]",
                "movdqa {d}, xmmword ptr [{src} + 48]",
                src = in(reg) self.words.as_ptr(),
                a = out(xmm_reg) a,
                b = out(xmm_reg) b,
                c = out(xmm_reg) c,
                d = out(xmm_reg) d,
                options(nostack, preserves_flags, readonly),
            );
        }
        // SAFETY: four 16-byte vectors are 64 bytes, and every bit pattern is a valid `[u64; 8]`.
        unsafe { core::mem::transmute::<[__m128i; 4], Words>([a, b, c, d]) }
    }

    fn store(&self, w: &Words) {
        for (dst, src) in self.words.iter().zip(w.iter()) {
            dst.store(*src, Ordering::Relaxed);
        }
    }
}

#[repr(align(64))]
struct CachePadded<T>(T);

/// State only writers touch, guarded by the writer lock.
struct Writer {
    /// Slots ever handed out (the high-water mark).
    next_slot: u32,
    /// 1 + index of the first free slot, chained through word 0 of free slots.
    free_slot: u32,
    /// Overflow buckets ever handed out.
    next_overflow: u32,
    /// 1 + index of the first free overflow bucket, chained through `next`.
    free_overflow: u32,
    len: usize,
    overflow_in_use: usize,
    /// Slots whose generation is used up: never reused (see `remove`).
    retired_slots: usize,
}

/// What a walk holds while it runs: the note's `lock` argument of `vm_map_map_do_for_all`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkLock {
    /// Hold the writer lock for the whole walk: writers wait until it ends; changes the callback
    /// makes are stored. The note's `lock != 0`.
    Map,
    /// Hold the writer lock only while visiting each bucket group (a handful of pages): writers
    /// interleave between groups; changes the callback makes are stored.
    Page,
    /// Hold nothing: the callback sees consistent copies, and its changes are discarded. Mappings
    /// present for the whole walk are visited exactly once; ones added or removed meanwhile may or
    /// may not be. The note's `lock == 0`.
    None,
}

/// Errors of the page table.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PageTableError {
    /// Every slot handle is in use.
    #[error(
        "page table is full: it holds at most {limit} mappings; unmap pages before mapping more"
    )]
    CapacityExceeded {
        /// The most mappings one table can hold.
        limit: u64,
    },
}

/// Sizes and memory of a table, for tests, docs and benchmarks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TableStats {
    /// Mappings held.
    pub mappings: usize,
    /// Primary buckets.
    pub buckets: u64,
    /// Overflow buckets linked into chains.
    pub overflow_buckets: usize,
    /// Descriptor slots allocated (live, free, retired and not yet used).
    pub slot_capacity: usize,
    /// Slots retired because their 15-bit generation was used up (one per 32,767 mappings made in
    /// the same slot); they are never reused, so a stale [`crate::PageHandle`] never resolves.
    pub retired_slots: usize,
    /// Heap bytes held by the table.
    pub heap_bytes: usize,
    /// The part of `heap_bytes` in huge-page chunks mapped straight from the OS (`std` builds on
    /// Linux, past the first 2 MiB of an array): a counting global allocator does not see it.
    pub chunk_bytes: usize,
}

impl TableStats {
    /// Heap bytes per mapping (0 for an empty table).
    pub fn bytes_per_mapping(&self) -> f64 {
        if self.mappings == 0 {
            0.0
        } else {
            self.heap_bytes as f64 / self.mappings as f64
        }
    }
}

/// A concurrent hashed page table for 64-bit virtual addresses.
///
/// `H` is the hash function and `L` the writers' lock kind (see [`crate::hash`] and
/// [`crate::lock`]). Readers ([`get_page`](Self::get_page), [`handle`](Self::handle),
/// [`get_by_handle`](Self::get_by_handle), [`for_each`](Self::for_each) with [`WalkLock::None`])
/// never wait for each other or take the writer lock.
pub struct PageTable<H: VpnHasher = DefaultHash, L: lock_api::RawMutex = DefaultLock> {
    /// Linear-hashing shape: the number of primary buckets (only grows), as a [`Shape`] word.
    shape: CachePadded<AtomicU64>,
    /// Mirrors of writer state that readers may look at.
    len: CachePadded<AtomicUsize>,
    overflow_high: AtomicU32,
    buckets: SegVec<Bucket, BUCKET_SEG_SHIFT>,
    overflow: SegVec<Bucket, BUCKET_SEG_SHIFT>,
    slots: SegVec<Slot, SLOT_SEG_SHIFT>,
    /// On a cache line of its own: writers store the lock word (and, with `std`, its owner) at
    /// every operation, which must not invalidate the line readers take the directories from.
    writer: CachePadded<WriterMutex<L, Writer>>,
    hasher: H,
    page_size: PageSize,
}

impl PageTable {
    /// An empty table of 4 KiB pages with the default hash and writer lock (`vm_map_map_init`).
    pub fn new() -> Self {
        Self::with_config(PageSize::KIB_4, 0)
    }

    /// An empty table of 4 KiB pages sized for `mappings` without growing.
    pub fn with_capacity(mappings: usize) -> Self {
        Self::with_config(PageSize::KIB_4, mappings)
    }
}

impl Default for PageTable {
    fn default() -> Self {
        Self::new()
    }
}

impl<H: VpnHasher, L: lock_api::RawMutex> fmt::Debug for PageTable<H, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageTable")
            .field("len", &self.len())
            .field("buckets", &Shape(self.shape.0.load(Ordering::Relaxed)).n())
            .field("page_size", &self.page_size.bytes())
            .finish()
    }
}

#[inline]
fn bucket_index(h: u64, n: u64) -> usize {
    let level = 63 - n.leading_zeros();
    let low = 1u64 << level;
    let b = h & (low - 1);
    let b = if b < n - low { h & ((low << 1) - 1) } else { b };
    // `b < n`, and `n` never exceeds the bucket array's length, which fits in usize.
    b as usize
}

/// The linear-hashing shape as readers load it: `n` buckets stored as the mask of the round's
/// power of two (low 32 bits) and how many buckets of the round were split (high 32 bits), so a
/// reader finds its bucket with an `and`, a compare and a conditional move ([`Shape::bucket`],
/// the same index as [`bucket_index`]). One word, so readers compare shapes as words.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Shape(u64);

impl Shape {
    fn of(n: u64) -> Shape {
        let low = 1u64 << (63 - n.leading_zeros());
        debug_assert!(low <= 1 << 31, "bucket count {n} beyond the shape word");
        Shape((low - 1) | ((n - low) << 32))
    }

    fn n(self) -> u64 {
        (self.0 & 0xffff_ffff) + 1 + (self.0 >> 32)
    }

    #[inline]
    fn bucket(self, h: u64) -> usize {
        let mask = self.0 & 0xffff_ffff;
        let b = h & mask;
        let b = if b < self.0 >> 32 {
            h & (2 * mask + 1)
        } else {
            b
        };
        // `b < n`, and `n` never exceeds the bucket array's length, which fits in usize.
        b as usize
    }
}

// Writers are serialised by the writer lock, so a plain load and store would do; the bumps are
// read-modify-writes so that loom's partial-order reduction sees them conflict with the readers'
// loads (it tracks the last access to each atomic, and a writer's own load would hide them).
fn write_begin(b: &Bucket) {
    let s = b.seq.fetch_add(1, Ordering::Relaxed);
    debug_assert!(s & 1 == 0, "nested write window");
    fence(Ordering::Release);
}

fn write_end(b: &Bucket) {
    b.seq.fetch_add(1, Ordering::Release);
}

/// Which entry a reader or writer is looking for. A trait rather than an enum so that each
/// lookup is compiled for its own kind of key, with nothing to pack or match at run time.
trait Key: Copy {
    /// Whether an entry whose tag matched may be this key.
    fn handle_may_match(&self, handle: u32) -> bool;
    /// Whether a slot's words are this key's live mapping.
    fn words_match(&self, w: &Words) -> bool;
}

/// The mapping of this page-aligned address, found by tag.
#[derive(Clone, Copy)]
struct AddrKey {
    vaddr: u64,
}

impl Key for AddrKey {
    #[inline]
    fn handle_may_match(&self, _: u32) -> bool {
        true
    }

    #[inline]
    fn words_match(&self, w: &Words) -> bool {
        // No test of the live bit: in any state between two write windows, every entry of a chain
        // names a live slot (a remove clears the entry and the live bit in the same window), and
        // readers return only what validated against such a state.
        w[0] == self.vaddr
    }
}

/// A handle: this slot, this address, this generation.
#[derive(Clone, Copy)]
struct HandleKey {
    vaddr: u64,
    slot: u32,
    gen: u16,
}

impl Key for HandleKey {
    #[inline]
    fn handle_may_match(&self, handle: u32) -> bool {
        handle == self.slot + 1
    }

    #[inline]
    fn words_match(&self, w: &Words) -> bool {
        w[0] == self.vaddr && is_live(w) && u64::from(meta_of(w)) & GEN_MASK == u64::from(self.gen)
    }
}

/// A position in a chain, seen by a writer.
struct Found<'a> {
    bucket: &'a Bucket,
    entry: usize,
    slot: u32,
}

/// The end of a chain, seen by a writer.
struct ChainEnd<'a> {
    /// The bucket before `last`, when `last` is an overflow bucket.
    prev: Option<&'a Bucket>,
    last: &'a Bucket,
    /// `last`'s overflow index, when it is one.
    last_overflow: Option<u32>,
    /// Entries used in `last`.
    used: usize,
}

impl<H: VpnHasher, L: lock_api::RawMutex> PageTable<H, L> {
    /// An empty table for pages of `page_size`, sized for `mappings` without growing.
    pub fn with_config(page_size: PageSize, mappings: usize) -> Self {
        let table = PageTable {
            shape: CachePadded(AtomicU64::new(Shape::of(MIN_BUCKETS).0)),
            len: CachePadded(AtomicUsize::new(0)),
            overflow_high: AtomicU32::new(0),
            buckets: SegVec::new(),
            overflow: SegVec::new(),
            slots: SegVec::new(),
            writer: CachePadded(WriterMutex::new(Writer {
                next_slot: 0,
                free_slot: 0,
                next_overflow: 0,
                free_overflow: 0,
                len: 0,
                overflow_in_use: 0,
                retired_slots: 0,
            })),
            hasher: H::default(),
            page_size,
        };
        let mut want = (mappings as u64).div_ceil(TARGET_LOAD).max(MIN_BUCKETS);
        let max_buckets = SegVec::<Bucket, BUCKET_SEG_SHIFT>::max_len() as u64;
        want = want.min(max_buckets);
        // Both reservations are capped at what the arrays can name, so they cannot fail.
        table.buckets.reserve(want as usize);
        table.slots.reserve(mappings.min(MAX_SLOTS as usize));
        if want > MIN_BUCKETS {
            // Splitting empty buckets moves nothing; publish the shape directly.
            table.shape.0.store(Shape::of(want).0, Ordering::Release);
        }
        table
    }

    /// The page size this table maps.
    pub fn page_size(&self) -> PageSize {
        self.page_size
    }

    /// The number of primary buckets (writers, walks and statistics).
    fn buckets_now(&self) -> u64 {
        Shape(self.shape.0.load(Ordering::Relaxed)).n()
    }

    /// A fresh descriptor for the page containing `vaddr` (`vm_map_page_init`). It is not stored
    /// until it is passed to [`set_page`](Self::set_page).
    pub fn page_init(&self, vaddr: VirtAddr) -> Page {
        Page::new(self.page_size.align_down(vaddr))
    }

    /// How many mappings the table holds.
    pub fn len(&self) -> usize {
        self.len.0.load(Ordering::Relaxed)
    }

    /// True if the table holds no mapping.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sizes and heap bytes.
    pub fn stats(&self) -> TableStats {
        let w = self.writer.0.lock();
        TableStats {
            mappings: w.len,
            buckets: self.buckets_now(),
            overflow_buckets: w.overflow_in_use,
            slot_capacity: self.slots.capacity(),
            retired_slots: w.retired_slots,
            heap_bytes: self.buckets.heap_bytes()
                + self.overflow.heap_bytes()
                + self.slots.heap_bytes()
                + core::mem::size_of::<Self>(),
            chunk_bytes: self.buckets.chunk_bytes()
                + self.overflow.chunk_bytes()
                + self.slots.chunk_bytes(),
        }
    }

    #[inline]
    fn hash_key(&self, vaddr: VirtAddr) -> (u64, u64) {
        let vpn = self.page_size.vpn(vaddr);
        let vaddr = self.page_size.addr(vpn);
        // The low bits of the hash pick the bucket, the top ones are the tag (`tag_of`).
        (vaddr.0, self.hasher.hash(vpn.0))
    }

    #[inline]
    fn overflow_bucket(&self, link: u32) -> Option<&Bucket> {
        self.overflow.get(link.checked_sub(1)? as usize)
    }

    // ----------------------------------------------------------------------------------------
    // Readers

    /// Lock-free: the slot and words of the entry `key` in the chain for hash `h`.
    ///
    /// The common case inline: the first tag match in the primary bucket is the mapping, or no
    /// tag matches and the bucket has no overflow chain (a miss). Everything else goes out of line
    /// to [`read_slow`](Self::read_slow), so the hot path keeps no loop and no value live across a
    /// call: a bucket mid-write or a stale shape, a copy that fails validation (both retried after
    /// a `spin_wait`, as `read_slow` retries), and a validated read the primary bucket did not
    /// settle (an overflow chain, a tag match that is another page; see
    /// [`read_unsettled`](Self::read_unsettled)). Both paths follow the same seqlock protocol.
    #[inline]
    fn read<K: Key>(&self, h: u64, key: K) -> Option<(u32, Words)> {
        match self.try_read(h, key) {
            Ok(found) => found,
            Err((head, s1)) => self.read_unsettled(h, key, head, s1),
        }
    }

    /// [`read`](Self::read)'s inline part: the answer, or the bucket and counter value to go on
    /// from out of line.
    #[inline]
    #[allow(clippy::type_complexity)]
    fn try_read<K: Key>(&self, h: u64, key: K) -> Result<Option<(u32, Words)>, (&Bucket, u32)> {
        let shape = self.shape.0.load(Ordering::Acquire);
        // SAFETY: the shape was acquired, and it names only buckets reserved before it was stored
        // (`with_config`, `grow`).
        let head = unsafe { self.buckets.get_published(Shape(shape).bucket(h)) };
        let s1 = head.seq.load(Ordering::Acquire);
        // As in `read_slow`: an odd counter is a write in progress, a moved shape a split.
        if s1 & 1 != 0 || self.shape.0.load(Ordering::Relaxed) != shape {
            return Err((head, s1));
        }
        let m = head.matches(h);
        if m != 0 {
            // `entry_of` is below BUCKET_SLOTS (a power of two); the mask spares a bounds check.
            let i = entry_of(m.trailing_zeros()) & (BUCKET_SLOTS - 1);
            let handle = head.handles[i].load(Ordering::Relaxed);
            if key.handle_may_match(handle) {
                if let Some(slot) = self.slots.get(handle.wrapping_sub(1) as usize) {
                    let w = slot.load();
                    if key.words_match(&w) {
                        fence(Ordering::Acquire);
                        if head.seq.load(Ordering::Relaxed) == s1 {
                            return Ok(Some((handle - 1, w)));
                        }
                    }
                }
            }
        } else if head.next.load(Ordering::Relaxed) == 0 {
            // No entry of the chain has this tag, and there is no more chain.
            fence(Ordering::Acquire);
            if head.seq.load(Ordering::Relaxed) == s1 {
                return Ok(None);
            }
        }
        Err((head, s1))
    }

    /// [`read`](Self::read) read `head` from counter value `s1` on and did not find the answer
    /// there (one function for every case, so the hot path has one call to make). Validates
    /// first: if what it read was a state between write windows, the chain (or another match)
    /// holds the answer and [`read_slow`](Self::read_slow) reads on at once; otherwise — a write
    /// in progress, a counter that moved — this is a retry like any other, after a `spin_wait`.
    /// (Validating a second time is harmless: a counter that moved never comes back. A shape that
    /// moved under an unchanged counter is retried at once, as `read_slow` does.) So no path
    /// copies a slot again before the copy it took was validated or given up, as in `read_slow`.
    #[cold]
    #[inline(never)]
    fn read_unsettled<K: Key>(
        &self,
        h: u64,
        key: K,
        head: &Bucket,
        s1: u32,
    ) -> Option<(u32, Words)> {
        fence(Ordering::Acquire);
        if s1 & 1 != 0 || head.seq.load(Ordering::Relaxed) != s1 {
            spin_wait();
        }
        self.read_slow(h, key)
    }

    /// [`read`](Self::read)'s general case: the whole chain, retried until a validated copy.
    #[cold]
    #[inline(never)]
    fn read_slow<K: Key>(&self, h: u64, key: K) -> Option<(u32, Words)> {
        loop {
            let shape = self.shape.0.load(Ordering::Acquire);
            // SAFETY: as in `read`: the acquired shape names only reserved buckets.
            let head = unsafe { self.buckets.get_published(Shape(shape).bucket(h)) };
            let s1 = head.seq.load(Ordering::Acquire);
            if s1 & 1 != 0 {
                spin_wait();
                continue;
            }
            // A split publishes the new shape before it closes the source bucket's window; having
            // acquired that close, a stale shape here means our bucket choice may be stale too.
            if self.shape.0.load(Ordering::Relaxed) != shape {
                continue;
            }
            let found = self.scan(head, h, key);
            fence(Ordering::Acquire);
            if head.seq.load(Ordering::Relaxed) == s1 {
                return found;
            }
            spin_wait();
        }
    }

    /// Racy scan of a chain; only meaningful if the head's sequence did not move meanwhile.
    #[inline]
    fn scan(&self, head: &Bucket, h: u64, key: impl Key) -> Option<(u32, Words)> {
        let limit = self.overflow_high.load(Ordering::Relaxed);
        let mut bucket = head;
        let mut hops = 0u32;
        loop {
            let mut m = bucket.matches(h);
            while m != 0 {
                // `entry_of` is below BUCKET_SLOTS (a power of two); the mask spares a bounds check.
                let i = entry_of(m.trailing_zeros()) & (BUCKET_SLOTS - 1);
                m &= m - 1;
                let handle = bucket.handles[i].load(Ordering::Relaxed);
                if !key.handle_may_match(handle) {
                    continue;
                }
                if let Some(slot) = self.slots.get(handle.wrapping_sub(1) as usize) {
                    let w = slot.load();
                    if key.words_match(&w) {
                        return Some((handle - 1, w));
                    }
                }
            }
            let next = bucket.next.load(Ordering::Relaxed);
            if next == 0 || hops >= limit {
                return None;
            }
            hops += 1;
            bucket = self.overflow_bucket(next)?;
        }
    }

    /// A copy of the descriptor of the page containing `vaddr` (`get_page`), or `None` if it is
    /// not mapped. Never blocks and never takes the writer lock.
    #[inline]
    pub fn get_page(&self, vaddr: VirtAddr) -> Option<Page> {
        let (vaddr, h) = self.hash_key(vaddr);
        let key = AddrKey { vaddr };
        // `try_read` and the out-of-line rest apart (not `read`): so the compiler keeps the inline
        // answer in registers rather than merging it with the rest's in memory.
        match self.try_read(h, key) {
            Ok(found) => found.map(|(_, w)| Page::from_words(&w)),
            Err((head, s1)) => self.get_page_unsettled(h, key, head, s1),
        }
    }

    /// [`get_page`](Self::get_page)'s out-of-line rest.
    #[cold]
    #[inline(never)]
    fn get_page_unsettled(&self, h: u64, key: AddrKey, head: &Bucket, s1: u32) -> Option<Page> {
        self.read_unsettled(h, key, head, s1)
            .map(|(_, w)| Page::from_words(&w))
    }

    /// The stable handle of the mapping of the page containing `vaddr`.
    pub fn handle(&self, vaddr: VirtAddr) -> Option<PageHandle> {
        let (aligned, h) = self.hash_key(vaddr);
        self.read(h, AddrKey { vaddr: aligned })
            .map(|(slot, w)| self.handle_of(slot, &w))
    }

    /// A copy of the descriptor `handle` names, or `None` if that mapping no longer exists (even
    /// if the same address was mapped again since).
    pub fn get_by_handle(&self, handle: PageHandle) -> Option<Page> {
        let (vaddr, h) = self.hash_key(self.page_size.addr(handle.vpn));
        self.read(
            h,
            HandleKey {
                vaddr,
                slot: handle.slot,
                gen: handle.gen,
            },
        )
        .map(|(_, w)| Page::from_words(&w))
    }

    fn handle_of(&self, slot: u32, w: &Words) -> PageHandle {
        #[allow(clippy::cast_possible_truncation)] // GEN_MASK is 15 bits
        let gen = (u64::from(meta_of(w)) & GEN_MASK) as u16;
        PageHandle {
            vpn: self.page_size.vpn(VirtAddr(w[0])),
            slot,
            gen,
        }
    }

    // ----------------------------------------------------------------------------------------
    // Writer helpers (the writer lock is held)

    fn head(&self, h: u64) -> &Bucket {
        let n = self.buckets_now();
        match self.buckets.get(bucket_index(h, n)) {
            Some(b) => b,
            // The shape never names a bucket that was not allocated first.
            None => unreachable!("bucket {} of {n} not allocated", bucket_index(h, n)),
        }
    }

    fn slot(&self, slot: u32) -> &Slot {
        match self.slots.get(slot as usize) {
            Some(s) => s,
            None => unreachable!("slot {slot} named by a chain is not allocated"),
        }
    }

    fn next_in_chain(&self, b: &Bucket) -> Option<(u32, &Bucket)> {
        let link = b.next.load(Ordering::Relaxed);
        let idx = link.checked_sub(1)?;
        self.overflow.get(idx as usize).map(|b| (idx, b))
    }

    fn find<'a>(&'a self, head: &'a Bucket, h: u64, key: impl Key) -> Option<Found<'a>> {
        let mut bucket = head;
        loop {
            for entry in 0..BUCKET_SLOTS {
                let handle = bucket.handles[entry].load(Ordering::Relaxed);
                if handle == 0 {
                    return None;
                }
                if bucket.tag(entry) == tag_of(h)
                    && key.handle_may_match(handle)
                    && key.words_match(&self.slot(handle - 1).load())
                {
                    return Some(Found {
                        bucket,
                        entry,
                        slot: handle - 1,
                    });
                }
            }
            bucket = self.next_in_chain(bucket)?.1;
        }
    }

    fn chain_end<'a>(&'a self, head: &'a Bucket) -> ChainEnd<'a> {
        let mut end = ChainEnd {
            prev: None,
            last: head,
            last_overflow: None,
            used: 0,
        };
        loop {
            let used = end
                .last
                .handles
                .iter()
                .take_while(|h| h.load(Ordering::Relaxed) != 0)
                .count();
            if used < BUCKET_SLOTS {
                end.used = used;
                return end;
            }
            match self.next_in_chain(end.last) {
                Some((idx, next)) => {
                    end = ChainEnd {
                        prev: Some(end.last),
                        last: next,
                        last_overflow: Some(idx),
                        used: 0,
                    };
                }
                None => {
                    end.used = used;
                    return end;
                }
            }
        }
    }

    fn alloc_overflow(&self, w: &mut Writer) -> Result<u32, PageTableError> {
        let idx = if let Some(idx) = w.free_overflow.checked_sub(1) {
            let b = self
                .overflow_bucket(w.free_overflow)
                .unwrap_or_else(|| unreachable!("free overflow bucket"));
            w.free_overflow = b.next.load(Ordering::Relaxed);
            idx
        } else {
            let idx = w.next_overflow;
            if u64::from(idx) >= MAX_SLOTS || !self.overflow.reserve(idx as usize + 1) {
                return Err(PageTableError::CapacityExceeded { limit: MAX_SLOTS });
            }
            w.next_overflow += 1;
            // Readers bound chain walks by this; it must cover every bucket before it is linked.
            self.overflow_high.store(w.next_overflow, Ordering::Relaxed);
            idx
        };
        w.overflow_in_use += 1;
        Ok(idx)
    }

    /// Clears an unlinked overflow bucket and puts it on the free list. Callers are inside the
    /// write window of the chain it belonged to.
    fn free_overflow(&self, w: &mut Writer, idx: u32, b: &Bucket) {
        for i in 0..BUCKET_SLOTS {
            b.set_entry(i, 0, 0);
        }
        b.next.store(w.free_overflow, Ordering::Relaxed);
        w.free_overflow = idx + 1;
        w.overflow_in_use -= 1;
    }

    fn alloc_slot(&self, w: &mut Writer) -> Result<u32, PageTableError> {
        if let Some(idx) = w.free_slot.checked_sub(1) {
            // Free slots are chained through word 0 (1 + next free index).
            #[allow(clippy::cast_possible_truncation)]
            let next = self.slot(idx).words[0].load(Ordering::Relaxed) as u32;
            w.free_slot = next;
            return Ok(idx);
        }
        let idx = w.next_slot;
        if u64::from(idx) >= MAX_SLOTS || !self.slots.reserve(idx as usize + 1) {
            return Err(PageTableError::CapacityExceeded { limit: MAX_SLOTS });
        }
        w.next_slot += 1;
        Ok(idx)
    }

    /// Appends an entry at the end of a chain whose end is `end`, linking `spare` (an overflow
    /// bucket the caller allocated) if the last bucket is full. Inside the chain's write window.
    fn append(
        &self,
        w: &mut Writer,
        end: &ChainEnd<'_>,
        tag: u16,
        handle: u32,
        spare: Option<u32>,
    ) {
        if end.used < BUCKET_SLOTS {
            end.last.set_entry(end.used, tag, handle);
            if let Some(idx) = spare {
                // Not needed after all: give it back.
                let b = self
                    .overflow
                    .get(idx as usize)
                    .unwrap_or_else(|| unreachable!("spare bucket"));
                self.free_overflow(w, idx, b);
            }
            return;
        }
        let idx =
            spare.unwrap_or_else(|| unreachable!("caller allocates a spare for a full chain"));
        let b = self
            .overflow
            .get(idx as usize)
            .unwrap_or_else(|| unreachable!("spare bucket"));
        b.next.store(0, Ordering::Relaxed);
        b.set_entry(0, tag, handle);
        for i in 1..BUCKET_SLOTS {
            b.set_entry(i, 0, 0);
        }
        end.last.next.store(idx + 1, Ordering::Relaxed);
    }

    // ----------------------------------------------------------------------------------------
    // Writers

    /// Stores `page` under its address (`set_page`): inserts a new mapping or replaces the
    /// descriptor of an existing one, which keeps its handle. `page.vaddr` is rounded down to its
    /// page. Waits for the writer lock (and so for a [`WalkLock::Map`] walk).
    pub fn set_page(&self, page: Page) -> Result<PageHandle, PageTableError> {
        let (vaddr, h) = self.hash_key(page.vaddr);
        let page = Page {
            vaddr: VirtAddr(vaddr),
            ..page
        };
        let mut w = self.writer.0.lock();
        let head = self.head(h);
        if let Some(found) = self.find(head, h, AddrKey { vaddr }) {
            let slot = self.slot(found.slot);
            let meta = meta_of(&slot.load());
            write_begin(head);
            slot.store(&page.to_words(meta));
            write_end(head);
            return Ok(self.handle_of(found.slot, &page.to_words(meta)));
        }
        let end = self.chain_end(head);
        let spare = if end.used == BUCKET_SLOTS {
            Some(self.alloc_overflow(&mut w)?)
        } else {
            None
        };
        let slot_idx = match self.alloc_slot(&mut w) {
            Ok(s) => s,
            Err(e) => {
                if let Some(idx) = spare {
                    let b = self
                        .overflow
                        .get(idx as usize)
                        .unwrap_or_else(|| unreachable!("spare bucket"));
                    self.free_overflow(&mut w, idx, b);
                }
                return Err(e);
            }
        };
        let slot = self.slot(slot_idx);
        let old_gen = u64::from(meta_of(&slot.load())) & GEN_MASK;
        // `remove` retires a slot at the last generation, so a reused slot's generation only
        // grows and never comes back to one a stale handle may carry.
        debug_assert!(
            old_gen < GEN_MASK,
            "slot {slot_idx} reused past its last generation"
        );
        #[allow(clippy::cast_possible_truncation)] // 16 bits: live bit and 15-bit generation
        let meta = ((LIVE_BIT >> META_SHIFT) | ((old_gen + 1) & GEN_MASK)) as u16;
        let words = page.to_words(meta);
        write_begin(head);
        slot.store(&words);
        self.append(&mut w, &end, tag_of(h), slot_idx + 1, spare);
        write_end(head);
        w.len += 1;
        self.len.0.store(w.len, Ordering::Relaxed);
        self.grow(&mut w);
        Ok(self.handle_of(slot_idx, &words))
    }

    /// Applies `f` to the descriptor of the page containing `vaddr` and stores the result, as
    /// one atomic read-modify-write. `None` if the page is not mapped. The key (`vaddr`) cannot be
    /// changed by `f`.
    pub fn update<R>(&self, vaddr: VirtAddr, f: impl FnOnce(&mut Page) -> R) -> Option<R> {
        let (vaddr, h) = self.hash_key(vaddr);
        self.update_key(h, AddrKey { vaddr }, f)
    }

    /// [`update`](Self::update) through a handle: `None` if its mapping no longer exists.
    pub fn update_by_handle<R>(
        &self,
        handle: PageHandle,
        f: impl FnOnce(&mut Page) -> R,
    ) -> Option<R> {
        let (vaddr, h) = self.hash_key(self.page_size.addr(handle.vpn));
        self.update_key(
            h,
            HandleKey {
                vaddr,
                slot: handle.slot,
                gen: handle.gen,
            },
            f,
        )
    }

    fn update_key<R>(&self, h: u64, key: impl Key, f: impl FnOnce(&mut Page) -> R) -> Option<R> {
        let _w = self.writer.0.lock();
        let head = self.head(h);
        let found = self.find(head, h, key)?;
        Some(self.modify(head, self.slot(found.slot), f))
    }

    /// Runs `f` on a copy of `slot` and stores it back if it changed. Writer lock held.
    fn modify<R>(&self, head: &Bucket, slot: &Slot, f: impl FnOnce(&mut Page) -> R) -> R {
        let words = slot.load();
        let before = Page::from_words(&words);
        let mut page = before;
        let r = f(&mut page);
        page.vaddr = before.vaddr;
        if page != before {
            write_begin(head);
            slot.store(&page.to_words(meta_of(&words)));
            write_end(head);
        }
        r
    }

    /// Removes the mapping of the page containing `vaddr` and returns its last descriptor.
    pub fn remove(&self, vaddr: VirtAddr) -> Option<Page> {
        let (vaddr, h) = self.hash_key(vaddr);
        let mut w = self.writer.0.lock();
        let head = self.head(h);
        let found = self.find(head, h, AddrKey { vaddr })?;
        let end = self.chain_end(head);
        let slot = self.slot(found.slot);
        let words = slot.load();
        // The last entry of the chain fills the hole, keeping entries packed.
        let last = end.used - 1;
        write_begin(head);
        if !(core::ptr::eq(found.bucket, end.last) && found.entry == last) {
            found.bucket.set_entry(
                found.entry,
                end.last.tag(last),
                end.last.handles[last].load(Ordering::Relaxed),
            );
        }
        end.last.set_entry(last, 0, 0);
        if last == 0 {
            if let (Some(prev), Some(idx)) = (end.prev, end.last_overflow) {
                prev.next.store(0, Ordering::Relaxed);
                self.free_overflow(&mut w, idx, end.last);
            }
        }
        // Dead: live bit cleared (generation kept). A slot whose generation is used up is retired
        // (never reused: a wrapped generation would let a stale handle resolve to a later
        // mapping); any other goes on the free list, linked through word 0.
        let retire = u64::from(meta_of(&words)) & GEN_MASK == GEN_MASK;
        slot.words[7].store(words[7] & !LIVE_BIT, Ordering::Relaxed);
        if !retire {
            slot.words[0].store(u64::from(w.free_slot), Ordering::Relaxed);
        }
        write_end(head);
        if retire {
            w.retired_slots += 1;
        } else {
            w.free_slot = found.slot + 1;
        }
        w.len -= 1;
        self.len.0.store(w.len, Ordering::Relaxed);
        Some(Page::from_words(&words))
    }

    /// Linear hashing: split one bucket whenever the average load passes the target. Each split
    /// moves one chain (a bounded step), so no operation ever rehashes the whole table.
    fn grow(&self, w: &mut Writer) {
        let n = self.buckets_now();
        if (w.len as u64) <= n * TARGET_LOAD || !self.buckets.reserve(n as usize + 1) {
            return;
        }
        let low = 1u64 << (63 - n.leading_zeros());
        let (src_idx, dst_idx) = ((n - low) as usize, n as usize);
        let (Some(src), Some(dst)) = (self.buckets.get(src_idx), self.buckets.get(dst_idx)) else {
            return;
        };
        // Gather the chain and decide where each entry goes before touching anything.
        let mut stay = Vec::new();
        let mut moved = Vec::new();
        let mut spare = Vec::new();
        let mut bucket = src;
        loop {
            for i in 0..BUCKET_SLOTS {
                let handle = bucket.handles[i].load(Ordering::Relaxed);
                if handle == 0 {
                    break;
                }
                let tag = bucket.tag(i);
                let vaddr = VirtAddr(self.slot(handle - 1).words[0].load(Ordering::Relaxed));
                let h = self.hasher.hash(self.page_size.vpn(vaddr).0);
                if h & low != 0 {
                    moved.push((tag, handle))
                } else {
                    stay.push((tag, handle))
                }
            }
            match self.next_in_chain(bucket) {
                Some((idx, next)) => {
                    spare.push(idx);
                    bucket = next;
                }
                None => break,
            }
        }
        // Two chains never need more overflow buckets than the one they came from; check anyway,
        // before the write windows open, so a failure changes nothing.
        let need = |k: usize| k.max(1).div_ceil(BUCKET_SLOTS) - 1;
        let linked = spare.len();
        while spare.len() < need(stay.len()) + need(moved.len()) {
            match self.alloc_overflow(w) {
                Ok(idx) => spare.push(idx),
                Err(_) => {
                    // Give back only what was allocated here; the chain keeps its own buckets.
                    for idx in spare.drain(linked..) {
                        let b = self
                            .overflow
                            .get(idx as usize)
                            .unwrap_or_else(|| unreachable!("spare"));
                        self.free_overflow(w, idx, b);
                    }
                    return;
                }
            }
        }
        write_begin(src);
        write_begin(dst);
        let mut spare = spare.into_iter();
        self.rebuild(src, &stay, &mut spare);
        self.rebuild(dst, &moved, &mut spare);
        for idx in spare {
            let b = self
                .overflow
                .get(idx as usize)
                .unwrap_or_else(|| unreachable!("spare"));
            self.free_overflow(w, idx, b);
        }
        self.shape.0.store(Shape::of(n + 1).0, Ordering::Release);
        write_end(dst);
        write_end(src);
    }

    /// Rewrites the chain at `head` to hold exactly `entries`, packed, taking overflow buckets
    /// from `spare`. Inside the chain's write window.
    fn rebuild(
        &self,
        head: &Bucket,
        entries: &[(u16, u32)],
        spare: &mut impl Iterator<Item = u32>,
    ) {
        let mut bucket = head;
        let mut chunks = entries.chunks(BUCKET_SLOTS).peekable();
        loop {
            let chunk = chunks.next().unwrap_or(&[]);
            for i in 0..BUCKET_SLOTS {
                let (tag, handle) = chunk.get(i).copied().unwrap_or((0, 0));
                bucket.set_entry(i, tag, handle);
            }
            if chunks.peek().is_none() {
                bucket.next.store(0, Ordering::Relaxed);
                return;
            }
            let idx = spare
                .next()
                .unwrap_or_else(|| unreachable!("spare buckets counted before"));
            bucket.next.store(idx + 1, Ordering::Relaxed);
            bucket = self
                .overflow
                .get(idx as usize)
                .unwrap_or_else(|| unreachable!("spare bucket"));
        }
    }

    // ----------------------------------------------------------------------------------------
    // Walks

    /// Calls `f` once for every mapping (`vm_map_map_do_for_all`); returns how many it visited.
    /// `lock` says what the walk holds and whether `f`'s changes are stored (see [`WalkLock`]).
    ///
    /// # Panics
    /// With [`WalkLock::Map`] or [`WalkLock::Page`], `f` runs with the writer lock held, so it must
    /// not call a writer of this table ([`set_page`](Self::set_page), [`update`](Self::update),
    /// [`update_by_handle`](Self::update_by_handle), [`remove`](Self::remove),
    /// [`stats`](Self::stats), or a locked `for_each`): it would wait for itself. In `std` builds
    /// such a call panics with a message saying so (the walk unwinds and releases the lock); without
    /// `std` it deadlocks. Readers, lock-free walks and other tables are fine.
    pub fn for_each(&self, lock: WalkLock, mut f: impl FnMut(&mut Page)) -> usize {
        match lock {
            WalkLock::Map => {
                let _w = self.writer.0.lock();
                let n = self.buckets_now();
                (0..n as usize)
                    .map(|b| self.visit_chain_locked(b, &mut f))
                    .sum()
            }
            WalkLock::Page => {
                let groups = self.walk_groups();
                let mut visited = 0;
                for g in 0..groups {
                    let _w = self.writer.0.lock();
                    let n = self.buckets_now() as usize;
                    visited += (g..n)
                        .step_by(groups)
                        .map(|b| self.visit_chain_locked(b, &mut f))
                        .sum::<usize>();
                }
                visited
            }
            WalkLock::None => {
                let groups = self.walk_groups();
                let mut copies = Vec::new();
                let mut visited = 0;
                for g in 0..groups {
                    self.read_group(g, groups, &mut copies);
                    for w in &copies {
                        let mut page = Page::from_words(w);
                        f(&mut page);
                    }
                    visited += copies.len();
                }
                visited
            }
        }
    }

    /// Walks go group by group: group `g` is every bucket whose index is `g` modulo the power of
    /// two at or below the bucket count when the walk starts. Splits only move entries within a
    /// group, so a mapping cannot slip from an unvisited group into a visited one.
    fn walk_groups(&self) -> usize {
        let n = Shape(self.shape.0.load(Ordering::Acquire)).n();
        1usize << (63 - n.leading_zeros())
    }

    fn visit_chain_locked(&self, b: usize, f: &mut impl FnMut(&mut Page)) -> usize {
        let Some(head) = self.buckets.get(b) else {
            return 0;
        };
        let mut visited = 0;
        let mut bucket = head;
        loop {
            for i in 0..BUCKET_SLOTS {
                let handle = bucket.handles[i].load(Ordering::Relaxed);
                if handle == 0 {
                    return visited;
                }
                self.modify(head, self.slot(handle - 1), &mut *f);
                visited += 1;
            }
            match self.next_in_chain(bucket) {
                Some((_, next)) => bucket = next,
                None => return visited,
            }
        }
    }

    /// Lock-free consistent copies of every descriptor in group `g`.
    fn read_group(&self, g: usize, groups: usize, out: &mut Vec<Words>) {
        let mut seqs: Vec<(usize, u32)> = Vec::new();
        let in_group = |n: usize| if n > g { (n - g).div_ceil(groups) } else { 0 };
        'retry: loop {
            out.clear();
            seqs.clear();
            let n = Shape(self.shape.0.load(Ordering::Acquire)).n() as usize;
            for b in (g..n).step_by(groups) {
                let Some(head) = self.buckets.get(b) else {
                    continue 'retry;
                };
                let s1 = head.seq.load(Ordering::Acquire);
                if s1 & 1 != 0 {
                    spin_wait();
                    continue 'retry;
                }
                seqs.push((b, s1));
                self.scan_all(head, out);
            }
            // A bucket added to this group since we read the shape means an entry may have moved
            // out of a bucket we read after the move (see `read`).
            if in_group(self.buckets_now() as usize) != in_group(n) {
                continue 'retry;
            }
            fence(Ordering::Acquire);
            for &(b, s1) in &seqs {
                match self.buckets.get(b) {
                    Some(head) if head.seq.load(Ordering::Relaxed) == s1 => {}
                    _ => {
                        spin_wait();
                        continue 'retry;
                    }
                }
            }
            return;
        }
    }

    /// Racy copy of every live descriptor in a chain (validated by the caller).
    fn scan_all(&self, head: &Bucket, out: &mut Vec<Words>) {
        let limit = self.overflow_high.load(Ordering::Relaxed);
        let mut bucket = head;
        let mut hops = 0u32;
        loop {
            for i in 0..BUCKET_SLOTS {
                let handle = bucket.handles[i].load(Ordering::Relaxed);
                if handle == 0 {
                    return;
                }
                if let Some(slot) = self.slots.get((handle - 1) as usize) {
                    let w = slot.load();
                    if is_live(&w) {
                        out.push(w);
                    }
                }
            }
            let next = bucket.next.load(Ordering::Relaxed);
            if next == 0 || hops >= limit {
                return;
            }
            hops += 1;
            let Some(b) = self.overflow_bucket(next) else {
                return;
            };
            bucket = b;
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// The four-lanes-at-a-time tag comparison finds exactly the entries whose tag is equal, with
    /// no false match from a borrow between lanes (tags differing only in the top bit, in one bit,
    /// empty lanes next to matching ones).
    #[test]
    fn bucket_matches_exactly_the_entries_with_the_tag() {
        let b = Bucket::default();
        let tags = [
            0x8000, 0xffff, 0x8001, 0x0000, 0xc000, 0x8000, 0x7fff, 0x0001, 0x4000, 0x8002,
        ];
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..20_000 {
            x = x.rotate_left(17).wrapping_mul(0xff51_afd7_ed55_8ccd) ^ 0x1234_5678;
            let entries: [u16; BUCKET_SLOTS] =
                core::array::from_fn(|i| tags[((x >> (4 * i)) % tags.len() as u64) as usize]);
            for (i, t) in entries.iter().enumerate() {
                b.set_entry(i, *t, u32::from(*t != 0));
            }
            for probe in tags {
                let mut found = 0u32;
                // The tag is the top 16 bits of the hash; the rest must not matter.
                let h = u64::from(probe) << 48 | (x & 0xffff_ffff_ffff);
                let mut m = b.matches(h);
                while m != 0 {
                    found |= 1 << entry_of(m.trailing_zeros());
                    m &= m - 1;
                }
                // The portable comparison, whichever one this target uses.
                let mut portable = 0u32;
                let mut m = b.matches_swar(h);
                while m != 0 {
                    portable |= 1 << entry_of_swar(m.trailing_zeros());
                    m &= m - 1;
                }
                assert_eq!(portable, found);
                // The hash's top bit does not matter either: the tag is always marked used, so an
                // empty entry (tag 0) never matches.
                assert_eq!(tag_of(h), probe | TAG_USED);
                let want = (0..BUCKET_SLOTS)
                    .filter(|i| entries[*i] == probe | TAG_USED)
                    .fold(0u32, |acc, i| acc | 1 << i);
                assert_eq!(found, want, "{entries:x?} probed with {probe:x}");
                assert!((0..BUCKET_SLOTS).all(|i| b.tag(i) == entries[i]));
            }
        }
    }

    /// The one-copy read of a slot returns exactly the words the portable word-by-word read does,
    /// for every word position and bit (the stress test checks it against concurrent writers).
    #[test]
    fn slot_copy_reads_every_word_in_place() {
        let slots: alloc::vec::Vec<Slot> = (0..64).map(|_| Slot::default()).collect();
        for (k, slot) in slots.iter().enumerate() {
            let w: Words = core::array::from_fn(|i| {
                (0x0123_4567_89ab_cdef_u64 ^ (k as u64) << 3).rotate_left(8 * i as u32 + k as u32)
            });
            slot.store(&w);
            assert_eq!(slot.load(), w);
            assert_eq!(slot.load_words(), w);
        }
    }

    /// A slot's generation only ever grows: once it reaches the last 15-bit value, removing the
    /// mapping retires the slot instead of freeing it, so the generation never wraps round to one a
    /// stale handle may still carry.
    #[test]
    fn slot_is_retired_when_its_generation_is_exhausted() {
        let t: PageTable = PageTable::new();
        let a = VirtAddr(0x4000);
        let first = t.set_page(Page::new(a)).expect("insert");
        assert_eq!(u64::from(first.gen), 1);
        let mut last = first;
        while u64::from(last.gen) < GEN_MASK {
            assert!(t.remove(a).is_some());
            let h = t.set_page(Page::new(a)).expect("reinsert");
            assert_eq!(
                h.slot, first.slot,
                "the free slot is reused until it is exhausted"
            );
            assert_eq!(h.gen, last.gen + 1);
            last = h;
        }
        // The slot has carried every generation once; its last mapping goes away.
        assert!(t.remove(a).is_some());
        let next = t.set_page(Page::new(a)).expect("insert after retirement");
        assert_ne!(next.slot, first.slot, "an exhausted slot was reused");
        assert_eq!(next.gen, 1);
        // Neither an old handle of the retired slot nor the first one resolves.
        assert_eq!(t.get_by_handle(first), None);
        assert_eq!(t.get_by_handle(last), None);
        assert_eq!(t.get_by_handle(next), Some(Page::new(a)));
        // The retired slot never comes back, for this address or another one.
        let other = t.set_page(Page::new(VirtAddr(0x8000))).expect("insert");
        assert_ne!(other.slot, first.slot);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn shape_words_name_the_same_buckets_as_the_count() {
        for n in (1..5000u64).chain([1 << 20, (1 << 20) + 12_345, (1 << 31) - 1, 1 << 31]) {
            let s = Shape::of(n);
            assert_eq!(s.n(), n);
            for h in [
                0u64,
                1,
                0x35,
                0xdead_beef_1234_5678,
                u64::MAX,
                n,
                n.wrapping_mul(7919),
            ] {
                assert_eq!(s.bucket(h), bucket_index(h, n), "n {n} h {h:x}");
            }
        }
    }

    #[test]
    fn bucket_index_follows_linear_hashing() {
        // 16 buckets: plain mask.
        assert_eq!(bucket_index(0x35, 16), 0x5);
        // 18 buckets: buckets 0 and 1 were split, so their hashes use one more bit.
        assert_eq!(bucket_index(0x11, 18), 0x11);
        assert_eq!(bucket_index(0x01, 18), 0x01);
        assert_eq!(bucket_index(0x12, 18), 0x2);
        for h in 0..1000u64 {
            for n in 1..200u64 {
                assert!((bucket_index(h, n) as u64) < n);
            }
        }
    }
}
