//! Format 4: new pages compressed in frames, on every core, while the writer goes on.
//!
//! With compression on, a new page does not go into an extent at once: it joins the *open
//! frame*, and its place is a placeholder ([`PENDING_SEGMENT`], the frame's sequence number, its
//! slot). A full frame goes to a pool of compression threads (one per core); finished frames are
//! appended to the log in sequence order, as a frame record when compression saved at least 1/32
//! of it, else as plain pages in an extent. Each placeholder's real place is then known, and
//! the dedup map learns it. A commit (and gc, before it writes a map) first *drains*: sends the
//! open frame, waits for every frame in flight, appends them; then every placeholder in its
//! changes is resolved. A rollback forgets every frame: results of an older generation that
//! arrive later are dropped. See `docs/format.md` ("Page frames") and `docs/concurrency.md`.
//!
//! Placeholders never reach the disk: chunks are written only after the changes are resolved,
//! and a placeholder that does not resolve is an error, not a wrong location.

use super::{Store, Writer};
use crate::codec::{frame_pages, Codec, Compressor};
use crate::error::StoreError;
use crate::format::{record_len, Kind, Location, Ref, REC_HEADER, REC_MAGIC};
use crossbeam_channel::{Receiver, Sender};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::thread::JoinHandle;

/// The segment id of a placeholder: a page in a frame not yet appended.
pub(crate) const PENDING_SEGMENT: u32 = u32::MAX;

struct Job {
    gen: u64,
    seq: u64,
    plain: Vec<u8>,
    /// Attempt compression (false: incompressible data, the frame is only sealed).
    compress: bool,
    /// Ids a caller claimed for the frame's pages (an encrypted store's `put_hashed`): checked
    /// here, against the keyed ids of the pages, before the frame is appended.
    claimed: Option<Vec<[u8; 32]>>,
}

struct Done {
    gen: u64,
    seq: u64,
    /// The frame's pages: plain, or in an encrypted store sealed in place when they are the
    /// payload (stored uncompressed). Its length is the frame's plain length either way.
    plain: Vec<u8>,
    /// The compressed frame (sealed in place in an encrypted store), or `None`: the payload is
    /// `plain` (unencrypted: the pages go plain into an extent).
    packed: Option<Vec<u8>>,
    codec: Codec,
    /// How the payload is sealed.
    seal: Seal,
    /// The crc32 of the stored payload (nonce, payload and tag when sealed), computed in the
    /// thread; the writer folds it into the record's crc32 (None: pages stored in an extent).
    crc: Option<crc32fast::Hasher>,
    /// The claimed ids were not the pages' keyed ids: the writer refuses the frame.
    wrong_ids: bool,
}

/// Whether and how a finished frame's payload is sealed.
enum Seal {
    /// Not encrypted.
    Clear,
    /// Sealed in place: the nonce goes before the payload, the tag after it.
    Sealed(super::seal::SealParts),
    /// An encrypted store's frame that could not be sealed: the writer refuses it.
    Failed,
}

/// Compression threads: jobs in, finished frames out (in any order).
struct Pool {
    codec: Codec,
    level: i32,
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    fn new(
        codec: Codec,
        level: i32,
        crypt: Option<super::seal::Sealer>,
    ) -> Result<Pool, StoreError> {
        // One compressor first, so a bad level is an error here and not in a thread.
        Compressor::new(codec, level).map_err(StoreError::Compression)?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (jobs, rx) = crossbeam_channel::bounded::<Job>(2 * threads);
        let (tx, done) = crossbeam_channel::unbounded();
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let rx = rx.clone();
            let tx = tx.clone();
            let crypt = crypt.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("pagesnap-compress-{i}"))
                .spawn(move || {
                    let Ok(mut c) = Compressor::new(codec, level) else {
                        return;
                    };
                    let mut out = Vec::new();
                    loop {
                        let Ok(mut job) = rx.recv() else { return };
                        // Claimed ids checked first, many pages at once, before the pages are
                        // sealed in place.
                        // A panic here counts as wrong ids (the commit fails), never as a lost job
                        // the writer would wait for.
                        let wrong_ids = match (&crypt, &job.claimed) {
                            (Some((c, page)), Some(claimed)) => {
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    let pages: Vec<&[u8]> =
                                        job.plain.chunks(*page as usize).collect();
                                    let mut ids = vec![[0u8; 32]; pages.len()];
                                    crate::pagehash::hash_pages_keyed(
                                        c.dedup.key_bytes(),
                                        &pages,
                                        &mut ids,
                                    );
                                    ids != *claimed
                                }))
                                .unwrap_or(true)
                            }
                            _ => false,
                        };
                        // A panic in a codec stores the frame plain (its bytes are intact).
                        let shrunk = job.compress
                            && std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                c.compress(&job.plain, &mut out)
                            }))
                            .unwrap_or(false);
                        let mut packed = shrunk.then(|| out.clone());
                        let used = if packed.is_some() { codec } else { Codec::None };
                        let plain_len = job.plain.len();
                        // Encrypted: sealed here too, in place, on every core (a failure is
                        // `Failed`, which an encrypted store's writer refuses to store plain).
                        let (seal, crc) = match &crypt {
                            Some(c) => {
                                let payload = packed.as_mut().unwrap_or(&mut job.plain);
                                // A panic while sealing is `Failed` too.
                                let sealed =
                                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                        super::seal::seal_frame(c, used, plain_len, &mut *payload)
                                    }))
                                    .unwrap_or(None);
                                match sealed {
                                    Some(parts) => {
                                        let mut crc = crc32fast::Hasher::new();
                                        crc.update(parts.nonce());
                                        crc.update(payload);
                                        crc.update(&parts.tag);
                                        (Seal::Sealed(parts), Some(crc))
                                    }
                                    None => (Seal::Failed, None),
                                }
                            }
                            None => {
                                let crc = packed.as_ref().map(|p| {
                                    let mut crc = crc32fast::Hasher::new();
                                    crc.update(p);
                                    crc
                                });
                                (Seal::Clear, crc)
                            }
                        };
                        let done = Done {
                            gen: job.gen,
                            seq: job.seq,
                            plain: job.plain,
                            packed,
                            codec: used,
                            seal,
                            crc,
                            wrong_ids,
                        };
                        if tx.send(done).is_err() {
                            return;
                        }
                    }
                });
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) if workers.is_empty() => {
                    return Err(StoreError::Compression(format!(
                        "cannot start a compression thread: {e}"
                    )))
                }
                Err(_) => break,
            }
        }
        Ok(Pool {
            codec,
            level,
            jobs: Some(jobs),
            done,
            workers,
        })
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing the job channel ends each worker after its current frame.
        self.jobs = None;
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

/// The writer's frames: the open one, those in flight, and where appended ones went.
#[derive(Default)]
pub(crate) struct Framer {
    pool: Option<Pool>,
    /// Bumped by every reset: results of an older generation are dropped.
    gen: u64,
    /// Plain bytes and content hashes of the frame being filled.
    open: Vec<u8>,
    open_hashes: Vec<[u8; 32]>,
    /// Some page of the open frame came with an id its caller claimed (checked in a thread).
    open_claimed: bool,
    next_seq: u64,
    /// Frames sent and not yet appended: their pages' hashes, by sequence number.
    in_flight: BTreeMap<u64, Vec<[u8; 32]>>,
    /// Finished out of order, waiting for the frames before them.
    ready: BTreeMap<u64, Done>,
    /// Where each slot of each appended frame went, until the placeholders are resolved.
    placed: HashMap<u64, Vec<Location>>,
    /// Frames appended plain in a row (compression did not pay), and frames stored plain
    /// without an attempt since the last one tried: random or already compressed data costs
    /// one attempt in [`PROBE_EVERY`] frames once [`PLAIN_RUN`] frames in a row did not shrink.
    plain_run: u32,
    untried: u32,
    /// Pages of the current untried frame appended directly.
    direct: usize,
    /// Frame buffers of appended frames, for the next frames (no allocation, no growth by
    /// copying, and memory the caches still hold).
    spare: Vec<Vec<u8>>,
}

/// Frame buffers kept for reuse at most.
const SPARE_BUFFERS: usize = 16;

/// Frames in a row that did not shrink before attempts become sparse ...
const PLAIN_RUN: u32 = 8;
/// ... one frame in this many is tried; one that shrinks makes every frame tried again.
const PROBE_EVERY: u32 = 4;

impl std::fmt::Debug for Framer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Framer")
            .field("gen", &self.gen)
            .field("in_flight", &self.in_flight.len())
            .finish()
    }
}

impl Framer {
    /// Forgets every frame (a rollback: their bytes, if appended, are past the committed end).
    pub(crate) fn reset(&mut self) {
        self.gen += 1;
        self.open.clear();
        self.open_hashes.clear();
        self.open_claimed = false;
        self.in_flight.clear();
        self.ready.clear();
        self.placed.clear();
    }

    /// No frame open, in flight or waiting.
    pub(crate) fn idle(&self) -> bool {
        self.open_hashes.is_empty() && self.in_flight.is_empty() && self.ready.is_empty()
    }

    /// The place a placeholder stands for (a location that is not one is returned as is).
    pub(crate) fn resolve(&self, loc: Location) -> Result<Location, StoreError> {
        if loc.segment != PENDING_SEGMENT {
            return Ok(loc);
        }
        self.placed
            .get(&loc.offset)
            .and_then(|slots| slots.get(usize::from(loc.slot).wrapping_sub(1)))
            .copied()
            .ok_or_else(|| {
                StoreError::Compression(format!(
                    "internal error: page {} of frame {} was never written; the snapshot was \
                     not committed (abort and retry; please report this)",
                    loc.slot, loc.offset
                ))
            })
    }
}

/// Frames in flight at most, per compression thread.
const IN_FLIGHT_PER_THREAD: usize = 4;
/// ... and plain bytes in flight at most (large pages).
const IN_FLIGHT_BYTES: usize = 32 << 20;

impl Store {
    /// Whether new pages of this store are compressed.
    pub(super) fn compressing(&self) -> bool {
        self.sb.version >= crate::format::FRAME_FORMAT
            && (self.sb.compression.resolve().0 != Codec::None || self.crypt.is_some())
    }

    /// Adds a new page to the open frame; its placeholder location. `claimed`: `hash` is an id
    /// a caller gave (an encrypted store checks it against the page in a compression thread
    /// before the frame is appended; a wrong one fails the frame, and so the commit).
    pub(super) fn frame_page(
        &mut self,
        data: &[u8],
        hash: [u8; 32],
        claimed: bool,
    ) -> Result<Location, StoreError> {
        let (codec, level) = self.sb.compression.resolve();
        let page = self.sb.page_size;
        let sealer = self.sealer();
        let w = self.log_writer()?;
        let f = &mut w.frames;
        if f.pool
            .as_ref()
            .is_none_or(|p| p.codec != codec || p.level != level)
        {
            // Only between frames: a pool is replaced once nothing is in flight in it.
            if !f.idle() {
                return Err(StoreError::Usage(
                    "the compression changed while a snapshot was being written; abort it and \
                     begin again",
                ));
            }
            f.pool = None;
            f.pool = Some(Pool::new(codec, level, sealer)?);
        }
        let per_frame = frame_pages(page);
        // Incompressible data and nothing in flight: the page goes straight into an extent (no
        // copy into a frame), counted as part of an untried frame.
        let encrypted = self.crypt.is_some();
        let w = self.log_writer()?;
        let f = &mut w.frames;
        if !encrypted
            && f.plain_run >= PLAIN_RUN
            && f.untried + 1 < PROBE_EVERY
            && f.in_flight.is_empty()
            && f.open_hashes.is_empty()
        {
            f.direct += 1;
            if f.direct >= per_frame {
                f.direct = 0;
                f.untried += 1;
            }
            return self.append_page(data);
        }
        // A full frame left by a send that failed (a full disk): sent first, so a frame never
        // holds more than `per_frame` pages. If it still cannot go, this page is not taken.
        if f.open_hashes.len() >= per_frame {
            self.send_frame()?;
        }
        let w = self.log_writer()?;
        let f = &mut w.frames;
        let loc = Location {
            segment: PENDING_SEGMENT,
            offset: f.next_seq,
            len: page,
            slot: u16::try_from(f.open_hashes.len() + 1).unwrap_or(u16::MAX),
        };
        if f.open.capacity() == 0 {
            f.open = f
                .spare
                .pop()
                .unwrap_or_else(|| Vec::with_capacity(per_frame * page as usize));
        }
        f.open.extend_from_slice(data);
        f.open_hashes.push(hash);
        f.open_claimed |= claimed;
        if f.open_hashes.len() >= per_frame {
            self.send_frame()?;
        }
        self.pump(false)?;
        Ok(loc)
    }

    /// Sends the open frame to the pool (waiting for room).
    fn send_frame(&mut self) -> Result<(), StoreError> {
        let cap = {
            let w = self.log_writer()?;
            let f = &mut w.frames;
            if f.open_hashes.is_empty() {
                return Ok(());
            }
            let frame_bytes = f.open.len().max(1);
            (f.pool.as_ref().map_or(1, |p| p.workers.len()) * IN_FLIGHT_PER_THREAD)
                .min(IN_FLIGHT_BYTES / frame_bytes)
                .max(2)
        };
        while self.log_writer()?.frames.in_flight.len() >= cap {
            self.pump(true)?;
        }
        let encrypted = self.crypt.is_some();
        let w = self.log_writer()?;
        let f = &mut w.frames;
        let seq = f.next_seq;
        f.next_seq += 1;
        // Data that does not compress (random, already compressed): most frames skip the
        // attempt and go plain at once (never in an encrypted store: its frames are sealed by
        // the threads).
        if !encrypted && f.plain_run >= PLAIN_RUN && f.untried + 1 < PROBE_EVERY {
            f.untried += 1;
            let done = Done {
                gen: f.gen,
                seq,
                plain: std::mem::take(&mut f.open),
                packed: None,
                codec: Codec::None,
                seal: Seal::Clear,
                crc: None,
                wrong_ids: false,
            };
            f.in_flight.insert(seq, std::mem::take(&mut f.open_hashes));
            f.ready.insert(seq, done);
            return Ok(());
        }
        // Encrypted: every frame goes to the threads to be sealed, but the compression attempt
        // is skipped by the same rule.
        let compress = !(f.plain_run >= PLAIN_RUN && f.untried + 1 < PROBE_EVERY);
        if compress {
            f.untried = 0;
        } else {
            f.untried += 1;
        }
        let claimed =
            (encrypted && std::mem::take(&mut f.open_claimed)).then(|| f.open_hashes.clone());
        let job = Job {
            gen: f.gen,
            seq,
            plain: std::mem::take(&mut f.open),
            compress,
            claimed,
        };
        f.in_flight.insert(seq, std::mem::take(&mut f.open_hashes));
        let sent = f
            .pool
            .as_ref()
            .and_then(|p| p.jobs.as_ref())
            .map(|j| j.send(job));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => Err(threads_gone()),
        }
    }

    /// Appends the frames that are done, in order; with `wait`, first waits for one result.
    fn pump(&mut self, wait: bool) -> Result<(), StoreError> {
        let mut wait = wait;
        loop {
            let w = self.log_writer()?;
            let f = &mut w.frames;
            let Some(pool) = f.pool.as_ref() else {
                return Ok(());
            };
            // Waiting only makes sense while a frame is still being compressed: frames whose
            // append failed (a full disk) are back in `ready`, and no thread will send them.
            let compressing = f.in_flight.keys().any(|k| !f.ready.contains_key(k));
            let got = if wait && compressing {
                match pool.done.recv() {
                    Ok(d) => Some(d),
                    Err(_) => return Err(threads_gone()),
                }
            } else {
                pool.done.try_recv().ok()
            };
            let Some(done) = got else { break };
            if done.gen == f.gen && f.in_flight.contains_key(&done.seq) {
                f.ready.insert(done.seq, done);
                wait = false;
            }
        }
        // In sequence order: the frames come out where the pages went in.
        loop {
            let w = self.log_writer()?;
            let f = &mut w.frames;
            let Some((&seq, _)) = f.in_flight.iter().next() else {
                return Ok(());
            };
            let Some(done) = f.ready.remove(&seq) else {
                return Ok(());
            };
            let hashes = f.in_flight.remove(&seq).unwrap_or_default();
            if let Err(e) = self.append_frame(&done, &hashes) {
                // Kept for the next try (a caller may retry the put, as with a plain page):
                // bytes it appended before failing stay unnamed inside the commit's range.
                let w = self.log_writer()?;
                w.frames.in_flight.insert(seq, hashes);
                w.frames.ready.insert(seq, done);
                return Err(e);
            }
            // Its buffers serve the next frames if they hold a whole frame (a compressed
            // frame's buffer is smaller: dropped).
            let whole = frame_pages(self.sb.page_size) * self.sb.page_size as usize;
            let f = &mut self.log_writer()?.frames;
            for mut b in std::iter::once(done.plain).chain(done.packed) {
                if f.spare.len() < SPARE_BUFFERS && b.capacity() >= whole {
                    b.clear();
                    f.spare.push(b);
                }
            }
        }
    }

    /// Sends the open frame, waits for every frame in flight and appends it.
    pub(super) fn drain_frames(&mut self) -> Result<(), StoreError> {
        self.send_frame()?;
        while !self.log_writer()?.frames.in_flight.is_empty() {
            self.pump(true)?;
        }
        Ok(())
    }

    /// Resolves the placeholders among `refs` (after [`Store::drain_frames`]).
    pub(super) fn resolve_refs<'a>(
        w: &Writer,
        refs: impl Iterator<Item = &'a mut Ref>,
    ) -> Result<(), StoreError> {
        for r in refs {
            r.loc = w.frames.resolve(r.loc)?;
        }
        Ok(())
    }

    /// Appends one finished frame: a frame record, or its pages plain in an extent.
    fn append_frame(&mut self, done: &Done, hashes: &[[u8; 32]]) -> Result<(), StoreError> {
        let page = self.sb.page_size as usize;
        let mut slots = Vec::with_capacity(hashes.len());
        let encrypted = self.crypt.is_some();
        if done.wrong_ids {
            return Err(wrong_page_id());
        }
        let seal = match &done.seal {
            Seal::Failed => return Err(StoreError::Usage("sealing a page frame failed")),
            Seal::Clear if encrypted => {
                return Err(StoreError::Usage(
                    "a page frame in clear in an encrypted store (a bug: please report it)",
                ))
            }
            Seal::Clear => None,
            Seal::Sealed(parts) => Some(parts),
        };
        match (&done.packed, seal, &done.crc) {
            (None, None, _) | (_, _, None) => {
                for p in done.plain.chunks(page) {
                    slots.push(self.append_page(p)?);
                }
                let f = &mut self.log_writer()?.frames;
                f.plain_run = f.plain_run.saturating_add(1);
            }
            (packed, seal, Some(crc)) => {
                let codec = done.codec;
                let payload = packed.as_deref().unwrap_or(&done.plain);
                let loc = self.append_frame_record(
                    codec,
                    hashes.len(),
                    done.plain.len(),
                    seal,
                    payload,
                    crc,
                )?;
                let f = &mut self.log_writer()?.frames;
                if codec != Codec::None {
                    f.plain_run = 0;
                } else {
                    // A sealed frame stored uncompressed (an encrypted store).
                    f.plain_run = f.plain_run.saturating_add(1);
                }
                for k in 0..hashes.len() {
                    slots.push(Location {
                        slot: u16::try_from(k + 1).unwrap_or(u16::MAX),
                        ..loc
                    });
                }
            }
        }
        let w = self.log_writer()?;
        if let Some(d) = w.log.dedup.as_mut() {
            for (h, l) in hashes.iter().zip(&slots) {
                d.insert(*h, *l);
            }
        }
        w.frames.placed.insert(done.seq, slots);
        Ok(())
    }

    /// Appends a frame record holding `payload` (the compressed bytes of `pages` pages, `plain`
    /// bytes in all, or in an encrypted store possibly the pages themselves), sealed with
    /// `seal`'s nonce and tag around it if given; `crc` is the crc32 of the stored payload
    /// (computed by the compression thread). Its location (slot 0).
    fn append_frame_record(
        &mut self,
        codec: Codec,
        pages: usize,
        plain: usize,
        seal: Option<&super::seal::SealParts>,
        payload: &[u8],
        crc: &crc32fast::Hasher,
    ) -> Result<Location, StoreError> {
        self.seal_extent()?;
        let stored = payload.len() + seal.map_or(0, |p| p.nonce().len() + p.tag.len());
        let total = record_len(stored);
        self.reserve3(total as u64)?;
        let io = self.io.clone();
        let w = self.log_writer()?;
        let at = w.buf.len();
        let mut head = [0u8; REC_HEADER];
        head[..4].copy_from_slice(&REC_MAGIC);
        head[4] = Kind::Frame as u8;
        head[5] = codec as u8;
        if seal.is_some() {
            head[6] = super::seal::SEALED;
        }
        head[8..12].copy_from_slice(&u32::try_from(stored).unwrap_or(u32::MAX).to_le_bytes());
        head[12..16].copy_from_slice(&u32::try_from(plain).unwrap_or(u32::MAX).to_le_bytes());
        head[16..24].copy_from_slice(&(pages as u64).to_le_bytes());
        w.buf.extend_from_slice(&head);
        match seal {
            Some(p) => {
                w.buf.extend_from_slice(p.nonce());
                w.buf.extend_from_slice(payload);
                w.buf.extend_from_slice(&p.tag);
            }
            None => w.buf.extend_from_slice(payload),
        }
        // The record's crc32 (header, then the payload's, folded in) and the commit's range
        // crc32 without another pass over the payload.
        let mut rec = crc32fast::Hasher::new();
        rec.update(&head);
        rec.combine(crc);
        let sum = rec.clone().finalize().to_le_bytes();
        w.buf.extend_from_slice(&sum);
        w.buf.resize(at + total, 0);
        rec.update(&w.buf[at + REC_HEADER + stored..]);
        w.log.range_crc.combine(&rec);
        let loc = Location {
            segment: w.seg,
            offset: w.off,
            len: u32::try_from(total).unwrap_or(u32::MAX),
            slot: 0,
        };
        w.off += total as u64;
        w.log.bytes_since_hint += total as u64;
        w.data_appended += stored as u64;
        w.meta_appended += (total - stored) as u64;
        w.touched.insert(w.seg);
        if w.buf.len() >= super::WRITE_BUFFER {
            super::commit::flush_blocks(&*io, w)?;
        }
        Ok(loc)
    }
}

/// A frame record's contents: its codec, page count and plain length, and the compressed bytes.
pub(crate) struct FrameRecord<'a> {
    pub(crate) codec: Codec,
    pub(crate) plain_len: usize,
    pub(crate) packed: &'a [u8],
    /// Sealed (an encrypted store): `packed` is nonce, ciphertext and tag.
    pub(crate) sealed: bool,
}

/// Checks and decodes a frame record from exactly the bytes its location names (crc32, kind,
/// codec, and a page count and plain length that agree with each other and the page size).
pub(crate) fn decode_frame(bytes: &[u8], page_size: u32) -> Result<FrameRecord<'_>, String> {
    let rec = crate::format::decode_record(bytes, Kind::Frame).map_err(|e| e.to_string())?;
    // Stored plain inside a frame (codec 0) only when sealed.
    let sealed = bytes[6] == super::seal::SEALED;
    let codec = match Codec::from_byte(bytes[5]) {
        Some(c) if c != Codec::None || sealed => c,
        _ => return Err(format!("unknown codec {}", bytes[5])),
    };
    if (bytes[6] != 0 && !sealed) || bytes[7] != 0 {
        return Err("reserved header bytes are not zero".into());
    }
    let mut plain = [0u8; 4];
    plain.copy_from_slice(&bytes[12..16]);
    let plain_len = u32::from_le_bytes(plain) as usize;
    let pages = usize::try_from(rec.key).unwrap_or(usize::MAX);
    if pages == 0 || pages > frame_pages(page_size) || plain_len != pages * page_size as usize {
        return Err(format!(
            "a frame of {pages} pages claims {plain_len} plain bytes"
        ));
    }
    Ok(FrameRecord {
        codec,
        plain_len,
        packed: rec.payload,
        sealed,
    })
}

thread_local! {
    static DECOMPRESSOR: std::cell::RefCell<crate::codec::Decompressor> =
        std::cell::RefCell::new(crate::codec::Decompressor::default());
}

/// Decompresses a decoded frame into its plain pages.
pub(crate) fn frame_plain(f: &FrameRecord<'_>) -> Result<Vec<u8>, String> {
    if f.sealed {
        return Err("a sealed frame (the store's key opens it)".into());
    }
    let mut out = vec![0u8; f.plain_len];
    DECOMPRESSOR.with(|d| d.borrow_mut().decompress(f.codec, f.packed, &mut out))?;
    Ok(out)
}

/// Recently decompressed frames (a few: sequential single-page reads, several readers).
#[derive(Debug, Default)]
pub(crate) struct FrameCache(Vec<(Location, Arc<Vec<u8>>)>);

const FRAME_CACHE: usize = 16;
/// ... and plain bytes at most.
const FRAME_CACHE_BYTES: usize = 4 << 20;

impl Store {
    /// The plain pages of the frame record at `frame` (its slot ignored), checked: the record's
    /// crc32, then its decompression to exactly its plain length. Pages are checked by the caller
    /// (each against its blake3).
    pub(super) fn read_frame(&self, frame: Location) -> Result<Arc<Vec<u8>>, StoreError> {
        let frame = Location { slot: 0, ..frame };
        if let Some(p) = self.cached_frame(frame) {
            return Ok(p);
        }
        let bytes = self.read_frame_bytes(frame)?;
        let plain = Arc::new(self.decode_frame_at(frame, &bytes)?);
        self.cache_frame(frame, plain.clone());
        Ok(plain)
    }

    /// A decompressed frame from the cache.
    fn cached_frame(&self, frame: Location) -> Option<Arc<Vec<u8>>> {
        let cache = self.frame_cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .0
            .iter()
            .find(|(l, _)| *l == frame)
            .map(|(_, p)| p.clone())
    }

    /// Keeps a decompressed frame (the oldest one goes when the cache is full).
    fn cache_frame(&self, frame: Location, plain: Arc<Vec<u8>>) {
        let mut cache = self.frame_cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.0.iter().any(|(l, _)| *l == frame) {
            return;
        }
        let limit = (FRAME_CACHE_BYTES / plain.len().max(1)).clamp(1, FRAME_CACHE);
        while cache.0.len() >= limit {
            cache.0.remove(0);
        }
        cache.0.push((frame, plain));
    }

    /// The raw bytes of the frame record at `frame`.
    pub(super) fn read_frame_bytes(&self, frame: Location) -> Result<Vec<u8>, StoreError> {
        let io = &*self.io;
        let name = crate::format::seg_name(frame.segment);
        let max = crate::format::record_len(
            frame_pages(self.sb.page_size) * self.sb.page_size as usize
                + super::seal::SEAL_OVERHEAD,
        );
        if self.segments().binary_search(&frame.segment).is_err()
            || frame.offset < crate::format::SEG_HEADER
            || frame.len as usize > max
        {
            return Err(super::corrupt(
                io,
                &name,
                "page frame",
                frame.offset,
                "implausible frame location",
            ));
        }
        let mut buf = Vec::with_capacity(frame.len as usize);
        self.read_span_into(
            &Ref {
                hash: [0; 32],
                loc: frame,
            },
            &mut buf,
        )?;
        Ok(buf)
    }

    /// Decodes and decompresses the frame record `bytes` read from `frame`.
    pub(super) fn decode_frame_at(
        &self,
        frame: Location,
        bytes: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        let name = crate::format::seg_name(frame.segment);
        let f = decode_frame(bytes, self.sb.page_size)
            .map_err(|e| super::corrupt(&*self.io, &name, "page frame", frame.offset, e))?;
        let plain = if f.sealed || self.crypt.is_some() {
            super::seal::open_frame(self.crypt.as_deref(), bytes, &f)
        } else {
            frame_plain(&f)
        };
        plain.map_err(|e| super::corrupt(&*self.io, &name, "page frame", frame.offset, e))
    }

    /// A page's bytes from a frame (`r.loc.slot > 0`), checked against its blake3.
    pub(super) fn read_framed_page(&self, r: &Ref) -> Result<Vec<u8>, StoreError> {
        let plain = self.read_frame(r.loc)?;
        let page = self.sb.page_size as usize;
        let k = usize::from(r.loc.slot) - 1;
        let name = crate::format::seg_name(r.loc.segment);
        let Some(bytes) = plain.get(k * page..(k + 1) * page) else {
            return Err(super::corrupt(
                &*self.io,
                &name,
                "page frame",
                r.loc.offset,
                format!("no page {k} in the frame"),
            ));
        };
        if self.page_id(bytes) != r.hash {
            return Err(super::corrupt(
                &*self.io,
                &name,
                "page",
                r.loc.offset,
                format!("page {k} of the frame does not match its blake3 hash"),
            ));
        }
        Ok(bytes.to_vec())
    }

    /// Forgets decompressed frames (a rollback may reuse their places).
    pub(super) fn forget_frames(&self) {
        self.frame_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clear();
    }
}

impl Store {
    /// [`Store::read_refs_into`] for the framed pages from `refs[i]` on: the frames they name
    /// that lie back to back in a segment are read with one `pread` (up to `RUN_BYTES`), each
    /// decompressed once, and every page checked against its blake3. Returns where the framed
    /// run ends.
    pub(super) fn read_framed_run(
        &self,
        refs: &[Ref],
        i: usize,
        out: &mut Vec<u8>,
    ) -> Result<usize, StoreError> {
        let frame_of = |r: &Ref| Location { slot: 0, ..r.loc };
        let first = frame_of(&refs[i]);
        let max = crate::format::record_len(
            frame_pages(self.sb.page_size) * self.sb.page_size as usize
                + super::seal::SEAL_OVERHEAD,
        ) as u64;
        if let Some(r) = refs[i..]
            .iter()
            .take_while(|r| r.loc.slot > 0)
            .find(|r| u64::from(r.loc.len) > max)
        {
            return Err(super::corrupt(
                &*self.io,
                &crate::format::seg_name(r.loc.segment),
                "page frame",
                r.loc.offset,
                "implausible frame length",
            ));
        }
        let mut last = first;
        let mut j = i + 1;
        while j < refs.len() && refs[j].loc.slot > 0 {
            let f = frame_of(&refs[j]);
            if f != last {
                let next = f.segment == last.segment
                    && f.offset == last.offset + u64::from(last.len)
                    && f.offset + u64::from(f.len) - first.offset <= super::read::RUN_BYTES;
                if !next {
                    break;
                }
                last = f;
            }
            j += 1;
        }
        let span = Location {
            len: u32::try_from(last.offset + u64::from(last.len) - first.offset)
                .unwrap_or(u32::MAX),
            ..first
        };
        let mut bytes = Vec::with_capacity(span.len as usize);
        self.read_span_into(
            &Ref {
                hash: [0; 32],
                loc: span,
            },
            &mut bytes,
        )?;
        let page = self.sb.page_size as usize;
        let start = out.len();
        // The first and last frames of a run are often also read by the run before or after it
        // (restore reads runs of consecutive pages on every core): those go through the cache.
        let mut current: Option<(Location, Arc<Vec<u8>>)> = None;
        for r in &refs[i..j] {
            let f = frame_of(r);
            if current.as_ref().is_none_or(|(l, _)| *l != f) {
                let edge = f == first || f == last;
                let cached = if edge { self.cached_frame(f) } else { None };
                let plain = match cached {
                    Some(p) => p,
                    None => {
                        let from = (f.offset - first.offset) as usize;
                        let rec = bytes
                            .get(from..from + f.len as usize)
                            .ok_or(StoreError::Usage("frame outside the span read"))?;
                        let plain = Arc::new(
                            self.decode_frame_at(f, rec)
                                .inspect_err(|_| out.truncate(start))?,
                        );
                        if edge {
                            self.cache_frame(f, plain.clone());
                        }
                        plain
                    }
                };
                current = Some((f, plain));
            }
            let Some((_, plain)) = current.as_ref() else {
                return Err(StoreError::Usage("no frame"));
            };
            let k = usize::from(r.loc.slot) - 1;
            match plain.get(k * page..(k + 1) * page) {
                Some(p) => out.extend_from_slice(p),
                None => {
                    out.truncate(start);
                    return Err(super::corrupt(
                        &*self.io,
                        &crate::format::seg_name(f.segment),
                        "page frame",
                        f.offset,
                        format!("no page {k} in the frame"),
                    ));
                }
            }
        }
        self.check_pages_read(&refs[i..j], out, start)?;
        Ok(j)
    }
}

impl Store {
    /// The number of pages the frame record at `frame` holds, from its header.
    pub(super) fn frame_pages(&self, frame: Location) -> Result<u64, StoreError> {
        let name = crate::format::seg_name(frame.segment);
        let mut head = [0u8; REC_HEADER];
        self.io
            .read(&name, frame.offset, &mut head)
            .map_err(super::io_err(&*self.io, &name, "read frame header"))?;
        let mut key = [0u8; 8];
        key.copy_from_slice(&head[16..24]);
        let n = u64::from_le_bytes(key);
        if head[..4] != REC_MAGIC
            || head[4] != Kind::Frame as u8
            || n == 0
            || n > frame_pages(self.sb.page_size) as u64
        {
            return Err(super::corrupt(
                &*self.io,
                &name,
                "page frame",
                frame.offset,
                "not a frame record header",
            ));
        }
        Ok(n)
    }
}

impl Store {
    /// The compression new pages get ([`crate::Compression::None`] before format 4).
    pub fn compression(&self) -> crate::Compression {
        if self.sb.version >= crate::format::FRAME_FORMAT {
            self.sb.compression
        } else {
            crate::Compression::None
        }
    }

    /// Sets the compression of pages written from now on (pages already stored keep theirs);
    /// durable when it returns (a superblock write). A format 3 store is upgraded first
    /// ([`Store::upgrade`]): `Usage` says so.
    pub fn set_compression(&mut self, c: crate::Compression) -> Result<(), StoreError> {
        self.settle()?;
        self.idle_writer("a snapshot is being written; commit or abort it first")?;
        if self.sb.version < crate::format::FRAME_FORMAT {
            return Err(StoreError::Usage(
                "this store's format has no compression; run `pagesnap upgrade` first",
            ));
        }
        let (codec, level) = c.resolve();
        Compressor::new(codec, level).map_err(StoreError::Compression)?;
        let old = self.sb.compression;
        self.sb.compression = c;
        self.write_hint().inspect_err(|_| self.sb.compression = old)
    }

    /// Format 3 to 4: every format 3 record is a format 4 record, so the superblock's version
    /// (written to both slots, a hint) is the whole change. Compression stays off until
    /// [`Store::set_compression`]. Returns the snapshots the store holds.
    pub(super) fn upgrade_log(&mut self) -> Result<usize, StoreError> {
        if self.sb.version >= crate::format::FRAME_FORMAT {
            return Ok(0);
        }
        self.settle()?;
        self.idle_writer("a snapshot is being written; commit or abort it before upgrading")?;
        let old = (self.sb.version, self.sb.compression);
        self.sb.version = crate::format::FRAME_FORMAT;
        self.sb.compression = crate::Compression::None;
        self.write_hint().inspect_err(|_| {
            (self.sb.version, self.sb.compression) = old;
        })?;
        Ok(self.catalog.manifests.len())
    }
}

/// The error when a caller's page id is not the store's id of the page.
pub(super) fn wrong_page_id() -> StoreError {
    StoreError::Usage(
        "a page was given with an id that is not this store's id of it (an encrypted store's ids \
         are keyed: hash pages with Store::page_ids); nothing was committed",
    )
}

/// The error when the compression threads are gone (a thread could not be started, or died).
fn threads_gone() -> StoreError {
    StoreError::Compression(
        "the compression threads stopped; the snapshot was not committed (abort and retry, or \
         set the compression to none)"
            .into(),
    )
}
