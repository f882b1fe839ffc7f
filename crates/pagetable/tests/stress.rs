//! Readers, writers and walks at once. Every descriptor is written so that all its fields derive
//! from one value: a torn copy (fields from two different stores) fails `check`, and so does a copy
//! under the wrong address. Bounded by iteration counts, never by time.
#![cfg(not(loom))]

use pagesnap_pagetable::{
    BlockingLock, DefaultHash, DefaultLock, DiskPage, Epoch, Fmix64, Page, PageFlags, PageSize,
    PageTable, PhysAddr, PrototypeModulo, SpinLock, VirtAddr, VpnHasher, WalkLock,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// A descriptor whose every field is a function of (address, version).
fn stamped(addr: u64, version: u64) -> Page {
    let v = version.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ addr;
    Page {
        vaddr: VirtAddr(addr),
        paddr: PhysAddr(v),
        curr_page: DiskPage(v.rotate_left(7)),
        make_page: DiskPage(v.rotate_left(19)),
        prev_page: DiskPage(!v),
        epoch: Epoch(version),
        access_count: (v >> 3) as u32,
        idle_count: (v >> 35) as u32,
        wired_count: version as u32,
        flags: PageFlags::from_bits_truncate((v >> 40) as u16),
    }
}

/// True if `p` is exactly what some writer stored for `addr`.
fn check(addr: u64, p: &Page) -> bool {
    p.vaddr.0 == addr && *p == stamped(addr, p.epoch.0)
}

fn stress<H: VpnHasher, L: lock_api::RawMutex + Send + Sync + 'static>(keys: u64, rounds: u64) {
    let t: Arc<PageTable<H, L>> = Arc::new(PageTable::with_config(PageSize::KIB_4, 0));
    let addr = |k: u64| 0x10_0000_0000 + (k << 12);
    // Half the keys exist from the start and are never removed: readers must always find them.
    for k in 0..keys / 2 {
        t.set_page(stamped(addr(k), 0)).expect("insert");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for w in 0..2u64 {
        let t = t.clone();
        threads.push(std::thread::spawn(move || {
            for r in 0..rounds {
                let k = (r * 7 + w * 13) % keys;
                let version = r * 2 + w;
                if k >= keys / 2 && r % 3 == 0 {
                    t.remove(VirtAddr(addr(k)));
                } else if r % 5 == 0 {
                    t.update(VirtAddr(addr(k)), |p| *p = stamped(addr(k), version));
                } else {
                    t.set_page(stamped(addr(k), version)).expect("set");
                }
                // Keep the table growing so splits race with the readers.
                if r % 4 == 0 {
                    let fresh = keys + w * rounds + r;
                    t.set_page(stamped(addr(fresh), 1)).expect("grow");
                }
            }
        }));
    }
    for _ in 0..2 {
        let (t, stop, reads) = (t.clone(), stop.clone(), reads.clone());
        threads.push(std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for k in 0..keys {
                    match t.get_page(VirtAddr(addr(k) + 5)) {
                        Some(p) => assert!(check(addr(k), &p), "torn or misplaced copy: {p:?}"),
                        None => assert!(k >= keys / 2, "permanent page {k} missing"),
                    }
                    n += 1;
                }
            }
            reads.fetch_add(n, Ordering::Relaxed);
        }));
    }
    {
        let (t, stop) = (t.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut walks = 0;
            while !stop.load(Ordering::Relaxed) || walks < 3 {
                let mut permanent = 0;
                t.for_each(WalkLock::None, |p| {
                    assert!(check(p.vaddr.0, p), "torn copy in walk: {p:?}");
                    if p.vaddr.0 < addr(keys / 2) {
                        permanent += 1;
                    }
                });
                assert_eq!(
                    permanent,
                    keys / 2,
                    "a lock-free walk must see every permanent page once"
                );
                walks += 1;
            }
        }));
    }
    let writers: Vec<_> = threads.drain(..2).collect();
    for w in writers {
        w.join().expect("writer");
    }
    stop.store(true, Ordering::Relaxed);
    for r in threads {
        r.join().expect("reader");
    }
    assert!(reads.load(Ordering::Relaxed) > 0);
    let mut n = 0;
    t.for_each(WalkLock::Map, |p| {
        assert!(check(p.vaddr.0, p));
        n += 1;
    });
    assert_eq!(n, t.len());
}

#[test]
fn stress_default_table() {
    // The default hash, and the default lock: `BlockingLock` in this (std) build.
    stress::<DefaultHash, DefaultLock>(2048, 200_000);
}

#[test]
fn stress_blocking_lock() {
    stress::<Fmix64, BlockingLock>(1024, 100_000);
}

#[test]
fn stress_spin_lock() {
    stress::<Fmix64, SpinLock>(1024, 100_000);
}

#[test]
fn stress_overflow_chains() {
    // Every key in 256 buckets' worth of hash: long chains, constant entry moves on remove.
    stress::<PrototypeModulo, SpinLock>(512, 4_000);
}

/// Readers on the newest mappings while one writer grows the table past several 2 MiB chunks of
/// slots and of buckets: in `std` builds on Linux each chunk is one huge page, faulted in by the writer
/// (`src/huge.rs`) while readers read it. Every copy must be whole and every mapping found.
#[test]
fn readers_across_huge_page_chunks() {
    const N: u64 = 450_000;
    let huge = pagesnap_pagetable::set_huge_pages(true);
    let t: Arc<PageTable> = Arc::new(PageTable::new());
    let addr = |k: u64| 0x7f00_0000_0000 + (k.wrapping_mul(0x9e37_79b9) & 0xf_ffff_ffff) * 4096;
    let done = Arc::new(AtomicU64::new(0));
    let first = t.set_page(stamped(addr(0), 0)).expect("insert");
    done.store(1, Ordering::Release);
    let readers: Vec<_> = (0..2u64)
        .map(|r| {
            let (t, done) = (t.clone(), done.clone());
            std::thread::spawn(move || {
                let mut x = r + 1;
                let mut reads = 0u64;
                loop {
                    let n = done.load(Ordering::Acquire);
                    if n >= N {
                        return reads;
                    }
                    // Mostly the newest mappings: the chunk being filled, and the one before it.
                    x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    let k = n - 1 - (x >> 33) % n.min(40_000);
                    let p = t
                        .get_page(VirtAddr(addr(k)))
                        .expect("a mapped page is found");
                    assert!(check(addr(k), &p), "torn or misplaced copy: {p:?}");
                    reads += 1;
                }
            })
        })
        .collect();
    for k in 1..N {
        t.set_page(stamped(addr(k), k)).expect("insert");
        done.store(k + 1, Ordering::Release);
    }
    for r in readers {
        assert!(r.join().expect("reader") > 0);
    }
    assert_eq!(t.get_by_handle(first), Some(stamped(addr(0), 0)));
    for k in 0..N {
        assert_eq!(t.get_page(VirtAddr(addr(k))), Some(stamped(addr(k), k)));
    }
    let stats = t.stats();
    // Slots past the first 2 MiB (and buckets past theirs) come from chunks, counted in heap bytes.
    #[cfg(all(target_os = "linux", not(miri)))]
    assert!(
        !huge || stats.chunk_bytes > 20 << 20,
        "chunks expected in a std build on Linux with huge pages on: {stats:?}"
    );
    assert!(stats.heap_bytes >= stats.chunk_bytes.max(N as usize * 64));
    assert!(stats.bytes_per_mapping() < 1.3 * 64.0, "{stats:?}");
}
