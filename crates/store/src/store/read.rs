//! Reading a store: the snapshot catalog (or its copy, past damage), manifests, pages and diffs.
//! Every read is checked (crc32, blake3, Merkle) and never returns wrong bytes. See
//! `docs/format.md` for the records and the index.

use super::{corrupt, read_record, read_record_kind, Store};
use crate::error::StoreError;
use crate::format::{seg_name, Kind, Location, NodePtr, Ref};

/// The most bytes [`Store::read_refs_into`] reads with one `pread`.
pub(super) const RUN_BYTES: u64 = 8 << 20;
use crate::manifest::Manifest;
use crate::trie::{self, NodeIo};
use crate::{SnapshotId, SnapshotInfo};
use pagesnap_pagetable::{Epoch, Vpn};

fn info(m: &Manifest) -> SnapshotInfo {
    SnapshotInfo {
        id: SnapshotId(m.id),
        parent: m.parent.map(SnapshotId),
        epoch: Epoch(m.epoch),
        time_unix_ms: m.time_unix_ms,
        label: m.label.clone(),
        origin: m.origin.clone(),
        logical_size: m.logical_size,
        page_size: m.page_size,
        page_count: m.page_count,
        merkle_root: m.merkle_root,
        pages_written: m.pages_written,
        pages_changed: m.pages_changed,
        data_bytes: m.data_bytes,
        meta_bytes: m.meta_bytes,
    }
}

impl Store {
    /// Ids of the retained snapshots, ascending. Read from the catalog, or from its copy if the
    /// catalog is damaged.
    pub fn snapshot_ids(&self) -> Result<Vec<SnapshotId>, StoreError> {
        if self.is_log() {
            if let Some(e) = &self.catalog.unreadable {
                return Err(StoreError::Corrupt {
                    path: self.io.location().into(),
                    what: "commit log",
                    offset: 0,
                    detail: e.clone(),
                });
            }
            return Ok(self
                .catalog
                .manifests
                .keys()
                .map(|k| SnapshotId(*k))
                .collect());
        }
        self.with_catalogs(|root| {
            let mut ids = Vec::new();
            trie::for_each(&mut self.read_io(), root, &mut |k, _| {
                ids.push(SnapshotId(k));
                Ok(())
            })?;
            Ok(ids)
        })
    }

    /// `f` on the catalog; if that meets damage and the store has a copy, `f` on the copy. The
    /// first error is returned when both fail.
    fn with_catalogs<R>(
        &self,
        f: impl Fn(Option<NodePtr>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        match f(self.sb.catalog) {
            Err(e) if e.is_corruption() && self.sb.catalog_copy.is_some() => {
                f(self.sb.catalog_copy).map_err(|_| e)
            }
            r => r,
        }
    }

    /// The newest retained snapshot.
    pub fn latest(&self) -> Result<Option<SnapshotId>, StoreError> {
        Ok(self.snapshot_ids()?.last().copied())
    }

    /// Snapshot `id`'s manifest, through the catalog or, past damage, its copy.
    pub(super) fn manifest(&self, id: SnapshotId) -> Result<Manifest, StoreError> {
        self.with_catalogs(|root| self.manifest_in(root, id))
    }

    /// Snapshot `id`'s manifest as the catalog at `root` names it, checked.
    pub(super) fn manifest_in(
        &self,
        root: Option<NodePtr>,
        id: SnapshotId,
    ) -> Result<Manifest, StoreError> {
        let r =
            trie::get(&mut self.read_io(), root, id.0)?.ok_or(StoreError::UnknownSnapshot(id))?;
        let segments = &self.read_io().segments.to_vec();
        let (found, _, _, payload) = read_record_kind(&*self.io, segments, &r.loc, Kind::Manifest)?;
        let name = seg_name(r.loc.segment);
        if *blake3::hash(&payload).as_bytes() != r.hash {
            return Err(corrupt(
                &*self.io,
                &name,
                "snapshot manifest",
                r.loc.offset,
                "blake3 differs from the catalog's",
            ));
        }
        let m = Manifest::from_bytes(found, &payload)
            .map_err(|e| corrupt(&*self.io, &name, "snapshot manifest", r.loc.offset, e))?;
        if m.id != id.0 {
            return Err(corrupt(
                &*self.io,
                &name,
                "snapshot manifest",
                r.loc.offset,
                "manifest names another snapshot",
            ));
        }
        Ok(m)
    }

    /// What the store knows about snapshot `id`.
    pub fn snapshot(&self, id: SnapshotId) -> Result<SnapshotInfo, StoreError> {
        if self.is_log() {
            return self.manifest3(id).map(super::log::info3);
        }
        self.manifest(id).map(|m| info(&m))
    }

    /// Every retained snapshot, ascending by id.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>, StoreError> {
        self.snapshot_ids()?
            .into_iter()
            .map(|id| self.snapshot(id))
            .collect()
    }

    pub(super) fn index_root(&self, s: &SnapshotInfo) -> Result<Option<NodePtr>, StoreError> {
        if self.is_log() {
            // The newest chunk of its page map reads back.
            if let Some(r) = self.manifest3(s.id)?.index {
                self.read_chunk(&r.chunk())?;
            }
            return Ok(None);
        }
        let root = self.manifest(s.id)?.index_root.map(|r| r.ptr());
        if let Some(p) = &root {
            self.read_io().load(p)?;
        }
        Ok(root)
    }

    /// The content of page `vpn` in snapshot `id` (`None`: the page is zero), checked against its
    /// crc32 and blake3 before it is returned.
    pub fn read_page(&self, id: SnapshotId, vpn: Vpn) -> Result<Option<Vec<u8>>, StoreError> {
        if self.is_log() {
            return match self.page_map(id)?.get(&vpn.0) {
                Some(r) => self.read_page_bytes(r).map(Some),
                None => Ok(None),
            };
        }
        let root = self.manifest(id)?.index_root.map(|r| r.ptr());
        match trie::get(&mut self.read_io(), root, vpn.0)? {
            Some(r) => self.read_ref(&r).map(Some),
            None => Ok(None),
        }
    }

    /// Calls `f` with every stored (non-zero) page of snapshot `id`, in address order.
    pub fn for_each_page(
        &self,
        id: SnapshotId,
        mut f: impl FnMut(Vpn, &Ref) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        if self.is_log() {
            for (k, r) in self.page_map(id)?.iter() {
                f(Vpn(*k), r)?;
            }
            return Ok(());
        }
        let root = self.manifest(id)?.index_root.map(|r| r.ptr());
        trie::for_each(&mut self.read_io(), root, &mut |k, r| f(Vpn(k), &r))
    }

    /// Calls `f` with every stored page of snapshot `id` whose number is in `range`, in order; only
    /// the index paths that reach the range are read.
    pub fn for_each_page_in(
        &self,
        id: SnapshotId,
        range: std::ops::Range<Vpn>,
        mut f: impl FnMut(Vpn, &Ref) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        if self.is_log() {
            if range.start.0 < range.end.0 {
                for (k, r) in self.page_map(id)?.range(range.start.0..range.end.0) {
                    f(Vpn(*k), r)?;
                }
            }
            return Ok(());
        }
        let root = self.manifest(id)?.index_root.map(|r| r.ptr());
        trie::for_each_in(
            &mut self.read_io(),
            root,
            range.start.0,
            range.end.0,
            &mut |k, r| f(Vpn(k), &r),
        )
    }

    /// The content a page reference names, checked (crc32, then blake3).
    pub fn read_ref(&self, r: &Ref) -> Result<Vec<u8>, StoreError> {
        if self.is_log() {
            return self.read_page_bytes(r);
        }
        let (_, hash, payload) =
            read_record(&*self.io, self.read_io().segments, &r.loc, Kind::Page)?;
        if hash != r.hash || *blake3::hash(&payload).as_bytes() != r.hash {
            return Err(corrupt(
                &*self.io,
                &seg_name(r.loc.segment),
                "page record",
                r.loc.offset,
                "content does not match its blake3 hash",
            ));
        }
        Ok(payload)
    }

    /// Checks the pages `refs` name, read into `out[start..]`, against their ids, many pages at
    /// once; on a mismatch `out` is cut back to `start` and the error is the one a single read
    /// of that page gives (named by the page itself).
    pub(super) fn check_pages_read(
        &self,
        refs: &[Ref],
        out: &mut Vec<u8>,
        start: usize,
    ) -> Result<(), StoreError> {
        let pages: Vec<&[u8]> = out[start..].chunks(self.sb.page_size as usize).collect();
        let mut hashes = vec![[0u8; 32]; pages.len()];
        self.page_ids().hash_pages(&pages, &mut hashes);
        if let Some(r) = refs
            .iter()
            .zip(&hashes)
            .find(|(r, h)| *h != &r.hash)
            .map(|(r, _)| r)
        {
            out.truncate(start);
            return Err(self
                .read_page_bytes(r)
                .err()
                .unwrap_or_else(|| self.changed_under_us(r)));
        }
        Ok(())
    }

    /// Appends to `out` the contents the page references name, each checked, back to back in the
    /// order given. Pages that lie back to back in a segment (as a snapshot's pages written
    /// together do) are read with one `pread` per run of up to 8 MiB, straight into `out`.
    pub fn read_refs_into(&self, refs: &[Ref], out: &mut Vec<u8>) -> Result<(), StoreError> {
        if !self.is_log() {
            for r in refs {
                out.extend_from_slice(&self.read_ref(r)?);
            }
            return Ok(());
        }
        if let Some(r) = refs.iter().find(|r| {
            r.loc.slot == 0 && (r.loc.len != self.sb.page_size || u64::from(r.loc.len) > RUN_BYTES)
        }) {
            return Err(super::corrupt(
                &*self.io,
                &seg_name(r.loc.segment),
                "page",
                r.loc.offset,
                format!(
                    "a page of {} bytes in a store of {}-byte pages",
                    r.loc.len, self.sb.page_size
                ),
            ));
        }
        let mut i = 0;
        while i < refs.len() {
            if refs[i].loc.slot > 0 {
                i = self.read_framed_run(refs, i, out)?;
                continue;
            }
            // The run starting at i: each next page right after the one before, same segment.
            let mut j = i + 1;
            let mut bytes = u64::from(refs[i].loc.len);
            while j < refs.len()
                && refs[j].loc.slot == 0
                && refs[j].loc.segment == refs[i].loc.segment
                && refs[j].loc.offset == refs[j - 1].loc.offset + u64::from(refs[j - 1].loc.len)
                && bytes + u64::from(refs[j].loc.len) <= RUN_BYTES
            {
                bytes += u64::from(refs[j].loc.len);
                j += 1;
            }
            let run = Ref {
                hash: [0; 32],
                loc: Location {
                    segment: refs[i].loc.segment,
                    offset: refs[i].loc.offset,
                    len: u32::try_from(bytes).unwrap_or(u32::MAX),
                    slot: 0,
                },
            };
            let start = out.len();
            self.read_span_into(&run, out)?;
            self.check_pages_read(&refs[i..j], out, start)?;
            i = j;
        }
        Ok(())
    }

    /// Pages whose content differs between snapshots `a` and `b`, in address order.
    pub fn diff(&self, a: SnapshotId, b: SnapshotId) -> Result<Vec<Vpn>, StoreError> {
        if self.is_log() {
            let (ma, mb) = (self.page_map(a)?, self.page_map(b)?);
            let mut out = Vec::new();
            let (mut ia, mut ib) = (ma.iter().peekable(), mb.iter().peekable());
            loop {
                match (ia.peek(), ib.peek()) {
                    (None, None) => break,
                    (Some((ka, _)), None) => {
                        out.push(Vpn(**ka));
                        ia.next();
                    }
                    (None, Some((kb, _))) => {
                        out.push(Vpn(**kb));
                        ib.next();
                    }
                    (Some((ka, ra)), Some((kb, rb))) => {
                        if ka < kb {
                            out.push(Vpn(**ka));
                            ia.next();
                        } else if kb < ka {
                            out.push(Vpn(**kb));
                            ib.next();
                        } else {
                            if ra.hash != rb.hash {
                                out.push(Vpn(**ka));
                            }
                            ia.next();
                            ib.next();
                        }
                    }
                }
            }
            return Ok(out);
        }
        let ra = self.manifest(a)?.index_root.map(|r| r.ptr());
        let rb = self.manifest(b)?.index_root.map(|r| r.ptr());
        Ok(trie::diff(&mut self.read_io(), ra, rb)?
            .into_iter()
            .map(Vpn)
            .collect())
    }
}
