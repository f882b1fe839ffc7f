//! Section `checkpoint` (issue 13): continuous durable checkpointing of a 256 MiB space, side by
//! side with the disk's own ceiling for durable commits, measured in the same run on a real
//! directory (`$TMPDIR`, else `/tmp`).
//!
//! 1. Raw limits on a preallocated file: one commit-sized write (655 × 4 KiB plus a lean index of
//!    48 B per page) then `fdatasync`, at random offsets and appended (the ceiling); the same with
//!    the metadata volume pagesnap actually wrote; that volume under the store's commit protocol
//!    (data `fsync`, then two 4 KiB superblock slots each `fsync`ed); a lone 4 KiB + `fdatasync`.
//! 2. pagesnap: 65,536 pages mapped and written, first snapshot; then N times: dirty 655 random
//!    pages with new content, `snapshot()` (blocking, durable).
//! 3. A mutator writing random pages of a 655-page hot set for a fixed time, alone, then while
//!    another thread takes a snapshot every 10 ms.

use crate::Opts;
use pagesnap_bench::Rng;
use pagesnap_engine::{SnapshotReport, Space};
use pagesnap_pagetable::VirtAddr;
use pagesnap_store::{Store, StoreOptions};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;
/// 256 MiB of 4 KiB pages.
const PAGES: u64 = 1 << 16;
/// 1% of the space.
const DIRTY: u64 = 655;
const BASE: u64 = 0x6000_0000_0000;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn median_u64(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// Fills a page with fresh pseudo-random content (no page is ever deduplicated by the store).
fn fill(buf: &mut [u8], r: &mut Rng) {
    for c in buf.chunks_mut(8) {
        c.copy_from_slice(&r.next_u64().to_le_bytes());
    }
}

/// A file of `len` bytes really allocated (written and synced), so the timed writes overwrite
/// allocated blocks: the most favourable case for the raw ceiling.
fn preallocated(path: &std::path::Path, len: u64) -> anyhow::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let chunk = vec![0xA5u8; 1 << 20];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(chunk.len() as u64) as usize;
        f.write_all_at(&chunk[..n], off)?;
        off += n as u64;
    }
    f.sync_all()?;
    Ok(f)
}

/// Index bytes per page a lean durable index would write (page number, 32-byte hash, location).
const LEAN_META_PER_PAGE: u64 = 48;

/// How a raw durable commit is written.
#[derive(Clone, Copy)]
enum Shape {
    /// 655 pwrites of 4 KiB at random page offsets (an in-place page file), then the metadata at
    /// one random offset, then `fdatasync`.
    Random,
    /// The same bytes appended (a log, as the store writes), then `fdatasync`.
    Append,
    /// The store's commit protocol: the bytes appended, `fsync`, then two 4 KiB superblock-slot
    /// writes each followed by `fsync` of the slot file.
    Protocol,
    /// One 4 KiB pwrite, `fdatasync`.
    Small,
}

struct RawRow {
    name: String,
    sorted: Vec<Duration>,
}

/// Each shape `n` times, interleaved (so a noisy neighbour on the shared disk hits every row
/// alike); `meta` = pagesnap's median metadata bytes per snapshot.
fn raw(dir: &std::path::Path, meta: u64, n: usize, r: &mut Rng) -> anyhow::Result<Vec<RawRow>> {
    let len = 256u64 << 20;
    let data = preallocated(&dir.join("raw-data"), len)?;
    let slots = preallocated(&dir.join("raw-slots"), 2 * PAGE)?;
    let lean = DIRTY * LEAN_META_PER_PAGE;
    let kib = |b: u64| b as f64 / 1024.0;
    let rows: Vec<(String, Shape, u64)> = vec![
        (
            format!("{DIRTY} × 4 KiB at random offsets + {:.0} KiB lean index ({LEAN_META_PER_PAGE} B/page), `fdatasync`", kib(lean)),
            Shape::Random,
            lean,
        ),
        (
            format!("{DIRTY} × 4 KiB + {:.0} KiB lean index, appended, `fdatasync` (**ceiling**)", kib(lean)),
            Shape::Append,
            lean,
        ),
        (
            format!("{DIRTY} × 4 KiB + {:.0} KiB (pagesnap's metadata), appended, `fdatasync`", kib(meta)),
            Shape::Append,
            meta,
        ),
        (
            format!("{DIRTY} × 4 KiB + {:.0} KiB (pagesnap's metadata), appended, `fsync`, 2 × (4 KiB slot + `fsync`): the store's protocol", kib(meta)),
            Shape::Protocol,
            meta,
        ),
        ("one 4 KiB pwrite, `fdatasync`".into(), Shape::Small, 0),
    ];
    let mut page = vec![0u8; PAGE as usize];
    let meta_buf = vec![0x3Cu8; meta.max(lean) as usize];
    let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(n); rows.len()];
    let mut tail = 0u64; // append cursor (wraps in the preallocated file)
    for _ in 0..n {
        for (k, (_, shape, m)) in rows.iter().enumerate() {
            let bytes = DIRTY * PAGE + m;
            if tail + bytes > len {
                tail = 0;
            }
            let t = Instant::now();
            match shape {
                Shape::Small => {
                    data.write_all_at(&page, (r.next_u64() % (len / PAGE)) * PAGE)?;
                    data.sync_data()?;
                }
                Shape::Random => {
                    for _ in 0..DIRTY {
                        page[..8].copy_from_slice(&r.next_u64().to_le_bytes());
                        data.write_all_at(&page, (r.next_u64() % (len / PAGE)) * PAGE)?;
                    }
                    let at = (r.next_u64() % ((len - m) / PAGE)) * PAGE;
                    data.write_all_at(&meta_buf[..*m as usize], at)?;
                    data.sync_data()?;
                }
                Shape::Append | Shape::Protocol => {
                    for i in 0..DIRTY {
                        page[..8].copy_from_slice(&r.next_u64().to_le_bytes());
                        data.write_all_at(&page, tail + i * PAGE)?;
                    }
                    data.write_all_at(&meta_buf[..*m as usize], tail + DIRTY * PAGE)?;
                    if let Shape::Protocol = shape {
                        data.sync_all()?;
                        slots.write_all_at(&page, 0)?;
                        slots.sync_all()?;
                        slots.write_all_at(&page, PAGE)?;
                        slots.sync_all()?;
                    } else {
                        data.sync_data()?;
                    }
                    tail += bytes.div_ceil(PAGE) * PAGE;
                }
            }
            times[k].push(t.elapsed());
        }
    }
    Ok(rows
        .into_iter()
        .zip(times)
        .map(|((name, _, _), mut sorted)| {
            sorted.sort();
            RawRow { name, sorted }
        })
        .collect())
}

/// A 256 MiB space with every page written once and a first snapshot taken.
fn full_space(dir: &std::path::Path, r: &mut Rng) -> anyhow::Result<Space> {
    let space = Space::create(Store::init(dir, StoreOptions::default())?)?;
    space.map(VirtAddr(BASE), PAGES * PAGE)?;
    let mut buf = vec![0u8; PAGE as usize];
    for p in 0..PAGES {
        fill(&mut buf, r);
        space.write(VirtAddr(BASE + p * PAGE), &buf)?;
    }
    space.snapshot()?;
    Ok(space)
}

struct Loop {
    wall: Duration,
    reports: Vec<SnapshotReport>,
}

/// `n` times: dirty 655 random pages with new content, then a blocking durable snapshot.
fn snapshot_loop(space: &Space, n: usize, r: &mut Rng) -> anyhow::Result<Loop> {
    let mut buf = vec![0u8; PAGE as usize];
    let mut reports = Vec::with_capacity(n);
    let t = Instant::now();
    for _ in 0..n {
        for _ in 0..DIRTY {
            fill(&mut buf, r);
            space.write(VirtAddr(BASE + (r.next_u64() % PAGES) * PAGE), &buf)?;
        }
        reports.push(space.snapshot()?);
    }
    Ok(Loop {
        wall: t.elapsed(),
        reports,
    })
}

struct Mutator {
    writes: u64,
    secs: f64,
    snapshots: Vec<SnapshotReport>,
    late: u64,
}

/// One thread writes random 4 KiB pages of `hot` for `dur`; with `cadence`, another takes a
/// snapshot at every tick (at once if the previous one overran the tick).
fn mutate(
    space: &Space,
    hot: &[u64],
    dur: Duration,
    cadence: Option<Duration>,
) -> anyhow::Result<Mutator> {
    let stop = AtomicBool::new(false);
    let writes = AtomicU64::new(0);
    let (secs, snaps) = std::thread::scope(|s| -> anyhow::Result<_> {
        let writer = s.spawn(|| -> anyhow::Result<f64> {
            let mut r = Rng(77);
            let mut buf = vec![0u8; PAGE as usize];
            fill(&mut buf, &mut r);
            let mut n = 0u64;
            let t = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                // Every write is new content: a stamp in the first 8 bytes.
                buf[..8].copy_from_slice(&n.to_le_bytes());
                let p = hot[(r.next_u64() % hot.len() as u64) as usize];
                space.write(VirtAddr(BASE + p * PAGE), &buf)?;
                n += 1;
            }
            writes.store(n, Ordering::Relaxed);
            Ok(t.elapsed().as_secs_f64())
        });
        let t0 = Instant::now();
        let mut snaps = Vec::new();
        let mut late = 0u64;
        if let Some(every) = cadence {
            let mut next = t0 + every;
            while t0.elapsed() < dur {
                let now = Instant::now();
                if now < next {
                    std::thread::sleep(next - now);
                } else if now > next + every {
                    late += 1;
                }
                next = next.max(Instant::now()) + every;
                snaps.push(space.snapshot()?);
            }
        } else {
            std::thread::sleep(dur);
        }
        stop.store(true, Ordering::Relaxed);
        let secs = writer
            .join()
            .map_err(|_| anyhow::anyhow!("mutator panicked"))??;
        Ok((secs, (snaps, late)))
    })?;
    Ok(Mutator {
        writes: writes.load(Ordering::Relaxed),
        secs,
        snapshots: snaps.0,
        late: snaps.1,
    })
}

fn yes(met: bool) -> &'static str {
    if met {
        "**met**"
    } else {
        "not met"
    }
}

pub(crate) fn checkpoint(opts: &Opts) -> anyhow::Result<()> {
    let n = if opts.full { 1000 } else { 200 };
    let dur = Duration::from_secs(if opts.full { 2 } else { 1 });
    let tmp = std::env::var_os("TMPDIR").unwrap_or_else(|| "/tmp".into());
    let dir = tempfile::tempdir_in(&tmp)?;
    println!("## Continuous checkpointing (issue 13)\n");
    println!(
        "256 MiB space ({PAGES} pages of 4 KiB, all written, first snapshot taken); {DIRTY} random pages (1%) dirtied with new content before each of {n} blocking durable snapshots; directory under `{}`. Raw limits: the same bytes on raw preallocated files of the same directory, {n} times each.\n",
        tmp.to_string_lossy()
    );
    let mut r = Rng(13);

    // 2. pagesnap (first, so the raw replay can use its metadata volume)
    let t = Instant::now();
    let space = full_space(&dir.path().join("store"), &mut r)?;
    let setup = t.elapsed();
    let lp = snapshot_loop(&space, n, &mut r)?;
    let mut durations: Vec<Duration> = lp.reports.iter().map(|x| x.duration).collect();
    durations.sort();
    let mut pauses: Vec<Duration> = lp.reports.iter().map(|x| x.pause).collect();
    pauses.sort();
    let mut data: Vec<u64> = lp.reports.iter().map(|x| x.data_bytes).collect();
    let mut meta: Vec<u64> = lp.reports.iter().map(|x| x.meta_bytes).collect();
    let mut persisted: Vec<u64> = lp.reports.iter().map(|x| x.pages_persisted).collect();
    let (data_med, meta_med, pers_med) = (
        median_u64(&mut data),
        median_u64(&mut meta),
        median_u64(&mut persisted),
    );
    let loop_rate = n as f64 / lp.wall.as_secs_f64();
    let commit_rate = 1.0 / pct(&durations, 0.5).as_secs_f64();

    // 1. raw limits, with pagesnap's median metadata volume
    let raw = raw(dir.path(), meta_med.max(1), n, &mut r)?;
    let rate = |v: &[Duration]| 1.0 / pct(v, 0.5).as_secs_f64();
    let raw_rate = rate(&raw[1].sorted);
    let proto_rate = rate(&raw[3].sorted);

    // 3. the mutator on a 1% hot set, alone and under a snapshot every 10 ms
    let mut hot: Vec<u64> = (0..PAGES).collect();
    for i in 0..DIRTY as usize {
        let j = i + (r.next_u64() % (PAGES - i as u64)) as usize;
        hot.swap(i, j);
    }
    hot.truncate(DIRTY as usize);
    space.snapshot()?; // start from a clean epoch
                       // Alone and under snapshots, in alternating pairs: the machine's speed drifts (it is shared),
                       // so each pair's ratio compares runs a second apart, and the median pair is reported.
    let pairs = if opts.full { 9 } else { 5 };
    let mut ratios = Vec::new();
    let (mut alone_rates, mut under_rates) = (Vec::new(), Vec::new());
    let mut under = Mutator {
        writes: 0,
        secs: 0.0,
        snapshots: Vec::new(),
        late: 0,
    };
    for _ in 0..pairs {
        let a = mutate(&space, &hot, dur, None)?;
        let u = mutate(&space, &hot, dur, Some(Duration::from_millis(10)))?;
        let (ar, ur) = (a.writes as f64 / a.secs, u.writes as f64 / u.secs);
        ratios.push(ur / ar);
        alone_rates.push(ar);
        under_rates.push(ur);
        under.writes += u.writes;
        under.secs += u.secs;
        under.snapshots.extend(u.snapshots);
        under.late += u.late;
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (lo, hi) = (
        ratios.iter().copied().fold(f64::INFINITY, f64::min),
        ratios.iter().copied().fold(0.0, f64::max),
    );
    let ratio = med(&mut ratios);
    let base_rate = med(&mut alone_rates);
    let under_rate = med(&mut under_rates);
    let mut upauses: Vec<Duration> = under.snapshots.iter().map(|x| x.pause).collect();
    upauses.sort();
    let mut udur: Vec<Duration> = under.snapshots.iter().map(|x| x.duration).collect();
    udur.sort();
    let cow: u64 = under.snapshots.iter().map(|x| x.copied_on_write).sum();
    let mut upers: Vec<u64> = under.snapshots.iter().map(|x| x.pages_persisted).collect();
    let upers_med = median_u64(&mut upers);

    println!("### Raw limits of this disk\n");
    println!("| durable write | median | p99 | per second |");
    println!("|---|---:|---:|---:|");
    let row = |name: &str, v: &[Duration]| {
        println!(
            "| {name} | {:.2} ms | {:.2} ms | {:.0} |",
            ms(pct(v, 0.5)),
            ms(pct(v, 0.99)),
            1.0 / pct(v, 0.5).as_secs_f64()
        );
    };
    for x in &raw {
        row(&x.name, &x.sorted);
    }

    println!("\n### pagesnap: {n} snapshots, {DIRTY} dirty pages each\n");
    println!("| measure | value |");
    println!("|---|---:|");
    println!(
        "| setup: map + write 256 MiB + first snapshot | {:.2} s |",
        setup.as_secs_f64()
    );
    println!("| snapshots/s, whole loop (dirtying included) | {loop_rate:.1} |");
    println!(
        "| snapshot duration (pause → commit) median / p99 / max | {:.2} / {:.2} / {:.2} ms |",
        ms(pct(&durations, 0.5)),
        ms(pct(&durations, 0.99)),
        ms(pct(&durations, 1.0))
    );
    println!(
        "| pause median / p99 / max | {:.1} / {:.1} / {:.1} µs |",
        us(pct(&pauses, 0.5)),
        us(pct(&pauses, 0.99)),
        us(pct(&pauses, 1.0))
    );
    println!("| pages persisted per snapshot (median) | {pers_med} |");
    println!(
        "| data / metadata bytes per snapshot (median) | {data_med} / {meta_med} (metadata/data {:.3}) |",
        meta_med as f64 / data_med.max(1) as f64
    );

    println!(
        "\n### Mutator on a {DIRTY}-page hot set: {pairs} pairs of runs of {:.0} s (alone, then under snapshots), medians\n",
        dur.as_secs_f64()
    );
    println!("| run | writes/s (4 KiB) | snapshots | pause median / max | snapshot median / max | pages per snapshot (median) | copied on write |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    println!("| alone | {:.0} | 0 | – | – | – | – |", base_rate);
    println!(
        "| snapshot every 10 ms | {:.0} | {} ({} ticks overrun) | {:.1} / {:.1} µs | {:.2} / {:.2} ms | {upers_med} | {cow} |",
        under_rate,
        under.snapshots.len(),
        under.late,
        us(pct(&upauses, 0.5)),
        us(pct(&upauses, 1.0)),
        ms(pct(&udur, 0.5)),
        ms(pct(&udur, 1.0))
    );

    println!("\n### Against the targets\n");
    println!("| target | measured | |");
    println!("|---|---:|---|");
    println!(
        "| ≥ 100 durable snapshots/s (256 MiB, 1% dirty) | {loop_rate:.1}/s (commit alone: {commit_rate:.1}/s) | {} |",
        yes(loop_rate >= 100.0)
    );
    println!(
        "| pause flat, ~1 µs (median ≤ 2 µs) | loop: median {:.1} µs, max {:.1} µs; under the mutator: median {:.1} µs, max {:.1} µs | {} |",
        us(pct(&pauses, 0.5)),
        us(pct(&pauses, 1.0)),
        us(pct(&upauses, 0.5)),
        us(pct(&upauses, 1.0)),
        yes(pct(&pauses, 0.5).max(pct(&upauses, 0.5)) <= Duration::from_micros(2))
    );
    println!(
        "| mutator keeps ≥ 0.9× under a snapshot every 10 ms | median of {pairs} pairs {ratio:.2}× (range {lo:.2}–{hi:.2}×) | {} |",
        yes(ratio >= 0.9)
    );
    println!(
        "| ceiling: 1% + lean index appended, one `fdatasync` | {raw_rate:.0}/s; pagesnap ÷ ceiling = {:.2}× | |",
        loop_rate / raw_rate
    );
    println!(
        "| the store's bytes and 3-sync protocol on raw files | {proto_rate:.0}/s; pagesnap ÷ that = {:.2}× | |",
        loop_rate / proto_rate
    );
    println!();
    Ok(())
}
