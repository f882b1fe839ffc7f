//! The decoders and the whole open/list/verify/read path on arbitrary and mutated bytes: errors,
//! never panics (the CI-sized version of the cargo-fuzz targets in `fuzz/`).

use pagesnap_store::fault::FaultyStorage;
use pagesnap_store::fuzzing;
use pagesnap_store::{Mode, SnapshotMeta, Storage, Store, StoreOptions, Vpn};
use proptest::prelude::*;
use std::sync::Arc;

/// A small valid store's files, to mutate.
fn valid_files() -> Vec<(String, Vec<u8>)> {
    let io = Arc::new(FaultyStorage::new());
    let opts = StoreOptions {
        page_size: 512,
        segment_bytes: 16 << 10,
        preallocate: 4 << 10,
        ..StoreOptions::default()
    };
    let mut store = Store::init_with(io.clone(), opts).expect("init");
    for round in 0..3u8 {
        store.begin(store.latest().expect("latest")).expect("begin");
        for v in 0..6u64 {
            store
                .put(Vpn(v + u64::from(round)), &[round + v as u8 + 1; 512])
                .expect("put");
        }
        store
            .commit(SnapshotMeta {
                label: Some(format!("r{round}")),
                ..SnapshotMeta::default()
            })
            .expect("commit");
    }
    drop(store);
    io.list()
        .expect("list")
        .into_iter()
        .filter(|n| n != "lock")
        .map(|n| {
            let c = io.contents(&n).expect("file");
            (n, c)
        })
        .collect()
}

fn exercise(files: &[(String, Vec<u8>)]) {
    let io = Arc::new(FaultyStorage::new());
    for (name, bytes) in files {
        io.create(name).expect("create");
        io.write(name, 0, bytes).expect("write");
    }
    for mode in [Mode::Read, Mode::Write] {
        let Ok((store, _)) = Store::open_with(io.clone(), mode, StoreOptions::default()) else {
            continue;
        };
        let _ = store.verify(&[]);
        let _ = store.check();
        if let Ok(ids) = store.snapshot_ids() {
            for id in ids {
                let _ = store.snapshot(id);
                let _ = store.for_each_page(id, |_, r| store.read_ref(r).map(|_| ()));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn decoders_reject_arbitrary_bytes_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
        fuzzing::decode_record(&bytes);
        fuzzing::decode_node(&bytes);
        fuzzing::decode_superblock(&bytes);
        fuzzing::decode_manifest(&bytes);
    }

    #[test]
    fn a_store_of_mutated_files_opens_or_fails_cleanly(
        which in any::<prop::sample::Index>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..12),
        truncate in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut files = valid_files();
        let i = which.index(files.len());
        let f = &mut files[i].1;
        for (at, x) in flips {
            if !f.is_empty() {
                let at = at.index(f.len());
                f[at] ^= x | 1;
            }
        }
        if let Some(t) = truncate {
            let len = f.len();
            f.truncate(t.index(len + 1));
        }
        exercise(&files);
    }

    #[test]
    fn a_store_of_arbitrary_files_fails_cleanly(sb in proptest::collection::vec(any::<u8>(), 0..9000), seg in proptest::collection::vec(any::<u8>(), 0..4000)) {
        let mut files = valid_files();
        for (name, bytes) in files.iter_mut() {
            if name == "superblock" { *bytes = sb.clone(); } else { *bytes = seg.clone(); }
        }
        exercise(&files);
    }
}
