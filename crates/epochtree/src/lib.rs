//! # pagesnap-epochtree
//!
//! The design note's "tree-like structure that grows with snapshots of the modified pages": a
//! persistent (copy-on-write, structurally shared) radix tree keyed by [`Vpn`] that records, for
//! every page modified, the [`Epoch`] of its last modification. Snapshots never copy the page table:
//! "what changed since snapshot E, in range [a, b)?" costs O(changed · depth), not O(mapped).
//!
//! - [`EpochTree::mark`] records a page as modified in the current epoch: a walk down at most 11
//!   levels, copying only nodes still shared with a sealed view (the first mark below them in an
//!   epoch).
//! - [`EpochTree::mark_at`] records a modification late, at the epoch it was made in (never over a
//!   later record), for a writer that notes its first writes cheaply and lets the snapshot fold them
//!   in before it seals ([`EpochTree::advance_to`] brings the current epoch up to the writer's).
//! - [`EpochTree::seal`] ends the epoch in O(1) — it clones one `Arc` — and returns an immutable
//!   [`EpochView`]; the next epoch shares every unchanged node with it.
//! - On a view: [`EpochView::modified_since`] / [`EpochView::modified_in`] iterate modified pages in
//!   address order, skipping every subtree whose newest modification is not after the asked epoch;
//!   [`EpochView::any_modified`] answers the note's "was any mapping of this range modified?";
//!   [`EpochView::diff`] compares two views, skipping shared subtrees.
//! - [`EpochTree::retire_before`] forgets history older than the oldest retained snapshot; dropping
//!   a view frees the nodes only it held.
//!
//! Memory follows the pages modified, never the pages mapped. The other option the note names — a
//! scan of the page table's per-page epochs — is in [`scan`], so the two can be measured side by side.
//!
//! ```
//! use pagesnap_epochtree::EpochTree;
//! use pagesnap_pagetable::{Epoch, Vpn};
//!
//! let mut tree = EpochTree::new();
//! tree.mark(Vpn(7));
//! tree.mark(Vpn(1 << 40));
//! let first = tree.seal();                 // snapshot 1 = epoch 1
//! tree.mark(Vpn(7));
//! let second = tree.seal();                // snapshot 2 = epoch 2
//! let changed: Vec<_> = second.modified_since(first.epoch()).expect("retained").map(|(v, _)| v).collect();
//! assert_eq!(changed, vec![Vpn(7)]);
//! assert!(!second.any_modified(Vpn(8)..Vpn(1 << 40), first.epoch()).expect("retained"));
//! ```
#![no_std]
#![warn(missing_docs)]

extern crate alloc;

pub mod scan;

use alloc::sync::{Arc, Weak};
use alloc::vec;
use alloc::vec::Vec;
use core::ops::Range;
use pagesnap_pagetable::{Epoch, Vpn};

/// Bits of the page number each level consumes (64-way nodes).
const BITS: u32 = 6;
const MASK: u64 = (1 << BITS) - 1;

/// Errors of epoch queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EpochTreeError {
    /// The query asks about epochs whose history was retired.
    #[error("history before {floor:?} was retired; cannot answer what changed since {since:?} (take a full snapshot instead)")]
    Retired {
        /// The epoch asked about.
        since: Epoch,
        /// The oldest epoch still answerable.
        floor: Epoch,
    },
}

#[derive(Clone)]
enum Node {
    Inner(Arc<Inner>),
    Leaf(Arc<Leaf>),
}

#[derive(Clone)]
struct Inner {
    /// Newest epoch anywhere below.
    max: Epoch,
    /// A lower bound on the oldest epoch below (exact after a prune).
    min: Epoch,
    /// Which of the 64 children exist; `kids` holds them in index order.
    map: u64,
    kids: Vec<Node>,
}

#[derive(Clone)]
struct Leaf {
    max: Epoch,
    min: Epoch,
    /// Which of the 64 pages are recorded; `epochs` holds their last-modified epochs in order.
    map: u64,
    epochs: Vec<Epoch>,
}

impl Node {
    fn max(&self) -> Epoch {
        match self {
            Node::Inner(n) => n.max,
            Node::Leaf(l) => l.max,
        }
    }

    fn min(&self) -> Epoch {
        match self {
            Node::Inner(n) => n.min,
            Node::Leaf(l) => l.min,
        }
    }

    fn ptr_eq(&self, other: &Node) -> bool {
        match (self, other) {
            (Node::Inner(a), Node::Inner(b)) => Arc::ptr_eq(a, b),
            (Node::Leaf(a), Node::Leaf(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

#[inline]
fn rank(map: u64, i: u32) -> usize {
    (map & ((1u64 << i) - 1)).count_ones() as usize
}

/// The child index of `vpn` at `level` (0 = leaf).
#[inline]
fn index(vpn: u64, level: u32) -> u32 {
    // `BITS * level < 64` for every level a tree uses; the mask keeps 6 bits.
    ((vpn >> (BITS * level)) & MASK) as u32
}

/// Page numbers a node at `level` spans (as u128: the root of a full tree spans 2^66).
#[inline]
fn span(level: u32) -> u128 {
    1u128 << (BITS * (level + 1))
}

fn fits(vpn: u64, height: u32) -> bool {
    let bits = BITS * (height + 1);
    bits >= 64 || vpn >> bits == 0
}

fn new_path(vpn: u64, level: u32, epoch: Epoch) -> Node {
    if level == 0 {
        Node::Leaf(Arc::new(Leaf {
            max: epoch,
            min: epoch,
            map: 1 << index(vpn, 0),
            epochs: vec![epoch],
        }))
    } else {
        Node::Inner(Arc::new(Inner {
            max: epoch,
            min: epoch,
            map: 1 << index(vpn, level),
            kids: vec![new_path(vpn, level - 1, epoch)],
        }))
    }
}

/// Records `vpn` at `epoch` below `node`; true if the page is new to the tree.
fn mark_in(node: &mut Node, level: u32, vpn: u64, epoch: Epoch) -> bool {
    let i = index(vpn, level);
    match node {
        Node::Leaf(l) => {
            let l = Arc::make_mut(l);
            l.max = l.max.max(epoch);
            l.min = l.min.min(epoch);
            let r = rank(l.map, i);
            if l.map & (1 << i) != 0 {
                l.epochs[r] = epoch;
                false
            } else {
                l.map |= 1 << i;
                l.epochs.insert(r, epoch);
                true
            }
        }
        Node::Inner(n) => {
            let n = Arc::make_mut(n);
            n.max = n.max.max(epoch);
            n.min = n.min.min(epoch);
            let r = rank(n.map, i);
            if n.map & (1 << i) != 0 {
                mark_in(&mut n.kids[r], level - 1, vpn, epoch)
            } else {
                n.map |= 1 << i;
                n.kids.insert(r, new_path(vpn, level - 1, epoch));
                true
            }
        }
    }
}

/// The epoch recorded for `vpn` below `node`, without copying anything.
fn lookup(mut node: &Node, mut level: u32, vpn: u64) -> Option<Epoch> {
    loop {
        let i = index(vpn, level);
        match node {
            Node::Leaf(l) => return (l.map & (1 << i) != 0).then(|| l.epochs[rank(l.map, i)]),
            Node::Inner(n) => {
                if n.map & (1 << i) == 0 {
                    return None;
                }
                node = &n.kids[rank(n.map, i)];
                level -= 1;
            }
        }
    }
}

/// Removes every entry with epoch `<= keep_after` below `node`; returns how many it removed.
/// Subtrees with nothing to remove are left alone (and so stay shared with views).
fn prune(node: &mut Node, keep_after: Epoch) -> usize {
    if node.min() > keep_after {
        return 0;
    }
    match node {
        Node::Leaf(l) => {
            let l = Arc::make_mut(l);
            let (mut map, mut epochs, mut removed) = (0u64, Vec::with_capacity(l.epochs.len()), 0);
            let mut bits = l.map;
            for &e in &l.epochs {
                let i = bits.trailing_zeros();
                bits &= bits - 1;
                if e > keep_after {
                    map |= 1 << i;
                    epochs.push(e);
                } else {
                    removed += 1;
                }
            }
            l.map = map;
            l.min = epochs.iter().copied().min().unwrap_or(Epoch(u64::MAX));
            l.max = epochs.iter().copied().max().unwrap_or(Epoch(0));
            l.epochs = epochs;
            removed
        }
        Node::Inner(n) => {
            let n = Arc::make_mut(n);
            let mut removed = 0;
            let (mut map, mut kids) = (0u64, Vec::with_capacity(n.kids.len()));
            let mut bits = n.map;
            for mut kid in core::mem::take(&mut n.kids) {
                let i = bits.trailing_zeros();
                bits &= bits - 1;
                if kid.max() <= keep_after {
                    removed += count(&kid);
                    continue;
                }
                removed += prune(&mut kid, keep_after);
                map |= 1 << i;
                kids.push(kid);
            }
            n.map = map;
            n.min = kids.iter().map(Node::min).min().unwrap_or(Epoch(u64::MAX));
            n.max = kids.iter().map(Node::max).max().unwrap_or(Epoch(0));
            n.kids = kids;
            removed
        }
    }
}

fn count(node: &Node) -> usize {
    match node {
        Node::Leaf(l) => l.epochs.len(),
        Node::Inner(n) => n.kids.iter().map(count).sum(),
    }
}

/// A tree root: the node and how many inner levels it has above the leaves.
#[derive(Clone, Default)]
struct Root {
    height: u32,
    node: Option<Node>,
    len: usize,
}

impl Root {
    fn mark(&mut self, vpn: u64, epoch: Epoch) {
        let Some(mut node) = self.node.take() else {
            let mut height = 0;
            while !fits(vpn, height) {
                height += 1;
            }
            self.height = height;
            self.node = Some(new_path(vpn, height, epoch));
            self.len = 1;
            return;
        };
        while !fits(vpn, self.height) {
            node = Node::Inner(Arc::new(Inner {
                max: node.max(),
                min: node.min(),
                map: 1,
                kids: vec![node],
            }));
            self.height += 1;
        }
        if mark_in(&mut node, self.height, vpn, epoch) {
            self.len += 1;
        }
        self.node = Some(node);
    }

    fn get(&self, vpn: u64) -> Option<Epoch> {
        if !fits(vpn, self.height) {
            return None;
        }
        lookup(self.node.as_ref()?, self.height, vpn)
    }

    /// The root node wrapped in single-child inner nodes up to `height` (for comparing roots of
    /// different heights).
    fn lifted(&self, height: u32) -> Option<Node> {
        let mut node = self.node.clone()?;
        for _ in self.height..height {
            node = Node::Inner(Arc::new(Inner {
                max: node.max(),
                min: node.min(),
                map: 1,
                kids: vec![node],
            }));
        }
        Some(node)
    }
}

/// Memory and shape of a tree or view.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TreeStats {
    /// Pages recorded.
    pub pages: usize,
    /// Inner nodes.
    pub inner_nodes: usize,
    /// Leaf nodes (64 pages each at most).
    pub leaves: usize,
    /// Heap bytes of the nodes reachable from this root (shared nodes counted in full).
    pub heap_bytes: usize,
}

impl TreeStats {
    /// Heap bytes per recorded page.
    pub fn bytes_per_page(&self) -> f64 {
        if self.pages == 0 {
            0.0
        } else {
            self.heap_bytes as f64 / self.pages as f64
        }
    }
}

fn stats_of(node: &Node, s: &mut TreeStats) {
    const ARC_HEADER: usize = 2 * core::mem::size_of::<usize>();
    match node {
        Node::Leaf(l) => {
            s.leaves += 1;
            s.pages += l.epochs.len();
            s.heap_bytes += ARC_HEADER + core::mem::size_of::<Leaf>() + l.epochs.capacity() * 8;
        }
        Node::Inner(n) => {
            s.inner_nodes += 1;
            s.heap_bytes += ARC_HEADER
                + core::mem::size_of::<Inner>()
                + n.kids.capacity() * core::mem::size_of::<Node>();
            for k in &n.kids {
                stats_of(k, s);
            }
        }
    }
}

/// The live tree: records modifications in the current epoch.
///
/// Epochs are numbered from 1; [`EpochTree::seal`] ends the current one. A snapshot is taken by
/// sealing: snapshot *n* of a store is the view of epoch *n* (see `docs/architecture.md`).
#[derive(Clone)]
pub struct EpochTree {
    root: Root,
    current: Epoch,
    floor: Epoch,
}

impl core::fmt::Debug for EpochTree {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("EpochTree")
            .field("current", &self.current)
            .field("floor", &self.floor)
            .field("pages", &self.root.len)
            .finish()
    }
}

impl Default for EpochTree {
    fn default() -> Self {
        Self::new()
    }
}

impl EpochTree {
    /// An empty tree in epoch 1.
    pub fn new() -> Self {
        Self::starting_at(Epoch(1))
    }

    /// An empty tree whose current epoch is `epoch` (e.g. after restoring snapshot `epoch - 1`);
    /// nothing before it is known, so queries need `since >= epoch - 1`.
    pub fn starting_at(epoch: Epoch) -> Self {
        let epoch = epoch.max(Epoch(1));
        EpochTree {
            root: Root::default(),
            current: epoch,
            floor: Epoch(epoch.0 - 1),
        }
    }

    /// The epoch modifications are being recorded in.
    pub fn current(&self) -> Epoch {
        self.current
    }

    /// The oldest epoch `since` may name in a query.
    pub fn floor(&self) -> Epoch {
        self.floor
    }

    /// Pages recorded (each once, at its last modification).
    pub fn len(&self) -> usize {
        self.root.len
    }

    /// True if nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.root.len == 0
    }

    /// Records `vpn` as modified in the current epoch.
    pub fn mark(&mut self, vpn: Vpn) {
        let epoch = self.current;
        // Already recorded in this epoch: its path is already private to the live tree.
        if self.root.get(vpn.0) == Some(epoch) {
            return;
        }
        self.root.mark(vpn.0, epoch);
    }

    /// Records `vpn` as modified in `epoch`, an epoch already sealed or the current one, unless it
    /// is recorded in a later one: for a modification recorded late (a writer that notes its
    /// pages and lets the snapshot fold them in). An `epoch` after the current one is taken as
    /// the current one; one at or before the floor is not recorded (history there is retired).
    pub fn mark_at(&mut self, vpn: Vpn, epoch: Epoch) {
        let epoch = epoch.min(self.current);
        if epoch <= self.floor {
            return;
        }
        if self.root.get(vpn.0).is_some_and(|e| e >= epoch) {
            return;
        }
        self.root.mark(vpn.0, epoch);
    }

    /// Makes `epoch` the current one if the current one is earlier (the epochs between are empty):
    /// for a writer that counts epochs itself and records its modifications late, with
    /// [`EpochTree::mark_at`], before it seals.
    pub fn advance_to(&mut self, epoch: Epoch) {
        self.current = self.current.max(epoch);
    }

    /// Records every page of `vpns` (in any order) as modified in the current epoch.
    pub fn mark_all(&mut self, vpns: impl IntoIterator<Item = Vpn>) {
        for vpn in vpns {
            self.mark(vpn);
        }
    }

    /// The epoch `vpn` was last modified in, if it is recorded.
    pub fn last_modified(&self, vpn: Vpn) -> Option<Epoch> {
        self.root.get(vpn.0)
    }

    /// Ends the current epoch in O(1) and returns the view of everything recorded up to it.
    pub fn seal(&mut self) -> EpochView {
        let view = EpochView {
            root: self.root.clone(),
            epoch: self.current,
            floor: self.floor,
        };
        self.current = self.current.next();
        view
    }

    /// A view of everything recorded so far, without ending the epoch.
    pub fn view(&self) -> EpochView {
        EpochView {
            root: self.root.clone(),
            epoch: self.current,
            floor: self.floor,
        }
    }

    /// Forgets history up to and including `oldest_retained` (the epoch of the oldest snapshot
    /// still kept): pages last modified then or earlier are dropped from the live tree, since any
    /// question a retained snapshot can ask is about later epochs. Views keep their own nodes
    /// until they are dropped. Returns how many pages were dropped.
    pub fn retire_before(&mut self, oldest_retained: Epoch) -> usize {
        let keep_after = oldest_retained.min(Epoch(self.current.0 - 1));
        if keep_after <= self.floor {
            return 0;
        }
        self.floor = keep_after;
        let Some(node) = self.root.node.as_mut() else {
            return 0;
        };
        let removed = if node.max() <= keep_after {
            count(node)
        } else {
            prune(node, keep_after)
        };
        self.root.len -= removed;
        if self.root.len == 0 {
            self.root.node = None;
        }
        removed
    }

    /// Shape and heap bytes of the live tree.
    pub fn stats(&self) -> TreeStats {
        self.view().stats()
    }
}

/// An immutable view of the tree as it was when an epoch was sealed. Cheap to clone; shares nodes
/// with the live tree and with other views.
#[derive(Clone)]
pub struct EpochView {
    root: Root,
    epoch: Epoch,
    floor: Epoch,
}

impl core::fmt::Debug for EpochView {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("EpochView")
            .field("epoch", &self.epoch)
            .field("floor", &self.floor)
            .field("pages", &self.root.len)
            .finish()
    }
}

impl EpochView {
    /// The epoch this view ends with.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The oldest epoch `since` may name.
    pub fn floor(&self) -> Epoch {
        self.floor
    }

    /// Pages recorded.
    pub fn len(&self) -> usize {
        self.root.len
    }

    /// True if nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.root.len == 0
    }

    /// The epoch `vpn` was last modified in, as of this view.
    pub fn last_modified(&self, vpn: Vpn) -> Option<Epoch> {
        self.root.get(vpn.0)
    }

    fn check(&self, since: Epoch) -> Result<(), EpochTreeError> {
        if since < self.floor {
            Err(EpochTreeError::Retired {
                since,
                floor: self.floor,
            })
        } else {
            Ok(())
        }
    }

    /// Pages modified after epoch `since`, with their last-modified epochs, in address order.
    /// Subtrees with no modification after `since` are never entered: O(changed · depth).
    pub fn modified_since(&self, since: Epoch) -> Result<ModifiedPages<'_>, EpochTreeError> {
        self.pages(0, u128::from(u64::MAX) + 1, since)
    }

    /// Pages in `range` modified after epoch `since`, in address order.
    pub fn modified_in(
        &self,
        range: Range<Vpn>,
        since: Epoch,
    ) -> Result<ModifiedPages<'_>, EpochTreeError> {
        self.pages(u128::from(range.start.0), u128::from(range.end.0), since)
    }

    fn pages(&self, lo: u128, hi: u128, since: Epoch) -> Result<ModifiedPages<'_>, EpochTreeError> {
        self.check(since)?;
        let mut it = ModifiedPages {
            since,
            lo,
            hi,
            stack: Vec::new(),
            leaf: None,
        };
        if let Some(node) = &self.root.node {
            it.enter(node, self.root.height, 0);
        }
        Ok(it)
    }

    /// Was any page in `range` modified after epoch `since`? The note's range query; stops at the
    /// first hit and never enters a subtree outside the range or without a later modification.
    pub fn any_modified(&self, range: Range<Vpn>, since: Epoch) -> Result<bool, EpochTreeError> {
        Ok(self.modified_in(range, since)?.next().is_some())
    }

    /// Pages whose recorded state differs between `self` and `other` (recorded in one only, or at
    /// different epochs), in address order. Subtrees the two views share are skipped, so two views
    /// of one tree compare in O(changed · depth). For views of one tree with no
    /// [`EpochTree::retire_before`] between them this equals
    /// `later.modified_since(earlier.epoch())`.
    pub fn diff(&self, other: &EpochView) -> Vec<Vpn> {
        let height = self.root.height.max(other.root.height);
        let (a, b) = (self.root.lifted(height), other.root.lifted(height));
        let mut out = Vec::new();
        diff_nodes(a.as_ref(), b.as_ref(), height, 0, &mut out);
        out
    }

    /// Shape and heap bytes of the nodes this view reaches.
    pub fn stats(&self) -> TreeStats {
        let mut s = TreeStats::default();
        if let Some(n) = &self.root.node {
            stats_of(n, &mut s);
        }
        s
    }

    /// Test hook: weak references to every node this view reaches, to prove nodes are freed.
    #[doc(hidden)]
    pub fn debug_node_refs(&self) -> Vec<NodeRef> {
        fn walk(n: &Node, out: &mut Vec<NodeRef>) {
            match n {
                Node::Leaf(l) => out.push(NodeRef(WeakNode::Leaf(Arc::downgrade(l)))),
                Node::Inner(i) => {
                    out.push(NodeRef(WeakNode::Inner(Arc::downgrade(i))));
                    for k in &i.kids {
                        walk(k, out);
                    }
                }
            }
        }
        let mut out = Vec::new();
        if let Some(n) = &self.root.node {
            walk(n, &mut out);
        }
        out
    }
}

/// A weak reference to a tree node (test hook, see [`EpochView::debug_node_refs`]).
#[doc(hidden)]
#[derive(Debug)]
pub struct NodeRef(WeakNode);

#[derive(Debug)]
enum WeakNode {
    Inner(Weak<Inner>),
    Leaf(Weak<Leaf>),
}

impl NodeRef {
    /// True while some tree or view still holds the node.
    pub fn is_alive(&self) -> bool {
        match &self.0 {
            WeakNode::Inner(w) => w.strong_count() > 0,
            WeakNode::Leaf(w) => w.strong_count() > 0,
        }
    }
}

impl core::fmt::Debug for Inner {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Inner({} kids)", self.kids.len())
    }
}

impl core::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Leaf({} pages)", self.epochs.len())
    }
}

fn emit_all(node: &Node, level: u32, base: u64, out: &mut Vec<Vpn>) {
    match node {
        Node::Leaf(l) => {
            let mut bits = l.map;
            while bits != 0 {
                out.push(Vpn(base | u64::from(bits.trailing_zeros())));
                bits &= bits - 1;
            }
        }
        Node::Inner(n) => {
            let mut bits = n.map;
            for k in &n.kids {
                let i = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                emit_all(k, level - 1, base | (i << (BITS * level)), out);
            }
        }
    }
}

fn child(n: &Inner, i: u32) -> Option<&Node> {
    (n.map & (1 << i) != 0).then(|| &n.kids[rank(n.map, i)])
}

fn diff_nodes(a: Option<&Node>, b: Option<&Node>, level: u32, base: u64, out: &mut Vec<Vpn>) {
    match (a, b) {
        (None, None) => {}
        (Some(x), None) | (None, Some(x)) => emit_all(x, level, base, out),
        (Some(x), Some(y)) if x.ptr_eq(y) => {}
        (Some(Node::Leaf(x)), Some(Node::Leaf(y))) => {
            let mut bits = x.map | y.map;
            while bits != 0 {
                let i = bits.trailing_zeros();
                bits &= bits - 1;
                let ex = (x.map & (1 << i) != 0).then(|| x.epochs[rank(x.map, i)]);
                let ey = (y.map & (1 << i) != 0).then(|| y.epochs[rank(y.map, i)]);
                if ex != ey {
                    out.push(Vpn(base | u64::from(i)));
                }
            }
        }
        (Some(Node::Inner(x)), Some(Node::Inner(y))) => {
            let mut bits = x.map | y.map;
            while bits != 0 {
                let i = bits.trailing_zeros();
                bits &= bits - 1;
                diff_nodes(
                    child(x, i),
                    child(y, i),
                    level - 1,
                    base | (u64::from(i) << (BITS * level)),
                    out,
                );
            }
        }
        // Both roots were lifted to one height, so nodes at one level are of one kind.
        (Some(_), Some(_)) => unreachable!("leaf and inner node at the same level"),
    }
}

/// Iterator over modified pages (see [`EpochView::modified_since`]).
#[derive(Debug)]
pub struct ModifiedPages<'a> {
    since: Epoch,
    lo: u128,
    hi: u128,
    /// Inner nodes being walked: node, base page number, level, next kid position, kids left.
    stack: Vec<(&'a Inner, u64, u32, usize, u64)>,
    /// The leaf being walked: leaf, base, next epoch position, pages left.
    leaf: Option<(&'a Leaf, u64, usize, u64)>,
}

impl<'a> ModifiedPages<'a> {
    fn overlaps(&self, base: u64, level: u32) -> bool {
        let start = u128::from(base);
        start < self.hi && start + span(level) > self.lo
    }

    fn enter(&mut self, node: &'a Node, level: u32, base: u64) {
        if node.max() <= self.since || !self.overlaps(base, level) {
            return;
        }
        match node {
            Node::Leaf(l) => self.leaf = Some((l, base, 0, l.map)),
            Node::Inner(n) => self.stack.push((n, base, level, 0, n.map)),
        }
    }
}

impl Iterator for ModifiedPages<'_> {
    type Item = (Vpn, Epoch);

    fn next(&mut self) -> Option<(Vpn, Epoch)> {
        loop {
            if let Some((leaf, base, pos, bits)) = &mut self.leaf {
                while *bits != 0 {
                    let i = u64::from(bits.trailing_zeros());
                    *bits &= *bits - 1;
                    let e = leaf.epochs[*pos];
                    *pos += 1;
                    let vpn = *base | i;
                    if e > self.since && u128::from(vpn) >= self.lo && u128::from(vpn) < self.hi {
                        return Some((Vpn(vpn), e));
                    }
                }
                self.leaf = None;
            }
            let (node, base, level, pos, bits) = self.stack.last_mut()?;
            if *bits == 0 {
                self.stack.pop();
                continue;
            }
            let i = u64::from(bits.trailing_zeros());
            *bits &= *bits - 1;
            let kid = &node.kids[*pos];
            *pos += 1;
            let (kid_base, kid_level) = (*base | (i << (BITS * *level)), *level - 1);
            self.enter(kid, kid_level, kid_base);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heights_grow_for_large_page_numbers() {
        let mut t = EpochTree::new();
        t.mark(Vpn(5));
        assert_eq!(t.root.height, 0);
        t.mark(Vpn(1 << 20));
        assert_eq!(t.root.height, 3);
        t.mark(Vpn(u64::MAX));
        assert_eq!(t.root.height, 10);
        assert_eq!(t.last_modified(Vpn(5)), Some(Epoch(1)));
        assert_eq!(t.last_modified(Vpn(u64::MAX)), Some(Epoch(1)));
        assert_eq!(t.last_modified(Vpn(u64::MAX - 1)), None);
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn spans_cover_the_whole_space_at_the_top() {
        assert_eq!(span(0), 64);
        assert!(span(10) > u128::from(u64::MAX));
        assert!(fits(u64::MAX, 10) && !fits(u64::MAX, 9));
    }
}
