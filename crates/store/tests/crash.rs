//! Crash and I/O-error injection at every storage operation.
//!
//! A workload (snapshots of random pages, deletes of one or two ids per commit as `forget` does, gc) runs on [`FaultyStorage`]. For every
//! operation index it is run again with a crash planned there; the directory is then rebuilt as a
//! crash would leave it — each unsynced write landing whole, torn, garbled or not at all, chosen by
//! a seed — and reopened. Every snapshot whose commit returned `Ok` (and was not deleted) must read
//! back byte for byte, nothing half-written may be visible, verify must be clean, gc must leave no
//! leak, and a new snapshot must commit. The same workloads run with ENOSPC and EIO at every index.

use pagesnap_store::fault::{FaultPlan, FaultyStorage, SplitMix64};
use pagesnap_store::{Epoch, Mode, SnapshotId, SnapshotMeta, Store, StoreError, StoreOptions, Vpn};
use std::collections::BTreeMap;
use std::sync::Arc;

mod campaign;
use campaign::{init_store, open_store, ENCRYPTED};

const PAGE: usize = 512;

fn opts() -> StoreOptions {
    StoreOptions {
        page_size: PAGE as u32,
        segment_bytes: 12 << 10,
        preallocate: 4 << 10,
        // Tiny, so snapshots also go through intermediate index roots.
        max_pending_changes: 5,
        ..StoreOptions::default()
    }
}

fn page(seed: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE];
    for (i, c) in p.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ i as u64).to_le_bytes());
    }
    p
}

#[derive(Clone, Debug)]
enum Step {
    /// Snapshot on top of the latest: (page, content seed or 0 for zero) changes.
    Snapshot(Vec<(u64, u64)>),
    /// Delete the n-th retained snapshot (mod count).
    Delete(usize),
    Gc,
}

fn workload(seed: u64) -> Vec<Step> {
    let mut r = SplitMix64(seed);
    let mut steps = Vec::new();
    for i in 0..5 {
        let n = 1 + r.next_u64() % 12;
        let changes = (0..n)
            .map(|_| {
                (
                    r.next_u64() % 40,
                    if r.next_u64().is_multiple_of(6) {
                        0
                    } else {
                        1 + r.next_u64() % 30
                    },
                )
            })
            .collect();
        steps.push(Step::Snapshot(changes));
        if i >= 2 && r.next_u64().is_multiple_of(3) {
            steps.push(Step::Delete((r.next_u64() % 8) as usize));
        }
        if i == 3 || r.next_u64().is_multiple_of(4) {
            steps.push(Step::Gc);
        }
    }
    steps
}

/// What the workload was told: committed snapshots and their contents.
#[derive(Clone, Debug, Default)]
struct Model {
    snapshots: BTreeMap<u64, BTreeMap<u64, u64>>,
    /// A commit that was under way when the crash came: its id and contents.
    in_flight: Option<(u64, BTreeMap<u64, u64>)>,
    /// A delete that was under way: those snapshots may or may not be gone.
    deleting: Vec<u64>,
    init_ok: bool,
}

fn snapshot_contents(store: &Store, id: SnapshotId) -> Result<BTreeMap<u64, u64>, StoreError> {
    let mut out = BTreeMap::new();
    store.for_each_page(id, |vpn, r| {
        let data = store.read_ref(r)?;
        let seed = (1..=30).find(|s| page(*s) == data).unwrap_or(u64::MAX);
        out.insert(vpn.0, seed);
        Ok(())
    })?;
    Ok(out)
}

/// Runs the workload until an operation fails with a crash; returns what was acknowledged. I/O
/// errors that are not crashes are expected to fail one operation and leave the store usable.
fn run(io: &Arc<FaultyStorage>, steps: &[Step], errors: &mut Vec<String>) -> Model {
    let mut model = Model::default();
    let mut store = match init_store(io.clone(), opts()) {
        Ok(s) => s,
        Err(e) => {
            if !io.has_crashed() {
                errors.push(e.to_string());
            }
            return model;
        }
    };
    model.init_ok = true;
    let mut latest: BTreeMap<u64, u64> = BTreeMap::new();
    let mut latest_id: Option<u64> = None;
    let mut next_id = 1u64;
    for step in steps {
        if io.has_crashed() {
            break;
        }
        match step {
            Step::Snapshot(changes) => {
                let mut want = latest.clone();
                for (v, s) in changes {
                    if *s == 0 {
                        want.remove(v);
                    } else {
                        want.insert(*v, *s);
                    }
                }
                model.in_flight = Some((next_id, want.clone()));
                let result = (|| {
                    store.begin(latest_id.map(SnapshotId))?;
                    for (v, s) in changes {
                        store.put(Vpn(*v), &if *s == 0 { vec![0; PAGE] } else { page(*s) })?;
                    }
                    store.commit(SnapshotMeta {
                        epoch: Epoch(next_id),
                        ..SnapshotMeta::default()
                    })
                })();
                match result {
                    Ok(r) => {
                        assert_eq!(r.id.0, next_id);
                        model.snapshots.insert(next_id, want.clone());
                        latest = want;
                        latest_id = Some(next_id);
                        next_id += 1;
                        model.in_flight = None;
                    }
                    Err(e) => {
                        store.abort();
                        if !io.has_crashed() {
                            errors.push(e.to_string());
                            model.in_flight = None;
                        }
                    }
                }
            }
            Step::Delete(n) => {
                let ids: Vec<u64> = model
                    .snapshots
                    .keys()
                    .copied()
                    .filter(|id| Some(*id) != latest_id)
                    .collect();
                if ids.is_empty() {
                    continue;
                }
                // One id, or two in one commit as `pagesnap forget` deletes what its policy
                // removes.
                let mut doomed = vec![ids[n % ids.len()]];
                if n % 2 == 1 && ids.len() > 1 {
                    doomed.push(ids[(n + 1) % ids.len()]);
                }
                model.deleting = doomed.clone();
                let doomed_ids: Vec<SnapshotId> = doomed.iter().map(|i| SnapshotId(*i)).collect();
                match store.delete(&doomed_ids) {
                    Ok(()) => {
                        for id in &doomed {
                            model.snapshots.remove(id);
                        }
                        model.deleting.clear();
                    }
                    Err(e) if !io.has_crashed() => {
                        errors.push(e.to_string());
                        model.deleting.clear();
                    }
                    Err(_) => {}
                }
            }
            Step::Gc => {
                if let Err(e) = store.gc() {
                    if !io.has_crashed() {
                        errors.push(e.to_string());
                    }
                }
            }
        }
    }
    model
}

/// Checks a recovered directory against what was acknowledged; returns a failure description.
fn check_recovered(io: FaultyStorage, model: &Model) -> Result<(), String> {
    let io = Arc::new(io);
    let (mut store, _) = match open_store(io.clone(), Mode::Write, opts()) {
        Ok(s) => s,
        Err(StoreError::NotAStore { .. }) if !model.init_ok => return Ok(()),
        Err(e) => return Err(format!("reopen failed: {e}")),
    };
    let ids: Vec<u64> = store
        .snapshot_ids()
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|i| i.0)
        .collect();
    // A delete of several ids (as `forget` does) is one commit: all of them are gone, or none.
    let gone = model.deleting.iter().filter(|d| !ids.contains(d)).count();
    if gone != 0 && gone != model.deleting.len() {
        return Err(format!(
            "a delete of {:?} was half applied: {gone} gone",
            model.deleting
        ));
    }
    for (id, want) in &model.snapshots {
        if !ids.contains(id) {
            if model.deleting.contains(id) {
                continue;
            }
            return Err(format!("committed snapshot {id} lost"));
        }
        let got = snapshot_contents(&store, SnapshotId(*id))
            .map_err(|e| format!("snapshot {id}: {e}"))?;
        if &got != want {
            return Err(format!("snapshot {id} changed: {got:?} != {want:?}"));
        }
    }
    for id in &ids {
        if model.snapshots.contains_key(id) {
            continue;
        }
        match &model.in_flight {
            Some((fid, want)) if fid == id => {
                let got = snapshot_contents(&store, SnapshotId(*id))
                    .map_err(|e| format!("in-flight {id}: {e}"))?;
                if &got != want {
                    return Err(format!("half-written snapshot {id} visible"));
                }
            }
            _ => return Err(format!("snapshot {id} visible but never committed")),
        }
    }
    let report = store.verify(&[]).map_err(|e| e.to_string())?;
    if !report.is_clean() {
        return Err(format!("verify after recovery: {:?}", report.damage));
    }
    // The writer's open made both superblock slots name the recovered state again: one flipped
    // bit in either slot now hides no snapshot.
    let mut r = SplitMix64(ids.iter().sum::<u64>() ^ (ids.len() as u64) << 32);
    let flipped = Arc::new(io.crash_image(0));
    let bit = r.below(2 * 4096 * 8);
    flipped
        .flip_bit("superblock", bit / 8, (bit % 8) as u8)
        .map_err(|e| e.to_string())?;
    let (reader, _) = open_store(flipped, Mode::Read, opts())
        .map_err(|e| format!("open after recovery and a superblock flip: {e}"))?;
    if reader.snapshot_ids().map_err(|e| e.to_string())?
        != store.snapshot_ids().map_err(|e| e.to_string())?
    {
        return Err(format!("superblock bit {bit} hid snapshots after recovery"));
    }
    store.gc().map_err(|e| format!("gc after recovery: {e}"))?;
    let leak = store.check().map_err(|e| e.to_string())?.leaked_bytes;
    if leak != 0 {
        return Err(format!("{leak} bytes leaked after gc"));
    }
    // Work goes on.
    let parent = store.latest().map_err(|e| e.to_string())?;
    store.begin(parent).map_err(|e| e.to_string())?;
    store.put(Vpn(7), &page(29)).map_err(|e| e.to_string())?;
    let r = store
        .commit(SnapshotMeta::default())
        .map_err(|e| format!("commit after recovery: {e}"))?;
    if store.read_page(r.id, Vpn(7)).map_err(|e| e.to_string())? != Some(page(29)) {
        return Err("new snapshot after recovery does not read back".into());
    }
    Ok(())
}

fn total_ops(steps: &[Step]) -> u64 {
    let io = Arc::new(FaultyStorage::new());
    let mut errors = Vec::new();
    run(&io, steps, &mut errors);
    assert!(errors.is_empty(), "fault-free run failed: {errors:?}");
    io.ops()
}

fn crash_campaign(workloads: u64, fates: u64) -> (u64, Vec<String>) {
    let mut checked = 0;
    let mut failures = Vec::new();
    for w in 0..workloads {
        let steps = workload(w);
        let n = total_ops(&steps);
        for k in 0..=n {
            let io = Arc::new(FaultyStorage::new());
            io.set_plan(FaultPlan {
                crash_at: Some(k),
                ..FaultPlan::default()
            });
            let mut errors = Vec::new();
            let model = run(&io, &steps, &mut errors);
            assert!(errors.is_empty(), "only the crash may fail: {errors:?}");
            for fate in 0..fates {
                checked += 1;
                if let Err(e) = check_recovered(io.crash_image(fate * 7919 + k), &model) {
                    failures.push(format!("workload {w}, crash at op {k}, fate {fate}: {e}"));
                }
            }
        }
    }
    (checked, failures)
}

#[test]
fn a_committed_snapshot_survives_a_crash_at_every_operation() {
    let workloads = std::env::var("PAGESNAP_CRASH_WORKLOADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let (checked, failures) = crash_campaign(workloads, 4);
    println!("{checked} crash states checked, {} failed", failures.len());
    // Every CI run checks at least 10,000 crash states (a format 3 commit is a few operations,
    // and format 4 gathers pages in frames, so it takes more workloads than format 2 did).
    assert!(
        workloads < 32 || checked >= 10_000,
        "{checked} crash states"
    );
    assert!(
        failures.is_empty(),
        "{}",
        failures
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(checked >= 1000);
}

/// The same campaign on an encrypted store: every page sealed in a frame, chunks and commit
/// records sealed, the key file created by init (a crash inside it leaves no store).
#[test]
fn an_encrypted_store_survives_a_crash_at_every_operation() {
    ENCRYPTED.with(|e| e.set(true));
    let workloads = std::env::var("PAGESNAP_CRASH_WORKLOADS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(8, |w| w.div_ceil(4));
    let (checked, failures) = crash_campaign(workloads, 4);
    println!(
        "{checked} crash states of an encrypted store checked, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{}",
        failures
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(checked >= 1000, "{checked} crash states");
}

#[test]
fn enospc_and_eio_at_every_operation_fail_cleanly() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for w in 0..4 {
        let steps = workload(100 + w);
        let n = total_ops(&steps);
        for (errno, words) in [(28, "disk is full"), (5, "I/O error")] {
            for k in 0..n {
                checked += 1;
                let io = Arc::new(FaultyStorage::new());
                io.set_plan(FaultPlan {
                    fail_at: Some((k, errno)),
                    ..FaultPlan::default()
                });
                let mut errors = Vec::new();
                let model = run(&io, &steps, &mut errors);
                if errors.iter().any(|e| !e.contains(words)) {
                    failures.push(format!("errno {errno} at op {k}: unclear error {errors:?}"));
                    continue;
                }
                // The store is still there and consistent, with every acknowledged snapshot.
                let image = io.crash_image(k);
                if let Err(e) = check_recovered(
                    image,
                    &Model {
                        in_flight: None,
                        ..model
                    },
                ) {
                    failures.push(format!(
                        "workload {w}, errno {errno} at op {k}: {e} (after {errors:?})"
                    ));
                }
            }
        }
    }
    println!("{checked} I/O errors checked, {} failed", failures.len());
    assert!(
        failures.is_empty(),
        "{}",
        failures
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn a_superblock_write_that_cannot_be_undone_stops_the_writer_until_reopen() {
    // Format 2 wrote the superblock in every commit (format 3: the next test).
    let io = Arc::new(FaultyStorage::new());
    let mut store = Store::init_format2_with(io.clone(), opts()).expect("init");
    store.begin(None).expect("begin");
    store.put(Vpn(1), &page(1)).expect("put");
    let first = store.commit(SnapshotMeta::default()).expect("commit").id;
    store.begin(Some(first)).expect("begin");
    store.put(Vpn(2), &page(2)).expect("put");
    // The disk is full for the superblock from now on: the commit's write fails, and so does
    // its undo.
    io.set_plan(FaultPlan {
        fail_at: Some((0, 28)),
        fail_count: 100,
        fail_only: Some("superblock"),
        ..FaultPlan::default()
    });
    let e = store
        .commit(SnapshotMeta::default())
        .expect_err("disk full");
    assert!(e.to_string().contains("disk is full"), "{e}");
    let e = store.begin(Some(first)).expect_err("in doubt");
    assert!(
        matches!(e, StoreError::InDoubt { .. }) && e.to_string().contains("reopen"),
        "{e}"
    );
    drop(store);
    io.set_plan(FaultPlan::default());
    for fate in 0..16 {
        let (store, _) =
            open_store(Arc::new(io.crash_image(fate)), Mode::Write, opts()).expect("reopen");
        assert_eq!(
            store.read_page(first, Vpn(1)).expect("committed"),
            Some(page(1))
        );
        assert!(store.verify(&[]).expect("verify").is_clean());
    }
}

/// Format 3: a commit whose sync fails may or may not be on the disk; the writer then moves the
/// superblock generation on so that it can never count. If that write fails too, the writer is in
/// doubt: it refuses changes until reopened, and the reopened store holds every commit that
/// returned `Ok` and verifies clean (whether the failed one is there is what was in doubt).
#[test]
fn a_failed_commit_whose_hint_cannot_be_written_stops_the_writer_until_reopen() {
    use pagesnap_store::fault::{Intercept, Op};
    use std::sync::atomic::{AtomicBool, Ordering};
    let inner = Arc::new(FaultyStorage::new());
    let failing = Arc::new(AtomicBool::new(false));
    let f = failing.clone();
    let io = Arc::new(Intercept::new(inner.clone(), move |op| {
        let hit = match op {
            Op::Sync(n) => n.starts_with("seg-") || *n == "superblock",
            Op::Write { name, .. } => *name == "superblock",
            _ => false,
        };
        if hit && f.load(Ordering::SeqCst) {
            Err(std::io::Error::from_raw_os_error(5))
        } else {
            Ok(())
        }
    }));
    let mut store = Store::init_with(io.clone(), opts()).expect("init");
    store.begin(None).expect("begin");
    store.put(Vpn(1), &page(1)).expect("put");
    let first = store.commit(SnapshotMeta::default()).expect("commit").id;
    store.begin(Some(first)).expect("begin");
    store.put(Vpn(2), &page(2)).expect("put");
    failing.store(true, Ordering::SeqCst);
    let e = store.commit(SnapshotMeta::default()).expect_err("EIO");
    assert!(e.to_string().contains("I/O error"), "{e}");
    let e = store.begin(Some(first)).expect_err("in doubt");
    assert!(
        matches!(e, StoreError::InDoubt { .. }) && e.to_string().contains("reopen"),
        "{e}"
    );
    drop(store);
    failing.store(false, Ordering::SeqCst);
    for fate in 0..16 {
        let (store, _) =
            open_store(Arc::new(inner.crash_image(fate)), Mode::Write, opts()).expect("reopen");
        assert_eq!(
            store.read_page(first, Vpn(1)).expect("committed"),
            Some(page(1))
        );
        assert!(store.verify(&[]).expect("verify").is_clean());
    }
}
