//! The on-disk copy-on-write trie behind the page index, the snapshot catalog and the dedup
//! index: the design note's "file system algorithm".
//!
//! Keys are `u64`, split most-significant first into digits: 4 bits at depth 0, then 6 bits at
//! depths 1..=10. A node has 64 slots; a slot holds nothing, one entry (key and [`Ref`]) or a child
//! node. The shape is canonical — a child exists exactly when two or more keys share its prefix —
//! so equal key sets give equal tries, and a node's Merkle hash (over its entries' keys and content
//! hashes and its children's Merkle hashes, never over locations) identifies its contents.
//!
//! Updates never modify a node: [`apply`] writes new nodes along the changed paths and shares
//! every untouched subtree with the old root. A batch of D changes writes O(D · depth) nodes.

#[cfg(test)]
use crate::format::Location;
use crate::format::{Dec, Enc, NodePtr, Ref, NODEPTR_BYTES, REF_BYTES};
use crate::StoreError;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The deepest depth (its digit is the key's last 6 bits).
pub(crate) const MAX_DEPTH: u8 = 10;
const NODE_HEADER: usize = 8 + 8 + 8;

/// The digit of `key` at `depth`.
pub(crate) fn digit(key: u64, depth: u8) -> u8 {
    let d = if depth == 0 {
        key >> 60
    } else {
        (key >> (60 - 6 * u32::from(depth))) & 63
    };
    d as u8
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    Entry(u64, Ref),
    Child(NodePtr),
}

/// A decoded node: its depth and occupied slots in digit order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Node {
    pub(crate) depth: u8,
    pub(crate) slots: Vec<(u8, Slot)>,
}

/// Why node bytes are not a valid node.
#[derive(Debug)]
pub(crate) struct BadNode(pub(crate) &'static str);

impl Node {
    fn maps(&self) -> (u64, u64) {
        let (mut e, mut c) = (0u64, 0u64);
        for (d, s) in &self.slots {
            match s {
                Slot::Entry(..) => e |= 1 << d,
                Slot::Child(_) => c |= 1 << d,
            }
        }
        (e, c)
    }

    /// The Merkle hash: blake3 over depth, slot maps, each entry's key and content hash and each
    /// child's Merkle hash. Locations are left out, so moving records keeps every hash.
    pub(crate) fn merkle(&self) -> [u8; 32] {
        let (e, c) = self.maps();
        let mut h = blake3::Hasher::new();
        h.update(&[self.depth]);
        h.update(&e.to_le_bytes());
        h.update(&c.to_le_bytes());
        for (_, s) in &self.slots {
            match s {
                Slot::Entry(k, r) => {
                    h.update(&[0]);
                    h.update(&k.to_le_bytes());
                    h.update(&r.hash);
                }
                Slot::Child(p) => {
                    h.update(&[1]);
                    h.update(&p.merkle);
                }
            }
        }
        *h.finalize().as_bytes()
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let (e, c) = self.maps();
        let mut enc = Enc::default();
        enc.u8(self.depth);
        enc.bytes(&[0; 7]);
        enc.u64(e);
        enc.u64(c);
        for (_, s) in &self.slots {
            if let Slot::Entry(k, r) = s {
                enc.u64(*k);
                enc.reference(r);
            }
        }
        for (_, s) in &self.slots {
            if let Slot::Child(p) = s {
                enc.node_ptr(p);
            }
        }
        enc.0
    }

    pub(crate) fn decode(payload: &[u8]) -> Result<Node, BadNode> {
        let mut d = Dec::new(payload);
        let short = |_| BadNode("node shorter than its header");
        let depth = d.u8().map_err(short)?;
        d.take(7).map_err(short)?;
        let e = d.u64().map_err(short)?;
        let c = d.u64().map_err(short)?;
        if depth > MAX_DEPTH || e & c != 0 || (depth == 0 && (e | c) >> 16 != 0) {
            return Err(BadNode("node header is inconsistent"));
        }
        let (ne, nc) = (e.count_ones() as usize, c.count_ones() as usize);
        if payload.len() != NODE_HEADER + ne * (8 + REF_BYTES) + nc * NODEPTR_BYTES {
            return Err(BadNode("node length does not match its slot maps"));
        }
        let mut entries = Vec::with_capacity(ne);
        for _ in 0..ne {
            let k = d.u64().map_err(short)?;
            let r = d.reference().map_err(short)?;
            entries.push((k, r));
        }
        let mut kids = Vec::with_capacity(nc);
        for _ in 0..nc {
            kids.push(d.node_ptr().map_err(short)?);
        }
        let (mut entries, mut kids) = (entries.into_iter(), kids.into_iter());
        let mut slots = Vec::with_capacity(ne + nc);
        for i in 0..64u8 {
            if e & (1 << i) != 0 {
                let (k, r) = entries.next().ok_or(BadNode("entry missing"))?;
                if digit(k, depth) != i {
                    return Err(BadNode("entry key is in the wrong slot"));
                }
                slots.push((i, Slot::Entry(k, r)));
            } else if c & (1 << i) != 0 {
                slots.push((i, Slot::Child(kids.next().ok_or(BadNode("child missing"))?)));
            }
        }
        Ok(Node { depth, slots })
    }
}

/// Where nodes come from and go to.
pub(crate) trait NodeIo {
    fn load(&mut self, ptr: &NodePtr) -> Result<Arc<Node>, StoreError>;
    fn store(&mut self, node: &Node) -> Result<NodePtr, StoreError>;
}

/// Counts what a batch did.
#[derive(Default, Debug, Clone, Copy)]
pub(crate) struct Delta {
    pub(crate) added: u64,
    pub(crate) removed: u64,
}

enum Outcome {
    Empty,
    Single(u64, Ref),
    Node(NodePtr),
}

/// Applies sorted, key-unique `changes` (`None` removes) to the trie at `root`; returns the new
/// root. The old root stays valid and shares all untouched nodes.
pub(crate) fn apply(
    io: &mut impl NodeIo,
    root: Option<NodePtr>,
    changes: &[(u64, Option<Ref>)],
    delta: &mut Delta,
) -> Result<Option<NodePtr>, StoreError> {
    if changes.is_empty() {
        return Ok(root);
    }
    let node = match root {
        Some(p) => (*io.load(&p)?).clone(),
        None => Node {
            depth: 0,
            slots: Vec::new(),
        },
    };
    Ok(match apply_node(io, node, changes, delta)? {
        Outcome::Empty => None,
        Outcome::Node(p) => Some(p),
        // The root is always a node.
        Outcome::Single(k, r) => Some(io.store(&Node {
            depth: 0,
            slots: vec![(digit(k, 0), Slot::Entry(k, r))],
        })?),
    })
}

fn apply_node(
    io: &mut impl NodeIo,
    node: Node,
    changes: &[(u64, Option<Ref>)],
    delta: &mut Delta,
) -> Result<Outcome, StoreError> {
    let depth = node.depth;
    let mut slots: BTreeMap<u8, Slot> = node.slots.into_iter().collect();
    let mut rest = changes;
    while let Some(&(first, _)) = rest.first() {
        let dg = digit(first, depth);
        let n = rest
            .iter()
            .take_while(|(k, _)| digit(*k, depth) == dg)
            .count();
        let (group, tail) = rest.split_at(n);
        rest = tail;
        let outcome = match slots.remove(&dg) {
            Some(Slot::Child(p)) => {
                let child = (*io.load(&p)?).clone();
                apply_node(io, child, group, delta)?
            }
            existing => {
                // An entry (or nothing) in the slot: merge it with the group.
                let mut merged: Vec<(u64, Option<Ref>)> = group.to_vec();
                if let Some(Slot::Entry(k, r)) = existing {
                    match merged.binary_search_by_key(&k, |(key, _)| *key) {
                        Ok(i) => {
                            // Replaced or removed.
                            if merged[i].1.is_none() {
                                delta.removed += 1;
                            }
                        }
                        Err(i) => merged.insert(i, (k, Some(r))),
                    }
                    let added = group
                        .iter()
                        .filter(|(key, v)| v.is_some() && *key != k)
                        .count() as u64;
                    delta.added += added;
                } else {
                    delta.added += group.iter().filter(|(_, v)| v.is_some()).count() as u64;
                }
                merged.retain(|(_, v)| v.is_some());
                build(io, depth, &merged)?
            }
        };
        match outcome {
            Outcome::Empty => {}
            Outcome::Single(k, r) => {
                slots.insert(dg, Slot::Entry(k, r));
            }
            Outcome::Node(p) => {
                slots.insert(dg, Slot::Child(p));
            }
        }
    }
    let slots: Vec<(u8, Slot)> = slots.into_iter().collect();
    finish(io, depth, slots)
}

/// The outcome for a slot at `depth` holding exactly the (present) `entries`.
fn build(
    io: &mut impl NodeIo,
    depth: u8,
    entries: &[(u64, Option<Ref>)],
) -> Result<Outcome, StoreError> {
    match entries {
        [] => Ok(Outcome::Empty),
        [(k, Some(r))] => Ok(Outcome::Single(*k, *r)),
        _ => {
            // Two or more keys share this slot's prefix: they get a node one level down. Keys
            // that agree on every digit are equal, so this ends by depth MAX_DEPTH.
            let child = Node {
                depth: depth + 1,
                slots: Vec::new(),
            };
            let mut scratch = Delta::default();
            match apply_node(io, child, entries, &mut scratch)? {
                Outcome::Single(k, r) => Ok(Outcome::Single(k, r)),
                other => Ok(other),
            }
        }
    }
}

fn finish(io: &mut impl NodeIo, depth: u8, slots: Vec<(u8, Slot)>) -> Result<Outcome, StoreError> {
    match slots.as_slice() {
        [] => Ok(Outcome::Empty),
        [(_, Slot::Entry(k, r))] if depth > 0 => Ok(Outcome::Single(*k, *r)),
        _ => Ok(Outcome::Node(io.store(&Node { depth, slots })?)),
    }
}

/// The value stored under `key`.
pub(crate) fn get(
    io: &mut impl NodeIo,
    root: Option<NodePtr>,
    key: u64,
) -> Result<Option<Ref>, StoreError> {
    let Some(mut ptr) = root else { return Ok(None) };
    loop {
        let node = io.load(&ptr)?;
        let dg = digit(key, node.depth);
        match node.slots.iter().find(|(d, _)| *d == dg).map(|(_, s)| *s) {
            None => return Ok(None),
            Some(Slot::Entry(k, r)) => return Ok((k == key).then_some(r)),
            Some(Slot::Child(p)) => ptr = p,
        }
    }
}

/// Calls `f` for every entry in key order.
pub(crate) fn for_each(
    io: &mut impl NodeIo,
    root: Option<NodePtr>,
    f: &mut impl FnMut(u64, Ref) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let Some(ptr) = root else { return Ok(()) };
    let node = io.load(&ptr)?;
    for (_, s) in &node.slots {
        match *s {
            Slot::Entry(k, r) => f(k, r)?,
            Slot::Child(p) => for_each(io, Some(p), f)?,
        }
    }
    Ok(())
}

/// Calls `f` for every entry with `lo <= key < hi`, in key order, entering only subtrees whose
/// key range meets the interval.
pub(crate) fn for_each_in(
    io: &mut impl NodeIo,
    root: Option<NodePtr>,
    lo: u64,
    hi: u64,
    f: &mut impl FnMut(u64, Ref) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    fn walk(
        io: &mut impl NodeIo,
        ptr: NodePtr,
        prefix: u64,
        lo: u64,
        hi: u64,
        f: &mut impl FnMut(u64, Ref) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let node = io.load(&ptr)?;
        let shift = if node.depth == 0 {
            60
        } else {
            60 - 6 * u32::from(node.depth)
        };
        for (d, s) in &node.slots {
            let start = prefix | (u64::from(*d) << shift);
            let end = u128::from(start) + (1u128 << shift);
            if u128::from(hi) <= u128::from(start) || end <= u128::from(lo) {
                continue;
            }
            match *s {
                Slot::Entry(k, r) if k >= lo && k < hi => f(k, r)?,
                Slot::Entry(..) => {}
                Slot::Child(p) => walk(io, p, start, lo, hi, f)?,
            }
        }
        Ok(())
    }
    match root {
        Some(p) if lo < hi => walk(io, p, 0, lo, hi, f),
        _ => Ok(()),
    }
}

/// Calls `f` on every node pointer reachable from `root` (the root first), once per visit.
pub(crate) fn for_each_node(
    io: &mut impl NodeIo,
    root: Option<NodePtr>,
    f: &mut impl FnMut(&NodePtr, &Node) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    let Some(ptr) = root else { return Ok(()) };
    let node = io.load(&ptr)?;
    // `f` returns false to skip the subtree (already visited).
    if !f(&ptr, &node)? {
        return Ok(());
    }
    for (_, s) in &node.slots {
        if let Slot::Child(p) = s {
            for_each_node(io, Some(*p), f)?;
        }
    }
    Ok(())
}

/// Keys whose content hash differs between the two tries (present in one only, or with different
/// hashes), in order. Subtrees with equal Merkle hashes are skipped.
pub(crate) fn diff(
    io: &mut impl NodeIo,
    a: Option<NodePtr>,
    b: Option<NodePtr>,
) -> Result<Vec<u64>, StoreError> {
    let mut out = Vec::new();
    diff_slots(io, a.map(Slot::Child), b.map(Slot::Child), &mut out)?;
    Ok(out)
}

fn collect(
    io: &mut impl NodeIo,
    s: Option<Slot>,
    out: &mut Vec<(u64, [u8; 32])>,
) -> Result<(), StoreError> {
    match s {
        None => Ok(()),
        Some(Slot::Entry(k, r)) => {
            out.push((k, r.hash));
            Ok(())
        }
        Some(Slot::Child(p)) => for_each(io, Some(p), &mut |k, r| {
            out.push((k, r.hash));
            Ok(())
        }),
    }
}

fn diff_slots(
    io: &mut impl NodeIo,
    a: Option<Slot>,
    b: Option<Slot>,
    out: &mut Vec<u64>,
) -> Result<(), StoreError> {
    match (a, b) {
        (None, None) => Ok(()),
        (Some(Slot::Child(x)), Some(Slot::Child(y))) if x.merkle == y.merkle => Ok(()),
        (Some(Slot::Entry(k1, r1)), Some(Slot::Entry(k2, r2)))
            if k1 == k2 && r1.hash == r2.hash =>
        {
            Ok(())
        }
        (Some(Slot::Child(x)), Some(Slot::Child(y))) => {
            let (nx, ny) = (io.load(&x)?, io.load(&y)?);
            if nx.depth != ny.depth {
                return diff_lists(io, Some(Slot::Child(x)), Some(Slot::Child(y)), out);
            }
            let get = |n: &Node, d: u8| n.slots.iter().find(|(i, _)| *i == d).map(|(_, s)| *s);
            for d in 0..64u8 {
                diff_slots(io, get(&nx, d), get(&ny, d), out)?;
            }
            Ok(())
        }
        (a, b) => diff_lists(io, a, b, out),
    }
}

fn diff_lists(
    io: &mut impl NodeIo,
    a: Option<Slot>,
    b: Option<Slot>,
    out: &mut Vec<u64>,
) -> Result<(), StoreError> {
    let (mut la, mut lb) = (Vec::new(), Vec::new());
    collect(io, a, &mut la)?;
    collect(io, b, &mut lb)?;
    let (mut i, mut j) = (0, 0);
    while i < la.len() || j < lb.len() {
        match (la.get(i), lb.get(j)) {
            (Some(x), Some(y)) if x.0 == y.0 => {
                if x.1 != y.1 {
                    out.push(x.0);
                }
                i += 1;
                j += 1;
            }
            (Some(x), Some(y)) if x.0 < y.0 => {
                out.push(x.0);
                i += 1;
            }
            (Some(_), Some(y)) => {
                out.push(y.0);
                j += 1;
            }
            (Some(x), None) => {
                out.push(x.0);
                i += 1;
            }
            (None, Some(y)) => {
                out.push(y.0);
                j += 1;
            }
            (None, None) => break,
        }
    }
    Ok(())
}

/// An in-memory node store, for tests of the algorithms.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct MemNodes {
    pub(crate) nodes: Vec<Node>,
}

#[cfg(test)]
impl NodeIo for MemNodes {
    fn load(&mut self, ptr: &NodePtr) -> Result<Arc<Node>, StoreError> {
        Ok(Arc::new(self.nodes[ptr.loc.offset as usize].clone()))
    }
    fn store(&mut self, node: &Node) -> Result<NodePtr, StoreError> {
        self.nodes.push(node.clone());
        Ok(NodePtr {
            loc: Location {
                segment: 0,
                offset: self.nodes.len() as u64 - 1,
                len: 0,
                slot: 0,
            },
            merkle: node.merkle(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(v: u64) -> Ref {
        let mut hash = [0u8; 32];
        hash[..8].copy_from_slice(&v.to_le_bytes());
        Ref {
            hash,
            loc: Location {
                segment: 1,
                offset: v,
                len: 8,
                slot: 0,
            },
        }
    }

    fn key() -> impl Strategy<Value = u64> {
        prop_oneof![
            0..300u64,
            any::<u64>(),
            (0..40u64).prop_map(|i| u64::MAX - i),
            (0..40u64).prop_map(|i| i << 58)
        ]
    }

    proptest! {
        #[test]
        fn trie_matches_a_btreemap_and_is_canonical(batches in proptest::collection::vec(
            proptest::collection::btree_map(key(), proptest::option::of(0..1000u64), 0..40), 1..8)) {
            let mut io = MemNodes::default();
            let mut root = None;
            let mut model: BTreeMap<u64, u64> = BTreeMap::new();
            let mut roots = Vec::new();
            for batch in batches {
                let changes: Vec<(u64, Option<Ref>)> = batch.iter().map(|(k, v)| (*k, v.map(r))).collect();
                let before = model.len() as u64;
                let mut delta = Delta::default();
                root = apply(&mut io, root, &changes, &mut delta)?;
                for (k, v) in &batch {
                    match v { Some(v) => { model.insert(*k, *v); } None => { model.remove(k); } }
                }
                prop_assert_eq!(before + delta.added - delta.removed, model.len() as u64);
                let mut got = Vec::new();
                for_each(&mut io, root, &mut |k, v| { got.push((k, v)); Ok(()) })?;
                let want: Vec<(u64, Ref)> = model.iter().map(|(k, v)| (*k, r(*v))).collect();
                prop_assert_eq!(&got, &want);
                for (k, v) in &model {
                    prop_assert_eq!(get(&mut io, root, *k)?, Some(r(*v)));
                }
                for (lo, hi) in [(0u64, 100u64), (5, 6), (1 << 58, u64::MAX), (200, 1 << 63)] {
                    let mut got = Vec::new();
                    for_each_in(&mut io, root, lo, hi, &mut |k, _| { got.push(k); Ok(()) })?;
                    let want: Vec<u64> = model.range(lo..hi).map(|(k, _)| *k).collect();
                    prop_assert_eq!(got, want);
                }
                // Canonical: building the same set from scratch gives the same Merkle hash.
                let fresh_changes: Vec<(u64, Option<Ref>)> = model.iter().map(|(k, v)| (*k, Some(r(*v)))).collect();
                let fresh = apply(&mut io, None, &fresh_changes, &mut Delta::default())?;
                prop_assert_eq!(fresh.map(|p| p.merkle), root.map(|p| p.merkle));
                roots.push((root, model.clone()));
            }
            // Old roots are untouched, and diff between any two is the set difference.
            for (a, ma) in &roots {
                for (b, mb) in &roots {
                    let keys: std::collections::BTreeSet<u64> = ma.keys().chain(mb.keys()).copied().collect();
                    let want: Vec<u64> = keys.into_iter().filter(|k| ma.get(k) != mb.get(k)).collect();
                    prop_assert_eq!(diff(&mut io, *a, *b)?, want);
                }
                let mut got = Vec::new();
                for_each(&mut io, *a, &mut |k, _| { got.push(k); Ok(()) })?;
                prop_assert_eq!(got, ma.keys().copied().collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn nodes_round_trip_and_reject_inconsistent_bytes() {
        let n = Node {
            depth: 3,
            slots: vec![
                (digit(5 << 42, 3), Slot::Entry(5 << 42, r(1))),
                (
                    9,
                    Slot::Child(NodePtr {
                        loc: Location {
                            segment: 2,
                            offset: 64,
                            len: 100,
                            slot: 0,
                        },
                        merkle: [1; 32],
                    }),
                ),
            ],
        };
        let bytes = n.encode();
        assert_eq!(Node::decode(&bytes).expect("valid"), n);
        assert!(Node::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut wrong_slot = bytes.clone();
        wrong_slot[8] = 1; // entry map says slot 0
        assert!(Node::decode(&wrong_slot).is_err());
    }
}
