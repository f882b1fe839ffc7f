//! Finding 10: a callback of a walk that holds the writer lock (`WalkLock::Map`, `WalkLock::Page`)
//! calling a writer of the same table used to wait for itself forever (the default spin lock spun
//! without a word). In `std` builds it now panics with a message naming the misuse, and the table
//! stays usable. A watchdog fails the test if anything hangs, instead of a sleep.
#![cfg(not(loom))]

use pagesnap_pagetable::{
    BlockingLock, Fmix64, FoldMul, Page, PageTable, SpinLock, VirtAddr, VpnHasher, WalkLock,
};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::time::Duration;

/// Aborts the process if it is not dropped within 30 s: a self-deadlock fails the test run loudly
/// instead of hanging it.
struct Watchdog(#[allow(dead_code)] mpsc::Sender<()>);

fn watchdog(what: &'static str) -> Watchdog {
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(Duration::from_secs(30)) {
            eprintln!("watchdog: {what} still running after 30 s: it deadlocked");
            std::process::abort();
        }
    });
    Watchdog(tx)
}

fn panic_message(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_default()
}

type Misuse<H, L> = fn(&PageTable<H, L>);

fn writer_in_locked_walk_panics<H: VpnHasher, L: lock_api::RawMutex>() {
    let _dog = watchdog("a writer called from a locked walk");
    let misuses: [(&str, Misuse<H, L>); 6] = [
        ("set_page", |t| {
            let _ = t.set_page(Page::new(VirtAddr(0x2000)));
        }),
        ("update", |t| {
            t.update(VirtAddr(0x1000), |p| p.wired_count += 1);
        }),
        ("remove", |t| {
            t.remove(VirtAddr(0x1000));
        }),
        ("stats", |t| {
            t.stats();
        }),
        ("for_each(Map)", |t| {
            t.for_each(WalkLock::Map, |_| {});
        }),
        ("for_each(Page)", |t| {
            t.for_each(WalkLock::Page, |_| {});
        }),
    ];
    for mode in [WalkLock::Map, WalkLock::Page] {
        for (name, misuse) in misuses {
            let t: PageTable<H, L> = PageTable::with_config(Default::default(), 0);
            t.set_page(Page::new(VirtAddr(0x1000))).expect("insert");
            let r = catch_unwind(AssertUnwindSafe(|| {
                t.for_each(mode, |_| misuse(&t));
            }));
            let e = match r {
                Ok(()) => panic!("{name} inside for_each({mode:?}) returned instead of panicking"),
                Err(e) => e,
            };
            let msg = panic_message(&*e);
            assert!(
                msg.contains("writer lock") && msg.contains("for_each"),
                "{name} inside for_each({mode:?}): unclear message {msg:?}"
            );
            // The walk unwound and released the lock: the table works, and nothing was changed.
            assert_eq!(
                t.get_page(VirtAddr(0x1000)),
                Some(Page::new(VirtAddr(0x1000)))
            );
            t.set_page(Page::new(VirtAddr(0x3000)))
                .expect("writer after the panic");
            assert_eq!(t.len(), 2);
        }
    }
}

#[test]
fn writer_in_locked_walk_panics_default_table() {
    writer_in_locked_walk_panics::<Fmix64, BlockingLock>();
}

#[test]
fn writer_in_locked_walk_panics_spin_lock() {
    writer_in_locked_walk_panics::<Fmix64, SpinLock>();
}

/// Readers, and a lock-free walk, are fine inside a locked walk; so is a writer on another table.
#[test]
fn readers_and_other_tables_are_fine_inside_a_locked_walk() {
    let _dog = watchdog("readers inside a locked walk");
    let t: PageTable = PageTable::new();
    let other: PageTable = PageTable::new();
    t.set_page(Page::new(VirtAddr(0x1000))).expect("insert");
    let h = t.handle(VirtAddr(0x1000)).expect("handle");
    let visited = t.for_each(WalkLock::Map, |p| {
        assert!(t.get_page(p.vaddr).is_some());
        assert!(t.get_by_handle(h).is_some());
        assert_eq!(t.for_each(WalkLock::None, |_| {}), 1);
        other.set_page(*p).expect("another table's writer");
    });
    assert_eq!(visited, 1);
    assert_eq!(other.len(), 1);
}

/// Finding 10: the default writer lock of a `std` build parks instead of spinning without bound (a
/// preempted holder made waiters spin whole time slices on a 2-core machine). Checked at compile
/// time: the table `PageTable::new()` makes is a `BlockingLock` table.
#[test]
fn default_table_uses_the_blocking_lock_in_std_builds() {
    let t = PageTable::new();
    let blocking: &PageTable<FoldMul, BlockingLock> = &t;
    assert!(blocking.is_empty());
    assert_eq!(
        std::any::type_name::<pagesnap_pagetable::DefaultLock>(),
        std::any::type_name::<BlockingLock>()
    );
}
