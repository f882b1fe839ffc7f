//! An append-only array of fixed-size segments with lock-free indexed reads.
//!
//! Elements never move once allocated, so an index is a stable name for an element (the page
//! table's slot handles rely on this), and growing never copies or frees anything a reader might be
//! looking at: there is nothing to reclaim while the array lives. The directory is a fixed
//! two-level radix (`top` → `mid` → segment), allocated on demand.

use crate::sync::{AtomicPtr, AtomicUsize, Ordering};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr;

#[cfg(not(loom))]
const MID_SHIFT: u32 = 10;
#[cfg(loom)]
const MID_SHIFT: u32 = 1;
#[cfg(not(loom))]
const TOP: usize = 1024;
#[cfg(loom)]
const TOP: usize = 4;
const MID: usize = 1 << MID_SHIFT;

struct Mid<T> {
    segs: [AtomicPtr<T>; MID],
}

/// Segments of `1 << SEG_SHIFT` elements of `T`, created with `T::default()`.
pub(crate) struct SegVec<T, const SEG_SHIFT: u32> {
    top: Box<[AtomicPtr<Mid<T>>]>,
    segments: AtomicUsize,
}

impl<T: Default, const SEG_SHIFT: u32> SegVec<T, SEG_SHIFT> {
    const SEG: usize = 1 << SEG_SHIFT;

    pub(crate) fn new() -> Self {
        SegVec {
            top: (0..TOP).map(|_| AtomicPtr::new(ptr::null_mut())).collect(),
            segments: AtomicUsize::new(0),
        }
    }

    /// The most elements this array can ever hold.
    pub(crate) const fn max_len() -> usize {
        TOP << (MID_SHIFT + SEG_SHIFT)
    }

    /// How many elements are allocated.
    pub(crate) fn capacity(&self) -> usize {
        self.segments.load(Ordering::Relaxed) << SEG_SHIFT
    }

    /// The element at `i`, or `None` if its segment does not exist (yet). Lock-free.
    #[inline]
    pub(crate) fn get(&self, i: usize) -> Option<&T> {
        let mid = self
            .top
            .get(i >> (SEG_SHIFT + MID_SHIFT))?
            .load(Ordering::Acquire);
        if mid.is_null() {
            return None;
        }
        // SAFETY: a non-null `mid` was made by `Box::into_raw` in `grow` and published with a
        // Release store after it was initialised (this Acquire load pairs with it); it is freed only
        // in `drop`, which has `&mut self`, so it outlives the `&self` borrow we return.
        let mid = unsafe { &*mid };
        let seg = mid.segs[(i >> SEG_SHIFT) & (MID - 1)].load(Ordering::Acquire);
        if seg.is_null() {
            return None;
        }
        let elem = seg.wrapping_add(i & (Self::SEG - 1));
        // SAFETY: `seg` points at the first of `SEG` initialised elements made by `grow` (published
        // with Release, acquired above) and freed only in `drop`; the offset is below `SEG`.
        Some(unsafe { &*elem })
    }

    /// Allocates segments until `len` elements fit. Called by writers (under the table's writer
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
        let ti = n >> MID_SHIFT;
        let mut mid = self.top[ti].load(Ordering::Acquire);
        if mid.is_null() {
            let fresh = Box::into_raw(Box::new(Mid {
                segs: core::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
            }));
            match self.top[ti].compare_exchange(
                ptr::null_mut(),
                fresh,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => mid = fresh,
                Err(existing) => {
                    // SAFETY: `fresh` came from `Box::into_raw` just above and was never shared.
                    drop(unsafe { Box::from_raw(fresh) });
                    mid = existing;
                }
            }
        }
        // SAFETY: `mid` is non-null, made by `Box::into_raw` and freed only in `drop` (see `get`).
        let mid = unsafe { &*mid };
        let seg: Box<[T]> = (0..Self::SEG).map(|_| T::default()).collect();
        let seg = Box::into_raw(seg).cast::<T>();
        let slot = &mid.segs[n & (MID - 1)];
        if slot
            .compare_exchange(ptr::null_mut(), seg, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // SAFETY: `seg` is the unshared allocation of `SEG` elements made just above.
            drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(seg, Self::SEG)) });
        }
        self.segments.store(n + 1, Ordering::Relaxed);
    }

    /// Heap bytes held: segments plus directory.
    pub(crate) fn heap_bytes(&self) -> usize {
        let segs = self.segments.load(Ordering::Relaxed);
        let mids = segs.div_ceil(MID);
        segs * Self::SEG * core::mem::size_of::<T>()
            + mids * core::mem::size_of::<Mid<T>>()
            + TOP * core::mem::size_of::<AtomicPtr<Mid<T>>>()
    }
}

impl<T, const SEG_SHIFT: u32> Drop for SegVec<T, SEG_SHIFT> {
    fn drop(&mut self) {
        let seg_len = 1usize << SEG_SHIFT;
        let mut mids = Vec::new();
        for top in self.top.iter() {
            let mid = top.load(Ordering::Acquire);
            if !mid.is_null() {
                mids.push(mid);
            }
        }
        for mid in mids {
            // SAFETY: every non-null `top` entry was made by `Box::into_raw` in `grow`; `&mut self`
            // means no reader can hold a reference into it any more, and each is freed once here.
            let mid = unsafe { Box::from_raw(mid) };
            for seg in mid.segs.iter() {
                let seg = seg.load(Ordering::Acquire);
                if !seg.is_null() {
                    // SAFETY: made by `Box::<[T]>::into_raw` with `seg_len` elements in `grow`,
                    // freed once here.
                    drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(seg, seg_len)) });
                }
            }
        }
    }
}

// SAFETY: the array hands out `&T` to any thread and `T` values are created on one thread and
// dropped on another, exactly like a `Vec<T>` behind an `Arc`: `T: Send + Sync` suffices.
unsafe impl<T: Send + Sync, const S: u32> Send for SegVec<T, S> {}
// SAFETY: as above; all shared mutation of the directory is through atomics.
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
        assert!(v.reserve(5000));
        assert_eq!(v.get(0).map(|e| e as *const AtomicU64), first);
        assert_eq!(v.get(3).map(|e| e.load(Ordering::Relaxed)), Some(33));
        assert_eq!(v.get(4999).map(|e| e.load(Ordering::Relaxed)), Some(0));
        assert!(v.get(v.capacity()).is_none());
        assert!(v.heap_bytes() >= 5000 * 8);
    }

    #[test]
    fn reserve_refuses_more_than_the_directory_can_name() {
        let v: SegVec<AtomicU64, 2> = SegVec::new();
        assert!(!v.reserve(SegVec::<AtomicU64, 2>::max_len() + 1));
        assert!(v.get(usize::MAX).is_none());
    }
}
