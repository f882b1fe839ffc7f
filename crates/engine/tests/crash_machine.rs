//! The durability promise end to end, as a state machine: random map, write, unmap, snapshot
//! (blocking and background), delete, gc, *crash* and reopen, against a reference model, over the
//! fault-injecting backend. A crash is planned a random number of storage operations ahead; when it
//! hits, the directory is rebuilt with each unsynced write landing whole, torn, garbled or not at
//! all (chosen by the test), and the space is reopened. Then: every snapshot whose commit returned
//! `Ok` (and was not deleted) restores byte for byte, nothing half-written is visible, gc leaves no
//! leak, and work goes on. A *panic* step makes the backend panic a random number of operations
//! into the next snapshot: the snapshot fails with an error (or, past its commit point, is whole
//! in the store), and the space goes on.

use pagesnap_engine::EngineError;
use pagesnap_engine::Space;
use pagesnap_pagetable::VirtAddr;
use pagesnap_store::fault::{FaultPlan, FaultyStorage, Intercept};
use pagesnap_store::{Mode, SharedStorage, SnapshotId, Store, StoreOptions};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const PS: u64 = 512;
static STATES: AtomicU64 = AtomicU64::new(0);
static PANICS: AtomicU64 = AtomicU64::new(0);

/// `io`, panicking at the storage operation `countdown` reaches zero on (0: never).
fn panicking(io: &Arc<FaultyStorage>, countdown: &Arc<AtomicU64>) -> SharedStorage {
    let countdown = countdown.clone();
    Arc::new(Intercept::new(io.clone(), move |_| {
        let left = countdown.load(Ordering::SeqCst);
        if left > 0 {
            countdown.store(left - 1, Ordering::SeqCst);
            if left == 1 {
                panic!("injected storage panic");
            }
        }
        Ok(())
    }))
}

fn opts() -> StoreOptions {
    StoreOptions {
        page_size: PS as u32,
        segment_bytes: 16 << 10,
        preallocate: 4 << 10,
        max_pending_changes: 6,
        ..StoreOptions::default()
    }
}

#[derive(Clone, Debug)]
enum Op {
    Map(u64),
    Unmap(u64),
    Write(u64, u8),
    Snapshot(bool),
    Delete(usize),
    Gc,
    Crash { ops_ahead: u64, fate: u64 },
    Panic { ops_ahead: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..20u64).prop_map(Op::Map),
        1 => (0..20u64).prop_map(Op::Unmap),
        5 => ((0..20u64), any::<u8>()).prop_map(|(v, b)| Op::Write(v, b)),
        3 => any::<bool>().prop_map(Op::Snapshot),
        1 => any::<usize>().prop_map(Op::Delete),
        1 => Just(Op::Gc),
        2 => ((0..120u64), any::<u64>()).prop_map(|(ops_ahead, fate)| Op::Crash { ops_ahead, fate }),
        1 => (1..60u64).prop_map(|ops_ahead| Op::Panic { ops_ahead }),
    ]
}

type Pages = BTreeMap<u64, u8>;

fn state(space: &Space) -> Pages {
    let mut out = Pages::new();
    for v in 0..20u64 {
        let mut b = vec![0u8; PS as usize];
        if space.read(VirtAddr(v * PS), &mut b).is_ok() {
            assert!(
                b.iter().all(|x| *x == b[0]),
                "page {v} is not uniform: torn state"
            );
            out.insert(v, b[0]);
        }
    }
    out
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let mut io = Arc::new(FaultyStorage::new());
    let countdown = Arc::new(AtomicU64::new(0));
    let mut space = Some(
        Space::create(Store::init_with(panicking(&io, &countdown), opts()).map_err(fail)?)
            .map_err(fail)?,
    );
    let mut now = Pages::new();
    let mut committed: BTreeMap<SnapshotId, Pages> = BTreeMap::new();
    for op in ops {
        let s = space.as_ref().expect("space");
        match op {
            Op::Map(v) => {
                s.map(VirtAddr(v * PS), PS).map_err(fail)?;
                now.entry(*v).or_insert(0);
            }
            Op::Unmap(v) => {
                s.unmap(VirtAddr(v * PS), PS).map_err(fail)?;
                now.remove(v);
            }
            Op::Write(v, b) => {
                if now.contains_key(v) {
                    s.write(VirtAddr(v * PS), &[*b; PS as usize])
                        .map_err(fail)?;
                    now.insert(*v, *b);
                }
            }
            Op::Snapshot(bg) => {
                let r = if *bg {
                    s.begin_snapshot().map_err(fail)?.wait()
                } else {
                    s.snapshot()
                }
                .map_err(fail)?;
                committed.insert(r.id, now.clone());
            }
            Op::Delete(i) if committed.len() > 1 => {
                let id = *committed.keys().nth(i % (committed.len() - 1)).expect("id");
                s.with_store(|st| st.delete(&[id])).map_err(fail)?;
                committed.remove(&id);
            }
            Op::Delete(_) => {}
            Op::Gc => {
                s.with_store(|st| st.gc()).map_err(fail)?;
            }
            Op::Panic { ops_ahead } => {
                countdown.store(*ops_ahead, Ordering::SeqCst);
                let pause_state = now.clone();
                let result = s.snapshot();
                let fired = countdown.swap(0, Ordering::SeqCst) == 0;
                match result {
                    Ok(r) => {
                        committed.insert(r.id, pause_state);
                    }
                    Err(EngineError::PersistPanicked(_)) if fired => {
                        PANICS.fetch_add(1, Ordering::Relaxed);
                        // Past its commit point the snapshot is in the store, whole.
                        let ids = s.with_store(|st| st.snapshot_ids()).map_err(fail)?;
                        let extra: Vec<_> = ids
                            .into_iter()
                            .filter(|i| !committed.contains_key(i))
                            .collect();
                        prop_assert!(extra.len() <= 1, "more than one snapshot appeared");
                        if let Some(x) = extra.first() {
                            committed.insert(*x, pause_state);
                        }
                    }
                    Err(e) => return Err(fail(format!("snapshot failed: {e}"))),
                }
                // The space goes on: the next snapshot persists everything since the last good one.
                let r = s.snapshot().map_err(fail)?;
                committed.insert(r.id, now.clone());
            }
            Op::Crash { ops_ahead, fate } => {
                // Crash somewhere inside the next snapshot (or just after it, if it is short).
                io.set_plan(FaultPlan {
                    crash_at: Some(*ops_ahead),
                    ..FaultPlan::default()
                });
                let pause_state = now.clone();
                let result = s.snapshot();
                let crashed = io.has_crashed();
                if let (Ok(r), false) = (&result, crashed) {
                    committed.insert(r.id, pause_state.clone());
                }
                drop(space.take());
                let image = Arc::new(io.crash_image(*fate));
                io = image;
                STATES.fetch_add(1, Ordering::Relaxed);
                let store = Store::open_with(io.clone(), Mode::Write, opts())
                    .map_err(|e| fail(format!("reopen after crash: {e}")))?
                    .0;
                // Every acknowledged snapshot is there and exact; nothing else but possibly the
                // one in flight, whole.
                let ids = store.snapshot_ids().map_err(fail)?;
                for id in committed.keys() {
                    prop_assert!(ids.contains(id), "acknowledged snapshot {} lost", id);
                }
                let extra: Vec<_> = ids
                    .iter()
                    .filter(|i| !committed.contains_key(i))
                    .copied()
                    .collect();
                prop_assert!(
                    extra.len() <= 1,
                    "more than the in-flight snapshot appeared: {:?}",
                    extra
                );
                if let Some(x) = extra.first() {
                    committed.insert(*x, pause_state.clone());
                }
                let report = store.verify(&[]).map_err(fail)?;
                prop_assert!(
                    report.is_clean(),
                    "damage after a crash: {:?}",
                    report.damage
                );
                drop(store);
                for (id, want) in &committed {
                    store_restore_check(&io, *id, want)?;
                }
                let (sp, opened) = Space::open(
                    Store::open_with(panicking(&io, &countdown), Mode::Write, opts())
                        .map_err(fail)?
                        .0,
                )
                .map_err(fail)?;
                prop_assert!(opened.damaged.is_empty());
                now = opened
                    .snapshot
                    .map(|id| committed[&id].clone())
                    .unwrap_or_default();
                prop_assert_eq!(state(&sp), now.clone());
                space = Some(sp);
            }
        }
    }
    // At the end: gc leaves no leak and every retained snapshot still restores exactly.
    let s = space.take().expect("space");
    s.with_store(|st| st.gc()).map_err(fail)?;
    let leak = s.with_store(|st| st.check()).map_err(fail)?.leaked_bytes;
    prop_assert_eq!(leak, 0);
    drop(s);
    for (id, want) in &committed {
        store_restore_check(&io, *id, want)?;
    }
    Ok(())
}

fn store_restore_check(
    io: &Arc<FaultyStorage>,
    id: SnapshotId,
    want: &Pages,
) -> Result<(), TestCaseError> {
    let sp = Space::restore(
        Store::open_with(io.clone(), Mode::Write, opts())
            .map_err(fail)?
            .0,
        id,
    )
    .map_err(fail)?;
    prop_assert_eq!(
        &state(&sp),
        want,
        "snapshot {} does not restore exactly",
        id
    );
    Ok(())
}

#[test]
fn committed_snapshots_survive_crashes() {
    let cases = std::env::var("PAGESNAP_ENGINE_CRASH_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    // The injected panics are expected: keep them out of the output (others still print).
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let injected = info
            .payload()
            .downcast_ref::<&str>()
            .is_some_and(|m| m.contains("injected storage panic"));
        if !injected {
            default(info);
        }
    }));
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        ..ProptestConfig::default()
    });
    let result = runner.run(&proptest::collection::vec(op(), 1..50), |ops| run(&ops));
    let states = STATES.load(Ordering::Relaxed);
    match result {
        Ok(()) => println!(
            "{states} engine crash states and {} storage panics checked, 0 failed",
            PANICS.load(Ordering::Relaxed)
        ),
        Err(e) => panic!("{states} engine crash states checked, 1 failed: {e}"),
    }
}
