//! The epoch tree against a naive model: a `BTreeMap<Vpn, Epoch>` of last-modified epochs, copied
//! whole at every seal.

use pagesnap_epochtree::{EpochTree, EpochTreeError, EpochView};
use pagesnap_pagetable::{Epoch, Page, PageTable, VirtAddr, Vpn};
use proptest::prelude::*;
use std::collections::BTreeMap;

#[derive(Clone, Debug)]
enum Op {
    Mark(u64),
    /// `mark_at` an epoch this many before the current one (a late record).
    MarkAt(u64, u64),
    /// `advance_to` this many epochs past the current one.
    Advance(u64),
    MarkAll(Vec<u64>),
    Seal,
    Since(usize, u64),
    Range(usize, u64, u64, u64),
    Diff(usize, usize),
    Retire(u64),
    Drop(usize),
}

fn vpn() -> impl Strategy<Value = u64> {
    prop_oneof![
        0..200u64,
        (0..64u64).prop_map(|i| 0x7_ffff_f000 + i * 3),
        (0..32u64).prop_map(|i| u64::MAX - i),
        (0..32u64).prop_map(|i| i << 40),
        any::<u64>(),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => vpn().prop_map(Op::Mark),
        3 => (vpn(), 0..4u64).prop_map(|(v, back)| Op::MarkAt(v, back)),
        1 => (0..3u64).prop_map(Op::Advance),
        1 => proptest::collection::vec(vpn(), 0..20).prop_map(Op::MarkAll),
        2 => Just(Op::Seal),
        2 => (any::<usize>(), 0..12u64).prop_map(|(v, e)| Op::Since(v, e)),
        2 => (any::<usize>(), vpn(), vpn(), 0..12u64).prop_map(|(v, a, b, e)| Op::Range(v, a.min(b), a.max(b), e)),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Op::Diff(a, b)),
        1 => (0..12u64).prop_map(Op::Retire),
        1 => any::<usize>().prop_map(Op::Drop),
    ]
}

struct ModelView {
    pages: BTreeMap<u64, u64>,
    floor: u64,
    retired_since_seal: bool,
}

fn expected_since(
    m: &ModelView,
    lo: u64,
    hi: Option<u64>,
    since: u64,
) -> Result<Vec<(Vpn, Epoch)>, ()> {
    if since < m.floor {
        return Err(());
    }
    Ok(m.pages
        .range(lo..)
        .take_while(|(v, _)| hi.is_none_or(|h| **v < h))
        .filter(|(_, e)| **e > since)
        .map(|(v, e)| (Vpn(*v), Epoch(*e)))
        .collect())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn tree_matches_the_model(ops in proptest::collection::vec(op(), 1..200)) {
        let mut tree = EpochTree::new();
        let mut live: BTreeMap<u64, u64> = BTreeMap::new();
        let mut floor = 0u64;
        let mut views: Vec<(EpochView, ModelView)> = Vec::new();
        let mut retired_since_seal = false;
        // A late record (`mark_at` a sealed epoch) changes what that epoch holds after its view
        // was taken, so "diff = modified since the earlier view" no longer holds after one.
        let mut late_marked = false;
        for op in ops {
            match op {
                Op::Mark(v) => {
                    tree.mark(Vpn(v));
                    live.insert(v, tree.current().0);
                }
                Op::MarkAt(v, back) => {
                    let e = tree.current().0.saturating_sub(back);
                    late_marked |= e < tree.current().0;
                    tree.mark_at(Vpn(v), Epoch(e));
                    if e > floor && live.get(&v).is_none_or(|have| *have < e) {
                        live.insert(v, e);
                    }
                }
                Op::Advance(ahead) => {
                    let before = tree.current().0;
                    tree.advance_to(Epoch(before + ahead));
                    prop_assert_eq!(tree.current().0, before + ahead);
                    tree.advance_to(Epoch(before));
                    prop_assert_eq!(tree.current().0, before + ahead, "advance_to went back");
                }
                Op::MarkAll(vs) => {
                    tree.mark_all(vs.iter().map(|v| Vpn(*v)));
                    for v in vs {
                        live.insert(v, tree.current().0);
                    }
                }
                Op::Seal => {
                    let view = tree.seal();
                    views.push((view, ModelView { pages: live.clone(), floor, retired_since_seal }));
                    retired_since_seal = false;
                }
                Op::Since(i, since) if !views.is_empty() => {
                    let (view, m) = &views[i % views.len()];
                    let got: Result<Vec<_>, _> = view.modified_since(Epoch(since)).map(|it| it.collect());
                    match expected_since(m, 0, None, since) {
                        Ok(want) => prop_assert_eq!(got.ok(), Some(want)),
                        Err(()) => {
                            let refused = matches!(got, Err(EpochTreeError::Retired { .. }));
                            prop_assert!(refused, "query before the floor was answered");
                        }
                    }
                }
                Op::Range(i, lo, hi, since) if !views.is_empty() => {
                    let (view, m) = &views[i % views.len()];
                    let got: Result<Vec<_>, _> = view.modified_in(Vpn(lo)..Vpn(hi), Epoch(since)).map(|it| it.collect());
                    let any = view.any_modified(Vpn(lo)..Vpn(hi), Epoch(since));
                    match expected_since(m, lo, Some(hi), since) {
                        Ok(want) => {
                            prop_assert_eq!(any.ok(), Some(!want.is_empty()));
                            prop_assert_eq!(got.ok(), Some(want));
                        }
                        Err(()) => prop_assert!(got.is_err() && any.is_err()),
                    }
                }
                Op::Diff(a, b) if !views.is_empty() => {
                    let (va, ma) = &views[a % views.len()];
                    let (vb, mb) = &views[b % views.len()];
                    let keys: std::collections::BTreeSet<u64> = ma.pages.keys().chain(mb.pages.keys()).copied().collect();
                    let want: Vec<Vpn> = keys.into_iter().filter(|k| ma.pages.get(k) != mb.pages.get(k)).map(Vpn).collect();
                    prop_assert_eq!(va.diff(vb), want.clone());
                    prop_assert_eq!(vb.diff(va), want.clone());
                    // Between views of one tree with no retirement in between, diff is
                    // "modified since the earlier one".
                    let (early, late, ml) = if va.epoch() <= vb.epoch() { (va, vb, mb) } else { (vb, va, ma) };
                    let no_retire = !views.iter().any(|(v, m)| v.epoch() > early.epoch() && v.epoch() <= late.epoch() && m.retired_since_seal);
                    if no_retire && !late_marked && early.floor() == late.floor() {
                        let since: Vec<Vpn> = late.modified_since(early.epoch()).map(|it| it.map(|(v, _)| v).collect()).unwrap_or_default();
                        prop_assert_eq!(since, want);
                        let _ = ml;
                    }
                }
                Op::Retire(e) => {
                    let removed = tree.retire_before(Epoch(e));
                    let keep_after = e.min(tree.current().0 - 1);
                    if keep_after > floor {
                        floor = keep_after;
                        let before = live.len();
                        live.retain(|_, ep| *ep > keep_after);
                        prop_assert_eq!(removed, before - live.len());
                        retired_since_seal = true;
                    } else {
                        prop_assert_eq!(removed, 0);
                    }
                    prop_assert_eq!(tree.floor(), Epoch(floor));
                }
                Op::Drop(i) if !views.is_empty() => {
                    let i = i % views.len();
                    views.remove(i);
                }
                _ => {}
            }
            prop_assert_eq!(tree.len(), live.len());
        }
        // Every view still answers as it did when sealed (persistence).
        for (view, m) in &views {
            prop_assert_eq!(view.len(), m.pages.len());
            for (v, e) in &m.pages {
                prop_assert_eq!(view.last_modified(Vpn(*v)), Some(Epoch(*e)));
            }
        }
        let all: Vec<_> = tree.view().modified_since(tree.floor()).map(|it| it.collect()).unwrap_or_default();
        let want: Vec<_> = live.iter().map(|(v, e)| (Vpn(*v), Epoch(*e))).collect();
        prop_assert_eq!(all, want);
    }
}

#[test]
fn old_views_stay_unchanged_after_later_epochs() {
    let mut tree = EpochTree::new();
    for v in 0..1000u64 {
        tree.mark(Vpn(v * 17));
    }
    let e1 = tree.seal();
    let before: Vec<_> = e1.modified_since(Epoch(0)).expect("retained").collect();
    for round in 0..5u64 {
        for v in (0..1000u64).step_by(3 + round as usize) {
            tree.mark(Vpn(v * 17));
        }
        tree.mark(Vpn(1 << 50 | round));
        tree.seal();
    }
    tree.retire_before(Epoch(4));
    let after: Vec<_> = e1.modified_since(Epoch(0)).expect("retained").collect();
    assert_eq!(before, after);
    assert_eq!(before.len(), 1000);
    assert!(before.iter().all(|(_, e)| *e == Epoch(1)));
}

#[test]
fn dropping_views_and_retiring_frees_their_nodes() {
    let mut tree = EpochTree::new();
    for v in 0..10_000u64 {
        tree.mark(Vpn(v * 64));
    }
    let v1 = tree.seal();
    let v1_nodes = v1.debug_node_refs();
    // Epoch 2 rewrites a tenth of the pages: their paths are copied, the rest shared.
    for v in (0..10_000u64).step_by(10) {
        tree.mark(Vpn(v * 64));
    }
    let v2 = tree.seal();
    assert!(v1_nodes.iter().all(|n| n.is_alive()));
    let shared_with_live = {
        let live_nodes = tree.view().debug_node_refs();
        let alive_before = live_nodes.len();
        drop(live_nodes);
        alive_before
    };
    drop(v1);
    let alive = v1_nodes.iter().filter(|n| n.is_alive()).count();
    // Nodes on the copied paths died with v1; the others are still shared by v2 and the live tree.
    assert!(alive < v1_nodes.len(), "no node of v1 was freed");
    assert!(alive <= shared_with_live);
    // Retire epoch 1: pages last modified in it leave the live tree; once v2 goes too, nothing of
    // v1 is left anywhere.
    let removed = tree.retire_before(Epoch(1));
    assert_eq!(removed, 9_000);
    assert_eq!(tree.len(), 1_000);
    drop(v2);
    let alive = v1_nodes.iter().filter(|n| n.is_alive()).count();
    assert_eq!(alive, 0, "retired history still holds {alive} nodes of v1");
    let s = tree.stats();
    assert_eq!(s.pages, 1_000);
}

#[test]
fn memory_follows_modified_pages_not_mapped_pages() {
    // 1,000 pages modified among a million mapped (the tree never sees the unmodified ones).
    let mut tree = EpochTree::new();
    for v in 0..1_000u64 {
        tree.mark(Vpn(0x5_5555_0000 + v * 997));
    }
    let sparse = tree.stats();
    let mut dense = EpochTree::new();
    for v in 0..100_000u64 {
        dense.mark(Vpn(0x5_5555_0000 + v));
    }
    let dense = dense.stats();
    println!(
        "sparse: {:.1} bytes/page, dense: {:.1} bytes/page",
        sparse.bytes_per_page(),
        dense.bytes_per_page()
    );
    assert_eq!(sparse.pages, 1_000);
    assert!(sparse.heap_bytes < 1_000 * 400, "{sparse:?}");
    assert!(dense.bytes_per_page() < 16.0, "{dense:?}");
}

#[test]
fn queries_before_a_retired_epoch_are_refused_with_a_clear_error() {
    let mut tree = EpochTree::new();
    tree.mark(Vpn(1));
    tree.seal();
    tree.mark(Vpn(2));
    tree.seal();
    tree.retire_before(Epoch(1));
    let view = tree.view();
    let err = view.modified_since(Epoch(0)).expect_err("retired");
    assert_eq!(
        err,
        EpochTreeError::Retired {
            since: Epoch(0),
            floor: Epoch(1)
        }
    );
    assert!(err.to_string().contains("retired"));
    assert_eq!(
        view.modified_since(Epoch(1))
            .expect("kept")
            .collect::<Vec<_>>(),
        vec![(Vpn(2), Epoch(2))]
    );
}

#[test]
fn the_scan_and_the_tree_agree() {
    let table = PageTable::new();
    let mut tree = EpochTree::new();
    for epoch in 1..=4u64 {
        for i in 0..3000u64 {
            let vpn = i * 7 % 5000;
            if (i + epoch) % (epoch + 2) == 0 {
                let addr = VirtAddr(vpn << 12);
                let page = Page {
                    epoch: Epoch(epoch),
                    ..table.page_init(addr)
                };
                table.set_page(page).expect("room");
                tree.mark(Vpn(vpn));
            }
        }
        tree.seal();
    }
    let view = tree.view();
    for since in 0..=4u64 {
        let from_tree: Vec<_> = view
            .modified_since(Epoch(since))
            .expect("retained")
            .collect();
        assert_eq!(
            pagesnap_epochtree::scan::modified_since(&table, Epoch(since)),
            from_tree,
            "since {since}"
        );
        for (lo, hi) in [(0u64, 100u64), (1000, 1001), (4990, 6000)] {
            assert_eq!(
                pagesnap_epochtree::scan::any_modified(&table, Vpn(lo)..Vpn(hi), Epoch(since)),
                view.any_modified(Vpn(lo)..Vpn(hi), Epoch(since))
                    .expect("retained"),
                "range {lo}..{hi} since {since}"
            );
        }
    }
}
