//! Superblock writes that fail or land in one slot only, and damage beside them. Found by a
//! hostile review of the second reliability pass; each test failed before its fix.

use pagesnap_store::fault::FaultyStorage;
use pagesnap_store::{
    LockGuard, Mode, SnapshotId, SnapshotMeta, Storage, Store, StoreOptions, Vpn,
};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

fn page(seed: u64) -> Vec<u8> {
    let mut p = vec![0u8; 512];
    for (i, chunk) in p.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64).to_le_bytes());
    }
    p
}

fn opts() -> StoreOptions {
    StoreOptions {
        page_size: 512,
        segment_bytes: 8 << 10,
        preallocate: 2 << 10,
        ..StoreOptions::default()
    }
}

/// What the scripted backend does to superblock operations.
#[derive(Default)]
struct Script {
    /// Superblock syncs still to fail with EIO.
    fail_syncs: u32,
    /// The superblock write (counted from 1) to fail with EIO; 0: none.
    fail_write: u32,
    /// Capture crash images just before the next superblock write.
    capture: bool,
    images: Vec<FaultyStorage>,
}

struct Scripted {
    inner: Arc<FaultyStorage>,
    script: Mutex<Script>,
}

impl Scripted {
    fn new() -> (Arc<FaultyStorage>, Arc<Scripted>) {
        let inner = Arc::new(FaultyStorage::new());
        let io = Arc::new(Scripted {
            inner: inner.clone(),
            script: Mutex::new(Script::default()),
        });
        (inner, io)
    }
    fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.script.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for Scripted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scripted")
    }
}

impl Storage for Scripted {
    fn location(&self) -> &Path {
        self.inner.location()
    }
    fn list(&self) -> io::Result<Vec<String>> {
        self.inner.list()
    }
    fn create(&self, name: &str) -> io::Result<()> {
        self.inner.create(name)
    }
    fn len(&self, name: &str) -> io::Result<u64> {
        self.inner.len(name)
    }
    fn read(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read(name, offset, buf)
    }
    fn write(&self, name: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        if name == "superblock" {
            let mut s = self.script();
            if s.capture {
                s.capture = false;
                s.images = (0..64).map(|seed| self.inner.crash_image(seed)).collect();
            }
            if s.fail_write > 0 {
                s.fail_write -= 1;
                if s.fail_write == 0 {
                    return Err(io::Error::from_raw_os_error(5));
                }
            }
        }
        self.inner.write(name, offset, data)
    }
    fn set_len(&self, name: &str, len: u64) -> io::Result<()> {
        self.inner.set_len(name, len)
    }
    fn sync(&self, name: &str) -> io::Result<()> {
        if name == "superblock" {
            let mut s = self.script();
            if s.fail_syncs > 0 {
                s.fail_syncs -= 1;
                return Err(io::Error::from_raw_os_error(5));
            }
        }
        self.inner.sync(name)
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.inner.rename(from, to)
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.inner.remove(name)
    }
    fn sync_dir(&self) -> io::Result<()> {
        self.inner.sync_dir()
    }
    fn try_lock(&self, name: &str) -> io::Result<Option<Box<dyn LockGuard>>> {
        self.inner.try_lock(name)
    }
}

/// Two snapshots: pages 0..8 in the first, 0..16 in the second.
fn two_snapshots(store: &mut Store) -> (SnapshotId, SnapshotId) {
    store.begin(None).expect("begin");
    for v in 0..8 {
        store.put(Vpn(v), &page(v)).expect("put");
    }
    let s1 = store.commit(SnapshotMeta::default()).expect("commit").id;
    store.begin(Some(s1)).expect("begin");
    for v in 8..16 {
        store.put(Vpn(v), &page(v)).expect("put");
    }
    let s2 = store.commit(SnapshotMeta::default()).expect("commit").id;
    (s1, s2)
}

fn holds(store: &Store, s1: SnapshotId, s2: SnapshotId) -> Result<(), String> {
    for (id, n) in [(s1, 8u64), (s2, 16)] {
        for v in 0..n {
            match store.read_page(id, Vpn(v)) {
                Ok(Some(p)) if p == page(v) => {}
                other => return Err(format!("snapshot {id} page {v}: {other:?}")),
            }
        }
    }
    Ok(())
}

/// A commit's slot write and its undo both fail to sync: which state is on the disk is unknown,
/// and a read-back may come from the cache. Leaving doubt must outrank the failed commit before
/// its record space is reused: a crash at the next superblock write must lose nothing.
#[test]
fn leaving_doubt_outranks_the_failed_commit_before_reusing_its_space() {
    let (mem, io) = Scripted::new();
    let mut store = Store::init_with(io.clone(), opts()).expect("init");
    let (s1, s2) = two_snapshots(&mut store);
    store.begin(Some(s2)).expect("begin");
    for v in 16..24 {
        store.put(Vpn(v), &page(1000 + v)).expect("put");
    }
    io.script().fail_syncs = 2;
    let e = store.commit(SnapshotMeta::default()).expect_err("EIO");
    assert!(e.to_string().contains("I/O error"), "{e}");
    // The next change leaves doubt, then reuses the space after the committed end.
    store.begin(Some(s2)).expect("recovered");
    for v in 16..24 {
        store.put(Vpn(v), &page(2000 + v)).expect("put");
    }
    io.script().capture = true;
    let s3 = store.commit(SnapshotMeta::default()).expect("commit").id;
    let images = std::mem::take(&mut io.script().images);
    assert_eq!(images.len(), 64);
    let mut bad = Vec::new();
    for (seed, img) in images.into_iter().enumerate() {
        match Store::open_with(Arc::new(img), Mode::Write, opts()) {
            Err(e) => bad.push(format!("seed {seed}: open: {e}")),
            Ok((st, _)) => {
                if let Err(e) = holds(&st, s1, s2) {
                    bad.push(format!("seed {seed}: {e}"));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} of 64 crash images lost snapshots:\n{}",
        bad.len(),
        bad.join("\n")
    );
    drop(store);
    let (st, _) = Store::open_with(mem, Mode::Read, opts()).expect("open");
    holds(&st, s1, s2).expect("committed snapshots");
    assert_eq!(st.read_page(s3, Vpn(20)).expect("read"), Some(page(2020)));
}

/// The second slot write of a commit fails: the commit stands (acknowledged), held in one slot.
/// Verify reports the lost redundancy, the next change (or closing the store) writes the copy,
/// and then one flipped bit in the slot that held the only copy loses nothing.
#[test]
fn a_commit_held_in_one_slot_gets_its_copy_before_a_flip_can_lose_it() {
    for close in [false, true] {
        let (mem, io) = Scripted::new();
        let mut store = Store::init_with(io.clone(), opts()).expect("init");
        store.begin(None).expect("begin");
        store.put(Vpn(1), &page(1)).expect("put");
        let s1 = store.commit(SnapshotMeta::default()).expect("commit").id;
        store.begin(Some(s1)).expect("begin");
        store.put(Vpn(2), &page(2)).expect("put");
        io.script().fail_write = 2; // the second superblock write of this commit
        let s2 = store
            .commit(SnapshotMeta::default())
            .expect("acknowledged")
            .id;
        let generation = store.generation();
        let v = store.verify(&[]).expect("verify");
        assert!(
            v.damage.iter().any(|d| d.detail.contains("older")),
            "verify reports one copy: {v:?}"
        );
        if close {
            drop(store);
        } else {
            store.begin(Some(s2)).expect("begin"); // restores the copy first
            store.abort();
            drop(store);
        }
        let sb = mem.contents("superblock").expect("superblock");
        assert_eq!(sb[..4096], sb[4096..], "both slots hold the commit again");
        mem.flip_bit("superblock", (generation % 2) * 4096 + 100, 3)
            .expect("flip");
        let (store, _) = Store::open_with(mem.clone(), Mode::Write, opts()).expect("open");
        assert!(
            store.snapshot_ids().expect("ids").contains(&s2),
            "close={close}"
        );
        assert_eq!(store.read_page(s2, Vpn(2)).expect("read"), Some(page(2)));
    }
}

/// One flipped bit in a segment header made the whole store unopenable (verify included): now the
/// header is reported and every record is still checked on its own.
#[test]
fn a_damaged_segment_header_is_reported_not_fatal() {
    let mem = Arc::new(FaultyStorage::new());
    let mut store = Store::init_with(mem.clone(), opts()).expect("init");
    let mut parent = None;
    for s in 0..6u64 {
        store.begin(parent).expect("begin");
        for v in 0..8u64 {
            store.put(Vpn(s * 8 + v), &page(s * 8 + v)).expect("put");
        }
        parent = Some(store.commit(SnapshotMeta::default()).expect("commit").id);
    }
    drop(store);
    let segs: Vec<String> = mem
        .list()
        .expect("list")
        .into_iter()
        .filter(|n| n.starts_with("seg-"))
        .collect();
    assert!(segs.len() >= 3, "{segs:?}");
    mem.flip_bit(&segs[0], 2, 0).expect("flip");
    let (store, report) = Store::open_with(mem.clone(), Mode::Read, opts()).expect("opens");
    assert_eq!(report.damaged_segments, vec![segs[0].clone()]);
    let v = store.verify(&[]).expect("verify");
    assert!(
        v.damage
            .iter()
            .any(|d| d.detail.contains(&segs[0]) && d.detail.contains("header")),
        "{v:?}"
    );
    let last = parent.expect("snapshots");
    for p in 0..48u64 {
        assert_eq!(store.read_page(last, Vpn(p)).expect("read"), Some(page(p)));
    }
}

/// Quarantined files are never replaced: a second quarantine of the same segment name keeps the
/// first.
#[test]
fn a_second_quarantine_of_the_same_name_keeps_the_first() {
    let mem = Arc::new(FaultyStorage::new());
    let mut store = Store::init_with(mem.clone(), opts()).expect("init");
    store.begin(None).expect("begin");
    store.put(Vpn(1), &page(1)).expect("put");
    store.commit(SnapshotMeta::default()).expect("commit");
    drop(store);
    let next = "seg-00000002.pss";
    for fill in [0xAAu8, 0xBB] {
        mem.create(next).expect("create");
        mem.write(next, 0, &[fill; 4096]).expect("write");
        mem.sync(next).expect("sync");
        mem.sync_dir().expect("sync dir");
        mem.flip_bit("superblock", 100, 1).expect("flip");
        let (_store, report) = Store::open_with(mem.clone(), Mode::Write, opts()).expect("open");
        assert_eq!(report.quarantined.len(), 1);
    }
    let kept: Vec<u8> = mem
        .list()
        .expect("list")
        .iter()
        .filter(|n| n.starts_with("quarantine-"))
        .map(|n| mem.contents(n).expect("contents")[0])
        .collect();
    assert_eq!(kept.len(), 2, "both quarantined files are kept");
    assert!(kept.contains(&0xAA) && kept.contains(&0xBB));
}
