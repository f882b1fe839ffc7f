//! Copy-on-write for the snapshot being persisted: the states at the pause of pages (and mapping
//! blocks) that a writer changes before the snapshot has taken them.
//!
//! The copies are kept in 256 shards, a key's shard being its page stripe's. A writer keeps a copy
//! while it holds the key's own lock (its stripe; the mapping blocks' lock for a block), and the
//! snapshot's taker takes it under the same lock, so a shard's lock is only ever contended by the
//! two of them on the same stripe at the same moment — never by a writer on one page against the
//! taker on another, which a single map made them do for every copy. Each shard also records how
//! far the taker got in it, and keeps the buffers of the copies taken for the next copies, so a
//! copy on write allocates nothing once the first snapshots have run.
//!
//! Shards outlive snapshots: each state names the snapshot (its epoch) it belongs to, and a shard
//! found holding another snapshot's state is reset first. A snapshot's end clears them all.

#[cfg(loom)]
use loom_sync::Mutex;
use pagesnap_pagetable::Epoch;
#[cfg(not(loom))]
use parking_lot::Mutex;
use std::collections::HashMap;

/// Under `--cfg loom` the shards' locks are loom's, so the model below explores every order in
/// which a writer and the taker reach them.
#[cfg(loom)]
mod loom_sync {
    pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub(crate) fn new(t: T) -> Self {
            Mutex(loom::sync::Mutex::new(t))
        }

        pub(crate) fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }
    }
}

/// Bytes of buffers a shard keeps for the next copies, and at most this many buffers: four 4 KiB
/// pages a shard is a snapshot's worth of copies on write for a hot set, and 4 MiB in all; pages
/// over 16 KiB keep none.
const SPARE_BYTES: usize = 16 << 10;
const SPARES_MAX: usize = 4;
/// Entries a shard's map keeps room for between snapshots.
const KEPT_CAPACITY: usize = 64;

/// The copy-on-write shards of a space.
pub(crate) struct CowShards {
    shards: Box<[Shard]>,
    page_bytes: usize,
    /// Buffers a shard keeps: [`SPARE_BYTES`] worth, at most [`SPARES_MAX`].
    spares: usize,
}

/// One shard, alone in its cache lines (the taker and a writer lock different shards).
#[repr(align(128))]
struct Shard(Mutex<Kept>);

struct Kept {
    /// The snapshot (its epoch) the rest belongs to.
    job: Epoch,
    /// Every key of this shard below this one has had its state at the pause taken (the taker
    /// goes in ascending key order): a later change to one needs no copy.
    swept: u64,
    /// States at the pause of keys changed since and not taken yet (`None`: an unmapped page or
    /// an empty mapping block).
    copies: HashMap<u64, Option<Box<[u8]>>>,
    /// Buffers of copies taken, for the next copies.
    spare: Vec<Box<[u8]>>,
}

impl Kept {
    /// The shard's state for snapshot `job`, reset if it holds an earlier one's.
    fn of(&mut self, job: Epoch, page_bytes: usize, spares: usize) -> &mut Kept {
        if self.job != job {
            self.reset(page_bytes, spares);
            self.job = job;
        }
        self
    }

    /// Forgets the snapshot's state, keeping up to `spares` buffers of `page_bytes`.
    fn reset(&mut self, page_bytes: usize, spares: usize) {
        self.swept = 0;
        if self.copies.is_empty() {
            return;
        }
        for (_, copy) in self.copies.drain() {
            if let Some(buf) = copy {
                if self.spare.len() < spares && buf.len() == page_bytes {
                    self.spare.push(buf);
                }
            }
        }
        if self.copies.capacity() > KEPT_CAPACITY {
            self.copies.shrink_to(KEPT_CAPACITY);
        }
    }
}

impl CowShards {
    pub(crate) fn new(shards: usize, page_bytes: usize) -> CowShards {
        CowShards {
            shards: (0..shards)
                .map(|_| {
                    Shard(Mutex::new(Kept {
                        job: Epoch(0),
                        swept: 0,
                        copies: HashMap::new(),
                        spare: Vec::new(),
                    }))
                })
                .collect(),
            page_bytes,
            spares: (SPARE_BYTES / page_bytes.max(1)).min(SPARES_MAX),
        }
    }

    /// Before the first change of `key` (in shard `shard`) since the pause of snapshot `job`, with
    /// the key's lock held: keeps `state()`, the key's state now (and so at the pause), unless the
    /// snapshot has taken the key already, a copy is kept already, or `needed()` says the snapshot
    /// does not hold the key. A state of another length than a page is kept as it is (the taker
    /// refuses it, as the store would).
    pub(crate) fn keep<'a>(
        &self,
        shard: usize,
        job: Epoch,
        key: u64,
        needed: impl FnOnce() -> bool,
        state: impl FnOnce() -> Option<&'a [u8]>,
    ) {
        let mut g = self.shards[shard].0.lock();
        let k = g.of(job, self.page_bytes, self.spares);
        if key < k.swept || k.copies.contains_key(&key) || !needed() {
            return;
        }
        let copy = state().map(|s| match k.spare.pop() {
            Some(mut buf) if buf.len() == s.len() => {
                buf.copy_from_slice(s);
                buf
            }
            _ => Box::from(s),
        });
        k.copies.insert(key, copy);
    }

    /// The taker, with the key's lock held: marks `key` (and every key of its shard below it) taken
    /// for snapshot `job`; if a copy of its state was kept, returns `f` of it.
    pub(crate) fn take<R>(
        &self,
        shard: usize,
        job: Epoch,
        key: u64,
        f: impl FnOnce(Option<&[u8]>) -> R,
    ) -> Option<R> {
        let mut g = self.shards[shard].0.lock();
        let k = g.of(job, self.page_bytes, self.spares);
        k.swept = key + 1;
        let copy = k.copies.remove(&key)?;
        let r = f(copy.as_deref());
        if let Some(buf) = copy {
            if k.spare.len() < self.spares && buf.len() == self.page_bytes {
                k.spare.push(buf);
            }
        }
        Some(r)
    }

    /// Copies held, and the bytes of page they hold, over all shards.
    #[cfg(test)]
    pub(crate) fn held(&self) -> (usize, usize) {
        let (mut n, mut bytes) = (0, 0);
        for s in self.shards.iter() {
            let g = s.0.lock();
            n += g.copies.len();
            bytes += g.copies.values().flatten().map(|b| b.len()).sum::<usize>();
        }
        (n, bytes)
    }

    /// After a snapshot: drops the copies it left (a failed one leaves those it did not take).
    pub(crate) fn clear(&self) {
        for s in self.shards.iter() {
            s.0.lock().reset(self.page_bytes, self.spares);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(cow: &CowShards, job: u64, key: u64) -> Option<Option<Vec<u8>>> {
        cow.take(0, Epoch(job), key, |s| s.map(<[u8]>::to_vec))
    }

    #[test]
    fn the_first_copy_is_the_one_taken_and_taken_keys_need_none() {
        let cow = CowShards::new(1, 4);
        cow.keep(0, Epoch(3), 10, || true, || Some(&[1u8, 1, 1, 1][..]));
        // A second change before the taker: the state at the pause is the first copy.
        cow.keep(0, Epoch(3), 10, || true, || Some(&[2u8, 2, 2, 2][..]));
        cow.keep(0, Epoch(3), 11, || false, || Some(&[5u8; 4][..]));
        cow.keep(0, Epoch(3), 12, || true, || None);
        assert_eq!(take(&cow, 3, 10), Some(Some(vec![1, 1, 1, 1])));
        assert_eq!(take(&cow, 3, 11), None, "not needed, not kept");
        assert_eq!(take(&cow, 3, 12), Some(None));
        // Keys below the taker's position are taken: a change to one needs no copy.
        cow.keep(0, Epoch(3), 9, || true, || Some(&[7u8; 4][..]));
        assert_eq!(take(&cow, 3, 13), None);
        assert_eq!(take(&cow, 3, 9), None);
    }

    #[test]
    fn another_snapshots_state_is_never_taken_and_buffers_are_reused() {
        let cow = CowShards::new(1, 4);
        cow.keep(0, Epoch(3), 10, || true, || Some(&[1u8; 4][..]));
        cow.keep(0, Epoch(3), 20, || true, || Some(&[2u8; 4][..]));
        // The next snapshot starts from nothing, whether or not the last one cleared.
        assert_eq!(take(&cow, 4, 20), None);
        cow.keep(0, Epoch(4), 30, || true, || Some(&[3u8; 4][..]));
        cow.clear();
        assert_eq!(take(&cow, 4, 30), None, "cleared");
        // The buffers of copies dropped or taken serve the next copies.
        let spare = cow.shards[0].0.lock().spare.len();
        assert!(spare >= 1, "no buffer kept for reuse");
        cow.keep(0, Epoch(5), 1, || true, || Some(&[4u8; 4][..]));
        assert_eq!(cow.shards[0].0.lock().spare.len(), spare - 1);
        assert_eq!(take(&cow, 5, 1), Some(Some(vec![4; 4])));
    }
}

/// `RUSTFLAGS="--cfg loom" cargo test -p pagesnap-engine --release --lib cow::loom_model`: every
/// interleaving of a writer changing keys after a pause and the taker taking them, the keys in one
/// shard (one position for all of them, the hardest case) and each under its own lock (the stripe).
#[cfg(all(test, loom))]
mod loom_model {
    use super::*;
    use loom::sync::atomic::{AtomicBool, Ordering};
    use loom::sync::{Arc, Mutex as KeyLock};

    /// The writer changes keys 2, 0 and 1 (in that order) once each after the pause, keeping a copy
    /// first unless the snapshot has every state (`all_copied`); the taker takes 0, 1, 2 in order
    /// under each key's lock, then sets `all_copied`. Whatever the interleaving, it gets the states
    /// at the pause, and the writer's changes all land.
    #[test]
    fn the_taker_gets_every_state_at_the_pause() {
        loom::model(|| {
            let cow = Arc::new(CowShards::new(1, 1));
            let keys: Arc<Vec<KeyLock<u8>>> =
                Arc::new((0..3u8).map(|k| KeyLock::new(10 * (k + 1))).collect());
            let all_copied = Arc::new(AtomicBool::new(false));
            let writer = {
                let (cow, keys, all_copied) = (cow.clone(), keys.clone(), all_copied.clone());
                loom::thread::spawn(move || {
                    for k in [2u64, 0, 1] {
                        let mut v = keys[k as usize].lock().unwrap_or_else(|e| e.into_inner());
                        if !all_copied.load(Ordering::Acquire) {
                            let now = [*v];
                            cow.keep(0, Epoch(1), k, || true, || Some(&now[..]));
                        }
                        *v += 1;
                    }
                })
            };
            let mut taken = Vec::new();
            for k in 0..3u64 {
                let v = keys[k as usize].lock().unwrap_or_else(|e| e.into_inner());
                let copy = cow.take(0, Epoch(1), k, |s| s.map(|b| b[0]));
                taken.push(copy.unwrap_or(Some(*v)));
            }
            all_copied.store(true, Ordering::Release);
            writer.join().expect("writer");
            assert_eq!(taken, vec![Some(10), Some(20), Some(30)]);
            let after: Vec<u8> = keys
                .iter()
                .map(|k| *k.lock().unwrap_or_else(|e| e.into_inner()))
                .collect();
            assert_eq!(after, vec![11, 21, 31]);
        });
    }
}
