//! Verification: every crc32, page blake3 and Merkle hash of the chosen snapshots, both copies of
//! the catalog, the superblock slots, segment headers and the dedup index; damage is reported,
//! not returned as an error. See `docs/format.md` for what each check covers.

use super::open::OtherSlot;
use super::{read_record, Store, EMPTY_ROOT};
use crate::error::StoreError;
use crate::format::{seg_name, Kind, Location, NodePtr, SEG_MAGIC};
use crate::trie::{self, Node, Slot};
use crate::{Damage, SnapshotId, VerifyReport};
use pagesnap_pagetable::Vpn;
use std::collections::HashMap;

impl Store {
    /// Checks that snapshot `id`'s manifest and index root read back (O(1) in pages): `Ok(None)`
    /// if they do, `Ok(Some(what is wrong))` if they are damaged.
    pub fn verify_root(&self, id: SnapshotId) -> Result<Option<String>, StoreError> {
        match self.snapshot(id).and_then(|s| self.index_root(&s)) {
            Ok(_) => Ok(None),
            Err(e) if e.is_corruption() => Ok(Some(e.to_string())),
            Err(e) => Err(e),
        }
    }

    /// The records of both copies of the snapshot catalog — its nodes and the manifests it names —
    /// for the corruption campaign: one flipped bit in any of them must hide no snapshot.
    #[doc(hidden)]
    pub fn catalog_records(&self) -> Result<Vec<Location>, StoreError> {
        let mut out = Vec::new();
        if self.is_log() {
            for l in self.commit_chain()? {
                out.push(l.a.loc());
                out.push(l.b.loc());
            }
            return Ok(out);
        }
        for root in [self.sb.catalog, self.sb.catalog_copy] {
            trie::for_each_node(&mut self.read_io(), root, &mut |p, _| {
                out.push(p.loc);
                Ok(true)
            })?;
            trie::for_each(&mut self.read_io(), root, &mut |_, r| {
                out.push(r.loc);
                Ok(())
            })?;
        }
        Ok(out)
    }

    /// Checks every crc32, every page's blake3 and every Merkle hash of the given snapshots (all
    /// when `ids` is empty), and the store's own indexes. Damage is reported, not returned as an
    /// error; an `Err` means verification itself could not run.
    pub fn verify(&self, ids: &[SnapshotId]) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        // The superblock as it is now (a writer's open may have repaired it since we opened). A
        // format 2 store keeps both slots equal: anything else is damage, or lost redundancy
        // (a commit interrupted between its slot writes) that a writer's open restores.
        // A reader cannot tell an older slot from a commit in flight between its two slot writes
        // (it takes no lock), so for a reader that is a note; the writer knows no commit is in
        // flight, so for it the older slot is a missing copy.
        match Self::read_superblock(&*self.io) {
            Ok(read)
                if read.other == OtherSlot::Damaged
                    || (read.other != OtherSlot::Same
                        && read.sb.version >= 2
                        && self.writer.is_some()) =>
            {
                report.damage.push(Damage {
                    snapshot: None,
                    vpn: None,
                    detail: read.note(&*self.io).unwrap_or_default(),
                })
            }
            Ok(read) => report.notes.extend(read.note(&*self.io)),
            Err(e) if e.is_corruption() => report.damage.push(Damage {
                snapshot: None,
                vpn: None,
                detail: e.to_string(),
            }),
            Err(e) => return Err(e),
        }
        if self.is_log() {
            self.verify3(ids, &mut report)?;
            self.verify_segment_headers(&mut report);
            return Ok(report);
        }
        let all = match self.snapshot_ids() {
            Ok(ids) => ids,
            Err(e) if e.is_corruption() => {
                report.damage.push(Damage {
                    snapshot: None,
                    vpn: None,
                    detail: format!("snapshot catalog: {e}"),
                });
                return Ok(report);
            }
            Err(e) => return Err(e),
        };
        let ids: Vec<SnapshotId> = if ids.is_empty() {
            all.clone()
        } else {
            ids.to_vec()
        };
        let mut nodes: HashMap<Location, Result<(), String>> = HashMap::new();
        let mut pages: HashMap<Location, Result<(), String>> = HashMap::new();
        for id in ids {
            if !all.contains(&id) {
                return Err(StoreError::UnknownSnapshot(id));
            }
            report.snapshots_checked += 1;
            let m = match self.manifest(id) {
                Ok(m) => m,
                Err(e) if e.is_corruption() => {
                    report.damage.push(Damage {
                        snapshot: Some(id),
                        vpn: None,
                        detail: e.to_string(),
                    });
                    continue;
                }
                Err(e) => return Err(e),
            };
            let root = m.index_root.as_ref().map(|r| r.ptr());
            let computed = match root {
                None => Ok(EMPTY_ROOT),
                Some(p) => self.verify_node(id, &p, 0, &mut nodes, &mut pages, &mut report),
            };
            match computed {
                Ok(h) if h == m.merkle_root => {}
                Ok(_) => report.damage.push(Damage {
                    snapshot: Some(id),
                    vpn: None,
                    detail: "Merkle root differs from the manifest's".into(),
                }),
                Err(detail) => report.damage.push(Damage {
                    snapshot: Some(id),
                    vpn: None,
                    detail,
                }),
            }
        }
        report.pages_checked = pages.len() as u64;
        report.nodes_checked = nodes.len() as u64;
        // Each copy of the catalog on its own: snapshots above were read through whichever is
        // intact, so damage in one copy hides nothing, but it is still damage.
        let copies = [
            ("snapshot catalog", self.sb.catalog, true),
            (
                "snapshot catalog copy",
                self.sb.catalog_copy,
                self.sb.catalog_copy.is_some(),
            ),
        ];
        for (which, root, present) in copies {
            if !present {
                continue; // a format 1 store has no copy until its next commit
            }
            let mut ids = Vec::new();
            let walked = trie::for_each(&mut self.read_io(), root, &mut |k, _| {
                ids.push(SnapshotId(k));
                Ok(())
            });
            let mut found = Vec::new();
            match walked {
                Ok(()) => {}
                Err(e) if e.is_corruption() => found.push(e.to_string()),
                Err(e) => return Err(e),
            }
            for id in ids {
                match self.manifest_in(root, id) {
                    Ok(_) => {}
                    Err(e) if e.is_corruption() => {
                        found.push(format!("snapshot {id}'s manifest: {e}"))
                    }
                    Err(e) => return Err(e),
                }
            }
            report.damage.extend(found.into_iter().map(|f| Damage {
                snapshot: None,
                vpn: None,
                detail: format!("{which}: {f}"),
            }));
        }
        self.verify_segment_headers(&mut report);
        // The dedup index only steers writes, but damage there is still damage.
        let mut rio = self.read_io();
        if let Err(e) = trie::for_each_node(&mut rio, self.sb.dedup, &mut |_, _| Ok(true)) {
            report.damage.push(Damage {
                snapshot: None,
                vpn: None,
                detail: format!("dedup index: {e}"),
            });
        }
        Ok(report)
    }

    fn verify_segment_headers(&self, report: &mut VerifyReport) {
        for id in self.read_io().segments {
            let name = seg_name(*id);
            let mut head = [0u8; 8];
            if self.io.read(&name, 0, &mut head).is_err() || head != SEG_MAGIC {
                report.damage.push(Damage {
                    snapshot: None,
                    vpn: None,
                    detail: format!(
                        "{}: damaged segment header (its records are checked one by one)",
                        self.io.location().join(&name).display()
                    ),
                });
            }
        }
    }

    /// Format 3: every snapshot's chain (each chunk's crc32 and blake3), its map against the
    /// manifest's content root and page count, every page's blake3; each copy of every commit
    /// record back to the last checkpoint; and what open found wrong in the log.
    fn verify3(&self, ids: &[SnapshotId], report: &mut VerifyReport) -> Result<(), StoreError> {
        let store_damage = |report: &mut VerifyReport, detail: String| {
            report.damage.push(Damage {
                snapshot: None,
                vpn: None,
                detail,
            })
        };
        for d in &self.catalog.damage {
            store_damage(report, format!("commit log: {d}"));
        }
        if let Some(n) = &self.key_note {
            store_damage(report, format!("key file: {n}"));
        }
        report.notes.extend(self.catalog.discarded.clone());
        let all = match self.snapshot_ids() {
            Ok(ids) => ids,
            Err(e) if e.is_corruption() => {
                store_damage(report, format!("snapshot catalog: {e}"));
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let ids: Vec<SnapshotId> = if ids.is_empty() {
            all.clone()
        } else {
            ids.to_vec()
        };
        let mut chunks: HashMap<Location, Result<(), String>> = HashMap::new();
        #[allow(clippy::type_complexity)]
        let mut pages: HashMap<Location, ([u8; 32], Vec<(SnapshotId, Vpn)>)> = HashMap::new();
        for id in ids {
            if !all.contains(&id) {
                return Err(StoreError::UnknownSnapshot(id));
            }
            report.snapshots_checked += 1;
            let m = self.manifest3(id)?.clone();
            let damage = |report: &mut VerifyReport, vpn: Option<Vpn>, detail: String| {
                report.damage.push(Damage {
                    snapshot: Some(id),
                    vpn,
                    detail,
                })
            };
            let chain = match self.chain(m.index.map(|r| r.chunk())) {
                Ok(c) => c,
                Err(e) if e.is_corruption() => {
                    damage(report, None, format!("page map: {e}"));
                    continue;
                }
                Err(e) => return Err(e),
            };
            for (r, _) in &chain {
                chunks.insert(r.loc, Ok(()));
            }
            if chain.last().is_some_and(|(_, c)| !c.base) {
                damage(
                    report,
                    None,
                    "page map: its chain does not start with a base".into(),
                );
            }
            let map =
                crate::index::apply_chain(&chain.into_iter().map(|(_, c)| c).collect::<Vec<_>>());
            if crate::index::ContentRoot::of(&map).to_bytes() != m.content_root {
                damage(
                    report,
                    None,
                    "page map: content root differs from the manifest's".into(),
                );
            }
            if map.len() as u64 != m.page_count {
                damage(
                    report,
                    None,
                    format!(
                        "page map: {} pages, the manifest says {}",
                        map.len(),
                        m.page_count
                    ),
                );
            }
            for (vpn, r) in map.iter() {
                pages
                    .entry(r.loc)
                    .or_insert((r.hash, Vec::new()))
                    .1
                    .push((id, Vpn(*vpn)));
            }
        }
        // Pages are checked extent by extent: one read, the extent's crc32 (its header and
        // padding hold no page, but a flip there is damage too), then each page's blake3.
        let locs: Vec<Location> = pages.keys().filter(|l| l.slot == 0).copied().collect();
        let (extents, alone) = self.extents_of(&locs)?;
        let page_damage = |report: &mut VerifyReport, users: &[(SnapshotId, Vpn)], e: String| {
            for (id, vpn) in users {
                report.damage.push(Damage {
                    snapshot: Some(*id),
                    vpn: Some(*vpn),
                    detail: e.clone(),
                });
            }
        };
        // Frames: one read, the record's crc32, one decompression, then each page's blake3.
        let mut frames: std::collections::BTreeMap<Location, Vec<Location>> =
            std::collections::BTreeMap::new();
        for l in pages.keys().filter(|l| l.slot > 0) {
            frames
                .entry(Location { slot: 0, ..*l })
                .or_default()
                .push(*l);
        }
        for (frame, in_it) in &frames {
            let plain = self
                .read_frame_bytes(*frame)
                .and_then(|b| self.decode_frame_at(*frame, &b));
            let plain = match plain {
                Ok(p) => p,
                Err(e) if e.is_corruption() => {
                    store_damage(report, format!("page frame: {e}"));
                    for p in in_it {
                        page_damage(report, &pages[p].1, e.to_string());
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            let page = self.sb.page_size as usize;
            for p in in_it {
                let (hash, users) = &pages[p];
                let k = usize::from(p.slot) - 1;
                let ok = plain
                    .get(k * page..(k + 1) * page)
                    .is_some_and(|b| &self.page_id(b) == hash);
                if !ok {
                    page_damage(
                        report,
                        users,
                        format!(
                            "{} at offset {}: page {k} of the frame does not match its blake3 hash",
                            self.io.location().join(seg_name(frame.segment)).display(),
                            frame.offset
                        ),
                    );
                }
            }
        }
        for (ext, in_it) in &extents {
            let name = seg_name(ext.segment);
            let mut buf = vec![0u8; ext.len as usize];
            let read = self.io.read(&name, ext.offset, &mut buf);
            if read.is_err() || crate::format::decode_record(&buf, Kind::Pages).is_err() {
                store_damage(
                    report,
                    format!(
                        "{} at offset {}: page extent fails its crc32 (its pages are checked one \
                         by one)",
                        self.io.location().join(&name).display(),
                        ext.offset
                    ),
                );
                for p in in_it {
                    let (hash, users) = &pages[p];
                    if let Err(e) = self.read_page_bytes(&crate::format::Ref {
                        hash: *hash,
                        loc: *p,
                    }) {
                        page_damage(report, users, e.to_string());
                    }
                }
                continue;
            }
            for p in in_it {
                let (hash, users) = &pages[p];
                let from = (p.offset - ext.offset) as usize;
                let bytes = &buf[from..from + p.len as usize];
                if &self.page_id(bytes) != hash {
                    page_damage(
                        report,
                        users,
                        format!(
                            "{} at offset {}: page content does not match its blake3 hash",
                            self.io.location().join(&name).display(),
                            p.offset
                        ),
                    );
                }
            }
        }
        // Every page is written inside an extent: one found in no intact extent means a damaged
        // record header (a flipped magic, kind or length) before or at it. The pages themselves
        // are still checked, one by one.
        let mut reported = std::collections::BTreeSet::new();
        for p in &alone {
            if reported.insert(p.segment) {
                store_damage(
                    report,
                    format!(
                        "{}: the page at offset {} (and any after it listed here) is in no intact \
                         page extent: a record header before it is damaged (pages checked one by \
                         one)",
                        self.io.location().join(seg_name(p.segment)).display(),
                        p.offset
                    ),
                );
            }
        }
        for p in alone {
            let (hash, users) = &pages[&p];
            if let Err(e) = self.read_page_bytes(&crate::format::Ref {
                hash: *hash,
                loc: p,
            }) {
                page_damage(report, users, e.to_string());
            }
        }
        report.pages_checked = pages.len() as u64;
        report.nodes_checked = chunks.len() as u64;
        // Each copy of each commit record back to the checkpoint, on its own.
        let links = match self.commit_chain() {
            Ok(l) => l,
            Err(e) if e.is_corruption() => {
                store_damage(report, format!("commit log: {e}"));
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        for l in links {
            for (which, r) in [("first", l.a), ("second", l.b)] {
                // crc32, blake3 against the link, and (encrypted) the authentication tag.
                let read = super::log::read_checked(
                    &*self.io,
                    self.segments(),
                    &r.loc(),
                    &r.hash,
                    Kind::Commit,
                    self.crypt.as_deref(),
                )
                .map(|_| ());
                match read {
                    Ok(()) => {}
                    Err(e) if e.is_corruption() => {
                        store_damage(report, format!("commit record ({which} copy): {e}"))
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Recomputes the Merkle hash below `ptr`, checking every record; `Err` describes why the
    /// subtree cannot be trusted. Damaged pages are recorded in `report` and still hash by their
    /// recorded hash, so one bad page does not hide the rest.
    #[allow(clippy::too_many_arguments)]
    fn verify_node(
        &self,
        id: SnapshotId,
        ptr: &NodePtr,
        depth: u8,
        nodes: &mut HashMap<Location, Result<(), String>>,
        pages: &mut HashMap<Location, Result<(), String>>,
        report: &mut VerifyReport,
    ) -> Result<[u8; 32], String> {
        let segments = self.read_io().segments.to_vec();
        let (_, _, payload) =
            read_record(&*self.io, &segments, &ptr.loc, Kind::Node).map_err(|e| e.to_string())?;
        let node =
            Node::decode(&payload).map_err(|e| format!("index node at {:?}: {}", ptr.loc, e.0))?;
        // Children sit one level deeper; checking it bounds the recursion by the trie's depth
        // even when damage makes a node point at itself.
        if node.depth != depth {
            return Err(format!(
                "index node at {:?}: depth {} where {depth} was expected (misplaced or looping)",
                ptr.loc, node.depth
            ));
        }
        for (_, s) in &node.slots {
            match s {
                Slot::Entry(vpn, r) => {
                    let res = pages
                        .entry(r.loc)
                        .or_insert_with(|| self.read_ref(r).map(|_| ()).map_err(|e| e.to_string()));
                    if let Err(detail) = res {
                        report.damage.push(Damage {
                            snapshot: Some(id),
                            vpn: Some(Vpn(*vpn)),
                            detail: detail.clone(),
                        });
                    }
                }
                Slot::Child(p) => {
                    let known = nodes.get(&p.loc).cloned();
                    let res = match known {
                        Some(r) => r,
                        None => {
                            let r = match self.verify_node(id, p, depth + 1, nodes, pages, report) {
                                Ok(h) if h == p.merkle => Ok(()),
                                Ok(_) => Err(format!(
                                    "index node at {:?}: Merkle hash differs from its parent's",
                                    p.loc
                                )),
                                Err(e) => Err(e),
                            };
                            nodes.insert(p.loc, r.clone());
                            r
                        }
                    };
                    if let Err(detail) = res {
                        report.damage.push(Damage {
                            snapshot: Some(id),
                            vpn: None,
                            detail,
                        });
                    }
                }
            }
        }
        nodes.entry(ptr.loc).or_insert(Ok(()));
        Ok(node.merkle())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::store_with_a_looping_node;
    use crate::store::Mode;

    /// The same loop reached by verify's own walk (which reads records without the node cache):
    /// the depth check ends it.
    #[test]
    fn verify_walk_stops_at_a_misplaced_depth() {
        let (io, opts) = store_with_a_looping_node();
        let (store, _) = Store::open_with(io, Mode::Read, opts).expect("open");
        let m = store.manifest(SnapshotId(2)).expect("manifest");
        let root = m.index_root.expect("root").ptr();
        let mut report = VerifyReport::default();
        let r = store.verify_node(
            SnapshotId(2),
            &root,
            0,
            &mut HashMap::new(),
            &mut HashMap::new(),
            &mut report,
        );
        // The root itself decodes; its child (itself, one level down) is refused.
        assert!(r.is_ok());
        assert!(
            report.damage.iter().any(|d| d.detail.contains("depth")),
            "{report:?}"
        );
    }
}
