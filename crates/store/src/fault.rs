//! An in-memory [`Storage`] that fails or crashes on demand, for tests (SQLite's crash VFS and
//! FoundationDB's non-durable file are the model).
//!
//! Every operation has an index (0, 1, 2, …). A [`FaultPlan`] can make operation *n* fail with an
//! I/O error (ENOSPC, EIO) and carry on, or *crash*: operation *n* and every later one fail, and
//! [`FaultyStorage::crash_image`] then gives the directory as a machine would find it after the
//! crash. In that image:
//! - data written since a file's last `sync` lands whole, partly (a torn prefix), garbled (random
//!   bytes over the written range) or not at all — each write independently, chosen by a seed;
//! - a `set_len` since the last `sync` happens or not;
//! - creations, renames and removals since the last `sync_dir` are kept as an in-order prefix of
//!   their log (metadata journals replay in order): any prefix, chosen by the seed;
//! - everything synced is there exactly.
//!
//! [`Intercept`] wraps any backend with a test's hook on every operation: to fail one with a
//! chosen error, panic in it, hold it, or run something else at that moment.

use crate::storage::{LockGuard, Storage};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// When to fail or crash.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// Operation index at which the "machine" crashes: it and every later operation fail.
    pub crash_at: Option<u64>,
    /// Operation index that fails with this OS error number (28 = ENOSPC, 5 = EIO).
    pub fail_at: Option<(u64, i32)>,
    /// How many operations from `fail_at` on fail (0 counts as 1): a disk that stays full.
    pub fail_count: u64,
    /// Only operations on this file fail (and count towards `fail_count`).
    pub fail_only: Option<&'static str>,
}

#[derive(Clone, Debug)]
enum Pending {
    Data { offset: u64, bytes: Vec<u8> },
    SetLen(u64),
}

#[derive(Clone, Debug, Default)]
struct Inode {
    durable: Vec<u8>,
    current: Vec<u8>,
    pending: Vec<Pending>,
    /// When each pending operation was issued (the backend's operation count).
    pending_at: Vec<u64>,
}

#[derive(Clone, Debug)]
enum DirOp {
    Link(String, u64),
    Unlink(String),
}

#[derive(Debug, Default)]
struct State {
    inodes: BTreeMap<u64, Inode>,
    next_inode: u64,
    names: BTreeMap<String, u64>,
    durable_names: BTreeMap<String, u64>,
    dir_log: Vec<DirOp>,
    ops: u64,
    plan: FaultPlan,
    failed: u64,
    crashed: bool,
    locks: BTreeSet<String>,
}

/// The in-memory, fault-injecting backend.
#[derive(Debug, Clone)]
pub struct FaultyStorage {
    state: Arc<Mutex<State>>,
    dir: PathBuf,
}

impl Default for FaultyStorage {
    fn default() -> Self {
        Self::new()
    }
}

/// SplitMix64: a small deterministic generator, for crash fates and for tests' workloads.
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

fn apply(content: &mut Vec<u8>, p: &Pending) {
    match p {
        Pending::Data { offset, bytes } => write_into(content, *offset, bytes),
        Pending::SetLen(len) => content.resize(usize::try_from(*len).unwrap_or(usize::MAX), 0),
    }
}

fn write_into(content: &mut Vec<u8>, offset: u64, bytes: &[u8]) {
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    let end = start.saturating_add(bytes.len());
    if content.len() < end {
        content.resize(end, 0);
    }
    content[start..end].copy_from_slice(bytes);
}

fn crashed() -> io::Error {
    io::Error::other("simulated crash: the machine is down")
}

fn not_found(name: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{name}: no such file"))
}

impl FaultyStorage {
    /// An empty directory with no faults planned.
    pub fn new() -> Self {
        FaultyStorage {
            state: Arc::new(Mutex::new(State::default())),
            dir: PathBuf::from("<memory>"),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the fault plan; operation indices count from the next operation.
    pub fn set_plan(&self, plan: FaultPlan) {
        let mut s = self.lock();
        s.failed = 0;
        let base = s.ops;
        s.plan = FaultPlan {
            crash_at: plan.crash_at.map(|n| n + base),
            fail_at: plan.fail_at.map(|(n, e)| (n + base, e)),
            fail_count: plan.fail_count,
            fail_only: plan.fail_only,
        };
    }

    /// Operations performed so far.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// True once a planned crash happened.
    pub fn has_crashed(&self) -> bool {
        self.lock().crashed
    }

    /// The directory as it would be found after a crash now, with fates chosen by `seed`. The
    /// image is a new, fault-free backend with everything durable. Each write not yet synced
    /// lands, is lost, is torn or lands as garbage, independently; one seed in four (`seed % 4
    /// == 3`) instead loses every unsynced operation issued before a moment the seed chooses,
    /// in every file, and lands every one issued after it (a device that persisted the later
    /// writes first: what a record whose checksum covers only the bytes after some point must
    /// survive).
    pub fn crash_image(&self, seed: u64) -> FaultyStorage {
        let s = self.lock();
        let mut rng = SplitMix64(seed);
        let keep = rng.below(s.dir_log.len() as u64 + 1) as usize;
        let mut names = s.durable_names.clone();
        for op in &s.dir_log[..keep] {
            match op {
                DirOp::Link(name, ino) => {
                    names.insert(name.clone(), *ino);
                }
                DirOp::Unlink(name) => {
                    names.remove(name);
                }
            }
        }
        // The moment before which every unsynced operation is lost (in the seeds that cut).
        let cut = (seed % 4 == 3).then(|| {
            let mut at: Vec<u64> = names
                .values()
                .filter_map(|ino| s.inodes.get(ino))
                .flat_map(|n| n.pending_at.iter().copied())
                .collect();
            at.sort_unstable();
            at.get(rng.below(at.len() as u64 + 1) as usize)
                .copied()
                .unwrap_or(u64::MAX)
        });
        let mut inodes = BTreeMap::new();
        for ino in names.values() {
            let Some(node) = s.inodes.get(ino) else {
                continue;
            };
            let mut content = node.durable.clone();
            if let Some(cut) = cut {
                for (p, at) in node.pending.iter().zip(&node.pending_at) {
                    if *at >= cut {
                        apply(&mut content, p);
                    }
                }
            } else {
                Self::random_fates(&mut content, &node.pending, &mut rng);
            }
            inodes.insert(
                *ino,
                Inode {
                    durable: content.clone(),
                    current: content,
                    pending: Vec::new(),
                    pending_at: Vec::new(),
                },
            );
        }
        let state = State {
            inodes,
            next_inode: s.next_inode,
            durable_names: names.clone(),
            names,
            ..State::default()
        };
        FaultyStorage {
            state: Arc::new(Mutex::new(state)),
            dir: self.dir.clone(),
        }
    }

    /// Each unsynced operation's fate, independently: lost, landed, torn (writes) or garbage.
    fn random_fates(content: &mut Vec<u8>, pending: &[Pending], rng: &mut SplitMix64) {
        for p in pending {
            match (p, rng.below(4)) {
                (_, 0) => {}
                (Pending::SetLen(_), _) => apply(content, p),
                (Pending::Data { .. }, 1) => apply(content, p),
                (Pending::Data { offset, bytes }, 2) => {
                    // Torn: a prefix, cut at a 512-byte sector or anywhere.
                    let cut = rng.below(bytes.len() as u64 + 1) as usize;
                    write_into(content, *offset, &bytes[..cut]);
                }
                (Pending::Data { offset, bytes }, _) => {
                    let garbage: Vec<u8> = (0..bytes.len()).map(|_| rng.next_u64() as u8).collect();
                    write_into(content, *offset, &garbage);
                }
            }
        }
    }

    /// Flips bit `bit` of byte `offset` of `name`, durably (media corruption).
    pub fn flip_bit(&self, name: &str, offset: u64, bit: u8) -> io::Result<()> {
        let mut s = self.lock();
        let ino = *s.names.get(name).ok_or_else(|| not_found(name))?;
        let node = s.inodes.get_mut(&ino).ok_or_else(|| not_found(name))?;
        let i = usize::try_from(offset).map_err(io::Error::other)?;
        for content in [&mut node.current, &mut node.durable] {
            if let Some(b) = content.get_mut(i) {
                *b ^= 1 << (bit % 8);
            }
        }
        Ok(())
    }

    /// A file's current bytes (for tests).
    pub fn contents(&self, name: &str) -> Option<Vec<u8>> {
        let s = self.lock();
        s.names
            .get(name)
            .and_then(|i| s.inodes.get(i))
            .map(|n| n.current.clone())
    }

    /// Counts the operation and applies the plan.
    fn op(&self) -> io::Result<MutexGuard<'_, State>> {
        self.op_on(None)
    }

    /// Counts an operation on file `name` and applies the plan.
    fn op_on(&self, name: Option<&str>) -> io::Result<MutexGuard<'_, State>> {
        let mut s = self.lock();
        if s.crashed {
            return Err(crashed());
        }
        let n = s.ops;
        s.ops += 1;
        if s.plan.crash_at == Some(n) {
            s.crashed = true;
            return Err(crashed());
        }
        if let Some((at, errno)) = s.plan.fail_at {
            let selected = s.plan.fail_only.is_none_or(|f| name == Some(f));
            if selected && n >= at && s.failed < s.plan.fail_count.max(1) {
                s.failed += 1;
                return Err(io::Error::from_raw_os_error(errno));
            }
        }
        Ok(s)
    }
}

fn inode<'a>(s: &'a mut State, name: &str) -> io::Result<&'a mut Inode> {
    let ino = *s.names.get(name).ok_or_else(|| not_found(name))?;
    s.inodes.get_mut(&ino).ok_or_else(|| not_found(name))
}

#[derive(Debug)]
struct MemLock {
    state: Arc<Mutex<State>>,
    name: String,
}
impl LockGuard for MemLock {}
impl Drop for MemLock {
    fn drop(&mut self) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .locks
            .remove(&self.name);
    }
}

impl Storage for FaultyStorage {
    fn location(&self) -> &Path {
        &self.dir
    }

    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.op()?.names.keys().cloned().collect())
    }

    fn create(&self, name: &str) -> io::Result<()> {
        let mut s = self.op_on(Some(name))?;
        if s.names.contains_key(name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{name} exists"),
            ));
        }
        let ino = s.next_inode;
        s.next_inode += 1;
        s.inodes.insert(ino, Inode::default());
        s.names.insert(name.to_string(), ino);
        s.dir_log.push(DirOp::Link(name.to_string(), ino));
        Ok(())
    }

    fn len(&self, name: &str) -> io::Result<u64> {
        let mut s = self.op_on(Some(name))?;
        Ok(inode(&mut s, name)?.current.len() as u64)
    }

    fn read(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut s = self.op_on(Some(name))?;
        let node = inode(&mut s, name)?;
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| node.current.get(start..end))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{name}: read past the end"),
                )
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write(&self, name: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut s = self.op_on(Some(name))?;
        let at = s.ops;
        let node = inode(&mut s, name)?;
        write_into(&mut node.current, offset, data);
        node.pending.push(Pending::Data {
            offset,
            bytes: data.to_vec(),
        });
        node.pending_at.push(at);
        Ok(())
    }

    fn set_len(&self, name: &str, len: u64) -> io::Result<()> {
        let mut s = self.op_on(Some(name))?;
        let at = s.ops;
        let node = inode(&mut s, name)?;
        let p = Pending::SetLen(len);
        apply(&mut node.current, &p);
        node.pending.push(p);
        node.pending_at.push(at);
        Ok(())
    }

    fn sync(&self, name: &str) -> io::Result<()> {
        let mut s = self.op_on(Some(name))?;
        let node = inode(&mut s, name)?;
        node.durable = node.current.clone();
        node.pending.clear();
        node.pending_at.clear();
        Ok(())
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut s = self.op()?;
        let ino = s.names.remove(from).ok_or_else(|| not_found(from))?;
        s.names.insert(to.to_string(), ino);
        s.dir_log.push(DirOp::Unlink(from.to_string()));
        s.dir_log.push(DirOp::Link(to.to_string(), ino));
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut s = self.op_on(Some(name))?;
        s.names.remove(name).ok_or_else(|| not_found(name))?;
        s.dir_log.push(DirOp::Unlink(name.to_string()));
        Ok(())
    }

    fn sync_dir(&self) -> io::Result<()> {
        let mut s = self.op()?;
        s.durable_names = s.names.clone();
        s.dir_log.clear();
        Ok(())
    }

    fn try_lock(&self, name: &str) -> io::Result<Option<Box<dyn LockGuard>>> {
        let mut s = self.op()?;
        if !s.locks.insert(name.to_string()) {
            return Ok(None);
        }
        Ok(Some(Box::new(MemLock {
            state: self.state.clone(),
            name: name.to_string(),
        })))
    }
}

/// One storage operation, as an [`Intercept`] hook sees it.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum Op<'a> {
    /// [`Storage::list`].
    List,
    /// [`Storage::create`].
    Create(&'a str),
    /// [`Storage::len`].
    Len(&'a str),
    /// [`Storage::read`] of `len` bytes at `offset`.
    Read {
        /// The file.
        name: &'a str,
        /// Where.
        offset: u64,
        /// How many bytes.
        len: usize,
    },
    /// [`Storage::write`] of `data` at `offset`.
    Write {
        /// The file.
        name: &'a str,
        /// Where.
        offset: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// [`Storage::set_len`].
    SetLen(&'a str, u64),
    /// [`Storage::sync`].
    Sync(&'a str),
    /// [`Storage::rename`] (from, to).
    Rename(&'a str, &'a str),
    /// [`Storage::remove`].
    Remove(&'a str),
    /// [`Storage::sync_dir`].
    SyncDir,
    /// [`Storage::try_lock`].
    TryLock(&'a str),
}

type Before = Box<dyn Fn(&Op<'_>) -> io::Result<()> + Send + Sync>;
type After = Box<dyn Fn(&Op<'_>) + Send + Sync>;

/// A [`Storage`] that runs a test's hook before each operation of another backend (and,
/// optionally, one after each that succeeded): to fail an operation with a chosen error (the hook
/// returns it and the operation is not done), panic in it, block it on a channel, or run another
/// writer's whole session at a chosen moment.
pub struct Intercept {
    inner: Arc<dyn Storage>,
    before: Before,
    after: Option<After>,
}

impl std::fmt::Debug for Intercept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intercept")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl Intercept {
    /// `inner`, with `before` run before each operation; an `Err` from it fails the operation.
    pub fn new(
        inner: Arc<dyn Storage>,
        before: impl Fn(&Op<'_>) -> io::Result<()> + Send + Sync + 'static,
    ) -> Self {
        Intercept {
            inner,
            before: Box::new(before),
            after: None,
        }
    }

    /// Also runs `after` once an operation has succeeded.
    pub fn after(mut self, after: impl Fn(&Op<'_>) + Send + Sync + 'static) -> Self {
        self.after = Some(Box::new(after));
        self
    }

    fn run<R>(&self, op: Op<'_>, f: impl FnOnce(&dyn Storage) -> io::Result<R>) -> io::Result<R> {
        (self.before)(&op)?;
        let r = f(&*self.inner)?;
        if let Some(after) = &self.after {
            after(&op);
        }
        Ok(r)
    }
}

impl Storage for Intercept {
    fn location(&self) -> &Path {
        self.inner.location()
    }
    fn list(&self) -> io::Result<Vec<String>> {
        self.run(Op::List, |s| s.list())
    }
    fn create(&self, name: &str) -> io::Result<()> {
        self.run(Op::Create(name), |s| s.create(name))
    }
    fn len(&self, name: &str) -> io::Result<u64> {
        self.run(Op::Len(name), |s| s.len(name))
    }
    fn read(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len();
        self.run(Op::Read { name, offset, len }, |s| {
            s.read(name, offset, buf)
        })
    }
    fn write(&self, name: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        self.run(Op::Write { name, offset, data }, |s| {
            s.write(name, offset, data)
        })
    }
    fn set_len(&self, name: &str, len: u64) -> io::Result<()> {
        self.run(Op::SetLen(name, len), |s| s.set_len(name, len))
    }
    fn sync(&self, name: &str) -> io::Result<()> {
        self.run(Op::Sync(name), |s| s.sync(name))
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.run(Op::Rename(from, to), |s| s.rename(from, to))
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.run(Op::Remove(name), |s| s.remove(name))
    }
    fn sync_dir(&self) -> io::Result<()> {
        self.run(Op::SyncDir, |s| s.sync_dir())
    }
    fn try_lock(&self, name: &str) -> io::Result<Option<Box<dyn LockGuard>>> {
        self.run(Op::TryLock(name), |s| s.try_lock(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synced_data_survives_and_unsynced_creations_may_vanish() {
        let fs = FaultyStorage::new();
        fs.create("a").expect("create");
        fs.write("a", 0, b"hello").expect("write");
        fs.sync("a").expect("sync");
        fs.sync_dir().expect("dir");
        fs.write("a", 5, b" world").expect("write");
        fs.create("b").expect("create");
        let mut seen_whole = false;
        let mut seen_lost = false;
        let mut seen_b = [false, false];
        for seed in 0..64 {
            let img = fs.crash_image(seed);
            let a = img.contents("a").expect("synced file survives");
            assert_eq!(&a[..5], b"hello", "synced bytes changed");
            seen_whole |= a == b"hello world";
            seen_lost |= a == b"hello";
            seen_b[usize::from(img.contents("b").is_some())] = true;
        }
        assert!(seen_whole && seen_lost && seen_b == [true, true]);
    }

    /// The seeds that cut (`seed % 4 == 3`) lose every unsynced operation before a moment and
    /// land every one after it, across files: a later write may survive an earlier one, in
    /// another file too, but never the other way round; and some cut keeps each split.
    #[test]
    fn a_cut_loses_the_older_unsynced_writes_and_lands_the_newer() {
        let fs = FaultyStorage::new();
        for f in ["a", "b"] {
            fs.create(f).expect("create");
            fs.write(f, 0, b"....").expect("write");
            fs.sync(f).expect("sync");
        }
        fs.sync_dir().expect("dir");
        fs.write("a", 0, b"1").expect("write");
        fs.write("b", 1, b"2").expect("write");
        fs.write("a", 2, b"3").expect("write");
        let mut seen = std::collections::BTreeSet::new();
        for seed in (0..256).filter(|s| s % 4 == 3) {
            let img = fs.crash_image(seed);
            let (a, b) = (img.contents("a").expect("a"), img.contents("b").expect("b"));
            let landed = [a[0] == b'1', b[1] == b'2', a[2] == b'3'];
            // Landed writes are a suffix of the three, in issue order.
            let first = landed.iter().position(|l| *l).unwrap_or(3);
            assert!(
                landed[first..].iter().all(|l| *l),
                "seed {seed}: {landed:?}"
            );
            seen.insert(first);
        }
        assert_eq!(seen.len(), 4, "every cut was drawn: {seen:?}");
    }

    #[test]
    fn intercept_fails_what_its_hook_refuses_and_sees_what_succeeded() {
        let fs = Arc::new(FaultyStorage::new());
        let done = Arc::new(Mutex::new(Vec::new()));
        let seen = done.clone();
        let io = Intercept::new(fs.clone(), |op| match op {
            Op::Write { name: "b", .. } => Err(io::Error::from_raw_os_error(28)),
            _ => Ok(()),
        })
        .after(move |op| {
            if let Op::Write { name, data, .. } = op {
                seen.lock()
                    .expect("log")
                    .push((name.to_string(), data.len()));
            }
        });
        io.create("a").expect("create");
        io.create("b").expect("create");
        io.write("a", 0, b"xyz").expect("allowed");
        let e = io.write("b", 0, b"q").expect_err("refused");
        assert_eq!(e.raw_os_error(), Some(28));
        assert_eq!(
            fs.contents("b"),
            Some(Vec::new()),
            "a refused write is not done"
        );
        assert_eq!(*done.lock().expect("log"), vec![("a".to_string(), 3)]);
    }

    #[test]
    fn planned_failures_and_crashes() {
        let fs = FaultyStorage::new();
        fs.create("a").expect("create");
        fs.set_plan(FaultPlan {
            fail_at: Some((1, 28)),
            crash_at: Some(3),
            fail_count: 1,
            fail_only: None,
        });
        fs.write("a", 0, b"x").expect("op 0");
        let e = fs.write("a", 0, b"y").expect_err("op 1 fails");
        assert_eq!(e.raw_os_error(), Some(28));
        fs.write("a", 0, b"z").expect("op 2 works again");
        assert!(fs.sync("a").is_err() && fs.has_crashed());
        assert!(fs.len("a").is_err(), "everything fails after the crash");
    }
}
