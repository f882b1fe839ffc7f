//! Real processes: the `pagesnap` binary killed with SIGKILL at varied moments during `snapshot`
//! and `gc` of a 24 MiB image, at least 20 times. After every kill the store must open; at the end
//! `verify` is clean and every snapshot that exists — all acknowledged ones among them — restores
//! byte for byte to the image it was taken of.
//!
//! The kill moments are spread by waiting a varying few milliseconds after the start; the test's
//! assertions hold whatever moment the kill lands at.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const PAGES: usize = 6144; // 24 MiB

/// The image as of round `r`: a fixed base with round-specific pages rewritten.
fn image_at(r: u64) -> Vec<u8> {
    let mut data = vec![0u8; PAGES * 4096];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for (p, page) in data.chunks_mut(4096).enumerate() {
        if p % 5 == 0 {
            continue;
        }
        for c in page.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
    }
    for k in 1..=r {
        for i in 0..200u64 {
            let p = ((k * 7919 + i * 104_729) % PAGES as u64) as usize;
            data[p * 4096..p * 4096 + 16].copy_from_slice(&[(k as u8) ^ 0x5A; 16]);
        }
    }
    data
}

fn pagesnap(store: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pagesnap"));
    c.arg("--store")
        .arg(store)
        .arg("--quiet")
        .env_remove("PAGESNAP_STORE");
    c
}

fn list(store: &Path) -> BTreeMap<u64, u64> {
    let out = pagesnap(store)
        .args(["list", "--json"])
        .output()
        .expect("list");
    assert!(
        out.status.success(),
        "list after a kill failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v.as_array()
        .expect("array")
        .iter()
        .map(|s| {
            let round = s["label"]
                .as_str()
                .and_then(|l| l.strip_prefix('r'))
                .and_then(|r| r.parse().ok())
                .expect("label");
            (s["id"].as_u64().expect("id"), round)
        })
        .collect()
}

#[test]
fn sigkill_during_snapshot_and_gc_never_loses_a_committed_snapshot() {
    let dir = tempfile::tempdir().expect("tmp");
    let (store, img) = (dir.path().join("store"), dir.path().join("disk.img"));
    assert!(pagesnap(&store)
        .arg("init")
        .status()
        .expect("init")
        .success());
    let mut acknowledged: BTreeMap<u64, u64> = BTreeMap::new();
    let (mut kills, mut round) = (0u32, 0u64);
    while kills < 20 {
        round += 1;
        std::fs::write(&img, image_at(round)).expect("write image");
        let gc = round % 4 == 0;
        if gc {
            // Delete the oldest acknowledged snapshots (keeping three), then gc under fire.
            let existing = list(&store);
            let old: Vec<String> = existing
                .keys()
                .rev()
                .skip(3)
                .map(|id| id.to_string())
                .collect();
            if !old.is_empty() {
                let ok = pagesnap(&store)
                    .arg("delete")
                    .args(&old)
                    .status()
                    .expect("delete")
                    .success();
                assert!(ok);
                for id in &old {
                    acknowledged.remove(&id.parse::<u64>().expect("id"));
                }
            }
        }
        let mut child = if gc {
            pagesnap(&store)
                .arg("gc")
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn gc")
        } else {
            pagesnap(&store)
                .args([
                    "snapshot",
                    img.to_str().expect("utf-8"),
                    "--label",
                    &format!("r{round}"),
                ])
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn snapshot")
        };
        // Every third round runs to the end, so acknowledged snapshots accumulate; the others are
        // killed after 0–250 ms.
        let finished = if round % 3 == 1 {
            true
        } else {
            std::thread::sleep(Duration::from_millis(round * 37 % 250));
            child.try_wait().expect("try_wait").is_some()
        };
        if !finished {
            child.kill().expect("SIGKILL");
            kills += 1;
        }
        let out = child.wait_with_output().expect("wait");
        if finished && !gc {
            assert!(
                out.status.success(),
                "snapshot failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let id: u64 = String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .and_then(|l| l.trim().parse().ok())
                .expect("id");
            acknowledged.insert(id, round);
        }
        if finished && gc {
            assert!(out.status.success(), "gc failed");
        }
        // The store opens after every kill, and every acknowledged snapshot is still listed.
        let existing = list(&store);
        for (id, r) in &acknowledged {
            assert_eq!(
                existing.get(id),
                Some(r),
                "acknowledged snapshot {id} lost after round {round}"
            );
        }
        assert!(round < 400, "could not land 20 kills");
    }
    let v = pagesnap(&store).arg("verify").output().expect("verify");
    assert!(
        v.status.success(),
        "verify after {kills} kills: {}",
        String::from_utf8_lossy(&v.stdout)
    );
    let existing = list(&store);
    for (id, r) in &existing {
        let out = dir.path().join(format!("restored-{id}.img"));
        let ok = pagesnap(&store)
            .args(["restore", &id.to_string()])
            .arg(&out)
            .status()
            .expect("restore")
            .success();
        assert!(ok, "snapshot {id} does not restore");
        assert!(
            std::fs::read(&out).expect("read") == image_at(*r),
            "snapshot {id} differs from round {r}'s image"
        );
        std::fs::remove_file(&out).expect("rm");
    }
    // gc still works and leaves nothing to reclaim.
    assert!(pagesnap(&store).arg("gc").status().expect("gc").success());
    let info: serde_json::Value = serde_json::from_slice(
        &pagesnap(&store)
            .args(["info", "--json"])
            .output()
            .expect("info")
            .stdout,
    )
    .expect("json");
    assert_eq!(info["reclaimable_bytes"], 0);
    println!(
        "{kills} SIGKILLs during snapshot and gc, {} snapshots checked, 0 failed",
        existing.len()
    );
}
