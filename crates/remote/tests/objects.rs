//! `ObjectStorage` on object_store's in-memory backend: file semantics against a model, the
//! store on top of it, two writers, kills at every request, gc of orphan pieces, the cache.

mod killable;

use killable::Killable;
use object_store::memory::InMemory;
use object_store::ObjectStore;
use pagesnap_remote::ObjectStorage;
use pagesnap_store::{
    Mode, SharedStorage, SnapshotId, SnapshotMeta, Storage, Store, StoreOptions, Vpn,
};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;

fn open(os: &Arc<dyn ObjectStore>, cache: Option<&std::path::Path>) -> Arc<ObjectStorage> {
    Arc::new(
        ObjectStorage::open(
            os.clone(),
            "stores/a",
            "memory://stores/a",
            cache.map(Into::into),
        )
        .expect("open")
        .with_piece_size(64 << 10),
    )
}

fn page(seed: u64, ps: usize) -> Vec<u8> {
    let mut v = vec![0u8; ps];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for b in v.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    v
}

fn opts() -> StoreOptions {
    StoreOptions {
        page_size: 4096,
        ..StoreOptions::default()
    }
}

/// Writes snapshot `round` of a 512-page space: every page in round 0, then 16 pages a round.
fn snapshot(store: &mut Store, round: u64, model: &mut BTreeMap<u64, Vec<u8>>) -> SnapshotId {
    let parent = store.latest().expect("latest");
    store.begin(parent).expect("begin");
    let pages: Vec<u64> = if round == 0 {
        (0..512).collect()
    } else {
        (0..16).map(|i| (round * 37 + i * 31) % 512).collect()
    };
    for v in pages {
        let p = page(round * 1000 + v, 4096);
        store.put(Vpn(v), &p).expect("put");
        model.insert(v, p);
    }
    store
        .commit(SnapshotMeta {
            label: Some(format!("round {round}")),
            logical_size: 512 * 4096,
            ..SnapshotMeta::default()
        })
        .expect("commit")
        .id
}

fn check(store: &Store, id: SnapshotId, model: &BTreeMap<u64, Vec<u8>>) {
    for (v, p) in model {
        let got = store.read_page(id, Vpn(*v)).expect("read").expect("stored");
        assert!(got == *p, "snapshot {id} page {v} differs");
    }
}

#[test]
fn a_store_round_trips_through_objects() {
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let cache = tempfile::tempdir().expect("tmp");
    let mut models = Vec::new();
    {
        let io: SharedStorage = open(&os, Some(cache.path()));
        let mut store = Store::init_with(io, opts()).expect("init");
        let mut model = BTreeMap::new();
        for round in 0..4 {
            let id = snapshot(&mut store, round, &mut model);
            models.push((id, model.clone()));
        }
    }
    // A fresh process, no cache: everything is read from the objects.
    let io = open(&os, None);
    let (store, _) = Store::open_with(io.clone(), Mode::Read, opts()).expect("open");
    assert_eq!(store.snapshot_ids().expect("ids").len(), 4);
    for (id, model) in &models {
        check(&store, *id, model);
    }
    let report = store.verify(&[]).expect("verify");
    assert!(report.is_clean(), "{report:?}");
    // Another writer continues the chain.
    let io2 = open(&os, Some(cache.path()));
    let (mut w, _) = Store::open_with(io2, Mode::Write, opts()).expect("open writer");
    let mut model = models.last().expect("rounds").1.clone();
    let id = snapshot(&mut w, 9, &mut model);
    check(&w, id, &model);
}

#[test]
fn the_second_writer_to_commit_loses_and_changes_nothing() {
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    {
        let mut store = Store::init_with(open(&os, None), opts()).expect("init");
        snapshot(&mut store, 0, &mut BTreeMap::new());
    }
    // Two machines (no shared lock file): both open, the later open moves the head on.
    let (mut a, _) = Store::open_with(open(&os, None), Mode::Write, opts()).expect("a");
    let (mut b, _) = Store::open_with(open(&os, None), Mode::Write, opts()).expect("b");
    let mut model = BTreeMap::new();
    let id_b = snapshot(&mut b, 1, &mut model);
    a.begin(a.latest().expect("latest")).expect("begin");
    a.put(Vpn(3), &page(77, 4096)).expect("put");
    let e = a.commit(SnapshotMeta::default()).expect_err("a must lose");
    assert!(
        format!("{e}").contains("another writer"),
        "unclear error: {e}"
    );
    let (r, _) = Store::open_with(open(&os, None), Mode::Read, opts()).expect("reader");
    let ids = r.snapshot_ids().expect("ids");
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_eq!(ids.last(), Some(&id_b));
    assert!(r.verify(&[]).expect("verify").is_clean());
}

#[test]
fn writers_on_one_machine_exclude_each_other_through_the_cache_lock() {
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let cache = tempfile::tempdir().expect("tmp");
    let _a = Store::init_with(open(&os, Some(cache.path())), opts()).expect("init");
    let e =
        Store::open_with(open(&os, Some(cache.path())), Mode::Write, opts()).expect_err("locked");
    assert!(format!("{e}").contains("lock"), "{e}");
}

/// A process killed at its n-th request to the bucket: whatever n, every snapshot whose commit
/// returned Ok is there afterwards, byte for byte, and the next writer commits; gc then leaves
/// no piece that no head names.
#[test]
fn a_kill_at_any_request_loses_no_committed_snapshot() {
    let mut n = 0u64;
    let mut states = 0;
    loop {
        n += 1;
        let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let killable = Arc::new(Killable::new(mem.clone(), u64::MAX));
        let os: Arc<dyn ObjectStore> = killable.clone();
        let mut committed: Vec<(SnapshotId, BTreeMap<u64, Vec<u8>>)> = Vec::new();
        let mut in_doubt: Option<BTreeMap<u64, Vec<u8>>> = None;
        let mut finished = false;
        {
            let Ok(mut store) = Store::init_with(open(&os, None), opts()) else {
                panic!("init");
            };
            killable.arm(n);
            let mut model = BTreeMap::new();
            for round in 0..5 {
                let parent = store.latest().ok().flatten();
                if store.begin(parent).is_err() {
                    break;
                }
                let mut ok = true;
                let pages: Vec<u64> = if round == 0 {
                    (0..1024).collect()
                } else {
                    (0..100).map(|i| (round * 37 + i * 31) % 1024).collect()
                };
                let mut next = model.clone();
                for v in pages {
                    let p = page(round * 1000 + v, 4096);
                    if store.put(Vpn(v), &p).is_err() {
                        ok = false;
                        break;
                    }
                    next.insert(v, p);
                }
                if !ok {
                    break;
                }
                match store.commit(SnapshotMeta::default()) {
                    Ok(r) => {
                        model = next;
                        committed.push((r.id, model.clone()));
                    }
                    Err(_) => {
                        // In doubt: the head's put may have landed before the answer was lost.
                        in_doubt = Some(next);
                        break;
                    }
                }
                if round == 4 && !killable.killed() {
                    finished = true;
                }
            }
        }
        // Restart on the same bucket, nothing killed any more.
        let io = open(&mem, None);
        let (mut store, _) = Store::open_with(io.clone(), Mode::Write, opts())
            .unwrap_or_else(|e| panic!("kill at request {n}: reopen failed: {e}"));
        let ids = store.snapshot_ids().expect("ids");
        for (id, model) in &committed {
            assert!(ids.contains(id), "kill at request {n}: snapshot {id} lost");
            check(&store, *id, model);
        }
        let latest = store.latest().expect("latest");
        let known = committed.last().map(|c| c.0);
        let mut model = if latest != known {
            // The commit whose answer was lost landed: it holds exactly what it was given.
            let m = in_doubt.clone().unwrap_or_else(|| {
                panic!("kill at request {n}: a snapshot nobody committed: {latest:?}")
            });
            check(&store, latest.expect("some"), &m);
            m
        } else {
            committed.last().map(|c| c.1.clone()).unwrap_or_default()
        };
        let id = snapshot(&mut store, 7, &mut model);
        check(&store, id, &model);
        // `pagesnap gc`: the store's gc, then the sweep of pieces no head names.
        store.gc().expect("gc");
        io.sweep().expect("sweep");
        drop(store);
        let io = open(&mem, None);
        let swept = io.sweep().expect("sweep");
        assert_eq!(
            swept, 0,
            "kill at request {n}: gc left {swept} orphan piece(s)"
        );
        assert_eq!(
            orphans(&mem, &io),
            0,
            "kill at request {n}: pieces that no head names remain"
        );
        states += 1;
        if finished {
            break;
        }
        assert!(n < 10_000, "the workload never finished");
    }
    println!("{states} kill points checked");
    assert!(states > 30, "{states}");
}

/// Pieces in the bucket that the head does not name.
fn orphans(os: &Arc<dyn ObjectStore>, io: &ObjectStorage) -> usize {
    let _ = io;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    use futures::TryStreamExt;
    let all: Vec<_> = rt
        .block_on(os.list(None).try_collect::<Vec<_>>())
        .expect("list");
    let head = all
        .iter()
        .filter(|m| m.location.as_ref().ends_with("/head"))
        .count();
    assert_eq!(head, 1);
    // Re-derive the head's pieces by reading it through a fresh storage: every listed piece
    // must be readable as part of some file (the sweep above deleted the rest).
    let pieces = all
        .iter()
        .filter(|m| m.location.as_ref().contains("/p/"))
        .count();
    pieces.saturating_sub(io.live_pieces())
}

#[test]
fn gc_deletes_the_pieces_of_removed_snapshots() {
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let io = open(&os, None);
    let mut store = Store::init_with(io.clone(), opts()).expect("init");
    let mut model = BTreeMap::new();
    let first = snapshot(&mut store, 0, &mut model);
    // Rewrite every page, then drop the first snapshot: its pieces become garbage.
    store.begin(store.latest().expect("latest")).expect("begin");
    for v in 0..512 {
        store.put(Vpn(v), &page(5000 + v, 4096)).expect("put");
    }
    store.commit(SnapshotMeta::default()).expect("commit");
    store.delete(&[first]).expect("delete");
    let before = count_pieces(&os);
    store.gc().expect("gc");
    let after = count_pieces(&os);
    assert!(after < before, "gc deleted no piece ({before} -> {after})");
    assert_eq!(after, io.live_pieces());
}

fn count_pieces(os: &Arc<dyn ObjectStore>) -> usize {
    use futures::TryStreamExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    rt.block_on(os.list(None).try_collect::<Vec<_>>())
        .expect("list")
        .iter()
        .filter(|m| m.location.as_ref().contains("/p/"))
        .count()
}

#[test]
fn a_second_listing_is_served_by_the_cache() {
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let cache = tempfile::tempdir().expect("tmp");
    {
        let mut store = Store::init_with(open(&os, None), opts()).expect("init");
        let mut model = BTreeMap::new();
        for round in 0..3 {
            snapshot(&mut store, round, &mut model);
        }
    }
    let list = |io: SharedStorage| {
        let (s, _) = Store::open_with(io, Mode::Read, opts()).expect("open");
        s.snapshots().expect("list").len()
    };
    let cold = open(&os, Some(cache.path()));
    assert_eq!(list(cold.clone()), 3);
    let c = cold.traffic();
    let warm = open(&os, Some(cache.path()));
    assert_eq!(list(warm.clone()), 3);
    let w = warm.traffic();
    println!("cold {c:?}\nwarm {w:?}");
    assert!(c.bytes_down > 0);
    // The warm listing downloads the head only.
    assert_eq!(w.gets, 1, "{w:?}");
    assert!(w.cache_hits > 0);
    // Listing downloads no pages: less than the 2 MiB the snapshots hold.
    assert!(c.bytes_down < 1 << 20, "{c:?}");
}

#[derive(Clone, Debug)]
enum Op {
    Write(u64, u16, u8),
    SetLen(u64),
    Sync,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u64..(40 << 20), 1u16..u16::MAX, any::<u8>()).prop_map(|(o, l, b)| Op::Write(o, l, b)),
        3 => (0u64..(34 << 20)).prop_map(|o| Op::Write(o, 4096, 0xAB)),
        1 => (0u64..(40 << 20)).prop_map(Op::SetLen),
        2 => Just(Op::Sync),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// A segment file behaves as a file: random writes (some past a piece boundary), sizes, syncs
    /// and reopens (which keep exactly what was synced) read back as a byte vector does.
    #[test]
    fn a_segment_reads_back_as_a_file(ops in proptest::collection::vec(op(), 1..40)) {
        let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let mut io = open(&os, None);
        io.create("seg-00000001.pss").expect("create");
        let mut model: Vec<u8> = Vec::new();
        let mut synced: Vec<u8> = Vec::new();
        io.sync("seg-00000001.pss").expect("sync");
        for op in ops {
            match op {
                Op::Write(o, l, b) => {
                    let data: Vec<u8> = (0..l).map(|i| b.wrapping_add(i as u8)).collect();
                    io.write("seg-00000001.pss", o, &data).expect("write");
                    let end = o as usize + data.len();
                    if model.len() < end { model.resize(end, 0); }
                    model[o as usize..end].copy_from_slice(&data);
                }
                Op::SetLen(n) => {
                    io.set_len("seg-00000001.pss", n).expect("set_len");
                    model.resize(n as usize, 0);
                }
                Op::Sync => {
                    io.sync("seg-00000001.pss").expect("sync");
                    synced = model.clone();
                }
                Op::Reopen => {
                    io = open(&os, None);
                    model = synced.clone();
                }
            }
            prop_assert_eq!(io.len("seg-00000001.pss").expect("len"), model.len() as u64);
        }
        let mut back = vec![0u8; model.len()];
        io.read("seg-00000001.pss", 0, &mut back).expect("read");
        prop_assert!(back == model, "contents differ");
        // Small reads at piece edges, through the cache path too.
        for at in [0u64, (16 << 20) - 3, 17 << 20] {
            if at + 8 <= model.len() as u64 {
                let mut b = [0u8; 8];
                io.read("seg-00000001.pss", at, &mut b).expect("read");
                prop_assert_eq!(&b[..], &model[at as usize..at as usize + 8]);
            }
        }
    }
}

/// Index reads from several threads at once, cold and then from the cache: every byte right
/// (blocks of one piece are kept by several threads at the same time).
#[test]
fn parallel_index_reads_through_the_cache_are_right() {
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let cache = tempfile::tempdir().expect("tmp");
    let len = 3usize << 20;
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
    {
        let io = open(&os, None);
        io.create("seg-00000001.pss").expect("create");
        io.write("seg-00000001.pss", 0, &data).expect("write");
        io.sync("seg-00000001.pss").expect("sync");
    }
    for round in 0..2 {
        let io = open(&os, Some(cache.path()));
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let io = io.clone();
                let data = &data;
                s.spawn(move || {
                    let mut x = t + 1;
                    for _ in 0..300 {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let at = (x >> 20) as usize % (len - 70_000);
                        let n = 1 + (x >> 8) as usize % 70_000;
                        let mut b = vec![0u8; n];
                        let r = if x & 1 == 0 {
                            io.read_meta("seg-00000001.pss", at as u64, &mut b)
                        } else {
                            io.read("seg-00000001.pss", at as u64, &mut b)
                        };
                        r.expect("read");
                        assert!(
                            b == data[at..at + n],
                            "round {round}: bytes at {at}+{n} differ"
                        );
                    }
                });
            }
        });
        let t = io.traffic();
        if round == 1 {
            assert!(t.cache_hits > 0, "{t:?}");
        }
    }
}

/// An encrypted store on objects: nothing of the image, its labels or the marker is in any
/// object of the bucket (the head holds the key file and superblock), and it reads back with
/// the password only.
#[test]
fn an_encrypted_store_leaves_no_plaintext_in_the_bucket() {
    use pagesnap_store::keys::{KdfParams, Password};
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let marker = b"PAGESNAP-PLAINTEXT-MARKER-4711";
    let pw = Password::from("s3 secret");
    {
        let mut store =
            Store::init_encrypted_with(open(&os, None), opts(), &pw, KdfParams::FOR_TESTS, "t")
                .expect("init");
        store.begin(None).expect("begin");
        for v in 0..64u64 {
            let mut p = vec![0u8; 4096];
            for c in p.chunks_mut(64) {
                c[..marker.len()].copy_from_slice(marker);
            }
            p[0..8].copy_from_slice(&v.to_le_bytes());
            store.put(Vpn(v), &p).expect("put");
        }
        store
            .commit(SnapshotMeta {
                label: Some("secret-label-marker".into()),
                ..SnapshotMeta::default()
            })
            .expect("commit");
    }
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    let objects = rt
        .block_on(os.list(None).try_collect::<Vec<_>>())
        .expect("list");
    assert!(objects.len() >= 2);
    for m in objects {
        let bytes = rt
            .block_on(async { os.get(&m.location).await?.bytes().await })
            .expect("get");
        for needle in [&marker[..], b"secret-label-marker"] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{} holds plaintext",
                m.location
            );
        }
    }
    let e = Store::open_with(open(&os, None), Mode::Read, opts()).expect_err("no password");
    assert!(format!("{e}").contains("encrypted"), "{e}");
    let (store, _) =
        Store::open_with_key(open(&os, None), Mode::Read, opts(), Some(&pw)).expect("open");
    let id = store.latest().expect("latest").expect("one");
    let p = store.read_page(id, Vpn(5)).expect("read").expect("page");
    assert_eq!(&p[64..64 + marker.len()], marker);
}

/// A writer whose storage read the head before another writer of this machine committed and
/// let go of the lock: it starts from that commit (the head is read again under the lock), not
/// from a stale head that would make its first put fail.
#[test]
fn a_writer_reads_the_head_again_once_it_holds_the_lock() {
    let os: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let cache = tempfile::tempdir().expect("tmp");
    let mut model = BTreeMap::new();
    {
        let mut store = Store::init_with(open(&os, Some(cache.path())), opts()).expect("init");
        snapshot(&mut store, 0, &mut model);
    }
    let early = open(&os, Some(cache.path()));
    {
        let (mut w, _) =
            Store::open_with(open(&os, Some(cache.path())), Mode::Write, opts()).expect("first");
        snapshot(&mut w, 1, &mut model);
    }
    let (mut w, _) = Store::open_with(early, Mode::Write, opts()).expect("second");
    assert_eq!(w.snapshot_ids().expect("ids").len(), 2);
    let id = snapshot(&mut w, 2, &mut model);
    check(&w, id, &model);
}
