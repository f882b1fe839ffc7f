//! Media corruption: flip random bits and bytes in committed store files — page records, index
//! nodes, manifests, catalog and dedup nodes, either superblock slot — of stores with and without
//! a gc behind them, then open them as a reader or as the writer. Every flip in bytes the
//! committed state uses must be detected (by verify, or by open); no read may return wrong bytes;
//! snapshots verify says are clean must restore exactly; a flip in the superblock must hide or
//! lose no snapshot at all; and a writer's open must never remove a file.

use pagesnap_store::fault::{FaultyStorage, SplitMix64};
use pagesnap_store::{Epoch, Mode, SnapshotId, SnapshotMeta, Storage, Store, StoreOptions, Vpn};
use std::collections::BTreeMap;
use std::sync::Arc;

mod campaign;
use campaign::{init_store, open_store, ENCRYPTED};

const PS: usize = 512;

fn opts() -> StoreOptions {
    StoreOptions {
        page_size: PS as u32,
        segment_bytes: 24 << 10,
        preallocate: 4 << 10,
        ..StoreOptions::default()
    }
}

fn page(seed: u64) -> Vec<u8> {
    let mut p = vec![0u8; PS];
    for (i, c) in p.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ i as u64).to_le_bytes());
    }
    p
}

type Model = BTreeMap<SnapshotId, BTreeMap<u64, u64>>;

/// A store with a few snapshots (one deleted, so there is garbage too; collected by gc for odd
/// seeds, so the older superblock state named segments that are gone).
fn build(seed: u64) -> (Arc<FaultyStorage>, Model) {
    let io = Arc::new(FaultyStorage::new());
    let mut store = init_store(io.clone(), opts()).expect("init");
    let mut r = SplitMix64(seed);
    let mut model = Model::new();
    let mut pages: BTreeMap<u64, u64> = BTreeMap::new();
    let mut parent = None;
    for e in 1..=4u64 {
        store.begin(parent).expect("begin");
        for _ in 0..(4 + r.next_u64() % 12) {
            let (v, s) = (r.next_u64() % 48, 1 + r.next_u64() % 40);
            store.put(Vpn(v), &page(s)).expect("put");
            pages.insert(v, s);
        }
        let id = store
            .commit(SnapshotMeta {
                epoch: Epoch(e),
                ..SnapshotMeta::default()
            })
            .expect("commit")
            .id;
        model.insert(id, pages.clone());
        parent = Some(id);
    }
    store.delete(&[SnapshotId(2)]).expect("delete");
    model.remove(&SnapshotId(2));
    if seed % 2 == 1 {
        store.gc().expect("gc");
    }
    (io, model)
}

fn read_all(store: &Store, id: SnapshotId) -> Result<BTreeMap<u64, Vec<u8>>, String> {
    let mut out = BTreeMap::new();
    store
        .for_each_page(id, |v, r| {
            out.insert(v.0, store.read_ref(r)?);
            Ok(())
        })
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// `redundant`: the flip is in the superblock or in one copy of the snapshot catalog (its nodes
/// and manifests), which must hide and lose nothing.
fn check(
    io: Arc<FaultyStorage>,
    model: &Model,
    mode: Mode,
    redundant: bool,
    in_superblock: bool,
) -> Result<(), String> {
    let files_before = io.list().map_err(|e| e.to_string())?;
    let opened = open_store(io.clone(), mode, opts());
    let files_after = io.list().map_err(|e| e.to_string())?;
    if files_after != files_before {
        return Err(format!(
            "open changed the directory: {files_before:?} -> {files_after:?}"
        ));
    }
    let (store, report) = match opened {
        Ok(s) => s,
        Err(_) if redundant => return Err("one flip in redundant metadata failed the open".into()),
        Err(e) if e.is_corruption() => return Ok(()), // detected at open, with a clear error
        Err(e) => return Err(format!("open failed without naming damage: {e}")),
    };
    let verify = store
        .verify(&[])
        .map_err(|e| format!("verify could not run: {e}"))?;
    if redundant {
        // Redundant: every snapshot lists and restores, and the damage is reported (a superblock
        // slot until a writer's open has rewritten it, after which the store is clean).
        for (id, want) in model {
            let want: BTreeMap<u64, Vec<u8>> = want.iter().map(|(v, s)| (*v, page(*s))).collect();
            if read_all(&store, *id).as_ref() != Ok(&want) {
                return Err(format!(
                    "snapshot {id} lost after a flip in redundant metadata"
                ));
            }
        }
        if store.snapshot_ids().map_err(|e| e.to_string())?.len() != model.len() {
            return Err("a snapshot appeared or vanished".into());
        }
        if !in_superblock {
            // Format 3: a writer's open rewrites a damaged copy of a commit record from the
            // other, and says so.
            return if verify.is_clean() && report.repaired_records == 0 {
                Err("a flip in a catalog copy went unreported".into())
            } else {
                Ok(())
            };
        }
        let reported = !verify.is_clean() && report.damaged_slot;
        if mode == Mode::Read && !reported {
            return Err("the superblock flip went unreported".into());
        }
        if mode == Mode::Write && !(report.repaired_slot && verify.is_clean()) {
            return Err(format!("the writer did not repair the slot: {verify:?}"));
        }
        return Ok(());
    }
    if verify.is_clean() && !report.damaged_slot && report.catalog_damage.is_none() {
        return Err("the flip went unnoticed".into());
    }
    let store_level =
        verify.damage.iter().any(|d| d.snapshot.is_none()) && report.catalog_damage.is_some();
    let ids = store.snapshot_ids().unwrap_or_default();
    for id in ids {
        let clean = !verify.damage.iter().any(|d| d.snapshot == Some(id)) && !store_level;
        match read_all(&store, id) {
            Ok(got) => {
                // Whatever reads back must be exactly what was written (for the state open chose).
                if let Some(want) = model.get(&id) {
                    let want: BTreeMap<u64, Vec<u8>> =
                        want.iter().map(|(v, s)| (*v, page(*s))).collect();
                    if got != want {
                        return Err(format!("snapshot {id} returned wrong bytes"));
                    }
                }
            }
            Err(e) if clean => {
                return Err(format!(
                    "snapshot {id} verified clean but does not restore: {e}"
                ))
            }
            Err(_) => {}
        }
    }
    Ok(())
}

#[test]
fn every_flip_in_committed_bytes_is_detected_and_never_returned_as_data() {
    let trials: u64 = std::env::var("PAGESNAP_CORRUPTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    campaign(trials, 1500);
}

/// The same campaign on an encrypted store (sealed frames, chunks and commit records; keyed
/// page ids): a third of the trials.
#[test]
fn every_flip_in_an_encrypted_store_is_detected_and_never_returned_as_data() {
    ENCRYPTED.with(|e| e.set(true));
    let trials: u64 = std::env::var("PAGESNAP_CORRUPTIONS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(500, |t| t.div_ceil(3));
    campaign(trials, 500);
}

/// `trials` corruptions; with at least `full` of them, a tenth must hit compressed frames.
fn campaign(trials: u64, full: u64) {
    let (mut checked, mut failed, mut redundant_trials) = (0u64, Vec::new(), 0u64);
    // Trials that flip bits inside a compressed page frame (record kind 8).
    let mut frame_trials = 0u64;
    for t in 0..trials {
        let (io, model) = build(t / 50);
        let (live, catalog) = {
            let (store, _) = open_store(io.clone(), Mode::Read, opts()).expect("open");
            (
                store.live_records().expect("live records"),
                store.catalog_records().expect("catalog records"),
            )
        };
        let mut r = SplitMix64(t);
        let damaged = Arc::new(io.crash_image(0));
        // The same image undamaged: what a trial's flips are compared with (the crash image may
        // differ from the live files in length: a writer's trim at close is not synced).
        let pristine = io.crash_image(0);
        // Mostly records; sometimes either superblock slot (the one bit-pair stays in one slot).
        let (file, offset) = if r.next_u64().is_multiple_of(5) {
            let slot = r.next_u64() % 2;
            ("superblock".to_string(), slot * 4096 + r.next_u64() % 4095)
        } else {
            // Some trials aim at the catalog's records (a small share of the live ones).
            let locs: Vec<_> = if r.next_u64().is_multiple_of(4) {
                catalog.iter().collect()
            } else {
                live.keys().collect()
            };
            let loc = locs[(r.next_u64() % locs.len() as u64) as usize];
            (
                format!("seg-{:08}.pss", loc.segment),
                // Both bytes a trial may flip (offset and offset + 1) inside the record.
                loc.offset + r.next_u64() % (u64::from(loc.len) - 1),
            )
        };
        let bits = 1 + r.next_u64() % 3;
        for _ in 0..bits {
            damaged
                .flip_bit(&file, offset + r.next_u64() % 2, (r.next_u64() % 8) as u8)
                .expect("flip");
        }
        // Flipping the same bit twice restores it; such a trial changes nothing, skip it.
        if damaged.contents(&file) == pristine.contents(&file) {
            continue;
        }
        checked += 1;
        frame_trials += u64::from(live.keys().any(|l| {
            format!("seg-{:08}.pss", l.segment) == file
                && (l.offset..l.offset + u64::from(l.len) - 1).contains(&offset)
                && io
                    .contents(&file)
                    .is_some_and(|c| c.get(l.offset as usize + 4) == Some(&8))
        }));
        let mode = if r.next_u64().is_multiple_of(2) {
            Mode::Read
        } else {
            Mode::Write
        };
        let in_superblock = file == "superblock";
        let in_catalog = catalog.iter().any(|l| {
            format!("seg-{:08}.pss", l.segment) == file
                // Both bytes the trial may flip are inside the record.
                && (l.offset..l.offset + u64::from(l.len) - 1).contains(&offset)
        });
        redundant_trials += u64::from(in_superblock || in_catalog);
        if let Err(e) = check(
            damaged,
            &model,
            mode,
            in_superblock || in_catalog,
            in_superblock,
        ) {
            failed.push(format!("trial {t} ({file} @ {offset}, {mode:?}): {e}"));
        }
    }
    println!(
        "{checked} corruptions checked ({redundant_trials} in the superblock or a catalog copy, \
         which must hide nothing; {frame_trials} in a compressed page frame), {} failed",
        failed.len()
    );
    assert!(
        trials < full || frame_trials >= checked / 10,
        "compressed frames are part of the campaign: {frame_trials} of {checked}"
    );
    assert!(checked > trials / 2);
    assert!(
        failed.is_empty(),
        "{}",
        failed
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
