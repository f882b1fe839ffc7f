//! The real `pagesnap` binary on real files.

use assert_cmd::Command;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().expect("tmp"),
        }
    }
    fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn cmd(&self) -> Command {
        let mut c = Command::cargo_bin("pagesnap").expect("binary");
        c.arg("--store")
            .arg(self.store())
            .arg("--quiet")
            .env_remove("PAGESNAP_STORE");
        c
    }
    /// Runs and returns (status, stdout, stderr).
    fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.cmd().args(args).output().expect("run");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.run(args);
        assert_eq!(code, 0, "pagesnap {args:?} failed: {err}");
        out
    }
    fn fails(&self, args: &[&str], code: i32, words: &str) -> String {
        let (got, out, err) = self.run(args);
        assert_eq!(
            got, code,
            "pagesnap {args:?}: expected exit {code}, got {got}: {out}{err}"
        );
        assert!(
            err.contains(words) || out.contains(words),
            "pagesnap {args:?}: {err:?} lacks {words:?}"
        );
        assert!(err.lines().count() <= 1, "errors are one line: {err}");
        err
    }
    fn snapshot(&self, image: &Path) -> u64 {
        let out = self.ok(&["snapshot", image.to_str().expect("utf-8")]);
        out.lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("no id in {out}"))
    }
    fn list(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["list", "--json"])).expect("json")
    }
}

fn image(pages: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; pages * 4096];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for p in 0..pages {
        if p % 3 == 0 {
            continue; // zero pages
        }
        for c in data[p * 4096..(p + 1) * 4096].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
    }
    data
}

#[test]
fn snapshot_change_grow_shrink_and_restore_every_snapshot_byte_for_byte() {
    let env = Env::new();
    env.ok(&["init"]);
    let img = env.path("disk.img");
    let mut versions = Vec::new();
    let mut data = image(300, 7);
    // Not a multiple of the page size: the tail page is partial.
    data.truncate(300 * 4096 - 1000);
    for step in 0..4 {
        match step {
            1 => data[4096 * 10..4096 * 10 + 50].fill(0xEE),
            2 => data.extend(image(40, 9)),
            3 => data.truncate(123 * 4096 + 7),
            _ => {}
        }
        std::fs::write(&img, &data).expect("write image");
        let id = env.snapshot(&img);
        versions.push((id, data.clone()));
    }
    assert_eq!(
        versions.iter().map(|v| v.0).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    let list = env.list();
    assert_eq!(list.as_array().map(Vec::len), Some(4));
    assert_eq!(
        list[2]["image_size"],
        serde_json::json!(versions[2].1.len())
    );
    for (id, want) in &versions {
        let out = env.path(&format!("r{id}.img"));
        env.ok(&["restore", &id.to_string(), out.to_str().expect("utf-8")]);
        let got = std::fs::read(&out).expect("read");
        assert_eq!(got.len(), want.len(), "snapshot {id} length");
        assert!(got == *want, "snapshot {id} differs");
        // Zero pages are holes.
        let allocated = std::fs::metadata(&out).expect("stat").blocks() * 512;
        assert!(
            allocated < want.len() as u64,
            "restore of {id} is not sparse ({allocated} bytes allocated)"
        );
    }
    // The second snapshot wrote one changed page.
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["snapshot", img.to_str().expect("utf-8"), "--json"]))
            .expect("json");
    assert_eq!(json["pages_changed"], 0, "{json}");
    assert_eq!(json["id"], 5);
    assert!(env.list()[1]["pages_changed"] == 1, "{}", env.list());
    assert!(env.ok(&["verify"]).contains("clean"));
}

#[test]
fn diff_names_the_changed_ranges() {
    let env = Env::new();
    env.ok(&["init"]);
    let img = env.path("d.img");
    let mut data = image(64, 3);
    std::fs::write(&img, &data).expect("write");
    env.snapshot(&img);
    data[5 * 4096] ^= 1;
    data[6 * 4096 + 9] ^= 1;
    data[40 * 4096] ^= 1;
    std::fs::write(&img, &data).expect("write");
    env.snapshot(&img);
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["diff", "1", "2", "--json"])).expect("json");
    assert_eq!(
        json["ranges"],
        serde_json::json!([{"start": 5 * 4096, "end": 7 * 4096, "pages": 2}, {"start": 40 * 4096, "end": 41 * 4096, "pages": 1}])
    );
    assert!(env
        .ok(&["diff", "1", "2"])
        .contains("2 range(s), 3 page(s) differ"));
}

#[test]
fn labels_name_snapshots() {
    let env = Env::new();
    env.ok(&["init"]);
    let img = env.path("l.img");
    std::fs::write(&img, image(8, 1)).expect("write");
    env.ok(&[
        "snapshot",
        img.to_str().expect("utf-8"),
        "--label",
        "nightly",
    ]);
    std::fs::write(&img, image(8, 2)).expect("write");
    env.ok(&[
        "snapshot",
        img.to_str().expect("utf-8"),
        "--label",
        "nightly",
    ]);
    let out = env.path("n.img");
    env.ok(&["restore", "nightly", out.to_str().expect("utf-8")]);
    assert_eq!(
        std::fs::read(&out).expect("read"),
        image(8, 2),
        "a label names its newest snapshot"
    );
    assert_eq!(env.list()[0]["label"], "nightly");
}

#[test]
fn verify_names_damage_and_only_the_damaged_snapshot_fails_to_restore() {
    let env = Env::new();
    env.ok(&["init"]);
    let img = env.path("v.img");
    let mut data = image(30, 5);
    std::fs::write(&img, &data).expect("write");
    env.snapshot(&img);
    data[20 * 4096 + 100] ^= 0xFF;
    std::fs::write(&img, &data).expect("write");
    env.snapshot(&img);
    assert!(env.ok(&["verify"]).contains("clean"));
    // Flip a byte inside the newest page record: page 20's new content, only in snapshot 2.
    let seg = env.store().join("seg-00000001.pss");
    let mut bytes = std::fs::read(&seg).expect("segment");
    let needle = &data[20 * 4096 + 64..20 * 4096 + 96];
    let at = bytes
        .windows(needle.len())
        .rposition(|w| w == needle)
        .expect("page 20's record");
    bytes[at + 5] ^= 0x10;
    std::fs::write(&seg, &bytes).expect("damage");
    let out = env.fails(&["verify"], 1, "DAMAGED snapshot 2, page 20");
    let _ = out;
    let (code, stdout, _) = env.run(&["verify"]);
    assert_eq!(code, 1);
    assert!(
        !stdout.contains("snapshot 1,"),
        "snapshot 1 is not damaged: {stdout}"
    );
    env.fails(
        &["restore", "2", env.path("bad.img").to_str().expect("utf-8")],
        2,
        "damaged page record",
    );
    assert!(
        !env.path("bad.img").exists(),
        "a failed restore leaves no output"
    );
    let good = env.path("good.img");
    env.ok(&["restore", "1", good.to_str().expect("utf-8")]);
    assert_eq!(std::fs::read(&good).expect("read"), image(30, 5));
    assert_eq!(env.run(&["verify", "1"]).0, 0, "snapshot 1 alone is clean");
}

fn dir_bytes(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .expect("dir")
        .map(|e| e.expect("entry").metadata().expect("stat").blocks() * 512)
        .sum()
}

#[test]
fn delete_and_gc_shrink_the_store_and_ids_are_never_reused() {
    let env = Env::new();
    env.ok(&["init"]);
    let img = env.path("g.img");
    for seed in 0..4 {
        std::fs::write(&img, image(200, seed + 10)).expect("write");
        env.snapshot(&img);
    }
    let before = dir_bytes(&env.store());
    env.ok(&["delete", "1", "2", "3"]);
    let out = env.ok(&["gc"]);
    assert!(out.contains("freed"), "{out}");
    let after = dir_bytes(&env.store());
    assert!(
        after * 2 < before,
        "store did not shrink: {before} -> {after}"
    );
    let info: serde_json::Value = serde_json::from_str(&env.ok(&["info", "--json"])).expect("json");
    assert_eq!(info["snapshots"], 1);
    assert_eq!(info["reclaimable_bytes"], 0);
    std::fs::write(&img, image(200, 99)).expect("write");
    assert_eq!(env.snapshot(&img), 5, "ids continue after deleted ones");
    let out = env.path("k.img");
    env.ok(&["restore", "4", out.to_str().expect("utf-8")]);
    assert_eq!(std::fs::read(&out).expect("read"), image(200, 13));
}

#[test]
fn bad_input_gets_one_clear_line_and_changes_nothing() {
    let env = Env::new();
    let img = env.path("b.img");
    std::fs::write(&img, image(10, 1)).expect("write");
    env.fails(
        &["snapshot", img.to_str().expect("utf-8")],
        2,
        "not a pagesnap store",
    );
    env.fails(&["list"], 2, "pagesnap init");
    env.ok(&["init"]);
    env.fails(&["init"], 2, "already holds a pagesnap store");
    env.snapshot(&img);
    let before = env.list();
    env.fails(
        &["snapshot", env.path("missing.img").to_str().expect("utf-8")],
        2,
        "missing.img",
    );
    env.fails(
        &["snapshot", env.dir.path().to_str().expect("utf-8")],
        2,
        "not a regular file",
    );
    env.fails(
        &["restore", "9", env.path("x.img").to_str().expect("utf-8")],
        2,
        "unknown snapshot '9'",
    );
    env.fails(&["delete", "nope"], 2, "unknown snapshot 'nope'");
    let existing = env.path("exists.img");
    std::fs::write(&existing, b"keep me").expect("write");
    env.fails(
        &["restore", "1", existing.to_str().expect("utf-8")],
        2,
        "--force",
    );
    assert_eq!(std::fs::read(&existing).expect("read"), b"keep me");
    env.ok(&["restore", "1", existing.to_str().expect("utf-8"), "--force"]);
    assert_eq!(std::fs::read(&existing).expect("read"), image(10, 1));
    env.fails(
        &[
            "restore",
            "1",
            env.store().join("inside.img").to_str().expect("utf-8"),
        ],
        2,
        "inside the store",
    );
    // A second writer is refused while another holds the store.
    let (_holder, _) = pagesnap_store::Store::open(env.store(), pagesnap_store::Mode::Write)
        .expect("hold the lock");
    env.fails(
        &["snapshot", img.to_str().expect("utf-8")],
        2,
        "locked by another writer",
    );
    env.fails(&["gc"], 2, "locked by another writer");
    // Readers still work beside the writer.
    assert_eq!(env.list(), before);
    drop(_holder);
    // Without --store or PAGESNAP_STORE.
    let out = Command::cargo_bin("pagesnap")
        .expect("bin")
        .env_remove("PAGESNAP_STORE")
        .arg("list")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PAGESNAP_STORE"));
    // PAGESNAP_STORE names the store.
    let out = Command::cargo_bin("pagesnap")
        .expect("bin")
        .env("PAGESNAP_STORE", env.store())
        .args(["list", "--json"])
        .output()
        .expect("run");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json"),
        before
    );
    assert_eq!(env.list(), before, "bad input changed the store");
}

#[test]
fn every_command_has_help_with_an_example() {
    for cmd in [
        "init",
        "snapshot",
        "list",
        "restore",
        "diff",
        "verify",
        "delete",
        "gc",
        "info",
        "demo",
        "completions",
    ] {
        let out = Command::cargo_bin("pagesnap")
            .expect("bin")
            .args([cmd, "--help"])
            .output()
            .expect("run");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("Example:"),
            "{cmd} --help: {text}"
        );
    }
    let out = Command::cargo_bin("pagesnap")
        .expect("bin")
        .args(["completions", "bash"])
        .output()
        .expect("run");
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("pagesnap"));
}

#[test]
fn the_demo_runs() {
    let out = Command::cargo_bin("pagesnap")
        .expect("bin")
        .arg("demo")
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches("byte-identical").count(), 2, "{text}");
    assert!(text.contains("verify clean"));
}

fn have(tool: &str) -> bool {
    std::process::Command::new(tool).arg("-V").output().is_ok()
}

#[test]
fn a_real_ext4_image_changed_by_debugfs_and_block_writes() {
    if !have("mke2fs") || !have("debugfs") {
        eprintln!("mke2fs/debugfs not installed: skipping the ext4 image test");
        return;
    }
    let env = Env::new();
    env.ok(&["init"]);
    let files = env.path("files");
    std::fs::create_dir(&files).expect("mkdir");
    for i in 0..40 {
        std::fs::write(
            files.join(format!("f{i}.bin")),
            image(4 + i % 5, i as u64 + 1),
        )
        .expect("write");
    }
    let img = env.path("fs.img");
    let status = std::process::Command::new("mke2fs")
        .args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-d",
        ])
        .arg(&files)
        .arg(&img)
        .arg("16M")
        .status()
        .expect("mke2fs");
    assert!(status.success());
    let mut versions = vec![(env.snapshot(&img), std::fs::read(&img).expect("read"))];
    // A new file through the filesystem.
    let newfile = env.path("new.bin");
    std::fs::write(&newfile, image(6, 77)).expect("write");
    let status = std::process::Command::new("debugfs")
        .args(["-w", "-R"])
        .arg(format!("write {} new.bin", newfile.display()))
        .arg(&img)
        .output()
        .expect("debugfs");
    assert!(status.status.success());
    versions.push((env.snapshot(&img), std::fs::read(&img).expect("read")));
    // In-place block writes.
    let mut raw = std::fs::read(&img).expect("read");
    for b in [300usize, 1500, 3000] {
        raw[b * 4096..b * 4096 + 512].fill(0x5A);
    }
    std::fs::write(&img, &raw).expect("write");
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["snapshot", img.to_str().expect("utf-8"), "--json"]))
            .expect("json");
    assert_eq!(json["pages_changed"], 3);
    versions.push((json["id"].as_u64().expect("id"), raw));
    for (id, want) in &versions {
        let out = env.path(&format!("fs{id}.img"));
        env.ok(&["restore", &id.to_string(), out.to_str().expect("utf-8")]);
        assert!(
            std::fs::read(&out).expect("read") == *want,
            "ext4 snapshot {id} differs"
        );
        if have("qemu-img") {
            let src = env.path(&format!("src{id}.img"));
            std::fs::write(&src, want).expect("write");
            let cmp = std::process::Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "raw"])
                .arg(&src)
                .arg(&out)
                .output()
                .expect("qemu-img");
            assert!(
                cmp.status.success(),
                "qemu-img compare: {}",
                String::from_utf8_lossy(&cmp.stdout)
            );
        }
    }
}

#[test]
fn the_fixture_image_round_trips() {
    let env = Env::new();
    env.ok(&["init"]);
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/images/small.img");
    let want = std::fs::read(&fixture).expect("fixture image");
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["snapshot", fixture.to_str().expect("utf-8"), "--json"]))
            .expect("json");
    // 25 pages: 5 zero, the repeated page stored once.
    assert_eq!(json["pages_read"], 25);
    assert_eq!(json["pages_changed"], 20);
    assert_eq!(json["pages_written"], 16);
    let out = env.path("small.img");
    env.ok(&["restore", "1", out.to_str().expect("utf-8")]);
    assert_eq!(std::fs::read(&out).expect("read"), want);
}
