//! Snapshots hold exactly the state at the pause, however the mutator keeps writing.

use pagesnap_engine::Space;
use pagesnap_pagetable::{Epoch, VirtAddr};
use pagesnap_store::fault::FaultyStorage;
use pagesnap_store::{Mode, Store, StoreOptions};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const PS: u64 = 512;

fn opts() -> StoreOptions {
    StoreOptions {
        page_size: PS as u32,
        segment_bytes: 1 << 20,
        preallocate: 64 << 10,
        ..StoreOptions::default()
    }
}

fn new_space() -> (Arc<FaultyStorage>, Space) {
    let io = Arc::new(FaultyStorage::new());
    let store = Store::init_with(io.clone(), opts()).expect("store");
    (io, Space::create(store).expect("space"))
}

fn read_page(space: &Space, vpn: u64) -> Option<Vec<u8>> {
    let mut b = vec![0u8; PS as usize];
    space.read(VirtAddr(vpn * PS), &mut b).ok().map(|_| b)
}

#[test]
fn writes_unmaps_and_maps_after_the_pause_are_not_in_the_snapshot() {
    let (io, space) = new_space();
    space.map(VirtAddr(0), 64 * PS).expect("map");
    for v in 0..64 {
        space
            .write(VirtAddr(v * PS), &[1u8; PS as usize])
            .expect("write");
    }
    space.snapshot().expect("first");
    for v in 0..32 {
        space
            .write(VirtAddr(v * PS), &[2u8; PS as usize])
            .expect("write");
    }
    let mut handle = space.begin_snapshot_held().expect("pause");
    // After the pause, before anything is persisted: change everything.
    for v in 0..64 {
        space.write(VirtAddr(v * PS + 7), &[3u8; 9]).expect("write");
    }
    space.unmap(VirtAddr(5 * PS), PS).expect("unmap");
    space.map(VirtAddr(100 * PS), PS).expect("map");
    handle.release();
    let report = handle.wait().expect("snapshot");
    // Exactly pages 0..32 were pending (the mapping block last changed before the first
    // snapshot), and all of them were changed after the pause before being persisted.
    assert_eq!(report.pages_persisted, 32, "{report:?}");
    assert_eq!(report.copied_on_write, 32, "{report:?}");
    drop(space);
    let store = Store::open_with(io, Mode::Write, opts()).expect("reopen").0;
    let restored = Space::restore(store, report.id).expect("restore");
    for v in 0..64 {
        let want = if v < 32 { 2u8 } else { 1 };
        assert_eq!(
            read_page(&restored, v),
            Some(vec![want; PS as usize]),
            "page {v}"
        );
    }
    assert_eq!(read_page(&restored, 100), None, "mapped after the pause");
}

#[test]
fn threads_writing_through_background_snapshots_see_exactly_the_state_at_each_pause() {
    // The dirty set copied in one sweep after the pause (the default for small sets), and
    // batch by batch with copy-on-write for what is not copied yet (large sets).
    for eager in [true, false] {
        threads_writing_through_snapshots(eager);
    }
}

fn threads_writing_through_snapshots(eager: bool) {
    let (io, space) = new_space();
    if !eager {
        space.set_eager_copy_limit(0);
    }
    let space = Arc::new(space);
    const THREADS: u64 = 3;
    const PAGES: u64 = 48;
    space.map(VirtAddr(0), THREADS * PAGES * PS).expect("map");
    let stop = Arc::new(AtomicBool::new(false));
    // Each thread owns PAGES pages and logs (page, value, epoch) for every write it makes.
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (space, stop) = (space.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut log = Vec::new();
                let mut value = 0u64;
                while !stop.load(Ordering::Relaxed) || value < 2000 {
                    value += 1;
                    let page = t * PAGES + value % PAGES;
                    let mut bytes = vec![0u8; PS as usize];
                    for c in bytes.chunks_mut(8) {
                        c.copy_from_slice(&value.to_le_bytes());
                    }
                    let epoch = space.write(VirtAddr(page * PS), &bytes).expect("write");
                    log.push((page, value, epoch));
                    if value > 200_000 {
                        break;
                    }
                }
                log
            })
        })
        .collect();
    let mut reports = Vec::new();
    for _ in 0..6 {
        reports.push(
            space
                .begin_snapshot()
                .expect("pause")
                .wait()
                .expect("snapshot"),
        );
    }
    stop.store(true, Ordering::Relaxed);
    let logs: Vec<_> = writers
        .into_iter()
        .flat_map(|w| w.join().expect("writer"))
        .collect();
    let copied: u64 = reports.iter().map(|r| r.copied_on_write).sum();
    println!(
        "{} writes during 6 background snapshots; {copied} pages copied on write",
        logs.len()
    );
    drop(space);
    for r in &reports {
        let store = Store::open_with(io.clone(), Mode::Write, opts())
            .expect("reopen")
            .0;
        let restored = Space::restore(store, r.id).expect("restore");
        for page in 0..THREADS * PAGES {
            // The last value written to this page in an epoch the snapshot sealed.
            let want = logs
                .iter()
                .filter(|(p, _, e)| *p == page && *e <= r.epoch)
                .map(|(_, v, _)| *v)
                .max()
                .unwrap_or(0);
            let got = read_page(&restored, page).expect("mapped");
            let got = u64::from_le_bytes(got[..8].try_into().expect("8 bytes"));
            assert_eq!(
                got, want,
                "snapshot {} (epoch {:?}), page {page}",
                r.id, r.epoch
            );
        }
    }
    assert!(reports
        .windows(2)
        .all(|w| w[0].epoch < w[1].epoch && w[1].epoch > Epoch(0)));
}
