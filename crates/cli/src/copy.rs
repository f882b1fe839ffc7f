//! `pagesnap copy --from SRC --to DST [SNAPSHOT...]`: snapshots from one store to another.

use crate::commands::{resolve, Ctx, OK};
use anyhow::{bail, Context, Result};
use pagesnap_store::{
    Mode, Ref, SnapshotId, SnapshotInfo, SnapshotMeta, StoreError, StoreOptions, Vpn,
};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Pages read from the source per batch.
const BATCH: usize = 2048;

/// What identifies a copy of a snapshot in another store: its time, sizes, label and origin
/// (ids differ between stores, and an encrypted store's page ids are keyed).
type Key = (u64, u64, u64, u32, Option<String>, Option<String>);

fn key(s: &SnapshotInfo) -> Key {
    (
        s.time_unix_ms,
        s.logical_size,
        s.page_count,
        s.page_size,
        s.label.clone(),
        s.origin.clone(),
    )
}

fn not_a_store(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<StoreError>(),
            Some(StoreError::NotAStore { .. })
        )
    })
}

/// The two stores of a copy, and where each one's password comes from.
pub struct Sides<'a> {
    pub from: &'a Path,
    pub to: &'a Path,
    pub from_password_file: Option<PathBuf>,
    pub to_password_file: Option<PathBuf>,
}

pub fn copy(ctx: &Ctx, sides: Sides<'_>, args: &[String], as_json: bool) -> Result<i32> {
    let (from, to) = (sides.from, sides.to);
    let src_ctx = Ctx::new(
        Some(from.into()),
        ctx.quiet_flag(),
        sides
            .from_password_file
            .or_else(|| ctx.password_file_flag()),
    );
    let dst_ctx = Ctx::new(
        Some(to.into()),
        ctx.quiet_flag(),
        sides.to_password_file.or_else(|| ctx.password_file_flag()),
    );
    let (src_at, dst_at) = (src_ctx.at()?, dst_ctx.at()?);
    if src_at.display() == dst_at.display() {
        bail!("--from and --to are the same store ({})", src_at.display());
    }
    let src = src_ctx.open(Mode::Read)?;
    let mut dst = match dst_ctx.open(Mode::Write) {
        Ok(s) => s,
        Err(e) if not_a_store(&e) => {
            if src.is_encrypted() {
                bail!(
                    "{} is not a store, and {} is encrypted: create the target first with \
                     `pagesnap --store {} init --encrypt`, so that its pages are never in clear",
                    dst_at.display(),
                    src_at.display(),
                    dst_at.display()
                );
            }
            let opts = StoreOptions {
                page_size: src.page_size(),
                ..StoreOptions::default()
            };
            dst_ctx.init_store(opts)?;
            dst_ctx.open(Mode::Write)?
        }
        Err(e) => return Err(e),
    };
    if src.is_encrypted() && !dst.is_encrypted() {
        bail!(
            "{} is encrypted and {} is not: copying would put its pages in clear; copy into an \
             encrypted store (`pagesnap --store DST init --encrypt`)",
            src_at.display(),
            dst_at.display()
        );
    }
    if src.page_size() != dst.page_size() {
        bail!(
            "{} has {}-byte pages and {} {}-byte pages: a snapshot cannot move between them",
            src_at.display(),
            src.page_size(),
            dst_at.display(),
            dst.page_size()
        );
    }
    let mut ids: Vec<SnapshotId> = if args.is_empty() {
        src.snapshot_ids()?
    } else {
        args.iter()
            .map(|a| resolve(&src, a))
            .collect::<Result<_>>()?
    };
    ids.sort();
    ids.dedup();
    let mut in_dst: HashMap<Key, SnapshotId> =
        dst.snapshots()?.iter().map(|s| (key(s), s.id)).collect();
    let mut rows = Vec::new();
    for id in ids {
        let info = src.snapshot(id)?;
        if let Some(there) = in_dst.get(&key(&info)) {
            if !as_json {
                println!(
                    "snapshot {id} is already in {} as {there}",
                    dst_at.display()
                );
            }
            rows.push(json!({"from": id.0, "to": there.0, "pages_sent": 0, "copied": false}));
            continue;
        }
        // The parent's copy in the target, if there is one: then only the difference is sent.
        let base = match info.parent {
            Some(p) => src
                .snapshot(p)
                .ok()
                .and_then(|pi| in_dst.get(&key(&pi)).copied()),
            None => None,
        };
        let changed: Option<HashSet<u64>> = match (base, info.parent) {
            (Some(_), Some(p)) => Some(src.diff(p, id)?.into_iter().map(|v| v.0).collect()),
            _ => None,
        };
        dst.begin(base)
            .with_context(|| format!("starting a snapshot in {}", dst_at.display()))?;
        let sent = (|| -> Result<u64> {
            let mut refs: Vec<(Vpn, Ref)> = Vec::new();
            let mut present: HashSet<u64> = HashSet::new();
            src.for_each_page(id, |v, r| {
                if changed.as_ref().is_none_or(|c| c.contains(&v.0)) {
                    refs.push((v, *r));
                    present.insert(v.0);
                }
                Ok(())
            })?;
            let ps = src.page_size() as usize;
            let mut buf = Vec::with_capacity(BATCH * ps);
            for batch in refs.chunks(BATCH) {
                buf.clear();
                let only: Vec<Ref> = batch.iter().map(|(_, r)| *r).collect();
                src.read_refs_into(&only, &mut buf)
                    .with_context(|| format!("reading snapshot {id} of {}", src_at.display()))?;
                for (i, (v, _)) in batch.iter().enumerate() {
                    dst.put(*v, &buf[i * ps..(i + 1) * ps])?;
                }
            }
            // Pages the parent had and this snapshot does not: zero now.
            if let Some(c) = &changed {
                let mut gone: Vec<u64> =
                    c.iter().filter(|v| !present.contains(v)).copied().collect();
                gone.sort_unstable();
                for v in gone {
                    dst.remove(Vpn(v))?;
                }
            }
            Ok(refs.len() as u64)
        })();
        let sent = match sent {
            Ok(n) => n,
            Err(e) => {
                dst.abort();
                return Err(e);
            }
        };
        let report = dst
            .commit(SnapshotMeta {
                epoch: info.epoch,
                label: info.label.clone(),
                logical_size: info.logical_size,
                time_unix_ms: Some(info.time_unix_ms),
                origin: info.origin.clone(),
            })
            .with_context(|| {
                format!(
                    "committing the copy of snapshot {id} in {}",
                    dst_at.display()
                )
            })?;
        in_dst.insert(key(&info), report.id);
        if !as_json {
            println!(
                "copied snapshot {id} to {} as {} ({sent} page(s) sent{}, {} new)",
                dst_at.display(),
                report.id,
                if base.is_some() {
                    " on its parent's copy"
                } else {
                    ""
                },
                report.pages_written
            );
        }
        rows.push(json!({
            "from": id.0,
            "to": report.id.0,
            "pages_sent": sent,
            "pages_written": report.pages_written,
            "copied": true,
        }));
    }
    drop(dst);
    if as_json {
        let mut v = json!({"snapshots": rows});
        if let Some(t) = dst_ctx.traffic() {
            v["target_transfer"] = crate::commands::traffic_json(t);
        }
        if let Some(t) = src_ctx.traffic() {
            v["source_transfer"] = crate::commands::traffic_json(t);
        }
        println!("{v}");
    }
    Ok(OK)
}
