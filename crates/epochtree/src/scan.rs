//! The design note's other option for range queries: "go through all mappings in the hashtable".
//! Each page descriptor carries the epoch of its last modification ([`Page::epoch`]), so a walk of
//! the page table answers the same questions as the tree — in O(mapped) instead of O(changed). Kept
//! so the benchmarks can compare the two.

use alloc::vec::Vec;
use core::ops::Range;
use pagesnap_pagetable::{Epoch, Page, PageTable, Vpn, VpnHasher, WalkLock, WriterLock};

/// Pages whose descriptor's epoch is after `since`, in address order (a lock-free walk).
pub fn modified_since<H: VpnHasher, L: WriterLock>(
    table: &PageTable<H, L>,
    since: Epoch,
) -> Vec<(Vpn, Epoch)> {
    let ps = table.page_size();
    let mut out = Vec::new();
    table.for_each(WalkLock::None, |p: &mut Page| {
        if p.epoch > since {
            out.push((ps.vpn(p.vaddr), p.epoch));
        }
    });
    out.sort_unstable();
    out
}

/// Was any page in `range` modified after `since`, by its descriptor's epoch?
pub fn any_modified<H: VpnHasher, L: WriterLock>(
    table: &PageTable<H, L>,
    range: Range<Vpn>,
    since: Epoch,
) -> bool {
    let ps = table.page_size();
    let mut any = false;
    table.for_each(WalkLock::None, |p: &mut Page| {
        any |= p.epoch > since && range.contains(&ps.vpn(p.vaddr));
    });
    any
}
