//! Raw images as address spaces: what a snapshot writes, and what it refuses.

use pagesnap_engine::image::{
    for_each_page_batch, restore_image, snapshot_image, snapshot_image_with, ImageError,
    SnapshotOptions,
};
use pagesnap_store::{Mode, Store, StoreOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;

/// Every fourth page zero, the others unique.
fn image(pages: usize, seed: u8) -> Vec<u8> {
    let mut data = vec![0u8; pages * 4096];
    for (p, page) in data.chunks_mut(4096).enumerate() {
        if p % 4 != 0 {
            let mut x = (p as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(seed);
            for c in page.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
        }
    }
    data
}

/// The image unchanged since the last snapshot is read anyway: the tests below change it during
/// the read.
const REREAD: SnapshotOptions = SnapshotOptions {
    reread: true,
    name: None,
};

#[test]
fn an_image_that_changes_while_it_is_read_is_refused_and_nothing_is_committed() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("live.img");
    std::fs::write(&path, image(3000, 3)).expect("write");
    let mut store = Store::init(dir.path().join("store"), StoreOptions::default()).expect("store");
    let first = snapshot_image(&mut store, &path, None, &|_| {}).expect("first snapshot");
    // Something writes to the image while the second snapshot reads it.
    let grow = |done: u64| {
        if done > 0 && done < 3000 * 4096 {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .expect("open");
            f.write_all(&[1u8; 10]).expect("append");
        }
    };
    // Read although unchanged so far (`reread`): the change comes during the read.
    let err =
        snapshot_image_with(&mut store, &path, None, &grow, REREAD).expect_err("changed under us");
    assert!(
        matches!(err, ImageError::Changed(_)) && err.to_string().contains("nothing was committed"),
        "{err}"
    );
    assert_eq!(store.latest().expect("latest"), Some(first.id));
    drop(store);
    let (store, _) = Store::open(dir.path().join("store"), Mode::Read).expect("reopen");
    assert_eq!(store.snapshot_ids().expect("ids"), vec![first.id]);
    assert!(store.verify(&[]).expect("verify").is_clean());
}

#[test]
fn an_incremental_image_snapshot_writes_only_changed_pages() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("disk.img");
    let mut data = image(2048, 5);
    std::fs::write(&path, &data).expect("write");
    let mut store = Store::init(dir.path().join("store"), StoreOptions::default()).expect("store");
    let first = snapshot_image(&mut store, &path, Some("a".into()), &|_| {}).expect("first");
    assert_eq!(first.pages_changed, 1536, "every non-zero page is new");
    for p in [3usize, 700, 2047] {
        data[p * 4096 + 1] ^= 0x40;
    }
    std::fs::write(&path, &data).expect("write");
    let second = snapshot_image(&mut store, &path, None, &|_| {}).expect("second");
    assert_eq!((second.pages_changed, second.pages_written), (3, 3));
    // Three pages, compressed together (the default): no more than their plain bytes.
    assert!(
        second.data_bytes > 0 && second.data_bytes <= 3 * 4096,
        "three pages: {}",
        second.data_bytes
    );
    let out = dir.path().join("out.img");
    restore_image(&store, second.id, &out, &|_| {}).expect("restore");
    assert!(std::fs::read(&out).expect("read") == data);
}

/// The progress callback of the second snapshot runs between batches: it rewrites one page of a
/// batch already read (same size) and puts the modification time back exactly.
fn snapshot_while(tamper: impl Fn(&std::path::Path) + Sync) {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("live.img");
    std::fs::write(&path, image(3000, 7)).expect("write");
    let mut store = Store::init(dir.path().join("store"), StoreOptions::default()).expect("store");
    let first = snapshot_image(&mut store, &path, None, &|_| {}).expect("first snapshot");
    let once = std::sync::Once::new();
    let during = |done: u64| {
        if done > 0 && done < 3000 * 4096 {
            once.call_once(|| tamper(&path));
        }
    };
    let err = snapshot_image_with(&mut store, &path, None, &during, REREAD)
        .expect_err("changed under us");
    assert!(
        matches!(err, ImageError::Changed(_))
            && err.to_string().contains("nothing was committed")
            && err.to_string().contains("live.img"),
        "{err}"
    );
    assert!(once.is_completed(), "the image was changed during the read");
    assert_eq!(store.latest().expect("latest"), Some(first.id));
    assert_eq!(store.snapshot_ids().expect("ids"), vec![first.id]);
}

#[test]
fn a_write_during_the_read_whose_mtime_is_put_back_is_refused() {
    snapshot_while(|path| {
        let mtime = std::fs::metadata(path)
            .expect("stat")
            .modified()
            .expect("mtime");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .expect("open");
        std::os::unix::fs::FileExt::write_all_at(&f, &[0xAB; 64], 5).expect("write");
        f.set_modified(mtime).expect("put the mtime back");
        drop(f);
        let now = std::fs::metadata(path).expect("stat");
        assert_eq!(now.modified().expect("mtime"), mtime, "mtime restored");
        assert_eq!(now.len(), 3000 * 4096, "same size");
    });
}

#[test]
fn an_image_replaced_during_the_read_by_another_file_is_refused() {
    snapshot_while(|path| {
        let old = std::fs::metadata(path).expect("stat");
        let other = path.with_extension("new");
        let mut data = std::fs::read(path).expect("read");
        data[5] ^= 1;
        std::fs::write(&other, &data).expect("write");
        std::fs::File::options()
            .write(true)
            .open(&other)
            .expect("open")
            .set_modified(old.modified().expect("mtime"))
            .expect("mtime");
        std::fs::rename(&other, path).expect("rename over the image");
    });
}

/// `len` bytes of pseudo-random, non-zero-page data.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8 | 1
        })
        .collect()
}

/// Whether two files have the same length and bytes, read 4 MiB at a time.
fn same_bytes(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::io::Read;
    let (mut fa, mut fb) = (
        std::fs::File::open(a).expect("open"),
        std::fs::File::open(b).expect("open"),
    );
    if fa.metadata().expect("stat").len() != fb.metadata().expect("stat").len() {
        return false;
    }
    let (mut ba, mut bb) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    loop {
        let n = fa.read(&mut ba).expect("read");
        if n == 0 {
            return true;
        }
        fb.read_exact(&mut bb[..n]).expect("read");
        if ba[..n] != bb[..n] {
            return false;
        }
    }
}

/// Bytes the file system allocated for a file.
fn allocated(p: &std::path::Path) -> u64 {
    std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(p).expect("stat")) * 512
}

fn write_at(path: &std::path::Path, at: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    std::os::unix::fs::FileExt::write_all_at(&f, data, at).expect("write");
}

/// Deallocates `len` bytes at `at`, keeping the size (they read as zeros).
fn punch_hole(path: &std::path::Path, at: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    // SAFETY: fallocate takes no pointers; `f` keeps the descriptor open for the call.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            at as libc::off_t,
            len as libc::off_t,
        )
    };
    assert_eq!(rc, 0, "punch hole: {}", std::io::Error::last_os_error());
}

const GIB: u64 = 1 << 30;

#[test]
fn a_sparse_image_is_read_only_where_it_holds_data_and_restores_sparse() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("sparse.img");
    // 4 GiB and a partial last page; data at scattered offsets, some not page-aligned.
    let size = 4 * GIB + 1234;
    std::fs::File::create(&path)
        .expect("create")
        .set_len(size)
        .expect("size");
    let pieces: [(u64, usize); 5] = [
        (0, 1 << 20),                 // 1 MiB at the start
        (GIB + 100, 3 * 4096),        // starts and ends inside a page
        (2 * GIB + 12_345, 64 << 10), // 64 KiB, unaligned
        (3 * GIB - 10, 20),           // straddles a page boundary
        (size - 5000, 5000),          // the very end, partial last page
    ];
    let mut data_bytes = 0u64;
    for (i, (at, len)) in pieces.iter().enumerate() {
        write_at(&path, *at, &noise(*len, i as u64 + 1));
        data_bytes += *len as u64;
    }
    assert!(
        allocated(&path) < 8 << 20,
        "the test file system keeps holes"
    );
    let mut store = Store::init(dir.path().join("store"), StoreOptions::default()).expect("store");
    let snap = snapshot_image(&mut store, &path, None, &|_| {}).expect("snapshot");
    // Data pages: 256 + 4 + 17 + 2 + 2 = 281 (each piece aligned outward to whole pages).
    assert_eq!(snap.image_size, size);
    assert!(
        (281..=300).contains(&snap.pages_read),
        "read {} pages of {} for {data_bytes} bytes of data",
        snap.pages_read,
        size.div_ceil(4096)
    );
    assert_eq!(snap.pages_changed, 281);
    let out = dir.path().join("out.img");
    let restored = restore_image(&store, snap.id, &out, &|_| {}).expect("restore");
    assert_eq!(restored.pages_written, 281);
    assert!(same_bytes(&path, &out), "restore is byte-identical");
    assert!(
        allocated(&out) <= 281 * 4096 + (1 << 20),
        "restore is sparse: {} bytes allocated",
        allocated(&out)
    );
}

#[test]
fn an_incremental_snapshot_removes_pages_now_in_a_hole_and_reads_only_data() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path)
        .expect("create")
        .set_len(64 << 20)
        .expect("size");
    // Region R: 2 MiB at 8 MiB; A: 1 MiB at 32 MiB.
    write_at(&path, 8 << 20, &noise(2 << 20, 1));
    write_at(&path, 32 << 20, &noise(1 << 20, 2));
    let mut store = Store::init(dir.path().join("store"), StoreOptions::default()).expect("store");
    let first = snapshot_image(&mut store, &path, None, &|_| {}).expect("first");
    assert_eq!((first.pages_read, first.pages_changed), (768, 768));
    let copy1 = dir.path().join("copy1.img");
    std::fs::copy(&path, &copy1).expect("copy");
    // Punch R, leaving 100 bytes of data in its first page and its last page partly zeroed; write
    // B: 256 KiB at 50 MiB.
    punch_hole(&path, (8 << 20) + 100, 2 << 20);
    write_at(&path, 50 << 20, &noise(256 << 10, 3));
    let second = snapshot_image(&mut store, &path, None, &|_| {}).expect("second");
    // Read: R's first page (100 bytes of data left), A and B; not the punched pages of R.
    assert!(
        second.pages_read <= 1 + 256 + 64 + 2,
        "read {} pages",
        second.pages_read
    );
    // Changed: R's first page (partly zeroed), R's 511 other pages (now a hole), and B's 64. The
    // punch's partial last page lies past R, where there was no data.
    assert_eq!(second.pages_changed, 512 + 64);
    let mut in_r = 0;
    store
        .for_each_page_in(
            second.id,
            pagesnap_store::Vpn(2048)..pagesnap_store::Vpn(2048 + 512),
            |_, _| {
                in_r += 1;
                Ok(())
            },
        )
        .expect("walk");
    assert_eq!(in_r, 1, "only R's first page (100 bytes of data) is stored");
    for (id, want) in [(first.id, &copy1), (second.id, &path)] {
        let out = dir.path().join(format!("out{}.img", id.0));
        restore_image(&store, id, &out, &|_| {}).expect("restore");
        assert!(same_bytes(want, &out), "snapshot {} byte-identical", id.0);
    }
}

#[test]
fn an_image_of_written_zero_bytes_stores_no_page() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("zeros.img");
    std::fs::write(&path, vec![0u8; 16 << 20]).expect("write");
    assert!(allocated(&path) >= 16 << 20, "zeros written, not holes");
    let mut store = Store::init(dir.path().join("store"), StoreOptions::default()).expect("store");
    let snap = snapshot_image(&mut store, &path, None, &|_| {}).expect("snapshot");
    assert_eq!(
        snap.pages_read, 4096,
        "written zeros are data to the file system"
    );
    assert_eq!((snap.pages_changed, snap.pages_written), (0, 0));
    assert_eq!(snap.data_bytes, 0);
    let out = dir.path().join("out.img");
    restore_image(&store, snap.id, &out, &|_| {}).expect("restore");
    assert!(same_bytes(&path, &out));
    assert!(allocated(&out) < 1 << 20, "restored as a hole");
}

#[test]
fn an_unchanged_image_is_not_read_and_its_snapshot_restores_identical() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("disk.img");
    std::fs::write(&path, image(2048, 9)).expect("write");
    let mut store = Store::init(dir.path().join("store"), StoreOptions::default()).expect("store");
    let first = snapshot_image(&mut store, &path, None, &|_| {}).expect("first");
    assert_eq!((first.pages_read, first.unchanged), (2048, false));
    let origin = store
        .snapshot(first.id)
        .expect("info")
        .origin
        .expect("origin");
    assert!(origin.starts_with("image v1 dev="), "{origin}");
    let canonical = std::fs::canonicalize(&path).expect("canonical");
    assert!(
        origin.ends_with(&format!(" settled=1 path={}", canonical.display())),
        "{origin}"
    );
    let second = snapshot_image(&mut store, &path, Some("again".into()), &|_| {}).expect("second");
    assert_eq!(
        (
            second.pages_read,
            second.pages_changed,
            second.pages_written,
            second.data_bytes
        ),
        (0, 0, 0, 0)
    );
    assert!(second.unchanged);
    let (a, b) = (
        store.snapshot(first.id).expect("info"),
        store.snapshot(second.id).expect("info"),
    );
    assert_eq!(
        (b.parent, b.label.as_deref()),
        (Some(first.id), Some("again"))
    );
    assert_eq!((a.page_count, a.merkle_root), (b.page_count, b.merkle_root));
    assert_eq!(a.origin, b.origin, "the same identity, recorded again");
    let out = dir.path().join("out.img");
    restore_image(&store, second.id, &out, &|_| {}).expect("restore");
    assert!(same_bytes(&path, &out), "restores byte-identical");
    // A third, unchanged again, still skips (its parent is the skipped snapshot).
    let third = snapshot_image(&mut store, &path, None, &|_| {}).expect("third");
    assert!(third.unchanged && third.pages_read == 0);
    assert!(store.verify(&[]).expect("verify").is_clean());
}

#[test]
fn a_changed_byte_with_the_mtime_put_back_is_read_and_recorded() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("disk.img");
    let mut data = image(1024, 4);
    std::fs::write(&path, &data).expect("write");
    let mut store = Store::init(dir.path().join("store"), StoreOptions::default()).expect("store");
    let first = snapshot_image(&mut store, &path, None, &|_| {}).expect("first");
    let copy1 = dir.path().join("copy1.img");
    std::fs::copy(&path, &copy1).expect("copy");
    // One byte changed in place, same size, and the modification time put back exactly.
    let before = std::fs::metadata(&path).expect("stat");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5A], 700 * 4096 + 17).expect("write");
    f.set_modified(before.modified().expect("mtime"))
        .expect("put the mtime back");
    drop(f);
    data[700 * 4096 + 17] = 0x5A;
    let after = std::fs::metadata(&path).expect("stat");
    assert_eq!(
        after.modified().expect("mtime"),
        before.modified().expect("mtime")
    );
    assert_eq!((after.len(), after.ino()), (before.len(), before.ino()));
    let second = snapshot_image(&mut store, &path, None, &|_| {}).expect("second");
    assert!(!second.unchanged, "ctime moved: not mistaken for unchanged");
    assert_eq!((second.pages_read, second.pages_changed), (1024, 1));
    for (id, want) in [
        (first.id, std::fs::read(&copy1).expect("read")),
        (second.id, data),
    ] {
        let out = dir.path().join(format!("out{}.img", id.0));
        restore_image(&store, id, &out, &|_| {}).expect("restore");
        assert!(
            std::fs::read(&out).expect("read") == want,
            "snapshot {}",
            id.0
        );
    }
}

#[test]
fn reread_reads_an_unchanged_image_and_a_replacement_file_is_read() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("disk.img");
    let data = image(512, 2);
    std::fs::write(&path, &data).expect("write");
    let mut store = Store::init(dir.path().join("store"), StoreOptions::default()).expect("store");
    snapshot_image(&mut store, &path, None, &|_| {}).expect("first");
    let reread = SnapshotOptions {
        reread: true,
        name: None,
    };
    let forced = snapshot_image_with(&mut store, &path, None, &|_| {}, reread).expect("reread");
    assert_eq!(
        (forced.pages_read, forced.pages_changed, forced.unchanged),
        (512, 0, false)
    );
    // After a forced read the identity is recorded again: the next snapshot skips.
    let skipped = snapshot_image(&mut store, &path, None, &|_| {}).expect("skip");
    assert!(skipped.unchanged && skipped.pages_read == 0);
    // The same bytes in another file renamed over the image: another inode, read.
    let other = dir.path().join("disk.new");
    std::fs::write(&other, &data).expect("write");
    std::fs::rename(&other, &path).expect("rename");
    let replaced = snapshot_image(&mut store, &path, None, &|_| {}).expect("replaced");
    assert_eq!(
        (
            replaced.pages_read,
            replaced.pages_changed,
            replaced.unchanged
        ),
        (512, 0, false)
    );
    // The same file through a symbolic link: the canonical path is the same, so it skips.
    let link = dir.path().join("link.img");
    std::os::unix::fs::symlink(&path, &link).expect("symlink");
    let via_link = snapshot_image(&mut store, &link, None, &|_| {}).expect("link");
    assert!(via_link.unchanged, "same canonical path");
    // A hard link is another path to the same inode: read, since the path differs.
    let hard = dir.path().join("hard.img");
    std::fs::hard_link(&path, &hard).expect("hard link");
    let via_hard = snapshot_image(&mut store, &hard, None, &|_| {}).expect("hard");
    assert!(!via_hard.unchanged && via_hard.pages_read == 512);
}

/// A loop device on `backing` (detached on drop), or why not.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

fn loop_device(backing: &std::path::Path) -> Result<Loop, String> {
    let out = std::process::Command::new("losetup")
        .args(["-f", "--show"])
        .arg(backing)
        .output()
        .map_err(|e| format!("losetup: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(Loop(
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    ))
}

#[test]
fn a_block_device_that_shrinks_during_the_read_is_refused_clearly() {
    let dir = tempfile::tempdir().expect("tmp");
    let backing = dir.path().join("backing.img");
    // 64 MiB: sixteen batches, so that the reads go on well past the batches the snapshot's
    // reader thread has already read ahead when the device shrinks.
    let data = image(16384, 6);
    std::fs::write(&backing, &data).expect("write");
    let dev = match loop_device(&backing) {
        Ok(d) => d,
        Err(e) => {
            println!("skipped: loop devices are not available here ({e})");
            return;
        }
    };
    let node = std::path::PathBuf::from(&dev.0);
    let mut store = Store::init(dir.path().join("store"), StoreOptions::default()).expect("store");
    let first = snapshot_image(&mut store, &node, None, &|_| {}).expect("snapshot the device");
    assert_eq!((first.image_size, first.pages_read), (64 << 20, 16384));
    // The device goes (mostly) away after the first batch: its backing file is cut to 1 MiB and
    // the loop device told its new size.
    let once = std::sync::Once::new();
    let shrink = |done: u64| {
        if done > 0 && done < 64 << 20 {
            once.call_once(|| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&backing)
                    .expect("open")
                    .set_len(1 << 20)
                    .expect("truncate");
                let ok = std::process::Command::new("losetup")
                    .args(["-c", &dev.0])
                    .status()
                    .expect("losetup -c");
                assert!(ok.success(), "losetup -c");
            });
        }
    };
    let err = snapshot_image(&mut store, &node, None, &shrink).expect_err("the device shrank");
    assert!(once.is_completed());
    assert!(
        matches!(err, ImageError::DeviceRead { .. })
            && err.to_string().contains(&dev.0)
            && err.to_string().contains("nothing was committed"),
        "{err}"
    );
    assert_eq!(store.snapshot_ids().expect("ids"), vec![first.id]);
}

/// A writer (a hypervisor, say) maps the image `MAP_SHARED` and is paused for each snapshot, and
/// before the second one it even msyncs, unmaps and closes. Its store between the two snapshots
/// went into a page that was already dirty and writable, which the kernel does not timestamp: the
/// second snapshot must still read it (the snapshot writes the image back before it takes its
/// stamp, so a later store faults and moves ctime). Found by review: it was skipped as unchanged
/// and restored the old byte, in every later snapshot too.
fn a_store_through_a_shared_map(dir: &std::path::Path) {
    use std::os::fd::AsRawFd;
    let path = dir.join("vm.img");
    let size = 1usize << 20;
    std::fs::write(&path, vec![0x11u8; size]).expect("image");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open");
    // SAFETY: a fresh shared read-write mapping of `size` bytes of an open file that is `size`
    // bytes long; nothing else maps it, and it is unmapped below before `f` is dropped.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert!(p != libc::MAP_FAILED, "mmap");
    let p = p.cast::<u8>();
    // SAFETY: offsets inside the mapping of `size` bytes, written by this thread only.
    unsafe { p.wrapping_add(5 * 4096 + 7).write(0xAA) };
    let mut store = Store::init(dir.join("store"), StoreOptions::default()).expect("store");
    snapshot_image(&mut store, &path, None, &|_| {}).expect("s1");
    // SAFETY: as above; the page is still dirty and writable, so this store does not fault.
    unsafe { p.wrapping_add(5 * 4096 + 8).write(0xBB) };
    // SAFETY: `p` is the mapping made above, of `size` bytes.
    let synced = unsafe { libc::msync(p.cast(), size, libc::MS_SYNC) };
    assert_eq!(synced, 0);
    // SAFETY: `p` is the mapping made above, of `size` bytes, not used after this.
    let unmapped = unsafe { libc::munmap(p.cast(), size) };
    assert_eq!(unmapped, 0);
    drop(f);
    let want = std::fs::read(&path).expect("read");
    assert_eq!(want[5 * 4096 + 8], 0xBB, "the write is in the file");
    for round in 0..2 {
        let s = snapshot_image(&mut store, &path, None, &|_| {}).expect("snapshot");
        let out = dir.join(format!("out{round}.img"));
        restore_image(&store, s.id, &out, &|_| {}).expect("restore");
        let got = std::fs::read(&out).expect("read");
        assert!(
            got == want,
            "round {round}: unchanged={} read={}: restores {:#x}, the image holds 0xBB",
            s.unchanged,
            s.pages_read,
            got[5 * 4096 + 8]
        );
    }
}

#[test]
fn a_store_through_a_shared_map_into_a_dirty_page_is_not_skipped() {
    let dir = tempfile::tempdir().expect("tmp");
    a_store_through_a_shared_map(dir.path());
}

#[test]
fn a_store_through_a_shared_map_on_tmpfs_is_not_skipped() {
    match tempfile::tempdir_in("/dev/shm") {
        Ok(dir) => a_store_through_a_shared_map(dir.path()),
        Err(e) => println!("skipped: no /dev/shm here ({e})"),
    }
}

/// Two images alternated in one store: each snapshot's parent is the newest snapshot of its own
/// name, so an unchanged image writes no page, a sliver of metadata, and (skipped) reads nothing;
/// dedup is store-wide (a clone of A shares A's pages).
#[test]
fn two_images_alternated_in_one_store_cost_only_what_changed_in_each() {
    use pagesnap_engine::names::{latest_of, name_of};
    let dir = tempfile::tempdir().expect("tmp");
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    std::fs::write(&a, image(2048, 1)).expect("write a");
    std::fs::write(&b, image(2048, 2)).expect("write b");
    let mut store = Store::init(dir.path().join("store"), StoreOptions::default()).expect("store");
    let a1 = snapshot_image(&mut store, &a, None, &|_| {}).expect("a1");
    let named = |n: &str| SnapshotOptions {
        reread: false,
        name: Some(n.to_string()),
    };
    let b1 = snapshot_image_with(&mut store, &b, None, &|_| {}, named("vm-b")).expect("b1");
    assert_eq!(
        b1.pages_changed, 1536,
        "b's first snapshot is against nothing of its name"
    );
    let a2 = snapshot_image(&mut store, &a, None, &|_| {}).expect("a2");
    let b2 = snapshot_image_with(&mut store, &b, None, &|_| {}, named("vm-b")).expect("b2");
    let size = 2048 * 4096;
    for (s, what) in [(&a2, "a2"), (&b2, "b2")] {
        assert_eq!(
            (s.pages_changed, s.pages_written, s.data_bytes),
            (0, 0, 0),
            "{what}"
        );
        assert!(
            s.meta_bytes * 100 < size,
            "{what}: {} bytes of metadata",
            s.meta_bytes
        );
        assert!(
            s.unchanged && s.pages_read == 0,
            "{what}: skipped, nothing read"
        );
    }
    // Read anyway (no skip): still nothing changed against the same name's parent.
    let reread = SnapshotOptions {
        reread: true,
        name: Some("vm-b".into()),
    };
    let b3 = snapshot_image_with(&mut store, &b, None, &|_| {}, reread).expect("b3");
    assert_eq!(
        (b3.pages_read, b3.pages_changed, b3.pages_written),
        (2048, 0, 0)
    );
    let snaps = store.snapshots().expect("list");
    let info = |id| snaps.iter().find(|s| s.id == id).expect("listed");
    let canonical = std::fs::canonicalize(&a).expect("canonical");
    let a_name = canonical.to_str().expect("utf-8");
    assert_eq!(info(a2.id).parent, Some(a1.id));
    assert_eq!(info(b2.id).parent, Some(b1.id));
    assert_eq!(info(b3.id).parent, Some(b2.id));
    assert_eq!(
        name_of(info(a1.id)),
        a_name,
        "default name: the canonical path"
    );
    assert_eq!(name_of(info(b1.id)), "vm-b");
    assert_eq!(latest_of(&snaps, a_name), Some(a2.id));
    assert_eq!(latest_of(&snaps, "vm-b"), Some(b3.id));
    // A clone of A under a third name: a new history, but no page written (store-wide dedup).
    let c = dir.path().join("c.img");
    std::fs::copy(&a, &c).expect("clone");
    let c1 = snapshot_image(&mut store, &c, None, &|_| {}).expect("c1");
    assert_eq!((c1.pages_changed, c1.pages_written), (1536, 0));
    assert_eq!(
        info(a1.id).origin,
        store.snapshot(a2.id).expect("a2").origin
    );
    for (id, img) in [(a2.id, &a), (b3.id, &b), (c1.id, &c)] {
        let out = dir.path().join("out.img");
        restore_image(&store, id, &out, &|_| {}).expect("restore");
        assert!(
            same_bytes(img, &out),
            "snapshot {id} restores byte-identical"
        );
    }
    assert!(matches!(
        snapshot_image_with(&mut store, &a, None, &|_| {}, named("123")),
        Err(ImageError::BadName(_))
    ));
    assert_eq!(
        store.snapshots().expect("list").len(),
        6,
        "the bad name committed nothing"
    );
}

/// A canonical path over 512 bytes, or with a control character, is no valid image name: a
/// snapshot without a name takes `path-<hash>` instead of failing, and a tracked image (`serve`)
/// names its snapshots the same, so each continues the other's history.
#[test]
fn a_path_that_is_no_valid_name_gets_a_derived_default_name() {
    use pagesnap_engine::names::{check_name, default_name, implicit_name, name_of};
    let dir = tempfile::tempdir().expect("tmp");
    let mut store = Store::init(dir.path().join("store"), StoreOptions::default()).expect("store");
    let mut deep = dir.path().to_path_buf();
    for _ in 0..3 {
        deep.push("d".repeat(200));
    }
    std::fs::create_dir_all(&deep).expect("mkdir");
    let long = deep.join("disk.img");
    let odd = dir.path().join("a\nb.img");
    for (n, path) in [&long, &odd].into_iter().enumerate() {
        std::fs::write(path, image(8, n as u8)).expect("write");
        let name = default_name(path).expect("a default name");
        assert!(check_name(&name).is_ok(), "{name:?}");
        let canonical = std::fs::canonicalize(path).expect("canonical");
        assert_eq!(
            name,
            implicit_name(canonical.as_os_str().as_encoded_bytes())
        );
        assert!(name.starts_with("path-"), "{name}");
        let first = snapshot_image(&mut store, path, None, &|_| {}).expect("snapshot");
        let info = |store: &Store, id| store.snapshot(id).expect("info");
        assert_eq!(name_of(&info(&store, first.id)), name);
        let tracked = pagesnap_engine::tracked::TrackedImage::open(
            path,
            &dir.path().join(format!("state-{n}")),
            &store,
        )
        .expect("track");
        let second = tracked
            .snapshot(&mut store, None, true, &|_| {})
            .expect("tracked snapshot");
        drop(tracked);
        assert_eq!(name_of(&info(&store, second.snapshot.id)), name);
        assert_eq!(info(&store, second.snapshot.id).parent, Some(first.id));
        let third = snapshot_image(&mut store, path, None, &|_| {}).expect("snapshot");
        assert_eq!(info(&store, third.id).parent, Some(second.snapshot.id));
    }
}

/// A restore's batches cover the image in order; their runs hold exactly the non-zero pages,
/// each at most 64 pages of consecutive numbers, with the image's bytes; an error from the
/// writer stops the reading and is returned, and a failed restore leaves no file behind.
#[test]
fn restore_batches_hold_the_non_zero_pages_in_runs_and_stop_at_the_first_error() {
    use pagesnap_engine::image::RESTORE_BATCH_BYTES;
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("disk.img");
    // Three batches and a bit; a zero stretch longer than a batch in the middle.
    let pages = (3 * RESTORE_BATCH_BYTES / 4096 + 7) as usize;
    let mut data = image(pages, 9);
    data[1500 * 4096..2700 * 4096].fill(0);
    std::fs::write(&path, &data).expect("write");
    let mut store = Store::init(dir.path().join("store"), StoreOptions::default()).expect("store");
    let snap = snapshot_image(&mut store, &path, None, &|_| {}).expect("snapshot");

    let mut rebuilt = vec![0u8; data.len()];
    let mut next = 0u64;
    let mut batches = 0;
    for_each_page_batch(
        &store,
        snap.id,
        |first, n, runs| -> Result<(), ImageError> {
            assert_eq!(first, next, "batches in order, none skipped");
            next = first + n;
            batches += 1;
            for r in runs {
                assert!(r.pages >= 1 && r.pages <= 64, "{r:?}");
                assert!(r.first >= first && r.first + r.pages <= first + n);
                assert_eq!(r.bytes.len() as u64, r.pages * 4096);
                let at = (r.first * 4096) as usize;
                rebuilt[at..at + r.bytes.len()].copy_from_slice(&r.bytes);
                for p in r.bytes.chunks(4096) {
                    assert!(p.iter().any(|b| *b != 0), "a zero page in a run");
                }
            }
            Ok(())
        },
    )
    .expect("batches");
    assert_eq!(next, pages as u64);
    assert_eq!(batches, 4);
    assert!(rebuilt == data, "the runs are the image");

    let mut calls = 0;
    let e = for_each_page_batch(&store, snap.id, |_, _, _| -> Result<(), ImageError> {
        calls += 1;
        Err(ImageError::BadName("stop here".into()))
    })
    .expect_err("the writer's error");
    assert_eq!(calls, 1);
    assert!(e.to_string().contains("stop here"), "{e}");

    // A restore into a directory that does not exist fails, naming the file, and leaves nothing.
    let out = dir.path().join("missing").join("out.img");
    let e = restore_image(&store, snap.id, &out, &|_| {}).expect_err("no directory");
    assert!(e.to_string().contains("missing"), "{e}");
    assert!(!dir.path().join("missing").exists());
    let out = dir.path().join("out.img");
    restore_image(&store, snap.id, &out, &|_| {}).expect("restore");
    assert!(std::fs::read(&out).expect("read") == data);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

// Edge cases and failure paths of `for_each_page_batch` / `restore_image`, from the review of
// commit dee514e.

fn store_with(dir: &std::path::Path, data: &[u8]) -> (Store, pagesnap_store::SnapshotId) {
    let path = dir.join("disk.img");
    std::fs::write(&path, data).expect("write");
    let mut store = Store::init(dir.join("store"), StoreOptions::default()).expect("store");
    let snap = snapshot_image(&mut store, &path, None, &|_| {}).expect("snapshot");
    (store, snap.id)
}

fn tmp_leftovers(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

/// An empty image: no batch at all, and the restore is an empty file.
#[test]
fn an_empty_image_has_no_batch_and_restores_empty() {
    let dir = tempfile::tempdir().expect("tmp");
    let (store, id) = store_with(dir.path(), &[]);
    let mut calls = 0;
    for_each_page_batch(&store, id, |_, _, _| -> Result<(), ImageError> {
        calls += 1;
        Ok(())
    })
    .expect("batches");
    assert_eq!(calls, 0);
    let out = dir.path().join("out.img");
    let r = restore_image(&store, id, &out, &|_| {}).expect("restore");
    assert_eq!(r.image_size, 0);
    assert_eq!(std::fs::metadata(&out).expect("meta").len(), 0);
    assert!(tmp_leftovers(dir.path()).is_empty());
}

/// All pages zero: batches with no runs, and a restore of the right size that is all zero.
#[test]
fn an_all_zero_image_has_batches_without_runs_and_restores_exactly() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = vec![0u8; 3 * 4096 * 1024 + 1234];
    let (store, id) = store_with(dir.path(), &data);
    let mut next = 0;
    for_each_page_batch(&store, id, |first, n, runs| -> Result<(), ImageError> {
        assert_eq!(first, next);
        assert!(runs.is_empty());
        next = first + n;
        Ok(())
    })
    .expect("batches");
    assert_eq!(next, (data.len() as u64).div_ceil(4096));
    let out = dir.path().join("out.img");
    let r = restore_image(&store, id, &out, &|_| {}).expect("restore");
    assert_eq!(r.pages_written, 0);
    assert!(std::fs::read(&out).expect("read") == data);
}

/// A size that is no multiple of the page size, the last (partial) page non-zero and in the
/// middle of a run, and a batch boundary crossed by data: the restore is the image exactly, and
/// progress ends at the size.
#[test]
fn a_partial_last_page_restores_exactly() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut data = image(1024 + 9, 4);
    data.truncate(data.len() - 4096 + 777);
    let last = data.len() - 1;
    data[last] = 0xEE;
    let (store, id) = store_with(dir.path(), &data);
    let out = dir.path().join("out.img");
    let seen = std::sync::Mutex::new(Vec::new());
    restore_image(&store, id, &out, &|p| seen.lock().unwrap().push(p)).expect("restore");
    assert!(std::fs::read(&out).expect("read") == data);
    let seen = seen.into_inner().unwrap();
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert_eq!(seen.last().copied(), Some(data.len() as u64));
}

/// A panic in the writer (here: the caller's progress callback) neither deadlocks the reader
/// thread nor is swallowed, and `restore_image` leaves no temporary file behind (the review
/// found it did: its clean-up ran only on `Err`; the temporary file now removes itself on drop).
#[test]
fn a_panic_while_writing_leaves_no_temporary_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let (store, id) = store_with(dir.path(), &image(3000, 5));
    let outdir = dir.path().join("outdir");
    std::fs::create_dir(&outdir).expect("mkdir");
    let out = outdir.join("out.img");
    let (tx, rx) = std::sync::mpsc::channel();
    let store = std::sync::Arc::new(store);
    let s = store.clone();
    let o = out.clone();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            restore_image(&s, id, &o, &|_| panic!("progress callback panics"))
        }));
        let _ = tx.send(r.is_err());
    });
    let panicked = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("a writer panic must not deadlock the reader thread");
    assert!(panicked, "the panic propagates");
    assert!(!out.exists());
    let left = tmp_leftovers(&outdir);
    assert!(
        left.is_empty(),
        "temporary file left behind after a panic: {left:?}"
    );
}
