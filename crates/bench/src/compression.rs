//! Section `compression` (issue 16): what format 4's compression costs and gives, in one run on
//! a real directory (`$TMPDIR`, else `/tmp`), each store fresh, configurations alternating from
//! round to round (the order rotates), medians of `--rounds N` rounds (default 5, 7 with
//! `--full`). Wall time and CPU time (user + sys of the whole process, `getrusage`, so the
//! compression threads count) side by side: on a machine with few cores compression is CPU-bound,
//! and the CPU time is what shows that limit.
//!
//! a. 256 MiB of random (incompressible) pages, the pages of section `write-path` (a 64 MiB
//!    pool, an 8-byte stamp per page): a first snapshot through the store (`begin`, `put` each
//!    page, `commit`) and through the engine (`snapshot()` of pages written before), with
//!    `Compression::None` and with the default, `Auto`. Issue 16's target: the default at most
//!    1.25x the time of `None`. Random frames do not shrink, so both write the same bytes.
//! b. 256 MiB of compressible pages through the store: real files (`/usr/lib/x86_64-linux-gnu`,
//!    `/usr/share/doc`, as the peer benchmark's image; at most 4 MiB of each file, files in a
//!    fixed shuffled order, all-zero and repeated pages left out), topped up with generated
//!    text if the machine has too few; `None`, `Lz4`, `Auto` (zstd 1) and zstd 3: time, CPU and
//!    the bytes stored.
//! c. Restore: every page of the `None` and the `Auto` store of b read back as the CLI's restore
//!    does (`for_each_page`, runs of up to 64 consecutive pages, each run read with
//!    `read_refs_into` on every core), cold (the segment files dropped from the page cache with
//!    `posix_fadvise(DONTNEED)` after a `sync`) and warm (the same again at once).

use crate::write_path::{
    enough_space, mbps, median, mib, ms, segment_bytes, settle, Pool, BASE, PAGE,
};
use anyhow::Context;
use pagesnap_bench::Rng;
use pagesnap_engine::Space;
use pagesnap_pagetable::{VirtAddr, Vpn};
use pagesnap_store::{Compression, Ref, SnapshotId, SnapshotMeta, Store, StoreOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// 256 MiB of 4 KiB pages.
const PAGES: u64 = 1 << 16;
/// At most this much of one file goes into the compressible corpus (4 MiB).
const FILE_CAP: u64 = 4 << 20;
/// Pages per restore run, as the CLI's restore.
const RESTORE_RUN: usize = 64;
/// Issue 16's target: a default snapshot of random data at most this times `None`'s time.
const TARGET: f64 = 1.25;

/// User + system CPU time of the whole process so far (every thread).
fn cpu_time() -> Duration {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `ru` is writable memory of exactly `rusage`'s size and alignment, which the call
    // fills on success.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    if rc != 0 {
        return Duration::ZERO;
    }
    // SAFETY: zero-initialised, and filled by `getrusage` (which returned 0).
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Where pages come from.
trait Pages {
    fn next_page(&mut self) -> &[u8];
}

impl Pages for Pool {
    fn next_page(&mut self) -> &[u8] {
        self.page()
    }
}

/// [`PAGES`] distinct, non-zero, compressible pages; handed out in order from the first after
/// each [`Corpus::rewind`], so page `v` of every store is the same.
struct Corpus {
    bytes: Vec<u8>,
    at: usize,
    files: usize,
    file_pages: u64,
    text_pages: u64,
}

impl Pages for Corpus {
    fn next_page(&mut self) -> &[u8] {
        let at = self.at % PAGES as usize * PAGE;
        self.at += 1;
        &self.bytes[at..at + PAGE]
    }
}

/// Regular files under `dir`, recursively (symbolic links not followed).
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            walk(&e.path(), out);
        } else if ft.is_file() {
            out.push(e.path());
        }
    }
}

/// Words for generated text (the top-up when the machine has too few files).
const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "this",
    "are",
    "or",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "one",
    "all",
    "we",
    "can",
    "has",
    "there",
    "if",
    "more",
    "when",
    "will",
    "who",
    "no",
    "page",
    "store",
    "snapshot",
    "frame",
    "record",
    "segment",
    "commit",
    "index",
    "kernel",
    "memory",
    "disk",
    "image",
    "write",
    "read",
    "data",
    "file",
    "system",
    "version",
    "error",
    "config",
    "value",
    "table",
    "function",
    "return",
    "struct",
    "library",
    "package",
    "license",
    "copyright",
    "software",
    "distributed",
    "warranty",
    "section",
    "usage",
    "option",
    "default",
];

/// One page of generated text: words of a skewed distribution, a line break every few words.
fn text_page(r: &mut Rng, page: &mut [u8]) {
    let n = WORDS.len() as u64;
    let mut i = 0;
    let mut on_line = 0;
    while i < page.len() {
        // The product of two uniform draws favours the first words, as in text.
        let w = WORDS[(r.below(n) * r.below(n) / n) as usize].as_bytes();
        on_line += 1;
        let sep: &[u8] = if on_line >= 8 + r.below(6) {
            on_line = 0;
            b"\n"
        } else {
            b" "
        };
        for &b in w.iter().chain(sep) {
            if i < page.len() {
                page[i] = b;
                i += 1;
            }
        }
    }
}

impl Corpus {
    fn load(r: &mut Rng) -> Corpus {
        use std::hash::{Hash, Hasher};
        let target = PAGES as usize * PAGE;
        let mut files = Vec::new();
        for root in ["/usr/lib/x86_64-linux-gnu", "/usr/share/doc"] {
            walk(Path::new(root), &mut files);
        }
        files.sort();
        for i in (1..files.len()).rev() {
            files.swap(i, r.below(i as u64 + 1) as usize);
        }
        let mut bytes = Vec::with_capacity(target);
        let mut seen = std::collections::HashSet::new();
        let mut used = 0;
        let mut data = Vec::new();
        let mut add = |bytes: &mut Vec<u8>, page: &[u8]| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            page.hash(&mut h);
            if bytes.len() < target && page.iter().any(|b| *b != 0) && seen.insert(h.finish()) {
                bytes.extend_from_slice(page);
            }
        };
        for f in &files {
            if bytes.len() >= target {
                break;
            }
            data.clear();
            let Ok(file) = std::fs::File::open(f) else {
                continue;
            };
            if file.take(FILE_CAP).read_to_end(&mut data).is_err() || data.is_empty() {
                continue;
            }
            used += 1;
            data.resize(data.len().next_multiple_of(PAGE), 0);
            for page in data.chunks_exact(PAGE) {
                add(&mut bytes, page);
            }
        }
        let file_pages = (bytes.len() / PAGE) as u64;
        let mut page = vec![0u8; PAGE];
        while bytes.len() < target {
            text_page(r, &mut page);
            add(&mut bytes, &page);
        }
        Corpus {
            bytes,
            at: 0,
            files: used,
            file_pages,
            text_pages: PAGES - file_pages,
        }
    }

    fn rewind(&mut self) {
        self.at = 0;
    }
}

fn options(compression: Compression) -> StoreOptions {
    StoreOptions {
        compression,
        ..StoreOptions::default()
    }
}

fn name(c: Compression) -> String {
    match c {
        Compression::Auto => "`Auto` (default: zstd 1)".into(),
        Compression::None => "`None`".into(),
        Compression::Lz4 => "`Lz4`".into(),
        Compression::Zstd { level } => format!("`Zstd {{ level: {level} }}`"),
    }
}

/// One timed write.
#[derive(Clone, Copy, Default)]
struct Sample {
    wall: Duration,
    cpu: Duration,
    data: u64,
    meta: u64,
    /// Allocated bytes of the store's segment files after the commit.
    alloc: u64,
}

/// A store after its first snapshot.
struct Kept {
    _dir: tempfile::TempDir,
    store: Store,
    id: SnapshotId,
    /// Allocated bytes of its segment files.
    alloc: u64,
}

/// A first snapshot of [`PAGES`] pages into a fresh store, timed (wall and CPU) from `begin` to
/// the durable `commit`, after the machine settles.
fn store_snapshot(
    tmp: &Path,
    compression: Compression,
    pages: &mut dyn Pages,
) -> anyhow::Result<(Sample, Kept)> {
    let dir = tempfile::tempdir_in(tmp).context("temporary directory")?;
    let mut store = Store::init(dir.path(), options(compression))
        .with_context(|| format!("init store in {}", dir.path().display()))?;
    settle();
    let c = cpu_time();
    let t = Instant::now();
    store.begin(None).context("begin")?;
    for v in 0..PAGES {
        store.put(Vpn(v), pages.next_page()).context("put")?;
    }
    let rep = store.commit(SnapshotMeta::default()).context("commit")?;
    let wall = t.elapsed();
    let cpu = cpu_time().saturating_sub(c);
    anyhow::ensure!(
        rep.pages_written == PAGES,
        "store wrote {} of {PAGES} pages",
        rep.pages_written
    );
    let alloc = segment_bytes(dir.path())?.1;
    Ok((
        Sample {
            wall,
            cpu,
            data: rep.data_bytes,
            meta: rep.meta_bytes,
            alloc,
        },
        Kept {
            _dir: dir,
            store,
            id: rep.id,
            alloc,
        },
    ))
}

/// The engine: map [`PAGES`] pages, write each (untimed), then time `snapshot()`.
fn engine_snapshot(
    tmp: &Path,
    compression: Compression,
    pages: &mut dyn Pages,
) -> anyhow::Result<Sample> {
    let dir = tempfile::tempdir_in(tmp).context("temporary directory")?;
    let store = Store::init(dir.path(), options(compression))
        .with_context(|| format!("init store in {}", dir.path().display()))?;
    let space = Space::create(store).context("create space")?;
    space
        .map(VirtAddr(BASE), PAGES * PAGE as u64)
        .context("map")?;
    for p in 0..PAGES {
        space
            .write(VirtAddr(BASE + p * PAGE as u64), pages.next_page())
            .context("write page")?;
    }
    settle();
    let c = cpu_time();
    let t = Instant::now();
    let rep = space.snapshot().context("snapshot")?;
    let wall = t.elapsed();
    let cpu = cpu_time().saturating_sub(c);
    Ok(Sample {
        wall,
        cpu,
        data: rep.data_bytes,
        meta: rep.meta_bytes,
        alloc: segment_bytes(dir.path())?.1,
    })
}

/// Drops the store's segment files from the page cache (after a `sync`, so they are clean).
fn drop_cache(dir: &Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: `sync` takes no arguments and has no preconditions.
    unsafe { libc::sync() };
    for e in std::fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let e = e.with_context(|| format!("list {}", dir.display()))?;
        if e.file_name().to_string_lossy().starts_with("seg-") {
            let f = std::fs::File::open(e.path())
                .with_context(|| format!("open {}", e.path().display()))?;
            // SAFETY: a valid open descriptor; offset 0 and length 0 name the whole file.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    Ok(())
}

/// Reads every page of the kept snapshot back as the CLI's restore does: runs of up to
/// [`RESTORE_RUN`] consecutive pages, each read with `read_refs_into`, the runs spread over every
/// core. Timed (wall, CPU) from the page walk to the last byte; with `expect`, each run is also
/// compared with the pages written (untimed use only).
fn restore(k: &Kept, expect: Option<&[u8]>) -> anyhow::Result<Sample> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let c = cpu_time();
    let t = Instant::now();
    let mut runs: Vec<(u64, Vec<Ref>)> = Vec::new();
    k.store
        .for_each_page(k.id, |v, r| {
            match runs.last_mut() {
                Some((start, refs))
                    if *start + refs.len() as u64 == v.0 && refs.len() < RESTORE_RUN =>
                {
                    refs.push(*r)
                }
                _ => runs.push((v.0, vec![*r])),
            }
            Ok(())
        })
        .context("walk the snapshot's pages")?;
    let next = AtomicUsize::new(0);
    let read: u64 = std::thread::scope(|s| -> anyhow::Result<u64> {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> anyhow::Result<u64> {
                    let mut buf = Vec::with_capacity(RESTORE_RUN * PAGE);
                    let mut total = 0u64;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((start, refs)) = runs.get(i) else {
                            return Ok(total);
                        };
                        buf.clear();
                        k.store
                            .read_refs_into(refs, &mut buf)
                            .context("read pages")?;
                        total += buf.len() as u64;
                        if let Some(e) = expect {
                            let at = *start as usize * PAGE;
                            anyhow::ensure!(
                                e.get(at..at + buf.len()) == Some(&buf[..]),
                                "pages {start}.. read back differ from those written"
                            );
                        }
                    }
                })
            })
            .collect();
        let mut sum = 0;
        for w in workers {
            sum += w
                .join()
                .map_err(|_| anyhow::anyhow!("a reader panicked"))??;
        }
        Ok(sum)
    })?;
    let wall = t.elapsed();
    let cpu = cpu_time().saturating_sub(c);
    anyhow::ensure!(
        read == PAGES * PAGE as u64,
        "read {read} bytes, expected {}",
        PAGES * PAGE as u64
    );
    Ok(Sample {
        wall,
        cpu,
        data: read,
        meta: 0,
        alloc: k.alloc,
    })
}

/// Cores this process gets right now: `threads` threads spin for 300 ms; their CPU time ÷ wall.
fn free_cores(threads: usize) -> f64 {
    let c = cpu_time();
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let t = Instant::now();
                let mut x = 0u64;
                while t.elapsed() < Duration::from_millis(300) {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            });
        }
    });
    secs_ratio(cpu_time().saturating_sub(c), t.elapsed())
}

fn cpu_median(v: &[Sample]) -> Duration {
    median(&v.iter().map(|s| s.cpu).collect::<Vec<_>>())
}

fn wall_median(v: &[Sample]) -> Duration {
    median(&v.iter().map(|s| s.wall).collect::<Vec<_>>())
}

fn wall_range(v: &[Sample]) -> (Duration, Duration) {
    (
        v.iter().map(|s| s.wall).min().unwrap_or_default(),
        v.iter().map(|s| s.wall).max().unwrap_or_default(),
    )
}

/// The median of the per-round ratios `a[i] / b[i]` of wall times (paired: same round).
fn paired_ratio(a: &[Sample], b: &[Sample]) -> (f64, Vec<f64>) {
    let mut r: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(x, y)| x.wall.as_secs_f64() / y.wall.as_secs_f64())
        .collect();
    let shown = r.clone();
    r.sort_by(f64::total_cmp);
    (r.get(r.len() / 2).copied().unwrap_or(f64::NAN), shown)
}

fn secs_ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

/// The order of `n` configurations in round `round`: rotated by one each round.
fn order(n: usize, round: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| (i + round) % n)
}

fn yes(met: bool) -> &'static str {
    if met {
        "**met**"
    } else {
        "not met"
    }
}

pub(crate) fn compression(args: &[String], full: bool) -> anyhow::Result<()> {
    let section = Instant::now();
    let tmp = PathBuf::from(std::env::var_os("TMPDIR").unwrap_or_else(|| "/tmp".into()));
    let rounds: usize = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|a| a.parse().ok())
        .unwrap_or(if full { 7 } else { 5 })
        .max(1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("## Compression (issue 16)\n");
    if !enough_space(&tmp, 3 << 30)? {
        return Ok(());
    }
    let bytes = PAGES * PAGE as u64;
    let mut r = Rng(0x5EED_0016);
    let mut pool = Pool::new(&mut r);
    let mut corpus = Corpus::load(&mut r);
    println!(
        "Directory under `{}`, {cores} cores. Every store fresh, {PAGES} pages of 4 KiB ({:.0} MiB) in its first snapshot; before each timed write or cold read, `sync(2)` and a pause. {rounds} rounds; in each the configurations run in turn, the order rotating by one from round to round; medians. CPU = user + sys of the whole process (`getrusage(RUSAGE_SELF)`, every thread) over the timed region; cores = CPU / wall. MB = 10^6 bytes.\n",
        tmp.display(),
        mib(bytes)
    );

    let cores_before = free_cores(cores);

    // a. Random pages: None against Auto, store and engine.
    let random = [Compression::None, Compression::Auto];
    let mut store_a: Vec<Vec<Sample>> = vec![Vec::new(); random.len()];
    let mut engine_a: Vec<Vec<Sample>> = vec![Vec::new(); random.len()];
    let mut probes = Vec::new();
    for round in 0..rounds {
        probes.push(free_cores(cores));
        for i in order(random.len(), round) {
            let (s, kept) = store_snapshot(&tmp, random[i], &mut pool)?;
            drop(kept);
            store_a[i].push(s);
            engine_a[i].push(engine_snapshot(&tmp, random[i], &mut pool)?);
        }
    }

    // b. Compressible pages through the store; the None and Auto stores of the last round kept.
    let kinds = [
        Compression::None,
        Compression::Lz4,
        Compression::Auto,
        Compression::Zstd { level: 3 },
    ];
    let mut b: Vec<Vec<Sample>> = vec![Vec::new(); kinds.len()];
    let mut kept: Vec<Option<Kept>> = (0..kinds.len()).map(|_| None).collect();
    for round in 0..rounds {
        probes.push(free_cores(cores));
        for i in order(kinds.len(), round) {
            corpus.rewind();
            let (s, k) = store_snapshot(&tmp, kinds[i], &mut corpus)?;
            b[i].push(s);
            let keep = matches!(kinds[i], Compression::None | Compression::Auto);
            // Keep the newest store of each restored kind (the one before is dropped first).
            kept[i] = None;
            if keep {
                kept[i] = Some(k);
            }
        }
    }

    // c. Restore of the None and Auto stores, cold and warm.
    let restored = [0usize, 2];
    for &i in &restored {
        let k = kept[i]
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no store kept"))?;
        restore(k, Some(&corpus.bytes)).with_context(|| format!("check {}", name(kinds[i])))?;
    }
    let mut cold: Vec<Vec<Sample>> = vec![Vec::new(); restored.len()];
    let mut warm: Vec<Vec<Sample>> = vec![Vec::new(); restored.len()];
    for round in 0..rounds {
        probes.push(free_cores(cores));
        for j in order(restored.len(), round) {
            let k = kept[restored[j]]
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("no store kept"))?;
            drop_cache(k.store.location())?;
            cold[j].push(restore(k, None)?);
            warm[j].push(restore(k, None)?);
        }
    }
    drop(kept);
    let cores_after = free_cores(cores);

    // Report.
    let show: Vec<String> = probes.iter().map(|x| format!("{x:.2}")).collect();
    println!(
        "Cores this process got ({cores} threads spinning 300 ms, CPU ÷ wall; the machine is shared): {cores_before:.2} before the section, {cores_after:.2} after it, at the start of each round of a, b and c: {}.\n",
        show.join(", ")
    );
    println!(
        "### a. {:.0} MiB of random pages: the default against `None`\n",
        mib(bytes)
    );
    println!("The pages of section `write-path` (distinct random content): no frame shrinks by 1/32, so every one is stored plain after one compression attempt.\n");
    println!("| path | compression | median time | min / max | MB/s | median CPU | cores | data bytes written | metadata | segment files (allocated) |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut targets = Vec::new();
    for (path, rows) in [
        ("store: `begin`, `put` × pages, `commit`", &store_a),
        ("engine: `snapshot()`", &engine_a),
    ] {
        for (c, v) in random.iter().zip(rows.iter()) {
            let (lo, hi) = wall_range(v);
            let last = v.last().copied().unwrap_or_default();
            println!(
                "| {path} | {} | {:.0} ms | {:.0} / {:.0} ms | {:.0} | {:.0} ms | {:.2} | {} | {:.2} MiB | {:.1} MiB |",
                name(*c),
                ms(wall_median(v)),
                ms(lo),
                ms(hi),
                mbps(bytes, wall_median(v)),
                ms(cpu_median(v)),
                secs_ratio(cpu_median(v), wall_median(v)),
                last.data,
                mib(last.meta),
                mib(last.alloc)
            );
        }
        let (paired, each) = paired_ratio(&rows[1], &rows[0]);
        targets.push((
            path,
            secs_ratio(wall_median(&rows[1]), wall_median(&rows[0])),
            paired,
            each,
            secs_ratio(cpu_median(&rows[1]), cpu_median(&rows[0])),
        ));
    }
    println!("\nThe floor: a write cannot take less wall time than its CPU time ÷ the cores it gets, so `Auto` ÷ `None` ≥ CPU of `Auto` ÷ (cores × `None`'s wall time); with one core free it is about the CPU ratio.\n");
    println!("| path | `Auto` ÷ `None`, medians | median of the per-round ratios | per round | CPU `Auto` ÷ `None` | extra CPU of `Auto` (compression attempts) | floor with 2 free cores / 1 | target ≤ {TARGET}× |");
    println!("|---|---:|---:|---|---:|---:|---:|---|");
    for (i, (path, med, paired, each, cpu)) in targets.iter().enumerate() {
        let rows = if i == 0 { &store_a } else { &engine_a };
        let extra = cpu_median(&rows[1]).saturating_sub(cpu_median(&rows[0]));
        let floor = |c: f64| {
            (cpu_median(&rows[1]).as_secs_f64() / (c * wall_median(&rows[0]).as_secs_f64()))
                .max(1.0)
        };
        let each: Vec<String> = each.iter().map(|x| format!("{x:.2}")).collect();
        println!(
            "| {path} | {med:.2}× | {paired:.2}× | {} | {cpu:.2}× | {:.0} ms ({:.0} MB/s of one core) | {:.2}× / {:.2}× | {} |",
            each.join(", "),
            ms(extra),
            mbps(bytes, extra.max(Duration::from_micros(1))),
            floor(2.0),
            floor(1.0),
            yes(med.max(*paired) <= TARGET)
        );
    }

    println!(
        "\n### b. {:.0} MiB of compressible pages through the store\n",
        mib(bytes)
    );
    println!(
        "{} pages from {} files (`/usr/lib/x86_64-linux-gnu`, `/usr/share/doc`; at most {} MiB of each, files in a fixed shuffled order, all-zero and repeated pages left out){}. Ratio = page bytes ÷ data bytes written (frame payloads and plain pages; record headers are metadata).\n",
        corpus.file_pages,
        corpus.files,
        FILE_CAP >> 20,
        if corpus.text_pages > 0 {
            format!(", {} pages of generated text", corpus.text_pages)
        } else {
            String::new()
        }
    );
    println!("| compression | median time | min / max | MB/s (page bytes) | median CPU | cores | time ÷ `None` | CPU ÷ `None` | data bytes written | ratio | metadata | segment files (allocated) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (c, v) in kinds.iter().zip(&b) {
        let (lo, hi) = wall_range(v);
        let last = v.last().copied().unwrap_or_default();
        println!(
            "| {} | {:.0} ms | {:.0} / {:.0} ms | {:.0} | {:.0} ms | {:.2} | {:.2}× | {:.2}× | {} | {:.2}× | {:.2} MiB | {:.1} MiB |",
            name(*c),
            ms(wall_median(v)),
            ms(lo),
            ms(hi),
            mbps(bytes, wall_median(v)),
            ms(cpu_median(v)),
            secs_ratio(cpu_median(v), wall_median(v)),
            secs_ratio(wall_median(v), wall_median(&b[0])),
            secs_ratio(cpu_median(v), cpu_median(&b[0])),
            last.data,
            bytes as f64 / last.data.max(1) as f64,
            mib(last.meta),
            mib(last.alloc)
        );
    }

    println!("\n### c. Restore: every page of b's `None` and `Auto` stores read back\n");
    println!("As the CLI's restore reads: the snapshot's pages walked in order, runs of up to {RESTORE_RUN} consecutive pages, each run read with `read_refs_into` (back-to-back records in one `pread`, every page checked against its blake3), runs spread over {cores} threads; nothing written. Cold: the segment files dropped from the page cache first (`posix_fadvise(DONTNEED)` after `sync`); warm: the same read again right after. Every page was compared with what was written once, untimed, before the rounds.\n");
    println!("| store | read | median time | min / max | MB/s (page bytes) | median CPU | cores | time ÷ `None` | CPU ÷ `None` |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for (label, rows) in [("cold", &cold), ("warm", &warm)] {
        for (j, v) in rows.iter().enumerate() {
            let (lo, hi) = wall_range(v);
            let (paired, _) = paired_ratio(v, &rows[0]);
            println!(
                "| {} ({:.0} MiB of segments) | {label} | {:.0} ms | {:.0} / {:.0} ms | {:.0} | {:.0} ms | {:.2} | {:.2}× (per round: {:.2}×) | {:.2}× |",
                name(kinds[restored[j]]),
                mib(v.last().map_or(0, |s| s.alloc)),
                ms(wall_median(v)),
                ms(lo),
                ms(hi),
                mbps(bytes, wall_median(v)),
                ms(cpu_median(v)),
                secs_ratio(cpu_median(v), wall_median(v)),
                secs_ratio(wall_median(v), wall_median(&rows[0])),
                paired,
                secs_ratio(cpu_median(v), cpu_median(&rows[0]))
            );
        }
    }
    println!("\nSection time {:.0} s.\n", section.elapsed().as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_pages_are_text_and_differ() {
        let mut r = Rng(3);
        let mut a = vec![0u8; PAGE];
        let mut b = vec![0u8; PAGE];
        text_page(&mut r, &mut a);
        text_page(&mut r, &mut b);
        assert_ne!(a, b);
        assert!(a
            .iter()
            .all(|c| c.is_ascii_lowercase() || *c == b' ' || *c == b'\n'));
    }

    #[test]
    fn order_rotates_through_every_configuration() {
        let rounds: Vec<Vec<usize>> = (0..4).map(|r| order(4, r).collect()).collect();
        assert_eq!(rounds[0], [0, 1, 2, 3]);
        assert_eq!(rounds[1], [1, 2, 3, 0]);
        for i in 0..4 {
            assert_eq!(rounds.iter().filter(|o| o[0] == i).count(), 1);
        }
    }

    #[test]
    fn cpu_time_advances() {
        let c = cpu_time();
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(cpu_time() > c);
    }

    #[test]
    fn paired_ratio_is_the_median_round() {
        let s = |ms: u64| Sample {
            wall: Duration::from_millis(ms),
            ..Sample::default()
        };
        let (m, each) = paired_ratio(&[s(10), s(30), s(20)], &[s(10), s(10), s(10)]);
        assert_eq!(each, [1.0, 3.0, 2.0]);
        assert_eq!(m, 2.0);
    }
}
