//! `--section encryption` (issue 17's target): a first snapshot of 256 MiB of random data into
//! an encrypted store against an unencrypted one, same run, alternating, default compression
//! (`auto`: zstd 1; random frames do not shrink, so an unencrypted store keeps them plain in
//! extents and an encrypted one seals them as stored frames). Target: encrypted <= 1.3x.

use anyhow::{Context, Result};
use pagesnap_engine::image::snapshot_image;
use pagesnap_store::keys::{KdfParams, Password};
use pagesnap_store::{Store, StoreOptions};
use std::time::Instant;

/// MiB of random data snapshot.
const MIB: usize = 256;
/// Rounds of each (alternating); the median counts.
const ROUNDS: usize = 3;

pub fn encryption() -> Result<()> {
    println!("\n## Encryption: a first snapshot of {MIB} MiB of random data\n");
    let tmp = std::env::var_os("PAGESNAP_BENCH_DIR").unwrap_or_else(|| ".".into());
    let dir = tempfile::tempdir_in(&tmp).context("temporary directory")?;
    let image = dir.path().join("random.img");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut data = vec![0u8; MIB << 20];
    for c in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&image, &data).context("writing the image")?;
    drop(data);
    let password = Password::from("bench");
    let mut plain = Vec::new();
    let mut sealed = Vec::new();
    for round in 0..ROUNDS {
        for encrypted in [false, true] {
            let sdir = dir.path().join(format!("store-{round}-{encrypted}"));
            let mut store = if encrypted {
                // The key file's Argon2id is not what is measured: the tests' parameters.
                Store::init_encrypted(
                    &sdir,
                    StoreOptions::default(),
                    &password,
                    KdfParams::FOR_TESTS,
                    "bench",
                )?
            } else {
                Store::init(&sdir, StoreOptions::default())?
            };
            let t = Instant::now();
            let snap = snapshot_image(&mut store, &image, None, &|_| {})?;
            drop(store);
            let s = t.elapsed().as_secs_f64();
            println!(
                "round {round}: {:<11} {s:.3} s ({:.0} MiB/s, {} pages written)",
                if encrypted {
                    "encrypted"
                } else {
                    "unencrypted"
                },
                MIB as f64 / s,
                snap.pages_written
            );
            if encrypted { &mut sealed } else { &mut plain }.push(s);
            std::fs::remove_dir_all(&sdir).ok();
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (p, e) = (median(&mut plain), median(&mut sealed));
    println!(
        "\n| store | median of {ROUNDS} | MiB/s |\n|---|---|---|\n| unencrypted | {p:.3} s | {:.0} |\n| encrypted | {e:.3} s | {:.0} |\n\nencrypted / unencrypted: **{:.2}x** (target <= 1.3x)",
        MIB as f64 / p,
        MIB as f64 / e,
        e / p
    );
    Ok(())
}
