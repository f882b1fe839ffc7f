//! An append-only array of fixed-size segments with lock-free indexed reads.
//!
//! Elements never move once allocated, so an index is a stable name for an element (the page
//! table's slot handles rely on this), and growing never copies or frees anything a reader might be
//! looking at: there is nothing to reclaim while the array lives.
//!
//! The directory is a single level: one array of segment pointers, so a read is the directory
//! pointer, one directory entry and the element (the two-level radix it replaced cost one more
//! dependent load and two null checks a lookup). When the directory is full, a writer copies it
//! into one twice as large and publishes that; the old one is kept, unchanged, until the array is
//! dropped (a reader may still be reading it). Old directories add up to less than the current
//! one: 8 bytes per segment at most, against a segment's 64 KiB or more.
//!
//! In `std` builds on Linux, the segments past an array's first 2 MiB are carved from 2 MiB
//! chunks that the kernel backs with a huge page once they are full (`huge.rs`); the rest of this
//! file, and every reader, is the same either way.

use crate::sync::{AtomicPtr, AtomicUsize, Ordering};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr;

/// The most segments an array can have.
#[cfg(not(loom))]
const MAX_SEGS: usize = 1 << 20;
#[cfg(loom)]
const MAX_SEGS: usize = 8;
/// Directory entries allocated with the first segment.
#[cfg(not(loom))]
const FIRST_DIR: usize = 16;
#[cfg(loom)]
const FIRST_DIR: usize = 1;

/// Segments of `1 << SEG_SHIFT` elements of `T`, created with `T::default()`.
///
/// Reads ([`get`](Self::get), [`capacity`](Self::capacity)) may run on any thread at any time;
/// [`reserve`](Self::reserve) must be serialised by the caller (the page table calls it only under
/// its writer lock).
pub(crate) struct SegVec<T, const SEG_SHIFT: u32> {
    /// The directory: the first of `dir_cap` segment pointers, of which the first `segments` are
    /// set. Replaced (never changed in place below `segments`) when it is full.
    dir: AtomicPtr<AtomicPtr<T>>,
    /// Segments published: every directory entry below it is set in every directory published
    /// after it was stored.
    segments: AtomicUsize,
    /// Writer-only: entries in the current directory (0 before the first segment).
    dir_cap: AtomicUsize,
    /// Writer-only: directories replaced by larger ones, freed on drop.
    old_dirs: spin::mutex::SpinMutex<Vec<(*mut AtomicPtr<T>, usize)>>,
    /// Writer-only: the huge-page chunks segments are carved from (see `huge.rs`).
    #[cfg(huge_pages)]
    chunks: spin::mutex::SpinMutex<Chunks>,
}

/// Huge-page chunks of one array: every chunk mapped (unmapped on drop), and how many segments
/// were carved from the last one.
#[cfg(huge_pages)]
#[derive(Default)]
struct Chunks {
    mapped: Vec<core::ptr::NonNull<u8>>,
    carved: usize,
}

impl<T: Default, const SEG_SHIFT: u32> SegVec<T, SEG_SHIFT> {
    const SEG: usize = 1 << SEG_SHIFT;

    pub(crate) fn new() -> Self {
        SegVec {
            dir: AtomicPtr::new(ptr::null_mut()),
            segments: AtomicUsize::new(0),
            dir_cap: AtomicUsize::new(0),
            old_dirs: spin::mutex::SpinMutex::new(Vec::new()),
            #[cfg(huge_pages)]
            chunks: spin::mutex::SpinMutex::new(Chunks::default()),
        }
    }

    /// The most elements this array can ever hold.
    pub(crate) const fn max_len() -> usize {
        MAX_SEGS << SEG_SHIFT
    }

    /// How many elements are allocated.
    pub(crate) fn capacity(&self) -> usize {
        self.segments.load(Ordering::Relaxed) << SEG_SHIFT
    }

    /// The element at `i`, or `None` if its segment does not exist (yet). Lock-free.
    #[inline]
    pub(crate) fn get(&self, i: usize) -> Option<&T> {
        // Segments first: every directory published from now on has entry `k` set (a directory
        // loaded before this could be one too small for `k`).
        if i >> SEG_SHIFT >= self.segments.load(Ordering::Acquire) {
            return None;
        }
        // SAFETY: the segment count that admits `i` was just acquired.
        Some(unsafe { self.get_published(i) })
    }

    /// The element at `i`, without checking that it exists. Lock-free.
    ///
    /// # Safety
    /// `i` is below a capacity that happens-before this call: this thread loaded (`Acquire`) a
    /// segment count above `i >> SEG_SHIFT`, or acquired a `Release` store made after
    /// [`reserve`](Self::reserve) covered `i` (the page table's shape word names only buckets
    /// reserved before it was stored).
    #[inline]
    pub(crate) unsafe fn get_published(&self, i: usize) -> &T {
        let k = i >> SEG_SHIFT;
        // Under loom, check the caller's claim: a count stored before what the caller acquired is
        // what any later load sees at least (coherence).
        #[cfg(loom)]
        assert!(
            k < self.segments.load(Ordering::Relaxed),
            "segment {k} read before it was published"
        );
        let dir = self.dir.load(Ordering::Acquire);
        // SAFETY: segment `k` was published before something this thread acquired (the caller's
        // contract), so the directory this Acquire load returns — that one or a later one,
        // published with Release in `grow_dir` after its entries were copied — has more than `k`
        // entries and entry `k` set; directories are freed only in `drop`, which has `&mut self`.
        let entry = unsafe { &*dir.wrapping_add(k) };
        let seg = entry.load(Ordering::Relaxed);
        // SAFETY: a set directory entry is a segment from `Box::into_raw` of a non-empty slice,
        // never null. Telling the compiler spares the caller a null test of the result.
        unsafe { core::hint::assert_unchecked(!seg.is_null()) };
        // SAFETY: `seg` is the first of `SEG` elements of one allocation (`reserve`), and the
        // offset is below `SEG`: the result stays inside it (and, `seg` being non-null, is
        // non-null, which the compiler now knows too).
        let element = unsafe { seg.add(i & (Self::SEG - 1)) };
        // SAFETY: the elements were initialised in `reserve` before the segment was published (see
        // above), and are freed only in `drop`.
        unsafe { &*element }
    }

    /// Allocates segments until `len` elements fit. Callers serialise calls (the table's writer
    /// lock); readers may run concurrently. Returns false if `len` exceeds [`Self::max_len`].
    pub(crate) fn reserve(&self, len: usize) -> bool {
        if len > Self::max_len() {
            return false;
        }
        while self.capacity() < len {
            self.grow();
        }
        true
    }

    fn grow(&self) {
        let n = self.segments.load(Ordering::Relaxed);
        if n == self.dir_cap.load(Ordering::Relaxed) {
            self.grow_dir(n);
        }
        let seg = self.new_segment(n);
        let dir = self.dir.load(Ordering::Relaxed);
        // SAFETY: the current directory has `dir_cap > n` entries (just ensured) and lives until
        // `drop`; only this (serialised) writer stores into it.
        unsafe { &*dir.wrapping_add(n) }.store(seg, Ordering::Relaxed);
        // Publishes the segment's elements and the directory entry naming it.
        self.segments.store(n + 1, Ordering::Release);
    }

    /// A fresh segment of `SEG` default elements, the `n`th of the array: carved from a huge-page
    /// chunk past the first 2 MiB of the array (where huge pages are built in), else boxed.
    fn new_segment(&self, n: usize) -> *mut T {
        #[cfg(huge_pages)]
        if let Some(seg) = self.carve_segment(n) {
            return seg;
        }
        let _ = n;
        let seg: Box<[T]> = (0..Self::SEG).map(|_| T::default()).collect();
        Box::into_raw(seg).cast::<T>()
    }

    /// Bytes in a segment.
    #[cfg(huge_pages)]
    const SEG_BYTES: usize = Self::SEG * core::mem::size_of::<T>();

    /// Whether the `n`th segment comes from a chunk: segments that tile a chunk exactly, past the
    /// first chunk's worth (so a small array maps nothing and wastes nothing).
    #[cfg(huge_pages)]
    fn chunked(n: usize) -> bool {
        let per_chunk = crate::huge::CHUNK / Self::SEG_BYTES.max(1);
        Self::SEG_BYTES > 0
            && crate::huge::CHUNK.is_multiple_of(Self::SEG_BYTES)
            && core::mem::align_of::<T>() <= crate::huge::CHUNK
            && per_chunk >= 2
            && n >= per_chunk
    }

    /// The `n`th segment, carved from the current chunk (a new one when it is full), initialised;
    /// the chunk is backed by a huge page once its last segment is carved. `None` if the segment
    /// is not to be chunked or no chunk could be mapped.
    #[cfg(huge_pages)]
    fn carve_segment(&self, n: usize) -> Option<*mut T> {
        if !Self::chunked(n) || !crate::huge::enabled() {
            return None;
        }
        let per_chunk = crate::huge::CHUNK / Self::SEG_BYTES;
        let mut chunks = self.chunks.lock();
        if chunks.mapped.is_empty() || chunks.carved == per_chunk {
            let chunk = crate::huge::map_chunk()?;
            chunks.mapped.push(chunk);
            chunks.carved = 0;
        }
        let chunk = *chunks.mapped.last()?;
        let seg = chunk
            .as_ptr()
            .wrapping_add(chunks.carved * Self::SEG_BYTES)
            .cast::<T>();
        for k in 0..Self::SEG {
            // Segment `carved` of the chunk is `SEG_BYTES` of mapped, writable memory inside it
            // (`carved < per_chunk`), so element `k < SEG` of it is too.
            let element = seg.wrapping_add(k);
            // SAFETY: `element` is inside the chunk (above), aligned for `T` (the chunk is aligned
            // to CHUNK, `SEG_BYTES` is a multiple of `size_of::<T>()`, itself a multiple of
            // `align_of`), and no one else refers to it: it was never handed out.
            unsafe { element.write(T::default()) };
        }
        chunks.carved += 1;
        Some(seg)
    }

    /// Replaces a full directory of `n` entries by one twice as large (the first by one of
    /// `FIRST_DIR`), keeping the old one until drop.
    fn grow_dir(&self, n: usize) {
        let cap = if n == 0 { FIRST_DIR } else { n * 2 }.min(MAX_SEGS);
        let old = self.dir.load(Ordering::Relaxed);
        let fresh: Box<[AtomicPtr<T>]> = (0..cap)
            .map(|k| {
                AtomicPtr::new(if k < n {
                    // SAFETY: `old` has `n` entries, all set (it was full), and lives until drop.
                    unsafe { &*old.wrapping_add(k) }.load(Ordering::Relaxed)
                } else {
                    ptr::null_mut()
                })
            })
            .collect();
        let fresh = Box::into_raw(fresh).cast::<AtomicPtr<T>>();
        // Readers that acquire a later `segments` acquire this directory or a later one.
        self.dir.store(fresh, Ordering::Release);
        self.dir_cap.store(cap, Ordering::Relaxed);
        if !old.is_null() {
            self.old_dirs.lock().push((old, n));
        }
    }

    /// Bytes of the segments carved from huge-page chunks (counted in [`Self::heap_bytes`]; mapped
    /// from the OS, so a counting global allocator does not see them).
    pub(crate) fn chunk_bytes(&self) -> usize {
        #[cfg(huge_pages)]
        {
            let chunks = self.chunks.lock();
            // Whole chunks: a chunk is resident whole from its first segment (one huge page).
            chunks.mapped.len() * crate::huge::CHUNK
        }
        #[cfg(not(huge_pages))]
        {
            0
        }
    }

    /// Heap bytes held: segments plus directories. A chunk's segments not yet carved are address
    /// space only (never touched), and are not counted.
    pub(crate) fn heap_bytes(&self) -> usize {
        let segs = self.segments.load(Ordering::Relaxed);
        let dirs: usize = self.dir_cap.load(Ordering::Relaxed)
            + self.old_dirs.lock().iter().map(|d| d.1).sum::<usize>();
        segs * Self::SEG * core::mem::size_of::<T>()
            + dirs * core::mem::size_of::<AtomicPtr<T>>()
            + self.old_dirs.lock().capacity() * core::mem::size_of::<(*mut AtomicPtr<T>, usize)>()
    }
}

impl<T, const SEG_SHIFT: u32> Drop for SegVec<T, SEG_SHIFT> {
    fn drop(&mut self) {
        let seg_len = 1usize << SEG_SHIFT;
        let segs = self.segments.load(Ordering::Relaxed);
        let dir = self.dir.load(Ordering::Relaxed);
        for k in 0..segs {
            // SAFETY: the current directory has every entry below `segments` set; `&mut self`
            // means no reader can hold a reference any more.
            let seg = unsafe { &*dir.wrapping_add(k) }.load(Ordering::Relaxed);
            #[cfg(huge_pages)]
            if Self::chunked_segment(self.chunks.get_mut(), seg) {
                // SAFETY: an initialised segment of `seg_len` elements carved from a chunk, named
                // once in the directory; its memory is unmapped with the chunks below.
                unsafe { ptr::drop_in_place(ptr::slice_from_raw_parts_mut(seg, seg_len)) };
                continue;
            }
            // SAFETY: made by `Box::<[T]>::into_raw` with `seg_len` elements in `grow`; each
            // segment is named once in the current directory, so it is freed once here.
            drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(seg, seg_len)) });
        }
        let cap = self.dir_cap.load(Ordering::Relaxed);
        let old = core::mem::take(self.old_dirs.get_mut());
        for (d, len) in old
            .into_iter()
            .chain((!dir.is_null()).then_some((dir, cap)))
        {
            // SAFETY: every directory was made by `Box::<[AtomicPtr<T>]>::into_raw` with `len`
            // entries in `grow_dir`, recorded once (old ones in `old_dirs`, the current one in
            // `dir`), and is freed once here.
            drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(d, len)) });
        }
        #[cfg(huge_pages)]
        for chunk in core::mem::take(&mut self.chunks.get_mut().mapped) {
            // SAFETY: every chunk was mapped once by `carve_segment` and recorded once; the
            // segments carved from it were dropped above and nothing refers into it (`&mut self`).
            unsafe { crate::huge::unmap_chunk(chunk) };
        }
    }
}

#[cfg(huge_pages)]
impl<T, const SEG_SHIFT: u32> SegVec<T, SEG_SHIFT> {
    /// Whether `seg` lies in one of `chunks` (it was carved, not boxed).
    fn chunked_segment(chunks: &Chunks, seg: *mut T) -> bool {
        let at = seg as usize;
        chunks
            .mapped
            .iter()
            .any(|c| (c.as_ptr() as usize..c.as_ptr() as usize + crate::huge::CHUNK).contains(&at))
    }
}

// SAFETY: the array hands out `&T` to any thread and `T` values are created on one thread and
// dropped on another, exactly like a `Vec<T>` behind an `Arc`: `T: Send + Sync` suffices. The raw
// pointers it holds (directories, segments) are owned by it and freed only in `drop`.
unsafe impl<T: Send + Sync, const S: u32> Send for SegVec<T, S> {}
// SAFETY: as above; all shared mutation is through atomics (the directory list of old directories
// is behind a lock).
unsafe impl<T: Send + Sync, const S: u32> Sync for SegVec<T, S> {}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sync::AtomicU64;

    #[test]
    fn elements_keep_their_address_while_the_array_grows() {
        let v: SegVec<AtomicU64, 2> = SegVec::new();
        assert!(v.get(0).is_none());
        assert!(v.reserve(3));
        assert_eq!(v.capacity(), 4);
        let first = v.get(0).map(|e| e as *const AtomicU64);
        v.get(3).expect("reserved").store(33, Ordering::Relaxed);
        assert!(v.get(4).is_none());
        // 1,250 segments: the directory is replaced seven times (16, 32, ..., 2048 entries).
        assert!(v.reserve(5000));
        assert_eq!(v.get(0).map(|e| e as *const AtomicU64), first);
        assert_eq!(v.get(3).map(|e| e.load(Ordering::Relaxed)), Some(33));
        assert_eq!(v.get(4999).map(|e| e.load(Ordering::Relaxed)), Some(0));
        assert!(v.get(v.capacity()).is_none());
        assert!(v.heap_bytes() >= 5000 * 8);
        assert_eq!(v.old_dirs.lock().len(), 7);
    }

    #[test]
    fn reserve_refuses_more_than_the_directory_can_name() {
        let v: SegVec<AtomicU64, 2> = SegVec::new();
        assert!(!v.reserve(SegVec::<AtomicU64, 2>::max_len() + 1));
        assert!(v.get(usize::MAX).is_none());
    }

    /// Past the first 2 MiB, segments are carved from huge-page chunks: elements are initialised,
    /// keep their address and contents through the collapse into a huge page, the bytes are
    /// counted, and every element is dropped once (the carved ones in place, before the chunks are
    /// unmapped).
    #[cfg(huge_pages)]
    #[test]
    fn segments_past_the_first_chunk_are_carved_from_huge_pages() {
        use core::sync::atomic::AtomicUsize as Count;
        static DROPS: Count = Count::new(0);
        #[derive(Default)]
        struct Elem(AtomicU64);
        impl Drop for Elem {
            fn drop(&mut self) {
                DROPS.fetch_add(1, Ordering::Relaxed);
            }
        }
        // 2^15 elements of 8 bytes: 256 KiB segments, 8 to a chunk. 20 segments: 8 boxed, then
        // one chunk carved whole (one huge page each) and 4 segments of the next.
        const SHIFT: u32 = 15;
        type V = SegVec<Elem, SHIFT>;
        if !crate::huge::set_huge_pages(true) {
            return; // THP `never` here: nothing is carved.
        }
        let seg = 1usize << SHIFT;
        let v: V = SegVec::new();
        assert!(v.reserve(8 * seg));
        assert_eq!(v.chunk_bytes(), 0, "the first 2 MiB are boxed");
        assert!(v.reserve(20 * seg));
        assert_eq!(
            v.chunk_bytes(),
            2 * crate::huge::CHUNK,
            "two chunks, counted whole"
        );
        assert_eq!(v.chunks.lock().mapped.len(), 2);
        let first = v.get(8 * seg).map(|e| e as *const Elem as usize);
        assert_eq!(first.map(|a| a % crate::huge::CHUNK), Some(0));
        for i in 0..20 * seg {
            let e = v.get(i).expect("reserved");
            assert_eq!(e.0.load(Ordering::Relaxed), 0);
            e.0.store(i as u64 ^ 0x5a5a, Ordering::Relaxed);
        }
        // Each chunk was faulted in as one huge page by its first segment's initialisation
        // (where the kernel had one free).
        let c = *v.chunks.lock().mapped.first().expect("chunk");
        std::println!(
            "first chunk on a huge page: {:?}",
            crate::huge::is_huge(c.as_ptr())
        );
        for i in 0..20 * seg {
            assert_eq!(
                v.get(i).map(|e| e.0.load(Ordering::Relaxed)),
                Some(i as u64 ^ 0x5a5a)
            );
        }
        assert_eq!(v.get(8 * seg).map(|e| e as *const Elem as usize), first);
        DROPS.store(0, Ordering::Relaxed);
        drop(v);
        assert_eq!(DROPS.load(Ordering::Relaxed), 20 * seg);
    }

    #[cfg(feature = "std")]
    #[test]
    fn readers_see_every_element_while_a_writer_grows_the_directory() {
        let v: SegVec<AtomicU64, 1> = SegVec::new();
        std::thread::scope(|s| {
            let v = &v;
            s.spawn(move || {
                for len in 1..=4096 {
                    assert!(v.reserve(len));
                    v.get(len - 1)
                        .expect("reserved")
                        .store(len as u64, Ordering::Relaxed);
                }
            });
            s.spawn(move || {
                let mut seen = 0;
                while seen < 4096 {
                    let cap = v.capacity();
                    for i in 0..cap {
                        assert!(v.get(i).is_some(), "element {i} of {cap} missing");
                    }
                    seen = cap;
                }
            });
        });
    }
}
