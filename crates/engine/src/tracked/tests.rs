use super::*;
use crate::image::{restore_image, snapshot_image};
use pagesnap_store::{Mode, StoreOptions};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::os::unix::fs::MetadataExt;

const PAGES: u64 = 256; // 1 MiB

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    /// An image of random pages (every fourth zero) and an empty store.
    fn new() -> Setup {
        Setup::sized(PAGES)
    }
    /// [`Setup::new`] with an image of `pages` pages.
    fn sized(pages: u64) -> Setup {
        let dir = tempfile::tempdir().expect("tmp");
        let mut data = vec![0u8; (pages * 4096) as usize];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for (p, page) in data.chunks_mut(4096).enumerate() {
            if p % 4 == 0 {
                continue;
            }
            for c in page.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
        }
        std::fs::write(dir.path().join("disk.img"), &data).expect("image");
        Store::init(dir.path().join("store"), StoreOptions::default()).expect("store");
        Setup { dir }
    }
    fn image(&self) -> PathBuf {
        self.dir.path().join("disk.img")
    }
    fn state(&self) -> PathBuf {
        self.dir.path().join("store/served/disk.state")
    }
    fn store(&self, mode: Mode) -> Store {
        Store::open(self.dir.path().join("store"), mode)
            .expect("open store")
            .0
    }
    fn open(&self) -> TrackedImage {
        TrackedImage::open(&self.image(), &self.state(), &self.store(Mode::Read)).expect("open")
    }
    fn snapshot(&self, img: &TrackedImage) -> TrackedSnapshot {
        img.snapshot(&mut self.store(Mode::Write), None, false, &|_| {})
            .expect("snapshot")
    }
    /// Snapshot `id` restored, as bytes.
    fn restored(&self, id: SnapshotId) -> Vec<u8> {
        let out = self.dir.path().join(format!("restored-{id}.img"));
        restore_image(&self.store(Mode::Read), id, &out, &|_| {}).expect("restore");
        std::fs::read(out).expect("read")
    }
    fn bytes(&self) -> Vec<u8> {
        std::fs::read(self.image()).expect("read image")
    }
}

#[test]
fn a_snapshot_reads_only_the_tracked_pages_and_restores_the_image() {
    let s = Setup::new();
    let first = snapshot_image(&mut s.store(Mode::Write), &s.image(), None, &|_| {})
        .expect("first snapshot");
    let img = s.open();
    // The newest snapshot is of this image as it is: tracking starts there, empty.
    assert_eq!(
        img.tracking(),
        Tracking {
            base: Some(first.id),
            pages: 0,
            full_read: None
        }
    );
    img.write(4096 * 10 + 4000, &[0xAB; 200], false)
        .expect("write"); // pages 10 and 11
    img.write_zeroes(4096 * 20, 4096, true, false)
        .expect("zero"); // page 20
    img.write_zeroes(4096 * 21 + 7, 10, false, true)
        .expect("zero in place"); // page 21
    img.trim(4096 * 30, 8192, false).expect("trim"); // pages 30, 31
    img.flush().expect("flush");
    assert_eq!(img.tracking().pages, 6);
    let snap = s.snapshot(&img);
    assert_eq!((snap.pages_tracked, snap.full_read.clone()), (6, None));
    assert!(snap.snapshot.pages_read <= 6, "{snap:?}");
    assert!(
        snap.snapshot.pages_read >= 3,
        "pages 10, 11 and 21 hold data"
    );
    assert_eq!(s.restored(snap.snapshot.id), s.bytes());
    assert_eq!(
        s.bytes()[4096 * 30..4096 * 32],
        [0u8; 8192],
        "trimmed pages read as zeros"
    );
    // Nothing written since: the next snapshot reads nothing.
    let again = s.snapshot(&img);
    assert_eq!((again.pages_tracked, again.snapshot.pages_read), (0, 0));
    assert_eq!(s.restored(again.snapshot.id), s.bytes());
}

#[test]
fn the_snapshot_is_the_image_at_the_freeze_and_later_writes_are_tracked_for_the_next() {
    let s = Setup::new();
    let img = s.open();
    img.write(4096 * 5, &[0xA1; 4096], false).expect("write A");
    let at_freeze = s.bytes();
    let mut store = s.store(Mode::Write);
    // Tracking is unknown (no state, no snapshot): a full read, while writes go on.
    let snap = img
        .snapshot_with(&mut store, None, false, &|_| {}, &|| {
            img.write(4096 * 5, &[0xB2; 4096], false).expect("write B");
            img.write(4096 * 6 + 1, &[0xC3; 10], false)
                .expect("write C");
            img.trim(4096 * 200, 4096, false).expect("trim");
        })
        .expect("snapshot");
    drop(store);
    assert!(snap.full_read.is_some());
    assert_eq!(snap.pages_tracked, PAGES);
    assert_eq!(
        s.restored(snap.snapshot.id),
        at_freeze,
        "the image as of the freeze"
    );
    assert_eq!(
        img.tracking().pages,
        3,
        "pages 5, 6 and 200 changed after the freeze"
    );
    let next = s.snapshot(&img);
    assert_eq!((next.pages_tracked, next.full_read.clone()), (3, None));
    assert_eq!(s.restored(next.snapshot.id), s.bytes());
}

#[test]
fn a_failed_snapshot_tracks_its_pages_again() {
    let s = Setup::new();
    let img = s.open();
    img.write(0, b"x", false).expect("write");
    let mut reader = s.store(Mode::Read);
    assert!(img.snapshot(&mut reader, None, false, &|_| {}).is_err());
    assert_eq!(img.tracking().pages, 1);
    assert!(img.tracking().full_read.is_some(), "still a full read next");
    let snap = s.snapshot(&img);
    assert_eq!(s.restored(snap.snapshot.id), s.bytes());
    img.write(4096 * 3, b"y", false).expect("write");
    let mut reader = s.store(Mode::Read);
    assert!(img.snapshot(&mut reader, None, false, &|_| {}).is_err());
    assert_eq!(img.tracking().pages, 1, "page 3 is tracked again");
    let snap = s.snapshot(&img);
    assert_eq!(snap.pages_tracked, 1);
    assert_eq!(s.restored(snap.snapshot.id), s.bytes());
}

#[test]
fn a_clean_close_keeps_tracking_and_an_unclean_end_means_one_full_read() {
    let s = Setup::new();
    let img = s.open();
    let base = s.snapshot(&img).snapshot.id;
    img.write(4096 * 7, &[1; 5000], false).expect("write"); // pages 7 and 8
    let closed = img.close().expect("close");
    assert_eq!((closed.base, closed.pages), (Some(base), 2));
    let img = s.open();
    assert_eq!(img.tracking(), closed, "tracking survives a clean close");
    let snap = s.snapshot(&img);
    assert_eq!((snap.pages_tracked, snap.full_read.clone()), (2, None));
    assert_eq!(s.restored(snap.snapshot.id), s.bytes());
    // An end without close (the process killed): the marker says unclean.
    img.write(4096 * 9, b"z", false).expect("write");
    drop(img);
    let img = s.open();
    let why = img.tracking().full_read.expect("full read");
    assert!(why.contains("did not stop cleanly"), "{why}");
    let snap = s.snapshot(&img);
    assert_eq!(snap.pages_tracked, PAGES);
    assert_eq!(s.restored(snap.snapshot.id), s.bytes());
    // After that snapshot, tracking is exact again, and survives the next clean close.
    img.write(4096 * 100, b"w", false).expect("write");
    img.close().expect("close");
    let img = s.open();
    assert_eq!(img.tracking().pages, 1);
    assert_eq!(img.tracking().full_read, None);
}

#[test]
fn an_image_changed_while_no_server_ran_is_read_whole() {
    let s = Setup::new();
    let img = s.open();
    s.snapshot(&img);
    img.close().expect("close");
    let f = OpenOptions::new()
        .write(true)
        .open(s.image())
        .expect("open");
    f.write_all_at(b"offline", 4096 * 50).expect("write");
    drop(f);
    let img = s.open();
    let why = img.tracking().full_read.expect("full read");
    assert!(why.contains("changed"), "{why}");
    let snap = s.snapshot(&img);
    assert_eq!(s.restored(snap.snapshot.id), s.bytes());
}

#[test]
fn a_deleted_base_means_a_full_read() {
    let s = Setup::new();
    let img = s.open();
    let base = s.snapshot(&img).snapshot.id;
    img.write(0, b"a", false).expect("write");
    s.store(Mode::Write).delete(&[base]).expect("delete");
    let snap = s.snapshot(&img);
    assert!(snap.full_read.is_some_and(|w| w.contains("no longer")));
    assert_eq!(s.restored(snap.snapshot.id), s.bytes());
}

#[test]
fn a_second_open_is_refused_while_the_first_holds_the_lock() {
    let s = Setup::new();
    let img = s.open();
    let again = TrackedImage::open(&s.image(), &s.state(), &s.store(Mode::Read));
    assert!(matches!(again, Err(ImageError::Busy(_))), "{again:?}");
    drop(img);
    s.open();
}

#[test]
fn extents_report_data_and_holes() {
    let s = Setup::new();
    let path = s.dir.path().join("sparse.img");
    let f = File::create(&path).expect("create");
    f.set_len(1 << 20).expect("size");
    f.write_all_at(&[7u8; 4096], 65536).expect("write");
    drop(f);
    let img = TrackedImage::open(&path, &s.state(), &s.store(Mode::Read)).expect("open");
    let mut out = Vec::new();
    img.extents(0, 1 << 20, &mut out).expect("extents");
    assert_eq!(out.iter().map(|e| e.0).sum::<u64>(), 1 << 20);
    assert_eq!(out[0], (65536, true));
    assert!(!out[1].1, "data at 64 KiB");
    assert!(out.last().is_some_and(|e| e.1), "a hole at the end");
}

#[test]
fn bits_runs_and_the_state_round_trip() {
    let mut b = Bits::new(200);
    for i in [0, 1, 2, 63, 64, 65, 127, 128, 199] {
        b.set(i);
    }
    assert_eq!(b.runs(), vec![0..3, 63..66, 127..129, 199..200]);
    assert_eq!(Bits::full(130).runs(), vec![0..130]);
    assert_eq!(Bits::full(130).count(), 130);
    b.clear(64);
    assert!(!b.get(64) && b.get(65) && !b.get(500));
    let st = State {
        clean: true,
        page_size: 4096,
        image_size: 1 << 30,
        base: 7,
        full: Some("why".into()),
        stamp: Stamp {
            dev: 1,
            ino: 2,
            size: 3,
            mtime: (4, 5),
            ctime: (-6, 7),
        },
        settled: true,
        path: "/a b/c".into(),
        ranges: vec![1..5, 9..10],
    };
    let bytes = st.encode();
    assert_eq!(State::decode(&bytes), Some(st));
    for cut in 0..bytes.len() {
        assert_eq!(State::decode(&bytes[..cut]), None, "cut at {cut}");
    }
    let mut flipped = bytes.clone();
    flipped[40] ^= 1;
    assert_eq!(State::decode(&flipped), None);
}

#[test]
fn review_an_unclean_marker_is_not_overridden_by_the_latest_snapshot_identity() {
    let s = Setup::new();
    let img = s.open();
    img.write(4096 * 3, b"before", false).expect("write"); // unclean marker durable
                                                           // Sets up the scenario, not a wait to pass: the snapshot's recorded identity is trusted
                                                           // only if the image's ctime was SETTLE old at the freeze. `settled_stamp` waits for exactly
                                                           // that condition (bounded by SETTLE_LIMIT).
    let (_, settled) = settled_stamp(&img.file, &s.image()).expect("settle");
    assert!(settled, "the image settled");
    let s1 = s.snapshot(&img);
    assert!(
        s.store(Mode::Read)
            .snapshots()
            .expect("list")
            .last()
            .and_then(|m| m.origin.clone())
            .is_some_and(|o| o.contains("settled=1")),
        "the snapshot's identity is one the shortcut would trust"
    );
    drop(img); // killed: no close
    let img = s.open();
    let t = img.tracking();
    assert!(
        t.full_read.is_some(),
        "unclean end, yet tracking resumes from snapshot {:?} (taken: {}) with {} page(s) tracked and no full read",
        t.base,
        s1.snapshot.id,
        t.pages
    );
    assert!(
        t.full_read
            .as_deref()
            .is_some_and(|w| w.contains("did not stop cleanly")),
        "{t:?}"
    );
}

#[test]
fn unclean_end_reads_the_state_file() {
    let s = Setup::new();
    assert_eq!(unclean_end(&s.state()), None, "no state yet");
    let img = s.open();
    img.write(0, b"a", false).expect("write");
    let why = unclean_end(&s.state()).expect("the unclean marker");
    assert!(why.contains("did not stop cleanly"), "{why}");
    img.close().expect("close");
    assert_eq!(unclean_end(&s.state()), None, "a clean close");
    std::fs::write(s.state(), b"PSNTRAK1 garbage").expect("damage");
    assert!(unclean_end(&s.state()).is_some_and(|w| w.contains("damaged")));
}

/// Counts the bytes each thread has allocated, to measure what one call takes.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn allocated(delta: isize) {
    let _ = LIVE.try_with(|l| {
        let now = l.get() + delta;
        l.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

// SAFETY: every call goes to `System` unchanged (so its guarantees hold); the counting only
// touches thread-local cells, which neither allocate nor lock.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller keeps `alloc`'s contract (a non-zero size), passed on as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            allocated(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            allocated(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller passes a block this allocator (that is, `System`) gave out, with
        // its layout.
        unsafe { System.dealloc(ptr, layout) };
        allocated(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`, and `new_size` is the caller's valid new size.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            allocated(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// The most bytes the calling thread held allocated at once during `f`, beyond what it held
/// before.
fn peak_during(f: impl FnOnce()) -> usize {
    let before = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(before));
    f();
    (PEAK.with(Cell::get) - before).max(0) as usize
}

#[test]
fn the_allocation_counter_sees_a_big_buffer() {
    let peak = peak_during(|| drop(std::hint::black_box(vec![1u8; 1 << 20])));
    assert!((1 << 20..2 << 20).contains(&peak), "{peak}");
}

/// Punches a hole over pages `pages` of the file at `path`.
fn punch(path: &Path, pages: Range<u64>) {
    let f = OpenOptions::new().write(true).open(path).expect("open");
    fallocate(
        &f,
        FALLOC_PUNCH,
        pages.start * 4096,
        (pages.end - pages.start) * 4096,
    )
    .expect("punch a hole");
}

#[test]
fn review_a_discard_during_a_snapshot_copies_the_whole_range_into_memory() {
    let s = Setup::new();
    let img = s.open();
    let mut store = s.store(Mode::Write);
    let at_freeze = s.bytes();
    let copied = Cell::new(0usize);
    // Adapted: the copies no longer live in the `Cow`; what one trim holds in memory at once
    // is measured with the allocation counter (one page copied to memory = 4096 bytes).
    let snap = img
        .snapshot_with(&mut store, None, false, &|_| {}, &|| {
            let peak = peak_during(|| img.trim(0, PAGES * 4096, false).expect("trim"));
            copied.set(peak / 4096);
        })
        .expect("snapshot");
    assert!(
        copied.get() < (PAGES / 4) as usize,
        "{} of {PAGES} pages copied to memory by one trim",
        copied.get()
    );
    drop(store);
    assert_eq!(
        s.restored(snap.snapshot.id),
        at_freeze,
        "the image at the freeze"
    );
}

#[test]
fn pages_in_holes_at_the_freeze_are_recorded_as_zero_not_copied() {
    let s = Setup::new();
    for p in (0..PAGES).step_by(4) {
        punch(&s.image(), p..p + 1);
    }
    let img = s.open();
    let mut store = s.store(Mode::Write);
    let at_freeze = s.bytes();
    let kept = Cell::new((0, 0, 0));
    let snap = img
        .snapshot_with(&mut store, None, false, &|_| {}, &|| {
            img.write(0, &vec![0xEE; (PAGES * 4096) as usize], false)
                .expect("write over everything");
            let g = img.inner.lock();
            let c = g.cow.as_ref().expect("a snapshot runs");
            let spilled = c.spill.metadata().expect("stat").blocks() * 512;
            kept.set((c.saved.count(), c.zero.count(), spilled));
        })
        .expect("snapshot");
    let (saved, zero, spilled) = kept.get();
    assert_eq!(
        (saved, zero),
        (PAGES - PAGES / 4, PAGES / 4),
        "holes are recorded as zero pages, data pages copied"
    );
    assert!(
        (saved * 4096..(saved + 64) * 4096).contains(&spilled),
        "the copies are in the spill file: {spilled} bytes for {saved} pages"
    );
    drop(store);
    assert_eq!(
        s.restored(snap.snapshot.id),
        at_freeze,
        "the image at the freeze"
    );
    assert!(s.bytes().iter().all(|&b| b == 0xEE));
}

#[test]
fn a_large_discard_of_data_during_a_snapshot_keeps_memory_bounded() {
    const BIG: u64 = 8192; // 32 MiB, none of it a hole
    let s = Setup::sized(BIG);
    let img = s.open();
    let mut store = s.store(Mode::Write);
    let at_freeze = s.bytes();
    let measured = Cell::new((0, 0, 0));
    let snap = img
        .snapshot_with(&mut store, None, false, &|_| {}, &|| {
            let peak = peak_during(|| {
                img.trim(0, BIG * 4096, false).expect("trim");
                img.write_zeroes(0, BIG * 4096, false, false).expect("zero");
            });
            let g = img.inner.lock();
            let c = g.cow.as_ref().expect("a snapshot runs");
            let spilled = c.spill.metadata().expect("stat").blocks() * 512;
            measured.set((peak, c.saved.count(), spilled));
        })
        .expect("snapshot");
    let (peak, saved, spilled) = measured.get();
    assert_eq!(saved, BIG, "every page was copied aside");
    assert!(spilled >= BIG * 4096, "to the spill file: {spilled} bytes");
    assert!(
        peak <= 2 * (COPY_CHUNK * 4096) as usize,
        "{peak} bytes of memory to keep {BIG} pages of a running snapshot"
    );
    drop(store);
    assert_eq!(
        s.restored(snap.snapshot.id),
        at_freeze,
        "the image at the freeze"
    );
    assert!(s.bytes().iter().all(|&b| b == 0));
}

#[test]
fn a_failed_copy_abandons_the_snapshot_not_the_write() {
    let s = Setup::new();
    let img = s.open();
    let mut store = s.store(Mode::Write);
    let r = img.snapshot_with(&mut store, None, false, &|_| {}, &|| {
        // A spill file that cannot be written: read-only.
        {
            let mut g = img.inner.lock();
            let c = g.cow.as_mut().expect("a snapshot runs");
            c.spill = File::open(s.image()).expect("open read-only");
        }
        img.write(4096 * 9, b"goes on", false)
            .expect("the write goes on");
    });
    let e = r.expect_err("the snapshot is abandoned").to_string();
    assert!(e.contains("abandoned"), "{e}");
    drop(store);
    assert_eq!(&s.bytes()[4096 * 9..4096 * 9 + 7], b"goes on");
    let t = img.tracking();
    assert!(t.full_read.is_some(), "still a full read next: {t:?}");
    let snap = s.snapshot(&img);
    assert_eq!(s.restored(snap.snapshot.id), s.bytes());
}
