//! Durable snapshots of a 256 MiB space with 655 random pages (1%) dirtied between them, for
//! profiling the snapshot path alone: `cargo run --release -p pagesnap-engine --example
//! checkpoint_loop [ROUNDS]`; prints the median snapshot time and the split of its phases.
use pagesnap_engine::Space;
use pagesnap_pagetable::VirtAddr;
use pagesnap_store::{Store, StoreOptions};
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(300);
    let dir = tempfile::tempdir()?;
    let space = Space::create(Store::init(dir.path(), StoreOptions::default())?)?;
    const PAGE: u64 = 4096;
    const PAGES: u64 = 1 << 16;
    const BASE: u64 = 0x6000_0000_0000;
    space.map(VirtAddr(BASE), PAGES * PAGE)?;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut buf = vec![0u8; PAGE as usize];
    for p in 0..PAGES {
        for c in buf.chunks_mut(8) {
            c.copy_from_slice(&next().to_le_bytes());
        }
        space.write(VirtAddr(BASE + p * PAGE), &buf)?;
    }
    space.snapshot()?;
    let mut times: Vec<Duration> = Vec::with_capacity(rounds);
    let t = Instant::now();
    for _ in 0..rounds {
        for _ in 0..655 {
            buf[..8].copy_from_slice(&next().to_le_bytes());
            space.write(VirtAddr(BASE + (next() % PAGES) * PAGE), &buf)?;
        }
        let s = Instant::now();
        space.snapshot()?;
        times.push(s.elapsed());
    }
    let wall = t.elapsed();
    times.sort();
    println!(
        "{rounds} snapshots: median {:?}, p90 {:?}; {:.1} snapshots/s with dirtying",
        times[times.len() / 2],
        times[times.len() * 9 / 10],
        rounds as f64 / wall.as_secs_f64()
    );
    Ok(())
}
