//! Never lose dirty state: when persisting fails (ENOSPC, EIO) the pages stay dirty and the next
//! snapshot writes them; when the machine crashes mid-snapshot, the previous snapshot (or the new
//! one, whole) is what comes back.

use pagesnap_engine::{EngineError, Space};
use pagesnap_pagetable::VirtAddr;
use pagesnap_store::fault::{FaultPlan, FaultyStorage};
use pagesnap_store::{Mode, SnapshotId, Store, StoreOptions};
use std::collections::BTreeMap;
use std::sync::Arc;

const PS: u64 = 512;

fn opts() -> StoreOptions {
    StoreOptions {
        page_size: PS as u32,
        segment_bytes: 16 << 10,
        preallocate: 4 << 10,
        // Plain pages: the tests damage one page and read its neighbour (pages compressed in
        // one frame share damage; the store's corruption campaign covers frames).
        compression: pagesnap_store::Compression::None,
        ..StoreOptions::default()
    }
}

/// A space with one committed snapshot and 16 pages (plus a new mapping) dirty since.
/// (backend, space, first snapshot, its pages, the pages now)
type Setup = (
    Arc<FaultyStorage>,
    Space,
    SnapshotId,
    BTreeMap<u64, u8>,
    BTreeMap<u64, u8>,
);

fn setup() -> Setup {
    let io = Arc::new(FaultyStorage::new());
    let space = Space::create(Store::init_with(io.clone(), opts()).expect("store")).expect("space");
    space.map(VirtAddr(0), 32 * PS).expect("map");
    let mut first = BTreeMap::new();
    for v in 0..32u64 {
        space
            .write(VirtAddr(v * PS), &[v as u8 + 1; PS as usize])
            .expect("write");
        first.insert(v, v as u8 + 1);
    }
    let s1 = space.snapshot().expect("first snapshot").id;
    let mut now = first.clone();
    for v in 0..16u64 {
        space
            .write(VirtAddr(v * PS), &[v as u8 + 100; PS as usize])
            .expect("write");
        now.insert(v, v as u8 + 100);
    }
    space.map(VirtAddr(40 * PS), PS).expect("map");
    space
        .write(VirtAddr(40 * PS), &[7; PS as usize])
        .expect("write");
    now.insert(40, 7);
    (io, space, s1, first, now)
}

fn matches(space: &Space, want: &BTreeMap<u64, u8>) -> Result<(), String> {
    for v in 0..48u64 {
        let mut b = vec![0u8; PS as usize];
        match (space.read(VirtAddr(v * PS), &mut b), want.get(&v)) {
            (Ok(()), Some(x)) if b.iter().all(|c| c == x) => {}
            (Err(EngineError::NotMapped(_)), None) => {}
            (got, w) => {
                return Err(format!(
                    "page {v}: read {:?} first byte {}, want {w:?}",
                    got.is_ok(),
                    b[0]
                ))
            }
        }
    }
    Ok(())
}

#[test]
fn a_failed_snapshot_leaves_its_pages_dirty_for_the_next() {
    let (mut checked, mut failed, mut k) = (0u64, Vec::new(), 0u64);
    loop {
        let (io, space, _, _, now) = setup();
        let errno = if k % 2 == 0 { 28 } else { 5 };
        io.set_plan(FaultPlan {
            fail_at: Some((k, errno)),
            ..FaultPlan::default()
        });
        let first_try = space.snapshot();
        io.set_plan(FaultPlan::default());
        let Err(e) = first_try else {
            // k is past the last operation of a snapshot: every index was tried.
            break;
        };
        checked += 1;
        let text = e.to_string();
        if !(text.contains("disk is full") || text.contains("I/O error")) {
            failed.push(format!("op {k}: unclear error: {text}"));
        }
        match space.snapshot() {
            Ok(r) => {
                drop(space);
                let store = Store::open_with(io, Mode::Write, opts()).expect("reopen").0;
                let restored = Space::restore(store, r.id).expect("restore");
                if let Err(m) = matches(&restored, &now) {
                    failed.push(format!("op {k}: the retry lost dirty state: {m}"));
                }
            }
            Err(e) => failed.push(format!("op {k}: retry failed: {e}")),
        }
        k += 1;
    }
    println!("{checked} I/O errors checked, {} failed", failed.len());
    // Format 3: a snapshot is a few writes and one sync (and a superblock hint when the
    // writer opens, or every so many commits).
    assert!(
        checked >= 3,
        "a snapshot does at least 3 storage operations"
    );
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn a_crash_during_a_snapshot_brings_back_a_whole_snapshot() {
    let (mut checked, mut failed, mut k) = (0u64, Vec::new(), 0u64);
    loop {
        let (io, space, s1, first, now) = setup();
        io.set_plan(FaultPlan {
            crash_at: Some(k),
            ..FaultPlan::default()
        });
        let result = space.snapshot();
        drop(space);
        if result.is_ok() && !io.has_crashed() {
            break;
        }
        for fate in 0..3 {
            checked += 1;
            let store =
                match Store::open_with(Arc::new(io.crash_image(k * 3 + fate)), Mode::Write, opts())
                {
                    Ok((s, _)) => s,
                    Err(e) => {
                        failed.push(format!("crash at {k}: reopen: {e}"));
                        continue;
                    }
                };
            let (space, opened) = Space::open(store).expect("open");
            let want = match opened.snapshot {
                Some(id) if id == s1 => &first,
                Some(_) if result.is_ok() => &now,
                Some(_) => &now, // the commit reached the disk just before the crash: whole
                None => {
                    failed.push(format!("crash at {k}: no snapshot at all"));
                    continue;
                }
            };
            if let Err(m) = matches(&space, want) {
                failed.push(format!("crash at {k}, fate {fate}: {m}"));
            }
        }
        k += 1;
    }
    println!("{checked} crash states checked, {} failed", failed.len());
    assert!(checked >= 9, "{checked}");
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn open_passes_over_a_damaged_newest_snapshot_and_lazy_reads_refuse_damaged_pages() {
    let (io, space, s1, first, _) = setup();
    let s2 = space.snapshot().expect("second snapshot").id;
    drop(space);
    // Damage the content of a page only snapshot 2 has (page 3 was rewritten after snapshot 1).
    let store = Store::open_with(io.clone(), Mode::Read, opts())
        .expect("open")
        .0;
    let mut target = None;
    store
        .for_each_page(s2, |v, r| {
            if v.0 == 3 {
                target = Some(*r);
            }
            Ok(())
        })
        .expect("walk");
    drop(store);
    let target = target.expect("page 3 in snapshot 2");
    io.flip_bit(
        &format!("seg-{:08}.pss", target.loc.segment),
        target.loc.offset + 200,
        1,
    )
    .expect("flip");

    let store = Store::open_with(io.clone(), Mode::Write, opts())
        .expect("open")
        .0;
    let (space, opened) = Space::open(store).expect("open the space");
    assert_eq!(opened.snapshot, Some(s1), "fell back to the older snapshot");
    assert_eq!(
        opened.damaged.iter().map(|d| d.0).collect::<Vec<_>>(),
        vec![s2]
    );
    assert!(
        opened.damaged[0].1.contains("verify"),
        "{:?}",
        opened.damaged
    );
    matches(&space, &first).expect("snapshot 1 restored exactly");
    drop(space);

    // Lazily, the damage is met on first touch of that page: an error, never wrong bytes.
    let store = Store::open_with(io.clone(), Mode::Write, opts())
        .expect("open")
        .0;
    let (space, opened) = Space::open_lazy_with(store, io).expect("open lazily");
    assert_eq!(opened.snapshot, Some(s2));
    let mut b = vec![0u8; PS as usize];
    let err = space
        .read(VirtAddr(3 * PS), &mut b)
        .expect_err("damaged page");
    assert!(
        matches!(err, EngineError::Store(ref e) if e.is_corruption()),
        "{err}"
    );
    space
        .read(VirtAddr(4 * PS), &mut b)
        .expect("undamaged page");
    assert!(b.iter().all(|x| *x == 104));
}
