//! Review of b303319 (batch buffers reused between snapshots, `HashedPages`): a snapshot records
//! exactly the state at the pause whatever an earlier snapshot left in the reused buffers —
//! short batches after long ones, zero pages, unmapped pages, mapping blocks, copy-on-write
//! copies — for several page sizes, eager and batched, plain and encrypted.

use pagesnap_engine::{Space, MAP_KEY_BASE};
use pagesnap_pagetable::{VirtAddr, Vpn};
use pagesnap_store::keys::{KdfParams, Password};
use pagesnap_store::{Store, StoreOptions};

fn page(ps: u64, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut p = vec![0u8; ps as usize];
    for c in p.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    p
}

fn run(ps: u64, eager: bool, encrypted: bool) {
    let dir = tempfile::tempdir().expect("tmp");
    let opts = StoreOptions {
        page_size: ps as u32,
        ..StoreOptions::default()
    };
    let store = if encrypted {
        Store::init_encrypted(
            dir.path(),
            opts,
            &Password::new("pw"),
            KdfParams::FOR_TESTS,
            "t",
        )
        .expect("init")
    } else {
        Store::init(dir.path(), opts).expect("init")
    };
    let space = Space::create(store).expect("space");
    if !eager {
        space.set_eager_copy_limit(0);
    }
    // Snapshot A: 2,500 pages of distinct content (three batches; the pool then holds buffers
    // full of A's bytes).
    let n = 2500u64;
    space.map(VirtAddr(0), n * ps).expect("map");
    for v in 0..n {
        space.write(VirtAddr(v * ps), &page(ps, v)).expect("write");
    }
    space.snapshot().expect("A");

    // Before B's pause: zero pages 0..10, unmap 10..20, new content 20..25, map a page far
    // away (a new mapping block, all but one bit zero), and touch 40..45 (to be unmapped after
    // the pause: their state at the pause comes from a copy-on-write copy).
    for v in 0..10 {
        space
            .write(VirtAddr(v * ps), &vec![0u8; ps as usize])
            .expect("zero");
    }
    space.unmap(VirtAddr(10 * ps), 10 * ps).expect("unmap");
    for v in 20..25 {
        space
            .write(VirtAddr(v * ps), &page(ps, 1_000_000 + v))
            .expect("write");
    }
    for v in 40..45 {
        space
            .write(VirtAddr(v * ps), &page(ps, 2_000_000 + v))
            .expect("write");
    }
    let far = 50 * ps * 8; // in another mapping block
    space.map(VirtAddr(far * ps), ps).expect("map far");

    // B: a short batch (~26 keys) into a buffer that held A's pages. After the pause, change
    // everything B must not see.
    let mut h = space.begin_snapshot_held().expect("pause");
    for v in 20..25 {
        space
            .write(VirtAddr(v * ps), &page(ps, 3_000_000 + v))
            .expect("write");
    }
    space
        .unmap(VirtAddr(40 * ps), 5 * ps)
        .expect("unmap after pause");
    space
        .write(VirtAddr(far * ps), &page(ps, 4))
        .expect("write far");
    space.map(VirtAddr(12 * ps), ps).expect("remap after pause");
    h.release();
    let b = h.wait().expect("B");

    let read = |v: u64| space.with_store(|s| s.read_page(b.id, Vpn(v)).expect("read"));
    for v in 0..10 {
        assert_eq!(
            read(v),
            None,
            "page {v} was zero at B's pause (ps {ps} eager {eager})"
        );
    }
    for v in 10..20 {
        assert_eq!(
            read(v),
            None,
            "page {v} was unmapped at B's pause (ps {ps} eager {eager})"
        );
    }
    for v in 20..25 {
        assert_eq!(
            read(v),
            Some(page(ps, 1_000_000 + v)),
            "page {v} (ps {ps} eager {eager})"
        );
    }
    for v in 40..45 {
        assert_eq!(
            read(v),
            Some(page(ps, 2_000_000 + v)),
            "page {v} (ps {ps} eager {eager})"
        );
    }
    for v in (25..40).chain(45..n) {
        assert_eq!(
            read(v),
            Some(page(ps, v)),
            "page {v} (ps {ps} eager {eager})"
        );
    }
    assert_eq!(read(far), None, "mapped zero page (ps {ps} eager {eager})");
    // Mapping blocks: bits as at the pause.
    let bits_per_block = ps * 8;
    let block0 = read(MAP_KEY_BASE).expect("block 0");
    let bit = |blk: &[u8], v: u64| blk[(v / 8) as usize] & (1 << (v % 8)) != 0;
    for v in 0..n {
        let want = !(10..20).contains(&v);
        assert_eq!(bit(&block0, v), want, "bit {v} (ps {ps} eager {eager})");
    }
    assert!(
        block0[(n as usize).div_ceil(8)..].iter().all(|b| *b == 0),
        "no stray bits"
    );
    let blk = read(MAP_KEY_BASE + far / bits_per_block).expect("far block");
    let off = far % bits_per_block;
    for (i, byte) in blk.iter().enumerate() {
        let want = if i as u64 == off / 8 {
            1u8 << (off % 8)
        } else {
            0
        };
        assert_eq!(*byte, want, "far block byte {i} (ps {ps} eager {eager})");
    }
}

#[test]
fn reused_batch_buffers_leave_nothing_stale_in_a_later_snapshot() {
    for ps in [512u64, 4096, 16384] {
        for eager in [true, false] {
            run(ps, eager, false);
        }
    }
}

#[test]
fn reused_batch_buffers_leave_nothing_stale_in_an_encrypted_store() {
    for eager in [true, false] {
        run(4096, eager, true);
    }
}
