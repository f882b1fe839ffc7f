//! Model checks of the read/write/resize protocol under loom: every interleaving (up to the
//! preemption bound) of a reader against writers. Run with `just loom`, or
//! `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test -p pagesnap-pagetable --release --test loom`.
//!
//! Under `cfg(loom)` buckets hold 2 entries, the table starts with 1 bucket and splits above one
//! entry per bucket, so three insertions exercise overflow chains and splits.
#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use pagesnap_pagetable::{
    DiskPage, Epoch, Fmix64, Page, PageFlags, PageSize, PageTable, PhysAddr, PrototypeModulo,
    SpinLock, VirtAddr, VpnHasher, WalkLock,
};

fn stamped(addr: u64, v: u64) -> Page {
    Page {
        vaddr: VirtAddr(addr),
        paddr: PhysAddr(v),
        curr_page: DiskPage(v),
        make_page: DiskPage(v),
        prev_page: DiskPage(v),
        epoch: Epoch(v),
        access_count: v as u32,
        idle_count: v as u32,
        wired_count: v as u32,
        flags: PageFlags::empty(),
    }
}

fn consistent(addr: u64, p: &Page) -> bool {
    *p == stamped(addr, p.epoch.0)
}

fn table<H: VpnHasher>() -> Arc<PageTable<H, SpinLock>> {
    Arc::new(PageTable::with_config(PageSize::KIB_4, 0))
}

#[test]
fn reader_never_sees_a_torn_replace() {
    loom::model(|| {
        let t = table::<Fmix64>();
        t.set_page(stamped(0x1000, 1)).expect("insert");
        let w = {
            let t = t.clone();
            thread::spawn(move || {
                t.set_page(stamped(0x1000, 2)).expect("replace");
            })
        };
        let p = t.get_page(VirtAddr(0x1000)).expect("always mapped");
        assert!(
            consistent(0x1000, &p) && (p.epoch.0 == 1 || p.epoch.0 == 2),
            "{p:?}"
        );
        w.join().expect("writer");
        assert_eq!(t.get_page(VirtAddr(0x1000)), Some(stamped(0x1000, 2)));
    });
}

// Under loom's shapes (1 bucket at first, split above 1 entry per bucket) and Fmix64, the hash of
// page 0x4000 ends in binary 01, 0x2000 in 11, 0x3000 in 10 and 0x5000 in 01, so the splits below
// move the pages the reader is looking for.
#[test]
fn reader_finds_a_page_while_its_bucket_splits() {
    loom::model(|| {
        let t = table::<Fmix64>();
        t.set_page(stamped(0x4000, 4)).expect("insert");
        let w = {
            let t = t.clone();
            thread::spawn(move || {
                // Splits bucket 0: 0x4000 moves to bucket 1.
                t.set_page(stamped(0x2000, 2)).expect("insert");
            })
        };
        assert_eq!(t.get_page(VirtAddr(0x4000)), Some(stamped(0x4000, 4)));
        w.join().expect("writer");
        assert_eq!(t.stats().buckets, 2, "the model must have split");
        for (a, v) in [(0x4000, 4), (0x2000, 2)] {
            assert_eq!(t.get_page(VirtAddr(a)), Some(stamped(a, v)));
        }
    });
}

#[test]
fn reader_finds_a_page_moved_out_of_an_overflow_chain_by_a_split() {
    loom::model(|| {
        let t = table::<Fmix64>();
        for (a, v) in [(0x4000, 4), (0x2000, 2), (0x3000, 3)] {
            t.set_page(stamped(a, v)).expect("insert");
        }
        let w = {
            let t = t.clone();
            thread::spawn(move || {
                // Bucket 1 overflows (0x4000, 0x2000, 0x5000), then splits: 0x2000 moves to 3.
                t.set_page(stamped(0x5000, 5)).expect("insert");
            })
        };
        assert_eq!(t.get_page(VirtAddr(0x2000)), Some(stamped(0x2000, 2)));
        w.join().expect("writer");
        assert_eq!(t.stats().buckets, 4);
    });
}

#[test]
fn reader_never_sees_a_reused_slot_under_the_old_address() {
    loom::model(|| {
        let t = table::<Fmix64>();
        t.set_page(stamped(0x1000, 1)).expect("insert");
        let w = {
            let t = t.clone();
            thread::spawn(move || {
                t.remove(VirtAddr(0x1000));
                // Reuses the freed slot for another address.
                t.set_page(stamped(0x9000, 9)).expect("insert");
            })
        };
        if let Some(p) = t.get_page(VirtAddr(0x1000)) {
            assert_eq!(p, stamped(0x1000, 1));
        }
        w.join().expect("writer");
        assert_eq!(t.get_page(VirtAddr(0x1000)), None);
    });
}

#[test]
fn reader_finds_an_entry_moved_by_a_remove_in_an_overflow_chain() {
    // Every page has the same tag here, so the reader's inline first try copies the first slot of
    // the chain, finds another page, and the out-of-line read copies every slot of the chain again:
    // one execution takes more than loom's default 1,000 branches.
    let mut model = loom::model::Builder::new();
    model.max_branches = 4_000;
    model.check(|| {
        // One hash value for all: a single chain of 2-entry buckets.
        let t = table::<PrototypeModulo>();
        for (a, v) in [(0x10_0000, 1), (0x20_0000, 2), (0x30_0000, 3)] {
            t.set_page(stamped(a, v)).expect("insert");
        }
        let w = {
            let t = t.clone();
            thread::spawn(move || {
                // The last entry (in the overflow bucket) moves into the hole; the overflow bucket
                // is freed.
                t.remove(VirtAddr(0x10_0000));
            })
        };
        assert_eq!(t.get_page(VirtAddr(0x30_0000)), Some(stamped(0x30_0000, 3)));
        w.join().expect("writer");
        assert_eq!(t.get_page(VirtAddr(0x10_0000)), None);
        assert_eq!(t.stats().overflow_buckets, 0);
    });
}

#[test]
fn lock_free_walk_sees_a_page_exactly_once_while_it_moves() {
    loom::model(|| {
        let t = table::<Fmix64>();
        t.set_page(stamped(0x4000, 4)).expect("insert");
        let w = {
            let t = t.clone();
            thread::spawn(move || {
                // Splits bucket 0: 0x4000 moves to bucket 1, possibly while the walk is reading.
                t.set_page(stamped(0x2000, 2)).expect("insert");
            })
        };
        let mut seen = Vec::new();
        t.for_each(WalkLock::None, |p| {
            assert!(consistent(p.vaddr.0, p));
            seen.push(p.vaddr.0);
        });
        seen.retain(|a| *a != 0x2000);
        assert_eq!(seen, vec![0x4000]);
        w.join().expect("writer");
    });
}

/// The segment directories (one level, replaced by a copy twice as large when full) grow under a
/// reader: under loom a directory starts with one entry and a segment holds two slots or two
/// buckets, so the second and third insertions add a slot segment and a bucket segment and replace
/// both directories while the reader looks pages up through them.
#[test]
fn reader_finds_pages_while_the_directories_grow() {
    loom::model(|| {
        let t = table::<Fmix64>();
        t.set_page(stamped(0x4000, 4)).expect("insert");
        let w = {
            let t = t.clone();
            thread::spawn(move || {
                t.set_page(stamped(0x2000, 2)).expect("insert");
                t.set_page(stamped(0x3000, 3)).expect("insert");
            })
        };
        assert_eq!(t.get_page(VirtAddr(0x4000)), Some(stamped(0x4000, 4)));
        if let Some(p) = t.get_page(VirtAddr(0x3000)) {
            assert_eq!(p, stamped(0x3000, 3));
        }
        w.join().expect("writer");
        let s = t.stats();
        assert!(
            s.slot_capacity >= 4 && s.buckets == 3,
            "the model must grow: {s:?}"
        );
        for (a, v) in [(0x4000, 4), (0x2000, 2), (0x3000, 3)] {
            assert_eq!(t.get_page(VirtAddr(a)), Some(stamped(a, v)));
        }
    });
}

/// The long model (minutes): walk groups of more than one bucket while a chain splits.
#[test]
fn lock_free_walk_sees_every_page_exactly_once_across_a_split() {
    loom::model(|| {
        let t = table::<Fmix64>();
        for (a, v) in [(0x4000, 4), (0x2000, 2), (0x3000, 3)] {
            t.set_page(stamped(a, v)).expect("insert");
        }
        let w = {
            let t = t.clone();
            thread::spawn(move || {
                t.set_page(stamped(0x5000, 5)).expect("insert");
            })
        };
        let mut seen = Vec::new();
        t.for_each(WalkLock::None, |p| {
            assert!(consistent(p.vaddr.0, p));
            seen.push(p.vaddr.0);
        });
        seen.sort_unstable();
        seen.retain(|a| *a != 0x5000);
        assert_eq!(seen, vec![0x2000, 0x3000, 0x4000]);
        w.join().expect("writer");
    });
}

/// Guards the models themselves: if loom stopped exploring reader/writer interleavings (it once
/// did, when the writers' sequence bumps were a load and a store), this would stop panicking.
#[test]
#[should_panic(expected = "left: 2")]
fn loom_explores_the_interleaving_where_the_reader_sees_the_new_value() {
    loom::model(|| {
        let t = table::<Fmix64>();
        t.set_page(stamped(0x1000, 1)).expect("insert");
        let w = {
            let t = t.clone();
            thread::spawn(move || {
                t.set_page(stamped(0x1000, 2)).expect("replace");
            })
        };
        let p = t.get_page(VirtAddr(0x1000)).expect("always mapped");
        assert_eq!(p.epoch.0, 1);
        w.join().expect("writer");
    });
}
