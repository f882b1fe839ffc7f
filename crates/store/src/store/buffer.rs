//! The writer's buffer of appended records not yet written, laid out so that its whole blocks can
//! be written in bulk ([`Storage::write_bulk`]) by a second thread.
//!
//! [`crate::FsStorage`] writes bulk blocks through the page cache and bounds their writeback
//! (each write's writeback started at once, the 8 MiB window two behind waited for and dropped
//! from the cache), or past the cache with `O_DIRECT` when asked. Direct I/O wants the file
//! offset, the length and the memory address all multiples of [`DIRECT_ALIGN`]. Records are not
//! block-sized, so the buffer keeps its bytes at the same position within a block in memory as in
//! the file: logical byte 0 (file offset `start`) sits `start % DIRECT_ALIGN` bytes into a
//! block-aligned allocation. A flush then writes the partial block at the front through the page
//! cache, every whole block after it in bulk, and either writes the partial block at the end
//! through the page cache (a full flush, before a sync) or moves it to the front of a fresh
//! buffer, where it is block-aligned (a flush of whole blocks, while a commit goes on). Bytes
//! already committed are never written again.
//!
//! A bulk write may wait for the device, so where the backend says appends gain from it
//! ([`Storage::write_behind`]) the whole blocks are handed to a writer thread and the caller
//! goes on filling the next buffer: at most [`DEPTH`] buffers are in flight, and a full flush
//! waits for all of them (and reports the first error) before it returns, so that the sync that
//! follows covers every byte. The thread writes in the order it is given; nothing else writes
//! the ranges it holds, since every other write of the store (a record's partial blocks, a
//! segment header, a trim, a hint) comes after a full flush or lies in other blocks. Backends
//! that do not ask for it (the fault-injecting one) see every write on the caller's thread, in
//! order, as before.

use crate::storage::{SharedStorage, Storage, DIRECT_ALIGN};
use rkyv::util::AlignedVec;
use std::io;
use std::ops::{Deref, DerefMut};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::Mutex;

/// Buffers the writer thread holds at most (about a megabyte each): enough for the device to
/// have several writes queued (a 1 GiB first snapshot: 0.54–0.63 s with 2, 0.45–0.49 s with 8).
const DEPTH: usize = 8;

type Block = AlignedVec<DIRECT_ALIGN>;

/// A bulk write for the writer thread: `bytes[range]` at `offset` of file `name`.
struct Job {
    name: String,
    offset: u64,
    bytes: Block,
    range: std::ops::Range<usize>,
}

/// The writer thread's end of a job: the buffer back, and how its write went.
type Done = (Block, io::Result<()>);

struct WriteBehind {
    jobs: Option<SyncSender<Job>>,
    /// In a mutex only so that the store stays `Sync`; reached through `&mut` (no locking).
    done: Mutex<Receiver<Done>>,
    in_flight: usize,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WriteBehind {
    fn start(io: SharedStorage) -> Option<WriteBehind> {
        let (jobs, rx) = sync_channel::<Job>(DEPTH);
        let (tx, done) = sync_channel::<Done>(DEPTH);
        let thread = std::thread::Builder::new()
            .name("pagesnap-write".into())
            .spawn(move || {
                for job in rx {
                    let r = io.write_bulk(&job.name, job.offset, &job.bytes[job.range.clone()]);
                    if tx.send((job.bytes, r)).is_err() {
                        break;
                    }
                }
            })
            .ok()?; // no thread: the caller writes itself
        Some(WriteBehind {
            jobs: Some(jobs),
            done: Mutex::new(done),
            in_flight: 0,
            thread: Some(thread),
        })
    }

    /// Buffers of writes done, without waiting (an error is returned).
    fn take_done(&mut self, spare: &mut Vec<Block>) -> io::Result<()> {
        while self.in_flight > 0 {
            let got = self
                .done
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .try_recv();
            match got {
                Ok((bytes, r)) => {
                    self.in_flight -= 1;
                    r?;
                    spare.push(bytes);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Err(self.stopped()),
            }
        }
        Ok(())
    }

    /// Waits for one write; its buffer for reuse.
    fn take_one(&mut self) -> io::Result<Block> {
        let got = self
            .done
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .recv();
        let Ok((bytes, r)) = got else {
            return Err(self.stopped());
        };
        self.in_flight -= 1;
        r.map(|()| bytes)
    }

    /// The writer thread is gone (its backend panicked): the writes it held are lost, and
    /// nothing is in flight any more.
    fn stopped(&mut self) -> io::Error {
        self.in_flight = 0;
        self.jobs = None;
        io::Error::other("the store's writer thread stopped (its backend panicked)")
    }
}

impl Drop for WriteBehind {
    fn drop(&mut self) {
        self.jobs = None; // the thread ends when the jobs queued before are written
        while self.in_flight > 0 {
            let _ = self.take_one(); // counts the write down, or everything if the thread died
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Bytes appended at the end of a segment and not yet written; see the module comment.
pub(super) struct LogBuffer {
    /// `lead` bytes of padding, then the buffered bytes.
    bytes: Block,
    lead: usize,
    capacity: usize,
    io: SharedStorage,
    behind: Option<WriteBehind>,
    /// Buffers back from the writer thread.
    spare: Vec<Block>,
    /// A write failed (its bytes are not in the file): every later write of this buffer fails
    /// too, until the position moves back over them (`restart`, by a rollback), so no commit
    /// that appended them can be acknowledged.
    failed: Option<(io::ErrorKind, String)>,
}

impl LogBuffer {
    /// An empty buffer with room for `capacity` bytes, whose first byte goes to file offset `at`;
    /// its whole blocks are written through `io`.
    pub(super) fn new(capacity: usize, at: u64, io: SharedStorage) -> Self {
        let mut b = LogBuffer {
            bytes: Block::with_capacity(capacity + DIRECT_ALIGN),
            lead: 0,
            capacity,
            io,
            behind: None,
            spare: Vec::new(),
            failed: None,
        };
        b.restart(at);
        b
    }

    /// Empties the buffer; its next byte goes to file offset `at`. Writes still in flight are
    /// waited for first (a rollback moves the position back over them), their errors dropped:
    /// what they wrote lies past every committed byte.
    pub(super) fn restart(&mut self, at: u64) {
        let _ = self.drain();
        self.failed = None;
        self.lead = offset_in_block(at);
        self.bytes.clear();
        self.bytes.resize(self.lead, 0);
    }

    pub(super) fn extend_from_slice(&mut self, data: &[u8]) {
        self.bytes.extend_from_slice(data);
    }

    /// Sets the buffered length to `len`, filling with `value`.
    pub(super) fn resize(&mut self, len: usize, value: u8) {
        self.bytes.resize(self.lead + len, value);
    }

    /// Waits for every write in flight; the first error.
    fn drain(&mut self) -> io::Result<()> {
        let mut first = Ok(());
        if let Some(b) = self.behind.as_mut() {
            while b.in_flight > 0 {
                match b.take_one() {
                    Ok(bytes) => self.spare.push(bytes),
                    Err(e) => {
                        if first.is_ok() {
                            first = Err(e);
                        }
                    }
                }
            }
        }
        first
    }

    /// Writes the buffer, which ends at `end` in file `name`: the partial block at the front
    /// through the page cache, whole blocks in bulk, and the partial block at the end through
    /// the page cache if `all`, else kept (then the buffer holds it alone, block-aligned). With
    /// `all`, every write has reached the file when this returns `Ok`.
    pub(super) fn write_out(
        &mut self,
        io: &dyn Storage,
        name: &str,
        end: u64,
        all: bool,
    ) -> io::Result<()> {
        if let Some((kind, msg)) = &self.failed {
            return Err(io::Error::new(
                *kind,
                format!("an earlier write of this commit failed: {msg}"),
            ));
        }
        let r = self.write_blocks(io, name, end, all);
        if let Err(e) = &r {
            self.failed = Some((e.kind(), e.to_string()));
        }
        r
    }

    fn write_blocks(
        &mut self,
        io: &dyn Storage,
        name: &str,
        end: u64,
        all: bool,
    ) -> io::Result<()> {
        let len = self.len() as u64;
        let start = end - len;
        let align = DIRECT_ALIGN as u64;
        // A buffer not laid out for `start` (its lead is stale) is written through the cache.
        let laid_out = offset_in_block(start) == self.lead;
        let first = start.div_ceil(align) * align;
        let last = end / align * align;
        if !laid_out || first >= last {
            if all {
                self.drain()?;
                io.write(name, start, self)?;
                let _ = io.start_writeback(name, start, len);
                self.restart(end);
            }
            return Ok(());
        }
        let (a, b) = (to_index(first - start), to_index(last - start));
        if a > 0 {
            io.write(name, start, &self[..a])?;
        }
        let blocks = self.lead + a..self.lead + b;
        if self.behind.is_none() && io.write_behind() {
            self.behind = WriteBehind::start(self.io.clone());
        }
        match self.behind.as_mut() {
            Some(behind) => {
                // A fresh buffer for what follows, starting with the tail (less than a block).
                behind.take_done(&mut self.spare)?;
                let mut next = match self.spare.pop() {
                    Some(bytes) => bytes,
                    None if behind.in_flight >= DEPTH => behind.take_one()?,
                    None => Block::with_capacity(self.capacity + DIRECT_ALIGN),
                };
                next.clear();
                next.extend_from_slice(&self.bytes[self.lead + b..]);
                let bytes = std::mem::replace(&mut self.bytes, next);
                self.lead = 0;
                let Some(jobs) = behind.jobs.as_ref() else {
                    return Err(io::Error::other("the store's writer thread stopped"));
                };
                jobs.send(Job {
                    name: name.to_string(),
                    offset: first,
                    bytes,
                    range: blocks,
                })
                .map_err(|_| io::Error::other("the store's writer thread stopped"))?;
                behind.in_flight += 1;
            }
            None => {
                io.write_bulk(name, first, &self.bytes[blocks])?;
                // The tail, block-aligned at the front (less than a block: a short copy).
                let from = self.lead + b;
                let tail = self.bytes.len() - from;
                self.bytes.copy_within(from.., 0);
                self.bytes.resize(tail, 0);
                self.lead = 0;
            }
        }
        if all {
            // Every bulk write done before the tail goes through the cache: on a kernel with
            // pages larger than a block, the tail's cache page covers blocks written in bulk
            // (past the cache, when asked).
            self.drain()?;
            if last < end {
                io.write(name, last, self)?;
            }
            self.restart(end);
        }
        Ok(())
    }
}

fn offset_in_block(at: u64) -> usize {
    // Less than DIRECT_ALIGN: fits.
    (at % DIRECT_ALIGN as u64) as usize
}

fn to_index(n: u64) -> usize {
    // At most the buffer's length, which is a usize.
    usize::try_from(n).unwrap_or(usize::MAX)
}

impl Deref for LogBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[self.lead..]
    }
}

impl DerefMut for LogBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.lead..]
    }
}
