//! The engine against a model: a `BTreeMap` from page number to page bytes, and a copy of it per
//! snapshot. Random sequences of map, write, unmap, snapshot (blocking and background), restore
//! (eager and lazy) and reopen, on the in-memory store backend. A snapshot may also be held open
//! after its pause (`Op::Hold`) while the next operations run, so that they change pages the
//! snapshot has not taken yet (copy on write), and is then checked against the state at its pause.

use pagesnap_engine::{EngineError, Space};
use pagesnap_pagetable::VirtAddr;
use pagesnap_store::fault::FaultyStorage;
use pagesnap_store::{Mode, SnapshotId, Store, StoreOptions};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;

const PS: u64 = 512;

fn opts() -> StoreOptions {
    StoreOptions {
        page_size: PS as u32,
        segment_bytes: 32 << 10,
        preallocate: 8 << 10,
        // Tiny, so snapshots also go through intermediate index roots.
        max_pending_changes: 7,
        ..StoreOptions::default()
    }
}

#[derive(Clone, Debug)]
enum Op {
    Map(u64, u64),
    Unmap(u64, u64),
    Write(u64, u64, Vec<u8>),
    Snapshot {
        background: bool,
    },
    /// Pause for a snapshot and hold its persisting until the next snapshot, restore or reopen
    /// (or the end); `eager`: its dirty set is copied in one sweep, else batch by batch.
    Hold {
        eager: bool,
    },
    Restore {
        which: usize,
        lazy: bool,
    },
    Reopen {
        lazy: bool,
    },
}

fn vpn() -> impl Strategy<Value = u64> {
    prop_oneof![
        0..24u64,
        (0..4u64).prop_map(|i| (1 << 40) + i),
        (0..3u64).prop_map(|i| (u64::MAX >> 9) - i)
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (vpn(), 1..3u64).prop_map(|(v, n)| Op::Map(v, n)),
        1 => (vpn(), 1..3u64).prop_map(|(v, n)| Op::Unmap(v, n)),
        6 => (vpn(), 0..PS, proptest::collection::vec(any::<u8>(), 1..700)).prop_map(|(v, o, d)| Op::Write(v, o, d)),
        2 => any::<bool>().prop_map(|background| Op::Snapshot { background }),
        1 => any::<bool>().prop_map(|eager| Op::Hold { eager }),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(which, lazy)| Op::Restore { which, lazy }),
        1 => any::<bool>().prop_map(|lazy| Op::Reopen { lazy }),
    ]
}

struct Model {
    pages: BTreeMap<u64, Vec<u8>>,
}

impl Model {
    fn range(v: u64, n: u64) -> impl Iterator<Item = u64> {
        (0..n).map(move |i| v + i)
    }
    fn mapped_all(&self, addr: u64, len: u64) -> bool {
        let first = addr / PS;
        let last = (addr + len - 1) / PS;
        (first..=last).all(|v| self.pages.contains_key(&v))
    }
}

fn reopen(io: &Arc<FaultyStorage>) -> Store {
    Store::open_with(io.clone(), Mode::Write, opts())
        .expect("reopen store")
        .0
}

fn check(space: &Space, model: &Model) -> Result<(), TestCaseError> {
    for (v, want) in &model.pages {
        let mut got = vec![0u8; PS as usize];
        space
            .read(VirtAddr(v * PS), &mut got)
            .map_err(|e| TestCaseError::fail(format!("read page {v}: {e}")))?;
        prop_assert_eq!(&got, want, "page {}", v);
    }
    for v in [3u64, 17, 1 << 40, (u64::MAX >> 9) - 1] {
        if !model.pages.contains_key(&v) {
            let mut b = [0u8; 1];
            let unmapped = matches!(
                space.read(VirtAddr(v * PS), &mut b),
                Err(EngineError::NotMapped(_))
            );
            prop_assert!(unmapped, "page {} should be unmapped", v);
        }
    }
    Ok(())
}

/// Lets a held snapshot persist and records it with the state at its pause.
fn finish(
    held: &mut Option<(pagesnap_engine::SnapshotHandle, BTreeMap<u64, Vec<u8>>)>,
    snaps: &mut Vec<(SnapshotId, BTreeMap<u64, Vec<u8>>)>,
) -> Result<(), TestCaseError> {
    if let Some((handle, at_pause)) = held.take() {
        let report = handle
            .wait()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        snaps.push((report.id, at_pause));
    }
    Ok(())
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let io = Arc::new(FaultyStorage::new());
    let store =
        Store::init_with(io.clone(), opts()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut space = Some(Space::create(store).map_err(|e| TestCaseError::fail(e.to_string()))?);
    let mut model = Model {
        pages: BTreeMap::new(),
    };
    let mut snaps: Vec<(SnapshotId, BTreeMap<u64, Vec<u8>>)> = Vec::new();
    let mut held = None;
    for op in ops {
        if matches!(
            op,
            Op::Snapshot { .. } | Op::Hold { .. } | Op::Restore { .. } | Op::Reopen { .. }
        ) {
            finish(&mut held, &mut snaps)?;
        }
        let s = space.as_ref().expect("space");
        match op {
            Op::Map(v, n) | Op::Unmap(v, n) if (v * PS).checked_add(n * PS - 1).is_none() => {
                let r = if matches!(op, Op::Map(..)) {
                    s.map(VirtAddr(v * PS), n * PS)
                } else {
                    s.unmap(VirtAddr(v * PS), n * PS)
                };
                prop_assert!(
                    matches!(r, Err(EngineError::Range { .. })),
                    "a range past 2^64 must be refused"
                );
            }
            Op::Map(v, n) => {
                s.map(VirtAddr(v * PS), n * PS)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                for x in Model::range(*v, *n) {
                    model.pages.entry(x).or_insert_with(|| vec![0; PS as usize]);
                }
            }
            Op::Unmap(v, n) => {
                s.unmap(VirtAddr(v * PS), n * PS)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                for x in Model::range(*v, *n) {
                    model.pages.remove(&x);
                }
            }
            Op::Write(v, off, data) => {
                let addr = v * PS + off;
                let len = data.len() as u64;
                if addr.checked_add(len - 1).is_none() {
                    let refused = matches!(
                        s.write(VirtAddr(addr), data),
                        Err(EngineError::Range { .. })
                    );
                    prop_assert!(
                        refused,
                        "a write past the end of the address space must be refused"
                    );
                    continue;
                }
                let result = s.write(VirtAddr(addr), data);
                if model.mapped_all(addr, len) {
                    result.map_err(|e| TestCaseError::fail(e.to_string()))?;
                    for (pos, b) in (addr..).zip(data.iter()) {
                        model.pages.get_mut(&(pos / PS)).expect("mapped")[(pos % PS) as usize] = *b;
                    }
                } else {
                    let refused = matches!(result, Err(EngineError::NotMapped(_)));
                    prop_assert!(refused, "write to an unmapped page succeeded");
                    // All or nothing: the model is unchanged.
                }
            }
            Op::Snapshot { background } => {
                let report = if *background {
                    let h = s
                        .begin_snapshot()
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    h.wait()
                } else {
                    s.snapshot()
                }
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
                snaps.push((report.id, model.pages.clone()));
            }
            Op::Hold { eager } => {
                s.set_eager_copy_limit(if *eager { u64::MAX } else { 0 });
                let handle = s
                    .begin_snapshot_held()
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                held = Some((handle, model.pages.clone()));
            }
            Op::Restore { which, lazy } if !snaps.is_empty() => {
                let (id, pages) = snaps[which % snaps.len()].clone();
                drop(space.take());
                let store = reopen(&io);
                space = Some(
                    if *lazy {
                        Space::restore_lazy_with(store, id, io.clone())
                    } else {
                        Space::restore(store, id)
                    }
                    .map_err(|e| TestCaseError::fail(e.to_string()))?,
                );
                model.pages = pages;
            }
            Op::Reopen { lazy } => {
                drop(space.take());
                let store = reopen(&io);
                let (s, opened) = if *lazy {
                    Space::open_lazy_with(store, io.clone())
                } else {
                    Space::open(store)
                }
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(opened.damaged.is_empty());
                prop_assert_eq!(opened.snapshot, snaps.last().map(|s| s.0));
                model.pages = snaps.last().map(|s| s.1.clone()).unwrap_or_default();
                space = Some(s);
            }
            Op::Restore { .. } => {}
        }
        check(space.as_ref().expect("space"), &model)?;
    }
    finish(&mut held, &mut snaps)?;
    // Every snapshot still restores exactly.
    for (id, pages) in &snaps {
        drop(space.take());
        let restored =
            Space::restore(reopen(&io), *id).map_err(|e| TestCaseError::fail(e.to_string()))?;
        check(
            &restored,
            &Model {
                pages: pages.clone(),
            },
        )?;
        drop(restored);
    }
    drop(space);
    let store = reopen(&io);
    prop_assert!(store
        .verify(&[])
        .map_err(|e| TestCaseError::fail(e.to_string()))?
        .is_clean());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]
    #[test]
    fn space_matches_the_model(ops in proptest::collection::vec(op(), 1..80)) {
        run(&ops)?;
    }
}
