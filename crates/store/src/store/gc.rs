//! Space: the live records of the committed state, the space check (`check`), and gc, which copies
//! live records into fresh segments and commits them. See `docs/format.md` for why gc is
//! crash-safe.

use super::commit::{append, new_segment};
use super::{corrupt, dedup_key, io_err, load_node, read_record, Store, WriteIo};
use crate::error::StoreError;
use crate::format::{seg_name, Kind, Location, NodePtr, Ref, SEG_HEADER};
use crate::manifest::{Manifest, RootRecord};
use crate::storage::Storage;
use crate::trie::{self, Delta, Node, NodeIo, Slot};
use crate::{GcReport, SpaceReport};
use std::collections::{BTreeMap, HashMap};

impl Store {
    /// Every record location reachable from the committed state, with its length (for `check`
    /// and the corruption campaign).
    #[doc(hidden)]
    pub fn live_records(&self) -> Result<BTreeMap<Location, u64>, StoreError> {
        if self.is_log() {
            return self.live_records3();
        }
        let mut live = BTreeMap::new();
        let mut rio = self.read_io();
        for root in [self.sb.catalog, self.sb.dedup, self.sb.catalog_copy] {
            trie::for_each_node(&mut rio, root, &mut |p, _| {
                Ok(live.insert(p.loc, u64::from(p.loc.len)).is_none())
            })?;
        }
        // Page records only the dedup index names (a deleted snapshot's pages) are not live: gc
        // drops them and rebuilds the index without them.
        for root in [self.sb.catalog, self.sb.catalog_copy] {
            trie::for_each(&mut self.read_io(), root, &mut |_, r| {
                live.insert(r.loc, u64::from(r.loc.len));
                Ok(())
            })?;
        }
        for id in self.snapshot_ids()? {
            let root = self.manifest(id)?.index_root.map(|r| r.ptr());
            let mut rio = self.read_io();
            let mut pages = Vec::new();
            trie::for_each_node(&mut rio, root, &mut |p, n| {
                if live.insert(p.loc, u64::from(p.loc.len)).is_some() {
                    return Ok(false);
                }
                for (_, s) in &n.slots {
                    if let Slot::Entry(_, r) = s {
                        pages.push(r.loc);
                    }
                }
                Ok(true)
            })?;
            for loc in pages {
                live.insert(loc, u64::from(loc.len));
            }
        }
        Ok(live)
    }

    /// Record bytes in the store's segments, how many of them a retained snapshot (or the store's
    /// own indexes) uses, and the rest: leaked space that [`Store::gc`] reclaims.
    pub fn check(&self) -> Result<SpaceReport, StoreError> {
        let (live, pages, page_bytes) = if self.is_log() {
            let (live, pages, page_bytes) = self.live_records3_counted()?;
            (live.values().sum(), pages, page_bytes)
        } else {
            (self.live_records()?.values().sum(), 0, 0)
        };
        let mut file_bytes = 0;
        for id in &self.sb.segments {
            let len = if *id == self.sb.active_segment {
                self.sb.active_len
            } else {
                let name = seg_name(*id);
                self.io
                    .len(&name)
                    .map_err(io_err(&*self.io, &name, "stat segment"))?
            };
            file_bytes += len.saturating_sub(SEG_HEADER);
        }
        Ok(SpaceReport {
            record_bytes: file_bytes,
            live_bytes: live,
            leaked_bytes: file_bytes.saturating_sub(live),
            pages,
            page_bytes,
        })
    }

    /// Reclaims every byte no retained snapshot uses, by copying the live records into new
    /// segments, committing, then removing the old segments. Crash-safe: until the commit the old
    /// state is intact; after it, old segments are leftovers that open removes.
    pub fn gc(&mut self) -> Result<GcReport, StoreError> {
        self.settle()?;
        self.idle_writer("a snapshot is being written; commit or abort it before gc")?;
        if self.is_log() {
            return self.gc3();
        }
        let before = self.check()?;
        if before.leaked_bytes == 0 {
            return Ok(GcReport {
                bytes_before: before.record_bytes,
                bytes_after: before.record_bytes,
                bytes_freed: 0,
                segments_removed: 0,
            });
        }
        let old_segments = self.sb.segments.clone();
        let result = self.gc_copy();
        match result {
            Ok(()) => {}
            Err(e) => {
                self.rollback();
                return Err(e);
            }
        }
        let keep_old = self.writer.as_ref().is_some_and(|w| w.degraded);
        for id in old_segments.iter().filter(|_| !keep_old) {
            let name = seg_name(*id);
            self.io
                .remove(&name)
                .map_err(io_err(&*self.io, &name, "remove old segment"))?;
        }
        self.io
            .sync_dir()
            .map_err(io_err(&*self.io, "", "sync store directory"))?;
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let after = self.check()?;
        Ok(GcReport {
            bytes_before: before.record_bytes,
            bytes_after: after.record_bytes,
            bytes_freed: before.record_bytes.saturating_sub(after.record_bytes),
            segments_removed: if keep_old { 0 } else { old_segments.len() },
        })
    }

    fn gc_copy(&mut self) -> Result<(), StoreError> {
        let ids = self.snapshot_ids()?;
        let manifests: Vec<Manifest> = ids
            .iter()
            .map(|id| self.manifest(*id))
            .collect::<Result<_, _>>()?;
        let old_segments = self.sb.segments.clone();
        let mut sb = self.sb.clone();
        let io = self.io.clone();
        let mut wio = self.write_io()?;
        // New records go to fresh segments only.
        new_segment(&*io, wio.opts, wio.w, crate::format::TRIE_FORMAT)?;
        wio.w
            .segments
            .retain(|s| !old_segments.contains(s) || *s == 0);
        let mut segs_for_read = old_segments.clone();
        segs_for_read.extend(wio.w.segments.iter().copied());
        let mut page_map: HashMap<Location, Location> = HashMap::new();
        let mut node_map: HashMap<Location, NodePtr> = HashMap::new();
        let mut dedup: BTreeMap<u64, Ref> = BTreeMap::new();
        let mut catalog = Vec::new();
        let mut catalog_copy = Vec::new();
        for mut m in manifests {
            let root = m.index_root.as_ref().map(|r| r.ptr());
            let new_root = match root {
                Some(p) => Some(copy_node(
                    &*io,
                    &segs_for_read,
                    &mut wio,
                    &p,
                    &mut node_map,
                    &mut page_map,
                    &mut dedup,
                )?),
                None => None,
            };
            m.index_root = new_root.as_ref().map(RootRecord::from_ptr);
            let bytes = m.to_bytes();
            let hash = *blake3::hash(&bytes).as_bytes();
            let loc = append(&*io, wio.opts, wio.w, Kind::Manifest2, m.id, &hash, &bytes)?;
            catalog.push((m.id, Some(Ref { hash, loc })));
            let loc = append(&*io, wio.opts, wio.w, Kind::Manifest2, m.id, &hash, &bytes)?;
            catalog_copy.push((m.id, Some(Ref { hash, loc })));
        }
        sb.catalog = trie::apply(&mut wio, None, &catalog, &mut Delta::default())?;
        sb.catalog_copy = trie::apply(&mut wio, None, &catalog_copy, &mut Delta::default())?;
        let dedup: Vec<(u64, Option<Ref>)> = dedup.into_iter().map(|(k, r)| (k, Some(r))).collect();
        sb.dedup = trie::apply(&mut wio, None, &dedup, &mut Delta::default())?;
        wio.w.dir_dirty = true;
        self.publish(sb)
    }
}

#[allow(clippy::too_many_arguments)]
fn copy_node(
    io: &dyn Storage,
    segs: &[u32],
    wio: &mut WriteIo<'_>,
    ptr: &NodePtr,
    node_map: &mut HashMap<Location, NodePtr>,
    page_map: &mut HashMap<Location, Location>,
    dedup: &mut BTreeMap<u64, Ref>,
) -> Result<NodePtr, StoreError> {
    if let Some(p) = node_map.get(&ptr.loc) {
        return Ok(*p);
    }
    let node = load_node(io, segs, wio.cache, ptr)?;
    let mut slots = Vec::with_capacity(node.slots.len());
    for (d, s) in &node.slots {
        let s = match *s {
            Slot::Entry(k, r) => {
                let loc = match page_map.get(&r.loc) {
                    Some(l) => *l,
                    None => {
                        let (key, hash, payload) = read_record(io, segs, &r.loc, Kind::Page)?;
                        if hash != r.hash || *blake3::hash(&payload).as_bytes() != r.hash {
                            return Err(corrupt(io, &seg_name(r.loc.segment), "page record", r.loc.offset, "content does not match its blake3 hash; delete the damaged snapshot before gc"));
                        }
                        let l = append(io, wio.opts, wio.w, Kind::Page, key, &hash, &payload)?;
                        page_map.insert(r.loc, l);
                        dedup
                            .entry(dedup_key(&hash))
                            .or_insert(Ref { hash, loc: l });
                        l
                    }
                };
                Slot::Entry(k, Ref { hash: r.hash, loc })
            }
            Slot::Child(p) => Slot::Child(copy_node(io, segs, wio, &p, node_map, page_map, dedup)?),
        };
        slots.push((*d, s));
    }
    let new = wio.store(&Node {
        depth: node.depth,
        slots,
    })?;
    node_map.insert(ptr.loc, new);
    Ok(new)
}

/// Format 3: the records a retained snapshot or the catalog needs, and gc and upgrade, which copy
/// them into new segments and commit by one superblock write.
mod log_space {
    use super::super::log::{link_of, read_commit, set_link, LogWriter};
    use super::super::Store;
    use crate::catalog::{CommitRecord, Link};
    use crate::error::StoreError;
    use crate::format::{
        record_len, seg_name, Kind, Location, Ref, REC_HEADER, REC_MAGIC, SEG_HEADER,
    };
    use crate::index::{ContentRoot, PageMap, MAX_CHAIN_DELTAS};
    use crate::manifest::{ManifestV3, RecordRef};
    use crate::{GcReport, SnapshotId};
    use std::collections::{BTreeMap, HashMap, HashSet};

    /// Reads (and checks) a page where it is now: gc and upgrade read through different paths.
    type ReadPage = dyn Fn(&Store, &Ref) -> Result<Vec<u8>, StoreError>;

    impl Store {
        /// The commit records from the head back to the last checkpoint, both copies.
        pub(in crate::store) fn commit_chain(&self) -> Result<Vec<Link>, StoreError> {
            let mut out = Vec::new();
            let mut next = link_of(&self.sb);
            let mut ignore = Vec::new();
            while let Some(l) = next {
                out.push(l);
                if out.len() > (1 << 24) {
                    break;
                }
                let rec = read_commit(
                    &*self.io,
                    self.segments(),
                    &l,
                    &mut ignore,
                    self.crypt.as_deref(),
                )?;
                if rec.checkpoint.is_some() {
                    break;
                }
                next = rec.prev;
            }
            Ok(out)
        }

        /// A writer's open: each commit record back to the checkpoint whose one copy is damaged
        /// (a torn last commit, or damage since) is rewritten from the other, so one flipped bit
        /// loses nothing later either. Best effort: what cannot be repaired stays reported.
        pub(in crate::store) fn repair_commit_copies(&mut self) -> Result<usize, StoreError> {
            let mut repaired = 0;
            let links = match self.commit_chain() {
                Ok(l) => l,
                Err(e) if e.is_corruption() => return Ok(0),
                Err(e) => return Err(e),
            };
            let mut touched = std::collections::BTreeSet::new();
            for l in links {
                let read = |r: &RecordRef| -> Option<Vec<u8>> {
                    let name = seg_name(r.segment);
                    let mut buf = vec![0u8; r.len as usize];
                    self.io.read(&name, r.offset, &mut buf).ok()?;
                    let rec = crate::format::decode_record(&buf, Kind::Commit).ok()?;
                    (*blake3::hash(rec.payload).as_bytes() == r.hash).then_some(buf)
                };
                let (a, b) = (read(&l.a), read(&l.b));
                let fix = match (&a, &b) {
                    (Some(good), None) => Some((l.b, good.clone())),
                    (None, Some(good)) => Some((l.a, good.clone())),
                    _ => None,
                };
                if let Some((bad, bytes)) = fix {
                    let name = seg_name(bad.segment);
                    if self.io.write(&name, bad.offset, &bytes).is_ok() {
                        touched.insert(name);
                        repaired += 1;
                    }
                }
            }
            for name in touched {
                self.io.sync(&name).map_err(super::io_err(
                    &*self.io,
                    &name,
                    "sync repaired commit record",
                ))?;
            }
            if repaired > 0 {
                self.catalog.damage.retain(|d| !d.contains("commit record"));
            }
            Ok(repaired)
        }

        /// The records of one segment, in order, as (offset, kind, length), up to `end` or the
        /// first bytes that are not a record header.
        fn segment_records(&self, id: u32, end: u64) -> Result<Vec<(u64, u8, u64)>, StoreError> {
            let name = seg_name(id);
            let mut out = Vec::new();
            let mut at = SEG_HEADER;
            let mut head = [0u8; REC_HEADER];
            while at + REC_HEADER as u64 <= end {
                if self.io.read(&name, at, &mut head).is_err() || head[..4] != REC_MAGIC {
                    break;
                }
                let mut l = [0u8; 4];
                l.copy_from_slice(&head[8..12]);
                let len = record_len(u32::from_le_bytes(l) as usize) as u64;
                if at + len > end {
                    break;
                }
                out.push((at, head[4], len));
                at += len;
            }
            Ok(out)
        }

        /// The extents holding `pages` (ascending, distinct), each with its pages; and the pages
        /// in no extent found (the record headers before them are damaged).
        #[allow(clippy::type_complexity)]
        pub(in crate::store) fn extents_of(
            &self,
            pages: &[Location],
        ) -> Result<(BTreeMap<Location, Vec<Location>>, Vec<Location>), StoreError> {
            let mut by_segment: BTreeMap<u32, Vec<Location>> = BTreeMap::new();
            for p in pages {
                by_segment.entry(p.segment).or_default().push(*p);
            }
            let mut out: BTreeMap<Location, Vec<Location>> = BTreeMap::new();
            let mut alone = Vec::new();
            for (id, pages) in by_segment {
                let end = if id == self.sb.active_segment {
                    self.sb.active_len
                } else {
                    self.io.len(&seg_name(id)).unwrap_or(0)
                };
                let records = self.segment_records(id, end)?;
                let extents: Vec<(u64, u64)> = records
                    .into_iter()
                    .filter(|(_, k, _)| *k == Kind::Pages as u8)
                    .map(|(at, _, len)| (at, len))
                    .collect();
                for p in pages {
                    let i = extents.partition_point(|(at, _)| *at <= p.offset);
                    match i.checked_sub(1).map(|i| extents[i]) {
                        Some((at, len)) if p.offset + u64::from(p.len) <= at + len => {
                            let e = Location {
                                segment: id,
                                offset: at,
                                len: u32::try_from(len).unwrap_or(u32::MAX),
                                slot: 0,
                            };
                            out.entry(e).or_default().push(p);
                        }
                        _ => alone.push(p),
                    }
                }
            }
            Ok((out, alone))
        }

        /// [`Store::live_records`] for format 3: commit records back to the checkpoint, the
        /// chunks of every retained snapshot's chain, and the extents holding a page one of
        /// those maps names (with the bytes of that extent that are live).
        pub(in crate::store) fn live_records3(
            &self,
        ) -> Result<BTreeMap<Location, u64>, StoreError> {
            self.live_records3_counted().map(|(live, _, _)| live)
        }

        /// [`Store::live_records3`], with the distinct pages named and the bytes of their share
        /// of the records holding them.
        #[allow(clippy::type_complexity)]
        pub(in crate::store) fn live_records3_counted(
            &self,
        ) -> Result<(BTreeMap<Location, u64>, u64, u64), StoreError> {
            let mut live = BTreeMap::new();
            let mut page_bytes = 0u64;
            for l in self.commit_chain()? {
                for r in [l.a, l.b] {
                    live.insert(r.loc(), u64::from(r.len));
                }
            }
            // Pages a retained snapshot's map names (not every entry of its chain: an entry a
            // later delta replaced names a page gc does not copy).
            let mut pages: Vec<Location> = Vec::new();
            let mut seen = HashSet::new();
            for m in self.catalog.manifests.values() {
                let mut next = m.index.map(|r| r.chunk());
                while let Some(r) = next {
                    if !seen.insert(r.loc) {
                        break;
                    }
                    live.insert(r.loc, u64::from(r.loc.len));
                    next = self.read_chunk(&r)?.prev;
                }
                pages.extend(self.page_map(SnapshotId(m.id))?.values().map(|r| r.loc));
            }
            pages.sort_unstable();
            pages.dedup();
            let distinct = pages.len() as u64;
            // A frame counts its share of its bytes: the fraction of its pages a map names (gc
            // rewrites those, compressed again, and drops the rest).
            let mut frames: BTreeMap<Location, u64> = BTreeMap::new();
            for p in pages.iter().filter(|p| p.slot > 0) {
                *frames.entry(Location { slot: 0, ..*p }).or_default() += 1;
            }
            pages.retain(|p| p.slot == 0);
            for (f, named) in frames {
                let total = self.frame_pages(f).unwrap_or(named).max(named);
                let share = u64::from(f.len) * named / total;
                page_bytes += share;
                live.insert(f, share);
            }
            let (extents, alone) = self.extents_of(&pages)?;
            // An extent counts its header and the pages something names (gc copies those).
            let page = u64::from(self.sb.page_size);
            for (e, in_it) in &extents {
                let total = (u64::from(e.len).saturating_sub(64)) / page;
                let dead = total.saturating_sub(in_it.len() as u64);
                live.insert(*e, u64::from(e.len) - dead * page);
                page_bytes += u64::from(e.len) - dead * page;
            }
            // A page outside any extent found (a damaged header before it): counted alone.
            for p in alone {
                live.insert(p, u64::from(p.len));
                page_bytes += u64::from(p.len);
            }
            Ok((live, distinct, page_bytes))
        }

        /// Copies what the maps (ascending by snapshot) name into the active (new) segments:
        /// pages into extents (each once), each map as a delta on the one before or a new base
        /// (the writer's rule), then one checkpoint commit record; returns the new manifests and
        /// the record's link. `read` reads (and checks) a page where it is now.
        #[allow(clippy::type_complexity)]
        fn copy_maps(
            &mut self,
            snapshots: Vec<(ManifestV3, PageMap)>,
            read: &ReadPage,
        ) -> Result<(Vec<ManifestV3>, Link), StoreError> {
            let mut moved: HashMap<Location, Location> = HashMap::new();
            // Pages copied for the map at hand (their new places may be placeholders).
            let mut framed: Vec<Location> = Vec::new();
            let mut out = Vec::new();
            let mut prev_map: Option<(PageMap, ManifestV3)> = None;
            for (mut m, old_map) in snapshots {
                // Relocate every page the map names (copied once, checked as it is read).
                let mut map = PageMap::new();
                for (k, r) in &old_map {
                    let loc = match moved.get(&r.loc) {
                        Some(l) => *l,
                        None => {
                            let bytes = read(self, r)?;
                            let l = if self.compressing() {
                                self.frame_page(&bytes, r.hash, false)?
                            } else {
                                self.append_page(&bytes)?
                            };
                            moved.insert(r.loc, l);
                            framed.push(r.loc);
                            l
                        }
                    };
                    map.insert(*k, Ref { hash: r.hash, loc });
                }
                // Every page in its place before the map is written (frames compressed on
                // every core meanwhile).
                self.drain_frames()?;
                {
                    let w = self.log_writer()?;
                    Store::resolve_refs(w, map.values_mut())?;
                    for old in framed.drain(..) {
                        if let Some(l) = moved.get_mut(&old) {
                            *l = w.frames.resolve(*l)?;
                        }
                    }
                }
                // A delta against the snapshot before (in id order), or a base (the writer's
                // rule): only pages a retained map names are copied.
                let delta: Vec<(u64, Option<Ref>)> = match &prev_map {
                    Some((pm, _)) => {
                        let mut d = Vec::new();
                        for (k, r) in &map {
                            if pm.get(k).map(|x| x.hash) != Some(r.hash) {
                                d.push((*k, Some(*r)));
                            }
                        }
                        for k in pm.keys() {
                            if !map.contains_key(k) {
                                d.push((*k, None));
                            }
                        }
                        d.sort_unstable_by_key(|(k, _)| *k);
                        d
                    }
                    None => Vec::new(),
                };
                let parent = prev_map.as_ref().map(|(_, pm)| pm.clone());
                let rebase = match &parent {
                    None => true,
                    Some(p) => {
                        p.index.is_none()
                            || p.chain_entries + delta.len() as u64 > p.base_entries
                            || p.chain_deltas >= MAX_CHAIN_DELTAS
                    }
                };
                if rebase {
                    let all: Vec<(u64, Option<Ref>)> =
                        map.iter().map(|(k, r)| (*k, Some(*r))).collect();
                    let head = self.write_chunks(true, None, &all)?;
                    m.index = head.map(|p| RecordRef::new(p.loc, p.hash));
                    m.base_entries = all.len() as u64;
                    m.chain_entries = 0;
                    m.chain_deltas = 0;
                } else if let Some(p) = parent {
                    let head = if delta.is_empty() {
                        p.index.map(|r| r.chunk())
                    } else {
                        self.write_chunks(false, p.index.map(|r| r.chunk()), &delta)?
                    };
                    m.index = head.map(|p| RecordRef::new(p.loc, p.hash));
                    m.base_entries = p.base_entries;
                    m.chain_entries = p.chain_entries + delta.len() as u64;
                    m.chain_deltas = p.chain_deltas + u32::from(!delta.is_empty());
                }
                m.content_root = ContentRoot::of(&map).to_bytes();
                m.page_count = map.len() as u64;
                prev_map = Some((map, m.clone()));
                out.push(m);
            }
            self.seal_extent()?;
            let rec = CommitRecord {
                // The superblock written next (the commit point) has the next generation.
                hint_gen: self.sb.generation + 1,
                seq: self.catalog.seq + 1,
                range_crc: 0,
                prev: None,
                next_snapshot: self.sb.next_snapshot,
                added: None,
                deleted: Vec::new(),
                checkpoint: Some(out.clone()),
            };
            let bytes = self.seal_meta(Kind::Commit, rec.seq, rec.to_bytes())?;
            let hash = *blake3::hash(&bytes).as_bytes();
            let a = self.append3(Kind::Commit, rec.seq, &hash, &bytes)?;
            let b = self.append3_in(Kind::Commit, rec.seq, &hash, &bytes, false)?;
            Ok((
                out,
                Link {
                    a: RecordRef::new(a, hash),
                    b: RecordRef::new(b, hash),
                },
            ))
        }

        /// Copies into new segments and commits by one superblock write (both slots), then
        /// removes the old segments. `version` is the format the new superblock is in.
        fn rewrite(
            &mut self,
            snapshots: Vec<(ManifestV3, PageMap)>,
            read: &ReadPage,
        ) -> Result<usize, StoreError> {
            let old_segments = self.sb.segments.clone();
            let io = self.io.clone();
            let opts = self.opts;
            let version = if self.sb.version < 3 {
                crate::format::FORMAT_VERSION
            } else {
                self.sb.version
            };
            let started = {
                let w = self.log_writer()?;
                w.log = LogWriter {
                    bulk: true,
                    ..LogWriter::default()
                };
                // New records go to fresh segments only.
                super::new_segment(&*io, &opts, w, version)
            };
            if let Err(e) = started {
                self.abandon_rewrite();
                return Err(e);
            }
            let copied = self.copy_maps(snapshots, read);
            let (manifests, link) = match copied {
                Ok(x) => x,
                Err(e) => {
                    self.abandon_rewrite();
                    return Err(e);
                }
            };
            let mut sb = self.sb.clone();
            set_link(&mut sb, Some(link));
            sb.dedup = None;
            // gc keeps the store's format; an upgrade writes the newest.
            if sb.version < 3 {
                sb.version = crate::format::FORMAT_VERSION;
            }
            if let Some(w) = self.writer.as_mut() {
                w.segments.retain(|s| !old_segments.contains(s));
                w.dir_dirty = true;
            }
            if let Err(e) = self.publish(sb) {
                self.abandon_rewrite();
                return Err(e);
            }
            self.catalog.manifests = manifests.into_iter().map(|m| (m.id, m)).collect();
            self.catalog.seq += 1;
            self.catalog.since_checkpoint = 0;
            self.catalog.damage.clear();
            self.catalog.unreadable = None;
            self.maps.lock().unwrap_or_else(|e| e.into_inner()).clear();
            self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
            if let Some(w) = self.writer.as_mut() {
                w.log = LogWriter::default();
                w.frames.reset();
            }
            self.forget_frames();
            let keep_old = self.writer.as_ref().is_some_and(|w| w.degraded);
            if !keep_old {
                for id in &old_segments {
                    let name = seg_name(*id);
                    self.io.remove(&name).map_err(super::io_err(
                        &*self.io,
                        &name,
                        "remove old segment",
                    ))?;
                }
            }
            self.io
                .sync_dir()
                .map_err(super::io_err(&*self.io, "", "sync store directory"))?;
            Ok(if keep_old { 0 } else { old_segments.len() })
        }

        /// A rewrite whose backend panicked after its commit point (its first superblock slot
        /// is durable and `self.sb` is its state) but before it moved the catalog there: the
        /// catalog reloaded from the superblock as open does, the caches dropped, a hint owed.
        /// Its old segments, no longer listed, are removed by the next writer's open.
        pub(in crate::store) fn finish_rewrite(&mut self) -> Result<(), StoreError> {
            // As open does: a catalog that cannot be read is reported, not fatal.
            let mut damage = Vec::new();
            let loaded = super::super::log::load_catalog(
                &*self.io,
                &self.sb,
                &mut damage,
                self.crypt.as_deref(),
            );
            let mut catalog = match loaded {
                Ok(c) => c,
                Err(e) if e.is_corruption() => super::super::log::Catalog {
                    unreadable: Some(e.to_string()),
                    ..Default::default()
                },
                Err(e) => return Err(e),
            };
            catalog.damage = damage;
            catalog.discarded = self.catalog.discarded.take();
            self.catalog = catalog;
            self.maps.lock().unwrap_or_else(|e| e.into_inner()).clear();
            self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
            if let Some(w) = self.writer.as_mut() {
                w.log = LogWriter {
                    need_hint: true,
                    ..LogWriter::default()
                };
                w.frames.reset();
            }
            self.forget_frames();
            Ok(())
        }

        pub(in crate::store) fn abandon_rewrite(&mut self) {
            // Back to the committed state (in doubt: the old segments stay readable, nothing
            // is reused).
            self.rollback();
            if let Some(w) = self.writer.as_mut() {
                // Whatever was owed before (a generation bump) is still owed, and the copy's
                // bytes past the committed end may be on the disk: the next change writes a hint.
                w.log = LogWriter {
                    need_hint: true,
                    ..LogWriter::default()
                };
            }
        }

        pub(in crate::store) fn gc3(&mut self) -> Result<GcReport, StoreError> {
            let before = self.check()?;
            if before.leaked_bytes == 0 {
                return Ok(GcReport {
                    bytes_before: before.record_bytes,
                    bytes_after: before.record_bytes,
                    bytes_freed: 0,
                    segments_removed: 0,
                });
            }
            let mut snapshots = Vec::new();
            for m in self.catalog.manifests.values() {
                let map = self.page_map(SnapshotId(m.id))?;
                snapshots.push((m.clone(), (*map).clone()));
            }
            let removed = self.rewrite(snapshots, &|s: &Store, r: &Ref| {
                s.read_page_bytes(r).map_err(|e| match e {
                    StoreError::Corrupt {
                        path,
                        what,
                        offset,
                        detail,
                    } => StoreError::Corrupt {
                        path,
                        what,
                        offset,
                        detail: format!("{detail}; delete the damaged snapshot before gc"),
                    },
                    e => e,
                })
            })?;
            let after = self.check()?;
            Ok(GcReport {
                bytes_before: before.record_bytes,
                bytes_after: after.record_bytes,
                bytes_freed: before.record_bytes.saturating_sub(after.record_bytes),
                segments_removed: removed,
            })
        }

        /// Converts a format 1 or 2 store (trie index) to format 3, crash-safely: everything is
        /// copied into new segments and committed by one superblock write; until then the old
        /// store is whole, after it the old segments are leftovers. Returns the snapshots
        /// converted (0: the store is format 3 already).
        pub fn upgrade(&mut self) -> Result<usize, StoreError> {
            if self.is_log() {
                return self.upgrade_log();
            }
            self.settle()?;
            self.idle_writer("a snapshot is being written; commit or abort it before upgrading")?;
            let mut snapshots = Vec::new();
            for id in self.snapshot_ids()? {
                let m = self.manifest(id)?;
                let mut map = PageMap::new();
                self.for_each_page(id, |v, r| {
                    map.insert(v.0, *r);
                    Ok(())
                })?;
                let m3 = ManifestV3 {
                    id: m.id,
                    parent: m.parent,
                    epoch: m.epoch,
                    time_unix_ms: m.time_unix_ms,
                    label: m.label,
                    origin: m.origin,
                    logical_size: m.logical_size,
                    page_size: m.page_size,
                    page_count: m.page_count,
                    content_root: [0; 32],
                    index: None,
                    base_entries: 0,
                    chain_entries: 0,
                    chain_deltas: 0,
                    pages_written: m.pages_written,
                    pages_changed: m.pages_changed,
                    data_bytes: m.data_bytes,
                    meta_bytes: m.meta_bytes,
                };
                snapshots.push((m3, map));
            }
            let n = snapshots.len();
            // Pages are read through the trie store's checks (crc32, blake3).
            self.rewrite(snapshots, &|s: &Store, r: &Ref| s.read_ref(r))?;
            Ok(n)
        }
    }
}
