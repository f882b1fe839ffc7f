//! The batch buffers a space keeps between snapshots are bounded in bytes: after one large
//! snapshot with 16 KiB pages, less than 16 MiB stays allocated (the review of b303319 found
//! 4 × 1,024 × page size kept for the space's lifetime: 64 MiB here, 8 GiB with 2 MiB pages).
//! Its own binary: the counting allocator sees every thread.

use pagesnap_engine::Space;
use pagesnap_pagetable::VirtAddr;
use pagesnap_store::{Store, StoreOptions};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so `System`'s
// guarantees hold; the counter is only bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, forwarded unchanged.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: as `alloc`.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: `p` was allocated by `System` (through `alloc`) with layout `l`, as the caller
        // guarantees.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: as `dealloc`, and the caller upholds `realloc`'s size contract.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

#[test]
fn a_large_snapshot_leaves_no_batch_buffers_allocated() {
    const PS: u64 = 16 << 10;
    let dir = tempfile::tempdir().expect("tmp");
    let opts = StoreOptions {
        page_size: PS as u32,
        ..StoreOptions::default()
    };
    let space = Space::create(Store::init(dir.path(), opts).expect("init")).expect("space");
    // A first small snapshot (one short batch) so the store's own one-off allocations are made.
    let mut p = vec![0u8; PS as usize];
    space.map(VirtAddr(0), 8 * PS).expect("map");
    space.write(VirtAddr(0), &[1u8; 64]).expect("write");
    space.snapshot().expect("warm-up");
    // 4,000 pages: four batches (62.5 MiB, under the eager limit).
    let n = 4000u64;
    space.map(VirtAddr(0), n * PS).expect("map");
    for v in 0..n {
        p[..8].copy_from_slice(&v.to_le_bytes());
        p[8] = 2;
        space.write(VirtAddr(v * PS), &p).expect("write");
    }
    let before = LIVE.load(Ordering::SeqCst);
    space.snapshot().expect("snapshot");
    let after = LIVE.load(Ordering::SeqCst);
    let kept = after - before;
    eprintln!(
        "live bytes after the snapshot: {:+.1} MiB",
        kept as f64 / (1 << 20) as f64
    );
    assert!(
        kept < 16 << 20,
        "{:.1} MiB still allocated after the snapshot",
        kept as f64 / (1 << 20) as f64
    );
}
