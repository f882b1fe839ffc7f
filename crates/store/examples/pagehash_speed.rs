//! Page hashing rates: `blake3::hash` page by page against `pagehash::hash_pages` in batches,
//! one thread, 4 KiB pages (`cargo run --release -p pagesnap-store --example pagehash_speed`).
use std::time::Instant;
fn main() {
    let n = 65536usize;
    let data: Vec<u8> = (0..n * 4096)
        .map(|i| (i as u32).wrapping_mul(2654435761) as u8 ^ (i >> 12) as u8)
        .collect();
    let pages: Vec<&[u8]> = data.chunks_exact(4096).collect();
    let mut out = vec![[0u8; 32]; n];
    for round in 0..3 {
        let t = Instant::now();
        for (p, o) in pages.iter().zip(out.iter_mut()) {
            *o = *blake3::hash(p).as_bytes();
        }
        let one = t.elapsed().as_secs_f64();
        let first = out[n - 1];
        let t = Instant::now();
        pagesnap_store::pagehash::hash_pages(&pages, &mut out);
        let batch = t.elapsed().as_secs_f64();
        assert_eq!(first, out[n - 1]);
        let gb = (n * 4096) as f64 / 1e9;
        println!(
            "round {round}: blake3::hash {:.2} GB/s, hash_pages {:.2} GB/s, ratio {:.2}x",
            gb / one,
            gb / batch,
            one / batch
        );
    }
}
