//! Huge-page chunks for the table's arrays (`std` builds on Linux; issue 18; opt-in with
//! [`set_huge_pages`]).
//!
//! A lookup at a million mappings touches a random bucket and a random slot: two TLB misses on
//! 4 KiB pages (the buckets alone are 2,700 pages at 1 Mi mappings, past what the TLB holds). So
//! past their first 2 MiB, the segments of an array are carved from 2 MiB chunks aligned to 2 MiB,
//! mapped straight from the OS and advised `MADV_HUGEPAGE` at once: the writer's first touch, when
//! it initialises the chunk's first segment, faults in one zero-filled huge page for all of it.
//! Every segment is initialised before it is published, so a reader only ever touches memory that
//! is already mapped: no reader waits on the kernel for the table's sake, and nothing is ever
//! copied or collapsed. (An earlier version mapped chunks on 4 KiB pages and collapsed each full
//! one with `MADV_COLLAPSE`, under the writer lock; a reader touching the chunk meanwhile waited
//! in a page fault, and a writer up to milliseconds. A review measured both; this is the fix.)
//!
//! The price is memory: the chunk being filled is resident whole, up to 2 MiB more per array than
//! it uses. Where no huge page is free, or THP is `never`, the kernel backs the chunk with 4 KiB
//! pages as they are first written, by the writer, before anything is published. Every call's
//! failure falls back: a chunk that cannot be mapped means a segment from the global allocator,
//! as without `std`.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};

/// Whether arrays grown from now on carve huge-page chunks (off unless asked for).
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns huge-page chunks on or off for the arrays of every table of this process, for the
/// segments they grow from now on; returns whether they are on. Off by default, for memory: the
/// chunk being filled is resident whole, up to 2 MiB per array more than it holds — at a million
/// mappings a few bytes a mapping, at a few hundred thousand past the 1.3× of the descriptor
/// that the table otherwise keeps. On, lookups at a million mappings run ~15–20% faster (fewer
/// TLB misses; `docs/benchmarks.md`). Stays off where the system's THP mode is `never`.
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
    // The first write (the writer initialising the first segment, before it is published) faults
    // in one huge page for the whole chunk (advice only; failure changes nothing but the page
    // size).
    // SAFETY: the chunk is a mapping this function owns; advice does not change its contents.
    unsafe { libc::madvise(chunk.cast(), CHUNK, libc::MADV_HUGEPAGE) };
    NonNull::new(chunk)
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
