//! Found by the review of d01eaa6 / 6019b71: commits past PARALLEL_TERMS (4096) changes, by the merge path
//! (delta >= map/8) and in place, with pages put out of order and again, removals, re-adds;
//! every snapshot read back against a model and verified (content root recomputed), before and
//! after reopening (the map cache dropped: maps rebuilt from the chunks). Format 2 as well.
//! Expected to pass: what the review checked and found fine.

use pagesnap_store::{Compression, Mode, SnapshotId, SnapshotMeta, Store, StoreOptions, Vpn};
use std::collections::BTreeMap;

fn page(v: u64, n: u64) -> Vec<u8> {
    let mut p = vec![0u8; 512];
    p[..8].copy_from_slice(&v.to_le_bytes());
    p[8..16].copy_from_slice(&n.to_le_bytes());
    p
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

type Model = BTreeMap<u64, u64>;

fn check(store: &Store, snaps: &[(SnapshotId, Model)], pages: u64) {
    for (id, model) in snaps {
        for v in 0..pages {
            let want = model.get(&v).map(|n| page(v, *n));
            assert_eq!(
                store.read_page(*id, Vpn(v)).expect("read"),
                want,
                "{id:?} page {v}"
            );
        }
        assert_eq!(
            store.snapshot(*id).expect("info").page_count,
            model.len() as u64
        );
    }
    let ids: Vec<SnapshotId> = snaps.iter().map(|s| s.0).collect();
    let report = store.verify(&ids).expect("verify");
    assert!(report.is_clean(), "{report:?}");
}

fn run(mut store: Store, reopen: Option<&std::path::Path>) {
    const PAGES: u64 = 30_000;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut model = Model::new();
    let mut snaps: Vec<(SnapshotId, Model)> = Vec::new();
    let mut parent = None;
    let mut n = 0u64;
    // (changes, in order?): a first snapshot, merge-path deltas (>= 1/8), in-place deltas.
    for (changes, ascending) in [
        (20_000u64, false),
        (9_000, false),
        (6_000, true),
        (1_500, false),
        (5_000, false),
        (0, false),
    ] {
        store.begin(parent).expect("begin");
        let mut keys: Vec<u64> = (0..changes).map(|_| rng.next() % PAGES).collect();
        if ascending {
            keys.sort_unstable();
        }
        for v in keys {
            n += 1;
            match rng.next() % 5 {
                0 => {
                    store.remove(Vpn(v)).expect("remove");
                    model.remove(&v);
                }
                1 if model.contains_key(&v) => {
                    // The same content again: a change that changes nothing.
                    let same = model[&v];
                    store.put(Vpn(v), &page(v, same)).expect("put");
                }
                _ => {
                    store.put(Vpn(v), &page(v, n)).expect("put");
                    model.insert(v, n);
                }
            }
        }
        let c = store.commit(SnapshotMeta::default()).expect("commit");
        assert_eq!(c.page_count, model.len() as u64);
        parent = Some(c.id);
        snaps.push((c.id, model.clone()));
    }
    check(&store, &snaps, PAGES);
    if let Some(dir) = reopen {
        drop(store);
        let (store, _) = Store::open(dir, Mode::Write).expect("open");
        check(&store, &snaps, PAGES);
    }
}

#[test]
fn large_commits_read_back_and_verify_format_current() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("store");
    let opts = StoreOptions {
        page_size: 512,
        compression: Compression::None,
        ..StoreOptions::default()
    };
    run(Store::init(&path, opts).expect("init"), Some(&path));
}

#[test]
fn large_commits_read_back_and_verify_compressed() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("store");
    let opts = StoreOptions {
        page_size: 512,
        ..StoreOptions::default()
    };
    run(Store::init(&path, opts).expect("init"), Some(&path));
}

#[test]
fn large_commits_read_back_and_verify_format2() {
    let opts = StoreOptions {
        page_size: 512,
        max_pending_changes: 3_000,
        compression: Compression::None,
        ..StoreOptions::default()
    };
    let io = std::sync::Arc::new(pagesnap_store::fault::FaultyStorage::new());
    run(Store::init_format2_with(io, opts).expect("init"), None);
}
