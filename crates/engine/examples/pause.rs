//! The snapshot pause at 1,000 and at 1,000,000 mapped pages, measured in one run.
//!
//! `cargo run --release -p pagesnap-engine --example pause`
//!
//! For each size: map the pages (4 KiB) and snapshot, stamp every page, write 1,000 of them, take a
//! snapshot, then 20 times:
//! dirty 100 pages, begin a background snapshot (the pause is sealing the epoch), wait for it.
//! Prints the median and the largest pause, what the snapshots wrote, and the mutator's throughput
//! mapping the pages (page-table inserts, one per page) and stamping every page with
//! its first write of the epoch (a page-table update each).

use pagesnap_engine::Space;
use pagesnap_pagetable::VirtAddr;
use pagesnap_store::{Store, StoreOptions};
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("| mapped pages | median pause | max pause | snapshot (100 dirty pages) | data bytes | metadata bytes | map | first writes |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for pages in [1_000u64, 1_000_000] {
        let dir = tempfile::tempdir()?;
        let space = Space::create(Store::init(dir.path(), StoreOptions::default())?)?;
        let base = 0x5555_0000_0000u64;
        let t = Instant::now();
        space.map(VirtAddr(base), pages * 4096)?;
        let map_rate = pages as f64 / t.elapsed().as_secs_f64();
        space.snapshot()?;
        let t = Instant::now();
        // The first write of the epoch to each page stamps it (a page-table update); zeros keep the
        // pages zero, so the snapshots store no more.
        for i in 0..pages {
            space.write(VirtAddr(base + i * 4096 + 16), &[0u8; 8])?;
        }
        let write_rate = pages as f64 / t.elapsed().as_secs_f64();
        for i in 0..1_000u64.min(pages) {
            space.write(VirtAddr(base + (i * 7919 % pages) * 4096), &i.to_le_bytes())?;
        }
        space.snapshot()?;
        let mut pauses = Vec::new();
        let mut last = None;
        for round in 0..20u64 {
            for i in 0..100u64 {
                let page = (round * 104_729 + i * 7_919) % pages;
                space.write(
                    VirtAddr(base + page * 4096 + 8),
                    &(round * 1000 + i).to_le_bytes(),
                )?;
            }
            let t = Instant::now();
            let handle = space.begin_snapshot()?;
            let pause = handle.pause();
            let report = handle.wait()?;
            pauses.push(pause);
            last = Some((report, t.elapsed()));
        }
        pauses.sort();
        let median = pauses[pauses.len() / 2];
        let max = pauses.last().copied().unwrap_or(Duration::ZERO);
        if let Some((r, took)) = last {
            println!(
                "| {pages} | {:.1} µs | {:.1} µs | {:.2} ms | {} | {} | {:.2} M pages/s | {:.2} M pages/s |",
                median.as_secs_f64() * 1e6,
                max.as_secs_f64() * 1e6,
                took.as_secs_f64() * 1e3,
                r.data_bytes,
                r.meta_bytes,
                map_rate / 1e6,
                write_rate / 1e6
            );
        }
    }
    Ok(())
}
