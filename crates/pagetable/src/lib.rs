//! # pagesnap-pagetable
//!
//! A concurrent hashed (inverted) page table for full 64-bit virtual addresses: the page-table
//! core of pagesnap, built for PhantomOS's 64-bit port (`shared/seed/page-table-64.md`).
//!
//! - **The note's interface**: [`PageTable::new`] (`vm_map_map_init`), [`PageTable::page_init`],
//!   [`PageTable::set_page`], [`PageTable::get_page`] (returns a copy), [`PageTable::for_each`]
//!   (`vm_map_map_do_for_all(func, lock)`), plus [`PageTable::update`], [`PageTable::remove`] and
//!   stable [`PageHandle`]s for a pager's I/O completion.
//! - **Structure**: descriptors ([`Page`], 64 bytes) live in slots that never move; a
//!   linear-hashing index of PowerPC-style buckets (8 tagged entries in one cache line — the
//!   "software TLB") points at them, and a full bucket grows an overflow chain, so **no mapping is
//!   ever evicted**. Growth splits one bucket at a time: no operation rehashes the table.
//! - **Concurrency**: readers never lock and never wait for each other (a seqlock per bucket);
//!   writers serialise on one writer lock: by default ([`DefaultLock`]) [`BlockingLock`] (spins
//!   briefly, then parks) with `std`, and [`SpinLock`] (spins without bound, for a kernel holding
//!   it with preemption disabled) without. A writer called from a locked walk's callback panics
//!   (with `std`) instead of waiting for itself. The protocol is model-checked with loom
//!   (`cfg(loom)`).
//! - **`no_std` + `alloc`**; the `std` feature (default) adds the blocking lock, the default lock
//!   choice above and the re-entry check.
//!
//! ```
//! use pagesnap_pagetable::{PageTable, PageFlags, VirtAddr, WalkLock};
//!
//! let table = PageTable::new();
//! let mut page = table.page_init(VirtAddr(0x7fff_dead_b000));
//! page.flags |= PageFlags::PHYS_MEM;
//! table.set_page(page).expect("room for one page");
//! // Any address inside the page finds it; get_page hands out a copy.
//! let copy = table.get_page(VirtAddr(0x7fff_dead_bfff)).expect("mapped");
//! assert!(copy.flags.contains(PageFlags::PHYS_MEM));
//! // Mark every page dirty, with writers held off for the walk (the note's lock != 0).
//! table.for_each(WalkLock::Map, |p| p.flags |= PageFlags::PHYS_DIRTY);
//! assert!(table.get_page(copy.vaddr).is_some_and(|p| p.flags.contains(PageFlags::PHYS_DIRTY)));
//! ```
#![no_std]
#![warn(missing_docs)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

mod addr;
pub mod hash;
#[cfg(huge_pages)]
mod huge;
#[cfg(huge_pages)]
pub use huge::set_huge_pages;

/// Huge-page chunks exist only in `std` builds on Linux; here they stay off.
#[cfg(not(huge_pages))]
pub fn set_huge_pages(_on: bool) -> bool {
    false
}
pub mod lock;
mod page;
mod segvec;
mod sync;
mod table;

pub use addr::{DiskPage, Epoch, PageSize, PhysAddr, VirtAddr, Vpn};
pub use hash::{DefaultHash, Fibonacci, Fmix64, FoldMul, PrototypeModulo, VpnHasher};
#[cfg(feature = "std")]
pub use lock::BlockingLock;
pub use lock::{DefaultLock, SpinLock, WriterLock};
pub use page::{Page, PageFlags, PageHandle, PAGE_DESCRIPTOR_BYTES};
pub use table::{PageTable, PageTableError, TableStats, WalkLock};

/// Entries per bucket (the "software TLB" group size).
pub const BUCKET_ENTRIES: usize = table::BUCKET_SLOTS;
