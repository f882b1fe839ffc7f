//! Criterion: page-table get hits, pagesnap against hashbrown, at 64 Ki and at 1 Mi sparse mappings
//! (issue 18's size; the table on 4 KiB pages, as by default: `set_huge_pages` is opt-in).
//! `cargo bench -p pagesnap-bench --bench pagetable`

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use pagesnap_bench::{keys, page, pagesnap, Map, Pattern};
use pagesnap_pagetable::{DefaultHash, SpinLock};

fn get_hits(c: &mut Criterion) {
    for (n, name) in [(1 << 16, "64 Ki"), (1 << 20, "1 Mi")] {
        let (present, _) = keys(n, Pattern::Sparse, 1);
        let table = pagesnap::<DefaultHash, SpinLock>(&present);
        let brown: hashbrown::HashMap<u64, _> = present
            .iter()
            .enumerate()
            .map(|(i, k)| (*k, page(*k, i as u64)))
            .collect();
        let mut g = c.benchmark_group(format!("get hit, {name} sparse mappings"));
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
}

criterion_group!(benches, get_hits);
criterion_main!(benches);
