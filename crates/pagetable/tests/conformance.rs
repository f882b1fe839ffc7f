//! One suite, run against every page-table variant (hash function x writer lock), as vm-memory does
//! for its bitmaps: the operations, the walk modes, and a proptest model against a `BTreeMap`.
#![cfg(not(loom))]

use pagesnap_pagetable::{
    BlockingLock, DiskPage, Epoch, Fibonacci, Fmix64, FoldMul, Page, PageFlags, PageSize,
    PageTable, PhysAddr, PrototypeModulo, SpinLock, VirtAddr, VpnHasher, WalkLock,
    PAGE_DESCRIPTOR_BYTES,
};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};

fn page(addr: u64, v: u64) -> Page {
    Page {
        vaddr: VirtAddr(addr),
        paddr: PhysAddr(v << 12),
        curr_page: DiskPage(v),
        make_page: DiskPage(v + 1),
        prev_page: DiskPage(v + 2),
        epoch: Epoch(v),
        access_count: v as u32,
        idle_count: 1,
        wired_count: 2,
        flags: PageFlags::PHYS_MEM,
    }
}

fn new_table<H: VpnHasher, L: lock_api::RawMutex>() -> PageTable<H, L> {
    PageTable::with_config(PageSize::KIB_4, 0)
}

fn set_get_replace<H: VpnHasher, L: lock_api::RawMutex>() {
    let t = new_table::<H, L>();
    assert!(t.get_page(VirtAddr(0x5000)).is_none());
    let h1 = t.set_page(page(0x5000, 1)).expect("insert");
    assert_eq!(t.len(), 1);
    // Any address inside the page finds it; the copy carries the page-aligned address.
    assert_eq!(t.get_page(VirtAddr(0x5abc)), Some(page(0x5000, 1)));
    assert!(t.get_page(VirtAddr(0x6000)).is_none());
    assert!(t.get_page(VirtAddr(0x4fff)).is_none());
    // Replacing keeps the identity and the count.
    let h2 = t.set_page(page(0x5123, 7)).expect("replace");
    assert_eq!(h1, h2);
    assert_eq!(t.len(), 1);
    assert_eq!(t.get_page(VirtAddr(0x5000)), Some(page(0x5000, 7)));
    assert_eq!(t.get_by_handle(h1), Some(page(0x5000, 7)));
    assert_eq!(t.handle(VirtAddr(0x5fff)), Some(h1));
    // page_init is a zeroed descriptor for the page, not stored.
    assert_eq!(t.page_init(VirtAddr(0x9876)), Page::new(VirtAddr(0x9000)));
    assert!(t.get_page(VirtAddr(0x9000)).is_none());
}

fn remove_and_stale_handles<H: VpnHasher, L: lock_api::RawMutex>() {
    let t = new_table::<H, L>();
    let h = t.set_page(page(0x1000, 3)).expect("insert");
    assert_eq!(t.remove(VirtAddr(0x1fff)), Some(page(0x1000, 3)));
    assert_eq!(t.remove(VirtAddr(0x1000)), None);
    assert!(t.is_empty());
    assert!(t.get_page(VirtAddr(0x1000)).is_none());
    assert!(t.get_by_handle(h).is_none());
    // The same address mapped again is a new mapping: the old handle must not reach it, even
    // though the slot is reused.
    let h2 = t.set_page(page(0x1000, 4)).expect("reinsert");
    assert_eq!(h2.slot(), h.slot());
    assert_ne!(h2, h);
    assert!(t.get_by_handle(h).is_none());
    assert!(t.update_by_handle(h, |p| p.wired_count = 99).is_none());
    assert_eq!(t.update_by_handle(h2, |p| p.wired_count = 99), Some(()));
    assert_eq!(
        t.get_page(VirtAddr(0x1000)).map(|p| p.wired_count),
        Some(99)
    );
}

fn update_is_read_modify_write<H: VpnHasher, L: lock_api::RawMutex>() {
    let t = new_table::<H, L>();
    assert_eq!(t.update(VirtAddr(0x2000), |p| p.access_count += 1), None);
    t.set_page(page(0x2000, 5)).expect("insert");
    let seen = t.update(VirtAddr(0x2010), |p| {
        p.access_count += 10;
        p.vaddr = VirtAddr(0xdead_0000); // the key cannot change
        p.access_count
    });
    assert_eq!(seen, Some(15));
    assert_eq!(
        t.get_page(VirtAddr(0x2000)).map(|p| p.access_count),
        Some(15)
    );
    assert!(t.get_page(VirtAddr(0xdead_0000)).is_none());
}

fn many_pages_none_lost<H: VpnHasher, L: lock_api::RawMutex>(n: u64) {
    let t = new_table::<H, L>();
    // Page-aligned addresses that share their low 20 bits: the prototype put all of them in one
    // 8-slot bucket and evicted all but 8.
    let addr = |i: u64| (i << 20) | 0x3000;
    for i in 0..n {
        t.set_page(page(addr(i), i)).expect("insert");
    }
    assert_eq!(t.len() as u64, n);
    for i in 0..n {
        assert_eq!(
            t.get_page(VirtAddr(addr(i))),
            Some(page(addr(i), i)),
            "page {i} lost"
        );
    }
    // Remove every other one; the rest stay.
    for i in (0..n).step_by(2) {
        assert!(t.remove(VirtAddr(addr(i))).is_some());
    }
    for i in 0..n {
        assert_eq!(
            t.get_page(VirtAddr(addr(i))).is_some(),
            i % 2 == 1,
            "page {i}"
        );
    }
    assert_eq!(t.for_each(WalkLock::None, |_| {}), (n / 2) as usize);
}

fn huge_addresses<H: VpnHasher, L: lock_api::RawMutex>() {
    let t = new_table::<H, L>();
    for i in 0..100u64 {
        let a = u64::MAX - i * 4096;
        t.set_page(page(a, i)).expect("insert");
    }
    t.set_page(page(0, 1000)).expect("page zero");
    for i in 0..100u64 {
        let a = (u64::MAX - i * 4096) & !0xfff;
        assert_eq!(
            t.get_page(VirtAddr(a)).map(|p| p.curr_page),
            Some(DiskPage(i))
        );
    }
    assert_eq!(
        t.get_page(VirtAddr(0xfff)).map(|p| p.curr_page),
        Some(DiskPage(1000))
    );
}

fn walks<H: VpnHasher, L: lock_api::RawMutex>() {
    let t = new_table::<H, L>();
    for i in 0..2000u64 {
        t.set_page(page(i << 12, i)).expect("insert");
    }
    let mut seen = Vec::new();
    assert_eq!(
        t.for_each(WalkLock::None, |p| {
            seen.push(p.vaddr.0 >> 12);
            p.wired_count = 77; // discarded
        }),
        2000
    );
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..2000).collect::<Vec<_>>(),
        "each mapping exactly once"
    );
    assert!(t.get_page(VirtAddr(0)).is_some_and(|p| p.wired_count == 2));

    assert_eq!(
        t.for_each(WalkLock::Page, |p| p.flags |= PageFlags::PHYS_DIRTY),
        2000
    );
    assert_eq!(
        t.for_each(WalkLock::Map, |p| p.idle_count = p.curr_page.0 as u32),
        2000
    );
    for i in 0..2000u64 {
        let p = t.get_page(VirtAddr(i << 12)).expect("mapped");
        assert!(p
            .flags
            .contains(PageFlags::PHYS_DIRTY | PageFlags::PHYS_MEM));
        assert_eq!(u64::from(p.idle_count), i);
    }
}

fn map_walk_holds_writers<H: VpnHasher + 'static, L: lock_api::RawMutex + Send + Sync + 'static>() {
    let t = Arc::new(new_table::<H, L>());
    for i in 0..64u64 {
        t.set_page(page(i << 12, i)).expect("insert");
    }
    let done = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(Barrier::new(2));
    let writer = {
        let (t, done, ready) = (t.clone(), done.clone(), ready.clone());
        std::thread::spawn(move || {
            ready.wait();
            t.set_page(page(0x100_0000, 1)).expect("insert");
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut first = true;
    t.for_each(WalkLock::Map, |_| {
        if first {
            first = false;
            ready.wait();
        }
        // Readers still run during a locked walk...
        assert!(t.get_page(VirtAddr(0)).is_some());
        // ...and the writer, now trying, cannot have finished.
        assert!(
            !done.load(Ordering::SeqCst),
            "set_page completed during a Map walk"
        );
    });
    writer.join().expect("writer thread");
    assert!(done.load(Ordering::SeqCst));
    assert!(t.get_page(VirtAddr(0x100_0000)).is_some());
}

fn with_capacity_memory_and_no_growth<H: VpnHasher, L: lock_api::RawMutex>() {
    let n = 100_000u64;
    let t = PageTable::<H, L>::with_config(PageSize::KIB_4, n as usize);
    let before = t.stats();
    for i in 0..n {
        t.set_page(page(0x7f00_0000_0000 + (i << 12), i))
            .expect("insert");
    }
    let after = t.stats();
    assert_eq!(
        after.buckets, before.buckets,
        "presized table split buckets"
    );
    assert_eq!(
        after.slot_capacity, before.slot_capacity,
        "presized table grew its slots"
    );
    assert_eq!(after.mappings, n as usize);
}

/// Finding 7: a handle is slot + page + 15-bit generation, and the free list hands the same slot
/// back, so remapping one address 2^15 times used to bring the first handle's generation round
/// again and the stale handle resolved to a later mapping. Remap well past the generation width,
/// keeping the first handle, and check after every cycle that it never resolves again.
fn stale_handle_never_resolves_after_generation_wraps<H: VpnHasher, L: lock_api::RawMutex>() {
    const CYCLES: u64 = 70_000;
    let t = new_table::<H, L>();
    // A neighbour that stays mapped, so the chain holds more than the remapped page.
    t.set_page(page(0x9000, 1)).expect("neighbour");
    let first = t.set_page(page(0x5000, 0)).expect("first mapping");
    let mut slots = std::collections::BTreeSet::new();
    slots.insert(first.slot());
    for i in 1..=CYCLES {
        assert!(t.remove(VirtAddr(0x5000)).is_some(), "cycle {i}: remove");
        let h = t.set_page(page(0x5000, i)).expect("remap");
        slots.insert(h.slot());
        assert_ne!(
            h, first,
            "cycle {i}: a later mapping got the first mapping's handle"
        );
        assert_eq!(t.get_page(VirtAddr(0x5000)), Some(page(0x5000, i)));
        assert_eq!(
            t.get_by_handle(h),
            Some(page(0x5000, i)),
            "cycle {i}: fresh handle"
        );
        assert_eq!(
            t.get_by_handle(first),
            None,
            "cycle {i}: the first handle resolved to mapping {i}"
        );
    }
    // A late completion through the stale handle must not write into the current mapping.
    assert!(t.update_by_handle(first, |p| p.wired_count = 77).is_none());
    assert_eq!(t.get_page(VirtAddr(0x5000)), Some(page(0x5000, CYCLES)));
    assert_eq!(t.len(), 2);
    // One slot is retired per 2^15 - 1 reuses: 70,001 mappings of one address use 3 slots.
    assert_eq!(slots.len(), 3, "slots used: {slots:?}");
}

macro_rules! conformance {
    ($($name:ident: $h:ty, $l:ty, prototype = $proto:expr;)*) => {$(
        mod $name {
            use super::*;
            #[test] fn set_get_replace() { super::set_get_replace::<$h, $l>() }
            #[test] fn remove_and_stale_handles() { super::remove_and_stale_handles::<$h, $l>() }
            #[test] fn stale_handle_never_resolves_after_generation_wraps() {
                super::stale_handle_never_resolves_after_generation_wraps::<$h, $l>()
            }
            #[test] fn update_is_read_modify_write() { super::update_is_read_modify_write::<$h, $l>() }
            #[test] fn many_pages_none_lost() { super::many_pages_none_lost::<$h, $l>(if $proto { 3000 } else { 50_000 }) }
            #[test] fn huge_addresses() { super::huge_addresses::<$h, $l>() }
            #[test] fn walks() { super::walks::<$h, $l>() }
            #[test] fn map_walk_holds_writers() { super::map_walk_holds_writers::<$h, $l>() }
            #[test] fn with_capacity_memory_and_no_growth() {
                if !$proto { super::with_capacity_memory_and_no_growth::<$h, $l>() }
            }
            proptest! {
                #![proptest_config(ProptestConfig { cases: if $proto { 48 } else { 128 }, ..ProptestConfig::default() })]
                #[test]
                fn model(ops in proptest::collection::vec(op(), 1..300)) {
                    super::run_model::<$h, $l>(&ops)?;
                }
            }
        }
    )*};
}

conformance! {
    fmix64_spin: Fmix64, SpinLock, prototype = false;
    fmix64_blocking: Fmix64, BlockingLock, prototype = false;
    fibonacci_spin: Fibonacci, SpinLock, prototype = false;
    foldmul_spin: FoldMul, SpinLock, prototype = false;
    foldmul_blocking: FoldMul, BlockingLock, prototype = false;
    prototype_hash_spin: PrototypeModulo, SpinLock, prototype = true;
}

#[test]
fn memory_per_mapping_is_within_1_3x_the_descriptor() {
    for n in [65_536u64, 300_000, 1 << 20] {
        let t = PageTable::new();
        for i in 0..n {
            // Random-looking sparse addresses over 48 bits.
            let a = (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 16) & !0xfff;
            t.set_page(page(a, i)).expect("insert");
        }
        let s = t.stats();
        let per = s.bytes_per_mapping();
        println!(
            "{n} mappings: {per:.1} heap bytes per mapping ({} buckets, {} overflow buckets)",
            s.buckets, s.overflow_buckets
        );
        assert!(
            per <= 1.3 * PAGE_DESCRIPTOR_BYTES as f64,
            "{n} mappings: {per:.1} bytes each ({s:?})"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The model test

#[derive(Clone, Debug)]
enum Op {
    Set(u64, u64),
    Get(u64),
    Update(u64, u32),
    Remove(u64),
    Walk,
}

fn address() -> impl Strategy<Value = u64> {
    let offset = 0..4096u64;
    prop_oneof![
        // Page-aligned, dense near zero.
        (0..48u64).prop_map(|i| i << 12),
        // Clustered like a process: a heap and a stack region, with offsets inside the page.
        ((0..32u64), offset.clone()).prop_map(|(i, o)| 0x5555_5555_0000 + (i << 12) + o),
        (0..32u64).prop_map(|i| 0x7fff_ffff_f000 - (i << 12)),
        // Huge: near 2^64.
        (0..16u64).prop_map(|i| u64::MAX - (i << 12)),
        // Colliding in the low 20 bits (the prototype's whole hash).
        (0..64u64).prop_map(|i| (i << 20) | 0x4000),
        any::<u64>(),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (address(), any::<u64>()).prop_map(|(a, v)| Op::Set(a, v)),
        3 => address().prop_map(Op::Get),
        2 => (address(), any::<u32>()).prop_map(|(a, d)| Op::Update(a, d)),
        2 => address().prop_map(Op::Remove),
        1 => Just(Op::Walk),
    ]
}

fn run_model<H: VpnHasher, L: lock_api::RawMutex>(ops: &[Op]) -> Result<(), TestCaseError> {
    let t = new_table::<H, L>();
    let mut model: BTreeMap<u64, Page> = BTreeMap::new();
    let key = |a: u64| a & !0xfff;
    for op in ops {
        match *op {
            Op::Set(a, v) => {
                let p = Page {
                    vaddr: VirtAddr(a),
                    ..page(0, v)
                };
                t.set_page(p)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                model.insert(
                    key(a),
                    Page {
                        vaddr: VirtAddr(key(a)),
                        ..p
                    },
                );
            }
            Op::Get(a) => prop_assert_eq!(t.get_page(VirtAddr(a)), model.get(&key(a)).copied()),
            Op::Update(a, d) => {
                let got = t.update(VirtAddr(a), |p| {
                    p.access_count = p.access_count.wrapping_add(d);
                    p.access_count
                });
                let want = model.get_mut(&key(a)).map(|p| {
                    p.access_count = p.access_count.wrapping_add(d);
                    p.access_count
                });
                prop_assert_eq!(got, want);
            }
            Op::Remove(a) => prop_assert_eq!(t.remove(VirtAddr(a)), model.remove(&key(a))),
            Op::Walk => {
                let mut all = Vec::new();
                t.for_each(WalkLock::None, |p| all.push(*p));
                all.sort_by_key(|p| p.vaddr);
                let want: Vec<Page> = model.values().copied().collect();
                prop_assert_eq!(all, want, "walk must visit every mapping once");
            }
        }
        prop_assert_eq!(t.len(), model.len());
    }
    // Nothing lost, duplicated or resurrected.
    for (&a, p) in &model {
        prop_assert_eq!(t.get_page(VirtAddr(a)), Some(*p));
    }
    let mut count = 0;
    t.for_each(WalkLock::Map, |p| {
        count += 1;
        assert_eq!(
            model.get(&p.vaddr.0),
            Some(&*p),
            "walk found a page the model does not have"
        );
    });
    prop_assert_eq!(count, model.len());
    Ok(())
}
