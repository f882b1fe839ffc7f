//! Criterion: page-table get hits, pagesnap against hashbrown, 64 Ki sparse mappings.
//! `cargo bench -p pagesnap-bench --bench pagetable`

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use pagesnap_bench::{keys, page, pagesnap, Map, Pattern};
use pagesnap_pagetable::{DefaultHash, SpinLock};

fn get_hits(c: &mut Criterion) {
    let (present, _) = keys(1 << 16, Pattern::Sparse, 1);
    let table = pagesnap::<DefaultHash, SpinLock>(&present);
    let brown: hashbrown::HashMap<u64, _> = present
        .iter()
        .enumerate()
        .map(|(i, k)| (*k, page(*k, i as u64)))
        .collect();
    let mut g = c.benchmark_group("get hit, 64 Ki sparse mappings");
    g.bench_function("pagesnap PageTable", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 7919) % present.len();
            black_box(table.get(present[i]))
        })
    });
    g.bench_function("hashbrown HashMap", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 7919) % present.len();
            black_box(brown.get(&present[i]).copied())
        })
    });
    g.finish();
}

criterion_group!(benches, get_hits);
criterion_main!(benches);
