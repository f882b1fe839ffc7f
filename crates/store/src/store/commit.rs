//! Writing a snapshot and the commit protocol: `begin`, `put`, `remove`, `commit` and `abort`;
//! `publish`, the commit point (sync the segments, then write one superblock slot, then the
//! other); leaving doubt after a superblock write of unknown outcome; `delete` and pins; and the
//! record appender with its write buffer. See `docs/format.md` for the protocol and why a crash at
//! any step loses nothing committed.

use super::{dedup_key, io_err, read_record, Pending, Store, WriteIo, Writer, EMPTY_ROOT};
use crate::error::StoreError;
use crate::format::{
    encode_record, seg_name, segment_header, segment_runs, Kind, Location, NodePtr, Ref,
    Superblock, MAX_SEGMENT_IDS, MAX_SEGMENT_RUNS, SEG_HEADER, SLOT_SIZE, SUPERBLOCK_FILE,
};
use crate::manifest::{Manifest, RootRecord, MAX_LABEL};
use crate::storage::Storage;
use crate::trie::{self, Delta};
use crate::{CommitReport, SnapshotId, SnapshotMeta, StoreOptions};
use pagesnap_pagetable::Vpn;
use std::collections::BTreeMap;

impl Store {
    /// After a superblock write whose outcome is unknown (it failed and so did its undo, or the
    /// backend panicked during it), before anything else: the failed commit used generation
    /// g + 1 and may be on the disk in one slot, whatever a read says (after a failed `fsync` a
    /// read can come from the cache). So the committed state is written at generation g + 2 into
    /// both slots, each synced: it outranks the failed commit wherever that landed, and only then
    /// may the failed commit's record space be reused. The writer lock is still ours, so nobody
    /// else changed anything. If the writes fail, the writer stays in doubt.
    fn recover_in_doubt(&mut self) -> Result<(), StoreError> {
        if !self.writer.as_ref().is_some_and(|w| w.in_doubt) {
            return Ok(());
        }
        let in_doubt = StoreError::InDoubt {
            path: self.io.location().into(),
        };
        let mut sb = self.sb.clone();
        sb.generation += 2;
        if sb.version < 3 {
            sb.version = crate::format::TRIE_FORMAT;
        }
        let bytes = sb.encode();
        // The failed commit's slot first: the other one holds the only known-good copy.
        let failed = ((self.sb.generation + 1) % 2) * SLOT_SIZE as u64;
        for at in [failed, SLOT_SIZE as u64 - failed] {
            if self
                .io
                .write(SUPERBLOCK_FILE, at, &bytes)
                .and_then(|_| self.io.sync(SUPERBLOCK_FILE))
                .is_err()
            {
                return Err(in_doubt);
            }
        }
        self.sb = sb;
        if let Some(w) = self.writer.as_mut() {
            w.in_doubt = false;
            w.degraded = false;
        }
        // Back to the committed state: the failed commit's records and segments are garbage.
        self.rollback();
        Ok(())
    }

    /// After a commit whose second superblock copy could not be written: try again, so that one
    /// damaged slot cannot lose that commit. Called before every change and when the store is
    /// dropped; while it keeps failing the store still works (and gc keeps old files). Not
    /// while a snapshot is being written or a commit was abandoned by a panic: a hint then would
    /// write out the log buffer under an open extent at the wrong place, or move the scan past
    /// bytes the commit's range crc covers (the next change retries; a commit abandoned by a
    /// panic gets its hint from `hint_if_owed`, which restores both slots too).
    pub(super) fn restore_redundancy(&mut self) {
        let Some(w) = self
            .writer
            .as_mut()
            .filter(|w| w.degraded && !w.in_doubt && w.pending.is_none() && !w.log.in_commit)
        else {
            return;
        };
        if self.sb.version >= 3 {
            // The slots hold hints: a fresh one into both (the generation moves on, so the two
            // slots never hold different states under one generation).
            if self.publish_hint().is_err() {
                if let Some(w) = self.writer.as_mut() {
                    w.log.need_hint = true;
                }
            }
            return;
        }
        let second = SLOT_SIZE as u64 - (self.sb.generation % 2) * SLOT_SIZE as u64;
        let copied = self
            .io
            .write(SUPERBLOCK_FILE, second, &self.sb.encode())
            .and_then(|_| self.io.sync(SUPERBLOCK_FILE));
        w.degraded = copied.is_err();
    }

    /// A rewrite (gc, upgrade) that never returned — its backend panicked — left the writer in
    /// its bulk mode, which writes no hint at a segment roll or inside a commit. Before its commit
    /// point (`publish` did not see its first superblock slot land) it is abandoned as a failed
    /// one is — again, if a panic interrupted the abandon itself: back to the committed state, a
    /// hint owed. After it, the rewrite stands, and the catalog is moved to it as the rewrite
    /// would have done.
    fn settle_rewrite(&mut self) -> Result<(), StoreError> {
        let committed = self
            .writer
            .as_ref()
            .filter(|w| w.log.bulk)
            .map(|w| w.log.bulk_committed);
        match committed {
            Some(false) => self.abandon_rewrite(),
            Some(true) => self.finish_rewrite()?,
            None => {}
        }
        Ok(())
    }

    /// Before a change: settle a rewrite that panicked, leave doubt, and restore the
    /// superblock's redundancy.
    pub(super) fn settle(&mut self) -> Result<(), StoreError> {
        self.settle_rewrite()?;
        self.recover_in_doubt()?;
        self.restore_redundancy();
        Ok(())
    }

    /// Starts a snapshot whose pages are those of `parent` (or none) plus what `put` and
    /// `remove` change.
    pub fn begin(&mut self, parent: Option<SnapshotId>) -> Result<(), StoreError> {
        self.settle()?;
        self.write_io()?;
        self.idle_writer("a snapshot is already being written; commit or abort it first")?;
        if self.is_log() {
            return self.begin3(parent);
        }
        let (base_root, base_count) = match parent {
            Some(p) => {
                let m = self.manifest(p)?;
                (m.index_root.map(|r| r.ptr()), m.page_count)
            }
            None => (None, 0),
        };
        let w = self.writer.as_mut().ok_or(StoreError::ReadOnly)?;
        w.pending = Some(Pending {
            parent,
            base_root,
            base_count,
            changes: Default::default(),
            fresh: Default::default(),
            pages_written: 0,
            changed: 0,
            map: None,
            start: (w.seg, w.off),
        });
        w.data_appended = 0;
        w.meta_appended = 0;
        Ok(())
    }

    /// Sets page `vpn` of the snapshot being written. All-zero pages are not stored (a zero page
    /// and an absent page are the same). Content already in the store is not written again.
    pub fn put(&mut self, vpn: Vpn, data: &[u8]) -> Result<(), StoreError> {
        if data.len() != self.sb.page_size as usize {
            return Err(StoreError::PageSize {
                len: data.len(),
                page_size: self.sb.page_size,
            });
        }
        if is_zero(data) {
            return self.remove(vpn);
        }
        let id = self.page_id(data);
        self.put_id(vpn, data, id)
    }

    /// [`Store::put`] for a caller that already computed the page's id (and knows the page is
    /// not all zero). In a store that is not encrypted the id is the content's blake3 and is
    /// trusted here; it is checked again on every read, so a wrong one is caught there.
    ///
    /// In an encrypted store a page's id is blake3 keyed with the store's dedup key: `hash` must
    /// be computed with [`Store::page_ids`]. It is checked against the page before it reaches
    /// the index (a page that dedups against one of this snapshot's is checked here, a new one
    /// in the compression threads, many pages at once, before its frame is appended); a wrong
    /// id — a plain blake3, say — is an error here or fails the commit, so it never becomes an
    /// id.
    pub fn put_hashed(&mut self, vpn: Vpn, data: &[u8], hash: [u8; 32]) -> Result<(), StoreError> {
        if self.crypt.is_none() {
            return self.put_id(vpn, data, hash);
        }
        if data.len() != self.sb.page_size as usize {
            return Err(StoreError::PageSize {
                len: data.len(),
                page_size: self.sb.page_size,
            });
        }
        if self.is_log() && self.compressing() {
            return self.put3(vpn, data, hash, true);
        }
        // (Every encrypted store frames its pages; this is for completeness.)
        let id = self.page_id(data);
        if id != hash {
            return Err(super::frames::wrong_page_id());
        }
        self.put_id(vpn, data, id)
    }

    /// Sets page `vpn` to page `i` of `pages`, with the id it was hashed to: removes it if that
    /// page is all zero. The id is taken as it is, in an encrypted store as well, because
    /// [`HashedPages`](crate::pagehash::HashedPages) computed it from the very bytes it holds;
    /// a batch hashed with another store's key (or hashed in clear for an encrypted store) is
    /// refused.
    pub fn put_hashed_pages(
        &mut self,
        vpn: Vpn,
        pages: &crate::pagehash::HashedPages,
        i: usize,
    ) -> Result<(), StoreError> {
        if !pages.hashed_with(self.crypt.as_ref().map(|c| &c.dedup)) {
            return Err(StoreError::Usage(
                "pages hashed with another store's page ids",
            ));
        }
        if pages.page_size() != self.sb.page_size as usize {
            return Err(StoreError::PageSize {
                len: pages.page_size(),
                page_size: self.sb.page_size,
            });
        }
        if i >= pages.len() {
            return Err(StoreError::Usage("page index past the hashed batch"));
        }
        match pages.id(i) {
            None => self.remove(vpn),
            Some(id) => self.put_id(vpn, pages.page(i), *id),
        }
    }

    /// [`Store::put_hashed`] with the page's id as this store computes it.
    fn put_id(&mut self, vpn: Vpn, data: &[u8], hash: [u8; 32]) -> Result<(), StoreError> {
        if data.len() != self.sb.page_size as usize {
            return Err(StoreError::PageSize {
                len: data.len(),
                page_size: self.sb.page_size,
            });
        }
        if self.is_log() {
            return self.put3(vpn, data, hash, false);
        }
        let dedup_root = self.sb.dedup;
        let mut wio = self.write_io()?;
        let fresh = wio
            .w
            .pending
            .as_ref()
            .ok_or(StoreError::Usage("put without begin"))?
            .fresh
            .get(&hash)
            .copied();
        let r = match fresh {
            Some(r) => r,
            None => match trie::get(&mut wio, dedup_root, dedup_key(&hash))? {
                // Reuse stored content only after reading it back intact: a damaged record must
                // not be linked into a new snapshot (a fresh copy is written instead, and the
                // dedup index is pointed at it on commit).
                Some(r) if r.hash == hash && intact(wio.io, &wio.w.segments, &r, data)? => r,
                _ => {
                    let loc = append(wio.io, wio.opts, wio.w, Kind::Page, vpn.0, &hash, data)?;
                    wio.w.data_appended += u64::from(loc.len);
                    let r = Ref { hash, loc };
                    let p = wio
                        .w
                        .pending
                        .as_mut()
                        .ok_or(StoreError::Usage("put without begin"))?;
                    p.fresh.insert(hash, r);
                    p.pages_written += 1;
                    r
                }
            },
        };
        let p = wio
            .w
            .pending
            .as_mut()
            .ok_or(StoreError::Usage("put without begin"))?;
        p.changes.insert(vpn.0, Some(r));
        self.flush_if_large()
    }

    /// Keeps the pending change list bounded: past `max_pending_changes` entries they are applied to
    /// an intermediate index root (whose superseded nodes gc reclaims), so a snapshot of any size
    /// is written in bounded memory.
    fn flush_if_large(&mut self) -> Result<(), StoreError> {
        let limit = self.opts.max_pending_changes.max(1);
        // Counted once per page: a page changed again out of order counts again until the list
        // is sorted, which is done first.
        let full = self
            .writer
            .as_mut()
            .and_then(|w| w.pending.as_mut())
            .is_some_and(|p| p.changes.len() >= limit && p.changes.sorted().len() >= limit);
        if full {
            self.flush_pending()?;
        }
        Ok(())
    }

    fn flush_pending(&mut self) -> Result<(), StoreError> {
        let mut wio = self.write_io()?;
        // Index nodes written by an earlier flush are read back below.
        flush_buffer(wio.io, wio.w)?;
        let Some(mut p) = wio.w.pending.take() else {
            return Ok(());
        };
        let result = (|| {
            let mut changes = Vec::with_capacity(p.changes.len());
            for (k, v) in std::mem::take(&mut p.changes).into_sorted() {
                let old = trie::get(&mut wio, p.base_root, k)?;
                if old.map(|r| r.hash) != v.map(|r| r.hash) {
                    changes.push((k, v));
                }
            }
            let mut delta = Delta::default();
            p.base_root = trie::apply(&mut wio, p.base_root, &changes, &mut delta)?;
            p.base_count = p.base_count + delta.added - delta.removed;
            p.changed += changes.len() as u64;
            Ok(())
        })();
        wio.w.pending = Some(p);
        result
    }

    /// Makes page `vpn` zero (absent) in the snapshot being written.
    pub fn remove(&mut self, vpn: Vpn) -> Result<(), StoreError> {
        let w = self.writer.as_mut().ok_or(StoreError::ReadOnly)?;
        let p = w
            .pending
            .as_mut()
            .ok_or(StoreError::Usage("remove without begin"))?;
        p.changes.insert(vpn.0, None);
        if self.is_log() {
            return Ok(());
        }
        self.flush_if_large()
    }

    /// Drops the snapshot being written; the store stays as last committed.
    pub fn abort(&mut self) {
        self.rollback();
    }

    pub(super) fn rollback(&mut self) {
        let sb = self.sb.clone();
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
        // The next commit writes where the dropped one did.
        self.forget_frames();
        if let Some(w) = self.writer.as_mut() {
            // Format 3's dedup map learned the dropped commit's pages as they were appended.
            w.log.dedup = None;
        }
        if let Some(w) = self.writer.as_mut().filter(|w| w.in_doubt) {
            // No reuse while in doubt, but reads of the committed state must still find its
            // segments (a failed gc dropped them from the list).
            w.pending = None;
            for id in &sb.segments {
                if let Err(i) = w.segments.binary_search(id) {
                    w.segments.insert(i, *id);
                }
            }
        }
        if let Some(w) = self.writer.as_mut().filter(|w| !w.in_doubt) {
            w.pending = None;
            // Best effort; open removes segments the superblock does not list anyway. Forgotten
            // only once all are removed: if a backend panics here, the next rollback removes them
            // again, and no new segment takes one of their names meanwhile (`new_segment`).
            for id in w.created.clone() {
                let _ = self.io.remove(&seg_name(id));
            }
            w.created.clear();
            w.segments = sb.segments.clone();
            w.seg = sb.active_segment;
            w.off = if sb.version >= 3 {
                super::log::committed_end(&sb)
            } else {
                sb.active_len
            };
            // Below the hint's position (a hint inside the dropped commit): the next commit
            // must not be written before a hint names where it starts, or open, scanning from
            // the old hint, would not find it (`abort` writes no hint of its own).
            if w.off != sb.active_len {
                w.log.need_hint = true;
            }
            w.log.unsynced_before_hint = false;
            w.cap = self.io.len(&seg_name(sb.active_segment)).unwrap_or(0);
            w.touched.clear();
            w.buf.restart(w.off);
            w.log.extent = None;
            w.frames.reset();
            w.log.range_crc = crc32fast::Hasher::new();
        }
    }

    /// Commits the snapshot being written: after `Ok`, it survives any crash.
    pub fn commit(&mut self, meta: SnapshotMeta) -> Result<CommitReport, StoreError> {
        if self.is_log() {
            return self.commit3(meta);
        }
        let result = self.commit_inner(meta);
        if result.is_err() {
            self.rollback();
        }
        result
    }

    fn commit_inner(&mut self, meta: SnapshotMeta) -> Result<CommitReport, StoreError> {
        let page_size = self.sb.page_size;
        let mut sb = self.sb.clone();
        let upgrade = self.manifests_to_copy(&sb)?;
        let mut wio = self.write_io()?;
        // Index nodes of earlier flushes are read back below.
        flush_buffer(wio.io, wio.w)?;
        let pending = wio
            .w
            .pending
            .take()
            .ok_or(StoreError::Usage("commit without begin"))?;
        // Changes that leave a page as it was in the parent are dropped: they would only rewrite
        // index nodes.
        let mut changes = Vec::with_capacity(pending.changes.len());
        for (k, v) in pending.changes.into_sorted() {
            let old = trie::get(&mut wio, pending.base_root, k)?;
            if old.map(|r| r.hash) != v.map(|r| r.hash) {
                changes.push((k, v));
            }
        }
        let mut delta = Delta::default();
        let root = trie::apply(&mut wio, pending.base_root, &changes, &mut delta)?;
        let page_count = pending.base_count + delta.added - delta.removed;
        let id = sb.next_snapshot;
        let cap = |mut s: String| {
            if s.len() > MAX_LABEL {
                let mut cut = MAX_LABEL;
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                s.truncate(cut);
            }
            s
        };
        let label = meta.label.map(cap);
        let origin = meta.origin.map(cap);
        let manifest = Manifest {
            id,
            parent: pending.parent.map(|p| p.0),
            epoch: meta.epoch.0,
            time_unix_ms: meta.time_unix_ms.unwrap_or_else(now_ms),
            label,
            logical_size: meta.logical_size,
            page_size,
            page_count,
            merkle_root: root.map(|p| p.merkle).unwrap_or(EMPTY_ROOT),
            index_root: root.as_ref().map(RootRecord::from_ptr),
            pages_written: pending.pages_written,
            pages_changed: pending.changed + changes.len() as u64,
            data_bytes: wio.w.data_appended,
            meta_bytes: wio.w.meta_appended,
            origin,
        };
        let bytes = manifest.to_bytes();
        let mhash = *blake3::hash(&bytes).as_bytes();
        let mloc = append(wio.io, wio.opts, wio.w, Kind::Manifest2, id, &mhash, &bytes)?;
        wio.w.meta_appended += u64::from(mloc.len);
        sb.catalog = trie::apply(
            &mut wio,
            sb.catalog,
            &[(
                id,
                Some(Ref {
                    hash: mhash,
                    loc: mloc,
                }),
            )],
            &mut Delta::default(),
        )?;
        // The second copy, in the catalog's copy.
        let mloc2 = append(wio.io, wio.opts, wio.w, Kind::Manifest2, id, &mhash, &bytes)?;
        wio.w.meta_appended += u64::from(mloc2.len);
        sb.catalog_copy = apply_catalog_copy(
            &mut wio,
            sb.catalog_copy,
            upgrade,
            vec![(
                id,
                Some(Ref {
                    hash: mhash,
                    loc: mloc2,
                }),
            )],
        )?;
        let mut fresh: Vec<(u64, Option<Ref>)> = pending
            .fresh
            .values()
            .map(|r| (dedup_key(&r.hash), Some(*r)))
            .collect();
        fresh.sort_unstable_by_key(|(k, _)| *k);
        fresh.dedup_by_key(|(k, _)| *k);
        // A 64-bit prefix already taken by other content keeps its first owner; one taken by the
        // same content was rewritten because the old record was damaged, and now points here.
        let mut new_keys = Vec::with_capacity(fresh.len());
        for (k, v) in fresh {
            let existing = trie::get(&mut wio, sb.dedup, k)?;
            if existing.is_none() || existing.map(|r| r.hash) == v.map(|r| r.hash) {
                new_keys.push((k, v));
            }
        }
        sb.dedup = trie::apply(&mut wio, sb.dedup, &new_keys, &mut Delta::default())?;
        sb.next_snapshot = id + 1;
        let (data_bytes, meta_bytes) = (wio.w.data_appended, wio.w.meta_appended);
        self.publish(sb)?;
        Ok(CommitReport {
            id: SnapshotId(id),
            pages_written: pending.pages_written,
            pages_changed: pending.changed + changes.len() as u64,
            page_count,
            data_bytes,
            meta_bytes,
            merkle_root: manifest.merkle_root,
        })
    }

    /// The commit point: sync every segment written, the directory if files were created, then
    /// write the new state into one superblock slot and sync it (the commit is durable), then into
    /// the other slot and sync it (the commit is redundant: one damaged slot loses nothing).
    ///
    /// Both slots hold the committed state whenever no commit is in flight (a writer's open
    /// repairs them), so while either slot is being written the other names a committed state.
    pub(super) fn publish(&mut self, mut sb: Superblock) -> Result<(), StoreError> {
        let io = &*self.io;
        let w = self.writer.as_mut().ok_or(StoreError::ReadOnly)?;
        flush_buffer(io, w)?;
        for id in &w.touched {
            let name = seg_name(*id);
            io.sync(&name).map_err(io_err(io, &name, "sync segment"))?;
        }
        if w.dir_dirty {
            io.sync_dir()
                .map_err(io_err(io, "", "sync store directory"))?;
        }
        sb.generation = self.sb.generation + 1;
        sb.active_segment = w.seg;
        sb.active_len = w.off;
        sb.segments = w.segments.clone();
        sb.segments.sort_unstable();
        sb.segment_bytes = self.opts.segment_bytes;
        let bytes = sb.encode();
        let first = (sb.generation % 2) * SLOT_SIZE as u64;
        let second = SLOT_SIZE as u64 - first;
        // Until the outcome of the slot write is known, the writer is in doubt: if a panic
        // unwinds out of the backend here, the flag stays set, so no rollback reuses the records
        // a half-written slot may name (the store must be reopened).
        w.in_doubt = true;
        let written = io
            .write(SUPERBLOCK_FILE, first, &bytes)
            .map_err(io_err(io, SUPERBLOCK_FILE, "write superblock"))
            .and_then(|_| {
                io.sync(SUPERBLOCK_FILE)
                    .map_err(io_err(io, SUPERBLOCK_FILE, "sync superblock"))
            });
        if let Err(e) = written {
            if self.sb.version >= 3 {
                // Format 3 (gc's commit point): the committed state goes into both slots at the
                // failed write's generation, first slot first, so that whichever landed, both
                // now name the committed state (and the next commit records carry that
                // generation). If that fails too, the writer is in doubt.
                let mut undo = self.sb.clone();
                undo.generation = sb.generation;
                let bytes = undo.encode();
                let ok = [first, second].into_iter().all(|at| {
                    io.write(SUPERBLOCK_FILE, at, &bytes)
                        .and_then(|_| io.sync(SUPERBLOCK_FILE))
                        .is_ok()
                });
                w.in_doubt = !ok;
                if ok {
                    self.sb.generation = undo.generation;
                    w.degraded = false;
                }
                return Err(e);
            }
            // The new slot may or may not have reached the disk. Put the committed state in that
            // slot again, so the failed commit cannot surface later over records we will reuse.
            let undone = io
                .write(SUPERBLOCK_FILE, first, &self.sb.encode())
                .and_then(|_| io.sync(SUPERBLOCK_FILE));
            w.in_doubt = undone.is_err();
            return Err(e);
        }
        w.in_doubt = false;
        // Durable from here: a crash now opens to this commit (the other slot is older).
        w.touched.clear();
        w.created.clear();
        w.dir_dirty = false;
        // A rewrite's (gc, upgrade) commit point: what `settle_rewrite` goes by if it panics.
        w.log.bulk_committed = w.log.bulk;
        self.sb = sb;
        w.degraded = true;
        let copied = io
            .write(SUPERBLOCK_FILE, second, &bytes)
            .and_then(|_| io.sync(SUPERBLOCK_FILE));
        // The commit stands either way. If the copy failed, only one slot names it; the next
        // commit writes the other slot first (generation parity), which is safe, but gc must not
        // remove files the other slot may still list until both slots agree again.
        w.degraded = copied.is_err();
        Ok(())
    }

    /// For a store without a catalog copy (written by format 1), every manifest, read and checked,
    /// to copy with the next commit; `None` when there is a copy (or nothing to copy).
    fn manifests_to_copy(&self, sb: &Superblock) -> Result<Option<ManifestCopies>, StoreError> {
        if sb.catalog_copy.is_some() || sb.catalog.is_none() {
            return Ok(None);
        }
        let mut out = Vec::new();
        for id in self.snapshot_ids()? {
            out.push((id.0, self.manifest(id)?.to_bytes()));
        }
        Ok(Some(out))
    }

    /// The writer, with no snapshot being written (else `Usage(busy)`).
    pub(super) fn idle_writer(&self, busy: &'static str) -> Result<(), StoreError> {
        match self.writer.as_ref().ok_or(StoreError::ReadOnly)?.pending {
            Some(_) => Err(StoreError::Usage(busy)),
            None => Ok(()),
        }
    }

    /// Makes [`Store::delete`] refuse snapshot `id` until a matching [`Store::unpin`]: for a user
    /// of the store (the engine) whose next snapshot, or whose lazily read pages, stand on it.
    /// Pins are counted, so one holder's unpin does not lift another's. They live in this handle
    /// only; they are not persisted.
    pub fn pin(&mut self, id: SnapshotId) {
        *self.pinned.entry(id).or_insert(0) += 1;
    }

    /// Lifts one [`Store::pin`] of `id` (nothing if it holds none).
    pub fn unpin(&mut self, id: SnapshotId) {
        if let Some(n) = self.pinned.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.pinned.remove(&id);
            }
        }
    }

    /// The pinned snapshots, ascending.
    pub fn pinned(&self) -> Vec<SnapshotId> {
        self.pinned.keys().copied().collect()
    }

    /// Deletes snapshots (a commit). Their space is reclaimed by [`Store::gc`]. A pinned snapshot
    /// is refused with [`StoreError::Pinned`] and nothing is deleted.
    pub fn delete(&mut self, ids: &[SnapshotId]) -> Result<(), StoreError> {
        self.settle()?;
        self.idle_writer("a snapshot is being written; commit or abort it before deleting")?;
        let known = self.snapshot_ids()?;
        if let Some(missing) = ids.iter().find(|id| !known.contains(id)) {
            return Err(StoreError::UnknownSnapshot(*missing));
        }
        if let Some(pinned) = ids.iter().find(|id| self.pinned.contains_key(id)) {
            return Err(StoreError::Pinned(*pinned));
        }
        if self.is_log() {
            return self.delete3(ids);
        }
        let mut changes: Vec<(u64, Option<Ref>)> = ids.iter().map(|id| (id.0, None)).collect();
        changes.sort_unstable_by_key(|(k, _)| *k);
        changes.dedup_by_key(|(k, _)| *k);
        let result = (|| {
            let mut sb = self.sb.clone();
            let upgrade = self.manifests_to_copy(&sb)?;
            let mut wio = self.write_io()?;
            sb.catalog = trie::apply(&mut wio, sb.catalog, &changes, &mut Delta::default())?;
            sb.catalog_copy =
                apply_catalog_copy(&mut wio, sb.catalog_copy, upgrade, changes.clone())?;
            self.publish(sb)
        })();
        if result.is_err() {
            self.rollback();
        }
        result
    }
}

/// True if the page record `r` reads back, passes its checks and holds exactly `data`.
fn intact(io: &dyn Storage, segments: &[u32], r: &Ref, data: &[u8]) -> Result<bool, StoreError> {
    match read_record(io, segments, &r.loc, Kind::Page) {
        Ok((_, hash, payload)) => Ok(hash == r.hash && payload == data),
        Err(e) if e.is_corruption() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Manifests to copy into a new catalog copy: (snapshot id, manifest bytes).
type ManifestCopies = Vec<(u64, Vec<u8>)>;

/// Applies `changes` (sorted, key-unique) to the catalog copy at `root`; with `upgrade` (a store
/// that had no copy), first writes a copy of each of those manifests and builds the copy anew.
fn apply_catalog_copy(
    wio: &mut WriteIo<'_>,
    root: Option<NodePtr>,
    upgrade: Option<ManifestCopies>,
    changes: Vec<(u64, Option<Ref>)>,
) -> Result<Option<NodePtr>, StoreError> {
    let Some(manifests) = upgrade else {
        return trie::apply(wio, root, &changes, &mut Delta::default());
    };
    let mut all: BTreeMap<u64, Option<Ref>> = BTreeMap::new();
    for (id, bytes) in manifests {
        let hash = *blake3::hash(&bytes).as_bytes();
        let loc = append(wio.io, wio.opts, wio.w, Kind::Manifest2, id, &hash, &bytes)?;
        wio.w.meta_appended += u64::from(loc.len);
        all.insert(id, Some(Ref { hash, loc }));
    }
    all.extend(changes);
    let entries: Vec<(u64, Option<Ref>)> = all.into_iter().filter(|(_, r)| r.is_some()).collect();
    trie::apply(wio, None, &entries, &mut Delta::default())
}

pub(super) fn new_segment(
    io: &dyn Storage,
    opts: &StoreOptions,
    w: &mut Writer,
    version: u32,
) -> Result<(), StoreError> {
    // Above every listed segment and every file this writer created (one whose sizing failed is
    // created but not listed). A file of that name that exists already (left by a create whose
    // backend panicked after it made the file, or by anything else) is never touched: the next
    // name is tried.
    let first = w
        .segments
        .last()
        .copied()
        .into_iter()
        .chain(w.created.iter().copied())
        .max()
        .unwrap_or(0);
    let mut tries = 0u32;
    let (id, name) = loop {
        let id = first
            .checked_add(1 + tries)
            .ok_or(StoreError::TooManySegments {
                count: w.segments.len(),
            })?;
        let mut with_new = w.segments.clone();
        with_new.push(id);
        if with_new.len() > MAX_SEGMENT_IDS || segment_runs(&with_new).len() > MAX_SEGMENT_RUNS {
            return Err(StoreError::TooManySegments {
                count: w.segments.len(),
            });
        }
        let name = seg_name(id);
        match io.create(&name) {
            Ok(()) => break (id, name),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 4 => tries += 1,
            Err(e) => return Err(io_err(io, &name, "create segment")(e)),
        }
    };
    // Removed again by a rollback; listed only once it has its size and header.
    w.created.push(id);
    w.dir_dirty = true;
    let cap = opts.preallocate.min(opts.segment_bytes).max(SEG_HEADER);
    io.set_len(&name, cap)
        .map_err(io_err(io, &name, "size segment"))?;
    io.write(&name, 0, &segment_header(id, version))
        .map_err(io_err(io, &name, "write segment header"))?;
    w.segments.push(id);
    w.touched.insert(id);
    w.seg = id;
    w.off = SEG_HEADER;
    w.buf.restart(w.off);
    w.cap = cap;
    Ok(())
}

/// The largest step a segment grows by (unless [`StoreOptions::preallocate`] is larger): open
/// scans the active segment from the hint to the file's end, so the zeros past the last record
/// (at most one step) are read by every open while a writer has the store (a writer trims them
/// when it closes).
const MAX_GROWTH: u64 = 16 << 20;

/// The size a segment of size `cap` is grown to when a write must reach `end`: by
/// [`StoreOptions::preallocate`] or by `cap` (doubling) up to [`MAX_GROWTH`], never past the
/// segment size (or past `end`, for a record larger than that). Growing the file waits for the
/// bulk writes in flight (the file system drains them before it changes the size) and holds
/// the writer thread off the device meanwhile, so a large snapshot grows its segment in steps of
/// 8, then 16 MiB: 16 growths for a 256 MiB segment instead of 32, each a pause of 1–2 ms in the
/// writes (measured on the engine's 256 MiB first snapshot), and a checkpointing space (3 MiB a
/// commit) grows it every fifth commit instead of every third.
pub(super) fn grown_cap(cap: u64, end: u64, preallocate: u64, segment_bytes: u64) -> u64 {
    cap.saturating_add(preallocate.max(cap.min(MAX_GROWTH)))
        .max(end)
        .min(segment_bytes.max(end))
}

/// Appended records are gathered into writes of this size: whole-page writes spare the
/// filesystem zero-filling the rest of each fresh page (records are not page-sized).
pub(super) const WRITE_BUFFER: usize = 1 << 20;

/// Writes the buffered records of the active segment (whole blocks in bulk, see
/// `buffer.rs`).
pub(super) fn flush_buffer(io: &dyn Storage, w: &mut Writer) -> Result<(), StoreError> {
    write_buffer(io, w, true)
}

/// [`flush_buffer`] while a commit goes on: the whole blocks only, the last partial block stays
/// buffered.
pub(super) fn flush_blocks(io: &dyn Storage, w: &mut Writer) -> Result<(), StoreError> {
    write_buffer(io, w, false)
}

fn write_buffer(io: &dyn Storage, w: &mut Writer, all: bool) -> Result<(), StoreError> {
    let name = seg_name(w.seg);
    w.buf
        .write_out(io, &name, w.off, all)
        .map_err(io_err(io, &name, "write records"))
}

pub(super) fn append(
    io: &dyn Storage,
    opts: &StoreOptions,
    w: &mut Writer,
    kind: Kind,
    key: u64,
    hash: &[u8; 32],
    payload: &[u8],
) -> Result<Location, StoreError> {
    let rec = encode_record(kind, key, hash, payload);
    let len = rec.len() as u64;
    if w.off + len > opts.segment_bytes && w.off > SEG_HEADER {
        // Trim the full segment to its records and move on to a new one.
        flush_buffer(io, w)?;
        let name = seg_name(w.seg);
        io.set_len(&name, w.off)
            .map_err(io_err(io, &name, "trim segment"))?;
        w.touched.insert(w.seg);
        new_segment(io, opts, w, crate::format::TRIE_FORMAT)?;
    }
    let name = seg_name(w.seg);
    if w.off + len > w.cap {
        // Formats 1 and 2 keep their fixed steps (their golden stores hold the bytes).
        let cap = (w.cap + opts.preallocate)
            .max(w.off + len)
            .min(opts.segment_bytes.max(w.off + len));
        io.set_len(&name, cap)
            .map_err(io_err(io, &name, "grow segment"))?;
        w.cap = cap;
    }
    w.buf.extend_from_slice(&rec);
    let loc = Location {
        segment: w.seg,
        offset: w.off,
        len: u32::try_from(len).unwrap_or(u32::MAX),
        slot: 0,
    };
    w.off += len;
    w.touched.insert(w.seg);
    if w.buf.len() >= WRITE_BUFFER {
        flush_blocks(io, w)?;
    }
    Ok(loc)
}

pub(super) fn is_zero(data: &[u8]) -> bool {
    let words = data.chunks_exact(8);
    let tail = words.remainder();
    words.into_iter().all(|w| w == [0u8; 8]) && tail.iter().all(|b| *b == 0)
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
