//! Huge-page chunks for the table's arrays (`std` builds on Linux; issue 18).
//!
//! A lookup at a million mappings touches a random bucket and a random slot: two TLB misses on
//! 4 KiB pages (the buckets alone are 2,700 pages at 1 Mi mappings, past what the TLB holds). So
//! past their first 2 MiB, the segments of an array are carved from 2 MiB chunks aligned to 2 MiB,
//! mapped straight from the OS, which the kernel can back with one transparent huge page each.
//!
//! A chunk costs only what is used of it: it is mapped with `MADV_NOHUGEPAGE`, so the segments
//! carved from it are faulted in 4 KiB at a time as they are initialised (the untouched rest of the
//! chunk is address space, not memory, whatever the system's THP mode). When its last segment is
//! carved — the whole 2 MiB initialised — the chunk is advised `MADV_HUGEPAGE` and collapsed into
//! a huge page at once (`MADV_COLLAPSE`, Linux 6.1; on older kernels, or when no huge page is free,
//! khugepaged may collapse it later, or it stays on 4 KiB pages: nothing else changes). Virtual
//! addresses never change, so elements never move. The collapse runs in the writer that carved the
//! last segment, under the writer lock; a reader that touches the chunk while the kernel copies it
//! into the huge page waits in a page fault until the copy is done (`docs/concurrency.md`).
//!
//! Every call's failure falls back: a chunk that cannot be mapped means a segment from the global
//! allocator, as without `std`.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};

/// Whether arrays grown from now on carve huge-page chunks (off unless asked for).
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns huge-page chunks on or off for the arrays of every table of this process, for the
/// segments they grow from now on; returns whether they are on. Off by default: the collapse of
/// a full chunk makes a reader that touches it meanwhile wait in a page fault (up to a few
/// milliseconds; `docs/concurrency.md`), which breaks "readers never wait" — a caller trades
/// that for ~20% faster lookups at a million mappings. Stays off where the system's THP mode is
/// `never` (`MADV_COLLAPSE` would ignore it).
pub fn set_huge_pages(on: bool) -> bool {
    let on = on && !thp_never();
    ENABLED.store(on, Ordering::Relaxed);
    on
}

/// Whether huge-page chunks are on ([`set_huge_pages`]).
pub(crate) fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The system's transparent huge pages are `never`.
fn thp_never() -> bool {
    extern crate std;
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| s.contains("[never]"))
}

/// Bytes in a chunk: one x86-64 / AArch64 (4 KiB granule) huge page.
pub(crate) const CHUNK: usize = 2 << 20;

/// `MADV_COLLAPSE` (Linux 6.1), not in every libc crate version.
const MADV_COLLAPSE: libc::c_int = 25;

/// Maps a fresh, untouched, zero-filled chunk of [`CHUNK`] bytes aligned to [`CHUNK`], or `None`.
pub(crate) fn map_chunk() -> Option<NonNull<u8>> {
    let len = 2 * CHUNK;
    // SAFETY: an anonymous private mapping at an address of the kernel's choosing: it aliases
    // nothing and touches no existing memory.
    let raw = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return None;
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(CHUNK);
    let (head, tail) = (aligned - start, start + len - (aligned + CHUNK));
    if head > 0 {
        // SAFETY: the range is inside the mapping just made, before the aligned chunk kept, and
        // nothing refers to it.
        unsafe { libc::munmap(raw, head) };
    }
    if tail > 0 {
        // SAFETY: the range is inside the mapping just made, after the aligned chunk kept, and
        // nothing refers to it.
        unsafe { libc::munmap((aligned + CHUNK) as *mut libc::c_void, tail) };
    }
    let chunk = aligned as *mut u8;
    // Untouched pages stay unbacked until a segment is carved and initialised: no huge page yet,
    // even where THP is "always" (advice only; failure changes nothing but the page size).
    // SAFETY: the chunk is a mapping this function owns; advice does not change its contents.
    unsafe { libc::madvise(chunk.cast(), CHUNK, libc::MADV_NOHUGEPAGE) };
    NonNull::new(chunk)
}

/// Asks for the (fully initialised) chunk at `chunk` to be backed by a huge page, now; true if
/// the kernel collapsed it. Advice: the contents and addresses do not change, and failure leaves
/// 4 KiB pages.
pub(crate) fn back_with_huge_page(chunk: NonNull<u8>) -> bool {
    let p = chunk.as_ptr().cast();
    // SAFETY: `p` is a chunk from `map_chunk`, still mapped; this advice only changes which page
    // size may back it.
    let advised = unsafe { libc::madvise(p, CHUNK, libc::MADV_HUGEPAGE) } == 0;
    // SAFETY: as above; a collapse copies the chunk into a huge page and maps that at the same
    // addresses, keeping every byte as it was (and fails harmlessly where unsupported).
    advised && unsafe { libc::madvise(p, CHUNK, MADV_COLLAPSE) } == 0
}

/// Unmaps a chunk.
///
/// # Safety
/// `chunk` came from [`map_chunk`], is unmapped once, and nothing refers into it any more.
pub(crate) unsafe fn unmap_chunk(chunk: NonNull<u8>) {
    // SAFETY: the caller's contract.
    unsafe { libc::munmap(chunk.as_ptr().cast(), CHUNK) };
}

/// Whether the page at `p` is backed by a huge page (`/proc/self/smaps`), for tests.
#[cfg(test)]
pub(crate) fn is_huge(p: *const u8) -> Option<bool> {
    extern crate std;
    use std::string::String;
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let addr = p as usize;
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                inside = (a..b).contains(&addr);
                continue;
            }
        }
        if inside {
            if let Some(kb) = line.strip_prefix("AnonHugePages:") {
                let kb: String = kb.chars().filter(char::is_ascii_digit).collect();
                return Some(kb.parse::<usize>().ok()? > 0);
            }
        }
    }
    None
}
