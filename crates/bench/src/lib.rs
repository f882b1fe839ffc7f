//! # pagesnap-bench
//!
//! What the `pagesnap-bench` binary measures pagesnap against, side by side in one run: the page
//! table against the structures a kernel or runtime would pick instead, the epoch tree against a
//! page-table scan, and snapshots against the raw limit of copying the same bytes into a mapped
//! file. `docs/benchmarks.md` has the latest tables and how to rerun them.

use pagesnap_pagetable::{
    Page, PageFlags, PageSize, PageTable, PhysAddr, VirtAddr, VpnHasher, WriterLock,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A global allocator that counts live heap bytes, for memory per mapping.
#[derive(Debug)]
pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

/// When set, every allocation of 4 MiB or more is advised `MADV_HUGEPAGE` (its 2 MiB-aligned
/// interior) before it is touched: `--huge-baseline` builds hashbrown's array this way, to compare
/// the page table's huge-page chunks with a baseline on huge pages too.
pub static HUGE_ALLOCS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Advises the 2 MiB-aligned interior of `size` bytes at `p` (see [`HUGE_ALLOCS`]).
fn advise_huge(p: *mut u8, size: usize) {
    const HUGE: usize = 2 << 20;
    if p.is_null() || size < 2 * HUGE || !HUGE_ALLOCS.load(Ordering::Relaxed) {
        return;
    }
    let start = (p as usize).next_multiple_of(HUGE);
    let end = (p as usize + size) & !(HUGE - 1);
    if end > start {
        // SAFETY: the range lies inside an allocation just made; the advice changes only the page
        // size backing it, not its contents.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so `System`'s
// guarantees hold; the counter is only bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, forwarded unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
            advise_huge(p, layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
            advise_huge(p, layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller passes a pointer this allocator returned with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract, forwarded unchanged.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

/// Live heap bytes (when [`Counting`] is the global allocator).
pub fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// The deterministic generator for keys and operation mixes (the store's test generator).
pub use pagesnap_store::fault::SplitMix64 as Rng;

/// How mapped page numbers are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Random page numbers over a 48-bit address space.
    Sparse,
    /// Like a process: 16 contiguous regions at random places.
    Clustered,
    /// All addresses agree in their low 20 bits (the 2022 prototype's whole hash).
    Colliding,
}

impl Pattern {
    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Sparse => "sparse",
            Pattern::Clustered => "clustered",
            Pattern::Colliding => "colliding",
        }
    }
}

/// `n` distinct page numbers in `pattern`, and `n` more that are absent (for misses).
pub fn keys(n: usize, pattern: Pattern, seed: u64) -> (Vec<u64>, Vec<u64>) {
    let mut r = Rng(seed);
    let mut set = std::collections::HashSet::with_capacity(2 * n);
    let make = |r: &mut Rng, i: usize| -> u64 {
        match pattern {
            Pattern::Sparse => r.next_u64() & ((1 << 36) - 1),
            Pattern::Clustered => {
                let region = (i % 16) as u64;
                (region * 0x1_0000_0000) / 16
                    + 0x55_5555
                    + (i / 16) as u64
                    + (r.next_u64() & 1) * 0x80_0000
            }
            Pattern::Colliding => (r.next_u64() & ((1 << 28) - 1)) << 8,
        }
    };
    let mut present = Vec::with_capacity(n);
    let mut i = 0;
    while present.len() < n {
        let k = make(&mut r, i);
        i += 1;
        if set.insert(k) {
            present.push(k);
        }
    }
    let mut absent = Vec::with_capacity(n);
    while absent.len() < n {
        let k = make(&mut r, i);
        i += 1;
        if set.insert(k) {
            absent.push(k);
        }
    }
    (present, absent)
}

/// The descriptor stored for page number `vpn`.
#[inline]
pub fn page(vpn: u64, v: u64) -> Page {
    Page {
        vaddr: VirtAddr(vpn << 12),
        paddr: PhysAddr(v << 12),
        flags: PageFlags::PHYS_MEM,
        ..Page::default()
    }
}

/// A page map under test: lookups by page number, copies out.
pub trait Map: Sync {
    /// A copy of the page's descriptor.
    fn get(&self, vpn: u64) -> Option<Page>;
    /// Inserts or replaces (concurrent maps only; others panic).
    fn set(&self, p: Page);
    /// True if `set` may be called from several threads at once.
    fn concurrent(&self) -> bool {
        true
    }
    /// Heap bytes the structure maps straight from the OS, which the counting allocator does not
    /// see (the page table's huge-page chunks).
    fn os_bytes(&self) -> usize {
        0
    }
}

impl<H: VpnHasher, L: WriterLock + Send + Sync> Map for PageTable<H, L> {
    #[inline]
    fn get(&self, vpn: u64) -> Option<Page> {
        self.get_page(VirtAddr(vpn << 12))
    }
    fn set(&self, p: Page) {
        // The bench never fills a table to 2^32 mappings.
        let _ = self.set_page(p);
    }
    fn os_bytes(&self) -> usize {
        self.stats().chunk_bytes
    }
}

/// pagesnap's table with a given hash and lock.
pub fn pagesnap<H: VpnHasher, L: WriterLock + Send + Sync>(keys: &[u64]) -> PageTable<H, L> {
    let t = PageTable::<H, L>::with_config(PageSize::KIB_4, 0);
    for (i, k) in keys.iter().enumerate() {
        t.set(page(*k, i as u64));
    }
    t
}

/// `RwLock<HashMap>` (std hasher).
#[derive(Debug, Default)]
pub struct RwHash(pub parking_lot::RwLock<HashMap<u64, Page>>);
impl Map for RwHash {
    #[inline]
    fn get(&self, vpn: u64) -> Option<Page> {
        self.0.read().get(&vpn).copied()
    }
    fn set(&self, p: Page) {
        self.0.write().insert(p.vaddr.0 >> 12, p);
    }
}

/// dashmap (sharded `RwLock<HashMap>`).
#[derive(Debug, Default)]
pub struct Dash(pub dashmap::DashMap<u64, Page>);
impl Map for Dash {
    #[inline]
    fn get(&self, vpn: u64) -> Option<Page> {
        self.0.get(&vpn).map(|r| *r)
    }
    fn set(&self, p: Page) {
        self.0.insert(p.vaddr.0 >> 12, p);
    }
}

/// papaya (lock-free, epoch-reclaimed).
#[derive(Default)]
pub struct Papaya(pub papaya::HashMap<u64, Page>);
impl std::fmt::Debug for Papaya {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Papaya")
    }
}
impl Map for Papaya {
    #[inline]
    fn get(&self, vpn: u64) -> Option<Page> {
        self.0.pin().get(&vpn).copied()
    }
    fn set(&self, p: Page) {
        self.0.pin().insert(p.vaddr.0 >> 12, p);
    }
}

/// scc's `HashIndex` (read-optimised, lock-free reads).
#[derive(Default)]
pub struct SccIndex(pub scc::HashIndex<u64, Page>);
impl std::fmt::Debug for SccIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SccIndex")
    }
}
impl Map for SccIndex {
    #[inline]
    fn get(&self, vpn: u64) -> Option<Page> {
        self.0.peek_with(&vpn, |_, v| *v)
    }
    fn set(&self, p: Page) {
        let k = p.vaddr.0 >> 12;
        // HashIndex replaces by remove + insert.
        if self.0.insert(k, p).is_err() {
            self.0.remove(&k);
            let _ = self.0.insert(k, p);
        }
    }
}

/// Single-threaded hashbrown, no synchronisation (read-only when shared): the hashed limit.
#[derive(Debug, Default)]
pub struct Brown(pub hashbrown::HashMap<u64, Page>);
impl Map for Brown {
    #[inline]
    fn get(&self, vpn: u64) -> Option<Page> {
        self.0.get(&vpn).copied()
    }
    fn set(&self, _p: Page) {
        unreachable!("hashbrown is measured read-only")
    }
    fn concurrent(&self) -> bool {
        false
    }
}

/// A flat `Vec` indexed by dense page number: the lookup limit. Keys are looked up by their dense
/// index (the bench translates), so it costs one indexed load.
#[derive(Debug, Default)]
pub struct Flat(pub Vec<Page>);
impl Map for Flat {
    #[inline]
    fn get(&self, idx: u64) -> Option<Page> {
        self.0.get(idx as usize).copied()
    }
    fn set(&self, _p: Page) {
        unreachable!("the flat array is measured read-only")
    }
    fn concurrent(&self) -> bool {
        false
    }
}

/// A 4-level radix table like x86-64's: 512 entries per level over a 48-bit address space.
type Leaf = Box<[Option<Page>]>;
type Level3 = Box<[Option<Leaf>]>;
type Level2 = Box<[Option<Level3>]>;

#[derive(Debug, Default)]
pub struct Radix4 {
    root: Vec<Option<Level2>>,
}

impl Radix4 {
    /// An empty table.
    pub fn new() -> Self {
        Radix4 {
            root: (0..512).map(|_| None).collect(),
        }
    }
    fn idx(vpn: u64) -> [usize; 4] {
        [
            (vpn >> 27) as usize & 511,
            (vpn >> 18) as usize & 511,
            (vpn >> 9) as usize & 511,
            vpn as usize & 511,
        ]
    }
    /// Inserts or replaces.
    pub fn insert(&mut self, vpn: u64, p: Page) {
        let [a, b, c, d] = Self::idx(vpn);
        let l2 = self.root[a].get_or_insert_with(|| (0..512).map(|_| None).collect());
        let l3 = l2[b].get_or_insert_with(|| (0..512).map(|_| None).collect());
        let l4 = l3[c].get_or_insert_with(|| (0..512).map(|_| None).collect());
        l4[d] = Some(p);
    }
}

impl Map for Radix4 {
    #[inline]
    fn get(&self, vpn: u64) -> Option<Page> {
        let [a, b, c, d] = Self::idx(vpn);
        self.root[a].as_ref()?[b].as_ref()?[c].as_ref()?[d]
    }
    fn set(&self, _p: Page) {
        unreachable!("the radix table is measured read-only")
    }
    fn concurrent(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_distinct_and_misses_absent() {
        for pattern in [Pattern::Sparse, Pattern::Clustered, Pattern::Colliding] {
            let (present, absent) = keys(10_000, pattern, 1);
            let set: std::collections::HashSet<_> = present.iter().collect();
            assert_eq!(set.len(), 10_000);
            assert!(absent.iter().all(|k| !set.contains(k)));
        }
    }

    #[test]
    fn every_structure_finds_what_it_holds() {
        let (present, absent) = keys(5_000, Pattern::Sparse, 2);
        let t = pagesnap::<pagesnap_pagetable::Fmix64, pagesnap_pagetable::SpinLock>(&present);
        let mut radix = Radix4::new();
        let (rw, dash, pap, scc, mut brown) = (
            RwHash::default(),
            Dash::default(),
            Papaya::default(),
            SccIndex::default(),
            Brown::default(),
        );
        for (i, k) in present.iter().enumerate() {
            let p = page(*k, i as u64);
            radix.insert(*k, p);
            rw.set(p);
            dash.set(p);
            pap.set(p);
            scc.set(p);
            scc.set(p); // replace path
            brown.0.insert(*k, p);
        }
        let maps: [&dyn Map; 7] = [&t, &radix, &rw, &dash, &pap, &scc, &brown];
        for m in maps {
            for (i, k) in present.iter().enumerate() {
                assert_eq!(m.get(*k), Some(page(*k, i as u64)));
            }
            assert!(absent.iter().all(|k| m.get(*k).is_none()));
        }
    }

    #[test]
    fn the_counting_allocator_forwards_and_counts() {
        let layout = Layout::from_size_align(4096, 64).expect("layout");
        let before = live_bytes();
        // SAFETY: a non-zero-size layout, as `alloc_zeroed` requires.
        let p = unsafe { Counting.alloc_zeroed(layout) };
        assert!(!p.is_null());
        // SAFETY: `p` points to 4096 initialised (zeroed) bytes; 4095 is in bounds.
        let last = unsafe { p.wrapping_add(4095).read() };
        assert_eq!(last, 0);
        // SAFETY: `p` came from this allocator with `layout`; the new size is non-zero.
        let p = unsafe { Counting.realloc(p, layout, 8192) };
        assert!(!p.is_null());
        // SAFETY: `p` came from this allocator, now with size 8192 and alignment 64.
        unsafe { Counting.dealloc(p, Layout::from_size_align(8192, 64).expect("layout")) };
        assert_eq!(live_bytes(), before);
    }

    /// `--huge-baseline`'s advice: a large allocation made through the counting allocator while
    /// `HUGE_ALLOCS` is set is advised, and stays an ordinary, writable allocation.
    #[test]
    fn huge_advice_leaves_large_allocations_usable() {
        let len = 8 << 20;
        for zeroed in [false, true] {
            let layout = Layout::from_size_align(len, 64).expect("layout");
            HUGE_ALLOCS.store(true, Ordering::Relaxed);
            let p = if zeroed {
                // SAFETY: a non-zero-size layout, as `alloc_zeroed` requires.
                unsafe { Counting.alloc_zeroed(layout) }
            } else {
                // SAFETY: a non-zero-size layout, as `alloc` requires.
                unsafe { Counting.alloc(layout) }
            };
            HUGE_ALLOCS.store(false, Ordering::Relaxed);
            assert!(!p.is_null());
            // SAFETY: `p` is `len` writable bytes just allocated, referred to by nothing else.
            unsafe { p.write_bytes(0x5a, len) };
            // SAFETY: the same `len` bytes, now initialised.
            let bytes = unsafe { std::slice::from_raw_parts_mut(p, len) };
            bytes[len - 1] = 0xa5;
            assert!(bytes[..len - 1].iter().all(|b| *b == 0x5a) && bytes[len - 1] == 0xa5);
            // SAFETY: `p` came from this allocator with `layout`.
            unsafe { Counting.dealloc(p, layout) };
        }
    }
}
