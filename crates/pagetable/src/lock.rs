//! The writers' lock. The design note asks "spinlock vs mutex": the table is generic over any
//! [`lock_api::RawMutex`]. The default, [`DefaultLock`], is [`BlockingLock`] (parking_lot: spins a
//! few dozen times, then yields and parks the waiting thread) in `std` builds, and [`SpinLock`]
//! without `std`.
//!
//! [`SpinLock`] spins without bound: if the holder is preempted, every waiting writer burns its
//! whole time slice. It is meant for a `no_std` kernel that takes the writer lock with preemption
//! (or interrupts) disabled, where the holder cannot be descheduled; in a hosted program prefer the
//! default.
//!
//! A thread that already holds the writer lock must not take it again: a writer called from the
//! callback of a [`WalkLock::Map`](crate::WalkLock::Map) or [`WalkLock::Page`](crate::WalkLock::Page)
//! walk would wait for itself forever. In `std` builds the table remembers which thread holds its
//! writer lock and panics with a message instead of deadlocking.
//!
//! Readers never take this lock. Under `cfg(loom)` the lock is replaced by loom's mutex so that the
//! model checker sees every hand-over.

/// The bound on the writer-lock type parameter: any raw mutex of the `lock_api` family.
pub use lock_api::RawMutex as WriterLock;

/// A lock that spins until it is free, usable without an OS: for a `no_std` kernel that holds it
/// with preemption disabled. In a hosted program a preempted holder makes waiters spin for whole
/// time slices; use [`DefaultLock`] there.
pub type SpinLock = spin::mutex::SpinMutex<()>;

/// A lock that spins briefly, then parks waiting threads (parking_lot's raw mutex).
#[cfg(feature = "std")]
pub type BlockingLock = parking_lot::RawMutex;

/// The writer lock of [`PageTable`](crate::PageTable) when none is named: [`BlockingLock`] in `std`
/// builds, [`SpinLock`] in `no_std` builds (where there is nothing to park on).
#[cfg(feature = "std")]
pub type DefaultLock = BlockingLock;

/// The writer lock of [`PageTable`](crate::PageTable) when none is named: [`BlockingLock`] in `std`
/// builds, [`SpinLock`] in `no_std` builds (where there is nothing to park on).
#[cfg(not(feature = "std"))]
pub type DefaultLock = SpinLock;

#[cfg(not(loom))]
pub(crate) struct WriterMutex<L: lock_api::RawMutex, T> {
    mutex: lock_api::Mutex<L, T>,
    /// The id of the thread holding `mutex` (see [`owner`]), 0 when none. Written only by the
    /// holder, so a thread that reads its own id holds the lock.
    #[cfg(feature = "std")]
    owner: core::sync::atomic::AtomicU64,
}

#[cfg(not(loom))]
pub(crate) struct WriterGuard<'a, L: lock_api::RawMutex, T> {
    guard: lock_api::MutexGuard<'a, L, T>,
    #[cfg(feature = "std")]
    owner: &'a core::sync::atomic::AtomicU64,
}

#[cfg(not(loom))]
impl<L: lock_api::RawMutex, T> WriterMutex<L, T> {
    pub(crate) fn new(value: T) -> Self {
        WriterMutex {
            mutex: lock_api::Mutex::new(value),
            #[cfg(feature = "std")]
            owner: core::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Takes the writer lock. Panics (in `std` builds) if this thread already holds it.
    #[track_caller]
    pub(crate) fn lock(&self) -> WriterGuard<'_, L, T> {
        #[cfg(feature = "std")]
        {
            use core::sync::atomic::Ordering::Relaxed;
            let me = owner::current();
            // Only the holder stores its id, and it clears it before unlocking: reading our own id
            // means we hold the lock, and locking again would wait for ourselves.
            if me != 0 && self.owner.load(Relaxed) == me {
                panic!(
                    "pagesnap-pagetable: this thread already holds the page table's writer lock: a \
                     writer (set_page, update, update_by_handle, remove, stats, or a for_each with \
                     WalkLock::Map or WalkLock::Page) was called on the same table from inside a \
                     for_each(WalkLock::Map or WalkLock::Page) callback, and would wait for itself \
                     forever; call readers only from the callback, or change the page through its \
                     `&mut Page` argument"
                );
            }
            let guard = self.mutex.lock();
            self.owner.store(me, Relaxed);
            WriterGuard {
                guard,
                owner: &self.owner,
            }
        }
        #[cfg(not(feature = "std"))]
        WriterGuard {
            guard: self.mutex.lock(),
        }
    }
}

#[cfg(not(loom))]
impl<L: lock_api::RawMutex, T> core::ops::Deref for WriterGuard<'_, L, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

#[cfg(not(loom))]
impl<L: lock_api::RawMutex, T> core::ops::DerefMut for WriterGuard<'_, L, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

#[cfg(all(not(loom), feature = "std"))]
impl<L: lock_api::RawMutex, T> Drop for WriterGuard<'_, L, T> {
    fn drop(&mut self) {
        // Before `guard` unlocks (fields drop after this): the next holder stores its own id.
        self.owner.store(0, core::sync::atomic::Ordering::Relaxed);
    }
}

/// Small per-thread ids for the writer lock's owner check (`std::thread::ThreadId` has no stable
/// integer form).
#[cfg(all(not(loom), feature = "std"))]
mod owner {
    use core::sync::atomic::{AtomicU64, Ordering};

    static NEXT: AtomicU64 = AtomicU64::new(1);

    std::thread_local! {
        static ID: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }

    /// This thread's id (never 0), or 0 while the thread's locals are being torn down (the check
    /// is then skipped).
    pub(super) fn current() -> u64 {
        ID.try_with(|id| *id).unwrap_or(0)
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
