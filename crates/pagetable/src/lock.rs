//! The writers' lock. The design note asks "spinlock vs mutex": the table is generic over any
//! [`lock_api::RawMutex`], with [`SpinLock`] (no_std, for a kernel) as the default and
//! [`BlockingLock`] (parking_lot, parks waiting threads) under the `std` feature.
//!
//! Readers never take this lock. Under `cfg(loom)` the lock is replaced by loom's mutex so that the
//! model checker sees every hand-over.

/// The bound on the writer-lock type parameter: any raw mutex of the `lock_api` family.
pub use lock_api::RawMutex as WriterLock;

/// A spinning lock, usable without an OS (the default writer lock).
pub type SpinLock = spin::mutex::SpinMutex<()>;

/// A lock that parks waiting threads instead of spinning (parking_lot's raw mutex).
#[cfg(feature = "std")]
pub type BlockingLock = parking_lot::RawMutex;

#[cfg(not(loom))]
pub(crate) struct WriterMutex<L: lock_api::RawMutex, T>(lock_api::Mutex<L, T>);

#[cfg(not(loom))]
impl<L: lock_api::RawMutex, T> WriterMutex<L, T> {
    pub(crate) fn new(value: T) -> Self {
        WriterMutex(lock_api::Mutex::new(value))
    }

    pub(crate) fn lock(&self) -> lock_api::MutexGuard<'_, L, T> {
        self.0.lock()
    }
}

#[cfg(loom)]
pub(crate) struct WriterMutex<L, T>(loom::sync::Mutex<T>, core::marker::PhantomData<L>);

#[cfg(loom)]
impl<L, T> WriterMutex<L, T> {
    pub(crate) fn new(value: T) -> Self {
        WriterMutex(loom::sync::Mutex::new(value), core::marker::PhantomData)
    }

    pub(crate) fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
        // A poisoned lock means a writer panicked under loom: the model has already failed.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
