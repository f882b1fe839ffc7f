//! Bytes written by a snapshot that changes 100 pages of a store holding 1,000,000 pages, data and
//! metadata separately, on the real filesystem backend.
//!
//! `cargo run --release -p pagesnap-store --example incremental [PAGES] [CHANGED]`
//!
//! The base snapshot's pages cycle through 4096 distinct contents (dedup keeps the data small;
//! the index still holds one entry per page, which is what this measures).

use pagesnap_store::{Epoch, SnapshotMeta, Store, StoreOptions, Vpn};
use std::time::Instant;

fn page(seed: u64) -> Vec<u8> {
    let mut p = vec![0u8; 4096];
    for (i, c) in p.chunks_mut(8).enumerate() {
        c.copy_from_slice(
            &(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64) << 32).to_le_bytes(),
        );
    }
    p
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let pages: u64 = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let changed: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(100);
    let dir = tempfile::tempdir()?;
    let mut store = Store::init(dir.path(), StoreOptions::default())?;
    let contents: Vec<Vec<u8>> = (0..4096).map(page).collect();

    let t = Instant::now();
    store.begin(None)?;
    for v in 0..pages {
        store.put(Vpn(v), &contents[(v % 4096) as usize])?;
    }
    let base = store.commit(SnapshotMeta {
        epoch: Epoch(1),
        ..SnapshotMeta::default()
    })?;
    println!(
        "base snapshot: {} pages, {} data bytes, {} metadata bytes ({:.1} bytes of index per page), {:.1} s",
        base.page_count,
        base.data_bytes,
        base.meta_bytes,
        base.meta_bytes as f64 / base.page_count as f64,
        t.elapsed().as_secs_f64()
    );

    for round in 0..3u64 {
        let t = Instant::now();
        store.begin(Some(base.id))?;
        for i in 0..changed {
            // Spread over the whole range, new content each time.
            let v = (i * 7_919 + round * 104_729) % pages;
            store.put(Vpn(v), &page(1_000_000 + round * changed + i))?;
        }
        let r = store.commit(SnapshotMeta {
            epoch: Epoch(2 + round),
            ..SnapshotMeta::default()
        })?;
        println!(
            "snapshot changing {} of {} pages: data {} bytes ({} page records), metadata {} bytes ({:.0} bytes per changed page), {:.1} ms",
            r.pages_changed,
            r.page_count,
            r.data_bytes,
            r.pages_written,
            r.meta_bytes,
            r.meta_bytes as f64 / r.pages_changed as f64,
            t.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(())
}
