//! A valid store with the input applied as byte patches (file, offset, xor), then opened, listed,
//! verified and read: errors are fine, panics and unbounded allocations are not.
#![no_main]

use pagesnap_store::fault::FaultyStorage;
use pagesnap_store::{Mode, SnapshotMeta, Storage, Store, StoreOptions, Vpn};
use std::sync::{Arc, OnceLock};

fn valid() -> &'static Vec<(String, Vec<u8>)> {
    static FILES: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    FILES.get_or_init(|| {
        let io = Arc::new(FaultyStorage::new());
        let opts = StoreOptions {
            page_size: 512,
            segment_bytes: 8 << 10,
            preallocate: 2 << 10,
            ..StoreOptions::default()
        };
        let mut store = Store::init_with(io.clone(), opts).expect("init");
        for round in 0..3u8 {
            let parent = store.latest().expect("latest");
            store.begin(parent).expect("begin");
            for v in 0..5u64 {
                store
                    .put(
                        Vpn(v * 3 + u64::from(round)),
                        &[round ^ v as u8 ^ 0x55; 512],
                    )
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
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut files = valid().clone();
    for patch in data.chunks_exact(4) {
        let f = usize::from(patch[0]) % files.len();
        let bytes = &mut files[f].1;
        if bytes.is_empty() {
            continue;
        }
        let at = usize::from(u16::from_le_bytes([patch[1], patch[2]])) * 7 % bytes.len();
        bytes[at] ^= patch[3];
    }
    let io = Arc::new(FaultyStorage::new());
    for (name, bytes) in &files {
        io.create(name).expect("create");
        io.write(name, 0, bytes).expect("write");
    }
    let Ok((store, _)) = Store::open_with(io, Mode::Read, StoreOptions::default()) else {
        return;
    };
    let _ = store.verify(&[]);
    let _ = store.check();
    if let Ok(ids) = store.snapshot_ids() {
        for id in ids {
            let _ = store.for_each_page(id, |_, r| store.read_ref(r).map(|_| ()));
        }
    }
});
