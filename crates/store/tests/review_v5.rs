//! Found by the hostile review of the write-behind path (2026-12-07): each test failed before its fix.
use pagesnap_store::{
    FsStorage, LockGuard, Mode, SharedStorage, SnapshotId, SnapshotMeta, Storage, Store,
    StoreOptions, Vpn,
};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug)]
struct Behind {
    fs: FsStorage,
    n: AtomicU64,
    fail_at: AtomicU64,
    panic_at: AtomicU64,
    sleep_ms: AtomicU64,
}
impl Behind {
    fn new(dir: &Path) -> Arc<Behind> {
        Arc::new(Behind {
            fs: FsStorage::new(dir, true),
            n: AtomicU64::new(0),
            fail_at: AtomicU64::new(0),
            panic_at: AtomicU64::new(0),
            sleep_ms: AtomicU64::new(0),
        })
    }
}
impl Storage for Behind {
    fn location(&self) -> &Path {
        self.fs.location()
    }
    fn list(&self) -> io::Result<Vec<String>> {
        self.fs.list()
    }
    fn create(&self, name: &str) -> io::Result<()> {
        self.fs.create(name)
    }
    fn len(&self, name: &str) -> io::Result<u64> {
        self.fs.len(name)
    }
    fn read(&self, name: &str, o: u64, b: &mut [u8]) -> io::Result<()> {
        self.fs.read(name, o, b)
    }
    fn write(&self, name: &str, o: u64, d: &[u8]) -> io::Result<()> {
        self.fs.write(name, o, d)
    }
    fn write_direct(&self, name: &str, o: u64, d: &[u8]) -> io::Result<()> {
        let n = self.n.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.fail_at.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected: direct write failed"));
        }
        if n == self.panic_at.load(Ordering::SeqCst) {
            panic!("injected: backend panic in write_direct");
        }
        let ms = self.sleep_ms.load(Ordering::SeqCst);
        if ms > 0 {
            std::thread::sleep(Duration::from_millis(ms));
        }
        self.fs.write_direct(name, o, d)
    }
    fn write_behind(&self) -> bool {
        true
    }
    fn set_len(&self, name: &str, len: u64) -> io::Result<()> {
        self.fs.set_len(name, len)
    }
    fn sync(&self, name: &str) -> io::Result<()> {
        self.fs.sync(name)
    }
    fn sync_data(&self, name: &str) -> io::Result<()> {
        self.fs.sync_data(name)
    }
    fn rename(&self, f: &str, t: &str) -> io::Result<()> {
        self.fs.rename(f, t)
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.fs.remove(name)
    }
    fn sync_dir(&self) -> io::Result<()> {
        self.fs.sync_dir()
    }
    fn try_lock(&self, name: &str) -> io::Result<Option<Box<dyn LockGuard>>> {
        self.fs.try_lock(name)
    }
}

fn page(s: u64, v: u64) -> Vec<u8> {
    let mut p = vec![0u8; 4096];
    for (i, c) in p.chunks_mut(8).enumerate() {
        let x = (s << 40 ^ v << 12 ^ i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        c.copy_from_slice(&x.to_le_bytes());
    }
    p
}

/// A failed background write is reported by a later `put`; the API lets the caller go on (no
/// poisoning). The commit then succeeds although the failed blocks were never written.
#[test]
fn a_commit_after_a_reported_write_behind_error_is_not_acknowledged_with_a_hole() {
    let dir = tempfile::tempdir().unwrap();
    let io = Behind::new(dir.path());
    let mut store = Store::init_with(io.clone() as SharedStorage, StoreOptions::default()).unwrap();
    store.begin(None).unwrap();
    io.fail_at
        .store(io.n.load(Ordering::SeqCst) + 1, Ordering::SeqCst);
    let mut errors = 0;
    for v in 0..2000u64 {
        // The caller retries a put that failed (e.g. after freeing space).
        if store.put(Vpn(v), &page(1, v)).is_err() {
            errors += 1;
            store.put(Vpn(v), &page(1, v)).expect("retry");
        }
    }
    assert!(errors > 0, "the injected failure was not reported by a put");
    match store.commit(SnapshotMeta::default()) {
        Err(_) => {} // fine: the lost bytes are refused
        Ok(c) => {
            for v in 0..2000u64 {
                let got = store.read_page(c.id, Vpn(v));
                assert!(
                    matches!(&got, Ok(Some(p)) if *p == page(1, v)),
                    "acknowledged commit {:?}: page {v} reads {:?}",
                    c.id,
                    got.map(|p| p.map(|p| p.len()))
                );
            }
        }
    }
}

/// The writer thread dies (a backend panic inside it): abort / commit must not hang.
#[test]
fn a_backend_panic_in_the_writer_thread_does_not_hang_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let io = Behind::new(dir.path());
    let mut store = Store::init_with(io.clone() as SharedStorage, StoreOptions::default()).unwrap();
    store.begin(None).unwrap();
    io.panic_at
        .store(io.n.load(Ordering::SeqCst) + 1, Ordering::SeqCst);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for v in 0..2000u64 {
            if store.put(Vpn(v), &page(1, v)).is_err() {
                break;
            }
        }
        let _ = tx.send("puts done");
        store.abort();
        let _ = tx.send("abort returned");
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(60)).unwrap(),
        "puts done"
    );
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(20))
            .map_err(|_| "abort hangs (LogBuffer::drain spins)"),
        Ok("abort returned")
    );
}

/// Dropping a store mid-commit released the writer lock (Writer::_lock was its first field)
/// before the write-behind thread had written the jobs it held: a writer that opened then had
/// its committed bytes overwritten by the old writer's stale direct writes. Now the lock goes
/// last, and the second writer gets it only once those writes have landed.
#[test]
fn a_store_dropped_mid_commit_writes_nothing_after_releasing_its_lock() {
    let dir = tempfile::tempdir().unwrap();
    let io = Behind::new(dir.path());
    let mut store = Store::init_with(io.clone() as SharedStorage, StoreOptions::default()).unwrap();
    store.begin(None).unwrap();
    store.put(Vpn(0), &page(0, 0)).unwrap();
    let first = store.commit(SnapshotMeta::default()).unwrap().id;
    io.sleep_ms.store(1500, Ordering::SeqCst);
    store.begin(Some(first)).unwrap();
    for v in 0..600u64 {
        store.put(Vpn(v), &page(9, v)).unwrap(); // ~2.4 MiB: two jobs in flight
    }
    let dropper = std::thread::spawn(move || drop(store));
    std::thread::sleep(Duration::from_millis(200));
    // Another writer (another process in real life) gets the lock while the jobs are in flight.
    // It waits for the lock: the old writer holds it until its writes in flight have landed.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (mut other, _) = loop {
        match Store::open_with(
            Arc::new(FsStorage::new(dir.path(), true)) as SharedStorage,
            Mode::Write,
            StoreOptions::default(),
        ) {
            Ok(s) => break s,
            Err(pagesnap_store::StoreError::Locked { .. })
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20)); // polling the lock, not a wait to pass
            }
            Err(e) => panic!("second writer: {e}"),
        }
    };
    other.begin(Some(first)).unwrap();
    for v in 0..600u64 {
        other.put(Vpn(v), &page(2, v)).unwrap();
    }
    let id = other.commit(SnapshotMeta::default()).unwrap().id;
    dropper.join().unwrap();
    drop(other);
    let (store, _) = Store::open_with(
        Arc::new(FsStorage::new(dir.path(), true)) as SharedStorage,
        Mode::Read,
        StoreOptions::default(),
    )
    .unwrap();
    let bad = (0..600u64)
        .filter(|&v| !matches!(store.read_page(id, Vpn(v)), Ok(Some(p)) if p == page(2, v)))
        .count();
    assert_eq!(
        bad, 0,
        "{bad} pages of committed snapshot {id:?} overwritten by a dropped writer"
    );
    let _ = SnapshotId(0);
}
