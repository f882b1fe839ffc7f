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
        let live: u64 = self.live_records()?.values().sum();
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
        })
    }

    /// Reclaims every byte no retained snapshot uses, by copying the live records into new
    /// segments, committing, then removing the old segments. Crash-safe: until the commit the old
    /// state is intact; after it, old segments are leftovers that open removes.
    pub fn gc(&mut self) -> Result<GcReport, StoreError> {
        self.settle()?;
        self.idle_writer("a snapshot is being written; commit or abort it before gc")?;
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
        new_segment(&*io, wio.opts, wio.w)?;
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
