//! `pagesnap-bench`: pagesnap side by side with what a user would pick instead, in one run, as
//! ratios. Prints markdown tables; writes an SVG chart of lookup throughput against map size.
//!
//! `cargo run --release -p pagesnap-bench` (quick, under 3 minutes on 2 cores) or
//! `cargo run --release -p pagesnap-bench -- --full` (adds 8 Mi mappings and 1 Mi-page snapshots).
//! `--svg PATH` names the chart (default `docs/bench-lookup.svg`). `--section NAME` runs one section:
//! `pagetable`, `epochtree`, `snapshots`, `checkpoint` (continuous checkpointing, issue 13; see
//! `checkpoint.rs`), `write-path` (the store's uncompressed write path against the raw disk, and
//! metadata per data; see `write_path.rs`), and, only by name, `pagetable-targets` (issue 18) and
//! `compression` (issue 16: the default compression against none on random and compressible
//! pages, write and restore, wall and CPU time; `--rounds N`; see `compression.rs`).
//! `--profile-write raw|store|engine [ROUNDS]` (with `--full`: at 1 Mi pages) runs one path of
//! `write-path` alone, for `perf record`.

use pagesnap_bench::{
    keys, live_bytes, page, pagesnap, Brown, Counting, Dash, Flat, Map, Papaya, Pattern, Radix4,
    Rng, RwHash, SccIndex,
};
use pagesnap_engine::Space;
use pagesnap_epochtree::{scan, EpochTree};
use pagesnap_pagetable::{
    BlockingLock, DefaultHash, Epoch, Fibonacci, Fmix64, FoldMul, PageTable, PrototypeModulo,
    SpinLock, VirtAddr, Vpn,
};
use pagesnap_store::{Store, StoreOptions};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod checkpoint;
mod compression;
mod encryption;
mod write_path;

#[global_allocator]
static ALLOC: Counting = Counting;

struct Opts {
    full: bool,
    svg: String,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = Opts {
        full: args.iter().any(|a| a == "--full"),
        svg: args
            .iter()
            .position(|a| a == "--svg")
            .and_then(|i| args.get(i + 1).cloned())
            .unwrap_or_else(|| "docs/bench-lookup.svg".into()),
    };
    if let Some(i) = args.iter().position(|a| a == "--profile") {
        // For cachegrind: build one structure (262,144 sparse mappings) and run LOOKUPS get hits.
        let which = args.get(i + 1).map(String::as_str).unwrap_or("pagesnap");
        let lookups: usize = args
            .get(i + 2)
            .and_then(|a| a.parse().ok())
            .unwrap_or(500_000);
        let (present, _) = keys(1 << 18, Pattern::Sparse, 42);
        let order: Vec<usize> = (0..lookups)
            .map(|i| (i.wrapping_mul(2_654_435_761)) % present.len())
            .collect();
        let m: Box<dyn MapDyn> = match which {
            "hashbrown" => Box::new(Keyed(Brown(
                present
                    .iter()
                    .enumerate()
                    .map(|(i, k)| (*k, page(*k, i as u64)))
                    .collect(),
            ))),
            "pagesnap-fibonacci" => Box::new(Keyed(pagesnap::<Fibonacci, SpinLock>(&present))),
            "pagesnap-foldmul" => Box::new(Keyed(pagesnap::<FoldMul, SpinLock>(&present))),
            "pagesnap-fmix64" => Box::new(Keyed(pagesnap::<Fmix64, SpinLock>(&present))),
            _ => Box::new(Keyed(pagesnap::<DefaultHash, SpinLock>(&present))),
        };
        let sum: u64 = order.iter().map(|i| m.get_key(&present, *i)).sum();
        println!("{which}: {lookups} lookups, checksum {sum}");
        return Ok(());
    }
    if let Some(i) = args.iter().position(|a| a == "--profile-write") {
        // For perf: one write path of section `write-path` alone (raw, store or engine).
        let which = args.get(i + 1).map(String::as_str).unwrap_or("store");
        let rounds = args.get(i + 2).and_then(|a| a.parse().ok()).unwrap_or(5);
        let pages = if opts.full {
            write_path::PAGES_FULL
        } else {
            write_path::PAGES
        };
        return write_path::profile(which, rounds, pages);
    }
    let t0 = Instant::now();
    println!(
        "# pagesnap-bench ({} mode)\n",
        if opts.full { "full" } else { "quick" }
    );
    println!(
        "Machine: {} cores; `cargo run --release -p pagesnap-bench{}`.\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        if opts.full { " -- --full" } else { "" }
    );
    let only = args
        .iter()
        .position(|a| a == "--section")
        .and_then(|i| args.get(i + 1).cloned());
    // `pagetable-targets` is a short check of issue 18's targets and `compression` one of issue
    // 16's (minutes, and 3 GiB of disk): only when asked for by name.
    let run = |name: &str| {
        only.as_deref()
            .map_or(name != "pagetable-targets" && name != "compression", |o| {
                o == name
            })
    };
    if run("pagetable") {
        let chart = page_table(&opts);
        draw(&opts.svg, &chart)?;
    }
    CPU_TIME.store(args.iter().any(|a| a == "--cpu-time"), Ordering::Relaxed);
    if run("pagetable-targets") {
        page_table_targets(&args);
    }
    if run("epochtree") {
        epoch_tree();
    }
    if run("snapshots") {
        snapshots(&opts)?;
    }
    if run("checkpoint") {
        checkpoint::checkpoint(&opts)?;
    }
    if run("write-path") {
        write_path::write_path(&opts)?;
    }
    if run("compression") {
        compression::compression(&args, opts.full)?;
    }
    if run("encryption") {
        encryption::encryption()?;
    }
    println!(
        "\nChart: `{}`. Total time {:.0} s.",
        opts.svg,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Page table

/// Whether [`rate`] counts each thread's CPU time instead of the wall-clock time (`--cpu-time`).
static CPU_TIME: AtomicBool = AtomicBool::new(false);

/// The CPU time this thread has run, in seconds.
fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID needs nothing else.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Runs `op(thread, i)` `per_thread` times on each of `threads` threads; million ops per second.
/// With `--cpu-time`, the sum of each thread's operations per second of its own CPU time: on a
/// machine shared with other jobs, the time slices other processes take drop out (their cache and
/// memory traffic does not), so both sides of a ratio lose less to preemption noise.
fn rate(threads: usize, per_thread: usize, op: impl Fn(usize, usize) -> u64 + Sync) -> f64 {
    let cpu = CPU_TIME.load(Ordering::Relaxed);
    let start = Instant::now();
    let per_cpu = std::sync::Mutex::new(0.0f64);
    std::thread::scope(|s| {
        for t in 0..threads {
            let op = &op;
            let per_cpu = &per_cpu;
            s.spawn(move || {
                let c0 = if cpu { thread_cpu_secs() } else { 0.0 };
                let mut acc = 0u64;
                for i in 0..per_thread {
                    acc = acc.wrapping_add(op(t, i));
                }
                black_box(acc);
                if cpu {
                    let secs = thread_cpu_secs() - c0;
                    *per_cpu.lock().unwrap_or_else(|e| e.into_inner()) +=
                        per_thread as f64 / secs / 1e6;
                }
            });
        }
    });
    if cpu {
        return per_cpu.into_inner().unwrap_or_else(|e| e.into_inner());
    }
    (threads * per_thread) as f64 / start.elapsed().as_secs_f64() / 1e6
}

struct Row {
    name: String,
    bytes_per_mapping: f64,
    hit1: f64,
    hit2: f64,
    miss1: f64,
    set1: Option<f64>,
    set2: Option<f64>,
    mixed2: Option<f64>,
}

/// Measures one structure already holding `present`; `ix` translates a key (the flat array uses
/// dense indexes).
fn measure(
    name: &str,
    m: &dyn MapDyn,
    bytes: usize,
    present: &[u64],
    absent: &[u64],
    order: &[u32],
    ops: usize,
) -> Row {
    let n = present.len();
    let hit = |t: usize, i: usize| m.get_key(present, order[(i * 2 + t) % order.len()] as usize);
    let hit1 = rate(1, ops, hit);
    let hit2 = rate(2, ops, hit);
    let miss1 = rate(1, ops, |_, i| {
        m.get_absent(absent, order[i % order.len()] as usize)
    });
    let (set1, set2, mixed2) = if m.concurrent() {
        let set = |t: usize, i: usize| {
            let k = order[(i * 2 + t) % order.len()] as usize;
            m.set_key(present, k, i as u64);
            1
        };
        let s1 = rate(1, ops / 4, set);
        let s2 = rate(2, ops / 4, set);
        let mixed = |t: usize, i: usize| {
            let k = order[(i * 2 + t) % order.len()] as usize;
            if i % 10 == 9 {
                m.set_key(present, k, i as u64);
                1
            } else {
                m.get_key(present, k)
            }
        };
        (Some(s1), Some(s2), Some(rate(2, ops, mixed)))
    } else {
        (None, None, None)
    };
    Row {
        name: name.into(),
        bytes_per_mapping: bytes as f64 / n as f64,
        hit1,
        hit2,
        miss1,
        set1,
        set2,
        mixed2,
    }
}

/// Object-safe wrapper so one measuring routine serves every structure (the `get` inside is
/// monomorphised per structure; one indirect call per operation is the same for all of them).
trait MapDyn: Sync {
    fn get_key(&self, keys: &[u64], i: usize) -> u64;
    fn get_absent(&self, keys: &[u64], i: usize) -> u64;
    fn set_key(&self, keys: &[u64], i: usize, v: u64);
    fn concurrent(&self) -> bool;
}

struct Keyed<M>(M);
impl<M: Map> MapDyn for Keyed<M> {
    #[inline]
    fn get_key(&self, keys: &[u64], i: usize) -> u64 {
        self.0.get(keys[i]).map_or(0, |p| p.paddr.0)
    }
    #[inline]
    fn get_absent(&self, keys: &[u64], i: usize) -> u64 {
        self.0.get(keys[i]).map_or(1, |p| p.paddr.0)
    }
    fn set_key(&self, keys: &[u64], i: usize, v: u64) {
        self.0.set(page(keys[i], v));
    }
    fn concurrent(&self) -> bool {
        self.0.concurrent()
    }
}

/// The flat array is indexed by position, not by key.
struct Dense(Flat);
impl MapDyn for Dense {
    #[inline]
    fn get_key(&self, _keys: &[u64], i: usize) -> u64 {
        self.0.get(i as u64).map_or(0, |p| p.paddr.0)
    }
    #[inline]
    fn get_absent(&self, keys: &[u64], i: usize) -> u64 {
        // A miss in a flat array is a bounds check.
        self.0
            .get(keys.len() as u64 + i as u64 + (1 << 40))
            .map_or(1, |p| p.paddr.0)
    }
    fn set_key(&self, _: &[u64], _: usize, _: u64) {}
    fn concurrent(&self) -> bool {
        false
    }
}

fn build<M: Map + 'static>(f: impl FnOnce() -> M) -> (Box<dyn MapDyn>, usize) {
    let before = live_bytes();
    let m = f();
    let bytes = live_bytes().saturating_sub(before) + m.os_bytes();
    (Box::new(Keyed(m)), bytes)
}

struct Chart {
    sizes: Vec<usize>,
    series: Vec<(String, Vec<f64>)>,
}

fn page_table(opts: &Opts) -> Chart {
    let sizes: Vec<usize> = if opts.full {
        vec![1 << 16, 1 << 20, 1 << 23]
    } else {
        vec![1 << 16, 1 << 20]
    };
    let ops = if opts.full { 4_000_000 } else { 2_000_000 };
    let mut chart = Chart {
        sizes: sizes.clone(),
        series: Vec::new(),
    };
    println!("## Page table\n");
    println!("Sparse page numbers over a 48-bit address space; descriptors are 64-byte `Page`s; `get` returns a copy. Million operations per second (higher is better); ratios are against single-threaded hashbrown's get-hit rate on 1 thread in the same run. Memory is heap bytes per mapping (counting allocator).\n");
    for &n in &sizes {
        let (present, absent) = keys(n, Pattern::Sparse, 42);
        let mut r = Rng(7);
        let mut order: Vec<u32> = (0..n as u32).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, (r.next_u64() % (i as u64 + 1)) as usize);
        }
        let mut rows = Vec::new();
        let mut skipped: Vec<String> = Vec::new();
        let mut add = |name: &str, (m, bytes): (Box<dyn MapDyn>, usize)| {
            rows.push(measure(
                name,
                m.as_ref(),
                bytes,
                &present,
                &absent,
                &order,
                ops,
            ));
        };
        add(
            "pagesnap (fmix64, spin)",
            build(|| pagesnap::<Fmix64, SpinLock>(&present)),
        );
        add(
            "pagesnap (fibonacci, spin)",
            build(|| pagesnap::<Fibonacci, SpinLock>(&present)),
        );
        add(
            "pagesnap (foldmul, spin)",
            build(|| pagesnap::<FoldMul, SpinLock>(&present)),
        );
        add(
            "pagesnap (fmix64, blocking)",
            build(|| pagesnap::<Fmix64, BlockingLock>(&present)),
        );
        add(
            "hashbrown (1 writer, no sync)",
            build(|| {
                Brown(
                    present
                        .iter()
                        .enumerate()
                        .map(|(i, k)| (*k, page(*k, i as u64)))
                        .collect(),
                )
            }),
        );
        {
            let before = live_bytes();
            let flat = Flat(
                present
                    .iter()
                    .enumerate()
                    .map(|(i, k)| page(*k, i as u64))
                    .collect(),
            );
            let bytes = live_bytes() - before;
            add("flat Vec by dense index", (Box::new(Dense(flat)), bytes));
        }
        // With sparse addresses every mapping gets its own 512-entry leaf (~44 KB): only small
        // sizes fit in memory.
        if n <= 1 << 16 {
            add(
                "4-level radix (x86-64 style)",
                build(|| {
                    let mut t = Radix4::new();
                    for (i, k) in present.iter().enumerate() {
                        t.insert(*k, page(*k, i as u64));
                    }
                    t
                }),
            );
        } else {
            skipped.push(format!("4-level radix at {n} sparse mappings: ~{} GiB of leaf tables (44 KB per mapping at 64 Ki), not built", (n as u64 * 44_000) >> 30));
        }
        add(
            "RwLock<HashMap>",
            build(|| {
                let m = RwHash::default();
                present
                    .iter()
                    .enumerate()
                    .for_each(|(i, k)| m.set(page(*k, i as u64)));
                m
            }),
        );
        add(
            "dashmap",
            build(|| {
                let m = Dash::default();
                present
                    .iter()
                    .enumerate()
                    .for_each(|(i, k)| m.set(page(*k, i as u64)));
                m
            }),
        );
        add(
            "papaya",
            build(|| {
                let m = Papaya::default();
                present
                    .iter()
                    .enumerate()
                    .for_each(|(i, k)| m.set(page(*k, i as u64)));
                m
            }),
        );
        add(
            "scc::HashIndex",
            build(|| {
                let m = SccIndex::default();
                present
                    .iter()
                    .enumerate()
                    .for_each(|(i, k)| m.set(page(*k, i as u64)));
                m
            }),
        );
        let base = rows
            .iter()
            .find(|r| r.name.starts_with("hashbrown"))
            .map_or(1.0, |r| r.hit1);
        println!("### {} mappings\n", n);
        println!("| structure | bytes/mapping | get hit, 1 thr | get hit, 2 thr | get miss | set, 1 thr | set, 2 thr | 90/10 mix, 2 thr | get hit vs hashbrown (1 thr / 2 thr) |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        let f = |x: Option<f64>| x.map_or("—".to_string(), |v| format!("{v:.1}"));
        for r in &rows {
            println!(
                "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {:.2}x / {:.2}x |",
                r.name,
                r.bytes_per_mapping,
                r.hit1,
                r.hit2,
                r.miss1,
                f(r.set1),
                f(r.set2),
                f(r.mixed2),
                r.hit1 / base,
                r.hit2 / base
            );
        }
        for note in &skipped {
            println!("\n- {note}");
        }
        println!();
        for r in &rows {
            match chart.series.iter_mut().find(|s| s.0 == r.name) {
                Some(s) => s.1.push(r.hit1),
                None => chart.series.push((r.name.clone(), vec![r.hit1])),
            }
        }
    }
    patterns_and_writers(ops);
    chart
}

fn patterns_and_writers(ops: usize) {
    let n = 1 << 20;
    println!("### Address patterns ({n} mappings, get hit, 1 thread, M ops/s)\n");
    println!("| pattern | pagesnap (fmix64) | pagesnap (fibonacci) | pagesnap (2022 prototype hash) | hashbrown | pagesnap (fmix64) vs hashbrown |");
    println!("|---|---:|---:|---:|---:|---:|");
    for pattern in [Pattern::Sparse, Pattern::Clustered, Pattern::Colliding] {
        let (present, absent) = keys(n, pattern, 9);
        let order: Vec<u32> = {
            let mut r = Rng(3);
            let mut o: Vec<u32> = (0..n as u32).collect();
            for i in (1..o.len()).rev() {
                o.swap(i, (r.next_u64() % (i as u64 + 1)) as usize);
            }
            o
        };
        let hit = |m: &dyn MapDyn| rate(1, ops, |_, i| m.get_key(&present, order[i % n] as usize));
        let fm = hit(&Keyed(pagesnap::<Fmix64, SpinLock>(&present)));
        let fib = hit(&Keyed(pagesnap::<Fibonacci, SpinLock>(&present)));
        // The prototype hash puts everything into 256 chains: measured on a 20,000-key subset.
        let proto_keys = &present[..20_000];
        let proto = Keyed(pagesnap::<PrototypeModulo, SpinLock>(proto_keys));
        let proto_rate = rate(1, ops / 50, |_, i| {
            proto.get_key(proto_keys, (order[i % n] as usize) % proto_keys.len())
        });
        let brown = hit(&Keyed(Brown(
            present
                .iter()
                .enumerate()
                .map(|(i, k)| (*k, page(*k, i as u64)))
                .collect(),
        )));
        let _ = &absent;
        println!(
            "| {} | {fm:.1} | {fib:.1} | {proto_rate:.2} (20k keys) | {brown:.1} | {:.2}x |",
            pattern.name(),
            fm / brown
        );
    }
    println!();
    // Reads while another thread writes.
    println!("### Reads under a concurrent writer ({n} mappings; 1 reader thread; M gets/s)\n");
    println!("| structure | reads alone | reads while 1 thread sets | ratio |");
    println!("|---|---:|---:|---:|");
    let (present, _) = keys(n, Pattern::Sparse, 11);
    let order: Vec<u32> = (0..n as u32)
        .map(|i| i.wrapping_mul(2_654_435_761) % n as u32)
        .collect();
    let maps: Vec<(&str, Box<dyn MapDyn>)> = vec![
        (
            "pagesnap (fmix64, spin)",
            Box::new(Keyed(pagesnap::<Fmix64, SpinLock>(&present))),
        ),
        (
            "pagesnap (fmix64, blocking)",
            Box::new(Keyed(pagesnap::<Fmix64, BlockingLock>(&present))),
        ),
        ("RwLock<HashMap>", {
            let m = RwHash::default();
            present
                .iter()
                .enumerate()
                .for_each(|(i, k)| m.set(page(*k, i as u64)));
            Box::new(Keyed(m))
        }),
        ("dashmap", {
            let m = Dash::default();
            present
                .iter()
                .enumerate()
                .for_each(|(i, k)| m.set(page(*k, i as u64)));
            Box::new(Keyed(m))
        }),
        ("papaya", {
            let m = Papaya::default();
            present
                .iter()
                .enumerate()
                .for_each(|(i, k)| m.set(page(*k, i as u64)));
            Box::new(Keyed(m))
        }),
        ("scc::HashIndex", {
            let m = SccIndex::default();
            present
                .iter()
                .enumerate()
                .for_each(|(i, k)| m.set(page(*k, i as u64)));
            Box::new(Keyed(m))
        }),
    ];
    for (name, m) in &maps {
        let alone = rate(1, ops, |_, i| m.get_key(&present, order[i % n] as usize));
        let stop = AtomicBool::new(false);
        let mut busy = 0.0;
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    m.set_key(&present, order[(i * 7) % n] as usize, i as u64);
                    i += 1;
                }
            });
            busy = rate(1, ops, |_, i| m.get_key(&present, order[i % n] as usize));
            stop.store(true, Ordering::Relaxed);
        });
        println!(
            "| {name} | {alone:.1} | {busy:.1} | {:.0}% |",
            100.0 * busy / alone
        );
    }
    println!();
}

/// Issue 18's targets, `--section pagetable-targets [--rounds N]`: at 1 Mi sparse mappings, the
/// default table's get hits (1 and 2 threads), misses and reads under a concurrent writer against
/// single-threaded hashbrown, `N` rounds (default 3) in one run. On a shared machine the load can
/// change within seconds, so each round interleaves short runs (8 × 250,000 operations of each
/// measurement, in turn) and compares totals: a burst of load hits both sides of a ratio.
/// `--cpu-time` rates every run by its threads' CPU time (see [`rate`]); `--chain` makes the hit
/// runs dependent lookups (latency instead of throughput).
fn page_table_targets(args: &[String]) {
    let rounds: usize = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    // `--mappings N` measures another size (the targets are at 1 Mi).
    let n: usize = args
        .iter()
        .position(|a| a == "--mappings")
        .and_then(|i| args.get(i + 1))
        .and_then(|a| a.parse().ok())
        .unwrap_or(1 << 20);
    let ops = 250_000;
    let turns = 8;
    let (present, absent) = keys(n, Pattern::Sparse, 42);
    let mut r = Rng(7);
    let mut order: Vec<u32> = (0..n as u32).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, (r.next_u64() % (i as u64 + 1)) as usize);
    }
    // `--hash fibonacci|foldmul|fmix64` measures another hash (the default table's is foldmul).
    let hash = args
        .iter()
        .position(|a| a == "--hash")
        .and_then(|i| args.get(i + 1))
        .map_or("default", String::as_str);
    // `--huge-pages`: the table's arrays on huge-page chunks (opt-in: `set_huge_pages`).
    let huge_pages =
        args.iter().any(|a| a == "--huge-pages") && pagesnap_pagetable::set_huge_pages(true);
    let (table, bytes) = match hash {
        "fibonacci" => build(|| pagesnap::<Fibonacci, pagesnap_pagetable::DefaultLock>(&present)),
        "foldmul" => build(|| pagesnap::<FoldMul, pagesnap_pagetable::DefaultLock>(&present)),
        "fmix64" => build(|| pagesnap::<Fmix64, pagesnap_pagetable::DefaultLock>(&present)),
        _ => build(|| pagesnap::<DefaultHash, pagesnap_pagetable::DefaultLock>(&present)),
    };
    // `--huge-baseline`: hashbrown's array on huge pages too (see `HUGE_ALLOCS`).
    let huge_baseline = args.iter().any(|a| a == "--huge-baseline");
    pagesnap_bench::HUGE_ALLOCS.store(huge_baseline, Ordering::Relaxed);
    let (brown, _) = build(|| {
        Brown(
            present
                .iter()
                .enumerate()
                .map(|(i, k)| (*k, page(*k, i as u64)))
                .collect(),
        )
    });
    pagesnap_bench::HUGE_ALLOCS.store(false, Ordering::Relaxed);
    let hash = if hash == "default" {
        "default: foldmul"
    } else {
        hash
    };
    let baseline = match (huge_pages, huge_baseline) {
        (true, true) => ", both on huge pages (`--huge-pages --huge-baseline`)",
        (true, false) => ", the table on huge pages (`--huge-pages`)",
        (false, true) => ", hashbrown's array on huge pages (`--huge-baseline`)",
        (false, false) => "",
    };
    println!("## Page-table targets (issue 18): {n} sparse mappings, default table ({hash} hash, default lock){baseline}\n");
    println!(
        "Memory: {:.1} bytes/mapping ({:.2}x the 64-byte descriptor; target <= 1.3x).\n",
        bytes as f64 / n as f64,
        bytes as f64 / n as f64 / 64.0
    );
    println!("| round | hashbrown hit, 1 thr | pagesnap hit, 1 thr | 2 thr | miss | reads alone | reads under a writer | hit 1 thr / hashbrown (>= 0.7) | hit 2 thr / hashbrown (>= 1.2) | miss / hit (>= 1) | under writer / alone (>= 0.8) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    // Each run starts where the last one of its kind stopped, so turns do not repeat keys.
    // `--chain`: each lookup's key depends on the last one's result (always the same key as
    // without it), so lookups run one after the other: the latency of one lookup, not throughput.
    let chain = args.iter().any(|a| a == "--chain");
    let hit = |m: &dyn MapDyn, threads: usize, turn: usize| {
        if chain {
            let last = [AtomicU64::new(0), AtomicU64::new(0)];
            return rate(threads, ops, |t, i| {
                // Results are physical addresses below 2^63: the added term is always 0.
                let i = turn * ops + i + (last[t].load(Ordering::Relaxed) >> 63) as usize;
                let r = m.get_key(&present, order[(i * 2 + t) % n] as usize);
                last[t].store(r, Ordering::Relaxed);
                r
            });
        }
        rate(threads, ops, |t, i| {
            let i = turn * ops + i;
            m.get_key(&present, order[(i * 2 + t) % n] as usize)
        })
    };
    let under_writer = |turn: usize| {
        let stop = AtomicBool::new(false);
        let mut busy = 0.0;
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut i = turn * ops;
                while !stop.load(Ordering::Relaxed) {
                    table.set_key(&present, order[(i * 13) % n] as usize, i as u64);
                    i += 1;
                }
            });
            busy = hit(table.as_ref(), 1, turn + 1000);
            stop.store(true, Ordering::Relaxed);
        });
        busy
    };
    for round in 1..=rounds {
        // Totals of ops/s over the turns: their ratios are ratios of mean rates.
        let mut sum = [0.0f64; 6];
        for turn in 0..turns {
            let turn = (round - 1) * turns + turn;
            sum[0] += hit(brown.as_ref(), 1, turn);
            sum[1] += hit(table.as_ref(), 1, turn);
            sum[2] += hit(table.as_ref(), 2, turn);
            sum[3] += rate(1, ops, |_, i| {
                table.get_absent(&absent, order[(turn * ops + i) % n] as usize)
            });
            sum[4] += hit(table.as_ref(), 1, turn + 1000);
            sum[5] += under_writer(turn);
        }
        let [b1, p1, p2, miss, alone, busy] = sum.map(|x| x / turns as f64);
        println!(
            "| {round} | {b1:.1} | {p1:.1} | {p2:.1} | {miss:.1} | {alone:.1} | {busy:.1} | {:.2}x | {:.2}x | {:.2}x | {:.0}% |",
            p1 / b1,
            p2 / b1,
            miss / p1,
            100.0 * busy / alone
        );
    }
    println!();
}

// ------------------------------------------------------------------------------------------------
// Epoch tree vs scan

fn epoch_tree() {
    let n = 1u64 << 20;
    println!("## Epoch tree vs page-table scan ({n} mapped pages)\n");
    println!("\"Which pages changed since epoch 1\" (list) and \"was anything in this 512-page range modified since epoch 1\" (any), answered by the epoch tree and by a lock-free scan of the page table's per-page epochs. Microseconds per query (lower is better).\n");
    println!("| modified | list: tree | list: scan | scan / tree | any: tree | any: scan | scan / tree |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let table: PageTable = PageTable::with_capacity(n as usize);
    let mut base_tree = EpochTree::new();
    for v in 0..n {
        let vpn = 0x5_5555_0000 + v;
        let _ = table.set_page(pagesnap_pagetable::Page {
            epoch: Epoch(1),
            ..page(vpn, v)
        });
        base_tree.mark(Vpn(vpn));
    }
    base_tree.seal();
    for pct in [0.1f64, 1.0, 10.0] {
        let mut tree = base_tree.clone();
        let changed = (n as f64 * pct / 100.0) as u64;
        let mut r = Rng(pct.to_bits());
        for _ in 0..changed {
            let vpn = 0x5_5555_0000 + r.next_u64() % n;
            tree.mark(Vpn(vpn));
            table.update(VirtAddr(vpn << 12), |p| p.epoch = Epoch(2));
        }
        let view = tree.seal();
        let time = |reps: u32, f: &dyn Fn() -> usize| {
            let t = Instant::now();
            for _ in 0..reps {
                black_box(f());
            }
            t.elapsed().as_secs_f64() * 1e6 / f64::from(reps)
        };
        let list_tree = time(5, &|| {
            view.modified_since(Epoch(1))
                .map(|it| it.count())
                .unwrap_or(0)
        });
        let list_scan = time(2, &|| scan::modified_since(&table, Epoch(1)).len());
        let ranges: Vec<u64> = (0..200).map(|i| 0x5_5555_0000 + (i * 5209) % n).collect();
        let any_tree = time(1, &|| {
            ranges
                .iter()
                .filter(|a| {
                    view.any_modified(Vpn(**a)..Vpn(**a + 512), Epoch(1))
                        .unwrap_or(true)
                })
                .count()
        }) / 200.0;
        let any_scan = time(1, &|| {
            ranges[..4]
                .iter()
                .filter(|a| scan::any_modified(&table, Vpn(**a)..Vpn(**a + 512), Epoch(1)))
                .count()
        }) / 4.0;
        println!(
            "| {pct}% | {list_tree:.0} | {list_scan:.0} | {:.0}x | {any_tree:.2} | {any_scan:.0} | {:.0}x |",
            list_scan / list_tree,
            any_scan / any_tree
        );
        // Put the table back for the next row.
        table.for_each(pagesnap_pagetable::WalkLock::Map, |p| p.epoch = Epoch(1));
    }
    println!();
}

// ------------------------------------------------------------------------------------------------
// Snapshots vs the raw limit

fn raw_limit(bytes: u64) -> anyhow::Result<Duration> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("raw");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    file.set_len(bytes.max(4096))?;
    let src = vec![0x5Au8; 1 << 20];
    let t = Instant::now();
    // SAFETY: the file was just created in a private temporary directory and sized; nothing else
    // maps or truncates it while this map lives.
    let mut map = unsafe { memmap2::MmapMut::map_mut(&file)? };
    for chunk in map.chunks_mut(src.len()) {
        chunk.copy_from_slice(&src[..chunk.len()]);
    }
    map.flush()?;
    file.sync_all()?;
    Ok(t.elapsed())
}

fn snapshots(opts: &Opts) -> anyhow::Result<()> {
    let n: u64 = if opts.full { 1 << 20 } else { 1 << 18 };
    println!("## Snapshots ({n} mapped 4 KiB pages, real filesystem)\n");
    println!("Each row dirties a share of the pages with new content, then takes a snapshot. Raw limit: copying the same number of bytes into a memory-mapped file and syncing it, in the same run. Throughput ratio = raw time / snapshot time.\n");
    println!("| dirty | pages | snapshot | data bytes | metadata bytes | pause | raw limit | snapshot vs raw |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let dir = tempfile::tempdir()?;
    let space = Space::create(Store::init(dir.path(), StoreOptions::default())?)?;
    let base = 0x7000_0000_0000u64;
    space.map(VirtAddr(base), n * 4096)?;
    let mut buf = vec![0u8; 4096];
    let mut r = Rng(5);
    for (round, pct) in [100.0f64, 0.1, 1.0, 10.0, 100.0].into_iter().enumerate() {
        let dirty = ((n as f64) * pct / 100.0).max(1.0) as u64;
        for i in 0..dirty {
            let p = if pct >= 100.0 { i } else { r.next_u64() % n };
            for c in buf.chunks_mut(8) {
                c.copy_from_slice(&r.next_u64().to_le_bytes());
            }
            space.write(VirtAddr(base + p * 4096), &buf)?;
        }
        let report = space.snapshot()?;
        if round == 0 {
            continue; // the first full snapshot warms the store; the second 100% row is measured
        }
        let raw = raw_limit(report.data_bytes)?;
        println!(
            "| {pct}% | {} | {:.3} s | {} | {} | {:.1} µs | {:.3} s | {:.2}x |",
            report.pages_persisted,
            report.duration.as_secs_f64(),
            report.data_bytes,
            report.meta_bytes,
            report.pause.as_secs_f64() * 1e6,
            raw.as_secs_f64(),
            raw.as_secs_f64() / report.duration.as_secs_f64()
        );
    }
    println!();
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Chart

fn draw(path: &str, chart: &Chart) -> anyhow::Result<()> {
    use plotters::prelude::*;
    if let Some(dir) = std::path::Path::new(path).parent() {
        std::fs::create_dir_all(dir)?;
    }
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = chart
        .series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .fold(0.0f64, f64::max)
        * 1.1;
    let xs: Vec<f64> = chart.sizes.iter().map(|n| (*n as f64).log2()).collect();
    let (x0, x1) = (
        xs.first().copied().unwrap_or(16.0) - 0.5,
        xs.last().copied().unwrap_or(20.0) + 0.5,
    );
    let mut c = ChartBuilder::on(&root)
        .caption(
            "get hit, 1 thread: M lookups/s vs mappings (log2)",
            ("sans-serif", 18),
        )
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .right_y_label_area_size(10)
        .build_cartesian_2d(x0..x1, 0.0..max)?;
    c.configure_mesh()
        .x_desc("log2(mappings)")
        .y_desc("M ops/s")
        .draw()?;
    for (i, (name, ys)) in chart.series.iter().enumerate() {
        let color = Palette99::pick(i).mix(0.9);
        c.draw_series(LineSeries::new(
            xs.iter().copied().zip(ys.iter().copied()),
            color.stroke_width(2),
        ))?
        .label(name.clone())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    c.configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    Ok(())
}
