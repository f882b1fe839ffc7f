//! `--section encryption` (issue 17's target): a first snapshot of 256 MiB of random data into
//! an encrypted store against an unencrypted one, same run, alternating, default compression
//! (`auto`: zstd 1; random frames do not shrink, so an unencrypted store keeps them plain in
//! extents and an encrypted one seals them as stored frames). Target: encrypted <= 1.3x. Both
//! ciphers: AES-256-GCM-SIV (scheme 2, what `init --encrypt` makes) and XChaCha20-Poly1305
//! (scheme 1, stores made before it).

use anyhow::{Context, Result};
use pagesnap_engine::image::snapshot_image;
use pagesnap_store::keys::{KdfParams, Password};
use pagesnap_store::{Cipher, Store, StoreOptions};
use std::time::Instant;

/// MiB of random data snapshot.
const MIB: usize = 256;
/// Rounds of each (alternating); the median counts.
const ROUNDS: usize = 5;

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
    let kinds: [(&str, Option<Cipher>); 3] = [
        ("unencrypted", None),
        ("AES-256-GCM-SIV", Some(Cipher::Aes256GcmSiv)),
        ("XChaCha20-Poly1305", Some(Cipher::XChaCha20Poly1305)),
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    for round in 0..ROUNDS {
        for (k, (name, cipher)) in kinds.iter().enumerate() {
            let sdir = dir.path().join(format!("store-{round}-{k}"));
            let mut store = match cipher {
                // The key file's Argon2id is not what is measured: the tests' parameters.
                Some(c) => {
                    std::fs::create_dir_all(&sdir).context("store directory")?;
                    Store::init_encrypted_cipher_with(
                        std::sync::Arc::new(pagesnap_store::FsStorage::new(&sdir, true)),
                        StoreOptions::default(),
                        &password,
                        KdfParams::FOR_TESTS,
                        "bench",
                        *c,
                    )?
                }
                None => Store::init(&sdir, StoreOptions::default())?,
            };
            let t = Instant::now();
            let snap = snapshot_image(&mut store, &image, None, &|_| {})?;
            drop(store);
            let s = t.elapsed().as_secs_f64();
            println!(
                "round {round}: {name:<18} {s:.3} s ({:.0} MiB/s, {} pages written)",
                MIB as f64 / s,
                snap.pages_written
            );
            times[k].push(s);
            std::fs::remove_dir_all(&sdir).ok();
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let plain = median(&times[0]);
    println!("\n| store | median of {ROUNDS} | MiB/s | / unencrypted | per round |\n|---|---|---|---|---|");
    for (k, (name, _)) in kinds.iter().enumerate() {
        let m = median(&times[k]);
        let mut per: Vec<f64> = times[k].iter().zip(&times[0]).map(|(e, p)| e / p).collect();
        per.sort_by(f64::total_cmp);
        let per: Vec<String> = per.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "| {name} | {m:.3} s | {:.0} | **{:.2}x** | {} |",
            MIB as f64 / m,
            m / plain,
            per.join(" ")
        );
    }
    println!("\ntarget: encrypted (AES-256-GCM-SIV, the default) <= 1.3x unencrypted");
    Ok(())
}
