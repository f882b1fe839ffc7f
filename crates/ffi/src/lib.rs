//! # pagesnap-ffi
//!
//! The design note's C interface, `vm_map_map.h`, over [`pagesnap_pagetable::PageTable`], so the
//! PhantomOS kernel (written in C) can link the page table: `cargo build --release -p pagesnap-ffi`
//! produces `target/release/libvm_map_map.a` and `libvm_map_map.so`; the header is
//! `crates/ffi/include/vm_map_map.h`.
//!
//! - One process-wide table, created by `vm_map_map_init` (idempotent; every function creates it
//!   on first use anyway).
//! - [`vm_page`] keeps PhantomOS's field names; its `#[repr(C)]` layout is checked against the
//!   header by a test that compiles C.
//! - Every function is thread-safe; no panic ever unwinds into C (a bug aborts the process with a
//!   message instead), and null pointers are rejected without undefined behaviour.
//!
//! See `docs/c-api.md`.

use pagesnap_pagetable::{
    DiskPage, Epoch, Page, PageFlags, PageTable, PhysAddr, VirtAddr, WalkLock,
};
use std::cell::Cell;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

/// PhantomOS's physical address type.
#[allow(non_camel_case_types)]
pub type physaddr_t = u64;
/// PhantomOS's disk page number type.
#[allow(non_camel_case_types)]
pub type disk_page_no_t = u64;

/// The C page descriptor (`vm_page` in `vm_map_map.h`), 72 bytes.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct vm_page {
    /// First address of the page.
    pub virt_addr: *mut c_void,
    /// Physical address, when `flag_phys_mem`.
    pub phys_addr: physaddr_t,
    /// Disk copy of the current state.
    pub curr_page: disk_page_no_t,
    /// Disk copy for the snapshot being made.
    pub make_page: disk_page_no_t,
    /// Disk copy in the previous snapshot.
    pub prev_page: disk_page_no_t,
    /// Epoch of the last modification.
    pub epoch: u64,
    /// Pager counter.
    pub access_count: u32,
    /// Pager counter.
    pub idle_count: u32,
    /// Pager counter.
    pub wired_count: u32,
    /// Pager I/O in flight.
    pub flag_pager_io_busy: u8,
    /// In physical memory.
    pub flag_phys_mem: u8,
    /// Write-protected.
    pub flag_phys_protect: u8,
    /// Written since last saved.
    pub flag_phys_dirty: u8,
    /// `curr_page` valid.
    pub flag_have_curr: u8,
    /// `make_page` valid.
    pub flag_have_make: u8,
    /// `prev_page` valid.
    pub flag_have_prev: u8,
    /// Always 0.
    pub reserved: u8,
}

/// The callback type of [`vm_map_map_do_for_all`].
#[allow(non_camel_case_types)]
pub type vmem_page_func_t = Option<extern "C" fn(p: *mut vm_page)>;

const FLAG_BITS: [PageFlags; 7] = [
    PageFlags::PAGER_IO_BUSY,
    PageFlags::PHYS_MEM,
    PageFlags::PHYS_PROTECT,
    PageFlags::PHYS_DIRTY,
    PageFlags::HAVE_CURR,
    PageFlags::HAVE_MAKE,
    PageFlags::HAVE_PREV,
];

impl vm_page {
    fn flag_bytes(&mut self) -> [&mut u8; 7] {
        [
            &mut self.flag_pager_io_busy,
            &mut self.flag_phys_mem,
            &mut self.flag_phys_protect,
            &mut self.flag_phys_dirty,
            &mut self.flag_have_curr,
            &mut self.flag_have_make,
            &mut self.flag_have_prev,
        ]
    }

    /// The C form of a descriptor.
    pub fn from_page(p: &Page) -> vm_page {
        let mut out = vm_page {
            virt_addr: p.vaddr.0 as usize as *mut c_void,
            phys_addr: p.paddr.0,
            curr_page: p.curr_page.0,
            make_page: p.make_page.0,
            prev_page: p.prev_page.0,
            epoch: p.epoch.0,
            access_count: p.access_count,
            idle_count: p.idle_count,
            wired_count: p.wired_count,
            flag_pager_io_busy: 0,
            flag_phys_mem: 0,
            flag_phys_protect: 0,
            flag_phys_dirty: 0,
            flag_have_curr: 0,
            flag_have_make: 0,
            flag_have_prev: 0,
            reserved: 0,
        };
        for (byte, flag) in out.flag_bytes().into_iter().zip(FLAG_BITS) {
            *byte = u8::from(p.flags.contains(flag));
        }
        out
    }

    /// The Rust form of a descriptor (any non-zero flag byte is "set").
    pub fn to_page(mut self) -> Page {
        let mut flags = PageFlags::empty();
        for (byte, flag) in self.flag_bytes().into_iter().zip(FLAG_BITS) {
            flags.set(flag, *byte != 0);
        }
        Page {
            vaddr: VirtAddr(self.virt_addr as usize as u64),
            paddr: PhysAddr(self.phys_addr),
            curr_page: DiskPage(self.curr_page),
            make_page: DiskPage(self.make_page),
            prev_page: DiskPage(self.prev_page),
            epoch: Epoch(self.epoch),
            access_count: self.access_count,
            idle_count: self.idle_count,
            wired_count: self.wired_count,
            flags,
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The process-wide table and the abort-safe boundary

static TABLE: OnceLock<PageTable> = OnceLock::new();

fn table() -> &'static PageTable {
    TABLE.get_or_init(PageTable::new)
}

/// Runs `f`; a panic (a bug in pagesnap) must not unwind into C, so it aborts with a message.
fn boundary<R>(name: &str, f: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => {
            eprintln!(
                "vm_map_map: internal error in {name}; aborting rather than unwinding into C"
            );
            std::process::abort()
        }
    }
}

/// `vm_map_set_page` and `vm_map_remove_page` return this when called from the callback of a
/// locked walk (`VM_MAP_ERR_IN_LOCKED_WALK` in the header).
pub const VM_MAP_ERR_IN_LOCKED_WALK: i32 = -3;

thread_local! {
    /// True while this thread runs `vm_map_map_do_for_all(func, lock != 0)`, which holds the
    /// writer lock: a writer called from `func` would wait for itself forever.
    static IN_LOCKED_WALK: Cell<bool> = const { Cell::new(false) };
}

fn in_locked_walk() -> bool {
    // During thread teardown the flag is gone; no walk can be running then.
    IN_LOCKED_WALK.try_with(Cell::get).unwrap_or(false)
}

/// Sets [`IN_LOCKED_WALK`] for its lifetime.
struct LockedWalk;

impl LockedWalk {
    fn enter() -> LockedWalk {
        IN_LOCKED_WALK.with(|f| f.set(true));
        LockedWalk
    }
}

impl Drop for LockedWalk {
    fn drop(&mut self) {
        IN_LOCKED_WALK.with(|f| f.set(false));
    }
}

/// For writers with no error channel: called from a locked walk's callback, abort with a message
/// naming the misuse rather than hang.
fn abort_if_in_locked_walk(name: &str) {
    if in_locked_walk() {
        eprintln!(
            "vm_map_map: {name} called from inside vm_map_map_do_for_all(func, lock != 0) (from \
             func, on the walking thread): the walk holds the writer lock, so it would wait for \
             itself forever; change the page through func's argument, walk with lock = 0, or use \
             vm_map_set_page / vm_map_remove_page, which return VM_MAP_ERR_IN_LOCKED_WALK; aborting"
        );
        std::process::abort();
    }
}

fn addr(v_addr: *mut c_void) -> VirtAddr {
    VirtAddr(v_addr as usize as u64)
}

/// Creates the page table (`vm_map_map_init`). Calling it again does nothing.
#[no_mangle]
pub extern "C" fn vm_map_map_init() {
    boundary("vm_map_map_init", || {
        table();
    })
}

/// A newly allocated, zeroed descriptor for the page containing `v_addr`, owned by the caller and
/// released with [`vm_map_page_free`] (`vm_map_page_init`).
#[no_mangle]
pub extern "C" fn vm_map_page_init(v_addr: *mut c_void) -> *mut vm_page {
    boundary("vm_map_page_init", || {
        let page = table().page_init(addr(v_addr));
        Box::into_raw(Box::new(vm_page::from_page(&page)))
    })
}

/// Releases a descriptor made by [`vm_map_page_init`]. Null is ignored.
///
/// # Safety
/// `p` is null or a pointer returned by `vm_map_page_init` and not yet freed.
#[no_mangle]
pub unsafe extern "C" fn vm_map_page_free(p: *mut vm_page) {
    boundary("vm_map_page_free", || {
        if !p.is_null() {
            // SAFETY: the caller passes a pointer from `vm_map_page_init` (`Box::into_raw`) that it
            // has not freed yet, so we own it and free it once.
            drop(unsafe { Box::from_raw(p) });
        }
    })
}

/// Reads a caller's descriptor, or `None` for null.
///
/// # Safety
/// `p` is null or points to a readable `vm_page`.
unsafe fn read_page(p: *const vm_page) -> Option<Page> {
    // SAFETY: the caller guarantees `p` is null or valid for reads; `as_ref` handles null.
    unsafe { p.as_ref() }.map(|v| v.to_page())
}

/// Stores a copy of `*new_page` (`set_page`). Null is ignored; a full table aborts (it never drops
/// a mapping silently), and so does a call from the callback of a locked
/// [`vm_map_map_do_for_all`] (it would wait for itself).
///
/// # Safety
/// `new_page` is null or points to a readable `vm_page`.
#[no_mangle]
pub unsafe extern "C" fn set_page(new_page: *mut vm_page) {
    boundary("set_page", || {
        abort_if_in_locked_walk("set_page");
        // SAFETY: forwarded from this function's contract.
        let Some(page) = (unsafe { read_page(new_page) }) else {
            return;
        };
        if let Err(e) = table().set_page(page) {
            eprintln!("vm_map_map: set_page: {e}; aborting rather than losing the mapping");
            std::process::abort();
        }
    })
}

/// [`set_page`] with a result: 0 stored, -1 null, -2 table full, -3
/// ([`VM_MAP_ERR_IN_LOCKED_WALK`]) called from the callback of a locked [`vm_map_map_do_for_all`]
/// (nothing stored).
///
/// # Safety
/// `new_page` is null or points to a readable `vm_page`.
#[no_mangle]
pub unsafe extern "C" fn vm_map_set_page(new_page: *const vm_page) -> i32 {
    boundary("vm_map_set_page", || {
        if in_locked_walk() {
            return VM_MAP_ERR_IN_LOCKED_WALK;
        }
        // SAFETY: forwarded from this function's contract.
        let Some(page) = (unsafe { read_page(new_page) }) else {
            return -1;
        };
        match table().set_page(page) {
            Ok(_) => 0,
            // The only error: the table is full.
            Err(_) => -2,
        }
    })
}

/// A copy of the descriptor of the page containing `v_addr` (`get_page`); for an unmapped page,
/// PhantomOS's "not allocated" descriptor (the page's address, everything else zero).
#[no_mangle]
pub extern "C" fn get_page(v_addr: *mut c_void) -> vm_page {
    boundary("get_page", || {
        let t = table();
        let page = t
            .get_page(addr(v_addr))
            .unwrap_or_else(|| t.page_init(addr(v_addr)));
        vm_page::from_page(&page)
    })
}

/// Copies the descriptor of the page containing `v_addr` into `*out`: 1 mapped, 0 not, -1 null.
///
/// # Safety
/// `out` is null or points to a writable `vm_page`.
#[no_mangle]
pub unsafe extern "C" fn vm_map_get_page(v_addr: *mut c_void, out: *mut vm_page) -> i32 {
    boundary("vm_map_get_page", || {
        if out.is_null() {
            return -1;
        }
        let found = table().get_page(addr(v_addr));
        if let Some(page) = found {
            // SAFETY: `out` is non-null and the caller guarantees it is writable.
            unsafe { out.write(vm_page::from_page(&page)) };
        }
        i32::from(found.is_some())
    })
}

/// Removes the mapping of the page containing `v_addr`: 1 if it was mapped, 0 if not, -3
/// ([`VM_MAP_ERR_IN_LOCKED_WALK`]) if called from the callback of a locked
/// [`vm_map_map_do_for_all`] (nothing removed).
#[no_mangle]
pub extern "C" fn vm_map_remove_page(v_addr: *mut c_void) -> i32 {
    boundary("vm_map_remove_page", || {
        if in_locked_walk() {
            return VM_MAP_ERR_IN_LOCKED_WALK;
        }
        i32::from(table().remove(addr(v_addr)).is_some())
    })
}

/// How many pages are mapped.
#[no_mangle]
pub extern "C" fn vm_map_page_count() -> u64 {
    boundary("vm_map_page_count", || table().len() as u64)
}

/// Calls `func` once for every mapping (`vm_map_map_do_for_all`). `lock != 0`: writers wait until
/// the walk ends and `func`'s changes are stored. `lock == 0`: `func` sees consistent copies and its
/// changes are discarded. A null `func` is ignored.
///
/// With `lock != 0`, `func` must not call a writer: `vm_map_set_page` and `vm_map_remove_page`
/// return [`VM_MAP_ERR_IN_LOCKED_WALK`], and `set_page` or a nested locked walk abort the process
/// with a message (they have no error channel, and would otherwise wait for themselves forever).
#[no_mangle]
pub extern "C" fn vm_map_map_do_for_all(func: vmem_page_func_t, lock: i32) {
    boundary("vm_map_map_do_for_all", || {
        let Some(func) = func else { return };
        let (mode, _walk) = if lock != 0 {
            abort_if_in_locked_walk("vm_map_map_do_for_all(lock != 0)");
            (WalkLock::Map, Some(LockedWalk::enter()))
        } else {
            (WalkLock::None, None)
        };
        table().for_each(mode, |page| {
            let mut c = vm_page::from_page(page);
            func(&mut c);
            *page = c.to_page();
        });
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_round_trips_through_the_c_form() {
        let page = Page {
            vaddr: VirtAddr(0xffff_8000_0000_0000),
            paddr: PhysAddr(0x1000),
            curr_page: DiskPage(1),
            make_page: DiskPage(2),
            prev_page: DiskPage(3),
            epoch: Epoch(4),
            access_count: 5,
            idle_count: 6,
            wired_count: 7,
            flags: PageFlags::PHYS_MEM | PageFlags::HAVE_PREV | PageFlags::PAGER_IO_BUSY,
        };
        let c = vm_page::from_page(&page);
        assert_eq!(
            (
                c.flag_phys_mem,
                c.flag_have_prev,
                c.flag_pager_io_busy,
                c.flag_phys_dirty
            ),
            (1, 1, 1, 0)
        );
        assert_eq!(c.to_page(), page);
        // Any non-zero byte is "set".
        let c = vm_page {
            flag_phys_dirty: 0x80,
            ..c
        };
        assert!(c.to_page().flags.contains(PageFlags::PHYS_DIRTY));
    }

    #[test]
    fn null_pointers_are_rejected() {
        // SAFETY: null is allowed by the function's contract.
        let set = unsafe { vm_map_set_page(std::ptr::null()) };
        assert_eq!(set, -1);
        // SAFETY: null is allowed by the function's contract.
        let got = unsafe { vm_map_get_page(std::ptr::null_mut(), std::ptr::null_mut()) };
        assert_eq!(got, -1);
        // SAFETY: null is allowed by the function's contract.
        unsafe { set_page(std::ptr::null_mut()) };
        // SAFETY: null is allowed by the function's contract.
        unsafe { vm_map_page_free(std::ptr::null_mut()) };
        vm_map_map_do_for_all(None, 1);
    }
}
