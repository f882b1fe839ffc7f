//! The one place that chooses between `core` atomics and loom's model-checked ones.
//!
//! Everything in this crate that is shared between threads imports its atomics from here, so
//! `RUSTFLAGS="--cfg loom"` swaps the whole protocol onto loom's scheduler (as tokio does).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize};

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{fence, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize};

pub(crate) use core::sync::atomic::Ordering;

/// Called by a reader that found a bucket mid-write and is about to retry.
#[inline]
pub(crate) fn spin_wait() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    core::hint::spin_loop();
}
