//! Address newtypes: virtual addresses, virtual page numbers, physical addresses, disk pages and
//! epochs are all `u64` underneath, and must never be mixed up.

use core::fmt;

macro_rules! u64_newtype {
    ($(#[$doc:meta])* $name:ident, $fmt:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw value.
            #[inline]
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, $fmt, self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }

        impl From<u64> for $name {
            #[inline]
            fn from(v: u64) -> Self {
                Self(v)
            }
        }
    };
}

u64_newtype!(
    /// A 64-bit virtual address; any value is valid, the page is the one containing it.
    VirtAddr,
    "VirtAddr({:#x})"
);
u64_newtype!(
    /// A virtual page number: a virtual address shifted right by the page-size bits.
    Vpn,
    "Vpn({:#x})"
);
u64_newtype!(
    /// A physical address (PhantomOS's `physaddr_t`).
    PhysAddr,
    "PhysAddr({:#x})"
);
u64_newtype!(
    /// A page number on the snapshot disk (PhantomOS's `disk_page_no_t`).
    DiskPage,
    "DiskPage({})"
);
u64_newtype!(
    /// A snapshot epoch: the period between two snapshots. Epoch 0 is "before the first snapshot".
    Epoch,
    "Epoch({})"
);

impl Epoch {
    /// The epoch after this one.
    #[inline]
    pub const fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}

/// A page size: a power of two from 512 bytes to 1 GiB. 4 KiB by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageSize {
    shift: u32,
}

impl PageSize {
    /// 4 KiB, the size PhantomOS uses.
    pub const KIB_4: PageSize = PageSize { shift: 12 };

    /// The page size `1 << shift`, or `None` when `shift` is outside `9..=30`.
    pub const fn from_shift(shift: u32) -> Option<PageSize> {
        if shift >= 9 && shift <= 30 {
            Some(PageSize { shift })
        } else {
            None
        }
    }

    /// The page size of `bytes`, or `None` unless it is a power of two in `512..=1 GiB`.
    pub const fn from_bytes(bytes: u64) -> Option<PageSize> {
        if bytes.is_power_of_two() {
            PageSize::from_shift(bytes.trailing_zeros())
        } else {
            None
        }
    }

    /// log2 of the size.
    #[inline]
    pub const fn shift(self) -> u32 {
        self.shift
    }

    /// The size in bytes.
    #[inline]
    pub const fn bytes(self) -> u64 {
        1 << self.shift
    }

    /// The page number of the page containing `addr`.
    #[inline]
    pub const fn vpn(self, addr: VirtAddr) -> Vpn {
        Vpn(addr.0 >> self.shift)
    }

    /// The first address of page `vpn`.
    #[inline]
    pub const fn addr(self, vpn: Vpn) -> VirtAddr {
        VirtAddr(vpn.0 << self.shift)
    }

    /// `addr` rounded down to the start of its page.
    #[inline]
    pub const fn align_down(self, addr: VirtAddr) -> VirtAddr {
        VirtAddr(addr.0 & !(self.bytes() - 1))
    }
}

impl Default for PageSize {
    fn default() -> Self {
        PageSize::KIB_4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_size_accepts_only_powers_of_two_in_range() {
        assert_eq!(PageSize::from_bytes(4096), Some(PageSize::KIB_4));
        assert_eq!(PageSize::from_bytes(4095), None);
        assert_eq!(PageSize::from_bytes(256), None);
        assert_eq!(PageSize::from_bytes(1 << 31), None);
        assert_eq!(PageSize::from_shift(21).map(PageSize::bytes), Some(2 << 20));
    }

    #[test]
    fn vpn_and_addr_round_trip_at_the_top_of_the_address_space() {
        let ps = PageSize::KIB_4;
        let top = VirtAddr(u64::MAX);
        assert_eq!(ps.vpn(top), Vpn(u64::MAX >> 12));
        assert_eq!(ps.addr(ps.vpn(top)), VirtAddr(!0xfff));
        assert_eq!(ps.align_down(VirtAddr(0x1234_5678)), VirtAddr(0x1234_5000));
    }

    #[test]
    fn newtypes_format_as_their_kind() {
        extern crate alloc;
        assert_eq!(alloc::format!("{}", VirtAddr(0x1000)), "VirtAddr(0x1000)");
        assert_eq!(alloc::format!("{:?}", Epoch(3).next()), "Epoch(4)");
    }
}
