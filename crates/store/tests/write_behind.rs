//! The write path past the page cache: whole blocks of appended records go out through
//! `Storage::write_direct` from the store's writer thread (`store/buffer.rs`). Whatever the file
//! system, these tests force that path with a backend that asks for it, and check that every
//! byte reads back, that a failed background write fails its commit and loses nothing
//! committed, and that a dropped commit's pages are never reused by the next one.

use pagesnap_store::{
    FsStorage, LockGuard, Mode, SharedStorage, SnapshotMeta, Storage, Store, StoreOptions, Vpn,
};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// `FsStorage`, asking for write-behind, failing the `fail_at`-th direct write (1-based; 0: none).
#[derive(Debug)]
struct Behind {
    fs: FsStorage,
    direct_writes: AtomicU64,
    fail_at: AtomicU64,
}

impl Behind {
    fn new(dir: &Path) -> Arc<Behind> {
        Arc::new(Behind {
            fs: FsStorage::new(dir, true),
            direct_writes: AtomicU64::new(0),
            fail_at: AtomicU64::new(0),
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
    fn read(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.fs.read(name, offset, buf)
    }
    fn write(&self, name: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        self.fs.write(name, offset, data)
    }
    fn write_direct(&self, name: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        let n = self.direct_writes.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.fail_at.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected: direct write failed"));
        }
        assert_eq!(offset % 4096, 0, "direct write at an unaligned offset");
        assert_eq!(data.len() % 4096, 0, "direct write of a partial block");
        assert_eq!(
            data.as_ptr() as usize % 4096,
            0,
            "direct write from unaligned memory"
        );
        self.fs.write_direct(name, offset, data)
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
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.fs.rename(from, to)
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

/// A 4 KiB page that differs for every `(snapshot, vpn)`.
fn page(snapshot: u64, vpn: u64) -> Vec<u8> {
    let mut p = vec![0u8; 4096];
    for (i, c) in p.chunks_mut(8).enumerate() {
        let x = (snapshot << 40 ^ vpn << 12 ^ i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        c.copy_from_slice(&x.to_le_bytes());
    }
    p
}

/// Small segments, so that commits roll over segments in the middle of the write-behind.
fn opts() -> StoreOptions {
    StoreOptions {
        segment_bytes: 8 << 20,
        preallocate: 1 << 20,
        ..StoreOptions::default()
    }
}

fn write_snapshot(
    store: &mut Store,
    snapshot: u64,
    pages: u64,
) -> Result<u64, pagesnap_store::StoreError> {
    let parent = store.latest()?;
    store.begin(parent)?;
    for v in 0..pages {
        store.put(Vpn(v), &page(snapshot, v))?;
    }
    Ok(store.commit(SnapshotMeta::default())?.id.0)
}

fn check(store: &Store, id: u64, snapshot: u64, pages: u64) {
    for v in 0..pages {
        let got = store
            .read_page(pagesnap_store::SnapshotId(id), Vpn(v))
            .expect("read")
            .expect("page present");
        assert!(got == page(snapshot, v), "snapshot {id} page {v} differs");
    }
}

#[test]
fn appends_written_behind_read_back_after_reopen() {
    let dir = tempfile::tempdir().expect("tmp");
    let io = Behind::new(dir.path());
    let mut store = Store::init_with(io.clone() as SharedStorage, opts()).expect("init");
    // One page (no whole block), a few hundred (a few buffers), and 5,000 (20 MiB: several
    // segments, buffers in flight across a roll).
    let sizes = [1u64, 300, 5000, 7];
    let mut ids = Vec::new();
    for (s, &n) in sizes.iter().enumerate() {
        ids.push(write_snapshot(&mut store, s as u64, n).expect("snapshot"));
    }
    assert!(
        io.direct_writes.load(Ordering::SeqCst) > 10,
        "the direct path was not taken"
    );
    for (s, &n) in sizes.iter().enumerate() {
        check(&store, ids[s], s as u64, n);
    }
    drop(store);
    let (store, _) = Store::open_with(Behind::new(dir.path()) as SharedStorage, Mode::Read, opts())
        .expect("reopen");
    for (s, &n) in sizes.iter().enumerate() {
        check(&store, ids[s], s as u64, n);
    }
    assert!(store.verify(&[]).expect("verify").is_clean());
}

#[test]
fn a_failed_write_behind_fails_its_commit_and_loses_nothing() {
    for fail_at in [1u64, 2, 5, 9] {
        let dir = tempfile::tempdir().expect("tmp");
        let io = Behind::new(dir.path());
        let mut store = Store::init_with(io.clone() as SharedStorage, opts()).expect("init");
        let first = write_snapshot(&mut store, 0, 50).expect("first");
        let done = io.direct_writes.load(Ordering::SeqCst);
        io.fail_at.store(done + fail_at, Ordering::SeqCst);
        let failed = write_snapshot(&mut store, 1, 3000);
        assert!(
            failed.is_err(),
            "fail_at {fail_at}: a commit whose write failed succeeded"
        );
        if failed.is_err() {
            store.abort();
        }
        // The writer goes on: the next commit rewrites what the failed one wrote.
        let third = write_snapshot(&mut store, 2, 3000).expect("after a failed write");
        check(&store, first, 0, 50);
        check(&store, third, 2, 3000);
        drop(store);
        let (store, _) =
            Store::open_with(Behind::new(dir.path()) as SharedStorage, Mode::Read, opts())
                .expect("reopen");
        assert_eq!(
            store.snapshots().expect("list").len(),
            2,
            "fail_at {fail_at}"
        );
        check(&store, first, 0, 50);
        check(&store, third, 2, 3000);
        assert!(store.verify(&[]).expect("verify").is_clean());
    }
}

#[test]
fn pages_of_a_dropped_commit_are_not_reused_by_the_next() {
    let dir = tempfile::tempdir().expect("tmp");
    let io = Behind::new(dir.path());
    let mut store = Store::init_with(io.clone() as SharedStorage, opts()).expect("init");
    let first = write_snapshot(&mut store, 0, 10).expect("first");
    // A commit that appends content X and is dropped; then one with other pages first (so they
    // land where X was) and X again: X must be written again, not pointed at its old place.
    store
        .begin(Some(pagesnap_store::SnapshotId(first)))
        .expect("begin");
    store.put(Vpn(100), &page(9, 9)).expect("put X");
    for v in 0..400 {
        store.put(Vpn(200 + v), &page(8, v)).expect("put");
    }
    store.abort();
    store
        .begin(Some(pagesnap_store::SnapshotId(first)))
        .expect("begin");
    for v in 0..400 {
        store.put(Vpn(200 + v), &page(7, v)).expect("put");
    }
    store.put(Vpn(100), &page(9, 9)).expect("put X again");
    let id = store.commit(SnapshotMeta::default()).expect("commit").id;
    drop(store);
    let (store, _) = Store::open_with(Behind::new(dir.path()) as SharedStorage, Mode::Read, opts())
        .expect("reopen");
    assert_eq!(
        store.read_page(id, Vpn(100)).expect("read"),
        Some(page(9, 9))
    );
    for v in 0..400 {
        assert_eq!(
            store.read_page(id, Vpn(200 + v)).expect("read"),
            Some(page(7, v))
        );
    }
    assert!(store.verify(&[]).expect("verify").is_clean());
}
