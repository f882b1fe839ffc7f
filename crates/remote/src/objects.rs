//! [`ObjectStorage`]: the store's file operations ([`Storage`]) on an object store.
//!
//! The store sees files; the bucket holds one *head* object and immutable *pieces*.
//!
//! - A segment file (`*.pss`) is a map of extents, each a run of bytes of a piece. Appends
//!   collect in a *window* in memory; a window of [`PIECE`] bytes is cut off and uploaded at once,
//!   in the background ([`MAX_IN_FLIGHT`] at a time), as a new piece.
//! - Every other file (the superblock, the key file) is small and lives inside the head.
//! - A sync (`sync`, `sync_data`, `sync_dir`) cuts every window, waits for every upload, and then
//!   replaces the head by one conditional put (`If-Match` the version this process read or last
//!   wrote; `If-None-Match: *` for a new store). That put is the commit point: until it lands
//!   nothing uploaded is visible; after it, all of it is. If another process replaced the head
//!   in between, the put fails, and so does every later one of this process (sticky): a second
//!   writer can never commit over the first, and the loser gets an error that says so.
//! - Pieces no head names (an interrupted commit's, a removed segment's) are deleted by
//!   [`ObjectStorage::sweep`] (run after any removal, and by `gc`): only pieces of versions up
//!   to the head this process wrote, so a newer writer's uploads are never touched.
//!
//! Reads of published pieces go through a local block cache (small reads: commit records,
//! page-map chunks) or, when large, straight to the bucket in parallel ranges.

use crate::head::{ExtentRec, FileRec, Head, PieceName};
use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use pagesnap_store::{LockGuard, Storage};
use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::task::JoinHandle;

/// Bytes of a piece cut from a window (restic's packs are 16 MiB or more, for the same reasons:
/// few requests, and parts small enough to upload several at once).
pub const PIECE: usize = 16 << 20;
/// Bytes kept back in the window after a cut, so that rewriting the last partial block of an
/// append (which the store's buffer does) lands in the window, not in an uploaded piece.
const MARGIN: usize = 1 << 20;
/// Uploads in flight before a write waits for the oldest.
pub const MAX_IN_FLIGHT: usize = 6;
/// One ranged GET: a chunk of a piece.
const RANGE: u64 = 4 << 20;
/// Chunk GETs of one read in flight at once.
const PARALLEL_GETS: usize = 8;
/// Chunks of a piece fetched ahead of a read that needed the bucket.
const READAHEAD: u64 = 4;
/// Bytes of chunks kept in memory, least recently used dropped first.
const MAX_CHUNK_BYTES: u64 = 256 << 20;
/// A page read counts as sequential (and reads ahead) when it starts this close after where the
/// last page read of its file ended (readers on several threads read neighbouring runs).
const SEQUENTIAL_GAP: u64 = 16 << 20;

type ChunkCell = tokio::sync::OnceCell<Bytes>;

/// Chunks of pieces in memory: each with the stamp of its last use and its length.
#[derive(Debug, Default)]
struct Chunks {
    map: std::collections::HashMap<(PieceName, u64), (Arc<ChunkCell>, u64, u64)>,
    order: BTreeMap<u64, (PieceName, u64)>,
    next: u64,
    bytes: u64,
}
/// The block of the local cache.
pub const BLOCK: u64 = 64 << 10;
/// The head object's key below the prefix.
pub const HEAD_KEY: &str = "head";

/// Bytes and requests to and from the bucket, since the storage was opened.
#[derive(Debug, Default)]
pub struct Traffic {
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub puts: AtomicU64,
    pub gets: AtomicU64,
    pub cache_hits: AtomicU64,
}

/// What went to and came from the bucket, as [`ObjectStorage::traffic`] reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficReport {
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub puts: u64,
    pub gets: u64,
    pub cache_hits: u64,
}

/// An uploaded (or uploading) piece. Its bytes stay in memory until its upload succeeded.
#[derive(Debug)]
struct Piece {
    name: PieceName,
    len: u64,
    data: Mutex<Option<Bytes>>,
    /// In the bucket: read from a head, or its upload succeeded.
    uploaded: std::sync::atomic::AtomicBool,
}

impl Piece {
    fn is_uploaded(&self) -> bool {
        self.uploaded.load(Ordering::Acquire)
    }
    fn data(&self) -> Option<Bytes> {
        self.data.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn forget_data(&self) {
        *self.data.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

#[derive(Clone, Debug)]
struct Ext {
    len: u64,
    piece: Arc<Piece>,
    off: u64,
}

#[derive(Debug)]
struct Window {
    start: u64,
    buf: Vec<u8>,
}

#[derive(Debug)]
enum Body {
    Inline(Vec<u8>),
    Pieces {
        ext: BTreeMap<u64, Ext>,
        window: Option<Window>,
    },
}

#[derive(Debug)]
struct FileState {
    len: u64,
    body: Body,
}

#[derive(Debug)]
struct Upload {
    piece: Arc<Piece>,
    task: JoinHandle<Result<(), object_store::Error>>,
}

#[derive(Debug)]
struct State {
    /// The head this process read or last wrote; `None`: there is none yet.
    version_tag: Option<UpdateVersion>,
    version: u64,
    files: BTreeMap<String, FileState>,
    next_n: u32,
    uploads: Vec<Upload>,
    /// Pieces whose upload failed twice: their bytes are in memory; the next sync tries again.
    failed: Vec<Arc<Piece>>,
    /// Something changed since the last put of the head.
    dirty: bool,
    /// Something was removed or replaced since the last sweep.
    orphans: bool,
    /// Set when the head's conditional put failed: every later sync fails the same way.
    lost: Option<String>,
    /// The server was seen to honour conditional puts (by this process, or once on this machine).
    probed: bool,
}

/// The store's files on an object store (see the module documentation).
pub struct ObjectStorage {
    location: PathBuf,
    os: Arc<dyn ObjectStore>,
    prefix: String,
    rt: tokio::runtime::Runtime,
    cache: Option<PathBuf>,
    token: u64,
    /// [`PIECE`], smaller in tests.
    piece_size: usize,
    state: Mutex<State>,
    chunks: Mutex<Chunks>,
    /// Where the last page read of each file ended.
    last_read: Mutex<std::collections::HashMap<String, u64>>,
    traffic: Arc<Traffic>,
}

impl std::fmt::Debug for ObjectStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStorage")
            .field("location", &self.location)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

fn os_err_kind(e: &object_store::Error) -> io::ErrorKind {
    match e {
        object_store::Error::NotFound { .. } => io::ErrorKind::Other,
        object_store::Error::AlreadyExists { .. } => io::ErrorKind::AlreadyExists,
        _ => io::ErrorKind::Other,
    }
}

fn os_err(e: object_store::Error) -> io::Error {
    let kind = match &e {
        object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
        e => os_err_kind(e),
    };
    io::Error::new(kind, e)
}

/// Bytes the block cache of one store may hold: `PAGESNAP_CACHE_MAX_MIB`, default 2 GiB.
fn cache_limit() -> u64 {
    std::env::var("PAGESNAP_CACHE_MAX_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(2 << 30, |m| m << 20)
}

/// Deletes the oldest blocks of a cache directory (by modification time: a block is written
/// once) until it holds at most three quarters of `limit`, if it holds more than `limit`. A cache
/// is only a cache: errors here are ignored.
pub(crate) fn trim_cache(dir: &Path, limit: u64) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = rd
        .filter_map(|e| {
            let e = e.ok()?;
            let m = e.metadata().ok()?;
            Some((m.modified().ok()?, m.len(), e.path()))
        })
        .collect();
    let total: u64 = files.iter().map(|f| f.1).sum();
    if total <= limit {
        return 0;
    }
    files.sort();
    let mut left = total;
    let mut removed = 0;
    for (_, len, path) in files {
        if left <= limit / 4 * 3 {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            left -= len;
            removed += 1;
        }
    }
    removed
}

/// The checksum of a cached block, over its piece, its number and its bytes: a block stored
/// under the wrong name (or damaged) is a miss, never wrong bytes.
fn block_crc(piece: &PieceName, block: u64, data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(piece.key().as_bytes());
    h.update(&block.to_le_bytes());
    h.update(data);
    h.finalize()
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether a file of this name is kept in pieces (segment files) rather than in the head.
fn is_segment(name: &str) -> bool {
    name.ends_with(".pss")
}

/// Inserts `e` at `start`, trimming or dropping what it overlaps. Returns whether a piece may
/// have lost its last reference.
fn insert_extent(map: &mut BTreeMap<u64, Ext>, start: u64, e: Ext) -> bool {
    let end = start + e.len;
    let mut orphaned = false;
    // The extent that begins before `start` and reaches into it.
    if let Some((&k, prev)) = map.range(..start).next_back() {
        let pend = k + prev.len;
        if pend > start {
            let mut head = prev.clone();
            head.len = start - k;
            if pend > end {
                let tail = Ext {
                    len: pend - end,
                    piece: prev.piece.clone(),
                    off: prev.off + (end - k),
                };
                map.insert(end, tail);
            }
            map.insert(k, head);
        }
    }
    let inside: Vec<u64> = map.range(start..end).map(|(k, _)| *k).collect();
    for k in inside {
        if let Some(x) = map.remove(&k) {
            let xend = k + x.len;
            if xend > end {
                map.insert(
                    end,
                    Ext {
                        len: xend - end,
                        off: x.off + (end - k),
                        piece: x.piece,
                    },
                );
            } else {
                orphaned = true;
            }
        }
    }
    map.insert(start, e);
    orphaned
}

/// Drops everything at or past `len`.
fn truncate_extents(map: &mut BTreeMap<u64, Ext>, len: u64) -> bool {
    let past: Vec<u64> = map.range(len..).map(|(k, _)| *k).collect();
    let orphaned = !past.is_empty();
    for k in past {
        map.remove(&k);
    }
    if let Some((&k, e)) = map.range(..len).next_back() {
        if k + e.len > len {
            let mut e = e.clone();
            e.len = len - k;
            map.insert(k, e);
        }
    }
    orphaned
}

impl ObjectStorage {
    /// Opens the store at `prefix` of `os` (reads its head; none: an empty store, which the
    /// first sync creates). `location` names it in messages (`s3://bucket/prefix`); `cache` is a
    /// directory for the local block cache and the writer lock of this machine (`None`: no cache).
    pub fn open(
        os: Arc<dyn ObjectStore>,
        prefix: &str,
        location: &str,
        cache: Option<PathBuf>,
    ) -> io::Result<ObjectStorage> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .thread_name("pagesnap-s3")
            .enable_all()
            .build()?;
        let mut token = [0u8; 8];
        getrandom::fill(&mut token).map_err(|e| io::Error::other(e.to_string()))?;
        if let Some(dir) = &cache {
            std::fs::create_dir_all(dir.join("blocks")).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cache directory {}: {e}; set PAGESNAP_CACHE_DIR to a writable directory",
                        dir.display()
                    ),
                )
            })?;
            trim_cache(&dir.join("blocks"), cache_limit());
        }
        let prefix = prefix.trim_matches('/').to_string();
        let storage = ObjectStorage {
            location: PathBuf::from(location),
            os,
            prefix,
            rt,
            cache,
            token: u64::from_le_bytes(token),
            piece_size: PIECE,
            state: Mutex::new(State {
                version_tag: None,
                version: 0,
                files: BTreeMap::new(),
                next_n: 0,
                uploads: Vec::new(),
                failed: Vec::new(),
                dirty: false,
                orphans: false,
                lost: None,
                probed: false,
            }),
            chunks: Mutex::new(Chunks::default()),
            last_read: Mutex::new(std::collections::HashMap::new()),
            traffic: Arc::new(Traffic::default()),
        };
        storage.load_head()?;
        Ok(storage)
    }

    fn path(&self, key: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(key)
        } else {
            ObjPath::from(format!("{}/{key}", self.prefix))
        }
    }

    fn load_head(&self) -> io::Result<()> {
        let path = self.path(HEAD_KEY);
        let got = self.rt.block_on(async {
            match self.os.get(&path).await {
                Ok(r) => {
                    let tag = UpdateVersion {
                        e_tag: r.meta.e_tag.clone(),
                        version: r.meta.version.clone(),
                    };
                    let bytes = r.bytes().await?;
                    Ok(Some((tag, bytes)))
                }
                Err(object_store::Error::NotFound { .. }) => {
                    // No head: a store not made yet — or no bucket (S3 answers both with 404).
                    let root = self.path("");
                    self.os.list_with_delimiter(Some(&root)).await.map(|_| None)
                }
                Err(e) => Err(e),
            }
        });
        let Some((tag, bytes)) = got.map_err(|e| {
            io::Error::new(
                os_err_kind(&e),
                format!(
                    "reading {}/{HEAD_KEY}: {e}; check the bucket's name, AWS_ENDPOINT_URL, the \
                     network and the credentials",
                    self.location.display()
                ),
            )
        })?
        else {
            return Ok(());
        };
        self.traffic.gets.fetch_add(1, Ordering::Relaxed);
        self.traffic
            .bytes_down
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let head = Head::decode(&bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}/{HEAD_KEY}: {}: the store's head object is damaged and pagesnap cannot \
                     read the store without it; restore the object from a bucket version or a \
                     backup of the bucket",
                    self.location.display(),
                    e.0
                ),
            )
        })?;
        let pieces: Vec<Arc<Piece>> = head
            .pieces
            .iter()
            .map(|(name, len)| {
                Arc::new(Piece {
                    name: *name,
                    len: *len,
                    data: Mutex::new(None),
                    uploaded: std::sync::atomic::AtomicBool::new(true),
                })
            })
            .collect();
        let mut st = lock(&self.state);
        st.version = head.version;
        st.version_tag = Some(tag);
        st.files.clear();
        for (name, rec) in head.files {
            let (len, body) = match rec {
                FileRec::Inline(d) => (d.len() as u64, Body::Inline(d)),
                FileRec::Pieces { len, extents } => {
                    let ext = extents
                        .into_iter()
                        .map(|(off, e)| {
                            (
                                off,
                                Ext {
                                    len: e.len,
                                    piece: pieces[e.piece as usize].clone(),
                                    off: e.piece_off,
                                },
                            )
                        })
                        .collect();
                    (len, Body::Pieces { ext, window: None })
                }
            };
            st.files.insert(name, FileState { len, body });
        }
        Ok(())
    }

    /// What went to and came from the bucket so far.
    pub fn traffic(&self) -> TrafficReport {
        let t = &self.traffic;
        TrafficReport {
            bytes_up: t.bytes_up.load(Ordering::Relaxed),
            bytes_down: t.bytes_down.load(Ordering::Relaxed),
            puts: t.puts.load(Ordering::Relaxed),
            gets: t.gets.load(Ordering::Relaxed),
            cache_hits: t.cache_hits.load(Ordering::Relaxed),
        }
    }

    /// Cuts pieces of `bytes` (at least 64 KiB) instead of [`PIECE`]: for tests that want many
    /// pieces from little data.
    pub fn with_piece_size(mut self, bytes: usize) -> ObjectStorage {
        self.piece_size = bytes.max(64 << 10);
        self
    }

    /// Distinct pieces the files name now.
    pub fn live_pieces(&self) -> usize {
        let st = lock(&self.state);
        st.files
            .values()
            .flat_map(|f| match &f.body {
                Body::Pieces { ext, .. } => ext.values().map(|e| e.piece.name).collect(),
                Body::Inline(_) => Vec::new(),
            })
            .collect::<HashSet<_>>()
            .len()
    }

    /// The head version this process read or wrote last.
    pub fn version(&self) -> u64 {
        lock(&self.state).version
    }

    /// Uploads a window's bytes as a new piece; returns the extent that names it.
    fn cut(&self, st: &mut State, w: Window) -> (u64, Ext) {
        let name = PieceName {
            version: st.version + 1,
            token: self.token,
            n: st.next_n,
        };
        st.next_n += 1;
        let data = Bytes::from(w.buf);
        let piece = Arc::new(Piece {
            name,
            len: data.len() as u64,
            data: Mutex::new(Some(data.clone())),
            uploaded: std::sync::atomic::AtomicBool::new(false),
        });
        let task = self.spawn_upload(&piece, data);
        st.uploads.push(Upload {
            piece: piece.clone(),
            task,
        });
        let len = piece.len;
        // The caller inserts the extent, then reaps: an error of an older upload must not
        // drop this window's bytes.
        (w.start, Ext { len, piece, off: 0 })
    }

    fn spawn_upload(
        &self,
        piece: &Arc<Piece>,
        data: Bytes,
    ) -> JoinHandle<Result<(), object_store::Error>> {
        let os = self.os.clone();
        let path = self.path(&piece.name.key());
        let piece = piece.clone();
        let traffic = self.traffic.clone();
        self.rt.spawn(async move {
            let n = data.len() as u64;
            os.put(&path, PutPayload::from_bytes(data)).await?;
            traffic.puts.fetch_add(1, Ordering::Relaxed);
            traffic.bytes_up.fetch_add(n, Ordering::Relaxed);
            piece.uploaded.store(true, Ordering::Release);
            piece.forget_data();
            Ok(())
        })
    }

    /// Waits until at most `keep` uploads are in flight. A failed upload is tried once more
    /// (its bytes are still in memory); failing again, it is an error, and the piece stays in
    /// the list so that the next sync tries again.
    fn reap(&self, st: &mut State, keep: usize) -> io::Result<()> {
        while st.uploads.len() > keep || st.uploads.first().is_some_and(|u| u.task.is_finished()) {
            let Upload { piece, task } = st.uploads.remove(0);
            // A task that panicked or was cancelled did not upload: like a failed upload, its
            // piece is tried again (its bytes are in memory until an upload succeeds).
            let first = match self.rt.block_on(task) {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(e) => Err(format!("upload task: {e}")),
            };
            if first.is_err() && !piece.is_uploaded() {
                let Some(data) = piece.data() else {
                    return Err(io::Error::other(format!(
                        "{}/{}: upload failed and its bytes are gone",
                        self.location.display(),
                        piece.name
                    )));
                };
                let retry = self.spawn_upload(&piece, data);
                let second = match self.rt.block_on(retry) {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(e) => Err(format!("upload task: {e}")),
                };
                if let Err(e) = second {
                    // Kept for the next sync: its bytes are still in memory.
                    st.failed.push(piece.clone());
                    return Err(io::Error::other(format!(
                        "uploading {}/{}: {e}",
                        self.location.display(),
                        piece.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// Replaces the head by everything this process holds: the commit point (module docs).
    fn publish(&self, st: &mut State) -> io::Result<()> {
        if let Some(why) = &st.lost {
            return Err(io::Error::other(why.clone()));
        }
        let names: Vec<String> = st.files.keys().cloned().collect();
        for name in names {
            let window = match st.files.get_mut(&name).map(|f| &mut f.body) {
                Some(Body::Pieces { window, .. }) => window.take(),
                _ => None,
            };
            if let Some(w) = window.filter(|w| !w.buf.is_empty()) {
                let (start, e) = self.cut(st, w);
                if let Some(FileState {
                    body: Body::Pieces { ext, .. },
                    ..
                }) = st.files.get_mut(&name)
                {
                    insert_extent(ext, start, e);
                }
            }
        }
        // Pieces whose upload failed before: tried again (their bytes are in memory).
        for piece in std::mem::take(&mut st.failed) {
            if let Some(data) = piece.data() {
                let task = self.spawn_upload(&piece, data);
                st.uploads.push(Upload { piece, task });
            }
        }
        self.reap(st, 0)?;
        if !st.dirty {
            return Ok(());
        }
        let head = self.head_of(st, st.version + 1);
        if let Some(p) = st.files.values().find_map(|f| match &f.body {
            Body::Pieces { ext, .. } => ext.values().find(|e| !e.piece.is_uploaded()),
            Body::Inline(_) => None,
        }) {
            return Err(io::Error::other(format!(
                "{}/{} is not uploaded yet; nothing was committed (try again)",
                self.location.display(),
                p.piece.name
            )));
        }
        let bytes = head.encode();
        let n = bytes.len() as u64;
        if !st.probed {
            if let Err(why) = self.probe_conditional_puts() {
                st.lost = Some(why.clone());
                return Err(io::Error::other(why));
            }
            st.probed = true;
        }
        let mode = match &st.version_tag {
            None => PutMode::Create,
            Some(tag) => PutMode::Update(tag.clone()),
        };
        let path = self.path(HEAD_KEY);
        let r = self.rt.block_on(self.os.put_opts(
            &path,
            PutPayload::from(bytes),
            PutOptions {
                mode,
                ..Default::default()
            },
        ));
        match r {
            Ok(res) => {
                self.traffic.puts.fetch_add(1, Ordering::Relaxed);
                self.traffic.bytes_up.fetch_add(n, Ordering::Relaxed);
                st.version += 1;
                st.version_tag = Some(UpdateVersion {
                    e_tag: res.e_tag,
                    version: res.version,
                });
                st.dirty = false;
                Ok(())
            }
            Err(
                e @ (object_store::Error::Precondition { .. }
                | object_store::Error::AlreadyExists { .. }),
            ) => {
                let why = format!(
                    "another writer changed the store {} after this process read it ({e}); \
                     nothing of this change was committed: open the store again and retry",
                    self.location.display()
                );
                st.lost = Some(why.clone());
                Err(io::Error::other(why))
            }
            Err(e) => Err(os_err(e)),
        }
    }

    /// Checks, once per store and machine, that the server refuses a conditional put whose
    /// condition fails — the whole protection against two writers rests on it, and some
    /// "S3-compatible" servers ignore the headers. The answer is remembered in the cache.
    fn probe_conditional_puts(&self) -> Result<(), String> {
        let marker = self.cache.as_ref().map(|d| d.join("conditional-puts-ok"));
        if marker.as_ref().is_some_and(|m| m.exists()) {
            return Ok(());
        }
        let path = self.path(&format!("probe/{:016x}", self.token));
        let refused = |r: Result<object_store::PutResult, object_store::Error>| {
            matches!(
                r,
                Err(object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. })
            )
        };
        let verdict = self.rt.block_on(async {
            let create = |b: &'static [u8]| {
                self.os.put_opts(
                    &path,
                    PutPayload::from_static(b),
                    PutOptions {
                        mode: PutMode::Create,
                        ..Default::default()
                    },
                )
            };
            create(b"1").await?;
            let again = refused(create(b"2").await);
            let stale = refused(
                self.os
                    .put_opts(
                        &path,
                        PutPayload::from_static(b"3"),
                        PutOptions {
                            mode: PutMode::Update(UpdateVersion {
                                e_tag: Some("\"pagesnap-no-such-etag\"".into()),
                                version: None,
                            }),
                            ..Default::default()
                        },
                    )
                    .await,
            );
            let _ = self.os.delete(&path).await;
            Ok::<bool, object_store::Error>(again && stale)
        });
        match verdict {
            Ok(true) => {
                if let Some(m) = marker {
                    let _ = std::fs::write(m, b"If-None-Match and If-Match are honoured\n");
                }
                Ok(())
            }
            Ok(false) => Err(format!(
                "{}: the server ignores conditional writes (If-None-Match / If-Match): two \
                 writers could overwrite each other's commits there, so pagesnap does not write \
                 to it. Use a server that supports them (Amazon S3 has since 2024)",
                self.location.display()
            )),
            Err(e) => Err(format!(
                "{}: checking that the server honours conditional writes: {e}",
                self.location.display()
            )),
        }
    }

    fn head_of(&self, st: &State, version: u64) -> Head {
        let mut index: BTreeMap<PieceName, u32> = BTreeMap::new();
        let mut pieces = Vec::new();
        let mut files = BTreeMap::new();
        for (name, f) in &st.files {
            let rec = match &f.body {
                Body::Inline(d) => FileRec::Inline(d.clone()),
                Body::Pieces { ext, .. } => FileRec::Pieces {
                    len: f.len,
                    extents: ext
                        .iter()
                        .map(|(off, e)| {
                            let i = *index.entry(e.piece.name).or_insert_with(|| {
                                pieces.push((e.piece.name, e.piece.len));
                                (pieces.len() - 1) as u32
                            });
                            (
                                *off,
                                ExtentRec {
                                    len: e.len,
                                    piece: i,
                                    piece_off: e.off,
                                },
                            )
                        })
                        .collect(),
                },
            };
            files.insert(name.clone(), rec);
        }
        Head {
            version,
            pieces,
            files,
        }
    }

    /// Deletes the pieces no head names, of versions up to the one this process wrote or read
    /// (never a newer writer's). Returns how many were deleted.
    pub fn sweep(&self) -> io::Result<usize> {
        let (version, live) = {
            let st = lock(&self.state);
            if !st.uploads.is_empty() || !st.failed.is_empty() || st.dirty || st.lost.is_some() {
                return Ok(0);
            }
            let live: HashSet<PieceName> = st
                .files
                .values()
                .flat_map(|f| match &f.body {
                    Body::Pieces { ext, .. } => ext.values().map(|e| e.piece.name).collect(),
                    Body::Inline(_) => Vec::new(),
                })
                .collect();
            (st.version, live)
        };
        let token = self.token;
        let prefix = self.path("p");
        let gone: Vec<ObjPath> = self
            .rt
            .block_on(async { self.os.list(Some(&prefix)).try_collect::<Vec<_>>().await })
            .map_err(os_err)?
            .into_iter()
            .filter_map(|m| {
                // Compared part by part as the store lists them (escaped characters included).
                let name = {
                    let mut rest = m.location.prefix_match(&prefix)?;
                    let part = rest.next()?;
                    if rest.next().is_some() {
                        return None;
                    }
                    PieceName::parse(&format!("p/{}", part.as_ref()))?
                };
                let ours_unpublished = name.token == token && name.version > version;
                (name.version <= version && !live.contains(&name) && !ours_unpublished)
                    .then_some(m.location)
            })
            .collect();
        let n = gone.len();
        self.rt
            .block_on(async {
                stream::iter(gone)
                    .map(|p| {
                        let os = self.os.clone();
                        async move {
                            match os.delete(&p).await {
                                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                                Err(e) => Err(e),
                            }
                        }
                    })
                    .buffer_unordered(16)
                    .try_collect::<Vec<()>>()
                    .await
            })
            .map_err(os_err)?;
        lock(&self.state).orphans = false;
        Ok(n)
    }

    fn cache_file(&self, piece: &PieceName, block: u64) -> Option<PathBuf> {
        self.cache.as_ref().map(|d| {
            d.join("blocks").join(format!(
                "{:016x}-{:016x}-{:08x}.{block}",
                piece.version, piece.token, piece.n
            ))
        })
    }

    fn cached_block(&self, piece: &PieceName, block: u64, want: usize) -> Option<Vec<u8>> {
        let mut b = std::fs::read(self.cache_file(piece, block)?).ok()?;
        if b.len() != want + 4 {
            return None;
        }
        let crc = b.split_off(want);
        (block_crc(piece, block, &b).to_le_bytes()[..] == crc[..]).then_some(b)
    }

    fn store_block(&self, piece: &PieceName, block: u64, data: &[u8]) {
        let Some(path) = self.cache_file(piece, block) else {
            return;
        };
        // A name of its own for every write: threads keep blocks of one piece at once.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let mut tmp = path.clone().into_os_string();
        tmp.push(format!(
            ".tmp{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp = PathBuf::from(tmp);
        let mut bytes = Vec::with_capacity(data.len() + 4);
        bytes.extend_from_slice(data);
        bytes.extend_from_slice(&block_crc(piece, block, data).to_le_bytes());
        // The cache is a cache: a failure to keep a block costs a download later, nothing else.
        if std::fs::write(&tmp, &bytes).is_ok() && std::fs::rename(&tmp, &path).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    /// `out.len()` bytes of a published piece from `off`.
    ///
    /// Index and catalog records (`meta`) go through the local block cache: served from it when
    /// every block is there, else the missing blocks are fetched (one ranged GET) and kept.
    /// Page data comes from chunks of [`RANGE`] held in memory, fetched several at once, with
    /// the next [`READAHEAD`] chunks of the piece fetched in the background (restore reads
    /// pieces front to back); it never fills the disk cache.
    fn read_remote(
        &self,
        piece: &Piece,
        off: u64,
        out: &mut [u8],
        meta: bool,
        ahead: bool,
    ) -> io::Result<()> {
        let end = off + out.len() as u64;
        if meta && self.cache.is_some() {
            if self.read_cached_blocks(piece, off, out) {
                return Ok(());
            }
            let (b0, b1) = (off / BLOCK, (end - 1) / BLOCK);
            let start = b0 * BLOCK;
            let stop = ((b1 + 1) * BLOCK).min(piece.len);
            let bytes = self.rt.block_on(self.range_fetch(piece, start..stop))?;
            if (bytes.len() as u64) < end - start {
                return Err(self.short(piece));
            }
            out.copy_from_slice(&bytes[(off - start) as usize..(end - start) as usize]);
            for blk in b0..=b1 {
                let s = ((blk - b0) * BLOCK) as usize;
                let e = (s + BLOCK as usize).min(bytes.len());
                self.store_block(&piece.name, blk, &bytes[s..e]);
            }
            return Ok(());
        }
        let first = off / RANGE;
        let last = (end - 1) / RANGE;
        let chunks_in_piece = piece.len.div_ceil(RANGE);
        let ahead_to = if ahead { last + 1 + READAHEAD } else { 0 };
        for c in (last + 1)..ahead_to.min(chunks_in_piece) {
            self.prefetch(piece, c);
        }
        let cells: Vec<(u64, Arc<ChunkCell>)> = (first..=last)
            .map(|c| (c, self.chunk_cell(piece, c)))
            .collect();
        let got: Vec<Bytes> = self.rt.block_on(async {
            stream::iter(cells)
                .map(|(c, cell)| {
                    let fetch = self.range_fetch(piece, self.chunk_range(piece, c));
                    async move { cell.get_or_try_init(|| fetch).await.cloned() }
                })
                .buffered(PARALLEL_GETS)
                .try_collect()
                .await
        })?;
        for (i, chunk) in got.iter().enumerate() {
            let c = first + i as u64;
            if chunk.len() as u64 != self.chunk_range(piece, c).end - c * RANGE {
                return Err(self.short(piece));
            }
            let cstart = c * RANGE;
            let from = off.max(cstart);
            let to = end.min(cstart + chunk.len() as u64);
            if from >= to {
                return Err(self.short(piece));
            }
            out[(from - off) as usize..(to - off) as usize]
                .copy_from_slice(&chunk[(from - cstart) as usize..(to - cstart) as usize]);
        }
        Ok(())
    }

    /// Fetches chunk `c` of a piece in the background, unless it is there or on its way.
    fn prefetch(&self, piece: &Piece, c: u64) {
        let cell = self.chunk_cell(piece, c);
        if cell.initialized() {
            return;
        }
        let fetch = self.range_fetch(piece, self.chunk_range(piece, c));
        self.rt.spawn(async move {
            // A failed read-ahead leaves the cell empty: the read that needs it fetches again.
            let _ = cell.get_or_try_init(|| fetch).await;
        });
    }

    fn short(&self, piece: &Piece) -> io::Error {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "{}/{}: shorter than the head says",
                self.location.display(),
                piece.name
            ),
        )
    }

    fn chunk_range(&self, piece: &Piece, c: u64) -> std::ops::Range<u64> {
        c * RANGE..((c + 1) * RANGE).min(piece.len)
    }

    /// Serves a read from the block cache if every block it needs is there.
    fn read_cached_blocks(&self, piece: &Piece, off: u64, out: &mut [u8]) -> bool {
        let end = off + out.len() as u64;
        let block_len = |b: u64| ((b + 1) * BLOCK).min(piece.len) - b * BLOCK;
        for blk in off / BLOCK..=(end - 1) / BLOCK {
            let Some(b) = self.cached_block(&piece.name, blk, block_len(blk) as usize) else {
                return false;
            };
            let bstart = blk * BLOCK;
            let from = off.max(bstart);
            let to = end.min(bstart + b.len() as u64);
            if from >= to {
                return false;
            }
            out[(from - off) as usize..(to - off) as usize]
                .copy_from_slice(&b[(from - bstart) as usize..(to - bstart) as usize]);
            self.traffic.cache_hits.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    /// The memory cell of chunk `c` of a piece (created empty if new; the oldest cells are
    /// dropped past [`MAX_CHUNKS`]).
    fn chunk_cell(&self, piece: &Piece, c: u64) -> Arc<ChunkCell> {
        let mut cache = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
        let cache = &mut *cache;
        let key = (piece.name, c);
        cache.next += 1;
        let stamp = cache.next;
        if let Some((cell, used, _)) = cache.map.get_mut(&key) {
            cache.order.remove(used);
            *used = stamp;
            cache.order.insert(stamp, key);
            return cell.clone();
        }
        let r = self.chunk_range(piece, c);
        let len = r.end.saturating_sub(r.start);
        let cell = Arc::new(ChunkCell::new());
        cache.map.insert(key, (cell.clone(), stamp, len));
        cache.order.insert(stamp, key);
        cache.bytes += len;
        // Least recently used first, down to the budget (the new cell stays).
        while cache.bytes > MAX_CHUNK_BYTES && cache.order.len() > 1 {
            let Some((_, old)) = cache.order.pop_first() else {
                break;
            };
            if let Some((_, _, l)) = cache.map.remove(&old) {
                cache.bytes -= l;
            }
        }
        cell
    }

    /// The ranged GET of bytes of a piece, as a future that owns what it needs.
    fn range_fetch(
        &self,
        piece: &Piece,
        range: std::ops::Range<u64>,
    ) -> impl std::future::Future<Output = io::Result<Bytes>> + Send + 'static {
        let os = self.os.clone();
        let path = self.path(&piece.name.key());
        let traffic = self.traffic.clone();
        let gone = format!(
            "{}/{} is gone: the store was changed (gc) since this command opened it, or the \
             object was deleted outside pagesnap; run the command again, and `pagesnap verify` \
             if it says the same",
            self.location.display(),
            piece.name
        );
        async move {
            let b = os.get_range(&path, range).await.map_err(|e| match e {
                object_store::Error::NotFound { .. } => {
                    io::Error::new(io::ErrorKind::NotFound, gone)
                }
                e => os_err(e),
            })?;
            traffic.gets.fetch_add(1, Ordering::Relaxed);
            traffic
                .bytes_down
                .fetch_add(b.len() as u64, Ordering::Relaxed);
            Ok(b)
        }
    }

    fn no_file(&self, name: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{}/{name}: no such file", self.location.display()),
        )
    }
}

#[derive(Debug)]
struct CacheLock(#[allow(dead_code)] File);
impl LockGuard for CacheLock {}

#[derive(Debug)]
struct NoLock;
impl LockGuard for NoLock {}

impl Storage for ObjectStorage {
    fn location(&self) -> &Path {
        &self.location
    }

    fn list(&self) -> io::Result<Vec<String>> {
        Ok(lock(&self.state).files.keys().cloned().collect())
    }

    fn create(&self, name: &str) -> io::Result<()> {
        let mut st = lock(&self.state);
        if st.files.contains_key(name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{}/{name} exists", self.location.display()),
            ));
        }
        let body = if is_segment(name) {
            Body::Pieces {
                ext: BTreeMap::new(),
                window: None,
            }
        } else {
            Body::Inline(Vec::new())
        };
        st.files
            .insert(name.to_string(), FileState { len: 0, body });
        st.dirty = true;
        Ok(())
    }

    fn len(&self, name: &str) -> io::Result<u64> {
        lock(&self.state)
            .files
            .get(name)
            .map(|f| f.len)
            .ok_or_else(|| self.no_file(name))
    }

    fn read(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_with(name, offset, buf, false)
    }

    fn read_meta(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_with(name, offset, buf, true)
    }

    fn write(&self, name: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write_at(name, offset, data)
    }

    fn set_len(&self, name: &str, len: u64) -> io::Result<()> {
        let mut st = lock(&self.state);
        let st = &mut *st;
        let f = st.files.get_mut(name).ok_or_else(|| self.no_file(name))?;
        st.dirty = true;
        match &mut f.body {
            Body::Inline(d) => {
                d.resize(len as usize, 0);
            }
            Body::Pieces { ext, window } => {
                if len < f.len {
                    if truncate_extents(ext, len) {
                        st.orphans = true;
                    }
                    if let Some(w) = window.as_mut() {
                        if len <= w.start {
                            *window = None;
                        } else {
                            w.buf.truncate((len - w.start) as usize);
                        }
                    }
                }
            }
        }
        f.len = len;
        Ok(())
    }

    fn sync(&self, _name: &str) -> io::Result<()> {
        let mut st = lock(&self.state);
        self.publish(&mut st)
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut st = lock(&self.state);
        let f = st.files.remove(from).ok_or_else(|| self.no_file(from))?;
        if st.files.insert(to.to_string(), f).is_some() {
            st.orphans = true;
        }
        st.dirty = true;
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut st = lock(&self.state);
        st.files.remove(name).ok_or_else(|| self.no_file(name))?;
        st.dirty = true;
        st.orphans = true;
        Ok(())
    }

    fn sync_dir(&self) -> io::Result<()> {
        let orphans = {
            let mut st = lock(&self.state);
            self.publish(&mut st)?;
            st.orphans
        };
        if orphans {
            self.sweep()?;
        }
        Ok(())
    }

    fn try_lock(&self, name: &str) -> io::Result<Option<Box<dyn LockGuard>>> {
        // Writers on one machine exclude each other by a lock file in the cache directory (the
        // same error as a local store). Writers on different machines are kept apart by the
        // conditional put of the head: the later one to commit fails.
        let Some(dir) = &self.cache else {
            return Ok(Some(Box::new(NoLock)));
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(name))?;
        match file.try_lock() {
            Ok(()) => {
                // The head was read before the lock was taken: a writer of this machine may have
                // committed since. Read it again, so that this writer starts from the last commit
                // (else its first put would fail as a second writer's).
                let untouched = {
                    let st = lock(&self.state);
                    !st.dirty && st.uploads.is_empty() && st.failed.is_empty()
                };
                if untouched {
                    self.load_head()?;
                }
                Ok(Some(Box::new(CacheLock(file))))
            }
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }
}

impl ObjectStorage {
    fn read_with(&self, name: &str, offset: u64, buf: &mut [u8], meta: bool) -> io::Result<()> {
        if buf.is_empty() {
            return match lock(&self.state).files.get(name) {
                Some(f) if offset <= f.len => Ok(()),
                Some(_) => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                None => Err(self.no_file(name)),
            };
        }
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut remote: Vec<(usize, usize, Arc<Piece>, u64)> = Vec::new();
        {
            let st = lock(&self.state);
            let f = st.files.get(name).ok_or_else(|| self.no_file(name))?;
            if end > f.len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "{}/{name}: read of {}..{end} past its end ({})",
                        self.location.display(),
                        offset,
                        f.len
                    ),
                ));
            }
            match &f.body {
                Body::Inline(d) => {
                    buf.copy_from_slice(&d[offset as usize..end as usize]);
                    return Ok(());
                }
                Body::Pieces { ext, window } => {
                    buf.fill(0);
                    let mut parts: Vec<(u64, &Ext)> = Vec::new();
                    if let Some((k, e)) = ext.range(..=offset).next_back() {
                        if k + e.len > offset {
                            parts.push((*k, e));
                        }
                    }
                    if offset < end {
                        for (k, e) in ext.range(offset + 1..end) {
                            parts.push((*k, e));
                        }
                    }
                    for (k, e) in parts {
                        let from = offset.max(k);
                        let to = end.min(k + e.len);
                        let at = (from - offset) as usize;
                        let n = (to - from) as usize;
                        let poff = e.off + (from - k);
                        match e.piece.data() {
                            Some(d) => buf[at..at + n]
                                .copy_from_slice(&d[poff as usize..poff as usize + n]),
                            None => remote.push((at, n, e.piece.clone(), poff)),
                        }
                    }
                    if let Some(w) = window {
                        let wend = w.start + w.buf.len() as u64;
                        let from = offset.max(w.start);
                        let to = end.min(wend);
                        if from < to {
                            // The window is newer than any extent: it wins, and what it covers
                            // is not fetched.
                            let (wa, wb) = ((from - offset) as usize, (to - offset) as usize);
                            buf[wa..wb].copy_from_slice(
                                &w.buf[(from - w.start) as usize..(to - w.start) as usize],
                            );
                            remote = remote
                                .into_iter()
                                .flat_map(|(at, n, p, poff)| {
                                    let mut keep = Vec::new();
                                    if at < wa {
                                        keep.push((at, (wa - at).min(n), p.clone(), poff));
                                    }
                                    if at + n > wb {
                                        let s = wb.max(at);
                                        keep.push((s, at + n - s, p, poff + (s - at) as u64));
                                    }
                                    keep
                                })
                                .collect();
                        }
                    }
                }
            }
        }
        // Reading ahead pays only when reads follow each other through the file (a restore of a
        // first snapshot); reads that jump (a snapshot whose pages are spread over many commits)
        // would fetch chunks nobody reads.
        let streaming = !meta && !remote.is_empty() && {
            let mut last = self.last_read.lock().unwrap_or_else(|p| p.into_inner());
            let prev = last.insert(name.to_string(), end);
            prev.is_some_and(|p| offset + SEQUENTIAL_GAP >= p && offset <= p + SEQUENTIAL_GAP)
        };
        for (at, n, piece, poff) in remote {
            self.read_remote(&piece, poff, &mut buf[at..at + n], meta, streaming)?;
        }
        if streaming {
            self.read_ahead_past(name, end);
        }
        Ok(())
    }

    fn write_at(&self, name: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut st = lock(&self.state);
        let st = &mut *st;
        let f = st.files.get_mut(name).ok_or_else(|| self.no_file(name))?;
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        st.dirty = true;
        match &mut f.body {
            Body::Inline(d) => {
                if end as usize > d.len() {
                    d.resize(end as usize, 0);
                }
                d[offset as usize..end as usize].copy_from_slice(data);
                f.len = d.len() as u64;
                Ok(())
            }
            Body::Pieces { window, .. } => {
                f.len = f.len.max(end);
                let fits = window
                    .as_ref()
                    .is_some_and(|w| offset >= w.start && offset <= w.start + w.buf.len() as u64);
                let old = if fits { None } else { window.take() };
                if let Some(w) = window.as_mut().filter(|_| fits) {
                    let at = (offset - w.start) as usize;
                    if at + data.len() > w.buf.len() {
                        w.buf.resize(at + data.len(), 0);
                    }
                    w.buf[at..at + data.len()].copy_from_slice(data);
                } else {
                    *window = Some(Window {
                        start: offset,
                        buf: data.to_vec(),
                    });
                }
                // Cut what is due: the old window, and the front of a full one.
                let mut due = Vec::new();
                if let Some(w) = old.filter(|w| !w.buf.is_empty()) {
                    due.push(w);
                }
                if let Some(w) = window.as_mut() {
                    let piece = self.piece_size;
                    while w.buf.len() >= piece + MARGIN.min(piece / 4) {
                        let tail = w.buf.split_off(piece);
                        let front = std::mem::replace(&mut w.buf, tail);
                        due.push(Window {
                            start: w.start,
                            buf: front,
                        });
                        w.start += piece as u64;
                    }
                }
                for w in due {
                    let (start, e) = self.cut(st, w);
                    if let Some(FileState {
                        body: Body::Pieces { ext, .. },
                        ..
                    }) = st.files.get_mut(name)
                    {
                        if insert_extent(ext, start, e) {
                            st.orphans = true;
                        }
                    }
                }
                self.reap(st, MAX_IN_FLIGHT)
            }
        }
    }

    /// A page read that reached into the last chunks of a piece: the first chunks of the
    /// pieces that follow in the file are fetched in the background, so that a restore does not
    /// wait at every piece's edge.
    fn read_ahead_past(&self, name: &str, end: u64) {
        let next: Vec<(Arc<Piece>, u64, u64)> = {
            let st = lock(&self.state);
            let Some(FileState {
                body: Body::Pieces { ext, .. },
                ..
            }) = st.files.get(name)
            else {
                return;
            };
            // The extent the read ended in: how much of it is left.
            let left = match ext.range(..end).next_back() {
                Some((k, e)) if k + e.len >= end => k + e.len - end,
                _ => 0,
            };
            if left >= READAHEAD * RANGE {
                return;
            }
            let mut budget = READAHEAD * RANGE - left;
            let mut out = Vec::new();
            for (_, e) in ext.range(end..) {
                if budget == 0 {
                    break;
                }
                if e.piece.data().is_some() {
                    continue;
                }
                let n = e.len.min(budget);
                out.push((e.piece.clone(), e.off, n));
                budget -= n;
            }
            out
        };
        for (piece, off, n) in next {
            for c in off / RANGE..=(off + n - 1) / RANGE {
                self.prefetch(&piece, c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_is_trimmed_oldest_first_to_three_quarters() {
        let dir = tempfile::tempdir().expect("tmp");
        for i in 0..8u32 {
            let p = dir.path().join(format!("b{i}"));
            std::fs::write(&p, vec![0u8; 1000]).expect("write");
            let t = std::time::SystemTime::UNIX_EPOCH
                + std::time::Duration::from_secs(1000 + u64::from(i));
            std::fs::File::options()
                .write(true)
                .open(&p)
                .and_then(|f| f.set_modified(t))
                .expect("time");
        }
        assert_eq!(trim_cache(dir.path(), 8000), 0, "under the limit: nothing");
        assert_eq!(trim_cache(dir.path(), 4000), 5, "down to 3000 bytes");
        let left: Vec<String> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
            .collect();
        for old in ["b0", "b1", "b2", "b3", "b4"] {
            assert!(!left.contains(&old.to_string()), "{left:?}");
        }
        assert_eq!(left.len(), 3);
    }
}
