//! Findings of the reliability review: a panicking snapshot writer must not wedge the space; the
//! snapshot a space stands on cannot be deleted under it; lazy faults and writes never wait for a
//! snapshot's store I/O.
//!
//! Nothing here sleeps: threads meet on channels, and `recv_timeout` (30 s) only turns a hang —
//! the bug — into a failure.

use pagesnap_engine::{EngineError, Space};
use pagesnap_pagetable::VirtAddr;
use pagesnap_store::fault::{FaultyStorage, Intercept, Op};
use pagesnap_store::{Mode, SharedStorage, Store, StoreError, StoreOptions};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const PS: u64 = 512;
const HANG: Duration = Duration::from_secs(30);

fn opts() -> StoreOptions {
    StoreOptions {
        page_size: PS as u32,
        segment_bytes: 16 << 10,
        preallocate: 4 << 10,
        ..StoreOptions::default()
    }
}

/// An in-memory backend whose Nth write can panic (once), and whose next `sync` can be held until
/// the test lets it go.
struct Hooked {
    io: Arc<Intercept>,
    /// Writes left before the panicking one; 0: no panic planned.
    panic_in: Arc<AtomicU64>,
    /// While set: the next `sync` says so on the first channel and waits on the second.
    hold_sync: Hold,
}

/// The held `sync`'s channels: (tell the test it was reached, wait for the release).
type Hold = Arc<Mutex<Option<(Sender<()>, Receiver<()>)>>>;

impl Hooked {
    fn new() -> Hooked {
        let panic_in = Arc::new(AtomicU64::new(0));
        let hold_sync: Hold = Arc::default();
        let (p, h) = (panic_in.clone(), hold_sync.clone());
        let io = Intercept::new(Arc::new(FaultyStorage::new()), move |op| {
            match op {
                Op::Write { name, .. } => {
                    let left = p.load(Ordering::SeqCst);
                    if left > 0 {
                        p.store(left - 1, Ordering::SeqCst);
                        if left == 1 {
                            panic!("injected storage panic writing {name}");
                        }
                    }
                }
                Op::Sync(_) => {
                    let held = h.lock().expect("hook").take();
                    if let Some((reached, release)) = held {
                        let _ = reached.send(());
                        // Held until the test releases it (or drops the sender).
                        let _ = release.recv();
                    }
                }
                _ => {}
            }
            Ok(())
        });
        Hooked {
            io: Arc::new(io),
            panic_in,
            hold_sync,
        }
    }

    /// The backend, for the store.
    fn storage(&self) -> SharedStorage {
        self.io.clone()
    }

    /// The `n`th write from now panics (once).
    fn panic_on_write(&self, n: u64) {
        self.panic_in.store(n, Ordering::SeqCst);
    }

    /// Holds the next `sync`: returns (reached, release).
    fn hold_syncs(&self) -> (Receiver<()>, Sender<()>) {
        let (reached_tx, reached_rx) = channel();
        let (release_tx, release_rx) = channel();
        *self.hold_sync.lock().expect("hook") = Some((reached_tx, release_rx));
        (reached_rx, release_tx)
    }
}

fn page(v: u64, round: u8) -> Vec<u8> {
    (0..PS).map(|i| (v as u8) ^ round ^ (i as u8)).collect()
}

fn fill(space: &Space, pages: std::ops::Range<u64>, round: u8) {
    for v in pages {
        space
            .write(VirtAddr(v * PS), &page(v, round))
            .expect("write");
    }
}

fn check(space: &Space, pages: std::ops::Range<u64>, round: u8) {
    let mut buf = vec![0u8; PS as usize];
    for v in pages {
        space.read(VirtAddr(v * PS), &mut buf).expect("read");
        assert!(buf == page(v, round), "page {v} differs");
    }
}

/// Runs `f` on another thread; fails (instead of hanging) if it does not finish within [`HANG`].
fn within<R: Send + 'static>(what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(HANG) {
        Ok(r) => r,
        Err(_) => panic!("{what} did not finish within {HANG:?}: it hangs"),
    }
}

#[test]
fn a_panic_in_the_snapshot_writer_is_an_error_and_the_space_stays_usable() {
    let io = Hooked::new();
    let space = Arc::new(
        Space::create(Store::init_with(io.storage(), opts()).expect("store")).expect("space"),
    );
    space.map(VirtAddr(0), 64 * PS).expect("map");
    fill(&space, 0..64, 1);
    let first = space.snapshot().expect("first snapshot");
    fill(&space, 0..32, 2);

    // A panic mid-commit: the store's writes happen when the commit flushes its buffer.
    io.panic_on_write(1);
    let s = space.clone();
    let err = within("the panicking snapshot", move || s.snapshot()).expect_err("panicked");
    assert!(
        matches!(&err, EngineError::PersistPanicked(msg) if msg.contains("injected storage panic")),
        "{err}"
    );
    assert_eq!(space.last_snapshot(), Some(first.id), "nothing advanced");

    // The space is not wedged: the store is usable, and the next snapshot covers the same pages.
    let s = space.clone();
    let ids = within("with_store after the panic", move || {
        s.with_store(|st| st.snapshot_ids())
    })
    .expect("ids");
    assert_eq!(ids, vec![first.id]);
    let s = space.clone();
    let second = within("the next snapshot", move || s.snapshot()).expect("second snapshot");
    assert!(second.pages_persisted >= 32, "{second:?}");
    fill(&space, 40..41, 3);
    drop(space);

    let store = Store::open_with(io.storage(), Mode::Write, opts())
        .expect("reopen")
        .0;
    let restored = Space::restore(store, second.id).expect("restore");
    check(&restored, 0..32, 2);
    check(&restored, 32..64, 1);
    drop(restored);
    let (store, _) = Store::open_with(io.storage(), Mode::Read, opts()).expect("reopen");
    assert!(store.verify(&[]).expect("verify").is_clean());
}

#[test]
fn the_snapshot_an_eager_space_stands_on_cannot_be_deleted() {
    let io = Arc::new(FaultyStorage::new());
    let space = Space::create(Store::init_with(io.clone(), opts()).expect("store")).expect("space");
    space.map(VirtAddr(0), 8 * PS).expect("map");
    fill(&space, 0..8, 1);
    let s1 = space.snapshot().expect("s1").id;
    let err = space
        .with_store(|st| st.delete(&[s1]))
        .expect_err("the parent of the next snapshot");
    assert!(matches!(err, StoreError::Pinned(id) if id == s1), "{err}");
    fill(&space, 0..4, 2);
    let s2 = space.snapshot().expect("s2 on top of s1").id;
    // The pin moved: s1 may go now, s2 may not.
    space.with_store(|st| st.delete(&[s1])).expect("delete s1");
    let err = space.with_store(|st| st.delete(&[s2])).expect_err("s2");
    assert!(matches!(err, StoreError::Pinned(id) if id == s2), "{err}");
    space.with_store(|st| st.gc()).expect("gc");
    fill(&space, 4..5, 3);
    let s3 = space.snapshot().expect("s3 on top of s2").id;
    drop(space);
    let store = Store::open_with(io, Mode::Write, opts()).expect("reopen").0;
    let space = Space::restore(store, s3).expect("restore");
    check(&space, 0..4, 2);
    check(&space, 4..5, 3);
    check(&space, 5..8, 1);
    // A restored space stands on its snapshot too.
    let err = space.with_store(|st| st.delete(&[s3])).expect_err("s3");
    assert!(matches!(err, StoreError::Pinned(id) if id == s3), "{err}");
}

#[test]
fn the_snapshot_a_lazy_space_reads_from_cannot_be_deleted_and_gc_keeps_it_readable() {
    let io = Arc::new(FaultyStorage::new());
    let space = Space::create(Store::init_with(io.clone(), opts()).expect("store")).expect("space");
    space.map(VirtAddr(0), 64 * PS).expect("map");
    fill(&space, 0..64, 1);
    let s1 = space.snapshot().expect("s1").id;
    drop(space);

    let shared: SharedStorage = io.clone();
    let store = Store::open_with(io.clone(), Mode::Write, opts())
        .expect("reopen")
        .0;
    let (space, opened) = Space::open_lazy_with(store, shared).expect("open lazily");
    assert_eq!(opened.snapshot, Some(s1));
    check(&space, 0..2, 1);
    let err = space
        .with_store(|st| st.delete(&[s1]))
        .expect_err("the lazy source");
    assert!(matches!(err, StoreError::Pinned(id) if id == s1), "{err}");
    check(&space, 2..4, 1);

    // A snapshot on top: pages 8.. are still unread, and s2 holds them unchanged. Deleting s1 and
    // collecting its space must leave them readable.
    fill(&space, 4..6, 2);
    let s2 = space.snapshot().expect("s2").id;
    space.with_store(|st| st.delete(&[s1])).expect("delete s1");
    let gc = space.with_store(|st| st.gc()).expect("gc");
    assert!(gc.segments_removed > 0, "{gc:?}");
    let err = space.with_store(|st| st.delete(&[s2])).expect_err("s2");
    assert!(matches!(err, StoreError::Pinned(id) if id == s2), "{err}");
    check(&space, 0..4, 1);
    check(&space, 4..6, 2);
    check(&space, 6..64, 1);
    fill(&space, 60..61, 3);
    let s3 = space.snapshot().expect("s3").id;
    drop(space);
    let store = Store::open_with(io, Mode::Write, opts()).expect("reopen").0;
    let space = Space::restore(store, s3).expect("restore");
    check(&space, 4..6, 2);
    check(&space, 60..61, 3);
    check(&space, 6..60, 1);
}

#[test]
fn lazy_faults_and_writes_do_not_wait_for_a_snapshots_commit() {
    let io = Hooked::new();
    let space =
        Space::create(Store::init_with(io.storage(), opts()).expect("store")).expect("space");
    // Two mapping blocks (8 × 512 pages each), so the second one is loaded lazily too.
    space.map(VirtAddr(0), 64 * PS).expect("map");
    space.map(VirtAddr(5000 * PS), 4 * PS).expect("map");
    fill(&space, 0..64, 1);
    fill(&space, 5000..5004, 1);
    let s1 = space.snapshot().expect("s1").id;
    drop(space);

    let shared: SharedStorage = io.storage();
    let store = Store::open_with(io.storage(), Mode::Write, opts())
        .expect("reopen")
        .0;
    let space = Arc::new(Space::restore_lazy_with(store, s1, shared).expect("restore lazily"));
    fill(&space, 0..8, 2); // resident now, and dirty

    let (reached, release) = io.hold_syncs();
    let mut handle = space.begin_snapshot().expect("begin");
    handle.release();
    // The snapshot's commit is now inside its first fsync, held.
    reached
        .recv_timeout(HANG)
        .expect("the commit reaches its fsync");
    let s = space.clone();
    let done = {
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; PS as usize];
            let r = (|| {
                // Lazy faults: a never-touched page (its block is loaded), a page in a block not
                // loaded yet, a write to a resident page, a write that faults a page in.
                s.read(VirtAddr(30 * PS), &mut buf)?;
                let first = buf.clone();
                s.read(VirtAddr(5002 * PS), &mut buf)?;
                let far = buf.clone();
                s.write(VirtAddr(3 * PS), &page(3, 9))?;
                s.write(VirtAddr(40 * PS + 7), b"x")?;
                Ok::<_, EngineError>((first, far))
            })();
            let _ = tx.send(r);
        });
        rx.recv_timeout(HANG)
    };
    // Let the commit go whatever happened, so nothing is left hanging.
    let _ = release.send(());
    let (first, far) = done
        .expect("a lazy fault or a write waited for the snapshot's commit")
        .expect("lazy reads and writes");
    assert!(first == page(30, 1));
    assert!(far == page(5002, 1));
    let s2 = within("the held snapshot", move || handle.wait()).expect("s2");
    check(&space, 8..30, 1);
    let s = space.clone();
    within("with_store", move || {
        s.with_store(|st| st.snapshot_ids().map(|v| v.len()))
    })
    .expect("ids");
    drop(space);

    // s2 holds the state at its pause: pages 0..8 of round 2, the rest of round 1.
    let store = Store::open_with(io.storage(), Mode::Write, opts())
        .expect("reopen")
        .0;
    let space = Space::restore(store, s2.id).expect("restore");
    check(&space, 0..8, 2);
    check(&space, 8..64, 1);
    check(&space, 5000..5004, 1);
}

#[test]
fn a_lazy_space_on_a_directory_reads_through_its_own_handle_across_delete_and_gc() {
    let dir = tempfile::tempdir().expect("tmp");
    let space = Space::create(Store::init(dir.path(), opts()).expect("store")).expect("space");
    space.map(VirtAddr(0), 64 * PS).expect("map");
    fill(&space, 0..64, 1);
    let s1 = space.snapshot().expect("s1").id;
    drop(space);
    let (store, _) = Store::open(dir.path(), Mode::Write).expect("reopen");
    let (space, opened) = Space::open_lazy(store).expect("open lazily");
    assert_eq!(opened.snapshot, Some(s1));
    check(&space, 0..2, 1);
    let err = space.with_store(|st| st.delete(&[s1])).expect_err("source");
    assert!(matches!(err, StoreError::Pinned(id) if id == s1), "{err}");
    fill(&space, 2..4, 2);
    space.snapshot().expect("s2");
    space.with_store(|st| st.delete(&[s1])).expect("delete s1");
    space.with_store(|st| st.gc()).expect("gc");
    check(&space, 2..4, 2);
    check(&space, 4..64, 1);
}

#[test]
fn a_lazy_space_on_another_backend_needs_its_storage() {
    let io = Arc::new(FaultyStorage::new());
    let space = Space::create(Store::init_with(io.clone(), opts()).expect("store")).expect("space");
    space.map(VirtAddr(0), PS).expect("map");
    let s1 = space.snapshot().expect("s1").id;
    drop(space);
    let store = Store::open_with(io, Mode::Write, opts()).expect("reopen").0;
    let err = Space::restore_lazy(store, s1).expect_err("no directory to open");
    assert!(matches!(err, EngineError::LazyReader { .. }), "{err}");
    assert!(err.to_string().contains("restore_lazy_with"), "{err}");
}
