//! Where a durable commit's time goes: 655 random 4 KiB pages of a 65,536-page store, committed
//! 200 times; put (copy into the write buffer) and commit (index, record, write, sync) timed
//! apart. `cargo run --release -p pagesnap-store --example commit_cost [DIR]`.
use pagesnap_store::{SnapshotMeta, Store, StoreOptions, Vpn};
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let base = std::env::args().nth(1).map(std::path::PathBuf::from);
    let dir = match &base {
        Some(b) => tempfile::tempdir_in(b)?,
        None => tempfile::tempdir()?,
    };
    let mut store = Store::init(dir.path(), StoreOptions::default())?;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut page = vec![0u8; 4096];
    store.begin(None)?;
    for v in 0..65_536u64 {
        for c in page.chunks_mut(8) {
            c.copy_from_slice(&next().to_le_bytes());
        }
        store.put(Vpn(v), &page)?;
    }
    let mut parent = Some(store.commit(SnapshotMeta::default())?.id);
    let (mut puts, mut commits, mut meta) = (Vec::new(), Vec::new(), Vec::new());
    let pages: Vec<Vec<u8>> = (0..655)
        .map(|_| {
            let mut p = vec![0u8; 4096];
            for c in p.chunks_mut(8) {
                c.copy_from_slice(&next().to_le_bytes());
            }
            p
        })
        .collect();
    let rounds: u64 = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    for round in 0..rounds {
        let hashed: Vec<(u64, [u8; 32])> = pages
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut p = p.clone();
                p[0..8].copy_from_slice(&round.to_le_bytes());
                (i as u64, *blake3::hash(&p).as_bytes())
            })
            .collect();
        let t = Instant::now();
        store.begin(parent)?;
        for (i, h) in &hashed {
            let mut p = pages[*i as usize].clone();
            p[0..8].copy_from_slice(&round.to_le_bytes());
            store.put_hashed(Vpn(next() % 65_536), &p, *h)?;
        }
        let t1 = Instant::now();
        let r = store.commit(SnapshotMeta::default())?;
        let t2 = Instant::now();
        puts.push(t1 - t);
        commits.push(t2 - t1);
        meta.push(r.meta_bytes);
        parent = Some(r.id);
    }
    let med = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    meta.sort();
    println!(
        "put median {:?}, commit median {:?}, metadata median {} B",
        med(&mut puts),
        med(&mut commits),
        meta[meta.len() / 2]
    );
    Ok(())
}
