//! The page descriptor, modelled on PhantomOS's `vm_page`.

use crate::addr::{DiskPage, Epoch, PhysAddr, VirtAddr, Vpn};

bitflags::bitflags! {
    /// The descriptor's state bits (PhantomOS's `flag_*` bitfields).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct PageFlags: u16 {
        /// The page is in physical memory (`flag_phys_mem`).
        const PHYS_MEM = 1 << 0;
        /// The page is write-protected, so its first write traps (`flag_phys_protect`).
        const PHYS_PROTECT = 1 << 1;
        /// The page was written since it was last saved (`flag_phys_dirty`).
        const PHYS_DIRTY = 1 << 2;
        /// The pager has I/O in flight for this page (`flag_pager_io_busy`).
        const PAGER_IO_BUSY = 1 << 3;
        /// `curr_page` holds a valid disk copy (`flag_have_curr`).
        const HAVE_CURR = 1 << 4;
        /// `make_page` holds the copy for the snapshot being made (`flag_have_make`).
        const HAVE_MAKE = 1 << 5;
        /// `prev_page` holds the copy in the previous snapshot (`flag_have_prev`).
        const HAVE_PREV = 1 << 6;
    }
}

/// A page descriptor: what the table stores for each mapped page. `Copy`, 64 bytes.
///
/// [`crate::PageTable::get_page`] hands out copies; changes go back through `set_page` or
/// `update`, so every modification passes through the table (the design note's rule).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Page {
    /// The first address of the page (the key).
    pub vaddr: VirtAddr,
    /// Where the page lives in physical memory, when [`PageFlags::PHYS_MEM`] is set.
    pub paddr: PhysAddr,
    /// The disk copy of the current state (`curr_page`).
    pub curr_page: DiskPage,
    /// The disk copy for the snapshot being made (`make_page`).
    pub make_page: DiskPage,
    /// The disk copy in the previous snapshot (`prev_page`).
    pub prev_page: DiskPage,
    /// The epoch in which the page was last modified.
    pub epoch: Epoch,
    /// Accesses seen by the pager's aging scan.
    pub access_count: u32,
    /// Scans since the last access.
    pub idle_count: u32,
    /// How many users hold the page in physical memory.
    pub wired_count: u32,
    /// State bits.
    pub flags: PageFlags,
}

/// The size of a [`Page`] in bytes.
pub const PAGE_DESCRIPTOR_BYTES: usize = core::mem::size_of::<Page>();
const _: () = assert!(PAGE_DESCRIPTOR_BYTES == 64);

/// Eight 64-bit words: the encoding a descriptor has inside the table. Word 7 carries, above the
/// flags, 16 bits the table keeps for itself: a live bit and a 15-bit generation.
pub(crate) type Words = [u64; 8];

pub(crate) const META_SHIFT: u32 = 48;
pub(crate) const LIVE_BIT: u64 = 1 << 63;
pub(crate) const GEN_MASK: u64 = 0x7fff;

impl Page {
    /// A fresh descriptor for the page starting at `vaddr`: no physical page, no disk copies,
    /// zero counters and flags.
    pub const fn new(vaddr: VirtAddr) -> Page {
        Page {
            vaddr,
            paddr: PhysAddr(0),
            curr_page: DiskPage(0),
            make_page: DiskPage(0),
            prev_page: DiskPage(0),
            epoch: Epoch(0),
            access_count: 0,
            idle_count: 0,
            wired_count: 0,
            flags: PageFlags::empty(),
        }
    }

    pub(crate) fn to_words(self, meta: u16) -> Words {
        [
            self.vaddr.0,
            self.paddr.0,
            self.curr_page.0,
            self.make_page.0,
            self.prev_page.0,
            self.epoch.0,
            u64::from(self.access_count) | (u64::from(self.idle_count) << 32),
            u64::from(self.wired_count)
                | (u64::from(self.flags.bits()) << 32)
                | (u64::from(meta) << META_SHIFT),
        ]
    }

    #[allow(clippy::cast_possible_truncation)] // unpacking fields packed by `to_words`
    #[inline]
    pub(crate) fn from_words(w: &Words) -> Page {
        Page {
            vaddr: VirtAddr(w[0]),
            paddr: PhysAddr(w[1]),
            curr_page: DiskPage(w[2]),
            make_page: DiskPage(w[3]),
            prev_page: DiskPage(w[4]),
            epoch: Epoch(w[5]),
            access_count: w[6] as u32,
            idle_count: (w[6] >> 32) as u32,
            wired_count: w[7] as u32,
            flags: PageFlags::from_bits_retain((w[7] >> 32) as u16),
        }
    }
}

#[allow(clippy::cast_possible_truncation)]
pub(crate) fn meta_of(w: &Words) -> u16 {
    (w[7] >> META_SHIFT) as u16
}

pub(crate) fn is_live(w: &Words) -> bool {
    w[7] & LIVE_BIT != 0
}

/// A stable name for one mapping, valid for as long as the mapping exists.
///
/// A pager that starts I/O on a page keeps the handle and uses it on completion
/// ([`crate::PageTable::update_by_handle`]): if the page was unmapped meanwhile — even if the same
/// address was mapped again, any number of times — the handle never resolves again.
///
/// A handle is a slot index, the page number and the slot's generation, which goes up by one each
/// time the slot takes a new mapping. The generation is 15 bits (it shares the descriptor's last
/// word with the flags, inside the 64-byte slot), so it cannot be widened; instead a slot that has
/// carried its last generation (32,767 mappings) is *retired* when that mapping is removed: it is
/// never reused, so a generation never repeats within a slot. That costs one 64-byte slot per
/// 32,767 mappings made in it — 2 bytes of memory per remap at worst — and a remap loop of one
/// address moves on to a fresh slot every 32,767 cycles ([`crate::TableStats::retired_slots`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageHandle {
    pub(crate) vpn: Vpn,
    pub(crate) slot: u32,
    pub(crate) gen: u16,
}

impl PageHandle {
    /// The page number this handle names.
    pub fn vpn(&self) -> Vpn {
        self.vpn
    }

    /// The slot index of the descriptor (stable while the mapping exists).
    pub fn slot(&self) -> u32 {
        self.slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_every_field_and_keep_meta_apart() {
        let p = Page {
            vaddr: VirtAddr(0xffff_ffff_ffff_f000),
            paddr: PhysAddr(0x1234_5000),
            curr_page: DiskPage(7),
            make_page: DiskPage(8),
            prev_page: DiskPage(u64::MAX),
            epoch: Epoch(42),
            access_count: u32::MAX,
            idle_count: 3,
            wired_count: u32::MAX - 1,
            flags: PageFlags::all(),
        };
        let w = p.to_words(0xffff);
        assert_eq!(Page::from_words(&w), p);
        assert_eq!(meta_of(&w), 0xffff);
        assert!(is_live(&w));
        let w = p.to_words(0x1);
        assert!(!is_live(&w));
        assert_eq!(Page::from_words(&w), p);
    }

    #[test]
    fn new_page_is_all_zero_but_its_address() {
        let p = Page::new(VirtAddr(0x5000));
        assert_eq!(
            p,
            Page {
                vaddr: VirtAddr(0x5000),
                ..Page::default()
            }
        );
        assert_eq!(PAGE_DESCRIPTOR_BYTES, 64);
    }
}
