//! The frames a space's pages live in: page-sized blocks of memory named by index, carved from
//! 2 MiB segments (anonymous mappings, zero-filled by the kernel on first touch) that are never
//! moved or unmapped while the space lives.
//!
//! A frame's address is arithmetic on its index (one directory entry, then an offset), so finding
//! a page's bytes from its descriptor costs two loads of memory that stays in cache, no lock and no
//! reference count. The bytes themselves carry no lock: every access to a mapped frame is made
//! under the page's stripe lock (the engine's locking protocol, `docs/concurrency.md`), and a
//! frame that is not mapped is reachable only by the thread that took it from the free list.

use memmap2::MmapMut;
use parking_lot::Mutex;
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::OnceLock;

/// Bytes in a segment (at least one frame): one x86-64 huge page.
const SEG_BYTES: usize = 2 << 20;
/// Directory fan-out, both levels.
const FAN: usize = 512;

/// `FAN` segment pointers, null until the segment is allocated.
type SegmentTable = Box<[AtomicPtr<u8>]>;

/// The frames of one space.
pub(crate) struct Frames {
    /// log2 of the frame size.
    shift: u32,
    /// log2 of frames per segment.
    seg_shift: u32,
    /// Level one: tables of `FAN` segment pointers (null until allocated), made on demand.
    dir: Box<[OnceLock<SegmentTable>]>,
    alloc: Mutex<Alloc>,
}

struct Alloc {
    /// Frames ever carved.
    next: usize,
    /// Frames unmapped, to reuse.
    free: Vec<usize>,
    /// The segments' mappings, unmapped when the frames are dropped.
    segments: Vec<MmapMut>,
}

/// Why no frame could be had: the directory is full, or the system gave no memory.
#[derive(Debug)]
pub(crate) struct Exhausted(pub(crate) String);

impl Frames {
    pub(crate) fn new(shift: u32) -> Frames {
        let seg = SEG_BYTES.max(1 << shift);
        Frames {
            shift,
            seg_shift: seg.trailing_zeros() - shift,
            dir: (0..FAN).map(|_| OnceLock::new()).collect(),
            alloc: Mutex::new(Alloc {
                next: 0,
                free: Vec::new(),
                segments: Vec::new(),
            }),
        }
    }

    /// A frame for a new mapping, holding `content` (zeros if `None`).
    pub(crate) fn alloc(&self, content: Option<&[u8]>) -> Result<usize, Exhausted> {
        let (idx, fresh) = {
            let mut a = self.alloc.lock();
            match a.free.pop() {
                Some(i) => (i, false),
                None => {
                    let i = a.next;
                    if i & ((1 << self.seg_shift) - 1) == 0 {
                        self.add_segment(&mut a, i >> self.seg_shift)?;
                    }
                    a.next += 1;
                    (i, true)
                }
            }
        };
        match content {
            Some(c) => {
                // SAFETY: `idx` was just taken from the allocator: no mapping names it, so no
                // other thread can reach it until the caller publishes it.
                let bytes = unsafe { self.bytes_mut(idx) };
                bytes.copy_from_slice(c);
            }
            // A frame never used is zeros already (segments are allocated zeroed), and left
            // untouched: the memory of a page mapped and never written is not even faulted in.
            None if fresh => {}
            None => {
                // SAFETY: as above.
                let bytes = unsafe { self.bytes_mut(idx) };
                bytes.fill(0);
            }
        }
        Ok(idx)
    }

    /// Gives frame `idx` back; the caller has unmapped it (no descriptor names it any more).
    pub(crate) fn free(&self, idx: usize) {
        self.alloc.lock().free.push(idx);
    }

    /// Segment `k` mapped and published. Allocator lock held (`a` is its state).
    fn add_segment(&self, a: &mut Alloc, k: usize) -> Result<(), Exhausted> {
        let table = self
            .dir
            .get(k / FAN)
            .ok_or_else(|| {
                Exhausted(format!(
                    "{} frames of {} bytes, the most a space holds",
                    (FAN * FAN) << self.seg_shift,
                    1u64 << self.shift
                ))
            })?
            .get_or_init(|| (0..FAN).map(|_| AtomicPtr::new(ptr::null_mut())).collect());
        let bytes = 1usize << (self.seg_shift + self.shift);
        let mut seg = MmapMut::map_anon(bytes)
            .map_err(|e| Exhausted(format!("mapping {bytes} bytes of memory failed: {e}")))?;
        // The mapping does not move when `seg` does, and lives until the frames are dropped.
        table[k % FAN].store(seg.as_mut_ptr(), Ordering::Release);
        a.segments.push(seg);
        Ok(())
    }

    /// The first byte of frame `idx`, which the allocator has handed out.
    fn frame_ptr(&self, idx: usize) -> *mut u8 {
        let k = idx >> self.seg_shift;
        let seg = self
            .dir
            .get(k / FAN)
            .and_then(OnceLock::get)
            .map_or(ptr::null_mut(), |table| {
                table[k % FAN].load(Ordering::Acquire)
            });
        assert!(!seg.is_null(), "frame {idx} was never allocated");
        let off = (idx & ((1 << self.seg_shift) - 1)) << self.shift;
        // SAFETY: `seg` is a live segment of `1 << (seg_shift + shift)` bytes, and `off` is the
        // offset of a frame inside it (its index in the segment is below `1 << seg_shift`).
        unsafe { seg.add(off) }
    }

    /// The bytes of frame `idx`, to read.
    ///
    /// # Safety
    /// The caller holds the lock that guards the frame (the stripe of the page mapped to it), so
    /// no other thread writes it meanwhile.
    pub(crate) unsafe fn bytes(&self, idx: usize) -> &[u8] {
        // SAFETY: the frame is `1 << shift` bytes inside a live segment; no writer (the contract).
        unsafe { std::slice::from_raw_parts(self.frame_ptr(idx), 1 << self.shift) }
    }

    /// The bytes of frame `idx`, to write.
    ///
    /// # Safety
    /// The caller holds the lock that guards the frame (the stripe of the page mapped to it), or
    /// has just taken it from the allocator: no other thread reads or writes it meanwhile.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn bytes_mut(&self, idx: usize) -> &mut [u8] {
        // SAFETY: as in `bytes`, with no other access at all (the contract).
        unsafe { std::slice::from_raw_parts_mut(self.frame_ptr(idx), 1 << self.shift) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(frames: &Frames, idx: usize) -> Vec<u8> {
        // SAFETY: the test is the only thread using the frames.
        unsafe { frames.bytes(idx) }.to_vec()
    }

    fn write(frames: &Frames, idx: usize, at: usize, b: u8) {
        // SAFETY: as above.
        let bytes = unsafe { frames.bytes_mut(idx) };
        bytes[at] = b;
    }

    #[test]
    fn frames_hold_what_is_written_and_come_back_zeroed() {
        let frames = Frames::new(12);
        let content: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let a = frames.alloc(Some(&content)).expect("alloc");
        let b = frames.alloc(None).expect("alloc");
        assert_ne!(a, b);
        assert_eq!(read(&frames, a), content);
        assert_eq!(read(&frames, b), vec![0; 4096]);
        write(&frames, b, 4095, 9);
        frames.free(b);
        // A frame given back is reused, and a new mapping of it starts from zeros.
        let c = frames.alloc(None).expect("alloc");
        assert_eq!(c, b);
        assert_eq!(read(&frames, c), vec![0; 4096]);
        assert_eq!(read(&frames, a), content, "other frames untouched");
    }

    #[test]
    fn frames_span_segments_and_tables_at_every_page_size() {
        // 2 MiB pages: one frame a segment, so 600 frames fill more than one table of segments;
        // 4 MiB pages: a segment larger than the 2 MiB the others have.
        for shift in [9, 12, 21, 22] {
            let frames = Frames::new(shift);
            let per_seg = 1usize << frames.seg_shift;
            let n = if shift >= 21 {
                FAN + 88
            } else {
                2 * per_seg + 3
            };
            let idx: Vec<usize> = (0..n).map(|_| frames.alloc(None).expect("alloc")).collect();
            assert_eq!(idx, (0..n).collect::<Vec<_>>());
            let last = (1usize << shift) - 1;
            for &i in idx.iter().step_by(7).chain([n - 1].iter()) {
                write(&frames, i, 0, i as u8 | 1);
                write(&frames, i, last, (i >> 8) as u8 | 1);
            }
            for &i in idx.iter().step_by(7).chain([n - 1].iter()) {
                // SAFETY: the test is the only thread using the frames.
                let b = unsafe { frames.bytes(i) };
                assert_eq!(
                    (b.len(), b[0], b[last]),
                    (1 << shift, i as u8 | 1, (i >> 8) as u8 | 1)
                );
            }
        }
    }

    #[test]
    fn a_frame_mapped_and_never_written_is_not_in_memory() {
        let frames = Frames::new(12);
        let idx: Vec<usize> = (0..64)
            .map(|_| frames.alloc(None).expect("alloc"))
            .collect();
        let resident = |i: usize| {
            let p = frames.frame_ptr(i);
            let mut v = 0u8;
            // SAFETY: `p` is page-aligned (4 KiB frames in page-aligned segments) inside a live
            // mapping of at least one page, and `v` has room for that page's one status byte.
            let r = unsafe { libc::mincore(p.cast(), 4096, &mut v) };
            assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
            v & 1 == 1
        };
        write(&frames, idx[5], 0, 1);
        assert!(resident(idx[5]));
        assert!(!resident(idx[40]), "an untouched zero frame was faulted in");
    }
}
